//! `dmem-pager`: serves page faults of registered apps from a local cache
//! tier backed by memory nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use dmem_memnode::auth::load_token;
use dmem_memnode::metrics::serve_http;
use dmem_memnode::rdma::DeviceArgs;
use dmem_memnode::shutdown;
use dmem_memnode::size::{format_size, parse_size};
use dmem_pager::daemon::{bind_socket, default_socket, serve};
use dmem_pager::pager::{Pager, PagerConfig};
use dmem_pager::transport::TransportMode;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "dmem-pager",
    version,
    about = "Serve userfaultfd page faults from a local cache tier backed by memory nodes"
)]
struct Args {
    /// Unix socket apps register on (default: $DMEM_SOCKET, /run/dmem/pager.sock for root).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Memory node HOST:PORT (repeat for several).
    #[arg(long)]
    memnode: Vec<String>,
    /// Default local memory limit per app (resident + its cache share), e.g. 2G.
    #[arg(long, value_parser = parse_size)]
    local_limit: u64,
    /// Size of the local cache tier shared by all apps.
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    cache: u64,
    /// Transfer unit for remote fetches: 4K to 2M, a power of two.
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    block: u64,
    /// Slab size leased from memory nodes (at least 4M).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    slab: u64,
    /// File holding the memory nodes' shared token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Serve Prometheus metrics on HOST:PORT.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Fetch worker threads.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Largest prefetch window (0 disables prefetch).
    #[arg(long, value_parser = parse_size, default_value = "4M")]
    prefetch_max: u64,
    /// Seconds a fetch may wait for an unreachable memory node before the
    /// app is stopped.
    #[arg(long, default_value_t = 30)]
    fetch_timeout: u64,
    /// How to reach memory nodes: RDMA where this host has a device and
    /// the node offers it, else TCP (auto); RDMA or fail (rdma); TCP (tcp).
    #[arg(long, value_enum, default_value_t = TransportMode::Auto)]
    transport: TransportMode,
    /// Memory nodes that must hold every page written back before its
    /// local copy is dropped (2 recommended with 2 or more nodes). Pages
    /// left with fewer copies when a node is lost are copied again.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Most bytes per second copied to rebuild lost replicas.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    rebuild_rate: u64,
    /// Encrypt and authenticate every page written back (ChaCha20-Poly1305,
    /// key held only by this pager): memory nodes hold ciphertext only.
    #[arg(long)]
    encrypt: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> ExitCode {
    shutdown::init_logging();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmem-pager: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let signals = shutdown::block_signals()?;
    match dmem_pager::sys::raise_fd_limit() {
        Ok((old, new)) if new > old => info!(old, new, "raised the open-file limit"),
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "could not raise the open-file limit; many app sessions may fail")
        }
    }
    if args.local_limit < (1 << 20) {
        return Err("--local-limit must be at least 1M".into());
    }
    if args.slab < dmem_pager::placement::MIN_SLAB {
        return Err(format!(
            "--slab must be at least 4M, not {}",
            format_size(args.slab)
        ));
    }
    if args.fetch_timeout == 0 {
        return Err("--fetch-timeout must be greater than zero".into());
    }
    let token = match &args.token_file {
        Some(p) => Some(load_token(p).map_err(|e| e.to_string())?),
        None => None,
    };
    if args.memnode.is_empty() {
        warn!("no --memnode given: pages beyond the local limit have nowhere to go");
    }
    let cfg = PagerConfig {
        memnodes: args.memnode.clone(),
        token,
        local_limit: args.local_limit,
        cache: args.cache,
        block: args.block as usize,
        slab: args.slab,
        workers: args.workers,
        prefetch_max: args.prefetch_max as usize / 4096,
        fetch_timeout: Duration::from_secs(args.fetch_timeout),
        transport: args.transport,
        rdma_device: args.device.config(),
        replicas: args.replicas,
        rebuild_rate: args.rebuild_rate,
        encrypt: args.encrypt,
        ..PagerConfig::default()
    };
    let pager = Pager::new(cfg).map_err(|e| e.to_string())?;
    let path = args.socket.unwrap_or_else(default_socket);
    let listener = bind_socket(&path).map_err(|e| e.to_string())?;
    if let Some(maddr) = args.metrics {
        let p = Arc::clone(&pager);
        let bound = serve_http(maddr, Arc::new(move || p.metrics_text()))
            .map_err(|e| format!("cannot serve metrics on {maddr}: {e}"))?;
        info!("metrics on http://{bound}/metrics");
    }
    info!(
        "local limit {} per app, cache {}, block {}, {} memory node(s)",
        format_size(args.local_limit),
        format_size(args.cache),
        format_size(args.block),
        args.memnode.len()
    );
    // Tests and scripts wait for this line.
    println!("dmem-pager listening on {}", path.display());
    // Apps attached now lose their pager: their agents stop them.
    let socket = path.clone();
    shutdown::exit_on_signal(signals, move || {
        let _ = std::fs::remove_file(&socket);
    })?;
    serve(pager, listener, path.display().to_string());
    Ok(())
}
