//! Building KPL aggregated records (for producers and tests).

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

use crate::hash::{parse_hash_key, partition_key_hash};
use crate::wire::varint_len;
use crate::{Error, KPL_DIGEST_LEN, KPL_MAGIC, MAX_PARTITION_KEY_CHARS, MAX_RECORD_SIZE};

/// The protobuf `AggregatedRecord` (encoding side; deaggregation walks the bytes by hand).
#[derive(Clone, PartialEq, Message)]
struct PbAggregatedRecord {
    #[prost(string, repeated, tag = "1")]
    partition_key_table: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_key_table: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<PbRecord>,
}

/// The protobuf `Record` (tags are never written).
#[derive(Clone, PartialEq, Message)]
struct PbRecord {
    #[prost(uint64, required, tag = "1")]
    partition_key_index: u64,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "bytes", required, tag = "3")]
    data: Bytes,
}

/// The smallest size limit that can hold a user record: a 1-byte partition key (counted
/// once as the outer key), magic, digest, its table entry (3 bytes) and a record with empty
/// data (6 bytes).
const MIN_SIZE_LIMIT: usize = 1 + KPL_MAGIC.len() + KPL_DIGEST_LEN + 3 + 6;

/// One aggregated Kinesis record, ready for `PutRecord(s)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AggregatedRecord {
    /// The partition key to put it with: the first user record's partition key (as the KPL
    /// does).
    pub partition_key: String,
    /// The explicit hash key to put it with: the first user record's effective hash key in
    /// decimal, so the aggregate lands on the shard owning that user record. Always set by
    /// [`Aggregator`].
    pub explicit_hash_key: Option<String>,
    /// Magic, protobuf, MD5.
    pub data: Bytes,
    /// Number of user records inside.
    pub user_records: usize,
}

impl AggregatedRecord {
    /// Bytes Kinesis counts against its 1 MiB record limit: data plus partition key.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// Builds KPL aggregated records, up to a size limit (by default the Kinesis 1 MiB record
/// limit, counting the outer partition key), sharing repeated partition keys and explicit
/// hash keys through the format's tables.
///
/// Every aggregate it returns holds at least one user record; an aggregate of one is still
/// written in the aggregated format (consumers deaggregate it to the same record).
#[derive(Debug, Clone)]
pub struct Aggregator {
    max_size: usize,
    partition_keys: Vec<String>,
    partition_key_lookup: HashMap<String, u64>,
    explicit_hash_keys: Vec<String>,
    explicit_hash_key_lookup: HashMap<String, u64>,
    records: Vec<PbRecord>,
    /// Protobuf bytes the current records need.
    body_len: usize,
    /// Outer partition key and explicit hash key, from the first user record.
    outer: Option<(String, String)>,
}

impl Default for Aggregator {
    fn default() -> Self {
        Self::new()
    }
}

impl Aggregator {
    /// An empty aggregator with the Kinesis limit ([`MAX_RECORD_SIZE`]).
    pub fn new() -> Self {
        Self {
            max_size: MAX_RECORD_SIZE,
            partition_keys: Vec::new(),
            partition_key_lookup: HashMap::new(),
            explicit_hash_keys: Vec::new(),
            explicit_hash_key_lookup: HashMap::new(),
            records: Vec::new(),
            body_len: 0,
            outer: None,
        }
    }

    /// An empty aggregator whose aggregates (data plus outer partition key) stay within
    /// `max_size` bytes. Limits above [`MAX_RECORD_SIZE`], or too small to hold any user
    /// record (under 30 bytes), are refused.
    pub fn with_max_size(max_size: usize) -> Result<Self, Error> {
        if !(MIN_SIZE_LIMIT..=MAX_RECORD_SIZE).contains(&max_size) {
            return Err(Error::InvalidSizeLimit {
                limit: max_size,
                min: MIN_SIZE_LIMIT,
                max: MAX_RECORD_SIZE,
            });
        }
        Ok(Self {
            max_size,
            ..Self::new()
        })
    }

    /// The size limit.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Number of user records in the current aggregate.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the current aggregate holds no user record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Bytes the current aggregate would count against the limit if finished now (data plus
    /// outer partition key); 0 when empty.
    pub fn size_bytes(&self) -> usize {
        match &self.outer {
            Some((partition_key, _)) => {
                partition_key.len() + KPL_MAGIC.len() + self.body_len + KPL_DIGEST_LEN
            }
            None => 0,
        }
    }

    /// Adds a user record.
    ///
    /// Returns `Ok(None)` when it fits in the current aggregate. When it does not, returns
    /// the current aggregate (to send) and starts a new one holding the new record.
    ///
    /// Errors, leaving the aggregator unchanged: a partition key that is empty or longer than
    /// 256 characters ([`Error::InvalidPartitionKey`]), an explicit hash key that is not a
    /// decimal integer in `0..=2^128-1` ([`Error::MalformedHashKey`]), a record that would
    /// not fit even alone ([`Error::UserRecordTooLarge`]).
    pub fn add(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: impl Into<Bytes>,
    ) -> Result<Option<AggregatedRecord>, Error> {
        let chars = partition_key.chars().count();
        if chars == 0 || chars > MAX_PARTITION_KEY_CHARS {
            return Err(Error::InvalidPartitionKey { chars });
        }
        let hash_key = match explicit_hash_key {
            Some(ehk) => parse_hash_key(ehk)?,
            None => partition_key_hash(partition_key),
        };
        let data = data.into();

        let alone = partition_key.len()
            + KPL_MAGIC.len()
            + KPL_DIGEST_LEN
            + record_growth(
                (0, true, partition_key.len()),
                explicit_hash_key.map(|ehk| (0, true, ehk.len())),
                data.len(),
            );
        if alone > self.max_size {
            return Err(Error::UserRecordTooLarge {
                size: alone,
                limit: self.max_size,
            });
        }
        let growth = self.growth(partition_key, explicit_hash_key, data.len());
        if self.records.is_empty() || self.size_bytes() + growth <= self.max_size {
            self.push(partition_key, explicit_hash_key, data, hash_key, growth);
            return Ok(None);
        }
        let full = self.finish();
        let growth = self.growth(partition_key, explicit_hash_key, data.len());
        self.push(partition_key, explicit_hash_key, data, hash_key, growth);
        Ok(full)
    }

    /// Protobuf bytes the current aggregate grows by when this record is added.
    fn growth(
        &self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data_len: usize,
    ) -> usize {
        let pk = lookup(
            &self.partition_key_lookup,
            self.partition_keys.len(),
            partition_key,
        );
        let ehk = explicit_hash_key.map(|ehk| {
            lookup(
                &self.explicit_hash_key_lookup,
                self.explicit_hash_keys.len(),
                ehk,
            )
        });
        record_growth(pk, ehk, data_len)
    }

    fn push(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: Bytes,
        hash_key: u128,
        growth: usize,
    ) {
        if self.records.is_empty() {
            self.outer = Some((partition_key.to_owned(), hash_key.to_string()));
        }
        self.body_len += growth;
        let partition_key_index = intern(
            &mut self.partition_keys,
            &mut self.partition_key_lookup,
            partition_key,
        );
        let explicit_hash_key_index = explicit_hash_key.map(|ehk| {
            intern(
                &mut self.explicit_hash_keys,
                &mut self.explicit_hash_key_lookup,
                ehk,
            )
        });
        self.records.push(PbRecord {
            partition_key_index,
            explicit_hash_key_index,
            data,
        });
    }

    /// Returns the current aggregate (`None` when empty) and starts a new one.
    pub fn finish(&mut self) -> Option<AggregatedRecord> {
        let (partition_key, explicit_hash_key) = self.outer.take()?;
        let message = PbAggregatedRecord {
            partition_key_table: std::mem::take(&mut self.partition_keys),
            explicit_hash_key_table: std::mem::take(&mut self.explicit_hash_keys),
            records: std::mem::take(&mut self.records),
        };
        self.partition_key_lookup.clear();
        self.explicit_hash_key_lookup.clear();
        self.body_len = 0;
        let user_records = message.records.len();
        let body = message.encode_to_vec();
        let mut data = Vec::with_capacity(KPL_MAGIC.len() + body.len() + KPL_DIGEST_LEN);
        data.extend_from_slice(&KPL_MAGIC);
        data.extend_from_slice(&body);
        data.extend_from_slice(&Md5::digest(&body));
        Some(AggregatedRecord {
            partition_key,
            explicit_hash_key: Some(explicit_hash_key),
            data: Bytes::from(data),
            user_records,
        })
    }
}

/// Index a key has (or would get) in a table, whether it is new, and its length.
fn lookup(map: &HashMap<String, u64>, table_len: usize, key: &str) -> (u64, bool, usize) {
    match map.get(key) {
        Some(&index) => (index, false, key.len()),
        None => (table_len as u64, true, key.len()),
    }
}

/// Adds `key` to a table if absent; returns its index.
fn intern(table: &mut Vec<String>, map: &mut HashMap<String, u64>, key: &str) -> u64 {
    let next = table.len() as u64;
    match map.entry(key.to_owned()) {
        Entry::Occupied(e) => *e.get(),
        Entry::Vacant(e) => {
            table.push(key.to_owned());
            *e.insert(next)
        }
    }
}

/// Bytes of one length-delimited field with a one-byte key.
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Protobuf bytes a record adds: new table entries plus the `records` entry. Keys are given
/// as `(table index, new in the table, length)`.
fn record_growth(
    pk: (u64, bool, usize),
    ehk: Option<(u64, bool, usize)>,
    data_len: usize,
) -> usize {
    let (pk_index, pk_new, pk_len) = pk;
    let mut size = 0;
    if pk_new {
        size += len_field(pk_len);
    }
    let mut inner = 1 + varint_len(pk_index) + len_field(data_len);
    if let Some((ehk_index, ehk_new, ehk_len)) = ehk {
        if ehk_new {
            size += len_field(ehk_len);
        }
        inner += 1 + varint_len(ehk_index);
    }
    size + len_field(inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeaggregationOptions, Record, SequenceNumber, deaggregate};

    fn unpack(agg: &AggregatedRecord) -> Vec<Record> {
        let r = Record::new(
            agg.partition_key.clone(),
            SequenceNumber::parse("1").unwrap(),
            agg.data.clone(),
        );
        let out = deaggregate(r, &DeaggregationOptions::new());
        assert!(out.is_aggregated(), "{out:?}");
        out.into_records()
    }

    #[test]
    fn tracked_size_matches_encoding() {
        let mut agg = Aggregator::new();
        let mut expected = 0;
        for i in 0..300usize {
            let pk = format!("key-{}", i % 7);
            let ehk = (i % 3 == 0).then(|| format!("{}", i * 1_000_003));
            let data = vec![b'x'; i * 3];
            assert!(agg.add(&pk, ehk.as_deref(), data).unwrap().is_none());
            expected += 1;
            assert_eq!(agg.len(), expected);
            let size = agg.size_bytes();
            let done = agg.clone().finish().unwrap();
            assert_eq!(done.size_bytes(), size, "after {i}");
        }
        let done = agg.finish().unwrap();
        assert_eq!(done.partition_key, "key-0");
        assert_eq!(done.explicit_hash_key.as_deref(), Some("0"));
        assert_eq!(done.user_records, 300);
        assert!(agg.is_empty());
        assert_eq!(agg.size_bytes(), 0);
        assert!(agg.finish().is_none());
        let records = unpack(&done);
        assert_eq!(records.len(), 300);
        assert_eq!(records[4].partition_key, "key-4");
        assert_eq!(records[4].explicit_hash_key, None);
        assert_eq!(records[6].explicit_hash_key.as_deref(), Some("6000018"));
        assert_eq!(records[299].data.len(), 897);
    }

    #[test]
    fn outer_keys_follow_first_record() {
        let mut agg = Aggregator::new();
        agg.add("pk-0", None, &b"a"[..]).unwrap();
        agg.add("other", Some("5"), &b"b"[..]).unwrap();
        let done = agg.finish().unwrap();
        assert_eq!(done.partition_key, "pk-0");
        assert_eq!(
            done.explicit_hash_key.as_deref(),
            Some("318996840767547934070577442296912359277")
        );
        agg.add("x", Some("0007"), &b"a"[..]).unwrap();
        let done = agg.finish().unwrap();
        assert_eq!(done.explicit_hash_key.as_deref(), Some("7"));
        assert_eq!(unpack(&done)[0].explicit_hash_key.as_deref(), Some("0007"));
    }

    #[test]
    fn keys_are_deduplicated() {
        let mut one = Aggregator::new();
        let mut many = Aggregator::new();
        for i in 0..10 {
            one.add("same", Some("99"), vec![i]).unwrap();
            many.add(&format!("k{i}"), Some(&format!("{i}")), vec![i])
                .unwrap();
        }
        assert!(one.size_bytes() < many.size_bytes());
        let shared = one.finish().unwrap();
        // 1 pk entry (6) + 1 ehk entry (4) + 10 records of 9 bytes each.
        assert_eq!(shared.data.len(), 4 + 6 + 4 + 10 * 9 + 16);
    }

    #[test]
    fn splits_at_the_limit_counting_the_partition_key() {
        let limit = 1000;
        let mut agg = Aggregator::with_max_size(limit).unwrap();
        let mut sent = Vec::new();
        let mut total = 0;
        for i in 0..100u8 {
            if let Some(full) = agg.add("partition", None, vec![i; 40]).unwrap() {
                assert!(full.size_bytes() <= limit);
                // The record that did not fit would have pushed it over.
                assert!(full.size_bytes() + 44 > limit, "{}", full.size_bytes());
                total += full.user_records;
                sent.push(full);
            }
        }
        let last = agg.finish().unwrap();
        total += last.user_records;
        sent.push(last);
        assert_eq!(total, 100);
        let records: Vec<Record> = sent.iter().flat_map(unpack).collect();
        for (i, r) in records.iter().enumerate() {
            assert_eq!(&r.data[..], &[i as u8; 40][..]);
        }
        // Exactly at the limit fits.
        let mut agg = Aggregator::with_max_size(MIN_SIZE_LIMIT).unwrap();
        assert!(agg.add("a", None, Bytes::new()).unwrap().is_none());
        assert_eq!(agg.size_bytes(), MIN_SIZE_LIMIT);
        // The next record starts a new aggregate.
        let full = agg.add("b", None, Bytes::new()).unwrap().unwrap();
        assert_eq!((full.partition_key.as_str(), full.user_records), ("a", 1));
        assert_eq!(agg.len(), 1);
        // A 2-byte key cannot fit at all.
        assert!(matches!(
            agg.add("bb", None, Bytes::new()),
            Err(Error::UserRecordTooLarge { size, limit: MIN_SIZE_LIMIT }) if size == MIN_SIZE_LIMIT + 2
        ));
    }

    #[test]
    fn one_mib_limit() {
        let mut agg = Aggregator::new();
        // Largest data that fits alone with a 1-byte key: outer key, magic, digest, table
        // entry (3), record field around {pk index (2), data field}.
        let total = |n: usize| {
            let inner = 2 + len_field(n);
            1 + 4 + 16 + 3 + len_field(inner)
        };
        let mut n = MAX_RECORD_SIZE;
        while total(n) > MAX_RECORD_SIZE {
            n -= 1;
        }
        assert!(agg.add("k", None, vec![0u8; n]).unwrap().is_none());
        assert_eq!(agg.size_bytes(), MAX_RECORD_SIZE);
        let done = agg.finish().unwrap();
        assert_eq!(done.size_bytes(), MAX_RECORD_SIZE);
        let err = agg.add("k", None, vec![0u8; n + 1]).unwrap_err();
        assert!(matches!(
            err,
            Error::UserRecordTooLarge {
                limit: MAX_RECORD_SIZE,
                ..
            }
        ));
        // A longer outer partition key counts too.
        assert!(agg.add("kk", None, vec![0u8; n]).is_err());
        assert!(agg.is_empty());
    }

    #[test]
    fn errors_leave_the_aggregator_unchanged() {
        let mut agg = Aggregator::with_max_size(100).unwrap();
        agg.add("a", None, &b"1"[..]).unwrap();
        let before = agg.size_bytes();
        assert_eq!(
            agg.add("", None, &b"1"[..]),
            Err(Error::InvalidPartitionKey { chars: 0 })
        );
        let long = "é".repeat(257);
        assert_eq!(
            agg.add(&long, None, &b"1"[..]),
            Err(Error::InvalidPartitionKey { chars: 257 })
        );
        assert!(
            agg.add(&"é".repeat(256), None, &b""[..]).is_err(),
            "too large for 100 bytes"
        );
        for bad in ["", "x", "-1", "340282366920938463463374607431768211456"] {
            assert!(matches!(
                agg.add("a", Some(bad), &b"1"[..]),
                Err(Error::MalformedHashKey { .. })
            ));
        }
        assert!(agg.add("a", None, vec![0; 200]).is_err());
        assert_eq!(agg.size_bytes(), before);
        assert_eq!(agg.len(), 1);
        assert!(Aggregator::with_max_size(MIN_SIZE_LIMIT - 1).is_err());
        assert!(Aggregator::with_max_size(MAX_RECORD_SIZE + 1).is_err());
        assert_eq!(Aggregator::default().max_size(), MAX_RECORD_SIZE);
    }
}
