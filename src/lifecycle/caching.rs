//! The response cache's part of a request's life: the lookup (local slot, or a call to
//! the quota service), the reply from an entry, storing a captured response and giving a
//! fill back, for either store.

use super::stage::{Capture, FillClaim, Route};
use super::Callout;
use crate::cache::entry::Entry;
use crate::cache::{local, CacheKey, CacheRule, CacheStore, Lookup};
use crate::errors::LocalReply;
use crate::global::wire::{
    cache_answer, CacheLookup, CacheRelease, CacheStoreHeader, CACHE_LOOKUP_PATH,
    CACHE_RELEASE_PATH, CACHE_STORE_PATH,
};
use crate::policy::{Policy, TenantId};
use crate::routing::Api;
use crate::shared::Store;
use crate::usage::{MeterResult, Passthrough, UsageMeter};

/// The tenant's id, for the quota service's keys.
fn tenant_id(policy: &Policy, tenant: TenantId) -> String {
    policy
        .tenant(tenant)
        .map_or_else(String::new, |t| t.id.clone())
}

/// The quota service's longest wait per call.
fn call_timeout_ms(policy: &Policy) -> u64 {
    policy.global.as_ref().map_or(0, |g| g.timeout_ms)
}

/// The lookup call of the global store: the service may wait up to the rule's `wait_ms`
/// for an identical request's fill before it answers, so the call may take that long.
pub(super) fn lookup_call(
    policy: &Policy,
    tenant: TenantId,
    key: CacheKey,
    rule: &CacheRule,
) -> Option<Callout> {
    let lookup = CacheLookup {
        tenant: tenant_id(policy, tenant),
        key: key.hex(),
        fill_ms: rule.wait_ms,
        wait_ms: rule.wait_ms,
    };
    Some(Callout {
        path: CACHE_LOOKUP_PATH,
        body: serde_json::to_vec(&lookup).ok()?,
        timeout_ms: rule.wait_ms.saturating_add(call_timeout_ms(policy)),
    })
}

/// What the quota service's lookup answer says; no usable answer is `Unavailable`.
pub(super) fn lookup_answer(answer: Result<&[u8], String>, key: CacheKey, now_ms: u64) -> Lookup {
    match answer {
        Ok([cache_answer::HIT, entry @ ..]) => match Entry::decode(entry) {
            Some(entry) if entry.key == key && entry.is_fresh(now_ms) => Lookup::Hit(entry),
            _ => Lookup::Unavailable,
        },
        Ok([cache_answer::FILL]) => Lookup::Fill,
        _ => Lookup::Unavailable,
    }
}

/// The local store's lookup (the global store's goes through [`lookup_call`]).
pub(super) fn lookup_local(
    store: &dyn Store,
    slots: u32,
    key: CacheKey,
    rule: &CacheRule,
    now_ms: u64,
) -> Lookup {
    local::lookup(store, slots, key, now_ms, rule.wait_ms)
}

/// The client's answer from `entry`: the provider's body, without the usage chunk the
/// gateway added if this client did not ask for it, with fresh rate-limit headers. The
/// body is metered as a response would be. `None` if it cannot be replayed (not UTF-8).
pub(super) fn replay(
    entry: &Entry,
    api: Api,
    route: &Route,
    ratelimit_headers: Vec<(String, String)>,
    now_ms: u64,
) -> Option<(LocalReply, MeterResult)> {
    let sse = entry
        .content_type
        .trim_start()
        .starts_with("text/event-stream");
    let strip = route.injected_usage && sse;
    let mut meter = UsageMeter::new(api.response_shape()?, sse, strip, route.prompt_estimate);
    let body = match meter.feed(&entry.body, true) {
        Passthrough::Unchanged => entry.body.clone(),
        Passthrough::Replace(body) => body,
    };
    let body = String::from_utf8(body).ok()?;
    let mut headers = vec![
        ("content-type".to_string(), entry.content_type.clone()),
        ("x-sluice-cache".to_string(), "hit".to_string()),
        ("age".to_string(), entry.age_s(now_ms).to_string()),
    ];
    headers.extend(ratelimit_headers);
    let reply = LocalReply {
        status: 200,
        headers,
        body,
    };
    Some((reply, meter.result()))
}

/// Stores a complete response; for the global store, the call that does it.
pub(super) fn store(
    policy: &Policy,
    store: &dyn Store,
    fill: FillClaim,
    model: crate::policy::ModelId,
    capture: Capture,
    now_ms: u64,
) -> Option<Callout> {
    let rule = policy.cache_rule(fill.tenant, model)?;
    let entry = Entry {
        key: fill.key,
        stored_at_ms: now_ms,
        expires_at_ms: now_ms.saturating_add(rule.ttl_ms),
        content_type: capture.content_type,
        body: capture.body,
    };
    match policy.cache_store {
        CacheStore::Local { slots } => {
            local::put(store, slots, &entry, now_ms);
            None
        }
        CacheStore::Global { tenant_max_bytes } => {
            let header = CacheStoreHeader {
                tenant: tenant_id(policy, fill.tenant),
                key: fill.key.hex(),
                ttl_ms: rule.ttl_ms,
                tenant_max_bytes,
            };
            let mut body = serde_json::to_vec(&header).ok()?;
            body.push(b'\n');
            body.extend_from_slice(&entry.encode());
            Some(Callout {
                path: CACHE_STORE_PATH,
                body,
                timeout_ms: call_timeout_ms(policy),
            })
        }
    }
}

/// Gives a claimed fill back; for the global store, the call that does it.
pub(super) fn release(policy: &Policy, store: &dyn Store, fill: FillClaim) -> Option<Callout> {
    match policy.cache_store {
        CacheStore::Local { slots } => {
            local::release(store, slots, fill.key);
            None
        }
        CacheStore::Global { .. } => {
            let release = CacheRelease {
                tenant: tenant_id(policy, fill.tenant),
                key: fill.key.hex(),
            };
            Some(Callout {
                path: CACHE_RELEASE_PATH,
                body: serde_json::to_vec(&release).ok()?,
                timeout_ms: call_timeout_ms(policy),
            })
        }
    }
}
