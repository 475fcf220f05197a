//! The evictor of one app: keeps its local pages (resident + cached) under
//! its limit, in batches, off the fault path.
//!
//! Resident victims are taken FIFO (pages present in the app are invisible
//! to the pager: no access bits), write-protected so their content freezes,
//! copied out by the app's agent into the staging memfd and dropped by it
//! with MADV_DONTNEED; they land in cache frames, their second chance.
//! Clean pages whose content is zeros are just dropped. When the app's
//! share of the cache is full, its oldest cache pages leave: clean ones
//! (valid remote copy) are dropped, dirty ones are written back to fresh
//! slots and their frames freed only once every memory node involved has
//! acknowledged the write. A dirty page is never dropped before that.
//!
//! Write-backs run on a thread of their own, one at a time per app: the
//! evictor waits for one as long as the reader holds faults back at the
//! limit ([`HOLD_BACK`]), then lets the app exceed its limit while the
//! write-back finishes or fails in the background. A node that does not
//! answer therefore costs the app one hold-back, not a --fetch-timeout per
//! batch; its pages stay in their cache frames (faults on them are served
//! from there), and once it is known down placement goes elsewhere.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::app::recv_msg;
use crate::pager::Pager;
use crate::pages::{flag, Place, NO_FRAME, NO_SLOT, SPARED, UNMOVABLE};
use crate::placement::Batch;
use crate::remote::checksum;
use crate::session::{Session, HOLD_BACK};
use crate::stats::Latencies;
use crate::sys::{self, Fill, PAGE};
use crate::wire::{self, EvictEntry, EvictStatus, Msg, NO_COPY};

struct Victim {
    page: u64,
    /// Cache frame reserved for it, or NO_FRAME when it is just dropped.
    frame: u32,
    /// Write-protected for this eviction (see `evict_resident`).
    frozen: bool,
}

/// A write-back running on its own thread.
struct InFlight {
    started: Instant,
    /// The outcome, sent once the pages are settled (kept or freed).
    done: Receiver<Result<(), String>>,
    thread: JoinHandle<()>,
}

/// Runs until the session ends.
pub fn run(s: &Arc<Session>, pager: &Arc<Pager>) {
    let mut warned = false;
    let mut inflight: Option<InFlight> = None;
    while !s.is_dead() {
        s.wait_kick(Duration::from_millis(20));
        let Some(_pass) = s.begin_eviction_pass() else {
            continue; // held: the app is forking
        };
        crate::contain::failpoint("evict");
        let high = s.high_water();
        let low = high.saturating_sub(s.batch);
        let (local, cached) = {
            let st = s.lock();
            (Session::pressure(&st), st.counts.cached)
        };
        if local <= high {
            s.lock().stuck = false;
            continue;
        }
        let mut local = local;
        let mut cached = cached;
        let mut no_space: Option<String> = None;
        while local > low && !s.is_dead() && !s.held() {
            let quota = cache_quota(s, pager);
            let progress = if cached >= quota || pager.cache.free_frames() < s.batch / 2 {
                shrink_cache(s, pager, &mut inflight, &mut no_space)
                    || evict_resident(s, pager, false)
            } else {
                evict_resident(s, pager, true)
            };
            let st = s.lock();
            local = Session::pressure(&st);
            cached = st.counts.cached;
            drop(st);
            if !progress && no_space.is_none() {
                // Nothing evictable right now (pages in transit): wait.
                break;
            }
            if let Some(why) = &no_space {
                let mut st = s.lock();
                if !st.stuck {
                    st.stuck = true;
                    let c = &s.counters;
                    c.add(&c.limit_exceeded, 1);
                    if !warned {
                        warned = true;
                        warn!(
                            session = s.id,
                            pid = s.pid,
                            "cannot move pages to a memory node ({why}): letting the app \
                             exceed its local limit rather than lose data"
                        );
                    }
                }
                break;
            }
        }
    }
    // The pages of a write-back still in flight are settled before the
    // session is torn down (its slots are then released with the rest).
    if let Some(f) = inflight {
        let _ = f.thread.join();
    }
}

/// The cache tier's share of an app's limit is 1 / this. A page in the
/// cache left the app by a whole eviction and comes back by a fault, so a
/// hot page is better kept resident: a smaller share makes the FIFO of
/// resident pages longer. Measured 2026-12-03, interleaved, numpy GEMM
/// n=1536 at 50% local: 1.00/1.14/0.99 s at 1/8 against 1.21-1.27 s at
/// 1/4 (20% fewer evictions), 1/2 worse again; k-means alike at 1/4 and 1/8.
pub const CACHE_SHARE_DIV: usize = 8;

/// This app's share of the cache tier, in frames.
fn cache_quota(s: &Session, pager: &Pager) -> usize {
    (s.limit_pages / CACHE_SHARE_DIV)
        .min(pager.cache.frames() / pager.live_sessions().max(1))
        .max(s.batch)
}

/// Whether dirty victims go to the agent unfrozen (see `evict_resident`).
/// Off for some hours on 2026-12-06 while it was blamed for the arena being
/// sampled over its limit, which was the test's smaps reading. On again
/// after an A/B with the corrected tests, interleaved: GEMM n=4096 at 25%
/// local 11.33 -> 10.43 s median (five pairs); at 50% and for k-means
/// within noise (docs/pager.md, *Performance*).
const MOVE_UNFROZEN: bool = true;

/// Moves a batch of resident pages out of the app. With `to_cache`, victims
/// get cache frames; otherwise only pages that need no copy are taken.
fn evict_resident(s: &Session, pager: &Pager, to_cache: bool) -> bool {
    let t0 = Instant::now();
    let mut victims: Vec<Victim> = Vec::with_capacity(s.batch);
    let mut dirty: Vec<u64> = Vec::new();
    {
        let _r = s.mm.read().unwrap_or_else(|p| p.into_inner());
        let mut st = s.lock();
        let mut scanned = 0;
        let limit = st.resident_fifo.len();
        while victims.len() < s.batch && scanned < limit {
            scanned += 1;
            let Some(page) = st.resident_fifo.pop_front() else {
                break;
            };
            let Some(m) = st.table.get_mut(page) else {
                continue;
            };
            m.clear(flag::IN_RESIDENT_FIFO);
            if m.place != Place::Resident {
                continue;
            }
            if m.dirty() && m.frame == NO_FRAME {
                // A dirty page goes round once more before it leaves: it
                // costs a copy, a write-back and a fetch to evict, where a
                // clean one is dropped for free. Without access bits this
                // is the one sign of a page's worth the pager has: an
                // array written on every pass (a GEMM's output, live
                // temporaries) outlives inputs streamed through once.
                m.frame = SPARED;
                st.push_resident(page);
                continue;
            }
            let m = *m;
            // A clean page whose only copy lives on a node that is down
            // is kept like a dirty one: that copy may be gone for good.
            let needs_copy = m.dirty() || (m.slot != NO_SLOT && !pager.space.slot_usable(m.slot));
            // Clean pages whose content is zeros or part of a stream are
            // dropped; others get a cache frame, their second chance.
            let drop_clean = !needs_copy && (m.slot == NO_SLOT || m.has(flag::STREAMED));
            let frame = if drop_clean {
                NO_FRAME
            } else if to_cache {
                pager.cache.alloc().unwrap_or(NO_FRAME)
            } else {
                NO_FRAME
            };
            if frame == NO_FRAME && needs_copy {
                // Needs a frame it cannot get now: keep it, try later.
                st.push_resident(page);
                continue;
            }
            st.place(page, Place::Evicting);
            if let Some(m) = st.table.get_mut(page) {
                m.set(flag::OUR_REMOVE);
            }
            // Clean pages are write-protected already (that is how they
            // stay clean). Dirty ones are left writable: the agent takes
            // them out with UFFDIO_MOVE, which takes a page together with
            // every write made to it before, and a write after finds the
            // page missing and waits in the pager. Only those the agent
            // could not move before (shared with a forked child), or all
            // where it cannot move any, are write-protected, so that it
            // may copy them and drop them instead. Write-protecting every
            // dirty victim cost an ioctl and a TLB shootdown per run, and
            // victims taken FIFO come in runs of 1.4 pages: a quarter of the
            // evictor's time at GEMM n=4096, 25% local.
            let frozen = !m.dirty()
                || m.frame == UNMOVABLE
                || !MOVE_UNFROZEN
                || s.freeze_all.load(std::sync::atomic::Ordering::Relaxed);
            if m.dirty() && frozen {
                dirty.push(page);
            }
            victims.push(Victim {
                page,
                frame,
                frozen,
            });
        }
        // Freeze the content of dirty victims taken that way: writers now
        // wait in the pager. One ioctl per contiguous run.
        dirty.sort_unstable();
        let failed = write_protect_runs(s, &dirty);
        if !failed.is_empty() {
            // An address-space event is pending: keep those pages for later.
            let mut k = 0;
            while k < victims.len() {
                if failed.contains(&victims[k].page) {
                    let v = victims.remove(k);
                    if v.frame != NO_FRAME {
                        pager.cache.release(v.frame);
                    }
                    if let Some(m) = st.table.get_mut(v.page) {
                        m.clear(flag::OUR_REMOVE);
                    }
                    st.place(v.page, Place::Resident);
                    st.push_resident(v.page);
                } else {
                    k += 1;
                }
            }
        }
        for v in &victims {
            st.in_flight.start(v.page);
        }
    }
    if victims.is_empty() {
        return false;
    }
    // In address order: the agent drops contiguous victims with one
    // MADV_DONTNEED, and each call waits for the uffd reader to see its
    // REMOVE event (in FIFO order nearly every page was a call of its own).
    victims.sort_unstable_by_key(|v| v.page);
    let entries: Vec<EvictEntry> = victims
        .iter()
        .enumerate()
        .map(|(i, v)| EvictEntry {
            frozen: v.frozen,
            addr: v.page,
            slot: if v.frame == NO_FRAME {
                NO_COPY
            } else {
                i as u32
            },
        })
        .collect();
    // Staging slots are indexed by victim position; the staging area holds
    // a whole batch.
    let t_prep = t0.elapsed();
    let batch = s
        .next_batch
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let msg = wire::encode(&Msg::Evict {
        batch,
        entries: entries.clone(),
    });
    let status = match sys::send_with_fds(s.sock.as_raw_fd(), &msg, &[])
        .map_err(|e| e.to_string())
        .and_then(|()| await_evicted(s, batch, victims.len()))
    {
        Ok(st) => st,
        Err(e) => {
            debug!(session = s.id, "eviction abandoned: {e}");
            // The app is gone or broken; the session is ending.
            s.dead.store(true, std::sync::atomic::Ordering::Release);
            s.lock().in_flight.clear();
            for v in &victims {
                if v.frame != NO_FRAME {
                    pager.cache.release(v.frame);
                }
            }
            return false;
        }
    };
    let t_agent = t0.elapsed();
    if victims.iter().any(|v| !v.frozen) && !status.contains(&EvictStatus::Moved) {
        // The agent moved nothing: it cannot (no UFFDIO_MOVE in this
        // kernel), or every page was shared with a forked child. Freeze
        // every dirty victim from now on, as before moves existed.
        s.freeze_all
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let c = &s.counters;
    let mut woken = Vec::with_capacity(victims.len());
    let mut lost = None;
    {
        let mut st = s.lock();
        for (i, v) in victims.iter().enumerate() {
            let release = |frame: u32| {
                if frame != NO_FRAME {
                    pager.cache.release(frame);
                }
            };
            // Where the app has moved the victim since (mremap), if at all.
            // Without an address another page was moved over its state
            // (the app is being stopped: see `Session::on_remap`).
            let Some(page) = st.in_flight.finish(v.page) else {
                release(v.frame);
                continue;
            };
            woken.push(page);
            let Some(m) = st.table.get(page).copied() else {
                release(v.frame);
                continue;
            };
            if m.place != Place::Evicting {
                // Freed or unmapped by the app meanwhile.
                release(v.frame);
                continue;
            }
            if page == v.page && st.vanished.contains(&page) {
                // Gone from the app with nothing to say where (see
                // `Session::note_vanished`): what the agent copied is the
                // zeros it was served. Never hand those to the app.
                release(v.frame);
                lost.get_or_insert(page);
                continue;
            }
            match status[i] {
                EvictStatus::Kept => {
                    // Not frozen and not movable (shared with a forked
                    // child): the agent left it in the app, untouched.
                    // The next eviction freezes it first.
                    c.add(&c.kept_victims, 1);
                    release(v.frame);
                    if page != v.page {
                        // The app moved it meanwhile.
                        stays_resident(&mut st, page);
                        continue;
                    }
                    // No REMOVE of ours comes for a page left in place. If
                    // its flag is gone, a REMOVE did come: the app's own
                    // DONTNEED (the move failed on the hole it left),
                    // taken for ours. The app freed the page.
                    if !m.has(flag::OUR_REMOVE) {
                        s.forget(pager, &mut st, page);
                        continue;
                    }
                    if let Some(m) = st.table.get_mut(page) {
                        m.clear(flag::OUR_REMOVE);
                    }
                    st.place(page, Place::Resident);
                    if let Some(m) = st.table.get_mut(page) {
                        m.frame = UNMOVABLE;
                    }
                    st.push_resident(page);
                    continue;
                }
                EvictStatus::Unmapped => {
                    // The agent found nothing at the victim's origin and
                    // dropped nothing: the app moved the page away before
                    // the agent came, and its data went with the mapping.
                    // (Were it unmapped, its UNMAP would have made it Zero
                    // already, or will.) A REMOVE at the origin meanwhile
                    // was not the agent's, which dropped nothing: the app
                    // freed the page (the agent drops freed blocks it kept
                    // before it answers).
                    release(v.frame);
                    if page == v.page && !m.has(flag::OUR_REMOVE) {
                        s.forget(pager, &mut st, page);
                        continue;
                    }
                    stays_resident(&mut st, page);
                    continue;
                }
                EvictStatus::Moved => {
                    // No REMOVE event of ours comes for a moved page. If its
                    // flag is gone, a REMOVE did come: the app's own
                    // DONTNEED, taken for ours. The app freed the page.
                    if !m.has(flag::OUR_REMOVE) {
                        release(v.frame);
                        s.forget(pager, &mut st, page);
                        continue;
                    }
                    if let Some(m) = st.table.get_mut(page) {
                        m.clear(flag::OUR_REMOVE);
                    }
                }
                // Copied and dropped at its origin: the REMOVE of that
                // drop clears (or has cleared) OUR_REMOVE. If the app moved
                // the page since and it is present where it went, the data
                // travelled with the mapping instead (the agent read and
                // dropped whatever was left at the origin: an mremap with
                // MREMAP_DONTUNMAP leaves it mapped and empty).
                EvictStatus::Done => {
                    if page != v.page && sys::pages_present(s.pid, &[page]) == [true] {
                        release(v.frame);
                        stays_resident(&mut st, page);
                        continue;
                    }
                }
            }
            c.add(&c.evictions, 1);
            if v.frame != NO_FRAME {
                let copy = sys::mapping_bytes(&s.staging, i * PAGE, PAGE);
                if is_zero(copy) {
                    // Written, but all zeros (a zero fill ahead of a stream
                    // that never came, a memset): nothing to keep or write
                    // back; a fault reads zeros again.
                    pager.cache.release(v.frame);
                    c.add(&c.clean_drops, 1);
                    c.add(&c.zero_victims, 1);
                    let old = m.slot;
                    if let Some(m) = st.table.get_mut(page) {
                        m.slot = NO_SLOT;
                        m.clear(flag::DIRTY | flag::PREFETCHED);
                    }
                    pager.space.decref(old);
                    st.place(page, Place::Zero);
                    continue;
                }
                pager.cache.write(v.frame, copy);
                if let Some(m) = st.table.get_mut(page) {
                    m.frame = v.frame;
                }
                st.place(page, Place::Cached);
                st.push_cached(page);
            } else {
                c.add(&c.clean_drops, 1);
                if m.has(flag::PREFETCHED) {
                    c.add(&c.prefetch_waste, 1);
                }
                let to = if m.slot == NO_SLOT {
                    Place::Zero
                } else {
                    Place::Remote
                };
                if let Some(m) = st.table.get_mut(page) {
                    m.clear(flag::PREFETCHED);
                }
                st.place(page, to);
            }
        }
        // Every agent fault of this batch came before its answer.
        st.vanished.clear();
    }
    if let Some(page) = lost {
        s.fatal(&format!(
            "internal error: page {page:#x} vanished from the program while it was being \
             evicted, and its data is lost. This is a dmem bug, please report it"
        ));
        return false;
    }
    // Writers that hit a victim wait for this: they fault again and find it.
    woken.sort_unstable();
    s.wake_pages(woken);
    debug!(
        session = s.id,
        pages = victims.len(),
        copied = entries.iter().filter(|e| e.slot != NO_COPY).count(),
        moved = status.iter().filter(|&&x| x == EvictStatus::Moved).count(),
        kept = status.iter().filter(|&&x| x == EvictStatus::Kept).count(),
        runs = 1 + entries
            .windows(2)
            .filter(|w| w[1].addr != w[0].addr + PAGE as u64)
            .count(),
        prep_us = t_prep.as_micros() as u64,
        agent_us = (t_agent - t_prep).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "evicted"
    );
    Latencies::record(&s.lat.evict, t0.elapsed());
    true
}

/// A victim whose data stayed in the app (it travelled with an mremap):
/// it is resident again, and dirty (its write-protection is not relied on
/// after a move).
fn stays_resident(st: &mut crate::session::State, page: u64) {
    if let Some(m) = st.table.get_mut(page) {
        m.clear(flag::OUR_REMOVE);
        m.set(flag::DIRTY);
    }
    st.place(page, Place::Resident);
    st.push_resident(page);
}

/// Whether a page holds only zero bytes.
fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

/// Write-protects `pages` in contiguous runs; returns the pages of runs
/// that could not be protected now.
pub(crate) fn write_protect_runs(s: &Session, pages: &[u64]) -> Vec<u64> {
    let mut failed = Vec::new();
    let mut i = 0;
    while i < pages.len() {
        let mut j = i + 1;
        while j < pages.len() && pages[j] == pages[j - 1] + PAGE as u64 {
            j += 1;
        }
        if sys::uffd_writeprotect(s.uffd(), pages[i], (j - i) * PAGE, true) != Ok(Fill::Done) {
            failed.extend_from_slice(&pages[i..j]);
        }
        i = j;
    }
    failed
}

/// Waits for the agent's answer to batch `batch`.
fn await_evicted(s: &Session, batch: u64, n: usize) -> Result<Vec<EvictStatus>, String> {
    let mut buf = vec![0u8; wire::MAX_MSG];
    loop {
        if s.is_dead() {
            return Err("session ended".into());
        }
        match sys::poll_in(s.sock.as_raw_fd(), 200) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return Err(e.to_string()),
        }
        match recv_msg(&s.sock, &mut buf) {
            Ok((Some(Msg::Evicted { batch: b, status }), _)) if b == batch && status.len() == n => {
                return Ok(status)
            }
            Ok((Some(other), _)) => return Err(format!("unexpected agent message {other:?}")),
            Ok((None, _)) => return Err("agent channel closed".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Moves the app's oldest cache pages out: drop clean, write back dirty
/// (and clean ones whose remote copy lives on a node that is down). Sets
/// `no_space` when pages could not be placed on any memory node, or when
/// the write-back in flight takes longer than the reader holds faults.
fn shrink_cache(
    s: &Arc<Session>,
    pager: &Arc<Pager>,
    inflight: &mut Option<InFlight>,
    no_space: &mut Option<String>,
) -> bool {
    if let Some(f) = inflight.as_ref() {
        let left = HOLD_BACK.saturating_sub(f.started.elapsed());
        match f.done.recv_timeout(left) {
            Ok(r) => {
                let f = inflight.take().expect("checked");
                let _ = f.thread.join();
                if let Err(e) = r {
                    *no_space = Some(e);
                    return false;
                }
                // Its pages left: measure again before taking more.
                return true;
            }
            Err(RecvTimeoutError::Timeout) => {
                *no_space = Some(format!(
                    "a write-back has been waiting for {:.1} s",
                    f.started.elapsed().as_secs_f64()
                ));
                return false;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // The thread ended without a word (it panicked): its pages
                // still carry WRITEBACK and will not be taken again.
                let f = inflight.take().expect("checked");
                let _ = f.thread.join();
                *no_space = Some("a write-back thread failed".into());
                return false;
            }
        }
    }
    let can_place = pager.space.may_place();
    let mut dropped = 0usize;
    let mut pages: Vec<WbPage> = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    {
        let mut st = s.lock();
        let limit = st.cache_fifo.len();
        let mut scanned = 0;
        let mut kept: Vec<u64> = Vec::new();
        while pages.len() + dropped < s.batch && scanned < limit {
            scanned += 1;
            let Some(page) = st.cache_fifo.pop_front() else {
                break;
            };
            let Some(m) = st.table.get_mut(page) else {
                continue;
            };
            m.clear(flag::IN_CACHE_FIFO);
            if m.place != Place::Cached || m.has(flag::WRITEBACK) {
                continue;
            }
            let m = *m;
            if !m.dirty() && (m.slot == NO_SLOT || pager.space.slot_usable(m.slot)) {
                pager.cache.release(m.frame);
                if m.has(flag::PREFETCHED) {
                    s.counters.add(&s.counters.prefetch_waste, 1);
                }
                let to = if m.slot == NO_SLOT {
                    Place::Zero
                } else {
                    Place::Remote
                };
                if let Some(pm) = st.table.get_mut(page) {
                    pm.frame = NO_FRAME;
                    pm.clear(flag::PREFETCHED);
                }
                st.place(page, to);
                dropped += 1;
                continue;
            }
            if !can_place {
                // Nowhere to write it: it stays, in its place in the FIFO.
                kept.push(page);
                continue;
            }
            let Some(pm) = st.table.get_mut(page) else {
                continue;
            };
            pm.set(flag::WRITEBACK);
            // A fault may take the page back meanwhile (served from its
            // frame); the generation tells the write-back it lost it.
            pm.gen = pm.gen.wrapping_add(1);
            let gen = pm.gen;
            let at = data.len();
            data.resize(at + PAGE, 0);
            pager.cache.read(m.frame, &mut data[at..]);
            pages.push(WbPage {
                page,
                old: m.slot,
                gen,
            });
        }
        for &page in kept.iter().rev() {
            if let Some(pm) = st.table.get_mut(page) {
                pm.set(flag::IN_CACHE_FIFO);
            }
            st.cache_fifo.push_front(page);
        }
    }
    if pages.is_empty() {
        if !can_place && dropped == 0 {
            *no_space = Some(if pager.space.nodes().is_empty() {
                "no memory node configured".into()
            } else {
                "no memory node is reachable and has room".into()
            });
        }
        return dropped > 0;
    }
    let job = Arc::new((pages, data));
    let (tx, rx) = mpsc::channel();
    let (s2, p2, j2) = (Arc::clone(s), Arc::clone(pager), Arc::clone(&job));
    let thread = std::thread::Builder::new()
        .name(format!("dmem-wb-{}", s.id))
        .spawn(move || {
            let r = write_back(&s2, &p2, &j2.0, &j2.1);
            // Faults held back at the limit may go on now.
            s2.kick_evictor();
            let _ = tx.send(r);
        });
    match thread {
        Ok(thread) => {
            *inflight = Some(InFlight {
                started: Instant::now(),
                done: rx,
                thread,
            });
            // Wait for it as a synchronous write-back would, up to the
            // hold-back; the result is taken on the next call otherwise.
            shrink_cache(s, pager, inflight, no_space) || dropped > 0
        }
        Err(e) => {
            warn!(
                session = s.id,
                "cannot start a write-back thread: {e}; writing back inline"
            );
            if let Err(e) = write_back(s, pager, &job.0, &job.1) {
                *no_space = Some(e);
                return dropped > 0;
            }
            true
        }
    }
}

/// A cache page being written back.
#[derive(Debug, Clone, Copy)]
struct WbPage {
    page: u64,
    /// Its remote copy before, released once the new one is acknowledged.
    old: u32,
    gen: u16,
}

/// Places and writes `pages` (their bytes in `data`), then settles them:
/// acknowledged pages leave their frames for their new slots; on failure
/// they stay cached and dirty, back at the head of the cache FIFO.
fn write_back(s: &Session, pager: &Pager, pages: &[WbPage], data: &[u8]) -> Result<(), String> {
    let outcome = pager
        .space
        .alloc(pages.len())
        .map_err(|e| (e, Vec::new()))
        .and_then(|slots| {
            let sealed;
            let out = match &pager.sealer {
                // Memory nodes get ciphertext only (the checksum below is
                // of the plaintext, as the fetch checks it after opening).
                Some(sealer) => {
                    let mut buf = data.to_vec();
                    for (i, &slot) in slots.iter().enumerate() {
                        sealer.seal(slot, &mut buf[i * PAGE..(i + 1) * PAGE]);
                    }
                    sealed = buf;
                    &sealed[..]
                }
                None => data,
            };
            match Batch::write_all(&pager.space, &slots).write(out) {
                Ok(()) => Ok(slots),
                Err(e) => Err((e, slots)),
            }
        });
    let c = &s.counters;
    let mut st = s.lock();
    let still = |st: &crate::session::State, p: &WbPage| {
        st.table
            .get(p.page)
            .is_some_and(|m| m.place == Place::Cached && m.has(flag::WRITEBACK) && m.gen == p.gen)
    };
    let result = match outcome {
        Ok(slots) => {
            // Pages can leave again: hold faults back at the limit.
            st.stuck = false;
            for (i, p) in pages.iter().enumerate() {
                if !still(&st, p) {
                    // Freed or taken back by the app meanwhile: this copy
                    // is not its content any more.
                    pager.space.decref(slots[i]);
                    continue;
                }
                let crc = checksum(&data[i * PAGE..(i + 1) * PAGE]);
                let Some(pm) = st.table.get_mut(p.page) else {
                    continue;
                };
                let frame = pm.frame;
                pm.clear(flag::WRITEBACK | flag::DIRTY | flag::PREFETCHED);
                pm.slot = slots[i];
                pm.crc = crc;
                pm.frame = NO_FRAME;
                pager.cache.release(frame);
                pager.space.decref(p.old);
                st.place(p.page, Place::Remote);
                c.add(&c.bytes_written_back, PAGE as u64);
            }
            Ok(())
        }
        Err((e, slots)) => {
            for s2 in slots {
                pager.space.decref(s2);
            }
            // The evictor warns once when this leaves the app over its limit.
            debug!(
                session = s.id,
                "write-back failed, keeping the pages local: {e}"
            );
            for p in pages.iter().rev() {
                if !still(&st, p) {
                    continue;
                }
                let Some(pm) = st.table.get_mut(p.page) else {
                    continue;
                };
                pm.clear(flag::WRITEBACK);
                if !pm.has(flag::IN_CACHE_FIFO) {
                    pm.set(flag::IN_CACHE_FIFO);
                    st.cache_fifo.push_front(p.page);
                }
            }
            Err(e.to_string())
        }
    };
    drop(st);
    s.wake_pages(pages.iter().map(|p| p.page));
    result
}
