//! Slot placement over the memory nodes, with replicas.
//!
//! A slot is a 4 KiB place named by a dense `u32` (what `PageMeta::slot`
//! holds). Slots live in *groups*: one slab of the same size leased on each
//! of `replicas` distinct nodes, with the same layout, so slot `k` of a
//! group is at the same offset in every replica. A page written back to a
//! slot is written to all of the group's slabs and counts as written only
//! when every one of them has acknowledged it; a fetch reads one healthy
//! replica (the one answering fastest lately) and falls back to the others.
//! With one replica a group is a single slab, as before replicas existed.
//!
//! Each slot has a reference count, like a kernel swap entry, so a forked
//! child can share its parent's slots; a write-back always goes to a fresh
//! slot, and the old one is released after the new one is acknowledged.
//!
//! Each node has a health state: a transport error (unreachable, timed out,
//! session lost) marks it down, and placement skips every group with a
//! replica on it, so write-backs go to other groups (or stay local) instead
//! of waiting on it. A prober thread watches a down node and marks it up
//! once it answers again; any request that succeeds does the same. A group
//! with a replica on a node lost (or down longer than
//! [`REBUILD_AFTER`]) is rebuilt: see [`SlotSpace::rebuild_one`].
//!
//! A lost node that answers again is taken back with a new, empty session
//! ([`SlotSpace::readopt_lost`]): its old replicas are marked gone first
//! (their region ids meant something only in the old session), so no read
//! goes there, and the groups that had one are rebuilt like any other.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dmem_memnode::client::ClientError;
use dmem_memnode::protocol::{ErrorCode, Extent};
use tracing::{error, info, warn};

use crate::pages::NO_SLOT;
use crate::remote::{RemoteError, Transport};
use crate::sys::PAGE;

/// Where one replica of a slot lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub node: usize,
    pub extent: Extent,
}

/// One slab per replica, on distinct nodes, with one slot layout.
struct Group {
    /// Node of each replica.
    nodes: Vec<usize>,
    /// Region id of the replica's slab on its node; [`GONE`] when the node
    /// lost the session that held it.
    regions: Vec<u32>,
    /// References per slot: one per process (or fork snapshot) whose page
    /// table names it. u32, because a forking server can have more than
    /// 255 children sharing a page, and there are fewer processes than that
    /// (pid_max is at most 2^22), each with at most one reference and one
    /// snapshot per slot.
    refs: Vec<u32>,
    free: Vec<u32>,
    /// A replica is being rebuilt: no new slots until it is whole again.
    rebuilding: bool,
}

struct Inner {
    groups: Vec<Group>,
    /// Nodes found full, and when: not asked again for a while.
    full_since: Vec<Option<Instant>>,
    /// Region ids are unique per pager (so per node too).
    next_region: u32,
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
    /// When it went down (ms since the space was made; 0: up).
    down_since_ms: AtomicU64,
    /// Recent read latency, µs (moving average; 0: not measured yet).
    read_us: AtomicU64,
    /// When a lost node was last asked for a new session (ms since born).
    renew_tried_ms: AtomicU64,
}

/// Slot placement over all memory nodes.
pub struct SlotSpace {
    nodes: Vec<Arc<dyn Transport>>,
    health: Arc<Vec<Health>>,
    replicas: usize,
    slab_bytes: u64,
    slab_slots: u32,
    inner: Mutex<Inner>,
    /// Held while leasing a group (network round trips), so that region
    /// ids stay unique without holding `inner` meanwhile: `inner` is taken
    /// on the fault path and must never wait on a node.
    leasing: Mutex<()>,
    born: Instant,
    /// Pages copied to new replicas by rebuilds.
    rebuilt_pages: AtomicU64,
    /// When a failed rebuild was last warned about (ms since `born`).
    rebuild_warned_ms: AtomicU64,
}

/// Smallest slab the pager leases: smaller ones would cost a lease round
/// trip every few hundred pages written back.
pub const MIN_SLAB: u64 = 4 << 20;
/// How long a full node is left alone before asking again.
const FULL_BACKOFF: Duration = Duration::from_secs(2);
/// Bound of the prober's bare connect.
pub const PROBE_CONNECT: Duration = Duration::from_secs(1);
/// Longest pause between two probes of a down node.
const PROBE_MAX_PAUSE: Duration = Duration::from_secs(2);
/// A node down this long has its replicas rebuilt elsewhere (a node that
/// lost our session is rebuilt at once). Shorter than a memory node's
/// default lease grace (30 s), longer than a restart.
pub const REBUILD_AFTER: Duration = Duration::from_secs(5);
/// Pages copied per step of a rebuild (one read and one write each).
const REBUILD_CHUNK: usize = 64;
/// `Group::regions` entry of a replica whose node lost our session.
const GONE: u32 = u32::MAX;
/// How often a lost node is asked for a new session.
const RENEW_EVERY: Duration = Duration::from_secs(2);

/// Whether `e` says the node cannot be used (as opposed to the node
/// answering with a refusal, such as Full).
fn node_unusable(e: &RemoteError) -> bool {
    match e {
        RemoteError::Client(ClientError::Server { .. }) => false,
        RemoteError::Client(_) | RemoteError::Rdma(_) => true,
        RemoteError::OutOfSpace
        | RemoteError::NoNodes
        | RemoteError::Renew(_)
        | RemoteError::TooFewReplicas(..) => false,
    }
}

impl SlotSpace {
    /// `slab_bytes` is at least [`MIN_SLAB`] and `replicas` at most the
    /// number of nodes (both checked by the caller).
    pub fn new(nodes: Vec<Arc<dyn Transport>>, slab_bytes: u64, replicas: usize) -> SlotSpace {
        let slab_bytes = slab_bytes.max(MIN_SLAB) / PAGE as u64 * PAGE as u64;
        let n = nodes.len();
        SlotSpace {
            nodes,
            health: Arc::new((0..n).map(|_| Health::default()).collect()),
            replicas: replicas.max(1),
            slab_bytes,
            slab_slots: (slab_bytes / PAGE as u64) as u32,
            inner: Mutex::new(Inner {
                groups: Vec::new(),
                full_since: vec![None; n],
                next_region: 0,
            }),
            leasing: Mutex::new(()),
            born: Instant::now(),
            rebuilt_pages: AtomicU64::new(0),
            rebuild_warned_ms: AtomicU64::new(0),
        }
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Whether node `i` takes new slots.
    pub fn usable(&self, i: usize) -> bool {
        !self.health[i].down.load(Ordering::Acquire)
    }

    /// No node is down.
    pub fn all_usable(&self) -> bool {
        (0..self.nodes.len()).all(|i| self.usable(i))
    }

    /// Whether something last done at `last` (ms since `born`; 0: never)
    /// is due again, `every` later; if so, records now as its time.
    fn due(&self, last: &AtomicU64, every: Duration) -> bool {
        let now = self.born.elapsed().as_millis() as u64;
        let then = last.load(Ordering::Relaxed);
        if then != 0 && now < then + every.as_millis() as u64 {
            return false;
        }
        last.store(now.max(1), Ordering::Relaxed);
        true
    }

    /// Whether replica `r` of `g` holds data on a node that is up.
    fn replica_up(&self, g: &Group, r: usize) -> bool {
        g.regions[r] != GONE && self.usable(g.nodes[r])
    }

    /// Whether replica `r` of `g` should be rebuilt elsewhere.
    fn replica_gone(&self, g: &Group, r: usize) -> bool {
        g.regions[r] == GONE || self.node_gone(g.nodes[r])
    }

    /// Whether some replica of slot `s` lives on a node that is up (its
    /// copy can be counted on; a clean page without one is kept local).
    pub fn slot_usable(&self, s: u32) -> bool {
        if s == NO_SLOT {
            return false;
        }
        let inner = crate::lock(&self.inner);
        let g = &inner.groups[(s / self.slab_slots) as usize];
        (0..g.nodes.len()).any(|r| self.replica_up(g, r))
    }

    fn group_takes_slots(&self, g: &Group) -> bool {
        !g.rebuilding && !g.free.is_empty() && (0..g.nodes.len()).all(|r| self.replica_up(g, r))
    }

    fn node_may_lease(&self, inner: &Inner, i: usize) -> bool {
        self.usable(i) && inner.full_since[i].is_none_or(|t| t.elapsed() >= FULL_BACKOFF)
    }

    /// Whether a placement could succeed now without waiting on a node
    /// known to be down or full: a usable group has free slots, or enough
    /// usable nodes are not known full to lease a new group.
    pub fn may_place(&self) -> bool {
        let inner = crate::lock(&self.inner);
        inner.groups.iter().any(|g| self.group_takes_slots(g))
            || (0..self.nodes.len())
                .filter(|&i| self.node_may_lease(&inner, i))
                .count()
                >= self.replicas
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
            h.down_since_ms.store(0, Ordering::Release);
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
        let session_lost = match e {
            RemoteError::Client(ClientError::SessionLost { session, .. }) => {
                if self.nodes[i].session().is_some_and(|now| now != *session) {
                    // About a session renewed since (a request that failed
                    // before the re-adoption, reported after it): the node
                    // holds our new session, whose replicas must not be
                    // marked gone.
                    return;
                }
                true
            }
            _ => false,
        };
        let h = &self.health[i];
        if session_lost && !h.lost.swap(true, Ordering::AcqRel) {
            error!(
                node = self.nodes[i].addr(),
                "memory node lost this pager's session: the replicas it held are gone; \
                 it takes no more pages"
            );
        }
        if !h.down.swap(true, Ordering::AcqRel) {
            let ms = self.born.elapsed().as_millis() as u64;
            h.down_since_ms.store(ms.max(1), Ordering::Release);
            warn!(
                node = self.nodes[i].addr(),
                "memory node unusable, placing pages elsewhere (or keeping them local) \
                 until it answers again: {e}"
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

    /// Whether node `i`'s replicas should be rebuilt elsewhere: it lost our
    /// session, or it has been down for [`REBUILD_AFTER`].
    fn node_gone(&self, i: usize) -> bool {
        let h = &self.health[i];
        if h.lost.load(Ordering::Acquire) {
            return true;
        }
        let since = h.down_since_ms.load(Ordering::Acquire);
        h.down.load(Ordering::Acquire)
            && since != 0
            && self.born.elapsed().as_millis() as u64 >= since + REBUILD_AFTER.as_millis() as u64
    }

    /// Records how long a read from node `i` took (moving average).
    fn note_read(&self, i: usize, took: Duration) {
        let us = (took.as_micros() as u64).max(1);
        let h = &self.health[i].read_us;
        let old = h.load(Ordering::Relaxed);
        h.store(
            if old == 0 { us } else { (old * 7 + us) / 8 },
            Ordering::Relaxed,
        );
    }

    pub fn nodes(&self) -> &[Arc<dyn Transport>] {
        &self.nodes
    }

    fn location(&self, g: &Group, r: usize, s: u32) -> Location {
        Location {
            node: g.nodes[r],
            extent: Extent {
                slab: g.regions[r],
                len: PAGE as u32,
                offset: (s % self.slab_slots) as u64 * PAGE as u64,
            },
        }
    }

    /// Every replica of slot `s` that still exists.
    pub fn replicas_of(&self, s: u32) -> Vec<Location> {
        let inner = crate::lock(&self.inner);
        let g = &inner.groups[(s / self.slab_slots) as usize];
        (0..g.nodes.len())
            .filter(|&r| g.regions[r] != GONE)
            .map(|r| self.location(g, r, s))
            .collect()
    }

    /// The replica of slot `s` a read should go to, leaving out `avoid`:
    /// an up node before a down one, then the fastest lately. `None` when
    /// every replica is on a node in `avoid`.
    pub fn read_location(&self, s: u32, avoid: &[usize]) -> Option<Location> {
        let inner = crate::lock(&self.inner);
        let g = &inner.groups[(s / self.slab_slots) as usize];
        (0..g.nodes.len())
            .filter(|&r| g.regions[r] != GONE && !avoid.contains(&g.nodes[r]))
            .min_by_key(|&r| {
                let n = g.nodes[r];
                (
                    !self.usable(n),
                    self.health[n].read_us.load(Ordering::Relaxed),
                )
            })
            .map(|r| self.location(g, r, s))
    }

    /// Takes `n` fresh slots (refcount 1) in groups whose nodes are all up,
    /// leasing groups as needed. Never holds `inner` across a network
    /// round trip.
    pub fn alloc(&self, n: usize) -> Result<Vec<u32>, RemoteError> {
        if self.nodes.is_empty() {
            return Err(RemoteError::NoNodes);
        }
        let mut out = Vec::with_capacity(n);
        loop {
            {
                let mut inner = crate::lock(&self.inner);
                for i in 0..inner.groups.len() {
                    if out.len() == n {
                        break;
                    }
                    if !self.group_takes_slots(&inner.groups[i]) {
                        continue;
                    }
                    let g = &mut inner.groups[i];
                    while out.len() < n {
                        let Some(k) = g.free.pop() else { break };
                        g.refs[k as usize] = 1;
                        out.push(i as u32 * self.slab_slots + k);
                    }
                }
            }
            if out.len() == n {
                return Ok(out);
            }
            if let Err(e) = self.lease_group() {
                for s in out {
                    self.decref(s);
                }
                return Err(e);
            }
        }
    }

    /// The `want` usable nodes with the most free space (each able to hold
    /// a slab), leaving out `exclude`. Marks the nodes found full.
    fn roomiest(&self, want: usize, exclude: &[usize]) -> Vec<usize> {
        let candidates: Vec<usize> = {
            let inner = crate::lock(&self.inner);
            (0..self.nodes.len())
                .filter(|&i| !exclude.contains(&i) && self.node_may_lease(&inner, i))
                .collect()
        };
        let mut free: Vec<(usize, u64)> = Vec::new();
        for i in candidates {
            match self.nodes[i].free_bytes() {
                Ok(f) if f >= self.slab_bytes => {
                    self.node_ok(i);
                    free.push((i, f));
                }
                Ok(_) => {
                    self.node_ok(i);
                    crate::lock(&self.inner).full_since[i] = Some(Instant::now());
                }
                Err(e) => self.node_failed(i, &e),
            }
        }
        // Most free first; ties by index, so groups spread over the nodes
        // as they fill and a lost node's groups have their other replicas
        // on many different nodes.
        free.sort_by_key(|&(i, f)| (std::cmp::Reverse(f), i));
        free.into_iter().take(want).map(|(i, _)| i).collect()
    }

    /// Leases one slab on `node` as a new region; on refusal marks the node
    /// full or failed.
    fn lease_on(&self, node: usize) -> Result<u32, RemoteError> {
        let region = {
            let mut inner = crate::lock(&self.inner);
            inner.next_region += 1;
            inner.next_region - 1
        };
        match self.nodes[node].lease(region, self.slab_bytes) {
            Ok(()) => {
                info!(
                    node = self.nodes[node].addr(),
                    region,
                    bytes = self.slab_bytes,
                    "leased a slab"
                );
                Ok(region)
            }
            Err(RemoteError::Client(e)) if e.code() == Some(ErrorCode::Full) => {
                crate::lock(&self.inner).full_since[node] = Some(Instant::now());
                Err(RemoteError::OutOfSpace)
            }
            Err(e) => {
                self.node_failed(node, &e);
                Err(e)
            }
        }
    }

    /// Leases one more group: a slab on each of `replicas` distinct usable
    /// nodes, those with the most free space. Slabs are all the same size
    /// (slot ids are dense), so a node that cannot fit one counts as full.
    fn lease_group(&self) -> Result<(), RemoteError> {
        let _leasing = crate::lock(&self.leasing);
        // Someone else leased while we waited for the lease lock.
        if crate::lock(&self.inner)
            .groups
            .iter()
            .any(|g| self.group_takes_slots(g))
        {
            return Ok(());
        }
        let nodes = self.roomiest(self.replicas, &[]);
        if nodes.len() < self.replicas {
            return Err(RemoteError::OutOfSpace);
        }
        let mut regions = Vec::with_capacity(nodes.len());
        for &node in &nodes {
            match self.lease_on(node) {
                Ok(r) => regions.push(r),
                Err(e) => {
                    for (&n, &r) in nodes.iter().zip(&regions) {
                        let _ = self.nodes[n].release(r);
                    }
                    return Err(e);
                }
            }
        }
        crate::lock(&self.inner).groups.push(Group {
            nodes,
            regions,
            refs: vec![0; self.slab_slots as usize],
            free: (0..self.slab_slots).rev().collect(),
            rebuilding: false,
        });
        Ok(())
    }

    /// Adds a reference (a forked child sharing the slot).
    pub fn incref(&self, s: u32) {
        if s == NO_SLOT {
            return;
        }
        let mut inner = crate::lock(&self.inner);
        let g = &mut inner.groups[(s / self.slab_slots) as usize];
        let r = &mut g.refs[(s % self.slab_slots) as usize];
        *r = r.checked_add(1).expect("slot references beyond u32");
    }

    /// Drops a reference; the slot is reused once none remain.
    pub fn decref(&self, s: u32) {
        if s == NO_SLOT {
            return;
        }
        let mut inner = crate::lock(&self.inner);
        let g = &mut inner.groups[(s / self.slab_slots) as usize];
        let k = s % self.slab_slots;
        let r = &mut g.refs[k as usize];
        debug_assert!(*r > 0, "slot {s} released twice");
        *r = r.saturating_sub(1);
        if *r == 0 {
            g.free.push(k);
        }
    }

    /// Slabs leased per node, in bytes.
    pub fn leased_bytes(&self) -> Vec<u64> {
        let inner = crate::lock(&self.inner);
        let mut v = vec![0; self.nodes.len()];
        for g in &inner.groups {
            for (&n, &region) in g.nodes.iter().zip(&g.regions) {
                if region != GONE {
                    v[n] += self.slab_bytes;
                }
            }
        }
        v
    }

    /// Slots in use (refcount > 0).
    pub fn used_slots(&self) -> u64 {
        let inner = crate::lock(&self.inner);
        inner
            .groups
            .iter()
            .map(|g| (self.slab_slots as usize - g.free.len()) as u64)
            .sum()
    }

    /// Groups with a replica on a node that is down or lost.
    pub fn degraded_groups(&self) -> usize {
        let inner = crate::lock(&self.inner);
        inner
            .groups
            .iter()
            .filter(|g| (0..g.nodes.len()).any(|r| !self.replica_up(g, r)))
            .count()
    }

    pub fn rebuilt_pages(&self) -> u64 {
        self.rebuilt_pages.load(Ordering::Relaxed)
    }

    /// Takes back lost nodes that answer again, with a new session each
    /// (tried every [`RENEW_EVERY`]). Their replicas are marked gone before
    /// the node counts as up, so that nothing reads or counts on them; the
    /// rebuild then restores those groups, possibly onto the same node.
    pub fn readopt_lost(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            let h = &self.health[i];
            if !h.lost.load(Ordering::Acquire) || !self.due(&h.renew_tried_ms, RENEW_EVERY) {
                continue;
            }
            if !node.reachable() {
                continue;
            }
            // No group is being leased meanwhile: one leased in the old
            // session but pushed after the marking below would keep a
            // region the node no longer has (its writes failing with no
            // node to blame), and a lease resent on the new session would
            // be marked gone and leak.
            let _leasing = crate::lock(&self.leasing);
            if let Err(e) = node.renew() {
                tracing::debug!(node = node.addr(), "no new session yet: {e}");
                continue;
            }
            let gone = {
                let mut inner = crate::lock(&self.inner);
                let mut gone = 0;
                for g in &mut inner.groups {
                    for r in 0..g.nodes.len() {
                        if g.nodes[r] == i && g.regions[r] != GONE {
                            g.regions[r] = GONE;
                            gone += 1;
                        }
                    }
                }
                inner.full_since[i] = None;
                gone
            };
            h.lost.store(false, Ordering::Release);
            h.down.store(false, Ordering::Release);
            h.down_since_ms.store(0, Ordering::Release);
            info!(
                node = node.addr(),
                replicas_gone = gone,
                "lost memory node answers again: new session, placing pages on it; \
                 the replicas it held are rebuilt"
            );
        }
    }

    /// Asks every node that is up for its free space (a real request: a
    /// dead node or a lost session shows at once, even while no app pages).
    pub fn heartbeat(&self) {
        for (i, node) in self.nodes.iter().enumerate() {
            if self.usable(i) {
                match node.free_bytes() {
                    Ok(_) => self.node_ok(i),
                    Err(e) => self.node_failed(i, &e),
                }
            }
        }
    }

    /// Rebuilds one group that has a replica on a gone node (see
    /// [`SlotSpace::node_gone`]), if any: leases a slab on a node the group
    /// does not use, copies the slots in use from a surviving replica, at
    /// most `max_bytes_per_s`, then puts the new slab in the gone one's
    /// place. The group takes no new slots meanwhile, so no write races the
    /// copy (slots in use are never overwritten: write-backs go to fresh
    /// slots). Returns whether a group was rebuilt.
    ///
    /// With one replica there is nothing to copy from: pages that lived
    /// only on a lost node are gone, and a fetch of one stops its app.
    pub fn rebuild_one(&self, max_bytes_per_s: u64) -> bool {
        if self.replicas < 2 {
            return false;
        }
        let picked = {
            let mut inner = crate::lock(&self.inner);
            let found = inner.groups.iter().enumerate().find_map(|(gi, g)| {
                let gone = (0..g.nodes.len()).find(|&r| self.replica_gone(g, r))?;
                let survivor = (0..g.nodes.len()).find(|&r| self.replica_up(g, r))?;
                Some((gi, gone, survivor))
            });
            if let Some((gi, _, _)) = found {
                inner.groups[gi].rebuilding = true;
            }
            found.map(|(gi, gone, survivor)| {
                let g = &inner.groups[gi];
                let used: Vec<u32> = (0..self.slab_slots)
                    .filter(|&k| g.refs[k as usize] > 0)
                    .collect();
                (gi, gone, survivor, g.nodes.clone(), g.regions.clone(), used)
            })
        };
        let Some((gi, gone, survivor, nodes, regions, used)) = picked else {
            return false;
        };
        // The new replica goes to a node holding none of the others (a
        // node whose replica here is gone may take it).
        let others: Vec<usize> = (0..nodes.len())
            .filter(|&r| r != gone && regions[r] != GONE)
            .map(|r| nodes[r])
            .collect();
        let done = self.copy_replica(
            gi,
            &others,
            (nodes[survivor], regions[survivor]),
            &used,
            max_bytes_per_s,
        );
        let mut inner = crate::lock(&self.inner);
        let g = &mut inner.groups[gi];
        g.rebuilding = false;
        match done {
            Ok((node, region)) => {
                let (old_node, old_region) = (g.nodes[gone], g.regions[gone]);
                g.nodes[gone] = node;
                g.regions[gone] = region;
                drop(inner);
                self.rebuilt_pages
                    .fetch_add(used.len() as u64, Ordering::Relaxed);
                info!(
                    from = self.nodes[old_node].addr(),
                    to = self.nodes[node].addr(),
                    pages = used.len(),
                    "rebuilt a replica group on another memory node"
                );
                // Best effort: a node that comes back frees it at the end of
                // its lease grace anyway.
                if old_region != GONE && self.usable(old_node) {
                    let _ = self.nodes[old_node].release(old_region);
                }
                true
            }
            Err(e) => {
                // Retried every step; say so once a minute at most (with N
                // replicas and N nodes a lost one cannot be replaced).
                if self.due(&self.rebuild_warned_ms, Duration::from_secs(60)) {
                    warn!("rebuilding a replica group failed, will keep trying: {e}");
                } else {
                    tracing::debug!("rebuilding a replica group failed: {e}");
                }
                false
            }
        }
    }

    /// Leases a slab on a node not in `exclude` for group `gi` and copies
    /// `used` slots into it from the replica at `survivor` (node, region).
    /// Returns the node and region.
    fn copy_replica(
        &self,
        gi: usize,
        exclude: &[usize],
        survivor: (usize, u32),
        used: &[u32],
        max_bytes_per_s: u64,
    ) -> Result<(usize, u32), RemoteError> {
        let Some(&node) = self.roomiest(1, exclude).first() else {
            return Err(RemoteError::OutOfSpace);
        };
        let region = self.lease_on(node)?;
        let from = &self.nodes[survivor.0];
        let to = &self.nodes[node];
        let t0 = Instant::now();
        let mut buf = vec![0u8; REBUILD_CHUNK * PAGE];
        let mut copied = 0u64;
        let result = (|| {
            for chunk in used.chunks(REBUILD_CHUNK) {
                let ext = |slab: u32| -> Vec<Extent> {
                    chunk
                        .iter()
                        .map(|&k| Extent {
                            slab,
                            len: PAGE as u32,
                            offset: k as u64 * PAGE as u64,
                        })
                        .collect()
                };
                let data = &mut buf[..chunk.len() * PAGE];
                from.post_read(&ext(survivor.1))?.wait(data)?;
                to.post_write(&ext(region), data)?.wait(&mut [])?;
                copied += data.len() as u64;
                // Bounded rate: recovery must not starve the apps' faults.
                if max_bytes_per_s > 0 {
                    let due = Duration::from_secs_f64(copied as f64 / max_bytes_per_s as f64);
                    if let Some(wait) = due.checked_sub(t0.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = to.release(region);
            if node_unusable(&e) {
                // Which side failed is not known; the next request tells.
                warn!(group = gi, "copy for a rebuild failed: {e}");
            }
            return Err(e);
        }
        Ok((node, region))
    }
}

/// Reads in flight, by node, with when they were posted.
pub type Posted = Vec<(usize, Box<dyn crate::remote::Completion>, Instant)>;

/// A failed read: the node that failed it, or `None` when some page had
/// no replica left to ask.
pub type ReadFailure = (Option<usize>, RemoteError);

/// A batch of page transfers to or from slots, split by node and posted
/// together so they travel in parallel.
pub struct Batch<'a> {
    space: &'a SlotSpace,
    /// Per node: extents and the indexes of the pages they carry.
    per_node: Vec<(Vec<Extent>, Vec<usize>)>,
    pages: usize,
    /// Reads: a page with no replica left to read (all in `avoid`).
    unreadable: bool,
    /// Writes: a slot with fewer live replicas than `--replicas` (one was
    /// marked gone after the slot was handed out).
    short: Option<usize>,
}

impl<'a> Batch<'a> {
    /// Reads of `slots`, each from its best replica not on a node in
    /// `avoid`.
    pub fn read(space: &'a SlotSpace, slots: &[u32], avoid: &[usize]) -> Batch<'a> {
        let mut b = Batch::empty(space, slots.len());
        for (i, &s) in slots.iter().enumerate() {
            match space.read_location(s, avoid) {
                Some(loc) => b.add(i, loc),
                None => b.unreadable = true,
            }
        }
        b
    }

    /// Writes of `slots` to every replica.
    pub fn write_all(space: &'a SlotSpace, slots: &[u32]) -> Batch<'a> {
        let mut b = Batch::empty(space, slots.len());
        for (i, &s) in slots.iter().enumerate() {
            let locs = space.replicas_of(s);
            if locs.len() < space.replicas {
                b.short = Some(locs.len());
            }
            for loc in locs {
                b.add(i, loc);
            }
        }
        b
    }

    fn empty(space: &'a SlotSpace, pages: usize) -> Batch<'a> {
        Batch {
            space,
            per_node: vec![(Vec::new(), Vec::new()); space.nodes.len()],
            pages,
            unreadable: false,
            short: None,
        }
    }

    fn add(&mut self, i: usize, loc: Location) {
        let (ext, idx) = &mut self.per_node[loc.node];
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

    /// The node page `i` is read from.
    pub fn node_of(&self, i: usize) -> Option<usize> {
        self.per_node.iter().position(|(_, idx)| idx.contains(&i))
    }

    /// Posts the reads on every node involved; `finish_read` collects them.
    pub fn post_read(&self) -> Result<Posted, ReadFailure> {
        if self.unreadable {
            return Err((None, RemoteError::NoNodes));
        }
        let mut posted = Vec::new();
        for (node, (ext, _)) in self.per_node.iter().enumerate() {
            if !ext.is_empty() {
                match self.space.nodes[node].post_read(ext) {
                    Ok(c) => posted.push((node, c, Instant::now())),
                    Err(e) => {
                        self.space.node_failed(node, &e);
                        return Err((Some(node), e));
                    }
                }
            }
        }
        Ok(posted)
    }

    /// Waits for posted reads; page `i` lands at `out[i * PAGE..]`. Pages of
    /// one node that are contiguous in `out` too (one node: all of them)
    /// are received in place; the rest go through `scratch`. On failure
    /// returns the first node that failed, with its error.
    pub fn finish_read(
        &self,
        posted: Posted,
        out: &mut [u8],
        scratch: &mut Vec<u8>,
    ) -> Result<(), ReadFailure> {
        assert!(out.len() >= self.pages * PAGE);
        let mut first_err = None;
        for (node, c, at) in posted {
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
                first_err.get_or_insert((Some(node), e));
                continue;
            }
            self.space.note_read(node, at.elapsed());
            self.space.node_ok(node);
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Writes page `i` of `data` to slot `i`; returns when every node has
    /// acknowledged, or failed. Every posted write is waited for, even after
    /// an error, so that no write is still travelling when the caller gives
    /// the slots back.
    pub fn write(&self, data: &[u8]) -> Result<(), RemoteError> {
        // Acknowledged by fewer nodes than required (none at all with one
        // replica) is not written back: the caller keeps the pages and
        // tries again with fresh slots.
        if let Some(live) = self.short {
            return Err(RemoteError::TooFewReplicas(live, self.space.replicas));
        }
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
                        h.down_since_ms.store(0, Ordering::Release);
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
