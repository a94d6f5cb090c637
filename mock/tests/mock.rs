//! End-to-end tests of the mock providers over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::StreamExt;
use serde_json::{json, Value};
use sluice_mock::{count_tokens, mock_text, start, MockServer, ProviderKind, ProviderSpec, Usage};

const OPENAI_KEY: &str = "sk-test-openai-0123456789abcd";
const ANTHROPIC_KEY: &str = "sk-ant-test-0123456789wxyz";

async fn server(name: &str, kind: ProviderKind, prefix: &str, key: &str) -> MockServer {
    start(ProviderSpec {
        name: name.into(),
        kind,
        listen: "127.0.0.1:0".parse().unwrap(),
        api_key: key.into(),
        path_prefix: prefix.into(),
    })
    .await
    .unwrap()
}

async fn openai() -> MockServer {
    server("openai", ProviderKind::OpenAi, "/v1", OPENAI_KEY).await
}

async fn anthropic() -> MockServer {
    server("anthropic", ProviderKind::Anthropic, "/v1", ANTHROPIC_KEY).await
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn url(s: &MockServer, path: &str) -> String {
    format!("http://{}{}", s.addr(), path)
}

/// Parsed SSE event: (event name, data).
fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data)
        })
        .collect()
}

fn chat_body() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello to the world"}]}
        ]
    })
}

fn chat_prompt_tokens() -> u64 {
    (count_tokens("You are terse.") + 4) + (count_tokens("Say hello to the world") + 4) + 3
}

async fn post_openai(
    s: &MockServer,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = client()
        .post(url(s, path))
        .bearer_auth(OPENAI_KEY)
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

async fn post_anthropic(
    s: &MockServer,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = client()
        .post(url(s, "/v1/messages"))
        .header("x-api-key", ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

#[tokio::test]
async fn openai_auth_failures() {
    let s = openai().await;
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(v["error"]["param"].is_null());

    let wrong = "sk-wrong-key-5555555555zzzz";
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .bearer_auth(wrong)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("sk-...zzzz"), "{msg}");
    assert!(!msg.contains(wrong));
    assert!(!msg.contains(OPENAI_KEY));

    let reqs = s.requests();
    assert_eq!(reqs.len(), 2);
    assert!(reqs.iter().all(|r| r.status == 401 && r.usage.is_none()));
    assert_eq!(
        reqs[1].header("Authorization"),
        Some(format!("Bearer {wrong}").as_str())
    );
}

#[tokio::test]
async fn anthropic_auth_and_validation() {
    let s = anthropic().await;
    let body = json!({"model": "claude-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    assert_anthropic_headers_checked(&s, "/v1/messages", &body).await;
    // Missing max_tokens.
    let r = post_anthropic(&s, &json!({"model": "m", "messages": []}), &[]).await;
    assert_eq!(r.status(), 400);
    let r = post_anthropic(
        &s,
        &json!({"model": "m", "messages": [{"role":"user","content":"x"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
}

#[tokio::test]
async fn chat_validation_errors() {
    let s = openai().await;
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .bearer_auth(OPENAI_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");

    let r = post_openai(&s, "/v1/chat/completions", &json!({"messages": []}), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "model");

    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &json!({"model": "m", "messages": "hi"}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "messages");

    let r = client().get(url(&s, "/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
}

#[tokio::test]
async fn chat_json_usage_follows_count_rules() {
    let s = openai().await;
    let r = post_openai(&s, "/v1/chat/completions", &chat_body(), &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("x-request-id"));
    assert!(r.headers().contains_key("openai-processing-ms"));
    let v: Value = r.json().await.unwrap();
    let prompt = chat_prompt_tokens();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gpt-4o-mini");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["refusal"].is_null());
    assert_eq!(choice["message"]["annotations"], json!([]));
    assert!(choice["logprobs"].is_null());
    assert_eq!(v["service_tier"], "default");
    assert!(v["system_fingerprint"].is_string());
    assert_eq!(
        v["usage"]["prompt_tokens_details"],
        json!({"cached_tokens": 0, "audio_tokens": 0})
    );
    assert_eq!(
        v["usage"]["completion_tokens_details"],
        json!({
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        })
    );
    let text = choice["message"]["content"].as_str().unwrap();
    assert_eq!(count_tokens(text), 16);
    assert_eq!(text, mock_text(16));
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["completion_tokens"], 16);
    assert_eq!(v["usage"]["total_tokens"], prompt + 16);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );

    // max_tokens caps -> "length"; cached and reasoning knobs.
    let mut body = chat_body();
    body["max_tokens"] = json!(5);
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &body,
        &[
            ("x-mock-cached-tokens", "4"),
            ("x-mock-reasoning-tokens", "7"),
        ],
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        count_tokens(v["choices"][0]["message"]["content"].as_str().unwrap()),
        5
    );
    assert_eq!(v["usage"]["prompt_tokens"], prompt);
    assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(
        v["usage"]["completion_tokens_details"]["reasoning_tokens"],
        7
    );

    // x-mock-output-tokens.
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-output-tokens", "40")],
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 40);
    assert_eq!(
        count_tokens(v["choices"][0]["message"]["content"].as_str().unwrap()),
        40
    );

    let reqs = s.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].provider, "openai");
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(reqs[0].status, 200);
    assert!(reqs[0].completed);
    assert_eq!(reqs[0].json().unwrap()["model"], "gpt-4o-mini");
    assert_eq!(
        reqs[0].usage,
        Some(Usage {
            input_tokens: prompt,
            output_tokens: 16,
            ..Usage::default()
        })
    );
    assert_eq!(
        reqs[1].usage,
        Some(Usage {
            input_tokens: prompt - 4,
            output_tokens: 12,
            cached_tokens: 4,
            reasoning_tokens: 7,
            cache_creation_tokens: 0
        })
    );
    s.clear();
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn chat_stream_without_include_usage_has_no_usage() {
    let s = openai().await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    let r = post_openai(&s, "/v1/chat/completions", &body, &[("x-mock-chunks", "3")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(!text.contains("usage"), "{text}");
    let events = parse_sse(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(e, d)| {
            assert!(e.is_none());
            serde_json::from_str(d).unwrap()
        })
        .collect();
    assert_eq!(chunks.len(), 1 + 3 + 1);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    let content: String = chunks[1..4]
        .iter()
        .map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(content, mock_text(16));
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["choices"][0]["delta"], json!({}));
    // Ground truth is still recorded.
    let rec = &s.requests()[0];
    assert!(rec.completed);
    assert_eq!(rec.usage.as_ref().unwrap().output_tokens, 16);
}

#[tokio::test]
async fn chat_stream_with_include_usage_has_one_usage_chunk() {
    let s = openai().await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body["max_completion_tokens"] = json!(6);
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &body,
        &[("x-mock-cached-tokens", "2")],
    )
    .await;
    let events = parse_sse(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let with_usage: Vec<&Value> = chunks.iter().filter(|c| !c["usage"].is_null()).collect();
    assert_eq!(with_usage.len(), 1);
    assert!(chunks.iter().all(|c| c.get("usage").is_some()));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let prompt = chat_prompt_tokens();
    assert_eq!(last["usage"]["prompt_tokens"], prompt);
    assert_eq!(last["usage"]["completion_tokens"], 6);
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(count_tokens(&content), 6);
}

/// `data:` chunks of a chat stream, without `[DONE]`.
async fn chat_chunks(s: &MockServer, body: &Value) -> Vec<Value> {
    let events = parse_sse(
        &post_openai(s, "/v1/chat/completions", body, &[])
            .await
            .text()
            .await
            .unwrap(),
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect()
}

#[tokio::test]
async fn chat_stream_obfuscation() {
    let s = openai().await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = chat_chunks(&s, &body).await;
    // Every chunk, the usage chunk included, carries a non-empty obfuscation string
    // that pads the content to a 16-char block.
    for c in &chunks {
        let o = c["obfuscation"].as_str().unwrap();
        assert!(!o.is_empty() && o.len() <= 16, "{o:?}");
        assert!(o.chars().all(|ch| ch.is_ascii_alphanumeric()));
        let content = c["choices"][0]["delta"]["content"].as_str().unwrap_or("");
        assert_eq!((content.chars().count() + o.len()) % 16, 0);
        assert_eq!(c["service_tier"], "default");
    }
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens"],
        chat_prompt_tokens()
    );

    // Opted out.
    body["stream_options"] = json!({"include_usage": true, "include_obfuscation": false});
    assert!(chat_chunks(&s, &body)
        .await
        .iter()
        .all(|c| c.get("obfuscation").is_none()));

    // DeepSeek and Anthropic's OpenAI-compatible endpoint do not obfuscate.
    let ds = server("deepseek", ProviderKind::OpenAi, "", OPENAI_KEY).await;
    let r = client()
        .post(url(&ds, "/chat/completions"))
        .bearer_auth(OPENAI_KEY)
        .json(&json!({"model": "deepseek-chat", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert!(!r.text().await.unwrap().contains("obfuscation"));
    let a = anthropic().await;
    let mut abody = chat_body();
    abody["stream"] = json!(true);
    let r = client()
        .post(url(&a, "/v1/chat/completions"))
        .bearer_auth(ANTHROPIC_KEY)
        .json(&abody)
        .send()
        .await
        .unwrap();
    assert!(!r.text().await.unwrap().contains("obfuscation"));
}

#[tokio::test]
async fn anthropic_json_and_openai_compat() {
    let s = anthropic().await;
    let body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 100,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there, Claude"}]}]
    });
    let r = post_anthropic(
        &s,
        &body,
        &[
            ("x-mock-cached-tokens", "3"),
            ("x-mock-cache-creation-tokens", "2"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("request-id"));
    let v: Value = r.json().await.unwrap();
    let prompt = (count_tokens("Be brief.") + 4) + (count_tokens("Hello there, Claude") + 4) + 3;
    assert_eq!(v["type"], "message");
    assert_eq!(v["model"], "claude-sonnet-4");
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["stop_sequence"].is_null());
    assert_eq!(count_tokens(v["content"][0]["text"].as_str().unwrap()), 16);
    assert!(v["stop_details"].is_null());
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": prompt - 5,
            "cache_creation_input_tokens": 2,
            "cache_read_input_tokens": 3,
            "cache_creation": {"ephemeral_5m_input_tokens": 2, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 16,
            "service_tier": "standard",
            "inference_geo": "not_available"
        })
    );
    assert_eq!(
        s.requests()[0].usage,
        Some(Usage {
            input_tokens: prompt - 5,
            output_tokens: 16,
            cached_tokens: 3,
            reasoning_tokens: 0,
            cache_creation_tokens: 2
        })
    );

    // max_tokens cap.
    let mut capped = body.clone();
    capped["max_tokens"] = json!(3);
    let v: Value = post_anthropic(&s, &capped, &[]).await.json().await.unwrap();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 3);

    // OpenAI-compatible endpoint with bearer auth.
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .bearer_auth(ANTHROPIC_KEY)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("request-id"));
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["usage"]["prompt_tokens"], chat_prompt_tokens());
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .header("x-api-key", ANTHROPIC_KEY)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn anthropic_stream_sequence() {
    let s = anthropic().await;
    let body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 50,
        "stream": true,
        "messages": [{"role": "user", "content": "Hello"}]
    });
    let r = post_anthropic(
        &s,
        &body,
        &[("x-mock-output-tokens", "10"), ("x-mock-chunks", "5")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = parse_sse(&r.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 5));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (n, d) in names.iter().zip(&data) {
        assert_eq!(d["type"], *n);
    }
    let prompt = count_tokens("Hello") + 4 + 3;
    assert!(data[0]["message"]["stop_reason"].is_null());
    assert!(data[0]["message"]["stop_details"].is_null());
    assert_eq!(
        data[0]["message"]["usage"],
        json!({
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
            "inference_geo": "not_available"
        })
    );
    let text: String = data[3..8]
        .iter()
        .map(|d| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, mock_text(10));
    let delta = &data[9];
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "end_turn", "stop_sequence": null, "stop_details": null})
    );
    // Cumulative: every count is the final total (output not an increment over
    // message_start's 1; input and cache counts repeated).
    assert_eq!(
        delta["usage"],
        json!({
            "input_tokens": prompt,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 10
        })
    );
    assert!(s.requests()[0].completed);
}

#[tokio::test]
async fn anthropic_stream_usage_with_cache_and_thinking() {
    let s = anthropic().await;
    let body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 50,
        "stream": true,
        "system": [{"type": "text", "text": "Long and stable instructions", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "Hello there"}]
    });
    let prompt =
        (count_tokens("Long and stable instructions") + 4) + (count_tokens("Hello there") + 4) + 3;
    let r = post_anthropic(
        &s,
        &body,
        &[
            ("x-mock-output-tokens", "6"),
            ("x-mock-cached-tokens", "5"),
            ("x-mock-cache-creation-tokens", "4"),
            ("x-mock-reasoning-tokens", "3"),
        ],
    )
    .await;
    let events = parse_sse(&r.text().await.unwrap());
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let start = &data[0]["message"]["usage"];
    assert_eq!(start["input_tokens"], prompt - 9);
    assert_eq!(start["cache_read_input_tokens"], 5);
    assert_eq!(start["cache_creation_input_tokens"], 4);
    assert_eq!(
        start["cache_creation"],
        json!({"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 0})
    );
    assert_eq!(start["output_tokens"], 1);
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(
        delta["usage"],
        json!({
            "input_tokens": prompt - 9,
            "cache_creation_input_tokens": 4,
            "cache_read_input_tokens": 5,
            "output_tokens": 9,
            "output_tokens_details": {"thinking_tokens": 3}
        })
    );
    assert_eq!(
        s.requests()[0].usage,
        Some(Usage {
            input_tokens: prompt - 9,
            output_tokens: 9,
            cached_tokens: 5,
            reasoning_tokens: 3,
            cache_creation_tokens: 4
        })
    );

    // JSON answer: thinking requested, no reasoning knob -> thinking_tokens 0.
    let mut json_body = body.clone();
    json_body["stream"] = json!(false);
    json_body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let v: Value = post_anthropic(&s, &json_body, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["usage"]["output_tokens_details"],
        json!({"thinking_tokens": 0})
    );
    assert_eq!(v["usage"]["output_tokens"], 16);
    // No thinking: no details object.
    json_body["thinking"] = json!({"type": "disabled"});
    let v: Value = post_anthropic(&s, &json_body, &[])
        .await
        .json()
        .await
        .unwrap();
    assert!(v["usage"].get("output_tokens_details").is_none());
}

/// On an Anthropic `path`: a Bearer key (OpenAI's style) is refused 401 in Anthropic's
/// shape, and a request without `anthropic-version` 400 `invalid_request_error`.
async fn assert_anthropic_headers_checked(s: &MockServer, path: &str, body: &Value) {
    let r = client()
        .post(url(s, path))
        .bearer_auth(ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}})
    );
    let r = client()
        .post(url(s, path))
        .header("x-api-key", ANTHROPIC_KEY)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
}

async fn post_count_tokens(
    s: &MockServer,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut rb = client()
        .post(url(s, "/v1/messages/count_tokens"))
        .header("x-api-key", ANTHROPIC_KEY)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    rb.send().await.unwrap()
}

#[tokio::test]
async fn anthropic_count_tokens() {
    let s = anthropic().await;
    // No max_tokens needed; system and tools accepted.
    let body = json!({
        "model": "claude-sonnet-4",
        "system": "Be brief.",
        "tools": [{"name": "lookup", "description": "Look a word up", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello there, Claude"}]},
            {"role": "assistant", "content": "Hi"},
            {"role": "user", "content": "What is a fox?"}
        ]
    });
    let r = post_count_tokens(&s, &body, &[]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert!(r.headers().contains_key("request-id"));
    let v: Value = r.json().await.unwrap();
    let n = v["input_tokens"].as_u64().unwrap();
    assert_eq!(v, json!({ "input_tokens": n }));

    // The same prompt through Messages reports the same input size.
    let mut msg = body.clone();
    msg["max_tokens"] = json!(10);
    let m: Value = post_anthropic(&s, &msg, &[]).await.json().await.unwrap();
    assert_eq!(m["usage"]["input_tokens"], n);
    // With cache knobs Messages splits it; count_tokens is the whole prompt.
    let m: Value = post_anthropic(
        &s,
        &msg,
        &[
            ("x-mock-cached-tokens", "3"),
            ("x-mock-cache-creation-tokens", "2"),
        ],
    )
    .await
    .json()
    .await
    .unwrap();
    let u = &m["usage"];
    assert_eq!(
        u["input_tokens"].as_u64().unwrap()
            + u["cache_read_input_tokens"].as_u64().unwrap()
            + u["cache_creation_input_tokens"].as_u64().unwrap(),
        n
    );
    let v: Value = post_count_tokens(&s, &body, &[("x-mock-cached-tokens", "3")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["input_tokens"], n);

    // Recorded like every request; free, so its usage is all zeros.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[0].path, "/v1/messages/count_tokens");
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].status, 200);
    assert!(reqs[0].completed);
    assert_eq!(reqs[0].usage, Some(Usage::default()));
    assert_eq!(reqs[0].json().unwrap()["model"], "claude-sonnet-4");

    // Auth and validation in Anthropic's shape.
    assert_anthropic_headers_checked(&s, "/v1/messages/count_tokens", &body).await;
    let r = post_count_tokens(&s, &json!({"model": "m", "messages": []}), &[]).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let r = post_count_tokens(
        &s,
        &json!({"messages": [{"role": "user", "content": "x"}]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(s.requests()[4..].iter().all(|r| r.usage.is_none()));

    // Faults and method.
    let r = post_count_tokens(&s, &body, &[("x-mock-fault", "429")]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let r = post_count_tokens(&s, &body, &[("x-mock-fault", "529")]).await;
    assert_eq!(r.status(), 529);
    let r = client()
        .get(url(&s, "/v1/messages/count_tokens"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
}

#[tokio::test]
async fn embeddings_float_and_base64() {
    let s = openai().await;
    let r = post_openai(
        &s,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": ["hello world", "abc"]}),
        &[],
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let floats: Vec<Vec<f32>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    assert_eq!(floats.len(), 2);
    assert_eq!(floats[0].len(), 8);
    let tokens = count_tokens("hello world") + count_tokens("abc");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": tokens, "total_tokens": tokens})
    );

    let r = post_openai(
        &s,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": ["hello world", "abc"], "encoding_format": "base64"}),
        &[],
    )
    .await;
    let v: Value = r.json().await.unwrap();
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(d["embedding"].as_str().unwrap())
            .unwrap();
        let decoded: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(decoded, floats[i]);
        assert_eq!(d["index"], i);
    }

    let r = post_openai(
        &s,
        "/v1/embeddings",
        &json!({"model": "m", "input": [[1, 2, 3], [4, 5]], "dimensions": 3}),
        &[],
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), 3);
    assert_eq!(s.requests()[2].usage.as_ref().unwrap().input_tokens, 5);
}

#[tokio::test]
async fn responses_json_and_stream() {
    let s = openai().await;
    let body = json!({"model": "gpt-4o", "input": "Tell me a story", "instructions": "Be nice"});
    let prompt = (count_tokens("Tell me a story") + 4) + (count_tokens("Be nice") + 4) + 3;
    let v: Value = post_openai(
        &s,
        "/v1/responses",
        &body,
        &[("x-mock-reasoning-tokens", "3")],
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["background"], false);
    assert_eq!(v["service_tier"], "default");
    assert_eq!(v["text"]["verbosity"], "medium");
    assert_eq!(v["top_logprobs"], 0);
    for key in ["max_tool_calls", "prompt_cache_key", "safety_identifier"] {
        assert!(v[key].is_null(), "{key}");
    }
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["type"], "output_text");
    assert_eq!(v["output"][0]["content"][0]["annotations"], json!([]));
    assert_eq!(v["output"][0]["content"][0]["logprobs"], json!([]));
    assert_eq!(
        count_tokens(v["output"][0]["content"][0]["text"].as_str().unwrap()),
        16
    );
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 19,
            "output_tokens_details": {"reasoning_tokens": 3},
            "total_tokens": prompt + 19
        })
    );

    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["input"] =
        json!([{"role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}]);
    let r = post_openai(&s, "/v1/responses", &sbody, &[("x-mock-chunks", "4")]).await;
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let events = parse_sse(&r.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    let mut expected = vec![
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ];
    expected.extend(std::iter::repeat_n("response.output_text.delta", 4));
    expected.extend([
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (i, (n, d)) in names.iter().zip(&data).enumerate() {
        assert_eq!(d["type"], *n);
        assert_eq!(d["sequence_number"], i);
    }
    let last = &data[data.len() - 1]["response"];
    assert_eq!(last["status"], "completed");
    assert_eq!(
        last["usage"],
        json!({
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 16,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + 16
        })
    );
    assert!(data[0]["response"]["usage"].is_null());
    // The tier asked for (default `auto`) while in progress, the serving one at the end.
    assert_eq!(data[0]["response"]["service_tier"], "auto");
    assert_eq!(last["service_tier"], "default");
    // Text deltas carry obfuscation padding them to a 16-char block; nothing else does.
    for (n, d) in names.iter().zip(&data) {
        if *n == "response.output_text.delta" {
            let o = d["obfuscation"].as_str().unwrap();
            assert_eq!(
                (d["delta"].as_str().unwrap().chars().count() + o.len()) % 16,
                0
            );
        } else {
            assert!(d.get("obfuscation").is_none(), "{n}");
        }
    }
    let mut quiet = sbody.clone();
    quiet["stream_options"] = json!({"include_obfuscation": false});
    quiet["service_tier"] = json!("flex");
    let text = post_openai(&s, "/v1/responses", &quiet, &[])
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("obfuscation"));
    let events = parse_sse(&text);
    let done: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(done["response"]["service_tier"], "flex");

    // max_output_tokens cap -> incomplete, like the real API.
    let mut capped = body.clone();
    capped["max_output_tokens"] = json!(4);
    let v: Value = post_openai(&s, "/v1/responses", &capped, &[])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(v["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn faults_openai_shapes() {
    let s = openai().await;
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-fault", "429")],
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["retry-after-ms"], "1000");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("Rate limit reached"));

    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-fault", "500")],
    )
    .await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "server_error");

    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-fault", "529")],
    )
    .await;
    assert_eq!(r.status(), 503);

    let reqs = s.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 500, 503]
    );
    assert!(reqs.iter().all(|r| r.usage.is_none() && r.completed));
}

#[tokio::test]
async fn fault_times_faults_only_the_first_tries_of_one_request_id() {
    let s = openai().await;
    let knobs = |id| {
        [
            ("x-mock-fault", "500"),
            ("x-mock-fault-times", "2"),
            ("x-request-id", id),
        ]
    };
    let mut statuses = Vec::new();
    for id in ["a", "a", "a", "b"] {
        let r = post_openai(&s, "/v1/chat/completions", &chat_body(), &knobs(id)).await;
        statuses.push(r.status().as_u16());
    }
    // Two faults for "a", then it succeeds; "b" is a new request and faults again.
    assert_eq!(statuses, vec![500, 500, 200, 500]);
}

#[tokio::test]
async fn fault_on_faults_only_the_named_providers() {
    let s = openai().await;
    let on = |names| [("x-mock-fault", "429"), ("x-mock-fault-on", names)];
    let mut statuses = Vec::new();
    for names in ["openai", "openai-b, openai", "openai-b", ""] {
        let r = post_openai(&s, "/v1/chat/completions", &chat_body(), &on(names)).await;
        statuses.push(r.status().as_u16());
    }
    // This mock is `openai`: faulted when named, answered when another is.
    assert_eq!(statuses, vec![429, 429, 200, 200]);
}

#[tokio::test]
async fn faults_anthropic_shapes() {
    let s = anthropic().await;
    let body =
        json!({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]});
    let r = post_anthropic(&s, &body, &[("x-mock-fault", "529")]).await;
    assert_eq!(r.status(), 529);
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    );
    let r = post_anthropic(&s, &body, &[("x-mock-fault", "429")]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let r = post_anthropic(&s, &body, &[("x-mock-fault", "500")]).await;
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    // Anthropic's OpenAI-compatible endpoint keeps 529.
    let r = client()
        .post(url(&s, "/v1/chat/completions"))
        .bearer_auth(ANTHROPIC_KEY)
        .header("x-mock-fault", "529")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    // Unknown path: Anthropic error shape.
    let r = client().get(url(&s, "/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn reset_fault_marks_incomplete() {
    let s = openai().await;
    // Stream: headers and half the chunks arrive, then the connection dies.
    let mut body = chat_body();
    body["stream"] = json!(true);
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &body,
        &[("x-mock-fault", "reset"), ("x-mock-chunks", "4")],
    )
    .await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut got = Vec::new();
    let mut errored = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => {
                errored = true;
                break;
            }
        }
    }
    assert!(errored, "stream should end with an error");
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("[DONE]"));
    assert_eq!(text.matches("\"content\":\"").count(), 1 + 2, "{text}"); // role chunk + 2 of 4

    // Non-stream: connection dropped before any response.
    let e = post_openai_result(&s, &chat_body(), ("x-mock-fault", "reset")).await;
    assert!(e.is_err());

    // Anthropic stream reset.
    let a = anthropic().await;
    let ab = json!({"model": "c", "max_tokens": 50, "stream": true, "messages": [{"role": "user", "content": "x"}]});
    let r = post_anthropic(&a, &ab, &[("x-mock-fault", "reset")]).await;
    assert!(r.text().await.is_err());

    let reqs = s.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].status, 200);
    assert!(!reqs[0].completed);
    assert_eq!(reqs[1].status, 0);
    assert!(reqs[1].usage.is_none());
    assert!(!reqs[1].completed);
    assert!(!a.requests()[0].completed);

    // The server still works afterwards.
    let r = post_openai(&s, "/v1/chat/completions", &chat_body(), &[]).await;
    assert_eq!(r.status(), 200);
}

async fn post_openai_result(
    s: &MockServer,
    body: &Value,
    h: (&str, &str),
) -> reqwest::Result<reqwest::Response> {
    client()
        .post(url(s, "/v1/chat/completions"))
        .bearer_auth(OPENAI_KEY)
        .header(h.0, h.1)
        .json(body)
        .send()
        .await
}

#[tokio::test]
async fn client_disconnect_mid_stream_is_recorded() {
    let s = openai().await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &body,
        &[("x-mock-chunk-delay-ms", "100"), ("x-mock-chunks", "4")],
    )
    .await;
    let mut stream = r.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(stream);
    // Wait past the time the full stream would have taken (4 x 100 ms).
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!s.requests()[0].completed);
    let r = post_openai(&s, "/v1/chat/completions", &chat_body(), &[]).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn delays_spread_over_time() {
    let s = openai().await;
    let mut body = chat_body();
    body["stream"] = json!(true);
    let t0 = Instant::now();
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &body,
        &[
            ("x-mock-latency-ms", "100"),
            ("x-mock-ttft-ms", "150"),
            ("x-mock-chunk-delay-ms", "80"),
            ("x-mock-chunks", "4"),
        ],
    )
    .await;
    let headers_at = t0.elapsed();
    assert!(headers_at >= Duration::from_millis(100), "{headers_at:?}");
    let mut stream = r.bytes_stream();
    let mut content_times = Vec::new();
    let mut all = String::new();
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        let s = String::from_utf8_lossy(&b).to_string();
        for _ in 0..s.matches("\"content\":\"the").count() + s.matches("\"content\":\" ").count() {
            content_times.push(t0.elapsed());
        }
        all.push_str(&s);
    }
    assert_eq!(content_times.len(), 4, "{all}");
    // Lower bounds only (sleeps are never shorter), with slack for a client
    // that reads late under load.
    assert!(
        content_times[0] >= Duration::from_millis(250),
        "{content_times:?}"
    );
    assert!(
        content_times[0] - headers_at >= Duration::from_millis(140),
        "{headers_at:?} {content_times:?}"
    );
    for w in content_times.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(40),
            "{content_times:?}"
        );
    }
    assert!(
        content_times[3] - content_times[0] >= Duration::from_millis(200),
        "{content_times:?}"
    );
}

#[tokio::test]
async fn admin_endpoint_lists_and_clears() {
    let s = openai().await;
    post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-custom", "1")],
    )
    .await;
    let v: Value = client()
        .get(url(&s, "/__mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 1);
    assert_eq!(arr[0]["provider"], "openai");
    assert_eq!(arr[0]["status"], 200);
    assert_eq!(arr[0]["completed"], true);
    assert_eq!(arr[0]["usage"]["output_tokens"], 16);
    assert!(arr[0]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h == &json!(["x-custom", "1"])));
    let r = client()
        .delete(url(&s, "/__mock/requests"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(s.requests().is_empty());
    let v: Value = client()
        .get(url(&s, "/__mock/requests"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!([]));
    assert!(s.requests().is_empty());
}

#[tokio::test]
async fn prefixes_models_and_deepseek_usage() {
    let ds = server("deepseek", ProviderKind::OpenAi, "", "ds-key-000000000000").await;
    let r = client()
        .post(url(&ds, "/chat/completions"))
        .bearer_auth("ds-key-000000000000")
        .header("x-mock-cached-tokens", "3")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["prompt_cache_hit_tokens"], 3);
    assert_eq!(
        v["usage"]["prompt_cache_miss_tokens"],
        chat_prompt_tokens() - 3
    );
    let r = client()
        .post(url(&ds, "/v1/chat/completions"))
        .bearer_auth("ds-key-000000000000")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let gm = server(
        "gemini",
        ProviderKind::OpenAi,
        "/v1beta/openai",
        "gm-key-000000000000",
    )
    .await;
    let r = client()
        .post(url(&gm, "/v1beta/openai/chat/completions?alt=x"))
        .bearer_auth("gm-key-000000000000")
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        gm.requests()[0].path,
        "/v1beta/openai/chat/completions?alt=x"
    );
    assert_eq!(gm.name(), "gemini");
    let v: Value = client()
        .get(url(&gm, "/v1beta/openai/models"))
        .bearer_auth("gm-key-000000000000")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert!(!v["data"].as_array().unwrap().is_empty());
    gm.shutdown().await;
}

#[tokio::test]
async fn h2c_prior_knowledge_works() {
    let s = openai().await;
    let c = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = c
        .post(url(&s, "/v1/chat/completions"))
        .bearer_auth(OPENAI_KEY)
        .json(&chat_body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let s = openai().await;
    let addr = s.addr();
    s.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn lying_usage_and_broken_bodies() {
    let s = openai().await;
    let lie = r#"{"prompt_tokens":-5,"completion_tokens":1e30,"total_tokens":"many"}"#;
    // JSON: the usage object is replaced, the rest of the answer is intact.
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-usage", lie)],
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"], serde_json::from_str::<Value>(lie).unwrap());
    assert!(v["choices"][0]["message"]["content"].is_string());
    // The recording keeps the truth.
    let rec = s.requests().pop().unwrap();
    assert_eq!(rec.usage.unwrap().input_tokens, chat_prompt_tokens());

    // SSE: the usage chunk carries the lie.
    let mut stream = chat_body();
    stream["stream"] = json!(true);
    stream["stream_options"] = json!({"include_usage": true});
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &stream,
        &[("x-mock-usage", lie)],
    )
    .await;
    let text = r.text().await.unwrap();
    assert!(text.contains(r#""prompt_tokens":-5"#), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");

    // Garbage and truncated bodies are still 200s.
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-body", "garbage")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).is_err());
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &chat_body(),
        &[("x-mock-body", "truncate")],
    )
    .await;
    let len: usize = r.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), len);
    assert!(serde_json::from_slice::<Value>(&body).is_err());
    let r = post_openai(
        &s,
        "/v1/chat/completions",
        &stream,
        &[("x-mock-body", "truncate")],
    )
    .await;
    let text = r.text().await.unwrap();
    assert!(
        !text.contains("[DONE]") && !text.contains("usage\":{"),
        "{text}"
    );
    assert!(
        !text.ends_with("\n\n"),
        "the last event must be cut: {text}"
    );
}
