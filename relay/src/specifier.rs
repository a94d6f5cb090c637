//! The route's cluster specifier (Envoy 1.40's dynamic-module cluster specifier, ABI
//! v0.2.0), in the same module as the relay: it picks each of the router's attempts'
//! cluster from Sluice's chain ([`chain::select`]). Only translates.
//!
//! The route's retry policy sets `refresh_cluster_on_retry`, so Envoy calls `select` for
//! the first attempt and again before each retry. The attempt's number is the stream's
//! attempt count (`upstream.request_attempt_count`), which the router updates before it asks
//! again; the request's `x-envoy-attempt-count` then still holds the previous attempt's number
//! (measured with Envoy 1.40), and a client may send one for the first.

use crate::chain;
use crate::host::{envoy_bytes, log_error, module_buffer, EnvoyBuffer, EnvoyPtr, ModuleBuffer};
use std::ffi::c_void;

extern "C" {
    fn envoy_dynamic_module_callback_cluster_specifier_get_request_header_value(
        context: EnvoyPtr,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        total: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_cluster_specifier_get_dynamic_metadata(
        context: EnvoyPtr,
        namespace: ModuleBuffer,
        path: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_cluster_specifier_get_attribute_int(
        context: EnvoyPtr,
        attribute: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_cluster_specifier_set_cluster_name(
        context: EnvoyPtr,
        name: ModuleBuffer,
    );
}

/// `envoy_dynamic_module_type_attribute_id_UpstreamRequestAttemptCount` in ABI v0.2.0.
const ATTRIBUTE_UPSTREAM_REQUEST_ATTEMPT_COUNT: u32 = 53;

/// The specifier has no state: every configuration shares this one.
static SPECIFIER: u8 = 0;

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_cluster_specifier_config_new(
    _config_envoy: EnvoyPtr,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    match chain::parse_specifier_config(envoy_bytes(config.ptr, config.len)) {
        Ok(()) => (&SPECIFIER as *const u8).cast(),
        Err(e) => {
            log_error(&e);
            std::ptr::null()
        }
    }
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_cluster_specifier_config_destroy(_config: *const c_void) {
}

unsafe fn header<'a>(context: EnvoyPtr, name: &str) -> Option<&'a [u8]> {
    let mut value = EnvoyBuffer::EMPTY;
    let found = envoy_dynamic_module_callback_cluster_specifier_get_request_header_value(
        context,
        module_buffer(name.as_bytes()),
        &mut value,
        0,
        std::ptr::null_mut(),
    );
    (found && !value.ptr.is_null()).then(|| envoy_bytes(value.ptr, value.len))
}

/// `upstream.request_attempt_count`: the stream's attempt count, set by the router before
/// it asks again for a retry.
unsafe fn attempt_count(context: EnvoyPtr) -> Option<u64> {
    let mut count = 0u64;
    envoy_dynamic_module_callback_cluster_specifier_get_attribute_int(
        context,
        ATTRIBUTE_UPSTREAM_REQUEST_ATTEMPT_COUNT,
        &mut count,
    )
    .then_some(count)
}

unsafe fn metadata<'a>(context: EnvoyPtr) -> Option<&'a [u8]> {
    let mut value = EnvoyBuffer::EMPTY;
    let found = envoy_dynamic_module_callback_cluster_specifier_get_dynamic_metadata(
        context,
        module_buffer(chain::METADATA_NAMESPACE.as_bytes()),
        module_buffer(chain::METADATA_KEY.as_bytes()),
        &mut value,
    );
    (found && !value.ptr.is_null()).then(|| envoy_bytes(value.ptr, value.len))
}

#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_cluster_specifier_select(
    _config: *const c_void,
    context: EnvoyPtr,
) -> bool {
    let attempt = chain::attempt_number(attempt_count(context));
    let header = header(context, sluice::headers::CLUSTER_HEADER);
    match chain::select(metadata(context), header, attempt) {
        Some(cluster) => {
            envoy_dynamic_module_callback_cluster_specifier_set_cluster_name(
                context,
                module_buffer(cluster),
            );
            true
        }
        None => false,
    }
}
