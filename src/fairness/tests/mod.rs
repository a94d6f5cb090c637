//! Queue behaviour over the store: ordering (strict priority, weighted SFQ), work
//! conservation, bounds, cancellation, expiry, pruning, encoding, and real threads.
//! Time is always injected.

use super::state::{cost_of, State};
use super::*;
use crate::limits::MemoryStore;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

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
pub(super) fn assert_idle(stats: &QueueStats) {
    assert_eq!((stats.in_flight, stats.waiting), (0, 0), "{stats:?}");
    assert!(stats.by_priority.iter().all(|&(_, n)| n == 0), "{stats:?}");
}

/// Queues (capacity 0) one waiter per `(context, ticket)`, all owned by worker 1.
fn queue_all(store: &MemoryStore, waiters: &[(u32, Ticket)]) {
    let q = FairQueue::new(store, KEY, 0);
    for &(context, t) in waiters {
        assert!(
            matches!(q.arrive(owner(1, context), t, T0), Arrival::Queued { .. }),
            "{context}"
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

// ---------------------------------------------------------------------------------------
// Bounds, cancellation, expiry

#[test]
fn a_tenant_queue_is_bounded() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    let limited = Ticket {
        max_queue_length: 2,
        ..ticket(1, 1, 1)
    };
    assert!(matches!(
        q.arrive(owner(1, 1), limited, T0),
        Arrival::Queued { .. }
    ));
    assert!(matches!(
        q.arrive(owner(1, 2), limited, T0),
        Arrival::Queued { .. }
    ));
    let before = store.get(KEY).unwrap();
    assert_eq!(q.arrive(owner(1, 3), limited, T0), Arrival::QueueFull);
    assert_eq!(store.get(KEY).unwrap(), before, "a refusal writes nothing");
    // Other tenants are not affected; the bound counts every class.
    assert!(matches!(
        q.arrive(owner(1, 4), ticket(2, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    let other_tier = Ticket {
        priority: 3,
        ..limited
    };
    assert_eq!(q.arrive(owner(1, 5), other_tier, T0), Arrival::QueueFull);
    assert!(q.cancel(owner(1, 1)).unwrap());
    assert!(matches!(
        q.arrive(owner(1, 3), limited, T0),
        Arrival::Queued { .. }
    ));
    // A tenant allowed no queue at all is still admitted when a slot is free.
    let no_queue = Ticket {
        max_queue_length: 0,
        ..ticket(9, 1, 1)
    };
    assert_eq!(q.arrive(owner(1, 6), no_queue, T0), Arrival::QueueFull);
    let store = MemoryStore::new();
    let free = FairQueue::new(&store, KEY, 1);
    assert_eq!(free.arrive(owner(1, 6), no_queue, T0), Arrival::Admitted);
}

#[test]
fn the_whole_queue_is_bounded() {
    let mut full = State::default();
    for c in 0..MAX_WAITING as u32 - 1 {
        full.insert(owner(1, c), &ticket(c % 7, 1, 1));
    }
    let store = MemoryStore::new();
    store.set(KEY, &full.encode(), 0).unwrap();
    let q = FairQueue::new(&store, KEY, 0);
    // Tenant 0 already has 585 waiters: its new one is last.
    assert_eq!(
        q.arrive(owner(1, 99_998), ticket(0, 1, 1), T0),
        Arrival::Queued {
            position: MAX_WAITING as u32 - 1
        }
    );
    assert_eq!(
        q.arrive(owner(1, 99_999), ticket(100, 3, 1), T0),
        Arrival::QueueFull
    );
    assert_eq!(q.stats().unwrap().waiting, MAX_WAITING as u32);
    // The largest value: 16 + 11 + 7 flows x 22 + 4096 waiters x 28 bytes.
    assert_eq!(value_len(&store), 16 + 11 + 7 * 22 + MAX_WAITING * 28);
}

#[test]
fn an_owner_waits_once() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    assert!(matches!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    assert!(matches!(
        q.arrive(owner(1, 1), ticket(2, 2, 1), T0),
        Arrival::Queued { .. }
    ));
    assert_eq!(q.stats().unwrap().waiting, 1);
}

#[test]
fn cancel_removes_once_and_costs_the_tenant_nothing() {
    let store = MemoryStore::new();
    // A queues 10, then B queues 5; A cancels its first 9 (timed out).
    let mut waiters: Vec<(u32, Ticket)> = (0..10).map(|i| (100 + i, ticket(1, 1, 1))).collect();
    waiters.extend((0..5).map(|i| (200 + i, ticket(2, 1, 1))));
    queue_all(&store, &waiters);
    let q = FairQueue::new(&store, KEY, 0);
    for i in 0..9 {
        assert!(q.cancel(owner(1, 100 + i)).unwrap());
        assert!(!q.cancel(owner(1, 100 + i)).unwrap());
    }
    assert!(
        !q.cancel(owner(2, 109)).unwrap(),
        "another worker's context"
    );
    assert_eq!(q.stats().unwrap().waiting, 6);
    // A's last request is served as A's first would have been.
    let order = serve(&store, 6);
    assert_eq!(order[..2], [109, 200], "{order:?}");
}

#[test]
fn stale_waiters_expire_after_their_deadline_and_the_grace() {
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    let short = Ticket {
        deadline_ms: T0 + 100,
        ..ticket(1, 3, 1)
    };
    assert!(matches!(
        q.arrive(owner(7, 1), short, T0),
        Arrival::Queued { .. }
    ));
    assert!(matches!(
        q.arrive(owner(1, 1), ticket(2, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    assert_eq!(q.expire_stale(T0 + 100 + GRACE_MS).unwrap(), 0);
    // A dead worker's gold waiter heads the queue: nobody else can claim.
    let q1 = FairQueue::new(&store, KEY, 1);
    assert_eq!(q1.claim_for_worker(1, T0 + 100 + GRACE_MS).unwrap(), []);
    assert_eq!(q.expire_stale(T0 + 101 + GRACE_MS).unwrap(), 1);
    assert_eq!(q.expire_stale(T0 + 101 + GRACE_MS).unwrap(), 0);
    assert!(!q.cancel(owner(7, 1)).unwrap());
    assert_eq!(
        q1.claim_for_worker(1, T0 + 101 + GRACE_MS).unwrap(),
        [owner(1, 1)]
    );

    // Claims and arrivals expire too.
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    assert!(matches!(
        q.arrive(owner(7, 1), short, T0),
        Arrival::Queued { .. }
    ));
    assert!(matches!(
        q.arrive(owner(1, 1), ticket(2, 1, 1), T0),
        Arrival::Queued { .. }
    ));
    let q1 = FairQueue::new(&store, KEY, 1);
    assert_eq!(q1.claim_for_worker(1, T0 + HOUR).unwrap(), [owner(1, 1)]);
    assert_eq!(q1.stats().unwrap().waiting, 0);
    assert!(matches!(
        q.arrive(owner(7, 1), short, T0),
        Arrival::Queued { .. }
    ));
    assert_eq!(
        q.arrive(owner(1, 2), ticket(2, 1, 1), T0 + HOUR),
        Arrival::Queued { position: 0 }
    );
}

// ---------------------------------------------------------------------------------------
// Stored value

#[test]
fn the_value_stays_small() {
    let store = MemoryStore::new();
    // Many one-shot tenants with free capacity: nothing is remembered.
    let q = FairQueue::new(&store, KEY, 4);
    for c in 0..2000 {
        assert_eq!(
            q.arrive(owner(1, c), ticket(c, 1, 1), T0),
            Arrival::Admitted
        );
        q.release().unwrap();
    }
    assert!(value_len(&store) <= 27, "{}", value_len(&store));

    // A busy period (a flood always waiting) while 200 other tenants come and go:
    // flows without waiters are dropped once V passes them.
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 2);
    let flood = Ticket {
        max_queue_length: 50,
        ..ticket(u32::MAX, 1, 1)
    };
    let mut context = 0;
    let (mut max_flows, mut max_len) = (0, 0);
    for round in 0..2000u32 {
        for t in [flood, flood, ticket(round % 200, 1, 1 + round % 4)] {
            context += 1;
            let _ = q.arrive(owner(1, context), t, T0);
        }
        q.release().unwrap();
        q.claim_for_worker(1, T0).unwrap();
        let flows: usize = state(&store).classes.iter().map(|c| c.flows.len()).sum();
        max_flows = max_flows.max(flows);
        max_len = max_len.max(value_len(&store));
    }
    assert!(max_flows <= 201, "{max_flows}");
    assert!(max_len <= 16 + 11 + 201 * 22 + 60 * 28, "{max_len}");
    // Drain: everything is forgotten again.
    while q.stats().unwrap().waiting > 0 {
        q.release().unwrap();
        q.claim_for_worker(1, T0).unwrap();
    }
    q.release().unwrap();
    q.release().unwrap();
    assert_idle(&q.stats().unwrap());
    assert!(value_len(&store) <= 27, "{}", value_len(&store));
}

#[test]
fn idle_flows_are_capped() {
    let mut s = State::default();
    // A flood whose head starts at COST; one-shot tenants start at V = 0 and are served
    // first, leaving flows whose finish is ahead of V.
    s.insert(owner(1, 0), &ticket(u32::MAX, 1, 1));
    s.insert(owner(1, 1), &ticket(u32::MAX, 1, 1));
    assert_eq!(s.claim(1, |_| true), [owner(1, 0)]);
    for t in 0..(MAX_IDLE_FLOWS as u32 + 50) {
        s.insert(owner(2, t), &ticket(t, 1, 1));
        let next = s.in_flight + 1;
        assert_eq!(s.claim(next, |o| o.worker == 2), [owner(2, t)]);
    }
    s.prune();
    let flows = &s.classes[0].flows;
    let idle: Vec<u32> = flows
        .iter()
        .filter(|f| f.waiters.is_empty())
        .map(|f| f.tenant)
        .collect();
    assert_eq!(idle.len(), MAX_IDLE_FLOWS);
    assert!(s.contains(owner(1, 1)));
}

#[test]
fn encoding_round_trips() {
    let mut s = State::default();
    for c in 0..20u32 {
        let t = Ticket {
            deadline_ms: T0 + u64::from(c),
            ..ticket(c % 3, (c % 4) as u8, c % 5)
        };
        s.insert(owner(c % 2, c), &t);
    }
    s.claim(3, |_| true);
    s.prune();
    let value = s.encode();
    assert_eq!(value[..2], [1, b'Q']);
    assert_eq!(State::decode(Some(&value)), s);
    assert_eq!(cost_of(0), cost_of(1));
    assert_eq!(cost_of(u32::MAX), 1);
}

#[test]
fn undecodable_values_are_an_empty_queue() {
    let mut s = State::default();
    s.insert(owner(1, 1), &ticket(1, 1, 1));
    s.insert(owner(1, 2), &ticket(1, 2, 1));
    let good = s.encode();
    let mut bad_version = good.clone();
    bad_version[0] = 2;
    let mut bad_order = good.clone();
    bad_order.swap(16, 16 + 11 + 22 + 28); // the two classes' priorities
    let mut trailing = good.clone();
    trailing.push(0);
    for value in [
        vec![],
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        trailing,
        bad_version,
        bad_order,
    ] {
        assert_eq!(State::decode(Some(&value)), State::default(), "{value:?}");
        let store = MemoryStore::new();
        store.set(KEY, &value, 0).unwrap();
        let q = FairQueue::new(&store, KEY, 1);
        assert_eq!(q.stats().unwrap(), QueueStats::default());
        assert_eq!(
            q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
            Arrival::Admitted
        );
        assert_eq!(q.stats().unwrap().in_flight, 1);
    }
}

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
        Arrival::StoreFailed("down".into())
    );
    assert_eq!(q.release(), Ok(()), "nothing to release in an empty value");
    let busy = FailingStore {
        error: StoreError::CasMismatch,
    };
    let q = FairQueue::new(&busy, KEY, 1);
    assert_eq!(
        q.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Contended
    );
    let q0 = FairQueue::new(&busy, KEY, 0);
    assert_eq!(
        q0.arrive(owner(1, 1), ticket(1, 1, 1), T0),
        Arrival::Contended
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
    store.set(WORKERS_KEY, b"x", 0).unwrap();
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

/// SplitMix64: deterministic pseudo-random numbers for the tests.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A [`MemoryStore`] that often yields between a read and the write that follows, so
/// threads really race; counts refused writes.
#[derive(Default)]
struct RacyStore {
    inner: MemoryStore,
    reads: AtomicU64,
    mismatches: AtomicU64,
}

impl Store for RacyStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let value = self.inner.get(key);
        if Rng(self.reads.fetch_add(1, Ordering::Relaxed)).next() & 1 == 0 {
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
                                Arrival::Contended | Arrival::QueueFull => {}
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
    assert!(store.mismatches.load(Ordering::Relaxed) > 0, "never raced");
    assert_eq!(peak.load(Ordering::SeqCst), CAPACITY);
    println!("served {served}, peak {}", peak.load(Ordering::SeqCst));
    assert!(served > 50, "{served}");
    let q = FairQueue::new(&store.inner, KEY, CAPACITY);
    assert_idle(&q.stats().unwrap());
}
