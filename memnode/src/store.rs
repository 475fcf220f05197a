//! Sessions, their slabs, and the node-wide capacity budget.
//!
//! Each session owns a private namespace of slab ids chosen by the client,
//! which makes ALLOC idempotent (a retried ALLOC after a reconnect finds its
//! slab) and makes other sessions' slabs unnameable. All access to a
//! session's slabs happens under its mutex, held by the one connection that
//! currently owns the session.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use thiserror::Error;

use crate::auth::{random_secret, secrets_equal};
use crate::lock;
use crate::protocol::{ErrorCode, Extent, RdmaRegion, Secret, MAX_SLAB_BYTES};
use crate::rdma::{RdmaService, SlabRegion};
use crate::sys::SlabMem;

/// A refusal, carried back to the client as an ERROR frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct StoreError {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> StoreError {
    StoreError {
        code,
        message: message.into(),
    }
}

/// The node's memory: capacity, and the sessions holding it.
pub struct Store {
    capacity: u64,
    used: AtomicU64,
    grace: Duration,
    next_session: AtomicU64,
    sessions: DashMap<u64, Arc<Session>>,
}

pub struct Session {
    pub id: u64,
    secret: Secret,
    inner: Mutex<SessionInner>,
}

struct SessionInner {
    slabs: HashMap<u32, Slab>,
    bytes: u64,
    /// Connection currently owning the session, and a handle to wake it when
    /// a resuming connection takes over (the old peer may be half-open).
    owner: Option<(u64, TcpStream)>,
    detached_at: Option<Instant>,
    closed: bool,
}

/// A leased slab; its RDMA registration (if any) goes before its memory.
struct Slab {
    region: Option<SlabRegion>,
    mem: SlabMem,
}

/// Session-level figures for STAT and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionFigures {
    pub slabs: u32,
    pub bytes: u64,
}

/// Node-wide figures for metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreFigures {
    pub capacity: u64,
    pub used: u64,
    pub sessions_attached: u64,
    pub sessions_detached: u64,
    pub slabs: u64,
}

impl Session {
    /// The secret a client presents to resume this session.
    pub fn secret(&self) -> &Secret {
        &self.secret
    }
}

impl Store {
    pub fn new(capacity: u64, grace: Duration) -> Store {
        Store {
            capacity,
            used: AtomicU64::new(0),
            grace,
            next_session: AtomicU64::new(1),
            sessions: DashMap::new(),
        }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Opens a new session owned by connection `conn`.
    pub fn create(&self, conn: u64, stream: TcpStream) -> Arc<Session> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let s = Arc::new(Session {
            id,
            secret: random_secret(),
            inner: Mutex::new(SessionInner {
                slabs: HashMap::new(),
                bytes: 0,
                owner: Some((conn, stream)),
                detached_at: None,
                closed: false,
            }),
        });
        self.sessions.insert(id, s.clone());
        s
    }

    /// Reattaches session `id` to connection `conn` if `secret` matches.
    /// A connection that still owns it is shut down (takeover).
    pub fn resume(
        &self,
        id: u64,
        secret: &Secret,
        conn: u64,
        stream: TcpStream,
    ) -> Result<Arc<Session>, StoreError> {
        let unknown = || {
            refuse(
                ErrorCode::UnknownSession,
                format!("session {id} is unknown or its lease expired"),
            )
        };
        let s = self
            .sessions
            .get(&id)
            .map(|e| e.value().clone())
            .ok_or_else(unknown)?;
        if !secrets_equal(&s.secret, secret) {
            return Err(unknown());
        }
        let mut inner = lock(&s.inner);
        if inner.closed {
            return Err(unknown());
        }
        if let Some((_, old)) = inner.owner.take() {
            let _ = old.shutdown(Shutdown::Both);
        }
        inner.owner = Some((conn, stream));
        inner.detached_at = None;
        drop(inner);
        Ok(s)
    }

    /// Marks the session detached if `conn` still owns it; its slabs live on
    /// for the lease grace period.
    pub fn detach(&self, s: &Session, conn: u64) {
        let mut inner = lock(&s.inner);
        if matches!(inner.owner, Some((c, _)) if c == conn) {
            inner.owner = None;
            inner.detached_at = Some(Instant::now());
        }
    }

    /// Ends a session now and frees its slabs.
    pub fn close(&self, s: &Session) {
        if let Some((_, s)) = self.sessions.remove(&s.id) {
            let mut inner = lock(&s.inner);
            inner.closed = true;
            inner.owner = None;
            self.release(&mut inner);
        }
    }

    /// Frees sessions detached for longer than the grace period. Returns the
    /// ids reaped.
    pub fn reap(&self) -> Vec<u64> {
        let now = Instant::now();
        let expired: Vec<u64> = self
            .sessions
            .iter()
            .filter(|e| self.expired(e.value(), now))
            .map(|e| *e.key())
            .collect();
        let mut reaped = Vec::new();
        for id in expired {
            // Re-check under the lock: the session may have resumed meanwhile.
            if let Some((_, s)) = self.sessions.remove_if(&id, |_, s| self.expired(s, now)) {
                let mut inner = lock(&s.inner);
                inner.closed = true;
                self.release(&mut inner);
                reaped.push(id);
            }
        }
        reaped
    }

    /// Whether `s` has been detached for longer than the grace period.
    fn expired(&self, s: &Session, now: Instant) -> bool {
        matches!(lock(&s.inner).detached_at, Some(t) if now.duration_since(t) >= self.grace)
    }

    fn release(&self, inner: &mut SessionInner) {
        inner.slabs.clear();
        self.used.fetch_sub(inner.bytes, Ordering::Relaxed);
        inner.bytes = 0;
    }

    /// Runs `f` on the session's slabs if connection `conn` owns it.
    fn with<T>(
        &self,
        s: &Session,
        conn: u64,
        f: impl FnOnce(&mut SessionInner) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut inner = lock(&s.inner);
        match inner.owner {
            Some((c, _)) if c == conn && !inner.closed => f(&mut inner),
            _ => Err(refuse(
                ErrorCode::UnknownSession,
                "session was taken over by another connection",
            )),
        }
    }

    /// Leases slab `slab` of `size` bytes. Idempotent for the same size.
    pub fn alloc(&self, s: &Session, conn: u64, slab: u32, size: u64) -> Result<(), StoreError> {
        if size == 0 || size > MAX_SLAB_BYTES {
            return Err(refuse(
                ErrorCode::SlabTooLarge,
                format!("slab size {size} must be between 1 and {MAX_SLAB_BYTES} bytes"),
            ));
        }
        let rounded = size.div_ceil(4096) * 4096;
        self.with(s, conn, |inner| {
            if let Some(existing) = inner.slabs.get(&slab) {
                return if existing.mem.len() as u64 == rounded {
                    Ok(())
                } else {
                    Err(refuse(
                        ErrorCode::SlabExists,
                        format!("slab {slab} already exists with another size"),
                    ))
                };
            }
            self.reserve(rounded)?;
            match SlabMem::new(rounded as usize) {
                Ok(m) => {
                    inner.slabs.insert(
                        slab,
                        Slab {
                            region: None,
                            mem: m,
                        },
                    );
                    inner.bytes += rounded;
                    Ok(())
                }
                Err(e) => {
                    self.used.fetch_sub(rounded, Ordering::Relaxed);
                    Err(refuse(
                        ErrorCode::Full,
                        format!("cannot map {rounded} bytes: {e}"),
                    ))
                }
            }
        })
    }

    fn reserve(&self, bytes: u64) -> Result<(), StoreError> {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.capacity)
            })
            .map(|_| ())
            .map_err(|used| {
                refuse(
                    ErrorCode::Full,
                    format!(
                        "memory node full: {used} of {} bytes leased, {bytes} more requested",
                        self.capacity
                    ),
                )
            })
    }

    /// Frees slab `slab`.
    pub fn free(&self, s: &Session, conn: u64, slab: u32) -> Result<(), StoreError> {
        self.with(s, conn, |inner| {
            let m = inner.slabs.remove(&slab).ok_or_else(|| no_slab(slab))?;
            inner.bytes -= m.mem.len() as u64;
            self.used.fetch_sub(m.mem.len() as u64, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Appends every extent to `out` (concatenated). All extents are checked
    /// before any byte moves, so a refused batch has no partial effect.
    pub fn read(
        &self,
        s: &Session,
        conn: u64,
        extents: &[Extent],
        out: &mut Vec<u8>,
    ) -> Result<(), StoreError> {
        self.with(s, conn, |inner| {
            check_extents(inner, extents)?;
            for e in extents {
                let bytes = inner.slabs[&e.slab].mem.bytes(e.offset, e.len as usize);
                out.extend_from_slice(bytes.expect("extent was checked"));
            }
            Ok(())
        })
    }

    /// Writes `data` (concatenated) to every extent, all or nothing.
    pub fn write(
        &self,
        s: &Session,
        conn: u64,
        extents: &[Extent],
        data: &[u8],
    ) -> Result<(), StoreError> {
        self.with(s, conn, |inner| {
            check_extents(inner, extents)?;
            let mut pos = 0;
            for e in extents {
                let n = e.len as usize;
                let slab = inner.slabs.get_mut(&e.slab).expect("extent was checked");
                let ok = slab.mem.write_at(e.offset, &data[pos..pos + n]);
                debug_assert!(ok, "extent was checked");
                pos += n;
            }
            Ok(())
        })
    }

    /// Registers slab `slab` for RDMA (once) and says where it is.
    pub fn rdma_region(
        &self,
        s: &Session,
        conn: u64,
        slab: u32,
        rdma: &RdmaService,
    ) -> Result<RdmaRegion, StoreError> {
        rdma.check()?;
        self.with(s, conn, |inner| {
            let m = inner.slabs.get_mut(&slab).ok_or_else(|| no_slab(slab))?;
            if m.region.is_none() {
                m.region = Some(rdma.register(&m.mem)?);
            }
            Ok(m.region.as_ref().expect("registered above").region())
        })
    }

    pub fn session_figures(&self, s: &Session, conn: u64) -> Result<SessionFigures, StoreError> {
        self.with(s, conn, |inner| {
            Ok(SessionFigures {
                slabs: inner.slabs.len() as u32,
                bytes: inner.bytes,
            })
        })
    }

    pub fn figures(&self) -> StoreFigures {
        let mut f = StoreFigures {
            capacity: self.capacity,
            used: self.used(),
            ..Default::default()
        };
        for e in self.sessions.iter() {
            let inner = lock(&e.value().inner);
            if inner.owner.is_some() {
                f.sessions_attached += 1;
            } else {
                f.sessions_detached += 1;
            }
            f.slabs += inner.slabs.len() as u64;
        }
        f
    }
}

fn no_slab(slab: u32) -> StoreError {
    refuse(
        ErrorCode::NoSuchSlab,
        format!("no slab {slab} in this session"),
    )
}

fn check_extents(inner: &SessionInner, extents: &[Extent]) -> Result<(), StoreError> {
    for e in extents {
        let m = &inner.slabs.get(&e.slab).ok_or_else(|| no_slab(e.slab))?.mem;
        let end = e.offset.checked_add(e.len as u64);
        if end.is_none_or(|end| end > m.len() as u64) {
            return Err(refuse(
                ErrorCode::OutOfBounds,
                format!(
                    "extent {}+{} is outside slab {} of {} bytes",
                    e.offset,
                    e.len,
                    e.slab,
                    m.len()
                ),
            ));
        }
    }
    Ok(())
}
