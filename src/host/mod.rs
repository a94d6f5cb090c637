//! The only code that calls Envoy. It reads what the host offers, hands it to the
//! pure [`Exchange`] state machine, and applies the returned [`Step`].
//!
//! The SDK's trait helpers `unwrap` host results (and string accessors trap on non-UTF-8
//! header values), so every host call here goes through `hostcalls` and handles errors.

mod metrics;
mod queue;
mod store;

use crate::config;
use crate::headers::RequestHeaders;
use crate::lifecycle::{BodyEnv, Exchange, Next, Step, WaitState};
use crate::policy::Policy;
use crate::usage::Passthrough;
use metrics::HostMetrics;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use queue::{LocalQueue, LocalWaiter, TICK_MS};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};
use store::SharedData;

/// Filter-state key of the usage record; the access log reads it as
/// `filter_state['wasm.sluice_usage']` in a `%CEL(...)%` command.
const USAGE_PROPERTY: &str = "sluice_usage";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SluiceRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

/// Host wall clock in milliseconds (0 if unavailable; deltas are clamped by callers).
fn now_ms() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Default)]
struct SluiceRoot {
    policy: Option<Rc<Policy>>,
    /// Metric ids are per VM and per policy (labels are policy indices).
    metrics: Option<Rc<RefCell<HostMetrics>>>,
    /// Envoy's wasm log level was debug or lower at configure time.
    debug: bool,
    /// Requests this worker holds in providers' fair queues (when any provider has a cap).
    queue: Option<Rc<RefCell<LocalQueue>>>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
        let raw = match hostcalls::get_buffer(
            BufferType::PluginConfiguration,
            0,
            plugin_configuration_size,
        ) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                log(
                    LogLevel::Critical,
                    "invalid sluice configuration: the plugin `configuration` is empty",
                );
                return false;
            }
            Err(status) => {
                log(
                    LogLevel::Critical,
                    &format!("sluice: cannot read plugin configuration: {status:?}"),
                );
                return false;
            }
        };
        match config::compile(&raw, &|name| std::env::var(name).ok()) {
            Ok(policy) => {
                log(
                    LogLevel::Info,
                    &format!(
                        "sluice: configured {} tenants, {} keys, {} models, {} providers",
                        policy.tenants.len(),
                        policy.keys.len(),
                        policy.catalog.models.len(),
                        policy.providers.len()
                    ),
                );
                let policy = Rc::new(policy);
                #[cfg(feature = "test-trap")]
                log(
                    LogLevel::Critical,
                    "sluice: built with the test-trap feature, which traps on request: tests only",
                );
                #[cfg(feature = "vm-bench")]
                for (name, ns) in crate::vm_bench::run(&policy, &|| {
                    hostcalls::get_current_time()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                }) {
                    log(LogLevel::Warn, &format!("sluice vm-bench: {name}: {ns} ns"));
                }
                let capped: Vec<_> = policy
                    .providers_by_id()
                    .filter_map(|(id, p)| {
                        p.max_in_flight
                            .map(|cap| (id, crate::shared::keys::queue(&p.name), cap))
                    })
                    .collect();
                self.queue = None;
                if !capped.is_empty() {
                    match crate::fairness::allocate_worker_id(&SharedData) {
                        Ok(worker) => {
                            self.queue =
                                Some(Rc::new(RefCell::new(LocalQueue::new(worker, capped))));
                            if let Err(s) =
                                hostcalls::set_tick_period(Duration::from_millis(TICK_MS))
                            {
                                log(
                                    LogLevel::Critical,
                                    &format!("sluice: cannot set the queue tick: {s:?}"),
                                );
                                return false;
                            }
                        }
                        Err(e) => {
                            log(
                                LogLevel::Critical,
                                &format!("sluice: cannot allocate a worker id: {e:?}"),
                            );
                            return false;
                        }
                    }
                }
                self.metrics = Some(Rc::new(RefCell::new(HostMetrics::new(policy.clone()))));
                self.policy = Some(policy);
                self.debug = matches!(
                    hostcalls::get_log_level(),
                    Ok(LogLevel::Debug | LogLevel::Trace)
                );
                true
            }
            Err(e) => {
                // Refusing the configuration makes Envoy reject the listener: fail closed.
                log(LogLevel::Critical, &e.to_string());
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let (Some(queue), Some(metrics)) = (&self.queue, &self.metrics) else {
            return;
        };
        let now = now_ms();
        // Resuming or answering a stream can run its callbacks right away: hold no
        // metrics borrow across those host calls.
        let report_due = match queue.try_borrow_mut() {
            Ok(mut q) => q.tick(&SharedData, now),
            Err(_) => false,
        };
        if report_due {
            if let (Ok(q), Ok(mut m)) = (queue.try_borrow(), metrics.try_borrow_mut()) {
                q.report(&SharedData, now, &mut *m);
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SluiceHttp {
            context_id,
            worker: self
                .queue
                .as_ref()
                .and_then(|q| q.try_borrow().ok().map(|q| q.worker))
                .unwrap_or(0),
            queue: self.queue.clone(),
            wait: None,
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            debug: self.debug,
            exchange: Exchange::new(),
            #[cfg(feature = "test-trap")]
            trap_at: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct SluiceHttp {
    /// `None` only if Envoy created a stream without a successful configure; refuse all.
    policy: Option<Rc<Policy>>,
    metrics: Option<Rc<RefCell<HostMetrics>>>,
    debug: bool,
    exchange: Exchange,
    context_id: u32,
    /// This VM's worker id (0 when no provider has a queue).
    worker: u32,
    queue: Option<Rc<RefCell<LocalQueue>>>,
    /// Set while (or after) this request waited in a fair queue; the root writes it.
    wait: Option<Rc<Cell<WaitState>>>,
    /// Test builds only: the callback in which to trap (`x-sluice-test-trap`).
    #[cfg(feature = "test-trap")]
    trap_at: Option<Vec<u8>>,
}

/// Test builds only: traps the VM (as a bug would) when the request asked for it here.
#[cfg(feature = "test-trap")]
fn trap_if(trap_at: &Option<Vec<u8>>, phase: &[u8]) {
    if trap_at.as_deref() == Some(phase) {
        log(
            LogLevel::Warn,
            "sluice test-trap: trapping the VM on request",
        );
        core::arch::wasm32::unreachable();
    }
}

impl SluiceHttp {
    /// Tells the exchange how its wait ended (the root resumed it or timed it out).
    fn sync_wait(&mut self) {
        if let Some(cell) = &self.wait {
            self.exchange.wait_ended(cell.get());
        }
    }
}

impl SluiceHttp {
    fn apply(&self, step: Step, body_size: usize) -> Action {
        for name in &step.remove {
            if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None) {
                return self.fail(&format!("remove header {name}: {s:?}"));
            }
        }
        if let Some(body) = &step.body {
            if let Err(s) = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, body) {
                return self.fail(&format!("replace body: {s:?}"));
            }
        }
        for (name, value) in &step.set {
            if let Err(s) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            {
                return self.fail(&format!("set header {name}: {s:?}"));
            }
        }
        match step.next {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
            Next::Reply(reply) => {
                let headers: Vec<(&str, &str)> = reply
                    .headers
                    .iter()
                    .map(|(n, v)| (n.as_str(), v.as_str()))
                    .collect();
                if let Err(s) = hostcalls::send_http_response(
                    u32::from(reply.status),
                    headers,
                    Some(reply.body.as_bytes()),
                ) {
                    log(LogLevel::Error, &format!("sluice: send local reply: {s:?}"));
                }
                Action::Pause
            }
        }
    }

    /// A host call failed mid-edit: the request must not go upstream half-rewritten.
    fn fail(&self, what: &str) -> Action {
        log(
            LogLevel::Error,
            &format!("sluice: host call failed ({what}); answering 500"),
        );
        let body = br#"{"error":{"message":"The gateway failed to process the request.","type":"server_error","param":null,"code":null}}"#;
        let _ = hostcalls::send_http_response(
            500,
            vec![("content-type", "application/json")],
            Some(body),
        );
        Action::Pause
    }
}

impl Context for SluiceHttp {}

impl HttpContext for SluiceHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return self.fail("no configuration");
        };
        let pairs = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(pairs) => pairs,
            Err(s) => return self.fail(&format!("read headers: {s:?}")),
        };
        let headers = RequestHeaders::from_pairs(pairs);
        #[cfg(feature = "test-trap")]
        {
            self.trap_at = headers.get("x-sluice-test-trap").map(<[u8]>::to_vec);
            trap_if(&self.trap_at, b"request-headers");
        }
        let step = self
            .exchange
            .on_request_headers(&policy, &headers, end_of_stream);
        self.apply(step, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return self.fail("no configuration");
        };
        #[cfg(feature = "test-trap")]
        trap_if(&self.trap_at, b"request-body");
        let read = || match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => Some(Vec::new()),
            Err(_) => None,
        };
        let env = BodyEnv {
            store: &SharedData,
            now_ms: now_ms(),
            worker: self.worker,
            context: self.context_id,
        };
        let step = self
            .exchange
            .on_request_body(&policy, &env, body_size, end_of_stream, read);
        let routed =
            step.set.iter().any(|(n, _)| n == ":path") && !matches!(step.next, Next::Reply(_));
        let action = self.apply(step, body_size);
        if let (Some(wait), Some(queue)) = (self.exchange.queue_wait(), &self.queue) {
            // Paused for a full provider: this worker resumes it when it wins a slot.
            let state = Rc::new(Cell::new(WaitState::Waiting));
            let waiter = LocalWaiter {
                context: self.context_id,

                key: wait.key.clone(),
                capacity: wait.capacity,
                since_ms: wait.since_ms,
                deadline_ms: wait.deadline_ms,
                flavour: self.exchange.flavour(),
                state: state.clone(),
            };
            if let Ok(mut q) = queue.try_borrow_mut() {
                q.add(waiter);
            }
            self.wait = Some(state);
        }
        if self.debug && routed {
            // Names and ids only: keys and credentials never reach a log.
            if let (Some(owner), Some(route)) = (self.exchange.owner(), self.exchange.route()) {
                let tenant = policy.tenant(owner.tenant);
                log(
                    LogLevel::Debug,
                    &format!(
                        "sluice: routed tenant={} key={} model={} provider={} stream={} injected_usage={} prompt_estimate={}",
                        tenant.map_or("?", |t| t.id.as_str()),
                        tenant.and_then(|t| t.key_id(owner.key)).unwrap_or("?"),
                        policy.model(route.model).map_or("?", |m| m.name.as_str()),
                        policy.provider(route.provider).map_or("?", |p| p.name.as_str()),
                        route.stream,
                        route.injected_usage,
                        route.prompt_estimate,
                    ),
                );
            }
        }
        action
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        self.sync_wait();
        let header = |name: &str| {
            hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, name)
                .ok()
                .flatten()
                .and_then(|v| String::from_utf8(v).ok())
        };
        let status = header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let content_type = header("content-type");
        let edits = self.exchange.on_response_headers(
            status,
            content_type.as_deref(),
            end_of_stream,
            now_ms(),
        );
        if edits.remove_content_length {
            // The body will lose the injected usage chunk: its length is no longer known.
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, "content-length", None);
        }
        for (name, value) in &edits.set {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(value));
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        #[cfg(feature = "test-trap")]
        trap_if(&self.trap_at, b"response-body");
        if !self.exchange.meters_response() {
            return Action::Continue;
        }
        let chunk = match hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(s) => {
                log(
                    LogLevel::Warn,
                    &format!("sluice: cannot read response body: {s:?}"),
                );
                return Action::Continue;
            }
        };
        if let Passthrough::Replace(out) =
            self.exchange
                .on_response_body(&chunk, end_of_stream, now_ms())
        {
            if let Err(s) = hostcalls::set_buffer(BufferType::HttpResponseBody, 0, body_size, &out)
            {
                log(
                    LogLevel::Error,
                    &format!("sluice: cannot rewrite response body: {s:?}"),
                );
            }
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let (Some(policy), Some(metrics)) = (self.policy.clone(), self.metrics.clone()) else {
            return;
        };
        self.sync_wait();
        // One host call fewer for the usual request: only an unfinished stream needs it.
        let details = if self.exchange.needs_end_details() {
            hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .and_then(|v| String::from_utf8(v).ok())
        } else {
            None
        };
        if self.wait.is_some() {
            if let Some(Ok(mut q)) = self.queue.as_ref().map(|q| q.try_borrow_mut()) {
                q.forget(self.context_id);
            }
        }
        let finished = match metrics.try_borrow_mut() {
            Ok(mut m) => {
                self.exchange
                    .finish(&policy, &SharedData, details.as_deref(), now_ms(), &mut *m)
            }
            // Never lose the record or the settlement: count without metrics if must be.
            Err(_) => self.exchange.finish(
                &policy,
                &SharedData,
                details.as_deref(),
                now_ms(),
                &mut NoMetrics,
            ),
        };
        let Some(done) = finished else {
            return;
        };
        // The record first: claiming below switches the effective context to other streams.
        if let Err(s) = hostcalls::set_property(vec![USAGE_PROPERTY], Some(done.record.as_bytes()))
        {
            log(
                LogLevel::Warn,
                &format!("sluice: cannot store the usage record: {s:?}"),
            );
        }
        for failure in &done.settle_failures {
            log(
                LogLevel::Warn,
                &format!("sluice: could not settle limit {failure}"),
            );
        }
        if self.debug {
            log(LogLevel::Debug, &format!("sluice: usage {}", done.record));
        }
        if done.released_slot {
            // A provider slot just freed: let this worker's waiters claim it now.
            if let Some(Ok(mut q)) = self.queue.as_ref().map(|q| q.try_borrow_mut()) {
                q.claim(&SharedData, now_ms());
            }
            let _ = hostcalls::set_effective_context(self.context_id);
        }
    }
}

/// Drops metrics when the real ones are busy (a re-entrant callback); records still count.
struct NoMetrics;

impl crate::metrics::Metrics for NoMetrics {
    fn add(&mut self, _key: crate::metrics::MetricKey, _value: u64) {}
}
