//! fork() under the shim. Registered with `pthread_atfork` once attached.
//!
//! The child of a plain fork() does not inherit the userfaultfd
//! registration: pages the pager had taken out of the parent would read as
//! zeros there. So before the fork the parent holds the arena lock (the
//! child inherits consistent bookkeeping); the child then drops its copies
//! of the parent's pager connection and uffd and runs with its managed
//! memory as plain memory.

use crate::arena;

extern "C" fn prepare() {
    arena::lock_for_fork();
}

extern "C" fn parent() {
    arena::unlock_after_fork();
}

extern "C" fn child() {
    arena::unlock_after_fork();
}

pub fn install() {
    // SAFETY: the three handlers are plain extern "C" functions that live
    // for the life of the process.
    let rc = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if rc != 0 {
        crate::sys::write_stderr("dmem: pthread_atfork failed; fork() may be unsafe\n");
    }
}
