//! `dmem ping`: the operator's first check of a memory node. Authenticates,
//! leases a scratch slab, writes pages and reads them back byte for byte,
//! measures round trips, frees everything.

use std::path::Path;
use std::time::{Duration, Instant};

use dmem_memnode::auth::{load_token, random_secret};
use dmem_memnode::client::{Client, ClientConfig, ClientError};
use dmem_memnode::protocol::Extent;
use dmem_memnode::size::format_size;
use hdrhistogram::Histogram;
use thiserror::Error;

const PAGE: usize = 4096;

#[derive(Debug, Error)]
pub enum PingError {
    #[error("{0}")]
    Token(#[from] dmem_memnode::auth::AuthError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("data mismatch: page {page} read back differs from what was written (first bad byte at {offset})")]
    Mismatch { page: usize, offset: usize },
}

/// What a successful ping measured.
#[derive(Debug)]
pub struct PingReport {
    pub connect: Duration,
    pub session: u64,
    pub capacity: u64,
    pub used: u64,
    pub pages: usize,
    pub write_batch: Duration,
    pub read_batch: Duration,
    pub read_rtt_p50: Duration,
    pub read_rtt_max: Duration,
}

pub fn ping(
    addr: &str,
    token_file: Option<&Path>,
    pages: usize,
    rounds: usize,
) -> Result<PingReport, PingError> {
    let mut cfg = ClientConfig::new(addr);
    cfg.token = token_file.map(load_token).transpose()?;
    cfg.reconnect_window = Duration::ZERO; // an operator check should fail fast
    let t = Instant::now();
    let client = Client::connect(cfg)?;
    let connect = t.elapsed();
    let welcome = client.welcome();

    let pages = pages.max(1);
    let slab = 1u32;
    client.alloc(slab, (pages * PAGE) as u64)?;
    // Random contents: a node that returns zeros or stale bytes cannot pass.
    let mut data = vec![0u8; pages * PAGE];
    for chunk in data.chunks_mut(32) {
        let r = random_secret();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    let extents: Vec<Extent> = (0..pages)
        .map(|i| Extent::new(slab, (i * PAGE) as u64, PAGE as u32))
        .collect();
    let t = Instant::now();
    client.write(&extents, &data)?;
    let write_batch = t.elapsed();
    let t = Instant::now();
    let back = client.read(&extents)?;
    let read_batch = t.elapsed();
    if let Some(offset) = back
        .iter()
        .zip(&data)
        .position(|(a, b)| a != b)
        .or((back.len() != data.len()).then_some(0))
    {
        return Err(PingError::Mismatch {
            page: offset / PAGE,
            offset,
        });
    }

    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds");
    for r in 0..rounds.max(1) {
        let page = r % pages;
        let t = Instant::now();
        let got = client.read(&extents[page..page + 1])?;
        hist.saturating_record((t.elapsed().as_nanos() as u64).max(1));
        if got[..] != data[page * PAGE..(page + 1) * PAGE] {
            return Err(PingError::Mismatch {
                page,
                offset: page * PAGE,
            });
        }
    }
    client.free(slab)?;
    let session = client.session_id();
    client.close_session()?;
    Ok(PingReport {
        connect,
        session,
        capacity: welcome.capacity,
        used: welcome.used,
        pages,
        write_batch,
        read_batch,
        read_rtt_p50: Duration::from_nanos(hist.value_at_quantile(0.5)),
        read_rtt_max: Duration::from_nanos(hist.max()),
    })
}

impl std::fmt::Display for PingReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        writeln!(
            f,
            "connected and authenticated in {:.0} us (session {})",
            us(self.connect),
            self.session
        )?;
        writeln!(
            f,
            "node capacity {}, {} leased",
            format_size(self.capacity),
            format_size(self.used)
        )?;
        writeln!(
            f,
            "wrote {} pages in one batch: {:.0} us",
            self.pages,
            us(self.write_batch)
        )?;
        writeln!(
            f,
            "read them back and verified: {:.0} us",
            us(self.read_batch)
        )?;
        write!(
            f,
            "4 KiB read round trip: p50 {:.1} us, max {:.1} us",
            us(self.read_rtt_p50),
            us(self.read_rtt_max)
        )
    }
}
