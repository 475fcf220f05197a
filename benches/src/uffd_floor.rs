//! Floor 1 of `dmem-bench fault-latency`: the bare userfaultfd round trip.
//! An in-process minimal handler thread reads fault events (blocking read,
//! one event at a time) and resolves each with one `UFFDIO_COPY` of a ready
//! 4 KiB buffer; the measuring thread faults random untouched pages of the
//! registered region and times each read from its own side. Touched pages
//! are dropped with `MADV_DONTNEED` (untimed) once half the region is
//! present, so every timed read is a missing-page fault.
//!
//! The same handler also runs in a child process (`dmem-bench
//! uffd-handler`, the fd passed over a unix socket the way libdmem.so hands
//! it to the pager): the cross-process round trip, which every dmem fault
//! pays as the pager is another process. Pinned to one CPU, a switch between
//! two processes costs more than one between two threads of a process (the
//! address space changes); the difference is the architecture's share of
//! dmem's cache-tier latency.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmem_pager::sys::{dontneed, no_huge_pages, recv_with_fds, send_with_fds, Mapping};
use userfaultfd::{Event, Uffd, UffdBuilder};

use crate::stats::{latency_histogram, quantile_us, Rng};
use crate::sys::{pause, read_word, PAGE};

pub(crate) struct UffdFloor {
    region: Mapping,
    touched: Vec<bool>,
    n_touched: usize,
    /// Keeps the registration alive; the handler holds another reference.
    _uffd: Arc<Uffd>,
    /// The handler process, when the handler runs in another process.
    child: Option<Child>,
}

impl Drop for UffdFloor {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the minimal handler runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandlerAt {
    /// A thread of the faulting process.
    Thread,
    /// Another process (`dmem-bench uffd-handler`), like dmem's pager.
    Process,
}

impl UffdFloor {
    /// Registers a `bytes`-long region and starts the handler. A handler
    /// thread lives as long as the process (it blocks in `read(2)`); a
    /// handler process is killed when the floor is dropped.
    pub(crate) fn start(bytes: usize, at: HandlerAt) -> Result<UffdFloor, String> {
        let bytes = bytes.div_ceil(PAGE) * PAGE;
        let region = Mapping::anonymous(bytes).map_err(|e| format!("uffd floor mmap: {e}"))?;
        let _ = no_huge_pages(region.addr(), bytes);
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(false)
            .user_mode_only(false)
            .create()
            .map_err(|e| format!("uffd floor: cannot create a userfaultfd: {e}"))?;
        uffd.register(region.as_ptr().cast(), bytes)
            .map_err(|e| format!("uffd floor: register: {e}"))?;
        let uffd = Arc::new(uffd);
        let child = match at {
            HandlerAt::Thread => {
                let src = source_page()?;
                let h = Arc::clone(&uffd);
                std::thread::Builder::new()
                    .name("bare-uffd".into())
                    .spawn(move || handler(&h, &src))
                    .map_err(|e| format!("uffd floor: cannot start the handler: {e}"))?;
                None
            }
            HandlerAt::Process => Some(spawn_handler_process(&uffd)?),
        };
        Ok(UffdFloor {
            touched: vec![false; bytes / PAGE],
            n_touched: 0,
            region,
            _uffd: uffd,
            child,
        })
    }

    /// Times `samples` faults (after a warm-up), each after a busy-wait of yields for
    /// `gap`: (p50, p99) in µs.
    pub(crate) fn sample(
        &mut self,
        samples: usize,
        gap: Duration,
        rng: &mut Rng,
    ) -> Result<(f64, f64), String> {
        let pages = self.touched.len();
        let mut h = latency_histogram();
        let warmup = (samples / 10).clamp(100, 2_000);
        for i in 0..warmup + samples {
            if self.n_touched * 2 >= pages {
                dontneed(self.region.addr(), self.region.len())
                    .map_err(|e| format!("uffd floor: MADV_DONTNEED: {e}"))?;
                self.touched.iter_mut().for_each(|t| *t = false);
                self.n_touched = 0;
            }
            let p = loop {
                let p = rng.below(pages as u64) as usize;
                if !self.touched[p] {
                    break p;
                }
            };
            let addr = self.region.addr() + (p * PAGE) as u64;
            pause(gap);
            let t = Instant::now();
            let v = read_word(addr);
            let ns = t.elapsed().as_nanos() as u64;
            self.touched[p] = true;
            self.n_touched += 1;
            if v != 0x5A5A_5A5A_5A5A_5A5A {
                return Err(format!("uffd floor: page read back {v:#x}"));
            }
            if i >= warmup {
                h.saturating_record(ns.max(1));
            }
        }
        Ok((quantile_us(&h, 0.5), quantile_us(&h, 0.99)))
    }
}

/// The 4 KiB every fault of the floor is filled with.
fn source_page() -> Result<Mapping, String> {
    let src = Mapping::anonymous(PAGE).map_err(|e| format!("uffd floor mmap: {e}"))?;
    dmem_pager::sys::mapping_write(&src, 0, &[0x5Au8; PAGE]);
    Ok(src)
}

/// Starts `dmem-bench uffd-handler` with one end of a socket pair as its
/// stdin and sends it the uffd over that socket.
fn spawn_handler_process(uffd: &Uffd) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("uffd floor: socketpair: {e}"))?;
    // SAFETY: `theirs` is a live socket we own; Stdio takes the ownership.
    let stdin = unsafe { Stdio::from_raw_fd(theirs.into_raw_fd()) };
    let child = Command::new(exe)
        .arg("uffd-handler")
        .stdin(stdin)
        .spawn()
        .map_err(|e| format!("uffd floor: cannot start the handler process: {e}"))?;
    send_with_fds(ours.as_raw_fd(), b"uffd", &[uffd.as_raw_fd()])
        .map_err(|e| format!("uffd floor: cannot hand the uffd over: {e}"))?;
    Ok(child)
}

/// `dmem-bench uffd-handler`: receives a uffd on stdin (a unix socket) and
/// serves its faults until killed.
pub(crate) fn run_handler_process() -> Result<(), String> {
    let mut buf = [0u8; 16];
    let (_, mut fds) =
        recv_with_fds(0, &mut buf).map_err(|e| format!("uffd-handler: no uffd on stdin: {e}"))?;
    let fd = fds.pop().ok_or("uffd-handler: no uffd on stdin")?;
    // SAFETY: `fd` is the userfaultfd the parent just sent; the Uffd takes
    // its ownership.
    let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
    handler(&uffd, &source_page()?);
    Err("uffd-handler: the handler stopped".into())
}

/// The minimal handler: one blocking read, one copy (which wakes the
/// faulting thread), repeat.
fn handler(uffd: &Uffd, src: &Mapping) {
    loop {
        match uffd.read_event() {
            Ok(Some(Event::Pagefault { addr, .. })) => {
                let dst = (addr as usize & !(PAGE - 1)) as *mut libc::c_void;
                // SAFETY: `dst` is a page of the registered region (the
                // kernel reported a fault there) and `src` a live 4 KiB
                // mapping; UFFDIO_COPY only writes the missing page.
                let r = unsafe { uffd.copy(src.as_ptr().cast(), dst, PAGE, true) };
                if let Err(e) = r {
                    eprintln!("dmem-bench: bare uffd handler: UFFDIO_COPY failed: {e}");
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("dmem-bench: bare uffd handler: read failed: {e}");
                return;
            }
        }
    }
}
