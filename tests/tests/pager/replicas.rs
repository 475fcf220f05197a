//! Replicas (`--replicas N`): every page written back lives on N distinct
//! memory nodes; a node's death is a non-event for the app, and its
//! replicas are rebuilt on the other nodes from the survivors.

use std::time::Duration;

use dmem_tests::{eventually, stat, Memnode, Pager};

use crate::{assert_all_released, nodes, pager_over};

/// Indexes of the nodes the pager has leased slabs on.
fn leased_nodes(v: &serde_json::Value) -> Vec<usize> {
    (0..v["memnodes"].as_array().map_or(0, Vec::len))
        .filter(|&i| stat(&v["memnodes"][i], &["leased_bytes"]) > 0)
        .collect()
}

/// `n` nodes, a pager with two replicas over them, and an app that has
/// written 32M at 8M local (its pages on the nodes) and waits.
fn holding_app(n: usize) -> (Vec<Memnode>, Pager, dmem_tests::RunningWorkload) {
    let ns = nodes(n);
    let pager = pager_over(&ns, &["--replicas", "2"]);
    let mut w = pager.workload("hold", "32M").spawn();
    w.wait_for_line("written");
    (ns, pager, w)
}

/// Waits until the pager reports node `i` in (`up`) or out of use.
fn node_up_becomes(pager: &Pager, i: usize, up: bool) {
    let what = format!("node {i} to be {}", if up { "up" } else { "seen lost" });
    eventually(Duration::from_secs(30), &what, || {
        ((pager.stats()["memnodes"][i]["state"] == "up") == up).then_some(())
    });
}

/// Three nodes, two replicas. A node holding the app's data is killed
/// (-9) while the app waits: its groups are rebuilt on the others, then a
/// second node is killed too. The app then reads everything back from the
/// one node left and finishes with every byte right. Without replicas the
/// first kill would stop it; without the rebuild the second would (groups
/// that had both their replicas on the two dead nodes).
#[test]
fn a_killed_memnode_is_a_non_event_and_its_replicas_are_rebuilt() {
    let (mut ns, mut pager, mut w) = holding_app(3);
    let v = pager.stats();
    assert!(stat(&v["apps"][0], &["remote_pages"]) > 0, "{v:#}");
    assert_eq!(
        leased_nodes(&v),
        vec![0, 1, 2],
        "groups should spread over every node: {v:#}"
    );
    ns[0].kill9();
    let v = eventually(
        Duration::from_secs(60),
        "the dead node's replica groups to be rebuilt",
        || {
            let v = pager.stats();
            (v["memnodes"][0]["state"] != "up"
                && stat(&v, &["pager", "rebuilt_pages"]) > 0
                && stat(&v, &["pager", "degraded_groups"]) == 0)
                .then_some(v)
        },
    );
    assert!(
        stat(&v["memnodes"][1], &["leased_bytes"]) > 0
            && stat(&v["memnodes"][2], &["leased_bytes"]) > 0,
        "{v:#}"
    );
    ns[1].kill9();
    w.release();
    w.wait().assert_ok();
    pager.assert_alive();
    assert_all_released(&pager);
}

/// Three nodes, two replicas. A node is killed (-9) and its groups are
/// rebuilt on the other two; it is then restarted on its address, empty,
/// and the pager takes it back with a new session. A second node is
/// killed: its groups can only be rebuilt on the restarted one. Then the
/// third node is killed too, and the app reads everything back from the
/// restarted node alone. Without taking it back, the second rebuild has no
/// node to go to and the third kill loses pages.
#[test]
fn a_restarted_memnode_is_taken_back_and_rebuilt_onto() {
    let (mut ns, mut pager, mut w) = holding_app(3);
    let rebuilt = |pager: &Pager, what: &str| {
        eventually(Duration::from_secs(60), what, || {
            let v = pager.stats();
            (stat(&v, &["pager", "degraded_groups"]) == 0).then_some(v)
        })
    };
    let addr0 = ns[0].addr_string();
    ns[0].kill9();
    node_up_becomes(&pager, 0, false);
    rebuilt(&pager, "node 0's groups to be rebuilt on nodes 1 and 2");
    ns[0] = Memnode::start(&["--listen", &addr0, "--capacity", "256M"]);
    node_up_becomes(&pager, 0, true);
    ns[1].kill9();
    node_up_becomes(&pager, 1, false);
    let v = rebuilt(&pager, "node 1's groups to be rebuilt, on node 0");
    assert!(stat(&v["memnodes"][0], &["leased_bytes"]) > 0, "{v:#}");
    ns[2].kill9();
    w.release();
    w.wait().assert_ok();
    pager.assert_alive();
    assert!(
        pager.log().contains("lost memory node answers again"),
        "{}",
        pager.log()
    );
}

/// Two nodes, two replicas: one is killed while the app runs. Its pages
/// come from the other replica, and with a single node left the app's
/// write-backs cannot be placed twice, so it runs over its local limit
/// instead of keeping one copy: it finishes with every byte right.
#[test]
fn reads_fall_back_to_the_other_replica_when_a_node_dies() {
    let (mut ns, mut pager, mut w) = holding_app(2);
    ns[1].kill9();
    w.release();
    crate::finishes_having_paged(w, &mut pager);
}

/// Replicas need as many memory nodes: a clear error at start.
#[test]
fn more_replicas_than_memnodes_is_refused() {
    let ns = nodes(2);
    let addrs: Vec<String> = ns.iter().map(|n| n.addr_string()).collect();
    let err = Pager::try_start(&[
        "--memnode",
        &addrs[0],
        "--memnode",
        &addrs[1],
        "--local-limit",
        "8M",
        "--replicas",
        "3",
    ])
    .err()
    .expect("a pager with --replicas 3 over 2 nodes must not start");
    assert!(err.contains("--replicas 3"), "{err}");
}

#[test]
fn a_memnode_listed_twice_is_refused() {
    let ns = nodes(1);
    let addr = ns[0].addr_string();
    let port = addr.rsplit(':').next().expect("host:port").to_owned();
    // The same name twice, and two names for one address.
    for other in [addr.clone(), format!("localhost:{port}")] {
        let err = Pager::try_start(&[
            "--memnode",
            &addr,
            "--memnode",
            &other,
            "--local-limit",
            "8M",
            "--replicas",
            "2",
        ])
        .err()
        .expect("a pager with one node listed twice must not start");
        assert!(err.contains("are the same memory node"), "{err}");
    }
}
