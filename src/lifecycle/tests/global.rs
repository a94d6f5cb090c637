//! Requests whose limits are global: the call to the quota service, its answers (admit,
//! refuse, none), the settlement at the end, and the usage endpoint.

use super::*;
use crate::global::wire::{
    AdmitReply, AdmitRequest, PeekReply, PeekRequest, Reading, SettleItem, PEEK_PATH,
};
use crate::limits::{LimitKind, Limiter, Snapshot};

const INITECH: &str = "sk-initech";

/// Bronze with local requests per minute and a global (tenant) monthly budget and
/// concurrency; `on_engine_failure` as given.
fn global_policy(on_engine_failure: &str) -> Policy {
    let cfg = json!({
        "providers": [
            {"name": "deepseek", "api": "openai", "cluster": "deepseek", "api_key_env": "DEEPSEEK"}
        ],
        "models": [
            {"name": "deepseek-v3.2", "upstream_model": "deepseek-chat", "providers": ["deepseek"],
             "price": {"input": 1, "output": 2}}
        ],
        "tiers": {"bronze": {"models": ["deepseek-*"],
                             "limits": {"requests_per_minute": 10, "concurrent_requests": 2,
                                        "monthly_budget_usd": 1}}},
        "tenants": [
            {"id": "initech", "tier": "bronze", "keys": [{"id": "k1", "sha256": sha256_hex(INITECH)}]}
        ],
        "global": {"cluster": "quota", "limits": ["concurrent_requests", "monthly_budget_usd"],
                   "on_engine_failure": on_engine_failure}
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

const BODY: &str =
    r#"{"model":"deepseek-v3.2","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

/// Sends the request's headers and body: the step asks for a call to the quota service.
fn call(p: &Policy, store: &MemoryStore) -> (Exchange, AdmitRequest) {
    let mut ex = Exchange::new();
    let auth = format!("Bearer {INITECH}");
    let hs = headers("POST", "/v1/chat/completions", &[("authorization", &auth)]);
    let env = test_env(store);
    ex.on_request_headers(p, &env, &hs, false);
    let step = ex.on_request_body(p, &env, BODY.len(), true, || Some(BODY.as_bytes().to_vec()));
    assert!(
        step.routed,
        "the upstream edits are made while the call runs"
    );
    assert_eq!(set(&step, CLUSTER_HEADER), Some("deepseek"));
    let Next::Admit(request) = step.next else {
        panic!(
            "expected an admission by the quota service, got {:?}",
            step.next
        );
    };
    (ex, request)
}

fn admitted(request: &AdmitRequest) -> AdmitReply {
    let snapshots = request
        .demands
        .iter()
        .map(|_| Snapshot {
            limit: 5,
            remaining: 4,
            reset_ms: 0,
        })
        .collect();
    AdmitReply::Admitted {
        snapshots,
        month: 24_322,
    }
}

fn local_rpm_left(store: &MemoryStore) -> u64 {
    let kind = LimitKind::Rate {
        per_minute: 10,
        burst_milli: 1000,
    };
    Limiter::new(store)
        .snapshot("sluice:t:initech:rpm", kind, 0)
        .unwrap()
        .remaining
}

#[test]
fn global_limits_are_asked_of_the_quota_service_in_one_call() {
    let p = global_policy("deny");
    let store = MemoryStore::new();
    let (mut ex, request) = call(&p, &store);
    assert_eq!(
        request.id, "0000000000000007-1",
        "the VM's nonce and the context id"
    );
    let keys: Vec<&str> = request.demands.iter().map(|d| d.key.as_str()).collect();
    assert_eq!(keys, ["sluice:{t:initech}:conc", "sluice:{t:initech}:musd"]);
    assert_eq!(local_rpm_left(&store), 9, "the local limit was taken first");

    let step = ex.on_admission_answer(&p, &test_env(&store), Ok(admitted(&request)));
    assert_eq!(step.next, Next::Continue);
    assert_eq!(
        ex.leases().len(),
        1,
        "the global concurrency slot is a lease to renew"
    );
    let edits = ex.on_response_headers(200, Some("application/json"), false, 0);
    assert!(edits
        .set
        .iter()
        .any(|(n, _)| n == "x-ratelimit-remaining-requests"));
    let response = br#"{"id":"c","object":"chat.completion","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
    ex.on_response_body(response, true, 0);
    let done = ex
        .finish(&p, &store, None, 0, &mut FakeMetrics::default())
        .unwrap();
    let settlement = done.settlement.expect("the global limits are settled");
    assert_eq!(settlement.id, request.id);
    assert_eq!(settlement.month, 24_322);
    // 10 input x $1 + 20 output x $2 per million tokens = 50 micro-USD.
    let budget = settlement
        .items
        .iter()
        .find(|i| i.key.ends_with(":musd"))
        .unwrap();
    assert_eq!(budget.actual, 50);
    assert!(budget.reserved > budget.actual);
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(record["limits_engine"], "global");
    assert_eq!(record["global_id"], request.id.as_str());
}

#[test]
fn a_global_refusal_gives_back_the_local_limits() {
    let p = global_policy("deny");
    let store = MemoryStore::new();
    let (mut ex, request) = call(&p, &store);
    let refusal = AdmitReply::Rejected {
        index: 1,
        retry_after_ms: Some(1_000),
        snapshot: Snapshot {
            limit: 1_000_000,
            remaining: 10,
            reset_ms: 1_000,
        },
    };
    let step = ex.on_admission_answer(&p, &test_env(&store), Ok(refusal));
    let (reply, body) = reply_of(&step);
    assert_eq!(reply.status, 429);
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert_eq!(reply.header("x-sluice-reason"), Some("monthly_budget"));
    let done = ex
        .finish(&p, &store, None, 0, &mut FakeMetrics::default())
        .unwrap();
    assert_eq!(
        local_rpm_left(&store),
        10,
        "the local request was given back"
    );
    assert!(
        done.settlement.is_none(),
        "the service took nothing: nothing to settle"
    );
    let _ = request;
}

#[test]
fn no_answer_denies_or_falls_back_to_local_counters_never_unlimited() {
    let store = MemoryStore::new();
    let deny = global_policy("deny");
    let (mut ex, _) = call(&deny, &store);
    let step = ex.on_admission_answer(&deny, &test_env(&store), Err("no answer".into()));
    let (reply, body) = reply_of(&step);
    assert_eq!(reply.status, 503);
    assert_eq!(body["error"]["code"], "quota_engine_unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    ex.finish(&deny, &store, None, 0, &mut FakeMetrics::default());
    assert_eq!(local_rpm_left(&store), 10);

    let local = global_policy("local");
    let store = MemoryStore::new();
    // Two concurrent slots: the third request is refused by the local fallback counter.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (mut ex, _) = call(&local, &store);
        let step = ex.on_admission_answer(&local, &test_env(&store), Err("no answer".into()));
        assert_eq!(step.next, Next::Continue);
        held.push(ex);
    }
    let (mut third, _) = call(&local, &store);
    let step = third.on_admission_answer(&local, &test_env(&store), Err("no answer".into()));
    let (reply, _) = reply_of(&step);
    assert_eq!(reply.header("x-sluice-reason"), Some("concurrent_requests"));
    let mut metrics = FakeMetrics::default();
    let done = held
        .pop()
        .unwrap()
        .finish(&local, &store, None, 0, &mut metrics)
        .unwrap();
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(record["limits_engine"], "local_fallback");
    assert!(
        done.settlement.is_none(),
        "decided locally, settled locally"
    );
    let fallback = MetricKey::Global(crate::metrics::GlobalEvent::Fallback);
    assert!(metrics.0.contains(&(fallback, 1)), "{:?}", metrics.0);
}

#[test]
fn a_request_abandoned_while_the_service_decides_releases_whatever_it_may_have_taken() {
    let p = global_policy("deny");
    let store = MemoryStore::new();
    let (mut ex, request) = call(&p, &store);
    let done = ex
        .finish(
            &p,
            &store,
            Some("downstream_remote_disconnect"),
            0,
            &mut FakeMetrics::default(),
        )
        .unwrap();
    assert_eq!(
        local_rpm_left(&store),
        9,
        "a request made counts, as a local abort does"
    );
    let settlement = done
        .settlement
        .expect("a release, in case the service admitted it");
    assert_eq!(settlement.id, request.id);
    assert!(settlement.items.iter().all(
        |SettleItem {
             actual,
             key,
             reserved,
             ..
         }| { *actual == 0 || (key.ends_with(":rpm") && actual == reserved) }
    ));
    // A late answer finds the stream finished and changes nothing.
    let step = ex.on_admission_answer(&p, &test_env(&store), Ok(admitted(&request)));
    assert_eq!(step.next, Next::Pause, "nothing to resume");
    assert!(
        ex.finish(&p, &store, None, 0, &mut FakeMetrics::default())
            .is_none(),
        "finished once"
    );
}

#[test]
fn the_usage_endpoint_reads_local_limits_and_asks_for_global_ones() {
    let p = global_policy("deny");
    let store = MemoryStore::new();
    let (mut busy, _) = call(&p, &store);
    let _ = &mut busy;
    let mut ex = Exchange::new();
    let auth = format!("Bearer {INITECH}");
    let hs = headers("GET", "/v1/sluice/usage", &[("authorization", &auth)]);
    let step = ex.on_request_headers(&p, &test_env(&store), &hs, true);
    let Next::Call(callout) = step.next else {
        panic!("expected a peek, got {:?}", step.next);
    };
    assert_eq!(callout.path, PEEK_PATH);
    let peek: PeekRequest = serde_json::from_slice(&callout.body).unwrap();
    assert_eq!(peek.limits.len(), 2);
    let readings = PeekReply {
        readings: vec![
            Reading {
                snapshot: Snapshot {
                    limit: 2,
                    remaining: 1,
                    reset_ms: 0,
                },
                used: 1,
            },
            Reading {
                snapshot: Snapshot {
                    limit: 1_000_000,
                    remaining: 750_000,
                    reset_ms: 5_000,
                },
                used: 250_000,
            },
        ],
    };
    let answer = serde_json::to_vec(&readings).unwrap();
    let step = ex.on_call_answer(&p, &test_env(&store), Ok(&answer));
    let (reply, body) = reply_of(&step);
    assert_eq!(reply.status, 200);
    assert_eq!(body["tenant"], "initech");
    let line = |name: &str| {
        body["limits"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["limit_name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(line("requests_per_minute")["engine"], "local");
    assert_eq!(line("requests_per_minute")["used"], 1, "the busy request");
    assert_eq!(line("monthly_budget_usd")["engine"], "global");
    assert_eq!(line("monthly_budget_usd")["used"], json!(0.25));
    assert_eq!(line("concurrent_requests")["remaining"], 1);

    // Without an answer: the API's 503, nothing invented.
    let mut ex = Exchange::new();
    ex.on_request_headers(&p, &test_env(&store), &hs, true);
    let step = ex.on_call_answer(&p, &test_env(&store), Err("timeout".into()));
    assert_eq!(reply_of(&step).0.status, 503);
}

#[test]
fn with_every_limit_local_the_usage_endpoint_answers_at_once() {
    let p = policy();
    let store = MemoryStore::new();
    let mut ex = Exchange::new();
    let hs = headers(
        "GET",
        "/v1/sluice/usage",
        &[("authorization", "Bearer sk-acme")],
    );
    let step = ex.on_request_headers(&p, &test_env(&store), &hs, true);
    let (reply, body) = reply_of(&step);
    assert_eq!(reply.status, 200);
    assert_eq!(body["object"], "sluice.usage");
    assert_eq!(
        body["limits"],
        json!([]),
        "acme has no limits in this policy"
    );
}
