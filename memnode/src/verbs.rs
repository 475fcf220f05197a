//! RDMA verbs (libibverbs through `rdma-sys`): the only module that calls
//! them, for the memory node (slabs as memory regions, a queue pair per
//! connection) and for the pager's RDMA transport (queue pairs, bounce
//! buffers, completions). Built with the `rdma` cargo feature.
//!
//! Conventions of the C library that this module hides: functions that
//! return an `int` return the error number itself (0 on success) and do
//! not set errno; functions that return a pointer return NULL and set
//! errno. A machine without RDMA devices is normal: `ibv_get_device_list`
//! returns NULL (ENOSYS when the kernel has no RDMA support at all), and
//! `Device::open` says so as `VerbsError::NoDevice`.

use std::ffi::{c_void, CStr};
use std::os::fd::RawFd;
use std::ptr::{null_mut, NonNull};
use std::sync::Arc;

use rdma_sys::*;
use thiserror::Error;

use crate::protocol::RdmaEndpoint;
pub use crate::rdma::DeviceConfig;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerbsError {
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    #[error("{call} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Call { call: &'static str, errno: i32 },
    #[error("RDMA work request failed: {0}")]
    Completion(String),
}

/// An int-returning verb: 0 or the error number.
fn check(call: &'static str, rc: i32) -> Result<(), VerbsError> {
    if rc == 0 {
        Ok(())
    } else {
        // A few providers return -1 and set errno instead.
        let errno = if rc < 0 { last_errno() } else { rc };
        Err(VerbsError::Call { call, errno })
    }
}

/// A pointer-returning verb: non-null, or errno.
fn non_null<T>(call: &'static str, p: *mut T) -> Result<NonNull<T>, VerbsError> {
    NonNull::new(p).ok_or_else(|| VerbsError::Call {
        call,
        errno: last_errno(),
    })
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// An open device with its protection domain and port address.
pub struct Device {
    ctx: NonNull<ibv_context>,
    pd: NonNull<ibv_pd>,
    name: String,
    port: u8,
    gid_index: u8,
    lid: u16,
    gid: [u8; 16],
    mtu: u8,
    max_rd_atomic: u8,
}

// SAFETY: libibverbs objects may be used from any thread (the library
// locks internally); `Device` only hands out the handles to verbs calls.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

/// The names of the RDMA devices here (empty when there are none).
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    with_device_list(|list| Ok(list.iter().map(|&d| device_name(d)).collect()))
}

fn device_name(d: *mut ibv_device) -> String {
    // SAFETY: `d` comes from a live device list.
    let p = unsafe { ibv_get_device_name(d) };
    // SAFETY: the name is a NUL-terminated string inside the device struct,
    // alive as long as the list.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// Runs `f` over the device list, which is freed afterwards.
fn with_device_list<R>(
    f: impl FnOnce(&[*mut ibv_device]) -> Result<R, VerbsError>,
) -> Result<R, VerbsError> {
    let mut n = 0i32;
    // SAFETY: `n` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut n) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        return Err(VerbsError::NoDevice(format!(
            "ibv_get_device_list: {e} (no RDMA support in this kernel, or no device)"
        )));
    }
    // SAFETY: the library returned an array of `n` device pointers.
    let devices = unsafe { std::slice::from_raw_parts(list, n.max(0) as usize) };
    let r = f(devices);
    // SAFETY: `list` came from ibv_get_device_list and is freed once; the
    // opened context (if any) stays valid after the list is freed.
    unsafe { ibv_free_device_list(list) };
    r
}

impl Device {
    pub fn open(cfg: &DeviceConfig) -> Result<Arc<Device>, VerbsError> {
        let port = cfg.port.max(1);
        let ctx = with_device_list(|devices| {
            let dev = devices
                .iter()
                .copied()
                .find(|&d| cfg.name.as_deref().is_none_or(|n| device_name(d) == n))
                .ok_or_else(|| {
                    VerbsError::NoDevice(match &cfg.name {
                        Some(n) => format!("no device named {n}"),
                        None => "the device list is empty".into(),
                    })
                })?;
            // SAFETY: `dev` is an entry of the live device list.
            non_null("ibv_open_device", unsafe { ibv_open_device(dev) })
                .map(|c| (c, device_name(dev)))
        })?;
        let (ctx, name) = ctx;
        // From here on, `partial` closes what was opened if a step fails.
        let partial = PartialDevice { ctx, pd: None };
        // SAFETY: `ctx` is an open device context.
        let pd = non_null("ibv_alloc_pd", unsafe { ibv_alloc_pd(ctx.as_ptr()) })?;
        let partial = PartialDevice {
            pd: Some(pd),
            ..partial
        };
        // SAFETY: plain-old-data out-structs, zeroed as the C API expects.
        let mut port_attr: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `port_attr` is a valid out-pointer.
        check("ibv_query_port", unsafe {
            ___ibv_query_port(ctx.as_ptr(), port, &mut port_attr)
        })?;
        // SAFETY: as above (a union of plain bytes).
        let mut gid: ibv_gid = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `gid` is a valid out-pointer.
        check("ibv_query_gid", unsafe {
            ibv_query_gid(ctx.as_ptr(), port, cfg.gid_index as i32, &mut gid)
        })?;
        // SAFETY: as above.
        let mut dev_attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: `ctx` is open; `dev_attr` is a valid out-pointer.
        check("ibv_query_device", unsafe {
            ibv_query_device(ctx.as_ptr(), &mut dev_attr)
        })?;
        std::mem::forget(partial);
        Ok(Arc::new(Device {
            ctx,
            pd,
            name,
            port,
            gid_index: cfg.gid_index,
            lid: port_attr.lid,
            // SAFETY: every bit pattern of the union is a valid byte array.
            gid: unsafe { gid.raw },
            mtu: port_attr.active_mtu as u8,
            max_rd_atomic: dev_attr.max_qp_rd_atom.clamp(1, 16) as u8,
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Registers `[addr, addr+len)` (memory this process owns and keeps
    /// mapped while the region lives); `remote` also lets peers read and
    /// write it. Registration pins the pages.
    pub fn register(
        self: &Arc<Self>,
        addr: *mut u8,
        len: usize,
        remote: bool,
    ) -> Result<MemoryRegion, VerbsError> {
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote {
            access = access
                | ibv_access_flags::IBV_ACCESS_REMOTE_READ
                | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: the caller owns the range and keeps it mapped for the
        // region's life (`MemoryRegion` is dropped before the memory).
        let mr = non_null("ibv_reg_mr", unsafe {
            ibv_reg_mr(self.pd.as_ptr(), addr.cast(), len, access.0 as i32)
        })?;
        Ok(MemoryRegion {
            mr,
            addr: addr as u64,
            len,
            _dev: Arc::clone(self),
        })
    }

    /// A reliable-connection queue pair with its own completion queue of
    /// `depth` entries and, when `events`, a completion channel to sleep on.
    pub fn queue_pair(self: &Arc<Self>, depth: u32, events: bool) -> Result<QueuePair, VerbsError> {
        let mut q = QueuePair {
            dev: Arc::clone(self),
            qp: None,
            cq: None,
            channel: None,
            psn: random_psn(),
        };
        if events {
            // SAFETY: the context is open.
            let ch = non_null("ibv_create_comp_channel", unsafe {
                ibv_create_comp_channel(self.ctx.as_ptr())
            })?;
            q.channel = Some(ch);
        }
        let channel = q.channel.map_or(null_mut(), |c| c.as_ptr());
        // SAFETY: the context is open; `channel` is null or ours.
        let cq = non_null("ibv_create_cq", unsafe {
            ibv_create_cq(self.ctx.as_ptr(), depth as i32, null_mut(), channel, 0)
        })?;
        q.cq = Some(cq);
        // SAFETY: plain-old-data, zeroed as the C API expects.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq.as_ptr();
        init.recv_cq = cq.as_ptr();
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_send_wr = depth;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        // SAFETY: the PD and CQ are live; `init` is fully set.
        let qp = non_null("ibv_create_qp", unsafe {
            ibv_create_qp(self.pd.as_ptr(), &mut init)
        })?;
        q.qp = Some(qp);
        Ok(q)
    }
}

/// Closes what `Device::open` opened when a later step fails.
struct PartialDevice {
    ctx: NonNull<ibv_context>,
    pd: Option<NonNull<ibv_pd>>,
}

impl Drop for PartialDevice {
    fn drop(&mut self) {
        if let Some(pd) = self.pd {
            // SAFETY: allocated by `Device::open`; nothing else holds it.
            unsafe { ibv_dealloc_pd(pd.as_ptr()) };
        }
        // SAFETY: opened by `Device::open`; its PD is gone (above).
        unsafe { ibv_close_device(self.ctx.as_ptr()) };
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Every region and queue pair holds an `Arc<Device>`, so they are
        // gone by now.
        drop(PartialDevice {
            ctx: self.ctx,
            pd: Some(self.pd),
        });
    }
}

fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::getrandom(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

/// A registered range; deregistered on drop.
pub struct MemoryRegion {
    mr: NonNull<ibv_mr>,
    pub addr: u64,
    pub len: usize,
    _dev: Arc<Device>,
}

// SAFETY: the handle is only passed to thread-safe verbs calls.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    pub fn lkey(&self) -> u32 {
        // SAFETY: the region is registered while `self` lives.
        unsafe { self.mr.as_ref().lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered by `Device::register`, deregistered once.
        let rc = unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(errno = rc, "ibv_dereg_mr failed");
        }
    }
}

/// One RDMA READ or WRITE between a local registered buffer and a remote
/// region.
#[derive(Debug, Clone, Copy)]
pub struct RdmaOp {
    pub write: bool,
    pub local: u64,
    pub lkey: u32,
    pub len: u32,
    pub remote: u64,
    pub rkey: u32,
}

/// A finished work request: its id and whether it succeeded.
#[derive(Debug, Clone)]
pub struct WorkDone {
    pub wr_id: u64,
    pub error: Option<String>,
}

/// A reliable-connection queue pair and its completion queue.
pub struct QueuePair {
    dev: Arc<Device>,
    qp: Option<NonNull<ibv_qp>>,
    cq: Option<NonNull<ibv_cq>>,
    channel: Option<NonNull<ibv_comp_channel>>,
    psn: u32,
}

// SAFETY: the handles are only passed to thread-safe verbs calls; posting
// and polling from different threads is allowed by libibverbs.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

impl QueuePair {
    fn qp(&self) -> *mut ibv_qp {
        self.qp.expect("queue pair created").as_ptr()
    }

    fn cq(&self) -> *mut ibv_cq {
        self.cq.expect("completion queue created").as_ptr()
    }

    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self) -> RdmaEndpoint {
        RdmaEndpoint {
            // SAFETY: the QP is live while `self` is.
            qpn: unsafe { (*self.qp()).qp_num },
            psn: self.psn,
            lid: self.dev.lid,
            gid: self.dev.gid,
            mtu: self.dev.mtu.clamp(1, 5),
        }
    }

    /// Moves the queue pair through INIT, RTR and RTS towards `peer`. When
    /// this returns, the peer may post to it (and it to the peer, once the
    /// peer has done the same).
    pub fn connect(&self, peer: &RdmaEndpoint) -> Result<(), VerbsError> {
        use ibv_qp_attr_mask as m;
        // SAFETY: plain-old-data, zeroed as the C API expects.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.dev.port;
        a.qp_access_flags = (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ibv_access_flags::IBV_ACCESS_REMOTE_READ
            | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
            .0;
        let mask = m::IBV_QP_STATE | m::IBV_QP_PKEY_INDEX | m::IBV_QP_PORT | m::IBV_QP_ACCESS_FLAGS;
        self.modify(&mut a, mask)?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = self.dev.mtu.min(peer.mtu) as ibv_mtu::Type;
        a.dest_qp_num = peer.qpn;
        a.rq_psn = peer.psn;
        a.max_dest_rd_atomic = self.dev.max_rd_atomic;
        a.min_rnr_timer = 12;
        a.ah_attr.dlid = peer.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.dev.port;
        if peer.gid != [0; 16] {
            // RoCE (and routed InfiniBand) address by GID.
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = ibv_gid { raw: peer.gid };
            a.ah_attr.grh.sgid_index = self.dev.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_AV
            | m::IBV_QP_PATH_MTU
            | m::IBV_QP_DEST_QPN
            | m::IBV_QP_RQ_PSN
            | m::IBV_QP_MAX_DEST_RD_ATOMIC
            | m::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut a, mask)?;

        // SAFETY: as above.
        let mut a: ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = ibv_qp_state::IBV_QPS_RTS;
        a.timeout = 14;
        a.retry_cnt = 7;
        a.rnr_retry = 7;
        a.sq_psn = self.psn;
        a.max_rd_atomic = self.dev.max_rd_atomic;
        let mask = m::IBV_QP_STATE
            | m::IBV_QP_TIMEOUT
            | m::IBV_QP_RETRY_CNT
            | m::IBV_QP_RNR_RETRY
            | m::IBV_QP_SQ_PSN
            | m::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut a, mask)
    }

    fn modify(&self, a: &mut ibv_qp_attr, mask: ibv_qp_attr_mask) -> Result<(), VerbsError> {
        // SAFETY: the QP is live; `a` is a fully initialised attribute set
        // for the fields named in `mask`.
        check("ibv_modify_qp", unsafe {
            ibv_modify_qp(self.qp(), a, mask.0 as i32)
        })
    }

    /// Posts `ops` as one chain. Only the last is signaled: a reliable
    /// connection completes in order, so its completion covers the chain,
    /// and a failure anywhere still produces an (error) completion.
    pub fn post(&self, ops: &[RdmaOp], wr_id: u64) -> Result<(), VerbsError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ibv_sge> = ops
            .iter()
            .map(|o| ibv_sge {
                addr: o.local,
                length: o.len,
                lkey: o.lkey,
            })
            .collect();
        // SAFETY: plain-old-data, zeroed as the C API expects.
        let mut wrs: Vec<ibv_send_wr> = ops.iter().map(|_| unsafe { std::mem::zeroed() }).collect();
        let n = ops.len();
        let wrs_ptr = wrs.as_mut_ptr();
        for (i, (o, wr)) in ops.iter().zip(wrs.iter_mut()).enumerate() {
            wr.wr_id = wr_id;
            wr.sg_list = &mut sges[i];
            wr.num_sge = 1;
            wr.opcode = if o.write {
                ibv_wr_opcode::IBV_WR_RDMA_WRITE
            } else {
                ibv_wr_opcode::IBV_WR_RDMA_READ
            };
            wr.wr.rdma = rdma_t {
                remote_addr: o.remote,
                rkey: o.rkey,
            };
            if i + 1 == n {
                wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            } else {
                // SAFETY: `i + 1 < n`, inside the vector, which is not
                // moved or resized while the chain is posted.
                wr.next = unsafe { wrs_ptr.add(i + 1) };
            }
        }
        let mut bad: *mut ibv_send_wr = null_mut();
        // SAFETY: the chain and its scatter lists live until the call
        // returns (the library copies them); buffers are registered.
        check("ibv_post_send", unsafe {
            ibv_post_send(self.qp(), wrs_ptr, &mut bad)
        })
    }

    /// Takes up to `out.len()` completions without waiting.
    pub fn poll(&self, max: usize, out: &mut Vec<WorkDone>) -> Result<usize, VerbsError> {
        // SAFETY: plain-old-data, zeroed as the C API expects.
        let mut wc: Vec<ibv_wc> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
        // SAFETY: the CQ is live; `wc` holds `max` entries.
        let n = unsafe { ibv_poll_cq(self.cq(), max as i32, wc.as_mut_ptr()) };
        if n < 0 {
            return Err(VerbsError::Call {
                call: "ibv_poll_cq",
                errno: -n,
            });
        }
        for w in &wc[..n as usize] {
            let error = (w.status != ibv_wc_status::IBV_WC_SUCCESS).then(|| {
                // SAFETY: returns a static string for any status value.
                let p = unsafe { ibv_wc_status_str(w.status) };
                // SAFETY: a static NUL-terminated string.
                let s = unsafe { CStr::from_ptr(p) };
                format!("{} (vendor error {:#x})", s.to_string_lossy(), w.vendor_err)
            });
            out.push(WorkDone {
                wr_id: w.wr_id,
                error,
            });
        }
        Ok(n as usize)
    }

    /// Asks for an event at the next completion (then poll once more before
    /// sleeping: one may have arrived meanwhile).
    pub fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: the CQ is live.
        check("ibv_req_notify_cq", unsafe {
            ibv_req_notify_cq(self.cq(), 0)
        })
    }

    /// The completion channel's descriptor, to poll(2) on (None without
    /// events).
    pub fn event_fd(&self) -> Option<RawFd> {
        // SAFETY: the channel is live while `self` is.
        self.channel.map(|c| unsafe { c.as_ref().fd })
    }

    /// Consumes the event that made `event_fd` readable.
    pub fn take_event(&self) -> Result<(), VerbsError> {
        let Some(ch) = self.channel else {
            return Ok(());
        };
        let mut cq: *mut ibv_cq = null_mut();
        let mut ctx: *mut c_void = null_mut();
        // SAFETY: the channel is live; out-pointers are valid.
        let rc = unsafe { ibv_get_cq_event(ch.as_ptr(), &mut cq, &mut ctx) };
        if rc != 0 {
            return Err(VerbsError::Call {
                call: "ibv_get_cq_event",
                errno: last_errno(),
            });
        }
        // SAFETY: acknowledges the one event just taken, on its own CQ.
        unsafe { ibv_ack_cq_events(cq, 1) };
        Ok(())
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // Each handle was created by `Device::queue_pair` and is destroyed
        // once, QP before CQ before channel as the API requires.
        if let Some(qp) = self.qp {
            // SAFETY: see above.
            unsafe { ibv_destroy_qp(qp.as_ptr()) };
        }
        if let Some(cq) = self.cq {
            // SAFETY: see above; its QP is gone.
            unsafe { ibv_destroy_cq(cq.as_ptr()) };
        }
        if let Some(ch) = self.channel {
            // SAFETY: see above; its CQ is gone.
            unsafe { ibv_destroy_comp_channel(ch.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_device_is_a_normal_answer_not_a_crash() {
        match Device::open(&DeviceConfig::default()) {
            Ok(d) => eprintln!("RDMA device {} present", d.name()),
            Err(VerbsError::NoDevice(why)) => {
                assert!(!why.is_empty());
                eprintln!("no RDMA device here: {why}");
            }
            Err(e) => panic!("opening the first device failed oddly: {e}"),
        }
    }

    #[test]
    fn int_verbs_return_the_errno() {
        assert_eq!(check("x", 0), Ok(()));
        assert_eq!(
            check("ibv_modify_qp", libc::EINVAL),
            Err(VerbsError::Call {
                call: "ibv_modify_qp",
                errno: libc::EINVAL
            })
        );
    }
}
