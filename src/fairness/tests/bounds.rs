//! Bounds, cancellation, expiry and the stored value.

use super::*;

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
    // A gold waiter of worker 7 with a short deadline, then a bronze one of worker 1.
    let short = Ticket {
        deadline_ms: T0 + 100,
        ..ticket(1, 3, 1)
    };
    let queue_two = |store: &MemoryStore| {
        queue_all_of(
            store,
            &[(owner(7, 1), short), (owner(1, 1), ticket(2, 1, 1))],
        );
    };
    let store = MemoryStore::new();
    let q = FairQueue::new(&store, KEY, 0);
    queue_two(&store);
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
    queue_two(&store);
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
