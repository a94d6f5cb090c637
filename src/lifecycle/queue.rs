//! A request's place at a provider with a capacity (`max_in_flight`), and this worker's
//! requests waiting for one: every queue decision the gateway makes, over the fair queue
//! in shared data ([`crate::fairness`]). The host only carries out the [`QueueAction`]s
//! returned here (resume a stream, answer it, log a warning).
//!
//! Only the worker that holds a paused stream can resume it, so each worker claims slots
//! for its own waiters: right after one of its requests completes, and on a short tick.

use super::BodyEnv;
use crate::errors::{ApiError, ApiFlavour, ErrorKind, LocalReply};
use crate::fairness::{allocate_worker_id, tenant_hash, Arrival, FairQueue, Owner, Ticket};
use crate::metrics::{MetricKey, Metrics};
use crate::policy::{Policy, ProviderId, QueueSpec, Tenant};
use crate::shared::{Store, StoreError};
use std::cell::Cell;
use std::rc::Rc;

/// Tick period while requests wait: the worst-case extra wait when another worker freed
/// the slot.
pub const TICK_MS: u64 = 10;
/// How often the queue gauges are written.
const GAUGE_PERIOD_MS: u64 = 1000;

/// How a wait ended, as this worker's queue decided; the stream reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitState {
    Waiting,
    Resumed { at_ms: u64 },
    TimedOut,
}

/// One of a provider's in-flight slots, held until the stream ends.
#[derive(Debug)]
pub(super) struct Slot {
    queue: QueueSpec,
}

/// A place in a provider's queue.
#[derive(Debug)]
pub(super) struct Wait {
    queue: QueueSpec,
    owner: Owner,
    since_ms: u64,
    deadline_ms: u64,
    /// Written by this worker's [`WorkerQueue`], read by the stream.
    ended: Rc<Cell<WaitState>>,
}

/// Where an admitted request entered its provider's queue.
#[derive(Debug)]
pub(super) enum Entered {
    Holding(Slot),
    Waiting(Wait),
}

/// What a request holds at its provider, to give back at its end.
#[derive(Debug, Default)]
pub(super) enum Place {
    #[default]
    Nowhere,
    Holding(Slot),
    Waiting(Wait),
}

/// Takes one of `provider`'s in-flight slots, or a place in its queue.
pub(super) fn enter(
    provider: &str,
    queue: &QueueSpec,
    tenant: &Tenant,
    env: &BodyEnv,
) -> Result<Entered, ApiError> {
    let q = tenant.queueing;
    let owner = Owner {
        worker: env.worker,
        context: env.context,
    };
    let ticket = Ticket {
        tenant: tenant_hash(&tenant.id),
        priority: q.priority,
        weight: q.weight,
        max_queue_length: q.max_queue_length,
        deadline_ms: env.now_ms.saturating_add(q.max_wait_ms),
    };
    let fair = FairQueue::new(env.store, &queue.key, queue.capacity);
    match fair.arrive(owner, ticket, env.now_ms) {
        Arrival::Admitted => Ok(Entered::Holding(Slot {
            queue: queue.clone(),
        })),
        Arrival::Queued { .. } => Ok(Entered::Waiting(Wait {
            queue: queue.clone(),
            owner,
            since_ms: env.now_ms,
            deadline_ms: ticket.deadline_ms,
            ended: Rc::new(Cell::new(WaitState::Waiting)),
        })),
        Arrival::QueueFull => {
            let message = format!(
                "Provider `{provider}` is at capacity and its queue is full (tenant `{}` may have {} requests waiting).",
                tenant.id, q.max_queue_length
            );
            Err(ApiError::new(ErrorKind::QueueFull, message).retry_after_ms(1000))
        }
        Arrival::Failed(failure) => Err(ApiError::shared_state("queue", failure)),
    }
}

impl Slot {
    fn release(self, store: &dyn Store) -> Result<(), String> {
        FairQueue::new(store, &self.queue.key, self.queue.capacity)
            .release()
            .map_err(|e| format!("{}: release: {e:?}", self.queue.key))
    }
}

impl Wait {
    pub(super) fn state(&self) -> WaitState {
        self.ended.get()
    }

    pub(super) fn since_ms(&self) -> u64 {
        self.since_ms
    }

    /// How long it waited before its worker gave up.
    pub(super) fn timed_out_after_ms(&self) -> u64 {
        self.deadline_ms.saturating_sub(self.since_ms)
    }

    /// The slot its worker claimed for it when it resumed it.
    pub(super) fn into_slot(self) -> Slot {
        Slot { queue: self.queue }
    }

    /// What this worker's queue tracks to resume or time it out.
    pub(super) fn waiter(&self, flavour: ApiFlavour) -> Waiter {
        Waiter {
            context: self.owner.context,
            queue: self.queue.clone(),
            since_ms: self.since_ms,
            deadline_ms: self.deadline_ms,
            flavour,
            ended: self.ended.clone(),
        }
    }

    /// The stream ended while waiting: give up the place.
    fn cancel(self, store: &dyn Store) -> Result<(), String> {
        FairQueue::new(store, &self.queue.key, self.queue.capacity)
            .cancel(self.owner)
            .map(|_| ())
            .map_err(|e| format!("{}: cancel: {e:?}", self.queue.key))
    }
}

/// What a place gave back at the end of its request.
#[derive(Debug, Default)]
pub(super) struct Left {
    pub(super) failure: Option<String>,
    /// A slot was released: this worker's waiters may claim it now.
    pub(super) released_slot: bool,
}

impl Place {
    /// Gives back a held slot, or a place still waiting (a timed-out waiter was removed by
    /// its worker already: cancelling finds nothing).
    pub(super) fn leave(self, store: &dyn Store) -> Left {
        match self {
            Place::Nowhere => Left::default(),
            Place::Holding(slot) => Left {
                failure: slot.release(store).err(),
                released_slot: true,
            },
            Place::Waiting(wait) => Left {
                failure: wait.cancel(store).err(),
                released_slot: false,
            },
        }
    }
}

/// The answer to a request that waited too long for a full provider.
pub fn timeout_reply(flavour: ApiFlavour, waited_ms: u64) -> LocalReply {
    ApiError::new(
        ErrorKind::QueueTimeout,
        format!("The provider is at capacity; the request waited {waited_ms} ms without a free slot. Please retry later."),
    )
    .retry_after_ms(1000)
    .reply(flavour)
}

/// A paused request as this worker's queue tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiter {
    /// The stream's context id in this worker's VM.
    pub context: u32,
    queue: QueueSpec,
    since_ms: u64,
    deadline_ms: u64,
    flavour: ApiFlavour,
    ended: Rc<Cell<WaitState>>,
}

impl Waiter {
    /// When its worker gives up on it and answers it.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }
}

/// What the host must do for the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueAction {
    /// The stream holds a slot now: make it current and resume it.
    Resume { context: u32 },
    /// The stream waited past its tier's maximum: make it current and send this reply.
    Reply { context: u32, reply: LocalReply },
    /// Something to log; nothing else to do.
    Warn(String),
}

/// This worker's requests waiting for providers' slots.
#[derive(Debug)]
pub struct WorkerQueue {
    worker: u32,
    /// Every provider with a capacity, for the gauges and stale expiry.
    providers: Vec<(ProviderId, QueueSpec)>,
    waiters: Vec<Waiter>,
    last_gauge_ms: u64,
}

impl WorkerQueue {
    /// This worker's queue if any provider has a capacity, with a worker id unique in this
    /// Envoy process (one per worker VM); `None` when no provider queues.
    pub fn for_policy(policy: &Policy, store: &dyn Store) -> Result<Option<Self>, StoreError> {
        let providers: Vec<_> = policy
            .providers_by_id()
            .filter_map(|(id, p)| Some((id, p.queue.clone()?)))
            .collect();
        if providers.is_empty() {
            return Ok(None);
        }
        Ok(Some(WorkerQueue {
            worker: allocate_worker_id(store)?,
            providers,
            waiters: Vec::new(),
            last_gauge_ms: 0,
        }))
    }

    pub fn worker(&self) -> u32 {
        self.worker
    }

    pub fn add(&mut self, waiter: Waiter) {
        self.waiters.push(waiter);
    }

    /// The stream ended: it is no longer ours to resume.
    pub fn forget(&mut self, context: u32) {
        self.waiters.retain(|w| w.context != context);
    }

    /// Times out expired waiters, claims free slots for the others, and once a second
    /// writes the queue gauges.
    pub fn tick(
        &mut self,
        store: &dyn Store,
        now_ms: u64,
        metrics: &mut dyn Metrics,
    ) -> Vec<QueueAction> {
        let mut actions = self.expire(store, now_ms);
        actions.extend(self.claim(store, now_ms));
        if now_ms.saturating_sub(self.last_gauge_ms) >= GAUGE_PERIOD_MS {
            self.last_gauge_ms = now_ms;
            self.report(store, now_ms, metrics);
        }
        actions
    }

    /// Waiters past their deadline leave the queue and get the timeout reply.
    fn expire(&mut self, store: &dyn Store, now_ms: u64) -> Vec<QueueAction> {
        let (expired, kept) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| now_ms >= w.deadline_ms);
        self.waiters = kept;
        let mut actions = Vec::new();
        for w in expired {
            let owner = Owner {
                worker: self.worker,
                context: w.context,
            };
            // Gone from the queue either way (or the queue cannot be reached): answer.
            let queue = FairQueue::new(store, &w.queue.key, w.queue.capacity);
            if let Err(e) = queue.cancel(owner) {
                let warning = format!("sluice: queue cancel {}: {e:?}", w.queue.key);
                actions.push(QueueAction::Warn(warning));
            }
            w.ended.set(WaitState::TimedOut);
            let reply = timeout_reply(w.flavour, now_ms.saturating_sub(w.since_ms));
            actions.push(QueueAction::Reply {
                context: w.context,
                reply,
            });
        }
        actions
    }

    /// Claims head-of-queue slots for this worker's waiters, on every provider queue one
    /// of them waits in (no key copied per call): each claimed waiter is resumed; a slot
    /// claimed for a stream that already went away is released.
    pub fn claim(&mut self, store: &dyn Store, now_ms: u64) -> Vec<QueueAction> {
        let WorkerQueue {
            worker,
            providers,
            waiters,
            ..
        } = self;
        let mut actions = Vec::new();
        for (_, spec) in providers.iter() {
            if !waiters.iter().any(|w| w.queue.key == spec.key) {
                continue;
            }
            let queue = FairQueue::new(store, &spec.key, spec.capacity);
            let owners = match queue.claim_for_worker(*worker, now_ms) {
                Ok(owners) => owners,
                Err(e) => {
                    let warning = format!("sluice: queue claim {}: {e:?}", spec.key);
                    actions.push(QueueAction::Warn(warning));
                    continue;
                }
            };
            for owner in owners {
                match waiters.iter().position(|w| w.context == owner.context) {
                    Some(i) => {
                        let w = waiters.remove(i);
                        w.ended.set(WaitState::Resumed { at_ms: now_ms });
                        actions.push(QueueAction::Resume { context: w.context });
                    }
                    // The stream went away between its arrival and the claim.
                    None => {
                        if let Err(e) = queue.release() {
                            let warning = format!("sluice: queue release {}: {e:?}", spec.key);
                            actions.push(QueueAction::Warn(warning));
                        }
                    }
                }
            }
        }
        actions
    }

    /// Every worker writes the same global figures, so the gauges are right whichever
    /// wrote last; stale waiters of a dead worker are dropped on the way.
    fn report(&self, store: &dyn Store, now_ms: u64, metrics: &mut dyn Metrics) {
        for (provider, spec) in &self.providers {
            let queue = FairQueue::new(store, &spec.key, spec.capacity);
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
