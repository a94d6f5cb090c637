//! How requests end: outcomes, usage, records and metrics, exactly once.

use super::*;

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

/// A provider capped at one request in flight, and a tenant allowed one at a time.
fn held_policy() -> Policy {
    let cfg = json!({
        "providers": [{"name": "anthropic", "api": "anthropic", "cluster": "anthropic",
                       "path_prefix": "/v1", "api_key_env": "ANTHROPIC", "max_in_flight": 1}],
        "models": [{"name": "claude", "providers": ["anthropic"], "price": {"input": 3, "output": 15}}],
        "tiers": {"gold": {"models": ["*"], "limits": {"concurrent_requests": 1}}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

fn send_claude(p: &Policy, store: &MemoryStore) -> (Exchange, Step) {
    let body = r#"{"model":"claude","max_tokens":10,"messages":[]}"#;
    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        p,
        &test_env(&MemoryStore::new()),
        &headers("POST", "/v1/messages", &[("x-api-key", "sk-acme")]),
        false,
    );
    assert_eq!(h.next, Next::Pause);
    let step = ex.on_request_body(p, &test_env(store), body.len(), true, || {
        Some(body.as_bytes().to_vec())
    });
    (ex, step)
}

#[test]
fn a_host_failure_answers_500_in_the_clients_format_and_gives_everything_back() {
    let p = held_policy();
    let store = MemoryStore::new();
    let (mut ex, step) = send_claude(&p, &store);
    assert_eq!(step.next, Next::Continue);
    // Holding the tenant's one concurrent request and the provider's one slot.
    assert_eq!(reply_of(&send_claude(&p, &store).1).0.status, 429);
    let failed = ex.fail(&p, &store, 5);
    assert!(failed.settle_failures.is_empty());
    let (status, body) = (failed.reply.status, failed.reply.body.clone());
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 500);
    assert_eq!(body["type"], "error", "Anthropic's shape: {body}");
    assert_eq!(body["error"]["type"], "api_error");
    assert_eq!(
        failed.reply.header("x-sluice-reason"),
        Some("internal_error")
    );
    assert!(ex.replied_locally());
    // Both were given back at once: the next request is admitted and takes the slot.
    let (mut next, step) = send_claude(&p, &store);
    assert_eq!(step.next, Next::Continue);
    // The failed request's record says what happened, and gives back nothing twice.
    let done = ex
        .finish(&p, &store, None, 6, &mut FakeMetrics::default())
        .unwrap();
    assert!(!done.released_slot);
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(
        (record["outcome"].as_str(), record["reason"].as_str()),
        (Some("rejected"), Some("internal_error"))
    );
    assert_eq!(
        (record["status"].as_u64(), record["provider"].as_str()),
        (Some(500), Some("anthropic"))
    );
    assert_eq!(
        reply_of(&send_claude(&p, &store).1).0.status,
        429,
        "next still holds its own"
    );
    assert!(
        next.finish(&p, &store, None, 7, &mut FakeMetrics::default())
            .unwrap()
            .released_slot
    );
}

#[test]
fn a_host_failure_before_routing_holds_nothing() {
    let p = policy();
    let mut ex = Exchange::new();
    let failed = ex.fail(&p, &MemoryStore::new(), 0);
    let body: Value = serde_json::from_str(&failed.reply.body).unwrap();
    assert_eq!(
        (failed.reply.status, body["error"]["type"].as_str()),
        (500, Some("server_error"))
    );
    let done = ex
        .finish(
            &p,
            &MemoryStore::new(),
            None,
            1,
            &mut FakeMetrics::default(),
        )
        .unwrap();
    assert_eq!(done.outcome, Outcome::Rejected);
}

#[test]
fn a_body_that_cannot_be_rewritten_is_refused_before_any_limit() {
    let cfg = json!({
        "providers": [{"name": "deepseek", "api": "openai", "cluster": "deepseek", "api_key_env": "DEEPSEEK"}],
        "models": [{"name": "deepseek-v3.2", "upstream_model": "deepseek-chat", "providers": ["deepseek"],
                    "price": {"input": 0.28, "output": 0.42}}],
        "tiers": {"gold": {"models": ["*"], "limits": {"requests_per_minute": 1}}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    });
    let p = compile(cfg.to_string().as_bytes(), &env).unwrap();
    let store = MemoryStore::new();
    let send = |body: &str| {
        let mut ex = Exchange::new();
        ex.on_request_headers(
            &p,
            &test_env(&MemoryStore::new()),
            &headers("POST", "/v1/chat/completions", &[ACME]),
            false,
        );
        ex.on_request_body(&p, &test_env(&store), body.len(), true, || {
            Some(body.as_bytes().to_vec())
        })
    };
    // An unpaired surrogate in a skipped field passes the probe, but not the rewrite that
    // an escaped key name needs (a full parse).
    let step = send(r#"{"mod\u0065l":"deepseek-v3.2","x":"\ud800","messages":[]}"#);
    assert_eq!(reply_of(&step).0.status, 400);
    // The tenant's one request this minute is still there.
    let step = send(r#"{"model":"deepseek-v3.2","messages":[]}"#);
    assert_eq!(step.next, Next::Continue);
}
