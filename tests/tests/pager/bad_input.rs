//! Bad input to the pager: malformed or refused first messages on its unix
//! socket (each answered with a `Refused` saying why, then the connection is
//! closed), silent clients, registrations that hang up, and bad flags. After
//! each, the pager still serves a good app.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use dmem_pager::app::{connect_pager, recv_msg};
use dmem_pager::sys::send_with_fds;
use dmem_pager::wire::{encode, Msg, Register, MAGIC, MAX_MSG, VERSION};
use dmem_tests::{bin_path, eventually, run_cmd, stat, Pager, HANG_GUARD};

/// A fresh userfaultfd (not registered over anything).
fn userfaultfd() -> OwnedFd {
    // SAFETY: plain syscall with flag arguments; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(
        fd >= 0,
        "userfaultfd: {} (these tests run as root)",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// A userfaultfd past its UFFDIO_API handshake (no features asked), as an
/// app would send.
fn userfaultfd_ready() -> OwnedFd {
    #[repr(C)]
    struct UffdioApi {
        api: u64,
        features: u64,
        ioctls: u64,
    }
    const UFFD_API: u64 = 0xAA;
    const UFFDIO_API: libc::c_ulong = 0xc018_aa3f; // _IOWR(0xAA, 0x3F, 24 bytes)
    let fd = userfaultfd();
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API on a fresh userfaultfd with a correctly laid out
    // struct that lives across the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
    assert_eq!(rc, 0, "UFFDIO_API: {}", std::io::Error::last_os_error());
    fd
}

fn header(magic: u32, version: u16, kind: u16) -> Vec<u8> {
    let mut b = magic.to_le_bytes().to_vec();
    b.extend_from_slice(&version.to_le_bytes());
    b.extend_from_slice(&kind.to_le_bytes());
    b
}

fn register(pid: u32, base: u64, len: u64, limit: u64) -> Vec<u8> {
    encode(&Msg::Register(Register {
        pid,
        agent_tid: pid,
        arena_base: base,
        arena_len: len,
        local_limit: limit,
        forked_from: 0,
        fork_snapshot: 0,
    }))
}

/// Sends `bytes` (with `fds`) as the first message of a new connection;
/// expects a `Refused` containing every one of `want`, then the
/// connection closed.
#[track_caller]
fn expect_refused(pager: &Pager, what: &str, bytes: &[u8], fds: &[RawFd], want: &[&str]) {
    let sock = connect_pager(pager.socket()).expect("connect to the pager");
    send_with_fds(sock.as_raw_fd(), bytes, fds).expect("send");
    let mut buf = vec![0u8; MAX_MSG];
    set_timeout(&sock);
    let (msg, _) = recv_msg(&sock, &mut buf)
        .unwrap_or_else(|e| panic!("{what}: no answer from the pager: {e}"));
    match msg {
        Some(Msg::Refused(why)) => {
            for w in want {
                assert!(
                    why.contains(w),
                    "{what}: refusal {why:?} does not say {w:?}"
                );
            }
        }
        other => panic!("{what}: expected Refused, got {other:?}"),
    }
    match recv_msg(&sock, &mut buf) {
        Ok((None, _)) => {}
        other => panic!("{what}: connection not closed after the refusal: {other:?}"),
    }
}

fn set_timeout(sock: &OwnedFd) {
    let tv = nix::sys::time::TimeVal::new(HANG_GUARD.as_secs() as i64, 0);
    nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
        .expect("SO_RCVTIMEO");
}

/// Every kind of bad first message gets its own reason; none registers an
/// app; a good app works afterwards.
#[test]
fn bad_registrations_are_refused_with_reasons() {
    let pager = Pager::start(&["--local-limit", "8M"]);
    let me = std::process::id();
    let uffd = userfaultfd();
    let u = [uffd.as_raw_fd()];
    let (pr, pw) = nix::unistd::pipe().expect("pipe");
    let base = 0x7000_0000_0000u64;
    let good_len = 64 << 20;

    expect_refused(
        &pager,
        "garbage",
        b"GET / HTTP/1.1\r\n\r\n",
        &[],
        &["bad magic", "not a dmem client"],
    );
    expect_refused(&pager, "short", b"DMEM", &[], &["too short"]);
    expect_refused(
        &pager,
        "wrong magic",
        &header(0x1234_5678, VERSION, 7),
        &[],
        &["bad magic 0x12345678"],
    );
    expect_refused(
        &pager,
        "wrong version",
        &header(MAGIC, 99, 7),
        &[],
        &["unsupported protocol version 99"],
    );
    expect_refused(
        &pager,
        "unknown kind",
        &header(MAGIC, VERSION, 250),
        &[],
        &["unknown message kind 250"],
    );
    expect_refused(
        &pager,
        "pager-side message as first message",
        &encode(&Msg::Fatal("hi".into())),
        &[],
        &["unexpected first message"],
    );
    let reg = register(me, base, good_len, 0);
    expect_refused(
        &pager,
        "truncated register",
        &reg[..reg.len() - 3],
        &u,
        &["malformed register"],
    );
    let mut long = reg.clone();
    long.extend_from_slice(&[0; 9]);
    expect_refused(
        &pager,
        "register with trailing bytes",
        &long,
        &u,
        &["malformed register"],
    );
    expect_refused(
        &pager,
        "register without a descriptor",
        &reg,
        &[],
        &["exactly one descriptor", "got 0"],
    );
    expect_refused(
        &pager,
        "register with two descriptors",
        &reg,
        &[u[0], u[0]],
        &["exactly one descriptor", "got 2"],
    );
    expect_refused(
        &pager,
        "register with a pipe",
        &reg,
        &[pr.as_raw_fd()],
        &["not a userfaultfd"],
    );
    expect_refused(
        &pager,
        "register with a socket",
        &reg,
        &[pw.as_raw_fd()],
        &["not a userfaultfd"],
    );
    expect_refused(
        &pager,
        "register claiming another pid",
        &register(1, base, good_len, 0),
        &u,
        &["pid 1 claimed", &format!("belongs to pid {me}")],
    );
    expect_refused(
        &pager,
        "unaligned arena base",
        &register(me, base + 100, good_len, 0),
        &u,
        &["page-aligned"],
    );
    expect_refused(
        &pager,
        "unaligned arena length",
        &register(me, base, good_len + 1, 0),
        &u,
        &["page-aligned"],
    );
    expect_refused(
        &pager,
        "empty arena",
        &register(me, base, 0, 0),
        &u,
        &["arena length 0 out of range"],
    );
    expect_refused(
        &pager,
        "huge arena",
        &register(me, base, 1 << 50, 0),
        &u,
        &["out of range"],
    );
    expect_refused(
        &pager,
        "arena wrapping around",
        &register(me, u64::MAX - 4095, 1 << 20, 0),
        &u,
        &["wraps around"],
    );
    expect_refused(
        &pager,
        "limit below 1 MiB",
        &register(me, base, good_len, 512 << 10),
        &u,
        &["local limit 524288", "below the minimum of 1 MiB"],
    );
    // A good registration whose uffd skipped UFFDIO_API: refused, not
    // welcomed and then dropped when the first read of it fails.
    expect_refused(
        &pager,
        "uffd without UFFDIO_API",
        &reg,
        &u,
        &["not initialised", "UFFDIO_API"],
    );
    // A forked child naming a fork snapshot that does not exist (a guess
    // at another process's pages, or one whose parent's hold ended).
    let ready = userfaultfd_ready();
    expect_refused(
        &pager,
        "register with an unknown fork snapshot",
        &encode(&Msg::Register(Register {
            pid: me,
            agent_tid: me,
            arena_base: base,
            arena_len: good_len,
            local_limit: 0,
            forked_from: 1,
            fork_snapshot: 0xdead_beef,
        })),
        &[ready.as_raw_fd()],
        &["no such fork snapshot"],
    );
    expect_refused(
        &pager,
        "a snapshot request outside a hold",
        &encode(&Msg::Snapshot),
        &[],
        &["unexpected first message"],
    );
    // A datagram larger than any message.
    let mut big = reg.clone();
    big.resize(MAX_MSG + 4096, 0xAB);
    expect_refused(
        &pager,
        "oversized",
        &big,
        &u,
        &["too long", &format!("more than {MAX_MSG} bytes")],
    );

    drop(pw);
    let v = pager.stats();
    assert_eq!(
        stat(&v, &["pager", "apps"]),
        0,
        "a bad registration was accepted: {v:#}"
    );
    pager.workload("random", "32M").run().assert_ok();
    pager.workload("seq", "4M").run().assert_ok();
}

/// A refusal reads as a complaint about the client, not about the pager.
#[test]
fn refusal_of_garbage_does_not_blame_the_pager() {
    let pager = Pager::start(&["--local-limit", "8M"]);
    let sock = connect_pager(pager.socket()).expect("connect");
    send_with_fds(sock.as_raw_fd(), b"garbage garbage", &[]).expect("send");
    set_timeout(&sock);
    let mut buf = vec![0u8; MAX_MSG];
    match recv_msg(&sock, &mut buf).expect("answer") {
        (Some(Msg::Refused(why)), _) => assert!(
            !why.contains("the pager sent"),
            "the pager's refusal of a client's garbage says {why:?}"
        ),
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// A client that connects and says nothing does not hold up anyone else,
/// and is dropped in the end.
#[test]
fn silent_client_does_not_block_others() {
    let pager = Pager::start(&["--local-limit", "8M"]);
    let silent = connect_pager(pager.socket()).expect("connect");
    pager.workload("seq", "16M").run().assert_ok();
    let v = pager.stats_cli();
    assert!(stat(&v, &["total", "faults", "zero"]) > 0, "{v:#}");
    set_timeout(&silent);
    let t0 = Instant::now();
    let mut buf = vec![0u8; MAX_MSG];
    match recv_msg(&silent, &mut buf) {
        Ok((None, _)) | Ok((Some(Msg::Refused(_)), _)) => {}
        other => panic!("the silent client got {other:?}"),
    }
    assert!(
        t0.elapsed() < HANG_GUARD,
        "the silent client was never dropped"
    );
}

/// A valid registration from a client that then hangs up is accepted
/// (Welcome with the staging memory), listed, and cleaned up when it goes.
#[test]
fn registration_then_hangup_is_cleaned_up() {
    let pager = Pager::start(&["--local-limit", "8M"]);
    let uffd = userfaultfd_ready();
    let sock = connect_pager(pager.socket()).expect("connect");
    let reg = register(std::process::id(), 0x7100_0000_0000, 16 << 20, 4 << 20);
    send_with_fds(sock.as_raw_fd(), &reg, &[uffd.as_raw_fd()]).expect("send");
    set_timeout(&sock);
    let mut buf = vec![0u8; MAX_MSG];
    match recv_msg(&sock, &mut buf).expect("answer") {
        (Some(Msg::Welcome(w)), fds) => {
            assert_eq!(fds.len(), 1, "the welcome carries the staging memfd");
            assert_eq!(w.local_limit, 4 << 20);
            assert_eq!(w.block, 4096);
            assert!(w.staging_len > 0);
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
    // The pager answers before it lists the session: poll.
    let v = eventually(HANG_GUARD, "the registered app to be listed", || {
        let v = pager.stats();
        (stat(&v, &["pager", "apps"]) == 1).then_some(v)
    });
    assert_eq!(stat(&v["apps"][0], &["pid"]), u64::from(std::process::id()));
    drop(sock);
    eventually(HANG_GUARD, "the hung-up app to be dropped", || {
        (stat(&pager.stats(), &["pager", "apps"]) == 0).then_some(())
    });
    drop(uffd);
    pager.workload("seq", "16M").run().assert_ok();
}

/// Bad flag values: the pager exits non-zero at once with a message naming
/// the flag, and never says it is listening.
#[test]
fn bad_flags_are_refused_with_a_message() {
    let dir = dmem_tests::TempDir::new("badflags");
    let sock = dir.path().join("p.sock").display().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--local-limit", "16M", "--block", "3K"],
            "--block must be a power of two",
        ),
        (
            &["--local-limit", "16M", "--block", "4M"],
            "--block must be a power of two",
        ),
        (
            &["--local-limit", "16M", "--block", "2K"],
            "--block must be a power of two",
        ),
        (&["--local-limit", "0"], "--local-limit must be at least 1M"),
        (
            &["--local-limit", "512K"],
            "--local-limit must be at least 1M",
        ),
        (&["--local-limit", "12Q"], "invalid size"),
        (
            &["--local-limit", "16M", "--fetch-timeout", "0"],
            "--fetch-timeout",
        ),
        (&["--local-limit", "16M", "--bogus"], "--bogus"),
        (
            &["--local-limit", "16M", "--slab", "1M"],
            "--slab must be at least 4M",
        ),
        (&[], "--local-limit"),
        (
            &[
                "--local-limit",
                "16M",
                "--memnode",
                "127.0.0.1:1",
                "--fetch-timeout",
                "1",
            ],
            "cannot reach memory node 127.0.0.1:1",
        ),
    ];
    for (args, want) in cases {
        let (st, out, err) = run_cmd(
            std::process::Command::new(bin_path("dmem-pager"))
                .args(["--socket", &sock])
                .args(*args),
        );
        assert!(!st.success(), "{args:?} accepted: {out}{err}");
        assert!(
            err.contains(want),
            "{args:?}: stderr does not say {want:?}:\n{err}"
        );
        assert!(!out.contains("listening"), "{args:?}: {out}");
        // Said once: no message repeats its own prefix.
        for prefix in ["cannot reach memory node", "dmem-pager: dmem-pager"] {
            assert!(
                err.matches(prefix).count() <= 1,
                "{args:?}: {prefix:?} repeated:\n{err}"
            );
        }
    }
}
