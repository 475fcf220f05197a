//! The app side of `dmem-bench fault-latency`, run as a child process
//! (`dmem-bench fault-worker`, hidden): it attaches to a pager the way
//! libdmem.so does (`AppSession`), writes its working set, then answers
//! commands from the benchmark on stdin, one JSON line each on stdout:
//!
//! * `random N MAX GAP`: single random 4 KiB read faults, timed from this
//!   (the faulting) thread, until N faults served from the cache tier and N
//!   from a memory node were seen (at most MAX attempts), each after
//!   busy-waiting GAP µs. Pages present in the
//!   process (`mincore`) are skipped untouched; after every timed read the
//!   pager's stats tell which counter went up by one, i.e. where the fault
//!   was served from. Reads that did not fault, or that moved more than
//!   one counter, are discarded and counted.
//! * `scan`: one timed sequential read pass over the whole region.
//!
//! Every page holds a pattern derived from its index: a read that returns
//! anything else (zeros, a stale page) stops the benchmark.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use dmem_pager::app::{AppConfig, AppSession};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::Rng;
use crate::sys::{pause, read_word, resident, write_word, PAGE};

const WORDS: usize = PAGE / 8;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The pager's unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// Bytes of managed memory the worker writes and then reads.
    #[arg(long)]
    size: usize,
    /// Local limit asked of the pager, bytes.
    #[arg(long)]
    limit: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Sent once the working set is written.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct Ready {
    pub block_bytes: u64,
    pub local_limit_bytes: u64,
    pub setup_s: f64,
    /// Pages `mincore` says are present vs the pager's resident count: a
    /// cross-check that `mincore` sees evicted pages as absent.
    pub mincore_resident_pages: usize,
    pub pager_resident_pages: u64,
}

/// Pager counters of this app (deltas where noted).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub zero: u64,
    pub cache: u64,
    pub remote: u64,
    pub joined: u64,
    pub throttled: u64,
    pub prefetch_issued: u64,
    pub prefetch_hits: u64,
    pub bytes_fetched: u64,
    pub bytes_written_back: u64,
    pub evictions: u64,
    pub clean_drops: u64,
}

impl Counters {
    fn served(&self) -> u64 {
        self.zero + self.cache + self.remote
    }

    fn minus(&self, o: &Counters) -> Counters {
        Counters {
            zero: self.zero.wrapping_sub(o.zero),
            cache: self.cache.wrapping_sub(o.cache),
            remote: self.remote.wrapping_sub(o.remote),
            joined: self.joined.wrapping_sub(o.joined),
            throttled: self.throttled.wrapping_sub(o.throttled),
            prefetch_issued: self.prefetch_issued.wrapping_sub(o.prefetch_issued),
            prefetch_hits: self.prefetch_hits.wrapping_sub(o.prefetch_hits),
            bytes_fetched: self.bytes_fetched.wrapping_sub(o.bytes_fetched),
            bytes_written_back: self.bytes_written_back.wrapping_sub(o.bytes_written_back),
            evictions: self.evictions.wrapping_sub(o.evictions),
            clean_drops: self.clean_drops.wrapping_sub(o.clean_drops),
        }
    }
}

/// Answer to `random`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub(crate) struct RandomResult {
    /// Fault latencies in ns, by where the pager served them from.
    pub cache_ns: Vec<u64>,
    pub remote_ns: Vec<u64>,
    pub zero_ns: Vec<u64>,
    /// Random picks skipped because the page was present.
    pub skipped_resident: u64,
    /// Timed reads after which no fault counter moved (page came back
    /// between `mincore` and the read): discarded.
    pub no_fault: u64,
    /// Timed reads after which counters of different sources moved:
    /// discarded.
    pub ambiguous: u64,
    /// Which counters moved, for those.
    pub ambiguous_patterns: std::collections::BTreeMap<String, u64>,
    /// Timed reads served more than once from the same source (kept).
    pub repeated: u64,
    /// Classification needed a second stats query (the counter moved after
    /// the faulting thread was woken).
    pub late_counter: u64,
    pub attempts: u64,
    /// Pager counters over the whole command.
    pub delta: Counters,
    /// Median cost of one stats query, µs (untimed overhead).
    pub stats_query_p50_us: f64,
    /// The pager's own remote-fetch latency for this app so far, µs.
    pub pager_fetch_p50_us: f64,
    pub pager_fetch_p99_us: f64,
    /// The pager's eviction-batch latency for this app so far, µs.
    pub pager_evict_p50_us: f64,
    pub pager_evict_p99_us: f64,
    /// The cache and remote latencies again, only of samples during which
    /// (and right after which) no eviction batch completed: with the
    /// figures above, they show how much of the tail the evictor causes.
    pub cache_quiet_ns: Vec<u64>,
    pub remote_quiet_ns: Vec<u64>,
}

/// Answer to `scan`.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub(crate) struct ScanResult {
    pub bytes: u64,
    pub seconds: f64,
    pub gbps: f64,
    pub delta: Counters,
}

/// Word `w` of page `p`: never zero, so zero-filled pages never pass.
fn word(seed: u64, p: usize, w: usize) -> u64 {
    let mut x = seed ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((w as u64) << 52);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x | 1
}

struct Worker {
    socket: PathBuf,
    base: u64,
    pages: usize,
    seed: u64,
    pid: u64,
}

impl Worker {
    fn addr(&self, p: usize, w: usize) -> u64 {
        self.base + (p * PAGE + w * 8) as u64
    }

    fn fill(&self) {
        for p in 0..self.pages {
            for w in 0..WORDS {
                write_word(self.addr(p, w), word(self.seed, p, w));
            }
        }
    }

    fn check_page(&self, p: usize) -> Result<(), String> {
        for w in 0..WORDS {
            let got = read_word(self.addr(p, w));
            let want = word(self.seed, p, w);
            if got != want {
                return Err(wrong(p, w, got, want));
            }
        }
        Ok(())
    }

    /// This app's entry in the pager's stats.
    fn counters(&self) -> Result<(Counters, Value), String> {
        let v = dmem_pager::report::fetch_stats(&self.socket)
            .map_err(|e| format!("pager stats: {e}"))?;
        let app = v["apps"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["pid"].as_u64() == Some(self.pid)))
            .cloned()
            .ok_or("this worker is not among the pager's apps")?;
        let g = |x: &Value| x.as_u64().unwrap_or(0);
        let f = &app["faults"];
        let c = Counters {
            zero: g(&f["zero"]),
            cache: g(&f["cache"]),
            remote: g(&f["remote"]),
            joined: g(&f["joined"]),
            throttled: g(&f["throttled"]),
            prefetch_issued: g(&app["prefetch_issued"]),
            prefetch_hits: g(&app["prefetch_hits"]),
            bytes_fetched: g(&app["bytes_fetched"]),
            bytes_written_back: g(&app["bytes_written_back"]),
            evictions: g(&app["evictions"]),
            clean_drops: g(&app["clean_drops"]),
        };
        Ok((c, app))
    }

    fn random(
        &self,
        want: usize,
        max_attempts: u64,
        gap: Duration,
        rng: &mut Rng,
    ) -> Result<RandomResult, String> {
        let mut r = RandomResult::default();
        // (source: 0 cache, 1 remote; ns; evictions completed in the window)
        let mut kept: Vec<(u8, u64, u64)> = Vec::new();
        let mut query_ns = Vec::new();
        let (start, _) = self.counters()?;
        let mut last = start;
        while (r.cache_ns.len() < want || r.remote_ns.len() < want) && r.attempts < max_attempts {
            r.attempts += 1;
            let p = rng.below(self.pages as u64) as usize;
            let addr = self.addr(p, 0);
            if resident(addr) {
                r.skipped_resident += 1;
                continue;
            }
            pause(gap);
            let t = Instant::now();
            let got = read_word(addr);
            let ns = t.elapsed().as_nanos() as u64;
            if got != word(self.seed, p, 0) {
                return Err(wrong(p, 0, got, word(self.seed, p, 0)));
            }
            self.check_page(p)?;
            let tq = Instant::now();
            let (mut now, _) = self.counters()?;
            query_ns.push(tq.elapsed().as_nanos() as u64);
            if now.served() == last.served() {
                // The cache path counts after waking the faulting thread.
                std::thread::sleep(Duration::from_micros(200));
                now = self.counters()?.0;
                if now.served() != last.served() {
                    r.late_counter += 1;
                }
            }
            let d = now.minus(&last);
            last = now;
            // More than one count from one source: the pager served the
            // fault, then had to serve it again (its copy was refused, e.g.
            // EAGAIN while an eviction's REMOVE event was pending). Still one
            // fault of this thread, from that source: kept, and counted.
            if d.served() > 1 && [d.cache, d.remote, d.zero].contains(&d.served()) {
                r.repeated += 1;
            }
            match (d.cache > 0, d.remote > 0, d.zero > 0) {
                (true, false, false) => {
                    r.cache_ns.push(ns);
                    kept.push((0, ns, d.evictions));
                }
                (false, true, false) => {
                    r.remote_ns.push(ns);
                    kept.push((1, ns, d.evictions));
                }
                (false, false, true) => r.zero_ns.push(ns),
                (false, false, false) => r.no_fault += 1,
                _ => {
                    r.ambiguous += 1;
                    *r.ambiguous_patterns
                        .entry(format!(
                            "cache{}+remote{}+zero{}",
                            d.cache, d.remote, d.zero
                        ))
                        .or_default() += 1;
                }
            }
        }
        r.delta = last.minus(&start);
        let (_, app) = self.counters()?;
        let fl = &app["fetch_latency_us"];
        r.pager_fetch_p50_us = fl["p50"].as_f64().unwrap_or(f64::NAN);
        r.pager_fetch_p99_us = fl["p99"].as_f64().unwrap_or(f64::NAN);
        let ev = &app["evict_latency_us"];
        r.pager_evict_p50_us = ev["p50"].as_f64().unwrap_or(f64::NAN);
        r.pager_evict_p99_us = ev["p99"].as_f64().unwrap_or(f64::NAN);
        // An eviction overlapping a sample may complete only in the next
        // window: quiet means nothing completed in this one or the next.
        for (i, &(src, ns, ev)) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |k| k.2);
            if ev == 0 && next == 0 {
                if src == 0 {
                    r.cache_quiet_ns.push(ns);
                } else {
                    r.remote_quiet_ns.push(ns);
                }
            }
        }
        query_ns.sort_unstable();
        r.stats_query_p50_us = query_ns
            .get(query_ns.len() / 2)
            .map_or(0.0, |&n| n as f64 / 1e3);
        Ok(r)
    }

    fn scan(&self) -> Result<ScanResult, String> {
        let (before, _) = self.counters()?;
        let t = Instant::now();
        let mut sum = 0u64;
        for p in 0..self.pages {
            let first = read_word(self.addr(p, 0));
            if first != word(self.seed, p, 0) {
                return Err(wrong(p, 0, first, word(self.seed, p, 0)));
            }
            for w in 1..WORDS {
                sum = sum.wrapping_add(read_word(self.addr(p, w)));
            }
        }
        let seconds = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        let (after, _) = self.counters()?;
        let bytes = (self.pages * PAGE) as u64;
        Ok(ScanResult {
            bytes,
            seconds,
            gbps: bytes as f64 / seconds / 1e9,
            delta: after.minus(&before),
        })
    }
}

fn wrong(p: usize, w: usize, got: u64, want: u64) -> String {
    format!(
        "WRONG DATA at page {p} word {w}: got {got:#018x}, want {want:#018x}{}",
        if got == 0 { " (zeros)" } else { "" }
    )
}

fn reply<T: Serialize>(v: &T) -> Result<(), String> {
    let line = serde_json::to_string(v).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| format!("stdout: {e}"))
}

pub fn run(a: Args) -> Result<(), String> {
    let t0 = Instant::now();
    let pages = a.size.div_ceil(PAGE);
    let session = AppSession::attach(&AppConfig {
        socket: a.socket.clone(),
        arena_len: pages * PAGE,
        local_limit: a.limit,
        on_evicted: None,
    })
    .map_err(|e| format!("attach to the pager: {e}"))?;
    let w = Worker {
        socket: a.socket,
        base: session.arena_ptr() as u64,
        pages,
        seed: a.seed,
        pid: std::process::id() as u64,
    };
    w.fill();
    // Give the evictor a moment to settle below the limit.
    std::thread::sleep(Duration::from_millis(100));
    let mincore_resident = (0..pages).filter(|&p| resident(w.addr(p, 0))).count();
    let (_, app) = w.counters()?;
    reply(&Ready {
        block_bytes: session.block() as u64,
        local_limit_bytes: session.local_limit(),
        setup_s: t0.elapsed().as_secs_f64(),
        mincore_resident_pages: mincore_resident,
        pager_resident_pages: app["resident_bytes"].as_u64().unwrap_or(0) / PAGE as u64,
    })?;
    let mut rng = Rng::new(a.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let mut it = line.split_whitespace();
        match it.next() {
            Some("random") => {
                let n = it.next().and_then(|x| x.parse().ok()).unwrap_or(1000);
                let max = it.next().and_then(|x| x.parse().ok()).unwrap_or(u64::MAX);
                let gap = it.next().and_then(|x| x.parse().ok()).unwrap_or(0);
                reply(&w.random(n, max, Duration::from_micros(gap), &mut rng)?)?;
            }
            Some("scan") => reply(&w.scan()?)?,
            Some(other) => return Err(format!("unknown command {other:?}")),
            None => {}
        }
    }
    Ok(())
}
