//! Error replies in each API's own format, so official SDKs raise the right exception.

use crate::policy::{LimitId, LimitMeasure};
use crate::shared::CasFailure;
use serde_json::json;

/// Which API dialect a client speaks; decides error shapes and header names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ApiFlavour {
    #[default]
    OpenAi,
    Anthropic,
}

impl ApiFlavour {
    /// The name the stream relay is told (`x-sluice-relay`).
    pub fn as_str(self) -> &'static str {
        match self {
            ApiFlavour::OpenAi => "openai",
            ApiFlavour::Anthropic => "anthropic",
        }
    }

    pub fn from_name(name: &[u8]) -> Option<Self> {
        match name {
            b"openai" => Some(ApiFlavour::OpenAi),
            b"anthropic" => Some(ApiFlavour::Anthropic),
            _ => None,
        }
    }
}

/// What went wrong, independent of how each API spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Missing, malformed or unknown tenant key.
    InvalidApiKey,
    /// The tenant's key is valid but it may not use this model.
    ModelNotAllowed,
    /// A browser page of an origin the tenant does not allow (CORS).
    OriginNotAllowed,
    /// No such model in the gateway's catalogue.
    ModelNotFound,
    /// Path the gateway does not serve.
    UnknownPath,
    /// Known path, wrong HTTP method.
    MethodNotAllowed,
    /// Body is not what the endpoint needs (bad JSON, missing or mistyped field).
    InvalidRequest,
    /// Body larger than the configured limit.
    PayloadTooLarge,
    /// Body compressed in a way the gateway does not read (`content-encoding`).
    UnsupportedEncoding,
    /// The gateway itself failed (should not happen; never fail open).
    Internal,
    /// A rate, concurrency or monthly limit refused the request.
    LimitExceeded(LimitId),
    /// The shared limit state was too contended to decide; retry shortly.
    LimiterBusy,
    /// The provider is full and this tenant already has its maximum waiting.
    QueueFull,
    /// The provider stayed full for longer than the tier's maximum wait.
    QueueTimeout,
    /// The global limits engine (the quota service, Redis) did not answer in time, and
    /// the configuration says to refuse rather than fall back to local limits.
    QuotaEngineUnavailable,
    /// The provider could not be reached or broke off its answer (the stream relay).
    UpstreamFailed,
    /// The provider did not answer, or stopped sending, within the relay's timeouts.
    UpstreamTimeout,
}

impl ErrorKind {
    /// The HTTP status for a client of `flavour`.
    pub fn status_for(self, flavour: ApiFlavour) -> u16 {
        match (self, flavour) {
            // Anthropic reports exhausted credit as a billing error.
            (ErrorKind::LimitExceeded(l), ApiFlavour::Anthropic) if l.is_quota() => 402,
            // Anthropic's own "overloaded" status.
            (ErrorKind::QueueTimeout, ApiFlavour::Anthropic) => 529,
            _ => self.status(),
        }
    }

    pub fn status(self) -> u16 {
        match self {
            ErrorKind::LimitExceeded(_) | ErrorKind::LimiterBusy | ErrorKind::QueueFull => 429,
            ErrorKind::QueueTimeout | ErrorKind::QuotaEngineUnavailable => 503,
            ErrorKind::InvalidApiKey => 401,
            ErrorKind::ModelNotAllowed | ErrorKind::OriginNotAllowed => 403,
            ErrorKind::ModelNotFound | ErrorKind::UnknownPath => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::UnsupportedEncoding => 415,
            ErrorKind::Internal => 500,
            // Envoy's own status for a provider it could not reach.
            ErrorKind::UpstreamFailed => 503,
            ErrorKind::UpstreamTimeout => 504,
        }
    }

    /// Stable short name, used in the `x-sluice-reason` header and (later) metrics labels.
    pub fn reason(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::OriginNotAllowed => "origin_not_allowed",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::UnknownPath => "unknown_path",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::UnsupportedEncoding => "unsupported_content_encoding",
            ErrorKind::Internal => "internal_error",
            ErrorKind::LimitExceeded(l) => l.reason(),
            ErrorKind::LimiterBusy => "limiter_busy",
            ErrorKind::QueueFull => "queue_full",
            ErrorKind::QueueTimeout => "queue_timeout",
            ErrorKind::QuotaEngineUnavailable => "quota_engine_unavailable",
            ErrorKind::UpstreamFailed => "upstream_failed",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
        }
    }

    /// OpenAI `error.type` and `error.code`.
    fn openai_type_and_code(self) -> (&'static str, Option<&'static str>) {
        match self {
            ErrorKind::InvalidApiKey => ("invalid_request_error", Some("invalid_api_key")),
            ErrorKind::ModelNotAllowed => ("invalid_request_error", Some("model_not_allowed")),
            ErrorKind::OriginNotAllowed => ("invalid_request_error", Some("origin_not_allowed")),
            ErrorKind::ModelNotFound => ("invalid_request_error", Some("model_not_found")),
            ErrorKind::UnknownPath => ("invalid_request_error", Some("unknown_url")),
            ErrorKind::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            ErrorKind::InvalidRequest => ("invalid_request_error", None),
            ErrorKind::PayloadTooLarge => ("invalid_request_error", Some("request_too_large")),
            ErrorKind::UnsupportedEncoding => (
                "invalid_request_error",
                Some("unsupported_content_encoding"),
            ),
            ErrorKind::Internal => ("server_error", None),
            ErrorKind::LimitExceeded(l) if l.is_quota() => {
                ("insufficient_quota", Some("insufficient_quota"))
            }
            ErrorKind::LimitExceeded(l) => match l.measure {
                LimitMeasure::TokensPerMinute => ("tokens", Some("rate_limit_exceeded")),
                _ => ("requests", Some("rate_limit_exceeded")),
            },
            ErrorKind::LimiterBusy | ErrorKind::QueueFull => {
                ("requests", Some("rate_limit_exceeded"))
            }
            ErrorKind::QueueTimeout => ("server_error", Some("server_overloaded")),
            ErrorKind::QuotaEngineUnavailable => ("server_error", Some("quota_engine_unavailable")),
            ErrorKind::UpstreamFailed => ("server_error", Some("upstream_failed")),
            ErrorKind::UpstreamTimeout => ("server_error", Some("upstream_timeout")),
        }
    }

    /// Anthropic `error.type`.
    fn anthropic_type(self) -> &'static str {
        match self {
            ErrorKind::InvalidApiKey => "authentication_error",
            ErrorKind::ModelNotAllowed | ErrorKind::OriginNotAllowed => "permission_error",
            ErrorKind::ModelNotFound | ErrorKind::UnknownPath => "not_found_error",
            ErrorKind::MethodNotAllowed
            | ErrorKind::InvalidRequest
            | ErrorKind::UnsupportedEncoding => "invalid_request_error",
            ErrorKind::PayloadTooLarge => "request_too_large",
            ErrorKind::Internal => "api_error",
            ErrorKind::LimitExceeded(l) if l.is_quota() => "billing_error",
            ErrorKind::LimitExceeded(_) | ErrorKind::LimiterBusy | ErrorKind::QueueFull => {
                "rate_limit_error"
            }
            ErrorKind::QueueTimeout => "overloaded_error",
            ErrorKind::QuotaEngineUnavailable | ErrorKind::UpstreamFailed => "api_error",
            // Anthropic's own name for its 504.
            ErrorKind::UpstreamTimeout => "timeout_error",
        }
    }
}

/// A refusal the gateway answers itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    /// The request field at fault (OpenAI `param`), when there is one.
    pub param: Option<&'static str>,
    /// Extra response headers (retry hints, rate-limit state).
    pub headers: Vec<(String, String)>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            headers: Vec::new(),
        }
    }

    /// Adds `retry-after` / `retry-after-ms` for a delay in milliseconds (at least 1 s
    /// in whole seconds, as SDKs read `retry-after-ms` first, then `retry-after`).
    pub fn retry_after_ms(self, ms: u64) -> Self {
        self.with_header("retry-after", ms.div_ceil(1000).max(1).to_string())
            .with_header("retry-after-ms", ms.max(1).to_string())
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Shared state (`what`: "limit", "queue") that could not decide: too contended (busy,
    /// retry shortly) or unreadable (an internal error: fail closed, never admit blind).
    pub fn shared_state(what: &str, failure: CasFailure) -> Self {
        match failure {
            CasFailure::Contended => ApiError::new(
                ErrorKind::LimiterBusy,
                format!("The gateway's {what} state is busy; please retry shortly."),
            )
            .retry_after_ms(1000),
            CasFailure::Host(e) => ApiError::new(
                ErrorKind::Internal,
                format!("The gateway could not read its {what} state ({e})."),
            ),
        }
    }

    /// The quota service gave no usable answer (`why`) and the request is refused.
    pub fn quota_engine_unavailable(why: &str) -> Self {
        ApiError::new(
            ErrorKind::QuotaEngineUnavailable,
            format!("The gateway's quota service is unavailable ({why}); please retry shortly."),
        )
        .retry_after_ms(1000)
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    /// The complete local reply for a client speaking `flavour`.
    pub fn reply(&self, flavour: ApiFlavour) -> LocalReply {
        let mut reply = LocalReply::json(self.kind.status_for(flavour), self.body(flavour))
            .with_header("x-sluice-reason", self.kind.reason());
        reply.headers.extend(self.headers.iter().cloned());
        reply
    }

    /// The server-sent event that ends a stream with this error, as each API ends a stream
    /// it cannot finish: OpenAI a `data:` chunk holding an `error` object, Anthropic an
    /// `event: error`.
    pub fn stream_event(&self, flavour: ApiFlavour) -> String {
        let body = self.body(flavour);
        match flavour {
            ApiFlavour::OpenAi => format!("data: {body}\n\n"),
            ApiFlavour::Anthropic => format!("event: error\ndata: {body}\n\n"),
        }
    }

    fn body(&self, flavour: ApiFlavour) -> String {
        let body = match flavour {
            ApiFlavour::OpenAi => {
                let (kind, code) = self.kind.openai_type_and_code();
                json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": code}})
            }
            ApiFlavour::Anthropic => json!({
                "type": "error",
                "error": {"type": self.kind.anthropic_type(), "message": self.message},
            }),
        };
        body.to_string()
    }
}

/// A response the filter sends instead of forwarding the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl LocalReply {
    pub fn json(status: u16, body: String) -> Self {
        LocalReply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::LimitScope;
    use serde_json::Value;

    fn body(r: &LocalReply) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn stream_events_carry_the_same_error_in_each_apis_framing() {
        let e = ApiError::new(ErrorKind::UpstreamFailed, "cut off");
        let openai = e.stream_event(ApiFlavour::OpenAi);
        let json = openai
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        assert_eq!(json, e.reply(ApiFlavour::OpenAi).body);
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["error"]["code"], "upstream_failed");
        let anthropic = e.stream_event(ApiFlavour::Anthropic);
        let json = anthropic
            .strip_prefix("event: error\ndata: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        let v: Value = serde_json::from_str(json).unwrap();
        assert_eq!(
            (v["type"].as_str(), v["error"]["type"].as_str()),
            (Some("error"), Some("api_error"))
        );
        let timeout =
            ApiError::new(ErrorKind::UpstreamTimeout, "slow").reply(ApiFlavour::Anthropic);
        assert_eq!(timeout.status, 504);
        assert!(timeout.body.contains("timeout_error"));
        for f in [ApiFlavour::OpenAi, ApiFlavour::Anthropic] {
            assert_eq!(ApiFlavour::from_name(f.as_str().as_bytes()), Some(f));
        }
        assert_eq!(ApiFlavour::from_name(b"gemini"), None);
    }

    #[test]
    fn openai_shape_has_all_four_fields() {
        let r = ApiError::new(ErrorKind::ModelNotFound, "The model `x` does not exist")
            .with_param("model")
            .reply(ApiFlavour::OpenAi);
        assert_eq!(r.status, 404);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let b = body(&r);
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["param"], "model");
        assert_eq!(b["error"]["message"], "The model `x` does not exist");
    }

    #[test]
    fn openai_null_code_and_param_are_present_as_null() {
        let b = body(&ApiError::new(ErrorKind::InvalidRequest, "bad").reply(ApiFlavour::OpenAi));
        assert!(b["error"].as_object().unwrap().contains_key("code"));
        assert_eq!(b["error"]["code"], Value::Null);
        assert_eq!(b["error"]["param"], Value::Null);
    }

    #[test]
    fn anthropic_shape() {
        let r = ApiError::new(ErrorKind::InvalidApiKey, "invalid x-api-key")
            .reply(ApiFlavour::Anthropic);
        assert_eq!(r.status, 401);
        let b = body(&r);
        assert_eq!(b["type"], "error");
        assert_eq!(b["error"]["type"], "authentication_error");
        assert_eq!(r.header("x-sluice-reason"), Some("invalid_api_key"));
    }

    #[test]
    fn shared_state_failures_are_busy_or_internal() {
        let busy = ApiError::shared_state("queue", CasFailure::Contended);
        assert_eq!(busy.kind, ErrorKind::LimiterBusy);
        assert_eq!(
            busy.message,
            "The gateway's queue state is busy; please retry shortly."
        );
        assert_eq!(
            busy.reply(ApiFlavour::OpenAi).header("retry-after"),
            Some("1")
        );
        let down = ApiError::shared_state("limit", CasFailure::Host("down".into()));
        assert_eq!(down.kind, ErrorKind::Internal);
        assert_eq!(
            down.message,
            "The gateway could not read its limit state (down)."
        );
    }

    #[test]
    fn quota_and_rate_limits_in_both_flavours() {
        let rpm = ErrorKind::LimitExceeded(LimitId {
            scope: LimitScope::Tenant,
            measure: LimitMeasure::RequestsPerMinute,
        });
        let tpm = ErrorKind::LimitExceeded(LimitId {
            scope: LimitScope::Tenant,
            measure: LimitMeasure::TokensPerMinute,
        });
        let quota = ErrorKind::LimitExceeded(LimitId {
            scope: LimitScope::Tenant,
            measure: LimitMeasure::MonthlyBudget,
        });
        let r = ApiError::new(rpm, "slow down")
            .with_header("retry-after", "2")
            .reply(ApiFlavour::OpenAi);
        let b = body(&r);
        assert_eq!(
            (
                r.status,
                b["error"]["type"].as_str(),
                b["error"]["code"].as_str()
            ),
            (429, Some("requests"), Some("rate_limit_exceeded"))
        );
        assert_eq!(r.header("retry-after"), Some("2"));
        assert_eq!(r.header("x-sluice-reason"), Some("requests_per_minute"));
        assert_eq!(
            body(&ApiError::new(tpm, "x").reply(ApiFlavour::OpenAi))["error"]["type"],
            "tokens"
        );
        let r = ApiError::new(rpm, "x").reply(ApiFlavour::Anthropic);
        assert_eq!(
            (r.status, body(&r)["error"]["type"].as_str()),
            (429, Some("rate_limit_error"))
        );
        let r = ApiError::new(quota, "x").reply(ApiFlavour::OpenAi);
        assert_eq!(
            (r.status, body(&r)["error"]["code"].as_str()),
            (429, Some("insufficient_quota"))
        );
        let r = ApiError::new(quota, "x").reply(ApiFlavour::Anthropic);
        assert_eq!(
            (r.status, body(&r)["error"]["type"].as_str()),
            (402, Some("billing_error"))
        );
    }

    #[test]
    fn message_is_json_escaped() {
        let r = ApiError::new(ErrorKind::InvalidRequest, "quote \" and\nnewline")
            .reply(ApiFlavour::OpenAi);
        assert_eq!(body(&r)["error"]["message"], "quote \" and\nnewline");
    }
}
