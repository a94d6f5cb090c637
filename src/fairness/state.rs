//! One provider's queue state, as stored in its key, and the scheduling rules over it.
//! Pure data: no store, no time source (`now_ms` is passed in).
//!
//! Scheduling: waiters are grouped by priority class (served strictly, highest first),
//! then by flow (one tenant in one class), each flow a FIFO. Within a class, flows are
//! shared by start-time fair queuing: the head of each flow carries a start tag
//! `S = max(V, finish)`; serving it sets `V = max(V, S)` and `finish = S + cost` (cost =
//! [`COST`] / weight). The waiter behind it then becomes the head with `S = finish`. This is
//! SFQ with tags given when a waiter reaches the head of its flow rather than on arrival:
//! the same service order when nobody leaves, but a waiter that is cancelled or expires
//! costs its tenant nothing (eager tags would push the tenant's later requests back for
//! service it never got).
//!
//! A waiter deeper in its flow has the projected start `head S + costs of those ahead`,
//! which is exactly the tag it will get if those ahead are served; the service order is
//! `(class priority desc, projected start, seq)`.
//!
//! Encoding (`shared/codec.rs`, tag `Q`, exact length):
//!
//! ```text
//! [1, b'Q'] in_flight u32, seq u64, classes u16
//!   per class (priority descending): priority u8, V u64, flows u16
//!     per flow: tenant u32, finish u64, head_start u64, waiters u16
//!       per waiter (FIFO): worker u32, context u32, seq u64, cost u32, deadline_ms u64
//! ```
//!
//! A value that does not decode (another version, tag or length) is an empty queue with
//! nothing in flight, as for the limits: the next write replaces it.

use std::collections::VecDeque;

use super::{Owner, Ticket};
use crate::shared::codec::{self, Reader, Writer};
use crate::shared::keys::tag;

/// The virtual cost of one request at weight 1; a waiter's cost is `COST / weight`.
pub const COST: u64 = 1_000_000;
/// Most waiters one provider's queue holds; arrivals beyond it are refused as queue full.
pub const MAX_WAITING: usize = 4096;
/// Most flows kept without waiters (their `finish` still ahead of `V`), within a busy
/// period; beyond it the ones closest to `V` are forgotten (a tiny advantage to them).
pub const MAX_IDLE_FLOWS: usize = 1024;
/// How long after its own deadline a waiter is removed by anyone: its owner gives up at
/// the deadline (on its tick), so only a waiter whose worker VM died lives this long.
pub const GRACE_MS: u64 = 5_000;

const HEADER_LEN: usize = 2 + 4 + 8 + 2;
const CLASS_LEN: usize = 1 + 8 + 2;
const FLOW_LEN: usize = 4 + 8 + 8 + 2;
const WAITER_LEN: usize = 4 + 4 + 8 + 4 + 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Waiter {
    pub(crate) owner: Owner,
    pub(crate) seq: u64,
    pub(crate) cost: u32,
    pub(crate) deadline_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Flow {
    pub(crate) tenant: u32,
    /// Finish tag of the flow's last served waiter.
    pub(crate) finish: u64,
    /// Start tag of the first waiter (meaningless while there is none).
    pub(crate) head_start: u64,
    pub(crate) waiters: VecDeque<Waiter>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Class {
    pub(crate) priority: u8,
    /// The class's virtual time `V`; never decreases.
    pub(crate) vtime: u64,
    pub(crate) flows: Vec<Flow>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct State {
    pub(crate) in_flight: u32,
    /// Last sequence number handed to a waiter.
    pub(crate) seq: u64,
    /// Priority descending, one per priority ever seen (at most 256), kept so that `V`
    /// never goes back.
    pub(crate) classes: Vec<Class>,
}

/// A waiter's place in the projected service order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Place {
    pub(crate) class: usize,
    pub(crate) flow: usize,
    pub(crate) seq: u64,
    pub(crate) start: u64,
    pub(crate) owner: Owner,
}

/// A waiter's cost at `weight` (0 is taken as 1), at least 1 so tags always advance.
pub(crate) fn cost_of(weight: u32) -> u32 {
    let cost = COST / u64::from(weight.max(1));
    u32::try_from(cost.max(1)).unwrap_or(u32::MAX)
}

impl State {
    /// The stored value's state; empty if nothing (decodable) is stored.
    pub(crate) fn decode(stored: Option<&[u8]>) -> State {
        stored
            .and_then(|value| codec::decode(value, tag::QUEUE, read))
            .unwrap_or_default()
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let classes = capped(&self.classes);
        let mut out = Writer::new(tag::QUEUE, self.encoded_len())
            .u32(self.in_flight)
            .u64(self.seq)
            .u16(count(classes.len()));
        for class in classes {
            let flows = capped(&class.flows);
            out = out
                .u8(class.priority)
                .u64(class.vtime)
                .u16(count(flows.len()));
            for flow in flows {
                let waiters = flow.waiters.len().min(usize::from(u16::MAX));
                out = out
                    .u32(flow.tenant)
                    .u64(flow.finish)
                    .u64(flow.head_start)
                    .u16(count(waiters));
                for waiter in flow.waiters.iter().take(waiters) {
                    out = out
                        .u32(waiter.owner.worker)
                        .u32(waiter.owner.context)
                        .u64(waiter.seq)
                        .u32(waiter.cost)
                        .u64(waiter.deadline_ms);
                }
            }
        }
        out.finish()
    }

    fn encoded_len(&self) -> usize {
        let flows: usize = self.classes.iter().map(|c| c.flows.len()).sum();
        HEADER_LEN + self.classes.len() * CLASS_LEN + flows * FLOW_LEN + self.waiting() * WAITER_LEN
    }

    pub(crate) fn waiting(&self) -> usize {
        self.classes.iter().map(Class::waiting).sum()
    }

    /// Waiters of `tenant`, in any class.
    pub(crate) fn tenant_waiting(&self, tenant: u32) -> usize {
        self.classes
            .iter()
            .flat_map(|c| c.flows.iter())
            .filter(|f| f.tenant == tenant)
            .map(|f| f.waiters.len())
            .sum()
    }

    /// Every waiter with its projected start tag, in no particular order.
    fn places(&self) -> Vec<Place> {
        let mut all = Vec::with_capacity(self.waiting());
        for (ci, class) in self.classes.iter().enumerate() {
            for (fi, flow) in class.flows.iter().enumerate() {
                let mut start = flow.head_start;
                for waiter in &flow.waiters {
                    all.push(Place {
                        class: ci,
                        flow: fi,
                        seq: waiter.seq,
                        start,
                        owner: waiter.owner,
                    });
                    start = start.saturating_add(u64::from(waiter.cost));
                }
            }
        }
        all
    }

    /// The first `n` waiters in projected service order: class priority descending (the
    /// classes are stored that way), then projected start tag, then arrival.
    pub(crate) fn first(&self, n: usize) -> Vec<Place> {
        let mut all = self.places();
        let key = |p: &Place| (p.class, p.start, p.seq);
        if n == 0 {
            return Vec::new();
        }
        if n < all.len() {
            all.select_nth_unstable_by_key(n - 1, key);
            all.truncate(n);
        }
        all.sort_unstable_by_key(key);
        all
    }

    /// How many waiters are ahead of `owner` in the projected order, if it waits.
    pub(crate) fn position_of(&self, owner: Owner) -> Option<u32> {
        let all = self.places();
        let mine = all.iter().find(|p| p.owner == owner)?;
        let key = (mine.class, mine.start, mine.seq);
        let ahead = all
            .iter()
            .filter(|p| (p.class, p.start, p.seq) < key)
            .count();
        Some(u32::try_from(ahead).unwrap_or(u32::MAX))
    }

    pub(crate) fn contains(&self, owner: Owner) -> bool {
        self.classes
            .iter()
            .flat_map(|c| c.flows.iter())
            .flat_map(|f| f.waiters.iter())
            .any(|w| w.owner == owner)
    }

    /// Appends a waiter to its tenant's flow in its class (creating either).
    pub(crate) fn insert(&mut self, owner: Owner, ticket: &Ticket) {
        let ci = match self
            .classes
            .iter()
            .position(|c| c.priority == ticket.priority)
        {
            Some(ci) => ci,
            None => {
                let at = self
                    .classes
                    .iter()
                    .position(|c| c.priority < ticket.priority)
                    .unwrap_or(self.classes.len());
                self.classes.insert(
                    at,
                    Class {
                        priority: ticket.priority,
                        vtime: 0,
                        flows: Vec::new(),
                    },
                );
                at
            }
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let Some(class) = self.classes.get_mut(ci) else {
            return;
        };
        let fi = match class.flows.iter().position(|f| f.tenant == ticket.tenant) {
            Some(fi) => fi,
            None => {
                class.flows.push(Flow {
                    tenant: ticket.tenant,
                    finish: 0,
                    head_start: 0,
                    waiters: VecDeque::new(),
                });
                class.flows.len() - 1
            }
        };
        let Some(flow) = class.flows.get_mut(fi) else {
            return;
        };
        if flow.waiters.is_empty() {
            flow.head_start = flow.finish.max(class.vtime);
        }
        flow.waiters.push_back(Waiter {
            owner,
            seq,
            cost: cost_of(ticket.weight),
            deadline_ms: ticket.deadline_ms,
        });
    }

    /// Serves the first waiter of flow `flow` in class `class` if it is waiter `seq`: takes
    /// a slot, advances `V` and the flow's tags.
    fn serve(&mut self, class: usize, flow: usize, seq: u64) -> Option<Owner> {
        let class = self.classes.get_mut(class)?;
        let flow = class.flows.get_mut(flow)?;
        if flow.waiters.front()?.seq != seq {
            return None;
        }
        let waiter = flow.waiters.pop_front()?;
        let start = flow.head_start;
        class.vtime = class.vtime.max(start);
        flow.finish = start.saturating_add(u64::from(waiter.cost));
        flow.head_start = flow.finish.max(class.vtime);
        self.in_flight = self.in_flight.saturating_add(1);
        Some(waiter.owner)
    }

    /// Serves, while slots are free at `capacity`, the waiters among the first free ones in
    /// service order that `mine` accepts and that head their flow (a waiter of someone else
    /// ahead in the same flow must go first). Returns them in service order.
    pub(crate) fn claim(&mut self, capacity: u32, mine: impl Fn(Owner) -> bool) -> Vec<Owner> {
        let free = capacity.saturating_sub(self.in_flight);
        let free = usize::try_from(free).unwrap_or(usize::MAX);
        if free == 0 || self.waiting() == 0 {
            return Vec::new();
        }
        let window = self.first(free);
        window
            .into_iter()
            .filter(|place| mine(place.owner))
            .filter_map(|place| self.serve(place.class, place.flow, place.seq))
            .collect()
    }

    /// Removes `owner`'s waiter; false if it does not wait.
    pub(crate) fn remove(&mut self, owner: Owner) -> bool {
        for class in &mut self.classes {
            for flow in &mut class.flows {
                if let Some(index) = flow.waiters.iter().position(|w| w.owner == owner) {
                    flow.waiters.remove(index);
                    if index == 0 {
                        // The next waiter starts from the flow's last service, not from
                        // the removed one's tag: leaving costs the tenant nothing.
                        flow.head_start = flow.finish.max(class.vtime);
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Removes the waiters whose `deadline_ms + GRACE_MS` is before `now_ms`; returns how
    /// many.
    pub(crate) fn expire(&mut self, now_ms: u64) -> u32 {
        let mut removed = 0u32;
        for class in &mut self.classes {
            for flow in &mut class.flows {
                let head = flow.waiters.front().map(|w| w.seq);
                let before = flow.waiters.len();
                flow.waiters
                    .retain(|w| w.deadline_ms.saturating_add(GRACE_MS) >= now_ms);
                let gone = before - flow.waiters.len();
                removed = removed.saturating_add(u32::try_from(gone).unwrap_or(u32::MAX));
                if flow.waiters.front().map(|w| w.seq) != head {
                    flow.head_start = flow.finish.max(class.vtime);
                }
            }
        }
        removed
    }

    /// Forgets what no longer matters, so the value stays small: a class without waiters
    /// ends its busy period (`V` jumps to its largest finish, as in SFQ, and every flow is
    /// dropped); otherwise a flow without waiters is dropped once `V` reached its finish,
    /// and at most [`MAX_IDLE_FLOWS`] idle flows are kept.
    pub(crate) fn prune(&mut self) {
        for class in &mut self.classes {
            if class.waiting() == 0 {
                let last = class.flows.iter().map(|f| f.finish).max().unwrap_or(0);
                class.vtime = class.vtime.max(last);
                class.flows.clear();
            } else {
                let vtime = class.vtime;
                class
                    .flows
                    .retain(|f| !f.waiters.is_empty() || f.finish > vtime);
            }
        }
        let mut idle: Vec<(u64, u8, u32)> = self
            .classes
            .iter()
            .flat_map(|c| {
                c.flows
                    .iter()
                    .filter(|f| f.waiters.is_empty())
                    .map(|f| (f.finish, c.priority, f.tenant))
            })
            .collect();
        if idle.len() <= MAX_IDLE_FLOWS {
            return;
        }
        idle.sort_unstable();
        let excess = idle.len() - MAX_IDLE_FLOWS;
        let forget: Vec<(u8, u32)> = idle.iter().take(excess).map(|&(_, p, t)| (p, t)).collect();
        for class in &mut self.classes {
            let priority = class.priority;
            class
                .flows
                .retain(|f| !f.waiters.is_empty() || !forget.contains(&(priority, f.tenant)));
        }
    }
}

impl Class {
    fn waiting(&self) -> usize {
        self.flows.iter().map(|f| f.waiters.len()).sum()
    }
}

/// At most `u16::MAX` items, the most a count field can say.
fn capped<T>(items: &[T]) -> &[T] {
    items.get(..usize::from(u16::MAX)).unwrap_or(items)
}

fn count(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

/// The state's fields, after the header; `None` if they are cut short or out of order.
fn read(r: &mut Reader<'_>) -> Option<State> {
    let in_flight = r.u32()?;
    let seq = r.u64()?;
    let class_count = r.u16()?;
    let mut classes = Vec::with_capacity(r.room(class_count, CLASS_LEN));
    for _ in 0..class_count {
        let priority = r.u8()?;
        let vtime = r.u64()?;
        let flow_count = r.u16()?;
        let mut flows = Vec::with_capacity(r.room(flow_count, FLOW_LEN));
        for _ in 0..flow_count {
            let tenant = r.u32()?;
            let finish = r.u64()?;
            let head_start = r.u64()?;
            let waiter_count = r.u16()?;
            let mut waiters = VecDeque::with_capacity(r.room(waiter_count, WAITER_LEN));
            for _ in 0..waiter_count {
                waiters.push_back(Waiter {
                    owner: Owner {
                        worker: r.u32()?,
                        context: r.u32()?,
                    },
                    seq: r.u64()?,
                    cost: r.u32()?,
                    deadline_ms: r.u64()?,
                });
            }
            flows.push(Flow {
                tenant,
                finish,
                head_start,
                waiters,
            });
        }
        classes.push(Class {
            priority,
            vtime,
            flows,
        });
    }
    let ordered = classes.windows(2).all(|w| match w {
        [a, b] => a.priority > b.priority,
        _ => true,
    });
    ordered.then_some(State {
        in_flight,
        seq,
        classes,
    })
}
