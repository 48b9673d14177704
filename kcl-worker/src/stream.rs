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
