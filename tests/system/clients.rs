//! What clients do that the gateway must cope with, on the demo configuration as shipped:
//! gzip-compressed request bodies (Envoy's decompressor inflates them before Sluice, gzip
//! bombs included), and one tenant flooding a provider while a gold tenant keeps sending
//! (what `make demo-flood` shows).

use crate::harness::*;
use flate2::{write::GzEncoder, Compression};
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::io::Write;
use std::time::{Duration, Instant};

/// The demo's batch-tier tenant (`envoy/demo.yaml`), the one `make demo-flood` floods with.
const TYRELL: &str = "sk-sluice-demo-tyrell";

/// The decompressor's statistic (its stat prefix is the listener's `sluice`).
const INFLATED: &str = "http.sluice.decompressor.gzip.gzip.request.total_uncompressed_bytes";

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn http2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
}

/// POSTs a gzip-compressed body: (status, headers, JSON body or null).
async fn post_gzip(
    client: &reqwest::Client,
    gw: &Gateway,
    path: &str,
    auth: (&str, &str),
    compressed: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let resp = client
        .post(gw.url(path))
        .header(auth.0, auth.1)
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// A counter from the admin `/stats` page (0 if absent).
async fn stat(gw: &Gateway, name: &str) -> u64 {
    let stats = gw.admin_get(&format!("/stats?filter={name}")).await;
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_request_bodies_reach_the_provider_inflated() {
    let gw = Gateway::start().await;
    let h2 = http2_client();
    let bearer = format!("Bearer {ACME}");

    // OpenAI chat over HTTP/1.1 and HTTP/2: the model needs no rewrite, so the provider
    // gets the client's JSON byte for byte, inflated.
    for (label, client) in [("HTTP/1.1", &gw.client), ("HTTP/2", &h2)] {
        let json = format!(
            r#"{{"model":"gpt-4.1-mini","messages":[{{"role":"user","content":"gzip over {label}"}}]}}"#
        );
        let before = gw.mocks.openai.requests().len();
        let (status, _, body) = post_gzip(
            client,
            &gw,
            "/v1/chat/completions",
            ("authorization", &bearer),
            gzip(json.as_bytes()),
        )
        .await;
        assert_eq!(status, 200, "{label}: {body}");
        assert_eq!(body["object"], "chat.completion", "{label}: {body}");
        let reqs = gw.mocks.openai.requests();
        assert_eq!(reqs.len(), before + 1, "{label}");
        let got = &reqs[before];
        assert_eq!(
            got.body, json,
            "{label}: the provider got the inflated JSON"
        );
        assert_eq!(got.header("content-encoding"), None, "{label}");
        // The decompressor drops the compressed length: the upstream request is chunked,
        // or carries the inflated length.
        let length = got.header("content-length");
        assert!(
            length.is_none() || length == Some(json.len().to_string().as_str()),
            "{label}: content-length {length:?}"
        );
        for (name, _) in &got.headers {
            assert!(
                !name.starts_with("x-envoy-"),
                "{label}: {name} reached the provider"
            );
        }
    }

    // A model Sluice rewrites (deepseek-v3.2 -> deepseek-chat): Sluice sets the new length.
    let json = r#"{"model":"deepseek-v3.2","messages":[{"role":"user","content":"rewritten"}]}"#;
    let (status, _, body) = post_gzip(
        &gw.client,
        &gw,
        "/v1/chat/completions",
        ("authorization", &bearer),
        gzip(json.as_bytes()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = gw.mocks.deepseek.requests().pop().unwrap();
    let sent: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(sent["model"], "deepseek-chat");
    assert_eq!(
        got.header("content-length"),
        Some(got.body.len().to_string().as_str())
    );
    assert_eq!(got.header("content-encoding"), None);

    // Anthropic Messages, streaming: Sluice meters the inflated request like any other.
    let json = json!({"model": "claude-sonnet", "max_tokens": 32, "stream": true,
                      "messages": [{"role": "user", "content": "gzip stream"}]});
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .header("content-encoding", "gzip")
        .body(gzip(json.to_string().as_bytes()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: message_stop"), "{text}");
    let got = gw.mocks.anthropic.requests().pop().unwrap();
    let sent: Value = serde_json::from_str(&got.body).unwrap();
    assert_eq!(sent["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(got.header("content-encoding"), None);

    // Each one has its usage record, metered from the inflated request.
    let records = gw.access_log(4).await;
    assert_eq!(records.len(), 4);
    for r in &records {
        assert_eq!(r["sluice"]["outcome"], "success", "{r}");
        assert!(r["sluice"]["input_tokens"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(
        stat(&gw, INFLATED).await > 0,
        "the decompressor did the work"
    );
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_gets_413_and_is_never_fully_inflated() {
    let gw = Gateway::start().await;
    let h2 = http2_client();
    let bearer = format!("Bearer {ACME}");
    let bomb_json = |size: usize| {
        let mut json =
            br#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":""#.to_vec();
        json.resize(json.len() + size, b'a');
        json.extend_from_slice(br#""}]}"#);
        json
    };
    // 50 MB of JSON in about 50 KB: 50 times max_body_bytes (1 MiB).
    let bomb = gzip(&bomb_json(50_000_000));
    assert!(bomb.len() < 100_000, "{}", bomb.len());

    for (label, client) in [("HTTP/1.1", &gw.client), ("HTTP/2", &h2)] {
        let before = stat(&gw, INFLATED).await;
        let (status, _, body) = post_gzip(
            client,
            &gw,
            "/v1/chat/completions",
            ("authorization", &bearer),
            bomb.clone(),
        )
        .await;
        assert_eq!(status, 413, "{label}: {body}");
        assert_eq!(
            body["error"]["code"], "request_too_large",
            "{label}: {body}"
        );
        assert_eq!(
            body["error"]["type"], "invalid_request_error",
            "{label}: {body}"
        );
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1048576 bytes"),
            "{label}: {body}"
        );
        // Envoy stopped inflating when Sluice answered: at most a few reads' worth
        // (max_inflate_ratio 100 x 64 KiB per read), far from the bomb's 50 MB.
        let inflated = stat(&gw, INFLATED).await - before;
        assert!(
            (1_048_576..20_000_000).contains(&inflated),
            "{label}: inflated {inflated} bytes"
        );
    }

    // A smaller bomb (3 MB in 3 KB) inflates more than 100-fold in one read: the
    // decompressor cuts it short, and Sluice refuses what is left as JSON cut short.
    let small = gzip(&bomb_json(3_000_000));
    assert!(small.len() < 5_000, "{}", small.len());
    let (status, _, body) = post_gzip(
        &gw.client,
        &gw,
        "/v1/chat/completions",
        ("authorization", &bearer),
        small,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    // A bad key: 401 at the headers, before Envoy inflates any of the body.
    let before = stat(&gw, INFLATED).await;
    let (status, _, body) = post_gzip(
        &gw.client,
        &gw,
        "/v1/chat/completions",
        ("authorization", "Bearer sk-not-a-tenant"),
        bomb,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        stat(&gw, INFLATED).await,
        before,
        "a bad key's body was inflated"
    );

    assert!(gw.mocks.all().is_empty(), "no provider sees a bomb");
    gw.assert_vm_healthy().await;
}

/// The flood that `make demo-flood` runs, bounded: tyrell (batch tier, priority 0, at most
/// 20 waiting) sends 40 slow requests at once to openai (max_in_flight 8 in the demo), and
/// acme (gold, priority 3) sends 10 while they queue. Acme jumps the queue: it waits at most
/// for one slot to free (one flood request's service time), while tyrell's queue drains
/// wave after wave and its requests beyond the 20 waiting are refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_tenant_queues_while_gold_waits_at_most_one_service_time() {
    const SERVICE_MS: u64 = 400;
    const FLOOD: usize = 40;
    let gw = Gateway::start().await;
    let send = |key: &'static str, latency: u64, text: String| {
        gw.client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-mock-latency-ms", latency.to_string())
            .json(&json!({"model": "gpt-4.1-mini", "max_tokens": 8,
                          "messages": [{"role": "user", "content": text}]}))
            .send()
    };
    let flood = join_all((0..FLOOD).map(|i| send(TYRELL, SERVICE_MS, format!("flood {i}"))));
    let gold = async {
        // Once the flood holds every slot, acme sends one request every 100 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while gw.mocks.openai.requests().len() < 8 {
            assert!(
                Instant::now() < deadline,
                "the flood never filled the provider"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut ticker = tokio::time::interval(Duration::from_millis(100));
        let mut sent = Vec::new();
        for i in 0..10 {
            ticker.tick().await;
            sent.push(tokio::spawn(send(ACME, 0, format!("gold {i}"))));
        }
        let mut statuses = Vec::new();
        for s in sent {
            statuses.push(s.await.unwrap().unwrap().status().as_u16());
        }
        statuses
    };
    let (flood, gold) = tokio::join!(flood, gold);
    assert!(gold.iter().all(|s| *s == 200), "gold: {gold:?}");
    let flood: Vec<u16> = flood
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();

    let records = gw.access_log(FLOOD + 10).await;
    let of = |tenant: &str| -> Vec<&Value> {
        records
            .iter()
            .map(|r| &r["sluice"])
            .filter(|r| r["tenant"] == tenant)
            .collect()
    };
    // queue_wait_ms is null for a request that found a free slot at once.
    let waits = |rs: &[&Value]| -> Vec<u64> {
        rs.iter()
            .filter(|r| r["outcome"] == "success")
            .map(|r| r["queue_wait_ms"].as_u64().unwrap_or(0))
            .collect()
    };
    let (acme, tyrell) = (of("acme"), of("tyrell"));
    let (acme_waits, tyrell_waits) = (waits(&acme), waits(&tyrell));
    let summary =
        format!("acme waits {acme_waits:?}; tyrell statuses {flood:?}, waits {tyrell_waits:?}");
    println!("{summary}");
    assert_eq!(acme.len(), 10, "{summary}");
    assert_eq!(acme_waits.len(), 10, "every gold request served: {summary}");
    // Gold waited, but never longer than one flood request's service time (plus the 10 ms
    // queue tick and a loaded machine's scheduling).
    let acme_max = *acme_waits.iter().max().unwrap();
    assert!(acme_max <= SERVICE_MS + 250, "{summary}");
    // The flooder queued wave after wave: its longest wait spans at least two services.
    let tyrell_max = *tyrell_waits.iter().max().unwrap();
    assert!(tyrell_max >= 2 * SERVICE_MS - 100, "{summary}");
    assert!(tyrell_max > acme_max, "{summary}");
    // Beyond its 20 waiting requests, the flooder is refused at once (429 queue_full).
    let served = flood.iter().filter(|s| **s == 200).count();
    let queue_full = tyrell
        .iter()
        .filter(|r| r["outcome"] == "rejected" && r["reason"] == "queue_full")
        .count();
    assert!(queue_full >= 1, "{summary}");
    assert_eq!(
        flood.iter().filter(|s| **s == 429).count(),
        queue_full,
        "{summary}"
    );
    assert_eq!(
        served + queue_full,
        FLOOD,
        "no queue timeout here: {summary}"
    );
    assert!(served >= 8 + 20 - 2, "{summary}");

    assert_queues_empty(&gw).await;
    gw.assert_vm_healthy().await;
}
