//! End-to-end tests of the pager: real `dmem-pager`, `dmem-memnode`, `dmem`
//! and `dmem-workload` processes (from `cargo build --release --workspace`),
//! real unix and TCP sockets, no mocks. `dmem-workload` registers its own
//! userfaultfd arena with the pager the way libdmem.so does and verifies
//! every byte it reads (page contents depend on seed, page and version, and
//! are never zero once written), so wrong, stale or zeroed pages fail it.
//!
//! - `paging`: zero pages, sequential/random/scan/threads workloads several
//!   times the local limit, madvise/mremap/munmap, block sizes; the local
//!   limit as a bound on memory (pager figures and the app's own RSS).
//! - `apps`: several apps on one pager, pager death, stats and metrics.
//! - `memnodes`: network outages, a stalled node, a lost node, a full node,
//!   no node at all.
//! - `replicas`: pages on several nodes; nodes killed, replicas rebuilt.
//! - `at_rest`: what a memory node holds (`--encrypt`), and its storage going bad.
//! - `bad_input`: malformed registrations and bad flags.

mod apps;
mod at_rest;
mod bad_input;
mod memnodes;
mod paging;
mod replicas;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use dmem_tests::{app_stats, arena_rss_stopped, stat, Memnode, Pager};

pub const MIB: u64 = 1 << 20;

/// What a [`Sampler`] saw of one app while it ran.
#[derive(Debug, Default, Clone, Copy)]
pub struct AppSamples {
    pub samples: u64,
    /// Largest `resident_bytes + cache_bytes` (the pager's local pages).
    pub max_local: u64,
    pub max_resident: u64,
    /// Largest `peak_resident_bytes` the pager reported.
    pub max_reported_peak: u64,
    /// Largest resident set of the app's arena mapping (/proc/PID/smaps,
    /// read with the app stopped: see `arena_rss_stopped`): an independent
    /// measure, not the pager's own accounting.
    pub max_arena_rss: u64,
    pub max_remote_pages: u64,
}

/// Polls the pager's stats (and the apps' arena RSS) in the background
/// until stopped. Polling only makes the maxima more complete: a check on
/// them can fail only when the bound was really crossed.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(HashMap<u32, AppSamples>, usize)>>,
}

impl Sampler {
    /// Watches the apps `(pid, arena)`.
    pub fn start(pager: &Pager, apps: &[(u32, (u64, u64))]) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let socket: PathBuf = pager.socket().to_owned();
        let apps = apps.to_vec();
        let st = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut seen: HashMap<u32, AppSamples> = HashMap::new();
            let mut max_apps = 0;
            while !st.load(Ordering::Relaxed) {
                if let Ok(v) = dmem_pager::report::fetch_stats(&socket) {
                    max_apps = max_apps.max(v["apps"].as_array().map_or(0, Vec::len));
                    for &(pid, arena) in &apps {
                        let s = seen.entry(pid).or_default();
                        if let Some(a) = app_stats(&v, pid) {
                            let res = stat(a, &["resident_bytes"]);
                            let local = res + stat(a, &["cache_bytes"]);
                            s.samples += 1;
                            s.max_local = s.max_local.max(local);
                            s.max_resident = s.max_resident.max(res);
                            s.max_reported_peak =
                                s.max_reported_peak.max(stat(a, &["peak_resident_bytes"]));
                            s.max_remote_pages = s.max_remote_pages.max(stat(a, &["remote_pages"]));
                        }
                        if let Some(rss) = arena_rss_stopped(pid, arena) {
                            s.max_arena_rss = s.max_arena_rss.max(rss);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            (seen, max_apps)
        });
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; returns per-app maxima and the most apps seen at once.
    pub fn finish(mut self) -> (HashMap<u32, AppSamples>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("finished once")
            .join()
            .expect("sampler thread")
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// After every app has gone: no app listed, every cache frame and remote
/// slot given back (teardown runs just after the app's exit, hence the
/// polling).
#[track_caller]
pub fn assert_all_released(pager: &Pager) {
    dmem_tests::eventually(
        dmem_tests::HANG_GUARD,
        "the pager to release the apps",
        || {
            let v = pager.stats();
            (v["apps"].as_array().is_some_and(Vec::is_empty)).then_some(())
        },
    );
    let v = pager.stats();
    assert_eq!(
        stat(&v, &["pager", "cache_free_bytes"]),
        stat(&v, &["pager", "cache_bytes"]),
        "cache frames leaked after every app ended: {v:#}"
    );
    assert_eq!(
        stat(&v, &["pager", "remote_slots_used"]),
        0,
        "remote slots leaked after every app ended: {v:#}"
    );
}

/// `n` memory nodes of 256M each.
pub fn nodes(n: usize) -> Vec<Memnode> {
    (0..n)
        .map(|_| Memnode::start(&["--capacity", "256M"]))
        .collect()
}

/// A pager over `nodes` at 8M local, with `extra` flags. Small slabs: an
/// app's pages spread over several slabs (and replica groups), so every
/// node (every pair of nodes) holds some of them.
pub fn pager_over(nodes: &[Memnode], extra: &[&str]) -> Pager {
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr_string()).collect();
    let mut args: Vec<&str> = Vec::new();
    for a in &addrs {
        args.extend(["--memnode", a]);
    }
    args.extend(["--local-limit", "8M", "--slab", "4M"]);
    args.extend_from_slice(extra);
    Pager::start(&args)
}

/// The app finishes with every byte right, having faulted pages in from a
/// memory node; the pager is alive and has released everything.
#[track_caller]
pub fn finishes_having_paged(w: dmem_tests::RunningWorkload, pager: &mut Pager) {
    w.wait().assert_ok();
    pager.assert_alive();
    let v = pager.stats();
    assert!(stat(&v["total"], &["faults", "remote"]) > 0, "{v:#}");
    assert_all_released(pager);
}
