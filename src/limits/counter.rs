//! Counters: in-flight slots ([`LimitKind::Concurrency`](super::LimitKind::Concurrency)) and
//! calendar-month totals ([`LimitKind::Monthly`](super::LimitKind::Monthly)).
//!
//! Values:
//! - concurrency (10 bytes): `[1, b'C']`, slots in use (u64 LE);
//! - monthly (14 bytes): `[1, b'M']`, month (u32 LE, [`month_index`]), total (u64 LE).

use super::calendar::{month_index, month_start_ms};
use super::Snapshot;
use crate::shared::codec::{self, fixed_value, Writer};
use crate::shared::keys::tag;

const SLOTS_LEN: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slots {
    max: u64,
}

impl Slots {
    pub(crate) fn new(max: u64) -> Self {
        Slots { max }
    }

    /// Slots in use; 0 if nothing (decodable) is stored.
    pub(crate) fn current(stored: Option<&[u8]>) -> u64 {
        stored
            .and_then(|value| codec::decode(value, tag::SLOTS, |r| r.u64()))
            .unwrap_or(0)
    }

    pub(crate) fn encode(in_use: u64) -> Vec<u8> {
        Writer::new(tag::SLOTS, SLOTS_LEN).u64(in_use).finish()
    }

    /// Slots in use after taking `amount`, if they fit under `max`.
    pub(crate) fn take(&self, in_use: u64, amount: u64) -> Option<u64> {
        in_use
            .checked_add(amount)
            .filter(|total| *total <= self.max)
    }

    pub(crate) fn snapshot(&self, in_use: u64) -> Snapshot {
        Snapshot {
            limit: self.max,
            remaining: self.max.saturating_sub(in_use),
            reset_ms: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MonthTotal {
    pub(crate) month: u32,
    pub(crate) total: u64,
}

fixed_value!(MonthTotal, tag::MONTH, { month: u32, total: u64 });

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quota {
    limit: u64,
}

impl Quota {
    pub(crate) fn new(limit: u64) -> Self {
        Quota { limit }
    }

    /// The total of the current month at `now_ms`. A stored month later than the clock's
    /// (another worker's clock is ahead, or ours went back) stays current rather than
    /// resurrecting the older month; a stored earlier month means a new month from zero.
    pub(crate) fn current(stored: Option<&[u8]>, now_ms: u64) -> MonthTotal {
        let month = month_index(now_ms);
        match stored.and_then(MonthTotal::decode) {
            Some(state) if state.month >= month => state,
            _ => MonthTotal { month, total: 0 },
        }
    }

    pub(crate) fn take(&self, state: MonthTotal, amount: u64) -> Option<MonthTotal> {
        let total = state.total.checked_add(amount)?;
        (total <= self.limit).then_some(MonthTotal { total, ..state })
    }

    /// When a refused `amount` could fit: at the next month, or never if it exceeds the
    /// whole limit.
    pub(crate) fn retry_after_ms(
        &self,
        state: MonthTotal,
        amount: u64,
        now_ms: u64,
    ) -> Option<u64> {
        (amount <= self.limit).then(|| Self::ms_until_month_after(state, now_ms))
    }

    /// Corrects `reserved`, charged to month `charged_month`, to `actual`. If that month is
    /// over, its total is gone: a refund has nothing to come back to, and any excess over
    /// the reservation is charged to the current month, where the settlement lands.
    pub(crate) fn settle(
        state: MonthTotal,
        charged_month: u32,
        reserved: u64,
        actual: u64,
    ) -> MonthTotal {
        let total = if state.month == charged_month {
            state.total.saturating_add(actual).saturating_sub(reserved)
        } else {
            state.total.saturating_add(actual.saturating_sub(reserved))
        };
        MonthTotal { total, ..state }
    }

    pub(crate) fn snapshot(&self, state: MonthTotal, now_ms: u64) -> Snapshot {
        Snapshot {
            limit: self.limit,
            remaining: self.limit.saturating_sub(state.total),
            reset_ms: Self::ms_until_month_after(state, now_ms),
        }
    }

    fn ms_until_month_after(state: MonthTotal, now_ms: u64) -> u64 {
        month_start_ms(state.month.saturating_add(1)).saturating_sub(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JAN_31_2026_END: u64 = 1_769_903_999_999;
    const FEB_1_2026: u64 = 1_769_904_000_000;
    const JAN: u32 = 2026 * 12;
    const FEB: u32 = 2026 * 12 + 1;

    #[test]
    fn slots_take_release_and_garbage() {
        let slots = Slots::new(3);
        assert_eq!(Slots::current(None), 0);
        assert_eq!(Slots::current(Some(b"\x01C")), 0);
        assert_eq!(Slots::current(Some(&Slots::encode(2))), 2);
        assert_eq!(slots.take(2, 1), Some(3));
        assert_eq!(slots.take(3, 1), None);
        assert_eq!(slots.take(3, 0), Some(3));
        assert_eq!(slots.take(u64::MAX, 1), None);
        assert_eq!(
            slots.snapshot(5),
            Snapshot {
                limit: 3,
                remaining: 0,
                reset_ms: 0
            }
        );
    }

    #[test]
    fn month_rolls_over_and_never_back() {
        let jan = MonthTotal {
            month: JAN,
            total: 70,
        };
        assert_eq!(Quota::current(Some(&jan.encode()), JAN_31_2026_END), jan);
        assert_eq!(
            Quota::current(Some(&jan.encode()), FEB_1_2026),
            MonthTotal {
                month: FEB,
                total: 0
            }
        );
        let feb = MonthTotal {
            month: FEB,
            total: 5,
        };
        assert_eq!(Quota::current(Some(&feb.encode()), JAN_31_2026_END), feb);
        assert_eq!(Quota::current(Some(b"junk"), FEB_1_2026).total, 0);
    }

    #[test]
    fn quota_take_retry_and_snapshot() {
        let quota = Quota::new(100);
        let jan = MonthTotal {
            month: JAN,
            total: 70,
        };
        assert_eq!(quota.take(jan, 30).map(|s| s.total), Some(100));
        assert_eq!(quota.take(jan, 31), None);
        assert_eq!(quota.retry_after_ms(jan, 31, JAN_31_2026_END), Some(1));
        assert_eq!(quota.retry_after_ms(jan, 101, JAN_31_2026_END), None);
        assert_eq!(
            quota.snapshot(jan, JAN_31_2026_END - 999),
            Snapshot {
                limit: 100,
                remaining: 30,
                reset_ms: 1_000
            }
        );
        // A stored month ahead of the clock resets at the end of that month.
        let feb = MonthTotal {
            month: FEB,
            total: 0,
        };
        assert_eq!(
            quota.snapshot(feb, JAN_31_2026_END).reset_ms,
            1 + 28 * 86_400_000
        );
    }

    #[test]
    fn monthly_settle() {
        let jan = MonthTotal {
            month: JAN,
            total: 70,
        };
        assert_eq!(Quota::settle(jan, JAN, 30, 10).total, 50);
        assert_eq!(Quota::settle(jan, JAN, 30, 45).total, 85);
        assert_eq!(Quota::settle(jan, JAN, 100, 0).total, 0);
        let feb = MonthTotal {
            month: FEB,
            total: 7,
        };
        assert_eq!(Quota::settle(feb, JAN, 30, 10).total, 7);
        assert_eq!(Quota::settle(feb, JAN, 30, 45).total, 22);
    }
}
