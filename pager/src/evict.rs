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

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::app::recv_msg;
use crate::pager::Pager;
use crate::pages::{flag, Place, NO_FRAME, NO_SLOT};
use crate::remote::{checksum, Batch};
use crate::session::Session;
use crate::stats::Latencies;
use crate::sys::{self, Fill, PAGE};
use crate::wire::{self, EvictEntry, EvictStatus, Msg, NO_COPY};

struct Victim {
    page: u64,
    /// Cache frame reserved for it, or NO_FRAME when it is just dropped.
    frame: u32,
}

/// Runs until the session ends.
pub fn run(s: &Arc<Session>, pager: &Pager) {
    let mut warned = false;
    while !s.is_dead() {
        s.wait_kick(Duration::from_millis(20));
        let Some(_pass) = s.begin_eviction_pass() else {
            continue; // held: the app is forking
        };
        let high = s.limit_pages.saturating_sub(2 * s.batch);
        let low = s.limit_pages.saturating_sub(3 * s.batch);
        let (local, cached) = {
            let st = s.lock();
            (Session::local(&st), st.counts.cached)
        };
        if local <= high {
            s.lock().stuck = false;
            continue;
        }
        let mut local = local;
        let mut cached = cached;
        let mut no_space = false;
        while local > low && !s.is_dead() && !s.held() {
            let quota = cache_quota(s, pager);
            let progress = if cached >= quota || pager.cache.free_frames() < s.batch / 2 {
                shrink_cache(s, pager, &mut no_space) || evict_resident(s, pager, false)
            } else {
                evict_resident(s, pager, true)
            };
            let st = s.lock();
            local = Session::local(&st);
            cached = st.counts.cached;
            drop(st);
            if !progress && !no_space {
                // Nothing evictable right now (pages in transit): wait.
                break;
            }
            if no_space {
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
                            "no memory node has room: letting the app exceed its local limit \
                             rather than lose data"
                        );
                    }
                }
                break;
            }
        }
    }
}

/// This app's share of the cache tier, in frames.
fn cache_quota(s: &Session, pager: &Pager) -> usize {
    (s.limit_pages / 4)
        .min(pager.cache.frames() / pager.live_sessions().max(1))
        .max(s.batch)
}

/// Moves a batch of resident pages out of the app. With `to_cache`, victims
/// get cache frames; otherwise only pages that need no copy are taken.
fn evict_resident(s: &Session, pager: &Pager, to_cache: bool) -> bool {
    let t0 = Instant::now();
    let mut victims: Vec<Victim> = Vec::with_capacity(s.batch);
    let mut entries: Vec<EvictEntry> = Vec::with_capacity(s.batch);
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
            let m = *m;
            // Clean pages whose content is zeros or part of a stream are
            // dropped; others get a cache frame, their second chance.
            let drop_clean = !m.dirty() && (m.slot == NO_SLOT || m.has(flag::STREAMED));
            let frame = if drop_clean {
                NO_FRAME
            } else if to_cache {
                pager.cache.alloc().unwrap_or(NO_FRAME)
            } else {
                NO_FRAME
            };
            if frame == NO_FRAME && m.dirty() {
                // Needs a frame it cannot get now: keep it, try later.
                st.push_resident(page);
                continue;
            }
            st.place(page, Place::Evicting);
            if let Some(m) = st.table.get_mut(page) {
                m.set(flag::OUR_REMOVE);
            }
            if m.dirty() {
                dirty.push(page);
            }
            let slot = if frame == NO_FRAME {
                NO_COPY
            } else {
                victims.len() as u32
            };
            entries.push(EvictEntry { addr: page, slot });
            victims.push(Victim { page, frame });
        }
        // Freeze the content of dirty victims: writers now wait in the
        // pager. Clean ones are write-protected already (that is how they
        // stay clean). One ioctl per contiguous run.
        let failed = write_protect_runs(s, &dirty);
        if !failed.is_empty() {
            // An address-space event is pending: keep those pages for later.
            let mut k = 0;
            while k < victims.len() {
                if failed.contains(&victims[k].page) {
                    let v = victims.remove(k);
                    entries.remove(k);
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
            for (i, e) in entries.iter_mut().enumerate() {
                if e.slot != NO_COPY {
                    e.slot = i as u32;
                }
            }
        }
    }
    if victims.is_empty() {
        return false;
    }
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
            for v in &victims {
                if v.frame != NO_FRAME {
                    pager.cache.release(v.frame);
                }
            }
            return false;
        }
    };
    let t_agent = t0.elapsed();
    let c = &s.counters;
    let mut page_buf = vec![0u8; PAGE];
    {
        let mut st = s.lock();
        for (i, v) in victims.iter().enumerate() {
            let Some(m) = st.table.get(v.page).copied() else {
                continue;
            };
            if m.place != Place::Evicting || status[i] == EvictStatus::Unmapped {
                // Freed, unmapped or moved by the app meanwhile.
                if v.frame != NO_FRAME {
                    pager.cache.release(v.frame);
                }
                continue;
            }
            c.add(&c.evictions, 1);
            if v.frame != NO_FRAME {
                sys::mapping_read(&s.staging, i * PAGE, &mut page_buf);
                pager.cache.write(v.frame, &page_buf);
                if let Some(m) = st.table.get_mut(v.page) {
                    m.frame = v.frame;
                }
                st.place(v.page, Place::Cached);
                st.push_cached(v.page);
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
                if let Some(m) = st.table.get_mut(v.page) {
                    m.clear(flag::PREFETCHED);
                }
                st.place(v.page, to);
            }
        }
    }
    // Writers that hit a victim wait for this: they fault again and find it.
    s.wake_pages(victims.iter().map(|v| v.page));
    debug!(
        session = s.id,
        pages = victims.len(),
        copied = entries.iter().filter(|e| e.slot != NO_COPY).count(),
        prep_us = t_prep.as_micros() as u64,
        agent_us = (t_agent - t_prep).as_micros() as u64,
        total_us = t0.elapsed().as_micros() as u64,
        "evicted"
    );
    Latencies::record(&s.lat.evict, t0.elapsed());
    true
}

/// Write-protects `pages` in contiguous runs; returns the pages of runs
/// that could not be protected now.
fn write_protect_runs(s: &Session, pages: &[u64]) -> Vec<u64> {
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

/// Moves the app's oldest cache pages out: drop clean, write back dirty.
/// Sets `no_space` when dirty pages could not be placed on any memory node.
fn shrink_cache(s: &Session, pager: &Pager, no_space: &mut bool) -> bool {
    let mut dropped = 0usize;
    let mut pages: Vec<(u64, u32)> = Vec::new(); // (page, old slot)
    let mut data: Vec<u8> = Vec::new();
    {
        let mut st = s.lock();
        let limit = st.cache_fifo.len();
        let mut scanned = 0;
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
            if !m.dirty() {
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
            if let Some(pm) = st.table.get_mut(page) {
                pm.set(flag::WRITEBACK);
            }
            let at = data.len();
            data.resize(at + PAGE, 0);
            pager.cache.read(m.frame, &mut data[at..]);
            pages.push((page, m.slot));
        }
    }
    if pages.is_empty() {
        return dropped > 0;
    }
    let outcome = pager
        .space
        .alloc(pages.len())
        .map_err(|e| (e, Vec::new()))
        .and_then(
            |slots| match Batch::new(&pager.space, &slots).write(&data) {
                Ok(()) => Ok(slots),
                Err(e) => Err((e, slots)),
            },
        );
    let c = &s.counters;
    let mut st = s.lock();
    match outcome {
        Ok(slots) => {
            // Pages can leave again: hold faults back at the limit.
            st.stuck = false;
            for (i, &(page, old)) in pages.iter().enumerate() {
                let crc = checksum(&data[i * PAGE..(i + 1) * PAGE]);
                let m = st.table.get(page).copied();
                match m {
                    Some(m) if m.place == Place::Cached && m.has(flag::WRITEBACK) => {
                        pager.cache.release(m.frame);
                        pager.space.decref(old);
                        if let Some(pm) = st.table.get_mut(page) {
                            pm.clear(flag::WRITEBACK | flag::DIRTY | flag::PREFETCHED);
                            pm.slot = slots[i];
                            pm.crc = crc;
                            pm.frame = NO_FRAME;
                        }
                        st.place(page, Place::Remote);
                        c.add(&c.bytes_written_back, PAGE as u64);
                    }
                    // Freed by the app during the write: the new copy is garbage.
                    _ => pager.space.decref(slots[i]),
                }
            }
        }
        Err((e, slots)) => {
            *no_space = true;
            for s2 in slots {
                pager.space.decref(s2);
            }
            // The evictor warns once when this leaves the app over its limit.
            debug!(
                session = s.id,
                "write-back failed, keeping the pages local: {e}"
            );
            for &(page, _) in pages.iter().rev() {
                if let Some(pm) = st.table.get_mut(page) {
                    pm.clear(flag::WRITEBACK);
                }
                if st.table.get(page).is_some_and(|m| m.place == Place::Cached) {
                    if let Some(pm) = st.table.get_mut(page) {
                        pm.set(flag::IN_CACHE_FIFO);
                    }
                    st.cache_fifo.push_front(page);
                }
            }
            drop(st);
            s.wake_pages(pages.iter().map(|p| p.0));
            return dropped > 0;
        }
    }
    drop(st);
    s.wake_pages(pages.iter().map(|p| p.0));
    true
}
