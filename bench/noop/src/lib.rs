//! The benchmark's baseline filter. With no configuration every callback continues at
//! once, so a run with it measures what loading any Proxy-Wasm filter costs, apart from
//! Sluice's own work.
//!
//! Configured with `op=count` words (for example `body=1 shared=6`), it also makes exactly
//! those host calls per request and nothing else, so `bench/hostcalls.py` can price each
//! kind of host call Sluice makes (see BENCHMARKS.md, "Price of each host call"), and
//! `bench/run.py --only-global` the price of the quota service callout (`callout=1`).

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};
    use std::rc::Rc;

    proxy_wasm::main! {{
        proxy_wasm::set_log_level(LogLevel::Warn);
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(ProbeRoot::default()) });
    }}

    /// How many host calls of each kind to make per request.
    #[derive(Default, Clone)]
    struct Plan {
        /// Pause in the headers callback and read the whole request body at its end.
        body: u32,
        /// Read all request headers as one map.
        header_map: u32,
        /// Read one request header, this many times.
        header_get: u32,
        /// Set this many request headers in the body callback (needs `body`).
        body_header_set: u32,
        /// Replace the request body with itself (needs `body`).
        body_replace: u32,
        /// Shared-data get plus compare-and-set on this many keys.
        shared: u32,
        /// Counter increments.
        metric: u32,
        /// Clock reads.
        time: u32,
        /// Response headers read one by one.
        response_header_get: u32,
        /// Response headers set.
        response_header_set: u32,
        /// Read the response body.
        response_body: u32,
        /// Filter-state property written in `on_log`.
        property: u32,
        /// Set Sluice's cluster header in the body callback (for Sluice's Envoy config).
        cluster: u32,
        /// At the end of the request body (needs `body`), this many admission-shaped calls,
        /// one after the other, to the quota service (cluster `sluice_quota`, POST
        /// /v1/admit, HTTP/2), the request paused until the last answer has been read; as
        /// Sluice's global admission, without Sluice's code.
        callout: u32,
    }

    impl Plan {
        fn parse(text: &str) -> Result<Plan, String> {
            let mut plan = Plan::default();
            for word in text.split_whitespace() {
                let (op, n) = word
                    .split_once('=')
                    .ok_or(format!("`{word}`: expected op=count"))?;
                let n: u32 = n.parse().map_err(|_| format!("`{word}`: bad count"))?;
                let slot = match op {
                    "body" => &mut plan.body,
                    "header_map" => &mut plan.header_map,
                    "header_get" => &mut plan.header_get,
                    "body_header_set" => &mut plan.body_header_set,
                    "body_replace" => &mut plan.body_replace,
                    "shared" => &mut plan.shared,
                    "metric" => &mut plan.metric,
                    "time" => &mut plan.time,
                    "response_header_get" => &mut plan.response_header_get,
                    "response_header_set" => &mut plan.response_header_set,
                    "response_body" => &mut plan.response_body,
                    "property" => &mut plan.property,
                    "cluster" => &mut plan.cluster,
                    "callout" => &mut plan.callout,
                    _ => return Err(format!("unknown op `{op}`")),
                };
                *slot = n;
            }
            Ok(plan)
        }
    }

    #[derive(Default)]
    struct ProbeRoot {
        plan: Rc<Plan>,
        counter: u32,
    }

    impl Context for ProbeRoot {}
    impl RootContext for ProbeRoot {
        fn on_configure(&mut self, size: usize) -> bool {
            let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, size) {
                Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => String::new(),
            };
            match Plan::parse(&text) {
                Ok(plan) => self.plan = Rc::new(plan),
                Err(e) => {
                    let _ = hostcalls::log(LogLevel::Critical, &format!("probe: {e}"));
                    return false;
                }
            }
            if self.plan.metric > 0 {
                match hostcalls::define_metric(MetricType::Counter, "bench_probe_counter") {
                    Ok(id) => self.counter = id,
                    Err(_) => return false,
                }
            }
            true
        }
        fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Probe {
                plan: self.plan.clone(),
                counter: self.counter,
                callouts_left: 0,
            }))
        }
        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }
    }

    struct Probe {
        plan: Rc<Plan>,
        counter: u32,
        callouts_left: u32,
    }

    /// The quota service's cluster and an admission of the bench request's shape: the gold
    /// tier's three limits (concurrency, requests and tokens per minute) of a tenant of its
    /// own, the sizes of Sluice's (about 400 bytes out, 200 back).
    const QUOTA_CLUSTER: &str = "sluice_quota";
    const ADMISSION: &str = concat!(
        r#"{"id":"0000000000000000-probe","lease_ms":30000,"hold_ms":3600000,"demands":["#,
        r#"{"key":"sluice:{t:probe}:conc","kind":{"concurrency":{"max":1000000}},"amount":1},"#,
        r#"{"key":"sluice:{t:probe}:rpm","kind":{"rate":{"per_minute":1000000000,"burst_milli":1000}},"amount":1},"#,
        r#"{"key":"sluice:{t:probe}:tpm","kind":{"rate":{"per_minute":10000000000,"burst_milli":1000}},"amount":72}]}"#
    );

    const SHARED_KEYS: [&str; 8] = [
        "probe/0", "probe/1", "probe/2", "probe/3", "probe/4", "probe/5", "probe/6", "probe/7",
    ];
    const HEADERS: [&str; 8] = [
        "x-probe-0",
        "x-probe-1",
        "x-probe-2",
        "x-probe-3",
        "x-probe-4",
        "x-probe-5",
        "x-probe-6",
        "x-probe-7",
    ];

    impl Probe {
        /// Sends the next callout; false if it could not be sent.
        fn call(&mut self) -> bool {
            self.callouts_left -= 1;
            let headers = vec![
                (":method", "POST"),
                (":path", "/v1/admit"),
                (":authority", QUOTA_CLUSTER),
                ("content-type", "application/json"),
            ];
            hostcalls::dispatch_http_call(
                QUOTA_CLUSTER,
                headers,
                Some(ADMISSION.as_bytes()),
                vec![],
                std::time::Duration::from_millis(50),
            )
            .is_ok()
        }

        fn shared(&self) {
            for i in 0..self.plan.shared as usize {
                let key = SHARED_KEYS[i % SHARED_KEYS.len()];
                let (value, cas) = match hostcalls::get_shared_data(key) {
                    Ok((Some(v), cas)) => (v, cas),
                    _ => (vec![0u8; 24], None),
                };
                let _ = hostcalls::set_shared_data(key, Some(&value), cas);
            }
        }
    }

    impl Context for Probe {
        fn on_http_call_response(
            &mut self,
            _token: u32,
            _headers: usize,
            size: usize,
            _trailers: usize,
        ) {
            let _ = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, size);
            if self.callouts_left == 0 || !self.call() {
                let _ = hostcalls::resume_http_request();
            }
        }
    }
    impl HttpContext for Probe {
        fn on_http_request_headers(&mut self, _n: usize, eos: bool) -> Action {
            let p = self.plan.clone();
            for _ in 0..p.header_map {
                let _ = hostcalls::get_map_bytes(MapType::HttpRequestHeaders);
            }
            for _ in 0..p.header_get {
                let _ = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "content-type");
            }
            for _ in 0..p.time {
                let _ = hostcalls::get_current_time();
            }
            for _ in 0..p.metric {
                let _ = hostcalls::increment_metric(self.counter, 1);
            }
            self.shared();
            if p.body > 0 && !eos {
                Action::Pause
            } else {
                Action::Continue
            }
        }

        fn on_http_request_body(&mut self, size: usize, eos: bool) -> Action {
            let p = self.plan.clone();
            if p.body == 0 {
                return Action::Continue;
            }
            if !eos {
                return Action::Pause;
            }
            let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
                .ok()
                .flatten()
                .unwrap_or_default();
            for _ in 0..p.body_replace {
                let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, size, &body);
            }
            for _ in 0..p.cluster {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "x-sluice-cluster",
                    Some("openai"),
                );
            }
            for i in 0..p.body_header_set as usize {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    HEADERS[i % HEADERS.len()],
                    Some("probe-value"),
                );
            }
            self.callouts_left = p.callout;
            if self.callouts_left > 0 && self.call() {
                return Action::Pause;
            }
            Action::Continue
        }

        fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
            let p = self.plan.clone();
            for _ in 0..p.response_header_get {
                let _ =
                    hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, "content-type");
            }
            for i in 0..p.response_header_set as usize {
                let _ = hostcalls::set_map_value(
                    MapType::HttpResponseHeaders,
                    HEADERS[i % HEADERS.len()],
                    Some("probe-value"),
                );
            }
            Action::Continue
        }

        fn on_http_response_body(&mut self, size: usize, _eos: bool) -> Action {
            for _ in 0..self.plan.response_body {
                let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size);
            }
            Action::Continue
        }

        fn on_log(&mut self) {
            for _ in 0..self.plan.property {
                let _ = hostcalls::set_property(
                    // Sluice's property name: Sluice's access log format reads it.
                    vec!["sluice_usage"],
                    Some(br#"{"tenant":"acme","model":"gpt-4.1-mini","input_tokens":31}"#),
                );
            }
        }
    }
}
