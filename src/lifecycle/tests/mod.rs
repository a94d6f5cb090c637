//! The request state machine natively: routing and refusals here; how requests end in
//! `ending.rs`; providers' queues in `queue.rs`; global limits (the quota service's
//! answers, settlements, the usage endpoint) in `global.rs`.

mod cache;
mod clients;
mod ending;
mod fallback;
mod global;
mod queue;

use super::*;
use crate::auth::sha256_hex;
use crate::config::compile;
use crate::headers::CLUSTER_HEADER;
use crate::metrics::{Counter, MetricKey};
use crate::shared::MemoryStore;
use serde_json::{json, Value};

pub(super) fn test_env(store: &MemoryStore) -> BodyEnv<'_> {
    BodyEnv {
        store,
        now_ms: 0,
        worker: 0,
        context: 1,
        nonce: 7,
        plans: None,
    }
}

pub(super) fn env(name: &str) -> Option<String> {
    Some(format!("provider-key-{}", name.to_lowercase()))
}

pub(super) fn policy() -> Policy {
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

pub(super) fn headers(method: &str, path: &str, extra: &[(&str, &str)]) -> RequestHeaders {
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

pub(super) fn reply_of(step: &Step) -> (&LocalReply, Value) {
    match &step.next {
        Next::Reply(r) => (r, serde_json::from_str(&r.body).unwrap()),
        other => panic!("expected a reply, got {other:?}"),
    }
}

pub(super) fn set<'a>(step: &'a Step, name: &str) -> Option<&'a str> {
    step.set
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Runs a POST through both callbacks.
pub(super) fn post(path: &str, extra: &[(&str, &str)], body: &str) -> (Exchange, Step, Step) {
    let p = policy();
    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        &p,
        &test_env(&MemoryStore::new()),
        &headers("POST", path, extra),
        false,
    );
    if matches!(h.next, Next::Reply(_)) {
        return (ex, h, Step::default());
    }
    let b = ex.on_request_body(&p, &test_env(&MemoryStore::new()), body.len(), true, || {
        Some(body.as_bytes().to_vec())
    });
    (ex, h, b)
}

pub(super) const ACME: (&str, &str) = ("authorization", "Bearer sk-acme");

#[test]
fn streamed_requests_are_marked_for_the_stream_relay_in_their_api() {
    let relay = |path: &str, headers: &[(&str, &str)], body: &str| {
        let (_, _, b) = post(path, headers, body);
        set(&b, crate::headers::RELAY_HEADER).map(str::to_string)
    };
    let chat = r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#;
    assert_eq!(
        relay("/v1/chat/completions", &[ACME], chat).as_deref(),
        Some("openai")
    );
    let messages = r#"{"model":"claude-sonnet","max_tokens":8,"stream":true,"messages":[]}"#;
    assert_eq!(
        relay("/v1/messages", &[("x-api-key", "sk-acme")], messages).as_deref(),
        Some("anthropic")
    );
    let unstreamed = r#"{"model":"gpt-4.1","messages":[]}"#;
    assert_eq!(relay("/v1/chat/completions", &[ACME], unstreamed), None);
}

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
        b.remove.is_empty(),
        "the provider's credential replaces the tenant's key; no x-api-key was sent: {:?}",
        b.remove
    );
    // A tenant key in a header the provider does not use is removed.
    let (_, _, both) = post(
        "/v1/chat/completions",
        &[ACME, ("x-api-key", "sk-acme")],
        r#"{"model":"gpt-4.1","messages":[]}"#,
    );
    assert_eq!(both.remove, vec!["x-api-key".to_string()]);
    let (_, _, other) = post(
        "/v1/messages",
        &[ACME],
        r#"{"model":"claude-sonnet","max_tokens":8,"messages":[]}"#,
    );
    assert_eq!(set(&other, "x-api-key"), Some("provider-key-anthropic"));
    assert_eq!(other.remove, vec!["authorization".to_string()]);
    assert_eq!(b.body, None, "no rewrite when the name is unchanged");
    assert!(
        b.routed && !h.routed,
        "only the step that forwards is routed"
    );
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
    assert!(
        String::from_utf8_lossy(b.body.as_ref().unwrap()).contains("claude-sonnet-4-5-20250929")
    );

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
        &test_env(&MemoryStore::new()),
        &headers(
            "POST",
            "/v1/chat/completions",
            &[ACME, ("content-length", "1001")],
        ),
        false,
    );
    assert_eq!(reply_of(&h).0.status, 413);

    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        &p,
        &test_env(&MemoryStore::new()),
        &headers("POST", "/v1/chat/completions", &[ACME]),
        false,
    );
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
    let h = ex.on_request_headers(
        &p,
        &test_env(&MemoryStore::new()),
        &headers("POST", "/v1/chat/completions", &[ACME]),
        true,
    );
    assert_eq!(reply_of(&h).0.status, 400);

    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        &p,
        &test_env(&MemoryStore::new()),
        &headers("GET", "/v1/chat/completions", &[ACME]),
        true,
    );
    let (r, _) = reply_of(&h);
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        &p,
        &test_env(&MemoryStore::new()),
        &headers("POST", "/v1/nope", &[ACME]),
        false,
    );
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
        &test_env(&MemoryStore::new()),
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
    let (_, v) = reply_of(&ex.on_request_headers(&p, &test_env(&MemoryStore::new()), &hs, true));
    assert_eq!(v["data"].as_array().unwrap().len(), 3);
    assert_eq!(v["has_more"], false);
    assert_eq!(v["data"][0]["type"], "model");

    let mut ex = Exchange::new();
    let hs = headers("GET", "/v1/models/claude-sonnet", &[ACME]);
    let step = ex.on_request_headers(&p, &test_env(&MemoryStore::new()), &hs, true);
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
        reply_of(&ex.on_request_headers(&p, &test_env(&MemoryStore::new()), &hs, true))
            .0
            .status,
        404
    );
}

/// Records what the host would send to Envoy stats.

#[derive(Default)]
pub(super) struct FakeMetrics(pub(super) Vec<(MetricKey, u64)>);

impl Metrics for FakeMetrics {
    fn add(&mut self, key: MetricKey, value: u64) {
        self.0.push((key, value));
    }
}

impl FakeMetrics {
    pub(super) fn counter(&self, c: Counter) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| matches!(k, MetricKey::Counter(kc, _) if *kc == c))
            .map(|(_, v)| v)
            .sum()
    }
    pub(super) fn outcome(&self) -> Outcome {
        self.0
            .iter()
            .find_map(|(k, _)| match k {
                MetricKey::Counter(Counter::Requests, l) => Some(l.outcome),
                _ => None,
            })
            .unwrap()
    }
}

pub(super) const CHAT_JSON: &str = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hello there"},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens_details":{"reasoning_tokens":1}}}"#;
