use super::*;
use crate::config::{parse, RetryPolicy};

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Start(Vec<u8>, Vec<Header>, Vec<u8>),
    Reset(u64),
    Headers(Vec<Header>, bool),
    Data(String, bool),
    Trailers,
    Wake(u64),
    Note(String, u32),
}

#[derive(Default)]
struct FakeHost {
    calls: Vec<Call>,
    next_stream: u64,
    refuse: Option<StartFailure>,
    /// Clusters whose starts fail with `CannotCreate` (no healthy host).
    unhealthy: Vec<Vec<u8>>,
}

impl Host for FakeHost {
    fn start_stream(
        &mut self,
        cluster: &[u8],
        headers: &[Header],
        body: &[u8],
    ) -> Result<u64, StartFailure> {
        self.calls.push(Call::Start(
            cluster.to_vec(),
            headers.to_vec(),
            body.to_vec(),
        ));
        if let Some(f) = self.refuse {
            return Err(f);
        }
        if self.unhealthy.iter().any(|c| c == cluster) {
            return Err(StartFailure::CannotCreate);
        }
        self.next_stream += 1;
        Ok(self.next_stream)
    }
    fn reset_stream(&mut self, stream: u64) {
        self.calls.push(Call::Reset(stream));
    }
    fn send_headers(&mut self, headers: &[Header], end_stream: bool) {
        self.calls.push(Call::Headers(headers.to_vec(), end_stream));
    }
    fn send_data(&mut self, data: &[u8], end_stream: bool) {
        let text = String::from_utf8_lossy(data).into_owned();
        self.calls.push(Call::Data(text, end_stream));
    }
    fn send_trailers(&mut self, _: &[Header]) {
        self.calls.push(Call::Trailers);
    }
    fn wake_at(&mut self, at_ms: u64) {
        self.calls.push(Call::Wake(at_ms));
    }
    fn note(&mut self, cause: &str, attempts: u32) {
        self.calls.push(Call::Note(cause.into(), attempts));
    }
}

impl FakeHost {
    fn take(&mut self) -> Vec<Call> {
        std::mem::take(&mut self.calls)
    }
    fn sent_data(&self) -> Vec<(String, bool)> {
        self.calls
            .iter()
            .filter_map(|c| match c {
                Call::Data(d, e) => Some((d.clone(), *e)),
                _ => None,
            })
            .collect()
    }
}

fn h(name: &str, value: &str) -> Header {
    (name.as_bytes().to_vec(), value.as_bytes().to_vec())
}

fn request_headers() -> Vec<Header> {
    vec![
        h(":method", "POST"),
        h(":path", "/v1/chat/completions"),
        h(":authority", "api.openai.com"),
        h("authorization", "Bearer sk-provider"),
        h("x-sluice-cluster", "openai"),
        h("x-sluice-relay", "openai"),
        h("x-envoy-max-retries", "0"),
        h("content-length", "999"),
        h("connection", "keep-alive"),
    ]
}

fn config(json: &str) -> Arc<RelayConfig> {
    Arc::new(parse(json.as_bytes()).unwrap())
}

/// An exchange that took a relayed request and made its first attempt (stream 1).
fn started(cfg: &Arc<RelayConfig>, flavour: &str) -> (Exchange, FakeHost) {
    let mut ex = Exchange::new(cfg.clone(), 7);
    let mut host = FakeHost::default();
    assert_eq!(
        ex.on_request_headers(Some(flavour.as_bytes()), 0),
        HeadersVerdict::Take
    );
    ex.on_request_complete(
        &mut host,
        request_headers(),
        b"{\"stream\":true}".to_vec(),
        0,
    );
    (ex, host)
}

fn ok_headers() -> Vec<Header> {
    vec![
        h(":status", "200"),
        h("content-type", "text/event-stream"),
        h("transfer-encoding", "chunked"),
    ]
}

#[test]
fn unmarked_requests_pass_to_the_router() {
    let cfg = config("{}");
    let mut ex = Exchange::new(cfg.clone(), 1);
    assert_eq!(ex.on_request_headers(None, 0), HeadersVerdict::Pass);
    assert!(!ex.is_taken());
    let mut ex = Exchange::new(cfg, 1);
    assert_eq!(
        ex.on_request_headers(Some(b"cohere"), 0),
        HeadersVerdict::Pass
    );
}

#[test]
fn the_provider_gets_sluices_request_without_internal_or_hop_headers() {
    let (_, mut host) = started(&config("{}"), "openai");
    let calls = host.take();
    let Call::Start(cluster, headers, body) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(cluster, b"openai");
    assert_eq!(body, b"{\"stream\":true}");
    let names: Vec<_> = headers
        .iter()
        .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
        .collect();
    // None of Sluice's headers: the attempt's number only goes with a chain.
    assert!(
        !names.iter().any(|n| n.starts_with("x-sluice-")),
        "{names:?}"
    );
    assert!(!names.contains(&"connection".to_string()));
    assert!(!names.contains(&"x-envoy-max-retries".to_string()));
    assert!(headers.contains(&h("content-length", "15")), "{headers:?}");
    assert!(headers.contains(&h("authorization", "Bearer sk-provider")));
    // The default 4-minute stall limit is armed.
    assert_eq!(calls[1], Call::Wake(240_000));
}

#[test]
fn a_stream_is_relayed_and_ends_cleanly() {
    let (mut ex, mut host) = started(&config("{}"), "openai");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 5);
    ex.on_stream_data(&mut host, 1, &[b"data: a\n\n", b"data: b\n\n"], false, 6);
    ex.on_stream_data(&mut host, 1, &[b"data: [DONE]\n\n"], true, 7);
    ex.on_stream_complete(&mut host, 1);
    let calls = host.take();
    let Call::Headers(headers, false) = &calls[2] else {
        panic!("{calls:?}")
    };
    assert!(!headers.iter().any(|(n, _)| n == b"transfer-encoding"));
    let data: Vec<_> = calls
        .iter()
        .filter(|c| matches!(c, Call::Data(..)))
        .cloned()
        .collect();
    assert_eq!(
        data,
        vec![
            Call::Data("data: a\n\n".into(), false),
            Call::Data("data: b\n\n".into(), false),
            Call::Data("data: [DONE]\n\n".into(), true),
        ]
    );
    assert!(!calls.iter().any(|c| matches!(c, Call::Note(..))));
}

#[test]
fn a_reset_after_the_response_started_ends_with_an_openai_error_chunk() {
    let (mut ex, mut host) = started(&config("{}"), "openai");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 5);
    ex.on_stream_data(&mut host, 1, &[b"data: a\n\n"], false, 6);
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 7);
    let calls = host.take();
    assert_eq!(
        calls[0],
        Call::Note(
            "upstream_reset_after_response_started{remote_reset}".into(),
            1
        ),
        "noted before the last send, which may write the access log"
    );
    let Call::Data(event, true) = &calls[1] else {
        panic!("{calls:?}")
    };
    let json = event
        .strip_prefix("data: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert_eq!(v["error"]["code"], "upstream_failed");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("remote_reset"));
    // Nothing more happens: a late event for the stream is ignored.
    ex.on_stream_data(&mut host, 1, &[b"late"], true, 8);
    assert!(host.take().is_empty());
}

#[test]
fn a_reset_after_the_response_started_ends_with_an_anthropic_error_event() {
    let (mut ex, mut host) = started(&config("{}"), "anthropic");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 5);
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::ConnectionTermination, 7);
    let data = host.sent_data();
    let (event, true) = &data[0] else {
        panic!("{data:?}")
    };
    let json = event
        .strip_prefix("event: error\ndata: ")
        .and_then(|e| e.strip_suffix("\n\n"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "api_error");
}

#[test]
fn a_stalled_stream_is_cut_with_a_timeout_event() {
    let (mut ex, mut host) = started(&config(r#"{"idle_timeout_ms":1000}"#), "openai");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 100);
    ex.on_stream_data(&mut host, 1, &[b"data: a\n\n"], false, 500);
    host.take();
    // An early wake (armed for the headers' deadline) finds the stream active: re-armed.
    ex.on_timer(&mut host, 1100);
    assert_eq!(host.take(), vec![Call::Wake(1500)]);
    ex.on_timer(&mut host, 1500);
    let calls = host.take();
    assert_eq!(calls[0], Call::Reset(1));
    assert_eq!(calls[1], Call::Note("stream_idle_timeout".into(), 1));
    let Call::Data(event, true) = &calls[2] else {
        panic!("{calls:?}")
    };
    assert!(event.contains("upstream_timeout"), "{event}");
}

#[test]
fn the_overall_timeout_applies_before_and_after_headers() {
    let cfg = config(r#"{"timeout_ms":2000,"idle_timeout_ms":0}"#);
    let (mut ex, mut host) = started(&cfg, "anthropic");
    assert_eq!(host.take()[1], Call::Wake(2000));
    ex.on_timer(&mut host, 2000);
    let calls = host.take();
    assert_eq!(calls[0], Call::Reset(1));
    let Call::Headers(headers, false) = &calls[2] else {
        panic!("{calls:?}")
    };
    assert!(headers.contains(&h(":status", "504")), "{headers:?}");
    let (body, true) = &host_data(&calls)[0] else {
        panic!()
    };
    assert!(body.contains("timeout_error"), "{body}");

    let (mut ex, mut host) = started(&cfg, "openai");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 10);
    host.take();
    ex.on_timer(&mut host, 2001);
    let data = host.sent_data();
    assert!(data[0].0.starts_with("data: {\"error\""), "{data:?}");
}

fn host_data(calls: &[Call]) -> Vec<(String, bool)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Data(d, e) => Some((d.clone(), *e)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_reset_before_headers_is_retried_then_answered_in_the_api_shape() {
    let cfg = config(r#"{"retry":{"num_retries":1,"base_interval_ms":100}}"#);
    let (mut ex, mut host) = started(&cfg, "anthropic");
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::ConnectionFailure, 10);
    let calls = host.take();
    let [Call::Reset(1), Call::Wake(at)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    assert!(
        (10..110).contains(at),
        "jittered back-off within the base: {at}"
    );
    ex.on_timer(&mut host, *at);
    assert!(matches!(host.take()[0], Call::Start(..)), "second attempt");
    ex.on_stream_reset(&mut host, 2, ResetReason::ConnectionFailure, 200);
    let calls = host.take();
    assert_eq!(
        calls[1],
        Call::Note(
            "upstream_reset_before_response_started{connection_failure}".into(),
            2
        )
    );
    // A reset after the provider got the request is retried only with `on_reset`.
    let (mut ex, mut host) = started(&cfg, "openai");
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 10);
    assert!(matches!(&host.take()[2], Call::Headers(h, false) if h[0].1 == b"503"));
    let cfg = config(r#"{"retry":{"num_retries":1,"on_reset":true}}"#);
    let (mut ex, mut host) = started(&cfg, "openai");
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 10);
    assert!(matches!(
        host.take().as_slice(),
        [Call::Reset(1), Call::Wake(_)]
    ));
    let Call::Headers(headers, false) = &calls[2] else {
        panic!("{calls:?}")
    };
    assert!(headers.contains(&h(":status", "503")));
    assert!(headers.contains(&h("content-type", "application/json")));
    let (body, true) = &host_data(&calls)[0] else {
        panic!()
    };
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["type"], "api_error");
}

#[test]
fn a_retriable_status_waits_out_a_short_retry_after_and_the_last_answer_passes() {
    let cfg = config(
        r#"{"retry":{"num_retries":1,"statuses":[429],"base_interval_ms":10,"retry_after_max_ms":3000}}"#,
    );
    let (mut ex, mut host) = started(&cfg, "openai");
    host.take();
    let limited = vec![h(":status", "429"), h("retry-after", "2")];
    ex.on_stream_headers(&mut host, 1, &limited, false, 100);
    assert_eq!(host.take(), vec![Call::Reset(1), Call::Wake(2100)]);
    ex.on_stream_data(&mut host, 1, &[b"{}"], true, 101);
    assert!(
        host.take().is_empty(),
        "the refused attempt's body is dropped"
    );
    ex.on_timer(&mut host, 2100);
    assert!(matches!(host.take()[0], Call::Start(..)));
    // Out of retries: the provider's own 429 reaches the client as it is.
    ex.on_stream_headers(&mut host, 2, &limited, false, 2200);
    ex.on_stream_data(&mut host, 2, &[b"{\"error\":{}}"], true, 2201);
    let calls = host.take();
    assert!(matches!(&calls[0], Call::Headers(h, false) if h[0].1 == b"429"));
    assert_eq!(host_data(&calls), vec![("{\"error\":{}}".into(), true)]);
}

#[test]
fn a_long_retry_after_falls_back_to_the_regular_back_off() {
    let cfg = config(
        r#"{"retry":{"num_retries":1,"statuses":[429],"base_interval_ms":10,"retry_after_max_ms":3000}}"#,
    );
    let (mut ex, mut host) = started(&cfg, "openai");
    host.take();
    ex.on_stream_headers(
        &mut host,
        1,
        &[h(":status", "429"), h("retry-after", "60")],
        false,
        100,
    );
    let calls = host.take();
    let [Call::Reset(1), Call::Wake(at)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    assert!((100..110).contains(at), "{at}");
}

#[test]
fn no_retry_without_a_policy() {
    assert_eq!(config("{}").retry, RetryPolicy::NONE);
    let (mut ex, mut host) = started(&config("{}"), "openai");
    host.take();
    ex.on_stream_headers(&mut host, 1, &[h(":status", "503")], false, 1);
    assert!(matches!(&host.take()[0], Call::Headers(_, false)));
}

#[test]
fn a_start_failure_is_answered_at_once() {
    let cfg = config("{}");
    let mut ex = Exchange::new(cfg, 1);
    let mut host = FakeHost {
        refuse: Some(StartFailure::CannotCreate),
        ..FakeHost::default()
    };
    ex.on_request_headers(Some(b"openai"), 0);
    ex.on_request_complete(&mut host, request_headers(), Vec::new(), 0);
    let calls = host.take();
    assert_eq!(calls[1], Call::Note("no_healthy_upstream".into(), 1));
    assert!(
        matches!(&calls[2], Call::Headers(h, false) if h[0].1 == b"503"),
        "{calls:?}"
    );
}

#[test]
fn a_request_without_a_cluster_is_an_internal_error() {
    let mut ex = Exchange::new(config("{}"), 1);
    let mut host = FakeHost::default();
    ex.on_request_headers(Some(b"openai"), 0);
    let headers = request_headers()
        .into_iter()
        .filter(|(n, _)| n != b"x-sluice-cluster")
        .collect();
    ex.on_request_complete(&mut host, headers, Vec::new(), 0);
    let calls = host.take();
    assert!(
        matches!(&calls[1], Call::Headers(h, false) if h[0].1 == b"500"),
        "{calls:?}"
    );
}

#[test]
fn a_client_that_leaves_stops_the_provider_call() {
    let (mut ex, mut host) = started(&config("{}"), "openai");
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 5);
    host.take();
    ex.on_downstream_gone(&mut host);
    assert_eq!(host.take(), vec![Call::Reset(1)]);
    ex.on_stream_reset(&mut host, 1, ResetReason::LocalReset, 6);
    ex.on_downstream_gone(&mut host);
    assert!(host.take().is_empty());
}

#[test]
fn envoys_own_answer_for_an_unreachable_provider_counts_as_a_reset() {
    let cfg = config(r#"{"retry":{"num_retries":1,"base_interval_ms":10}}"#);
    let (mut ex, mut host) = started(&cfg, "openai");
    host.take();
    let envoy_reply = vec![
        h(":status", "503"),
        h("content-type", "text/plain"),
        h("content-length", "91"),
    ];
    ex.on_stream_headers(&mut host, 1, &envoy_reply, false, 10);
    let calls = host.take();
    assert!(
        matches!(calls.as_slice(), [Call::Reset(1), Call::Wake(_)]),
        "retried: {calls:?}"
    );
    // A provider's own 503 (it has a date) reaches the client as it is.
    ex.on_timer(&mut host, 100);
    host.take();
    let provider_reply = vec![
        h(":status", "503"),
        h("content-type", "text/plain"),
        h("date", "Tue, 01 Dec 2026 00:00:00 GMT"),
    ];
    ex.on_stream_headers(&mut host, 2, &provider_reply, false, 110);
    assert!(matches!(&host.take()[0], Call::Headers(h, false) if h[0].1 == b"503"));
}

#[test]
fn a_client_that_leaves_during_a_back_off_gets_no_further_attempt() {
    let cfg = config(r#"{"retry":{"num_retries":2,"statuses":[503],"base_interval_ms":10}}"#);
    let (mut ex, mut host) = started(&cfg, "openai");
    ex.on_stream_headers(
        &mut host,
        1,
        &[h(":status", "503"), h("date", "x")],
        false,
        5,
    );
    host.take();
    ex.on_downstream_gone(&mut host);
    ex.on_timer(&mut host, 1_000);
    assert!(host.take().is_empty());
}

// ---- Fallback across a chain of clusters (issue 18) ----

/// An exchange that took a relayed request for `chain` and made its first attempt.
fn started_on(cfg: &Arc<RelayConfig>, chain: &str, host: FakeHost) -> (Exchange, FakeHost) {
    let mut ex = Exchange::new(cfg.clone(), 7);
    let mut host = host;
    ex.on_request_headers(Some(b"openai"), 0);
    let headers = request_headers()
        .into_iter()
        .map(|(n, v)| {
            if n == b"x-sluice-cluster" {
                (n, chain.as_bytes().to_vec())
            } else {
                (n, v)
            }
        })
        .collect();
    ex.on_request_complete(&mut host, headers, b"{}".to_vec(), 0);
    (ex, host)
}

/// The clusters and attempt numbers of the starts among `calls`.
fn starts(calls: &[Call]) -> Vec<(String, String)> {
    calls
        .iter()
        .filter_map(|c| match c {
            Call::Start(cluster, headers, _) => {
                let attempt: Vec<_> = headers
                    .iter()
                    .filter(|(n, _)| n == b"x-sluice-attempt")
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                    .collect();
                Some((
                    String::from_utf8_lossy(cluster).into_owned(),
                    attempt.join("|"),
                ))
            }
            _ => None,
        })
        .collect()
}

fn pair(cluster: &str, attempt: &str) -> (String, String) {
    (cluster.into(), attempt.into())
}

const STATUSES: &str = r#"{"retry":{"num_retries":1,"statuses":[429,503],"base_interval_ms":500,"retry_after_max_ms":60000}}"#;

#[test]
fn each_attempt_goes_to_the_next_cluster_of_the_chain_at_once() {
    let (mut ex, mut host) = started_on(&config(STATUSES), "a, b,c", FakeHost::default());
    assert_eq!(starts(&host.take()), vec![pair("a", "1")]);
    // A 429 with a short retry-after: that was a's; b is tried at once.
    let limited = vec![h(":status", "429"), h("retry-after", "2"), h("date", "x")];
    ex.on_stream_headers(&mut host, 1, &limited, false, 100);
    let calls = host.take();
    assert_eq!(calls[0], Call::Reset(1));
    assert_eq!(starts(&calls), vec![pair("b", "2")]);
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, Call::Wake(at) if *at < 240_000)),
        "no back-off: {calls:?}"
    );
    // More attempts than `retry.num_retries` allows: the chain's length decides.
    ex.on_stream_headers(
        &mut host,
        2,
        &[h(":status", "503"), h("date", "x")],
        false,
        110,
    );
    assert_eq!(starts(&host.take()), vec![pair("c", "3")]);
    ex.on_stream_headers(&mut host, 3, &ok_headers(), false, 120);
    ex.on_stream_data(&mut host, 3, &[b"data: [DONE]\n\n"], true, 121);
    let calls = host.take();
    assert!(
        matches!(&calls[0], Call::Headers(h, false) if h[0].1 == b"200"),
        "{calls:?}"
    );
    assert!(!calls.iter().any(|c| matches!(c, Call::Note(..))));
}

#[test]
fn the_chain_gives_each_cluster_one_attempt_and_the_last_answer_passes() {
    let cfg = config(r#"{"retry":{"num_retries":5,"statuses":[503]}}"#);
    let (mut ex, mut host) = started_on(&cfg, "a,b", FakeHost::default());
    host.take();
    let busy = vec![h(":status", "503"), h("date", "x")];
    ex.on_stream_headers(&mut host, 1, &busy, false, 10);
    assert_eq!(starts(&host.take()), vec![pair("b", "2")]);
    ex.on_stream_headers(&mut host, 2, &busy, false, 20);
    let calls = host.take();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(matches!(&calls[0], Call::Headers(h, false) if h[0].1 == b"503"));
}

#[test]
fn a_reset_before_headers_moves_on_without_on_reset_or_any_retry_policy() {
    for reason in [ResetReason::RemoteReset, ResetReason::ConnectionFailure] {
        let cfg = config(r#"{"retry":{"num_retries":0,"on_connect_failure":false}}"#);
        let (mut ex, mut host) = started_on(&cfg, "a,b", FakeHost::default());
        host.take();
        ex.on_stream_reset(&mut host, 1, reason, 10);
        let calls = host.take();
        assert_eq!(calls[0], Call::Reset(1));
        assert_eq!(starts(&calls), vec![pair("b", "2")], "{reason:?}");
    }
    let (mut ex, mut host) = started_on(&config("{}"), "a,b", FakeHost::default());
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 10);
    assert_eq!(starts(&host.take()), vec![pair("b", "2")]);
    // The last cluster fails too: answered, with both attempts noted.
    ex.on_stream_reset(&mut host, 2, ResetReason::ConnectionTermination, 20);
    let calls = host.take();
    assert_eq!(
        calls[1],
        Call::Note(
            "upstream_reset_before_response_started{connection_termination}".into(),
            2
        )
    );
    assert!(matches!(&calls[2], Call::Headers(h, false) if h[0].1 == b"503"));
}

#[test]
fn on_reset_still_governs_retrying_a_single_cluster() {
    let (mut ex, mut host) = started_on(
        &config(r#"{"retry":{"num_retries":2}}"#),
        "a",
        FakeHost::default(),
    );
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 10);
    let calls = host.take();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(matches!(&calls[2], Call::Headers(h, false) if h[0].1 == b"503"));
    // A connect failure on one cluster backs off, then tries the same cluster again.
    let (mut ex, mut host) = started_on(
        &config(r#"{"retry":{"num_retries":2,"base_interval_ms":100}}"#),
        "a",
        FakeHost::default(),
    );
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::ConnectionFailure, 10);
    let calls = host.take();
    let [Call::Reset(1), Call::Wake(at)] = calls.as_slice() else {
        panic!("{calls:?}")
    };
    ex.on_timer(&mut host, *at);
    assert_eq!(starts(&host.take()), vec![pair("a", "")]);
}

#[test]
fn a_status_outside_fallback_statuses_passes_even_with_a_chain() {
    let (mut ex, mut host) = started_on(
        &config(r#"{"fallback_statuses":[503]}"#),
        "a,b",
        FakeHost::default(),
    );
    host.take();
    ex.on_stream_headers(
        &mut host,
        1,
        &[h(":status", "429"), h("date", "x")],
        false,
        10,
    );
    let calls = host.take();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert!(matches!(&calls[0], Call::Headers(h, false) if h[0].1 == b"429"));
}

#[test]
fn nothing_moves_on_once_the_response_started() {
    let (mut ex, mut host) = started_on(&config(STATUSES), "a,b", FakeHost::default());
    ex.on_stream_headers(&mut host, 1, &ok_headers(), false, 5);
    ex.on_stream_data(&mut host, 1, &[b"data: a\n\n"], false, 6);
    host.take();
    ex.on_stream_reset(&mut host, 1, ResetReason::RemoteReset, 7);
    let calls = host.take();
    assert!(starts(&calls).is_empty(), "{calls:?}");
    assert_eq!(
        calls[0],
        Call::Note(
            "upstream_reset_after_response_started{remote_reset}".into(),
            1
        )
    );
}

#[test]
fn a_cluster_without_a_healthy_host_is_passed_over() {
    let host = FakeHost {
        unhealthy: vec![b"a".to_vec()],
        ..FakeHost::default()
    };
    let (mut ex, mut host) = started_on(&config("{}"), "a,b", host);
    assert_eq!(starts(&host.take()), vec![pair("a", "1"), pair("b", "2")]);
    ex.on_stream_headers(&mut host, 1, &ok_headers(), true, 5);
    assert!(matches!(&host.take()[0], Call::Headers(h, true) if h[0].1 == b"200"));
    // Every cluster unhealthy: answered after one attempt each.
    let host = FakeHost {
        unhealthy: vec![b"a".to_vec(), b"b".to_vec()],
        ..FakeHost::default()
    };
    let (_, mut host) = started_on(&config("{}"), "a,b", host);
    let calls = host.take();
    assert_eq!(starts(&calls).len(), 2);
    assert!(calls.contains(&Call::Note("no_healthy_upstream".into(), 2)));
}

#[test]
fn the_attempt_header_is_the_relays_own() {
    let mut ex = Exchange::new(config(STATUSES), 1);
    let mut host = FakeHost::default();
    ex.on_request_headers(Some(b"openai"), 0);
    let mut headers = request_headers();
    headers.push(h("x-sluice-attempt", "9"));
    ex.on_request_complete(&mut host, headers, Vec::new(), 0);
    assert_eq!(
        starts(&host.take()),
        vec![pair("openai", "")],
        "a client's header is dropped; one cluster carries none"
    );
    // A chain with no name in it is no cluster.
    let (_, mut host) = started_on(&config("{}"), " , ", FakeHost::default());
    let calls = host.take();
    assert!(starts(&calls).is_empty());
    assert!(matches!(&calls[1], Call::Headers(h, false) if h[0].1 == b"500"));
}
