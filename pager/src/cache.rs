//! The local cache tier: pager-owned RAM in 4 KiB frames, holding pages
//! recently evicted from apps (their second chance) and prefetched pages.
//! A re-fault served from here costs one UFFDIO_COPY. Which page a frame
//! holds is recorded in the owning app's page table, not here.

use std::sync::Mutex;

use nix::errno::Errno;

use crate::sys::{self, Mapping, PAGE};

pub struct CachePool {
    mem: Mapping,
    free: Mutex<Vec<u32>>,
    frames: usize,
}

impl CachePool {
    pub fn new(bytes: u64) -> Result<CachePool, Errno> {
        let frames = (bytes as usize / PAGE).max(1);
        let mem = Mapping::anonymous(frames * PAGE)?;
        let free = (0..frames as u32).rev().collect();
        Ok(CachePool {
            mem,
            free: Mutex::new(free),
            frames,
        })
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn free_frames(&self) -> usize {
        crate::lock(&self.free).len()
    }

    /// Takes a free frame, if any.
    pub fn alloc(&self) -> Option<u32> {
        crate::lock(&self.free).pop()
    }

    pub fn release(&self, frame: u32) {
        debug_assert!((frame as usize) < self.frames);
        crate::lock(&self.free).push(frame);
    }

    /// Address of a frame, as the source of a UFFDIO_COPY.
    pub fn ptr(&self, frame: u32) -> *const u8 {
        assert!((frame as usize) < self.frames);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.mem.as_ptr().add(frame as usize * PAGE) }
    }

    pub fn write(&self, frame: u32, data: &[u8]) {
        sys::mapping_write(&self.mem, frame as usize * PAGE, &data[..PAGE]);
    }

    pub fn read(&self, frame: u32, out: &mut [u8]) {
        sys::mapping_read(&self.mem, frame as usize * PAGE, &mut out[..PAGE]);
    }
}
