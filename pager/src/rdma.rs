//! The RDMA transport: one-sided READ and WRITE to a memory node's slabs
//! over a reliable-connection queue pair, with the node's TCP connection as
//! the control channel (session, leases, stats, the queue-pair exchange)
//! and as the fallback data path. Built with the `rdma` cargo feature.
//!
//! Data moves through bounce buffers that the transport registers once
//! (`BouncePool`): never the application's heap, since registration pins
//! pages. A READ lands in a bounce slot and is copied out at completion; a
//! WRITE is copied in before it is posted. Each batch is one chain of work
//! requests with only the last signaled (a reliable connection completes
//! in order), and its `wr_id` names the batch in `Link::ops`. A poller
//! thread per queue pair takes completions: it busy-polls while batches
//! are in flight and sleeps on the completion channel otherwise.
//!
//! A queue pair that fails (a completion error, the node's TCP connection
//! replaced, since the node keeps the peer queue pair per connection) is
//! dropped, the operation is redone over TCP, and the next operation
//! connects a new queue pair.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use dmem_memnode::client::{ClientConfig, ClientError};
use dmem_memnode::protocol::{ErrorCode, Extent, RdmaRegion};
use dmem_memnode::rdma::DeviceConfig;
use dmem_memnode::verbs::{Device, MemoryRegion, QueuePair, RdmaOp, VerbsError, WorkDone};
use tracing::{info, warn};

use crate::remote::{Completion, RemoteError, TcpTransport, Transport};
use crate::sys::Mapping;

/// Largest batch, and so the size of a bounce slot: the protocol's limit.
const SLOT_BYTES: usize = dmem_memnode::protocol::MAX_IO_BYTES;
/// Bounce slots per memory node: batches in flight at once. Together they
/// pin `SLOTS * SLOT_BYTES` (64 MiB) per node.
const SLOTS: usize = 8;
/// Send queue depth: the longest chain times the batches in flight.
const QP_DEPTH: u32 = 1024;
/// How long the poller spins on an empty queue with batches in flight
/// before it sleeps on the completion channel.
const SPIN: Duration = Duration::from_micros(50);
/// Bound of one sleep, so the poller notices it should stop.
const SLEEP_MS: i32 = 100;

/// The pager's RDMA device, opened once for all nodes.
fn device(cfg: &DeviceConfig) -> Result<Arc<Device>, String> {
    static DEV: OnceLock<Result<Arc<Device>, String>> = OnceLock::new();
    DEV.get_or_init(|| Device::open(cfg).map_err(|e| e.to_string()))
        .clone()
}

/// Registered buffers that RDMA operations land in or leave from.
struct BouncePool {
    mem: Mapping,
    mr: MemoryRegion,
    free: Mutex<Vec<usize>>,
    cv: Condvar,
}

impl BouncePool {
    fn new(dev: &Arc<Device>) -> Result<BouncePool, String> {
        let mem = Mapping::anonymous(SLOTS * SLOT_BYTES)
            .map_err(|e| format!("cannot map RDMA bounce buffers: {e}"))?;
        let mr = dev
            .register(mem.as_ptr(), mem.len(), false)
            .map_err(|e| format!("cannot register RDMA bounce buffers: {e}"))?;
        Ok(BouncePool {
            mem,
            mr,
            free: Mutex::new((0..SLOTS).collect()),
            cv: Condvar::new(),
        })
    }

    fn acquire(self: &Arc<Self>) -> Slot {
        let mut free = crate::lock(&self.free);
        loop {
            if let Some(i) = free.pop() {
                return Slot {
                    pool: Arc::clone(self),
                    index: i,
                };
            }
            free = self.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// One bounce slot, returned to the pool on drop.
struct Slot {
    pool: Arc<BouncePool>,
    index: usize,
}

impl Slot {
    fn addr(&self) -> u64 {
        self.pool.mem.addr() + (self.index * SLOT_BYTES) as u64
    }

    fn read(&self, out: &mut [u8]) {
        crate::sys::mapping_read(&self.pool.mem, self.index * SLOT_BYTES, out);
    }

    fn write(&self, data: &[u8]) {
        crate::sys::mapping_write(&self.pool.mem, self.index * SLOT_BYTES, data);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        crate::lock(&self.pool.free).push(self.index);
        self.pool.cv.notify_one();
    }
}

/// A connected queue pair, its batches in flight and its poller.
struct Link {
    /// Declared first, so dropped first: the queue pair is destroyed
    /// before the quarantined slots below go back to the pool.
    qp: QueuePair,
    /// The control connection's reconnect count when this was connected:
    /// a newer connection means the node dropped its side.
    epoch: u64,
    broken: AtomicBool,
    stop: AtomicBool,
    next_id: AtomicU64,
    /// Finished batches: wr_id → error, if any.
    done: Mutex<HashMap<u64, Option<String>>>,
    in_flight: AtomicU64,
    cv: Condvar,
    /// Bounce slots of batches that did not complete (timed out, abandoned
    /// unfinished, partly posted, or on a queue pair that failed): the NIC
    /// may still write into them, so they go back to the pool only once
    /// this queue pair is destroyed. Handing one out earlier could let a
    /// late READ overwrite another batch's data.
    quarantine: Mutex<Vec<Slot>>,
}

impl Link {
    fn poll_loop(&self) {
        let mut got: Vec<WorkDone> = Vec::with_capacity(32);
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Acquire) {
            got.clear();
            match self.qp.poll(32, &mut got) {
                Ok(0) => {}
                Ok(_) => {
                    self.finish(&got);
                    idle_since = Instant::now();
                    continue;
                }
                Err(e) => {
                    self.fail(&format!("polling completions: {e}"));
                    return;
                }
            }
            if self.in_flight.load(Ordering::Acquire) > 0 && idle_since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Sleep until the next completion: arm, then poll once more
            // (one may have landed before the arming).
            if let Err(e) = self.qp.arm() {
                self.fail(&format!("arming the completion queue: {e}"));
                return;
            }
            got.clear();
            if matches!(self.qp.poll(32, &mut got), Ok(n) if n > 0) {
                self.finish(&got);
            }
            if let Some(fd) = self.qp.event_fd() {
                if crate::sys::poll_in(fd, SLEEP_MS).unwrap_or(false) {
                    if let Err(e) = self.qp.take_event() {
                        self.fail(&format!("reading a completion event: {e}"));
                        return;
                    }
                }
            }
            idle_since = Instant::now();
        }
    }

    fn finish(&self, got: &[WorkDone]) {
        let mut done = crate::lock(&self.done);
        for w in got {
            if w.error.is_some() {
                self.broken.store(true, Ordering::Release);
            }
            done.insert(w.wr_id, w.error.clone());
        }
        drop(done);
        self.cv.notify_all();
    }

    fn fail(&self, why: &str) {
        warn!("RDMA queue pair failed: {why}");
        self.break_off();
    }

    /// Marks the pair broken and wakes every waiter. The lock is taken
    /// between the two so that a waiter that saw it unbroken is already
    /// waiting when the wake-up comes (else it would sleep out its timeout).
    fn break_off(&self) {
        self.broken.store(true, Ordering::Release);
        drop(crate::lock(&self.done));
        self.cv.notify_all();
    }

    /// Keeps `slot` until this queue pair is gone, and marks the pair
    /// broken so that the next batch connects a new one (and this one can
    /// be dropped).
    fn quarantine(&self, slot: Slot) {
        self.broken.store(true, Ordering::Release);
        crate::lock(&self.quarantine).push(slot);
    }

    /// Waits for batch `id`; Err with the reason when it failed, the queue
    /// pair broke, or `timeout` passed.
    fn wait(&self, id: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut done = crate::lock(&self.done);
        let r = loop {
            if let Some(r) = done.remove(&id) {
                break r.map_or(Ok(()), Err);
            }
            if self.broken.load(Ordering::Acquire) {
                break Err("the queue pair failed".into());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(format!("no completion within {timeout:?}"));
            }
            done = self
                .cv
                .wait_timeout(done, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        };
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        r
    }
}

/// A memory node reached with one-sided RDMA.
pub struct RdmaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    tcp: TcpTransport,
    dev: Arc<Device>,
    bounce: Arc<BouncePool>,
    link: Mutex<Option<Arc<Link>>>,
    regions: DashMap<u32, RdmaRegion>,
    timeout: Duration,
    /// Queue pairs connected after the first (failures, node reconnects).
    relinks: AtomicU64,
}

impl RdmaTransport {
    /// Upgrades a TCP connection to RDMA when this host has a device and
    /// the node offers RDMA; else gives the TCP transport back with the
    /// reason.
    pub fn upgrade(
        tcp: TcpTransport,
        cc: &ClientConfig,
        dev: &DeviceConfig,
    ) -> Result<RdmaTransport, (TcpTransport, String)> {
        let dev = match device(dev) {
            Ok(d) => d,
            Err(why) => return Err((tcp, why)),
        };
        let bounce = match BouncePool::new(&dev) {
            Ok(b) => Arc::new(b),
            Err(why) => return Err((tcp, why)),
        };
        let t = Inner {
            tcp,
            dev,
            bounce,
            link: Mutex::new(None),
            regions: DashMap::new(),
            timeout: cc.request_timeout,
            relinks: AtomicU64::new(0),
        };
        match t.connect_link() {
            Ok(link) => {
                *crate::lock(&t.link) = Some(link);
                info!(
                    memnode = t.tcp.addr(),
                    device = t.dev.name(),
                    "RDMA queue pair connected"
                );
                Ok(RdmaTransport { inner: Arc::new(t) })
            }
            Err(e) => Err((t.tcp, e.to_string())),
        }
    }
}

impl Inner {
    /// A new queue pair, connected through the control channel: the node's
    /// reply comes after its side is ready to receive, so posting may start
    /// at once.
    fn connect_link(&self) -> Result<Arc<Link>, RemoteError> {
        let verbs = |e: VerbsError| RemoteError::Rdma(e.to_string());
        let qp = self.dev.queue_pair(QP_DEPTH, true).map_err(verbs)?;
        let client = self.tcp.client();
        let epoch = client.reconnects();
        let peer = client.rdma_connect(qp.endpoint())?;
        qp.connect(&peer).map_err(verbs)?;
        let link = Arc::new(Link {
            qp,
            epoch,
            broken: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            done: Mutex::new(HashMap::new()),
            in_flight: AtomicU64::new(0),
            cv: Condvar::new(),
            quarantine: Mutex::new(Vec::new()),
        });
        let poller = Arc::clone(&link);
        std::thread::Builder::new()
            .name("dmem-rdma-cq".into())
            .spawn(move || poller.poll_loop())
            .map_err(|e| RemoteError::Rdma(format!("cannot start the completion poller: {e}")))?;
        Ok(link)
    }

    /// The current queue pair, connecting a new one if it broke or the
    /// node's control connection was replaced (the node keeps its side per
    /// connection).
    fn link(&self) -> Result<Arc<Link>, RemoteError> {
        let mut cur = crate::lock(&self.link);
        if let Some(l) = cur.as_ref() {
            let stale = l.epoch != self.tcp.client().reconnects();
            if !stale && !l.broken.load(Ordering::Acquire) {
                return Ok(Arc::clone(l));
            }
            // Waiters on it fail over to TCP now (their slots are
            // quarantined) instead of waiting out the timeout for
            // completions its stopped poller will never take.
            l.stop.store(true, Ordering::Release);
            l.break_off();
        }
        *cur = None;
        let l = self.connect_link()?;
        self.relinks.fetch_add(1, Ordering::Relaxed);
        *cur = Some(Arc::clone(&l));
        Ok(l)
    }

    fn region(&self, slab: u32) -> Result<RdmaRegion, RemoteError> {
        if let Some(r) = self.regions.get(&slab) {
            return Ok(*r);
        }
        let r = self.tcp.client().rdma_slab(slab)?;
        self.regions.insert(slab, r);
        Ok(r)
    }

    /// The work requests of a batch, all checked before any is posted.
    fn ops(&self, ext: &[Extent], slot: &Slot, write: bool) -> Result<Vec<RdmaOp>, RemoteError> {
        let total: usize = ext.iter().map(|e| e.len as usize).sum();
        if total > SLOT_BYTES {
            return Err(refused(
                ErrorCode::TooLarge,
                format!("batch of {total} bytes exceeds {SLOT_BYTES}"),
            ));
        }
        let mut pos = 0u64;
        let mut ops = Vec::with_capacity(ext.len());
        for e in ext {
            let r = self.region(e.slab)?;
            let end = e.offset.checked_add(e.len as u64);
            if end.is_none_or(|end| end > r.len) {
                return Err(refused(
                    ErrorCode::OutOfBounds,
                    format!(
                        "extent {}+{} is outside slab {} of {} bytes",
                        e.offset, e.len, e.slab, r.len
                    ),
                ));
            }
            ops.push(RdmaOp {
                write,
                local: slot.addr() + pos,
                lkey: self.bounce.mr.lkey(),
                len: e.len,
                remote: r.addr + e.offset,
                rkey: r.rkey,
            });
            pos += e.len as u64;
        }
        Ok(ops)
    }
}

fn refused(code: ErrorCode, message: String) -> RemoteError {
    RemoteError::Client(ClientError::Server {
        addr: String::new(),
        code: Some(code),
        message,
    })
}

/// Posts a batch (a WRITE when `data` is given).
fn post(
    t: &Arc<Inner>,
    ext: &[Extent],
    data: Option<&[u8]>,
) -> Result<Box<dyn Completion>, RemoteError> {
    // The link first: a broken one is replaced (and, once its batches
    // are settled, dropped with its quarantine) before a slot is taken.
    let link = t.link()?;
    let slot = t.bounce.acquire();
    let ops = t.ops(ext, &slot, data.is_some())?;
    if let Some(d) = data {
        slot.write(d);
    }
    let id = link.next_id.fetch_add(1, Ordering::Relaxed);
    link.in_flight.fetch_add(1, Ordering::AcqRel);
    if let Err(e) = link.qp.post(&ops, id) {
        link.in_flight.fetch_sub(1, Ordering::AcqRel);
        link.fail(&e.to_string());
        // Part of the chain may have been posted, with no completion to
        // wait for.
        link.quarantine(slot);
        return Err(RemoteError::Rdma(e.to_string()));
    }
    Ok(Box::new(RdmaCompletion {
        t: Arc::clone(t),
        link,
        id,
        slot,
        ext: ext.to_vec(),
        len: ops.iter().map(|o| o.len as usize).sum(),
        write: data.is_some(),
    }))
}

/// A batch in flight.
struct RdmaCompletion {
    t: Arc<Inner>,
    link: Arc<Link>,
    id: u64,
    slot: Slot,
    ext: Vec<Extent>,
    len: usize,
    write: bool,
}

impl Completion for RdmaCompletion {
    fn abandon(self: Box<Self>) {
        // The NIC may still write into the slot: it goes back to the pool
        // once the work request has completed, or with its queue pair.
        if self.link.wait(self.id, self.t.timeout).is_err() {
            self.link.quarantine(self.slot);
        }
    }

    fn wait(self: Box<Self>, out: &mut [u8]) -> Result<(), RemoteError> {
        // Settled before anything else, even a caller's wrong size, so the
        // slot is never released under a request still in flight.
        let done = self.link.wait(self.id, self.t.timeout);
        let RdmaCompletion {
            t,
            link,
            slot,
            ext,
            len,
            write,
            ..
        } = *self;
        if !write && out.len() != len {
            if done.is_err() {
                link.quarantine(slot);
            }
            return Err(RemoteError::Client(ClientError::ShortRead {
                got: len,
                want: out.len(),
            }));
        }
        match done {
            Ok(()) => {
                if !write {
                    slot.read(out);
                }
                Ok(())
            }
            Err(why) => {
                // Redo it over TCP: the node's slabs are the same.
                warn!(
                    memnode = t.tcp.addr(),
                    "RDMA batch failed ({why}); redone over TCP"
                );
                let data = write.then(|| {
                    let mut d = vec![0u8; len];
                    slot.read(&mut d);
                    d
                });
                link.quarantine(slot);
                let c = t.tcp.client();
                match data {
                    Some(d) => Ok(c.write(&ext, &d)?),
                    None => Ok(c.read_into(&ext, out)?),
                }
            }
        }
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> &'static str {
        "rdma"
    }
    fn addr(&self) -> &str {
        self.inner.tcp.addr()
    }
    fn lease(&self, id: u32, len: u64) -> Result<(), RemoteError> {
        self.inner.tcp.lease(id, len)
    }
    fn release(&self, id: u32) -> Result<(), RemoteError> {
        self.inner.regions.remove(&id);
        self.inner.tcp.release(id)
    }
    fn free_bytes(&self) -> Result<u64, RemoteError> {
        self.inner.tcp.free_bytes()
    }
    fn post_read(&self, ext: &[Extent]) -> Result<Box<dyn Completion>, RemoteError> {
        post(&self.inner, ext, None)
    }
    fn post_write(&self, ext: &[Extent], data: &[u8]) -> Result<Box<dyn Completion>, RemoteError> {
        post(&self.inner, ext, Some(data))
    }
    fn reconnects(&self) -> u64 {
        self.inner.tcp.reconnects() + self.inner.relinks.load(Ordering::Relaxed)
    }
    fn reachable(&self) -> bool {
        self.inner.tcp.reachable()
    }
    fn interrupt(&self) {
        if let Some(l) = crate::lock(&self.inner.link).as_ref() {
            l.fail("interrupted");
        }
        self.inner.tcp.interrupt();
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        if let Some(l) = crate::lock(&self.inner.link).as_ref() {
            l.stop.store(true, Ordering::Release);
        }
    }
}
