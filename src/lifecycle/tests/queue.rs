//! Providers with a capacity: a request's place, and this worker's queue deciding who
//! times out, who resumes and which orphaned slot to release, all natively.

use super::*;
use crate::fairness::{FairQueue, QueueStats};
use crate::lifecycle::queue::{QueueAction, WorkerQueue};

const QUEUE_KEY: &str = "sluice:q:openai";

/// One provider with room for one request in flight; acme may queue `max_queue_length`.
fn capped_policy(max_queue_length: u32) -> Policy {
    let cfg = json!({
        "providers": [{"name": "openai", "api": "openai", "cluster": "openai", "path_prefix": "/v1",
                       "api_key_env": "OPENAI", "max_in_flight": 1},
                      {"name": "anthropic", "api": "anthropic", "cluster": "anthropic", "path_prefix": "/v1",
                       "api_key_env": "ANTHROPIC", "max_in_flight": 1}],
        "models": [{"name": "gpt-4.1", "providers": ["openai", "anthropic"], "price": {"input": 2, "output": 8}}],
        "tiers": {"gold": {"models": ["*"], "max_queue_wait_ms": 500}},
        "tenants": [{"id": "acme", "tier": "gold", "max_queue_length": max_queue_length,
                     "keys": [{"id": "k1", "sha256": sha256_hex("sk-acme")}]}]
    });
    compile(cfg.to_string().as_bytes(), &env).unwrap()
}

fn queued_policy() -> Policy {
    capped_policy(1)
}

/// Sends one request through both callbacks as stream `context` of worker 1, at `now_ms`.
fn queued_at(
    p: &Policy,
    store: &MemoryStore,
    context: u32,
    path: &str,
    key: (&str, &str),
    now_ms: u64,
) -> (Exchange, Step) {
    let body = r#"{"model":"gpt-4.1","messages":[]}"#;
    let mut ex = Exchange::new();
    ex.on_request_headers(
        p,
        &test_env(&MemoryStore::new()),
        &headers("POST", path, &[key]),
        false,
    );
    let env = BodyEnv {
        store,
        now_ms,
        worker: 1,
        context,
        nonce: 7,
        plans: None,
    };
    let step = ex.on_request_body(p, &env, body.len(), true, || Some(body.as_bytes().to_vec()));
    (ex, step)
}

fn queued(
    p: &Policy,
    store: &MemoryStore,
    context: u32,
    path: &str,
    key: (&str, &str),
) -> (Exchange, Step) {
    queued_at(p, store, context, path, key, 1_000)
}

/// The one-slot provider held by stream 1, and stream 2 waiting for it.
fn one_holds_one_waits() -> (Policy, MemoryStore, Exchange, Exchange) {
    let p = queued_policy();
    let store = MemoryStore::new();
    let (holder, _) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
    let (waiter, step) = queued(&p, &store, 2, "/v1/chat/completions", ACME);
    assert!(matches!(step.next, Next::Wait(_)));
    (p, store, holder, waiter)
}

/// Worker 1's queue (the first worker id of a fresh store).
fn worker_queue(p: &Policy, store: &MemoryStore) -> WorkerQueue {
    let queue = WorkerQueue::for_policy(p, store).unwrap().unwrap();
    assert_eq!(queue.worker(), 1);
    queue
}

/// The waiter a step asks the host to hand to the worker's queue.
fn waiter_of(step: Step) -> queue::Waiter {
    match step.next {
        Next::Wait(waiter) => waiter,
        other => panic!("expected a wait, got {other:?}"),
    }
}

fn stats(store: &MemoryStore) -> QueueStats {
    FairQueue::new(store, QUEUE_KEY, 1).stats().unwrap()
}

#[test]
fn a_full_provider_queues_then_resumes_and_every_slot_is_released() {
    let p = queued_policy();
    let store = MemoryStore::new();
    let mut workers = worker_queue(&p, &store);
    let (mut first, step) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
    assert_eq!(step.next, Next::Continue, "a free slot is taken at once");
    let (mut second, step) = queued(&p, &store, 2, "/v1/chat/completions", ACME);
    assert_eq!(
        set(&step, CLUSTER_HEADER),
        Some("openai"),
        "routed before waiting"
    );
    let waiter = waiter_of(step);
    assert_eq!(waiter.deadline_ms(), 1_500);
    workers.add(waiter);
    assert_eq!(workers.claim(&store, 1_050), [], "nothing free yet");

    // The first finishes and frees its slot; worker 1 claims it for the waiter.
    let mut m = FakeMetrics::default();
    assert!(
        first
            .finish(&p, &store, None, 1_100, &mut m)
            .unwrap()
            .released_slot
    );
    assert_eq!(
        workers.claim(&store, 1_100),
        [QueueAction::Resume { context: 2 }]
    );
    second.on_response_headers(200, Some("application/json"), false, 1_150);
    second.on_response_body(CHAT_JSON.as_bytes(), true, 1_160);
    let done = second.finish(&p, &store, None, 1_200, &mut m).unwrap();
    assert!(done.released_slot);
    let record: Value = serde_json::from_str(&done.record).unwrap();
    assert_eq!(record["queue_wait_ms"], 100);
    assert_eq!(record["outcome"], "success");
    assert!(m
        .0
        .iter()
        .any(|(k, v)| matches!(k, MetricKey::QueueWait(..)) && *v == 100));
    let stats = stats(&store);
    assert_eq!(
        (stats.in_flight, stats.waiting),
        (0, 0),
        "nothing held afterwards"
    );
}

#[test]
fn a_wait_past_the_tier_maximum_is_a_rejection_in_the_apis_format() {
    for (path, key, status, kind) in [
        ("/v1/chat/completions", ACME, 503, "server_error"),
        (
            "/v1/messages",
            ("x-api-key", "sk-acme"),
            529,
            "overloaded_error",
        ),
    ] {
        let p = queued_policy();
        let store = MemoryStore::new();
        let mut workers = worker_queue(&p, &store);
        let (_holder, _) = queued(&p, &store, 1, path, key);
        let (mut waiter, step) = queued(&p, &store, 2, path, key);
        workers.add(waiter_of(step));
        let mut m = FakeMetrics::default();
        assert_eq!(workers.tick(&store, 1_499, &mut m), [], "{path}: not yet");
        // At the deadline the worker takes it out of the queue and answers it.
        let actions = workers.tick(&store, 1_500, &mut m);
        let [QueueAction::Reply { context: 2, reply }] = actions.as_slice() else {
            panic!("{path}: {actions:?}");
        };
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(reply.status, status, "{path}");
        assert_eq!(reply.header("retry-after"), Some("1"));
        assert_eq!(reply.header("x-sluice-reason"), Some("queue_timeout"));
        let found = body["error"]["type"].as_str().map(str::to_string);
        assert_eq!(found.as_deref(), Some(kind), "{path}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("waited 500 ms")),
            "{body}"
        );
        assert_eq!(stats(&store).waiting, 0, "its place is gone");
        assert_eq!(workers.tick(&store, 1_600, &mut m), [], "answered once");
        assert!(!waiter.needs_end_details());
        let done = waiter
            .finish(&p, &store, None, 1_600, &mut FakeMetrics::default())
            .unwrap();
        let record: Value = serde_json::from_str(&done.record).unwrap();
        assert_eq!(
            (record["outcome"].as_str(), record["reason"].as_str()),
            (Some("rejected"), Some("queue_timeout"))
        );
        assert_eq!(record["status"], status);
        assert_eq!(record["queue_wait_ms"], 500);
        assert!(!done.released_slot, "a timed-out request never held a slot");
    }
}

#[test]
fn a_full_queue_refuses_at_once_and_a_departed_waiter_gives_up_its_place() {
    let (p, store, _holder, mut waiter) = one_holds_one_waits();
    let (_, step) = queued(&p, &store, 3, "/v1/chat/completions", ACME);
    let (reply, body) = reply_of(&step);
    assert_eq!(
        (reply.status, reply.header("x-sluice-reason")),
        (429, Some("queue_full"))
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(!step.routed, "a refused request is not routed");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Provider `openai` is at capacity")),
        "{body}"
    );
    // The waiter's client goes away: finish gives up its place, so another may queue.
    let done = waiter.finish(
        &p,
        &store,
        Some("downstream_remote_disconnect"),
        1_200,
        &mut FakeMetrics::default(),
    );
    assert!(!done.unwrap().released_slot);
    let (_, step) = queued(&p, &store, 4, "/v1/chat/completions", ACME);
    assert!(
        matches!(step.next, Next::Wait(_)),
        "the departed waiter's place is free again"
    );
}

#[test]
fn a_client_that_leaves_the_queue_is_not_billed() {
    let (p, store, _holder, mut waiter) = one_holds_one_waits();
    assert!(waiter.needs_end_details());
    let mut m = FakeMetrics::default();
    let done = waiter
        .finish(
            &p,
            &store,
            Some("downstream_remote_disconnect"),
            1_200,
            &mut m,
        )
        .unwrap();
    // The provider never saw it: no prompt is billed, unlike a forwarded request.
    assert_eq!((done.outcome, done.estimated), (Outcome::Aborted, false));
    assert_eq!(done.usage.total(), 0);
    assert_eq!(m.counter(Counter::InputTokens), 0);
}

#[test]
fn a_slot_claimed_for_a_stream_that_went_away_is_released() {
    let p = capped_policy(2);
    let store = MemoryStore::new();
    let mut workers = worker_queue(&p, &store);
    let (mut holder, _) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
    let (_gone, step) = queued(&p, &store, 2, "/v1/chat/completions", ACME);
    workers.add(waiter_of(step));
    // Its stream ended without giving up its place (the cancel never reached the store).
    workers.forget(2);
    let done = holder
        .finish(&p, &store, None, 1_100, &mut FakeMetrics::default())
        .unwrap();
    assert!(done.released_slot);
    assert_eq!(stats(&store).waiting, 1);
    // The worker still owns the place in the store, so its next tick claims the slot...
    workers.add(waiter_of(
        queued(&p, &store, 3, "/v1/chat/completions", ACME).1,
    ));
    let actions = workers.claim(&store, 1_100);
    // ...for the departed stream, which is released at once, and then for the live one.
    assert_eq!(actions, [], "{actions:?}");
    assert_eq!(stats(&store).in_flight, 0, "the orphan's slot went back");
    assert_eq!(
        workers.claim(&store, 1_101),
        [QueueAction::Resume { context: 3 }]
    );
}

#[test]
fn only_waiters_past_their_own_deadline_time_out() {
    let p = capped_policy(2);
    let store = MemoryStore::new();
    let mut workers = worker_queue(&p, &store);
    let (_holder, _) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
    let early = queued_at(&p, &store, 2, "/v1/chat/completions", ACME, 1_000).1;
    let late = queued_at(&p, &store, 3, "/v1/chat/completions", ACME, 1_200).1;
    workers.add(waiter_of(early));
    workers.add(waiter_of(late));
    let mut m = FakeMetrics::default();
    let contexts = |actions: Vec<QueueAction>| -> Vec<u32> {
        actions
            .into_iter()
            .map(|a| match a {
                QueueAction::Reply { context, .. } => context,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(contexts(workers.tick(&store, 1_500, &mut m)), [2]);
    assert_eq!(stats(&store).waiting, 1);
    assert_eq!(
        contexts(workers.tick(&store, 1_699, &mut m)),
        [] as [u32; 0]
    );
    assert_eq!(contexts(workers.tick(&store, 1_700, &mut m)), [3]);
    assert_eq!(stats(&store).waiting, 0);
}

#[test]
fn gauges_are_written_once_a_second() {
    let p = queued_policy();
    let store = MemoryStore::new();
    let mut workers = worker_queue(&p, &store);
    let (_holder, _) = queued(&p, &store, 1, "/v1/chat/completions", ACME);
    let mut m = FakeMetrics::default();
    let in_flight = |m: &FakeMetrics| -> Vec<u64> {
        m.0.iter()
            .filter(|(k, _)| matches!(k, MetricKey::QueueInFlight(_)))
            .map(|(_, v)| *v)
            .collect()
    };
    workers.tick(&store, 10_000, &mut m);
    workers.tick(&store, 10_500, &mut m);
    // Both capped providers report: openai holds the one request, anthropic none.
    assert_eq!(in_flight(&m), [1, 0]);
    workers.tick(&store, 11_000, &mut m);
    assert_eq!(in_flight(&m), [1, 0, 1, 0]);
}

#[test]
fn no_queue_without_a_capped_provider() {
    assert!(WorkerQueue::for_policy(&policy(), &MemoryStore::new())
        .unwrap()
        .is_none());
}
