//! Polling one shard: iterators, GetRecords, client-side rate limits, back-off, expired
//! iterator recovery, deaggregation and the bounded prefetch.
//!
//! Rules:
//! - A failed call never advances the position: a retryable `GetRecords` failure (throttled,
//!   unreachable, timed out, service error) retries the same iterator; any other failure
//!   gets a new iterator after the last record read, so nothing is skipped or read twice.
//! - Failures are retried with capped, jittered back-off. A shard whose calls keep failing
//!   is logged at `warn` when the failure streak starts and then at most once per
//!   `max_backoff`, counted in [`crate::metrics::SHARD_STALLED_TOTAL`], and shown in its
//!   [`crate::ShardHealth`].
//! - Reads are paced to `max_get_records_per_second` and `max_bytes_per_second` per shard.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kcl_kpl::{
    Deaggregated, DeaggregationOptions, ExtendedSequenceNumber, HashKeyRange, Position, Record,
    SequenceNumber, deaggregate,
};
use kcl_lease::{Clock, RandomSource};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, Retry};
use crate::config::{InitialPosition, WorkerConfig};
use crate::health::HealthRegistry;
use crate::metrics as m;
use crate::stream::{ChildShard, IteratorPosition, StreamClient, StreamError, limits};

/// A batch handed from the fetcher to the consumer.
#[derive(Debug)]
pub(crate) struct FetchedBatch {
    pub(crate) records: Vec<Record>,
    pub(crate) millis_behind_latest: u64,
    pub(crate) cache_entry_time: SystemTime,
    /// Set on the last batch of a closed shard.
    pub(crate) shard_end: Option<Vec<ChildShard>>,
    /// Prefetch budget held until the batch is processed.
    pub(crate) _permits: Vec<OwnedSemaphorePermit>,
}

/// Where a shard consumer starts reading.
pub(crate) fn start_position(
    checkpoint: &ExtendedSequenceNumber,
    initial: InitialPosition,
) -> IteratorPosition {
    match checkpoint.position() {
        // A real checkpoint: re-read the checkpointed record and drop everything at or
        // below the checkpoint. This resumes inside a KPL aggregate (including after a
        // checkpoint at sub-record 0 of an aggregate, which AFTER_SEQUENCE_NUMBER would
        // skip), and for plain records it only re-reads the one checkpointed record.
        Position::Sequence(seq) => IteratorPosition::AtSequenceNumber(seq.clone()),
        Position::TrimHorizon => IteratorPosition::TrimHorizon,
        Position::AtTimestamp => match initial {
            InitialPosition::AtTimestamp(t) => IteratorPosition::AtTimestamp(t),
            _ => IteratorPosition::TrimHorizon,
        },
        // LATEST, and SHARD_END (never read).
        _ => IteratorPosition::Latest,
    }
}

/// Reads one shard ahead of its processor.
#[derive(Debug)]
pub(crate) struct Fetcher {
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) stream_name: String,
    pub(crate) shard_id: String,
    pub(crate) checkpoint: ExtendedSequenceNumber,
    pub(crate) hash_key_range: Option<HashKeyRange>,
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) random: Arc<dyn RandomSource>,
    pub(crate) health: Arc<HealthRegistry>,
}

impl Drop for Fetcher {
    /// The reading of the shard ends here (the shard ended, the lease was lost or handed
    /// over, the worker stopped): its gauges are retired (NaN; see [`crate::metrics`]).
    fn drop(&mut self) {
        metrics::gauge!(m::SHARD_CONSECUTIVE_FAILURES, "shard_id" => self.shard_id.clone())
            .set(f64::NAN);
        metrics::gauge!(level: m::SUMMARY, m::MILLIS_BEHIND_LATEST, m::shard_labels(&self.shard_id))
            .set(f64::NAN);
    }
}

/// When the current failure streak of a shard was last reported at `warn`.
#[derive(Debug, Default)]
pub(crate) struct Streak {
    last_warned: Option<Instant>,
}

struct RateLimiter {
    next_allowed: Option<Instant>,
    min_interval: Duration,
    bytes_per_second: u64,
}

impl RateLimiter {
    fn after_call(&mut self, started: Instant, bytes: usize) {
        let byte_wait = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        self.next_allowed = Some(started + self.min_interval.max(byte_wait));
    }
}

impl Fetcher {
    /// Runs until the shard ends (after sending the last batch) or the receiver is dropped.
    pub(crate) async fn run(self, tx: mpsc::Sender<FetchedBatch>) {
        let options = DeaggregationOptions::new()
            .with_shard_range(self.hash_key_range)
            .with_deliver_out_of_range(self.config.deliver_out_of_range_aggregates);
        let record_budget = Arc::new(Semaphore::new(self.config.max_prefetch_records));
        let byte_budget = Arc::new(Semaphore::new(self.config.max_prefetch_bytes));
        let initial = start_position(&self.checkpoint, self.config.initial_position);
        // Sub-records at or below the checkpoint are dropped (resume inside an aggregate).
        let filter_below = self
            .checkpoint
            .sequence_number()
            .map(|_| self.checkpoint.clone());
        let mut last_fetched: Option<SequenceNumber> = None;
        let mut backoff = Backoff::new(
            self.config.task_backoff,
            self.config.max_backoff,
            self.random.clone(),
        );
        let mut limiter = RateLimiter {
            next_allowed: None,
            min_interval: Duration::from_secs(1) / self.config.max_get_records_per_second,
            bytes_per_second: self.config.max_bytes_per_second,
        };
        let mut iterator: Option<String> = None;
        let mut latest_started_at: Option<SystemTime> = None;
        let mut streak = Streak::default();
        // When the current iterator was issued.
        let mut iterator_at: Option<Instant> = None;
        loop {
            if tx.is_closed() {
                return;
            }
            // An iterator older than its service lifetime is dead: get a new one instead of
            // spending a call on it.
            if iterator_at.is_some_and(|at| {
                self.clock.now().saturating_duration_since(at) >= limits::SHARD_ITERATOR_LIFETIME
            }) && iterator.take().is_some()
            {
                debug!(shard_id = %self.shard_id, "shard iterator outlived its lifetime; getting a new one");
            }
            let it = match iterator.take() {
                Some(it) => it,
                None => {
                    let position = match (&last_fetched, latest_started_at) {
                        (Some(seq), _) => IteratorPosition::AfterSequenceNumber(seq.clone()),
                        // A LATEST start that must start again before any record was read:
                        // from when it first started, so nothing written since is skipped.
                        (None, Some(at)) => IteratorPosition::AtTimestamp(at),
                        (None, None) => initial.clone(),
                    };
                    let asked_at = self.clock.system_time();
                    let this = &self;
                    let pos = &position;
                    let got = backoff
                        .retry(
                            &*self.clock,
                            |_| async move {
                                match this
                                    .stream
                                    .get_shard_iterator(&this.stream_name, &this.shard_id, pos)
                                    .await
                                {
                                    Ok(it) => Ok(Some(it)),
                                    Err(e) if this.shard_is_gone(&e).await => Ok(None),
                                    Err(e) => Err(e),
                                }
                            },
                            |e, _| {
                                self.failed(e, &mut streak);
                                if tx.is_closed() {
                                    Retry::GiveUp
                                } else {
                                    Retry::After
                                }
                            },
                        )
                        .await;
                    match got {
                        Ok(Some(it)) => {
                            iterator_at = Some(self.clock.now());
                            if position == IteratorPosition::Latest {
                                latest_started_at = Some(asked_at);
                            }
                            it
                        }
                        Ok(None) => {
                            let _ = tx.send(self.gone_batch()).await;
                            return;
                        }
                        Err(_) => return,
                    }
                }
            };
            let next_allowed = limiter.next_allowed;
            let this = &self;
            let it_ref = &it;
            // Retryable failures retry the same iterator; anything else leaves the retry.
            let result = backoff
                .retry(
                    &*self.clock,
                    |_| async move {
                        if let Some(at) = next_allowed {
                            let now = this.clock.now();
                            if at > now {
                                this.clock.sleep(at - now).await;
                            }
                        }
                        let started = this.clock.now();
                        let result = this
                            .stream
                            .get_records(it_ref, this.config.max_records)
                            .await;
                        let labels = m::shard_labels(&this.shard_id);
                        metrics::histogram!(level: m::DETAILED, m::GET_RECORDS_TIME, labels.clone())
                            .record(
                                this.clock
                                    .now()
                                    .saturating_duration_since(started)
                                    .as_secs_f64()
                                    * 1000.0,
                            );
                        metrics::histogram!(level: m::DETAILED, m::GET_RECORDS_SUCCESS, labels)
                            .record(if result.is_ok() { 1.0 } else { 0.0 });
                        result.map(|o| (o, started))
                    },
                    |e, _| {
                        if !e.is_retryable() {
                            return Retry::GiveUp;
                        }
                        self.failed(e, &mut streak);
                        if tx.is_closed() {
                            Retry::GiveUp
                        } else {
                            Retry::After
                        }
                    },
                )
                .await;
            let (output, started) = match result {
                Ok(o) => o,
                Err(StreamError::ExpiredIterator) => {
                    debug!(shard_id = %self.shard_id, "shard iterator expired; getting a new one");
                    metrics::counter!(level: m::SUMMARY, m::EXPIRED_ITERATOR, m::shard_labels(&self.shard_id))
                        .increment(1);
                    continue;
                }
                Err(e) if e.is_retryable() => return, // only when the receiver is gone
                Err(e) => {
                    if self.shard_is_gone(&e).await {
                        let _ = tx.send(self.gone_batch()).await;
                        return;
                    }
                    // Not retryable with this iterator: a new one after a back-off.
                    self.failed(&e, &mut streak);
                    self.clock.sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            backoff.reset();
            let raw_bytes: usize = output.records.iter().map(|r| r.data.len()).sum();
            limiter.after_call(started, raw_bytes);
            if let Some(last) = output.records.last() {
                last_fetched = Some(last.sequence_number.clone());
            }
            let raw_count = output.records.len();
            let records = self.deaggregate_all(output.records, &options, filter_below.as_ref());
            let millis_behind_latest = output.millis_behind_latest.unwrap_or(0);
            self.succeeded(millis_behind_latest, &mut streak);
            let shard_end = output
                .next_shard_iterator
                .is_none()
                .then_some(output.child_shards);
            let caught_up = raw_count == 0 && millis_behind_latest == 0;
            if !records.is_empty()
                || shard_end.is_some()
                || self.config.call_process_records_even_for_empty_list
            {
                let Some(permits) = self
                    .acquire_budget(&records, &record_budget, &byte_budget)
                    .await
                else {
                    return;
                };
                let batch = FetchedBatch {
                    records,
                    millis_behind_latest,
                    cache_entry_time: self.clock.system_time(),
                    shard_end: shard_end.clone(),
                    _permits: permits,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
            match (shard_end, output.next_shard_iterator) {
                (Some(_), _) | (_, None) => return,
                (None, Some(next)) => {
                    iterator = Some(next);
                    iterator_at = Some(self.clock.now());
                }
            }
            if caught_up {
                self.clock.sleep(self.config.idle_time_between_reads).await;
            }
        }
    }

    /// Deaggregates fetched records (with the shard's hash key range) and drops every
    /// sub-record at or below `filter_below` (the checkpoint).
    pub(crate) fn deaggregate_all(
        &self,
        raw: Vec<Record>,
        options: &DeaggregationOptions,
        filter_below: Option<&ExtendedSequenceNumber>,
    ) -> Vec<Record> {
        let mut records = Vec::with_capacity(raw.len());
        for raw in raw {
            match deaggregate(raw, options) {
                Deaggregated::DroppedOutOfRange {
                    sequence_number,
                    sub_records,
                    ..
                } => {
                    metrics::counter!(m::DROPPED_OUT_OF_RANGE_TOTAL).increment(1);
                    warn!(shard_id = %self.shard_id, %sequence_number, sub_records,
                        "dropped a KPL aggregate with sub-records outside the shard's hash key range");
                }
                Deaggregated::InvalidAggregate { record, reason } => {
                    metrics::counter!(m::INVALID_AGGREGATES_TOTAL).increment(1);
                    warn!(shard_id = %self.shard_id, sequence_number = %record.sequence_number, %reason,
                        "malformed KPL aggregate delivered as one record");
                    records.push(record);
                }
                other => records.extend(other.into_records()),
            }
        }
        if let Some(floor) = filter_below {
            records.retain(|r| r.extended_sequence_number() > *floor);
        }
        records
    }

    /// Records a successful read (health, metrics, the end of a failure streak).
    pub(crate) fn succeeded(&self, millis_behind_latest: u64, streak: &mut Streak) {
        let ended_streak = self.health.success(
            &self.shard_id,
            self.clock.system_time(),
            millis_behind_latest,
        );
        if ended_streak > 0 {
            streak.last_warned = None;
            info!(shard_id = %self.shard_id, failures = ended_streak,
                "reading the shard succeeded again");
        }
        metrics::gauge!(m::SHARD_CONSECUTIVE_FAILURES, "shard_id" => self.shard_id.clone())
            .set(0.0);
        metrics::gauge!(level: m::SUMMARY, m::MILLIS_BEHIND_LATEST, m::shard_labels(&self.shard_id))
            .set(millis_behind_latest as f64);
    }

    /// Takes the prefetch budget for a batch (waits while the processor is behind); `None`
    /// when the budget is closed.
    pub(crate) async fn acquire_budget(
        &self,
        records: &[Record],
        record_budget: &Arc<Semaphore>,
        byte_budget: &Arc<Semaphore>,
    ) -> Option<Vec<OwnedSemaphorePermit>> {
        let bytes: usize = records.iter().map(|r| r.data.len()).sum();
        let mut permits = Vec::with_capacity(2);
        let want_records =
            u32::try_from(records.len().min(self.config.max_prefetch_records)).unwrap_or(u32::MAX);
        let want_bytes =
            u32::try_from(bytes.min(self.config.max_prefetch_bytes)).unwrap_or(u32::MAX);
        for (sem, n) in [(record_budget, want_records), (byte_budget, want_bytes)] {
            if n > 0 {
                permits.push(sem.clone().acquire_many_owned(n).await.ok()?);
            }
        }
        Some(permits)
    }

    /// `ResourceNotFound` for a shard that ListShards no longer lists: the shard left the
    /// stream (its records all expired). It is treated as ended, as the Java KCL does, so
    /// its children are not blocked forever.
    pub(crate) async fn shard_is_gone(&self, e: &StreamError) -> bool {
        if !matches!(e, StreamError::ResourceNotFound { .. }) {
            return false;
        }
        match self.stream.list_all_shards(&self.stream_name, None).await {
            Ok(shards) if !shards.iter().any(|s| s.shard_id == self.shard_id) => {
                warn!(shard_id = %self.shard_id,
                    "the shard is no longer in the stream; treating it as ended");
                metrics::counter!(m::SHARDS_GONE_TOTAL).increment(1);
                true
            }
            _ => false,
        }
    }

    /// The last "batch" of a shard that left the stream.
    pub(crate) fn gone_batch(&self) -> FetchedBatch {
        FetchedBatch {
            records: Vec::new(),
            millis_behind_latest: 0,
            cache_entry_time: self.clock.system_time(),
            shard_end: Some(Vec::new()),
            _permits: Vec::new(),
        }
    }

    /// Records a failed call (health, metrics) and reports the streak at `warn` when it
    /// starts and then at most once per `max_backoff`. A throttled call alone is normal
    /// (debug); a streak of them is reported like any other.
    pub(crate) fn failed(&self, e: &StreamError, streak: &mut Streak) {
        let failures = self
            .health
            .failure(&self.shard_id, e, self.clock.system_time());
        metrics::gauge!(m::SHARD_CONSECUTIVE_FAILURES, "shard_id" => self.shard_id.clone())
            .set(f64::from(failures));
        let throttled = matches!(e, StreamError::Throttled { .. });
        if throttled {
            metrics::counter!(m::THROTTLES_TOTAL, "shard_id" => self.shard_id.clone()).increment(1);
        } else {
            metrics::counter!(m::STREAM_ERRORS_TOTAL, "shard_id" => self.shard_id.clone())
                .increment(1);
        }
        let now = self.clock.now();
        let due = match streak.last_warned {
            None => !throttled || failures > 1,
            Some(at) => now.saturating_duration_since(at) >= self.config.max_backoff,
        };
        if due {
            streak.last_warned = Some(now);
            metrics::counter!(m::SHARD_STALLED_TOTAL, "shard_id" => self.shard_id.clone())
                .increment(1);
            warn!(shard_id = %self.shard_id, error = %kcl_lease::ErrorChain(e), failures,
                "reading the shard failed; no progress until a call succeeds; backing off and retrying");
        } else {
            debug!(shard_id = %self.shard_id, error = %kcl_lease::ErrorChain(e), failures,
                "reading the shard failed again; backing off and retrying");
        }
    }
}
