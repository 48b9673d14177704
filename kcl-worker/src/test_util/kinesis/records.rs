//! Records of the in-memory Kinesis: validating and storing puts, reading with `GetRecords`.

use std::time::{Duration, SystemTime};

use crate::stream::{ChildShard, GetRecordsOutput, StreamError};
use bytes::Bytes;
use kcl_kpl::{Record, effective_hash_key};

use super::faults::{Operation, throttled};
use super::iterators::*;
use super::shard::*;
use super::streams::*;
use super::token::IteratorToken;
use super::{PutRecordsEntry, PutResult};

/// The most bytes (data and partition keys) one `GetRecords` returns.
pub(crate) const MAX_GET_RECORDS_BYTES: usize = 10 * 1024 * 1024;
/// The most records one `GetRecords` returns.
pub(crate) const MAX_GET_RECORDS_LIMIT: u32 = crate::stream::limits::MAX_RECORDS_PER_GET_RECORDS;
/// The largest record (data plus partition key).
pub(crate) const MAX_RECORD_BYTES: usize = crate::stream::limits::MAX_RECORD_BYTES;
/// The most entries in one `PutRecords`.
pub(crate) const MAX_PUT_RECORDS_ENTRIES: usize = 500;
/// The most bytes in one `PutRecords`.
pub(crate) const MAX_PUT_RECORDS_BYTES: usize = 5 * 1024 * 1024;

pub(super) fn millis_between(earlier: SystemTime, later: SystemTime) -> u64 {
    later
        .duration_since(earlier)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A validated put, routed later.
pub(super) struct PendingPut {
    pub(super) partition_key: String,
    pub(super) hash_key: u128,
    pub(super) data: Bytes,
}

pub(super) fn validate_put(
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

impl State {
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

    pub(super) fn store(
        &mut self,
        name: &str,
        put: PendingPut,
        now: Now,
    ) -> Result<PutResult, StreamError> {
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
                return Err(throttled(Operation::GetRecords));
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
}
