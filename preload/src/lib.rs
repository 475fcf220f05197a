//! libdmem.so, the LD_PRELOAD shim: puts a program's large heap blocks under
//! the dmem pager without changing the program.
//!
//! At load, the shim reserves the managed arena, registers it with a
//! userfaultfd and hands that to the pager (`dmem_pager::app`, which also
//! runs the agent thread that carries out evictions). From then on the
//! malloc family (`malloc`) serves blocks of at least `DMEM_MIN_ALLOC` from
//! the arena (`arena`, bookkeeping in `extents`) and the rest from glibc;
//! anonymous mappings of that size come from the arena too (`mapping`).
//! `fork` keeps fork()'s copy-on-write meaning for managed memory.
//!
//! The shim's own Rust code allocates from glibc directly (`rust_alloc`):
//! it must never fault on managed memory, nor recurse into itself.

// The unit-test binary has no load hook, so most of the shim is unused there.
#![cfg_attr(test, allow(dead_code))]

mod arena;
mod config;
mod extents;
mod fork;
mod lock;
mod malloc;
mod mapping;
mod rust_alloc;
mod start;
mod sys;
mod warm;

#[global_allocator]
static GLOBAL: rust_alloc::LibcAlloc = rust_alloc::LibcAlloc;

extern "C" fn on_load() {
    start::start();
}

/// Runs when the dynamic loader maps the library, before `main` (not in
/// the unit-test binary, which has no pager to attach to).
#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;
