//! OS and libc calls of the shim: glibc's own allocator entry points (the
//! shim's fallback and the allocator of its Rust code), the mmap family as
//! system calls (the symbols are the shim's own), `madvise`, and the errno
//! helpers the malloc family needs.

use std::ffi::c_void;
use std::sync::atomic::{AtomicPtr, Ordering};

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

/// glibc's malloc, bypassing the shim.
pub fn libc_malloc(size: usize) -> *mut c_void {
    // SAFETY: plain call into glibc's allocator; any size is valid.
    unsafe { __libc_malloc(size) }
}

/// glibc's free. `ptr` must come from glibc's allocator (or be null).
pub fn libc_free(ptr: *mut c_void) {
    // SAFETY: the caller routes only glibc-owned pointers (or null) here;
    // `free` dispatches by address.
    unsafe { __libc_free(ptr) }
}

pub fn libc_calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: glibc checks the product for overflow itself.
    unsafe { __libc_calloc(n, size) }
}

/// glibc's realloc of a glibc-owned pointer (or null).
pub fn libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    // SAFETY: the caller routes only glibc-owned pointers (or null) here.
    unsafe { __libc_realloc(ptr, size) }
}

pub fn libc_memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: glibc validates the alignment itself.
    unsafe { __libc_memalign(align, size) }
}

/// The next definition of `name` after this library's (glibc's, for the
/// symbols the shim exports itself), looked up once into `cache`.
fn next_symbol(name: &std::ffi::CStr, cache: &AtomicPtr<c_void>) -> *mut c_void {
    let mut f = cache.load(Ordering::Acquire);
    if f.is_null() {
        // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT skips this
        // library.
        f = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
        cache.store(f, Ordering::Release);
    }
    f
}

type UsableFn = unsafe extern "C" fn(*mut c_void) -> usize;

/// glibc's `malloc_usable_size` (the shim exports its own).
pub fn libc_usable_size(ptr: *mut c_void) -> usize {
    static USABLE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    let f = next_symbol(c"malloc_usable_size", &USABLE);
    if ptr.is_null() || f.is_null() {
        return 0;
    }
    // SAFETY: `f` is glibc's malloc_usable_size, whose signature this is.
    let f: UsableFn = unsafe { std::mem::transmute::<*mut c_void, UsableFn>(f) };
    // SAFETY: `ptr` is a live glibc block (the caller dispatched by address).
    unsafe { f(ptr) }
}

pub type AtforkHandler = Option<unsafe extern "C" fn()>;
type RegisterAtforkFn =
    unsafe extern "C" fn(AtforkHandler, AtforkHandler, AtforkHandler, *mut c_void) -> libc::c_int;

/// glibc's `__register_atfork` (what `pthread_atfork` calls; the shim
/// exports its own, see `fork.rs`). ENOSYS if glibc has none.
pub fn libc_register_atfork(
    prepare: AtforkHandler,
    parent: AtforkHandler,
    child: AtforkHandler,
    dso: *mut c_void,
) -> libc::c_int {
    static REGISTER: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    let f = next_symbol(c"__register_atfork", &REGISTER);
    if f.is_null() {
        return libc::ENOSYS;
    }
    // SAFETY: `f` is glibc's __register_atfork, whose signature this is.
    let f: RegisterAtforkFn = unsafe { std::mem::transmute::<*mut c_void, RegisterAtforkFn>(f) };
    // SAFETY: glibc copies the handler pointers; they and `dso` are the
    // caller's to vouch for (the same contract as pthread_atfork's).
    unsafe { f(prepare, parent, child, dso) }
}

/// Drops `[addr, addr+len)` of the shim's arena (freed by the program),
/// by the system call: `madvise` is the shim's own symbol.
pub fn dontneed(addr: u64, len: u64) -> Result<(), i32> {
    madvise(addr, len, libc::MADV_DONTNEED)
}

/// The mmap system call (the `mmap` symbol is the shim's own): a result
/// or the errno.
pub fn mmap(addr: u64, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> Result<u64, i32> {
    dmem_pager::sys::mmap_raw(addr, len, prot, flags, fd, off).map_err(|e| e as i32)
}

pub fn munmap(addr: u64, len: usize) -> Result<(), i32> {
    dmem_pager::sys::munmap_raw(addr, len).map_err(|e| e as i32)
}

/// The madvise system call (the `madvise` symbol is the shim's own).
pub fn madvise(addr: u64, len: u64, advice: i32) -> Result<(), i32> {
    // SAFETY: the program's own request, passed on unchanged; advice never
    // touches memory the kernel does not check itself.
    let rc = unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) };
    if rc == -1 {
        Err(errno())
    } else {
        Ok(())
    }
}

/// The mremap system call; `new_addr` only counts with MREMAP_FIXED.
pub fn mremap(
    old: u64,
    old_len: usize,
    new_len: usize,
    flags: i32,
    new_addr: u64,
) -> Result<u64, i32> {
    // SAFETY: the program's own request, passed on unchanged (the shim
    // calls this only for ranges outside its arena).
    let rc = unsafe { libc::syscall(libc::SYS_mremap, old, old_len, new_len, flags, new_addr) };
    if rc == -1 {
        Err(errno())
    } else {
        Ok(rc as u64)
    }
}

/// Puts fresh private anonymous memory at `[addr, addr+len)`, replacing
/// what is there (a range of the arena that the program had mapped over).
pub fn map_anonymous_at(addr: u64, len: u64) -> Result<(), i32> {
    mmap(
        addr,
        len as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
        -1,
        0,
    )
    .map(|_| ())
}

fn errno_slot() -> *mut i32 {
    // SAFETY: no preconditions; returns this thread's errno slot.
    unsafe { libc::__errno_location() }
}

pub fn errno() -> i32 {
    // SAFETY: the slot is valid for the life of the thread.
    unsafe { *errno_slot() }
}

pub fn set_errno(v: i32) {
    // SAFETY: the slot is valid for the life of the thread.
    unsafe { *errno_slot() = v }
}

/// Copies `len` bytes between non-overlapping buffers.
///
/// # Safety
/// Both ranges must be valid for `len` bytes and not overlap.
pub unsafe fn copy(dst: *mut c_void, src: *const c_void, len: usize) {
    // SAFETY: guaranteed by the caller.
    unsafe { std::ptr::copy_nonoverlapping(src.cast::<u8>(), dst.cast::<u8>(), len) }
}

/// Writes a message to stderr without allocating (usable anywhere).
pub fn write_stderr(msg: &str) {
    let mut b = msg.as_bytes();
    while !b.is_empty() {
        // SAFETY: writes from a valid buffer to fd 2.
        let n = unsafe { libc::write(2, b.as_ptr().cast(), b.len()) };
        if n <= 0 {
            return;
        }
        b = &b[n as usize..];
    }
}

/// Ends the program at once, with `msg` on stderr.
pub fn die(msg: &str) -> ! {
    write_stderr(msg);
    std::process::abort();
}

/// Reads one byte of every page of `[start, start+len)`, so that the pager
/// installs the pages it holds elsewhere.
pub fn touch_pages(start: u64, len: u64) {
    let mut a = start;
    while a < start + len {
        // SAFETY: the range is an allocated block of the arena, mapped and
        // readable; a volatile read keeps the access.
        unsafe { std::ptr::read_volatile(a as *const u8) };
        a += 4096;
    }
}

pub fn close(fd: i32) {
    // SAFETY: closes a descriptor this library owns (or the child's copy
    // of one); nothing uses it afterwards.
    unsafe { libc::close(fd) };
}
