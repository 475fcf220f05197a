//! Memory nodes that misbehave under a running app: connections cut and
//! restored, a node that stalls, a node that dies with the app's data, a
//! node that is full, no node at all. The app either finishes with every
//! byte right or is stopped with a message; it never exits 0 with wrong
//! data, and the pager keeps serving.

use std::time::Duration;

use dmem_tests::{eventually, stat, Memnode, Pager, TcpProxy, HANG_GUARD};
use nix::sys::signal::Signal;

use crate::{assert_all_released, MIB};

/// The pager's connection to the node is cut (both directions, new
/// connections refused) while the app's data lives there, and restored a
/// moment later: the pager reconnects, resumes its session (same slabs) and
/// the app finishes with every byte right.
#[test]
fn cut_connections_are_resumed_and_the_app_finishes() {
    let node = Memnode::start(&["--capacity", "512M", "--lease-grace", "30"]);
    let proxy = TcpProxy::start(node.addr());
    let mut pager = Pager::start(&[
        "--memnode",
        &proxy.addr().to_string(),
        "--local-limit",
        "8M",
    ]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    let before = pager.stats();
    assert!(
        stat(&before["apps"][0], &["remote_pages"]) > 0,
        "no data on the memory node before the cut: {before:#}"
    );
    proxy.cut();
    // The app now reads its data back while the node is unreachable; its
    // faults wait (up to --fetch-timeout, 30 s by default) for the node.
    w.release();
    std::thread::sleep(Duration::from_secs(1));
    proxy.restore();
    w.wait().assert_ok();
    pager.assert_alive();
    let v = pager.stats();
    assert!(
        stat(&v["memnodes"][0], &["reconnects"]) >= 1,
        "the pager did not reconnect: {v:#}"
    );
    assert!(proxy.accepted() >= 2, "no new connection through the proxy");
    assert!(stat(&v["total"], &["faults", "remote"]) > 0, "{v:#}");
    assert_all_released(&pager);
}

/// A node that stops answering for a while (SIGSTOP), shorter than the
/// fetch timeout, is a delay, not a loss.
#[test]
fn stalled_memnode_is_a_delay_not_a_loss() {
    let node = Memnode::start(&["--capacity", "512M", "--lease-grace", "30"]);
    let mut pager = Pager::start(&[
        "--memnode",
        &node.addr_string(),
        "--local-limit",
        "8M",
        "--fetch-timeout",
        "30",
    ]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    node.signal(Signal::SIGSTOP);
    w.release();
    std::thread::sleep(Duration::from_secs(2));
    node.signal(Signal::SIGCONT);
    w.wait().assert_ok();
    pager.assert_alive();
    assert_all_released(&pager);
}

/// The node holding the app's evicted data is killed: the app is stopped
/// with a "dmem:" message naming the node (never exit 0, never wrong data),
/// and the pager survives and serves a new app that fits its limit.
#[test]
fn lost_memnode_stops_the_app_and_the_pager_survives() {
    let mut node = Memnode::start(&["--capacity", "512M"]);
    let addr = node.addr_string();
    let mut pager = Pager::start(&[
        "--memnode",
        &addr,
        "--local-limit",
        "8M",
        "--fetch-timeout",
        "3",
    ]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    let v = pager.stats();
    assert!(stat(&v["apps"][0], &["remote_pages"]) > 0, "{v:#}");
    node.kill9();
    w.release();
    let out = w.wait();
    assert!(
        !out.status.success(),
        "the app exited 0 although its data was lost: {out:?}"
    );
    assert!(
        out.stderr.contains("dmem:"),
        "no dmem: message on the app's stderr: {:?}",
        out.stderr
    );
    assert!(
        out.stderr.contains(&addr),
        "the message does not name the memory node {addr}: {:?}",
        out.stderr
    );
    assert!(!out.stderr.contains("WRONG DATA"), "{:?}", out.stderr);
    assert!(
        matches!(out.signal(), Some(libc::SIGABRT | libc::SIGKILL)),
        "the app should be stopped by the pager, not exit: {out:?}"
    );

    pager.assert_alive();
    crate::assert_all_released(&pager);
    // A new app that fits its limit needs no memory node.
    pager.workload("seq", "4M").run().assert_ok();
    pager.workload("zero", "4M").run().assert_ok();
    pager.assert_alive();
}

/// After the node died, a new app bigger than its limit must still finish:
/// with nowhere to put pages the pager lets it exceed its limit (as with a
/// full node or no node). Its pages are all local; none are lost, and none
/// is fetched from (or counted as written to) the dead node. The pager says
/// why in its log and serves the next app.
#[test]
fn dead_memnode_new_app_over_its_limit_still_finishes() {
    let mut node = Memnode::start(&["--capacity", "512M"]);
    let addr = node.addr_string();
    let mut pager = Pager::start(&[
        "--memnode",
        &addr,
        "--local-limit",
        "4M",
        "--fetch-timeout",
        "3",
    ]);
    // A first app leases a slab on the node, then ends normally.
    pager.workload("seq", "16M").run().assert_ok();
    let before = pager.stats()["total"].clone();
    assert!(
        stat(&pager.stats()["memnodes"][0], &["leased_bytes"]) > 0,
        "the first app leased nothing: {before:#}"
    );
    assert!(stat(&before, &["bytes_written_back"]) > 0, "{before:#}");
    node.kill9();
    // Written, verified, rewritten, verified: every page comes back through
    // its write-back having failed (or not being tried) at least once.
    let mut w = pager.workload("seq", "16M").arg("--rounds", 2).spawn();
    w.release();
    let out = w.wait_guarded(Duration::from_secs(60));
    out.assert_ok();
    pager.assert_alive();
    assert_all_released(&pager);
    let after = pager.stats()["total"].clone();
    let delta = |k: &[&str]| stat(&after, k) - stat(&before, k);
    assert!(delta(&["limit_exceeded"]) > 0, "{after:#}");
    assert!(
        stat(&after, &["peak_resident_bytes"]) > 4 * MIB,
        "16 MiB with nowhere to go must exceed a 4 MiB limit: {after:#}"
    );
    assert_eq!(
        delta(&["bytes_written_back"]),
        0,
        "a write to the dead node was counted: {after:#}"
    );
    assert_eq!(delta(&["faults", "remote"]), 0, "{after:#}");
    let log = pager.log();
    assert!(
        log.contains("exceed its local limit"),
        "no warning about exceeding the limit in the pager's log:\n{log}"
    );
    // The pager keeps serving: another app over its limit finishes too.
    pager
        .workload("random", "12M")
        .arg("--seed", 3)
        .run()
        .assert_ok();
    pager.assert_alive();
    assert_all_released(&pager);
}

/// Two nodes; the one holding the pager's slab dies. The pager finds out
/// on its first write-back there and marks it down (an app running then
/// exceeds its limit meanwhile); from then on write-backs go to the other
/// node: the next app's pages go there and come back from there, every
/// byte right.
#[test]
fn dead_memnode_write_backs_go_to_the_other_node() {
    let mut nodes = [
        Memnode::start(&["--capacity", "512M"]),
        Memnode::start(&["--capacity", "512M"]),
    ];
    let pager = Pager::start(&[
        "--memnode",
        &nodes[0].addr_string(),
        "--memnode",
        &nodes[1].addr_string(),
        "--local-limit",
        "4M",
        "--fetch-timeout",
        "3",
    ]);
    pager.workload("seq", "16M").run().assert_ok();
    let v = pager.stats();
    let leased = |v: &serde_json::Value, i: usize| stat(&v["memnodes"][i], &["leased_bytes"]);
    let state = |v: &serde_json::Value, i: usize| v["memnodes"][i]["state"].clone();
    // Whichever node got the first slab is the one to kill.
    let (dead, live) = if leased(&v, 0) > 0 { (0, 1) } else { (1, 0) };
    assert!(leased(&v, dead) > 0, "no slab leased: {v:#}");
    assert_eq!(leased(&v, live), 0, "{v:#}");
    assert_eq!(state(&v, dead), "up", "{v:#}");
    nodes[dead].kill9();
    // This app's first write-back goes to the dead node's slab.
    pager.workload("seq", "16M").run().assert_ok();
    eventually(HANG_GUARD, "the dead node to be marked down", || {
        let v = pager.stats();
        (state(&v, dead) == "down").then_some(())
    });
    assert_all_released(&pager);
    let before = pager.stats()["total"].clone();
    pager
        .workload("seq", "16M")
        .arg("--rounds", 2)
        .run()
        .assert_ok();
    assert_all_released(&pager);
    let v = pager.stats();
    let after = v["total"].clone();
    let delta = |k: &[&str]| stat(&after, k) - stat(&before, k);
    assert!(
        leased(&v, live) > 0,
        "nothing placed on the live node: {v:#}"
    );
    assert_eq!(state(&v, live), "up", "{v:#}");
    assert_eq!(state(&v, dead), "down", "{v:#}");
    assert!(delta(&["bytes_written_back"]) > 0, "{v:#}");
    assert!(
        delta(&["faults", "remote"]) > 0,
        "no page came back from the live node: {v:#}"
    );
    let log = pager.log();
    assert!(
        log.contains("memory node unusable"),
        "the pager did not say the node is unusable:\n{log}"
    );
}

/// A node far too small for the data (8 MiB; slabs of 4 MiB): the app
/// still finishes with every byte right, over its limit, and the pager
/// counts that.
#[test]
fn out_of_remote_space_exceeds_the_limit_instead_of_losing_data() {
    let node = Memnode::start(&["--capacity", "8M"]);
    let pager = Pager::start(&[
        "--memnode",
        &node.addr_string(),
        "--local-limit",
        "8M",
        "--slab",
        "4M",
    ]);
    pager
        .workload("seq", "32M")
        .arg("--rounds", 2)
        .run()
        .assert_ok();
    pager
        .workload("random", "32M")
        .arg("--seed", 5)
        .run()
        .assert_ok();
    let v = pager.stats_cli();
    let t = &v["total"];
    assert!(stat(t, &["limit_exceeded"]) > 0, "{v:#}");
    assert!(
        stat(t, &["peak_resident_bytes"]) > 8 * MIB,
        "32 MiB cannot fit in 8 MiB local + 8 MiB remote without exceeding: {v:#}"
    );
    // The node was used as far as it goes, and never beyond.
    assert!(stat(t, &["bytes_written_back"]) > 0, "{v:#}");
    assert!(
        stat(&v["memnodes"][0], &["leased_bytes"]) <= 8 * MIB,
        "{v:#}"
    );
    assert_all_released(&pager);
}

/// Without any --memnode: an app within its limit runs as usual; one over
/// it still finishes correctly, exceeding its limit, counted.
#[test]
fn no_memnode_small_fits_and_big_exceeds() {
    let pager = Pager::start(&["--local-limit", "16M"]);
    pager
        .workload("seq", "8M")
        .arg("--rounds", 2)
        .run()
        .assert_ok();
    let t = pager.stats()["total"].clone();
    assert_eq!(stat(&t, &["limit_exceeded"]), 0, "{t:#}");
    assert_eq!(stat(&t, &["evictions"]), 0, "{t:#}");
    assert_eq!(stat(&t, &["faults", "remote"]), 0, "{t:#}");

    pager.workload("seq", "32M").run().assert_ok();
    pager
        .workload("random", "32M")
        .arg("--seed", 9)
        .run()
        .assert_ok();
    let t = pager.stats_cli()["total"].clone();
    assert!(stat(&t, &["limit_exceeded"]) > 0, "{t:#}");
    assert_eq!(stat(&t, &["bytes_written_back"]), 0, "{t:#}");
    assert_eq!(stat(&t, &["faults", "remote"]), 0, "{t:#}");
    assert_all_released(&pager);
}

/// Without a memory node, exceeding the limit is one warning (and a
/// counter), not a warning per eviction batch.
#[test]
fn no_memnode_warns_once_not_per_batch() {
    let pager = Pager::start(&["--local-limit", "8M"]);
    pager.workload("seq", "32M").run().assert_ok();
    let log = pager.log();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warnings <= 10,
        "{warnings} warning lines for one app over its limit without a memory node; \
         first ones:\n{}",
        log.lines()
            .filter(|l| l.contains("WARN"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Memory nodes on two other "hosts" (network namespaces behind veth
/// pairs, with a token), a pager here with `replicas` copies over both.
/// With the app's data written, node 0's link is cut (`ip link set down`)
/// for 3 s while the app reads everything back, then restored: the app
/// finishes with every byte right. With one replica its reads from node 0
/// wait out the cut; with two they go to node 1.
fn veth_cut(test: &str, replicas: &str) {
    let mut hosts = Vec::new();
    for _ in 0..2 {
        match dmem_tests::netns::Netns::create() {
            Ok(ns) => hosts.push(ns),
            Err(reason) => return dmem_tests::skip(test, &reason),
        }
    }
    let dir = dmem_tests::TempDir::new("veth-cut");
    let token = dir.write("token", b"veth cut token 0123456789abcdef");
    let tf = token.to_str().unwrap();
    let nodes: Vec<Memnode> = hosts
        .iter()
        .map(|h| {
            let listen = format!("{}:0", h.ns_ip);
            Memnode::start_wrapped(
                &h.wrapper(),
                &[
                    "--listen",
                    &listen,
                    "--token-file",
                    tf,
                    "--capacity",
                    "256M",
                ],
            )
        })
        .collect();
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr_string()).collect();
    let mut pager = Pager::start(&[
        "--memnode",
        &addrs[0],
        "--memnode",
        &addrs[1],
        "--token-file",
        tf,
        "--replicas",
        replicas,
        "--local-limit",
        "8M",
        "--slab",
        "4M",
    ]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    let v = pager.stats();
    assert!(
        stat(&v["memnodes"][0], &["leased_bytes"]) > 0,
        "nothing on node 0 to cut off: {v:#}"
    );
    dmem_tests::netns::ip(&["link", "set", &hosts[0].host_if, "down"]).expect("cut the link");
    w.release();
    std::thread::sleep(Duration::from_secs(3));
    dmem_tests::netns::ip(&["link", "set", &hosts[0].host_if, "up"]).expect("restore the link");
    crate::finishes_having_paged(w, &mut pager);
}

/// A cut veth link with one replica: the app's faults wait out the cut.
#[test]
fn a_cut_veth_link_is_waited_out() {
    veth_cut("a_cut_veth_link_is_waited_out", "1");
}

/// A cut veth link with two replicas: reads go to the other node.
#[test]
fn a_cut_veth_link_is_read_around_with_replicas() {
    veth_cut("a_cut_veth_link_is_read_around_with_replicas", "2");
}
