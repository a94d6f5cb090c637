//! The global response cache: a tenant's entries, their fill locks and the bookkeeping of
//! its byte cap, all under the tenant's hash tag (`sluice:{t:<tenant>}:cache:...`), so each
//! call is one script in one hash slot, on a single Redis or a Redis Cluster alike. Entries
//! are opaque bytes (`sluice::cache::entry`): the service stores and returns them as sent.

use super::reply::{self, Looked};
use super::{checks, Engine, Error};
use sluice::global::wire::{CacheLookup, CacheRelease, CacheStoreHeader, CacheStored};
use sluice::shared::keys::{cache_entry, cache_tenant};
use std::time::{Duration, Instant};

/// How often a lookup waiting on another call's fill asks Redis again.
const POLL: Duration = Duration::from_millis(20);

/// A lookup's answer (the first byte of the reply is `sluice::global::wire::cache_answer`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheAnswer {
    /// Found: the entry's bytes, as stored.
    Hit(Vec<u8>),
    /// Not found, and the caller now holds the fill lock.
    Fill,
    /// Not found, and another call still held the fill lock when the wait ran out.
    Busy,
}

/// The fill lock of an entry key.
fn fill_lock(entry: &str) -> String {
    format!("{entry}:fill")
}

fn check_key(tenant: &str, key: &str) -> Result<(), Error> {
    checks::tenant(tenant, "tenant")?;
    checks::cache_key(key, "key")
}

impl Engine {
    /// Looks `lookup.key` up for its tenant. While another call holds its fill lock, asks
    /// again every [`POLL`] (the wait is here, not in Redis, and not in Envoy: one call per
    /// lookup) until the entry is stored, the lock is released or expires (then this call
    /// takes it), or `wait_ms` after `arrived`.
    pub async fn cache_lookup(
        &self,
        lookup: &CacheLookup,
        arrived: Instant,
    ) -> Result<CacheAnswer, Error> {
        check_key(&lookup.tenant, &lookup.key)?;
        let max = checks::MAX_CACHE_WAIT_MS;
        let fill_ms = checks::ms_between(lookup.fill_ms, 1, max, "fill_ms")?;
        let wait_ms = checks::ms_between(lookup.wait_ms, 0, max, "wait_ms")?;
        let deadline = arrived + Duration::from_millis(wait_ms);
        let entry = cache_entry(&lookup.tenant, &lookup.key);
        let mut call = self.scripts.cache_lookup.prepare_invoke();
        call.key(&entry).key(fill_lock(&entry)).arg(fill_ms);
        loop {
            match reply::cache_lookup(self.run(&call).await?)? {
                Looked::Hit(bytes) => return Ok(CacheAnswer::Hit(bytes)),
                Looked::Fill => return Ok(CacheAnswer::Fill),
                Looked::Busy => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(CacheAnswer::Busy);
            }
            // The last look is at the deadline, never after it.
            tokio::time::sleep(POLL.min(deadline - now)).await;
        }
    }

    /// Stores `bytes` under `header.key` for `header.ttl_ms`, in place of its fill lock,
    /// evicting the tenant's entries closest to expiry while its total would be over
    /// `tenant_max_bytes`. An entry alone over the cap is not stored (the lock goes anyway).
    pub async fn cache_store(
        &self,
        header: &CacheStoreHeader,
        bytes: &[u8],
    ) -> Result<CacheStored, Error> {
        check_key(&header.tenant, &header.key)?;
        checks::ms_between(header.ttl_ms, 1, checks::MAX_CACHE_TTL_MS, "ttl_ms")?;
        checks::exact(header.tenant_max_bytes, "tenant_max_bytes")?;
        if bytes.is_empty() {
            return Err(Error::BadRequest(
                "body: no entry bytes after the header line".into(),
            ));
        }
        let tenant = &header.tenant;
        let entry = cache_entry(tenant, &header.key);
        let mut call = self.scripts.cache_store.prepare_invoke();
        call.key(&entry)
            .key(fill_lock(&entry))
            .key(cache_tenant(tenant, "index"))
            .key(cache_tenant(tenant, "sizes"))
            .key(cache_tenant(tenant, "bytes"));
        call.arg(&header.key)
            .arg(header.ttl_ms)
            .arg(header.tenant_max_bytes)
            .arg(cache_entry(tenant, ""))
            .arg(bytes);
        reply::cache_store(self.run(&call).await?)
    }

    /// Deletes `release.key`'s fill lock; whether there was one.
    pub async fn cache_release(&self, release: &CacheRelease) -> Result<bool, Error> {
        check_key(&release.tenant, &release.key)?;
        let mut call = self.scripts.cache_release.prepare_invoke();
        call.key(fill_lock(&cache_entry(&release.tenant, &release.key)));
        reply::cache_release(self.run(&call).await?)
    }
}
