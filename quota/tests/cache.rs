//! The global response cache against a real, private `redis-server`, over HTTP: entries
//! round-trip byte for byte, one caller fills while the others wait for it, and each
//! tenant's entries stay within its byte cap.

// Test code: a failed step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use redis::AsyncCommands;
use sluice::global::wire::{
    cache_answer, CacheLookup, CacheStoreHeader, CacheStored, CACHE_LOOKUP_PATH,
    CACHE_RELEASE_PATH, CACHE_STORE_PATH,
};
use sluice::shared::keys::{cache_entry, cache_tenant};
use std::time::{Duration, Instant};
use support::cache::{key, lookup, peek, release, store, store_body, stored};
use support::{Api, Redis, Service};

/// The tenant's indexed total (`cache:bytes`).
async fn total(redis: &mut redis::aio::MultiplexedConnection, tenant: &str) -> u64 {
    let total: Option<u64> = redis.get(cache_tenant(tenant, "bytes")).await.unwrap();
    total.unwrap_or(0)
}

#[tokio::test]
async fn a_stored_entry_is_a_hit_byte_for_byte() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let k = key(1);
    let entry_key = cache_entry("acme", &k);
    let fill = format!("{entry_key}:fill");

    // Missing: the first caller is made the fetcher, with a fill lock of fill_ms.
    assert_eq!(
        lookup(api, "acme", &k, 5_000, 0).await,
        (cache_answer::FILL, vec![])
    );
    let lock_ttl: i64 = redis.pttl(&fill).await.unwrap();
    assert!((4_000..=5_000).contains(&lock_ttl), "{lock_ttl}");

    // Every byte value, newlines first: the body splits at its first newline only.
    let mut entry = b"\n\n\x00\xff{\"not\":\"json\"}\n".to_vec();
    entry.extend(0..=255u8);
    assert_eq!(
        store(api, "acme", &k, 60_000, 1 << 20, &entry).await,
        stored(0)
    );
    let locked: bool = redis.exists(&fill).await.unwrap();
    assert!(!locked, "the store replaces the fill lock");
    let raw: Vec<u8> = redis.get(&entry_key).await.unwrap();
    assert_eq!(raw, entry, "Redis holds the bytes as sent");
    let ttl: i64 = redis.pttl(&entry_key).await.unwrap();
    assert!((59_000..=60_000).contains(&ttl), "{ttl}");

    let (answer, bytes) = lookup(api, "acme", &k, 5_000, 0).await;
    assert_eq!(answer, cache_answer::HIT);
    assert_eq!(bytes, entry);
    // A hit takes no lock.
    let locked: bool = redis.exists(&fill).await.unwrap();
    assert!(!locked);

    // The bookkeeping: index by expiry, size, total.
    let now = support::redis_now(&mut redis).await;
    let expiry: u64 = redis
        .zscore(cache_tenant("acme", "index"), &k)
        .await
        .unwrap();
    assert!((now + 59_000..=now + 60_000).contains(&expiry), "{expiry}");
    let size: u64 = redis.hget(cache_tenant("acme", "sizes"), &k).await.unwrap();
    assert_eq!(size, entry.len() as u64);
    assert_eq!(total(&mut redis, "acme").await, entry.len() as u64);

    // A response larger than any other call's body limit (1 MiB) is stored whole.
    let big: Vec<u8> = (0..(2usize << 20)).map(|i| (i % 251) as u8).collect();
    let k2 = key(2);
    assert_eq!(
        store(api, "acme", &k2, 60_000, 8 << 20, &big).await,
        stored(0)
    );
    let (answer, bytes) = lookup(api, "acme", &k2, 5_000, 0).await;
    assert_eq!(answer, cache_answer::HIT);
    assert!(bytes == big, "the 2 MiB entry came back changed");
}

#[tokio::test]
async fn a_concurrent_lookup_waits_for_the_fill_and_gets_the_hit() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let k = key(3);
    assert_eq!(peek(api, "acme", &k).await, cache_answer::FILL);

    let started = Instant::now();
    let waiter = {
        let (base, k) = (api.base.clone(), k.clone());
        tokio::spawn(async move {
            let answer = lookup(&Api::new(base), "acme", &k, 5_000, 1_500).await;
            (answer, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "the second lookup waits for the fill"
    );
    assert_eq!(
        store(api, "acme", &k, 60_000, 1 << 20, b"the response").await,
        stored(0)
    );
    let stored_at = Instant::now();
    let ((answer, bytes), answered_at) = waiter.await.unwrap();
    assert_eq!(
        (answer, bytes.as_slice()),
        (cache_answer::HIT, &b"the response"[..])
    );
    assert!(answered_at - started >= Duration::from_millis(300));
    let after_store = answered_at.saturating_duration_since(stored_at);
    assert!(
        after_store < Duration::from_millis(150),
        "answered {after_store:?} after the store"
    );
}

#[tokio::test]
async fn a_released_fill_goes_to_a_waiter() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let k = key(4);
    assert_eq!(peek(api, "acme", &k).await, cache_answer::FILL);

    let waiter = {
        let (base, k) = (api.base.clone(), k.clone());
        tokio::spawn(async move {
            let answer = lookup(&Api::new(base), "acme", &k, 5_000, 1_500).await;
            (answer, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished());
    // The fetch failed: the lock goes, and the waiter becomes the fetcher.
    assert!(release(api, "acme", &k).await);
    let released_at = Instant::now();
    let ((answer, _), answered_at) = waiter.await.unwrap();
    assert_eq!(answer, cache_answer::FILL);
    let after = answered_at.saturating_duration_since(released_at);
    assert!(after < Duration::from_millis(150), "{after:?}");
    // The waiter holds it now; once released there is nothing left to release.
    assert_eq!(peek(api, "acme", &k).await, cache_answer::BUSY);
    assert!(release(api, "acme", &k).await);
    assert!(!release(api, "acme", &k).await);
}

#[tokio::test]
async fn a_waiter_gives_up_busy_after_wait_ms() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let k = key(5);
    assert_eq!(peek(api, "acme", &k).await, cache_answer::FILL);

    let started = Instant::now();
    assert_eq!(
        lookup(api, "acme", &k, 5_000, 300).await,
        (cache_answer::BUSY, vec![])
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(450)).contains(&waited),
        "{waited:?}"
    );
    // wait_ms 0: one look, no wait.
    let started = Instant::now();
    assert_eq!(peek(api, "acme", &k).await, cache_answer::BUSY);
    assert!(started.elapsed() < Duration::from_millis(100));
}

#[tokio::test]
async fn entries_and_fill_locks_expire() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let (long, short, locked, next) = (key(6), key(7), key(8), key(9));

    assert_eq!(
        store(api, "acme", &long, 60_000, 1 << 20, b"0123456789abcdefghij").await,
        stored(0)
    );
    assert_eq!(
        store(api, "acme", &short, 300, 1 << 20, b"0123456789").await,
        stored(0)
    );
    assert_eq!(peek(api, "acme", &short).await, cache_answer::HIT);
    // A tenant whose only entry is short-lived.
    assert_eq!(
        store(api, "brief", &short, 300, 1 << 20, b"0123456789").await,
        stored(0)
    );
    // A fill lock of 200 ms that nobody stores or releases.
    assert_eq!(
        lookup(api, "acme", &locked, 200, 0).await.0,
        cache_answer::FILL
    );
    assert_eq!(peek(api, "acme", &locked).await, cache_answer::BUSY);

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(peek(api, "acme", &short).await, cache_answer::FILL);
    assert_eq!(peek(api, "acme", &locked).await, cache_answer::FILL);
    assert_eq!(peek(api, "acme", &long).await, cache_answer::HIT);

    // The next store drops the expired entry's size from the tenant's total (not an
    // eviction).
    assert_eq!(total(&mut redis, "acme").await, 30);
    assert_eq!(
        store(api, "acme", &next, 60_000, 1 << 20, b"01234").await,
        stored(0)
    );
    assert_eq!(total(&mut redis, "acme").await, 25);
    let indexed: Option<u64> = redis
        .zscore(cache_tenant("acme", "index"), &short)
        .await
        .unwrap();
    let sized: bool = redis
        .hexists(cache_tenant("acme", "sizes"), &short)
        .await
        .unwrap();
    assert_eq!((indexed, sized), (None, false));
    // The bookkeeping lives as long as the tenant's last entry, then goes with it.
    let kept: i64 = redis.pttl(cache_tenant("acme", "index")).await.unwrap();
    assert!((59_000..=60_000).contains(&kept), "{kept}");
    for what in ["index", "sizes", "bytes"] {
        let left: bool = redis.exists(cache_tenant("brief", what)).await.unwrap();
        assert!(!left, "brief's {what} outlived its entries");
    }
}

#[tokio::test]
async fn tenants_never_see_each_others_entries() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let k = key(9);
    assert_eq!(
        store(api, "a", &k, 60_000, 1 << 20, b"from a").await,
        stored(0)
    );
    assert_eq!(peek(api, "b", &k).await, cache_answer::FILL);
    assert_eq!(
        store(api, "b", &k, 60_000, 1 << 20, b"from b").await,
        stored(0)
    );
    assert_eq!(lookup(api, "a", &k, 5_000, 0).await.1, b"from a");
    assert_eq!(lookup(api, "b", &k, 5_000, 0).await.1, b"from b");
    // A tenant's fill lock is its own too.
    let other = key(10);
    assert_eq!(peek(api, "a", &other).await, cache_answer::FILL);
    assert_eq!(peek(api, "b", &other).await, cache_answer::FILL);
    assert_eq!(peek(api, "a", &other).await, cache_answer::BUSY);
}

#[tokio::test]
async fn the_tenant_cap_evicts_the_soonest_to_expire() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let cap = 300;
    let (e1, e2, e3, e4, e5, e6) = (key(11), key(12), key(13), key(14), key(15), key(16));
    let hundred = [b'x'; 100];

    assert_eq!(store(api, "t", &e1, 60_000, cap, &hundred).await, stored(0));
    assert_eq!(store(api, "t", &e2, 30_000, cap, &hundred).await, stored(0));
    assert_eq!(store(api, "t", &e3, 90_000, cap, &hundred).await, stored(0));
    assert_eq!(total(&mut redis, "t").await, 300);

    // Full: the entry closest to expiry (e2) makes room.
    assert_eq!(
        store(api, "t", &e4, 120_000, cap, &hundred).await,
        stored(1)
    );
    assert_eq!(peek(api, "t", &e2).await, cache_answer::FILL);
    assert!(release(api, "t", &e2).await);
    for kept in [&e1, &e3, &e4] {
        assert_eq!(peek(api, "t", kept).await, cache_answer::HIT);
    }
    assert_eq!(total(&mut redis, "t").await, 300);

    // Replacing an entry counts its new size only: nothing is evicted.
    assert_eq!(
        store(api, "t", &e4, 120_000, cap, &hundred).await,
        stored(0)
    );
    assert_eq!(total(&mut redis, "t").await, 300);

    // 200 bytes take two entries' room: e1 (60 s), then e3 (90 s); e4 (120 s) stays.
    assert_eq!(
        store(api, "t", &e5, 100_000, cap, &[b'y'; 200]).await,
        stored(2)
    );
    assert_eq!(peek(api, "t", &e1).await, cache_answer::FILL);
    assert_eq!(peek(api, "t", &e3).await, cache_answer::FILL);
    assert_eq!(peek(api, "t", &e4).await, cache_answer::HIT);
    assert_eq!(peek(api, "t", &e5).await, cache_answer::HIT);
    assert_eq!(total(&mut redis, "t").await, 300);
    let indexed: u64 = redis.zcard(cache_tenant("t", "index")).await.unwrap();
    assert_eq!(indexed, 2);

    // An entry larger than the cap alone is refused, evicts nothing, and frees its lock.
    assert_eq!(peek(api, "t", &e6).await, cache_answer::FILL);
    assert_eq!(
        store(api, "t", &e6, 60_000, cap, &[b'z'; 301]).await,
        CacheStored {
            stored: false,
            evicted: 0
        }
    );
    let locked: bool = redis
        .exists(format!("{}:fill", cache_entry("t", &e6)))
        .await
        .unwrap();
    assert!(!locked, "a refused store gives the fill lock up");
    assert_eq!(peek(api, "t", &e6).await, cache_answer::FILL);
    assert_eq!(peek(api, "t", &e4).await, cache_answer::HIT);
    assert_eq!(total(&mut redis, "t").await, 300);

    // Another tenant's cap is its own: filling it evicts nothing of this one's.
    assert_eq!(
        store(api, "u", &e1, 60_000, cap, &[b'w'; 300]).await,
        stored(0)
    );
    assert_eq!(peek(api, "t", &e4).await, cache_answer::HIT);
    assert_eq!(peek(api, "t", &e5).await, cache_answer::HIT);
}

#[tokio::test]
async fn bad_cache_requests_are_refused_before_redis() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let good = key(0xab);
    let lookup_of = |tenant: &str, key: &str, fill_ms: u64, wait_ms: u64| {
        serde_json::to_string(&CacheLookup {
            tenant: tenant.into(),
            key: key.into(),
            fill_ms,
            wait_ms,
        })
        .unwrap()
    };
    let lookups = [
        (lookup_of("a", &good.to_uppercase(), 1, 0), "key"),
        (lookup_of("a", &good[1..], 1, 0), "key"),
        (lookup_of("a", &format!("{}g", &good[1..]), 1, 0), "key"),
        (lookup_of("", &good, 1, 0), "tenant"),
        (lookup_of("a}", &good, 1, 0), "tenant"),
        (lookup_of("a", &good, 0, 0), "fill_ms"),
        (lookup_of("a", &good, 600_001, 0), "fill_ms"),
        (lookup_of("a", &good, 1, 600_001), "wait_ms"),
        (
            format!(r#"{{"tenant":"a","key":"{good}","fill_ms":1,"wait_ms":0,"x":1}}"#),
            "unknown field `x`",
        ),
        (r#"{"tenant":"a"}"#.to_string(), "missing field"),
    ];
    for (body, problem) in lookups {
        refused(api, CACHE_LOOKUP_PATH, body.into_bytes(), problem).await;
    }

    let header = |tenant: &str, key: &str, ttl_ms: u64| CacheStoreHeader {
        tenant: tenant.into(),
        key: key.into(),
        ttl_ms,
        tenant_max_bytes: 1 << 20,
    };
    let stores = [
        (b"no newline at all".to_vec(), "newline"),
        (b"{not json\nentry".to_vec(), "header:"),
        (
            format!(
                "{{\"tenant\":\"a\",\"key\":\"{good}\",\"ttl_ms\":1,\"tenant_max_bytes\":1,\"x\":1}}\nentry"
            )
            .into_bytes(),
            "unknown field `x`",
        ),
        (store_body(&header("a", "abc", 1_000), b"entry"), "key"),
        (store_body(&header("", &good, 1_000), b"entry"), "tenant"),
        (store_body(&header("a", &good, 0), b"entry"), "ttl_ms"),
        (
            store_body(&header("a", &good, 30 * 86_400_000 + 1), b"entry"),
            "ttl_ms",
        ),
        (store_body(&header("a", &good, 1_000), b""), "entry"),
    ];
    for (body, problem) in stores {
        refused(api, CACHE_STORE_PATH, body, problem).await;
    }

    let releases = [
        (r#"{"tenant":"a","key":"00"}"#.to_string(), "key"),
        (
            format!(r#"{{"tenant":"a","key":"{good}","fill_ms":1}}"#),
            "unknown field `fill_ms`",
        ),
    ];
    for (body, problem) in releases {
        refused(api, CACHE_RELEASE_PATH, body.into_bytes(), problem).await;
    }
    let response = reqwest::get(format!("{}{CACHE_LOOKUP_PATH}", api.base))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);

    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
    assert_eq!(keys, 0, "nothing refused reached Redis");
}

async fn refused(api: &Api, path: &str, body: Vec<u8>, problem: &str) {
    let shown = String::from_utf8_lossy(&body).into_owned();
    let (status, content_type, answer) = api.bytes(path, body).await;
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_else(|_| {
        let answer = String::from_utf8_lossy(&answer);
        panic!("{path} {shown}: not JSON ({status}): {answer:?}")
    });
    assert_eq!(status, 400, "{path} {shown}: {answer}");
    assert_eq!(content_type, "application/json");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains(problem),
        "{path} {shown}: {error:?} should name {problem:?}"
    );
}
