//! The requests this worker holds paused in providers' fair queues. Only the worker that
//! holds a stream can resume it, so each worker claims slots for its own waiters: right
//! after one of its requests completes, and on a short tick.

use crate::errors::ApiFlavour;
use crate::fairness::{FairQueue, Owner};
use crate::lifecycle::{queue_timeout_reply, WaitState};
use crate::metrics::{MetricKey, Metrics};
use crate::policy::ProviderId;
use crate::shared::Store;
use proxy_wasm::hostcalls;
use proxy_wasm::types::LogLevel;
use std::cell::Cell;
use std::rc::Rc;

/// Tick period while requests wait: the worst-case extra wait when another worker freed
/// the slot.
pub const TICK_MS: u64 = 10;

pub struct LocalWaiter {
    pub context: u32,
    pub key: String,
    pub capacity: u32,
    pub since_ms: u64,
    pub deadline_ms: u64,
    pub flavour: ApiFlavour,
    /// Shared with the stream's context, which reads how the wait ended.
    pub state: Rc<Cell<WaitState>>,
}

#[derive(Default)]
pub struct LocalQueue {
    pub worker: u32,
    pub waiters: Vec<LocalWaiter>,
    /// Every provider with a capacity: (id, queue key, capacity), for gauges and expiry.
    providers: Vec<(ProviderId, String, u32)>,
    last_gauge_ms: u64,
}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

impl LocalQueue {
    pub fn new(worker: u32, providers: Vec<(ProviderId, String, u32)>) -> Self {
        LocalQueue {
            worker,
            providers,
            ..LocalQueue::default()
        }
    }

    pub fn add(&mut self, waiter: LocalWaiter) {
        self.waiters.push(waiter);
    }

    /// The stream ended while queued: it is no longer ours to resume.
    pub fn forget(&mut self, context: u32) {
        self.waiters.retain(|w| w.context != context);
    }

    /// Times out expired waiters and claims free slots for the others. Returns true
    /// when the gauges are due (once a second).
    pub fn tick(&mut self, store: &dyn Store, now_ms: u64) -> bool {
        self.expire(store, now_ms);
        self.claim(store, now_ms);
        if now_ms.saturating_sub(self.last_gauge_ms) >= 1000 {
            self.last_gauge_ms = now_ms;
            return true;
        }
        false
    }

    fn expire(&mut self, store: &dyn Store, now_ms: u64) {
        let mut kept = Vec::with_capacity(self.waiters.len());
        for w in std::mem::take(&mut self.waiters) {
            if now_ms < w.deadline_ms {
                kept.push(w);
                continue;
            }
            let owner = Owner {
                worker: self.worker,
                context: w.context,
            };
            match FairQueue::new(store, &w.key, w.capacity).cancel(owner) {
                // Gone from the queue either way (or the queue cannot be reached): answer.
                Ok(_) => {}
                Err(e) => log(
                    LogLevel::Warn,
                    &format!("sluice: queue cancel {}: {e:?}", w.key),
                ),
            }
            w.state.set(WaitState::TimedOut);
            let reply = queue_timeout_reply(w.flavour, now_ms.saturating_sub(w.since_ms));
            if hostcalls::set_effective_context(w.context).is_ok() {
                let headers: Vec<(&str, &str)> = reply
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                let _ = hostcalls::send_http_response(
                    u32::from(reply.status),
                    headers,
                    Some(reply.body.as_bytes()),
                );
            }
        }
        self.waiters = kept;
    }

    /// Claims head-of-queue slots for this worker's waiters and resumes them.
    pub fn claim(&mut self, store: &dyn Store, now_ms: u64) {
        let mut queues: Vec<(String, u32)> = Vec::new();
        for w in &self.waiters {
            if !queues.iter().any(|(k, _)| *k == w.key) {
                queues.push((w.key.clone(), w.capacity));
            }
        }
        for (key, capacity) in queues {
            let queue = FairQueue::new(store, &key, capacity);
            let owners = match queue.claim_for_worker(self.worker, now_ms) {
                Ok(owners) => owners,
                Err(e) => {
                    log(LogLevel::Warn, &format!("sluice: queue claim {key}: {e:?}"));
                    continue;
                }
            };
            for owner in owners {
                match self.waiters.iter().position(|w| w.context == owner.context) {
                    Some(i) => {
                        let w = self.waiters.remove(i);
                        w.state.set(WaitState::Resumed { at_ms: now_ms });
                        let resumed = hostcalls::set_effective_context(w.context)
                            .and_then(|()| hostcalls::resume_http_request());
                        if let Err(e) = resumed {
                            log(
                                LogLevel::Warn,
                                &format!("sluice: resume {}: {e:?}", w.context),
                            );
                        }
                    }
                    // The stream went away between our enqueue and the claim: free the slot.
                    None => {
                        if let Err(e) = queue.release() {
                            log(
                                LogLevel::Warn,
                                &format!("sluice: queue release {key}: {e:?}"),
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every worker writes the same global figures, so the gauges are right whichever
    /// wrote last; stale waiters of a dead worker are dropped on the way.
    pub fn report(&self, store: &dyn Store, now_ms: u64, metrics: &mut dyn Metrics) {
        for (provider, key, capacity) in &self.providers {
            let queue = FairQueue::new(store, key, *capacity);
            let _ = queue.expire_stale(now_ms);
            if let Ok(stats) = queue.stats() {
                metrics.add(
                    MetricKey::QueueInFlight(*provider),
                    u64::from(stats.in_flight),
                );
                for (priority, waiting) in stats.waiting_by_priority() {
                    metrics.add(MetricKey::QueueWaiting(*provider, priority), waiting);
                }
            }
        }
    }
}
