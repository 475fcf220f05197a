//! `dmem-bench fault-latency`: what a page fault under dmem costs, against
//! floors measured in the same run.
//!
//! One run starts its own `dmem-memnode` (loopback) and, per block size
//! measured, two `dmem-pager`s: one for random faults (`--prefetch-max 0`)
//! and one with default flags for the sequential scan. The app side runs in
//! child processes (`dmem-bench fault-worker`, see `fault_worker.rs`)
//! attached the way libdmem.so attaches. Rounds interleave every contender,
//! in alternating order, so machine noise hits them alike:
//!
//! * floor 1, bare uffd: in-process minimal handler, one `UFFDIO_COPY` per
//!   fault (`uffd_floor.rs`);
//! * floor 2, bare TCP: 16 B request / 4 KiB reply ping-pong over loopback
//!   (the `memnode` benchmark's floor);
//! * dmem random 4 KiB read faults, classified by the pager's own counters
//!   as served from the cache tier or from the memory node;
//! * dmem sequential read pass over a region 4x the local limit: GB/s.
//!
//! Telling where a dmem fault was served from takes a pager stats query
//! after every timed fault (a few hundred µs, untimed). So that every
//! contender starts from the same state, each timed fault or ping, floors
//! included, follows the same busy-wait (`--gap-us`), made of `sched_yield`
//! calls so that what the query left running in the pager (its thread
//! exiting) finishes in the pause rather than at the head of the next timed
//! fault, where a plain busy-wait on one pinned CPU left it until
//! 2026-12-03 (cache-tier p50 ~28-32 µs then against ~24-26 µs with yields,
//! the floors unchanged). On a VM the pause matters:
//! a thread woken on a vCPU that has been idle for a while costs tens of µs
//! more than one woken on a busy vCPU, and which happens shifts from round
//! to round. `--pin-cpu N` puts everything on one CPU, where every hand-off
//! is a plain context switch: much steadier figures, the better choice for
//! comparing two pager versions (though a pager thread's work after waking
//! the app then delays the app, which it would not on separate cores).
//!
//! Headline figures are medians over rounds of per-round figures; ranges
//! (min..max over rounds), pooled percentiles, the pager's own fetch and
//! eviction latencies, and the tail of samples with no eviction batch
//! nearby are in the JSON. Targets are reported, never asserted.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use dmem_memnode::size::{format_size, parse_size};
use dmem_pager::transport::{rdma_unavailable_here, TransportMode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::daemon::Daemon;
use crate::fault_worker::{Counters, RandomResult, Ready, ScanResult};
use crate::memnode::{start_node, Floors};
use crate::stats::{latency_histogram, median, quantile_us, Rng};
use crate::uffd_floor::{HandlerAt, UffdFloor};

/// cache p50 <= 1.3 x bare uffd p50.
const CACHE_VS_UFFD_MAX: f64 = 1.3;
/// remote p50 <= bare uffd p50 + bare TCP p50 + 5 µs.
const REMOTE_BUDGET_EXTRA_US: f64 = 5.0;
/// p99 <= 3 x p50, for cache and remote faults.
const P99_VS_P50_MAX: f64 = 3.0;
/// Sequential scan at 25% local >= 1 GB/s.
const SEQ_GBPS_MIN: f64 = 1.0;
/// How long a worker may take to answer one command.
const WORKER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write all figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Fewer rounds and samples, smaller scan: a smoke run.
    #[arg(long)]
    quick: bool,
    /// The dmem-pager binary (default: next to this executable).
    #[arg(long)]
    pager_bin: Option<PathBuf>,
    /// The dmem-memnode binary (default: next to this executable).
    #[arg(long)]
    memnode_bin: Option<PathBuf>,
    /// Pager block sizes (--block) to measure, comma-separated, e.g.
    /// 4K,16K,64K: a sweep reporting random-fault and scan figures per
    /// block. The headline figures are 4K's (else the first block's).
    #[arg(long, value_delimiter = ',', default_value = "4K")]
    blocks: Vec<String>,
    /// Rounds of interleaved measurements (default 5, quick 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Floor samples per round (default 10000, quick 2000).
    #[arg(long)]
    samples: Option<usize>,
    /// dmem faults wanted per source (cache, remote) per round (default
    /// 2000, quick 300).
    #[arg(long)]
    fault_samples: Option<usize>,
    /// Local limit of the random-fault app.
    #[arg(long, value_parser = parse_size, default_value = "32M")]
    limit: u64,
    /// Working set of the random-fault app (default 1.5 x --limit).
    #[arg(long, value_parser = parse_size)]
    working_set: Option<u64>,
    /// Region of the sequential scan; the limit is a quarter of it
    /// (default 256M, quick 128M).
    #[arg(long, value_parser = parse_size)]
    seq_size: Option<u64>,
    /// The pagers' cache tier (--cache).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    cache: u64,
    /// Busy-wait before every timed fault or ping, floors included, in µs,
    /// calling `sched_yield`. The dmem faults need a pager stats query
    /// between samples to tell where each was served from; yielding lets the
    /// pager finish the query's work while the CPU stays awake, and the
    /// floors get the same pause so that every contender starts from the
    /// same state.
    #[arg(long, default_value_t = 200)]
    gap_us: u64,
    /// Pin the benchmark and every process it starts (memory node, pagers,
    /// app workers) to this one CPU: every hand-off between threads is then
    /// a plain context switch, never a wake-up of another (possibly idle)
    /// vCPU, which makes the figures far steadier on a VM.
    #[arg(long)]
    pin_cpu: Option<usize>,
    /// How the pagers reach the memory node (dmem-pager --transport). With
    /// `rdma` (needs the rdma build and a device) the remote figures are
    /// the RDMA column; `scripts/bench-fault.sh` adds that run by itself
    /// where a device exists.
    #[arg(long, value_enum, default_value_t = TransportMode::Tcp)]
    transport: TransportMode,
    /// Run the pagers with --encrypt (pages sealed at rest): compare the
    /// remote figures with a run without it.
    #[arg(long)]
    encrypt: bool,
}

/// One block size's figures in one round.
#[derive(Serialize, Clone, Debug, Default)]
struct BlockRound {
    cache_p50_us: f64,
    cache_p99_us: f64,
    cache_samples: usize,
    remote_p50_us: f64,
    remote_p99_us: f64,
    remote_samples: usize,
    zero_samples: usize,
    skipped_resident: u64,
    discarded_no_fault: u64,
    discarded_ambiguous: u64,
    ambiguous_patterns: BTreeMap<String, u64>,
    /// Faults the pager served more than once (kept in their source).
    repeated: u64,
    late_counter: u64,
    throttled: u64,
    joined: u64,
    random_prefetch_issued: u64,
    stats_query_p50_us: f64,
    /// The pager's own remote-fetch latency (all fetches so far).
    pager_fetch_p50_us: f64,
    pager_fetch_p99_us: f64,
    /// The pager's eviction-batch latency (all batches so far).
    pager_evict_p50_us: f64,
    pager_evict_p99_us: f64,
    seq_scan_gbps: f64,
    seq_scan_s: f64,
    seq_scan: Counters,
}

#[derive(Serialize, Clone, Debug, Default)]
struct Round {
    bare_uffd_p50_us: f64,
    bare_uffd_p99_us: f64,
    /// The same minimal handler in another process (not a target floor).
    bare_uffd_xproc_p50_us: f64,
    bare_uffd_xproc_p99_us: f64,
    bare_tcp_p50_us: f64,
    bare_tcp_p99_us: f64,
    blocks: BTreeMap<u64, BlockRound>,
}

/// Medians over rounds for one block size.
#[derive(Serialize, Clone, Debug)]
struct BlockSummary {
    block_bytes: u64,
    cache_p50_us: f64,
    cache_p99_us: f64,
    remote_p50_us: f64,
    remote_p99_us: f64,
    seq_scan_gbps: f64,
    /// min, max over rounds.
    cache_p50_us_range: [f64; 2],
    remote_p50_us_range: [f64; 2],
    seq_scan_gbps_range: [f64; 2],
    /// Percentiles over all rounds' samples together.
    cache_pooled_p50_us: f64,
    cache_pooled_p99_us: f64,
    remote_pooled_p50_us: f64,
    remote_pooled_p99_us: f64,
    /// [quantile, µs] points of the pooled samples (for CDF plots).
    cache_cdf_us: Vec<[f64; 2]>,
    remote_cdf_us: Vec<[f64; 2]>,
    cache_samples: usize,
    remote_samples: usize,
    zero_samples: usize,
    discarded_no_fault: u64,
    discarded_ambiguous: u64,
    repeated: u64,
    throttled: u64,
    joined: u64,
    random_prefetch_issued: u64,
    /// The pager's own remote-fetch latency, µs (whole run).
    pager_fetch_p50_us: f64,
    pager_fetch_p99_us: f64,
    /// The pager's eviction-batch latency, µs (whole run).
    pager_evict_p50_us: f64,
    pager_evict_p99_us: f64,
    /// Pooled percentiles of the samples during and right after which no
    /// eviction batch completed: the tail without the evictor.
    cache_quiet_p50_us: f64,
    cache_quiet_p99_us: f64,
    cache_quiet_samples: usize,
    remote_quiet_p50_us: f64,
    remote_quiet_p99_us: f64,
    remote_quiet_samples: usize,
    /// The untimed first pass after writing (dirty pages written back).
    seq_first_pass_gbps: f64,
    /// Pager view of one timed pass (median round).
    seq_pass_remote_faults: u64,
    seq_pass_cache_faults: u64,
    seq_pass_prefetch_issued: u64,
    seq_pass_prefetch_hits: u64,
    seq_pass_bytes_fetched: u64,
    random_ready: Ready,
    seq_ready: Ready,
}

#[derive(Serialize, Debug)]
struct Host {
    cpus: usize,
    kernel: String,
}

#[derive(Serialize, Debug)]
struct Report {
    bench: &'static str,
    host: Host,
    quick: bool,
    rounds: usize,
    floor_samples_per_round: usize,
    /// Busy-wait before every timed operation, µs.
    gap_us: u64,
    /// The CPU everything was pinned to (--pin-cpu), if any.
    pinned_cpu: Option<usize>,
    fault_samples_per_source_per_round: usize,
    random_working_set_bytes: u64,
    random_local_limit_bytes: u64,
    random_cache_quota_bytes: u64,
    seq_region_bytes: u64,
    seq_local_limit_bytes: u64,
    pager_cache_bytes: u64,
    /// Block size of the headline figures.
    block_bytes: u64,
    /// Transport of the pagers to the memory node (`tcp` or `rdma`).
    transport: &'static str,
    /// Whether an RDMA column can be measured here: "available", or why not.
    rdma_status: String,
    /// The pagers ran with --encrypt.
    encrypt: bool,
    /// CPU cost of sealing a 4 KiB page (--encrypt, on write-back) and of
    /// opening it (on fetch), medians measured in this process.
    seal_us_per_page: f64,
    open_us_per_page: f64,
    bare_uffd_p50_us: f64,
    bare_uffd_p99_us: f64,
    bare_uffd_p50_us_range: [f64; 2],
    /// The bare handler in another process, as dmem's pager is: the share
    /// of the latency that is the architecture's (reported, no target).
    bare_uffd_xproc_p50_us: f64,
    bare_uffd_xproc_p99_us: f64,
    bare_uffd_xproc_p50_us_range: [f64; 2],
    /// cache_p50_us / bare_uffd_xproc_p50_us.
    cache_vs_uffd_xproc: f64,
    bare_tcp_p50_us: f64,
    bare_tcp_p99_us: f64,
    bare_tcp_p50_us_range: [f64; 2],
    cache_p50_us: f64,
    cache_p99_us: f64,
    remote_p50_us: f64,
    remote_p99_us: f64,
    seq_scan_gbps: f64,
    /// cache_p50_us / bare_uffd_p50_us.
    cache_vs_uffd: f64,
    /// The same ratio within each round, then the median.
    cache_vs_uffd_round_median: f64,
    /// bare_uffd_p50_us + bare_tcp_p50_us + 5.
    remote_budget_us: f64,
    /// remote_p50_us / remote_budget_us.
    remote_vs_budget: f64,
    cache_p99_vs_p50: f64,
    remote_p99_vs_p50: f64,
    cache_vs_uffd_target_max: f64,
    p99_vs_p50_target_max: f64,
    seq_scan_gbps_target_min: f64,
    cache_p50_met: bool,
    remote_p50_met: bool,
    cache_p99_met: bool,
    remote_p99_met: bool,
    seq_scan_met: bool,
    blocks: Vec<BlockSummary>,
    per_round: Vec<Round>,
}

/// A `dmem-bench fault-worker` child: commands on stdin, JSON lines back.
struct WorkerProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<std::io::Result<String>>,
    what: String,
}

impl WorkerProc {
    fn start(
        socket: &str,
        size: u64,
        limit: u64,
        seed: u64,
        what: String,
    ) -> Result<(WorkerProc, Ready), String> {
        let exe =
            std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
        let mut child = Command::new(exe)
            .arg("fault-worker")
            .args(["--socket", socket])
            .args(["--size", &size.to_string(), "--limit", &limit.to_string()])
            .args(["--seed", &seed.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start the {what} worker: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines() {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut w = WorkerProc {
            child,
            stdin,
            lines: rx,
            what,
        };
        let ready = w.answer()?;
        Ok((w, ready))
    }

    fn answer<T: DeserializeOwned>(&mut self) -> Result<T, String> {
        match self.lines.recv_timeout(WORKER_TIMEOUT) {
            Ok(Ok(l)) => serde_json::from_str(&l)
                .map_err(|e| format!("{} worker sent {l:?}: {e}", self.what)),
            Ok(Err(e)) => Err(format!("{} worker: {e}", self.what)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                "{} worker did not answer within {} s (pager stuck?)",
                self.what,
                WORKER_TIMEOUT.as_secs()
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let st = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!(
                    "{} worker exited ({st}); see its message above",
                    self.what
                ))
            }
        }
    }

    fn ask<T: DeserializeOwned>(&mut self, cmd: &str) -> Result<T, String> {
        let stdin = self.stdin.as_mut().ok_or("worker stdin closed")?;
        writeln!(stdin, "{cmd}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{} worker: {e}", self.what))?;
        self.answer()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        drop(self.stdin.take()); // EOF: the worker exits by itself
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything measured for one block size. Field order is drop order:
/// workers leave before their pagers.
struct BlockRig {
    block: u64,
    rand: WorkerProc,
    seq: WorkerProc,
    rand_ready: Ready,
    seq_ready: Ready,
    seq_first_pass_gbps: f64,
    rand_pager: Daemon,
    seq_pager: Daemon,
    cache_ns: Vec<u64>,
    remote_ns: Vec<u64>,
    cache_quiet_ns: Vec<u64>,
    remote_quiet_ns: Vec<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Uffd,
    UffdXproc,
    Tcp,
    Random(usize),
    Seq(usize),
}

struct Plan {
    rounds: usize,
    samples: usize,
    fault_samples: usize,
    ws: u64,
    limit: u64,
    seq_size: u64,
    cache: u64,
    gap: Duration,
}

fn start_pager(
    bin: &Path,
    socket: &Path,
    memnode: &str,
    limit: u64,
    block: u64,
    prefetch: bool,
    a: &Args,
) -> Result<Daemon, String> {
    let mut cmd = Command::new(bin);
    let cache = a.cache;
    let transport = match a.transport {
        TransportMode::Rdma => "rdma",
        _ => "tcp",
    };
    cmd.args(["--transport", transport])
        .arg("--socket")
        .arg(socket)
        .args(["--memnode", memnode])
        .args(["--local-limit", &limit.to_string()])
        .args(["--cache", &cache.to_string()])
        .args(["--block", &block.to_string()])
        .env("RUST_LOG", "warn");
    if !prefetch {
        cmd.args(["--prefetch-max", "0"]);
    }
    if a.encrypt {
        cmd.arg("--encrypt");
    }
    Daemon::start(
        cmd,
        &format!("dmem-pager ({})", bin.display()),
        "dmem-pager listening on ",
    )
}

pub fn run(a: Args) -> Result<(), String> {
    if let Some(cpu) = a.pin_cpu {
        // Before any thread or child exists: all of them inherit it.
        crate::sys::pin_to_cpu(cpu)?;
    }
    let pager_bin = crate::sibling_binary("dmem-pager", a.pager_bin.clone())?;
    let memnode_bin = crate::sibling_binary("dmem-memnode", a.memnode_bin.clone())?;
    let mut blocks = Vec::new();
    for b in &a.blocks {
        let v = parse_size(b).map_err(|e| format!("--blocks {b}: {e}"))?;
        if !v.is_power_of_two() || !(4096..=2 << 20).contains(&v) {
            return Err(format!("--blocks: {b} is not a power of two from 4K to 2M"));
        }
        if !blocks.contains(&v) {
            blocks.push(v);
        }
    }
    if blocks.is_empty() {
        return Err("--blocks: nothing to measure".into());
    }
    let plan = Plan {
        rounds: a.rounds.unwrap_or(if a.quick { 3 } else { 5 }).max(1),
        samples: a
            .samples
            .unwrap_or(if a.quick { 2_000 } else { 10_000 })
            .max(1),
        fault_samples: a
            .fault_samples
            .unwrap_or(if a.quick { 300 } else { 2_000 })
            .max(1),
        ws: a.working_set.unwrap_or(a.limit / 2 * 3),
        limit: a.limit,
        seq_size: a
            .seq_size
            .unwrap_or(if a.quick { 128 << 20 } else { 256 << 20 }),
        cache: a.cache,
        gap: Duration::from_micros(a.gap_us),
    };
    if plan.limit < (4 << 20) || plan.seq_size < (16 << 20) {
        return Err("--limit must be at least 4M and --seq-size at least 16M".into());
    }
    let dir = std::env::temp_dir().join(format!("dmem-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let r = measure(&a, &plan, &blocks, &pager_bin, &memnode_bin, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn measure(
    a: &Args,
    plan: &Plan,
    blocks: &[u64],
    pager_bin: &Path,
    memnode_bin: &Path,
    dir: &Path,
) -> Result<(), String> {
    let capacity = (2u64 << 30) + blocks.len() as u64 * 2 * (plan.ws + plan.seq_size);
    let mut node = start_node(memnode_bin, "threads", &capacity.to_string())?;
    eprintln!(
        "dmem-bench fault-latency: memnode {}, blocks {}; random: working set {} at limit {}; \
         scan: {} at limit {}; {} rounds",
        node.addr,
        blocks
            .iter()
            .map(|&b| short_size(b))
            .collect::<Vec<_>>()
            .join(","),
        format_size(plan.ws),
        format_size(plan.limit),
        format_size(plan.seq_size),
        format_size(plan.seq_size / 4),
        plan.rounds
    );
    let mut rigs = Vec::new();
    for (i, &block) in blocks.iter().enumerate() {
        let label = short_size(block);
        let rs = dir.join(format!("random-{i}.sock"));
        let ss = dir.join(format!("seq-{i}.sock"));
        let rp = start_pager(pager_bin, &rs, &node.addr, plan.limit, block, false, a)?;
        let sp = start_pager(
            pager_bin,
            &ss,
            &node.addr,
            plan.seq_size / 4,
            block,
            true,
            a,
        )?;
        let (mut rand, rand_ready) = WorkerProc::start(
            &rp.addr,
            plan.ws,
            plan.limit,
            0x1000 + i as u64,
            format!("random (block {label})"),
        )?;
        let (mut seq, seq_ready) = WorkerProc::start(
            &sp.addr,
            plan.seq_size,
            plan.seq_size / 4,
            0x2000 + i as u64,
            format!("scan (block {label})"),
        )?;
        // Warm-ups: reach the steady state (clean pages, full cache share).
        let _: RandomResult = rand.ask(&format!("random 200 50000 {}", a.gap_us))?;
        let first: ScanResult = seq.ask("scan")?;
        eprintln!(
            "  block {label}: random app ready in {:.1} s (mincore {} vs pager {} resident pages), \
             scan app in {:.1} s, first pass {:.3} GB/s",
            rand_ready.setup_s,
            rand_ready.mincore_resident_pages,
            rand_ready.pager_resident_pages,
            seq_ready.setup_s,
            first.gbps
        );
        rigs.push(BlockRig {
            block,
            rand,
            seq,
            rand_ready,
            seq_ready,
            seq_first_pass_gbps: first.gbps,
            rand_pager: rp,
            seq_pager: sp,
            cache_ns: Vec::new(),
            remote_ns: Vec::new(),
            cache_quiet_ns: Vec::new(),
            remote_quiet_ns: Vec::new(),
        });
    }
    let per_round = match run_rounds(a, plan, &mut rigs) {
        Ok(r) => r,
        Err(e) => return Err(e + &daemon_deaths(&mut node, &mut rigs)),
    };

    let med =
        |f: &dyn Fn(&Round) -> f64| median_finite(&per_round.iter().map(f).collect::<Vec<_>>());
    let range = |f: &dyn Fn(&Round) -> f64| min_max(&per_round.iter().map(f).collect::<Vec<_>>());
    let mut summaries = Vec::new();
    for rig in &rigs {
        let k = rig.block;
        let get = |f: &dyn Fn(&BlockRound) -> f64| med(&|r| f(&r.blocks[&k]));
        let rng_of = |f: &dyn Fn(&BlockRound) -> f64| range(&|r| f(&r.blocks[&k]));
        let sum = |f: &dyn Fn(&BlockRound) -> u64| {
            per_round.iter().map(|r| f(&r.blocks[&k])).sum::<u64>()
        };
        let (cp50, cp99) = pct(&rig.cache_ns);
        let (rp50, rp99) = pct(&rig.remote_ns);
        let (cq50, cq99) = pct(&rig.cache_quiet_ns);
        let (rq50, rq99) = pct(&rig.remote_quiet_ns);
        let last = |f: &dyn Fn(&BlockRound) -> f64| {
            per_round.last().map_or(f64::NAN, |r| f(&r.blocks[&k]))
        };
        // The pass whose speed is the median one (lower middle for even counts).
        let mut by_speed: Vec<&BlockRound> = per_round.iter().map(|r| &r.blocks[&k]).collect();
        by_speed.sort_by(|x, y| x.seq_scan_gbps.total_cmp(&y.seq_scan_gbps));
        let mid = by_speed[(by_speed.len() - 1) / 2].seq_scan;
        summaries.push(BlockSummary {
            block_bytes: k,
            cache_p50_us: get(&|b| b.cache_p50_us),
            cache_p99_us: get(&|b| b.cache_p99_us),
            remote_p50_us: get(&|b| b.remote_p50_us),
            remote_p99_us: get(&|b| b.remote_p99_us),
            seq_scan_gbps: get(&|b| b.seq_scan_gbps),
            cache_p50_us_range: rng_of(&|b| b.cache_p50_us),
            remote_p50_us_range: rng_of(&|b| b.remote_p50_us),
            seq_scan_gbps_range: rng_of(&|b| b.seq_scan_gbps),
            cache_pooled_p50_us: cp50,
            cache_pooled_p99_us: cp99,
            remote_pooled_p50_us: rp50,
            remote_pooled_p99_us: rp99,
            cache_cdf_us: cdf(&rig.cache_ns),
            remote_cdf_us: cdf(&rig.remote_ns),
            cache_samples: rig.cache_ns.len(),
            remote_samples: rig.remote_ns.len(),
            zero_samples: sum(&|b| b.zero_samples as u64) as usize,
            discarded_no_fault: sum(&|b| b.discarded_no_fault),
            discarded_ambiguous: sum(&|b| b.discarded_ambiguous),
            repeated: sum(&|b| b.repeated),
            throttled: sum(&|b| b.throttled),
            joined: sum(&|b| b.joined),
            random_prefetch_issued: sum(&|b| b.random_prefetch_issued),
            pager_fetch_p50_us: last(&|b| b.pager_fetch_p50_us),
            pager_fetch_p99_us: last(&|b| b.pager_fetch_p99_us),
            pager_evict_p50_us: last(&|b| b.pager_evict_p50_us),
            pager_evict_p99_us: last(&|b| b.pager_evict_p99_us),
            cache_quiet_p50_us: cq50,
            cache_quiet_p99_us: cq99,
            cache_quiet_samples: rig.cache_quiet_ns.len(),
            remote_quiet_p50_us: rq50,
            remote_quiet_p99_us: rq99,
            remote_quiet_samples: rig.remote_quiet_ns.len(),
            seq_first_pass_gbps: rig.seq_first_pass_gbps,
            seq_pass_remote_faults: mid.remote,
            seq_pass_cache_faults: mid.cache,
            seq_pass_prefetch_issued: mid.prefetch_issued,
            seq_pass_prefetch_hits: mid.prefetch_hits,
            seq_pass_bytes_fetched: mid.bytes_fetched,
            random_ready: rig.rand_ready.clone(),
            seq_ready: rig.seq_ready.clone(),
        });
    }
    drop(rigs);
    drop(node);

    let head_i = blocks.iter().position(|&b| b == 4096).unwrap_or(0);
    let head = summaries[head_i].clone();
    let hk = head.block_bytes;
    let uffd50 = med(&|r| r.bare_uffd_p50_us);
    let tcp50 = med(&|r| r.bare_tcp_p50_us);
    let budget = uffd50 + tcp50 + REMOTE_BUDGET_EXTRA_US;
    let seal_cost = seal_cost()?;
    let report = Report {
        bench: "fault-latency",
        host: Host {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        },
        quick: a.quick,
        rounds: plan.rounds,
        floor_samples_per_round: plan.samples,
        gap_us: a.gap_us,
        pinned_cpu: a.pin_cpu,
        fault_samples_per_source_per_round: plan.fault_samples,
        random_working_set_bytes: plan.ws,
        random_local_limit_bytes: plan.limit,
        random_cache_quota_bytes: (plan.limit / dmem_pager::evict::CACHE_SHARE_DIV as u64)
            .min(plan.cache),
        seq_region_bytes: plan.seq_size,
        seq_local_limit_bytes: plan.seq_size / 4,
        pager_cache_bytes: plan.cache,
        block_bytes: hk,
        transport: match a.transport {
            TransportMode::Rdma => "rdma",
            _ => "tcp",
        },
        rdma_status: rdma_unavailable_here().unwrap_or_else(|| "available".into()),
        encrypt: a.encrypt,
        seal_us_per_page: seal_cost.0,
        open_us_per_page: seal_cost.1,
        bare_uffd_p50_us: uffd50,
        bare_uffd_p99_us: med(&|r| r.bare_uffd_p99_us),
        bare_uffd_p50_us_range: range(&|r| r.bare_uffd_p50_us),
        bare_uffd_xproc_p50_us: med(&|r| r.bare_uffd_xproc_p50_us),
        bare_uffd_xproc_p99_us: med(&|r| r.bare_uffd_xproc_p99_us),
        bare_uffd_xproc_p50_us_range: range(&|r| r.bare_uffd_xproc_p50_us),
        cache_vs_uffd_xproc: head.cache_p50_us / med(&|r| r.bare_uffd_xproc_p50_us),
        bare_tcp_p50_us: tcp50,
        bare_tcp_p99_us: med(&|r| r.bare_tcp_p99_us),
        bare_tcp_p50_us_range: range(&|r| r.bare_tcp_p50_us),
        cache_p50_us: head.cache_p50_us,
        cache_p99_us: head.cache_p99_us,
        remote_p50_us: head.remote_p50_us,
        remote_p99_us: head.remote_p99_us,
        seq_scan_gbps: head.seq_scan_gbps,
        cache_vs_uffd: head.cache_p50_us / uffd50,
        cache_vs_uffd_round_median: med(&|r| r.blocks[&hk].cache_p50_us / r.bare_uffd_p50_us),
        remote_budget_us: budget,
        remote_vs_budget: head.remote_p50_us / budget,
        cache_p99_vs_p50: head.cache_p99_us / head.cache_p50_us,
        remote_p99_vs_p50: head.remote_p99_us / head.remote_p50_us,
        cache_vs_uffd_target_max: CACHE_VS_UFFD_MAX,
        p99_vs_p50_target_max: P99_VS_P50_MAX,
        seq_scan_gbps_target_min: SEQ_GBPS_MIN,
        cache_p50_met: head.cache_p50_us <= CACHE_VS_UFFD_MAX * uffd50,
        remote_p50_met: head.remote_p50_us <= budget,
        cache_p99_met: head.cache_p99_us <= P99_VS_P50_MAX * head.cache_p50_us,
        remote_p99_met: head.remote_p99_us <= P99_VS_P50_MAX * head.remote_p50_us,
        seq_scan_met: head.seq_scan_gbps >= SEQ_GBPS_MIN,
        blocks: summaries,
        per_round,
    };
    print_table(&report);
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n")
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    Ok(())
}

/// Median µs to seal and to open one 4 KiB page (what --encrypt adds to a
/// write-back and to a fetch, per page).
fn seal_cost() -> Result<(f64, f64), String> {
    let sealer = dmem_pager::seal::Sealer::new().map_err(|e| e.to_string())?;
    let mut page = vec![0x5au8; 4096];
    let (mut seal, mut open) = (Vec::new(), Vec::new());
    for slot in 0..2000u32 {
        let t = std::time::Instant::now();
        sealer.seal(slot, &mut page);
        seal.push(t.elapsed().as_nanos() as f64 / 1e3);
        let t = std::time::Instant::now();
        sealer.open(slot, &mut page).map_err(|e| e.to_string())?;
        open.push(t.elapsed().as_nanos() as f64 / 1e3);
    }
    Ok((median_finite(&seal), median_finite(&open)))
}

/// The interleaved rounds.
fn run_rounds(a: &Args, plan: &Plan, rigs: &mut [BlockRig]) -> Result<Vec<Round>, String> {
    let floors = Floors::start()?;
    let mut uffd = UffdFloor::start(64 << 20, HandlerAt::Thread)?;
    let mut uffd_xproc = UffdFloor::start(64 << 20, HandlerAt::Process)?;
    let mut rng = Rng::new(0x5eed_fa17);

    let mut per_round = Vec::new();
    for r in 0..plan.rounds {
        let mut order = vec![Who::Uffd, Who::UffdXproc, Who::Tcp];
        for i in 0..rigs.len() {
            order.push(Who::Random(i));
            order.push(Who::Seq(i));
        }
        if r % 2 == 1 {
            order.reverse();
        }
        let mut round = Round::default();
        for who in order {
            match who {
                Who::Uffd => {
                    (round.bare_uffd_p50_us, round.bare_uffd_p99_us) =
                        uffd.sample(plan.samples, plan.gap, &mut rng)?;
                }
                Who::UffdXproc => {
                    (round.bare_uffd_xproc_p50_us, round.bare_uffd_xproc_p99_us) =
                        uffd_xproc.sample(plan.samples, plan.gap, &mut rng)?;
                }
                Who::Tcp => {
                    (round.bare_tcp_p50_us, round.bare_tcp_p99_us) =
                        floors.ping_pong(plan.samples, plan.gap)?;
                }
                Who::Random(i) => {
                    let rig = &mut rigs[i];
                    let max = plan.fault_samples as u64 * 200;
                    let res: RandomResult = rig
                        .rand
                        .ask(&format!("random {} {max} {}", plan.fault_samples, a.gap_us))?;
                    let b = round.blocks.entry(rig.block).or_default();
                    (b.cache_p50_us, b.cache_p99_us) = pct(&res.cache_ns);
                    (b.remote_p50_us, b.remote_p99_us) = pct(&res.remote_ns);
                    b.cache_samples = res.cache_ns.len();
                    b.remote_samples = res.remote_ns.len();
                    b.zero_samples = res.zero_ns.len();
                    b.skipped_resident = res.skipped_resident;
                    b.discarded_no_fault = res.no_fault;
                    b.discarded_ambiguous = res.ambiguous;
                    b.ambiguous_patterns = res.ambiguous_patterns.clone();
                    b.repeated = res.repeated;
                    b.late_counter = res.late_counter;
                    b.throttled = res.delta.throttled;
                    b.joined = res.delta.joined;
                    b.random_prefetch_issued = res.delta.prefetch_issued;
                    b.stats_query_p50_us = res.stats_query_p50_us;
                    b.pager_fetch_p50_us = res.pager_fetch_p50_us;
                    b.pager_fetch_p99_us = res.pager_fetch_p99_us;
                    b.pager_evict_p50_us = res.pager_evict_p50_us;
                    b.pager_evict_p99_us = res.pager_evict_p99_us;
                    rig.cache_ns.extend(&res.cache_ns);
                    rig.remote_ns.extend(&res.remote_ns);
                    rig.cache_quiet_ns.extend(&res.cache_quiet_ns);
                    rig.remote_quiet_ns.extend(&res.remote_quiet_ns);
                }
                Who::Seq(i) => {
                    let rig = &mut rigs[i];
                    let res: ScanResult = rig.seq.ask("scan")?;
                    let b = round.blocks.entry(rig.block).or_default();
                    b.seq_scan_gbps = res.gbps;
                    b.seq_scan_s = res.seconds;
                    b.seq_scan = res.delta;
                }
            }
        }
        eprintln!("  round {}/{}: {}", r + 1, plan.rounds, round_line(&round));
        per_round.push(round);
    }
    Ok(per_round)
}

/// Says which daemons ended during the run: a worker that fails because its
/// pager vanished should not be mistaken for a pager bug (other programs on
/// a shared machine sometimes kill daemons by name).
fn daemon_deaths(node: &mut Daemon, rigs: &mut [BlockRig]) -> String {
    let mut out = String::new();
    if let Some(st) = node.exited() {
        out += &format!("; dmem-memnode ended during the run ({st})");
    }
    for rig in rigs.iter_mut() {
        for (what, d) in [
            ("random", &mut rig.rand_pager),
            ("scan", &mut rig.seq_pager),
        ] {
            if let Some(st) = d.exited() {
                out += &format!(
                    "; the {what} dmem-pager (block {}) ended during the run ({st}){}",
                    short_size(rig.block),
                    if st.success() || st.signal().is_some() {
                        ": stopped from outside the benchmark?"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    out
}

/// (p50, p99) in µs of ns samples; NaN when there are none.
fn pct(ns: &[u64]) -> (f64, f64) {
    if ns.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let h = histogram_of(ns);
    (quantile_us(&h, 0.5), quantile_us(&h, 0.99))
}

fn histogram_of(ns: &[u64]) -> hdrhistogram::Histogram<u64> {
    let mut h = latency_histogram();
    for &n in ns {
        h.saturating_record(n.max(1));
    }
    h
}

/// The distribution of pooled samples as [quantile, µs] points, for a CDF
/// plot (empty without samples).
fn cdf(ns: &[u64]) -> Vec<[f64; 2]> {
    if ns.is_empty() {
        return Vec::new();
    }
    let h = histogram_of(ns);
    let mut qs: Vec<f64> = (1..100).map(|p| p as f64 / 100.0).collect();
    qs.extend([0.995, 0.999]);
    qs.into_iter().map(|q| [q, quantile_us(&h, q)]).collect()
}

/// Median of the finite values (NaN when none).
fn median_finite(xs: &[f64]) -> f64 {
    let v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        median(&v)
    }
}

fn min_max(xs: &[f64]) -> [f64; 2] {
    let v = xs.iter().copied().filter(|x| x.is_finite());
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() {
        [lo, hi]
    } else {
        [f64::NAN, f64::NAN]
    }
}

fn round_line(r: &Round) -> String {
    let mut s = format!(
        "uffd p50 {:.1} us (other process {:.1}), tcp p50 {:.1} us",
        r.bare_uffd_p50_us, r.bare_uffd_xproc_p50_us, r.bare_tcp_p50_us
    );
    for (k, b) in &r.blocks {
        s += &format!(
            "; block {}: cache p50 {:.1} us (n={}), remote p50 {:.1} us (n={}), scan {:.3} GB/s",
            short_size(*k),
            b.cache_p50_us,
            b.cache_samples,
            b.remote_p50_us,
            b.remote_samples,
            b.seq_scan_gbps
        );
    }
    s
}

fn print_table(r: &Report) {
    let ok = |b: bool| if b { "ok" } else { "MISSED" };
    let head = r
        .blocks
        .iter()
        .find(|b| b.block_bytes == r.block_bytes)
        .expect("headline block is measured");
    println!();
    println!(
        "transport to the memory node: {} (RDMA: {}); pages sealed at rest: {}",
        r.transport,
        r.rdma_status,
        if r.encrypt { "yes (--encrypt)" } else { "no" }
    );
    println!(
        "sealing cost per 4 KiB page (ChaCha20-Poly1305, this CPU): seal {:.2} us, open {:.2} us",
        r.seal_us_per_page, r.open_us_per_page
    );
    println!(
        "fault-latency benchmark: medians of {} rounds ({} CPUs, Linux {}), pager --block {}",
        r.rounds,
        r.host.cpus,
        r.host.kernel,
        short_size(r.block_bytes)
    );
    println!(
        "every timed fault or ping follows a {} us busy-wait of sched_yield calls (--gap-us); {}",
        r.gap_us,
        match r.pinned_cpu {
            Some(c) => format!("everything pinned to CPU {c} (--pin-cpu)"),
            None => "not pinned (see --pin-cpu)".to_string(),
        }
    );
    println!(
        "random 4 KiB read faults: working set {}, local limit {} (cache share {})",
        format_size(r.random_working_set_bytes),
        format_size(r.random_local_limit_bytes),
        format_size(r.random_cache_quota_bytes)
    );
    println!(
        "{:<36} {:>8} {:>8} {:>9} {:>10}",
        "", "p50 us", "p99 us", "p99/p50", "p50 range"
    );
    let row = |name: &str, p50: f64, p99: f64, range: [f64; 2]| {
        println!(
            "{:<36} {:>8.1} {:>8.1} {:>9.2} {:>4.1}..{:<5.1}",
            name,
            p50,
            p99,
            p99 / p50,
            range[0],
            range[1]
        )
    };
    row(
        "bare uffd round trip (floor 1)",
        r.bare_uffd_p50_us,
        r.bare_uffd_p99_us,
        r.bare_uffd_p50_us_range,
    );
    row(
        "  same, handler in another process",
        r.bare_uffd_xproc_p50_us,
        r.bare_uffd_xproc_p99_us,
        r.bare_uffd_xproc_p50_us_range,
    );
    row(
        "bare TCP 16B/4K ping-pong (floor 2)",
        r.bare_tcp_p50_us,
        r.bare_tcp_p99_us,
        r.bare_tcp_p50_us_range,
    );
    row(
        &format!("dmem fault from cache tier (n={})", head.cache_samples),
        r.cache_p50_us,
        r.cache_p99_us,
        head.cache_p50_us_range,
    );
    row(
        &format!("dmem fault from memnode (n={})", head.remote_samples),
        r.remote_p50_us,
        r.remote_p99_us,
        head.remote_p50_us_range,
    );
    println!(
        "{:<36} {:>8.3} GB/s (range {:.3}..{:.3}; first pass after writing {:.3})",
        format!(
            "sequential scan {} at 25% local",
            format_size(r.seq_region_bytes)
        ),
        r.seq_scan_gbps,
        head.seq_scan_gbps_range[0],
        head.seq_scan_gbps_range[1],
        head.seq_first_pass_gbps
    );
    println!(
        "{:<36} cache p99 {:.1} us (n={}), remote p99 {:.1} us (n={}); eviction batch p50 {} us, p99 {} us",
        "tail, no eviction nearby (pooled)",
        head.cache_quiet_p99_us,
        head.cache_quiet_samples,
        head.remote_quiet_p99_us,
        head.remote_quiet_samples,
        head.pager_evict_p50_us,
        head.pager_evict_p99_us
    );
    println!(
        "{:<36} cache p99 {:.1} us, remote p99 {:.1} us; pager's own fetch p50 {} us, p99 {} us",
        "tail of all samples (pooled)",
        head.cache_pooled_p99_us,
        head.remote_pooled_p99_us,
        head.pager_fetch_p50_us,
        head.pager_fetch_p99_us
    );
    println!("targets:");
    println!(
        "  cache p50 <= {CACHE_VS_UFFD_MAX} x bare uffd p50: {:.2}x  {}",
        r.cache_vs_uffd,
        ok(r.cache_p50_met)
    );
    println!(
        "    (against the handler in another process, as the pager is: {:.2}x; no target)",
        r.cache_vs_uffd_xproc
    );
    println!(
        "  remote p50 <= uffd + tcp + {REMOTE_BUDGET_EXTRA_US} us = {:.1} us: {:.1} us ({:.2}x budget)  {}",
        r.remote_budget_us,
        r.remote_p50_us,
        r.remote_vs_budget,
        ok(r.remote_p50_met)
    );
    println!(
        "  p99 <= {P99_VS_P50_MAX} x p50: cache {:.2}x {}, remote {:.2}x {}",
        r.cache_p99_vs_p50,
        ok(r.cache_p99_met),
        r.remote_p99_vs_p50,
        ok(r.remote_p99_met)
    );
    println!(
        "  sequential scan >= {SEQ_GBPS_MIN} GB/s: {:.3} GB/s  {}",
        r.seq_scan_gbps,
        ok(r.seq_scan_met)
    );
    if r.blocks.len() > 1 {
        println!();
        println!("block sweep (medians of rounds):");
        println!(
            "{:>6} {:>10} {:>10} {:>11} {:>11} {:>9} {:>15}",
            "block",
            "cache p50",
            "cache p99",
            "remote p50",
            "remote p99",
            "scan GB/s",
            "scan range"
        );
        for b in &r.blocks {
            println!(
                "{:>6} {:>10.1} {:>10.1} {:>11.1} {:>11.1} {:>9.3} {:>7.3}..{:<6.3}",
                short_size(b.block_bytes),
                b.cache_p50_us,
                b.cache_p99_us,
                b.remote_p50_us,
                b.remote_p99_us,
                b.seq_scan_gbps,
                b.seq_scan_gbps_range[0],
                b.seq_scan_gbps_range[1]
            );
        }
    }
}

/// 4K, 64K, 2M.
fn short_size(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{}M", b >> 20)
    } else {
        format!("{}K", b >> 10)
    }
}
