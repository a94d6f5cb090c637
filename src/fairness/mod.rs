//! Fair queuing in front of a provider: when a provider account's in-flight capacity is
//! used up, requests wait in one queue per provider shared by every Envoy worker, and a
//! freed slot goes to the next waiter by strict tier priority, then by start-time fair
//! queuing between tenants, by weight (see `state.rs` for the exact rules and encoding).
//!
//! Cross-worker protocol. All state is one [`Store`] key per provider, changed only through
//! the shared compare-and-set loop (`shared/cas.rs`), as the limits are. A
//! waiter belongs to the worker holding its paused stream ([`Owner`]); only that worker
//! resumes it. A worker claims slots only for its own waiters, and only those within the
//! first `capacity - in_flight` waiters in service order (the global head when one slot
//! is free), taking the slot and removing the waiter in the same write. Workers claim on a
//! short tick and after each completion, so no cross-worker wake-up is needed.
//!
//! The host's duties:
//! - [`FairQueue::arrive`] once per request that passed its limits: `Admitted` holds a slot
//!   now; `Queued` pauses the stream (the waiter is in the queue).
//! - On each tick and after each completion, [`FairQueue::claim_for_worker`]: every owner
//!   returned now holds a slot and must be resumed (or, if its stream is gone, released).
//! - [`FairQueue::release`] exactly once per slot held, when the stream ends.
//! - [`FairQueue::cancel`] when a waiting stream ends or reaches its deadline. `false` means
//!   it was no longer waiting: it was expired by another worker (never claimed, since only
//!   its owner claims it), so it holds nothing.
//! - Optionally [`FairQueue::expire_stale`] on tick (every claim and arrival expires too).

mod state;

#[cfg(test)]
mod tests;

use crate::shared::codec::{self, Writer};
use crate::shared::keys::{self, tag};
use crate::shared::{
    cas_update, CasFailure, Change as StoredChange, Store, StoreError, CREATE_CAS,
    GIVE_BACK_ATTEMPTS, TAKE_ATTEMPTS,
};
use state::State;
pub use state::{COST, GRACE_MS, MAX_IDLE_FLOWS, MAX_WAITING};

/// Who holds a waiting stream: a worker (from [`allocate_worker_id`]) and the stream's
/// context id in that worker's VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    pub worker: u32,
    pub context: u32,
}

/// What a request brings to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// Stable tenant hash ([`tenant_hash`]).
    pub tenant: u32,
    /// Tier priority: higher is served first, strictly.
    pub priority: u8,
    /// Share among tenants of the same priority; 0 is taken as 1.
    pub weight: u32,
    /// Most waiters this tenant may have on this provider.
    pub max_queue_length: u32,
    /// Wall-clock ms when the owner will give up; others remove it [`GRACE_MS`] later.
    pub deadline_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// A slot was taken now: go upstream, release when done.
    Admitted,
    /// Waiting: pause the stream. `position`: waiters ahead in service order (best effort).
    Queued { position: u32 },
    /// The tenant already has `max_queue_length` waiters here, or the queue holds
    /// [`MAX_WAITING`]. Nothing was taken.
    QueueFull,
    /// Compare-and-set retries ran out (`Contended`) or the store failed (`Host`: fail
    /// closed). Nothing was taken.
    Failed(CasFailure),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub in_flight: u32,
    pub waiting: u32,
    /// Waiters per priority, highest priority first, for every priority this queue has
    /// seen (zeros included, so gauges go back to 0).
    pub by_priority: Vec<(u8, u32)>,
}

impl QueueStats {
    /// [`QueueStats::by_priority`] as gauge values.
    pub fn waiting_by_priority(&self) -> Vec<(u8, u64)> {
        self.by_priority
            .iter()
            .map(|&(priority, n)| (priority, u64::from(n)))
            .collect()
    }
}

/// One provider's queue: its key and the capacity now configured (a reload may change it;
/// each decision compares `in_flight` with the capacity given here).
pub struct FairQueue<'a, S: Store + ?Sized> {
    store: &'a S,
    key: &'a str,
    capacity: u32,
}

enum Change<T> {
    Write(State, T),
    Keep(T),
}

impl<'a, S: Store + ?Sized> FairQueue<'a, S> {
    pub fn new(store: &'a S, key: &'a str, capacity: u32) -> Self {
        FairQueue {
            store,
            key,
            capacity,
        }
    }

    /// A request wants a slot. Takes one at once if it is among the first free ones in
    /// service order (always so when nobody waits and a slot is free); otherwise queues it
    /// unless its tenant's queue (or the whole queue) is full. An owner already waiting is
    /// not queued twice (`Queued` with its position).
    pub fn arrive(&self, owner: Owner, ticket: Ticket, now_ms: u64) -> Arrival {
        let capacity = self.capacity;
        let result = self.update(TAKE_ATTEMPTS, |mut state| {
            let expired = state.expire(now_ms) > 0;
            if state.contains(owner) {
                let position = state.position_of(owner).unwrap_or(0);
                let queued = Arrival::Queued { position };
                return if expired {
                    Change::Write(state, queued)
                } else {
                    Change::Keep(queued)
                };
            }
            state.insert(owner, &ticket);
            if !state.claim(capacity, |o| o == owner).is_empty() {
                return Change::Write(state, Arrival::Admitted);
            }
            let tenant_full =
                state.tenant_waiting(ticket.tenant) as u64 > u64::from(ticket.max_queue_length);
            if tenant_full || state.waiting() > MAX_WAITING {
                return Change::Keep(Arrival::QueueFull);
            }
            let position = state.position_of(owner).unwrap_or(0);
            Change::Write(state, Arrival::Queued { position })
        });
        result.unwrap_or_else(Arrival::Failed)
    }

    /// Takes slots for this worker's waiters that are within the first free slots in
    /// service order, and removes expired waiters. Returns the owners now holding a slot,
    /// in service order: resume each (or release its slot if its stream is gone).
    pub fn claim_for_worker(&self, worker: u32, now_ms: u64) -> Result<Vec<Owner>, StoreError> {
        let capacity = self.capacity;
        self.update(TAKE_ATTEMPTS, |mut state| {
            let expired = state.expire(now_ms) > 0;
            let claimed = state.claim(capacity, |o| o.worker == worker);
            if claimed.is_empty() && !expired {
                Change::Keep(claimed)
            } else {
                Change::Write(state, claimed)
            }
        })
        .map_err(StoreError::from)
    }

    /// Gives back one slot; never below zero. Call exactly once per slot held.
    pub fn release(&self) -> Result<(), StoreError> {
        self.update(GIVE_BACK_ATTEMPTS, |mut state| {
            if state.in_flight == 0 {
                Change::Keep(())
            } else {
                state.in_flight -= 1;
                Change::Write(state, ())
            }
        })
        .map_err(StoreError::from)
    }

    /// Removes `owner`'s waiter if it still waits; false if it was not found.
    pub fn cancel(&self, owner: Owner) -> Result<bool, StoreError> {
        self.update(GIVE_BACK_ATTEMPTS, |mut state| {
            if state.remove(owner) {
                Change::Write(state, true)
            } else {
                Change::Keep(false)
            }
        })
        .map_err(StoreError::from)
    }

    /// Removes waiters whose deadline passed more than [`GRACE_MS`] ago (their worker is
    /// gone); returns how many.
    pub fn expire_stale(&self, now_ms: u64) -> Result<u32, StoreError> {
        self.update(GIVE_BACK_ATTEMPTS, |mut state| match state.expire(now_ms) {
            0 => Change::Keep(0),
            removed => Change::Write(state, removed),
        })
        .map_err(StoreError::from)
    }

    pub fn stats(&self) -> Result<QueueStats, StoreError> {
        let stored = self.store.get(self.key)?;
        let state = State::decode(stored.as_ref().map(|(value, _)| value.as_slice()));
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let by_priority = state
            .classes
            .iter()
            .map(|c| {
                (
                    c.priority,
                    count(c.flows.iter().map(|f| f.waiters.len()).sum()),
                )
            })
            .collect();
        Ok(QueueStats {
            in_flight: state.in_flight,
            waiting: count(state.waiting()),
            by_priority,
        })
    }

    /// [`cas_update`] on this queue's key: decode, `apply`, prune and encode.
    fn update<T>(
        &self,
        attempts: u32,
        mut apply: impl FnMut(State) -> Change<T>,
    ) -> Result<T, CasFailure> {
        cas_update(
            self.store,
            self.key,
            CREATE_CAS,
            attempts,
            |stored| match apply(State::decode(stored)) {
                Change::Keep(result) => StoredChange::Keep(result),
                Change::Write(mut state, result) => {
                    state.prune();
                    StoredChange::Write(state.encode(), result)
                }
            },
        )
    }
}

/// 32-bit FNV-1a of a tenant's name: a stable id across workers and reloads.
pub fn tenant_hash(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

/// Allocates a worker id unique in this Envoy process (counter in [`keys::WORKERS`], value
/// tag `W`, the last id as u32): call once per root context (one per worker VM). Ids start
/// at 1 and never repeat until the counter wraps; a value that does not decode restarts
/// the count.
pub fn allocate_worker_id<S: Store + ?Sized>(store: &S) -> Result<u32, StoreError> {
    cas_update(
        store,
        keys::WORKERS,
        CREATE_CAS,
        GIVE_BACK_ATTEMPTS,
        |stored| {
            let last = stored
                .and_then(|value| codec::decode(value, tag::WORKERS, |r| r.u32()))
                .unwrap_or(0);
            let id = match last.wrapping_add(1) {
                0 => 1,
                id => id,
            };
            StoredChange::Write(Writer::new(tag::WORKERS, 6).u32(id).finish(), id)
        },
    )
    .map_err(StoreError::from)
}
