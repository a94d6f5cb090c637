//! Which limits apply to a request, the one decision over all of them, what the client
//! is told (rate-limit headers, 429s, quota errors), and settlement at the end.
//!
//! Each limit's key comes from the keyspace (`shared/keys.rs`).

use crate::errors::{ApiError, ApiFlavour, ErrorKind};
use crate::limits::{
    format_reset, rfc3339, Admission, Demand, LimitKind, Limiter, Snapshot, Taken,
};
use crate::policy::{
    LimitId, LimitMeasure, LimitScope, Limits, ModelId, Policy, ProviderId, TenantId,
};
use crate::shared::keys::{self, LimitOf};
use crate::shared::Store;

/// What a request is expected to use, reserved at admission and settled at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    /// Estimated prompt tokens plus the output cap.
    pub tokens: u64,
    pub cost_micro_usd: u64,
}

/// What admission took, by limit, to settle exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Held {
    pub items: Vec<(LimitId, Taken)>,
    pub reserved: Reservation,
}

/// An admitted request: what it holds and the rate-limit headers for its response.
#[derive(Debug)]
pub struct Admitted {
    pub held: Held,
    pub headers: Vec<(String, String)>,
}

fn push_limits(
    out: &mut Vec<(LimitId, Demand)>,
    scope: LimitScope,
    of: LimitOf<'_>,
    limits: &Limits,
    reservation: Reservation,
) {
    let rate = |per_minute| LimitKind::Rate {
        per_minute,
        burst_milli: limits.burst_milli,
    };
    let monthly = |limit| LimitKind::Monthly { limit };
    // Concurrency first: the scarcest and cheapest to roll back.
    let configured = [
        (
            LimitMeasure::ConcurrentRequests,
            limits
                .concurrent_requests
                .map(|max| LimitKind::Concurrency { max }),
            1,
        ),
        (
            LimitMeasure::RequestsPerMinute,
            limits.requests_per_minute.map(rate),
            1,
        ),
        (
            LimitMeasure::TokensPerMinute,
            limits.tokens_per_minute.map(rate),
            reservation.tokens,
        ),
        (
            LimitMeasure::MonthlyTokens,
            limits.monthly_tokens.map(monthly),
            reservation.tokens,
        ),
        (
            LimitMeasure::MonthlyBudget,
            limits.monthly_budget_micro_usd.map(monthly),
            reservation.cost_micro_usd,
        ),
    ];
    for (measure, kind, amount) in configured {
        if let Some(kind) = kind {
            let key = keys::limit(of, measure);
            out.push((LimitId { scope, measure }, Demand { key, kind, amount }));
        }
    }
}

/// Whose limits apply to a request: its tenant, the tenant on its model, its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parties {
    pub tenant: TenantId,
    pub model: ModelId,
    pub provider: ProviderId,
}

/// Every limit that applies to this request: tenant, tenant+model, provider.
pub fn demands(
    policy: &Policy,
    parties: Parties,
    reservation: Reservation,
) -> Vec<(LimitId, Demand)> {
    let Parties {
        tenant,
        model,
        provider,
    } = parties;
    let mut out = Vec::new();
    let Some(t) = policy.tenant(tenant) else {
        return out;
    };
    let tenant = t.id.as_str();
    push_limits(
        &mut out,
        LimitScope::Tenant,
        LimitOf::Tenant(tenant),
        &t.limits,
        reservation,
    );
    if let (Some(l), Some(m)) = (t.model_limits.get(&model), policy.model(model)) {
        let of = LimitOf::TenantModel {
            tenant,
            model: &m.name,
        };
        push_limits(&mut out, LimitScope::TenantModel, of, l, reservation);
    }
    if let Some(p) = policy.provider(provider) {
        let of = LimitOf::Provider(&p.name);
        push_limits(&mut out, LimitScope::Provider, of, &p.limits, reservation);
    }
    out
}

/// One decision over every applicable limit. A refusal holds nothing.
pub fn admit(
    policy: &Policy,
    store: &dyn Store,
    parties: Parties,
    reservation: Reservation,
    flavour: ApiFlavour,
    now_ms: u64,
) -> Result<Admitted, ApiError> {
    let wanted = demands(policy, parties, reservation);
    if wanted.is_empty() {
        return Ok(Admitted {
            held: Held {
                items: Vec::new(),
                reserved: reservation,
            },
            headers: Vec::new(),
        });
    }
    let list: Vec<Demand> = wanted.iter().map(|(_, d)| d.clone()).collect();

    match Limiter::new(store).admit(&list, now_ms) {
        Admission::Admitted { taken, snapshots } => {
            let ids: Vec<LimitId> = wanted.iter().map(|(id, _)| *id).collect();
            let headers = ratelimit_headers(&ids, &snapshots, flavour, now_ms);
            Ok(Admitted {
                held: Held {
                    items: ids.into_iter().zip(taken).collect(),
                    reserved: reservation,
                },
                headers,
            })
        }
        Admission::Rejected {
            index,
            retry_after_ms,
            snapshot,
        } => {
            let Some((id, demand)) = wanted.get(index) else {
                return Err(ApiError::new(
                    ErrorKind::Internal,
                    "limit index out of range",
                ));
            };
            let whose = scope_text(policy, id.scope, parties);
            Err(refusal(
                *id,
                demand,
                &snapshot,
                retry_after_ms,
                &whose,
                flavour,
                now_ms,
            ))
        }
        // Fail closed: without the shared counters no limit can be enforced.
        Admission::Failed(failure) => Err(ApiError::shared_state("limit", failure)),
    }
}

fn measure_text(m: LimitMeasure) -> &'static str {
    match m {
        LimitMeasure::RequestsPerMinute => "requests per minute (RPM)",
        LimitMeasure::TokensPerMinute => "tokens per minute (TPM)",
        LimitMeasure::ConcurrentRequests => "concurrent requests",
        LimitMeasure::MonthlyTokens => "monthly tokens",
        LimitMeasure::MonthlyBudget => "monthly budget (micro-USD)",
    }
}

/// Whose limit it is, for messages: names from the policy, never parsed back from keys.
fn scope_text(policy: &Policy, scope: LimitScope, parties: Parties) -> String {
    let Parties {
        tenant,
        model,
        provider,
    } = parties;
    let tenant = policy.tenant(tenant).map_or("?", |t| t.id.as_str());
    match scope {
        LimitScope::Tenant => format!("tenant `{tenant}`"),
        LimitScope::TenantModel => {
            format!(
                "tenant `{tenant}` on model `{}`",
                policy.model(model).map_or("?", |m| m.name.as_str())
            )
        }
        LimitScope::Provider => format!(
            "provider `{}`",
            policy.provider(provider).map_or("?", |p| p.name.as_str())
        ),
    }
}

fn refusal(
    id: LimitId,
    demand: &Demand,
    snap: &Snapshot,
    retry_after_ms: Option<u64>,
    whose: &str,
    flavour: ApiFlavour,
    now_ms: u64,
) -> ApiError {
    let what = measure_text(id.measure);
    if id.is_quota() {
        let resets = rfc3339(now_ms.saturating_add(snap.reset_ms).saturating_add(999));
        let msg = format!(
            "You exceeded the {what} quota of {whose}: limit {}, this request needs {}. The quota resets at {resets}.",
            snap.limit, demand.amount
        );
        // No retry hint: an SDK would otherwise retry until the month ends.
        return ApiError::new(ErrorKind::LimitExceeded(id), msg)
            .with_header("x-should-retry", "false");
    }
    let mut err = match retry_after_ms {
        Some(ms) => ApiError::new(
            ErrorKind::LimitExceeded(id),
            format!(
                "Rate limit reached for {what} on {whose}: limit {}, remaining {}, requested {}. Please try again in {}.",
                snap.limit,
                snap.remaining,
                demand.amount,
                format_reset(ms)
            ),
        )
        .retry_after_ms(ms),
        None if id.measure == LimitMeasure::ConcurrentRequests => ApiError::new(
            ErrorKind::LimitExceeded(id),
            format!("Too many concurrent requests for {whose}: limit {}. Retry when one finishes.", snap.limit),
        )
        .retry_after_ms(1000),
        // More than the bucket can ever hold: retrying cannot help.
        None => ApiError::new(
            ErrorKind::LimitExceeded(id),
            format!(
                "Request too large for {whose}: it needs {} but the limit is {} {what}. Lower max_tokens or the input.",
                demand.amount, snap.limit
            ),
        )
        .with_header("x-should-retry", "false"),
    };
    let ids = [id];
    for (n, v) in ratelimit_headers(&ids, std::slice::from_ref(snap), flavour, now_ms) {
        err = err.with_header(&n, v);
    }
    err
}

/// Rate-limit headers for the tenant's own request and token limits.
fn ratelimit_headers(
    ids: &[LimitId],
    snaps: &[Snapshot],
    flavour: ApiFlavour,
    now_ms: u64,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (id, snap) in ids.iter().zip(snaps) {
        if id.scope != LimitScope::Tenant {
            continue;
        }
        let which = match id.measure {
            LimitMeasure::RequestsPerMinute => "requests",
            LimitMeasure::TokensPerMinute => "tokens",
            _ => continue,
        };
        match flavour {
            ApiFlavour::OpenAi => {
                out.push((format!("x-ratelimit-limit-{which}"), snap.limit.to_string()));
                out.push((
                    format!("x-ratelimit-remaining-{which}"),
                    snap.remaining.to_string(),
                ));
                out.push((
                    format!("x-ratelimit-reset-{which}"),
                    format_reset(snap.reset_ms),
                ));
            }
            ApiFlavour::Anthropic => {
                out.push((
                    format!("anthropic-ratelimit-{which}-limit"),
                    snap.limit.to_string(),
                ));
                out.push((
                    format!("anthropic-ratelimit-{which}-remaining"),
                    snap.remaining.to_string(),
                ));
                out.push((
                    format!("anthropic-ratelimit-{which}-reset"),
                    // Rounded up to the second: a client waiting until then is not early.
                    rfc3339(now_ms.saturating_add(snap.reset_ms).saturating_add(999)),
                ));
            }
        }
    }
    out
}

/// Settles what admission took against the real usage: refunds or charges the token and
/// cost reservations, releases concurrency slots. Returns failures for the host to log.
pub fn settle(
    store: &dyn Store,
    held: &Held,
    actual_tokens: u64,
    actual_cost_micro_usd: u64,
    now_ms: u64,
) -> Vec<String> {
    let limiter = Limiter::new(store);
    let mut failures = Vec::new();
    for (id, taken) in &held.items {
        let actual = match id.measure {
            // A request is a request, whatever it produced.
            LimitMeasure::RequestsPerMinute => continue,
            LimitMeasure::TokensPerMinute | LimitMeasure::MonthlyTokens => actual_tokens,
            LimitMeasure::MonthlyBudget => actual_cost_micro_usd,
            LimitMeasure::ConcurrentRequests => 0,
        };
        if let Err(e) = limiter.settle(taken, actual, now_ms) {
            failures.push(format!("{}: {e:?}", taken.key));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha256_hex;
    use crate::config::compile;
    use crate::shared::MemoryStore;
    use serde_json::json;

    fn policy(tenant_limits: serde_json::Value, provider_limits: serde_json::Value) -> Policy {
        let cfg = json!({
            "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "api_key_env": "K",
                           "limits": provider_limits}],
            "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
            "tiers": {"gold": {"models": ["*"], "limits": tenant_limits}},
            "tenants": [
                {"id": "acme", "tier": "gold", "keys": [{"id": "k", "sha256": sha256_hex("a")}],
                 "model_limits": {"gpt-4.1": {"requests_per_minute": 5}}},
                {"id": "beta", "tier": "gold", "keys": [{"id": "k", "sha256": sha256_hex("b")}]}
            ]
        });
        compile(cfg.to_string().as_bytes(), &|_| Some("key".into())).unwrap()
    }

    const ACME: Parties = Parties {
        tenant: TenantId::new(0),
        model: ModelId::new(0),
        provider: ProviderId::new(0),
    };
    const BETA: Parties = Parties {
        tenant: TenantId::new(1),
        ..ACME
    };

    const RES: Reservation = Reservation {
        tokens: 500,
        cost_micro_usd: 1000,
    };

    #[test]
    fn every_scope_becomes_a_demand() {
        let p = policy(
            json!({"requests_per_minute": 10, "tokens_per_minute": 1000, "concurrent_requests": 2,
                   "monthly_tokens": 100000, "monthly_budget_usd": 1}),
            json!({"requests_per_minute": 100}),
        );
        let keys: Vec<(String, u64)> = demands(&p, ACME, RES)
            .into_iter()
            .map(|(_, d)| (d.key, d.amount))
            .collect();
        assert_eq!(
            keys,
            [
                ("sluice:t:acme:conc".to_string(), 1),
                ("sluice:t:acme:rpm".to_string(), 1),
                ("sluice:t:acme:tpm".to_string(), 500),
                ("sluice:t:acme:mtok".to_string(), 500),
                ("sluice:t:acme:musd".to_string(), 1000),
                ("sluice:tm:acme:gpt-4.1:rpm".to_string(), 1),
                ("sluice:p:openai:rpm".to_string(), 1),
            ]
        );
    }

    #[test]
    fn a_provider_limit_refuses_and_nothing_else_is_held() {
        let p = policy(
            json!({"requests_per_minute": 10}),
            json!({"requests_per_minute": 1}),
        );
        let store = MemoryStore::new();
        assert!(admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).is_ok());
        let err = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 1).unwrap_err();
        assert_eq!(err.kind.reason(), "provider_requests_per_minute");
        assert!(err.message.contains("provider `openai`"), "{}", err.message);
        // beta's own bucket gave back what it took for the refused request: 9 left, not 8.
        let kind = LimitKind::Rate {
            per_minute: 10,
            burst_milli: 1000,
        };
        let snap = Limiter::new(&store)
            .snapshot("sluice:t:beta:rpm", kind, 1)
            .unwrap();
        assert_eq!(snap.remaining, 9);
    }

    #[test]
    fn settlement_refunds_the_unused_reservation() {
        let p = policy(
            json!({"tokens_per_minute": 1000, "concurrent_requests": 1}),
            json!({}),
        );
        let store = MemoryStore::new();
        let first = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap();
        let header = |a: &Admitted, n: &str| {
            a.headers
                .iter()
                .find(|(h, _)| h == n)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(
            header(&first, "x-ratelimit-remaining-tokens").as_deref(),
            Some("500")
        );
        // The single slot is taken until settlement.
        let busy = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap_err();
        assert_eq!(busy.kind.reason(), "concurrent_requests");
        assert!(settle(&store, &first.held, 100, 0, 0).is_empty());
        let second = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap();
        assert_eq!(
            header(&second, "x-ratelimit-remaining-tokens").as_deref(),
            Some("400"),
            "1000 - 100 used - 500 reserved"
        );
    }

    #[test]
    fn exhausted_quota_gives_no_retry_hint() {
        let p = policy(json!({"monthly_tokens": 800}), json!({}));
        let store = MemoryStore::new();
        let held = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0)
            .unwrap()
            .held;
        assert!(settle(&store, &held, 500, 0, 0).is_empty());
        let err = admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap_err();
        let reply = err.reply(ApiFlavour::OpenAi);
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("x-should-retry"), Some("false"));
        assert_eq!(reply.header("retry-after"), None);
        assert!(
            err.message.contains("resets at 1970-02-01T00:00:00Z"),
            "{}",
            err.message
        );
        assert_eq!(err.reply(ApiFlavour::Anthropic).status, 402);
    }

    #[test]
    fn anthropic_clients_get_anthropic_headers() {
        let p = policy(
            json!({"requests_per_minute": 10, "tokens_per_minute": 1000}),
            json!({}),
        );
        let ok = admit(&p, &MemoryStore::new(), BETA, RES, ApiFlavour::Anthropic, 0).unwrap();
        let names: Vec<&str> = ok.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert!(
            names.contains(&"anthropic-ratelimit-requests-remaining"),
            "{names:?}"
        );
        assert!(
            names.contains(&"anthropic-ratelimit-tokens-reset"),
            "{names:?}"
        );
        assert!(
            !names.iter().any(|n| n.starts_with("x-ratelimit")),
            "{names:?}"
        );
    }
}
