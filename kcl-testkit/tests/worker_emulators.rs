//! The worker end to end against real servers: the SDK-backed `AwsStreamClient` on
//! kinesis-local and `DynamoLeaseStore` on dynalite, both started by the test kit's fixture
//! (these tests fail, never skip, when the emulators are not installed), on the real clock.
//!
//! Each test uses its own stream and lease table on emulators shared by the binary, and short
//! timings (failover 3 s) so the file runs in well under a minute. Measured figures are
//! printed (`cargo test -- --nocapture` shows them); `RUST_LOG=kcl_worker=debug` (for example)
//! shows the library's logs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use bytes::Bytes;
use kcl_interfaces::ShutdownReason;
use kcl_kpl::{Aggregator, ExtendedSequenceNumber, Position, Record, partition_key_hash};
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{Lease, LeaseStore, SystemClock};
use kcl_testkit::emulators::{
    KinesisAndDynamoDb, create_stream_and_wait, dynamodb_client, kinesis_client,
    shared_kinesis_and_dynamodb, wait_stream_active,
};
use kcl_testkit::recording::{Behaviour, Event, EventLog, RecordingFactory};
use kcl_worker::aws::AwsStreamClient;
use kcl_worker::stream::{Shard, StreamClient};
use kcl_worker::test_util::wait_until;
use kcl_worker::{InitialPosition, Worker, WorkerConfig, WorkerConfigBuilder, WorkerHandle};

/// The workers' failover time.
const FAILOVER: Duration = Duration::from_secs(3);
/// Allowance for the emulators' latency in the timed assertions.
const EMULATOR_MARGIN: Duration = Duration::from_secs(1);
/// Bound of the waits that are not themselves measured.
const PATIENCE: Duration = Duration::from_secs(30);

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

/// What an aborted worker's processors did from event index `from` on: they must not be
/// shut down nor checkpoint (a crash, not a graceful shutdown).
fn callbacks_since(log: &EventLog, from: usize, worker: &str) -> Vec<Event> {
    log.events()
        .into_iter()
        .skip(from)
        .filter(|e| {
            matches!(e, Event::Shutdown { worker: w, .. } | Event::Checkpointed { worker: w, .. }
                if w == worker)
        })
        .collect()
}

/// One record to put: plain, or a KPL aggregate with its explicit hash key.
struct Entry {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
}

impl Entry {
    fn plain(partition_key: &str, payload: &str) -> Self {
        Self {
            partition_key: partition_key.to_owned(),
            explicit_hash_key: None,
            data: Bytes::from(payload.to_owned()),
        }
    }

    /// One aggregate of `payloads`, all under `partition_key` (the KPL aggregates only
    /// records bound for one shard).
    fn aggregate(partition_key: &str, payloads: &[String]) -> Self {
        let mut aggregator = Aggregator::new();
        for payload in payloads {
            let full = aggregator
                .add(partition_key, None, Bytes::from(payload.clone()))
                .unwrap();
            assert!(full.is_none(), "the aggregate overflowed");
        }
        let aggregate = aggregator.finish().unwrap();
        assert_eq!(aggregate.user_records, payloads.len());
        assert!(aggregate.explicit_hash_key.is_some());
        Self {
            partition_key: aggregate.partition_key,
            explicit_hash_key: aggregate.explicit_hash_key,
            data: aggregate.data,
        }
    }
}

/// A fresh stream and lease table, the SDK clients to drive them, and the log every
/// processor of every worker of the test writes to.
struct Env {
    stream: String,
    table: String,
    kinesis: aws_sdk_kinesis::Client,
    /// The test's own view of the stream and the lease table.
    stream_client: AwsStreamClient,
    store: DynamoLeaseStore,
    log: EventLog,
}

impl Env {
    /// The stream consumers registered on the stream (`ListStreamConsumers`).
    async fn stream_consumers(&self) -> Vec<aws_sdk_kinesis::types::Consumer> {
        let arn = self
            .stream_client
            .describe_stream_summary(&self.stream)
            .await
            .unwrap()
            .stream_arn;
        self.kinesis
            .list_stream_consumers()
            .stream_arn(&arn)
            .send()
            .await
            .unwrap()
            .consumers
            .unwrap_or_default()
    }

    async fn new(name: &str, shards: i32) -> Self {
        init_logging();
        let emulators = tokio::task::block_in_place(emulators);
        let kinesis = kinesis_client(emulators.kinesis.endpoint());
        let started = Instant::now();
        create_stream_and_wait(&kinesis, name, shards, PATIENCE)
            .await
            .unwrap();
        let table = format!("{name}-leases");
        let env = Self {
            stream: name.to_owned(),
            stream_client: AwsStreamClient::new(kinesis.clone()),
            kinesis,
            store: new_store(&table),
            table,
            log: EventLog::new(),
        };
        println!(
            "[{name}] stream of {shards} shards ACTIVE after {:?}",
            started.elapsed()
        );
        env
    }

    /// Waits until the stream is ACTIVE again (after a split or merge).
    async fn wait_active(&self) {
        wait_stream_active(&self.kinesis, &self.stream, PATIENCE)
            .await
            .unwrap();
    }

    async fn worker(&self, id: &str, behaviour: Behaviour) -> WorkerHandle {
        self.worker_with(id, behaviour, |b| b).await
    }

    /// A worker with its own SDK clients (as a separate process would have), the short test
    /// timings, and `tweak` applied to its configuration.
    async fn worker_with(
        &self,
        id: &str,
        behaviour: Behaviour,
        tweak: impl FnOnce(WorkerConfigBuilder) -> WorkerConfigBuilder,
    ) -> WorkerHandle {
        let config = tweak(
            WorkerConfig::builder(&self.stream, &self.stream)
                .table_name(self.table.clone())
                .worker_id(id)
                .initial_position(InitialPosition::TrimHorizon)
                .failover_time(FAILOVER)
                .idle_time_between_reads(Duration::from_millis(150))
                .shard_sync_interval(Duration::from_secs(1))
                .parent_shard_poll_interval(Duration::from_millis(200))
                .task_backoff(Duration::from_millis(100))
                .max_backoff(Duration::from_secs(1)),
        )
        .build()
        .unwrap();
        let kinesis = kinesis_client(emulators().kinesis.endpoint());
        Worker::builder(
            config,
            RecordingFactory::new(id, self.log.clone(), behaviour),
        )
        .stream_client(Arc::new(AwsStreamClient::new(kinesis)))
        .lease_store(Arc::new(new_store(&self.table)))
        .build()
        .await
        .unwrap()
        .start()
        .await
        .unwrap()
    }

    /// PutRecords in batches of at most 500, putting again the entries the server failed.
    async fn put(&self, entries: &[Entry]) {
        for chunk in entries.chunks(500) {
            let mut pending: Vec<&Entry> = chunk.iter().collect();
            let mut attempts = 0;
            while !pending.is_empty() {
                attempts += 1;
                assert!(
                    attempts <= 10,
                    "PutRecords kept failing: {attempts} attempts"
                );
                let records = pending
                    .iter()
                    .map(|e| {
                        PutRecordsRequestEntry::builder()
                            .partition_key(&e.partition_key)
                            .set_explicit_hash_key(e.explicit_hash_key.clone())
                            .data(Blob::new(e.data.to_vec()))
                            .build()
                            .unwrap()
                    })
                    .collect();
                let output = self
                    .kinesis
                    .put_records()
                    .stream_name(&self.stream)
                    .set_records(Some(records))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(output.records().len(), pending.len());
                pending = pending
                    .into_iter()
                    .zip(output.records())
                    .filter(|(_, result)| result.error_code().is_some())
                    .map(|(entry, _)| entry)
                    .collect();
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn put_plain(&self, prefix: &str, n: usize) -> BTreeSet<String> {
        let payloads: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        let entries: Vec<Entry> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry::plain(&format!("{prefix}-key-{}", i % 41), p))
            .collect();
        self.put(&entries).await;
        payloads.into_iter().collect()
    }

    /// Every shard of the stream, by id.
    async fn shards(&self) -> BTreeMap<String, Shard> {
        self.stream_client
            .list_all_shards(&self.stream, None)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.shard_id.clone(), s))
            .collect()
    }

    /// The lease table, by key.
    async fn leases(&self) -> BTreeMap<String, Lease> {
        leases_of(&self.store).await
    }

    /// Waits (at most `limit`) until `cond` holds on the log; returns how long it took.
    async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&EventLog) -> bool,
    ) -> Duration {
        wait_until(&SystemClock, limit, what, || cond(&self.log))
            .await
            .unwrap()
    }

    /// Waits (at most `limit`) until `cond` holds on the lease table; returns the table.
    async fn wait_for_table(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&BTreeMap<String, Lease>) -> bool,
    ) -> BTreeMap<String, Lease> {
        let start = Instant::now();
        loop {
            let leases = self.leases().await;
            if cond(&leases) {
                return leases;
            }
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}; lease table: {leases:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn new_store(table: &str) -> DynamoLeaseStore {
    DynamoLeaseStore::new(dynamodb_client(emulators().dynamodb.endpoint()), table)
        .with_table_wait(Duration::from_millis(50), PATIENCE)
}

async fn leases_of(store: &DynamoLeaseStore) -> BTreeMap<String, Lease> {
    store
        .list_leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect()
}

fn text(record: &Record) -> String {
    String::from_utf8(record.data.to_vec()).unwrap()
}

/// How many times each payload was delivered.
fn delivery_counts(log: &EventLog) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, _, record) in log.deliveries() {
        *counts.entry(text(&record)).or_default() += 1;
    }
    counts
}

/// The distinct payloads delivered.
fn delivered(log: &EventLog) -> BTreeSet<String> {
    delivery_counts(log).into_keys().collect()
}

/// The shards `worker` initialized a processor for at or after event index `from`.
fn initialized_since(log: &EventLog, from: usize, worker: &str) -> BTreeSet<String> {
    log.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e {
            Event::Initialized {
                worker: w, shard, ..
            } if w == worker => Some(shard),
            _ => None,
        })
        .collect()
}

fn held(handle: &WorkerHandle) -> BTreeSet<String> {
    handle
        .held_leases()
        .into_iter()
        .map(|l| l.lease_key)
        .collect()
}

fn owners(leases: &BTreeMap<String, Lease>) -> BTreeMap<String, Option<String>> {
    leases
        .iter()
        .map(|(k, l)| (k.clone(), l.lease_owner.clone()))
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

async fn wait_balanced(env: &Env, w1: &WorkerHandle, w2: &WorkerHandle) -> Duration {
    env.wait_until("2/2 balance", PATIENCE, |_| {
        w1.held_leases().len() == 2 && w2.held_leases().len() == 2
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_four_shards_and_deliver_plain_and_kpl_aggregated_records() {
    let env = Env::new("share-four", 4).await;
    let mut expected = BTreeSet::new();
    let mut entries = Vec::new();
    for i in 0..200 {
        let payload = format!("plain-{i:04}");
        entries.push(Entry::plain(&format!("key-{}", i % 37), &payload));
        expected.insert(payload);
    }
    for c in 0..8 {
        let chunk: Vec<String> = (0..25).map(|i| format!("agg-{c}-{i:02}")).collect();
        entries.push(Entry::aggregate(&format!("agg-key-{c}"), &chunk));
        expected.extend(chunk);
    }
    let put_started = Instant::now();
    env.put(&entries).await;
    println!(
        "[share-four] put 200 plain records and 8 aggregates of 25 in {:?}",
        put_started.elapsed()
    );

    let started = Instant::now();
    let w1 = env.worker("w1", Behaviour::new()).await;
    let w2 = env.worker("w2", Behaviour::new()).await;
    env.wait_until("every record", PATIENCE, |log| {
        delivered(log).len() >= expected.len()
    })
    .await;
    let all_delivered = started.elapsed();
    assert_eq!(
        delivered(&env.log),
        expected,
        "missing or unexpected payloads"
    );
    wait_balanced(&env, &w1, &w2).await;
    println!(
        "[share-four] every record delivered after {all_delivered:?}, 2/2 balance after {:?}",
        started.elapsed()
    );
    let held1 = held(&w1);
    let held2 = held(&w2);
    assert!(held1.is_disjoint(&held2), "{held1:?} / {held2:?}");

    // Every record came from the shard owning its hash key; aggregated sub-records came out
    // with their index as sub-sequence number, sharing the aggregate's sequence number.
    let shards = env.shards().await;
    assert_eq!(shards.len(), 4);
    let mut aggregate_sequence: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (_, shard, record) in env.log.deliveries() {
        let range = shards[&shard].hash_key_range;
        assert!(
            range.contains(partition_key_hash(&record.partition_key)),
            "{record:?} delivered from {shard} ({range})"
        );
        let payload = text(&record);
        if let Some(rest) = payload.strip_prefix("agg-") {
            let (c, i) = rest.split_once('-').unwrap();
            assert!(record.aggregated, "{record:?}");
            assert_eq!(record.sub_sequence_number, i.parse::<u64>().unwrap());
            assert_eq!(record.partition_key, format!("agg-key-{c}"));
            aggregate_sequence
                .entry(c.to_owned())
                .or_default()
                .insert(record.sequence_number.as_str().to_owned());
        } else {
            assert!(!record.aggregated, "{record:?}");
            assert_eq!(record.sub_sequence_number, 0);
        }
    }
    assert_eq!(aggregate_sequence.len(), 8);
    assert!(aggregate_sequence.values().all(|s| s.len() == 1));

    // The table: two leases each, as the workers say, checkpointed at the last record of
    // each shard.
    let last = last_delivered_per_shard(&env.log);
    assert_eq!(last.len(), 4, "a shard got no record");
    let leases = env
        .wait_for_table("checkpoints at the last records", PATIENCE, |leases| {
            leases
                .iter()
                .all(|(k, l)| last.get(k) == Some(&l.checkpoint))
        })
        .await;
    let expected_owners: BTreeMap<String, Option<String>> = held1
        .iter()
        .map(|k| (k.clone(), Some("w1".to_owned())))
        .chain(held2.iter().map(|k| (k.clone(), Some("w2".to_owned()))))
        .collect();
    assert_eq!(owners(&leases), expected_owners);

    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_workers_shards_are_taken_over_within_one_and_a_half_failover_times() {
    let env = Env::new("crash", 4).await;
    let w1 = env.worker("w1", Behaviour::new()).await;
    let w2 = env.worker("w2", Behaviour::new()).await;
    wait_balanced(&env, &w1, &w2).await;
    let mut expected = env.put_plain("before", 100).await;
    env.wait_until("records before the crash", PATIENCE, |log| {
        delivered(log) == expected
    })
    .await;
    // Let the last checkpoints land, then crash w1: no shutdown, no release.
    let last = last_delivered_per_shard(&env.log);
    env.wait_for_table("checkpoints before the crash", PATIENCE, |leases| {
        leases
            .iter()
            .all(|(k, l)| last.get(k) == Some(&l.checkpoint))
    })
    .await;
    let orphans = held(&w1);
    assert_eq!(orphans.len(), 2);
    let crashed = Instant::now();
    w1.abort().await;
    // After the abort: a callback of w1 that finished while it was being aborted (a
    // checkpoint in flight) came before the crash.
    let mark = env.log.events().len();
    let at_crash = env.leases().await;
    for shard in &orphans {
        assert_eq!(at_crash[shard].lease_owner.as_deref(), Some("w1"));
    }
    expected.extend(env.put_plain("after", 100).await);

    let limit = FAILOVER * 3 / 2 + EMULATOR_MARGIN;
    env.wait_until("the takeover", 2 * limit, |log| {
        orphans.is_subset(&initialized_since(log, mark, "w2"))
    })
    .await;
    let takeover = crashed.elapsed();
    println!(
        "[crash] takeover after the crash: {takeover:?} (failover_time {FAILOVER:?}, \
         bound 1.5 x failover + {EMULATOR_MARGIN:?} = {limit:?})"
    );
    assert!(takeover <= limit, "takeover took {takeover:?}");
    // Not before the leases expired: w1 wrote each lease at most failover/2 before the crash.
    assert!(
        takeover >= FAILOVER / 2,
        "taken before expiry: {takeover:?}"
    );

    // w2 resumed every orphan from w1's last checkpoint.
    for event in env.log.events().into_iter().skip(mark) {
        if let Event::Initialized {
            worker,
            shard,
            checkpoint,
            ..
        } = event
        {
            assert_eq!(worker, "w2");
            assert!(orphans.contains(&shard), "{shard} initialized again");
            assert_eq!(checkpoint, at_crash[&shard].checkpoint, "{shard}");
        }
    }
    env.wait_until("every record", PATIENCE, |log| delivered(log) == expected)
        .await;
    assert_eq!(held(&w2).len(), 4);
    let leases = env.leases().await;
    assert!(
        leases.values().all(|l| l.is_owned_by("w2")),
        "{:?}",
        owners(&leases)
    );
    assert_eq!(callbacks_since(&env.log, mark, "w1"), vec![]);
    w2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_and_merge_while_records_flow_children_after_parents_nothing_lost_order_kept() {
    let env = Env::new("reshard", 2).await;
    let initial = env.shards().await;
    assert_eq!(initial.len(), 2);
    let mut by_start: Vec<&Shard> = initial.values().collect();
    by_start.sort_by_key(|s| s.hash_key_range.start());
    let (low, high) = (by_start[0].clone(), by_start[1].clone());
    assert_eq!(low.hash_key_range.end() + 1, high.hash_key_range.start());
    let split_at = low.hash_key_range.start()
        + (low.hash_key_range.end() - low.hash_key_range.start()) / 2
        + 1;
    // Three keys in each final region: low's lower half, low's upper half, high.
    let regions = [
        (low.hash_key_range.start(), split_at - 1),
        (split_at, low.hash_key_range.end()),
        (high.hash_key_range.start(), high.hash_key_range.end()),
    ];
    let mut keys = Vec::new();
    for (start, end) in regions {
        let in_region: Vec<String> = (0..)
            .map(|i| format!("user-{i}"))
            .filter(|k| (start..=end).contains(&partition_key_hash(k)))
            .take(3)
            .collect();
        keys.extend(in_region);
    }

    let w1 = env.worker("w1", Behaviour::new()).await;
    // Watch the lease table (created by w1) while everything happens.
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = tokio::spawn({
        let store = env.store.clone();
        let stop = stop.clone();
        async move {
            let mut snapshots = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                snapshots.push(leases_of(&store).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            snapshots
        }
    });

    let w2 = env.worker("w2", Behaviour::new()).await;
    let started = Instant::now();
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let (mut lower_child, mut upper_child, mut merged) = (None, None, None);
    for round in 0..24 {
        let entries: Vec<Entry> = keys
            .iter()
            .map(|k| Entry::plain(k, &format!("{k}/{round:03}")))
            .collect();
        env.put(&entries).await;
        for e in &entries {
            produced
                .entry(e.partition_key.clone())
                .or_default()
                .push(String::from_utf8(e.data.to_vec()).unwrap());
        }
        if round == 7 {
            let t = Instant::now();
            env.kinesis
                .split_shard()
                .stream_name(&env.stream)
                .shard_to_split(&low.shard_id)
                .new_starting_hash_key(split_at.to_string())
                .send()
                .await
                .unwrap();
            env.wait_active().await;
            let shards = env.shards().await;
            let children: Vec<&Shard> = shards
                .values()
                .filter(|s| s.parent_shard_id.as_deref() == Some(low.shard_id.as_str()))
                .collect();
            assert_eq!(children.len(), 2, "{shards:#?}");
            for child in children {
                if child.hash_key_range.start() == split_at {
                    upper_child = Some(child.shard_id.clone());
                } else {
                    lower_child = Some(child.shard_id.clone());
                }
            }
            println!("[reshard] split {} in {:?}", low.shard_id, t.elapsed());
        }
        if round == 15 {
            // Merge two adjacent open shards: low's upper child and high.
            let t = Instant::now();
            let upper = upper_child.clone().unwrap();
            env.kinesis
                .merge_shards()
                .stream_name(&env.stream)
                .shard_to_merge(&upper)
                .adjacent_shard_to_merge(&high.shard_id)
                .send()
                .await
                .unwrap();
            env.wait_active().await;
            let shards = env.shards().await;
            let child = shards
                .values()
                .find(|s| s.parent_shard_id.as_deref() == Some(upper.as_str()))
                .unwrap();
            assert_eq!(
                child.adjacent_parent_shard_id.as_deref(),
                Some(high.shard_id.as_str())
            );
            assert_eq!(child.hash_key_range.start(), split_at);
            assert_eq!(child.hash_key_range.end(), high.hash_key_range.end());
            merged = Some(child.shard_id.clone());
            println!(
                "[reshard] merged {upper} and {} in {:?}",
                high.shard_id,
                t.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let produced_in = started.elapsed();
    let total: usize = produced.values().map(Vec::len).sum();
    assert_eq!(total, 24 * 9);
    let all: BTreeSet<String> = produced.values().flatten().cloned().collect();
    env.wait_until("every record", PATIENCE, |log| delivered(log) == all)
        .await;
    println!(
        "[reshard] {total} records produced in {produced_in:?}, all delivered after {:?}",
        started.elapsed()
    );
    let (lower_child, upper_child, merged) =
        (lower_child.unwrap(), upper_child.unwrap(), merged.unwrap());
    let parents_of: BTreeMap<String, BTreeSet<String>> = [
        (lower_child.clone(), BTreeSet::from([low.shard_id.clone()])),
        (upper_child.clone(), BTreeSet::from([low.shard_id.clone()])),
        (
            merged.clone(),
            BTreeSet::from([upper_child.clone(), high.shard_id.clone()]),
        ),
    ]
    .into();
    let children_of: BTreeMap<String, BTreeSet<String>> = [
        (
            low.shard_id.clone(),
            BTreeSet::from([lower_child.clone(), upper_child.clone()]),
        ),
        (upper_child.clone(), BTreeSet::from([merged.clone()])),
        (high.shard_id.clone(), BTreeSet::from([merged.clone()])),
    ]
    .into();

    // Per key: the first deliveries in produced order.
    let mut first_seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, _, record) in env.log.deliveries() {
        let payload = text(&record);
        if seen.insert(payload.clone()) {
            first_seen
                .entry(record.partition_key.clone())
                .or_default()
                .push(payload);
        }
    }
    assert_eq!(first_seen, produced);

    // The log: every child initialized only after each parent's Terminate, and each parent
    // checkpointed SHARD_END (successfully) there.
    let events = env.log.events();
    for (child, parents) in &parents_of {
        let init = events
            .iter()
            .position(|e| matches!(e, Event::Initialized { shard, .. } if shard == child))
            .unwrap_or_else(|| panic!("{child} never initialized"));
        for parent in parents {
            let end = events
                .iter()
                .rposition(|e| {
                    matches!(e, Event::Shutdown { shard, reason: ShutdownReason::Terminate, .. }
                        if shard == parent)
                })
                .unwrap_or_else(|| panic!("{parent} never terminated"));
            assert!(
                end < init,
                "{child} initialized (event {init}) before {parent} ended (event {end})"
            );
            let last_delivery = events
                .iter()
                .rposition(|e| matches!(e, Event::Delivered { shard, .. } if shard == parent));
            assert!(
                last_delivery.is_none_or(|d| d < init),
                "{parent} delivered after {child} started"
            );
        }
    }
    for parent in children_of.keys() {
        assert!(
            events.iter().any(|e| matches!(e,
                Event::Checkpointed { shard, error: None, during: Some(ShutdownReason::Terminate), .. }
                    if shard == parent)),
            "{parent} did not checkpoint at its end"
        );
    }

    // The table: the finished parents are cleaned up once their children started, leaving
    // the two open shards, checkpointed at their last records.
    let open: BTreeSet<String> = [lower_child.clone(), merged.clone()].into();
    let last = last_delivered_per_shard(&env.log);
    let final_leases = env
        .wait_for_table("the parents' cleanup", PATIENCE, |leases| {
            leases.keys().cloned().collect::<BTreeSet<_>>() == open
                && leases
                    .iter()
                    .all(|(k, l)| last.get(k) == Some(&l.checkpoint))
        })
        .await;
    for (key, lease) in &final_leases {
        assert_eq!(lease.parent_shard_ids, parents_of[key], "{key}");
        assert!(
            lease.is_owned_by("w1") || lease.is_owned_by("w2"),
            "{lease:?}"
        );
    }
    stop.store(true, Ordering::SeqCst);
    let snapshots = monitor.await.unwrap();
    println!("[reshard] {} lease table snapshots", snapshots.len());
    // In every snapshot: a child that has started has no unfinished parent, children record
    // their parents, and a finished parent records its children.
    let mut parents_seen_finished = BTreeSet::new();
    for leases in &snapshots {
        for (key, lease) in leases {
            if let Some(parents) = parents_of.get(key) {
                assert_eq!(&lease.parent_shard_ids, parents, "{key}");
                if matches!(
                    lease.checkpoint.position(),
                    Position::Sequence(_) | Position::ShardEnd
                ) {
                    for parent in parents {
                        assert!(
                            leases.get(parent).is_none_or(Lease::is_finished),
                            "{key} started while {parent} was unfinished: {leases:#?}"
                        );
                    }
                }
            }
            if lease.is_finished() {
                assert_eq!(Some(&lease.child_shard_ids), children_of.get(key), "{key}");
                parents_seen_finished.insert(key.clone());
            }
        }
    }
    println!("[reshard] parents seen at SHARD_END in the table: {parents_seen_finished:?}");
    assert!(
        !parents_seen_finished.is_empty(),
        "no snapshot caught a finished parent"
    );

    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_releases_the_leases_and_the_other_worker_takes_them_at_its_next_taker_run()
 {
    let env = Env::new("handover", 4).await;
    let w1 = env.worker("w1", Behaviour::new()).await;
    let w2 = env.worker("w2", Behaviour::new()).await;
    wait_balanced(&env, &w1, &w2).await;
    let mut expected = env.put_plain("before", 100).await;
    env.wait_until("records before the shutdown", PATIENCE, |log| {
        delivered(log) == expected
    })
    .await;
    let released = held(&w1);
    let mark = env.log.events().len();
    let stopping = Instant::now();
    w1.shutdown().await.unwrap();
    let shutdown_took = stopping.elapsed();
    let after_shutdown = env.leases().await;
    // Released: no owner on w1's leases any more, unless w2 already took them.
    for shard in &released {
        let owner = after_shutdown[shard].lease_owner.as_deref();
        assert!(owner.is_none() || owner == Some("w2"), "{shard}: {owner:?}");
    }
    // Every w1 processor got Requested and checkpointed.
    let events: Vec<Event> = env.log.events().into_iter().skip(mark).collect();
    let requested: BTreeSet<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Shutdown {
                worker,
                shard,
                reason: ShutdownReason::Requested,
            } if worker == "w1" => Some(shard.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, released);
    let checkpointed = events
        .iter()
        .filter(|e| {
            matches!(e, Event::Checkpointed { worker, error: None, during: Some(ShutdownReason::Requested), .. }
                if worker == "w1")
        })
        .count();
    assert_eq!(checkpointed, 2);

    env.wait_until("the handover", 2 * FAILOVER, |log| {
        released.is_subset(&initialized_since(log, mark, "w2"))
    })
    .await;
    let handover = stopping.elapsed();
    println!(
        "[handover] graceful shutdown took {shutdown_took:?}; w2 initialized the released \
         shards {handover:?} after the shutdown began ({:?} after it returned; failover_time \
         {FAILOVER:?}, taker interval {:?})",
        handover - shutdown_took,
        FAILOVER / 2
    );
    assert!(handover <= FAILOVER, "handover took {handover:?}");
    // w2 resumed from w1's final checkpoints.
    for event in env.log.events().into_iter().skip(mark) {
        if let Event::Initialized {
            worker,
            shard,
            checkpoint,
            ..
        } = event
        {
            assert_eq!(worker, "w2");
            assert_eq!(checkpoint, after_shutdown[&shard].checkpoint, "{shard}");
        }
    }

    expected.extend(env.put_plain("after", 100).await);
    env.wait_until("every record", PATIENCE, |log| delivered(log) == expected)
        .await;
    // Nothing was moved without a checkpoint: every record exactly once.
    let repeated: BTreeMap<String, usize> = delivery_counts(&env.log)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect();
    assert!(
        repeated.is_empty(),
        "delivered more than once: {repeated:?}"
    );
    assert_eq!(held(&w2).len(), 4);
    let leases = env.leases().await;
    assert!(
        leases.values().all(|l| l.is_owned_by("w2")),
        "{:?}",
        owners(&leases)
    );
    w2.shutdown().await.unwrap();
    let leases = env.leases().await;
    assert!(
        leases.values().all(|l| l.lease_owner.is_none()),
        "{:?}",
        owners(&leases)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_from_a_checkpoint_inside_an_aggregate() {
    let env = Env::new("resume-aggregate", 1).await;
    let payloads: Vec<String> = (0..10).map(|i| format!("sub-{i}")).collect();
    env.put(&[Entry::aggregate("k", &payloads)]).await;
    let w1 = env
        .worker("w1", Behaviour::new().checkpoint_every_batch(false))
        .await;
    env.wait_until("the aggregate", PATIENCE, |log| log.delivered_count() >= 10)
        .await;
    let first: Vec<Record> = env
        .log
        .deliveries()
        .into_iter()
        .map(|(_, _, r)| r)
        .collect();
    assert_eq!(first.iter().map(text).collect::<Vec<_>>(), payloads);
    assert!(first.iter().all(|r| r.aggregated));
    assert!(
        first
            .iter()
            .all(|r| r.sequence_number == first[0].sequence_number)
    );
    let fourth = first[3].clone();
    assert_eq!(fourth.sub_sequence_number, 3);

    // A fenced checkpoint at sub-record 3 through the store, with the lease as read (read
    // again should a renewal have moved the counter in between).
    let shard = env.shards().await.into_keys().next().unwrap();
    let target = fourth.extended_sequence_number();
    let mut attempts = 0;
    let written = loop {
        attempts += 1;
        let lease = env.store.get_lease(&shard).await.unwrap().unwrap();
        assert!(lease.is_owned_by("w1"), "{lease:?}");
        match env.store.update_checkpoint(&lease, &target).await {
            Ok(written) => break written,
            Err(e) if e.is_condition_failed() && attempts < 5 => continue,
            Err(e) => panic!("checkpoint failed: {e}"),
        }
    };
    assert_eq!(written.checkpoint, target);
    let mark = env.log.events().len();
    w1.abort().await;
    let before = env.log.delivered_count();
    assert_eq!(before, 10);
    // A crash: the lease stays w1's, with the checkpoint written above.
    let after_crash = env.store.get_lease(&shard).await.unwrap().unwrap();
    assert!(after_crash.is_owned_by("w1"), "{after_crash:?}");
    assert_eq!(after_crash.checkpoint, target);

    let restarted = Instant::now();
    let w2 = env.worker("w2", Behaviour::new()).await;
    env.wait_until("the redelivery", 3 * FAILOVER, |log| {
        log.delivered_count() >= before + 6
    })
    .await;
    println!(
        "[resume-aggregate] w2 redelivered after {:?} (it waits failover_time {FAILOVER:?} \
         for w1's lease to expire)",
        restarted.elapsed()
    );
    // Nothing else arrives.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let redelivered: Vec<(String, Record)> = env
        .log
        .deliveries()
        .into_iter()
        .skip(before)
        .map(|(w, _, r)| (w, r))
        .collect();
    assert!(redelivered.iter().all(|(w, _)| w == "w2"));
    assert_eq!(
        redelivered
            .iter()
            .map(|(_, r)| r.sub_sequence_number)
            .collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8, 9]
    );
    assert_eq!(
        redelivered.iter().map(|(_, r)| text(r)).collect::<Vec<_>>(),
        payloads[4..].to_vec()
    );
    let inits: Vec<(
        String,
        ExtendedSequenceNumber,
        Option<ExtendedSequenceNumber>,
    )> = env
        .log
        .events()
        .into_iter()
        .skip(mark)
        .filter_map(|e| match e {
            Event::Initialized {
                worker,
                checkpoint,
                pending,
                ..
            } => Some((worker, checkpoint, pending)),
            _ => None,
        })
        .collect();
    assert_eq!(inits, vec![("w2".to_owned(), target, None)]);
    assert_eq!(callbacks_since(&env.log, mark, "w1"), vec![]);
    // w2 checkpointed the aggregate's last sub-record.
    let tenth = first[9].extended_sequence_number();
    env.wait_for_table("w2's checkpoint", PATIENCE, |leases| {
        leases[&shard].checkpoint == tenth && leases[&shard].is_owned_by("w2")
    })
    .await;
    w2.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Enhanced fan-out (SubscribeToShard) on kinesis-local

fn fan_out_config(b: WorkerConfigBuilder) -> WorkerConfigBuilder {
    b.retrieval_specific_config(kcl_worker::RetrievalConfig::FanOut(
        kcl_worker::FanOutConfig::new()
            .event_timeout(Duration::from_secs(10))
            .shard_end_probe_interval(Duration::from_millis(500)),
    ))
}

/// Per partition key, the first deliveries in `log`, in order.
fn first_seen_per_key(log: &EventLog) -> BTreeMap<String, Vec<String>> {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, _, r) in log.deliveries() {
        let p = text(&r);
        if seen.insert(p.clone()) {
            got.entry(r.partition_key.clone()).or_default().push(p);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_two_workers_a_crash_a_split_and_a_merge_deliver_everything_in_order() {
    let env = Env::new("fan-out-e2e", 2).await;
    let initial = env.shards().await;
    let mut by_start: Vec<&Shard> = initial.values().collect();
    by_start.sort_by_key(|s| s.hash_key_range.start());
    let (low, high) = (by_start[0].clone(), by_start[1].clone());
    let split_at = low.hash_key_range.start()
        + (low.hash_key_range.end() - low.hash_key_range.start()) / 2
        + 1;
    let regions = [
        (low.hash_key_range.start(), split_at - 1),
        (split_at, low.hash_key_range.end()),
        (high.hash_key_range.start(), high.hash_key_range.end()),
    ];
    let mut keys = Vec::new();
    for (start, end) in regions {
        keys.extend(
            (0..)
                .map(|i| format!("user-{i}"))
                .filter(|k| (start..=end).contains(&partition_key_hash(k)))
                .take(2),
        );
    }
    let started = Instant::now();
    let w1 = env
        .worker_with("w1", Behaviour::new(), fan_out_config)
        .await;
    let w2 = env
        .worker_with("w2", Behaviour::new(), fan_out_config)
        .await;
    println!(
        "[fan-out-e2e] two fan-out workers started (consumer registered) in {:?}",
        started.elapsed()
    );
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut w1 = Some(w1);
    let mut upper_child = None;
    let mut merged = None;
    for round in 0..24 {
        let entries: Vec<Entry> = keys
            .iter()
            .map(|k| Entry::plain(k, &format!("{k}/{round:03}")))
            .collect();
        env.put(&entries).await;
        for e in &entries {
            produced
                .entry(e.partition_key.clone())
                .or_default()
                .push(String::from_utf8(e.data.to_vec()).unwrap());
        }
        if round == 5 {
            // A crash: no shutdown, no release; w2 takes the shards after the failover time.
            w1.take().unwrap().abort().await;
        }
        if round == 10 {
            env.kinesis
                .split_shard()
                .stream_name(&env.stream)
                .shard_to_split(&low.shard_id)
                .new_starting_hash_key(split_at.to_string())
                .send()
                .await
                .unwrap();
            env.wait_active().await;
            let shards = env.shards().await;
            upper_child = shards
                .values()
                .find(|s| {
                    s.parent_shard_id.as_deref() == Some(low.shard_id.as_str())
                        && s.hash_key_range.start() == split_at
                })
                .map(|s| s.shard_id.clone());
        }
        if round == 16 {
            let upper = upper_child.clone().unwrap();
            env.kinesis
                .merge_shards()
                .stream_name(&env.stream)
                .shard_to_merge(&upper)
                .adjacent_shard_to_merge(&high.shard_id)
                .send()
                .await
                .unwrap();
            env.wait_active().await;
            merged = env
                .shards()
                .await
                .values()
                .find(|s| s.parent_shard_id.as_deref() == Some(upper.as_str()))
                .map(|s| s.shard_id.clone());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all: BTreeSet<String> = produced.values().flatten().cloned().collect();
    let took = env
        .wait_until("every record", 2 * PATIENCE, |log| delivered(log) == all)
        .await;
    println!(
        "[fan-out-e2e] {} records, all delivered {took:?} after the last put",
        all.len()
    );
    assert_eq!(first_seen_per_key(&env.log), produced);
    // The parents were finished (SHARD_END, or cleaned up) and every child read.
    let merged = merged.unwrap();
    let leases = env
        .wait_for_table("the parents finished", PATIENCE, |leases| {
            [&low.shard_id, &high.shard_id, upper_child.as_ref().unwrap()]
                .iter()
                .all(|p| leases.get(*p).is_none_or(|l| l.checkpoint.is_shard_end()))
        })
        .await;
    assert!(leases.contains_key(&merged), "{leases:#?}");
    // Children initialised only after every parent's Terminate checkpoint.
    let events = env.log.events();
    let ended = |shard: &str| {
        events.iter().position(|e| {
            matches!(e, Event::Checkpointed { shard: s, error: None,
                during: Some(ShutdownReason::Terminate), .. } if s == shard)
        })
    };
    for (child, parents) in [
        (upper_child.clone().unwrap(), vec![low.shard_id.clone()]),
        (
            merged.clone(),
            vec![upper_child.clone().unwrap(), high.shard_id.clone()],
        ),
    ] {
        let init = events
            .iter()
            .position(|e| matches!(e, Event::Initialized { shard, .. } if *shard == child))
            .unwrap_or_else(|| panic!("{child} initialised"));
        for parent in parents {
            let end = ended(&parent).unwrap_or_else(|| panic!("{parent} ended"));
            assert!(end < init, "{child} started before {parent} ended");
        }
    }
    // Fan-out only: one consumer, registered once, on the stream.
    let consumers = env.stream_consumers().await;
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    assert_eq!(consumers[0].consumer_name(), env.stream);
    w2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_applications_on_one_stream_one_polling_one_fan_out_each_receive_everything() {
    let polling = Env::new("two-apps", 2).await;
    let fan_out = Env {
        stream: polling.stream.clone(),
        table: "two-apps-fan-out-leases".to_owned(),
        kinesis: polling.kinesis.clone(),
        stream_client: polling.stream_client.clone(),
        store: new_store("two-apps-fan-out-leases"),
        log: EventLog::new(),
    };
    let p = polling.worker("p1", Behaviour::new()).await;
    let f = fan_out
        .worker_with("f1", Behaviour::new(), |b| {
            fan_out_config(b).worker_id("f1")
        })
        .await;
    let mut expected = polling.put_plain("both", 150).await;
    expected.extend(polling.put_plain("more", 50).await);
    let took_polling = polling
        .wait_until("polling app: every record", PATIENCE, |log| {
            delivered(log) == expected
        })
        .await;
    let took_fan_out = fan_out
        .wait_until("fan-out app: every record", PATIENCE, |log| {
            delivered(log) == expected
        })
        .await;
    println!(
        "[two-apps] {} records each: polling app after {took_polling:?}, fan-out app after {took_fan_out:?}",
        expected.len()
    );
    // The fan-out application registered its stream consumer (and the polling one none).
    let consumers = polling.stream_consumers().await;
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    assert_eq!(
        consumers[0].consumer_status(),
        &aws_sdk_kinesis::types::ConsumerStatus::Active,
        "{consumers:?}"
    );
    // Each application keeps its own leases and checkpoints.
    assert!(
        polling
            .leases()
            .await
            .values()
            .all(|l| l.lease_owner.as_deref() == Some("p1"))
    );
    assert!(
        fan_out
            .leases()
            .await
            .values()
            .all(|l| l.lease_owner.as_deref() == Some("f1"))
    );
    p.shutdown().await.unwrap();
    f.shutdown().await.unwrap();
}
