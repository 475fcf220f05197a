//! Page-granular allocator over the managed arena: which byte ranges are
//! handed out and which are free. Pure bookkeeping, no memory access: the
//! arena itself is only touched by the program.
//!
//! Free extents are kept twice, by address (to merge neighbours) and by
//! (length, address) (best fit, lowest address first), so allocation and
//! release are O(log n). Allocated ranges are kept by start address; a
//! release may cover part of an allocation (`munmap` of part of a mapping),
//! which splits it. Ranges where the program placed a mapping of its own
//! over managed memory (`mmap` with `MAP_FIXED` of a file, say) are kept
//! as *foreign*: the arena's mapping must be put back there when the
//! program lets go of them.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

/// Granule of every range: one page.
pub const GRANULE: u64 = 4096;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ExtentError {
    #[error("range {0:#x}+{1:#x} is not inside an allocation")]
    NotAllocated(u64, u64),
    #[error("range {0:#x}+{1:#x} is not inside the arena")]
    OutsideArena(u64, u64),
}

pub struct Extents {
    base: u64,
    end: u64,
    free_by_addr: BTreeMap<u64, u64>,
    free_by_len: BTreeSet<(u64, u64)>,
    used: BTreeMap<u64, u64>,
    used_bytes: u64,
    foreign: BTreeMap<u64, u64>,
}

impl Extents {
    /// All of `[base, base+len)` free. Both must be page multiples.
    pub fn new(base: u64, len: u64) -> Extents {
        let mut e = Extents {
            base,
            end: base + len,
            free_by_addr: BTreeMap::new(),
            free_by_len: BTreeSet::new(),
            used: BTreeMap::new(),
            used_bytes: 0,
            foreign: BTreeMap::new(),
        };
        if len > 0 {
            e.insert_free(base, len);
        }
        e
    }

    /// Bytes handed out.
    #[cfg(test)]
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Allocated ranges, in address order.
    pub fn allocations(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.used.iter().map(|(&a, &l)| (a, l))
    }

    /// Allocates `len` bytes (rounded up to pages) aligned to `align` (a
    /// power of two; at least a page is implied). Returns the start.
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let len = round_up(len.max(1), GRANULE);
        let align = align.max(GRANULE);
        let need = len.checked_add(align - GRANULE)?;
        let &(flen, fstart) = self.free_by_len.range((need, 0)..).next()?;
        self.remove_free(fstart, flen);
        let start = round_up(fstart, align);
        if start > fstart {
            self.insert_free(fstart, start - fstart);
        }
        let end = start + len;
        if end < fstart + flen {
            self.insert_free(end, fstart + flen - end);
        }
        self.used.insert(start, len);
        self.used_bytes += len;
        Some(start)
    }

    /// Length of the allocation starting exactly at `start`.
    pub fn len_at(&self, start: u64) -> Option<u64> {
        self.used.get(&start).copied()
    }

    /// Grows the allocation at `start` in place to `new_len` (rounded up)
    /// if the bytes after it are free. Returns whether it did.
    pub fn grow_in_place(&mut self, start: u64, new_len: u64) -> bool {
        let new_len = round_up(new_len, GRANULE);
        let Some(&old) = self.used.get(&start) else {
            return false;
        };
        if new_len <= old {
            return true;
        }
        let end = start + old;
        let Some(&flen) = self.free_by_addr.get(&end) else {
            return false;
        };
        let extra = new_len - old;
        if flen < extra {
            return false;
        }
        self.remove_free(end, flen);
        if flen > extra {
            self.insert_free(end + extra, flen - extra);
        }
        self.used.insert(start, new_len);
        self.used_bytes += extra;
        true
    }

    /// Releases `[start, start+len)` (rounded out to pages), which must lie
    /// inside allocations; allocations it cuts are split. A range that is
    /// not wholly allocated is refused and changes nothing.
    pub fn release(&mut self, start: u64, len: u64) -> Result<(), ExtentError> {
        let (lo, hi) = page_span(start, len);
        // Check coverage first so a bad call changes nothing.
        let sorted = overlapping(&self.used, lo, hi);
        let mut at = lo;
        for &(a, l) in &sorted {
            if a > at {
                return Err(ExtentError::NotAllocated(start, len));
            }
            at = at.max(a + l);
        }
        if at < hi {
            return Err(ExtentError::NotAllocated(start, len));
        }
        for (a, l) in sorted {
            self.used.remove(&a);
            self.used_bytes -= l;
            let (cut_lo, cut_hi) = (a.max(lo), (a + l).min(hi));
            if a < cut_lo {
                self.used.insert(a, cut_lo - a);
                self.used_bytes += cut_lo - a;
            }
            if cut_hi < a + l {
                self.used.insert(cut_hi, a + l - cut_hi);
                self.used_bytes += a + l - cut_hi;
            }
            self.free_merged(cut_lo, cut_hi - cut_lo);
        }
        Ok(())
    }

    /// The allocated parts of `[start, start+len)` (rounded out to pages),
    /// clipped to it, in address order.
    pub fn allocated_parts(&self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let (lo, hi) = page_span(start, len);
        clip(overlapping(&self.used, lo, hi), lo, hi)
    }

    /// The allocation holding the last page of `[start, start+len)` when
    /// the whole range is allocated (an mremap source), else None.
    pub fn allocated_span(&self, start: u64, len: u64) -> Option<(u64, u64)> {
        let (lo, hi) = page_span(start, len);
        let parts = self.allocated_parts(lo, hi - lo);
        let covered: u64 = parts.iter().map(|&(_, l)| l).sum();
        if covered != hi - lo {
            return None;
        }
        self.used.range(..hi).next_back().map(|(&a, &l)| (a, l))
    }

    /// Makes every free page of `[start, start+len)` allocated (the program
    /// placed a mapping at that address itself), each free stretch an
    /// allocation of its own.
    pub fn claim(&mut self, start: u64, len: u64) -> Result<(), ExtentError> {
        let (lo, hi) = page_span(start, len);
        if lo < self.base || hi > self.end {
            return Err(ExtentError::OutsideArena(start, len));
        }
        for (fs, fl) in overlapping(&self.free_by_addr, lo, hi) {
            self.remove_free(fs, fl);
            let (a, b) = (fs.max(lo), (fs + fl).min(hi));
            if fs < a {
                self.insert_free(fs, a - fs);
            }
            if b < fs + fl {
                self.insert_free(b, fs + fl - b);
            }
            self.used.insert(a, b - a);
            self.used_bytes += b - a;
        }
        Ok(())
    }

    /// Records that `[start, start+len)` holds a mapping of the program's.
    pub fn mark_foreign(&mut self, start: u64, len: u64) {
        let (lo, hi) = page_span(start, len);
        self.take_foreign(lo, hi - lo);
        self.foreign.insert(lo, hi - lo);
    }

    /// Whether any of `[start, start+len)` holds a mapping of the program's.
    pub fn has_foreign(&self, start: u64, len: u64) -> bool {
        let (lo, hi) = page_span(start, len);
        !overlapping(&self.foreign, lo, hi).is_empty()
    }

    /// Forgets and returns the foreign parts of `[start, start+len)`
    /// (clipped to it); the caller maps the arena there again.
    pub fn take_foreign(&mut self, start: u64, len: u64) -> Vec<(u64, u64)> {
        let (lo, hi) = page_span(start, len);
        let hits = overlapping(&self.foreign, lo, hi);
        for &(a, l) in &hits {
            self.foreign.remove(&a);
            if a < lo {
                self.foreign.insert(a, lo - a);
            }
            if a + l > hi {
                self.foreign.insert(hi, a + l - hi);
            }
        }
        clip(hits, lo, hi)
    }

    fn free_merged(&mut self, mut start: u64, mut len: u64) {
        if let Some((&pa, &pl)) = self.free_by_addr.range(..start).next_back() {
            if pa + pl == start {
                self.remove_free(pa, pl);
                start = pa;
                len += pl;
            }
        }
        if let Some(&nl) = self.free_by_addr.get(&(start + len)) {
            self.remove_free(start + len, nl);
            len += nl;
        }
        self.insert_free(start, len);
    }

    fn insert_free(&mut self, start: u64, len: u64) {
        self.free_by_addr.insert(start, len);
        self.free_by_len.insert((len, start));
    }

    fn remove_free(&mut self, start: u64, len: u64) {
        self.free_by_addr.remove(&start);
        self.free_by_len.remove(&(len, start));
    }
}

/// `v` rounded up to a multiple of `to` (a power of two). Sizes too large
/// to round saturate at the largest multiple, which no extent can hold, so
/// `malloc(SIZE_MAX)` fails instead of wrapping to an empty block.
pub fn round_up(v: u64, to: u64) -> u64 {
    v.checked_next_multiple_of(to).unwrap_or(!(to - 1))
}

/// `[start, start+len)` rounded out to whole pages, as (lo, hi).
fn page_span(start: u64, len: u64) -> (u64, u64) {
    (
        start & !(GRANULE - 1),
        round_up(start + len.max(1), GRANULE),
    )
}

/// Entries of a start → length map that overlap `[lo, hi)`, in order.
fn overlapping(map: &BTreeMap<u64, u64>, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = map
        .range(..hi)
        .rev()
        .take_while(|(&a, &l)| a + l > lo)
        .map(|(&a, &l)| (a, l))
        .collect();
    v.reverse();
    v
}

fn clip(parts: Vec<(u64, u64)>, lo: u64, hi: u64) -> Vec<(u64, u64)> {
    parts
        .into_iter()
        .map(|(a, l)| {
            let (s, e) = (a.max(lo), (a + l).min(hi));
            (s, e - s)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_too_large_to_round_fail_instead_of_wrapping() {
        assert_eq!(round_up(u64::MAX, GRANULE), !(GRANULE - 1));
        assert_eq!(round_up(4097, GRANULE), 8192);
        let mut e = Extents::new(0x1000_0000, 1 << 30);
        assert_eq!(e.alloc(u64::MAX, 16), None);
        assert_eq!(e.alloc(u64::MAX - 4095, 16), None);
    }

    const B: u64 = 0x1000_0000;

    #[test]
    fn alloc_free_merges_back_to_one_extent() {
        let mut e = Extents::new(B, 64 * GRANULE);
        let a = e.alloc(1, 16).unwrap();
        let b = e.alloc(3 * GRANULE, 16).unwrap();
        let c = e.alloc(GRANULE + 1, 16).unwrap();
        assert_eq!((a, b, c), (B, B + GRANULE, B + 4 * GRANULE));
        assert_eq!(e.used_bytes(), 6 * GRANULE);
        e.release(b, 3 * GRANULE).unwrap();
        e.release(a, 1).unwrap();
        e.release(c, e.len_at(c).unwrap()).unwrap();
        assert_eq!(e.used_bytes(), 0);
        assert_eq!(e.free_by_addr.len(), 1);
        assert_eq!(e.alloc(64 * GRANULE, 16), Some(B));
        assert_eq!(e.alloc(1, 16), None);
    }

    #[test]
    fn best_fit_and_alignment() {
        let mut e = Extents::new(B, 1024 * GRANULE);
        let big = e.alloc(2 << 20, 2 << 20).unwrap();
        assert_eq!(big % (2 << 20), 0);
        let x = e.alloc(GRANULE, 16).unwrap();
        assert!(x < big || x >= big + (2 << 20));
    }

    #[test]
    fn partial_release_splits() {
        let mut e = Extents::new(B, 16 * GRANULE);
        let a = e.alloc(8 * GRANULE, 16).unwrap();
        e.release(a + 2 * GRANULE, 2 * GRANULE).unwrap();
        assert_eq!(e.len_at(a), Some(2 * GRANULE));
        assert_eq!(e.len_at(a + 2 * GRANULE), None);
        assert_eq!(e.len_at(a + 4 * GRANULE), Some(4 * GRANULE));
        assert_eq!(e.used_bytes(), 6 * GRANULE);
        // Releasing something already free is refused and changes nothing.
        assert!(e.release(a + 2 * GRANULE, GRANULE).is_err());
        assert_eq!(e.used_bytes(), 6 * GRANULE);
        // A release spanning two allocations and the freed gap is refused.
        assert!(e.release(a, 8 * GRANULE).is_err());
    }

    #[test]
    fn claim_takes_only_the_free_pages_and_refuses_outside() {
        let mut e = Extents::new(B, 16 * GRANULE);
        let a = e.alloc(2 * GRANULE, 16).unwrap();
        e.claim(a + GRANULE, 4 * GRANULE).unwrap();
        assert_eq!(e.len_at(a), Some(2 * GRANULE));
        assert_eq!(e.len_at(a + 2 * GRANULE), Some(3 * GRANULE));
        assert_eq!(e.used_bytes(), 5 * GRANULE);
        assert_eq!(
            e.allocated_parts(a + GRANULE, 10 * GRANULE),
            vec![(a + GRANULE, GRANULE), (a + 2 * GRANULE, 3 * GRANULE)]
        );
        assert_eq!(
            e.allocated_span(a, 5 * GRANULE),
            Some((a + 2 * GRANULE, 3 * GRANULE))
        );
        assert_eq!(e.allocated_span(a, 6 * GRANULE), None);
        assert!(e.claim(B + 15 * GRANULE, 2 * GRANULE).is_err());
        assert!(e.claim(B - GRANULE, GRANULE).is_err());
        // What is left is still allocatable, and claimed pages are not.
        let b = e.alloc(GRANULE, 16).unwrap();
        assert_eq!(b, a + 5 * GRANULE);
    }

    #[test]
    fn foreign_ranges_are_split_and_taken_back() {
        let mut e = Extents::new(B, 64 * GRANULE);
        e.mark_foreign(B + 4 * GRANULE, 8 * GRANULE);
        assert!(e.has_foreign(B, 5 * GRANULE));
        assert!(!e.has_foreign(B, 4 * GRANULE));
        let got = e.take_foreign(B + 6 * GRANULE, 2 * GRANULE);
        assert_eq!(got, vec![(B + 6 * GRANULE, 2 * GRANULE)]);
        assert!(e.has_foreign(B + 5 * GRANULE, GRANULE));
        assert!(!e.has_foreign(B + 6 * GRANULE, 2 * GRANULE));
        assert!(e.has_foreign(B + 8 * GRANULE, GRANULE));
        let rest = e.take_foreign(B, 64 * GRANULE);
        assert_eq!(
            rest,
            vec![
                (B + 4 * GRANULE, 2 * GRANULE),
                (B + 8 * GRANULE, 4 * GRANULE)
            ]
        );
        assert!(!e.has_foreign(B, 64 * GRANULE));
    }

    #[test]
    fn grow_in_place_uses_following_free_space() {
        let mut e = Extents::new(B, 16 * GRANULE);
        let a = e.alloc(2 * GRANULE, 16).unwrap();
        assert!(e.grow_in_place(a, 5 * GRANULE));
        assert_eq!(e.len_at(a), Some(5 * GRANULE));
        let b = e.alloc(GRANULE, 16).unwrap();
        assert_eq!(b, a + 5 * GRANULE);
        assert!(!e.grow_in_place(a, 6 * GRANULE));
        assert_eq!(e.used_bytes(), 6 * GRANULE);
    }
}
