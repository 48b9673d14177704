//! The worker reports through the `metrics` facade: a recorder installed by the test sees
//! records, bytes, leases, renewals, reads and dropped aggregates.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kcl_kpl::Aggregator;
use kcl_lease::SystemClock;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_worker::test_util::kinesis::InMemoryKinesis;
use kcl_worker::test_util::recording::{Behaviour, EventLog, RecordingFactory};
use kcl_worker::{InitialPosition, Worker, WorkerConfig, metrics as m};
use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// Sums counters, keeps the last gauge value and counts histogram samples, by metric name.
#[derive(Default)]
struct Totals {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    gauges: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

struct Cell(Arc<AtomicU64>);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Cell {
    fn increment(&self, _: f64) {}
    fn decrement(&self, _: f64) {}
    fn set(&self, value: f64) {
        self.0.store(value as u64, Ordering::Relaxed);
    }
}

impl HistogramFn for Cell {
    fn record(&self, _: f64) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

fn cell(map: &Mutex<BTreeMap<String, Arc<AtomicU64>>>, key: &Key) -> Arc<Cell> {
    let mut map = map.lock().unwrap();
    Arc::new(Cell(map.entry(key.name().to_owned()).or_default().clone()))
}

#[derive(Clone, Default)]
struct TestRecorder(Arc<Totals>);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(cell(&self.0.counters, key))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(cell(&self.0.gauges, key))
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(cell(&self.0.histograms, key))
    }
}

impl TestRecorder {
    fn get(map: &Mutex<BTreeMap<String, Arc<AtomicU64>>>, name: &str) -> u64 {
        map.lock()
            .unwrap()
            .get(name)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
    fn counter(&self, name: &str) -> u64 {
        Self::get(&self.0.counters, name)
    }
    fn gauge(&self, name: &str) -> u64 {
        Self::get(&self.0.gauges, name)
    }
    fn histogram_samples(&self, name: &str) -> u64 {
        Self::get(&self.0.histograms, name)
    }
}

#[test]
fn the_worker_reports_its_metrics() {
    let recorder = TestRecorder::default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        runtime.block_on(async {
            let kinesis = InMemoryKinesis::new();
            kinesis.create_stream("s", 2).unwrap();
            for i in 0..100 {
                kinesis
                    .put_record("s", &format!("k{i}"), None, Bytes::from(vec![b'x'; 10]))
                    .unwrap();
            }
            // An aggregate whose sub-records belong to different shards: dropped (Java KCL rule).
            let mut agg = Aggregator::new();
            let mut keys = (0..).map(|i| format!("spread-{i}"));
            let shard_of = |k: &str| kcl_kpl::partition_key_hash(k) >> 127;
            let first = keys.next().unwrap();
            let other = keys.find(|k| shard_of(k) != shard_of(&first)).unwrap();
            agg.add(&first, None, Bytes::from_static(b"a")).unwrap();
            agg.add(&other, None, Bytes::from_static(b"b")).unwrap();
            let rec = agg.finish().unwrap();
            kinesis
                .put_record(
                    "s",
                    &rec.partition_key,
                    rec.explicit_hash_key.as_deref(),
                    rec.data,
                )
                .unwrap();

            let log = EventLog::new();
            let config = WorkerConfig::builder("app", "s")
                .worker_id("w1")
                .initial_position(InitialPosition::TrimHorizon)
                .idle_time_between_reads(Duration::from_millis(100))
                .build()
                .unwrap();
            let handle = Worker::builder(
                config,
                RecordingFactory::new("w1", log.clone(), Behaviour::new()),
            )
            .stream_client(Arc::new(kinesis.clone()))
            .lease_store(Arc::new(InMemoryLeaseStore::new()))
            .clock(Arc::new(SystemClock))
            .build()
            .await
            .unwrap()
            .start()
            .await
            .unwrap();
            while log.delivered_count() < 100 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Long enough for renewals.
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(recorder.gauge("kcl_leases_held"), 2);
            assert_eq!(recorder.gauge(m::SHARD_CONSUMERS), 2);
            handle.shutdown().await.unwrap();
        })
    });
    assert_eq!(recorder.counter(m::RECORDS_PROCESSED_TOTAL), 100);
    assert_eq!(recorder.counter(m::BYTES_PROCESSED_TOTAL), 1000);
    assert_eq!(recorder.counter(m::DROPPED_OUT_OF_RANGE_TOTAL), 1);
    assert_eq!(recorder.counter("kcl_leases_taken_total"), 2);
    assert!(recorder.counter("kcl_lease_renewals_total") >= 2);
    assert!(recorder.histogram_samples(m::GET_RECORDS_SECONDS) >= 2);
    assert!(recorder.histogram_samples(m::PROCESS_RECORDS_SECONDS) >= 2);
    assert_eq!(recorder.gauge(m::SHARD_CONSUMERS), 0);
}
