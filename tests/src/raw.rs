//! A hand-driven protocol connection: sends arbitrary bytes and frames
//! (including malformed ones) and checks exactly what the node answers.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};

use dmem_memnode::auth::{client_proof, random_secret, secrets_equal, server_proof};
use dmem_memnode::protocol::{
    decode_reply, encode_request, ErrorCode, Header, Reply, Request, Secret, Welcome, HEADER_LEN,
    MAGIC, OP_ERROR, VERSION_MAX, VERSION_MIN,
};

use crate::HANG_GUARD;

/// A 16-byte frame header with every field under the caller's control.
pub fn header(magic: u16, op: u8, flags: u8, len: u32, req_id: u64) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..2].copy_from_slice(&magic.to_le_bytes());
    b[2] = op;
    b[3] = flags;
    b[4..8].copy_from_slice(&len.to_le_bytes());
    b[8..16].copy_from_slice(&req_id.to_le_bytes());
    b
}

/// A well-formed header followed by `payload` (whatever it holds).
pub fn frame(op: u8, req_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut f = header(MAGIC, op, 0, payload.len() as u32, req_id).to_vec();
    f.extend_from_slice(payload);
    f
}

/// One reply frame as received.
#[derive(Debug)]
pub struct RawReply {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl RawReply {
    pub fn decode(&self) -> Reply<'_> {
        decode_reply(self.header.op, &self.payload)
            .unwrap_or_else(|e| panic!("node sent an undecodable reply {self:?}: {e}"))
    }

    /// The error code and message, if this is an ERROR frame.
    pub fn error(&self) -> Option<(ErrorCode, String)> {
        if self.header.op != OP_ERROR {
            return None;
        }
        match self.decode() {
            Reply::Error { code, message } => Some((
                ErrorCode::from_u16(code)
                    .unwrap_or_else(|| panic!("unknown error code {code} ({message})")),
                message,
            )),
            other => panic!("OP_ERROR decoded as {other:?}"),
        }
    }
}

pub struct RawConn {
    stream: TcpStream,
    peer: SocketAddr,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(HANG_GUARD))
            .expect("set timeout");
        stream.set_nodelay(true).expect("nodelay");
        RawConn { stream, peer: addr }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("send to {}: {e}", self.peer));
    }

    /// Sends bytes; a node that already hung up may refuse them.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_request(&mut self, req_id: u64, req: &Request<'_>) {
        let mut f = Vec::new();
        encode_request(&mut f, req_id, req);
        self.send(&f);
    }

    /// Half-closes the sending side (the node sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
    }

    /// Receives one frame; panics on EOF, timeout or a bad header.
    pub fn recv(&mut self) -> RawReply {
        self.try_recv()
            .unwrap_or_else(|e| panic!("expected a reply frame from {}, got: {e}", self.peer))
    }

    pub fn try_recv(&mut self) -> std::io::Result<RawReply> {
        let mut raw = [0u8; HEADER_LEN];
        self.stream.read_exact(&mut raw)?;
        let header = Header::decode(&raw)
            .unwrap_or_else(|e| panic!("node sent a bad header {raw:02x?}: {e}"));
        let mut payload = vec![0u8; header.len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(RawReply { header, payload })
    }

    /// Receives an ERROR frame for `req_id` with `code`; returns its message.
    #[track_caller]
    pub fn expect_error(&mut self, req_id: u64, code: ErrorCode) -> String {
        let r = self.recv();
        let (got, message) = r
            .error()
            .unwrap_or_else(|| panic!("expected error {code:?}, got {:?}", r.decode()));
        assert_eq!(got, code, "error code (message: {message:?})");
        assert_eq!(r.header.req_id, req_id, "error reply's req_id");
        assert!(!message.is_empty(), "error replies carry a message");
        message
    }

    /// Asserts the node closed the connection: the next read sees EOF (or a
    /// reset), not data and not a timeout.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let mut buf = [0u8; 64];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            Ok(n) => panic!(
                "expected the node to close the connection, got {n} more bytes: {:02x?}",
                &buf[..n]
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("node kept the connection open ({HANG_GUARD:?} without EOF)")
            }
            Err(e) => panic!("expected EOF, got error {e}"),
        }
    }

    /// Sends HELLO and returns the challenge (auth_required, server nonce).
    pub fn hello(&mut self, client_nonce: &Secret) -> (bool, Secret) {
        self.send_request(
            1,
            &Request::Hello {
                min_version: VERSION_MIN,
                max_version: VERSION_MAX,
                client_nonce: *client_nonce,
            },
        );
        let r = self.recv();
        match r.decode() {
            Reply::Challenge {
                version,
                auth_required,
                server_nonce,
            } => {
                assert!((VERSION_MIN..=VERSION_MAX).contains(&version));
                (auth_required, server_nonce)
            }
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// HELLO + AUTH (optionally resuming); returns the welcome, having
    /// checked the node's proof when a token is used.
    pub fn handshake(&mut self, token: Option<&[u8]>, resume: Option<(u64, Secret)>) -> Welcome {
        let client_nonce = random_secret();
        let (auth_required, server_nonce) = self.hello(&client_nonce);
        assert_eq!(auth_required, token.is_some(), "node's auth_required flag");
        let mac = token.map_or([0u8; 32], |t| client_proof(t, &server_nonce, &client_nonce));
        self.send_request(2, &Request::Auth { mac, resume });
        let r = self.recv();
        match r.decode() {
            Reply::Welcome(w) => {
                if let Some(t) = token {
                    assert!(secrets_equal(
                        &w.server_mac,
                        &server_proof(t, &client_nonce, &server_nonce)
                    ));
                }
                w
            }
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// A PING round trip works on this connection.
    #[track_caller]
    pub fn assert_usable(&mut self, req_id: u64) {
        self.send_request(
            req_id,
            &Request::Ping {
                payload: b"still there?",
            },
        );
        let r = self.recv();
        assert_eq!(r.header.req_id, req_id);
        match r.decode() {
            Reply::Pong(p) => assert_eq!(p, b"still there?"),
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}
