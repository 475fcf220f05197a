//! Keeping a bug inside the pager to the app it hit.
//!
//! A panic in a session's reader, evictor or in a fetch worker would
//! otherwise end that thread and leave the app's faulting threads waiting
//! forever (pages stuck `Fetching`, nobody reading its uffd). Instead the
//! app is stopped with a message (`Session::fatal`: never zeros, never a
//! hang) and the pager goes on serving every other app.
//!
//! `DMEM_PAGER_FAILPOINT=NAME:N` makes the Nth pass through failpoint NAME
//! panic, so that tests can show this with the real daemons;
//! `NAME:sleep:MS` makes every pass wait MS milliseconds instead, so that
//! a test can win a race it needs to win (see `failpoint`'s callers).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::session::Session;

/// Runs `f`; if it panics, stops the session's app with a message naming
/// `what`. Returns `None` after a panic.
pub fn contain<R>(s: &Session, what: &str, f: impl FnOnce() -> R) -> Option<R> {
    // Unwind safety: the session is stopped on a panic, so state left half
    // updated is only torn down, never served from again.
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(p) => {
            s.fatal(&format!(
                "internal error in the pager's {what} ({}); this is a dmem bug, please report it",
                message(p.as_ref())
            ));
            None
        }
    }
}

/// The text a panic was raised with.
fn message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}

/// What `DMEM_PAGER_FAILPOINT` asks of one failpoint.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    PanicAt(u64),
    Sleep(Duration),
}

/// `NAME:N` or `NAME:sleep:MS`; anything else is no failpoint.
fn parse(spec: &str) -> Option<(String, Action)> {
    let (name, rest) = spec.split_once(':')?;
    let action = match rest.split_once(':') {
        Some(("sleep", ms)) => Action::Sleep(Duration::from_millis(ms.parse().ok()?)),
        Some(_) => return None,
        None => Action::PanicAt(rest.parse().ok()?),
    };
    Some((name.to_string(), action))
}

/// Panics or waits at `name` when `DMEM_PAGER_FAILPOINT` says so.
pub fn failpoint(name: &str) {
    static SPEC: OnceLock<Option<(String, Action)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| parse(&std::env::var("DMEM_PAGER_FAILPOINT").ok()?));
    match spec {
        Some((n, Action::PanicAt(at)))
            if n == name && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *at =>
        {
            panic!("failpoint {name} reached")
        }
        Some((n, Action::Sleep(d))) if n == name => std::thread::sleep(*d),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_reads_str_and_string_panics() {
        let p = catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(message(p.as_ref()), "plain");
        let p = catch_unwind(|| panic!("formatted {}", 7)).unwrap_err();
        assert_eq!(message(p.as_ref()), "formatted 7");
        let p = catch_unwind(|| std::panic::panic_any(3u8)).unwrap_err();
        assert_eq!(message(p.as_ref()), "a panic");
    }

    #[test]
    fn failpoint_specs_parse_or_are_ignored() {
        assert_eq!(parse("fetch:3"), Some(("fetch".into(), Action::PanicAt(3))));
        assert_eq!(
            parse("adopt:sleep:250"),
            Some(("adopt".into(), Action::Sleep(Duration::from_millis(250))))
        );
        for bad in ["fetch", "fetch:", "fetch:x", "adopt:sleep:", "adopt:nap:5"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
