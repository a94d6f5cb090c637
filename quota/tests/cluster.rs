//! The quota service over a real Redis Cluster (three primaries on loopback): a request
//! whose limits live in two hash slots (a tenant's and a provider's) is still all or
//! nothing, and settles once; the response cache works within each tenant's hash slot.

// Test code: a failed step should stop the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use sluice::global::wire::{cache_answer, CacheStored};
use sluice::global::wire::{
    AdmitReply, Lease, PeekItem, PeekReply, PeekRequest, RenewReply, RenewRequest, SettleItem,
    SettleOutcome, SettleReply, SettleRequest, Settlement, ADMIT_PATH, PEEK_PATH, RENEW_PATH,
    SETTLE_PATH,
};
use sluice::limits::Demand;
use support::cache::{key, lookup, peek, release, store, stored};
use support::{admit, concurrency, monthly, rate, RedisCluster, Service};

fn settlement(id: &str, month: u32, demands: &[Demand], actual: u64) -> SettleRequest {
    SettleRequest {
        settlements: vec![Settlement {
            id: id.into(),
            month,
            items: demands
                .iter()
                .map(|d| SettleItem {
                    key: d.key.clone(),
                    kind: d.kind,
                    reserved: d.amount,
                    actual: actual.min(d.amount),
                })
                .collect(),
        }],
    }
}

async fn remaining(api: &support::Api, demands: &[Demand]) -> Vec<u64> {
    let peek = PeekRequest {
        limits: demands
            .iter()
            .map(|d| PeekItem {
                key: d.key.clone(),
                kind: d.kind,
            })
            .collect(),
    };
    let reply: PeekReply = api.call(PEEK_PATH, &peek).await;
    reply
        .readings
        .iter()
        .map(|r| r.snapshot.remaining)
        .collect()
}

#[tokio::test]
async fn limits_in_two_hash_slots_are_all_or_nothing_and_settle_once() {
    let cluster = RedisCluster::start();
    let service = Service::over_cluster(&cluster.urls()).await;
    let api = &service.api;
    let (tenant_tpm, tenant_conc, tenant_mtok, provider_rpm) = (
        "sluice:{t:acme}:tpm",
        "sluice:{t:acme}:conc",
        "sluice:{t:acme}:mtok",
        "sluice:{p:openai}:rpm",
    );
    let demands = vec![
        concurrency(tenant_conc, 5),
        rate(tenant_tpm, 1_000, 100),
        monthly(tenant_mtok, 10_000, 100),
        rate(provider_rpm, 1, 1),
    ];
    // Admitted across both slots: one snapshot per demand, in the request's order.
    let reply: AdmitReply = api.call(ADMIT_PATH, &admit("c1", demands.clone())).await;
    let AdmitReply::Admitted { snapshots, month } = reply else {
        panic!("expected admission, got {reply:?}");
    };
    let left: Vec<u64> = snapshots.iter().map(|s| s.remaining).collect();
    assert_eq!(left, vec![4, 900, 9_900, 0]);

    // The provider's single request per minute is spent: the next request is refused at
    // the provider (index 3 of the request), and the tenant's slot takes nothing.
    let before = remaining(api, &demands[..3]).await;
    let reply: AdmitReply = api.call(ADMIT_PATH, &admit("c2", demands.clone())).await;
    let AdmitReply::Rejected { index, .. } = reply else {
        panic!("expected a refusal, got {reply:?}");
    };
    assert_eq!(index, 3);
    let after = remaining(api, &demands[..3]).await;
    assert_eq!(after[0], before[0], "no lease left behind");
    assert_eq!(
        after[2], before[2],
        "the month's reservation was given back"
    );
    assert!(
        after[1] >= before[1],
        "the bucket was given back: {after:?} vs {before:?}"
    );

    // Leases of several slots renew in one call.
    let renew = RenewRequest {
        lease_ms: 30_000,
        leases: vec![
            Lease {
                key: tenant_conc.into(),
                id: "c1".into(),
            },
            Lease {
                key: "sluice:{t:other}:conc".into(),
                id: "gone".into(),
            },
        ],
    };
    let renewed: RenewReply = api.call(RENEW_PATH, &renew).await;
    assert_eq!((renewed.renewed, renewed.lost), (1, 1));

    // Settled once, whichever slot: the retry is a duplicate and changes nothing.
    let settle = settlement("c1", month, &demands, 10);
    let first: SettleReply = api.call(SETTLE_PATH, &settle).await;
    assert_eq!(first.outcomes, vec![SettleOutcome::Settled]);
    let settled = remaining(api, &demands).await;
    assert_eq!(settled[0], 5, "the lease is released");
    assert_eq!(
        settled[2], 9_990,
        "the month keeps the real 10, not the 100 reserved"
    );
    let again: SettleReply = api.call(SETTLE_PATH, &settle).await;
    assert_eq!(again.outcomes, vec![SettleOutcome::Duplicate]);
    assert_eq!(remaining(api, &demands).await[2], 9_990);
}

#[tokio::test]
async fn the_cache_round_trips_and_evicts_within_each_tenants_slot() {
    let cluster = RedisCluster::start();
    let service = Service::over_cluster(&cluster.urls()).await;
    let api = &service.api;
    // Tenants in different hash slots, one on each node.
    let tenants = ["acme", "umbrella", "stark"];
    let (first, second) = (key(0xa1), key(0xa2));
    for tenant in tenants {
        assert_eq!(peek(api, tenant, &first).await, cache_answer::FILL);
        let entry = format!("{tenant}\n\x00\u{ff}").into_bytes();
        assert_eq!(
            store(api, tenant, &first, 60_000, 100, &entry).await,
            stored(0)
        );
        assert_eq!(
            lookup(api, tenant, &first, 5_000, 0).await,
            (cache_answer::HIT, entry)
        );
        // Evicting runs inside the script, on keys it derives: they share the tenant's slot.
        assert_eq!(
            store(api, tenant, &second, 120_000, 100, &[b'x'; 95]).await,
            stored(1)
        );
        assert_eq!(peek(api, tenant, &first).await, cache_answer::FILL);
        assert!(release(api, tenant, &first).await);
        assert_eq!(
            store(api, tenant, &first, 60_000, 10, &[b'y'; 11]).await,
            CacheStored {
                stored: false,
                evicted: 0
            }
        );
    }
    // Each tenant was on its own node (each node has a third of the slots).
    let mut node = cluster.nodes[0].sync_connection();
    let mut thirds: Vec<u16> = tenants
        .iter()
        .map(|tenant| {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(format!("{{t:{tenant}}}"))
                .query(&mut node)
                .unwrap();
            slot / 5461
        })
        .collect();
    thirds.sort_unstable();
    assert_eq!(thirds, vec![0, 1, 2]);
}
