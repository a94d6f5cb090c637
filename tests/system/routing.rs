//! Model routing: every demo model reaches its provider, with the provider's path,
//! host, model name and credential, and never the tenant's key.

use crate::harness::*;
use serde_json::{json, Value};

/// (requested model, endpoint, body kind, expected provider, expected upstream path, upstream model, authority)
const CASES: &[(&str, &str, &str, &str, &str, &str, &str)] = &[
    (
        "gpt-4.1",
        "/v1/chat/completions",
        "chat",
        "openai",
        "/v1/chat/completions",
        "gpt-4.1",
        "api.openai.com",
    ),
    (
        "gpt-4.1-mini",
        "/v1/chat/completions",
        "chat",
        "openai",
        "/v1/chat/completions",
        "gpt-4.1-mini",
        "api.openai.com",
    ),
    (
        "deepseek-v3.2",
        "/v1/chat/completions",
        "chat",
        "deepseek",
        "/chat/completions",
        "deepseek-chat",
        "api.deepseek.com",
    ),
    (
        "gemini-2.5-flash",
        "/v1/chat/completions",
        "chat",
        "gemini",
        "/v1beta/openai/chat/completions",
        "gemini-2.5-flash",
        "generativelanguage.googleapis.com",
    ),
    (
        "claude-sonnet-4.5",
        "/v1/chat/completions",
        "chat",
        "anthropic",
        "/v1/chat/completions",
        "claude-sonnet-4-5-20250929",
        "api.anthropic.com",
    ),
    (
        "claude-sonnet-4.5",
        "/v1/messages",
        "messages",
        "anthropic",
        "/v1/messages",
        "claude-sonnet-4-5-20250929",
        "api.anthropic.com",
    ),
    (
        "text-embedding-3-small",
        "/v1/embeddings",
        "embeddings",
        "openai",
        "/v1/embeddings",
        "text-embedding-3-small",
        "api.openai.com",
    ),
    (
        "gpt-4.1-mini",
        "/v1/responses",
        "responses",
        "openai",
        "/v1/responses",
        "gpt-4.1-mini",
        "api.openai.com",
    ),
];

fn body_for(kind: &str, model: &str) -> Value {
    match kind {
        "chat" => chat(model, "Say hello to the routing test"),
        "messages" => {
            json!({"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": "Hello"}]})
        }
        "embeddings" => json!({"model": model, "input": ["first text", "second text"]}),
        "responses" => json!({"model": model, "input": "Hello from the Responses API"}),
        other => panic!("unknown kind {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_demo_model_reaches_its_provider() {
    let gw = Gateway::start().await;
    for &(model, path, kind, provider, upstream_path, upstream_model, authority) in CASES {
        let mut req = gw.client.post(gw.url(path)).json(&body_for(kind, model));
        req = if path == "/v1/messages" {
            req.header("x-api-key", ACME)
                .header("anthropic-version", "2023-06-01")
        } else {
            req.bearer_auth(ACME)
        };
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 200, "{model} on {path}: {text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert!(
            answer.get("usage").is_some(),
            "{model} on {path}: no usage in {text}"
        );

        let all = gw.mocks.all();
        assert_eq!(
            all.len(),
            1,
            "{model} on {path}: exactly one upstream request, got {all:?}"
        );
        let got = &all[0];
        assert_eq!(got.provider, provider, "{model} on {path}");
        assert_eq!(got.path, upstream_path, "{model} on {path}");
        assert_eq!(
            got.header("host").or(got.header(":authority")),
            Some(authority),
            "{model} on {path}"
        );
        assert_eq!(
            got.json().unwrap()["model"],
            upstream_model,
            "{model} on {path}"
        );
        assert!(
            got.headers
                .iter()
                .all(|(n, _)| !n.starts_with("x-sluice-") && !n.starts_with("x-envoy-")),
            "internal header leaked upstream: {:?}",
            got.headers
        );
        assert_never_sent(&all, ACME);
        match provider {
            "anthropic" if path == "/v1/messages" => {
                assert_eq!(got.header("x-api-key"), Some(ANTHROPIC_KEY));
                assert_eq!(got.header("authorization"), None);
                assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
            }
            "anthropic" => assert_eq!(
                got.header("authorization"),
                Some(format!("Bearer {ANTHROPIC_KEY}").as_str())
            ),
            "openai" => assert_eq!(
                got.header("authorization"),
                Some(format!("Bearer {OPENAI_KEY}").as_str())
            ),
            "deepseek" => assert_eq!(
                got.header("authorization"),
                Some(format!("Bearer {DEEPSEEK_KEY}").as_str())
            ),
            "gemini" => assert_eq!(
                got.header("authorization"),
                Some(format!("Bearer {GEMINI_KEY}").as_str())
            ),
            _ => unreachable!(),
        }
        for m in [
            &gw.mocks.openai,
            &gw.mocks.anthropic,
            &gw.mocks.deepseek,
            &gw.mocks.gemini,
        ] {
            m.clear();
        }
    }
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_and_wildcards_resolve_to_the_canonical_model() {
    let gw = Gateway::start().await;
    for (alias, provider, upstream) in [
        ("claude-sonnet", "anthropic", "claude-sonnet-4-5-20250929"),
        (
            "claude-sonnet-4-5-20250929",
            "anthropic",
            "claude-sonnet-4-5-20250929",
        ),
        ("deepseek-chat", "deepseek", "deepseek-chat"),
        ("gpt-4.1-2025-04-14", "openai", "gpt-4.1"),
    ] {
        let resp = gw
            .post("/v1/chat/completions", ACME, chat(alias, "hi"))
            .await;
        assert_eq!(
            resp.status(),
            200,
            "{alias}: {}",
            resp.text().await.unwrap()
        );
        let all = gw.mocks.all();
        assert_eq!(all.len(), 1, "{alias}: {all:?}");
        assert_eq!(
            (
                all[0].provider.as_str(),
                all[0].json().unwrap()["model"].as_str()
            ),
            (provider, Some(upstream)),
            "{alias}"
        );
        for m in [
            &gw.mocks.openai,
            &gw.mocks.anthropic,
            &gw.mocks.deepseek,
            &gw.mocks.gemini,
        ] {
            m.clear();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_never_reach_an_upstream() {
    let gw = Gateway::start().await;
    let cases: Vec<(&str, &str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "allow-list: bronze asks for gpt-4.1",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(INITECH)
                .json(&chat("gpt-4.1", "hi")),
            403,
            "model_not_allowed",
        ),
        (
            "allow-list: silver asks for claude",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(GLOBEX)
                .json(&chat("claude-sonnet", "hi")),
            403,
            "model_not_allowed",
        ),
        (
            "unknown model",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(ACME)
                .json(&chat("gpt-9-ultra", "hi")),
            404,
            "model_not_found",
        ),
        (
            "malformed JSON",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(ACME)
                .header("content-type", "application/json")
                .body("{\"model\": \"gpt-4.1\", \"messages\": ["),
            400,
            "invalid_request",
        ),
        (
            "missing model",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(ACME)
                .json(&json!({"messages": []})),
            400,
            "invalid_request",
        ),
        (
            "empty body",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(ACME),
            400,
            "invalid_request",
        ),
        (
            "oversize body with content-length",
            "openai",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth(ACME)
                .json(&chat("gpt-4.1", &"x".repeat(1_100_000))),
            413,
            "request_too_large",
        ),
        (
            "unknown path",
            "openai",
            gw.client
                .post(gw.url("/v1/completions/legacy"))
                .bearer_auth(ACME)
                .json(&chat("gpt-4.1", "hi")),
            404,
            "unknown_path",
        ),
        (
            "model not served on the Messages API",
            "anthropic",
            gw.client
                .post(gw.url("/v1/messages"))
                .header("x-api-key", ACME)
                .header("anthropic-version", "2023-06-01")
                .json(&json!({"model": "gpt-4.1", "max_tokens": 5, "messages": []})),
            404,
            "model_not_found",
        ),
    ];
    for (what, flavour, req, status, reason) in cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{what}");
        assert_eq!(resp.headers()["x-sluice-reason"], reason, "{what}");
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{what}"
        );
        let v: Value = resp.json().await.unwrap();
        match flavour {
            "openai" => assert!(
                v["error"]["message"].is_string() && v["error"]["type"].is_string(),
                "{what}: {v}"
            ),
            _ => assert_eq!(v["type"], "error", "{what}: {v}"),
        }
    }
    assert!(
        gw.mocks.all().is_empty(),
        "refused requests reached upstream: {:?}",
        gw.mocks.all()
    );
    gw.assert_vm_healthy().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_chunked_upload_gets_json_413() {
    let gw = Gateway::start().await;
    // No content-length: the filter counts the buffered body as it arrives.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..40).map(|_| Ok(vec![b' '; 32 * 1024])).collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert!(gw.mocks.all().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_internal_headers_cannot_pick_a_cluster() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-sluice-cluster", "anthropic")
        .header("x-sluice-tenant", "initech")
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        gw.mocks.anthropic.requests().is_empty(),
        "spoofed cluster header was honoured"
    );
    let got = gw.mocks.openai.requests();
    assert_eq!(got.len(), 1);
    assert!(
        got[0]
            .headers
            .iter()
            .all(|(n, _)| !n.starts_with("x-sluice-")),
        "{:?}",
        got[0].headers
    );

    // A refused request with a spoofed header goes nowhere either.
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .header("x-sluice-cluster", "openai")
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(gw.mocks.all().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_listing_shows_only_allowed_models() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .get(gw.url("/v1/models"))
        .bearer_auth(INITECH)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "gpt-4.1-mini",
            "deepseek-v3.2",
            "gemini-2.5-flash",
            "text-embedding-3-small"
        ]
    );

    let resp = gw
        .client
        .get(gw.url("/v1/models"))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 6);
    assert!(
        gw.mocks.all().is_empty(),
        "model listing is answered by the gateway"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_pass_through_in_the_providers_format() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-fault", "529")
        .json(&json!({"model": "claude-sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 529);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");

    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-mock-fault", "429")
        .json(&chat("gpt-4.1", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
}
