//! Everything the in-memory Kinesis holds (its streams, faults, statistics and settings),
//! and the stream-level operations: create, delete, describe, list shards, reshard.
//!
//! All of it runs under one lock held by [`InMemoryKinesis`](super::InMemoryKinesis); nothing
//! awaits here or in the sibling modules. Time comes in as [`Now`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use crate::stream::{ShardFilter, ShardPage, StreamError, StreamSummary};

use super::faults::{Faults, KinesisStats, Operation};
use super::sequence::SequenceAllocator;
use super::shard::*;
use super::stream::*;
use super::token::{IteratorToken, PageToken};

/// How long a `ListShards` next token stays valid.
pub(crate) const NEXT_TOKEN_LIFETIME: Duration = Duration::from_secs(5 * 60);

/// The time of a call: monotonic nanoseconds since the fake's base instant, and wall time.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    pub(crate) mono: u64,
    pub(crate) wall: SystemTime,
}

pub(super) fn invalid(message: impl Into<String>) -> StreamError {
    StreamError::InvalidArgument {
        message: message.into(),
    }
}

pub(super) fn internal(index: usize) -> StreamError {
    StreamError::MalformedResponse {
        message: format!("in-memory Kinesis lost track of shard index {index}"),
    }
}

pub(super) fn stream_not_found(name: &str) -> StreamError {
    StreamError::StreamNotFound {
        stream: name.to_owned(),
    }
}

/// Everything the fake holds.
#[derive(Debug)]
pub(crate) struct State {
    pub(super) key: u64,
    pub(super) sequence: SequenceAllocator,
    pub(super) streams: HashMap<String, Stream>,
    pub(super) next_incarnation: u64,
    pub(crate) page_size: u32,
    pub(crate) faults: Faults,
    pub(crate) stats: KinesisStats,
    pub(crate) read_limit: Option<u32>,
    pub(crate) default_retention: Duration,
    /// GetRecords calls still to answer "no records yet" while records are there.
    pub(crate) empty_reads: u32,
    /// Stream consumers and subscriptions (enhanced fan-out).
    pub(crate) fan_out: super::fanout::FanOutState,
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
            fan_out: Default::default(),
            default_retention: Duration::from_secs(24 * 3600),
        }
    }

    pub(crate) fn stream_count(&self) -> usize {
        self.streams.len()
    }

    pub(super) fn stream(&self, name: &str) -> Result<&Stream, StreamError> {
        self.streams.get(name).ok_or_else(|| stream_not_found(name))
    }

    pub(super) fn stream_mut(&mut self, name: &str) -> Result<&mut Stream, StreamError> {
        self.streams
            .get_mut(name)
            .ok_or_else(|| stream_not_found(name))
    }

    /// Takes the injected fault for one call on the shard `key` (if known), counting it:
    /// `Err` with its error, or `Ok(true)` when the call is to hang for good.
    pub(crate) fn take_fault(
        &mut self,
        operation: Operation,
        key: Option<&str>,
        can_hang: bool,
    ) -> Result<bool, StreamError> {
        let Some(kind) = self.faults.take(operation, key, can_hang) else {
            return Ok(false);
        };
        match kind.to_error(operation) {
            Some(error) => {
                self.stats.faults_injected += 1;
                Err(error)
            }
            None => {
                self.stats.calls_hung += 1;
                Ok(true)
            }
        }
    }

    /// The shard id an iterator this fake issued is for (`None` for any other text).
    pub(crate) fn iterator_shard_id(&self, iterator: &str) -> Option<String> {
        IteratorToken::decode(self.key, iterator)
            .map(|token| format!("{SHARD_ID_PREFIX}{:012}", token.shard))
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
}
