//! Global limits: the ones a configuration's `global` section moves from this Envoy's
//! shared data to Redis, reached through the stateless quota service (`quota/`).
//!
//! All of a worker's traffic to the quota service goes through its [`Courier`], sent from
//! the worker's root context (a stream's own calls die with the stream, and one call can
//! carry several requests' business):
//! - admissions: a request waiting for its global limits (the lifecycle's `Admitting`
//!   stage) is sent at once when fewer than [`ADMISSION_CALLS`] admission calls are in
//!   flight; otherwise it waits for one to come back and goes with the others waiting, in
//!   one call (group commit). At low load every request has its own call; under load one
//!   call serves many, which is what keeps the callout's cost per request down. Each
//!   admission is still decided on its own, atomically, in Redis.
//! - settlements, after their stream ended, batched, retried a bounded number of times;
//! - the leases of the global concurrency slots this worker's requests hold, renewed every
//!   third of the lease while they run;
//! - the global cache's writes after their stream ended (a response to store, a fill to
//!   give back), sent once: a lost one costs a later miss, or a wait bounded by the fill's
//!   lifetime.

pub mod wire;

use crate::policy::GlobalLimits;
use std::collections::HashMap;
use wire::{
    AdmitBatch, AdmitBatchReply, AdmitOutcome, AdmitReply, AdmitRequest, Lease, RenewReply,
    RenewRequest, SettleReply, SettleRequest, Settlement,
};

/// Most settlements, or admissions, in one call.
const MAX_BATCH: usize = 256;
/// Admission calls a worker has in flight at most; more requests wait for the next call.
pub const ADMISSION_CALLS: usize = 2;
/// An admission call unanswered this long after its timeout is given up (its answer was
/// lost), and its requests get the no-answer treatment.
const OVERDUE_GRACE_MS: u64 = 1_000;
/// First retry of a failed settlement after this long, doubling with each attempt.
const RETRY_BASE_MS: u64 = 200;

/// A call the host makes for the [`Courier`], then reports with [`Courier::sent`] (or
/// [`Courier::undelivered`] if it could not be dispatched).
#[derive(Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub path: &'static str,
    pub body: Vec<u8>,
    pub errand: Errand,
}

/// What a call carries, to match its answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Errand {
    Settle(Vec<Attempted>),
    Renew { leases: usize },
    CacheWrite,
}

/// A settlement and the tries it has had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempted {
    settlement: Settlement,
    attempts: u32,
}

/// What the host should record or log after an answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Report {
    /// A settlement failed and will be tried again.
    Retrying { id: String, why: String },
    /// A settlement ran out of tries: the quota service may still count its reservation.
    /// `record` is the settlement as JSON, for billing to reconcile from the log.
    Lost {
        id: String,
        why: String,
        record: String,
    },
    /// Leases that had expired before their renewal (their slots went to others).
    LeasesLost(u32),
    /// A renewal failed; the next one is due a third of a lease later.
    RenewFailed(String),
    /// A cache write (store or release) failed; it is not tried again.
    CacheWriteFailed(String),
}

/// One request's admission decision, for the stream `context`: the service's answer, or
/// why there is none.
pub type Decision = (u32, Result<AdmitReply, String>);

/// This worker's admissions, settlements in transit and leases held.
#[derive(Debug)]
pub struct Courier {
    lease_ms: u64,
    timeout_ms: u64,
    settle_attempts: u32,
    /// Admissions waiting for a call, by stream.
    admissions: Vec<(u32, AdmitRequest)>,
    /// Admission calls in flight: the streams each carries, and when it was sent.
    admitting: HashMap<u32, (Vec<u32>, u64)>,
    /// Waiting to be sent, with the earliest time to send each.
    queued: Vec<(Attempted, u64)>,
    in_flight: HashMap<u32, Errand>,
    leases: HashMap<u32, Vec<Lease>>,
    next_renewal_ms: u64,
    /// Cache writes waiting for the next tick: path and body.
    cache_writes: Vec<(&'static str, Vec<u8>)>,
}

impl Courier {
    pub fn new(global: &GlobalLimits) -> Self {
        Courier {
            lease_ms: global.lease_ms,
            timeout_ms: global.timeout_ms,
            settle_attempts: global.settle_attempts,
            admissions: Vec::new(),
            admitting: HashMap::new(),
            queued: Vec::new(),
            in_flight: HashMap::new(),
            leases: HashMap::new(),
            next_renewal_ms: 0,
            cache_writes: Vec::new(),
        }
    }

    /// Stream `context` waits for the decision on `request`.
    pub fn admit(&mut self, context: u32, request: AdmitRequest) {
        self.admissions.push((context, request));
    }

    /// Stream `context` ended: if its admission is still waiting, it is not sent. (If it
    /// is in flight, its decision is dropped; the stream's settlement releases whatever
    /// the service took.)
    pub fn forget_admission(&mut self, context: u32) {
        self.admissions.retain(|(c, _)| *c != context);
    }

    /// The admission call to make now, if there are admissions waiting and fewer than
    /// [`ADMISSION_CALLS`] in flight: its body and the streams it carries. Report it with
    /// [`Courier::admission_sent`], or [`Courier::admission_unsent`].
    pub fn admission_call(&mut self) -> Option<(Vec<u8>, Vec<u32>)> {
        if self.admissions.is_empty() || self.admitting.len() >= ADMISSION_CALLS {
            return None;
        }
        let rest = self
            .admissions
            .split_off(self.admissions.len().min(MAX_BATCH));
        let taken = std::mem::replace(&mut self.admissions, rest);
        let (contexts, admissions): (Vec<u32>, Vec<AdmitRequest>) = taken.into_iter().unzip();
        let body = serde_json::to_vec(&AdmitBatch { admissions }).ok()?;
        Some((body, contexts))
    }

    pub fn admission_sent(&mut self, token: u32, contexts: Vec<u32>, now_ms: u64) {
        self.admitting.insert(token, (contexts, now_ms));
    }

    /// The call could not be dispatched: its requests are decided as unanswered.
    pub fn admission_unsent(contexts: Vec<u32>, why: &str) -> Vec<Decision> {
        contexts
            .into_iter()
            .map(|c| (c, Err(why.to_string())))
            .collect()
    }

    /// The answer to call `token` if it is an admission call: one decision per stream it
    /// carried. `None`: not an admission call.
    pub fn admission_answered(
        &mut self,
        token: u32,
        answer: Result<&[u8], String>,
    ) -> Option<Vec<Decision>> {
        let (contexts, _) = self.admitting.remove(&token)?;
        let outcomes = answer.and_then(|body| {
            let reply: AdmitBatchReply =
                serde_json::from_slice(body).map_err(|e| format!("unusable answer: {e}"))?;
            if reply.outcomes.len() == contexts.len() {
                Ok(reply.outcomes)
            } else {
                Err("unusable answer: not one decision per admission".into())
            }
        });
        Some(match outcomes {
            Ok(outcomes) => contexts
                .into_iter()
                .zip(outcomes)
                .map(|(c, outcome)| match outcome {
                    AdmitOutcome::Decided(reply) => (c, Ok(reply)),
                    AdmitOutcome::Failed { error } => (c, Err(error)),
                })
                .collect(),
            Err(why) => Self::admission_unsent(contexts, &why),
        })
    }

    /// Admission calls whose answer never came (Envoy answers every call, at the latest
    /// with its timeout: this only catches a lost one): their requests, as unanswered.
    pub fn overdue_admissions(&mut self, now_ms: u64) -> Vec<Decision> {
        let limit = self.timeout_ms.saturating_add(OVERDUE_GRACE_MS);
        let overdue: Vec<u32> = self
            .admitting
            .iter()
            .filter(|(_, (_, sent))| now_ms.saturating_sub(*sent) > limit)
            .map(|(token, _)| *token)
            .collect();
        let mut out = Vec::new();
        for token in overdue {
            if let Some((contexts, _)) = self.admitting.remove(&token) {
                out.extend(Self::admission_unsent(contexts, "no answer"));
            }
        }
        out
    }

    /// A finished request's settlement, sent at the next [`Courier::due`].
    pub fn settle(&mut self, settlement: Settlement) {
        let attempted = Attempted {
            settlement,
            attempts: 0,
        };
        self.queued.push((attempted, 0));
    }

    /// The leases request `context` holds while it runs (replacing any before).
    pub fn hold(&mut self, context: u32, leases: Vec<Lease>) {
        if leases.is_empty() {
            self.leases.remove(&context);
        } else {
            self.leases.insert(context, leases);
        }
    }

    /// Request `context` ended: its leases are released by its settlement.
    pub fn release(&mut self, context: u32) {
        self.leases.remove(&context);
    }

    /// A write to the global cache, sent at the next tick.
    pub fn cache_write(&mut self, path: &'static str, body: Vec<u8>) {
        self.cache_writes.push((path, body));
    }

    pub fn leases_held(&self) -> usize {
        self.leases.values().map(Vec::len).sum()
    }

    /// The calls to make now: queued settlements whose time has come (in batches), and
    /// a renewal of every lease held when one is due.
    pub fn due(&mut self, now_ms: u64) -> Vec<Outgoing> {
        let mut out: Vec<Outgoing> = std::mem::take(&mut self.cache_writes)
            .into_iter()
            .map(|(path, body)| Outgoing {
                path,
                body,
                errand: Errand::CacheWrite,
            })
            .collect();
        let (ready, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.queued)
            .into_iter()
            .partition(|(_, not_before)| *not_before <= now_ms);
        self.queued = later;
        let mut ready: Vec<Attempted> = ready.into_iter().map(|(a, _)| a).collect();
        while !ready.is_empty() {
            let rest = ready.split_off(ready.len().min(MAX_BATCH));
            let batch = std::mem::replace(&mut ready, rest);
            let request = SettleRequest {
                settlements: batch.iter().map(|a| a.settlement.clone()).collect(),
            };
            match serde_json::to_vec(&request) {
                Ok(body) => out.push(Outgoing {
                    path: wire::SETTLE_PATH,
                    body,
                    errand: Errand::Settle(batch),
                }),
                // Cannot happen for these types; keep them for the next try rather than drop.
                Err(_) => self
                    .queued
                    .extend(batch.into_iter().map(|a| (a, now_ms + 1000))),
            }
        }
        let renewing = self
            .in_flight
            .values()
            .any(|e| matches!(e, Errand::Renew { .. }));
        if now_ms >= self.next_renewal_ms && !renewing {
            self.next_renewal_ms = now_ms.saturating_add(self.lease_ms / 3);
            let leases: Vec<Lease> = self.leases.values().flatten().cloned().collect();
            if !leases.is_empty() {
                let request = RenewRequest {
                    lease_ms: self.lease_ms,
                    leases,
                };
                if let Ok(body) = serde_json::to_vec(&request) {
                    out.push(Outgoing {
                        path: wire::RENEW_PATH,
                        body,
                        errand: Errand::Renew {
                            leases: request.leases.len(),
                        },
                    });
                }
            }
        }
        out
    }

    /// The host dispatched `errand` as call `token`.
    pub fn sent(&mut self, token: u32, errand: Errand) {
        self.in_flight.insert(token, errand);
    }

    /// The host could not dispatch `errand`.
    pub fn undelivered(&mut self, errand: Errand, why: &str, now_ms: u64) -> Vec<Report> {
        self.failed(errand, why, now_ms)
    }

    /// The answer to call `token`: `Ok(body)` for a 200, `Err(why)` otherwise.
    pub fn answered(
        &mut self,
        token: u32,
        answer: Result<&[u8], String>,
        now_ms: u64,
    ) -> Vec<Report> {
        let Some(errand) = self.in_flight.remove(&token) else {
            return Vec::new();
        };
        match (errand, answer) {
            (Errand::Settle(batch), Ok(body)) => {
                match serde_json::from_slice::<SettleReply>(body) {
                    Ok(reply) if reply.outcomes.len() == batch.len() => Vec::new(),
                    _ => self.failed(Errand::Settle(batch), "unusable answer", now_ms),
                }
            }
            (Errand::Renew { .. }, Ok(body)) => match serde_json::from_slice::<RenewReply>(body) {
                Ok(reply) if reply.lost > 0 => vec![Report::LeasesLost(reply.lost)],
                Ok(_) => Vec::new(),
                Err(e) => vec![Report::RenewFailed(format!("unusable answer: {e}"))],
            },
            (Errand::CacheWrite, Ok(_)) => Vec::new(),
            (errand, Err(why)) => self.failed(errand, &why, now_ms),
        }
    }

    fn failed(&mut self, errand: Errand, why: &str, now_ms: u64) -> Vec<Report> {
        let batch = match errand {
            Errand::Settle(batch) => batch,
            Errand::Renew { .. } => return vec![Report::RenewFailed(why.to_string())],
            Errand::CacheWrite => return vec![Report::CacheWriteFailed(why.to_string())],
        };
        let mut reports = Vec::new();
        for mut attempted in batch {
            attempted.attempts += 1;
            let id = attempted.settlement.id.clone();
            if attempted.attempts >= self.settle_attempts {
                let record = serde_json::to_string(&attempted.settlement).unwrap_or_default();
                let why = why.to_string();
                reports.push(Report::Lost { id, why, record });
                continue;
            }
            // A retry is safe: the service applies a settlement at most once.
            let backoff = RETRY_BASE_MS << (attempted.attempts - 1).min(10);
            reports.push(Report::Retrying {
                id,
                why: why.to_string(),
            });
            self.queued
                .push((attempted, now_ms.saturating_add(backoff)));
        }
        reports
    }
}

#[cfg(test)]
mod tests;
