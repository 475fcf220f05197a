//! Apps and the pager as a service: several apps at once, an app whose
//! pager dies, `dmem stats`, the metrics endpoint, signals, one pager per
//! socket.

use std::net::SocketAddr;

use dmem_tests::{
    app_stats, free_port, metric, run_dmem, scrape, stat, Memnode, Pager, HANG_GUARD,
};
use nix::sys::signal::Signal;

use crate::{assert_all_released, Sampler, MIB};

fn memnode() -> Memnode {
    Memnode::start(&["--capacity", "512M", "--lease-grace", "30"])
}

/// Two apps with different data on one pager, faulting at the same time
/// through 8 MiB limits: both verify every byte, both are listed while they
/// run, each with its own pid and session, and both had data remote.
#[test]
fn two_apps_at_once_both_verify() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    let mut a = pager.workload("hold", "32M").arg("--seed", 1).spawn();
    let mut b = pager.workload("hold", "32M").arg("--seed", 2).spawn();
    let sampler = Sampler::start(&pager, &[(a.pid(), a.arena()), (b.pid(), b.arena())]);
    a.wait_for_line("written");
    b.wait_for_line("written");

    let v = pager.stats_cli();
    assert_eq!(stat(&v, &["pager", "apps"]), 2, "{v:#}");
    let sa = app_stats(&v, a.pid()).unwrap_or_else(|| panic!("app A not listed: {v:#}"));
    let sb = app_stats(&v, b.pid()).unwrap_or_else(|| panic!("app B not listed: {v:#}"));
    assert_ne!(sa["session"], sb["session"]);
    for s in [sa, sb] {
        assert_eq!(stat(s, &["local_limit_bytes"]), 8 * MIB);
        assert!(stat(s, &["remote_pages"]) > 0, "no pages remote: {s:#}");
        assert!(stat(s, &["evictions"]) > 0, "{s:#}");
    }
    // Verify (reading back from everywhere) and rewrite, both at once.
    a.release();
    b.release();
    let (oa, ob) = (a.wait(), b.wait());
    oa.assert_ok();
    ob.assert_ok();
    let (_, most) = sampler.finish();
    assert_eq!(most, 2, "the stats never listed both apps at once");
    let t = pager.stats()["total"].clone();
    assert!(stat(&t, &["faults", "remote"]) > 0, "{t:#}");
    assert_all_released(&pager);
}

/// A forked child whose parent's session has ended (the parent exited
/// right after the fork) still gets every page that was out of the parent
/// at the fork: the fork snapshot outlives the parent's session. The child
/// verifies every page, rewrites and verifies again; afterwards every slot
/// is released (the snapshot's references included). A child that leaves
/// without taking its snapshot leaves nothing behind either.
#[test]
fn a_fork_snapshot_outlives_the_parents_session() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    let r = pager.workload("fork-orphan", "32M").run().assert_ok();
    assert!(stat(&r, &["snapshot_pages_out"]) > 0, "{r}");
    let t = pager.stats()["total"].clone();
    assert!(
        stat(&t, &["fork", "out_pages"]) > 0 && stat(&t, &["faults", "remote"]) > 0,
        "the child took nothing from the snapshot: {t:#}"
    );
    assert_all_released(&pager);
    let r = pager
        .workload("fork-orphan", "32M")
        .arg("--rounds", 0)
        .run()
        .assert_ok();
    assert_eq!(r["adopted"], false, "{r}");
    // The hold ends (and the snapshot goes) when the child's copy of the
    // hold connection closes, which may be just after the session ends.
    dmem_tests::eventually(HANG_GUARD, "the snapshot's slots to be released", || {
        (stat(&pager.stats(), &["pager", "remote_slots_used"]) == 0).then_some(())
    });
    assert_all_released(&pager);
}

/// An app whose pager dies is stopped with a message; it never goes on
/// (an evicted page would read as zeros, or the app would hang).
#[test]
fn app_stops_with_a_message_when_the_pager_dies() {
    let node = memnode();
    let mut pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    pager.kill9();
    w.release();
    let out = w.wait();
    assert!(
        !out.status.success(),
        "the app exited 0 after its pager died: {out:?}"
    );
    assert_eq!(
        out.signal(),
        Some(libc::SIGABRT),
        "the app should abort: {out:?}"
    );
    assert!(
        out.stderr.contains("dmem:") && out.stderr.contains("pager"),
        "no clear message on stderr: {:?}",
        out.stderr
    );
    assert!(!out.stderr.contains("WRONG DATA"), "{:?}", out.stderr);
}

/// A bug inside the pager (a panic, forced here with a failpoint) in its
/// fault reader, a fetch worker or an app's evictor stops only the app it
/// hit, with a message naming the pager's part: the app never hangs and
/// never reads wrong data, and the same pager then serves a new app that
/// pages 4x its limit, verifying every byte.
#[test]
fn a_panic_inside_the_pager_stops_only_that_app_with_a_message() {
    let node = memnode();
    for point in ["fetch:1", "fetch:300", "evict:3"] {
        let mut pager = Pager::start_env(
            &["--memnode", &node.addr_string(), "--local-limit", "8M"],
            &[("DMEM_PAGER_FAILPOINT", point)],
        );
        let out = pager.workload("random", "32M").run();
        assert!(
            !out.status.success(),
            "{point}: the app finished although the pager panicked under it: {out:?}"
        );
        assert!(
            matches!(out.signal(), Some(libc::SIGABRT | libc::SIGKILL)),
            "{point}: the app should be stopped by the pager, not exit: {out:?}"
        );
        let name = point.split(':').next().unwrap();
        assert!(
            out.stderr.contains("dmem:")
                && out.stderr.contains("internal error in the pager's")
                && out.stderr.contains(&format!("failpoint {name} reached")),
            "{point}: no clear message on the app's stderr: {:?}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("WRONG DATA"),
            "{point}: {:?}",
            out.stderr
        );
        pager.assert_alive();
        // Each failpoint fires once: the next app runs clean, bit for bit.
        pager.workload("random", "32M").run().assert_ok();
        pager.workload("seq", "32M").run().assert_ok();
        assert_all_released(&pager);
        pager.assert_alive();
    }
}

/// A page that leaves the app behind the pager's back (the workload moves
/// one out itself with UFFDIO_MOVE, standing in for a kernel or pager bug)
/// is found gone when its eviction comes: the pager stops the app with a
/// message instead of letting the agent's zeros become the page. Before
/// 2026-12-06 that page came back as zeros (seen as rare wrong GEMM
/// results), which the workload's final check reports.
/// And when the app reads that page back at once, before any eviction:
/// a missing page the pager holds resident faults over and over; after
/// 100,000 such faults in a row the app is stopped with a message instead
/// of spinning forever.
#[test]
fn a_page_gone_behind_the_pagers_back_stops_the_app_never_zeros() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    for (scenario, says) in [
        ("vanish", "vanished from the program"),
        (
            "vanish-touch",
            "is missing in the program while the pager holds it resident",
        ),
    ] {
        let out = pager.workload(scenario, "32M").run();
        assert!(
            !out.status.success(),
            "{scenario}: the app finished although one of its pages vanished: {out:?}"
        );
        assert!(
            out.stderr.contains("dmem:") && out.stderr.contains(says),
            "{scenario}: no clear message on the app's stderr: {:?}",
            out.stderr
        );
        assert!(
            !out.stderr.contains("ZEROS"),
            "{scenario}: {:?}",
            out.stderr
        );
    }
    assert_all_released(&pager);
}

/// The metrics endpoint serves `dmem_pager_*` series that follow the apps.
#[test]
fn metrics_endpoint_serves_pager_series() {
    let node = memnode();
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let pager = Pager::start(&[
        "--memnode",
        &node.addr_string(),
        "--local-limit",
        "8M",
        "--cache",
        "64M",
        "--metrics",
        &maddr.to_string(),
    ]);
    let idle = scrape(maddr);
    assert_eq!(metric(&idle, "dmem_pager_apps"), 0);
    assert_eq!(
        metric(&idle, "dmem_pager_cache_capacity_bytes"),
        64 * MIB,
        "{idle}"
    );
    assert_eq!(
        metric(&idle, "dmem_pager_evictions{scope=\"total\"}"),
        0,
        "{idle}"
    );

    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    let m = scrape(maddr);
    assert_eq!(metric(&m, "dmem_pager_apps"), 1, "{m}");
    assert!(metric(&m, "dmem_pager_resident_bytes") > 0, "{m}");
    assert!(
        metric(&m, "dmem_pager_evictions{scope=\"total\"}") > 0,
        "{m}"
    );
    assert!(
        metric(&m, "dmem_pager_bytes_written_back{scope=\"total\"}") > 0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            &format!(
                "dmem_pager_memnode_leased_bytes{{memnode=\"{}\"}}",
                node.addr()
            )
        ) > 0,
        "{m}"
    );
    w.release();
    w.wait().assert_ok();
    assert_all_released(&pager);
    let after = scrape(maddr);
    assert_eq!(metric(&after, "dmem_pager_apps"), 0, "{after}");
    // Totals keep the ended app's figures.
    assert!(
        metric(&after, "dmem_pager_faults_remote{scope=\"total\"}") > 0,
        "{after}"
    );
    assert!(
        metric(&after, "dmem_pager_faults_zero{scope=\"total\"}") > 0,
        "the 8192 pages started with zero faults: {after}"
    );
}

/// `dmem stats` (human form) names the pager and each app; it fails
/// clearly when no pager listens.
#[test]
fn stats_cli_human_and_no_pager() {
    let node = memnode();
    let pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", "8M"]);
    let mut w = pager.workload("hold", "16M").spawn();
    w.wait_for_line("written");
    let sock = pager.socket().display().to_string();
    let (st, out, err) = run_dmem(&["stats", "--socket", &sock]);
    assert!(st.success(), "{err}");
    assert!(out.contains("1 app(s)"), "{out}");
    assert!(out.contains(&format!("app pid {}", w.pid())), "{out}");
    assert!(out.contains(&node.addr_string()), "{out}");
    w.release();
    w.wait().assert_ok();

    let dir = dmem_tests::TempDir::new("nopager");
    let missing = dir.path().join("none.sock");
    let (st, _, err) = run_dmem(&["stats", "--socket", &missing.display().to_string()]);
    assert!(!st.success());
    assert!(err.contains("cannot reach the pager"), "{err}");
}

/// SIGTERM: the pager exits 0 and removes its socket.
#[test]
fn sigterm_exits_cleanly_and_removes_the_socket() {
    let mut pager = Pager::start(&["--local-limit", "8M"]);
    pager.workload("seq", "4M").run().assert_ok();
    let sock = pager.socket().to_owned();
    assert!(sock.exists());
    pager.signal(Signal::SIGTERM);
    let st = pager.wait_exit(HANG_GUARD);
    assert!(st.success(), "exit status after SIGTERM: {st}");
    assert!(!sock.exists(), "socket {} left behind", sock.display());
}

/// A second pager on a live pager's socket refuses to start (and the first
/// keeps serving); a stale socket file left by a dead pager is taken over.
#[test]
fn one_pager_per_socket() {
    let mut first = Pager::start(&["--local-limit", "8M"]);
    let sock = first.socket().display().to_string();
    let err = match Pager::try_start(&["--socket", &sock]) {
        Ok(_) => panic!("a second pager started on a live pager's socket"),
        Err(e) => e,
    };
    assert!(err.contains("already listening"), "{err}");
    first.workload("seq", "4M").run().assert_ok();

    first.kill9();
    assert!(first.socket().exists(), "SIGKILL leaves the socket file");
    let second = Pager::start(&["--socket", &sock]);
    second.workload("seq", "4M").run().assert_ok();
}

/// Same, with the pager killed while evictions are in full flow (small
/// limits, random faults): the agent may be inside an eviction batch then.
/// Two dozen kills at different moments; every app must stop with the
/// message, none may hang (the hang guard here is [`HANG_GUARD`]: an
/// aborting app ends at once).
#[test]
fn app_stops_when_the_pager_dies_mid_eviction() {
    let node = memnode();
    for i in 0..24u64 {
        let (scenario, limit) = if i % 2 == 0 {
            ("random", "1M")
        } else {
            ("threads", "2M")
        };
        let mut pager = Pager::start(&["--memnode", &node.addr_string(), "--local-limit", limit]);
        let w = pager
            .workload(scenario, "64M")
            .arg("--rounds", 3)
            .arg("--seed", i + 1)
            .spawn();
        let pid = w.pid();
        dmem_tests::eventually(HANG_GUARD, "the app to be evicting", || {
            let v = pager.stats();
            app_stats(&v, pid)
                .is_some_and(|a| stat(a, &["evictions"]) > 0)
                .then_some(())
        });
        std::thread::sleep(std::time::Duration::from_millis(i * 29 % 200));
        pager.kill9();
        let out = w.wait_guarded(HANG_GUARD);
        assert!(
            !out.status.success(),
            "kill {i}: the app exited 0 after its pager died: {out:?}"
        );
        assert!(
            out.stderr.contains("dmem:"),
            "kill {i}: no dmem: message: {:?}",
            out.stderr
        );
    }
}
