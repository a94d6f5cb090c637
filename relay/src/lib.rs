//! Sluice's stream relay: a native Envoy dynamic module placed after Sluice's Proxy-Wasm
//! filter. For the streamed requests Sluice marks (`x-sluice-relay`), it makes the provider
//! call itself and relays the response, so that a provider failing after the response
//! started ends the client's stream with an error event in its API's shape instead of a
//! transport error. Every other request passes to Envoy's router untouched.
//!
//! `exchange` decides (plain Rust, tested natively); `host` translates Envoy's ABI;
//! `timer` wakes filters after a delay, which the ABI has no call for.

pub mod chain;
pub mod config;
pub mod exchange;
#[cfg(not(test))]
mod host;
#[cfg(not(test))]
mod specifier;
#[cfg(not(test))]
mod timer;
