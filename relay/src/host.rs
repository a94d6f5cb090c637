//! Envoy's dynamic-module ABI (Envoy 1.40, ABI v0.2.0), translated to [`Exchange`] events
//! and [`Host`] calls. Only the part of the ABI the relay uses is declared; hooks Envoy
//! requires but the relay does not need answer "continue". Nothing here decides.
//!
//! Re-entrancy: a call into Envoy (starting or resetting the provider stream, sending to
//! the client) may call a hook of the same filter before it returns. Such events are
//! queued and handled once the outer hook is done, in order.

use crate::chain;
use crate::config::{self, RelayConfig};
use crate::exchange::{Exchange, Header, HeadersVerdict, Host, ResetReason, StartFailure};
use crate::timer::{self, Scheduler};
use std::cell::RefCell;
use std::ffi::c_void;
use std::sync::Arc;

pub(crate) type EnvoyPtr = *mut c_void;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
}

impl EnvoyBuffer {
    pub(crate) const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: std::ptr::null(),
        len: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const u8,
    len: usize,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeader {
    key: *const u8,
    key_len: usize,
    value: *const u8,
    value_len: usize,
}

const REQUEST_HEADERS: u32 = 0;
const RECEIVED_REQUEST_BODY: u32 = 0;
const LOG_ERROR: u32 = 4;
const CONTINUE: u32 = 0;
const STOP_ITERATION: u32 = 1;
const STOP_ITERATION_NO_BUFFER: u32 = 3;

/// ABI version this module is built against (Envoy 1.40).
static ABI_VERSION: &[u8] = b"v0.2.0\0";
/// Dynamic metadata namespace for the access log: `%DYNAMIC_METADATA(sluice.relay:cause)%`.
const METADATA_NAMESPACE: &str = "sluice.relay";

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_http_get_header(
        filter: EnvoyPtr,
        kind: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        count: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: EnvoyPtr, kind: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: EnvoyPtr,
        kind: u32,
        result: *mut HttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter: EnvoyPtr,
        kind: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: EnvoyPtr,
        kind: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response_headers(
        filter: EnvoyPtr,
        headers: *const HttpHeader,
        count: usize,
        end_stream: bool,
    );
    fn envoy_dynamic_module_callback_http_send_response_data(
        filter: EnvoyPtr,
        data: ModuleBuffer,
        end_stream: bool,
    );
    fn envoy_dynamic_module_callback_http_send_response_trailers(
        filter: EnvoyPtr,
        trailers: *const HttpHeader,
        count: usize,
    );
    fn envoy_dynamic_module_callback_http_filter_start_http_stream(
        filter: EnvoyPtr,
        stream_out: *mut u64,
        cluster: ModuleBuffer,
        headers: *const HttpHeader,
        count: usize,
        body: ModuleBuffer,
        end_stream: bool,
        timeout_ms: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_reset_http_stream(filter: EnvoyPtr, stream: u64);
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: EnvoyPtr,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
        filter: EnvoyPtr,
        namespace: ModuleBuffer,
        key: ModuleBuffer,
        value: f64,
    );
}

pub(crate) fn module_buffer(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer {
        ptr: bytes.as_ptr(),
        len: bytes.len(),
    }
}

/// Bytes Envoy owns, valid during the current hook.
pub(crate) unsafe fn envoy_bytes<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        &[]
    } else {
        std::slice::from_raw_parts(ptr, len)
    }
}

unsafe fn copy_headers(headers: *const HttpHeader, count: usize) -> Vec<Header> {
    if headers.is_null() {
        return Vec::new();
    }
    std::slice::from_raw_parts(headers, count)
        .iter()
        .map(|h| {
            (
                envoy_bytes(h.key, h.key_len).to_vec(),
                envoy_bytes(h.value, h.value_len).to_vec(),
            )
        })
        .collect()
}

fn as_abi(headers: &[Header]) -> Vec<HttpHeader> {
    headers
        .iter()
        .map(|(k, v)| HttpHeader {
            key: k.as_ptr(),
            key_len: k.len(),
            value: v.as_ptr(),
            value_len: v.len(),
        })
        .collect()
}

pub(crate) fn log_error(message: &str) {
    unsafe { envoy_dynamic_module_callback_log(LOG_ERROR, module_buffer(message.as_bytes())) }
}

/// [`Host`] over one filter's Envoy pointer, for the duration of a hook.
struct EnvoyHost<'f> {
    envoy: EnvoyPtr,
    scheduler: &'f mut Option<Arc<Scheduler>>,
}

impl Host for EnvoyHost<'_> {
    fn start_stream(
        &mut self,
        cluster: &[u8],
        headers: &[Header],
        body: &[u8],
    ) -> Result<u64, StartFailure> {
        let abi = as_abi(headers);
        let mut stream = 0u64;
        // Timeouts are the exchange's own (0: none here), so that a timeout can still end
        // the client's stream with an error event.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_start_http_stream(
                self.envoy,
                &mut stream,
                module_buffer(cluster),
                abi.as_ptr(),
                abi.len(),
                module_buffer(body),
                true,
                0,
            )
        };
        match result {
            0 => Ok(stream),
            1 => Err(StartFailure::MissingHeaders),
            2 => Err(StartFailure::ClusterNotFound),
            _ => Err(StartFailure::CannotCreate),
        }
    }

    fn reset_stream(&mut self, stream: u64) {
        unsafe { envoy_dynamic_module_callback_http_filter_reset_http_stream(self.envoy, stream) }
    }

    fn send_headers(&mut self, headers: &[Header], end_stream: bool) {
        let abi = as_abi(headers);
        unsafe {
            envoy_dynamic_module_callback_http_send_response_headers(
                self.envoy,
                abi.as_ptr(),
                abi.len(),
                end_stream,
            )
        }
    }

    fn send_data(&mut self, data: &[u8], end_stream: bool) {
        unsafe {
            envoy_dynamic_module_callback_http_send_response_data(
                self.envoy,
                module_buffer(data),
                end_stream,
            )
        }
    }

    fn send_trailers(&mut self, trailers: &[Header]) {
        let abi = as_abi(trailers);
        unsafe {
            envoy_dynamic_module_callback_http_send_response_trailers(
                self.envoy,
                abi.as_ptr(),
                abi.len(),
            )
        }
    }

    fn wake_at(&mut self, at_ms: u64) {
        if self.scheduler.is_none() {
            *self.scheduler = Scheduler::new(self.envoy);
        }
        match self.scheduler.as_ref() {
            Some(s) => timer::wake_at(s, at_ms),
            None => log_error("sluice-relay: no scheduler; the stream's timeouts are off"),
        }
    }

    fn note(&mut self, cause: &str, attempts: u32) {
        let ns = module_buffer(METADATA_NAMESPACE.as_bytes());
        unsafe {
            envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
                self.envoy,
                ns,
                module_buffer(b"cause"),
                module_buffer(cause.as_bytes()),
            );
            envoy_dynamic_module_callback_http_set_dynamic_metadata_number(
                self.envoy,
                ns,
                module_buffer(b"attempts"),
                f64::from(attempts),
            );
        }
    }
}

/// An event that arrived while the filter was busy in a call to Envoy.
enum Deferred {
    Headers(u64, Vec<Header>, bool),
    Data(u64, Vec<u8>, bool),
    Trailers(u64, Vec<Header>),
    Complete(u64),
    Reset(u64, ResetReason),
    Wake,
}

struct Filter {
    state: RefCell<State>,
    deferred: RefCell<Vec<Deferred>>,
}

struct State {
    exchange: Exchange,
    scheduler: Option<Arc<Scheduler>>,
    /// The request body as it arrives (the relay sends it whole, and again on a retry).
    body: Vec<u8>,
}

impl Filter {
    /// Runs `f` on the filter's state, or queues `deferred` if a hook of this filter is
    /// already running; then handles whatever was queued meanwhile.
    fn with(
        &self,
        envoy: EnvoyPtr,
        deferred: impl FnOnce() -> Deferred,
        f: impl FnOnce(&mut State, &mut EnvoyHost<'_>),
    ) {
        let Ok(mut state) = self.state.try_borrow_mut() else {
            if let Ok(mut queue) = self.deferred.try_borrow_mut() {
                queue.push(deferred());
            }
            return;
        };
        let state = &mut *state;
        let mut scheduler = state.scheduler.take();
        {
            let mut host = EnvoyHost {
                envoy,
                scheduler: &mut scheduler,
            };
            f(state, &mut host);
            loop {
                let next = match self.deferred.try_borrow_mut() {
                    Ok(mut queue) if !queue.is_empty() => queue.remove(0),
                    _ => break,
                };
                replay(state, &mut host, next);
            }
        }
        state.scheduler = scheduler;
    }
}

fn replay(state: &mut State, host: &mut EnvoyHost<'_>, event: Deferred) {
    let now = timer::now_ms();
    let ex = &mut state.exchange;
    match event {
        Deferred::Headers(id, headers, end) => ex.on_stream_headers(host, id, &headers, end, now),
        Deferred::Data(id, data, end) => ex.on_stream_data(host, id, &[&data], end, now),
        Deferred::Trailers(id, trailers) => ex.on_stream_trailers(host, id, &trailers),
        Deferred::Complete(id) => ex.on_stream_complete(host, id),
        Deferred::Reset(id, reason) => ex.on_stream_reset(host, id, reason, now),
        Deferred::Wake => ex.on_timer(host, now),
    }
}

unsafe fn filter<'a>(module: *const c_void) -> Option<&'a Filter> {
    (module as *const Filter).as_ref()
}

// ---- Event hooks ----

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    ABI_VERSION.as_ptr()
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    _config_envoy: EnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    match config::parse(envoy_bytes(config.ptr, config.len)) {
        Ok(parsed) => Box::into_raw(Box::new(Arc::new(parsed))) as *const c_void,
        Err(e) => {
            log_error(&e);
            std::ptr::null()
        }
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    if !config.is_null() {
        drop(Box::from_raw(config as *mut Arc<RelayConfig>));
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    envoy: EnvoyPtr,
) -> *const c_void {
    let Some(config) = (config as *const Arc<RelayConfig>).as_ref() else {
        return std::ptr::null();
    };
    let seed = (envoy as u64) ^ timer::now_ms().rotate_left(32);
    let filter = Filter {
        state: RefCell::new(State {
            exchange: Exchange::new(config.clone(), seed),
            scheduler: None,
            body: Vec::new(),
        }),
        deferred: RefCell::new(Vec::new()),
    };
    Box::into_raw(Box::new(filter)) as *const c_void
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: *const c_void) {
    if !module.is_null() {
        drop(Box::from_raw(module as *mut Filter));
    }
}

/// The request is complete: hand the exchange Sluice's final headers and the body.
fn complete_request(state: &mut State, host: &mut EnvoyHost<'_>) {
    let headers = unsafe { request_headers(host.envoy) };
    let body = std::mem::take(&mut state.body);
    state
        .exchange
        .on_request_complete(host, headers, body, timer::now_ms());
}

unsafe fn request_headers(envoy: EnvoyPtr) -> Vec<Header> {
    let count = envoy_dynamic_module_callback_http_get_headers_size(envoy, REQUEST_HEADERS);
    let mut raw = vec![
        HttpHeader {
            key: std::ptr::null(),
            key_len: 0,
            value: std::ptr::null(),
            value_len: 0,
        };
        count
    ];
    if count == 0
        || !envoy_dynamic_module_callback_http_get_headers(envoy, REQUEST_HEADERS, raw.as_mut_ptr())
    {
        return Vec::new();
    }
    copy_headers(raw.as_ptr(), count)
}

/// A request header's first value, valid during the current hook.
unsafe fn request_header<'a>(envoy: EnvoyPtr, name: &str) -> Option<&'a [u8]> {
    let mut value = EnvoyBuffer::EMPTY;
    let found = envoy_dynamic_module_callback_http_get_header(
        envoy,
        REQUEST_HEADERS,
        module_buffer(name.as_bytes()),
        &mut value,
        0,
        std::ptr::null_mut(),
    );
    (found && !value.ptr.is_null()).then(|| envoy_bytes(value.ptr, value.len))
}

/// A chain of clusters goes to the dynamic metadata, where the route's cluster specifier
/// still finds it on the router's retries (the route removes the header).
unsafe fn keep_chain(envoy: EnvoyPtr) {
    let header = request_header(envoy, sluice::headers::CLUSTER_HEADER);
    if let Some(chain) = header.and_then(chain::route_metadata) {
        envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
            envoy,
            module_buffer(chain::METADATA_NAMESPACE.as_bytes()),
            module_buffer(chain::METADATA_KEY.as_bytes()),
            module_buffer(chain),
        );
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: EnvoyPtr,
    module: *const c_void,
    end_of_stream: bool,
) -> u32 {
    let Some(f) = filter(module) else {
        return CONTINUE;
    };
    keep_chain(envoy);
    let marker = request_header(envoy, sluice::headers::RELAY_HEADER).map(<[u8]>::to_vec);
    let mut verdict = HeadersVerdict::Pass;
    f.with(
        envoy,
        || Deferred::Wake,
        |state, host| {
            verdict = state
                .exchange
                .on_request_headers(marker.as_deref(), timer::now_ms());
            if verdict == HeadersVerdict::Take && end_of_stream {
                complete_request(state, host);
            }
        },
    );
    match verdict {
        HeadersVerdict::Pass => CONTINUE,
        HeadersVerdict::Take => STOP_ITERATION,
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: EnvoyPtr,
    module: *const c_void,
    end_of_stream: bool,
) -> u32 {
    let Some(f) = filter(module) else {
        return CONTINUE;
    };
    let mut taken = false;
    f.with(
        envoy,
        || Deferred::Wake,
        |state, host| {
            taken = state.exchange.is_taken();
            if !taken {
                return;
            }
            // Each frame is copied and dropped from Envoy's buffers: the relay keeps the
            // one copy it sends (and resends on a retry).
            let count = envoy_dynamic_module_callback_http_get_body_chunks_size(
                envoy,
                RECEIVED_REQUEST_BODY,
            );
            let mut chunks = vec![
                EnvoyBuffer {
                    ptr: std::ptr::null(),
                    len: 0
                };
                count
            ];
            if count > 0
                && envoy_dynamic_module_callback_http_get_body_chunks(
                    envoy,
                    RECEIVED_REQUEST_BODY,
                    chunks.as_mut_ptr(),
                )
            {
                for c in &chunks {
                    state.body.extend_from_slice(envoy_bytes(c.ptr, c.len));
                }
            }
            if end_of_stream {
                complete_request(state, host);
            }
        },
    );
    if taken {
        STOP_ITERATION_NO_BUFFER
    } else {
        CONTINUE
    }
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    envoy: EnvoyPtr,
    module: *const c_void,
) -> u32 {
    let Some(f) = filter(module) else {
        return CONTINUE;
    };
    let mut taken = false;
    f.with(
        envoy,
        || Deferred::Wake,
        |state, host| {
            taken = state.exchange.is_taken();
            // Trailers end the request (Envoy's gzip decompressor adds two); they are not
            // forwarded, as Sluice drops them too.
            if taken {
                complete_request(state, host);
            }
        },
    );
    if taken {
        STOP_ITERATION
    } else {
        CONTINUE
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _envoy: EnvoyPtr,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _envoy: EnvoyPtr,
    _module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _envoy: EnvoyPtr,
    _module: *const c_void,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    envoy: EnvoyPtr,
    module: *const c_void,
) {
    if let Some(f) = filter(module) {
        f.with(
            envoy,
            || Deferred::Wake,
            |state, host| state.exchange.on_downstream_gone(host),
        );
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _envoy: EnvoyPtr,
    _module: *const c_void,
    _status: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    envoy: EnvoyPtr,
    module: *const c_void,
    stream: u64,
    headers: *const HttpHeader,
    count: usize,
    end_stream: bool,
) {
    let Some(f) = filter(module) else { return };
    let copied = copy_headers(headers, count);
    let deferred = copied.clone();
    f.with(
        envoy,
        || Deferred::Headers(stream, deferred, end_stream),
        |state, host| {
            state
                .exchange
                .on_stream_headers(host, stream, &copied, end_stream, timer::now_ms())
        },
    );
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    envoy: EnvoyPtr,
    module: *const c_void,
    stream: u64,
    data: *const EnvoyBuffer,
    count: usize,
    end_stream: bool,
) {
    let Some(f) = filter(module) else { return };
    let buffers: &[EnvoyBuffer] = if data.is_null() {
        &[]
    } else {
        std::slice::from_raw_parts(data, count)
    };
    let chunks: Vec<&[u8]> = buffers.iter().map(|b| envoy_bytes(b.ptr, b.len)).collect();
    f.with(
        envoy,
        || Deferred::Data(stream, chunks.concat(), end_stream),
        |state, host| {
            state
                .exchange
                .on_stream_data(host, stream, &chunks, end_stream, timer::now_ms())
        },
    );
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    envoy: EnvoyPtr,
    module: *const c_void,
    stream: u64,
    trailers: *const HttpHeader,
    count: usize,
) {
    let Some(f) = filter(module) else { return };
    let copied = copy_headers(trailers, count);
    let deferred = copied.clone();
    f.with(
        envoy,
        || Deferred::Trailers(stream, deferred),
        |state, host| state.exchange.on_stream_trailers(host, stream, &copied),
    );
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    envoy: EnvoyPtr,
    module: *const c_void,
    stream: u64,
) {
    let Some(f) = filter(module) else { return };
    f.with(
        envoy,
        || Deferred::Complete(stream),
        |state, host| state.exchange.on_stream_complete(host, stream),
    );
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    envoy: EnvoyPtr,
    module: *const c_void,
    stream: u64,
    reason: u32,
) {
    let Some(f) = filter(module) else { return };
    let reason = ResetReason::from_abi(reason);
    f.with(
        envoy,
        || Deferred::Reset(stream, reason),
        |state, host| {
            state
                .exchange
                .on_stream_reset(host, stream, reason, timer::now_ms())
        },
    );
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    envoy: EnvoyPtr,
    module: *const c_void,
    _event: u64,
) {
    let Some(f) = filter(module) else { return };
    f.with(
        envoy,
        || Deferred::Wake,
        |state, host| state.exchange.on_timer(host, timer::now_ms()),
    );
}

// Hooks Envoy requires of every HTTP filter module, unused by the relay.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _envoy: EnvoyPtr,
    _module: *const c_void,
    _callout: u64,
    _result: u32,
    _headers: *const HttpHeader,
    _headers_count: usize,
    _body: *const EnvoyBuffer,
    _body_count: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: EnvoyPtr,
    _module: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: EnvoyPtr,
    _module: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    // No per-route configuration: refused, so a route that sets one fails loudly.
    std::ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}
