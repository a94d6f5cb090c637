//! What clients rely on: Anthropic's paths and error shape, request ids on the gateway's
//! own errors, compressed bodies, account headers, and the order of refusals.

use super::*;

fn client_policy() -> Policy {
    let cfg = json!({
        "providers": [
            {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
             "api_key_env": "OPENAI", "headers": {"OpenAI-Organization": "org-sluice"}},
            {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
             "api_key_env": "ANTHROPIC"}
        ],
        "models": [
            {"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}},
            {"name": "claude-sonnet-4.5", "providers": ["anthropic"], "price": {"input": 3, "output": 15}}
        ],
        "tiers": {"gold": {"models": ["*"], "anthropic_betas": ["prompt-caching-*"],
                           "limits": {"requests_per_minute": 1, "tokens_per_minute": 500}}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

fn send(
    p: &Policy,
    store: &MemoryStore,
    path: &str,
    extra: &[(&str, &str)],
    body: &str,
) -> (Exchange, Step, Step) {
    let mut ex = Exchange::new();
    let h = ex.on_request_headers(p, &test_env(store), &headers("POST", path, extra), false);
    if matches!(h.next, Next::Reply(_)) {
        return (ex, h, Step::default());
    }
    let b = ex.on_request_body(p, &test_env(store), body.len(), true, || {
        Some(body.as_bytes().to_vec())
    });
    (ex, h, b)
}

const CLAUDE: (&str, &str) = ("x-api-key", "sk-acme");

#[test]
fn count_tokens_is_forwarded_to_the_anthropic_provider_and_uses_no_tokens() {
    let p = client_policy();
    let store = MemoryStore::new();
    let body =
        r#"{"model":"claude-sonnet-4.5","messages":[{"role":"user","content":"how many?"}]}"#;
    let (mut ex, _, step) = send(&p, &store, "/v1/messages/count_tokens", &[CLAUDE], body);
    assert_eq!(step.next, Next::Continue, "{step:?}");
    assert_eq!(set(&step, ":path"), Some("/v1/messages/count_tokens"));
    assert_eq!(set(&step, "x-api-key"), Some("provider-key-anthropic"));
    ex.on_response_headers(200, Some("application/json"), false, 1);
    assert!(!ex.meters_response(), "a token count reports no usage");
    // The host tells the end of an unmetered body without reading it.
    ex.on_response_body(&[], true, 2);
    let done = ex
        .finish(&p, &store, None, 2, &mut FakeMetrics::default())
        .unwrap();
    let r: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(r["endpoint"], "count_tokens");
    assert_eq!(
        (r["outcome"].as_str(), r["input_tokens"].as_u64()),
        (Some("success"), Some(0))
    );
    // It took the one request of the minute, and none of the tokens.
    let (_, _, step) = send(&p, &store, "/v1/messages/count_tokens", &[CLAUDE], body);
    let (reply, json) = reply_of(&step);
    assert_eq!(reply.status, 429);
    assert_eq!(json["error"]["type"], "rate_limit_error");
}

#[test]
fn every_refusal_under_v1_messages_speaks_anthropic() {
    let p = client_policy();
    let store = MemoryStore::new();
    let (_, h, _) = send(
        &p,
        &store,
        "/v1/messages/batches",
        &[CLAUDE, ("x-request-id", "req-123")],
        "{}",
    );
    let (reply, json) = reply_of(&h);
    assert_eq!(reply.status, 404);
    assert_eq!(json["type"], "error");
    assert_eq!(json["error"]["type"], "not_found_error");
    assert_eq!(
        reply.header("request-id"),
        Some("req-123"),
        "what the SDK reads"
    );
    // A bad key too, and OpenAI's clients get their own header name.
    let (_, h, _) = send(
        &p,
        &store,
        "/v1/messages",
        &[("x-api-key", "sk-nope"), ("x-request-id", "r2")],
        "{}",
    );
    let (reply, json) = reply_of(&h);
    assert_eq!(
        (reply.status, json["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    assert_eq!(reply.header("request-id"), Some("r2"));
    let (_, h, _) = send(
        &p,
        &store,
        "/v1/nope",
        &[("authorization", "Bearer sk-acme"), ("x-request-id", "r3")],
        "{}",
    );
    let (reply, json) = reply_of(&h);
    assert_eq!(json["error"]["code"], "unknown_url");
    assert_eq!(reply.header("x-request-id"), Some("r3"));
}

#[test]
fn compressed_bodies_the_gateway_cannot_read_get_415() {
    let p = client_policy();
    let store = MemoryStore::new();
    for (encoding, hint) in [("br", "gzip-compressed"), ("gzip", "decompressor")] {
        let extra = [
            ("authorization", "Bearer sk-acme"),
            ("content-encoding", encoding),
        ];
        let (_, h, _) = send(&p, &store, "/v1/chat/completions", &extra, "xx");
        let (reply, json) = reply_of(&h);
        assert_eq!(reply.status, 415);
        assert_eq!(json["error"]["code"], "unsupported_content_encoding");
        assert!(
            json["error"]["message"].as_str().unwrap().contains(hint),
            "{json}"
        );
    }
    let extra = [
        ("authorization", "Bearer sk-acme"),
        ("content-encoding", "identity"),
    ];
    let body = r#"{"model":"gpt-4.1","max_tokens":1,"messages":[]}"#;
    let (_, _, b) = send(&p, &store, "/v1/chat/completions", &extra, body);
    assert_eq!(b.next, Next::Continue);
}

#[test]
fn account_selecting_headers_never_reach_the_provider() {
    let p = client_policy();
    let store = MemoryStore::new();
    let extra = [
        ("authorization", "Bearer sk-acme"),
        ("openai-organization", "org-client"),
        ("openai-project", "proj-client"),
    ];
    let body = r#"{"model":"gpt-4.1","max_tokens":1,"messages":[]}"#;
    let (_, h, b) = send(&p, &store, "/v1/chat/completions", &extra, body);
    for name in ["openai-organization", "openai-project"] {
        assert!(h.remove.contains(&name.to_string()), "{name}");
    }
    assert!(
        !h.remove.contains(&"x-goog-user-project".to_string()),
        "only headers present are removed (each removal is a host call)"
    );
    let extra = [
        ("authorization", "Bearer sk-acme"),
        ("x-goog-user-project", "p"),
        ("api-key", "k"),
    ];
    let (_, h, _) = send(&p, &store, "/v1/chat/completions", &extra, body);
    for name in ["x-goog-user-project", "api-key"] {
        assert!(h.remove.contains(&name.to_string()), "{name}");
    }
    assert_eq!(
        set(&b, "openai-organization"),
        Some("org-sluice"),
        "the provider's own"
    );

    // Betas: only those the tier allows.
    let claude = r#"{"model":"claude-sonnet-4.5","max_tokens":1,"messages":[]}"#;
    let betas = [
        CLAUDE,
        (
            "anthropic-beta",
            "prompt-caching-2024-07-31, context-1m-2025-08-07",
        ),
    ];
    let (_, h, _) = send(&p, &store, "/v1/messages", &betas, claude);
    assert_eq!(set(&h, "anthropic-beta"), Some("prompt-caching-2024-07-31"));
    let betas = [CLAUDE, ("anthropic-beta", "context-1m-2025-08-07")];
    let (_, h, _) = send(&p, &store, "/v1/messages", &betas, claude);
    assert!(h.remove.contains(&"anthropic-beta".to_string()));
}

#[test]
fn a_request_that_can_never_fit_is_told_so_before_a_rate_limit_it_could_wait_out() {
    let p = client_policy();
    let store = MemoryStore::new();
    let acme = [("authorization", "Bearer sk-acme")];
    let (_, _, b) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &acme,
        r#"{"model":"gpt-4.1","max_tokens":1,"messages":[]}"#,
    );
    assert_eq!(b.next, Next::Continue);
    // The minute's one request is taken; this one needs more tokens than the bucket holds.
    let huge = r#"{"model":"gpt-4.1","max_tokens":10000,"messages":[]}"#;
    let (_, _, b) = send(&p, &store, "/v1/chat/completions", &acme, huge);
    let (reply, json) = reply_of(&b);
    assert_eq!(reply.status, 429);
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request too large"),
        "{json}"
    );
    assert_eq!(reply.header("x-should-retry"), Some("false"));
    assert_eq!(reply.header("retry-after-ms"), None);
}

#[test]
fn provider_headers_are_checked() {
    let bad = |headers: Value| {
        let cfg = json!({
            "providers": [{"name": "openai", "api": "openai", "cluster": "openai",
                           "api_key_env": "OPENAI", "headers": headers}],
            "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
            "tiers": {"gold": {"models": ["*"]}},
            "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
        });
        compile(cfg.to_string().as_bytes(), &env)
            .unwrap_err()
            .to_string()
    };
    assert!(bad(json!({"Authorization": "x"})).contains("providers[0].headers.Authorization"));
    assert!(bad(json!({"x-sluice-cluster": "x"})).contains("headers.x-sluice-cluster"));
    assert!(bad(json!({"x-sluice-relay": "openai"})).contains("headers.x-sluice-relay"));
    assert!(bad(json!({"bad name": "x"})).contains("headers.bad name"));
    assert!(bad(json!({"x-ok": "a\nb"})).contains("control characters"));
}

fn output_policy(clamp: bool) -> Policy {
    let cfg = json!({
        "providers": [
            {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1", "api_key_env": "OPENAI"},
            {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1", "api_key_env": "ANTHROPIC"}
        ],
        "models": [
            {"name": "gpt-4.1", "providers": ["openai"], "max_output_tokens": 32768,
             "price": {"input": 2, "output": 8}},
            {"name": "claude-sonnet-4.5", "upstream_model": "claude-sonnet-4-5-20250929",
             "providers": ["anthropic"], "max_output_tokens": 64000,
             "price": {"input": 3, "output": 15}}
        ],
        // $0.01 a month: 1,250 output tokens of gpt-4.1 with no prompt.
        "tiers": {"gold": {"models": ["*"], "clamp_output_to_budget": clamp,
                           "limits": {"monthly_budget_usd": 0.01}}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

#[test]
fn a_model_never_reserves_more_than_it_can_produce_and_refuses_more_as_its_provider_does() {
    let p = output_policy(false);
    let store = MemoryStore::new();
    let claude = r#"{"model":"claude-sonnet-4.5","max_tokens":128000,"messages":[]}"#;
    let (_, _, b) = send(&p, &store, "/v1/messages", &[CLAUDE], claude);
    let (reply, json) = reply_of(&b);
    assert_eq!(
        (reply.status, json["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert_eq!(
        json["error"]["message"],
        "max_tokens: 128000 > 64000, which is the maximum allowed number of output tokens for claude-sonnet-4-5-20250929"
    );
    let gpt = r#"{"model":"gpt-4.1","max_completion_tokens":40000,"messages":[]}"#;
    let (_, _, b) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-acme")],
        gpt,
    );
    let (_, json) = reply_of(&b);
    assert_eq!(json["error"]["param"], "max_completion_tokens");
    assert!(json["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 32768"));
}

#[test]
fn a_tier_that_clamps_lowers_the_output_cap_to_what_the_month_can_pay() {
    let store = MemoryStore::new();
    let acme = [("authorization", "Bearer sk-acme")];
    let asks = r#"{"model":"gpt-4.1","max_tokens":5000,"messages":[]}"#;
    // Without the clamp: 5,000 output tokens cost $0.04, over the month's $0.01.
    let (_, _, b) = send(
        &output_policy(false),
        &store,
        "/v1/chat/completions",
        &acme,
        asks,
    );
    assert_eq!(reply_of(&b).0.status, 429);
    // With it: lowered to what $0.01 pays after the prompt (3 tokens, 6 micro-USD).
    let p = output_policy(true);
    let (mut ex, _, b) = send(&p, &store, "/v1/chat/completions", &acme, asks);
    assert_eq!(b.next, Next::Continue, "{b:?}");
    let body: Value = serde_json::from_slice(b.body.as_deref().unwrap()).unwrap();
    assert_eq!(body["max_tokens"], 1249);
    assert_eq!(
        set(&b, "content-length"),
        Some(b.body.as_ref().unwrap().len().to_string().as_str())
    );
    let edits = ex.on_response_headers(200, Some("application/json"), false, 1);
    assert!(edits
        .set
        .contains(&("x-sluice-output-clamped".into(), "1249".into())));
}

fn cors_policy() -> Policy {
    let cfg = json!({
        "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1", "api_key_env": "OPENAI"}],
        "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
        "tiers": {"gold": {"models": ["*"]}},
        "tenants": [
            {"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}],
             "allowed_origins": ["https://app.acme.test", "https://*.preview.acme.test"]},
            {"id": "globex", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-globex")}],
             "allowed_origins": ["http://localhost:5173"]}
        ]
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

fn preflight(p: &Policy, origin: &str, request_headers: &str) -> Step {
    let mut ex = Exchange::new();
    let h = headers(
        "OPTIONS",
        "/v1/chat/completions",
        &[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", request_headers),
        ],
    );
    ex.on_request_headers(p, &test_env(&MemoryStore::new()), &h, true)
}

#[test]
fn preflights_are_answered_before_any_key_for_origins_a_tenant_allows() {
    let p = cors_policy();
    let step = preflight(
        &p,
        "https://pr-7.preview.acme.test",
        "authorization, content-type, x-stainless-os, x-evil",
    );
    let Next::Reply(reply) = &step.next else {
        panic!("{step:?}");
    };
    assert_eq!(reply.status, 204);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://pr-7.preview.acme.test")
    );
    assert_eq!(
        reply.header("access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-os"),
        "a header nobody allows is left out: the browser refuses the call"
    );
    assert!(reply
        .header("access-control-allow-methods")
        .unwrap()
        .contains("POST"));
    let once = |name| reply.headers.iter().filter(|(n, _)| n == name).count();
    assert_eq!((once("access-control-allow-origin"), once("vary")), (1, 1));
    let step = preflight(&p, "https://evil.test", "authorization");
    let (reply, json) = reply_of(&step);
    assert_eq!(reply.status, 403);
    assert_eq!(json["error"]["code"], "origin_not_allowed");
    assert_eq!(reply.header("access-control-allow-origin"), None);
}

#[test]
fn a_page_uses_a_key_only_from_its_tenants_origins_and_reads_every_answer() {
    let p = cors_policy();
    let store = MemoryStore::new();
    let body = r#"{"model":"gpt-4.1","max_tokens":1,"messages":[]}"#;
    let from = |origin| [("authorization", "Bearer sk-acme"), ("origin", origin)];
    let (mut ex, _, b) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &from("https://app.acme.test"),
        body,
    );
    assert_eq!(b.next, Next::Continue);
    let edits = ex.on_response_headers(200, Some("application/json"), false, 1);
    assert!(edits.set.contains(&(
        "access-control-allow-origin".into(),
        "https://app.acme.test".into()
    )));
    assert!(edits
        .set
        .iter()
        .any(|(n, v)| n == "access-control-expose-headers"
            && v.contains("x-ratelimit-remaining-tokens")));
    // Globex's page with acme's key: refused, readable by that page.
    let (_, h, _) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &from("http://localhost:5173"),
        body,
    );
    let (reply, json) = reply_of(&h);
    assert_eq!(
        (reply.status, json["error"]["code"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("http://localhost:5173")
    );
    // An error for an allowed page carries the headers too.
    let unknown = r#"{"model":"nope","messages":[]}"#;
    let (_, _, b) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &from("https://app.acme.test"),
        unknown,
    );
    let (reply, _) = reply_of(&b);
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.acme.test")
    );
    // Server-side clients send no origin: unchanged.
    let (_, _, b) = send(
        &p,
        &store,
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-acme")],
        body,
    );
    assert_eq!(b.next, Next::Continue);
}

#[test]
fn origins_are_checked() {
    for bad in [
        "*",
        "https://*",
        "app.acme.test",
        "https://app.acme.test/path",
    ] {
        let cfg = json!({
            "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "api_key_env": "OPENAI"}],
            "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
            "tiers": {"gold": {"models": ["*"]}},
            "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}],
                         "allowed_origins": [bad]}]
        });
        let err = compile(cfg.to_string().as_bytes(), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tenants[0].allowed_origins[0]"),
            "{bad}: {err}"
        );
    }
}
