//! OS calls of the pager and the app side: userfaultfd ioctls the
//! `userfaultfd` crate lacks (COPY with `MODE_WP`, errno-exact results),
//! memfd and mmap, `process_vm_readv` on oneself, SCM_RIGHTS and peer
//! credentials on unix sockets. Every unsafe block is here.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};
use userfaultfd_sys as raw;

pub const PAGE: usize = 4096;

/// Outcome of a uffd ioctl that may stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The whole range was filled.
    Done,
    /// A page of the range was already present (EEXIST): someone else
    /// resolved it. The faulting thread must still be woken.
    Exists,
    /// The address space is changing (EAGAIN: a REMOVE/UNMAP/REMAP event is
    /// pending). Wake the thread so it faults again after the event.
    Retry,
    /// The process is gone (ESRCH) or the range no longer registered (ENOENT).
    Gone,
}

fn classify(e: Errno) -> Result<Fill, Errno> {
    match e {
        Errno::EEXIST => Ok(Fill::Exists),
        Errno::EAGAIN => Ok(Fill::Retry),
        Errno::ESRCH | Errno::ENOENT => Ok(Fill::Gone),
        _ => Err(e),
    }
}

/// `UFFDIO_COPY` of `len` bytes from `src` (pager memory) to `dst` (the
/// app's address space), write-protected when `wp`, without waking when
/// `!wake`. Partial copies are resumed; returns how the copy ended and how
/// many bytes landed (from the start of the range).
pub fn uffd_copy(
    uffd: RawFd,
    dst: u64,
    src: *const u8,
    len: usize,
    wp: bool,
    wake: bool,
) -> Result<(Fill, usize), Errno> {
    let mut done = 0usize;
    while done < len {
        let mut mode = 0;
        if wp {
            mode |= raw::UFFDIO_COPY_MODE_WP;
        }
        if !wake {
            mode |= raw::UFFDIO_COPY_MODE_DONTWAKE;
        }
        let mut arg = raw::uffdio_copy {
            dst: dst + done as u64,
            src: src as u64 + done as u64,
            len: (len - done) as u64,
            mode,
            copy: 0,
        };
        // SAFETY: `arg` is a valid uffdio_copy that lives across the call; the
        // kernel reads `len` bytes at `src`, which the caller owns, and writes
        // only into the target process through the uffd.
        let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_COPY as _, &mut arg) };
        if rc == 0 {
            return Ok((Fill::Done, len));
        }
        let e = Errno::last();
        if arg.copy > 0 {
            done += arg.copy as usize;
            continue;
        }
        return classify(e).map(|f| (f, done));
    }
    Ok((Fill::Done, done))
}

/// Sets (`wp`) or clears write protection on a range; clearing wakes
/// writers blocked on it.
pub fn uffd_writeprotect(uffd: RawFd, start: u64, len: usize, wp: bool) -> Result<Fill, Errno> {
    let mut arg = raw::uffdio_writeprotect {
        range: raw::uffdio_range {
            start,
            len: len as u64,
        },
        mode: if wp {
            raw::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    // SAFETY: valid uffdio_writeprotect argument living across the call.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_WRITEPROTECT as _, &mut arg) };
    if rc == 0 {
        return Ok(Fill::Done);
    }
    classify(Errno::last())
}

/// Wakes threads blocked on faults in the range.
pub fn uffd_wake(uffd: RawFd, start: u64, len: usize) -> Result<Fill, Errno> {
    let mut arg = raw::uffdio_range {
        start,
        len: len as u64,
    };
    // SAFETY: valid uffdio_range argument living across the call.
    let rc = unsafe { libc::ioctl(uffd, raw::UFFDIO_WAKE as _, &mut arg) };
    if rc == 0 {
        return Ok(Fill::Done);
    }
    classify(Errno::last())
}

/// An anonymous or shared mapping owned by this process, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory; callers synchronise access to its bytes.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous memory, reserved lazily (MAP_NORESERVE).
    pub fn anonymous(len: usize) -> Result<Mapping, Errno> {
        Self::map(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }

    /// A shared mapping of `fd`.
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> Result<Mapping, Errno> {
        Self::map(len, libc::MAP_SHARED, fd.as_raw_fd())
    }

    fn map(len: usize, flags: i32, fd: RawFd) -> Result<Mapping, Errno> {
        let p = mmap_raw(0, len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0)?;
        let ptr = NonNull::new(p as *mut u8).ok_or(Errno::ENOMEM)?;
        Ok(Mapping { ptr, len })
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address as a number, for uffd ranges.
    pub fn addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Leaks the mapping: it stays mapped for the life of the process.
    pub fn leak(self) -> (u64, usize) {
        let r = (self.addr(), self.len);
        std::mem::forget(self);
        r
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // Only this value refers to the mapping.
        let _ = munmap_raw(self.addr(), self.len);
    }
}

/// The mmap system call itself, not the libc symbol: inside a program
/// running under libdmem.so, `mmap` is the shim's, which would put large
/// anonymous mappings (the agent's buffers, say) into the managed arena.
/// Only fresh mappings (`addr` 0) or ranges the caller owns may be passed.
pub fn mmap_raw(
    addr: u64,
    len: usize,
    prot: i32,
    flags: i32,
    fd: RawFd,
    off: i64,
) -> Result<u64, Errno> {
    // SAFETY: the caller maps either at a kernel-chosen address or over a
    // range it owns (MAP_FIXED), so no one else's memory changes.
    let rc = unsafe { libc::syscall(libc::SYS_mmap, addr, len, prot, flags, fd, off) };
    if rc == -1 {
        Err(Errno::last())
    } else {
        Ok(rc as u64)
    }
}

/// The munmap system call (see `mmap_raw` for why not the libc symbol).
/// The caller owns `[addr, addr+len)` and nothing refers to it any more.
pub fn munmap_raw(addr: u64, len: usize) -> Result<(), Errno> {
    // SAFETY: per the contract above, the range is the caller's to drop.
    let rc = unsafe { libc::syscall(libc::SYS_munmap, addr, len) };
    if rc == -1 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Whether the page at `addr` is in memory in this process: `None` when
/// nothing is mapped there (mincore's ENOMEM). Never faults.
pub fn page_resident(addr: u64) -> Option<bool> {
    let mut vec = [0u8; 1];
    // SAFETY: mincore only reads page tables and writes one byte per page
    // of the range (one page here) into `vec`.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE, vec.as_mut_ptr()) };
    (rc == 0).then_some(vec[0] & 1 != 0)
}

/// Pagemap bit: the page is present in memory.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap bit: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;

/// The pagemap entry of `page` from an open `/proc/PID/pagemap`.
fn pagemap_entry(f: &std::fs::File, page: u64) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, page / PAGE as u64 * 8).ok()?;
    Some(u64::from_le_bytes(e))
}

/// Whether the page at `addr` of this process holds data: present in
/// memory or swapped out (`/proc/self/pagemap`), as opposed to an empty
/// page table entry. `None` when pagemap cannot be read. (`mincore` would
/// not do: it reports a swapped-out page as absent.)
pub fn page_occupied(addr: u64) -> Option<bool> {
    let f = std::fs::File::open("/proc/self/pagemap").ok()?;
    pagemap_entry(&f, addr).map(|e| e & (PM_PRESENT | PM_SWAPPED) != 0)
}

/// Which of `pages` are present in process `pid`'s page tables, from
/// `/proc/PID/pagemap` (readable without privileges). A process that is
/// gone has none.
pub fn pages_present(pid: i32, pages: &[u64]) -> Vec<bool> {
    let Ok(f) = std::fs::File::open(format!("/proc/{pid}/pagemap")) else {
        return vec![false; pages.len()];
    };
    pages
        .iter()
        .map(|&p| pagemap_entry(&f, p).is_some_and(|e| e & PM_PRESENT != 0))
        .collect()
}

/// The parent of process `pid` (field 4 of /proc/PID/stat, after the
/// parenthesised command name, which may itself hold spaces or parens).
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `PAGEMAP_SCAN` (Linux 6.7): ranges of pages by category, straight from
/// the page tables, skipping unpopulated ones (a sparse 64 GiB range takes
/// microseconds).
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610; // _IOWR('f', 16, pm_scan_arg)
const PAGE_IS_PRESENT: u64 = 1 << 3;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// The ranges `[start, end)` of `[addr, addr+len)` that are present in
/// process `pid`'s page tables (see [`PAGEMAP_SCAN`]).
pub fn present_ranges(pid: i32, addr: u64, len: usize) -> Result<Vec<(u64, u64)>, Errno> {
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap"))
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let end = addr + len as u64;
    let mut out = Vec::new();
    let mut vec = vec![PageRegion::default(); 512];
    let mut at = addr;
    while at < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: 0,
            start: at,
            end,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: vec.len() as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: PAGE_IS_PRESENT,
            category_anyof_mask: 0,
            return_mask: PAGE_IS_PRESENT,
        };
        // SAFETY: valid pm_scan_arg living across the call; the kernel
        // writes at most `vec_len` regions into `vec`, which outlives it.
        let n = unsafe { libc::ioctl(f.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
        if n < 0 {
            return Err(Errno::last());
        }
        out.extend(vec[..n as usize].iter().map(|r| (r.start, r.end)));
        if arg.walk_end <= at {
            break; // no progress: never loop forever
        }
        at = arg.walk_end;
    }
    Ok(out)
}

/// Reads `len` bytes at `offset` of a mapping into `out` (bounds checked).
pub fn mapping_read(m: &Mapping, offset: usize, out: &mut [u8]) {
    assert!(offset + out.len() <= m.len, "mapping read out of bounds");
    // SAFETY: in bounds (checked above).
    let at = unsafe { m.as_ptr().add(offset) };
    // SAFETY: `at..at+len` is inside the mapping, which is live while `m` is
    // borrowed; `out` does not alias it.
    let src = unsafe { std::slice::from_raw_parts(at, out.len()) };
    out.copy_from_slice(src);
}

/// The bytes at `offset..offset+len` of a mapping (bounds checked), read
/// in place: one copy fewer than `mapping_read` where they only pass
/// through (a victim on its way to a cache frame).
pub fn mapping_bytes(m: &Mapping, offset: usize, len: usize) -> &[u8] {
    assert!(offset + len <= m.len, "mapping read out of bounds");
    // SAFETY: in bounds (checked above).
    let at = unsafe { m.as_ptr().add(offset) };
    // SAFETY: the mapping is live while `m` is borrowed. Its owner writes
    // this part only between batches (a staging slot, a move-buffer page),
    // never while a reader holds it.
    unsafe { std::slice::from_raw_parts(at, len) }
}

/// Writes `data` at `offset` of a mapping (bounds checked).
pub fn mapping_write(m: &Mapping, offset: usize, data: &[u8]) {
    assert!(offset + data.len() <= m.len, "mapping write out of bounds");
    // SAFETY: in bounds (checked above).
    let at = unsafe { m.as_ptr().add(offset) };
    // SAFETY: `at..at+len` is inside the live mapping; callers own this part
    // of it exclusively (a cache frame or a staging slot handed to them).
    let dst = unsafe { std::slice::from_raw_parts_mut(at, data.len()) };
    dst.copy_from_slice(data);
}

/// A memfd of `len` bytes, for the staging area shared with an app.
pub fn memfd(name: &str, len: usize) -> Result<OwnedFd, Errno> {
    let cname = std::ffi::CString::new(name).map_err(|_| Errno::EINVAL)?;
    let fd = nix::sys::memfd::memfd_create(&cname, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)?;
    nix::unistd::ftruncate(&fd, len as i64)?;
    Ok(fd)
}

/// `madvise(MADV_DONTNEED)` on a range of this process.
pub fn dontneed(addr: u64, len: usize) -> Result<(), Errno> {
    // SAFETY: dropping pages only affects their contents, which the caller
    // (the agent, on the pager's instruction) has copied out; an unmapped
    // range yields ENOMEM, not undefined behaviour.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// `UFFD_FEATURE_MOVE` and `UFFDIO_MOVE` (Linux 6.8; the headers the
/// bindings are built from are older).
const UFFD_FEATURE_MOVE: u64 = 1 << 16;
const UFFDIO_MOVE: libc::c_ulong = 0xC028_AA05; // _IOWR(0xAA, 5, uffdio_move)

#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// A userfaultfd of this process that reports no events and has `[addr,
/// addr+len)` registered for missing faults: pages can be moved into that
/// range with [`uffd_move`], from anywhere in the process.
pub fn uffd_for_moves(addr: u64, len: usize) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall; the returned descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this descriptor to us alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut api = raw::uffdio_api {
        api: raw::UFFD_API,
        features: UFFD_FEATURE_MOVE,
        ioctls: 0,
    };
    // SAFETY: valid uffdio_api argument living across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), raw::UFFDIO_API as _, &mut api) } != 0 {
        return Err(Errno::last());
    }
    let mut reg = raw::uffdio_register {
        range: raw::uffdio_range {
            start: addr,
            len: len as u64,
        },
        mode: raw::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: valid uffdio_register argument living across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), raw::UFFDIO_REGISTER as _, &mut reg) } != 0 {
        return Err(Errno::last());
    }
    Ok(fd)
}

/// `UFFDIO_MOVE` of `len` bytes of this process from `src` to `dst` (in a
/// range registered with `uffd`): the pages change address, nothing is
/// copied, `src` is left unpopulated and no event is raised. Returns how
/// many bytes moved, and the error that stopped it early (EBUSY: a page
/// shared with a forked child; ENOENT: a hole).
pub fn uffd_move(uffd: RawFd, dst: u64, src: u64, len: usize) -> (usize, Option<Errno>) {
    let mut arg = UffdioMove {
        dst,
        src,
        len: len as u64,
        mode: 0,
        moved: 0,
    };
    // SAFETY: valid uffdio_move argument living across the call. To the
    // code using `src`, the pages just leave, as after MADV_DONTNEED: its
    // next access faults to the pager; `dst` is the caller's own buffer.
    let rc = unsafe { libc::ioctl(uffd, UFFDIO_MOVE, &mut arg) };
    if rc == 0 {
        return (len, None);
    }
    let e = Errno::last();
    (usize::try_from(arg.moved).unwrap_or(0).min(len), Some(e))
}

/// `madvise(MADV_NOHUGEPAGE)`: uffd serves 4 KiB pages; keep THP out.
pub fn no_huge_pages(addr: u64, len: usize) -> Result<(), Errno> {
    // SAFETY: advisory only; does not change contents.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

/// Copies `len` bytes at `addr` of this process into `dst` with
/// `process_vm_readv`, which fails with EFAULT on unmapped memory instead
/// of crashing: the agent reads victims the app may have unmapped.
pub fn read_own_memory(addr: u64, dst: &mut [u8]) -> Result<(), Errno> {
    let pid = nix::unistd::getpid();
    let len = dst.len();
    let mut local = [IoSliceMut::new(dst)];
    let remote = [nix::sys::uio::RemoteIoVec {
        base: addr as usize,
        len,
    }];
    let n = nix::sys::uio::process_vm_readv(pid, &mut local, &remote)?;
    if n == len {
        Ok(())
    } else {
        Err(Errno::EFAULT)
    }
}

/// Sends one message with optional file descriptors.
pub fn send_with_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> Result<(), Errno> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one message into `buf` with up to 4 file descriptors; returns
/// the length (0 = peer closed) and the descriptors received.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), Errno> {
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(list) = c {
            for fd in list {
                // SAFETY: the kernel just installed this descriptor for us;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) || msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(Errno::EMSGSIZE);
    }
    Ok((msg.bytes, fds))
}

/// The next message waiting on `sock`, copied without taking it (None
/// when there is none); the reader of the socket still gets it.
pub fn peek_message(sock: RawFd, buf: &mut [u8]) -> Option<usize> {
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(sock, buf, flags) {
        Ok(n) if n > 0 => Some(n),
        _ => None,
    }
}

/// The pid and uid of a unix-socket peer, from the kernel (SO_PEERCRED).
pub fn peer_cred(sock: BorrowedFd<'_>) -> Result<(i32, u32), Errno> {
    let c = getsockopt(&sock, sockopt::PeerCredentials)?;
    Ok((c.pid(), c.uid()))
}

/// Whether a descriptor is a userfaultfd (by its anon-inode name).
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}

/// Whether a userfaultfd went through its UFFDIO_API handshake. The kernel
/// refuses every other ioctl on one that did not (EINVAL); UFFDIO_WAKE of a
/// valid range that nobody waits on is otherwise a no-op, so it tells.
pub fn uffd_initialized(fd: BorrowedFd<'_>) -> bool {
    // Any page-aligned range inside the user address space will do: the
    // wake only walks the fault queue, whatever is mapped there.
    !matches!(uffd_wake(fd.as_raw_fd(), 1 << 30, PAGE), Err(Errno::EINVAL))
}

/// Whether a process still exists.
pub fn process_alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    nix::unistd::gettid().as_raw()
}

/// What `poll_uffd_and_peer` saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    Events,
    Timeout,
    /// The app's end of its socket closed: the app is gone.
    PeerGone,
}

/// Waits for uffd events or the app's socket to hang up.
pub fn poll_uffd_and_peer(uffd: RawFd, sock: RawFd, timeout_ms: i32) -> Result<Ready, Errno> {
    let mut p = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: sock,
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds, living across the call.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), 2, timeout_ms) };
    if rc < 0 {
        let e = Errno::last();
        return if e == Errno::EINTR {
            Ok(Ready::Timeout)
        } else {
            Err(e)
        };
    }
    if p[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return Ok(Ready::PeerGone);
    }
    if p[0].revents != 0 {
        return Ok(Ready::Events);
    }
    Ok(Ready::Timeout)
}

/// Blocks until the peer of `sock` hangs up (true), or a signal interrupts.
pub fn wait_hangup(sock: RawFd) -> Result<bool, Errno> {
    let mut p = libc::pollfd {
        fd: sock,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, living across the call.
    let rc = unsafe { libc::poll(&mut p, 1, -1) };
    if rc < 0 {
        return Err(Errno::last());
    }
    Ok(p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0)
}

/// Whether `fd` has input within `timeout_ms`.
pub fn poll_in(fd: RawFd, timeout_ms: i32) -> Result<bool, Errno> {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, living across the call.
    let rc = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if rc < 0 {
        let e = Errno::last();
        return if e == Errno::EINTR { Ok(false) } else { Err(e) };
    }
    Ok(rc > 0 && p.revents != 0)
}

/// Sends `sig` to process `pid` (errors ignored: it may be gone).
pub fn signal_process(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

fn sigset(sigs: &[i32]) -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned here.
    unsafe { libc::sigemptyset(&mut set) };
    for &s in sigs {
        // SAFETY: as above; invalid numbers are rejected by the call.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

/// Blocks `sigs` in the calling thread (and threads it starts later).
pub fn block_signals(sigs: &[i32]) {
    let set = sigset(sigs);
    // SAFETY: `set` is a valid sigset_t; a null old-set is allowed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Makes `cmd`'s process start with an empty signal mask (a spawned
/// program inherits its parent's mask, and a program that cannot be
/// stopped by SIGTERM hangs whoever waits for it), and, with `parent_death`,
/// receive that signal when the spawning thread exits.
pub fn clean_signals_on_spawn(cmd: &mut std::process::Command, parent_death: Option<i32>) {
    use std::os::unix::process::CommandExt;
    let empty = sigset(&[]);
    let child_side = move || {
        // SAFETY: `empty` is a valid sigset_t; pthread_sigmask is
        // async-signal-safe, as required between fork and exec.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) };
        if let Some(sig) = parent_death {
            // SAFETY: prctl with plain integers; async-signal-safe.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) };
        }
        Ok(())
    };
    // SAFETY: the closure only makes async-signal-safe calls on values it
    // owns, so it may run between fork and exec.
    unsafe { cmd.pre_exec(child_side) };
}

/// Waits for one of `sigs` (blocked beforehand). Returns the signal and
/// whether the kernel sent it on a terminal's behalf (Ctrl-C, Ctrl-\).
pub fn wait_signal(sigs: &[i32]) -> Option<(i32, bool)> {
    let set = sigset(sigs);
    // SAFETY: an all-zero siginfo_t is a valid out-buffer.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid set and out-buffer.
    let sig = unsafe { libc::sigwaitinfo(&set, &mut info) };
    (sig > 0).then_some((sig, info.si_code == libc::SI_KERNEL))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_loopback_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises the soft open-file limit to the hard limit. Every app session
/// holds a uffd, an agent socket and a staging memfd, so a program that forks
/// a few hundred children outgrows the common soft default of 1024 fds.
/// Returns the (old, new) soft limit.
pub fn raise_fd_limit() -> Result<(u64, u64), Errno> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    // An unlimited hard limit is still capped by fs.nr_open (default 2^20).
    let target = hard.min(1 << 20);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
        return Ok((soft, target));
    }
    Ok((soft, soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parent_pid_reads_the_real_parent() {
        let me = std::process::id() as i32;
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(parent_pid(child.id() as i32), Some(me));
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(parent_pid(-1), None);
    }

    /// A page moved out with UFFDIO_MOVE leaves an empty entry behind and
    /// occupies its destination; a dropped page occupies nothing. (Swapped
    /// out pages count as occupied too: the swap test of the suite covers
    /// that, as it needs a swap device.)
    #[test]
    fn page_occupied_follows_a_move_and_a_drop() {
        let src = Mapping::anonymous(2 * PAGE).unwrap();
        let dst = Mapping::anonymous(2 * PAGE).unwrap();
        let uffd = uffd_for_moves(dst.addr(), 2 * PAGE).unwrap();
        mapping_write(&src, 0, &[1u8; PAGE]);
        mapping_write(&src, PAGE, &[2u8; PAGE]);
        assert_eq!(page_occupied(src.addr()), Some(true));
        assert_eq!(page_occupied(dst.addr()), Some(false));
        let (moved, e) = uffd_move(uffd.as_raw_fd(), dst.addr(), src.addr(), PAGE);
        assert_eq!((moved, e), (PAGE, None));
        assert_eq!(page_occupied(src.addr()), Some(false));
        assert_eq!(page_occupied(dst.addr()), Some(true));
        assert_eq!(mapping_bytes(&dst, 0, PAGE), &[1u8; PAGE][..]);
        dontneed(src.addr() + PAGE as u64, PAGE).unwrap();
        assert_eq!(page_occupied(src.addr() + PAGE as u64), Some(false));
    }

    #[test]
    fn present_ranges_finds_exactly_the_touched_pages() {
        let len = 1 << 30;
        let m = Mapping::anonymous(len).unwrap();
        let touched = [0usize, 1, 2, 1000, 262_143];
        for &p in &touched {
            let mut b = [7u8];
            mapping_write(&m, p * PAGE, &b);
            mapping_read(&m, p * PAGE, &mut b);
        }
        let r = present_ranges(std::process::id() as i32, m.addr(), len).unwrap();
        let pages: Vec<usize> = r
            .iter()
            .flat_map(|&(s, e)| (s..e).step_by(PAGE))
            .map(|a| ((a - m.addr()) as usize) / PAGE)
            .collect();
        assert_eq!(pages, touched);
    }
}
