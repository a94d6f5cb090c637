//! The stored value format, shared by every limit kind: fixed-size little-endian binary,
//!
//! ```text
//! byte 0     format version (1)
//! byte 1     kind tag: b'R' rate bucket, b'C' concurrency, b'M' monthly
//! bytes 2..  the kind's fields (see bucket.rs and counter.rs)
//! ```
//!
//! A value with another version, tag or length does not decode, and the caller treats it
//! as fresh state rather than failing: a format change or a key reused for another kind
//! must not lock tenants out, and the next successful write replaces it.

pub(crate) const FORMAT_VERSION: u8 = 1;

/// Reads fixed-width fields from a value whose header and length were checked.
pub(crate) struct Fields<'a> {
    rest: &'a [u8],
}

/// The fields of `value`, if it has this format version, `tag` and exactly `len` bytes.
pub(crate) fn open(value: &[u8], tag: u8, len: usize) -> Option<Fields<'_>> {
    match value {
        [FORMAT_VERSION, t, rest @ ..] if *t == tag && value.len() == len => Some(Fields { rest }),
        _ => None,
    }
}

impl<'a> Fields<'a> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    pub(crate) fn i64(&mut self) -> Option<i64> {
        self.bytes().map(i64::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }
}

/// A value's header; the caller appends its fields.
pub(crate) fn header(tag: u8, len: usize) -> Vec<u8> {
    let mut value = Vec::with_capacity(len);
    value.push(FORMAT_VERSION);
    value.push(tag);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checks_version_tag_and_length() {
        let mut value = header(b'C', 10);
        value.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(open(&value, b'C', 10).and_then(|mut f| f.u64()), Some(7));
        assert!(open(&value, b'R', 10).is_none());
        assert!(open(&value, b'C', 11).is_none());
        assert!(open(&value[..9], b'C', 10).is_none());
        value[0] = 2;
        assert!(open(&value, b'C', 10).is_none());
        assert!(open(&[], b'C', 10).is_none());
    }
}
