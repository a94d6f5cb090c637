//! Calls of the global response cache, for the cache and cluster tests.

use super::Api;
use sluice::global::wire::{
    cache_answer, CacheLookup, CacheRelease, CacheStoreHeader, CacheStored, CACHE_LOOKUP_PATH,
    CACHE_RELEASE_PATH, CACHE_STORE_PATH,
};

/// A distinct cache key per `n`: 64 lowercase hex digits.
pub fn key(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// A lookup's status byte (`H`, `F` or `B`) and the bytes after it.
pub async fn lookup(
    api: &Api,
    tenant: &str,
    key: &str,
    fill_ms: u64,
    wait_ms: u64,
) -> (u8, Vec<u8>) {
    let call = CacheLookup {
        tenant: tenant.into(),
        key: key.into(),
        fill_ms,
        wait_ms,
    };
    let body = serde_json::to_vec(&call).unwrap();
    let (status, content_type, answer) = api.bytes(CACHE_LOOKUP_PATH, body).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(content_type, "application/octet-stream");
    let (&first, rest) = answer.split_first().expect("an empty lookup answer");
    if first != cache_answer::HIT {
        assert!(rest.is_empty(), "only a hit carries bytes");
    }
    (first, rest.to_vec())
}

/// A lookup that must not wait: `F` or `B` or `H`.
pub async fn peek(api: &Api, tenant: &str, key: &str) -> u8 {
    lookup(api, tenant, key, 5_000, 0).await.0
}

pub fn store_body(header: &CacheStoreHeader, entry: &[u8]) -> Vec<u8> {
    let mut body = serde_json::to_vec(header).unwrap();
    body.push(b'\n');
    body.extend_from_slice(entry);
    body
}

pub async fn store(
    api: &Api,
    tenant: &str,
    key: &str,
    ttl_ms: u64,
    tenant_max_bytes: u64,
    entry: &[u8],
) -> CacheStored {
    let header = CacheStoreHeader {
        tenant: tenant.into(),
        key: key.into(),
        ttl_ms,
        tenant_max_bytes,
    };
    let (status, content_type, answer) = api
        .bytes(CACHE_STORE_PATH, store_body(&header, entry))
        .await;
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status, 200, "{text}");
    assert_eq!(content_type, "application/json");
    serde_json::from_slice(&answer).unwrap_or_else(|_| panic!("not CacheStored: {text}"))
}

pub async fn release(api: &Api, tenant: &str, key: &str) -> bool {
    let call = CacheRelease {
        tenant: tenant.into(),
        key: key.into(),
    };
    let answer: serde_json::Value = api.call(CACHE_RELEASE_PATH, &call).await;
    assert_eq!(answer.as_object().map(|o| o.len()), Some(1), "{answer}");
    answer["released"].as_bool().unwrap()
}

pub fn stored(evicted: u32) -> CacheStored {
    CacheStored {
        stored: true,
        evicted,
    }
}
