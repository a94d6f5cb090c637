//! Global limits across Envoy replicas: a real Redis, the real quota service
//! (`sluice-quota`), two real Envoys (2 workers each) running the real wasm, mocks.
//! Each test starts its own Redis and service on free ports.

use crate::harness::*;
use futures_util::future::join_all;
use serde_json::{json, Value};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `redis-server`: `$SLUICE_REDIS_SERVER`, else the one on PATH. Fails (never skips).
fn redis_bin() -> PathBuf {
    let found = std::env::var_os("SLUICE_REDIS_SERVER")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join("redis-server"))
                    .find(|p| p.exists())
            })
        });
    match found {
        Some(p) if p.exists() => p,
        _ => panic!("redis-server not found — run `make redis` (or set SLUICE_REDIS_SERVER)"),
    }
}

fn quota_bin() -> PathBuf {
    let path = std::env::var_os("SLUICE_QUOTA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/sluice-quota"));
    assert!(
        path.exists(),
        "sluice-quota not found at {} — run `make quota` (or set SLUICE_QUOTA)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A private Redis with its data in `dir` (append-only file on, as production should).
pub(crate) struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub(crate) fn start(dir: &Path) -> Redis {
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: dir.join("redis"),
        };
        std::fs::create_dir_all(&redis.dir).unwrap();
        redis.run();
        redis
    }

    fn run(&mut self) {
        let log = self.dir.join("redis.log");
        let mut cmd = Command::new(redis_bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        kill_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().expect("start redis-server"));
        wait_for_port(self.port, "redis-server", &log);
    }

    /// Stops Redis as a crash would (SIGKILL), after `appendfsync everysec` had its second.
    fn crash(&mut self) {
        std::thread::sleep(Duration::from_millis(1500));
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn cli(&self, args: &[&str]) -> String {
        // RESP over a plain socket: enough for GET/KEYS in assertions.
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The quota service, pointed at one Redis.
pub(crate) struct Quota {
    child: Option<Child>,
    pub(crate) port: u16,
    log: PathBuf,
}

impl Quota {
    pub(crate) fn start(redis: &Redis, dir: &Path, env: &[(&str, &str)]) -> Quota {
        let port = free_port();
        let log = dir.join(format!("quota-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(quota_bin());
        cmd.args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis", &redis.url()])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        kill_with_parent(&mut cmd);
        let child = cmd.spawn().expect("start sluice-quota");
        wait_for_port(port, "sluice-quota", &log);
        Quota {
            child: Some(child),
            port,
            log,
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How the gateways are configured for global limits (scripts/cluster_config.py).
pub(crate) struct GlobalOptions {
    on_engine_failure: &'static str,
    lease_ms: u64,
    timeout_ms: u64,
    settle_attempts: u32,
    plugin_config: Option<fn(&mut Value)>,
}

impl Default for GlobalOptions {
    fn default() -> Self {
        GlobalOptions {
            on_engine_failure: "deny",
            lease_ms: 30_000,
            timeout_ms: 200,
            settle_attempts: 3,
            plugin_config: None,
        }
    }
}

/// The demo configuration for one gateway of a cluster: this test's mocks and free ports,
/// every tenant and provider limit global through the quota service on `quota_port`.
pub(crate) async fn global_gateway(quota_port: u16, opts: &GlobalOptions) -> Gateway {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let edit: Option<ConfigEdit> = opts.plugin_config.map(|f| Box::new(f) as ConfigEdit);
    let base = render_demo_config(&mocks, &dir, edit);
    let base_path = dir.join("base.yaml");
    std::fs::write(&base_path, base).unwrap();
    let out = Command::new("python3")
        .arg(repo_root().join("scripts/cluster_config.py"))
        .arg("--base")
        .arg(&base_path)
        .args(["--quota-port", &quota_port.to_string()])
        .args(["--on-engine-failure", opts.on_engine_failure])
        .args(["--lease-ms", &opts.lease_ms.to_string()])
        .args(["--timeout-ms", &opts.timeout_ms.to_string()])
        .args(["--settle-attempts", &opts.settle_attempts.to_string()])
        .output()
        .expect("run scripts/cluster_config.py");
    assert!(
        out.status.success(),
        "cluster_config.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    Gateway::start_config(mocks, dir, &yaml, 2).await
}

/// A private Redis, the quota service on it, and two gateways using it.
pub(crate) async fn two_gateways(opts: &GlobalOptions) -> (Redis, Quota, Gateway, Gateway) {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let quota = Quota::start(&redis, &dir, &[]);
    let a = global_gateway(quota.port, opts).await;
    let b = global_gateway(quota.port, opts).await;
    (redis, quota, a, b)
}

/// Restarts a gateway's Envoy with the same configuration (a new process: shared data
/// starts empty), on new ports.
async fn restart(gw: &mut Gateway) {
    gw.kill();
    let (child, admin) = spawn_envoy(&gw.dir.join("envoy.yaml"), &gw.dir, 2)
        .unwrap_or_else(|log| panic!("Envoy did not restart:\n{log}"));
    gw.replace_process(child, admin, listener_addr(admin).await);
}

fn chat_body(max_tokens: u64) -> Value {
    json!({"model": "gpt-4.1-mini", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "global limits"}]})
}

/// Waits until `check` holds (settlements are sent from a tick, after the response).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn statuses(results: &[(u16, reqwest::header::HeaderMap, Value)]) -> Vec<u16> {
    results.iter().map(|r| r.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_requests_over_two_envoys_admit_exactly_ten() {
    let (_redis, _quota, a, b) = two_gateways(&GlobalOptions::default()).await;
    let body = chat_body(16);
    let calls = (0..30).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        gw.chat_with(INITECH, &body, &[])
    });
    let results = join_all(calls).await;
    let admitted = results.iter().filter(|r| r.0 == 200).count();
    assert_eq!(
        admitted,
        10,
        "bronze: 10 requests/min across both Envoys: {:?}",
        statuses(&results)
    );
    assert_eq!(results.iter().filter(|r| r.0 == 429).count(), 20);
    for (status, headers, body) in &results {
        assert_eq!(headers["x-ratelimit-limit-requests"], "10");
        if *status == 429 {
            assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
            assert_eq!(headers["x-sluice-reason"], "requests_per_minute");
            assert!(headers.contains_key("retry-after-ms"));
        }
    }
    let upstream = a.mocks.openai.requests().len() + b.mocks.openai.requests().len();
    assert_eq!(upstream, 10, "refused requests never reach a provider");
    let mut records = a.access_log(15).await;
    records.extend(b.access_log(15).await);
    let served: Vec<&Value> = records
        .iter()
        .filter(|r| r["response_code"] == 200)
        .collect();
    assert_eq!(served.len(), 10);
    assert!(
        served
            .iter()
            .all(|r| r["sluice"]["limits_engine"] == "global"),
        "{served:?}"
    );
    a.assert_vm_healthy().await;
    b.assert_vm_healthy().await;
}

/// The openai provider account allows 3 requests per minute, across every gateway.
fn provider_rpm_3(cfg: &mut Value) {
    let providers = cfg["providers"].as_array_mut().unwrap();
    let openai = providers
        .iter_mut()
        .find(|p| p["name"] == "openai")
        .unwrap();
    openai["limits"] = json!({"requests_per_minute": 3});
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_accounts_limit_is_global_too() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let quota = Quota::start(&redis, &dir, &[]);
    let opts = GlobalOptions {
        plugin_config: Some(provider_rpm_3),
        ..GlobalOptions::default()
    };
    let a = global_gateway(quota.port, &opts).await;
    let b = global_gateway(quota.port, &opts).await;
    // Two tenants, two gateways, one provider account.
    let body = chat_body(16);
    let calls = (0..8).map(|i| {
        let gw = if i % 2 == 0 { &a } else { &b };
        let key = if i % 4 < 2 { ACME } else { GLOBEX };
        gw.chat_with(key, &body, &[])
    });
    let results = join_all(calls).await;
    assert_eq!(
        results.iter().filter(|r| r.0 == 200).count(),
        3,
        "{:?}",
        statuses(&results)
    );
    for (status, headers, body) in &results {
        if *status == 429 {
            assert_eq!(headers["x-sluice-reason"], "provider_requests_per_minute");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("provider `openai`"),
                "{body}"
            );
        }
    }
    let upstream = a.mocks.openai.requests().len() + b.mocks.openai.requests().len();
    assert_eq!(upstream, 3);
}

/// Bronze with a small monthly budget and high rates, so the budget is what refuses.
fn small_budget(cfg: &mut Value) {
    let bronze = &mut cfg["tiers"]["bronze"]["limits"];
    bronze["requests_per_minute"] = json!(10000);
    bronze["monthly_budget_usd"] = json!(0.0002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_spent_through_one_envoy_is_refused_by_the_other_and_survives_restarts() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let quota = Quota::start(&redis, &dir, &[]);
    let opts = GlobalOptions {
        plugin_config: Some(small_budget),
        ..GlobalOptions::default()
    };
    let mut a = global_gateway(quota.port, &opts).await;
    let mut b = global_gateway(quota.port, &opts).await;
    // gpt-4.1-mini: $0.40 in / $1.60 out per million; 100 output tokens cost 160 micro-USD
    // (plus the prompt): a second such request does not fit in the 200 micro-USD budget.
    let body = chat_body(100);
    let spend = [("x-mock-output-tokens", "100")];
    let (status, _, first) = a.chat_with(INITECH, &body, &spend).await;
    assert_eq!(status, 200, "{first}");
    let spent = a.access_log(1).await[0]["sluice"]["cost_micro_usd"]
        .as_u64()
        .unwrap();
    assert!(spent > 160, "{spent}");
    // Through the other Envoy, once the settlement landed, the month's spend is seen.
    let key = "sluice:{t:initech}:musd";
    eventually("the settlement reaches Redis", || {
        redis.cli(&["KEYS", &format!("{key}:*")]).contains("musd:")
            && redis_month_total(&redis, key) == spent
    })
    .await;
    let (status, headers, refused) = b.chat_with(INITECH, &body, &spend).await;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(refused["error"]["code"], "insufficient_quota", "{refused}");
    assert_eq!(headers["x-sluice-reason"], "monthly_budget");
    let report = usage_report(&b, INITECH).await;
    let budget = limit_line(&report, "monthly_budget_usd");
    assert_eq!(budget["engine"], "global");
    assert_eq!(budget["used"], json!(spent as f64 / 1e6), "{report}");

    // Both Envoys restart (their shared data is gone): the month's spend is not.
    restart(&mut a).await;
    restart(&mut b).await;
    for gw in [&a, &b] {
        let (status, _, body) = gw.chat_with(INITECH, &chat_body(100), &spend).await;
        assert_eq!(status, 429, "after a restart: {body}");
        assert_eq!(body["error"]["code"], "insufficient_quota");
    }
    let report = usage_report(&a, INITECH).await;
    assert_eq!(
        limit_line(&report, "monthly_budget_usd")["used"],
        json!(spent as f64 / 1e6)
    );
}

/// Waits until no global concurrency lease of bronze is held: every request's settlement
/// reached Redis.
async fn all_settled(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = usage_report(gw, INITECH).await;
        if limit_line(&report, "concurrent_requests")["used"] == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "settlements did not land: {report}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn redis_month_total(redis: &Redis, base: &str) -> u64 {
    let keys = redis.cli(&["KEYS", &format!("{base}:*")]);
    let Some(key) = keys.lines().find(|l| l.starts_with("sluice:")) else {
        return 0;
    };
    let got = redis.cli(&["GET", key]);
    got.lines()
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_survive_envoy_restarts_and_months_survive_a_redis_crash() {
    let dir = unique_dir();
    let mut redis = Redis::start(&dir);
    let mut quota = Quota::start(&redis, &dir, &[]);
    let opts = GlobalOptions::default();
    let mut a = global_gateway(quota.port, &opts).await;
    let mut b = global_gateway(quota.port, &opts).await;
    let started = Instant::now();
    // Bronze refills one request every 6 s: what the bucket may have regained since.
    let refilled = || (started.elapsed().as_millis() / 6_000) as usize;
    for gw in [&a, &b, &a, &b, &a, &b] {
        assert_eq!(gw.chat_with(INITECH, &chat_body(16), &[]).await.0, 200);
    }
    // Settlements leave from each worker's tick after the response: let them land, so
    // that a restart is not also a crash with requests unsettled.
    all_settled(&a).await;
    restart(&mut a).await;
    restart(&mut b).await;
    // 4 left of the minute's 10, whichever Envoy process asks.
    let body = chat_body(16);
    let calls = (0..6).map(|i| (if i % 2 == 0 { &a } else { &b }).chat_with(INITECH, &body, &[]));
    let results = join_all(calls).await;
    let admitted = results.iter().filter(|r| r.0 == 200).count();
    assert!(
        (4..=4 + refilled()).contains(&admitted),
        "{:?}",
        statuses(&results)
    );
    all_settled(&a).await;

    let base = "sluice:{t:initech}:musd";
    let before = redis_month_total(&redis, base);
    redis.crash();
    quota.stop();
    redis.run();
    quota = Quota::start(&redis, &dir, &[]);
    assert_eq!(
        redis_month_total(&redis, base),
        before,
        "the append-only file kept the month's spend"
    );
    // The Envoy needs its cluster to point at the new service: a new gateway, same Redis.
    let fresh = global_gateway(quota.port, &opts).await;
    let report = usage_report(&fresh, INITECH).await;
    assert_eq!(
        limit_line(&report, "monthly_budget_usd")["used"],
        json!(before as f64 / 1e6),
        "{report}"
    );
    let remaining = limit_line(&report, "requests_per_minute")["remaining"]
        .as_u64()
        .unwrap() as usize;
    assert!(remaining <= refilled(), "the bucket survived: {report}");
    drop(quota);
}

/// Gold with 2 concurrent requests, so two slow requests fill it.
fn two_concurrent(cfg: &mut Value) {
    cfg["tiers"]["gold"]["limits"]["concurrent_requests"] = json!(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_envoys_concurrency_slots_come_back_within_the_lease() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let quota = Quota::start(&redis, &dir, &[]);
    let opts = GlobalOptions {
        lease_ms: 2_000,
        plugin_config: Some(two_concurrent),
        ..GlobalOptions::default()
    };
    let mut a = global_gateway(quota.port, &opts).await;
    let b = global_gateway(quota.port, &opts).await;
    let slow = [("x-mock-latency-ms", "60000")];
    let url = a.url("/v1/chat/completions");
    let mut held = Vec::new();
    for _ in 0..2 {
        let req = a
            .client
            .post(&url)
            .bearer_auth(ACME)
            .json(&chat_body(16))
            .header(slow[0].0, slow[0].1);
        held.push(tokio::spawn(
            async move { req.send().await.map(|r| r.status()) },
        ));
    }
    eventually("both slow requests hold their slots", || {
        a.mocks.openai.requests().len() == 2
    })
    .await;
    // While they run (longer than a lease), renewals keep the slots taken.
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let (status, headers, body) = b.chat_with(ACME, &chat_body(16), &[]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(headers["x-sluice-reason"], "concurrent_requests");

    let killed_at = Instant::now();
    a.kill();
    let mut freed_after = None;
    while killed_at.elapsed() < Duration::from_secs(10) {
        if b.chat_with(ACME, &chat_body(16), &[]).await.0 == 200 {
            freed_after = Some(killed_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let freed_after = freed_after.expect("the killed Envoy's slots never came back");
    assert!(
        // The lease, plus the polling and a loaded machine's scheduling.
        freed_after <= Duration::from_millis(2_000 + 1_000),
        "slots came back after {freed_after:?}, lease 2 s"
    );
    for h in held {
        let _ = h.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_quota_service_denies_or_falls_back_to_local_limits() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let mut quota = Quota::start(&redis, &dir, &[]);
    let deny = global_gateway(quota.port, &GlobalOptions::default()).await;
    let local_opts = GlobalOptions {
        on_engine_failure: "local",
        ..GlobalOptions::default()
    };
    let local = global_gateway(quota.port, &local_opts).await;
    assert_eq!(deny.chat_with(ACME, &chat_body(16), &[]).await.0, 200);
    quota.stop();

    let (status, headers, body) = deny.chat_with(ACME, &chat_body(16), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(headers["x-sluice-reason"], "quota_engine_unavailable");
    assert_eq!(body["error"]["code"], "quota_engine_unavailable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("quota service"),
        "{body}"
    );
    let resp = deny
        .client
        .post(deny.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet-4.5", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let anthropic: Value = resp.json().await.unwrap();
    assert_eq!(anthropic["type"], "error", "{anthropic}");

    // `local`: still served, and never unlimited: bronze's 10 requests/min hold locally.
    let body = chat_body(16);
    let results = join_all((0..12).map(|_| local.chat_with(INITECH, &body, &[]))).await;
    assert_eq!(
        results.iter().filter(|r| r.0 == 200).count(),
        10,
        "{:?}",
        statuses(&results)
    );
    assert_eq!(results.iter().filter(|r| r.0 == 429).count(), 2);
    let records = local.access_log(12).await;
    let served: Vec<&Value> = records
        .iter()
        .filter(|r| r["response_code"] == 200)
        .collect();
    assert!(
        served
            .iter()
            .all(|r| r["sluice"]["limits_engine"] == "local_fallback"),
        "{served:?}"
    );
    let prom = local.prometheus().await;
    let fallbacks = prom
        .lines()
        .find(|l| l.starts_with("sluice_global_fallbacks_total"))
        .unwrap_or_else(|| panic!("no fallback counter:\n{prom}"));
    assert!(fallbacks.ends_with(" 10"), "{fallbacks}");
    deny.assert_vm_healthy().await;
    local.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_never_lands_is_counted_and_logged_with_its_record_id() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    // Every settlement is answered after the filter stopped waiting: none ever lands.
    let quota = Quota::start(
        &redis,
        &dir,
        &[("SLUICE_QUOTA_FAULT_SLOW_SETTLES", "1000:500")],
    );
    let opts = GlobalOptions {
        timeout_ms: 100,
        settle_attempts: 2,
        ..GlobalOptions::default()
    };
    let gw = global_gateway(quota.port, &opts).await;
    let (status, _, body) = gw.chat_with(INITECH, &chat_body(16), &[]).await;
    assert_eq!(status, 200, "{body}");
    let record = gw.access_log(1).await.remove(0);
    let id = record["sluice"]["global_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let lost = loop {
        let prom = gw.prometheus().await;
        let lost = prom
            .lines()
            .find(|l| l.starts_with("sluice_global_settlements_lost_total"))
            .map(str::to_string);
        if lost.as_deref().is_some_and(|l| l.ends_with(" 1")) || Instant::now() > deadline {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        lost.as_deref().map(|l| l.ends_with(" 1")),
        Some(true),
        "{lost:?}"
    );
    // The line billing reconciles from names the usage record's admission and what it used.
    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("settlement {id} lost")))
        .unwrap_or_else(|| panic!("no lost-settlement line for {id}:\n{log}"));
    assert!(line.contains(r#""items":"#), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_whose_answer_is_lost_counts_once() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    // The service applies the first settlement, then answers too late for the filter.
    let quota = Quota::start(
        &redis,
        &dir,
        &[("SLUICE_QUOTA_FAULT_SLOW_SETTLES", "1:1000")],
    );
    let opts = GlobalOptions {
        timeout_ms: 200,
        ..GlobalOptions::default()
    };
    let gw = global_gateway(quota.port, &opts).await;
    let (status, _, body) = gw
        .chat_with(INITECH, &chat_body(100), &[("x-mock-output-tokens", "40")])
        .await;
    assert_eq!(status, 200, "{body}");
    let cost = gw.access_log(1).await[0]["sluice"]["cost_micro_usd"]
        .as_u64()
        .unwrap();
    let retried = || async {
        gw.prometheus()
            .await
            .lines()
            .find(|l| l.starts_with("sluice_global_settlement_retries_total"))
            .map(|l| l.ends_with(" 1"))
            .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !retried().await {
        assert!(
            Instant::now() < deadline,
            "no retry was counted:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The retry found the reservation settled: the month holds the real cost, once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(redis_month_total(&redis, "sluice:{t:initech}:musd"), cost);
    let quota_log = std::fs::read_to_string(&quota.log).unwrap_or_default();
    assert!(!gw.log().contains("lost"), "{}\n{quota_log}", gw.log());
}

/// Bronze with 6,000 tokens per minute: it refills 1 token per 10 ms, slowly enough to see
/// a refund.
fn slow_tokens(cfg: &mut Value) {
    cfg["tiers"]["bronze"]["limits"]["tokens_per_minute"] = json!(6000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_then_settlement_leaves_the_global_bucket_at_capacity_minus_usage() {
    let dir = unique_dir();
    let redis = Redis::start(&dir);
    let quota = Quota::start(&redis, &dir, &[]);
    let opts = GlobalOptions {
        plugin_config: Some(slow_tokens),
        ..GlobalOptions::default()
    };
    let gw = global_gateway(quota.port, &opts).await;
    // Reserve 5,000 output tokens, use 40.
    let started = Instant::now();
    let (status, headers, body) = gw
        .chat_with(
            INITECH,
            &chat_body(5_000),
            &[("x-mock-output-tokens", "40")],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let after_reserving: u64 = headers["x-ratelimit-remaining-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        after_reserving < 1_000,
        "the reservation was taken: {after_reserving} left"
    );
    let used = body["usage"]["total_tokens"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let report = usage_report(&gw, INITECH).await;
        let remaining = limit_line(&report, "tokens_per_minute")["remaining"]
            .as_u64()
            .unwrap();
        if remaining + used + 1 >= 6_000 || Instant::now() > deadline {
            break remaining;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Capacity minus the real usage, plus at most what refilled since the request.
    let refilled = started.elapsed().as_millis() as u64 / 10 + 1;
    assert!(
        remaining + used + 1 >= 6_000 && remaining + used <= 6_000 + refilled,
        "remaining {remaining}, used {used}, refilled at most {refilled}"
    );
}
