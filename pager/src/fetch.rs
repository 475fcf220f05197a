//! Faults served from memory nodes, on the worker pool so the uffd reader
//! never waits for the network. The reader claims the pages (marks them
//! `Fetching`, so later faults on them just wait for the wake-up) and plans
//! the prefetch; a worker reads demand and prefetch pages in parallel,
//! verifies each page's checksum, and installs them. Prefetched pages go
//! straight into the app while it has room under its limit, else into the
//! cache tier.

use std::sync::Arc;
use std::time::Instant;

use crate::pager::Pager;
use crate::pages::{flag, Place};
use crate::placement::Batch;
use crate::remote::checksum;
use crate::session::{Fault, Session, State};
use crate::stats::Latencies;
use crate::sys::{Fill, PAGE};

/// A page claimed for fetching.
#[derive(Debug, Clone, Copy)]
pub struct Claimed {
    pub page: u64,
    pub slot: u32,
    pub crc: u32,
    pub gen: u16,
}

pub struct FetchJob {
    pub session: Arc<Session>,
    /// The demand fault, if any (a marker hit only prefetches).
    pub fault: Option<Fault>,
    pub demand: Vec<Claimed>,
    pub prefetch: Vec<Claimed>,
    /// The window's marker page, kept out of the app.
    pub marker: Option<u64>,
    /// The stream writes: its pages go in writable (and dirty).
    pub write: bool,
}

fn claim_page(st: &mut State, page: u64, prefetched: bool) -> Option<Claimed> {
    let m = st.table.get_mut(page)?;
    if m.place != Place::Remote {
        return None;
    }
    m.gen = m.gen.wrapping_add(1);
    if prefetched {
        m.set(flag::PREFETCHED | flag::STREAMED);
    } else {
        m.clear(flag::STREAMED);
    }
    let c = Claimed {
        page,
        slot: m.slot,
        crc: m.crc,
        gen: m.gen,
    };
    st.place(page, Place::Fetching);
    Some(c)
}

/// Claims the faulting page's block and plans the prefetch (reader side).
pub fn claim(session: &Arc<Session>, pager: &Pager, st: &mut State, f: &Fault) -> FetchJob {
    let block = st.table.block_of(f.page, pager.cfg.block);
    let mut demand = Vec::new();
    let mut p = block.start;
    while p < block.end {
        if let Some(c) = claim_page(st, p, false) {
            demand.push(c);
        }
        p += PAGE as u64;
    }
    st.reserved += demand.len();
    let mut job = plan_prefetch(session, pager, st, f.page, f.write);
    job.fault = Some(*f);
    job.demand = demand;
    job
}

/// Feeds a non-local fault to the stream detector and claims the pages of
/// the window it asks for: pages already in the cache tier go into the app
/// at once; remote ones make up the job, which may carry no page at all.
pub fn plan_prefetch(
    session: &Arc<Session>,
    pager: &Pager,
    st: &mut State,
    page: u64,
    write: bool,
) -> FetchJob {
    let block_pages = (pager.cfg.block / PAGE) as i64;
    let (stream, outcome) = st
        .prefetch
        .on_fault((page / PAGE as u64) as i64 / block_pages);
    let c = &session.counters;
    if outcome.consumed > 0 {
        // The stream reached the marker: the last window was used.
        for pg in std::mem::take(st.prefetch.window(stream)) {
            if let Some(m) = st.table.get_mut(pg) {
                if m.has(flag::PREFETCHED) && m.place == Place::Resident {
                    m.clear(flag::PREFETCHED);
                    c.add(&c.prefetch_hits, 1);
                }
            }
        }
    }
    let mut prefetch = Vec::new();
    let mut marker = None;
    if let Some(plan) = outcome.plan {
        let mut promoted = Vec::new();
        for k in 0..plan.count as i64 {
            let b = plan.start + k * plan.stride;
            if b < 0 {
                break;
            }
            for i in 0..block_pages {
                let pg = ((b * block_pages + i) as u64) * PAGE as u64;
                let Some(m) = st.table.get(pg).copied() else {
                    continue;
                };
                let is_marker = b == plan.marker && i == 0;
                // A cached page goes into the app now (no network), but
                // for the marker: its fault is what starts the next window.
                let now = m.place == Place::Cached
                    && !is_marker
                    && session.promote(pager, st, pg, m.frame, None, write).1;
                if now {
                    if let Some(pm) = st.table.get_mut(pg) {
                        pm.set(flag::PREFETCHED | flag::STREAMED);
                    }
                    promoted.push(pg);
                    continue;
                }
                if let Some(cl) = claim_page(st, pg, true) {
                    if is_marker {
                        marker = Some(pg);
                    }
                    prefetch.push(cl);
                }
            }
        }
        c.add(&c.prefetch_issued, (prefetch.len() + promoted.len()) as u64);
        promoted.extend(prefetch.iter().map(|c| c.page));
        *st.prefetch.window(stream) = promoted;
    }
    session.kick_if_pressed(st, 0);
    FetchJob {
        session: Arc::clone(session),
        fault: None,
        demand: Vec::new(),
        prefetch,
        marker,
        write,
    }
}

/// A worker's receive buffers, kept from job to job: allocating them per
/// job cost a page fault and a clear per 4 KiB (the allocator hands large
/// blocks back to the kernel), more than receiving the data itself.
#[derive(Default)]
pub struct Buffers {
    demand: Vec<u8>,
    prefetch: Vec<u8>,
    scratch: Vec<u8>,
}

/// `buf` sized to `len` bytes. Old contents stay: every byte is received
/// before it is used, and nothing is used after a failed receive.
fn sized(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

/// Gives back the room a demand fetch reserved, however the job ends.
struct Reservation<'a>(&'a Session, usize);

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.0.lock().reserved -= self.1;
    }
}

/// Prefetched pages per read request. A window is read as several
/// requests, all posted at once, and each is checked and installed as it
/// lands: the app can use the window's first pages while the rest are on
/// the wire, and installing overlaps the node's sending (one request for a
/// whole 2 MiB window left the app waiting for all of it).
const PREFETCH_CHUNK: usize = 64;

/// Runs a fetch job on a worker thread.
pub fn run(job: FetchJob, pager: &Pager, bufs: &mut Buffers) {
    crate::contain::failpoint("fetch");
    let s = &job.session;
    let reservation = Reservation(s, job.demand.len());
    let t0 = Instant::now();
    let demand_slots: Vec<u32> = job.demand.iter().map(|c| c.slot).collect();
    let demand = Batch::read(&pager.space, &demand_slots, &[]);
    let chunks: Vec<Batch> = job
        .prefetch
        .chunks(PREFETCH_CHUNK)
        .map(|ch| {
            let slots: Vec<u32> = ch.iter().map(|c| c.slot).collect();
            Batch::read(&pager.space, &slots, &[])
        })
        .collect();
    let dbuf = sized(&mut bufs.demand, demand_slots.len() * PAGE);
    let pbuf = sized(&mut bufs.prefetch, job.prefetch.len() * PAGE);
    let scratch = &mut bufs.scratch;
    let c = &s.counters;
    let demanded = (!job.demand.is_empty()).then(|| {
        demand
            .post_read()
            .and_then(|p| demand.finish_read(p, dbuf, scratch))
    });
    // The prefetch is posted once the demand data is in (a window's
    // requests posted first held the faulting thread up), and travels
    // while the demand installs. Once a request fails, no more of the
    // window is posted, and no request of it still outstanding is waited
    // for (they are abandoned): each would wait out its own reconnect
    // window on a node in trouble, holding the demand install (and faults
    // on the window's pages) up for minutes. Prefetch is optional; a
    // demand fault on those pages tries every replica.
    let mut failing = false;
    let posted: Vec<_> = chunks
        .iter()
        .map(|b| {
            if failing {
                return None;
            }
            let p = b.post_read();
            failing = p.is_err();
            Some(p)
        })
        .collect();
    if let Some(first) = demanded {
        let first = first
            .map_err(|(node, e)| Failed::Read(node, e.to_string()))
            .and_then(|()| match first_corrupt(pager, &job.demand, dbuf) {
                None => Ok(()),
                Some(i) => Err(Failed::Corrupt(demand.node_of(i), job.demand[i].page)),
            });
        if let Err(failed) = first {
            // Another replica may have it; with none left the app stops.
            if let Err(why) = refetch(pager, &demand_slots, &job.demand, dbuf, scratch, failed) {
                s.fatal(&why);
                return;
            }
        }
        Latencies::record(&s.lat.fetch, t0.elapsed());
        c.add(&c.bytes_fetched, dbuf.len() as u64);
        c.add(&c.faults_remote, 1);
        install(
            s,
            pager,
            &job.demand,
            dbuf,
            job.fault.as_ref(),
            false,
            false,
        );
    }
    drop(reservation);
    for (k, (batch, post)) in chunks.iter().zip(posted).enumerate() {
        let at = k * PREFETCH_CHUNK;
        let pages = &job.prefetch[at..(at + PREFETCH_CHUNK).min(job.prefetch.len())];
        let data = &mut pbuf[at * PAGE..(at + pages.len()) * PAGE];
        let fetched = match post {
            Some(post) if !failing => {
                let ok = post
                    .and_then(|p| batch.finish_read(p, data, scratch))
                    .is_ok();
                failing = !ok;
                ok
            }
            Some(Ok(post)) => {
                for (_, c, _) in post {
                    c.abandon();
                }
                false
            }
            _ => false,
        };
        if !fetched || first_corrupt(pager, pages, data).is_some() {
            // Just give the pages back: a demand fault on one of them tries
            // every replica, and reports data that is truly gone.
            let mut st = s.lock();
            revert(s, &mut st, pages);
            continue;
        }
        c.add(&c.bytes_fetched, data.len() as u64);
        install_prefetched(s, pager, pages, data, job.marker, job.write);
    }
    tracing::debug!(
        session = s.id,
        pages = job.prefetch.len(),
        first = ?job.prefetch.first().map(|c| format!("{:#x}", c.page)),
        marker = ?job.marker,
        "prefetched"
    );
}

/// Installs a run of prefetched pages. Room is decided as each run goes
/// in, not when the window was planned: the evictor made room while the
/// data travelled (it counts pages in flight). Pages beyond the room go
/// back to the memory node; the window's marker goes to the cache tier,
/// where its fault starts the next window.
fn install_prefetched(
    s: &Session,
    pager: &Pager,
    pages: &[Claimed],
    data: &[u8],
    marker: Option<u64>,
    write: bool,
) {
    let n = pages.len();
    let marker = marker.and_then(|m| pages.iter().position(|c| c.page == m));
    let runs = match marker {
        Some(k) => [(0, k), (k + 1, n)],
        None => [(0, n), (n, n)],
    };
    for (a, b) in runs {
        if a < b {
            install(
                s,
                pager,
                &pages[a..b],
                &data[a * PAGE..b * PAGE],
                None,
                write,
                true,
            );
        }
    }
    if let Some(k) = marker {
        to_cache(s, pager, &pages[k..=k], &data[k * PAGE..(k + 1) * PAGE]);
    }
}

/// Gives claimed pages that were not installed back to `Remote`, and
/// wakes faults that waited on them so they fault again.
fn revert(s: &Session, st: &mut State, pages: &[Claimed]) {
    for c in pages {
        if st
            .table
            .get(c.page)
            .is_some_and(|m| m.place == Place::Fetching && m.gen == c.gen)
        {
            st.place(c.page, Place::Remote);
            s.wake(c.page, PAGE);
        }
    }
}

/// Why a read of a batch's pages failed.
enum Failed {
    /// A node did not deliver (`None`: a page had no replica left to ask).
    Read(Option<usize>, String),
    /// A page (at this address) failed its checksum, read from that node.
    Corrupt(Option<usize>, u64),
}

/// Reads `slots` again after `failed`, page by page, each from its own
/// replicas minus the nodes that failed it (a node that failed the whole
/// batch is left out for every page; a corrupt copy only for its page),
/// until every page arrives intact. Returns the failure, worded for the
/// app, of a page with no replica left.
fn refetch(
    pager: &Pager,
    slots: &[u32],
    pages: &[Claimed],
    out: &mut [u8],
    scratch: &mut Vec<u8>,
    failed: Failed,
) -> Result<(), String> {
    let node_name = |n: usize| {
        pager
            .space
            .nodes()
            .get(n)
            .map_or_else(|| "?".to_owned(), |t| t.addr().to_owned())
    };
    let read_failed = |addr: u64, n: Option<usize>, e: &str| match n {
        Some(n) => format!(
            "page {addr:#x} could not be fetched from memory node {}: {e}",
            node_name(n)
        ),
        None => format!("page {addr:#x} could not be fetched: {e}"),
    };
    let corrupt = |n: Option<usize>, page: u64| {
        format!(
            "memory node {} returned a corrupted page for address {page:#x} \
             (checksum or authentication mismatch); refusing to serve it",
            n.map_or_else(|| "?".to_owned(), node_name)
        )
    };
    let (mut why, batch_avoid, bad_page) = match failed {
        Failed::Read(n, e) => (
            read_failed(pages.first().map_or(0, |c| c.page), n, &e),
            n,
            None,
        ),
        Failed::Corrupt(n, page) => (corrupt(n, page), None, Some((n, page))),
    };
    if pager.space.replicas() < 2 {
        return Err(why);
    }
    tracing::warn!("{why}; trying the other replicas");
    for (i, c) in pages.iter().enumerate() {
        let mut avoid: Vec<usize> = batch_avoid.into_iter().collect();
        if let Some((Some(n), page)) = bad_page {
            if page == c.page {
                avoid.push(n);
            }
        }
        let dst = &mut out[i * PAGE..(i + 1) * PAGE];
        loop {
            let b = Batch::read(&pager.space, &slots[i..=i], &avoid);
            match b.post_read().and_then(|p| b.finish_read(p, dst, scratch)) {
                Err((None, e)) => return Err(format!("{why}; {e}")),
                Err((Some(n), e)) => {
                    why = read_failed(c.page, Some(n), &e.to_string());
                    avoid.push(n);
                }
                Ok(()) => {
                    if first_corrupt(pager, std::slice::from_ref(c), dst).is_none() {
                        break;
                    }
                    let n = b.node_of(0);
                    why = corrupt(n, c.page);
                    match n {
                        Some(n) => avoid.push(n),
                        None => return Err(why),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Opens sealed pages (`--encrypt`) in place and checks every page against
/// the checksum taken at write-back. Returns the first page that fails
/// either; the pages before it are then plaintext, the rest unusable.
fn first_corrupt(pager: &Pager, pages: &[Claimed], buf: &mut [u8]) -> Option<usize> {
    pages.iter().enumerate().position(|(i, c)| {
        let page = &mut buf[i * PAGE..(i + 1) * PAGE];
        if let Some(sealer) = &pager.sealer {
            if let Err(e) = sealer.open(c.slot, page) {
                tracing::warn!("{e}");
                return true;
            }
        }
        checksum(page) != c.crc
    })
}

/// Installs fetched pages still wanted, in contiguous runs. A run that
/// meets a pending address-space event (EAGAIN) is retried once the uffd
/// reader has read it; the app is only woken to fault again if that keeps
/// failing. `capped` (prefetched pages, which have no reserved room) stops
/// at the app's room, checked under the same lock as each run goes in, and
/// gives the rest back to the memory node.
fn install(
    s: &Session,
    pager: &Pager,
    pages: &[Claimed],
    buf: &[u8],
    fault: Option<&Fault>,
    writable: bool,
    capped: bool,
) {
    let still = |st: &State, c: &Claimed| {
        st.table
            .get(c.page)
            .is_some_and(|m| m.place == Place::Fetching && m.gen == c.gen)
    };
    let mut fault_done = false;
    let mut i = 0;
    let mut attempts = 0;
    while i < pages.len() {
        let _r = s.mm.read().unwrap_or_else(|p| p.into_inner());
        let mut st = s.lock();
        if !still(&st, &pages[i]) {
            i += 1;
            continue;
        }
        let room = if capped { s.room(&st) } else { usize::MAX };
        if room == 0 {
            let c = &s.counters;
            c.add(&c.prefetch_waste, (pages.len() - i) as u64);
            revert(s, &mut st, &pages[i..]);
            break;
        }
        // A read-modify-write page goes in writable (and dirty): it is
        // about to be written, and its write-protect fault would cost a
        // round trip. Prefetched ones too, now that windows follow each
        // stream: GEMM n=4096 at 25% local took 357k write-protect faults
        // on C. (With one detector per app most windows were waste, and
        // each such page then needed a cache frame and a write-back.)
        let rw =
            |st: &State, c: &Claimed| st.table.get(c.page).is_some_and(|m| m.has(flag::REWRITTEN));
        let run_rw = rw(&st, &pages[i]);
        let mut j = i + 1;
        while j < pages.len()
            && j - i < room
            && pages[j].page == pages[j - 1].page + PAGE as u64
            && still(&st, &pages[j])
            && rw(&st, &pages[j]) == run_rw
        {
            j += 1;
        }
        let len = (j - i) * PAGE;
        let src = buf[i * PAGE..].as_ptr();
        let (fill, n) = s.install(&mut st, pages[i].page, src, len, fault, writable || run_rw);
        if let Some(f) = fault {
            fault_done |= f.page >= pages[i].page && f.page < pages[i].page + (n * PAGE) as u64;
        }
        i += n;
        if i < j {
            // The reader fetching a fault itself gives up at once: the
            // pending event is its own to read; the fault comes again.
            if fill == Fill::Retry && attempts < RETRIES && !crate::session::in_reader() {
                attempts += 1;
                drop(st);
                drop(_r);
                std::thread::sleep(std::time::Duration::from_micros(20));
                continue;
            }
            revert(s, &mut st, &pages[i..j]);
            i = j;
        }
    }
    s.kick_if_pressed(&s.lock(), 0);
    if let Some(f) = fault {
        let _ = pager;
        s.finish(f, fault_done);
    }
}

/// Times an install waits out pending address-space events before giving up.
const RETRIES: usize = 200;

/// Prefetched pages into cache frames, while the app has room.
fn to_cache(s: &Session, pager: &Pager, pages: &[Claimed], buf: &[u8]) {
    let mut st = s.lock();
    for (i, c) in pages.iter().enumerate() {
        let wanted = st
            .table
            .get(c.page)
            .is_some_and(|m| m.place == Place::Fetching && m.gen == c.gen);
        if !wanted {
            continue;
        }
        // Cache frames count against the app's limit too.
        let frame = if s.room(&st) > 0 {
            pager.cache.alloc()
        } else {
            None
        };
        match frame {
            Some(frame) => {
                pager.cache.write(frame, &buf[i * PAGE..(i + 1) * PAGE]);
                if let Some(m) = st.table.get_mut(c.page) {
                    m.frame = frame;
                }
                st.place(c.page, Place::Cached);
                st.push_cached(c.page);
            }
            None => st.place(c.page, Place::Remote),
        }
    }
    drop(st);
    // Faults that arrived meanwhile wait on these pages.
    s.wake_pages(pages.iter().map(|c| c.page));
}
