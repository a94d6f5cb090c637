//! Micro-benchmarks of the per-request hot paths: usage metering of response bodies,
//! limit admission and settlement, tenant key lookup, and request body parsing.
//!
//! Run with `cargo bench --bench hot_paths --features vm-bench`. Each group is kept short (about 2.5 s per
//! benchmark) so the whole file finishes in about a minute on two cores.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::json;
use sluice::admission::{admit, settle, Decision, Reservation};
use sluice::auth::{sha256_hex, KeyDigest};
use sluice::body::{inject_include_usage, parse_request, replace_model};
use sluice::config::compile;
use sluice::errors::ApiFlavour;
use sluice::lifecycle::{BodyEnv, Exchange, Next};
use sluice::limits::{Admission, Demand, LimitKind, Limiter};
use sluice::policy::Policy;
use sluice::shared::MemoryStore;
use sluice::usage::{Passthrough, ResponseShape, UsageMeter};
use sluice::vm_bench::{self, CountingMetrics, FIRST, REQUEST, RESPONSE};
use std::time::Duration;

/// Envoy delivers response bodies in pieces of about this size.
const PIECE: usize = 16 * 1024;
/// Target size of each metered response body.
const BODY: usize = 64 * 1024;
/// 2025-07-10T14:31:51Z, a fixed wall clock for the limiter.
const NOW_MS: u64 = 1_752_157_911_000;

// ---------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------

/// Prose with the characters a JSON string scanner must handle: escapes and non-ASCII.
const PROSE: &str = "The quarterly report shows revenue grew 12% year over year, driven by \
subscriptions; churn fell to 2.1%. Caf\u{e9} \u{2615} na\u{ef}ve \\\"quoted\\\" text.\\n";

/// Token-sized pieces of generated text, as streams deliver them.
const TOKENS: [&str; 12] = [
    "The",
    " quarterly",
    " report",
    " shows",
    " revenue",
    " grew",
    " 12%",
    " year",
    " over",
    " year",
    ",",
    " driven",
];

/// One OpenAI chat completion (non-streaming) with ~64 KiB of content and usage last.
fn chat_json() -> Vec<u8> {
    let mut content = String::new();
    while content.len() < BODY {
        content.push_str(PROSE);
    }
    format!(
        r#"{{"id":"chatcmpl-BsC3hTqNJ4bXGv0lUZ8cFqR1wKp2a","object":"chat.completion","created":1752158233,"model":"gpt-4.1-mini-2025-04-14","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":1519,"completion_tokens":16042,"total_tokens":17561,"prompt_tokens_details":{{"cached_tokens":1024,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}},"service_tier":"default","system_fingerprint":"fp_6f2eabb9a5"}}"#
    )
    .into_bytes()
}

/// An OpenAI chat completions stream with `include_usage`: ~64 KiB of one-token chunks,
/// then the usage-only chunk and `[DONE]`.
fn chat_sse() -> Vec<u8> {
    let mut out = String::new();
    let mut i = 0;
    while out.len() < BODY {
        let token = TOKENS[i % TOKENS.len()];
        i += 1;
        out.push_str(&format!(
            "data: {{\"id\":\"chatcmpl-BsC4J8yXk2sVqLmN0pR3tUwZ7aEfG\",\"object\":\"chat.completion.chunk\",\"created\":1752158311,\"model\":\"gpt-4.1-mini-2025-04-14\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_6f2eabb9a5\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{token}\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null,\"obfuscation\":\"W2vQ3k\"}}\n\n"
        ));
    }
    out.push_str("data: {\"id\":\"chatcmpl-BsC4J8yXk2sVqLmN0pR3tUwZ7aEfG\",\"object\":\"chat.completion.chunk\",\"created\":1752158311,\"model\":\"gpt-4.1-mini-2025-04-14\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_6f2eabb9a5\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\"finish_reason\":\"stop\"}],\"usage\":null,\"obfuscation\":\"Vb7x\"}\n\n");
    out.push_str("data: {\"id\":\"chatcmpl-BsC4J8yXk2sVqLmN0pR3tUwZ7aEfG\",\"object\":\"chat.completion.chunk\",\"created\":1752158311,\"model\":\"gpt-4.1-mini-2025-04-14\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_6f2eabb9a5\",\"choices\":[],\"usage\":{\"prompt_tokens\":1519,\"completion_tokens\":203,\"total_tokens\":1722,\"prompt_tokens_details\":{\"cached_tokens\":0,\"audio_tokens\":0},\"completion_tokens_details\":{\"reasoning_tokens\":0,\"audio_tokens\":0,\"accepted_prediction_tokens\":0,\"rejected_prediction_tokens\":0}},\"obfuscation\":\"fT0kPq\"}\n\n");
    out.push_str("data: [DONE]\n\n");
    out.into_bytes()
}

/// An Anthropic Messages stream: `message_start` with input usage, ~64 KiB of text
/// deltas (with the usual pings), then `message_delta` with the output usage.
fn anthropic_sse() -> Vec<u8> {
    let mut out = String::from(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01HCwV3rU5Xn2bQ8yGZr7kJp\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5-20250929\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":1024,\"cache_creation\":{\"ephemeral_5m_input_tokens\":0,\"ephemeral_1h_input_tokens\":0},\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n\
         event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    );
    let mut i = 0;
    while out.len() < BODY {
        let token = TOKENS[i % TOKENS.len()];
        i += 1;
        if i % 64 == 0 {
            out.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
        out.push_str(&format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{token}\"}}}}\n\n"
        ));
    }
    out.push_str(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n\
         event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":587}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    out.into_bytes()
}

/// Feeds `body` in [`PIECE`]-sized chunks plus the empty end-of-stream one, as the host
/// does; returns the bytes the client would receive.
fn meter(shape: ResponseShape, sse: bool, strip: bool, body: &[u8]) -> (UsageMeter, usize) {
    let mut m = UsageMeter::new(shape, sse, strip, 100);
    let mut sent = 0;
    for piece in body.chunks(PIECE) {
        sent += match m.feed(piece, false) {
            Passthrough::Unchanged => piece.len(),
            Passthrough::Replace(bytes) => bytes.len(),
        };
    }
    sent += match m.feed(&[], true) {
        Passthrough::Unchanged => 0,
        Passthrough::Replace(bytes) => bytes.len(),
    };
    (m, sent)
}

// ---------------------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------------------

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
}

fn usage_parsing(c: &mut Criterion) {
    let cases: [(&str, ResponseShape, bool, bool, Vec<u8>); 4] = [
        (
            "chat_json",
            ResponseShape::ChatCompletions,
            false,
            false,
            chat_json(),
        ),
        (
            "chat_sse",
            ResponseShape::ChatCompletions,
            true,
            false,
            chat_sse(),
        ),
        (
            "chat_sse_strip",
            ResponseShape::ChatCompletions,
            true,
            true,
            chat_sse(),
        ),
        (
            "anthropic_sse",
            ResponseShape::AnthropicMessages,
            true,
            false,
            anthropic_sse(),
        ),
    ];
    let mut group = c.benchmark_group("usage_parsing");
    configure(&mut group);
    for (name, shape, sse, strip, body) in &cases {
        // The inputs must really be metered: provider usage found, nothing suspicious.
        let (m, sent) = meter(*shape, *sse, *strip, body);
        let r = m.result();
        assert!(!r.estimated && !r.suspicious, "{name}: {r:?}");
        if *strip {
            assert!(
                sent < body.len(),
                "{name}: the usage chunk was not stripped"
            );
        } else {
            assert_eq!(sent, body.len(), "{name}");
        }
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), body, |b, body| {
            b.iter(|| {
                let (m, sent) = meter(*shape, *sse, *strip, black_box(body));
                (m.result(), sent)
            })
        });
    }
    group.finish();
}

/// One provider, one model, one tenant whose tier has every kind of limit, set high
/// enough that millions of iterations never exhaust them.
fn limited_policy(with_model_and_provider_limits: bool) -> Policy {
    let tenant_limits = json!({
        "requests_per_minute": 1_000_000_000_000u64, "tokens_per_minute": 1_000_000_000_000u64,
        "concurrent_requests": 8, "monthly_tokens": 1_000_000_000_000u64,
        "monthly_budget_usd": 1_000_000_000.0
    });
    let (provider_limits, model_limits) = if with_model_and_provider_limits {
        (
            json!({"requests_per_minute": 1_000_000_000_000u64}),
            json!({"gpt-4.1": {"tokens_per_minute": 1_000_000_000_000u64}}),
        )
    } else {
        (json!({}), json!({}))
    };
    let cfg = json!({
        "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "api_key_env": "K",
                       "limits": provider_limits}],
        "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
        "tiers": {"gold": {"models": ["*"], "limits": tenant_limits}},
        "tenants": [{"id": "acme", "tier": "gold", "keys": [{"id": "k", "sha256": sha256_hex("a")}],
                     "model_limits": model_limits}]
    });
    compile(cfg.to_string().as_bytes(), &|_| Some("k".into())).unwrap()
}

fn admission(c: &mut Criterion) {
    const RES: Reservation = Reservation {
        tokens: 4_600,
        cost_micro_usd: 40_000,
    };
    let mut group = c.benchmark_group("admission");
    configure(&mut group);
    for (name, extra, limits) in [
        ("admit_settle/tenant_5_limits", false, 5),
        ("admit_settle/tenant_model_provider_7_limits", true, 7),
    ] {
        let policy = limited_policy(extra);
        let store = MemoryStore::new();
        let admitted = |now| match admit(&policy, &store, FIRST, RES, ApiFlavour::OpenAi, now) {
            Ok(Decision::Admitted(admitted)) => admitted,
            other => panic!("every limit is local here: {other:?}"),
        };
        let first = admitted(NOW_MS);
        assert_eq!(first.held.items.len(), limits);
        assert!(settle(&store, &first.held, 1_722, 5_000, NOW_MS)
            .failures
            .is_empty());
        let mut now = NOW_MS;
        group.bench_function(name, |b| {
            b.iter(|| {
                now += 1;
                let admitted = admitted(black_box(now));
                settle(&store, &admitted.held, 1_722, 5_000, now)
            })
        });
    }

    // The limiter alone on one token bucket: take and settle, no policy or headers.
    let store = MemoryStore::new();
    let demand = [Demand {
        key: "sluice:t:acme:tpm".into(),
        kind: LimitKind::Rate {
            per_minute: 1_000_000_000_000,
            burst_milli: 1000,
        },
        amount: 4_600,
    }];
    let mut now = NOW_MS;
    group.bench_function("token_bucket/admit_settle", |b| {
        let limiter = Limiter::new(&store);
        b.iter(|| {
            now += 1;
            let Admission::Admitted { taken, .. } = limiter.admit(black_box(&demand), now) else {
                panic!("refused");
            };
            limiter.settle(&taken[0], 1_722, now).unwrap();
        })
    });
    group.finish();
}

fn tenant_key(i: usize) -> String {
    format!("sk-sluice-{i:08}-4f7d2c9a1b3e5f60718293a4b5c6d7e8")
}

fn tenants_policy(n: usize) -> Policy {
    let tenants: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            json!({"id": format!("tenant-{i}"), "tier": "gold",
                   "keys": [{"id": "k", "sha256": sha256_hex(&tenant_key(i))}]})
        })
        .collect();
    let cfg = json!({
        "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "api_key_env": "K"}],
        "models": [{"name": "gpt-4.1", "providers": ["openai"], "price": {"input": 2, "output": 8}}],
        "tiers": {"gold": {"models": ["*"]}},
        "tenants": tenants
    });
    compile(cfg.to_string().as_bytes(), &|_| Some("k".into())).unwrap()
}

fn key_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_lookup");
    configure(&mut group);
    // The floor: the SHA-256 of the presented key that every lookup performs.
    let probe = tenant_key(5);
    group.bench_function("sha256_only", |b| {
        b.iter(|| KeyDigest::of(black_box(probe.as_bytes())))
    });
    for n in [10, 1_000, 100_000] {
        let policy = tenants_policy(n);
        assert_eq!(policy.keys.len(), n);
        let found = tenant_key(n / 2);
        // Same length as a real key, never issued.
        let missing = tenant_key(n + 7);
        assert_eq!(
            policy.keys.lookup(found.as_bytes()).unwrap().tenant.index(),
            n / 2
        );
        assert!(policy.keys.lookup(missing.as_bytes()).is_none());
        group.bench_with_input(BenchmarkId::new("found", n), &found, |b, key| {
            b.iter(|| policy.keys.lookup(black_box(key.as_bytes())))
        });
        group.bench_with_input(BenchmarkId::new("not_found", n), &missing, |b, key| {
            b.iter(|| policy.keys.lookup(black_box(key.as_bytes())))
        });
    }
    group.finish();
}

/// A typical chat request of about 2 KiB: system prompt, a short history, options.
fn chat_request() -> Vec<u8> {
    let body = json!({
        "model": "gpt-4.1-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant for the finance team. Answer concisely, cite the figures you use, and say when you are unsure. Never invent numbers; if the data is missing, ask for it. Format tables in Markdown and keep answers under 200 words unless asked for more detail."},
            {"role": "user", "content": "Here are the Q2 figures: revenue 4.2M (Q1: 3.9M), subscriptions 2.8M (Q1: 2.5M), services 1.4M (Q1: 1.4M), churn 2.1% (Q1: 2.6%), new customers 312 (Q1: 280). Summarize the quarter."},
            {"role": "assistant", "content": "Q2 revenue grew 7.7% quarter over quarter to 4.2M, driven entirely by subscriptions (+12%, to 2.8M) while services stayed flat at 1.4M. Churn improved from 2.6% to 2.1% and new customers rose 11% to 312. In short: a solid subscription-led quarter with better retention."},
            {"role": "user", "content": "Compare that with the same quarter last year: revenue 3.75M, subscriptions 2.3M, services 1.45M, churn 3.0%, new customers 250. Put both years in a table with the year-over-year change for each line, then give me three bullet points on what changed and one risk to watch for the rest of the year. Mention whether the services decline matters given the subscription growth, and whether the churn improvement looks durable or is just seasonal noise."}
        ],
        "temperature": 0.2,
        "top_p": 1,
        "max_tokens": 1024,
        "stream": true,
        "user": "analyst-17",
        "metadata": {"team": "finance", "report": "q2-review"},
        "tools": [{"type": "function", "function": {"name": "lookup_metric", "description": "Look up a business metric for a quarter.", "parameters": {"type": "object", "properties": {"metric": {"type": "string"}, "quarter": {"type": "string", "description": "e.g. 2025-Q2"}}, "required": ["metric", "quarter"]}}}],
        "tool_choice": "auto"
    });
    serde_json::to_vec_pretty(&body).unwrap()
}

fn request_parse(c: &mut Criterion) {
    let body = chat_request();
    let fields = parse_request(&body).unwrap();
    assert_eq!(fields.model, "gpt-4.1-mini");
    assert_eq!(fields.max_output_tokens, Some(1024));
    assert!(replace_model(&body, "gpt-4.1-mini-2025-04-14").is_some());
    assert!(inject_include_usage(&body).is_some());

    let mut group = c.benchmark_group("request_parse");
    configure(&mut group);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("parse_request", |b| {
        b.iter(|| parse_request(black_box(&body)))
    });
    group.bench_function("replace_model", |b| {
        b.iter(|| replace_model(black_box(&body), "gpt-4.1-mini-2025-04-14"))
    });
    group.bench_function("inject_include_usage", |b| {
        b.iter(|| inject_include_usage(black_box(&body)))
    });
    group.finish();
}

/// The demo configuration from `envoy/demo.yaml`, with the gold tier's limits set high as
/// in `make bench`'s configuration (c).
fn demo_policy() -> Policy {
    let yaml =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/demo.yaml")).unwrap();
    let lines: Vec<&str> = yaml.lines().collect();
    let at = lines.iter().position(|l| l.trim() == "value: |").unwrap() + 1;
    let indent = lines[at].len() - lines[at].trim_start().len();
    let block: Vec<&str> = lines[at..]
        .iter()
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent)
        .copied()
        .collect();
    let mut cfg: serde_json::Value = serde_json::from_str(&block.join("\n")).unwrap();
    cfg["tiers"]["gold"]["limits"] = json!({"requests_per_minute": 1_000_000_000u64,
        "tokens_per_minute": 1_000_000_000_000u64, "concurrent_requests": 1_000_000});
    compile(cfg.to_string().as_bytes(), &|_| Some("sk-bench".into())).unwrap()
}

/// One whole request through the state machine, as `make bench`'s configuration (c)
/// sends it: Sluice's own work per request, without the host calls.
fn exchange(c: &mut Criterion) {
    let policy = demo_policy();
    let store = MemoryStore::new();
    let request = REQUEST.to_vec();
    let response = RESPONSE;
    let mut now = NOW_MS;
    let mut metrics = CountingMetrics(0);
    let one = |now: u64, metrics: &mut CountingMetrics| {
        let mut ex = Exchange::new();
        let h = vm_bench::headers();
        let env = BodyEnv {
            store: &store,
            now_ms: now,
            worker: 0,
            context: 7,
            nonce: 1,
            plans: None,
        };
        let step = ex.on_request_headers(&policy, &env, &h, false);
        assert!(matches!(step.next, Next::Pause));
        let step = ex.on_request_body(&policy, &env, request.len(), true, || Some(request.clone()));
        assert!(matches!(step.next, Next::Continue));
        let edits = ex.on_response_headers(200, Some("application/json"), false, now);
        black_box(edits);
        let out = ex.on_response_body(response, true, now);
        assert!(matches!(out, Passthrough::Unchanged));
        let done = ex.finish(&policy, &store, None, now, metrics).unwrap();
        black_box(done.record.len())
    };
    assert!(one(now, &mut metrics) > 0);
    let mut group = c.benchmark_group("exchange");
    configure(&mut group);
    group.bench_function("chat_json_full_request", |b| {
        b.iter(|| {
            now += 1;
            one(now, &mut metrics)
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    usage_parsing,
    admission,
    key_lookup,
    request_parse,
    exchange
);
criterion_main!(benches);
