//! The upstream filter: Sluice in a provider cluster's upstream filter chain (root id
//! `sluice_upstream`), where Envoy runs it once per attempt. It finds the request's
//! fallback plan by the request's id, sends an attempt at another deployment than the
//! first with that deployment's path, host, credential and model name
//! ([`fallback::attempt_edits`]), and records how each attempt ended: in the plan (for the
//! usage record) and in the account's health (for every worker's next requests).
//!
//! The attempt number is Envoy's `upstream.request_attempt_count` on the router's
//! retries, or the stream relay's `x-sluice-attempt` header on its own attempts.

use super::plans::with_plan;
use super::store::SharedData;
use super::{header_text, log, now_ms};
use crate::body::{replace_model, replace_model_reserialized};
use crate::fallback::{self, AttemptEnd};
use crate::headers::ATTEMPT_HEADER;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};

/// Credential headers stripped from a later attempt whose plan is gone (a misconfigured
/// VM): better the provider's 401 than another account's key.
const CREDENTIALS: [&str; 2] = ["authorization", "x-api-key"];

pub(super) struct UpstreamAttempt {
    /// The request's id (`x-request-id`): the key of its plan.
    request_id: Option<String>,
    /// This attempt's number, from 1.
    attempt: u32,
    /// The model name the body must carry for this attempt's deployment.
    body_model: Option<String>,
    /// Response headers came: the attempt's end is recorded.
    ended: bool,
    /// The plan exists: this attempt is recorded.
    planned: bool,
}

impl UpstreamAttempt {
    pub(super) fn new() -> Self {
        UpstreamAttempt {
            request_id: None,
            attempt: 1,
            body_model: None,
            ended: false,
            planned: false,
        }
    }

    fn header(name: &str) -> Option<String> {
        header_text(MapType::HttpRequestHeaders, name)
    }

    /// Records the attempt's end in its plan and its account's health.
    fn end(&mut self, end: AttemptEnd) {
        if self.ended || !self.planned {
            return;
        }
        self.ended = true;
        let Some(id) = self.request_id.as_deref() else {
            return;
        };
        let (n, now) = (self.attempt, now_ms());
        let status = match end {
            AttemptEnd::Status { status, .. } => status,
            AttemptEnd::NoResponse => 0,
        };
        let recorded = with_plan(id, |plan, policy| {
            plan.record(policy, n, status, now);
            let provider = plan
                .attempt_at(policy, n)
                .and_then(|(_, p)| policy.provider(p))?;
            let header = policy
                .fallback
                .deployment_header
                .then(|| provider.name.clone());
            Some((
                fallback::record(&SharedData, provider, end, &policy.fallback, now),
                header,
            ))
        });
        if let Some(Some((result, header))) = recorded {
            if let Err(e) = result {
                log(
                    LogLevel::Warn,
                    &format!("sluice: could not record a deployment's health: {e:?}"),
                );
            }
            if let (Some(name), AttemptEnd::Status { .. }) = (header, end) {
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    "x-sluice-deployment",
                    Some(&name),
                );
            }
        }
    }
}

/// This attempt's number: with a plan, the relay's header first (removed: it is the
/// gateway's own; the relay sends it only with a chain, so only for planned requests),
/// else Envoy's count of the router's attempts.
fn attempt_number(planned: bool) -> u32 {
    if planned {
        if let Some(n) = UpstreamAttempt::header(ATTEMPT_HEADER).and_then(|v| v.parse().ok()) {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, ATTEMPT_HEADER, None);
            return n;
        }
    }
    hostcalls::get_property(vec!["upstream", "request_attempt_count"])
        .ok()
        .flatten()
        .and_then(|v| v.get(..8).and_then(|b| b.try_into().ok()))
        .map(u64::from_le_bytes)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// The request has a chain of several clusters (the stream relay filter keeps it in the
/// dynamic metadata for the router's retries).
fn has_chain() -> bool {
    hostcalls::get_property(vec!["metadata", "filter_metadata", "sluice.route", "chain"])
        .ok()
        .flatten()
        .is_some_and(|v| v.contains(&b','))
}

impl Context for UpstreamAttempt {
    fn on_done(&mut self) -> bool {
        // No response headers: a reset or a connect failure.
        self.end(AttemptEnd::NoResponse);
        true
    }
}

impl HttpContext for UpstreamAttempt {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        // Two host calls for a request without fallback: its id, and its attempt number.
        self.request_id = Self::header("x-request-id");
        let Some(id) = self.request_id.clone() else {
            return Action::Continue;
        };
        self.planned = with_plan(&id, |_, _| ()).is_some();
        self.attempt = attempt_number(self.planned);
        let n = self.attempt;
        let edits = with_plan(&id, |plan, policy| fallback::attempt_edits(policy, plan, n));
        let edits = match edits {
            Some(Some(edits)) => edits,
            // Prepared by the routing (the first deployment): nothing to change.
            Some(None) => return Action::Continue,
            // A retry of a request without fallback goes where its first attempt went.
            // One with a chain but no plan here would carry the last account's key to
            // another: the plan is in another VM (a vm_config that differs).
            None if n > 1 && has_chain() => {
                log(
                    LogLevel::Error,
                    "sluice: a fallback attempt without its plan (is the upstream filter's \
                     vm_config identical to the downstream filter's?): credentials removed",
                );
                for name in CREDENTIALS {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
                return Action::Continue;
            }
            None => return Action::Continue,
        };
        for name in &edits.remove {
            let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
        }
        // The attempt is on the cluster its deployment names, or it goes without a key (a
        // route whose retries do not follow the chain, e.g. without the relay filter that
        // keeps it for the cluster specifier).
        let cluster = hostcalls::get_property(vec!["xds", "cluster_name"])
            .ok()
            .flatten()
            .unwrap_or_default();
        if cluster != edits.cluster.as_bytes() {
            log(
                LogLevel::Error,
                &format!(
                    "sluice: attempt {n} meant for cluster {} runs on {}: sent without credentials",
                    edits.cluster,
                    String::from_utf8_lossy(&cluster)
                ),
            );
            return Action::Continue;
        }
        // The attempt's account takes its own limits, as admission took the first's.
        let now = now_ms();
        with_plan(&id, |plan, policy| {
            plan.reserve(policy, &SharedData, n, now)
        });
        for (name, value) in &edits.set {
            if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            {
                log(
                    LogLevel::Error,
                    &format!("sluice: attempt {n}: cannot set {name}: {s:?}"),
                );
            }
        }
        match edits.model {
            Some(model) if !end_of_stream => {
                self.body_model = Some(model);
                // The body is rewritten at its end; its length is set then.
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(model) = self.body_model.as_deref() else {
            return Action::Continue;
        };
        if !end_of_stream {
            return Action::Pause;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        let Some(rewritten) =
            replace_model(&body, model).or_else(|| replace_model_reserialized(&body, model))
        else {
            log(
                LogLevel::Error,
                "sluice: an attempt's body could not be rewritten; sent as it was",
            );
            return Action::Continue;
        };
        let length = rewritten.len().to_string();
        if hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, &rewritten).is_err()
            || hostcalls::set_map_value(
                MapType::HttpRequestHeaders,
                "content-length",
                Some(&length),
            )
            .is_err()
        {
            log(
                LogLevel::Error,
                "sluice: an attempt's body could not be replaced",
            );
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if !self.planned {
            return Action::Continue;
        }
        let header = |name: &str| header_text(MapType::HttpResponseHeaders, name);
        let status = header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let retry_after_ms = header("retry-after-ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| {
                header("retry-after")
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| s.saturating_mul(1000))
            });
        self.end(AttemptEnd::Status {
            status,
            retry_after_ms,
        });
        Action::Continue
    }
}
