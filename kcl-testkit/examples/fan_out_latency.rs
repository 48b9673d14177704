//! Put-to-process latency, polling vs enhanced fan-out, measured in one run on the same
//! stream: three applications consume one single-shard stream on kinesis-local (leases on
//! dynalite) at the same time, each with its own worker: polling with the default
//! `idle_time_between_reads` (1 s), polling at 200 ms, and fan-out. A producer puts one
//! record every 50 ms carrying its wall-clock put time; each processor records, per record,
//! the time from just before the put until `process_records` sees it. The same is then
//! measured on the in-memory Kinesis (which pushes a subscription event as soon as a record
//! arrives, as the service does), to show the mechanism apart from the emulator.
//!
//! `cargo run --release -q -p kcl-testkit --example fan_out_latency [RECORDS]` (default 300
//! records; needs the emulators: `KCL_EMULATORS_DIR`).
//!
//! Each line is `SETUP retrieval=R records=N median_ms=X p99_ms=Y`. kinesis-local pushes
//! subscription events once a second (its `SubscribeToShard` is a one-second timer), so on it
//! fan-out latency reflects that timer, not the service's ~70 ms.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput, ShutdownReason,
};
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{LeaseStore, SeededRandom, SystemClock};
use kcl_testkit::emulators::{
    create_stream_and_wait, dynamodb_client, kinesis_client, shared_kinesis_and_dynamodb,
};
use kcl_worker::aws::AwsStreamClient;
use kcl_worker::stream::StreamClient;
use kcl_worker::test_util::InMemoryKinesis;
use kcl_worker::{InitialPosition, RetrievalConfig, Worker, WorkerConfig, WorkerConfigBuilder};

type Latencies = Arc<Mutex<Vec<Duration>>>;

struct Measuring {
    latencies: Latencies,
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

impl RecordProcessor for Measuring {
    async fn initialize(&mut self, _: InitializationInput) {}
    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let now = now_nanos();
        let seen: Vec<Duration> = input
            .records
            .iter()
            .filter_map(|r| {
                std::str::from_utf8(&r.data)
                    .ok()
                    .and_then(|s| s.strip_prefix("t="))
                    .and_then(|s| s.parse::<u128>().ok())
            })
            .map(|put| {
                Duration::from_nanos(u64::try_from(now.saturating_sub(put)).unwrap_or(u64::MAX))
            })
            .collect();
        self.latencies.lock().unwrap().extend(seen);
        let _ = input.checkpointer.checkpoint().await;
    }
    async fn shutdown(&mut self, input: ShutdownInput) {
        if input.shutdown_reason != ShutdownReason::Zombie {
            let _ = input.checkpointer.checkpoint().await;
        }
    }
}

struct Setup {
    name: &'static str,
    tweak: fn(WorkerConfigBuilder) -> WorkerConfigBuilder,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "polling-1000ms",
        tweak: |b| b,
    },
    Setup {
        name: "polling-200ms",
        tweak: |b| b.idle_time_between_reads(Duration::from_millis(200)),
    },
    Setup {
        name: "fan-out",
        tweak: |b| b.retrieval_specific_config(RetrievalConfig::fan_out()),
    },
];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn report(place: &str, name: &str, latencies: &Latencies) {
    let mut v = latencies.lock().unwrap().clone();
    v.sort();
    println!(
        "{place:<13} retrieval={name:<15} records={:<5} median_ms={:.1} p99_ms={:.1}",
        v.len(),
        percentile(&v, 50.0).as_secs_f64() * 1000.0,
        percentile(&v, 99.0).as_secs_f64() * 1000.0,
    );
}

/// Starts one worker per setup on `stream`, each its own application, and returns their
/// handles and latency logs.
async fn start_all(
    stream: &str,
    client: impl Fn() -> Arc<dyn StreamClient>,
    store: impl Fn(&str) -> Arc<dyn LeaseStore>,
) -> Vec<(kcl_worker::WorkerHandle, Latencies)> {
    let mut out = Vec::new();
    for setup in &SETUPS {
        let application = format!("{stream}-{}", setup.name);
        let config = (setup.tweak)(
            WorkerConfig::builder(application.clone(), stream)
                .worker_id(setup.name)
                .initial_position(InitialPosition::TrimHorizon),
        )
        .build()
        .unwrap();
        let latencies: Latencies = Arc::default();
        let l = latencies.clone();
        let handle = Worker::builder(config, move || Measuring {
            latencies: l.clone(),
        })
        .stream_client(client())
        .lease_store(store(&application))
        .clock(Arc::new(SystemClock))
        .random(Arc::new(SeededRandom::new(7)))
        .build()
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
        out.push((handle, latencies));
    }
    out
}

/// Waits until every worker processed `want` records; a worker still short after two
/// minutes ends the run with an error naming it (no percentile of a partial run is printed).
async fn wait_processing(workers: &[(kcl_worker::WorkerHandle, Latencies)], want: usize) {
    let start = Instant::now();
    while workers.iter().any(|(_, l)| l.lock().unwrap().len() < want) {
        if start.elapsed() >= Duration::from_secs(120) {
            for ((_, l), setup) in workers.iter().zip(&SETUPS) {
                let got = l.lock().unwrap().len();
                if got < want {
                    eprintln!(
                        "{}: {got} of {want} records processed after 120 s",
                        setup.name
                    );
                }
            }
            panic!("not every record was processed within 120 s: no figures");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn emulators(records: usize) {
    let emulators = tokio::task::block_in_place(shared_kinesis_and_dynamodb)
        .unwrap_or_else(|e| panic!("kinesis-local and dynalite are required: {e}"));
    let kinesis_endpoint = emulators.kinesis.endpoint().to_owned();
    let dynamodb_endpoint = emulators.dynamodb.endpoint().to_owned();
    let kinesis = kinesis_client(&kinesis_endpoint);
    let stream = format!("latency-{}", std::process::id());
    create_stream_and_wait(&kinesis, &stream, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let workers = start_all(
        &stream,
        || Arc::new(AwsStreamClient::new(kinesis_client(&kinesis_endpoint))),
        |table| {
            Arc::new(
                DynamoLeaseStore::new(dynamodb_client(&dynamodb_endpoint), table)
                    .with_table_wait(Duration::from_millis(50), Duration::from_secs(30)),
            )
        },
    )
    .await;
    // Let every worker take its lease and start reading.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..records {
        kinesis
            .put_record()
            .stream_name(&stream)
            .partition_key("k")
            .data(aws_sdk_kinesis::primitives::Blob::new(
                format!("t={}", now_nanos()).into_bytes(),
            ))
            .send()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_processing(&workers, records).await;
    for ((handle, latencies), setup) in workers.into_iter().zip(&SETUPS) {
        report("kinesis-local", setup.name, &latencies);
        handle.shutdown().await.unwrap();
    }
}

async fn in_memory(records: usize) {
    let kinesis = InMemoryKinesis::new();
    let stream = "latency";
    kinesis.create_stream(stream, 1).unwrap();
    let k = kinesis.clone();
    // One lease table per application.
    let workers = start_all(
        stream,
        move || Arc::new(k.clone()),
        |_| Arc::new(kcl_lease::test_util::InMemoryLeaseStore::new()) as Arc<dyn LeaseStore>,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..records {
        kinesis
            .put_record(stream, "k", None, Bytes::from(format!("t={}", now_nanos())))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_processing(&workers, records).await;
    for ((handle, latencies), setup) in workers.into_iter().zip(&SETUPS) {
        report("in-memory", setup.name, &latencies);
        handle.shutdown().await.unwrap();
    }
}

fn main() {
    let records = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        emulators(records).await;
        in_memory(records).await;
    });
}
