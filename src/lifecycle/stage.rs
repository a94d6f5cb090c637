//! The stages of a request and the data each carries: what exists at that stage and
//! nothing else, so an impossible state cannot be written.

use super::ending::Claims;
use super::queue::{Place, Slot, Wait};
use crate::admission::{Held, PendingGlobal};
use crate::auth::KeyOwner;
use crate::policy::{ModelId, ProviderId};
use crate::routing::Api;
use crate::usage::UsageMeter;

/// Who asks, through which API: known once the request headers pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub owner: KeyOwner,
    pub api: Api,
}

/// What the gateway decided about a routed request (used by accounting and limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub model: ModelId,
    pub provider: ProviderId,
    pub stream: bool,
    /// The gateway added `stream_options.include_usage` and strips the usage chunk.
    pub injected_usage: bool,
    /// Prompt tokens estimated from the request body.
    pub prompt_estimate: u64,
}

/// A request routed and admitted by every limit that applies: the limits it holds until
/// the end, given back exactly once.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) caller: Caller,
    pub(super) route: Route,
    pub(super) held: Held,
}

/// Routed, its local limits taken, waiting for the quota service to decide its global
/// limits (the request is paused meanwhile).
#[derive(Debug)]
pub(super) struct Admitting {
    pub(super) caller: Caller,
    pub(super) route: Route,
    pub(super) pending: PendingGlobal,
    /// The admission's id at the quota service.
    pub(super) id: String,
}

/// Sent upstream: when, after how long a wait for the provider, holding which slot.
#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) admitted: Admitted,
    /// The provider's in-flight slot, when the provider has a capacity.
    pub(super) slot: Option<Slot>,
    pub(super) sent_at_ms: u64,
    /// How long the request waited for a full provider, when it had to.
    pub(super) waited_ms: Option<u64>,
}

/// What came back from upstream (or from Envoy on its behalf: 503, 504).
pub(super) struct UpstreamResponse {
    pub(super) status: u16,
    /// Reads usage from a 2xx body.
    pub(super) meter: Option<UsageMeter>,
    pub(super) complete: bool,
    pub(super) headers_at_ms: u64,
    pub(super) first_byte_at_ms: Option<u64>,
}

/// What the gateway knew when it answered a request itself.
#[derive(Debug, Clone, Copy)]
pub(super) enum Known {
    /// Refused before the key was known.
    Nobody,
    /// Answered from the headers: the models endpoint, an unknown path, an empty body.
    Tenant(KeyOwner),
    /// Refused while reading the body, before its model was resolved.
    Request(Caller),
    /// Refused once its model was resolved (not allowed, not served, over a limit).
    Model(Caller, ModelId),
    /// Refused after routing and admission: the provider's queue is full, or the host
    /// failed.
    Routed(Caller, Route),
}

#[derive(Debug)]
pub(super) struct Replied {
    pub(super) status: u16,
    /// Why the gateway refused the request; `None` for an answer (the models endpoint).
    pub(super) refusal: Option<&'static str>,
    pub(super) known: Known,
    /// What a request refused after admission still holds, given back at the end.
    pub(super) claims: Claims,
}

/// The response's meter makes `Responding` the largest stage by far; the whole exchange
/// already lives in one heap allocation per stream (its context), so it stays inline rather
/// than costing each response another allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Default)]
pub(super) enum Stage {
    #[default]
    Headers,
    AwaitingBody {
        caller: Caller,
        /// The client's query string (`?` included), kept for the upstream path.
        query: String,
    },
    /// Waiting for the quota service's decision on the global limits.
    Admitting(Admitting),
    /// The usage endpoint, waiting for the quota service's readings of global limits.
    Reading {
        owner: KeyOwner,
        draft: super::usage_report::Draft,
    },
    /// Waiting for a slot of a full provider.
    Queued {
        admitted: Admitted,
        wait: Wait,
        ratelimit_headers: Vec<(String, String)>,
    },
    Forwarded {
        upstream: Upstream,
        /// Rate-limit headers for the response.
        ratelimit_headers: Vec<(String, String)>,
    },
    Responding {
        upstream: Upstream,
        response: UpstreamResponse,
    },
    Replied(Replied),
    /// `finish` ran: nothing more happens.
    Finished,
}

impl Stage {
    /// What is known of the request at this stage.
    pub(super) fn known(&self) -> Known {
        match self {
            Stage::Headers | Stage::Finished => Known::Nobody,
            Stage::AwaitingBody { caller, .. } => Known::Request(*caller),
            Stage::Admitting(a) => Known::Routed(a.caller, a.route),
            Stage::Reading { owner, .. } => Known::Tenant(*owner),
            Stage::Queued { admitted, .. } => admitted.known(),
            Stage::Forwarded { upstream, .. } | Stage::Responding { upstream, .. } => {
                upstream.admitted.known()
            }
            Stage::Replied(replied) => replied.known,
        }
    }
}

impl Admitted {
    pub(super) fn known(&self) -> Known {
        Known::Routed(self.caller, self.route)
    }

    /// What it holds, with its `place` at the provider, to give back at its end.
    pub(super) fn claims(self, place: Place) -> Claims {
        Claims {
            held: self.held,
            place,
        }
    }

    /// What is known of it and what it holds, once the gateway refuses it.
    pub(super) fn refused(self, place: Place) -> (Known, Claims) {
        (self.known(), self.claims(place))
    }
}

impl Known {
    pub(super) fn owner(&self) -> Option<KeyOwner> {
        match self {
            Known::Nobody => None,
            Known::Tenant(owner) => Some(*owner),
            Known::Request(caller) | Known::Model(caller, _) | Known::Routed(caller, _) => {
                Some(caller.owner)
            }
        }
    }
}
