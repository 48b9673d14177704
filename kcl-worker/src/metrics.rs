//! Names of the metrics the worker records through the `metrics` facade. The binary chooses
//! the exporter (`crate::export` has a Prometheus endpoint and a CloudWatch publisher).
//!
//! The metrics the Java KCL has are named as it names them, with its dimensions (`Operation`,
//! `ShardId`, `WorkerIdentifier`) as labels and its level (SUMMARY / DETAILED) as the facade
//! level: see [`kcl_lease::metrics`] for the levels, the dimension names and the lease
//! coordinator's (`RenewAllLeases`, `TakeLeases`). The `kcl_*` metrics below have no Java
//! counterpart; they are recorded at the SUMMARY level.
//!
//! A shard's gauges ([`MILLIS_BEHIND_LATEST`], [`SHARD_CONSECUTIVE_FAILURES`]) are retired
//! when this worker stops reading the shard (lease lost, handed over, shard ended, worker
//! stopped): they are set to NaN, which the exporters of `kcl_worker::export` leave out, so a
//! shard's last lag is not reported on by a worker that no longer reads it (as the Java KCL
//! stops publishing a shard's metrics). A recorder of your own sees the NaN.

pub use kcl_lease::metrics::{
    DETAILED, MetricsLevel, SUMMARY, dimension, operation, worker_labels,
};

/// `ProcessTask` by `ShardId`, SUMMARY: user records delivered to the processor.
pub const RECORDS_PROCESSED: &str = "RecordsProcessed";
/// `ProcessTask` by `ShardId`, SUMMARY: bytes of user record data delivered.
pub const DATA_BYTES_PROCESSED: &str = "DataBytesProcessed";
/// `ProcessTask` by `ShardId`, SUMMARY: duration of `process_records`, ms.
pub const PROCESS_RECORDS_TIME: &str = "RecordProcessor.processRecords.Time";
/// `ProcessTask` by `ShardId`, DETAILED: 1 per GetRecords call that succeeded, 0 per one that
/// failed.
pub const GET_RECORDS_SUCCESS: &str = "KinesisDataFetcher.getRecords.Success";
/// `ProcessTask` by `ShardId`, DETAILED: duration of one GetRecords call, ms.
pub const GET_RECORDS_TIME: &str = "KinesisDataFetcher.getRecords.Time";
/// `ProcessTask` by `ShardId`, SUMMARY: expired shard iterators replaced.
pub const EXPIRED_ITERATOR: &str = "ExpiredIterator";

/// The labels of a shard's metric: `Operation` = `ProcessTask` and `ShardId`.
pub fn shard_labels(shard_id: &str) -> Vec<metrics::Label> {
    vec![
        metrics::Label::new(dimension::OPERATION, operation::PROCESS_TASK),
        metrics::Label::new(dimension::SHARD_ID, shard_id.to_owned()),
    ]
}

/// `ProcessTask` by `ShardId`, SUMMARY, gauge: milliseconds behind the tip of the shard, as
/// the last GetRecords said.
pub const MILLIS_BEHIND_LATEST: &str = "MillisBehindLatest";
/// Counter: throttled Kinesis calls (label `shard_id`).
pub const THROTTLES_TOTAL: &str = "kcl_throttles_total";
/// Counter: other failed Kinesis calls (label `shard_id`).
pub const STREAM_ERRORS_TOTAL: &str = "kcl_stream_errors_total";
/// Counter: KPL aggregates dropped because a sub-record was outside the shard's range.
pub const DROPPED_OUT_OF_RANGE_TOTAL: &str = "kcl_dropped_out_of_range_aggregates_total";
/// Counter: malformed KPL aggregates delivered as one record.
pub const INVALID_AGGREGATES_TOTAL: &str = "kcl_invalid_aggregates_total";
/// Counter: `Terminate` shutdowns that returned without checkpointing SHARD_END.
pub const SHARD_END_NOT_CHECKPOINTED_TOTAL: &str = "kcl_shard_end_not_checkpointed_total";
/// Counter: processor callbacks that panicked or exceeded the shutdown grace.
pub const PROCESSOR_FAILURES_TOTAL: &str = "kcl_processor_failures_total";
/// Gauge: shard consumers running on this worker.
pub const SHARD_CONSUMERS: &str = "kcl_shard_consumers";
/// Counter: shards found gone from the stream (all records expired) and treated as ended.
pub const SHARDS_GONE_TOTAL: &str = "kcl_shards_gone_total";
/// Counter: warnings that a shard makes no progress because its calls keep failing (label
/// `shard_id`): one when a failure streak starts, then at most one per `max_backoff` while it
/// lasts (a single throttled call does not count; a streak of them does).
pub const SHARD_STALLED_TOTAL: &str = "kcl_shard_stalled_total";
/// Gauge: calls to Kinesis failed in a row for the shard (label `shard_id`); 0 after a
/// successful read.
pub const SHARD_CONSECUTIVE_FAILURES: &str = "kcl_shard_consecutive_failures";
/// Counter: lease store calls of graceful shutdown (renewal, release, coordinator stop) that
/// did not finish within their bound.
pub const SHUTDOWN_STEPS_TIMED_OUT_TOTAL: &str = "kcl_shutdown_steps_timed_out_total";
/// Counter: `SubscribeToShard` calls of enhanced fan-out (label `shard_id`): one per five
/// minutes per shard when all is well, more after errors and silent subscriptions.
pub const FAN_OUT_SUBSCRIPTIONS_TOTAL: &str = "kcl_fan_out_subscriptions_total";
/// Counter: fan-out subscriptions torn down because no event arrived within `event_timeout`
/// (label `shard_id`).
pub const FAN_OUT_SILENT_SUBSCRIPTIONS_TOTAL: &str = "kcl_fan_out_silent_subscriptions_total";
/// Counter: times a worker found its fan-out stream consumer no longer registered
/// (deregistered by someone else) after a subscription failed with `ResourceNotFound`.
pub const FAN_OUT_CONSUMER_GONE_TOTAL: &str = "kcl_fan_out_consumer_gone_total";
/// Counter: times a worker registered its fan-out stream consumer (by name) again after it
/// was deregistered.
pub const FAN_OUT_CONSUMER_REREGISTERED_TOTAL: &str = "kcl_fan_out_consumer_reregistered_total";
