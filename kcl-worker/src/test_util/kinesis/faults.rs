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
}

impl Operation {
    /// Every operation.
    pub const ALL: [Operation; 6] = [
        Operation::ListShards,
        Operation::DescribeStreamSummary,
        Operation::GetShardIterator,
        Operation::GetRecords,
        Operation::PutRecord,
        Operation::PutRecords,
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
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failure the in-memory Kinesis can be told to return.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Fault {
    /// `ProvisionedThroughputExceededException`: [`StreamError::Throttled`].
    Throttled,
    /// `InternalFailure` (HTTP 500): [`StreamError::Service`].
    ServiceError,
    /// The connection failed: [`StreamError::Unreachable`].
    Unreachable,
    /// `ExpiredIteratorException`: [`StreamError::ExpiredIterator`] (meant for `GetRecords`).
    ExpiredIterator,
}

impl Fault {
    pub(crate) fn to_error(self, operation: Operation) -> StreamError {
        match self {
            Fault::Throttled => StreamError::Throttled {
                source: Box::new(SimulatedError::new(
                    "ProvisionedThroughputExceededException",
                    format!("Rate exceeded (injected into {operation})"),
                )),
            },
            Fault::ServiceError => StreamError::Service {
                source: Box::new(SimulatedError::new(
                    "InternalFailure",
                    format!("internal failure (injected into {operation})"),
                )),
            },
            Fault::Unreachable => StreamError::Unreachable {
                source: Box::new(SimulatedError::new(
                    "ConnectionRefused",
                    format!("connection refused (injected into {operation})"),
                )),
            },
            Fault::ExpiredIterator => StreamError::ExpiredIterator,
        }
    }
}

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
    /// Calls answered with an injected fault.
    pub faults_injected: u64,
    /// `GetRecords` calls refused by the per-shard read rate limit.
    pub read_rate_throttled: u64,
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
        };
        *counter += 1;
    }
}

/// One "fail the next N calls" instruction.
#[derive(Clone, Debug)]
struct FaultRule {
    /// `None`: any operation.
    operation: Option<Operation>,
    /// `(stream, shard index)`: only calls on that shard.
    shard: Option<(String, usize)>,
    fault: Fault,
    remaining: u32,
}

/// Pending faults and latencies.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    rules: Vec<FaultRule>,
    latency: [Duration; 6],
}

impl Faults {
    pub(crate) fn add(
        &mut self,
        operation: Option<Operation>,
        shard: Option<(String, usize)>,
        fault: Fault,
        count: u32,
    ) {
        if count > 0 {
            self.rules.push(FaultRule {
                operation,
                shard,
                fault,
                remaining: count,
            });
        }
    }

    pub(crate) fn clear(&mut self) {
        self.rules.clear();
    }

    /// Takes one fault for a call that is not (yet) tied to a shard: rules without a shard.
    pub(crate) fn take(&mut self, operation: Operation) -> Option<Fault> {
        self.take_matching(operation, None)
    }

    /// Takes one fault for a call on a shard: only rules aimed at that shard.
    pub(crate) fn take_for_shard(
        &mut self,
        operation: Operation,
        stream: &str,
        shard: usize,
    ) -> Option<Fault> {
        self.take_matching(operation, Some((stream, shard)))
    }

    fn take_matching(
        &mut self,
        operation: Operation,
        shard: Option<(&str, usize)>,
    ) -> Option<Fault> {
        if self.rules.is_empty() {
            return None;
        }
        let position = self.rules.iter().position(|rule| {
            rule.operation.is_none_or(|op| op == operation)
                && match (&rule.shard, shard) {
                    (None, None) => true,
                    (Some((rule_stream, rule_shard)), Some((stream, index))) => {
                        rule_stream == stream && *rule_shard == index
                    }
                    _ => false,
                }
        })?;
        let rule = self.rules.get_mut(position)?;
        let fault = rule.fault;
        rule.remaining = rule.remaining.saturating_sub(1);
        if rule.remaining == 0 {
            self.rules.remove(position);
        }
        Some(fault)
    }

    pub(crate) fn pending(&self) -> u64 {
        self.rules
            .iter()
            .map(|rule| u64::from(rule.remaining))
            .sum()
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
