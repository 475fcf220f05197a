//! The malloc family, with glibc's semantics: blocks of at least
//! `DMEM_MIN_ALLOC` bytes come from the managed arena, the rest from glibc
//! (`__libc_*`). `free` and friends dispatch by address, so pointers from
//! either side (including those allocated before the shim started) are
//! handled correctly. Never panics, never unwinds into C.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::arena;
use crate::sys;

/// Threshold in bytes; `usize::MAX` (nothing managed) until the arena is
/// registered with the pager.
static MIN_ALLOC: AtomicUsize = AtomicUsize::new(usize::MAX);
const PAGE: usize = 4096;
/// glibc's malloc alignment on x86-64 and aarch64.
const MALLOC_ALIGN: usize = 16;

/// Starts managing blocks of at least `min` bytes.
pub fn enable(min: usize) {
    MIN_ALLOC.store(min, Ordering::Release);
}

pub fn min_alloc() -> usize {
    MIN_ALLOC.load(Ordering::Relaxed)
}

/// A zeroed arena block for `size` bytes when it should be managed, else
/// null.
fn managed(size: usize, align: usize) -> *mut c_void {
    if size >= min_alloc() {
        arena::alloc(size, align)
    } else {
        std::ptr::null_mut()
    }
}

/// As `managed`, but the block may hold old data (a freed block kept for
/// reuse): for callers that promise nothing about the content.
fn managed_any(size: usize, align: usize) -> *mut c_void {
    if size >= min_alloc() {
        arena::alloc_any(size, align)
    } else {
        std::ptr::null_mut()
    }
}

#[no_mangle]
pub extern "C" fn malloc(size: usize) -> *mut c_void {
    let p = managed_any(size, MALLOC_ALIGN);
    if p.is_null() {
        sys::libc_malloc(size)
    } else {
        p
    }
}

/// # Safety
/// `p` is null or a live block from this allocator (or glibc's).
#[no_mangle]
pub unsafe extern "C" fn free(p: *mut c_void) {
    if p.is_null() {
        return;
    }
    if arena::contains(p) {
        // free never changes errno (POSIX 2024, and glibc).
        let e = sys::errno();
        arena::free(p);
        sys::set_errno(e);
    } else {
        sys::libc_free(p);
    }
}

/// # Safety
/// As `free`.
#[no_mangle]
pub unsafe extern "C" fn cfree(p: *mut c_void) {
    // SAFETY: same contract as free.
    unsafe { free(p) }
}

#[no_mangle]
pub extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    let Some(total) = n.checked_mul(size) else {
        sys::set_errno(libc::ENOMEM);
        return std::ptr::null_mut();
    };
    // Arena blocks are zero already (see `arena`).
    let p = managed(total, MALLOC_ALIGN);
    if p.is_null() {
        sys::libc_calloc(n, size)
    } else {
        p
    }
}

/// # Safety
/// `p` is null or a live block from this allocator (or glibc's).
#[no_mangle]
pub unsafe extern "C" fn realloc(p: *mut c_void, size: usize) -> *mut c_void {
    if p.is_null() {
        return malloc(size);
    }
    if size == 0 {
        // glibc frees and returns NULL.
        // SAFETY: `p` is live, per the contract.
        unsafe { free(p) };
        return std::ptr::null_mut();
    }
    if arena::contains(p) {
        let n = arena::realloc(p, size, min_alloc());
        if n.is_null() {
            sys::set_errno(libc::ENOMEM);
        }
        return n;
    }
    let n = managed_any(size, MALLOC_ALIGN);
    if n.is_null() {
        return sys::libc_realloc(p, size);
    }
    // Grew past the threshold: move into the arena.
    let old = sys::libc_usable_size(p);
    // SAFETY: `p` is a live glibc block of `old` usable bytes, `n` a fresh
    // arena block of at least `size`; distinct.
    unsafe { sys::copy(n, p, old.min(size)) };
    sys::libc_free(p);
    n
}

/// # Safety
/// As `realloc`.
#[no_mangle]
pub unsafe extern "C" fn reallocarray(p: *mut c_void, n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        // SAFETY: same contract as realloc.
        Some(total) => unsafe { realloc(p, total) },
        None => {
            sys::set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// Aligned block; `align` is a power of two.
fn aligned(align: usize, size: usize) -> *mut c_void {
    let p = managed_any(size, align);
    if p.is_null() {
        sys::libc_memalign(align, size)
    } else {
        p
    }
}

/// # Safety
/// `out` is valid for a pointer write.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    if !align.is_power_of_two() || !align.is_multiple_of(std::mem::size_of::<*mut c_void>()) {
        return libc::EINVAL;
    }
    let e = sys::errno();
    let p = aligned(align, size);
    sys::set_errno(e);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: `out` is writable, per the contract.
    unsafe { *out = p };
    0
}

#[no_mangle]
pub extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    if !align.is_power_of_two() {
        sys::set_errno(libc::EINVAL);
        return std::ptr::null_mut();
    }
    aligned(align, size)
}

#[no_mangle]
pub extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    if align <= MALLOC_ALIGN {
        return malloc(size);
    }
    // glibc rounds other alignments up to a power of two.
    match align.checked_next_power_of_two() {
        Some(a) => aligned(a, size),
        None => {
            sys::set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    }
}

#[no_mangle]
pub extern "C" fn valloc(size: usize) -> *mut c_void {
    aligned(PAGE, size)
}

#[no_mangle]
pub extern "C" fn pvalloc(size: usize) -> *mut c_void {
    match size.max(1).checked_next_multiple_of(PAGE) {
        Some(s) => aligned(PAGE, s),
        None => {
            sys::set_errno(libc::ENOMEM);
            std::ptr::null_mut()
        }
    }
}

/// # Safety
/// `p` is null or a live block.
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        0
    } else if arena::contains(p) {
        arena::usable_size(p)
    } else {
        sys::libc_usable_size(p)
    }
}
