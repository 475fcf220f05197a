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
use crate::remote::{checksum, Batch, RemoteError};
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
    pub fault: Fault,
    pub demand: Vec<Claimed>,
    pub prefetch: Vec<Claimed>,
    /// Install prefetched pages into the app (else into the cache tier).
    pub direct: bool,
}

fn claim_page(st: &mut State, page: u64, prefetched: bool) -> Option<Claimed> {
    let m = st.table.get_mut(page)?;
    if m.place != Place::Remote {
        return None;
    }
    m.gen = m.gen.wrapping_add(1);
    if prefetched {
        m.set(flag::PREFETCHED);
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

/// Claims the faulting page's block and the prefetch window (reader side).
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
    let block_pages = (pager.cfg.block / PAGE) as i64;
    let outcome = st
        .prefetch
        .on_fault((f.page / PAGE as u64) as i64 / block_pages);
    let c = &session.counters;
    if outcome.consumed > 0 {
        // The stream went past the last window: those pages were used.
        for pg in std::mem::take(&mut st.last_prefetch) {
            if let Some(m) = st.table.get_mut(pg) {
                if m.has(flag::PREFETCHED) {
                    m.clear(flag::PREFETCHED);
                    c.add(&c.prefetch_hits, 1);
                }
            }
        }
    }
    let mut prefetch = Vec::new();
    if let Some(plan) = outcome.plan {
        for k in 0..plan.count as i64 {
            let b = plan.start + k * plan.stride;
            if b < 0 {
                break;
            }
            for i in 0..block_pages {
                let pg = ((b * block_pages + i) as u64) * PAGE as u64;
                if st.table.get(pg).is_none() {
                    continue;
                }
                if let Some(cl) = claim_page(st, pg, true) {
                    prefetch.push(cl);
                }
            }
        }
        st.last_prefetch = prefetch.iter().map(|c| c.page).collect();
        c.add(&c.prefetch_issued, prefetch.len() as u64);
    }
    let room = session.limit_pages.saturating_sub(session.batch);
    let direct = Session::local(st) + demand.len() + prefetch.len() <= room;
    FetchJob {
        session: Arc::clone(session),
        fault: *f,
        demand,
        prefetch,
        direct,
    }
}

/// Runs a fetch job on a worker thread.
pub fn run(job: FetchJob, pager: &Pager) {
    let s = &job.session;
    let t0 = Instant::now();
    let demand_slots: Vec<u32> = job.demand.iter().map(|c| c.slot).collect();
    let pf_slots: Vec<u32> = job.prefetch.iter().map(|c| c.slot).collect();
    let demand = Batch::new(&pager.space, &demand_slots);
    let pf = Batch::new(&pager.space, &pf_slots);
    let mut dbuf = vec![0u8; demand_slots.len() * PAGE];
    let mut pbuf = vec![0u8; pf_slots.len() * PAGE];
    // Post both, then wait: the prefetch travels while the demand installs.
    let posted = demand.post_read().and_then(|d| Ok((d, pf.post_read()?)));
    let (dpost, ppost) = match posted {
        Ok(x) => x,
        Err(e) => return lost(s, pager, &job.demand, e),
    };
    if let Err(e) = demand.finish_read(dpost, &mut dbuf) {
        return lost(s, pager, &job.demand, e);
    }
    if !verify(s, pager, &job.demand, &dbuf) {
        return;
    }
    Latencies::record(&s.lat.fetch, t0.elapsed());
    let c = &s.counters;
    c.add(&c.bytes_fetched, dbuf.len() as u64);
    c.add(&c.faults_remote, 1);
    install(s, pager, &job.demand, &dbuf, Some(&job.fault));

    if job.prefetch.is_empty() {
        return;
    }
    match pf.finish_read(ppost, &mut pbuf) {
        Ok(()) => {}
        Err(_) => {
            // The demand path reports lost data; here just give the pages back.
            let mut st = s.lock();
            revert(s, &mut st, &job.prefetch);
            return;
        }
    }
    if !verify(s, pager, &job.prefetch, &pbuf) {
        return;
    }
    c.add(&c.bytes_fetched, pbuf.len() as u64);
    if job.direct {
        install(s, pager, &job.prefetch, &pbuf, None);
    } else {
        to_cache(s, pager, &job.prefetch, &pbuf);
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

fn lost(s: &Session, pager: &Pager, pages: &[Claimed], e: RemoteError) {
    let node = pages
        .first()
        .map(|c| {
            pager
                .space
                .node(pager.space.locate(c.slot).node)
                .addr()
                .to_owned()
        })
        .unwrap_or_default();
    let addr = pages.first().map_or(0, |c| c.page);
    s.fatal(&format!(
        "dmem: page {addr:#x} could not be fetched from memory node {node}: {e}"
    ));
}

/// Checks every page against the checksum taken at write-back.
fn verify(s: &Session, pager: &Pager, pages: &[Claimed], buf: &[u8]) -> bool {
    for (i, c) in pages.iter().enumerate() {
        if checksum(&buf[i * PAGE..(i + 1) * PAGE]) != c.crc {
            let node = pager
                .space
                .node(pager.space.locate(c.slot).node)
                .addr()
                .to_owned();
            s.fatal(&format!(
                "dmem: memory node {node} returned a corrupted page for address {:#x} \
                 (checksum mismatch); refusing to serve it",
                c.page
            ));
            return false;
        }
    }
    true
}

/// Installs fetched pages still wanted, in contiguous runs.
fn install(s: &Session, pager: &Pager, pages: &[Claimed], buf: &[u8], fault: Option<&Fault>) {
    let _r = s.mm.read().unwrap_or_else(|p| p.into_inner());
    let mut st = s.lock();
    let still = |st: &State, c: &Claimed| {
        st.table
            .get(c.page)
            .is_some_and(|m| m.place == Place::Fetching && m.gen == c.gen)
    };
    let mut fill_fault = Fill::Retry;
    let mut fault_done = false;
    let mut i = 0;
    while i < pages.len() {
        if !still(&st, &pages[i]) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < pages.len()
            && pages[j].page == pages[j - 1].page + PAGE as u64
            && still(&st, &pages[j])
        {
            j += 1;
        }
        let len = (j - i) * PAGE;
        let (fill, n) = s.install(&mut st, pages[i].page, buf[i * PAGE..].as_ptr(), len, fault);
        if let Some(f) = fault {
            if f.page >= pages[i].page && f.page < pages[i].page + len as u64 {
                fill_fault = fill;
                fault_done = f.page < pages[i].page + (n * PAGE) as u64;
            }
        }
        revert(s, &mut st, &pages[i + n..j]);
        i = j;
    }
    drop(st);
    if let Some(f) = fault {
        let _ = pager;
        s.finish(fill_fault, f, fault_done);
    }
}

/// Prefetched pages into cache frames (no room in the app).
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
        match pager.cache.alloc() {
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
    for c in pages {
        s.wake(c.page, PAGE);
    }
}
