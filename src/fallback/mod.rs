//! Fallback across a model's deployments: the order in which a request tries them, what
//! each attempt changes upstream, and what the gateway remembers about a deployment that
//! failed (shared by every worker).
//!
//! Envoy carries the attempts (the route's retry policy, a cluster picked per attempt from
//! the chain Sluice sets); Sluice decides the chain here, before the first attempt, and
//! rewrites each later attempt for its deployment in its upstream filter
//! ([`attempt_edits`]). Nothing here calls the host.

use crate::errors::ApiFlavour;
use crate::policy::{Deployment, Model, Policy, Provider, ProviderId};
use crate::routing::{upstream_path, Api};
use crate::shared::codec::{decode, Writer};
use crate::shared::keys::{self, tag};
use crate::shared::{cas_update, Change, Store, StoreError, CREATE_CAS};

/// The compiled `fallback` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub max_attempts: u32,
    /// Provider statuses that count as a failed attempt.
    pub statuses: Vec<u16>,
    pub failures_to_cool_down: u32,
    pub cooldown_ms: u64,
    pub retry_after_max_ms: u64,
    pub deployment_header: bool,
    /// Attempts at the chain's last deployment once the chain is used up.
    pub retries: u32,
}

impl Default for Fallback {
    fn default() -> Self {
        Fallback {
            max_attempts: 3,
            statuses: vec![429, 500, 502, 503, 529],
            failures_to_cool_down: 3,
            cooldown_ms: 30_000,
            retry_after_max_ms: 600_000,
            deployment_header: false,
            retries: 0,
        }
    }
}

/// How one attempt ended, as the upstream filter saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptEnd {
    /// Response headers with this status (and the provider's `retry-after`, in ms).
    Status {
        status: u16,
        retry_after_ms: Option<u64>,
    },
    /// No response: a reset or a connect failure.
    NoResponse,
}

/// What every worker knows about one provider account (`sluice:h:{provider}`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// Skipped until then (ms since the epoch); 0: not skipped.
    pub until_ms: u64,
    /// Failed attempts in a row since the last success or cool-down.
    pub failures: u32,
}

const HEALTH_LEN: usize = 2 + 8 + 4;

impl Health {
    pub fn decode(value: Option<&[u8]>) -> Health {
        value
            .and_then(|v| {
                decode(v, tag::HEALTH, |r| {
                    Some(Health {
                        until_ms: u64::from_le_bytes(r.bytes()?),
                        failures: u32::from_le_bytes(r.bytes()?),
                    })
                })
            })
            .unwrap_or_default()
    }

    pub fn encode(self) -> Vec<u8> {
        Writer::new(tag::HEALTH, HEALTH_LEN)
            .slice(&self.until_ms.to_le_bytes())
            .slice(&self.failures.to_le_bytes())
            .finish()
    }

    pub fn available(self, now_ms: u64) -> bool {
        now_ms >= self.until_ms
    }

    /// The state after an attempt ended with `end`.
    /// - A success clears the failures.
    /// - A 429 with `retry-after` skips the account for that long (capped).
    /// - A failure (a status of `statuses`, or no response) counts; enough in a row skip
    ///   the account for `cooldown_ms`.
    /// - Anything else (a 4xx of the client's making) changes nothing.
    pub fn after(self, end: AttemptEnd, fallback: &Fallback, now_ms: u64) -> Health {
        let failed = match end {
            AttemptEnd::Status { status, .. } if status < 400 => {
                return Health {
                    until_ms: self.until_ms,
                    failures: 0,
                }
            }
            AttemptEnd::Status {
                status: 429,
                retry_after_ms: Some(ms),
            } if ms > 0 => {
                return Health {
                    until_ms: self
                        .until_ms
                        .max(now_ms.saturating_add(ms.min(fallback.retry_after_max_ms))),
                    failures: self.failures,
                }
            }
            AttemptEnd::Status { status, .. } => fallback.statuses.contains(&status),
            AttemptEnd::NoResponse => true,
        };
        if !failed {
            return self;
        }
        let failures = self.failures.saturating_add(1);
        if failures >= fallback.failures_to_cool_down {
            Health {
                until_ms: self
                    .until_ms
                    .max(now_ms.saturating_add(fallback.cooldown_ms)),
                failures: 0,
            }
        } else {
            Health {
                until_ms: self.until_ms,
                failures,
            }
        }
    }
}

/// Compare-and-set tries for a health update: it is advice, so contention may drop it.
const HEALTH_ATTEMPTS: u32 = 4;

/// Records an attempt's end for its provider account, for every worker.
pub fn record(
    store: &dyn Store,
    provider: &Provider,
    end: AttemptEnd,
    fallback: &Fallback,
    now_ms: u64,
) -> Result<(), StoreError> {
    let key = keys::health(&provider.name);
    cas_update(store, &key, CREATE_CAS, HEALTH_ATTEMPTS, |stored| {
        let before = Health::decode(stored);
        let after = before.after(end, fallback, now_ms);
        if after == before {
            Change::Keep(())
        } else {
            Change::Write(after.encode(), ())
        }
    })
    .map_err(StoreError::from)
}

/// The provider account's health now (unknown or unreadable: healthy).
pub fn health(store: &dyn Store, provider: &Provider) -> Health {
    let key = keys::health(&provider.name);
    match store.get(&key) {
        Ok(Some((value, _))) => Health::decode(Some(&value)),
        _ => Health::default(),
    }
}

/// The deployments a request tries, as indices into `model.deployments`, in order:
/// - only those whose provider speaks the request's API;
/// - lowest rank first; within a rank, a weighted random order (by `random`);
/// - without those `available` says no to, unless that leaves none (then all of them: the
///   provider's own answer is better than the gateway's refusal);
/// - at most `max_attempts`; a model configured with `providers` (no fallback) has one.
pub fn chain(
    model: &Model,
    providers: &[Provider],
    api: ApiFlavour,
    max_attempts: u32,
    random: u64,
    available: &dyn Fn(ProviderId) -> bool,
) -> Vec<usize> {
    let speaks = |d: &Deployment| {
        providers
            .get(d.provider.index())
            .is_some_and(|p| p.api == api)
    };
    let mut candidates: Vec<usize> = (0..model.deployments.len())
        .filter(|&i| model.deployments.get(i).is_some_and(speaks))
        .collect();
    if !model.fallback {
        candidates.truncate(1);
        return candidates;
    }
    let mut ordered = Vec::with_capacity(candidates.len());
    let mut rng = Rng::new(random);
    candidates.sort_by_key(|&i| model.deployments.get(i).map_or(u32::MAX, |d| d.rank));
    for group in candidates.chunk_by(|&a, &b| {
        model.deployments.get(a).map(|d| d.rank) == model.deployments.get(b).map(|d| d.rank)
    }) {
        let mut rest: Vec<usize> = group.to_vec();
        while !rest.is_empty() {
            let weight = |i: usize| model.deployments.get(i).map_or(0, |d| u64::from(d.weight));
            let total: u64 = rest.iter().map(|&i| weight(i)).sum();
            let mut pick = if total == 0 { 0 } else { rng.next() % total };
            let mut at = 0;
            for (k, &i) in rest.iter().enumerate() {
                if pick < weight(i) {
                    at = k;
                    break;
                }
                pick -= weight(i);
            }
            ordered.push(rest.remove(at));
        }
    }
    let healthy: Vec<usize> = ordered
        .iter()
        .copied()
        .filter(|&i| {
            model
                .deployments
                .get(i)
                .is_some_and(|d| available(d.provider))
        })
        .collect();
    let mut chain = if healthy.is_empty() { ordered } else { healthy };
    chain.truncate(usize::try_from(max_attempts.max(1)).unwrap_or(usize::MAX));
    chain
}

/// xorshift64 seeded through splitmix64 (so that close seeds, such as consecutive stream
/// ids, spread): spreading load, not security.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// What a request's later attempts need, kept by the worker from routing to `on_log`
/// (keyed by the request's id, which the upstream filter reads from its headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub model: crate::policy::ModelId,
    pub api: Api,
    /// The client's query string (kept on every attempt's path).
    pub query: String,
    /// The client's `:authority`, for a deployment that keeps it.
    pub authority: String,
    /// Indices into the model's deployments, in attempt order.
    pub chain: Vec<usize>,
    /// When it was routed (ms since the epoch): attempts are timed from here.
    pub started_ms: u64,
    /// What admission reserved (for the first deployment): a later attempt's account
    /// reserves as much.
    pub reservation: crate::admission::Reservation,
    /// Provider limits taken for attempts at later deployments, by deployment.
    pub held: Vec<(usize, Vec<(crate::policy::LimitId, crate::limits::Taken)>)>,
    /// The attempts so far, as the upstream filter saw them end.
    pub attempts: Vec<Attempt>,
}

/// One attempt at one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// Index into the model's deployments.
    pub deployment: usize,
    pub provider: ProviderId,
    /// The provider's status; 0: no response (reset, connect failure).
    pub status: u16,
    /// From the request's routing to this attempt's end.
    pub ms: u64,
}

impl Plan {
    /// Attempt `n` goes to another account than the first: it takes that account's own
    /// limits (once per deployment), as admission took the first's.
    pub fn reserve(&mut self, policy: &Policy, store: &dyn Store, n: u32, now_ms: u64) {
        let Some((d, provider)) = self.attempt_at(policy, n) else {
            return;
        };
        if self.chain.first() == Some(&d) || self.held.iter().any(|(h, _)| *h == d) {
            return;
        }
        let items =
            crate::admission::reserve_provider(policy, store, provider, self.reservation, now_ms);
        self.held.push((d, items));
    }

    /// Records how attempt `n` ended (its deployment's provider, its time).
    pub fn record(&mut self, policy: &Policy, n: u32, status: u16, now_ms: u64) {
        let Some((deployment, provider)) = self.attempt_at(policy, n) else {
            return;
        };
        self.attempts.push(Attempt {
            deployment,
            provider,
            status,
            ms: now_ms.saturating_sub(self.started_ms),
        });
    }

    /// The deployment attempt `n` (1-based) goes to: the chain's last once it runs out.
    pub fn deployment_for(&self, n: u32) -> Option<usize> {
        let n = usize::try_from(n.max(1)).ok()?;
        self.chain
            .get(n.min(self.chain.len()).checked_sub(1)?)
            .copied()
    }

    /// Attempt `n`'s deployment (index into the model's) and its provider account.
    pub fn attempt_at(&self, policy: &Policy, n: u32) -> Option<(usize, ProviderId)> {
        let d = self.deployment_for(n)?;
        let provider = policy.model(self.model)?.deployments.get(d)?.provider;
        Some((d, provider))
    }

    /// The attempt that served the request: the last one with a response.
    pub fn served(&self) -> Option<&Attempt> {
        self.attempts.iter().rev().find(|a| a.status != 0)
    }
}

/// Where routed requests' plans wait for their later attempts: the worker's registry,
/// keyed by the request's id (what the upstream filter can read of a request).
pub trait Plans {
    /// Keeps `plan` for the request `id`; `false` if the id is in use by another request
    /// (a client-chosen id seen twice): that request then makes one attempt only.
    fn register(&self, id: &str, plan: Plan) -> bool;
    /// The plan of request `id`, with the attempts recorded meanwhile, removed.
    fn take(&self, id: &str) -> Option<Plan>;
}

/// A registry in memory: each plan with `E`, what its later attempts need besides (the
/// host keeps the policy the plan was made under).
#[derive(Debug)]
pub struct PlanTable<E = ()>(std::cell::RefCell<std::collections::HashMap<String, (Plan, E)>>);

impl<E> Default for PlanTable<E> {
    fn default() -> Self {
        PlanTable(Default::default())
    }
}

impl<E> PlanTable<E> {
    /// Keeps `plan` and `extra` for request `id`, unless the id is in use.
    pub fn register_with(&self, id: &str, plan: Plan, extra: E) -> bool {
        let Ok(mut map) = self.0.try_borrow_mut() else {
            return false;
        };
        if map.contains_key(id) {
            return false;
        }
        map.insert(id.to_string(), (plan, extra));
        true
    }

    /// Runs `f` on the plan of request `id`, if any.
    pub fn with<T>(&self, id: &str, f: impl FnOnce(&mut Plan, &E) -> T) -> Option<T> {
        let mut map = self.0.try_borrow_mut().ok()?;
        let (plan, extra) = map.get_mut(id)?;
        Some(f(plan, extra))
    }

    pub fn remove(&self, id: &str) -> Option<Plan> {
        self.0
            .try_borrow_mut()
            .ok()?
            .remove(id)
            .map(|(plan, _)| plan)
    }

    pub fn len(&self) -> usize {
        self.0.try_borrow().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Plans for PlanTable<()> {
    fn register(&self, id: &str, plan: Plan) -> bool {
        self.register_with(id, plan, ())
    }

    fn take(&self, id: &str) -> Option<Plan> {
        self.remove(id)
    }
}

/// The upstream edits of an attempt at a deployment other than the one the request was
/// prepared for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct AttemptEdits {
    /// The Envoy cluster the attempt must be going to: edits for one account's provider
    /// must never go out on another's.
    pub cluster: String,
    /// Headers to remove first: every provider's credential and configured headers, so
    /// that no account's key reaches another's provider.
    pub remove: Vec<String>,
    pub set: Vec<(String, String)>,
    /// The model name the body must carry, when it differs from what it carries now.
    pub model: Option<String>,
}

/// The edits that send attempt `n` of `plan` to its deployment; `None` when the attempt
/// goes where the request was prepared for (the first deployment) or out of range.
/// `current_model` is the model name the body carries (the first deployment's).
pub fn attempt_edits(policy: &Policy, plan: &Plan, n: u32) -> Option<AttemptEdits> {
    let model = policy.model(plan.model)?;
    let first = *plan.chain.first()?;
    let index = plan.deployment_for(n)?;
    if index == first {
        return None;
    }
    let deployment = model.deployments.get(index)?;
    let provider = policy.provider(deployment.provider)?;
    let mut remove: Vec<String> = Vec::new();
    for p in &policy.providers {
        for name in
            std::iter::once(p.credential.header()).chain(p.headers.iter().map(|(n, _)| n.as_str()))
        {
            if !remove.iter().any(|r| r == name) {
                remove.push(name.to_string());
            }
        }
    }
    let mut set = vec![
        (
            ":path".to_string(),
            upstream_path(provider, plan.api.upstream_suffix(), &plan.query),
        ),
        (
            ":authority".to_string(),
            provider
                .authority
                .clone()
                .unwrap_or_else(|| plan.authority.clone()),
        ),
        (
            provider.credential.header().to_string(),
            provider.credential.value().to_string(),
        ),
    ];
    set.extend(provider.headers.iter().cloned());
    let carried = model
        .deployments
        .get(first)
        .map(|d| d.upstream_name.as_str());
    let model_name = (carried != Some(deployment.upstream_name.as_str()))
        .then(|| deployment.upstream_name.clone());
    Some(AttemptEdits {
        cluster: provider.cluster_for(true).to_string(),
        remove,
        set,
        model: model_name,
    })
}

#[cfg(test)]
mod tests;
