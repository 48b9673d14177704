//! Fault injection and call statistics of the in-memory Kinesis.

use std::fmt;
use std::time::Duration;

use crate::stream::StreamError;

/// A call of the in-memory Kinesis, for fault injection, latency and statistics.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum Operation {
    /// `ListShards`.
    ListShards,
    /// `DescribeStreamSummary`.
    DescribeStreamSummary,
    /// `GetShardIterator`.
    GetShardIterator,
    /// `GetRecords`.
    GetRecords,
    /// `PutRecord`.
    PutRecord,
    /// `PutRecords`.
    PutRecords,
    /// `RegisterStreamConsumer`.
    RegisterStreamConsumer,
    /// `DescribeStreamConsumer`.
    DescribeStreamConsumer,
    /// `SubscribeToShard` (opening a subscription).
    SubscribeToShard,
    /// Waiting for the next event of a subscription: an error fault ends the subscription
    /// with that error mid-stream; a `Hang` fault makes it silent (no event ever comes).
    SubscribeToShardEvent,
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 10] = [
        Operation::ListShards,
        Operation::DescribeStreamSummary,
        Operation::GetShardIterator,
        Operation::GetRecords,
        Operation::PutRecord,
        Operation::PutRecords,
        Operation::RegisterStreamConsumer,
        Operation::DescribeStreamConsumer,
        Operation::SubscribeToShard,
        Operation::SubscribeToShardEvent,
    ];

    /// The service's name for it (`GetRecords`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Operation::ListShards => "ListShards",
            Operation::DescribeStreamSummary => "DescribeStreamSummary",
            Operation::GetShardIterator => "GetShardIterator",
            Operation::GetRecords => "GetRecords",
            Operation::PutRecord => "PutRecord",
            Operation::PutRecords => "PutRecords",
            Operation::RegisterStreamConsumer => "RegisterStreamConsumer",
            Operation::DescribeStreamConsumer => "DescribeStreamConsumer",
            Operation::SubscribeToShard => "SubscribeToShard",
            Operation::SubscribeToShardEvent => "SubscribeToShardEvent",
        }
    }

    fn index(self) -> usize {
        match self {
            Operation::ListShards => 0,
            Operation::DescribeStreamSummary => 1,
            Operation::GetShardIterator => 2,
            Operation::GetRecords => 3,
            Operation::PutRecord => 4,
            Operation::PutRecords => 5,
            Operation::RegisterStreamConsumer => 6,
            Operation::DescribeStreamConsumer => 7,
            Operation::SubscribeToShard => 8,
            Operation::SubscribeToShardEvent => 9,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an injected fault makes a call do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum FaultKind {
    /// `ProvisionedThroughputExceededException`: [`StreamError::Throttled`].
    Throttle,
    /// `InternalFailure` (HTTP 500): [`StreamError::Service`].
    ServiceError,
    /// The connection failed: [`StreamError::Unreachable`].
    Unreachable,
    /// The call never completes: it stays pending until the caller drops it (a request
    /// whose answer never comes). Puts are synchronous and never hang: a `Hang` fault does
    /// not match them.
    Hang,
    /// `ExpiredIteratorException`: [`StreamError::ExpiredIterator`] (meant for `GetRecords`).
    ExpiredIterator,
}

impl FaultKind {
    /// The error a call hit by this kind returns; `None` for [`FaultKind::Hang`].
    pub(crate) fn to_error(self, operation: Operation) -> Option<StreamError> {
        Some(match self {
            FaultKind::Throttle => throttled(operation),
            FaultKind::ServiceError => StreamError::Service {
                source: Box::new(SimulatedError::new(
                    "InternalFailure",
                    format!("internal failure (injected into {operation})"),
                )),
            },
            FaultKind::Unreachable => StreamError::Unreachable {
                source: Box::new(SimulatedError::new(
                    "ConnectionRefused",
                    format!("connection refused (injected into {operation})"),
                )),
            },
            FaultKind::ExpiredIterator => StreamError::ExpiredIterator,
            FaultKind::Hang => return None,
        })
    }
}

/// `ProvisionedThroughputExceededException` on `operation`.
pub(crate) fn throttled(operation: Operation) -> StreamError {
    StreamError::Throttled {
        source: Box::new(SimulatedError::new(
            "ProvisionedThroughputExceededException",
            format!("Rate exceeded (injected into {operation})"),
        )),
    }
}

/// A fault for the next `count` matching calls of the in-memory Kinesis: the shared design of
/// `kcl_lease::test_util::fault`, with [`FaultKind`] and [`Operation`]. [`Fault::for_key`]
/// takes a shard id: `GetShardIterator` on it and `GetRecords` with one of its iterators
/// match, and `SubscribeToShard` and the event waits of its subscriptions (never
/// `ListShards`, `DescribeStreamSummary`, the consumer calls or the puts).
pub type Fault = kcl_lease::test_util::fault::Fault<FaultKind, Operation>;

/// The cause inside the errors the in-memory Kinesis returns for throttling, service errors
/// and unreachability, shaped like a service error: a code and a message.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SimulatedError {
    code: &'static str,
    message: String,
}

impl SimulatedError {
    pub(crate) fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The service's error code (`ProvisionedThroughputExceededException`, ...).
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for SimulatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for SimulatedError {}

/// How often each operation was called (failed calls included), and what moved.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct KinesisStats {
    /// `ListShards` calls.
    pub list_shards: u64,
    /// `DescribeStreamSummary` calls.
    pub describe_stream_summary: u64,
    /// `GetShardIterator` calls.
    pub get_shard_iterator: u64,
    /// `GetRecords` calls.
    pub get_records: u64,
    /// `PutRecord` calls.
    pub put_record: u64,
    /// `PutRecords` calls.
    pub put_records: u64,
    /// Records stored by `PutRecord` and `PutRecords`.
    pub records_put: u64,
    /// Records returned by `GetRecords`.
    pub records_returned: u64,
    /// Calls answered with an injected fault (or the unreachable switch).
    pub faults_injected: u64,
    /// Calls that hang for good (a `Hang` fault or the hanging switch): never answered.
    pub calls_hung: u64,
    /// `GetRecords` calls refused by the per-shard read rate limit.
    pub read_rate_throttled: u64,
    /// `RegisterStreamConsumer` calls.
    pub register_stream_consumer: u64,
    /// `DescribeStreamConsumer` calls.
    pub describe_stream_consumer: u64,
    /// `SubscribeToShard` calls.
    pub subscribe_to_shard: u64,
    /// Waits for a subscription event (one per `Subscription::next_event`).
    pub subscribe_to_shard_event: u64,
    /// Subscriptions opened (successful `SubscribeToShard` calls).
    pub subscriptions_opened: u64,
    /// `SubscribeToShard` calls refused with `ResourceInUse` (within five seconds of a
    /// successful one, or the consumer not `ACTIVE`).
    pub subscribe_resource_in_use: u64,
    /// `SubscribeToShard` calls refused by the one-per-second limit.
    pub subscribe_throttled: u64,
    /// Subscriptions the fake ended after their five minutes.
    pub subscriptions_expired: u64,
    /// Records pushed in subscription events.
    pub records_pushed: u64,
}

impl KinesisStats {
    /// Calls of one operation.
    pub fn calls(&self, operation: Operation) -> u64 {
        match operation {
            Operation::ListShards => self.list_shards,
            Operation::DescribeStreamSummary => self.describe_stream_summary,
            Operation::GetShardIterator => self.get_shard_iterator,
            Operation::GetRecords => self.get_records,
            Operation::PutRecord => self.put_record,
            Operation::PutRecords => self.put_records,
            Operation::RegisterStreamConsumer => self.register_stream_consumer,
            Operation::DescribeStreamConsumer => self.describe_stream_consumer,
            Operation::SubscribeToShard => self.subscribe_to_shard,
            Operation::SubscribeToShardEvent => self.subscribe_to_shard_event,
        }
    }

    pub(crate) fn count_call(&mut self, operation: Operation) {
        let counter = match operation {
            Operation::ListShards => &mut self.list_shards,
            Operation::DescribeStreamSummary => &mut self.describe_stream_summary,
            Operation::GetShardIterator => &mut self.get_shard_iterator,
            Operation::GetRecords => &mut self.get_records,
            Operation::PutRecord => &mut self.put_record,
            Operation::PutRecords => &mut self.put_records,
            Operation::RegisterStreamConsumer => &mut self.register_stream_consumer,
            Operation::DescribeStreamConsumer => &mut self.describe_stream_consumer,
            Operation::SubscribeToShard => &mut self.subscribe_to_shard,
            Operation::SubscribeToShardEvent => &mut self.subscribe_to_shard_event,
        };
        *counter += 1;
    }
}

/// Registered faults, the unreachable and hanging switches, and latencies.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    rules: kcl_lease::test_util::fault::FaultPlan<FaultKind, Operation>,
    unreachable: bool,
    hanging: bool,
    latency: [Duration; 10],
}

impl Faults {
    pub(crate) fn add(&mut self, fault: Fault) {
        self.rules.inject(fault);
    }

    /// Removes every fault, turns both switches off and every latency to zero.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn set_unreachable(&mut self, unreachable: bool) {
        self.unreachable = unreachable;
    }

    pub(crate) fn set_hanging(&mut self, hanging: bool) {
        self.hanging = hanging;
    }

    /// Whether a call starting now hangs for good (the hanging switch is on).
    pub(crate) fn hanging(&self) -> bool {
        self.hanging
    }

    /// Takes the fault for one call: the unreachable switch, else the first registered
    /// fault that matches (consuming one of its count). `can_hang` is false for the
    /// synchronous puts, which `Hang` faults do not match.
    pub(crate) fn take(
        &mut self,
        operation: Operation,
        key: Option<&str>,
        can_hang: bool,
    ) -> Option<FaultKind> {
        if self.unreachable {
            return Some(FaultKind::Unreachable);
        }
        self.rules
            .take(operation, key, |kind| can_hang || kind != FaultKind::Hang)
    }

    /// The faults still registered, with their remaining counts.
    pub(crate) fn pending(&self) -> Vec<Fault> {
        self.rules.pending()
    }

    pub(crate) fn set_latency(&mut self, operation: Operation, latency: Duration) {
        if let Some(slot) = self.latency.get_mut(operation.index()) {
            *slot = latency;
        }
    }

    pub(crate) fn latency(&self, operation: Operation) -> Duration {
        self.latency
            .get(operation.index())
            .copied()
            .unwrap_or(Duration::ZERO)
    }
}
