//! The one compare-and-set loop every shared value goes through.
//!
//! Creating a key is the trap: Envoy ignores the cas of a `set` on a missing key, so two
//! workers that both read "missing" would both create it and one update would be lost.
//! Missing keys are created with cas [`CREATE_CAS`] instead: if another worker created the
//! key meanwhile, its cas is almost surely not `u32::MAX`, our `set` fails with
//! `CasMismatch`, and we re-read. (It fails to protect only if the other worker's write
//! happened to draw cas `u32::MAX` from Envoy's process-wide counter in that window: once
//! per 2^32 writes, in a window of microseconds.)

use super::store::{Store, StoreError};

/// The cas that creates a missing key yet fails if another worker created it first.
pub const CREATE_CAS: u32 = u32::MAX;
/// Attempts to take something (a limit, a queue place, a claim) before giving up: the
/// caller refuses the request as busy, which is safe.
pub const TAKE_ATTEMPTS: u32 = 64;
/// Attempts to give something back (a settlement, a release, a cancellation), which must
/// not be lost: a lost release leaks a slot forever, so these try much harder.
pub const GIVE_BACK_ATTEMPTS: u32 = 1024;

/// What a compare-and-set update does with the value it read.
pub(crate) enum Change<T> {
    Write(Vec<u8>, T),
    Keep(T),
}

/// Why a compare-and-set update gave up. Nothing was changed either way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasFailure {
    /// Every attempt met a concurrent writer.
    Contended,
    Host(String),
}

impl From<CasFailure> for StoreError {
    fn from(failure: CasFailure) -> Self {
        match failure {
            CasFailure::Contended => StoreError::CasMismatch,
            CasFailure::Host(message) => StoreError::Host(message),
        }
    }
}

/// The compare-and-set loop every shared counter uses: read, `apply`, write with the cas
/// read (or `create_cas` for a missing key, so a concurrent creation fails instead of
/// being overwritten), retry on `CasMismatch`, at most `attempts` times.
pub(crate) fn cas_update<S: Store + ?Sized, T>(
    store: &S,
    key: &str,
    create_cas: u32,
    attempts: u32,
    mut apply: impl FnMut(Option<&[u8]>) -> Change<T>,
) -> Result<T, CasFailure> {
    for _ in 0..attempts {
        let (stored, cas) = match store.get(key) {
            Ok(Some((value, cas))) => (Some(value), cas),
            Ok(None) => (None, create_cas),
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Host(message)) => return Err(CasFailure::Host(message)),
        };
        match apply(stored.as_deref()) {
            Change::Keep(result) => return Ok(result),
            Change::Write(value, result) => match store.set(key, &value, cas) {
                Ok(()) => return Ok(result),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Host(message)) => return Err(CasFailure::Host(message)),
            },
        }
    }
    Err(CasFailure::Contended)
}
