//! Messages between an app (libdmem.so, or a test harness) and the pager,
//! one per SOCK_SEQPACKET datagram on the pager's unix socket, little-endian.
//! See docs/protocol.md ("app <-> pager").
//!
//! The first message of a connection says what it is: `Register` (an app
//! session: carries the uffd by SCM_RIGHTS, then the connection stays open
//! as the agent channel) or `StatsRequest` (`dmem stats`).

use thiserror::Error;

pub const MAGIC: u32 = 0x444d_454d; // "DMEM"
pub const VERSION: u16 = 3;
/// Largest datagram either side sends.
pub const MAX_MSG: usize = 64 * 1024;
/// Largest eviction batch (pages) in one `Evict`.
pub const MAX_BATCH: usize = 1024;
/// `Evict` entry slot meaning "drop only, do not copy".
pub const NO_COPY: u32 = u32::MAX;

const K_REGISTER: u16 = 1;
const K_WELCOME: u16 = 2;
const K_REFUSED: u16 = 3;
const K_EVICT: u16 = 4;
const K_EVICTED: u16 = 5;
const K_FATAL: u16 = 6;
const K_STATS_REQUEST: u16 = 7;
const K_STATS: u16 = 8;
const K_HOLD: u16 = 9;
const K_HELD: u16 = 10;
const K_SNAPSHOT: u16 = 11;
const K_SNAPSHOTTED: u16 = 12;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message too short ({0} bytes)")]
    Short(usize),
    #[error("bad magic {0:#x}: not a dmem client")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this pager speaks {VERSION})")]
    Version(u16),
    #[error("unknown message kind {0}")]
    UnknownKind(u16),
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub pid: u32,
    /// Thread id of the agent: its faults are never waited on.
    pub agent_tid: u32,
    pub arena_base: u64,
    pub arena_len: u64,
    /// Requested local limit in bytes; 0 = the pager's default.
    pub local_limit: u64,
    /// A forked child taking its inherited arena under a session of its
    /// own names its parent's session here (0: not a forked child). Pages
    /// present in the arena are then the child's data, not zeros; the
    /// pager finds them in the child's page tables and shares the parent's
    /// remote copies of those that were clean at the fork.
    pub forked_from: u64,
    /// The key of the fork snapshot the parent's `Held` named (0: none):
    /// the child takes the pages that were out of its parent at the fork
    /// from it. Secret to the parent and its child, so that no other
    /// process can take those pages.
    pub fork_snapshot: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session: u64,
    /// Bytes of the staging memfd sent with this message.
    pub staging_len: u64,
    pub local_limit: u64,
    pub block: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvictEntry {
    pub addr: u64,
    /// Staging slot to copy the page into, or `NO_COPY`.
    pub slot: u32,
    /// The page is write-protected (its content frozen): the agent may
    /// copy it and drop it when it cannot move it. An entry that is not
    /// frozen may be taken out only by `UFFDIO_MOVE`, which takes the page
    /// and every write before it at once; one that cannot be moved is
    /// left alone and reported `Kept`.
    pub frozen: bool,
}

/// Bytes of one `Evict` entry on the wire.
const ENTRY_LEN: usize = 13;

/// Per-entry result of an eviction, in the agent's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictStatus {
    /// Copied (if asked) and dropped.
    Done = 0,
    /// The page was unmapped: nothing copied.
    Unmapped = 1,
    /// Copied (if asked) and taken out with UFFDIO_MOVE: unlike a
    /// MADV_DONTNEED, that raised no REMOVE event.
    Moved = 2,
    /// Not frozen and could not be moved: left untouched (no copy).
    Kept = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Register(Register),
    Welcome(Welcome),
    Refused(String),
    Evict {
        batch: u64,
        entries: Vec<EvictEntry>,
    },
    Evicted {
        batch: u64,
        status: Vec<EvictStatus>,
    },
    Fatal(String),
    StatsRequest,
    Stats(String),
    /// First message of a second connection from an app about to fork:
    /// stop evicting its pages until this connection closes.
    Hold {
        session: u64,
    },
    /// Evictions of the session are stopped; `pages_out` of its pages are
    /// not in the app (cached or remote). The app either brings them back
    /// before it forks or asks for a `Snapshot`.
    Held {
        pages_out: u64,
    },
    /// On a hold connection, once the app has stopped changing its managed
    /// memory (its arena lock is held until after the fork): keep what a
    /// forked child needs of the pages out of the app (see `forksnap`).
    Snapshot,
    /// The fork snapshot is taken; the child names `key` when it registers.
    Snapshotted {
        key: u64,
    },
}

fn put_header(out: &mut Vec<u8>, kind: u16) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
}

pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut o = Vec::with_capacity(64);
    match msg {
        Msg::Register(r) => {
            put_header(&mut o, K_REGISTER);
            o.extend_from_slice(&r.pid.to_le_bytes());
            o.extend_from_slice(&r.agent_tid.to_le_bytes());
            o.extend_from_slice(&r.arena_base.to_le_bytes());
            o.extend_from_slice(&r.arena_len.to_le_bytes());
            o.extend_from_slice(&r.local_limit.to_le_bytes());
            o.extend_from_slice(&r.forked_from.to_le_bytes());
            o.extend_from_slice(&r.fork_snapshot.to_le_bytes());
        }
        Msg::Welcome(w) => {
            put_header(&mut o, K_WELCOME);
            o.extend_from_slice(&w.session.to_le_bytes());
            o.extend_from_slice(&w.staging_len.to_le_bytes());
            o.extend_from_slice(&w.local_limit.to_le_bytes());
            o.extend_from_slice(&w.block.to_le_bytes());
        }
        Msg::Refused(s) => {
            put_header(&mut o, K_REFUSED);
            o.extend_from_slice(s.as_bytes());
        }
        Msg::Evict { batch, entries } => {
            put_header(&mut o, K_EVICT);
            o.extend_from_slice(&batch.to_le_bytes());
            for e in entries {
                o.extend_from_slice(&e.addr.to_le_bytes());
                o.extend_from_slice(&e.slot.to_le_bytes());
                o.push(u8::from(e.frozen));
            }
        }
        Msg::Evicted { batch, status } => {
            put_header(&mut o, K_EVICTED);
            o.extend_from_slice(&batch.to_le_bytes());
            o.extend(status.iter().map(|s| *s as u8));
        }
        Msg::Fatal(s) => {
            put_header(&mut o, K_FATAL);
            o.extend_from_slice(s.as_bytes());
        }
        Msg::StatsRequest => put_header(&mut o, K_STATS_REQUEST),
        Msg::Stats(s) => {
            put_header(&mut o, K_STATS);
            o.extend_from_slice(s.as_bytes());
        }
        Msg::Hold { session } => {
            put_header(&mut o, K_HOLD);
            o.extend_from_slice(&session.to_le_bytes());
        }
        Msg::Held { pages_out } => {
            put_header(&mut o, K_HELD);
            o.extend_from_slice(&pages_out.to_le_bytes());
        }
        Msg::Snapshot => put_header(&mut o, K_SNAPSHOT),
        Msg::Snapshotted { key } => {
            put_header(&mut o, K_SNAPSHOTTED);
            o.extend_from_slice(&key.to_le_bytes());
        }
    }
    o
}

struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        if self.b.len() < N {
            return Err(WireError::Malformed(self.what));
        }
        let (h, t) = self.b.split_at(N);
        self.b = t;
        Ok(h.try_into().expect("split at N"))
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    /// A body of exactly one u64.
    fn only_u64(mut self) -> Result<u64, WireError> {
        let v = self.u64()?;
        self.end()?;
        Ok(v)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed(self.what))
        }
    }
    fn text(&mut self) -> Result<String, WireError> {
        let s = std::str::from_utf8(self.b).map_err(|_| WireError::Malformed(self.what))?;
        self.b = &[];
        Ok(s.to_owned())
    }
}

pub fn decode(b: &[u8]) -> Result<Msg, WireError> {
    if b.len() < 8 {
        return Err(WireError::Short(b.len()));
    }
    let magic = u32::from_le_bytes(b[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let kind = u16::from_le_bytes([b[6], b[7]]);
    let body = &b[8..];
    let msg = match kind {
        K_REGISTER => {
            let mut r = Reader {
                b: body,
                what: "register",
            };
            let m = Register {
                pid: r.u32()?,
                agent_tid: r.u32()?,
                arena_base: r.u64()?,
                arena_len: r.u64()?,
                local_limit: r.u64()?,
                forked_from: r.u64()?,
                fork_snapshot: r.u64()?,
            };
            r.end()?;
            Msg::Register(m)
        }
        K_WELCOME => {
            let mut r = Reader {
                b: body,
                what: "welcome",
            };
            let m = Welcome {
                session: r.u64()?,
                staging_len: r.u64()?,
                local_limit: r.u64()?,
                block: r.u32()?,
            };
            r.end()?;
            Msg::Welcome(m)
        }
        K_REFUSED => Msg::Refused(
            Reader {
                b: body,
                what: "refused",
            }
            .text()?,
        ),
        K_EVICT => {
            let mut r = Reader {
                b: body,
                what: "evict",
            };
            let batch = r.u64()?;
            if !r.b.len().is_multiple_of(ENTRY_LEN) || r.b.len() / ENTRY_LEN > MAX_BATCH {
                return Err(WireError::Malformed("evict"));
            }
            let mut entries = Vec::with_capacity(r.b.len() / ENTRY_LEN);
            while !r.b.is_empty() {
                entries.push(EvictEntry {
                    addr: r.u64()?,
                    slot: r.u32()?,
                    frozen: match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(WireError::Malformed("evict")),
                    },
                });
            }
            Msg::Evict { batch, entries }
        }
        K_EVICTED => {
            let mut r = Reader {
                b: body,
                what: "evicted",
            };
            let batch = r.u64()?;
            let status =
                r.b.iter()
                    .map(|s| match s {
                        0 => Ok(EvictStatus::Done),
                        1 => Ok(EvictStatus::Unmapped),
                        2 => Ok(EvictStatus::Moved),
                        3 => Ok(EvictStatus::Kept),
                        _ => Err(WireError::Malformed("evicted")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
            Msg::Evicted { batch, status }
        }
        K_FATAL => Msg::Fatal(
            Reader {
                b: body,
                what: "fatal",
            }
            .text()?,
        ),
        K_STATS_REQUEST => {
            Reader {
                b: body,
                what: "stats request",
            }
            .end()?;
            Msg::StatsRequest
        }
        K_STATS => Msg::Stats(
            Reader {
                b: body,
                what: "stats",
            }
            .text()?,
        ),
        K_HOLD => Msg::Hold {
            session: Reader {
                b: body,
                what: "hold",
            }
            .only_u64()?,
        },
        K_HELD => Msg::Held {
            pages_out: Reader {
                b: body,
                what: "held",
            }
            .only_u64()?,
        },
        K_SNAPSHOT => {
            Reader {
                b: body,
                what: "snapshot",
            }
            .end()?;
            Msg::Snapshot
        }
        K_SNAPSHOTTED => Msg::Snapshotted {
            key: Reader {
                b: body,
                what: "snapshotted",
            }
            .only_u64()?,
        },
        k => return Err(WireError::UnknownKind(k)),
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Msg> {
        vec![
            Msg::Register(Register {
                pid: 7,
                agent_tid: 8,
                arena_base: 0x7000_0000,
                arena_len: 1 << 30,
                local_limit: 0,
                forked_from: 0,
                fork_snapshot: 0,
            }),
            Msg::Register(Register {
                pid: 9,
                agent_tid: 10,
                arena_base: 0x7000_0000,
                arena_len: 1 << 30,
                local_limit: 1 << 28,
                forked_from: 3,
                fork_snapshot: 0x1234_5678_9abc_def0,
            }),
            Msg::Welcome(Welcome {
                session: 3,
                staging_len: 4 << 20,
                local_limit: 1 << 28,
                block: 4096,
            }),
            Msg::Refused("no".into()),
            Msg::Evict {
                batch: 9,
                entries: vec![
                    EvictEntry {
                        addr: 4096,
                        slot: 0,
                        frozen: true,
                    },
                    EvictEntry {
                        addr: 8192,
                        slot: NO_COPY,
                        frozen: false,
                    },
                ],
            },
            Msg::Evicted {
                batch: 9,
                status: vec![
                    EvictStatus::Done,
                    EvictStatus::Unmapped,
                    EvictStatus::Moved,
                    EvictStatus::Kept,
                ],
            },
            Msg::Fatal("gone".into()),
            Msg::StatsRequest,
            Msg::Stats("{}".into()),
            Msg::Hold { session: 5 },
            Msg::Held { pages_out: 77 },
            Msg::Snapshot,
            Msg::Snapshotted { key: 99 },
        ]
    }

    #[test]
    fn round_trips() {
        for m in all() {
            assert_eq!(decode(&encode(&m)).unwrap(), m);
        }
    }

    #[test]
    fn truncations_and_garbage_are_errors() {
        for m in all() {
            let b = encode(&m);
            for n in 0..b.len() {
                let r = decode(&b[..n]);
                // Text messages accept any prefix of their text; nothing panics.
                if n < 8 {
                    assert!(r.is_err());
                }
            }
        }
        let mut b = encode(&Msg::StatsRequest);
        b[0] ^= 1;
        assert!(matches!(decode(&b), Err(WireError::BadMagic(_))));
        let mut b = encode(&Msg::StatsRequest);
        b[6] = 99;
        assert_eq!(decode(&b), Err(WireError::UnknownKind(99)));
        let mut b = encode(&Msg::Register(Register {
            pid: 1,
            agent_tid: 1,
            arena_base: 0,
            arena_len: 0,
            local_limit: 0,
            forked_from: 0,
            fork_snapshot: 0,
        }));
        b.push(0);
        assert_eq!(decode(&b), Err(WireError::Malformed("register")));
        let mut b = encode(&Msg::Snapshot);
        b.push(0);
        assert_eq!(decode(&b), Err(WireError::Malformed("snapshot")));
    }
}
