//! Hardening: bad input of every kind gets a 4xx in the API's own format, reaches no
//! upstream and traps no VM while the gateway keeps serving; a VM that does trap fails
//! closed.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A gateway running the test-only build that traps on `x-sluice-test-trap`.
async fn trap_gateway(concurrency: u32, policy: &str) -> Gateway {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let yaml = render_demo_config(&mocks, &dir, None);
    let real = format!("filename: {}", wasm_path().display());
    assert_eq!(yaml.matches(&real).count(), 1);
    let yaml = yaml.replace(&real, &format!("filename: {}", trap_wasm_path().display()));
    // Sluice's downstream filter and its upstream filter share the VM: the same policy.
    assert_eq!(yaml.matches("failure_policy: FAIL_CLOSED").count(), 2);
    let yaml = yaml.replace(
        "failure_policy: FAIL_CLOSED",
        &format!("failure_policy: {policy}"),
    );
    Gateway::start_config(mocks, dir, &yaml, concurrency).await
}

/// Sends a request that traps the VM in `phase`: (status, body or the body's error).
async fn trap(gw: &Gateway, phase: &str) -> (u16, Result<String, String>) {
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-sluice-test-trap", phase)
        .json(&chat("gpt-4.1-mini", "trap"))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.map_err(|e| format!("{e:?}")))
}

/// Envoy's 503 for a failed VM, in OpenAI's shape (envoy/demo.yaml `local_reply_config`).
fn assert_failed_vm_error(body: &str) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["error"]["type"], "server_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wasm_fail_stream"),
        "{v}"
    );
}

/// A fresh connection each time, so that with several workers any of them may answer.
async fn status_on_new_connection(gw: &Gateway, key: Option<&str>) -> u16 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut rb = client
        .post(gw.url("/v1/chat/completions"))
        .json(&chat("gpt-4.1-mini", "after the trap"));
    if let Some(k) = key {
        rb = rb.bearer_auth(k);
    }
    rb.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapped_vm_fails_closed() {
    for phase in ["request-headers", "request-body", "response-body"] {
        // One worker: its VM is the whole gateway.
        let gw = trap_gateway(1, "FAIL_CLOSED").await;
        assert_eq!(status_on_new_connection(&gw, Some(ACME)).await, 200);
        let upstream_before = gw.mocks.all().len();
        let (status, body) = trap(&gw, phase).await;
        // The trapped request reached the provider only when it trapped in the response.
        let reached = usize::from(phase == "response-body");
        if reached == 1 {
            // The 200 headers had gone out: the client sees the body cut short.
            assert_eq!(status, 200, "{phase}");
            assert!(
                body.is_err(),
                "{phase}: the body must not complete: {body:?}"
            );
        } else {
            assert_eq!(status, 503, "{phase}");
            assert_failed_vm_error(&body.unwrap());
        }
        assert_eq!(gw.mocks.all().len(), upstream_before + reached, "{phase}");
        for key in [None, Some("sk-wrong"), Some(ACME)] {
            assert_eq!(
                status_on_new_connection(&gw, key).await,
                503,
                "{phase}, key {key:?}: a failed VM must refuse everything"
            );
        }
        // The Messages API gets Anthropic's shape.
        let r = gw
            .client
            .post(gw.url("/v1/messages"))
            .header("x-api-key", ACME)
            .json(&serde_json::json!({"model": "claude-sonnet", "max_tokens": 5, "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (&v["type"], &v["error"]["type"]),
            (&"error".into(), &"api_error".into()),
            "{v}"
        );
        assert_eq!(
            gw.mocks.all().len(),
            upstream_before + reached,
            "{phase}: nothing reached a provider through the failed VM"
        );
        let log = gw.access_log(6).await;
        assert_eq!(log.len(), 6, "{log:?}");
        assert_eq!(log[0]["sluice"]["outcome"], "success");
        for (i, line) in log[1..].iter().enumerate() {
            // No usage record from a failed VM: the line says so and stays valid JSON.
            assert_eq!(line["sluice"], Value::Null, "{line}");
            assert_eq!(line["details"], "wasm_fail_stream", "{line}");
            if i > 0 || reached == 0 {
                assert_eq!(line["response_code"], 503, "{line}");
            }
        }
        assert!(
            gw.log().contains("Uncaught RuntimeError: unreachable"),
            "{phase}: Envoy logs the trap"
        );
        // No stat counts it under FAIL_CLOSED (README tells operators to watch the log):
        // no reload, and the runtime still reports its VMs.
        let stats = gw.admin_get("/stats?filter=wasm").await;
        assert!(
            stats
                .lines()
                .filter(|l| l.contains("vm_reload"))
                .all(|l| l.ends_with(": 0")),
            "{phase}: {stats}"
        );
        // The health check every other test ends with catches it from the log.
        assert!(gw.vm_failure().await.is_some(), "{phase}");
    }

    // Two workers: one VM fails, the other keeps authenticating. An unauthenticated
    // request gets 401 or 503, never through.
    let gw = trap_gateway(2, "FAIL_CLOSED").await;
    assert_eq!(trap(&gw, "request-headers").await.0, 503);
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..30 {
        *seen
            .entry(status_on_new_connection(&gw, None).await)
            .or_insert(0) += 1;
    }
    assert!(
        seen.keys().all(|s| *s == 401 || *s == 503),
        "an unauthenticated request got {seen:?}"
    );
    assert!(gw.mocks.all().is_empty(), "{:?}", gw.mocks.all());
    eprintln!("two workers, one trapped: unauthenticated requests got {seen:?}");
}

/// FAIL_RELOAD (the alternative README describes): the trapping request gets 503, then a
/// new VM serves, still authenticating, and shared-data counters survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_reload_replaces_the_vm_and_still_authenticates() {
    let gw = trap_gateway(1, "FAIL_RELOAD").await;
    assert_eq!(status_on_new_connection(&gw, Some(INITECH)).await, 200);
    assert_eq!(trap(&gw, "request-headers").await.0, 503);
    // The default reload backoff is 1 s; until then the failed VM refuses.
    assert_eq!(status_on_new_connection(&gw, None).await, 503);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut status = 503;
    while status == 503 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = status_on_new_connection(&gw, None).await;
    }
    assert_eq!(status, 401, "the reloaded VM authenticates");
    assert_eq!(status_on_new_connection(&gw, Some(INITECH)).await, 200);
    let stats = gw.admin_get("/stats?filter=vm_reload").await;
    assert!(
        stats.contains("wasm.sluice.vm_reload_success: 1"),
        "{stats}"
    );
    // Bronze allows 10 requests/min with burst 1.0: the new VM sees the old VM's count.
    let mut statuses = Vec::new();
    for _ in 0..9 {
        statuses.push(status_on_new_connection(&gw, Some(INITECH)).await);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        8,
        "{statuses:?}"
    );
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavour {
    OpenAi,
    Anthropic,
}

#[derive(Clone)]
enum Body {
    None,
    Bytes(Vec<u8>),
    /// Chunked upload: the pieces, with a pause before each after the first.
    Drip(Vec<Vec<u8>>, u64),
}

/// One request of the suite and what it must get.
struct Case {
    what: String,
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Body,
    status: u16,
}

/// The steady tenant's requests carry this; refused requests never reach a provider,
/// and the extreme-but-valid ones carry [`EXTREME`].
const STEADY: &str = "steady-tenant-probe";
const EXTREME: &str = "extreme-but-valid";

impl Case {
    fn flavour(&self) -> Flavour {
        if self.path == "/v1/messages" {
            Flavour::Anthropic
        } else {
            Flavour::OpenAi
        }
    }
}

fn openai(what: &str, body: Body, status: u16) -> Case {
    Case {
        what: what.into(),
        path: "/v1/chat/completions",
        headers: vec![("authorization", format!("Bearer {GLOBEX}").into_bytes())],
        body,
        status,
    }
}

fn anthropic(what: &str, body: Body, status: u16) -> Case {
    Case {
        what: what.into(),
        path: "/v1/messages",
        headers: vec![
            ("x-api-key", ACME.as_bytes().to_vec()),
            ("anthropic-version", b"2023-06-01".to_vec()),
        ],
        body,
        status,
    }
}

fn bytes(s: impl Into<Vec<u8>>) -> Body {
    Body::Bytes(s.into())
}

fn nested(depth: usize) -> Vec<u8> {
    format!(
        r#"{{"model":"gpt-4.1","messages":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    )
    .into_bytes()
}

/// An object with `n` distinct short keys, then `tail` (e.g. `,"model":...`).
fn many_keys(n: usize, tail: &str) -> Vec<u8> {
    let mut out = String::with_capacity(n * 10);
    out.push('{');
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&format!("\"{i:x}\":0"));
    }
    out.push_str(tail);
    out.push('}');
    out.into_bytes()
}

/// Requests that must be refused before any provider sees them.
fn refused_cases() -> Vec<Case> {
    let chat_with = |extra: &str| {
        bytes(format!(
            r#"{{"model":"gpt-4.1-mini","messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
        ))
    };
    let model = |m: &str| bytes(format!(r#"{{"model":{m},"messages":[]}}"#));
    let mut cases = vec![
        openai("malformed JSON", bytes(r#"{"model": "gpt-4.1", "messages": ["#), 400),
        openai("model is a number", model("42"), 400),
        openai("model is an object", model(r#"{"a":1}"#), 400),
        openai("messages is a string", bytes(r#"{"model":"gpt-4.1-mini","messages":"hi"}"#), 400),
        openai("messages holds a number", bytes(r#"{"model":"gpt-4.1-mini","messages":[7]}"#), 400),
        openai("max_tokens negative", chat_with(r#","max_tokens":-1"#), 400),
        openai("max_tokens a float", chat_with(r#","max_tokens":1e300"#), 400),
        openai("max_tokens over u64", chat_with(r#","max_tokens":18446744073709551616"#), 400),
        openai("max_tokens a string", chat_with(r#","max_tokens":"10""#), 400),
        // As OpenAI answers it: more output than the model produces.
        openai("max_tokens 10^15", chat_with(r#","max_tokens":1000000000000000"#), 400),
        openai("stream is a string", chat_with(r#","stream":"yes""#), 400),
        openai("missing body", Body::None, 400),
        openai("empty body", bytes(""), 400),
        openai("whitespace body", bytes(" \r\n\t "), 400),
        openai("top-level array", bytes("[1,2,3]"), 400),
        openai("top-level string", bytes(r#""gpt-4.1""#), 400),
        openai(
            "non-UTF-8 in a string",
            bytes(b"{\"model\":\"gpt-4.1-mini\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}".to_vec()),
            400,
        ),
        openai("binary garbage", bytes(b"\xff\xfe\x00\x01{".to_vec()), 400),
        openai(
            "non-UTF-8 in a value Sluice skips",
            bytes(b"{\"model\":\"gpt-4.1-mini\",\"messages\":[],\"user\":\"\xff\"}".to_vec()),
            400,
        ),
        // Accepted by the probe, refused by the full parse a rewrite needs: 400, not 500.
        openai(
            "an unpaired surrogate in a body whose model is rewritten",
            bytes(r#"{"mod\u0065l":"deepseek-v3.2","messages":[],"user":"\ud800"}"#),
            400,
        ),
        openai(
            "an unpaired surrogate in a stream that needs usage",
            bytes(r#"{"model":"gpt-4.1-mini","stream":true,"stream_option\u0073":{"include_usage":false},"messages":[],"user":"\ud800"}"#),
            400,
        ),
        openai("nested 10,000 deep", bytes(nested(10_000)), 400),
        openai("nested 129 deep", bytes(nested(128)), 400),
        openai("100,000 keys, no model", bytes(many_keys(100_000, "")), 400),
        openai("trailing garbage", chat_with("} {"), 400),
        openai("duplicate model keys", bytes(r#"{"model":"gpt-4.1-mini","model":"gpt-4.1","messages":[]}"#), 400),
        openai(
            "over max_body_bytes with content-length",
            bytes(format!(r#"{{"model":"gpt-4.1-mini","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(1_100_000))),
            413,
        ),
        openai("over max_body_bytes, chunked", Body::Drip(vec![vec![b' '; 64 * 1024]; 20], 0), 413),
        openai(
            "malformed, chunked",
            Body::Drip(vec![b"{\"model\":".to_vec(), b"\"gpt-4.1-mini\",".to_vec(), b"\"messages\":[".to_vec()], 0),
            400,
        ),
        openai(
            "malformed, slow drip",
            Body::Drip(b"{\"model\": \"gpt-4.1-mini\", \"messages\": [}".chunks(4).map(<[u8]>::to_vec).collect(), 40),
            400,
        ),
        // Values that would reach headers or paths if echoed.
        openai("CR LF in the model", model(r#""gpt-4.1-mini\r\nx-injected: 1""#), 400),
        openai("LF in the model", model(r#""gpt-4.1-mini\nx-sluice-cluster: anthropic""#), 400),
        openai("NUL in the model", model(r#""gpt-4.1-mini\u0000""#), 400),
        openai("DEL and C1 controls in the model", model(r#""gpt-4.1-mini\u007f\u0085""#), 400),
        openai("a path in the model", model(r#""../../v1/admin""#), 404),
        openai("a query in the model", model(r#""gpt-4.1-mini?cluster=anthropic""#), 404),
        openai("model of 10,000 characters", model(&format!("\"{}\"", "m".repeat(10_000))), 400),
        openai("empty model", model(r#""""#), 400),
    ];
    // Keys and auth headers.
    let keyed = |what: &str, headers: Vec<(&'static str, Vec<u8>)>| Case {
        headers,
        ..openai(what, chat_with(""), 401)
    };
    cases.extend([
        keyed(
            "a 16 KiB key",
            vec![(
                "authorization",
                format!("Bearer {}", "k".repeat(16 * 1024)).into_bytes(),
            )],
        ),
        keyed(
            "a key of non-UTF-8 bytes",
            vec![("authorization", b"Bearer sk-\xff\xfe\x80".to_vec())],
        ),
        keyed(
            "two Authorization headers, one valid",
            vec![
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
                ("authorization", b"Bearer sk-wrong".to_vec()),
            ],
        ),
        keyed(
            "two identical valid Authorization headers",
            vec![
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
            ],
        ),
        keyed(
            "Bearer without a key",
            vec![("authorization", b"Bearer ".to_vec())],
        ),
        keyed(
            "a valid x-api-key on an OpenAI path",
            vec![("x-api-key", GLOBEX.as_bytes().to_vec())],
        ),
    ]);
    // The Anthropic flavour.
    let messages = |extra: &str| {
        bytes(format!(
            r#"{{"model":"claude-sonnet","max_tokens":5,"messages":[{{"role":"user","content":"hi"}}]{extra}}}"#
        ))
    };
    cases.extend([
        anthropic("malformed JSON", bytes(r#"{"model":"claude-sonnet","#), 400),
        anthropic(
            "max_tokens negative",
            bytes(r#"{"model":"claude-sonnet","max_tokens":-5,"messages":[]}"#),
            400,
        ),
        anthropic("system is a number", messages(r#","system":5"#), 400),
        anthropic("nested 10,000 deep", bytes(nested(10_000)), 400),
        anthropic(
            "CR LF in the model",
            bytes(r#"{"model":"claude-sonnet\r\nx: y","max_tokens":5,"messages":[]}"#),
            400,
        ),
        anthropic("missing body", Body::None, 400),
        Case {
            headers: vec![
                ("x-api-key", ACME.as_bytes().to_vec()),
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
                ("anthropic-version", b"2023-06-01".to_vec()),
            ],
            ..anthropic("x-api-key and Bearer disagree", messages(""), 401)
        },
        Case {
            headers: vec![
                ("x-api-key", ACME.as_bytes().to_vec()),
                ("x-api-key", GLOBEX.as_bytes().to_vec()),
                ("anthropic-version", b"2023-06-01".to_vec()),
            ],
            ..anthropic("two x-api-key headers", messages(""), 401)
        },
    ]);
    cases
}

/// Valid requests at the edges: they must be served (status 200), not refused.
fn extreme_cases() -> Vec<Case> {
    let body = format!(
        r#"{{"model":"gpt-4.1-mini","messages":[{{"role":"user","content":"{EXTREME}"}}]}}"#
    );
    let pieces = |n: usize| {
        let b = body.as_bytes();
        b.chunks(b.len().div_ceil(n))
            .map(<[u8]>::to_vec)
            .collect::<Vec<_>>()
    };
    vec![
        openai("chunked upload", Body::Drip(pieces(5), 0), 200),
        openai(
            "slow-drip upload (20 pieces, 50 ms apart)",
            Body::Drip(pieces(20), 50),
            200,
        ),
        openai(
            "100,000 keys and a model",
            bytes(many_keys(
                100_000,
                &format!(
                    r#","model":"gpt-4.1-mini","messages":[{{"role":"user","content":"{EXTREME}"}}]"#
                ),
            )),
            200,
        ),
        Case {
            headers: vec![
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
                ("x-long-header", vec![b'h'; 48 * 1024]),
            ],
            ..openai("a 48 KiB header", bytes(body.clone()), 200)
        },
        Case {
            headers: vec![
                ("authorization", format!("Bearer {GLOBEX}").into_bytes()),
                ("x-api-key", b"sk-some-other-key".to_vec()),
            ],
            ..openai(
                "a valid Bearer with a different x-api-key",
                bytes(body.clone()),
                200,
            )
        },
    ]
}

/// Sends one case; returns (status, content-type, x-sluice-reason, body).
async fn send(
    client: &reqwest::Client,
    gw: &Gateway,
    case: &Case,
) -> (u16, String, String, Vec<u8>) {
    let mut rb = client.post(gw.url(case.path));
    for (name, value) in &case.headers {
        rb = rb.header(
            *name,
            reqwest::header::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    rb = match case.body.clone() {
        Body::None => rb,
        Body::Bytes(b) => rb.header("content-type", "application/json").body(b),
        Body::Drip(pieces, pause_ms) => {
            let stream = futures_util::stream::iter(pieces.into_iter().enumerate()).then(
                move |(i, piece)| async move {
                    if i > 0 && pause_ms > 0 {
                        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                    }
                    Ok::<_, std::io::Error>(piece)
                },
            );
            rb.header("content-type", "application/json")
                .body(reqwest::Body::wrap_stream(stream))
        }
    };
    let resp = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{}: {e:?}", case.what));
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let (status, ct, reason) = (
        resp.status().as_u16(),
        header("content-type"),
        header("x-sluice-reason"),
    );
    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
    (status, ct, reason, body)
}

/// The error body is the API's own shape.
fn assert_api_error(what: &str, flavour: Flavour, ct: &str, body: &[u8]) {
    assert!(
        ct.starts_with("application/json"),
        "{what}: content-type {ct}"
    );
    let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "{what}: error body is not JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    match flavour {
        Flavour::OpenAi => {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}: {v}"
            );
            assert!(v["error"]["type"].is_string(), "{what}: {v}");
        }
        Flavour::Anthropic => {
            assert_eq!(v["type"], "error", "{what}: {v}");
            assert!(v["error"]["type"].is_string(), "{what}: {v}");
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}: {v}"
            );
        }
    }
}

/// Requests from a well-behaved tenant, sent continuously while `stop` is unset.
fn steady_tenant(
    gw: &Gateway,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u16>> {
    let client = gw.client.clone();
    let url = gw.url("/v1/chat/completions");
    tokio::spawn(async move {
        let mut statuses = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let r = client
                .post(&url)
                .bearer_auth(ACME)
                .json(&chat("gpt-4.1-mini", STEADY))
                .send()
                .await;
            statuses.push(r.map(|r| r.status().as_u16()).unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        statuses
    })
}

async fn run_suite(gw: &Gateway, client: &reqwest::Client, protocol: &str) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = steady_tenant(gw, stop.clone());
    let mut wrong = Vec::new();
    for case in refused_cases() {
        let (status, ct, reason, body) = send(client, gw, &case).await;
        let what = format!("{protocol}: {}", case.what);
        let text = String::from_utf8_lossy(&body);
        if status != case.status || reason.is_empty() {
            // Every mismatch at once: a hardening regression is rarely alone.
            wrong.push(format!(
                "{what}: got {status} (reason `{reason}`), want {}: {text}",
                case.status
            ));
            continue;
        }
        assert_api_error(&what, case.flavour(), &ct, &body);
    }
    assert!(
        wrong.is_empty(),
        "{} cases answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let extreme = extreme_cases();
    for case in &extreme {
        let (status, _, _, body) = send(client, gw, case).await;
        assert_eq!(
            status,
            200,
            "{protocol}: {}: {}",
            case.what,
            String::from_utf8_lossy(&body)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses = steady.await.unwrap();
    assert!(statuses.len() >= 5, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "the steady tenant was disturbed: {statuses:?}"
    );
    let served = gw.mocks.all();
    assert_eq!(
        served.iter().filter(|r| r.body.contains(EXTREME)).count(),
        extreme.len(),
        "{protocol}"
    );
    for r in &served {
        assert!(
            r.body.contains(STEADY) || r.body.contains(EXTREME),
            "{protocol}: a refused request reached {}: {}",
            r.provider,
            &r.body[..r.body.len().min(300)]
        );
        assert!(
            r.headers
                .iter()
                .all(|(n, v)| n != "x-api-key" || v == OPENAI_KEY || v == ANTHROPIC_KEY),
            "{protocol}: a client's x-api-key reached {}",
            r.provider
        );
    }
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_http1_gets_api_errors_and_reaches_no_provider() {
    let gw = Gateway::start().await;
    let client = reqwest::Client::builder().http1_only().build().unwrap();
    run_suite(&gw, &client, "HTTP/1.1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_over_http2_gets_api_errors_and_reaches_no_provider() {
    let gw = Gateway::start().await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    run_suite(&gw, &client, "HTTP/2").await;
}

/// Raw HTTP/1.1 exchange on a new connection: the response head and body as text.
fn raw_http(gw: &Gateway, request: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_is_refused_by_envoy_in_the_api_format() {
    let gw = Gateway::start().await;
    let request = |path: &str, extra: &str| {
        let body = r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"raw"}]}"#;
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GLOBEX}\r\nx-api-key: {GLOBEX}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let chat = "/v1/chat/completions";
    // Refused by Envoy's HTTP/1 codec before any filter runs.
    let refused: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "NUL in a header value",
            request(chat, "X-A: a\0b\r\n"),
            400,
            "http1.invalid_characters",
        ),
        (
            "a 100 KiB header",
            request(chat, &format!("X-A: {}\r\n", "a".repeat(100 * 1024))),
            431,
            "http1.headers_too_large",
        ),
        (
            "Content-Length and Transfer-Encoding",
            request(chat, "Transfer-Encoding: chunked\r\n"),
            400,
            "http1.content_length_and_chunked_not_allowed",
        ),
        (
            "two Content-Lengths",
            request(chat, "Content-Length: 5\r\n"),
            400,
            "http1.codec_error",
        ),
        (
            "a space in a header name",
            request(chat, "X A: b\r\n"),
            400,
            "http1.codec_error",
        ),
        (
            "an invalid method",
            b"G@T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
            "http1.codec_error",
        ),
    ];
    for (what, bytes, status, details) in refused {
        let (got, text) = raw_http(&gw, &bytes);
        assert_eq!(got, status, "{what}: {text}");
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{what}: {head}"
        );
        let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        assert!(v["error"]["param"].is_null(), "{what}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().ends_with(details),
            "{what}: {v}"
        );
    }
    assert!(gw.mocks.all().is_empty(), "{:?}", gw.mocks.all());

    // Accepted after Envoy normalizes them: nothing smuggled reaches a header or a route.
    let normalized: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a bare CR in a header value",
            request(chat, "X-A: a\rb\r\n"),
            "ab",
        ),
        // A bare LF ends the line: the injected route header is a header of its own, which
        // Sluice drops (internal names are never taken from clients).
        (
            "a bare LF injecting a route header",
            request(chat, "X-A: a\nX-Sluice-Cluster: anthropic\r\n"),
            "a",
        ),
        (
            "an obs-folded header",
            request(chat, "X-A: a\r\n b\r\n"),
            "a b",
        ),
    ];
    for (what, bytes, value) in &normalized {
        let (got, text) = raw_http(&gw, bytes);
        assert_eq!(got, 200, "{what}: {text}");
        let last = gw.mocks.all().pop().unwrap();
        assert_eq!(last.provider, "openai", "{what}");
        assert_eq!(last.header("x-a"), Some(*value), "{what}");
        assert!(
            last.headers
                .iter()
                .all(|(n, _)| !n.starts_with("x-sluice-")),
            "{what}: {:?}",
            last.headers
        );
        assert_ne!(
            last.header("x-api-key"),
            Some(GLOBEX),
            "{what}: the client's x-api-key reached the provider"
        );
    }
    assert!(gw.mocks.anthropic.requests().is_empty());
    gw.assert_vm_healthy().await;
}

/// A small deterministic generator for random keys (no extra dependency).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A random key: printable, of a random length up to 200, sometimes key-shaped.
    fn key(&mut self) -> String {
        const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
        let len = 1 + (self.next() % 200) as usize;
        let body: String = (0..len)
            .map(|_| CHARS[(self.next() % CHARS.len() as u64) as usize] as char)
            .collect();
        if self.next().is_multiple_of(2) {
            format!("sk-sluice-{body}")
        } else {
            body
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_invalid_keys_reaches_no_provider() {
    const REQUESTS: usize = 3000;
    const CONCURRENCY: usize = 32;
    let gw = Gateway::start().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady = steady_tenant(&gw, stop.clone());
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    // One at a time first: the rejection's own latency, without queueing.
    let mut alone = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let resp = gw
            .client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(rng.key())
            .json(&chat("gpt-4.1-mini", "flood"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
        let _ = resp.bytes().await;
        alone.push(t.elapsed());
    }
    alone.sort();
    let keys: Vec<String> = (0..REQUESTS).map(|_| rng.key()).collect();
    let started = Instant::now();
    let results: Vec<(u16, Duration, bool)> = futures_util::stream::iter(keys.into_iter().enumerate())
        .map(|(i, key)| {
            let (client, gw) = (&gw.client, &gw);
            async move {
                let t = Instant::now();
                let rb = if i % 2 == 0 {
                    client
                        .post(gw.url("/v1/chat/completions"))
                        .bearer_auth(&key)
                        .json(&chat("gpt-4.1-mini", "flood"))
                } else {
                    client
                        .post(gw.url("/v1/messages"))
                        .header("x-api-key", &key)
                        .header("anthropic-version", "2023-06-01")
                        .json(&serde_json::json!({"model": "claude-sonnet", "max_tokens": 5, "messages": []}))
                };
                let resp = rb.send().await.unwrap();
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap();
                let elapsed = t.elapsed();
                let shaped = if i % 2 == 0 {
                    v["error"]["code"] == "invalid_api_key"
                } else {
                    v["type"] == "error" && v["error"]["type"] == "authentication_error"
                };
                (status, elapsed, shaped)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let wall = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let steady = steady.await.unwrap();

    assert!(
        results.iter().all(|(s, _, shaped)| *s == 401 && *shaped),
        "every random key gets a 401 in its API's shape"
    );
    assert!(
        steady.iter().all(|s| *s == 200),
        "the steady tenant was refused during the flood: {steady:?}"
    );
    assert!(steady.len() >= 3, "{steady:?}");
    for r in gw.mocks.all() {
        assert!(
            r.body.contains(STEADY),
            "a flood request reached {}",
            r.provider
        );
    }
    gw.assert_vm_healthy().await;

    let mut latencies: Vec<Duration> = results.iter().map(|(_, d, _)| *d).collect();
    latencies.sort();
    // Measured, not asserted (timing belongs to benchmarks): printed for the record.
    eprintln!(
        "invalid key, one at a time: p50 {:?}, p99 {:?}",
        percentile(&alone, 0.5),
        percentile(&alone, 0.99)
    );
    eprintln!(
        "invalid-key flood: {REQUESTS} requests, {CONCURRENCY} in flight, {:.0} rejections/s; \
         latency p50 {:?}, p99 {:?}, max {:?} (client-side, loopback, debug-build client); \
         steady tenant: {} requests, all 200",
        REQUESTS as f64 / wall.as_secs_f64(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().unwrap(),
        steady.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_and_broken_provider_responses_are_counted_safely_and_flagged() {
    let gw = Gateway::start().await;
    let stream_chat = |text: &str| {
        let mut b = chat("gpt-4.1-mini", text);
        b["stream"] = true.into();
        b
    };
    let anthropic_stream = serde_json::json!({"model": "claude-sonnet", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "lie to me"}]});
    // (what, path, body, knob, value)
    let cases: Vec<(&str, &str, Value, &str, &str)> = vec![
        (
            "negative usage",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "neg"),
            "x-mock-usage",
            r#"{"prompt_tokens":-5,"completion_tokens":-100,"total_tokens":-105}"#,
        ),
        (
            "enormous usage",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "huge"),
            "x-mock-usage",
            r#"{"prompt_tokens":99999999999999999999999,"completion_tokens":1e300,"total_tokens":18446744073709551615}"#,
        ),
        (
            "usage of the wrong types",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "types"),
            "x-mock-usage",
            r#"{"prompt_tokens":"12","completion_tokens":[1],"total_tokens":null}"#,
        ),
        (
            "cached more than the prompt",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "cached"),
            "x-mock-usage",
            r#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":500}}"#,
        ),
        (
            "negative usage in a stream",
            "/v1/chat/completions",
            stream_chat("neg stream"),
            "x-mock-usage",
            r#"{"prompt_tokens":-1,"completion_tokens":-1,"total_tokens":-2}"#,
        ),
        (
            "enormous Anthropic stream usage",
            "/v1/messages",
            anthropic_stream.clone(),
            "x-mock-usage",
            r#"{"input_tokens":1e40,"output_tokens":-3}"#,
        ),
        (
            "a garbage JSON body",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "garbage"),
            "x-mock-body",
            "garbage",
        ),
        (
            "a truncated JSON body",
            "/v1/chat/completions",
            chat("gpt-4.1-mini", "truncated"),
            "x-mock-body",
            "truncate",
        ),
        (
            "a garbage stream",
            "/v1/chat/completions",
            stream_chat("garbage stream"),
            "x-mock-body",
            "garbage",
        ),
        (
            "a truncated stream",
            "/v1/chat/completions",
            stream_chat("truncated stream"),
            "x-mock-body",
            "truncate",
        ),
        (
            "a truncated Anthropic stream",
            "/v1/messages",
            anthropic_stream,
            "x-mock-body",
            "truncate",
        ),
    ];
    for (what, path, body, knob, value) in &cases {
        let mut rb = gw
            .client
            .post(gw.url(path))
            .header(*knob, *value)
            .json(body);
        rb = if path.contains("messages") {
            rb.header("x-api-key", ACME)
                .header("anthropic-version", "2023-06-01")
        } else {
            rb.bearer_auth(ACME)
        };
        let resp = rb.send().await.unwrap();
        assert_eq!(
            resp.status(),
            200,
            "{what}: the provider's 200 passes through"
        );
        let _ = resp.bytes().await;
    }
    let records = gw.access_log(cases.len()).await;
    assert_eq!(records.len(), cases.len());
    let (mut input, mut output, mut cost) = (0u64, 0u64, 0u64);
    for ((what, ..), line) in cases.iter().zip(&records) {
        let r = &line["sluice"];
        eprintln!("{what}: {r}");
        assert_eq!(r["outcome"], "success", "{what}: {r}");
        // Every one is counted by the estimate; a lie is also flagged suspicious.
        assert_eq!(r["estimated"], true, "{what}: {r}");
        let lie = cases
            .iter()
            .any(|(w, _, _, knob, _)| w == what && *knob == "x-mock-usage");
        assert_eq!(r["usage_suspicious"], lie, "{what}: {r}");
        assert!(
            r["input_tokens"].as_u64().unwrap() < 100,
            "{what}: the estimate, not the lie: {r}"
        );
        assert!(
            r["output_tokens"].as_u64().unwrap() <= 16,
            "{what}: at most what was generated: {r}"
        );
        for field in [
            "input_tokens",
            "cached_input_tokens",
            "cache_creation_tokens",
            "output_tokens",
            "reasoning_tokens",
        ] {
            let n = r[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{what}: {field} is not a count: {r}"));
            assert!(
                n <= sluice::usage::MAX_REPORTED_TOKENS,
                "{what}: {field} {n}"
            );
        }
        input += r["input_tokens"].as_u64().unwrap()
            + r["cached_input_tokens"].as_u64().unwrap()
            + r["cache_creation_tokens"].as_u64().unwrap();
        output += r["output_tokens"].as_u64().unwrap();
        cost += r["cost_micro_usd"].as_u64().unwrap();
    }
    // The counters agree with the records: nothing wrapped or went negative.
    let prom = gw.prometheus().await;
    let sum = |metric: &str| -> u64 {
        prom.lines()
            .filter(|l| l.starts_with(metric) && l.contains("tenant=\"acme\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|f| f as u64)
            .sum()
    };
    assert_eq!(sum("sluice_input_tokens_total"), input, "{prom}");
    assert_eq!(sum("sluice_output_tokens_total"), output);
    assert_eq!(sum("sluice_cost_micro_usd_total"), cost);
    // And the gateway keeps serving the same tenant.
    let ok = gw
        .post("/v1/chat/completions", ACME, chat("gpt-4.1-mini", "after"))
        .await;
    assert_eq!(ok.status(), 200);
    gw.assert_vm_healthy().await;
}
