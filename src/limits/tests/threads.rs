//! Many threads, one store: the limits stay exact while Envoy workers race.

use super::*;
use crate::shared::testing::RacyStore;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

const THREADS: u64 = 8;

/// Runs `work(thread index, limiter)` on [`THREADS`] threads that start together, like
/// Envoy workers sharing one shared-data map; returns their results.
fn on_threads<T: Send + 'static>(
    store: &Arc<RacyStore>,
    work: impl Fn(u64, &Limiter<'_, RacyStore>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let work = Arc::new(work);
    let start = Arc::new(Barrier::new(THREADS as usize));
    let handles: Vec<_> = (0..THREADS)
        .map(|thread| {
            let (store, work, start) = (store.clone(), work.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                work(thread, &Limiter::new(&*store))
            })
        })
        .collect();
    let results = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(store.mismatches() > 0, "the threads never raced");
    results
}

#[test]
fn rate_bucket_admits_exactly_capacity_plus_refill_across_threads() {
    const PER_MINUTE: u64 = 1234; // refills 1234 parts per ms
    let kind = LimitKind::Rate {
        per_minute: PER_MINUTE,
        burst_milli: 1500,
    }; // capacity 1851 units
    let capacity_parts: i64 = 1234 * 1500 * 60;
    let store = Arc::new(RacyStore::default());
    // Create at T0 and drain 1000 units, so the run (24_000 virtual ms, at most 494 units
    // of refill) can never refill to the cap, where refill would be (rightly) discarded.
    let pre_drained = 1000;
    taken_one(
        &Limiter::new(&*store),
        demand("rate", kind, pre_drained),
        T0,
    );
    let clock = Arc::new(AtomicU64::new(T0));
    let thread_clock = clock.clone();
    let results = on_threads(&store, move |thread, limiter| {
        let (mut units, mut refused) = (0u64, 0u64);
        for i in 0..3000u64 {
            // Each attempt advances the shared clock; threads may apply their times out
            // of order, as workers do.
            let now = thread_clock.fetch_add(1, Ordering::SeqCst) + 1;
            let amount = 1 + (thread + i) % 4;
            match limiter.admit(&[demand("rate", kind, amount)], now) {
                Admission::Admitted { .. } => units += amount,
                Admission::Rejected { .. } => refused += 1,
                Admission::Failed(CasFailure::Contended) => {}
                other => panic!("{other:?}"),
            }
        }
        (units, refused)
    });
    let units: u64 = results.iter().map(|r| r.0).sum::<u64>() + pre_drained;
    let refused: u64 = results.iter().map(|r| r.1).sum();

    let state = raw_bucket(&store.inner, "rate");
    let refill = i64::try_from(state.last_ms - T0).unwrap() * PER_MINUTE as i64;
    assert_eq!(
        i64::try_from(units).unwrap() * U + state.level,
        capacity_parts + refill,
        "admitted + left == capacity + exact refill ({} cas retries)",
        store.mismatches()
    );
    assert!(state.level >= 0);
    assert!(state.last_ms <= clock.load(Ordering::SeqCst));
    assert!(
        refused > 0 && units > 1851,
        "units {units}, refused {refused}"
    );
}

#[test]
fn concurrency_never_exceeds_max_in_flight_across_threads() {
    const MAX: u64 = 5;
    let kind = LimitKind::Concurrency { max: MAX };
    let store = Arc::new(RacyStore::default());
    // What is really in flight, maintained outside the store.
    let in_flight = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let (thread_in_flight, thread_peak) = (in_flight.clone(), peak.clone());
    let admissions = on_threads(&store, move |thread, limiter| {
        let mut admissions = 0u64;
        for i in 0..2000u64 {
            let amount = 1 + (thread + i) % 2;
            let Admission::Admitted { taken, .. } =
                limiter.admit(&[demand("slots", kind, amount)], T0)
            else {
                continue;
            };
            let now_in_flight = thread_in_flight.fetch_add(amount, Ordering::SeqCst) + amount;
            assert!(now_in_flight <= MAX, "{now_in_flight} in flight");
            thread_peak.fetch_max(now_in_flight, Ordering::SeqCst);
            admissions += 1;
            std::thread::yield_now();
            thread_in_flight.fetch_sub(amount, Ordering::SeqCst);
            limiter.settle(&taken[0], 0, T0).unwrap();
        }
        admissions
    });
    assert!(admissions.iter().sum::<u64>() > 0);
    assert!(peak.load(Ordering::SeqCst) <= MAX);
    assert_eq!(in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(
        remaining(&store.inner, "slots", kind, T0),
        MAX,
        "all released ({} cas retries)",
        store.mismatches()
    );
}

#[test]
fn monthly_quota_is_exact_across_threads_and_a_month_rollover() {
    const LIMIT: u64 = 500;
    let kind = LimitKind::Monthly { limit: LIMIT };
    let store = Arc::new(RacyStore::default());
    // Each thread takes in January until refused, then in February until refused. A
    // thread still in January after another moved on is charged to February (the stored
    // month never goes back). The first thread to leave January was refused there, so
    // January is full; every thread was refused in February, so it is full too.
    let charged = on_threads(&store, move |_, limiter| {
        let mut charged = [0u64; 2]; // [January, February]
        for (phase, start) in [JAN_31_2026_END - 100_000, FEB_1_2026]
            .into_iter()
            .enumerate()
        {
            let mut refused = false;
            for i in 0..100_000u64 {
                match limiter.admit(&[demand("month", kind, 1)], start + i) {
                    Admission::Admitted { taken, .. } => {
                        let month = taken[0].month;
                        assert!(month == JAN || month == FEB);
                        assert!(phase == 0 || month == FEB);
                        charged[usize::from(month == FEB)] += 1;
                    }
                    Admission::Rejected { retry_after_ms, .. } => {
                        assert!(retry_after_ms.is_some());
                        refused = true;
                        break;
                    }
                    Admission::Failed(CasFailure::Contended) => {}
                    other => panic!("{other:?}"),
                }
            }
            assert!(refused);
        }
        charged
    });
    let january: u64 = charged.iter().map(|c| c[0]).sum();
    let february: u64 = charged.iter().map(|c| c[1]).sum();
    assert_eq!(
        (january, february),
        (LIMIT, LIMIT),
        "{} cas retries",
        store.mismatches()
    );
    let snapshot = Limiter::new(&*store)
        .snapshot("month", kind, FEB_1_2026)
        .unwrap();
    assert_eq!(snapshot.remaining, 0);
}

#[test]
fn rejected_requests_consume_nothing_under_concurrency() {
    let store = Arc::new(RacyStore::default());
    let roomy = LimitKind::Rate {
        per_minute: 1_000_000,
        burst_milli: 1000,
    };
    let demands = vec![
        demand("a", roomy, 3),
        demand("b", LimitKind::Concurrency { max: 1000 }, 1),
        demand("c", LimitKind::Monthly { limit: 50 }, 1),
        demand("d", roomy, 2),
    ];
    let thread_demands = demands.clone();
    let admitted: u64 = on_threads(&store, move |_, limiter| {
        let mut admitted = 0u64;
        for _ in 0..500 {
            match limiter.admit(&thread_demands, T0) {
                Admission::Admitted { taken, .. } => {
                    admitted += 1;
                    limiter.settle(&taken[1], 0, T0).unwrap();
                }
                Admission::Rejected { index, .. } => assert_eq!(index, 2),
                Admission::Failed(CasFailure::Contended) => {}
                other => panic!("{other:?}"),
            }
        }
        admitted
    })
    .into_iter()
    .sum();
    assert_eq!(admitted, 50);
    let after = snapshots_of(&store.inner, &demands, T0);
    assert_eq!(after[0].remaining, 1_000_000 - 3 * admitted);
    assert_eq!(after[1].remaining, 1000);
    assert_eq!(after[2].remaining, 0);
    assert_eq!(after[3].remaining, 1_000_000 - 2 * admitted);
}

// ---------------------------------------------------------------------------------------
// Retry-after
