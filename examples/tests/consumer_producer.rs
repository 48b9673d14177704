//! End to end against the local emulators: the real `producer` binary creates a 2-shard stream
//! on kinesis-local and puts 50 plain and 50 KPL-aggregated records; the real `consumer`
//! binary (lease table on dynalite) prints all of them, stops gracefully on SIGTERM, and leaves
//! its leases released with their checkpoints at the last record it delivered. And the
//! consumer exits 0 after SIGTERM within a bound while its DynamoDB path hangs (a dead NAT,
//! through a `FaultProxy`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use kcl_kpl::{HashKeyRange, partition_key_hash};
use kcl_testkit::emulators::{Emulator, EmulatorKind, REGION, dynamodb_client, kinesis_client};
use kcl_testkit::fault_proxy::{FaultMode, FaultProxy};
use serde_json::Value;

const RECORDS_PER_KIND: u64 = 50;
const KEYS: u64 = 10;
const RECORDS_PER_AGGREGATE: u64 = 3;
/// How long the consumer may take to print every record.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the consumer may take to stop after SIGTERM.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Kills (and reaps) the consumer if the test ends before it exited.
struct ChildGuard {
    child: Child,
    exited: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running consumer: its stdout lines arrive on `lines`, its stderr collects in `log`.
struct RunningConsumer {
    guard: ChildGuard,
    lines: Option<mpsc::Receiver<String>>,
    log: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// Starts the consumer binary with `args` (and [`aws_env`]).
fn spawn_consumer(args: &[&str]) -> RunningConsumer {
    let mut child = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_consumer")))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let stdout_reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let log = Arc::new(Mutex::new(String::new()));
    let log_writer = Arc::clone(&log);
    let stderr_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            log_writer
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    RunningConsumer {
        guard: ChildGuard {
            child,
            exited: false,
        },
        lines: Some(lines),
        log,
        readers: vec![stdout_reader, stderr_reader],
    }
}

impl RunningConsumer {
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits (at most `limit`) for the exit; returns the status and how
    /// long the exit took. The output readers are joined.
    fn terminate(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let pid = self.guard.child.id().to_string();
        let signalled = Instant::now();
        let kill = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(kill.success(), "kill -TERM {pid}: {kill}");
        let status = loop {
            if let Some(status) = self.guard.child.try_wait().unwrap() {
                self.guard.exited = true;
                break status;
            }
            assert!(
                signalled.elapsed() < limit,
                "the consumer did not exit within {limit:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let stopped_in = signalled.elapsed();
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        (status, stopped_in)
    }
}

/// The environment of both binaries: dummy credentials, nothing read from the user's AWS
/// configuration, no instance metadata, no endpoint other than the ones on the command line.
fn aws_env(command: &mut Command) -> &mut Command {
    let nowhere = std::env::temp_dir().join("kcl-consumer-producer-test-no-aws-config");
    command
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", &nowhere)
        .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere)
        .env("RUST_LOG", "info")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_REGION")
        .env_remove("AWS_DEFAULT_REGION")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_KINESIS")
        .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
}

fn run_producer(kinesis: &str, stream: &str, extra: &[&str]) -> Output {
    let output = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_producer")))
        .args([
            "--stream",
            stream,
            "--region",
            REGION,
            "--kinesis-endpoint",
            kinesis,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "producer {extra:?} failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// What one payload must look like when the consumer prints it.
struct Expected {
    partition_key: String,
    /// Sub-sequence number inside its aggregate (0 for plain records).
    sub_sequence_number: u64,
    /// For aggregated records: (partition key index, aggregate number within that key).
    aggregate: Option<(u64, u64)>,
}

/// `plain-000042` or `agg-000042` -> what the producer was asked to do with it.
fn expected(payload: &str) -> Option<Expected> {
    let (aggregated, number) = if let Some(n) = payload.strip_prefix("plain-") {
        (false, n)
    } else {
        (true, payload.strip_prefix("agg-")?)
    };
    if number.len() != 6 {
        return None;
    }
    let index: u64 = number.parse().ok()?;
    if index >= RECORDS_PER_KIND {
        return None;
    }
    let key = index % KEYS;
    // Record i is the (i / KEYS)-th record of its key; aggregates hold 3 records of one key.
    let ordinal = index / KEYS;
    Some(Expected {
        partition_key: format!("key-{key}"),
        sub_sequence_number: if aggregated {
            ordinal % RECORDS_PER_AGGREGATE
        } else {
            0
        },
        aggregate: aggregated.then_some((key, ordinal / RECORDS_PER_AGGREGATE)),
    })
}

/// One printed record, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivered {
    shard_id: String,
    sequence_number: String,
    sub_sequence_number: u64,
    partition_key: String,
    payload: String,
}

/// Orders sequence numbers as unsigned decimal integers, then by sub-sequence number.
fn esn_key(d: &Delivered) -> (usize, String, u64) {
    (
        d.sequence_number.len(),
        d.sequence_number.clone(),
        d.sub_sequence_number,
    )
}

fn is_sequence_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn parse_line(line: &str, shards: &HashMap<String, HashKeyRange>) -> Delivered {
    let v: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    let object = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {line}"));
    let fields: BTreeSet<&str> = object.keys().map(String::as_str).collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "shard_id",
            "sequence_number",
            "sub_sequence_number",
            "partition_key",
            "data_b64"
        ]),
        "{line}"
    );
    let text = |name: &str| {
        v[name]
            .as_str()
            .unwrap_or_else(|| panic!("{name} is not a string: {line}"))
            .to_owned()
    };
    let data = base64::engine::general_purpose::STANDARD
        .decode(text("data_b64"))
        .unwrap_or_else(|e| panic!("data_b64 is not base64 ({e}): {line}"));
    let delivered = Delivered {
        shard_id: text("shard_id"),
        sequence_number: text("sequence_number"),
        sub_sequence_number: v["sub_sequence_number"]
            .as_u64()
            .unwrap_or_else(|| panic!("sub_sequence_number is not a u64: {line}")),
        partition_key: text("partition_key"),
        payload: String::from_utf8(data).unwrap(),
    };
    let range = shards
        .get(&delivered.shard_id)
        .unwrap_or_else(|| panic!("unknown shard: {line}"));
    assert!(
        is_sequence_number(&delivered.sequence_number),
        "sequence number: {line}"
    );
    let want = expected(&delivered.payload)
        .unwrap_or_else(|| panic!("a payload the producer did not put: {line}"));
    assert_eq!(delivered.partition_key, want.partition_key, "{line}");
    assert_eq!(
        delivered.sub_sequence_number, want.sub_sequence_number,
        "{line}"
    );
    // Plain records are routed by Kinesis, aggregates by their explicit hash key: both must
    // land on the shard owning the user record's partition key.
    assert!(
        range.contains(partition_key_hash(&delivered.partition_key)),
        "record on a shard not owning its key: {line}"
    );
    delivered
}

#[test]
fn producer_and_consumer_against_the_emulators() {
    let started = Instant::now();
    let kinesis = Emulator::start(EmulatorKind::KinesisLocal).unwrap_or_else(|e| panic!("{e}"));
    let dynalite = Emulator::start(EmulatorKind::Dynalite).unwrap_or_else(|e| panic!("{e}"));
    let stream = "consumer-producer-stream";
    let application = "consumer-producer-app";

    let plain = run_producer(
        kinesis.endpoint(),
        stream,
        &[
            "--create-stream",
            "--shards",
            "2",
            "--count",
            "50",
            "--payload-prefix",
            "plain-",
        ],
    );
    let plain_log = String::from_utf8_lossy(&plain.stderr);
    assert!(
        plain_log.contains("put 50 user records in 50 Kinesis records"),
        "{plain_log}"
    );
    let aggregated = run_producer(
        kinesis.endpoint(),
        stream,
        &[
            "--count",
            "50",
            "--aggregate",
            "--records-per-aggregate",
            "3",
            "--payload-prefix",
            "agg-",
        ],
    );
    // 10 keys with 5 records each: aggregates of 3 + 2 per key.
    let aggregated_log = String::from_utf8_lossy(&aggregated.stderr);
    assert!(
        aggregated_log.contains("put 50 user records in 20 Kinesis records"),
        "{aggregated_log}"
    );

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let listed = runtime
        .block_on(
            kinesis_client(kinesis.endpoint())
                .list_shards()
                .stream_name(stream)
                .send(),
        )
        .unwrap();
    let shards: HashMap<String, HashKeyRange> = listed
        .shards()
        .iter()
        .map(|s| {
            let range = s.hash_key_range().unwrap();
            (
                s.shard_id().to_owned(),
                HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).unwrap(),
            )
        })
        .collect();
    assert_eq!(shards.len(), 2, "{listed:?}");

    let mut consumer = spawn_consumer(&[
        "--stream",
        stream,
        "--application",
        application,
        "--region",
        REGION,
        "--kinesis-endpoint",
        kinesis.endpoint(),
        "--dynamodb-endpoint",
        dynalite.endpoint(),
        "--initial-position",
        "trim-horizon",
        "--failover-time-ms",
        "3000",
    ]);
    let lines = consumer.lines.take().unwrap();
    let log = Arc::clone(&consumer.log);
    let consumer_log = || log.lock().unwrap().clone();

    // payload -> the record as printed (a repeat must be the same record).
    let mut delivered: BTreeMap<String, Delivered> = BTreeMap::new();
    let mut printed = 0usize;
    let mut accept = |line: &str, delivered: &mut BTreeMap<String, Delivered>| {
        let d = parse_line(line, &shards);
        printed += 1;
        if let Some(before) = delivered.get(&d.payload) {
            assert_eq!(before, &d, "the same payload delivered as two records");
        } else {
            delivered.insert(d.payload.clone(), d);
        }
    };
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while delivered.len() < 2 * RECORDS_PER_KIND as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => accept(&line, &mut delivered),
            Err(RecvTimeoutError::Timeout) => panic!(
                "after {DELIVERY_TIMEOUT:?} only {} of 100 payloads arrived; consumer log:\n{}",
                delivered.len(),
                consumer_log()
            ),
            Err(RecvTimeoutError::Disconnected) => panic!(
                "the consumer closed its stdout after {} payloads ({:?}); its log:\n{}",
                delivered.len(),
                consumer.guard.child.try_wait(),
                consumer_log()
            ),
        }
    }
    let all_delivered_in = started.elapsed();

    // Graceful stop.
    let (status, stopped_in) = consumer.terminate(SHUTDOWN_TIMEOUT);
    assert!(
        status.success(),
        "consumer exit status {status}; its log:\n{}",
        consumer_log()
    );
    // Lines printed after the last new payload (during shutdown) must be valid too.
    for line in lines.try_iter() {
        accept(&line, &mut delivered);
    }
    assert_eq!(delivered.len(), 100);

    // Records of one aggregate share their sequence number; all others differ.
    let mut by_sequence: HashMap<&str, BTreeSet<Option<(u64, u64)>>> = HashMap::new();
    let mut plain_sequences = BTreeSet::new();
    for d in delivered.values() {
        let want = expected(&d.payload).unwrap();
        match want.aggregate {
            Some(_) => {
                by_sequence
                    .entry(&d.sequence_number)
                    .or_default()
                    .insert(want.aggregate);
            }
            None => assert!(plain_sequences.insert(d.sequence_number.clone())),
        }
    }
    assert_eq!(by_sequence.len(), 20, "{by_sequence:?}");
    assert!(by_sequence.values().all(|aggregates| aggregates.len() == 1));
    assert!(by_sequence.keys().all(|s| !plain_sequences.contains(*s)));

    // The last record delivered on each shard: where its checkpoint must be.
    let mut last: HashMap<&str, &Delivered> = HashMap::new();
    for d in delivered.values() {
        let slot = last.entry(&d.shard_id).or_insert(d);
        if esn_key(d) > esn_key(slot) {
            *slot = d;
        }
    }
    assert_eq!(last.len(), 2, "both shards should have received records");

    let scan = runtime
        .block_on(
            dynamodb_client(dynalite.endpoint())
                .scan()
                .table_name(application)
                .consistent_read(true)
                .send(),
        )
        .unwrap();
    let items = scan.items();
    assert_eq!(items.len(), 2, "{items:?}");
    for item in items {
        let key = item["leaseKey"].as_s().unwrap();
        assert!(
            !item.contains_key("leaseOwner"),
            "lease {key} still has an owner: {item:?}"
        );
        let checkpoint = item["checkpoint"].as_s().unwrap();
        assert!(
            is_sequence_number(checkpoint),
            "lease {key}: checkpoint {checkpoint:?} is not a sequence number"
        );
        let sub: u64 = item["checkpointSubSequenceNumber"]
            .as_n()
            .unwrap()
            .parse()
            .unwrap();
        let want = last
            .get(key.as_str())
            .unwrap_or_else(|| panic!("lease {key} for an unknown shard"));
        assert_eq!(
            (checkpoint.as_str(), sub),
            (want.sequence_number.as_str(), want.sub_sequence_number),
            "lease {key}: checkpoint is not the last delivered record"
        );
    }

    eprintln!(
        "{printed} lines for 100 payloads; all delivered {all_delivered_in:?} after the test \
         started; consumer stopped {stopped_in:?} after SIGTERM; total {:?}",
        started.elapsed()
    );
}

/// The consumer's call timeouts in the network-fault test, in milliseconds.
const FAULT_CALL_TIMEOUT_MS: u64 = 2000;
const FAULT_CALL_ATTEMPT_TIMEOUT_MS: u64 = 1000;
/// The worker's default `shutdown_grace` (the consumer has no option for it).
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A dead NAT between the consumer and DynamoDB (the lease table behind a `FaultProxy` in
/// `Hang`: requests in flight and new connections get no answer): SIGTERM still ends the
/// consumer with exit status 0, within `shutdown_grace` + `call_timeout` + a margin, and it
/// logs that its shutdown was not clean.
#[test]
fn consumer_exits_0_after_sigterm_while_its_dynamodb_path_hangs() {
    let kinesis = Emulator::start(EmulatorKind::KinesisLocal).unwrap_or_else(|e| panic!("{e}"));
    let dynalite = Emulator::start(EmulatorKind::Dynalite).unwrap_or_else(|e| panic!("{e}"));
    // The proxy's tasks run on this runtime's own thread while the test blocks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = runtime
        .block_on(FaultProxy::start(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            dynalite.port(),
        ))))
        .unwrap();
    let stream = "consumer-dynamodb-hang-stream";
    let application = "consumer-dynamodb-hang-app";
    run_producer(
        kinesis.endpoint(),
        stream,
        &[
            "--create-stream",
            "--shards",
            "2",
            "--count",
            "20",
            "--payload-prefix",
            "plain-",
        ],
    );
    let listed = runtime
        .block_on(
            kinesis_client(kinesis.endpoint())
                .list_shards()
                .stream_name(stream)
                .send(),
        )
        .unwrap();
    let shards: HashMap<String, HashKeyRange> = listed
        .shards()
        .iter()
        .map(|s| {
            let range = s.hash_key_range().unwrap();
            (
                s.shard_id().to_owned(),
                HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key()).unwrap(),
            )
        })
        .collect();
    let call_timeout = FAULT_CALL_TIMEOUT_MS.to_string();
    let call_attempt_timeout = FAULT_CALL_ATTEMPT_TIMEOUT_MS.to_string();
    let dynamodb_endpoint = proxy.endpoint_url();
    let mut consumer = spawn_consumer(&[
        "--stream",
        stream,
        "--application",
        application,
        "--region",
        REGION,
        "--kinesis-endpoint",
        kinesis.endpoint(),
        "--dynamodb-endpoint",
        &dynamodb_endpoint,
        "--initial-position",
        "trim-horizon",
        "--failover-time-ms",
        "3000",
        "--call-timeout",
        &call_timeout,
        "--call-attempt-timeout",
        &call_attempt_timeout,
    ]);
    let lines = consumer.lines.take().unwrap();
    let mut payloads = BTreeSet::new();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while payloads.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                payloads.insert(parse_line(&line, &shards).payload);
            }
            Err(e) => panic!(
                "{e:?} after {} of 20 payloads; consumer log:\n{}",
                payloads.len(),
                consumer.log()
            ),
        }
    }

    runtime.block_on(proxy.set_mode(FaultMode::Hang));
    // Let the consumer's lease table calls run into the hang.
    std::thread::sleep(Duration::from_millis(500));
    let bound = DEFAULT_SHUTDOWN_GRACE
        + Duration::from_millis(FAULT_CALL_TIMEOUT_MS)
        + Duration::from_secs(2);
    let (status, stopped_in) = consumer.terminate(bound);
    let log = consumer.log();
    assert!(
        status.success(),
        "consumer exit status {status}; its log:\n{log}"
    );
    assert!(
        log.contains("shutdown was not clean"),
        "the consumer did not report its unreleased leases; its log:\n{log}"
    );
    let stats = proxy.stats();
    assert!(stats.black_holed > 0, "{stats:?}");
    eprintln!(
        "consumer exited 0 {stopped_in:?} after SIGTERM with its DynamoDB path hung (bound \
         {bound:?}); proxy: {stats:?}"
    );
    runtime.block_on(proxy.shutdown());
}

/// `--retrieval fan-out --consumer-name NAME`: the consumer registers that stream consumer
/// and prints every record read through SubscribeToShard; `--consumer-name` alone (polling) is
/// refused.
#[test]
fn the_consumer_reads_by_enhanced_fan_out_with_a_named_consumer() {
    let kinesis = Emulator::start(EmulatorKind::KinesisLocal).unwrap_or_else(|e| panic!("{e}"));
    let dynalite = Emulator::start(EmulatorKind::Dynalite).unwrap_or_else(|e| panic!("{e}"));
    // Not "consumer" in the stream name: kinesis-local misreads such consumer ARNs.
    let stream = "example-fan-out-stream";
    let produced = run_producer(
        kinesis.endpoint(),
        stream,
        &[
            "--create-stream",
            "--shards",
            "1",
            "--count",
            "20",
            "--payload-prefix",
            "fo-",
        ],
    );
    assert!(produced.status.success(), "{produced:?}");
    let common = [
        "--stream",
        stream,
        "--application",
        "example-fan-out-app",
        "--region",
        REGION,
        "--kinesis-endpoint",
        kinesis.endpoint(),
        "--dynamodb-endpoint",
        dynalite.endpoint(),
        "--initial-position",
        "trim-horizon",
    ];
    // A consumer name without fan-out is a usage error, not ignored.
    let refused = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_consumer")))
        .args(common)
        .args(["--consumer-name", "named"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("--consumer-name needs --retrieval fan-out"),
        "{refused:?}"
    );
    let mut args = common.to_vec();
    args.extend([
        "--retrieval",
        "fan-out",
        "--consumer-name",
        "named-consumer",
    ]);
    let mut consumer = spawn_consumer(&args);
    let lines = consumer.lines.take().unwrap();
    let mut payloads = BTreeSet::new();
    let deadline = Instant::now() + DELIVERY_TIMEOUT;
    while payloads.len() < 20 {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
                let data = base64::engine::general_purpose::STANDARD
                    .decode(v["data_b64"].as_str().unwrap_or_default())
                    .unwrap_or_else(|e| panic!("data_b64 is not base64 ({e}): {line}"));
                payloads.insert(String::from_utf8(data).unwrap());
            }
            Err(e) => panic!(
                "after {DELIVERY_TIMEOUT:?} {} of 20 payloads ({e:?}); consumer log:\n{}",
                payloads.len(),
                consumer.log()
            ),
        }
    }
    assert!(
        payloads.iter().all(|p| p.starts_with("fo-")),
        "{payloads:?}"
    );
    let (status, _) = consumer.terminate(SHUTDOWN_TIMEOUT);
    assert!(status.success(), "{}", consumer.log());
    // The named consumer is registered on the stream, and stays.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = kinesis_client(kinesis.endpoint());
    let consumers = runtime.block_on(async {
        let arn = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .unwrap()
            .stream_description_summary
            .unwrap()
            .stream_arn;
        client
            .list_stream_consumers()
            .stream_arn(arn)
            .send()
            .await
            .unwrap()
    });
    let names: Vec<&str> = consumers
        .consumers()
        .iter()
        .map(|c| c.consumer_name())
        .collect();
    assert_eq!(names, ["named-consumer"]);
}
