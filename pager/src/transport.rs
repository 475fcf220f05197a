//! Which transport reaches each memory node (`--transport`): RDMA where
//! this pager has a device and the node offers RDMA, TCP otherwise. A
//! machine without RDMA is the normal case, not an error: `auto` says why
//! it uses TCP, once per node, and `dmem stats` shows the choice.

use std::sync::Arc;

use dmem_memnode::client::ClientConfig;
use dmem_memnode::rdma::DeviceConfig;
use tracing::info;

use crate::remote::{RemoteError, TcpTransport, Transport};

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportMode {
    /// RDMA to nodes that offer it when this host has a device, else TCP.
    #[default]
    Auto,
    /// RDMA only: a node that cannot be reached over RDMA is an error.
    Rdma,
    /// TCP only.
    Tcp,
}

/// Connects to the node at `cc.addr` with the transport `mode` asks for.
pub fn connect(
    cc: ClientConfig,
    mode: TransportMode,
    dev: &DeviceConfig,
) -> Result<Arc<dyn Transport>, RemoteError> {
    let tcp = TcpTransport::connect(cc.clone())?;
    if mode == TransportMode::Tcp {
        return Ok(Arc::new(tcp));
    }
    match upgrade(tcp, &cc, dev) {
        Ok(t) => Ok(t),
        Err((tcp, why)) if mode == TransportMode::Auto => {
            info!(memnode = cc.addr, "using TCP: {why}");
            Ok(Arc::new(tcp))
        }
        Err((_, why)) => Err(RemoteError::Rdma(format!(
            "--transport rdma: memory node {}: {why}",
            cc.addr
        ))),
    }
}

#[cfg(feature = "rdma")]
fn upgrade(
    tcp: TcpTransport,
    cc: &ClientConfig,
    dev: &DeviceConfig,
) -> Result<Arc<dyn Transport>, (TcpTransport, String)> {
    crate::rdma::RdmaTransport::upgrade(tcp, cc, dev).map(|t| Arc::new(t) as Arc<dyn Transport>)
}

#[cfg(not(feature = "rdma"))]
fn upgrade(
    tcp: TcpTransport,
    _cc: &ClientConfig,
    _dev: &DeviceConfig,
) -> Result<Arc<dyn Transport>, (TcpTransport, String)> {
    Err((
        tcp,
        "this pager was built without RDMA support (cargo feature rdma)".into(),
    ))
}

/// Why this pager cannot use RDMA at all (built without it, or no device
/// here), or None when it can try. A node may still refuse.
pub fn rdma_unavailable_here() -> Option<String> {
    if !dmem_memnode::rdma::BUILT_WITH_RDMA {
        return Some("this pager was built without RDMA support (cargo feature rdma)".into());
    }
    #[cfg(feature = "rdma")]
    match dmem_memnode::verbs::device_names() {
        Ok(names) if !names.is_empty() => return None,
        Ok(_) => return Some("no RDMA device (the device list is empty)".into()),
        Err(e) => return Some(e.to_string()),
    }
    #[allow(unreachable_code)]
    None
}
