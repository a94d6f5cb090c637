//! Sluice: a multi-tenant LLM gateway that runs inside Envoy as a Proxy-Wasm filter.
//!
//! Everything except [`host`] is plain Rust, compiled and tested natively. The host
//! layer is the only code that talks to Envoy, and only exists in the wasm build.

pub mod accounting;
pub mod admission;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod cors;
pub mod errors;
pub mod fairness;
pub mod fallback;
pub mod global;
pub mod headers;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod routing;
pub mod shared;
pub mod usage;
#[cfg(feature = "vm-bench")]
pub mod vm_bench;

#[cfg(target_arch = "wasm32")]
mod host;
