//! The memory node's network side: accept loop, per-connection handshake and
//! request handling, lease reaping.
//!
//! One thread per connection: a memory node serves a few pagers with deep
//! pipelines, not thousands of clients. By default the thread uses blocking
//! I/O ([`Conn::run`]); `--io uring` drives the socket through an io_uring
//! instead (`uring.rs`), with the same request handling ([`Conn::handle`]).
//! docs/architecture.md has the measurements of both. Replies to pipelined
//! requests are batched: the reply buffer is flushed only when no further
//! request is already buffered, so a burst costs one `write(2)`.

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::auth::{client_proof, random_secret, secrets_equal, server_proof};
use crate::metrics::Metrics;
use crate::protocol::{
    begin_frame, decode_request, encode_reply, end_frame, ErrorCode, Header, Op, Reply, Request,
    Secret, StatReply, Welcome, HEADER_LEN, REPLY_BIT, VERSION_MAX, VERSION_MIN,
};
use crate::rdma::{ConnQueuePair, DeviceConfig, RdmaMode, RdmaService};
use crate::store::{Session, Store, StoreError};

/// Flush the reply buffer once it holds this much, even mid-burst.
pub(crate) const FLUSH_AT: usize = 1 << 20;
pub(crate) const READ_BUFFER: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Rdma(String),
}

/// How connections move bytes; request handling is the same for both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// A thread per connection with blocking `read(2)`/`write(2)`.
    #[default]
    Threads,
    /// A thread per connection driving its socket through its own io_uring
    /// (see `uring.rs`).
    Uring,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub capacity: u64,
    /// Shared token; `None` restricts the node to loopback clients.
    pub token: Option<Vec<u8>>,
    /// How long a disconnected session's slabs are kept for a resume.
    pub lease_grace: Duration,
    /// A peer that stalls mid-frame or mid-handshake this long is dropped.
    pub io_timeout: Duration,
    pub max_connections: usize,
    pub io: IoMode,
    /// Offer one-sided RDMA to pagers (`--rdma`).
    pub rdma: RdmaMode,
    pub rdma_device: DeviceConfig,
}

impl ServerConfig {
    pub fn new(listen: SocketAddr, capacity: u64) -> ServerConfig {
        ServerConfig {
            listen,
            capacity,
            token: None,
            lease_grace: Duration::from_secs(60),
            io_timeout: Duration::from_secs(30),
            max_connections: 256,
            io: IoMode::Threads,
            rdma: RdmaMode::Auto,
            rdma_device: DeviceConfig::default(),
        }
    }
}

/// State shared by all connections.
pub struct State {
    pub store: Store,
    pub rdma: RdmaService,
    pub metrics: Metrics,
    pub(crate) cfg: ServerConfig,
    next_conn: AtomicU64,
    open: AtomicUsize,
}

pub struct Server {
    listener: TcpListener,
    state: Arc<State>,
}

impl Server {
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        if cfg.io == IoMode::Uring {
            crate::uring::probe()?;
        }
        let listener = TcpListener::bind(cfg.listen).map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let rdma = RdmaService::start(cfg.rdma, &cfg.rdma_device).map_err(ServerError::Rdma)?;
        let state = Arc::new(State {
            store: Store::new(cfg.capacity, cfg.lease_grace),
            rdma,
            metrics: Metrics::default(),
            cfg,
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
        });
        Ok(Server { listener, state })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// Accepts connections until the process ends; spawns the lease reaper.
    pub fn run(self) -> Result<(), ServerError> {
        let reaper = self.state.clone();
        std::thread::Builder::new()
            .name("lease-reaper".into())
            .spawn(move || reap_forever(&reaper))?;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let state = self.state.clone();
            let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
            state
                .metrics
                .connections_total
                .fetch_add(1, Ordering::Relaxed);
            let spawned = std::thread::Builder::new()
                .name(format!("conn-{conn}"))
                .spawn(move || serve_connection(&state, stream, conn));
            if let Err(e) = spawned {
                warn!("cannot start a connection thread: {e}");
            }
        }
        Ok(())
    }
}

fn reap_forever(state: &State) {
    let tick = (state.cfg.lease_grace / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    loop {
        std::thread::sleep(tick);
        for id in state.store.reap() {
            state
                .metrics
                .sessions_expired
                .fetch_add(1, Ordering::Relaxed);
            info!(session = id, "lease grace over: session's slabs freed");
        }
    }
}

/// Where a connection is in its life.
enum Phase {
    New,
    Challenged {
        server_nonce: Secret,
        client_nonce: Secret,
    },
    Ready(Arc<Session>),
}

/// What the handler wants after a request.
pub(crate) enum Next {
    Continue,
    Close,
}

/// One connection's protocol state, whatever moves its bytes: the I/O loop
/// ([`Conn::run`] or `uring::run`) feeds it frames and sends `out`.
pub(crate) struct Conn<'a> {
    pub(crate) state: &'a State,
    id: u64,
    peer: SocketAddr,
    pub(crate) stream: &'a TcpStream,
    phase: Phase,
    /// Replies not yet sent.
    pub(crate) out: Vec<u8>,
    /// The pager's RDMA queue pair's peer, if it asked for one.
    qp: Option<ConnQueuePair>,
}

fn serve_connection(state: &State, stream: TcpStream, id: u64) {
    let open = state.open.fetch_add(1, Ordering::Relaxed) + 1;
    state
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let mut conn = Conn {
        state,
        id,
        peer,
        stream: &stream,
        phase: Phase::New,
        out: Vec::with_capacity(64 << 10),
        qp: None,
    };
    let result = if open > state.cfg.max_connections {
        conn.refuse_early(ErrorCode::Busy, "too many connections")
    } else if state.cfg.token.is_none() && !is_loopback(peer.ip()) {
        conn.refuse_early(
            ErrorCode::NotLoopback,
            "this memory node runs without --token-file and accepts loopback clients only",
        )
    } else {
        match state.cfg.io {
            IoMode::Threads => conn.run(),
            IoMode::Uring => crate::uring::run(&mut conn),
        }
    };
    match result {
        Ok(()) => debug!(conn = id, %peer, "connection closed"),
        Err(e) => debug!(conn = id, %peer, "connection dropped: {e}"),
    }
    if let Phase::Ready(session) = &conn.phase {
        state.store.detach(session, id);
        debug!(session = session.id, "session detached; lease grace starts");
    }
    state.open.fetch_sub(1, Ordering::Relaxed);
    state
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl Conn<'_> {
    fn refuse_early(&mut self, code: ErrorCode, msg: &str) -> io::Result<()> {
        warn!(peer = %self.peer, "refusing connection: {msg}");
        self.error(0, code, msg);
        self.flush()
    }

    fn run(&mut self) -> io::Result<()> {
        let timeout = self.state.cfg.io_timeout;
        self.stream.set_nodelay(true)?;
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        let mut reader = BufReader::with_capacity(READ_BUFFER, self.stream.try_clone()?);
        let mut payload = Vec::new();
        let accepted = Instant::now();
        loop {
            // Idle between frames is fine once authenticated; a handshake
            // must finish within the timeout.
            loop {
                match reader.fill_buf() {
                    Ok([]) => return Ok(()),
                    Ok(_) => break,
                    Err(e) if is_timeout(&e) => {
                        if !matches!(self.phase, Phase::Ready(_)) && accepted.elapsed() >= timeout {
                            return Err(io::Error::new(
                                ErrorKind::TimedOut,
                                "handshake not completed in time",
                            ));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            // Mid-frame, a timeout means a stalled peer: drop it. Before
            // the handshake is done, reads are bounded by its deadline.
            let deadline = (!self.ready()).then_some(accepted + timeout);
            let mut raw = [0u8; HEADER_LEN];
            self.read_exact_by(&mut reader, &mut raw, deadline)?;
            let Some(header) = self.header(&raw) else {
                return self.flush();
            };
            let len = header.len as usize;
            let next = if reader.buffer().len() >= len {
                // The whole payload is already buffered (the usual case):
                // handle it in place, without copying WRITE data out.
                let next = self.handle(header, &reader.buffer()[..len]);
                reader.consume(len);
                next
            } else {
                payload.resize(len, 0);
                self.read_exact_by(&mut reader, &mut payload, deadline)?;
                self.handle(header, &payload)
            };
            if deadline.is_some() && self.ready() {
                // Handshake done: back to the per-read stall timeout.
                self.stream.set_read_timeout(Some(timeout))?;
            }
            if matches!(next, Next::Close) {
                return self.flush();
            }
            if reader.buffer().is_empty() || self.out.len() >= FLUSH_AT {
                self.flush()?;
            }
        }
    }

    /// Fills `buf`. With a deadline (during the handshake) every read is
    /// bounded by the time left, so a peer dripping bytes cannot stretch
    /// the handshake past it; without one, the socket's stall timeout holds.
    fn read_exact_by(
        &self,
        reader: &mut BufReader<TcpStream>,
        buf: &mut [u8],
        deadline: Option<Instant>,
    ) -> io::Result<()> {
        let Some(deadline) = deadline else {
            return reader.read_exact(buf);
        };
        let mut pos = 0;
        while pos < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "handshake not completed in time",
                ));
            }
            // A zero socket timeout means "none": never pass one.
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            match reader.read(&mut buf[pos..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => pos += n,
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the handshake is done (idle connections are then fine).
    pub(crate) fn ready(&self) -> bool {
        matches!(self.phase, Phase::Ready(_))
    }

    /// Decodes a frame header; a bad one is answered with an error in `out`
    /// and `None`, after which the caller sends `out` and closes.
    pub(crate) fn header(&mut self, raw: &[u8; HEADER_LEN]) -> Option<Header> {
        match Header::decode(raw) {
            Ok(h) => Some(h),
            Err(e) => {
                let req_id = u64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
                self.error(req_id, ErrorCode::from(&e), &e.to_string());
                None
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut w = self.stream;
        let r = w.write_all(&self.out);
        self.out.clear();
        r
    }

    fn error(&mut self, req_id: u64, code: ErrorCode, message: &str) {
        self.state.metrics.error(code);
        encode_reply(
            &mut self.out,
            req_id,
            &Reply::Error {
                code: code as u16,
                message: message.to_string(),
            },
        );
    }

    /// Replies with an error; protocol violations also end the connection.
    fn fail(&mut self, req_id: u64, code: ErrorCode, message: &str) -> Next {
        if code.is_fatal() {
            warn!(conn = self.id, peer = %self.peer, "{}: {message}; dropping connection", code.label());
        }
        self.error(req_id, code, message);
        if code.is_fatal() {
            Next::Close
        } else {
            Next::Continue
        }
    }

    /// Handles one request frame, appending its reply to `out`.
    pub(crate) fn handle(&mut self, header: Header, payload: &[u8]) -> Next {
        let req_id = header.req_id;
        let req = match decode_request(header.op, payload) {
            Ok(r) => r,
            Err(e) => return self.fail(req_id, ErrorCode::from(&e), &e.to_string()),
        };
        let op = req.op();
        self.state.metrics.op(op);
        match (&self.phase, req) {
            (
                Phase::New,
                Request::Hello {
                    min_version,
                    max_version,
                    client_nonce,
                },
            ) => {
                let version = max_version.min(VERSION_MAX);
                if version < min_version.max(VERSION_MIN) {
                    let msg = format!("client speaks versions {min_version}..={max_version}, this node {VERSION_MIN}..={VERSION_MAX}");
                    return self.fail(req_id, ErrorCode::VersionMismatch, &msg);
                }
                let server_nonce = random_secret();
                let auth_required = self.state.cfg.token.is_some();
                encode_reply(
                    &mut self.out,
                    req_id,
                    &Reply::Challenge {
                        version,
                        auth_required,
                        server_nonce,
                    },
                );
                self.phase = Phase::Challenged {
                    server_nonce,
                    client_nonce,
                };
                Next::Continue
            }
            (
                Phase::Challenged {
                    server_nonce,
                    client_nonce,
                },
                Request::Auth { mac, resume },
            ) => {
                let (server_nonce, client_nonce) = (*server_nonce, *client_nonce);
                self.authenticate(req_id, &server_nonce, &client_nonce, &mac, resume)
            }
            (Phase::Ready(_), Request::Hello { .. } | Request::Auth { .. }) => {
                self.fail(req_id, ErrorCode::BadFrame, "handshake already completed")
            }
            (Phase::Ready(session), req) => {
                let session = session.clone();
                self.serve(req_id, &session, req)
            }
            (_, req) => {
                let msg = format!("{} before authentication", req.op().name());
                self.fail(req_id, ErrorCode::NotAuthenticated, &msg)
            }
        }
    }

    fn authenticate(
        &mut self,
        req_id: u64,
        server_nonce: &Secret,
        client_nonce: &Secret,
        mac: &Secret,
        resume: Option<(u64, Secret)>,
    ) -> Next {
        let server_mac = match &self.state.cfg.token {
            Some(token) => {
                if !secrets_equal(mac, &client_proof(token, server_nonce, client_nonce)) {
                    return self.fail(
                        req_id,
                        ErrorCode::AuthFailed,
                        "authentication failed: wrong token",
                    );
                }
                server_proof(token, client_nonce, server_nonce)
            }
            None => [0u8; 32],
        };
        let stream = match self.stream.try_clone() {
            Ok(s) => s,
            Err(e) => {
                return self.fail(
                    req_id,
                    ErrorCode::Internal,
                    &format!("cannot clone socket: {e}"),
                )
            }
        };
        let store = &self.state.store;
        let (session, resumed) = match resume {
            Some((sid, secret)) => match store.resume(sid, &secret, self.id, stream) {
                Ok(s) => (s, true),
                Err(e) => return self.fail(req_id, e.code, &e.message),
            },
            None => (store.create(self.id, stream), false),
        };
        info!(session = session.id, peer = %self.peer, resumed, "session ready");
        let welcome = Welcome {
            session_id: session.id,
            resume_secret: *session.secret(),
            server_mac,
            resumed,
            capacity: store.capacity(),
            used: store.used(),
        };
        encode_reply(&mut self.out, req_id, &Reply::Welcome(welcome));
        self.phase = Phase::Ready(session);
        Next::Continue
    }

    fn serve(&mut self, req_id: u64, session: &Session, req: Request<'_>) -> Next {
        let store = &self.state.store;
        let result: Result<Option<Reply<'_>>, StoreError> = match req {
            Request::Alloc { slab, size } => store
                .alloc(session, self.id, slab, size)
                .map(|_| Some(Reply::Done(Op::Alloc))),
            Request::Free { slab } => store
                .free(session, self.id, slab)
                .map(|_| Some(Reply::Done(Op::Free))),
            Request::Write { extents, data } => {
                store.write(session, self.id, &extents, data).map(|_| {
                    self.state
                        .metrics
                        .bytes_written
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    Some(Reply::Done(Op::Write))
                })
            }
            Request::Read { extents } => {
                // Append the data to the reply buffer straight from the
                // slabs: one copy, no zero-filled staging.
                let total: usize = extents.iter().map(|e| e.len as usize).sum();
                let at = begin_frame(&mut self.out, Op::Read as u8 | REPLY_BIT, req_id);
                match store.read(session, self.id, &extents, &mut self.out) {
                    Ok(()) => {
                        end_frame(&mut self.out, at);
                        self.state
                            .metrics
                            .bytes_read
                            .fetch_add(total as u64, Ordering::Relaxed);
                        Ok(None)
                    }
                    Err(e) => {
                        self.out.truncate(at);
                        Err(e)
                    }
                }
            }
            Request::Stat => store.session_figures(session, self.id).map(|f| {
                Some(Reply::Stat(StatReply {
                    capacity: store.capacity(),
                    used: store.used(),
                    session_slabs: f.slabs,
                    session_bytes: f.bytes,
                }))
            }),
            Request::Ping { payload } => Ok(Some(Reply::Pong(payload))),
            Request::RdmaConnect(peer) => self.state.rdma.connect(&peer).map(|(qp, me)| {
                // One queue pair per connection; a new one replaces it.
                self.qp = Some(qp);
                Some(Reply::RdmaAccept(me))
            }),
            Request::RdmaSlab { slab } => store
                .rdma_region(session, self.id, slab, &self.state.rdma)
                .map(|r| Some(Reply::RdmaSlab(r))),
            Request::CloseSession => {
                store.close(session);
                info!(session = session.id, "session closed by client");
                encode_reply(&mut self.out, req_id, &Reply::Done(Op::CloseSession));
                return Next::Close;
            }
            Request::Hello { .. } | Request::Auth { .. } => {
                unreachable!("handled by the handshake")
            }
        };
        match result {
            Ok(Some(reply)) => {
                encode_reply(&mut self.out, req_id, &reply);
                Next::Continue
            }
            Ok(None) => Next::Continue,
            Err(e) => self.fail(req_id, e.code, &e.message),
        }
    }
}
