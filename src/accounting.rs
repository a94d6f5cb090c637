//! What a finished request cost, how it ended ([`Ending`], what its metrics and record are
//! made of), and the record it leaves for the access log.

use crate::auth::KeyOwner;
use crate::cache::CacheOutcome;
use crate::metrics::Outcome;
use crate::policy::{ModelId, Policy, Price, ProviderId};
use crate::routing::Api;
use crate::usage::{MeterResult, TokenUsage};
use serde::Serialize;

/// Cost in integer micro-USD, rounded to nearest (half up) once per request:
/// uncached input at the input price, cache reads at the cached price, cache writes at
/// the cache-write price, output (reasoning included) at the output price.
pub fn cost_micro_usd(usage: &TokenUsage, price: &Price) -> u64 {
    let micro_per_mtok = u128::from(usage.input_tokens)
        * u128::from(price.input_micro_usd_per_mtok)
        + u128::from(usage.cached_input_tokens) * u128::from(price.cached_input_micro_usd_per_mtok)
        + u128::from(usage.cache_creation_tokens)
            * u128::from(price.cache_write_micro_usd_per_mtok)
        + u128::from(usage.output_tokens) * u128::from(price.output_micro_usd_per_mtok);
    u64::try_from((micro_per_mtok + 500_000) / 1_000_000).unwrap_or(u64::MAX)
}

/// How a request ended, with what was known of it by then: its metrics and its usage
/// record are made of this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub owner: Option<KeyOwner>,
    pub api: Option<Api>,
    pub model: Option<ModelId>,
    pub provider: Option<ProviderId>,
    pub stream: bool,
    pub outcome: Outcome,
    /// Why the gateway refused the request, when it did.
    pub reason: Option<&'static str>,
    /// Status the client got (the provider's, or the gateway's own); 0 if none.
    pub status: u16,
    pub usage: MeterResult,
    pub cost_micro_usd: u64,
    /// Time spent waiting for a full provider, when the request had to wait.
    pub queue_wait_ms: Option<u64>,
    /// Timings of a response that came back from upstream.
    pub latency: Option<Latency>,
    /// Which engine decided its limits (`local`, `global`, `local_fallback`), once
    /// admission took it.
    pub limits_engine: Option<&'static str>,
    /// Its admission's id at the quota service: joins this record to the service's
    /// settlement (and to a lost settlement's log line).
    pub global_id: Option<String>,
    /// What the response cache did, when it is on for the tenant and model.
    pub cache: Option<CacheOutcome>,
    /// Its attempts at the model's deployments, when it had a fallback plan.
    pub attempts: Vec<crate::fallback::Attempt>,
}

/// Times from sending a request upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Latency {
    /// To the response headers.
    pub upstream_ms: u64,
    /// To the first response body byte, if one came.
    pub first_byte_ms: Option<u64>,
}

impl Ending {
    /// An ending that knows nothing of the request yet.
    pub fn new(outcome: Outcome, status: u16, usage: MeterResult) -> Self {
        Ending {
            owner: None,
            api: None,
            model: None,
            provider: None,
            stream: false,
            outcome,
            reason: None,
            status,
            usage,
            cost_micro_usd: 0,
            queue_wait_ms: None,
            latency: None,
            limits_engine: None,
            global_id: None,
            cache: None,
            attempts: Vec::new(),
        }
    }
}

/// The usage record of a request that ended, as one JSON line.
pub fn usage_record(policy: &Policy, request_id: Option<&str>, ending: &Ending) -> String {
    let tenant = ending.owner.and_then(|o| policy.tenant(o.tenant));
    let usage = ending.usage.usage;
    let record = UsageRecord {
        request_id,
        tenant: tenant.map(|t| t.id.as_str()),
        key_id: ending
            .owner
            .and_then(|o| tenant.and_then(|t| t.key_id(o.key))),
        model: ending
            .model
            .and_then(|m| policy.model(m))
            .map(|m| m.name.as_str()),
        provider: ending
            .provider
            .and_then(|p| policy.provider(p))
            .map(|p| p.name.as_str()),
        endpoint: ending.api.map(Api::name),
        stream: ending.stream,
        outcome: ending.outcome,
        reason: ending.reason,
        status: ending.status,
        input_tokens: usage.input_tokens,
        cached_input_tokens: usage.cached_input_tokens,
        cache_creation_tokens: usage.cache_creation_tokens,
        output_tokens: usage.output_tokens,
        reasoning_tokens: usage.reasoning_tokens,
        cost_micro_usd: ending.cost_micro_usd,
        estimated: ending.usage.estimated,
        usage_suspicious: ending.usage.suspicious,
        queue_wait_ms: ending.queue_wait_ms,
        limits_engine: ending.limits_engine,
        global_id: ending.global_id.as_deref(),
        cache: ending.cache.map(CacheOutcome::as_str),
        attempts: (!ending.attempts.is_empty()).then(|| {
            ending
                .attempts
                .iter()
                .map(|a| AttemptRecord {
                    provider: policy.provider(a.provider).map_or("?", |p| p.name.as_str()),
                    status: a.status,
                    ms: a.ms,
                })
                .collect()
        }),
    };
    serde_json::to_string(&record).unwrap_or_else(|_| "{}".into())
}

/// One request's usage record: the billing trail, written to Envoy's access log.
/// Never holds a key or credential: tenants and keys appear by their configured ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRecord<'a> {
    pub request_id: Option<&'a str>,
    pub tenant: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub model: Option<&'a str>,
    pub provider: Option<&'a str>,
    pub endpoint: Option<&'static str>,
    pub stream: bool,
    pub outcome: Outcome,
    /// Why the gateway refused the request, when it did.
    pub reason: Option<&'static str>,
    /// Status the client got (the provider's, or the gateway's own for rejections).
    pub status: u16,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_creation_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub cost_micro_usd: u64,
    /// True when the provider reported no (complete) usage and the gateway estimated it.
    pub estimated: bool,
    /// True when the provider reported usage the gateway had to clamp or ignore.
    pub usage_suspicious: bool,
    /// Time spent waiting for a full provider, when the request had to wait.
    pub queue_wait_ms: Option<u64>,
    /// `local`, `global` or `local_fallback` (the quota service did not answer), for a
    /// request admitted by at least one limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits_engine: Option<&'static str>,
    /// The admission's id at the quota service, when global limits took the request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_id: Option<&'a str>,
    /// `hit`, `miss` or `bypass`, when the response cache is on for the tenant and model.
    /// A hit's tokens are the cached response's; its cost is what the tenant was charged
    /// (the miss's price times `hit_price`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache: Option<&'static str>,
    /// Every attempt of a request with fallback, in order (`provider` above served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<AttemptRecord<'a>>>,
}

/// One attempt at a deployment, in the usage record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttemptRecord<'a> {
    pub provider: &'a str,
    /// The provider's status; 0: no response (reset, connect failure).
    pub status: u16,
    /// From routing to the attempt's end.
    pub ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: u64, cached: u64, write: u64, output: u64) -> Price {
        Price {
            input_micro_usd_per_mtok: input,
            cached_input_micro_usd_per_mtok: cached,
            cache_write_micro_usd_per_mtok: write,
            output_micro_usd_per_mtok: output,
        }
    }

    #[test]
    fn readme_worked_example() {
        // gpt-4.1: $2.00 in, $0.50 cached, $8.00 out per 1M tokens.
        // 1,000 prompt tokens of which 200 cached, 500 output (120 of them reasoning).
        let usage = TokenUsage {
            input_tokens: 800,
            cached_input_tokens: 200,
            cache_creation_tokens: 0,
            output_tokens: 500,
            reasoning_tokens: 120,
        };
        // 800*2 + 200*0.5 + 500*8 = 1600 + 100 + 4000 = 5700 micro-USD = $0.0057
        assert_eq!(
            cost_micro_usd(&usage, &price(2_000_000, 500_000, 2_000_000, 8_000_000)),
            5_700
        );
    }

    #[test]
    fn cache_writes_use_their_own_price_and_rounding_is_half_up() {
        let usage = TokenUsage {
            input_tokens: 1,
            cached_input_tokens: 0,
            cache_creation_tokens: 1,
            output_tokens: 0,
            reasoning_tokens: 0,
        };
        // 1 * 0.3 + 1 * 0.2 = 0.5 micro-USD: rounds up to 1.
        assert_eq!(cost_micro_usd(&usage, &price(300_000, 0, 200_000, 0)), 1);
        // 0.4 rounds down to 0.
        assert_eq!(cost_micro_usd(&usage, &price(200_000, 0, 200_000, 0)), 0);
    }

    #[test]
    fn huge_values_saturate_instead_of_overflowing() {
        let usage = TokenUsage {
            input_tokens: u64::MAX,
            cached_input_tokens: u64::MAX,
            cache_creation_tokens: u64::MAX,
            output_tokens: u64::MAX,
            reasoning_tokens: 0,
        };
        let p = price(
            1_000_000_000_000,
            1_000_000_000_000,
            1_000_000_000_000,
            1_000_000_000_000,
        );
        assert_eq!(cost_micro_usd(&usage, &p), u64::MAX);
    }
}
