//! Sequence numbers and extended sequence numbers (sequence number + sub-sequence number).

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// The longest decimal sequence number accepted (Kinesis uses up to 56 digits today).
pub const MAX_SEQUENCE_NUMBER_DIGITS: usize = 128;

/// A real Kinesis sequence number: an unsigned decimal integer that may exceed `u128`.
///
/// Leading zeros are removed when parsing, so two numbers are equal exactly when their
/// values are equal. Ordering compares values (length first, then digits). Cloning is cheap
/// (a reference count): every user record of a KPL aggregate shares its parent's.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SequenceNumber(Arc<str>);

impl SequenceNumber {
    /// Parses a decimal sequence number. Rejects empty input, non-digits and more than
    /// [`MAX_SEQUENCE_NUMBER_DIGITS`] digits.
    pub fn parse(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(Error::malformed_sequence_number(input, "empty"));
        }
        if !input.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::malformed_sequence_number(
                input,
                "not an unsigned decimal integer",
            ));
        }
        let trimmed = input.trim_start_matches('0');
        let normalized = if trimmed.is_empty() { "0" } else { trimmed };
        if normalized.len() > MAX_SEQUENCE_NUMBER_DIGITS {
            return Err(Error::malformed_sequence_number(input, "too many digits"));
        }
        Ok(Self(normalized.into()))
    }

    /// The sequence number 0 (the smallest).
    pub fn zero() -> Self {
        Self(Arc::from("0"))
    }

    /// The decimal digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for SequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .len()
            .cmp(&other.0.len())
            .then_with(|| self.0.as_bytes().cmp(other.0.as_bytes()))
    }
}

impl PartialOrd for SequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for SequenceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SequenceNumber({})", self.0)
    }
}

impl FromStr for SequenceNumber {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Where a checkpoint points: a sentinel or a real sequence number.
///
/// The variants are declared in their order: `AtTimestamp < TrimHorizon < Latest <
/// Sequence(_) < ShardEnd`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
#[non_exhaustive]
pub enum Position {
    /// Start from a timestamp given in the worker configuration.
    AtTimestamp,
    /// Start from the oldest record in the shard.
    TrimHorizon,
    /// Start just after the newest record in the shard.
    Latest,
    /// A real sequence number.
    Sequence(SequenceNumber),
    /// The shard is closed and every record in it was processed.
    ShardEnd,
}

impl Position {
    /// The sentinel's name as stored in the lease table, or the sequence number's digits.
    pub fn as_str(&self) -> &str {
        match self {
            Position::AtTimestamp => ExtendedSequenceNumber::AT_TIMESTAMP_STR,
            Position::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON_STR,
            Position::Latest => ExtendedSequenceNumber::LATEST_STR,
            Position::ShardEnd => ExtendedSequenceNumber::SHARD_END_STR,
            Position::Sequence(s) => s.as_str(),
        }
    }
}

/// A position in a shard: a sequence number plus the sub-sequence number of a user record
/// inside a KPL aggregate (0 when the record is not aggregated).
///
/// Total order: `AT_TIMESTAMP < TRIM_HORIZON < LATEST < any real sequence
/// number < SHARD_END`; real numbers compare as unsigned integers, ties broken by the
/// sub-sequence number.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ExtendedSequenceNumber {
    position: Position,
    sub_sequence_number: u64,
}

impl ExtendedSequenceNumber {
    /// Name of the AT_TIMESTAMP sentinel in the lease table.
    pub const AT_TIMESTAMP_STR: &'static str = "AT_TIMESTAMP";
    /// Name of the TRIM_HORIZON sentinel in the lease table.
    pub const TRIM_HORIZON_STR: &'static str = "TRIM_HORIZON";
    /// Name of the LATEST sentinel in the lease table.
    pub const LATEST_STR: &'static str = "LATEST";
    /// Name of the SHARD_END sentinel in the lease table.
    pub const SHARD_END_STR: &'static str = "SHARD_END";

    /// The AT_TIMESTAMP sentinel.
    pub const AT_TIMESTAMP: Self = Self::sentinel(Position::AtTimestamp);
    /// The TRIM_HORIZON sentinel.
    pub const TRIM_HORIZON: Self = Self::sentinel(Position::TrimHorizon);
    /// The LATEST sentinel.
    pub const LATEST: Self = Self::sentinel(Position::Latest);
    /// The SHARD_END sentinel.
    pub const SHARD_END: Self = Self::sentinel(Position::ShardEnd);

    const fn sentinel(position: Position) -> Self {
        Self {
            position,
            sub_sequence_number: 0,
        }
    }

    /// A real sequence number with a sub-sequence number.
    pub fn new(sequence_number: SequenceNumber, sub_sequence_number: u64) -> Self {
        Self {
            position: Position::Sequence(sequence_number),
            sub_sequence_number,
        }
    }

    /// Parses a sentinel name or a decimal sequence number, with a sub-sequence number.
    ///
    /// Sentinels keep sub-sequence 0 whatever is given (as the lease table stores them).
    pub fn parse(value: &str, sub_sequence_number: u64) -> Result<Self, Error> {
        Ok(match value {
            Self::AT_TIMESTAMP_STR => Self::AT_TIMESTAMP,
            Self::TRIM_HORIZON_STR => Self::TRIM_HORIZON,
            Self::LATEST_STR => Self::LATEST,
            Self::SHARD_END_STR => Self::SHARD_END,
            other => Self::new(SequenceNumber::parse(other)?, sub_sequence_number),
        })
    }

    /// Where this points.
    pub fn position(&self) -> &Position {
        &self.position
    }

    /// The sequence number, if this is not a sentinel.
    pub fn sequence_number(&self) -> Option<&SequenceNumber> {
        match &self.position {
            Position::Sequence(s) => Some(s),
            _ => None,
        }
    }

    /// The sentinel's name or the sequence number's digits (as stored in `checkpoint`).
    pub fn sequence_str(&self) -> &str {
        self.position.as_str()
    }

    /// The sub-sequence number (position inside a KPL aggregate).
    pub fn sub_sequence_number(&self) -> u64 {
        self.sub_sequence_number
    }

    /// True for the four sentinels.
    pub fn is_sentinel(&self) -> bool {
        !matches!(self.position, Position::Sequence(_))
    }

    /// True for `SHARD_END`.
    pub fn is_shard_end(&self) -> bool {
        matches!(self.position, Position::ShardEnd)
    }
}

impl Ord for ExtendedSequenceNumber {
    fn cmp(&self, other: &Self) -> Ordering {
        self.position.cmp(&other.position).then_with(|| {
            if self.is_sentinel() {
                Ordering::Equal
            } else {
                self.sub_sequence_number.cmp(&other.sub_sequence_number)
            }
        })
    }
}

impl PartialOrd for ExtendedSequenceNumber {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for ExtendedSequenceNumber {
    /// `TRIM_HORIZON`, `SHARD_END`, ... for sentinels; `SEQ` for sub-sequence 0 and
    /// `SEQ.SUB` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.position {
            Position::Sequence(s) if self.sub_sequence_number != 0 => {
                write!(f, "{s}.{}", self.sub_sequence_number)
            }
            p => f.write_str(p.as_str()),
        }
    }
}

impl FromStr for ExtendedSequenceNumber {
    type Err = Error;
    /// Parses what `Display` writes: a sentinel, `SEQ` or `SEQ.SUB`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('.') {
            Some((seq, sub)) => {
                let sub = sub.parse::<u64>().map_err(|_| {
                    Error::malformed_sequence_number(s, "sub-sequence number is not a u64")
                })?;
                Ok(Self::new(SequenceNumber::parse(seq)?, sub))
            }
            None => Self::parse(s, 0),
        }
    }
}

impl From<SequenceNumber> for ExtendedSequenceNumber {
    fn from(s: SequenceNumber) -> Self {
        Self::new(s, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esn(s: &str) -> ExtendedSequenceNumber {
        s.parse().unwrap()
    }

    #[test]
    fn sentinel_order() {
        let big = "49590338271490256608559692538361571095921575989136588898";
        let order = [
            esn("AT_TIMESTAMP"),
            esn("TRIM_HORIZON"),
            esn("LATEST"),
            esn("0"),
            esn("9"),
            esn("10"),
            esn("10.1"),
            esn(big),
            esn(&format!("{big}.7")),
            esn("SHARD_END"),
        ];
        for w in order.windows(2) {
            assert!(w[0] < w[1], "{} < {}", w[0], w[1]);
        }
    }

    #[test]
    fn leading_zeros_normalized() {
        assert_eq!(esn("0010"), esn("10"));
        assert_eq!(esn("000").to_string(), "0");
    }

    #[test]
    fn malformed_rejected() {
        for bad in [
            "",
            "-1",
            "1a",
            " 1",
            "1.x",
            "1.-1",
            "LATESTX",
            &"9".repeat(129),
        ] {
            assert!(bad.parse::<ExtendedSequenceNumber>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn display_round_trip() {
        for s in ["TRIM_HORIZON", "123", "123.4", "SHARD_END"] {
            assert_eq!(esn(s).to_string(), s);
        }
    }
}
