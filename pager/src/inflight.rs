//! Where the victims of the eviction batch in flight are now.
//!
//! The agent acts on each victim at the address it had when the batch was
//! sent (its *origin*). The app may `mremap` victims meanwhile, so the
//! pager tracks every victim from origin to current address and back:
//! the batch's outcome applies to the page's current address, and only a
//! `REMOVE` at a victim's origin, while the victim is there, can be the
//! agent's own `MADV_DONTNEED`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Page addresses are already unique keys: a multiply-fold hash does, and
/// SipHash cost more than the map itself on the eviction path.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Drop the in-page bits (always zero), spread the rest over both
        // halves: the table indexes by the low bits.
        let h = (x >> 12).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

type PageMap<V> = HashMap<u64, V, BuildHasherDefault<PageHasher>>;

/// Victims in flight: origin ↔ current address.
#[derive(Debug, Default)]
pub struct InFlight {
    /// Origin → current address (`None`: another page was moved over it,
    /// its state is gone).
    now: PageMap<Option<u64>>,
    /// Current address → origin.
    origin: PageMap<u64>,
}

impl InFlight {
    /// A victim leaves from `page`.
    pub fn start(&mut self, page: u64) {
        self.now.insert(page, Some(page));
        self.origin.insert(page, page);
    }

    /// The app moved whatever is at `from` to `to`. Returns the origin of
    /// the victim that moved, if one was at `from`.
    pub fn moved(&mut self, from: u64, to: u64) -> Option<u64> {
        let o = self.origin.remove(&from);
        if let Some(o) = o {
            self.now.insert(o, Some(to));
        }
        // A victim that was at `to` is overwritten by the move.
        if let Some(under) = self.origin.remove(&to) {
            self.now.insert(under, None);
        }
        if let Some(o) = o {
            self.origin.insert(to, o);
        }
        o
    }

    /// The batch ended for the victim from `origin`: its current address,
    /// or `None` when its state was overwritten (or it was never started).
    pub fn finish(&mut self, origin: u64) -> Option<u64> {
        let now = self.now.remove(&origin)??;
        if self.origin.get(&now) == Some(&origin) {
            self.origin.remove(&now);
        }
        Some(now)
    }

    /// Origin of the victim now at `addr`.
    pub fn origin_at(&self, addr: u64) -> Option<u64> {
        self.origin.get(&addr).copied()
    }

    /// Whether a victim in flight left from `addr` (the agent will act
    /// there, whatever the page at `addr` is by then).
    pub fn is_origin(&self, addr: u64) -> bool {
        self.now.contains_key(&addr)
    }

    pub fn clear(&mut self) {
        self.now.clear();
        self.origin.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.now.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_victim_that_does_not_move_ends_where_it_started() {
        let mut f = InFlight::default();
        f.start(0x1000);
        assert_eq!(f.origin_at(0x1000), Some(0x1000));
        assert!(f.is_origin(0x1000));
        assert_eq!(f.finish(0x1000), Some(0x1000));
        assert!(f.is_empty());
        assert_eq!(f.origin_at(0x1000), None);
    }

    #[test]
    fn moves_away_and_back_are_followed() {
        let mut f = InFlight::default();
        f.start(0x1000);
        assert_eq!(f.moved(0x1000, 0x9000), Some(0x1000));
        assert_eq!(f.origin_at(0x9000), Some(0x1000));
        assert_eq!(f.origin_at(0x1000), None);
        assert!(f.is_origin(0x1000));
        assert_eq!(f.moved(0x9000, 0x1000), Some(0x1000));
        assert_eq!(f.origin_at(0x1000), Some(0x1000));
        assert_eq!(f.finish(0x1000), Some(0x1000));
        assert!(f.is_empty());
    }

    #[test]
    fn moving_something_else_is_not_a_victim_move() {
        let mut f = InFlight::default();
        f.start(0x1000);
        assert_eq!(f.moved(0x5000, 0x6000), None);
        assert_eq!(f.finish(0x1000), Some(0x1000));
    }

    #[test]
    fn a_victim_overwritten_by_a_move_has_no_address() {
        let mut f = InFlight::default();
        f.start(0x1000);
        f.start(0x2000);
        // The victim from 0x2000 moves onto the one at 0x1000.
        assert_eq!(f.moved(0x2000, 0x1000), Some(0x2000));
        assert_eq!(f.origin_at(0x1000), Some(0x2000));
        assert_eq!(f.finish(0x1000), None);
        assert_eq!(f.finish(0x2000), Some(0x1000));
        assert!(f.is_empty());
    }

    #[test]
    fn unknown_origins_finish_to_nothing() {
        let mut f = InFlight::default();
        assert_eq!(f.finish(0x1000), None);
    }
}
