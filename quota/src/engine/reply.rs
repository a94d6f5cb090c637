//! The scripts' replies (arrays of integers, see the headers of `scripts/*.lua`) back into
//! the wire types. -1 stands for "none" or "never".

use super::Error;
use redis::{FromRedisValue, Value};
use sluice::global::wire::{
    AdmitReply, CacheStored, PeekReply, Reading, RenewReply, SettleOutcome,
};
use sluice::limits::Snapshot;

const ADMITTED: i64 = 0;
const REJECTED: i64 = 1;
const OTHER_MONTH: i64 = 2;
const SNAPSHOT_LEN: usize = 3;

/// A script's answer, or the month Redis's clock is in when the keys named another.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decided<T> {
    Done(T),
    OtherMonth(u32),
}

pub(crate) fn admit(value: Value, demands: usize) -> Result<Decided<AdmitReply>, Error> {
    let numbers = integers(value)?;
    match numbers.as_slice() {
        [OTHER_MONTH, month] => Ok(Decided::OtherMonth(month_of(*month)?)),
        [REJECTED, index, retry_after_ms, snapshot @ ..] => {
            Ok(Decided::Done(AdmitReply::Rejected {
                index: usize::try_from(*index).map_err(|_| unexpected(&numbers))?,
                retry_after_ms: optional_ms(*retry_after_ms)?,
                snapshot: snapshot_of(snapshot)?,
            }))
        }
        [ADMITTED, month, snapshots @ ..] if snapshots.len() == demands * SNAPSHOT_LEN => {
            Ok(Decided::Done(AdmitReply::Admitted {
                snapshots: snapshots
                    .chunks(SNAPSHOT_LEN)
                    .map(snapshot_of)
                    .collect::<Result<_, _>>()?,
                month: month_of(*month)?,
            }))
        }
        _ => Err(unexpected(&numbers)),
    }
}

pub(crate) fn settle(value: Value) -> Result<SettleOutcome, Error> {
    match i64::from_redis_value(value)? {
        0 => Ok(SettleOutcome::Settled),
        1 => Ok(SettleOutcome::Duplicate),
        other => Err(unexpected(&[other])),
    }
}

pub(crate) fn renew(value: Value) -> Result<RenewReply, Error> {
    let numbers = integers(value)?;
    match numbers.as_slice() {
        [renewed, lost] => Ok(RenewReply {
            renewed: count(*renewed)?,
            lost: count(*lost)?,
        }),
        _ => Err(unexpected(&numbers)),
    }
}

pub(crate) fn peek(value: Value, items: usize) -> Result<Decided<PeekReply>, Error> {
    const READING_LEN: usize = SNAPSHOT_LEN + 1;
    let numbers = integers(value)?;
    match numbers.as_slice() {
        [OTHER_MONTH, month] => Ok(Decided::OtherMonth(month_of(*month)?)),
        [ADMITTED, _month, readings @ ..] if readings.len() == items * READING_LEN => {
            let readings = readings
                .chunks(READING_LEN)
                .map(|reading| {
                    Ok(Reading {
                        snapshot: snapshot_of(&reading[..SNAPSHOT_LEN])?,
                        used: unsigned(reading[SNAPSHOT_LEN])?,
                    })
                })
                .collect::<Result<_, Error>>()?;
            Ok(Decided::Done(PeekReply { readings }))
        }
        _ => Err(unexpected(&numbers)),
    }
}

/// What one run of `cache_lookup.lua` found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Looked {
    /// The entry's bytes.
    Hit(Vec<u8>),
    /// The caller holds the fill lock now.
    Fill,
    /// Another call holds it.
    Busy,
}

pub(crate) fn cache_lookup(value: Value) -> Result<Looked, Error> {
    match value {
        Value::BulkString(entry) => Ok(Looked::Hit(entry)),
        Value::Int(1) => Ok(Looked::Fill),
        Value::Int(0) => Ok(Looked::Busy),
        other => Err(Error::Redis(format!(
            "redis: unexpected cache lookup reply {other:?}"
        ))),
    }
}

pub(crate) fn cache_store(value: Value) -> Result<CacheStored, Error> {
    let numbers = integers(value)?;
    match numbers.as_slice() {
        [stored @ (0 | 1), evicted] => Ok(CacheStored {
            stored: *stored == 1,
            evicted: count(*evicted)?,
        }),
        _ => Err(unexpected(&numbers)),
    }
}

pub(crate) fn cache_release(value: Value) -> Result<bool, Error> {
    match i64::from_redis_value(value)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(unexpected(&[other])),
    }
}

fn integers(value: Value) -> Result<Vec<i64>, Error> {
    Ok(Vec::<i64>::from_redis_value(value)?)
}

fn snapshot_of(numbers: &[i64]) -> Result<Snapshot, Error> {
    match numbers {
        [limit, remaining, reset_ms] => Ok(Snapshot {
            limit: unsigned(*limit)?,
            remaining: unsigned(*remaining)?,
            // A bucket that never refills is never full again.
            reset_ms: optional_ms(*reset_ms)?.unwrap_or(u64::MAX),
        }),
        _ => Err(unexpected(numbers)),
    }
}

fn optional_ms(number: i64) -> Result<Option<u64>, Error> {
    match number {
        -1 => Ok(None),
        _ => unsigned(number).map(Some),
    }
}

fn unsigned(number: i64) -> Result<u64, Error> {
    u64::try_from(number).map_err(|_| unexpected(&[number]))
}

fn count(number: i64) -> Result<u32, Error> {
    u32::try_from(number).map_err(|_| unexpected(&[number]))
}

fn month_of(number: i64) -> Result<u32, Error> {
    u32::try_from(number).map_err(|_| unexpected(&[number]))
}

fn unexpected(numbers: &[i64]) -> Error {
    Error::Redis(format!("redis: unexpected script reply {numbers:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn array(numbers: &[i64]) -> Value {
        Value::Array(numbers.iter().map(|n| Value::Int(*n)).collect())
    }

    #[test]
    fn admit_replies() {
        let admitted = admit(array(&[0, 24_322, 10, 9, 6_000]), 1).unwrap();
        assert_eq!(
            admitted,
            Decided::Done(AdmitReply::Admitted {
                snapshots: vec![Snapshot {
                    limit: 10,
                    remaining: 9,
                    reset_ms: 6_000
                }],
                month: 24_322
            })
        );
        let rejected = admit(array(&[1, 2, -1, 5, 0, -1]), 3).unwrap();
        assert_eq!(
            rejected,
            Decided::Done(AdmitReply::Rejected {
                index: 2,
                retry_after_ms: None,
                snapshot: Snapshot {
                    limit: 5,
                    remaining: 0,
                    reset_ms: u64::MAX
                }
            })
        );
        assert_eq!(
            admit(array(&[2, 24_323]), 1).unwrap(),
            Decided::OtherMonth(24_323)
        );
        assert!(admit(array(&[0, 24_322, 10, 9]), 1).is_err());
        assert!(admit(array(&[1, 0, -2, 1, 1, 1]), 1).is_err());
        assert!(admit(Value::Int(0), 1).is_err());
    }

    #[test]
    fn settle_renew_and_peek_replies() {
        assert_eq!(settle(Value::Int(0)).unwrap(), SettleOutcome::Settled);
        assert_eq!(settle(Value::Int(1)).unwrap(), SettleOutcome::Duplicate);
        assert!(settle(Value::Int(7)).is_err());
        assert_eq!(
            renew(array(&[2, 1])).unwrap(),
            RenewReply {
                renewed: 2,
                lost: 1
            }
        );
        let Decided::Done(peeked) = peek(array(&[0, 1, 60, 0, 120_000, 120]), 1).unwrap() else {
            panic!("not a reading");
        };
        assert_eq!(peeked.readings[0].used, 120);
        assert!(peek(array(&[0, 1, 60, 0, 1]), 1).is_err());
    }

    #[test]
    fn cache_replies() {
        let bytes = vec![0, b'\n', 0xff];
        assert_eq!(
            cache_lookup(Value::BulkString(bytes.clone())).unwrap(),
            Looked::Hit(bytes)
        );
        assert_eq!(cache_lookup(Value::Int(1)).unwrap(), Looked::Fill);
        assert_eq!(cache_lookup(Value::Int(0)).unwrap(), Looked::Busy);
        assert!(cache_lookup(Value::Int(2)).is_err());
        assert_eq!(
            cache_store(array(&[1, 3])).unwrap(),
            CacheStored {
                stored: true,
                evicted: 3
            }
        );
        assert!(!cache_store(array(&[0, 0])).unwrap().stored);
        assert!(cache_store(array(&[2, 0])).is_err());
        assert!(cache_release(Value::Int(1)).unwrap());
        assert!(!cache_release(Value::Int(0)).unwrap());
    }
}
