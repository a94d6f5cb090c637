//! Usage accounting in real Envoy: every token the providers reported shows up, exactly,
//! in the Prometheus counters and the access-log records, for every response shape.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_mock::RecordedRequest;
use std::collections::BTreeMap;
use std::time::Duration;

/// Parses `name{labels} value` lines of a Prometheus scrape into (name, labels) -> value.
fn scrape(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with("sluice_"))
    {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), v.trim_matches('"').to_string())
            })
            .collect();
        out.insert((name.to_string(), labels), value.parse().unwrap());
    }
    out
}

/// Sum of a counter over the series matching every given label.
fn total(
    metrics: &BTreeMap<(String, BTreeMap<String, String>), f64>,
    name: &str,
    filter: &[(&str, &str)],
) -> u64 {
    metrics
        .iter()
        .filter(|((n, labels), _)| {
            n == name
                && filter
                    .iter()
                    .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v as u64)
        .sum()
}

/// Reads a streamed response to the end (or until the server cuts it).
async fn drain(resp: reqwest::Response) -> String {
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.push_str(&String::from_utf8_lossy(&c)),
            Err(_) => break,
        }
    }
    text
}

fn messages_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 40, "stream": stream,
           "system": "You are terse.", "messages": [{"role": "user", "content": "Tell me about tokens and usage"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_traffic_is_counted_exactly() {
    let gw = Gateway::start().await;
    let c = &gw.client;
    let chat_url = gw.url("/v1/chat/completions");
    let anthropic = |stream: bool| {
        c.post(gw.url("/v1/messages"))
            .header("x-api-key", ACME)
            .header("anthropic-version", "2023-06-01")
            .json(&messages_body("claude-sonnet", stream))
    };
    let stream_chat = |key: &str, model: &str, extra: Value| {
        let mut body = json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "stream it"}]});
        if let Value::Object(extra) = extra {
            body.as_object_mut().unwrap().extend(extra);
        }
        c.post(&chat_url).bearer_auth(key).json(&body)
    };
    // (what, request, status the client must get); every response is read to the end.
    let requests: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        (
            "chat JSON with cached and reasoning tokens",
            c.post(&chat_url)
                .bearer_auth(ACME)
                .header("x-mock-cached-tokens", "4")
                .header("x-mock-reasoning-tokens", "7")
                .json(&chat("gpt-4.1", "Explain prompt caching in a few words please")),
            200,
        ),
        ("chat SSE, client did not ask for usage", stream_chat(GLOBEX, "deepseek-v3.2", json!({})), 200),
        (
            "chat SSE with include_usage",
            stream_chat(INITECH, "gpt-4.1-mini", json!({"stream_options": {"include_usage": true}})),
            200,
        ),
        (
            "gemini JSON",
            c.post(&chat_url).bearer_auth(INITECH).json(&chat("gemini-2.5-flash", "hello gemini")),
            200,
        ),
        ("claude through the OpenAI-compatible endpoint, streamed", stream_chat(ACME, "claude-sonnet", json!({})), 200),
        (
            "embeddings, base64 as the SDKs ask",
            c.post(gw.url("/v1/embeddings")).bearer_auth(INITECH).json(
                &json!({"model": "text-embedding-3-small", "input": ["alpha beta gamma", "delta"], "encoding_format": "base64"}),
            ),
            200,
        ),
        (
            "Responses API JSON",
            c.post(gw.url("/v1/responses"))
                .bearer_auth(ACME)
                .header("x-mock-reasoning-tokens", "3")
                .json(&json!({"model": "gpt-4.1-mini", "input": "Hello Responses", "instructions": "Be brief"})),
            200,
        ),
        (
            "Responses API SSE",
            c.post(gw.url("/v1/responses"))
                .bearer_auth(GLOBEX)
                .json(&json!({"model": "gpt-4.1", "input": "Stream the Responses API", "stream": true})),
            200,
        ),
        (
            "Anthropic JSON with cache reads and writes",
            c.post(gw.url("/v1/messages"))
                .header("x-api-key", ACME)
                .header("anthropic-version", "2023-06-01")
                .header("x-mock-cached-tokens", "5")
                .header("x-mock-cache-creation-tokens", "2")
                .json(&messages_body("claude-sonnet-4.5", false)),
            200,
        ),
        ("Anthropic SSE", anthropic(true).header("x-mock-chunks", "5"), 200),
        (
            "upstream 429 (a model without fallback: passed on as it is)",
            c.post(&chat_url).bearer_auth(ACME).header("x-mock-fault", "429").json(&chat("gpt-4.1-mini", "fail")),
            429,
        ),
        (
            "upstream 500",
            c.post(&chat_url).bearer_auth(GLOBEX).header("x-mock-fault", "500").json(&chat("deepseek-v3.2", "fail")),
            500,
        ),
        (
            "upstream resets mid-stream",
            stream_chat(ACME, "gpt-4.1", json!({}))
                .header("x-mock-fault", "reset")
                .header("x-mock-chunks", "6")
                .header("x-mock-output-tokens", "24"),
            200,
        ),
        ("rejected: bad key", c.post(&chat_url).bearer_auth("sk-nope").json(&chat("gpt-4.1", "x")), 401),
        ("rejected: model not allowed", c.post(&chat_url).bearer_auth(INITECH).json(&chat("gpt-4.1", "x")), 403),
    ];
    let mut sent = 0usize;
    for (what, req, status) in requests {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        let text = drain(resp).await;
        if what == "chat SSE, client did not ask for usage" {
            // Chunks carry `"usage":null` once usage is requested upstream (harmless to
            // SDKs); the usage-bearing chunk itself must be gone.
            assert!(
                !text.contains("\"usage\":{"),
                "client did not ask for usage but saw it: {text}"
            );
            assert!(
                !text.contains("\"choices\":[]"),
                "the usage-only chunk reached the client: {text}"
            );
        }
        sent += 1;
    }
    // The client aborts a stream after its first chunk.
    let resp = anthropic(true)
        .header("x-mock-chunks", "8")
        .header("x-mock-chunk-delay-ms", "150")
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    sent += 1;

    let records = gw.access_log(sent).await;
    assert_eq!(
        records.len(),
        sent,
        "one access-log record per request:\n{}",
        gw.access_log_text()
    );
    // The aborted stream finishes on the mock side after the client left; give it time.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let upstream: Vec<RecordedRequest> = gw.mocks.all();
    let by_id: BTreeMap<&str, &Value> = records
        .iter()
        .filter_map(|r| {
            r["sluice"]["request_id"]
                .as_str()
                .map(|id| (id, &r["sluice"]))
        })
        .collect();

    // Every upstream request's ground truth equals its record, field by field.
    let mut checked_exact = 0;
    let mut checked_estimated = 0;
    for up in &upstream {
        let id = up
            .header("x-request-id")
            .expect("Envoy forwards x-request-id");
        let rec = by_id
            .get(id)
            .unwrap_or_else(|| panic!("no record for upstream request {id}: {up:?}"));
        let truth = up.usage.clone().unwrap_or_default();
        if rec["estimated"] == true {
            checked_estimated += 1;
            // Estimates: input within 25% of the truth; output no more than was generated.
            let (est_in, true_in) = (rec["input_tokens"].as_u64().unwrap(), truth.input_tokens);
            assert!(
                est_in.abs_diff(true_in) * 4 <= true_in.max(1),
                "input estimate {est_in} vs {true_in}: {rec}"
            );
            assert!(
                rec["output_tokens"].as_u64().unwrap() <= truth.output_tokens,
                "{rec} vs {truth:?}"
            );
            continue;
        }
        if up.status >= 400 {
            assert_eq!(rec["input_tokens"], 0, "{rec}");
            assert_eq!(rec["output_tokens"], 0, "{rec}");
            assert_eq!(rec["outcome"], "upstream_error", "{rec}");
            continue;
        }
        checked_exact += 1;
        assert_eq!(rec["outcome"], "success", "{rec}");
        for (field, expected) in [
            ("input_tokens", truth.input_tokens),
            ("cached_input_tokens", truth.cached_tokens),
            ("cache_creation_tokens", truth.cache_creation_tokens),
            ("output_tokens", truth.output_tokens),
            ("reasoning_tokens", truth.reasoning_tokens),
        ] {
            assert_eq!(
                rec[field].as_u64().unwrap(),
                expected,
                "{field} of {} {rec}",
                up.path
            );
        }
    }
    assert_eq!(
        checked_exact, 10,
        "every successful response metered exactly"
    );
    assert_eq!(
        checked_estimated, 2,
        "the reset and the aborted stream are estimated"
    );

    // Rejections and the abort are recorded too.
    let with_outcome = |outcome: &str| -> Vec<&Value> {
        records
            .iter()
            .map(|r| &r["sluice"])
            .filter(|r| r["outcome"] == outcome)
            .collect()
    };
    let mut reasons: Vec<&str> = with_outcome("rejected")
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["invalid_api_key", "model_not_allowed"]);
    assert_eq!(with_outcome("aborted").len(), 1, "{records:?}");

    // Prometheus counters equal the sums of the records, per tenant and model.
    let metrics = scrape(&gw.prometheus().await);
    for tenant in ["acme", "globex", "initech"] {
        for model in [
            "gpt-4.1",
            "gpt-4.1-mini",
            "deepseek-v3.2",
            "gemini-2.5-flash",
            "claude-sonnet-4.5",
            "text-embedding-3-small",
        ] {
            let mine: Vec<&Value> = records
                .iter()
                .map(|r| &r["sluice"])
                .filter(|r| r["tenant"] == tenant && r["model"] == model)
                .collect();
            let sum = |field: &str| mine.iter().map(|r| r[field].as_u64().unwrap()).sum::<u64>();
            let labels = [("tenant", tenant), ("model", model)];
            for (counter, field) in [
                ("sluice_input_tokens_total", "input_tokens"),
                ("sluice_cached_input_tokens_total", "cached_input_tokens"),
                (
                    "sluice_cache_creation_tokens_total",
                    "cache_creation_tokens",
                ),
                ("sluice_output_tokens_total", "output_tokens"),
                ("sluice_reasoning_tokens_total", "reasoning_tokens"),
                ("sluice_cost_micro_usd_total", "cost_micro_usd"),
            ] {
                assert_eq!(
                    total(&metrics, counter, &labels),
                    sum(field),
                    "{counter} for {tenant}/{model}"
                );
            }
            assert_eq!(
                total(&metrics, "sluice_requests_total", &labels),
                mine.len() as u64,
                "requests {tenant}/{model}"
            );
            let estimated = mine.iter().filter(|r| r["estimated"] == true).count() as u64;
            assert_eq!(
                total(&metrics, "sluice_estimated_usage_total", &labels),
                estimated,
                "{tenant}/{model}"
            );
        }
    }
    assert_eq!(
        total(
            &metrics,
            "sluice_requests_total",
            &[("outcome", "rejected"), ("reason", "invalid_api_key")]
        ),
        1
    );
    assert_eq!(
        total(
            &metrics,
            "sluice_requests_total",
            &[("outcome", "upstream_error")]
        ),
        3
    );
    assert_eq!(total(&metrics, "sluice_requests_total", &[]), sent as u64);

    // Latency histograms: one sample per response that had headers from upstream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = scrape(&gw.prometheus().await);
    let with_headers = upstream.iter().filter(|u| u.status != 0).count() as u64;
    assert_eq!(
        total(&metrics, "sluice_upstream_latency_ms_count", &[]),
        with_headers
    );
    assert!(
        total(
            &metrics,
            "sluice_time_to_first_token_ms_count",
            &[("model", "claude-sonnet-4.5")]
        ) >= 3
    );

    // Cost is priced from the table: recompute one record by hand.
    let gpt = by_id
        .values()
        .find(|r| r["model"] == "gpt-4.1" && r["tenant"] == "acme" && r["cached_input_tokens"] == 4)
        .unwrap();
    let expect = (gpt["input_tokens"].as_u64().unwrap() * 2_000_000
        + gpt["cached_input_tokens"].as_u64().unwrap() * 500_000
        + gpt["output_tokens"].as_u64().unwrap() * 8_000_000
        + 500_000)
        / 1_000_000;
    assert_eq!(gpt["cost_micro_usd"].as_u64().unwrap(), expect);
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_usage_chunk_is_seen_only_by_clients_that_asked() {
    let gw = Gateway::start().await;
    for (ask, expected_usage_chunks) in [(false, 0), (true, 1)] {
        let mut body = json!({"model": "gpt-4.1-mini", "stream": true, "messages": [{"role": "user", "content": "count my usage"}]});
        if ask {
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = gw
            .client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(ACME)
            .header("x-mock-chunks", "5")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = drain(r).await;
        let events: Vec<Value> = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let usage_chunks = events.iter().filter(|e| e["usage"].is_object()).count();
        assert_eq!(usage_chunks, expected_usage_chunks, "asked={ask}: {text}");
        assert!(
            text.trim_end().ends_with("data: [DONE]"),
            "stream must still end with [DONE]: {text}"
        );
        assert!(events.len() >= 6, "content chunks must all arrive: {text}");
        // Upstream was always asked for usage.
        let up = gw.mocks.openai.requests();
        assert_eq!(
            up.last().unwrap().json().unwrap()["stream_options"]["include_usage"],
            true
        );
    }
    let records = gw.access_log(2).await;
    for r in &records {
        assert_eq!(r["sluice"]["estimated"], false, "{r}");
        assert!(r["sluice"]["output_tokens"].as_u64().unwrap() > 0, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_any_log() {
    const CANARY_TENANT_KEY: &str = "sk-canary-tenant-4f2d9a7c1b";
    let digest = sluice::auth::sha256_hex(CANARY_TENANT_KEY);
    let gw = Gateway::start_with(GatewayOptions {
        plugin_config: Some(Box::new(move |v| {
            v["tenants"][0]["keys"]
                .as_array_mut()
                .unwrap()
                .push(json!({"id": "canary", "sha256": digest}));
        })),
        ..GatewayOptions::default()
    })
    .await;
    let c = &gw.client;
    // Success, stream, errors, and a wrong key that differs from the canary by one char.
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(CANARY_TENANT_KEY)
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    drain(
        c.post(gw.url("/v1/messages"))
            .header("x-api-key", CANARY_TENANT_KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&messages_body("claude-sonnet", true))
            .send()
            .await
            .unwrap(),
    )
    .await;
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(CANARY_TENANT_KEY)
        .header("x-mock-fault", "500")
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    c.post(gw.url("/v1/chat/completions"))
        .bearer_auth(&CANARY_TENANT_KEY[..CANARY_TENANT_KEY.len() - 1])
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let records = gw.access_log(4).await;
    assert_eq!(records.len(), 4);
    assert!(
        records.iter().any(|r| r["sluice"]["key_id"] == "canary"),
        "the key is named by its id"
    );

    let log = gw.log();
    assert!(
        log.contains("sluice: routed tenant=acme key=canary"),
        "the filter logged at debug level:\n{log}"
    );
    let access = gw.access_log_text();
    let canary_prefix = &CANARY_TENANT_KEY[..CANARY_TENANT_KEY.len() - 1];
    for (what, text) in [("envoy log", &log), ("access log", &access)] {
        for secret in [canary_prefix, OPENAI_KEY, ANTHROPIC_KEY] {
            assert!(!text.contains(secret), "{secret} appears in the {what}");
        }
    }
}
