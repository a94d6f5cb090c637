//! Global limits: the ones a configuration's `global` section moves from this Envoy's
//! shared data to Redis, reached through the stateless quota service (`quota/`).

pub mod wire;
