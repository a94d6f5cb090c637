//! The response cache in the request's life: miss then hit, replay of streams, single
//! flight, what is never stored, bypass and refresh, the hit's price, and the global
//! store's calls.

use super::*;
use crate::cache::{CacheOutcome, Lookup};
use crate::global::wire::{cache_answer, CACHE_LOOKUP_PATH, CACHE_RELEASE_PATH, CACHE_STORE_PATH};

fn cache_policy(extra: Value) -> Policy {
    let mut cfg = json!({
        "providers": [
            {"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
             "api_key_env": "OPENAI"}
        ],
        "models": [
            {"name": "gpt-4.1", "aliases": ["gpt-4.1-latest"], "providers": ["openai"],
             "price": {"input": 2, "output": 8}},
            {"name": "gpt-4o", "providers": ["openai"], "price": {"input": 2.5, "output": 10}}
        ],
        "tiers": {"gold": {"models": ["*"], "limits": {"tokens_per_minute": 1000000},
                           "cache": {"models": ["gpt-4.1*"], "ttl_s": 60}}},
        "tenants": [
            {"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]},
            {"id": "globex", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-globex")}]}
        ]
    });
    if let (Value::Object(cfg), Value::Object(extra)) = (&mut cfg, extra) {
        cfg.extend(extra);
    }
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

const GLOBEX: (&str, &str) = ("authorization", "Bearer sk-globex");
const BODY: &str =
    r#"{"model":"gpt-4.1","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
const JSON_REPLY: &str = r#"{"id":"c1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"Hello"}}],"usage":{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15}}"#;
const STREAM: &str = concat!(
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}\n\n",
    "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":5,\"total_tokens\":15}}\n\n",
    "data: [DONE]\n\n"
);

fn env_at(store: &MemoryStore, now_ms: u64, context: u32) -> BodyEnv<'_> {
    BodyEnv {
        now_ms,
        context,
        ..test_env(store)
    }
}

/// Headers and body of a POST to the chat endpoint.
fn ask(p: &Policy, env: &BodyEnv, extra: &[(&str, &str)], body: &str) -> (Exchange, Step) {
    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        p,
        env,
        &headers("POST", "/v1/chat/completions", extra),
        false,
    );
    assert_eq!(h.next, Next::Pause, "{h:?}");
    let b = ex.on_request_body(p, env, body.len(), true, || Some(body.as_bytes().to_vec()));
    (ex, b)
}

/// The upstream answers `status` with `body`, in one chunk; returns what the client got
/// and the record.
fn respond(
    p: &Policy,
    store: &MemoryStore,
    ex: &mut Exchange,
    status: u16,
    content_type: &str,
    body: &str,
    complete: bool,
) -> (ResponseEdits, Vec<u8>, Completion) {
    let edits = ex.on_response_headers(status, Some(content_type), false, 1);
    let out = match ex.on_response_body(body.as_bytes(), complete, 2) {
        Passthrough::Unchanged => body.as_bytes().to_vec(),
        Passthrough::Replace(b) => b,
    };
    let details = (!complete).then_some("upstream_reset_after_response_started");
    let done = ex
        .finish(p, store, details, 3, &mut FakeMetrics::default())
        .unwrap();
    (edits, out, done)
}

/// Acme's first `BODY` at 0 ms, answered `JSON_REPLY`: stored.
fn stored(p: &Policy, store: &MemoryStore) {
    let (mut first, _) = ask(p, &env_at(store, 0, 1), &[ACME], BODY);
    let json = "application/json";
    respond(p, store, &mut first, 200, json, JSON_REPLY, true);
}

/// The upstream answers `JSON_REPLY`, complete.
fn json_ok(p: &Policy, store: &MemoryStore, ex: &mut Exchange) -> (ResponseEdits, Completion) {
    let (edits, _, done) = respond(p, store, ex, 200, "application/json", JSON_REPLY, true);
    (edits, done)
}

fn cache_header(edits: &ResponseEdits) -> Option<&str> {
    edits
        .set
        .iter()
        .find(|(name, _)| name == "x-sluice-cache")
        .map(|(_, value)| value.as_str())
}

fn record(done: &Completion) -> Value {
    serde_json::from_str(&done.record).unwrap()
}

fn header<'a>(reply: &'a LocalReply, name: &str) -> Option<&'a str> {
    reply
        .headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_miss_is_stored_and_the_next_identical_request_is_a_free_hit() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    let (mut first, step) = ask(&p, &env_at(&store, 0, 1), &[ACME], BODY);
    assert_eq!(step.next, Next::Continue);
    let (edits, done) = json_ok(&p, &store, &mut first);
    assert_eq!(cache_header(&edits), Some("miss"));
    assert_eq!(record(&done)["cache"], "miss");
    assert_eq!(record(&done)["cost_micro_usd"], 60);

    // Same request, another key order and the model's alias: a hit.
    let same =
        r#"{"messages":[{"content":"hi","role":"user"}],"temperature":0,"model":"gpt-4.1-latest"}"#;
    let (mut second, step) = ask(&p, &env_at(&store, 1_000, 2), &[ACME], same);
    let Next::Reply(reply) = &step.next else {
        panic!("expected a hit, got {step:?}");
    };
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, JSON_REPLY);
    assert_eq!(header(reply, "x-sluice-cache"), Some("hit"));
    assert_eq!(header(reply, "content-type"), Some("application/json"));
    assert_eq!(header(reply, "age"), Some("0"));
    assert!(header(reply, "x-ratelimit-remaining-tokens").is_some());
    let mut m = FakeMetrics::default();
    let done = second.finish(&p, &store, None, 1_001, &mut m).unwrap();
    let r = record(&done);
    assert_eq!(r["cache"], "hit");
    assert_eq!(r["outcome"], "success");
    assert_eq!(r["status"], 200);
    assert_eq!(
        (r["input_tokens"].as_u64(), r["output_tokens"].as_u64()),
        (Some(10), Some(5))
    );
    assert_eq!(r["cost_micro_usd"], 0, "hit_price defaults to 0");
    assert_eq!(
        m.counter(Counter::InputTokens),
        0,
        "the provider did nothing"
    );
    assert!(m
        .0
        .iter()
        .any(|(k, v)| matches!(k, MetricKey::Cache(_, _, CacheOutcome::Hit)) && *v == 1));
}

#[test]
fn another_tenant_never_reads_the_entry() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    stored(&p, &store);
    let (_, step) = ask(&p, &env_at(&store, 1, 2), &[GLOBEX], BODY);
    assert_eq!(step.next, Next::Continue, "globex misses: its own key");
    let (_, step) = ask(&p, &env_at(&store, 2, 3), &[ACME], BODY);
    assert!(matches!(step.next, Next::Reply(_)), "acme still hits");
}

#[test]
fn a_stream_is_replayed_with_the_clients_own_usage_choice() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    let streamed = BODY.replace("\"temperature\"", "\"stream\":true,\"temperature\"");
    let (mut first, step) = ask(&p, &env_at(&store, 0, 1), &[ACME], &streamed);
    assert!(step.body.is_some(), "the usage option is injected upstream");
    let (_, first_out, _) = respond(
        &p,
        &store,
        &mut first,
        200,
        "text/event-stream",
        STREAM,
        true,
    );
    let first_out = String::from_utf8(first_out).unwrap();
    assert!(
        !first_out.contains("usage"),
        "the client did not ask for usage"
    );

    // The same client options: byte for byte what the first client got.
    let (mut again, step) = ask(&p, &env_at(&store, 10, 2), &[ACME], &streamed);
    let (reply, _) = match &step.next {
        Next::Reply(r) => (r, ()),
        other => panic!("expected a hit, got {other:?}"),
    };
    assert_eq!(reply.body, first_out);
    assert_eq!(header(reply, "content-type"), Some("text/event-stream"));
    let done = again
        .finish(&p, &store, None, 11, &mut FakeMetrics::default())
        .unwrap();
    assert_eq!(
        record(&done)["output_tokens"],
        5,
        "metered from the stored usage chunk"
    );
    assert_eq!(record(&done)["estimated"], false);

    // A client that asks for usage gets the provider's whole stream.
    let with_usage = streamed.replace(
        "\"stream\":true",
        "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
    );
    let (_, step) = ask(&p, &env_at(&store, 12, 3), &[ACME], &with_usage);
    let Next::Reply(reply) = &step.next else {
        panic!("expected a hit, got {step:?}");
    };
    assert_eq!(reply.body, STREAM);
}

#[test]
fn identical_requests_wait_for_the_one_fetching_then_get_its_response() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    let (mut fetcher, step) = ask(&p, &env_at(&store, 0, 1), &[ACME], BODY);
    assert_eq!(step.next, Next::Continue);
    let (mut waiter, step) = ask(&p, &env_at(&store, 5, 2), &[ACME], BODY);
    let Next::AwaitFill(wait) = step.next else {
        panic!("expected a wait, got {step:?}");
    };
    assert_eq!(wait.deadline_ms, 5 + 30_000);
    // The worker's waiters see the key filling: nothing changes.
    let mut waiters = crate::cache::waiters::CacheWaiters::default();
    waiters.add(2, wait.key, wait.fill_ms, wait.deadline_ms);
    let slots = 1024;
    let poll = |waiters: &mut crate::cache::waiters::CacheWaiters, now| {
        waiters.poll(now, |key, fill_ms| {
            crate::cache::local::lookup(&store, slots, key, now, fill_ms)
        })
    };
    assert!(poll(&mut waiters, 10).is_empty());
    json_ok(&p, &store, &mut fetcher);
    let mut found = poll(&mut waiters, 20);
    let (context, lookup) = found.pop().unwrap();
    assert_eq!(context, 2);
    let step = waiter.on_cache_poll(&p, &env_at(&store, 20, 2), lookup);
    let (reply, _) = reply_of(&step);
    assert_eq!(reply.body, JSON_REPLY);
    assert_eq!(header(reply, "x-sluice-cache"), Some("hit"));
    let done = waiter
        .finish(&p, &store, None, 21, &mut FakeMetrics::default())
        .unwrap();
    assert_eq!(record(&done)["cache"], "hit");
}

#[test]
fn a_waiter_whose_wait_runs_out_goes_upstream_without_the_cache() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    let (_fetcher, _) = ask(&p, &env_at(&store, 0, 1), &[ACME], BODY);
    let (mut waiter, step) = ask(&p, &env_at(&store, 5, 2), &[ACME], BODY);
    assert!(matches!(step.next, Next::AwaitFill(_)));
    let step = waiter.on_cache_poll(&p, &env_at(&store, 30_005, 2), Lookup::Unavailable);
    assert_eq!(step.next, Next::Continue);
    let (edits, done) = json_ok(&p, &store, &mut waiter);
    assert_eq!(cache_header(&edits), Some("miss"));
    assert_eq!(record(&done)["cache"], "miss");
}

#[test]
fn errors_and_cut_streams_are_never_stored_and_give_the_fetch_to_the_next() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    let streamed = BODY.replace("\"temperature\"", "\"stream\":true,\"temperature\"");
    let cut = &STREAM[..60];
    for (status, content_type, body, complete) in [
        (
            500,
            "application/json",
            r#"{"error":{"message":"boom"}}"#,
            true,
        ),
        (
            429,
            "application/json",
            r#"{"error":{"message":"slow down"}}"#,
            true,
        ),
        (200, "text/event-stream", cut, false),
    ] {
        let (mut first, step) = ask(&p, &env_at(&store, 0, 1), &[ACME], &streamed);
        assert_eq!(
            step.next,
            Next::Continue,
            "{status}: the previous fill was given back"
        );
        respond(&p, &store, &mut first, status, content_type, body, complete);
    }
    // A stream without the provider's usage report (estimated) is not stored either.
    let no_usage = "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
    let (mut first, _) = ask(&p, &env_at(&store, 0, 1), &[ACME], &streamed);
    let (_, _, done) = respond(
        &p,
        &store,
        &mut first,
        200,
        "text/event-stream",
        no_usage,
        true,
    );
    assert_eq!(record(&done)["estimated"], true);
    let (_, step) = ask(&p, &env_at(&store, 1, 2), &[ACME], &streamed);
    assert_eq!(step.next, Next::Continue, "still a miss");
}

#[test]
fn a_response_larger_than_the_entry_limit_is_not_stored() {
    let p = cache_policy(json!({"tiers": {"gold": {"models": ["*"],
        "cache": {"max_entry_bytes": 100}}}}));
    let store = MemoryStore::new();
    stored(&p, &store);
    let (_, step) = ask(&p, &env_at(&store, 1, 2), &[ACME], BODY);
    assert_eq!(step.next, Next::Continue);
}

#[test]
fn entries_expire_after_their_ttl() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    stored(&p, &store);
    let (_, step) = ask(&p, &env_at(&store, 59_000, 2), &[ACME], BODY);
    assert!(matches!(step.next, Next::Reply(_)));
    let (_, step) = ask(&p, &env_at(&store, 60_004, 3), &[ACME], BODY);
    assert_eq!(step.next, Next::Continue, "stored at 3 ms for 60 s");
}

#[test]
fn no_store_bypasses_no_cache_refreshes_and_uncacheable_requests_bypass() {
    let p = cache_policy(json!({}));
    let store = MemoryStore::new();
    stored(&p, &store);

    let (mut bypass, step) = ask(
        &p,
        &env_at(&store, 1, 2),
        &[ACME, ("cache-control", "no-store")],
        BODY,
    );
    assert_eq!(step.next, Next::Continue);
    let (edits, _, done) = respond(
        &p,
        &store,
        &mut bypass,
        200,
        "application/json",
        r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#,
        true,
    );
    assert_eq!(cache_header(&edits), Some("bypass"));
    assert_eq!(record(&done)["cache"], "bypass");

    // A refresh is fetched and replaces the entry.
    let fresh =
        r#"{"id":"c2","usage":{"prompt_tokens":10,"completion_tokens":6,"total_tokens":16}}"#;
    let (mut refresh, step) = ask(
        &p,
        &env_at(&store, 2, 3),
        &[ACME, ("cache-control", "no-cache")],
        BODY,
    );
    assert_eq!(step.next, Next::Continue);
    let (_, _, done) = respond(
        &p,
        &store,
        &mut refresh,
        200,
        "application/json",
        fresh,
        true,
    );
    assert_eq!(record(&done)["cache"], "miss");
    let (_, step) = ask(&p, &env_at(&store, 10, 4), &[ACME], BODY);
    assert_eq!(reply_of(&step).0.body, fresh);

    // Sampled: no temperature means the default, 1.
    let sampled = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#;
    let (mut s, _) = ask(&p, &env_at(&store, 11, 5), &[ACME], sampled);
    let (edits, _) = json_ok(&p, &store, &mut s);
    assert_eq!(cache_header(&edits), Some("bypass"));

    // A model outside the rule: the cache is off, no header, no field.
    let other = BODY.replace("gpt-4.1", "gpt-4o");
    let (mut o, _) = ask(&p, &env_at(&store, 12, 6), &[ACME], &other);
    let (edits, done) = json_ok(&p, &store, &mut o);
    assert!(!edits.set.iter().any(|(n, _)| n == "x-sluice-cache"));
    assert!(record(&done).get("cache").is_none());
}

#[test]
fn a_hit_is_charged_its_hit_price() {
    let p = cache_policy(json!({"tiers": {"gold": {"models": ["*"],
        "limits": {"monthly_budget_usd": 1.0},
        "cache": {"hit_price": 0.5}}}}));
    let store = MemoryStore::new();
    stored(&p, &store);
    let (mut hit, _) = ask(&p, &env_at(&store, 1, 2), &[ACME], BODY);
    let mut m = FakeMetrics::default();
    let done = hit.finish(&p, &store, None, 2, &mut m).unwrap();
    assert_eq!(record(&done)["cost_micro_usd"], 30, "half of the miss's 60");
    assert_eq!(m.counter(Counter::CostMicroUsd), 30);
}

fn global_policy() -> Policy {
    cache_policy(json!({
        "global": {"cluster": "quota", "limits": []},
        "cache_store": {"engine": "global", "tenant_max_bytes": 1000000}
    }))
}

#[test]
fn the_global_store_looks_up_through_the_quota_service() {
    let p = global_policy();
    let store = MemoryStore::new();
    let (mut ex, step) = ask(&p, &env_at(&store, 0, 1), &[ACME], BODY);
    let Next::Call(call) = &step.next else {
        panic!("expected a lookup call, got {step:?}");
    };
    assert_eq!(call.path, CACHE_LOOKUP_PATH);
    assert_eq!(
        call.timeout_ms,
        30_000 + 50,
        "the service may wait for a fill"
    );
    let lookup: crate::global::wire::CacheLookup = serde_json::from_slice(&call.body).unwrap();
    assert_eq!((lookup.tenant.as_str(), lookup.key.len()), ("acme", 64));

    // Nobody had it: this request fetches, then stores it through the service.
    let step = ex.on_call_answer(&p, &env_at(&store, 1, 1), Ok(&[cache_answer::FILL]));
    assert_eq!(step.next, Next::Continue);
    let (_, done) = json_ok(&p, &store, &mut ex);
    let store_call = done.cache_call.expect("a store call");
    assert_eq!(store_call.path, CACHE_STORE_PATH);
    let newline = store_call.body.iter().position(|b| *b == b'\n').unwrap();
    let header: crate::global::wire::CacheStoreHeader =
        serde_json::from_slice(&store_call.body[..newline]).unwrap();
    assert_eq!(
        (header.ttl_ms, header.tenant_max_bytes),
        (60_000, 1_000_000)
    );
    let entry = crate::cache::Entry::decode(&store_call.body[newline + 1..]).unwrap();
    assert_eq!(entry.body, JSON_REPLY.as_bytes());
    assert_eq!(entry.key.hex(), lookup.key);

    // Another request gets the entry back from the service: a hit.
    let (mut hit, step) = ask(&p, &env_at(&store, 5, 2), &[ACME], BODY);
    assert!(matches!(step.next, Next::Call(_)));
    let mut answer = vec![cache_answer::HIT];
    answer.extend(entry.encode());
    let step = hit.on_call_answer(&p, &env_at(&store, 6, 2), Ok(&answer));
    assert_eq!(reply_of(&step).0.body, JSON_REPLY);
    let done = hit
        .finish(&p, &store, None, 7, &mut FakeMetrics::default())
        .unwrap();
    assert_eq!(record(&done)["cache"], "hit");
    assert!(done.cache_call.is_none());
}

#[test]
fn the_global_store_gives_a_failed_fetch_back_and_survives_a_silent_service() {
    let p = global_policy();
    let store = MemoryStore::new();
    let (mut ex, _) = ask(&p, &env_at(&store, 0, 1), &[ACME], BODY);
    ex.on_call_answer(&p, &env_at(&store, 1, 1), Ok(&[cache_answer::FILL]));
    let (_, _, done) = respond(&p, &store, &mut ex, 503, "application/json", "{}", true);
    assert_eq!(done.cache_call.map(|c| c.path), Some(CACHE_RELEASE_PATH));

    // No answer, or a busy key: upstream, nothing to store or give back.
    for answer in [Err("timeout".to_string()), Ok(vec![cache_answer::BUSY])] {
        let (mut ex, _) = ask(&p, &env_at(&store, 2, 2), &[ACME], BODY);
        let step = ex.on_call_answer(
            &p,
            &env_at(&store, 3, 2),
            answer.as_deref().map_err(Clone::clone),
        );
        assert_eq!(step.next, Next::Continue);
        let (edits, done) = json_ok(&p, &store, &mut ex);
        assert_eq!(cache_header(&edits), Some("miss"));
        assert!(done.cache_call.is_none());
    }
}

#[test]
fn cache_configuration_is_strict() {
    let bad = |extra: Value| {
        let mut cfg = json!({
            "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "api_key_env": "OPENAI"}],
            "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
            "tiers": {"gold": {"models": ["*"]}},
            "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
        });
        if let (Value::Object(cfg), Value::Object(extra)) = (&mut cfg, extra) {
            cfg.extend(extra);
        }
        compile(cfg.to_string().as_bytes(), &env)
            .unwrap_err()
            .to_string()
    };
    let tier = |cache: Value| json!({"tiers": {"gold": {"models": ["*"], "cache": cache}}});
    assert!(bad(tier(json!({"ttl": 5}))).contains("unknown field `ttl`"));
    assert!(bad(tier(json!({"ttl_s": 0}))).contains("tiers.gold.cache.ttl_s"));
    assert!(bad(tier(json!({"hit_price": 1.5}))).contains("tiers.gold.cache.hit_price"));
    assert!(bad(tier(json!({"models": ["claude*"]}))).contains("tiers.gold.cache.models[0]"));
    assert!(
        bad(json!({"cache_store": {"engine": "global"}})).contains("needs the `global` section")
    );
    assert!(bad(json!({"cache_store": {"engine": "redis"}})).contains("cache_store.engine"));
    // A tenant's own `cache` replaces its tier's as a whole: `models: []` turns it off.
    let p = cache_policy(json!({"tenants": [
        {"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}],
         "cache": {"models": []}},
        {"id": "globex", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-globex")}],
         "cache": {"models": ["gpt-4o"], "ttl_s": 5}}
    ]}));
    let (acme, globex) = (
        crate::policy::TenantId::new(0),
        crate::policy::TenantId::new(1),
    );
    let (gpt41, gpt4o) = (
        crate::policy::ModelId::new(0),
        crate::policy::ModelId::new(1),
    );
    assert!(p.cache_rule(acme, gpt41).is_none());
    assert!(p.cache_rule(globex, gpt41).is_none());
    assert_eq!(p.cache_rule(globex, gpt4o).map(|r| r.ttl_ms), Some(5_000));
    let huge = json!({"cache_store": {"slots": 1000000},
        "tiers": {"gold": {"models": ["*"], "cache": {"max_entry_bytes": 16000000}}}});
    assert!(bad(huge).contains("4 GiB"));
}
