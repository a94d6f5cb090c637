//! What the service refuses before Redis sees it: numbers a script could not count exactly
//! (Lua numbers are doubles), and requests whose meaning would be ambiguous.

use super::Error;
use sluice::limits::LimitKind;

/// The largest integer a Lua number holds exactly.
pub(crate) const MAX_EXACT: u64 = 1 << 53;
/// The largest rate capacity, in parts. The scripts floor debt at -2^52 parts, so every sum
/// or difference of levels stays within [`MAX_EXACT`].
pub(crate) const MAX_CAPACITY_PARTS: u64 = 1 << 52;
/// The longest lease or hold (about 8,900 years): `now + 2 * lease` stays exact.
pub(crate) const MAX_DURATION_MS: u64 = 1 << 48;
/// Parts of a unit in a rate bucket (as `sluice::limits` counts them).
const PARTS_PER_UNIT: u64 = 60_000;

/// A limit as the scripts take it: the kind's name and two numbers (rate: per_minute and
/// capacity in parts; concurrency: max; monthly: limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitArgs {
    pub(crate) kind: &'static str,
    pub(crate) first: u64,
    pub(crate) second: u64,
}

pub(crate) fn limit_args(kind: LimitKind, at: &str) -> Result<LimitArgs, Error> {
    match kind {
        LimitKind::Rate {
            per_minute,
            burst_milli,
        } => {
            exact(per_minute, &format!("{at}.kind.rate.per_minute"))?;
            let capacity = u128::from(per_minute)
                * u128::from(burst_milli)
                * u128::from(PARTS_PER_UNIT / 1000);
            if capacity > u128::from(MAX_CAPACITY_PARTS) {
                return Err(Error::BadRequest(format!(
                    "{at}.kind.rate: capacity per_minute * burst_milli * 60 = {capacity} parts \
                     is over 2^52, the most the scripts count exactly"
                )));
            }
            Ok(LimitArgs {
                kind: "rate",
                first: per_minute,
                second: u64::try_from(capacity).unwrap_or(MAX_CAPACITY_PARTS),
            })
        }
        LimitKind::Concurrency { max } => Ok(LimitArgs {
            kind: "concurrency",
            first: exact(max, &format!("{at}.kind.concurrency.max"))?,
            second: 0,
        }),
        LimitKind::Monthly { limit } => Ok(LimitArgs {
            kind: "monthly",
            first: exact(limit, &format!("{at}.kind.monthly.limit"))?,
            second: 0,
        }),
    }
}

/// `value` if a script counts it exactly.
pub(crate) fn exact(value: u64, what: &str) -> Result<u64, Error> {
    if value > MAX_EXACT {
        return Err(Error::BadRequest(format!(
            "{what}: {value} is over 2^53, the most the scripts count exactly"
        )));
    }
    Ok(value)
}

/// A lease or hold time: Redis refuses an expiry of 0, and a longer one than
/// [`MAX_DURATION_MS`] would not be exact.
pub(crate) fn duration(value: u64, what: &str) -> Result<u64, Error> {
    if value == 0 || value > MAX_DURATION_MS {
        return Err(Error::BadRequest(format!(
            "{what}: {value} is not between 1 and 2^48 ms"
        )));
    }
    Ok(value)
}

/// A request id names leases and the reservation record: an empty one would be shared.
pub(crate) fn id(value: &str, what: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::BadRequest(format!("{what} must not be empty")));
    }
    Ok(())
}

/// A concurrency demand takes one lease (named by the request id) or, with 0, only checks.
pub(crate) fn lease_amount(kind: LimitKind, amount: u64, what: &str) -> Result<(), Error> {
    if matches!(kind, LimitKind::Concurrency { .. }) && amount > 1 {
        return Err(Error::BadRequest(format!(
            "{what}: a concurrency demand takes 0 or 1 slot (one lease per request), not {amount}"
        )));
    }
    Ok(())
}

/// One admission checks before it writes, so two demands on one key would each see the
/// other's state untaken; the filter never sends that.
pub(crate) fn distinct_keys<'a>(keys: impl Iterator<Item = &'a str>) -> Result<(), Error> {
    let mut seen = std::collections::HashSet::new();
    for key in keys {
        if !seen.insert(key) {
            return Err(Error::BadRequest(format!(
                "demands: key {key:?} appears twice"
            )));
        }
    }
    Ok(())
}

/// The longest fill lock or wait of a cache lookup: a lookup never holds a fetch, or a
/// caller, longer than this.
pub(crate) const MAX_CACHE_WAIT_MS: u64 = 10 * 60_000;
/// The longest a cached response lives.
pub(crate) const MAX_CACHE_TTL_MS: u64 = 30 * 86_400_000;

/// A cache key: 64 lowercase hex digits (a SHA-256), as the filter names it. Nothing else
/// may reach a Redis key name.
pub(crate) fn cache_key(value: &str, what: &str) -> Result<(), Error> {
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    if value.len() != 64 || !value.bytes().all(hex) {
        return Err(Error::BadRequest(format!(
            "{what}: {value:?} is not 64 lowercase hex digits"
        )));
    }
    Ok(())
}

/// A tenant id is the hash tag of its cache keys (`{t:<tenant>}`): empty would be shared by
/// every misconfigured caller, and a brace would end the tag early.
pub(crate) fn tenant(value: &str, what: &str) -> Result<(), Error> {
    if value.is_empty() || value.contains(['{', '}']) {
        return Err(Error::BadRequest(format!(
            "{what}: {value:?} must be non-empty, without `{{` or `}}`"
        )));
    }
    Ok(())
}

/// A duration of at least `min` and at most `max` ms.
pub(crate) fn ms_between(value: u64, min: u64, max: u64, what: &str) -> Result<u64, Error> {
    if value < min || value > max {
        return Err(Error::BadRequest(format!(
            "{what}: {value} is not between {min} and {max} ms"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_capacity_is_in_parts_and_bounded() {
        let args = limit_args(
            LimitKind::Rate {
                per_minute: 7,
                burst_milli: 1500,
            },
            "demands[0]",
        )
        .unwrap();
        assert_eq!(args.second, 7 * 1500 * 60);
        let too_big = LimitKind::Rate {
            per_minute: 1 << 40,
            burst_milli: 1 << 10,
        };
        let Err(Error::BadRequest(message)) = limit_args(too_big, "demands[2]") else {
            panic!("accepted a capacity over 2^52 parts");
        };
        assert!(message.starts_with("demands[2].kind.rate"), "{message}");
        assert!(limit_args(
            LimitKind::Rate {
                per_minute: u64::MAX,
                burst_milli: 0
            },
            "x"
        )
        .is_err());
    }

    #[test]
    fn numbers_durations_ids_and_keys() {
        assert_eq!(exact(MAX_EXACT, "a"), Ok(MAX_EXACT));
        assert!(exact(MAX_EXACT + 1, "a").is_err());
        assert!(duration(0, "lease_ms").is_err());
        assert_eq!(duration(1, "lease_ms"), Ok(1));
        assert!(duration(MAX_DURATION_MS + 1, "lease_ms").is_err());
        assert!(id("", "id").is_err());
        assert!(lease_amount(LimitKind::Concurrency { max: 5 }, 2, "d").is_err());
        assert!(lease_amount(LimitKind::Monthly { limit: 5 }, 2, "d").is_ok());
        assert!(distinct_keys(["a", "b"].into_iter()).is_ok());
        assert!(distinct_keys(["a", "b", "a"].into_iter()).is_err());
    }

    #[test]
    fn cache_keys_tenants_and_times() {
        let key = "0123456789abcdef".repeat(4);
        assert!(cache_key(&key, "key").is_ok());
        assert!(cache_key(&key.to_uppercase(), "key").is_err());
        assert!(cache_key(&key[1..], "key").is_err());
        assert!(cache_key(&format!("{}g", &key[1..]), "key").is_err());
        assert!(tenant("acme", "tenant").is_ok());
        assert!(tenant("", "tenant").is_err());
        assert!(tenant("a}b", "tenant").is_err());
        assert_eq!(ms_between(0, 0, 5, "wait_ms"), Ok(0));
        assert!(ms_between(0, 1, 5, "fill_ms").is_err());
        assert!(ms_between(6, 1, 5, "fill_ms").is_err());
    }
}
