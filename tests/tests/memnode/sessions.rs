//! Session life cycle against a live `dmem-memnode`: reconnect-and-resume,
//! takeover, lease expiry, and a node that lost the session (restarted)
//! being reported as such instead of serving zeros.

use std::net::SocketAddr;
use std::time::Duration;

use dmem_memnode::client::{Client, ClientError, Pending};
use dmem_memnode::protocol::{ErrorCode, Op, Reply, Request};
use dmem_tests::raw::RawConn;
use dmem_tests::{
    assert_same, eventually, free_port, metric, page_extents, scrape, Memnode, Rng, HANG_GUARD,
    PAGE,
};

#[track_caller]
fn expect_session_lost<T: std::fmt::Debug>(r: Result<T, ClientError>, session: u64) {
    match r {
        Err(ClientError::SessionLost { session: s, .. }) => assert_eq!(s, session),
        Err(e) => panic!("expected SessionLost, got: {e}"),
        Ok(v) => panic!("expected SessionLost, got success: {v:?}"),
    }
}

/// A client whose connection breaks reconnects on its next request and
/// resumes its session: same id, same slabs, same bytes. (The grace here is
/// long so that the test does not depend on how fast the reconnect is;
/// expiry is tested separately.)
#[test]
fn broken_connection_resumes_transparently() {
    let node = Memnode::start(&["--lease-grace", "30"]);
    let mut rng = Rng::new("resume");
    let c = node.client();
    let sid = c.session_id();
    c.alloc(1, (32 * PAGE) as u64).unwrap();
    let data = rng.bytes(32 * PAGE);
    c.write(&page_extents(1, 0, 32), &data).unwrap();

    c.break_connection();
    let back = c.read(&page_extents(1, 0, 32)).unwrap();
    assert_same(&back, &data, "after reconnect");
    assert_eq!(c.reconnects(), 1);
    assert_eq!(c.session_id(), sid);
    assert!(
        c.welcome().resumed,
        "the node must report a resumed session"
    );
    let s = c.stat().unwrap();
    assert_eq!((s.session_slabs, s.session_bytes), (1, (32 * PAGE) as u64));

    // Requests in flight when the connection breaks are sent again. (Resent
    // requests may run in another order than first sent, so the write in
    // flight goes to a page no read in flight touches: the pager never has
    // conflicting requests in flight either.)
    c.alloc(3, PAGE as u64).unwrap();
    let reads: Vec<Pending> = (0..32)
        .map(|p| c.submit_read(&page_extents(1, p, 1)).unwrap())
        .collect();
    let data2 = rng.bytes(PAGE);
    let w = c.submit_write(&page_extents(3, 0, 1), &data2).unwrap();
    c.break_connection();
    for (p, r) in reads.into_iter().enumerate() {
        assert_same(
            &r.wait().unwrap(),
            &data[p * PAGE..(p + 1) * PAGE],
            "resent read",
        );
    }
    w.wait().unwrap();
    assert_same(
        &c.read(&page_extents(3, 0, 1)).unwrap(),
        &data2,
        "resent write",
    );
    assert_eq!(c.reconnects(), 2);
    // Control requests after a break work the same way.
    c.alloc(2, PAGE as u64).unwrap();
    c.break_connection();
    c.free(2).unwrap();
    assert_eq!(c.stat().unwrap().session_slabs, 2);
    assert_eq!(c.reconnects(), 3);
}

/// Resuming takes a session over from a connection that still holds it
/// (the old peer may be half-open): the old connection is closed.
#[test]
fn resume_takes_over_a_live_connection() {
    let node = Memnode::start::<&str>(&[]);
    let mut old = RawConn::connect(node.addr());
    let w = old.handshake(None, None);
    old.send_request(
        1,
        &Request::Alloc {
            slab: 4,
            size: 8192,
        },
    );
    assert_eq!(old.recv().decode(), Reply::Done(Op::Alloc));
    old.send_request(
        2,
        &Request::Write {
            extents: vec![dmem_memnode::protocol::Extent::new(4, 100, 5)],
            data: b"hello",
        },
    );
    assert_eq!(old.recv().decode(), Reply::Done(Op::Write));

    let mut new = RawConn::connect(node.addr());
    let w2 = new.handshake(None, Some((w.session_id, w.resume_secret)));
    assert!(w2.resumed);
    assert_eq!(w2.session_id, w.session_id);
    old.expect_closed();
    new.send_request(
        3,
        &Request::Read {
            extents: vec![dmem_memnode::protocol::Extent::new(4, 100, 5)],
        },
    );
    assert_eq!(new.recv().decode(), Reply::Data(b"hello"));
    // The old connection's departure did not detach the new owner.
    new.send_request(4, &Request::Stat);
    match new.recv().decode() {
        Reply::Stat(s) => assert_eq!(s.session_slabs, 1),
        other => panic!("expected stat, got {other:?}"),
    }
}

/// A closed session cannot be resumed.
#[test]
fn closed_session_cannot_be_resumed() {
    let node = Memnode::start::<&str>(&[]);
    let mut raw = RawConn::connect(node.addr());
    let w = raw.handshake(None, None);
    raw.send_request(1, &Request::CloseSession);
    assert_eq!(raw.recv().decode(), Reply::Done(Op::CloseSession));
    raw.expect_closed();
    let mut again = RawConn::connect(node.addr());
    let nonce = [1u8; 32];
    again.hello(&nonce);
    again.send_request(
        2,
        &Request::Auth {
            mac: [0; 32],
            resume: Some((w.session_id, w.resume_secret)),
        },
    );
    again.expect_error(2, ErrorCode::UnknownSession);
    again.expect_closed();
}

fn restart_on(addr: SocketAddr) -> Memnode {
    Memnode::start(&["--listen", &addr.to_string()])
}

/// The node is killed and a different node comes up on the same port: the
/// client's resume is refused, and the client reports the data as lost
/// instead of reading zeros from a fresh slab.
#[test]
fn restarted_node_reports_session_lost() {
    let mut node = Memnode::start::<&str>(&[]);
    let addr = node.addr();
    let c = node.client();
    let sid = c.session_id();
    c.alloc(1, (4 * PAGE) as u64).unwrap();
    c.write(&page_extents(1, 0, 4), &Rng::new("restart").bytes(4 * PAGE))
        .unwrap();
    node.kill9();
    let _new = restart_on(addr);
    expect_session_lost(c.read(&page_extents(1, 0, 4)), sid);
    // Every later request says the same; none silently succeeds.
    expect_session_lost(c.read(&page_extents(1, 0, 1)), sid);
    expect_session_lost(c.alloc(1, (4 * PAGE) as u64), sid);
}

/// Same, but the client is already waiting (retrying its reconnect) while
/// the node is down, and the replacement comes up meanwhile.
#[test]
fn restart_while_client_waits_reports_session_lost() {
    let mut node = Memnode::start::<&str>(&[]);
    let addr = node.addr();
    let c = node.client();
    let sid = c.session_id();
    c.alloc(1, (4 * PAGE) as u64).unwrap();
    c.write(
        &page_extents(1, 0, 4),
        &Rng::new("restart-wait").bytes(4 * PAGE),
    )
    .unwrap();
    node.kill9();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        restart_on(addr)
    });
    let r = c.read(&page_extents(1, 0, 4));
    let _new = restarter.join().expect("restart thread");
    expect_session_lost(r, sid);
}

/// A node that stays down: the client gives up after its reconnect window
/// with an error, not with data.
#[test]
fn dead_node_is_an_error_not_zeros() {
    let mut node = Memnode::start::<&str>(&[]);
    let mut cfg = node.config();
    cfg.reconnect_window = Duration::from_millis(300);
    let c = Client::connect(cfg).unwrap();
    c.alloc(1, PAGE as u64).unwrap();
    node.kill9();
    match c.read(&page_extents(1, 0, 1)) {
        Err(ClientError::Unreachable { .. }) => {}
        Err(e) => panic!("expected Unreachable, got {e}"),
        Ok(d) => panic!("a dead node returned {} bytes", d.len()),
    }
}

/// A session detached for longer than --lease-grace is reaped: its slabs
/// are freed (used bytes drop), resuming it fails with SessionLost, and
/// attached sessions, even idle ones, are untouched.
#[test]
fn detached_session_is_reaped_after_grace() {
    let mport = free_port();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let node = Memnode::start(&["--lease-grace", "1", "--metrics", &maddr.to_string()]);
    let mut rng = Rng::new("reap");
    let a = node.client();
    let a_sid = a.session_id();
    a.alloc(1, 1 << 20).unwrap();
    a.write(&page_extents(1, 0, 8), &rng.bytes(8 * PAGE))
        .unwrap();
    // An idle attached session with data of its own.
    let idle = node.client();
    idle.alloc(1, (4 * PAGE) as u64).unwrap();
    let idle_data = rng.bytes(4 * PAGE);
    idle.write(&page_extents(1, 0, 4), &idle_data).unwrap();
    // An observer without slabs.
    let observer = node.client();
    assert_eq!(observer.stat().unwrap().used, (1 << 20) + (4 * PAGE) as u64);

    a.break_connection();
    eventually(HANG_GUARD, "the detached session to be reaped", || {
        (observer.stat().unwrap().used == (4 * PAGE) as u64).then_some(())
    });
    let m = scrape(maddr);
    assert_eq!(metric(&m, "dmem_memnode_sessions_expired_total"), 1);
    assert_eq!(metric(&m, "dmem_memnode_sessions{state=\"detached\"}"), 0);
    assert_eq!(metric(&m, "dmem_memnode_sessions{state=\"attached\"}"), 2);
    expect_session_lost(a.read(&page_extents(1, 0, 8)), a_sid);

    // The idle session outlives the grace (it is attached) with its data.
    std::thread::sleep(Duration::from_millis(1500));
    assert_same(
        &idle.read(&page_extents(1, 0, 4)).unwrap(),
        &idle_data,
        "idle attached session",
    );
    assert_eq!(idle.reconnects(), 0);
    idle.close_session().unwrap();
    assert_eq!(observer.stat().unwrap().used, 0);
    assert_eq!(metric(&scrape(maddr), "dmem_memnode_used_bytes"), 0);
    assert_eq!(
        metric(&scrape(maddr), "dmem_memnode_sessions_expired_total"),
        1,
        "a closed session is not counted as expired"
    );
}
