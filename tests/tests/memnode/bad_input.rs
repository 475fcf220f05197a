//! Bad input against a live `dmem-memnode`: every class of malformed,
//! truncated, oversized, stalled or unauthenticated traffic gets the right
//! error frame (or a silent drop where no reply is possible), fatal errors
//! close the connection, refusals do not, and the node keeps serving a
//! client that was connected before and a client that connects after.

use std::time::Duration;

use dmem_memnode::client::{Client, ClientError};
use dmem_memnode::protocol::{
    encode_request, ErrorCode, Extent, Op, Reply, Request, Secret, Welcome, EXTENT_LEN, HEADER_LEN,
    MAGIC, MAX_EXTENTS, MAX_IO_BYTES, MAX_PAYLOAD, MAX_SLAB_BYTES, OP_ERROR,
};
use dmem_tests::raw::{frame, header, RawConn};
use dmem_tests::{assert_serves, page_extents, Bystander, Memnode, Rng, TempDir, PAGE};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

const TOKEN: &[u8] = b"bad-input test token 0123456789";

/// A node, a client connected before the bad input, and an optional token.
struct Fixture {
    node: Memnode,
    bystander: Bystander,
    token: Option<&'static [u8]>,
    _dir: TempDir,
}

impl Fixture {
    fn new(extra: &[&str]) -> Fixture {
        Fixture::build(extra, false)
    }

    fn with_token(extra: &[&str]) -> Fixture {
        Fixture::build(extra, true)
    }

    fn build(extra: &[&str], token: bool) -> Fixture {
        let dir = TempDir::new("bad-input");
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if token {
            let tf = dir.write("token", TOKEN);
            args.push("--token-file".into());
            args.push(tf.to_str().expect("utf-8 temp path").into());
        }
        let node = Memnode::start(&args);
        let token = token.then_some(TOKEN);
        let bystander = Bystander::new(&node, token);
        Fixture {
            node,
            bystander,
            token,
            _dir: dir,
        }
    }

    fn raw(&self) -> RawConn {
        RawConn::connect(self.node.addr())
    }

    /// A connection that completed HELLO + AUTH.
    fn authed(&self) -> (RawConn, Welcome) {
        let mut c = self.raw();
        let w = c.handshake(self.token, None);
        (c, w)
    }

    /// The node is alive, the earlier client's data and connection are
    /// intact, and a new client is served correctly.
    #[track_caller]
    fn still_serves(&mut self) {
        self.node.assert_alive();
        self.bystander.check();
        assert_serves(self.node.addr(), self.token);
    }
}

fn encode(req_id: u64, req: &Request<'_>) -> Vec<u8> {
    let mut f = Vec::new();
    encode_request(&mut f, req_id, req);
    f
}

fn extent_bytes(slab: u32, offset: u64, len: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(EXTENT_LEN);
    b.extend_from_slice(&slab.to_le_bytes());
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

#[test]
fn bad_magic_gets_bad_frame_and_close() {
    let mut f = Fixture::new(&[]);
    // Before the handshake.
    let mut c = f.raw();
    c.send(&header(0xBEEF, Op::Hello as u8, 0, 36, 41));
    c.send(&[0u8; 36]);
    c.expect_error(41, ErrorCode::BadFrame);
    c.expect_closed();
    // After it: a frame with the magic bytes swapped (big-endian peer).
    let (mut c, _) = f.authed();
    c.send(&header(MAGIC.swap_bytes(), Op::Stat as u8, 0, 0, 42));
    let msg = c.expect_error(42, ErrorCode::BadFrame);
    assert!(msg.contains("magic"), "{msg}");
    c.expect_closed();
    f.still_serves();
}

#[test]
fn nonzero_flags_get_bad_frame_and_close() {
    let mut f = Fixture::new(&[]);
    for flags in [0x01u8, 0x80, 0xFF] {
        let (mut c, _) = f.authed();
        c.send(&header(MAGIC, Op::Stat as u8, flags, 0, 7));
        let msg = c.expect_error(7, ErrorCode::BadFrame);
        assert!(msg.contains("flags"), "{msg}");
        c.expect_closed();
    }
    let mut c = f.raw();
    c.send(&header(MAGIC, Op::Hello as u8, 2, 0, 8));
    c.expect_error(8, ErrorCode::BadFrame);
    c.expect_closed();
    f.still_serves();
}

/// A header announcing more than MAX_PAYLOAD is refused from the header
/// alone: the error comes back without the node waiting for (or allocating)
/// the announced payload.
#[test]
fn oversized_length_is_refused_before_allocation() {
    let mut f = Fixture::new(&[]);
    let rss_before = f.node.peak_rss();
    for (i, len) in [MAX_PAYLOAD as u32 + 1, u32::MAX / 2, u32::MAX]
        .into_iter()
        .enumerate()
    {
        let id = 100 + i as u64;
        let (mut c, _) = f.authed();
        c.send(&header(MAGIC, Op::Write as u8, 0, len, id));
        let msg = c.expect_error(id, ErrorCode::TooLarge);
        assert!(msg.contains(&len.to_string()), "{msg}");
        c.expect_closed();
    }
    // Before authentication too.
    let mut c = f.raw();
    c.send(&header(MAGIC, Op::Hello as u8, 0, u32::MAX, 9));
    c.expect_error(9, ErrorCode::TooLarge);
    c.expect_closed();
    // Announcing 4 GiB moved the peak RSS by nowhere near that.
    let rss_after = f.node.peak_rss();
    assert!(
        rss_after < rss_before + (256 << 20),
        "peak RSS went from {rss_before} to {rss_after} bytes"
    );
    f.still_serves();
}

/// A header promising more payload than is sent before the peer closes:
/// no reply is possible, the connection is dropped, nothing else breaks.
#[test]
fn truncated_frames_are_dropped() {
    let mut f = Fixture::new(&[]);
    // Payload cut short, authenticated.
    let (mut c, _) = f.authed();
    let mut w = encode(
        5,
        &Request::Write {
            extents: vec![Extent::new(1, 0, 64)],
            data: &[0xAB; 64],
        },
    );
    w.truncate(HEADER_LEN + 10);
    c.send(&w);
    c.shutdown_write();
    c.expect_closed();
    // Header cut short, unauthenticated.
    let mut c = f.raw();
    c.send(&header(MAGIC, Op::Hello as u8, 0, 36, 1)[..9]);
    c.shutdown_write();
    c.expect_closed();
    // Handshake cut short: HELLO, then close instead of AUTH.
    let mut c = f.raw();
    c.hello(&[3u8; 32]);
    c.shutdown_write();
    c.expect_closed();
    f.still_serves();
}

/// A peer that stalls mid-frame (or mid-handshake) for longer than
/// --io-timeout is dropped, while everyone else keeps being served; an
/// authenticated connection idle between frames is not.
#[test]
fn stalled_peers_are_dropped_after_io_timeout() {
    let mut f = Fixture::new(&["--io-timeout", "0.5"]);
    // Partial header, authenticated.
    let (mut c1, _) = f.authed();
    c1.send(&header(MAGIC, Op::Stat as u8, 0, 0, 1)[..5]);
    // Full header, partial payload, authenticated.
    let (mut c2, _) = f.authed();
    let w = encode(
        2,
        &Request::Write {
            extents: vec![Extent::new(1, 0, 4096)],
            data: &[7u8; 4096],
        },
    );
    c2.send(&w[..HEADER_LEN + 100]);
    // Connected, never says anything.
    let mut c3 = f.raw();
    // HELLO answered, AUTH never sent.
    let mut c4 = f.raw();
    c4.hello(&[9u8; 32]);
    // Idle between frames after authenticating: allowed.
    let (mut idle, _) = f.authed();

    // While the stalled peers hang there, others are served.
    f.bystander.check();
    assert_serves(f.node.addr(), None);

    c1.expect_closed();
    c2.expect_closed();
    c3.expect_closed();
    c4.expect_closed();
    // The idle connection outlived several timeouts and still works.
    std::thread::sleep(Duration::from_millis(1500));
    idle.assert_usable(77);
    f.still_serves();
}

/// A peer that drips its HELLO a byte at a time, each byte well within the
/// I/O timeout, must still be dropped when the handshake deadline passes,
/// not answered once the frame is finally complete.
#[test]
fn dripped_handshake_is_dropped_at_the_deadline() {
    let mut f = Fixture::new(&["--io-timeout", "0.5"]);
    let mut c = f.raw();
    let hello = encode(
        1,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
            client_nonce: [5u8; 32],
        },
    );
    // 36 payload bytes, one every 60 ms: about 2.2 s in all, four times the
    // handshake deadline, while no single gap comes near the timeout.
    c.send(&hello[..HEADER_LEN]);
    for b in &hello[HEADER_LEN..] {
        std::thread::sleep(Duration::from_millis(60));
        c.send_lossy(std::slice::from_ref(b));
    }
    c.expect_closed();
    f.still_serves();
}

#[test]
fn unknown_opcodes_get_unknown_op_and_close() {
    let mut f = Fixture::new(&[]);
    for op in [0x00u8, 0x04, 0x7E, Op::Read as u8 | 0x80, OP_ERROR] {
        let (mut c, _) = f.authed();
        c.send(&frame(op, 0x1234, &[1, 2, 3]));
        let msg = c.expect_error(0x1234, ErrorCode::UnknownOp);
        assert!(msg.contains("opcode"), "{msg}");
        c.expect_closed();
    }
    // Before authentication, too.
    let mut c = f.raw();
    c.send(&frame(0x42, 3, &[]));
    c.expect_error(3, ErrorCode::UnknownOp);
    c.expect_closed();
    f.still_serves();
}

/// Payloads that do not match their opcode's layout.
#[test]
fn malformed_payloads_get_bad_frame_and_close() {
    let mut f = Fixture::new(&[]);
    let ext_ok = extent_bytes(1, 0, 64);
    let mut cases: Vec<(&str, u8, Vec<u8>, ErrorCode)> = vec![
        (
            "alloc short",
            Op::Alloc as u8,
            vec![0; 11],
            ErrorCode::BadFrame,
        ),
        (
            "alloc trailing",
            Op::Alloc as u8,
            vec![0; 13],
            ErrorCode::BadFrame,
        ),
        ("free empty", Op::Free as u8, vec![], ErrorCode::BadFrame),
        (
            "free trailing",
            Op::Free as u8,
            vec![0; 5],
            ErrorCode::BadFrame,
        ),
        (
            "stat trailing",
            Op::Stat as u8,
            vec![0],
            ErrorCode::BadFrame,
        ),
        (
            "close trailing",
            Op::CloseSession as u8,
            vec![1, 2],
            ErrorCode::BadFrame,
        ),
        (
            "read empty payload",
            Op::Read as u8,
            vec![],
            ErrorCode::BadFrame,
        ),
        (
            "read zero extents",
            Op::Read as u8,
            0u32.to_le_bytes().to_vec(),
            ErrorCode::BadFrame,
        ),
        (
            "read zero-length extent",
            Op::Read as u8,
            [&1u32.to_le_bytes()[..], &extent_bytes(1, 0, 0)].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "read count larger than the descriptors",
            Op::Read as u8,
            [&2u32.to_le_bytes()[..], &ext_ok].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "read half a descriptor",
            Op::Read as u8,
            [&1u32.to_le_bytes()[..], &ext_ok[..8]].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "read trailing byte",
            Op::Read as u8,
            [&1u32.to_le_bytes()[..], &ext_ok, &[0][..]].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "write data short",
            Op::Write as u8,
            [&1u32.to_le_bytes()[..], &ext_ok, &[5; 63][..]].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "write data long",
            Op::Write as u8,
            [&1u32.to_le_bytes()[..], &ext_ok, &[5; 65][..]].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "write zero extents",
            Op::Write as u8,
            [&0u32.to_le_bytes()[..], &[5; 64][..]].concat(),
            ErrorCode::BadFrame,
        ),
        (
            "read more than MAX_EXTENTS",
            Op::Read as u8,
            (MAX_EXTENTS as u32 + 1).to_le_bytes().to_vec(),
            ErrorCode::TooLarge,
        ),
        (
            "read more than MAX_IO_BYTES",
            Op::Read as u8,
            [
                &2u32.to_le_bytes()[..],
                &extent_bytes(1, 0, MAX_IO_BYTES as u32),
                &extent_bytes(1, 0, MAX_IO_BYTES as u32),
            ]
            .concat(),
            ErrorCode::TooLarge,
        ),
    ];
    // A count that would overflow `count * EXTENT_LEN` on 32-bit.
    cases.push((
        "read u32::MAX extents",
        Op::Read as u8,
        u32::MAX.to_le_bytes().to_vec(),
        ErrorCode::TooLarge,
    ));
    for (i, (what, op, payload, code)) in cases.into_iter().enumerate() {
        let id = 1000 + i as u64;
        let (mut c, _) = f.authed();
        c.send(&frame(op, id, &payload));
        let r = c.recv();
        let (got, msg) = r
            .error()
            .unwrap_or_else(|| panic!("{what}: expected {code:?}, got {:?}", r.decode()));
        assert_eq!(got, code, "{what}: {msg}");
        assert_eq!(r.header.req_id, id, "{what}");
        c.expect_closed();
    }
    // Handshake frames with bad payloads.
    let hello_cases: Vec<(&str, Vec<u8>)> = vec![
        ("hello short", frame(Op::Hello as u8, 1, &[1, 0, 1, 0])),
        (
            "hello trailing",
            frame(
                Op::Hello as u8,
                1,
                &[[1, 0, 1, 0].as_slice(), &[0; 33]].concat(),
            ),
        ),
        (
            "hello min > max",
            frame(
                Op::Hello as u8,
                1,
                &[[2, 0, 1, 0].as_slice(), &[0; 32]].concat(),
            ),
        ),
    ];
    for (what, bytes) in hello_cases {
        let mut c = f.raw();
        c.send(&bytes);
        let r = c.recv();
        assert_eq!(r.error().map(|e| e.0), Some(ErrorCode::BadFrame), "{what}");
        c.expect_closed();
    }
    // AUTH whose resume flag is neither 0 nor 1.
    let mut c = f.raw();
    c.hello(&[1u8; 32]);
    c.send(&frame(
        Op::Auth as u8,
        2,
        &[[0u8; 32].as_slice(), &[2]].concat(),
    ));
    c.expect_error(2, ErrorCode::BadFrame);
    c.expect_closed();
    f.still_serves();
}

/// A malformed WRITE has no effect on the slab it names.
#[test]
fn malformed_write_changes_nothing() {
    let mut f = Fixture::new(&[]);
    let (mut c, w) = f.authed();
    c.send_request(
        1,
        &Request::Alloc {
            slab: 3,
            size: 8192,
        },
    );
    assert_eq!(c.recv().decode(), Reply::Done(Op::Alloc));
    let good = Rng::new("malformed write").bytes(8192);
    c.send_request(
        2,
        &Request::Write {
            extents: vec![Extent::new(3, 0, 8192)],
            data: &good,
        },
    );
    assert_eq!(c.recv().decode(), Reply::Done(Op::Write));
    drop(c);
    // Extents valid, one byte of data missing; then one byte too many. Each
    // on a connection resuming the session (the error closes it).
    for (id, data_len) in [(3u64, 8191usize), (4, 8193)] {
        let mut c = f.raw();
        let again = c.handshake(None, Some((w.session_id, w.resume_secret)));
        assert!(again.resumed);
        let payload = [
            &1u32.to_le_bytes()[..],
            &extent_bytes(3, 0, 8192),
            &vec![0xEE; data_len],
        ]
        .concat();
        c.send(&frame(Op::Write as u8, id, &payload));
        c.expect_error(id, ErrorCode::BadFrame);
        c.expect_closed();
    }
    let mut c = f.raw();
    let again = c.handshake(None, Some((w.session_id, w.resume_secret)));
    assert!(again.resumed);
    c.send_request(
        9,
        &Request::Read {
            extents: vec![Extent::new(3, 0, 8192)],
        },
    );
    match c.recv().decode() {
        Reply::Data(d) => dmem_tests::assert_same(d, &good, "slab after malformed writes"),
        other => panic!("expected data, got {other:?}"),
    }
    f.still_serves();
}

/// Anything but HELLO/AUTH before authentication is refused with
/// NotAuthenticated and the connection is dropped; the handshake cannot be
/// replayed afterwards.
#[test]
fn requests_before_authentication_are_refused() {
    let mut f = Fixture::new(&[]);
    let reqs: Vec<Request<'static>> = vec![
        Request::Read {
            extents: vec![Extent::new(1, 0, 4096)],
        },
        Request::Write {
            extents: vec![Extent::new(1, 0, 4)],
            data: b"evil",
        },
        Request::Alloc {
            slab: 1,
            size: 4096,
        },
        Request::Free { slab: 1 },
        Request::Stat,
        Request::Ping { payload: b"hi" },
        Request::CloseSession,
        Request::Auth {
            mac: [0; 32],
            resume: None,
        },
    ];
    for (i, req) in reqs.iter().enumerate() {
        let id = 50 + i as u64;
        // Without any HELLO.
        let mut c = f.raw();
        c.send_request(id, req);
        let msg = c.expect_error(id, ErrorCode::NotAuthenticated);
        assert!(msg.contains("before authentication"), "{msg}");
        c.expect_closed();
        // After HELLO, before AUTH (AUTH itself is the expected next step).
        if !matches!(req, Request::Auth { .. }) {
            let mut c = f.raw();
            c.hello(&[i as u8; 32]);
            c.send_request(id, req);
            c.expect_error(id, ErrorCode::NotAuthenticated);
            c.expect_closed();
        }
    }
    // A second HELLO instead of AUTH.
    let mut c = f.raw();
    c.hello(&[1; 32]);
    c.send_request(
        5,
        &Request::Hello {
            min_version: 1,
            max_version: 1,
            client_nonce: [2; 32],
        },
    );
    c.expect_error(5, ErrorCode::NotAuthenticated);
    c.expect_closed();
    // HELLO or AUTH again after authenticating.
    for (id, req) in [
        (
            6u64,
            Request::Hello {
                min_version: 1,
                max_version: 1,
                client_nonce: [2; 32],
            },
        ),
        (
            7,
            Request::Auth {
                mac: [0; 32],
                resume: None,
            },
        ),
    ] {
        let (mut c, _) = f.authed();
        c.send_request(id, &req);
        let msg = c.expect_error(id, ErrorCode::BadFrame);
        assert!(msg.contains("handshake already completed"), "{msg}");
        c.expect_closed();
    }
    f.still_serves();
}

#[test]
fn unsupported_versions_get_version_mismatch() {
    let mut f = Fixture::new(&[]);
    for (min, max) in [(2u16, 9u16), (0, 0)] {
        let mut c = f.raw();
        c.send_request(
            11,
            &Request::Hello {
                min_version: min,
                max_version: max,
                client_nonce: [0; 32],
            },
        );
        c.expect_error(11, ErrorCode::VersionMismatch);
        c.expect_closed();
    }
    // A client offering a range that includes 1 gets version 1.
    let mut c = f.raw();
    c.send_request(
        12,
        &Request::Hello {
            min_version: 0,
            max_version: 7,
            client_nonce: [0; 32],
        },
    );
    match c.recv().decode() {
        Reply::Challenge { version, .. } => assert_eq!(version, 1),
        other => panic!("expected a challenge, got {other:?}"),
    }
    f.still_serves();
}

#[test]
fn wrong_token_gets_auth_failed() {
    let mut f = Fixture::with_token(&[]);
    // Raw: a MAC made with the wrong token, and an all-zero MAC.
    for wrong in [Some(&b"not the token but long enough"[..]), None] {
        let mut c = f.raw();
        let nonce = [4u8; 32];
        let (required, server_nonce) = c.hello(&nonce);
        assert!(required);
        let mac: Secret = wrong.map_or([0; 32], |t| {
            dmem_memnode::auth::client_proof(t, &server_nonce, &nonce)
        });
        c.send_request(2, &Request::Auth { mac, resume: None });
        c.expect_error(2, ErrorCode::AuthFailed);
        c.expect_closed();
    }
    // A MAC for another challenge (replay) is refused as well.
    let mut c = f.raw();
    let nonce = [5u8; 32];
    let (_, server_nonce) = c.hello(&nonce);
    let replayed = dmem_memnode::auth::client_proof(TOKEN, &server_nonce, &nonce);
    let mut c2 = f.raw();
    c2.hello(&nonce);
    c2.send_request(
        2,
        &Request::Auth {
            mac: replayed,
            resume: None,
        },
    );
    c2.expect_error(2, ErrorCode::AuthFailed);
    c2.expect_closed();
    drop(c);
    // Client library: a distinct error.
    let mut cfg = f.node.config();
    cfg.token = Some(b"not the token but long enough".to_vec());
    match Client::connect(cfg) {
        Err(ClientError::AuthRefused { .. }) => {}
        Err(e) => panic!("expected AuthRefused, got {e}"),
        Ok(_) => panic!("a wrong token must not authenticate"),
    }
    f.still_serves();
}

#[test]
fn client_without_token_against_token_node() {
    let mut f = Fixture::with_token(&[]);
    match Client::connect(f.node.config()) {
        Err(e @ ClientError::TokenRequired { .. }) => {
            assert!(e.to_string().contains("--token-file"), "{e}")
        }
        Err(e) => panic!("expected TokenRequired, got {e}"),
        Ok(_) => panic!("a node with a token must not admit a client without one"),
    }
    f.still_serves();
}

#[test]
fn client_with_token_against_open_node() {
    let mut f = Fixture::new(&[]);
    let mut cfg = f.node.config();
    cfg.token = Some(TOKEN.to_vec());
    match Client::connect(cfg) {
        Err(ClientError::ServerUnauthenticated { .. }) => {}
        Err(e) => panic!("expected ServerUnauthenticated, got {e}"),
        Ok(_) => panic!("a client with a token must refuse an unauthenticated node"),
    }
    f.still_serves();
}

/// Extents outside a slab are refused with OutOfBounds, all or nothing, and
/// the connection stays usable.
#[test]
fn out_of_bounds_extents_are_refused_without_closing() {
    let mut f = Fixture::new(&[]);
    let c = Client::connect(f.node.config()).unwrap();
    c.alloc(1, (4 * PAGE) as u64).unwrap();
    let mut rng = Rng::new("oob");
    let good = rng.bytes(4 * PAGE);
    c.write(&page_extents(1, 0, 4), &good).unwrap();
    let end = (4 * PAGE) as u64;
    let bad_extents = [
        Extent::new(1, end - 1, 2),
        Extent::new(1, end, 1),
        Extent::new(1, u64::MAX - 7, 16),
        Extent::new(1, u64::MAX, 1),
    ];
    for e in bad_extents {
        let r = c.read(&[e]);
        assert!(
            matches!(&r, Err(err) if err.code() == Some(ErrorCode::OutOfBounds)),
            "read {e:?}: {r:?}"
        );
        let r = c.write(&[e], &vec![0xCC; e.len as usize]);
        assert!(
            matches!(&r, Err(err) if err.code() == Some(ErrorCode::OutOfBounds)),
            "write {e:?}: {r:?}"
        );
    }
    // A batch with one bad extent writes nothing, not even the good ones.
    let batch = [Extent::new(1, 0, PAGE as u32), Extent::new(1, end - 10, 11)];
    let r = c.write(&batch, &vec![0xDD; PAGE + 11]);
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::OutOfBounds));
    // A batch naming a slab that does not exist, likewise.
    let batch = [Extent::new(1, 0, PAGE as u32), Extent::new(2, 0, 1)];
    let r = c.write(&batch, &vec![0xDD; PAGE + 1]);
    assert_eq!(r.unwrap_err().code(), Some(ErrorCode::NoSuchSlab));
    assert_same_slab(&c, &good);
    assert_eq!(c.reconnects(), 0, "refusals must not drop the connection");

    // The same on the wire: the error, then the connection still answers.
    let (mut raw, _) = f.authed();
    raw.send_request(1, &Request::Alloc { slab: 4, size: 100 });
    assert_eq!(raw.recv().decode(), Reply::Done(Op::Alloc));
    // 100 bytes round up to one page: [4096, 4097) is outside.
    raw.send_request(
        2,
        &Request::Read {
            extents: vec![Extent::new(4, 4096, 1)],
        },
    );
    raw.expect_error(2, ErrorCode::OutOfBounds);
    raw.send_request(
        3,
        &Request::Read {
            extents: vec![Extent::new(4, 4095, 1)],
        },
    );
    assert_eq!(raw.recv().decode(), Reply::Data(&[0][..]));
    raw.send_request(4, &Request::Free { slab: 99 });
    raw.expect_error(4, ErrorCode::NoSuchSlab);
    raw.assert_usable(5);
    f.still_serves();
}

fn assert_same_slab(c: &Client, want: &[u8]) {
    let back = c.read(&page_extents(1, 0, want.len() / PAGE)).unwrap();
    dmem_tests::assert_same(&back, want, "slab after refused writes");
}

/// Slabs over 1 GiB (or of 0 bytes) are refused with SlabTooLarge; the
/// connection stays usable and nothing is reserved.
#[test]
fn slab_too_large_is_refused_without_closing() {
    let mut f = Fixture::new(&["--capacity", "2G"]);
    let c = Client::connect(f.node.config()).unwrap();
    for size in [MAX_SLAB_BYTES + 1, MAX_SLAB_BYTES + 4096, u64::MAX, 0] {
        let r = c.alloc(1, size);
        assert_eq!(
            r.as_ref().err().and_then(ClientError::code),
            Some(ErrorCode::SlabTooLarge),
            "alloc of {size} bytes: {r:?}"
        );
    }
    let s = c.stat().unwrap();
    assert_eq!((s.session_slabs, s.session_bytes), (0, 0));
    assert_eq!(c.reconnects(), 0);
    // Exactly 1 GiB is allowed (it is only reserved, not touched).
    c.alloc(1, MAX_SLAB_BYTES).unwrap();
    let s = c.stat().unwrap();
    assert_eq!((s.session_slabs, s.session_bytes), (1, MAX_SLAB_BYTES));
    let last = Extent::new(1, MAX_SLAB_BYTES - 8, 8);
    c.write(&[last], b"lastbyte").unwrap();
    assert_eq!(c.read(&[last]).unwrap(), b"lastbyte");
    c.free(1).unwrap();
    // On the wire: the refusal is not fatal.
    let (mut raw, _) = f.authed();
    raw.send_request(
        1,
        &Request::Alloc {
            slab: 1,
            size: MAX_SLAB_BYTES + 1,
        },
    );
    raw.expect_error(1, ErrorCode::SlabTooLarge);
    raw.assert_usable(2);
    f.still_serves();
}

/// Random bytes: the node answers BadFrame (echoing bytes 8..16 as req_id)
/// and hangs up.
#[test]
fn garbage_bytes_get_bad_frame_and_close() {
    let mut f = Fixture::with_token(&[]);
    let mut rng = Rng::new("garbage");
    for round in 0..20 {
        let len = 16 + rng.below(8192) as usize;
        let mut junk = rng.bytes(len);
        if u16::from_le_bytes([junk[0], junk[1]]) == MAGIC {
            junk[0] ^= 0xFF;
        }
        let id = u64::from_le_bytes(junk[8..16].try_into().unwrap());
        let mut c = if round % 2 == 0 {
            f.raw()
        } else {
            f.authed().0
        };
        // The node may hang up before it has read everything.
        c.send_lossy(&junk);
        c.expect_error(id, ErrorCode::BadFrame);
        c.expect_closed();
    }
    // A TLS ClientHello, as a confused client might send.
    let mut c = f.raw();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x00, 0xC8, 0x01, 0x00, 0x00, 0xC4, 0x03, 0x03,
    ];
    hello.extend(rng.bytes(200));
    c.send(&hello);
    c.expect_error(
        u64::from_le_bytes(hello[8..16].try_into().unwrap()),
        ErrorCode::BadFrame,
    );
    c.expect_closed();
    f.still_serves();
}

/// Resuming a session that does not exist, or with the wrong secret, gets
/// UnknownSession and the connection is dropped; the real owner is unharmed.
#[test]
fn resume_with_wrong_credentials_is_refused() {
    let mut f = Fixture::with_token(&[]);
    let (mut owner, w) = f.authed();
    for (id, resume) in [
        (w.session_id, [0u8; 32]),
        (w.session_id + 1000, w.resume_secret),
    ] {
        let mut c = f.raw();
        let nonce = [8u8; 32];
        let (_, sn) = c.hello(&nonce);
        let mac = dmem_memnode::auth::client_proof(TOKEN, &sn, &nonce);
        c.send_request(
            3,
            &Request::Auth {
                mac,
                resume: Some((id, resume)),
            },
        );
        c.expect_error(3, ErrorCode::UnknownSession);
        c.expect_closed();
    }
    owner.assert_usable(4);
    f.still_serves();
}

/// Sends one frame on an authenticated connection and checks the node's
/// answer: exactly one reply carrying the frame's req_id; after a fatal
/// error (or CLOSE_SESSION) the connection is closed, after anything else
/// it still answers. Returns whether the connection is still open.
fn check_one_frame(c: &mut RawConn, op: u8, id: u64, payload: &[u8]) -> bool {
    c.send(&frame(op, id, payload));
    let r = c.recv();
    assert_eq!(
        r.header.req_id, id,
        "reply to op {op:#04x} has the wrong req_id"
    );
    let fatal = match r.error() {
        Some((code, _)) => code.is_fatal(),
        None => match r.decode() {
            Reply::Done(Op::CloseSession) => true,
            Reply::Challenge { .. } | Reply::Welcome(_) => {
                panic!("handshake reply to op {op:#04x} after authentication")
            }
            _ => false,
        },
    };
    if fatal {
        c.expect_closed();
    } else {
        c.assert_usable(id + 1);
    }
    !fatal
}

fn arb_frame() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let op = prop_oneof![
        4 => prop::sample::select(Op::ALL.iter().map(|o| *o as u8).collect::<Vec<_>>()),
        1 => any::<u8>(),
    ];
    let payload = prop_oneof![
        // Raw bytes.
        prop::collection::vec(any::<u8>(), 0..96),
        // Plausible extent lists: small counts, slabs 0..3, odd sizes, and
        // some data (or garbage) after them.
        (
            1u32..4,
            prop::collection::vec((0u32..3, 0u32..5000, 0u64..20000), 1..4),
            0usize..6000
        )
            .prop_map(|(count, ext, extra)| {
                let mut p = count.to_le_bytes().to_vec();
                for (slab, len, off) in ext {
                    p.extend_from_slice(&slab.to_le_bytes());
                    p.extend_from_slice(&len.to_le_bytes());
                    p.extend_from_slice(&off.to_le_bytes());
                }
                p.resize(p.len() + extra, 0x5A);
                p
            }),
        // ALLOC/FREE-shaped: a slab id and a size.
        (0u32..4, prop_oneof![0u64..70000, Just(u64::MAX)]).prop_map(|(s, n)| {
            let mut p = s.to_le_bytes().to_vec();
            p.extend_from_slice(&n.to_le_bytes());
            p
        }),
    ];
    (op, payload)
}

fn fuzz_config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        // Against a broken daemon every failing case may wait out a hang
        // guard: bound the shrinking.
        max_shrink_time: 30_000,
        ..ProptestConfig::default()
    }
}

/// Random frames (mostly real opcodes with plausible or random payloads)
/// after authentication, several per connection. The daemon survives them
/// all, answers each as `check_one_frame` requires, and keeps serving.
#[test]
fn fuzzed_frames_after_auth() {
    let f = std::cell::RefCell::new(Fixture::new(&["--capacity", "32M"]));
    let mut runner = TestRunner::new(fuzz_config(64));
    let strategy = prop::collection::vec(arb_frame(), 1..12);
    runner
        .run(&strategy, |frames| {
            let mut f = f.borrow_mut();
            let (mut c, _) = f.authed();
            c.send_request(
                1,
                &Request::Alloc {
                    slab: 1,
                    size: 16384,
                },
            );
            assert_eq!(c.recv().decode(), Reply::Done(Op::Alloc));
            for (i, (op, payload)) in frames.iter().enumerate() {
                let id = 100 + 2 * i as u64;
                if !check_one_frame(&mut c, *op, id, payload) {
                    c = f.authed().0;
                }
            }
            f.node.assert_alive();
            Ok(())
        })
        .unwrap();
    f.borrow_mut().still_serves();
}

/// Random first frames on fresh connections: only a well-formed HELLO gets
/// a challenge; anything else gets a fatal error and a close.
#[test]
fn fuzzed_first_frames() {
    let mut f = Fixture::new(&[]);
    let mut runner = TestRunner::new(fuzz_config(128));
    let strategy = (
        prop_oneof![Just(Op::Hello as u8), any::<u8>()],
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            prop::collection::vec(0u8..3, 36..37),
        ],
    );
    runner
        .run(&strategy, |(op, payload)| {
            let mut c = f.raw();
            c.send(&frame(op, 9, &payload));
            let r = c.recv();
            assert_eq!(r.header.req_id, 9);
            match r.error() {
                Some((code, msg)) => {
                    assert!(code.is_fatal(), "pre-auth refusal {code:?} must be fatal");
                    assert!(!msg.is_empty());
                    c.expect_closed();
                }
                None => {
                    assert_eq!(op, Op::Hello as u8, "only HELLO succeeds before auth");
                    assert!(matches!(r.decode(), Reply::Challenge { .. }));
                }
            }
            Ok(())
        })
        .unwrap();
    f.still_serves();
}

/// Good requests and a bad frame in one burst: the good ones are answered
/// in order, then the error, then the connection closes (the request after
/// the bad frame is not served).
#[test]
fn burst_with_a_bad_frame_answers_the_good_ones_first() {
    let mut f = Fixture::new(&[]);
    let (mut c, _) = f.authed();
    // Three good requests and a bad one in one write: the good replies come
    // first, then the error, then the close.
    let mut burst = encode(1, &Request::Stat);
    burst.extend(encode(2, &Request::Ping { payload: b"x" }));
    burst.extend(encode(
        3,
        &Request::Alloc {
            slab: 1,
            size: 4096,
        },
    ));
    burst.extend(header(0x0BAD, 0, 0, 0, 4));
    burst.extend(encode(5, &Request::Stat));
    c.send(&burst);
    assert!(matches!(c.recv().decode(), Reply::Stat(_)));
    assert_eq!(c.recv().decode(), Reply::Pong(b"x"));
    assert_eq!(c.recv().decode(), Reply::Done(Op::Alloc));
    c.expect_error(4, ErrorCode::BadFrame);
    c.expect_closed();
    f.still_serves();
}
