//! dmem pager and the `dmem` command-line tool.
//!
//! The pager serves userfaultfd faults of registered apps from a local cache
//! tier backed by memory nodes. Module map: `daemon` (unix socket,
//! registration), `session` (one app: page table, uffd reader), `fetch`
//! (remote faults and prefetch on the worker pool), `evict` (keeping an app
//! under its limit), `forksnap` (what a forked child takes of the pages out
//! of its parent), `inflight` (where victims in flight are now), `remote`
//! (transport trait, TCP transport), `placement` (slots in replica groups
//! on the memory nodes, rebuilds), `cache` (cache tier frames), `pages`
//! (dense page state), `prefetch` (stream detection), `run` (`dmem run`),
//! `seal` (pages encrypted at rest), `stats`, `contain` (a panic stops only the app it hit), `wire` (app <-> pager messages), `app` (the app side, used by
//! libdmem.so and tests), `sys` (OS calls).

pub mod app;
pub mod cache;
pub mod contain;
pub mod daemon;
pub mod evict;
pub mod fetch;
pub mod forksnap;
pub mod inflight;
pub mod pager;
pub mod pages;
pub mod ping;
pub mod placement;
pub mod prefetch;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod remote;
pub mod report;
pub mod run;
pub mod seal;
pub mod session;
pub mod stats;
pub mod sys;
pub mod transport;
pub mod wire;

use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, recovering from poisoning: state is kept consistent
/// before any step that could panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
