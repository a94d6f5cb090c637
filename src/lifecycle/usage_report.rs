//! `GET /v1/sluice/usage`: a tenant's own view of its limits, answered by the gateway for
//! the calling key: for each limit, how much is used and left, and when it resets. Local
//! limits are read from shared data; global ones from the quota service (one call).

use crate::admission::tenant_plans;
use crate::errors::{ApiError, ErrorKind, LocalReply};
use crate::global::wire::{PeekItem, PeekRequest, Reading};
use crate::limits::{month_index, rfc3339, LimitKind, Limiter};
use crate::policy::{LimitId, LimitMeasure, LimitScope, ModelId, Policy, TenantId};
use crate::shared::Store;
use serde_json::{json, Value};

/// One limit of the report, and where its reading comes from.
#[derive(Debug)]
pub(super) struct Line {
    id: LimitId,
    model: Option<ModelId>,
    kind: LimitKind,
    global: bool,
    /// The reading, once known (local ones at once).
    reading: Option<Reading>,
}

/// A report whose local readings are taken; `peek` lists what the quota service must read.
#[derive(Debug)]
pub(super) struct Draft {
    tenant: TenantId,
    lines: Vec<Line>,
    pub(super) peek: Option<PeekRequest>,
}

/// Reads the tenant's local limits now and lists its global ones.
pub(super) fn draft(
    policy: &Policy,
    store: &dyn Store,
    tenant: TenantId,
    now_ms: u64,
) -> Result<Draft, ApiError> {
    let limiter = Limiter::new(store);
    let mut lines = Vec::new();
    let mut peek = Vec::new();
    for (model, plan) in tenant_plans(policy, tenant) {
        for (id, demand) in plan.local {
            let reading = limiter
                .reading(&demand.key, demand.kind, now_ms)
                .map_err(|e| {
                    ApiError::new(
                        ErrorKind::Internal,
                        format!("The gateway could not read its limit state ({e:?})."),
                    )
                })?;
            lines.push(Line {
                id,
                model,
                kind: demand.kind,
                global: false,
                reading: Some(reading),
            });
        }
        for g in plan.global {
            peek.push(PeekItem {
                key: g.demand.key.clone(),
                kind: g.demand.kind,
            });
            lines.push(Line {
                id: g.id,
                model,
                kind: g.demand.kind,
                global: true,
                reading: None,
            });
        }
    }
    Ok(Draft {
        tenant,
        lines,
        peek: (!peek.is_empty()).then_some(PeekRequest { limits: peek }),
    })
}

impl Draft {
    /// Completes the report with the quota service's readings, in the order asked.
    pub(super) fn complete(mut self, readings: Vec<Reading>) -> Result<Self, ApiError> {
        let mut readings = readings.into_iter();
        for line in self.lines.iter_mut().filter(|l| l.global) {
            let Some(reading) = readings.next() else {
                return Err(ApiError::new(
                    ErrorKind::QuotaEngineUnavailable,
                    "The gateway's quota service answered for fewer limits than asked.",
                ));
            };
            line.reading = Some(reading);
        }
        self.peek = None;
        Ok(self)
    }

    /// The report as the client gets it (OpenAI-style JSON object).
    pub(super) fn reply(&self, policy: &Policy, now_ms: u64) -> LocalReply {
        let tenant = policy.tenant(self.tenant);
        let month = month_index(now_ms);
        let limits: Vec<Value> = self
            .lines
            .iter()
            .filter_map(|line| {
                let reading = line.reading?;
                Some(line_json(policy, line, reading, now_ms))
            })
            .collect();
        let body = json!({
            "object": "sluice.usage",
            "tenant": tenant.map(|t| t.id.as_str()),
            "tier": tenant.map(|t| t.tier.as_str()),
            "month": format!("{:04}-{:02}", month / 12, month % 12 + 1),
            "limits": limits,
        });
        LocalReply::json(200, body.to_string())
    }
}

fn line_json(policy: &Policy, line: &Line, reading: Reading, now_ms: u64) -> Value {
    let snap = reading.snapshot;
    let (unit, scale) = match line.id.measure {
        LimitMeasure::RequestsPerMinute | LimitMeasure::ConcurrentRequests => ("requests", None),
        LimitMeasure::TokensPerMinute | LimitMeasure::MonthlyTokens => ("tokens", None),
        LimitMeasure::MonthlyBudget => ("usd", Some(1_000_000.0)),
    };
    // Budgets are counted in micro-USD and shown in USD.
    let amount = |v: u64| match scale {
        Some(s) => json!(v as f64 / s),
        None => json!(v),
    };
    let resets_at = match line.kind {
        LimitKind::Concurrency { .. } => Value::Null,
        _ => json!(rfc3339(
            now_ms.saturating_add(snap.reset_ms).saturating_add(999)
        )),
    };
    json!({
        "limit_name": line.id.measure.config_name(),
        "scope": match line.id.scope {
            LimitScope::Tenant => "tenant",
            LimitScope::TenantModel => "tenant_model",
            LimitScope::Provider => "provider",
        },
        "model": line.model.and_then(|m| policy.model(m)).map(|m| m.name.as_str()),
        "engine": if line.global { "global" } else { "local" },
        "unit": unit,
        "limit": amount(snap.limit),
        "used": amount(reading.used),
        "remaining": amount(snap.remaining),
        "resets_in_ms": snap.reset_ms,
        "resets_at": resets_at,
    })
}
