//! OS calls of the benchmarks that the pager's `sys` module does not offer.

pub(crate) const PAGE: usize = 4096;

/// Whether the page at `addr` (page-aligned, mapped) is present in this
/// process's page tables (`mincore`). Errors count as "not present": the
/// caller then simply touches the page.
pub(crate) fn resident(addr: u64) -> bool {
    let mut vec = [0u8; 1];
    // SAFETY: mincore only reads page-table state for the range and writes
    // one byte per page into `vec`, which has room for the single page asked.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, PAGE, vec.as_mut_ptr()) };
    rc == 0 && vec[0] & 1 == 1
}

/// Reads the 8-byte word at `addr` (inside a live mapping of this process)
/// with a volatile load: a page fault if the page is not present.
pub(crate) fn read_word(addr: u64) -> u64 {
    // SAFETY: callers pass an 8-byte-aligned address inside a mapping they
    // own for the life of the process; a missing page is served by a
    // userfaultfd handler, never a SIGSEGV.
    unsafe { (addr as *const u64).read_volatile() }
}

/// Writes the 8-byte word at `addr` (same contract as [`read_word`]).
pub(crate) fn write_word(addr: u64, v: u64) {
    // SAFETY: as for `read_word`; this process owns the mapping and nothing
    // else reads or writes it concurrently.
    unsafe { (addr as *mut u64).write_volatile(v) }
}

/// The pause before every timed operation of every contender: `d` of
/// `sched_yield` calls. Yielding hands the CPU to work left over from the
/// last sample (the pager's thread that answered the stats query is still
/// exiting when the reply arrives; on one pinned CPU a plain busy-wait kept
/// it waiting until the timed fault, at whose head it then ran), and with
/// nothing else to run it returns at once, so the CPU never idles (no idle
/// state to leave before the timed operation).
pub(crate) fn pause(d: std::time::Duration) {
    let t = std::time::Instant::now();
    while t.elapsed() < d {
        std::thread::yield_now();
    }
}

/// Pins this process (every thread started afterwards, and every child
/// process, inherits it) to one CPU.
pub(crate) fn pin_to_cpu(cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} is out of range"));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so CPU_SET stays
    // inside `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; `set` is a valid cpu_set_t of the size
    // passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "cannot pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ))
    }
}
