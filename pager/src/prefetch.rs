//! Stream detection for prefetch, per app. Demand faults that reach a
//! memory node feed a short history; when most recent deltas agree
//! (majority trend, as in Leap), the stride is taken as a stream and the
//! next `window` pages along it are fetched. A fault exactly where the last
//! window ended means the window was consumed: the window doubles, up to
//! the maximum. Anything else starts over with the initial window.
//!
//! Pages installed ahead of use cannot be seen being read (no access bits),
//! so a stream continuing past a window counts that window's pages as hits.

const HISTORY: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// First page number to fetch.
    pub start: i64,
    /// Pages to fetch.
    pub count: usize,
    /// Distance between them, in pages (negative for descending streams).
    pub stride: i64,
}

#[derive(Debug, Clone)]
pub struct Prefetcher {
    hist: [i64; HISTORY],
    len: usize,
    min_window: usize,
    max_window: usize,
    window: usize,
    /// Where the current stream's next demand fault is expected, and the
    /// window issued before it.
    expect: Option<(i64, i64, usize)>,
}

/// What a fault told the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub plan: Option<Plan>,
    /// Pages of the previous window now known to have been used.
    pub consumed: usize,
}

impl Prefetcher {
    /// Windows in pages; `max_window == 0` disables prefetch.
    pub fn new(min_window: usize, max_window: usize) -> Prefetcher {
        Prefetcher {
            hist: [0; HISTORY],
            len: 0,
            min_window,
            max_window,
            window: min_window,
            expect: None,
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

    /// A demand fault on page number `page` that had to go remote.
    pub fn on_fault(&mut self, page: i64) -> Outcome {
        if self.max_window == 0 {
            return Outcome {
                plan: None,
                consumed: 0,
            };
        }
        if let Some((next, stride, issued)) = self.expect {
            if page == next {
                // The stream went through the whole window: grow it.
                self.window = (self.window * 2).min(self.max_window);
                self.push(page);
                return self.issue(page, stride, issued);
            }
        }
        self.push(page);
        match self.trend() {
            Some(stride) => {
                self.window = self.min_window;
                self.issue(page, stride, 0)
            }
            None => {
                self.window = self.min_window;
                self.expect = None;
                Outcome {
                    plan: None,
                    consumed: 0,
                }
            }
        }
    }

    fn issue(&mut self, page: i64, stride: i64, consumed: usize) -> Outcome {
        let plan = Plan {
            start: page + stride,
            count: self.window,
            stride,
        };
        self.expect = Some((
            page + stride * (self.window as i64 + 1),
            stride,
            self.window,
        ));
        Outcome {
            plan: Some(plan),
            consumed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_stream_grows_window() {
        let mut p = Prefetcher::new(16, 1024);
        assert_eq!(p.on_fault(100).plan, None);
        assert_eq!(p.on_fault(101).plan, None);
        let o = p.on_fault(102);
        assert_eq!(
            o.plan,
            Some(Plan {
                start: 103,
                count: 16,
                stride: 1
            })
        );
        // Next demand fault right after the window: window consumed, doubled.
        let o = p.on_fault(103 + 16);
        assert_eq!(o.consumed, 16);
        assert_eq!(o.plan.unwrap().count, 32);
        let o = p.on_fault(120 + 32);
        assert_eq!(o.plan.unwrap().count, 64);
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
        assert_eq!(p.on_fault(97).plan.unwrap().stride, -1);
    }

    #[test]
    fn disabled_when_max_window_zero() {
        let mut p = Prefetcher::new(16, 0);
        for x in 0..10 {
            assert_eq!(p.on_fault(x).plan, None);
        }
    }
}
