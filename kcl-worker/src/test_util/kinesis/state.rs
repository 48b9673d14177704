//! The streams, shards and records of the in-memory Kinesis, and every operation on them.
//!
//! All of it runs under one lock held by [`InMemoryKinesis`](super::InMemoryKinesis); nothing
//! here awaits. Time comes in as [`Now`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, SystemTime};

use crate::stream::{
    ChildShard, GetRecordsOutput, IteratorPosition, Shard, ShardFilter, ShardPage, StreamError,
    StreamSummary,
};
use bytes::Bytes;
use kcl_kpl::{HashKeyRange, MAX_HASH_KEY, Record, SequenceNumber, effective_hash_key};

use super::faults::{Fault, Faults, KinesisStats, Operation};
use super::sequence::{self, MAX_SHARDS_PER_STREAM, SequenceAllocator};
use super::token::{IteratorToken, PageToken};
use super::{PutRecordsEntry, PutResult};

/// How long a shard iterator stays valid after it was issued.
pub(crate) const ITERATOR_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// How long a `ListShards` next token stays valid.
pub(crate) const NEXT_TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);
/// The most bytes (data and partition keys) one `GetRecords` returns.
pub(crate) const MAX_GET_RECORDS_BYTES: usize = 10 * 1024 * 1024;
/// The most records one `GetRecords` returns.
pub(crate) const MAX_GET_RECORDS_LIMIT: u32 = 10_000;
/// The largest record (data plus partition key).
pub(crate) const MAX_RECORD_BYTES: usize = 1024 * 1024;
/// The most entries in one `PutRecords`.
pub(crate) const MAX_PUT_RECORDS_ENTRIES: usize = 500;
/// The most bytes in one `PutRecords`.
pub(crate) const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;
/// The most shards a stream may be created with or scaled to.
pub(crate) const MAX_SHARD_COUNT: u32 = 10_000;
/// The account and region in ARNs (as kinesis-local uses).
const ARN_PREFIX: &str = "arn:aws:kinesis:us-east-1:000000000000:stream/";
const SHARD_ID_PREFIX: &str = "shardId-";

/// The time of a call: monotonic nanoseconds since the fake's base instant, and wall time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    pub(crate) mono: u64,
    pub(crate) wall: SystemTime,
}

/// One stored record.
#[derive(Debug)]
struct Stored {
    value: u128,
    arrival: SystemTime,
    size: usize,
    record: Record,
}

#[derive(Debug)]
struct ShardState {
    id: String,
    parent: Option<String>,
    adjacent_parent: Option<String>,
    range: HashKeyRange,
    starting_value: u128,
    starting: SequenceNumber,
    ending: Option<(u128, SequenceNumber)>,
    created_at: SystemTime,
    closed_at: Option<SystemTime>,
    children: Vec<usize>,
    records: VecDeque<Stored>,
    /// Logical index of `records[0]`: how many records were trimmed.
    base: u64,
    /// Iterators issued under an older epoch are expired.
    epoch: u64,
    /// Monotonic times of the `GetRecords` calls in the last second (for the rate limit).
    recent_reads: VecDeque<u64>,
    last_arrival: SystemTime,
}

impl ShardState {
    fn is_open(&self) -> bool {
        self.ending.is_none()
    }

    fn tip(&self) -> u64 {
        self.base + self.records.len() as u64
    }

    /// A closed shard leaves `ListShards` once the retention period has passed since it
    /// closed (by then every record in it has expired).
    fn is_visible(&self, now: SystemTime, retention: Duration) -> bool {
        self.closed_at
            .is_none_or(|closed| closed.checked_add(retention).is_none_or(|gone| now < gone))
    }

    fn was_open_at(&self, at: SystemTime) -> bool {
        self.created_at <= at && self.closed_at.is_none_or(|closed| closed >= at)
    }

    fn trim(&mut self, now: SystemTime, retention: Duration) {
        while self.records.front().is_some_and(|front| {
            front
                .arrival
                .checked_add(retention)
                .is_some_and(|expiry| expiry <= now)
        }) {
            self.records.pop_front();
            self.base += 1;
        }
    }

    fn parent_ids(&self) -> Vec<String> {
        self.parent
            .iter()
            .chain(self.adjacent_parent.iter())
            .cloned()
            .collect()
    }

    fn describe(&self) -> Shard {
        Shard {
            shard_id: self.id.clone(),
            parent_shard_id: self.parent.clone(),
            adjacent_parent_shard_id: self.adjacent_parent.clone(),
            hash_key_range: self.range,
            starting_sequence_number: self.starting.clone(),
            ending_sequence_number: self.ending.as_ref().map(|(_, number)| number.clone()),
        }
    }
}

#[derive(Debug)]
struct Stream {
    name: String,
    incarnation: u64,
    created_at: SystemTime,
    retention: Duration,
    shards: Vec<ShardState>,
    /// Indexes of the open shards, by the start of their hash key range.
    open: Vec<usize>,
}

impl Stream {
    /// The index of a visible shard, from its id.
    fn find_shard(&self, shard_id: &str, now: SystemTime) -> Result<usize, StreamError> {
        shard_index(shard_id)
            .filter(|index| {
                self.shards.get(*index).is_some_and(|shard| {
                    shard.id == shard_id && shard.is_visible(now, self.retention)
                })
            })
            .ok_or_else(|| StreamError::ResourceNotFound {
                message: format!(
                    "Shard {shard_id} in stream {} under account 000000000000 does not exist",
                    self.name
                ),
            })
    }

    fn shard(&self, index: usize) -> Result<&ShardState, StreamError> {
        self.shards.get(index).ok_or_else(|| internal(index))
    }

    fn shard_mut(&mut self, index: usize) -> Result<&mut ShardState, StreamError> {
        self.shards.get_mut(index).ok_or_else(|| internal(index))
    }

    /// The open shard owning `hash_key`.
    fn route(&self, hash_key: u128) -> Option<usize> {
        let after = self.open.partition_point(|index| {
            self.shards
                .get(*index)
                .is_some_and(|shard| shard.range.start() <= hash_key)
        });
        let index = *self.open.get(after.checked_sub(1)?)?;
        self.shards
            .get(index)
            .filter(|shard| shard.range.contains(hash_key))
            .map(|_| index)
    }

    fn sort_open(&mut self) {
        let shards = &self.shards;
        self.open.sort_by_key(|index| {
            shards
                .get(*index)
                .map_or(MAX_HASH_KEY, |shard| shard.range.start())
        });
    }

    /// The trim horizon as a time: retention before now, but not before the stream existed.
    fn trim_horizon_time(&self, now: SystemTime) -> SystemTime {
        now.checked_sub(self.retention)
            .map_or(self.created_at, |at| at.max(self.created_at))
    }

    /// Adds a shard (open, no records) and returns its index.
    fn add_shard(
        &mut self,
        sequence: &mut SequenceAllocator,
        range: HashKeyRange,
        parents: (Option<String>, Option<String>),
        now: SystemTime,
    ) -> Result<usize, StreamError> {
        let index = self.shards.len();
        if index >= MAX_SHARDS_PER_STREAM {
            return Err(invalid(format!(
                "stream {} has had {MAX_SHARDS_PER_STREAM} shards, the most this fake supports",
                self.name
            )));
        }
        let (starting_value, starting) = sequence.next(now, index);
        self.shards.push(ShardState {
            id: format!("{SHARD_ID_PREFIX}{index:012}"),
            parent: parents.0,
            adjacent_parent: parents.1,
            range,
            starting_value,
            starting,
            ending: None,
            created_at: now,
            closed_at: None,
            children: Vec::new(),
            records: VecDeque::new(),
            base: 0,
            epoch: 0,
            recent_reads: VecDeque::new(),
            last_arrival: now,
        });
        self.open.push(index);
        Ok(index)
    }

    fn close_shard(
        &mut self,
        sequence: &mut SequenceAllocator,
        index: usize,
        children: Vec<usize>,
        now: SystemTime,
    ) -> Result<(), StreamError> {
        let shard = self.shard_mut(index)?;
        shard.ending = Some(sequence.next(now, index));
        shard.closed_at = Some(now);
        shard.children = children;
        self.open.retain(|open| *open != index);
        Ok(())
    }

    fn open_shard(&self, shard_id: &str, now: SystemTime) -> Result<usize, StreamError> {
        let index = self.find_shard(shard_id, now)?;
        if self.shard(index)?.is_open() {
            Ok(index)
        } else {
            Err(invalid(format!(
                "shard {shard_id} in stream {} is closed (ResourceInUseException)",
                self.name
            )))
        }
    }

    /// Splits an open shard. `strict`: the service's rule for `SplitShard`
    /// (`start + 1 < key < end`); `UpdateShardCount`'s internal splits only need both
    /// children non-empty.
    fn split(
        &mut self,
        sequence: &mut SequenceAllocator,
        shard_id: &str,
        new_starting_hash_key: u128,
        strict: bool,
        now: SystemTime,
    ) -> Result<[String; 2], StreamError> {
        let index = self.open_shard(shard_id, now)?;
        let range = self.shard(index)?.range;
        let refused = if strict {
            new_starting_hash_key <= range.start().saturating_add(1)
                || new_starting_hash_key >= range.end()
        } else {
            new_starting_hash_key <= range.start() || new_starting_hash_key > range.end()
        };
        if refused {
            return Err(invalid(format!(
                "NewStartingHashKey {new_starting_hash_key} is not both greater than one plus \
                 the shard's StartingHashKey {} and less than the shard's EndingHashKey {} \
                 (shard {shard_id})",
                range.start(),
                range.end()
            )));
        }
        let left_range = HashKeyRange::new(range.start(), new_starting_hash_key - 1)
            .map_err(|err| invalid(err.to_string()))?;
        let right_range = HashKeyRange::new(new_starting_hash_key, range.end())
            .map_err(|err| invalid(err.to_string()))?;
        if self.shards.len() + 2 > MAX_SHARDS_PER_STREAM {
            return Err(invalid("too many shards for this fake"));
        }
        let first = self.shards.len();
        self.close_shard(sequence, index, vec![first, first + 1], now)?;
        let parents = (Some(shard_id.to_owned()), None);
        let left = self.add_shard(sequence, left_range, parents.clone(), now)?;
        let right = self.add_shard(sequence, right_range, parents, now)?;
        self.sort_open();
        Ok([self.shard(left)?.id.clone(), self.shard(right)?.id.clone()])
    }

    fn merge(
        &mut self,
        sequence: &mut SequenceAllocator,
        shard_id: &str,
        adjacent_shard_id: &str,
        now: SystemTime,
    ) -> Result<String, StreamError> {
        let first = self.open_shard(shard_id, now)?;
        let second = self.open_shard(adjacent_shard_id, now)?;
        let a = self.shard(first)?.range;
        let b = self.shard(second)?.range;
        let adjacent =
            a.end().checked_add(1) == Some(b.start()) || b.end().checked_add(1) == Some(a.start());
        if first == second || !adjacent {
            return Err(invalid(format!(
                "shards {shard_id} and {adjacent_shard_id} are not adjacent"
            )));
        }
        let merged = HashKeyRange::new(a.start().min(b.start()), a.end().max(b.end()))
            .map_err(|err| invalid(err.to_string()))?;
        if self.shards.len() >= MAX_SHARDS_PER_STREAM {
            return Err(invalid("too many shards for this fake"));
        }
        let child = self.shards.len();
        self.close_shard(sequence, first, vec![child], now)?;
        self.close_shard(sequence, second, vec![child], now)?;
        let parents = (
            Some(shard_id.to_owned()),
            Some(adjacent_shard_id.to_owned()),
        );
        let child = self.add_shard(sequence, merged, parents, now)?;
        self.sort_open();
        Ok(self.shard(child)?.id.clone())
    }

    fn open_ids_by_start(&self) -> Vec<(HashKeyRange, String)> {
        self.open
            .iter()
            .filter_map(|index| self.shards.get(*index))
            .map(|shard| (shard.range, shard.id.clone()))
            .collect()
    }

    /// Uniform scaling through splits and merges (see the module docs of `kinesis`).
    fn update_shard_count(
        &mut self,
        sequence: &mut SequenceAllocator,
        target: u32,
        now: SystemTime,
    ) -> Result<(), StreamError> {
        let current = u32::try_from(self.open.len()).unwrap_or(u32::MAX);
        if target == 0
            || target > MAX_SHARD_COUNT
            || target > current.saturating_mul(2)
            || target < current.div_ceil(2)
        {
            return Err(invalid(format!(
                "TargetShardCount {target} must be between half and double the {current} open \
                 shards (and between 1 and {MAX_SHARD_COUNT})"
            )));
        }
        let ranges = even_ranges(target);
        // 1. Split until every target range starts at a shard boundary.
        for range in ranges.iter().skip(1) {
            let boundary = range.start();
            let owner = self
                .open_ids_by_start()
                .into_iter()
                .find(|(owned, _)| owned.contains(boundary));
            if let Some((owned, id)) = owner
                && owned.start() < boundary
            {
                self.split(sequence, &id, boundary, false, now)?;
            }
        }
        // 2. Merge the shards inside each target range into one.
        for range in &ranges {
            loop {
                let inside: Vec<String> = self
                    .open_ids_by_start()
                    .into_iter()
                    .filter(|(owned, _)| range.contains(owned.start()))
                    .map(|(_, id)| id)
                    .take(2)
                    .collect();
                match inside.as_slice() {
                    [first, second] => {
                        self.merge(sequence, first, second, now)?;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// The hash key space split into `count` even ranges (the last ends at 2^128 - 1), as
/// `CreateStream` and uniform scaling lay shards out.
pub(crate) fn even_ranges(count: u32) -> Vec<HashKeyRange> {
    let count = u128::from(count.max(1));
    // floor(2^128 / count), computed without 2^128.
    let step = if MAX_HASH_KEY % count == count - 1 {
        (MAX_HASH_KEY / count).saturating_add(1)
    } else {
        MAX_HASH_KEY / count
    };
    (0..count)
        .filter_map(|i| {
            let start = i.saturating_mul(step);
            let end = if i + 1 == count {
                MAX_HASH_KEY
            } else {
                (i + 1).saturating_mul(step).saturating_sub(1)
            };
            HashKeyRange::new(start, end).ok()
        })
        .collect()
}

fn shard_index(shard_id: &str) -> Option<usize> {
    let digits = shard_id.strip_prefix(SHARD_ID_PREFIX)?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn invalid(message: impl Into<String>) -> StreamError {
    StreamError::InvalidArgument {
        message: message.into(),
    }
}

fn internal(index: usize) -> StreamError {
    StreamError::MalformedResponse {
        message: format!("in-memory Kinesis lost track of shard index {index}"),
    }
}

fn stream_not_found(name: &str) -> StreamError {
    StreamError::StreamNotFound {
        stream: name.to_owned(),
    }
}

fn validate_stream_name(name: &str) -> Result<(), StreamError> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "stream name {name:?} must be 1 to 128 characters of a-z, A-Z, 0-9, _ . -"
        )))
    }
}

fn millis_between(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A validated put, routed later.
struct PendingPut {
    partition_key: String,
    hash_key: u128,
    data: Bytes,
}

fn validate_put(
    partition_key: &str,
    explicit_hash_key: Option<&str>,
    data: Bytes,
) -> Result<PendingPut, StreamError> {
    let key_chars = partition_key.chars().count();
    if !(1..=256).contains(&key_chars) {
        return Err(invalid(format!(
            "partition key must be 1 to 256 characters, got {key_chars}"
        )));
    }
    if data.len() + partition_key.len() > MAX_RECORD_BYTES {
        return Err(invalid(format!(
            "record of {} bytes (data and partition key) is over the {MAX_RECORD_BYTES} byte limit",
            data.len() + partition_key.len()
        )));
    }
    // As the service: 0|([1-9]\d{0,38}) (no leading zeros), then within 0..=2^128-1.
    if let Some(ehk) = explicit_hash_key {
        let canonical = ehk == "0"
            || (ehk.len() <= 39
                && ehk.bytes().all(|b| b.is_ascii_digit())
                && !ehk.starts_with('0'));
        if !canonical {
            return Err(invalid(format!(
                "ExplicitHashKey {ehk:?} does not match the pattern 0|([1-9]\\d{{0,38}})"
            )));
        }
    }
    let hash_key = effective_hash_key(partition_key, explicit_hash_key)
        .map_err(|err| invalid(format!("ExplicitHashKey: {err}")))?;
    Ok(PendingPut {
        partition_key: partition_key.to_owned(),
        hash_key,
        data,
    })
}

/// Everything the fake holds.
#[derive(Debug)]
pub(crate) struct State {
    key: u64,
    sequence: SequenceAllocator,
    streams: HashMap<String, Stream>,
    next_incarnation: u64,
    pub(crate) page_size: u32,
    pub(crate) faults: Faults,
    pub(crate) stats: KinesisStats,
    pub(crate) read_limit: Option<u32>,
    pub(crate) default_retention: Duration,
    /// GetRecords calls still to answer "no records yet" while records are there.
    pub(crate) empty_reads: u32,
}

impl State {
    pub(crate) fn new(key: u64) -> Self {
        Self {
            key,
            sequence: SequenceAllocator::default(),
            streams: HashMap::new(),
            next_incarnation: 1,
            page_size: 1000,
            faults: Faults::default(),
            stats: KinesisStats::default(),
            read_limit: None,
            empty_reads: 0,
            default_retention: Duration::from_secs(24 * 3600),
        }
    }

    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    fn stream(&self, name: &str) -> Result<&Stream, StreamError> {
        self.streams.get(name).ok_or_else(|| stream_not_found(name))
    }

    fn stream_mut(&mut self, name: &str) -> Result<&mut Stream, StreamError> {
        self.streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))
    }

    /// Takes an injected fault, counting it.
    pub(crate) fn take_fault(&mut self, operation: Operation) -> Option<StreamError> {
        let fault = self.faults.take(operation)?;
        self.stats.faults_injected += 1;
        Some(fault.to_error(operation))
    }

    fn take_shard_fault(
        &mut self,
        operation: Operation,
        stream: &str,
        shard: usize,
    ) -> Result<(), StreamError> {
        match self.faults.take_for_shard(operation, stream, shard) {
            Some(fault) => {
                self.stats.faults_injected += 1;
                Err(fault.to_error(operation))
            }
            None => Ok(()),
        }
    }

    pub(crate) fn create_stream(
        &mut self,
        name: &str,
        shard_count: u32,
        now: Now,
    ) -> Result<(), StreamError> {
        validate_stream_name(name)?;
        if shard_count == 0 || shard_count > MAX_SHARD_COUNT {
            return Err(invalid(format!(
                "ShardCount must be between 1 and {MAX_SHARD_COUNT}, got {shard_count}"
            )));
        }
        if self.streams.contains_key(name) {
            return Err(invalid(format!(
                "stream {name} already exists (ResourceInUseException)"
            )));
        }
        let mut stream = Stream {
            name: name.to_owned(),
            incarnation: self.next_incarnation,
            created_at: now.wall,
            retention: self.default_retention,
            shards: Vec::new(),
            open: Vec::new(),
        };
        self.next_incarnation += 1;
        for range in even_ranges(shard_count) {
            stream.add_shard(&mut self.sequence, range, (None, None), now.wall)?;
        }
        self.streams.insert(name.to_owned(), stream);
        Ok(())
    }

    pub(crate) fn delete_stream(&mut self, name: &str) -> Result<(), StreamError> {
        self.streams
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| stream_not_found(name))
    }

    pub(crate) fn set_retention(
        &mut self,
        name: &str,
        retention: Duration,
    ) -> Result<(), StreamError> {
        if retention.is_zero() {
            return Err(invalid("retention period must be above zero"));
        }
        self.stream_mut(name)?.retention = retention;
        Ok(())
    }

    pub(crate) fn split(
        &mut self,
        name: &str,
        shard_id: &str,
        new_starting_hash_key: u128,
        now: Now,
    ) -> Result<[String; 2], StreamError> {
        let Self {
            sequence, streams, ..
        } = self;
        let stream = streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))?;
        stream.split(sequence, shard_id, new_starting_hash_key, true, now.wall)
    }

    pub(crate) fn merge(
        &mut self,
        name: &str,
        shard_id: &str,
        adjacent_shard_id: &str,
        now: Now,
    ) -> Result<String, StreamError> {
        let Self {
            sequence, streams, ..
        } = self;
        let stream = streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))?;
        stream.merge(sequence, shard_id, adjacent_shard_id, now.wall)
    }

    pub(crate) fn update_shard_count(
        &mut self,
        name: &str,
        target: u32,
        now: Now,
    ) -> Result<(), StreamError> {
        let Self {
            sequence, streams, ..
        } = self;
        let stream = streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))?;
        stream.update_shard_count(sequence, target, now.wall)
    }

    pub(crate) fn put(
        &mut self,
        name: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: Bytes,
        now: Now,
    ) -> Result<PutResult, StreamError> {
        // The stream is looked up first, as the service does.
        self.stream(name)?;
        let pending = validate_put(partition_key, explicit_hash_key, data)?;
        self.store(name, pending, now)
    }

    pub(crate) fn put_batch(
        &mut self,
        name: &str,
        entries: Vec<PutRecordsEntry>,
        now: Now,
    ) -> Result<Vec<PutResult>, StreamError> {
        self.stream(name)?;
        if entries.is_empty() || entries.len() > MAX_PUT_RECORDS_ENTRIES {
            return Err(invalid(format!(
                "PutRecords takes 1 to {MAX_PUT_RECORDS_ENTRIES} records, got {}",
                entries.len()
            )));
        }
        let total: usize = entries
            .iter()
            .map(|entry| entry.data.len() + entry.partition_key.len())
            .sum();
        if total > MAX_PUT_RECORDS_BYTES {
            return Err(invalid(format!(
                "PutRecords of {total} bytes is over the {MAX_PUT_RECORDS_BYTES} byte limit"
            )));
        }
        let pending = entries
            .into_iter()
            .map(|entry| {
                validate_put(
                    &entry.partition_key,
                    entry.explicit_hash_key.as_deref(),
                    entry.data,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        pending
            .into_iter()
            .map(|put| self.store(name, put, now))
            .collect()
    }

    fn store(&mut self, name: &str, put: PendingPut, now: Now) -> Result<PutResult, StreamError> {
        let Self {
            sequence,
            streams,
            stats,
            ..
        } = self;
        let stream = streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))?;
        let index = stream.route(put.hash_key).ok_or_else(|| {
            invalid(format!(
                "no open shard owns hash key {} in stream {name}",
                put.hash_key
            ))
        })?;
        let shard = stream.shard_mut(index)?;
        let (value, sequence_number) = sequence.next(now.wall, index);
        let arrival = now.wall.max(shard.last_arrival);
        shard.last_arrival = arrival;
        let size = put.data.len() + put.partition_key.len();
        let record = Record {
            data: put.data,
            partition_key: put.partition_key,
            sequence_number: sequence_number.clone(),
            sub_sequence_number: 0,
            explicit_hash_key: None,
            approximate_arrival_timestamp: Some(arrival),
            encryption_type: Some("NONE".to_owned()),
            aggregated: false,
        };
        shard.records.push_back(Stored {
            value,
            arrival,
            size,
            record,
        });
        stats.records_put += 1;
        Ok(PutResult {
            shard_id: shard.id.clone(),
            sequence_number,
        })
    }

    pub(crate) fn describe(&self, name: &str) -> Result<StreamSummary, StreamError> {
        let stream = self.stream(name)?;
        Ok(StreamSummary {
            stream_name: stream.name.clone(),
            stream_arn: format!("{ARN_PREFIX}{}", stream.name),
            status: "ACTIVE".to_owned(),
            open_shard_count: u32::try_from(stream.open.len()).unwrap_or(u32::MAX),
            retention_period_hours: u32::try_from(stream.retention.as_secs() / 3600)
                .unwrap_or(u32::MAX),
        })
    }

    pub(crate) fn list_shards(
        &self,
        name: &str,
        next_token: Option<&str>,
        filter: Option<&ShardFilter>,
        now: Now,
    ) -> Result<ShardPage, StreamError> {
        let (stream, after, filter) = match next_token {
            Some(text) => {
                let token = PageToken::decode(self.key, text)
                    .ok_or_else(|| invalid("NextToken is invalid"))?;
                if Duration::from_nanos(now.mono.saturating_sub(token.issued)) > NEXT_TOKEN_LIFETIME
                {
                    return Err(invalid("NextToken has expired (ExpiredNextTokenException)"));
                }
                let stream = self
                    .streams
                    .get(&token.stream)
                    .filter(|stream| stream.incarnation == token.incarnation)
                    .ok_or_else(|| stream_not_found(&token.stream))?;
                (stream, Some(token.after), token.filter)
            }
            None => (self.stream(name)?, None, filter.cloned()),
        };
        let horizon = stream.trim_horizon_time(now.wall);
        let matches = |shard: &ShardState| -> Result<bool, StreamError> {
            Ok(match &filter {
                None | Some(ShardFilter::FromTrimHorizon) => true,
                Some(ShardFilter::AfterShardId(id)) => shard.id.as_str() > id.as_str(),
                Some(ShardFilter::AtTrimHorizon) => shard.was_open_at(horizon),
                Some(ShardFilter::AtLatest) => shard.is_open(),
                Some(ShardFilter::AtTimestamp(at)) => shard.was_open_at((*at).max(horizon)),
                Some(ShardFilter::FromTimestamp(at)) => {
                    let at = (*at).max(horizon);
                    shard.closed_at.is_none_or(|closed| closed >= at)
                }
            })
        };
        let page_size = usize::try_from(self.page_size).unwrap_or(usize::MAX);
        let mut shards = Vec::new();
        let mut last_index = None;
        let mut more = false;
        let start = after.map_or(0, |after| after.saturating_add(1));
        for (index, shard) in stream.shards.iter().enumerate().skip(start) {
            if !shard.is_visible(now.wall, stream.retention) || !matches(shard)? {
                continue;
            }
            if shards.len() == page_size {
                more = true;
                break;
            }
            shards.push(shard.describe());
            last_index = Some(index);
        }
        let next_token = match (more, last_index) {
            (true, Some(after)) => Some(
                PageToken {
                    stream: stream.name.clone(),
                    incarnation: stream.incarnation,
                    after,
                    filter,
                    issued: now.mono,
                }
                .encode(self.key),
            ),
            _ => None,
        };
        Ok(ShardPage { shards, next_token })
    }

    pub(crate) fn get_shard_iterator(
        &mut self,
        name: &str,
        shard_id: &str,
        position: &IteratorPosition,
        now: Now,
    ) -> Result<String, StreamError> {
        let stream = self.stream(name)?;
        let index = stream.find_shard(shard_id, now.wall)?;
        let incarnation = stream.incarnation;
        self.take_shard_fault(Operation::GetShardIterator, name, index)?;
        let last_issued = self.sequence.last_value();
        let key = self.key;
        let stream = self.stream_mut(name)?;
        let retention = stream.retention;
        let shard = stream.shard_mut(index)?;
        shard.trim(now.wall, retention);
        let offset = match position {
            IteratorPosition::TrimHorizon => 0,
            IteratorPosition::Latest => shard.records.len(),
            IteratorPosition::AtTimestamp(at) => {
                shard.records.partition_point(|stored| stored.arrival < *at)
            }
            IteratorPosition::AtSequenceNumber(number) => {
                let value = check_sequence_number(shard, index, number, last_issued, name)?;
                shard.records.partition_point(|stored| stored.value < value)
            }
            IteratorPosition::AfterSequenceNumber(number) => {
                let value = check_sequence_number(shard, index, number, last_issued, name)?;
                shard
                    .records
                    .partition_point(|stored| stored.value <= value)
            }
        };
        Ok(IteratorToken {
            stream: name.to_owned(),
            incarnation,
            shard: index,
            epoch: shard.epoch,
            position: shard.base + offset as u64,
            issued: now.mono,
        }
        .encode(key))
    }

    pub(crate) fn get_records(
        &mut self,
        iterator: &str,
        limit: u32,
        now: Now,
    ) -> Result<GetRecordsOutput, StreamError> {
        if limit == 0 || limit > MAX_GET_RECORDS_LIMIT {
            return Err(invalid(format!(
                "Limit must be between 1 and {MAX_GET_RECORDS_LIMIT}, got {limit}"
            )));
        }
        let token = IteratorToken::decode(self.key, iterator)
            .ok_or_else(|| invalid("ShardIterator is invalid"))?;
        let gone = || StreamError::ResourceNotFound {
            message: format!(
                "shard {:012} of stream {} no longer exists",
                token.shard, token.stream
            ),
        };
        {
            let stream = self
                .streams
                .get(&token.stream)
                .filter(|stream| stream.incarnation == token.incarnation)
                .ok_or_else(gone)?;
            let shard = stream.shards.get(token.shard).ok_or_else(gone)?;
            if !shard.is_visible(now.wall, stream.retention) {
                return Err(gone());
            }
            if shard.epoch != token.epoch
                || Duration::from_nanos(now.mono.saturating_sub(token.issued)) > ITERATOR_LIFETIME
            {
                return Err(StreamError::ExpiredIterator);
            }
        }
        self.take_shard_fault(Operation::GetRecords, &token.stream, token.shard)?;
        let Self {
            streams,
            stats,
            read_limit,
            key,
            ..
        } = self;
        let stream = streams.get_mut(&token.stream).ok_or_else(gone)?;
        let retention = stream.retention;
        let shard = stream.shards.get_mut(token.shard).ok_or_else(gone)?;
        if let Some(limit_per_second) = *read_limit {
            let window = 1_000_000_000u64;
            while shard
                .recent_reads
                .front()
                .is_some_and(|at| at.saturating_add(window) <= now.mono)
            {
                shard.recent_reads.pop_front();
            }
            if shard.recent_reads.len() >= usize::try_from(limit_per_second).unwrap_or(usize::MAX) {
                stats.read_rate_throttled += 1;
                return Err(Fault::Throttled.to_error(Operation::GetRecords));
            }
            shard.recent_reads.push_back(now.mono);
        }
        shard.trim(now.wall, retention);
        let start = token.position.max(shard.base);
        let offset = usize::try_from(start - shard.base)
            .unwrap_or(usize::MAX)
            .min(shard.records.len());
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut records = Vec::with_capacity(limit.min(shard.records.len() - offset));
        let mut bytes = 0usize;
        let mut last_arrival = None;
        for stored in shard.records.range(offset..) {
            if records.len() == limit
                || (!records.is_empty() && bytes + stored.size > MAX_GET_RECORDS_BYTES)
            {
                break;
            }
            bytes += stored.size;
            last_arrival = Some(stored.arrival);
            records.push(stored.record.clone());
        }
        let next_position = shard.base + (offset + records.len()) as u64;
        let at_tip = next_position == shard.tip();
        let millis_behind_latest = match last_arrival {
            Some(arrival) if !at_tip => millis_between(arrival, now.wall),
            _ => 0,
        };
        stats.records_returned += records.len() as u64;
        let epoch = shard.epoch;
        let finished = at_tip && !shard.is_open();
        let children = if finished {
            shard.children.clone()
        } else {
            Vec::new()
        };
        let child_shards = children
            .iter()
            .filter_map(|child| stream.shards.get(*child))
            .map(|child| ChildShard {
                shard_id: child.id.clone(),
                parent_shard_ids: child.parent_ids(),
                hash_key_range: child.range,
            })
            .collect();
        let next_shard_iterator = (!finished).then(|| {
            IteratorToken {
                stream: token.stream.clone(),
                incarnation: token.incarnation,
                shard: token.shard,
                epoch,
                position: next_position,
                issued: now.mono,
            }
            .encode(*key)
        });
        Ok(GetRecordsOutput {
            records,
            next_shard_iterator,
            millis_behind_latest: Some(millis_behind_latest),
            child_shards,
        })
    }

    /// Expires every outstanding iterator of one shard, or of all shards.
    pub(crate) fn expire_iterators(
        &mut self,
        target: Option<(&str, &str)>,
        now: Now,
    ) -> Result<(), StreamError> {
        match target {
            None => {
                for shard in self.streams.values_mut().flat_map(|s| s.shards.iter_mut()) {
                    shard.epoch += 1;
                }
                Ok(())
            }
            Some((name, shard_id)) => {
                let stream = self.stream_mut(name)?;
                let index = stream.find_shard(shard_id, now.wall)?;
                stream.shard_mut(index)?.epoch += 1;
                Ok(())
            }
        }
    }

    /// The index of a visible shard (for per-shard faults).
    pub(crate) fn shard_index_of(
        &self,
        name: &str,
        shard_id: &str,
        now: Now,
    ) -> Result<usize, StreamError> {
        self.stream(name)?.find_shard(shard_id, now.wall)
    }
}

fn check_sequence_number(
    shard: &ShardState,
    index: usize,
    number: &SequenceNumber,
    last_issued: u128,
    stream: &str,
) -> Result<u128, StreamError> {
    let value = sequence::value_of(number)
        .filter(|value| sequence::shard_of(*value) == index)
        .filter(|value| *value >= shard.starting_value)
        .filter(|value| match &shard.ending {
            Some((ending, _)) => value <= ending,
            None => *value <= last_issued,
        });
    value.ok_or_else(|| {
        invalid(format!(
            "StartingSequenceNumber {number} used in GetShardIterator on shard {} in stream \
             {stream} under account 000000000000 is invalid",
            shard.id
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_the_space() {
        for count in [1u32, 2, 3, 4, 5, 7, 8, 64, 100, 1000] {
            let ranges = even_ranges(count);
            assert_eq!(ranges.len(), count as usize);
            assert_eq!(ranges[0].start(), 0);
            assert_eq!(ranges.last().unwrap().end(), MAX_HASH_KEY);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end() + 1, pair[1].start());
            }
            let sizes: Vec<u128> = ranges.iter().map(|r| r.end() - r.start()).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= u128::from(count), "{count}: {min} {max}");
        }
        // As the service and kinesis-local lay out three shards.
        let three = even_ranges(3);
        assert_eq!(three[0].end(), 113427455640312821154458202477256070484);
        assert_eq!(three[1].start(), 113427455640312821154458202477256070485);
        assert_eq!(three[2].start(), 226854911280625642308916404954512140970);
        assert_eq!(even_ranges(2)[1].start(), 1u128 << 127);
    }

    #[test]
    fn shard_ids_parse() {
        assert_eq!(shard_index("shardId-000000000003"), Some(3));
        assert_eq!(shard_index("shardId-3"), None);
        assert_eq!(shard_index("shard-000000000003"), None);
    }
}
