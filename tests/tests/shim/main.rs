//! End-to-end tests of libdmem.so and `dmem run`: real programs (C test
//! programs compiled here, python3 with numpy, coreutils `sort`, sqlite)
//! run under the real shim, pager and memory node, with outputs compared
//! byte for byte against plain runs of the same programs. Each run also
//! proves that paging really happened (evictions and faults served from
//! the memory node), so a shim that silently did nothing fails.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use dmem_tests::{bin_path, eventually, run_cmd, TempDir};

/// A C source in tests/programs.
fn program(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("programs")
        .join(name)
}

/// `cc -O2 -pthread ARGS...`; panics if it fails.
fn cc(args: &[&OsStr]) {
    let st = Command::new("cc")
        .args(["-O2", "-pthread"])
        .args(args)
        .status()
        .expect("a C compiler (cc) is needed: scripts/setup.sh installs build-essential");
    assert!(st.success(), "cannot compile: cc {args:?}");
}

/// The C test program (tests/programs/heap.c), compiled once per test run.
fn heap_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("dmem-heap-{}", std::process::id()));
        let src = program("heap.c");
        cc(&[
            "-Wno-alloc-size-larger-than".as_ref(),
            "-o".as_ref(),
            out.as_ref(),
            src.as_ref(),
        ]);
        out
    })
    .clone()
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    stats: serde_json::Value,
}

/// `dmem run --local-limit LIMIT --stats-json ... -- cmd`.
fn dmem_run(limit: &str, cmd: &[&str], env: &[(&str, &str)]) -> Run {
    dmem_run_with(limit, &[], cmd, env)
}

/// `dmem run --local-limit LIMIT FLAGS... --stats-json ... -- cmd`.
fn dmem_run_with(limit: &str, flags: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = TempDir::new("shim-run");
    let stats = dir.path().join("stats.json");
    let mut c = Command::new(bin_path("dmem"));
    c.args(["run", "--local-limit", limit])
        .args(flags)
        .arg("--stats-json")
        .arg(&stats)
        .arg("--")
        .args(cmd);
    for (k, v) in env {
        c.env(k, v);
    }
    let (st, stdout, stderr) = run_cmd(&mut c);
    let stats = std::fs::read_to_string(&stats)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(serde_json::Value::Null);
    Run {
        code: st.code().unwrap_or(-1),
        stdout,
        stderr,
        stats,
    }
}

/// Runs `cmd` plainly, then under dmem at `limit`, both with `env`;
/// asserts that both succeed and print the same bytes.
fn same_as_plain(what: &str, limit: &str, cmd: &[&str], env: &[(&str, &str)]) -> Run {
    let mut c = Command::new(cmd[0]);
    c.args(&cmd[1..]).envs(env.iter().copied());
    let (st, want, err) = run_cmd(&mut c);
    assert!(st.success(), "plain run of {what} failed: {err}");
    let r = dmem_run(limit, cmd, env);
    assert_eq!(
        r.code, 0,
        "{what} under dmem failed:\n{}\n{}",
        r.stdout, r.stderr
    );
    assert!(
        r.stdout == want,
        "{what}: output differs from the plain run ({} vs {} bytes):\n{}",
        r.stdout.len(),
        want.len(),
        r.stdout.chars().take(2000).collect::<String>()
    );
    r
}

/// A Python script (`code`, with `args`) plainly and under dmem.
fn python_job(what: &str, code: &str, args: &[&str], limit: &str, env: &[(&str, &str)]) -> Run {
    let dir = TempDir::new(what);
    let job = dir.write("job.py", code);
    let mut cmd = vec!["python3", job.to_str().unwrap()];
    cmd.extend_from_slice(args);
    same_as_plain(what, limit, &cmd, env)
}

fn n(v: &serde_json::Value, p: &str) -> u64 {
    v.pointer(p).and_then(|x| x.as_u64()).unwrap_or(0)
}

/// The run paged: pages left the program and came back from the memory
/// node (so the comparison with the plain run means something).
fn assert_paged(r: &Run, what: &str) {
    assert!(
        n(&r.stats, "/evictions") > 0 && n(&r.stats, "/faults/remote") > 0,
        "{what}: no paging happened under dmem (stats {})\nstderr: {}",
        r.stats,
        r.stderr
    );
}

/// Runs the C program in `mode` plainly and under dmem at 1/4 of its heap.
fn heap_mode(mode: &str, mib: u64) -> Run {
    let bin = heap_bin();
    let b = bin.to_str().unwrap();
    let m = mib.to_string();
    let limit = format!("{}M", mib / 4);
    let r = same_as_plain(mode, &limit, &[b, mode, &m], &[]);
    assert!(
        r.stderr.contains("dmem: "),
        "no summary on stderr: {}",
        r.stderr
    );
    r
}

#[test]
fn c_heap_four_times_the_limit_sequential_and_random() {
    let r = heap_mode("seq-random", 96);
    assert_paged(&r, "seq-random");
    let peak = n(&r.stats, "/peak_resident_bytes");
    assert!(
        peak > 0 && peak <= 24 << 20,
        "peak local {peak} above the 24M limit"
    );
}

/// `dmem run --replicas 2 --encrypt`: two loopback memory nodes, both
/// holding every page, sealed; the C heap at 4x the limit gives the plain
/// run's output.
#[test]
fn dmem_run_with_replicas_and_encryption_matches_a_plain_run() {
    let bin = heap_bin();
    let cmd = [bin.to_str().unwrap(), "seq-random", "64"];
    let (st, want, err) = run_cmd(Command::new(cmd[0]).args(&cmd[1..]));
    assert!(st.success(), "plain run failed: {err}");
    let r = dmem_run_with("16M", &["--replicas", "2", "--encrypt"], &cmd, &[]);
    assert_eq!(r.code, 0, "under dmem: {}\n{}", r.stdout, r.stderr);
    assert!(r.stdout == want, "output differs from the plain run");
    assert_paged(&r, "replicas and encryption");
    assert_eq!(r.stats["pager"]["replicas"], 2, "{}", r.stats);
    assert_eq!(r.stats["pager"]["encrypt"], true, "{}", r.stats);
    let nodes = r.stats["memnodes"].as_array().expect("memnodes");
    assert_eq!(nodes.len(), 2, "{}", r.stats);
    assert!(
        nodes.iter().all(|m| m["leased_bytes"].as_u64() > Some(0)),
        "every page should be on both nodes: {}",
        r.stats
    );
}

#[test]
fn c_malloc_family_semantics() {
    heap_mode("family", 32);
}

/// Temporaries allocated and freed over and over while long-lived blocks
/// are replaced: output as a plain run's (no freed block kept for reuse
/// ever aliases a live one, calloc still zeroes), at a limit that pages.
#[test]
fn c_churning_temporaries_match_a_plain_run() {
    let r = heap_mode("churn", 32);
    assert_paged(&r, "churn");
}

/// Freed blocks are kept for reuse: the same churn faults in far fewer
/// zero pages than with DMEM_KEEP_FREED=0 (every free dropped, every new
/// block zero-filled by the pager), and both runs match the plain one.
#[test]
fn freed_blocks_are_reused_without_zero_filling_them_again() {
    let bin = heap_bin();
    let cmd = [bin.to_str().unwrap(), "churn", "16"];
    let kept = same_as_plain("churn, blocks kept", "128M", &cmd, &[]);
    let dropped = same_as_plain(
        "churn, DMEM_KEEP_FREED=0",
        "128M",
        &cmd,
        &[("DMEM_KEEP_FREED", "0")],
    );
    let (k, d) = (
        n(&kept.stats, "/faults/zero"),
        n(&dropped.stats, "/faults/zero"),
    );
    assert!(
        d > 0 && k * 3 < d * 2,
        "zero faults: {k} with freed blocks kept, {d} without; expected under two thirds"
    );
}

#[test]
fn c_threads_share_a_paged_heap() {
    let r = heap_mode("threads", 32);
    assert_paged(&r, "threads");
}

#[test]
fn c_read_write_syscalls_on_evicted_buffers_and_dontneed() {
    let r = heap_mode("syscalls", 48);
    assert_paged(&r, "syscalls");
}

/// A forked child took at least `bytes` of inherited memory under its own
/// session, sharing the parent's remote copies of some (clean) pages.
fn assert_adopted(r: &Run, bytes: u64) {
    let (adopted, shared) = (
        n(&r.stats, "/fork/adopted_pages"),
        n(&r.stats, "/fork/shared_pages"),
    );
    assert!(
        adopted >= bytes / 4096 && shared > 0 && shared <= adopted,
        "the child did not adopt {bytes} bytes, sharing clean copies: {}",
        r.stats["fork"]
    );
}

/// The parent did not bring its heap back for the fork: the child took
/// the pages that were out of the parent from the pager's fork snapshot,
/// and no session ever held much more than its limit (`limit` bytes).
/// With the heap brought back, the parent alone held all of it locally.
fn assert_not_brought_back(r: &Run, limit: u64) {
    let out = n(&r.stats, "/fork/out_pages");
    let peak = n(&r.stats, "/peak_resident_bytes");
    assert!(
        out > 0 && peak < 2 * limit,
        "the heap came back for the fork: {out} pages taken from the snapshot, \
         peak local {peak} bytes against a limit of {limit}: {}",
        r.stats
    );
}

#[test]
fn c_fork_parent_and_child_each_see_their_own_memory() {
    let r = heap_mode("fork", 64);
    assert_paged(&r, "fork");
    // The child ran under a session of its own, sharing the remote copies
    // of the pages that were clean at the fork or out of the parent. It
    // then wrote every page (so each shared page had to be write-protected
    // again, or its writes would be dropped at eviction) and read them all
    // back, as checked. Three quarters of the 64 MiB block were out of the
    // parent at the fork and stayed out.
    assert_adopted(&r, 64 << 20);
    assert_not_brought_back(&r, 16 << 20);
    // Victims the parent still shared with its child when the evictor took
    // them cannot be moved out: the agent leaves them, the pager
    // write-protects them and they leave by copy next time. The writes
    // checked above went through that path.
    let kept = n(&r.stats, "/kept_victims");
    assert!(
        kept > 0,
        "no victim shared with the child was left in place by the agent: {}",
        r.stats
    );
}

/// Four threads of one process fork at once, with three quarters of the
/// block paged out: every child sees the whole block as at its fork (each
/// fork takes a snapshot of its own, under the arena lock), and the
/// parent's block is intact afterwards.
#[test]
fn c_threads_forking_at_once_each_child_sees_the_heap() {
    let r = heap_mode("fork-threads", 64);
    assert_paged(&r, "fork-threads");
    assert_not_brought_back(&r, 16 << 20);
}

/// 300 children of one parent alive at once (a pre-forking server), most
/// of the parent's block paged out or clean with remote copies: every
/// child takes a session of its own over the parent's pages, so a page's
/// remote copy is referenced by all of them at the same time. No child may
/// fall back to plain memory, nor the parent bring its heap back.
#[test]
fn three_hundred_children_share_the_pages_of_one_parent() {
    let r = heap_mode("fork-many", 16);
    assert_paged(&r, "fork-many");
    for fallback in ["no fork snapshot", "plain memory from here on"] {
        assert!(
            !r.stderr.contains(fallback),
            "a fork fell back ({fallback}):\n{}",
            r.stderr
        );
    }
    assert!(
        n(&r.stats, "/fork/out_pages") >= 300 * (12 << 20) / 4096,
        "the children did not each take the parent's paged-out pages: {}",
        r.stats["fork"]
    );
    assert_not_brought_back(&r, 4 << 20);
}

/// A raw `mremap` (past the shim) in the parent right after a fork,
/// while its child's session is being set up (the pager delays the
/// adoption by 1 s, `DMEM_PAGER_FAILPOINT=adopt:sleep:1000`, so that the
/// move comes first). The parent moves a block that was out at the fork
/// over one that was present and clean, and reads it: its page state at
/// those addresses is no longer as at the fork, so the child must share
/// none of its present pages' remote copies (only the snapshot's). With
/// the guard removed (tried) the child shares them, drops its clean copy
/// of the block at eviction and reads the parent's moved block back: all
/// 524,288 words wrong.
#[test]
fn a_parent_moving_memory_during_the_fork_shares_nothing_present() {
    let bin = heap_bin();
    let cmd = [bin.to_str().unwrap(), "fork-remap", "64"];
    let r = same_as_plain(
        "fork-remap",
        "16M",
        &cmd,
        &[("DMEM_PAGER_FAILPOINT", "adopt:sleep:1000")],
    );
    assert_paged(&r, "fork-remap");
    let (adopted, shared, out) = (
        n(&r.stats, "/fork/adopted_pages"),
        n(&r.stats, "/fork/shared_pages"),
        n(&r.stats, "/fork/out_pages"),
    );
    assert!(
        adopted >= 2 * 1024 && out >= 1024,
        "the child did not adopt the present block and take the one out: {}",
        r.stats["fork"]
    );
    assert_eq!(
        shared, out,
        "the child shared remote copies of present pages after the parent moved memory: {}",
        r.stats["fork"]
    );
}

/// A library the program depends on registers, from its constructor, an
/// atfork child handler that reads the program's 8 MiB block, which is out
/// of the parent at the fork (tests/programs/atfork_early.c). Such a
/// library is initialised before the preloaded shim, so its handler used
/// to run before the shim's child handler had set up the child's session,
/// and read zeros (tried: the child's check fails). The shim's handlers
/// now go first whoever registers first.
#[test]
fn an_atfork_handler_registered_before_the_shim_reads_the_childs_memory() {
    let dir = TempDir::new("atfork-early");
    let (src, lib, bin) = (
        program("atfork_early.c"),
        dir.path().join("libatfork_early.so"),
        dir.path().join("atfork_early"),
    );
    cc(&[
        "-shared".as_ref(),
        "-fPIC".as_ref(),
        "-DEARLY_LIB".as_ref(),
        "-o".as_ref(),
        lib.as_ref(),
        src.as_ref(),
    ]);
    let rpath = format!("-Wl,-rpath,{}", dir.path().display());
    cc(&[
        "-o".as_ref(),
        bin.as_ref(),
        src.as_ref(),
        "-L".as_ref(),
        dir.path().as_ref(),
        "-latfork_early".as_ref(),
        rpath.as_ref(),
    ]);
    let r = same_as_plain("atfork_early", "16M", &[bin.to_str().unwrap(), "64"], &[]);
    assert!(r.stdout.contains("child=ok"), "{}", r.stdout);
    assert!(
        n(&r.stats, "/fork/out_pages") >= 1024,
        "the block was not out of the parent at the fork: {}",
        r.stats["fork"]
    );
}

/// A file mapped over part of a managed block, most of it paged out, then
/// fork: the child cannot register the arena again around the program's
/// own mapping, so the parent brings its heap back instead of taking a
/// snapshot, and the child, running its arena as plain memory, sees the
/// block and the file (with a snapshot it would have had to stop).
#[test]
fn fork_with_a_file_mapped_over_the_heap_brings_the_heap_back() {
    let r = heap_mode("fork-foreign", 64);
    assert_paged(&r, "fork-foreign");
    assert_eq!(n(&r.stats, "/fork/out_pages"), 0, "{}", r.stats);
}

/// The parent exits right after forking, so its session ends before its
/// child has read anything: the pages it had out at the fork still reach
/// the child (the fork snapshot outlives the parent's session), which
/// checks and rewrites them (heap.c's `fork_orphan`).
#[test]
fn c_fork_then_the_parent_exits_and_the_child_still_reads_its_memory() {
    let r = heap_mode("fork-orphan", 64);
    assert_paged(&r, "fork-orphan");
    assert_not_brought_back(&r, 16 << 20);
}

/// A forked child takes its inherited arena under a session of its own.
/// The parent's 4 MiB block was pushed out and read back before the fork,
/// so it is present and clean with remote copies, which the child shares. The child
/// writes half of it, pages a heap 4x the limit through its own session
/// (pushing the block out again), and checks the block. Its writes to the
/// shared pages survive only if they were seen: a child that did not
/// write-protect them again reads them back stale (tried: the check
/// fails). Before 2026-12-03 such a child ran unmanaged.
#[test]
fn c_forked_child_pages_its_own_memory() {
    let r = heap_mode("fork-child", 64);
    assert_paged(&r, "a forked child's heap");
    assert_adopted(&r, 4 << 20);
    assert!(
        !r.stderr.contains("forked child"),
        "the child fell back to unmanaged memory:\n{}",
        r.stderr
    );
}

/// `DMEM_FORK_MANAGED=0`: the child runs its memory as plain memory (no
/// session of its own), and both still see exactly their own memory.
#[test]
fn fork_managed_0_leaves_the_child_unmanaged() {
    let bin = heap_bin();
    let cmd = [bin.to_str().unwrap(), "fork-child", "64"];
    let r = same_as_plain(
        "fork-child, DMEM_FORK_MANAGED=0",
        "16M",
        &cmd,
        &[("DMEM_FORK_MANAGED", "0")],
    );
    assert_eq!(
        n(&r.stats, "/fork/adopted_pages"),
        0,
        "the child took a session: {}",
        r.stats["fork"]
    );
}

/// Runs heap.c's kept-block `mode` (a live 1 MiB block and a kept 4 MiB
/// freed block, both evicted) with `env` and checks that the live block
/// was fetched back and the kept one was not (`why` says how it would
/// have been).
fn only_the_live_block_is_fetched(mode: &str, what: &str, why: &str, env: &[(&str, &str)]) {
    let bin = heap_bin();
    let cmd = [bin.to_str().unwrap(), mode, "192"];
    let r = same_as_plain(what, "64M", &cmd, env);
    let fetched = n(&r.stats, "/bytes_fetched");
    assert!(
        n(&r.stats, "/evictions") > 0 && fetched >= 1 << 20,
        "{what}: the live block was not evicted and fetched back (stats {})",
        r.stats
    );
    assert!(fetched < 3 << 20, "{what}: {fetched} bytes fetched: {why}");
}

/// With children unmanaged (`DMEM_FORK_MANAGED=0`) the parent brings back
/// its evicted pages before the fork, but not those of freed blocks kept
/// for reuse: nobody's data is there. The live 1 MiB block comes back (the
/// child checks it); the kept 4 MiB one stays out, so under 3 MiB is
/// fetched (over 5 MiB before 2026-12-02).
#[test]
fn fork_brings_back_live_blocks_but_not_kept_freed_ones() {
    only_the_live_block_is_fetched(
        "fork-kept",
        "fork with a kept block, DMEM_FORK_MANAGED=0",
        "the kept freed block was brought back at fork",
        &[("DMEM_FORK_MANAGED", "0")],
    );
}

/// With a session of its own (the default), the child fetches the live
/// block it reads from the fork snapshot; nothing else comes back.
#[test]
fn a_forked_child_fetches_only_what_it_reads() {
    only_the_live_block_is_fetched(
        "fork-kept",
        "fork with a kept block",
        "more than the live block came back for the fork",
        &[],
    );
}

/// A freed block kept for reuse that the evictor reaches is dropped, not
/// written back: the next block of its size is zero-filled, not fetched.
/// Only the live 1 MiB block is fetched (5 MiB before 2026-12-02, when the
/// new owner fetched the kept block's 4 MiB back).
#[test]
fn kept_freed_blocks_reached_by_eviction_are_dropped_not_fetched_back() {
    only_the_live_block_is_fetched(
        "evict-kept",
        "eviction of a kept block",
        "the evicted kept block was fetched back for its new owner",
        &[],
    );
}

/// Reports, for four 8 MiB numpy arrays, how many of the mappings holding
/// their middles have huge pages enabled, and how many mappings they span.
const HUGEPAGE_JOB: &str = r#"
import numpy as np
arrs = [np.ones(1 << 20) * (i + 1) for i in range(4)]
maps, cur = [], None
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if line.startswith("VmFlags:"):
        cur[2] = line.split(":", 1)[1].split()
    elif "-" in head and not head.endswith(":"):
        lo, hi = (int(x, 16) for x in head.split("-"))
        cur = [lo, hi, []]
        maps.append(cur)
mid = [a.ctypes.data + (1 << 22) for a in arrs]
vmas = [next(m for m in maps if m[0] <= p < m[1]) for p in mid]
print("hugepage", sum("hg" in v[2] for v in vmas))
print("mappings", len({(v[0], v[1]) for v in vmas}))
print("sum", float(sum(a.sum() for a in arrs)))
"#;

/// numpy asks for huge pages on every array of 4 MiB or more
/// (`madvise(MADV_HUGEPAGE)`). In the arena that advice is ignored: it
/// split the arena's one mapping at every array (a UFFDIO_MOVE or COPY
/// cannot span two, so evictions and prefetches across the seams took
/// slower paths) and let khugepaged build huge pages the pager does not
/// know of. The plain run shows that numpy does ask.
#[test]
fn numpy_huge_page_advice_leaves_the_arena_one_mapping() {
    let dir = TempDir::new("hugepage");
    let job = dir.write("job.py", HUGEPAGE_JOB);
    let cmd = ["python3", job.to_str().unwrap()];
    let (st, plain, err) = run_cmd(Command::new(cmd[0]).args(&cmd[1..]));
    assert!(st.success(), "plain run failed: {err}");
    assert!(
        plain.contains("hugepage 4\n") && plain.contains("mappings 4\n"),
        "numpy did not ask for huge pages in the plain run, so this test shows nothing: {plain}"
    );
    let r = dmem_run("64M", &cmd, &[]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("hugepage 0\n") && r.stdout.contains("mappings 1\n"),
        "the arena took numpy's huge-page advice: {}",
        r.stdout
    );
    let sum = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("sum"))
            .map(str::to_owned)
    };
    assert_eq!(sum(&r.stdout), sum(&plain), "results differ");
}

const NUMPY_JOB: &str = r#"
import hashlib, sys
import numpy as np
n = int(sys.argv[1])
rng = np.random.default_rng(7)
a = rng.standard_normal((n, n))
b = rng.standard_normal((n, n))
c = a @ b
s = np.sort(c, axis=None)
print(hashlib.sha256(c.tobytes()).hexdigest())
print(repr(float(c.sum())), repr(float(a.mean())), repr(float(s[len(s) // 3])))
print(repr(float(np.linalg.norm(b, axis=0).max())))
"#;

#[test]
fn c_mmap_munmap_mremap_of_large_anonymous_mappings() {
    // Without mmap interposition nothing of this program is managed and
    // nothing pages, so `assert_paged` fails.
    let r = heap_mode("mmap", 64);
    assert_paged(&r, "mmap");
}

#[test]
fn numpy_matmul_and_reductions_match_a_plain_run() {
    // 1280^2 doubles = 12.5 MiB per array; a, b, c and the sort: 50 MiB.
    let env = [("OPENBLAS_NUM_THREADS", "2")];
    let r = python_job("numpy", NUMPY_JOB, &["1280"], "12M", &env);
    assert_paged(&r, "numpy");
}

/// A k-means over 32 MiB of points (benches/jobs/kmeans.py): numpy frees
/// and reallocates its 2–16 MiB temporaries every iteration while they are
/// being evicted. It caught a lost write: the agent, reading a victim the
/// app had just freed, had it filled with the shared zero page, which woke
/// an app thread that wrote into it by a copy-on-write the pager never saw,
/// and the agent's DONTNEED then dropped that write. The race is timing
/// dependent (about one run in five over a veth pair before the fix), so
/// the job runs several times.
#[test]
fn numpy_kmeans_with_churning_temporaries_matches_a_plain_run() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/jobs/kmeans.py");
    let script = script.to_str().unwrap();
    let env = [("OPENBLAS_NUM_THREADS", "2")];
    let cmd = ["python3", script, "262144", "16", "8", "5"];
    // The job prints its own time too: compare the digest lines.
    let digest = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("digest="))
            .map(str::to_owned)
    };
    let (st, plain, err) = run_cmd(Command::new(cmd[0]).args(&cmd[1..]).envs(env));
    assert!(st.success(), "plain k-means failed: {err}");
    let want = digest(&plain).expect("the job prints its digest");
    for round in 0..3 {
        // Footprint about 85 MiB: 64M is 75% of it.
        let r = dmem_run("64M", &cmd, &env);
        assert_eq!(r.code, 0, "k-means under dmem failed: {}", r.stderr);
        assert_eq!(
            digest(&r.stdout).as_deref(),
            Some(want.as_str()),
            "round {round}: k-means under dmem computed something else"
        );
        assert!(n(&r.stats, "/evictions") > 0, "no eviction: {}", r.stats);
    }
}

const MP_JOB: &str = r#"
import multiprocessing as mp, hashlib, sys
import numpy as np
big = np.arange(int(sys.argv[1]) * 131072, dtype=np.float64) * 1.5

def part(k):
    # The child reads the parent's array, inherited through fork.
    chunk = np.array_split(big, 4)[k]
    return hashlib.sha256(chunk.tobytes()).hexdigest(), float(chunk.sum())

if __name__ == "__main__":
    ctx = mp.get_context("fork")
    with ctx.Pool(2) as pool:
        for h, s in pool.map(part, range(4)):
            print(h, repr(s))
    big[::7] = -1.0
    print(hashlib.sha256(big.tobytes()).hexdigest())
"#;

#[test]
fn python_multiprocessing_fork_reads_the_parents_arrays() {
    let r = python_job("multiprocessing", MP_JOB, &["64"], "16M", &[]);
    assert_paged(&r, "multiprocessing");
}

#[test]
fn python_many_small_objects_run_managed_and_unmanaged() {
    let code = "d = {i: str(i) * 3 for i in range(300000)}\nprint(sum(len(v) for v in d.values()))";
    // CPython keeps small objects in 1 MiB arenas it maps with mmap:
    // managed, and paged at this limit.
    let r = python_job("small-objects", code, &[], "8M", &[]);
    assert_paged(&r, "small objects in CPython's arenas");
    // With glibc's malloc under every object they are all small blocks
    // (the unmanaged path).
    python_job(
        "small-objects-malloc",
        code,
        &[],
        "8M",
        &[("PYTHONMALLOC", "malloc")],
    );
}

#[test]
fn sort_with_a_large_buffer_matches_a_plain_run() {
    let dir = TempDir::new("sort");
    let mut rng = dmem_tests::Rng::new("sort");
    let mut text = String::new();
    for _ in 0..200_000 {
        text.push_str(&format!("{:016x} {}\n", rng.next_u64(), rng.below(1000)));
    }
    let input = dir.write("in.txt", &text);
    let input = input.to_str().unwrap();
    let cmd = ["sort", "-S", "32M", "--parallel=1", input];
    let r = same_as_plain("sort", "6M", &cmd, &[("LC_ALL", "C")]);
    assert_paged(&r, "sort");
}

const SQLITE_JOB: &str = r#"
import sqlite3, hashlib
db = sqlite3.connect(":memory:")
db.execute("PRAGMA cache_size=-65536")
db.execute("create table t(k integer primary key, v text)")
db.executemany("insert into t values(?, ?)", ((i, str(i * 7919 % 100003) * 8) for i in range(200000)))
h = hashlib.sha256()
for row in db.execute("select v, count(*) from t group by v order by v limit 5000"):
    h.update(repr(row).encode())
print(h.hexdigest())
"#;

#[test]
fn python_sqlite_with_a_large_page_cache_matches_a_plain_run() {
    python_job(
        "sqlite",
        SQLITE_JOB,
        &[],
        "16M",
        &[("DMEM_MIN_ALLOC", "64K")],
    );
}

#[test]
fn exit_status_is_the_programs() {
    let r = dmem_run("16M", &["sh", "-c", "exit 7"], &[]);
    assert_eq!(r.code, 7, "{}", r.stderr);
    let r = dmem_run("16M", &["sh", "-c", "kill -9 $$"], &[]);
    assert_eq!(r.code, 128 + 9, "{}", r.stderr);
}

#[test]
fn without_a_pager_the_program_runs_unmanaged_or_fails_when_required() {
    let dir = TempDir::new("nopager");
    let bin = heap_bin();
    let lib = bin_path("libdmem.so");
    let sock = dir.path().join("nobody.sock");
    let mut c = Command::new(&bin);
    c.args(["family", "8"])
        .env("LD_PRELOAD", &lib)
        .env("DMEM_SOCKET", &sock);
    let (st, out, err) = run_cmd(&mut c);
    assert!(st.success(), "unmanaged run failed: {err}");
    assert!(out.contains("bad=0"));
    assert_eq!(
        err.matches("running this program without dmem").count(),
        1,
        "expected exactly one notice: {err}"
    );
    let mut c = Command::new(&bin);
    c.args(["family", "8"])
        .env("LD_PRELOAD", &lib)
        .env("DMEM_SOCKET", &sock)
        .env("DMEM_REQUIRE", "1");
    let (st, out, err) = run_cmd(&mut c);
    assert!(!st.success(), "DMEM_REQUIRE=1 without a pager must fail");
    assert!(out.is_empty(), "the program must not have run: {out}");
    assert!(err.contains("DMEM_REQUIRE=1"), "{err}");
    // A bad setting is a clear error, not a silent default.
    let mut c = Command::new(&bin);
    c.args(["family", "8"])
        .env("LD_PRELOAD", &lib)
        .env("DMEM_MIN_ALLOC", "lots");
    let (st, _, err) = run_cmd(&mut c);
    assert!(!st.success());
    assert!(err.contains("DMEM_MIN_ALLOC"), "{err}");
}

/// A program hands its memory only to a pager run by root or by its own
/// user. Here a real pager runs as `nobody` on the socket the (root)
/// program is pointed at, as another user could set one up under /tmp:
/// with DMEM_REQUIRE=1 the program refuses to start, and without it runs
/// unmanaged, saying why. Needs root (to start the pager as nobody).
#[test]
fn a_pager_run_by_another_user_is_refused() {
    const TEST: &str = "a_pager_run_by_another_user_is_refused";
    if !dmem_tests::is_root() {
        dmem_tests::skip(TEST, "needs root to run a pager as another user");
        return;
    }
    let dir = TempDir::new("otheruser");
    nix::unistd::chown(
        dir.path(),
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .expect("chown the socket directory to nobody");
    let sock = dir.path().join("p.sock");
    let log = std::fs::File::create(dir.path().join("pager.log")).expect("pager log");
    let pager = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin_path("dmem-pager"))
        .args(["--socket", sock.to_str().unwrap(), "--local-limit", "8M"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start a pager as nobody");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _pager = Kill(pager);
    eventually(Duration::from_secs(10), "the pager's socket", || {
        sock.exists().then_some(())
    });
    let lib = bin_path("libdmem.so");
    let mut c = Command::new(heap_bin());
    c.args(["family", "8"])
        .env("LD_PRELOAD", &lib)
        .env("DMEM_SOCKET", &sock)
        .env("DMEM_REQUIRE", "1");
    let (st, out, err) = run_cmd(&mut c);
    assert!(
        !st.success(),
        "a pager run by nobody must be refused: {out} {err}"
    );
    assert!(out.is_empty(), "the program must not have run: {out}");
    assert!(err.contains("runs as uid 65534"), "{err}");
    let mut c = Command::new(heap_bin());
    c.args(["family", "8"])
        .env("LD_PRELOAD", &lib)
        .env("DMEM_SOCKET", &sock);
    let (st, out, err) = run_cmd(&mut c);
    assert!(st.success(), "the unmanaged run failed: {err}");
    assert!(out.contains("bad=0"), "{out}");
    assert!(
        err.contains("running this program without dmem") && err.contains("uid 65534"),
        "{err}"
    );
}

#[test]
fn dmem_run_rejects_bad_flags() {
    let (st, _, err) = dmem_tests::run_dmem(&["run", "--local-limit", "lots", "--", "true"]);
    assert!(!st.success());
    assert!(err.contains("lots"), "{err}");
    let (st, _, err) = dmem_tests::run_dmem(&["run", "--local-limit", "16M"]);
    assert!(!st.success(), "a command is required");
    assert!(!err.is_empty());
    let (st, _, err) = dmem_tests::run_dmem(&["run", "--", "/nonexistent/prog"]);
    assert_eq!(st.code(), Some(125), "{err}");
    assert!(err.contains("/nonexistent/prog"), "{err}");
}

#[test]
fn pager_killed_mid_run_stops_the_program_with_a_message() {
    let dir = TempDir::new("pagerkill");
    let sock = dir.path().join("p.sock");
    let mut pager =
        dmem_tests::Pager::start(&["--socket", sock.to_str().unwrap(), "--local-limit", "8M"]);
    let bin = heap_bin();
    let mut child = Command::new(&bin)
        .args(["forever", "32"])
        .env("LD_PRELOAD", bin_path("libdmem.so"))
        .env("DMEM_SOCKET", &sock)
        .env("DMEM_REQUIRE", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut line = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut line).expect("program never got ready");
    assert_eq!(&line, b"ready\n");
    pager.kill9();
    let st = eventually(
        Duration::from_secs(30),
        "the program to stop without its pager",
        || child.try_wait().unwrap(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!st.success());
    assert!(
        !err.contains("WRONG DATA"),
        "the program read wrong data: {err}"
    );
    assert!(
        err.contains("dmem: ") && err.contains("pager"),
        "no clear message: {err}"
    );
}

#[test]
fn programs_start_with_the_signal_mask_they_would_have_without_dmem() {
    // dmem run blocks the signals it relays; the program must not inherit
    // that (a worker that cannot be stopped by SIGTERM hangs its parent).
    same_as_plain(
        "signal mask",
        "16M",
        &["grep", "SigBlk", "/proc/self/status"],
        &[],
    );
}

#[test]
fn sigterm_to_dmem_run_reaches_the_program() {
    let mut child = Command::new(bin_path("dmem"))
        .args(["run", "--quiet", "--local-limit", "16M", "--"])
        .args(["sh", "-c", "echo ready; exec sleep 60"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dmem run");
    let mut out = child.stdout.take().unwrap();
    let mut line = [0u8; 6];
    std::io::Read::read_exact(&mut out, &mut line).expect("the program never started");
    assert_eq!(&line, b"ready\n");
    // std can only send SIGKILL; kill(1) sends SIGTERM.
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let st = eventually(
        Duration::from_secs(20),
        "the program to stop on the SIGTERM sent to dmem run",
        || child.try_wait().unwrap(),
    );
    assert_eq!(
        st.code(),
        Some(128 + 15),
        "dmem run must report the program's death by SIGTERM"
    );
}
