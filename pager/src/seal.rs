//! Pages sealed at rest (`--encrypt`): every page written back is encrypted
//! and authenticated with ChaCha20-Poly1305 before it leaves the pager, so
//! memory nodes only ever hold ciphertext, and any change to it (tampering,
//! an older ciphertext replayed, ciphertext moved to another slot) fails to
//! open on fetch.
//!
//! - Key: 256 random bits made at pager start, held only in pager memory
//!   (the page table is there too: a restarted pager cannot use old remote
//!   pages anyway).
//! - Nonce: a 64-bit write counter of this pager (never repeats under one
//!   key), padded to 96 bits. Associated data: the slot id.
//! - Tag and counter are kept here per slot (24 bytes per remote page, only
//!   with `--encrypt`): what was written last to a slot is the only thing
//!   that opens there. Replicas of a slot hold the same ciphertext.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SealError {
    #[error("cannot make an encryption key: {0}")]
    Random(String),
    #[error("the page in slot {0} fails authentication (altered, replayed or misplaced)")]
    Forged(u32),
    #[error("slot {0} holds no sealed page")]
    Unsealed(u32),
}

/// What opens the ciphertext last written to a slot.
#[derive(Debug, Clone, Copy, Default)]
struct Seal {
    tag: [u8; 16],
    /// The write counter used as nonce; 0: never sealed.
    counter: u64,
}

pub struct Sealer {
    cipher: ChaCha20Poly1305,
    next: AtomicU64,
    seals: Mutex<Vec<Seal>>,
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    *Nonce::from_slice(&n)
}

impl Sealer {
    /// A sealer with a fresh random key.
    pub fn new() -> Result<Sealer, SealError> {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| SealError::Random(e.to_string()))?;
        let s = Sealer::with_key(&key);
        key.fill(0);
        Ok(s)
    }

    fn with_key(key: &[u8; 32]) -> Sealer {
        Sealer {
            cipher: ChaCha20Poly1305::new(Key::from_slice(key)),
            next: AtomicU64::new(1),
            seals: Mutex::new(Vec::new()),
        }
    }

    /// Encrypts `page` in place for `slot` and remembers what opens it.
    pub fn seal(&self, slot: u32, page: &mut [u8]) {
        let counter = self.next.fetch_add(1, Ordering::Relaxed);
        let tag = self
            .cipher
            .encrypt_in_place_detached(&nonce(counter), &slot.to_le_bytes(), page)
            .expect("a 4 KiB page is far below ChaCha20-Poly1305's message limit");
        let mut seals = crate::lock(&self.seals);
        let i = slot as usize;
        if seals.len() <= i {
            seals.resize(i + 1, Seal::default());
        }
        seals[i] = Seal {
            tag: tag.into(),
            counter,
        };
    }

    /// Decrypts `page` (as read from `slot`) in place. On failure `page`
    /// holds nothing usable.
    pub fn open(&self, slot: u32, page: &mut [u8]) -> Result<(), SealError> {
        let seal = crate::lock(&self.seals)
            .get(slot as usize)
            .copied()
            .unwrap_or_default();
        if seal.counter == 0 {
            return Err(SealError::Unsealed(slot));
        }
        self.cipher
            .decrypt_in_place_detached(
                &nonce(seal.counter),
                &slot.to_le_bytes(),
                page,
                Tag::from_slice(&seal.tag),
            )
            .map_err(|_| SealError::Forged(slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        (0..4096).map(|i| (i as u8).wrapping_mul(31) ^ b).collect()
    }

    #[test]
    fn a_sealed_page_opens_to_itself_and_is_not_plaintext() {
        let s = Sealer::new().unwrap();
        let want = page(7);
        let mut p = want.clone();
        s.seal(3, &mut p);
        assert_ne!(p, want);
        s.open(3, &mut p).unwrap();
        assert_eq!(p, want);
    }

    #[test]
    fn one_flipped_bit_is_detected() {
        let s = Sealer::new().unwrap();
        let mut p = page(1);
        s.seal(0, &mut p);
        p[1000] ^= 0x10;
        assert!(matches!(s.open(0, &mut p), Err(SealError::Forged(0))));
    }

    #[test]
    fn ciphertext_moved_to_another_slot_is_detected() {
        let s = Sealer::new().unwrap();
        let (mut a, mut b) = (page(1), page(2));
        s.seal(0, &mut a);
        s.seal(1, &mut b);
        assert!(s.open(1, &mut a.clone()).is_err());
        assert!(s.open(0, &mut b.clone()).is_err());
    }

    #[test]
    fn an_older_ciphertext_replayed_is_detected() {
        let s = Sealer::new().unwrap();
        let mut old = page(1);
        s.seal(5, &mut old);
        let mut new = page(2);
        s.seal(5, &mut new);
        assert!(s.open(5, &mut old).is_err());
        s.open(5, &mut new).unwrap();
        assert_eq!(new, page(2));
    }

    #[test]
    fn a_slot_never_sealed_does_not_open() {
        let s = Sealer::new().unwrap();
        assert!(matches!(
            s.open(9, &mut page(0)),
            Err(SealError::Unsealed(9))
        ));
    }

    #[test]
    fn the_same_page_seals_differently_each_time() {
        let s = Sealer::with_key(&[7; 32]);
        let (mut a, mut b) = (page(3), page(3));
        s.seal(0, &mut a);
        s.seal(0, &mut b);
        assert_ne!(a, b, "a nonce was reused");
    }
}
