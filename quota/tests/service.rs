//! The quota service against a real, private `redis-server`, over HTTP.

// Test code: a failed step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use redis::AsyncCommands;
use sluice::global::wire::{
    AdmitBatch, AdmitBatchReply, AdmitOutcome, AdmitReply, Lease, PeekItem, PeekReply, PeekRequest,
    RenewReply, RenewRequest, SettleItem, SettleOutcome, SettleReply, SettleRequest, Settlement,
    ADMIT_BATCH_PATH, ADMIT_PATH, PEEK_PATH, RENEW_PATH, SETTLE_PATH,
};
use sluice::limits::{
    month_index, month_start_ms, Admission, Demand, LimitKind, Limiter, Snapshot, Taken,
};
use sluice::shared::keys::{month_key, reservation};
use sluice::shared::MemoryStore;
use std::time::{Duration, Instant};
use support::{admit, concurrency, monthly, rate, redis_now, Api, Redis, Service};

const UNIT: i64 = 60_000;
const DAY_MS: u64 = 86_400_000;

fn admitted(reply: AdmitReply) -> (Vec<Snapshot>, u32) {
    match reply {
        AdmitReply::Admitted { snapshots, month } => (snapshots, month),
        rejected => panic!("expected admission, got {rejected:?}"),
    }
}

fn rejected(reply: AdmitReply) -> (usize, Option<u64>, Snapshot) {
    match reply {
        AdmitReply::Rejected {
            index,
            retry_after_ms,
            snapshot,
        } => (index, retry_after_ms, snapshot),
        admitted => panic!("expected a refusal, got {admitted:?}"),
    }
}

fn snapshot(limit: u64, remaining: u64, reset_ms: u64) -> Snapshot {
    Snapshot {
        limit,
        remaining,
        reset_ms,
    }
}

fn item(demand: &Demand, actual: u64) -> SettleItem {
    SettleItem {
        key: demand.key.clone(),
        kind: demand.kind,
        reserved: demand.amount,
        actual,
    }
}

fn settle_one(id: &str, month: u32, items: Vec<SettleItem>) -> SettleRequest {
    SettleRequest {
        settlements: vec![Settlement {
            id: id.to_string(),
            month,
            items,
        }],
    }
}

async fn settle(api: &Api, request: &SettleRequest) -> Vec<SettleOutcome> {
    let reply: SettleReply = api.call(SETTLE_PATH, request).await;
    reply.outcomes
}

async fn peek(api: &Api, limits: &[(&str, LimitKind)]) -> Vec<(Snapshot, u64)> {
    let request = PeekRequest {
        limits: limits
            .iter()
            .map(|(key, kind)| PeekItem {
                key: key.to_string(),
                kind: *kind,
            })
            .collect(),
    };
    let reply: PeekReply = api.call(PEEK_PATH, &request).await;
    reply
        .readings
        .into_iter()
        .map(|reading| (reading.snapshot, reading.used))
        .collect()
}

/// Puts a bucket at `level` parts, last refilled in the future: until then nothing refills,
/// so what the scripts compute is exact whatever the test's own timing.
async fn pin_bucket(redis: &mut redis::aio::MultiplexedConnection, key: &str, level: i64) -> u64 {
    let later = redis_now(redis).await + 600_000;
    let _: () = redis
        .hset_multiple(
            key,
            &[("level", level.to_string()), ("last_ms", later.to_string())],
        )
        .await
        .unwrap();
    later
}

async fn level_of(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    let level: String = redis.hget(key, "level").await.unwrap();
    level.parse().unwrap()
}

fn rate_kind(per_minute: u64) -> LimitKind {
    LimitKind::Rate {
        per_minute,
        burst_milli: 1000,
    }
}

#[tokio::test]
async fn rate_takes_refuses_with_exact_retry_after_and_refills() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let key = "sluice:{t:a}:rpm";

    // A missing bucket is full: 60 units at 60 per minute (60 parts per ms).
    let (snapshots, _) = admitted(
        api.call(ADMIT_PATH, &admit("r1", vec![rate(key, 60, 10)]))
            .await,
    );
    assert_eq!(snapshots, vec![snapshot(60, 50, 10_000)]);
    assert_eq!(level_of(&mut redis, key).await, 50 * UNIT);
    // Redis may drop the bucket a minute after it would be full.
    let ttl: i64 = redis.pttl(key).await.unwrap();
    assert!((60_000..=70_000).contains(&ttl), "{ttl}");

    // 2 units held, 5 asked: 3 short at 60 parts per ms is exactly 3000 ms.
    pin_bucket(&mut redis, key, 2 * UNIT).await;
    let (index, retry, refused) = rejected(
        api.call(ADMIT_PATH, &admit("r2", vec![rate(key, 60, 5)]))
            .await,
    );
    assert_eq!((index, retry), (0, Some(3_000)));
    assert_eq!(refused, snapshot(60, 2, 58_000));
    // One part short: 1 ms.
    pin_bucket(&mut redis, key, 5 * UNIT - 1).await;
    let (_, retry, _) = rejected(
        api.call(ADMIT_PATH, &admit("r3", vec![rate(key, 60, 5)]))
            .await,
    );
    assert_eq!(retry, Some(1));
    // More than the capacity: waiting cannot help.
    let (_, retry, _) = rejected(
        api.call(ADMIT_PATH, &admit("r4", vec![rate(key, 60, 61)]))
            .await,
    );
    assert_eq!(retry, None);
    // A take never moves last_ms back, and takes exactly the amount.
    let later = pin_bucket(&mut redis, key, 10 * UNIT).await;
    admitted(
        api.call(ADMIT_PATH, &admit("r5", vec![rate(key, 60, 1)]))
            .await,
    );
    assert_eq!(level_of(&mut redis, key).await, 9 * UNIT);
    let last: u64 = redis.hget(key, "last_ms").await.unwrap();
    assert_eq!(last, later);

    // Nothing refills at 0 per minute.
    let still = "sluice:{t:a}:still";
    let (_, retry, refused) = rejected(
        api.call(ADMIT_PATH, &admit("r6", vec![rate(still, 0, 1)]))
            .await,
    );
    assert_eq!((retry, refused), (None, snapshot(0, 0, 0)));

    // Refill: empty 2 s ago at 60 per minute holds at least 2 units now.
    let now = redis_now(&mut redis).await;
    let _: () = redis
        .hset_multiple(
            key,
            &[
                ("level", "0".to_string()),
                ("last_ms", (now - 2_000).to_string()),
            ],
        )
        .await
        .unwrap();
    let (snapshots, _) = admitted(
        api.call(ADMIT_PATH, &admit("r7", vec![rate(key, 60, 2)]))
            .await,
    );
    assert!(snapshots[0].remaining <= 1, "{snapshots:?}");
    let last: u64 = redis.hget(key, "last_ms").await.unwrap();
    assert!(last >= now, "last_ms moves to now on refill");
}

#[tokio::test]
async fn reserve_then_settle_leaves_capacity_minus_real_usage() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let key = "sluice:{t:a}:tpm";
    let kind = rate_kind(1_000);
    pin_bucket(&mut redis, key, 1_000 * UNIT).await;

    let reserve = rate(key, 1_000, 400);
    let (_, month) = admitted(
        api.call(ADMIT_PATH, &admit("r1", vec![reserve.clone()]))
            .await,
    );
    assert_eq!(level_of(&mut redis, key).await, 600 * UNIT);
    let outcomes = settle(api, &settle_one("r1", month, vec![item(&reserve, 150)])).await;
    assert_eq!(outcomes, vec![SettleOutcome::Settled]);
    assert_eq!(level_of(&mut redis, key).await, 850 * UNIT);
    assert_eq!(peek(api, &[(key, kind)]).await[0].1, 150);

    // Using more than reserved charges the rest, into debt.
    let reserve = rate(key, 1_000, 100);
    admitted(
        api.call(ADMIT_PATH, &admit("r2", vec![reserve.clone()]))
            .await,
    );
    settle(api, &settle_one("r2", month, vec![item(&reserve, 2_000)])).await;
    assert_eq!(level_of(&mut redis, key).await, -1_150 * UNIT);
    let (reading, used) = peek(api, &[(key, kind)]).await[0];
    assert_eq!((reading, used), (snapshot(1_000, 0, 129_000), 2_150));
    // In debt nothing is admitted until refilled: 1151 units at 1000 per minute.
    let (_, retry, _) = rejected(
        api.call(ADMIT_PATH, &admit("r3", vec![rate(key, 1_000, 1)]))
            .await,
    );
    assert_eq!(retry, Some(69_060));

    // A refund never fills past the capacity.
    pin_bucket(&mut redis, key, 990 * UNIT).await;
    let reserve = rate(key, 1_000, 5);
    admitted(
        api.call(ADMIT_PATH, &admit("r4", vec![reserve.clone()]))
            .await,
    );
    pin_bucket(&mut redis, key, 998 * UNIT).await;
    settle(api, &settle_one("r4", month, vec![item(&reserve, 0)])).await;
    assert_eq!(level_of(&mut redis, key).await, 1_000 * UNIT);
}

#[tokio::test]
async fn concurrency_leases_expire_by_themselves() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let key = "sluice:{t:a}:conc";
    let short = |id: &str| {
        let mut request = admit(id, vec![concurrency(key, 2)]);
        request.lease_ms = 300;
        request
    };

    let (snapshots, month) = admitted(api.call(ADMIT_PATH, &short("a")).await);
    assert_eq!(snapshots, vec![snapshot(2, 1, 0)]);
    let (snapshots, _) = admitted(api.call(ADMIT_PATH, &short("b")).await);
    assert_eq!(snapshots, vec![snapshot(2, 0, 0)]);
    let (index, retry, refused) = rejected(api.call(ADMIT_PATH, &short("c")).await);
    assert_eq!((index, retry, refused), (0, None, snapshot(2, 0, 0)));
    let ttl: i64 = redis.pttl(key).await.unwrap();
    assert!(
        (1..=600).contains(&ttl),
        "the lease set lives 2 leases: {ttl}"
    );

    // Settling releases the request's lease.
    let outcomes = settle(
        api,
        &settle_one("a", month, vec![item(&concurrency(key, 2), 1)]),
    )
    .await;
    assert_eq!(outcomes, vec![SettleOutcome::Settled]);
    admitted(api.call(ADMIT_PATH, &short("c")).await);

    // Unrenewed leases expire: their slots come back without anyone releasing them.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        peek(api, &[(key, LimitKind::Concurrency { max: 2 })]).await[0].1,
        0
    );
    admitted(api.call(ADMIT_PATH, &short("d")).await);
    admitted(api.call(ADMIT_PATH, &short("e")).await);
    rejected(api.call(ADMIT_PATH, &short("f")).await);
    let members: Vec<String> = redis.zrange(key, 0, -1).await.unwrap();
    assert_eq!(
        members,
        vec!["d", "e"],
        "expired leases are swept on admission"
    );
}

#[tokio::test]
async fn monthly_totals_live_in_month_keys() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let base = "sluice:{t:a}:mtok";

    let before = redis_now(&mut redis).await;
    let (snapshots, month) = admitted(
        api.call(ADMIT_PATH, &admit("r1", vec![monthly(base, 1_000, 600)]))
            .await,
    );
    let after = redis_now(&mut redis).await;
    assert!(
        month == month_index(before) || month == month_index(after),
        "Redis's month"
    );
    let month_end = month_start_ms(month + 1);
    assert_eq!((snapshots[0].limit, snapshots[0].remaining), (1_000, 400));
    assert!((month_end - after..=month_end - before).contains(&snapshots[0].reset_ms));
    let key = month_key(base, month);
    let total: u64 = redis.get(&key).await.unwrap();
    assert_eq!(total, 600);
    // Kept 35 days past the end of its month.
    let expires: u64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(expires, month_end + 35 * DAY_MS);

    // Over the limit: wait for the next month, or forever if more than the whole limit.
    let (_, retry, refused) = rejected(
        api.call(ADMIT_PATH, &admit("r2", vec![monthly(base, 1_000, 500)]))
            .await,
    );
    let retry = retry.unwrap();
    assert!(retry <= month_end - before && retry + 5_000 >= month_end - before);
    assert_eq!((refused.limit, refused.remaining), (1_000, 400));
    let (_, retry, _) = rejected(
        api.call(ADMIT_PATH, &admit("r3", vec![monthly(base, 1_000, 1_001)]))
            .await,
    );
    assert_eq!(retry, None);

    // Settlement corrects the month charged.
    let reserved = monthly(base, 1_000, 600);
    settle(api, &settle_one("r1", month, vec![item(&reserved, 100)])).await;
    let total: u64 = redis.get(&key).await.unwrap();
    assert_eq!(total, 100);

    // Never below zero, and the expiry stays.
    let reserved = monthly(base, 1_000, 30);
    admitted(
        api.call(ADMIT_PATH, &admit("r4", vec![reserved.clone()]))
            .await,
    );
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(10)
        .arg("KEEPTTL")
        .query_async(&mut redis)
        .await
        .unwrap();
    settle(api, &settle_one("r4", month, vec![item(&reserved, 0)])).await;
    let total: u64 = redis.get(&key).await.unwrap();
    assert_eq!(total, 0);
    let kept: u64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(kept, month_end + 35 * DAY_MS);

    // A settlement names the month it was charged to: a late one lands there, with an
    // expiry if the counter had none.
    let reserved = monthly(base, 1_000, 5);
    admitted(
        api.call(ADMIT_PATH, &admit("r5", vec![reserved.clone()]))
            .await,
    );
    settle(api, &settle_one("r5", month - 1, vec![item(&reserved, 12)])).await;
    let earlier = month_key(base, month - 1);
    let total: u64 = redis.get(&earlier).await.unwrap();
    assert_eq!(total, 7);
    let expires: u64 = redis::cmd("PEXPIRETIME")
        .arg(&earlier)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(expires, month_start_ms(month) + 35 * DAY_MS);
    let total: u64 = redis.get(&key).await.unwrap();
    assert_eq!(total, 5);
}

#[tokio::test]
async fn a_refusal_at_a_later_demand_takes_nothing() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let (conc, rpm, mtok) = ("sluice:{t:a}:conc", "sluice:{t:a}:rpm", "sluice:{t:a}:mtok");

    let (_, month) = admitted(
        api.call(
            ADMIT_PATH,
            &admit("r1", vec![rate(rpm, 60, 1), monthly(mtok, 10, 5)]),
        )
        .await,
    );
    let bucket_before: Vec<(String, String)> = redis.hgetall(rpm).await.unwrap();
    let demands = vec![concurrency(conc, 5), rate(rpm, 60, 1), monthly(mtok, 10, 6)];
    let (index, retry, refused) = rejected(api.call(ADMIT_PATH, &admit("r2", demands)).await);
    assert_eq!(index, 2);
    assert!(retry.is_some());
    assert_eq!((refused.limit, refused.remaining), (10, 5));

    let bucket_after: Vec<(String, String)> = redis.hgetall(rpm).await.unwrap();
    assert_eq!(
        bucket_after, bucket_before,
        "the bucket is untouched, not even refilled"
    );
    let exists: bool = redis.exists(conc).await.unwrap();
    assert!(!exists, "no lease was taken");
    let total: u64 = redis.get(month_key(mtok, month)).await.unwrap();
    assert_eq!(total, 5);
    let exists: bool = redis.exists(reservation(conc, "r2")).await.unwrap();
    assert!(!exists, "a refused request has nothing to settle");
}

#[tokio::test]
async fn a_batch_decides_each_admission_on_its_own() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let rpm = "sluice:{t:b}:rpm";
    let batch = AdmitBatch {
        admissions: vec![
            admit("b1", vec![rate(rpm, 2, 1)]),
            admit("b2", vec![rate(rpm, 2, 1), rate(rpm, 2, 1)]),
            admit("b3", vec![rate(rpm, 2, 1)]),
            admit("b4", vec![rate(rpm, 2, 1)]),
        ],
    };
    let reply: AdmitBatchReply = api.call(ADMIT_BATCH_PATH, &batch).await;
    let decided: Vec<&str> = reply
        .outcomes
        .iter()
        .map(|o| match o {
            AdmitOutcome::Decided(AdmitReply::Admitted { .. }) => "admitted",
            AdmitOutcome::Decided(AdmitReply::Rejected { .. }) => "rejected",
            AdmitOutcome::Failed { .. } => "failed",
        })
        .collect();
    // Two fit in the bucket; the bad one (a key twice) fails alone and takes nothing.
    let admitted = decided.iter().filter(|d| **d == "admitted").count();
    assert_eq!(decided[1], "failed", "{reply:?}");
    assert_eq!(admitted, 2, "{decided:?}");
    assert_eq!(decided.iter().filter(|d| **d == "rejected").count(), 1);
}

#[tokio::test]
async fn a_retried_settlement_counts_once() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    // Stateless: a second copy of the service settles what the first admitted.
    let other = Service::start(&server.url()).await;
    let mut redis = server.connection().await;
    let (rpm, mtok) = ("sluice:{t:a}:tpm", "sluice:{t:a}:mtok");
    pin_bucket(&mut redis, rpm, 100 * UNIT).await;

    let demands = vec![rate(rpm, 100, 40), monthly(mtok, 1_000, 40)];
    let (_, month) = admitted(
        service
            .api
            .call(ADMIT_PATH, &admit("r1", demands.clone()))
            .await,
    );
    let record = reservation(rpm, "r1");
    let ttl: i64 = redis.pttl(&record).await.unwrap();
    assert!((1..=60_000).contains(&ttl), "held for hold_ms: {ttl}");
    let request = settle_one("r1", month, demands.iter().map(|d| item(d, 10)).collect());
    assert_eq!(
        settle(&other.api, &request).await,
        vec![SettleOutcome::Settled]
    );
    assert_eq!(
        settle(&service.api, &request).await,
        vec![SettleOutcome::Duplicate]
    );
    assert_eq!(level_of(&mut redis, rpm).await, 90 * UNIT);
    let total: u64 = redis.get(month_key(mtok, month)).await.unwrap();
    assert_eq!(total, 10);

    // In a batch, each settlement counts once.
    admitted(
        service
            .api
            .call(ADMIT_PATH, &admit("r2", demands.clone()))
            .await,
    );
    let mut batch = request.clone();
    batch.settlements.push(Settlement {
        id: "r2".into(),
        month,
        items: demands.iter().map(|d| item(d, 0)).collect(),
    });
    let outcomes = settle(&service.api, &batch).await;
    assert_eq!(
        outcomes,
        vec![SettleOutcome::Duplicate, SettleOutcome::Settled]
    );
    assert_eq!(level_of(&mut redis, rpm).await, 90 * UNIT);
    let total: u64 = redis.get(month_key(mtok, month)).await.unwrap();
    assert_eq!(total, 10);

    // A reservation held past hold_ms stays charged: its settlement is a duplicate.
    let mut held = admit("r3", demands.clone());
    held.hold_ms = 100;
    admitted(service.api.call(ADMIT_PATH, &held).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let late = settle_one("r3", month, demands.iter().map(|d| item(d, 0)).collect());
    assert_eq!(
        settle(&service.api, &late).await,
        vec![SettleOutcome::Duplicate]
    );
    assert_eq!(level_of(&mut redis, rpm).await, 50 * UNIT);
}

#[tokio::test]
async fn renew_extends_leases_and_does_not_resurrect_them() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let key = "sluice:{t:a}:conc";
    let lease = |id: &str| Lease {
        key: key.to_string(),
        id: id.to_string(),
    };
    for id in ["a", "b"] {
        let mut request = admit(id, vec![concurrency(key, 2)]);
        request.lease_ms = 300;
        admitted(api.call(ADMIT_PATH, &request).await);
    }

    let renew = RenewRequest {
        lease_ms: 1_000,
        leases: vec![lease("a"), lease("never")],
    };
    let reply: RenewReply = api.call(RENEW_PATH, &renew).await;
    assert_eq!(
        reply,
        RenewReply {
            renewed: 1,
            lost: 1
        }
    );
    let renewed: f64 = redis.zscore(key, "a").await.unwrap();
    // A shorter renewal does not shorten a lease.
    let shorter = RenewRequest {
        lease_ms: 1,
        leases: vec![lease("a")],
    };
    let reply: RenewReply = api.call(RENEW_PATH, &shorter).await;
    assert_eq!(
        reply,
        RenewReply {
            renewed: 1,
            lost: 0
        }
    );
    let kept: f64 = redis.zscore(key, "a").await.unwrap();
    assert_eq!(kept, renewed);
    let ttl: i64 = redis.pttl(key).await.unwrap();
    assert!(ttl > 1_500, "the set outlives its longest lease: {ttl}");

    tokio::time::sleep(Duration::from_millis(400)).await;
    let late = RenewRequest {
        lease_ms: 1_000,
        leases: vec![lease("b")],
    };
    let reply: RenewReply = api.call(RENEW_PATH, &late).await;
    assert_eq!(
        reply,
        RenewReply {
            renewed: 0,
            lost: 1
        }
    );
    let gone: Option<f64> = redis.zscore(key, "b").await.unwrap();
    assert_eq!(gone, None, "an expired lease is not recreated");
    assert_eq!(
        peek(api, &[(key, LimitKind::Concurrency { max: 2 })]).await[0].1,
        1
    );
    admitted(
        api.call(ADMIT_PATH, &admit("c", vec![concurrency(key, 2)]))
            .await,
    );
    rejected(
        api.call(ADMIT_PATH, &admit("d", vec![concurrency(key, 2)]))
            .await,
    );
}

#[tokio::test]
async fn peek_reads_without_changing_anything() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let (conc, rpm, mtok, fresh) = (
        "sluice:{t:a}:conc",
        "sluice:{t:a}:rpm",
        "sluice:{t:a}:mtok",
        "sluice:{t:a}:tpm",
    );
    let (_, month) = admitted(
        api.call(
            ADMIT_PATH,
            &admit("r1", vec![concurrency(conc, 3), monthly(mtok, 100, 30)]),
        )
        .await,
    );
    pin_bucket(&mut redis, rpm, 7 * UNIT + 1).await;
    let bucket_before: Vec<(String, String)> = redis.hgetall(rpm).await.unwrap();

    let readings = peek(
        api,
        &[
            (conc, LimitKind::Concurrency { max: 3 }),
            (rpm, rate_kind(60)),
            (mtok, LimitKind::Monthly { limit: 100 }),
            (fresh, rate_kind(60)),
        ],
    )
    .await;
    assert_eq!(readings[0], (snapshot(3, 2, 0), 1));
    // 7 units and a part: 53 units short less a part, counted up.
    assert_eq!(readings[1], (snapshot(60, 7, 53_000), 53));
    assert_eq!((readings[2].0.limit, readings[2].0.remaining), (100, 70));
    assert_eq!(readings[2].1, 30);
    assert_eq!(readings[3], (snapshot(60, 60, 0), 0));

    // A capacity of 10.5 units (7 a minute, burst 1.5) holding 0.4: 10.1 used, counted up.
    let odd = "sluice:{t:a}:odd";
    pin_bucket(&mut redis, odd, 24_000).await;
    let kind = LimitKind::Rate {
        per_minute: 7,
        burst_milli: 1_500,
    };
    assert_eq!(
        peek(api, &[(odd, kind)]).await[0],
        (snapshot(10, 0, 86_572), 11)
    );

    let bucket_after: Vec<(String, String)> = redis.hgetall(rpm).await.unwrap();
    assert_eq!(bucket_after, bucket_before);
    let exists: bool = redis.exists(fresh).await.unwrap();
    assert!(!exists, "reading a missing bucket does not create it");
    let total: u64 = redis.get(month_key(mtok, month)).await.unwrap();
    assert_eq!(total, 30);
}

#[tokio::test]
async fn bad_requests_are_refused_before_redis() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let good = serde_json::to_value(admit("r1", vec![rate("sluice:{t:a}:rpm", 60, 1)])).unwrap();
    let with = |path: &str, value: serde_json::Value| {
        let mut body = good.clone();
        *body.pointer_mut(path).unwrap() = value;
        body.to_string()
    };
    let cases = [
        (r#"{"id":"r1","x":1}"#.to_string(), "unknown field `x`"),
        ("{not json".to_string(), "body:"),
        (with("/id", "".into()), "id must not be empty"),
        (with("/hold_ms", 0.into()), "hold_ms"),
        (with("/lease_ms", 0.into()), "lease_ms"),
        (
            with("/demands/0/amount", (1u64 << 53 | 1).into()),
            "demands[0].amount",
        ),
        (
            with(
                "/demands/0/kind",
                serde_json::json!({"rate": {"per_minute": 1u64 << 40, "burst_milli": 1000}}),
            ),
            "demands[0].kind.rate",
        ),
        (
            with(
                "/demands/0",
                serde_json::to_value(Demand {
                    amount: 2,
                    ..concurrency("c", 5)
                })
                .unwrap(),
            ),
            "concurrency",
        ),
        (
            with(
                "/demands",
                serde_json::to_value(vec![rate("k", 60, 1), monthly("k", 5, 1)]).unwrap(),
            ),
            "appears twice",
        ),
        (
            with(
                "/demands/0/kind",
                serde_json::json!({"rate": {"per_minute": 1}}),
            ),
            "missing field `burst_milli`",
        ),
    ];
    for (body, problem) in cases {
        let (status, answer) = api.raw(ADMIT_PATH, &body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains(problem),
            "{body}: {error:?} should name {problem:?}"
        );
    }
    let (status, answer) = api
        .raw(
            SETTLE_PATH,
            r#"{"settlements":[{"id":"r","month":1,"items":[],"extra":0}]}"#,
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, _) = api.raw(RENEW_PATH, r#"{"lease_ms":0,"leases":[]}"#).await;
    assert_eq!(status, 400);
    let (status, answer) = api.raw("/v1/nothing", "{}").await;
    assert_eq!(status, 404, "{answer}");
    let response = reqwest::get(format!("{}{ADMIT_PATH}", api.base))
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 405);

    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut redis).await.unwrap();
    assert_eq!(keys, 0, "nothing refused reached Redis");
}

/// The monthly limit's reset depends on each side's clock; everything else must match.
fn without_month_reset(mut snapshots: Vec<Snapshot>, monthly_at: usize) -> Vec<Snapshot> {
    if let Some(monthly) = snapshots.get_mut(monthly_at) {
        monthly.reset_ms = 0;
    }
    snapshots
}

#[tokio::test]
async fn random_sequences_decide_as_the_local_limiter() {
    let server = Redis::start();
    let service = Service::start(&server.url()).await;
    let api = &service.api;
    let mut redis = server.connection().await;
    let store = MemoryStore::new();
    let local = Limiter::new(&store);
    // Neither side refills, so both decide the same whatever the timing: the local clock
    // stands still, and each Redis bucket's last refill is in the future.
    let now = redis_now(&mut redis).await;

    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move |bound: u64| {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % bound.max(1)
    };
    let mut open = Vec::new();
    let mut refused_at = [0; 3];
    let (mut admissions, mut settlements) = (0, 0);
    // Limits only run down here; each round starts fresh ones (another tenant), with the
    // rate tighter in early rounds and the month in later ones.
    const ROUNDS: u64 = 5;
    const STEPS: u64 = 60;
    for step in 0..ROUNDS * STEPS {
        let round = step / STEPS;
        let conc = format!("sluice:{{t:{round}}}:conc");
        let tpm = format!("sluice:{{t:{round}}}:tpm");
        let mtok = format!("sluice:{{t:{round}}}:mtok");
        let tokens = LimitKind::Rate {
            per_minute: 200 * (round + 1),
            burst_milli: 1_500,
        };
        if step % STEPS == 0 {
            pin_bucket(&mut redis, &tpm, 300 * (round as i64 + 1) * UNIT).await;
        }
        if open.is_empty() || next(2) == 0 {
            let demands = vec![
                concurrency(&conc, 3),
                Demand {
                    key: tpm,
                    kind: tokens,
                    amount: next(40),
                },
                monthly(&mtok, 400 * (ROUNDS - round), next(100)),
            ];
            let id = format!("r{step}");
            let remote: AdmitReply = api.call(ADMIT_PATH, &admit(&id, demands.clone())).await;
            match (local.admit(&demands, now), remote) {
                (
                    Admission::Admitted { taken, snapshots },
                    AdmitReply::Admitted {
                        snapshots: remote,
                        month,
                    },
                ) => {
                    assert_eq!(
                        without_month_reset(snapshots, 2),
                        without_month_reset(remote, 2),
                        "step {step}"
                    );
                    admissions += 1;
                    open.push((id, taken, month));
                }
                (
                    Admission::Rejected {
                        index,
                        retry_after_ms,
                        snapshot,
                    },
                    AdmitReply::Rejected {
                        index: remote_index,
                        retry_after_ms: remote_retry,
                        snapshot: remote_snapshot,
                    },
                ) => {
                    assert_eq!(index, remote_index, "step {step}");
                    if index == 2 {
                        assert_eq!(retry_after_ms.is_some(), remote_retry.is_some());
                    } else {
                        assert_eq!(retry_after_ms, remote_retry, "step {step}");
                    }
                    // Mask the reset only when the monthly limit refused (1 is past the end).
                    let monthly_at = if index == 2 { 0 } else { 1 };
                    assert_eq!(
                        without_month_reset(vec![snapshot], monthly_at),
                        without_month_reset(vec![remote_snapshot], monthly_at),
                        "step {step}"
                    );
                    refused_at[index] += 1;
                }
                (mine, theirs) => panic!("step {step}: local {mine:?}, redis {theirs:?}"),
            }
        } else {
            let (id, taken, month): (String, Vec<Taken>, u32) =
                open.swap_remove(next(open.len() as u64) as usize);
            let mut items = Vec::new();
            for held in &taken {
                // Mostly less than reserved (refunds), sometimes more (charges, debt).
                let actual = match next(5) {
                    0 => held.amount + next(30),
                    _ => next(held.amount + 1),
                };
                local.settle(held, actual, now).unwrap();
                items.push(SettleItem {
                    key: held.key.clone(),
                    kind: held.kind,
                    reserved: held.amount,
                    actual,
                });
            }
            let outcomes = settle(api, &settle_one(&id, month, items)).await;
            assert_eq!(outcomes, vec![SettleOutcome::Settled], "step {step}");
            settlements += 1;
        }
    }
    // The sequence went through every branch.
    assert!(
        admissions > 50 && settlements > 50 && refused_at.iter().all(|count| *count > 5),
        "{admissions} admitted, {settlements} settled, refused at each limit {refused_at:?}"
    );
}

async fn eventually_ok(api: &Api) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = api.health().await;
        if status == 200 {
            assert_eq!(body, "ok");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "redis did not come back: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn redis_down_is_503_and_the_service_recovers() {
    let port = support::free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    // Started before Redis: it answers, with 503.
    let service = Service::start(&url).await;
    let api = &service.api;
    let request = admit("r1", vec![rate("sluice:{t:a}:rpm", 60, 1)]);
    let body = serde_json::to_string(&request).unwrap();
    let (status, answer) = api.raw(ADMIT_PATH, &body).await;
    assert_eq!(status, 503, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().starts_with("redis: "),
        "{answer}"
    );
    let (status, _) = api.health().await;
    assert_eq!(status, 503);

    let mut server = Redis::start_on(port);
    eventually_ok(api).await;
    admitted(api.call(ADMIT_PATH, &request).await);

    server.stop();
    let (status, answer) = api.raw(ADMIT_PATH, &body).await;
    assert_eq!(status, 503, "{answer}");
    server.restart();
    eventually_ok(api).await;
    admitted(api.call(ADMIT_PATH, &request).await);
}

/// The service's clock 45 days ahead: always another month than Redis's.
fn clock_ahead() -> u64 {
    sluice_quota::system_clock() + 45 * DAY_MS
}

fn clock_behind() -> u64 {
    sluice_quota::system_clock() - 45 * DAY_MS
}

#[tokio::test]
async fn a_wrong_month_guess_is_asked_again_in_redis_month() {
    let server = Redis::start();
    let mut redis = server.connection().await;
    let base = "sluice:{t:a}:mtok";
    let mut months = Vec::new();
    for (id, clock) in [
        ("ahead", clock_ahead as fn() -> u64),
        ("behind", clock_behind),
    ] {
        let service = Service::with_clock(&server.url(), clock).await;
        let before = month_index(redis_now(&mut redis).await);
        let (_, month) = admitted(
            service
                .api
                .call(ADMIT_PATH, &admit(id, vec![monthly(base, 100, 10)]))
                .await,
        );
        let after = month_index(redis_now(&mut redis).await);
        assert!(
            month == before || month == after,
            "{month} {before} {after}"
        );
        assert_ne!(month, month_index(clock()));
        months.push(month);
        let readings = peek(&service.api, &[(base, LimitKind::Monthly { limit: 100 })]).await;
        assert!(readings[0].1 >= 10);
    }
    // Only Redis's month was counted (two months if the test ran across a month's end).
    let mut keys: Vec<String> = redis.keys(format!("{base}:*")).await.unwrap();
    keys.sort();
    let mut expected: Vec<String> = months.iter().map(|month| month_key(base, *month)).collect();
    expected.sort();
    expected.dedup();
    assert_eq!(keys, expected);
    let mut total = 0;
    for key in &keys {
        let count: u64 = redis.get(key).await.unwrap();
        total += count;
    }
    assert_eq!(total, 20);
}

#[tokio::test]
async fn the_lua_calendar_matches_month_index() {
    let server = Redis::start();
    let mut redis = server.connection().await;
    // Every month's first and last ms from 1970 to 2400, then pseudo-random times up to 2^53.
    let mut times: Vec<u64> = (1970 * 12 + 1..2400 * 12)
        .flat_map(|month| {
            let start = month_start_ms(month);
            [start - 1, start, start + DAY_MS / 2]
        })
        .collect();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..5_000 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        times.push(state >> 11);
    }
    times.push(0);
    times.push(1 << 53);
    let probe = format!(
        "{}\nlocal months = {{}}\nfor i = 1, #ARGV do months[i] = month_of(tonumber(ARGV[i])) end\nreturn months",
        sluice_quota::engine::CALENDAR
    );
    for chunk in times.chunks(4_000) {
        let months: Vec<u32> = redis::cmd("EVAL")
            .arg(&probe)
            .arg(0)
            .arg(chunk)
            .query_async(&mut redis)
            .await
            .unwrap();
        for (time, month) in chunk.iter().zip(months) {
            assert_eq!(month, month_index(*time), "at {time} ms");
        }
    }
}

#[tokio::test]
async fn the_binary_serves_h1_and_h2c_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let binary = env!("CARGO_BIN_EXE_sluice-quota");
    let help = Command::new(binary).arg("--help").output().unwrap();
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--listen ADDR"));
    let wrong = Command::new(binary).arg("--nope").output().unwrap();
    assert_eq!(wrong.status.code(), Some(2));

    let server = Redis::start();
    let mut child = Command::new(binary)
        .env("SLUICE_QUOTA_LISTEN", "127.0.0.1:0")
        .env("SLUICE_REDIS_URL", server.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let address = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    assert!(line.starts_with("sluice-quota: listening on"), "{line}");

    let h1 = Api::new(format!("http://{address}"));
    assert_eq!(h1.health().await, (200, "ok".to_string()));
    let h2 = Api::h2c(format!("http://{address}"));
    let response = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap()
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    let (snapshots, _) = admitted(
        h2.call(
            ADMIT_PATH,
            &admit("r1", vec![rate("sluice:{t:a}:rpm", 60, 1)]),
        )
        .await,
    );
    assert_eq!(snapshots[0].remaining, 59);

    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signals the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
