//! Helpers for the dmem end-to-end tests: real daemon processes, real
//! sockets, no mocks.
//!
//! - [`bin_path`] finds the release binaries next to the test executable and
//!   refuses to run tests against missing or stale ones.
//! - [`Memnode`] runs a `dmem-memnode` process on a port of its choosing and
//!   kills it on drop (printing its log if the test failed).
//! - [`Pager`] does the same for `dmem-pager` on a socket in a temporary
//!   directory; [`Workload`] runs the `dmem-workload` harness against it
//!   (to completion, or in the background as a [`RunningWorkload`]).
//! - [`TcpProxy`] sits between a pager and a memory node and can cut and
//!   restore their connections.
//! - [`raw::RawConn`] speaks the wire protocol by hand, for bad input.
//! - [`netns::Netns`] builds a network namespace joined to the host by a veth
//!   pair, for tests of non-loopback clients.
//!
//! Every helper that waits has a generous deadline: it exists so that a broken
//! daemon fails a test instead of hanging it, never to measure speed.

pub mod netns;
pub mod raw;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dmem_memnode::client::{Client, ClientConfig};
use dmem_memnode::protocol::Extent;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Deadline for anything that should happen "at once" (a daemon starting, a
/// reply arriving). Only a hang guard: healthy runs take milliseconds.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

pub const PAGE: usize = 4096;

/// Path of a workspace binary (`dmem-memnode`, `dmem`) built by
/// `cargo build --release --workspace`. The test executable lives in
/// `target/release/deps/`, the binaries one level up.
///
/// Panics with instructions when the binary is missing, or older than the
/// sources it is built from (a stale binary would test old code). Set
/// `DMEM_TESTS_ALLOW_STALE=1` to skip the staleness check.
pub fn bin_path(name: &str) -> PathBuf {
    static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let exe = std::env::current_exe().expect("cannot locate the test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is not inside target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} does not exist: run `cargo build --release --workspace` first",
        path.display()
    );
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    if !checked.iter().any(|n| n == name) {
        check_fresh(&path, name);
        checked.push(name.to_string());
    }
    path
}

fn check_fresh(bin: &Path, name: &str) {
    if std::env::var_os("DMEM_TESTS_ALLOW_STALE").is_some() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let crates: &[&str] = match name {
        "dmem-memnode" => &["memnode"],
        _ => &["memnode", "pager"],
    };
    let built = mtime(bin).expect("binary has an mtime");
    for c in crates {
        let dir = root.join(c);
        if let Some((src, t)) = newest_source(&dir) {
            assert!(
                t <= built,
                "{} is older than {}: run `cargo build --release --workspace` first \
                 (or set DMEM_TESTS_ALLOW_STALE=1 to test the old binary anyway)",
                bin.display(),
                src.display()
            );
        }
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Newest `.rs` file or `Cargo.toml` under `dir`.
fn newest_source(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut best: Option<(PathBuf, SystemTime)> = None;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension() == Some(OsStr::new("rs"))
                || p.file_name() == Some(OsStr::new("Cargo.toml"))
            {
                if let Some(t) = mtime(&p) {
                    if best.as_ref().is_none_or(|(_, b)| t > *b) {
                        best = Some((p, t));
                    }
                }
            }
        }
    }
    best
}

/// A directory removed on drop, unique to this process and call.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("dmem-tests-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` inside the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        std::fs::write(&p, contents).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running `dmem-memnode` process, killed (SIGKILL) on drop.
pub struct Memnode {
    child: Child,
    addr: SocketAddr,
    _stdout: BufReader<ChildStdout>,
    log: PathBuf,
    _dir: TempDir,
}

impl Memnode {
    /// Starts `dmem-memnode` with `args`, adding `--listen 127.0.0.1:0` and
    /// `--capacity 64M` unless `args` give them, and waits for its
    /// "listening on" line.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Memnode {
        Memnode::start_wrapped::<&str, S>(&[], args)
    }

    /// Like [`Memnode::start`], but runs the binary under `wrapper` (for
    /// example `ip netns exec NS`).
    pub fn start_wrapped<W: AsRef<OsStr>, S: AsRef<OsStr>>(wrapper: &[W], args: &[S]) -> Memnode {
        Memnode::try_start_wrapped(wrapper, args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Memnode::start_wrapped`], but a daemon that refuses to start
    /// is an `Err` carrying its log, not a panic.
    pub fn try_start_wrapped<W: AsRef<OsStr>, S: AsRef<OsStr>>(
        wrapper: &[W],
        args: &[S],
    ) -> Result<Memnode, String> {
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        let mut full: Vec<&OsStr> = Vec::new();
        if !args.contains(&OsStr::new("--listen")) {
            full.extend([OsStr::new("--listen"), OsStr::new("127.0.0.1:0")]);
        }
        if !args.contains(&OsStr::new("--capacity")) {
            full.extend([OsStr::new("--capacity"), OsStr::new("64M")]);
        }
        full.extend(&args);
        // Lets the whole suite run against another configuration, e.g.
        // DMEM_TESTS_MEMNODE_ARGS="--io uring". A test that picks its own
        // I/O mode (the netns test covers both) keeps it.
        let extra = std::env::var("DMEM_TESTS_MEMNODE_ARGS").unwrap_or_default();
        let own_io = args.contains(&OsStr::new("--io"));
        let mut extra = extra.split_whitespace().map(OsStr::new);
        while let Some(a) = extra.next() {
            if own_io && a == "--io" {
                extra.next(); // drop its value too
                continue;
            }
            full.push(a);
        }
        let bin = bin_path("dmem-memnode");
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        cmd.args(&full);
        Memnode::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Result<Memnode, String> {
        let dir = TempDir::new("memnode");
        let log = dir.path().join("memnode.log");
        let log_file = std::fs::File::create(&log).expect("create memnode log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .env("RUST_LOG", "debug");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let n = r.read_line(&mut line);
            let _ = tx.send((n.map(|_| line), r));
        });
        let (line, stdout) = match rx.recv_timeout(HANG_GUARD) {
            Ok((Ok(line), r)) if !line.is_empty() => (line, r),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let why = match other {
                    Ok(_) => "it exited without printing its address".to_string(),
                    Err(_) => format!("it printed nothing within {HANG_GUARD:?}"),
                };
                return Err(format!(
                    "dmem-memnode did not start ({why}): {cmd:?}\n--- log ---\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ));
            }
        };
        let addr = line
            .trim()
            .strip_prefix("dmem-memnode listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from dmem-memnode: {line:?}"));
        Ok(Memnode {
            child,
            addr,
            _stdout: stdout,
            log,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Client configuration for this node, without a token.
    pub fn config(&self) -> ClientConfig {
        ClientConfig::new(self.addr_string())
    }

    /// A new session on this node, without a token.
    pub fn client(&self) -> Client {
        Client::connect(self.config()).expect("connect to memnode")
    }

    /// A new session on this node, authenticated with `token`.
    pub fn client_with_token(&self, token: &[u8]) -> Client {
        let mut cfg = self.config();
        cfg.token = Some(token.to_vec());
        Client::connect(cfg).expect("connect to memnode with token")
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).expect("signal memnode");
    }

    /// Whether the process has exited (without reaping a still-running one).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit; panics after `guard`.
    pub fn wait_exit(&mut self, guard: Duration) -> ExitStatus {
        let deadline = Instant::now() + guard;
        loop {
            if let Some(st) = self.try_exit_status() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "dmem-memnode (pid {}) still running after {guard:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident set size of the daemon, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kb * 1024
    }

    /// Panics unless the process is still running.
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_exit_status() {
            panic!("dmem-memnode died ({st}); log:\n{}", self.log());
        }
    }
}

impl Drop for Memnode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(16 << 10);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            eprintln!(
                "--- dmem-memnode {} log (tail) ---\n{}",
                self.addr,
                &log[start..]
            );
        }
    }
}

/// A loopback port that was free a moment ago (bind port 0, then close).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`; panics after `guard` with
/// `what` (a hang guard for asynchronous effects such as lease reaping).
pub fn eventually<T>(guard: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + guard;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {guard:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fetches `http://addr/metrics`; returns the body.
pub fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to metrics endpoint");
    s.set_read_timeout(Some(HANG_GUARD)).expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
        .expect("send metrics request");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read metrics response");
    let (head, body) = resp.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "metrics endpoint answered {head:?}"
    );
    body.to_string()
}

/// The value of series `series` (name with labels, exactly as exposed) in a
/// Prometheus text body; panics if the series is absent.
pub fn metric(body: &str, series: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("series {series} not found in metrics:\n{body}"))
}

/// A small, fast, seedable PRNG (SplitMix64) for test data. The seed is
/// printed so that a failure can be replayed with `DMEM_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn new(label: &str) -> Rng {
        let seed = std::env::var("DMEM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let s = dmem_memnode::auth::random_secret();
                u64::from_le_bytes(s[..8].try_into().expect("8 bytes"))
            });
        eprintln!("{label}: DMEM_TEST_SEED={seed}");
        Rng(seed)
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// Extents for pages `first..first+count` of `slab`, one page each.
pub fn page_extents(slab: u32, first: usize, count: usize) -> Vec<Extent> {
    (first..first + count)
        .map(|i| Extent::new(slab, (i * PAGE) as u64, PAGE as u32))
        .collect()
}

/// Asserts two buffers are equal, reporting the first difference (not a
/// multi-megabyte dump).
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (page {}): got {:#04x}, want {:#04x}",
            i / PAGE,
            got[i],
            want[i]
        );
    }
}

/// Checks that a node serves a brand-new client correctly: a fresh session
/// leases a slab, writes random pages, reads them back byte for byte, and
/// closes. Used after every bad input.
#[track_caller]
pub fn assert_serves(addr: SocketAddr, token: Option<&[u8]>) {
    let mut cfg = ClientConfig::new(addr.to_string());
    cfg.token = token.map(<[u8]>::to_vec);
    let c = Client::connect(cfg).expect("a good client must still connect");
    let mut rng = Rng::seeded(u64::from(addr.port()) ^ 0x5eed);
    c.alloc(7, (16 * PAGE) as u64).expect("alloc");
    let ext = page_extents(7, 0, 16);
    let data = rng.bytes(16 * PAGE);
    c.write(&ext, &data).expect("write");
    let back = c.read(&ext).expect("read");
    assert_same(&back, &data, "good client after bad input");
    c.close_session().expect("close session");
}

/// A client connected before some bad input, with data written, to check
/// afterwards that the node kept serving it ("keeps serving everyone else").
pub struct Bystander {
    pub client: Client,
    ext: Vec<Extent>,
    data: Vec<u8>,
}

impl Bystander {
    pub fn new(node: &Memnode, token: Option<&[u8]>) -> Bystander {
        let mut cfg = node.config();
        cfg.token = token.map(<[u8]>::to_vec);
        let client = Client::connect(cfg).expect("bystander connects");
        client.alloc(1, (8 * PAGE) as u64).expect("bystander alloc");
        let ext = page_extents(1, 0, 8);
        let data = Rng::new("bystander").bytes(8 * PAGE);
        client.write(&ext, &data).expect("bystander write");
        Bystander { client, ext, data }
    }

    /// The bystander's data is intact, on the same connection.
    #[track_caller]
    pub fn check(&self) {
        let back = self.client.read(&self.ext).expect("bystander read");
        assert_same(&back, &self.data, "bystander data");
        assert_eq!(
            self.client.reconnects(),
            0,
            "bystander's connection must not have been dropped"
        );
    }
}

/// Runs the `dmem` CLI with `args`; returns (exit status, stdout, stderr).
pub fn run_dmem<S: AsRef<OsStr>>(args: &[S]) -> (ExitStatus, String, String) {
    run_cmd(Command::new(bin_path("dmem")).args(args))
}

/// Runs a command to completion with a hang guard.
pub fn run_cmd(cmd: &mut Command) -> (ExitStatus, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = t_out.join().expect("stdout reader");
    let stderr = t_err.join().expect("stderr reader");
    (status, stdout, stderr)
}

/// Whether the current process runs as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Prints a skip notice on stderr. (`.config/nextest.toml` shows the output
/// of tests that may skip even when they pass, so the notice is seen.)
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED: {test}: {reason}");
}

/// Hang guard for one `dmem-workload` run: runs take seconds; this only
/// turns a stuck pager into a failure before nextest's own timeout.
pub const WORKLOAD_GUARD: Duration = Duration::from_secs(90);

/// Starts a daemon whose first stdout line says it is ready; its stderr
/// goes to `<dir>/<name>.log`. Returns the first line.
fn spawn_daemon(
    mut cmd: Command,
    name: &str,
    dir: TempDir,
) -> Result<(Child, String, BufReader<ChildStdout>, PathBuf, TempDir), String> {
    let log = dir.path().join(format!("{name}.log"));
    let log_file = std::fs::File::create(&log).expect("create daemon log");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let n = r.read_line(&mut line);
        let _ = tx.send((n.map(|_| line), r));
    });
    match rx.recv_timeout(HANG_GUARD) {
        Ok((Ok(line), r)) if !line.is_empty() => Ok((child, line, r, log, dir)),
        other => {
            let _ = child.kill();
            let status = child.wait().ok();
            let why = match other {
                Ok(_) => format!("it exited ({status:?}) without saying it was ready"),
                Err(_) => format!("it printed nothing within {HANG_GUARD:?}"),
            };
            Err(format!(
                "{name} did not start ({why}): {cmd:?}\n--- log ---\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }
}

/// Last 16 KiB of a log, on a character boundary.
fn log_tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(16 << 10);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

/// A running `dmem-pager` process, killed (SIGKILL) on drop.
pub struct Pager {
    child: Child,
    socket: PathBuf,
    _stdout: BufReader<ChildStdout>,
    log: PathBuf,
    _dir: TempDir,
}

impl Pager {
    /// Starts `dmem-pager` with `args`, adding `--socket` (in a temporary
    /// directory of its own) and `--local-limit 16M` unless `args` give
    /// them, and waits for its "listening on" line.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Pager {
        Pager::try_start(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Pager::start`], but a pager that refuses to start is an
    /// `Err` carrying its log.
    pub fn try_start<S: AsRef<OsStr>>(args: &[S]) -> Result<Pager, String> {
        Pager::try_start_env(args, &[])
    }

    /// Like [`Pager::start`], with extra environment variables.
    pub fn start_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Pager {
        Pager::try_start_env(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_start_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &str)]) -> Result<Pager, String> {
        let args: Vec<&OsStr> = args.iter().map(AsRef::as_ref).collect();
        let dir = TempDir::new("pager");
        let default_socket = dir.path().join("pager.sock");
        let mut cmd = Command::new(bin_path("dmem-pager"));
        if !args.contains(&OsStr::new("--socket")) {
            cmd.arg("--socket").arg(&default_socket);
        }
        if !args.contains(&OsStr::new("--local-limit")) {
            cmd.args(["--local-limit", "16M"]);
        }
        cmd.args(&args).envs(env.iter().copied());
        let (child, line, stdout, log, dir) = spawn_daemon(cmd, "dmem-pager", dir)?;
        let socket = line
            .trim()
            .strip_prefix("dmem-pager listening on ")
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("unexpected first line from dmem-pager: {line:?}"));
        Ok(Pager {
            child,
            socket,
            _stdout: stdout,
            log,
            _dir: dir,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `dmem stats --json` against this pager (the CLI, as users run it).
    pub fn stats_cli(&self) -> serde_json::Value {
        let (st, out, err) = run_dmem(&[
            OsStr::new("stats"),
            OsStr::new("--socket"),
            self.socket.as_os_str(),
            OsStr::new("--json"),
        ]);
        assert!(st.success(), "dmem stats failed ({st}): {err}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("dmem stats printed bad JSON ({e}): {out}"))
    }

    /// The same figures through the library call (cheap enough to poll).
    pub fn stats(&self) -> serde_json::Value {
        dmem_pager::report::fetch_stats(&self.socket)
            .unwrap_or_else(|e| panic!("cannot get pager stats: {e}\n{}", log_tail(&self.log())))
    }

    /// A workload against this pager.
    pub fn workload(&self, scenario: &str, size: &str) -> Workload {
        Workload::new(&self.socket, scenario, size)
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid() as i32), sig).expect("signal pager");
    }

    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit; panics after `guard`.
    pub fn wait_exit(&mut self, guard: Duration) -> ExitStatus {
        let deadline = Instant::now() + guard;
        loop {
            if let Some(st) = self.try_exit_status() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "dmem-pager (pid {}) still running after {guard:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics unless the process is still running.
    #[track_caller]
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.try_exit_status() {
            panic!("dmem-pager died ({st}); log:\n{}", log_tail(&self.log()));
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- dmem-pager {} log (tail) ---\n{}",
                self.socket.display(),
                log_tail(&self.log())
            );
        }
    }
}

/// One `dmem-workload` invocation (see tests/src/bin/dmem-workload.rs).
#[derive(Debug, Clone)]
pub struct Workload {
    args: Vec<String>,
}

impl Workload {
    pub fn new(socket: &Path, scenario: &str, size: &str) -> Workload {
        Workload {
            args: vec![
                "--socket".into(),
                socket.display().to_string(),
                "--scenario".into(),
                scenario.into(),
                "--size".into(),
                size.into(),
            ],
        }
    }

    /// Adds `--key value`.
    pub fn arg(mut self, key: &str, value: impl ToString) -> Workload {
        self.args.push(key.into());
        self.args.push(value.to_string());
        self
    }

    /// Runs it in the background, stdin, stdout and stderr piped.
    pub fn spawn(&self) -> RunningWorkload {
        let mut child = Command::new(bin_path("dmem-workload"))
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dmem-workload {:?}: {e}", self.args));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        let stdout = std::sync::Arc::new(Mutex::new(String::new()));
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let (o, e) = (
            std::sync::Arc::clone(&stdout),
            std::sync::Arc::clone(&stderr),
        );
        let t_out = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                o.lock().unwrap().push_str(&format!("{line}\n"));
                let _ = tx.send(line);
            }
        });
        let t_err = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                e.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        RunningWorkload {
            child,
            args: self.args.clone(),
            lines,
            stdout,
            stderr,
            readers: vec![t_out, t_err],
        }
    }

    /// Runs it to completion (stdin closed: `hold` does not wait).
    pub fn run(&self) -> WorkloadOutcome {
        let mut w = self.spawn();
        w.release();
        w.wait()
    }
}

/// A `dmem-workload` process running in the background.
pub struct RunningWorkload {
    child: Child,
    args: Vec<String>,
    lines: mpsc::Receiver<String>,
    stdout: std::sync::Arc<Mutex<String>>,
    stderr: std::sync::Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl RunningWorkload {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stdout line containing `what`; panics if the process
    /// ends first, or after [`WORKLOAD_GUARD`].
    #[track_caller]
    pub fn wait_for_line(&mut self, what: &str) -> String {
        let deadline = Instant::now() + WORKLOAD_GUARD;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    assert!(
                        Instant::now() < deadline,
                        "dmem-workload printed no {what:?} within {WORKLOAD_GUARD:?}; stderr:\n{}",
                        self.stderr()
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().expect("wait");
                    panic!(
                        "dmem-workload ended ({st}) before printing {what:?}; stderr:\n{}",
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Lets a `hold` workload go on (and closes its stdin).
    pub fn release(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
    }

    /// The arena (base, length) the harness reported on stderr.
    pub fn arena(&self) -> (u64, u64) {
        eventually(HANG_GUARD, "dmem-workload to report its arena", || {
            let err = self.stderr();
            let rest = err.split("dmem-workload: arena ").nth(1)?;
            let spec = rest.split_whitespace().next()?;
            let (base, len) = spec.split_once('+')?;
            let base = u64::from_str_radix(base.trim_start_matches("0x"), 16).ok()?;
            Some((base, len.parse().ok()?))
        })
    }

    /// Resident bytes of the arena mapping now (see [`arena_rss`]).
    pub fn arena_rss(&self, arena: (u64, u64)) -> Option<u64> {
        arena_rss(self.pid(), arena)
    }

    /// Whether it has exited (without reaping a running one).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for it to exit; kills it and panics after [`WORKLOAD_GUARD`].
    pub fn wait(self) -> WorkloadOutcome {
        self.wait_guarded(WORKLOAD_GUARD)
    }

    /// Waits for it to exit; kills it and panics after `guard`.
    pub fn wait_guarded(mut self, guard: Duration) -> WorkloadOutcome {
        let deadline = Instant::now() + guard;
        let status = loop {
            if let Some(st) = self.try_wait() {
                break st;
            }
            if Instant::now() >= deadline {
                let threads = thread_states(self.pid());
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "dmem-workload {:?} did not finish within {guard:?}; its threads \
                     (tid name kernel-wait-channel):\n{threads}stderr:\n{}",
                    self.args,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
        WorkloadOutcome {
            status,
            args: self.args.clone(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for RunningWorkload {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One line per thread of `pid`: tid, name and the kernel function it
/// sleeps in (`/proc/PID/task/TID/wchan`), to say where a hung process is
/// stuck.
pub fn thread_states(pid: u32) -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| {
            std::fs::read_to_string(p.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push_str(&format!(
            "  {} {} {}\n",
            t.file_name().to_string_lossy(),
            read("comm"),
            read("wchan")
        ));
    }
    out
}

/// Resident bytes of the mapping `(base, len)` of process `pid` now, from
/// /proc/PID/smaps (`None` once the process is gone or the mapping is not
/// found whole, e.g. after the process split it with munmap or mremap).
pub fn arena_rss(pid: u32, arena: (u64, u64)) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let head = format!("{:x}-{:x} ", arena.0, arena.0 + arena.1);
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    lines.next()?;
    let kb: u64 = lines
        .find_map(|l| l.strip_prefix("Rss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    Some(kb * 1024)
}

/// [`arena_rss`] of a process stopped for the reading (SIGSTOP, then
/// SIGCONT): smaps walks the page tables while they change, so a process
/// paging through memory in address order, whose evictions fall behind
/// the walk and whose installs ahead of it, is over-counted by as many
/// pages as it brought in during the walk (seen: 100-500 pages over a
/// 16 MiB limit on a busy 2-vCPU machine). Stopped, its agent removes
/// nothing and its threads fault on nothing new, so every page counted is
/// present when the walk ends. `None` where it could not be stopped at
/// once (a thread still inside a fault the pager is serving): that sample
/// is skipped.
pub fn arena_rss_stopped(pid: u32, arena: (u64, u64)) -> Option<u64> {
    let p = Pid::from_raw(pid as i32);
    kill(p, Signal::SIGSTOP).ok()?;
    let stopped = all_threads_stopped(pid, Duration::from_millis(50));
    let rss = if stopped { arena_rss(pid, arena) } else { None };
    let _ = kill(p, Signal::SIGCONT);
    rss
}

/// Waits up to `guard` for every thread of `pid` to be stopped.
fn all_threads_stopped(pid: u32, guard: Duration) -> bool {
    let deadline = Instant::now() + guard;
    loop {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return false;
        };
        let all = tasks.flatten().all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(") ")
                        .map(|(_, rest)| rest.starts_with(['T', 't']))
                })
                .unwrap_or(true)
        });
        if all {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// How a `dmem-workload` run ended.
#[derive(Debug)]
pub struct WorkloadOutcome {
    pub status: ExitStatus,
    pub args: Vec<String>,
    pub stdout: String,
    pub stderr: String,
}

impl WorkloadOutcome {
    /// Panics unless it exited 0 having verified everything; returns its
    /// JSON line.
    #[track_caller]
    pub fn assert_ok(&self) -> serde_json::Value {
        assert!(
            self.status.success(),
            "dmem-workload {:?} failed ({}):\n--- stderr ---\n{}--- stdout ---\n{}",
            self.args,
            self.status,
            self.stderr,
            self.stdout
        );
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.contains("\"ok\":true"))
            .unwrap_or_else(|| panic!("no result line from dmem-workload: {}", self.stdout));
        serde_json::from_str(line).expect("dmem-workload result is JSON")
    }

    /// The signal that killed it, if any.
    pub fn signal(&self) -> Option<i32> {
        std::os::unix::process::ExitStatusExt::signal(&self.status)
    }
}

/// Reads a non-negative integer at `path` (e.g. `["faults", "remote"]`)
/// in a stats JSON object; panics if missing.
#[track_caller]
pub fn stat(v: &serde_json::Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    cur.as_u64()
        .unwrap_or_else(|| panic!("stats have no integer at {path:?}: {v:#}"))
}

/// The `apps` entry of process `pid` in a stats JSON, if attached.
pub fn app_stats(v: &serde_json::Value, pid: u32) -> Option<&serde_json::Value> {
    v["apps"]
        .as_array()?
        .iter()
        .find(|a| a["pid"].as_u64() == Some(u64::from(pid)))
}

/// A TCP proxy on loopback in front of `upstream`, whose connections can
/// be cut (both directions shut down, and new connections refused: accepted
/// and closed at once) and restored. Stands in for a network outage
/// between a pager and a memory node that both keep running.
pub struct TcpProxy {
    addr: SocketAddr,
    state: std::sync::Arc<ProxyState>,
}

struct ProxyState {
    up: std::sync::atomic::AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    cuts: AtomicU64,
    accepted: AtomicU64,
}

impl TcpProxy {
    pub fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = std::sync::Arc::new(ProxyState {
            up: std::sync::atomic::AtomicBool::new(true),
            conns: Mutex::new(Vec::new()),
            cuts: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let st = std::sync::Arc::clone(&state);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { continue };
                if !st.up.load(Ordering::SeqCst) {
                    drop(down);
                    continue;
                }
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                st.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = down.set_nodelay(true);
                let _ = up.set_nodelay(true);
                let pairs = [
                    (down.try_clone(), up.try_clone()),
                    (up.try_clone(), down.try_clone()),
                ];
                {
                    let mut c = st.conns.lock().unwrap();
                    c.push(down);
                    c.push(up);
                }
                for pair in pairs {
                    if let (Ok(mut from), Ok(mut to)) = pair {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        TcpProxy { addr, state }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Breaks every connection and refuses new ones until [`restore`].
    ///
    /// [`restore`]: TcpProxy::restore
    pub fn cut(&self) {
        self.state.up.store(false, Ordering::SeqCst);
        self.state.cuts.fetch_add(1, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.state.up.store(true, Ordering::SeqCst);
    }

    /// Connections passed through so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::SeqCst)
    }
}

/// Word `w` of page `p` as `dmem-workload` writes it (seed, version `v`):
/// never zero, so a zeroed page never passes, and known to tests that look
/// for it where it should (or should not) be.
pub fn page_word(seed: u64, p: usize, w: usize, v: u64) -> u64 {
    let mut x = seed ^ (p as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (v << 48) ^ (w as u64);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x | 1
}

/// Where the 8-byte `words` occur (8-aligned) in the writable memory of
/// process `pid`, read through `/proc/PID/mem` (root): address and word.
pub fn find_words(pid: u32, words: &std::collections::HashSet<u64>) -> Vec<(u64, u64)> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut found = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let (a, b) = range.split_once('-').expect("range");
        let (a, b) = (
            u64::from_str_radix(a, 16).expect("hex"),
            u64::from_str_radix(b, 16).expect("hex"),
        );
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(buf.len());
            if mem.read_exact_at(&mut buf[..n], at).is_ok() {
                for (k, w) in buf[..n].chunks_exact(8).enumerate() {
                    let v = u64::from_ne_bytes(w.try_into().expect("8 bytes"));
                    if words.contains(&v) {
                        found.push((at + 8 * k as u64, v));
                    }
                }
            }
            at += n as u64;
        }
    }
    found
}

/// How many distinct `words` occur in process `pid`'s writable memory.
pub fn words_in_memory(pid: u32, words: &std::collections::HashSet<u64>) -> usize {
    let distinct: std::collections::HashSet<u64> =
        find_words(pid, words).into_iter().map(|(_, w)| w).collect();
    distinct.len()
}

/// Flips every bit of one byte at each of `addrs` in process `pid`, through
/// `/proc/PID/mem`: a memory node whose storage went bad.
pub fn corrupt_memory(pid: u32, addrs: &[u64]) {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open /proc/PID/mem for writing");
    for &a in addrs {
        let mut b = [0u8; 1];
        mem.read_exact_at(&mut b, a).expect("read a byte");
        b[0] ^= 0xff;
        mem.write_all_at(&b, a).expect("write a byte");
    }
}

/// A zram swap device for the length of a test (root only): Linux may then
/// swap out pages of a managed arena, as on any machine with swap. Removed
/// again on drop. `None` (with the reason) where it cannot be set up.
pub struct ZramSwap {
    dev: String,
}

impl ZramSwap {
    pub fn setup(size: &str) -> Result<ZramSwap, String> {
        if !is_root() {
            return Err("needs root to set up a swap device".into());
        }
        // zram may be built in; a failed modprobe shows in zramctl's error.
        let _ = Command::new("modprobe").arg("zram").output();
        let (st, out, err) = run_cmd(Command::new("zramctl").args(["--find", "--size", size]));
        if !st.success() {
            return Err(format!("zramctl --find failed: {err}"));
        }
        let z = ZramSwap {
            dev: out.trim().to_owned(),
        };
        for cmd in [["mkswap", z.dev.as_str()], ["swapon", z.dev.as_str()]] {
            let (st, _, err) = run_cmd(Command::new(cmd[0]).arg(cmd[1]));
            if !st.success() {
                return Err(format!("{} {} failed: {err}", cmd[0], cmd[1]));
            }
        }
        Ok(z)
    }
}

impl Drop for ZramSwap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.dev).output();
        let _ = Command::new("zramctl")
            .args(["--reset", &self.dev])
            .output();
    }
}

/// Pages swapped out since boot, all processes (`pswpout`).
pub fn pages_swapped_out() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("pswpout ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Asks Linux to swap out `[start, start+len)` of process `pid` now
/// (`process_madvise(MADV_PAGEOUT)`). Returns the bytes it acted on.
pub fn page_out(pid: u32, start: u64, len: u64) -> Result<u64, std::io::Error> {
    // SAFETY: plain syscall, no memory passed.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let iov = libc::iovec {
        iov_base: start as *mut libc::c_void,
        iov_len: len as usize,
    };
    // SAFETY: the iovec lives across the call and describes the other
    // process's memory, which the kernel checks and this one never touches.
    let n = unsafe {
        libc::syscall(
            libc::SYS_process_madvise,
            pidfd as libc::c_int,
            &iov as *const libc::iovec,
            1usize,
            libc::MADV_PAGEOUT,
            0u32,
        )
    };
    let e = std::io::Error::last_os_error();
    // SAFETY: closes the descriptor opened above, used by nothing else.
    unsafe { libc::close(pidfd as libc::c_int) };
    if n < 0 {
        Err(e)
    } else {
        Ok(n as u64)
    }
}
