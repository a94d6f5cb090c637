//! Conventions clients rely on, end to end: browsers (CORS), the order of refusals, bodies
//! the gateway cannot read, output caps per model and the budget clamp.

use crate::harness::*;
use serde_json::{json, Value};

const PAGE: &str = "http://localhost:5173";

fn edited(edit: impl FnOnce(&mut Value) + 'static) -> GatewayOptions {
    GatewayOptions {
        plugin_config: Some(Box::new(edit)),
        ..GatewayOptions::default()
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_of_an_allowed_origin_calls_the_gateway() {
    // The demo lets acme's keys be used from a local dev page.
    let gw = Gateway::start().await;
    // The preflight the OpenAI SDK's browser mode makes: no key on it.
    let preflight = gw
        .client
        .request(reqwest::Method::OPTIONS, gw.url("/v1/chat/completions"))
        .header("origin", PAGE)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-stainless-lang,x-stainless-os",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    assert_eq!(
        header(&preflight, "access-control-allow-origin"),
        Some(PAGE)
    );
    assert_eq!(
        header(&preflight, "access-control-allow-headers"),
        Some("authorization, content-type, x-stainless-lang, x-stainless-os")
    );
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("origin", PAGE)
        .json(&chat("gpt-4.1-mini", "from a page"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), Some(PAGE));
    assert!(header(&resp, "access-control-expose-headers")
        .unwrap()
        .contains("x-ratelimit-remaining-requests"));

    // Another origin: no preflight, and a key used from it is refused before any provider.
    let other = gw
        .client
        .request(reqwest::Method::OPTIONS, gw.url("/v1/chat/completions"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 403);
    assert_eq!(header(&other, "access-control-allow-origin"), None);
    let stolen = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("origin", "https://evil.example")
        .json(&chat("gpt-4.1-mini", "stolen key"))
        .send()
        .await
        .unwrap();
    assert_eq!(stolen.status(), 403);
    assert_eq!(
        header(&stolen, "x-sluice-reason"),
        Some("origin_not_allowed")
    );
    assert_eq!(gw.mocks.openai.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_is_told_so_without_a_retry_hint() {
    let gw = Gateway::start().await;
    // Bronze: 10 requests and 20,000 tokens a minute. Spend the requests first.
    let small = json!({"model": "gpt-4.1-mini", "max_tokens": 16,
                       "messages": [{"role": "user", "content": "hi"}]});
    for _ in 0..10 {
        assert_eq!(gw.chat_with(INITECH, &small, &[]).await.0, 200);
    }
    let huge = json!({"model": "gpt-4.1-mini", "max_tokens": 30000,
                      "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, body) = gw.chat_with(INITECH, &huge, &[]).await;
    assert_eq!(status, 429);
    assert_eq!(headers["x-sluice-reason"], "tokens_per_minute");
    assert_eq!(
        headers["x-should-retry"], "false",
        "an SDK must not retry it"
    );
    assert!(!headers.contains_key("retry-after-ms"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Request too large"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_compressed_in_a_way_the_gateway_cannot_read_get_415() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("content-encoding", "br")
        .body("\u{1b}\u{3}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unsupported_content_encoding");
    assert!(gw.mocks.all().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_caps_follow_the_model_and_a_clamping_tier_fits_its_budget() {
    // The demo's claude-sonnet-4.5 produces at most 64,000 output tokens.
    let gw = Gateway::start_with(edited(|cfg| {
        // Bronze: 100 micro-USD a month, lowered caps instead of refusals.
        cfg["tiers"]["bronze"]["limits"]["monthly_budget_usd"] = json!(0.0001);
        cfg["tiers"]["bronze"]["clamp_output_to_budget"] = json!(true);
    }))
    .await;
    // The AI SDK's default for an unknown Claude id: refused as Anthropic refuses it.
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "claude-sonnet-4.5", "max_tokens": 128000,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("128000 > 64000"));

    let asks = json!({"model": "gpt-4.1-mini", "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "hi"}]});
    let (status, headers, _) = gw.chat_with(INITECH, &asks, &[]).await;
    assert_eq!(status, 200);
    let clamped: u64 = headers["x-sluice-output-clamped"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(clamped > 0 && clamped < 1000, "{clamped}");
    let sent = gw.mocks.openai.requests().pop().unwrap();
    let sent: Value = serde_json::from_str(&sent.body).unwrap();
    assert_eq!(
        sent["max_tokens"], clamped,
        "the provider got the lowered cap"
    );
}
