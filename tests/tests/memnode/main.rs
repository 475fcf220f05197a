//! End-to-end tests of the memory node: real `dmem-memnode` and `dmem`
//! processes (from `cargo build --release --workspace`), real sockets, no
//! mocks. One test binary (so it links once); nextest still runs every test
//! in its own process, each with its own daemons on ports of their choosing.
//!
//! - `data_path`: alloc/read/write/free/stat, pipelining, capacity,
//!   isolation, concurrency, token auth, metrics, signals, startup checks.
//! - `bad_input`: malformed, truncated, oversized, stalled, unauthenticated
//!   and random traffic.
//! - `sessions`: reconnect-and-resume, takeover, lease expiry, restarts.
//! - `ping_cli`: the `dmem ping` operator check.
//! - `netns`: a node in another network namespace (root only; skipped
//!   visibly otherwise).

mod bad_input;
mod data_path;
mod netns;
mod ping_cli;
mod sessions;
