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
use kcl_worker::metrics as m;
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::recording::Behaviour;
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
            // The worker's own defaults, but for a short idle time.
            let fleet = Fleet::new("s", 2).unwrap().with_defaults(|b| b);
            for i in 0..100 {
                fleet
                    .kinesis()
                    .put_record("s", &format!("k{i}"), None, Bytes::from(vec![b'x'; 10]))
                    .unwrap();
            }
            // An aggregate whose sub-records belong to different shards: dropped (Java KCL rule).
            let mut keys = (0..).map(|i| format!("spread-{i}"));
            let shard_of = |k: &str| kcl_kpl::partition_key_hash(k) >> 127;
            let first = keys.next().unwrap();
            let other = keys.find(|k| shard_of(k) != shard_of(&first)).unwrap();
            fleet
                .put_aggregate(&[(&first, "a".to_owned()), (&other, "b".to_owned())])
                .unwrap();

            let (handle, _) = fleet
                .start_with("w1", Behaviour::new(), |b| {
                    b.idle_time_between_reads(Duration::from_millis(100))
                })
                .await
                .unwrap();
            fleet
                .wait_until("every record", Duration::from_secs(600), |f| {
                    f.log().delivered_count() >= 100
                })
                .await
                .unwrap();
            // Long enough for renewals.
            tokio::time::sleep(Duration::from_secs(10)).await;
            assert_eq!(recorder.gauge("kcl_leases_held"), 2);
            assert_eq!(recorder.gauge(m::SHARD_CONSUMERS), 2);
            handle.shutdown().await.unwrap();
        })
    });
    assert_eq!(recorder.counter(m::RECORDS_PROCESSED), 100);
    assert_eq!(recorder.counter(m::DATA_BYTES_PROCESSED), 1000);
    assert_eq!(recorder.counter(m::DROPPED_OUT_OF_RANGE_TOTAL), 1);
    assert_eq!(recorder.counter("kcl_leases_taken_total"), 2);
    assert!(recorder.counter("kcl_lease_renewals_total") >= 2);
    assert!(recorder.histogram_samples(m::GET_RECORDS_TIME) >= 2);
    assert!(recorder.histogram_samples(m::GET_RECORDS_SUCCESS) >= 2);
    assert!(recorder.histogram_samples(m::PROCESS_RECORDS_TIME) >= 2);
    // The coordinator's, named as the Java KCL's.
    let lease = kcl_worker::kcl_lease::metrics::RENEW_LEASE_SUCCESS;
    assert!(recorder.histogram_samples(lease) >= 2);
    assert!(recorder.histogram_samples(kcl_worker::kcl_lease::metrics::LOST_LEASES) >= 1);
    assert!(recorder.histogram_samples(kcl_worker::kcl_lease::metrics::TOTAL_LEASES) >= 1);
    assert_eq!(recorder.gauge(m::SHARD_CONSUMERS), 0);
}
