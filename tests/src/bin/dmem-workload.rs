//! `dmem-workload`: a test program that attaches to a pager the way
//! libdmem.so will (its own uffd over its own arena, registered with the
//! pager) and runs a workload over managed memory, verifying every byte.
//! Exits 0 when every check passed, 1 with a message on the first wrong
//! byte, 2 on setup errors. Prints one JSON line of figures at the end.
//!
//! Page contents are a function of (seed, page, version), so any stale,
//! zeroed or misplaced page is caught wherever it is read.
//!
//! Right after attaching it prints `dmem-workload: arena 0xBASE+LEN ...` on
//! stderr, so that a test can watch the arena's resident set in
//! /proc/PID/smaps. The `hold` scenario writes everything, prints
//! `{"phase":"written"}` on stdout and waits for a line on stdin before it
//! verifies: tests use the pause to break things while the data is evicted.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dmem_pager::app::{AppConfig, AppSession};
use dmem_tests::page_word as word;

const PAGE: usize = 4096;

struct Args {
    socket: PathBuf,
    scenario: String,
    /// Bytes of managed memory the workload touches.
    size: usize,
    threads: usize,
    seed: u64,
    limit: u64,
    rounds: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        scenario: "seq".into(),
        size: 64 << 20,
        threads: 4,
        seed: 1,
        limit: 0,
        rounds: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        match k.as_str() {
            "--socket" => a.socket = v()?.into(),
            "--scenario" => a.scenario = v()?,
            "--size" => a.size = size(&v()?)? as usize,
            "--threads" => a.threads = v()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--seed" => a.seed = v()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "--local-limit" => a.limit = size(&v()?)?,
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err("--socket is required".into());
    }
    Ok(a)
}

fn size(s: &str) -> Result<u64, String> {
    dmem_memnode::size::parse_size(s).map_err(|e| e.to_string())
}

struct Mem {
    base: *mut u64,
    pages: usize,
    seed: u64,
}

// SAFETY: the workload partitions pages between threads or only reads shared ones.
unsafe impl Sync for Mem {}

impl Mem {
    fn page(&self, p: usize) -> *mut u64 {
        assert!(p < self.pages);
        // SAFETY: p is inside the arena (checked above).
        unsafe { self.base.add(p * PAGE / 8) }
    }

    fn write(&self, p: usize, v: u64) {
        let ptr = self.page(p);
        for w in 0..PAGE / 8 {
            // SAFETY: inside page p of the arena; volatile so every word
            // really touches managed memory.
            unsafe { ptr.wrapping_add(w).write_volatile(word(self.seed, p, w, v)) };
        }
    }

    /// Checks page p holds version v (0 = never written: zeros).
    fn check(&self, p: usize, v: u64) -> Result<(), String> {
        let ptr = self.page(p);
        for w in 0..PAGE / 8 {
            // SAFETY: inside page p of the arena.
            let got = unsafe { ptr.wrapping_add(w).read_volatile() };
            let want = if v == 0 { 0 } else { word(self.seed, p, w, v) };
            if got != want {
                return Err(format!(
                    "page {p} word {w}: got {got:#018x}, want {want:#018x} (version {v}){}",
                    if got == 0 { " -- ZEROS" } else { "" }
                ));
            }
        }
        Ok(())
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("dmem-workload: {e}");
            return ExitCode::from(2);
        }
    };
    let arena = (args.size * 2).max(4 << 20);
    let cfg = AppConfig {
        socket: args.socket.clone(),
        arena_len: arena,
        local_limit: args.limit,
        on_evicted: None,
    };
    let session = match AppSession::attach(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dmem-workload: cannot attach: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "dmem-workload: arena {:#x}+{} session {} limit {} block {}",
        session.arena_ptr() as u64,
        session.arena_len(),
        session.session_id(),
        session.local_limit(),
        session.block()
    );
    let mem = Mem {
        base: session.arena_ptr().cast(),
        pages: args.size / PAGE,
        seed: args.seed,
    };
    let t0 = Instant::now();
    let r = match args.scenario.as_str() {
        "seq" => seq(&mem, args.rounds),
        "random" => random(&mem, args.rounds, args.seed),
        "zero" => zero(&mem),
        "threads" => threads(&mem, args.threads, args.rounds, args.seed),
        "madvise" => madvise(&mem),
        "mremap" => mremap(&mem, &session),
        "mremap-churn" => mremap_churn(&mem, &session, args.rounds),
        "rmw" => rmw(&mem, args.rounds, args.seed),
        "zero-rewrite" => zero_rewrite(&mem),
        "munmap" => munmap(&mem),
        "scan" => scan(&mem, args.rounds),
        "interleaved" => interleaved(&mem, args.rounds),
        "hot-cold" => hot_cold(&mem, args.rounds),
        "hold" => hold(&mem),
        "vanish" => vanish(&mem, false),
        "vanish-touch" => vanish(&mem, true),
        "fork-orphan" => fork_orphan(&mem, &session, &cfg, args.rounds > 0),
        other => Err(format!("unknown scenario {other}")),
    };
    match r {
        Ok(extra) => {
            println!(
                "{{\"ok\":true,\"scenario\":\"{}\",\"pages\":{},\"seconds\":{:.3}{extra}}}",
                args.scenario,
                mem.pages,
                t0.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmem-workload: WRONG DATA: {e}");
            ExitCode::from(1)
        }
    }
}

/// Write everything, verify everything, rewrite, verify again.
fn seq(m: &Mem, rounds: usize) -> Result<String, String> {
    for v in 1..=rounds as u64 {
        for p in 0..m.pages {
            m.write(p, v);
        }
        for p in 0..m.pages {
            m.check(p, v)?;
        }
    }
    Ok(String::new())
}

/// Sequential read scans over data written once (clean evictions).
fn scan(m: &Mem, rounds: usize) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let t = Instant::now();
    for _ in 0..rounds {
        for p in 0..m.pages {
            m.check(p, 1)?;
        }
    }
    let gbps = (m.pages * PAGE * rounds) as f64 / t.elapsed().as_secs_f64() / 1e9;
    Ok(format!(",\"scan_gbps\":{gbps:.3}"))
}

/// Read scans of two streams at once, far apart: page i of the first
/// half, then page i of the second half (as `c = a + b` reads its inputs).
fn interleaved(m: &Mem, rounds: usize) -> Result<String, String> {
    let half = m.pages / 2;
    for p in 0..m.pages {
        m.write(p, p as u64 + 1);
    }
    for _ in 0..rounds {
        for p in 0..half {
            m.check(p, p as u64 + 1)?;
            m.check(half + p, (half + p) as u64 + 1)?;
        }
    }
    Ok(String::new())
}

/// A small array rewritten over and over (hot, dirty) while a large one,
/// written once, is read through as a stream (cold, clean): the first
/// sixteenth of the pages is rewritten after every sixteenth of the rest
/// is read.
fn hot_cold(m: &Mem, rounds: usize) -> Result<String, String> {
    let hot = (m.pages / 16).max(1);
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let mut v = 1;
    for _ in 0..rounds {
        for (i, p) in (hot..m.pages).enumerate() {
            if i % hot == 0 {
                v += 1;
                for h in 0..hot {
                    m.write(h, v);
                }
            }
            m.check(p, 1)?;
        }
        for h in 0..hot {
            m.check(h, v)?;
        }
    }
    Ok(String::new())
}

/// Random writes and reads against a shadow of versions.
fn random(m: &Mem, rounds: usize, seed: u64) -> Result<String, String> {
    let mut ver = vec![0u64; m.pages];
    let mut rng = Rng(seed | 1);
    for _ in 0..rounds * m.pages {
        let p = rng.below(m.pages);
        if rng.next().is_multiple_of(3) {
            m.check(p, ver[p])?;
        } else {
            ver[p] += 1;
            m.write(p, ver[p]);
        }
    }
    for (p, &v) in ver.iter().enumerate() {
        m.check(p, v)?;
    }
    Ok(String::new())
}

/// Untouched memory reads as zeros, even after other pages are evicted.
fn zero(m: &Mem) -> Result<String, String> {
    let half = m.pages / 2;
    for p in 0..half {
        m.write(p, 1);
    }
    for p in half..m.pages {
        m.check(p, 0)?;
    }
    for p in 0..half {
        m.check(p, 1)?;
    }
    Ok(String::new())
}

/// Threads on disjoint pages plus readers of a shared read-only range.
fn threads(m: &Mem, n: usize, rounds: usize, seed: u64) -> Result<String, String> {
    let shared = m.pages / 4;
    for p in 0..shared {
        m.write(p, 1);
    }
    let err = Arc::new(std::sync::Mutex::new(None::<String>));
    let done = AtomicU64::new(0);
    std::thread::scope(|sc| {
        for t in 0..n {
            let err = Arc::clone(&err);
            let done = &done;
            sc.spawn(move || {
                let mut rng = Rng((seed + t as u64 + 1) * 0x2545F491);
                let mine: Vec<usize> = (shared..m.pages).filter(|p| p % n == t).collect();
                let mut ver = vec![0u64; mine.len()];
                let mut run = || -> Result<(), String> {
                    for _ in 0..rounds * mine.len().max(1) {
                        let i = rng.below(mine.len().max(1));
                        match rng.next() % 4 {
                            0 => m.check(rng.below(shared.max(1)), 1)?,
                            1 => m.check(mine[i], ver[i])?,
                            _ => {
                                ver[i] += 1;
                                m.write(mine[i], ver[i]);
                            }
                        }
                    }
                    for (i, &p) in mine.iter().enumerate() {
                        m.check(p, ver[i])?;
                    }
                    Ok(())
                };
                if let Err(e) = run() {
                    *err.lock().unwrap() = Some(e);
                }
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    let e = err.lock().unwrap().take();
    match e {
        Some(e) => Err(e),
        None => Ok(String::new()),
    }
}

fn madv(m: &Mem, first: usize, n: usize, advice: i32) -> Result<(), String> {
    // SAFETY: the range is inside the arena; DONTNEED only drops contents.
    let rc = unsafe { libc::madvise(m.page(first).cast(), n * PAGE, advice) };
    if rc != 0 {
        return Err(format!(
            "madvise failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// madvise(DONTNEED) of written (resident, cached and remote) pages reads zeros.
fn madvise(m: &Mem) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    // Drop every other 16-page run, across the whole range: some of it is
    // resident, some in the cache tier, some on the memory node.
    for first in (0..m.pages).step_by(32) {
        madv(m, first, 16.min(m.pages - first), libc::MADV_DONTNEED)?;
    }
    for p in 0..m.pages {
        let dropped = (p % 32) < 16;
        m.check(p, if dropped { 0 } else { 1 })?;
    }
    // And it is usable again afterwards.
    for p in 0..m.pages {
        m.write(p, 2);
    }
    for p in 0..m.pages {
        m.check(p, 2)?;
    }
    Ok(String::new())
}

/// A written page leaves the app with no event the pager could see (the
/// workload moves it out itself with UFFDIO_MOVE, as a kernel or pager bug
/// might), then the rest streams through until the evictor takes it
/// (`touch`: the app reads it back at once, while the pager holds it
/// resident). The pager must stop the app rather than let the page come
/// back as zeros or leave it faulting forever; reaching the final check
/// means it did not.
fn vanish(m: &Mem, touch: bool) -> Result<String, String> {
    use dmem_pager::sys;
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let buf = sys::Mapping::anonymous(PAGE).map_err(|e| format!("mmap: {e}"))?;
    let uffd = sys::uffd_for_moves(buf.addr(), PAGE).map_err(|e| format!("uffd: {e}"))?;
    let last = m.pages - 1;
    m.write(last, 2);
    let (moved, e) = sys::uffd_move(
        std::os::fd::AsRawFd::as_raw_fd(&uffd),
        buf.addr(),
        m.page(last) as u64,
        PAGE,
    );
    if moved != PAGE {
        return Err(format!("could not move the page away: {e:?}"));
    }
    if touch {
        m.check(last, 2)?;
    }
    for _ in 0..3 {
        for p in 0..last {
            m.check(p, 1)?;
        }
    }
    m.check(last, 2)?;
    Ok("the vanished page came back".into())
}

/// mremap moves managed pages (wherever they are) to a new address.
fn mremap(m: &Mem, s: &AppSession) -> Result<String, String> {
    let half = m.pages;
    for p in 0..half {
        m.write(p, 1);
    }
    // Move the first half of the data to the second half of the arena
    // (the arena is twice the workload size).
    let src = m.page(0).cast::<libc::c_void>();
    // SAFETY: the arena has 2 * pages pages; the destination is its upper half.
    let dst = unsafe { s.arena_ptr().add(half * PAGE) }.cast::<libc::c_void>();
    let n = half / 2 * PAGE;
    // SAFETY: both ranges lie inside the arena this process owns.
    let r = unsafe { libc::mremap(src, n, n, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, dst) };
    if r == libc::MAP_FAILED {
        return Err(format!(
            "mremap failed: {}",
            std::io::Error::last_os_error()
        ));
    }
    let moved = Mem {
        base: dst.cast(),
        pages: half / 2,
        seed: m.seed,
    };
    // Same content, at the new place (its page index is the old one).
    for p in 0..half / 2 {
        let ptr = moved.page(p);
        for w in 0..PAGE / 8 {
            // SAFETY: inside the moved range.
            let got = unsafe { ptr.wrapping_add(w).read_volatile() };
            if got != word(m.seed, p, w, 1) {
                return Err(format!("moved page {p} word {w}: got {got:#x}"));
            }
        }
    }
    for p in half / 2..half {
        m.check(p, 1)?;
    }
    Ok(String::new())
}

/// Writes every page, then overwrites every page with zeros (a memset of
/// a buffer being reused), then checks they all read as zeros.
fn zero_rewrite(m: &Mem) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    for p in 0..m.pages {
        let ptr = m.page(p);
        for w in 0..PAGE / 8 {
            // SAFETY: inside page p of the arena.
            unsafe { ptr.wrapping_add(w).write_volatile(0) };
        }
    }
    for p in 0..m.pages {
        m.check(p, 0)?;
    }
    Ok(String::new())
}

/// Read-modify-write passes (like a BLAS output array): write everything,
/// then `rounds` times read each page and write its next version, in a
/// random order each pass (demand faults, not prefetch streams).
fn rmw(m: &Mem, rounds: usize, seed: u64) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let mut rng = Rng(seed | 1);
    let mut order: Vec<usize> = (0..m.pages).collect();
    for r in 1..=rounds.max(1) as u64 {
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
        }
        for &p in &order {
            m.check(p, r)?;
            m.write(p, r + 1);
        }
    }
    Ok(String::new())
}

/// mremap of pages while they are being evicted: a chunk moves back and
/// forth between two places, `rounds * 20` times, while another thread
/// keeps the rest of the data cycling through the limit, so the chunk's
/// pages are often victims in flight when they move. After every move the
/// chunk must hold its data at its new place (never zeros or stale bytes,
/// never a hang).
fn mremap_churn(m: &Mem, s: &AppSession, rounds: usize) -> Result<String, String> {
    let chunk = (m.pages / 8).max(1);
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let stop = std::sync::atomic::AtomicBool::new(false);
    let home = m.page(0).cast::<libc::c_void>();
    // SAFETY: the arena has 2 * pages pages; the away place is its upper half.
    let away = unsafe { s.arena_ptr().add(m.pages * PAGE) }.cast::<libc::c_void>();
    let n = chunk * PAGE;
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for p in chunk..m.pages {
                    m.write(p, 1);
                }
            }
        });
        let r = (|| {
            let mut at = home;
            for i in 0..rounds.max(1) * 20 {
                let to = if at == home { away } else { home };
                // SAFETY: both ranges lie inside this process's arena; only
                // this thread touches the chunk.
                let r = unsafe {
                    libc::mremap(at, n, n, libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED, to)
                };
                if r == libc::MAP_FAILED {
                    return Err(format!(
                        "mremap {i} failed: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                at = to;
                let moved = Mem {
                    base: at.cast(),
                    pages: chunk,
                    seed: m.seed,
                };
                for p in 0..chunk {
                    let ptr = moved.page(p);
                    for w in 0..PAGE / 8 {
                        // SAFETY: inside the moved chunk.
                        let got = unsafe { ptr.wrapping_add(w).read_volatile() };
                        if got != word(m.seed, p, w, 1) {
                            return Err(format!(
                                "after move {i}: chunk page {p} word {w}: got {got:#x}"
                            ));
                        }
                    }
                }
            }
            Ok(String::new())
        })();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    })
}

/// munmap then mmap again at the same place (re-registered): zeros.
fn munmap(m: &Mem) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let n = m.pages / 4;
    let at = m.page(0).cast::<libc::c_void>();
    // SAFETY: the range is the first quarter of this process's arena.
    if unsafe { libc::munmap(at, n * PAGE) } != 0 {
        return Err("munmap failed".into());
    }
    for p in n..m.pages {
        m.check(p, 1)?;
    }
    Ok(format!(",\"unmapped_pages\":{n}"))
}

/// Verifies version 1 of every page, rewrites them all as version 2, and
/// verifies again.
fn check_rewrite_check(m: &Mem) -> Result<(), String> {
    for p in 0..m.pages {
        m.check(p, 1)?;
    }
    for p in 0..m.pages {
        m.write(p, 2);
    }
    for p in 0..m.pages {
        m.check(p, 2)?;
    }
    Ok(())
}

/// Write everything (most of it leaves for the memory node), say so, wait
/// for a line on stdin (or its end), then verify, rewrite and verify again.
fn hold(m: &Mem) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{{\"phase\":\"written\"}}");
        let _ = out.flush();
    }
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    check_rewrite_check(m)?;
    Ok(String::new())
}

/// A fork whose parent's session ends before the child takes its arena.
/// Write everything (most of it leaves for the memory node), hold the
/// session and take a fork snapshot as libdmem.so does before a fork, and
/// fork. The parent exits at once. The child waits until it is gone and
/// the pager has had time to end its session, then adopts the arena with
/// the snapshot and verifies every page, rewrites and verifies again
/// (without `adopt`, `--rounds 0`, it leaves without a session). Only the
/// child prints the result line (the parent prints nothing).
fn fork_orphan(
    m: &Mem,
    session: &AppSession,
    cfg: &AppConfig,
    adopt: bool,
) -> Result<String, String> {
    for p in 0..m.pages {
        m.write(p, 1);
    }
    let (hold, out) = session.hold().map_err(|e| format!("hold: {e}"))?;
    if out == 0 {
        return Err("no page was out of the process before the fork".into());
    }
    let key = session
        .snapshot_for_fork(&hold)
        .map_err(|e| format!("snapshot: {e}"))?;
    let _ = std::io::stdout().flush();
    let parent = std::process::id() as i32;
    // SAFETY: the child only closes descriptors, sleeps, and then runs
    // single-threaded code of its own (a new session's agent is a fresh
    // thread); nothing it calls waits on a lock the parent's other threads
    // held at the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // The parent: its session ends with it.
        // SAFETY: leaving at once, without running exit handlers.
        unsafe { libc::_exit(0) };
    }
    for fd in session.inherited_fds() {
        // SAFETY: the child's copies of the parent's uffd and agent
        // channel, which it never uses again.
        unsafe { libc::close(fd) };
    }
    // SAFETY: getppid has no preconditions.
    while unsafe { libc::getppid() } == parent {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The pager notices the parent's end within a poll interval.
    std::thread::sleep(std::time::Duration::from_secs(1));
    if !adopt {
        return Ok(",\"adopted\":false".into());
    }
    let child = AppSession::adopt(cfg, session, key).map_err(|e| format!("adopt: {e}"))?;
    drop(hold);
    check_rewrite_check(m)?;
    std::mem::forget(child);
    Ok(format!(",\"snapshot_pages_out\":{out}"))
}
