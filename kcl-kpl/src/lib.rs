//! Extended sequence numbers, hash keys and KPL aggregation for the Kinesis Client Library.
//!
//! This crate is pure: no async runtime and no AWS SDK. It holds
//!
//! - [`ExtendedSequenceNumber`] (a sequence number plus a sub-sequence number) with the total
//!   order checkpoints need, and the [`Record`] type delivered to record processors;
//! - hash keys: [`effective_hash_key`], [`HashKeyRange`];
//! - the KPL aggregation format: [`deaggregate`] turns one fetched Kinesis record into the user
//!   records it carries, and [`Aggregator`] builds aggregated records (for producers and tests).
//!
//! # The KPL format
//!
//! An aggregated record's data is the magic [`KPL_MAGIC`] (`F3 89 9A C2`), a protobuf
//! `AggregatedRecord { repeated string partition_key_table = 1; repeated string
//! explicit_hash_key_table = 2; repeated Record records = 3; }` (with `Record {
//! required uint64 partition_key_index = 1; optional uint64 explicit_hash_key_index = 2;
//! required bytes data = 3; repeated Tag tags = 4; }` and `Tag { required string key = 1;
//! optional string value = 2; }`), then the 16-byte MD5 of the protobuf bytes.
//!
//! # Deaggregation rules
//!
//! [`deaggregate`] reports what it did as a [`Deaggregated`] value:
//!
//! - **Not aggregated** ([`Deaggregated::NotAggregated`]): the data does not start with the
//!   magic, is not longer than magic + digest (so magic plus exactly 16 bytes is *not* an
//!   aggregate, as in the Java KCL), or the MD5 does not match. The record is delivered as is.
//! - **Invalid aggregate** ([`Deaggregated::InvalidAggregate`]): magic and MD5 are right but
//!   the protobuf fails validation anywhere: unparsable (truncated, bad varint, unknown wire
//!   type, stray or mismatched end group), a required field missing (proto2 semantics, tags
//!   included), a key index out of range, a key that is not UTF-8, an explicit hash key that
//!   is not a decimal integer in `0..=2^128-1`, or no user record at all. The ONE original
//!   record is
//!   delivered unchanged, with the reason: never a partial aggregate, never dropped (the Java
//!   KCL keeps the sub-records before a bad index; we do not). Unknown fields are skipped, as
//!   protobuf requires, and so is a known field number with an unexpected wire type (as the
//!   C++, Java and Python runtimes do); tag contents are ignored.
//! - **Aggregated** ([`Deaggregated::Aggregated`]): sub-record `i` gets sub-sequence number
//!   `i`, its partition key from the table, its explicit hash key only when the optional index
//!   is set, the parent's sequence number, arrival time and encryption type, and
//!   `aggregated = true`. Its data is a zero-copy slice of the fetched buffer.
//! - **Shard range** (Java KCL semantics): when [`DeaggregationOptions`] carry the shard's hash
//!   key range and any sub-record's effective hash key (explicit hash key, else MD5 of the
//!   partition key) lies outside it, the whole aggregate is dropped
//!   ([`Deaggregated::DroppedOutOfRange`]), or delivered anyway
//!   ([`Deaggregated::DeliveredOutOfRange`]) when
//!   [`DeaggregationOptions::with_deliver_out_of_range`] is set. Records that are not (valid)
//!   aggregates are never range-checked: Kinesis itself routed them.
//!
//! Performance: the protobuf is walked by hand in one pass; beyond the MD5 that validation
//! requires, the cost per user record is one `String` for its partition key (and one for its
//! explicit hash key, if any), a reference-counted slice of the data and a shared sequence
//! number. Partition keys are hashed (once per distinct key) only when a shard range is set.
//!
//! This crate does no logging; the caller logs and counts drops.
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use kcl_kpl::{Aggregator, DeaggregationOptions, Deaggregated, deaggregate};
//! use kcl_kpl::{Record, SequenceNumber};
//!
//! # fn main() -> Result<(), kcl_kpl::Error> {
//! let mut aggregator = Aggregator::new();
//! assert!(aggregator.add("user-1", None, Bytes::from_static(b"first"))?.is_none());
//! assert!(aggregator.add("user-2", Some("42"), Bytes::from_static(b"second"))?.is_none());
//! let aggregate = aggregator.finish().expect("two records were added");
//!
//! // What a consumer fetches from Kinesis: one record carrying the aggregate.
//! let fetched = Record::new(
//!     aggregate.partition_key.clone(),
//!     SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898")?,
//!     aggregate.data.clone(),
//! );
//! let result = deaggregate(fetched, &DeaggregationOptions::new());
//! assert!(matches!(result, Deaggregated::Aggregated { .. }));
//! let records = result.into_records();
//! assert_eq!(records.len(), 2);
//! assert_eq!(records[1].partition_key, "user-2");
//! assert_eq!(records[1].explicit_hash_key.as_deref(), Some("42"));
//! assert_eq!(records[1].sub_sequence_number, 1);
//! assert_eq!(&records[1].data[..], b"second");
//! assert_eq!(records[1].extended_sequence_number().to_string(),
//!            "49590338271490256608559692538361571095921575989136588898.1");
//! # Ok(())
//! # }
//! ```

mod aggregate;
mod deaggregate;
mod esn;
mod hash;
pub mod json;
mod record;
mod wire;

pub use aggregate::{AggregatedRecord, Aggregator};
pub use deaggregate::{
    Deaggregated, DeaggregationOptions, InvalidAggregate, NotAggregatedReason, OutOfRange,
    deaggregate,
};
pub use esn::{ExtendedSequenceNumber, MAX_SEQUENCE_NUMBER_DIGITS, Position, SequenceNumber};
pub use hash::{
    HashKeyRange, MAX_HASH_KEY, effective_hash_key, parse_hash_key, partition_key_hash,
};
pub use record::Record;

/// The four bytes every KPL aggregated record starts with.
pub const KPL_MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Length of the MD5 digest that ends every KPL aggregated record.
pub const KPL_DIGEST_LEN: usize = 16;

/// The Kinesis limit on one record: data plus partition key, 1 MiB.
pub const MAX_RECORD_SIZE: usize = 1024 * 1024;

/// The longest partition key Kinesis accepts, in Unicode scalar values.
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

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
    /// A partition key that is empty or longer than [`MAX_PARTITION_KEY_CHARS`] characters.
    #[error("partition key of {chars} characters (allowed: 1 to {MAX_PARTITION_KEY_CHARS})")]
    InvalidPartitionKey {
        /// Its length in Unicode scalar values.
        chars: usize,
    },
    /// A user record too large to fit in any aggregate, even alone.
    #[error("user record needs {size} bytes in an aggregate, over the limit of {limit}")]
    UserRecordTooLarge {
        /// Bytes the record would need (its aggregate alone, plus the outer partition key).
        size: usize,
        /// The aggregator's size limit.
        limit: usize,
    },
    /// An aggregate size limit outside what Kinesis and the format allow.
    #[error("aggregate size limit {limit} outside {min}..={max}")]
    InvalidSizeLimit {
        /// What was asked for.
        limit: usize,
        /// The smallest limit accepted.
        min: usize,
        /// The largest limit accepted ([`MAX_RECORD_SIZE`]).
        max: usize,
    },
}

impl Error {
    pub(crate) fn malformed_sequence_number(input: &str, reason: &'static str) -> Self {
        Self::MalformedSequenceNumber {
            input: truncate_for_display(input),
            reason,
        }
    }

    /// Whether retrying the same call can succeed (never, for this crate's errors).
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Keeps at most 200 bytes of untrusted input for error messages.
pub(crate) fn truncate_for_display(input: &str) -> String {
    const LIMIT: usize = 200;
    if input.len() <= LIMIT {
        return input.to_owned();
    }
    let mut cut = LIMIT;
    while !input.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = input.get(..cut).unwrap_or_default().to_owned();
    out.push_str("...");
    out
}
