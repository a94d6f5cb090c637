//! The quota service's API, shared by the filter (which calls it through an Envoy cluster)
//! and `sluice-quota` (which answers it from Redis): JSON over HTTP, one POST path per
//! operation. A field neither side knows is an error, so a filter and a service of
//! different versions fail loudly instead of miscounting.
//!
//! Keys are built by the filter from the keyspace (`shared/keys.rs`, [`global_limit`]);
//! monthly keys are sent without their month, which the service takes from Redis's clock.
//! Errors are any non-200 status with a body `{"error": "<message>"}`.
//!
//! [`global_limit`]: crate::shared::keys::global_limit

use crate::limits::{Demand, LimitKind, Snapshot};
use serde::{Deserialize, Serialize};

pub const ADMIT_PATH: &str = "/v1/admit";
pub const ADMIT_BATCH_PATH: &str = "/v1/admit-batch";
pub const SETTLE_PATH: &str = "/v1/settle";
pub const RENEW_PATH: &str = "/v1/renew";
pub const PEEK_PATH: &str = "/v1/peek";
pub const HEALTH_PATH: &str = "/healthz";
pub const CACHE_LOOKUP_PATH: &str = "/v1/cache/lookup";
pub const CACHE_STORE_PATH: &str = "/v1/cache/store";
pub const CACHE_RELEASE_PATH: &str = "/v1/cache/release";

/// Takes all of a request's global demands, or none (one atomic script).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitRequest {
    /// Unique per request (made by the filter): it names the request's concurrency leases
    /// and the reservation record that makes its settlement count once.
    pub id: String,
    /// How long a concurrency lease lives unless renewed ([`RenewRequest`]).
    pub lease_ms: u64,
    /// How long the reservation record waits for its settlement; after that a retried
    /// settlement is treated as a duplicate and the reservation stays charged.
    pub hold_ms: u64,
    /// In the order of the local decision: concurrency first, then rates, then months.
    pub demands: Vec<Demand>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdmitReply {
    /// Every demand was taken: one snapshot per demand, in order. `month` is the month
    /// (`year * 12 + month - 1`, from Redis's clock) monthly demands were charged to.
    Admitted {
        snapshots: Vec<Snapshot>,
        month: u32,
    },
    /// Demand `index` was the first that could not be met, and nothing was taken.
    /// `retry_after_ms` as in [`Admission::Rejected`](crate::limits::Admission::Rejected).
    Rejected {
        index: usize,
        retry_after_ms: Option<u64>,
        snapshot: Snapshot,
    },
}

/// Several admissions in one call: what one Envoy worker has waiting while its previous
/// call is answered. Each is decided on its own, exactly as [`ADMIT_PATH`] decides one
/// (its own atomic script), so one's refusal or bad request changes nothing for another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitBatch {
    pub admissions: Vec<AdmitRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmitBatchReply {
    /// One per admission, in order.
    pub outcomes: Vec<AdmitOutcome>,
}

/// One admission's decision, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AdmitOutcome {
    Decided(AdmitReply),
    Failed { error: String },
}

/// Settles finished requests; each settlement counts at most once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    pub settlements: Vec<Settlement>,
}

/// What one admitted request used, against what it reserved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settlement {
    /// The [`AdmitRequest::id`] of the admission.
    pub id: String,
    /// [`AdmitReply::Admitted::month`]: monthly corrections go to the month charged.
    pub month: u32,
    pub items: Vec<SettleItem>,
}

/// One limit's correction, with the semantics of the local `Limiter::settle`: rates refund
/// or charge the difference, concurrency releases the request's lease, months add
/// `actual - reserved` (never below zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleItem {
    pub key: String,
    pub kind: LimitKind,
    pub reserved: u64,
    pub actual: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleReply {
    /// One per settlement, in order.
    pub outcomes: Vec<SettleOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SettleOutcome {
    Settled,
    /// No reservation record: settled before (a retry whose first answer was lost), or
    /// held past `hold_ms`. Nothing was changed.
    Duplicate,
}

/// Extends the leases of requests still in flight, from the Envoy that holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub lease_ms: u64,
    pub leases: Vec<Lease>,
}

/// A concurrency slot held by request `id` under the limit `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub key: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewReply {
    pub renewed: u32,
    /// Leases that had already expired (their slot went back): not recreated.
    pub lost: u32,
}

/// Reads limits without changing them (`GET /v1/sluice/usage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeekRequest {
    pub limits: Vec<PeekItem>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeekItem {
    pub key: String,
    pub kind: LimitKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeekReply {
    /// One per item, in order.
    pub readings: Vec<Reading>,
}

/// A limit's state now, and how much of it is used: rate, whole units below capacity
/// (more than the capacity in debt); concurrency, slots held; month, this month's total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub snapshot: Snapshot,
    pub used: u64,
}

/// Looks a response up in the global cache; if nobody is fetching it, the caller is
/// made its fetcher (a fill lock of `fill_ms`); if somebody is, the service waits for that
/// fill, up to `wait_ms`, before it answers.
///
/// The answer is a 200 `application/octet-stream` body whose first byte says what was
/// found ([`cache_answer`]): a hit is followed by the entry's bytes, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheLookup {
    /// The tenant's id: its entries share a hash tag ([`cache_entry`]).
    ///
    /// [`cache_entry`]: crate::shared::keys::cache_entry
    pub tenant: String,
    /// The cache key, 64 lowercase hex digits.
    pub key: String,
    pub fill_ms: u64,
    pub wait_ms: u64,
}

/// First byte of a [`CacheLookup`] answer.
pub mod cache_answer {
    /// Found: the entry's bytes follow.
    pub const HIT: u8 = b'H';
    /// Not found and nobody was fetching it: the caller fetches it and then stores or
    /// releases it.
    pub const FILL: u8 = b'F';
    /// Not found, and another request still held the fill when the wait ran out: go
    /// upstream, store nothing.
    pub const BUSY: u8 = b'B';
}

/// Stores a response in the global cache, replacing the fill lock of its key. The call's
/// body is this JSON on one line, a `\n`, then the entry's bytes (opaque to the service).
/// Entries live `ttl_ms`; when the tenant's entries would exceed `tenant_max_bytes`, the
/// ones closest to expiry are evicted first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheStoreHeader {
    pub tenant: String,
    pub key: String,
    pub ttl_ms: u64,
    pub tenant_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheStored {
    /// False when the entry alone is larger than `tenant_max_bytes`.
    pub stored: bool,
    /// Entries of the tenant evicted to make room.
    pub evicted: u32,
}

/// Gives up a fill lock (the fetch failed or was not storable), so that a waiting request
/// can fetch instead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRelease {
    pub tenant: String,
    pub key: String,
}

/// The body of every non-200 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorReply {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_shapes_are_stable() {
        let admit = AdmitRequest {
            id: "r1".into(),
            lease_ms: 30_000,
            hold_ms: 3_600_000,
            demands: vec![Demand {
                key: "sluice:{t:acme}:rpm".into(),
                kind: LimitKind::Rate {
                    per_minute: 10,
                    burst_milli: 1000,
                },
                amount: 1,
            }],
        };
        assert_eq!(
            serde_json::to_string(&admit).unwrap(),
            r#"{"id":"r1","lease_ms":30000,"hold_ms":3600000,"demands":[{"key":"sluice:{t:acme}:rpm","kind":{"rate":{"per_minute":10,"burst_milli":1000}},"amount":1}]}"#
        );
        let reply: AdmitReply = serde_json::from_str(
            r#"{"decision":"rejected","index":0,"retry_after_ms":null,"snapshot":{"limit":5,"remaining":0,"reset_ms":0}}"#,
        )
        .unwrap();
        assert!(matches!(reply, AdmitReply::Rejected { index: 0, .. }));
        let concurrency: LimitKind = serde_json::from_str(r#"{"concurrency":{"max":3}}"#).unwrap();
        assert_eq!(concurrency, LimitKind::Concurrency { max: 3 });
        assert!(serde_json::from_str::<LimitKind>(r#"{"concurrency":{"max":3,"x":1}}"#).is_err());
        assert_eq!(
            serde_json::to_string(&SettleOutcome::Duplicate).unwrap(),
            r#""duplicate""#
        );
    }
}
