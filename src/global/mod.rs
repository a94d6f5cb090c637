//! Global limits: the ones a configuration's `global` section moves from this Envoy's
//! shared data to Redis, reached through the stateless quota service (`quota/`).
//!
//! Admission is per request (the lifecycle's `Admitting` stage). What outlives a request
//! lives here, one [`Courier`] per worker: settlements to deliver after their stream ended
//! (a stream's own callouts die with it), retried a bounded number of times, and the
//! leases of the global concurrency slots this worker's requests hold, renewed every third
//! of the lease while they run.

pub mod wire;

use crate::policy::GlobalLimits;
use std::collections::HashMap;
use wire::{Lease, RenewReply, RenewRequest, SettleReply, SettleRequest, Settlement};

/// Most settlements in one call.
const MAX_BATCH: usize = 256;
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
}

/// This worker's settlements in transit and leases held.
#[derive(Debug)]
pub struct Courier {
    lease_ms: u64,
    settle_attempts: u32,
    /// Waiting to be sent, with the earliest time to send each.
    queued: Vec<(Attempted, u64)>,
    in_flight: HashMap<u32, Errand>,
    leases: HashMap<u32, Vec<Lease>>,
    next_renewal_ms: u64,
}

impl Courier {
    pub fn new(global: &GlobalLimits) -> Self {
        Courier {
            lease_ms: global.lease_ms,
            settle_attempts: global.settle_attempts,
            queued: Vec::new(),
            in_flight: HashMap::new(),
            leases: HashMap::new(),
            next_renewal_ms: 0,
        }
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

    pub fn leases_held(&self) -> usize {
        self.leases.values().map(Vec::len).sum()
    }

    /// The calls to make now: queued settlements whose time has come (in batches), and
    /// a renewal of every lease held when one is due.
    pub fn due(&mut self, now_ms: u64) -> Vec<Outgoing> {
        let mut out = Vec::new();
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
            (errand, Err(why)) => self.failed(errand, &why, now_ms),
        }
    }

    fn failed(&mut self, errand: Errand, why: &str, now_ms: u64) -> Vec<Report> {
        let batch = match errand {
            Errand::Settle(batch) => batch,
            Errand::Renew { .. } => return vec![Report::RenewFailed(why.to_string())],
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
