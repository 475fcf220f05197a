//! `dmem-memnode`: serves slabs of this machine's spare RAM to dmem pagers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dmem_memnode::auth::load_token;
use dmem_memnode::metrics::serve_http;
use dmem_memnode::rdma::{DeviceArgs, RdmaMode};
use dmem_memnode::server::{IoMode, Server, ServerConfig};
use dmem_memnode::shutdown;
use dmem_memnode::size::{format_size, parse_size};
use dmem_memnode::sys::mem_available;
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "dmem-memnode",
    version,
    about = "Serve spare RAM to dmem pagers over TCP"
)]
struct Args {
    /// Address to listen on, HOST:PORT (port 0 picks a free port).
    #[arg(long)]
    listen: SocketAddr,
    /// Memory this node may lease to pagers, e.g. 4G, 512M, 1.5G.
    #[arg(long, value_parser = parse_size)]
    capacity: u64,
    /// File holding the shared token. Without it only loopback clients are accepted.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve Prometheus metrics on HOST:PORT.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Seconds a disconnected session's slabs are kept for it to resume.
    #[arg(long, default_value_t = 60.0)]
    lease_grace: f64,
    /// Seconds a peer may stall mid-frame or mid-handshake before it is dropped.
    #[arg(long, default_value_t = 30.0)]
    io_timeout: f64,
    /// Most simultaneous connections.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// How connections do socket I/O: a thread per connection with blocking
    /// calls, or a thread per connection driving an io_uring.
    #[arg(long, value_enum, default_value_t = Io::Threads)]
    io: Io,
    /// Offer one-sided RDMA to pagers: when a device exists (auto), always
    /// (on: fail to start without one), or never (off).
    #[arg(long, value_enum, default_value_t = RdmaMode::Auto)]
    rdma: RdmaMode,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Io {
    Threads,
    Uring,
}

fn seconds(name: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("--{name} must be a non-negative number of seconds, got {v}"))
}

fn main() -> ExitCode {
    shutdown::init_logging();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("dmem-memnode: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let signals = shutdown::block_signals()?;

    let mut cfg = ServerConfig::new(args.listen, args.capacity);
    cfg.lease_grace = seconds("lease-grace", args.lease_grace)?;
    cfg.io_timeout = seconds("io-timeout", args.io_timeout)?;
    if cfg.io_timeout.is_zero() {
        // A zero socket timeout is refused by the OS: every connection
        // would be dropped at once.
        return Err("--io-timeout must be greater than zero".into());
    }
    cfg.max_connections = args.max_connections;
    cfg.io = match args.io {
        Io::Threads => IoMode::Threads,
        Io::Uring => IoMode::Uring,
    };
    cfg.rdma = args.rdma;
    cfg.rdma_device = args.device.config();
    if args.capacity == 0 {
        return Err("--capacity must be greater than zero".into());
    }
    match &args.token_file {
        Some(path) => cfg.token = Some(load_token(path).map_err(|e| e.to_string())?),
        None => warn!("no --token-file given: accepting loopback clients only"),
    }
    if let Some(avail) = mem_available() {
        if args.capacity > avail {
            warn!(
                "capacity {} exceeds the memory available now ({}): leasing it all may swap or OOM",
                format_size(args.capacity),
                format_size(avail)
            );
        }
    }
    let server = Server::bind(cfg).map_err(|e| e.to_string())?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    if let Some(maddr) = args.metrics {
        let state = server.state();
        let render = Arc::new(move || state.metrics.render(&state.store.figures()));
        let bound = serve_http(maddr, render)
            .map_err(|e| format!("cannot serve metrics on {maddr}: {e}"))?;
        info!("metrics on http://{bound}/metrics");
    }
    info!(
        "listening on {addr}, capacity {}",
        format_size(args.capacity)
    );
    match server.state().rdma.status() {
        Ok(dev) => info!("RDMA offered on device {dev}"),
        Err(why) => info!("TCP only: {why}"),
    }
    // Tests and scripts read this line to learn the port chosen for port 0.
    println!("dmem-memnode listening on {addr}");

    // Slabs are plain process memory: exiting returns them all.
    shutdown::exit_on_signal(signals, || {})?;
    server.run().map_err(|e| e.to_string())
}
