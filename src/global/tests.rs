//! The courier: batches, retries with backoff, lost settlements, lease renewal.

use super::wire::{
    Lease, RenewRequest, SettleItem, SettleOutcome, SettleReply, SettleRequest, Settlement,
};
use super::*;
use crate::limits::LimitKind;
use crate::policy::{MeasureSet, OnEngineFailure};

fn courier(settle_attempts: u32) -> Courier {
    Courier::new(&GlobalLimits {
        cluster: "q".into(),
        authority: "q".into(),
        timeout_ms: 50,
        tenant_measures: MeasureSet::default(),
        provider_measures: MeasureSet::default(),
        on_engine_failure: OnEngineFailure::Deny,
        lease_ms: 3_000,
        settle_attempts,
    })
}

fn settlement(id: &str) -> Settlement {
    Settlement {
        id: id.into(),
        month: 24_322,
        items: vec![SettleItem {
            key: "sluice:{t:acme}:tpm".into(),
            kind: LimitKind::Rate {
                per_minute: 100,
                burst_milli: 1000,
            },
            reserved: 50,
            actual: 10,
        }],
    }
}

fn settled(n: usize) -> Vec<u8> {
    serde_json::to_vec(&SettleReply {
        outcomes: vec![SettleOutcome::Settled; n],
    })
    .unwrap()
}

#[test]
fn settlements_go_out_in_one_batch_and_an_answer_ends_them() {
    let mut c = courier(3);
    c.settle(settlement("a"));
    c.settle(settlement("b"));
    let mut out = c.due(0);
    assert_eq!(out.len(), 1);
    let call = out.remove(0);
    assert_eq!(call.path, "/v1/settle");
    let sent: SettleRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(sent.settlements.len(), 2);
    c.sent(7, call.errand);
    assert!(c.answered(7, Ok(&settled(2)), 10).is_empty());
    assert!(c.due(10_000).is_empty(), "nothing left to send");
    // An answer to an unknown call changes nothing.
    assert!(c.answered(7, Ok(&settled(2)), 10).is_empty());
}

#[test]
fn a_failed_settlement_is_retried_after_a_backoff_then_counted_lost() {
    let mut c = courier(2);
    c.settle(settlement("a"));
    let call = c.due(0).remove(0);
    c.sent(1, call.errand);
    let reports = c.answered(1, Err("timeout".into()), 100);
    assert_eq!(
        reports,
        vec![Report::Retrying {
            id: "a".into(),
            why: "timeout".into()
        }]
    );
    assert!(c.due(299).is_empty(), "not before the backoff");
    let retry = c.due(300).remove(0);
    let body: SettleRequest = serde_json::from_slice(&retry.body).unwrap();
    assert_eq!(
        body.settlements,
        vec![settlement("a")],
        "the same settlement, same id"
    );
    let reports = c.undelivered(retry.errand, "no cluster", 300);
    let [Report::Lost { id, record, .. }] = reports.as_slice() else {
        panic!("{reports:?}");
    };
    assert_eq!(id, "a");
    assert!(record.contains(r#""id":"a""#), "{record}");
    assert!(c.due(100_000).is_empty());
}

#[test]
fn an_answer_for_the_wrong_number_of_settlements_is_a_failure() {
    let mut c = courier(3);
    c.settle(settlement("a"));
    let call = c.due(0).remove(0);
    c.sent(1, call.errand);
    let reports = c.answered(1, Ok(&settled(2)), 0);
    assert!(
        matches!(reports.as_slice(), [Report::Retrying { .. }]),
        "{reports:?}"
    );
}

#[test]
fn batches_are_bounded() {
    let mut c = courier(3);
    for i in 0..(MAX_BATCH + 1) {
        c.settle(settlement(&i.to_string()));
    }
    let out = c.due(0);
    let sizes: Vec<usize> = out
        .iter()
        .map(|o| {
            serde_json::from_slice::<SettleRequest>(&o.body)
                .unwrap()
                .settlements
                .len()
        })
        .collect();
    assert_eq!(sizes, vec![MAX_BATCH, 1]);
}

#[test]
fn leases_are_renewed_every_third_of_a_lease_while_held() {
    let mut c = courier(3);
    let lease = |id: &str| Lease {
        key: "sluice:{t:acme}:conc".into(),
        id: id.into(),
    };
    assert!(c.due(0).is_empty(), "nothing held: no renewal");
    c.hold(5, vec![lease("x")]);
    c.hold(6, vec![lease("y")]);
    assert!(
        c.due(999).is_empty(),
        "next renewal a third of the lease after the last"
    );
    let call = c.due(1_000).remove(0);
    assert_eq!(call.path, "/v1/renew");
    let renew: RenewRequest = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(renew.lease_ms, 3_000);
    assert_eq!(renew.leases.len(), 2);
    c.sent(9, call.errand);
    assert!(c.due(5_000).is_empty(), "one renewal at a time");
    let lost = serde_json::to_vec(&super::wire::RenewReply {
        renewed: 1,
        lost: 1,
    })
    .unwrap();
    assert_eq!(c.answered(9, Ok(&lost), 5_000), vec![Report::LeasesLost(1)]);
    c.release(5);
    c.release(6);
    assert_eq!(c.leases_held(), 0);
    assert!(c.due(10_000).is_empty());
}
