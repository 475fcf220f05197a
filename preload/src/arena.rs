//! The managed arena: one large reservation registered with the pager's
//! userfaultfd, carved into page-granular blocks for large allocations.
//!
//! Invariant: every free byte of the arena reads as zero. Blocks are
//! dropped (`MADV_DONTNEED`) before they return to the free lists, so a
//! fresh block needs no clearing (calloc is free) and the pager forgets
//! freed pages instead of paging them. The exception is the few freed blocks
//! kept for reuse (`warm`): they stay allocated in the lists, and only
//! callers that need no zeros get them.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::extents::{round_up, Extents, GRANULE};
use crate::lock::SpinLock;
use crate::sys;
use crate::warm::{Evicted, Warm, MAX_BLOCK};

static BASE: AtomicU64 = AtomicU64::new(0);
static END: AtomicU64 = AtomicU64::new(0);
static EXTENTS: OnceLock<SpinLock<Extents>> = OnceLock::new();
static FULL_WARNED: AtomicBool = AtomicBool::new(false);
/// Lock order: WARM before EXTENTS (only the atfork handlers hold both).
static WARM: SpinLock<Warm> = SpinLock::new(Warm::new());

/// Starts serving allocations from `[base, base+len)`.
pub fn install(base: u64, len: u64) {
    if EXTENTS.set(SpinLock::new(Extents::new(base, len))).is_ok() {
        BASE.store(base, Ordering::Release);
        END.store(base + len, Ordering::Release);
    }
}

/// Whether `p` points into the arena.
pub fn contains(p: *const c_void) -> bool {
    let a = p as u64;
    a >= BASE.load(Ordering::Acquire) && a < END.load(Ordering::Acquire)
}

/// The arena's bounds, once installed.
pub fn bounds() -> Option<(u64, u64)> {
    EXTENTS
        .get()
        .map(|_| (BASE.load(Ordering::Acquire), END.load(Ordering::Acquire)))
}

/// Whether `[start, start+len)` overlaps the arena.
pub fn overlaps(start: u64, len: u64) -> bool {
    bounds().is_some_and(|(b, e)| start < e && start.saturating_add(len) > b)
}

/// Keeps up to `bytes` of freed blocks for reuse (0: none).
pub fn keep_freed(bytes: u64) {
    WARM.lock().set_budget(bytes);
}

fn extents() -> &'static SpinLock<Extents> {
    EXTENTS.get().expect("arena used before install")
}

/// A zeroed block of at least `size` bytes aligned to `align`; null when
/// the arena is full (the caller then falls back to glibc).
pub fn alloc(size: usize, align: usize) -> *mut c_void {
    let Some(ex) = EXTENTS.get() else {
        return std::ptr::null_mut();
    };
    match ex.lock().alloc(size as u64, align as u64) {
        Some(a) => a as *mut c_void,
        None => {
            if !FULL_WARNED.swap(true, Ordering::Relaxed) {
                sys::write_stderr(
                    "dmem: the managed arena is full (raise DMEM_ARENA); \
                     further large blocks come from glibc, unmanaged\n",
                );
            }
            std::ptr::null_mut()
        }
    }
}

/// A block of at least `size` bytes aligned to `align`, its content
/// undefined: a kept freed block when one fits, else a zeroed one.
pub fn alloc_any(size: usize, align: usize) -> *mut c_void {
    if EXTENTS.get().is_none() {
        return std::ptr::null_mut();
    }
    if size as u64 <= MAX_BLOCK {
        let want = round_up(size.max(1) as u64, GRANULE);
        if let Some((start, _)) = WARM.lock().take(want, align.max(1) as u64) {
            return start as *mut c_void;
        }
    }
    alloc(size, align)
}

/// Size of the block at `p` (0 if `p` does not start a block).
pub fn usable_size(p: *const c_void) -> usize {
    if WARM.lock().holds(p as u64) {
        return 0; // freed
    }
    extents().lock().len_at(p as u64).unwrap_or(0) as usize
}

/// Frees the block at `p`.
pub fn free(p: *mut c_void) {
    let (len, foreign) = {
        let ex = extents().lock();
        let Some(len) = ex.len_at(p as u64) else {
            drop(ex);
            sys::die("dmem: free(): invalid pointer into managed memory (double free?)\n");
        };
        (len, ex.has_foreign(p as u64, len))
    };
    if foreign {
        // The program mapped its own memory into the block: `zero` undoes it.
        release(p as u64, len);
        return;
    }
    let out = {
        let mut warm = WARM.lock();
        if warm.holds(p as u64) {
            drop(warm);
            sys::die("dmem: free(): double free of managed memory\n");
        }
        warm.keep(p as u64, len)
    };
    drop_all(&out);
}

/// The pager evicted `victims` (ascending): kept freed blocks among them
/// are dropped now. Their pages sit in the pager's cache tier, dirty; left
/// there they would be written back to a memory node and fetched again if
/// the block were reused, all for content nobody needs. Dropped, they cost
/// nothing, and a reuse gets zero-filled pages. Kept blocks the evictor has
/// not reached stay for reuse. (Runs on the agent thread, after a batch
/// and before its answer: a victim freed this way is the app freeing a
/// victim in flight, which the pager handles.)
pub fn drop_kept_evicted(victims: &[u64]) {
    let out = WARM.lock().forget_holding(victims);
    drop_all(&out);
}

/// Drops blocks that leave the warm table for real.
fn drop_all(blocks: &Evicted) {
    for (start, len) in blocks.iter() {
        release(start, len);
    }
}

/// Drops `[start, start+len)` and returns it to the free lists. The range
/// is dropped first: until it is back in the lists nobody else can be
/// handed it, so no one's data is ever zapped.
fn release(start: u64, len: u64) {
    zero(start, len);
    if extents().lock().release(start, len).is_err() {
        sys::die("dmem: freed managed memory that was not allocated (double free?)\n");
    }
}

/// Makes `[start, start+len)` (allocated) read as zeros: the arena's own
/// mapping goes back where the program had put one of its own, and the
/// rest is dropped.
pub fn zero(start: u64, len: u64) {
    let foreign = extents().lock().take_foreign(start, len);
    for (a, l) in foreign {
        if let Err(e) = sys::map_anonymous_at(a, l) {
            sys::die(&format!(
                "dmem: cannot map managed memory back at {a:#x} (errno {e})\n"
            ));
        }
        crate::start::register_again(a, l);
    }
    if let Err(e) = sys::dontneed(start, len) {
        sys::die(&format!(
            "dmem: cannot drop freed managed memory at {start:#x} (errno {e})\n"
        ));
    }
}

/// `munmap` of `[start, start+len)` inside the arena: its allocated parts
/// are dropped and freed; parts already free are left alone, as the
/// kernel leaves unmapped holes alone.
pub fn unmap(start: u64, len: u64) {
    // Freed blocks kept for reuse go back whole (not only the unmapped part).
    let kept = WARM.lock().forget_overlapping(start, len);
    drop_all(&kept);
    let parts = extents().lock().allocated_parts(start, len);
    for (a, l) in parts {
        release(a, l);
    }
}

/// Frees the tail `[start, start+len)` of an allocation (a shrinking
/// mremap).
pub fn trim(start: u64, len: u64) {
    if len > 0 {
        release(start, len);
    }
}

/// The program maps `[start, start+len)` itself (MAP_FIXED): its free
/// pages become allocated. False when the range leaves the arena.
pub fn claim(start: u64, len: u64) -> bool {
    // Freed blocks kept for reuse there are free space to the program: they
    // go back to the free lists first (whole), so the claim takes them.
    let kept = WARM.lock().forget_overlapping(start, len);
    drop_all(&kept);
    extents().lock().claim(start, len).is_ok()
}

/// Records a mapping of the program's own at `[start, start+len)`.
pub fn mark_foreign(start: u64, len: u64) {
    extents().lock().mark_foreign(start, len);
}

pub fn has_foreign(start: u64, len: u64) -> bool {
    extents().lock().has_foreign(start, len)
}

/// The allocation holding the end of `[start, start+len)` when the whole
/// range is allocated.
pub fn allocated_span(start: u64, len: u64) -> Option<(u64, u64)> {
    extents().lock().allocated_span(start, len)
}

/// Grows the allocation at `start` to `len` bytes in place, if it can.
pub fn grow_in_place(start: u64, len: u64) -> bool {
    extents().lock().grow_in_place(start, len)
}

/// Resizes the block at `p` (from the arena) to `size` bytes, in place
/// when it can. Returns null (and leaves `p` alone) when no memory is left.
pub fn realloc(p: *mut c_void, size: usize, min_alloc: usize) -> *mut c_void {
    if WARM.lock().holds(p as u64) {
        sys::die("dmem: realloc(): pointer to freed managed memory\n");
    }
    let Some(old) = extents().lock().len_at(p as u64) else {
        sys::die("dmem: realloc(): invalid pointer into managed memory\n");
    };
    let want = round_up(size.max(1) as u64, GRANULE);
    if size >= min_alloc {
        if want <= old {
            if want < old {
                release(p as u64 + want, old - want);
            }
            return p;
        }
        if extents().lock().grow_in_place(p as u64, want) {
            return p;
        }
    }
    // Move: to glibc when it became small, else elsewhere in the arena.
    let new = if size < min_alloc {
        sys::libc_malloc(size)
    } else {
        let n = alloc_any(size, 16);
        if n.is_null() {
            sys::libc_malloc(size)
        } else {
            n
        }
    };
    if new.is_null() {
        return new;
    }
    // SAFETY: `p` is a live block of `old` bytes, `new` a fresh one of at
    // least `size`; they are distinct blocks.
    unsafe { sys::copy(new, p, (old as usize).min(size)) };
    release(p as u64, old);
    new
}

/// Held across `fork()` (see `fork`): the child inherits consistent lists,
/// and nothing of the shim changes managed memory (frees, unmaps, moves)
/// until after the fork. With the locks taken, `prepare` (told whether the
/// program has mapped memory of its own over part of the arena) says
/// whether to bring back every page of every block, so that the pager puts
/// back what it had taken out. Kept freed blocks are left out: their
/// content is undefined to whoever takes one next, so the child may find
/// zeros there where the parent had pages out, and bringing them back
/// would fetch (and hold locally) memory nobody uses.
pub fn lock_for_fork(prepare: impl FnOnce(bool) -> bool) {
    let warm = WARM.lock();
    let ex = EXTENTS.get().map(|ex| ex.lock());
    let foreign = match (&ex, bounds()) {
        (Some(g), Some((base, end))) => g.has_foreign(base, end - base),
        _ => false,
    };
    if prepare(foreign) {
        if let Some(g) = &ex {
            for (start, len) in g.allocations() {
                if !warm.holds_block(start, len) {
                    sys::touch_pages(start, len);
                }
            }
        }
    }
    // Released by `unlock_after_fork`, in parent and child.
    std::mem::forget(ex);
    std::mem::forget(warm);
}

/// Whether any managed block is allocated (in a forked child: whether it
/// inherited managed data worth a session of its own).
pub fn has_allocations() -> bool {
    EXTENTS
        .get()
        .is_some_and(|ex| ex.lock().allocations().next().is_some())
}

pub fn unlock_after_fork() {
    if let Some(ex) = EXTENTS.get() {
        ex.release();
    }
    WARM.release();
}
