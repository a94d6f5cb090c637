//! Store fakes for tests that make workers really race.

use super::{MemoryStore, Store, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};

/// SplitMix64: deterministic pseudo-random numbers for the tests.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// SplitMix64's output function: a well-mixed pseudo-random number from a counter.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A [`MemoryStore`] shared by threads that often yields the CPU right after a read, so
/// other threads write between a read and its compare-and-set far more often than by
/// chance; it counts the writes refused for a stale cas.
#[derive(Default)]
pub(crate) struct RacyStore {
    pub(crate) inner: MemoryStore,
    reads: AtomicU64,
    mismatches: AtomicU64,
}

impl RacyStore {
    /// Writes refused for a stale cas so far: more than 0 proves the threads raced.
    pub(crate) fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }
}

impl Store for RacyStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let value = self.inner.get(key);
        // After about half the reads, pseudo-randomly: yielding after every read runs the
        // threads in lockstep, where one thread wins every race and the others starve.
        if mix(self.reads.fetch_add(1, Ordering::Relaxed)) & 1 == 0 {
            std::thread::yield_now();
        }
        value
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let result = self.inner.set(key, value, cas);
        if result == Err(StoreError::CasMismatch) {
            self.mismatches.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}
