//! The record type delivered to processors.

use std::time::SystemTime;

use bytes::Bytes;

use crate::esn::{ExtendedSequenceNumber, SequenceNumber};

/// One user record as delivered to a record processor.
///
/// For a KPL aggregate, each user record inside it is one `Record` sharing the Kinesis
/// record's sequence number, arrival time and encryption type, with its own sub-sequence
/// number, partition key and (optional) explicit hash key; its data is a zero-copy slice of
/// the fetched buffer.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record {
    /// The payload.
    pub data: Bytes,
    /// The partition key.
    pub partition_key: String,
    /// The sequence number of the Kinesis record that carried this user record.
    pub sequence_number: SequenceNumber,
    /// Position inside a KPL aggregate (0 for a record that is not aggregated).
    pub sub_sequence_number: u64,
    /// The explicit hash key, when the producer set one.
    pub explicit_hash_key: Option<String>,
    /// When Kinesis accepted the record, as the service reports it.
    pub approximate_arrival_timestamp: Option<SystemTime>,
    /// Server-side encryption type (`NONE` or `KMS`), as the service reports it.
    pub encryption_type: Option<String>,
    /// True when this user record came out of a KPL aggregate.
    pub aggregated: bool,
}

impl Record {
    /// A plain (not aggregated) record with the given key, sequence number and data.
    pub fn new(
        partition_key: impl Into<String>,
        sequence_number: SequenceNumber,
        data: Bytes,
    ) -> Self {
        Self {
            data,
            partition_key: partition_key.into(),
            sequence_number,
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_timestamp: None,
            encryption_type: None,
            aggregated: false,
        }
    }

    /// The record's position: sequence number and sub-sequence number.
    pub fn extended_sequence_number(&self) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::new(self.sequence_number.clone(), self.sub_sequence_number)
    }
}
