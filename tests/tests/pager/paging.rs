//! The fault path and eviction, workloads several times the local limit:
//! every byte verified by the harness, the pager's figures checked to show
//! that pages really went to the cache tier and the memory node and came
//! back, and the local limit checked as a bound on memory.

use dmem_tests::{stat, Memnode, Pager, Workload};

use crate::{assert_all_released, AppSamples, Sampler, MIB};

/// Local limit of the limit-checking tests.
const LIMIT: u64 = 16 * MIB;
/// Prefetch window cap those tests give the pager (`--prefetch-max`).
const PREFETCH: u64 = MIB;

fn memnode() -> Memnode {
    Memnode::start(&["--capacity", "512M", "--lease-grace", "30"])
}

fn pager_for(node: &Memnode, extra: &[&str]) -> Pager {
    let mut args = vec![
        "--memnode".to_string(),
        node.addr_string(),
        "--local-limit".into(),
        LIMIT.to_string(),
        "--prefetch-max".into(),
        PREFETCH.to_string(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    Pager::start(&args)
}

/// Runs `w` while sampling the pager's figures for it; asserts it verified
/// everything.
fn run_sampled(pager: &Pager, w: &Workload) -> (serde_json::Value, AppSamples) {
    let mut run = w.spawn();
    let arena = run.arena();
    let sampler = Sampler::start(pager, &[(run.pid(), arena)]);
    let pid = run.pid();
    run.release();
    let out = run.wait();
    let (seen, _) = sampler.finish();
    let result = out.assert_ok();
    (result, seen.get(&pid).copied().unwrap_or_default())
}

/// The totals after the run(s) (`total` includes apps that have ended),
/// through the `dmem stats --json` CLI.
fn totals(pager: &Pager) -> serde_json::Value {
    pager.stats_cli()["total"].clone()
}

#[track_caller]
fn assert_moved_everywhere(t: &serde_json::Value) {
    for path in [
        &["evictions"][..],
        &["bytes_written_back"],
        &["bytes_fetched"],
        &["faults", "cache"],
        &["faults", "remote"],
        &["faults", "zero"],
    ] {
        assert!(
            stat(t, path) > 0,
            "{path:?} is 0: pages did not take the path it counts: {t:#}"
        );
    }
}

#[track_caller]
fn assert_within_limit(t: &serde_json::Value, s: &AppSamples, limit: u64) {
    // Not over it at any instant: demand fetches reserve their room when
    // they are claimed, prefetched pages go in only while there is room
    // (checked under the lock that installs them), and cache frames count
    // against the limit. A bound on memory, not on time.
    let bound = limit;
    let peak = stat(t, &["peak_resident_bytes"]);
    assert!(
        peak <= bound,
        "peak_resident_bytes {peak} exceeds limit {limit}"
    );
    assert!(
        peak > limit / 2,
        "peak_resident_bytes {peak}: the app never came near its limit {limit}?"
    );
    assert!(
        s.max_local <= bound,
        "resident + cache reached {} (limit {limit}); samples: {s:?}",
        s.max_local
    );
    assert!(
        s.max_arena_rss <= bound,
        "the app's own arena RSS reached {} (limit {limit}): \
         evicted pages are not really dropped from the app; samples: {s:?}",
        s.max_arena_rss
    );
    assert!(
        s.max_arena_rss > 0,
        "the arena's RSS was never sampled: {s:?}"
    );
}

/// Untouched memory reads as zeros, even while written pages are evicted
/// to the cache tier and the memory node around it.
#[test]
fn zero_pages_read_as_zeros() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let (_, s) = run_sampled(&pager, &pager.workload("zero", "64M"));
    let t = totals(&pager);
    assert!(stat(&t, &["faults", "zero"]) > 0);
    assert!(stat(&t, &["evictions"]) > 0, "{t:#}");
    assert!(stat(&t, &["bytes_written_back"]) > 0, "{t:#}");
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Fresh memory touched in address order is zero-filled ahead of the app
/// while there is room under the limit: far fewer faults than pages, and
/// every byte still verified by the workload.
#[test]
fn first_touch_in_address_order_is_filled_ahead_while_there_is_room() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let (_, s) = run_sampled(&pager, &pager.workload("seq", "4M"));
    let t = totals(&pager);
    let pages = (4 * MIB) as usize / 4096;
    let zero = stat(&t, &["faults", "zero"]) as usize;
    assert!(
        zero > 0 && zero < pages / 8,
        "{zero} zero faults for {pages} fresh pages touched in order: no fill ahead? {t:#}"
    );
    assert!(s.max_local <= LIMIT, "{s:?}");
    assert_all_released(&pager);
}

/// 64 MiB written and verified twice sequentially through a 16 MiB limit:
/// pages leave for the cache tier and the memory node and fault back in
/// from both; the app stays within its limit throughout.
#[test]
fn sequential_4x_limit_pages_through_cache_and_memnode() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let (_, s) = run_sampled(&pager, &pager.workload("seq", "64M").arg("--rounds", 2));
    let t = totals(&pager);
    assert_moved_everywhere(&t);
    // The whole data set did not fit: most of it was fetched back.
    assert!(
        stat(&t, &["bytes_fetched"]) >= 32 * MIB,
        "only {} bytes fetched for a 64 MiB set read twice through 16 MiB",
        stat(&t, &["bytes_fetched"])
    );
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Random reads and writes (against a shadow of versions) over 4x the limit.
#[test]
fn random_4x_limit_pages_through_cache_and_memnode() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let w = pager
        .workload("random", "64M")
        .arg("--rounds", 2)
        .arg("--seed", 77);
    let (_, s) = run_sampled(&pager, &w);
    let t = totals(&pager);
    assert_moved_everywhere(&t);
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Write once, read many: pages whose remote copy is valid are dropped on
/// eviction, not written back again.
#[test]
fn clean_pages_are_dropped_not_written_back() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let size = 64 * MIB;
    let (_, s) = run_sampled(&pager, &pager.workload("scan", "64M").arg("--rounds", 3));
    let t = totals(&pager);
    assert!(stat(&t, &["faults", "remote"]) > 0, "{t:#}");
    // Each page is written once. Writing clean pages back on every
    // eviction would write about (1 + rounds) x (size - limit) = 192 MiB.
    let wb = stat(&t, &["bytes_written_back"]);
    assert!(wb > 0, "{t:#}");
    assert!(
        wb < 2 * size,
        "{wb} bytes written back for {size} bytes written once: clean pages are written back"
    );
    // Far more pages left than were written back: the rest were dropped
    // clean, and the counter says so.
    let evicted = stat(&t, &["evictions"]) * 4096;
    assert!(evicted > 2 * wb, "{t:#}");
    assert!(
        stat(&t, &["clean_drops"]) > 0,
        "clean_drops is 0 although {evicted} bytes were evicted and only {wb} written back: {t:#}"
    );
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Pages written over and over outlive pages streamed through once: a
/// dirty page gets a second round in the resident FIFO (evicting it costs
/// a copy, a write-back and a fetch; a clean one is dropped for free).
/// 4 MiB rewritten after every 3.75 MiB read of a 60 MiB stream, 16
/// rounds, 16 MiB local: see the bound below.
#[test]
fn rewritten_pages_outlive_a_stream_read_through() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let (size, rounds, hot) = (64 * MIB, 16, 4 * MIB);
    let (_, s) = run_sampled(
        &pager,
        &pager.workload("hot-cold", "64M").arg("--rounds", rounds),
    );
    let t = totals(&pager);
    // Every page is written once (all may leave once), and the hot pages
    // at most 1.5 times a round on top.
    let wb = stat(&t, &["bytes_written_back"]);
    eprintln!("hot-cold: {} MiB written back", wb / MIB);
    assert!(
        wb <= size + rounds * hot * 3 / 2,
        "{} MiB written back for {} MiB written once and {} MiB rewritten {rounds} times: \
         the rewritten pages were evicted as often as the stream's: {t:#}",
        wb / MIB,
        size / MIB,
        hot / MIB
    );
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Two streams read at once (pages of two far-apart halves in turn) are
/// both prefetched: most pages the app reads back come in ahead of it, not
/// by a fault each. One detector for the whole app saw deltas of +half,
/// -half+1, ... and prefetched nothing useful.
#[test]
fn two_interleaved_streams_are_both_prefetched() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let (_, s) = run_sampled(
        &pager,
        &pager.workload("interleaved", "64M").arg("--rounds", 2),
    );
    let t = totals(&pager);
    // Both rounds read all 64 MiB back; at most the 16 MiB limit of it can
    // still be resident when a round begins.
    let pages_read_remote = 2 * (64 - 16) * MIB / 4096;
    let hits = stat(&t, &["prefetch_hits"]);
    let remote = stat(&t, &["faults", "remote"]);
    assert!(
        hits > pages_read_remote / 2,
        "prefetch_hits {hits} of >= {pages_read_remote} pages read from the node: \
         the two streams were not prefetched: {t:#}"
    );
    assert!(
        remote < pages_read_remote / 4,
        "{remote} remote faults for >= {pages_read_remote} pages read back: {t:#}"
    );
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// The peak the pager reports is a peak: it is never below the local
/// pages (resident + cache) the pager itself reported at some moment.
#[test]
fn peak_resident_bytes_is_not_below_any_observed_local_size() {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    for sc in ["seq", "scan", "zero"] {
        let (_, s) = run_sampled(&pager, &pager.workload(sc, "64M").arg("--rounds", 2));
        assert!(s.samples > 0, "no stats sampled while {sc} ran");
        assert!(
            s.max_local <= s.max_reported_peak,
            "{sc}: the pager reported resident + cache = {} bytes at one moment, but its \
             peak_resident_bytes never exceeded {} (samples: {s:?})",
            s.max_local,
            s.max_reported_peak
        );
    }
}

fn threads(n: usize) {
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let w = pager
        .workload("threads", "64M")
        .arg("--threads", n)
        .arg("--rounds", 2)
        .arg("--seed", n);
    let (_, s) = run_sampled(&pager, &w);
    let t = totals(&pager);
    assert_moved_everywhere(&t);
    assert_within_limit(&t, &s, LIMIT);
    assert_all_released(&pager);
}

/// Four threads faulting at once on their own pages and on shared ones.
#[test]
fn four_threads_fault_concurrently() {
    threads(4);
}

/// Eight threads on a 2-vCPU machine: faults queue behind each other.
#[test]
fn eight_threads_fault_concurrently() {
    threads(8);
}

/// The address-space scenarios run with an 8 MiB limit over 32 MiB, so
/// that when the app changes its mappings, some of its pages are resident,
/// some in the cache tier and some only on the memory node.
fn address_space_scenario(scenario: &str) {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    pager.workload(scenario, "32M").run().assert_ok();
    let t = totals(&pager);
    assert!(stat(&t, &["evictions"]) > 0, "{t:#}");
    assert!(stat(&t, &["bytes_written_back"]) > 0, "{t:#}");
    assert!(stat(&t, &["faults", "remote"]) > 0, "{t:#}");
    assert_all_released(&pager);
    // And the pager serves the next app as usual.
    pager
        .workload("random", "32M")
        .arg("--seed", 3)
        .run()
        .assert_ok();
    assert_all_released(&pager);
}

/// madvise(MADV_DONTNEED) over resident, cached and remote pages: they read
/// as zeros afterwards (not their old content) and are usable again.
#[test]
fn madvise_dontneed_everywhere_reads_zeros() {
    address_space_scenario("madvise");
}

/// mremap moves managed pages, wherever they are, to a new address.
#[test]
fn mremap_moves_pages_wherever_they_are() {
    address_space_scenario("mremap");
}

/// A victim that holds only zeros (here: a buffer the app overwrote with
/// zeros) is dropped at eviction, not written back: 32 MiB written, then
/// zeroed, at an 8 MiB limit writes back about the first pass's 24 MiB,
/// not twice that, and every page still reads as zeros.
#[test]
fn all_zero_victims_are_dropped_not_written_back() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    pager.workload("zero-rewrite", "32M").run().assert_ok();
    let t = totals(&pager);
    let back = stat(&t, &["bytes_written_back"]);
    assert!(back > 0, "{t:#}");
    assert!(
        back < 40 << 20,
        "{back} bytes written back: zeroed pages were written back ({t:#})"
    );
    assert_all_released(&pager);
}

/// Pages that are read and then written on every pass come back writable
/// after their first write-protect fault, so later passes take no
/// write-protect faults: 3 passes over 8192 pages take about 8192 of them
/// (the first pass), not about 24576.
#[test]
fn read_modify_write_pages_come_back_writable() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    pager
        .workload("rmw", "32M")
        .arg("--rounds", 3)
        .run()
        .assert_ok();
    let t = totals(&pager);
    let pages = 32 << 20 >> 12;
    let wp = stat(&t, &["faults", "write_protect"]);
    assert!(stat(&t, &["faults", "remote"]) > 0, "{t:#}");
    assert!(
        wp < 2 * pages,
        "{wp} write-protect faults for 3 passes over {pages} pages: re-written pages \
         still come back write-protected ({t:#})"
    );
    assert_all_released(&pager);
}

/// mremap of pages while they are victims in flight: the eviction follows
/// them to their new address, and the agent's own DONTNEED is recognised
/// only at a victim's origin. Two earlier forms of this race read zeros:
/// a victim moved after the agent took it was marked present at an empty
/// address (about one run in five), and a victim moved away and back
/// while the agent's read of it failed was then dropped by the agent
/// (about one test run in ten). A race: each run moves a chunk 300 times
/// under eviction pressure, three seeds.
#[test]
fn mremap_of_pages_being_evicted_keeps_their_data() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    for seed in 1..=3 {
        pager
            .workload("mremap-churn", "32M")
            .arg("--rounds", 15)
            .arg("--seed", seed)
            .run()
            .assert_ok();
    }
    let t = totals(&pager);
    assert!(stat(&t, &["evictions"]) > 0, "{t:#}");
    assert_all_released(&pager);
}

/// munmap of a quarter of the data: the rest stays intact.
#[test]
fn munmap_leaves_the_rest_intact() {
    address_space_scenario("munmap");
}

fn block_size(block: &str, bytes: u64) {
    let node = memnode();
    let pager = Pager::start(&[
        "--memnode",
        &node.addr_string(),
        "--local-limit",
        "8M",
        "--block",
        block,
    ]);
    assert_eq!(stat(&pager.stats(), &["pager", "block_bytes"]), bytes);
    let out = pager.workload("random", "32M").arg("--seed", 11).run();
    out.assert_ok();
    assert!(
        out.stderr.contains(&format!("block {bytes}")),
        "the pager did not tell the app its block size: {}",
        out.stderr
    );
    pager
        .workload("seq", "32M")
        .arg("--rounds", 2)
        .run()
        .assert_ok();
    pager.workload("zero", "32M").run().assert_ok();
    let t = totals(&pager);
    assert_moved_everywhere(&t);
    assert_all_released(&pager);
}

/// Remote fetches in 16 KiB blocks.
#[test]
fn block_16k_verifies() {
    block_size("16K", 16 << 10);
}

/// Remote fetches in 64 KiB blocks.
#[test]
fn block_64k_verifies() {
    block_size("64K", 64 << 10);
}

/// Linux may swap out pages of a managed arena (any machine with swap under
/// pressure): such a page is neither present nor missing to the pager's
/// eyes, and every path that write-protects, moves, copies or drops
/// victims meets it. Here a zram swap device is set up and the workload's
/// arena is paged out to it in random 4 KiB-1 MiB pieces
/// (`process_madvise(MADV_PAGEOUT)`) all through random, read-modify-write
/// and multi-threaded paging at 4x the limit: every byte is verified, and
/// the kernel must really have swapped pages out. It caught a lost page
/// (2026-12-06): a move that failed with EEXIST on a page it had in fact
/// moved as a swap entry, which the agent, checking with `mincore` (blind
/// to swapped pages), then read in place; the pager stopped the app for a
/// vanished victim in about one run in five.
#[test]
fn pages_the_kernel_swaps_out_meanwhile_keep_every_byte() {
    let _swap = match dmem_tests::ZramSwap::setup("1G") {
        Ok(s) => s,
        Err(why) => {
            return dmem_tests::skip("pages_the_kernel_swaps_out_meanwhile_keep_every_byte", &why)
        }
    };
    let node = memnode();
    let pager = pager_for(&node, &[]);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for scenario in ["random", "rmw", "threads"] {
        let mut run = pager
            .workload(scenario, "64M")
            .arg("--rounds", 3)
            .arg("--threads", 2)
            .spawn();
        let (base, len) = run.arena();
        let used = 64 * MIB;
        let before = dmem_tests::pages_swapped_out();
        let mut asked = 0u64;
        run.release();
        while run.try_wait().is_none() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let at = (rng % (used / 4096)) * 4096;
            let piece = [4096, 64 << 10, MIB][(rng >> 32) as usize % 3].min(len - at);
            asked += dmem_tests::page_out(run.pid(), base + at, piece).unwrap_or(0);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        run.wait().assert_ok();
        let swapped = dmem_tests::pages_swapped_out() - before;
        eprintln!(
            "{scenario}: {swapped} pages swapped out ({} MiB asked)",
            asked / MIB
        );
        assert!(
            swapped > 0,
            "{scenario}: the kernel swapped nothing out, so this showed nothing"
        );
    }
    assert_all_released(&pager);
}
