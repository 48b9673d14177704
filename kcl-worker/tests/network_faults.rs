//! Network faults on tokio's paused clock: a hung Kinesis or lease store path is bounded by
//! the call timeouts, reported (shard health, `warn` once per back-off cycle, metrics), and
//! recovered from without losing, repeating or reordering records; shutdown stays bounded.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_lease::{LeaseError, SeededRandom, SystemClock};
use kcl_worker::stream::StreamErrorKind;
use kcl_worker::test_util::kinesis::{InMemoryKinesis, Operation};
use kcl_worker::test_util::recording::{Behaviour, EventLog, RecordingFactory};
use kcl_worker::{InitialPosition, Worker, WorkerConfig, WorkerHandle, metrics as m};
use metrics::{Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder};
use metrics::{SharedString, Unit};
use tokio::time::Instant;

const STREAM: &str = "payments";
const HANG: Duration = Duration::from_secs(3600);
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const GRACE: Duration = Duration::from_secs(2);

/// Sums counters by metric name (the test binary's global recorder).
#[derive(Default)]
struct Counters(Mutex<BTreeMap<String, Arc<AtomicU64>>>);

struct Cell(Arc<AtomicU64>);

impl CounterFn for Cell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

struct TestRecorder(&'static Counters);

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut map = self.0.0.lock().unwrap();
        Counter::from_arc(Arc::new(Cell(
            map.entry(key.name().to_owned()).or_default().clone(),
        )))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

fn counters() -> &'static Counters {
    static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        let counters: &'static Counters = Box::leak(Box::default());
        metrics::set_global_recorder(TestRecorder(counters)).unwrap();
        counters
    })
}

fn counter(name: &str) -> u64 {
    counters()
        .0
        .lock()
        .unwrap()
        .get(name)
        .map_or(0, |c| c.load(Ordering::Relaxed))
}

struct Env {
    kinesis: InMemoryKinesis,
    store: Arc<InMemoryLeaseStore>,
    log: EventLog,
}

impl Env {
    fn new(shards: u32) -> Self {
        let kinesis = InMemoryKinesis::new();
        kinesis.create_stream(STREAM, shards).unwrap();
        Self {
            kinesis,
            store: Arc::new(InMemoryLeaseStore::new()),
            log: EventLog::new(),
        }
    }

    async fn worker(&self, id: &str) -> WorkerHandle {
        let config = WorkerConfig::builder("app", STREAM)
            .worker_id(id)
            .initial_position(InitialPosition::TrimHorizon)
            .idle_time_between_reads(Duration::from_millis(200))
            .shard_sync_interval(Duration::from_secs(5))
            .task_backoff(Duration::from_millis(100))
            .max_backoff(MAX_BACKOFF)
            .shutdown_grace(GRACE)
            .call_attempt_timeout(CALL_TIMEOUT)
            .call_timeout(CALL_TIMEOUT)
            .build()
            .unwrap();
        let factory = RecordingFactory::new(id, self.log.clone(), Behaviour::new());
        Worker::builder(config, factory)
            .stream_client(Arc::new(self.kinesis.clone()))
            .lease_store(self.store.clone())
            .clock(Arc::new(SystemClock))
            .random(Arc::new(SeededRandom::new(11)))
            .build()
            .await
            .unwrap()
            .start()
            .await
            .unwrap()
    }

    fn put(&self, prefix: &str, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let payload = format!("{prefix}-{i:04}");
                self.kinesis
                    .put_record(
                        STREAM,
                        &format!("key-{i}"),
                        None,
                        Bytes::from(payload.clone()),
                    )
                    .unwrap();
                payload
            })
            .collect()
    }

    fn payloads(&self) -> Vec<String> {
        self.log
            .deliveries()
            .into_iter()
            .map(|(_, _, r)| String::from_utf8(r.data.to_vec()).unwrap())
            .collect()
    }

    async fn wait_until(&self, what: &str, limit: Duration, mut cond: impl FnMut(&Env) -> bool) {
        let start = Instant::now();
        while !cond(self) {
            assert!(
                start.elapsed() < limit,
                "timed out (virtual {limit:?}) waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_kinesis_hang_shows_in_shard_health_and_every_shard_resumes_without_loss() {
    let env = Env::new(2);
    let mut expected: BTreeSet<String> = env.put("before", 40).into_iter().collect();
    let worker = env.worker("w1").await;
    env.wait_until("the first records", Duration::from_secs(60), |e| {
        e.payloads().len() == expected.len()
    })
    .await;
    let stalled_before = counter(m::SHARD_STALLED_TOTAL);
    let errors_before = counter(m::STREAM_ERRORS_TOTAL);

    // GetRecords hangs: every call is cut at call_timeout and retried with back-off.
    env.kinesis.set_latency(Operation::GetRecords, HANG);
    expected.extend(env.put("during", 40));
    let hang = Duration::from_secs(40);
    tokio::time::sleep(hang).await;
    let health = worker.shard_health();
    assert_eq!(health.len(), 2, "{health:?}");
    for h in &health {
        assert!(h.consecutive_failures >= 2, "{h:?}");
        let error = h.last_error.as_ref().expect("an error");
        assert_eq!(error.kind, StreamErrorKind::TimedOut, "{h:?}");
        assert!(error.message.contains("GetRecords"), "{h:?}");
        assert!(h.last_success.is_some(), "{h:?}");
    }
    // Warned once when each streak started, then at most once per max_backoff: fewer
    // warnings than failed calls.
    let stalled = counter(m::SHARD_STALLED_TOTAL) - stalled_before;
    let errors = counter(m::STREAM_ERRORS_TOTAL) - errors_before;
    let per_shard_bound = 1 + hang.as_secs() / MAX_BACKOFF.as_secs() + 1;
    assert!(stalled >= 2, "stalled {stalled}");
    assert!(stalled <= 2 * per_shard_bound, "stalled {stalled}");
    assert!(stalled < errors, "stalled {stalled}, errors {errors}");
    assert_eq!(env.payloads().len(), 40, "nothing delivered while hung");

    // The path comes back: every shard resumes within one call timeout plus one back-off.
    env.kinesis
        .set_latency(Operation::GetRecords, Duration::ZERO);
    let resumed = CALL_TIMEOUT + MAX_BACKOFF + Duration::from_secs(1);
    env.wait_until("every record after the hang", resumed, |e| {
        e.payloads().len() >= expected.len()
    })
    .await;
    // Nothing lost, nothing delivered twice, and in order within each shard.
    let delivered = env.payloads();
    assert_eq!(delivered.len(), expected.len());
    assert_eq!(delivered.iter().cloned().collect::<BTreeSet<_>>(), expected);
    let mut last: BTreeMap<String, kcl_kpl::ExtendedSequenceNumber> = BTreeMap::new();
    for (_, shard, r) in env.log.deliveries() {
        let position = r.extended_sequence_number();
        if let Some(previous) = last.insert(shard.clone(), position.clone()) {
            assert!(previous < position, "{shard}: {previous} then {position}");
        }
    }
    for h in worker.shard_health() {
        assert_eq!(h.consecutive_failures, 0, "{h:?}");
        assert_eq!(h.millis_behind_latest, Some(0), "{h:?}");
    }
    assert!(worker.shutdown().await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_lease_store_hang_does_not_hold_shutdown_and_the_report_names_the_leases() {
    let env = Env::new(2);
    let expected = env.put("rec", 20);
    let worker = env.worker("w1").await;
    env.wait_until("the records", Duration::from_secs(60), |e| {
        e.payloads().len() == expected.len()
    })
    .await;
    env.wait_until("both leases", Duration::from_secs(60), |_| {
        worker.held_leases().len() == 2
    })
    .await;

    env.store.set_latency(HANG);
    let started = Instant::now();
    let report = worker.shutdown().await.unwrap();
    let took = started.elapsed();
    assert!(took <= GRACE + CALL_TIMEOUT, "shutdown took {took:?}");
    assert!(!report.is_clean());
    let keys: BTreeSet<&str> = report
        .leases_not_released
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["shardId-000000000000", "shardId-000000000001"]),
        "{report:?}"
    );
    for (key, e) in &report.leases_not_released {
        match e {
            LeaseError::Timeout { after, .. } => assert_eq!(*after, CALL_TIMEOUT, "{key}"),
            other => panic!("{key}: expected a timeout, got {other:?}"),
        }
    }
    assert!(report.leases_released.is_empty(), "{report:?}");
}
