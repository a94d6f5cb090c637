//! The only code that calls Envoy: it reads what the host offers, hands it to the pure
//! core, and carries out what the core returns. It translates; it does not decide.
//!
//! The SDK's trait helpers `unwrap` host results (and string accessors trap on non-UTF-8
//! header values), so every host call here goes through `hostcalls` and handles errors.

mod metrics;
mod store;
mod stream;

use crate::config;
use crate::errors::LocalReply;
use crate::lifecycle::queue::{QueueAction, WorkerQueue, TICK_MS};
use crate::policy::Policy;
use metrics::{HostMetrics, NoMetrics};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};
use store::SharedData;
use stream::SluiceHttp;

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
}

#[derive(Default)]
struct SluiceRoot {
    configured: Option<Configured>,
}

impl Context for SluiceRoot {}

impl RootContext for SluiceRoot {
    fn on_configure(&mut self, plugin_configuration_size: usize) -> bool {
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

    fn on_tick(&mut self) {
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
    let policy =
        config::compile(&raw, &|name| std::env::var(name).ok()).map_err(|e| e.to_string())?;
    log(LogLevel::Info, &policy.summary());
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
    if queue.is_some() {
        hostcalls::set_tick_period(Duration::from_millis(TICK_MS))
            .map_err(|s| format!("sluice: cannot set the queue tick: {s:?}"))?;
    }
    let debug = matches!(
        hostcalls::get_log_level(),
        Ok(LogLevel::Debug | LogLevel::Trace)
    );
    Ok(Configured {
        metrics: Rc::new(RefCell::new(HostMetrics::new(policy.clone()))),
        policy,
        queue: queue.map(|q| Rc::new(RefCell::new(q))),
        debug,
    })
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
