//! This worker's requests waiting for an identical request's fill (local store): every
//! tick, one lookup per key decides for all its waiters.

use super::{CacheKey, Lookup};

#[derive(Debug)]
struct Waiter {
    context: u32,
    key: CacheKey,
    fill_ms: u64,
    deadline_ms: u64,
}

#[derive(Debug, Default)]
pub struct CacheWaiters {
    /// In arrival order: the oldest waiter fetches when a fill is given up.
    waiting: Vec<Waiter>,
}

impl CacheWaiters {
    /// Stream `context` waits for `key` until `deadline_ms`; it takes over a given-up fill
    /// for `fill_ms`.
    pub fn add(&mut self, context: u32, key: CacheKey, fill_ms: u64, deadline_ms: u64) {
        self.waiting.push(Waiter {
            context,
            key,
            fill_ms,
            deadline_ms,
        });
    }

    /// The stream ended.
    pub fn forget(&mut self, context: u32) {
        self.waiting.retain(|w| w.context != context);
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Looks each waited-for key up once (`lookup(key, fill_ms)`) and returns what each
    /// stream that stops waiting gets: the entry, the fill (one waiter per key), or
    /// `Unavailable` once its wait ran out (it goes upstream without the cache).
    pub fn poll(
        &mut self,
        now_ms: u64,
        mut lookup: impl FnMut(CacheKey, u64) -> Lookup,
    ) -> Vec<(u32, Lookup)> {
        let mut done = Vec::new();
        let mut decided: Vec<(CacheKey, Lookup)> = Vec::new();
        let mut kept = Vec::with_capacity(self.waiting.len());
        for waiter in std::mem::take(&mut self.waiting) {
            let found = match decided.iter().position(|(k, _)| *k == waiter.key) {
                Some(i) => i,
                None => {
                    decided.push((waiter.key, lookup(waiter.key, waiter.fill_ms)));
                    decided.len() - 1
                }
            };
            let Some((_, result)) = decided.get_mut(found) else {
                continue;
            };
            let mine = match result {
                Lookup::Hit(entry) => Some(Lookup::Hit(entry.clone())),
                // Only one waiter fetches: the others wait for its fill.
                Lookup::Fill => Some(std::mem::replace(result, Lookup::Filling)),
                Lookup::Filling => None,
                Lookup::Unavailable => Some(Lookup::Unavailable),
            };
            match mine {
                Some(outcome) => done.push((waiter.context, outcome)),
                None if now_ms >= waiter.deadline_ms => {
                    done.push((waiter.context, Lookup::Unavailable));
                }
                None => kept.push(waiter),
            }
        }
        self.waiting = kept;
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Entry;

    fn entry(key: CacheKey) -> Entry {
        Entry {
            key,
            stored_at_ms: 0,
            expires_at_ms: 10,
            content_type: "application/json".into(),
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn one_lookup_per_key_decides_every_waiter() {
        let (a, b) = (CacheKey([1; 32]), CacheKey([2; 32]));
        let mut waiters = CacheWaiters::default();
        for context in 1..=3 {
            waiters.add(context, a, 100, 1_000);
        }
        waiters.add(4, b, 100, 1_000);
        let mut lookups = 0;
        let done = waiters.poll(5, |key, _| {
            lookups += 1;
            if key == a {
                Lookup::Hit(entry(a))
            } else {
                Lookup::Filling
            }
        });
        assert_eq!(lookups, 2);
        assert_eq!(done.len(), 3);
        assert!(done.iter().all(|(_, l)| *l == Lookup::Hit(entry(a))));
        assert!(!waiters.is_empty());
        // b's wait runs out.
        assert_eq!(
            waiters.poll(1_000, |_, _| Lookup::Filling),
            vec![(4, Lookup::Unavailable)]
        );
        assert!(waiters.is_empty());
    }

    #[test]
    fn a_given_up_fill_goes_to_the_oldest_waiter_only() {
        let key = CacheKey([1; 32]);
        let mut waiters = CacheWaiters::default();
        for context in [7, 8, 9] {
            waiters.add(context, key, 100, 1_000);
        }
        waiters.forget(8);
        let done = waiters.poll(5, |_, _| Lookup::Fill);
        assert_eq!(done, vec![(7, Lookup::Fill)]);
        let done = waiters.poll(6, |_, _| Lookup::Filling);
        assert!(done.is_empty());
        assert!(!waiters.is_empty());
    }
}
