//! Diagnostics only (cargo feature `vm-bench`, never in a release): times Sluice's pure
//! request path inside the VM that runs it, piece by piece, so its cost under V8 can be
//! set beside the native Criterion figures. `make bench-vm` builds it and reads the result
//! from Envoy's log at configure time. The Criterion bench uses the same request.

use crate::admission::{admit, settle, Decision, Parties, Reservation};
use crate::body::parse_request;
use crate::errors::ApiFlavour;
use crate::headers::RequestHeaders;
use crate::lifecycle::{BodyEnv, Exchange};
use crate::metrics::{MetricKey, Metrics};
use crate::policy::Policy;
use crate::policy::{ModelId, ProviderId, TenantId};
use crate::shared::MemoryStore;
use crate::usage::{ResponseShape, UsageMeter};
use sha2::{Digest, Sha256};
use std::hint::black_box;

/// `make bench`'s request body and upstream response.
pub const REQUEST: &[u8] = br#"{"model": "gpt-4.1-mini", "max_tokens": 64, "messages": [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Summarise the benefits of running an LLM gateway inside Envoy."}]}"#;
pub const RESPONSE: &[u8] = br#"{"id": "chatcmpl-bench", "object": "chat.completion", "created": 1, "model": "gpt-4.1-mini", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. Envoy gateways are fast. "}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 31, "completion_tokens": 48, "total_tokens": 79, "prompt_tokens_details": {"cached_tokens": 0}, "completion_tokens_details": {"reasoning_tokens": 0}}}"#;
const KEY: &[u8] = b"sk-sluice-demo-acme";
const NOW_MS: u64 = 1_752_157_911_000;
/// The first tenant, on the first model and its first provider.
pub const FIRST: Parties = Parties {
    tenant: TenantId::new(0),
    model: ModelId::new(0),
    provider: ProviderId::new(0),
};

/// Counts metric updates, as the host's metrics would take them.
pub struct CountingMetrics(pub u64);
impl Metrics for CountingMetrics {
    fn add(&mut self, _key: MetricKey, value: u64) {
        self.0 = self.0.wrapping_add(value);
    }
}

/// `make bench`'s request headers.
pub fn headers() -> RequestHeaders {
    RequestHeaders::from_pairs(vec![
        (":method".into(), b"POST".to_vec()),
        (":path".into(), b"/v1/chat/completions".to_vec()),
        (":authority".into(), b"127.0.0.1:10000".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        (
            "authorization".into(),
            b"Bearer sk-sluice-demo-acme".to_vec(),
        ),
        (
            "x-request-id".into(),
            b"6f1c2f1e-8a1b-4c55-9a35-3a7c1d0e9b21".to_vec(),
        ),
    ])
}

/// Nanoseconds per iteration of each piece; `clock_ns` is the host's clock.
pub fn run(policy: &Policy, clock_ns: &dyn Fn() -> u64) -> Vec<(&'static str, u64)> {
    const N: u64 = 20_000;
    let store = MemoryStore::new();
    let mut out = Vec::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut(u64)| {
        for i in 0..N / 10 {
            f(i); // warm up: let V8 tier the code up first
        }
        let start = clock_ns();
        for i in 0..N {
            f(i);
        }
        out.push((name, clock_ns().saturating_sub(start) / N));
    };
    let mut metrics = CountingMetrics(0);
    time("whole request (state machine, in-memory store)", &mut |i| {
        let now = NOW_MS + i;
        let mut ex = Exchange::new();
        let env = BodyEnv {
            store: &store,
            now_ms: now,
            worker: 0,
            context: 7,
            nonce: 1,
            plans: None,
        };
        black_box(ex.on_request_headers(policy, &env, &headers(), false));
        black_box(ex.on_request_body(policy, &env, REQUEST.len(), true, || Some(REQUEST.to_vec())));
        black_box(ex.on_response_headers(200, Some("application/json"), false, now));
        black_box(ex.on_response_body(RESPONSE, true, now));
        black_box(ex.finish(policy, &store, None, now, &mut metrics));
    });
    time("request headers object", &mut |_| {
        black_box(headers());
    });
    time("sha256 of the key", &mut |_| {
        black_box(Sha256::digest(black_box(KEY)));
    });
    time("key lookup", &mut |_| {
        black_box(policy.keys.lookup(black_box(KEY)));
    });
    time("parse the request body", &mut |_| {
        black_box(parse_request(black_box(REQUEST)).ok());
    });
    let reservation = Reservation {
        tokens: 95,
        cost_micro_usd: 100,
    };
    time("admit + settle (in-memory store)", &mut |i| {
        if let Ok(Decision::Admitted(a)) = admit(
            policy,
            &store,
            FIRST,
            reservation,
            ApiFlavour::OpenAi,
            NOW_MS + i,
        ) {
            black_box(settle(&store, &a.held, 79, 50, NOW_MS + i));
        }
    });
    time("meter the JSON response", &mut |_| {
        let mut m = UsageMeter::new(ResponseShape::ChatCompletions, false, false, 20);
        black_box(m.feed(black_box(RESPONSE), true));
        black_box(m.result());
    });
    time("allocate and free 1 KiB x 10", &mut |_| {
        for _ in 0..10 {
            black_box(vec![0u8; 1024]);
        }
    });
    out
}
