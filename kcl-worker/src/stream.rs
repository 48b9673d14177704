//! What the worker needs from Kinesis, as a trait with our own types.
//!
//! [`crate::aws::AwsStreamClient`] implements it on `aws-sdk-kinesis`;
//! `test_util::InMemoryKinesis` (feature `test-util`) implements it in memory.

use std::fmt::Debug;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use kcl_kpl::{HashKeyRange, Record, SequenceNumber};
use kcl_lease::BoxError;

/// The Kinesis service limits the worker and its configuration are built around, in one
/// place.
pub mod limits {
    use std::time::Duration;

    /// The most records one `GetRecords` call returns (and the largest `Limit` it accepts).
    pub const MAX_RECORDS_PER_GET_RECORDS: u32 = 10_000;
    /// `GetRecords` calls per second a shard serves.
    pub const GET_RECORDS_PER_SECOND_PER_SHARD: u32 = 5;
    /// Bytes per second a shard serves to `GetRecords` (2 MiB).
    pub const READ_BYTES_PER_SECOND_PER_SHARD: u64 = 2 * 1024 * 1024;
    /// How long a shard iterator stays valid after `GetShardIterator` returned it.
    pub const SHARD_ITERATOR_LIFETIME: Duration = Duration::from_secs(300);
    /// The largest `MaxResults` `ListShards` accepts.
    pub const MAX_LIST_SHARDS_PAGE_SIZE: u32 = 10_000;
    /// The largest record, data and partition key together (1 MiB).
    pub const MAX_RECORD_BYTES: usize = 1024 * 1024;
    /// How long the service keeps one `SubscribeToShard` subscription open before it ends
    /// it (the consumer then subscribes again from the last continuation sequence number).
    pub const SUBSCRIPTION_LIFETIME: Duration = Duration::from_secs(300);
    /// `SubscribeToShard` calls a consumer may make per second per shard.
    pub const SUBSCRIBE_TO_SHARD_PER_SECOND_PER_SHARD: u32 = 1;
    /// How soon after a successful `SubscribeToShard` a new one for the same consumer and
    /// shard is refused with `ResourceInUseException` (later, it takes the subscription
    /// over).
    pub const RESUBSCRIBE_GRACE: Duration = Duration::from_secs(5);
    /// The most consumers registered on one stream.
    pub const MAX_CONSUMERS_PER_STREAM: usize = 20;
}

/// One shard as `ListShards` describes it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Shard {
    /// The shard id.
    pub shard_id: String,
    /// The parent shard (the split parent, or the first parent of a merge).
    pub parent_shard_id: Option<String>,
    /// The second parent of a merge.
    pub adjacent_parent_shard_id: Option<String>,
    /// The hash keys this shard owns.
    pub hash_key_range: HashKeyRange,
    /// The first sequence number of the shard.
    pub starting_sequence_number: SequenceNumber,
    /// The last sequence number, once the shard is closed.
    pub ending_sequence_number: Option<SequenceNumber>,
}

impl Shard {
    /// Both parents, in order, without gaps.
    pub fn parent_ids(&self) -> impl Iterator<Item = &str> {
        self.parent_shard_id
            .iter()
            .chain(self.adjacent_parent_shard_id.iter())
            .map(String::as_str)
    }

    /// True when the shard is closed (it has an ending sequence number).
    pub fn is_closed(&self) -> bool {
        self.ending_sequence_number.is_some()
    }
}

/// Which shards `ListShards` returns.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ShardFilter {
    /// Shards after this shard id (in id order).
    AfterShardId(String),
    /// Shards open at the trim horizon.
    AtTrimHorizon,
    /// All shards from the trim horizon to the tip.
    FromTrimHorizon,
    /// Shards open now.
    AtLatest,
    /// Shards open at a timestamp.
    AtTimestamp(SystemTime),
    /// Shards open at or after a timestamp.
    FromTimestamp(SystemTime),
}

/// One page of `ListShards`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ShardPage {
    /// The shards in this page.
    pub shards: Vec<Shard>,
    /// The token for the next page, if any.
    pub next_token: Option<String>,
}

/// What `DescribeStreamSummary` tells.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StreamSummary {
    /// The stream name.
    pub stream_name: String,
    /// The stream ARN.
    pub stream_arn: String,
    /// `CREATING`, `ACTIVE`, `UPDATING` or `DELETING`.
    pub status: String,
    /// Number of open shards.
    pub open_shard_count: u32,
    /// Retention in hours.
    pub retention_period_hours: u32,
}

/// Where a shard iterator starts.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum IteratorPosition {
    /// The oldest record.
    TrimHorizon,
    /// After the newest record.
    Latest,
    /// The first record at or after a time.
    AtTimestamp(SystemTime),
    /// The record with this sequence number.
    AtSequenceNumber(SequenceNumber),
    /// The record after this sequence number.
    AfterSequenceNumber(SequenceNumber),
}

/// A child shard announced at a closed parent's end.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ChildShard {
    /// The child's shard id.
    pub shard_id: String,
    /// Its parents (two for a merge).
    pub parent_shard_ids: Vec<String>,
    /// Its hash key range.
    pub hash_key_range: HashKeyRange,
}

/// What `GetRecords` returns.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct GetRecordsOutput {
    /// Raw Kinesis records (not deaggregated; sub-sequence 0).
    pub records: Vec<Record>,
    /// The iterator for the next call; `None` once a closed shard is read to its end.
    pub next_shard_iterator: Option<String>,
    /// How far behind the tip of the shard this response is.
    pub millis_behind_latest: Option<u64>,
    /// The children, in the last response of a closed shard.
    pub child_shards: Vec<ChildShard>,
}

/// The state of a registered stream consumer (enhanced fan-out).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum ConsumerStatus {
    /// Registered, not yet usable.
    Creating,
    /// Usable by `SubscribeToShard`.
    Active,
    /// Being deregistered.
    Deleting,
}

impl ConsumerStatus {
    /// The service's name (`CREATING`, `ACTIVE`, `DELETING`).
    pub fn as_str(self) -> &'static str {
        match self {
            ConsumerStatus::Creating => "CREATING",
            ConsumerStatus::Active => "ACTIVE",
            ConsumerStatus::Deleting => "DELETING",
        }
    }
}

/// A stream consumer as `RegisterStreamConsumer` and `DescribeStreamConsumer` describe it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct StreamConsumer {
    /// The consumer name (unique per stream).
    pub consumer_name: String,
    /// The consumer ARN, given to `SubscribeToShard`.
    pub consumer_arn: String,
    /// The ARN of the stream it is registered on.
    pub stream_arn: String,
    /// Its state.
    pub status: ConsumerStatus,
}

/// One event of a `SubscribeToShard` subscription.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct SubscribeEvent {
    /// Raw Kinesis records (not deaggregated; sub-sequence 0), possibly none.
    pub records: Vec<Record>,
    /// Subscribe again `AFTER_SEQUENCE_NUMBER` of this to continue where the event ends;
    /// `None` in the last event of a closed shard.
    pub continuation_sequence_number: Option<SequenceNumber>,
    /// How far behind the tip of the shard this event is.
    pub millis_behind_latest: Option<u64>,
    /// The children, in the last event of a closed shard.
    pub child_shards: Vec<ChildShard>,
}

impl SubscribeEvent {
    /// True for the last event of a closed shard: it names the children. An event with
    /// neither children nor a continuation is malformed, not an end (the fan-out reader
    /// subscribes again from the last continuation).
    pub fn is_shard_end(&self) -> bool {
        !self.child_shards.is_empty()
    }
}

/// An open `SubscribeToShard` subscription: the events the service pushes.
#[async_trait]
pub trait Subscription: Send + Debug {
    /// The next event; `Ok(None)` when the service ended the subscription (every five
    /// minutes, and after the last event of a closed shard). An error ends the
    /// subscription too.
    async fn next_event(&mut self) -> Result<Option<SubscribeEvent>, StreamError>;
}

/// Errors from stream access.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    /// `ProvisionedThroughputExceeded`, KMS throttling or `LimitExceeded`: back off and retry.
    #[error("kinesis throttled the request")]
    Throttled {
        /// The service's error.
        #[source]
        source: BoxError,
    },
    /// The shard iterator expired: get a new one.
    #[error("shard iterator expired")]
    ExpiredIterator,
    /// The stream does not exist.
    #[error("stream {stream} not found")]
    StreamNotFound {
        /// The stream name.
        stream: String,
    },
    /// The shard (or another resource) does not exist.
    #[error("resource not found: {message}")]
    ResourceNotFound {
        /// What the service said.
        message: String,
    },
    /// `ResourceInUseException`: the resource is busy (a consumer being created or
    /// already registered, a subscription renewed too soon). Retryable after a back-off.
    #[error("resource in use: {message}")]
    ResourceInUse {
        /// What the service said.
        message: String,
    },
    /// The request was rejected as invalid.
    #[error("invalid request: {message}")]
    InvalidArgument {
        /// What the service said.
        message: String,
    },
    /// The service could not be reached (network, timeout).
    #[error("kinesis unreachable")]
    Unreachable {
        /// The transport error.
        #[source]
        source: BoxError,
    },
    /// Another service error (5xx and the like).
    #[error("kinesis service error")]
    Service {
        /// The service's error.
        #[source]
        source: BoxError,
    },
    /// The service returned something this library cannot read.
    #[error("malformed response: {message}")]
    MalformedResponse {
        /// What is wrong.
        message: String,
    },
    /// The call did not finish within the worker's `call_timeout` (it was cancelled). The
    /// service may be unreachable (a hung connection): retry after a back-off.
    #[error("{call} did not finish within {limit:?}")]
    TimedOut {
        /// The call (`GetRecords`, `GetShardIterator`, ...).
        call: &'static str,
        /// The bound that passed.
        limit: Duration,
    },
}

/// What kind of failure a [`StreamError`] is, without its details (for health reports and
/// metrics labels).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum StreamErrorKind {
    /// [`StreamError::Throttled`].
    Throttled,
    /// [`StreamError::ExpiredIterator`].
    ExpiredIterator,
    /// [`StreamError::StreamNotFound`].
    StreamNotFound,
    /// [`StreamError::ResourceNotFound`].
    ResourceNotFound,
    /// [`StreamError::ResourceInUse`].
    ResourceInUse,
    /// [`StreamError::InvalidArgument`].
    InvalidArgument,
    /// [`StreamError::Unreachable`].
    Unreachable,
    /// [`StreamError::Service`].
    Service,
    /// [`StreamError::MalformedResponse`].
    MalformedResponse,
    /// [`StreamError::TimedOut`].
    TimedOut,
}

impl StreamErrorKind {
    /// A short lowercase name (`throttled`, `timed_out`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            StreamErrorKind::Throttled => "throttled",
            StreamErrorKind::ExpiredIterator => "expired_iterator",
            StreamErrorKind::StreamNotFound => "stream_not_found",
            StreamErrorKind::ResourceNotFound => "resource_not_found",
            StreamErrorKind::ResourceInUse => "resource_in_use",
            StreamErrorKind::InvalidArgument => "invalid_argument",
            StreamErrorKind::Unreachable => "unreachable",
            StreamErrorKind::Service => "service",
            StreamErrorKind::MalformedResponse => "malformed_response",
            StreamErrorKind::TimedOut => "timed_out",
        }
    }
}

impl StreamError {
    /// Whether the same call may succeed when retried after a back-off.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StreamError::Throttled { .. }
                | StreamError::Unreachable { .. }
                | StreamError::Service { .. }
                | StreamError::ResourceInUse { .. }
                | StreamError::TimedOut { .. }
        )
    }

    /// The kind of failure.
    pub fn kind(&self) -> StreamErrorKind {
        match self {
            StreamError::Throttled { .. } => StreamErrorKind::Throttled,
            StreamError::ExpiredIterator => StreamErrorKind::ExpiredIterator,
            StreamError::StreamNotFound { .. } => StreamErrorKind::StreamNotFound,
            StreamError::ResourceNotFound { .. } => StreamErrorKind::ResourceNotFound,
            StreamError::ResourceInUse { .. } => StreamErrorKind::ResourceInUse,
            StreamError::InvalidArgument { .. } => StreamErrorKind::InvalidArgument,
            StreamError::Unreachable { .. } => StreamErrorKind::Unreachable,
            StreamError::Service { .. } => StreamErrorKind::Service,
            StreamError::MalformedResponse { .. } => StreamErrorKind::MalformedResponse,
            StreamError::TimedOut { .. } => StreamErrorKind::TimedOut,
        }
    }
}

/// A [`StreamClient`] that bounds every call of another with a timeout on the injected
/// clock ([`kcl_lease::timeouts::within`]); a call that does not finish in time is
/// cancelled and fails with [`StreamError::TimedOut`]. The worker wraps every stream client
/// it is given in one.
#[derive(Debug)]
pub(crate) struct BoundedStreamClient {
    pub(crate) inner: std::sync::Arc<dyn StreamClient>,
    pub(crate) clock: std::sync::Arc<dyn kcl_lease::Clock>,
    pub(crate) limit: Duration,
    /// The bound on each wait for a subscription event.
    pub(crate) event_limit: Duration,
}

impl BoundedStreamClient {
    async fn bound<T>(
        &self,
        call: &'static str,
        fut: impl std::future::Future<Output = Result<T, StreamError>>,
    ) -> Result<T, StreamError> {
        kcl_lease::timeouts::within(&*self.clock, self.limit, fut)
            .await
            .unwrap_or(Err(StreamError::TimedOut {
                call,
                limit: self.limit,
            }))
    }
}

#[async_trait]
impl StreamClient for BoundedStreamClient {
    async fn list_shards_page(
        &self,
        stream: &str,
        next_token: Option<&str>,
        filter: Option<&ShardFilter>,
    ) -> Result<ShardPage, StreamError> {
        self.bound(
            "ListShards",
            self.inner.list_shards_page(stream, next_token, filter),
        )
        .await
    }

    async fn describe_stream_summary(&self, stream: &str) -> Result<StreamSummary, StreamError> {
        self.bound(
            "DescribeStreamSummary",
            self.inner.describe_stream_summary(stream),
        )
        .await
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<String, StreamError> {
        self.bound(
            "GetShardIterator",
            self.inner.get_shard_iterator(stream, shard_id, position),
        )
        .await
    }

    async fn get_records(
        &self,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<GetRecordsOutput, StreamError> {
        self.bound("GetRecords", self.inner.get_records(shard_iterator, limit))
            .await
    }

    async fn register_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.bound(
            "RegisterStreamConsumer",
            self.inner
                .register_stream_consumer(stream_arn, consumer_name),
        )
        .await
    }

    async fn describe_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.bound(
            "DescribeStreamConsumer",
            self.inner
                .describe_stream_consumer(stream_arn, consumer_name),
        )
        .await
    }

    async fn describe_stream_consumer_by_arn(
        &self,
        consumer_arn: &str,
    ) -> Result<StreamConsumer, StreamError> {
        self.bound(
            "DescribeStreamConsumer",
            self.inner.describe_stream_consumer_by_arn(consumer_arn),
        )
        .await
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<Box<dyn Subscription>, StreamError> {
        let inner = self
            .bound(
                "SubscribeToShard",
                self.inner
                    .subscribe_to_shard(consumer_arn, shard_id, position),
            )
            .await?;
        Ok(Box::new(BoundedSubscription {
            inner,
            clock: self.clock.clone(),
            limit: self.event_limit,
        }))
    }
}

/// A [`Subscription`] whose every wait for an event is bounded on the injected clock: a
/// subscription silent for longer is an error ([`StreamError::TimedOut`]), so a stalled
/// connection is torn down and renewed instead of waiting forever.
#[derive(Debug)]
struct BoundedSubscription {
    inner: Box<dyn Subscription>,
    clock: std::sync::Arc<dyn kcl_lease::Clock>,
    limit: Duration,
}

#[async_trait]
impl Subscription for BoundedSubscription {
    async fn next_event(&mut self) -> Result<Option<SubscribeEvent>, StreamError> {
        let limit = self.limit;
        kcl_lease::timeouts::within(&*self.clock, limit, self.inner.next_event())
            .await
            .unwrap_or(Err(StreamError::TimedOut {
                call: "SubscribeToShard event",
                limit,
            }))
    }
}

/// Stream access used by the worker.
#[async_trait]
pub trait StreamClient: Send + Sync + Debug {
    /// One page of `ListShards`: the first page for `stream` (with an optional filter) when
    /// `next_token` is `None`, else the page the token names.
    async fn list_shards_page(
        &self,
        stream: &str,
        next_token: Option<&str>,
        filter: Option<&ShardFilter>,
    ) -> Result<ShardPage, StreamError>;

    /// `DescribeStreamSummary`.
    async fn describe_stream_summary(&self, stream: &str) -> Result<StreamSummary, StreamError>;

    /// `GetShardIterator`.
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<String, StreamError>;

    /// `GetRecords` with at most `limit` records.
    async fn get_records(
        &self,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<GetRecordsOutput, StreamError>;

    /// `RegisterStreamConsumer`: registers `consumer_name` on the stream (its state is
    /// `CREATING` at first). A name already registered is a [`StreamError::ResourceInUse`];
    /// too many consumers or calls a [`StreamError::Throttled`] (`LimitExceededException`).
    async fn register_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError>;

    /// `DescribeStreamConsumer` by stream ARN and consumer name; a consumer that is not
    /// registered is a [`StreamError::ResourceNotFound`].
    async fn describe_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError>;

    /// `DescribeStreamConsumer` by consumer ARN alone; a consumer that is not registered
    /// (never was, or was deregistered) is a [`StreamError::ResourceNotFound`].
    async fn describe_stream_consumer_by_arn(
        &self,
        consumer_arn: &str,
    ) -> Result<StreamConsumer, StreamError>;

    /// `SubscribeToShard`: opens a subscription of the consumer to the shard at `position`.
    /// The service allows one call per second per consumer and shard (else
    /// [`StreamError::Throttled`]), and refuses a new subscription within five seconds of a
    /// successful one with [`StreamError::ResourceInUse`].
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<Box<dyn Subscription>, StreamError>;

    /// Every shard of the stream (follows `next_token` through all pages).
    async fn list_all_shards(
        &self,
        stream: &str,
        filter: Option<&ShardFilter>,
    ) -> Result<Vec<Shard>, StreamError> {
        let mut out = Vec::new();
        let mut page = self.list_shards_page(stream, None, filter).await?;
        loop {
            out.append(&mut page.shards);
            match page.next_token.take() {
                Some(token) => page = self.list_shards_page(stream, Some(&token), None).await?,
                None => return Ok(out),
            }
        }
    }
}
