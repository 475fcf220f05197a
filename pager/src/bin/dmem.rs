//! `dmem`: the user-facing command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dmem_memnode::size::parse_size;
use dmem_pager::run::{exit_code, run, RunConfig};

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
    /// Run a program with its large allocations paged by dmem.
    ///
    /// Uses the host's pager when one answers (and no --memnode,
    /// --replicas or --encrypt is given);
    /// otherwise starts a pager for this run, and with no --memnode a
    /// memory node on loopback too. Returns the program's exit status.
    Run {
        /// Local memory the program may keep (resident + its cache share),
        /// e.g. 2G (default: the pager's).
        #[arg(long, value_parser = parse_size)]
        local_limit: Option<u64>,
        /// Memory node HOST:PORT (repeat for several); starts a private pager.
        #[arg(long)]
        memnode: Vec<String>,
        /// File holding the memory nodes' shared token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Pager socket to use (default: $DMEM_SOCKET or the host default).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write the run's figures as JSON here at exit.
        #[arg(long)]
        stats_json: Option<PathBuf>,
        /// Memory nodes that must hold every page written back (for a pager
        /// this run starts; with no --memnode, this many loopback nodes).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
        replicas: u32,
        /// Encrypt pages at rest on the memory nodes (for a pager this run
        /// starts).
        #[arg(long)]
        encrypt: bool,
        /// No summary on stderr.
        #[arg(long)]
        quiet: bool,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
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
        Cmd::Run {
            local_limit,
            memnode,
            token_file,
            socket,
            stats_json,
            replicas,
            encrypt,
            quiet,
            cmd,
        } => {
            let cfg = RunConfig {
                local_limit,
                memnodes: memnode,
                token_file,
                socket,
                stats_json,
                replicas: replicas as usize,
                encrypt,
                quiet,
                cmd,
            };
            match run(&cfg) {
                Ok(st) => ExitCode::from(exit_code(st).clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("dmem run: {e}");
                    ExitCode::from(125)
                }
            }
        }
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
