//! The response cache: exact-match, per tenant, with single flight.
//!
//! A request's key is the SHA-256 of its tenant, its resolved model, its endpoint and the
//! canonical form of its body ([`request`]), so two tenants can never share an entry
//! whatever they send. While one request fetches a key, identical requests wait for its
//! response instead of all going upstream (single flight), for at most the rule's
//! `wait_ms`.
//!
//! Two stores behind one [`Lookup`]: a fixed table of shared-data slots in this Envoy
//! ([`local`]: bounded memory, entries overwritten on collision or expiry), or Redis
//! through the quota service (`global::wire`'s cache calls), shared by every replica. Both
//! keep the same bytes ([`entry`]).

pub mod entry;
pub mod local;
pub mod request;
pub mod waiters;

pub use entry::Entry;

/// SHA-256 of what makes two requests the same ([`request::key`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey(pub [u8; 32]);

impl CacheKey {
    /// Lowercase hex: the key's name at the quota service and in Redis.
    pub fn hex(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(64);
        for byte in self.0 {
            let _ = write!(out, "{byte:02x}");
        }
        out
    }

    pub fn from_hex(hex: &str) -> Option<CacheKey> {
        if hex.len() != 64 {
            return None;
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(CacheKey(key))
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({})", self.hex().get(..12).unwrap_or_default())
    }
}

/// What the cache did for a request: the `x-sluice-cache` header, the usage record's
/// `cache` and the `sluice_cache_requests_total` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CacheOutcome {
    /// Answered from the cache; the provider never saw it.
    Hit,
    /// Sent upstream (and stored if it came back complete).
    Miss,
    /// Sent upstream without reading or writing the cache: the client asked
    /// (`cache-control: no-store`), or the request is not cacheable (sampled, `n > 1`,
    /// server-side tools).
    Bypass,
}

impl CacheOutcome {
    pub const ALL: [CacheOutcome; 3] =
        [CacheOutcome::Hit, CacheOutcome::Miss, CacheOutcome::Bypass];

    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypass => "bypass",
        }
    }
}

/// A tier's (or tenant's) cache settings, compiled.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheRule {
    /// Models whose responses are cached, by model id.
    pub models: Vec<bool>,
    pub ttl_ms: u64,
    /// Largest response stored (body and content type).
    pub max_entry_bytes: u64,
    /// Requests sampled above this temperature are not cached (a request without one is
    /// sampled at the API's default, 1).
    pub max_temperature: f64,
    /// Share of a miss's price a hit is charged, to limits and budget, in millionths
    /// (0: free).
    pub hit_price_ppm: u64,
    /// Longest an identical request waits for the one fetching its key.
    pub wait_ms: u64,
}

/// Where the cache lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStore {
    /// This Envoy's shared data: `slots` fixed keys.
    Local { slots: u32 },
    /// Redis, through the quota service (the `global` section), shared by every replica;
    /// at most `tenant_max_bytes` of entries per tenant.
    Global { tenant_max_bytes: u64 },
}

/// What a cache lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit(Entry),
    /// Nobody is fetching it: this request does, and holds the key until it stores the
    /// response or gives up.
    Fill,
    /// An identical request is fetching it (local store only: the quota service waits for
    /// the fill itself before it answers).
    Filling,
    /// The cache cannot serve this key now (its slot is another key's fill in progress,
    /// the wait ran out, the store failed): go upstream, store nothing.
    Unavailable,
}

/// Charged share of `amount` at `ppm` millionths, rounded to nearest.
pub fn charge(amount: u64, ppm: u64) -> u64 {
    let charged = (u128::from(amount) * u128::from(ppm) + 500_000) / 1_000_000;
    u64::try_from(charged).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_print_and_parse_as_hex() {
        let key = CacheKey([0xab; 32]);
        assert_eq!(key.hex().len(), 64);
        assert!(key.hex().starts_with("abab"));
        assert_eq!(CacheKey::from_hex(&key.hex()), Some(key));
        assert_eq!(CacheKey::from_hex("ab"), None);
        assert_eq!(CacheKey::from_hex(&"zz".repeat(32)), None);
    }

    #[test]
    fn charges_round_to_nearest() {
        assert_eq!(charge(1000, 0), 0);
        assert_eq!(charge(1000, 1_000_000), 1000);
        assert_eq!(charge(1000, 250_000), 250);
        assert_eq!(charge(3, 500_000), 2);
        assert_eq!(charge(u64::MAX, 1_000_000), u64::MAX);
    }
}
