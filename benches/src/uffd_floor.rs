//! Floor 1 of `dmem-bench fault-latency`: the bare userfaultfd round trip.
//! An in-process minimal handler thread reads fault events (blocking read,
//! one event at a time) and resolves each with one `UFFDIO_COPY` of a ready
//! 4 KiB buffer; the measuring thread faults random untouched pages of the
//! registered region and times each read from its own side. Touched pages
//! are dropped with `MADV_DONTNEED` (untimed) once half the region is
//! present, so every timed read is a missing-page fault.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dmem_pager::sys::{dontneed, no_huge_pages, Mapping};
use userfaultfd::{Event, Uffd, UffdBuilder};

use crate::stats::{latency_histogram, quantile_us, Rng};
use crate::sys::{read_word, spin_for, PAGE};

pub(crate) struct UffdFloor {
    region: Mapping,
    touched: Vec<bool>,
    n_touched: usize,
    /// Keeps the registration alive; the handler holds another reference.
    _uffd: Arc<Uffd>,
}

impl UffdFloor {
    /// Registers a `bytes`-long region and starts the handler thread. The
    /// thread lives as long as the process (it blocks in `read(2)`).
    pub(crate) fn start(bytes: usize) -> Result<UffdFloor, String> {
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
        let src = Mapping::anonymous(PAGE).map_err(|e| format!("uffd floor mmap: {e}"))?;
        dmem_pager::sys::mapping_write(&src, 0, &[0x5Au8; PAGE]);
        let h = Arc::clone(&uffd);
        std::thread::Builder::new()
            .name("bare-uffd".into())
            .spawn(move || handler(&h, &src))
            .map_err(|e| format!("uffd floor: cannot start the handler: {e}"))?;
        Ok(UffdFloor {
            touched: vec![false; bytes / PAGE],
            n_touched: 0,
            region,
            _uffd: uffd,
        })
    }

    /// Times `samples` faults (after a warm-up), each after busy-waiting
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
            spin_for(gap);
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
