//! One app attached to the pager: its page table, its uffd reader (which
//! takes events in batches and resolves cheap faults itself), and the
//! bookkeeping shared by the fetch workers and its evictor.
//!
//! Locking: `mm` orders page installs against the app's REMOVE/UNMAP/REMAP
//! events. The reader holds it for writing while it reads a batch of events
//! and applies the address-space changes; installers hold it for reading
//! around UFFDIO_COPY. A copy therefore either lands before the event is
//! read (the kernel then fails it with EAGAIN, or the app's zap comes after
//! it) or after the event is applied (the page table no longer asks for it).
//! `st` guards the page table; it is taken inside `mm`, never across a
//! network wait.
//!
//! Faults that find their page on its way somewhere (evicting, fetching,
//! writing back) do nothing: every such transition ends by waking its pages,
//! and woken threads fault again if they still need to. A fault that cannot
//! be resolved now (EAGAIN) is answered the same way: wake, fault again.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};
use userfaultfd::{Event, EventBuffer, FaultKind, ReadWrite, Uffd};

use crate::forksnap::{ForkSnapshot, OutPage};
use crate::inflight::InFlight;
use crate::pager::Pager;
use crate::pages::{flag, PageMeta, PageTable, Place, NO_FRAME, NO_SLOT};
use crate::prefetch::{Prefetcher, Streams};
use crate::stats::{Counters, Latencies};
use crate::sys::{self, Fill, Mapping, PAGE};
use crate::wire::{self, Msg};

/// How long the reader holds back a fault that would take the app past its
/// limit while the evictor catches up; past it, the fault is served over
/// the limit. The evictor waits for a write-back as long, for the same
/// reason.
pub const HOLD_BACK: Duration = Duration::from_secs(2);

/// Why a forked child's session cannot take over its inherited arena.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("cannot read the child's page tables: {0}")]
    PageTables(nix::errno::Errno),
    #[error("cannot install the page at {0:#x} that its parent held in the cache tier ({1:?})")]
    Install(u64, Fill),
}

/// A page fault as read from the uffd.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub page: u64,
    pub write: bool,
    pub wp: bool,
    pub tid: i32,
    pub at: Instant,
}

/// Page counts by place.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    /// Present in the app (including pages being evicted).
    pub resident: usize,
    pub cached: usize,
    /// Only on a memory node (including pages being fetched).
    pub remote: usize,
    /// Being fetched (part of `remote`): local pages soon, which the
    /// evictor makes room for while they travel.
    pub fetching: usize,
}

impl Counts {
    fn slot(&mut self, p: Place) -> Option<&mut usize> {
        match p {
            Place::Resident | Place::Evicting => Some(&mut self.resident),
            Place::Cached => Some(&mut self.cached),
            Place::Remote | Place::Fetching => Some(&mut self.remote),
            Place::Zero => None,
        }
    }

    /// Moves a page between places, keeping the counts right.
    pub fn moved(&mut self, from: Place, to: Place) {
        if from == Place::Fetching {
            self.fetching -= 1;
        }
        if to == Place::Fetching {
            self.fetching += 1;
        }
        if let Some(c) = self.slot(from) {
            *c -= 1;
        }
        if let Some(c) = self.slot(to) {
            *c += 1;
        }
    }
}

pub struct State {
    pub table: PageTable,
    pub counts: Counts,
    pub resident_fifo: VecDeque<u64>,
    pub cache_fifo: VecDeque<u64>,
    pub prefetch: Streams,
    /// Most local pages (resident + cached) seen at any moment.
    pub peak_local: usize,
    /// First-touch stream: how far ahead zero fills reach.
    pub zero_stream: ZeroStream,
    /// Pages of demand fetches in flight: counted against the limit from
    /// the moment they are claimed, so that nothing else takes their room.
    pub reserved: usize,
    /// Eviction cannot make progress (no remote space): faults are served
    /// over the limit instead of being held back.
    pub stuck: bool,
    /// Victims of the eviction batch in flight, from the address the
    /// agent acts on to where the app has moved them since (mremap).
    pub in_flight: InFlight,
    /// The last page a missing fault found `Resident`, and how many times
    /// in a row (see `on_fault`).
    pub stray: (u64, u32),
    /// Victims in flight the agent found gone from the app although the
    /// app never freed them (see `on_fault`): their data is lost, and the
    /// evictor stops the app when it settles them.
    pub vanished: Vec<u64>,
}

/// Missing faults in a row on one page the pager holds resident before
/// the app is stopped (a legitimate race costs one or two).
const STRAY_LIMIT: u32 = 100_000;

/// Most pages a zero fill reaches ahead of its fault (256 KiB).
pub const ZERO_AHEAD_MAX: usize = 64;
/// With room to spare, a zero fault fills the whole aligned group of this
/// many pages around it (256 KiB), as the kernel fills a huge page: fresh
/// memory is rarely touched one page at a time. Zeros never written are
/// dropped for free when evicted (`evict`: all-zero victims).
pub const ZERO_AROUND: usize = 64;
/// Bytes of the zero source a fill may copy from, past one block.
pub const ZERO_FILL_MAX: usize = (ZERO_AROUND + ZERO_AHEAD_MAX + 1) * PAGE;

/// Detects an app touching fresh memory in address order: each fault just
/// past the previous fill doubles the window ahead (1, 2, 4 .. 64 pages);
/// any other fault resets it.
#[derive(Debug, Default)]
pub struct ZeroStream {
    next: u64,
    window: usize,
}

impl ZeroStream {
    /// Pages to fill ahead of a zero fault at `page`.
    pub fn on_fault(&mut self, page: u64) -> usize {
        self.window = if page == self.next && self.next != 0 {
            (self.window * 2).clamp(1, ZERO_AHEAD_MAX)
        } else {
            0
        };
        self.window
    }

    /// The fill ended before `end`.
    pub fn filled_to(&mut self, end: u64) {
        self.next = end;
    }
}

impl State {
    pub fn push_resident(&mut self, page: u64) {
        if let Some(m) = self.table.get_mut(page) {
            if !m.has(flag::IN_RESIDENT_FIFO) {
                m.set(flag::IN_RESIDENT_FIFO);
                self.resident_fifo.push_back(page);
            }
        }
    }

    pub fn push_cached(&mut self, page: u64) {
        if let Some(m) = self.table.get_mut(page) {
            if !m.has(flag::IN_CACHE_FIFO) {
                m.set(flag::IN_CACHE_FIFO);
                self.cache_fifo.push_back(page);
            }
        }
    }

    /// Sets a page's place, keeping counts and the peak of local pages.
    pub fn place(&mut self, page: u64, to: Place) {
        if let Some(m) = self.table.get_mut(page) {
            let from = m.place;
            m.place = to;
            if to == Place::Resident && from != Place::Resident {
                // Not spared yet in this residency (see `evict`).
                m.frame = NO_FRAME;
            }
            self.counts.moved(from, to);
            self.peak_local = self
                .peak_local
                .max(self.counts.resident + self.counts.cached);
        }
    }
}

thread_local! {
    /// Set in a session's uffd reader thread.
    static IN_READER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the calling thread is a uffd reader: it must not wait for
/// address-space events to be read, as it is the one that reads them.
pub fn in_reader() -> bool {
    IN_READER.with(|r| r.get())
}

pub struct Session {
    pub id: u64,
    pub pid: i32,
    agent_tid: i32,
    uffd: Uffd,
    pub limit_pages: usize,
    /// Eviction batch, and the distance between watermarks.
    pub batch: usize,
    pub mm: RwLock<()>,
    pub st: Mutex<State>,
    pub counters: Counters,
    pub lat: Latencies,
    pub staging: Mapping,
    pub sock: OwnedFd,
    pub dead: AtomicBool,
    kick: (Mutex<bool>, Condvar),
    pub next_batch: AtomicU64,
    /// Open holds (the app is forking): no eviction starts while > 0.
    holds: AtomicUsize,
    /// The app moved managed memory (a REMAP event) since its first open
    /// hold began: its page table is no longer as at the fork, so a forked
    /// child may not take its copies from it (see `adopt`).
    remapped_in_hold: AtomicBool,
    /// The evictor is in a pass (see `hold`).
    evicting: AtomicBool,
    /// The agent cannot move pages out (a kernel before 6.8): the evictor
    /// write-protects every dirty victim up front (see `evict`).
    pub freeze_all: AtomicBool,
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        pid: i32,
        agent_tid: i32,
        uffd: OwnedFd,
        arena: (u64, usize),
        limit_pages: usize,
        staging: Mapping,
        sock: OwnedFd,
        prefetch: Prefetcher,
    ) -> Session {
        let batch = Self::batch_for(limit_pages);
        debug_assert!(batch <= staging.len() / PAGE);
        // SAFETY: the descriptor was received over SCM_RIGHTS, checked to be
        // a userfaultfd, and is owned by nothing else.
        let uffd = unsafe { <Uffd as std::os::fd::FromRawFd>::from_raw_fd(into_raw(uffd)) };
        Session {
            id,
            pid,
            agent_tid,
            uffd,
            limit_pages,
            batch,
            mm: RwLock::new(()),
            st: Mutex::new(State {
                table: PageTable::new(arena.0, arena.1),
                counts: Counts::default(),
                resident_fifo: VecDeque::new(),
                cache_fifo: VecDeque::new(),
                prefetch: Streams::new(prefetch),
                peak_local: 0,
                reserved: 0,
                in_flight: InFlight::default(),
                stray: (0, 0),
                vanished: Vec::new(),
                zero_stream: ZeroStream::default(),
                stuck: false,
            }),
            counters: Counters::default(),
            lat: Latencies::default(),
            staging,
            sock,
            dead: AtomicBool::new(false),
            kick: (Mutex::new(false), Condvar::new()),
            next_batch: AtomicU64::new(1),
            holds: AtomicUsize::new(0),
            remapped_in_hold: AtomicBool::new(false),
            evicting: AtomicBool::new(false),
            freeze_all: AtomicBool::new(false),
        }
    }

    /// A forked child's session starts with what its inherited arena
    /// `[base, base+len)` held at the fork.
    ///
    /// Pages present in the child hold its data, so they are resident. A
    /// page that was clean in `parent` (its session, held since before the
    /// fork, so nothing there became clean since) equals the parent's
    /// remote copy: the child shares that slot (refcounted) and the page is
    /// write-protected again, since the child's fresh registration carries
    /// none of the parent's protections. Every other present page is dirty.
    ///
    /// Pages absent from the child that were out of the parent at the fork
    /// come from `snapshot` (see `forksnap`): a memory node's copy is
    /// shared (the snapshot's reference passes to the child), a cache
    /// page's bytes are installed into the child, dirty. Called before the
    /// session starts, while the child waits. Returns (pages adopted, of
    /// which shared, of which out of the parent at the fork).
    pub fn adopt(
        &self,
        pager: &Pager,
        parent: Option<&Session>,
        snapshot: Option<ForkSnapshot>,
        (base, len): (u64, usize),
    ) -> Result<(usize, usize, usize), AdoptError> {
        let present = match sys::present_ranges(self.pid, base, len) {
            Ok(r) => r,
            Err(e) => {
                if let Some(snap) = &snapshot {
                    ForkSnapshot::release(&snap.pages, &pager.space);
                }
                return Err(AdoptError::PageTables(e));
            }
        };
        let pages: Vec<u64> = present
            .into_iter()
            .flat_map(|(start, end)| (start..end).step_by(PAGE))
            .collect();
        // The clean pages' copies, taken (and their slots counted) under
        // the parent's lock, so that none is released meanwhile.
        let mut shared: Vec<(u64, u32, u32)> = Vec::new();
        if let Some(p) = parent {
            let pst = p.lock();
            for &page in &pages {
                if let Some(m) = pst.table.get(page) {
                    if m.place == Place::Resident && !m.dirty() && m.slot != NO_SLOT {
                        pager.space.incref(m.slot);
                        shared.push((page, m.slot, m.crc));
                    }
                }
            }
        }
        let mut st = self.lock();
        let mut n = 0;
        for &page in &pages {
            let Some(m) = st.table.get_mut(page) else {
                continue;
            };
            m.set(flag::DIRTY);
            st.place(page, Place::Resident);
            st.push_resident(page);
            n += 1;
        }
        let to_protect: Vec<u64> = shared.iter().map(|&(page, _, _)| page).collect();
        // Ascending, as `pages` is.
        let failed = crate::evict::write_protect_runs(self, &to_protect);
        let mut kept = 0;
        for (page, slot, crc) in shared {
            match st.table.get_mut(page) {
                Some(m) if failed.binary_search(&page).is_err() => {
                    m.clear(flag::DIRTY);
                    m.slot = slot;
                    m.crc = crc;
                    kept += 1;
                }
                // Unprotected, a write would go unseen: the page stays
                // dirty and the copy is not needed.
                _ => pager.space.decref(slot),
            }
        }
        let (mut out, mut out_shared) = (0, 0);
        if let Some(snap) = snapshot {
            let mut unused = Vec::new();
            let mut lost = None;
            for &p in &snap.pages {
                let page = p.page();
                // Present: the parent fetched it between the snapshot and
                // the fork, and the child has its own copy.
                if lost.is_some()
                    || pages.binary_search(&page).is_ok()
                    || st.table.get(page).is_none()
                {
                    unused.push(p);
                    continue;
                }
                match p {
                    OutPage::Remote { slot, crc, .. } => {
                        let m = st.table.get_mut(page).expect("checked above");
                        m.slot = slot;
                        m.crc = crc;
                        st.place(page, Place::Remote);
                        out_shared += 1;
                    }
                    OutPage::Cached { at, .. } => {
                        let src = snap.bytes(at).as_ptr();
                        let (fill, done) = self.install(&mut st, page, src, PAGE, None, true);
                        if done != 1 {
                            lost = Some((page, fill));
                            continue;
                        }
                    }
                }
                out += 1;
            }
            ForkSnapshot::release(&unused, &pager.space);
            if let Some((page, fill)) = lost {
                return Err(AdoptError::Install(page, fill));
            }
        }
        let c = &self.counters;
        c.add(&c.fork_adopted, (n + out) as u64);
        c.add(&c.fork_shared, (kept + out_shared) as u64);
        c.add(&c.fork_out, out as u64);
        Ok((n + out, kept + out_shared, out))
    }

    /// Stops evictions (the app is about to fork and brings its pages
    /// back): returns once no eviction is in flight. Faults are served over
    /// the limit meanwhile. Undone by `release_hold`.
    ///
    /// The evictor announces a pass (`evicting`) before it checks `held`,
    /// and the holder counts itself before it checks `evicting` (both
    /// SeqCst), so either the evictor sees the hold or the holder waits for
    /// the pass to end.
    pub fn hold(&self) {
        if self.holds.fetch_add(1, Ordering::SeqCst) == 0 {
            self.remapped_in_hold.store(false, Ordering::SeqCst);
        }
        self.kick_evictor();
        while self.evicting.load(Ordering::SeqCst) && !self.is_dead() {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    pub fn release_hold(&self) {
        self.holds.fetch_sub(1, Ordering::SeqCst);
        self.kick_evictor();
    }

    pub fn held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) > 0
    }

    /// Held, with no managed memory moved since the hold began: what a
    /// forked child's adoption needs of its parent's session.
    pub fn held_unmoved(&self) -> bool {
        self.held() && !self.remapped_in_hold.load(Ordering::SeqCst)
    }

    /// Evictor side: starts a pass unless held; the pass lasts as long as
    /// the returned guard.
    pub fn begin_eviction_pass(&self) -> Option<EvictionPass<'_>> {
        self.evicting.store(true, Ordering::SeqCst);
        let pass = EvictionPass(&self.evicting);
        (!self.held()).then_some(pass)
    }

    /// Eviction batch for a limit: 1/32 of it, within 8..=MAX_BATCH pages.
    /// Eviction starts two batches below the limit and stops at three, so
    /// a prefetch window (at most one batch) always has room.
    pub fn batch_for(limit_pages: usize) -> usize {
        (limit_pages / 32).clamp(8, wire::MAX_BATCH)
    }

    pub fn uffd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.st)
    }

    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Local pages: resident plus this app's cache frames.
    pub fn local(st: &State) -> usize {
        st.counts.resident + st.counts.cached
    }

    /// Pages that may still become local under the limit: demand fetches
    /// in flight already have theirs.
    pub fn room(&self, st: &State) -> usize {
        self.limit_pages
            .saturating_sub(Self::local(st) + st.reserved)
    }

    /// Local pages plus those on their way in: what the evictor keeps
    /// under the high watermark, so that fetched pages find room.
    pub fn pressure(st: &State) -> usize {
        Self::local(st) + st.counts.fetching
    }

    /// The high watermark: the evictor starts a pass once the pressure is
    /// above it, and stops at the low watermark a batch below.
    pub fn high_water(&self) -> usize {
        self.limit_pages.saturating_sub(2 * self.batch)
    }

    /// Wakes the evictor if the pressure, with `coming` more pages, is
    /// above the high watermark. Kicks that find nothing to do cost a
    /// context switch each on a busy vCPU, inside the fault being served.
    pub fn kick_if_pressed(&self, st: &State, coming: usize) {
        if Self::pressure(st) + coming > self.high_water() {
            self.kick_evictor();
        }
    }

    /// Wakes the evictor (once: a kick it has not taken yet stands).
    pub fn kick_evictor(&self) {
        let (m, cv) = &self.kick;
        let mut k = crate::lock(m);
        if !*k {
            *k = true;
            cv.notify_one();
        }
    }

    /// Waits for a kick or the timeout.
    pub fn wait_kick(&self, timeout: Duration) {
        let (m, cv) = &self.kick;
        let mut k = crate::lock(m);
        if !*k {
            k = cv
                .wait_timeout(k, timeout)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        *k = false;
    }

    /// Wakes threads faulting on any of `pages` (sorted or not), one ioctl
    /// per contiguous run.
    pub fn wake_pages(&self, pages: impl IntoIterator<Item = u64>) {
        let mut run: Option<(u64, u64)> = None;
        for p in pages {
            run = match run {
                Some((a, b)) if p == b => Some((a, b + PAGE as u64)),
                Some((a, b)) => {
                    self.wake(a, (b - a) as usize);
                    Some((p, p + PAGE as u64))
                }
                None => Some((p, p + PAGE as u64)),
            };
        }
        if let Some((a, b)) = run {
            self.wake(a, (b - a) as usize);
        }
    }

    /// Wakes threads faulting anywhere in the range.
    pub fn wake(&self, start: u64, len: usize) {
        if let Err(e) = sys::uffd_wake(self.uffd(), start, len) {
            debug!(session = self.id, "wake failed: {e}");
        }
    }

    /// Stops the app: its data cannot be served. Never zeros.
    pub fn fatal(&self, why: &str) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        error!(session = self.id, pid = self.pid, "stopping the app: {why}");
        let msg = wire::encode(&Msg::Fatal(format!(
            "{why}; stopping this program rather than letting it read wrong data"
        )));
        let _ = sys::send_with_fds(self.sock.as_raw_fd(), &msg, &[]);
        let pid = self.pid;
        std::thread::spawn(move || {
            // The agent aborts the app; if it cannot (stopped, stuck), kill it.
            std::thread::sleep(Duration::from_secs(2));
            if sys::process_alive(pid) {
                // The last resort when its data is gone and its agent did
                // not stop it.
                sys::signal_process(pid, libc::SIGKILL);
            }
        });
        self.kick_evictor();
    }

    /// Installs `len` bytes at `dst` from `src`. With `writable`, and for a
    /// write fault on exactly this one page, the pages go in writable and
    /// count as dirty (the app is about to write them: this saves a
    /// write-protect fault each). Otherwise they go in write-protected, and
    /// the faulting page of a write fault is then made writable (and dirty)
    /// and woken. Returns pages installed from the start of the range.
    pub fn install(
        &self,
        st: &mut State,
        dst: u64,
        src: *const u8,
        len: usize,
        fault: Option<&Fault>,
        writable: bool,
    ) -> (Fill, usize) {
        let writable = writable || fault.is_some_and(|f| f.write && f.page == dst && len == PAGE);
        // A write fault inside the range is woken only once its page is
        // writable; otherwise the copy itself wakes the range.
        let write_at = fault
            .filter(|f| !writable && f.write && f.page >= dst && f.page < dst + len as u64)
            .map(|f| f.page);
        let (fill, done) = copy_run(self.uffd(), dst, src, len, !writable, write_at.is_none());
        let pages = done / PAGE;
        for i in 0..pages {
            let p = dst + (i * PAGE) as u64;
            st.place(p, Place::Resident);
            st.push_resident(p);
            if writable {
                if let Some(m) = st.table.get_mut(p) {
                    m.set(flag::DIRTY);
                }
            }
        }
        if let Some(page) = write_at {
            if page < dst + done as u64 {
                if let Some(m) = st.table.get_mut(page) {
                    m.set(flag::DIRTY);
                }
                let _ = sys::uffd_writeprotect(self.uffd(), page, PAGE, false);
            }
            if done > 0 {
                self.wake(dst, done);
            }
        }
        (fill, pages)
    }

    /// The uffd reader: until the app goes away.
    pub fn run_reader(self: &Arc<Self>, pager: &Arc<Pager>) {
        let mut buf = EventBuffer::new(128);
        let mut deferred: VecDeque<Fault> = VecDeque::new();
        let mut faults = Vec::with_capacity(128);
        let mut bufs = crate::fetch::Buffers::default();
        IN_READER.with(|r| r.set(true));
        while !self.is_dead() {
            let timeout = if deferred.is_empty() { 100 } else { 1 };
            match sys::poll_uffd_and_peer(self.uffd(), self.sock.as_raw_fd(), timeout) {
                Ok(sys::Ready::PeerGone) => {
                    debug!(session = self.id, "app closed its agent channel");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    error!(session = self.id, "poll failed: {e}");
                    break;
                }
            }
            faults.clear();
            {
                let _w = self.mm.write().unwrap_or_else(|p| p.into_inner());
                let events = match self.uffd.read_events(&mut buf) {
                    Ok(ev) => ev,
                    Err(e) => {
                        info!(session = self.id, "uffd closed: {e}");
                        break;
                    }
                };
                let mut st = self.lock();
                for ev in events {
                    match ev {
                        Ok(Event::Pagefault {
                            kind,
                            rw,
                            addr,
                            thread_id,
                        }) => faults.push(Fault {
                            page: addr as u64 & !(PAGE as u64 - 1),
                            write: rw == ReadWrite::Write,
                            wp: kind == FaultKind::WriteProtected,
                            tid: thread_id.as_raw(),
                            at: Instant::now(),
                        }),
                        Ok(Event::Remove { start, end }) => {
                            self.on_remove(pager, &mut st, start as u64, end as u64, false)
                        }
                        Ok(Event::Unmap { start, end }) => {
                            self.on_remove(pager, &mut st, start as u64, end as u64, true)
                        }
                        Ok(Event::Remap { from, to, len }) => {
                            if self.held() {
                                self.remapped_in_hold.store(true, Ordering::SeqCst);
                            }
                            self.on_remap(pager, &mut st, from as u64, to as u64, len)
                        }
                        Ok(other) => warn!(session = self.id, "ignoring uffd event {other:?}"),
                        Err(e) => warn!(session = self.id, "bad uffd event: {e}"),
                    }
                }
            }
            // Held-back faults first: they are older.
            let n = deferred.len();
            for _ in 0..n {
                let f = deferred.pop_front().expect("counted");
                if let Some(f) = self.on_fault(pager, f, None) {
                    deferred.push_back(f);
                }
            }
            // A lone fault is fetched here (see `on_fault`); several go to
            // the workers, so that none waits behind another's fetch.
            let lone = faults.len() == 1 && deferred.is_empty();
            for f in faults.drain(..) {
                let inline = lone.then_some(&mut bufs);
                if let Some(f) = self.on_fault(pager, f, inline) {
                    deferred.push_back(f);
                }
            }
        }
        self.dead.store(true, Ordering::Release);
        self.kick_evictor();
    }

    /// The agent faulted on `page`: the page is gone from the app. That is
    /// the app freeing it (or moving it away) while it was in flight,
    /// unless the victim is still in flight at its origin with no REMOVE
    /// seen: events are handled before the faults read with them, and the
    /// app's DONTNEED zaps only after its REMOVE was read, so then nothing
    /// the pager knows of took the page and its data is lost. The zeros the
    /// agent is served must then never become the page's content: the
    /// evictor stops the app when it settles the batch (an `mremap` by the
    /// app would have moved the victim, which it checks then).
    fn note_vanished(&self, page: u64) {
        let mut st = self.lock();
        let lost = st
            .table
            .get(page)
            .is_some_and(|m| m.place == Place::Evicting && m.has(flag::OUR_REMOVE))
            && st.in_flight.origin_at(page) == Some(page);
        if lost {
            warn!(
                session = self.id,
                page = format!("{page:#x}"),
                "a victim in flight vanished from the app"
            );
            st.vanished.push(page);
        }
    }

    /// Handles one fault. Returns it when it must wait (app over its limit).
    /// With `inline` buffers, a remote fault that plans no prefetch is
    /// fetched by the reader itself while every node is up: a hand-off to
    /// a worker cost a wake-up, 15-25% of the fault on one vCPU. A fault
    /// that plans a prefetch, or while a node is down (a fetch may then
    /// wait out a reconnect, and the reader must go on reading the app's
    /// other faults and its unmaps), goes to a worker.
    fn on_fault(
        self: &Arc<Self>,
        pager: &Arc<Pager>,
        f: Fault,
        inline: Option<&mut crate::fetch::Buffers>,
    ) -> Option<Fault> {
        if f.tid == self.agent_tid && !f.wp {
            // The agent only reads victims; one it faults on was zapped by
            // the app meanwhile, so its content is zeros. Never wait here:
            // the evictor is waiting for the agent.
            //
            // Zeros go in write-protected, never as the shared zero page:
            // the fill wakes every thread waiting on the page, and an app
            // thread that reallocated it would write into the zero page by
            // a plain copy-on-write the pager never sees; the agent's
            // DONTNEED right after would then drop that write silently.
            // Write-protected, the write faults to the pager and waits.
            self.counters.add(&self.counters.faults_agent, 1);
            self.note_vanished(f.page);
            debug!(
                session = self.id,
                page = format!("{:#x}", f.page),
                "agent fault: zeros"
            );
            let (fill, _) = copy_run(self.uffd(), f.page, pager.zeros.as_ptr(), PAGE, true, true);
            if fill != Fill::Done {
                // EAGAIN while an event is pending: fault again after it.
                self.wake(f.page, PAGE);
            }
            return None;
        }
        let _r = self.mm.read().unwrap_or_else(|p| p.into_inner());
        let mut st = self.lock();
        if st.table.get(f.page).is_none() {
            // Managed memory the app grew in place (mremap): track it.
            let chunk = 2 << 20;
            st.table.add_region(f.page & !(chunk as u64 - 1), chunk);
        }
        let m = *st.table.get(f.page).expect("region just added");
        let c = &self.counters;
        match (f.wp, m.place) {
            (true, Place::Resident) => {
                // First write to a clean page: it is dirty from now on, and
                // comes back writable next time.
                if let Some(m) = st.table.get_mut(f.page) {
                    m.set(flag::DIRTY | flag::REWRITTEN);
                    if m.has(flag::PREFETCHED) {
                        m.clear(flag::PREFETCHED);
                        c.add(&c.prefetch_hits, 1);
                    }
                }
                if sys::uffd_writeprotect(self.uffd(), f.page, PAGE, false) != Ok(Fill::Done) {
                    // EAGAIN while an event is pending (often the agent's own
                    // DONTNEED): the writer faults again and is served then.
                    self.wake(f.page, PAGE);
                }
                c.add(&c.faults_wp, 1);
            }
            (_, Place::Evicting) | (false, Place::Fetching) => c.add(&c.faults_joined, 1),
            (true, _) | (false, Place::Resident) => {
                // A race with an install or a write-protection change: the
                // thread faults again and finds the page. A missing page
                // the pager holds resident, over and over, means the
                // pager's state is wrong and the page's data is gone: stop
                // the app with a message rather than spin forever or ever
                // hand it zeros.
                let n = if st.stray.0 == f.page && !f.wp {
                    st.stray.1 + 1
                } else {
                    1
                };
                st.stray = (f.page, n);
                drop(st);
                if n >= STRAY_LIMIT {
                    self.fatal(&format!(
                        "internal error: page {:#x} is missing in the program while the pager \
                         holds it resident ({n} faults in a row); its data is lost. \
                         This is a dmem bug, please report it",
                        f.page
                    ));
                    return None;
                }
                self.wake(f.page, PAGE);
            }
            (false, Place::Zero | Place::Cached | Place::Remote) => {
                // A fault may make a whole block local.
                let need = (pager.cfg.block / PAGE).min(self.limit_pages.max(1));
                if !st.stuck && !self.held() && self.room(&st) < need {
                    if f.at.elapsed() < HOLD_BACK {
                        c.add(&c.faults_throttled, 1);
                        self.kick_evictor();
                        return Some(f);
                    }
                    // Eviction is not keeping up at all: serve over the limit.
                    c.add(&c.limit_exceeded, 1);
                }
                // A cache hit moves a page from the cache to the app: no
                // more local pages than before.
                let coming = if m.place == Place::Cached { 0 } else { need };
                self.kick_if_pressed(&st, coming);
                let retry = match m.place {
                    Place::Zero => self.fill_zero(pager, &mut st, &f),
                    Place::Cached => self.fill_from_cache(pager, &mut st, &f, m),
                    _ => {
                        let job = crate::fetch::claim(self, pager, &mut st, &f);
                        drop(st);
                        drop(_r);
                        match inline {
                            Some(bufs) if job.prefetch.is_empty() && pager.space.all_usable() => {
                                crate::fetch::run(job, pager, bufs)
                            }
                            _ => pager.dispatch(job),
                        }
                        false
                    }
                };
                if retry {
                    // An address-space event is pending (often the agent's
                    // own DONTNEED): try again right after reading it, which
                    // saves the app a wake-up and a second fault.
                    return Some(f);
                }
            }
        }
        None
    }

    /// Never-touched page: zeros, with clean zero neighbours of its block.
    /// Returns true when the fault must be retried after pending events.
    fn fill_zero(&self, pager: &Pager, st: &mut State, f: &Fault) -> bool {
        let block = st.table.block_of(f.page, pager.cfg.block);
        let block_pages = ((block.end - block.start) / PAGE as u64) as usize;
        // Fills stop two eviction batches short of the limit. Letting them
        // take the room the evictor keeps (2026-12-06) cut the zero faults
        // of GEMM n=4096 at 50% local from 23-45k to 5.5k with no change in
        // time, and the app's arena was once seen 97 pages over its limit
        // with it (the test suite's limit check): reverted.
        let spare = self.room(st).saturating_sub(2 * self.batch + block_pages);
        let group = (ZERO_AROUND * PAGE) as u64;
        let around = spare >= 2 * ZERO_AROUND;
        let floor = if around {
            block.start.min(f.page & !(group - 1))
        } else {
            block.start
        };
        let mut lo = f.page;
        while lo > floor
            && st
                .table
                .get(lo - PAGE as u64)
                .is_some_and(|m| m.place == Place::Zero)
        {
            lo -= PAGE as u64;
        }
        // First touches that walk forward get zeros ahead of them, as many
        // as fit under the high watermark (so they never cause eviction):
        // a fault per 4 KiB was most of the cost of jobs that allocate big
        // temporaries (a k-means: 510k zero faults, 15x its plain time).
        let ahead = st.zero_stream.on_fault(f.page).min(spare);
        let mut end = block.end.max(f.page + ((ahead + 1) * PAGE) as u64);
        if around {
            end = end.max((f.page & !(group - 1)) + group);
        }
        let end = end.min(lo + (pager.cfg.block + ZERO_FILL_MAX) as u64);
        let mut hi = f.page + PAGE as u64;
        while hi < end && st.table.get(hi).is_some_and(|m| m.place == Place::Zero) {
            hi += PAGE as u64;
        }
        st.zero_stream.filled_to(hi);
        let len = (hi - lo) as usize;
        // A writing stream gets its pages writable (and dirty): each would
        // otherwise take a write-protect fault right after.
        let writable = f.write && hi - lo > PAGE as u64;
        let (mut fill, n) = self.install(st, lo, pager.zeros.as_ptr(), len, Some(f), writable);
        let mut installed = f.page < lo + (n * PAGE) as u64;
        if !installed && fill != Fill::Retry && len > PAGE {
            // A neighbour was in the way: present already (the agent's
            // zeros over a victim the app freed, or a DONTNEED whose REMOVE
            // came before the kernel zapped the page), or in another
            // mapping (a guard page the app mprotect'ed; one UFFDIO_COPY
            // cannot span two). Fill the faulting page alone, or the app
            // would fault here forever.
            let (f2, n2) = self.install(st, f.page, pager.zeros.as_ptr(), PAGE, Some(f), false);
            fill = f2;
            installed = n2 > 0;
        }
        if fill == Fill::Retry && !installed {
            return true;
        }
        self.counters.add(&self.counters.faults_zero, 1);
        self.finish(f, installed);
        false
    }

    /// Page in a cache frame: one copy. Returns true to retry later.
    fn fill_from_cache(
        self: &Arc<Self>,
        pager: &Pager,
        st: &mut State,
        f: &Fault,
        m: PageMeta,
    ) -> bool {
        let rewritten = m.has(flag::REWRITTEN);
        let (fill, done) = self.promote(pager, st, f.page, m.frame, Some(f), rewritten);
        if fill == Fill::Retry && !done {
            return true;
        }
        if done {
            let c = &self.counters;
            c.add(&c.faults_cache, 1);
        }
        self.finish(f, done);
        if done {
            // Cache faults feed the stream detector too: a prefetch marker
            // lands here and starts the next window.
            let job = crate::fetch::plan_prefetch(self, pager, st, f.page, f.write);
            if !job.prefetch.is_empty() {
                pager.dispatch(job);
            }
        }
        false
    }

    /// Copies a cached page back into the app and frees its frame (the
    /// page's local count does not change). True when installed. A dirty
    /// page goes in writable whatever `writable` says: write-protecting it
    /// would only cost a fault on its next write, as it is dirty anyway.
    pub fn promote(
        &self,
        pager: &Pager,
        st: &mut State,
        page: u64,
        frame: u32,
        fault: Option<&Fault>,
        writable: bool,
    ) -> (Fill, bool) {
        let writable = writable || st.table.get(page).is_some_and(|m| m.dirty());
        let (fill, n) = self.install(st, page, pager.cache.ptr(frame), PAGE, fault, writable);
        if n == 1 {
            pager.cache.release(frame);
            let c = &self.counters;
            if let Some(pm) = st.table.get_mut(page) {
                pm.frame = NO_FRAME;
                // A write-back of it in flight no longer settles it (its
                // data was copied): the page stays dirty, with its old slot.
                pm.clear(flag::WRITEBACK);
                if pm.has(flag::PREFETCHED) && fault.is_some() {
                    pm.clear(flag::PREFETCHED);
                    c.add(&c.prefetch_hits, 1);
                }
            }
        }
        (fill, n == 1)
    }

    /// Ends a fault: records its latency when its page was installed (the
    /// install woke the thread), else wakes the thread to fault again.
    pub fn finish(&self, f: &Fault, installed: bool) {
        if installed {
            Latencies::record(&self.lat.fault, f.at.elapsed());
        } else {
            self.wake(f.page, PAGE);
        }
    }

    /// Forgets a page's content (the app freed it): zeros from now on.
    pub fn forget(&self, pager: &Pager, st: &mut State, page: u64) {
        let Some(m) = st.table.get_mut(page) else {
            return;
        };
        let old = *m;
        let keep = m.flags & (flag::IN_RESIDENT_FIFO | flag::IN_CACHE_FIFO);
        if old.has(flag::PREFETCHED) {
            self.counters.add(&self.counters.prefetch_waste, 1);
        }
        *m = PageMeta {
            flags: keep,
            gen: old.gen.wrapping_add(1),
            ..PageMeta::default()
        };
        st.counts.moved(old.place, Place::Zero);
        if old.place == Place::Cached && old.frame != NO_FRAME {
            pager.cache.release(old.frame);
        }
        pager.space.decref(old.slot);
    }

    /// REMOVE (madvise DONTNEED/FREE) or UNMAP of a range.
    fn on_remove(&self, pager: &Pager, st: &mut State, start: u64, end: u64, unmap: bool) {
        let mut p = start & !(PAGE as u64 - 1);
        while p < end {
            // The agent drops a victim at its origin: a REMOVE where a
            // victim was moved to is the app's.
            let at_origin = match st.in_flight.origin_at(p) {
                Some(origin) => origin == p,
                None => true,
            };
            if let Some(m) = st.table.get_mut(p) {
                if m.has(flag::OUR_REMOVE) && !unmap && at_origin {
                    // The agent's own DONTNEED of a victim.
                    m.clear(flag::OUR_REMOVE);
                } else {
                    self.forget(pager, st, p);
                }
            }
            p += PAGE as u64;
        }
    }

    /// mremap moved `[from, from+len)` to `to`: the pages' state moves too.
    /// A page being evicted stays `Evicting` at its new address (faults
    /// there wait) and keeps its `OUR_REMOVE` flag: the agent acts at the
    /// victim's origin (`State::in_flight`), and its DONTNEED counts as
    /// its own only while the victim is back there.
    ///
    /// The one move the pager cannot follow puts a *different* page onto
    /// the origin of a victim in flight: the agent would then take or drop
    /// that page in the victim's place. The app is stopped rather than
    /// risk wrong data (libdmem.so never does this: its mremap copies).
    fn on_remap(&self, pager: &Pager, st: &mut State, from: u64, to: u64, len: usize) {
        st.table.add_region(to, len);
        for i in 0..len / PAGE {
            let (src, dst) = (from + (i * PAGE) as u64, to + (i * PAGE) as u64);
            if st.in_flight.is_origin(dst) && st.in_flight.origin_at(src) != Some(dst) {
                self.fatal(&format!(
                    "mremap moved memory onto {dst:#x} while the page that was there is \
                     being evicted; the pager cannot tell which page the eviction takes"
                ));
            }
            st.in_flight.moved(src, dst);
            self.forget(pager, st, dst);
            let Some(m) = st.table.get(src).copied() else {
                continue;
            };
            let mut moved = m;
            moved.flags &= flag::DIRTY;
            moved.place = match m.place {
                Place::Evicting => {
                    moved.flags |= m.flags & flag::OUR_REMOVE;
                    Place::Evicting
                }
                // The data travelled with the mapping. Count it dirty:
                // clean pages must not rely on write-protect bits surviving
                // the move.
                Place::Resident => {
                    moved.flags |= flag::DIRTY;
                    Place::Resident
                }
                Place::Fetching => Place::Remote,
                p => p,
            };
            moved.gen = m.gen.wrapping_add(1);
            if let Some(s) = st.table.get_mut(src) {
                let keep = s.flags & (flag::IN_RESIDENT_FIFO | flag::IN_CACHE_FIFO);
                *s = PageMeta {
                    flags: keep,
                    gen: m.gen.wrapping_add(1),
                    ..PageMeta::default()
                };
            }
            st.counts.moved(m.place, Place::Zero);
            if let Some(d) = st.table.get_mut(dst) {
                let keep = d.flags & (flag::IN_RESIDENT_FIFO | flag::IN_CACHE_FIFO);
                *d = moved;
                d.flags |= keep;
            }
            st.counts.moved(Place::Zero, moved.place);
            match moved.place {
                Place::Resident => st.push_resident(dst),
                Place::Cached => st.push_cached(dst),
                _ => {}
            }
        }
        // A write-back in flight for the old addresses will find nothing to
        // complete; the frames now belong to the new addresses.
    }

    /// Releases everything the app held: frames, slots.
    pub fn teardown(&self, pager: &Pager) {
        let mut st = self.lock();
        self.counters.peak((st.peak_local * PAGE) as u64);
        let mut frames = 0;
        let mut slots = 0;
        for (_, m) in st.table.all_mut() {
            if m.place == Place::Cached && m.frame != NO_FRAME {
                pager.cache.release(m.frame);
                frames += 1;
            }
            if m.slot != NO_SLOT {
                pager.space.decref(m.slot);
                slots += 1;
            }
            *m = PageMeta::default();
        }
        st.counts = Counts::default();
        st.resident_fifo.clear();
        st.cache_fifo.clear();
        info!(
            session = self.id,
            pid = self.pid,
            frames,
            slots,
            "app detached; released its cache frames and remote slots"
        );
    }
}

/// An eviction pass in progress (see `Session::hold`).
pub struct EvictionPass<'a>(&'a AtomicBool);

impl Drop for EvictionPass<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// UFFDIO_COPY of a run, reporting how much landed. Pages land in order;
/// an error stops the run (the caller reverts what did not land).
fn copy_run(
    uffd: RawFd,
    dst: u64,
    src: *const u8,
    len: usize,
    wp: bool,
    wake: bool,
) -> (Fill, usize) {
    match sys::uffd_copy(uffd, dst, src, len, wp, wake) {
        Ok((fill, done)) => (fill, done),
        Err(e) => {
            warn!("UFFDIO_COPY failed: {e}");
            (Fill::Gone, 0)
        }
    }
}

fn into_raw(fd: OwnedFd) -> RawFd {
    std::os::fd::IntoRawFd::into_raw_fd(fd)
}
