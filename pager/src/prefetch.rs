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

const HISTORY: usize = 8;

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

#[cfg(test)]
mod tests {
    use super::*;

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
