//! Prometheus text metrics: counters kept by the memory node, and a tiny
//! HTTP endpoint that serves any daemon's metrics text (the pager uses it too).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{ErrorCode, Op};
use crate::store::StoreFigures;

/// Counters of the memory node. Gauges come from the store at scrape time.
#[derive(Default)]
pub struct Metrics {
    ops: [AtomicU64; Op::ALL.len()],
    errors: [AtomicU64; ErrorCode::ALL.len()],
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub connections_total: AtomicU64,
    pub connections_open: AtomicU64,
    pub sessions_expired: AtomicU64,
}

impl Metrics {
    pub fn op(&self, op: Op) {
        let i = Op::ALL
            .iter()
            .position(|o| *o == op)
            .expect("every op is listed");
        self.ops[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn error(&self, code: ErrorCode) {
        let i = ErrorCode::ALL
            .iter()
            .position(|c| *c == code)
            .expect("every code is listed");
        self.errors[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Renders the Prometheus text exposition format.
    pub fn render(&self, f: &StoreFigures) -> String {
        let mut s = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP dmem_memnode_{name} {help}\n# TYPE dmem_memnode_{name} gauge\ndmem_memnode_{name} {v}");
        };
        gauge("capacity_bytes", "Bytes this node may lease.", f.capacity);
        gauge("used_bytes", "Bytes currently leased as slabs.", f.used);
        gauge("slabs", "Slabs currently leased.", f.slabs);
        gauge(
            "connections_open",
            "Open client connections.",
            self.connections_open.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            s,
            "# HELP dmem_memnode_sessions Sessions by state.\n# TYPE dmem_memnode_sessions gauge"
        );
        let _ = writeln!(
            s,
            "dmem_memnode_sessions{{state=\"attached\"}} {}",
            f.sessions_attached
        );
        let _ = writeln!(
            s,
            "dmem_memnode_sessions{{state=\"detached\"}} {}",
            f.sessions_detached
        );
        let _ = writeln!(s, "# HELP dmem_memnode_ops_total Requests served, by kind.\n# TYPE dmem_memnode_ops_total counter");
        for (op, n) in Op::ALL.iter().zip(&self.ops) {
            let _ = writeln!(
                s,
                "dmem_memnode_ops_total{{op=\"{}\"}} {}",
                op.name(),
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(s, "# HELP dmem_memnode_bytes_total Data bytes moved, by kind.\n# TYPE dmem_memnode_bytes_total counter");
        let _ = writeln!(
            s,
            "dmem_memnode_bytes_total{{op=\"read\"}} {}",
            self.bytes_read.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "dmem_memnode_bytes_total{{op=\"write\"}} {}",
            self.bytes_written.load(Ordering::Relaxed)
        );
        let _ = writeln!(s, "# HELP dmem_memnode_errors_total Error replies, by kind.\n# TYPE dmem_memnode_errors_total counter");
        for (code, n) in ErrorCode::ALL.iter().zip(&self.errors) {
            let _ = writeln!(
                s,
                "dmem_memnode_errors_total{{kind=\"{}\"}} {}",
                code.label(),
                n.load(Ordering::Relaxed)
            );
        }
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP dmem_memnode_{name} {help}\n# TYPE dmem_memnode_{name} counter\ndmem_memnode_{name} {v}");
        };
        counter(
            "connections_total",
            "Connections accepted.",
            self.connections_total.load(Ordering::Relaxed),
        );
        counter(
            "sessions_expired_total",
            "Sessions freed after their lease grace.",
            self.sessions_expired.load(Ordering::Relaxed),
        );
        s
    }
}

/// Serves `render()` as `text/plain` on `GET /metrics` (and `/`) from a
/// background thread. Returns the bound address.
pub fn serve_http(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                // One scrape at a time is plenty; a slow scraper is cut off.
                let _ = answer(stream, &*render);
            }
        })?;
    Ok(local)
}

fn answer(mut stream: TcpStream, render: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let r = stream.read(&mut buf[n..])?;
        if r == 0 {
            break;
        }
        n += r;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let path = head.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if head.starts_with("GET ") && (path == "/metrics" || path == "/") {
        ("200 OK", render())
    } else {
        (
            "404 Not Found",
            "not found; metrics are at /metrics\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())
}
