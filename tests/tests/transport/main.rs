//! The transport conformance suite: every transport the pager can use to
//! reach a memory node (`dmem_pager::transport`) passes the same tests,
//! against a real `dmem-memnode`: batched reads and writes verified byte
//! for byte with several batches in flight, refusals (out of bounds,
//! unknown slab, full node) with no partial effect, and a dropped
//! connection followed by a transparent reconnect.
//!
//! Each test runs once per transport. The TCP run always runs. The RDMA
//! run needs the `rdma` cargo feature and an RDMA device (rdma_rxe will
//! do, see `scripts/setup-rxe.sh`); without them it prints
//! "SKIPPED: <reason>" (shown by `.config/nextest.toml`) and passes. With
//! a device present, any RDMA failure fails the test: it never falls back.
//!
//! On an RDMA host: `cargo build --release --workspace --features
//! dmem-pager/rdma,dmem-memnode/rdma`, then `cargo nextest run --release
//! -p dmem-tests --features dmem-pager/rdma,dmem-memnode/rdma -E
//! 'binary(transport)'`.

use std::sync::Arc;

use dmem_memnode::client::ClientError;
use dmem_memnode::protocol::{ErrorCode, Extent};
use dmem_memnode::rdma::DeviceConfig;
use dmem_pager::remote::{RemoteError, Transport};
use dmem_pager::transport::{connect, rdma_unavailable_here, TransportMode};
use dmem_tests::{assert_same, skip, Memnode, Rng, PAGE};

const SLAB: u64 = 4 << 20;

/// The node and a transport of `mode` to it, or None (after a visible
/// skip notice) when this host cannot run `mode` at all.
fn setup(
    test: &str,
    mode: TransportMode,
    node_args: &[&str],
) -> Option<(Memnode, Arc<dyn Transport>)> {
    if mode == TransportMode::Rdma {
        if let Some(why) = rdma_unavailable_here() {
            skip(test, &why);
            return None;
        }
    }
    let mut args = vec![
        "--rdma",
        if mode == TransportMode::Rdma {
            "on"
        } else {
            "off"
        },
    ];
    args.extend_from_slice(node_args);
    let node = Memnode::start(&args);
    let t = connect(node.config(), mode, &DeviceConfig::default())
        .unwrap_or_else(|e| panic!("{test}: cannot connect over {mode:?}: {e}"));
    let want = if mode == TransportMode::Rdma {
        "rdma"
    } else {
        "tcp"
    };
    assert_eq!(t.kind(), want, "{test}: wrong transport chosen");
    Some((node, t))
}

fn code(e: &RemoteError) -> Option<ErrorCode> {
    match e {
        RemoteError::Client(c) => c.code(),
        _ => None,
    }
}

/// What the node should hold: one byte vector per slab.
struct Model(Vec<Vec<u8>>);

impl Model {
    fn apply(&mut self, ext: &[Extent], data: &[u8]) {
        let mut pos = 0;
        for e in ext {
            let (o, n) = (e.offset as usize, e.len as usize);
            self.0[e.slab as usize][o..o + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    fn expect(&self, ext: &[Extent]) -> Vec<u8> {
        let mut v = Vec::new();
        for e in ext {
            let (o, n) = (e.offset as usize, e.len as usize);
            v.extend_from_slice(&self.0[e.slab as usize][o..o + n]);
        }
        v
    }
}

/// A random batch: page-sized and odd-sized extents over both slabs.
fn batch(rng: &mut Rng, max: usize) -> Vec<Extent> {
    let n = 1 + rng.below(max as u64) as usize;
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let slab = rng.below(2) as u32;
        let len = if rng.below(4) == 0 {
            1 + rng.below(3000) as u32
        } else {
            (PAGE * (1 + rng.below(8) as usize)) as u32
        };
        let offset = rng.below(SLAB - len as u64);
        v.push(Extent::new(slab, offset, len));
    }
    v
}

fn lease_two(t: &dyn Transport) -> Model {
    t.lease(0, SLAB).expect("lease slab 0");
    t.lease(1, SLAB).expect("lease slab 1");
    Model(vec![vec![0u8; SLAB as usize]; 2])
}

/// Every byte of both slabs reads back as the model says, in big batches.
fn verify_all(t: &dyn Transport, m: &Model, what: &str) {
    for slab in 0..2u32 {
        let step = 256 * PAGE;
        for first in (0..SLAB as usize).step_by(step) {
            let ext = [Extent::new(slab, first as u64, step as u32)];
            let mut out = vec![0u8; step];
            t.post_read(&ext)
                .and_then(|c| c.wait(&mut out))
                .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
            assert_same(&out, &m.expect(&ext), what);
        }
    }
}

/// Whether two extents share a byte.
fn overlap(x: &Extent, y: &Extent) -> bool {
    x.slab == y.slab && x.offset < y.offset + y.len as u64 && y.offset < x.offset + x.len as u64
}

fn batched_round_trip(test: &str, mode: TransportMode) {
    let Some((_node, t)) = setup(test, mode, &[]) else {
        return;
    };
    let mut rng = Rng::new(test);
    let mut m = lease_two(t.as_ref());
    // Writes, four batches in flight at a time. Batches in flight may
    // overlap; the model applies them in posting order, so each group's
    // batches are kept disjoint from each other.
    for _ in 0..40 {
        let mut group: Vec<Vec<Extent>> = Vec::new();
        while group.len() < 4 {
            let b = batch(&mut rng, 24);
            let overlaps = group
                .iter()
                .flatten()
                .any(|x| b.iter().any(|y| overlap(x, y)))
                || b.iter()
                    .enumerate()
                    .any(|(i, x)| b[i + 1..].iter().any(|y| overlap(x, y)));
            if !overlaps {
                group.push(b);
            }
        }
        let mut done = Vec::new();
        for b in &group {
            let total: usize = b.iter().map(|e| e.len as usize).sum();
            let data = rng.bytes(total);
            let c = t.post_write(b, &data).expect("post write");
            m.apply(b, &data);
            done.push(c);
        }
        for c in done {
            c.wait(&mut []).expect("write completion");
        }
    }
    // Reads: random batches, several in flight, then everything.
    for _ in 0..40 {
        let batches: Vec<Vec<Extent>> = (0..4).map(|_| batch(&mut rng, 24)).collect();
        let posted: Vec<_> = batches
            .iter()
            .map(|b| t.post_read(b).expect("post read"))
            .collect();
        for (b, c) in batches.iter().zip(posted) {
            let total: usize = b.iter().map(|e| e.len as usize).sum();
            let mut out = vec![0u8; total];
            c.wait(&mut out).expect("read completion");
            assert_same(&out, &m.expect(b), "random batch read back");
        }
    }
    verify_all(t.as_ref(), &m, "whole slabs");
}

fn refusals_have_no_partial_effect(test: &str, mode: TransportMode) {
    let Some((_node, t)) = setup(test, mode, &["--capacity", "10M"]) else {
        return;
    };
    let mut rng = Rng::new(test);
    let mut m = lease_two(t.as_ref());
    let good = Extent::new(0, 0, PAGE as u32);
    let data = rng.bytes(PAGE);
    t.post_write(&[good], &data).unwrap().wait(&mut []).unwrap();
    m.apply(&[good], &data);

    // A batch with one extent past the slab's end: refused, and its valid
    // extent is not written either.
    let oob = Extent::new(1, SLAB - 100, 200);
    let r = t
        .post_write(&[good, oob], &rng.bytes(PAGE + 200))
        .and_then(|c| c.wait(&mut []));
    let e = r.expect_err("an out-of-bounds write must be refused");
    assert_eq!(code(&e), Some(ErrorCode::OutOfBounds), "{e}");
    let r = t.post_read(&[oob]).and_then(|c| c.wait(&mut [0u8; 200]));
    assert_eq!(
        code(&r.expect_err("out-of-bounds read")),
        Some(ErrorCode::OutOfBounds)
    );

    // An unknown slab, and a released one.
    let r = t
        .post_read(&[Extent::new(7, 0, PAGE as u32)])
        .and_then(|c| c.wait(&mut [0u8; PAGE]));
    assert_eq!(
        code(&r.expect_err("unknown slab")),
        Some(ErrorCode::NoSuchSlab)
    );
    t.release(1).unwrap();
    let r = t
        .post_read(&[Extent::new(1, 0, PAGE as u32)])
        .and_then(|c| c.wait(&mut [0u8; PAGE]));
    assert_eq!(
        code(&r.expect_err("released slab")),
        Some(ErrorCode::NoSuchSlab)
    );

    // A full node refuses a lease (10M: two 4M slabs fit, a third not).
    t.lease(1, SLAB).unwrap();
    m.0[1].fill(0);
    let e = t.lease(2, SLAB).expect_err("the node is full");
    assert_eq!(code(&e), Some(ErrorCode::Full), "{e}");
    assert!(t.free_bytes().unwrap() < SLAB);

    // None of that disturbed what is stored.
    verify_all(t.as_ref(), &m, "after refusals");
}

fn reconnects_after_a_dropped_connection(test: &str, mode: TransportMode) {
    let Some((_node, t)) = setup(test, mode, &[]) else {
        return;
    };
    let mut rng = Rng::new(test);
    let mut m = lease_two(t.as_ref());
    for _ in 0..8 {
        let b = batch(&mut rng, 16);
        let total: usize = b.iter().map(|e| e.len as usize).sum();
        let data = rng.bytes(total);
        t.post_write(&b, &data).unwrap().wait(&mut []).unwrap();
        m.apply(&b, &data);
    }
    let before = t.reconnects();
    t.interrupt();
    // The next requests reconnect (the node keeps the session for its
    // lease grace) and see the same data; writes go on working.
    verify_all(t.as_ref(), &m, "after reconnecting");
    assert!(t.reconnects() > before, "no reconnect was counted");
    let b = [Extent::new(1, 0, (4 * PAGE) as u32)];
    let data = rng.bytes(4 * PAGE);
    t.post_write(&b, &data).unwrap().wait(&mut []).unwrap();
    m.apply(&b, &data);
    verify_all(t.as_ref(), &m, "after writing again");
}

fn auto_picks_a_transport_that_works(test: &str, mode: TransportMode) {
    // `auto` against a node that offers RDMA (when this host can) or not.
    let Some((node, _t)) = setup(test, mode, &[]) else {
        return;
    };
    let t = connect(node.config(), TransportMode::Auto, &DeviceConfig::default())
        .expect("auto connects");
    let want = if mode == TransportMode::Rdma {
        "rdma"
    } else {
        "tcp"
    };
    assert_eq!(t.kind(), want, "auto chose the wrong transport");
    t.lease(0, SLAB).unwrap();
    let data = Rng::new(test).bytes(PAGE);
    let e = [Extent::new(0, PAGE as u64, PAGE as u32)];
    t.post_write(&e, &data).unwrap().wait(&mut []).unwrap();
    let mut out = vec![0u8; PAGE];
    t.post_read(&e).unwrap().wait(&mut out).unwrap();
    assert_same(&out, &data, "auto round trip");
}

/// `--transport rdma` against a node that does not offer RDMA is an
/// error that says why, not a silent TCP connection.
#[test]
fn rdma_required_but_not_offered_is_a_clear_error() {
    let node = Memnode::start(&["--rdma", "off"]);
    let e = connect(node.config(), TransportMode::Rdma, &DeviceConfig::default())
        .err()
        .expect("must not connect");
    let msg = e.to_string();
    assert!(
        msg.contains("RDMA")
            && (msg.contains("--rdma off")
                || msg.contains("built without")
                || msg.contains("no RDMA device")),
        "unclear error: {msg}"
    );
    // And the node says why when asked directly.
    let c = node.client();
    let r = c.rdma_slab(0);
    assert!(
        matches!(
            r,
            Err(ClientError::Server {
                code: Some(ErrorCode::NoRdma),
                ..
            })
        ),
        "{r:?}"
    );
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[test]
            fn tcp() {
                super::$name(concat!(stringify!($name), "::tcp"), TransportMode::Tcp);
            }
            #[test]
            fn rdma() {
                super::$name(concat!(stringify!($name), "::rdma"), TransportMode::Rdma);
            }
        }
    )*};
}

conformance!(
    batched_round_trip,
    refusals_have_no_partial_effect,
    reconnects_after_a_dropped_connection,
    auto_picks_a_transport_that_works,
);
