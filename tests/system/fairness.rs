//! Fair queuing in real Envoy (2 workers) with a slow provider of capacity C = 4:
//! the seed scenario of one bronze tenant flooding at 10x capacity, steady gold and silver tenants and
//! two light bronze tenants. Set SLUICE_FAIRNESS_OUT=path.json to keep the raw run for
//! the report (`make fairness-report`).

use crate::harness::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CAPACITY: u64 = 4;
const SERVICE_MS: u64 = 200;
const RUN_MS: u64 = 8_000;
const HOOLI: &str = "sk-sluice-test-hooli";
const UMBRELLA: &str = "sk-sluice-test-umbrella";

#[derive(Clone, Debug, serde::Serialize)]
struct Sample {
    tenant: &'static str,
    sent_ms: u64,
    done_ms: u64,
    status: u16,
    request_id: Option<String>,
}

fn scenario_config(v: &mut Value) {
    v["providers"][0]["max_in_flight"] = CAPACITY.into();
    for (tier, priority, weight, wait) in [
        ("gold", 3, 4, 5000),
        ("silver", 2, 2, 5000),
        ("bronze", 1, 1, 1000),
    ] {
        v["tiers"][tier]["priority"] = priority.into();
        v["tiers"][tier]["weight"] = weight.into();
        v["tiers"][tier]["max_queue_wait_ms"] = wait.into();
        // Only the provider's capacity constrains this run.
        v["tiers"][tier]["limits"] = json!({});
    }
    v["tenants"][2]["max_queue_length"] = 16.into();
    let tenants = v["tenants"].as_array_mut().unwrap();
    for (id, key) in [("hooli", HOOLI), ("umbrella", UMBRELLA)] {
        tenants.push(json!({"id": id, "tier": "bronze", "keys": [{"id": "k", "sha256": sluice::auth::sha256_hex(key)}]}));
    }
}

async fn one(gw: &Gateway, tenant: &'static str, key: &str, start: Instant) -> Sample {
    let sent_ms = start.elapsed().as_millis() as u64;
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-mock-latency-ms", SERVICE_MS.to_string())
        .json(&json!({"model": "gpt-4.1-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "fair"}]}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().unwrap().to_string());
    let _ = resp.bytes().await;
    Sample {
        tenant,
        sent_ms,
        done_ms: start.elapsed().as_millis() as u64,
        status,
        request_id,
    }
}

/// The p-th percentile (nearest rank) of `v`; 0 for an empty list.
fn percentile(mut v: Vec<u64>, p: usize) -> u64 {
    v.sort_unstable();
    v.get((v.len() * p).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_scenario_shares_a_full_provider_fairly() {
    let gw = Arc::new(
        Gateway::start_with(GatewayOptions {
            concurrency: 2,
            plugin_config: Some(Box::new(scenario_config)),
            ..GatewayOptions::default()
        })
        .await,
    );
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    // Steady and light tenants send at fixed rates, whatever the answers.
    // The flooder offers 10x the provider's capacity (capacity = C / service time).
    let flood_every_ms = SERVICE_MS / (10 * CAPACITY);
    for (tenant, key, every_ms) in [
        ("initech", INITECH, flood_every_ms),
        ("acme", ACME, 250u64),
        ("globex", GLOBEX, 250),
        ("hooli", HOOLI, 500),
        ("umbrella", UMBRELLA, 500),
    ] {
        let (gw, samples) = (gw.clone(), samples.clone());
        tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(every_ms));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut inflight = Vec::new();
            while start.elapsed() < Duration::from_millis(RUN_MS) {
                ticker.tick().await;
                let (gw, samples) = (gw.clone(), samples.clone());
                inflight.push(tokio::spawn(async move {
                    let s = one(&gw, tenant, key, start).await;
                    samples.lock().unwrap().push(s);
                }));
            }
            for t in inflight {
                t.await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let samples = samples.lock().unwrap().clone();
    let records = gw.access_log(samples.len()).await;
    let waits: BTreeMap<String, u64> = records
        .iter()
        .filter_map(|r| {
            let id = r["sluice"]["request_id"].as_str()?;
            Some((
                id.to_string(),
                r["sluice"]["queue_wait_ms"].as_u64().unwrap_or(0),
            ))
        })
        .collect();

    let by_tenant = |t: &str| samples.iter().filter(|s| s.tenant == t).collect::<Vec<_>>();
    let ok = |v: &[&Sample]| v.iter().filter(|s| s.status == 200).count();
    let wait_of = |s: &Sample| {
        s.request_id
            .as_ref()
            .and_then(|id| waits.get(id))
            .copied()
            .unwrap_or(0)
    };
    let mut summary = BTreeMap::new();
    for t in ["acme", "globex", "initech", "hooli", "umbrella"] {
        let mine = by_tenant(t);
        let served: Vec<u64> = mine
            .iter()
            .filter(|s| s.status == 200)
            .map(|s| wait_of(s))
            .collect();
        summary.insert(
            t,
            json!({"sent": mine.len(), "served": ok(&mine),
                   "shed_429": mine.iter().filter(|s| s.status == 429).count(),
                   "shed_503": mine.iter().filter(|s| s.status == 503).count(),
                   "p50_wait_ms": percentile(served.clone(), 50),
                   "p99_wait_ms": percentile(served, 99)}),
        );
    }
    eprintln!(
        "fairness summary: {}",
        serde_json::to_string_pretty(&summary).unwrap()
    );
    if let Ok(out) = std::env::var("SLUICE_FAIRNESS_OUT") {
        let run = json!({"capacity": CAPACITY, "service_ms": SERVICE_MS, "run_ms": RUN_MS,
                         "weights": {"acme": 4, "globex": 2, "initech": 1, "hooli": 1, "umbrella": 1},
                         "tiers": {"acme": "gold", "globex": "silver", "initech": "bronze", "hooli": "bronze", "umbrella": "bronze"},
                         "summary": summary,
                         "samples": samples.iter().map(|s| json!({"tenant": s.tenant, "sent_ms": s.sent_ms, "done_ms": s.done_ms,
                                                                 "status": s.status, "queue_wait_ms": wait_of(s)})).collect::<Vec<_>>()});
        std::fs::write(out, serde_json::to_string_pretty(&run).unwrap()).unwrap();
    }

    // Gold: every request served, waiting at most about one service time.
    let gold = by_tenant("acme");
    assert_eq!(
        ok(&gold),
        gold.len(),
        "gold must never be shed: {summary:?}"
    );
    assert!(
        summary["acme"]["p99_wait_ms"].as_u64().unwrap() <= SERVICE_MS + 100,
        "{summary:?}"
    );
    // Silver: every request served, close to running alone.
    let silver = by_tenant("globex");
    assert_eq!(ok(&silver), silver.len(), "{summary:?}");
    assert!(
        summary["globex"]["p99_wait_ms"].as_u64().unwrap() <= 2 * SERVICE_MS + 100,
        "{summary:?}"
    );
    // Light bronze tenants ask for less than their fair share of what is left, so the
    // flooder must not starve them.
    for t in ["hooli", "umbrella"] {
        let mine = by_tenant(t);
        assert!(
            ok(&mine) * 10 >= mine.len() * 9,
            "{t} starved by the flooder: {summary:?}"
        );
    }
    // The flooder gets the leftover capacity and the rest is shed.
    let flood = by_tenant("initech");
    let served_total: usize = ["acme", "globex", "initech", "hooli", "umbrella"]
        .iter()
        .map(|t| ok(&by_tenant(t)))
        .sum();
    let max_possible = (RUN_MS + 2000) * CAPACITY / SERVICE_MS;
    assert!(
        served_total as u64 <= max_possible,
        "more served than the capacity allows: {served_total}"
    );
    assert!(
        ok(&flood) > 0,
        "work-conserving: the flooder gets the leftover"
    );
    assert!(
        flood.len() > ok(&flood) * 2,
        "most of the flood is shed: {summary:?}"
    );

    // Nothing leaks: after the run, nothing in flight and nothing queued.
    assert_queues_empty(&gw).await;
    let prom = gw.prometheus().await;
    assert!(prom.contains("sluice_queue_in_flight"), "{prom}");
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_the_queue_free_their_places() {
    let gw = Gateway::start_with(GatewayOptions {
        concurrency: 2,
        plugin_config: Some(Box::new(|v| {
            v["providers"][0]["max_in_flight"] = 1.into();
        })),
        ..GatewayOptions::default()
    })
    .await;
    let body = json!({"model": "gpt-4.1-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "q"}]});
    let send = |latency: u64| {
        gw.client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(ACME)
            .header("x-mock-latency-ms", latency.to_string())
            .json(&body)
            .send()
    };
    // One slow request holds the only slot; three more queue behind it and give up.
    let holder = send(3000);
    let quitters = async {
        // Let the holder take the slot first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let waits = (0..3).map(|_| tokio::time::timeout(Duration::from_millis(300), send(0)));
        for r in futures_util::future::join_all(waits).await {
            assert!(
                r.is_err(),
                "a queued request was served while the slot was held"
            );
        }
        // While the slot is still held, the shared queue must already be empty: the
        // departed clients' places were cancelled, not left for the head to skip.
        // (Workers refresh the gauges every second.)
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let prom = gw.prometheus().await;
        let gauge = |name: &str| {
            prom.lines()
                .filter(|l| l.starts_with(name))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
                .sum::<u64>()
        };
        assert_eq!(gauge("sluice_queue_waiting"), 0, "{prom}");
        assert_eq!(gauge("sluice_queue_in_flight"), 1, "{prom}");
    };
    let (held, ()) = tokio::join!(holder, quitters);
    assert_eq!(held.unwrap().status(), 200);
    // The next request is served at once: no ghost waits ahead of it, no slot leaked.
    let start = Instant::now();
    let resp = send(0).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "waited {:?} behind departed clients",
        start.elapsed()
    );
    let records = gw.access_log(5).await;
    let aborted = records
        .iter()
        .filter(|r| r["sluice"]["outcome"] == "aborted")
        .count();
    assert_eq!(aborted, 3, "{records:?}");
    assert_eq!(
        gw.mocks.openai.requests().len(),
        2,
        "departed clients never reached the provider"
    );
}
