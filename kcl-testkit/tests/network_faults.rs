//! Network faults between the worker and the real emulators: the worker's SDK clients (built
//! by `AwsOptions` with the worker's call timeouts, as the `consumer` binary builds them)
//! reach kinesis-local and dynalite each through its own `FaultProxy`, on the real clock,
//! while the test puts records and reads the lease table directly (never through a proxy).
//!
//! The faults are those of a dead NAT (`Hang`: requests in flight and new connections get no
//! answer), a crashed load balancer (`Reset`) and a closed port (`Refuse`). Each test asserts
//! the behaviour the library promises: no stall, nothing lost, skipped or reordered per key,
//! leases kept or given up as the lease rules say, and a bounded shutdown.
//!
//! Short timings (failover 3 s, attempt timeout 1 s, call timeout 2 s, hangs of 5 s) keep the
//! file well under a minute; each test has its own stream, lease table and proxies, so they
//! run in parallel. The times from a path's return to the first record delivered are printed
//! (`cargo test -p kcl-testkit --test network_faults -- --nocapture` shows them) as
//! `kinesis_path_return_to_first_record_ms=N` and `dynamodb_path_return_to_first_record_ms=N`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kcl_interfaces::ShutdownReason;
use kcl_kpl::{ExtendedSequenceNumber, partition_key_hash};
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{Lease, LeaseStore, SystemClock};
use kcl_testkit::emulators::{
    Emulator, KinesisAndDynamoDb, create_lease_table_and_wait, create_stream_and_wait,
    dynamodb_client, kinesis_client, sdk_config, shared_kinesis_and_dynamodb,
};
use kcl_testkit::fault_proxy::{FaultMode, FaultProxy};
use kcl_testkit::recording::{Behaviour, Event, EventLog, RecordingFactory};
use kcl_worker::aws::{AwsOptions, AwsStreamClient};
use kcl_worker::stream::StreamClient;
use kcl_worker::test_util::wait_until;
use kcl_worker::{InitialPosition, Worker, WorkerConfig, WorkerHandle};

/// The workers' failover time.
const FAILOVER: Duration = Duration::from_secs(3);
/// Bound on one attempt of a call.
const CALL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a whole call, retries included.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest back-off between retried reads.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long graceful shutdown waits for processors.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a path hangs.
const HANG: Duration = Duration::from_secs(5);
/// How long a brief fault (reset, refuse) lasts.
const BRIEF_FAULT: Duration = Duration::from_secs(1);
/// Allowance for the emulators' latency and the schedulers in the timed assertions: these
/// bound behaviour (no stall), not performance, so the margin is generous.
const MARGIN: Duration = Duration::from_secs(2);
/// Bound of the waits that are not themselves measured.
const PATIENCE: Duration = Duration::from_secs(30);
/// How often the producer puts one record per key.
const PUT_EVERY: Duration = Duration::from_millis(100);
/// Keys per shard the producer writes to.
const KEYS_PER_SHARD: usize = 3;
/// How often the measured waits look.
const POLL: Duration = Duration::from_millis(5);

// ---------------------------------------------------------------------------------------------
// Fixture

/// kinesis-local and dynalite for the whole binary (see `shared_kinesis_and_dynamodb`).
fn emulators() -> &'static KinesisAndDynamoDb {
    shared_kinesis_and_dynamodb().unwrap_or_else(|err| {
        panic!("kinesis-local and dynalite are required for these tests: {err}")
    })
}

/// Logs to the test's output when `RUST_LOG` is set.
fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A fresh 2-shard stream and lease table, one fault proxy in front of each emulator, and
/// the log every processor of the test writes to.
struct Env {
    name: String,
    stream: String,
    table: String,
    /// The test's own Kinesis client, straight to kinesis-local.
    kinesis: aws_sdk_kinesis::Client,
    /// The test's own view of the lease table, straight to dynalite.
    store: DynamoLeaseStore,
    /// Between the worker and kinesis-local.
    kinesis_proxy: FaultProxy,
    /// Between the worker and dynalite.
    dynamodb_proxy: FaultProxy,
    /// Keys the producer writes to, `KEYS_PER_SHARD` on each shard.
    keys: Vec<String>,
    shard_ids: BTreeSet<String>,
    log: EventLog,
}

impl Env {
    async fn new(name: &str) -> Self {
        init_logging();
        let emulators = tokio::task::block_in_place(emulators);
        let kinesis = kinesis_client(emulators.kinesis.endpoint());
        create_stream_and_wait(&kinesis, name, 2, PATIENCE)
            .await
            .unwrap();
        let table = format!("{name}-leases");
        create_lease_table_and_wait(
            &dynamodb_client(emulators.dynamodb.endpoint()),
            &table,
            PATIENCE,
        )
        .await
        .unwrap();
        let shards = AwsStreamClient::new(kinesis.clone())
            .list_all_shards(name, None)
            .await
            .unwrap();
        assert_eq!(shards.len(), 2, "{shards:?}");
        let mut keys = Vec::new();
        for shard in &shards {
            keys.extend(
                (0..)
                    .map(|i| format!("{name}-key-{i}"))
                    .filter(|k| shard.hash_key_range.contains(partition_key_hash(k)))
                    .take(KEYS_PER_SHARD),
            );
        }
        let proxy = |emulator: &Emulator| {
            FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, emulator.port())))
        };
        Self {
            name: name.to_owned(),
            stream: name.to_owned(),
            store: DynamoLeaseStore::new(dynamodb_client(emulators.dynamodb.endpoint()), &table)
                .with_table_wait(Duration::from_millis(50), PATIENCE),
            table,
            kinesis,
            kinesis_proxy: proxy(&emulators.kinesis).await.unwrap(),
            dynamodb_proxy: proxy(&emulators.dynamodb).await.unwrap(),
            keys,
            shard_ids: shards.into_iter().map(|s| s.shard_id).collect(),
            log: EventLog::new(),
        }
    }

    /// A worker whose SDK clients go through the proxies, built by `AwsOptions` with the
    /// worker's call timeouts, with the short test timings.
    async fn worker(&self, id: &str) -> WorkerHandle {
        let config = WorkerConfig::builder(&self.stream, &self.stream)
            .table_name(self.table.clone())
            .worker_id(id)
            .initial_position(InitialPosition::TrimHorizon)
            .failover_time(FAILOVER)
            .call_attempt_timeout(CALL_ATTEMPT_TIMEOUT)
            .call_timeout(CALL_TIMEOUT)
            .idle_time_between_reads(Duration::from_millis(150))
            .shard_sync_interval(Duration::from_secs(1))
            .parent_shard_poll_interval(Duration::from_millis(200))
            .task_backoff(Duration::from_millis(100))
            .max_backoff(MAX_BACKOFF)
            .shutdown_grace(SHUTDOWN_GRACE)
            .build()
            .unwrap();
        let options = AwsOptions::new()
            .with_sdk_config(sdk_config(&self.kinesis_proxy.endpoint_url()))
            .with_kinesis_endpoint(self.kinesis_proxy.endpoint_url())
            .with_dynamodb_endpoint(self.dynamodb_proxy.endpoint_url());
        Worker::builder(
            config,
            RecordingFactory::new(id, self.log.clone(), Behaviour::new()),
        )
        .aws(options)
        .build()
        .await
        .unwrap()
        .start()
        .await
        .unwrap()
    }

    /// Starts putting one record per key every `PUT_EVERY`, straight to kinesis-local.
    fn producer(&self) -> Producer {
        Producer::start(self.kinesis.clone(), self.stream.clone(), self.keys.clone())
    }

    /// The lease table, by key, read straight from dynalite.
    async fn leases(&self) -> BTreeMap<String, Lease> {
        self.store
            .list_leases()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect()
    }

    async fn checkpoints(&self) -> BTreeMap<String, ExtendedSequenceNumber> {
        self.leases()
            .await
            .into_iter()
            .map(|(k, l)| (k, l.checkpoint))
            .collect()
    }

    async fn wait_until(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) {
        wait_until(
            &SystemClock,
            limit,
            &format!("[{}] {what}", self.name),
            cond,
        )
        .await
        .unwrap();
    }

    /// Waits until `worker` holds both leases and every shard delivered a record.
    async fn wait_running(&self, worker: &WorkerHandle) {
        self.wait_until("both leases held, both shards delivering", PATIENCE, || {
            worker.held_leases().len() == 2
                && shards_delivered_since(&self.log, 0) == self.shard_ids
        })
        .await;
    }

    /// Waits until the table's checkpoints are at the last records delivered per shard.
    /// The producer keeps writing, so the last deliveries are read again each round: the
    /// wait ends at a moment when the table and the processors agree.
    async fn wait_checkpointed(&self) {
        let start = Instant::now();
        loop {
            let last = last_delivered_per_shard(&self.log);
            let checkpoints = self.checkpoints().await;
            if checkpoints == last {
                return;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "[{}] checkpoints {checkpoints:?}, last delivered {last:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Puts one record per key per round, `PUT_EVERY` apart, each round only after the previous
/// one was fully accepted, so each key's records are in the stream in produced order.
struct Producer {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<BTreeMap<String, Vec<String>>>,
}

impl Producer {
    fn start(kinesis: aws_sdk_kinesis::Client, stream: String, keys: Vec<String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
                let mut round = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let mut pending: Vec<(String, String)> = keys
                        .iter()
                        .map(|k| (k.clone(), format!("{k}/{round:05}")))
                        .collect();
                    let mut attempts = 0;
                    while !pending.is_empty() {
                        attempts += 1;
                        assert!(attempts <= 10, "PutRecords kept failing");
                        let records = pending
                            .iter()
                            .map(|(k, p)| {
                                PutRecordsRequestEntry::builder()
                                    .partition_key(k)
                                    .data(Blob::new(p.as_bytes()))
                                    .build()
                                    .unwrap()
                            })
                            .collect();
                        let output = kinesis
                            .put_records()
                            .stream_name(&stream)
                            .set_records(Some(records))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(output.records().len(), pending.len());
                        let mut failed = Vec::new();
                        for (entry, result) in pending.into_iter().zip(output.records()) {
                            if result.error_code().is_some() {
                                failed.push(entry);
                            } else {
                                produced.entry(entry.0).or_default().push(entry.1);
                            }
                        }
                        pending = failed;
                    }
                    round += 1;
                    tokio::time::sleep(PUT_EVERY).await;
                }
                produced
            }
        });
        Self { stop, task }
    }

    /// Stops after the round in progress; returns every key's payloads in produced order.
    async fn stop(self) -> BTreeMap<String, Vec<String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

fn text(data: &[u8]) -> String {
    String::from_utf8(data.to_vec()).unwrap()
}

/// Per key, the payloads in the order of their first delivery.
fn first_seen_per_key(log: &EventLog) -> BTreeMap<String, Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut per_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, _, record) in log.deliveries() {
        let payload = text(&record.data);
        if seen.insert(payload.clone()) {
            per_key
                .entry(record.partition_key.clone())
                .or_default()
                .push(payload);
        }
    }
    per_key
}

/// The shards that delivered a record at or after delivery number `from`.
fn shards_delivered_since(log: &EventLog, from: usize) -> BTreeSet<String> {
    log.deliveries()
        .into_iter()
        .skip(from)
        .map(|(_, shard, _)| shard)
        .collect()
}

/// The largest extended sequence number delivered per shard.
fn last_delivered_per_shard(log: &EventLog) -> BTreeMap<String, ExtendedSequenceNumber> {
    let mut last: BTreeMap<String, ExtendedSequenceNumber> = BTreeMap::new();
    for (_, shard, record) in log.deliveries() {
        let esn = record.extended_sequence_number();
        let entry = last.entry(shard).or_insert_with(|| esn.clone());
        if esn > *entry {
            *entry = esn;
        }
    }
    last
}

/// Every shard's deliveries strictly ascend: nothing repeated, nothing out of order.
fn assert_each_shard_ascends(name: &str, log: &EventLog) {
    let mut last: BTreeMap<String, ExtendedSequenceNumber> = BTreeMap::new();
    for (_, shard, record) in log.deliveries() {
        let esn = record.extended_sequence_number();
        if let Some(before) = last.get(&shard) {
            assert!(
                esn > *before,
                "[{name}] {shard}: {esn:?} delivered after {before:?} (repeated or reordered)"
            );
        }
        last.insert(shard, esn);
    }
}

/// Every produced record was delivered, and each key's records first arrived in produced
/// order: nothing lost, skipped or reordered per key.
fn assert_all_in_order(name: &str, log: &EventLog, produced: &BTreeMap<String, Vec<String>>) {
    let first_seen = first_seen_per_key(log);
    for (key, payloads) in produced {
        assert_eq!(
            first_seen.get(key),
            Some(payloads),
            "[{name}] key {key}: first deliveries differ from what was produced"
        );
    }
    assert_eq!(
        first_seen.keys().collect::<BTreeSet<_>>(),
        produced.keys().collect::<BTreeSet<_>>(),
        "[{name}] keys"
    );
}

/// Waits until every produced payload was delivered.
async fn wait_all_delivered(env: &Env, produced: &BTreeMap<String, Vec<String>>) {
    let total: usize = produced.values().map(Vec::len).sum();
    env.wait_until("every record", PATIENCE, || {
        first_seen_per_key(&env.log)
            .values()
            .map(Vec::len)
            .sum::<usize>()
            >= total
    })
    .await;
}

/// How long until a record is delivered after delivery number `from` (polled every `POLL`).
async fn first_delivery_after(env: &Env, from: usize, since: Instant) -> Duration {
    loop {
        if env.log.delivered_count() > from {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < PATIENCE,
            "[{}] no record delivered within {PATIENCE:?} of the path's return",
            env.name
        );
        tokio::time::sleep(POLL).await;
    }
}

fn held(handle: &WorkerHandle) -> BTreeSet<String> {
    handle
        .held_leases()
        .into_iter()
        .map(|l| l.lease_key)
        .collect()
}

fn zombies_since(log: &EventLog, from: usize) -> BTreeSet<String> {
    log.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e {
            Event::Shutdown {
                shard,
                reason: ShutdownReason::Zombie,
                ..
            } => Some(shard),
            _ => None,
        })
        .collect()
}

fn shutdowns(log: &EventLog) -> Vec<(String, ShutdownReason)> {
    log.events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Shutdown { shard, reason, .. } => Some((shard, reason)),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The Kinesis path

/// The Kinesis path hangs for `HANG` while records are put: the shards' health shows the
/// failures, the leases stay (DynamoDB is fine), and once the path is back every shard
/// resumes within call_timeout + max_backoff, with nothing lost, repeated or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_path_hangs_then_every_shard_resumes_nothing_lost_leases_kept() {
    let env = Env::new("nf-kinesis-hang").await;
    let producer = env.producer();
    let w1 = env.worker("w1").await;
    env.wait_running(&w1).await;

    env.kinesis_proxy.set_mode(FaultMode::Hang).await;
    let hung = Instant::now();
    // shard -> (most consecutive failures seen, an error was shown)
    let mut seen: BTreeMap<String, (u32, bool)> = BTreeMap::new();
    while hung.elapsed() < HANG {
        for health in w1.shard_health() {
            let entry = seen.entry(health.shard_id.clone()).or_default();
            entry.0 = entry.0.max(health.consecutive_failures);
            entry.1 |= health.last_error.is_some();
        }
        assert_eq!(held(&w1), env.shard_ids, "a lease was lost during the hang");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        env.kinesis_proxy.stats().black_holed > 0,
        "{:?}",
        env.kinesis_proxy
    );
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        env.shard_ids,
        "{seen:?}"
    );
    for (shard, (failures, error)) in &seen {
        assert!(
            *failures > 0 && *error,
            "{shard}: the hang did not show in its health: {seen:?}"
        );
    }
    let leases = env.leases().await;
    assert!(
        leases.values().all(|l| l.is_owned_by("w1")),
        "the worker is alive, its leases must stay: {leases:#?}"
    );

    let before = env.log.delivered_count();
    env.kinesis_proxy.set_mode(FaultMode::Pass).await;
    let back = Instant::now();
    let first = first_delivery_after(&env, before, back).await;
    println!(
        "kinesis_path_return_to_first_record_ms={}",
        first.as_millis()
    );
    let bound = CALL_TIMEOUT + MAX_BACKOFF + MARGIN;
    assert!(
        first <= bound,
        "the first record after the path's return took {first:?} (bound {bound:?})"
    );
    env.wait_until("every shard resumed", PATIENCE, || {
        shards_delivered_since(&env.log, before) == env.shard_ids
    })
    .await;
    let resumed = back.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let produced = env.producer_stop(producer).await;
    wait_all_delivered(&env, &produced).await;
    println!(
        "[{}] hang {HANG:?}: first record {first:?} after the return, every shard after \
         {resumed:?}; most failures in a row per shard {seen:?}",
        env.name
    );
    assert_all_in_order(&env.name, &env.log, &produced);
    assert_each_shard_ascends(&env.name, &env.log);
    for health in w1.shard_health() {
        assert_eq!(health.consecutive_failures, 0, "{health:?}");
    }
    assert_eq!(held(&w1), env.shard_ids);
    assert_eq!(shutdowns(&env.log), vec![], "no processor may have stopped");
    let report = w1.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}

impl Env {
    async fn producer_stop(&self, producer: Producer) -> BTreeMap<String, Vec<String>> {
        let produced = producer.stop().await;
        let total: usize = produced.values().map(Vec::len).sum();
        assert!(total > 0, "[{}] nothing produced", self.name);
        produced
    }
}

/// A brief fault on the Kinesis path (`mode` for `BRIEF_FAULT`, then `Pass`): every shard
/// resumes, nothing lost, repeated or reordered, the leases stay.
async fn brief_kinesis_fault(name: &str, mode: FaultMode) {
    let env = Env::new(name).await;
    let producer = env.producer();
    let w1 = env.worker("w1").await;
    env.wait_running(&w1).await;
    let resets = env.kinesis_proxy.stats().reset;
    env.kinesis_proxy.set_mode(mode).await;
    tokio::time::sleep(BRIEF_FAULT).await;
    assert!(
        env.kinesis_proxy.stats().reset > resets,
        "the fault hit no connection: {:?}",
        env.kinesis_proxy
    );
    let before = env.log.delivered_count();
    env.kinesis_proxy.set_mode(FaultMode::Pass).await;
    let back = Instant::now();
    let first = first_delivery_after(&env, before, back).await;
    let bound = CALL_TIMEOUT + MAX_BACKOFF + MARGIN;
    assert!(
        first <= bound,
        "the first record after the path's return took {first:?} (bound {bound:?})"
    );
    env.wait_until("every shard resumed", PATIENCE, || {
        shards_delivered_since(&env.log, before) == env.shard_ids
    })
    .await;
    let resumed = back.elapsed();
    let produced = env.producer_stop(producer).await;
    wait_all_delivered(&env, &produced).await;
    println!(
        "[{name}] {mode:?} for {BRIEF_FAULT:?}: first record {first:?} after the return, \
         every shard after {resumed:?}"
    );
    assert_all_in_order(name, &env.log, &produced);
    assert_each_shard_ascends(name, &env.log);
    assert_eq!(held(&w1), env.shard_ids);
    let leases = env.leases().await;
    assert!(leases.values().all(|l| l.is_owned_by("w1")), "{leases:#?}");
    assert_eq!(shutdowns(&env.log), vec![], "no processor may have stopped");
    let report = w1.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_path_reset_for_a_moment_every_shard_resumes_nothing_lost() {
    brief_kinesis_fault("nf-kinesis-reset", FaultMode::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kinesis_path_refused_for_a_moment_every_shard_resumes_nothing_lost() {
    brief_kinesis_fault("nf-kinesis-refuse", FaultMode::Refuse).await;
}

// ---------------------------------------------------------------------------------------------
// The DynamoDB path

/// The DynamoDB path hangs longer than failover_time: the worker gives its leases up (its
/// processors get `Zombie`, and none of their checkpoints lands), and once the path is back
/// it takes its leases again, resumes from the table's checkpoints and delivers every record
/// put meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_path_hangs_past_failover_leases_given_up_then_retaken_nothing_lost() {
    let env = Env::new("nf-dynamodb-hang").await;
    let producer = env.producer();
    let w1 = env.worker("w1").await;
    env.wait_running(&w1).await;
    env.wait_checkpointed().await;

    let mark = env.log.events().len();
    env.dynamodb_proxy.set_mode(FaultMode::Hang).await;
    let hung = Instant::now();
    // A write the proxy forwarded just before the hang may still land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let frozen = env.checkpoints().await;
    // When the worker stopped holding the leases, and when both processors were shut down
    // as zombies (after the `process_records` in progress, whose checkpoint call may be
    // hung for up to call_timeout, returned).
    let (mut dropped, mut zombies) = (None, None);
    while hung.elapsed() < HANG || dropped.is_none() || zombies.is_none() {
        let checkpoints = env.checkpoints().await;
        assert_eq!(
            checkpoints,
            frozen,
            "a checkpoint landed while the DynamoDB path hung ({:?} into the hang)",
            hung.elapsed()
        );
        if dropped.is_none() && held(&w1).is_empty() {
            dropped = Some(hung.elapsed());
        }
        if zombies.is_none() && zombies_since(&env.log, mark) == env.shard_ids {
            zombies = Some(hung.elapsed());
        }
        assert!(
            hung.elapsed() < FAILOVER + CALL_TIMEOUT + MARGIN,
            "{:?} into the hang the worker still held {:?}; zombies so far: {:?}",
            hung.elapsed(),
            held(&w1),
            zombies_since(&env.log, mark)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (dropped, zombies) = (dropped.unwrap(), zombies.unwrap());
    // Dropped before another worker could take the leases: failover_time after the last
    // renewal, which was before the hang (an allowance for the checks' own latency).
    let limit = FAILOVER + Duration::from_millis(500);
    assert!(
        dropped <= limit,
        "leases dropped only {dropped:?} into the hang (limit {limit:?})"
    );
    let limit = FAILOVER + CALL_TIMEOUT + Duration::from_millis(500);
    assert!(
        zombies <= limit,
        "processors shut down as zombies only {zombies:?} into the hang (limit {limit:?})"
    );
    // The zombies' checkpoints were refused.
    for event in env.log.events().into_iter().skip(mark) {
        if let Event::Checkpointed {
            shard,
            error,
            during: Some(ShutdownReason::Zombie),
            ..
        } = &event
        {
            assert!(error.is_some(), "{shard}: a zombie checkpointed: {event:?}");
        }
    }
    let after_hang = env.log.events().len();

    let before = env.log.delivered_count();
    env.dynamodb_proxy.set_mode(FaultMode::Pass).await;
    let back = Instant::now();
    let first = first_delivery_after(&env, before, back).await;
    println!(
        "dynamodb_path_return_to_first_record_ms={}",
        first.as_millis()
    );
    // The next taker run (failover_time / 2, with jitter) after the call in flight ends.
    let bound = CALL_TIMEOUT + FAILOVER + MARGIN;
    assert!(
        first <= bound,
        "the first record after the path's return took {first:?} (bound {bound:?})"
    );
    env.wait_until("both leases taken again", PATIENCE, || {
        held(&w1) == env.shard_ids && shards_delivered_since(&env.log, before) == env.shard_ids
    })
    .await;
    let produced = env.producer_stop(producer).await;
    wait_all_delivered(&env, &produced).await;
    println!(
        "[{}] leases dropped {dropped:?} and processors zombies {zombies:?} into the hang; \
         first record {first:?} after the return",
        env.name
    );
    assert_all_in_order(&env.name, &env.log, &produced);
    // The new processors resumed from the checkpoints frozen in the table.
    let inits: BTreeMap<String, ExtendedSequenceNumber> = env
        .log
        .events()
        .into_iter()
        .skip(after_hang)
        .filter_map(|e| match e {
            Event::Initialized {
                shard, checkpoint, ..
            } => Some((shard, checkpoint)),
            _ => None,
        })
        .collect();
    assert_eq!(inits, frozen);
    let leases = env.leases().await;
    assert!(leases.values().all(|l| l.is_owned_by("w1")), "{leases:#?}");
    let report = w1.shutdown().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// Shutdown while the DynamoDB path hangs returns within shutdown_grace + call_timeout and
/// names the leases it could not release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_dynamodb_path_hangs_is_bounded_and_names_the_unreleased_leases() {
    let env = Env::new("nf-shutdown-dynamodb-hang").await;
    let producer = env.producer();
    let w1 = env.worker("w1").await;
    env.wait_running(&w1).await;
    env.dynamodb_proxy.set_mode(FaultMode::Hang).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(held(&w1), env.shard_ids);
    let started = Instant::now();
    let report = w1.shutdown().await.unwrap();
    let took = started.elapsed();
    let bound = SHUTDOWN_GRACE + CALL_TIMEOUT + Duration::from_secs(1);
    println!(
        "[{}] shutdown took {took:?} (bound {bound:?}): {report:?}",
        env.name
    );
    assert!(took <= bound, "shutdown took {took:?}");
    let not_released: BTreeSet<String> = report
        .leases_not_released
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(not_released, env.shard_ids, "{report:?}");
    assert!(report.leases_released.is_empty(), "{report:?}");
    assert!(!report.is_clean());
    let requested: BTreeSet<String> = shutdowns(&env.log)
        .into_iter()
        .filter(|(_, r)| *r == ShutdownReason::Requested)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(requested, env.shard_ids);
    producer.stop().await;
    // Nothing was released: the table still names w1.
    let leases = env.leases().await;
    assert!(leases.values().all(|l| l.is_owned_by("w1")), "{leases:#?}");
}

/// Shutdown while the Kinesis path hangs returns within shutdown_grace + call_timeout, and
/// releases the leases (DynamoDB is fine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_the_kinesis_path_hangs_is_bounded_and_releases_the_leases() {
    let env = Env::new("nf-shutdown-kinesis-hang").await;
    let producer = env.producer();
    let w1 = env.worker("w1").await;
    env.wait_running(&w1).await;
    env.kinesis_proxy.set_mode(FaultMode::Hang).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let report = w1.shutdown().await.unwrap();
    let took = started.elapsed();
    let bound = SHUTDOWN_GRACE + CALL_TIMEOUT + Duration::from_secs(1);
    println!(
        "[{}] shutdown took {took:?} (bound {bound:?}): {report:?}",
        env.name
    );
    assert!(took <= bound, "shutdown took {took:?}");
    assert_eq!(
        report
            .leases_released
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        env.shard_ids,
        "{report:?}"
    );
    assert!(report.leases_not_released.is_empty(), "{report:?}");
    producer.stop().await;
    let leases = env.leases().await;
    assert!(
        leases.values().all(|l| l.lease_owner.is_none()),
        "{leases:#?}"
    );
}
