//! The store every shared counter lives in, and an in-memory copy of Envoy's rules.
//!
//! Envoy keeps one map per `vm_id`, shared by every worker. Its compare-and-set rules,
//! which [`MemoryStore`] reproduces exactly:
//! - every successful `set` stores a new cas taken from one process-wide counter
//!   (starts at 1, increments, skips 0 when it wraps);
//! - `set` on an existing key fails with [`StoreError::CasMismatch`] if `cas != 0` and
//!   `cas` is not the key's current cas; `cas == 0` overwrites unconditionally;
//! - `set` on a missing key creates it and ignores `cas` entirely;
//! - there is no delete.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The key changed since it was read (or, from the limiter, contention outlasted its
    /// bounded retries).
    CasMismatch,
    /// Any other host failure.
    Host(String),
}

/// Get and compare-and-set over Envoy shared data (or a fake of it).
pub trait Store {
    /// The value and its cas, or `None` if the key was never set.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Envoy's `set_shared_data`: see the module documentation for the cas rules.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

impl<S: Store + ?Sized> Store for &S {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// Thread-safe in-memory [`Store`] with Envoy's exact cas rules, so that races between
/// workers can be tested natively with real threads (share it through `&` or `Arc`).
#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                next_cas: 1,
            }),
        }
    }

    /// A store whose next cas is `next_cas`, to test the wrap-around.
    #[cfg(test)]
    fn with_next_cas(next_cas: u32) -> Self {
        let store = Self::new();
        store.lock().next_cas = next_cas.max(1);
        store
    }

    /// Number of keys ever created (there is no delete).
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A panicking test thread must not take the store down with it: the map is always
    /// consistent between statements, so a poisoned lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl Inner {
    /// Envoy's `nextCas`: a process-wide counter that never hands out 0.
    fn take_cas(&mut self) -> u32 {
        let cas = self.next_cas;
        self.next_cas = match self.next_cas.wrapping_add(1) {
            0 => 1,
            next => next,
        };
        cas
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.lock().entries.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some((_, current)) = inner.entries.get(key) {
            if cas != 0 && cas != *current {
                return Err(StoreError::CasMismatch);
            }
        }
        let new_cas = inner.take_cas();
        inner
            .entries
            .insert(key.to_string(), (value.to_vec(), new_cas));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_ignores_cas() {
        let store = MemoryStore::new();
        assert!(store.is_empty());
        assert_eq!(store.get("k"), Ok(None));
        store.set("k", b"a", 12345).unwrap();
        let (value, cas) = store.get("k").unwrap().unwrap();
        assert_eq!(value, b"a");
        assert_ne!(cas, 0);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn stale_cas_is_refused_and_current_cas_wins() {
        let store = MemoryStore::new();
        store.set("k", b"a", 0).unwrap();
        let (_, first) = store.get("k").unwrap().unwrap();
        store.set("k", b"b", first).unwrap();
        let (value, second) = store.get("k").unwrap().unwrap();
        assert_eq!(value, b"b");
        assert_eq!(store.set("k", b"c", first), Err(StoreError::CasMismatch));
        assert_eq!(store.set("k", b"c", u32::MAX), Err(StoreError::CasMismatch));
        assert_eq!(store.get("k").unwrap().unwrap(), (b"b".to_vec(), second));
    }

    #[test]
    fn cas_zero_overwrites_unconditionally() {
        let store = MemoryStore::new();
        store.set("k", b"a", 0).unwrap();
        store.set("k", b"b", 0).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap().0, b"b");
    }

    #[test]
    fn cas_values_are_unique_increasing_and_process_wide() {
        let store = MemoryStore::new();
        let mut seen = Vec::new();
        for i in 0..10u8 {
            let key = if i % 2 == 0 { "a" } else { "b" };
            store.set(key, &[i], 0).unwrap();
            seen.push(store.get(key).unwrap().unwrap().1);
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        // A failed set does not consume a cas.
        let (_, before) = store.get("a").unwrap().unwrap();
        assert_eq!(store.set("a", b"x", 1), Err(StoreError::CasMismatch));
        store.set("a", b"y", before).unwrap();
        assert_eq!(store.get("a").unwrap().unwrap().1, before + 2);
    }

    #[test]
    fn cas_wraps_around_skipping_zero() {
        let store = MemoryStore::with_next_cas(u32::MAX);
        store.set("k", b"a", 0).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap().1, u32::MAX);
        // The one (astronomically rare) case where creating with u32::MAX would not be
        // refused: the key's live cas is u32::MAX itself.
        store.set("k", b"b", u32::MAX).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap().1, 1);
    }

    #[test]
    fn usable_from_many_threads() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        store.set(&format!("{t}-{i}"), b"v", 0).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.len(), 400);
        let mut cas: Vec<u32> = (0..4)
            .flat_map(|t| (0..100).map(move |i| (t, i)))
            .map(|(t, i)| store.get(&format!("{t}-{i}")).unwrap().unwrap().1)
            .collect();
        cas.sort_unstable();
        cas.dedup();
        assert_eq!(cas.len(), 400);
    }
}
