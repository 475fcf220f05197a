//! fork() under the shim. Registered with `pthread_atfork` once attached.
//!
//! The child of a plain fork() does not inherit the userfaultfd
//! registration: pages the pager had taken out of the parent would read as
//! zeros there. So before the fork the parent asks the pager to hold
//! evictions, brings every page of its managed blocks back by reading it,
//! and holds the arena lock (the child inherits consistent bookkeeping).
//! The child gets a complete copy-on-write image, drops its copies of the
//! parent's pager connections and uffd, and runs with its managed memory
//! as plain memory. The parent lets the pager evict again after the fork.
//! This is correct with or without UFFD_FEATURE_EVENT_FORK, at the price of
//! the parent's memory being local at the moment of the fork.

use std::os::fd::{IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use crate::{arena, start, sys};

/// The hold connection across the fork (-1: none).
static HOLD_FD: AtomicI32 = AtomicI32::new(-1);
/// This process is a forked child: the session belongs to an ancestor and
/// its managed memory is plain memory here.
static DETACHED: AtomicBool = AtomicBool::new(false);

extern "C" fn prepare() {
    let session = start::SESSION
        .get()
        .filter(|_| !DETACHED.load(Ordering::Acquire));
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
    close_hold();
    if DETACHED.swap(true, Ordering::AcqRel) {
        return; // a grandchild: the descriptors are closed already
    }
    if let Some(s) = start::SESSION.get() {
        let fds: [RawFd; 2] = s.inherited_fds();
        for fd in fds {
            sys::close(fd);
        }
    }
}

/// This process is a forked child whose managed memory is plain memory.
pub fn detached() -> bool {
    DETACHED.load(Ordering::Acquire)
}

pub fn install() {
    // SAFETY: the three handlers are plain extern "C" functions that live
    // for the life of the process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        sys::write_stderr("dmem: pthread_atfork failed; fork() may be unsafe\n");
    }
}
