//! Freed blocks kept for reuse ("warm" blocks), as glibc's heap keeps them.
//!
//! Without this, every free of a managed block drops its pages
//! (`MADV_DONTNEED`, a REMOVE event the pager must read before the app goes
//! on) and the next block of that size is zero-filled by the pager page by
//! page. numpy allocates and frees a temporary of the same size on every
//! iteration of a loop; under plain glibc (whose mmap threshold rises to
//! the size of a freed block, up to 32 MiB) those come back from the heap
//! with no fault at all.
//!
//! A warm block's content is whatever the program left in it, so only
//! callers that need no zeros (malloc, realloc, the aligned family) take
//! one; calloc and anonymous mmaps get zeroed blocks from the free lists.
//! The budget is small (`DMEM_KEEP_FREED`, capped at an eighth of the local
//! limit): warm blocks occupy local memory the pager would otherwise give
//! to live data. No allocation here: a fixed table, oldest first.

/// Blocks larger than this are never kept (glibc's largest mmap threshold).
pub const MAX_BLOCK: u64 = 32 << 20;
/// Most blocks kept at once.
const SLOTS: usize = 32;

pub struct Warm {
    /// (start, len), oldest first; `n` entries used.
    blocks: [(u64, u64); SLOTS],
    n: usize,
    bytes: u64,
    budget: u64,
}

impl Warm {
    pub const fn new() -> Warm {
        Warm {
            blocks: [(0, 0); SLOTS],
            n: 0,
            bytes: 0,
            budget: 0,
        }
    }

    pub fn set_budget(&mut self, budget: u64) {
        self.budget = budget;
    }

    #[cfg(test)]
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a kept block starts at `start` (freeing it again is a
    /// double free).
    pub fn holds(&self, start: u64) -> bool {
        self.blocks[..self.n].iter().any(|&(s, _)| s == start)
    }

    /// Whether `[start, start+len)` is exactly a kept block.
    pub fn holds_block(&self, start: u64, len: u64) -> bool {
        self.blocks[..self.n].contains(&(start, len))
    }

    /// Keeps the freed block `[start, start+len)`. Returns the blocks that
    /// must be dropped for real instead: the block itself when it does not
    /// fit, else the oldest ones pushed out to make room (at most `SLOTS`).
    pub fn keep(&mut self, start: u64, len: u64) -> Evicted {
        let mut out = Evicted::default();
        if len > MAX_BLOCK || len > self.budget {
            out.push((start, len));
            return out;
        }
        while self.n == SLOTS || self.bytes + len > self.budget {
            out.push(self.remove(0));
        }
        self.blocks[self.n] = (start, len);
        self.n += 1;
        self.bytes += len;
        out
    }

    /// A kept block of at least `len` bytes (and at most a quarter more, so
    /// that a small request does not take a large block) starting at a
    /// multiple of `align`; the newest such block, whose pages are likeliest
    /// still local.
    pub fn take(&mut self, len: u64, align: u64) -> Option<(u64, u64)> {
        let fits = |&(s, l): &(u64, u64)| l >= len && l <= len + len / 4 && s % align == 0;
        let i = self.blocks[..self.n].iter().rposition(fits)?;
        Some(self.remove(i))
    }

    /// Forgets every kept block overlapping `[start, start+len)` (the
    /// program unmapped or mapped over memory it had freed) and returns them.
    pub fn forget_overlapping(&mut self, start: u64, len: u64) -> Evicted {
        let mut out = Evicted::default();
        let mut i = 0;
        while i < self.n {
            let (s, l) = self.blocks[i];
            if s < start.saturating_add(len) && start < s + l {
                out.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    /// Forgets every kept block holding one of `sorted` (ascending
    /// addresses) and returns them.
    pub fn forget_holding(&mut self, sorted: &[u64]) -> Evicted {
        let mut out = Evicted::default();
        let mut i = 0;
        while i < self.n {
            let (s, l) = self.blocks[i];
            let first = sorted.partition_point(|&a| a < s);
            if sorted.get(first).is_some_and(|&a| a < s + l) {
                out.push(self.remove(i));
            } else {
                i += 1;
            }
        }
        out
    }

    fn remove(&mut self, i: usize) -> (u64, u64) {
        let b = self.blocks[i];
        self.blocks.copy_within(i + 1..self.n, i);
        self.n -= 1;
        self.bytes -= b.1;
        b
    }
}

/// Blocks leaving the table, to be dropped by the caller outside its lock.
#[derive(Default)]
pub struct Evicted {
    blocks: [(u64, u64); SLOTS],
    n: usize,
}

impl Evicted {
    fn push(&mut self, b: (u64, u64)) {
        self.blocks[self.n] = b;
        self.n += 1;
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.blocks[..self.n].iter().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;

    fn list(e: &Evicted) -> Vec<(u64, u64)> {
        e.iter().collect()
    }

    #[test]
    fn a_freed_block_comes_back_for_the_same_size() {
        let mut w = Warm::new();
        w.set_budget(64 * M);
        assert!(list(&w.keep(0x10_0000, 4 * M)).is_empty());
        assert!(w.holds(0x10_0000));
        assert!(w.holds_block(0x10_0000, 4 * M));
        assert!(
            !w.holds_block(0x10_0000, 8 * M),
            "a longer block is not the kept one"
        );
        assert_eq!(w.take(4 * M, 16), Some((0x10_0000, 4 * M)));
        assert!(!w.holds(0x10_0000));
        assert_eq!(w.take(4 * M, 16), None, "taken once only");
        assert_eq!(w.bytes(), 0);
    }

    #[test]
    fn sizes_must_fit_within_a_quarter_and_alignment_must_hold() {
        let mut w = Warm::new();
        w.set_budget(64 * M);
        let _ = w.keep(0x1000, 4 * M);
        assert_eq!(w.take(5 * M, 16), None, "too small");
        assert_eq!(w.take(3 * M, 16), None, "more than a quarter larger");
        assert_eq!(w.take(4 * M, 1 << 16), None, "misaligned");
        assert_eq!(w.take(3300 * K, 4096), Some((0x1000, 4 * M)));
    }

    #[test]
    fn the_budget_pushes_out_the_oldest_and_big_blocks_are_not_kept() {
        let mut w = Warm::new();
        w.set_budget(10 * M);
        assert!(list(&w.keep(0, 4 * M)).is_empty());
        assert!(list(&w.keep(8 * M, 4 * M)).is_empty());
        assert_eq!(list(&w.keep(16 * M, 4 * M)), vec![(0, 4 * M)]);
        assert_eq!(w.bytes(), 8 * M);
        assert_eq!(list(&w.keep(64 * M, 11 * M)), vec![(64 * M, 11 * M)]);
        let mut big = Warm::new();
        big.set_budget(1 << 40);
        assert_eq!(
            list(&big.keep(0, MAX_BLOCK + 4096)),
            vec![(0, MAX_BLOCK + 4096)]
        );
        let mut none = Warm::new();
        assert_eq!(list(&none.keep(0, 128 * K)), vec![(0, 128 * K)]);
    }

    #[test]
    fn a_full_table_pushes_out_the_oldest() {
        let mut w = Warm::new();
        w.set_budget(1 << 40);
        for i in 0..SLOTS as u64 {
            assert!(list(&w.keep(i * M, 128 * K)).is_empty());
        }
        assert_eq!(list(&w.keep(100 * M, 128 * K)), vec![(0, 128 * K)]);
        assert_eq!(
            w.take(128 * K, 16),
            Some((100 * M, 128 * K)),
            "newest first"
        );
    }

    /// Kept blocks of 1 MiB at 0, 2 and 4 MiB.
    fn three_blocks() -> Warm {
        let mut w = Warm::new();
        w.set_budget(64 * M);
        for start in [0, 2 * M, 4 * M] {
            assert!(list(&w.keep(start, M)).is_empty());
        }
        w
    }

    #[test]
    fn overlapping_blocks_are_forgotten() {
        let mut w = three_blocks();
        assert_eq!(list(&w.forget_overlapping(M + 4096, M)), vec![(2 * M, M)]);
        assert_eq!(list(&w.forget_overlapping(M, 4096)), vec![]);
        assert_eq!(w.bytes(), 2 * M);
        assert_eq!(w.take(M, 16), Some((4 * M, M)));
        assert_eq!(w.take(M, 16), Some((0, M)));
    }

    #[test]
    fn blocks_holding_an_evicted_page_are_forgotten() {
        let mut w = three_blocks();
        // A victim just past the first block, one inside the third.
        let victims = [M, M + 4096, 4 * M + 8192, 9 * M];
        assert_eq!(list(&w.forget_holding(&victims)), vec![(4 * M, M)]);
        assert_eq!(list(&w.forget_holding(&[2 * M])), vec![(2 * M, M)]);
        assert_eq!(list(&w.forget_holding(&[])), vec![]);
        assert_eq!(w.bytes(), M);
    }
}
