//! The pager's unix socket: apps register on it (uffd by SCM_RIGHTS, pid
//! checked against SO_PEERCRED), `dmem stats` asks it for figures. Every
//! malformed or refused first message gets a `Refused` answer saying why,
//! and the connection is closed; the pager keeps serving everyone else.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    accept4, bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    UnixAddr,
};
use nix::sys::time::TimeVal;
use thiserror::Error;
use tracing::{info, warn};

use crate::app::{connect_pager, recv_msg};
use crate::forksnap::{self, ForkSnapshot};
use crate::pager::Pager;
use crate::prefetch::Prefetcher;
use crate::session::Session;
use crate::sys::{self, Mapping, PAGE};
use crate::wire::{self, Msg, Register, Welcome, MAX_BATCH, MAX_MSG};

#[derive(Debug, Error)]
pub enum DaemonError {
    #[error("another pager is already listening on {0}")]
    InUse(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: Errno },
}

/// Largest arena an app may register (64 TiB).
const MAX_ARENA: u64 = 1 << 46;
/// Smallest local limit: a few eviction batches.
const MIN_LIMIT: u64 = 1 << 20;

/// The default socket: `$DMEM_SOCKET`, else `/run/dmem/pager.sock` for
/// root, else `$XDG_RUNTIME_DIR/dmem/pager.sock` or `/tmp/dmem-UID/pager.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("DMEM_SOCKET") {
        return PathBuf::from(p);
    }
    let uid = nix::unistd::getuid();
    if uid.is_root() {
        return PathBuf::from("/run/dmem/pager.sock");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("dmem/pager.sock"),
        None => PathBuf::from(format!("/tmp/dmem-{uid}/pager.sock")),
    }
}

/// Binds the socket (mode 0600 in a 0700 directory when we create it).
pub fn bind_socket(path: &Path) -> Result<OwnedFd, DaemonError> {
    let err = |source| DaemonError::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() && !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err(errno_of(&e)))?;
            let _ =
                std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        }
    }
    if path.exists() {
        if connect_pager(path).is_ok() {
            return Err(DaemonError::InUse(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(err)?;
    let addr = UnixAddr::new(path).map_err(err)?;
    bind(fd.as_raw_fd(), &addr).map_err(err)?;
    let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    listen(&fd, Backlog::new(128).expect("valid backlog")).map_err(err)?;
    Ok(fd)
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Accepts connections forever.
pub fn serve(pager: Arc<Pager>, listener: OwnedFd, socket_path: String) {
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
            Err(e) => {
                warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
        let conn = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let p = Arc::clone(&pager);
        let path = socket_path.clone();
        let _ = std::thread::Builder::new()
            .name("dmem-conn".into())
            .spawn(move || handle(p, conn, &path));
    }
}

fn refuse(conn: &OwnedFd, why: &str) {
    warn!("refusing a client: {why}");
    let _ = sys::send_with_fds(
        conn.as_raw_fd(),
        &wire::encode(&Msg::Refused(why.into())),
        &[],
    );
}

fn handle(pager: Arc<Pager>, conn: OwnedFd, socket_path: &str) {
    // A client that connects and says nothing is dropped.
    let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &TimeVal::new(5, 0));
    let (peer_pid, peer_uid) = match sys::peer_cred(conn.as_fd()) {
        Ok(c) => c,
        Err(e) => return refuse(&conn, &format!("cannot read peer credentials: {e}")),
    };
    let me = nix::unistd::getuid().as_raw();
    if peer_uid != me && peer_uid != 0 {
        return refuse(
            &conn,
            &format!("uid {peer_uid} may not use a pager of uid {me}"),
        );
    }
    let mut buf = vec![0u8; MAX_MSG];
    let (n, fds) = match sys::recv_with_fds(conn.as_raw_fd(), &mut buf) {
        Ok((0, _)) => return,
        Ok(x) => x,
        Err(Errno::EMSGSIZE) => {
            return refuse(
                &conn,
                &format!(
                    "first message too long (more than {MAX_MSG} bytes, or more than 4 \
                     descriptors): not a dmem client, or a newer one"
                ),
            )
        }
        Err(e) => return refuse(&conn, &format!("cannot read the first message: {e}")),
    };
    let msg = match wire::decode(&buf[..n]) {
        Ok(m) => m,
        Err(e) => return refuse(&conn, &format!("bad first message: {e}")),
    };
    match msg {
        Msg::StatsRequest => {
            let text = serde_json::to_string(&pager.stats_json(socket_path)).unwrap_or_default();
            let _ = sys::send_with_fds(conn.as_raw_fd(), &wire::encode(&Msg::Stats(text)), &[]);
        }
        Msg::Register(r) => match check(&r, &fds, peer_pid) {
            Ok(()) => {
                let uffd = fds.into_iter().next().expect("checked: one descriptor");
                let _ = setsockopt(&conn, sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
                register(&pager, r, uffd, conn);
            }
            Err(why) => refuse(&conn, &why),
        },
        Msg::Hold { session } => hold(&pager, session, peer_pid, &conn),
        other => refuse(&conn, &format!("unexpected first message {other:?}")),
    }
}

/// An app about to fork: stop evicting its pages until this connection
/// closes. The app then either brings its pages back itself, or asks
/// (`Snapshot`) for what its child needs of them to be kept in a fork
/// snapshot (see `forksnap`), which lives until the child adopts it or
/// every copy of this connection is closed. Only the app itself may ask.
fn hold(pager: &Pager, session: u64, peer_pid: i32, conn: &OwnedFd) {
    // Sessions are listed before their Welcome is sent (see `register`),
    // so an app that forks at once finds its own.
    let Some(s) = pager.sessions.get(&session).map(|s| Arc::clone(&s)) else {
        return refuse(conn, &format!("no session {session}"));
    };
    if s.pid != peer_pid {
        return refuse(
            conn,
            &format!("session {session} belongs to pid {}, not {peer_pid}", s.pid),
        );
    }
    s.hold();
    let out = {
        let st = s.lock();
        (st.counts.cached + st.counts.remote) as u64
    };
    let mut key = 0;
    let reply = wire::encode(&Msg::Held { pages_out: out });
    if sys::send_with_fds(conn.as_raw_fd(), &reply, &[]).is_ok() {
        // Held until the app and its child close the connection. A parent
        // that dies ends the hold only when no snapshot was taken: its
        // child may still need it (a parent may exit right after forking).
        let _ = setsockopt(conn, sockopt::ReceiveTimeout, &TimeVal::new(0, 0));
        let mut buf = vec![0u8; MAX_MSG];
        while key != 0 || !s.is_dead() {
            match sys::poll_in(conn.as_raw_fd(), 200) {
                Ok(false) => continue,
                Ok(true) => {}
                Err(_) => break,
            }
            match recv_msg(conn, &mut buf) {
                Ok((Some(Msg::Snapshot), _)) if key == 0 => {
                    key = forksnap::new_key();
                    let snap = ForkSnapshot::take(&s, pager);
                    pager.fork_snapshots.insert(key, snap);
                    let reply = wire::encode(&Msg::Snapshotted { key });
                    if sys::send_with_fds(conn.as_raw_fd(), &reply, &[]).is_err() {
                        break;
                    }
                }
                Ok((Some(other), _)) => {
                    refuse(conn, &format!("unexpected message on a hold: {other:?}"));
                    break;
                }
                _ => break, // closed by every holder, or broken
            }
        }
    }
    // Not adopted (the child had no managed memory, or failed): its
    // references go.
    if let Some((_, snap)) = pager.fork_snapshots.remove(&key) {
        ForkSnapshot::release(&snap.pages, &pager.space);
    }
    s.release_hold();
}

/// The session a forked child names as its parent's, if it really is its
/// parent's and is held with no managed memory moved since the hold began.
/// Then its page state is as at the fork, except for pages that became
/// dirty, which are not shared. The remote copies of that session's clean
/// pages are shared with the child, so another process must not claim
/// them. Without such a parent every page of the child counts as dirty,
/// which is correct, only dearer.
fn forked_parent(pager: &Pager, session: u64, child: i32) -> Option<Arc<Session>> {
    let s = pager.sessions.get(&session).map(|s| Arc::clone(&s))?;
    if sys::parent_pid(child) == Some(s.pid) && s.held_unmoved() {
        Some(s)
    } else {
        warn!(
            session,
            child, "a registration names a session that is not its held parent's; sharing nothing"
        );
        None
    }
}

/// The fork snapshot a forked child's registration names, taken out of
/// the pager's list (the child owns it now), or none when it names none.
/// A key that is unknown, or belongs to another session's fork, is
/// refused: without the snapshot the child would read zeros where its
/// parent's pages were out.
fn take_snapshot(pager: &Pager, r: &Register) -> Result<Option<ForkSnapshot>, String> {
    if r.fork_snapshot == 0 {
        return Ok(None);
    }
    let key = r.fork_snapshot;
    match pager
        .fork_snapshots
        .remove_if(&key, |_, snap| snap.session == r.forked_from)
    {
        Some((_, snap)) => Ok(Some(snap)),
        None => Err(match pager.fork_snapshots.get(&key) {
            Some(snap) => format!(
                "the fork snapshot is of session {}, not {}",
                snap.session, r.forked_from
            ),
            None => "no such fork snapshot (the parent's hold ended?)".into(),
        }),
    }
}

/// Validates a registration; says exactly what is wrong.
fn check(r: &Register, fds: &[OwnedFd], peer_pid: i32) -> Result<(), String> {
    if fds.len() != 1 {
        return Err(format!(
            "registration must carry exactly one descriptor (the userfaultfd), got {}",
            fds.len()
        ));
    }
    if !sys::is_userfaultfd(fds[0].as_fd()) {
        return Err("the descriptor sent is not a userfaultfd".into());
    }
    if r.pid as i32 != peer_pid {
        return Err(format!(
            "pid {} claimed, but the socket belongs to pid {peer_pid}",
            r.pid
        ));
    }
    if !r.arena_base.is_multiple_of(PAGE as u64) || !r.arena_len.is_multiple_of(PAGE as u64) {
        return Err("arena base and length must be page-aligned".into());
    }
    if r.arena_len == 0 || r.arena_len > MAX_ARENA {
        return Err(format!("arena length {} out of range", r.arena_len));
    }
    if r.arena_base.checked_add(r.arena_len).is_none() {
        return Err("arena wraps around the address space".into());
    }
    if r.local_limit != 0 && r.local_limit < MIN_LIMIT {
        return Err(format!(
            "local limit {} is below the minimum of 1 MiB",
            r.local_limit
        ));
    }
    // Last: a uffd that skipped the handshake is otherwise a good one.
    if !sys::uffd_initialized(fds[0].as_fd()) {
        return Err("the userfaultfd was not initialised (UFFDIO_API was not called on it)".into());
    }
    Ok(())
}

fn register(pager: &Arc<Pager>, r: Register, uffd: OwnedFd, conn: OwnedFd) {
    let limit = if r.local_limit == 0 {
        pager.cfg.local_limit
    } else {
        r.local_limit
    };
    let staging_len = MAX_BATCH * PAGE;
    let staging = sys::memfd("dmem-staging", staging_len)
        .and_then(|fd| Ok((Mapping::shared(fd.as_fd(), staging_len)?, fd)));
    let (staging, staging_fd) = match staging {
        Ok(x) => x,
        Err(e) => return refuse(&conn, &format!("pager cannot create staging memory: {e}")),
    };
    let id = pager.next_session_id();
    let limit_pages = (limit as usize / PAGE).max(64);
    let welcome = Msg::Welcome(Welcome {
        session: id,
        staging_len: staging_len as u64,
        local_limit: (limit_pages * PAGE) as u64,
        block: pager.cfg.block as u32,
    });
    info!(
        session = id,
        pid = r.pid,
        arena = format!("{:#x}+{}", r.arena_base, r.arena_len),
        limit = limit_pages * PAGE,
        "app registered"
    );
    let s = Arc::new(Session::new(
        id,
        r.pid as i32,
        r.agent_tid as i32,
        uffd,
        (r.arena_base, r.arena_len as usize),
        limit_pages,
        staging,
        conn,
        {
            // The detector works in blocks.
            let bp = pager.cfg.block / PAGE;
            // Windows never exceed one eviction batch: that is the room
            // the evictor keeps free below the limit.
            let max = pager.cfg.prefetch_max.min(Session::batch_for(limit_pages));
            Prefetcher::new((pager.cfg.prefetch_min / bp).max(1), max / bp)
        },
    ));
    if r.forked_from != 0 {
        let snapshot = match take_snapshot(pager, &r) {
            Ok(snap) => snap,
            Err(why) => return refuse(&s.sock, &why),
        };
        // Tests widen the window in which the parent can change its pages
        // before the child's adoption looks at them.
        crate::contain::failpoint("adopt");
        let parent = forked_parent(pager, r.forked_from, r.pid as i32);
        match s.adopt(
            pager,
            parent.as_deref(),
            snapshot,
            (r.arena_base, r.arena_len as usize),
        ) {
            Ok((n, shared, out)) => info!(
                session = id,
                pid = r.pid,
                pages = n,
                shared,
                out,
                "forked child adopted its arena"
            ),
            Err(e) => {
                // What the child had already taken goes back.
                s.teardown(pager);
                return refuse(&s.sock, &format!("pid {}: {e}", r.pid));
            }
        }
    }
    // Listed and running before the app hears of it: the app may ask for
    // its session (a Hold, when it forks) right after the Welcome.
    pager.start_session(Arc::clone(&s));
    if let Err(e) = sys::send_with_fds(
        s.sock.as_raw_fd(),
        &wire::encode(&welcome),
        &[staging_fd.as_raw_fd()],
    ) {
        warn!("app {} vanished during registration: {e}", r.pid);
        s.dead.store(true, std::sync::atomic::Ordering::Release);
    }
}
