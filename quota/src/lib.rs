//! `sluice-quota`: the stateless service between Sluice's filter (which can only make HTTP
//! callouts from Envoy) and Redis, where global limits live. Each operation is one Redis
//! script, so decisions are atomic and use Redis's clock; the service keeps no counters,
//! and any number of copies may run.

pub mod cli;
pub mod engine;
pub mod http;

pub use engine::{system_clock, Engine, Error};
