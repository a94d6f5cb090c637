//! Which limits apply to a request, the one decision over all of them, what the client
//! is told (rate-limit headers, 429s, quota errors), and settlement at the end.
//!
//! Each limit's key comes from the keyspace (`shared/keys.rs`).

use crate::accounting::cost_micro_usd;
use crate::errors::{ApiError, ApiFlavour, ErrorKind};
use crate::global::wire::{AdmitReply, AdmitRequest, Lease, SettleItem, Settlement};
use crate::limits::{
    format_reset, month_index, rfc3339, Admission, Demand, LimitKind, Limiter, Snapshot, Taken,
};
use crate::policy::{
    LimitId, LimitMeasure, LimitScope, Limits, ModelId, OnEngineFailure, Policy, Price, Provider,
    ProviderId, TenantId,
};
use crate::shared::keys::{self, LimitOf};
use crate::shared::Store;
use crate::usage::TokenUsage;

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
    /// Taken from this Envoy's shared data (local limits, and global ones decided locally
    /// when the quota service failed and the configuration says `local`).
    pub items: Vec<(LimitId, Taken)>,
    /// Taken by the quota service, settled through it.
    pub global: Option<GlobalHeld>,
    /// Global limits were decided locally: the quota service did not answer.
    pub fell_back: bool,
    pub reserved: Reservation,
}

/// What the quota service took for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalHeld {
    /// The admission's id: names its leases and makes its settlement count once.
    pub id: String,
    /// The month (Redis's clock) monthly limits were charged to.
    pub month: u32,
    pub items: Vec<(LimitId, Taken)>,
}

impl Held {
    /// Which engine decided the request's limits, for the usage record.
    pub fn engine(&self) -> &'static str {
        match (&self.global, self.fell_back) {
            (_, true) => "local_fallback",
            (Some(_), false) => "global",
            (None, false) => "local",
        }
    }

    /// The global concurrency slots held: leases to renew while the request runs.
    pub fn leases(&self) -> Vec<Lease> {
        let Some(global) = &self.global else {
            return Vec::new();
        };
        global
            .items
            .iter()
            .filter(|(id, _)| id.measure == LimitMeasure::ConcurrentRequests)
            .map(|(_, taken)| Lease {
                key: taken.key.clone(),
                id: global.id.clone(),
            })
            .collect()
    }
}

/// An admitted request: what it holds and the rate-limit headers for its response.
#[derive(Debug)]
pub struct Admitted {
    pub held: Held,
    pub headers: Vec<(String, String)>,
}

/// A limit the quota service decides: its demand under its Redis key, and its local key
/// for when the service does not answer and the configuration falls back to local limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalDemand {
    pub id: LimitId,
    pub demand: Demand,
    pub local_key: String,
}

/// Every limit that applies to a request, by the engine that decides it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub local: Vec<(LimitId, Demand)>,
    pub global: Vec<GlobalDemand>,
}

fn push_limits(
    out: &mut Plan,
    policy: &Policy,
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
        let Some(kind) = kind else { continue };
        let id = LimitId { scope, measure };
        let key = keys::limit(of, measure);
        if policy.global.as_ref().is_some_and(|g| g.covers(id)) {
            let demand = Demand {
                key: keys::global_limit(of, measure),
                kind,
                amount,
            };
            out.global.push(GlobalDemand {
                id,
                demand,
                local_key: key,
            });
        } else {
            out.local.push((id, Demand { key, kind, amount }));
        }
    }
}

/// The parties whose limits a request must pass: its tenant, its model, its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parties {
    pub tenant: TenantId,
    pub model: ModelId,
    pub provider: ProviderId,
}

/// Every limit that applies to this request (tenant, tenant+model, provider), by engine.
pub fn plan(policy: &Policy, parties: Parties, reservation: Reservation) -> Plan {
    let Parties {
        tenant,
        model,
        provider,
    } = parties;
    let mut out = Plan::default();
    let Some(t) = policy.tenant(tenant) else {
        return out;
    };
    let tenant = t.id.as_str();
    let of = LimitOf::Tenant(tenant);
    push_limits(
        &mut out,
        policy,
        LimitScope::Tenant,
        of,
        &t.limits,
        reservation,
    );
    if let (Some(l), Some(m)) = (t.model_limits.get(&model), policy.model(model)) {
        let of = LimitOf::TenantModel {
            tenant,
            model: &m.name,
        };
        push_limits(
            &mut out,
            policy,
            LimitScope::TenantModel,
            of,
            l,
            reservation,
        );
    }
    if let Some(p) = policy.provider(provider) {
        let of = LimitOf::Provider(&p.name);
        push_limits(
            &mut out,
            policy,
            LimitScope::Provider,
            of,
            &p.limits,
            reservation,
        );
    }
    out
}

/// A tenant's own limits (not its providers'), by engine: its tenant-wide limits, then
/// its limits on each model that has some. For the usage endpoint; amounts are 0.
pub fn tenant_plans(policy: &Policy, tenant: TenantId) -> Vec<(Option<ModelId>, Plan)> {
    let Some(t) = policy.tenant(tenant) else {
        return Vec::new();
    };
    let none = Reservation::default();
    let mut out = Vec::new();
    let mut plan = Plan::default();
    let of = LimitOf::Tenant(&t.id);
    push_limits(&mut plan, policy, LimitScope::Tenant, of, &t.limits, none);
    out.push((None, plan));
    let mut models: Vec<_> = t.model_limits.iter().collect();
    models.sort_by_key(|(id, _)| **id);
    for (&model, limits) in models {
        let Some(m) = policy.model(model) else {
            continue;
        };
        let mut plan = Plan::default();
        let of = LimitOf::TenantModel {
            tenant: &t.id,
            model: &m.name,
        };
        push_limits(&mut plan, policy, LimitScope::TenantModel, of, limits, none);
        out.push((Some(model), plan));
    }
    out
}

/// Where admission stands after the local limits.
#[derive(Debug)]
pub enum Decision {
    /// Every limit that applies is decided, and took the request.
    Admitted(Admitted),
    /// The local limits took the request; the global ones wait for the quota service.
    Pending(PendingGlobal),
}

/// A request whose local limits are taken, waiting for the quota service's decision on
/// its global ones.
#[derive(Debug)]
pub struct PendingGlobal {
    /// What the local limits took (given back if the global decision refuses).
    pub held: Held,
    local_snapshots: Vec<(LimitId, Snapshot)>,
    global: Vec<GlobalDemand>,
    parties: Parties,
    started_ms: u64,
}

/// One decision over every applicable limit. Local limits are decided here and now; if
/// any limit is global, the decision completes with [`PendingGlobal::conclude`] once the
/// quota service answers. A refusal holds nothing.
pub fn admit(
    policy: &Policy,
    store: &dyn Store,
    parties: Parties,
    reservation: Reservation,
    flavour: ApiFlavour,
    now_ms: u64,
) -> Result<Decision, ApiError> {
    let Plan { local, global } = plan(policy, parties, reservation);
    never_fits(policy, store, parties, &local, &global, flavour, now_ms)?;
    let (items, local_snapshots) = take(policy, store, parties, &local, flavour, now_ms)?;
    let held = Held {
        items,
        reserved: reservation,
        ..Held::default()
    };
    if global.is_empty() {
        let (ids, snapshots): (Vec<LimitId>, Vec<Snapshot>) = local_snapshots.into_iter().unzip();
        let headers = ratelimit_headers(&ids, &snapshots, flavour, now_ms);
        return Ok(Decision::Admitted(Admitted { held, headers }));
    }
    Ok(Decision::Pending(PendingGlobal {
        held,
        local_snapshots,
        global,
        parties,
        started_ms: now_ms,
    }))
}

/// The most output tokens a request of `parties` with `prompt_tokens` can still pay for
/// this month, from the tenant's local monthly token and budget limits (`None`: none
/// applies, or one could not be read). Global ones are not read here: one call per request
/// for a clamp is not worth it.
pub fn affordable_output(
    policy: &Policy,
    store: &dyn Store,
    parties: Parties,
    prompt_tokens: u64,
    price: &Price,
    now_ms: u64,
) -> Option<u64> {
    let Plan { local, .. } = plan(policy, parties, Reservation::default());
    let limiter = Limiter::new(store);
    let mut most: Option<u64> = None;
    for (id, demand) in &local {
        let tenants = matches!(id.scope, LimitScope::Tenant | LimitScope::TenantModel);
        let monthly = matches!(
            id.measure,
            LimitMeasure::MonthlyTokens | LimitMeasure::MonthlyBudget
        );
        if !tenants || !monthly {
            continue;
        }
        let left = limiter
            .reading(&demand.key, demand.kind, now_ms)
            .ok()?
            .snapshot
            .remaining;
        let output = if id.measure == LimitMeasure::MonthlyTokens {
            left.saturating_sub(prompt_tokens)
        } else {
            let prompt = TokenUsage {
                input_tokens: prompt_tokens,
                ..TokenUsage::default()
            };
            let budget = left.saturating_sub(cost_micro_usd(&prompt, price));
            match price.output_micro_usd_per_mtok {
                0 => u64::MAX,
                per_mtok => u64::try_from(u128::from(budget) * 1_000_000 / u128::from(per_mtok))
                    .unwrap_or(u64::MAX),
            }
        };
        most = Some(most.map_or(output, |m| m.min(output)));
    }
    most
}

/// A provider account's own limits, by engine, for `reservation`.
fn provider_limits(policy: &Policy, provider: &Provider, reservation: Reservation) -> Plan {
    let mut out = Plan::default();
    let of = LimitOf::Provider(&provider.name);
    push_limits(
        &mut out,
        policy,
        LimitScope::Provider,
        of,
        &provider.limits,
        reservation,
    );
    out
}

/// Whether a provider account's own monthly quota (its `limits`, local engine) is spent:
/// fallback skips such an account like a failed one.
pub fn provider_month_spent(
    policy: &Policy,
    store: &dyn Store,
    provider: ProviderId,
    now_ms: u64,
) -> bool {
    let Some(p) = policy.provider(provider) else {
        return false;
    };
    if p.limits.monthly_tokens.is_none() && p.limits.monthly_budget_micro_usd.is_none() {
        return false;
    }
    let out = provider_limits(policy, p, Reservation::default());
    let limiter = Limiter::new(store);
    out.local.iter().any(|(id, demand)| {
        matches!(
            id.measure,
            LimitMeasure::MonthlyTokens | LimitMeasure::MonthlyBudget
        ) && limiter
            .reading(&demand.key, demand.kind, now_ms)
            .is_ok_and(|r| r.snapshot.remaining == 0)
    })
}

/// Takes a fallback attempt's provider account's own local limits (its rates, month and
/// concurrency) for `reservation`, as admission took the first account's: what was taken,
/// to settle at the end, or nothing when there is no room (the attempt goes anyway; the
/// provider's own answer decides).
pub fn reserve_provider(
    policy: &Policy,
    store: &dyn Store,
    provider: ProviderId,
    reservation: Reservation,
    now_ms: u64,
) -> Vec<(LimitId, Taken)> {
    let Some(p) = policy.provider(provider) else {
        return Vec::new();
    };
    let out = provider_limits(policy, p, reservation);
    let demands: Vec<Demand> = out.local.iter().map(|(_, d)| d.clone()).collect();
    match Limiter::new(store).admit(&demands, now_ms) {
        Admission::Admitted { taken, .. } => {
            out.local.into_iter().map(|(id, _)| id).zip(taken).collect()
        }
        _ => Vec::new(),
    }
}

/// Settles local limits taken for a request to what it used: admission's at the end
/// ([`settle`]), or a fallback attempt's ([`reserve_provider`]: all of the use for the
/// attempt that served, nothing for one that failed).
pub fn settle_items(
    store: &dyn Store,
    items: &[(LimitId, Taken)],
    actual_tokens: u64,
    actual_cost_micro_usd: u64,
    now_ms: u64,
) -> Vec<String> {
    let limiter = Limiter::new(store);
    let mut failures = Vec::new();
    for (id, taken) in items {
        let Some(actual) = actual_of(id.measure, actual_tokens, actual_cost_micro_usd) else {
            continue;
        };
        if let Err(e) = limiter.settle(taken, actual, now_ms) {
            failures.push(format!("{}: {e:?}", taken.key));
        }
    }
    failures
}

/// A request admitted for one provider account was served by another (fallback): the
/// first account gets back its tokens, budget and concurrency (its requests per minute keep
/// the request: the provider saw it), as every failed attempt's account does. The serving account's rates and monthly
/// totals are charged what was used (concurrency is not: the request has ended), unless
/// `reserved`: its attempt took them, and they are settled with that attempt.
/// Local limits only; returns the keys that could not be settled.
#[allow(clippy::too_many_arguments)]
pub fn move_provider_usage(
    policy: &Policy,
    store: &dyn Store,
    held: &mut Held,
    served: ProviderId,
    reserved: bool,
    actual_tokens: u64,
    actual_cost_micro_usd: u64,
    now_ms: u64,
) -> Vec<String> {
    let limiter = Limiter::new(store);
    let (provider_items, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut held.items)
        .into_iter()
        .partition(|(id, _)| id.scope == LimitScope::Provider);
    held.items = kept;
    let mut failures = settle_items(store, &provider_items, 0, 0, now_ms);
    let Some(p) = policy.provider(served).filter(|_| !reserved) else {
        return failures;
    };
    let out = provider_limits(policy, p, Reservation::default());
    for (id, demand) in out.local {
        if matches!(demand.kind, LimitKind::Concurrency { .. }) {
            continue;
        }
        // The request counts once, at the account that served it.
        let actual = match id.measure {
            LimitMeasure::RequestsPerMinute => Some(1),
            measure => actual_of(measure, actual_tokens, actual_cost_micro_usd),
        };
        let Some(actual) = actual else {
            continue;
        };
        // Nothing was reserved here: settling a reservation of 0 charges the whole use.
        let taken = Taken {
            key: demand.key,
            kind: demand.kind,
            amount: 0,
            month: month_index(now_ms),
        };
        if let Err(e) = limiter.settle(&taken, actual, now_ms) {
            failures.push(format!("{}: {e:?}", taken.key));
        }
    }
    failures
}

/// A request that no wait could admit (more tokens than a bucket holds, more than a
/// month's limit) is told so first, before any limit it might wait for (a full
/// requests-per-minute bucket, say) refuses it with a retry hint that cannot help.
fn never_fits(
    policy: &Policy,
    store: &dyn Store,
    parties: Parties,
    local: &[(LimitId, Demand)],
    global: &[GlobalDemand],
    flavour: ApiFlavour,
    now_ms: u64,
) -> Result<(), ApiError> {
    let all = local
        .iter()
        .map(|(id, d)| (*id, d, true))
        .chain(global.iter().map(|g| (g.id, &g.demand, false)));
    let Some((id, demand, is_local)) = all.into_iter().find(|(_, d, _)| d.never_fits()) else {
        return Ok(());
    };
    if is_local {
        // Refused without a change: its own decision gives the refusal with its state.
        let alone = [(id, demand.clone())];
        let (items, _) = take(policy, store, parties, &alone, flavour, now_ms)?;
        give_back(store, &items, now_ms);
    }
    let snapshot = Snapshot {
        limit: demand.limit_units(),
        remaining: 0,
        reset_ms: 0,
    };
    let whose = scope_text(policy, id.scope, parties);
    Err(refusal(
        id, demand, &snapshot, None, &whose, flavour, now_ms,
    ))
}

/// What a local decision took, and each limit's state after it.
type Took = (Vec<(LimitId, Taken)>, Vec<(LimitId, Snapshot)>);

/// Takes `wanted` from the local store in one decision: what was taken, with snapshots.
fn take(
    policy: &Policy,
    store: &dyn Store,
    parties: Parties,
    wanted: &[(LimitId, Demand)],
    flavour: ApiFlavour,
    now_ms: u64,
) -> Result<Took, ApiError> {
    if wanted.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let list: Vec<Demand> = wanted.iter().map(|(_, d)| d.clone()).collect();
    match Limiter::new(store).admit(&list, now_ms) {
        Admission::Admitted { taken, snapshots } => {
            let ids = wanted.iter().map(|(id, _)| *id);
            Ok((
                ids.clone().zip(taken).collect(),
                ids.zip(snapshots).collect(),
            ))
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

/// How long an unsettled reservation waits in Redis for its settlement: the longest
/// request (Envoy's route timeout in the shipped configurations is 10 minutes) plus the
/// settlement's retries, with room to spare.
pub const GLOBAL_HOLD_MS: u64 = 60 * 60 * 1000;

/// Gives back everything `items` took, as a refusal must (best effort, like the local
/// decision's own rollback: a failed give-back leaves that amount taken).
fn give_back(store: &dyn Store, items: &[(LimitId, Taken)], now_ms: u64) {
    let limiter = Limiter::new(store);
    for (_, taken) in items.iter().rev() {
        let _ = limiter.settle(taken, 0, now_ms);
    }
}

/// A refusal that comes after the local limits took the request: the error, and what
/// is still held (nothing: the local limits were given back).
#[derive(Debug)]
pub struct Refusal {
    pub error: ApiError,
    pub held: Held,
}

impl PendingGlobal {
    /// The call to the quota service; `id` must be unique to this request.
    pub fn request(&self, id: String, lease_ms: u64) -> AdmitRequest {
        AdmitRequest {
            id,
            lease_ms,
            hold_ms: GLOBAL_HOLD_MS,
            demands: self.global.iter().map(|g| g.demand.clone()).collect(),
        }
    }

    /// When the local limits took the request.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// What the global demands take if the service admits them, charged to `month`.
    pub fn global_takes(&self, month: u32) -> Vec<(LimitId, Taken)> {
        self.global
            .iter()
            .map(|g| {
                let taken = Taken {
                    key: g.demand.key.clone(),
                    kind: g.demand.kind,
                    amount: g.demand.amount,
                    month,
                };
                (g.id, taken)
            })
            .collect()
    }

    /// Completes the decision with the quota service's answer (`Err`: it did not answer
    /// usably, and `on_engine_failure` decides).
    pub fn conclude(
        self,
        policy: &Policy,
        store: &dyn Store,
        id: String,
        answer: Result<AdmitReply, String>,
        flavour: ApiFlavour,
        now_ms: u64,
    ) -> Result<Admitted, Box<Refusal>> {
        // A refused request consumes nothing: what the local limits took goes back now,
        // requests per minute included (settlement would keep those).
        let refused = |error, held: Held| {
            give_back(store, &held.items, now_ms);
            let held = Held {
                reserved: held.reserved,
                ..Held::default()
            };
            Box::new(Refusal { error, held })
        };
        let answer = match answer {
            Ok(AdmitReply::Admitted { snapshots, .. }) if snapshots.len() != self.global.len() => {
                let error = engine_unusable("it answered for a different number of limits");
                return Err(refused(error, self.held));
            }
            other => other,
        };
        let items = match &answer {
            Ok(AdmitReply::Admitted { month, .. }) => self.global_takes(*month),
            _ => Vec::new(),
        };
        let PendingGlobal {
            mut held,
            mut local_snapshots,
            global,
            parties,
            ..
        } = self;
        match answer {
            Ok(AdmitReply::Admitted { snapshots, month }) => {
                held.global = Some(GlobalHeld { id, month, items });
                local_snapshots.extend(global.iter().map(|g| g.id).zip(snapshots));
            }
            Ok(AdmitReply::Rejected {
                index,
                retry_after_ms,
                snapshot,
            }) => {
                let error = match global.get(index) {
                    Some(g) => refusal(
                        g.id,
                        &g.demand,
                        &snapshot,
                        retry_after_ms,
                        &scope_text(policy, g.id.scope, parties),
                        flavour,
                        now_ms,
                    ),
                    None => engine_unusable("it refused a limit it was not asked about"),
                };
                return Err(refused(error, held));
            }
            Err(why) => {
                let fallback = policy
                    .global
                    .as_ref()
                    .is_some_and(|g| g.on_engine_failure == OnEngineFailure::Local);
                if !fallback {
                    return Err(refused(ApiError::quota_engine_unavailable(&why), held));
                }
                // Never unlimited: the global limits are decided by this Envoy alone.
                let wanted: Vec<(LimitId, Demand)> = global
                    .iter()
                    .map(|g| {
                        let demand = Demand {
                            key: g.local_key.clone(),
                            ..g.demand.clone()
                        };
                        (g.id, demand)
                    })
                    .collect();
                match take(policy, store, parties, &wanted, flavour, now_ms) {
                    Ok((items, snapshots)) => {
                        held.items.extend(items);
                        held.fell_back = true;
                        local_snapshots.extend(snapshots);
                    }
                    Err(error) => return Err(refused(error, held)),
                }
            }
        }
        // Headers in the order of the local decision (concurrency, rates, months).
        let (ids, snapshots): (Vec<LimitId>, Vec<Snapshot>) = local_snapshots.into_iter().unzip();
        let headers = ratelimit_headers(&ids, &snapshots, flavour, now_ms);
        Ok(Admitted { held, headers })
    }
}

fn engine_unusable(why: &str) -> ApiError {
    ApiError::quota_engine_unavailable(&format!("its answer was unusable: {why}"))
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

/// What settlement left to do or report.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Local limit keys that could not be settled, for the host to log.
    pub failures: Vec<String>,
    /// The correction of the global limits, for the host to send to the quota service.
    pub global: Option<Settlement>,
}

/// The amount of limit `measure` a request really used.
fn actual_of(measure: LimitMeasure, tokens: u64, cost_micro_usd: u64) -> Option<u64> {
    match measure {
        // A request is a request, whatever it produced.
        LimitMeasure::RequestsPerMinute => None,
        LimitMeasure::TokensPerMinute | LimitMeasure::MonthlyTokens => Some(tokens),
        LimitMeasure::MonthlyBudget => Some(cost_micro_usd),
        LimitMeasure::ConcurrentRequests => Some(0),
    }
}

/// Settles what admission took against the real usage: refunds or charges the token and
/// cost reservations, releases concurrency slots. Local limits are settled here; the
/// global ones become one [`Settlement`] for the quota service.
pub fn settle(
    store: &dyn Store,
    held: &Held,
    actual_tokens: u64,
    actual_cost_micro_usd: u64,
    now_ms: u64,
) -> Settled {
    let failures = settle_items(
        store,
        &held.items,
        actual_tokens,
        actual_cost_micro_usd,
        now_ms,
    );
    let global = held.global.as_ref().map(|g| Settlement {
        id: g.id.clone(),
        month: g.month,
        items: g
            .items
            .iter()
            // Every item, so that the service finds the reservation record where admission
            // put it (named after the first key); a request per minute settles to itself.
            .map(|(id, taken)| SettleItem {
                key: taken.key.clone(),
                kind: taken.kind,
                reserved: taken.amount,
                actual: actual_of(id.measure, actual_tokens, actual_cost_micro_usd)
                    .unwrap_or(taken.amount),
            })
            .collect(),
    });
    Settled { failures, global }
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

    /// Admission where every limit is local: decided at once.
    fn admit_local(
        policy: &Policy,
        store: &dyn Store,
        parties: Parties,
        reservation: Reservation,
        flavour: ApiFlavour,
        now_ms: u64,
    ) -> Result<Admitted, ApiError> {
        match admit(policy, store, parties, reservation, flavour, now_ms)? {
            Decision::Admitted(admitted) => Ok(admitted),
            Decision::Pending(p) => panic!("no global limits are configured: {p:?}"),
        }
    }

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
        let keys: Vec<(String, u64)> = plan(&p, ACME, RES)
            .local
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
        assert!(admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).is_ok());
        let err = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 1).unwrap_err();
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
        let first = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap();
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
        let busy = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap_err();
        assert_eq!(busy.kind.reason(), "concurrent_requests");
        assert!(settle(&store, &first.held, 100, 0, 0).failures.is_empty());
        let second = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap();
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
        let held = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0)
            .unwrap()
            .held;
        assert!(settle(&store, &held, 500, 0, 0).failures.is_empty());
        let err = admit_local(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap_err();
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
        let ok = admit_local(&p, &MemoryStore::new(), BETA, RES, ApiFlavour::Anthropic, 0).unwrap();
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

    #[test]
    fn global_measures_split_the_plan_and_settlement_keeps_every_item() {
        let mut p = policy(
            json!({"requests_per_minute": 10, "tokens_per_minute": 1000, "monthly_tokens": 100000}),
            json!({"requests_per_minute": 100}),
        );
        p.global = Some(crate::policy::GlobalLimits {
            cluster: "q".into(),
            authority: "q".into(),
            timeout_ms: 50,
            tenant_measures: crate::policy::MeasureSet::default()
                .with(LimitMeasure::RequestsPerMinute)
                .with(LimitMeasure::MonthlyTokens),
            provider_measures: crate::policy::MeasureSet::default()
                .with(LimitMeasure::RequestsPerMinute),
            on_engine_failure: OnEngineFailure::Deny,
            lease_ms: 30_000,
            settle_attempts: 3,
        });
        let Plan { local, global } = plan(&p, BETA, RES);
        let local: Vec<&str> = local.iter().map(|(_, d)| d.key.as_str()).collect();
        assert_eq!(local, ["sluice:t:beta:tpm"]);
        let global_keys: Vec<(&str, &str)> = global
            .iter()
            .map(|g| (g.demand.key.as_str(), g.local_key.as_str()))
            .collect();
        assert_eq!(
            global_keys,
            [
                ("sluice:{t:beta}:rpm", "sluice:t:beta:rpm"),
                ("sluice:{t:beta}:mtok", "sluice:t:beta:mtok"),
                ("sluice:{p:openai}:rpm", "sluice:p:openai:rpm"),
            ]
        );
        let store = MemoryStore::new();
        let Decision::Pending(pending) =
            admit(&p, &store, BETA, RES, ApiFlavour::OpenAi, 0).unwrap()
        else {
            panic!("global limits wait for the quota service");
        };
        let snapshot = Snapshot {
            limit: 10,
            remaining: 9,
            reset_ms: 6_000,
        };
        let reply = AdmitReply::Admitted {
            snapshots: vec![snapshot; 3],
            month: 7,
        };
        let admitted = pending
            .conclude(&p, &store, "r1".into(), Ok(reply), ApiFlavour::OpenAi, 0)
            .unwrap();
        let settled = settle(&store, &admitted.held, 100, 0, 0);
        let global = settled.global.unwrap();
        // Every item, the first one first: the service finds the reservation record by it.
        let items: Vec<(&str, u64, u64)> = global
            .items
            .iter()
            .map(|i| (i.key.as_str(), i.reserved, i.actual))
            .collect();
        assert_eq!(
            items,
            [
                ("sluice:{t:beta}:rpm", 1, 1),
                ("sluice:{t:beta}:mtok", 500, 100),
                ("sluice:{p:openai}:rpm", 1, 1),
            ]
        );
        assert_eq!(global.month, 7);
    }
}
