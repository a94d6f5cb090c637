//! State shared by every Envoy worker: the [`Store`] it lives in (Envoy shared data in the
//! wasm build, [`MemoryStore`] natively), the one compare-and-set loop over it, the value
//! codec, and the keyspace. The limits and fairness engines are built on these; a second
//! store (Redis, through the quota service) plugs in behind the same engine interfaces.

mod cas;
pub(crate) mod codec;
pub mod keys;
mod store;
#[cfg(test)]
pub(crate) mod testing;

pub(crate) use cas::{cas_update, Change};
pub use cas::{CasFailure, CREATE_CAS, GIVE_BACK_ATTEMPTS, TAKE_ATTEMPTS};
pub use store::{MemoryStore, Store, StoreError};
