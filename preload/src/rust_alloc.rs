//! The allocator of the shim's own Rust code: glibc directly. Going through
//! the exported `malloc` would put large buffers of the agent thread into
//! managed memory, where touching them could fault into a pager that is
//! waiting for the agent.

use std::alloc::{GlobalAlloc, Layout};

use crate::sys;

/// glibc's malloc guarantees this alignment.
const MALLOC_ALIGN: usize = 16;

pub struct LibcAlloc;

// SAFETY: every block comes from glibc's allocator with at least the
// requested size and alignment, and is returned to it.
unsafe impl GlobalAlloc for LibcAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            sys::libc_malloc(layout.size()).cast()
        } else {
            sys::libc_memalign(layout.align(), layout.size()).cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            sys::libc_calloc(1, layout.size()).cast()
        } else {
            let p = sys::libc_memalign(layout.align(), layout.size()).cast::<u8>();
            if !p.is_null() {
                // SAFETY: `p` is a fresh block of `layout.size()` bytes.
                unsafe { p.write_bytes(0, layout.size()) };
            }
            p
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        sys::libc_free(ptr.cast());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            return sys::libc_realloc(ptr.cast(), new_size).cast();
        }
        let new = sys::libc_memalign(layout.align(), new_size).cast::<u8>();
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and distinct.
            unsafe { sys::copy(new.cast(), ptr.cast(), layout.size().min(new_size)) };
            sys::libc_free(ptr.cast());
        }
        new
    }
}
