//! What the cache stores, in the shared codec (`shared/codec.rs`): the same bytes sit in a
//! shared-data slot (local store) and in a Redis string (global store, where the quota
//! service keeps them without reading them).
//!
//! ```text
//! tag `E` (an entry):  key [32] · stored_at_ms u64 · expires_at_ms u64
//!                      · content-type length u16 · content-type · body
//! tag `F` (a fill):    key [32] · until_ms u64     (local slots only: who is fetching)
//! ```

use super::CacheKey;
use crate::shared::codec::{decode, Writer};

/// Value tags of the cache (beside the limits' tags in `shared/keys.rs`).
pub(crate) mod tag {
    /// A stored response.
    pub const ENTRY: u8 = b'E';
    /// A slot held by the request fetching its key.
    pub const FILL: u8 = b'F';
}

/// A complete 200 response, as it came from the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: CacheKey,
    pub stored_at_ms: u64,
    pub expires_at_ms: u64,
    /// The provider's `content-type` (`application/json`, `text/event-stream`).
    pub content_type: String,
    /// The body as the provider sent it: for a chat stream, with its usage chunk.
    pub body: Vec<u8>,
}

/// Bytes of an entry besides its body and content type.
pub const ENTRY_OVERHEAD: usize = 2 + 32 + 8 + 8 + 2;

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        let content_type = self.content_type.as_bytes();
        let len = ENTRY_OVERHEAD + content_type.len() + self.body.len();
        let ct_len = u16::try_from(content_type.len()).unwrap_or(0);
        let content_type = content_type.get(..usize::from(ct_len)).unwrap_or_default();
        Writer::new(tag::ENTRY, len)
            .slice(&self.key.0)
            .u64(self.stored_at_ms)
            .u64(self.expires_at_ms)
            .u16(ct_len)
            .slice(content_type)
            .slice(&self.body)
            .finish()
    }

    pub fn decode(value: &[u8]) -> Option<Entry> {
        decode(value, tag::ENTRY, |r| {
            let key = CacheKey(r.bytes::<32>()?);
            let stored_at_ms = r.u64()?;
            let expires_at_ms = r.u64()?;
            let ct_len = r.u16()?;
            let content_type = std::str::from_utf8(r.slice(usize::from(ct_len))?).ok()?;
            Some(Entry {
                key,
                stored_at_ms,
                expires_at_ms,
                content_type: content_type.to_string(),
                body: r.rest().to_vec(),
            })
        })
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        now_ms < self.expires_at_ms
    }

    /// Whole seconds since it was stored (the `age` header).
    pub fn age_s(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }
}

/// A local slot held by the request fetching `key`, until `until_ms` (then anyone may
/// take the slot: its holder died or took too long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub key: CacheKey,
    pub until_ms: u64,
}

impl Fill {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new(tag::FILL, 2 + 32 + 8)
            .slice(&self.key.0)
            .u64(self.until_ms)
            .finish()
    }

    pub fn decode(value: &[u8]) -> Option<Fill> {
        decode(value, tag::FILL, |r| {
            Some(Fill {
                key: CacheKey(r.bytes::<32>()?),
                until_ms: r.u64()?,
            })
        })
    }
}

/// What a local slot holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Slot {
    Entry(Entry),
    Fill(Fill),
    /// Never written, or nothing this version can read: free.
    Empty,
}

impl Slot {
    pub fn decode(value: Option<&[u8]>) -> Slot {
        let Some(value) = value else {
            return Slot::Empty;
        };
        match value.get(1) {
            Some(&tag::ENTRY) => Entry::decode(value).map_or(Slot::Empty, Slot::Entry),
            Some(&tag::FILL) => Fill::decode(value).map_or(Slot::Empty, Slot::Fill),
            _ => Slot::Empty,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        Entry {
            key: CacheKey([7; 32]),
            stored_at_ms: 1_000,
            expires_at_ms: 61_000,
            content_type: "text/event-stream".into(),
            body: b"data: {}\n\ndata: [DONE]\n\n".to_vec(),
        }
    }

    #[test]
    fn entries_and_fills_round_trip() {
        let e = entry();
        let bytes = e.encode();
        assert_eq!(bytes.len(), ENTRY_OVERHEAD + 17 + e.body.len());
        assert_eq!(Entry::decode(&bytes), Some(e.clone()));
        assert_eq!(Slot::decode(Some(&bytes)), Slot::Entry(e.clone()));
        let fill = Fill {
            key: CacheKey([1; 32]),
            until_ms: 9,
        };
        assert_eq!(Slot::decode(Some(&fill.encode())), Slot::Fill(fill));
        assert_eq!(Slot::decode(None), Slot::Empty);
        // A fill is not an entry, a truncated entry is nothing.
        assert_eq!(Entry::decode(&fill.encode()), None);
        assert_eq!(Slot::decode(Some(&bytes[..40])), Slot::Empty);
        assert_eq!(Slot::decode(Some(b"\x01R")), Slot::Empty);
    }

    #[test]
    fn an_empty_body_is_an_entry() {
        let e = Entry {
            body: Vec::new(),
            ..entry()
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e));
    }

    #[test]
    fn freshness_and_age() {
        let e = entry();
        assert!(e.is_fresh(60_999));
        assert!(!e.is_fresh(61_000));
        assert_eq!(e.age_s(3_500), 2);
        assert_eq!(e.age_s(0), 0);
    }
}
