//! What both daemons (`dmem-memnode`, `dmem-pager`) do at start: log to
//! stderr through `tracing` (`RUST_LOG`, default `info`), and exit cleanly on
//! SIGTERM/SIGINT from one dedicated thread.

use nix::sys::signal::{SigSet, Signal};
use tracing::{info, warn};

/// Logs to stderr; `RUST_LOG` overrides the `info` default.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Blocks the shutdown signals in the calling thread (and every thread it
/// starts later): call before any thread starts, so that only the thread of
/// [`exit_on_signal`] receives them.
pub fn block_signals() -> Result<SigSet, String> {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(signals)
}

/// Starts the thread that waits for a shutdown signal, runs `cleanup` and
/// exits with status 0.
pub fn exit_on_signal(
    signals: SigSet,
    cleanup: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            match signals.wait() {
                Ok(sig) => info!("{} received: shutting down", sig.as_str()),
                Err(e) => warn!("waiting for signals failed ({e}): shutting down"),
            }
            cleanup();
            std::process::exit(0);
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}
