//! fork() under the shim. Registered with `pthread_atfork` once attached.
//!
//! The child of a plain fork() does not inherit the userfaultfd
//! registration: pages the pager had taken out of the parent would read as
//! zeros there. So before the fork the parent asks the pager to hold
//! evictions, brings every page of its managed blocks back by reading it,
//! and holds the arena lock (the child inherits consistent bookkeeping).
//! The child gets a complete copy-on-write image and drops its copies of
//! the parent's pager connections and uffd. When it inherited managed
//! blocks, it then takes its arena under a session of its own (its own
//! uffd, agent and local limit; the pager adopts the pages present as the
//! child's dirty data), so what it touches afterwards is paged too. A
//! child with no managed blocks (a shell's fork before exec), or one
//! whose session cannot be set up, runs with its managed memory as plain
//! memory, which is correct, only unmanaged. The parent lets the pager
//! evict again after the fork. This is correct with or without
//! UFFD_FEATURE_EVENT_FORK, at the price of the parent's memory being
//! local at the moment of the fork.

use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::{arena, start, sys};

/// The hold connection across the fork (-1: none).
static HOLD_FD: AtomicI32 = AtomicI32::new(-1);
/// This process is a forked child without a session of its own: the
/// session belongs to an ancestor and its managed memory is plain memory
/// here.
static DETACHED: AtomicBool = AtomicBool::new(false);
/// `DMEM_FORK_MANAGED`: a child with managed blocks gets its own session.
static CHILD_SESSIONS: AtomicBool = AtomicBool::new(true);

extern "C" fn prepare() {
    let session = start::session().filter(|_| !DETACHED.load(Ordering::Acquire));
    if let Some(s) = session {
        match s.hold() {
            Ok((conn, pages_out)) => {
                HOLD_FD.store(conn.into_raw_fd(), Ordering::Release);
                arena::lock_for_fork(pages_out > 0);
                return;
            }
            Err(e) => sys::die(&format!(
                "dmem: cannot prepare fork() with the pager ({e}); stopping rather than \
                 giving the child memory that reads as zeros\n"
            )),
        }
    }
    arena::lock_for_fork(false);
}

fn close_hold() {
    let fd = HOLD_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        sys::close(fd);
    }
}

extern "C" fn parent() {
    arena::unlock_after_fork();
    close_hold();
}

extern "C" fn child() {
    arena::unlock_after_fork();
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
    if let Err(e) = start::adopt_after_fork(s) {
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
    // SAFETY: the three handlers are plain extern "C" functions that live
    // for the life of the process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        sys::write_stderr("dmem: pthread_atfork failed; fork() may be unsafe\n");
    }
}
