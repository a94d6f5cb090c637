//! `x-mock-*` request headers that steer the mock's behaviour.

use hyper::HeaderMap;
use serde_json::Value;

/// Fault to inject (`x-mock-fault`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fault {
    /// `429`
    RateLimit,
    /// `500`
    ServerError,
    /// `529` or `503`: Anthropic 529 overloaded_error; OpenAI 503.
    Overloaded,
    /// `reset`: abort the connection (mid-stream for streams).
    Reset,
}

/// `x-mock-body`
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BodyFault {
    /// `garbage`: the body (or every SSE `data:` payload) is not JSON.
    Garbage,
    /// `truncate`: JSON cut in half (with a matching length); streams end cleanly in
    /// the middle of an event, without their closing events.
    Truncate,
}

impl BodyFault {
    pub(crate) fn parse(v: &str) -> Option<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "garbage" => Some(BodyFault::Garbage),
            "truncate" => Some(BodyFault::Truncate),
            _ => None,
        }
    }
}

const MAX_DELAY_MS: u64 = 600_000;
const MAX_OUTPUT_TOKENS: u64 = 1_000_000;
const MAX_CHUNKS: usize = 10_000;
pub(crate) const DEFAULT_CHUNKS: usize = 4;
pub(crate) const DEFAULT_OUTPUT_TOKENS: u64 = 16;

#[derive(Clone, Debug)]
pub(crate) struct Knobs {
    pub latency_ms: u64,
    pub ttft_ms: u64,
    pub chunk_delay_ms: u64,
    pub chunks: usize,
    pub fault: Option<Fault>,
    /// `x-mock-fault-times`: fault only the first N requests with the same `x-request-id`
    /// (a gateway's retry of one request keeps its id), then answer normally.
    pub fault_times: Option<u64>,
    /// `x-mock-fault-on`: comma-separated provider names; the fault applies only to them.
    pub fault_on: Option<Vec<String>>,
    pub output_tokens: Option<u64>,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
    pub cache_creation_tokens: u64,
    /// `x-mock-usage`: a JSON object sent in place of every `usage` object (a lying
    /// provider); the recorded usage stays the true one.
    pub usage: Option<Value>,
    /// `x-mock-body`: `garbage` or `truncate` (a broken 200 body).
    pub body: Option<BodyFault>,
}

fn num(h: &HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

impl Knobs {
    /// Reads the knobs; unparsable values are ignored (treated as absent).
    pub(crate) fn from_headers(h: &HeaderMap) -> Self {
        let fault = h
            .get("x-mock-fault")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| match v.trim().to_ascii_lowercase().as_str() {
                "429" => Some(Fault::RateLimit),
                "500" => Some(Fault::ServerError),
                "529" | "503" => Some(Fault::Overloaded),
                "reset" => Some(Fault::Reset),
                _ => None,
            });
        Knobs {
            latency_ms: num(h, "x-mock-latency-ms").unwrap_or(0).min(MAX_DELAY_MS),
            ttft_ms: num(h, "x-mock-ttft-ms").unwrap_or(0).min(MAX_DELAY_MS),
            chunk_delay_ms: num(h, "x-mock-chunk-delay-ms")
                .unwrap_or(0)
                .min(MAX_DELAY_MS),
            chunks: num(h, "x-mock-chunks")
                .map(|n| (n as usize).clamp(1, MAX_CHUNKS))
                .unwrap_or(DEFAULT_CHUNKS),
            fault,
            fault_times: num(h, "x-mock-fault-times"),
            fault_on: h
                .get("x-mock-fault-on")
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(',')
                        .map(|n| n.trim().to_string())
                        .filter(|n| !n.is_empty())
                        .collect()
                }),
            output_tokens: num(h, "x-mock-output-tokens").map(|n| n.min(MAX_OUTPUT_TOKENS)),
            cached_tokens: num(h, "x-mock-cached-tokens").unwrap_or(0),
            reasoning_tokens: num(h, "x-mock-reasoning-tokens").unwrap_or(0),
            cache_creation_tokens: num(h, "x-mock-cache-creation-tokens").unwrap_or(0),
            usage: h
                .get("x-mock-usage")
                .and_then(|v| serde_json::from_slice::<Value>(v.as_bytes()).ok())
                .filter(Value::is_object),
            body: h
                .get("x-mock-body")
                .and_then(|v| v.to_str().ok())
                .and_then(BodyFault::parse),
        }
    }

    /// Visible output tokens and whether they were capped by `max`:
    /// desired = `x-mock-output-tokens` or 16; capped at `max` when given.
    pub(crate) fn output(&self, max: Option<u64>) -> (u64, bool) {
        let desired = self.output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS);
        match max {
            Some(m) if desired > m => (m, true),
            _ => (desired, false),
        }
    }
}
