//! The local store: a fixed table of `slots` shared-data keys (`sluice:cache:{n}`), each
//! holding one entry or one fill. A key always maps to the same slot; a new key takes a
//! slot over from an expired or other key's entry (so memory never grows with the number
//! of distinct requests: shared data has no delete), but never from another key's fill in
//! progress. Memory is bounded by `slots` x (the largest `max_entry_bytes` + 54 bytes).

use super::entry::{Fill, Slot};
use super::{CacheKey, Entry, Lookup};
use crate::shared::keys;
use crate::shared::Store;
use crate::shared::{cas_update, Change, CREATE_CAS, GIVE_BACK_ATTEMPTS, TAKE_ATTEMPTS};

/// The slot of `key` in a table of `slots`.
pub fn slot_of(key: &CacheKey, slots: u32) -> u32 {
    let [a, b, c, d, ..] = key.0;
    u32::from_le_bytes([a, b, c, d]) % slots.max(1)
}

/// Finds `key`; if nobody is fetching it, makes the caller its fetcher until
/// `now_ms + fill_ms`.
pub fn lookup(store: &dyn Store, slots: u32, key: CacheKey, now_ms: u64, fill_ms: u64) -> Lookup {
    let slot = keys::cache_slot(slot_of(&key, slots));
    let claim = Fill {
        key,
        until_ms: now_ms.saturating_add(fill_ms),
    };
    let found = cas_update(store, &slot, CREATE_CAS, TAKE_ATTEMPTS, |value| {
        match Slot::decode(value) {
            Slot::Entry(entry) if entry.key == key && entry.is_fresh(now_ms) => {
                Change::Keep(Lookup::Hit(entry))
            }
            Slot::Fill(fill) if fill.until_ms > now_ms => Change::Keep(if fill.key == key {
                Lookup::Filling
            } else {
                Lookup::Unavailable
            }),
            // Empty, expired, another key's entry, or a fill that ran out: take it.
            _ => Change::Write(claim.encode(), Lookup::Fill),
        }
    });
    found.unwrap_or(Lookup::Unavailable)
}

/// Stores `entry` in its slot, unless another key's fill holds the slot. True if stored.
pub fn put(store: &dyn Store, slots: u32, entry: &Entry, now_ms: u64) -> bool {
    let slot = keys::cache_slot(slot_of(&entry.key, slots));
    let value = entry.encode();
    let stored =
        cas_update(
            store,
            &slot,
            CREATE_CAS,
            GIVE_BACK_ATTEMPTS,
            |current| match Slot::decode(current) {
                Slot::Fill(fill) if fill.key != entry.key && fill.until_ms > now_ms => {
                    Change::Keep(false)
                }
                _ => Change::Write(value.clone(), true),
            },
        );
    stored.unwrap_or(false)
}

/// Gives up the fill of `key` (its fetch failed or was not storable): the slot is free
/// again, and the next identical request fetches instead.
pub fn release(store: &dyn Store, slots: u32, key: CacheKey) -> bool {
    let slot = keys::cache_slot(slot_of(&key, slots));
    let expired = Fill { key, until_ms: 0 }.encode();
    let released = cas_update(store, &slot, CREATE_CAS, GIVE_BACK_ATTEMPTS, |current| {
        match Slot::decode(current) {
            Slot::Fill(fill) if fill.key == key => Change::Write(expired.clone(), true),
            // Someone else's now, or stored: nothing of ours to give back.
            _ => Change::Keep(false),
        }
    });
    released.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shared::MemoryStore;

    fn entry(key: CacheKey, now: u64) -> Entry {
        Entry {
            key,
            stored_at_ms: now,
            expires_at_ms: now + 1_000,
            content_type: "application/json".into(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn one_fetcher_then_hits_until_expiry() {
        let store = MemoryStore::new();
        let key = CacheKey([1; 32]);
        assert_eq!(lookup(&store, 8, key, 0, 500), Lookup::Fill);
        assert_eq!(lookup(&store, 8, key, 10, 500), Lookup::Filling);
        assert!(put(&store, 8, &entry(key, 20), 20));
        assert_eq!(lookup(&store, 8, key, 30, 500), Lookup::Hit(entry(key, 20)));
        // Expired: the next request fetches it again.
        assert_eq!(lookup(&store, 8, key, 1_020, 500), Lookup::Fill);
        assert_eq!(store.len(), 1, "one slot key, whatever happened");
    }

    #[test]
    fn a_released_or_stale_fill_is_taken_over() {
        let store = MemoryStore::new();
        let key = CacheKey([2; 32]);
        assert_eq!(lookup(&store, 8, key, 0, 500), Lookup::Fill);
        assert!(release(&store, 8, key));
        assert_eq!(lookup(&store, 8, key, 1, 500), Lookup::Fill);
        // The fetcher died: after its fill runs out, another request fetches.
        assert_eq!(lookup(&store, 8, key, 400, 500), Lookup::Filling);
        assert_eq!(lookup(&store, 8, key, 501, 500), Lookup::Fill);
    }

    #[test]
    fn colliding_keys_overwrite_entries_but_never_a_fill_in_progress() {
        let store = MemoryStore::new();
        let a = CacheKey([3; 32]);
        let mut b = [9; 32];
        b[..4].copy_from_slice(&a.0[..4]);
        let b = CacheKey(b);
        assert_eq!(slot_of(&a, 8), slot_of(&b, 8));
        assert_eq!(lookup(&store, 8, a, 0, 500), Lookup::Fill);
        assert_eq!(lookup(&store, 8, b, 1, 500), Lookup::Unavailable);
        assert!(
            !put(&store, 8, &entry(b, 2), 2),
            "b must not break a's fill"
        );
        assert!(!release(&store, 8, b));
        assert!(put(&store, 8, &entry(a, 3), 3));
        // b's request finds a's entry: a miss that takes the slot over.
        assert_eq!(lookup(&store, 8, b, 4, 500), Lookup::Fill);
        assert!(put(&store, 8, &entry(b, 5), 5));
        assert_eq!(lookup(&store, 8, a, 6, 500), Lookup::Fill);
    }

    #[test]
    fn memory_is_bounded_by_the_slot_count() {
        let store = MemoryStore::new();
        for i in 0..1_000u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[4] = 1;
            let key = CacheKey(k);
            if lookup(&store, 16, key, u64::from(i), 1) == Lookup::Fill {
                put(&store, 16, &entry(key, u64::from(i)), u64::from(i));
            }
        }
        assert_eq!(store.len(), 16);
    }

    #[test]
    fn racing_workers_elect_one_fetcher() {
        let store = std::sync::Arc::new(MemoryStore::new());
        let key = CacheKey([5; 32]);
        let fills: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        (0..50)
                            .filter(|_| lookup(&*store, 4, key, 0, 10_000) == Lookup::Fill)
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(fills, 1);
    }
}
