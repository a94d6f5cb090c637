//! The response cache, end to end: real Envoy (2 workers), the real wasm, the mocks, and
//! for the global store a real Redis and the real quota service shared by two Envoys.
//! The demo configuration caches tenant acme's (gold tier) gpt-4.1 family.

use crate::global::{two_gateways, GlobalOptions};
use crate::harness::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::time::Duration;

/// A deterministic request (temperature 0): cacheable under the demo's rule.
fn ask(text: &str) -> Value {
    json!({"model": "gpt-4.1", "temperature": 0, "max_tokens": 16,
           "messages": [{"role": "user", "content": text}]})
}

/// POSTs to the chat endpoint; status, the `x-sluice-cache` header and the raw body.
async fn send(
    gw: &Gateway,
    key: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> (u16, String, Vec<u8>) {
    let (status, headers, bytes) = gw.chat_bytes(key, body, extra).await;
    let cache = headers
        .get("x-sluice-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, cache, bytes)
}

fn upstream(gw: &Gateway) -> usize {
    gw.mocks.openai.requests().len()
}

fn caching_tier(name: &'static str, cache: Value) -> ConfigEdit {
    Box::new(move |cfg: &mut Value| {
        cfg["tiers"][name]["cache"] = cache;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_then_hit_and_the_clients_bypass_and_refresh() {
    let gw = Gateway::start().await;
    let body = ask("what is a cache?");
    let (status, cache, first) = send(&gw, ACME, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    let (status, cache, second) = send(&gw, ACME, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "hit"));
    assert_eq!(second, first, "the provider's answer, as it was");
    assert_eq!(upstream(&gw), 1, "a hit never reaches the provider");

    let (_, cache, _) = send(&gw, ACME, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(cache, "bypass");
    assert_eq!(upstream(&gw), 2);
    let (_, cache, refreshed) = send(&gw, ACME, &body, &[("cache-control", "no-cache")]).await;
    assert_eq!(cache, "miss", "a refresh is fetched");
    assert_eq!(upstream(&gw), 3);
    let (_, cache, after) = send(&gw, ACME, &body, &[]).await;
    assert_eq!(
        (cache.as_str(), &after),
        ("hit", &refreshed),
        "and replaces the entry"
    );
    assert_ne!(refreshed, first);
    // Sampled (no temperature: the default, 1) is not cached.
    let (_, cache, _) = send(&gw, ACME, &chat("gpt-4.1", "what is a cache?"), &[]).await;
    assert_eq!(cache, "bypass");
    // A model outside the rule: no cache at all.
    let mut mini = body.clone();
    mini["model"] = json!("claude-sonnet-4.5");
    let (status, cache, _) = send(&gw, ACME, &mini, &[]).await;
    assert_eq!((status, cache.as_str()), (200, ""));

    let records = gw.access_log(7).await;
    let caches: Vec<&Value> = records.iter().map(|r| &r["sluice"]["cache"]).collect();
    assert_eq!(
        caches,
        [
            json!("miss"),
            json!("hit"),
            json!("bypass"),
            json!("miss"),
            json!("hit"),
            json!("bypass"),
            Value::Null
        ]
        .iter()
        .collect::<Vec<_>>()
    );
    let hit = &records[1]["sluice"];
    assert_eq!(hit["outcome"], "success");
    assert_eq!(hit["cost_micro_usd"], 0, "hit_price 0: free");
    assert!(
        hit["output_tokens"].as_u64().unwrap() > 0,
        "the tokens it served"
    );
    let prometheus = gw.prometheus().await;
    for (outcome, n) in [("hit", 2), ("miss", 2), ("bypass", 2)] {
        let line = format!(
            "sluice_cache_requests_total{{tenant=\"acme\",model=\"gpt-4.1\",cache=\"{outcome}\"}} {n}"
        );
        assert!(prometheus.contains(&line), "{line} in:\n{prometheus}");
    }
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_sending_the_same_body_never_share_an_entry() {
    let gw = Gateway::start_with(GatewayOptions {
        plugin_config: Some(caching_tier("silver", json!({"models": ["gpt-4.1*"]}))),
        ..GatewayOptions::default()
    })
    .await;
    let body = ask("the same words");
    let (_, acme_cache, acme_first) = send(&gw, ACME, &body, &[]).await;
    let (_, globex_cache, globex_first) = send(&gw, GLOBEX, &body, &[]).await;
    assert_eq!(
        (acme_cache.as_str(), globex_cache.as_str()),
        ("miss", "miss")
    );
    assert_ne!(acme_first, globex_first, "each got its own provider answer");
    let (_, cache, acme_again) = send(&gw, ACME, &body, &[]).await;
    assert_eq!((cache.as_str(), &acme_again), ("hit", &acme_first));
    let (_, cache, globex_again) = send(&gw, GLOBEX, &body, &[]).await;
    assert_eq!((cache.as_str(), &globex_again), ("hit", &globex_first));
    assert_eq!(upstream(&gw), 2);
}

/// Sends a streamed chat request and returns its raw SSE bytes and cache header.
async fn stream(gw: &Gateway, body: &Value, extra: &[(&str, &str)]) -> (String, String) {
    let (status, cache, bytes) = send(gw, ACME, body, extra).await;
    assert_eq!(status, 200);
    (cache, String::from_utf8(bytes).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_replayed_byte_for_byte_with_the_clients_usage_choice() {
    let gw = Gateway::start().await;
    let mut body = ask("stream it");
    body["stream"] = json!(true);
    let chunks = [("x-mock-chunks", "5"), ("x-mock-chunk-delay-ms", "5")];
    let (cache, original) = stream(&gw, &body, &chunks).await;
    assert_eq!(cache, "miss");
    assert!(original.ends_with("data: [DONE]\n\n"), "{original}");
    // The usage-only chunk (`"choices":[]`) the gateway asked for was stripped.
    assert!(
        !original.contains("\"choices\":[]"),
        "the client did not ask for usage"
    );
    let (cache, replay) = stream(&gw, &body, &chunks).await;
    assert_eq!(cache, "hit");
    assert_eq!(replay, original, "byte for byte");

    let mut with_usage = body.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let (cache, replay) = stream(&gw, &with_usage, &chunks).await;
    assert_eq!(
        cache, "hit",
        "same entry: include_usage only changes the replay"
    );
    assert!(replay.contains("\"choices\":[]"), "{replay}");
    let without: String = replay
        .split_inclusive("\n\n")
        .filter(|event| !event.contains("\"choices\":[]"))
        .collect();
    assert_eq!(without, original, "the original plus the usage chunk");
    assert_eq!(upstream(&gw), 1);
    let records = gw.access_log(3).await;
    assert!(records.iter().all(|r| r["sluice"]["estimated"] == false));
    assert_eq!(
        records[1]["sluice"]["output_tokens"],
        records[0]["sluice"]["output_tokens"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_their_ttl() {
    let gw = Gateway::start_with(GatewayOptions {
        plugin_config: Some(caching_tier(
            "gold",
            json!({"models": ["gpt-4.1*"], "ttl_s": 1}),
        )),
        ..GatewayOptions::default()
    })
    .await;
    let body = ask("short-lived");
    assert_eq!(send(&gw, ACME, &body, &[]).await.1, "miss");
    assert_eq!(send(&gw, ACME, &body, &[]).await.1, "hit");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(send(&gw, ACME, &body, &[]).await.1, "miss");
    assert_eq!(upstream(&gw), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_truncated_streams_are_never_cached() {
    let gw = Gateway::start().await;
    let body = ask("fragile");
    let (status, cache, _) = send(&gw, ACME, &body, &[("x-mock-fault", "500")]).await;
    assert_eq!((status, cache.as_str()), (500, "miss"));
    let (status, cache, _) = send(&gw, ACME, &body, &[("x-mock-fault", "429")]).await;
    assert_eq!((status, cache.as_str()), (429, "miss"));
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-mock-fault", "reset")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // The relay ends the broken stream with an error event: complete, but not storable.
    let text = resp
        .bytes()
        .await
        .expect("the relay ends the stream cleanly");
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("\"upstream_failed\""), "{text}");
    let (status, cache, _) = send(&gw, ACME, &streamed, &[("x-mock-body", "truncate")]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    // Every one of them went upstream, and none left an entry behind.
    assert_eq!(send(&gw, ACME, &body, &[]).await.1, "miss");
    assert_eq!(send(&gw, ACME, &streamed, &[]).await.1, "miss");
    assert_eq!(upstream(&gw), 6);
    assert_eq!(send(&gw, ACME, &streamed, &[]).await.1, "hit");
    gw.assert_vm_healthy().await;
}

fn roomy_gold() -> ConfigEdit {
    Box::new(|cfg: &mut Value| {
        cfg["tiers"]["gold"]["limits"]["concurrent_requests"] = json!(1000);
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_identical_requests_make_one_upstream_request() {
    let gw = Gateway::start_with(GatewayOptions {
        plugin_config: Some(roomy_gold()),
        ..GatewayOptions::default()
    })
    .await;
    let body = ask("everyone at once");
    // The provider takes 800 ms: every request arrives while the first is fetching.
    let slow = [("x-mock-latency-ms", "800")];
    let results = join_all((0..200).map(|_| send(&gw, ACME, &body, &slow))).await;
    assert_eq!(upstream(&gw), 1, "single flight");
    assert!(
        results.iter().all(|r| r.0 == 200),
        "{:?}",
        results.iter().map(|r| r.0).collect::<Vec<_>>()
    );
    let first = &results[0].2;
    assert!(
        results.iter().all(|r| &r.2 == first),
        "200 identical answers"
    );
    let misses = results.iter().filter(|r| r.1 == "miss").count();
    let hits = results.iter().filter(|r| r.1 == "hit").count();
    assert_eq!((misses, hits), (1, 199));
    let records = gw.access_log(200).await;
    assert_eq!(
        records
            .iter()
            .filter(|r| r["sluice"]["cache"] == "hit")
            .count(),
        199
    );
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_goes_upstream_itself_when_its_wait_runs_out() {
    let edit: ConfigEdit = Box::new(|cfg: &mut Value| {
        cfg["tiers"]["gold"]["cache"] = json!({"models": ["gpt-4.1*"], "wait_ms": 200});
    });
    let gw = Gateway::start_with(GatewayOptions {
        plugin_config: Some(edit),
        ..GatewayOptions::default()
    })
    .await;
    let body = ask("slow provider");
    let slow = [("x-mock-latency-ms", "1500")];
    let first = send(&gw, ACME, &body, &slow);
    let second = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let result = send(&gw, ACME, &body, &[("x-mock-latency-ms", "0")]).await;
        (result, started.elapsed())
    };
    let (first, (second, waited)) = tokio::join!(first, second);
    assert_eq!((first.0, first.1.as_str()), (200, "miss"));
    assert_eq!(
        (second.0, second.1.as_str()),
        (200, "miss"),
        "it fetched for itself"
    );
    assert!(
        waited < Duration::from_millis(1_200),
        "bounded wait: {waited:?}"
    );
    assert_eq!(upstream(&gw), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cache_is_shared_by_two_envoys() {
    let (_redis, quota, a, b) = two_gateways(&GlobalOptions::default()).await;
    // The global-limits counters exist from configure, before any event (alerts see the
    // first one as an increase).
    let prometheus = a.prometheus().await;
    for name in [
        "sluice_global_settlements_lost_total",
        "sluice_global_fallbacks_total",
    ] {
        assert!(
            prometheus.contains(&format!("\n{name}{{}} 0")),
            "{name} in:\n{prometheus}"
        );
    }
    let body = ask("one cache for all replicas");
    let (status, cache, first) = send(&a, ACME, &body, &[]).await;
    assert_eq!((status, cache.as_str()), (200, "miss"));
    // The store is sent from a's tick, after the response.
    let mut answer = (0, String::new(), Vec::new());
    for _ in 0..50 {
        answer = send(&b, ACME, &body, &[]).await;
        if answer.1 == "hit" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        (answer.0, answer.1.as_str()),
        (200, "hit"),
        "b reads a's entry"
    );
    assert_eq!(answer.2, first);
    let fetched = upstream(&a) + upstream(&b);

    // Single flight across both: 40 identical requests split over the two Envoys.
    let body = ask("both replicas at once");
    let slow = [("x-mock-latency-ms", "800")];
    let calls = (0..40).map(|i| send(if i % 2 == 0 { &a } else { &b }, ACME, &body, &slow));
    let results = join_all(calls).await;
    assert!(results.iter().all(|r| r.0 == 200));
    assert_eq!(
        upstream(&a) + upstream(&b) - fetched,
        1,
        "one fetch for both Envoys"
    );
    assert!(results.iter().all(|r| r.2 == results[0].2));
    assert_eq!(results.iter().filter(|r| r.1 == "hit").count(), 39);
    drop(quota);
    a.assert_vm_healthy().await;
    b.assert_vm_healthy().await;
}
