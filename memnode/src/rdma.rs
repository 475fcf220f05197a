//! RDMA on the memory node: whether it is offered, a queue pair per
//! connection (RDMA_CONNECT), and slabs registered as memory regions on
//! demand (RDMA_SLAB), so that a pager reads and writes them with one-sided
//! READ and WRITE while the node's CPU does nothing.
//!
//! The TCP connection stays the control channel (handshake, leases, stats)
//! and the fallback data path. Without the `rdma` cargo feature, or without
//! a device, both requests are refused with `NO_RDMA` and the reason, and
//! pagers use TCP.

use crate::protocol::{ErrorCode, RdmaEndpoint, RdmaRegion};
use crate::store::StoreError;
use crate::sys::SlabMem;
#[cfg(feature = "rdma")]
use crate::verbs;
#[cfg(feature = "rdma")]
use std::sync::Arc;

/// `--rdma`: offer RDMA when a device exists, always (fail to start
/// without one), or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RdmaMode {
    #[default]
    Auto,
    On,
    Off,
}

/// Which device, port and GID to use (`--rdma-device`, `--rdma-port`,
/// `--gid-index`, the same on the pager).
#[derive(Debug, Clone, Default)]
pub struct DeviceConfig {
    /// Device name (`rxe0`, `mlx5_0`); the first one when `None`.
    pub name: Option<String>,
    /// Port number (ports count from 1; 0 means 1).
    pub port: u8,
    /// GID table index (RoCE needs the right one: `show_gids` lists them).
    pub gid_index: u8,
}

/// The device flags of `dmem-memnode` and `dmem-pager`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// RDMA device to use (e.g. rxe0, mlx5_0); default: the first one.
    #[arg(long)]
    pub rdma_device: Option<String>,
    /// RDMA port number on the device.
    #[arg(long, default_value_t = 1)]
    pub rdma_port: u8,
    /// GID table index (RoCE: pick the RoCE v2 entry of the interface).
    #[arg(long, default_value_t = 0)]
    pub gid_index: u8,
}

impl DeviceArgs {
    pub fn config(&self) -> DeviceConfig {
        DeviceConfig {
            name: self.rdma_device.clone(),
            port: self.rdma_port,
            gid_index: self.gid_index,
        }
    }
}

/// Whether this build can speak RDMA at all.
pub const BUILT_WITH_RDMA: bool = cfg!(feature = "rdma");

/// The node's RDMA offer.
pub struct RdmaService {
    #[cfg(feature = "rdma")]
    device: Option<Arc<verbs::Device>>,
    /// Why RDMA is not offered (when it is not).
    why_not: String,
}

/// A connection's queue pair (dropped with the connection).
pub struct ConnQueuePair {
    #[cfg(feature = "rdma")]
    _qp: verbs::QueuePair,
}

/// A slab's memory region (dropped before the slab's memory).
pub struct SlabRegion {
    #[cfg(feature = "rdma")]
    _mr: verbs::MemoryRegion,
    region: RdmaRegion,
}

impl SlabRegion {
    pub fn region(&self) -> RdmaRegion {
        self.region
    }
}

fn no_rdma(why: &str) -> StoreError {
    StoreError {
        code: ErrorCode::NoRdma,
        message: why.to_string(),
    }
}

/// Queue depth of a node-side queue pair: it never posts, so this only
/// bounds the (unused) completion queue.
#[cfg(feature = "rdma")]
const NODE_QP_DEPTH: u32 = 16;

impl RdmaService {
    /// RDMA turned off.
    pub fn off() -> RdmaService {
        RdmaService {
            #[cfg(feature = "rdma")]
            device: None,
            why_not: "RDMA is turned off on this memory node (--rdma off)".into(),
        }
    }

    /// Opens the device per `mode`. Only `On` without a usable device is
    /// an error.
    pub fn start(mode: RdmaMode, dev: &DeviceConfig) -> Result<RdmaService, String> {
        if mode == RdmaMode::Off {
            return Ok(RdmaService::off());
        }
        let why_not = match Self::open(dev) {
            Ok(s) => return Ok(s),
            Err(why) => why,
        };
        if mode == RdmaMode::On {
            return Err(format!("--rdma on: {why_not}"));
        }
        Ok(RdmaService {
            #[cfg(feature = "rdma")]
            device: None,
            why_not,
        })
    }

    #[cfg(feature = "rdma")]
    fn open(dev: &DeviceConfig) -> Result<RdmaService, String> {
        let d = verbs::Device::open(dev).map_err(|e| e.to_string())?;
        tracing::info!(device = d.name(), "RDMA offered to pagers");
        Ok(RdmaService {
            device: Some(d),
            why_not: String::new(),
        })
    }

    #[cfg(not(feature = "rdma"))]
    fn open(_dev: &DeviceConfig) -> Result<RdmaService, String> {
        Err("this memory node was built without RDMA support (cargo feature rdma)".into())
    }

    /// The device's name when RDMA is offered, else why not.
    pub fn status(&self) -> Result<String, String> {
        #[cfg(feature = "rdma")]
        if let Some(d) = &self.device {
            return Ok(d.name().to_string());
        }
        Err(self.why_not.clone())
    }

    /// NO_RDMA with the reason, unless RDMA is offered.
    pub fn check(&self) -> Result<(), StoreError> {
        self.status().map(drop).map_err(|why| no_rdma(&why))
    }

    /// RDMA_CONNECT: a queue pair connected to the pager's, and its
    /// endpoint for the reply (the pager may post once it has the reply).
    pub fn connect(
        &self,
        peer: &RdmaEndpoint,
    ) -> Result<(ConnQueuePair, RdmaEndpoint), StoreError> {
        #[cfg(feature = "rdma")]
        if let Some(d) = &self.device {
            let internal = |e: verbs::VerbsError| StoreError {
                code: ErrorCode::Internal,
                message: format!("RDMA connect: {e}"),
            };
            let qp = d.queue_pair(NODE_QP_DEPTH, false).map_err(internal)?;
            qp.connect(peer).map_err(internal)?;
            let me = qp.endpoint();
            return Ok((ConnQueuePair { _qp: qp }, me));
        }
        let _ = peer;
        Err(no_rdma(&self.why_not))
    }

    /// RDMA_SLAB: registers a slab's memory for remote reads and writes.
    /// This pins it: an RDMA node's slabs are resident once registered.
    pub fn register(&self, mem: &SlabMem) -> Result<SlabRegion, StoreError> {
        #[cfg(feature = "rdma")]
        if let Some(d) = &self.device {
            let mr = d
                .register(mem.base(), mem.len(), true)
                .map_err(|e| StoreError {
                    code: ErrorCode::Full,
                    message: format!("cannot register the slab for RDMA: {e}"),
                })?;
            let region = RdmaRegion {
                addr: mr.addr,
                rkey: mr.rkey(),
                len: mr.len as u64,
            };
            return Ok(SlabRegion { _mr: mr, region });
        }
        let _ = mem;
        Err(no_rdma(&self.why_not))
    }
}
