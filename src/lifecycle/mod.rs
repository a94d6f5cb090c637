//! One request's journey through the gateway, as a pure state machine whose stages carry
//! the data that exists at that stage.
//!
//! The host layer feeds it what Envoy reports (headers, body, response chunks, the end of
//! the stream) and carries out the [`Step`] it returns: header edits, a body replacement,
//! and whether to continue, keep buffering, wait for a provider slot, or answer locally.
//! Nothing here calls the host, so all of it runs natively.
//!
//! ```text
//! Headers ──> AwaitingBody ──> Forwarded ──> Responding ──> Finished (any stage, on_log)
//!    │             │  │           ^  ^
//!    │             │  └> Queued ──┘  │ resumed by this worker's queue
//!    │             └> Admitting ─────┘ (or Queued) when the quota service admits it
//!    └─────────────┴──> Replied: the gateway answered (a refusal, the models endpoint)
//! ```
//!
//! `finish` (Envoy's `on_log`, once per stream however it ended) decides how the request
//! ended ([`ending`]), gives back what it held (limits, a provider slot or queue place),
//! records the metrics and builds the usage record.

mod caching;
mod ending;
mod forward;
mod models;
pub mod queue;
mod stage;
#[cfg(test)]
mod tests;
mod usage_report;

use crate::admission::{self, Decision};
use crate::auth::{presented_key, KeyOwner};
use crate::cache::request::{Ask, Directive};
use crate::cache::{CacheOutcome, CacheStore, Lookup};
use crate::cors;
use crate::errors::{ApiError, ApiFlavour, ErrorKind, LocalReply};
use crate::global::wire::{AdmitReply, AdmitRequest, Lease, PeekReply, Settlement, PEEK_PATH};
use crate::headers::RequestHeaders;
use crate::metrics::{Metrics, Outcome};
use crate::policy::{Policy, ACCOUNT_HEADERS};
use crate::routing::{split_path, Endpoint};
use crate::shared::Store;
use crate::usage::{Passthrough, TokenUsage, UsageMeter};
use ending::Claims;
use queue::{Entered, Place, WaitState, Waiter};
use stage::{
    Admitted, Admitting, Caching, Capture, FillClaim, Known, Replied, Stage, Upstream,
    UpstreamResponse,
};
pub use stage::{Caller, Route, SentCredentials};

/// What the host must do after a callback.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Request headers to delete (all values), applied before `set`.
    pub remove: Vec<String>,
    /// Request headers to set (replacing any value).
    pub set: Vec<(String, String)>,
    /// Replaces the whole buffered request body.
    pub body: Option<Vec<u8>>,
    pub next: Next,
    /// This step sends the request on to its provider (or into the provider's queue): the
    /// host may log the route ([`Exchange::describe_route`]).
    pub routed: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum Next {
    /// Let the request go on (to the next filter and the router).
    #[default]
    Continue,
    /// Hold the request; for the headers callback this buffers the body.
    Pause,
    /// Hold the request until this worker's queue resumes or times out the [`Waiter`],
    /// which the host hands to it.
    Wait(Waiter),
    /// Answer the client directly; the host sends it and then pauses for good.
    Reply(LocalReply),
    /// Hold the request until the quota service decides this admission; the decision
    /// goes to [`Exchange::on_admission_answer`]. The host sends it with the other
    /// admissions its worker has waiting (one call for several).
    Admit(AdmitRequest),
    /// Hold the request and call the quota service; its answer goes to
    /// [`Exchange::on_call_answer`].
    Call(Callout),
    /// Hold the request until an identical request's response is in the cache.
    AwaitFill(FillWait),
}

/// A POST to the quota service (the cluster, authority and timeout of the policy's
/// `global` section).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub path: &'static str,
    /// As `global::wire` defines it.
    pub body: Vec<u8>,
    /// Longest wait for the answer.
    pub timeout_ms: u64,
}

/// A request waiting for an identical request's response (local cache): the host adds it
/// to its worker's [`CacheWaiters`](crate::cache::waiters::CacheWaiters), which hands what
/// it finds to [`Exchange::on_cache_poll`].
#[derive(Debug, PartialEq, Eq)]
pub struct FillWait {
    pub key: crate::cache::CacheKey,
    /// How long it fetches for, if the fill is given up and it takes over.
    pub fill_ms: u64,
    pub deadline_ms: u64,
}

/// What the host hands to the request body callback.
pub struct BodyEnv<'a> {
    /// Limits and queues shared by all workers.
    pub store: &'a dyn Store,
    pub now_ms: u64,
    /// This worker's id and this stream's context id: who owns a queued request.
    pub worker: u32,
    pub context: u32,
    /// Random per VM: with the context id, names an admission at the quota service
    /// uniquely across workers, Envoy replicas and restarts.
    pub nonce: u64,
    /// The worker's registry of fallback plans; `None`: one attempt per request.
    pub plans: Option<&'a dyn crate::fallback::Plans>,
}

/// One request, from its headers to the end of its stream.
#[derive(Default)]
pub struct Exchange {
    /// The API dialect of the client (errors, headers), known from the path.
    flavour: ApiFlavour,
    /// The client's `x-request-id`, for the usage record.
    request_id: Option<String>,
    /// The page's origin, when some tenant allows it: responses carry CORS headers.
    cors: Option<String>,
    /// The client's `:authority`, for a fallback deployment that keeps it.
    authority: Option<String>,
    /// Its fallback plan, when it has later attempts to make.
    plan: Option<PlanState>,
    stage: Stage,
}

/// A request's fallback plan: kept by the worker while attempts run, then its record.
#[derive(Debug)]
enum PlanState {
    Registered,
    Collected(crate::fallback::Plan),
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("flavour", &self.flavour)
            .field("owner", &self.owner())
            .field("route", &self.route())
            .finish_non_exhaustive()
    }
}

/// Everything `on_log` must hand to the host, once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The usage record as one JSON line, for the access log.
    pub record: String,
    pub outcome: Outcome,
    pub usage: TokenUsage,
    pub estimated: bool,
    /// Limit keys that could not be settled (logged by the host).
    pub settle_failures: Vec<String>,
    /// A provider slot was freed: the host should let its waiters claim it now.
    pub released_slot: bool,
    /// The global limits' correction, for the host to send to the quota service.
    pub settlement: Option<Settlement>,
    /// A call for the global cache (store the response, or give its fill back), for the
    /// host to send from its root context.
    pub cache_call: Option<Callout>,
}

/// Changes to the response headers of a forwarded request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponseEdits {
    /// The body will be rewritten (usage chunk stripped): its length is no longer known.
    pub remove_content_length: bool,
    /// Rate-limit headers for the client.
    pub set: Vec<(String, String)>,
}

/// The host failed mid-edit and the request is answered with a 500 instead.
#[derive(Debug)]
pub struct Failed {
    pub reply: LocalReply,
    /// Limit keys that could not be given back (logged by the host).
    pub settle_failures: Vec<String>,
    /// What the quota service must give back.
    pub settlement: Option<Settlement>,
    /// The global cache's fill to give back.
    pub cache_call: Option<Callout>,
}

impl Exchange {
    pub fn new() -> Self {
        Self::default()
    }

    /// The API dialect of the client (errors, headers).
    pub fn flavour(&self) -> ApiFlavour {
        self.flavour
    }

    pub fn owner(&self) -> Option<KeyOwner> {
        self.stage.known().owner()
    }

    pub fn route(&self) -> Option<Route> {
        self.routed().map(|(_, route)| route)
    }

    fn routed(&self) -> Option<(Caller, Route)> {
        match self.stage.known() {
            Known::Routed(caller, route) => Some((caller, route)),
            _ => None,
        }
    }

    /// True when `finish` needs Envoy's `response.code_details` to tell how the stream
    /// ended (a client disconnect from an upstream failure): only while the request is
    /// with a provider, or waiting for one, and its response did not complete.
    pub fn needs_end_details(&self) -> bool {
        match &self.stage {
            Stage::Queued { wait, .. } => wait.state() == WaitState::Waiting,
            Stage::Admitting(_)
            | Stage::CacheLookup(_)
            | Stage::CacheWait(_)
            | Stage::Forwarded { .. } => true,
            Stage::Responding { response, .. } => !response.complete,
            _ => false,
        }
    }

    /// True while response chunks must be read (a usage meter is running).
    pub fn meters_response(&self) -> bool {
        matches!(&self.stage, Stage::Responding { response, .. } if response.meter.is_some())
    }

    /// True once the gateway answered this request itself.
    pub fn replied_locally(&self) -> bool {
        matches!(self.stage, Stage::Replied(_))
    }

    /// Names and ids of a routed request, for a debug log line: keys and credentials
    /// never appear.
    pub fn describe_route(&self, policy: &Policy) -> Option<String> {
        let (caller, route) = self.routed()?;
        let owner = caller.owner;
        let tenant = policy.tenant(owner.tenant);
        Some(format!(
            "sluice: routed tenant={} key={} model={} provider={} stream={} injected_usage={} prompt_estimate={}",
            tenant.map_or("?", |t| t.id.as_str()),
            tenant.and_then(|t| t.key_id(owner.key)).unwrap_or("?"),
            policy.model(route.model).map_or("?", |m| m.name.as_str()),
            policy.provider(route.provider).map_or("?", |p| p.name.as_str()),
            route.stream,
            route.injected_usage,
            route.prompt_estimate,
        ))
    }

    /// The gateway answers with `reply`; `refusal` says why it refused, if it did, and
    /// `claims` what the request still holds until its end.
    fn replied(
        &mut self,
        reply: &LocalReply,
        refusal: Option<&'static str>,
        known: Known,
        claims: Claims,
    ) {
        self.stage = Stage::Replied(Replied {
            status: reply.status,
            refusal,
            known,
            claims,
        });
    }

    /// Answers a request that holds nothing (the models endpoint).
    fn answer(&mut self, mut step: Step, reply: LocalReply, known: Known) -> Step {
        let reply = self.decorate(reply);
        self.replied(&reply, None, known, Claims::default());
        step.next = Next::Reply(reply);
        step
    }

    fn refuse(&mut self, step: Step, err: ApiError, known: Known) -> Step {
        self.refuse_holding(step, err, known, Claims::default())
    }

    fn refuse_holding(
        &mut self,
        mut step: Step,
        err: ApiError,
        known: Known,
        claims: Claims,
    ) -> Step {
        let reply = self.decorate(err.reply(self.flavour));
        self.replied(&reply, Some(err.kind.reason()), known, claims);
        step.next = Next::Reply(reply);
        step
    }

    /// A reply of the gateway's own with the request's id, under the header the client's
    /// SDK reads (`request-id` for Anthropic's, `x-request-id` for OpenAI's), and CORS
    /// headers for a page of an allowed origin.
    fn decorate(&self, mut reply: LocalReply) -> LocalReply {
        if let Some(id) = &self.request_id {
            let name = match self.flavour {
                ApiFlavour::Anthropic => "request-id",
                ApiFlavour::OpenAi => "x-request-id",
            };
            reply = reply.with_header(name, id);
        }
        // A preflight's answer has its own.
        let preflight = reply.header("access-control-allow-origin").is_some();
        if let (Some(origin), false) = (&self.cors, preflight) {
            reply.headers.extend(cors::response_headers(origin));
        }
        reply
    }

    pub fn on_request_headers(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        headers: &RequestHeaders,
        end_of_stream: bool,
    ) -> Step {
        if !matches!(self.stage, Stage::Headers) {
            return Step::default();
        }
        // Internal headers go first, whatever happens next: no client can pick a
        // cluster or claim a tenant.
        let step = Step {
            remove: headers.internal_names(),
            ..Step::default()
        };

        self.request_id = headers
            .get_str("x-request-id")
            .filter(|id| id.len() <= 128)
            .map(str::to_string);
        self.authority = headers.get_str(":authority").map(str::to_string);
        let full_path = headers.get_str(":path").unwrap_or("");
        let (path, query) = split_path(full_path);
        let endpoint = Endpoint::from_path(path);
        self.flavour = match &endpoint {
            Some(Endpoint::Models(_)) if headers.get("anthropic-version").is_some() => {
                ApiFlavour::Anthropic
            }
            Some(e) => e.flavour(),
            // Anthropic's clients, refused in Anthropic's shape.
            None if path.starts_with("/v1/messages") => ApiFlavour::Anthropic,
            None => ApiFlavour::OpenAi,
        };
        let placement = endpoint
            .as_ref()
            .map(Endpoint::key_placement)
            .unwrap_or(crate::auth::KeyPlacement::BearerOrApiKey);

        // Browsers: a preflight carries no key, so it is answered before one is asked for.
        self.cors = cors::allowed_origin(policy, headers);
        if cors::is_preflight(headers) {
            return match self.cors.clone() {
                Some(origin) => {
                    let reply = cors::preflight(&origin, headers);
                    self.answer(step, reply, Known::Nobody)
                }
                None => {
                    let msg = "No tenant of this gateway allows pages of this origin.";
                    let err = ApiError::new(ErrorKind::OriginNotAllowed, msg);
                    self.refuse(step, err, Known::Nobody)
                }
            };
        }

        let owner = match presented_key(headers, placement) {
            Ok(key) => match policy.keys.lookup(key) {
                Some(owner) => owner,
                None => {
                    let err =
                        ApiError::new(ErrorKind::InvalidApiKey, "Incorrect API key provided.");
                    return self.refuse(step, err, Known::Nobody);
                }
            },
            Err(e) => return self.refuse(step, e, Known::Nobody),
        };
        let known = Known::Tenant(owner);
        // A page may use a key only from an origin its tenant allows.
        if let Some(origin) = headers.get_str("origin") {
            let allowed = policy.tenant(owner.tenant).is_some_and(|t| {
                let origin = origin.trim().to_ascii_lowercase();
                t.allowed_origins.iter().any(|p| p.matches(&origin))
            });
            if !allowed {
                let msg = format!(
                    "This key may not be used from pages of `{}`.",
                    origin.trim()
                );
                let err = ApiError::new(ErrorKind::OriginNotAllowed, msg);
                return self.refuse(step, err, known);
            }
        }
        // Who pays is Sluice's key's account: the client's account selectors never pass,
        // and only the betas its tier allows.
        let mut step = step;
        // Only those present: each removal is a host call.
        let present = ACCOUNT_HEADERS.iter().filter(|h| headers.get(h).is_some());
        step.remove.extend(present.map(|h| (*h).to_string()));
        if let Some(betas) = headers.get_str("anthropic-beta") {
            let allowed = policy
                .tenant(owner.tenant)
                .map(|t| t.allowed_betas(betas))
                .unwrap_or_default();
            if allowed.is_empty() {
                step.remove.push("anthropic-beta".into());
            } else if allowed != betas {
                step.set.push(("anthropic-beta".into(), allowed));
            }
        }

        let method = headers.get_str(":method").unwrap_or("");
        let Some(endpoint) = endpoint else {
            let msg = format!("Invalid URL ({method} {path})");
            return self.refuse(step, ApiError::new(ErrorKind::UnknownPath, msg), known);
        };
        if method != endpoint.method() {
            let msg = format!(
                "Method {method} is not allowed on {path}; use {}.",
                endpoint.method()
            );
            let err = ApiError::new(ErrorKind::MethodNotAllowed, msg)
                .with_header("allow", endpoint.method());
            return self.refuse(step, err, known);
        }
        let api = match endpoint {
            Endpoint::Api(api) => api,
            Endpoint::Models(query) => {
                let reply = models::reply(policy, owner, &query, self.flavour);
                return self.answer(step, reply, known);
            }
            Endpoint::Usage => return self.usage(policy, env, step, owner),
        };

        if end_of_stream {
            let err = ApiError::new(
                ErrorKind::InvalidRequest,
                "The request body is empty; send a JSON object.",
            );
            return self.refuse(step, err, known);
        }
        // The shipped Envoy configs decompress gzip before this filter; anything still
        // compressed here cannot be read.
        let encoding = headers.get_str("content-encoding").map(str::trim);
        if let Some(encoding) =
            encoding.filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
        {
            let msg = format!(
                "Request bodies with `content-encoding: {encoding}` are not supported; send the body uncompressed{}.",
                if encoding.eq_ignore_ascii_case("gzip") {
                    " (or add Envoy's gzip decompressor before Sluice)"
                } else {
                    " or gzip-compressed"
                }
            );
            let err = ApiError::new(ErrorKind::UnsupportedEncoding, msg);
            return self.refuse(step, err, known);
        }
        let declared = headers
            .get_str("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > policy.max_body_bytes) {
            return self.refuse(step, too_large(policy), known);
        }
        self.stage = Stage::AwaitingBody {
            caller: Caller {
                owner,
                api,
                sent: SentCredentials {
                    authorization: headers.get("authorization").is_some(),
                    x_api_key: headers.get("x-api-key").is_some(),
                },
            },
            query: query.to_string(),
            directive: Directive::from_cache_control(headers.get_str("cache-control")),
        };
        Step {
            next: Next::Pause,
            ..step
        }
    }

    /// `body_size` is Envoy's running total of buffered bytes; `read_body` fetches them.
    pub fn on_request_body(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        body_size: usize,
        end_of_stream: bool,
        read_body: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Step {
        let Stage::AwaitingBody {
            caller,
            query,
            directive,
        } = &mut self.stage
        else {
            return Step::default();
        };
        let (caller, directive) = (*caller, *directive);
        if body_size as u64 > policy.max_body_bytes {
            return self.refuse(Step::default(), too_large(policy), Known::Request(caller));
        }
        if !end_of_stream {
            return Step {
                next: Next::Pause,
                ..Step::default()
            };
        }
        let query = std::mem::take(query);
        let Some(raw) = read_body() else {
            let err = ApiError::new(
                ErrorKind::Internal,
                "The gateway could not read the request body.",
            );
            return self.refuse(Step::default(), err, Known::Request(caller));
        };
        let origin = forward::Origin {
            request_id: self.request_id.as_deref(),
            authority: self.authority.as_deref().unwrap_or(""),
        };
        let forwarding = match forward::route(policy, env, caller, &query, directive, &raw, &origin)
        {
            Ok(forwarding) => forwarding,
            Err(refused) => return self.refuse(Step::default(), refused.error, refused.known),
        };
        let forward::Forwarding {
            caller,
            route,
            decision,
            mut step,
            cache,
            registered,
        } = forwarding;
        self.plan = registered.then_some(PlanState::Registered);
        step.routed = true;
        match decision {
            Decision::Admitted(admission::Admitted { held, headers }) => {
                let admitted = Admitted {
                    caller,
                    route,
                    held,
                    fill: None,
                };
                self.admitted(policy, env, admitted, headers, cache, step)
            }
            Decision::Pending(pending) => {
                // The edits are made now; the request stays paused until the answer.
                let id = format!("{:016x}-{}", env.nonce, env.context);
                let lease_ms = policy.global.as_ref().map_or(0, |g| g.lease_ms);
                let request = pending.request(id.clone(), lease_ms);
                self.stage = Stage::Admitting(Admitting {
                    caller,
                    route,
                    pending,
                    id,
                    cache,
                });
                step.next = Next::Admit(request);
                step
            }
        }
    }

    /// The quota service's answer to this request's admission (`Err`: no usable answer,
    /// with why). Continues as a locally admitted request would, or refuses it.
    pub fn on_admission_answer(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        answer: Result<AdmitReply, String>,
    ) -> Step {
        let Admitting {
            caller,
            route,
            pending,
            id,
            cache,
        } = match std::mem::take(&mut self.stage) {
            Stage::Admitting(admitting) => admitting,
            // Not waiting for it (the stream ended, or was answered, meanwhile: `finish`
            // releases what it held): nothing changes, and nothing resumes.
            other => {
                self.stage = other;
                return Step {
                    next: Next::Pause,
                    ..Step::default()
                };
            }
        };
        match pending.conclude(policy, env.store, id, answer, self.flavour, env.now_ms) {
            Ok(admission::Admitted { held, headers }) => {
                let admitted = Admitted {
                    caller,
                    route,
                    held,
                    fill: None,
                };
                self.admitted(policy, env, admitted, headers, cache, Step::default())
            }
            Err(refusal) => {
                let claims = Claims {
                    held: refusal.held,
                    place: Place::Nowhere,
                    fill: None,
                };
                let known = Known::Routed(caller, route);
                self.refuse_holding(Step::default(), refusal.error, known, claims)
            }
        }
    }

    /// An admitted request: answered from the cache, held for an identical request's
    /// response, or sent on (fetching the response for the cache when it may).
    fn admitted(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        mut admitted: Admitted,
        ratelimit_headers: Vec<(String, String)>,
        cache: Option<Ask>,
        mut step: Step,
    ) -> Step {
        let (tenant, model) = (admitted.caller.owner.tenant, admitted.route.model);
        let (key, rule) = match (cache, policy.cache_rule(tenant, model)) {
            (Some(Ask::Lookup(key)), Some(rule)) => (key, rule),
            (Some(Ask::Refresh(key)), Some(rule)) => {
                admitted.fill = Some(FillClaim {
                    tenant,
                    key,
                    claimed: false,
                    max_entry_bytes: rule.max_entry_bytes,
                });
                return self.send(policy, env, admitted, ratelimit_headers, step);
            }
            _ => return self.send(policy, env, admitted, ratelimit_headers, step),
        };
        let caching = Caching {
            admitted,
            ratelimit_headers,
            key,
        };
        match policy.cache_store {
            CacheStore::Local { slots } => {
                let found = caching::lookup_local(env.store, slots, key, rule, env.now_ms);
                self.looked_up(policy, env, caching, found, step)
            }
            CacheStore::Global { .. } => match caching::lookup_call(policy, tenant, key, rule) {
                Some(callout) => {
                    self.stage = Stage::CacheLookup(caching);
                    step.next = Next::Call(callout);
                    step
                }
                None => self.looked_up(policy, env, caching, Lookup::Unavailable, step),
            },
        }
    }

    /// Carries on with what the cache lookup found.
    fn looked_up(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        caching: Caching,
        found: Lookup,
        mut step: Step,
    ) -> Step {
        let Caching {
            mut admitted,
            ratelimit_headers,
            key,
        } = caching;
        let tenant = admitted.caller.owner.tenant;
        match found {
            Lookup::Hit(entry) => {
                let api = admitted.caller.api;
                let replayed = caching::replay(
                    &entry,
                    api,
                    &admitted.route,
                    ratelimit_headers.clone(),
                    env.now_ms,
                );
                if let Some((reply, usage)) = replayed {
                    let reply = self.decorate(reply);
                    admitted.route.cache = Some(CacheOutcome::Hit);
                    self.stage = Stage::Cached { admitted, usage };
                    step.next = Next::Reply(reply);
                    return step;
                }
                self.send(policy, env, admitted, ratelimit_headers, step)
            }
            Lookup::Fill => {
                let rule = policy.cache_rule(tenant, admitted.route.model);
                admitted.fill = Some(FillClaim {
                    tenant,
                    key,
                    claimed: true,
                    max_entry_bytes: rule.map_or(0, |r| r.max_entry_bytes),
                });
                self.send(policy, env, admitted, ratelimit_headers, step)
            }
            Lookup::Filling => {
                let fill_ms = policy
                    .cache_rule(tenant, admitted.route.model)
                    .map_or(0, |r| r.wait_ms);
                step.next = Next::AwaitFill(FillWait {
                    key,
                    fill_ms,
                    deadline_ms: env.now_ms.saturating_add(fill_ms),
                });
                self.stage = Stage::CacheWait(Caching {
                    admitted,
                    ratelimit_headers,
                    key,
                });
                step
            }
            Lookup::Unavailable => self.send(policy, env, admitted, ratelimit_headers, step),
        }
    }

    /// What this worker's cache waiters found for this request, waiting for an identical
    /// request's response.
    pub fn on_cache_poll(&mut self, policy: &Policy, env: &BodyEnv, found: Lookup) -> Step {
        match std::mem::take(&mut self.stage) {
            Stage::CacheWait(caching) => {
                self.looked_up(policy, env, caching, found, Step::default())
            }
            other => {
                self.stage = other;
                Step {
                    next: Next::Pause,
                    ..Step::default()
                }
            }
        }
    }

    /// Sends an admitted request on: upstream now, or into its provider's queue when the
    /// provider has a capacity and is full.
    fn send(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        admitted: Admitted,
        ratelimit_headers: Vec<(String, String)>,
        mut step: Step,
    ) -> Step {
        let caller = admitted.caller;
        let spec = policy
            .provider(admitted.route.provider)
            .and_then(|p| p.queue.as_ref().map(|spec| (p, spec)));
        let Some((provider, spec)) = spec else {
            self.stage = Stage::Forwarded {
                upstream: Upstream {
                    admitted,
                    slot: None,
                    sent_at_ms: env.now_ms,
                    waited_ms: None,
                },
                ratelimit_headers,
            };
            return step;
        };
        let entered = policy
            .tenant(caller.owner.tenant)
            .ok_or_else(|| ApiError::new(ErrorKind::Internal, "queue for an unknown tenant"))
            .and_then(|tenant| queue::enter(&provider.name, spec, tenant, env));
        match entered {
            Ok(Entered::Holding(slot)) => {
                self.stage = Stage::Forwarded {
                    upstream: Upstream {
                        admitted,
                        slot: Some(slot),
                        sent_at_ms: env.now_ms,
                        waited_ms: None,
                    },
                    ratelimit_headers,
                };
            }
            Ok(Entered::Waiting(wait)) => {
                step.next = Next::Wait(wait.waiter(self.flavour));
                self.stage = Stage::Queued {
                    admitted,
                    wait,
                    ratelimit_headers,
                };
            }
            Err(err) => {
                // Refused after admission: what it took is given back at the end.
                let (known, claims) = admitted.refused(Place::Nowhere);
                return self.refuse_holding(Step::default(), err, known, claims);
            }
        }
        step
    }

    /// Global concurrency slots this request holds: leases its Envoy renews while it runs.
    pub fn leases(&self) -> Vec<Lease> {
        match &self.stage {
            Stage::Queued { admitted, .. } | Stage::Cached { admitted, .. } => {
                admitted.held.leases()
            }
            Stage::CacheLookup(c) | Stage::CacheWait(c) => c.admitted.held.leases(),
            Stage::Forwarded { upstream, .. } | Stage::Responding { upstream, .. } => {
                upstream.admitted.held.leases()
            }
            _ => Vec::new(),
        }
    }

    /// The usage endpoint: answered at once when every limit is local, else after one
    /// call to the quota service.
    fn usage(&mut self, policy: &Policy, env: &BodyEnv, mut step: Step, owner: KeyOwner) -> Step {
        let known = Known::Tenant(owner);
        let draft = match usage_report::draft(policy, env.store, owner.tenant, env.now_ms) {
            Ok(draft) => draft,
            Err(err) => return self.refuse(step, err, known),
        };
        let Some(peek) = &draft.peek else {
            let reply = draft.reply(policy, env.now_ms);
            return self.answer(step, reply, known);
        };
        match serde_json::to_vec(peek) {
            Ok(body) => {
                step.next = Next::Call(Callout {
                    path: PEEK_PATH,
                    body,
                    timeout_ms: policy.global.as_ref().map_or(0, |g| g.timeout_ms),
                });
                self.stage = Stage::Reading { owner, draft };
                step
            }
            Err(e) => self.refuse(
                step,
                ApiError::quota_engine_unavailable(&e.to_string()),
                known,
            ),
        }
    }

    /// The answer to this request's own call to the quota service (the usage endpoint's
    /// readings; `Ok`: a 200's body; `Err`: no usable answer, with why).
    pub fn on_call_answer(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        answer: Result<&[u8], String>,
    ) -> Step {
        match std::mem::take(&mut self.stage) {
            Stage::CacheLookup(caching) => {
                let found = caching::lookup_answer(answer, caching.key, env.now_ms);
                self.looked_up(policy, env, caching, found, Step::default())
            }
            Stage::Reading { owner, draft } => {
                let known = Known::Tenant(owner);
                let readings = answer.and_then(|body| {
                    serde_json::from_slice::<PeekReply>(body)
                        .map_err(|e| format!("unusable answer: {e}"))
                });
                let completed = readings
                    .map_err(|why| ApiError::quota_engine_unavailable(&why))
                    .and_then(|r| draft.complete(r.readings));
                match completed {
                    Ok(draft) => {
                        let reply = draft.reply(policy, env.now_ms);
                        self.answer(Step::default(), reply, known)
                    }
                    Err(err) => self.refuse(Step::default(), err, known),
                }
            }
            // Not waiting for it: nothing changes, and nothing resumes.
            other => {
                self.stage = other;
                Step {
                    next: Next::Pause,
                    ..Step::default()
                }
            }
        }
    }

    /// Moves a request whose wait this worker's queue ended on: resumed requests are
    /// forwarded; timed-out ones stay queued until `finish` records the timeout.
    fn sync_wait(&mut self) {
        self.stage = match std::mem::take(&mut self.stage) {
            Stage::Queued {
                admitted,
                wait,
                ratelimit_headers,
            } => match wait.state() {
                WaitState::Resumed { at_ms } => Stage::Forwarded {
                    upstream: Upstream {
                        admitted,
                        sent_at_ms: at_ms,
                        waited_ms: Some(at_ms.saturating_sub(wait.since_ms())),
                        slot: Some(wait.into_slot()),
                    },
                    ratelimit_headers,
                },
                WaitState::Waiting | WaitState::TimedOut => Stage::Queued {
                    admitted,
                    wait,
                    ratelimit_headers,
                },
            },
            other => other,
        };
    }

    /// Response headers of a forwarded request: what to change in them.
    pub fn on_response_headers(
        &mut self,
        status: u16,
        content_type: Option<&str>,
        end_of_stream: bool,
        now_ms: u64,
    ) -> ResponseEdits {
        self.sync_wait();
        let (upstream, ratelimit_headers) = match std::mem::take(&mut self.stage) {
            Stage::Forwarded {
                upstream,
                ratelimit_headers,
            } => (upstream, ratelimit_headers),
            // Not forwarded (a local reply also runs the response callbacks) or already
            // responding: nothing changes.
            other => {
                self.stage = other;
                return ResponseEdits::default();
            }
        };
        let sse = content_type.is_some_and(|c| c.trim_start().starts_with("text/event-stream"));
        let route = upstream.admitted.route;
        let capture = match (upstream.admitted.fill, status) {
            (Some(fill), 200) => Some(Capture::new(
                content_type.unwrap_or(""),
                fill.max_entry_bytes,
            )),
            _ => None,
        };
        let strip = route.injected_usage && sse;
        let shape = upstream.admitted.caller.api.response_shape();
        let meter = shape
            .filter(|_| (200..300).contains(&status))
            .map(|shape| UsageMeter::new(shape, sse, strip, route.prompt_estimate));
        self.stage = Stage::Responding {
            upstream,
            response: UpstreamResponse {
                status,
                meter,
                complete: end_of_stream,
                headers_at_ms: now_ms,
                first_byte_at_ms: None,
                capture,
            },
        };
        let mut set = ratelimit_headers;
        if let Some(origin) = &self.cors {
            set.extend(cors::response_headers(origin));
        }
        if let Some(cap) = route.clamped_output {
            set.push(("x-sluice-output-clamped".into(), cap.to_string()));
        }
        if let Some(cache) = route.cache {
            set.push(("x-sluice-cache".into(), cache.as_str().into()));
        }
        ResponseEdits {
            remove_content_length: strip,
            set,
        }
    }

    /// One chunk of a forwarded response body; returns what the client gets instead.
    pub fn on_response_body(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        now_ms: u64,
    ) -> Passthrough {
        let Stage::Responding { response, .. } = &mut self.stage else {
            return Passthrough::Unchanged;
        };
        if response.first_byte_at_ms.is_none() && !chunk.is_empty() {
            response.first_byte_at_ms = Some(now_ms);
        }
        if end_of_stream {
            response.complete = true;
        }
        if let Some(capture) = response.capture.as_mut() {
            capture.keep(chunk);
        }
        match response.meter.as_mut() {
            Some(meter) => meter.feed(chunk, end_of_stream),
            None => Passthrough::Unchanged,
        }
    }

    /// The host could not carry out a step (a host call failed mid-edit): the request must
    /// not go upstream half-rewritten. Gives back what it holds now and answers 500 in the
    /// client's format.
    pub fn fail(&mut self, policy: &Policy, store: &dyn Store, now_ms: u64) -> Failed {
        let err = ApiError::new(
            ErrorKind::Internal,
            "The gateway failed to process the request.",
        );
        let reply = self.decorate(err.reply(self.flavour));
        let (known, claims) = match std::mem::take(&mut self.stage) {
            Stage::Headers => (Known::Nobody, Claims::default()),
            Stage::AwaitingBody { caller, .. } => (Known::Request(caller), Claims::default()),
            Stage::Admitting(admitting) => (
                Known::Routed(admitting.caller, admitting.route),
                admitting.abandoned(),
            ),
            Stage::Reading { owner, .. } => (Known::Tenant(owner), Claims::default()),
            Stage::CacheLookup(c) | Stage::CacheWait(c) => c.admitted.refused(Place::Nowhere),
            Stage::Cached { admitted, .. } => admitted.refused(Place::Nowhere),
            Stage::Queued { admitted, wait, .. } => admitted.refused(Place::Waiting(wait)),
            Stage::Forwarded { upstream, .. } | Stage::Responding { upstream, .. } => {
                let place = upstream.slot.map_or(Place::Nowhere, Place::Holding);
                upstream.admitted.refused(place)
            }
            Stage::Replied(replied) => (replied.known, replied.claims),
            // Its record is written already: nothing to give back or record again.
            Stage::Finished => {
                self.stage = Stage::Finished;
                return Failed {
                    reply,
                    settle_failures: Vec::new(),
                    settlement: None,
                    cache_call: None,
                };
            }
        };
        let given_back = claims.give_back(policy, store, 0, 0, now_ms);
        self.replied(&reply, Some(err.kind.reason()), known, Claims::default());
        Failed {
            reply,
            settle_failures: given_back.failures,
            settlement: given_back.settlement,
            cache_call: given_back.cache_call,
        }
    }

    /// Takes the request's fallback plan, with the attempts its upstream filter recorded,
    /// from the worker's registry: call once, before [`Exchange::finish`].
    pub fn collect_attempts(&mut self, plans: &dyn crate::fallback::Plans) {
        if let (Some(PlanState::Registered), Some(id)) = (&self.plan, &self.request_id) {
            self.plan = plans.take(id).map(PlanState::Collected);
        }
    }

    /// The end of the stream, whatever ended it. Emits metrics and returns the usage
    /// record exactly once; later calls return `None`. `details` is Envoy's
    /// `response.code_details` (tells a client disconnect from an upstream failure).
    pub fn finish(
        &mut self,
        policy: &Policy,
        store: &dyn Store,
        details: Option<&str>,
        now_ms: u64,
        metrics: &mut impl Metrics,
    ) -> Option<Completion> {
        self.sync_wait();
        let client_left = details.is_some_and(|d| d.contains("downstream"));
        let mut stage = std::mem::replace(&mut self.stage, Stage::Finished);
        let captured = match &mut stage {
            Stage::Responding { response, .. } if response.complete => {
                response.capture.take().filter(Capture::storable)
            }
            _ => None,
        };
        let plan = match self.plan.take() {
            Some(PlanState::Collected(plan)) => Some(plan),
            _ => None,
        };
        let served = plan.as_ref().and_then(|p| p.served().copied());
        let (mut ending, mut claims) = ending::decide(
            stage,
            self.flavour,
            client_left,
            policy,
            served.map(|a| a.deployment),
        )?;
        // Served by another deployment than the first: its account, its limits.
        let moved_to = served
            .map(|a| a.provider)
            .filter(|&p| ending.provider.is_some_and(|routed| routed != p));
        let mut held_by_attempts = Vec::new();
        if let Some(plan) = plan {
            ending.attempts = plan.attempts;
            held_by_attempts = plan.held;
        }
        if let Some(p) = moved_to {
            ending.provider = Some(p);
        }
        // Only a complete 200 whose usage the provider reported is stored.
        let storable = ending.outcome == Outcome::Success
            && ending.status == 200
            && !ending.usage.estimated
            && !ending.usage.suspicious;
        let mut cache_call = None;
        if let (Some(capture), Some(fill), Some(model), true) =
            (captured, claims.fill, ending.model, storable)
        {
            cache_call = caching::store(policy, store, fill, model, capture, now_ms);
            // The stored entry replaced the fill.
            claims.fill = None;
        }
        let tokens = crate::cache::charge(
            ending.usage.usage.total(),
            ending::charged_ppm(policy, &ending),
        );
        let mut moved_failures = Vec::new();
        // Later attempts' accounts: the serving one keeps what was used, the others
        // get theirs back.
        let mut reserved = false;
        for (deployment, items) in &held_by_attempts {
            let serving = served.is_some_and(|a| a.deployment == *deployment);
            reserved |= serving && !items.is_empty();
            let (t, c) = if serving {
                (tokens, ending.cost_micro_usd)
            } else {
                (0, 0)
            };
            moved_failures.extend(admission::settle_items(store, items, t, c, now_ms));
        }
        if let Some(p) = moved_to {
            moved_failures.extend(admission::move_provider_usage(
                policy,
                store,
                &mut claims.held,
                p,
                reserved,
                tokens,
                ending.cost_micro_usd,
                now_ms,
            ));
        }
        let mut given_back = claims.give_back(policy, store, tokens, ending.cost_micro_usd, now_ms);
        given_back.failures.extend(moved_failures);
        crate::metrics::record_ending(metrics, &ending);
        let record = crate::accounting::usage_record(policy, self.request_id.as_deref(), &ending);
        Some(Completion {
            record,
            outcome: ending.outcome,
            usage: ending.usage.usage,
            estimated: ending.usage.estimated,
            settle_failures: given_back.failures,
            released_slot: given_back.released_slot,
            settlement: given_back.settlement,
            cache_call: cache_call.or(given_back.cache_call),
        })
    }
}

fn too_large(policy: &Policy) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!(
            "The request body exceeds the limit of {} bytes.",
            policy.max_body_bytes
        ),
    )
}
