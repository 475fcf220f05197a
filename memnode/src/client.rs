//! Client of the memory-node protocol: connection setup, authentication,
//! slab lease/free, batched and pipelined reads and writes, and
//! reconnect-and-resume. The pager's TCP transport and `dmem ping` build on it.
//!
//! Any number of threads may submit requests on one `Client`; replies are
//! matched to requests by id. There is no reader thread: a waiter that finds
//! the socket free reads replies itself (leader/follower) and hands other
//! waiters theirs, so a lone request costs no thread wake-up, which on a VM
//! is worth as much as the network round trip. Every request is idempotent
//! (slab ids are chosen by the client, writes put fixed bytes at fixed
//! places), so when the connection breaks, a waiting request reconnects,
//! resumes the session and is simply sent again.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use nix::sys::socket::{recv, MsgFlags};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::auth::{client_proof, random_secret, secrets_equal, server_proof};
use crate::lock;
use crate::protocol::{
    decode_reply, encode_request, ErrorCode, Extent, Header, Op, ProtoError, RdmaEndpoint,
    RdmaRegion, Reply, Request, Secret, StatReply, Welcome, HEADER_LEN, REPLY_BIT, VERSION_MAX,
    VERSION_MIN,
};

/// Pause after the first failed reconnect attempt; it doubles up to 500 ms.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);

/// How long a request write may block before the writer checks for
/// replies to read (see `Conn::write_frame`).
const WRITE_STALL: Duration = Duration::from_millis(5);
/// The reply reader's buffer: room for many small replies (write acks) per
/// system call, while a READ reply's data mostly bypasses it.
const READ_BUFFER: usize = 32 << 10;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot reach memory node {addr}: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("memory node {addr} refused the token (authentication failed)")]
    AuthRefused { addr: String },
    #[error("memory node {addr} requires a token: pass --token-file")]
    TokenRequired { addr: String },
    #[error("memory node {addr} does not authenticate itself, but a token was given: refusing an unverified node")]
    ServerUnauthenticated { addr: String },
    #[error("memory node {addr} failed to prove it holds the token: possible impostor")]
    BadServerProof { addr: String },
    #[error("memory node {addr} no longer has session {session}: its data is gone ({message})")]
    SessionLost {
        addr: String,
        session: u64,
        message: String,
    },
    #[error("memory node {addr}: {message} ({})", code.map_or("unknown error", |c| c.label()))]
    Server {
        addr: String,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("memory node {addr} sent an invalid frame: {source}")]
    Protocol { addr: String, source: ProtoError },
    #[error("memory node {addr} sent an unexpected reply to {op}")]
    UnexpectedReply { addr: String, op: &'static str },
    #[error("memory node {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("read reply of {got} bytes does not fit the {want}-byte buffer")]
    ShortRead { got: usize, want: usize },
    #[error("connection to memory node lost")]
    Disconnected,
}

impl ClientError {
    /// The server's error code, when the node refused a request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => *code,
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `HOST:PORT` of the memory node.
    pub addr: String,
    pub token: Option<Vec<u8>>,
    pub connect_timeout: Duration,
    /// How long one request may wait for its reply.
    pub request_timeout: Duration,
    /// How long to keep trying to reconnect after the connection breaks.
    pub reconnect_window: Duration,
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>) -> ClientConfig {
        ClientConfig {
            addr: addr.into(),
            token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            reconnect_window: Duration::from_secs(30),
        }
    }
}

/// A reply frame as received: opcode and payload, decoded by the waiter.
struct RawReply {
    op: u8,
    payload: Vec<u8>,
    /// The payload (READ data) went straight into the waiter's buffer.
    in_dest: bool,
}

impl RawReply {
    fn new(op: u8, payload: Vec<u8>) -> RawReply {
        RawReply {
            op,
            payload,
            in_dest: false,
        }
    }
}

type Outcome = Result<RawReply, ClientError>;

/// What a blocked waiter can be told.
enum Msg {
    /// Its reply (or the connection's end).
    Done(Outcome),
    /// The reader left: take over reading.
    Lead,
}

/// One TCP connection, live or dead.
struct Conn {
    generation: u64,
    stream: TcpStream,
    writer: Mutex<TcpStream>,
    /// Held by the one waiter currently reading replies.
    reader: Mutex<BufReader<TcpStream>>,
    pending: Mutex<HashMap<u64, Sender<Msg>>>,
    /// Waiters blocked on their channel while someone else reads.
    blocked: Mutex<Vec<u64>>,
    dead: AtomicBool,
}

impl Conn {
    /// Marks the connection dead and fails everything waiting on it.
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        for (_, tx) in lock(&self.pending).drain() {
            let _ = tx.try_send(Msg::Done(Err(ClientError::Disconnected)));
        }
    }

    /// Called by a reader that is done: hands the socket to a blocked waiter.
    /// Skips waiters whose reply was already dispatched (they are about to
    /// leave `blocked`): handing them the lead would lose it, and the other
    /// blocked waiters would wait for a reader until they time out.
    fn pass_lead(&self) {
        let mut blocked = lock(&self.blocked);
        while let Some(id) = blocked.pop() {
            if let Some(tx) = lock(&self.pending).get(&id) {
                let _ = tx.try_send(Msg::Lead);
                return;
            }
        }
    }

    /// Reads replies, dispatching others', until the one for `id` arrives.
    /// Its READ data lands in `dest` when the sizes match (no allocation,
    /// no copy: the common case of a waiter reading its own reply). The
    /// caller holds the reader lock.
    fn read_until(
        &self,
        r: &mut BufReader<TcpStream>,
        id: u64,
        cfg: &ClientConfig,
        dest: &mut [u8],
    ) -> Outcome {
        let addr = &cfg.addr;
        loop {
            let frame = read_header(r).and_then(|h| {
                let direct = h.req_id == id
                    && h.op == Op::Read as u8 | REPLY_BIT
                    && h.len as usize == dest.len()
                    && !dest.is_empty();
                if direct {
                    read_bypassing(r, dest)?;
                    return Ok((
                        h,
                        RawReply {
                            op: h.op,
                            payload: Vec::new(),
                            in_dest: true,
                        },
                    ));
                }
                let payload = read_payload(r, &h)?;
                Ok((h, RawReply::new(h.op, payload)))
            });
            let (h, raw) = match frame {
                Ok(f) => f,
                Err(e) => {
                    let timed_out = matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                    debug!(%addr, "connection lost: {e}");
                    self.kill();
                    // A stalled node is not retried: the caller decides.
                    return Err(if timed_out {
                        ClientError::Timeout {
                            addr: addr.clone(),
                            timeout: cfg.request_timeout,
                        }
                    } else {
                        ClientError::Disconnected
                    });
                }
            };
            if h.req_id == id {
                lock(&self.pending).remove(&id);
                return Ok(raw);
            }
            self.dispatch(h.req_id, raw, addr);
        }
    }

    /// Hands a reply to the waiter of request `req_id`.
    fn dispatch(&self, req_id: u64, raw: RawReply, addr: &str) {
        match lock(&self.pending).remove(&req_id) {
            Some(tx) => {
                let _ = tx.try_send(Msg::Done(Ok(raw)));
            }
            None if raw.op == crate::protocol::OP_ERROR => {
                // An error tied to no request (the node dropping us):
                // log it; the EOF that follows fails everything pending.
                if let Ok(Reply::Error { message, .. }) = decode_reply(raw.op, &raw.payload) {
                    warn!(%addr, "memory node: {message}");
                }
            }
            None => debug!(%addr, req = req_id, "reply to an unknown request dropped"),
        }
    }

    /// Writes a whole request frame. The node stops reading requests while
    /// its replies go unread, so a writer that finds the socket full reads
    /// and dispatches the replies that have arrived (unless another thread
    /// is reading) instead of only waiting, which could deadlock both sides.
    fn write_frame(&self, frame: &[u8], cfg: &ClientConfig) -> io::Result<()> {
        let mut w = lock(&self.writer);
        let mut pos = 0;
        let mut stalled_since: Option<Instant> = None;
        while pos < frame.len() {
            match w.write(&frame[pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    pos += n;
                    stalled_since = None;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if stalled_since.get_or_insert_with(Instant::now).elapsed()
                        >= cfg.request_timeout
                    {
                        return Err(e);
                    }
                    self.read_ready(cfg);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads and dispatches the replies already received, without waiting
    /// for more, if no other thread is reading.
    fn read_ready(&self, cfg: &ClientConfig) {
        let Ok(mut r) = self.reader.try_lock() else {
            return;
        };
        let mut peek = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        while !self.dead.load(Ordering::SeqCst)
            && (!r.buffer().is_empty()
                || matches!(recv(self.stream.as_raw_fd(), &mut peek, flags), Ok(n) if n > 0))
        {
            // A frame once started arrives whole: the node writes replies
            // out completely before it reads the next request.
            match read_frame(&mut *r) {
                Ok((h, payload)) => {
                    self.dispatch(h.req_id, RawReply::new(h.op, payload), &cfg.addr)
                }
                Err(e) => {
                    debug!(addr = %cfg.addr, "connection lost: {e}");
                    self.kill();
                }
            }
        }
        drop(r);
        self.pass_lead();
    }
}

struct Shared {
    cfg: ClientConfig,
    conn: Mutex<Arc<Conn>>,
    session: Mutex<(u64, Secret)>,
    welcome: Mutex<Welcome>,
    next_id: AtomicU64,
    reconnects: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        lock(&self.conn).kill();
    }
}

/// A session with one memory node.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

/// A request in flight; [`Pending::wait`] returns its reply payload.
pub struct Pending {
    shared: Arc<Shared>,
    id: u64,
    op: Op,
    frame: Vec<u8>,
    rx: Receiver<Msg>,
    conn: Arc<Conn>,
    generation: u64,
    resent: bool,
}

impl Client {
    /// Connects, negotiates the version and authenticates a new session.
    pub fn connect(cfg: ClientConfig) -> Result<Client, ClientError> {
        let (conn, welcome) = open(&cfg, None, 1)?;
        let shared = Arc::new(Shared {
            session: Mutex::new((welcome.session_id, welcome.resume_secret)),
            welcome: Mutex::new(welcome),
            conn: Mutex::new(conn),
            cfg,
            next_id: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
        });
        Ok(Client { shared })
    }

    pub fn addr(&self) -> &str {
        &self.shared.cfg.addr
    }

    pub fn session_id(&self) -> u64 {
        lock(&self.shared.session).0
    }

    /// Capacity and use reported at the last (re)connect.
    pub fn welcome(&self) -> Welcome {
        lock(&self.shared.welcome).clone()
    }

    /// Opens a new session in place of one the node no longer has (it
    /// restarted, or the lease grace passed): that session's slabs are
    /// gone, and requests from now on run in the new, empty one.
    pub fn renew(&self) -> Result<(), ClientError> {
        let mut current = lock(&self.shared.conn);
        current.kill();
        let (conn, welcome) = open(&self.shared.cfg, None, current.generation + 1)?;
        info!(addr = %self.shared.cfg.addr, session = welcome.session_id, "opened a new session");
        *lock(&self.shared.session) = (welcome.session_id, welcome.resume_secret);
        *lock(&self.shared.welcome) = welcome;
        *current = conn;
        Ok(())
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Sends a request without waiting for its reply.
    pub fn submit(&self, req: &Request<'_>) -> Result<Pending, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_request(&mut frame, id, req);
        let (rx, conn) = self.shared.send(id, &frame)?;
        let generation = conn.generation;
        Ok(Pending {
            shared: self.shared.clone(),
            id,
            op: req.op(),
            frame,
            rx,
            conn,
            generation,
            resent: false,
        })
    }

    pub fn submit_read(&self, extents: &[Extent]) -> Result<Pending, ClientError> {
        self.submit(&Request::Read {
            extents: extents.to_vec(),
        })
    }

    pub fn submit_write(&self, extents: &[Extent], data: &[u8]) -> Result<Pending, ClientError> {
        self.submit(&Request::Write {
            extents: extents.to_vec(),
            data,
        })
    }

    /// Reads the extents, concatenated.
    pub fn read(&self, extents: &[Extent]) -> Result<Vec<u8>, ClientError> {
        self.submit_read(extents)?.wait()
    }

    /// Reads the extents into `buf`, which must be exactly their total size.
    pub fn read_into(&self, extents: &[Extent], buf: &mut [u8]) -> Result<(), ClientError> {
        self.submit_read(extents)?.wait_into(buf)
    }

    /// Writes `data` (concatenated) to the extents; returns once stored.
    pub fn write(&self, extents: &[Extent], data: &[u8]) -> Result<(), ClientError> {
        self.submit_write(extents, data)?.wait().map(drop)
    }

    /// Leases slab `slab` (an id of the caller's choosing) of `size` bytes.
    pub fn alloc(&self, slab: u32, size: u64) -> Result<(), ClientError> {
        self.submit(&Request::Alloc { slab, size })?
            .wait()
            .map(drop)
    }

    /// Frees slab `slab`.
    pub fn free(&self, slab: u32) -> Result<(), ClientError> {
        let mut p = self.submit(&Request::Free { slab })?;
        match p.wait_inner() {
            // A FREE resent after a reconnect may find its first copy done.
            Err(e) if p.resent && e.code() == Some(ErrorCode::NoSuchSlab) => Ok(()),
            r => r.map(drop),
        }
    }

    pub fn stat(&self) -> Result<StatReply, ClientError> {
        self.ask(&Request::Stat, |r| match r {
            Reply::Stat(s) => Some(s),
            _ => None,
        })
    }

    /// Asks the node to connect a queue pair to ours (`mine`); returns the
    /// node's, ready for one-sided operations. Refused with `NoRdma` where
    /// the node offers none.
    pub fn rdma_connect(&self, mine: RdmaEndpoint) -> Result<RdmaEndpoint, ClientError> {
        self.ask(&Request::RdmaConnect(mine), |r| match r {
            Reply::RdmaAccept(e) => Some(e),
            _ => None,
        })
    }

    /// Where leased slab `slab` is for RDMA (the node registers it).
    pub fn rdma_slab(&self, slab: u32) -> Result<RdmaRegion, ClientError> {
        self.ask(&Request::RdmaSlab { slab }, |r| match r {
            Reply::RdmaSlab(g) => Some(g),
            _ => None,
        })
    }

    /// Sends `req` and picks the expected reply out of the answer.
    fn ask<T>(
        &self,
        req: &Request<'_>,
        pick: impl FnOnce(Reply<'_>) -> Option<T>,
    ) -> Result<T, ClientError> {
        let mut p = self.submit(req)?;
        let raw = p.wait_raw(&mut [])?;
        decode_reply(raw.op, &raw.payload)
            .ok()
            .and_then(pick)
            .ok_or_else(|| ClientError::UnexpectedReply {
                addr: self.shared.cfg.addr.clone(),
                op: req.op().name(),
            })
    }

    /// Echo round trip through the node's request path.
    pub fn ping(&self, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.submit(&Request::Ping { payload })?.wait()
    }

    /// Ends the session: the node frees all its slabs now.
    pub fn close_session(self) -> Result<(), ClientError> {
        let mut p = self.submit(&Request::CloseSession)?;
        let r = p.wait_raw(&mut []).map(drop);
        lock(&self.shared.conn).kill();
        r
    }

    /// Breaks the current connection (for tests of reconnect-and-resume).
    pub fn break_connection(&self) {
        lock(&self.shared.conn).kill();
    }
}

impl Shared {
    /// Registers `id` and writes its frame on the current connection,
    /// reconnecting first if the connection is known dead.
    fn send(
        self: &Arc<Self>,
        id: u64,
        frame: &[u8],
    ) -> Result<(Receiver<Msg>, Arc<Conn>), ClientError> {
        let deadline = Instant::now() + self.cfg.reconnect_window;
        loop {
            let conn = lock(&self.conn).clone();
            if conn.dead.load(Ordering::SeqCst) {
                self.reconnect(conn.generation, deadline)?;
                continue;
            }
            // Room for a reply and a lead hand-off; senders never block.
            let (tx, rx) = channel::bounded(4);
            lock(&conn.pending).insert(id, tx);
            let written = conn.write_frame(frame, &self.cfg);
            match written {
                Ok(()) => return Ok((rx, conn)),
                Err(e) => {
                    debug!(addr = %self.cfg.addr, "send failed: {e}");
                    lock(&conn.pending).remove(&id);
                    conn.kill();
                }
            }
        }
    }

    /// Replaces connection `generation` (if still current) by a new one that
    /// resumes the session, retrying until `deadline`.
    fn reconnect(&self, generation: u64, deadline: Instant) -> Result<(), ClientError> {
        let mut current = lock(&self.conn);
        if current.generation != generation && !current.dead.load(Ordering::SeqCst) {
            return Ok(()); // someone else already reconnected
        }
        current.kill();
        let resume = *lock(&self.session);
        let mut backoff = FIRST_BACKOFF;
        loop {
            match open(&self.cfg, Some(resume), current.generation + 1) {
                Ok((conn, welcome)) => {
                    info!(addr = %self.cfg.addr, session = resume.0, "reconnected and resumed session");
                    *lock(&self.welcome) = welcome;
                    *current = conn;
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(
                    e @ (ClientError::Unreachable { .. }
                    | ClientError::Timeout { .. }
                    | ClientError::Disconnected),
                ) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    // Once per outage, not once per attempt.
                    if backoff == FIRST_BACKOFF {
                        warn!(addr = %self.cfg.addr, "reconnect failed, retrying: {e}");
                    } else {
                        debug!(addr = %self.cfg.addr, "reconnect failed, retrying: {e}");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Pending {
    /// Waits for the reply; returns READ data or PING echo (empty otherwise).
    pub fn wait(mut self) -> Result<Vec<u8>, ClientError> {
        self.wait_inner()
    }

    /// Waits for the reply and puts its data into `out`, which must be
    /// exactly the size read (empty for requests that return no data).
    /// When this thread reads its own READ reply off the socket the data
    /// goes there directly; else it is copied once.
    pub fn wait_into(mut self, out: &mut [u8]) -> Result<(), ClientError> {
        let raw = self.wait_raw(out)?;
        if raw.in_dest {
            return Ok(());
        }
        let data = self.check_reply(raw)?;
        if data.len() != out.len() {
            return Err(ClientError::ShortRead {
                got: data.len(),
                want: out.len(),
            });
        }
        out.copy_from_slice(&data);
        Ok(())
    }

    fn wait_inner(&mut self) -> Result<Vec<u8>, ClientError> {
        let raw = self.wait_raw(&mut [])?;
        self.check_reply(raw)
    }

    /// Checks that a reply answers this request; returns its payload.
    fn check_reply(&self, raw: RawReply) -> Result<Vec<u8>, ClientError> {
        let addr = &self.shared.cfg.addr;
        match decode_reply(raw.op, &raw.payload) {
            Ok(Reply::Data(_)) if self.op == Op::Read => {}
            Ok(Reply::Pong(_)) if self.op == Op::Ping => {}
            Ok(Reply::Done(op)) if op == self.op => return Ok(Vec::new()),
            Ok(_) => {
                return Err(ClientError::UnexpectedReply {
                    addr: addr.clone(),
                    op: self.op.name(),
                })
            }
            Err(source) => {
                return Err(ClientError::Protocol {
                    addr: addr.clone(),
                    source,
                })
            }
        }
        Ok(raw.payload)
    }

    fn wait_raw(&mut self, dest: &mut [u8]) -> Result<RawReply, ClientError> {
        let deadline = Instant::now() + self.shared.cfg.reconnect_window;
        loop {
            match self.wait_once(dest) {
                Ok(raw) => return server_error(&self.shared.cfg.addr, raw),
                Err(ClientError::Disconnected) => {
                    self.shared.reconnect(self.generation, deadline)?;
                    let (rx, conn) = self.shared.send(self.id, &self.frame)?;
                    self.generation = conn.generation;
                    (self.rx, self.conn, self.resent) = (rx, conn, true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for the reply on the current connection: reads the socket
    /// itself when nobody else does, else blocks until the reader hands it
    /// the reply or the lead.
    fn wait_once(&mut self, dest: &mut [u8]) -> Outcome {
        let conn = self.conn.clone();
        let cfg = &self.shared.cfg;
        loop {
            if let Ok(msg) = self.rx.try_recv() {
                if let Msg::Done(o) = msg {
                    return o;
                }
                continue;
            }
            if let Ok(mut r) = conn.reader.try_lock() {
                // Our reply may have been dispatched before we took the lock.
                let outcome = match self.rx.try_recv() {
                    Ok(Msg::Done(o)) => o,
                    _ => conn.read_until(&mut r, self.id, cfg, dest),
                };
                drop(r);
                conn.pass_lead();
                return outcome;
            }
            // Someone reads. Register as blocked, then re-check the lock: a
            // reader that left before seeing us registered cannot hand over.
            lock(&conn.blocked).push(self.id);
            if conn.reader.try_lock().is_ok() {
                lock(&conn.blocked).retain(|i| *i != self.id);
                continue;
            }
            match self.rx.recv_timeout(cfg.request_timeout) {
                Ok(Msg::Lead) => continue,
                Ok(Msg::Done(o)) => {
                    lock(&conn.blocked).retain(|i| *i != self.id);
                    return o;
                }
                Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Disconnected),
                Err(RecvTimeoutError::Timeout) => {
                    // A node that stops answering is treated as gone: every
                    // waiter fails over to a fresh connection.
                    conn.kill();
                    return Err(ClientError::Timeout {
                        addr: cfg.addr.clone(),
                        timeout: cfg.request_timeout,
                    });
                }
            }
        }
    }
}

/// Turns an ERROR frame into a `ClientError::Server`.
fn server_error(addr: &str, raw: RawReply) -> Result<RawReply, ClientError> {
    if raw.op != crate::protocol::OP_ERROR {
        return Ok(raw);
    }
    match decode_reply(raw.op, &raw.payload) {
        Ok(Reply::Error { code, message }) => Err(ClientError::Server {
            addr: addr.to_string(),
            code: ErrorCode::from_u16(code),
            message,
        }),
        Ok(_) => unreachable!("OP_ERROR decodes as an error"),
        Err(source) => Err(ClientError::Protocol {
            addr: addr.to_string(),
            source,
        }),
    }
}

fn unreachable_err(cfg: &ClientConfig, reason: impl ToString) -> ClientError {
    ClientError::Unreachable {
        addr: cfg.addr.clone(),
        reason: reason.to_string(),
    }
}

fn dial(cfg: &ClientConfig) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = cfg
        .addr
        .to_socket_addrs()
        .map_err(|e| unreachable_err(cfg, e))?
        .collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable_err(cfg, last))
}

/// Reads one frame.
fn read_frame(r: &mut impl Read) -> io::Result<(Header, Vec<u8>)> {
    let h = read_header(r)?;
    let payload = read_payload(r, &h)?;
    Ok((h, payload))
}

/// Fills `dest` from what `r` has buffered, then straight from the socket:
/// a READ reply lands in the caller's buffer with one copy out of the
/// kernel. Through the 1 MiB buffer every reply shorter than it was copied
/// twice (a tenth of the pager's time in a sequential scan).
fn read_bypassing(r: &mut BufReader<TcpStream>, dest: &mut [u8]) -> io::Result<()> {
    let buffered = r.buffer().len().min(dest.len());
    dest[..buffered].copy_from_slice(&r.buffer()[..buffered]);
    r.consume(buffered);
    r.get_mut().read_exact(&mut dest[buffered..])
}

fn read_header(r: &mut impl Read) -> io::Result<Header> {
    let mut raw = [0u8; HEADER_LEN];
    r.read_exact(&mut raw)?;
    Header::decode(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn read_payload(r: &mut impl Read, h: &Header) -> io::Result<Vec<u8>> {
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok(payload)
}

/// One handshake exchange: send `req`, return the decoded reply.
fn exchange(
    cfg: &ClientConfig,
    s: &mut TcpStream,
    req: &Request<'_>,
) -> Result<(u8, Vec<u8>), ClientError> {
    let mut frame = Vec::new();
    encode_request(&mut frame, 0, req);
    s.write_all(&frame).map_err(|e| unreachable_err(cfg, e))?;
    let (h, payload) = read_frame(s).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            addr: cfg.addr.clone(),
            timeout: cfg.connect_timeout,
        },
        _ => unreachable_err(cfg, format!("handshake failed: {e}")),
    })?;
    let raw = server_error(&cfg.addr, RawReply::new(h.op, payload))?;
    Ok((raw.op, raw.payload))
}

/// Dials and authenticates a new or resumed session.
fn open(
    cfg: &ClientConfig,
    resume: Option<(u64, Secret)>,
    generation: u64,
) -> Result<(Arc<Conn>, Welcome), ClientError> {
    let mut s = dial(cfg)?;
    s.set_nodelay(true).map_err(|e| unreachable_err(cfg, e))?;
    s.set_read_timeout(Some(cfg.connect_timeout))
        .map_err(|e| unreachable_err(cfg, e))?;
    let client_nonce = random_secret();
    let hello = Request::Hello {
        min_version: VERSION_MIN,
        max_version: VERSION_MAX,
        client_nonce,
    };
    let (op, payload) = exchange(cfg, &mut s, &hello)?;
    let (auth_required, server_nonce) = match decode_reply(op, &payload) {
        Ok(Reply::Challenge {
            auth_required,
            server_nonce,
            ..
        }) => (auth_required, server_nonce),
        _ => {
            return Err(ClientError::UnexpectedReply {
                addr: cfg.addr.clone(),
                op: "hello",
            })
        }
    };
    let mac = match (&cfg.token, auth_required) {
        (Some(t), true) => client_proof(t, &server_nonce, &client_nonce),
        (None, false) => [0u8; 32],
        (None, true) => {
            return Err(ClientError::TokenRequired {
                addr: cfg.addr.clone(),
            })
        }
        (Some(_), false) => {
            return Err(ClientError::ServerUnauthenticated {
                addr: cfg.addr.clone(),
            })
        }
    };
    let welcome = match exchange(cfg, &mut s, &Request::Auth { mac, resume }) {
        Ok((op, payload)) => match decode_reply(op, &payload) {
            Ok(Reply::Welcome(w)) => w,
            _ => {
                return Err(ClientError::UnexpectedReply {
                    addr: cfg.addr.clone(),
                    op: "auth",
                })
            }
        },
        Err(e) => {
            return Err(match (e.code(), resume) {
                (Some(ErrorCode::AuthFailed), _) => ClientError::AuthRefused {
                    addr: cfg.addr.clone(),
                },
                (Some(ErrorCode::UnknownSession), Some((session, _))) => ClientError::SessionLost {
                    addr: cfg.addr.clone(),
                    session,
                    message: e.to_string(),
                },
                _ => e,
            })
        }
    };
    if let Some(t) = &cfg.token {
        if !secrets_equal(
            &welcome.server_mac,
            &server_proof(t, &client_nonce, &server_nonce),
        ) {
            return Err(ClientError::BadServerProof {
                addr: cfg.addr.clone(),
            });
        }
    }
    // A reader blocked this long on a reply gives the connection up.
    s.set_read_timeout(Some(cfg.request_timeout))
        .map_err(|e| unreachable_err(cfg, e))?;
    // A writer blocked this long looks for replies to read (write_frame).
    s.set_write_timeout(Some(WRITE_STALL))
        .map_err(|e| unreachable_err(cfg, e))?;
    let clone = |s: &TcpStream| s.try_clone().map_err(|e| unreachable_err(cfg, e));
    let conn = Arc::new(Conn {
        generation,
        writer: Mutex::new(clone(&s)?),
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, clone(&s)?)),
        stream: s,
        pending: Mutex::new(HashMap::new()),
        blocked: Mutex::new(Vec::new()),
        dead: AtomicBool::new(false),
    });
    Ok((conn, welcome))
}
