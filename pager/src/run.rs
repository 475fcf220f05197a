//! `dmem run`: runs a program under libdmem.so. Uses the host's pager when
//! one answers (and no memory node was named); otherwise starts a private
//! pager for the run, and, with no `--memnode`, a memory node on loopback
//! too, so that the command works on a fresh machine. Forwards signals,
//! returns the program's exit status, prints a summary and cleans up what
//! it started.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use dmem_memnode::size::format_size;
use serde_json::Value;
use thiserror::Error;

use crate::app::connect_pager;
use crate::report::fetch_stats;
use crate::sys;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("{0} not found next to the dmem binary ({1}); build with `cargo build --release`")]
    Missing(&'static str, PathBuf),
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} did not come up: {why}")]
    NotReady { what: String, why: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default)]
pub struct RunConfig {
    pub local_limit: Option<u64>,
    pub memnodes: Vec<String>,
    pub token_file: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub stats_json: Option<PathBuf>,
    /// `--replicas` of a pager this run starts (0 counts as 1).
    pub replicas: usize,
    /// `--encrypt` for a pager this run starts.
    pub encrypt: bool,
    pub quiet: bool,
    pub cmd: Vec<String>,
}

/// A daemon this run started; killed and reaped on drop.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        sys::signal_process(self.child.id() as i32, libc::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        tracing::warn!("{} did not stop on SIGTERM; killed", self.what);
    }
}

/// Everything the run started, torn down in reverse order on drop.
struct Started {
    pager: Option<Daemon>,
    memnodes: Vec<Daemon>,
    dir: Option<PathBuf>,
}

impl Drop for Started {
    fn drop(&mut self) {
        self.pager.take();
        self.memnodes.clear();
        if let Some(d) = self.dir.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn sibling(name: &'static str) -> Result<PathBuf, RunError> {
    let exe = std::env::current_exe().unwrap_or_default();
    let p = exe.parent().unwrap_or(Path::new(".")).join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(RunError::Missing(name, p))
    }
}

/// Runs the program; returns its exit status.
pub fn run(cfg: &RunConfig) -> Result<ExitStatus, RunError> {
    let lib = sibling("libdmem.so")?;
    let mut started = Started {
        pager: None,
        memnodes: Vec::new(),
        dir: None,
    };
    let socket = match existing_pager(cfg) {
        Some(s) => s,
        None => start_private(cfg, &mut started)?,
    };
    // Signals meant for the program are forwarded by a thread, so they are
    // blocked here before the program starts; the program itself starts
    // with an empty mask.
    let forwarded = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];
    sys::block_signals(&forwarded);
    let mut cmd = Command::new(&cfg.cmd[0]);
    sys::clean_signals_on_spawn(&mut cmd, None);
    cmd.args(&cfg.cmd[1..])
        .env("LD_PRELOAD", preload_value(&lib))
        .env("DMEM_SOCKET", &socket);
    if std::env::var_os("DMEM_REQUIRE").is_none() {
        cmd.env("DMEM_REQUIRE", "1");
    }
    if let Some(l) = cfg.local_limit {
        cmd.env("DMEM_LOCAL_LIMIT", l.to_string());
    }
    let t0 = Instant::now();
    let mut child = cmd.spawn().map_err(|source| RunError::Spawn {
        what: cfg.cmd[0].clone(),
        source,
    })?;
    let pid = child.id() as i32;
    std::thread::spawn(move || loop {
        if let Some((sig, from_tty)) = sys::wait_signal(&forwarded) {
            // The terminal already sent its SIGINT/SIGQUIT to the program
            // (same process group); only relay signals sent to dmem itself.
            if !from_tty {
                sys::signal_process(pid, sig);
            }
        }
    });
    let status = child.wait().map_err(|source| RunError::Spawn {
        what: cfg.cmd[0].clone(),
        source,
    })?;
    let wall = t0.elapsed();
    let figures = app_figures(&socket, pid, started.pager.is_some());
    if let Some(path) = &cfg.stats_json {
        let mut v = figures.clone().unwrap_or(Value::Null);
        if v.is_object() {
            v["wall_seconds"] = serde_json::json!(wall.as_secs_f64());
            v["exit_code"] = serde_json::json!(exit_code(status));
        }
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|source| RunError::Write {
            path: path.clone(),
            source,
        })?;
    }
    if !cfg.quiet {
        match &figures {
            Some(v) => eprintln!("{}", summary(v, wall)),
            None => eprintln!("dmem: the run's figures are not available from the pager"),
        }
    }
    drop(started);
    Ok(status)
}

/// The socket of a pager to use, when one answers and the run does not
/// ask for its own memory nodes.
fn existing_pager(cfg: &RunConfig) -> Option<PathBuf> {
    // Nodes or replicas asked for: a pager of this run's own has them.
    if !cfg.memnodes.is_empty() || cfg.replicas > 1 || cfg.encrypt {
        return None;
    }
    let s = cfg
        .socket
        .clone()
        .unwrap_or_else(crate::daemon::default_socket);
    connect_pager(&s).is_ok().then_some(s)
}

/// A new directory only this user can enter, for the run's sockets and
/// logs. Never one that exists already: another user could have made it
/// (the temp dir is shared) and would then see, or replace, the pager's
/// socket.
fn private_dir() -> Result<PathBuf, RunError> {
    use std::os::unix::fs::DirBuilderExt;
    let mut last = None;
    for _ in 0..16 {
        let mut r = [0u8; 8];
        let _ = getrandom::getrandom(&mut r);
        let dir = std::env::temp_dir().join(format!(
            "dmem-run-{}-{:016x}",
            std::process::id(),
            u64::from_ne_bytes(r)
        ));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((dir, e)),
            Err(source) => return Err(RunError::Write { path: dir, source }),
        }
    }
    let (path, source) = last.expect("tried at least once");
    Err(RunError::Write { path, source })
}

fn start_private(cfg: &RunConfig, started: &mut Started) -> Result<PathBuf, RunError> {
    let dir = private_dir()?;
    started.dir = Some(dir.clone());
    let mut memnodes = cfg.memnodes.clone();
    let mut token = cfg.token_file.clone();
    if memnodes.is_empty() {
        // Lends what is free (lazily: an idle node uses nothing); no token,
        // so it accepts loopback clients only.
        let available = dmem_memnode::sys::mem_available().unwrap_or(0);
        let n = cfg.replicas.max(1);
        let capacity = (available / 2 / n as u64).max(256 << 20);
        for i in 0..n {
            let port = sys::free_loopback_port().map_err(|e| RunError::NotReady {
                what: "memory node".into(),
                why: format!("no free loopback port: {e}"),
            })?;
            let addr = format!("127.0.0.1:{port}");
            let mut c = Command::new(sibling("dmem-memnode")?);
            c.args(["--listen", &addr, "--capacity", &capacity.to_string()]);
            let log = dir.join(format!("memnode{i}.log"));
            started.memnodes.push(spawn_daemon(c, "memory node", &log)?);
            wait_ready("memory node", &log, started.memnodes.last_mut(), || {
                std::net::TcpStream::connect(&addr).is_ok()
            })?;
            memnodes.push(addr);
        }
        token = None;
    }
    let socket = dir.join("pager.sock");
    let mut c = Command::new(sibling("dmem-pager")?);
    c.arg("--socket").arg(&socket);
    c.args([
        "--local-limit",
        &cfg.local_limit.unwrap_or(1 << 30).to_string(),
    ]);
    for m in &memnodes {
        c.args(["--memnode", m]);
    }
    c.args(["--replicas", &cfg.replicas.max(1).to_string()]);
    if cfg.encrypt {
        c.arg("--encrypt");
    }
    if let Some(t) = &token {
        c.arg("--token-file").arg(t);
    }
    let log = dir.join("pager.log");
    started.pager = Some(spawn_daemon(c, "pager", &log)?);
    wait_ready("pager", &log, started.pager.as_mut(), || {
        connect_pager(&socket).is_ok()
    })?;
    Ok(socket)
}

fn spawn_daemon(mut c: Command, what: &'static str, log: &Path) -> Result<Daemon, RunError> {
    // A daemon of this run stops with it, even when dmem is SIGKILLed.
    sys::clean_signals_on_spawn(&mut c, Some(libc::SIGTERM));
    let out = std::fs::File::create(log).map_err(|source| RunError::Write {
        path: log.to_owned(),
        source,
    })?;
    let err = out.try_clone().map_err(|source| RunError::Write {
        path: log.to_owned(),
        source,
    })?;
    let child = c
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| RunError::Spawn {
            what: what.into(),
            source,
        })?;
    Ok(Daemon { child, what })
}

fn wait_ready(
    what: &str,
    log: &Path,
    daemon: Option<&mut Daemon>,
    mut ready: impl FnMut() -> bool,
) -> Result<(), RunError> {
    let Some(d) = daemon else {
        return Ok(());
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20) {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(st)) = d.child.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return Err(RunError::NotReady {
                what: what.into(),
                why: format!("it exited ({st}): {}", text.trim()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(RunError::NotReady {
        what: what.into(),
        why: "not answering after 20 s".into(),
    })
}

/// libdmem.so first, then whatever the environment already preloads.
fn preload_value(lib: &Path) -> String {
    match std::env::var("LD_PRELOAD") {
        Ok(v) if !v.is_empty() => format!("{}:{v}", lib.display()),
        _ => lib.display().to_string(),
    }
}

/// The program's figures: the whole pager's totals when the pager was
/// private to this run (so a forked or exec'd process tree is counted
/// whole), else the program's own ended session.
fn app_figures(socket: &Path, pid: i32, private: bool) -> Option<Value> {
    let t = Instant::now();
    loop {
        let v = fetch_stats(socket).ok()?;
        let live = v["apps"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| !private || x["pid"] == pid));
        if !live || t.elapsed() > Duration::from_secs(3) {
            if private {
                // The run's own pager: its settings and nodes belong to it.
                let mut t = v["total"].clone();
                t["pager"] = v["pager"].clone();
                t["memnodes"] = v["memnodes"].clone();
                return Some(t);
            }
            return v["ended_apps"]
                .as_array()?
                .iter()
                .rev()
                .find(|x| x["pid"] == pid)
                .cloned();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one-paragraph summary printed at the end of a run.
pub fn summary(v: &Value, wall: Duration) -> String {
    let n = |p: &str| v.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    let faults = n("/faults/zero") + n("/faults/cache") + n("/faults/remote");
    // Time the program's threads spent waiting in faults (summed).
    let stalled = v
        .pointer("/fault_latency_us/mean")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
        * n("/fault_latency_us/count") as f64
        / 1e6;
    format!(
        "dmem: {:.2} s, at least {stalled:.2} s of thread time stalled in page faults; {faults} page faults ({} \
         zero, {} from the cache tier, {} from memory nodes), fault latency p50 {} us p99 {} \
         us; fetched {}, written back {}, {} pages evicted; prefetch hits {}; peak local \
         memory {}{}",
        wall.as_secs_f64(),
        n("/faults/zero"),
        n("/faults/cache"),
        n("/faults/remote"),
        n("/fault_latency_us/p50"),
        n("/fault_latency_us/p99"),
        format_size(n("/bytes_fetched")),
        format_size(n("/bytes_written_back")),
        n("/evictions"),
        n("/prefetch_hits"),
        format_size(n("/peak_resident_bytes")),
        if n("/limit_exceeded") > 0 {
            "; the local limit was exceeded (no memory node had room)"
        } else {
            ""
        }
    )
}

/// The exit code a shell would report (128 + signal for a signal death).
pub fn exit_code(st: ExitStatus) -> i32 {
    match (st.code(), st.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        _ => 1,
    }
}
