//! What the shim does when it is loaded: read its settings, attach to the
//! pager (reserve and register the arena, start the agent), then turn on
//! the managed malloc path. A program that would run without the shim
//! always runs with it: when the pager cannot be reached it runs unmanaged
//! and says so once, unless `DMEM_REQUIRE=1` asks for an error instead.

use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::OnceLock;

use dmem_pager::app::{AppConfig, AppError, AppSession};

use crate::config::Config;
use crate::{arena, fork, malloc, mapping};

/// The live session: set at load, replaced in a forked child that takes
/// its arena under a session of its own (`adopt_after_fork`). Sessions are
/// leaked, never dropped: the uffd copy and the agent stay for the
/// process's life, and a child's inherited copy names threads it lacks.
static SESSION: AtomicPtr<AppSession> = AtomicPtr::new(std::ptr::null_mut());
/// How this process attached, for a forked child to attach the same way.
static APP_CONFIG: OnceLock<AppConfig> = OnceLock::new();

pub fn session() -> Option<&'static AppSession> {
    // SAFETY: SESSION is null or a pointer from Box::into_raw that is never
    // freed, so the reference is valid for the rest of the process.
    unsafe { SESSION.load(Ordering::Acquire).as_ref() }
}

fn set_session(s: AppSession) {
    SESSION.store(Box::into_raw(Box::new(s)), Ordering::Release);
}

/// In a forked child (from its atfork handler, single-threaded): takes the
/// inherited arena under a new session of its own, so its managed memory
/// stays paged with its own limit and agent. `snapshot`: the key of the
/// fork snapshot holding what was out of the parent (0: none).
pub fn adopt_after_fork(inherited: &AppSession, snapshot: u64) -> Result<(), AppError> {
    let cfg = APP_CONFIG
        .get()
        .ok_or_else(|| AppError::Protocol("no settings recorded at load".into()))?;
    let s = AppSession::adopt(cfg, inherited, snapshot)?;
    set_session(s);
    Ok(())
}

pub fn start() {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dmem: bad setting: {e}");
            std::process::exit(2);
        }
    };
    if cfg.disable {
        return;
    }
    if !cfg.inherit {
        drop_preload_for_children();
    }
    let app_cfg = AppConfig {
        socket: cfg.socket.clone(),
        arena_len: cfg.arena,
        local_limit: cfg.local_limit,
        on_evicted: Some(arena::drop_kept_evicted),
    };
    match AppSession::attach(&app_cfg) {
        Ok(app) => fork::between_forks(|| {
            arena::install(app.arena_ptr() as u64, app.arena_len() as u64);
            // Kept freed blocks take local memory from live data: a little.
            arena::keep_freed(cfg.keep_freed.min(app.local_limit() / 8));
            malloc::enable(cfg.min_alloc);
            mapping::enable(cfg.mmap);
            set_session(app);
            let _ = APP_CONFIG.set(app_cfg);
            fork::install(cfg.fork_managed);
        }),
        Err(e) if cfg.require => {
            eprintln!("dmem: {e}; DMEM_REQUIRE=1 is set, so not running unmanaged");
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("dmem: {e}; running this program without dmem (unmanaged)");
        }
    }
}

/// `DMEM_INHERIT=0`: programs this one executes run without the shim.
fn drop_preload_for_children() {
    let Ok(v) = std::env::var("LD_PRELOAD") else {
        return;
    };
    let kept: Vec<&str> = v
        .split([' ', ':'])
        .filter(|p| !p.is_empty() && !p.ends_with("libdmem.so"))
        .collect();
    // Single-threaded here: the loader runs constructors before main.
    if kept.is_empty() {
        std::env::remove_var("LD_PRELOAD");
    } else {
        std::env::set_var("LD_PRELOAD", kept.join(":"));
    }
}

/// Registers a range of the arena with the pager's userfaultfd again
/// (see `arena::zero`). A forked child runs its arena unmanaged and has
/// nothing to register; a failure leaves the range as plain memory, which
/// is correct, only unmanaged.
pub fn register_again(start: u64, len: u64) {
    if fork::detached() {
        return;
    }
    if let Some(s) = session() {
        if let Err(e) = s.register_again(start, len as usize) {
            crate::sys::write_stderr(&format!(
                "dmem: cannot manage {len} bytes at {start:#x} again ({e}); they stay unmanaged\n"
            ));
        }
    }
}

/// Stops the pager from evicting this process's pages while the returned
/// connection is open (None when detached or unattached). An eviction in
/// flight has finished when this returns.
pub fn hold_evictions() -> Option<std::os::fd::OwnedFd> {
    if fork::detached() {
        return None;
    }
    session().and_then(|s| s.hold().ok()).map(|(fd, _)| fd)
}
