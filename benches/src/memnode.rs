//! `dmem-bench memnode`: the memory node's data path against bare TCP.
//!
//! One run starts the real `dmem-memnode` (one per I/O mode asked for) and
//! measures, in interleaved rounds so that machine noise hits every
//! contender alike:
//!
//! * 4 KiB READ latency through `dmem_memnode::client::Client`, one request
//!   outstanding; floor: a bare TCP ping-pong (16 B request, 4 KiB reply,
//!   blocking sockets, `TCP_NODELAY`) with an in-process echo thread;
//! * pipelined throughput: READs and WRITEs of 64 KiB each (16 scattered
//!   4 KiB extents, the pager's shape), `--window` requests in flight;
//!   floor: bare TCP streaming of 64 KiB `write(2)`s to an in-process sink.
//!
//! Headline figures are medians over rounds; ratios are memnode / floor.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dmem_memnode::client::{Client, ClientConfig, Pending};
use dmem_memnode::protocol::Extent;
use serde::Serialize;

use crate::daemon::Daemon;
use crate::stats::{latency_histogram, median, quantile_us, Rng};

const PAGE: usize = 4096;
/// Slab the benchmark reads and writes; fully written first so reads hit
/// real pages, not the shared zero page.
const SLAB: u32 = 1;
const SLAB_BYTES: usize = 256 << 20;
const REQUEST_BYTES: usize = 64 << 10;
const EXTENTS_PER_REQUEST: usize = REQUEST_BYTES / PAGE;
const PING_REQUEST: usize = 16;
const READ_P50_TARGET: f64 = 1.2;
const THROUGHPUT_TARGET: f64 = 0.8;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Write all figures as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The dmem-memnode binary (default: next to this executable).
    #[arg(long)]
    memnode_bin: Option<PathBuf>,
    /// Memory-node I/O mode to measure; `both` interleaves the two modes in
    /// the same rounds (top-level JSON figures are then the threads mode's).
    #[arg(long, value_enum, default_value_t = Io::Threads)]
    io: Io,
    /// Fewer rounds and samples: a smoke run of a few seconds.
    #[arg(long)]
    quick: bool,
    /// Rounds of interleaved measurements (default 5, quick 3).
    #[arg(long)]
    rounds: Option<usize>,
    /// Latency samples per contender per round (default 20000, quick 2000).
    #[arg(long)]
    samples: Option<usize>,
    /// MiB moved per throughput measurement (default 512, quick 64).
    #[arg(long)]
    mib: Option<usize>,
    /// Requests in flight in the pipelined measurements.
    #[arg(long, default_value_t = 32)]
    window: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Io {
    Threads,
    Uring,
    Both,
}

impl Io {
    fn modes(self) -> &'static [&'static str] {
        match self {
            Io::Threads => &["threads"],
            Io::Uring => &["uring"],
            Io::Both => &["threads", "uring"],
        }
    }
}

/// One mode's figures from one round.
#[derive(Serialize, Clone, Debug, Default)]
struct ModeRound {
    read_p50_us: f64,
    read_p99_us: f64,
    read_gbps: f64,
    write_gbps: f64,
}

/// One round: the floors and every mode.
#[derive(Serialize, Clone, Debug, Default)]
struct Round {
    bare_tcp_p50_us: f64,
    bare_tcp_p99_us: f64,
    bare_stream_gbps: f64,
    modes: BTreeMap<String, ModeRound>,
}

/// Medians over rounds of one mode, with ratios to the floors.
#[derive(Serialize, Clone, Debug)]
struct ModeSummary {
    memnode_read_p50_us: f64,
    memnode_read_p99_us: f64,
    memnode_read_gbps: f64,
    memnode_write_gbps: f64,
    /// memnode_read_p50_us / bare_tcp_p50_us (target <= 1.2).
    read_p50_ratio: f64,
    /// memnode_read_gbps / bare_stream_gbps (target >= 0.8).
    throughput_ratio: f64,
    /// memnode_write_gbps / bare_stream_gbps.
    write_throughput_ratio: f64,
    /// The same ratios computed within each round, then the median.
    read_p50_ratio_round_median: f64,
    throughput_ratio_round_median: f64,
    read_p50_ratio_ok: bool,
    throughput_ratio_ok: bool,
}

#[derive(Serialize, Debug)]
struct Report {
    bench: &'static str,
    io: String,
    host: Host,
    rounds: usize,
    latency_samples_per_round: usize,
    throughput_bytes_per_measurement: usize,
    window: usize,
    request_bytes: usize,
    extents_per_request: usize,
    bare_tcp_p50_us: f64,
    bare_tcp_p99_us: f64,
    bare_stream_gbps: f64,
    /// The first mode's figures (threads when both were measured).
    #[serde(flatten)]
    primary: ModeSummary,
    read_p50_ratio_target_max: f64,
    throughput_ratio_target_min: f64,
    modes: BTreeMap<String, ModeSummary>,
    per_round: Vec<Round>,
}

#[derive(Serialize, Debug)]
struct Host {
    cpus: usize,
    kernel: String,
}

pub fn run(a: Args) -> Result<(), String> {
    let bin = crate::sibling_binary("dmem-memnode", a.memnode_bin.clone())?;
    let rounds = a.rounds.unwrap_or(if a.quick { 3 } else { 5 }).max(1);
    let samples = a
        .samples
        .unwrap_or(if a.quick { 2_000 } else { 20_000 })
        .max(1);
    let bytes = a.mib.unwrap_or(if a.quick { 64 } else { 512 }).max(1) << 20;
    let window = a.window.max(1);
    let modes = a.io.modes();

    let floors = Floors::start()?;
    let mut nodes = Vec::new();
    for m in modes {
        let node = start_node(&bin, m, "1G")?;
        let client = Client::connect(ClientConfig::new(node.addr.clone()))
            .map_err(|e| format!("connect to memnode ({m}): {e}"))?;
        prepare(&client)?;
        nodes.push((*m, node, client));
    }
    eprintln!(
        "dmem-bench memnode: io={}, {rounds} rounds, {samples} latency samples and {} MiB per \
         throughput measurement per round, window {window}",
        modes.join("+"),
        bytes >> 20
    );

    let mut rng = Rng::new(0x5eed_d3e0);
    let mut per_round = Vec::new();
    for r in 0..rounds {
        let mut round = Round::default();
        // Alternate the order, so neither side always runs first.
        let mut order: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..nodes.len()).map(Some))
            .collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for who in &order {
            match who {
                None => {
                    let (p50, p99) = floors.ping_pong(samples, Duration::ZERO)?;
                    (round.bare_tcp_p50_us, round.bare_tcp_p99_us) = (p50, p99);
                }
                Some(i) => {
                    let (m, _, client) = &nodes[*i];
                    let (p50, p99) = read_latency(client, samples, &mut rng)?;
                    let e = round.modes.entry(m.to_string()).or_default();
                    (e.read_p50_us, e.read_p99_us) = (p50, p99);
                }
            }
        }
        for who in &order {
            match who {
                None => round.bare_stream_gbps = floors.stream(bytes)?,
                Some(i) => {
                    let (m, _, client) = &nodes[*i];
                    let read = pipelined(client, Dir::Read, bytes, window, &mut rng)?;
                    let e = round.modes.entry(m.to_string()).or_default();
                    e.read_gbps = read;
                }
            }
        }
        for who in order.iter().flatten() {
            let (m, _, client) = &nodes[*who];
            let write = pipelined(client, Dir::Write, bytes, window, &mut rng)?;
            round.modes.entry(m.to_string()).or_default().write_gbps = write;
        }
        for (m, _, client) in &nodes {
            // A reconnect means a request stalled until the client's timeout:
            // the figures would be meaningless.
            if client.reconnects() > 0 {
                return Err(format!(
                    "the connection to the {m} memnode broke and was re-established \
                     during round {}: a request stalled",
                    r + 1
                ));
            }
        }
        eprintln!("  round {}/{rounds}: {}", r + 1, round_line(&round));
        per_round.push(round);
    }
    for (_, node, client) in nodes {
        let _ = client.close_session();
        drop(node);
    }

    let med = |f: &dyn Fn(&Round) -> f64| median(&per_round.iter().map(f).collect::<Vec<_>>());
    let bare_p50 = med(&|r| r.bare_tcp_p50_us);
    let bare_p99 = med(&|r| r.bare_tcp_p99_us);
    let bare_gbps = med(&|r| r.bare_stream_gbps);
    let mut summaries = BTreeMap::new();
    for m in modes {
        let get = |f: &dyn Fn(&ModeRound) -> f64| med(&|r| f(&r.modes[*m]));
        let p50 = get(&|x| x.read_p50_us);
        let rgbps = get(&|x| x.read_gbps);
        let s = ModeSummary {
            memnode_read_p50_us: p50,
            memnode_read_p99_us: get(&|x| x.read_p99_us),
            memnode_read_gbps: rgbps,
            memnode_write_gbps: get(&|x| x.write_gbps),
            read_p50_ratio: p50 / bare_p50,
            throughput_ratio: rgbps / bare_gbps,
            write_throughput_ratio: get(&|x| x.write_gbps) / bare_gbps,
            read_p50_ratio_round_median: med(&|r| r.modes[*m].read_p50_us / r.bare_tcp_p50_us),
            throughput_ratio_round_median: med(&|r| r.modes[*m].read_gbps / r.bare_stream_gbps),
            read_p50_ratio_ok: p50 / bare_p50 <= READ_P50_TARGET,
            throughput_ratio_ok: rgbps / bare_gbps >= THROUGHPUT_TARGET,
        };
        summaries.insert(m.to_string(), s);
    }
    let report = Report {
        bench: "memnode",
        io: modes.join("+"),
        host: Host {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
        },
        rounds,
        latency_samples_per_round: samples,
        throughput_bytes_per_measurement: bytes,
        window,
        request_bytes: REQUEST_BYTES,
        extents_per_request: EXTENTS_PER_REQUEST,
        bare_tcp_p50_us: bare_p50,
        bare_tcp_p99_us: bare_p99,
        bare_stream_gbps: bare_gbps,
        primary: summaries[modes[0]].clone(),
        read_p50_ratio_target_max: READ_P50_TARGET,
        throughput_ratio_target_min: THROUGHPUT_TARGET,
        modes: summaries,
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

fn round_line(r: &Round) -> String {
    let mut s = format!(
        "bare p50 {:.1} us, stream {:.2} GB/s",
        r.bare_tcp_p50_us, r.bare_stream_gbps
    );
    for (m, x) in &r.modes {
        s += &format!(
            "; {m}: p50 {:.1} us, read {:.2} GB/s, write {:.2} GB/s",
            x.read_p50_us, x.read_gbps, x.write_gbps
        );
    }
    s
}

fn print_table(r: &Report) {
    let ok = |b: bool| if b { "ok" } else { "MISSED" };
    println!();
    println!(
        "memnode benchmark: medians of {} rounds ({} CPUs, Linux {})",
        r.rounds, r.host.cpus, r.host.kernel
    );
    println!(
        "{:<34} {:>9} {:>9} {:>9}",
        "4 KiB read, 1 outstanding", "p50 us", "p99 us", "ratio"
    );
    println!(
        "{:<34} {:>9.1} {:>9.1} {:>9}",
        "bare TCP ping-pong (floor)", r.bare_tcp_p50_us, r.bare_tcp_p99_us, "1.00"
    );
    for (m, s) in &r.modes {
        println!(
            "{:<34} {:>9.1} {:>9.1} {:>9.2}  {} (target <= {READ_P50_TARGET})",
            format!("memnode READ ({m})"),
            s.memnode_read_p50_us,
            s.memnode_read_p99_us,
            s.read_p50_ratio,
            ok(s.read_p50_ratio_ok),
        );
    }
    println!(
        "{:<34} {:>9} {:>9}",
        format!("64 KiB requests, window {}", r.window),
        "GB/s",
        "ratio"
    );
    println!(
        "{:<34} {:>9.2} {:>9}",
        "bare TCP stream (floor)", r.bare_stream_gbps, "1.00"
    );
    for (m, s) in &r.modes {
        println!(
            "{:<34} {:>9.2} {:>9.2}  {} (target >= {THROUGHPUT_TARGET})",
            format!("memnode READ ({m})"),
            s.memnode_read_gbps,
            s.throughput_ratio,
            ok(s.throughput_ratio_ok),
        );
        println!(
            "{:<34} {:>9.2} {:>9.2}",
            format!("memnode WRITE ({m})"),
            s.memnode_write_gbps,
            s.write_throughput_ratio,
        );
    }
}

/// Starts a `dmem-memnode` on a loopback port with the given I/O mode and
/// capacity; killed on drop.
pub(crate) fn start_node(
    bin: &std::path::Path,
    io: &str,
    capacity: &str,
) -> Result<Daemon, String> {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--capacity",
        capacity,
        "--io",
        io,
    ])
    .env("RUST_LOG", "error");
    Daemon::start(
        cmd,
        &format!("dmem-memnode --io {io} ({})", bin.display()),
        "dmem-memnode listening on ",
    )
}

/// Leases the slab and writes all of it.
fn prepare(client: &Client) -> Result<(), String> {
    client
        .alloc(SLAB, SLAB_BYTES as u64)
        .map_err(|e| format!("alloc: {e}"))?;
    let chunk = 1 << 20;
    let data: Vec<u8> = (0..chunk).map(|i| (i * 7 + 3) as u8).collect();
    for off in (0..SLAB_BYTES).step_by(chunk) {
        client
            .write(&[Extent::new(SLAB, off as u64, chunk as u32)], &data)
            .map_err(|e| format!("fill slab: {e}"))?;
    }
    let back = client
        .read(&[Extent::new(SLAB, 5 * PAGE as u64, PAGE as u32)])
        .map_err(|e| format!("read back: {e}"))?;
    if back[..] != data[5 * PAGE..6 * PAGE] {
        return Err("memnode returned wrong bytes".into());
    }
    Ok(())
}

fn random_page(rng: &mut Rng) -> u64 {
    rng.below((SLAB_BYTES / PAGE) as u64) * PAGE as u64
}

/// 4 KiB READ round trips, one at a time: (p50, p99) in µs.
fn read_latency(client: &Client, samples: usize, rng: &mut Rng) -> Result<(f64, f64), String> {
    let mut h = latency_histogram();
    let warmup = (samples / 10).clamp(100, 2_000);
    for i in 0..warmup + samples {
        let ext = [Extent::new(SLAB, random_page(rng), PAGE as u32)];
        let t = Instant::now();
        let data = client.read(&ext).map_err(|e| format!("read: {e}"))?;
        let ns = t.elapsed().as_nanos() as u64;
        if data.len() != PAGE {
            return Err(format!("read returned {} bytes", data.len()));
        }
        if i >= warmup {
            h.saturating_record(ns.max(1));
        }
    }
    Ok((quantile_us(&h, 0.5), quantile_us(&h, 0.99)))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
}

/// Moves `bytes` in 64 KiB requests of scattered pages with `window` in
/// flight; returns GB/s (10^9 bytes per second).
fn pipelined(
    client: &Client,
    dir: Dir,
    bytes: usize,
    window: usize,
    rng: &mut Rng,
) -> Result<f64, String> {
    let data = vec![0xA5u8; REQUEST_BYTES];
    let mut extents = Vec::with_capacity(EXTENTS_PER_REQUEST);
    let mut q: VecDeque<Pending> = VecDeque::with_capacity(window);
    let finish = |p: Pending| -> Result<(), String> {
        let got = p.wait().map_err(|e| format!("pipelined request: {e}"))?;
        let want = if dir == Dir::Read { REQUEST_BYTES } else { 0 };
        if got.len() != want {
            return Err(format!("reply of {} bytes, expected {want}", got.len()));
        }
        Ok(())
    };
    let requests = bytes / REQUEST_BYTES;
    let warmup = window * 4;
    let mut t0 = Instant::now();
    for i in 0..warmup + requests {
        if i == warmup {
            while let Some(p) = q.pop_front() {
                finish(p)?;
            }
            t0 = Instant::now();
        }
        if q.len() == window {
            finish(q.pop_front().expect("window is full"))?;
        }
        extents.clear();
        extents.extend(
            (0..EXTENTS_PER_REQUEST).map(|_| Extent::new(SLAB, random_page(rng), PAGE as u32)),
        );
        let p = match dir {
            Dir::Read => client.submit_read(&extents),
            Dir::Write => client.submit_write(&extents, &data),
        }
        .map_err(|e| format!("submit: {e}"))?;
        q.push_back(p);
    }
    while let Some(p) = q.pop_front() {
        finish(p)?;
    }
    Ok((requests * REQUEST_BYTES) as f64 / t0.elapsed().as_secs_f64() / 1e9)
}

/// The bare-TCP floors: an in-process echo thread for ping-pong and a sink
/// thread for streaming, each on a persistent loopback connection.
pub(crate) struct Floors {
    ping: TcpStream,
    stream: TcpStream,
}

impl Floors {
    pub(crate) fn start() -> Result<Floors, String> {
        let io = |e: std::io::Error| format!("bare TCP floor: {e}");
        let ping_l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let sink_l = TcpListener::bind("127.0.0.1:0").map_err(io)?;
        let (ping_addr, sink_addr) = (
            ping_l.local_addr().map_err(io)?,
            sink_l.local_addr().map_err(io)?,
        );
        std::thread::Builder::new()
            .name("bare-echo".into())
            .spawn(move || {
                if let Ok((s, _)) = ping_l.accept() {
                    echo(s);
                }
            })
            .map_err(io)?;
        std::thread::Builder::new()
            .name("bare-sink".into())
            .spawn(move || {
                if let Ok((s, _)) = sink_l.accept() {
                    sink(s);
                }
            })
            .map_err(io)?;
        let ping = TcpStream::connect(ping_addr).map_err(io)?;
        let stream = TcpStream::connect(sink_addr).map_err(io)?;
        ping.set_nodelay(true).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        Ok(Floors { ping, stream })
    }

    /// 16 B request, 4 KiB reply, one at a time, each after a busy-wait of yields for
    /// `gap`: (p50, p99) in µs.
    pub(crate) fn ping_pong(&self, samples: usize, gap: Duration) -> Result<(f64, f64), String> {
        let io = |e: std::io::Error| format!("bare ping-pong: {e}");
        let mut s = &self.ping;
        let req = [0x42u8; PING_REQUEST];
        let mut reply = vec![0u8; PAGE];
        let mut h = latency_histogram();
        let warmup = (samples / 10).clamp(100, 2_000);
        for i in 0..warmup + samples {
            crate::sys::pause(gap);
            let t = Instant::now();
            s.write_all(&req).map_err(io)?;
            s.read_exact(&mut reply).map_err(io)?;
            let ns = t.elapsed().as_nanos() as u64;
            if i >= warmup {
                h.saturating_record(ns.max(1));
            }
        }
        Ok((quantile_us(&h, 0.5), quantile_us(&h, 0.99)))
    }

    /// Streams `bytes` in 64 KiB writes; timed until the sink acknowledges
    /// the last byte. GB/s.
    fn stream(&self, bytes: usize) -> Result<f64, String> {
        let io = |e: std::io::Error| format!("bare stream: {e}");
        let mut s = &self.stream;
        let chunk = vec![0x5Au8; REQUEST_BYTES];
        // Warm-up pass, then the measured one.
        let mut gbps = 0.0;
        for total in [bytes / 8, bytes] {
            let total = total.div_ceil(REQUEST_BYTES) * REQUEST_BYTES;
            let t = Instant::now();
            s.write_all(&(total as u64).to_le_bytes()).map_err(io)?;
            for _ in 0..total / REQUEST_BYTES {
                s.write_all(&chunk).map_err(io)?;
            }
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(io)?;
            gbps = total as f64 / t.elapsed().as_secs_f64() / 1e9;
        }
        Ok(gbps)
    }
}

/// Echo side of the ping-pong floor: 16 B in, 4 KiB out.
fn echo(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut req = [0u8; PING_REQUEST];
    let reply = vec![0x24u8; PAGE];
    while s.read_exact(&mut req).is_ok() {
        if s.write_all(&reply).is_err() {
            return;
        }
    }
}

/// Sink side of the stream floor: reads a length, that many bytes, acks.
fn sink(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut left = u64::from_le_bytes(len) as usize;
        while left > 0 {
            let n = left.min(buf.len());
            match s.read(&mut buf[..n]) {
                Ok(0) | Err(_) => return,
                Ok(k) => left -= k,
            }
        }
        if s.write_all(&[1]).is_err() {
            return;
        }
    }
}
