//! Deaggregation of KPL aggregated records: the rules are in the crate docs ("Deaggregation rules").
//!
//! The protobuf is walked by hand (see [`crate::wire`]): one pass records the tables' byte
//! ranges and each record's indices and data range, then the tables are validated and the
//! user records built. Nothing is copied but the keys; data are slices of the input `Bytes`.

use std::fmt;

use bytes::Bytes;
use md5::{Digest, Md5};

use crate::hash::{HashKeyRange, parse_hash_key, partition_key_hash};
use crate::record::Record;
use crate::wire::{LEN, Reader, VARINT, WireError};
use crate::{KPL_DIGEST_LEN, KPL_MAGIC, SequenceNumber, truncate_for_display};

/// How [`deaggregate`] treats aggregates: the shard's hash key range, and what to do with
/// aggregates holding user records outside it.
///
/// The default has no range (nothing is dropped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeaggregationOptions {
    shard_range: Option<HashKeyRange>,
    deliver_out_of_range: bool,
}

impl DeaggregationOptions {
    /// No shard range; aggregates are never dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// Options for a shard owning `range` (out-of-range aggregates are dropped).
    pub fn for_shard(range: HashKeyRange) -> Self {
        Self::new().with_shard_range(range)
    }

    /// Sets the hash key range of the shard the records were read from (a range, or an
    /// `Option` of one: `None` clears it).
    pub fn with_shard_range(mut self, range: impl Into<Option<HashKeyRange>>) -> Self {
        self.shard_range = range.into();
        self
    }

    /// Sets or clears the shard's hash key range.
    pub fn set_shard_range(&mut self, range: Option<HashKeyRange>) -> &mut Self {
        self.shard_range = range;
        self
    }

    /// When true, an aggregate holding a user record outside the shard range is delivered
    /// (as [`Deaggregated::DeliveredOutOfRange`]) instead of dropped. Default false.
    pub fn with_deliver_out_of_range(mut self, deliver: bool) -> Self {
        self.deliver_out_of_range = deliver;
        self
    }

    /// Sets whether out-of-range aggregates are delivered.
    pub fn set_deliver_out_of_range(&mut self, deliver: bool) -> &mut Self {
        self.deliver_out_of_range = deliver;
        self
    }

    /// The shard range, if set.
    pub fn shard_range(&self) -> Option<HashKeyRange> {
        self.shard_range
    }

    /// Whether out-of-range aggregates are delivered.
    pub fn deliver_out_of_range(&self) -> bool {
        self.deliver_out_of_range
    }
}

/// Why a record was not treated as an aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotAggregatedReason {
    /// The data does not start with [`KPL_MAGIC`].
    NoMagic,
    /// The data starts with the magic but is not longer than magic plus digest.
    TooShort,
    /// The trailing 16 bytes are not the MD5 of the bytes between magic and digest.
    DigestMismatch,
}

impl NotAggregatedReason {
    /// A short stable name (for metric labels): `no_magic`, `too_short`, `digest_mismatch`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::NoMagic => "no_magic",
            Self::TooShort => "too_short",
            Self::DigestMismatch => "digest_mismatch",
        }
    }
}

impl fmt::Display for NotAggregatedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NoMagic => "no KPL magic",
            Self::TooShort => "KPL magic but too short for an aggregate",
            Self::DigestMismatch => "KPL magic but the MD5 digest does not match",
        })
    }
}

/// Why a record with the KPL magic and a correct digest was not deaggregated.
///
/// Offsets are byte positions in the protobuf (after the magic).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidAggregate {
    /// The protobuf cannot be parsed (truncated, bad varint, bad wire type...).
    #[error("malformed protobuf at byte {offset}: {problem}")]
    Malformed {
        /// Where the problem was found.
        offset: usize,
        /// What it was.
        problem: &'static str,
    },
    /// A required field is missing (proto2 semantics).
    #[error("{message} of user record {record} lacks required field {field}")]
    MissingRequiredField {
        /// The message lacking it: `Record` or `Tag`.
        message: &'static str,
        /// The field's name.
        field: &'static str,
        /// Index of the user record (its would-be sub-sequence number).
        record: usize,
    },
    /// A user record's partition key index is not in the partition key table.
    #[error("user record {record} has partition key index {index}, table has {table_len}")]
    PartitionKeyIndexOutOfRange {
        /// Index of the user record.
        record: usize,
        /// The index it carries.
        index: u64,
        /// Entries in the table.
        table_len: usize,
    },
    /// A user record's explicit hash key index is not in the explicit hash key table.
    #[error("user record {record} has explicit hash key index {index}, table has {table_len}")]
    ExplicitHashKeyIndexOutOfRange {
        /// Index of the user record.
        record: usize,
        /// The index it carries.
        index: u64,
        /// Entries in the table.
        table_len: usize,
    },
    /// A key table entry is not valid UTF-8.
    #[error("{table} table entry {index} is not UTF-8")]
    NonUtf8Key {
        /// `partition_key_table` or `explicit_hash_key_table`.
        table: &'static str,
        /// The entry's index.
        index: usize,
    },
    /// An explicit hash key table entry is not a decimal integer in `0..=2^128-1`.
    #[error("explicit hash key table entry {index} is not a hash key: {value:?}")]
    MalformedExplicitHashKey {
        /// The entry's index.
        index: usize,
        /// The entry (cut at 200 bytes).
        value: String,
    },
    /// The aggregate holds no user record.
    #[error("aggregate holds no user record")]
    NoRecords,
}

impl InvalidAggregate {
    /// A short stable name (for metric labels): `malformed_protobuf`,
    /// `missing_required_field`, `partition_key_index_out_of_range`,
    /// `explicit_hash_key_index_out_of_range`, `non_utf8_key`, `malformed_explicit_hash_key`,
    /// `no_records`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Malformed { .. } => "malformed_protobuf",
            Self::MissingRequiredField { .. } => "missing_required_field",
            Self::PartitionKeyIndexOutOfRange { .. } => "partition_key_index_out_of_range",
            Self::ExplicitHashKeyIndexOutOfRange { .. } => "explicit_hash_key_index_out_of_range",
            Self::NonUtf8Key { .. } => "non_utf8_key",
            Self::MalformedExplicitHashKey { .. } => "malformed_explicit_hash_key",
            Self::NoRecords => "no_records",
        }
    }
}

impl From<WireError> for InvalidAggregate {
    fn from(e: WireError) -> Self {
        Self::Malformed {
            offset: e.offset,
            problem: e.problem,
        }
    }
}

/// Which user records of an aggregate lie outside the shard's hash key range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    /// How many user records lie outside the range.
    pub count: usize,
    /// Sub-sequence number of the first of them.
    pub first_sub_sequence_number: u64,
    /// Its partition key.
    pub first_partition_key: String,
    /// Its effective hash key.
    pub first_hash_key: u128,
    /// The shard's range.
    pub shard_range: HashKeyRange,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} user record(s) outside shard range {}; first: sub-sequence {}, partition key \
             {:?}, hash key {}",
            self.count,
            self.shard_range,
            self.first_sub_sequence_number,
            self.first_partition_key,
            self.first_hash_key
        )
    }
}

/// What [`deaggregate`] did with one Kinesis record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Deaggregated {
    /// Not a KPL aggregate: the record, unchanged.
    NotAggregated {
        /// The record as given.
        record: Record,
        /// Why it is not an aggregate.
        reason: NotAggregatedReason,
    },
    /// A valid aggregate: its user records, in order (sub-sequence 0, 1, ...).
    Aggregated {
        /// The user records.
        records: Vec<Record>,
    },
    /// Magic and digest were right but the aggregate failed validation: the original record,
    /// unchanged.
    InvalidAggregate {
        /// The record as given.
        record: Record,
        /// What failed.
        reason: InvalidAggregate,
    },
    /// A valid aggregate holding a user record outside the shard's range: nothing delivered.
    DroppedOutOfRange {
        /// Sequence number of the Kinesis record carrying the aggregate.
        sequence_number: SequenceNumber,
        /// User records in the aggregate (all dropped).
        sub_records: usize,
        /// What lay outside the range.
        out_of_range: OutOfRange,
    },
    /// A valid aggregate holding a user record outside the shard's range, delivered anyway
    /// because [`DeaggregationOptions::deliver_out_of_range`] is set.
    DeliveredOutOfRange {
        /// The user records.
        records: Vec<Record>,
        /// What was outside the range.
        out_of_range: OutOfRange,
    },
}

impl Deaggregated {
    /// The records to deliver (empty when dropped).
    pub fn records(&self) -> &[Record] {
        match self {
            Self::NotAggregated { record, .. } | Self::InvalidAggregate { record, .. } => {
                std::slice::from_ref(record)
            }
            Self::Aggregated { records } | Self::DeliveredOutOfRange { records, .. } => records,
            Self::DroppedOutOfRange { .. } => &[],
        }
    }

    /// The records to deliver (empty when dropped).
    pub fn into_records(self) -> Vec<Record> {
        match self {
            Self::NotAggregated { record, .. } | Self::InvalidAggregate { record, .. } => {
                vec![record]
            }
            Self::Aggregated { records } | Self::DeliveredOutOfRange { records, .. } => records,
            Self::DroppedOutOfRange { .. } => Vec::new(),
        }
    }

    /// Number of records to deliver.
    pub fn len(&self) -> usize {
        self.records().len()
    }

    /// True when nothing is to be delivered (a dropped aggregate).
    pub fn is_empty(&self) -> bool {
        self.records().is_empty()
    }

    /// True when the records delivered are user records of a valid aggregate.
    pub fn is_aggregated(&self) -> bool {
        matches!(
            self,
            Self::Aggregated { .. }
                | Self::DeliveredOutOfRange { .. }
                | Self::DroppedOutOfRange { .. }
        )
    }

    /// What lay outside the shard range, for a dropped or delivered-anyway aggregate.
    pub fn out_of_range(&self) -> Option<&OutOfRange> {
        match self {
            Self::DroppedOutOfRange { out_of_range, .. }
            | Self::DeliveredOutOfRange { out_of_range, .. } => Some(out_of_range),
            _ => None,
        }
    }
}

/// One user record as the walk finds it: indices and the data's range in the protobuf.
#[derive(Clone, Copy, Debug)]
struct RawRecord {
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    data_start: usize,
    data_end: usize,
}

/// The walk's result: table entries and records as positions in the protobuf.
#[derive(Debug, Default)]
struct RawAggregate {
    partition_keys: Vec<(usize, usize)>,
    explicit_hash_keys: Vec<(usize, usize)>,
    records: Vec<RawRecord>,
}

/// Turns one fetched Kinesis record into the user records to deliver, following the rules in
/// the [crate documentation](crate#deaggregation-rules).
///
/// Never panics and never loses a record: anything that is not a valid aggregate comes back
/// unchanged; only [`Deaggregated::DroppedOutOfRange`] delivers nothing, and only when
/// `options` ask for it.
pub fn deaggregate(record: Record, options: &DeaggregationOptions) -> Deaggregated {
    let data: &[u8] = &record.data;
    if !data.starts_with(&KPL_MAGIC) {
        return not_aggregated(record, NotAggregatedReason::NoMagic);
    }
    if data.len() <= KPL_MAGIC.len() + KPL_DIGEST_LEN {
        return not_aggregated(record, NotAggregatedReason::TooShort);
    }
    let body_end = data.len() - KPL_DIGEST_LEN;
    let (Some(body), Some(digest)) = (data.get(KPL_MAGIC.len()..body_end), data.get(body_end..))
    else {
        return not_aggregated(record, NotAggregatedReason::TooShort);
    };
    if Md5::digest(body).as_slice() != digest {
        return not_aggregated(record, NotAggregatedReason::DigestMismatch);
    }
    match walk(body).and_then(|raw| build(&record, body, &raw, options)) {
        Ok(result) => result,
        Err(reason) => Deaggregated::InvalidAggregate { record, reason },
    }
}

fn not_aggregated(record: Record, reason: NotAggregatedReason) -> Deaggregated {
    Deaggregated::NotAggregated { record, reason }
}

/// Field numbers of `AggregatedRecord`.
const PARTITION_KEY_TABLE: u32 = 1;
const EXPLICIT_HASH_KEY_TABLE: u32 = 2;
const RECORDS: u32 = 3;
/// Field numbers of `Record`.
const PARTITION_KEY_INDEX: u32 = 1;
const EXPLICIT_HASH_KEY_INDEX: u32 = 2;
const DATA: u32 = 3;
const TAGS: u32 = 4;
/// Field numbers of `Tag`.
const TAG_KEY: u32 = 1;
const TAG_VALUE: u32 = 2;

/// Walks the `AggregatedRecord` message, checking structure and required fields.
///
/// A known field number with an unexpected wire type is skipped as an unknown field, as the
/// C++, Java and Python protobuf runtimes do (the Java KCL parses with the Java one).
fn walk(body: &[u8]) -> Result<RawAggregate, InvalidAggregate> {
    let mut raw = RawAggregate {
        // A rough guess that avoids most regrowth for typical aggregates.
        records: Vec::with_capacity((body.len() / 256).clamp(4, 4096)),
        ..RawAggregate::default()
    };
    let mut reader = Reader::new(body);
    while !reader.is_empty() {
        let (field, wire_type) = reader.key()?;
        match (field, wire_type) {
            (PARTITION_KEY_TABLE, LEN) => raw.partition_keys.push(reader.length_delimited()?),
            (EXPLICIT_HASH_KEY_TABLE, LEN) => {
                raw.explicit_hash_keys.push(reader.length_delimited()?);
            }
            (RECORDS, LEN) => {
                let (start, end) = reader.length_delimited()?;
                let index = raw.records.len();
                raw.records
                    .push(walk_record(&reader.sub(start, end), index)?);
            }
            _ => reader.skip(field, wire_type)?,
        }
    }
    Ok(raw)
}

/// Walks one `Record` message.
fn walk_record(reader: &Reader<'_>, index: usize) -> Result<RawRecord, InvalidAggregate> {
    let mut reader = reader.clone();
    let mut partition_key_index = None;
    let mut explicit_hash_key_index = None;
    let mut data = None;
    while !reader.is_empty() {
        let (field, wire_type) = reader.key()?;
        match (field, wire_type) {
            (PARTITION_KEY_INDEX, VARINT) => partition_key_index = Some(reader.varint()?),
            (EXPLICIT_HASH_KEY_INDEX, VARINT) => explicit_hash_key_index = Some(reader.varint()?),
            (DATA, LEN) => data = Some(reader.length_delimited()?),
            (TAGS, LEN) => {
                let (start, end) = reader.length_delimited()?;
                walk_tag(&reader.sub(start, end), index)?;
            }
            _ => reader.skip(field, wire_type)?,
        }
    }
    let missing = |field| InvalidAggregate::MissingRequiredField {
        message: "Record",
        field,
        record: index,
    };
    let partition_key_index = partition_key_index.ok_or_else(|| missing("partition_key_index"))?;
    let (data_start, data_end) = data.ok_or_else(|| missing("data"))?;
    Ok(RawRecord {
        partition_key_index,
        explicit_hash_key_index,
        data_start,
        data_end,
    })
}

/// Walks one `Tag` message: contents ignored, structure and the required key checked.
fn walk_tag(reader: &Reader<'_>, index: usize) -> Result<(), InvalidAggregate> {
    let mut reader = reader.clone();
    let mut has_key = false;
    while !reader.is_empty() {
        let (field, wire_type) = reader.key()?;
        match (field, wire_type) {
            (TAG_KEY, LEN) => {
                reader.length_delimited()?;
                has_key = true;
            }
            (TAG_VALUE, LEN) => {
                reader.length_delimited()?;
            }
            _ => reader.skip(field, wire_type)?,
        }
    }
    if has_key {
        Ok(())
    } else {
        Err(InvalidAggregate::MissingRequiredField {
            message: "Tag",
            field: "key",
            record: index,
        })
    }
}

fn table_entry<'a>(
    body: &'a [u8],
    (start, end): (usize, usize),
    table: &'static str,
    index: usize,
) -> Result<&'a str, InvalidAggregate> {
    body.get(start..end)
        .and_then(|b| std::str::from_utf8(b).ok())
        .ok_or(InvalidAggregate::NonUtf8Key { table, index })
}

/// Validates tables and indices, applies the shard range, builds the user records.
fn build(
    parent: &Record,
    body: &[u8],
    raw: &RawAggregate,
    options: &DeaggregationOptions,
) -> Result<Deaggregated, InvalidAggregate> {
    let partition_keys = raw
        .partition_keys
        .iter()
        .enumerate()
        .map(|(i, &range)| table_entry(body, range, "partition_key_table", i).map(str::to_owned))
        .collect::<Result<Vec<String>, _>>()?;
    let explicit_hash_keys = raw
        .explicit_hash_keys
        .iter()
        .enumerate()
        .map(|(i, &range)| {
            let text = table_entry(body, range, "explicit_hash_key_table", i)?;
            let value =
                parse_hash_key(text).map_err(|_| InvalidAggregate::MalformedExplicitHashKey {
                    index: i,
                    value: truncate_for_display(text),
                })?;
            Ok((text.to_owned(), value))
        })
        .collect::<Result<Vec<(String, u128)>, InvalidAggregate>>()?;
    if raw.records.is_empty() {
        return Err(InvalidAggregate::NoRecords);
    }

    // Partition key hashes, computed at most once per table entry and only with a range.
    let mut key_hashes: Vec<Option<u128>> = match options.shard_range {
        Some(_) => vec![None; partition_keys.len()],
        None => Vec::new(),
    };
    let mut out_of_range: Option<(usize, usize, u128)> = None; // (count, first index, key)

    // Offset of the protobuf inside the record's data.
    let base = KPL_MAGIC.len();
    let mut records = Vec::with_capacity(raw.records.len());
    for (i, r) in raw.records.iter().enumerate() {
        let Some((pk_slot, partition_key)) = usize::try_from(r.partition_key_index)
            .ok()
            .and_then(|p| partition_keys.get(p).map(|key| (p, key)))
        else {
            return Err(InvalidAggregate::PartitionKeyIndexOutOfRange {
                record: i,
                index: r.partition_key_index,
                table_len: partition_keys.len(),
            });
        };
        let explicit_hash_key = match r.explicit_hash_key_index {
            None => None,
            Some(e) => match usize::try_from(e)
                .ok()
                .and_then(|e| explicit_hash_keys.get(e))
            {
                Some(entry) => Some(entry),
                None => {
                    return Err(InvalidAggregate::ExplicitHashKeyIndexOutOfRange {
                        record: i,
                        index: e,
                        table_len: explicit_hash_keys.len(),
                    });
                }
            },
        };
        if let Some(range) = options.shard_range {
            let key = match explicit_hash_key {
                Some((_, value)) => *value,
                None => match key_hashes.get_mut(pk_slot) {
                    Some(Some(h)) => *h,
                    Some(slot) => *slot.insert(partition_key_hash(partition_key)),
                    None => partition_key_hash(partition_key),
                },
            };
            if !range.contains(key) {
                match &mut out_of_range {
                    Some((count, _, _)) => *count += 1,
                    None => out_of_range = Some((1, i, key)),
                }
            }
        }
        let data = slice(&parent.data, base + r.data_start, base + r.data_end).ok_or(
            InvalidAggregate::Malformed {
                offset: r.data_start,
                problem: "data outside the message",
            },
        )?;
        records.push(Record {
            data,
            partition_key: partition_key.clone(),
            sequence_number: parent.sequence_number.clone(),
            sub_sequence_number: i as u64,
            explicit_hash_key: explicit_hash_key.map(|(text, _)| text.clone()),
            approximate_arrival_timestamp: parent.approximate_arrival_timestamp,
            encryption_type: parent.encryption_type.clone(),
            aggregated: true,
        });
    }

    let (Some((count, first, hash_key)), Some(shard_range)) = (out_of_range, options.shard_range)
    else {
        return Ok(Deaggregated::Aggregated { records });
    };
    let out_of_range = OutOfRange {
        count,
        first_sub_sequence_number: first as u64,
        first_partition_key: records
            .get(first)
            .map(|r| r.partition_key.clone())
            .unwrap_or_default(),
        first_hash_key: hash_key,
        shard_range,
    };
    Ok(if options.deliver_out_of_range {
        Deaggregated::DeliveredOutOfRange {
            records,
            out_of_range,
        }
    } else {
        Deaggregated::DroppedOutOfRange {
            sequence_number: parent.sequence_number.clone(),
            sub_records: records.len(),
            out_of_range,
        }
    })
}

/// A zero-copy slice of `data`, or `None` when the range does not fit.
fn slice(data: &Bytes, start: usize, end: usize) -> Option<Bytes> {
    (start <= end && end <= data.len()).then(|| data.slice(start..end))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::Aggregator;

    fn seq() -> SequenceNumber {
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap()
    }

    fn parent(data: Bytes) -> Record {
        let mut r = Record::new("outer", seq(), data);
        r.approximate_arrival_timestamp = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(7));
        r.encryption_type = Some("KMS".to_owned());
        r
    }

    /// Seals a protobuf body into an aggregate: magic + body + MD5.
    fn seal(body: &[u8]) -> Bytes {
        let mut out = KPL_MAGIC.to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&Md5::digest(body));
        Bytes::from(out)
    }

    fn aggregate(records: &[(&str, Option<&str>, &[u8])]) -> Bytes {
        let mut agg = Aggregator::new();
        for (pk, ehk, data) in records {
            assert!(
                agg.add(pk, *ehk, Bytes::copy_from_slice(data))
                    .unwrap()
                    .is_none()
            );
        }
        agg.finish().unwrap().data
    }

    #[test]
    fn sub_records_inherit_parent_fields() {
        let data = aggregate(&[
            ("a", None, b"one"),
            ("b", Some("5"), b"two"),
            ("a", None, b""),
        ]);
        let out = deaggregate(parent(data.clone()), &DeaggregationOptions::new());
        assert!(out.is_aggregated());
        let records = out.into_records();
        assert_eq!(records.len(), 3);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.sub_sequence_number, i as u64);
            assert_eq!(r.sequence_number, seq());
            assert!(r.aggregated);
            assert_eq!(r.encryption_type.as_deref(), Some("KMS"));
            assert_eq!(
                r.approximate_arrival_timestamp,
                Some(SystemTime::UNIX_EPOCH + Duration::from_secs(7))
            );
        }
        assert_eq!(records[0].partition_key, "a");
        assert_eq!(records[0].explicit_hash_key, None);
        assert_eq!(records[1].partition_key, "b");
        assert_eq!(records[1].explicit_hash_key.as_deref(), Some("5"));
        assert_eq!(&records[1].data[..], b"two");
        assert!(records[2].data.is_empty());
    }

    #[test]
    fn data_are_zero_copy_slices() {
        let data = aggregate(&[
            ("a", None, b"first payload"),
            ("b", None, b"second payload"),
        ]);
        let range = data.as_ptr_range();
        let out = deaggregate(parent(data.clone()), &DeaggregationOptions::new());
        for r in out.records() {
            let sub = r.data.as_ptr_range();
            assert!(
                range.start <= sub.start && sub.end <= range.end,
                "not a slice of the input"
            );
        }
    }

    #[test]
    fn not_aggregated_reasons() {
        let reason = |data: Vec<u8>| match deaggregate(
            parent(Bytes::from(data)),
            &DeaggregationOptions::new(),
        ) {
            Deaggregated::NotAggregated { reason, record } => {
                assert_eq!(record.partition_key, "outer");
                assert!(!record.aggregated);
                reason
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(b"plain".to_vec()), NotAggregatedReason::NoMagic);
        assert_eq!(reason(Vec::new()), NotAggregatedReason::NoMagic);
        assert_eq!(
            reason(KPL_MAGIC[..3].to_vec()),
            NotAggregatedReason::NoMagic
        );
        assert_eq!(reason(KPL_MAGIC.to_vec()), NotAggregatedReason::TooShort);
        // Magic + MD5 of an empty protobuf: too short, like the Java KCL.
        assert_eq!(reason(seal(b"").to_vec()), NotAggregatedReason::TooShort);
        let mut bad = aggregate(&[("a", None, b"x")]).to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(reason(bad), NotAggregatedReason::DigestMismatch);
    }

    fn invalid(body: &[u8]) -> InvalidAggregate {
        let data = seal(body);
        match deaggregate(parent(data.clone()), &DeaggregationOptions::new()) {
            Deaggregated::InvalidAggregate { record, reason } => {
                assert_eq!(record, parent(data.clone()));
                assert_eq!(record.data.as_ptr(), data.as_ptr());
                reason
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn validation_failures_pass_the_record_through() {
        // pk table ["k"], record {pk 0, data "x"}.
        let good: &[u8] = &[0x0A, 1, b'k', 0x1A, 5, 0x08, 0, 0x1A, 1, b'x'];
        assert!(deaggregate(parent(seal(good)), &DeaggregationOptions::new()).is_aggregated());

        // Missing data.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 2, 0x08, 0]);
        assert_eq!(r.kind(), "missing_required_field");
        // Missing partition key index.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 3, 0x1A, 1, b'x']);
        assert_eq!(
            r,
            InvalidAggregate::MissingRequiredField {
                message: "Record",
                field: "partition_key_index",
                record: 0
            }
        );
        // Partition key index out of range.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 5, 0x08, 1, 0x1A, 1, b'x']);
        assert_eq!(r.kind(), "partition_key_index_out_of_range");
        // Explicit hash key index out of range.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 7, 0x08, 0, 0x10, 0, 0x1A, 1, b'x']);
        assert_eq!(r.kind(), "explicit_hash_key_index_out_of_range");
        // Malformed explicit hash key (even if unused).
        let r = invalid(&[
            0x0A, 1, b'k', 0x12, 2, b'1', b'x', 0x1A, 5, 0x08, 0, 0x1A, 1, b'x',
        ]);
        assert_eq!(r.kind(), "malformed_explicit_hash_key");
        // Non-UTF-8 partition key.
        let r = invalid(&[0x0A, 1, 0xFF, 0x1A, 5, 0x08, 0, 0x1A, 1, b'x']);
        assert_eq!(r.kind(), "non_utf8_key");
        // Truncated.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 5, 0x08, 0, 0x1A, 1]);
        assert_eq!(r.kind(), "malformed_protobuf");
        // No records.
        assert_eq!(invalid(&[0x0A, 1, b'k']), InvalidAggregate::NoRecords);
        // A known field with the wrong wire type is skipped like an unknown one...
        assert_eq!(invalid(&[0x08, 1]), InvalidAggregate::NoRecords);
        let skipped: &[u8] = &[
            0x0A, 1, b'k', 0x08, 1, 0x1A, 10, 0x08, 0, 0x1D, 0, 0, 0, 0, 0x1A, 1, b'x',
        ];
        let skipped = deaggregate(parent(seal(skipped)), &DeaggregationOptions::new());
        assert_eq!(&skipped.records()[0].data[..], b"x");
        // ...so a required field present only with the wrong wire type is missing.
        let r = invalid(&[0x0A, 1, b'k', 0x1A, 8, 0x0D, 0, 0, 0, 0, 0x1A, 1, b'x']);
        assert_eq!(r.kind(), "missing_required_field");
        // Tag without key.
        let r = invalid(&[
            0x0A, 1, b'k', 0x1A, 9, 0x08, 0, 0x1A, 1, b'x', 0x22, 2, 0x12, 0,
        ]);
        assert_eq!(r.kind(), "missing_required_field");
        // A second record with a bad index: never partial.
        let r = invalid(&[
            0x0A, 1, b'k', 0x1A, 5, 0x08, 0, 0x1A, 1, b'x', 0x1A, 5, 0x08, 3, 0x1A, 1, b'y',
        ]);
        assert_eq!(r.kind(), "partition_key_index_out_of_range");
    }

    #[test]
    fn unknown_fields_tags_and_field_order() {
        // Records before the table, unknown fields everywhere, a tag with key and value.
        let body: &[u8] = &[
            0x1A, 18, 0x1A, 1, b'x', 0x22, 4, 0x0A, 0, 0x12, 0, 0x08, 0, 0x78, 5, 0x35, 0, 0, 0,
            0, // record: data, tag, pk index, unknown varint 15, unknown fixed32 6
            0x48, 0x01, // unknown varint field 9
            0x0A, 1, b'k', // pk table
        ];
        let out = deaggregate(parent(seal(body)), &DeaggregationOptions::new());
        let records = out.into_records();
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].partition_key, "k");
        assert_eq!(&records[0].data[..], b"x");
    }

    #[test]
    fn shard_range_drops_whole_aggregate() {
        let data = aggregate(&[
            ("a", Some("10"), b"1"),
            ("b", Some("20"), b"2"),
            ("c", Some("30"), b"3"),
        ]);
        let all = HashKeyRange::new(10, 30).unwrap();
        let out = deaggregate(parent(data.clone()), &DeaggregationOptions::for_shard(all));
        assert_eq!(out.len(), 3);
        assert!(out.out_of_range().is_none());

        let part = HashKeyRange::new(15, 30).unwrap();
        let out = deaggregate(parent(data.clone()), &DeaggregationOptions::for_shard(part));
        let Deaggregated::DroppedOutOfRange {
            sequence_number,
            sub_records,
            out_of_range: o,
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(out.len(), 0);
        assert_eq!(*sub_records, 3);
        assert_eq!(sequence_number, &seq());
        assert_eq!(o.count, 1);
        assert_eq!(o.first_sub_sequence_number, 0);
        assert_eq!(o.first_partition_key, "a");
        assert_eq!(o.first_hash_key, 10);
        assert!(
            o.to_string()
                .starts_with("1 user record(s) outside shard range 15:30"),
            "{o}"
        );

        let opts = DeaggregationOptions::for_shard(HashKeyRange::new(0, 19).unwrap())
            .with_deliver_out_of_range(true);
        let out = deaggregate(parent(data), &opts);
        let Deaggregated::DeliveredOutOfRange {
            records,
            out_of_range,
        } = &out
        else {
            panic!("{out:?}")
        };
        assert_eq!(records.len(), 3);
        assert_eq!(out_of_range.count, 2);
        assert_eq!(out_of_range.first_sub_sequence_number, 1);
    }

    #[test]
    fn shard_range_uses_partition_key_hash() {
        let data = aggregate(&[("pk-0", None, b"1"), ("pk-0", None, b"2")]);
        let h = partition_key_hash("pk-0");
        let point = HashKeyRange::new(h, h).unwrap();
        assert_eq!(
            deaggregate(
                parent(data.clone()),
                &DeaggregationOptions::for_shard(point)
            )
            .len(),
            2
        );
        let above = HashKeyRange::new(h + 1, u128::MAX).unwrap();
        assert!(
            deaggregate(
                parent(data.clone()),
                &DeaggregationOptions::for_shard(above)
            )
            .is_empty()
        );
        // Plain records are never range-checked.
        let plain = parent(Bytes::from_static(b"plain"));
        assert_eq!(
            deaggregate(plain, &DeaggregationOptions::for_shard(above)).len(),
            1
        );
    }

    #[test]
    fn options_builders() {
        let r = HashKeyRange::new(1, 2).unwrap();
        let mut o = DeaggregationOptions::new();
        assert_eq!(o.shard_range(), None);
        assert!(!o.deliver_out_of_range());
        o.set_shard_range(Some(r)).set_deliver_out_of_range(true);
        assert_eq!(
            o,
            DeaggregationOptions::new()
                .with_shard_range(r)
                .with_deliver_out_of_range(true)
        );
        o.set_shard_range(None);
        assert_eq!(o.shard_range(), None);
    }
}
