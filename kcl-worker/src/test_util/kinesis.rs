//! An in-memory Kinesis that behaves like the service: [`InMemoryKinesis`].
//!
//! It implements [`StreamClient`], so a worker runs against it unchanged, and it has the
//! producer and administration calls a test needs (`put_record`, `split_shard`, ...). Time
//! comes from an injected [`Clock`]: with a manual clock, retention, iterator expiry and
//! `MillisBehindLatest` are driven by the test.
//!
//! ```
//! use bytes::Bytes;
//! use kcl_worker::test_util::kinesis::InMemoryKinesis;
//! use kcl_worker::stream::{IteratorPosition, StreamClient};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap().block_on(async {
//! let kinesis = InMemoryKinesis::new();
//! kinesis.create_stream("orders", 2).unwrap();
//! let put = kinesis
//!     .put_record("orders", "customer-1", None, Bytes::from_static(b"hello"))
//!     .unwrap();
//!
//! let iterator = kinesis
//!     .get_shard_iterator("orders", &put.shard_id, &IteratorPosition::TrimHorizon)
//!     .await
//!     .unwrap();
//! let output = kinesis.get_records(&iterator, 100).await.unwrap();
//! assert_eq!(output.records[0].data, Bytes::from_static(b"hello"));
//! assert_eq!(output.records[0].sequence_number, put.sequence_number);
//! assert_eq!(output.millis_behind_latest, Some(0));
//! # });
//! ```
//!
//! # What it does like the service
//!
//! * **Shards.** `create_stream` splits the 2^128 hash key space evenly (the last shard ends
//!   at 2^128 - 1), with ids `shardId-000000000000`, `shardId-000000000001`, ... Records are
//!   routed by their effective hash key (the explicit hash key, else the MD5 of the
//!   partition key) to the open shard owning it.
//! * **Sequence numbers** are 56-digit decimals that grow with time, strictly increase within
//!   a shard, and start above the parents' numbers in a child shard. A sequence number from
//!   another shard, below the shard's first number, or not yet issued is an
//!   `InvalidArgument` in `GetShardIterator`, as on the service. A valid number whose record
//!   is gone (trimmed) starts at the first record after it.
//! * **Resharding.** `split_shard` and `merge_shards` (the shards must be open and
//!   adjacent) close the parents (they get an ending sequence number) and open children that
//!   name their parents. Reading a closed parent returns its remaining records; the response
//!   that reaches its end has no next iterator and lists the children in `child_shards`. A
//!   fresh iterator at or after the end behaves the same. `update_shard_count` scales
//!   uniformly like the service: the target must be between half and double the open
//!   shards; it first splits every open shard at each boundary of the even layout, then
//!   merges, in each even range, the shards it holds into one. The result is exactly the
//!   even layout of `create_stream`, reached through real splits and merges (so
//!   intermediate shards appear, closed and empty, as on the service). Resharding is
//!   instant: the stream never shows `UPDATING`.
//! * **Retention** (24 h by default, [`InMemoryKinesis::set_retention_period`]): records
//!   whose arrival time is older than the retention period are trimmed on the clock;
//!   `TRIM_HORIZON` starts at the oldest retained record; a closed shard disappears from
//!   `ListShards` (and `GetShardIterator` says it does not exist) once the retention period
//!   has passed since it closed.
//! * **Iterators** expire five minutes (on the clock's monotonic time) after they were
//!   issued: `ExpiredIterator`. An iterator that this fake did not issue (garbage, altered,
//!   from another instance) is an `InvalidArgument`; one of a deleted stream or of a shard
//!   that has left the stream is a `ResourceNotFound`.
//! * **ListShards** pages (1000 shards by default, [`InMemoryKinesis::set_list_shards_page_size`])
//!   in shard id order; the next token carries the stream and the filter, expires after five
//!   minutes (`InvalidArgument`, the service's `ExpiredNextTokenException`), and a filter
//!   given together with a token is ignored. Filters, with `TH` the trim horizon as a time
//!   (retention before now, but not before the stream was created):
//!   `AfterShardId(id)`: shards whose id sorts after `id`; `AtTrimHorizon`: shards open at
//!   `TH`; `FromTrimHorizon`: every shard still listed; `AtLatest`: open shards;
//!   `AtTimestamp(t)`: shards open at `max(t, TH)`; `FromTimestamp(t)`: open shards and the
//!   closed ones that closed at or after `max(t, TH)`. "Open at `t`" means created at or
//!   before `t` and not closed before `t`.
//! * **GetRecords** returns at most `limit` records (a limit of 0 or above 10 000 is an
//!   `InvalidArgument`) and at most 10 MiB of data and keys (always at least one record).
//!   `MillisBehindLatest` is 0 when the response reaches the tip of the shard, else the age
//!   (on the clock) of the last record returned. Records carry their arrival time and
//!   `encryption_type` `NONE`; as on the service, the explicit hash key is not returned.
//! * **Enhanced fan-out.** `register_stream_consumer` registers a consumer per stream (its
//!   ARN `STREAM_ARN/consumer/NAME:MILLIS`; a name in use is `ResourceInUse`, a 21st consumer
//!   `Throttled` as `LimitExceededException`); it is `CREATING` for
//!   [`InMemoryKinesis::set_consumer_activation_delay`] (zero by default), then `ACTIVE`.
//!   `subscribe_to_shard` needs an `ACTIVE` consumer (else `ResourceInUse`), validates the
//!   position like `GetShardIterator`, refuses a second call within one second for the same
//!   consumer and shard (`Throttled`) and a new subscription within five seconds of a
//!   successful one (`ResourceInUse`); later, the new subscription takes over and the old one
//!   fails with `ResourceInUse`. A subscription pushes an event as soon as records arrive
//!   (at most 10 000 records or 2 MiB each), an empty one every five seconds while idle,
//!   each with the continuation sequence number (subscribe `AFTER_SEQUENCE_NUMBER` of it to
//!   continue) and `MillisBehindLatest`; at a closed shard's end, a last event with the
//!   children in `child_shards` and no continuation; after five minutes it ends
//!   (`Ok(None)`). `describe_stream_consumer` answers by stream ARN and name,
//!   `describe_stream_consumer_by_arn` by consumer ARN alone (`ResourceNotFound` for an ARN
//!   of no registered consumer). `deregister_stream_consumer` (test-only, like the service's
//!   `DeregisterStreamConsumer`) removes a consumer at once: its open subscriptions fail
//!   with `ResourceNotFound` naming the consumer, and so does subscribing with its ARN. Faults: an error
//!   [`Fault`] on [`Operation::SubscribeToShardEvent`] ends a subscription mid-stream with
//!   that error; a `Hang` fault there makes it silent.
//! * **Puts** check the partition key (1 to 256 characters), the record size (data and key
//!   up to 1 MiB), the explicit hash key, and for `put_records` 1 to 500 entries and 5 MiB.
//!
//! # What it does not do
//!
//! * Write throughput limits are not enforced. The per-shard read limit is off by default;
//!   [`InMemoryKinesis::set_get_records_rate_limit`] enforces a number of `GetRecords`
//!   calls per second per shard (the service allows 5); the 2 MiB/s byte limit is not.
//! * `put_records` is all or nothing: an invalid entry fails the whole call, there are no
//!   partial failures.
//! * `AT_TIMESTAMP` with a time in the future starts at the current tip; later records are
//!   returned whatever their arrival time.
//! * No encryption, no tags, no stream modes; no `ListStreamConsumers`.
//!
//! # Faults and statistics
//!
//! Faults follow the design of the in-memory lease store: [`InMemoryKinesis::inject`]
//! registers a [`Fault`] of a [`FaultKind`] for the next N calls, optionally only of one
//! [`Operation`] ([`Fault::for_operation`]) and only on one shard ([`Fault::for_key`] with
//! the shard id: `GetShardIterator` on it, `GetRecords` with its iterators). The shortcuts
//! [`throttle_next`](InMemoryKinesis::throttle_next),
//! [`fail_next`](InMemoryKinesis::fail_next) and [`hang_next`](InMemoryKinesis::hang_next)
//! register a fault for any call. A [`FaultKind::Hang`] call never completes: it stays
//! pending until the caller drops it. The switches
//! [`set_unreachable`](InMemoryKinesis::set_unreachable) (every call fails as unreachable)
//! and [`set_hanging`](InMemoryKinesis::set_hanging) (every call started while it is on
//! hangs for good, like a dead NAT) hold until turned off.
//! [`InMemoryKinesis::set_latency`] delays an operation on the clock;
//! [`InMemoryKinesis::expire_iterators`] expires every outstanding iterator at once.
//! [`InMemoryKinesis::stats`] counts the calls of each operation, the injected faults and
//! the hung calls. Puts are synchronous: they can fail by a fault but never hang or wait.

mod fanout;
mod faults;
mod iterators;
mod records;
mod sequence;
mod shard;
mod stream;
mod streams;
mod token;

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::stream::{
    GetRecordsOutput, IteratorPosition, ShardFilter, ShardPage, StreamClient, StreamConsumer,
    StreamError, StreamSummary, SubscribeEvent, Subscription,
};
use async_trait::async_trait;
use bytes::Bytes;
use kcl_kpl::SequenceNumber;
use kcl_lease::{Clock, SystemClock};

pub use faults::{Fault, FaultKind, KinesisStats, Operation, SimulatedError};
use streams::{Now, State};

/// Where a record went: what `PutRecord` answers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PutResult {
    /// The shard that stored the record.
    pub shard_id: String,
    /// The record's sequence number.
    pub sequence_number: SequenceNumber,
}

/// One record of a `put_records` batch.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PutRecordsEntry {
    /// The partition key.
    pub partition_key: String,
    /// The explicit hash key (decimal), overriding the partition key's hash for routing.
    pub explicit_hash_key: Option<String>,
    /// The payload.
    pub data: Bytes,
}

impl PutRecordsEntry {
    /// An entry routed by its partition key.
    pub fn new(partition_key: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self {
            partition_key: partition_key.into(),
            explicit_hash_key: None,
            data: data.into(),
        }
    }

    /// Routes the entry by this explicit hash key (decimal) instead.
    pub fn with_explicit_hash_key(mut self, explicit_hash_key: impl Into<String>) -> Self {
        self.explicit_hash_key = Some(explicit_hash_key.into());
        self
    }
}

struct Inner {
    clock: Arc<dyn Clock>,
    base: Instant,
    state: Mutex<State>,
    /// Woken on every put and reshard, for subscriptions waiting for records.
    changed: tokio::sync::Notify,
}

/// An in-memory Kinesis: see the [module documentation](self) for what it does like the
/// service and what it does not.
///
/// Cloning is cheap and every clone sees the same streams.
#[derive(Clone)]
pub struct InMemoryKinesis {
    inner: Arc<Inner>,
}

impl Default for InMemoryKinesis {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for InMemoryKinesis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("InMemoryKinesis")
            .field("streams", &state.stream_count())
            .field("clock", &self.inner.clock)
            .field("stats", &state.stats)
            .finish_non_exhaustive()
    }
}

/// Distinguishes instances, so one fake refuses another's iterators.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

impl InMemoryKinesis {
    /// An empty fake on the system clock (tokio's timer for sleeping).
    pub fn new() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }

    /// An empty fake on `clock`: arrival timestamps and retention follow its wall time
    /// ([`Clock::system_time`]); iterator and next-token expiry and injected latency its
    /// monotonic time ([`Clock::now`], [`Clock::sleep`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        let instance = NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed);
        let key = instance.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5DEE_CE66_D1CE_4E5B;
        let base = clock.now();
        Self {
            inner: Arc::new(Inner {
                clock,
                base,
                state: Mutex::new(State::new(key)),
                changed: tokio::sync::Notify::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way that
        // matters more than losing the fake: keep going.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> Now {
        let mono = self
            .inner
            .clock
            .now()
            .saturating_duration_since(self.inner.base)
            .as_nanos();
        Now {
            mono: u64::try_from(mono).unwrap_or(u64::MAX),
            wall: self.inner.clock.system_time(),
        }
    }

    /// Counts the call; hangs for good when the hanging switch is on; applies its latency;
    /// then takes an injected fault for it (on the shard `key` when the call is about one).
    async fn begin(&self, operation: Operation, key: Option<&str>) -> Result<(), StreamError> {
        let (hanging, latency) = {
            let mut state = self.state();
            state.stats.count_call(operation);
            let hanging = state.faults.hanging();
            if hanging {
                state.stats.calls_hung += 1;
            }
            (hanging, state.faults.latency(operation))
        };
        if hanging {
            return std::future::pending().await;
        }
        if !latency.is_zero() {
            self.inner.clock.sleep(latency).await;
        }
        let hang = self.state().take_fault(operation, key, true)?;
        if hang {
            tracing::debug!(%operation, ?key, "in-memory Kinesis call hangs (injected)");
            return std::future::pending().await;
        }
        Ok(())
    }

    fn begin_sync(&self, state: &mut State, operation: Operation) -> Result<(), StreamError> {
        state.stats.count_call(operation);
        state.take_fault(operation, None, false).map(|_| ())
    }

    /// Creates a stream with `shard_count` shards covering the hash key space evenly. It is
    /// `ACTIVE` at once. A name in use, an invalid name or a count outside `1..=10000` is an
    /// `InvalidArgument`.
    pub fn create_stream(&self, name: &str, shard_count: u32) -> Result<(), StreamError> {
        let now = self.now();
        self.state().create_stream(name, shard_count, now)
    }

    /// Deletes a stream at once. Its iterators and next tokens stop working.
    pub fn delete_stream(&self, name: &str) -> Result<(), StreamError> {
        let deleted = self.state().delete_stream(name);
        self.inner.changed.notify_waiters();
        deleted
    }

    /// How long a consumer registered from now on stays `CREATING` before it is `ACTIVE`
    /// (zero by default: at once).
    pub fn set_consumer_activation_delay(&self, delay: Duration) {
        self.state().fan_out.activation_delay = delay;
    }

    /// `DeregisterStreamConsumer`: removes the consumer at once; its subscriptions fail
    /// with `ResourceNotFound` at their next event.
    pub fn deregister_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<(), StreamError> {
        let removed = self.state().deregister_consumer(stream_arn, consumer_name);
        self.inner.changed.notify_waiters();
        removed
    }

    /// The consumers registered on a stream.
    pub fn consumer_count(&self, stream: &str) -> usize {
        self.state().consumer_count(stream)
    }

    /// Sets how long records stay readable (24 hours by default). Unlike the service, any
    /// non-zero duration is accepted, so tests can use seconds.
    pub fn set_retention_period(&self, name: &str, retention: Duration) -> Result<(), StreamError> {
        self.state().set_retention(name, retention)
    }

    /// Stores one record; `explicit_hash_key` (decimal) overrides the partition key's hash
    /// for routing.
    pub fn put_record(
        &self,
        stream: &str,
        partition_key: &str,
        explicit_hash_key: Option<&str>,
        data: Bytes,
    ) -> Result<PutResult, StreamError> {
        let now = self.now();
        let mut state = self.state();
        self.begin_sync(&mut state, Operation::PutRecord)?;
        let put = state.put(stream, partition_key, explicit_hash_key, data, now);
        drop(state);
        self.inner.changed.notify_waiters();
        put
    }

    /// Stores a batch, in order, all or nothing (an invalid entry fails the call).
    pub fn put_records(
        &self,
        stream: &str,
        entries: impl IntoIterator<Item = PutRecordsEntry>,
    ) -> Result<Vec<PutResult>, StreamError> {
        let entries: Vec<PutRecordsEntry> = entries.into_iter().collect();
        let now = self.now();
        let mut state = self.state();
        self.begin_sync(&mut state, Operation::PutRecords)?;
        let put = state.put_batch(stream, entries, now);
        drop(state);
        self.inner.changed.notify_waiters();
        put
    }

    /// Splits an open shard: the first child owns `start..new_starting_hash_key`, the second
    /// `new_starting_hash_key..=end`. Returns the children's ids.
    pub fn split_shard(
        &self,
        stream: &str,
        shard_id: &str,
        new_starting_hash_key: u128,
    ) -> Result<[String; 2], StreamError> {
        let now = self.now();
        let split = self
            .state()
            .split(stream, shard_id, new_starting_hash_key, now);
        self.inner.changed.notify_waiters();
        split
    }

    /// Merges two open, adjacent shards; the child's parent is `shard_id` and its adjacent
    /// parent `adjacent_shard_id`. Returns the child's id.
    pub fn merge_shards(
        &self,
        stream: &str,
        shard_id: &str,
        adjacent_shard_id: &str,
    ) -> Result<String, StreamError> {
        let now = self.now();
        let merged = self.state().merge(stream, shard_id, adjacent_shard_id, now);
        self.inner.changed.notify_waiters();
        merged
    }

    /// Uniform scaling to `target` open shards (see the module documentation).
    pub fn update_shard_count(&self, stream: &str, target: u32) -> Result<(), StreamError> {
        let now = self.now();
        let updated = self.state().update_shard_count(stream, target, now);
        self.inner.changed.notify_waiters();
        updated
    }

    /// Sets the most shards one `ListShards` page returns (1000 by default; at most 10 000).
    pub fn set_list_shards_page_size(&self, page_size: NonZeroU32) {
        self.state().page_size = page_size
            .get()
            .min(crate::stream::limits::MAX_LIST_SHARDS_PAGE_SIZE);
    }

    /// Enforces at most `calls_per_second` `GetRecords` calls per shard per second (on the
    /// clock), answering the others with `Throttled`; `None` (the default) enforces nothing.
    pub fn set_get_records_rate_limit(&self, calls_per_second: Option<NonZeroU32>) {
        self.state().read_limit = calls_per_second.map(NonZeroU32::get);
    }

    /// Registers a fault (after the ones already registered): the next
    /// [`Fault::remaining`] matching calls get its [`FaultKind`].
    pub fn inject(&self, fault: Fault) {
        self.state().faults.add(fault);
    }

    /// The next `count` calls (puts included) fail with [`StreamError::Throttled`].
    pub fn throttle_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::Throttle, count));
    }

    /// The next `count` calls (puts included) fail with [`StreamError::Service`].
    pub fn fail_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::ServiceError, count));
    }

    /// The next `count` calls (puts excepted: they are synchronous) never complete: each
    /// stays pending until its caller drops it.
    pub fn hang_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::Hang, count));
    }

    /// While `true`, every call fails with [`StreamError::Unreachable`].
    pub fn set_unreachable(&self, unreachable: bool) {
        self.state().faults.set_unreachable(unreachable);
    }

    /// While `true`, every call that starts hangs for good, as behind a dead NAT: it stays
    /// pending until its caller drops it, even after the switch is turned off again. Calls
    /// started after the switch is off answer normally. Puts are synchronous and are not
    /// affected.
    pub fn set_hanging(&self, hanging: bool) {
        self.state().faults.set_hanging(hanging);
    }

    /// The faults still registered, with their remaining counts.
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.state().faults.pending()
    }

    /// Removes every registered fault, turns the unreachable and hanging switches off and
    /// every latency to zero.
    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Delays every call of `operation` by `latency` on the clock (`Duration::ZERO` to stop).
    /// Puts are synchronous and are not delayed.
    pub fn set_latency(&self, operation: Operation, latency: Duration) {
        self.state().faults.set_latency(operation, latency);
    }

    /// The next `count` GetRecords calls that would return records return none instead
    /// (same position, reusable iterator, `MillisBehindLatest` above zero), as the service
    /// may while records lie further on: a reader must keep reading while behind.
    pub fn empty_reads_next(&self, count: u32) {
        self.state().empty_reads = count;
    }

    /// Expires every shard iterator issued so far.
    pub fn expire_iterators(&self) {
        let now = self.now();
        // Cannot fail without a target.
        let _ = self.state().expire_iterators(None, now);
    }

    /// Expires every shard iterator of one shard issued so far.
    pub fn expire_shard_iterators(&self, stream: &str, shard_id: &str) -> Result<(), StreamError> {
        let now = self.now();
        self.state().expire_iterators(Some((stream, shard_id)), now)
    }

    /// The calls counted so far.
    pub fn stats(&self) -> KinesisStats {
        self.state().stats.clone()
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        self.state().stats = KinesisStats::default();
    }
}

/// A subscription of the in-memory Kinesis (see [`InMemoryKinesis::subscribe_to_shard`]).
#[derive(Debug)]
pub struct InMemorySubscription {
    kinesis: InMemoryKinesis,
    cursor: fanout::Cursor,
    /// Ended by an error: every later call says it is over.
    dead: bool,
}

#[async_trait]
impl Subscription for InMemorySubscription {
    async fn next_event(&mut self) -> Result<Option<SubscribeEvent>, StreamError> {
        if self.dead {
            return Ok(None);
        }
        let began = self
            .kinesis
            .begin(
                Operation::SubscribeToShardEvent,
                Some(&self.cursor.shard_id),
            )
            .await;
        if let Err(e) = began {
            self.dead = true;
            return Err(e);
        }
        loop {
            let notified = self.kinesis.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.kinesis.now();
            let polled = self
                .kinesis
                .state()
                .poll_subscription(&mut self.cursor, now);
            let until = match polled {
                Ok(fanout::Poll::Event(event)) => return Ok(Some(event)),
                Ok(fanout::Poll::Ended) => {
                    self.dead = true;
                    return Ok(None);
                }
                Ok(fanout::Poll::WaitUntil(until)) => until,
                Err(e) => {
                    self.dead = true;
                    return Err(e);
                }
            };
            let wait = Duration::from_nanos(until.saturating_sub(now.mono));
            tokio::select! {
                _ = notified => {}
                _ = self.kinesis.inner.clock.sleep(wait) => {}
            }
        }
    }
}

#[async_trait]
impl StreamClient for InMemoryKinesis {
    async fn register_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.begin(Operation::RegisterStreamConsumer, None).await?;
        let now = self.now();
        self.state()
            .register_consumer(stream_arn, consumer_name, now)
    }

    async fn describe_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.begin(Operation::DescribeStreamConsumer, None).await?;
        let now = self.now();
        self.state()
            .describe_consumer(stream_arn, consumer_name, now)
    }

    async fn describe_stream_consumer_by_arn(
        &self,
        consumer_arn: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.begin(Operation::DescribeStreamConsumer, None).await?;
        let now = self.now();
        self.state().describe_consumer_by_arn(consumer_arn, now)
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<Box<dyn Subscription>, StreamError> {
        self.begin(Operation::SubscribeToShard, Some(shard_id))
            .await?;
        let now = self.now();
        let cursor = self
            .state()
            .subscribe(consumer_arn, shard_id, position, now)?;
        Ok(Box::new(InMemorySubscription {
            kinesis: self.clone(),
            cursor,
            dead: false,
        }))
    }

    async fn list_shards_page(
        &self,
        stream: &str,
        next_token: Option<&str>,
        filter: Option<&ShardFilter>,
    ) -> Result<ShardPage, StreamError> {
        self.begin(Operation::ListShards, None).await?;
        let now = self.now();
        self.state().list_shards(stream, next_token, filter, now)
    }

    async fn describe_stream_summary(&self, stream: &str) -> Result<StreamSummary, StreamError> {
        self.begin(Operation::DescribeStreamSummary, None).await?;
        self.state().describe(stream)
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<String, StreamError> {
        self.begin(Operation::GetShardIterator, Some(shard_id))
            .await?;
        let now = self.now();
        self.state()
            .get_shard_iterator(stream, shard_id, position, now)
    }

    async fn get_records(
        &self,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<GetRecordsOutput, StreamError> {
        let shard_id = self.state().iterator_shard_id(shard_iterator);
        self.begin(Operation::GetRecords, shard_id.as_deref())
            .await?;
        let now = self.now();
        let mut state = self.state();
        let out = state.get_records(shard_iterator, limit, now)?;
        if state.empty_reads > 0 && !out.records.is_empty() {
            // The service may answer "nothing" while records lie further on: same position,
            // the iterator reusable, and the shard still behind.
            state.empty_reads -= 1;
            return Ok(GetRecordsOutput {
                records: Vec::new(),
                next_shard_iterator: Some(shard_iterator.to_owned()),
                millis_behind_latest: Some(out.millis_behind_latest.unwrap_or(0).max(1)),
                child_shards: Vec::new(),
            });
        }
        Ok(out)
    }
}
