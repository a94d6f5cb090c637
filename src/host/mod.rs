//! The only code that calls Envoy. It reads what the host offers, hands it to the
//! pure [`Exchange`] state machine, and applies the returned [`Step`].
//!
//! The SDK's trait helpers `unwrap` host results (and string accessors trap on non-UTF-8
//! header values), so every host call here goes through `hostcalls` and handles errors.

mod metrics;
mod store;

use crate::config;
use crate::headers::RequestHeaders;
use crate::lifecycle::{Exchange, Next, Step};
use crate::policy::Policy;
use crate::usage::Passthrough;
use metrics::HostMetrics;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;
use store::SharedData;

/// Filter-state key of the usage record; the access log reads
/// `%FILTER_STATE(wasm.sluice_usage:PLAIN)%`.
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

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(SluiceHttp {
            policy: self.policy.clone(),
            metrics: self.metrics.clone(),
            debug: self.debug,
            exchange: Exchange::new(),
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
        let step = self
            .exchange
            .on_request_headers(&policy, &headers, end_of_stream);
        self.apply(step, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.policy.clone() else {
            return self.fail("no configuration");
        };
        let read = || match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => Some(Vec::new()),
            Err(_) => None,
        };
        let step = self.exchange.on_request_body(
            &policy,
            &SharedData,
            body_size,
            end_of_stream,
            now_ms(),
            read,
        );
        let routed = step.next == Next::Continue && step.set.iter().any(|(n, _)| n == ":path");
        let action = self.apply(step, body_size);
        if self.debug && routed {
            // Names and ids only: keys and credentials never reach a log.
            if let (Some(owner), Some(route)) = (self.exchange.owner(), self.exchange.route()) {
                let tenant = policy.tenant(owner.tenant);
                log(
                    LogLevel::Debug,
                    &format!(
                        "sluice: routed tenant={} key={} model={} provider={} stream={} injected_usage={} prompt_estimate={}",
                        tenant.map_or("?", |t| t.id.as_str()),
                        tenant.and_then(|t| t.key_ids.get(owner.key)).map_or("?", String::as_str),
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
        let details = hostcalls::get_property(vec!["response", "code_details"])
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v).ok());
        let Ok(mut metrics) = metrics.try_borrow_mut() else {
            return;
        };
        let finished = self.exchange.finish(
            &policy,
            &SharedData,
            details.as_deref(),
            now_ms(),
            &mut *metrics,
        );
        if let Some(done) = finished {
            for failure in &done.settle_failures {
                log(
                    LogLevel::Warn,
                    &format!("sluice: could not settle limit {failure}"),
                );
            }
            if self.debug {
                log(LogLevel::Debug, &format!("sluice: usage {}", done.record));
            }
            if let Err(s) =
                hostcalls::set_property(vec![USAGE_PROPERTY], Some(done.record.as_bytes()))
            {
                log(
                    LogLevel::Warn,
                    &format!("sluice: cannot store the usage record: {s:?}"),
                );
            }
        }
    }
}
