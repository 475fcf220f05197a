//! `dmem-bench`: dmem's benchmarks. A binary, never part of `cargo test`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod daemon;
mod fault;
mod fault_worker;
mod memnode;
mod stats;
mod sys;
mod uffd_floor;

#[derive(Parser, Debug)]
#[command(name = "dmem-bench", version, about = "dmem benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Memory-node data path against bare TCP floors measured in the same
    /// run: 4 KiB read latency, pipelined 64 KiB read/write throughput.
    Memnode(memnode::Args),
    /// Page-fault latency under dmem (served from the cache tier and from a
    /// memory node) and sequential scan throughput, against a bare uffd
    /// round trip and a bare TCP ping-pong measured in the same run.
    FaultLatency(fault::Args),
    /// The app side of fault-latency (started by it; not for direct use).
    #[command(hide = true)]
    FaultWorker(fault_worker::Args),
    /// The cross-process bare uffd handler of fault-latency (started by it).
    #[command(hide = true)]
    UffdHandler,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Memnode(a) => memnode::run(a),
        Cmd::FaultLatency(a) => fault::run(a),
        Cmd::FaultWorker(a) => fault_worker::run(a),
        Cmd::UffdHandler => uffd_floor::run_handler_process(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmem-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where a workspace binary lives: next to this executable (target/release).
pub(crate) fn sibling_binary(name: &str, given: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = given {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let p = exe
        .parent()
        .ok_or("own executable has no directory")?
        .join(name);
    if !p.exists() {
        return Err(format!(
            "{} not found; build it (cargo build --release --workspace) or pass its path",
            p.display()
        ));
    }
    Ok(p)
}
