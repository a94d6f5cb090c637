//! The only code that calls Envoy: it reads what the host offers, hands it to the pure
//! core, and carries out what the core returns. It translates; it does not decide.
//!
//! The SDK's trait helpers `unwrap` host results (and string accessors trap on non-UTF-8
//! header values), so every host call here goes through `hostcalls` and handles errors.

mod metrics;
mod plans;
mod store;
mod stream;
mod upstream;

use crate::cache::waiters::CacheWaiters;
use crate::cache::CacheStore;
use crate::config;
use crate::errors::LocalReply;
use crate::global::wire::{AdmitRequest, ADMIT_BATCH_PATH};
use crate::global::{Courier, Decision, Outgoing, Report};
use crate::lifecycle::queue::{QueueAction, WorkerQueue, TICK_MS};
use crate::lifecycle::{BodyEnv, Callout, Exchange, FillWait, Next, Step};
use crate::metrics::{GlobalEvent, MetricKey, Metrics};
use crate::policy::{GlobalLimits, Policy};
use metrics::{HostMetrics, NoMetrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel, MapType};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};
use store::SharedData;
use stream::SluiceHttp;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(SluiceRoot {
            context_id,
            configured: None,
            upstream: false,
        })
    });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// A header's value as text (absent, unreadable or not UTF-8: `None`).
fn header_text(map: MapType, name: &str) -> Option<String> {
    hostcalls::get_map_value_bytes(map, name)
        .ok()
        .flatten()
        .and_then(|v| String::from_utf8(v).ok())
}

/// Host wall clock in milliseconds (0 if unavailable; deltas are clamped by callers).
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Sends a local reply on the current stream; the caller then pauses it for good.
fn send_reply(reply: &LocalReply) {
    let headers: Vec<(&str, &str)> = reply
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let sent = hostcalls::send_http_response(
        u32::from(reply.status),
        headers,
        Some(reply.body.as_bytes()),
    );
    if let Err(s) = sent {
        log(LogLevel::Error, &format!("sluice: send local reply: {s:?}"));
    }
}

/// What one configuration gives every stream of this worker.
#[derive(Clone)]
struct Configured {
    policy: Rc<Policy>,
    /// Metric ids are per VM and per policy (labels are policy indices).
    metrics: Rc<RefCell<HostMetrics>>,
    /// Requests this worker holds in providers' fair queues (when any provider has a cap).
    queue: Option<Rc<RefCell<WorkerQueue>>>,
    /// Envoy's wasm log level was debug or lower at configure time.
    debug: bool,
    /// Settlements and leases for the quota service (when any limit is global).
    courier: Option<Rc<RefCell<Courier>>>,
    /// Random per VM: names this VM's admissions at the quota service.
    nonce: u64,
    /// Requests whose next step the root context hands them, by stream: the quota
    /// service's admission decision, an identical request's cached response, or the answer
    /// to a call the root made for them.
    parked: Rc<RefCell<HashMap<u32, Rc<RefCell<Exchange>>>>>,
    /// Requests waiting for an identical request's response (local cache store).
    cache_waiters: Option<Rc<RefCell<CacheWaiters>>>,
    /// Calls the root context made for a parked stream: token to stream.
    relayed: Rc<RefCell<HashMap<u32, u32>>>,
    /// This worker's shared queue that wakes its root context to send admissions now
    /// (rather than at the next tick), and whether a wake is already on its way.
    wake_queue: Option<u32>,
    wake_pending: Rc<Cell<bool>>,
    /// This worker's fallback plans, as this configuration registers them.
    plans: plans::HostPlans,
}

impl Configured {
    /// Stream `context` waits for the decision on `request`; the root context is woken
    /// to send it. False if there is no quota service to ask.
    fn wait_for_admission(
        &self,
        context: u32,
        exchange: &Rc<RefCell<Exchange>>,
        request: AdmitRequest,
    ) -> bool {
        let Some(Ok(mut courier)) = self.courier.as_ref().map(|c| c.try_borrow_mut()) else {
            return false;
        };
        if !self.park(context, exchange) {
            return false;
        }
        courier.admit(context, request);
        drop(courier);
        self.wake_root();
        true
    }

    /// Wakes this worker's root context to send what the courier has now, rather than at
    /// the next tick.
    fn wake_root(&self) {
        if !self.wake_pending.get() {
            if let Some(queue) = self.wake_queue {
                // Failing that, the next tick sends it.
                let woken = hostcalls::enqueue_shared_queue(queue, Some(b"!"));
                self.wake_pending.set(woken.is_ok());
            }
        }
    }

    /// Stream `context` waits for the root context to hand it its next step.
    fn park(&self, context: u32, exchange: &Rc<RefCell<Exchange>>) -> bool {
        match self.parked.try_borrow_mut() {
            Ok(mut parked) => {
                parked.insert(context, exchange.clone());
                true
            }
            Err(_) => false,
        }
    }

    /// Stream `context` waits for an identical request's response to reach the cache.
    fn wait_for_fill(
        &self,
        context: u32,
        exchange: &Rc<RefCell<Exchange>>,
        wait: FillWait,
    ) -> bool {
        let Some(Ok(mut waiters)) = self.cache_waiters.as_ref().map(|w| w.try_borrow_mut()) else {
            return false;
        };
        if !self.park(context, exchange) {
            return false;
        }
        waiters.add(context, wait.key, wait.fill_ms, wait.deadline_ms);
        true
    }

    /// Hands a cache write (store, release) to the courier, which sends it from the root.
    fn cache_write(&self, call: Callout) {
        match self.courier.as_ref().map(|c| c.try_borrow_mut()) {
            Some(Ok(mut courier)) => {
                courier.cache_write(call.path, call.body);
                // Sent now: another replica may be waiting for this entry.
                drop(courier);
                self.wake_root();
            }
            _ => log(
                LogLevel::Warn,
                &format!("sluice: cache write {} dropped: no courier", call.path),
            ),
        }
    }

    /// The environment of a stream's callback run from the root context.
    fn env_for(&self, context: u32) -> BodyEnv<'_> {
        BodyEnv {
            store: &SharedData,
            now_ms: now_ms(),
            worker: self.worker(),
            context,
            nonce: self.nonce,
            plans: Some(&self.plans),
        }
    }

    /// This worker's id in providers' queues (0 when no provider has a capacity).
    fn worker(&self) -> u32 {
        self.queue
            .as_ref()
            .and_then(|q| q.try_borrow().ok().map(|q| q.worker()))
            .unwrap_or(0)
    }
}

struct SluiceRoot {
    context_id: u32,
    configured: Option<Configured>,
    /// The plugin is Sluice's upstream filter (root id [`UPSTREAM_ROOT_ID`]): its streams
    /// are attempts, rewritten by the plans the downstream filter of this VM registered.
    upstream: bool,
}

/// The root id of Sluice in a provider cluster's upstream filter chain.
const UPSTREAM_ROOT_ID: &str = "sluice_upstream";

impl SluiceRoot {
    /// Sends admission calls while the courier has admissions waiting and room for a call.
    fn send_admissions(&self) {
        let Some(c) = &self.configured else { return };
        let (Some(courier), Some(global)) = (&c.courier, &c.policy.global) else {
            return;
        };
        let mut unsent = Vec::new();
        loop {
            let Ok(mut courier) = courier.try_borrow_mut() else {
                break;
            };
            let Some((body, contexts)) = courier.admission_call() else {
                break;
            };
            let _ = hostcalls::set_effective_context(self.context_id);
            let call = Callout {
                path: ADMIT_BATCH_PATH,
                body,
                timeout_ms: global.timeout_ms,
            };
            match call_quota_service(global, &call) {
                Ok(token) => courier.admission_sent(token, contexts, now_ms()),
                Err(s) => unsent.extend(Courier::admission_unsent(contexts, &format!("{s:?}"))),
            }
        }
        self.deliver(unsent);
    }

    /// Hands each waiting stream its admission decision and carries out what follows
    /// (resume, answer, or wait for a provider), each on its own stream. No borrow is held
    /// while a stream is resumed: resuming can run that stream's callbacks.
    fn deliver(&self, decisions: Vec<Decision>) {
        let Some(c) = &self.configured else { return };
        if decisions.is_empty() {
            return;
        }
        for (context, answer) in decisions {
            self.unpark(context, |ex, env| {
                ex.on_admission_answer(&c.policy, env, answer)
            });
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    /// Runs `next` on parked stream `context` (on its own stream) and carries out the step
    /// it returns. No borrow is held while a stream is resumed: resuming can run that
    /// stream's callbacks. Nothing happens if the stream is gone.
    fn unpark(&self, context: u32, next: impl FnOnce(&mut Exchange, &BodyEnv) -> Step) {
        let Some(c) = &self.configured else { return };
        let exchange = match c.parked.try_borrow_mut() {
            Ok(mut parked) => parked.remove(&context),
            Err(_) => None,
        };
        let Some(exchange) = exchange else { return };
        if hostcalls::set_effective_context(context).is_err() {
            return;
        }
        let env = c.env_for(context);
        let Ok(mut ex) = exchange.try_borrow_mut() else {
            return;
        };
        let step = next(&mut ex, &env);
        let leases = ex.leases();
        drop(ex);
        if let Some(Ok(mut courier)) = c.courier.as_ref().map(|c| c.try_borrow_mut()) {
            courier.hold(context, leases);
        }
        let carried = match step.next {
            Next::Continue => hostcalls::resume_http_request().map_err(|s| format!("{s:?}")),
            Next::Reply(reply) => {
                send_reply(&reply);
                Ok(())
            }
            Next::Wait(waiter) => match c.queue.as_ref().map(|q| q.try_borrow_mut()) {
                Some(Ok(mut q)) => {
                    q.add(waiter);
                    Ok(())
                }
                _ => Err("no queue for the waiting request".into()),
            },
            Next::Pause => Ok(()),
            Next::AwaitFill(wait) => match c.wait_for_fill(context, &exchange, wait) {
                true => Ok(()),
                false => Err("cannot wait for the cache".into()),
            },
            Next::Call(callout) => self.relay(context, &exchange, callout),
            Next::Admit(_) => Err("a second admission".into()),
        };
        if let Err(why) = carried {
            log(
                LogLevel::Warn,
                &format!("sluice: carrying on stream {context}: {why}"),
            );
            // Never leave it hanging: answer 500 (on its own stream) and give back what
            // it holds.
            let _ = hostcalls::set_effective_context(context);
            let failed = exchange
                .try_borrow_mut()
                .map(|mut ex| ex.fail(&c.policy, &SharedData, now_ms()));
            if let Ok(failed) = failed {
                if let Some(settlement) = failed.settlement {
                    if let Some(Ok(mut courier)) = c.courier.as_ref().map(|c| c.try_borrow_mut()) {
                        courier.settle(settlement);
                    }
                }
                if let Some(call) = failed.cache_call {
                    c.cache_write(call);
                }
                send_reply(&failed.reply);
            }
        }
    }

    /// Makes a parked stream's call from the root context (a call made here belongs to
    /// the root); its answer comes back to the stream through [`Self::relayed_answer`].
    fn relay(
        &self,
        context: u32,
        exchange: &Rc<RefCell<Exchange>>,
        callout: Callout,
    ) -> Result<(), String> {
        let Some(c) = &self.configured else {
            return Err("no configuration".into());
        };
        let global = c.policy.global.as_ref().ok_or("no `global` section")?;
        let _ = hostcalls::set_effective_context(self.context_id);
        let token = call_quota_service(global, &callout)
            .map_err(|s| format!("cannot call cluster `{}`: {s:?}", global.cluster))?;
        let _ = hostcalls::set_effective_context(context);
        c.relayed
            .try_borrow_mut()
            .map_err(|_| "relayed calls busy".to_string())?
            .insert(token, context);
        if c.park(context, exchange) {
            Ok(())
        } else {
            Err("cannot park the stream".into())
        }
    }

    /// The answer to a call made for a parked stream, if `token` is one.
    fn relayed_answer(&self, token: u32, answer: &Result<&[u8], String>) -> bool {
        let Some(c) = &self.configured else {
            return false;
        };
        let context = match c.relayed.try_borrow_mut() {
            Ok(mut relayed) => relayed.remove(&token),
            Err(_) => None,
        };
        let Some(context) = context else { return false };
        let answer = answer.clone();
        self.unpark(context, |ex, env| ex.on_call_answer(&c.policy, env, answer));
        let _ = hostcalls::set_effective_context(self.context_id);
        true
    }

    /// Hands this worker's cache waiters what the cache holds now.
    fn poll_cache_waiters(&self) {
        let Some(c) = &self.configured else { return };
        let (Some(waiters), CacheStore::Local { slots }) = (&c.cache_waiters, c.policy.cache_store)
        else {
            return;
        };
        let now = now_ms();
        let found = match waiters.try_borrow_mut() {
            Ok(mut waiters) if !waiters.is_empty() => waiters.poll(now, |key, fill_ms| {
                crate::cache::local::lookup(&SharedData, slots, key, now, fill_ms)
            }),
            _ => return,
        };
        for (context, lookup) in found {
            self.unpark(context, |ex, env| ex.on_cache_poll(&c.policy, env, lookup));
        }
        let _ = hostcalls::set_effective_context(self.context_id);
    }

    /// Sends what the courier has due, as calls of this root context (never of a
    /// stream: those calls would be cancelled when the stream ends).
    fn send_courier_calls(&self) {
        let Some(c) = &self.configured else { return };
        let (Some(courier), Some(global)) = (&c.courier, &c.policy.global) else {
            return;
        };
        let Ok(mut courier) = courier.try_borrow_mut() else {
            return;
        };
        let now = now_ms();
        let due = courier.due(now);
        if due.is_empty() {
            return;
        }
        let _ = hostcalls::set_effective_context(self.context_id);
        let mut reports = Vec::new();
        for Outgoing { path, body, errand } in due {
            let call = Callout {
                path,
                body,
                timeout_ms: global.timeout_ms,
            };
            match call_quota_service(global, &call) {
                Ok(token) => courier.sent(token, errand),
                Err(s) => reports.extend(courier.undelivered(errand, &format!("{s:?}"), now)),
            }
        }
        drop(courier);
        self.report(reports);
    }

    /// Counts and logs what the courier reports.
    fn report(&self, reports: Vec<Report>) {
        let Some(c) = &self.configured else { return };
        let count = |event| {
            if let Ok(mut m) = c.metrics.try_borrow_mut() {
                m.add(MetricKey::Global(event), 1);
            }
        };
        for report in reports {
            match report {
                Report::Retrying { id, why } => {
                    count(GlobalEvent::SettlementRetried);
                    log(
                        LogLevel::Warn,
                        &format!("sluice: settlement {id} failed ({why}); retrying"),
                    );
                }
                Report::Lost { id, why, record } => {
                    count(GlobalEvent::SettlementLost);
                    // The line billing reconciles from: the settlement the service never got.
                    log(
                        LogLevel::Error,
                        &format!("sluice: settlement {id} lost ({why}): {record}"),
                    );
                }
                Report::LeasesLost(n) => {
                    for _ in 0..n {
                        count(GlobalEvent::LeaseLost);
                    }
                    log(
                        LogLevel::Warn,
                        &format!("sluice: {n} global concurrency leases had expired"),
                    );
                }
                Report::RenewFailed(why) => {
                    log(
                        LogLevel::Warn,
                        &format!("sluice: lease renewal failed ({why})"),
                    );
                }
                Report::CacheWriteFailed(why) => {
                    log(
                        LogLevel::Warn,
                        &format!("sluice: global cache write failed ({why})"),
                    );
                }
            }
        }
    }
}

impl Context for SluiceRoot {
    fn on_http_call_response(
        &mut self,
        token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Some(courier) = self.configured.as_ref().and_then(|c| c.courier.clone()) else {
            return;
        };
        let answer = call_answer(num_headers, body_size);
        let answer = answer.as_deref().map_err(Clone::clone);
        if self.relayed_answer(token_id, &answer) {
            return;
        }
        let decisions = match courier.try_borrow_mut() {
            Ok(mut courier) => courier.admission_answered(token_id, answer.clone()),
            Err(_) => None,
        };
        if let Some(decisions) = decisions {
            self.deliver(decisions);
            // Room for the next call: send what waited for it.
            self.send_admissions();
            return;
        }
        let reports = match courier.try_borrow_mut() {
            Ok(mut courier) => courier.answered(token_id, answer, now_ms()),
            Err(_) => Vec::new(),
        };
        self.report(reports);
    }
}

/// Sends one call to the quota service from the current context; its answer comes to
/// that context's `on_http_call_response`.
fn call_quota_service(
    global: &GlobalLimits,
    call: &Callout,
) -> Result<u32, proxy_wasm::types::Status> {
    let headers = vec![
        (":method", "POST"),
        (":path", call.path),
        (":authority", global.authority.as_str()),
        ("content-type", "application/json"),
    ];
    let timeout = Duration::from_millis(call.timeout_ms);
    hostcalls::dispatch_http_call(&global.cluster, headers, Some(&call.body), vec![], timeout)
}

/// The answer to a call to the quota service: its body for a 200, else why not.
fn call_answer(num_headers: usize, body_size: usize) -> Result<Vec<u8>, String> {
    if num_headers == 0 {
        return Err("no answer (timeout, or the service is unreachable)".into());
    }
    let status = hostcalls::get_map_value(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .unwrap_or_default();
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()
        .unwrap_or_default();
    if status != "200" {
        let text = String::from_utf8_lossy(&body);
        let text: String = text.chars().take(200).collect();
        return Err(format!("status {status}: {text}"));
    }
    Ok(body)
}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let root_id = hostcalls::get_property(vec!["plugin_root_id"])
            .ok()
            .flatten()
            .unwrap_or_default();
        if root_id == UPSTREAM_ROOT_ID.as_bytes() {
            // Its plans, and the policy of each, come from the downstream filter.
            self.upstream = true;
            return true;
        }
        match configure(plugin_configuration_size) {
            Ok(configured) => {
                self.configured = Some(configured);
                true
            }
            Err(message) => {
                // Refusing the configuration makes Envoy reject the listener: fail closed.
                log(LogLevel::Critical, &message);
                false
            }
        }
    }

    fn on_queue_ready(&mut self, _queue_id: u32) {
        if let Some(c) = &self.configured {
            c.wake_pending.set(false);
            if let Some(queue) = c.wake_queue {
                while let Ok(Some(_)) = hostcalls::dequeue_shared_queue(queue) {}
            }
        }
        self.send_admissions();
        self.send_courier_calls();
    }

    fn on_tick(&mut self) {
        let overdue = match self.configured.as_ref().and_then(|c| c.courier.as_ref()) {
            Some(courier) => match courier.try_borrow_mut() {
                Ok(mut courier) => courier.overdue_admissions(now_ms()),
                Err(_) => Vec::new(),
            },
            None => Vec::new(),
        };
        self.deliver(overdue);
        self.poll_cache_waiters();
        self.send_admissions();
        self.send_courier_calls();
        let Some(Configured {
            queue: Some(queue),
            metrics,
            ..
        }) = &self.configured
        else {
            return;
        };
        let Ok(mut queue) = queue.try_borrow_mut() else {
            return;
        };
        let actions = match metrics.try_borrow_mut() {
            Ok(mut m) => queue.tick(&SharedData, now_ms(), &mut *m),
            Err(_) => queue.tick(&SharedData, now_ms(), &mut NoMetrics),
        };
        drop(queue);
        // No borrow is held now: resuming or answering a stream can run its callbacks.
        run_queue_actions(actions);
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if self.upstream {
            return Some(Box::new(upstream::UpstreamAttempt::new()));
        }
        Some(Box::new(SluiceHttp::new(
            context_id,
            self.configured.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// Reads and compiles the plugin configuration, and sets up this worker's queue.
fn configure(size: usize) -> Result<Configured, String> {
    let raw = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => {
            return Err("invalid sluice configuration: the plugin `configuration` is empty".into())
        }
        Err(s) => return Err(format!("sluice: cannot read plugin configuration: {s:?}")),
    };
    let started = hostcalls::get_current_time().ok();
    let policy =
        config::compile(&raw, &|name| std::env::var(name).ok()).map_err(|e| e.to_string())?;
    // How long a configuration takes to compile, per VM: it grows with the tenants.
    let took_ms = started
        .and_then(|t| hostcalls::get_current_time().ok()?.duration_since(t).ok())
        .map_or(0, |d| d.as_millis());
    log(
        LogLevel::Info,
        &format!("{} in {took_ms} ms", policy.summary()),
    );
    let policy = Rc::new(policy);
    #[cfg(feature = "test-trap")]
    log(
        LogLevel::Critical,
        "sluice: built with the test-trap feature, which traps on request: tests only",
    );
    #[cfg(feature = "vm-bench")]
    vm_bench(&policy);
    let queue = WorkerQueue::for_policy(&policy, &SharedData)
        .map_err(|e| format!("sluice: cannot allocate a worker id: {e:?}"))?;
    let courier = policy.global.as_ref().map(Courier::new);
    let nonce = vm_nonce();
    // One queue per worker VM (the name is this VM's): it wakes this root context.
    let wake_queue = match courier {
        Some(_) => Some(
            hostcalls::register_shared_queue(&format!("sluice-admissions-{nonce:016x}"))
                .map_err(|s| format!("sluice: cannot register the admissions queue: {s:?}"))?,
        ),
        None => None,
    };
    let cache_on = policy.tenants.iter().any(|t| t.cache.is_some());
    let cache_waiters = (cache_on && matches!(policy.cache_store, CacheStore::Local { .. }))
        .then(|| Rc::new(RefCell::new(CacheWaiters::default())));
    if queue.is_some() || courier.is_some() || cache_waiters.is_some() {
        hostcalls::set_tick_period(Duration::from_millis(TICK_MS))
            .map_err(|s| format!("sluice: cannot set the tick: {s:?}"))?;
    }
    let debug = matches!(
        hostcalls::get_log_level(),
        Ok(LogLevel::Debug | LogLevel::Trace)
    );
    let mut metrics = HostMetrics::new(policy.clone());
    // Exists at 0 from the start, so that contention between workers can be read as a rate.
    metrics.add(MetricKey::CasRetries, 0);
    if courier.is_some() {
        // Their series exist from the start: an alert sees the first event as an increase.
        for event in GlobalEvent::ALL {
            metrics.add(MetricKey::Global(event), 0);
        }
    }
    Ok(Configured {
        metrics: Rc::new(RefCell::new(metrics)),
        plans: plans::HostPlans {
            policy: policy.clone(),
        },
        policy,
        queue: queue.map(|q| Rc::new(RefCell::new(q))),
        debug,
        courier: courier.map(|c| Rc::new(RefCell::new(c))),
        nonce,
        parked: Rc::new(RefCell::new(HashMap::new())),
        cache_waiters,
        relayed: Rc::new(RefCell::new(HashMap::new())),
        wake_queue,
        wake_pending: Rc::new(Cell::new(false)),
    })
}

/// A random number per VM (WASI's `random_get`, through the standard library's hasher
/// keys), mixed with the clock.
fn vm_nonce() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

/// Diagnostics builds only: times the pure request path in this VM (make bench-vm).
#[cfg(feature = "vm-bench")]
fn vm_bench(policy: &Policy) {
    let clock_ns = || {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    };
    for (name, ns) in crate::vm_bench::run(policy, &clock_ns) {
        log(LogLevel::Warn, &format!("sluice vm-bench: {name}: {ns} ns"));
    }
}

/// Carries out what this worker's queue decided, each on its own stream.
fn run_queue_actions(actions: Vec<QueueAction>) {
    for action in actions {
        match action {
            QueueAction::Resume { context } => {
                let resumed = hostcalls::set_effective_context(context)
                    .and_then(|()| hostcalls::resume_http_request());
                if let Err(e) = resumed {
                    log(LogLevel::Warn, &format!("sluice: resume {context}: {e:?}"));
                }
            }
            QueueAction::Reply { context, reply } => {
                if hostcalls::set_effective_context(context).is_ok() {
                    send_reply(&reply);
                }
            }
            QueueAction::Warn(message) => log(LogLevel::Warn, &message),
        }
    }
}
