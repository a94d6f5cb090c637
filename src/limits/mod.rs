//! Limits shared by every Envoy worker: token buckets, in-flight slots and calendar-month
//! quotas, as pure logic over a compare-and-set [`Store`](crate::shared::Store) (Envoy
//! shared data in the wasm build, [`MemoryStore`](crate::shared::MemoryStore) in tests).
//!
//! Each limit is one key, forever (see `shared/keys.rs`): timestamps and months live in the
//! value, never in the key. A request's demands are decided together by
//! [`Limiter::admit`]: each is taken with a conditional compare-and-set, and a refusal gives
//! back everything already taken, so a rejected request consumes nothing.

mod bucket;
mod calendar;
mod counter;
mod limiter;

#[cfg(test)]
mod tests;

pub use calendar::{format_reset, month_index, month_start_ms, ms_until_next_month, rfc3339};
pub use limiter::Limiter;

use crate::shared::CasFailure;
use serde::{Deserialize, Serialize};

/// Serialized (snake case, externally tagged) on the wire to the quota service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LimitKind {
    /// Token bucket: refills `per_minute` units per minute up to a capacity of
    /// `per_minute * burst_milli / 1000` units. Settlement may leave it in debt (negative),
    /// and then it admits nothing until refilled.
    Rate { per_minute: u64, burst_milli: u64 },
    /// In-flight slots: admits if `in_use + amount <= max`.
    Concurrency { max: u64 },
    /// Calendar-month (UTC) total: admits if `used_this_month + amount <= limit`; each
    /// month starts from zero.
    Monthly { limit: u64 },
}

/// One limit a request must pass, and how much of it the request takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demand {
    pub key: String,
    pub kind: LimitKind,
    pub amount: u64,
}

impl Demand {
    /// More than the limit can ever admit at once (a bucket's capacity, a month's limit):
    /// no wait helps. Concurrency always fits one request eventually.
    pub fn never_fits(&self) -> bool {
        match self.kind {
            LimitKind::Rate {
                per_minute,
                burst_milli,
            } => !bucket::Bucket::new(per_minute, burst_milli).can_hold(self.amount),
            LimitKind::Concurrency { .. } => false,
            LimitKind::Monthly { limit } => self.amount > limit,
        }
    }

    /// The limit in whole units (a bucket's capacity).
    pub fn limit_units(&self) -> u64 {
        match self.kind {
            LimitKind::Rate {
                per_minute,
                burst_milli,
            } => u64::try_from(u128::from(per_minute) * u128::from(burst_milli) / 1000)
                .unwrap_or(u64::MAX),
            LimitKind::Concurrency { max } => max,
            LimitKind::Monthly { limit } => limit,
        }
    }
}

/// What admission took, to be settled exactly once (the caller guarantees that) with
/// [`Limiter::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    pub key: String,
    pub kind: LimitKind,
    pub amount: u64,
    /// Monthly only: the month ([`month_index`]) the amount was charged to, so that
    /// settlement after a month rollover does not refund into the new month. 0 otherwise.
    pub month: u32,
}

/// One limit's state right after a decision, for rate-limit headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Capacity in whole units (Rate), `max` (Concurrency) or the monthly limit.
    pub limit: u64,
    /// Whole units left; 0 in debt.
    pub remaining: u64,
    /// Ms until full again (Rate), 0 (Concurrency), ms until the month ends (Monthly).
    pub reset_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Every demand was taken; one snapshot per demand, in order.
    Admitted {
        taken: Vec<Taken>,
        snapshots: Vec<Snapshot>,
    },
    /// Demand `index` was the first that could not be met; everything taken before it was
    /// given back. `retry_after_ms`: Rate, the exact ms until the bucket holds the amount;
    /// Monthly, the ms until the next month; `None` for Concurrency and when waiting cannot
    /// help (the amount exceeds the capacity or the whole monthly limit).
    Rejected {
        index: usize,
        retry_after_ms: Option<u64>,
        snapshot: Snapshot,
    },
    /// Compare-and-set retries ran out on some key (`Contended`), or the store failed
    /// (`Host`: the caller fails closed); everything taken was given back.
    Failed(CasFailure),
}
