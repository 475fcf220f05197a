//! Counters and latency histograms, per app and in total, rendered as the
//! JSON of `dmem stats --json` and as Prometheus text for `--metrics`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Event counters of one app (or of all apps that have ended).
#[derive(Default)]
pub struct Counters {
    pub faults_zero: AtomicU64,
    pub faults_cache: AtomicU64,
    pub faults_remote: AtomicU64,
    /// Write faults on clean pages (dirty tracking).
    pub faults_wp: AtomicU64,
    /// Faults that found their page already on its way (no new work).
    pub faults_joined: AtomicU64,
    /// Faults held back while the app was over its limit.
    pub faults_throttled: AtomicU64,
    /// Faults of the app's agent thread, served with zeros (it faulted on
    /// a victim that was not in memory: freed by the app meanwhile).
    pub faults_agent: AtomicU64,
    /// Dirty victims whose copy was all zeros, dropped instead of kept.
    pub zero_victims: AtomicU64,
    /// Dirty victims sent unwrite-protected that the agent could not move
    /// (shared with a forked child) and left in place: write-protected and
    /// taken the older way next time.
    pub kept_victims: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub bytes_written_back: AtomicU64,
    /// Pages evicted from the app.
    pub evictions: AtomicU64,
    /// Clean pages dropped without any write-back.
    pub clean_drops: AtomicU64,
    pub prefetch_issued: AtomicU64,
    pub prefetch_hits: AtomicU64,
    pub prefetch_waste: AtomicU64,
    /// Times the app went over its local limit because no memory node had room.
    pub limit_exceeded: AtomicU64,
    pub peak_local_bytes: AtomicU64,
    /// Pages a forked child's session started with: present in it at the
    /// fork, or out of its parent then (`fork_out`).
    pub fork_adopted: AtomicU64,
    /// Of those, pages sharing the parent's remote copy (clean at the fork,
    /// or on a memory node then).
    pub fork_shared: AtomicU64,
    /// Of those, pages that were out of the parent at the fork (cache tier
    /// or memory node), taken from its fork snapshot.
    pub fork_out: AtomicU64,
}

impl Counters {
    pub fn add(&self, c: &AtomicU64, n: u64) {
        let _ = self;
        c.fetch_add(n, Relaxed);
    }

    pub fn peak(&self, bytes: u64) {
        self.peak_local_bytes.fetch_max(bytes, Relaxed);
    }

    fn fields(&self) -> [(&'static str, &AtomicU64); 21] {
        [
            ("faults_agent", &self.faults_agent),
            ("zero_victims", &self.zero_victims),
            ("kept_victims", &self.kept_victims),
            ("faults_zero", &self.faults_zero),
            ("faults_cache", &self.faults_cache),
            ("faults_remote", &self.faults_remote),
            ("faults_wp", &self.faults_wp),
            ("faults_joined", &self.faults_joined),
            ("faults_throttled", &self.faults_throttled),
            ("bytes_fetched", &self.bytes_fetched),
            ("bytes_written_back", &self.bytes_written_back),
            ("evictions", &self.evictions),
            ("clean_drops", &self.clean_drops),
            ("prefetch_issued", &self.prefetch_issued),
            ("prefetch_hits", &self.prefetch_hits),
            ("prefetch_waste", &self.prefetch_waste),
            ("limit_exceeded", &self.limit_exceeded),
            ("peak_local_bytes", &self.peak_local_bytes),
            ("fork_adopted", &self.fork_adopted),
            ("fork_shared", &self.fork_shared),
            ("fork_out", &self.fork_out),
        ]
    }

    /// Adds every counter of `other` into `self` (an app ending).
    pub fn absorb(&self, other: &Counters) {
        for ((_, a), (_, b)) in self.fields().iter().zip(other.fields().iter()) {
            if std::ptr::eq(*a, &self.peak_local_bytes) {
                a.fetch_max(b.load(Relaxed), Relaxed);
            } else {
                a.fetch_add(b.load(Relaxed), Relaxed);
            }
        }
    }
}

/// Latency histograms in microseconds.
pub struct Latencies {
    pub fault: Mutex<Histogram<u64>>,
    pub fetch: Mutex<Histogram<u64>>,
    pub evict: Mutex<Histogram<u64>>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            fault: Mutex::new(hist()),
            fetch: Mutex::new(hist()),
            evict: Mutex::new(hist()),
        }
    }
}

impl Latencies {
    pub fn record(h: &Mutex<Histogram<u64>>, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 60_000_000);
        let _ = crate::lock(h).record(us);
    }

    pub fn absorb(&self, other: &Latencies) {
        for (a, b) in [
            (&self.fault, &other.fault),
            (&self.fetch, &other.fetch),
            (&self.evict, &other.evict),
        ] {
            let b = crate::lock(b).clone();
            let _ = crate::lock(a).add(&b);
        }
    }
}

fn pct(h: &Mutex<Histogram<u64>>) -> Value {
    let h = crate::lock(h);
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
        "mean": h.mean(),
    })
}

/// The figures every JSON stats object carries (per app and total).
pub fn to_json(c: &Counters, l: &Latencies) -> Value {
    let g = |a: &AtomicU64| a.load(Relaxed);
    let mut v = json!({
        "faults": {
            "zero": g(&c.faults_zero),
            "cache": g(&c.faults_cache),
            "remote": g(&c.faults_remote),
            "write_protect": g(&c.faults_wp),
            "joined": g(&c.faults_joined),
            "throttled": g(&c.faults_throttled),
            "agent": g(&c.faults_agent),
        },
        "zero_victims": g(&c.zero_victims),
        "kept_victims": g(&c.kept_victims),
        "bytes_fetched": g(&c.bytes_fetched),
        "bytes_written_back": g(&c.bytes_written_back),
        "evictions": g(&c.evictions),
        "clean_drops": g(&c.clean_drops),
        "prefetch_issued": g(&c.prefetch_issued),
        "prefetch_hits": g(&c.prefetch_hits),
        "prefetch_waste": g(&c.prefetch_waste),
        "limit_exceeded": g(&c.limit_exceeded),
        "peak_resident_bytes": g(&c.peak_local_bytes),
        "fork": {
            "adopted_pages": g(&c.fork_adopted),
            "shared_pages": g(&c.fork_shared),
            "out_pages": g(&c.fork_out),
        },
        "fault_latency_us": pct(&l.fault),
        "fetch_latency_us": pct(&l.fetch),
        "evict_latency_us": pct(&l.evict),
    });
    v["faults"]["total"] = json!(g(&c.faults_zero) + g(&c.faults_cache) + g(&c.faults_remote));
    v
}

/// Prometheus text for the counters, labelled `scope`.
pub fn to_prometheus(out: &mut String, scope: &str, c: &Counters) {
    use std::fmt::Write;
    for (name, a) in c.fields() {
        let _ = writeln!(
            out,
            "dmem_pager_{name}{{scope=\"{scope}\"}} {}",
            a.load(Relaxed)
        );
    }
}
