//! Metrics exporters any binary can install (features `prometheus`, `cloudwatch`; both off
//! by default): a Prometheus scrape endpoint ([`prometheus`]) and a CloudWatch publisher
//! ([`cloudwatch`]), behind one filter that applies the Java KCL's `metricsLevel` and
//! `metricsEnabledDimensions` ([`MetricsConfig`]).
//!
//! ```no_run
//! # #[cfg(feature = "prometheus")]
//! # async fn example() -> Result<(), kcl_worker::export::ExportError> {
//! use kcl_worker::export::{MetricsConfig, install, prometheus::PrometheusEndpoint};
//! let config = MetricsConfig::new("my-application");
//! let mut endpoint = PrometheusEndpoint::bind("127.0.0.1:9464".parse().unwrap()).await?;
//! if let Some(recorder) = endpoint.take_recorder() {
//!     install(vec![Box::new(recorder)], &config)?;
//! }
//! // keep `endpoint` alive while the worker runs
//! # Ok(()) }
//! ```
//!
//! The worker records its metrics through the `metrics` facade (names in
//! [`crate::metrics`]); recording is an atomic update and never waits for an exporter.

use std::collections::BTreeSet;
use std::time::Duration;

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString, Unit,
};

use crate::ConfigError;
use crate::metrics::{MetricsLevel, dimension};

#[cfg(feature = "cloudwatch")]
pub mod cloudwatch;
pub mod http;
#[cfg(feature = "prometheus")]
pub mod prometheus;

/// Errors of the exporters.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// A global `metrics` recorder was installed already.
    #[error("a metrics recorder is installed already")]
    AlreadyInstalled,
    /// The endpoint could not listen on the address.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bad option.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// What is published and how: the Java KCL's `MetricsConfig` options.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetricsConfig {
    /// `metricsLevel`: NONE, SUMMARY or DETAILED (default DETAILED, as in the Java KCL).
    pub metrics_level: MetricsLevel,
    /// `metricsEnabledDimensions`: the dimensions published; `None` for all (the default).
    /// `Operation` is always published.
    pub metrics_enabled_dimensions: Option<BTreeSet<String>>,
    /// `namespace`: the CloudWatch namespace (the Java KCL uses the application name).
    pub namespace: String,
    /// `metricsBufferTimeMillis`: how long the CloudWatch publisher buffers before it sends
    /// (default 10 s).
    pub metrics_buffer_time: Duration,
    /// `metricsMaxQueueSize`: data points the CloudWatch publisher queues at most; beyond it
    /// new ones are dropped and counted (default 10,000).
    pub metrics_max_queue_size: usize,
    /// Bound on one PutMetricData call, retries included (default 10 s).
    pub call_timeout: Duration,
}

impl MetricsConfig {
    /// The defaults, with `namespace`.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            metrics_level: MetricsLevel::Detailed,
            metrics_enabled_dimensions: None,
            namespace: namespace.into(),
            metrics_buffer_time: Duration::from_secs(10),
            metrics_max_queue_size: 10_000,
            call_timeout: Duration::from_secs(10),
        }
    }

    /// Sets `metricsLevel`.
    pub fn with_metrics_level(mut self, level: MetricsLevel) -> Self {
        self.metrics_level = level;
        self
    }

    /// Sets `metricsEnabledDimensions` (`Operation` is always added).
    pub fn with_metrics_enabled_dimensions<I, S>(mut self, dimensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut set: BTreeSet<String> = dimensions.into_iter().map(Into::into).collect();
        set.insert(dimension::OPERATION.to_owned());
        self.metrics_enabled_dimensions = Some(set);
        self
    }

    /// Sets `metricsBufferTimeMillis`.
    pub fn with_metrics_buffer_time(mut self, buffer_time: Duration) -> Self {
        self.metrics_buffer_time = buffer_time;
        self
    }

    /// Sets `metricsMaxQueueSize`.
    pub fn with_metrics_max_queue_size(mut self, size: usize) -> Self {
        self.metrics_max_queue_size = size;
        self
    }

    /// Sets the bound on one PutMetricData call.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Checks the options; a bad value names its option.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |option: &'static str, reason: &str| ConfigError::Invalid {
            option,
            reason: reason.to_owned(),
        };
        if self.namespace.trim().is_empty() || self.namespace.len() > 255 {
            return Err(invalid("namespace", "must be 1 to 255 characters"));
        }
        if self.namespace.starts_with("AWS/") {
            return Err(invalid("namespace", "the AWS/ prefix is reserved"));
        }
        if self.metrics_buffer_time.is_zero() {
            return Err(invalid("metricsBufferTimeMillis", "must be positive"));
        }
        if self.metrics_max_queue_size == 0 {
            return Err(invalid("metricsMaxQueueSize", "must be positive"));
        }
        if self.call_timeout.is_zero() {
            return Err(invalid("call_timeout", "must be positive"));
        }
        Ok(())
    }
}

/// A recorder applying `metricsLevel` and `metricsEnabledDimensions` in front of another:
/// a metric below the level is a no-op handle (nothing is stored or sent), and labels that
/// are not enabled dimensions are removed.
#[derive(Debug)]
pub struct Filtered<R> {
    inner: R,
    level: MetricsLevel,
    dimensions: Option<BTreeSet<String>>,
}

impl<R> Filtered<R> {
    /// `inner` behind the filter of `config`.
    pub fn new(inner: R, config: &MetricsConfig) -> Self {
        Self {
            inner,
            level: config.metrics_level,
            dimensions: config.metrics_enabled_dimensions.clone(),
        }
    }

    fn key(&self, key: &Key) -> Key {
        match &self.dimensions {
            None => key.clone(),
            Some(enabled) => {
                let labels: Vec<Label> = key
                    .labels()
                    .filter(|l| l.key() == dimension::OPERATION || enabled.contains(l.key()))
                    .cloned()
                    .collect();
                Key::from_parts(key.name().to_owned(), labels)
            }
        }
    }
}

impl<R: Recorder> Recorder for Filtered<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if !self.level.publishes(metadata.level()) {
            return Counter::noop();
        }
        self.inner.register_counter(&self.key(key), metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if !self.level.publishes(metadata.level()) {
            return Gauge::noop();
        }
        self.inner.register_gauge(&self.key(key), metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if !self.level.publishes(metadata.level()) {
            return Histogram::noop();
        }
        self.inner.register_histogram(&self.key(key), metadata)
    }
}

/// Installs `recorders` (all of them see every metric) behind the filter of `config` as the
/// process's global `metrics` recorder. Fails when one is installed already.
pub fn install(
    recorders: Vec<Box<dyn Recorder + Send + Sync>>,
    config: &MetricsConfig,
) -> Result<(), ExportError> {
    config.validate()?;
    let mut fanout = metrics_util::layers::FanoutBuilder::default();
    for recorder in recorders {
        fanout = fanout.add_recorder(BoxedRecorder(recorder));
    }
    metrics::set_global_recorder(Filtered::new(fanout.build(), config))
        .map_err(|_| ExportError::AlreadyInstalled)
}

/// A boxed recorder as a sized one (the fan-out takes sized recorders).
struct BoxedRecorder(Box<dyn Recorder + Send + Sync>);

impl Recorder for BoxedRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::registry::{AtomicStorage, Registry};
    use std::sync::Arc;

    /// Records into a registry the test reads.
    struct Store(Arc<Registry<Key, AtomicStorage>>);

    impl Recorder for Store {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
            self.0
                .get_or_create_counter(key, |c| Counter::from_arc(c.clone()))
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            self.0
                .get_or_create_gauge(key, |g| Gauge::from_arc(g.clone()))
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            self.0
                .get_or_create_histogram(key, |h| Histogram::from_arc(h.clone()))
        }
    }

    fn names(registry: &Registry<Key, AtomicStorage>) -> Vec<String> {
        let mut out = Vec::new();
        registry.visit_counters(|key, _| {
            let labels: Vec<String> = key.labels().map(|l| l.key().to_owned()).collect();
            out.push(format!("{}{labels:?}", key.name()));
        });
        out.sort();
        out
    }

    #[test]
    fn level_and_dimensions_filter() {
        let emit = || {
            metrics::counter!(level: crate::metrics::SUMMARY, "S", "Operation" => "ProcessTask", "ShardId" => "s-1")
                .increment(1);
            metrics::counter!(level: crate::metrics::DETAILED, "D", "Operation" => "ProcessTask", "ShardId" => "s-1")
                .increment(1);
        };
        let cases = [
            (
                MetricsConfig::new("n"),
                vec![
                    "D[\"Operation\", \"ShardId\"]",
                    "S[\"Operation\", \"ShardId\"]",
                ],
            ),
            (
                MetricsConfig::new("n").with_metrics_level(MetricsLevel::Summary),
                vec!["S[\"Operation\", \"ShardId\"]"],
            ),
            (
                MetricsConfig::new("n").with_metrics_enabled_dimensions(["WorkerIdentifier"]),
                vec!["D[\"Operation\"]", "S[\"Operation\"]"],
            ),
            (
                MetricsConfig::new("n").with_metrics_level(MetricsLevel::None),
                vec![],
            ),
        ];
        for (config, want) in cases {
            let registry = Arc::new(Registry::atomic());
            let recorder = Filtered::new(Store(Arc::clone(&registry)), &config);
            metrics::with_local_recorder(&recorder, emit);
            assert_eq!(names(&registry), want, "{config:?}");
        }
    }

    #[test]
    fn bad_options_are_named() {
        let cases = [
            (MetricsConfig::new(""), "namespace"),
            (MetricsConfig::new("AWS/Kinesis"), "namespace"),
            (
                MetricsConfig::new("n").with_metrics_buffer_time(Duration::ZERO),
                "metricsBufferTimeMillis",
            ),
            (
                MetricsConfig::new("n").with_metrics_max_queue_size(0),
                "metricsMaxQueueSize",
            ),
        ];
        for (config, option) in cases {
            match config.validate() {
                Err(ConfigError::Invalid { option: got, .. }) => assert_eq!(got, option),
                other => panic!("{config:?}: {other:?}"),
            }
        }
        assert!(MetricsConfig::new("app").validate().is_ok());
    }
}
