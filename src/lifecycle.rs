//! One request's journey through the gateway, as a pure state machine.
//!
//! The host layer feeds it what Envoy reports (headers, body size) and applies the
//! [`Step`] it returns: header edits, a body replacement, and whether to continue, keep
//! buffering, or answer locally. Nothing here calls the host, so all of it runs natively.

use crate::accounting::{cost_micro_usd, UsageRecord};
use crate::admission::{self, Held, Reservation};
use crate::auth::{presented_key, KeyOwner};
use crate::body::{
    inject_include_usage, parse_request, replace_model, replace_model_reserialized, RequestFields,
};
use crate::errors::{ApiError, ApiFlavour, ErrorKind, LocalReply};
use crate::fairness::{tenant_hash, Arrival, FairQueue, Owner, Ticket};
use crate::headers::{RequestHeaders, CLUSTER_HEADER};
use crate::metrics::{usage_labels, Counter, Histogram, Labels, MetricKey, Metrics, Outcome};
use crate::policy::{ModelId, Policy, ProviderId};
use crate::routing::{split_path, upstream_path, Endpoint};
use crate::shared::Store;
use crate::usage::{MeterResult, Passthrough, ResponseShape, TokenUsage, UsageMeter};
use serde_json::json;

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
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum Next {
    /// Let the request go on (to the next filter and the router).
    #[default]
    Continue,
    /// Hold the request; for the headers callback this buffers the body.
    Pause,
    /// Answer the client directly; the host sends it and then pauses for good.
    Reply(LocalReply),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Stage {
    #[default]
    Headers,
    AwaitingBody,
    Forwarded,
    Replied,
}

/// What the gateway decided about a forwarded request (used by accounting and limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDecision {
    pub model: ModelId,
    pub provider: ProviderId,
    pub stream: bool,
    /// The gateway added `stream_options.include_usage` and strips the usage chunk.
    pub injected_usage: bool,
    /// Prompt tokens estimated from the request body.
    pub prompt_estimate: u64,
}

/// What the host hands to the request body callback.
pub struct BodyEnv<'a> {
    /// Limits and queues shared by all workers.
    pub store: &'a dyn Store,
    pub now_ms: u64,
    /// This worker's id and this stream's context id: who owns a queued request.
    pub worker: u32,
    pub context: u32,
}

/// A request waiting for a full provider; the host resumes or times it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueWait {
    pub key: String,
    pub capacity: u32,
    pub since_ms: u64,
    pub deadline_ms: u64,
}

/// How a wait ended, as the host saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitState {
    Waiting,
    Resumed { at_ms: u64 },
    TimedOut,
}

/// This request's place in a provider's fair queue.
#[derive(Debug, Default)]
enum QueueSlot {
    #[default]
    None,
    /// Holds one of the provider's in-flight slots: release at stream end.
    Holding {
        key: String,
        capacity: u32,
    },
    Waiting(QueueWait),
    /// The host answered 503/529 after the tier's maximum wait; nothing held.
    TimedOut,
}

/// The local reply for a request that waited too long for a full provider.
pub fn queue_timeout_reply(flavour: ApiFlavour, waited_ms: u64) -> LocalReply {
    ApiError::new(
        ErrorKind::QueueTimeout,
        format!("The provider is at capacity; the request waited {waited_ms} ms without a free slot. Please retry later."),
    )
    .retry_after_ms(1000)
    .reply(flavour)
}

/// What came back from upstream (or from Envoy on its behalf: 503, 504).
#[derive(Default)]
struct UpstreamResponse {
    status: u16,
    meter: Option<UsageMeter>,
    complete: bool,
    headers_at_ms: u64,
    first_byte_at_ms: Option<u64>,
}

#[derive(Default)]
pub struct Exchange {
    stage: Stage,
    flavour: ApiFlavour,
    endpoint: Option<Endpoint>,
    query: String,
    request_id: Option<String>,
    owner: Option<KeyOwner>,
    /// Resolved model, known before routing finishes (so refusals can name it).
    model: Option<ModelId>,
    route: Option<RouteDecision>,
    /// Status and refusal reason of the gateway's own reply.
    local: Option<(u16, Option<&'static str>)>,
    /// Limits taken at admission, settled exactly once in `finish`.
    held: Option<Held>,
    /// Rate-limit headers for the response of an admitted request.
    ratelimit_headers: Vec<(String, String)>,
    queue: QueueSlot,
    queue_owner: Option<Owner>,
    /// How long the request waited for a full provider.
    queue_wait_ms: Option<u64>,
    forwarded_at_ms: u64,
    response: Option<UpstreamResponse>,
    finished: bool,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("stage", &self.stage)
            .field("endpoint", &self.endpoint)
            .field("owner", &self.owner)
            .field("route", &self.route)
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
}

/// Changes to the response headers of a forwarded request.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResponseEdits {
    /// The body will be rewritten (usage chunk stripped): its length is no longer known.
    pub remove_content_length: bool,
    /// Rate-limit headers for the client.
    pub set: Vec<(String, String)>,
}

impl Exchange {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn owner(&self) -> Option<KeyOwner> {
        self.owner
    }

    pub fn route(&self) -> Option<&RouteDecision> {
        self.route.as_ref()
    }

    /// The API dialect of the client (errors, headers).
    pub fn flavour(&self) -> ApiFlavour {
        self.flavour
    }

    /// True when `finish` needs Envoy's `response.code_details` to tell how the stream
    /// ended: not for local replies, nor for responses that completed.
    pub fn needs_end_details(&self) -> bool {
        self.local.is_none() && !self.response.as_ref().is_some_and(|r| r.complete)
    }

    /// True while response chunks must be read (a usage meter is running).
    pub fn meters_response(&self) -> bool {
        self.response.as_ref().is_some_and(|r| r.meter.is_some())
    }

    /// True once the gateway answered this request itself.
    pub fn replied_locally(&self) -> bool {
        self.stage == Stage::Replied
    }

    fn reply(&mut self, mut step: Step, reply: LocalReply) -> Step {
        self.stage = Stage::Replied;
        self.local = Some((reply.status, None));
        step.next = Next::Reply(reply);
        step
    }

    fn refuse(&mut self, step: Step, err: ApiError) -> Step {
        let reply = err.reply(self.flavour);
        let status = reply.status;
        let step = self.reply(step, reply);
        self.local = Some((status, Some(err.kind.reason())));
        step
    }

    pub fn on_request_headers(
        &mut self,
        policy: &Policy,
        headers: &RequestHeaders,
        end_of_stream: bool,
    ) -> Step {
        if self.stage != Stage::Headers {
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
        let full_path = headers.get_str(":path").unwrap_or("");
        let (path, query) = split_path(full_path);
        let endpoint = Endpoint::from_path(path);
        self.flavour = match &endpoint {
            Some(Endpoint::ListModels | Endpoint::GetModel(_))
                if headers.get("anthropic-version").is_some() =>
            {
                ApiFlavour::Anthropic
            }
            Some(e) => e.flavour(),
            None => ApiFlavour::OpenAi,
        };
        let placement = endpoint
            .as_ref()
            .map(Endpoint::key_placement)
            .unwrap_or(crate::auth::KeyPlacement::BearerOrApiKey);

        let owner = match presented_key(headers, placement) {
            Ok(key) => match policy.keys.lookup(key) {
                Some(owner) => owner,
                None => {
                    return self.refuse(
                        step,
                        ApiError::new(ErrorKind::InvalidApiKey, "Incorrect API key provided."),
                    )
                }
            },
            Err(e) => return self.refuse(step, e),
        };
        self.owner = Some(owner);

        let method = headers.get_str(":method").unwrap_or("");
        let Some(endpoint) = endpoint else {
            let msg = format!("Invalid URL ({method} {path})");
            return self.refuse(step, ApiError::new(ErrorKind::UnknownPath, msg));
        };
        if method != endpoint.method() {
            let msg = format!(
                "Method {method} is not allowed on {path}; use {}.",
                endpoint.method()
            );
            let err = ApiError::new(ErrorKind::MethodNotAllowed, msg);
            let reply = err
                .reply(self.flavour)
                .with_header("allow", endpoint.method());
            let step = self.reply(step, reply);
            self.local = Some((err.kind.status(), Some(err.kind.reason())));
            return step;
        }

        match &endpoint {
            Endpoint::ListModels => {
                let reply = model_list(policy, owner, self.flavour);
                return self.reply(step, reply);
            }
            Endpoint::GetModel(id) => {
                let reply = match model_object(policy, owner, id, self.flavour) {
                    Some(r) => r,
                    None => model_not_found(id).reply(self.flavour),
                };
                return self.reply(step, reply);
            }
            _ => {}
        }

        if end_of_stream {
            return self.refuse(
                step,
                ApiError::new(
                    ErrorKind::InvalidRequest,
                    "The request body is empty; send a JSON object.",
                ),
            );
        }
        let declared = headers
            .get_str("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(len) = declared {
            if len > policy.max_body_bytes {
                return self.refuse(step, too_large(policy));
            }
        }
        self.endpoint = Some(endpoint);
        self.query = query.to_string();
        self.stage = Stage::AwaitingBody;
        Step {
            next: Next::Pause,
            ..step
        }
    }

    /// `body_size` is Envoy's running total of buffered bytes; `read_body` fetches them.
    /// `now_ms` is the host clock; `store` holds the limits shared by all workers.
    #[allow(clippy::too_many_arguments)]
    pub fn on_request_body(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        body_size: usize,
        end_of_stream: bool,
        read_body: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Step {
        let now_ms = env.now_ms;
        if self.stage != Stage::AwaitingBody {
            return Step::default();
        }
        if body_size as u64 > policy.max_body_bytes {
            return self.refuse(Step::default(), too_large(policy));
        }
        if !end_of_stream {
            return Step {
                next: Next::Pause,
                ..Step::default()
            };
        }
        let Some(raw) = read_body() else {
            return self.refuse(
                Step::default(),
                ApiError::new(
                    ErrorKind::Internal,
                    "The gateway could not read the request body.",
                ),
            );
        };
        match self.route_body(policy, env, &raw) {
            Ok(step) => {
                self.stage = Stage::Forwarded;
                self.forwarded_at_ms = now_ms;
                step
            }
            Err(e) => self.refuse(Step::default(), e),
        }
    }

    fn route_body(&mut self, policy: &Policy, env: &BodyEnv, raw: &[u8]) -> Result<Step, ApiError> {
        let (store, now_ms) = (env.store, env.now_ms);
        let owner = self.owner.ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                "request reached routing unauthenticated",
            )
        })?;
        let endpoint = self.endpoint.clone().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                "request reached routing without an endpoint",
            )
        })?;
        let RequestFields {
            model: requested,
            stream,
            include_usage,
            max_output_tokens,
            prompt,
        } = parse_request(raw)?;

        let model_id = policy
            .catalog
            .resolve(&requested)
            .ok_or_else(|| model_not_found(&requested))?;
        self.model = Some(model_id);
        let model = policy
            .model(model_id)
            .ok_or_else(|| ApiError::new(ErrorKind::Internal, "model table out of range"))?;
        if !policy.may_use(owner.tenant, model_id) {
            let tenant = policy
                .tenant(owner.tenant)
                .map(|t| t.id.as_str())
                .unwrap_or("?");
            return Err(ApiError::new(
                ErrorKind::ModelNotAllowed,
                format!(
                    "Tenant `{tenant}` is not allowed to use the model `{}`.",
                    model.name
                ),
            )
            .with_param("model"));
        }
        let (provider_id, provider) = policy
            .provider_for(model_id, endpoint.flavour())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorKind::ModelNotFound,
                    format!(
                        "The model `{}` is not served through the {} API on this gateway.",
                        model.name,
                        match endpoint.flavour() {
                            ApiFlavour::OpenAi => "OpenAI",
                            ApiFlavour::Anthropic => "Anthropic Messages",
                        }
                    ),
                )
                .with_param("model")
            })?;
        let suffix = endpoint
            .upstream_suffix()
            .ok_or_else(|| ApiError::new(ErrorKind::Internal, "endpoint is not forwardable"))?;

        // Reserve what the request may use, in one decision over every limit.
        let prompt_estimate = prompt.tokens(response_shape(&endpoint));
        let output_cap = match endpoint {
            Endpoint::Embeddings => 0,
            _ => max_output_tokens.unwrap_or(policy.default_max_output_tokens),
        };
        let expected = TokenUsage {
            input_tokens: prompt_estimate,
            output_tokens: output_cap,
            ..TokenUsage::default()
        };
        let reservation = Reservation {
            tokens: expected.total(),
            cost_micro_usd: cost_micro_usd(&expected, &model.price),
        };
        let parties = admission::Parties {
            tenant: owner.tenant,
            model: model_id,
            provider: provider_id,
        };
        let admitted = admission::admit(policy, store, parties, reservation, self.flavour, now_ms)?;
        self.held = Some(admitted.held);
        self.ratelimit_headers = admitted.headers;

        let mut step = Step {
            remove: vec!["authorization".into(), "x-api-key".into()],
            ..Step::default()
        };
        let mut body: Option<Vec<u8>> = None;
        if requested != model.upstream_name {
            let rewritten = replace_model(raw, &model.upstream_name)
                .or_else(|| replace_model_reserialized(raw, &model.upstream_name))
                .ok_or_else(unrewritable_body)?;
            body = Some(rewritten);
        }
        // Meter every chat stream: ask for the usage chunk, strip it on the way back.
        let injected_usage = endpoint == Endpoint::ChatCompletions && stream && !include_usage;
        if injected_usage {
            let current = body.as_deref().unwrap_or(raw);
            body = Some(inject_include_usage(current).ok_or_else(unrewritable_body)?);
        }
        if let Some(b) = &body {
            step.set
                .push(("content-length".into(), b.len().to_string()));
        }
        step.body = body;
        step.set
            .push((":path".into(), upstream_path(provider, suffix, &self.query)));
        if let Some(authority) = &provider.authority {
            step.set.push((":authority".into(), authority.clone()));
        }
        step.set
            .push((CLUSTER_HEADER.into(), provider.cluster.clone()));
        step.set.push((
            provider.credential.header().to_string(),
            provider.credential.value().to_string(),
        ));

        self.route = Some(RouteDecision {
            model: model_id,
            provider: provider_id,
            stream,
            injected_usage,
            prompt_estimate,
        });
        if let Some(capacity) = provider.max_in_flight {
            self.enter_queue(policy, env, owner.tenant, provider_id, capacity, &mut step)?;
        }
        Ok(step)
    }

    /// Takes one of the provider's in-flight slots, or waits for one (the step pauses).
    fn enter_queue(
        &mut self,
        policy: &Policy,
        env: &BodyEnv,
        tenant: crate::policy::TenantId,
        provider: ProviderId,
        capacity: u32,
        step: &mut Step,
    ) -> Result<(), ApiError> {
        let (Some(t), Some(p)) = (policy.tenant(tenant), policy.provider(provider)) else {
            return Err(ApiError::new(
                ErrorKind::Internal,
                "queue for an unknown tenant or provider",
            ));
        };
        let key = crate::shared::keys::queue(&p.name);
        let q = t.queueing;
        let owner = Owner {
            worker: env.worker,
            context: env.context,
        };
        let ticket = Ticket {
            tenant: tenant_hash(&t.id),
            priority: q.priority,
            weight: q.weight,
            max_queue_length: q.max_queue_length,
            deadline_ms: env.now_ms.saturating_add(q.max_wait_ms),
        };
        self.queue_owner = Some(owner);
        match FairQueue::new(env.store, &key, capacity).arrive(owner, ticket, env.now_ms) {
            Arrival::Admitted => {
                self.queue = QueueSlot::Holding { key, capacity };
                Ok(())
            }
            Arrival::Queued { .. } => {
                self.queue = QueueSlot::Waiting(QueueWait {
                    key,
                    capacity,
                    since_ms: env.now_ms,
                    deadline_ms: ticket.deadline_ms,
                });
                step.next = Next::Pause;
                Ok(())
            }
            Arrival::QueueFull => Err(ApiError::new(
                ErrorKind::QueueFull,
                format!(
                                        "Provider `{}` is at capacity and its queue is full (tenant `{}` may have {} requests waiting).",
                    p.name, t.id, q.max_queue_length
                ),
            )
            .retry_after_ms(1000)),
            Arrival::Failed(failure) => Err(ApiError::shared_state("queue", failure)),
        }
    }

    /// The wait the host must track, while this request is queued.
    pub fn queue_wait(&self) -> Option<&QueueWait> {
        match &self.queue {
            QueueSlot::Waiting(w) => Some(w),
            _ => None,
        }
    }

    /// The host resumed the request (its slot claimed) or timed it out (and replied).
    pub fn wait_ended(&mut self, state: WaitState) {
        let QueueSlot::Waiting(wait) = &self.queue else {
            return;
        };
        match state {
            WaitState::Waiting => {}
            WaitState::Resumed { at_ms } => {
                self.queue_wait_ms = Some(at_ms.saturating_sub(wait.since_ms));
                self.forwarded_at_ms = at_ms;
                self.queue = QueueSlot::Holding {
                    key: wait.key.clone(),
                    capacity: wait.capacity,
                };
            }
            WaitState::TimedOut => {
                self.queue_wait_ms = Some(wait.deadline_ms.saturating_sub(wait.since_ms));
                self.queue = QueueSlot::TimedOut;
                self.stage = Stage::Replied;
                let status = ErrorKind::QueueTimeout.status_for(self.flavour);
                self.local = Some((status, Some(ErrorKind::QueueTimeout.reason())));
            }
        }
    }

    /// True if this request holds a provider slot that `finish` released.
    fn end_queue(&mut self, store: &dyn Store, failures: &mut Vec<String>) -> bool {
        match std::mem::take(&mut self.queue) {
            QueueSlot::Holding { key, capacity } => {
                if let Err(e) = FairQueue::new(store, &key, capacity).release() {
                    failures.push(format!("{key}: release: {e:?}"));
                }
                true
            }
            QueueSlot::Waiting(w) => {
                // The client left while queued: give up the place.
                if let Some(owner) = self.queue_owner {
                    if let Err(e) = FairQueue::new(store, &w.key, w.capacity).cancel(owner) {
                        failures.push(format!("{}: cancel: {e:?}", w.key));
                    }
                }
                false
            }
            QueueSlot::TimedOut | QueueSlot::None => false,
        }
    }

    /// Response headers of a forwarded request: what to change in them.
    pub fn on_response_headers(
        &mut self,
        status: u16,
        content_type: Option<&str>,
        end_of_stream: bool,
        now_ms: u64,
    ) -> ResponseEdits {
        if self.stage != Stage::Forwarded || self.response.is_some() {
            return ResponseEdits::default();
        }
        let sse = content_type.is_some_and(|c| c.trim_start().starts_with("text/event-stream"));
        let meter = match (&self.endpoint, &self.route) {
            (Some(endpoint), Some(route)) if (200..300).contains(&status) => {
                let strip = route.injected_usage && sse;
                Some(UsageMeter::new(
                    response_shape(endpoint),
                    sse,
                    strip,
                    route.prompt_estimate,
                ))
            }
            _ => None,
        };
        let rewrites = self.route.as_ref().is_some_and(|r| r.injected_usage) && sse;
        self.response = Some(UpstreamResponse {
            status,
            meter,
            complete: end_of_stream,
            headers_at_ms: now_ms,
            first_byte_at_ms: None,
        });
        ResponseEdits {
            remove_content_length: rewrites,
            set: std::mem::take(&mut self.ratelimit_headers),
        }
    }

    /// One chunk of a forwarded response body; returns what the client gets instead.
    pub fn on_response_body(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        now_ms: u64,
    ) -> Passthrough {
        let Some(resp) = self.response.as_mut() else {
            return Passthrough::Unchanged;
        };
        if resp.first_byte_at_ms.is_none() && !chunk.is_empty() {
            resp.first_byte_at_ms = Some(now_ms);
        }
        if end_of_stream {
            resp.complete = true;
        }
        match resp.meter.as_mut() {
            Some(meter) => meter.feed(chunk, end_of_stream),
            None => Passthrough::Unchanged,
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
        if self.finished {
            return None;
        }
        self.finished = true;
        let client_left = details.is_some_and(|d| d.contains("downstream"));
        let (outcome, reason, status, metered) = match (&self.local, &self.response) {
            (Some((status, reason)), _) => {
                let outcome = if reason.is_some() {
                    Outcome::Rejected
                } else {
                    Outcome::Success
                };
                (outcome, *reason, *status, None)
            }
            (None, None) if self.stage == Stage::Forwarded && client_left => {
                // The provider was working on it: bill the prompt, as providers do.
                let prompt = self.route.as_ref().map_or(0, |r| r.prompt_estimate);
                let usage = TokenUsage {
                    input_tokens: prompt,
                    ..TokenUsage::default()
                };
                let result = MeterResult {
                    usage,
                    estimated: true,
                    suspicious: false,
                };
                (Outcome::Aborted, None, 0, Some(result))
            }
            (None, None) if client_left || self.stage != Stage::Forwarded => {
                (Outcome::Aborted, None, 0, None)
            }
            (None, None) => (Outcome::UpstreamError, None, 0, None),
            (None, Some(resp)) => {
                let outcome = match resp.status {
                    200..=399 if resp.complete => Outcome::Success,
                    200..=399 if client_left => Outcome::Aborted,
                    200..=399 => Outcome::UpstreamError,
                    429 | 500..=599 => Outcome::UpstreamError,
                    _ => Outcome::ClientError,
                };
                (
                    outcome,
                    None,
                    resp.status,
                    resp.meter.as_ref().map(UsageMeter::result),
                )
            }
        };
        let result = metered.unwrap_or(MeterResult {
            usage: TokenUsage::default(),
            estimated: false,
            suspicious: false,
        });
        let usage = result.usage;
        let tenant = self.owner.map(|o| o.tenant);
        let model = self.model;
        let provider = self.route.as_ref().map(|r| r.provider);
        let price = model.and_then(|m| policy.model(m)).map(|m| m.price);
        let cost = price.map_or(0, |p| cost_micro_usd(&usage, &p));
        // Refund or charge the reservation, release slots: exactly once, here.
        let mut settle_failures = match self.held.take() {
            Some(held) => admission::settle(store, &held, usage.total(), cost, now_ms),
            None => Vec::new(),
        };
        let released_slot = self.end_queue(store, &mut settle_failures);
        if let (Some(wait), Some(p)) = (self.queue_wait_ms, provider) {
            metrics.add(MetricKey::QueueWait(p, tenant), wait);
        }

        metrics.add(
            MetricKey::Counter(
                Counter::Requests,
                Labels {
                    tenant,
                    model,
                    provider,
                    outcome,
                    reason: reason.unwrap_or("none"),
                },
            ),
            1,
        );
        let labels = usage_labels(tenant, model, provider);
        for (counter, value) in [
            (Counter::InputTokens, usage.input_tokens),
            (Counter::CachedInputTokens, usage.cached_input_tokens),
            (Counter::CacheCreationTokens, usage.cache_creation_tokens),
            (Counter::OutputTokens, usage.output_tokens),
            (Counter::ReasoningTokens, usage.reasoning_tokens),
            (Counter::CostMicroUsd, cost),
            (Counter::EstimatedUsage, u64::from(result.estimated)),
        ] {
            if value > 0 {
                metrics.add(MetricKey::Counter(counter, labels), value);
            }
        }
        if let Some(resp) = &self.response {
            let latency = resp.headers_at_ms.saturating_sub(self.forwarded_at_ms);
            metrics.add(
                MetricKey::Histogram(Histogram::UpstreamLatencyMs, provider, model),
                latency,
            );
            if let Some(first) = resp.first_byte_at_ms {
                let ttft = first.saturating_sub(self.forwarded_at_ms);
                metrics.add(
                    MetricKey::Histogram(Histogram::TimeToFirstTokenMs, provider, model),
                    ttft,
                );
            }
        }

        let tenant_ref = tenant.and_then(|t| policy.tenant(t));
        let record = UsageRecord {
            request_id: self.request_id.as_deref(),
            tenant: tenant_ref.map(|t| t.id.as_str()),
            key_id: self
                .owner
                .and_then(|o| tenant_ref.and_then(|t| t.key_id(o.key))),
            model: model.and_then(|m| policy.model(m)).map(|m| m.name.as_str()),
            provider: provider
                .and_then(|p| policy.provider(p))
                .map(|p| p.name.as_str()),
            endpoint: self.endpoint.as_ref().map(Endpoint::name),
            stream: self.route.as_ref().is_some_and(|r| r.stream),
            outcome,
            reason,
            status,
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            cache_creation_tokens: usage.cache_creation_tokens,
            output_tokens: usage.output_tokens,
            reasoning_tokens: usage.reasoning_tokens,
            cost_micro_usd: cost,
            estimated: result.estimated,
            usage_suspicious: result.suspicious,
            queue_wait_ms: self.queue_wait_ms,
        };
        let record = serde_json::to_string(&record).unwrap_or_else(|_| "{}".into());
        Some(Completion {
            record,
            outcome,
            usage,
            estimated: result.estimated,
            settle_failures,
            released_slot,
        })
    }
}

/// How usage is reported for an endpoint's responses.
fn response_shape(endpoint: &Endpoint) -> ResponseShape {
    match endpoint {
        Endpoint::Embeddings => ResponseShape::Embeddings,
        Endpoint::Responses => ResponseShape::Responses,
        Endpoint::Messages => ResponseShape::AnthropicMessages,
        _ => ResponseShape::ChatCompletions,
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

/// The body passed `parse_request` but a rewrite needs a full JSON tree, which refuses it
/// (an unpaired surrogate escape in a string the probe skipped): the client's input.
fn unrewritable_body() -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        "We could not parse the JSON body of your request: it contains an invalid string escape.",
    )
}

fn model_not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::ModelNotFound,
        format!("The model `{name}` does not exist or you do not have access to it."),
    )
    .with_param("model")
}

fn model_list(policy: &Policy, owner: KeyOwner, flavour: ApiFlavour) -> LocalReply {
    let models: Vec<_> = policy.models_for(owner.tenant).collect();
    let body = match flavour {
        ApiFlavour::OpenAi => json!({
            "object": "list",
            "data": models.iter().map(|m| openai_model(policy, m)).collect::<Vec<_>>(),
        }),
        ApiFlavour::Anthropic => json!({
            "data": models.iter().map(|m| anthropic_model(m)).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": models.first().map(|m| m.name.as_str()),
            "last_id": models.last().map(|m| m.name.as_str()),
        }),
    };
    LocalReply::json(200, body.to_string())
}

fn model_object(
    policy: &Policy,
    owner: KeyOwner,
    requested: &str,
    flavour: ApiFlavour,
) -> Option<LocalReply> {
    let id = policy.catalog.resolve(requested)?;
    if !policy.may_use(owner.tenant, id) {
        return None;
    }
    let m = policy.model(id)?;
    let body = match flavour {
        ApiFlavour::OpenAi => openai_model(policy, m),
        ApiFlavour::Anthropic => anthropic_model(m),
    };
    Some(LocalReply::json(200, body.to_string()))
}

fn openai_model(policy: &Policy, m: &crate::policy::Model) -> serde_json::Value {
    let owner = m
        .providers
        .first()
        .and_then(|&p| policy.provider(p))
        .map(|p| p.name.as_str())
        .unwrap_or("sluice");
    json!({"id": m.name, "object": "model", "created": 0, "owned_by": owner})
}

fn anthropic_model(m: &crate::policy::Model) -> serde_json::Value {
    json!({"type": "model", "id": m.name, "display_name": m.name, "created_at": "1970-01-01T00:00:00Z"})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha256_hex;
    use crate::config::compile;
    use crate::fairness::{FairQueue, Owner};
    use crate::shared::MemoryStore;

    fn test_env(store: &MemoryStore) -> BodyEnv<'_> {
        BodyEnv {
            store,
            now_ms: 0,
            worker: 0,
            context: 1,
        }
    }
    use serde_json::Value;

    fn env(name: &str) -> Option<String> {
        Some(format!("provider-key-{}", name.to_lowercase()))
    }

    fn policy() -> Policy {
        let cfg = json!({
            "max_body_bytes": 1000,
            "providers": [
                {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
                 "authority": "api.openai.com", "api_key_env": "OPENAI"},
                {"name": "deepseek", "api": "openai", "cluster": "deepseek", "api_key_env": "DEEPSEEK"},
                {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
                 "authority": "api.anthropic.com", "api_key_env": "ANTHROPIC"},
                {"name": "anthropic-openai", "api": "openai", "cluster": "anthropic", "path_prefix": "/v1",
                 "authority": "api.anthropic.com", "api_key_env": "ANTHROPIC"}
            ],
            "models": [
                {"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}},
                {"name": "deepseek-v3.2", "upstream_model": "deepseek-chat", "providers": ["deepseek"],
                 "price": {"input": 0.28, "output": 0.42}},
                {"name": "claude-sonnet-4.5", "aliases": ["claude-sonnet", "claude-sonnet-4-5*"],
                 "upstream_model": "claude-sonnet-4-5-20250929", "providers": ["anthropic", "anthropic-openai"],
                 "price": {"input": 3, "output": 15}}
            ],
            "tiers": {"gold": {"models": ["*"]}, "bronze": {"models": ["deepseek-*"]}},
            "tenants": [
                {"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]},
                {"id": "initech", "tier": "bronze", "keys": [{"id": "k1", "sha256": sha256_hex("sk-initech")}]}
            ]
        });
        compile(cfg.to_string().as_bytes(), &env).unwrap()
    }

    fn headers(method: &str, path: &str, extra: &[(&str, &str)]) -> RequestHeaders {
        let mut pairs = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"gateway.local".to_vec()),
        ];
        pairs.extend(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        RequestHeaders::from_pairs(pairs)
    }

    fn reply_of(step: &Step) -> (&LocalReply, Value) {
        match &step.next {
            Next::Reply(r) => (r, serde_json::from_str(&r.body).unwrap()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn set<'a>(step: &'a Step, name: &str) -> Option<&'a str> {
        step.set
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Runs a POST through both callbacks.
    fn post(path: &str, extra: &[(&str, &str)], body: &str) -> (Exchange, Step, Step) {
        let p = policy();
        let mut ex = Exchange::new();
        let h = ex.on_request_headers(&p, &headers("POST", path, extra), false);
        if matches!(h.next, Next::Reply(_)) {
            return (ex, h, Step::default());
        }
        let b = ex.on_request_body(&p, &test_env(&MemoryStore::new()), body.len(), true, || {
            Some(body.as_bytes().to_vec())
        });
        (ex, h, b)
    }

    const ACME: (&str, &str) = ("authorization", "Bearer sk-acme");

    #[test]
    fn routes_openai_model_with_provider_key() {
        let (ex, h, b) = post(
            "/v1/chat/completions",
            &[ACME],
            r#"{"model":"gpt-4.1","messages":[]}"#,
        );
        assert_eq!(h.next, Next::Pause);
        assert_eq!(b.next, Next::Continue);
        assert_eq!(set(&b, ":path"), Some("/v1/chat/completions"));
        assert_eq!(set(&b, ":authority"), Some("api.openai.com"));
        assert_eq!(set(&b, CLUSTER_HEADER), Some("openai"));
        assert_eq!(set(&b, "authorization"), Some("Bearer provider-key-openai"));
        assert!(
            b.remove.contains(&"authorization".to_string())
                && b.remove.contains(&"x-api-key".to_string())
        );
        assert_eq!(b.body, None, "no rewrite when the name is unchanged");
        assert_eq!(ex.owner().unwrap().tenant, crate::policy::TenantId::new(0));
        assert!(!ex.route().unwrap().stream);
    }

    #[test]
    fn deepseek_gets_its_own_path_and_upstream_name() {
        let (_, _, b) = post(
            "/v1/chat/completions?x=1",
            &[ACME],
            r#"{"model":"deepseek-v3.2","stream":true}"#,
        );
        assert_eq!(set(&b, ":path"), Some("/chat/completions?x=1"));
        assert_eq!(
            set(&b, ":authority"),
            None,
            "keeps the client's authority when none is configured"
        );
        let body = b.body.as_ref().unwrap();
        assert_eq!(
            body,
            br#"{"stream_options":{"include_usage":true},"model":"deepseek-chat","stream":true}"#
        );
        assert_eq!(
            set(&b, "content-length"),
            Some(body.len().to_string().as_str())
        );
    }

    #[test]
    fn alias_and_wildcard_resolve_and_pick_provider_by_api() {
        let (_, _, b) = post(
            "/v1/messages",
            &[("x-api-key", "sk-acme")],
            r#"{"model":"claude-sonnet"}"#,
        );
        assert_eq!(set(&b, CLUSTER_HEADER), Some("anthropic"));
        assert_eq!(set(&b, "x-api-key"), Some("provider-key-anthropic"));
        assert_eq!(set(&b, ":path"), Some("/v1/messages"));
        assert!(String::from_utf8_lossy(b.body.as_ref().unwrap())
            .contains("claude-sonnet-4-5-20250929"));

        let (_, _, b) = post(
            "/v1/chat/completions",
            &[ACME],
            r#"{"model":"claude-sonnet-4-5-latest"}"#,
        );
        assert_eq!(set(&b, CLUSTER_HEADER), Some("anthropic"));
        assert_eq!(
            set(&b, "authorization"),
            Some("Bearer provider-key-anthropic")
        );
    }

    #[test]
    fn refusals_use_the_endpoint_flavour() {
        let (_, h, _) = post(
            "/v1/chat/completions",
            &[("authorization", "Bearer wrong")],
            "{}",
        );
        let (r, v) = reply_of(&h);
        assert_eq!(r.status, 401);
        assert_eq!(v["error"]["code"], "invalid_api_key");

        let (_, h, _) = post("/v1/messages", &[], "{}");
        let (r, v) = reply_of(&h);
        assert_eq!(r.status, 401);
        assert_eq!(v["error"]["type"], "authentication_error");
    }

    #[test]
    fn model_errors() {
        let (_, _, b) = post("/v1/chat/completions", &[ACME], r#"{"model":"gpt-9"}"#);
        let (r, v) = reply_of(&b);
        assert_eq!(
            (r.status, v["error"]["code"].as_str()),
            (404, Some("model_not_found"))
        );

        let (_, _, b) = post(
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-initech")],
            r#"{"model":"gpt-4.1"}"#,
        );
        let (r, v) = reply_of(&b);
        assert_eq!(r.status, 403);
        assert!(v["error"]["message"].as_str().unwrap().contains("initech"));

        let (_, _, b) = post(
            "/v1/messages",
            &[("x-api-key", "sk-acme")],
            r#"{"model":"gpt-4.1"}"#,
        );
        let (r, v) = reply_of(&b);
        assert_eq!(
            (r.status, v["error"]["type"].as_str()),
            (404, Some("not_found_error"))
        );

        let (_, _, b) = post("/v1/chat/completions", &[ACME], r#"{"model":"#);
        assert_eq!(reply_of(&b).0.status, 400);
    }

    #[test]
    fn internal_headers_are_stripped_even_on_refusal() {
        let (_, h, _) = post(
            "/v1/chat/completions",
            &[
                ("x-sluice-cluster", "anthropic"),
                ("X-Sluice-Tenant", "acme"),
            ],
            "{}",
        );
        assert!(h.remove.contains(&"x-sluice-cluster".to_string()));
        assert!(h.remove.contains(&"x-sluice-tenant".to_string()));
        assert_eq!(reply_of(&h).0.status, 401);
    }

    #[test]
    fn size_limits() {
        let p = policy();
        let mut ex = Exchange::new();
        let h = ex.on_request_headers(
            &p,
            &headers(
                "POST",
                "/v1/chat/completions",
                &[ACME, ("content-length", "1001")],
            ),
            false,
        );
        assert_eq!(reply_of(&h).0.status, 413);

        let mut ex = Exchange::new();
        let h = ex.on_request_headers(&p, &headers("POST", "/v1/chat/completions", &[ACME]), false);
        assert_eq!(h.next, Next::Pause);
        assert_eq!(
            ex.on_request_body(&p, &test_env(&MemoryStore::new()), 600, false, || None)
                .next,
            Next::Pause
        );
        let b = ex.on_request_body(&p, &test_env(&MemoryStore::new()), 1001, false, || None);
        assert_eq!(reply_of(&b).0.status, 413);
        assert!(ex.replied_locally());
        assert_eq!(
            ex.on_request_body(&p, &test_env(&MemoryStore::new()), 1200, true, || None),
            Step::default()
        );
    }

    #[test]
    fn missing_body_and_wrong_method_and_unknown_path() {
        let p = policy();
        let mut ex = Exchange::new();
        let h = ex.on_request_headers(&p, &headers("POST", "/v1/chat/completions", &[ACME]), true);
        assert_eq!(reply_of(&h).0.status, 400);

        let mut ex = Exchange::new();
        let h = ex.on_request_headers(&p, &headers("GET", "/v1/chat/completions", &[ACME]), true);
        let (r, _) = reply_of(&h);
        assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

        let mut ex = Exchange::new();
        let h = ex.on_request_headers(&p, &headers("POST", "/v1/nope", &[ACME]), false);
        let (r, v) = reply_of(&h);
        assert_eq!(r.status, 404);
        assert_eq!(v["error"]["message"], "Invalid URL (POST /v1/nope)");
    }

    #[test]
    fn model_listing_in_both_flavours() {
        let p = policy();
        let mut ex = Exchange::new();
        let h = ex.on_request_headers(
            &p,
            &headers(
                "GET",
                "/v1/models",
                &[("authorization", "Bearer sk-initech")],
            ),
            true,
        );
        let (r, v) = reply_of(&h);
        assert_eq!(r.status, 200);
        assert_eq!(v["object"], "list");
        let ids: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, vec!["deepseek-v3.2"]);

        let mut ex = Exchange::new();
        let hs = headers(
            "GET",
            "/v1/models",
            &[
                ("x-api-key", "sk-acme"),
                ("anthropic-version", "2023-06-01"),
            ],
        );
        let (_, v) = reply_of(&ex.on_request_headers(&p, &hs, true));
        assert_eq!(v["data"].as_array().unwrap().len(), 3);
        assert_eq!(v["has_more"], false);
        assert_eq!(v["data"][0]["type"], "model");

        let mut ex = Exchange::new();
        let hs = headers("GET", "/v1/models/claude-sonnet", &[ACME]);
        let step = ex.on_request_headers(&p, &hs, true);
        let (r, v) = reply_of(&step);
        assert_eq!(
            (r.status, v["id"].as_str()),
            (200, Some("claude-sonnet-4.5"))
        );

        let mut ex = Exchange::new();
        let hs = headers(
            "GET",
            "/v1/models/gpt-4.1",
            &[("authorization", "Bearer sk-initech")],
        );
        assert_eq!(
            reply_of(&ex.on_request_headers(&p, &hs, true)).0.status,
            404
        );
    }

    /// Records what the host would send to Envoy stats.
    #[derive(Default)]
    struct FakeMetrics(Vec<(MetricKey, u64)>);

    impl Metrics for FakeMetrics {
        fn add(&mut self, key: MetricKey, value: u64) {
            self.0.push((key, value));
        }
    }

    impl FakeMetrics {
        fn counter(&self, c: Counter) -> u64 {
            self.0
                .iter()
                .filter(|(k, _)| matches!(k, MetricKey::Counter(kc, _) if *kc == c))
                .map(|(_, v)| v)
                .sum()
        }
        fn outcome(&self) -> Outcome {
            self.0
                .iter()
                .find_map(|(k, _)| match k {
                    MetricKey::Counter(Counter::Requests, l) => Some(l.outcome),
                    _ => None,
                })
                .unwrap()
        }
    }

    const CHAT_JSON: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1}}}"#;

    #[test]
    fn successful_json_response_is_metered_priced_and_recorded_once() {
        let p = policy();
        let (mut ex, _, b) = post(
            "/v1/chat/completions",
            &[ACME],
            r#"{"model":"gpt-4.1","messages":[]}"#,
        );
        assert_eq!(b.next, Next::Continue);
        assert_eq!(
            ex.on_response_headers(200, Some("application/json"), false, 10),
            ResponseEdits::default()
        );
        let (first, second) = CHAT_JSON.split_at(40);
        assert!(matches!(
            ex.on_response_body(first.as_bytes(), false, 12),
            Passthrough::Unchanged
        ));
        assert!(matches!(
            ex.on_response_body(second.as_bytes(), true, 13),
            Passthrough::Unchanged
        ));
        let mut m = FakeMetrics::default();
        let done = ex
            .finish(&p, &MemoryStore::new(), Some("via_upstream"), 20, &mut m)
            .unwrap();
        assert_eq!(done.outcome, Outcome::Success);
        assert!(!done.estimated);
        assert_eq!(
            done.usage,
            TokenUsage {
                input_tokens: 10,
                cached_input_tokens: 2,
                cache_creation_tokens: 0,
                output_tokens: 5,
                reasoning_tokens: 1
            }
        );
        // 10 * 2.00 + 2 * 2.00 (no cached price in this policy) + 5 * 8.00 = 64 micro-USD
        assert_eq!(m.counter(Counter::CostMicroUsd), 64);
        assert_eq!(m.counter(Counter::Requests), 1);
        assert_eq!(m.counter(Counter::InputTokens), 10);
        let record: Value = serde_json::from_str(&done.record).unwrap();
        assert_eq!(record["tenant"], "acme");
        assert_eq!(record["key_id"], "k1");
        assert_eq!(record["model"], "gpt-4.1");
        assert_eq!(record["provider"], "openai");
        assert_eq!(record["status"], 200);
        assert_eq!(record["cost_micro_usd"], 64);
        assert!(!done.record.contains("sk-acme"));
        assert!(
            ex.finish(&p, &MemoryStore::new(), None, 20, &mut m)
                .is_none(),
            "finish runs once"
        );
        assert_eq!(m.counter(Counter::Requests), 1);
    }

    #[test]
    fn injected_usage_is_requested_and_flagged_for_stripping() {
        let (ex, _, b) = post(
            "/v1/chat/completions",
            &[ACME],
            r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#,
        );
        let body: Value = serde_json::from_slice(b.body.as_ref().unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert!(ex.route().unwrap().injected_usage);
        let (ex, _, b) = post(
            "/v1/chat/completions",
            &[ACME],
            r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        );
        assert_eq!(b.body, None);
        assert!(!ex.route().unwrap().injected_usage);
        let (ex, _, _) = post(
            "/v1/messages",
            &[("x-api-key", "sk-acme")],
            r#"{"model":"claude-sonnet","stream":true}"#,
        );
        assert!(
            !ex.route().unwrap().injected_usage,
            "only OpenAI chat streams need it"
        );
    }

    #[test]
    fn outcomes_by_how_the_stream_ended() {
        let p = policy();
        let run = |status: Option<u16>, complete: bool, details: &str| {
            let (mut ex, _, _) = post(
                "/v1/chat/completions",
                &[ACME],
                r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hello"}]}"#,
            );
            if let Some(s) = status {
                ex.on_response_headers(s, Some("application/json"), false, 1);
                ex.on_response_body(br#"{"error":{}"#, complete, 2);
            }
            let mut m = FakeMetrics::default();
            let done = ex
                .finish(&p, &MemoryStore::new(), Some(details), 3, &mut m)
                .unwrap();
            assert_eq!(m.outcome(), done.outcome);
            (done.outcome, done.estimated, done.usage)
        };
        assert_eq!(run(Some(400), true, "via_upstream").0, Outcome::ClientError);
        let (o, est, u) = run(Some(429), true, "via_upstream");
        assert_eq!((o, est, u.total()), (Outcome::UpstreamError, false, 0));
        assert_eq!(
            run(Some(503), true, "no_healthy_upstream").0,
            Outcome::UpstreamError
        );
        let (o, est, _) = run(
            Some(200),
            false,
            "upstream_reset_after_response_started{remote_reset}",
        );
        assert_eq!((o, est), (Outcome::UpstreamError, true));
        let (o, est, _) = run(Some(200), false, "downstream_remote_disconnect");
        assert_eq!((o, est), (Outcome::Aborted, true));
        let (o, est, u) = run(None, false, "downstream_remote_disconnect");
        assert_eq!((o, est), (Outcome::Aborted, true));
        assert!(
            u.input_tokens > 0 && u.output_tokens == 0,
            "the prompt is billed: {u:?}"
        );
        let (o, est, u) = run(
            None,
            false,
            "upstream_reset_before_response_started{connection_failure}",
        );
        assert_eq!((o, est, u.total()), (Outcome::UpstreamError, false, 0));
    }

    #[test]
    fn rejections_are_recorded_with_their_reason() {
        let p = policy();
        let (mut ex, _, b) = post(
            "/v1/chat/completions",
            &[("authorization", "Bearer sk-initech")],
            r#"{"model":"gpt-4.1"}"#,
        );
        assert!(matches!(b.next, Next::Reply(_)));
        // The local reply also runs the response callbacks: not upstream usage.
        ex.on_response_headers(403, Some("application/json"), false, 1);
        assert!(!ex.meters_response());
        let mut m = FakeMetrics::default();
        let done = ex.finish(&p, &MemoryStore::new(), None, 2, &mut m).unwrap();
        assert_eq!(done.outcome, Outcome::Rejected);
        let record: Value = serde_json::from_str(&done.record).unwrap();
        assert_eq!(record["reason"], "model_not_allowed");
        assert_eq!(record["tenant"], "initech");
        assert_eq!(record["model"], "gpt-4.1");
        assert_eq!(record["status"], 403);
        assert_eq!(m.counter(Counter::InputTokens), 0);
    }

    /// One provider with room for one request in flight; acme may queue one more.
    fn queued_policy() -> Policy {
        let cfg = json!({
            "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
                           "api_key_env": "OPENAI", "max_in_flight": 1},
                          {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
                           "api_key_env": "ANTHROPIC", "max_in_flight": 1}],
            "models": [{"name": "gpt-4.1", "providers": ["openai", "anthropic"], "price": {"input": 2, "output": 8}}],
            "tiers": {"gold": {"models": ["*"], "max_queue_wait_ms": 500}},
            "tenants": [{"id": "acme", "tier": "gold", "max_queue_length": 1,
                         "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
        });
        compile(cfg.to_string().as_bytes(), &env).unwrap()
    }

    /// Sends one request through both callbacks as stream `context` of worker 1.
    fn queued(
        p: &Policy,
        store: &MemoryStore,
        context: u32,
        path: &str,
        key: (&str, &str),
    ) -> (Exchange, Step) {
        let body = r#"{"model":"gpt-4.1","messages":[]}"#;
        let mut ex = Exchange::new();
        ex.on_request_headers(p, &headers("POST", path, &[key]), false);
        let env = BodyEnv {
            store,
            now_ms: 1_000,
            worker: 1,
            context,
        };
        let step = ex.on_request_body(p, &env, body.len(), true, || Some(body.as_bytes().to_vec()));
        (ex, step)
    }

    #[test]
    fn a_full_provider_queues_then_resumes_and_every_slot_is_released() {
        let p = queued_policy();
        let store = MemoryStore::new();
        let (mut first, step) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
        assert_eq!(step.next, Next::Continue, "a free slot is taken at once");
        assert!(first.queue_wait().is_none());
        let (mut second, step) = queued(&p, &store, 2, "/v1/chat/completions", ACME);
        assert_eq!(step.next, Next::Pause, "the provider is full: wait");
        assert_eq!(
            set(&step, CLUSTER_HEADER),
            Some("openai"),
            "routed before waiting"
        );
        let wait = second.queue_wait().unwrap().clone();
        assert_eq!(wait.deadline_ms, 1_500);

        // The first finishes and frees its slot; worker 1 claims it for the waiter.
        let mut m = FakeMetrics::default();
        assert!(
            first
                .finish(&p, &store, None, 1_100, &mut m)
                .unwrap()
                .released_slot
        );
        let queue = FairQueue::new(&store, &wait.key, wait.capacity);
        assert_eq!(
            queue.claim_for_worker(1, 1_100).unwrap(),
            [Owner {
                worker: 1,
                context: 2
            }]
        );
        second.wait_ended(WaitState::Resumed { at_ms: 1_100 });
        second.on_response_headers(200, Some("application/json"), false, 1_150);
        second.on_response_body(CHAT_JSON.as_bytes(), true, 1_160);
        let done = second.finish(&p, &store, None, 1_200, &mut m).unwrap();
        assert!(done.released_slot);
        let record: Value = serde_json::from_str(&done.record).unwrap();
        assert_eq!(record["queue_wait_ms"], 100);
        assert_eq!(record["outcome"], "success");
        assert!(m
            .0
            .iter()
            .any(|(k, v)| matches!(k, MetricKey::QueueWait(..)) && *v == 100));
        let stats = queue.stats().unwrap();
        assert_eq!(
            (stats.in_flight, stats.waiting),
            (0, 0),
            "nothing held afterwards"
        );
    }

    #[test]
    fn a_wait_past_the_tier_maximum_is_a_rejection_in_the_apis_format() {
        for (path, key, status, kind) in [
            ("/v1/chat/completions", ACME, 503, "server_error"),
            (
                "/v1/messages",
                ("x-api-key", "sk-acme"),
                529,
                "overloaded_error",
            ),
        ] {
            let p = queued_policy();
            let store = MemoryStore::new();
            let (_holder, _) = queued(&p, &store, 1, path, key);
            let (mut waiter, step) = queued(&p, &store, 2, path, key);
            assert_eq!(step.next, Next::Pause);
            let reply = queue_timeout_reply(waiter.flavour(), 500);
            let body: Value = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(reply.status, status, "{path}");
            assert_eq!(reply.header("retry-after"), Some("1"));
            assert_eq!(reply.header("x-sluice-reason"), Some("queue_timeout"));
            let found = body["error"]["type"].as_str().map(str::to_string);
            assert_eq!(found.as_deref(), Some(kind), "{path}: {body}");
            // The host cancelled the place and sent that reply.
            let wait = waiter.queue_wait().unwrap().clone();
            assert!(FairQueue::new(&store, &wait.key, 1)
                .cancel(Owner {
                    worker: 1,
                    context: 2
                })
                .unwrap());
            waiter.wait_ended(WaitState::TimedOut);
            assert!(!waiter.needs_end_details());
            let done = waiter
                .finish(&p, &store, None, 1_600, &mut FakeMetrics::default())
                .unwrap();
            let record: Value = serde_json::from_str(&done.record).unwrap();
            assert_eq!(
                (record["outcome"].as_str(), record["reason"].as_str()),
                (Some("rejected"), Some("queue_timeout"))
            );
            assert_eq!(record["status"], status);
            assert!(!done.released_slot, "a timed-out request never held a slot");
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_a_departed_waiter_gives_up_its_place() {
        let p = queued_policy();
        let store = MemoryStore::new();
        let (_holder, _) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
        let (mut waiter, _) = queued(&p, &store, 2, "/v1/chat/completions", ACME);
        let (_, step) = queued(&p, &store, 3, "/v1/chat/completions", ACME);
        let (reply, body) = reply_of(&step);
        assert_eq!(
            (reply.status, reply.header("x-sluice-reason")),
            (429, Some("queue_full"))
        );
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        // The waiter's client goes away: finish gives up its place, so another may queue.
        let done = waiter.finish(
            &p,
            &store,
            Some("downstream_remote_disconnect"),
            1_200,
            &mut FakeMetrics::default(),
        );
        assert!(!done.unwrap().released_slot);
        let (_, step) = queued(&p, &store, 4, "/v1/chat/completions", ACME);
        assert_eq!(
            step.next,
            Next::Pause,
            "the departed waiter's place is free again"
        );
    }
}
