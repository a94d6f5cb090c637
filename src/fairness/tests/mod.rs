//! Queue behaviour over the store: ordering (strict priority, weighted SFQ) and work
//! conservation here; bounds, cancellation, expiry and the stored value in `bounds.rs`;
//! store failures, worker ids and real threads in `workers.rs`; a whole multi-worker
//! scenario in `simulation.rs`. Time is always injected.

mod bounds;
mod simulation;
mod workers;

use super::state::{cost_of, State};
use super::*;
use crate::shared::testing::Rng;
use crate::shared::MemoryStore;

const KEY: &str = "sluice:q:test";
const T0: u64 = 1_769_900_000_000;
const HOUR: u64 = 3_600_000;

fn owner(worker: u32, context: u32) -> Owner {
    Owner { worker, context }
}

fn ticket(tenant: u32, priority: u8, weight: u32) -> Ticket {
    Ticket {
        tenant,
        priority,
        weight,
        max_queue_length: 10_000,
        deadline_ms: T0 + HOUR,
    }
}

fn state(store: &MemoryStore) -> State {
    State::decode(store.get(KEY).unwrap().map(|(v, _)| v).as_deref())
}

fn value_len(store: &MemoryStore) -> usize {
    store.get(KEY).unwrap().map_or(0, |(v, _)| v.len())
}

/// Nothing in flight, nothing waiting (the priorities seen stay listed, at zero).
pub(crate) fn assert_idle(stats: &QueueStats) {
    assert_eq!((stats.in_flight, stats.waiting), (0, 0), "{stats:?}");
    assert!(stats.by_priority.iter().all(|&(_, n)| n == 0), "{stats:?}");
}

/// Queues (capacity 0) one waiter per `(context, ticket)`, all owned by worker 1.
fn queue_all(store: &MemoryStore, waiters: &[(u32, Ticket)]) {
    let owned: Vec<_> = waiters.iter().map(|&(c, t)| (owner(1, c), t)).collect();
    queue_all_of(store, &owned);
}

/// Queues (capacity 0) one waiter per `(owner, ticket)` at `T0`.
fn queue_all_of(store: &MemoryStore, waiters: &[(Owner, Ticket)]) {
    let q = FairQueue::new(store, KEY, 0);
    for &(o, t) in waiters {
        assert!(
            matches!(q.arrive(o, t, T0), Arrival::Queued { .. }),
            "{o:?}"
        );
    }
}

/// Serves `n` waiters one at a time (capacity 1, release after each); their contexts in
/// service order.
fn serve(store: &MemoryStore, n: usize) -> Vec<u32> {
    let q = FairQueue::new(store, KEY, 1);
    (0..n)
        .map(|_| {
            let claimed = q.claim_for_worker(1, T0).unwrap();
            assert_eq!(claimed.len(), 1, "{claimed:?}");
            q.release().unwrap();
            claimed[0].context
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Ordering

#[test]
fn priority_is_strict() {
    let store = MemoryStore::new();
    let mut waiters = Vec::new();
    for i in 0..5 {
        waiters.push((100 + i, ticket(1, 1, 100))); // bronze, huge weight
        waiters.push((200 + i, ticket(2, 2, 1)));
        waiters.push((300 + i, ticket(3, 3, 1)));
    }
    queue_all(&store, &waiters);
    let order = serve(&store, 15);
    assert_eq!(
        order,
        [300, 301, 302, 303, 304, 200, 201, 202, 203, 204, 100, 101, 102, 103, 104]
    );
}

#[test]
fn sfq_shares_by_weight_whatever_the_backlog_order() {
    let store = MemoryStore::new();
    // All of B first, then all of A: arrival order must not matter.
    let mut waiters: Vec<(u32, Ticket)> = (0..30).map(|i| (2000 + i, ticket(2, 1, 1))).collect();
    waiters.extend((0..30).map(|i| (1000 + i, ticket(1, 1, 2))));
    queue_all(&store, &waiters);
    let order = serve(&store, 30);
    let a = order.iter().filter(|&&c| c < 2000).count();
    assert!((19..=21).contains(&a), "A served {a} of 30: {order:?}");
    // Each tenant's own requests stay FIFO.
    let a_order: Vec<u32> = order.iter().copied().filter(|&c| c < 2000).collect();
    assert!(a_order.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn a_small_backlog_is_not_stuck_behind_a_large_one() {
    let store = MemoryStore::new();
    let mut waiters: Vec<(u32, Ticket)> = (0..100).map(|i| (1000 + i, ticket(1, 1, 1))).collect();
    waiters.extend((0..3).map(|i| (2000 + i, ticket(2, 1, 1))));
    queue_all(&store, &waiters);
    let q = FairQueue::new(&store, KEY, 0);
    // Best-effort positions already say so.
    assert_eq!(
        q.arrive(owner(1, 2000), ticket(2, 1, 1), T0),
        Arrival::Queued { position: 1 }
    );
    let order = serve(&store, 6);
    let small = order.iter().filter(|&&c| c >= 2000).count();
    assert_eq!(small, 3, "{order:?}");
}

#[test]
fn positions_follow_service_order() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Queued { position: 0 }
    );
    assert_eq!(
        q.arrive(owner(1, 2), ticket(1, 1, 1), T0),
        Arrival::Queued { position: 1 }
    );
    // Another tenant's first request goes between A's first and second.
    assert_eq!(
        q.arrive(owner(1, 3), ticket(2, 1, 1), T0),
        Arrival::Queued { position: 1 }
    );
    // Gold goes first.
    assert_eq!(
        q.arrive(owner(1, 4), ticket(3, 3, 1), T0),
        Arrival::Queued { position: 0 }
    );
    assert_eq!(serve(&store, 4), [4, 1, 3, 2]);
}

#[test]
fn virtual_time_never_decreases() {
    let store = MemoryStore::new();
    let mut seen: std::collections::HashMap<u8, u64> = Default::default();
    let mut rng = Rng(7);
    let mut held = 0;
    let mut next_context = 0;
    for step in 0..3000 {
        let q = FairQueue::new(&store, KEY, 3);
        match rng.below(4) {
            0 | 1 => {
                next_context += 1;
                let t = ticket(
                    rng.below(6) as u32,
                    1 + rng.below(3) as u8,
                    1 + rng.below(4) as u32,
                );
                if q.arrive(owner(1, next_context), t, T0) == Arrival::Admitted {
                    held += 1;
                }
            }
            2 if held > 0 => {
                q.release().unwrap();
                held -= 1;
                held += q.claim_for_worker(1, T0).unwrap().len();
            }
            _ => {
                let _ = q.cancel(owner(1, rng.below(next_context as u64 + 1) as u32));
            }
        }
        for class in state(&store).classes {
            let last = seen.entry(class.priority).or_insert(0);
            assert!(class.vtime >= *last, "step {step}: V went back");
            *last = class.vtime;
        }
        assert_eq!(state(&store).in_flight as usize, held);
    }
    assert!(seen.values().any(|&v| v > 10 * COST), "{seen:?}");
}

// ---------------------------------------------------------------------------------------
// Slots

#[test]
fn work_conserving_a_lone_tenant_uses_all_capacity() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 4);
    for c in 0..4 {
        assert_eq!(
            q.arrive(owner(1, c), ticket(1, 1, 1), T0),
            Arrival::Admitted
        );
    }
    assert_eq!(
        q.arrive(owner(1, 4), ticket(1, 1, 1), T0),
        Arrival::Queued { position: 0 }
    );
    assert_eq!(q.claim_for_worker(1, T0).unwrap(), []);
    q.release().unwrap();
    assert_eq!(q.claim_for_worker(1, T0).unwrap(), [owner(1, 4)]);
    let stats = q.stats().unwrap();
    assert_eq!((stats.in_flight, stats.waiting), (4, 0));
    // Nothing waits: the stored value is just the header and the class.
    assert!(value_len(&store) <= 16 + 11, "{}", value_len(&store));
}

#[test]
fn a_free_slot_goes_to_an_arrival_only_if_it_is_next_in_order() {
    let store = MemoryStore::new();
    let full = FairQueue::new(&store, KEY, 1);
    assert_eq!(
        full.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Admitted
    );
    assert!(matches!(
        full.arrive(owner(2, 1), ticket(1, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    full.release().unwrap();
    // The slot is free but worker 2's bronze waiter is next: another bronze arrival
    // queues behind it, a gold arrival goes first.
    assert!(matches!(
        full.arrive(owner(3, 1), ticket(2, 1, 1), T0),
        Arrival::Queued { position: 1 }
    ));
    assert_eq!(
        full.arrive(owner(3, 2), ticket(3, 3, 1), T0),
        Arrival::Admitted
    );
    assert_eq!(full.claim_for_worker(2, T0).unwrap(), []);
    full.release().unwrap();
    // Worker 3 cannot take worker 2's turn.
    assert_eq!(full.claim_for_worker(3, T0).unwrap(), []);
    assert_eq!(full.claim_for_worker(2, T0).unwrap(), [owner(2, 1)]);
}

#[test]
fn a_worker_claims_its_waiters_within_the_free_slots() {
    let store = MemoryStore::new();
    let q0 = FairQueue::new(&store, KEY, 0);
    // Tenant 1: worker 1 then worker 2; tenant 2: worker 2.
    for (o, t) in [(owner(1, 1), 1), (owner(2, 1), 1), (owner(2, 2), 2)] {
        assert!(matches!(
            q0.arrive(o, ticket(t, 1, 1), T0),
            Arrival::Queued { .. }
        ));
    }
    // Order: (1,1) S=0, (2,2) S=0 seq 3, (2,1) S=COST. Two free slots: worker 2 takes
    // (2,2), the second in order, without waiting for worker 1.
    let q = FairQueue::new(&store, KEY, 2);
    assert_eq!(q.claim_for_worker(2, T0).unwrap(), [owner(2, 2)]);
    // One slot left, and worker 1's waiter is the head.
    assert_eq!(q.claim_for_worker(2, T0).unwrap(), []);
    assert_eq!(q.claim_for_worker(1, T0).unwrap(), [owner(1, 1)]);
    assert_eq!(q.stats().unwrap().in_flight, 2);
    // With three slots, a waiter in the window behind another worker's waiter of the same
    // tenant still waits for it (per-tenant FIFO).
    let store = MemoryStore::new();
    let q0 = FairQueue::new(&store, KEY, 0);
    for o in [owner(1, 1), owner(2, 1)] {
        assert!(matches!(
            q0.arrive(o, ticket(1, 1, 1), T0),
            Arrival::Queued { .. }
        ));
    }
    let q = FairQueue::new(&store, KEY, 3);
    assert_eq!(q.claim_for_worker(2, T0).unwrap(), []);
    assert_eq!(q.claim_for_worker(1, T0).unwrap(), [owner(1, 1)]);
    assert_eq!(q.claim_for_worker(2, T0).unwrap(), [owner(2, 1)]);
}

#[test]
fn claims_return_several_owners_in_service_order() {
    let store = MemoryStore::new();
    queue_all(
        &store,
        &[
            (1, ticket(1, 1, 1)),
            (2, ticket(1, 1, 1)),
            (3, ticket(2, 2, 1)),
        ],
    );
    let q = FairQueue::new(&store, KEY, 10);
    assert_eq!(
        q.claim_for_worker(1, T0).unwrap(),
        [owner(1, 3), owner(1, 1), owner(1, 2)]
    );
    assert_eq!(q.stats().unwrap().in_flight, 3);
}

#[test]
fn stats_count_waiters_by_priority() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 1);
    assert_eq!(q.stats().unwrap(), QueueStats::default());
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Admitted
    );
    for (c, p) in [(2, 1), (3, 3), (4, 3)] {
        assert!(matches!(
            q.arrive(owner(1, c), ticket(c, p, 1), T0),
            Arrival::Queued { .. }
        ));
    }
    let stats = q.stats().unwrap();
    assert_eq!((stats.in_flight, stats.waiting), (1, 3));
    assert_eq!(stats.by_priority, [(3, 2), (1, 1)]);
    assert_eq!(stats.waiting_by_priority(), [(3, 2), (1, 1)]);
    for c in [2, 3, 4] {
        assert!(q.cancel(owner(1, c)).unwrap());
    }
    q.release().unwrap();
    assert_eq!(q.stats().unwrap().waiting_by_priority(), [(3, 0), (1, 0)]);
}

#[test]
fn release_never_goes_below_zero() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 2);
    q.release().unwrap();
    assert_eq!(
        store.get(KEY).unwrap(),
        None,
        "a no-op release writes nothing"
    );
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Admitted
    );
    q.release().unwrap();
    q.release().unwrap();
    assert_eq!(q.stats().unwrap().in_flight, 0);
    assert_eq!(
        q.arrive(owner(1, 2), ticket(1, 1, 1), T0),
        Arrival::Admitted
    );
    assert_eq!(
        q.arrive(owner(1, 3), ticket(1, 1, 1), T0),
        Arrival::Admitted
    );
    assert!(matches!(
        q.arrive(owner(1, 4), ticket(1, 1, 1), T0),
        Arrival::Queued { .. }
    ));
}

#[test]
fn a_lower_capacity_after_reload_admits_nothing_until_below_it() {
    let store = MemoryStore::new();
    let big = FairQueue::new(&store, KEY, 4);
    for c in 0..4 {
        assert_eq!(
            big.arrive(owner(1, c), ticket(1, 1, 1), T0),
            Arrival::Admitted
        );
    }
    let small = FairQueue::new(&store, KEY, 2);
    assert!(matches!(
        small.arrive(owner(1, 9), ticket(1, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    small.release().unwrap();
    small.release().unwrap();
    assert_eq!(small.claim_for_worker(1, T0).unwrap(), []);
    small.release().unwrap();
    assert_eq!(small.claim_for_worker(1, T0).unwrap(), [owner(1, 9)]);
    assert_eq!(small.stats().unwrap().in_flight, 2);
}
