//! The value format of every shared-data entry: fixed-width little-endian binary,
//!
//! ```text
//! byte 0     format version (1)
//! byte 1     tag: what the value is (see `keys.rs` for which key holds which tag)
//! bytes 2..  the fields, in the order the owner's documentation gives
//! ```
//!
//! A value with another version, tag or length does not decode, and the owner treats it
//! as fresh state rather than failing: a format change or a key reused for another kind
//! must not lock tenants out, and the next successful write replaces it.

pub(crate) const FORMAT_VERSION: u8 = 1;

/// Reads the fields of one value, in order.
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

/// `read`'s result if `value` has this format version and `tag`, and `read` consumes it
/// exactly (no byte missing, none left over).
pub(crate) fn decode<'a, T>(
    value: &'a [u8],
    tag: u8,
    read: impl FnOnce(&mut Reader<'a>) -> Option<T>,
) -> Option<T> {
    let mut reader = match value {
        [FORMAT_VERSION, t, rest @ ..] if *t == tag => Reader { rest },
        _ => return None,
    };
    let decoded = read(&mut reader)?;
    reader.rest.is_empty().then_some(decoded)
}

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.bytes::<1>().map(|[b]| b)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.bytes().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.bytes().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.bytes().map(u64::from_le_bytes)
    }

    pub(crate) fn i64(&mut self) -> Option<i64> {
        self.bytes().map(i64::from_le_bytes)
    }

    /// Capacity for `n` items of `size` bytes, never more than the bytes left allow (a
    /// corrupt count must not allocate much).
    pub(crate) fn room(&self, n: u16, size: usize) -> usize {
        usize::from(n).min(self.rest.len() / size.max(1))
    }
}

/// Builds one value: the header, then the fields in order.
pub(crate) struct Writer {
    out: Vec<u8>,
}

impl Writer {
    /// A value with `tag`, sized for `len` bytes in all.
    pub(crate) fn new(tag: u8, len: usize) -> Self {
        let mut out = Vec::with_capacity(len);
        out.push(FORMAT_VERSION);
        out.push(tag);
        Writer { out }
    }

    pub(crate) fn u8(mut self, v: u8) -> Self {
        self.out.push(v);
        self
    }

    pub(crate) fn u16(mut self, v: u16) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u32(mut self, v: u32) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(mut self, v: u64) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn i64(mut self, v: i64) -> Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_checks_version_tag_and_length() {
        let value = Writer::new(b'C', 10).u64(7).finish();
        assert_eq!(value.len(), 10);
        let read = |v: &[u8], tag| decode(v, tag, |r| r.u64());
        assert_eq!(read(&value, b'C'), Some(7));
        assert_eq!(read(&value, b'R'), None);
        let mut longer = value.clone();
        longer.push(0);
        assert_eq!(read(&longer, b'C'), None);
        assert_eq!(read(&value[..9], b'C'), None);
        let mut other_version = value.clone();
        other_version[0] = 2;
        assert_eq!(read(&other_version, b'C'), None);
        assert_eq!(read(&[], b'C'), None);
    }

    #[test]
    fn fields_round_trip_in_order() {
        let value = Writer::new(b'Z', 2 + 1 + 2 + 4 + 8 + 8)
            .u8(9)
            .u16(0xbeef)
            .u32(u32::MAX - 1)
            .u64(1 << 40)
            .i64(-5)
            .finish();
        let fields = decode(&value, b'Z', |r| {
            Some((r.u8()?, r.u16()?, r.u32()?, r.u64()?, r.i64()?))
        });
        assert_eq!(fields, Some((9, 0xbeef, u32::MAX - 1, 1 << 40, -5)));
    }

    #[test]
    fn room_never_exceeds_what_is_left() {
        let value = Writer::new(b'L', 2 + 8).u64(0).finish();
        let rooms = decode(&value, b'L', |r| {
            let rooms = (r.room(u16::MAX, 4), r.room(1, 4), r.room(3, 0));
            r.u64()?;
            Some(rooms)
        });
        assert_eq!(rooms, Some((2, 1, 3)));
    }
}
