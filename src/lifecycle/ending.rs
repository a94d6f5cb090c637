//! How a request ended, decided from the stage it ended in: its outcome, status, usage and
//! cost ([`Ending`]), and what it still holds in shared state ([`Claims`]), given back
//! exactly once.

use super::queue::Place;
use super::stage::FillClaim;
use super::{Admitted, Callout, Known, Replied, Route, Stage, UpstreamResponse};
use crate::accounting::{cost_micro_usd, Ending, Latency};
use crate::admission::{self, Held};
use crate::cache::CacheOutcome;
use crate::errors::{ApiFlavour, ErrorKind};
use crate::global::wire::Settlement;
use crate::metrics::Outcome;
use crate::policy::Policy;
use crate::shared::Store;
use crate::usage::{MeterResult, TokenUsage, UsageMeter};

/// What a request holds until its end: the limits it was admitted with and its place at
/// a provider with a capacity.
#[derive(Debug, Default)]
pub(super) struct Claims {
    pub(super) held: Held,
    pub(super) place: Place,
    /// A cache key it fetches: a claimed fill not replaced by a stored response is given
    /// back, so that an identical request can fetch instead.
    pub(super) fill: Option<FillClaim>,
}

/// What giving back the claims left to report.
#[derive(Debug, Default)]
pub(super) struct GivenBack {
    /// Limit keys (or queues) that could not be settled, for the host to log.
    pub(super) failures: Vec<String>,
    /// A provider slot was freed: this worker's waiters may claim it now.
    pub(super) released_slot: bool,
    /// The global limits' correction, for the host to send to the quota service.
    pub(super) settlement: Option<Settlement>,
    /// The global cache's fill to give back, for the host to send to the quota service.
    pub(super) cache_call: Option<Callout>,
}

impl Claims {
    /// Settles the limits to what the request really used (refunding or charging the
    /// reservation, releasing concurrency) and leaves the provider's queue.
    pub(super) fn give_back(
        self,
        policy: &Policy,
        store: &dyn Store,
        tokens: u64,
        cost_micro_usd: u64,
        now_ms: u64,
    ) -> GivenBack {
        let settled = admission::settle(store, &self.held, tokens, cost_micro_usd, now_ms);
        let mut failures = settled.failures;
        let left = self.place.leave(store);
        failures.extend(left.failure);
        let cache_call = self
            .fill
            .filter(|f| f.claimed)
            .and_then(|fill| super::caching::release(policy, store, fill));
        GivenBack {
            failures,
            released_slot: left.released_slot,
            settlement: settled.global,
            cache_call,
        }
    }
}

/// How the request that ended in `stage` ended; `None` if it had finished already.
/// `client_left`: Envoy says the downstream went away.
/// `served`: the deployment that answered, when a fallback plan says (else the one the
/// request was routed to); its prices apply.
pub(super) fn decide(
    stage: Stage,
    flavour: ApiFlavour,
    client_left: bool,
    policy: &Policy,
    served: Option<usize>,
) -> Option<(Ending, Claims)> {
    let routed = match stage.known() {
        Known::Routed(_, route) => Some(route.deployment),
        _ => None,
    };
    let unused = MeterResult::default();
    let (ending, claims) = match stage {
        Stage::Finished => return None,
        // Gone before the request could be routed.
        Stage::Headers => (
            about(Known::Nobody, Outcome::Aborted, 0, unused),
            Claims::default(),
        ),
        Stage::AwaitingBody { caller, .. } => (
            about(Known::Request(caller), Outcome::Aborted, 0, unused),
            Claims::default(),
        ),
        Stage::Replied(Replied {
            status,
            refusal,
            known,
            claims,
        }) => {
            let outcome = match refusal {
                Some(_) => Outcome::Rejected,
                None => Outcome::Success,
            };
            let ending = Ending {
                reason: refusal,
                ..about(known, outcome, status, unused)
            };
            (ending, claims)
        }
        Stage::Reading { owner, .. } => (
            about(Known::Tenant(owner), Outcome::Aborted, 0, unused),
            Claims::default(),
        ),
        Stage::Admitting(admitting) => {
            let outcome = if client_left {
                Outcome::Aborted
            } else {
                Outcome::UpstreamError
            };
            let ending = about(
                Known::Routed(admitting.caller, admitting.route),
                outcome,
                0,
                unused,
            );
            (ending, admitting.abandoned())
        }
        Stage::CacheLookup(caching) | Stage::CacheWait(caching) => {
            // It never reached the provider: nothing to bill.
            let outcome = if client_left {
                Outcome::Aborted
            } else {
                Outcome::UpstreamError
            };
            let ending = caching.admitted.about(outcome, 0, unused);
            (ending, caching.admitted.claims(Place::Nowhere))
        }
        Stage::Cached { admitted, usage } => {
            let ending = admitted.about(Outcome::Success, 200, usage);
            (ending, admitted.claims(Place::Nowhere))
        }
        Stage::Queued { admitted, wait, .. } => {
            let timed_out = wait.state() == super::queue::WaitState::TimedOut;
            if timed_out {
                // This worker's queue took it out of the queue and answered.
                let kind = ErrorKind::QueueTimeout;
                let ending = Ending {
                    reason: Some(kind.reason()),
                    queue_wait_ms: Some(wait.timed_out_after_ms()),
                    ..admitted.about(Outcome::Rejected, kind.status_for(flavour), unused)
                };
                (ending, admitted.claims(Place::Nowhere))
            } else {
                // It never reached the provider: nothing to bill.
                let outcome = if client_left {
                    Outcome::Aborted
                } else {
                    Outcome::UpstreamError
                };
                let ending = admitted.about(outcome, 0, unused);
                (ending, admitted.claims(Place::Waiting(wait)))
            }
        }
        Stage::Forwarded { upstream, .. } => {
            let (outcome, usage) = if client_left {
                // The provider was working on it: bill the prompt, as providers do.
                let prompt = TokenUsage {
                    input_tokens: upstream.admitted.route.prompt_estimate,
                    ..TokenUsage::default()
                };
                let estimate = MeterResult {
                    usage: prompt,
                    estimated: true,
                    suspicious: false,
                };
                (Outcome::Aborted, estimate)
            } else {
                (Outcome::UpstreamError, unused)
            };
            let ending = Ending {
                queue_wait_ms: upstream.waited_ms,
                ..upstream.admitted.about(outcome, 0, usage)
            };
            let place = upstream.slot.map_or(Place::Nowhere, Place::Holding);
            (ending, upstream.admitted.claims(place))
        }
        Stage::Responding { upstream, response } => {
            let outcome = response_outcome(&response, client_left);
            let usage = response.meter.as_ref().map_or(unused, UsageMeter::result);
            let sent = upstream.sent_at_ms;
            let latency = Latency {
                upstream_ms: response.headers_at_ms.saturating_sub(sent),
                first_byte_ms: response.first_byte_at_ms.map(|t| t.saturating_sub(sent)),
            };
            let ending = Ending {
                queue_wait_ms: upstream.waited_ms,
                latency: Some(latency),
                ..upstream.admitted.about(outcome, response.status, usage)
            };
            let place = upstream.slot.map_or(Place::Nowhere, Place::Holding);
            (ending, upstream.admitted.claims(place))
        }
    };
    let price = ending.model.and_then(|m| policy.model(m)).map(|m| {
        served
            .or(routed)
            .and_then(|d| m.deployments.get(d))
            .map_or(m.price, |d| d.price)
    });
    let cost = price.map_or(0, |p| cost_micro_usd(&ending.usage.usage, &p));
    let cost = crate::cache::charge(cost, charged_ppm(policy, &ending));
    let held = &claims.held;
    let admitted = !held.items.is_empty() || held.global.is_some() || held.fell_back;
    Some((
        Ending {
            cost_micro_usd: cost,
            limits_engine: admitted.then(|| held.engine()),
            global_id: held.global.as_ref().map(|g| g.id.clone()),
            ..ending
        },
        claims,
    ))
}

/// Millionths of its price a request is charged: all of it, except for a cache hit.
pub(super) fn charged_ppm(policy: &Policy, ending: &Ending) -> u64 {
    let rule = match (ending.cache, ending.owner, ending.model) {
        (Some(CacheOutcome::Hit), Some(owner), Some(model)) => {
            policy.cache_rule(owner.tenant, model)
        }
        _ => None,
    };
    rule.map_or(1_000_000, |r| r.hit_price_ppm)
}

/// The outcome of a response: complete 2xx/3xx is a success; the provider's 429 and 5xx
/// (and a 2xx cut short, or ended by an error event) are its failures; other 4xx are the
/// client's.
fn response_outcome(response: &UpstreamResponse, client_left: bool) -> Outcome {
    let failed = response
        .meter
        .as_ref()
        .is_some_and(UsageMeter::stream_failed);
    match response.status {
        200..=399 if response.complete && !failed => Outcome::Success,
        200..=399 if client_left => Outcome::Aborted,
        200..=399 => Outcome::UpstreamError,
        429 | 500..=599 => Outcome::UpstreamError,
        _ => Outcome::ClientError,
    }
}

impl super::stage::Admitting {
    /// What a request that ended while the quota service decided still holds: its local
    /// limits, and whatever the service may have taken for it. The service's answer is
    /// lost with the stream, so a release of every global demand is sent: if the service
    /// took nothing, there is no reservation record and the release changes nothing. The
    /// month is this Envoy's guess of the service's (they differ only at a month's edge).
    pub(super) fn abandoned(self) -> Claims {
        let mut held = self.pending.held.clone();
        let month = crate::limits::month_index(self.pending.started_ms());
        held.global = Some(admission::GlobalHeld {
            id: self.id,
            month,
            items: self.pending.global_takes(month),
        });
        Claims {
            held,
            place: Place::Nowhere,
            fill: None,
        }
    }
}

impl Admitted {
    fn about(&self, outcome: Outcome, status: u16, usage: MeterResult) -> Ending {
        about(
            Known::Routed(self.caller, self.route),
            outcome,
            status,
            usage,
        )
    }
}

/// An ending from what was known of the request; no reason, wait, latency or cost yet.
fn about(known: Known, outcome: Outcome, status: u16, usage: MeterResult) -> Ending {
    let (caller, model, route): (_, _, Option<Route>) = match known {
        Known::Nobody => (None, None, None),
        Known::Tenant(owner) => {
            return Ending {
                owner: Some(owner),
                ..Ending::new(outcome, status, usage)
            }
        }
        Known::Request(caller) => (Some(caller), None, None),
        Known::Model(caller, model) => (Some(caller), Some(model), None),
        Known::Routed(caller, route) => (Some(caller), Some(route.model), Some(route)),
    };
    Ending {
        owner: caller.map(|c| c.owner),
        api: caller.map(|c| c.api),
        model,
        provider: route.map(|r| r.provider),
        stream: route.is_some_and(|r| r.stream),
        cache: route.and_then(|r| r.cache),
        ..Ending::new(outcome, status, usage)
    }
}
