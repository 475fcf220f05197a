//! Fork snapshots: what a forked child needs of the pages that were out of
//! its parent (in the cache tier or on a memory node) at the fork, so that
//! the parent need not bring its whole heap back before forking.
//!
//! A child of a plain `fork()` inherits the pages present in its parent,
//! copy-on-write, but none of the pager's: those it must take from the
//! pager. The snapshot is taken when the pager answers the parent's `Hold`
//! (evictions stopped, the parent's arena lock held by the forking thread
//! until after the fork, so nothing but fetches changes its pages until
//! then):
//!
//! - a page on a memory node: its slot, with a reference of the snapshot's
//!   own (the parent may free or rewrite the page after the fork; slots are
//!   never overwritten, so the copy stays what it was);
//! - a page in the cache tier: a copy of its bytes (the parent may take it
//!   back and write it).
//!
//! The child adopts from the snapshot every page that is absent from its
//! page tables (`Session::adopt`); a page present there was fetched by the
//! parent between the snapshot and the fork and is the child's own copy.
//! The snapshot lives until the child has adopted it or the hold ends (the
//! parent's and the child's copies of the hold connection are closed), even
//! when the parent's session ends first: a parent may exit right after
//! forking. Its key is random, known only to the parent and its child.

use crate::pager::Pager;
use crate::pages::{Place, NO_SLOT};
use crate::placement::SlotSpace;
use crate::session::Session;
use crate::sys::PAGE;

/// A page out of the parent at the fork, as the child will take it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutPage {
    /// On a memory node: the slot (one reference held) and its checksum.
    Remote { page: u64, slot: u32, crc: u32 },
    /// In the cache tier: its bytes at `at` in the snapshot's data.
    Cached { page: u64, at: usize },
}

impl OutPage {
    pub fn page(&self) -> u64 {
        match *self {
            OutPage::Remote { page, .. } | OutPage::Cached { page, .. } => page,
        }
    }
}

/// The parent's out pages at the fork, ascending by address.
pub struct ForkSnapshot {
    /// The parent's session.
    pub session: u64,
    pub pages: Vec<OutPage>,
    pub data: Vec<u8>,
}

impl ForkSnapshot {
    /// Takes the snapshot of `s`'s out pages. The caller holds evictions
    /// back (`Session::hold`). The `mm` lock is taken so that every address
    /// event already read (a DONTNEED the app has returned from) has been
    /// applied to the page state.
    pub fn take(s: &Session, pager: &Pager) -> ForkSnapshot {
        let _mm = s.mm.read().unwrap_or_else(|p| p.into_inner());
        let mut st = s.lock();
        let mut pages = Vec::new();
        let mut data = Vec::new();
        for (page, m) in st.table.all_mut() {
            match m.place {
                Place::Remote | Place::Fetching if m.slot != NO_SLOT => {
                    pager.space.incref(m.slot);
                    pages.push(OutPage::Remote {
                        page,
                        slot: m.slot,
                        crc: m.crc,
                    });
                }
                Place::Cached => {
                    let at = data.len();
                    data.resize(at + PAGE, 0);
                    pager.cache.read(m.frame, &mut data[at..]);
                    pages.push(OutPage::Cached { page, at });
                }
                _ => {}
            }
        }
        drop(st);
        // Regions are listed in no particular order.
        pages.sort_unstable_by_key(OutPage::page);
        ForkSnapshot {
            session: s.id,
            pages,
            data,
        }
    }

    /// Bytes of a cached page.
    pub fn bytes(&self, at: usize) -> &[u8] {
        &self.data[at..at + PAGE]
    }

    /// Gives back the references of the remote pages in `pages` (those the
    /// child did not take over).
    pub fn release(pages: &[OutPage], space: &SlotSpace) {
        for p in pages {
            if let OutPage::Remote { slot, .. } = *p {
                space.decref(slot);
            }
        }
    }
}

/// A fresh snapshot key: random, never 0 (which means "none").
pub fn new_key() -> u64 {
    loop {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).expect("the OS random source failed");
        let k = u64::from_le_bytes(b);
        if k != 0 {
            return k;
        }
    }
}
