//! Envoy shared data as the limits engine's [`Store`]: one map per `vm_id`, shared by
//! every worker's VM, with compare-and-set.

use crate::shared::{Store, StoreError};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::cell::Cell;

pub struct SharedData;

thread_local! {
    /// Compare-and-set writes this VM lost to another worker since the last
    /// [`take_cas_retries`]: each one is a retry (or, past the attempts, a `Contended`).
    static CAS_MISMATCHES: Cell<u64> = const { Cell::new(0) };
}

/// Lost compare-and-set writes since the last call, for the contention counter.
pub fn take_cas_retries() -> u64 {
    CAS_MISMATCHES.with(|n| n.replace(0))
}

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Ok(Some((value, cas))),
            Ok(_) => Ok(None),
            Err(status) => Err(StoreError::Host(format!("get_shared_data: {status:?}"))),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = (cas != 0).then_some(cas);
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => {
                CAS_MISMATCHES.with(|n| n.set(n.get() + 1));
                Err(StoreError::CasMismatch)
            }
            Err(status) => Err(StoreError::Host(format!("set_shared_data: {status:?}"))),
        }
    }
}
