//! Enhanced fan-out in the in-memory Kinesis: stream consumers and `SubscribeToShard`
//! subscriptions, under the fake's one lock (nothing awaits here; the waiting is in
//! `InMemorySubscription`).

use std::collections::HashMap;
use std::time::Duration;

use kcl_kpl::SequenceNumber;

use crate::stream::{
    ChildShard, ConsumerStatus, IteratorPosition, StreamConsumer, StreamError, SubscribeEvent,
    limits,
};

use super::faults::{Operation, throttled};
use super::records::millis_between;
use super::stream::ARN_PREFIX;
use super::streams::*;
use super::token::IteratorToken;

/// How often an idle subscription gets an event without records (the service sends one
/// every few seconds, which keeps the continuation number and `MillisBehindLatest` fresh).
pub(crate) const HEARTBEAT: Duration = Duration::from_secs(5);
/// The most records one event carries.
const MAX_EVENT_RECORDS: usize = 10_000;
/// The most bytes (data and keys) one event carries (at least one record).
const MAX_EVENT_BYTES: usize = 2 * 1024 * 1024;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A registered consumer.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerState {
    stream: String,
    incarnation: u64,
    name: String,
    arn: String,
    registered: u64,
}

/// The service's bookkeeping of one consumer's subscriptions to one shard.
#[derive(Debug, Default, Clone)]
struct ShardSubscriptions {
    last_call: Option<u64>,
    last_success: Option<u64>,
    generation: u64,
}

/// Consumers and subscriptions of every stream.
#[derive(Debug, Default)]
pub(crate) struct FanOutState {
    consumers: Vec<ConsumerState>,
    subscriptions: HashMap<(String, usize), ShardSubscriptions>,
    /// How long a registered consumer stays `CREATING`.
    pub(crate) activation_delay: Duration,
}

/// Where an open subscription is.
#[derive(Debug, Clone)]
pub(crate) struct Cursor {
    pub(crate) shard_id: String,
    consumer_arn: String,
    stream: String,
    incarnation: u64,
    shard: usize,
    position: u64,
    generation: u64,
    started: u64,
    last_event: u64,
    continuation: SequenceNumber,
    finished: bool,
}

/// What a subscription has now.
pub(crate) enum Poll {
    /// An event to deliver.
    Event(SubscribeEvent),
    /// Nothing yet: wait until this monotonic time (or a change of the stream).
    WaitUntil(u64),
    /// The subscription is over (five minutes passed, or the shard's last event was sent).
    Ended,
}

fn stream_name_of(stream_arn: &str) -> Result<&str, StreamError> {
    stream_arn
        .strip_prefix(ARN_PREFIX)
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| invalid(format!("StreamARN {stream_arn} is not a stream ARN")))
}

fn consumer_not_found(what: &str) -> StreamError {
    StreamError::ResourceNotFound {
        message: format!("Consumer {what} not found"),
    }
}

impl ConsumerState {
    fn describe(&self, now: Now, delay: Duration) -> StreamConsumer {
        let active = now.mono.saturating_sub(self.registered) >= nanos(delay);
        StreamConsumer {
            consumer_name: self.name.clone(),
            consumer_arn: self.arn.clone(),
            stream_arn: format!("{ARN_PREFIX}{}", self.stream),
            status: if active {
                ConsumerStatus::Active
            } else {
                ConsumerStatus::Creating
            },
        }
    }
}

impl State {
    fn live_consumers<'a>(&'a self, stream: &'a str) -> impl Iterator<Item = &'a ConsumerState> {
        let incarnation = self.streams.get(stream).map(|s| s.incarnation);
        self.fan_out
            .consumers
            .iter()
            .filter(move |c| c.stream == stream && Some(c.incarnation) == incarnation)
    }

    pub(crate) fn register_consumer(
        &mut self,
        stream_arn: &str,
        name: &str,
        now: Now,
    ) -> Result<StreamConsumer, StreamError> {
        let stream = stream_name_of(stream_arn)?.to_owned();
        if name.is_empty()
            || name.len() > 128
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(invalid(format!("ConsumerName {name:?} is invalid")));
        }
        let incarnation = self
            .streams
            .get(&stream)
            .map(|s| s.incarnation)
            .ok_or_else(|| stream_not_found(&stream))?;
        if self.live_consumers(&stream).any(|c| c.name == name) {
            return Err(StreamError::ResourceInUse {
                message: format!("Consumer {name} under stream {stream_arn} already exists"),
            });
        }
        if self.live_consumers(&stream).count() >= limits::MAX_CONSUMERS_PER_STREAM {
            return Err(throttled(Operation::RegisterStreamConsumer));
        }
        let millis = now
            .wall
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let consumer = ConsumerState {
            arn: format!("{stream_arn}/consumer/{name}:{millis}"),
            stream,
            incarnation,
            name: name.to_owned(),
            registered: now.mono,
        };
        let described = consumer.describe(now, self.fan_out.activation_delay);
        self.fan_out.consumers.push(consumer);
        Ok(described)
    }

    pub(crate) fn describe_consumer(
        &self,
        stream_arn: &str,
        name: &str,
        now: Now,
    ) -> Result<StreamConsumer, StreamError> {
        let stream = stream_name_of(stream_arn)?;
        self.live_consumers(stream)
            .find(|c| c.name == name)
            .map(|c| c.describe(now, self.fan_out.activation_delay))
            .ok_or_else(|| consumer_not_found(name))
    }

    /// `DescribeStreamConsumer` by `ConsumerARN` alone, as the service answers it: a
    /// malformed ARN is `InvalidArgument`, an ARN of no registered consumer (never, or
    /// deregistered, or of a deleted stream) `ResourceNotFound`.
    pub(crate) fn describe_consumer_by_arn(
        &self,
        consumer_arn: &str,
        now: Now,
    ) -> Result<StreamConsumer, StreamError> {
        let stream_arn = consumer_arn
            .split_once("/consumer/")
            .map(|(stream_arn, _)| stream_arn)
            .ok_or_else(|| invalid(format!("ConsumerARN {consumer_arn} is not a consumer ARN")))?;
        let stream = stream_name_of(stream_arn)?;
        self.live_consumers(stream)
            .find(|c| c.arn == consumer_arn)
            .map(|c| c.describe(now, self.fan_out.activation_delay))
            .ok_or_else(|| consumer_not_found(consumer_arn))
    }

    pub(crate) fn deregister_consumer(
        &mut self,
        stream_arn: &str,
        name: &str,
    ) -> Result<(), StreamError> {
        let stream = stream_name_of(stream_arn)?.to_owned();
        let before = self.fan_out.consumers.len();
        self.fan_out
            .consumers
            .retain(|c| !(c.stream == stream && c.name == name));
        if self.fan_out.consumers.len() == before {
            return Err(consumer_not_found(name));
        }
        Ok(())
    }

    pub(crate) fn consumer_count(&self, stream: &str) -> usize {
        self.live_consumers(stream).count()
    }

    /// `SubscribeToShard`: checks the consumer and the service's rules, then opens a cursor
    /// at `position`.
    pub(crate) fn subscribe(
        &mut self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
        now: Now,
    ) -> Result<Cursor, StreamError> {
        let consumer = self
            .fan_out
            .consumers
            .iter()
            .find(|c| c.arn == consumer_arn)
            .cloned()
            .filter(|c| {
                self.streams
                    .get(&c.stream)
                    .is_some_and(|s| s.incarnation == c.incarnation)
            })
            .ok_or_else(|| consumer_not_found(consumer_arn))?;
        if consumer.describe(now, self.fan_out.activation_delay).status != ConsumerStatus::Active {
            self.stats.subscribe_resource_in_use += 1;
            return Err(StreamError::ResourceInUse {
                message: format!("Consumer {consumer_arn} is not ACTIVE"),
            });
        }
        let index = self
            .stream(&consumer.stream)?
            .find_shard(shard_id, now.wall)?;
        let key = (consumer_arn.to_owned(), index);
        let mut rules = self
            .fan_out
            .subscriptions
            .get(&key)
            .cloned()
            .unwrap_or_default();
        let within = |at: Option<u64>, d: Duration| {
            at.is_some_and(|at| now.mono < at.saturating_add(nanos(d)))
        };
        let too_soon = within(rules.last_call, Duration::from_secs(1));
        let in_use = within(rules.last_success, limits::RESUBSCRIBE_GRACE);
        rules.last_call = Some(now.mono);
        if too_soon {
            self.fan_out.subscriptions.insert(key, rules);
            self.stats.subscribe_throttled += 1;
            return Err(throttled(Operation::SubscribeToShard));
        }
        if in_use {
            self.fan_out.subscriptions.insert(key, rules);
            self.stats.subscribe_resource_in_use += 1;
            return Err(StreamError::ResourceInUse {
                message: format!(
                    "Another active subscription exists for consumer {consumer_arn} on shard \
                     {shard_id}"
                ),
            });
        }
        // Validates the position like GetShardIterator and finds where it points.
        let token = self.get_shard_iterator(&consumer.stream, shard_id, position, now)?;
        let token = IteratorToken::decode(self.key, &token).ok_or_else(|| internal(index))?;
        let continuation = {
            let shard = self.stream(&consumer.stream)?.shard(index)?;
            token
                .position
                .checked_sub(1)
                .filter(|before| *before >= shard.base)
                .and_then(|before| usize::try_from(before - shard.base).ok())
                .and_then(|offset| shard.records.get(offset))
                .map_or_else(
                    || shard.starting.clone(),
                    |s| s.record.sequence_number.clone(),
                )
        };
        rules.last_success = Some(now.mono);
        rules.generation += 1;
        let generation = rules.generation;
        self.fan_out.subscriptions.insert(key, rules);
        self.stats.subscriptions_opened += 1;
        Ok(Cursor {
            shard_id: shard_id.to_owned(),
            consumer_arn: consumer_arn.to_owned(),
            stream: consumer.stream,
            incarnation: token.incarnation,
            shard: index,
            position: token.position,
            generation,
            started: now.mono,
            last_event: now.mono,
            continuation,
            finished: false,
        })
    }

    /// The next event of a subscription, if any.
    pub(crate) fn poll_subscription(
        &mut self,
        cursor: &mut Cursor,
        now: Now,
    ) -> Result<Poll, StreamError> {
        let gone = || StreamError::ResourceNotFound {
            message: format!(
                "shard {} of stream {} no longer exists",
                cursor.shard_id, cursor.stream
            ),
        };
        if cursor.finished {
            return Ok(Poll::Ended);
        }
        let current = self
            .fan_out
            .subscriptions
            .get(&(cursor.consumer_arn.clone(), cursor.shard))
            .map(|r| r.generation);
        if current != Some(cursor.generation) {
            return Err(StreamError::ResourceInUse {
                message: "another subscription took this one over".to_owned(),
            });
        }
        let consumer_live = self
            .fan_out
            .consumers
            .iter()
            .any(|c| c.arn == cursor.consumer_arn);
        let end = cursor
            .started
            .saturating_add(nanos(limits::SUBSCRIPTION_LIFETIME));
        if now.mono >= end {
            self.stats.subscriptions_expired += 1;
            cursor.finished = true;
            return Ok(Poll::Ended);
        }
        if !consumer_live {
            // Deregistered: the service ends its subscriptions with an error.
            return Err(consumer_not_found(&cursor.consumer_arn));
        }
        let Self { streams, stats, .. } = self;
        let stream = streams
            .get_mut(&cursor.stream)
            .filter(|s| s.incarnation == cursor.incarnation)
            .ok_or_else(gone)?;
        let retention = stream.retention;
        let shard = stream.shards.get_mut(cursor.shard).ok_or_else(gone)?;
        if !shard.is_visible(now.wall, retention) {
            return Err(gone());
        }
        shard.trim(now.wall, retention);
        let start = cursor.position.max(shard.base);
        let offset = usize::try_from(start - shard.base)
            .unwrap_or(usize::MAX)
            .min(shard.records.len());
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut last_arrival = None;
        for stored in shard.records.range(offset..) {
            if records.len() == MAX_EVENT_RECORDS
                || (!records.is_empty() && bytes + stored.size > MAX_EVENT_BYTES)
            {
                break;
            }
            bytes += stored.size;
            last_arrival = Some(stored.arrival);
            records.push(stored.record.clone());
        }
        let next_position = shard.base + (offset + records.len()) as u64;
        let at_tip = next_position == shard.tip();
        let finished = at_tip && !shard.is_open();
        let heartbeat_due = now.mono >= cursor.last_event.saturating_add(nanos(HEARTBEAT));
        if records.is_empty() && !finished && !heartbeat_due {
            return Ok(Poll::WaitUntil(
                cursor.last_event.saturating_add(nanos(HEARTBEAT)).min(end),
            ));
        }
        let millis_behind_latest = match last_arrival {
            Some(arrival) if !at_tip => millis_between(arrival, now.wall),
            _ => 0,
        };
        if let Some(last) = records.last() {
            cursor.continuation = last.sequence_number.clone();
        }
        stats.records_pushed += records.len() as u64;
        cursor.position = next_position;
        cursor.last_event = now.mono;
        let child_shards: Vec<ChildShard> = if finished {
            shard
                .children
                .clone()
                .iter()
                .filter_map(|child| stream.shards.get(*child))
                .map(|child| ChildShard {
                    shard_id: child.id.clone(),
                    parent_shard_ids: child.parent_ids(),
                    hash_key_range: child.range,
                })
                .collect()
        } else {
            Vec::new()
        };
        cursor.finished = finished;
        Ok(Poll::Event(SubscribeEvent {
            records,
            continuation_sequence_number: (!finished).then(|| cursor.continuation.clone()),
            millis_behind_latest: Some(millis_behind_latest),
            child_shards,
        }))
    }
}
