//! The stages of a request and the data each carries: what exists at that stage and
//! nothing else, so an impossible state cannot be written.

use super::ending::Claims;
use super::queue::{Place, Slot, Wait};
use crate::admission::{Held, PendingGlobal};
use crate::auth::KeyOwner;
use crate::cache::request::{Ask, Directive};
use crate::cache::{CacheKey, CacheOutcome};
use crate::policy::{ModelId, ProviderId, TenantId};
use crate::routing::Api;
use crate::usage::MeterResult;
use crate::usage::UsageMeter;

/// Who asks, through which API: known once the request headers pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub owner: KeyOwner,
    pub api: Api,
    /// The credential headers the client sent (it may send a key in both).
    pub sent: SentCredentials,
}

/// Which headers that can carry a tenant's key the client sent: each must be removed
/// before the request goes upstream, unless the provider's own credential replaces it
/// (a removal is a host call).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SentCredentials {
    pub authorization: bool,
    pub x_api_key: bool,
}

/// What the gateway decided about a routed request (used by accounting and limits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub model: ModelId,
    pub provider: ProviderId,
    /// Index of the model's deployment it was routed to (its first attempt).
    pub deployment: usize,
    pub stream: bool,
    /// The gateway added `stream_options.include_usage` and strips the usage chunk.
    pub injected_usage: bool,
    /// Prompt tokens estimated from the request body.
    pub prompt_estimate: u64,
    /// The output cap was lowered to this, what the tenant's month can still pay for.
    pub clamped_output: Option<u64>,
    /// What the response cache did (or will do: `Miss` until a lookup hits); `None` when
    /// it is off for the tenant and model.
    pub cache: Option<CacheOutcome>,
}

/// A cache key this request fetches the response of: it stores the response at its end
/// (or, having claimed the key, gives the claim back so an identical request can fetch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FillClaim {
    pub(super) tenant: TenantId,
    pub(super) key: CacheKey,
    /// The key's fill is this request's (single flight); false for a refresh, which
    /// stores without claiming.
    pub(super) claimed: bool,
    /// The rule's largest entry: a longer response is not kept.
    pub(super) max_entry_bytes: u64,
}

/// A request routed and admitted by every limit that applies: the limits it holds until
/// the end, given back exactly once.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) caller: Caller,
    pub(super) route: Route,
    pub(super) held: Held,
    /// The response this request fetches for the cache.
    pub(super) fill: Option<FillClaim>,
}

/// Admitted, waiting for the cache: the quota service's lookup (global store), or an
/// identical request's fill (local store).
#[derive(Debug)]
pub(super) struct Caching {
    pub(super) admitted: Admitted,
    pub(super) ratelimit_headers: Vec<(String, String)>,
    pub(super) key: CacheKey,
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
    /// What the cache does once it is admitted.
    pub(super) cache: Option<Ask>,
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
    /// The body kept for the cache, while it fits.
    pub(super) capture: Option<Capture>,
}

/// A 200 response being kept for the cache, as it came from the provider.
#[derive(Debug)]
pub(super) struct Capture {
    pub(super) content_type: String,
    pub(super) body: Vec<u8>,
    /// Most body bytes the entry may hold.
    pub(super) room: usize,
    /// It grew past `room`: not stored.
    pub(super) overflowed: bool,
}

impl Capture {
    pub(super) fn new(content_type: &str, max_entry_bytes: u64) -> Self {
        let max = usize::try_from(max_entry_bytes).unwrap_or(usize::MAX);
        Capture {
            content_type: content_type.to_string(),
            room: max.saturating_sub(content_type.len()),
            body: Vec::new(),
            overflowed: false,
        }
    }

    /// Whole, and text: a local reply's body is a string.
    pub(super) fn storable(&self) -> bool {
        !self.overflowed && std::str::from_utf8(&self.body).is_ok()
    }

    pub(super) fn keep(&mut self, chunk: &[u8]) {
        if self.overflowed {
            return;
        }
        if self.body.len() + chunk.len() > self.room {
            self.overflowed = true;
            self.body = Vec::new();
            return;
        }
        self.body.extend_from_slice(chunk);
    }
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
        /// What the client's `cache-control` asks of the cache.
        directive: Directive,
    },
    /// Waiting for the quota service's decision on the global limits.
    Admitting(Admitting),
    /// The usage endpoint, waiting for the quota service's readings of global limits.
    Reading {
        owner: KeyOwner,
        draft: super::usage_report::Draft,
    },
    /// Waiting for the quota service's cache lookup (global store).
    CacheLookup(Caching),
    /// Waiting for an identical request to fetch the response (local store).
    CacheWait(Caching),
    /// Answered from the cache.
    Cached {
        admitted: Admitted,
        usage: MeterResult,
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
            Stage::Queued { admitted, .. } | Stage::Cached { admitted, .. } => admitted.known(),
            Stage::CacheLookup(c) | Stage::CacheWait(c) => c.admitted.known(),
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
            fill: self.fill,
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
