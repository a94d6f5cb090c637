//! Tenant authentication in real Envoy: bad keys get 401 in the API's format and the
//! upstream sees nothing.

use crate::harness::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_missing_keys_get_401_and_reach_no_upstream() {
    let gw = Gateway::start().await;
    let body = chat("gpt-4.1-mini", "hi");
    let messages = json!({"model": "claude-sonnet", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]});

    // OpenAI paths: Bearer only.
    let openai_cases = vec![
        (
            "no key",
            gw.client.post(gw.url("/v1/chat/completions")).json(&body),
        ),
        (
            "wrong key",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth("sk-sluice-demo-acmf")
                .json(&body),
        ),
        (
            "prefix of a real key",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .bearer_auth("sk-sluice-demo-acm")
                .json(&body),
        ),
        (
            "basic scheme",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .header("authorization", format!("Basic {ACME}"))
                .json(&body),
        ),
        (
            "x-api-key on an OpenAI path",
            gw.client
                .post(gw.url("/v1/chat/completions"))
                .header("x-api-key", ACME)
                .json(&body),
        ),
        (
            "embeddings, wrong key",
            gw.client
                .post(gw.url("/v1/embeddings"))
                .bearer_auth("nope")
                .json(&json!({"model": "text-embedding-3-small", "input": "x"})),
        ),
        ("models, no key", gw.client.get(gw.url("/v1/models"))),
    ];
    for (what, req) in openai_cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
    }

    // Anthropic path: x-api-key or Bearer; errors in Anthropic's shape.
    let anthropic_cases = vec![
        (
            "no key",
            gw.client
                .post(gw.url("/v1/messages"))
                .header("anthropic-version", "2023-06-01")
                .json(&messages),
        ),
        (
            "wrong x-api-key",
            gw.client
                .post(gw.url("/v1/messages"))
                .header("x-api-key", "sk-ant-nope")
                .header("anthropic-version", "2023-06-01")
                .json(&messages),
        ),
        (
            "x-api-key and Bearer disagree",
            gw.client
                .post(gw.url("/v1/messages"))
                .header("x-api-key", ACME)
                .bearer_auth(GLOBEX)
                .header("anthropic-version", "2023-06-01")
                .json(&messages),
        ),
    ];
    for (what, req) in anthropic_cases {
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{what}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "error", "{what}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{what}: {v}");
    }

    assert!(
        gw.mocks.all().is_empty(),
        "an unauthenticated request reached upstream: {:?}",
        gw.mocks.all()
    );
    gw.assert_vm_healthy().await;

    // And a good key on the same gateway works, via Bearer on the Anthropic path too.
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .bearer_auth(ACME)
        .header("anthropic-version", "2023-06-01")
        .json(&messages)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let reqs = gw.mocks.anthropic.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(
        reqs[0].header("authorization"),
        None,
        "the tenant's Bearer must be stripped"
    );
    assert_never_sent(&reqs, ACME);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_is_identified_by_its_own_key() {
    let gw = Gateway::start().await;
    // initech (bronze) may use gpt-4.1-mini but not gpt-4.1; acme (gold) may use both.
    for (key, model, status) in [
        (INITECH, "gpt-4.1-mini", 200),
        (INITECH, "gpt-4.1", 403),
        (GLOBEX, "gpt-4.1", 200),
        (ACME, "gpt-4.1", 200),
    ] {
        let resp = gw
            .post("/v1/chat/completions", key, chat(model, "hi"))
            .await;
        assert_eq!(resp.status().as_u16(), status, "{key} -> {model}");
    }
    assert_eq!(gw.mocks.openai.requests().len(), 3);
}
