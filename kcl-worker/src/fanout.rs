//! Enhanced fan-out: reading one shard through `SubscribeToShard` (the counterpart of
//! [`crate::fetcher`], producing the same [`FetchedBatch`]es), and the registration of the
//! stream consumer at worker start.
//!
//! Rules:
//! - The first subscription starts where polling would ([`start_position`]: AT_SEQUENCE_NUMBER
//!   of the checkpoint, every sub-record at or below it dropped, so a resume inside a KPL
//!   aggregate works). Every later one starts AFTER_SEQUENCE_NUMBER of the last continuation
//!   sequence number received, so nothing is skipped or delivered twice; raw records at or
//!   below the last one delivered are dropped as well, whatever a server sends again.
//! - A subscription ends when the service ends it (every five minutes), on an error, or when
//!   no event arrives within `event_timeout` (the bounded client turns that silence into
//!   [`StreamError::TimedOut`]): the reader subscribes again. At most one `SubscribeToShard`
//!   per second per shard is made (the service's limit), and every failure, the service's
//!   `ResourceInUseException` for a resubscribe within five seconds of a successful one
//!   included, backs off (capped, jittered) before the next attempt.
//! - Events are read only while the prefetch budget (`max_prefetch_records`,
//!   `max_prefetch_bytes`) and the batch channel have room: a slow processor stops the
//!   reading, which leaves the events to the transport's flow control instead of memory.
//! - The event that ends a closed shard (its `ChildShards`, no continuation) ends the shard
//!   like polling's last response: the consumer records the children and checkpoints
//!   SHARD_END; children still wait for their parents (`consumer.rs`, `shard_sync.rs`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kcl_kpl::{DeaggregationOptions, SequenceNumber};
use kcl_lease::{Clock, RandomSource};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::{FanOutConfig, WorkerConfig};
use crate::error::WorkerError;
use crate::fetcher::{FetchedBatch, Fetcher, Streak, start_position};
use crate::metrics as m;
use crate::stream::{
    ConsumerStatus, IteratorPosition, StreamClient, StreamError, Subscription, limits,
};

/// Reads one shard through enhanced fan-out.
#[derive(Debug)]
pub(crate) struct FanOutReader {
    /// The shard, its checkpoint and everything shared with polling.
    pub(crate) base: Fetcher,
    /// The consumer, shared by the worker's readers.
    pub(crate) consumer: Arc<SharedConsumer>,
    /// How often, at most, a caught-up shard is checked for its end by polling.
    pub(crate) shard_end_probe_interval: Duration,
}

/// Whether the reader goes on after a wait.
enum Next {
    Go,
    Stop,
}

impl FanOutReader {
    /// Runs until the shard ends (after sending the last batch) or the receiver is dropped.
    pub(crate) async fn run(self, tx: mpsc::Sender<FetchedBatch>) {
        let f = &self.base;
        let options = DeaggregationOptions::new()
            .with_shard_range(f.hash_key_range)
            .with_deliver_out_of_range(f.config.deliver_out_of_range_aggregates);
        let record_budget = Arc::new(Semaphore::new(f.config.max_prefetch_records));
        let byte_budget = Arc::new(Semaphore::new(f.config.max_prefetch_bytes));
        let initial = start_position(&f.checkpoint, f.config.initial_position);
        let filter_below = f.checkpoint.sequence_number().map(|_| f.checkpoint.clone());
        let mut backoff = Backoff::new(
            f.config.task_backoff,
            f.config.max_backoff,
            f.random.clone(),
        );
        let mut streak = Streak::default();
        // Where the next subscription continues, and the last raw record delivered.
        let mut continuation: Option<SequenceNumber> = None;
        let mut last_raw: Option<SequenceNumber> = None;
        let mut latest_started_at: Option<SystemTime> = None;
        let mut last_subscribe: Option<std::time::Instant> = None;
        let mut last_probe: Option<std::time::Instant> = None;
        let min_interval = Duration::from_secs(1) / limits::SUBSCRIBE_TO_SHARD_PER_SECOND_PER_SHARD;
        'subscribe: loop {
            if tx.is_closed() {
                return;
            }
            if let Some(at) = last_subscribe {
                let next = at + min_interval;
                let now = f.clock.now();
                if next > now
                    && let Next::Stop = wait(&*f.clock, next - now, &tx).await
                {
                    return;
                }
            }
            let position = match (&continuation, latest_started_at) {
                (Some(seq), _) => IteratorPosition::AfterSequenceNumber(seq.clone()),
                // A LATEST start that must start again before any event: from when it first
                // started, so nothing written since is skipped.
                (None, Some(at)) => IteratorPosition::AtTimestamp(at),
                (None, None) => initial.clone(),
            };
            let consumer_arn = self.consumer.current();
            let asked_at = f.clock.system_time();
            last_subscribe = Some(f.clock.now());
            metrics::counter!(m::FAN_OUT_SUBSCRIPTIONS_TOTAL, "shard_id" => f.shard_id.clone())
                .increment(1);
            let subscribed = tokio::select! {
                biased;
                _ = tx.closed() => return,
                s = f.stream.subscribe_to_shard(&consumer_arn, &f.shard_id, &position) => s,
            };
            let mut subscription: Box<dyn Subscription> = match subscribed {
                Ok(s) => {
                    debug!(shard_id = %f.shard_id, ?position, "subscribed to the shard");
                    if position == IteratorPosition::Latest {
                        latest_started_at = Some(asked_at);
                    }
                    s
                }
                Err(e) => {
                    if f.shard_is_gone(&e).await {
                        let _ = tx.send(f.gone_batch()).await;
                        return;
                    }
                    if let Next::Stop = self.consumer_may_be_gone(&e, &consumer_arn, &tx).await {
                        return;
                    }
                    f.failed(&e, &mut streak);
                    match wait(&*f.clock, backoff.next_delay(), &tx).await {
                        Next::Go => continue 'subscribe,
                        Next::Stop => return,
                    }
                }
            };
            loop {
                let event = tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    e = subscription.next_event() => e,
                };
                // The last event of a closed shard names its children and has no
                // continuation; every other event has a continuation. One with neither is
                // not the end of the shard: it is unreadable, and the reader subscribes
                // again from the last continuation (its records are read again, nothing is
                // skipped), as the Java KCL rejects such an event.
                let event = match event {
                    Ok(Some(event))
                        if event.continuation_sequence_number.is_none()
                            && event.child_shards.is_empty() =>
                    {
                        Err(StreamError::MalformedResponse {
                            message: "a SubscribeToShard event with neither a \
                                      ContinuationSequenceNumber nor ChildShards"
                                .to_owned(),
                        })
                    }
                    other => other,
                };
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => {
                        // The service ends every subscription after five minutes.
                        debug!(shard_id = %f.shard_id, "the subscription ended; subscribing again");
                        continue 'subscribe;
                    }
                    Err(e) => {
                        drop(subscription);
                        if matches!(e, StreamError::TimedOut { .. }) {
                            metrics::counter!(m::FAN_OUT_SILENT_SUBSCRIPTIONS_TOTAL,
                                "shard_id" => f.shard_id.clone())
                            .increment(1);
                            warn!(shard_id = %f.shard_id, error = %e,
                                "the subscription delivered no event in time; renewing it");
                        }
                        if f.shard_is_gone(&e).await {
                            let _ = tx.send(f.gone_batch()).await;
                            return;
                        }
                        if let Next::Stop = self.consumer_may_be_gone(&e, &consumer_arn, &tx).await
                        {
                            return;
                        }
                        f.failed(&e, &mut streak);
                        match wait(&*f.clock, backoff.next_delay(), &tx).await {
                            Next::Go => continue 'subscribe,
                            Next::Stop => return,
                        }
                    }
                };
                backoff.reset();
                let shard_end = event.is_shard_end().then(|| event.child_shards.clone());
                if let Some(next) = event.continuation_sequence_number.clone() {
                    continuation = Some(next);
                }
                let mut raw = event.records;
                if let Some(floor) = &last_raw {
                    raw.retain(|r| r.sequence_number > *floor);
                }
                if let Some(last) = raw.last() {
                    last_raw = Some(last.sequence_number.clone());
                    if continuation
                        .as_ref()
                        .is_none_or(|c| *c < last.sequence_number)
                    {
                        continuation = Some(last.sequence_number.clone());
                    }
                }
                let millis_behind_latest = event.millis_behind_latest.unwrap_or(0);
                f.succeeded(millis_behind_latest, &mut streak);
                // Caught up: has the shard ended without the service saying so?
                let mut shard_end = shard_end;
                if shard_end.is_none()
                    && raw.is_empty()
                    && millis_behind_latest == 0
                    && let Some(after) = &continuation
                    && last_probe.is_none_or(|at| {
                        f.clock.now().saturating_duration_since(at) >= self.shard_end_probe_interval
                    })
                {
                    last_probe = Some(f.clock.now());
                    match self.probe_shard_end(after).await {
                        Ok(Some(children)) => {
                            info!(shard_id = %f.shard_id,
                                "the shard is closed and read to its end (found by polling)");
                            shard_end = Some(children);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            debug!(shard_id = %f.shard_id, error = %kcl_lease::ErrorChain(&e),
                                "checking for the shard's end failed; checking again later");
                        }
                    }
                }
                let records = f.deaggregate_all(raw, &options, filter_below.as_ref());
                if !records.is_empty()
                    || shard_end.is_some()
                    || f.config.call_process_records_even_for_empty_list
                {
                    // Back-pressure: no further event is read until the processor made room.
                    let permits = tokio::select! {
                        biased;
                        _ = tx.closed() => return,
                        p = f.acquire_budget(&records, &record_budget, &byte_budget) => p,
                    };
                    let Some(permits) = permits else { return };
                    let batch = FetchedBatch {
                        records,
                        millis_behind_latest,
                        cache_entry_time: f.clock.system_time(),
                        shard_end: shard_end.clone(),
                        _permits: permits,
                    };
                    if tx.send(batch).await.is_err() {
                        return;
                    }
                }
                if shard_end.is_some() {
                    return;
                }
            }
        }
    }
}

impl FanOutReader {
    /// After a `ResourceNotFound` that is not about the shard (it is still in the stream):
    /// the consumer may have been deregistered; [`SharedConsumer::recover`] checks it (and
    /// registers it again when it was registered by name), unless the consumer goes away
    /// first.
    async fn consumer_may_be_gone(
        &self,
        e: &StreamError,
        consumer_arn: &str,
        tx: &mpsc::Sender<FetchedBatch>,
    ) -> Next {
        if !matches!(e, StreamError::ResourceNotFound { .. }) {
            return Next::Go;
        }
        tokio::select! {
            biased;
            _ = tx.closed() => Next::Stop,
            _ = self.consumer.recover(consumer_arn) => Next::Go,
        }
    }

    /// Whether the shard ended right after `after`: `Some(children)` when a `GetRecords`
    /// from there returns no record and no next iterator (a closed shard read to its end).
    async fn probe_shard_end(
        &self,
        after: &SequenceNumber,
    ) -> Result<Option<Vec<crate::stream::ChildShard>>, StreamError> {
        let f = &self.base;
        let iterator = f
            .stream
            .get_shard_iterator(
                &f.stream_name,
                &f.shard_id,
                &IteratorPosition::AfterSequenceNumber(after.clone()),
            )
            .await?;
        let output = f.stream.get_records(&iterator, 1).await?;
        Ok(
            (output.records.is_empty() && output.next_shard_iterator.is_none())
                .then_some(output.child_shards),
        )
    }
}

/// Sleeps `delay` on the clock unless the consumer goes away first.
async fn wait(clock: &dyn Clock, delay: Duration, tx: &mpsc::Sender<FetchedBatch>) -> Next {
    tokio::select! {
        biased;
        _ = tx.closed() => Next::Stop,
        _ = clock.sleep(delay) => Next::Go,
    }
}

/// The stream consumer all fan-out readers of one worker share: its current ARN, and its
/// recovery when someone deregisters it while the worker runs.
///
/// A reader whose subscription fails with `ResourceNotFound` while its shard is still in
/// the stream calls [`SharedConsumer::recover`] with the ARN it used. One recovery runs at
/// a time, and a reader whose ARN was already replaced returns at once, so a deregistered
/// consumer is registered again once per worker, not once per shard. Readers take
/// [`SharedConsumer::current`] at every subscribe.
#[derive(Debug)]
pub(crate) struct SharedConsumer {
    arn: std::sync::Mutex<String>,
    /// `Some` when the consumer was registered by name (it is registered again then);
    /// `None` for a given `consumer_arn` (never registered by the worker).
    name: Option<String>,
    /// Serialises recoveries; the time a given ARN was last found missing.
    recovery: tokio::sync::Mutex<Option<std::time::Instant>>,
    stream: Arc<dyn StreamClient>,
    config: Arc<WorkerConfig>,
    clock: Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    registration_timeout: Duration,
}

impl SharedConsumer {
    /// The consumer found at start ([`ensure_consumer`]) as `arn`.
    pub(crate) fn new(
        arn: String,
        fan_out: &FanOutConfig,
        stream: Arc<dyn StreamClient>,
        config: Arc<WorkerConfig>,
        clock: Arc<dyn Clock>,
        random: Arc<dyn RandomSource>,
    ) -> Self {
        SharedConsumer {
            arn: std::sync::Mutex::new(arn),
            name: match fan_out.consumer_arn {
                Some(_) => None,
                None => fan_out.consumer_name.clone(),
            },
            recovery: tokio::sync::Mutex::new(None),
            stream,
            config,
            clock,
            random,
            registration_timeout: fan_out.registration_timeout_or_default(),
        }
    }

    /// The ARN to subscribe with now.
    pub(crate) fn current(&self) -> String {
        self.arn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A subscription with `failed` met `ResourceNotFound` for something other than its
    /// shard. Describes the consumer by ARN; when it is gone (or `DELETING`):
    /// - registered by name: registers it again (the same bounded wait for `ACTIVE` as at
    ///   start) and makes the new ARN current; a failure is logged, and the next reader
    ///   failure tries again;
    /// - given by `consumer_arn`: logs at warn and counts; nothing is registered and the
    ///   readers keep backing off. It is described again at most once per `max_backoff`.
    pub(crate) async fn recover(&self, failed: &str) {
        let mut missing_since = self.recovery.lock().await;
        if self.current() != failed {
            return; // Another reader renewed it meanwhile.
        }
        if self.name.is_none()
            && missing_since.is_some_and(|at| {
                self.clock.now().saturating_duration_since(at) < self.config.max_backoff
            })
        {
            return;
        }
        let gone = match self.stream.describe_stream_consumer_by_arn(failed).await {
            Ok(c) => c.status == ConsumerStatus::Deleting,
            Err(StreamError::ResourceNotFound { .. }) => true,
            Err(e) => {
                debug!(consumer_arn = %failed, error = %kcl_lease::ErrorChain(&e),
                    "describing the stream consumer failed; checking again at the next failure");
                false
            }
        };
        if !gone {
            *missing_since = None;
            return;
        }
        metrics::counter!(m::FAN_OUT_CONSUMER_GONE_TOTAL).increment(1);
        let Some(name) = &self.name else {
            *missing_since = Some(self.clock.now());
            warn!(consumer_arn = %failed,
                "the stream consumer given by consumer_arn is no longer registered; it is not \
                 registered again (register it, or restart with another consumer_arn): the \
                 shard readers keep backing off");
            return;
        };
        warn!(consumer_name = %name, consumer_arn = %failed,
            "the stream consumer was deregistered; registering it again");
        match register_within(
            &*self.stream,
            &self.config,
            name,
            &self.clock,
            self.random.clone(),
            self.registration_timeout,
        )
        .await
        {
            Ok(arn) => {
                metrics::counter!(m::FAN_OUT_CONSUMER_REREGISTERED_TOTAL).increment(1);
                info!(consumer_name = %name, consumer_arn = %arn,
                    "the stream consumer is registered again; readers subscribe with it");
                *self.arn.lock().unwrap_or_else(|e| e.into_inner()) = arn;
            }
            Err(e) => {
                warn!(consumer_name = %name, error = %kcl_lease::ErrorChain(&e),
                    "registering the stream consumer again failed; retrying at the next failure");
            }
        }
    }
}

/// The consumer ARN fan-out reads with: the configured ARN once it is checked
/// ([`check_given_consumer`]), else the consumer named in the configuration, registered when
/// missing (a `ResourceInUse` answer means it already is: it is described instead;
/// throttling, `LimitExceeded` included, and other retryable errors back off and retry),
/// once it is `ACTIVE`. Bounded by `registration_timeout` on the clock. The consumer is
/// never deregistered.
pub(crate) async fn ensure_consumer(
    stream: &dyn StreamClient,
    config: &WorkerConfig,
    fan_out: &FanOutConfig,
    clock: &Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
) -> Result<String, WorkerError> {
    let limit = fan_out.registration_timeout_or_default();
    if let Some(arn) = &fan_out.consumer_arn {
        check_given_consumer(stream, config, arn, clock, random, limit).await?;
        info!(consumer_arn = %arn, "enhanced fan-out with the given consumer");
        return Ok(arn.clone());
    }
    let Some(name) = fan_out.consumer_name.clone() else {
        return Err(crate::error::ConfigError::Invalid {
            option: "consumer_name",
            reason: "missing (build the configuration with WorkerConfigBuilder::build)".into(),
        }
        .into());
    };
    register_within(stream, config, &name, clock, random, limit).await
}

/// [`register_and_wait`] bounded by `limit` on the clock.
async fn register_within(
    stream: &dyn StreamClient,
    config: &WorkerConfig,
    name: &str,
    clock: &Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    limit: Duration,
) -> Result<String, WorkerError> {
    let registration = register_and_wait(stream, config, name, clock, random);
    match kcl_lease::timeouts::within(&**clock, limit, registration).await {
        Some(result) => result,
        None => Err(StreamError::TimedOut {
            call: "RegisterStreamConsumer (until ACTIVE)",
            limit,
        }
        .into()),
    }
}

/// Checks a consumer given by `consumer_arn` (nothing is registered for it): described by
/// its ARN alone, it must exist, be registered on the worker's stream, and be `ACTIVE`
/// within `limit` (a `CREATING` one is waited for; retryable errors back off and retry).
/// Otherwise the start fails with [`ConfigError::Invalid`](crate::error::ConfigError)
/// naming `consumer_arn`.
async fn check_given_consumer(
    stream: &dyn StreamClient,
    config: &WorkerConfig,
    arn: &str,
    clock: &Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    limit: Duration,
) -> Result<(), WorkerError> {
    let invalid = |reason: String| -> WorkerError {
        crate::error::ConfigError::Invalid {
            option: "consumer_arn",
            reason,
        }
        .into()
    };
    let mut backoff = Backoff::new(config.task_backoff, config.max_backoff, random);
    let mut last = String::from("no answer yet");
    let check = async {
        let stream_arn = loop {
            match stream.describe_stream_summary(&config.stream_name).await {
                Ok(summary) => break summary.stream_arn,
                Err(e) if e.is_retryable() => clock.sleep(backoff.next_delay()).await,
                Err(e) => return Err(e.into()),
            }
        };
        loop {
            match stream.describe_stream_consumer_by_arn(arn).await {
                Ok(c) if c.stream_arn != stream_arn => {
                    return Err(invalid(format!(
                        "consumer {arn} is registered on stream {}, not on {stream_arn} \
                         (stream_name {})",
                        c.stream_arn, config.stream_name
                    )));
                }
                Ok(c) => match c.status {
                    ConsumerStatus::Active => return Ok(()),
                    ConsumerStatus::Deleting => {
                        return Err(invalid(format!(
                            "consumer {arn} is being deregistered (DELETING)"
                        )));
                    }
                    status => {
                        last = format!("still {}", status.as_str());
                        debug!(consumer_arn = %arn, status = status.as_str(),
                            "waiting for the given stream consumer to be ACTIVE");
                        clock.sleep(config.task_backoff).await;
                    }
                },
                Err(StreamError::ResourceNotFound { message }) => {
                    return Err(invalid(format!(
                        "no stream consumer {arn} is registered ({message})"
                    )));
                }
                Err(StreamError::InvalidArgument { message }) => {
                    return Err(invalid(format!("{arn} was refused: {message}")));
                }
                Err(e) if e.is_retryable() => {
                    last = format!("the last attempt failed: {}", kcl_lease::ErrorChain(&e));
                    warn!(consumer_arn = %arn, error = %kcl_lease::ErrorChain(&e),
                        "describing the given stream consumer failed; retrying");
                    clock.sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    match kcl_lease::timeouts::within(&**clock, limit, check).await {
        Some(result) => result,
        None => Err(invalid(format!(
            "consumer {arn} did not become ACTIVE within registration_timeout ({limit:?}; {last})"
        ))),
    }
}

async fn register_and_wait(
    stream: &dyn StreamClient,
    config: &WorkerConfig,
    name: &str,
    clock: &Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
) -> Result<String, WorkerError> {
    let mut backoff = Backoff::new(config.task_backoff, config.max_backoff, random);
    let mut stream_arn: Option<String> = None;
    let mut registered = false;
    loop {
        let step = async {
            let arn = match &stream_arn {
                Some(arn) => arn.clone(),
                None => {
                    let arn = stream
                        .describe_stream_summary(&config.stream_name)
                        .await?
                        .stream_arn;
                    stream_arn = Some(arn.clone());
                    arn
                }
            };
            if !registered {
                match stream.register_stream_consumer(&arn, name).await {
                    Ok(consumer) => {
                        info!(consumer_name = %name, consumer_arn = %consumer.consumer_arn,
                            "registered the stream consumer");
                        registered = true;
                        if consumer.status == ConsumerStatus::Active {
                            return Ok(Some(consumer.consumer_arn));
                        }
                    }
                    // Registered already (by another worker, or an earlier run).
                    Err(StreamError::ResourceInUse { .. }) => registered = true,
                    Err(e) => return Err(e),
                }
            }
            match stream.describe_stream_consumer(&arn, name).await {
                Ok(consumer) if consumer.status == ConsumerStatus::Active => {
                    Ok(Some(consumer.consumer_arn))
                }
                Ok(consumer) => {
                    debug!(consumer_name = %name, status = consumer.status.as_str(),
                        "waiting for the stream consumer to be ACTIVE");
                    if consumer.status == ConsumerStatus::Deleting {
                        // Deregistered meanwhile: register it again once it is gone.
                        registered = false;
                    }
                    Ok(None)
                }
                // Deregistered meanwhile, or not visible yet: register (again).
                Err(StreamError::ResourceNotFound { .. }) => {
                    registered = false;
                    Ok(None)
                }
                Err(e) => Err(e),
            }
        };
        match step.await {
            Ok(Some(arn)) => {
                info!(consumer_name = %name, consumer_arn = %arn, "enhanced fan-out consumer is ACTIVE");
                return Ok(arn);
            }
            Ok(None) => clock.sleep(config.task_backoff).await,
            Err(e) if e.is_retryable() => {
                warn!(consumer_name = %name, error = %kcl_lease::ErrorChain(&e),
                    "registering the stream consumer failed; retrying");
                clock.sleep(backoff.next_delay()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}
