//! `dmem`: the user-facing command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "dmem",
    version,
    about = "Run programs with more memory than the machine has"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Check a memory node: authenticate, write and read back pages, time it.
    Ping {
        /// Memory node address, HOST:PORT.
        #[arg(long)]
        memnode: String,
        /// File holding the shared token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Pages written and verified.
        #[arg(long, default_value_t = 64)]
        pages: usize,
        /// Single-page read round trips timed.
        #[arg(long, default_value_t = 200)]
        rounds: usize,
    },
    /// Live figures of the pager, per app and in total.
    Stats {
        /// Pager socket (default: $DMEM_SOCKET, /run/dmem/pager.sock for root).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Ping {
            memnode,
            token_file,
            pages,
            rounds,
        } => match dmem_pager::ping::ping(&memnode, token_file.as_deref(), pages, rounds) {
            Ok(report) => {
                println!("memory node {memnode}: OK");
                println!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dmem ping: memory node {memnode}: FAILED: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Stats { socket, json } => {
            let socket = socket.unwrap_or_else(dmem_pager::daemon::default_socket);
            match dmem_pager::report::fetch_stats(&socket) {
                Ok(v) if json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(v) => {
                    print!("{}", dmem_pager::report::human(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dmem stats: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
