//! Whole-system tests: real Envoy, the real `sluice.wasm`, mock providers, real clients.
//! Each test starts its own gateway on free ports, so tests are independent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;
mod limits;

mod auth;
mod cache;
mod clients;
mod config;
mod conventions;
mod deploy;
mod fairness;
mod fallback;
mod global;
mod hardening;
mod production;
mod relay;
mod routing;
mod sdk;
mod streaming;
mod usage;
