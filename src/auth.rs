//! Tenant authentication: which key the client presented, and whose it is.
//!
//! Keys are stored only as SHA-256 digests. A lookup hashes the presented key and finds
//! the digest in a hash map whose hash is the digest's own first 8 bytes. Timing depends
//! only on the digest of the presented key, never on how many characters of a real key it
//! shares, and the final digest comparison is constant-time.

use crate::errors::{ApiError, ErrorKind};
use crate::headers::RequestHeaders;
use crate::policy::{KeyId, TenantId};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Longest key we hash; longer ones are refused without work proportional to their size.
pub const MAX_KEY_BYTES: usize = 256;

#[derive(Clone, Copy, Debug, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &[u8]) -> Self {
        KeyDigest(Sha256::digest(key).into())
    }

    pub fn from_hex(hex: &str) -> Option<Self> {
        let bytes = hex.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hi = hex_val(*pair.first()?)?;
            let lo = hex_val(*pair.get(1)?)?;
            *slot = hi << 4 | lo;
        }
        Some(KeyDigest(out))
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time: no early exit on the first differing byte.
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// SHA-256 output is already uniform; hashing it again would only cost time.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached through `write_u64` above; fold anything else in defensively.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Which tenant and which of its keys a digest belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOwner {
    pub tenant: TenantId,
    pub key: KeyId,
}

#[derive(Debug, Default)]
pub struct KeyIndex {
    map: HashMap<KeyDigest, KeyOwner, BuildHasherDefault<DigestHasher>>,
}

impl KeyIndex {
    /// Returns false if the digest is already taken.
    pub fn insert(&mut self, digest: KeyDigest, tenant: TenantId, key: KeyId) -> bool {
        if self.map.contains_key(&digest) {
            return false;
        }
        self.map.insert(digest, KeyOwner { tenant, key });
        true
    }

    pub fn lookup(&self, key: &[u8]) -> Option<KeyOwner> {
        self.map.get(&KeyDigest::of(key)).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Where a client may put its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPlacement {
    /// `Authorization: Bearer` only (OpenAI paths).
    Bearer,
    /// `x-api-key` or `Authorization: Bearer` (Anthropic paths, model listing).
    BearerOrApiKey,
}

/// The key the client presented, or the 401 to answer.
pub fn presented_key(headers: &RequestHeaders, placement: KeyPlacement) -> Result<&[u8], ApiError> {
    let invalid = |msg: &str| ApiError::new(ErrorKind::InvalidApiKey, msg);
    let bearer = match single_header(headers, "authorization")? {
        Some(v) => Some(parse_bearer(v).ok_or_else(|| {
            invalid("The Authorization header must use the Bearer scheme: `Authorization: Bearer <key>`.")
        })?),
        None => None,
    };
    let api_key = match placement {
        KeyPlacement::BearerOrApiKey => single_header(headers, "x-api-key")?,
        KeyPlacement::Bearer => None,
    };

    let key = match (bearer, api_key) {
        (Some(b), Some(k)) if b != k => {
            return Err(invalid("The x-api-key and Authorization headers carry different keys; send one."))
        }
        (Some(b), _) => b,
        (None, Some(k)) => k,
        (None, None) => {
            return Err(invalid(match placement {
                KeyPlacement::Bearer => {
                    "You didn't provide an API key. Provide your key in an Authorization header using Bearer auth (Authorization: Bearer YOUR_KEY)."
                }
                KeyPlacement::BearerOrApiKey => {
                    "You didn't provide an API key. Provide your key in the x-api-key header."
                }
            }))
        }
    };
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(invalid("Incorrect API key provided."));
    }
    Ok(key)
}

/// The header's value if sent once; two copies are ambiguous, so refused.
fn single_header<'h>(
    headers: &'h RequestHeaders,
    name: &'static str,
) -> Result<Option<&'h [u8]>, ApiError> {
    let mut values = headers.all(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::new(
            ErrorKind::InvalidApiKey,
            format!("Multiple {name} headers were sent; send exactly one."),
        ));
    }
    Ok(first)
}

fn parse_bearer(value: &[u8]) -> Option<&[u8]> {
    let scheme = value.get(..7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let rest = value.get(7..)?;
    let start = rest.iter().position(|&b| b != b' ')?;
    let token = rest.get(start..)?;
    let end = token.iter().rposition(|&b| b != b' ' && b != b'\t')?;
    token.get(..=end)
}

pub fn sha256_hex(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> RequestHeaders {
        RequestHeaders::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn digest_hex_round_trip() {
        let hex = sha256_hex("sk-sluice-demo-acme");
        assert_eq!(
            KeyDigest::from_hex(&hex),
            Some(KeyDigest::of(b"sk-sluice-demo-acme"))
        );
        assert_eq!(
            KeyDigest::from_hex(&hex.to_uppercase()),
            Some(KeyDigest::of(b"sk-sluice-demo-acme"))
        );
        assert_eq!(KeyDigest::from_hex("zz"), None);
        assert_eq!(KeyDigest::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn known_sha256_vector() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn lookup_finds_only_exact_keys() {
        let mut idx = KeyIndex::default();
        let (t, k) = (TenantId::new, KeyId::new);
        assert!(idx.insert(KeyDigest::of(b"sk-a"), t(0), k(0)));
        assert!(idx.insert(KeyDigest::of(b"sk-b"), t(1), k(0)));
        assert!(!idx.insert(KeyDigest::of(b"sk-a"), t(2), k(0)));
        let owner = KeyOwner {
            tenant: t(1),
            key: k(0),
        };
        assert_eq!(idx.lookup(b"sk-b"), Some(owner));
        assert_eq!(idx.lookup(b"sk-"), None);
        assert_eq!(idx.lookup(b"sk-aa"), None);
    }

    #[test]
    fn bearer_parsing() {
        let h = headers(&[("authorization", "Bearer sk-1")]);
        assert_eq!(presented_key(&h, KeyPlacement::Bearer).unwrap(), b"sk-1");
        let h = headers(&[("authorization", "bearer   sk-1  ")]);
        assert_eq!(presented_key(&h, KeyPlacement::Bearer).unwrap(), b"sk-1");
        for bad in ["Basic abc", "Bearer", "Bearer ", "sk-1"] {
            let h = headers(&[("authorization", bad)]);
            assert_eq!(
                presented_key(&h, KeyPlacement::Bearer).unwrap_err().kind,
                ErrorKind::InvalidApiKey,
                "{bad}"
            );
        }
    }

    #[test]
    fn x_api_key_only_where_allowed() {
        let h = headers(&[("x-api-key", "sk-1")]);
        assert!(presented_key(&h, KeyPlacement::Bearer).is_err());
        assert_eq!(
            presented_key(&h, KeyPlacement::BearerOrApiKey).unwrap(),
            b"sk-1"
        );
    }

    #[test]
    fn ambiguous_credentials_are_refused() {
        let h = headers(&[("authorization", "Bearer a"), ("authorization", "Bearer a")]);
        assert!(presented_key(&h, KeyPlacement::Bearer).is_err());
        let h = headers(&[("x-api-key", "a"), ("x-api-key", "b")]);
        assert!(presented_key(&h, KeyPlacement::BearerOrApiKey).is_err());
        let h = headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]);
        assert!(presented_key(&h, KeyPlacement::BearerOrApiKey).is_err());
        let h = headers(&[("authorization", "Bearer a"), ("x-api-key", "a")]);
        assert_eq!(
            presented_key(&h, KeyPlacement::BearerOrApiKey).unwrap(),
            b"a"
        );
    }

    #[test]
    fn missing_and_oversized_keys() {
        assert!(presented_key(&headers(&[]), KeyPlacement::Bearer).is_err());
        let long = format!("Bearer {}", "k".repeat(MAX_KEY_BYTES + 1));
        assert!(
            presented_key(&headers(&[("authorization", &long)]), KeyPlacement::Bearer).is_err()
        );
    }
}
