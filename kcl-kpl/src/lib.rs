//! Extended sequence numbers, hash keys and KPL aggregation for the Kinesis Client Library.
//!
//! This crate is pure: no async runtime and no AWS SDK.

mod esn;
mod hash;
mod record;

pub use esn::{ExtendedSequenceNumber, MAX_SEQUENCE_NUMBER_DIGITS, Position, SequenceNumber};
pub use hash::{HashKeyRange, MAX_HASH_KEY, effective_hash_key, parse_hash_key, partition_key_hash};
pub use record::Record;

/// Errors of this crate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A sequence number that is not an unsigned decimal integer (or a known sentinel).
    #[error("malformed sequence number {input:?}: {reason}")]
    MalformedSequenceNumber {
        /// What was given.
        input: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// A hash key that is not a decimal integer in `0..=2^128-1`.
    #[error("malformed hash key {input:?}")]
    MalformedHashKey {
        /// What was given.
        input: String,
    },
    /// A hash key range whose start is after its end.
    #[error("invalid hash key range {start}..={end}")]
    InvalidHashKeyRange {
        /// Start of the range.
        start: u128,
        /// End of the range.
        end: u128,
    },
}

impl Error {
    pub(crate) fn malformed_sequence_number(input: &str, reason: &'static str) -> Self {
        let mut input = input.to_owned();
        if input.len() > 200 {
            let mut cut = 200;
            while !input.is_char_boundary(cut) {
                cut -= 1;
            }
            input.truncate(cut);
            input.push_str("...");
        }
        Self::MalformedSequenceNumber { input, reason }
    }

    /// Whether retrying the same call can succeed (never, for this crate's errors).
    pub fn is_retryable(&self) -> bool {
        false
    }
}
