//! Side-by-side figures of the real Java KCL 3.1.3 and our worker, in one run (not a test: it
//! prints one line per figure). Run it through `scripts/java-interop-bench`, which builds it
//! and runs it inside a loopback-only network namespace (the Java fixture refuses to start
//! anywhere else).
//!
//! Both sides run as separate processes with the same record log format (one JSON line per
//! event, as `scripts/java-kcl/processor.py` writes it): this binary re-runs itself as
//! `java_interop_bench rust-worker ...` for ours. Both use a failover time of 3 s. Figures:
//! process start to first record (on a table with free leases, and on an empty table), peak
//! RSS, SIGTERM to exit, and the time until the other side delivers from the stopped side's
//! shards after each side's graceful stop and crash.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use base64::Engine;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput, ShutdownReason,
};
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{Lease, LeaseStore};
use kcl_testkit::emulators::{Emulator, EmulatorKind, dynamodb_client, kinesis_client};
use kcl_testkit::java_kcl::{JavaKclOptions, JavaKclWorker, read_record_log};
use kcl_worker::aws::AwsStreamClient;
use kcl_worker::stream::StreamClient;
use kcl_worker::{InitialPosition, Worker, WorkerConfig};
use rustix::process::{Pid, Signal, kill_process, kill_process_group};

const FAILOVER: Duration = Duration::from_secs(3);
const LIMIT: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(50);
const SHARDS: i32 = 4;

// ---------------------------------------------------------------------------------------------
// Our worker as a process.

struct FileLog {
    worker: String,
    file: Arc<Mutex<std::fs::File>>,
}

impl FileLog {
    fn write(&self, shard: &str, event: &str, extra: serde_json::Value) {
        let mut line = serde_json::json!({"worker": self.worker, "shard": shard, "event": event});
        if let (Some(map), serde_json::Value::Object(extra)) = (line.as_object_mut(), extra) {
            map.extend(extra);
        }
        let mut file = self.file.lock().unwrap();
        let _ = writeln!(file, "{line}");
        let _ = file.flush();
    }
}

struct LoggingProcessor {
    log: FileLog,
    shard: String,
}

impl RecordProcessor for LoggingProcessor {
    async fn initialize(&mut self, input: InitializationInput) {
        self.shard = input.shard_id;
        let esn = &input.extended_sequence_number;
        self.log.write(
            &self.shard,
            "initialize",
            serde_json::json!({"sequence": esn.sequence_str(), "subsequence": esn.sub_sequence_number()}),
        );
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        for r in &input.records {
            self.log.write(
                &self.shard,
                "record",
                serde_json::json!({
                    "sequence": r.sequence_number.as_str(),
                    "subsequence": r.sub_sequence_number,
                    "partition_key": r.partition_key,
                    "data": base64::engine::general_purpose::STANDARD.encode(&r.data),
                }),
            );
        }
        if !input.records.is_empty() && input.checkpointer.checkpoint().await.is_ok() {
            self.log
                .write(&self.shard, "checkpoint", serde_json::json!({}));
        }
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        let reason = match input.shutdown_reason {
            ShutdownReason::Requested => "shutdown_requested",
            ShutdownReason::Terminate => "shard_ended",
            _ => "lease_lost",
        };
        self.log.write(
            &self.shard,
            "shutdown",
            serde_json::json!({"reason": reason}),
        );
        if input.shutdown_reason != ShutdownReason::Zombie {
            let _ = input.checkpointer.checkpoint().await;
        }
    }
}

/// `rust-worker APP ID KINESIS DYNAMODB LOG`: runs one worker until SIGTERM, then shuts it
/// down gracefully and exits.
fn rust_worker_main(args: &[String]) {
    let [app, id, kinesis, dynamodb, log] = args else {
        panic!("rust-worker APP ID KINESIS DYNAMODB LOG");
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let file = Arc::new(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        ));
        let config = WorkerConfig::builder(app.clone(), app.clone())
            .table_name(app.clone())
            .worker_id(id.clone())
            .initial_position(InitialPosition::TrimHorizon)
            .failover_time(FAILOVER)
            .idle_time_between_reads(Duration::from_millis(200))
            .shard_sync_interval(Duration::from_secs(2))
            .build()
            .unwrap();
        let worker_id = id.clone();
        let factory = move || LoggingProcessor {
            log: FileLog {
                worker: worker_id.clone(),
                file: file.clone(),
            },
            shard: String::new(),
        };
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        let handle = Worker::builder(config, factory)
            .stream_client(Arc::new(AwsStreamClient::new(kinesis_client(kinesis))))
            .lease_store(Arc::new(DynamoLeaseStore::new(
                dynamodb_client(dynamodb),
                app,
            )))
            .build()
            .await
            .unwrap()
            .start()
            .await
            .unwrap();
        term.recv().await;
        let _ = handle.shutdown().await;
    });
}

// ---------------------------------------------------------------------------------------------
// The two sides behind one interface.

enum Side {
    Java(JavaKclWorker),
    Rust {
        child: Child,
        log: PathBuf,
        started: Instant,
        peak_kib: u64,
    },
}

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Java(_) => "java",
            Side::Rust { .. } => "rust",
        }
    }

    fn log(&self) -> PathBuf {
        match self {
            Side::Java(j) => j.record_log_path().to_path_buf(),
            Side::Rust { log, .. } => log.clone(),
        }
    }

    fn started(&self) -> Instant {
        match self {
            Side::Java(j) => j.started_at(),
            Side::Rust { started, .. } => *started,
        }
    }

    fn peak_rss_kib(&mut self) -> u64 {
        match self {
            Side::Java(j) => j.peak_rss_kib(),
            Side::Rust {
                child, peak_kib, ..
            } => {
                *peak_kib = (*peak_kib).max(vm_hwm_kib(child.id()));
                *peak_kib
            }
        }
    }

    fn records(&self) -> Vec<(String, String)> {
        read_record_log(&self.log())
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                kcl_testkit::java_kcl::JavaEvent::Record(r) => {
                    Some((r.shard, String::from_utf8_lossy(&r.data).into_owned()))
                }
                _ => None,
            })
            .collect()
    }

    /// SIGTERM, then the time until the process exited.
    fn terminate(&mut self) -> Duration {
        let _ = self.peak_rss_kib();
        match self {
            Side::Java(j) => j.terminate(Duration::from_secs(60)).unwrap(),
            Side::Rust { child, .. } => {
                let at = Instant::now();
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
                let _ = kill_process(pid, Signal::TERM);
                while child.try_wait().unwrap().is_none() {
                    assert!(at.elapsed() < Duration::from_secs(60), "ours did not exit");
                    std::thread::sleep(Duration::from_millis(10));
                }
                at.elapsed()
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.peak_rss_kib();
        match self {
            Side::Java(j) => j.kill(),
            Side::Rust { child, .. } => {
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap()).unwrap();
                let _ = kill_process_group(pid, Signal::KILL);
                let _ = child.wait();
            }
        }
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        if let Side::Rust { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

struct Bench {
    kinesis: Emulator,
    dynamodb: Emulator,
    dir: PathBuf,
    next: usize,
}

impl Bench {
    fn start_side(&mut self, java: bool, app: &str, id: &str) -> Side {
        if java {
            let options = JavaKclOptions::new(
                app,
                app,
                id,
                self.kinesis.endpoint(),
                self.dynamodb.endpoint(),
            )
            .failover_time(FAILOVER);
            Side::Java(JavaKclWorker::start(&options).unwrap_or_else(|e| panic!("{e}")))
        } else {
            self.next += 1;
            let log = self.dir.join(format!("{id}-{}.jsonl", self.next));
            let started = Instant::now();
            let child = Command::new(std::env::current_exe().unwrap())
                .arg("rust-worker")
                .args([app, id, self.kinesis.endpoint(), self.dynamodb.endpoint()])
                .arg(&log)
                .stdin(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap();
            Side::Rust {
                child,
                log,
                started,
                peak_kib: 0,
            }
        }
    }
}

async fn new_stream(bench: &Bench, name: &str, records: usize) {
    let kinesis = kinesis_client(bench.kinesis.endpoint());
    kinesis
        .create_stream()
        .stream_name(name)
        .shard_count(SHARDS)
        .send()
        .await
        .unwrap();
    loop {
        let s = kinesis
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .unwrap();
        if s.stream_description_summary.map(|d| d.stream_status)
            == Some(aws_sdk_kinesis::types::StreamStatus::Active)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    put(bench, name, "r", records).await;
    // The lease table as the Java KCL 3.1.3 creates it (it cannot add its GSI on dynalite).
    let ddb = dynamodb_client(bench.dynamodb.endpoint());
    let attr = |n: &str| {
        AttributeDefinition::builder()
            .attribute_name(n)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .unwrap()
    };
    let key = |n: &str, k: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(n)
            .key_type(k)
            .build()
            .unwrap()
    };
    ddb.create_table()
        .table_name(name)
        .attribute_definitions(attr("leaseKey"))
        .attribute_definitions(attr("leaseOwner"))
        .key_schema(key("leaseKey", KeyType::Hash))
        .billing_mode(BillingMode::PayPerRequest)
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("LeaseOwnerToLeaseKeyIndex")
                .key_schema(key("leaseOwner", KeyType::Hash))
                .key_schema(key("leaseKey", KeyType::Range))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

async fn put(bench: &Bench, stream: &str, prefix: &str, n: usize) {
    let kinesis = kinesis_client(bench.kinesis.endpoint());
    let entries: Vec<PutRecordsRequestEntry> = (0..n)
        .map(|i| {
            PutRecordsRequestEntry::builder()
                .partition_key(format!("{prefix}-key-{}", i % 23))
                .data(Blob::new(format!("{prefix}-{i:04}")))
                .build()
                .unwrap()
        })
        .collect();
    for chunk in entries.chunks(500) {
        let out = kinesis
            .put_records()
            .stream_name(stream)
            .set_records(Some(chunk.to_vec()))
            .send()
            .await
            .unwrap();
        assert_eq!(out.failed_record_count(), Some(0));
    }
}

/// Seeds one free lease per shard (as a released lease looks).
async fn seed_free_leases(bench: &Bench, name: &str) {
    let streams = AwsStreamClient::new(kinesis_client(bench.kinesis.endpoint()));
    let store = DynamoLeaseStore::new(dynamodb_client(bench.dynamodb.endpoint()), name);
    for shard in streams.list_all_shards(name, None).await.unwrap() {
        let lease = Lease::new(shard.shard_id.clone(), ExtendedSequenceNumber::TRIM_HORIZON)
            .with_hash_key_range(shard.hash_key_range);
        store.create_lease_if_not_exists(&lease).await.unwrap();
    }
}

async fn wait_first_record(side: &mut Side) -> Duration {
    loop {
        let _ = side.peak_rss_kib();
        if !side.records().is_empty() {
            return side.started().elapsed();
        }
        assert!(
            side.started().elapsed() < LIMIT,
            "{}: no record",
            side.name()
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn owners(bench: &Bench, name: &str) -> Vec<Option<String>> {
    DynamoLeaseStore::new(dynamodb_client(bench.dynamodb.endpoint()), name)
        .list_leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.lease_owner)
        .collect()
}

async fn wait_split(bench: &Bench, name: &str, a: &str, b: &str, sides: &mut [&mut Side]) {
    let started = Instant::now();
    loop {
        for s in sides.iter_mut() {
            let _ = s.peak_rss_kib();
        }
        let o = owners(bench, name).await;
        let count = |id: &str| o.iter().filter(|x| x.as_deref() == Some(id)).count();
        if count(a) == 2 && count(b) == 2 {
            return;
        }
        assert!(started.elapsed() < LIMIT, "no 2/2 split: {o:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After `stopped` stopped: new records are put; the time until `survivor` delivered a new
/// record from every shard `stopped_id` held.
async fn wait_resumed(
    bench: &Bench,
    name: &str,
    stopped_id: &str,
    survivor: &mut Side,
    since: Instant,
    shards: &BTreeSet<String>,
    prefix: &str,
) -> Duration {
    put(bench, name, prefix, 80).await;
    loop {
        let _ = survivor.peak_rss_kib();
        let got: BTreeSet<String> = survivor
            .records()
            .into_iter()
            .filter(|(_, p)| p.starts_with(prefix))
            .map(|(s, _)| s)
            .collect();
        if shards.is_subset(&got) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < LIMIT,
            "{} did not resume {stopped_id}'s shards",
            survivor.name()
        );
        tokio::time::sleep(POLL).await;
    }
}

async fn held_by(bench: &Bench, name: &str, id: &str) -> BTreeSet<String> {
    DynamoLeaseStore::new(dynamodb_client(bench.dynamodb.endpoint()), name)
        .list_leases()
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.lease_owner.as_deref() == Some(id))
        .map(|l| l.lease_key)
        .collect()
}

fn figure(what: &str, java: String, rust: String) {
    println!("FIGURE {what:<58} java {java:>10}   ours {rust:>10}");
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

async fn bench_main() {
    let mut bench = Bench {
        kinesis: Emulator::start(EmulatorKind::KinesisLocal).unwrap(),
        dynamodb: Emulator::start(EmulatorKind::Dynalite).unwrap(),
        dir: std::env::temp_dir().join(format!("kcl-java-bench-{}", std::process::id())),
        next: 0,
    };
    std::fs::create_dir_all(&bench.dir).unwrap();

    // Start to first record, on an empty table and with free leases; SIGTERM to exit; RSS.
    let mut start_empty = Vec::new();
    let mut start_free = Vec::new();
    let mut sigterm = Vec::new();
    let mut rss = Vec::new();
    for java in [true, false] {
        let side = if java { "java" } else { "rust" };
        let empty = format!("bench-empty-{side}");
        new_stream(&bench, &empty, 200).await;
        let mut worker = bench.start_side(java, &empty, &format!("{side}-1"));
        start_empty.push(wait_first_record(&mut worker).await);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _ = worker.peak_rss_kib();
        sigterm.push(worker.terminate());
        rss.push(worker.peak_rss_kib());
        drop(worker);

        let free = format!("bench-free-{side}");
        new_stream(&bench, &free, 200).await;
        seed_free_leases(&bench, &free).await;
        let mut worker = bench.start_side(java, &free, &format!("{side}-2"));
        start_free.push(wait_first_record(&mut worker).await);
        let _ = worker.peak_rss_kib();
        worker.kill();
    }
    figure(
        "start to first record, table with free leases",
        secs(start_free[0]),
        secs(start_free[1]),
    );
    figure(
        "start to first record, empty table",
        secs(start_empty[0]),
        secs(start_empty[1]),
    );
    figure(
        "peak RSS (Java: JVM + its Python children)",
        mib(rss[0]),
        mib(rss[1]),
    );
    figure("SIGTERM to exit", secs(sigterm[0]), secs(sigterm[1]));

    // The other side resumes after each side's graceful stop and crash.
    let name = "bench-resume";
    new_stream(&bench, name, 200).await;
    let mut java = bench.start_side(true, name, "j1");
    wait_first_record(&mut java).await;
    let mut rust = bench.start_side(false, name, "r1");
    wait_split(&bench, name, "j1", "r1", &mut [&mut java, &mut rust]).await;
    let mut resumed = Vec::new(); // java graceful, java crash, rust graceful, rust crash
    for (round, graceful) in [(0, true), (1, false)] {
        let shards = held_by(&bench, name, "j1").await;
        let at = Instant::now();
        if graceful {
            java.terminate();
        } else {
            java.kill();
        }
        resumed.push(
            wait_resumed(
                &bench,
                name,
                "j1",
                &mut rust,
                at,
                &shards,
                &format!("jstop{round}"),
            )
            .await,
        );
        java = bench.start_side(true, name, "j1");
        wait_split(&bench, name, "j1", "r1", &mut [&mut java, &mut rust]).await;
    }
    for (round, graceful) in [(0, true), (1, false)] {
        let shards = held_by(&bench, name, "r1").await;
        let at = Instant::now();
        if graceful {
            rust.terminate();
        } else {
            rust.kill();
        }
        resumed.push(
            wait_resumed(
                &bench,
                name,
                "r1",
                &mut java,
                at,
                &shards,
                &format!("rstop{round}"),
            )
            .await,
        );
        rust = bench.start_side(false, name, "r1");
        wait_split(&bench, name, "j1", "r1", &mut [&mut java, &mut rust]).await;
    }
    figure(
        "other side resumes after a graceful stop (SIGTERM) of",
        secs(resumed[0]),
        secs(resumed[2]),
    );
    figure(
        "other side resumes after a crash (SIGKILL) of",
        secs(resumed[1]),
        secs(resumed[3]),
    );
    println!(
        "(failover 3 s on both sides; the Java taker runs every 6.05 s, ours every 1.5 s; a row \
         names the side that was started, stopped or crashed)"
    );
    java.kill();
    rust.kill();
    let _ = std::fs::remove_dir_all(&bench.dir);
    let _ = Path::new(&bench.dir);
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rust-worker") {
        rust_worker_main(args.get(1..).unwrap_or_default());
        return;
    }
    if let Err(e) = kcl_testkit::java_kcl::ensure_loopback_only() {
        eprintln!("{e}");
        std::process::exit(2);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench_main());
}
