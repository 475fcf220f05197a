//! A memory node in another network namespace, reached over a veth pair:
//! a real non-loopback client. Needs root and iproute2; otherwise the test
//! prints "SKIPPED: <reason>" and returns.

use std::net::SocketAddr;
use std::path::Path;

use dmem_memnode::client::{Client, ClientConfig};
use dmem_memnode::protocol::ErrorCode;
use dmem_tests::netns::Netns;
use dmem_tests::raw::RawConn;
use dmem_tests::{assert_same, page_extents, run_cmd, skip, Memnode, Rng, TempDir, PAGE};

const TOKEN: &[u8] = b"cross-namespace token 0123456789";

#[test]
fn memnode_across_network_namespaces() {
    let ns = match Netns::create() {
        Ok(ns) => ns,
        Err(reason) => return skip("memnode_across_network_namespaces", &reason),
    };
    let dir = TempDir::new("netns");
    let tf = dir.write("token", TOKEN);
    let wrapper = ns.wrapper();

    // With a token: a client on the host reaches it over the veth, with
    // each of the node's I/O paths. (The veth's 1500-byte MTU makes replies
    // go out in many more segments than on loopback.)
    for io in ["threads", "uring"] {
        token_node_over_veth(&ns, &tf, io);
    }

    // Without a token file: non-loopback clients are refused.
    let open = Memnode::start_wrapped(&wrapper, &["--listen", "0.0.0.0:0"]);
    let over_veth = SocketAddr::new(ns.ns_ip.into(), open.port());
    match Client::connect(ClientConfig::new(over_veth.to_string())) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::NotLoopback), "{e}"),
        Ok(_) => panic!("a node without a token must refuse a non-loopback client"),
    }
    // On the wire: the refusal comes unprompted, then the close.
    let mut raw = RawConn::connect(over_veth);
    let msg = raw.expect_error(0, ErrorCode::NotLoopback);
    assert!(msg.contains("loopback"), "{msg}");
    raw.expect_closed();
    // Control: the same node serves a loopback client inside its namespace.
    let mut ping = std::process::Command::new("ip");
    ping.args(["netns", "exec", &ns.name])
        .arg(dmem_tests::bin_path("dmem"))
        .args(["ping", "--memnode", &format!("127.0.0.1:{}", open.port())]);
    let (st, out, err) = run_cmd(&mut ping);
    assert!(
        st.success(),
        "loopback ping inside the namespace: {out}\n{err}"
    );
    assert!(out.contains(": OK"), "{out}");
    // And it refused nobody else meanwhile: still refuses the veth client.
    let mut raw = RawConn::connect(over_veth);
    raw.expect_error(0, ErrorCode::NotLoopback);
}

/// A node with a token inside the namespace, `--io <io>`, serves a client
/// on the host: batched I/O, resume after a broken connection, `dmem ping`,
/// and refusal of a client without the token.
fn token_node_over_veth(ns: &Netns, tf: &Path, io: &str) {
    let listen = format!("{}:0", ns.ns_ip);
    let args = [
        "--listen",
        &listen,
        "--token-file",
        tf.to_str().unwrap(),
        "--io",
        io,
        // Longer than the client's request timeout: a reply that stalls
        // fails the client instead of being released by the node's own
        // timeout.
        "--io-timeout",
        "60",
    ];
    let node = match Memnode::try_start_wrapped(&ns.wrapper(), &args) {
        Ok(n) => n,
        Err(e) if io == "uring" && e.contains("io_uring") => {
            return skip("memnode_across_network_namespaces (--io uring)", &e);
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(node.addr().ip(), ns.ns_ip);
    let mut cfg = ClientConfig::new(node.addr_string());
    cfg.token = Some(TOKEN.to_vec());
    let c = Client::connect(cfg).expect("token client over the veth");
    c.alloc(1, (256 * PAGE) as u64).unwrap();
    let data = Rng::new(&format!("netns {io}")).bytes(256 * PAGE);
    c.write(&page_extents(1, 0, 256), &data).unwrap();
    // Reads in batches of several sizes (replies of 4 KiB to 1 MiB), each
    // size starting on a fresh connection (fresh socket buffers) that
    // resumes the session.
    let sizes = [64, 128, 16, 256, 1];
    for batch in sizes {
        c.break_connection();
        for first in (0..256).step_by(batch) {
            let back = c
                .read(&page_extents(1, first, batch))
                .unwrap_or_else(|e| panic!("--io {io}: read of {batch} pages over veth: {e}"));
            let want = &data[first * PAGE..(first + batch) * PAGE];
            assert_same(&back, want, &format!("--io {io}: {batch}-page reads"));
        }
    }
    assert_eq!(c.reconnects(), sizes.len() as u64, "--io {io}");
    // Many small requests in flight.
    let reads: Vec<_> = (0..256)
        .map(|p| c.submit_read(&page_extents(1, p, 1)).unwrap())
        .collect();
    for (p, r) in reads.into_iter().enumerate() {
        let got = r
            .wait()
            .unwrap_or_else(|e| panic!("--io {io}: pipelined read {p}: {e}"));
        assert_same(&got, &data[p * PAGE..(p + 1) * PAGE], "pipelined over veth");
    }
    // `dmem ping` from the host works.
    let (st, out, err) = dmem_tests::run_dmem(&[
        "ping",
        "--memnode",
        &node.addr_string(),
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(st.success(), "--io {io}: ping over veth: {out}\n{err}");
    // Without the token, the node refuses.
    assert!(Client::connect(ClientConfig::new(node.addr_string())).is_err());
}
