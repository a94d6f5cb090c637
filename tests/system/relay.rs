//! Sluice's stream relay (the native module after the wasm filter): a provider that fails
//! after a stream started ends the client's stream with an error event in the API's own
//! shape, then a clean end of stream; streams that stall are cut the same way; failures
//! before anything reached the client are retried, then answered in the API's shape.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const DEMO_RELAY_CONFIG: &str = r#"value: '{"timeout_ms": 600000, "idle_timeout_ms": 240000}'"#;

/// The demo gateway with the relay configured by `relay_json`.
async fn gateway_with_relay(relay_json: &str) -> Gateway {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let yaml = render_demo_config(&mocks, &dir, None);
    assert_eq!(
        yaml.matches(DEMO_RELAY_CONFIG).count(),
        1,
        "demo relay config moved"
    );
    let yaml = yaml.replace(DEMO_RELAY_CONFIG, &format!("value: '{relay_json}'"));
    Gateway::start_config(mocks, dir, &yaml, 2).await
}

/// Reads the whole body; a transport error (what a reset stream gives) fails the test.
async fn read_to_end(resp: reqwest::Response) -> String {
    let bytes = resp
        .bytes()
        .await
        .expect("the stream must end cleanly, not with a transport error");
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A streamed chat completion from the gold tenant, with the mock's knobs in `headers`.
async fn stream_chat(gw: &Gateway, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .json(&json!({"model": "gpt-4.1-mini", "stream": true,
                      "messages": [{"role": "user", "content": "tell me a story"}]}));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

fn last_event_data(text: &str) -> Value {
    let data = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .and_then(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .unwrap_or_else(|| panic!("no final data event in {text:?}"));
    serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_stream_broken_off_by_the_provider_ends_with_an_error_chunk() {
    let gw = Gateway::start().await;
    let resp = stream_chat(&gw, &[("x-mock-fault", "reset"), ("x-mock-chunks", "4")]).await;
    assert_eq!(resp.status(), 200);
    let text = read_to_end(resp).await;
    assert!(
        text.contains("\"choices\""),
        "content before the failure: {text}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    let error = last_event_data(&text);
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    assert_eq!(error["error"]["code"], "upstream_failed");

    let log = gw.access_log(1).await;
    let line = &log[0];
    assert!(
        line["relay"]
            .as_str()
            .unwrap()
            .starts_with("upstream_reset_after_response_started"),
        "{line}"
    );
    let record = &line["sluice"];
    assert_eq!(record["outcome"], "upstream_error", "{record}");
    assert_eq!(record["estimated"], true, "{record}");
    assert!(record["output_tokens"].as_u64().unwrap() > 0, "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_stream_broken_off_by_the_provider_ends_with_an_error_event() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .header("x-mock-fault", "reset")
        .json(
            &json!({"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": true,
                      "messages": [{"role": "user", "content": "tell me a story"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = read_to_end(resp).await;
    assert!(text.contains("event: content_block_delta"), "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\n"), "{last}");
    let error = last_event_data(&text);
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "api_error");
    let log = gw.access_log(1).await;
    assert_eq!(log[0]["sluice"]["outcome"], "upstream_error", "{}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_streams_are_complete_metered_and_carry_no_internal_headers() {
    let gw = Gateway::start().await;
    let resp = stream_chat(&gw, &[("x-mock-chunks", "5")]).await;
    assert_eq!(resp.status(), 200);
    let text = read_to_end(resp).await;
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let reqs = gw.mocks.all();
    assert_eq!(reqs.len(), 1);
    let names: Vec<&str> = reqs[0].headers.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-sluice-")),
        "internal headers reached the provider: {names:?}"
    );
    assert!(names.contains(&"authorization"), "{names:?}");
    let log = gw.access_log(1).await;
    let record = &log[0]["sluice"];
    assert_eq!(record["outcome"], "success", "{record}");
    assert_eq!(record["estimated"], false, "{record}");
    let usage = reqs[0].usage.as_ref().unwrap();
    assert_eq!(
        record["output_tokens"].as_u64(),
        Some(usage.output_tokens),
        "{record}"
    );
    assert_eq!(log[0]["relay"], "-", "no failure noted: {}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_is_cut_with_a_timeout_event() {
    let gw = gateway_with_relay(r#"{"idle_timeout_ms": 400}"#).await;
    let start = Instant::now();
    let resp = stream_chat(
        &gw,
        &[("x-mock-chunks", "4"), ("x-mock-chunk-delay-ms", "3000")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = read_to_end(resp).await;
    assert!(
        start.elapsed() < Duration::from_millis(2500),
        "cut after {:?}",
        start.elapsed()
    );
    let error = last_event_data(&text);
    assert_eq!(error["error"]["code"], "upstream_timeout", "{text}");
    let log = gw.access_log(1).await;
    assert_eq!(log[0]["relay"], "stream_idle_timeout", "{}", log[0]);
    assert_eq!(log[0]["sluice"]["outcome"], "upstream_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_429_before_the_stream_is_retried_after_its_retry_after() {
    let gw = gateway_with_relay(
        r#"{"retry": {"num_retries": 1, "statuses": [429], "retry_after_max_ms": 5000}}"#,
    )
    .await;
    let resp = stream_chat(
        &gw,
        &[
            ("x-request-id", "relay-retry-1"),
            ("x-mock-fault", "429"),
            ("x-mock-fault-times", "1"),
        ],
    )
    .await;
    assert_eq!(resp.status(), 200);
    let text = read_to_end(resp).await;
    assert!(text.contains("[DONE]"), "{text}");
    let statuses: Vec<u16> = gw.mocks.all().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![429, 200]);
    let log = gw.access_log(1).await;
    assert_eq!(log[0]["sluice"]["outcome"], "success", "{}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_is_answered_in_the_clients_api_shape() {
    let mocks = Mocks::start().await;
    let dir = unique_dir();
    let yaml = render_demo_config(&mocks, &dir, None);
    // Nothing listens on the Anthropic cluster's port any more.
    let port = mocks.anthropic.addr().port();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let yaml = yaml.replace(
        &format!("port_value: {port}"),
        &format!("port_value: {dead_port}"),
    );
    let yaml = yaml.replace(
        DEMO_RELAY_CONFIG,
        r#"value: '{"retry": {"num_retries": 2, "base_interval_ms": 10}}'"#,
    );
    let gw = Gateway::start_config(mocks, dir, &yaml, 2).await;
    let resp = gw
        .client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", ACME)
        .header("anthropic-version", "2023-06-01")
        .json(
            &json!({"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": true,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], "api_error", "{body}");
    let log = gw.access_log(1).await;
    assert!(
        log[0]["relay"]
            .as_str()
            .unwrap()
            .starts_with("upstream_reset_before_response_started"),
        "{}",
        log[0]
    );
    assert_eq!(log[0]["sluice"]["outcome"], "upstream_error", "{}", log[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_streamed_still_go_through_the_router() {
    let gw = Gateway::start().await;
    let resp = gw
        .client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .header("x-mock-fault", "reset")
        .json(&json!({"model": "gpt-4.1-mini",
                      "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    // The router's own answer for a reset before headers (local_reply_config shapes it).
    assert_eq!(resp.status(), 503);
    let log = gw.access_log(1).await;
    assert_eq!(log[0]["relay"], "-", "{}", log[0]);
    assert!(
        log[0]["details"]
            .as_str()
            .unwrap()
            .starts_with("upstream_reset_before_response_started"),
        "{}",
        log[0]
    );
}

/// A gzip-compressed streamed request: Envoy's decompressor ends it with trailers, which
/// end the request for the relay too. Over HTTP/1.1 and HTTP/2, the stream is relayed whole
/// and the provider gets the inflated body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_request_ended_by_trailers_is_relayed() {
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let gw = Gateway::start().await;
    let body = json!({"model": "gpt-4.1-mini", "stream": true,
                      "messages": [{"role": "user", "content": "compressed hello"}]});
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    encoder.write_all(body.to_string().as_bytes()).unwrap();
    let compressed = encoder.finish().unwrap();
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [&gw.client, &h2] {
        let resp = client
            .post(gw.url("/v1/chat/completions"))
            .bearer_auth(ACME)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(compressed.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = read_to_end(resp).await;
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    }
    let reqs = gw.mocks.all();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        assert!(r.body.contains("compressed hello"), "{}", r.body);
        assert!(
            !r.headers.iter().any(|(n, _)| n == "content-encoding"),
            "{:?}",
            r.headers
        );
    }
}
