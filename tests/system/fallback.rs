//! Fallback across a model's deployments in real Envoy: the demo's gpt-4.1 is served by two
//! OpenAI accounts (`openai`, `openai-b`, each its own mock and key) and, at rank 1, by
//! DeepSeek under another model name. The mock's `x-mock-fault-on` picks which accounts fail.

use crate::harness::*;
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;

/// The demo, with the gold tier's cache off and its limits out of the way; `ranks` orders
/// gpt-4.1's two OpenAI accounts (`None`: one rank, sharing by `weights`), DeepSeek last.
fn options(ranks: Option<(u32, u32)>, weights: (u32, u32)) -> GatewayOptions {
    GatewayOptions {
        concurrency: 2,
        plugin_config: Some(Box::new(move |v: &mut Value| {
            v["fallback"] = json!({"deployment_header": true});
            let gold = v["tiers"]["gold"].as_object_mut().unwrap();
            gold.remove("cache");
            gold.insert(
                "limits".into(),
                json!({"requests_per_minute": 100000, "tokens_per_minute": 100000000,
                       "concurrent_requests": 64, "monthly_tokens": 100000000}),
            );
            let deployments = gpt_4_1_deployments(v);
            deployments[0]["weight"] = weights.0.into();
            deployments[1]["weight"] = weights.1.into();
            let (a, b) = ranks.unwrap_or((0, 0));
            deployments[0]["rank"] = a.into();
            deployments[1]["rank"] = b.into();
            deployments[2]["rank"] = 5.into();
        })),
        lds: false,
    }
}

/// The demo's gpt-4.1 deployments (openai, openai-b, deepseek) in a plugin configuration.
fn gpt_4_1_deployments(v: &mut Value) -> &mut Vec<Value> {
    v["models"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|m| m["name"] == "gpt-4.1")
        .unwrap()["deployments"]
        .as_array_mut()
        .unwrap()
}

fn chat(content: &str) -> Value {
    json!({"model": "gpt-4.1", "max_tokens": 16, "messages": [{"role": "user", "content": content}]})
}

fn auth(r: &sluice_mock::RecordedRequest) -> String {
    r.header("authorization").unwrap_or("").to_string()
}

/// A streamed gpt-4.1 chat request of acme's, with extra headers.
async fn stream(gw: &Gateway, extra: &[(&str, &str)]) -> reqwest::Response {
    let mut req = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    req.json(&json!({"model": "gpt-4.1", "stream": true, "messages": [{"role": "user", "content": "s"}]}))
        .send()
        .await
        .unwrap()
}

/// The usage record of the access log's last line.
async fn last_record(gw: &Gateway, lines: usize) -> Value {
    let log = gw.access_log(lines).await;
    assert_eq!(log.len(), lines, "{log:?}");
    log[lines - 1]["sluice"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_account_is_skipped_until_its_retry_after() {
    let gw = Gateway::start_with(options(Some((0, 1)), (1, 1))).await;
    let fault = [("x-mock-fault", "429"), ("x-mock-fault-on", "openai")];
    let (status, headers, body) = gw.chat_with(ACME, &chat("first"), &fault).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "gpt-4.1");
    assert_eq!(
        headers["x-sluice-deployment"], "openai-b",
        "the debugging header"
    );
    let (a, b) = (gw.mocks.openai.requests(), gw.mocks.openai_b.requests());
    assert_eq!((a.len(), b.len()), (1, 1));
    assert_eq!(a[0].status, 429);
    // Each account saw its own key only; the client's key reached neither.
    assert_eq!(auth(&a[0]), format!("Bearer {OPENAI_KEY}"));
    assert_eq!(auth(&b[0]), format!("Bearer {OPENAI_KEY_B}"));
    for r in a.iter().chain(&b) {
        assert!(!r.headers.iter().any(|(_, v)| v.contains(ACME)));
        assert_eq!(
            r.header("x-envoy-max-retries"),
            None,
            "consumed by the router"
        );
        assert!(
            !r.headers.iter().any(|(n, _)| n.starts_with("x-sluice-")),
            "{:?}",
            r.headers
        );
    }
    let record = last_record(&gw, 1).await;
    assert_eq!(record["provider"], "openai-b", "{record}");
    assert_eq!(record["outcome"], "success");
    let attempts = record["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{record}");
    assert_eq!(
        (&attempts[0]["provider"], &attempts[0]["status"]),
        (&json!("openai"), &json!(429))
    );
    assert_eq!(
        (&attempts[1]["provider"], &attempts[1]["status"]),
        (&json!("openai-b"), &json!(200))
    );
    // The mock's retry-after is 1 s: within it, requests go straight to openai-b.
    for i in 0..3 {
        let (status, _, _) = gw.chat_with(ACME, &chat(&format!("next {i}")), &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(gw.mocks.openai.requests().len(), 1, "openai is skipped");
    assert_eq!(gw.mocks.openai_b.requests().len(), 4);
    // Once it has passed, openai (rank 0) serves again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, _, _) = gw.chat_with(ACME, &chat("later"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(gw.mocks.openai.requests().len(), 2);
    let record = last_record(&gw, 5).await;
    assert_eq!(record["provider"], "openai");
    // The tenant's limits are exact through the attempts: its month holds what the records
    // say was used, and every concurrency slot is back.
    let used: u64 = gw
        .access_log(5)
        .await
        .iter()
        .map(|l| {
            let r = &l["sluice"];
            [
                "input_tokens",
                "cached_input_tokens",
                "cache_creation_tokens",
                "output_tokens",
            ]
            .iter()
            .map(|k| r[*k].as_u64().unwrap())
            .sum::<u64>()
        })
        .sum();
    let report = usage_report(&gw, ACME).await;
    assert_eq!(
        limit_line(&report, "monthly_tokens")["used"],
        json!(used),
        "{report}"
    );
    let slots = limit_line(&report, "concurrent_requests");
    assert_eq!(slots["remaining"], slots["limit"], "{report}");
    // Neither account's key reached the other.
    assert_never_sent(&gw.mocks.openai.requests(), OPENAI_KEY_B);
    assert_never_sent(&gw.mocks.openai_b.requests(), OPENAI_KEY);
    let fallbacks = gw.prometheus().await;
    assert!(
        fallbacks.contains(
            "sluice_fallbacks_total{model=\"gpt-4.1\",provider=\"openai\",reason=\"rate_limited\"} 1"
        ),
        "{fallbacks}"
    );
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provider_falls_back_to_another_with_the_request_rewritten_for_it() {
    let gw = Gateway::start_with(options(Some((0, 1)), (1, 1))).await;
    let fault = [
        ("x-mock-fault", "503"),
        ("x-mock-fault-on", "openai,openai-b"),
    ];
    let (status, _, body) = gw.chat_with(ACME, &chat("to deepseek"), &fault).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["model"], "deepseek-chat",
        "the response names the model that served"
    );
    let d = gw.mocks.deepseek.requests();
    assert_eq!(d.len(), 1);
    // DeepSeek's path, name for the model, and key.
    assert_eq!(d[0].path, "/chat/completions");
    assert_eq!(d[0].json().unwrap()["model"], "deepseek-chat");
    assert_eq!(auth(&d[0]), format!("Bearer {DEEPSEEK_KEY}"));
    assert_eq!(
        d[0].header("content-length"),
        Some(d[0].body.len().to_string().as_str())
    );
    for r in gw.mocks.openai.requests() {
        assert_eq!(r.json().unwrap()["model"], "gpt-4.1");
        assert_eq!(auth(&r), format!("Bearer {OPENAI_KEY}"));
    }
    // No account's key reached another provider, either way.
    for key in [OPENAI_KEY, OPENAI_KEY_B] {
        assert_never_sent(&gw.mocks.deepseek.requests(), key);
    }
    assert_never_sent(&gw.mocks.openai.requests(), DEEPSEEK_KEY);
    assert_never_sent(&gw.mocks.openai_b.requests(), DEEPSEEK_KEY);
    let record = last_record(&gw, 1).await;
    assert_eq!(record["provider"], "deepseek");
    assert_eq!(record["attempts"].as_array().unwrap().len(), 3);
    // Priced at DeepSeek's deployment prices, from the usage DeepSeek reported.
    let usage = d[0].usage.clone().unwrap();
    let at = |input: f64, output: f64| {
        usage.input_tokens as f64 * input + usage.output_tokens as f64 * output
    };
    let cost = record["cost_micro_usd"].as_f64().unwrap();
    assert!((cost - at(0.28, 0.42)).abs() <= 1.0, "{record}");
    assert!(
        cost < at(2.0, 8.0) / 2.0,
        "not at gpt-4.1's prices: {record}"
    );

    // Every deployment failing: the client gets the last answer, in its API's shape.
    let fault = [
        ("x-mock-fault", "503"),
        ("x-mock-fault-on", "openai,openai-b,deepseek"),
    ];
    let (status, _, body) = gw.chat_with(ACME, &chat("all down"), &fault).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert_eq!(gw.mocks.deepseek.requests().len(), 2);
    let record = last_record(&gw, 2).await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(
        record["cost_micro_usd"], 0,
        "failed attempts are not charged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_before_the_response_falls_back_and_one_after_it_does_not() {
    let gw = Gateway::start_with(options(Some((0, 1)), (1, 1))).await;
    let fault = [("x-mock-fault", "reset"), ("x-mock-fault-on", "openai")];
    let (status, _, body) = gw.chat_with(ACME, &chat("reset"), &fault).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.mocks.openai.requests()[0].status, 0, "openai dropped it");
    assert_eq!(gw.mocks.openai_b.requests().len(), 1);
    let record = last_record(&gw, 1).await;
    assert_eq!(record["attempts"][0]["status"], 0, "{record}");

    // A stream openai resets after its first chunks: nothing is retried, the client gets
    // the error event (the stream relay's).
    let fault = [
        ("x-mock-fault", "reset"),
        ("x-mock-fault-on", "openai"),
        ("x-mock-chunks", "4"),
    ];
    let resp = stream(&gw, &fault).await;
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.contains("\"code\":\"upstream_failed\""), "{text}");
    assert_eq!(
        gw.mocks.openai_b.requests().len(),
        1,
        "no attempt after bytes reached the client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_falls_back_before_its_first_byte() {
    let gw = Gateway::start_with(options(Some((0, 1)), (1, 1))).await;
    let resp = stream(
        &gw,
        &[("x-mock-fault", "429"), ("x-mock-fault-on", "openai")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let b = gw.mocks.openai_b.requests();
    assert_eq!(b.len(), 1);
    assert_eq!(auth(&b[0]), format!("Bearer {OPENAI_KEY_B}"));
    assert!(b[0].header("x-sluice-attempt").is_none());
    assert!(
        b[0].header("x-envoy-max-retries").is_none(),
        "the router's header stays in Envoy"
    );
    let record = last_record(&gw, 1).await;
    assert_eq!(record["provider"], "openai-b", "{record}");
    assert!(!record["estimated"].as_bool().unwrap(), "{record}");
    assert_eq!(record["attempts"].as_array().unwrap().len(), 2, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_spread_requests_across_accounts() {
    let gw = Gateway::start_with(options(None, (3, 1))).await;
    let n = 1000;
    for batch in 0..n / 50 {
        let calls = (0..50).map(|i| {
            let body = chat(&format!("w {batch} {i}"));
            let gw = &gw;
            async move { gw.chat_with(ACME, &body, &[]).await.0 }
        });
        assert!(join_all(calls).await.iter().all(|s| *s == 200));
    }
    let (a, b) = (
        gw.mocks.openai.requests().len(),
        gw.mocks.openai_b.requests().len(),
    );
    assert_eq!(a + b, n);
    let share = a as f64 / n as f64;
    assert!((share - 0.75).abs() < 0.04, "openai served {a} of {n}");
    assert!(gw.mocks.deepseek.requests().is_empty(), "rank 1 waits");
}

/// The demo (openai, then openai-b, DeepSeek last; no cache) with its Envoy YAML changed
/// by `misconfigure`, on one worker.
async fn misconfigured(misconfigure: impl FnOnce(String) -> String) -> Gateway {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let edit: ConfigEdit = Box::new(|v: &mut Value| {
        let deployments = gpt_4_1_deployments(v);
        deployments[1]["rank"] = 1.into();
        deployments[2]["rank"] = 5.into();
        v["tiers"]["gold"].as_object_mut().unwrap().remove("cache");
    });
    let yaml = misconfigure(render_demo_config(&mocks, &dir, Some(edit)));
    Gateway::start_config(mocks, dir, &yaml, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_filter_without_the_plans_never_forwards_another_account_s_key() {
    // Misconfigured: the upstream filter runs in a VM of its own (another vm_id), where the
    // downstream filter's plans are not. A fallback attempt must not carry the first
    // account's key to the second.
    let gw = misconfigured(|yaml| {
        let alias = "vm_config: *sluice_vm";
        assert_eq!(yaml.matches(alias).count(), 1);
        let own_vm = format!(
            "vm_config: {{ vm_id: elsewhere, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }}, \
             environment_variables: {{ host_env_keys: [OPENAI_API_KEY, OPENAI_API_KEY_B, ANTHROPIC_API_KEY, DEEPSEEK_API_KEY, GEMINI_API_KEY] }} }}",
            wasm_path().display()
        );
        yaml.replace(alias, &own_vm)
    })
    .await;
    let fault = [("x-mock-fault", "429"), ("x-mock-fault-on", "openai")];
    let (status, _, _) = gw.chat_with(ACME, &chat("misconfigured"), &fault).await;
    let b = gw.mocks.openai_b.requests();
    assert_eq!(b.len(), 1, "the attempt went to openai-b");
    assert_never_sent(&b, OPENAI_KEY);
    assert_eq!(b[0].header("authorization"), None, "sent without any key");
    assert_eq!(status, 401, "openai-b refused the request without a key");
    assert!(gw.log().contains("a fallback attempt without its plan"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_on_another_cluster_than_its_deployment_s_goes_without_a_key() {
    // Misconfigured: without the relay filter, nothing keeps the chain for the router's
    // retries, so the retry stays on openai's cluster while its plan says openai-b. The
    // upstream filter must not put openai-b's key on a request to openai.
    let gw = misconfigured(|yaml| {
        let start = yaml.find("          - name: sluice_relay\n").unwrap();
        let end = yaml
            .find("          - name: envoy.filters.http.router\n")
            .unwrap();
        format!("{}{}", &yaml[..start], &yaml[end..])
    })
    .await;
    let fault = [("x-mock-fault", "429"), ("x-mock-fault-on", "openai")];
    let (status, _, _) = gw.chat_with(ACME, &chat("no relay"), &fault).await;
    assert_ne!(status, 200);
    let a = gw.mocks.openai.requests();
    assert_never_sent(&a, OPENAI_KEY_B);
    assert!(gw.mocks.openai_b.requests().is_empty());
    assert!(
        gw.log().contains("sent without credentials"),
        "{}",
        gw.log()
    );
}
