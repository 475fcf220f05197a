//! The dmem wire protocol: the one definition used by the memory node, the
//! pager's TCP transport and `dmem ping`. `docs/protocol.md` describes it for
//! humans; this module is the authority.
//!
//! Every message is a frame: a fixed 16-byte little-endian header followed by
//! `len` payload bytes. Replies carry the request's `req_id`, so a client may
//! keep many requests in flight on one connection (pipelining). The data path
//! is "read/write bytes at (slab, offset)", the shape of one-sided RDMA, with
//! many extents per frame (batching).
//!
//! Decoding never trusts a length: the header's `len` is checked against
//! [`MAX_PAYLOAD`] before anything is allocated, and every field is bounds
//! checked against the payload actually received.

use thiserror::Error;

/// First two bytes of every frame; catches peers speaking something else.
pub const MAGIC: u16 = 0xD3E0;
/// Size of the fixed frame header.
pub const HEADER_LEN: usize = 16;
/// Protocol versions this build speaks (negotiated in HELLO).
pub const VERSION_MIN: u16 = 1;
pub const VERSION_MAX: u16 = 1;
/// Largest number of extents in one READ or WRITE.
pub const MAX_EXTENTS: usize = 4096;
/// Largest number of data bytes moved by one READ or WRITE.
pub const MAX_IO_BYTES: usize = 8 << 20;
/// Size of one extent descriptor on the wire.
pub const EXTENT_LEN: usize = 16;
/// Largest payload any frame may carry; checked before allocation.
pub const MAX_PAYLOAD: usize = 4 + MAX_EXTENTS * EXTENT_LEN + MAX_IO_BYTES;
/// Largest slab a session may lease.
pub const MAX_SLAB_BYTES: u64 = 1 << 30;
/// Length of nonces, MACs and resume secrets.
pub const SECRET_LEN: usize = 32;
/// Largest error message carried in an ERROR frame.
pub const MAX_ERROR_MSG: usize = 1024;
/// Replies set this bit on the request's opcode.
pub const REPLY_BIT: u8 = 0x80;

pub type Secret = [u8; SECRET_LEN];

/// Errors found while decoding or validating frames.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("bad magic {0:#06x}: peer does not speak the dmem protocol")]
    BadMagic(u16),
    #[error("reserved header flags set ({0:#04x})")]
    BadFlags(u8),
    #[error("frame payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("unknown opcode {0:#04x}")]
    UnknownOp(u8),
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{what} carries {extra} unexpected trailing bytes")]
    Trailing { what: &'static str, extra: usize },
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Request opcodes.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Hello = 0x01,
    Auth = 0x02,
    CloseSession = 0x03,
    Alloc = 0x10,
    Free = 0x11,
    Read = 0x20,
    Write = 0x21,
    Stat = 0x30,
    Ping = 0x31,
    RdmaConnect = 0x40,
    RdmaSlab = 0x41,
}

impl Op {
    pub const ALL: [Op; 11] = [
        Op::Hello,
        Op::Auth,
        Op::CloseSession,
        Op::Alloc,
        Op::Free,
        Op::Read,
        Op::Write,
        Op::Stat,
        Op::Ping,
        Op::RdmaConnect,
        Op::RdmaSlab,
    ];

    pub fn from_u8(v: u8) -> Option<Op> {
        Op::ALL.iter().copied().find(|op| *op as u8 == v)
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Hello => "hello",
            Op::Auth => "auth",
            Op::CloseSession => "close_session",
            Op::Alloc => "alloc",
            Op::Free => "free",
            Op::Read => "read",
            Op::Write => "write",
            Op::Stat => "stat",
            Op::Ping => "ping",
            Op::RdmaConnect => "rdma_connect",
            Op::RdmaSlab => "rdma_slab",
        }
    }
}

/// Opcode of an ERROR reply (not a request opcode).
pub const OP_ERROR: u8 = 0xFF;

/// Error codes carried in ERROR replies. Stable on the wire.
#[repr(u16)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadFrame = 1,
    UnknownOp = 2,
    TooLarge = 3,
    NotAuthenticated = 4,
    AuthFailed = 5,
    VersionMismatch = 6,
    Full = 7,
    NoSuchSlab = 8,
    OutOfBounds = 9,
    SlabExists = 10,
    SlabTooLarge = 11,
    UnknownSession = 12,
    NotLoopback = 13,
    Busy = 14,
    Internal = 15,
    /// The node offers no RDMA (built without it, no device, or turned
    /// off): the client uses TCP.
    NoRdma = 16,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownOp,
        ErrorCode::TooLarge,
        ErrorCode::NotAuthenticated,
        ErrorCode::AuthFailed,
        ErrorCode::VersionMismatch,
        ErrorCode::Full,
        ErrorCode::NoSuchSlab,
        ErrorCode::OutOfBounds,
        ErrorCode::SlabExists,
        ErrorCode::SlabTooLarge,
        ErrorCode::UnknownSession,
        ErrorCode::NotLoopback,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::NoRdma,
    ];

    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u16 == v)
    }

    /// Short label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::VersionMismatch => "version_mismatch",
            ErrorCode::Full => "full",
            ErrorCode::NoSuchSlab => "no_such_slab",
            ErrorCode::OutOfBounds => "out_of_bounds",
            ErrorCode::SlabExists => "slab_exists",
            ErrorCode::SlabTooLarge => "slab_too_large",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::NotLoopback => "not_loopback",
            ErrorCode::Busy => "busy",
            ErrorCode::Internal => "internal",
            ErrorCode::NoRdma => "no_rdma",
        }
    }

    /// Whether the server drops the connection after sending this error.
    /// Protocol violations end the connection; refusals of a well-formed
    /// request (full, no such slab, out of bounds) do not.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame
                | ErrorCode::UnknownOp
                | ErrorCode::TooLarge
                | ErrorCode::NotAuthenticated
                | ErrorCode::AuthFailed
                | ErrorCode::VersionMismatch
                | ErrorCode::UnknownSession
                | ErrorCode::NotLoopback
                | ErrorCode::Busy
                | ErrorCode::Internal
        )
    }
}

impl From<&ProtoError> for ErrorCode {
    fn from(e: &ProtoError) -> Self {
        match e {
            ProtoError::TooLarge { .. } => ErrorCode::TooLarge,
            ProtoError::UnknownOp(_) => ErrorCode::UnknownOp,
            _ => ErrorCode::BadFrame,
        }
    }
}

/// The fixed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub op: u8,
    pub len: u32,
    pub req_id: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = self.op;
        b[3] = 0;
        b[4..8].copy_from_slice(&self.len.to_le_bytes());
        b[8..16].copy_from_slice(&self.req_id.to_le_bytes());
        b
    }

    /// Decodes and validates a header; `len` is checked against
    /// [`MAX_PAYLOAD`] here so callers may allocate `len` bytes safely.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtoError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        if b[3] != 0 {
            return Err(ProtoError::BadFlags(b[3]));
        }
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        if len as usize > MAX_PAYLOAD {
            return Err(ProtoError::TooLarge {
                len: len as usize,
                max: MAX_PAYLOAD,
            });
        }
        let req_id = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        Ok(Header {
            op: b[2],
            len,
            req_id,
        })
    }
}

/// One contiguous byte range inside a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub slab: u32,
    pub len: u32,
    pub offset: u64,
}

impl Extent {
    pub fn new(slab: u32, offset: u64, len: u32) -> Extent {
        Extent { slab, len, offset }
    }
}

/// What a peer needs to connect an RDMA reliable-connection queue pair
/// to ours: exchanged over the TCP control connection (RDMA_CONNECT and
/// its reply), so no connection manager is needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdmaEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number.
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Port GID at the configured index (RoCE; zeros on InfiniBand).
    pub gid: [u8; 16],
    /// Active path MTU, as the verbs enum (1 = 256 .. 5 = 4096).
    pub mtu: u8,
}

/// Where a slab is for one-sided RDMA: its memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdmaRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

const ENDPOINT_LEN: usize = 27;

/// A decoded request. WRITE data borrows from the frame buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Hello {
        min_version: u16,
        max_version: u16,
        client_nonce: Secret,
    },
    Auth {
        mac: Secret,
        resume: Option<(u64, Secret)>,
    },
    CloseSession,
    Alloc {
        slab: u32,
        size: u64,
    },
    Free {
        slab: u32,
    },
    Read {
        extents: Vec<Extent>,
    },
    Write {
        extents: Vec<Extent>,
        data: &'a [u8],
    },
    Stat,
    Ping {
        payload: &'a [u8],
    },
    /// Connect a queue pair to the client's (which it describes).
    RdmaConnect(RdmaEndpoint),
    /// Register slab `slab` for RDMA and say where it is.
    RdmaSlab {
        slab: u32,
    },
}

impl Request<'_> {
    pub fn op(&self) -> Op {
        match self {
            Request::Hello { .. } => Op::Hello,
            Request::Auth { .. } => Op::Auth,
            Request::CloseSession => Op::CloseSession,
            Request::Alloc { .. } => Op::Alloc,
            Request::Free { .. } => Op::Free,
            Request::Read { .. } => Op::Read,
            Request::Write { .. } => Op::Write,
            Request::Stat => Op::Stat,
            Request::Ping { .. } => Op::Ping,
            Request::RdmaConnect(_) => Op::RdmaConnect,
            Request::RdmaSlab { .. } => Op::RdmaSlab,
        }
    }
}

/// Figures returned by a successful AUTH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub session_id: u64,
    pub resume_secret: Secret,
    pub server_mac: Secret,
    pub resumed: bool,
    pub capacity: u64,
    pub used: u64,
}

/// Figures returned by STAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatReply {
    pub capacity: u64,
    pub used: u64,
    pub session_slabs: u32,
    pub session_bytes: u64,
}

/// A decoded reply. READ data and PING echoes borrow from the frame buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply<'a> {
    Challenge {
        version: u16,
        auth_required: bool,
        server_nonce: Secret,
    },
    Welcome(Welcome),
    Done(Op),
    Data(&'a [u8]),
    Stat(StatReply),
    Pong(&'a [u8]),
    /// The node's queue pair, connected to the client's and ready.
    RdmaAccept(RdmaEndpoint),
    RdmaSlab(RdmaRegion),
    Error {
        code: u16,
        message: String,
    },
}

/// Little-endian cursor over a payload; every read is bounds checked.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(ProtoError::Truncated {
                what: self.what,
                need: self.pos + n,
                have: self.buf.len(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn secret(&mut self) -> Result<Secret, ProtoError> {
        Ok(self.take(SECRET_LEN)?.try_into().expect("secret length"))
    }

    fn bool(&mut self) -> Result<bool, ProtoError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ProtoError::Invalid("boolean flag")),
        }
    }

    fn endpoint(&mut self) -> Result<RdmaEndpoint, ProtoError> {
        let e = RdmaEndpoint {
            qpn: self.u32()?,
            psn: self.u32()?,
            lid: self.u16()?,
            gid: self.take(16)?.try_into().expect("16 bytes"),
            mtu: self.u8()?,
        };
        if !(1..=5).contains(&e.mtu) {
            return Err(ProtoError::Invalid("RDMA path MTU"));
        }
        Ok(e)
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }

    fn finish(&self) -> Result<(), ProtoError> {
        let extra = self.buf.len() - self.pos;
        if extra != 0 {
            return Err(ProtoError::Trailing {
                what: self.what,
                extra,
            });
        }
        Ok(())
    }
}

/// Decodes the extent list of READ/WRITE and returns it with the total byte
/// count. Rejects empty lists, zero-length extents and anything over limits.
fn decode_extents(c: &mut Cursor<'_>) -> Result<(Vec<Extent>, usize), ProtoError> {
    let count = c.u32()? as usize;
    if count == 0 {
        return Err(ProtoError::Invalid("empty extent list"));
    }
    if count > MAX_EXTENTS {
        return Err(ProtoError::TooLarge {
            len: count,
            max: MAX_EXTENTS,
        });
    }
    // Check the descriptors are all there before allocating for them.
    let raw = c.take(count * EXTENT_LEN)?;
    let mut extents = Vec::with_capacity(count);
    let mut total = 0usize;
    for d in raw.chunks_exact(EXTENT_LEN) {
        let slab = u32::from_le_bytes(d[0..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(d[4..8].try_into().expect("4 bytes"));
        let offset = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
        if len == 0 {
            return Err(ProtoError::Invalid("zero-length extent"));
        }
        total += len as usize;
        if total > MAX_IO_BYTES {
            return Err(ProtoError::TooLarge {
                len: total,
                max: MAX_IO_BYTES,
            });
        }
        extents.push(Extent { slab, len, offset });
    }
    Ok((extents, total))
}

/// Decodes a request payload for the opcode in its header.
pub fn decode_request(op: u8, payload: &[u8]) -> Result<Request<'_>, ProtoError> {
    let op = Op::from_u8(op).ok_or(ProtoError::UnknownOp(op))?;
    let mut c = Cursor::new(payload, op.name());
    let req = match op {
        Op::Hello => {
            let min_version = c.u16()?;
            let max_version = c.u16()?;
            if min_version > max_version {
                return Err(ProtoError::Invalid("version range"));
            }
            Request::Hello {
                min_version,
                max_version,
                client_nonce: c.secret()?,
            }
        }
        Op::Auth => {
            let mac = c.secret()?;
            let resume = if c.bool()? {
                Some((c.u64()?, c.secret()?))
            } else {
                None
            };
            Request::Auth { mac, resume }
        }
        Op::CloseSession => Request::CloseSession,
        Op::Alloc => Request::Alloc {
            slab: c.u32()?,
            size: c.u64()?,
        },
        Op::Free => Request::Free { slab: c.u32()? },
        Op::Read => Request::Read {
            extents: decode_extents(&mut c)?.0,
        },
        Op::Write => {
            let (extents, total) = decode_extents(&mut c)?;
            Request::Write {
                extents,
                data: c.take(total)?,
            }
        }
        Op::Stat => Request::Stat,
        Op::Ping => Request::Ping { payload: c.rest() },
        Op::RdmaConnect => Request::RdmaConnect(c.endpoint()?),
        Op::RdmaSlab => Request::RdmaSlab { slab: c.u32()? },
    };
    c.finish()?;
    Ok(req)
}

fn push_endpoint(out: &mut Vec<u8>, e: &RdmaEndpoint) {
    let at = out.len();
    out.extend_from_slice(&e.qpn.to_le_bytes());
    out.extend_from_slice(&e.psn.to_le_bytes());
    out.extend_from_slice(&e.lid.to_le_bytes());
    out.extend_from_slice(&e.gid);
    out.push(e.mtu);
    debug_assert_eq!(out.len() - at, ENDPOINT_LEN);
}

fn push_extents(out: &mut Vec<u8>, extents: &[Extent]) {
    out.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for e in extents {
        out.extend_from_slice(&e.slab.to_le_bytes());
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
    }
}

/// Starts a frame in `out`; returns the position of its header so the length
/// can be patched by [`end_frame`] once the payload is appended.
pub fn begin_frame(out: &mut Vec<u8>, op: u8, req_id: u64) -> usize {
    let at = out.len();
    out.extend_from_slice(&Header { op, len: 0, req_id }.encode());
    at
}

/// Patches the payload length of the frame started at `at`.
pub fn end_frame(out: &mut [u8], at: usize) {
    let len = (out.len() - at - HEADER_LEN) as u32;
    out[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
}

/// Appends an encoded request frame to `out`.
pub fn encode_request(out: &mut Vec<u8>, req_id: u64, req: &Request<'_>) {
    let at = begin_frame(out, req.op() as u8, req_id);
    match req {
        Request::Hello {
            min_version,
            max_version,
            client_nonce,
        } => {
            out.extend_from_slice(&min_version.to_le_bytes());
            out.extend_from_slice(&max_version.to_le_bytes());
            out.extend_from_slice(client_nonce);
        }
        Request::Auth { mac, resume } => {
            out.extend_from_slice(mac);
            match resume {
                Some((id, secret)) => {
                    out.push(1);
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(secret);
                }
                None => out.push(0),
            }
        }
        Request::CloseSession | Request::Stat => {}
        Request::Alloc { slab, size } => {
            out.extend_from_slice(&slab.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
        Request::Free { slab } => out.extend_from_slice(&slab.to_le_bytes()),
        Request::Read { extents } => push_extents(out, extents),
        Request::Write { extents, data } => {
            push_extents(out, extents);
            out.extend_from_slice(data);
        }
        Request::Ping { payload } => out.extend_from_slice(payload),
        Request::RdmaConnect(e) => push_endpoint(out, e),
        Request::RdmaSlab { slab } => out.extend_from_slice(&slab.to_le_bytes()),
    }
    end_frame(out, at);
}

/// Appends an encoded reply frame to `out`. For `Reply::Data` the data is
/// copied; servers that fill data in place use [`begin_frame`] directly.
pub fn encode_reply(out: &mut Vec<u8>, req_id: u64, reply: &Reply<'_>) {
    let op = match reply {
        Reply::Challenge { .. } => Op::Hello as u8 | REPLY_BIT,
        Reply::Welcome(_) => Op::Auth as u8 | REPLY_BIT,
        Reply::Done(op) => *op as u8 | REPLY_BIT,
        Reply::Data(_) => Op::Read as u8 | REPLY_BIT,
        Reply::Stat(_) => Op::Stat as u8 | REPLY_BIT,
        Reply::Pong(_) => Op::Ping as u8 | REPLY_BIT,
        Reply::RdmaAccept(_) => Op::RdmaConnect as u8 | REPLY_BIT,
        Reply::RdmaSlab(_) => Op::RdmaSlab as u8 | REPLY_BIT,
        Reply::Error { .. } => OP_ERROR,
    };
    let at = begin_frame(out, op, req_id);
    match reply {
        Reply::Challenge {
            version,
            auth_required,
            server_nonce,
        } => {
            out.extend_from_slice(&version.to_le_bytes());
            out.push(*auth_required as u8);
            out.extend_from_slice(server_nonce);
        }
        Reply::Welcome(w) => {
            out.extend_from_slice(&w.session_id.to_le_bytes());
            out.extend_from_slice(&w.resume_secret);
            out.extend_from_slice(&w.server_mac);
            out.push(w.resumed as u8);
            out.extend_from_slice(&w.capacity.to_le_bytes());
            out.extend_from_slice(&w.used.to_le_bytes());
        }
        Reply::Done(_) => {}
        Reply::Data(d) | Reply::Pong(d) => out.extend_from_slice(d),
        Reply::Stat(s) => {
            out.extend_from_slice(&s.capacity.to_le_bytes());
            out.extend_from_slice(&s.used.to_le_bytes());
            out.extend_from_slice(&s.session_slabs.to_le_bytes());
            out.extend_from_slice(&s.session_bytes.to_le_bytes());
        }
        Reply::RdmaAccept(e) => push_endpoint(out, e),
        Reply::RdmaSlab(r) => {
            out.extend_from_slice(&r.addr.to_le_bytes());
            out.extend_from_slice(&r.rkey.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
        }
        Reply::Error { code, message } => {
            let msg = truncate_utf8(message, MAX_ERROR_MSG);
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&(msg.len() as u16).to_le_bytes());
            out.extend_from_slice(msg.as_bytes());
        }
    }
    end_frame(out, at);
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Decodes a reply payload. `op` is the header opcode.
pub fn decode_reply(op: u8, payload: &[u8]) -> Result<Reply<'_>, ProtoError> {
    if op == OP_ERROR {
        let mut c = Cursor::new(payload, "error");
        let code = c.u16()?;
        let len = c.u16()? as usize;
        let message = String::from_utf8_lossy(c.take(len)?).into_owned();
        c.finish()?;
        return Ok(Reply::Error { code, message });
    }
    if op & REPLY_BIT == 0 {
        return Err(ProtoError::Invalid("reply opcode without the reply bit"));
    }
    let req_op = Op::from_u8(op & !REPLY_BIT).ok_or(ProtoError::UnknownOp(op))?;
    let mut c = Cursor::new(payload, req_op.name());
    let reply = match req_op {
        Op::Hello => Reply::Challenge {
            version: c.u16()?,
            auth_required: c.bool()?,
            server_nonce: c.secret()?,
        },
        Op::Auth => Reply::Welcome(Welcome {
            session_id: c.u64()?,
            resume_secret: c.secret()?,
            server_mac: c.secret()?,
            resumed: c.bool()?,
            capacity: c.u64()?,
            used: c.u64()?,
        }),
        Op::Read => Reply::Data(c.rest()),
        Op::Ping => Reply::Pong(c.rest()),
        Op::Stat => Reply::Stat(StatReply {
            capacity: c.u64()?,
            used: c.u64()?,
            session_slabs: c.u32()?,
            session_bytes: c.u64()?,
        }),
        Op::RdmaConnect => Reply::RdmaAccept(c.endpoint()?),
        Op::RdmaSlab => Reply::RdmaSlab(RdmaRegion {
            addr: c.u64()?,
            rkey: c.u32()?,
            len: c.u64()?,
        }),
        Op::CloseSession | Op::Alloc | Op::Free | Op::Write => Reply::Done(req_op),
    };
    c.finish()?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip_request(req: &Request<'_>) {
        let mut buf = Vec::new();
        encode_request(&mut buf, 42, req);
        let hdr = Header::decode(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(hdr.req_id, 42);
        assert_eq!(hdr.len as usize, buf.len() - HEADER_LEN);
        let back = decode_request(hdr.op, &buf[HEADER_LEN..]).unwrap();
        assert_eq!(&back, req);
    }

    fn roundtrip_reply(reply: &Reply<'_>) {
        let mut buf = Vec::new();
        encode_reply(&mut buf, 7, reply);
        let hdr = Header::decode(buf[..HEADER_LEN].try_into().unwrap()).unwrap();
        let back = decode_reply(hdr.op, &buf[HEADER_LEN..]).unwrap();
        assert_eq!(&back, reply);
    }

    fn arb_extent() -> impl Strategy<Value = Extent> {
        (any::<u32>(), any::<u64>(), 1u32..=8192).prop_map(|(s, o, l)| Extent::new(s, o, l))
    }

    proptest! {
        #[test]
        fn read_roundtrip(extents in prop::collection::vec(arb_extent(), 1..64)) {
            roundtrip_request(&Request::Read { extents });
        }

        #[test]
        fn write_roundtrip(extents in prop::collection::vec(arb_extent(), 1..16), seed in any::<u8>()) {
            let total: usize = extents.iter().map(|e| e.len as usize).sum();
            let data: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
            roundtrip_request(&Request::Write { extents, data: &data });
        }

        #[test]
        fn control_roundtrip(slab in any::<u32>(), size in any::<u64>(), id in any::<u64>(),
                             a in any::<[u8; 32]>(), b in any::<[u8; 32]>(), lo in 0u16..10, span in 0u16..10) {
            roundtrip_request(&Request::Alloc { slab, size });
            roundtrip_request(&Request::Free { slab });
            roundtrip_request(&Request::Hello { min_version: lo, max_version: lo + span, client_nonce: a });
            roundtrip_request(&Request::Auth { mac: a, resume: None });
            roundtrip_request(&Request::Auth { mac: a, resume: Some((id, b)) });
            roundtrip_request(&Request::Stat);
            roundtrip_request(&Request::CloseSession);
            roundtrip_request(&Request::RdmaSlab { slab });
        }

        #[test]
        fn rdma_roundtrip(qpn in any::<u32>(), psn in any::<u32>(), lid in any::<u16>(),
                          gid in any::<[u8; 16]>(), mtu in 1u8..=5, addr in any::<u64>(), len in any::<u64>()) {
            let e = RdmaEndpoint { qpn, psn, lid, gid, mtu };
            roundtrip_request(&Request::RdmaConnect(e));
            roundtrip_reply(&Reply::RdmaAccept(e));
            roundtrip_reply(&Reply::RdmaSlab(RdmaRegion { addr, rkey: qpn, len }));
        }

        #[test]
        fn reply_roundtrip(data in prop::collection::vec(any::<u8>(), 0..4096), id in any::<u64>(),
                           s in any::<[u8; 32]>(), n in any::<u64>(), code in any::<u16>(), msg in ".{0,64}") {
            roundtrip_reply(&Reply::Data(&data));
            roundtrip_reply(&Reply::Pong(&data));
            roundtrip_reply(&Reply::Challenge { version: 1, auth_required: true, server_nonce: s });
            roundtrip_reply(&Reply::Welcome(Welcome { session_id: id, resume_secret: s, server_mac: s,
                resumed: true, capacity: n, used: n / 2 }));
            roundtrip_reply(&Reply::Stat(StatReply { capacity: n, used: id, session_slabs: 3, session_bytes: n }));
            roundtrip_reply(&Reply::Error { code, message: msg });
            for op in [Op::Alloc, Op::Free, Op::Write, Op::CloseSession] {
                roundtrip_reply(&Reply::Done(op));
            }
        }

        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn garbage_never_panics(op in any::<u8>(), payload in prop::collection::vec(any::<u8>(), 0..512),
                                hdr in any::<[u8; 16]>()) {
            let _ = decode_request(op, &payload);
            let _ = decode_reply(op, &payload);
            let _ = Header::decode(&hdr);
        }

        /// Every strict prefix of a valid request is rejected, never misread.
        #[test]
        fn truncation_is_detected(extents in prop::collection::vec(arb_extent(), 1..8)) {
            let total: usize = extents.iter().map(|e| e.len as usize).sum();
            let data = vec![0xA5u8; total];
            let mut buf = Vec::new();
            encode_request(&mut buf, 1, &Request::Write { extents, data: &data });
            let payload = &buf[HEADER_LEN..];
            for cut in [0, 1, 4, payload.len() / 2, payload.len() - 1] {
                prop_assert!(decode_request(Op::Write as u8, &payload[..cut]).is_err());
            }
        }
    }

    #[test]
    fn rdma_connect_rejects_a_bad_mtu() {
        let e = RdmaEndpoint {
            mtu: 5,
            ..RdmaEndpoint::default()
        };
        let mut buf = Vec::new();
        encode_request(&mut buf, 1, &Request::RdmaConnect(e));
        let last = buf.len() - 1;
        buf[last] = 9;
        assert_eq!(
            decode_request(Op::RdmaConnect as u8, &buf[HEADER_LEN..]),
            Err(ProtoError::Invalid("RDMA path MTU"))
        );
    }

    #[test]
    fn header_rejects_oversize_before_allocation() {
        let mut b = Header {
            op: Op::Read as u8,
            len: 0,
            req_id: 1,
        }
        .encode();
        b[4..8].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert!(matches!(
            Header::decode(&b),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn header_rejects_bad_magic_and_flags() {
        let mut b = Header {
            op: 1,
            len: 0,
            req_id: 1,
        }
        .encode();
        b[0] = 0;
        assert!(matches!(Header::decode(&b), Err(ProtoError::BadMagic(_))));
        let mut b = Header {
            op: 1,
            len: 0,
            req_id: 1,
        }
        .encode();
        b[3] = 1;
        assert_eq!(Header::decode(&b), Err(ProtoError::BadFlags(1)));
    }

    #[test]
    fn extent_limits_are_enforced() {
        let mut p = Vec::new();
        p.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            decode_request(Op::Read as u8, &p),
            Err(ProtoError::Invalid("empty extent list"))
        );
        let mut p = Vec::new();
        p.extend_from_slice(&(MAX_EXTENTS as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode_request(Op::Read as u8, &p),
            Err(ProtoError::TooLarge { .. })
        ));
        // Two 8 MiB extents overflow MAX_IO_BYTES.
        let big = Extent::new(0, 0, MAX_IO_BYTES as u32);
        let mut buf = Vec::new();
        encode_request(
            &mut buf,
            1,
            &Request::Read {
                extents: vec![big, big],
            },
        );
        assert!(matches!(
            decode_request(Op::Read as u8, &buf[HEADER_LEN..]),
            Err(ProtoError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_op_and_trailing_bytes() {
        assert_eq!(decode_request(0x7E, &[]), Err(ProtoError::UnknownOp(0x7E)));
        assert!(matches!(
            decode_request(Op::Stat as u8, &[1]),
            Err(ProtoError::Trailing { .. })
        ));
    }

    #[test]
    fn error_codes_roundtrip() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c as u16), Some(c));
        }
        for op in Op::ALL {
            assert_eq!(Op::from_u8(op as u8), Some(op));
        }
    }
}
