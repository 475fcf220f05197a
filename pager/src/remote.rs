//! Remote memory: the transport trait (shaped like one-sided RDMA: read or
//! write bytes at region+offset, batched, completion later), its TCP
//! implementation over the memory-node client, and the slot space that
//! places pages in slabs leased from memory nodes.
//!
//! Slots are 4 KiB places in leased slabs, named by a dense `u32`. Each has
//! a reference count, like a kernel swap entry, so that a forked child can
//! share its parent's slots; a write-back always goes to a fresh slot and
//! the old one is released after the new one is acknowledged.
//!
//! Each node has a health state: a transport error (unreachable, timed out,
//! session lost) marks it down, and placement skips it, so write-backs go
//! to other nodes (or stay local) instead of waiting on it. A prober thread
//! watches a down node and marks it up once it answers again; any request
//! that succeeds does the same.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmem_memnode::client::{Client, ClientConfig, ClientError, Pending};
use dmem_memnode::protocol::{ErrorCode, Extent};
use thiserror::Error;
use tracing::{error, info, warn};

use crate::pages::NO_SLOT;
use crate::sys::PAGE;

#[derive(Debug, Error)]
pub enum RemoteError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("no memory node has room for more pages")]
    OutOfSpace,
    #[error("no memory node configured")]
    NoNodes,
    #[error("RDMA: {0}")]
    Rdma(String),
}

/// A request in flight; `wait` fills `out` (reads) or just acknowledges.
pub trait Completion: Send {
    fn wait(self: Box<Self>, out: &mut [u8]) -> Result<(), RemoteError>;
}

/// One memory node as the pager sees it.
pub trait Transport: Send + Sync {
    /// `tcp`, or `rdma` in a later issue.
    fn kind(&self) -> &'static str;
    fn addr(&self) -> &str;
    /// Leases `len` bytes as region `id`.
    fn lease(&self, id: u32, len: u64) -> Result<(), RemoteError>;
    fn release(&self, id: u32) -> Result<(), RemoteError>;
    /// Free bytes on the node.
    fn free_bytes(&self) -> Result<u64, RemoteError>;
    /// Reads the extents, concatenated, into the completion's buffer.
    fn post_read(&self, ext: &[Extent]) -> Result<Box<dyn Completion>, RemoteError>;
    /// Writes `data` (the extents' bytes, concatenated).
    fn post_write(&self, ext: &[Extent], data: &[u8]) -> Result<Box<dyn Completion>, RemoteError>;
    fn reconnects(&self) -> u64;
    /// A cheap check that the node can be reached at all (no request, no
    /// reconnect attempt), used while it is down.
    fn reachable(&self) -> bool;
    /// Drops the connection as a network failure would (tests and fault
    /// injection); the next request reconnects.
    fn interrupt(&self);
}

pub struct TcpTransport {
    client: Client,
}

impl TcpTransport {
    pub fn connect(cfg: ClientConfig) -> Result<TcpTransport, RemoteError> {
        Ok(TcpTransport {
            client: Client::connect(cfg)?,
        })
    }

    /// The control connection (the RDMA transport's handshakes go over it).
    pub fn client(&self) -> &Client {
        &self.client
    }
}

struct TcpCompletion(Pending);

impl Completion for TcpCompletion {
    fn wait(self: Box<Self>, out: &mut [u8]) -> Result<(), RemoteError> {
        Ok(self.0.wait_into(out)?)
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> &'static str {
        "tcp"
    }
    fn addr(&self) -> &str {
        self.client.addr()
    }
    fn lease(&self, id: u32, len: u64) -> Result<(), RemoteError> {
        Ok(self.client.alloc(id, len)?)
    }
    fn release(&self, id: u32) -> Result<(), RemoteError> {
        Ok(self.client.free(id)?)
    }
    fn free_bytes(&self) -> Result<u64, RemoteError> {
        let s = self.client.stat()?;
        Ok(s.capacity.saturating_sub(s.used))
    }
    fn post_read(&self, ext: &[Extent]) -> Result<Box<dyn Completion>, RemoteError> {
        Ok(Box::new(TcpCompletion(self.client.submit_read(ext)?)))
    }
    fn post_write(&self, ext: &[Extent], data: &[u8]) -> Result<Box<dyn Completion>, RemoteError> {
        Ok(Box::new(TcpCompletion(
            self.client.submit_write(ext, data)?,
        )))
    }
    fn reconnects(&self) -> u64 {
        self.client.reconnects()
    }
    fn reachable(&self) -> bool {
        // A bare connect: the node drops a connection without a handshake
        // quietly, and the client does not log a failed reconnect each time.
        self.client
            .addr()
            .to_socket_addrs()
            .map(|mut a| a.any(|a| TcpStream::connect_timeout(&a, PROBE_CONNECT).is_ok()))
            .unwrap_or(false)
    }
    fn interrupt(&self) {
        self.client.break_connection();
    }
}

/// Where a slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub node: usize,
    pub extent: Extent,
}

struct Slab {
    node: usize,
    region: u32,
    refs: Vec<u8>,
    free: Vec<u32>,
}

struct Inner {
    slabs: Vec<Slab>,
    /// Nodes found full, and when: not asked again for a while.
    full_since: Vec<Option<Instant>>,
}

/// Whether a node takes placements.
#[derive(Default)]
struct Health {
    /// A request failed for a reason other than the node's own refusal:
    /// no new slots on it until it answers again.
    down: AtomicBool,
    /// The node no longer has our session (restarted, or the lease grace
    /// passed): its slabs are gone, and it stays down.
    lost: AtomicBool,
    /// A prober thread watches it.
    probing: AtomicBool,
}

/// Slot placement over all memory nodes.
pub struct SlotSpace {
    nodes: Vec<Arc<dyn Transport>>,
    health: Arc<Vec<Health>>,
    slab_bytes: u64,
    slab_slots: u32,
    inner: Mutex<Inner>,
    /// Held while leasing a slab (a network round trip), so that region ids
    /// (the slab count) stay unique without holding `inner` meanwhile:
    /// `inner` is taken on the fault path and must never wait on a node.
    leasing: Mutex<()>,
}

/// Smallest slab the pager leases: smaller ones would cost a lease round
/// trip every few hundred pages written back.
pub const MIN_SLAB: u64 = 4 << 20;
/// How long a full node is left alone before asking again.
const FULL_BACKOFF: Duration = Duration::from_secs(2);
/// Bound of the prober's bare connect.
const PROBE_CONNECT: Duration = Duration::from_secs(1);
/// Longest pause between two probes of a down node.
const PROBE_MAX_PAUSE: Duration = Duration::from_secs(2);

/// Whether `e` says the node cannot be used (as opposed to the node
/// answering with a refusal, such as Full).
fn node_unusable(e: &RemoteError) -> bool {
    match e {
        RemoteError::Client(ClientError::Server { .. }) => false,
        RemoteError::Client(_) | RemoteError::Rdma(_) => true,
        RemoteError::OutOfSpace | RemoteError::NoNodes => false,
    }
}

impl SlotSpace {
    /// `slab_bytes` is at least [`MIN_SLAB`] (checked by the caller).
    pub fn new(nodes: Vec<Arc<dyn Transport>>, slab_bytes: u64) -> SlotSpace {
        let slab_bytes = slab_bytes.max(MIN_SLAB) / PAGE as u64 * PAGE as u64;
        let n = nodes.len();
        SlotSpace {
            nodes,
            health: Arc::new((0..n).map(|_| Health::default()).collect()),
            slab_bytes,
            slab_slots: (slab_bytes / PAGE as u64) as u32,
            inner: Mutex::new(Inner {
                slabs: Vec::new(),
                full_since: vec![None; n],
            }),
            leasing: Mutex::new(()),
        }
    }

    /// Whether node `i` takes new slots.
    pub fn usable(&self, i: usize) -> bool {
        !self.health[i].down.load(Ordering::Acquire)
    }

    /// Whether slot `s` lives on a node that is up (its copy can be
    /// counted on; a clean page whose copy lives on a down node is kept).
    pub fn slot_usable(&self, s: u32) -> bool {
        s != NO_SLOT && self.usable(self.locate(s).node)
    }

    /// Whether a placement could succeed now without waiting on a node
    /// known to be down or full: a usable slab has free slots, or a usable
    /// node is not known full.
    pub fn may_place(&self) -> bool {
        let inner = crate::lock(&self.inner);
        inner
            .slabs
            .iter()
            .any(|s| !s.free.is_empty() && self.usable(s.node))
            || (0..self.nodes.len()).any(|i| {
                self.usable(i) && inner.full_since[i].is_none_or(|t| t.elapsed() >= FULL_BACKOFF)
            })
    }

    /// `up`, `down` (placement skips it until it answers again) or `lost`
    /// (it no longer has this pager's session).
    pub fn node_state(&self, i: usize) -> &'static str {
        let h = &self.health[i];
        if h.lost.load(Ordering::Acquire) {
            "lost"
        } else if h.down.load(Ordering::Acquire) {
            "down"
        } else {
            "up"
        }
    }

    /// Records a request to node `i` that succeeded: it is up.
    pub fn node_ok(&self, i: usize) {
        let h = &self.health[i];
        if !h.lost.load(Ordering::Acquire) && h.down.swap(false, Ordering::AcqRel) {
            info!(
                node = self.nodes[i].addr(),
                "memory node answers again: placing pages on it"
            );
        }
    }

    /// Records a failed request to node `i`: when the node itself is the
    /// problem, it is marked down and watched until it answers again.
    pub fn node_failed(&self, i: usize, e: &RemoteError) {
        if !node_unusable(e) {
            return;
        }
        let h = &self.health[i];
        if matches!(e, RemoteError::Client(ClientError::SessionLost { .. }))
            && !h.lost.swap(true, Ordering::AcqRel)
        {
            error!(
                node = self.nodes[i].addr(),
                "memory node lost this pager's session: pages only it held are gone;                  it takes no more pages"
            );
        }
        if !h.down.swap(true, Ordering::AcqRel) {
            warn!(
                node = self.nodes[i].addr(),
                "memory node unusable, placing pages elsewhere (or keeping them local)                  until it answers again: {e}"
            );
        }
        if !h.lost.load(Ordering::Acquire) && !h.probing.swap(true, Ordering::AcqRel) {
            let node = Arc::clone(&self.nodes[i]);
            let health = Arc::clone(&self.health);
            let spawned = std::thread::Builder::new()
                .name(format!("dmem-probe-{i}"))
                .spawn(move || probe(&*node, &health[i]));
            if spawned.is_err() {
                h.probing.store(false, Ordering::Release);
            }
        }
    }

    pub fn nodes(&self) -> &[Arc<dyn Transport>] {
        &self.nodes
    }

    pub fn node(&self, i: usize) -> &Arc<dyn Transport> {
        &self.nodes[i]
    }

    /// Where slot `s` lives.
    pub fn locate(&self, s: u32) -> Location {
        let inner = crate::lock(&self.inner);
        let slab = &inner.slabs[(s / self.slab_slots) as usize];
        Location {
            node: slab.node,
            extent: Extent {
                slab: slab.region,
                len: PAGE as u32,
                offset: (s % self.slab_slots) as u64 * PAGE as u64,
            },
        }
    }

    /// Takes `n` fresh slots (refcount 1) on nodes that are up, leasing
    /// slabs as needed. Never holds `inner` across a network round trip.
    pub fn alloc(&self, n: usize) -> Result<Vec<u32>, RemoteError> {
        if self.nodes.is_empty() {
            return Err(RemoteError::NoNodes);
        }
        let mut out = Vec::with_capacity(n);
        loop {
            {
                let mut inner = crate::lock(&self.inner);
                for (i, slab) in inner.slabs.iter_mut().enumerate() {
                    if out.len() == n {
                        break;
                    }
                    if !self.usable(slab.node) {
                        continue;
                    }
                    while out.len() < n {
                        let Some(k) = slab.free.pop() else { break };
                        slab.refs[k as usize] = 1;
                        out.push(i as u32 * self.slab_slots + k);
                    }
                }
            }
            if out.len() == n {
                return Ok(out);
            }
            if let Err(e) = self.lease_slab() {
                for s in out {
                    self.decref(s);
                }
                return Err(e);
            }
        }
    }

    /// Leases one more slab on the usable node with the most free space.
    /// Slabs are all the same size (slot ids are dense), so a node that
    /// cannot fit one counts as full.
    fn lease_slab(&self) -> Result<(), RemoteError> {
        let _leasing = crate::lock(&self.leasing);
        let full_until = {
            let inner = crate::lock(&self.inner);
            // Someone else leased while we waited for the lease lock.
            if inner
                .slabs
                .iter()
                .any(|s| !s.free.is_empty() && self.usable(s.node))
            {
                return Ok(());
            }
            inner.full_since.clone()
        };
        let mut best: Option<(usize, u64)> = None;
        for (i, node) in self.nodes.iter().enumerate() {
            if !self.usable(i) || full_until[i].is_some_and(|t| t.elapsed() < FULL_BACKOFF) {
                continue;
            }
            match node.free_bytes() {
                Ok(f) => {
                    self.node_ok(i);
                    if f >= self.slab_bytes && best.is_none_or(|(_, b)| f > b) {
                        best = Some((i, f))
                    } else if f < self.slab_bytes {
                        crate::lock(&self.inner).full_since[i] = Some(Instant::now());
                    }
                }
                Err(e) => self.node_failed(i, &e),
            }
        }
        let Some((node, _)) = best else {
            return Err(RemoteError::OutOfSpace);
        };
        // Only lease holders add slabs, so the count is stable until then.
        let region = crate::lock(&self.inner).slabs.len() as u32;
        match self.nodes[node].lease(region, self.slab_bytes) {
            Ok(()) => {}
            Err(RemoteError::Client(e)) if e.code() == Some(ErrorCode::Full) => {
                crate::lock(&self.inner).full_since[node] = Some(Instant::now());
                return Err(RemoteError::OutOfSpace);
            }
            Err(e) => {
                self.node_failed(node, &e);
                return Err(e);
            }
        }
        info!(
            node = self.nodes[node].addr(),
            region,
            bytes = self.slab_bytes,
            "leased a slab"
        );
        crate::lock(&self.inner).slabs.push(Slab {
            node,
            region,
            refs: vec![0; self.slab_slots as usize],
            free: (0..self.slab_slots).rev().collect(),
        });
        Ok(())
    }

    /// Adds a reference (a forked child sharing the slot).
    pub fn incref(&self, s: u32) {
        if s == NO_SLOT {
            return;
        }
        let mut inner = crate::lock(&self.inner);
        let slab = &mut inner.slabs[(s / self.slab_slots) as usize];
        let r = &mut slab.refs[(s % self.slab_slots) as usize];
        *r = r
            .checked_add(1)
            .expect("slot shared by more than 255 processes");
    }

    /// Drops a reference; the slot is reused once none remain.
    pub fn decref(&self, s: u32) {
        if s == NO_SLOT {
            return;
        }
        let mut inner = crate::lock(&self.inner);
        let slab = &mut inner.slabs[(s / self.slab_slots) as usize];
        let k = s % self.slab_slots;
        let r = &mut slab.refs[k as usize];
        debug_assert!(*r > 0, "slot {s} released twice");
        *r = r.saturating_sub(1);
        if *r == 0 {
            slab.free.push(k);
        }
    }

    /// Slabs leased per node, in bytes.
    pub fn leased_bytes(&self) -> Vec<u64> {
        let inner = crate::lock(&self.inner);
        let mut v = vec![0; self.nodes.len()];
        for s in &inner.slabs {
            v[s.node] += self.slab_bytes;
        }
        v
    }

    /// Slots in use (refcount > 0).
    pub fn used_slots(&self) -> u64 {
        let inner = crate::lock(&self.inner);
        inner
            .slabs
            .iter()
            .map(|s| (self.slab_slots as usize - s.free.len()) as u64)
            .sum()
    }
}

/// Reads in flight, by node.
pub type Posted = Vec<(usize, Box<dyn Completion>)>;

/// A batch of page transfers to or from slots, split by node and posted
/// together so they travel in parallel.
pub struct Batch<'a> {
    space: &'a SlotSpace,
    /// Per node: extents and the indexes of the pages they carry.
    per_node: Vec<(Vec<Extent>, Vec<usize>)>,
    pages: usize,
}

impl<'a> Batch<'a> {
    pub fn new(space: &'a SlotSpace, slots: &[u32]) -> Batch<'a> {
        let mut per_node: Vec<(Vec<Extent>, Vec<usize>)> =
            vec![(Vec::new(), Vec::new()); space.nodes.len()];
        for (i, &s) in slots.iter().enumerate() {
            let loc = space.locate(s);
            let (ext, idx) = &mut per_node[loc.node];
            // Merge with the previous extent when contiguous on the node.
            match ext.last_mut() {
                Some(last)
                    if last.slab == loc.extent.slab
                        && last.offset + last.len as u64 == loc.extent.offset =>
                {
                    last.len += PAGE as u32
                }
                _ => ext.push(loc.extent),
            }
            idx.push(i);
        }
        Batch {
            space,
            per_node,
            pages: slots.len(),
        }
    }

    /// Posts the reads on every node involved; `finish_read` collects them.
    pub fn post_read(&self) -> Result<Posted, RemoteError> {
        let mut posted = Vec::new();
        for (node, (ext, _)) in self.per_node.iter().enumerate() {
            if !ext.is_empty() {
                match self.space.nodes[node].post_read(ext) {
                    Ok(c) => posted.push((node, c)),
                    Err(e) => {
                        self.space.node_failed(node, &e);
                        return Err(e);
                    }
                }
            }
        }
        Ok(posted)
    }

    /// Waits for posted reads; page `i` lands at `out[i * PAGE..]`. Pages of
    /// one node that are contiguous in `out` too (one node: all of them)
    /// are received in place; the rest go through `scratch`.
    pub fn finish_read(
        &self,
        posted: Posted,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), RemoteError> {
        assert!(out.len() >= self.pages * PAGE);
        let mut first_err = None;
        for (node, c) in posted {
            let idx = &self.per_node[node].1;
            let in_place = idx.windows(2).all(|w| w[1] == w[0] + 1);
            let result = if in_place {
                let at = idx.first().map_or(0, |&i| i * PAGE);
                c.wait(&mut out[at..at + idx.len() * PAGE])
            } else {
                scratch.resize(idx.len() * PAGE, 0);
                c.wait(&mut scratch[..]).map(|()| {
                    for (k, &i) in idx.iter().enumerate() {
                        out[i * PAGE..(i + 1) * PAGE]
                            .copy_from_slice(&scratch[k * PAGE..(k + 1) * PAGE]);
                    }
                })
            };
            if let Err(e) = result {
                self.space.node_failed(node, &e);
                first_err.get_or_insert(e);
                continue;
            }
            self.space.node_ok(node);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes page `i` of `data` to slot `i`; returns when every node has
    /// acknowledged, or failed. Every posted write is waited for, even after
    /// an error, so that no write is still travelling when the caller gives
    /// the slots back.
    pub fn write(&self, data: &[u8]) -> Result<(), RemoteError> {
        let mut posted = Vec::new();
        let mut first_err = None;
        let mut buf = Vec::new();
        for (node, (ext, idx)) in self.per_node.iter().enumerate() {
            if ext.is_empty() {
                continue;
            }
            buf.clear();
            for &i in idx.iter() {
                buf.extend_from_slice(&data[i * PAGE..(i + 1) * PAGE]);
            }
            match self.space.nodes[node].post_write(ext, &buf) {
                Ok(c) => posted.push((node, c)),
                Err(e) => {
                    self.space.node_failed(node, &e);
                    first_err.get_or_insert(e);
                }
            }
        }
        for (node, c) in posted {
            match c.wait(&mut []) {
                Ok(()) => self.space.node_ok(node),
                Err(e) => {
                    self.space.node_failed(node, &e);
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// Watches a down node until it answers a request again (or loses our
/// session for good). Probes back off up to [`PROBE_MAX_PAUSE`]; a probe is
/// a bare connect first, so an unreachable node costs nothing more.
fn probe(node: &dyn Transport, h: &Health) {
    let mut pause = Duration::from_millis(50);
    loop {
        while h.down.load(Ordering::Acquire) && !h.lost.load(Ordering::Acquire) {
            std::thread::sleep(pause);
            pause = (pause * 2).min(PROBE_MAX_PAUSE);
            if !node.reachable() {
                continue;
            }
            // Reconnects and resumes the session if it can.
            match node.free_bytes() {
                Ok(_) => {
                    if h.down.swap(false, Ordering::AcqRel) {
                        info!(
                            node = node.addr(),
                            "memory node answers again: placing pages on it"
                        );
                    }
                }
                Err(RemoteError::Client(e @ ClientError::SessionLost { .. })) => {
                    h.lost.store(true, Ordering::Release);
                    error!(
                        node = node.addr(),
                        "memory node lost this pager's session: {e}; it takes no more pages"
                    );
                }
                Err(_) => {}
            }
        }
        h.probing.store(false, Ordering::Release);
        // Marked down again after the loop ended but before `probing` was
        // cleared: nobody else started a prober, so keep watching.
        if !(h.down.load(Ordering::Acquire)
            && !h.lost.load(Ordering::Acquire)
            && !h.probing.swap(true, Ordering::AcqRel))
        {
            return;
        }
    }
}

/// Checksum of a page as written back and verified on fetch.
pub fn checksum(page: &[u8]) -> u32 {
    crc32c::crc32c(page)
}
