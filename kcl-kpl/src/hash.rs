//! Hash keys: the 128-bit space Kinesis maps partition keys onto.

use std::fmt;
use std::str::FromStr;

use md5::{Digest, Md5};

use crate::Error;

/// The largest hash key, 2^128 - 1.
pub const MAX_HASH_KEY: u128 = u128::MAX;

/// Parses a decimal hash key (as Kinesis writes `StartingHashKey`, `ExplicitHashKey`).
pub fn parse_hash_key(input: &str) -> Result<u128, Error> {
    if input.is_empty() || !input.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::MalformedHashKey {
            input: input.to_owned(),
        });
    }
    input.parse::<u128>().map_err(|_| Error::MalformedHashKey {
        input: input.to_owned(),
    })
}

/// The hash key Kinesis derives from a partition key: MD5 of its UTF-8 bytes as a
/// big-endian `u128`.
pub fn partition_key_hash(partition_key: &str) -> u128 {
    let digest: [u8; 16] = Md5::digest(partition_key.as_bytes()).into();
    u128::from_be_bytes(digest)
}

/// The effective hash key of a record: its explicit hash key when set, else the hash of its
/// partition key. A malformed explicit hash key is an error.
pub fn effective_hash_key(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
) -> Result<u128, Error> {
    match explicit_hash_key {
        Some(ehk) => parse_hash_key(ehk),
        None => Ok(partition_key_hash(partition_key)),
    }
}

/// An inclusive range of hash keys, as a shard owns.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct HashKeyRange {
    start: u128,
    end: u128,
}

impl HashKeyRange {
    /// The whole hash key space.
    pub const FULL: Self = Self {
        start: 0,
        end: MAX_HASH_KEY,
    };

    /// A range from `start` to `end`, both inclusive. `start > end` is an error.
    pub fn new(start: u128, end: u128) -> Result<Self, Error> {
        if start > end {
            return Err(Error::InvalidHashKeyRange { start, end });
        }
        Ok(Self { start, end })
    }

    /// Parses decimal start and end keys (as `ListShards` returns them).
    pub fn parse(start: &str, end: &str) -> Result<Self, Error> {
        Self::new(parse_hash_key(start)?, parse_hash_key(end)?)
    }

    /// The first key in the range.
    pub fn start(&self) -> u128 {
        self.start
    }

    /// The last key in the range (inclusive).
    pub fn end(&self) -> u128 {
        self.end
    }

    /// True when `key` lies in the range.
    pub fn contains(&self, key: u128) -> bool {
        self.start <= key && key <= self.end
    }
}

impl fmt::Display for HashKeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.start, self.end)
    }
}

impl FromStr for HashKeyRange {
    type Err = Error;
    /// Parses `START:END` (decimal, inclusive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (start, end) = s.split_once(':').ok_or_else(|| Error::MalformedHashKey {
            input: s.to_owned(),
        })?;
        Self::parse(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_hash_of_key() {
        // From the shared KPL vectors: pk-0.
        assert_eq!(
            partition_key_hash("pk-0"),
            318996840767547934070577442296912359277
        );
    }

    #[test]
    fn ranges() {
        let r: HashKeyRange = "10:20".parse().unwrap();
        assert!(r.contains(10) && r.contains(20) && !r.contains(21) && !r.contains(9));
        assert!(HashKeyRange::new(2, 1).is_err());
        assert!(parse_hash_key("340282366920938463463374607431768211456").is_err());
        assert_eq!(
            parse_hash_key("340282366920938463463374607431768211455").unwrap(),
            u128::MAX
        );
        assert!(parse_hash_key("-1").is_err());
    }
}
