//! Limiter behaviour over the store: creation races, multi-threaded exactness, rollback,
//! retry-after, settlement, month rollover and bounded retries. Time is always injected.

mod threads;

use super::bucket::{BucketState, PARTS_PER_UNIT};
use super::*;
use crate::shared::{CasFailure, MemoryStore, Store, StoreError};
use std::cell::{Cell, RefCell};

const U: i64 = PARTS_PER_UNIT;
const T0: u64 = 1_769_900_000_000; // 2026-01-31T22:53:20Z
const DEC_31_2025_END: u64 = 1_767_225_599_999;
const JAN_1_2026: u64 = 1_767_225_600_000;
const JAN_31_2026_END: u64 = 1_769_903_999_999;
const FEB_1_2026: u64 = 1_769_904_000_000;
const JAN: u32 = 2026 * 12;
const FEB: u32 = 2026 * 12 + 1;

const PER_SECOND: LimitKind = LimitKind::Rate {
    per_minute: 60,
    burst_milli: 1000,
};

fn demand(key: &str, kind: LimitKind, amount: u64) -> Demand {
    Demand {
        key: key.to_string(),
        kind,
        amount,
    }
}

fn admitted(admission: Admission) -> (Vec<Taken>, Vec<Snapshot>) {
    match admission {
        Admission::Admitted { taken, snapshots } => (taken, snapshots),
        other => panic!("expected admission, got {other:?}"),
    }
}

fn taken_one<S: Store + ?Sized>(limiter: &Limiter<'_, S>, d: Demand, now: u64) -> Taken {
    admitted(limiter.admit(&[d], now)).0.remove(0)
}

fn remaining(store: &MemoryStore, key: &str, kind: LimitKind, now: u64) -> u64 {
    Limiter::new(store)
        .snapshot(key, kind, now)
        .unwrap()
        .remaining
}

fn raw_bucket(store: &MemoryStore, key: &str) -> BucketState {
    BucketState::decode(&store.get(key).unwrap().unwrap().0).unwrap()
}

// ---------------------------------------------------------------------------------------
// Creation race

/// Another worker's whole decision, run straight on the inner store.
type OtherWorker<'s> = Box<dyn FnOnce(&MemoryStore) + 's>;

/// Runs `interleaved` just before the first `set`: between this worker's `get` and `set`.
struct RacingStore<'s> {
    inner: &'s MemoryStore,
    interleaved: RefCell<Option<OtherWorker<'s>>>,
}

impl Store for RacingStore<'_> {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if let Some(other_worker) = self.interleaved.borrow_mut().take() {
            other_worker(self.inner);
        }
        self.inner.set(key, value, cas)
    }
}

/// Worker A takes `a` while worker B, interleaved, takes `b` on the same missing key.
/// Returns whether both were admitted, and the store afterwards.
fn race(create_cas: u32, kind: LimitKind, a: u64, b: u64) -> (bool, MemoryStore) {
    let store = MemoryStore::new();
    let b_admitted = Cell::new(false);
    let racing = RacingStore {
        inner: &store,
        interleaved: RefCell::new(Some(Box::new(|inner: &MemoryStore| {
            let other = Limiter::new(inner);
            let admission = other.admit(&[demand("k", kind, b)], T0);
            b_admitted.set(matches!(admission, Admission::Admitted { .. }));
        }))),
    };
    let a_admitted = matches!(
        Limiter::with_create_cas(&racing, create_cas).admit(&[demand("k", kind, a)], T0),
        Admission::Admitted { .. }
    );
    drop(racing);
    (a_admitted && b_admitted.get(), store)
}

#[test]
fn naive_creation_loses_an_update_and_u32_max_creation_does_not() {
    // Naive: both read "missing", both create; A's create (cas ignored, then cas 0 on the
    // key B just made: an unconditional overwrite) erases B's 20.
    let (both, store) = race(0, PER_SECOND, 10, 20);
    assert!(both);
    assert_eq!(
        remaining(&store, "k", PER_SECOND, T0),
        50,
        "B's take was lost"
    );

    // u32::MAX: A's set fails with CasMismatch, A re-reads B's bucket and takes from it.
    let (both, store) = race(u32::MAX, PER_SECOND, 10, 20);
    assert!(both);
    assert_eq!(remaining(&store, "k", PER_SECOND, T0), 30);
}

#[test]
fn naive_creation_overfills_a_concurrency_limit() {
    let one_slot = LimitKind::Concurrency { max: 1 };
    let (both, store) = race(0, one_slot, 1, 1);
    assert!(both, "two requests in flight under max 1");
    assert_eq!(remaining(&store, "k", one_slot, T0), 0);

    let (both, store) = race(u32::MAX, one_slot, 1, 1);
    assert!(!both, "exactly one of the two gets the slot");
    assert_eq!(remaining(&store, "k", one_slot, T0), 0);
}

// ---------------------------------------------------------------------------------------
// Several demands in one decision

fn four_demands(monthly_limit: u64) -> Vec<Demand> {
    vec![
        demand("a", PER_SECOND, 7),
        demand("b", LimitKind::Concurrency { max: 10 }, 1),
        demand(
            "c",
            LimitKind::Monthly {
                limit: monthly_limit,
            },
            5,
        ),
        demand("d", PER_SECOND, 2),
    ]
}

fn snapshots_of(store: &MemoryStore, demands: &[Demand], now: u64) -> Vec<Snapshot> {
    let limiter = Limiter::new(store);
    demands
        .iter()
        .map(|d| limiter.snapshot(&d.key, d.kind, now).unwrap())
        .collect()
}

#[test]
fn third_of_four_failing_rolls_back_the_first_two() {
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    let demands = four_demands(12);
    let (taken, snapshots) = admitted(limiter.admit(&demands, T0));
    assert_eq!(taken.len(), 4);
    assert_eq!(snapshots[0].remaining, 53);
    assert_eq!(snapshots[1].remaining, 9);
    assert_eq!(snapshots[2].remaining, 7);
    assert_eq!(snapshots[3].remaining, 58);
    let before = snapshots_of(&store, &demands, T0);
    assert_eq!(before, snapshots);

    // Monthly "c" has 7 left, needs 5: one more fits, the next does not.
    admitted(limiter.admit(&demands, T0));
    let before = snapshots_of(&store, &demands, T0);
    match limiter.admit(&demands, T0) {
        Admission::Rejected {
            index,
            retry_after_ms,
            snapshot,
        } => {
            assert_eq!(index, 2);
            assert_eq!(retry_after_ms, Some(ms_until_next_month(T0)));
            assert_eq!(snapshot, before[2]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(snapshots_of(&store, &demands, T0), before);
    // The rejected decision left the stored values byte-identical too.
    let (a_value, _) = store.get("a").unwrap().unwrap();
    assert_eq!(BucketState::decode(&a_value).unwrap().level, (60 - 14) * U);
}

#[test]
fn retry_after_is_exact_for_rate_buckets() {
    for (per_minute, burst_milli, drain, amount, wait) in [
        (60, 1000, 60, 5, 100),
        (7, 1500, 10, 3, 1),
        (1234, 2000, 2468, 1, 17),
        (90_000, 1000, 90_000, 90_000, 0),
        (1, 1000, 1, 1, 59_999),
    ] {
        let kind = LimitKind::Rate {
            per_minute,
            burst_milli,
        };
        let store = MemoryStore::new();
        let limiter = Limiter::new(&store);
        taken_one(&limiter, demand("r", kind, drain), T0);
        let now = T0 + wait;
        let retry = match limiter.admit(&[demand("r", kind, amount)], now) {
            Admission::Rejected {
                index: 0,
                retry_after_ms: Some(retry),
                ..
            } => retry,
            other => panic!("{per_minute}/{burst_milli}: {other:?}"),
        };
        assert!(retry > 0);
        match limiter.admit(&[demand("r", kind, amount)], now + retry - 1) {
            Admission::Rejected { retry_after_ms, .. } => assert_eq!(retry_after_ms, Some(1)),
            other => panic!("{per_minute}/{burst_milli}: {other:?}"),
        }
        admitted(limiter.admit(&[demand("r", kind, amount)], now + retry));
    }
}

#[test]
fn retry_after_is_none_when_waiting_cannot_help() {
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    for (kind, amount) in [
        (PER_SECOND, 61),
        (LimitKind::Concurrency { max: 2 }, 3),
        (LimitKind::Monthly { limit: 10 }, 11),
    ] {
        match limiter.admit(&[demand("x", kind, amount)], T0) {
            Admission::Rejected {
                index: 0,
                retry_after_ms: None,
                ..
            } => {}
            other => panic!("{kind:?}: {other:?}"),
        }
    }
    assert!(store.is_empty(), "refusals write nothing");
}

// ---------------------------------------------------------------------------------------
// Settlement

#[test]
fn rate_settlement_refunds_caps_charges_debt_and_recovers() {
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    let rest = |now| remaining(&store, "r", PER_SECOND, now);

    // Refund: reserved 50, used 20.
    let taken = taken_one(&limiter, demand("r", PER_SECOND, 50), T0);
    limiter.settle(&taken, 20, T0).unwrap();
    assert_eq!(rest(T0), 40);

    // Capped refund: 40 s later the bucket refilled to full; returning 50 cannot overfill.
    let taken = taken_one(&limiter, demand("r", PER_SECOND, 30), T0);
    assert_eq!(rest(T0), 10);
    limiter.settle(&taken, 0, T0 + 50_000).unwrap();
    assert_eq!(rest(T0 + 50_000), 60);

    // Debt: reserved 10, used 100, from a full bucket: 60 - 100 = -40.
    let t = T0 + 50_000;
    let taken = taken_one(&limiter, demand("r", PER_SECOND, 10), t);
    limiter.settle(&taken, 100, t).unwrap();
    assert_eq!(raw_bucket(&store, "r").level, -40 * U);
    let snapshot = limiter.snapshot("r", PER_SECOND, t).unwrap();
    assert_eq!(
        snapshot,
        Snapshot {
            limit: 60,
            remaining: 0,
            reset_ms: 100_000
        }
    );
    // Recovery: nothing is admitted until 41 units have refilled.
    match limiter.admit(&[demand("r", PER_SECOND, 1)], t + 40_000) {
        Admission::Rejected { retry_after_ms, .. } => assert_eq!(retry_after_ms, Some(1_000)),
        other => panic!("{other:?}"),
    }
    admitted(limiter.admit(&[demand("r", PER_SECOND, 1)], t + 41_000));
    assert_eq!(rest(t + 200_000), 60);

    // Settling to exactly the reservation touches nothing.
    let (_, cas_before) = store.get("r").unwrap().unwrap();
    let taken = taken_one(&limiter, demand("r", PER_SECOND, 5), t + 200_000);
    let (_, cas_after_take) = store.get("r").unwrap().unwrap();
    assert_ne!(cas_before, cas_after_take);
    limiter.settle(&taken, 5, t + 200_000).unwrap();
    assert_eq!(store.get("r").unwrap().unwrap().1, cas_after_take);
}

#[test]
fn concurrency_release_reaches_zero_and_never_below() {
    let kind = LimitKind::Concurrency { max: 3 };
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    let first = taken_one(&limiter, demand("c", kind, 2), T0);
    let second = taken_one(&limiter, demand("c", kind, 1), T0);
    match limiter.admit(&[demand("c", kind, 1)], T0) {
        Admission::Rejected {
            retry_after_ms: None,
            snapshot,
            ..
        } => assert_eq!(
            snapshot,
            Snapshot {
                limit: 3,
                remaining: 0,
                reset_ms: 0
            }
        ),
        other => panic!("{other:?}"),
    }
    limiter.settle(&second, 999, T0).unwrap(); // actual is ignored
    assert_eq!(remaining(&store, "c", kind, T0), 1);
    limiter.settle(&first, 0, T0).unwrap();
    assert_eq!(remaining(&store, "c", kind, T0), 3);
    // A release too many (a caller bug) stays at zero in use.
    limiter.settle(&first, 0, T0).unwrap();
    assert_eq!(remaining(&store, "c", kind, T0), 3);
    let value = store.get("c").unwrap().unwrap().0;
    assert_eq!(value, [1, b'C', 0, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn monthly_settlement() {
    let kind = LimitKind::Monthly { limit: 1000 };
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    let t = JAN_31_2026_END - 60_000;
    let taken = taken_one(&limiter, demand("m", kind, 100), t);
    assert_eq!(taken.month, JAN);
    limiter.settle(&taken, 30, t).unwrap();
    assert_eq!(remaining(&store, "m", kind, t), 970);
    let taken = taken_one(&limiter, demand("m", kind, 100), t);
    limiter.settle(&taken, 250, t).unwrap();
    assert_eq!(remaining(&store, "m", kind, t), 720);
    // Admitted in January, settled in February: the refund is dropped, the excess counts
    // in February.
    let under = taken_one(&limiter, demand("m", kind, 100), JAN_31_2026_END);
    let over = taken_one(&limiter, demand("m", kind, 100), JAN_31_2026_END);
    limiter.settle(&under, 10, FEB_1_2026).unwrap();
    assert_eq!(remaining(&store, "m", kind, FEB_1_2026), 1000);
    limiter.settle(&over, 160, FEB_1_2026).unwrap();
    assert_eq!(remaining(&store, "m", kind, FEB_1_2026), 940);
    // Never below zero.
    let taken = taken_one(&limiter, demand("m", kind, 100), FEB_1_2026);
    let bogus = Taken {
        amount: 5000,
        ..taken
    };
    limiter.settle(&bogus, 0, FEB_1_2026).unwrap();
    assert_eq!(remaining(&store, "m", kind, FEB_1_2026), 1000);
}

// ---------------------------------------------------------------------------------------
// Month rollover

#[test]
fn usage_does_not_carry_into_the_next_month() {
    let kind = LimitKind::Monthly { limit: 10 };
    for (last_ms, first_ms) in [(JAN_31_2026_END, FEB_1_2026), (DEC_31_2025_END, JAN_1_2026)] {
        let store = MemoryStore::new();
        let limiter = Limiter::new(&store);
        let (_, snapshots) = admitted(limiter.admit(&[demand("m", kind, 10)], last_ms));
        assert_eq!(
            snapshots[0],
            Snapshot {
                limit: 10,
                remaining: 0,
                reset_ms: 1
            }
        );
        match limiter.admit(&[demand("m", kind, 1)], last_ms) {
            Admission::Rejected { retry_after_ms, .. } => assert_eq!(retry_after_ms, Some(1)),
            other => panic!("{other:?}"),
        }
        assert_eq!(remaining(&store, "m", kind, first_ms), 10);
        let (taken, _) = admitted(limiter.admit(&[demand("m", kind, 10)], first_ms));
        assert_eq!(taken[0].month, month_index(first_ms));
        // A worker whose clock is still in the old month sees the new month's total.
        assert_eq!(remaining(&store, "m", kind, last_ms), 0);
        match limiter.admit(&[demand("m", kind, 1)], last_ms) {
            Admission::Rejected { retry_after_ms, .. } => {
                assert_eq!(retry_after_ms, Some(1 + ms_until_next_month(first_ms)))
            }
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stored values

#[test]
fn undecodable_or_foreign_values_are_fresh() {
    let store = MemoryStore::new();
    store.set("r", b"not a bucket", 0).unwrap();
    store.set("c", &[1, b'R', 0, 0], 0).unwrap();
    let limiter = Limiter::new(&store);
    assert_eq!(remaining(&store, "r", PER_SECOND, T0), 60);
    taken_one(&limiter, demand("r", PER_SECOND, 60), T0);
    assert_eq!(raw_bucket(&store, "r").level, 0);
    taken_one(
        &limiter,
        demand("c", LimitKind::Concurrency { max: 1 }, 1),
        T0,
    );
    // A bucket's value read as a counter (the key's kind changed) is fresh too.
    let as_slots = LimitKind::Concurrency { max: 4 };
    assert_eq!(remaining(&store, "r", as_slots, T0), 4);
}

#[test]
fn a_lower_capacity_after_reload_caps_the_stored_level() {
    let store = MemoryStore::new();
    let limiter = Limiter::new(&store);
    let big = LimitKind::Rate {
        per_minute: 600,
        burst_milli: 1000,
    };
    let small = LimitKind::Rate {
        per_minute: 60,
        burst_milli: 500,
    };
    taken_one(&limiter, demand("r", big, 0), T0);
    assert_eq!(remaining(&store, "r", big, T0), 600);
    let snapshot = limiter.snapshot("r", small, T0).unwrap();
    assert_eq!(
        snapshot,
        Snapshot {
            limit: 30,
            remaining: 30,
            reset_ms: 0
        }
    );
    taken_one(&limiter, demand("r", small, 30), T0);
    match limiter.admit(&[demand("r", small, 1)], T0) {
        Admission::Rejected { retry_after_ms, .. } => assert_eq!(retry_after_ms, Some(1_000)),
        other => panic!("{other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Bounded retries and store failures

/// Every `set` on `key` fails (with `CasMismatch` or a host error); everything else is a
/// plain [`MemoryStore`].
struct FailingOn {
    inner: MemoryStore,
    key: &'static str,
    error: StoreError,
    fail_get: bool,
    attempts: Cell<u32>,
}

impl FailingOn {
    fn new(key: &'static str, error: StoreError, fail_get: bool) -> Self {
        FailingOn {
            inner: MemoryStore::new(),
            key,
            error,
            fail_get,
            attempts: Cell::new(0),
        }
    }
}

impl Store for FailingOn {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        if key == self.key && self.fail_get {
            self.attempts.set(self.attempts.get() + 1);
            return Err(self.error.clone());
        }
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if key == self.key {
            self.attempts.set(self.attempts.get() + 1);
            return Err(self.error.clone());
        }
        self.inner.set(key, value, cas)
    }
}

#[test]
fn endless_cas_mismatch_is_contended_not_a_hang() {
    let store = FailingOn::new("hot", StoreError::CasMismatch, false);
    let limiter = Limiter::new(&store);
    assert_eq!(
        limiter.admit(&[demand("hot", PER_SECOND, 1)], T0),
        Admission::Failed(CasFailure::Contended)
    );
    assert_eq!(store.attempts.get(), 64);
    assert!(store.inner.is_empty());

    // Earlier demands are given back.
    let demands = [
        demand("a", PER_SECOND, 10),
        demand("b", LimitKind::Concurrency { max: 2 }, 1),
        demand("hot", PER_SECOND, 1),
    ];
    assert_eq!(
        limiter.admit(&demands, T0),
        Admission::Failed(CasFailure::Contended)
    );
    assert_eq!(remaining(&store.inner, "a", PER_SECOND, T0), 60);
    assert_eq!(
        remaining(&store.inner, "b", LimitKind::Concurrency { max: 2 }, T0),
        2
    );

    // Settlement gives up too, with CasMismatch.
    let taken = Taken {
        key: "hot".to_string(),
        kind: LimitKind::Concurrency { max: 2 },
        amount: 1,
        month: 0,
    };
    store
        .inner
        .set("hot", &[1, b'C', 1, 0, 0, 0, 0, 0, 0, 0], 0)
        .unwrap();
    store.attempts.set(0);
    assert_eq!(limiter.settle(&taken, 0, T0), Err(StoreError::CasMismatch));
    assert_eq!(store.attempts.get(), 1024);
    assert_eq!(remaining(&store.inner, "hot", taken.kind, T0), 1);
}

#[test]
fn store_failure_is_reported_and_rolled_back() {
    for fail_get in [false, true] {
        let store = FailingOn::new("down", StoreError::Host("boom".to_string()), fail_get);
        let limiter = Limiter::new(&store);
        let demands = [
            demand("a", PER_SECOND, 10),
            demand("m", LimitKind::Monthly { limit: 100 }, 40),
            demand("down", PER_SECOND, 1),
        ];
        assert_eq!(
            limiter.admit(&demands, T0),
            Admission::Failed(CasFailure::Host("boom".to_string()))
        );
        assert_eq!(store.attempts.get(), 1, "host errors are not retried");
        assert_eq!(remaining(&store.inner, "a", PER_SECOND, T0), 60);
        assert_eq!(
            remaining(&store.inner, "m", LimitKind::Monthly { limit: 100 }, T0),
            100
        );
        let settle = limiter.settle(
            &Taken {
                key: "down".to_string(),
                kind: PER_SECOND,
                amount: 5,
                month: 0,
            },
            1,
            T0,
        );
        assert_eq!(settle, Err(StoreError::Host("boom".to_string())));
    }
    let store = FailingOn::new("down", StoreError::Host("boom".to_string()), true);
    assert_eq!(
        Limiter::new(&store).snapshot("down", PER_SECOND, T0),
        Err(StoreError::Host("boom".to_string()))
    );
}
