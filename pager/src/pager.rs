//! The pager as a whole: configuration, the cache tier, the slot space over
//! all memory nodes, the fetch worker pool and the live sessions.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam::channel::{unbounded, Sender};
use dashmap::DashMap;
use dmem_memnode::client::ClientConfig;
use serde_json::{json, Value};
use thiserror::Error;
use tracing::info;

use crate::cache::CachePool;
use crate::contain::contain;
use crate::fetch::{self, FetchJob};
use crate::forksnap::ForkSnapshot;
use crate::placement::{SlotSpace, MIN_SLAB};
use crate::remote::{RemoteError, Transport};
use crate::seal::Sealer;
use crate::session::Session;
use crate::stats::{self, Counters, Latencies};
use crate::sys::{Mapping, PAGE};

/// Ended apps whose figures `dmem stats --json` still shows.
const ENDED_APPS_KEPT: usize = 64;

#[derive(Debug, Error)]
pub enum PagerError {
    #[error("{}", memnode_message(addr, source))]
    Memnode { addr: String, source: RemoteError },
    #[error("cannot allocate the {what}: {source}")]
    Memory {
        what: &'static str,
        source: nix::errno::Errno,
    },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
}

/// The client's errors name the node already; say it once.
fn memnode_message(addr: &str, source: &RemoteError) -> String {
    let text = source.to_string();
    if text.contains(addr) {
        text
    } else {
        format!("cannot reach memory node {addr}: {text}")
    }
}

/// Refuses a memory node listed twice, under the same name or two names
/// for one address (`localhost:7000`, `127.0.0.1:7000`): the pager would
/// count it as two nodes, and two replicas of a page could then sit on one
/// machine. A name that does not resolve is left to the connect to report.
fn distinct_memnodes(addrs: &[String]) -> Result<(), String> {
    let resolved: Vec<Vec<SocketAddr>> = addrs
        .iter()
        .map(|a| {
            a.to_socket_addrs()
                .map(Iterator::collect)
                .unwrap_or_default()
        })
        .collect();
    for (i, a) in addrs.iter().enumerate() {
        for (j, b) in addrs.iter().enumerate().skip(i + 1) {
            let same = a == b || resolved[i].iter().any(|x| resolved[j].contains(x));
            if same {
                return Err(format!(
                    "--memnode {a} and --memnode {b} (#{} and #{}) are the same memory node; \
                     list each node once",
                    i + 1,
                    j + 1
                ));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct PagerConfig {
    pub memnodes: Vec<String>,
    pub token: Option<Vec<u8>>,
    /// Default local limit per app, bytes.
    pub local_limit: u64,
    /// Cache tier size, bytes.
    pub cache: u64,
    /// Transfer unit, bytes (power of two, 4 KiB to 2 MiB).
    pub block: usize,
    /// Slab size leased from memory nodes, bytes.
    pub slab: u64,
    pub workers: usize,
    /// Prefetch window bounds, pages (max 0 = off).
    pub prefetch_min: usize,
    pub prefetch_max: usize,
    /// How long a fetch may wait for a memory node (including reconnecting).
    pub fetch_timeout: Duration,
    /// How memory nodes are reached (`--transport`).
    pub transport: crate::transport::TransportMode,
    pub rdma_device: dmem_memnode::rdma::DeviceConfig,
    /// Memory nodes that must hold every page written back (`--replicas`).
    pub replicas: usize,
    /// Most bytes per second a rebuild of lost replicas copies.
    pub rebuild_rate: u64,
    /// Seal pages written back (`--encrypt`, see `seal`).
    pub encrypt: bool,
}

impl Default for PagerConfig {
    fn default() -> Self {
        PagerConfig {
            memnodes: Vec::new(),
            token: None,
            local_limit: 1 << 30,
            cache: 256 << 20,
            block: PAGE,
            slab: 256 << 20,
            workers: 4,
            prefetch_min: 16,
            prefetch_max: 1024,
            fetch_timeout: Duration::from_secs(30),
            transport: crate::transport::TransportMode::Auto,
            rdma_device: dmem_memnode::rdma::DeviceConfig::default(),
            replicas: 1,
            rebuild_rate: 64 << 20,
            encrypt: false,
        }
    }
}

pub struct Pager {
    pub cfg: PagerConfig,
    pub cache: CachePool,
    pub space: SlotSpace,
    /// With `--encrypt`: seals pages written back, opens them on fetch.
    pub sealer: Option<Sealer>,
    /// A block of zeros, the source of zero fills.
    pub zeros: Mapping,
    pub sessions: DashMap<u64, Arc<Session>>,
    /// Fork snapshots by key, from a parent's `Hold` until its child adopts
    /// the snapshot or the hold ends (see `forksnap`).
    pub fork_snapshots: DashMap<u64, ForkSnapshot>,
    next_session: AtomicU64,
    jobs: Sender<FetchJob>,
    /// Totals of apps that have detached.
    pub ended: Counters,
    /// Figures of the last apps that detached (newest last), so that a
    /// launcher (`dmem run`) can report its program's run after it ended.
    pub ended_apps: Mutex<VecDeque<Value>>,
    pub ended_lat: Latencies,
    /// Held while an ended session moves its figures into `ended*` and
    /// leaves `sessions`, and while a snapshot reads them: a snapshot taken
    /// halfway saw the app gone with its counters not yet in `ended` (a
    /// run's summary read zero faults beside non-zero latency counts).
    retiring: Mutex<()>,
}

impl Pager {
    pub fn new(cfg: PagerConfig) -> Result<Arc<Pager>, PagerError> {
        if !cfg.block.is_power_of_two() || !(PAGE..=2 << 20).contains(&cfg.block) {
            return Err(PagerError::Config(format!(
                "--block must be a power of two from 4K to 2M, not {}",
                cfg.block
            )));
        }
        if cfg.slab < MIN_SLAB {
            return Err(PagerError::Config(format!(
                "--slab must be at least 4M, not {}",
                cfg.slab
            )));
        }
        if cfg.replicas == 0 || (cfg.replicas > 1 && cfg.replicas > cfg.memnodes.len()) {
            return Err(PagerError::Config(format!(
                "--replicas {} needs at least as many memory nodes (--memnode), {} given",
                cfg.replicas,
                cfg.memnodes.len()
            )));
        }
        distinct_memnodes(&cfg.memnodes).map_err(PagerError::Config)?;
        let mut nodes: Vec<Arc<dyn Transport>> = Vec::new();
        for addr in &cfg.memnodes {
            let mut cc = ClientConfig::new(addr.clone());
            cc.token = cfg.token.clone();
            cc.request_timeout = cfg.fetch_timeout;
            cc.reconnect_window = cfg.fetch_timeout;
            if cfg.replicas > 1 {
                // Another replica can answer: give up on a broken node soon
                // and read elsewhere, instead of waiting out a restart.
                cc.reconnect_window = cfg.fetch_timeout.min(REPLICA_RECONNECT);
                cc.request_timeout = cfg.fetch_timeout.min(REPLICA_REQUEST);
            }
            let t = crate::transport::connect(cc, cfg.transport, &cfg.rdma_device).map_err(
                |source| PagerError::Memnode {
                    addr: addr.clone(),
                    source,
                },
            )?;
            info!(
                memnode = addr,
                transport = t.kind(),
                "memory node connected"
            );
            nodes.push(t);
        }
        let sealer = if cfg.encrypt {
            Some(Sealer::new()?)
        } else {
            None
        };
        let cache = CachePool::new(cfg.cache).map_err(|source| PagerError::Memory {
            what: "cache tier",
            source,
        })?;
        // A block, plus the most a zero fill reaches around and ahead of
        // its fault.
        let zeros =
            Mapping::anonymous(cfg.block + crate::session::ZERO_FILL_MAX).map_err(|source| {
                PagerError::Memory {
                    what: "zero block",
                    source,
                }
            })?;
        let (tx, rx) = unbounded::<FetchJob>();
        let pager = Arc::new(Pager {
            space: SlotSpace::new(nodes, cfg.slab, cfg.replicas),
            sealer,
            cfg,
            cache,
            zeros,
            sessions: DashMap::new(),
            fork_snapshots: DashMap::new(),
            next_session: AtomicU64::new(1),
            jobs: tx,
            ended: Counters::default(),
            ended_apps: Mutex::new(VecDeque::new()),
            ended_lat: Latencies::default(),
            retiring: Mutex::new(()),
        });
        for i in 0..pager.cfg.workers.max(1) {
            let rx = rx.clone();
            let p = Arc::clone(&pager);
            std::thread::Builder::new()
                .name(format!("dmem-fetch-{i}"))
                .spawn(move || {
                    let mut bufs = fetch::Buffers::default();
                    for job in rx {
                        let s = Arc::clone(&job.session);
                        if contain(&s, "fetch worker", || fetch::run(job, &p, &mut bufs)).is_none()
                        {
                            // Its buffers may be half-filled: start afresh.
                            bufs = fetch::Buffers::default();
                        }
                    }
                })
                .map_err(|e| PagerError::Config(format!("cannot start workers: {e}")))?;
        }
        let weak = Arc::downgrade(&pager);
        std::thread::Builder::new()
            .name("dmem-rebuild".into())
            .spawn(move || rebuild_loop(&weak))
            .map_err(|e| PagerError::Config(format!("cannot start the rebuilder: {e}")))?;
        Ok(pager)
    }

    pub fn dispatch(&self, job: FetchJob) {
        // Workers live as long as the pager: the channel never disconnects.
        let _ = self.jobs.send(job);
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Starts the reader and evictor of a registered session.
    pub fn start_session(self: &Arc<Self>, s: Arc<Session>) {
        self.sessions.insert(s.id, Arc::clone(&s));
        let (p, s2) = (Arc::clone(self), Arc::clone(&s));
        let evictor = std::thread::Builder::new()
            .name(format!("dmem-evict-{}", s.id))
            .spawn(move || contain(&s2, "evictor", || crate::evict::run(&s2, &p)))
            .expect("spawn evictor");
        let p = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("dmem-uffd-{}", s.id))
            .spawn(move || {
                // A panic stops the app (`fatal` also ends the evictor).
                let _ = contain(&s, "fault reader", || s.run_reader(&p));
                let _ = evictor.join();
                s.teardown(&p);
                let mut figures = p.app_json(&s);
                figures["ended"] = json!(true);
                let _retiring = crate::lock(&p.retiring);
                {
                    let mut ended = crate::lock(&p.ended_apps);
                    if ended.len() == ENDED_APPS_KEPT {
                        ended.pop_front();
                    }
                    ended.push_back(figures);
                }
                p.ended.absorb(&s.counters);
                p.ended_lat.absorb(&s.lat);
                p.sessions.remove(&s.id);
            })
            .expect("spawn uffd reader");
    }

    /// Everything `dmem stats --json` shows.
    pub fn stats_json(&self, socket: &str) -> Value {
        let _retiring = crate::lock(&self.retiring);
        let total = Counters::default();
        let total_lat = Latencies::default();
        total.absorb(&self.ended);
        total_lat.absorb(&self.ended_lat);
        let mut apps = Vec::new();
        for e in self.sessions.iter() {
            let s = e.value();
            apps.push(self.app_json(s));
            total.absorb(&s.counters);
            total_lat.absorb(&s.lat);
        }
        let ended_apps: Vec<Value> = crate::lock(&self.ended_apps).iter().cloned().collect();
        let leased = self.space.leased_bytes();
        let memnodes: Vec<Value> = self
            .space
            .nodes()
            .iter()
            .zip(leased)
            .enumerate()
            .map(|(i, (n, l))| {
                json!({
                    "addr": n.addr(),
                    "transport": n.kind(),
                    "state": self.space.node_state(i),
                    "leased_bytes": l,
                    "reconnects": n.reconnects(),
                })
            })
            .collect();
        json!({
            "pager": {
                "socket": socket,
                "apps": apps.len(),
                "block_bytes": self.cfg.block,
                "cache_bytes": self.cache.frames() * PAGE,
                "cache_free_bytes": self.cache.free_frames() * PAGE,
                "remote_slots_used": self.space.used_slots(),
                "replicas": self.space.replicas(),
                "encrypt": self.sealer.is_some(),
                "degraded_groups": self.space.degraded_groups(),
                "rebuilt_pages": self.space.rebuilt_pages(),
            },
            "total": stats::to_json(&total, &total_lat),
            "apps": apps,
            "ended_apps": ended_apps,
            "memnodes": memnodes,
        })
    }

    /// One app's figures.
    fn app_json(&self, s: &Session) -> Value {
        let counts = {
            let st = s.lock();
            s.counters.peak((st.peak_local * PAGE) as u64);
            st.counts
        };
        let mut a = stats::to_json(&s.counters, &s.lat);
        a["session"] = json!(s.id);
        a["pid"] = json!(s.pid);
        a["local_limit_bytes"] = json!(s.limit_pages * PAGE);
        a["resident_bytes"] = json!(counts.resident * PAGE);
        a["cache_bytes"] = json!(counts.cached * PAGE);
        a["remote_pages"] = json!(counts.remote);
        a
    }

    /// Prometheus text for `--metrics`.
    pub fn metrics_text(&self) -> String {
        let _retiring = crate::lock(&self.retiring);
        let total = Counters::default();
        total.absorb(&self.ended);
        let mut out = String::new();
        let mut resident = 0;
        let mut cached = 0;
        for e in self.sessions.iter() {
            let c = {
                let st = e.value().lock();
                e.value().counters.peak((st.peak_local * PAGE) as u64);
                st.counts
            };
            total.absorb(&e.value().counters);
            resident += c.resident;
            cached += c.cached;
        }
        stats::to_prometheus(&mut out, "total", &total);
        use std::fmt::Write;
        let _ = writeln!(out, "dmem_pager_apps {}", self.sessions.len());
        let _ = writeln!(out, "dmem_pager_resident_bytes {}", resident * PAGE);
        let _ = writeln!(out, "dmem_pager_cache_bytes {}", cached * PAGE);
        let _ = writeln!(
            out,
            "dmem_pager_cache_capacity_bytes {}",
            self.cache.frames() * PAGE
        );
        for (n, l) in self.space.nodes().iter().zip(self.space.leased_bytes()) {
            let _ = writeln!(
                out,
                "dmem_pager_memnode_leased_bytes{{memnode=\"{}\"}} {l}",
                n.addr()
            );
        }
        out
    }
}

/// With replicas, how long a broken connection is retried before the node
/// counts as down and reads go to another replica.
const REPLICA_RECONNECT: Duration = Duration::from_secs(2);
/// With replicas, how long one request may wait for its reply.
const REPLICA_REQUEST: Duration = Duration::from_secs(5);

/// Watches the memory nodes, takes back lost ones that answer again, and
/// (with replicas) rebuilds groups that lost a replica, a group at a time,
/// for as long as the pager lives.
fn rebuild_loop(pager: &std::sync::Weak<Pager>) {
    let mut beat = std::time::Instant::now();
    loop {
        let Some(p) = pager.upgrade() else { return };
        if p.cfg.replicas > 1 && beat.elapsed() >= HEARTBEAT {
            p.space.heartbeat();
            beat = std::time::Instant::now();
        }
        p.space.readopt_lost();
        let rebuilt = p.space.rebuild_one(p.cfg.rebuild_rate);
        drop(p);
        if !rebuilt {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// With replicas, how often every node is asked whether it is alive.
const HEARTBEAT: Duration = Duration::from_secs(1);
