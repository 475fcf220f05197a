//! Child daemons the benchmarks start (memory node, pager): spawned with a
//! piped stdout, ready once their first line says where they listen, killed
//! on drop.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child daemon, killed (and reaped) on drop.
pub(crate) struct Daemon {
    child: Child,
    /// What its first line named after `ready_prefix` (an address, a path).
    pub(crate) addr: String,
}

impl Daemon {
    /// Spawns `cmd` and waits (10 s at most) for a first stdout line
    /// starting with `ready_prefix`. Stderr is inherited; stdout is drained
    /// afterwards so the daemon never blocks on it.
    pub(crate) fn start(
        mut cmd: Command,
        what: &str,
        ready_prefix: &str,
    ) -> Result<Daemon, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            for _ in lines {} // keep draining so the daemon never blocks on stdout
        });
        let mut d = Daemon {
            child,
            addr: String::new(),
        };
        let line = match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Ok(l))) => l,
            other => return Err(format!("{what} did not start: {other:?}")),
        };
        d.addr = line
            .strip_prefix(ready_prefix)
            .ok_or_else(|| format!("unexpected first line from {what}: {line:?}"))?
            .trim()
            .to_string();
        Ok(d)
    }
}

impl Daemon {
    /// How the daemon ended, if it has (e.g. killed from outside the run).
    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
