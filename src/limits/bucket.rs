//! Token bucket for [`LimitKind::Rate`](super::LimitKind::Rate), without ticks: the value
//! holds the level and the time of the last refill, and each access refills for the time
//! elapsed since.
//!
//! Levels are counted in parts of 1/60_000 of a unit, so one millisecond at `per_minute`
//! units per minute refills exactly `per_minute` parts and the capacity
//! (`per_minute * burst_milli / 1000` units) is exactly `per_minute * burst_milli * 60`
//! parts: nothing is ever rounded, however long or short the intervals.
//!
//! Value (18 bytes): `[1, b'R']`, level in parts (i64 LE, negative = debt), last refill
//! (u64 LE, ms since the Unix epoch).

use super::Snapshot;
use crate::shared::codec::fixed_value;
use crate::shared::keys::tag;

pub(crate) const PARTS_PER_UNIT: i64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bucket {
    per_minute: u64,
    /// In parts.
    capacity: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketState {
    /// In parts; negative after settlement charged more than was reserved.
    pub(crate) level: i64,
    pub(crate) last_ms: u64,
}

fn clamp(parts: i128) -> i64 {
    i64::try_from(parts).unwrap_or(if parts < 0 { i64::MIN } else { i64::MAX })
}

fn parts(units: u64) -> i128 {
    i128::from(units).saturating_mul(i128::from(PARTS_PER_UNIT))
}

/// `ceil(numerator / denominator)` for a positive numerator, saturating into u64.
fn ceil_div(numerator: i128, denominator: u64) -> u64 {
    let numerator = u128::try_from(numerator).unwrap_or(0);
    let ms = numerator.div_ceil(u128::from(denominator.max(1)));
    u64::try_from(ms).unwrap_or(u64::MAX)
}

fixed_value!(BucketState, tag::RATE, { level: i64, last_ms: u64 });

impl Bucket {
    pub(crate) fn new(per_minute: u64, burst_milli: u64) -> Self {
        let capacity = i128::from(per_minute)
            .saturating_mul(i128::from(burst_milli))
            .saturating_mul(i128::from(PARTS_PER_UNIT / 1000));
        Bucket {
            per_minute,
            capacity: clamp(capacity),
        }
    }

    /// The state at `now_ms`: the stored one refilled for the time elapsed, or a full bucket
    /// if nothing (decodable) is stored. Capping at the capacity also caps a level stored
    /// under a larger capacity before a configuration reload. A clock that went backwards
    /// refills nothing and never moves `last_ms` back (that would refill twice).
    pub(crate) fn current(&self, stored: Option<&[u8]>, now_ms: u64) -> BucketState {
        let Some(state) = stored.and_then(BucketState::decode) else {
            return BucketState {
                level: self.capacity,
                last_ms: now_ms,
            };
        };
        let elapsed = now_ms.saturating_sub(state.last_ms);
        let refill = i128::from(elapsed).saturating_mul(i128::from(self.per_minute));
        let level = i128::from(state.level)
            .saturating_add(refill)
            .min(i128::from(self.capacity));
        BucketState {
            level: clamp(level),
            last_ms: state.last_ms.max(now_ms),
        }
    }

    /// Whether the bucket can ever hold `amount` units at once.
    pub(crate) fn can_hold(&self, amount: u64) -> bool {
        amount == 0 || (self.per_minute > 0 && parts(amount) <= i128::from(self.capacity))
    }

    /// Takes `amount` units if the bucket holds them; otherwise the ms until it will
    /// (`None`: never, as `amount` exceeds the capacity or nothing refills).
    pub(crate) fn take(&self, state: BucketState, amount: u64) -> Result<BucketState, Option<u64>> {
        let need = parts(amount);
        let level = i128::from(state.level);
        if level >= need {
            return Ok(BucketState {
                level: clamp(level - need),
                ..state
            });
        }
        if need > i128::from(self.capacity) || self.per_minute == 0 {
            return Err(None);
        }
        Err(Some(ceil_div(need - level, self.per_minute)))
    }

    /// Corrects a reservation of `reserved` units to `actual`: refunds up to the capacity,
    /// or charges the extra unconditionally, into debt if need be.
    pub(crate) fn settle(&self, state: BucketState, reserved: u64, actual: u64) -> BucketState {
        let level = i128::from(state.level);
        let level = if actual < reserved {
            let refund = parts(reserved - actual);
            level
                .saturating_add(refund)
                .min(i128::from(self.capacity).max(level))
        } else {
            level.saturating_sub(parts(actual - reserved))
        };
        BucketState {
            level: clamp(level),
            ..state
        }
    }

    /// Whole units below the capacity, rounded up (more than the capacity in debt).
    pub(crate) fn used(&self, state: BucketState) -> u64 {
        let below = i128::from(self.capacity) - i128::from(state.level);
        ceil_div(below.max(0), PARTS_PER_UNIT as u64)
    }

    pub(crate) fn snapshot(&self, state: BucketState) -> Snapshot {
        let capacity = i128::from(self.capacity);
        let level = i128::from(state.level);
        let reset_ms = if level >= capacity {
            0
        } else if self.per_minute == 0 {
            u64::MAX
        } else {
            ceil_div(capacity - level, self.per_minute)
        };
        let units = |parts: i64| u64::try_from(parts.max(0) / PARTS_PER_UNIT).unwrap_or(0);
        Snapshot {
            limit: units(self.capacity),
            remaining: units(state.level),
            reset_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U: i64 = PARTS_PER_UNIT;

    fn at(level_units: i64, last_ms: u64) -> BucketState {
        BucketState {
            level: level_units * U,
            last_ms,
        }
    }

    #[test]
    fn capacity_is_exact() {
        assert_eq!(Bucket::new(60, 1000).capacity, 60 * U);
        assert_eq!(Bucket::new(7, 1500).capacity, 7 * U * 3 / 2); // 10.5 units
        assert_eq!(Bucket::new(7, 1500).snapshot(at(0, 0)).limit, 10);
        assert_eq!(Bucket::new(u64::MAX, u64::MAX).capacity, i64::MAX);
    }

    #[test]
    fn encode_round_trip_and_garbage_is_fresh() {
        let state = BucketState {
            level: -123,
            last_ms: 1_769_904_000_000,
        };
        assert_eq!(BucketState::decode(&state.encode()), Some(state));
        assert_eq!(state.encode().len(), 18, "the documented length");
        let bucket = Bucket::new(60, 1000);
        assert_eq!(bucket.current(Some(b"garbage"), 5), at(60, 5));
        assert_eq!(bucket.current(None, 5), at(60, 5));
    }

    #[test]
    fn refill_is_exact_and_capped() {
        // 60 units/min = 1 unit per second = 60 parts per ms.
        let bucket = Bucket::new(60, 1000);
        let empty = at(0, 1_000).encode();
        assert_eq!(bucket.current(Some(&empty), 1_001).level, 60);
        assert_eq!(bucket.current(Some(&empty), 2_000), at(1, 2_000));
        assert_eq!(bucket.current(Some(&empty), 1_000_000), at(60, 1_000_000));
        // A capacity lowered by a reload caps the stored level.
        let full_old = at(600, 1_000).encode();
        assert_eq!(bucket.current(Some(&full_old), 1_000), at(60, 1_000));
    }

    #[test]
    fn clock_going_backwards_refills_nothing_and_keeps_last() {
        let bucket = Bucket::new(60, 1000);
        let stored = at(0, 10_000).encode();
        assert_eq!(bucket.current(Some(&stored), 4_000), at(0, 10_000));
        assert_eq!(bucket.current(Some(&stored), 11_000), at(1, 11_000));
    }

    #[test]
    fn take_and_wait() {
        let bucket = Bucket::new(60, 1000);
        assert_eq!(bucket.take(at(5, 0), 5), Ok(at(0, 0)));
        // 3 units short at 60 parts/ms: exactly 3000 ms.
        assert_eq!(bucket.take(at(2, 0), 5), Err(Some(3_000)));
        // One part short: 1 ms (ceil).
        let almost = BucketState {
            level: 5 * U - 1,
            last_ms: 0,
        };
        assert_eq!(bucket.take(almost, 5), Err(Some(1)));
        assert_eq!(bucket.take(at(60, 0), 61), Err(None));
        assert_eq!(Bucket::new(0, 1000).take(at(0, 0), 1), Err(None));
        // Debt admits nothing, not even zero.
        assert_eq!(bucket.take(at(-2, 0), 0), Err(Some(2_000)));
        assert_eq!(bucket.take(at(0, 0), 0), Ok(at(0, 0)));
    }

    #[test]
    fn settle_refunds_capped_and_charges_into_debt() {
        let bucket = Bucket::new(60, 1000);
        assert_eq!(bucket.settle(at(10, 0), 30, 10), at(30, 0));
        assert_eq!(bucket.settle(at(50, 0), 30, 0), at(60, 0));
        assert_eq!(bucket.settle(at(10, 0), 30, 30), at(10, 0));
        assert_eq!(bucket.settle(at(10, 0), 30, 100), at(-60, 0));
        let deep = bucket.settle(at(0, 0), 0, u64::MAX);
        assert_eq!(bucket.settle(deep, 0, u64::MAX).level, i64::MIN);
    }

    #[test]
    fn snapshot_reports_floor_and_time_to_full() {
        let bucket = Bucket::new(60, 1000);
        assert_eq!(
            bucket.snapshot(at(60, 0)),
            Snapshot {
                limit: 60,
                remaining: 60,
                reset_ms: 0
            }
        );
        let partial = BucketState {
            level: 10 * U + 1,
            last_ms: 0,
        };
        assert_eq!(
            bucket.snapshot(partial),
            Snapshot {
                limit: 60,
                remaining: 10,
                reset_ms: 50_000
            }
        );
        assert_eq!(
            bucket.snapshot(at(-60, 0)),
            Snapshot {
                limit: 60,
                remaining: 0,
                reset_ms: 120_000
            }
        );
        assert_eq!(Bucket::new(0, 1000).snapshot(at(-1, 0)).reset_ms, u64::MAX);
    }
}
