//! `dmem-bench`: dmem's benchmarks. A binary, never part of `cargo test`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod memnode;
mod stats;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Memnode(a) => memnode::run(a),
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
