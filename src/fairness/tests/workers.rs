//! Store failures, worker ids, the tenant hash, and real threads racing on one queue.

use super::*;
use crate::shared::testing::RacyStore;
use crate::shared::{keys, CasFailure, Store, StoreError};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};

// ---------------------------------------------------------------------------------------
// Store failures, ids, hash

struct FailingStore {
    error: StoreError,
}

impl Store for FailingStore {
    fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(Some((Vec::new(), 5)))
    }

    fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
        Err(self.error.clone())
    }
}

#[test]
fn store_failures_and_contention_are_reported() {
    let host = FailingStore {
        error: StoreError::Host("down".into()),
    };
    let q = FairQueue::new(&host, KEY, 1);
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Failed(CasFailure::Host("down".into()))
    );
    assert_eq!(q.release(), Ok(()), "nothing to release in an empty value");
    let busy = FailingStore {
        error: StoreError::CasMismatch,
    };
    let q = FairQueue::new(&busy, KEY, 1);
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Failed(CasFailure::Contended)
    );
    let q0 = FairQueue::new(&busy, KEY, 0);
    assert_eq!(
        q0.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Failed(CasFailure::Contended)
    );
    assert_eq!(allocate_worker_id(&busy), Err(StoreError::CasMismatch));
    assert_eq!(
        allocate_worker_id(&host),
        Err(StoreError::Host("down".into()))
    );
}

#[test]
fn worker_ids_are_unique_across_threads() {
    let store = Arc::new(MemoryStore::new());
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| allocate_worker_id(&*store).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut ids: Vec<u32> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (1..=400).collect::<Vec<_>>());
    // A foreign value restarts the count rather than failing.
    let store = MemoryStore::new();
    store.set(keys::WORKERS, b"x", 0).unwrap();
    assert_eq!(allocate_worker_id(&store), Ok(1));
    assert_eq!(allocate_worker_id(&store), Ok(2));
}

#[test]
fn tenant_hash_is_fnv1a() {
    assert_eq!(tenant_hash(""), 0x811c_9dc5);
    assert_eq!(tenant_hash("a"), 0xe40c_292c);
    assert_eq!(tenant_hash("foobar"), 0xbf9c_f968);
    assert_ne!(tenant_hash("acme"), tenant_hash("acme2"));
}

// ---------------------------------------------------------------------------------------
// Real threads

#[test]
fn in_flight_never_exceeds_capacity_across_threads() {
    const THREADS: u32 = 8;
    const CAPACITY: u32 = 3;
    let store = Arc::new(RacyStore::default());
    let held_total = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let start = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (store, held_total, peak, start) = (
                store.clone(),
                held_total.clone(),
                peak.clone(),
                start.clone(),
            );
            std::thread::spawn(move || {
                let worker = allocate_worker_id(&*store).unwrap();
                let q = FairQueue::new(&*store, KEY, CAPACITY);
                let mut rng = Rng(u64::from(thread) + 1);
                let mut waiting: Vec<u32> = Vec::new();
                let mut held = 0u32;
                let mut served = 0u32;
                // A slot is counted after the store granted it and uncounted before it is
                // given back, so the count never exceeds the store's in_flight.
                let take = |n: u32| {
                    let now = held_total.fetch_add(n, Ordering::SeqCst) + n;
                    assert!(now <= CAPACITY, "{now} slots held");
                    peak.fetch_max(now, Ordering::SeqCst);
                };
                start.wait();
                for context in 0..400u32 {
                    match rng.below(6) {
                        0 | 1 => {
                            let t = ticket(rng.below(5) as u32, 1 + rng.below(3) as u8, 1);
                            match q.arrive(owner(worker, context), t, T0) {
                                Arrival::Admitted => {
                                    take(1);
                                    held += 1;
                                    served += 1;
                                }
                                Arrival::Queued { .. } => waiting.push(context),
                                Arrival::Failed(CasFailure::Contended) | Arrival::QueueFull => {}
                                other => panic!("{other:?}"),
                            }
                        }
                        2 | 3 if held > 0 => {
                            held_total.fetch_sub(1, Ordering::SeqCst);
                            while q.release().is_err() {}
                            held -= 1;
                        }
                        4 if !waiting.is_empty() => {
                            let i = rng.below(waiting.len() as u64) as usize;
                            if let Ok(removed) = q.cancel(owner(worker, waiting[i])) {
                                assert!(removed);
                                waiting.swap_remove(i);
                            }
                        }
                        _ => {}
                    }
                    if let Ok(claimed) = q.claim_for_worker(worker, T0) {
                        for o in claimed {
                            assert_eq!(o.worker, worker);
                            take(1);
                            held += 1;
                            served += 1;
                            waiting.retain(|&c| c != o.context);
                        }
                    }
                }
                // Wind down: give back every slot, cancel every waiter.
                while held > 0 {
                    held_total.fetch_sub(1, Ordering::SeqCst);
                    while q.release().is_err() {}
                    held -= 1;
                }
                for context in waiting {
                    loop {
                        match q.cancel(owner(worker, context)) {
                            Ok(removed) => {
                                assert!(removed);
                                break;
                            }
                            Err(_) => continue,
                        }
                    }
                }
                served
            })
        })
        .collect();
    let served: u32 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(store.mismatches() > 0, "never raced");
    assert_eq!(peak.load(Ordering::SeqCst), CAPACITY);
    println!("served {served}, peak {}", peak.load(Ordering::SeqCst));
    assert!(served > 50, "{served}");
    let q = FairQueue::new(&store.inner, KEY, CAPACITY);
    assert_idle(&q.stats().unwrap());
}
