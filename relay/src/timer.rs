//! Delayed wakes. The dynamic-module ABI can post an event to a filter's worker from any
//! thread (a scheduler) but has no timer, so one thread per process sleeps until the
//! earliest wake and posts it. A filter's scheduler lives as long as the filter or its
//! last pending wake, whichever is later: Envoy ignores a post to a destroyed filter, but
//! the scheduler itself must not be freed while a wake may still use it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::ffi::c_void;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

extern "C" {
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(
        scheduler: *mut c_void,
        event: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
}

/// A filter's scheduler, freed when the last holder lets go.
pub struct Scheduler(*mut c_void);

// Envoy's schedulers are made to be committed from any thread.
unsafe impl Send for Scheduler {}
unsafe impl Sync for Scheduler {}

impl Scheduler {
    /// `filter`: the filter's Envoy pointer, valid during the current hook.
    pub fn new(filter: *mut c_void) -> Option<Arc<Scheduler>> {
        let raw = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter) };
        (!raw.is_null()).then(|| Arc::new(Scheduler(raw)))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        unsafe { envoy_dynamic_module_callback_http_filter_scheduler_delete(self.0) }
    }
}

/// The event id a wake posts; the filter checks every deadline on any wake.
pub const WAKE_EVENT: u64 = 1;

struct Wake {
    at: Instant,
    seq: u64,
    scheduler: Arc<Scheduler>,
}

impl PartialEq for Wake {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Wake {}
impl PartialOrd for Wake {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Wake {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Queue {
    wakes: BinaryHeap<Reverse<Wake>>,
    seq: u64,
    running: bool,
}

#[derive(Default)]
struct Timer {
    queue: Mutex<Queue>,
    changed: Condvar,
}

fn timer() -> &'static Timer {
    static TIMER: OnceLock<Timer> = OnceLock::new();
    TIMER.get_or_init(Timer::default)
}

/// Milliseconds on the process's monotonic clock (the exchange's time).
pub fn now_ms() -> u64 {
    let since = epoch().elapsed();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Posts [`WAKE_EVENT`] to `scheduler` at `at_ms` (of [`now_ms`]'s clock).
pub fn wake_at(scheduler: &Arc<Scheduler>, at_ms: u64) {
    let at = epoch() + Duration::from_millis(at_ms);
    let t = timer();
    let Ok(mut queue) = t.queue.lock() else {
        return;
    };
    queue.seq += 1;
    let seq = queue.seq;
    queue.wakes.push(Reverse(Wake {
        at,
        seq,
        scheduler: scheduler.clone(),
    }));
    if !queue.running {
        queue.running = true;
        let spawned = std::thread::Builder::new()
            .name("sluice-relay-timer".into())
            .spawn(run);
        if spawned.is_err() {
            queue.running = false;
        }
    }
    drop(queue);
    t.changed.notify_one();
}

fn run() {
    let t = timer();
    let Ok(mut queue) = t.queue.lock() else {
        return;
    };
    loop {
        let now = Instant::now();
        let due = queue.wakes.peek().map(|Reverse(w)| w.at);
        match due {
            Some(at) if at <= now => {
                if let Some(Reverse(wake)) = queue.wakes.pop() {
                    unsafe {
                        envoy_dynamic_module_callback_http_filter_scheduler_commit(
                            wake.scheduler.0,
                            WAKE_EVENT,
                        );
                    }
                }
            }
            Some(at) => match t.changed.wait_timeout(queue, at - now) {
                Ok((q, _)) => queue = q,
                Err(_) => return,
            },
            None => match t.changed.wait(queue) {
                Ok(q) => queue = q,
                Err(_) => return,
            },
        }
    }
}
