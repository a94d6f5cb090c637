//! Counters and histograms, named so that Envoy's `stats_tags` turn labels into real
//! Prometheus labels: `sluice_requests_total;tenant=acme;model=gpt-4.1;...`. Custom
//! stats land in Envoy's `wasmcustom` namespace, which the Prometheus output strips.
//!
//! The host caches one metric id per [`MetricKey`] (small integers, no strings), so a
//! name is built only the first time a label combination is seen in a VM.

use crate::accounting::Ending;
use crate::cache::CacheOutcome;
use crate::policy::{ModelId, Policy, ProviderId, TenantId};
use crate::usage::TokenUsage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    Requests,
    InputTokens,
    CachedInputTokens,
    CacheCreationTokens,
    OutputTokens,
    ReasoningTokens,
    CostMicroUsd,
    EstimatedUsage,
}

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::Requests,
        Counter::InputTokens,
        Counter::CachedInputTokens,
        Counter::CacheCreationTokens,
        Counter::OutputTokens,
        Counter::ReasoningTokens,
        Counter::CostMicroUsd,
        Counter::EstimatedUsage,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Counter::Requests => "sluice_requests_total",
            Counter::InputTokens => "sluice_input_tokens_total",
            Counter::CachedInputTokens => "sluice_cached_input_tokens_total",
            Counter::CacheCreationTokens => "sluice_cache_creation_tokens_total",
            Counter::OutputTokens => "sluice_output_tokens_total",
            Counter::ReasoningTokens => "sluice_reasoning_tokens_total",
            Counter::CostMicroUsd => "sluice_cost_micro_usd_total",
            Counter::EstimatedUsage => "sluice_estimated_usage_total",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Histogram {
    /// Request sent upstream to response headers received.
    UpstreamLatencyMs,
    /// Request sent upstream to first response body byte (streams and JSON alike).
    TimeToFirstTokenMs,
}

impl Histogram {
    pub fn name(self) -> &'static str {
        match self {
            Histogram::UpstreamLatencyMs => "sluice_upstream_latency_ms",
            Histogram::TimeToFirstTokenMs => "sluice_time_to_first_token_ms",
        }
    }
}

/// How a request ended, as the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The provider answered 2xx and the response completed.
    Success,
    /// The provider refused the request as the client's fault (4xx other than 429).
    ClientError,
    /// The provider failed: 429, 5xx, reset, unreachable, cut mid-response.
    UpstreamError,
    /// The gateway refused the request itself; see `reason`.
    Rejected,
    /// The client went away before the response completed.
    Aborted,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::ClientError => "client_error",
            Outcome::UpstreamError => "upstream_error",
            Outcome::Rejected => "rejected",
            Outcome::Aborted => "aborted",
        }
    }
}

/// The label values of one series, as ids into the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Labels {
    pub tenant: Option<TenantId>,
    pub model: Option<ModelId>,
    pub provider: Option<ProviderId>,
    pub outcome: Outcome,
    /// Why a request was rejected (`x-sluice-reason` value), `none` otherwise.
    pub reason: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MetricKey {
    Counter(Counter, Labels),
    Histogram(Histogram, Option<ProviderId>, Option<ModelId>),
    /// Histogram of time spent waiting for a full provider, by provider and tier.
    QueueWait(ProviderId, Option<TenantId>),
    /// Gauge: requests waiting for a provider, by priority (set from the shared queue).
    QueueWaiting(ProviderId, u8),
    /// Gauge: requests in flight to a provider with a capacity.
    QueueInFlight(ProviderId),
    /// Counter: something that happened between this worker and the quota service.
    Global(GlobalEvent),
    /// Counter: what the response cache did, by tenant and model.
    Cache(Option<TenantId>, Option<ModelId>, CacheOutcome),
    /// Counter: compare-and-set writes to shared data lost to another worker (each one
    /// retried): the contention between workers.
    CasRetries,
    /// Counter: attempts that failed and sent their request on to the model's next
    /// deployment, by model, the failing provider account and why.
    Fallback(Option<ModelId>, ProviderId, FallbackReason),
}

/// Why an attempt handed its request to the next deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FallbackReason {
    /// 429.
    RateLimited,
    /// 529 (Anthropic's overloaded).
    Overloaded,
    /// Another 5xx.
    ServerError,
    /// A reset or a connect failure.
    NoResponse,
    /// Another status the configuration names.
    Other,
}

impl FallbackReason {
    pub fn of(status: u16) -> Self {
        match status {
            0 => FallbackReason::NoResponse,
            429 => FallbackReason::RateLimited,
            529 => FallbackReason::Overloaded,
            500..=599 => FallbackReason::ServerError,
            _ => FallbackReason::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::RateLimited => "rate_limited",
            FallbackReason::Overloaded => "overloaded",
            FallbackReason::ServerError => "server_error",
            FallbackReason::NoResponse => "no_response",
            FallbackReason::Other => "other_status",
        }
    }
}

/// Events of the global limits engine, each its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GlobalEvent {
    /// A request's global limits were decided locally: the quota service did not answer
    /// and `on_engine_failure` is `local`.
    Fallback,
    /// A settlement failed and will be tried again.
    SettlementRetried,
    /// A settlement ran out of tries (logged with its content, for reconciliation).
    SettlementLost,
    /// Leases found expired at renewal (their slots had gone back).
    LeaseLost,
}

impl GlobalEvent {
    pub const ALL: [GlobalEvent; 4] = [
        GlobalEvent::Fallback,
        GlobalEvent::SettlementRetried,
        GlobalEvent::SettlementLost,
        GlobalEvent::LeaseLost,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GlobalEvent::Fallback => "sluice_global_fallbacks_total",
            GlobalEvent::SettlementRetried => "sluice_global_settlement_retries_total",
            GlobalEvent::SettlementLost => "sluice_global_settlements_lost_total",
            GlobalEvent::LeaseLost => "sluice_global_leases_lost_total",
        }
    }
}

/// Where metrics go: Envoy stats in the wasm build, a map in tests.
pub trait Metrics {
    fn add(&mut self, key: MetricKey, value: u64);
}

const NONE: &str = "none";
const CAS_RETRIES: &str = "sluice_shared_data_cas_retries_total";

/// The full stat name for a key; tag values are the policy's names.
pub fn stat_name(policy: &Policy, key: &MetricKey) -> String {
    let tenant = |t: Option<TenantId>| {
        t.and_then(|t| policy.tenant(t))
            .map_or(NONE, |t| t.id.as_str())
    };
    let model = |m: Option<ModelId>| {
        m.and_then(|m| policy.model(m))
            .map_or(NONE, |m| m.name.as_str())
    };
    let provider = |p: Option<ProviderId>| {
        p.and_then(|p| policy.provider(p))
            .map_or(NONE, |p| p.name.as_str())
    };
    match key {
        MetricKey::Counter(c, l) if *c == Counter::Requests => format!(
            "{};tenant={};model={};provider={};outcome={};reason={}",
            c.name(),
            tenant(l.tenant),
            model(l.model),
            provider(l.provider),
            l.outcome.as_str(),
            l.reason
        ),
        MetricKey::Counter(c, l) => format!(
            "{};tenant={};model={};provider={}",
            c.name(),
            tenant(l.tenant),
            model(l.model),
            provider(l.provider)
        ),
        MetricKey::Histogram(h, p, m) => {
            format!("{};provider={};model={}", h.name(), provider(*p), model(*m))
        }
        MetricKey::QueueWait(p, t) => format!(
            "sluice_queue_wait_ms;provider={};tier={}",
            provider(Some(*p)),
            t.and_then(|t| policy.tenant(t))
                .map_or(NONE, |t| t.tier.as_str())
        ),
        MetricKey::QueueInFlight(p) => {
            format!("sluice_queue_in_flight;provider={}", provider(Some(*p)))
        }
        MetricKey::Global(event) => event.name().to_string(),
        MetricKey::CasRetries => CAS_RETRIES.to_string(),
        MetricKey::Fallback(m, p, reason) => format!(
            "sluice_fallbacks_total;model={};provider={};reason={}",
            model(*m),
            provider(Some(*p)),
            reason.as_str()
        ),
        MetricKey::Cache(t, m, outcome) => format!(
            "sluice_cache_requests_total;tenant={};model={};cache={}",
            tenant(*t),
            model(*m),
            outcome.as_str()
        ),
        MetricKey::QueueWaiting(p, priority) => {
            format!(
                "sluice_queue_waiting;provider={};priority={priority}",
                provider(Some(*p))
            )
        }
    }
}

/// Labels the series for token and cost counters: only tenant/model/provider vary, so
/// outcome and reason are fixed to keep one series per tenant/model/provider.
fn usage_labels(
    tenant: Option<TenantId>,
    model: Option<ModelId>,
    provider: Option<ProviderId>,
) -> Labels {
    Labels {
        tenant,
        model,
        provider,
        outcome: Outcome::Success,
        reason: NONE,
    }
}

/// Every metric of a request that ended: the request counter, its tokens and cost, the
/// upstream timings and its wait for a full provider.
pub fn record_ending(metrics: &mut impl Metrics, ending: &Ending) {
    let tenant = ending.owner.map(|o| o.tenant);
    let (model, provider) = (ending.model, ending.provider);
    if let (Some(wait), Some(p)) = (ending.queue_wait_ms, provider) {
        metrics.add(MetricKey::QueueWait(p, tenant), wait);
    }
    if ending.limits_engine == Some("local_fallback") {
        metrics.add(MetricKey::Global(GlobalEvent::Fallback), 1);
    }
    let labels = Labels {
        tenant,
        model,
        provider,
        outcome: ending.outcome,
        reason: ending.reason.unwrap_or(NONE),
    };
    metrics.add(MetricKey::Counter(Counter::Requests, labels), 1);
    // Every attempt followed by another was a fallback.
    for pair in ending.attempts.windows(2) {
        if let Some(failed) = pair.first() {
            let reason = FallbackReason::of(failed.status);
            metrics.add(MetricKey::Fallback(model, failed.provider, reason), 1);
        }
    }
    if let Some(cache) = ending.cache {
        metrics.add(MetricKey::Cache(tenant, model, cache), 1);
    }
    // Token counters count what providers did: a hit's tokens were counted at its miss.
    // Its cost is what the tenant was charged for it (`hit_price`).
    let hit = ending.cache == Some(CacheOutcome::Hit);
    let usage = if hit {
        TokenUsage::default()
    } else {
        ending.usage.usage
    };
    let labels = usage_labels(tenant, model, provider);
    // Every kind, zeros included, once a request was routed: a tenant's series exist from
    // its first request (dashboards show 0, not a gap). The host only defines a series for
    // a zero; it increments nothing.
    let routed = provider.is_some();
    for (counter, value) in [
        (Counter::InputTokens, usage.input_tokens),
        (Counter::CachedInputTokens, usage.cached_input_tokens),
        (Counter::CacheCreationTokens, usage.cache_creation_tokens),
        (Counter::OutputTokens, usage.output_tokens),
        (Counter::ReasoningTokens, usage.reasoning_tokens),
        (Counter::CostMicroUsd, ending.cost_micro_usd),
        (
            Counter::EstimatedUsage,
            u64::from(ending.usage.estimated && !hit),
        ),
    ] {
        if value > 0 || routed {
            metrics.add(MetricKey::Counter(counter, labels), value);
        }
    }
    if let Some(latency) = ending.latency {
        let key = MetricKey::Histogram(Histogram::UpstreamLatencyMs, provider, model);
        metrics.add(key, latency.upstream_ms);
        if let Some(first) = latency.first_byte_ms {
            let key = MetricKey::Histogram(Histogram::TimeToFirstTokenMs, provider, model);
            metrics.add(key, first);
        }
    }
}

/// Envoy `stats_tags` entries for these names (also in the Envoy configs and README).
pub const STATS_TAGS: [(&str, &str); 8] = [
    ("tenant", "(;tenant=([^;]*))"),
    ("model", "(;model=([^;]*))"),
    ("provider", "(;provider=([^;]*))"),
    ("outcome", "(;outcome=([^;]*))"),
    ("reason", "(;reason=([^;]*))"),
    ("tier", "(;tier=([^;]*))"),
    ("priority", "(;priority=([^;]*))"),
    ("cache", "(;cache=([^;]*))"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::MeterResult;

    #[derive(Default)]
    struct Added(Vec<(MetricKey, u64)>);

    impl Metrics for Added {
        fn add(&mut self, key: MetricKey, value: u64) {
            self.0.push((key, value));
        }
    }

    fn counters(ending: &Ending) -> Vec<(Counter, u64)> {
        let mut added = Added::default();
        record_ending(&mut added, ending);
        added
            .0
            .into_iter()
            .filter_map(|(key, value)| match key {
                MetricKey::Counter(c, _) if c != Counter::Requests => Some((c, value)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_routed_request_defines_every_token_series_even_at_zero() {
        let usage = MeterResult {
            usage: TokenUsage {
                input_tokens: 5,
                ..TokenUsage::default()
            },
            ..MeterResult::default()
        };
        let routed = Ending {
            provider: Some(ProviderId::new(0)),
            model: Some(ModelId::new(0)),
            ..Ending::new(Outcome::Success, 200, usage)
        };
        let added = counters(&routed);
        assert_eq!(added.len(), 7, "{added:?}");
        assert!(added.contains(&(Counter::InputTokens, 5)));
        assert!(added.contains(&(Counter::ReasoningTokens, 0)));
        // A refusal before routing adds no token series.
        let refused = Ending::new(Outcome::Rejected, 401, MeterResult::default());
        assert!(counters(&refused).is_empty());
    }

    #[test]
    fn queue_metrics_carry_tier_and_priority_labels() {
        let name = "sluice_queue_wait_ms;provider=openai;tier=gold";
        assert!(STATS_TAGS.iter().any(|(t, _)| *t == "tier") && name.contains(";tier="));
        assert!(STATS_TAGS.iter().any(|(t, _)| *t == "priority"));
    }

    #[test]
    fn tag_regexes_take_every_label_out_of_the_name() {
        let name = "sluice_requests_total;tenant=acme;model=gpt-4.1;provider=openai;outcome=success;reason=none";
        let mut rest = name.to_string();
        for (tag, _) in STATS_TAGS {
            let marker = format!(";{tag}=");
            let Some(start) = rest.find(&marker) else {
                continue;
            };
            let end = rest[start + 1..]
                .find(';')
                .map_or(rest.len(), |i| start + 1 + i);
            rest.replace_range(start..end, "");
        }
        assert_eq!(rest, "sluice_requests_total");
    }
}
