//! Client of the memory-node protocol: connection setup, authentication,
//! slab lease/free, batched and pipelined reads and writes, and
//! reconnect-and-resume. The pager's TCP transport and `dmem ping` build on it.
//!
//! Any number of threads may submit requests on one `Client`; replies are
//! matched to requests by id on a reader thread. Every request is idempotent
//! (slab ids are chosen by the client, writes put fixed bytes at fixed
//! places), so when the connection breaks, a waiting request reconnects,
//! resumes the session and is simply sent again.

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam::channel::{self, Receiver, RecvTimeoutError, Sender};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::lock;
use crate::auth::{client_proof, random_secret, secrets_equal, server_proof};
use crate::protocol::{
    decode_reply, encode_request, ErrorCode, Extent, Header, Op, ProtoError, Reply, Request, Secret, StatReply,
    Welcome, HEADER_LEN, VERSION_MAX, VERSION_MIN,
};

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
    SessionLost { addr: String, session: u64, message: String },
    #[error("memory node {addr}: {message} ({})", code.map_or("unknown error", |c| c.label()))]
    Server { addr: String, code: Option<ErrorCode>, message: String },
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
}

type Outcome = Result<RawReply, ClientError>;

/// One TCP connection, live or dead.
struct Conn {
    generation: u64,
    stream: TcpStream,
    writer: Mutex<TcpStream>,
    pending: Mutex<HashMap<u64, Sender<Outcome>>>,
    dead: AtomicBool,
}

impl Conn {
    /// Marks the connection dead and fails everything waiting on it.
    fn kill(&self) {
        self.dead.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        for (_, tx) in lock(&self.pending).drain() {
            let _ = tx.send(Err(ClientError::Disconnected));
        }
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
    rx: Receiver<Outcome>,
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

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Sends a request without waiting for its reply.
    pub fn submit(&self, req: &Request<'_>) -> Result<Pending, ClientError> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_request(&mut frame, id, req);
        let (rx, generation) = self.shared.send(id, &frame)?;
        Ok(Pending { shared: self.shared.clone(), id, op: req.op(), frame, rx, generation, resent: false })
    }

    pub fn submit_read(&self, extents: &[Extent]) -> Result<Pending, ClientError> {
        self.submit(&Request::Read { extents: extents.to_vec() })
    }

    pub fn submit_write(&self, extents: &[Extent], data: &[u8]) -> Result<Pending, ClientError> {
        self.submit(&Request::Write { extents: extents.to_vec(), data })
    }

    /// Reads the extents, concatenated.
    pub fn read(&self, extents: &[Extent]) -> Result<Vec<u8>, ClientError> {
        self.submit_read(extents)?.wait()
    }

    /// Reads the extents into `buf`, which must be exactly their total size.
    pub fn read_into(&self, extents: &[Extent], buf: &mut [u8]) -> Result<(), ClientError> {
        let data = self.read(extents)?;
        if data.len() != buf.len() {
            return Err(ClientError::ShortRead { got: data.len(), want: buf.len() });
        }
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` (concatenated) to the extents; returns once stored.
    pub fn write(&self, extents: &[Extent], data: &[u8]) -> Result<(), ClientError> {
        self.submit_write(extents, data)?.wait().map(drop)
    }

    /// Leases slab `slab` (an id of the caller's choosing) of `size` bytes.
    pub fn alloc(&self, slab: u32, size: u64) -> Result<(), ClientError> {
        self.submit(&Request::Alloc { slab, size })?.wait().map(drop)
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
        let mut p = self.submit(&Request::Stat)?;
        let raw = p.wait_raw()?;
        match decode_reply(raw.op, &raw.payload) {
            Ok(Reply::Stat(s)) => Ok(s),
            _ => Err(ClientError::UnexpectedReply { addr: self.shared.cfg.addr.clone(), op: "stat" }),
        }
    }

    /// Echo round trip through the node's request path.
    pub fn ping(&self, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.submit(&Request::Ping { payload })?.wait()
    }

    /// Ends the session: the node frees all its slabs now.
    pub fn close_session(self) -> Result<(), ClientError> {
        let mut p = self.submit(&Request::CloseSession)?;
        let r = p.wait_raw().map(drop);
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
    fn send(self: &Arc<Self>, id: u64, frame: &[u8]) -> Result<(Receiver<Outcome>, u64), ClientError> {
        let deadline = Instant::now() + self.cfg.reconnect_window;
        loop {
            let conn = lock(&self.conn).clone();
            if conn.dead.load(Ordering::SeqCst) {
                self.reconnect(conn.generation, deadline)?;
                continue;
            }
            let (tx, rx) = channel::bounded(1);
            lock(&conn.pending).insert(id, tx);
            let written = lock(&conn.writer).write_all(frame);
            match written {
                Ok(()) => return Ok((rx, conn.generation)),
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
        let mut backoff = Duration::from_millis(20);
        loop {
            match open(&self.cfg, Some(resume), current.generation + 1) {
                Ok((conn, welcome)) => {
                    info!(addr = %self.cfg.addr, session = resume.0, "reconnected and resumed session");
                    *lock(&self.welcome) = welcome;
                    *current = conn;
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e @ (ClientError::Unreachable { .. } | ClientError::Timeout { .. } | ClientError::Disconnected)) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    warn!(addr = %self.cfg.addr, "reconnect failed, retrying: {e}");
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

    fn wait_inner(&mut self) -> Result<Vec<u8>, ClientError> {
        let raw = self.wait_raw()?;
        let addr = &self.shared.cfg.addr;
        match decode_reply(raw.op, &raw.payload) {
            Ok(Reply::Data(_)) if self.op == Op::Read => {}
            Ok(Reply::Pong(_)) if self.op == Op::Ping => {}
            Ok(Reply::Done(op)) if op == self.op => return Ok(Vec::new()),
            Ok(_) => return Err(ClientError::UnexpectedReply { addr: addr.clone(), op: self.op.name() }),
            Err(source) => return Err(ClientError::Protocol { addr: addr.clone(), source }),
        }
        let mut payload = raw.payload;
        Ok(std::mem::take(&mut payload))
    }

    fn wait_raw(&mut self) -> Result<RawReply, ClientError> {
        let cfg = &self.shared.cfg;
        let deadline = Instant::now() + cfg.reconnect_window;
        loop {
            let outcome = match self.rx.recv_timeout(cfg.request_timeout) {
                Ok(o) => o,
                Err(RecvTimeoutError::Disconnected) => Err(ClientError::Disconnected),
                Err(RecvTimeoutError::Timeout) => {
                    // A node that stops answering is treated as gone: the
                    // connection is dropped so every waiter reconnects.
                    let conn = lock(&self.shared.conn).clone();
                    if conn.generation == self.generation {
                        conn.kill();
                    }
                    return Err(ClientError::Timeout { addr: cfg.addr.clone(), timeout: cfg.request_timeout });
                }
            };
            match outcome {
                Ok(raw) => return server_error(&cfg.addr, raw),
                Err(ClientError::Disconnected) => {
                    self.shared.reconnect(self.generation, deadline)?;
                    let (rx, generation) = self.shared.send(self.id, &self.frame)?;
                    (self.rx, self.generation, self.resent) = (rx, generation, true);
                }
                Err(e) => return Err(e),
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
        Ok(Reply::Error { code, message }) => {
            Err(ClientError::Server { addr: addr.to_string(), code: ErrorCode::from_u16(code), message })
        }
        Ok(_) => unreachable!("OP_ERROR decodes as an error"),
        Err(source) => Err(ClientError::Protocol { addr: addr.to_string(), source }),
    }
}

fn unreachable_err(cfg: &ClientConfig, reason: impl ToString) -> ClientError {
    ClientError::Unreachable { addr: cfg.addr.clone(), reason: reason.to_string() }
}

fn dial(cfg: &ClientConfig) -> Result<TcpStream, ClientError> {
    let addrs: Vec<SocketAddr> = cfg.addr.to_socket_addrs().map_err(|e| unreachable_err(cfg, e))?.collect();
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(unreachable_err(cfg, last))
}

/// Reads one frame (used during the handshake and by the reader thread).
fn read_frame(r: &mut impl Read) -> io::Result<(Header, Vec<u8>)> {
    let mut raw = [0u8; HEADER_LEN];
    r.read_exact(&mut raw)?;
    let h = Header::decode(&raw).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let mut payload = vec![0u8; h.len as usize];
    r.read_exact(&mut payload)?;
    Ok((h, payload))
}

/// One handshake exchange: send `req`, return the decoded reply.
fn exchange(cfg: &ClientConfig, s: &mut TcpStream, req: &Request<'_>) -> Result<(u8, Vec<u8>), ClientError> {
    let mut frame = Vec::new();
    encode_request(&mut frame, 0, req);
    s.write_all(&frame).map_err(|e| unreachable_err(cfg, e))?;
    let (h, payload) = read_frame(s).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            ClientError::Timeout { addr: cfg.addr.clone(), timeout: cfg.connect_timeout }
        }
        _ => unreachable_err(cfg, format!("handshake failed: {e}")),
    })?;
    let raw = server_error(&cfg.addr, RawReply { op: h.op, payload })?;
    Ok((raw.op, raw.payload))
}

/// Dials, authenticates (new or resumed session) and starts the reader.
fn open(cfg: &ClientConfig, resume: Option<(u64, Secret)>, generation: u64) -> Result<(Arc<Conn>, Welcome), ClientError> {
    let mut s = dial(cfg)?;
    s.set_nodelay(true).map_err(|e| unreachable_err(cfg, e))?;
    s.set_read_timeout(Some(cfg.connect_timeout)).map_err(|e| unreachable_err(cfg, e))?;
    let client_nonce = random_secret();
    let hello = Request::Hello { min_version: VERSION_MIN, max_version: VERSION_MAX, client_nonce };
    let (op, payload) = exchange(cfg, &mut s, &hello)?;
    let (auth_required, server_nonce) = match decode_reply(op, &payload) {
        Ok(Reply::Challenge { auth_required, server_nonce, .. }) => (auth_required, server_nonce),
        _ => return Err(ClientError::UnexpectedReply { addr: cfg.addr.clone(), op: "hello" }),
    };
    let mac = match (&cfg.token, auth_required) {
        (Some(t), true) => client_proof(t, &server_nonce, &client_nonce),
        (None, false) => [0u8; 32],
        (None, true) => return Err(ClientError::TokenRequired { addr: cfg.addr.clone() }),
        (Some(_), false) => return Err(ClientError::ServerUnauthenticated { addr: cfg.addr.clone() }),
    };
    let welcome = match exchange(cfg, &mut s, &Request::Auth { mac, resume }) {
        Ok((op, payload)) => match decode_reply(op, &payload) {
            Ok(Reply::Welcome(w)) => w,
            _ => return Err(ClientError::UnexpectedReply { addr: cfg.addr.clone(), op: "auth" }),
        },
        Err(e) => {
            return Err(match (e.code(), resume) {
                (Some(ErrorCode::AuthFailed), _) => ClientError::AuthRefused { addr: cfg.addr.clone() },
                (Some(ErrorCode::UnknownSession), Some((session, _))) => {
                    ClientError::SessionLost { addr: cfg.addr.clone(), session, message: e.to_string() }
                }
                _ => e,
            })
        }
    };
    if let Some(t) = &cfg.token {
        if !secrets_equal(&welcome.server_mac, &server_proof(t, &client_nonce, &server_nonce)) {
            return Err(ClientError::BadServerProof { addr: cfg.addr.clone() });
        }
    }
    s.set_read_timeout(None).map_err(|e| unreachable_err(cfg, e))?;
    let conn = Arc::new(Conn {
        generation,
        writer: Mutex::new(s.try_clone().map_err(|e| unreachable_err(cfg, e))?),
        stream: s.try_clone().map_err(|e| unreachable_err(cfg, e))?,
        pending: Mutex::new(HashMap::new()),
        dead: AtomicBool::new(false),
    });
    let reader_conn = conn.clone();
    let addr = cfg.addr.clone();
    std::thread::Builder::new()
        .name("memnode-reader".into())
        .spawn(move || read_replies(&reader_conn, s, &addr))
        .map_err(|e| unreachable_err(cfg, e))?;
    Ok((conn, welcome))
}

/// Reader thread: hands each reply to the request waiting for it.
fn read_replies(conn: &Conn, stream: TcpStream, addr: &str) {
    let mut r = BufReader::with_capacity(1 << 20, stream);
    loop {
        match read_frame(&mut r) {
            Ok((h, payload)) => {
                let waiter = lock(&conn.pending).remove(&h.req_id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send(Ok(RawReply { op: h.op, payload }));
                    }
                    None if h.op == crate::protocol::OP_ERROR => {
                        // An error not tied to a request (e.g. the node
                        // dropping us): log it; the EOF that follows fails
                        // everything pending.
                        if let Ok(Reply::Error { message, .. }) = decode_reply(h.op, &payload) {
                            warn!(%addr, "memory node: {message}");
                        }
                    }
                    None => debug!(%addr, req = h.req_id, "reply to an unknown request dropped"),
                }
            }
            Err(e) => {
                if !conn.dead.load(Ordering::SeqCst) {
                    debug!(%addr, "connection lost: {e}");
                }
                conn.kill();
                return;
            }
        }
    }
}
