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

impl<'a> Reader<'a> {
    pub(crate) fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.rest.split_first_chunk::<N>()?;
        self.rest = rest;
        Some(*head)
    }

    /// The next `len` bytes as they are.
    pub(crate) fn slice(&mut self, len: usize) -> Option<&'a [u8]> {
        let head = self.rest.get(..len)?;
        self.rest = self.rest.get(len..)?;
        Some(head)
    }

    /// Everything left (the last field of a value whose length varies).
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
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

    /// Bytes as they are (a fixed-size field, or a last field of varying length).
    pub(crate) fn slice(mut self, bytes: &[u8]) -> Self {
        self.out.extend_from_slice(bytes);
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.out
    }
}

/// Reading and writing one little-endian field of each integer type, named after it.
macro_rules! fields {
    ($($ty:ident),*) => {
        impl Reader<'_> {
            $(pub(crate) fn $ty(&mut self) -> Option<$ty> {
                self.bytes().map($ty::from_le_bytes)
            })*
        }

        impl Writer {
            $(pub(crate) fn $ty(mut self, value: $ty) -> Self {
                self.out.extend_from_slice(&value.to_le_bytes());
                self
            })*
        }
    };
}

fields!(u8, u16, u32, u64, i64);

/// Gives a struct of integer fields `decode` and `encode` in this format: the `tag`, then
/// the listed fields in order (the length is exact).
macro_rules! fixed_value {
    ($name:ident, $tag:expr, { $($field:ident: $ty:ident),* $(,)? }) => {
        impl $name {
            pub(crate) fn decode(value: &[u8]) -> Option<Self> {
                $crate::shared::codec::decode(value, $tag, |r| {
                    Some($name { $($field: r.$ty()?),* })
                })
            }

            pub(crate) fn encode(&self) -> Vec<u8> {
                let len = 2 $(+ std::mem::size_of::<$ty>())*;
                $crate::shared::codec::Writer::new($tag, len)
                    $(.$ty(self.$field))*
                    .finish()
            }
        }
    };
}
pub(crate) use fixed_value;

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
