//! End-to-end tests of `dmem-memnode` through the client library: data path,
//! pipelining, capacity, isolation, concurrency, auth, metrics, signals.

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use dmem_memnode::client::{Client, ClientError, Pending};
use dmem_memnode::protocol::{ErrorCode, Extent, MAX_IO_BYTES};
use dmem_tests::{
    assert_same, assert_serves, eventually, free_port, metric, page_extents, raw::RawConn, scrape,
    Memnode, Rng, TempDir, HANG_GUARD, PAGE,
};
use nix::sys::signal::Signal;

const MIB: u64 = 1 << 20;

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: Result<T, ClientError>, code: ErrorCode) {
    match r {
        Err(e) => assert_eq!(e.code(), Some(code), "expected {code:?}, got error: {e}"),
        Ok(v) => panic!("expected error {code:?}, got success {v:?}"),
    }
}

/// Alloc, batched write of random pages, batched read in another order,
/// stat figures, free, and close_session returning capacity.
#[test]
fn happy_path_batched_io_stat_free_close() {
    let node = Memnode::start(&["--capacity", "64M"]);
    let mut rng = Rng::new("happy_path");
    let a = node.client();
    let w = a.welcome();
    assert_eq!(w.capacity, 64 * MIB);
    assert_eq!(w.used, 0);
    assert!(!w.resumed);

    // Slab 1: 256 pages, written in one batch in a shuffled order.
    a.alloc(1, MIB).unwrap();
    let pages = 256;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let image = rng.bytes(pages * PAGE);
    let ext: Vec<Extent> = order
        .iter()
        .map(|&p| Extent::new(1, (p * PAGE) as u64, PAGE as u32))
        .collect();
    let data: Vec<u8> = order
        .iter()
        .flat_map(|&p| image[p * PAGE..(p + 1) * PAGE].iter().copied())
        .collect();
    a.write(&ext, &data).unwrap();
    // Read back in page order, as one batch: the slab must equal the image.
    let back = a.read(&page_extents(1, 0, pages)).unwrap();
    assert_same(&back, &image, "slab 1 read back in page order");

    // Slab 2: 5000 bytes round up to two pages; odd offsets and lengths.
    a.alloc(2, 5000).unwrap();
    let odd = [Extent::new(2, 3, 5000), Extent::new(2, 6000, 2192)];
    let odd_data = rng.bytes(7192);
    a.write(&odd, &odd_data).unwrap();
    assert_same(&a.read(&odd).unwrap(), &odd_data, "odd extents");
    let gap = a.read(&[Extent::new(2, 5003, 997)]).unwrap();
    assert!(gap.iter().all(|b| *b == 0), "never-written bytes read as 0");
    // A batch mixing both slabs returns the extents concatenated in order.
    let mixed = a
        .read(&[Extent::new(2, 3, 10), Extent::new(1, 7, 20)])
        .unwrap();
    assert_eq!(&mixed[..10], &odd_data[..10]);
    assert_eq!(&mixed[10..], &image[7..27]);

    // The largest I/O a frame may carry, in one extent, read back in pages.
    a.alloc(3, MAX_IO_BYTES as u64).unwrap();
    let big = rng.bytes(MAX_IO_BYTES);
    a.write(&[Extent::new(3, 0, MAX_IO_BYTES as u32)], &big)
        .unwrap();
    let back = a.read(&page_extents(3, 0, MAX_IO_BYTES / PAGE)).unwrap();
    assert_same(&back, &big, "8 MiB write");

    let expected = MIB + 8192 + MAX_IO_BYTES as u64;
    let s = a.stat().unwrap();
    assert_eq!(s.capacity, 64 * MIB);
    assert_eq!(s.used, expected);
    assert_eq!(s.session_slabs, 3);
    assert_eq!(s.session_bytes, expected);

    // Free: figures drop, the slab is gone, the others are intact.
    a.free(3).unwrap();
    let s = a.stat().unwrap();
    assert_eq!((s.used, s.session_slabs), (MIB + 8192, 2));
    expect_code(a.read(&[Extent::new(3, 0, 16)]), ErrorCode::NoSuchSlab);
    expect_code(a.free(3), ErrorCode::NoSuchSlab);
    assert_same(
        &a.read(&page_extents(1, 0, pages)).unwrap(),
        &image,
        "slab 1 after free",
    );

    // A second session sees the node-wide figure at connect time.
    let b = node.client();
    assert_ne!(b.session_id(), a.session_id());
    assert_eq!(b.welcome().used, MIB + 8192);
    let s = b.stat().unwrap();
    assert_eq!(
        (s.used, s.session_slabs, s.session_bytes),
        (MIB + 8192, 0, 0)
    );

    // Closing A's session returns all its slabs at once.
    a.close_session().unwrap();
    assert_eq!(b.stat().unwrap().used, 0);
    assert_eq!(node.client().welcome().used, 0);
}

/// ALLOC is idempotent for the same size and refuses another size.
#[test]
fn alloc_is_idempotent_and_refuses_a_resize() {
    let node = Memnode::start(&["--capacity", "16M"]);
    let c = node.client();
    c.alloc(5, 10 * PAGE as u64).unwrap();
    let data = Rng::new("idempotent").bytes(PAGE);
    c.write(&page_extents(5, 9, 1), &data).unwrap();
    // Same size again (a retried ALLOC): accepted, nothing reallocated.
    c.alloc(5, 10 * PAGE as u64).unwrap();
    assert_eq!(c.stat().unwrap().used, 10 * PAGE as u64);
    assert_same(
        &c.read(&page_extents(5, 9, 1)).unwrap(),
        &data,
        "after re-alloc",
    );
    expect_code(c.alloc(5, 11 * PAGE as u64), ErrorCode::SlabExists);
    assert_eq!(c.stat().unwrap().used, 10 * PAGE as u64);
    assert_eq!(c.reconnects(), 0, "refusals do not drop the connection");
}

fn shuffled(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// Many requests in flight on one connection before any reply is awaited;
/// replies are matched to requests whatever order they are awaited in.
#[test]
fn pipelined_requests_on_one_connection() {
    let node = Memnode::start(&["--capacity", "64M"]);
    let mut rng = Rng::new("pipelining");
    let c = node.client();
    let pages = 512;
    c.alloc(1, (pages * PAGE) as u64).unwrap();
    let image = rng.bytes(pages * PAGE);

    let writes: Vec<Pending> = (0..pages)
        .map(|p| {
            c.submit_write(&page_extents(1, p, 1), &image[p * PAGE..(p + 1) * PAGE])
                .unwrap()
        })
        .collect();
    // Reads submitted behind the writes on the same connection see them.
    let reads: Vec<(usize, Pending)> = shuffled(pages, &mut rng)
        .into_iter()
        .map(|p| (p, c.submit_read(&page_extents(1, p, 1)).unwrap()))
        .collect();
    // Await in reverse order of submission: the last reply first.
    let mut results: Vec<(usize, Vec<u8>)> = reads
        .into_iter()
        .rev()
        .map(|(p, r)| (p, r.wait().unwrap()))
        .collect();
    for w in writes.into_iter().rev() {
        assert!(w.wait().unwrap().is_empty());
    }
    results.sort_by_key(|(p, _)| *p);
    assert_eq!(results.len(), pages);
    for (p, got) in &results {
        assert_same(got, &image[p * PAGE..(p + 1) * PAGE], &format!("page {p}"));
    }
    // Mixed pipelines: overwrite every page with new data and read each
    // right behind its write, 8 pages per request.
    let image2 = rng.bytes(pages * PAGE);
    let mut inflight = Vec::new();
    for chunk in 0..pages / 8 {
        let ext = page_extents(1, chunk * 8, 8);
        let span = chunk * 8 * PAGE..(chunk + 1) * 8 * PAGE;
        let w = c.submit_write(&ext, &image2[span.clone()]).unwrap();
        let r = c.submit_read(&ext).unwrap();
        inflight.push((span, w, r));
    }
    for (span, w, r) in inflight {
        w.wait().unwrap();
        assert_same(&r.wait().unwrap(), &image2[span], "read behind write");
    }
    assert_eq!(c.reconnects(), 0);
}

/// Several threads share one `Client` (one connection), each keeping many
/// requests in flight on its own pages.
#[test]
fn pipelined_requests_from_threads_sharing_a_client() {
    let node = Memnode::start(&["--capacity", "64M"]);
    let c = node.client();
    let threads = 6;
    let per_thread = 96;
    c.alloc(1, (threads * per_thread * PAGE) as u64).unwrap();
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let c: Client = c.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(&format!("shared-client thread {t}"));
                let first = t * per_thread;
                let data = rng.bytes(per_thread * PAGE);
                barrier.wait();
                for round in 0..3 {
                    let writes: Vec<Pending> = (0..per_thread)
                        .map(|i| {
                            c.submit_write(
                                &page_extents(1, first + i, 1),
                                &data[i * PAGE..(i + 1) * PAGE],
                            )
                            .unwrap()
                        })
                        .collect();
                    let reads: Vec<(usize, Pending)> = shuffled(per_thread, &mut rng)
                        .into_iter()
                        .map(|i| (i, c.submit_read(&page_extents(1, first + i, 1)).unwrap()))
                        .collect();
                    for (i, r) in reads {
                        let got = r.wait().unwrap();
                        let want = &data[i * PAGE..(i + 1) * PAGE];
                        assert_same(&got, want, &format!("thread {t} round {round} page {i}"));
                    }
                    for w in writes {
                        w.wait().unwrap();
                    }
                }
                // The whole range at once, as one batch.
                let all = c.read(&page_extents(1, first, per_thread)).unwrap();
                assert_same(&all, &data, &format!("thread {t} batch"));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread panicked");
    }
    assert_eq!(c.reconnects(), 0);
}

/// Replies bigger than the socket buffers while more requests (big writes)
/// are still being sent: a client that only reads replies when it waits
/// must not deadlock against a node that stops reading while its replies
/// are unread.
#[test]
fn pipelined_big_reads_then_big_writes() {
    let node = Memnode::start(&["--capacity", "128M"]);
    let mut rng = Rng::new("big pipeline");
    let mut cfg = node.config();
    // A stall would otherwise be hidden by the client's reconnect.
    cfg.reconnect_window = Duration::ZERO;
    let c = Client::connect(cfg).unwrap();
    let chunk = 4 << 20;
    let n = 12;
    c.alloc(1, (chunk * n) as u64).unwrap();
    c.alloc(2, (chunk * n) as u64).unwrap();
    let src = rng.bytes(chunk * n);
    for i in 0..n {
        c.write(
            &[Extent::new(1, (i * chunk) as u64, chunk as u32)],
            &src[i * chunk..(i + 1) * chunk],
        )
        .unwrap();
    }
    let reads: Vec<Pending> = (0..n)
        .map(|i| {
            c.submit_read(&[Extent::new(1, (i * chunk) as u64, chunk as u32)])
                .unwrap()
        })
        .collect();
    let writes: Vec<Pending> = (0..n)
        .map(|i| {
            c.submit_write(
                &[Extent::new(2, (i * chunk) as u64, chunk as u32)],
                &src[i * chunk..(i + 1) * chunk],
            )
            .unwrap()
        })
        .collect();
    for (i, r) in reads.into_iter().enumerate() {
        assert_same(
            &r.wait().unwrap(),
            &src[i * chunk..(i + 1) * chunk],
            "big read",
        );
    }
    for w in writes {
        w.wait().unwrap();
    }
    let back = c.read(&[Extent::new(2, 0, (2 * chunk) as u32)]).unwrap();
    assert_same(&back, &src[..2 * chunk], "big writes landed");
    assert_eq!(c.reconnects(), 0);
}

/// Leasing beyond `--capacity` is refused with Full, nothing already stored
/// is lost, and freeing makes room again; the budget is node-wide.
#[test]
fn capacity_is_enforced_and_freeing_makes_room() {
    let node = Memnode::start(&["--capacity", "8M"]);
    let mut rng = Rng::new("capacity");
    let a = node.client();
    let b = node.client();
    a.alloc(1, 4 * MIB).unwrap();
    b.alloc(1, 3 * MIB).unwrap();
    let da = rng.bytes(4 * MIB as usize);
    let db = rng.bytes(3 * MIB as usize);
    let ea = [Extent::new(1, 0, 4 * MIB as u32)];
    let eb = [Extent::new(1, 0, 3 * MIB as u32)];
    a.write(&ea, &da).unwrap();
    b.write(&eb, &db).unwrap();

    // 1 MiB is left: 2 MiB does not fit, for either session.
    expect_code(a.alloc(2, 2 * MIB), ErrorCode::Full);
    expect_code(b.alloc(2, 2 * MIB), ErrorCode::Full);
    // A 1 GiB slab is legal in size but far over capacity.
    expect_code(a.alloc(3, 1 << 30), ErrorCode::Full);
    // Exactly the remaining 1 MiB fits; then even one page does not.
    a.alloc(4, MIB).unwrap();
    expect_code(b.alloc(5, 1), ErrorCode::Full);
    assert_eq!(a.stat().unwrap().used, 8 * MIB);

    // Refusals lost nothing and kept the connections.
    assert_same(&a.read(&ea).unwrap(), &da, "A after Full");
    assert_same(&b.read(&eb).unwrap(), &db, "B after Full");
    assert_eq!((a.reconnects(), b.reconnects()), (0, 0));

    // Freeing A's 4 MiB lets B lease 2 MiB.
    a.free(1).unwrap();
    b.alloc(2, 2 * MIB).unwrap();
    let d2 = rng.bytes(2 * MIB as usize);
    b.write(&[Extent::new(2, 0, 2 * MIB as u32)], &d2).unwrap();
    assert_same(
        &b.read(&[Extent::new(2, 0, 2 * MIB as u32)]).unwrap(),
        &d2,
        "B's new slab",
    );
    assert_same(&b.read(&eb).unwrap(), &db, "B's old slab");
    assert_eq!(b.stat().unwrap().used, 6 * MIB);
    // Closing a session returns its capacity too.
    b.close_session().unwrap();
    a.alloc(6, 7 * MIB).unwrap();
    assert_eq!(a.stat().unwrap().used, 8 * MIB);
}

/// Slab ids are per session: another session can neither read, write nor
/// free them, and its own slab with the same id is a different one.
#[test]
fn sessions_are_isolated() {
    let node = Memnode::start(&["--capacity", "16M"]);
    let mut rng = Rng::new("isolation");
    let a = node.client();
    let b = node.client();
    a.alloc(9, (4 * PAGE) as u64).unwrap();
    let ext = page_extents(9, 0, 4);
    let da = rng.bytes(4 * PAGE);
    a.write(&ext, &da).unwrap();

    expect_code(b.read(&ext), ErrorCode::NoSuchSlab);
    expect_code(b.write(&ext, &rng.bytes(4 * PAGE)), ErrorCode::NoSuchSlab);
    expect_code(b.free(9), ErrorCode::NoSuchSlab);
    assert_eq!(b.stat().unwrap().session_slabs, 0);
    assert_eq!(b.reconnects(), 0);

    // B's own slab 9 is distinct storage.
    b.alloc(9, (4 * PAGE) as u64).unwrap();
    assert!(
        b.read(&ext).unwrap().iter().all(|x| *x == 0),
        "B's fresh slab 9 must not show A's data"
    );
    let db = rng.bytes(4 * PAGE);
    b.write(&ext, &db).unwrap();
    b.free(9).unwrap();

    assert_same(&a.read(&ext).unwrap(), &da, "A's slab 9");
    assert_eq!(a.stat().unwrap().session_slabs, 1);
}

/// 16 threads, each with its own session, write and verify distinct data
/// at the same time.
#[test]
fn many_concurrent_sessions() {
    let node = Memnode::start(&["--capacity", "64M"]);
    let threads = 16;
    let pages = 64;
    let barrier = Arc::new(Barrier::new(threads));
    let addr = node.addr_string();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let barrier = barrier.clone();
            let cfg = dmem_memnode::client::ClientConfig::new(addr.clone());
            std::thread::spawn(move || {
                let mut rng = Rng::new(&format!("session {t}"));
                let c = Client::connect(cfg).unwrap();
                // Every session uses the same slab id: the namespaces differ.
                c.alloc(1, (pages * PAGE) as u64).unwrap();
                let data = rng.bytes(pages * PAGE);
                barrier.wait();
                for round in 0..4 {
                    for batch in 0..pages / 16 {
                        let ext = page_extents(1, batch * 16, 16);
                        let span = batch * 16 * PAGE..(batch + 1) * 16 * PAGE;
                        c.write(&ext, &data[span.clone()]).unwrap();
                    }
                    let back = c.read(&page_extents(1, 0, pages)).unwrap();
                    assert_same(&back, &data, &format!("session {t} round {round}"));
                }
                (c.session_id(), c, data)
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread panicked"))
        .collect();
    let ids: HashSet<u64> = results.iter().map(|r| r.0).collect();
    assert_eq!(ids.len(), threads, "every client got its own session");
    // After everyone finished, every session still holds exactly its data.
    for (_, c, data) in &results {
        let back = c.read(&page_extents(1, 0, pages)).unwrap();
        assert_same(&back, data, "after all sessions finished");
    }
    assert_eq!(
        results[0].1.stat().unwrap().used,
        (threads * pages * PAGE) as u64
    );
}

/// With a token file: a client holding the token authenticates (and checks
/// the node's proof), the data path works, and the metrics endpoint counts
/// operations and errors.
#[test]
fn token_auth_and_metrics() {
    let dir = TempDir::new("token");
    let token = b"correct horse battery staple 0123";
    // Surrounding whitespace in the file is not part of the token.
    let tf = dir.write("token", [&b"  "[..], token, b"\n"].concat());
    let mport = free_port();
    let maddr: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let node = Memnode::start(&[
        "--token-file",
        tf.to_str().unwrap(),
        "--metrics",
        &maddr.to_string(),
    ]);
    let before = scrape(maddr);
    assert_eq!(metric(&before, "dmem_memnode_ops_total{op=\"read\"}"), 0);
    assert_eq!(metric(&before, "dmem_memnode_capacity_bytes"), 64 * MIB);

    let c = node.client_with_token(token);
    c.alloc(1, (8 * PAGE) as u64).unwrap();
    let data = Rng::new("token").bytes(8 * PAGE);
    c.write(&page_extents(1, 0, 8), &data).unwrap();
    for _ in 0..5 {
        assert_same(
            &c.read(&page_extents(1, 0, 8)).unwrap(),
            &data,
            "token client",
        );
    }
    let m = scrape(maddr);
    assert_eq!(metric(&m, "dmem_memnode_ops_total{op=\"read\"}"), 5);
    assert_eq!(metric(&m, "dmem_memnode_ops_total{op=\"write\"}"), 1);
    assert_eq!(metric(&m, "dmem_memnode_ops_total{op=\"alloc\"}"), 1);
    assert_eq!(
        metric(&m, "dmem_memnode_bytes_total{op=\"read\"}"),
        5 * 8 * PAGE as u64
    );
    assert_eq!(metric(&m, "dmem_memnode_used_bytes"), 8 * PAGE as u64);
    assert_eq!(metric(&m, "dmem_memnode_slabs"), 1);
    assert_eq!(metric(&m, "dmem_memnode_sessions{state=\"attached\"}"), 1);
    assert_eq!(
        metric(&m, "dmem_memnode_errors_total{kind=\"bad_frame\"}"),
        0
    );
    assert_eq!(
        metric(&m, "dmem_memnode_errors_total{kind=\"auth_failed\"}"),
        0
    );

    // A bad frame and a wrong token show up in the error counters.
    let mut raw = RawConn::connect(node.addr());
    raw.send(b"GET / HTTP/1.1\r\n\r\n");
    // The "header" is "GET / HTTP/1.1\r\n": its req_id bytes are echoed.
    raw.expect_error(u64::from_le_bytes(*b"TP/1.1\r\n"), ErrorCode::BadFrame);
    raw.expect_closed();
    let mut cfg = node.config();
    cfg.token = Some(b"the wrong token, long enough".to_vec());
    assert!(matches!(
        Client::connect(cfg),
        Err(ClientError::AuthRefused { .. })
    ));
    let m = scrape(maddr);
    assert_eq!(
        metric(&m, "dmem_memnode_errors_total{kind=\"bad_frame\"}"),
        1
    );
    assert_eq!(
        metric(&m, "dmem_memnode_errors_total{kind=\"auth_failed\"}"),
        1
    );
    assert!(metric(&m, "dmem_memnode_connections_total") >= 3);

    // Unknown paths are 404, not metrics.
    let mut s = std::net::TcpStream::connect(maddr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /nope HTTP/1.1\r\n\r\n").unwrap();
    let mut resp = String::new();
    std::io::Read::read_to_string(&mut s, &mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");

    assert_serves(node.addr(), Some(token));
    assert_same(
        &c.read(&page_extents(1, 0, 8)).unwrap(),
        &data,
        "after errors",
    );
}

/// Runs dmem-memnode (on 127.0.0.1:0 unless `args` say otherwise), expects
/// it to exit with an error before listening; returns its stderr.
fn start_fails(args: &[&str]) -> String {
    let mut cmd = std::process::Command::new(dmem_tests::bin_path("dmem-memnode"));
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let (status, out, err) = dmem_tests::run_cmd(cmd.args(args));
    assert!(!status.success(), "{args:?} must not start; stdout: {out}");
    assert!(
        !out.contains("listening on"),
        "{args:?} must fail before listening: {out}"
    );
    err
}

/// Settings that cannot work are refused at startup with a clear message,
/// instead of a daemon that runs but serves nobody.
#[test]
fn unusable_settings_are_refused_at_startup() {
    let dir = TempDir::new("bad-settings");
    let short = dir.write("token", "short\n");
    let err = start_fails(&["--capacity", "8M", "--token-file", short.to_str().unwrap()]);
    assert!(err.contains("at least 16"), "{err}");
    let missing = dir.path().join("missing");
    let err = start_fails(&[
        "--capacity",
        "8M",
        "--token-file",
        missing.to_str().unwrap(),
    ]);
    assert!(err.contains("cannot read token file"), "{err}");
    let err = start_fails(&["--capacity", "0"]);
    assert!(err.contains("--capacity"), "{err}");
    let err = start_fails(&["--capacity", "12Q"]);
    assert!(err.contains("invalid size"), "{err}");
    let err = start_fails(&["--capacity", "8M", "--io-timeout", "0"]);
    assert!(err.contains("--io-timeout"), "{err}");
    let err = start_fails(&["--capacity", "8M", "--lease-grace=-1"]);
    assert!(err.contains("--lease-grace"), "{err}");
    // A port already taken.
    let node = Memnode::start::<&str>(&[]);
    let err = start_fails(&["--listen", &node.addr_string(), "--capacity", "8M"]);
    assert!(err.contains("cannot listen on"), "{err}");
}

/// A token file other users can read is accepted with a warning (anyone
/// who reads it can open sessions); one only its owner reads, silently.
#[test]
fn a_token_file_readable_by_others_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("token-mode");
    let token = dir.write("token", "0123456789abcdef0123\n");
    for (mode, warned) in [(0o644, true), (0o600, false)] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode))
            .expect("chmod token");
        let node = Memnode::start(&["--token-file", token.to_str().unwrap()]);
        assert_serves(node.addr(), Some(b"0123456789abcdef0123"));
        let log = node.log();
        assert_eq!(
            log.contains("can be read by other users"),
            warned,
            "mode {mode:o}: {log}"
        );
    }
}

/// `--max-connections`: connections beyond the limit are refused with Busy;
/// a slot freed is usable again.
#[test]
fn max_connections_refuses_with_busy() {
    let node = Memnode::start(&["--max-connections", "2"]);
    let a = node.client();
    let b = node.client();
    match Client::connect(node.config()) {
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::Busy), "{e}"),
        Ok(_) => panic!("a third connection must be refused"),
    }
    // The two admitted sessions work.
    a.alloc(1, PAGE as u64).unwrap();
    b.alloc(1, PAGE as u64).unwrap();
    drop(a);
    // The server notices the close asynchronously: retry until admitted.
    let c = eventually(HANG_GUARD, "a freed connection slot", || {
        Client::connect(node.config()).ok()
    });
    c.alloc(1, PAGE as u64).unwrap();
}

fn assert_exits_zero_on(sig: Signal) {
    let mut node = Memnode::start::<&str>(&[]);
    // With a live session and a half-sent frame in flight.
    let c = node.client();
    c.alloc(1, PAGE as u64).unwrap();
    let mut raw = RawConn::connect(node.addr());
    raw.send(&[0xE0, 0xD3, 0x20]);
    node.assert_alive();
    node.signal(sig);
    let st = node.wait_exit(Duration::from_secs(10));
    assert_eq!(st.code(), Some(0), "exit status after {sig}: {st}");
    raw.expect_closed();
    assert!(
        node.log().contains(&format!("{} received", sig.as_str())),
        "log: {}",
        node.log()
    );
}

/// SIGTERM ends the daemon promptly with status 0, even with clients.
#[test]
fn sigterm_exits_zero() {
    assert_exits_zero_on(Signal::SIGTERM);
}

/// SIGINT (Ctrl-C) likewise.
#[test]
fn sigint_exits_zero() {
    assert_exits_zero_on(Signal::SIGINT);
}

/// Threads sharing one `Client` in lock-step rounds: each round every
/// thread sends one request and waits, so at the end of a round the last
/// waiters depend on the reader handing the socket on to them. A lost
/// hand-off leaves them waiting for their timeout (seen as an error).
#[test]
fn shared_client_lockstep_rounds() {
    let node = Memnode::start(&["--capacity", "16M"]);
    let c = node.client();
    let threads = 8;
    c.alloc(1, (threads * PAGE) as u64).unwrap();
    let image = Arc::new(Rng::new("lockstep").bytes(threads * PAGE));
    c.write(&page_extents(1, 0, threads), &image).unwrap();
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (c, barrier, image) = (c.clone(), barrier.clone(), image.clone());
            std::thread::spawn(move || {
                for round in 0..1500 {
                    barrier.wait();
                    let got = c
                        .read(&page_extents(1, t, 1))
                        .unwrap_or_else(|e| panic!("thread {t} round {round}: {e}"));
                    assert_same(&got, &image[t * PAGE..(t + 1) * PAGE], "lockstep read");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("lockstep thread panicked");
    }
    assert_eq!(c.reconnects(), 0);
}

/// Many threads on one `Client`, each keeping a few requests in flight and
/// waiting for them in random order, for many rounds: every reply reaches
/// its waiter and no waiter is left without someone reading the socket
/// (a lost hand-off would surface as a Timeout error).
#[test]
fn shared_client_stress_waits_in_random_order() {
    let node = Memnode::start(&["--capacity", "16M"]);
    let c = node.client();
    let pages = 256;
    c.alloc(1, (pages * PAGE) as u64).unwrap();
    let image = Rng::new("stress image").bytes(pages * PAGE);
    c.write(&page_extents(1, 0, pages), &image).unwrap();
    let image = Arc::new(image);
    let threads = 8;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let c = c.clone();
            let image = image.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(&format!("stress thread {t}"));
                for _ in 0..300 {
                    let k = 1 + rng.below(6) as usize;
                    let mut inflight: Vec<(usize, Pending)> = (0..k)
                        .map(|_| {
                            let p = rng.below(pages as u64) as usize;
                            (p, c.submit_read(&page_extents(1, p, 1)).unwrap())
                        })
                        .collect();
                    while !inflight.is_empty() {
                        let i = rng.below(inflight.len() as u64) as usize;
                        let (p, r) = inflight.swap_remove(i);
                        let got = r.wait().unwrap();
                        assert_same(&got, &image[p * PAGE..(p + 1) * PAGE], "stress read");
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("stress thread panicked");
    }
    assert_eq!(c.reconnects(), 0);
}

/// `wait_into` (the pager's read path) puts every reply's data into the
/// caller's buffer, whether the waiter read its own reply off the socket
/// (received in place) or another waiter did and handed it over (copied):
/// several threads with reads of different sizes in flight on one
/// connection force both. A buffer of the wrong size is an error, not a
/// partial or overlong copy.
#[test]
fn wait_into_delivers_every_reply_into_the_callers_buffer() {
    let node = Memnode::start::<&str>(&[]);
    let c = node.client();
    let pages = 256;
    c.alloc(1, (pages * PAGE) as u64).unwrap();
    let data = Arc::new(Rng::new("wait_into").bytes(pages * PAGE));
    c.write(&page_extents(1, 0, pages), &data).unwrap();

    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (c, data) = (c.clone(), Arc::clone(&data));
            std::thread::spawn(move || {
                let mut rng = Rng::new(&format!("wait_into-{t}"));
                let mut buf = vec![0xEEu8; 64 * PAGE];
                for _ in 0..100 {
                    let n = 1 + rng.below(64) as usize;
                    let first = rng.below((pages - n) as u64) as usize;
                    let p = c.submit_read(&page_extents(1, first, n)).unwrap();
                    buf.fill(0xEE);
                    p.wait_into(&mut buf[..n * PAGE]).unwrap();
                    assert_same(
                        &buf[..n * PAGE],
                        &data[first * PAGE..(first + n) * PAGE],
                        "wait_into",
                    );
                    assert!(
                        buf[n * PAGE..].iter().all(|&b| b == 0xEE),
                        "wait_into wrote past the requested size"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }

    let p = c.submit_read(&page_extents(1, 0, 2)).unwrap();
    let mut small = vec![0u8; PAGE];
    match p.wait_into(&mut small) {
        Err(ClientError::ShortRead { got, want }) => assert_eq!((got, want), (2 * PAGE, PAGE)),
        other => panic!("expected ShortRead for a one-page buffer, got {other:?}"),
    }
    let mut exact = vec![0u8; 2 * PAGE];
    c.read_into(&page_extents(1, 0, 2), &mut exact).unwrap();
    assert_same(&exact, &data[..2 * PAGE], "read_into after a short read");
}
