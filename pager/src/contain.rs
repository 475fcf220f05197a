//! Keeping a bug inside the pager to the app it hit.
//!
//! A panic in a session's reader, evictor or in a fetch worker would
//! otherwise end that thread and leave the app's faulting threads waiting
//! forever (pages stuck `Fetching`, nobody reading its uffd). Instead the
//! app is stopped with a message (`Session::fatal`: never zeros, never a
//! hang) and the pager goes on serving every other app.
//!
//! `DMEM_PAGER_FAILPOINT=NAME:N` makes the Nth pass through failpoint NAME
//! panic, so that tests can show this with the real daemons.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

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

/// Panics on the Nth pass through `name` when `DMEM_PAGER_FAILPOINT` says so.
pub fn failpoint(name: &str) {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("DMEM_PAGER_FAILPOINT").ok()?;
        let (n, at) = v.split_once(':')?;
        Some((n.to_string(), at.parse().ok()?))
    });
    if let Some((n, at)) = spec {
        if n == name && PASSES.fetch_add(1, Ordering::Relaxed) + 1 == *at {
            panic!("failpoint {name} reached");
        }
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
}
