//! The mmap family: anonymous private read-write mappings of at least
//! `DMEM_MIN_ALLOC` bytes (CPython's object arenas, OpenBLAS buffers) come
//! from the managed arena, like large mallocs; `munmap` and `mremap` of
//! them keep their meaning (zeros after a fresh map, data moves with
//! mremap). Everything else goes to the kernel unchanged.
//!
//! The arena stays one registered mapping: `munmap` drops and frees pages
//! instead of unmapping them, and `mremap` moves data by copying. A program
//! that maps something else over managed memory (`MAP_FIXED` of a file)
//! gets it, evictions being held meanwhile, and the arena's own mapping
//! goes back there when the program lets go (`arena::zero`).
//!
//! Differences from the kernel that a correct program cannot see: hints
//! are honoured only outside the arena (a hinted mapping is not managed),
//! unmapped managed memory stays readable (as zeros) rather than raising
//! SIGSEGV, and `madvise` advice that would only change how the kernel
//! backs managed memory (huge pages, KSM merging, read-ahead) is accepted
//! and ignored there (see `madvise`).

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::extents::round_up;
use crate::{arena, malloc, start, sys};

const PAGE: u64 = 4096;
/// Smaller anonymous mappings are thread and signal stacks (the Rust
/// runtime maps the shim's own threads' signal stacks with `mmap`), which
/// must never fault into the pager: never managed, whatever the threshold.
const MIN_MANAGED_MAP: usize = 64 << 10;
/// Flags a managed mapping may carry besides MAP_PRIVATE|MAP_ANONYMOUS.
const PLAIN_EXTRA: c_int = libc::MAP_NORESERVE;

/// New anonymous mappings may come from the arena (`DMEM_MMAP`).
static MANAGE: AtomicBool = AtomicBool::new(false);

pub fn enable(on: bool) {
    MANAGE.store(on, Ordering::Release);
}

/// A mapping the arena can stand in for: private, anonymous, read-write,
/// nothing the arena cannot honour (hugetlb, locked, populated, stacks).
fn plain(prot: c_int, flags: c_int, off: i64) -> bool {
    let kind = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    prot == libc::PROT_READ | libc::PROT_WRITE
        && flags & kind == kind
        && flags & !(kind | PLAIN_EXTRA) == 0
        && off == 0
}

fn failed(e: i32) -> *mut c_void {
    sys::set_errno(e);
    libc::MAP_FAILED
}

fn result(r: Result<u64, i32>) -> *mut c_void {
    match r {
        Ok(a) => a as *mut c_void,
        Err(e) => failed(e),
    }
}

/// # Safety
/// As the C function: the program owns any range it maps over.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    result(map(addr as u64, len, prot, flags, fd, off))
}

/// `mmap` under the name programs built with 64-bit file offsets call.
///
/// # Safety
/// As `mmap`.
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    // SAFETY: the same function under another name; same contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

fn map(addr: u64, len: usize, prot: c_int, flags: c_int, fd: c_int, off: i64) -> Result<u64, i32> {
    let fixed = flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0;
    if fixed && len > 0 && arena::overlaps(addr, len as u64) {
        return map_over_arena(addr, len as u64, prot, flags, fd, off);
    }
    if !fixed
        && addr == 0
        && MANAGE.load(Ordering::Relaxed)
        && plain(prot, flags, off)
        && len >= malloc::min_alloc().max(MIN_MANAGED_MAP)
    {
        let p = arena::alloc(len, PAGE as usize);
        if !p.is_null() {
            return Ok(p as u64);
        }
    }
    sys::mmap(addr, len, prot, flags, fd, off)
}

/// MAP_FIXED into the arena: the program maps over managed memory it got
/// from us (or over free arena space, which it then owns).
fn map_over_arena(
    addr: u64,
    len: u64,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: i64,
) -> Result<u64, i32> {
    if !addr.is_multiple_of(PAGE) {
        return Err(libc::EINVAL);
    }
    if flags & libc::MAP_FIXED_NOREPLACE != 0 {
        // The whole arena is mapped.
        return Err(libc::EEXIST);
    }
    if !arena::claim(addr, len) {
        sys::write_stderr("dmem: mmap(MAP_FIXED) across the edge of managed memory refused\n");
        return Err(libc::ENOMEM);
    }
    let len = round_up(len, PAGE);
    if plain(prot, flags & !libc::MAP_FIXED, off) {
        arena::zero(addr, len);
        return Ok(addr);
    }
    // The kernel replaces the arena's mapping there. The pager forgets the
    // pages (UNMAP event); holding evictions keeps the agent from acting
    // on a victim there after the program's mapping took its place.
    let _hold = start::hold_evictions();
    let r = sys::mmap(addr, len as usize, prot, flags, fd, off);
    if r.is_ok() {
        arena::mark_foreign(addr, len);
    }
    r
}

/// # Safety
/// As the C function: the program no longer uses the range.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    match unmap(addr as u64, len as u64) {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

fn unmap(addr: u64, len: u64) -> Result<(), i32> {
    let Some((base, end)) = arena::bounds().filter(|_| arena::overlaps(addr, len)) else {
        return sys::munmap(addr, len as usize);
    };
    if !addr.is_multiple_of(PAGE) || len == 0 {
        return Err(libc::EINVAL);
    }
    let (lo, hi) = (addr, round_up(addr + len, PAGE));
    if lo < base {
        sys::munmap(lo, (base - lo) as usize)?;
    }
    if hi > end {
        sys::munmap(end, (hi - end) as usize)?;
    }
    let (a, b) = (lo.max(base), hi.min(end));
    arena::unmap(a, b - a);
    Ok(())
}

/// `MADV_COLLAPSE` (Linux 6.1; not in every libc crate).
const MADV_COLLAPSE: c_int = 25;

/// Advice the arena accepts and ignores. numpy asks for huge pages on
/// every array of 4 MiB or more: honoured, that splits the arena's mapping
/// at each array (a UFFDIO_MOVE or UFFDIO_COPY cannot span two mappings,
/// so victims and prefetched runs across the split take slower paths), and
/// lets khugepaged merge resident pages into huge pages behind the pager's
/// back, which pages 4 KiB at a time. KSM merging would share pages the
/// pager must own alone; read-ahead hints mean nothing to it.
fn ignored_in_arena(advice: c_int) -> bool {
    matches!(
        advice,
        libc::MADV_HUGEPAGE
            | MADV_COLLAPSE
            | libc::MADV_MERGEABLE
            | libc::MADV_SEQUENTIAL
            | libc::MADV_RANDOM
    )
}

/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    match advise(addr as u64, len as u64, advice) {
        Ok(()) => 0,
        Err(e) => {
            sys::set_errno(e);
            -1
        }
    }
}

fn advise(addr: u64, len: u64, advice: c_int) -> Result<(), i32> {
    let arena = arena::bounds().filter(|_| arena::overlaps(addr, len));
    let Some((base, end)) = arena.filter(|_| ignored_in_arena(advice)) else {
        return sys::madvise(addr, len, advice);
    };
    if !addr.is_multiple_of(PAGE) {
        return Err(libc::EINVAL);
    }
    // The parts outside the arena get the advice; the arena's is dropped.
    let hi = round_up(addr + len, PAGE);
    if addr < base {
        sys::madvise(addr, base - addr, advice)?;
    }
    if hi > end {
        sys::madvise(end, hi - end, advice)?;
    }
    Ok(())
}

/// `mremap(old, old_len, new_len, flags, ... /* new_addr */)`.
///
/// The C function is variadic; `new_addr` is declared as a fifth argument,
/// which is how the x86-64 and AArch64 Linux calling conventions pass it
/// (in a register, like a named one). It is read only with MREMAP_FIXED,
/// as glibc does, since it is garbage otherwise.
///
/// # Safety
/// As the C function.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let new_addr = if flags & libc::MREMAP_FIXED != 0 {
        new_addr as u64
    } else {
        0
    };
    result(remap(
        old as u64,
        old_len as u64,
        new_len as u64,
        flags,
        new_addr,
    ))
}

fn remap(old: u64, old_len: u64, new_len: u64, flags: c_int, new_addr: u64) -> Result<u64, i32> {
    let fixed = flags & libc::MREMAP_FIXED != 0;
    if !arena::overlaps(old, old_len.max(1)) {
        if fixed && arena::overlaps(new_addr, new_len) {
            sys::write_stderr("dmem: mremap() of other memory into managed memory refused\n");
            return Err(libc::EINVAL);
        }
        return sys::mremap(old, old_len as usize, new_len as usize, flags, new_addr);
    }
    let may_move = flags & libc::MREMAP_MAYMOVE != 0;
    let keep_old = flags & libc::MREMAP_DONTUNMAP != 0;
    let known = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
    if !old.is_multiple_of(PAGE)
        || old_len == 0
        || new_len == 0
        || flags & !known != 0
        || ((fixed || keep_old) && !may_move)
        || (keep_old && old_len != new_len)
        || (fixed && !new_addr.is_multiple_of(PAGE))
    {
        return Err(libc::EINVAL);
    }
    let (old_len, new_len) = (round_up(old_len, PAGE), round_up(new_len, PAGE));
    let Some((span, span_len)) = arena::allocated_span(old, old_len) else {
        return Err(libc::EFAULT);
    };
    if arena::has_foreign(old, old_len) {
        sys::write_stderr("dmem: mremap() of a mapping placed over managed memory refused\n");
        return Err(libc::EINVAL);
    }
    if !fixed && !keep_old {
        if new_len <= old_len {
            arena::trim(old + new_len, old_len - new_len);
            return Ok(old);
        }
        let at_end = old + old_len == span + span_len;
        if at_end && arena::grow_in_place(span, span_len + (new_len - old_len)) {
            return Ok(old);
        }
        if !may_move {
            return Err(libc::ENOMEM);
        }
    }
    let dest = if fixed {
        if new_addr < old + old_len && old < new_addr + new_len {
            return Err(libc::EINVAL);
        }
        map(
            new_addr,
            new_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )?
    } else {
        map(
            0,
            new_len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?
    };
    // SAFETY: `old` is `old_len` bytes of the program's managed memory and
    // `dest` a fresh mapping of `new_len` bytes that does not overlap it.
    unsafe {
        sys::copy(
            dest as *mut c_void,
            old as *const c_void,
            old_len.min(new_len) as usize,
        )
    };
    if keep_old {
        arena::zero(old, old_len);
    } else {
        arena::unmap(old, old_len);
    }
    Ok(dest)
}
