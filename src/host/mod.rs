//! The only code that calls Envoy. It reads what the host offers, hands it to the
//! pure [`Exchange`] state machine, and applies the returned [`Step`].
//!
//! The SDK's trait helpers `unwrap` host results (and string accessors trap on non-UTF-8
//! header values), so every host call here goes through `hostcalls` and handles errors.

use crate::config;
use crate::headers::RequestHeaders;
use crate::lifecycle::{Exchange, Next, Step};
use crate::policy::Policy;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(SluiceRoot::default()) });
}}

fn log(level: LogLevel, message: &str) {
    let _ = hostcalls::log(level, message);
}

#[derive(Default)]
struct SluiceRoot {
    policy: Option<Rc<Policy>>,
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
                self.policy = Some(Rc::new(policy));
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
        let step = self
            .exchange
            .on_request_body(&policy, body_size, end_of_stream, read);
        self.apply(step, body_size)
    }
}
