//! Browsers (CORS): which pages may call the gateway, answered from the configuration's
//! per-tenant `allowed_origins`.
//!
//! Envoy's own CORS filter decides per route from its YAML; here the origins belong to
//! tenants, who are known only from a key, and a preflight never carries one. So the
//! gateway answers a preflight for the union of every tenant's origins (before any key is
//! asked for), and checks the tenant's own list on the request that follows. Pages of an
//! origin no tenant allows get no CORS headers at all.

use crate::errors::LocalReply;
use crate::headers::RequestHeaders;
use crate::policy::Policy;

/// Request headers a page may send: the SDKs' (credentials, versions, their browser
/// modes' `anthropic-dangerous-direct-browser-access` and `x-stainless-*` telemetry) and
/// the HTTP ones the gateway reads.
const ALLOWED_REQUEST_HEADERS: [&str; 12] = [
    "authorization",
    "x-api-key",
    "content-type",
    "accept",
    "anthropic-version",
    "anthropic-beta",
    "anthropic-dangerous-direct-browser-access",
    "openai-organization",
    "openai-project",
    "openai-beta",
    "x-request-id",
    "cache-control",
];

/// Response headers a page may read: rate limits, retry hints, ids, the gateway's own.
const EXPOSED: &str = "x-request-id, request-id, retry-after, retry-after-ms, x-should-retry, \
x-ratelimit-limit-requests, x-ratelimit-limit-tokens, x-ratelimit-remaining-requests, \
x-ratelimit-remaining-tokens, x-ratelimit-reset-requests, x-ratelimit-reset-tokens, \
anthropic-ratelimit-requests-limit, anthropic-ratelimit-requests-remaining, \
anthropic-ratelimit-requests-reset, anthropic-ratelimit-tokens-limit, \
anthropic-ratelimit-tokens-remaining, anthropic-ratelimit-tokens-reset, \
x-sluice-reason, x-sluice-cache, x-sluice-output-clamped, age";

/// The request's `origin`, if some tenant allows it (then responses carry CORS headers).
pub fn allowed_origin(policy: &Policy, headers: &RequestHeaders) -> Option<String> {
    let origin = headers.get_str("origin")?.trim();
    policy
        .any_tenant_allows(&origin.to_ascii_lowercase())
        .then(|| origin.to_string())
}

/// Whether this is a preflight (`OPTIONS` with `access-control-request-method`).
pub fn is_preflight(headers: &RequestHeaders) -> bool {
    headers.get_str(":method") == Some("OPTIONS")
        && headers.get("access-control-request-method").is_some()
}

/// The answer to a preflight from `origin` (allowed by some tenant): the methods, and
/// the requested headers the gateway accepts (a browser refuses the call if one is
/// missing).
pub fn preflight(origin: &str, headers: &RequestHeaders) -> LocalReply {
    let requested = headers
        .get_str("access-control-request-headers")
        .unwrap_or("");
    let allowed: Vec<String> = requested
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| ALLOWED_REQUEST_HEADERS.contains(&h.as_str()) || h.starts_with("x-stainless-"))
        .collect();
    let mut reply = LocalReply {
        status: 204,
        headers: Vec::new(),
        body: String::new(),
    }
    .with_header("access-control-allow-origin", origin)
    .with_header("access-control-allow-methods", "GET, POST, OPTIONS")
    .with_header("access-control-max-age", "600")
    .with_header(
        "vary",
        "origin, access-control-request-method, access-control-request-headers",
    );
    if !allowed.is_empty() {
        reply = reply.with_header("access-control-allow-headers", &allowed.join(", "));
    }
    reply
}

/// Headers for a response to a page of `origin`.
pub fn response_headers(origin: &str) -> [(String, String); 3] {
    [
        ("access-control-allow-origin".into(), origin.into()),
        ("access-control-expose-headers".into(), EXPOSED.into()),
        ("vary".into(), "origin".into()),
    ]
}
