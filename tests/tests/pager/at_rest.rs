//! Pages at rest on memory nodes (`--encrypt`): what a node holds is read
//! straight out of its memory (`/proc/PID/mem`) and searched for the app's
//! data.

use std::collections::HashSet;

use dmem_tests::{corrupt_memory, find_words, page_word, stat, words_in_memory};

use crate::assert_all_released;

const SEED: u64 = 4242;
const PAGES: usize = 8192; // 32M

/// Runs `hold` over 32M at 8M local; with the data written (most of it on
/// the node), counts how many pages' first words occur in the node's
/// memory, then lets the app verify everything and finish.
fn plaintext_pages_on_the_node(extra: &[&str]) -> (usize, serde_json::Value) {
    let ns = crate::nodes(1);
    let pager = crate::pager_over(&ns, extra);
    let mut w = pager.workload("hold", "32M").arg("--seed", SEED).spawn();
    w.wait_for_line("written");
    let v = pager.stats();
    assert!(stat(&v["apps"][0], &["remote_pages"]) > 1000, "{v:#}");
    let words: HashSet<u64> = (0..PAGES).map(|p| page_word(SEED, p, 0, 1)).collect();
    let found = words_in_memory(ns[0].pid(), &words);
    w.release();
    w.wait().assert_ok();
    assert_all_released(&pager);
    (found, v)
}

/// Without --encrypt the node holds the app's pages as they are (the
/// control: the search finds them); with it, not one of them, and the app
/// still reads every byte back right.
#[test]
fn with_encrypt_memory_nodes_hold_no_plaintext() {
    let (plain, v) = plaintext_pages_on_the_node(&[]);
    assert!(
        plain > 1000,
        "the search should find the pages on a node without --encrypt: {plain} found ({v:#})"
    );
    let (sealed, v) = plaintext_pages_on_the_node(&["--encrypt"]);
    assert_eq!(
        sealed, 0,
        "{sealed} of the app's pages are readable on the node despite --encrypt"
    );
    assert_eq!(v["pager"]["encrypt"], true, "{v:#}");
}

/// Starts `nodes` memory nodes and a pager over them with `extra` flags,
/// runs `hold` over 32M at 8M local and, with the data written, flips a
/// byte of every copy of the app's pages that node 0 holds. Returns what
/// the app did when it then read everything back.
fn corrupt_node0_then_read_back(
    nodes: usize,
    extra: &[&str],
) -> (dmem_tests::WorkloadOutcome, String) {
    let ns = crate::nodes(nodes);
    let mut pager = crate::pager_over(&ns, extra);
    let mut w = pager.workload("hold", "32M").arg("--seed", SEED).spawn();
    w.wait_for_line("written");
    let words: HashSet<u64> = (0..PAGES).map(|p| page_word(SEED, p, 0, 1)).collect();
    let at: Vec<u64> = find_words(ns[0].pid(), &words)
        .into_iter()
        .map(|(a, _)| a)
        .collect();
    assert!(at.len() > 1000, "only {} pages found on node 0", at.len());
    corrupt_memory(ns[0].pid(), &at);
    w.release();
    let out = w.wait();
    pager.assert_alive();
    assert!(
        !out.stderr.contains("WRONG DATA"),
        "a corrupted page was served: {:?}",
        out.stderr
    );
    (out, pager.log())
}

/// A node's storage goes bad under the app's pages: the checksum catches
/// the first one fetched, and the app is stopped with a message; it never
/// reads the damaged bytes.
#[test]
fn corrupted_pages_on_a_node_are_detected_never_served() {
    let (out, _) = corrupt_node0_then_read_back(1, &[]);
    assert!(!out.status.success(), "exited 0 after corruption: {out:?}");
    assert!(
        out.stderr.contains("corrupted page"),
        "no corruption message: {:?}",
        out.stderr
    );
}

/// The same with two replicas: each damaged page is read again from the
/// other node, and the app finishes with every byte right.
#[test]
fn corrupted_pages_are_read_from_another_replica() {
    let (out, log) = corrupt_node0_then_read_back(2, &["--replicas", "2"]);
    out.assert_ok();
    assert!(
        log.contains("corrupted page") && log.contains("trying the other replicas"),
        "no damaged page was read, so nothing was tested:\n{log}"
    );
}
