//! One resharding scenario, run against any [`StreamClient`], that writes down what a
//! consumer can observe: to show that [`InMemoryKinesis`] answers as a real (or emulated)
//! Kinesis does.
//!
//! Run [`run_conformance_scenario`] once on the fake and once on the service (through
//! `kcl_worker::aws::AwsStreamClient` and a [`StreamAdmin`] on the SDK), and compare the two
//! lists of facts. The facts leave out what legitimately differs (sequence number digits,
//! iterator strings, arrival times) and keep what a consumer relies on: shard ids, parents
//! and hash key ranges, which shard each record went to and in which order it is read, the
//! end of a closed shard (no next iterator, the children), positioning by sequence number
//! and timestamp, `MillisBehindLatest` at the tip, and the error kinds of bad calls.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use kcl_kpl::{HashKeyRange, Record, partition_key_hash};
use kcl_worker::stream::{IteratorPosition, Shard, ShardFilter, StreamClient, StreamError};

use kcl_worker::test_util::kinesis::{InMemoryKinesis, PutResult};

/// The producer and administration calls the scenario needs. Each call returns once the
/// stream is `ACTIVE` again.
#[async_trait]
pub trait StreamAdmin: Send + Sync {
    /// Creates a stream and waits until it is active.
    async fn create_stream(&self, stream: &str, shard_count: u32) -> Result<(), StreamError>;
    /// Puts one record routed by its partition key.
    async fn put_record(
        &self,
        stream: &str,
        partition_key: &str,
        data: Bytes,
    ) -> Result<PutResult, StreamError>;
    /// Splits a shard and waits until the stream is active.
    async fn split_shard(
        &self,
        stream: &str,
        shard_id: &str,
        new_starting_hash_key: u128,
    ) -> Result<(), StreamError>;
    /// Merges two adjacent shards and waits until the stream is active.
    async fn merge_shards(
        &self,
        stream: &str,
        shard_id: &str,
        adjacent_shard_id: &str,
    ) -> Result<(), StreamError>;
}

#[async_trait]
impl StreamAdmin for InMemoryKinesis {
    async fn create_stream(&self, stream: &str, shard_count: u32) -> Result<(), StreamError> {
        InMemoryKinesis::create_stream(self, stream, shard_count)
    }

    async fn put_record(
        &self,
        stream: &str,
        partition_key: &str,
        data: Bytes,
    ) -> Result<PutResult, StreamError> {
        InMemoryKinesis::put_record(self, stream, partition_key, None, data)
    }

    async fn split_shard(
        &self,
        stream: &str,
        shard_id: &str,
        new_starting_hash_key: u128,
    ) -> Result<(), StreamError> {
        InMemoryKinesis::split_shard(self, stream, shard_id, new_starting_hash_key).map(|_| ())
    }

    async fn merge_shards(
        &self,
        stream: &str,
        shard_id: &str,
        adjacent_shard_id: &str,
    ) -> Result<(), StreamError> {
        InMemoryKinesis::merge_shards(self, stream, shard_id, adjacent_shard_id).map(|_| ())
    }
}

/// The name of an error's kind (`StreamNotFound`, `InvalidArgument`, ...).
pub fn error_kind(error: &StreamError) -> &'static str {
    match error {
        StreamError::Throttled { .. } => "Throttled",
        StreamError::ExpiredIterator => "ExpiredIterator",
        StreamError::StreamNotFound { .. } => "StreamNotFound",
        StreamError::ResourceNotFound { .. } => "ResourceNotFound",
        StreamError::InvalidArgument { .. } => "InvalidArgument",
        StreamError::Unreachable { .. } => "Unreachable",
        StreamError::Service { .. } => "Service",
        StreamError::MalformedResponse { .. } => "MalformedResponse",
        _ => "Other",
    }
}

fn outcome<T>(result: Result<T, StreamError>) -> String {
    match result {
        Ok(_) => "ok".to_owned(),
        Err(error) => error_kind(&error).to_owned(),
    }
}

fn describe_shard(shard: &Shard) -> String {
    format!(
        "shard {} parent={} adjacent={} range={} closed={}",
        shard.shard_id,
        shard.parent_shard_id.as_deref().unwrap_or("-"),
        shard.adjacent_parent_shard_id.as_deref().unwrap_or("-"),
        shard.hash_key_range,
        shard.is_closed()
    )
}

fn ids(shards: &[Shard]) -> String {
    shards
        .iter()
        .map(|shard| shard.shard_id.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn record_text(record: &Record) -> String {
    format!(
        "{}={}",
        record.partition_key,
        String::from_utf8_lossy(&record.data)
    )
}

/// The open shard owning `hash_key`.
fn owner(shards: &[Shard], hash_key: u128) -> Result<String, StreamError> {
    shards
        .iter()
        .find(|shard| !shard.is_closed() && shard.hash_key_range.contains(hash_key))
        .map(|shard| shard.shard_id.clone())
        .ok_or_else(|| StreamError::MalformedResponse {
            message: format!("no open shard owns hash key {hash_key}"),
        })
}

/// What reading one shard from `TRIM_HORIZON` to its end (or its tip) gave.
struct ShardRead {
    records: Vec<Record>,
    ended: bool,
    children: Vec<String>,
    millis_at_tip: Option<u64>,
}

async fn read_shard(
    client: &dyn StreamClient,
    stream: &str,
    shard_id: &str,
) -> Result<ShardRead, StreamError> {
    let mut iterator = client
        .get_shard_iterator(stream, shard_id, &IteratorPosition::TrimHorizon)
        .await?;
    let mut read = ShardRead {
        records: Vec::new(),
        ended: false,
        children: Vec::new(),
        millis_at_tip: None,
    };
    // Emulators may answer empty pages before the tip: bounded, generous.
    for _ in 0..50 {
        let output = client.get_records(&iterator, 3).await?;
        let got = output.records.len();
        read.records.extend(output.records);
        match output.next_shard_iterator {
            None => {
                read.ended = true;
                read.children = output
                    .child_shards
                    .iter()
                    .map(|child| {
                        format!("{}<-{}", child.shard_id, child.parent_shard_ids.join("+"))
                    })
                    .collect();
                return Ok(read);
            }
            Some(next) => iterator = next,
        }
        if got == 0 && output.millis_behind_latest == Some(0) {
            read.millis_at_tip = output.millis_behind_latest;
            return Ok(read);
        }
    }
    Ok(read)
}

/// Puts records whose partition keys hash into a chosen range, numbering them.
#[derive(Default)]
struct Producer {
    next_key: u64,
    count: usize,
    facts: Vec<String>,
}

impl Producer {
    /// Puts record `r{count}` with the first key `key-{n}` (from where the last search
    /// stopped) whose hash lies in `range`.
    async fn put(
        &mut self,
        admin: &dyn StreamAdmin,
        stream: &str,
        range: HashKeyRange,
    ) -> Result<(), StreamError> {
        let key = loop {
            let key = format!("key-{}", self.next_key);
            self.next_key += 1;
            if range.contains(partition_key_hash(&key)) {
                break key;
            }
        };
        let data = format!("r{}", self.count);
        self.count += 1;
        let put = admin
            .put_record(stream, &key, Bytes::from(data.clone()))
            .await?;
        self.facts
            .push(format!("put {key}={data} -> {}", put.shard_id));
        Ok(())
    }
}

/// Runs the scenario on a new stream named `stream` and returns the facts observed, one per
/// line.
///
/// The stream gets 3 shards and 12 records; the shard owning hash key 0 is split in the
/// middle, and its two children are merged again, with records put between the steps. Errors that
/// the scenario provokes on purpose are facts; any other error is returned.
pub async fn run_conformance_scenario(
    admin: &dyn StreamAdmin,
    client: &dyn StreamClient,
    stream: &str,
) -> Result<Vec<String>, StreamError> {
    let mut facts = Vec::new();
    // Three shards: 2^128 - 1 divides by 3, so every implementation lays them out alike
    // (kinesis-local splits 2^128 - 1, not 2^128, and is off by one for powers of two).
    admin.create_stream(stream, 3).await?;
    let mut producer = Producer::default();
    let shards = client.list_all_shards(stream, None).await?;
    let original: Vec<HashKeyRange> = shards.iter().map(|shard| shard.hash_key_range).collect();
    for range in original.iter().chain(&original) {
        producer.put(admin, stream, *range).await?;
    }
    let first = owner(&shards, 0)?;
    let first_range = original.first().copied().unwrap_or(HashKeyRange::FULL);
    let last_range = original.last().copied().unwrap_or(HashKeyRange::FULL);
    let middle = first_range.start() + (first_range.end() - first_range.start()) / 2 + 1;
    admin.split_shard(stream, &first, middle).await?;
    let lower = HashKeyRange::new(first_range.start(), middle - 1).unwrap_or(first_range);
    let upper = HashKeyRange::new(middle, first_range.end()).unwrap_or(first_range);
    for range in [lower, upper, last_range, lower, upper] {
        producer.put(admin, stream, range).await?;
    }
    let shards = client.list_all_shards(stream, None).await?;
    let (left, right) = (owner(&shards, 0)?, owner(&shards, middle)?);
    admin.merge_shards(stream, &left, &right).await?;
    for range in [first_range, first_range, last_range] {
        producer.put(admin, stream, range).await?;
    }
    facts.append(&mut producer.facts);

    let shards = client.list_all_shards(stream, None).await?;
    facts.extend(shards.iter().map(describe_shard));
    let latest = client
        .list_all_shards(stream, Some(&ShardFilter::AtLatest))
        .await?;
    facts.push(format!("AT_LATEST: {}", ids(&latest)));
    let after = client
        .list_all_shards(
            stream,
            Some(&ShardFilter::AfterShardId(
                "shardId-000000000001".to_owned(),
            )),
        )
        .await?;
    facts.push(format!(
        "AFTER_SHARD_ID shardId-000000000001: {}",
        ids(&after)
    ));
    let summary = client.describe_stream_summary(stream).await?;
    facts.push(format!(
        "summary: {} {} open={}",
        summary.stream_name, summary.status, summary.open_shard_count
    ));

    let mut by_shard = Vec::new();
    for shard in &shards {
        let read = read_shard(client, stream, &shard.shard_id).await?;
        facts.push(format!(
            "read {}: [{}] ended={} children=[{}] millis_at_tip={:?}",
            shard.shard_id,
            read.records
                .iter()
                .map(record_text)
                .collect::<Vec<_>>()
                .join(" "),
            read.ended,
            read.children.join(" "),
            read.millis_at_tip
        ));
        let increasing = read
            .records
            .windows(2)
            .all(|pair| matches!(pair, [a, b] if a.sequence_number < b.sequence_number));
        facts.push(format!(
            "{} sequence numbers increase: {increasing}",
            shard.shard_id
        ));
        by_shard.push((shard.clone(), read.records));
    }
    // Every child's records come after all of its parents' records.
    for (shard, records) in &by_shard {
        for parent in shard.parent_ids() {
            let parent_max = by_shard
                .iter()
                .filter(|(candidate, _)| candidate.shard_id == parent)
                .flat_map(|(_, records)| records.iter().map(|r| &r.sequence_number))
                .max();
            let child_min = records.iter().map(|r| &r.sequence_number).min();
            if let (Some(parent_max), Some(child_min)) = (parent_max, child_min) {
                facts.push(format!(
                    "{} starts above parent {parent}: {}",
                    shard.shard_id,
                    child_min > parent_max
                ));
            }
        }
    }

    // Positioning, on the last original shard (never resharded).
    let second = owner(&shards, u128::MAX)?;
    let records = by_shard
        .iter()
        .find(|(shard, _)| shard.shard_id == second)
        .map(|(_, records)| records.clone())
        .unwrap_or_default();
    if let Some(record) = records.get(1) {
        let number = record.sequence_number.clone();
        for (name, position) in [
            (
                "AT_SEQUENCE_NUMBER",
                IteratorPosition::AtSequenceNumber(number.clone()),
            ),
            (
                "AFTER_SEQUENCE_NUMBER",
                IteratorPosition::AfterSequenceNumber(number),
            ),
        ] {
            let iterator = client
                .get_shard_iterator(stream, &second, &position)
                .await?;
            let output = client.get_records(&iterator, 1).await?;
            facts.push(format!(
                "{name} of {}: {}",
                record_text(record),
                output.records.first().map(record_text).unwrap_or_default()
            ));
        }
    }
    if let Some(first_record) = records.first() {
        if let Some(arrival) = first_record.approximate_arrival_timestamp {
            let iterator = client
                .get_shard_iterator(stream, &second, &IteratorPosition::AtTimestamp(arrival))
                .await?;
            let output = client.get_records(&iterator, 1).await?;
            facts.push(format!(
                "AT_TIMESTAMP of the first arrival: {}",
                output.records.first().map(record_text).unwrap_or_default()
            ));
        }
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let iterator = client
            .get_shard_iterator(stream, &second, &IteratorPosition::AtTimestamp(long_ago))
            .await?;
        let output = client.get_records(&iterator, 1).await?;
        facts.push(format!(
            "AT_TIMESTAMP 2001: {}",
            output.records.first().map(record_text).unwrap_or_default()
        ));
    }
    let iterator = client
        .get_shard_iterator(stream, &second, &IteratorPosition::Latest)
        .await?;
    let output = client.get_records(&iterator, 10).await?;
    facts.push(format!(
        "LATEST: {} records, millis_behind_latest={:?}, next iterator={}",
        output.records.len(),
        output.millis_behind_latest,
        output.next_shard_iterator.is_some()
    ));
    // A fresh iterator after the end of the closed parent.
    let parent_end = by_shard
        .iter()
        .find(|(shard, _)| shard.shard_id == first)
        .and_then(|(_, records)| records.last())
        .map(|record| record.sequence_number.clone());
    if let Some(last) = parent_end {
        let iterator = client
            .get_shard_iterator(stream, &first, &IteratorPosition::AfterSequenceNumber(last))
            .await?;
        let output = client.get_records(&iterator, 10).await?;
        facts.push(format!(
            "after the end of {first}: {} records, next iterator={}, children={}",
            output.records.len(),
            output.next_shard_iterator.is_some(),
            output
                .child_shards
                .iter()
                .map(|child| child.shard_id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        ));
    }

    // Errors.
    let missing = format!("{stream}-missing");
    facts.push(format!(
        "ListShards of a missing stream: {}",
        outcome(client.list_shards_page(&missing, None, None).await)
    ));
    facts.push(format!(
        "DescribeStreamSummary of a missing stream: {}",
        outcome(client.describe_stream_summary(&missing).await)
    ));
    facts.push(format!(
        "GetShardIterator of a missing stream: {}",
        outcome(
            client
                .get_shard_iterator(&missing, &second, &IteratorPosition::TrimHorizon)
                .await
        )
    ));
    facts.push(format!(
        "GetShardIterator of a missing shard: {}",
        outcome(
            client
                .get_shard_iterator(
                    stream,
                    "shardId-000000000099",
                    &IteratorPosition::TrimHorizon
                )
                .await
        )
    ));
    let iterator = client
        .get_shard_iterator(stream, &second, &IteratorPosition::TrimHorizon)
        .await?;
    facts.push(format!(
        "GetRecords with limit 0: {}",
        outcome(client.get_records(&iterator, 0).await)
    ));
    facts.push(format!(
        "GetRecords with limit 10001: {}",
        outcome(client.get_records(&iterator, 10_001).await)
    ));
    Ok(facts)
}
