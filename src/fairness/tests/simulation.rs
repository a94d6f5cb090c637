//! A deterministic discrete-event simulation of three Envoy workers sharing one provider
//! queue through one [`MemoryStore`]: each worker claims on its own 10 ms tick and after
//! each completion on it, and cancels its waiters when they reach their tier's max wait.

use super::assert_idle;
use super::*;
use crate::shared::testing::Rng;
use crate::shared::MemoryStore;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

const KEY: &str = "sluice:q:openai";
const T0_MS: u64 = 1_769_900_000_000;
const WORKERS: u32 = 3;
const CAPACITY: u32 = 4;
const SERVICE_US: u64 = 100_000;
const TICK_US: u64 = 10_000;
const ARRIVALS_UNTIL_US: u64 = 20_000_000;

struct Spec {
    name: &'static str,
    priority: u8,
    weight: u32,
    max_wait_ms: u64,
    max_queue_length: u32,
    /// Mean time between arrivals.
    period_us: u64,
}

const SPECS: [Spec; 5] = [
    Spec {
        name: "flood",
        priority: 1,
        weight: 1,
        max_wait_ms: 2_000,
        max_queue_length: 100,
        period_us: SERVICE_US / (10 * CAPACITY as u64), // 10 x C per service time
    },
    Spec {
        name: "gold",
        priority: 3,
        weight: 1,
        max_wait_ms: 10_000,
        max_queue_length: 100,
        period_us: SERVICE_US * 4 / CAPACITY as u64, // C/4 per service time
    },
    Spec {
        name: "silver",
        priority: 2,
        weight: 2,
        max_wait_ms: 5_000,
        max_queue_length: 100,
        period_us: SERVICE_US * 4 / CAPACITY as u64,
    },
    Spec {
        name: "light-1",
        priority: 1,
        weight: 1,
        max_wait_ms: 2_000,
        max_queue_length: 100,
        period_us: SERVICE_US * 8 / CAPACITY as u64, // C/8 per service time
    },
    Spec {
        name: "light-2",
        priority: 1,
        weight: 1,
        max_wait_ms: 2_000,
        max_queue_length: 100,
        period_us: SERVICE_US * 8 / CAPACITY as u64,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Lowest first at equal times: completions free slots before ticks look.
    Complete {
        worker: u32,
        request: usize,
    },
    Tick {
        worker: u32,
    },
    Arrive {
        tenant: usize,
    },
}

struct Request {
    tenant: usize,
    arrived_us: u64,
    deadline_ms: u64,
}

#[derive(Default, Debug)]
struct Outcome {
    arrived: u32,
    served: u32,
    timed_out: u32,
    queue_full: u32,
    waits_ms: Vec<u64>,
}

impl Outcome {
    fn percentile(&self, p: usize) -> u64 {
        let mut w = self.waits_ms.clone();
        w.sort_unstable();
        match w.len() {
            0 => 0,
            n => w[(n * p / 100).min(n - 1)],
        }
    }
}

struct Sim<'s> {
    queue: FairQueue<'s, MemoryStore>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    event_seq: u64,
    requests: Vec<Request>,
    /// Per worker: its waiting requests by context.
    waiting: Vec<BTreeMap<u32, usize>>,
    worker_ids: Vec<u32>,
    running: u32,
    busy_us: u64,
    outcomes: Vec<Outcome>,
    rng: Rng,
    arrivals: u32,
}

impl<'s> Sim<'s> {
    fn schedule(&mut self, at_us: u64, event: Event) {
        self.event_seq += 1;
        self.events.push(Reverse((at_us, self.event_seq, event)));
    }

    fn start(&mut self, now_us: u64, worker: u32, request: usize) {
        self.running += 1;
        assert!(self.running <= CAPACITY, "{} running", self.running);
        let r = &self.requests[request];
        self.outcomes[r.tenant].served += 1;
        self.outcomes[r.tenant]
            .waits_ms
            .push((now_us - r.arrived_us) / 1000);
        if now_us < ARRIVALS_UNTIL_US {
            self.busy_us += SERVICE_US.min(ARRIVALS_UNTIL_US - now_us);
        }
        self.schedule(now_us + SERVICE_US, Event::Complete { worker, request });
    }

    fn claim(&mut self, now_us: u64, worker: u32) {
        let id = self.worker_ids[worker as usize];
        let claimed = self
            .queue
            .claim_for_worker(id, T0_MS + now_us / 1000)
            .unwrap();
        for o in claimed {
            assert_eq!(o.worker, id);
            let request = self.waiting[worker as usize].remove(&o.context).unwrap();
            self.start(now_us, worker, request);
        }
    }

    fn handle(&mut self, now_us: u64, event: Event) {
        let now_ms = T0_MS + now_us / 1000;
        match event {
            Event::Arrive { tenant } => {
                let spec = &SPECS[tenant];
                let worker = self.arrivals % WORKERS;
                self.arrivals += 1;
                let request = self.requests.len();
                let context = request as u32;
                let deadline_ms = now_ms + spec.max_wait_ms;
                self.requests.push(Request {
                    tenant,
                    arrived_us: now_us,
                    deadline_ms,
                });
                self.outcomes[tenant].arrived += 1;
                let ticket = Ticket {
                    tenant: tenant_hash(spec.name),
                    priority: spec.priority,
                    weight: spec.weight,
                    max_queue_length: spec.max_queue_length,
                    deadline_ms,
                };
                let owner = Owner {
                    worker: self.worker_ids[worker as usize],
                    context,
                };
                match self.queue.arrive(owner, ticket, now_ms) {
                    Arrival::Admitted => self.start(now_us, worker, request),
                    Arrival::Queued { .. } => {
                        self.waiting[worker as usize].insert(context, request);
                    }
                    Arrival::QueueFull => self.outcomes[tenant].queue_full += 1,
                    other => panic!("{other:?}"),
                }
                // Jittered arrivals: uniform in [0.5, 1.5] x the period.
                let next = now_us + spec.period_us / 2 + self.rng.below(spec.period_us + 1);
                if next < ARRIVALS_UNTIL_US {
                    self.schedule(next, Event::Arrive { tenant });
                }
            }
            Event::Tick { worker } => {
                // The owner gives up on its waiters at their deadline.
                let expired: Vec<(u32, usize)> = self.waiting[worker as usize]
                    .iter()
                    .filter(|(_, &r)| self.requests[r].deadline_ms <= now_ms)
                    .map(|(&c, &r)| (c, r))
                    .collect();
                let id = self.worker_ids[worker as usize];
                for (context, request) in expired {
                    let owner = Owner {
                        worker: id,
                        context,
                    };
                    assert!(self.queue.cancel(owner).unwrap(), "lost waiter");
                    self.waiting[worker as usize].remove(&context);
                    self.outcomes[self.requests[request].tenant].timed_out += 1;
                }
                if worker == 0 {
                    assert_eq!(self.queue.expire_stale(now_ms).unwrap(), 0);
                }
                self.claim(now_us, worker);
                let idle = self.waiting.iter().all(BTreeMap::is_empty) && self.running == 0;
                if now_us < ARRIVALS_UNTIL_US || !idle {
                    self.schedule(now_us + TICK_US, Event::Tick { worker });
                }
            }
            Event::Complete { worker, .. } => {
                self.running -= 1;
                self.queue.release().unwrap();
                self.claim(now_us, worker);
            }
        }
    }
}

#[test]
fn tiers_and_fair_shares_hold_under_a_flood_across_workers() {
    let store = MemoryStore::new();
    let worker_ids: Vec<u32> = (0..WORKERS)
        .map(|_| allocate_worker_id(&store).unwrap())
        .collect();
    let mut sim = Sim {
        queue: FairQueue::new(&store, KEY, CAPACITY),
        events: BinaryHeap::new(),
        event_seq: 0,
        requests: Vec::new(),
        waiting: vec![BTreeMap::new(); WORKERS as usize],
        worker_ids,
        running: 0,
        busy_us: 0,
        outcomes: SPECS.iter().map(|_| Outcome::default()).collect(),
        rng: Rng(42),
        arrivals: 0,
    };
    for (tenant, spec) in SPECS.iter().enumerate() {
        let first = sim.rng.below(spec.period_us);
        sim.schedule(first, Event::Arrive { tenant });
    }
    for worker in 0..WORKERS {
        // Workers' ticks are not aligned.
        sim.schedule(u64::from(worker) * 3_333, Event::Tick { worker });
    }
    while let Some(Reverse((now_us, _, event))) = sim.events.pop() {
        sim.handle(now_us, event);
        let stats = sim.queue.stats().unwrap();
        assert_eq!(stats.in_flight, sim.running);
        let waiting: usize = sim.waiting.iter().map(BTreeMap::len).sum();
        assert_eq!(stats.waiting as usize, waiting);
    }

    let [flood, gold, silver, light1, light2] = &sim.outcomes[..] else {
        unreachable!()
    };
    for (spec, o) in SPECS.iter().zip(&sim.outcomes) {
        println!(
            "{:8} arrived {:5} served {:4} timed out {:4} queue full {:5} wait p50 {:4} ms p99 {:4} ms max {:4} ms",
            spec.name,
            o.arrived,
            o.served,
            o.timed_out,
            o.queue_full,
            o.percentile(50),
            o.percentile(99),
            o.waits_ms.iter().max().copied().unwrap_or(0),
        );
    }
    let seconds = ARRIVALS_UNTIL_US / 1_000_000;
    let utilization = sim.busy_us as f64 / (CAPACITY as u64 * ARRIVALS_UNTIL_US) as f64;
    println!("utilization {utilization:.3} over {seconds} s");

    // Everything is given back.
    assert_idle(&sim.queue.stats().unwrap());
    // Work-conserving while a flood waits: a slot idles only from a release until the
    // worker owning the head claims it (at most one tick, about a third of a tick on
    // average with three workers), i.e. about 3% of 100 ms services.
    assert!(utilization > 0.95, "{utilization}");
    // Gold and silver never time out and wait little.
    for o in [gold, silver] {
        assert_eq!((o.timed_out, o.queue_full), (0, 0));
        assert_eq!(o.served, o.arrived);
    }
    let bound_ms = (SERVICE_US + TICK_US) / 1000;
    assert!(
        gold.percentile(99) <= bound_ms,
        "gold p99 {}",
        gold.percentile(99)
    );
    assert!(
        silver.percentile(99) <= 2 * bound_ms,
        "silver p99 {}",
        silver.percentile(99)
    );
    // Light bronze tenants get at least their fair share of what gold and silver leave.
    let slots = u64::from(CAPACITY) * ARRIVALS_UNTIL_US / SERVICE_US;
    let bronze_left = slots - u64::from(gold.served + silver.served);
    let fair_share = bronze_left / 3;
    for o in [light1, light2] {
        let deserved = u64::from(o.arrived).min(fair_share);
        assert!(
            u64::from(o.served) * 100 >= deserved * 98,
            "light served {} of {} (fair share {fair_share})",
            o.served,
            o.arrived
        );
        assert_eq!(o.timed_out, 0);
    }
    // The flooder gets the rest, and most of its requests are refused or time out.
    let rest = bronze_left - u64::from(light1.served + light2.served);
    assert!(
        u64::from(flood.served) * 100 >= rest * 90,
        "flood {}",
        flood.served
    );
    assert!(flood.timed_out > flood.served, "{flood:?}");
    assert!(flood.queue_full > flood.arrived / 2);
}
