//! A memory node in another network namespace, reached over a veth pair:
//! a real non-loopback client. Needs root and iproute2; otherwise the test
//! prints "SKIPPED: <reason>" and returns.

use std::net::SocketAddr;

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

    // With a token: a client on the host reaches it over the veth.
    let listen = format!("{}:0", ns.ns_ip);
    let secured = Memnode::start_wrapped(
        &wrapper,
        &["--listen", &listen, "--token-file", tf.to_str().unwrap()],
    );
    assert_eq!(secured.addr().ip(), ns.ns_ip);
    let mut cfg = ClientConfig::new(secured.addr_string());
    cfg.token = Some(TOKEN.to_vec());
    let c = Client::connect(cfg).expect("token client over the veth");
    c.alloc(1, (64 * PAGE) as u64).unwrap();
    let data = Rng::new("netns").bytes(64 * PAGE);
    c.write(&page_extents(1, 0, 64), &data).unwrap();
    assert_same(
        &c.read(&page_extents(1, 0, 64)).unwrap(),
        &data,
        "over veth",
    );
    // ...resumes across a broken connection too...
    c.break_connection();
    assert_same(&c.read(&page_extents(1, 0, 64)).unwrap(), &data, "resumed");
    assert_eq!(c.reconnects(), 1);
    // ...and `dmem ping` from the host works.
    let (st, out, err) = dmem_tests::run_dmem(&[
        "ping",
        "--memnode",
        &secured.addr_string(),
        "--token-file",
        tf.to_str().unwrap(),
    ]);
    assert!(st.success(), "ping over veth: {out}\n{err}");
    // Without the token, the node refuses.
    assert!(Client::connect(ClientConfig::new(secured.addr_string())).is_err());

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
