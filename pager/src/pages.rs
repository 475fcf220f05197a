//! Per-page state of an app's managed memory, in dense arrays: one
//! 16-byte `PageMeta` per 4 KiB page of each region, no hash map entry per
//! page. The arrays are allocated in chunks of 512 pages on first change, so
//! a large reserved arena costs metadata only where it is used. Regions are the arena plus any range the app `mremap`s its
//! managed memory to.
//!
//! A page is in exactly one place: nowhere (`Zero`: never touched, or
//! freed by the app), present in the app (`Resident`), on its way out
//! (`Evicting`), in a pager cache frame (`Cached`), only on a memory node
//! (`Remote`) or on its way in (`Fetching`). Independently of the place,
//! `slot` is the remote copy (if any) and `dirty` says whether the page's
//! content differs from it. The invariant that makes eviction safe:
//! `!dirty` implies the content equals the remote copy, or zeros when there
//! is no remote copy.
//!
//! `slot` names one remote location. With replicas (a later issue) it names
//! a replica group whose members the placement layer resolves, so this
//! layout does not change.

use crate::sys::PAGE;

pub const NO_SLOT: u32 = u32::MAX;
pub const NO_FRAME: u32 = u32::MAX;
/// `frame` of a resident page that the evictor has passed over once
/// because it was dirty (see `evict`: dirty pages get a second round).
/// Only meaningful while `Resident`; any move into `Resident` resets it.
pub const SPARED: u32 = u32::MAX - 1;
/// `frame` of a resident page (spared already) that the agent could not
/// move out (shared with a forked child): the next eviction write-protects
/// it first, so that the agent may copy it out and drop it.
pub const UNMOVABLE: u32 = u32::MAX - 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Place {
    #[default]
    Zero = 0,
    Resident = 1,
    Evicting = 2,
    Cached = 3,
    Remote = 4,
    Fetching = 5,
}

/// Flag bits of `PageMeta::flags`.
pub mod flag {
    /// Content differs from the remote copy (or from zeros without one).
    pub const DIRTY: u8 = 1;
    /// The agent's own MADV_DONTNEED of this page is yet to be seen as a
    /// REMOVE event; that event must not be taken for the app's.
    pub const OUR_REMOVE: u8 = 2;
    /// A write-back of this cached page is in flight.
    pub const WRITEBACK: u8 = 4;
    /// Brought in by the prefetcher and not yet faulted on.
    pub const PREFETCHED: u8 = 8;
    /// Queued in the resident FIFO.
    pub const IN_RESIDENT_FIFO: u8 = 16;
    /// Queued in the cache FIFO.
    pub const IN_CACHE_FIFO: u8 = 32;
    /// Last brought in by the prefetcher as part of a stream: when clean, it
    /// is dropped at eviction instead of taking a cache frame (a stream
    /// rarely comes back soon).
    pub const STREAMED: u8 = 64;
    /// Took a write-protect fault (read, then written) while resident: a
    /// read-modify-write page. It comes back writable (and dirty), which
    /// saves the write-protect fault that would follow its next read fault
    /// (a numpy/BLAS output array is read and written on every pass).
    pub const REWRITTEN: u8 = 128;
}

/// 16 bytes per page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct PageMeta {
    pub place: Place,
    pub flags: u8,
    /// Bumped each time a fetch starts, so a late fetch never installs.
    pub gen: u16,
    /// Cache frame, when `Cached`.
    pub frame: u32,
    /// Remote copy, or `NO_SLOT`.
    pub slot: u32,
    /// CRC32C of the remote copy.
    pub crc: u32,
}

const _: () = assert!(std::mem::size_of::<PageMeta>() == 16);

impl Default for PageMeta {
    fn default() -> Self {
        PageMeta::UNTOUCHED
    }
}

impl PageMeta {
    /// A page never touched: no content anywhere.
    pub const UNTOUCHED: PageMeta = PageMeta {
        place: Place::Zero,
        flags: 0,
        gen: 0,
        frame: NO_FRAME,
        slot: NO_SLOT,
        crc: 0,
    };

    pub fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    pub fn set(&mut self, f: u8) {
        self.flags |= f;
    }
    pub fn clear(&mut self, f: u8) {
        self.flags &= !f;
    }
    pub fn dirty(&self) -> bool {
        self.has(flag::DIRTY)
    }
}

/// Pages per metadata chunk: a chunk is allocated the first time one of its
/// pages changes, so a huge, mostly unused arena costs almost nothing.
const CHUNK: usize = 512;

/// What pages of untouched chunks read as.
static UNTOUCHED: PageMeta = PageMeta::UNTOUCHED;

/// A contiguous range of managed pages.
pub struct Region {
    pub start: u64,
    len: usize,
    chunks: Vec<Option<Box<[PageMeta]>>>,
}

impl Region {
    fn new(start: u64, len: usize) -> Region {
        Region {
            start,
            len,
            chunks: (0..len.div_ceil(CHUNK)).map(|_| None).collect(),
        }
    }

    pub fn end(&self) -> u64 {
        self.start + (self.len * PAGE) as u64
    }

    fn get(&self, i: usize) -> Option<&PageMeta> {
        if i >= self.len {
            return None;
        }
        Some(match &self.chunks[i / CHUNK] {
            Some(c) => &c[i % CHUNK],
            None => &UNTOUCHED,
        })
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut PageMeta> {
        if i >= self.len {
            return None;
        }
        let c = self.chunks[i / CHUNK]
            .get_or_insert_with(|| vec![PageMeta::default(); CHUNK].into_boxed_slice());
        Some(&mut c[i % CHUNK])
    }
}

/// All regions of one app, sorted by start, non-overlapping.
#[derive(Default)]
pub struct PageTable {
    regions: Vec<Region>,
}

impl PageTable {
    pub fn new(start: u64, len: usize) -> PageTable {
        let mut t = PageTable::default();
        t.add_region(start, len);
        t
    }

    /// Adds the pages of `[start, start+len)` not yet covered by a region.
    pub fn add_region(&mut self, start: u64, len: usize) {
        let end = start + len as u64;
        let mut at = start;
        while at < end {
            if let Some(r) = self.regions.iter().find(|r| r.start <= at && at < r.end()) {
                at = r.end();
                continue;
            }
            let next = self
                .regions
                .iter()
                .map(|r| r.start)
                .filter(|&s| s > at)
                .min()
                .unwrap_or(u64::MAX)
                .min(end);
            let n = ((next - at) as usize) / PAGE;
            self.regions.push(Region::new(at, n));
            at = next;
        }
        self.regions.sort_by_key(|r| r.start);
    }

    /// The page at `addr` (any address inside it).
    pub fn get(&self, addr: u64) -> Option<&PageMeta> {
        let i = self.index(addr)?;
        let r = &self.regions[i];
        r.get(((addr - r.start) as usize) / PAGE)
    }

    pub fn get_mut(&mut self, addr: u64) -> Option<&mut PageMeta> {
        let i = self.index(addr)?;
        let r = &mut self.regions[i];
        r.get_mut(((addr - r.start) as usize) / PAGE)
    }

    fn index(&self, addr: u64) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.start <= addr);
        if i == 0 {
            return None;
        }
        let r = &self.regions[i - 1];
        (addr < r.end()).then_some(i - 1)
    }

    /// Page addresses of the `block`-byte aligned block around `addr` that
    /// lie in the same region.
    pub fn block_of(&self, addr: u64, block: usize) -> std::ops::Range<u64> {
        let page = addr & !(PAGE as u64 - 1);
        let Some(i) = self.index(page) else {
            return page..page + PAGE as u64;
        };
        let r = &self.regions[i];
        let b = block as u64;
        let lo = (page & !(b - 1)).max(r.start);
        let hi = ((page & !(b - 1)) + b).min(r.end());
        lo..hi
    }

    /// Every page that ever changed, in every region (for teardown);
    /// untouched pages hold nothing to release.
    pub fn all_mut(&mut self) -> impl Iterator<Item = (u64, &mut PageMeta)> {
        self.regions.iter_mut().flat_map(|r| {
            let s = r.start;
            let len = r.len;
            r.chunks
                .iter_mut()
                .enumerate()
                .filter_map(|(k, c)| c.as_mut().map(|c| (k, c)))
                .flat_map(move |(k, c)| {
                    c.iter_mut()
                        .enumerate()
                        .map(move |(i, m)| (k * CHUNK + i, m))
                        .take_while(move |(i, _)| *i < len)
                        .map(move |(i, m)| (s + (i * PAGE) as u64, m))
                })
        })
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> usize {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Bytes of page metadata actually allocated.
    pub fn metadata_bytes(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|r| r.chunks.iter())
            .filter(|c| c.is_some())
            .count()
            * CHUNK
            * std::mem::size_of::<PageMeta>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_and_blocks() {
        let mut t = PageTable::new(0x10000, 16 * PAGE);
        assert!(t.get(0xffff).is_none());
        assert!(t.get(0x10000).is_some());
        assert!(t.get(0x10000 + 16 * PAGE as u64).is_none());
        t.get_mut(0x10001).unwrap().place = Place::Resident;
        assert_eq!(t.get(0x10fff).unwrap().place, Place::Resident);
        let b = t.block_of(0x12345, 4 * PAGE);
        assert_eq!(b, 0x10000..0x14000);
        t.add_region(0x18000, 32 * PAGE);
        assert_eq!(t.pages(), 16 + 24);
        assert!(t.get(0x37fff).is_some());
        assert!(t.get(0x38000).is_none());
    }

    #[test]
    fn metadata_is_allocated_only_where_pages_change() {
        // 64 GiB of arena: nothing allocated until a page changes.
        let mut t = PageTable::new(1 << 40, 64 << 30);
        assert_eq!(t.pages(), 16 << 20);
        assert_eq!(t.metadata_bytes(), 0);
        assert_eq!(t.get((1 << 40) + (5 << 30)).unwrap().place, Place::Zero);
        assert_eq!(t.metadata_bytes(), 0);
        let a = (1 << 40) + (5 << 30) + 3 * PAGE as u64;
        t.get_mut(a).unwrap().place = Place::Cached;
        assert_eq!(t.metadata_bytes(), CHUNK * 16);
        assert_eq!(t.get(a).unwrap().place, Place::Cached);
        let seen: Vec<u64> = t
            .all_mut()
            .filter(|(_, m)| m.place != Place::Zero)
            .map(|(p, _)| p)
            .collect();
        assert_eq!(seen, vec![a]);
    }
}
