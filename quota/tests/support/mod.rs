//! Test support: a private `redis-server` per test, the service in-process or as the built
//! binary, and a small JSON client.

#![allow(dead_code)]

pub mod cache;

use redis::aio::MultiplexedConnection;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice::global::wire::AdmitRequest;
use sluice::limits::{Demand, LimitKind};
use sluice_quota::engine::Clock;
use sluice_quota::{http, Engine};
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// `redis-server` from `SLUICE_REDIS_SERVER`, else from PATH. Missing is a failure, never a
/// skip: these tests are the only proof that the scripts work.
pub fn redis_server_binary() -> PathBuf {
    // `make test` sets it empty when there is none on PATH.
    if let Some(path) = std::env::var_os("SLUICE_REDIS_SERVER").filter(|path| !path.is_empty()) {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("redis-server"))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(path) => path,
        None => panic!(
            "redis-server not found (set SLUICE_REDIS_SERVER or put it on PATH): run `make redis`"
        ),
    }
}

pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A private, memory-only `redis-server`, killed on drop.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sluice-quota-test-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut redis = Redis {
            port,
            dir,
            child: None,
        };
        redis.restart();
        redis
    }

    /// A node of a Redis Cluster (not yet joined: see `RedisCluster`).
    pub fn cluster_node() -> Redis {
        let mut redis = Redis::start_on(free_port());
        redis.restart_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
        redis
    }

    /// (Re)starts the server on the same port, empty.
    pub fn restart(&mut self) {
        self.restart_with(&[]);
    }

    fn restart_with(&mut self, extra: &[&str]) {
        self.stop();
        let child = Command::new(redis_server_binary())
            .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
            .args(extra)
            .arg("--cluster-config-file")
            .arg(self.dir.join(format!("nodes-{}.conf", self.port)))
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start redis-server: {error}: run `make redis`"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = redis::Client::open(self.url())
                .and_then(|client| client.get_connection())
                .and_then(|mut connection| redis::cmd("PING").query::<String>(&mut connection));
            if ready.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn sync_connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    pub async fn connection(&self) -> MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Redis's clock, which the scripts decide with.
pub async fn redis_now(redis: &mut MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(redis).await.unwrap();
    seconds * 1000 + micros / 1000
}

/// The service, in this process, on a free port; stopped on drop.
pub struct Service {
    pub api: Api,
    stop: Option<oneshot::Sender<()>>,
}

impl Service {
    pub async fn start(redis_url: &str) -> Service {
        Service::with_clock(redis_url, sluice_quota::system_clock).await
    }

    pub async fn with_clock(redis_url: &str, clock: Clock) -> Service {
        Service::serving(Engine::new(redis_url, clock).unwrap()).await
    }

    /// The service over a Redis Cluster, by its nodes' URLs.
    pub async fn over_cluster(nodes: &[String]) -> Service {
        Service::serving(Engine::cluster(nodes, sluice_quota::system_clock).unwrap()).await
    }

    async fn serving(engine: Engine) -> Service {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let engine = Arc::new(engine);
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(http::serve(listener, engine, async {
            let _ = stopped.await;
        }));
        Service {
            api: Api::new(base),
            stop: Some(stop),
        }
    }
}

/// A Redis Cluster of three primaries, each with a third of the hash slots.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..3).map(|_| Redis::cluster_node()).collect();
        let ranges = [(0, 5460), (5461, 10922), (10923, 16383)];
        for (node, (first, last)) in nodes.iter().zip(ranges) {
            let mut c = node.sync_connection();
            redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query::<String>(&mut c)
                .unwrap();
        }
        let mut first = nodes[0].sync_connection();
        for node in &nodes[1..] {
            redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .query::<String>(&mut first)
                .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut node.sync_connection())
                    .unwrap();
                if info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not form: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// JSON over HTTP/1.1 (or h2c, with [`Api::h2c`]).
pub struct Api {
    pub base: String,
    client: reqwest::Client,
}

impl Api {
    pub fn new(base: String) -> Api {
        Api {
            base,
            client: reqwest::Client::new(),
        }
    }

    pub fn h2c(base: String) -> Api {
        Api {
            base,
            client: reqwest::Client::builder()
                .http2_prior_knowledge()
                .build()
                .unwrap(),
        }
    }

    /// POSTs `body` and decodes a 200 answer.
    pub async fn call<T: Serialize, R: DeserializeOwned>(&self, path: &str, body: &T) -> R {
        let (status, answer) = self.raw(path, &serde_json::to_string(body).unwrap()).await;
        assert_eq!(status, 200, "{path}: {answer}");
        serde_json::from_value(answer).unwrap()
    }

    /// POSTs raw text: the status and the JSON answer.
    pub async fn raw(&self, path: &str, body: &str) -> (u16, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let answer = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{path}: not JSON ({status}): {text:?}"));
        (status, answer)
    }

    /// POSTs raw bytes: the status, the answer's content type and its bytes.
    pub async fn bytes(&self, path: &str, body: Vec<u8>) -> (u16, String, Vec<u8>) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        (
            status,
            content_type,
            response.bytes().await.unwrap().to_vec(),
        )
    }

    pub async fn health(&self) -> (u16, String) {
        let response = self
            .client
            .get(format!("{}/healthz", self.base))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }
}

pub fn rate(key: &str, per_minute: u64, amount: u64) -> Demand {
    Demand {
        key: key.to_string(),
        kind: LimitKind::Rate {
            per_minute,
            burst_milli: 1000,
        },
        amount,
    }
}

pub fn concurrency(key: &str, max: u64) -> Demand {
    Demand {
        key: key.to_string(),
        kind: LimitKind::Concurrency { max },
        amount: 1,
    }
}

pub fn monthly(key: &str, limit: u64, amount: u64) -> Demand {
    Demand {
        key: key.to_string(),
        kind: LimitKind::Monthly { limit },
        amount,
    }
}

pub fn admit(id: &str, demands: Vec<Demand>) -> AdmitRequest {
    AdmitRequest {
        id: id.to_string(),
        lease_ms: 30_000,
        hold_ms: 60_000,
        demands,
    }
}
