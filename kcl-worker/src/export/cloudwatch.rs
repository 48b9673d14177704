//! A CloudWatch publisher: the worker's metrics as `PutMetricData` data points, in the
//! namespace of [`MetricsConfig::namespace`], with the dimensions as CloudWatch dimensions.
//!
//! Recording a metric only updates an atomic in a registry ([`CloudWatchRecorder`]); it
//! never waits for CloudWatch. Every `metricsBufferTimeMillis` a flusher turns the registry
//! into data points: a counter's increase since the last flush (a value), a gauge's value,
//! a histogram's samples since the last flush (a statistic set: count, sum, min, max, as the
//! Java KCL sends). They go into a bounded queue (`metricsMaxQueueSize` data points); when it
//! is full new points are dropped and counted. A sender sends the queue in batches of up
//! to [`MAX_DATUMS_PER_REQUEST`], each call bounded by [`MetricsConfig::call_timeout`]; a
//! failed call is counted and logged (at most one warning per flush interval) and its points
//! are dropped, never retried into a growing backlog.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use kcl_lease::{Clock, SystemClock};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::registry::{AtomicStorage, Registry};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::{ExportError, MetricsConfig};

/// The most data points one `PutMetricData` call carries.
pub const MAX_DATUMS_PER_REQUEST: usize = 1000;

/// A CloudWatch SDK client for `sdk` with an optional endpoint (e.g. moto on
/// `http://127.0.0.1:PORT`) and the call bound of `config` as its operation timeout.
pub fn client(
    sdk: &aws_config::SdkConfig,
    endpoint: Option<&str>,
    config: &MetricsConfig,
) -> aws_sdk_cloudwatch::Client {
    let timeouts = aws_config::timeout::TimeoutConfig::builder()
        .operation_timeout(config.call_timeout)
        .operation_attempt_timeout(config.call_timeout)
        .connect_timeout(config.call_timeout.min(Duration::from_secs(3)))
        .build();
    let mut b = aws_sdk_cloudwatch::config::Builder::from(sdk).timeout_config(timeouts);
    if let Some(url) = endpoint {
        b = b.endpoint_url(url);
    }
    aws_sdk_cloudwatch::Client::from_conf(b.build())
}

/// What the publisher did so far.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct PublisherStats {
    /// Data points put in the queue.
    pub queued: u64,
    /// Data points dropped because the queue was full.
    pub dropped: u64,
    /// Data points CloudWatch accepted.
    pub sent: u64,
    /// Data points of failed calls (not sent again).
    pub failed: u64,
    /// `PutMetricData` calls that succeeded.
    pub requests: u64,
    /// `PutMetricData` calls that failed or timed out.
    pub failed_requests: u64,
}

#[derive(Debug, Default)]
struct Counters {
    queued: AtomicU64,
    dropped: AtomicU64,
    sent: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    failed_requests: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> PublisherStats {
        PublisherStats {
            queued: self.queued.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            sent: self.sent.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            failed_requests: self.failed_requests.load(Ordering::Relaxed),
        }
    }
}

/// The recorder of a [`CloudWatchPublisher`]: install it (see [`super::install`]).
#[derive(Debug, Clone)]
pub struct CloudWatchRecorder {
    registry: Arc<Registry<Key, AtomicStorage>>,
}

impl Recorder for CloudWatchRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        self.registry
            .get_or_create_counter(key, |c| Counter::from_arc(Arc::clone(c)))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        self.registry
            .get_or_create_gauge(key, |g| Gauge::from_arc(Arc::clone(g)))
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        self.registry
            .get_or_create_histogram(key, |h| Histogram::from_arc(Arc::clone(h)))
    }
}

/// What travels from the flusher to the sender.
enum Item {
    Datum(Box<MetricDatum>),
    /// Send what is queued now, then answer.
    Flushed(oneshot::Sender<()>),
}

/// The running publisher. [`CloudWatchPublisher::shutdown`] sends what is left.
#[derive(Debug)]
pub struct CloudWatchPublisher {
    counters: Arc<Counters>,
    flush_tx: mpsc::Sender<oneshot::Sender<()>>,
    stop: watch::Sender<bool>,
    flusher: JoinHandle<()>,
    sender: JoinHandle<()>,
    call_timeout: Duration,
}

impl CloudWatchPublisher {
    /// Starts the flusher and the sender on the current tokio runtime; returns the publisher
    /// and the recorder to install.
    pub fn start(
        client: aws_sdk_cloudwatch::Client,
        config: &MetricsConfig,
    ) -> Result<(Self, CloudWatchRecorder), ExportError> {
        Self::start_with_clock(client, config, Arc::new(SystemClock))
    }

    /// [`CloudWatchPublisher::start`] on `clock` (flush interval, data point timestamps).
    pub fn start_with_clock(
        client: aws_sdk_cloudwatch::Client,
        config: &MetricsConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Self, CloudWatchRecorder), ExportError> {
        config.validate()?;
        let registry = Arc::new(Registry::atomic());
        let counters = Arc::new(Counters::default());
        let (queue_tx, queue_rx) = mpsc::channel(config.metrics_max_queue_size);
        let (flush_tx, flush_rx) = mpsc::channel(4);
        let (stop, stop_rx) = watch::channel(false);
        let flusher = Flusher {
            registry: Arc::clone(&registry),
            counters: Arc::clone(&counters),
            queue: queue_tx,
            clock: Arc::clone(&clock),
            last_counts: HashMap::new(),
            interval: config.metrics_buffer_time,
            dropped_reported: 0,
        };
        let sender = Sender {
            client,
            namespace: config.namespace.clone(),
            counters: Arc::clone(&counters),
            call_timeout: config.call_timeout,
            clock,
            interval: config.metrics_buffer_time,
            last_warned: None,
        };
        let publisher = Self {
            counters,
            flush_tx,
            stop,
            flusher: tokio::spawn(flusher.run(flush_rx, stop_rx)),
            sender: tokio::spawn(sender.run(queue_rx)),
            call_timeout: config.call_timeout,
        };
        Ok((publisher, CloudWatchRecorder { registry }))
    }

    /// What it did so far.
    pub fn stats(&self) -> PublisherStats {
        self.counters.snapshot()
    }

    /// Flushes the registry now and waits until what was queued is sent (or failed), at
    /// most `bound`. Returns false when the bound passed first.
    pub async fn flush(&self, bound: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        let flushed = async {
            if self.flush_tx.send(tx).await.is_err() {
                return false;
            }
            rx.await.is_ok()
        };
        tokio::time::timeout(bound, flushed).await.unwrap_or(false)
    }

    /// A last flush (bounded by twice the call timeout), then stops both tasks.
    pub async fn shutdown(self) -> PublisherStats {
        let _ = self.flush(self.call_timeout.saturating_mul(2)).await;
        let _ = self.stop.send(true);
        self.flusher.abort();
        self.sender.abort();
        self.counters.snapshot()
    }
}

struct Flusher {
    registry: Arc<Registry<Key, AtomicStorage>>,
    counters: Arc<Counters>,
    queue: mpsc::Sender<Item>,
    clock: Arc<dyn Clock>,
    last_counts: HashMap<Key, u64>,
    interval: Duration,
    dropped_reported: u64,
}

impl Flusher {
    async fn run(
        mut self,
        mut flush_rx: mpsc::Receiver<oneshot::Sender<()>>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let requested = tokio::select! {
                () = self.clock.sleep(self.interval) => None,
                r = flush_rx.recv() => r,
                _ = stop.changed() => return,
            };
            self.flush();
            if let Some(done) = requested {
                // Waiting here holds only the flusher, never a recording thread.
                if self.queue.send(Item::Flushed(done)).await.is_err() {
                    return;
                }
            }
        }
    }

    fn push(&mut self, datum: MetricDatum) {
        match self.queue.try_send(Item::Datum(Box::new(datum))) {
            Ok(()) => {
                self.counters.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&mut self) {
        let timestamp = aws_smithy_types::DateTime::from(self.clock.system_time());
        let mut data = Vec::new();
        self.registry.visit_counters(|key, counter| {
            let value = counter.load(Ordering::Relaxed);
            let last = self.last_counts.insert(key.clone(), value).unwrap_or(0);
            let delta = value.saturating_sub(last);
            if delta > 0 {
                data.push(datum(key, timestamp).value(delta as f64).build());
            }
        });
        self.registry.visit_gauges(|key, gauge| {
            let value = f64::from_bits(gauge.load(Ordering::Relaxed));
            // A retired gauge (NaN: its shard is no longer read) is not sent.
            if value.is_finite() {
                data.push(datum(key, timestamp).value(value).build());
            }
        });
        self.registry.visit_histograms(|key, histogram| {
            let mut set: Option<(f64, f64, f64, f64)> = None;
            histogram.clear_with(|values| {
                for &v in values.iter().filter(|v| v.is_finite()) {
                    let (count, sum, min, max) = set.get_or_insert((0.0, 0.0, v, v));
                    *count += 1.0;
                    *sum += v;
                    *min = min.min(v);
                    *max = max.max(v);
                }
            });
            if let Some((count, sum, min, max)) = set {
                let stats = StatisticSet::builder()
                    .sample_count(count)
                    .sum(sum)
                    .minimum(min)
                    .maximum(max)
                    .build();
                data.push(datum(key, timestamp).statistic_values(stats).build());
            }
        });
        for d in data {
            self.push(d);
        }
        let dropped = self.counters.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            tracing::warn!(
                dropped_since_last_report = dropped - self.dropped_reported,
                dropped_total = dropped,
                "the CloudWatch metrics queue is full (metricsMaxQueueSize); data points dropped"
            );
            self.dropped_reported = dropped;
        }
    }
}

/// CloudWatch's unit for one of our metrics: milliseconds for times and lags, bytes for
/// byte counts, else a count.
pub fn unit_of(name: &str) -> StandardUnit {
    if name.ends_with("Time") || name == crate::metrics::MILLIS_BEHIND_LATEST {
        StandardUnit::Milliseconds
    } else if name == crate::metrics::DATA_BYTES_PROCESSED {
        StandardUnit::Bytes
    } else {
        StandardUnit::Count
    }
}

fn datum(
    key: &Key,
    timestamp: aws_smithy_types::DateTime,
) -> aws_sdk_cloudwatch::types::builders::MetricDatumBuilder {
    let dimensions: Vec<Dimension> = key
        .labels()
        .map(|l| Dimension::builder().name(l.key()).value(l.value()).build())
        .collect();
    MetricDatum::builder()
        .metric_name(key.name())
        .set_dimensions(Some(dimensions))
        .unit(unit_of(key.name()))
        .timestamp(timestamp)
}

struct Sender {
    client: aws_sdk_cloudwatch::Client,
    namespace: String,
    counters: Arc<Counters>,
    call_timeout: Duration,
    clock: Arc<dyn Clock>,
    interval: Duration,
    last_warned: Option<std::time::Instant>,
}

impl Sender {
    async fn run(mut self, mut queue: mpsc::Receiver<Item>) {
        let mut batch: Vec<MetricDatum> = Vec::with_capacity(MAX_DATUMS_PER_REQUEST);
        while let Some(item) = queue.recv().await {
            let mut acks = Vec::new();
            let mut next = Some(item);
            while let Some(item) = next.take() {
                match item {
                    Item::Datum(d) => batch.push(*d),
                    Item::Flushed(done) => acks.push(done),
                }
                if batch.len() >= MAX_DATUMS_PER_REQUEST {
                    self.send(std::mem::take(&mut batch)).await;
                }
                next = queue.try_recv().ok();
            }
            if !batch.is_empty() {
                self.send(std::mem::take(&mut batch)).await;
            }
            for done in acks {
                let _ = done.send(());
            }
        }
    }

    async fn send(&mut self, data: Vec<MetricDatum>) {
        let count = data.len() as u64;
        let call = self
            .client
            .put_metric_data()
            .namespace(&self.namespace)
            .set_metric_data(Some(data))
            .send();
        let error = match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(_)) => {
                self.counters.requests.fetch_add(1, Ordering::Relaxed);
                self.counters.sent.fetch_add(count, Ordering::Relaxed);
                return;
            }
            Ok(Err(e)) => kcl_lease::ErrorChain(&e).to_string(),
            Err(_) => format!("no answer within {:?}", self.call_timeout),
        };
        self.counters
            .failed_requests
            .fetch_add(1, Ordering::Relaxed);
        self.counters.failed.fetch_add(count, Ordering::Relaxed);
        let now = self.clock.now();
        let due = self
            .last_warned
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if due {
            self.last_warned = Some(now);
            let stats = self.counters.snapshot();
            tracing::warn!(
                namespace = %self.namespace,
                data_points = count,
                failed_requests = stats.failed_requests,
                error = %error,
                "PutMetricData failed; its data points are dropped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(
            unit_of("KinesisDataFetcher.getRecords.Time"),
            StandardUnit::Milliseconds
        );
        assert_eq!(unit_of("MillisBehindLatest"), StandardUnit::Milliseconds);
        assert_eq!(unit_of("DataBytesProcessed"), StandardUnit::Bytes);
        assert_eq!(unit_of("RecordsProcessed"), StandardUnit::Count);
    }
}
