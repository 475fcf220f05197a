//! OS calls of the memory node: the anonymous mappings behind slabs.

use std::io;
use std::ptr::NonNull;

const PAGE: usize = 4096;
const HUGE_PAGE: usize = 2 << 20;

/// One slab's memory: a private anonymous mapping, reserved lazily (pages
/// are only backed once written) and returned to the OS on drop.
pub struct SlabMem {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: SlabMem owns its mapping exclusively; the raw pointer is never
// shared outside it, and mutation requires `&mut self`.
unsafe impl Send for SlabMem {}
// SAFETY: shared references only read, through bounds-checked copies.
unsafe impl Sync for SlabMem {}

impl SlabMem {
    /// Maps `len` bytes (rounded up to a page). Slabs of 2 MiB and more ask
    /// for transparent huge pages: fewer TLB misses on random access and
    /// fewer page faults when a pager fills a slab.
    pub fn new(len: usize) -> io::Result<SlabMem> {
        let len = len.div_ceil(PAGE).max(1) * PAGE;
        // SAFETY: a fresh private anonymous mapping at an address of the
        // kernel's choosing touches no existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        if len >= HUGE_PAGE {
            // SAFETY: advice on the mapping just created; failure (THP
            // disabled) is harmless, so its result is ignored.
            unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(p.cast::<u8>()).expect("mmap returned a null mapping");
        Ok(SlabMem { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Start of the mapping (to register it for RDMA; it stays mapped
    /// while `self` lives).
    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, n: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(n)? <= self.len).then_some(off)
    }

    /// The `len` bytes at `offset`, or `None` when out of bounds. Callers
    /// copy straight from this view (no zero-filled staging buffer).
    pub fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let off = self.check(offset, len)?;
        // SAFETY: off + len <= self.len (checked above), so the pointer stays
        // inside the mapping.
        let start = unsafe { self.ptr.as_ptr().add(off) };
        // SAFETY: [off, off+len) lies inside the mapping, which is readable
        // and lives as long as `self`; mutation needs `&mut self`, so nothing
        // writes it while this shared view exists.
        Some(unsafe { std::slice::from_raw_parts(start, len) })
    }

    /// Copies `data` to `offset`; `false` when out of bounds.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> bool {
        let Some(off) = self.check(offset, data.len()) else {
            return false;
        };
        // SAFETY: off + data.len() <= self.len (checked above), so the
        // pointer stays inside the mapping.
        let dst = unsafe { self.ptr.as_ptr().add(off) };
        // SAFETY: the range is inside the mapping (checked above), we hold
        // `&mut self`, and `data` cannot alias our private mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        true
    }
}

impl Drop for SlabMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no references
        // into it outlive `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Bytes of memory the kernel reports as available (MemAvailable), if known.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mut m = SlabMem::new(10_000).unwrap();
        assert_eq!(m.len(), 12_288);
        assert!(m.write_at(12_288 - 4, b"abcd"));
        assert!(!m.write_at(12_288 - 3, b"abcd"));
        assert!(!m.write_at(u64::MAX, b"a"));
        assert_eq!(m.bytes(12_288 - 4, 4), Some(&b"abcd"[..]));
        assert_eq!(m.bytes(12_288, 4), None);
        assert_eq!(m.bytes(u64::MAX, 1), None);
        assert_eq!(
            m.bytes(0, 8),
            Some(&[0u8; 8][..]),
            "unwritten memory reads as zeros"
        );
    }
}
