//! Decisions over the [`Store`]: every change goes through the one compare-and-set loop
//! (`shared/cas.rs`): read, compute, write back with the cas that was read, retried a
//! bounded number of times when another worker wrote in between.

use super::bucket::Bucket;
use super::counter::{Quota, Slots};
use super::{Admission, Demand, LimitKind, Snapshot, Taken};
use crate::global::wire::Reading;
use crate::shared::{
    cas_update, CasFailure as Failure, Change, Store, StoreError, CREATE_CAS, GIVE_BACK_ATTEMPTS,
    TAKE_ATTEMPTS,
};

pub struct Limiter<'a, S: Store + ?Sized> {
    store: &'a S,
    create_cas: u32,
}

enum Take {
    Took {
        snapshot: Snapshot,
        month: u32,
    },
    Refused {
        retry_after_ms: Option<u64>,
        snapshot: Snapshot,
    },
}

impl<'a, S: Store + ?Sized> Limiter<'a, S> {
    pub fn new(store: &'a S) -> Self {
        Limiter {
            store,
            create_cas: CREATE_CAS,
        }
    }

    /// A limiter that creates keys the naive way, to show the race it loses.
    #[cfg(test)]
    pub(crate) fn with_create_cas(store: &'a S, create_cas: u32) -> Self {
        Limiter { store, create_cas }
    }

    /// Decides all of a request's demands at once: takes each in order, conditionally on
    /// room; at the first refusal, contention or store failure, gives back everything
    /// already taken. `now_ms` is wall-clock ms since the Unix epoch.
    ///
    /// A give-back that itself fails (store error, or contention beyond
    /// `GIVE_BACK_ATTEMPTS`) leaves that amount taken: there is no one left to hand it to.
    pub fn admit(&self, demands: &[Demand], now_ms: u64) -> Admission {
        let mut taken = Vec::with_capacity(demands.len());
        let mut snapshots = Vec::with_capacity(demands.len());
        for (index, demand) in demands.iter().enumerate() {
            let outcome = match self.take(demand, now_ms) {
                Ok(Take::Took { snapshot, month }) => {
                    taken.push(Taken {
                        key: demand.key.clone(),
                        kind: demand.kind,
                        amount: demand.amount,
                        month,
                    });
                    snapshots.push(snapshot);
                    continue;
                }
                Ok(Take::Refused {
                    retry_after_ms,
                    snapshot,
                }) => Admission::Rejected {
                    index,
                    retry_after_ms,
                    snapshot,
                },
                Err(failure) => Admission::Failed(failure),
            };
            self.give_back(&taken, now_ms);
            return outcome;
        }
        Admission::Admitted { taken, snapshots }
    }

    fn give_back(&self, taken: &[Taken], now_ms: u64) {
        for item in taken.iter().rev() {
            // Best effort by design (see `admit`); settling to 0 returns all of it.
            let _ = self.settle(item, 0, now_ms);
        }
    }

    /// Settles what admission took to the `actual` amount used:
    /// - Rate: refunds `amount - actual` (up to the capacity), or charges `actual - amount`
    ///   unconditionally, possibly into debt.
    /// - Concurrency: releases the slots (`actual` is ignored), never below zero.
    /// - Monthly: adds `actual - amount` to the month it was charged to, never below zero.
    ///   If that month is over, the refund is dropped (the old total no longer counts) and
    ///   only an excess is charged, to the current month.
    ///
    /// `Err(CasMismatch)` means contention outlasted the retries; `Err(Host)` a store
    /// failure. Either way nothing was changed.
    pub fn settle(&self, taken: &Taken, actual: u64, now_ms: u64) -> Result<(), StoreError> {
        let key = taken.key.as_str();
        let reserved = taken.amount;
        let result = match taken.kind {
            LimitKind::Rate {
                per_minute,
                burst_milli,
            } => {
                if actual == reserved {
                    return Ok(());
                }
                let bucket = Bucket::new(per_minute, burst_milli);
                self.update(key, GIVE_BACK_ATTEMPTS, |stored| {
                    let state = bucket.settle(bucket.current(stored, now_ms), reserved, actual);
                    Change::Write(state.encode(), ())
                })
            }
            LimitKind::Concurrency { .. } => {
                if reserved == 0 {
                    return Ok(());
                }
                self.update(key, GIVE_BACK_ATTEMPTS, |stored| {
                    match Slots::current(stored) {
                        // Already zero: a double release must not wrap or write.
                        0 => Change::Keep(()),
                        in_use => Change::Write(Slots::encode(in_use.saturating_sub(reserved)), ()),
                    }
                })
            }
            LimitKind::Monthly { .. } => self.update(key, GIVE_BACK_ATTEMPTS, |stored| {
                let state = Quota::current(stored, now_ms);
                let settled = Quota::settle(state, taken.month, reserved, actual);
                if settled == state {
                    Change::Keep(())
                } else {
                    Change::Write(settled.encode(), ())
                }
            }),
        };
        result.map_err(StoreError::from)
    }

    /// The limit's state at `now_ms`, without changing it.
    pub fn snapshot(
        &self,
        key: &str,
        kind: LimitKind,
        now_ms: u64,
    ) -> Result<Snapshot, StoreError> {
        self.reading(key, kind, now_ms).map(|r| r.snapshot)
    }

    /// The limit's state at `now_ms` and how much of it is used, without changing it.
    pub fn reading(&self, key: &str, kind: LimitKind, now_ms: u64) -> Result<Reading, StoreError> {
        let stored = self.store.get(key)?.map(|(value, _)| value);
        let stored = stored.as_deref();
        Ok(match kind {
            LimitKind::Rate {
                per_minute,
                burst_milli,
            } => {
                let bucket = Bucket::new(per_minute, burst_milli);
                let state = bucket.current(stored, now_ms);
                Reading {
                    snapshot: bucket.snapshot(state),
                    used: bucket.used(state),
                }
            }
            LimitKind::Concurrency { max } => {
                let in_use = Slots::current(stored);
                Reading {
                    snapshot: Slots::new(max).snapshot(in_use),
                    used: in_use,
                }
            }
            LimitKind::Monthly { limit } => {
                let state = Quota::current(stored, now_ms);
                Reading {
                    snapshot: Quota::new(limit).snapshot(state, now_ms),
                    used: state.total,
                }
            }
        })
    }

    /// Takes one demand if there is room; a refusal writes nothing.
    fn take(&self, demand: &Demand, now_ms: u64) -> Result<Take, Failure> {
        let amount = demand.amount;
        self.update(&demand.key, TAKE_ATTEMPTS, |stored| match demand.kind {
            LimitKind::Rate {
                per_minute,
                burst_milli,
            } => {
                let bucket = Bucket::new(per_minute, burst_milli);
                let state = bucket.current(stored, now_ms);
                match bucket.take(state, amount) {
                    Ok(after) => Change::Write(
                        after.encode(),
                        Take::Took {
                            snapshot: bucket.snapshot(after),
                            month: 0,
                        },
                    ),
                    Err(retry_after_ms) => Change::Keep(Take::Refused {
                        retry_after_ms,
                        snapshot: bucket.snapshot(state),
                    }),
                }
            }
            LimitKind::Concurrency { max } => {
                let slots = Slots::new(max);
                let in_use = Slots::current(stored);
                match slots.take(in_use, amount) {
                    Some(after) => Change::Write(
                        Slots::encode(after),
                        Take::Took {
                            snapshot: slots.snapshot(after),
                            month: 0,
                        },
                    ),
                    None => Change::Keep(Take::Refused {
                        retry_after_ms: None,
                        snapshot: slots.snapshot(in_use),
                    }),
                }
            }
            LimitKind::Monthly { limit } => {
                let quota = Quota::new(limit);
                let state = Quota::current(stored, now_ms);
                match quota.take(state, amount) {
                    Some(after) => Change::Write(
                        after.encode(),
                        Take::Took {
                            snapshot: quota.snapshot(after, now_ms),
                            month: after.month,
                        },
                    ),
                    None => Change::Keep(Take::Refused {
                        retry_after_ms: quota.retry_after_ms(state, amount, now_ms),
                        snapshot: quota.snapshot(state, now_ms),
                    }),
                }
            }
        })
    }

    /// [`cas_update`] on `key`, creating missing keys with this limiter's create cas.
    fn update<T>(
        &self,
        key: &str,
        attempts: u32,
        apply: impl FnMut(Option<&[u8]>) -> Change<T>,
    ) -> Result<T, Failure> {
        cas_update(self.store, key, self.create_cas, attempts, apply)
    }
}
