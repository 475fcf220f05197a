//! The app side of a pager session: what libdmem.so does at load, and what
//! the test harness does to stand in for it. Reserves the managed arena,
//! opens a userfaultfd and registers the arena (missing + write-protect
//! faults), hands the uffd to the pager with the arena layout, keeps its own
//! copy of the uffd open (if the last copy closed, the kernel would
//! unregister the arena and evicted pages would read as zeros), and runs the
//! agent thread that carries out evictions.
//!
//! The agent moves victims out of the arena with `UFFDIO_MOVE` into a
//! buffer of its own ([`MoveOut`]); where that fails it copies them with
//! `process_vm_readv` on its own process (a victim the app unmapped
//! meanwhile yields EFAULT instead of a crash) and drops them with
//! `MADV_DONTNEED`. It never touches managed memory otherwise. When the pager reports that data is lost, or the pager dies,
//! the agent stops the program with a message: silent zeros are never an
//! option.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use thiserror::Error;
use userfaultfd::{FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::sys::{self, Mapping, PAGE};
use crate::wire::{self, EvictStatus, Msg, Register, Welcome, MAX_MSG, NO_COPY};

#[derive(Debug, Error)]
pub enum AppError {
    #[error("cannot reserve a {0}-byte arena: {1}")]
    Arena(usize, Errno),
    #[error("cannot set up userfaultfd: {0} (root, or access to /dev/userfaultfd, is needed)")]
    Uffd(userfaultfd::Error),
    #[error("cannot reach the pager at {path}: {source}")]
    Connect { path: PathBuf, source: Errno },
    #[error("talking to the pager: {0}")]
    Io(Errno),
    #[error("the pager refused the session: {0}")]
    Refused(String),
    #[error("the pager sent an unexpected reply: {0}")]
    Protocol(String),
}

/// A forked child's parent session and fork snapshot (zeros: not a child).
#[derive(Debug, Clone, Copy, Default)]
struct ForkOrigin {
    session: u64,
    snapshot: u64,
}

/// Where and how to attach.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub socket: PathBuf,
    /// Bytes of managed address space to reserve.
    pub arena_len: usize,
    /// Requested local limit in bytes (0 = the pager's default).
    pub local_limit: u64,
    /// Called on the agent thread after each eviction batch is answered,
    /// with the victims' addresses in ascending order (libdmem drops the
    /// freed blocks it keeps for reuse that the batch reached).
    pub on_evicted: Option<fn(&[u64])>,
}

/// A live session: the arena stays registered for the life of the process.
pub struct AppSession {
    base: u64,
    len: usize,
    welcome: Welcome,
    socket: PathBuf,
    agent_fd: RawFd,
    uffd: Uffd,
    _agent: JoinHandle<()>,
}

/// Opens a SOCK_SEQPACKET connection to the pager socket.
pub fn connect_pager(path: &Path) -> Result<OwnedFd, AppError> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(AppError::Io)?;
    let addr = UnixAddr::new(path).map_err(AppError::Io)?;
    connect(fd.as_raw_fd(), &addr).map_err(|source| AppError::Connect {
        path: path.to_owned(),
        source,
    })?;
    // Whoever listens there gets this program's memory: only a pager run
    // by root or by this user (another user could have made the socket's
    // directory, e.g. under /tmp, and put a socket of theirs in it).
    let (_, uid) = sys::peer_cred(fd.as_fd()).map_err(AppError::Io)?;
    let me = nix::unistd::geteuid().as_raw();
    if uid != 0 && uid != me {
        return Err(AppError::Refused(format!(
            "the pager on {} runs as uid {uid}, neither root nor this user ({me}): \
             not handing it this program's memory",
            path.display()
        )));
    }
    Ok(fd)
}

/// Receives and decodes one message (`None` when the peer closed).
pub fn recv_msg(sock: &OwnedFd, buf: &mut [u8]) -> Result<(Option<Msg>, Vec<OwnedFd>), AppError> {
    let (n, fds) = sys::recv_with_fds(sock.as_raw_fd(), buf).map_err(AppError::Io)?;
    if n == 0 {
        return Ok((None, fds));
    }
    let m = wire::decode(&buf[..n]).map_err(|e| AppError::Protocol(e.to_string()))?;
    Ok((Some(m), fds))
}

impl AppSession {
    /// Reserves the arena, registers it and hands it to the pager.
    pub fn attach(cfg: &AppConfig) -> Result<AppSession, AppError> {
        let len = cfg.arena_len.div_ceil(PAGE) * PAGE;
        let arena = Mapping::anonymous(len).map_err(|e| AppError::Arena(len, e))?;
        let _ = sys::no_huge_pages(arena.addr(), len);
        let s = Self::start(cfg, arena.addr(), len, ForkOrigin::default())?;
        // The session owns the arena now: it stays mapped for the process.
        let _ = arena.leak();
        Ok(s)
    }

    /// In a forked child (single-threaded, in its atfork handler): takes
    /// the arena inherited with `parent` (the parent's session, as copied
    /// by fork) under a new session of its own. The child's copy of the
    /// parent's registration is gone (plain fork), so the arena is
    /// registered again; the pages present in it are the child's data,
    /// which the pager finds in its page tables, and those that were out of
    /// the parent come from the fork snapshot named by `snapshot` (the key
    /// in the parent's `Held`; 0: none, the parent brought them back).
    /// Nothing may touch the arena until this returns, and the parent's
    /// hold on evictions must last until then (the pager reads the
    /// parent's page state as at the fork).
    pub fn adopt(
        cfg: &AppConfig,
        parent: &AppSession,
        snapshot: u64,
    ) -> Result<AppSession, AppError> {
        let origin = ForkOrigin {
            session: parent.session_id(),
            snapshot,
        };
        Self::start(cfg, parent.base, parent.len, origin)
    }

    /// Opens and registers the uffd over `[base, base+len)`, starts the
    /// agent and hands both to the pager.
    fn start(
        cfg: &AppConfig,
        base: u64,
        len: usize,
        origin: ForkOrigin,
    ) -> Result<AppSession, AppError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::EVENT_REMOVE
                    | FeatureFlags::EVENT_UNMAP
                    | FeatureFlags::EVENT_REMAP
                    | FeatureFlags::THREAD_ID
                    | FeatureFlags::PAGEFAULT_FLAG_WP,
            )
            .create()
            .map_err(AppError::Uffd)?;
        uffd.register_with_mode(
            base as *mut libc::c_void,
            len,
            RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
        )
        .map_err(AppError::Uffd)?;
        let sock = std::sync::Arc::new(connect_pager(&cfg.socket)?);
        let agent_fd = sock.as_raw_fd();
        let watched = std::sync::Arc::clone(&sock);

        // The agent announces its own tid, so it starts first and waits for
        // the welcome on a channel.
        let (tx, rx) = std::sync::mpsc::channel();
        let reg_uffd = uffd.as_raw_fd();
        let limit = cfg.local_limit;
        let on_evicted = cfg.on_evicted;
        let agent = std::thread::Builder::new()
            .name("dmem-agent".into())
            .spawn(move || {
                let r = handshake(&sock, reg_uffd, (base, len), limit, origin);
                match r {
                    Ok((welcome, staging)) => {
                        let _ = tx.send(Ok(welcome));
                        // The agent itself may be stuck in a fault or a
                        // DONTNEED that only the pager can complete: a
                        // separate thread watches for the pager's death.
                        let _ = std::thread::Builder::new()
                            .name("dmem-watchdog".into())
                            .spawn(move || watchdog(&watched));
                        agent_loop(&sock, &staging, on_evicted);
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| AppError::Io(Errno::from_raw(e.raw_os_error().unwrap_or(0))))?;
        let welcome = rx
            .recv()
            .map_err(|_| AppError::Protocol("agent exited during handshake".into()))??;
        Ok(AppSession {
            base,
            len,
            welcome,
            socket: cfg.socket.clone(),
            agent_fd,
            uffd,
            _agent: agent,
        })
    }

    /// Stops the pager from evicting this process's pages until the
    /// returned connection closes (see `wire::Msg::Hold`). Returns the
    /// connection and how many pages are out of the process.
    pub fn hold(&self) -> Result<(OwnedFd, u64), AppError> {
        let conn = connect_pager(&self.socket)?;
        let msg = wire::encode(&Msg::Hold {
            session: self.welcome.session,
        });
        match request(&conn, &msg)? {
            Msg::Held { pages_out } => Ok((conn, pages_out)),
            other => Err(AppError::Protocol(format!("{other:?}"))),
        }
    }

    /// On a hold connection from `hold`, once nothing changes managed
    /// memory until the fork: asks the pager to keep the pages out of the
    /// process for the forked child. Returns the snapshot's key, which
    /// the child passes to `adopt`.
    pub fn snapshot_for_fork(&self, hold: &OwnedFd) -> Result<u64, AppError> {
        match request(hold, &wire::encode(&Msg::Snapshot))? {
            Msg::Snapshotted { key } => Ok(key),
            other => Err(AppError::Protocol(format!("{other:?}"))),
        }
    }

    /// Registers `[start, start+len)` of the arena again, after the shim
    /// put a fresh mapping there (a program's own mapping placed over
    /// managed memory was unmapped): the kernel dropped the registration
    /// with the old mapping. The pager knows these pages as zero already
    /// (it saw the UNMAP event).
    pub fn register_again(&self, start: u64, len: usize) -> Result<(), AppError> {
        let _ = sys::no_huge_pages(start, len);
        self.uffd
            .register_with_mode(
                start as *mut libc::c_void,
                len,
                RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
            )
            .map(|_| ())
            .map_err(AppError::Uffd)
    }

    /// Descriptors a forked child inherits and must close: the uffd copy
    /// and the agent channel (both belong to the parent's session).
    pub fn inherited_fds(&self) -> [RawFd; 2] {
        [self.uffd.as_raw_fd(), self.agent_fd]
    }

    pub fn arena_ptr(&self) -> *mut u8 {
        self.base as *mut u8
    }

    pub fn arena_len(&self) -> usize {
        self.len
    }

    pub fn session_id(&self) -> u64 {
        self.welcome.session
    }

    /// The local limit the pager applies to this process.
    pub fn local_limit(&self) -> u64 {
        self.welcome.local_limit
    }

    /// Transfer unit of the pager.
    pub fn block(&self) -> u32 {
        self.welcome.block
    }
}

fn handshake(
    sock: &OwnedFd,
    uffd: i32,
    (base, len): (u64, usize),
    local_limit: u64,
    origin: ForkOrigin,
) -> Result<(Welcome, Mapping), AppError> {
    let reg = Msg::Register(Register {
        pid: std::process::id(),
        agent_tid: sys::gettid() as u32,
        arena_base: base,
        arena_len: len as u64,
        local_limit,
        forked_from: origin.session,
        fork_snapshot: origin.snapshot,
    });
    sys::send_with_fds(sock.as_raw_fd(), &wire::encode(&reg), &[uffd]).map_err(AppError::Io)?;
    let mut buf = vec![0u8; MAX_MSG];
    match recv_msg(sock, &mut buf)? {
        (Some(Msg::Welcome(w)), fds) if fds.len() == 1 => {
            let staging =
                Mapping::shared(fds[0].as_fd(), w.staging_len as usize).map_err(AppError::Io)?;
            Ok((w, staging))
        }
        (Some(Msg::Refused(why)), _) => Err(AppError::Refused(why)),
        (None, _) => Err(AppError::Protocol("pager closed the connection".into())),
        (Some(other), _) => Err(AppError::Protocol(format!("{other:?}"))),
    }
}

/// Sends `msg` on `conn` and returns the answer; a refusal or a closed
/// connection is an error.
pub(crate) fn request(conn: &OwnedFd, msg: &[u8]) -> Result<Msg, AppError> {
    sys::send_with_fds(conn.as_raw_fd(), msg, &[]).map_err(AppError::Io)?;
    let mut buf = vec![0u8; MAX_MSG];
    match recv_msg(conn, &mut buf)? {
        (Some(Msg::Refused(why)), _) => Err(AppError::Refused(why)),
        (None, _) => Err(AppError::Protocol("pager closed the connection".into())),
        (Some(m), _) => Ok(m),
    }
}

/// Aborts the program when the pager's end of the socket closes.
fn watchdog(sock: &OwnedFd) {
    loop {
        match sys::wait_hangup(sock.as_raw_fd()) {
            Ok(true) => {
                // A pager that stops the app says why, then closes: the
                // agent may not have read that yet, and its reason is the
                // one to give.
                let mut buf = vec![0u8; MAX_MSG];
                if let Some(n) = sys::peek_message(sock.as_raw_fd(), &mut buf) {
                    if let Ok(Msg::Fatal(why)) = wire::decode(&buf[..n]) {
                        die(&why);
                    }
                }
                die(
                    "the pager closed its connection (pager died?); stopping this program, \
                     whose evicted memory can no longer be served",
                )
            }
            Ok(false) | Err(Errno::EINTR) => continue,
            Err(e) => die(&format!("cannot watch the pager connection ({e})")),
        }
    }
}

/// Stops the program: the pager cannot serve its memory any more.
fn die(msg: &str) -> ! {
    eprintln!("dmem: {msg}");
    std::process::abort();
}

fn agent_loop(sock: &OwnedFd, staging: &Mapping, on_evicted: Option<fn(&[u64])>) {
    let mut buf = vec![0u8; MAX_MSG];
    let mut page = vec![0u8; PAGE];
    let out = MoveOut::new();
    loop {
        let msg = match recv_msg(sock, &mut buf) {
            Ok((Some(m), _)) => m,
            Ok((None, _)) => die(
                "the pager closed its connection (pager died?); stopping this program, \
                 whose evicted memory can no longer be served",
            ),
            Err(AppError::Io(Errno::EINTR)) => continue,
            Err(e) => die(&format!("lost the pager ({e}); stopping this program")),
        };
        match msg {
            Msg::Evict { batch, entries } => {
                let status = evict(&entries, staging, out.as_ref(), &mut page);
                // Before the answer: a block dropped here is the app
                // freeing victims, and its REMOVE then always reaches the
                // pager while they are in flight. After the answer it
                // could come before or after the pager settled the batch,
                // and a victim reported `unmapped` whose REMOVE came first
                // was made resident again though the drop had emptied it.
                if let Some(f) = on_evicted {
                    let mut victims: Vec<u64> = entries.iter().map(|e| e.addr).collect();
                    victims.sort_unstable();
                    f(&victims);
                }
                let reply = wire::encode(&Msg::Evicted { batch, status });
                if let Err(e) = sys::send_with_fds(sock.as_raw_fd(), &reply, &[]) {
                    die(&format!(
                        "cannot answer the pager ({e}); stopping this program"
                    ));
                }
                if let Some(o) = &out {
                    o.clear(entries.len());
                }
            }
            Msg::Fatal(why) => die(&why),
            other => die(&format!("unexpected message from the pager: {other:?}")),
        }
    }
}

/// The agent's eviction buffer: victims are moved into it with UFFDIO_MOVE
/// (one ioctl per contiguous run, no copy), copied to staging from there,
/// and dropped from it with one MADV_DONTNEED. It is registered with a
/// userfaultfd of its own that reports no events, so unlike a
/// MADV_DONTNEED of the arena, which waits for the pager's uffd reader to
/// see its REMOVE event, nothing waits for the pager.
struct MoveOut {
    uffd: OwnedFd,
    buf: Mapping,
}

impl MoveOut {
    /// None where the kernel has no UFFDIO_MOVE (before 6.8): then every
    /// victim takes the copy-and-DONTNEED path.
    fn new() -> Option<MoveOut> {
        let len = wire::MAX_BATCH * PAGE;
        let buf = Mapping::anonymous(len).ok()?;
        let _ = sys::no_huge_pages(buf.addr(), len);
        let uffd = sys::uffd_for_moves(buf.addr(), len).ok()?;
        Some(MoveOut { uffd, buf })
    }

    /// Moves `entries[i..j]` (contiguous in the arena) to the same
    /// positions of the buffer; returns how many pages, from `i`, moved.
    /// The rest could not be (shared with a forked child, a hole).
    fn take(&self, entries: &[wire::EvictEntry], i: usize, j: usize) -> usize {
        let dst = self.buf.addr() + (i * PAGE) as u64;
        let (moved, _) =
            sys::uffd_move(self.uffd.as_raw_fd(), dst, entries[i].addr, (j - i) * PAGE);
        moved / PAGE
    }

    /// Whether entry `k` is in the buffer and gone from the arena (the
    /// buffer is empty at the start of every batch). Swapped-out pages
    /// count as there: a move takes a swapped-out page as its swap entry,
    /// and with swap active a move was seen to fail with EEXIST on its
    /// retry of a page it had in fact moved (the page was then read in
    /// place, faulted, and its data lost; 2026-12-06).
    fn moved_unreported(&self, entries: &[wire::EvictEntry], k: usize) -> bool {
        let here = self.buf.addr() + (k * PAGE) as u64;
        sys::page_occupied(here) == Some(true) && sys::page_occupied(entries[k].addr) == Some(false)
    }

    /// Page `k` of the buffer, which must have been moved in.
    fn page(&self, k: usize) -> &[u8] {
        sys::mapping_bytes(&self.buf, k * PAGE, PAGE)
    }

    /// Empties the first `n` pages, ready for the next batch (a move needs
    /// an empty destination). Nothing reads them before they are moved in
    /// again: an access would wait forever on a uffd nobody serves.
    fn clear(&self, n: usize) {
        let _ = sys::dontneed(self.buf.addr(), n * PAGE);
    }
}

/// Carries out one eviction batch (entries in address order): contiguous
/// runs are moved out, or where that fails copied out and dropped if
/// frozen (write-protected), else left alone (`Kept`): copying a page the
/// app may still be writing and then dropping it could lose a write.
fn evict(
    entries: &[wire::EvictEntry],
    staging: &Mapping,
    out: Option<&MoveOut>,
    page: &mut [u8],
) -> Vec<EvictStatus> {
    let mut status = vec![EvictStatus::Done; entries.len()];
    let mut i = 0;
    while i < entries.len() {
        let j = run_end(entries, i);
        let mut moved = 0;
        if let Some(o) = out {
            moved = o.take(entries, i, j);
            // A move that stops early may have taken more pages than it
            // reports: a page gone from the arena and found in the buffer
            // was moved. Read in place, it would fault and be served as
            // zeros, and the victim's data lost (seen 2026-12-06: wrong
            // GEMM results exactly in the runs with an agent fault).
            while i + moved < j && o.moved_unreported(entries, i + moved) {
                moved += 1;
            }
            for k in i..i + moved {
                if entries[k].slot != NO_COPY {
                    sys::mapping_write(staging, entries[k].slot as usize * PAGE, o.page(k));
                }
                status[k] = EvictStatus::Moved;
            }
        }
        let mut rest = i + moved..j;
        if let Some(k) = rest.clone().find(|&k| !entries[k].frozen) {
            // From its first page that is not frozen on, the rest of the
            // run stays (the pager freezes those pages and asks again).
            for s in &mut status[k..j] {
                *s = EvictStatus::Kept;
            }
            rest = rest.start..k;
        }
        for k in rest.clone() {
            if entries[k].slot != NO_COPY {
                match sys::read_own_memory(entries[k].addr, page) {
                    Ok(()) => sys::mapping_write(staging, entries[k].slot as usize * PAGE, page),
                    Err(_) => status[k] = EvictStatus::Unmapped,
                }
            }
        }
        drop_pages(&entries[rest.clone()], &mut status[rest]);
        i = j;
    }
    status
}

/// End of the run of contiguous entries starting at `i`.
fn run_end(entries: &[wire::EvictEntry], i: usize) -> usize {
    let mut j = i + 1;
    while j < entries.len() && entries[j].addr == entries[j - 1].addr + PAGE as u64 {
        j += 1;
    }
    j
}

/// `MADV_DONTNEED` over runs of contiguous victims; a run that fails (the
/// app unmapped part of it) is retried page by page. Victims that could not
/// be read (`Unmapped`) are never dropped: the app moved them away before
/// they were read, and if it moved them back meanwhile, dropping them here
/// would destroy their only copy.
fn drop_pages(entries: &[wire::EvictEntry], status: &mut [EvictStatus]) {
    let keep = |k: usize, status: &[EvictStatus]| status[k] == EvictStatus::Unmapped;
    let mut i = 0;
    while i < entries.len() {
        if keep(i, status) {
            i += 1;
            continue;
        }
        let end = run_end(entries, i);
        let j = (i + 1..end).find(|&k| keep(k, status)).unwrap_or(end);
        if sys::dontneed(entries[i].addr, (j - i) * PAGE).is_err() {
            // The call dropped what was mapped before it failed (a hole:
            // ENOMEM after the whole range). Never drop a page twice: each
            // drop raises a REMOVE, and a second one is taken for the
            // app's own and forgets the page. Only pages still held (in
            // memory or swapped out: pagemap, as mincore reports a
            // swapped-out page absent) are dropped again; unmapped ones are
            // left to the mapping.
            for k in i..j {
                let addr = entries[k].addr;
                match sys::page_resident(addr) {
                    None => status[k] = EvictStatus::Unmapped,
                    Some(resident) => {
                        let held = sys::page_occupied(addr).unwrap_or(resident);
                        if held && sys::dontneed(addr, PAGE).is_err() {
                            status[k] = EvictStatus::Unmapped;
                        }
                    }
                }
            }
        }
        i = j;
    }
}
