//! Streaming responses pass through chunk by chunk: the client sees the first chunk
//! while the provider is still generating.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};

async fn first_chunk_and_total(
    resp: reqwest::Response,
    start: Instant,
) -> (Duration, Duration, String) {
    let mut stream = resp.bytes_stream();
    let mut first = None;
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        if first.is_none() && !chunk.is_empty() {
            first = Some(start.elapsed());
        }
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    (first.unwrap(), start.elapsed(), text)
}

/// The mock spends 5 gaps x 250 ms between its 6 chunks; a buffered stream would reach
/// the client only at the end, so the first chunk must arrive well before the last.
fn assert_streamed(first: Duration, total: Duration) {
    assert!(
        total >= Duration::from_millis(1200),
        "total {total:?}: the mock did not pace the stream"
    );
    assert!(
        first + Duration::from_millis(750) < total,
        "first chunk after {first:?} of {total:?}: the gateway buffered the stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_stream_is_not_buffered() {
    let gw = Gateway::start().await;
    let start = Instant::now();
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-mock-chunks", "6")
        .header("x-mock-chunk-delay-ms", "250")
        .json(&json!({"model": "gpt-4.1-mini", "stream": true, "messages": [{"role": "user", "content": "stream please"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (first, total, text) = first_chunk_and_total(resp, start).await;
    assert_streamed(first, total);
    assert!(text.contains("data: [DONE]"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_stream_is_not_buffered() {
    let gw = Gateway::start().await;
    let start = Instant::now();
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-chunks", "6")
        .header("x-mock-chunk-delay-ms", "250")
        .json(
            &json!({"model": "claude-sonnet", "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": "stream please"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (first, total, text) = first_chunk_and_total(resp, start).await;
    assert_streamed(first, total);
    assert!(text.contains("event: message_stop"), "{text}");
}
