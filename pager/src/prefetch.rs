//! Stream detection for prefetch, per app. Faults that are not served
//! locally feed a short history; when most recent deltas agree (majority
//! trend, as in Leap), the stride is taken as a stream and the next
//! `window` pages along it are fetched.
//!
//! Pages installed ahead of use cannot be seen being read (no access bits),
//! so each window leaves one page out, its *marker* in the middle of the
//! window, kept in the cache tier (like the kernel's readahead marker). The
//! app's fault on the marker says the stream is alive and half the window
//! is left: the next window is fetched (twice as large, up to the maximum)
//! while the app consumes that half. Any other fault starts over with the
//! initial window.
//!
//! Programs walk several streams at once: OpenBLAS's threads each sweep
//! their own columns of C, `c = a + b` reads two arrays and writes a third.
//! One shared history sees their faults interleaved and finds no trend, so
//! faults are sorted into [`Streams`] by where they land (a fault joins the
//! stream it is nearest to), each with a detector of its own.

const HISTORY: usize = 8;
/// Streams tracked at once per app; the least recently used one is
/// replaced.
const STREAMS: usize = 8;
/// A fault farther than this (in blocks) from every stream's last fault
/// starts a stream of its own. Strides beyond it are not detected: 64
/// blocks covers a column walk of a 4096-wide float64 matrix (8 pages).
const NEAR: i64 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// First page number to fetch.
    pub start: i64,
    /// Pages to fetch.
    pub count: usize,
    /// Distance between them, in pages (negative for descending streams).
    pub stride: i64,
    /// The page to leave out of the app (kept in the cache tier).
    pub marker: i64,
}

#[derive(Debug, Clone, Copy)]
struct Stream {
    marker: i64,
    /// Next page number the stream will prefetch.
    frontier: i64,
    stride: i64,
    /// Size of the window the marker belongs to.
    issued: usize,
}

#[derive(Debug, Clone)]
pub struct Prefetcher {
    hist: [i64; HISTORY],
    len: usize,
    min_window: usize,
    max_window: usize,
    window: usize,
    stream: Option<Stream>,
}

/// What a fault told the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub plan: Option<Plan>,
    /// Pages of the previous window now known to have been used.
    pub consumed: usize,
}

const NOTHING: Outcome = Outcome {
    plan: None,
    consumed: 0,
};

impl Prefetcher {
    /// Windows in pages; `max_window == 0` disables prefetch.
    pub fn new(min_window: usize, max_window: usize) -> Prefetcher {
        let min_window = min_window.min(max_window).max(1);
        Prefetcher {
            hist: [0; HISTORY],
            len: 0,
            min_window,
            max_window,
            window: min_window,
            stream: None,
        }
    }

    /// The last fault fed in, if any.
    fn last(&self) -> Option<i64> {
        (self.len > 0).then(|| self.hist[HISTORY - 1])
    }

    fn marker(&self) -> Option<i64> {
        self.stream.map(|s| s.marker)
    }

    fn push(&mut self, page: i64) {
        self.hist.rotate_left(1);
        self.hist[HISTORY - 1] = page;
        self.len = (self.len + 1).min(HISTORY);
    }

    /// Majority delta of the recent history (Boyer-Moore vote, then check).
    fn trend(&self) -> Option<i64> {
        if self.len < 3 {
            return None;
        }
        let h = &self.hist[HISTORY - self.len..];
        let deltas: Vec<i64> = h.windows(2).map(|w| w[1] - w[0]).collect();
        let (mut cand, mut votes) = (0i64, 0usize);
        for &d in &deltas {
            if votes == 0 {
                cand = d;
                votes = 1;
            } else if d == cand {
                votes += 1;
            } else {
                votes -= 1;
            }
        }
        let n = deltas.iter().filter(|&&d| d == cand).count();
        (cand != 0 && n * 2 > deltas.len()).then_some(cand)
    }

    /// A fault on page number `page` that was not served from the app's
    /// own memory (cache tier or memory node).
    pub fn on_fault(&mut self, page: i64) -> Outcome {
        if self.max_window == 0 {
            return NOTHING;
        }
        if let Some(s) = self.stream {
            if page == s.marker {
                // The stream reached the marker: fetch the next window.
                self.window = (self.window * 2).min(self.max_window);
                self.push(page);
                return self.issue(s.frontier, s.stride, s.issued);
            }
        }
        self.push(page);
        self.window = self.min_window;
        match self.trend() {
            Some(stride) => self.issue(page + stride, stride, 0),
            None => {
                self.stream = None;
                NOTHING
            }
        }
    }

    fn issue(&mut self, start: i64, stride: i64, consumed: usize) -> Outcome {
        let count = self.window;
        let marker = start + stride * (count as i64 / 2);
        self.stream = Some(Stream {
            marker,
            frontier: start + stride * count as i64,
            stride,
            issued: count,
        });
        Outcome {
            plan: Some(Plan {
                start,
                count,
                stride,
                marker,
            }),
            consumed,
        }
    }
}

/// The stream detectors of one app, and the pages each last prefetched.
#[derive(Debug, Clone)]
pub struct Streams {
    /// A fresh detector, copied for every new stream.
    fresh: Prefetcher,
    slots: Vec<Slot>,
    clock: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    det: Prefetcher,
    used: u64,
    /// Pages of this stream's last window still flagged as prefetched.
    window: Vec<u64>,
}

/// Which stream a fault went to (see [`Streams::window`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamId(usize);

impl Streams {
    pub fn new(fresh: Prefetcher) -> Streams {
        Streams {
            fresh,
            slots: Vec::with_capacity(STREAMS),
            clock: 0,
        }
    }

    /// A fault on block `block` that was not served from the app's own
    /// memory: it goes to the stream whose marker it hits, else to the
    /// nearest stream within [`NEAR`], else starts one.
    pub fn on_fault(&mut self, block: i64) -> (StreamId, Outcome) {
        self.clock += 1;
        let near = self
            .slots
            .iter()
            .position(|s| s.det.marker() == Some(block))
            .or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| Some((i, (s.det.last()? - block).abs())))
                    .filter(|&(_, d)| d <= NEAR)
                    .min_by_key(|&(_, d)| d)
                    .map(|(i, _)| i)
            });
        let i = match near {
            Some(i) => i,
            None => {
                let slot = Slot {
                    det: self.fresh.clone(),
                    used: 0,
                    window: Vec::new(),
                };
                if self.slots.len() < STREAMS {
                    self.slots.push(slot);
                    self.slots.len() - 1
                } else {
                    // The replaced stream's last window keeps its flags:
                    // counted as waste if those pages leave unused.
                    let (i, _) = self
                        .slots
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, s)| s.used)
                        .expect("STREAMS > 0");
                    self.slots[i] = slot;
                    i
                }
            }
        };
        let slot = &mut self.slots[i];
        slot.used = self.clock;
        (StreamId(i), slot.det.on_fault(block))
    }

    /// The pages stream `id` last prefetched.
    pub fn window(&mut self, id: StreamId) -> &mut Vec<u64> {
        &mut self.slots[id.0].window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_streams_are_told_apart() {
        // Two threads, each walking its own columns with a stride of 4.
        let mut s = Streams::new(Prefetcher::new(4, 64));
        let mut plans = Vec::new();
        for k in 0..3 {
            for base in [2312, 3126] {
                let (_, o) = s.on_fault(base + 4 * k);
                plans.extend(o.plan);
            }
        }
        assert_eq!(plans.len(), 2, "{plans:?}");
        assert!(plans.iter().all(|p| p.stride == 4));
        assert_eq!((plans[0].start, plans[1].start), (2324, 3138));
        // One shared detector never sees the stride in the same faults.
        let mut one = Prefetcher::new(4, 64);
        for k in 0..3 {
            for base in [2312, 3126] {
                let stride = one.on_fault(base + 4 * k).plan.map(|p| p.stride);
                assert_ne!(stride, Some(4));
            }
        }
    }

    #[test]
    fn a_marker_fault_finds_its_stream_and_the_oldest_stream_is_replaced() {
        let mut s = Streams::new(Prefetcher::new(16, 1024));
        for x in [100, 101, 102] {
            s.on_fault(x);
        }
        // The marker of the window from 103 is 111; eight other streams
        // in between would replace it, fewer do not.
        for k in 1..STREAMS as i64 {
            s.on_fault(k * 10_000);
        }
        let (_, o) = s.on_fault(111);
        assert_eq!(o.consumed, 16);
        assert_eq!(o.plan.map(|p| (p.start, p.count)), Some((119, 32)));
        for k in 1..=STREAMS as i64 {
            s.on_fault(k * 10_000 + 500);
        }
        let (_, o) = s.on_fault(135);
        assert_eq!(o, NOTHING, "the stream was replaced");
    }

    #[test]
    fn sequential_stream_grows_window_at_markers() {
        let mut p = Prefetcher::new(16, 1024);
        assert_eq!(p.on_fault(100).plan, None);
        assert_eq!(p.on_fault(101).plan, None);
        let plan = p.on_fault(102).plan.unwrap();
        assert_eq!(
            plan,
            Plan {
                start: 103,
                count: 16,
                stride: 1,
                marker: 111
            }
        );
        // The app reaches the marker: the next window starts where the last
        // one ended, twice as large, with its own marker in the middle.
        let o = p.on_fault(111);
        assert_eq!(o.consumed, 16);
        let plan = o.plan.unwrap();
        assert_eq!((plan.start, plan.count, plan.marker), (119, 32, 135));
        let plan = p.on_fault(135).plan.unwrap();
        assert_eq!((plan.start, plan.count), (151, 64));
    }

    #[test]
    fn window_is_capped() {
        let mut p = Prefetcher::new(16, 32);
        for x in [0, 1, 2] {
            p.on_fault(x);
        }
        let m = p.stream.unwrap().marker;
        let m = p.on_fault(m).plan.unwrap().marker;
        assert_eq!(p.on_fault(m).plan.unwrap().count, 32);
    }

    #[test]
    fn random_faults_do_not_prefetch() {
        let mut p = Prefetcher::new(16, 1024);
        for x in [5, 900, 17, 4000, 33, 2, 777, 12345] {
            assert_eq!(p.on_fault(x).plan, None);
        }
    }

    #[test]
    fn strided_and_descending_streams() {
        let mut p = Prefetcher::new(4, 64);
        for x in [0, 10, 20] {
            p.on_fault(x);
        }
        assert_eq!(p.on_fault(30).plan.unwrap().stride, 10);
        let mut p = Prefetcher::new(4, 64);
        for x in [100, 99, 98] {
            p.on_fault(x);
        }
        let plan = p.on_fault(97).plan.unwrap();
        assert_eq!((plan.stride, plan.start, plan.marker), (-1, 96, 94));
    }

    #[test]
    fn disabled_when_max_window_zero() {
        let mut p = Prefetcher::new(16, 0);
        for x in 0..10 {
            assert_eq!(p.on_fault(x).plan, None);
        }
    }
}
