//! `dmem ping`, the operator's first check of a memory node: the real
//! binary against real nodes, healthy and not.

use std::io::Write;
use std::net::TcpListener;

use dmem_tests::{free_port, run_dmem, Memnode, TempDir};

const TOKEN: &str = "ping test token, 32 bytes long!!";

#[test]
fn ping_succeeds_against_a_live_node() {
    let node = Memnode::start::<&str>(&[]);
    let (st, out, err) = run_dmem(&["ping", "--memnode", &node.addr_string(), "--rounds", "50"]);
    assert!(
        st.success(),
        "dmem ping failed: {st}\nstdout: {out}\nstderr: {err}"
    );
    assert!(
        out.contains(&format!("memory node {}: OK", node.addr())),
        "{out}"
    );
    assert!(out.contains("read them back and verified"), "{out}");
    // It cleaned up after itself: nothing is left leased.
    assert_eq!(
        node.client().welcome().used,
        0,
        "ping must free its scratch slab"
    );
}

#[test]
fn ping_with_token_succeeds() {
    let dir = TempDir::new("ping-token");
    let tf = dir.write("token", format!("{TOKEN}\n"));
    let node = Memnode::start(&["--token-file", tf.to_str().unwrap()]);
    let (st, out, err) = run_dmem(&[
        "ping",
        "--memnode",
        &node.addr_string(),
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(st.success(), "stdout: {out}\nstderr: {err}");
    assert!(out.contains(": OK"), "{out}");
}

#[track_caller]
fn assert_ping_fails(args: &[&str], expect_in_stderr: &str) {
    let mut full = vec!["ping"];
    full.extend_from_slice(args);
    let (st, out, err) = run_dmem(&full);
    assert!(!st.success(), "dmem ping {args:?} must fail; stdout: {out}");
    assert_eq!(st.code(), Some(1), "exit status {st}");
    assert!(
        !out.contains("OK"),
        "a failed ping must not print OK: {out}"
    );
    assert!(err.contains("FAILED"), "stderr: {err}");
    assert!(
        err.contains(expect_in_stderr),
        "stderr should mention {expect_in_stderr:?}: {err}"
    );
}

#[test]
fn ping_fails_clearly_for_an_unreachable_port() {
    let addr = format!("127.0.0.1:{}", free_port());
    assert_ping_fails(&["--memnode", &addr], "cannot reach memory node");
}

#[test]
fn ping_fails_clearly_for_token_problems() {
    let dir = TempDir::new("ping-badtoken");
    let good = dir.write("good", TOKEN);
    let wrong = dir.write("wrong", "definitely not the right token");
    let missing = dir.path().join("missing");
    let node = Memnode::start(&["--token-file", good.to_str().unwrap()]);
    let addr = node.addr_string();
    assert_ping_fails(
        &["--memnode", &addr, "--token-file", wrong.to_str().unwrap()],
        "refused the token",
    );
    assert_ping_fails(&["--memnode", &addr], "requires a token");
    assert_ping_fails(
        &[
            "--memnode",
            &addr,
            "--token-file",
            missing.to_str().unwrap(),
        ],
        "cannot read token file",
    );
    // A token for a node that runs without one: refused client-side.
    let open = Memnode::start::<&str>(&[]);
    assert_ping_fails(
        &[
            "--memnode",
            &open.addr_string(),
            "--token-file",
            good.to_str().unwrap(),
        ],
        "does not authenticate itself",
    );
}

/// Something that is not a memory node (here: an HTTP server) on the port.
#[test]
fn ping_fails_clearly_against_a_non_dmem_server() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    assert_ping_fails(&["--memnode", &addr], "magic");
    server.join().unwrap();
}
