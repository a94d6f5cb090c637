//! Fallback through the state machine: the chain it routes with, the plan it registers,
//! and how a request served by a later deployment ends (its account, prices and limits).

use super::*;
use crate::fallback::PlanTable;
use crate::limits::Limiter;

/// Two accounts of one provider (the second with its own limits and cheaper prices), and
/// a second provider at rank 1 under another model name.
fn fallback_policy() -> Policy {
    compile(fallback_config().as_bytes(), &env).unwrap()
}

fn fallback_config() -> String {
    json!({
        "providers": [
            {"name": "openai-a", "api": "openai", "cluster": "openai_a", "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_A",
             "limits": {"requests_per_minute": 1000, "monthly_tokens": 1000000}},
            {"name": "openai-b", "api": "openai", "cluster": "openai_b", "path_prefix": "/v1",
             "authority": "api.openai.com", "api_key_env": "OPENAI_B",
             "limits": {"requests_per_minute": 1000, "monthly_tokens": 1000000}},
            {"name": "deepseek", "api": "openai", "cluster": "deepseek", "fallback_cluster": "deepseek_fb",
             "api_key_env": "DEEPSEEK"}
        ],
        "models": [
            {"name": "chat", "upstream_model": "gpt-4.1-mini", "price": {"input": 2, "output": 8},
             "deployments": [
                {"provider": "openai-a"},
                {"provider": "openai-b", "rank": 1, "price": {"input": 1, "output": 1}},
                {"provider": "deepseek", "rank": 2, "upstream_model": "deepseek-chat"}
             ]}
        ],
        "tiers": {"gold": {"models": ["*"]}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    })
    .to_string()
}

fn routed(p: &Policy, store: &MemoryStore, plans: &PlanTable, id: &str) -> (Exchange, Step) {
    let env = BodyEnv {
        plans: Some(plans),
        ..test_env(store)
    };
    let mut ex = Exchange::new();
    let h = ex.on_request_headers(
        p,
        &env,
        &headers(
            "POST",
            "/v1/chat/completions",
            &[ACME, ("x-request-id", id)],
        ),
        false,
    );
    assert_eq!(h.next, Next::Pause);
    let body = r#"{"model":"chat","max_tokens":10,"messages":[]}"#;
    let b = ex.on_request_body(p, &env, body.len(), true, || Some(body.as_bytes().to_vec()));
    (ex, b)
}

#[test]
fn a_request_carries_its_chain_and_registers_its_plan() {
    let p = fallback_policy();
    let (store, plans) = (MemoryStore::new(), PlanTable::default());
    let (_, b) = routed(&p, &store, &plans, "req-1");
    assert_eq!(
        set(&b, CLUSTER_HEADER),
        Some("openai_a,openai_b,deepseek_fb")
    );
    assert_eq!(set(&b, "x-envoy-max-retries"), Some("2"));
    assert_eq!(
        set(&b, "authorization"),
        Some("Bearer provider-key-openai_a")
    );
    assert_eq!(plans.len(), 1);
    // The same id again (a client-chosen id): one attempt only, nothing registered.
    let (_, again) = routed(&p, &store, &plans, "req-1");
    assert_eq!(set(&again, CLUSTER_HEADER), Some("openai_a"));
    assert_eq!(set(&again, "x-envoy-max-retries"), None);
    assert_eq!(plans.len(), 1);
    // A request with one attempt goes to the provider's own cluster, not its fallback one.
    assert_eq!(p.providers[2].cluster_for(false), "deepseek");
    assert_eq!(p.providers[2].cluster_for(true), "deepseek_fb");
    // Without a registry (or an id), no fallback either.
    let (_, _, plain) = post(
        "/v1/chat/completions",
        &[ACME],
        r#"{"model":"gpt-4.1","messages":[]}"#,
    );
    assert_eq!(
        set(&plain, "x-envoy-max-retries"),
        None,
        "the route retries nothing itself"
    );
    // `fallback.retries` adds attempts at the last deployment.
    let mut cfg: Value = serde_json::from_str(&fallback_config()).unwrap();
    cfg["fallback"] = json!({"retries": 2});
    let p = compile(cfg.to_string().as_bytes(), &env).unwrap();
    let (_, b) = routed(&p, &store, &PlanTable::default(), "req-5");
    assert_eq!(set(&b, "x-envoy-max-retries"), Some("4"));
}

#[test]
fn a_cooling_account_is_left_out_of_the_chain() {
    let p = fallback_policy();
    let (store, plans) = (MemoryStore::new(), PlanTable::default());
    let a = &p.providers[0];
    let limited = crate::fallback::AttemptEnd::Status {
        status: 429,
        retry_after_ms: Some(60_000),
    };
    crate::fallback::record(&store, a, limited, &p.fallback, 0).unwrap();
    let (_, b) = routed(&p, &store, &plans, "req-2");
    assert_eq!(set(&b, CLUSTER_HEADER), Some("openai_b,deepseek_fb"));
    assert_eq!(
        set(&b, "authorization"),
        Some("Bearer provider-key-openai_b")
    );
}

#[test]
fn an_account_whose_month_is_spent_is_left_out_of_the_chain() {
    let p = fallback_policy();
    let (store, plans) = (MemoryStore::new(), PlanTable::default());
    // openai-a's own monthly quota (1,000,000 tokens) is used up.
    let key = crate::shared::keys::limit(
        crate::shared::keys::LimitOf::Provider("openai-a"),
        crate::policy::LimitMeasure::MonthlyTokens,
    );
    let taken = crate::limits::Taken {
        key,
        kind: crate::limits::LimitKind::Monthly { limit: 1_000_000 },
        amount: 0,
        month: crate::limits::month_index(0),
    };
    Limiter::new(&store).settle(&taken, 1_000_000, 0).unwrap();
    let (_, b) = routed(&p, &store, &plans, "req-6");
    assert_eq!(set(&b, CLUSTER_HEADER), Some("openai_b,deepseek_fb"));
}

#[test]
fn a_request_served_by_a_later_deployment_is_its_account_s() {
    let p = fallback_policy();
    let (store, plans) = (MemoryStore::new(), PlanTable::default());
    let (mut ex, _) = routed(&p, &store, &plans, "req-3");
    // Attempt 1 (openai-a) answered 429, attempt 2 (openai-b) served; the upstream filter
    // reserved openai-b's limits for attempt 2 as admission reserved openai-a's.
    assert!(plans
        .with("req-3", |plan, _| {
            plan.record(&p, 1, 429, 5);
            plan.reserve(&p, &store, 2, 6);
            plan.reserve(&p, &store, 2, 7);
            plan.record(&p, 2, 200, 9);
        })
        .is_some());
    assert_eq!(
        ex.on_response_headers(200, Some("application/json"), false, 10),
        ResponseEdits::default()
    );
    ex.on_response_body(CHAT_JSON.as_bytes(), true, 12);
    ex.collect_attempts(&plans);
    assert!(plans.is_empty(), "the plan is taken back");
    let reserved = crate::shared::keys::limit(
        crate::shared::keys::LimitOf::Provider("openai-b"),
        crate::policy::LimitMeasure::MonthlyTokens,
    );
    let kind = crate::limits::LimitKind::Monthly { limit: 1_000_000 };
    let before = Limiter::new(&store)
        .reading(&reserved, kind, 20)
        .unwrap()
        .used;
    assert!(before > 0, "the attempt's reservation is held: {before}");
    let mut m = FakeMetrics::default();
    let done = ex
        .finish(&p, &store, Some("via_upstream"), 20, &mut m)
        .unwrap();
    let a = crate::policy::ProviderId::new(0);
    let reason = crate::metrics::FallbackReason::RateLimited;
    assert!(m.0.contains(&(
        MetricKey::Fallback(Some(crate::policy::ModelId::new(0)), a, reason),
        1
    )));
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(record["provider"], "openai-b");
    assert_eq!(record["attempts"][0]["provider"], "openai-a");
    assert_eq!(record["attempts"][0]["status"], 429);
    assert_eq!(record["attempts"][1]["provider"], "openai-b");
    assert_eq!(record["attempts"][1]["status"], 200);
    // openai-b's prices: 12 input (2 cached at the input price) + 5 output, 1 USD/Mtok each.
    assert_eq!(record["cost_micro_usd"], 17);
    // openai-a got its reservation back; openai-b was charged what was used.
    let month = |name: &str| -> u64 {
        let key = crate::shared::keys::limit(
            crate::shared::keys::LimitOf::Provider(name),
            crate::policy::LimitMeasure::MonthlyTokens,
        );
        let kind = crate::limits::LimitKind::Monthly { limit: 1_000_000 };
        Limiter::new(&store).reading(&key, kind, 20).unwrap().used
    };
    assert_eq!(month("openai-a"), 0);
    assert_eq!(
        month("openai-b"),
        17,
        "reserved once, settled to what was used"
    );
    let rpm = |name: &str| {
        let key = crate::shared::keys::limit(
            crate::shared::keys::LimitOf::Provider(name),
            crate::policy::LimitMeasure::RequestsPerMinute,
        );
        let kind = crate::limits::LimitKind::Rate {
            per_minute: 1000,
            burst_milli: 1000,
        };
        Limiter::new(&store).reading(&key, kind, 20).unwrap().used
    };
    // Each account's requests per minute keep the request it saw (its provider counted
    // it too); only the tokens and budget of the failed one are given back.
    assert_eq!((rpm("openai-a"), rpm("openai-b")), (1, 1));
}

#[test]
fn a_request_served_where_it_was_routed_records_its_one_attempt() {
    let p = fallback_policy();
    let (store, plans) = (MemoryStore::new(), PlanTable::default());
    let (mut ex, _) = routed(&p, &store, &plans, "req-4");
    plans.with("req-4", |plan, _| plan.record(&p, 1, 200, 4));
    ex.on_response_headers(200, Some("application/json"), false, 10);
    ex.on_response_body(CHAT_JSON.as_bytes(), true, 12);
    ex.collect_attempts(&plans);
    let done = ex
        .finish(
            &p,
            &store,
            Some("via_upstream"),
            20,
            &mut FakeMetrics::default(),
        )
        .unwrap();
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(record["provider"], "openai-a");
    assert_eq!(record["attempts"].as_array().unwrap().len(), 1);
    // 10 input + 2 cached at 2 USD, 5 output at 8.
    assert_eq!(record["cost_micro_usd"], 64);
}
