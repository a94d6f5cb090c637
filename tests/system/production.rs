//! `envoy/production.yaml`, run as shipped except for addresses and file paths: its TLS
//! upstreams reach the mock providers through a TLS front end (a second Envoy) that
//! presents test certificates for the real provider host names and picks the mock by SNI.
//! So a request succeeds only if the cluster sends the right SNI and verifies the
//! certificate and its SAN against the configured CA.

use crate::harness::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

const TENANT_KEY: &str = "sk-sluice-production-test";

/// Provider cluster name, host name, and the mock behind it.
fn providers(mocks: &Mocks) -> [(&'static str, &'static str, u16); 4] {
    [
        ("openai", "api.openai.com", mocks.openai.addr().port()),
        (
            "anthropic",
            "api.anthropic.com",
            mocks.anthropic.addr().port(),
        ),
        ("deepseek", "api.deepseek.com", mocks.deepseek.addr().port()),
        (
            "gemini",
            "generativelanguage.googleapis.com",
            mocks.gemini.addr().port(),
        ),
    ]
}

fn tls_dir() -> PathBuf {
    repo_root().join("tests/fixtures/tls")
}

/// An Envoy terminating TLS for the four provider hosts, one filter chain per SNI name.
fn front_end_yaml(mocks: &Mocks) -> String {
    let tls = tls_dir();
    let mut chains = String::new();
    let mut clusters = String::new();
    for (name, host, port) in providers(mocks) {
        chains += &format!(
            r#"    - filter_chain_match: {{ server_names: ["{host}"] }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2, http/1.1]
            tls_certificates:
            - certificate_chain: {{ filename: {cert} }}
              private_key: {{ filename: {key} }}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front_{name}
          codec_type: AUTO
          preserve_external_request_id: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route: {{ cluster: mock_{name}, timeout: 0s }}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
            cert = tls.join("upstream.pem").display(),
            key = tls.join("upstream.key").display(),
        );
        clusters += &format!(
            r#"  - name: mock_{name}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: mock_{name}
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }} }} }}] }}]
"#
        );
    }
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: front
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
{chains}  clusters:
{clusters}"#
    )
}

/// `envoy/production.yaml` with loopback ports, this build's wasm, a file access log, the
/// test CA, every provider host pointed at the TLS front end, and one known tenant key.
fn production_yaml(mocks: &Mocks, dir: &Path, front_port: u16) -> String {
    let mut yaml = std::fs::read_to_string(repo_root().join("envoy/production.yaml")).unwrap();
    let mut once = |from: &str, to: &str| {
        assert_eq!(
            yaml.matches(from).count(),
            1,
            "envoy/production.yaml should contain `{from}` once"
        );
        yaml = yaml.replacen(from, to, 1);
    };
    once("port_value: 9901", "port_value: 0");
    once(
        "address: 0.0.0.0, port_value: 8080",
        "address: 127.0.0.1, port_value: 0",
    );
    once(
        "filename: /etc/envoy/sluice.wasm",
        &format!("filename: {}", wasm_path().display()),
    );
    once(
        "path: /dev/stdout",
        &format!("path: {}", dir.join("access.log").display()),
    );
    // The relay module is the stream relay and the route's cluster specifier.
    let relay = "filename: /etc/envoy/libsluice_relay.so";
    assert_eq!(yaml.matches(relay).count(), 2);
    yaml = yaml.replace(relay, &format!("filename: {}", relay_path().display()));
    // Every account of a provider (two of OpenAI's) goes to its host.
    for (_, host, _) in providers(mocks) {
        let from = format!("address: {host}, port_value: 443");
        assert!(
            yaml.contains(&from),
            "envoy/production.yaml should reach {host}"
        );
        yaml = yaml.replace(
            &from,
            &format!("address: 127.0.0.1, port_value: {front_port}"),
        );
    }
    let system_ca = "filename: /etc/ssl/certs/ca-certificates.crt";
    assert_eq!(yaml.matches(system_ca).count(), 6);
    yaml = yaml.replace(
        system_ca,
        &format!("filename: {}", tls_dir().join("ca.pem").display()),
    );
    let digest = sluice::auth::sha256_hex(TENANT_KEY);
    edit_plugin_config(
        &yaml,
        Box::new(move |cfg: &mut Value| {
            cfg["tenants"][0]["keys"][0]["sha256"] = json!(digest);
        }),
    )
}

struct Production {
    gateway: Gateway,
    _front: Child,
}

async fn start() -> Production {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let front_dir = dir.join("front");
    std::fs::create_dir_all(&front_dir).unwrap();
    let front_config = front_dir.join("envoy.yaml");
    std::fs::write(&front_config, front_end_yaml(&mocks)).unwrap();
    let (front, front_admin) = spawn_envoy(&front_config, &front_dir, 1)
        .unwrap_or_else(|log| panic!("TLS front end did not start:\n{log}"));
    let front_port = listener_addr(front_admin).await.port();
    let yaml = production_yaml(&mocks, &dir, front_port);
    let gateway = Gateway::start_config(mocks, dir, &yaml, 2).await;
    Production {
        gateway,
        _front: front,
    }
}

#[tokio::test]
async fn production_config_reaches_each_provider_over_tls_with_its_sni() {
    let p = start().await;
    let g = &p.gateway;
    let r = g
        .post(
            "/v1/chat/completions",
            TENANT_KEY,
            chat("gpt-4.1-mini", "hello over TLS"),
        )
        .await;
    assert_eq!(r.status(), 200, "{}", g.log());
    let v: Value = r.json().await.unwrap();
    assert!(v["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Anthropic's own API shape, to the host of another filter chain (SNI picks it).
    let r = g
        .client
        .post(g.url("/v1/messages"))
        .header("x-api-key", TENANT_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet-4.5", "max_tokens": 32,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A stream through the TLS upstream keeps its chunks and its usage.
    let r = g
        .post(
            "/v1/chat/completions",
            TENANT_KEY,
            json!({"model": "deepseek-chat", "stream": true,
                   "messages": [{"role": "user", "content": "stream"}]}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    let openai = g.mocks.openai.requests();
    assert_eq!(openai.len(), 1);
    assert_eq!(
        openai[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    assert_eq!(openai[0].header("host"), Some("api.openai.com"));
    let anthropic = g.mocks.anthropic.requests();
    assert_eq!(anthropic.len(), 1);
    assert_eq!(anthropic[0].header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(g.mocks.deepseek.requests().len(), 1);

    let records = g.access_log(3).await;
    assert_eq!(records.len(), 3);
    for rec in &records {
        assert_eq!(rec["sluice"]["tenant"], "example-team", "{rec}");
        assert!(rec["sluice"]["input_tokens"].as_u64().unwrap() > 0, "{rec}");
    }
    g.assert_vm_healthy().await;
}

#[tokio::test]
async fn production_retries_a_provider_429_at_once() {
    let p = start().await;
    let g = &p.gateway;
    let started = Instant::now();
    let r = g
        .client
        .post(g.url("/v1/chat/completions"))
        .bearer_auth(TENANT_KEY)
        .header("x-mock-fault", "429")
        .header("x-mock-fault-times", "1")
        .json(&chat("gpt-4.1-mini", "retry me"))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(r.status(), 200);
    let tries = g.mocks.openai.requests();
    assert_eq!(
        tries.iter().map(|t| t.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    // `fallback.retries` tries the only deployment again after the regular back-off (0.1 s
    // at most for a first retry), not after the provider's `retry-after: 1`: waiting it out
    // is what a fallback to another account avoids.
    assert!(
        waited < Duration::from_millis(900),
        "retried after {waited:?}"
    );
    let records = g.access_log(1).await;
    assert_eq!(records[0]["attempts"], "2", "{}", records[0]);
    assert_eq!(records[0]["sluice"]["outcome"], "success", "{}", records[0]);

    // A provider that keeps refusing: the client gets the provider's last 429 after the
    // two retries, with its retry-after.
    let r = g
        .client
        .post(g.url("/v1/chat/completions"))
        .bearer_auth(TENANT_KEY)
        .header("x-mock-fault", "429")
        .json(&chat("gpt-4.1-mini", "always limited"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(g.mocks.openai.requests().len(), 2 + 3);
}
