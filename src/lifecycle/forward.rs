//! Routing an authenticated request by its body: parse it, resolve the model, check the
//! tenant may use it, pick the provider, plan the upstream edits (path, authority,
//! credential, model name, usage option), then admit it against every limit in one
//! decision. Bad input is refused before any limit is touched.

use super::{BodyEnv, Caller, Known, Route, Step};
use crate::accounting::cost_micro_usd;
use crate::admission::{self, Decision, Parties, Reservation};
use crate::body::{
    inject_include_usage, parse_request, replace_model, replace_model_reserialized, set_output_cap,
};
use crate::cache::request::{assess, Ask, Directive, Identity};
use crate::cache::CacheOutcome;
use crate::errors::{ApiError, ApiFlavour, ErrorKind};
use crate::fallback;
use crate::headers::{CLUSTER_HEADER, MAX_RETRIES_HEADER, RELAY_HEADER};
use crate::policy::{Policy, ProviderId};
use crate::routing::{upstream_path, Api};
use crate::usage::TokenUsage;

/// A routed request taken by its local limits: where admission stands (decided, or
/// waiting for the quota service) and the edits that send it upstream.
pub(super) struct Forwarding {
    pub(super) caller: Caller,
    pub(super) route: Route,
    pub(super) decision: Decision,
    pub(super) step: Step,
    /// What the response cache does, when it is on for the tenant and model.
    pub(super) cache: Option<Ask>,
    /// Its plan waits in the worker's registry for later attempts (`Plans::take` at
    /// its end).
    pub(super) registered: bool,
}

/// Why the request is refused, and what was known by then.
pub(super) struct Refused {
    pub(super) error: ApiError,
    pub(super) known: Known,
}

/// Who the request is, for its later attempts: its id (the key of its plan) and the
/// `:authority` it came with.
pub(super) struct Origin<'a> {
    pub(super) request_id: Option<&'a str>,
    pub(super) authority: &'a str,
}

pub(super) fn route(
    policy: &Policy,
    env: &BodyEnv,
    caller: Caller,
    query: &str,
    directive: Directive,
    raw: &[u8],
    origin: &Origin<'_>,
) -> Result<Forwarding, Box<Refused>> {
    // Each refusal carries what was known when it was made.
    let refused = |known| move |error| Box::new(Refused { error, known });
    let fields = parse_request(raw).map_err(refused(Known::Request(caller)))?;
    let model_id = policy
        .catalog
        .resolve(&fields.model)
        .ok_or_else(|| model_not_found(&fields.model))
        .map_err(refused(Known::Request(caller)))?;
    let refused = refused(Known::Model(caller, model_id));
    let model = policy
        .model(model_id)
        .ok_or_else(|| ApiError::new(ErrorKind::Internal, "model table out of range"))
        .map_err(refused)?;
    let tenant = caller.owner.tenant;
    if !policy.may_use(tenant, model_id) {
        let name = policy.tenant(tenant).map_or("?", |t| t.id.as_str());
        let message = format!(
            "Tenant `{name}` is not allowed to use the model `{}`.",
            model.name
        );
        let error = ApiError::new(ErrorKind::ModelNotAllowed, message).with_param("model");
        return Err(refused(error));
    }
    let api = caller.api;
    // The deployments it may try, in order (one unless the model has fallback): skipping
    // accounts that failed lately or whose own month is spent.
    let available = |p: ProviderId| {
        policy
            .provider(p)
            .is_some_and(|provider| fallback::health(env.store, provider).available(env.now_ms))
            && !admission::provider_month_spent(policy, env.store, p, env.now_ms)
    };
    let random = env.nonce ^ u64::from(env.context).rotate_left(32) ^ env.now_ms;
    let max_attempts = match (env.plans, origin.request_id) {
        (Some(_), Some(_)) => policy.fallback.max_attempts,
        _ => 1,
    };
    let mut chain = fallback::chain(
        model,
        &policy.providers,
        api.flavour(),
        max_attempts,
        random,
        &available,
    );
    let first_deployment = chain.first().copied().unwrap_or(0);
    let (deployment, provider_id, provider) = chain
        .first()
        .and_then(|&i| model.deployments.get(i))
        .and_then(|d| policy.provider(d.provider).map(|p| (d, d.provider, p)))
        .ok_or_else(|| not_served(&model.name, api))
        .map_err(refused)?;

    // The upstream edits first: a body that cannot be rewritten is bad input, refused
    // before any limit is touched.
    let mut body: Option<Vec<u8>> = None;
    let upstream_name = deployment.upstream_name.as_str();
    if fields.model != upstream_name {
        let rewritten = replace_model(raw, upstream_name)
            .or_else(|| replace_model_reserialized(raw, upstream_name))
            .ok_or_else(unrewritable_body)
            .map_err(refused)?;
        body = Some(rewritten);
    }
    // Meter every chat stream: ask for the usage chunk, strip it on the way back.
    let injected_usage = api == Api::ChatCompletions && fields.stream && !fields.include_usage;
    if injected_usage {
        let current = body.as_deref().unwrap_or(raw);
        body = Some(
            inject_include_usage(current)
                .ok_or_else(unrewritable_body)
                .map_err(refused)?,
        );
    }
    // The tenant's key never goes upstream: each header that carried one is removed, or
    // replaced by the provider's credential.
    let credential = provider.credential.header();
    let sent = [
        ("authorization", caller.sent.authorization),
        ("x-api-key", caller.sent.x_api_key),
    ];
    let mut step = Step {
        remove: sent
            .iter()
            .filter(|(name, sent)| *sent && *name != credential)
            .map(|(name, _)| (*name).to_string())
            .collect(),
        ..Step::default()
    };
    if let Some(b) = body {
        set_content_length(&mut step, &b);
        step.body = Some(b);
    }
    step.set.push((
        ":path".into(),
        upstream_path(provider, api.upstream_suffix(), query),
    ));
    if let Some(authority) = &provider.authority {
        step.set.push((":authority".into(), authority.clone()));
    }
    if fields.stream {
        let flavour = api.flavour().as_str();
        step.set.push((RELAY_HEADER.into(), flavour.into()));
    }
    step.set.push((
        provider.credential.header().to_string(),
        provider.credential.value().to_string(),
    ));
    step.set.extend(provider.headers.iter().cloned());

    // Reserve what the request may use, in one decision over every limit.
    let prompt_estimate = fields.prompt.tokens(api);
    let model_max = model.max_output_tokens.unwrap_or(u64::MAX);
    if let (Some(asked), Some(field)) = (fields.max_output_tokens, fields.max_output_field) {
        if asked > model_max {
            return Err(refused(too_many_output_tokens(
                api.flavour(),
                field,
                asked,
                model_max,
                upstream_name,
            )));
        }
    }
    let mut output_cap = match api {
        Api::Embeddings | Api::CountTokens => 0,
        _ => fields
            .max_output_tokens
            .unwrap_or(policy.default_max_output_tokens)
            .min(model_max),
    };
    let parties = Parties {
        tenant,
        model: model_id,
        provider: provider_id,
    };
    // Lower the cap to what the month can still pay for, rather than refuse the request.
    let mut clamped = None;
    let clamps = policy
        .tenant(tenant)
        .is_some_and(|t| t.clamp_output_to_budget);
    if clamps && output_cap > 0 {
        let affordable = admission::affordable_output(
            policy,
            env.store,
            parties,
            prompt_estimate,
            &deployment.price,
            env.now_ms,
        );
        // Nothing affordable: the budget's own refusal says so.
        if let Some(cap) = affordable.filter(|cap| (1..output_cap).contains(cap)) {
            let field = fields.max_output_field.unwrap_or(match api {
                Api::ChatCompletions => "max_completion_tokens",
                Api::Responses => "max_output_tokens",
                _ => "max_tokens",
            });
            let current = step.body.as_deref().unwrap_or(raw);
            let rewritten = set_output_cap(current, field, cap)
                .ok_or_else(unrewritable_body)
                .map_err(refused)?;
            set_content_length(&mut step, &rewritten);
            step.body = Some(rewritten);
            output_cap = cap;
            clamped = Some(cap);
        }
    }
    // Counting tokens uses none: only the request itself counts (rates, concurrency).
    let expected = match api {
        Api::CountTokens => TokenUsage::default(),
        _ => TokenUsage {
            input_tokens: prompt_estimate,
            output_tokens: output_cap,
            ..TokenUsage::default()
        },
    };
    let reservation = Reservation {
        tokens: expected.total(),
        cost_micro_usd: cost_micro_usd(&expected, &deployment.price),
    };
    // The cache key comes from the client's body, before the upstream edits.
    let rule = policy
        .cache_rule(tenant, model_id)
        .filter(|_| api != Api::CountTokens);
    let cache = rule.map(|rule| {
        let who = Identity {
            tenant: policy.tenant(tenant).map_or("", |t| t.id.as_str()),
            model: &model.name,
            api,
            query,
        };
        assess(rule, directive, &who, raw)
    });
    let flavour = api.flavour();
    let decision = admission::admit(policy, env.store, parties, reservation, flavour, env.now_ms)
        .map_err(refused)?;
    // The cluster of each attempt, in order (Envoy's route picks attempt n's), and no more
    // retries than deployments to try.
    let registered = chain.len() > 1
        && match (env.plans, origin.request_id) {
            (Some(plans), Some(id)) => plans.register(
                id,
                fallback::Plan {
                    model: model_id,
                    api,
                    query: query.to_string(),
                    authority: origin.authority.to_string(),
                    chain: chain.clone(),
                    started_ms: env.now_ms,
                    reservation,
                    held: Vec::new(),
                    attempts: Vec::new(),
                },
            ),
            _ => false,
        };
    if !registered {
        chain.truncate(1);
    }
    let clusters: Vec<&str> = chain
        .iter()
        .filter_map(|&i| model.deployments.get(i))
        .filter_map(|d| policy.provider(d.provider))
        .map(|p| p.cluster_for(registered))
        .collect();
    step.set.push((CLUSTER_HEADER.into(), clusters.join(",")));
    // The route retries nothing by itself (num_retries 0): a request with one attempt costs
    // no header.
    let retries = clusters.len().saturating_sub(1) + policy.fallback.retries as usize;
    if retries > 0 {
        step.set
            .push((MAX_RETRIES_HEADER.into(), retries.to_string()));
    }
    Ok(Forwarding {
        caller,
        route: Route {
            model: model_id,
            provider: provider_id,
            deployment: first_deployment,
            stream: fields.stream,
            injected_usage,
            prompt_estimate,
            clamped_output: clamped,
            cache: cache.map(|ask| match ask {
                Ask::Bypass => CacheOutcome::Bypass,
                Ask::Refresh(_) | Ask::Lookup(_) => CacheOutcome::Miss,
            }),
        },
        decision,
        step,
        cache,
        registered,
    })
}

/// Sets (or replaces) the upstream `content-length` for a rewritten body.
fn set_content_length(step: &mut Step, body: &[u8]) {
    step.set.retain(|(name, _)| name != "content-length");
    step.set
        .push(("content-length".into(), body.len().to_string()));
}

/// A request asking for more output than the model produces, refused as its provider
/// would refuse it.
fn too_many_output_tokens(
    flavour: ApiFlavour,
    field: &'static str,
    asked: u64,
    max: u64,
    upstream_model: &str,
) -> ApiError {
    let message = match flavour {
        ApiFlavour::OpenAi => format!(
            "{field} is too large: {asked}. This model supports at most {max} completion tokens, whereas you provided {asked}."
        ),
        ApiFlavour::Anthropic => format!(
            "{field}: {asked} > {max}, which is the maximum allowed number of output tokens for {upstream_model}"
        ),
    };
    ApiError::new(ErrorKind::InvalidRequest, message).with_param(field)
}

pub(super) fn model_not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::ModelNotFound,
        format!("The model `{name}` does not exist or you do not have access to it."),
    )
    .with_param("model")
}

fn not_served(model: &str, api: Api) -> ApiError {
    let through = match api.flavour() {
        ApiFlavour::OpenAi => "OpenAI",
        ApiFlavour::Anthropic => "Anthropic Messages",
    };
    ApiError::new(
        ErrorKind::ModelNotFound,
        format!("The model `{model}` is not served through the {through} API on this gateway."),
    )
    .with_param("model")
}

/// The body passed `parse_request` but a rewrite needs a full JSON tree, which refuses it
/// (an unpaired surrogate escape in a string the probe skipped): the client's input.
fn unrewritable_body() -> ApiError {
    ApiError::new(
        ErrorKind::InvalidRequest,
        "We could not parse the JSON body of your request: it contains an invalid string escape.",
    )
}
