//! Limits and quotas in real Envoy with 4 workers: exact under concurrency, reserved up
//! front, settled from real usage, released exactly once however a request ends.

use crate::harness::*;
use futures_util::future::join_all;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn four_workers(edit: Option<ConfigEdit>) -> GatewayOptions {
    GatewayOptions {
        concurrency: 4,
        plugin_config: edit,
        lds: false,
    }
}

fn small_chat(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "limits test"}]})
}

/// Sends `n` identical requests at once; returns (status, headers, body) per response.
async fn burst(
    gw: &Gateway,
    n: usize,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Vec<(u16, reqwest::header::HeaderMap, Value)> {
    let calls = (0..n).map(|_| gw.chat_with(key, body, extra));
    join_all(calls).await
}

fn count(results: &[(u16, reqwest::header::HeaderMap, Value)], status: u16) -> usize {
    results.iter().filter(|(s, _, _)| *s == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_simultaneous_bronze_requests_admit_exactly_ten() {
    let gw = Gateway::start_with(four_workers(None)).await;
    let body = small_chat("gpt-4.1-mini", 16);
    let results = burst(&gw, 30, INITECH, &body, &[]).await;
    assert_eq!(
        count(&results, 200),
        10,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(count(&results, 429), 20);
    assert_eq!(
        gw.mocks.openai.requests().len(),
        10,
        "rejected requests never reach the provider"
    );

    let mut retry_ms = u64::MAX;
    for (status, headers, body) in &results {
        let h = |n: &str| headers.get(n).map(|v| v.to_str().unwrap().to_string());
        assert_eq!(h("x-ratelimit-limit-requests").as_deref(), Some("10"));
        if *status == 200 {
            assert!(
                h("x-ratelimit-remaining-requests")
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
                    < 10
            );
            assert!(
                h("x-ratelimit-limit-tokens").is_some()
                    && h("x-ratelimit-reset-requests").is_some()
            );
            continue;
        }
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        assert_eq!(body["error"]["type"], "requests", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("requests per minute"),
            "{body}"
        );
        assert_eq!(h("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        let ms: u64 = h("retry-after-ms").unwrap().parse().unwrap();
        let secs: u64 = h("retry-after").unwrap().parse().unwrap();
        assert!(ms > 0 && ms <= 6000, "one request refills every 6 s: {ms}");
        assert_eq!(secs, ms.div_ceil(1000));
        retry_ms = retry_ms.min(ms);
    }

    // After the advertised wait, exactly the refilled amount (one request) is admitted.
    tokio::time::sleep(Duration::from_millis(retry_ms + 150)).await;
    let again = burst(&gw, 5, INITECH, &body, &[]).await;
    assert_eq!(
        count(&again, 200),
        1,
        "{:?}",
        again.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    assert_eq!(count(&again, 429), 4);
    assert_eq!(gw.mocks.openai.requests().len(), 11);
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_reservations_are_checked_before_upstream_and_settled_from_real_usage() {
    let gw = Gateway::start_with(four_workers(Some(Box::new(|v| {
        v["tiers"]["bronze"]["limits"]["tokens_per_minute"] = 1000.into();
    }))))
    .await;
    // A reservation larger than the whole bucket can never succeed: refused, not retried.
    let resp = gw
        .post(
            "/v1/chat/completions",
            INITECH,
            small_chat("gpt-4.1-mini", 2000),
        )
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["x-should-retry"], "false");
    assert!(resp.headers().get("retry-after").is_none());
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "tokens", "{v}");

    // Three reservations of ~314 fit in 1000, the fourth does not.
    let results = burst(
        &gw,
        4,
        INITECH,
        &small_chat("gpt-4.1-mini", 300),
        &[("x-mock-latency-ms", "300")],
    )
    .await;
    assert_eq!(
        count(&results, 200),
        3,
        "{:?}",
        results
            .iter()
            .map(|r| (r.0, r.2.clone()))
            .collect::<Vec<_>>()
    );
    let refused = results.iter().find(|r| r.0 == 429).unwrap();
    assert_eq!(refused.2["error"]["type"], "tokens");
    assert_eq!(
        gw.mocks.openai.requests().len(),
        3,
        "the refused reservation never reached upstream"
    );

    // After settlement, the bucket holds capacity minus real usage (plus refill meanwhile).
    // Settlement runs at stream end, just after the client has its response: wait for it.
    assert_eq!(gw.access_log(5).await.len(), 5);
    let start = Instant::now();
    let used: u64 = gw
        .mocks
        .openai
        .requests()
        .iter()
        .map(|r| r.usage.clone().unwrap())
        .map(|u| u.input_tokens + u.cached_tokens + u.output_tokens)
        .sum();
    let probe = small_chat("gpt-4.1-mini", 10);
    let resp = gw.post("/v1/chat/completions", INITECH, probe).await;
    assert_eq!(resp.status(), 200);
    let remaining: u64 = resp.headers()["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let prompt = gw
        .mocks
        .openai
        .requests()
        .last()
        .unwrap()
        .usage
        .clone()
        .unwrap()
        .input_tokens;
    let expected = 1000 - used - (prompt + 10);
    // Refill is 1000 tokens/min: at most ~17 per second elapsed since the first request.
    let slack = 1 + (start.elapsed().as_millis() as u64 + 2000) * 1000 / 60_000;
    assert!(
        remaining >= expected && remaining <= expected + slack,
        "remaining {remaining}, expected {expected} (+{slack} refill)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_exact_and_aborted_streams_release_everything() {
    const MONTHLY: u64 = 1_000_000;
    let gw = Gateway::start_with(four_workers(Some(Box::new(|v| {
        // globex: 4 in flight (the demo's silver); a monthly token quota has no refill,
        // so it shows exactly what is still reserved.
        v["tiers"]["silver"]["limits"]["monthly_tokens"] = MONTHLY.into();
        v["tiers"]["silver"]["limits"]["requests_per_minute"] = 100_000.into();
        v["tiers"]["silver"]["limits"]["tokens_per_minute"] = 100_000_000.into();
        // The probe below reserves nearly the whole quota as output: no model cap here.
        for model in v["models"].as_array_mut().unwrap() {
            model.as_object_mut().unwrap().remove("max_output_tokens");
        }
    }))))
    .await;

    // With a slow provider, exactly 4 of 10 run at once.
    let results = burst(
        &gw,
        10,
        GLOBEX,
        &small_chat("gpt-4.1", 16),
        &[("x-mock-latency-ms", "1500")],
    )
    .await;
    assert_eq!(
        count(&results, 200),
        4,
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let refused = results.iter().find(|r| r.0 == 429).unwrap();
    assert!(
        refused.2["error"]["message"]
            .as_str()
            .unwrap()
            .contains("concurrent"),
        "{}",
        refused.2
    );
    assert_eq!(refused.1["x-sluice-reason"], "concurrent_requests");

    // 200 streams aborted by the client mid-way, 4 at a time.
    let stream_body = json!({"model": "gpt-4.1", "max_tokens": 64, "stream": true,
                             "messages": [{"role": "user", "content": "abort me"}]});
    for wave in 0..50 {
        // Envoy runs on_log (which frees the slot) just after the client goes away; the
        // record is written after settlement, so wait for the previous wave's records.
        assert_eq!(gw.access_log(10 + 4 * wave).await.len(), 10 + 4 * wave);
        let calls = (0..4).map(|_| {
            let req = gw
                .client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(GLOBEX)
                .header("x-mock-chunks", "10")
                .header("x-mock-chunk-delay-ms", "100")
                .json(&stream_body);
            async move {
                let resp = req.send().await.unwrap();
                assert_eq!(resp.status(), 200, "a leaked slot would refuse this");
                let mut stream = resp.bytes_stream();
                stream.next().await.unwrap().unwrap();
            }
        });
        join_all(calls).await;
    }
    let records = gw.access_log(10 + 200).await;
    let aborted = records
        .iter()
        .filter(|r| r["sluice"]["outcome"] == "aborted")
        .count();
    assert_eq!(aborted, 200, "every abort was seen and settled");

    // Zero slots held: 4 slow requests are admitted at once again, a 5th is not.
    let results = burst(
        &gw,
        5,
        GLOBEX,
        &small_chat("gpt-4.1", 16),
        &[("x-mock-latency-ms", "800")],
    )
    .await;
    assert_eq!(count(&results, 200), 4);
    assert_eq!(count(&results, 429), 1);

    // Zero reservations held: the monthly counter equals the sum of settled usage exactly,
    // so a request reserving exactly what is left is admitted and one more token is not.
    let records = gw.access_log(10 + 200 + 5).await;
    let used: u64 = records
        .iter()
        .map(|r| &r["sluice"])
        .filter(|r| r["tenant"] == "globex")
        .map(|r| {
            [
                "input_tokens",
                "cached_input_tokens",
                "cache_creation_tokens",
                "output_tokens",
            ]
            .iter()
            .map(|f| r[*f].as_u64().unwrap())
            .sum::<u64>()
        })
        .sum();
    let probe_prompt = records
        .iter()
        .find(|r| r["sluice"]["tenant"] == "globex" && r["sluice"]["outcome"] == "success")
        .map(|r| r["sluice"]["input_tokens"].as_u64().unwrap())
        .unwrap();
    let left = MONTHLY - used;
    let too_much = small_chat("gpt-4.1", left - probe_prompt + 1);
    let resp = gw.post("/v1/chat/completions", GLOBEX, too_much).await;
    assert_eq!(
        resp.status(),
        429,
        "reserving one token more than is left must fail"
    );
    assert_eq!(resp.headers()["x-sluice-reason"], "monthly_tokens");
    let exact = small_chat("gpt-4.1", left - probe_prompt);
    let resp = gw.post("/v1/chat/completions", GLOBEX, exact).await;
    assert_eq!(
        resp.status(),
        200,
        "reserving exactly what is left must succeed: a reservation leaked"
    );
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_budget_is_never_overspent_under_concurrency() {
    const BUDGET_MICRO_USD: u64 = 10_000;
    let gw = Gateway::start_with(four_workers(Some(Box::new(|v| {
        v["tiers"]["gold"]["limits"]["monthly_budget_usd"] = json!(BUDGET_MICRO_USD as f64 / 1e6);
    }))))
    .await;
    let body = small_chat("gpt-4.1", 50);
    let mut sent = 0;
    let mut quota_refusals = Vec::new();
    // Waves of 50 concurrent requests until a whole wave is refused.
    for _ in 0..30 {
        // Let the previous wave settle (refunds land at stream end) before the next.
        assert_eq!(gw.access_log(sent).await.len(), sent);
        let results = burst(&gw, 50, ACME, &body, &[("x-mock-latency-ms", "100")]).await;
        sent += results.len();
        let admitted_now = count(&results, 200);
        quota_refusals.extend(results.into_iter().filter(|r| r.0 == 429));
        if admitted_now == 0 {
            break;
        }
    }
    let records = gw.access_log(sent).await;
    let spent: u64 = records
        .iter()
        .map(|r| r["sluice"]["cost_micro_usd"].as_u64().unwrap())
        .sum();
    let admitted = records
        .iter()
        .filter(|r| r["sluice"]["outcome"] == "success")
        .count();
    assert!(admitted > 0);
    assert!(
        spent <= BUDGET_MICRO_USD,
        "spent {spent} of {BUDGET_MICRO_USD}: overshoot"
    );
    // The budget was used up to less than one reservation (prompt at $2/M + 50 output at $8/M).
    let prompt = records
        .iter()
        .find(|r| r["sluice"]["outcome"] == "success")
        .map(|r| r["sluice"]["input_tokens"].as_u64().unwrap())
        .unwrap();
    let reservation = prompt * 2 + 50 * 8;
    assert!(
        BUDGET_MICRO_USD - spent < reservation,
        "budget left unused: spent {spent}, reservation {reservation}"
    );
    let (_, headers, body) = quota_refusals.last().unwrap();
    assert_eq!(body["error"]["code"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(headers["x-should-retry"], "false");
    assert!(
        headers.get("retry-after").is_none(),
        "no retry hint for an exhausted quota"
    );
    assert_eq!(gw.mocks.openai.requests().len(), admitted);

    // Anthropic clients get Anthropic's billing error.
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet", "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 402);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "billing_error", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_does_not_change_another_tenants_admissions() {
    let gw = Gateway::start_with(four_workers(None)).await;
    // The contention counter exists from configure (each worker defines it at 0).
    let cas_retries = |prometheus: &str| -> Option<u64> {
        prometheus
            .lines()
            .find_map(|l| l.strip_prefix("sluice_shared_data_cas_retries_total{} "))
            .and_then(|v| v.trim().parse().ok())
    };
    assert_eq!(cas_retries(&gw.prometheus().await), Some(0));
    let body = small_chat("gpt-4.1-mini", 16);
    let flood = burst(&gw, 200, INITECH, &body, &[]);
    let steady = async {
        let mut ok = 0;
        for _ in 0..30 {
            let resp = gw
                .post(
                    "/v1/chat/completions",
                    GLOBEX,
                    small_chat("gpt-4.1-mini", 16),
                )
                .await;
            if resp.status() == 200 {
                ok += 1;
            }
        }
        ok
    };
    let (flood, steady_ok) = tokio::join!(flood, steady);
    assert_eq!(count(&flood, 200), 10, "the flooder gets exactly its limit");
    assert_eq!(count(&flood, 429), 190);
    assert_eq!(steady_ok, 30, "the other tenant is unaffected");
    // Four workers racing on one tenant's keys may lose compare-and-sets; each is counted
    // (how many depends on the scheduling), and exactness above held regardless.
    let after = cas_retries(&gw.prometheus().await);
    assert!(after.is_some(), "the counter is still exported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_listener_update_that_keeps_the_vm_id() {
    let gw = Gateway::start_with(GatewayOptions {
        concurrency: 4,
        lds: true,
        ..GatewayOptions::default()
    })
    .await;
    let body = small_chat("gpt-4.1-mini", 16);
    let results = burst(&gw, 12, INITECH, &body, &[]).await;
    assert_eq!(count(&results, 200), 10);

    // A new listener config: a new route header and a changed Sluice configuration
    // (one more key for acme), same vm_id.
    let extra_digest = sluice::auth::sha256_hex("sk-sluice-reload-extra");
    gw.update_listener(|lds| {
        let line = lds.lines().find(|l| l.contains("request_headers_to_remove")).unwrap().to_string();
        let indent = &line[..line.len() - line.trim_start().len()];
        let added = format!("{line}\n{indent}response_headers_to_add: [{{header: {{key: x-config-generation, value: \"2\"}}}}]");
        let acme_keys = "\"keys\": [{\"id\": \"demo\", \"sha256\": \"ecf418320958352dfde3e29301f62e14f955852f23d65670923b88f7e38c45bd\"}]";
        assert!(lds.contains(acme_keys));
        lds.replace(&line, &added).replace(
            acme_keys,
            &format!(
                "\"keys\": [{{\"id\": \"demo\", \"sha256\": \"ecf418320958352dfde3e29301f62e14f955852f23d65670923b88f7e38c45bd\"}}, {{\"id\": \"extra\", \"sha256\": \"{extra_digest}\"}}]"
            ),
        )
    })
    .await;

    // Existing keep-alive connections drain on the old listener: use new connections.
    let fresh = reqwest::Client::new();
    let post = |key: &'static str, body: Value| {
        fresh
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&body)
            .send()
    };
    // The new configuration serves: the new key works and responses carry the new header.
    let resp = post("sk-sluice-reload-extra", small_chat("gpt-4.1", 16))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-config-generation"], "2");
    // And initech's bucket is still empty: the counters survived.
    let resp = post(INITECH, body).await.unwrap();
    assert_eq!(
        resp.status(),
        429,
        "the reload reset initech's request bucket"
    );
    assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(resp.headers()["x-config-generation"], "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_reads_its_own_usage_in_local_mode() {
    let gw = Gateway::start().await;
    let body = small_chat("gpt-4.1-mini", 16);
    for _ in 0..2 {
        assert_eq!(gw.chat_with(INITECH, &body, &[]).await.0, 200);
    }
    let cost: u64 = gw
        .access_log(2)
        .await
        .iter()
        .map(|r| r["sluice"]["cost_micro_usd"].as_u64().unwrap())
        .sum();
    let report = usage_report(&gw, INITECH).await;
    assert_eq!(report["object"], "sluice.usage");
    assert_eq!(report["tenant"], "initech", "{report}");
    let rpm = limit_line(&report, "requests_per_minute");
    assert_eq!(rpm["engine"], "local");
    assert_eq!(
        (rpm["limit"].as_u64(), rpm["remaining"].as_u64()),
        (Some(10), Some(8)),
        "{rpm}"
    );
    let budget = limit_line(&report, "monthly_budget_usd");
    assert_eq!(budget["unit"], "usd");
    assert_eq!(budget["used"], json!(cost as f64 / 1e6), "{budget}");
    // Another tenant sees only its own: acme's report has no trace of initech's use.
    let acme = usage_report(&gw, ACME).await;
    assert_eq!(acme["tenant"], "acme");
    let acme_rpm = limit_line(&acme, "requests_per_minute");
    assert_eq!(acme_rpm["remaining"], acme_rpm["limit"], "{acme}");
    // Without a key: 401, as every endpoint.
    let anonymous = gw
        .client
        .get(gw.url("/v1/sluice/usage"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}
