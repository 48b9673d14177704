//! A small reader for the protobuf wire format: just what the KPL messages need.
//!
//! Positions are byte offsets into the buffer given to [`Reader::new`]; a sub-message reader
//! keeps the same coordinates, so every offset reported is relative to the whole protobuf.

/// Wire type of a varint field.
pub(crate) const VARINT: u8 = 0;
/// Wire type of a 64-bit fixed-size field.
pub(crate) const FIXED64: u8 = 1;
/// Wire type of a length-delimited field (bytes, strings, sub-messages).
pub(crate) const LEN: u8 = 2;
/// Wire type that opens a (deprecated) group.
pub(crate) const START_GROUP: u8 = 3;
/// Wire type that closes a group.
pub(crate) const END_GROUP: u8 = 4;
/// Wire type of a 32-bit fixed-size field.
pub(crate) const FIXED32: u8 = 5;

/// How deeply unknown groups may nest before the input is refused.
const MAX_GROUP_DEPTH: usize = 64;

/// Where and why the wire format could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WireError {
    /// Byte offset (in the whole protobuf) of the item that failed.
    pub(crate) offset: usize,
    /// What was wrong.
    pub(crate) problem: &'static str,
}

/// A cursor over a window `pos..end` of a protobuf buffer.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    /// The buffer, cut at the window's end.
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader over the whole of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// A reader over `start..end` of the same buffer (a length-delimited field's contents),
    /// as returned by [`Reader::length_delimited`].
    pub(crate) fn sub(&self, start: usize, end: usize) -> Self {
        Self {
            buf: self.buf.get(..end).unwrap_or(self.buf),
            pos: start,
        }
    }

    /// True when the window is exhausted.
    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn error(offset: usize, problem: &'static str) -> WireError {
        WireError { offset, problem }
    }

    /// Reads a base-128 varint (at most 10 bytes, at most 64 bits).
    #[inline]
    pub(crate) fn varint(&mut self) -> Result<u64, WireError> {
        let start = self.pos;
        // Fast path: one byte.
        match self.buf.get(start) {
            Some(&b) if b < 0x80 => {
                self.pos = start + 1;
                return Ok(u64::from(b));
            }
            Some(_) => {}
            None => return Err(Self::error(start, "truncated varint")),
        }
        let mut value: u64 = 0;
        let mut shift = 0u32;
        let mut pos = start;
        loop {
            let Some(&b) = self.buf.get(pos) else {
                return Err(Self::error(start, "truncated varint"));
            };
            pos += 1;
            if shift == 63 && b > 1 {
                return Err(Self::error(start, "varint longer than 64 bits"));
            }
            value |= u64::from(b & 0x7F) << shift;
            if b < 0x80 {
                self.pos = pos;
                return Ok(value);
            }
            shift += 7;
            if shift > 63 {
                return Err(Self::error(start, "varint longer than 10 bytes"));
            }
        }
    }

    /// Reads a field key: `(field number, wire type)`.
    #[inline]
    pub(crate) fn key(&mut self) -> Result<(u32, u8), WireError> {
        let start = self.pos;
        let key = self.varint()?;
        let key = u32::try_from(key).map_err(|_| Self::error(start, "field key too large"))?;
        let wire_type = (key & 7) as u8;
        let field = key >> 3;
        if wire_type > FIXED32 {
            return Err(Self::error(start, "unknown wire type"));
        }
        if field == 0 {
            return Err(Self::error(start, "field number 0"));
        }
        Ok((field, wire_type))
    }

    /// Reads a length prefix and returns the `start..end` positions of the contents, moving past
    /// them.
    #[inline]
    pub(crate) fn length_delimited(&mut self) -> Result<(usize, usize), WireError> {
        let at = self.pos;
        let len = self.varint()?;
        let start = self.pos;
        let remaining = self.buf.len().saturating_sub(start);
        match usize::try_from(len) {
            Ok(len) if len <= remaining => {
                self.pos = start + len;
                Ok((start, start + len))
            }
            _ => Err(Self::error(at, "length past the end of the message")),
        }
    }

    fn advance(&mut self, n: usize, problem: &'static str) -> Result<(), WireError> {
        if self.buf.len().saturating_sub(self.pos) < n {
            return Err(Self::error(self.pos, problem));
        }
        self.pos += n;
        Ok(())
    }

    /// Skips the value of a field this reader does not know, whose key was just read.
    pub(crate) fn skip(&mut self, field: u32, wire_type: u8) -> Result<(), WireError> {
        self.skip_at_depth(field, wire_type, 0)
    }

    fn skip_at_depth(&mut self, field: u32, wire_type: u8, depth: usize) -> Result<(), WireError> {
        match wire_type {
            VARINT => self.varint().map(drop),
            FIXED64 => self.advance(8, "truncated fixed64"),
            FIXED32 => self.advance(4, "truncated fixed32"),
            LEN => self.length_delimited().map(drop),
            START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(Self::error(self.pos, "groups nested too deeply"));
                }
                loop {
                    let at = self.pos;
                    if self.is_empty() {
                        return Err(Self::error(at, "unterminated group"));
                    }
                    let (inner, inner_type) = self.key()?;
                    if inner_type == END_GROUP {
                        if inner != field {
                            return Err(Self::error(at, "end group for another field"));
                        }
                        return Ok(());
                    }
                    self.skip_at_depth(inner, inner_type, depth + 1)?;
                }
            }
            _ => Err(Self::error(self.pos, "end group without start group")),
        }
    }
}

/// Bytes needed to encode `value` as a varint.
pub(crate) fn varint_len(value: u64) -> usize {
    // 1 byte per started group of 7 bits, at least 1.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let b = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return out;
            }
            out.push(b | 0x80);
        }
    }

    #[test]
    fn varints_round_trip() {
        for v in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            let bytes = encode_varint(v);
            assert_eq!(bytes.len(), varint_len(v), "{v}");
            let mut r = Reader::new(&bytes);
            assert_eq!(r.varint().unwrap(), v);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn bad_varints() {
        // Truncated.
        assert!(Reader::new(&[0x80]).varint().is_err());
        assert!(Reader::new(&[]).varint().is_err());
        // 10th byte carrying more than the 64th bit.
        let mut too_big = vec![0xFF; 9];
        too_big.push(0x02);
        assert!(Reader::new(&too_big).varint().is_err());
        // 11 bytes.
        let mut too_long = vec![0x80; 10];
        too_long.push(0x00);
        assert!(Reader::new(&too_long).varint().is_err());
        // Largest legal 10-byte varint.
        let mut max = vec![0xFF; 9];
        max.push(0x01);
        assert_eq!(Reader::new(&max).varint().unwrap(), u64::MAX);
    }

    #[test]
    fn keys() {
        assert_eq!(Reader::new(&[0x0A]).key().unwrap(), (1, LEN));
        assert!(Reader::new(&[0x02]).key().is_err(), "field 0");
        assert!(Reader::new(&[0x0E]).key().is_err(), "wire type 6");
        assert!(Reader::new(&[0x0F]).key().is_err(), "wire type 7");
        let big = encode_varint(u64::from(u32::MAX) + 1);
        assert!(Reader::new(&big).key().is_err());
    }

    #[test]
    fn length_delimited_bounds() {
        let mut r = Reader::new(&[3, 1, 2, 3, 9]);
        assert_eq!(r.length_delimited().unwrap(), (1, 4));
        assert_eq!(r.varint().unwrap(), 9);
        assert!(Reader::new(&[4, 1, 2, 3]).length_delimited().is_err());
        // A sub-reader stops at its window.
        let outer = Reader::new(&[1, 2, 3, 4, 5]);
        let mut inner = outer.sub(1, 3);
        assert_eq!(inner.varint().unwrap(), 2);
        assert_eq!(inner.varint().unwrap(), 3);
        assert!(inner.is_empty());
        assert!(inner.varint().is_err());
    }

    #[test]
    fn skipping() {
        // Field 5 group containing a varint and a nested group, then end group 5.
        let bytes = [0x2B, 0x08, 0x01, 0x33, 0x34, 0x2C, 0x07];
        let mut r = Reader::new(&bytes);
        let (f, wt) = r.key().unwrap();
        r.skip(f, wt).unwrap();
        assert_eq!(r.varint().unwrap(), 7);
        // Mismatched end group.
        let mut r = Reader::new(&[0x2B, 0x34]);
        let (f, wt) = r.key().unwrap();
        assert!(r.skip(f, wt).is_err());
        // Unterminated group.
        let mut r = Reader::new(&[0x2B, 0x08, 0x01]);
        let (f, wt) = r.key().unwrap();
        assert!(r.skip(f, wt).is_err());
        // Stray end group.
        let mut r = Reader::new(&[0x2C]);
        let (f, wt) = r.key().unwrap();
        assert!(r.skip(f, wt).is_err());
        // Fixed sizes.
        let mut r = Reader::new(&[0x09, 1, 2, 3, 4, 5, 6, 7, 8, 0x15, 1, 2, 3, 4]);
        for _ in 0..2 {
            let (f, wt) = r.key().unwrap();
            r.skip(f, wt).unwrap();
        }
        assert!(r.is_empty());
        let mut r = Reader::new(&[0x15, 1, 2, 3]);
        let (f, wt) = r.key().unwrap();
        assert!(r.skip(f, wt).is_err());
        // Deep nesting is refused, not a stack overflow.
        let mut deep = vec![0x2B; 10_000];
        deep.extend(vec![0x2C; 10_000]);
        let mut r = Reader::new(&deep);
        let (f, wt) = r.key().unwrap();
        assert!(r.skip(f, wt).is_err());
    }
}
