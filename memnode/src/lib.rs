//! dmem memory node: the daemon that serves slabs of RAM to pagers, the wire
//! protocol both sides speak, and the client pagers use.

pub mod auth;
pub mod client;
pub mod metrics;
pub mod protocol;
pub mod rdma;
pub mod server;
pub mod shutdown;
pub mod size;
pub mod store;
pub mod sys;
mod uring;
#[cfg(feature = "rdma")]
pub mod verbs;

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering from poisoning: every critical section in this
/// crate leaves its state consistent before any step that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
