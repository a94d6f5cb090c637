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

fn admission(id: &str) -> super::wire::AdmitRequest {
    super::wire::AdmitRequest {
        id: id.into(),
        lease_ms: 3_000,
        hold_ms: 60_000,
        demands: Vec::new(),
    }
}

fn decided(n: usize) -> Vec<u8> {
    use super::wire::{AdmitBatchReply, AdmitOutcome, AdmitReply};
    let mut outcomes = vec![
        AdmitOutcome::Decided(AdmitReply::Admitted {
            snapshots: Vec::new(),
            month: 1,
        });
        n
    ];
    if let Some(last) = outcomes.last_mut() {
        *last = AdmitOutcome::Failed {
            error: "bad".into(),
        };
    }
    serde_json::to_vec(&AdmitBatchReply { outcomes }).unwrap()
}

#[test]
fn admissions_go_out_at_once_until_calls_are_in_flight_then_together() {
    let mut c = courier(3);
    c.admit(1, admission("a"));
    let (body, contexts) = c.admission_call().unwrap();
    assert_eq!(contexts, vec![1]);
    let batch: super::wire::AdmitBatch = serde_json::from_slice(&body).unwrap();
    assert_eq!(batch.admissions, vec![admission("a")]);
    c.admission_sent(10, contexts, 0);
    c.admit(2, admission("b"));
    let (_, contexts) = c.admission_call().unwrap();
    c.admission_sent(11, contexts, 0);
    assert_eq!(ADMISSION_CALLS, 2);
    // Two calls in flight: the next ones wait, and go together when one comes back.
    c.admit(3, admission("c"));
    c.admit(4, admission("d"));
    c.admit(5, admission("e"));
    c.forget_admission(5);
    assert!(c.admission_call().is_none());
    let decisions = c.admission_answered(10, Ok(&decided(1))).unwrap();
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].0, 1);
    let (_, contexts) = c.admission_call().unwrap();
    assert_eq!(contexts, vec![3, 4], "the stream that ended is not sent");
    c.admission_sent(12, contexts, 0);
    // One decision each, in order; a failed one is that request's alone.
    let decisions = c.admission_answered(12, Ok(&decided(2))).unwrap();
    assert!(decisions[0].1.is_ok());
    assert_eq!(decisions[1], (4, Err("bad".into())));
    // Not an admission call: the settlement path answers it.
    assert!(c.admission_answered(99, Ok(b"{}")).is_none());
}

#[test]
fn a_bad_or_missing_answer_leaves_every_request_of_the_call_unanswered() {
    let mut c = courier(3);
    c.admit(1, admission("a"));
    c.admit(2, admission("b"));
    let (_, contexts) = c.admission_call().unwrap();
    c.admission_sent(1, contexts, 0);
    let decisions = c.admission_answered(1, Ok(&decided(1))).unwrap();
    assert!(decisions.iter().all(|(_, d)| d.is_err()), "{decisions:?}");
    c.admit(3, admission("c"));
    let (_, contexts) = c.admission_call().unwrap();
    c.admission_sent(2, contexts, 0);
    assert!(
        c.overdue_admissions(50 + 1_000).is_empty(),
        "timeout + grace not passed"
    );
    let overdue = c.overdue_admissions(50 + 1_001);
    assert_eq!(overdue, vec![(3, Err("no answer".into()))]);
    assert!(
        c.admission_answered(2, Ok(&decided(1))).is_none(),
        "given up already"
    );
}
