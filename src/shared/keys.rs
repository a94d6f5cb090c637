//! The shared-data keyspace: every key Sluice writes is built here, and every value tag is
//! named here.
//!
//! Envoy's shared data has no delete: a key lives as long as the Envoy process (and across
//! configuration reloads that keep the `vm_id`). So this is a schema: one key per limit or
//! queue, forever, with time windows and months inside the value, never in the key. Keys
//! carry the configuration's names, not policy indices, so counters survive a reload that
//! reorders tenants; changing a key's shape silently resets what it counts.
//!
//! | key | value tag | written by |
//! |-----|-----------|------------|
//! | `sluice:t:{tenant}:{measure}` | `R`, `C` or `M` | limits (a tenant's own limits) |
//! | `sluice:tm:{tenant}:{model}:{measure}` | `R`, `C` or `M` | limits (a tenant on one model) |
//! | `sluice:p:{provider}:{measure}` | `R`, `C` or `M` | limits (a provider account) |
//! | `sluice:q:{provider}` | `Q` | fairness (the provider's queue) |
//! | `sluice:workers` | `W` | fairness (the last worker id handed out) |
//! | `sluice:h:{provider}` | `H` | fallback (a provider account skipped until, failures in a row) |
//! | `sluice:cache:{slot}` | `E` or `F` | the local response cache (`cache/local.rs`) |
//!
//! `{measure}` is `conc`, `rpm`, `tpm`, `mtok` or `musd` ([`LimitMeasure`]).
//!
//! Global limits live in Redis (through the quota service), where keys can expire and be
//! deleted, and where the keys one script touches must share a hash slot on Redis Cluster.
//! There, whose limit it is becomes the hash tag, and a month is part of a monthly key:
//!
//! | Redis key | type | holds |
//! |-----------|------|-------|
//! | `sluice:{t:{tenant}}:{measure}` | hash / zset | a tenant's rate bucket or leases |
//! | `sluice:{t:{tenant}}:m:{model}:{measure}` | hash / zset | a tenant on one model |
//! | `sluice:{p:{provider}}:{measure}` | hash / zset | a provider account |
//! | `{base}:{YYYY-MM}` | string | a monthly total, expiring weeks after its month |
//! | `sluice:{tag}:res:{request id}` | string | an unsettled reservation (idempotent settlement) |
//! | `sluice:{t:{tenant}}:cache:{key}` | string | a cached response (`cache/entry.rs`), with a TTL |
//! | `sluice:{t:{tenant}}:cache:{key}:fill` | string | the fill lock of a key being fetched |
//! | `sluice:{t:{tenant}}:cache:index` | zset | the tenant's entries by expiry (ms) |
//! | `sluice:{t:{tenant}}:cache:sizes` | hash | each indexed entry's size |
//! | `sluice:{t:{tenant}}:cache:bytes` | string | the indexed entries' total size |

use crate::policy::LimitMeasure;

/// Value tags (byte 1 of a value, see `codec.rs`), one per kind of value.
pub(crate) mod tag {
    /// A token bucket (requests or tokens per minute).
    pub const RATE: u8 = b'R';
    /// In-flight slots of a concurrency limit.
    pub const SLOTS: u8 = b'C';
    /// A calendar-month total (tokens or micro-USD).
    pub const MONTH: u8 = b'M';
    /// A provider's fair queue.
    pub const QUEUE: u8 = b'Q';
    /// The worker-id counter.
    pub const WORKERS: u8 = b'W';
    /// A provider account's health (fallback).
    pub const HEALTH: u8 = b'H';
}

/// The key of the worker-id counter.
pub const WORKERS: &str = "sluice:workers";

/// Whose limit a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitOf<'a> {
    Tenant(&'a str),
    TenantModel { tenant: &'a str, model: &'a str },
    Provider(&'a str),
}

/// The key of one limit.
pub fn limit(of: LimitOf<'_>, measure: LimitMeasure) -> String {
    let measure = measure_name(measure);
    match of {
        LimitOf::Tenant(tenant) => format!("sluice:t:{tenant}:{measure}"),
        LimitOf::TenantModel { tenant, model } => format!("sluice:tm:{tenant}:{model}:{measure}"),
        LimitOf::Provider(provider) => format!("sluice:p:{provider}:{measure}"),
    }
}

/// The measure's short name in keys.
fn measure_name(measure: LimitMeasure) -> &'static str {
    match measure {
        LimitMeasure::ConcurrentRequests => "conc",
        LimitMeasure::RequestsPerMinute => "rpm",
        LimitMeasure::TokensPerMinute => "tpm",
        LimitMeasure::MonthlyTokens => "mtok",
        LimitMeasure::MonthlyBudget => "musd",
    }
}

/// The Redis key of one global limit: whose limit it is is the hash tag, so one script
/// can take all of a tenant's limits on Redis Cluster. Monthly limits add the month
/// ([`month_key`]).
pub fn global_limit(of: LimitOf<'_>, measure: LimitMeasure) -> String {
    let measure = measure_name(measure);
    match of {
        LimitOf::Tenant(tenant) => format!("sluice:{{t:{tenant}}}:{measure}"),
        LimitOf::TenantModel { tenant, model } => {
            format!("sluice:{{t:{tenant}}}:m:{model}:{measure}")
        }
        LimitOf::Provider(provider) => format!("sluice:{{p:{provider}}}:{measure}"),
    }
}

/// A monthly limit's Redis key for one month ([`month_index`](crate::limits::month_index)):
/// `{base}:YYYY-MM`.
pub fn month_key(base: &str, month: u32) -> String {
    format!("{base}:{:04}-{:02}", month / 12, month % 12 + 1)
}

/// The hash tag of a Redis key (what Redis Cluster hashes): the text between the first `{`
/// and the next `}`, if it is not empty.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = key.get(open + 1..)?;
    let close = rest.find('}')?;
    (close > 0).then(|| &rest[..close])
}

/// The Redis key recording request `id`'s unsettled reservation, in the hash slot of `key`
/// (a key of the same script).
pub fn reservation(key: &str, id: &str) -> String {
    match hash_tag(key) {
        Some(tag) => format!("sluice:{{{tag}}}:res:{id}"),
        None => format!("sluice:res:{id}"),
    }
}

/// The shared-data key of local cache slot `slot`.
pub fn cache_slot(slot: u32) -> String {
    format!("sluice:cache:{slot}")
}

/// The Redis key of a tenant's cached response (`key`: the cache key in hex). The tenant's
/// other cache keys are this with a suffix (`:fill`) or its siblings `index`, `sizes`,
/// `bytes` ([`cache_tenant`]).
pub fn cache_entry(tenant: &str, key: &str) -> String {
    format!("sluice:{{t:{tenant}}}:cache:{key}")
}

/// The Redis key of one of a tenant's cache bookkeeping values (`index`, `sizes`, `bytes`).
pub fn cache_tenant(tenant: &str, what: &str) -> String {
    format!("sluice:{{t:{tenant}}}:cache:{what}")
}

/// The key of a provider account's health (fallback).
pub fn health(provider: &str) -> String {
    format!("sluice:h:{provider}")
}

/// The key of a provider's fair queue.
pub fn queue(provider: &str) -> String {
    format!("sluice:q:{provider}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyspace_is_stable() {
        // These strings are a schema: live Envoys hold values under them.
        assert_eq!(
            limit(LimitOf::Tenant("acme"), LimitMeasure::ConcurrentRequests),
            "sluice:t:acme:conc"
        );
        assert_eq!(
            limit(
                LimitOf::TenantModel {
                    tenant: "acme",
                    model: "gpt-4.1"
                },
                LimitMeasure::RequestsPerMinute
            ),
            "sluice:tm:acme:gpt-4.1:rpm"
        );
        assert_eq!(
            limit(LimitOf::Provider("openai"), LimitMeasure::MonthlyBudget),
            "sluice:p:openai:musd"
        );
        assert_eq!(
            limit(LimitOf::Tenant("a"), LimitMeasure::TokensPerMinute),
            "sluice:t:a:tpm"
        );
        assert_eq!(
            limit(LimitOf::Tenant("a"), LimitMeasure::MonthlyTokens),
            "sluice:t:a:mtok"
        );
        assert_eq!(queue("openai"), "sluice:q:openai");
        assert_eq!(WORKERS, "sluice:workers");
    }

    #[test]
    fn global_keys_share_a_hash_tag_per_tenant() {
        let tenant = global_limit(LimitOf::Tenant("acme"), LimitMeasure::RequestsPerMinute);
        assert_eq!(tenant, "sluice:{t:acme}:rpm");
        let model = global_limit(
            LimitOf::TenantModel {
                tenant: "acme",
                model: "gpt-4.1",
            },
            LimitMeasure::MonthlyTokens,
        );
        assert_eq!(model, "sluice:{t:acme}:m:gpt-4.1:mtok");
        assert_eq!(hash_tag(&tenant), hash_tag(&model));
        assert_eq!(
            global_limit(
                LimitOf::Provider("openai"),
                LimitMeasure::ConcurrentRequests
            ),
            "sluice:{p:openai}:conc"
        );
        // 2026-11 is month index 2026 * 12 + 10.
        assert_eq!(
            month_key(&model, 2026 * 12 + 10),
            "sluice:{t:acme}:m:gpt-4.1:mtok:2026-11"
        );
        assert_eq!(reservation(&model, "r1"), "sluice:{t:acme}:res:r1");
        assert_eq!(cache_entry("acme", "ab"), "sluice:{t:acme}:cache:ab");
        assert_eq!(cache_tenant("acme", "index"), "sluice:{t:acme}:cache:index");
        assert_eq!(hash_tag(&cache_entry("acme", "ab")), hash_tag(&tenant));
        assert_eq!(cache_slot(7), "sluice:cache:7");
        assert_eq!(hash_tag("sluice:{}:x"), None);
        assert_eq!(reservation("plain", "r1"), "sluice:res:r1");
    }

    #[test]
    fn every_tag_is_distinct() {
        let tags = [tag::RATE, tag::SLOTS, tag::MONTH, tag::QUEUE, tag::WORKERS];
        for (i, a) in tags.iter().enumerate() {
            assert!(!tags[i + 1..].contains(a), "tag {} twice", *a as char);
        }
    }
}
