//! One HTTP stream: Envoy's callbacks in, the [`Exchange`]'s steps out.

use super::metrics::NoMetrics;
use super::store::{take_cas_retries, SharedData};
use super::{
    call_answer, call_quota_service, header_text, log, now_ms, run_queue_actions, send_reply,
    Configured,
};
use crate::errors::{ApiError, ErrorKind};
use crate::headers::RequestHeaders;
use crate::lifecycle::{BodyEnv, Callout, Exchange, Next, Step};
use crate::metrics::{MetricKey, Metrics};
use crate::usage::Passthrough;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, BufferType, LogLevel, MapType};
use std::cell::RefCell;
use std::rc::Rc;

/// Filter-state key of the usage record; the access log reads it as
/// `filter_state['wasm.sluice_usage']` in a `%CEL(...)%` command.
const USAGE_PROPERTY: &str = "sluice_usage";

pub(super) struct SluiceHttp {
    context_id: u32,
    /// `None` only if Envoy created a stream without a successful configure; refuse all.
    configured: Option<Configured>,
    /// Shared with this worker's root context while the quota service decides the
    /// request's admission: the root hands it the decision.
    exchange: Rc<RefCell<Exchange>>,
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

/// Applies a step's request edits: removals, the body, then the headers to set.
fn apply_edits(step: &Step, body_size: usize) -> Result<(), String> {
    for name in &step.remove {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None)
            .map_err(|s| format!("remove header {name}: {s:?}"))?;
    }
    if let Some(body) = &step.body {
        hostcalls::set_buffer(BufferType::HttpRequestBody, 0, body_size, body)
            .map_err(|s| format!("replace body: {s:?}"))?;
    }
    for (name, value) in &step.set {
        hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value))
            .map_err(|s| format!("set header {name}: {s:?}"))?;
    }
    Ok(())
}

impl SluiceHttp {
    pub(super) fn new(context_id: u32, configured: Option<Configured>) -> Self {
        SluiceHttp {
            context_id,
            configured,
            exchange: Rc::new(RefCell::new(Exchange::new())),
            #[cfg(feature = "test-trap")]
            trap_at: None,
        }
    }

    fn body_env(&self) -> BodyEnv<'_> {
        BodyEnv {
            store: &SharedData,
            now_ms: now_ms(),
            worker: self.configured.as_ref().map_or(0, Configured::worker),
            context: self.context_id,
            nonce: self.configured.as_ref().map_or(0, |c| c.nonce),
            plans: self
                .configured
                .as_ref()
                .map(|c| &c.plans as &dyn crate::fallback::Plans),
        }
    }

    /// Sends the quota service call of a paused request; its answer comes to
    /// `on_http_call_response`. A call that cannot be sent is answered at once as failed.
    fn call(&mut self, callout: Callout) -> Action {
        let Some(policy) = self.configured.as_ref().map(|c| c.policy.clone()) else {
            return self.fail("no configuration");
        };
        let Some(global) = policy.global.as_ref() else {
            return self.fail("a quota service call without a `global` section");
        };
        match call_quota_service(global, &callout) {
            Ok(_token) => Action::Pause,
            Err(s) => {
                let why = format!("cannot call cluster `{}`: {s:?}", global.cluster);
                self.call_answered(Err(why))
            }
        }
    }

    /// Hands the answer to this stream's own call (the usage endpoint's readings) to the
    /// exchange and carries out what follows.
    fn call_answered(&mut self, answer: Result<&[u8], String>) -> Action {
        let Some(policy) = self.configured.as_ref().map(|c| c.policy.clone()) else {
            return self.fail("no configuration");
        };
        let env = self.body_env();
        let step = self
            .exchange
            .borrow_mut()
            .on_call_answer(&policy, &env, answer);
        self.apply(step, 0)
    }

    /// Carries out a step: the edits, then what comes next.
    fn apply(&mut self, step: Step, body_size: usize) -> Action {
        if let Err(what) = apply_edits(&step, body_size) {
            return self.fail(&what);
        }
        if let Some(c) = self.configured.as_ref().filter(|c| c.debug && step.routed) {
            if let Some(line) = self.exchange.borrow().describe_route(&c.policy) {
                log(LogLevel::Debug, &line);
            }
        }
        match step.next {
            Next::Continue => Action::Continue,
            Next::Pause => Action::Pause,
            Next::Wait(waiter) => {
                // This worker resumes it when it wins a slot, or answers it in time.
                let queue = self.configured.as_ref().and_then(|c| c.queue.as_ref());
                let registered = match queue.map(|q| q.try_borrow_mut()) {
                    Some(Ok(mut q)) => {
                        q.add(waiter);
                        true
                    }
                    _ => false,
                };
                if registered {
                    Action::Pause
                } else {
                    self.fail("register the waiting request")
                }
            }
            Next::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
            Next::Call(callout) => self.call(callout),
            Next::AwaitFill(wait) => {
                // This worker's root context looks the key up every tick and hands this
                // stream the response (or the fetch, or the end of its wait).
                let waiting = self
                    .configured
                    .as_ref()
                    .is_some_and(|c| c.wait_for_fill(self.context_id, &self.exchange, wait));
                if waiting {
                    Action::Pause
                } else {
                    self.fail("wait for the cache")
                }
            }
            Next::Admit(request) => {
                // The worker's root context sends it, with the other admissions waiting,
                // and hands this stream the decision.
                let waiting = self.configured.as_ref().is_some_and(|c| {
                    c.wait_for_admission(self.context_id, &self.exchange, request)
                });
                if waiting {
                    Action::Pause
                } else {
                    self.fail("queue the admission for the quota service")
                }
            }
        }
    }

    /// A host call failed mid-edit: answer 500 instead of sending the request upstream
    /// half-rewritten.
    fn fail(&mut self, what: &str) -> Action {
        log(
            LogLevel::Error,
            &format!("sluice: host call failed ({what}); answering 500"),
        );
        let Some(c) = self.configured.clone() else {
            // Not configured: the request holds nothing yet.
            let err = ApiError::new(ErrorKind::Internal, "The gateway is not configured.");
            send_reply(&err.reply(self.exchange.borrow().flavour()));
            return Action::Pause;
        };
        let failed = self
            .exchange
            .borrow_mut()
            .fail(&c.policy, &SharedData, now_ms());
        if let Some(call) = failed.cache_call {
            c.cache_write(call);
        }
        if let Some(settlement) = failed.settlement {
            if let Some(Ok(mut courier)) = self
                .configured
                .as_ref()
                .and_then(|c| c.courier.as_ref())
                .map(|c| c.try_borrow_mut())
            {
                courier.settle(settlement);
            }
        }
        for failure in &failed.settle_failures {
            log(
                LogLevel::Warn,
                &format!("sluice: could not settle limit {failure}"),
            );
        }
        send_reply(&failed.reply);
        Action::Pause
    }
}

impl Context for SluiceHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let answer = call_answer(num_headers, body_size);
        let answer = answer.as_deref().map_err(Clone::clone);
        // The request was paused for this answer: resume it if it goes on.
        if let Action::Continue = self.call_answered(answer) {
            if let Err(s) = hostcalls::resume_http_request() {
                log(
                    LogLevel::Warn,
                    &format!("sluice: resume after the quota service answered: {s:?}"),
                );
            }
        }
    }
}

impl HttpContext for SluiceHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.configured.as_ref().map(|c| c.policy.clone()) else {
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
        let env = self.body_env();
        let step =
            self.exchange
                .borrow_mut()
                .on_request_headers(&policy, &env, &headers, end_of_stream);
        self.apply(step, 0)
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        let Some(policy) = self.configured.as_ref().map(|c| c.policy.clone()) else {
            return self.fail("no configuration");
        };
        #[cfg(feature = "test-trap")]
        trap_if(&self.trap_at, b"request-body");
        let read = || match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size) {
            Ok(Some(bytes)) => Some(bytes),
            Ok(None) => Some(Vec::new()),
            Err(_) => None,
        };
        let env = self.body_env();
        let step = self.exchange.borrow_mut().on_request_body(
            &policy,
            &env,
            body_size,
            end_of_stream,
            read,
        );
        self.apply(step, body_size)
    }

    /// A request that ends with trailers ends its body here: Envoy's gzip decompressor ends
    /// every request it inflated with trailers (and any HTTP/2 client may send some), so
    /// the body callback never saw end_of_stream. Run the body step on the whole buffered
    /// body, and drop the trailers (providers need not see x-envoy-decompressor-*).
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        let Some(policy) = self.configured.as_ref().map(|c| c.policy.clone()) else {
            return self.fail("no configuration");
        };
        if let Err(s) = hostcalls::set_map(MapType::HttpRequestTrailers, vec![]) {
            return self.fail(&format!("drop request trailers: {s:?}"));
        }
        let bytes = match hostcalls::get_buffer(BufferType::HttpRequestBody, 0, u32::MAX as usize) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(s) => return self.fail(&format!("read body at trailers: {s:?}")),
        };
        let body_size = bytes.len();
        let env = self.body_env();
        let step =
            self.exchange
                .borrow_mut()
                .on_request_body(&policy, &env, body_size, true, move || Some(bytes));
        self.apply(step, body_size)
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        let header = |name: &str| header_text(MapType::HttpResponseHeaders, name);
        let status = header(":status")
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let content_type = header("content-type");
        let edits = self.exchange.borrow_mut().on_response_headers(
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
        if !self.exchange.borrow().meters_response() {
            // Nothing to read, but whether the response completed still counts.
            if end_of_stream {
                self.exchange
                    .borrow_mut()
                    .on_response_body(&[], true, now_ms());
            }
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
        let passed = self
            .exchange
            .borrow_mut()
            .on_response_body(&chunk, end_of_stream, now_ms());
        if let Passthrough::Replace(out) = passed {
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
        let Some(c) = self.configured.clone() else {
            return;
        };
        // One host call fewer for the usual request: only an unfinished stream needs it.
        let details = if self.exchange.borrow().needs_end_details() {
            hostcalls::get_property(vec!["response", "code_details"])
                .ok()
                .flatten()
                .and_then(|v| String::from_utf8(v).ok())
        } else {
            None
        };
        if let Some(Ok(mut q)) = c.queue.as_ref().map(|q| q.try_borrow_mut()) {
            q.forget(self.context_id);
        }
        let courier = c.courier.as_ref().map(|c| c.try_borrow_mut());
        if let Some(Ok(mut courier)) = courier {
            courier.release(self.context_id);
            courier.forget_admission(self.context_id);
        }
        if let Ok(mut parked) = c.parked.try_borrow_mut() {
            parked.remove(&self.context_id);
        }
        if let Some(Ok(mut waiters)) = c.cache_waiters.as_ref().map(|w| w.try_borrow_mut()) {
            waiters.forget(self.context_id);
        }
        // The attempts its upstream filter recorded, before the ending is decided.
        self.exchange.borrow_mut().collect_attempts(&c.plans);
        let (store, details, now) = (&SharedData, details.as_deref(), now_ms());
        // Never lose the record or the settlement: count without metrics if must be.
        let finished = match c.metrics.try_borrow_mut() {
            Ok(mut m) => self
                .exchange
                .borrow_mut()
                .finish(&c.policy, store, details, now, &mut *m),
            Err(_) => {
                self.exchange
                    .borrow_mut()
                    .finish(&c.policy, store, details, now, &mut NoMetrics)
            }
        };
        if let Ok(mut m) = c.metrics.try_borrow_mut() {
            let retries = take_cas_retries();
            if retries > 0 {
                m.add(MetricKey::CasRetries, retries);
            }
        }
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
        if let Some(settlement) = done.settlement {
            // Sent from this worker's root context: a stream's own calls die with it.
            match c.courier.as_ref().map(|c| c.try_borrow_mut()) {
                Some(Ok(mut courier)) => courier.settle(settlement),
                _ => log(
                    LogLevel::Error,
                    &format!("sluice: settlement {} dropped: no courier", settlement.id),
                ),
            }
        }
        if let Some(call) = done.cache_call {
            c.cache_write(call);
        }
        if c.debug {
            log(LogLevel::Debug, &format!("sluice: usage {}", done.record));
        }
        if done.released_slot {
            // A provider slot just freed: let this worker's waiters claim it now.
            let actions = match c.queue.as_ref().map(|q| q.try_borrow_mut()) {
                Some(Ok(mut q)) => q.claim(&SharedData, now_ms()),
                _ => Vec::new(),
            };
            run_queue_actions(actions);
            let _ = hostcalls::set_effective_context(self.context_id);
        }
    }
}
