//! What a handler is given ([`Ctx`]: the request, its knobs and the
//! provider's identity) and what it gives back ([`Outcome`]: status, headers,
//! usage and a [`Reply`] — JSON, raw bytes, an SSE [`StreamPlan`] or a reset).

use bytes::Bytes;
use hyper::{HeaderMap, Method};
use serde_json::Value;

use crate::knobs::{Fault, Knobs};
use crate::record::Usage;

/// Everything a handler needs to decide its answer.
pub(crate) struct Ctx<'a> {
    /// The provider's name ("openai", "deepseek", ...).
    pub provider: &'a str,
    /// The credential this provider expects.
    pub api_key: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    pub knobs: &'a Knobs,
    /// Per-server request number (1-based), used in ids.
    pub seq: u64,
    /// Unix seconds.
    pub now: u64,
}

impl Ctx<'_> {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Bearer token from `Authorization`, if any.
    pub(crate) fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?.trim();
        let (scheme, rest) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    }

    pub(crate) fn json(&self) -> Option<Value> {
        serde_json::from_slice(self.body).ok()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    OpenAi,
    Anthropic,
}

/// A stream's events, already serialized.
#[derive(Default)]
pub(crate) struct StreamPlan {
    /// Sent (after `x-mock-ttft-ms`) together with the first content event.
    pub preamble: Vec<Bytes>,
    /// Content events, separated by `x-mock-chunk-delay-ms`.
    pub content: Vec<Bytes>,
    /// Sent right after the last content event.
    pub epilogue: Vec<Bytes>,
}

pub(crate) enum Reply {
    Json(Value),
    /// Bytes sent as `application/json` as they are (`x-mock-body`).
    Raw(Bytes),
    Stream {
        plan: StreamPlan,
        reset: bool,
    },
    /// Drop the connection without answering.
    Reset,
}

pub(crate) struct Outcome {
    pub flavour: Flavour,
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub usage: Option<Usage>,
    pub reply: Reply,
}

impl Outcome {
    pub(crate) fn json(flavour: Flavour, status: u16, body: Value) -> Self {
        Outcome {
            flavour,
            status,
            headers: Vec::new(),
            usage: None,
            reply: Reply::Json(body),
        }
    }

    pub(crate) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A successful (200) answer with usage; `x-mock-fault: reset` turns it
    /// into a reset (mid-stream for streams).
    pub(crate) fn success(flavour: Flavour, knobs: &Knobs, usage: Usage, reply: Reply) -> Self {
        let reset = knobs.fault == Some(Fault::Reset);
        let (status, usage, reply) = match reply {
            Reply::Stream { plan, .. } => (200, Some(usage), Reply::Stream { plan, reset }),
            Reply::Json(_) | Reply::Reset if reset => (0, None, Reply::Reset),
            other => (200, Some(usage), other),
        };
        Outcome {
            flavour,
            status,
            headers: Vec::new(),
            usage,
            reply,
        }
    }
}

pub(crate) fn sse_data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

pub(crate) fn sse_event(name: &str, v: &Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}
