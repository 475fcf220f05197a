//! Remote memory: the transport trait (shaped like one-sided RDMA: read or
//! write bytes at region+offset, batched, completion later) and its TCP
//! implementation over the memory-node client. Where pages go on the nodes
//! is `placement`'s business.

use std::net::{TcpStream, ToSocketAddrs};

use dmem_memnode::client::{Client, ClientConfig, ClientError, Pending};
use dmem_memnode::protocol::Extent;
use thiserror::Error;

use crate::placement::PROBE_CONNECT;

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
    #[error("a {0} transport cannot open a new session with a node that lost ours")]
    Renew(&'static str),
    #[error("a slot has {0} live replicas of the {1} required (a node was lost meanwhile)")]
    TooFewReplicas(usize, usize),
}

/// A request in flight; `wait` fills `out` (reads) or just acknowledges.
pub trait Completion: Send {
    fn wait(self: Box<Self>, out: &mut [u8]) -> Result<(), RemoteError>;
    /// Gives the request up: its reply is not wanted. A transport whose
    /// reply could still land in a buffer it reuses settles that first.
    fn abandon(self: Box<Self>) {}
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
    /// Starts a new, empty session with a node that lost ours, so that it
    /// can take pages again.
    fn renew(&self) -> Result<(), RemoteError> {
        Err(RemoteError::Renew(self.kind()))
    }
    /// The node's id of the session in use, where the transport knows it.
    fn session(&self) -> Option<u64> {
        None
    }
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
    fn renew(&self) -> Result<(), RemoteError> {
        Ok(self.client.renew()?)
    }
    fn session(&self) -> Option<u64> {
        Some(self.client.session_id())
    }
}

/// Checksum of a page as written back and verified on fetch.
pub fn checksum(page: &[u8]) -> u32 {
    crc32c::crc32c(page)
}
