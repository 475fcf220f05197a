//! fork() under the shim: atfork handlers registered ahead of every other
//! (`register_first`).
//!
//! The child of a plain fork() does not inherit the userfaultfd
//! registration: pages the pager had taken out of the parent would read as
//! zeros there. So before the fork the parent asks the pager to hold
//! evictions, takes the arena lock (the child inherits consistent
//! bookkeeping, and nothing of the shim changes managed memory until after
//! the fork), and then asks the pager for a fork snapshot: what the child
//! needs of the pages that are out of the parent (see the pager's
//! `forksnap`). The child gets a copy-on-write image of the pages present,
//! drops its copies of the parent's pager connections and uffd, and, when
//! it inherited managed blocks, takes its arena under a session of its own
//! (its own uffd, agent and local limit): the pager adopts the pages
//! present as the child's data and the snapshot's as pages out of it. A
//! child with no managed blocks (a shell's fork before exec) runs with its
//! managed memory as plain memory; nothing of its parent's is out there but
//! kept freed blocks, whose content nobody owns. A child that cannot set up
//! its session stops with a message: what its parent had out is only on
//! the pager. With `DMEM_FORK_MANAGED=0` children run unmanaged, and the
//! parent brings its pages back before every fork instead. The parent lets
//! the pager evict again after the fork. This is correct with or without
//! UFFD_FEATURE_EVENT_FORK.

use std::ffi::{c_int, c_void};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

use crate::lock::SpinLock;
use crate::{arena, start, sys};

/// The hold connection across the fork (-1: none).
static HOLD_FD: AtomicI32 = AtomicI32::new(-1);
/// The fork snapshot's key for the child (0: none, every page is present).
static SNAPSHOT: AtomicU64 = AtomicU64::new(0);
/// Held from `prepare` until after the fork, in parent and child.
static FORKING: SpinLock<()> = SpinLock::new(());
/// This process is a forked child without a session of its own: the
/// session belongs to an ancestor and its managed memory is plain memory
/// here.
static DETACHED: AtomicBool = AtomicBool::new(false);
/// `DMEM_FORK_MANAGED`: a child with managed blocks gets its own session.
static CHILD_SESSIONS: AtomicBool = AtomicBool::new(true);

extern "C" fn prepare() {
    // One fork at a time, from before its hold: a child must not inherit
    // another thread's hold connection (it would keep that hold, and its
    // parent unevicted, for its whole life), and a parent must close its
    // own (see `parent`). Only attach (`between_forks`) takes it too.
    FORKING.acquire();
    let session = start::session().filter(|_| !DETACHED.load(Ordering::Acquire));
    let Some(s) = session else {
        arena::lock_for_fork(|_| {
            SNAPSHOT.store(0, Ordering::Release);
            false
        });
        return;
    };
    let (conn, pages_out) = match s.hold() {
        Ok(x) => x,
        Err(e) => sys::die(&format!(
            "dmem: cannot prepare fork() with the pager ({e}); stopping rather than \
             giving the child memory that reads as zeros\n"
        )),
    };
    // The snapshot only once the arena is locked: from then until the fork
    // the parent's pages change only by fetches, which change no copy.
    arena::lock_for_fork(|foreign| {
        SNAPSHOT.store(0, Ordering::Release);
        if pages_out == 0 {
            return false;
        }
        // With a mapping of the program's own inside the arena the child
        // cannot register the arena again (it falls back to plain memory),
        // so it must get every page with the fork.
        if CHILD_SESSIONS.load(Ordering::Acquire) && !foreign {
            match s.snapshot_for_fork(&conn) {
                Ok(key) => {
                    SNAPSHOT.store(key, Ordering::Release);
                    return false;
                }
                Err(e) => sys::write_stderr(&format!(
                    "dmem: no fork snapshot from the pager ({e}); bringing the heap back \
                     before fork()\n"
                )),
            }
        }
        true
    });
    HOLD_FD.store(conn.into_raw_fd(), Ordering::Release);
}

fn close_hold() {
    let fd = HOLD_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        sys::close(fd);
    }
}

extern "C" fn parent() {
    close_hold();
    arena::unlock_after_fork();
    FORKING.release();
}

extern "C" fn child() {
    arena::unlock_after_fork();
    FORKING.release();
    adopt_or_detach();
    // Only now: the pager reads the parent's page state as at the fork,
    // which its hold on evictions keeps until this copy closes too.
    close_hold();
}

/// The child's side of the fork: its own session, or plain memory.
fn adopt_or_detach() {
    if DETACHED.load(Ordering::Acquire) {
        return; // a detached process's child: the descriptors are closed already
    }
    let Some(s) = start::session() else {
        return;
    };
    for fd in s.inherited_fds() {
        sys::close(fd);
    }
    if !CHILD_SESSIONS.load(Ordering::Acquire) || !arena::has_allocations() {
        DETACHED.store(true, Ordering::Release);
        return;
    }
    let snapshot = SNAPSHOT.load(Ordering::Acquire);
    if let Err(e) = start::adopt_after_fork(s, snapshot) {
        if snapshot != 0 {
            sys::die(&format!(
                "dmem: forked child {}: {e}; the memory its parent had paged out at the \
                 fork is only with the pager, so it stops rather than read zeros\n",
                std::process::id()
            ));
        }
        DETACHED.store(true, Ordering::Release);
        sys::write_stderr(&format!(
            "dmem: forked child {}: {e}; its managed memory is plain memory from here on\n",
            std::process::id()
        ));
    }
}

/// This process is a forked child whose managed memory is plain memory.
pub fn detached() -> bool {
    DETACHED.load(Ordering::Acquire)
}

pub fn install(child_sessions: bool) {
    CHILD_SESSIONS.store(child_sessions, Ordering::Release);
    register_first();
}

/// Registers the shim's handlers with glibc, once. glibc runs child
/// handlers in the order they were registered, and a library the program
/// depends on is initialised before the preloaded shim: a child handler it
/// registered from its constructor would run before the shim's and read
/// zeros where the parent had pages out. So the shim's are registered
/// ahead of any other, by the first `pthread_atfork` call (see
/// `__register_atfork`) or at attach, whichever comes first. Before the
/// shim attaches the handlers find no session and change nothing.
///
/// A flag claimed once rather than a `Once`: a child forked while another
/// thread was registering would inherit a `Once` still running and hang in
/// its first `pthread_atfork`.
fn register_first() {
    static CLAIMED: AtomicBool = AtomicBool::new(false);
    if CLAIMED.swap(true, Ordering::AcqRel) {
        return;
    }
    let rc = sys::libc_register_atfork(
        Some(prepare),
        Some(parent),
        Some(child),
        std::ptr::null_mut(),
    );
    if rc != 0 {
        sys::write_stderr("dmem: cannot register fork handlers; fork() may be unsafe\n");
    }
}

/// Runs `attach` (installing the arena and the session) between forks, so
/// that a fork's prepare handler and its parent and child handlers see
/// the same: either both before the shim attached, or both after. Before
/// attach the handlers can run (see `register_first`).
pub fn between_forks(attach: impl FnOnce()) {
    let _forks_wait = FORKING.lock();
    attach();
}

/// Interposes glibc's `__register_atfork`, which every `pthread_atfork`
/// call goes through (glibc links `pthread_atfork` into each caller), so
/// that the shim's handlers come first (`register_first`).
///
/// # Safety
/// As glibc's: the handlers must stay callable while `dso` is loaded.
#[no_mangle]
pub unsafe extern "C" fn __register_atfork(
    prepare: sys::AtforkHandler,
    parent: sys::AtforkHandler,
    child: sys::AtforkHandler,
    dso: *mut c_void,
) -> c_int {
    register_first();
    sys::libc_register_atfork(prepare, parent, child, dso)
}
