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
//!
//! `{measure}` is `conc`, `rpm`, `tpm`, `mtok` or `musd` ([`LimitMeasure`]).

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
    let measure = match measure {
        LimitMeasure::ConcurrentRequests => "conc",
        LimitMeasure::RequestsPerMinute => "rpm",
        LimitMeasure::TokensPerMinute => "tpm",
        LimitMeasure::MonthlyTokens => "mtok",
        LimitMeasure::MonthlyBudget => "musd",
    };
    match of {
        LimitOf::Tenant(tenant) => format!("sluice:t:{tenant}:{measure}"),
        LimitOf::TenantModel { tenant, model } => format!("sluice:tm:{tenant}:{model}:{measure}"),
        LimitOf::Provider(provider) => format!("sluice:p:{provider}:{measure}"),
    }
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
    fn every_tag_is_distinct() {
        let tags = [tag::RATE, tag::SLOTS, tag::MONTH, tag::QUEUE, tag::WORKERS];
        for (i, a) in tags.iter().enumerate() {
            assert!(!tags[i + 1..].contains(a), "tag {} twice", *a as char);
        }
    }
}
