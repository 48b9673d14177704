//! Our workers alone in the KCL 3.x protocol, end to end on real servers: the SDK-backed
//! `AwsStreamClient` on kinesis-local and `DynamoLeaseStore` (with its 3.x state tables) on
//! dynalite, both started by the test kit's fixture (these tests fail, never skip, when the
//! emulators are not installed), on the real clock, failover 3 s.
//!
//! * three workers in `CLIENT_VERSION_CONFIG_3X` on 6 shards: every record delivered once,
//!   one leader, the leases spread, the `Leader` item and the `WorkerMetricStats` rows in
//!   the Java KCL's shape; the leader crashes (a new leader within 2 × failover, its
//!   leases re-assigned, nothing lost); the next leader stops gracefully (its leases picked
//!   up, no record twice);
//! * figures (printed, bounded only generously): start to first record on fresh leases in
//!   3.x (and 2.x for comparison), and leader failover over several crashes;
//! * a fleet in `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X` follows a migration tool's write
//!   of `Migration3.0` from `CLIENT_VERSION_UPGRADE_FROM_2X` to
//!   `CLIENT_VERSION_3X_WITH_ROLLBACK` and runs 3.x. Its change monitor reads the item every
//!   60 s, first after 60-90 s (as the Java KCL): that test takes up to about 100 s.
//!
//! `cargo test -p kcl-testkit --test v3_emulators -- --nocapture` shows the figures;
//! `RUST_LOG=kcl_lease=debug` (for example) the library's logs.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::PutRecordsRequestEntry;
use kcl_kpl::{ExtendedSequenceNumber, Record};
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::v3::migration::{self, ClientVersion};
use kcl_lease::{Lease, LeaseStore, SystemClock};
use kcl_testkit::emulators::{
    KinesisAndDynamoDb, create_stream_and_wait, dynamodb_client, kinesis_client,
    shared_kinesis_and_dynamodb,
};
use kcl_testkit::recording::{Behaviour, Event, EventLog, RecordingFactory};
use kcl_worker::aws::AwsStreamClient;
use kcl_worker::test_util::wait_until;
use kcl_worker::{ClientVersionConfig, InitialPosition, Worker, WorkerConfig, WorkerHandle};

/// The workers' failover time.
const FAILOVER: Duration = Duration::from_secs(3);
/// Allowance for the emulators' latency in the timed assertions.
const EMULATOR_MARGIN: Duration = Duration::from_secs(1);
/// Bound of the waits that are not themselves measured.
const PATIENCE: Duration = Duration::from_secs(30);
/// How long a 2.x-compatible worker may take to see a change of `Migration3.0`: its first
/// read comes 60-90 s after its start, then one every 60 s.
const CHANGE_MONITOR_PATIENCE: Duration = Duration::from_secs(100);

// ---------------------------------------------------------------------------------------------
// Fixture

fn emulators() -> &'static KinesisAndDynamoDb {
    shared_kinesis_and_dynamodb().unwrap_or_else(|err| {
        panic!("kinesis-local and dynalite are required for these tests: {err}")
    })
}

fn init_logging() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// A fresh stream and lease table (with its state tables), the clients to look at them,
/// and the log every processor of every worker of the test writes to.
struct Env {
    name: String,
    stream: String,
    table: String,
    kinesis: aws_sdk_kinesis::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    store: DynamoLeaseStore,
    log: EventLog,
}

impl Env {
    async fn new(name: &str, shards: i32) -> Self {
        init_logging();
        let emulators = tokio::task::block_in_place(emulators);
        let kinesis = kinesis_client(emulators.kinesis.endpoint());
        create_stream_and_wait(&kinesis, name, shards, PATIENCE)
            .await
            .unwrap();
        let table = format!("{name}-leases");
        Self {
            name: name.to_owned(),
            stream: name.to_owned(),
            kinesis,
            dynamodb: dynamodb_client(emulators.dynamodb.endpoint()),
            store: new_store(&table),
            table,
            log: EventLog::new(),
        }
    }

    /// A worker with its own SDK clients (as a separate process would have) and the short
    /// test timings, in `version`.
    async fn worker(&self, id: &str, version: ClientVersionConfig) -> WorkerHandle {
        let config = WorkerConfig::builder(&self.stream, &self.stream)
            .table_name(self.table.clone())
            .worker_id(id)
            .initial_position(InitialPosition::TrimHorizon)
            .failover_time(FAILOVER)
            .client_version_config(version)
            .idle_time_between_reads(Duration::from_millis(150))
            .shard_sync_interval(Duration::from_secs(1))
            .parent_shard_poll_interval(Duration::from_millis(200))
            .task_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(1))
            .build()
            .unwrap();
        let kinesis = kinesis_client(emulators().kinesis.endpoint());
        Worker::builder(
            config,
            RecordingFactory::new(id, self.log.clone(), Behaviour::new()),
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

    /// Three workers started at once (as a fleet deployed together).
    async fn three(
        &self,
        ids: [&str; 3],
        version: ClientVersionConfig,
    ) -> (WorkerHandle, WorkerHandle, WorkerHandle) {
        tokio::join!(
            self.worker(ids[0], version),
            self.worker(ids[1], version),
            self.worker(ids[2], version)
        )
    }

    /// `n` plain records `{prefix}-{i}` under 41 partition keys, PutRecords in batches,
    /// failed entries put again.
    async fn put_plain(&self, prefix: &str, n: usize) -> BTreeSet<String> {
        let payloads: Vec<String> = (0..n).map(|i| format!("{prefix}-{i:04}")).collect();
        for chunk in payloads.chunks(500) {
            let mut pending: Vec<(String, &String)> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| (format!("{prefix}-key-{}", i % 41), p))
                .collect();
            let mut attempts = 0;
            while !pending.is_empty() {
                attempts += 1;
                assert!(attempts <= 10, "PutRecords kept failing");
                let records = pending
                    .iter()
                    .map(|(key, payload)| {
                        PutRecordsRequestEntry::builder()
                            .partition_key(key)
                            .data(Blob::new(payload.as_bytes().to_vec()))
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
                pending = pending
                    .into_iter()
                    .zip(output.records())
                    .filter(|(_, r)| r.error_code().is_some())
                    .map(|(entry, _)| entry)
                    .collect();
                if !pending.is_empty() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        payloads.into_iter().collect()
    }

    async fn leases(&self) -> BTreeMap<String, Lease> {
        self.store
            .list_leases()
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect()
    }

    /// Waits (at most `limit`) until `cond` holds; returns how long it took.
    async fn wait(&self, what: &str, limit: Duration, cond: impl FnMut() -> bool) -> Duration {
        wait_until(
            &SystemClock,
            limit,
            &format!("[{}] {what}", self.name),
            cond,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; deliveries: {}", self.log.delivered_count()))
    }

    /// Waits (at most `limit`) until every lease's checkpoint is at the last record
    /// delivered from its shard.
    async fn wait_checkpoints(&self, limit: Duration) {
        let last = last_delivered_per_shard(&self.log);
        let start = Instant::now();
        loop {
            let leases = self.leases().await;
            if leases
                .iter()
                .all(|(k, l)| last.get(k).is_none_or(|esn| *esn == l.checkpoint))
            {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "[{}] checkpoints not at the last delivered records: {leases:#?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One item of `<table>-CoordinatorState`, raw.
    async fn coordinator_item(&self, key: &str) -> Option<HashMap<String, AttributeValue>> {
        self.dynamodb
            .get_item()
            .table_name(format!("{}-CoordinatorState", self.table))
            .key("key", AttributeValue::S(key.to_owned()))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
    }

    /// Every row of `<table>-WorkerMetricStats`, raw.
    async fn metric_rows(&self) -> Vec<HashMap<String, AttributeValue>> {
        self.dynamodb
            .scan()
            .table_name(format!("{}-WorkerMetricStats", self.table))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .items
            .unwrap_or_default()
    }
}

fn new_store(table: &str) -> DynamoLeaseStore {
    DynamoLeaseStore::new(dynamodb_client(emulators().dynamodb.endpoint()), table)
        .with_table_wait(Duration::from_millis(50), PATIENCE)
}

fn text(record: &Record) -> String {
    String::from_utf8(record.data.to_vec()).unwrap()
}

fn delivery_counts(log: &EventLog) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (_, _, record) in log.deliveries() {
        *counts.entry(text(&record)).or_default() += 1;
    }
    counts
}

fn delivered(log: &EventLog) -> BTreeSet<String> {
    delivery_counts(log).into_keys().collect()
}

/// Payloads delivered more than once.
fn repeats(log: &EventLog) -> BTreeMap<String, usize> {
    delivery_counts(log)
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .collect()
}

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

/// Shards from which a record was delivered.
fn shards_delivering(log: &EventLog) -> BTreeSet<String> {
    log.deliveries().into_iter().map(|(_, s, _)| s).collect()
}

fn held(handle: &WorkerHandle) -> BTreeSet<String> {
    handle
        .held_leases()
        .into_iter()
        .map(|l| l.lease_key)
        .collect()
}

fn held_by_all(handles: &[&WorkerHandle]) -> BTreeSet<String> {
    handles.iter().flat_map(|h| held(h)).collect()
}

/// The ids of the handles that count themselves leader now.
fn leaders(handles: &[&WorkerHandle]) -> Vec<String> {
    handles
        .iter()
        .filter(|h| h.is_leader())
        .map(|h| h.worker_id().to_owned())
        .collect()
}

/// What an aborted worker's processors did from event index `from` on.
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

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn attr_names(item: &HashMap<String, AttributeValue>) -> BTreeSet<&str> {
    item.keys().map(String::as_str).collect()
}

fn s<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .unwrap_or_else(|| panic!("{name} is not an S: {item:?}"))
}

fn n(item: &HashMap<String, AttributeValue>, name: &str) -> i64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .unwrap_or_else(|| panic!("{name} is not an N: {item:?}"))
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not an integer ({e}): {item:?}"))
}

fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `Leader` item as the DynamoDB Lock Client writes it, held by `owner` with our
/// lease duration (the failover time, in milliseconds, as a string).
fn assert_leader_item(item: &HashMap<String, AttributeValue>, owner: &str) {
    assert_eq!(
        attr_names(item),
        BTreeSet::from(["key", "ownerName", "leaseDuration", "recordVersionNumber"]),
        "{item:?}"
    );
    assert_eq!(s(item, "key"), "Leader");
    assert_eq!(s(item, "ownerName"), owner, "{item:?}");
    assert_eq!(
        s(item, "leaseDuration"),
        FAILOVER.as_millis().to_string(),
        "{item:?}"
    );
    assert!(is_uuid(s(item, "recordVersionNumber")), "{item:?}");
}

/// A WorkerMetricStats row as the Java KCL writes it (`wid` S, `lut` N epoch seconds,
/// `sts` M of L of N, `opr` M of L of N), plus our `ri` (N, milliseconds).
fn assert_row_shape(row: &HashMap<String, AttributeValue>, now: i64) {
    assert_eq!(
        attr_names(row),
        BTreeSet::from(["wid", "lut", "sts", "opr", "ri"]),
        "{row:?}"
    );
    s(row, "wid");
    let lut = n(row, "lut");
    assert!(
        (now - lut).abs() <= 10,
        "lut {lut} is not about now ({now})"
    );
    assert_eq!(n(row, "ri"), (FAILOVER / 2).as_millis() as i64, "{row:?}");
    let sts = row["sts"].as_m().unwrap();
    let opr = row["opr"].as_m().unwrap();
    for (metric, values) in sts {
        let values = values.as_l().unwrap();
        assert!(!values.is_empty() && values.len() <= 10, "{row:?}");
        for v in values {
            let v: f64 = v.as_n().unwrap().parse().unwrap();
            assert!(v == -1.0 || (0.0..=100.0).contains(&v), "{row:?}");
        }
        let range = opr
            .get(metric)
            .unwrap_or_else(|| panic!("{metric} in sts but not in opr: {row:?}"))
            .as_l()
            .unwrap();
        assert_eq!(range.len(), 1, "{row:?}");
        assert_eq!(range[0].as_n().unwrap(), "100", "{row:?}");
    }
    assert_eq!(
        sts.keys().collect::<BTreeSet<_>>(),
        opr.keys().collect::<BTreeSet<_>>(),
        "{row:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// The shards `worker` initialized a processor for at or after event index `from`, with
/// the checkpoint each resumed from.
fn initialized_since(
    log: &EventLog,
    from: usize,
    worker: &str,
) -> BTreeMap<String, ExtendedSequenceNumber> {
    log.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e {
            Event::Initialized {
                worker: w,
                shard,
                checkpoint,
                ..
            } if w == worker => Some((shard, checkpoint)),
            _ => None,
        })
        .collect()
}

/// (assignment runs, leases assigned, handoffs, leases adopted) of a worker's 3.x runtime.
fn protocol_stats(w: &WorkerHandle) -> (u64, u64, u64, u64) {
    let st = w.protocol().unwrap().stats();
    (
        st.assignment_runs.load(Ordering::Relaxed),
        st.assigned.load(Ordering::Relaxed),
        st.handoffs.load(Ordering::Relaxed),
        st.adopted.load(Ordering::Relaxed),
    )
}

/// Crashes the leader among `fleet` (which must have one) and measures, from the crash:
/// a new leader, and the crashed leader's leases held by the others. Returns the crashed
/// worker's id, the leases it held, and the two durations.
async fn crash_the_leader(
    env: &Env,
    fleet: &mut Vec<WorkerHandle>,
) -> (String, BTreeSet<String>, Duration, Duration) {
    let index = fleet.iter().position(WorkerHandle::is_leader).unwrap();
    let leader = fleet.remove(index);
    let id = leader.worker_id().to_owned();
    let orphans = held(&leader);
    let crashed = Instant::now();
    leader.abort().await;
    let survivors: Vec<&WorkerHandle> = fleet.iter().collect();
    env.wait("a new leader", PATIENCE, || leaders(&survivors).len() == 1)
        .await;
    let new_leader = crashed.elapsed();
    env.wait("the crashed leader's leases re-assigned", PATIENCE, || {
        orphans.is_subset(&held_by_all(&survivors))
    })
    .await;
    (id, orphans, new_leader, crashed.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_in_3x_one_leader_six_shards_leader_crash_and_graceful_stop() {
    let env = Env::new("v3-fleet", 6).await;
    let mut expected = env.put_plain("before", 300).await;
    let started = Instant::now();
    let (w1, w2, w3) = env
        .three(["w1", "w2", "w3"], ClientVersionConfig::V3x)
        .await;
    let mut fleet = vec![w1, w2, w3];
    env.wait("a first record", PATIENCE, || env.log.delivered_count() > 0)
        .await;
    let first_record = started.elapsed();
    env.wait("every record", PATIENCE, || {
        delivered(&env.log).len() >= expected.len()
    })
    .await;
    let all_delivered = started.elapsed();
    assert_eq!(delivered(&env.log), expected);
    let all: Vec<&WorkerHandle> = fleet.iter().collect();
    for w in &all {
        assert_eq!(
            w.client_version(),
            Some(ClientVersion::V3x),
            "{}",
            w.worker_id()
        );
    }
    // One leader; every lease held by one worker, each worker holding at least one.
    env.wait("one leader", PATIENCE, || leaders(&all).len() == 1)
        .await;
    env.wait("the leases spread", PATIENCE, || {
        let shares: Vec<BTreeSet<String>> = all.iter().map(|w| held(w)).collect();
        shares.iter().all(|s| !s.is_empty())
            && shares.iter().map(BTreeSet::len).sum::<usize>() == 6
            && held_by_all(&all).len() == 6
    })
    .await;
    let spread_after = started.elapsed();
    let leader_id = leaders(&all).pop().unwrap();
    let shares: Vec<usize> = all.iter().map(|w| held(w).len()).collect();

    // The state tables, as a Java worker reads them.
    assert_leader_item(&env.coordinator_item("Leader").await.unwrap(), &leader_id);
    let migration = env.coordinator_item("Migration3.0").await.unwrap();
    assert_eq!(
        attr_names(&migration),
        BTreeSet::from(["key", "cv", "mb", "mts"]),
        "{migration:?}"
    );
    assert_eq!(s(&migration, "cv"), "CLIENT_VERSION_3X");
    assert!(
        ["w1", "w2", "w3"].contains(&s(&migration, "mb")),
        "{migration:?}"
    );
    assert!(
        (now_secs() * 1000 - n(&migration, "mts")).abs() < 120_000,
        "{migration:?}"
    );
    let rows = env.metric_rows().await;
    let now = now_secs();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        assert_row_shape(row, now);
    }
    let wids: BTreeSet<&str> = rows.iter().map(|r| s(r, "wid")).collect();
    assert_eq!(wids, BTreeSet::from(["w1", "w2", "w3"]));
    println!(
        "[v3-fleet] 3 workers in 3.x, 6 fresh leases, 300 records: first record \
         {first_record:?}, all delivered {all_delivered:?}, leases spread {shares:?} after \
         {spread_after:?}; leader {leader_id}; (runs, assigned, handoffs, adopted) per \
         worker: {:?}",
        all.iter().map(|w| protocol_stats(w)).collect::<Vec<_>>()
    );

    // The leader crashes, its checkpoints at its last records: a new leader within
    // 2 x failover, its leases re-assigned and resumed from those checkpoints, nothing lost
    // and nothing delivered twice.
    env.wait_checkpoints(PATIENCE).await;
    let at_crash = env.leases().await;
    let mark = env.log.events().len();
    let (crashed_id, orphans, new_leader_after, reassigned_after) =
        crash_the_leader(&env, &mut fleet).await;
    assert_eq!(crashed_id, leader_id);
    let survivors: Vec<&WorkerHandle> = fleet.iter().collect();
    let second_leader = leaders(&survivors).pop().unwrap();
    println!(
        "[v3-fleet] leader {leader_id} crashed holding {} leases: new leader {second_leader} \
         after {new_leader_after:?} (bound 2 x failover + {EMULATOR_MARGIN:?}), its leases \
         re-assigned after {reassigned_after:?}",
        orphans.len()
    );
    assert!(
        new_leader_after <= 2 * FAILOVER + EMULATOR_MARGIN,
        "the new leader took {new_leader_after:?}"
    );
    assert_leader_item(
        &env.coordinator_item("Leader").await.unwrap(),
        &second_leader,
    );
    expected.extend(env.put_plain("after-crash", 120).await);
    env.wait("every record after the crash", PATIENCE, || {
        delivered(&env.log).len() >= expected.len()
    })
    .await;
    assert_eq!(delivered(&env.log), expected);
    assert_eq!(repeats(&env.log), BTreeMap::new(), "delivered twice");
    assert_eq!(callbacks_since(&env.log, mark, &leader_id), vec![]);
    let mut resumed = BTreeMap::new();
    for w in &survivors {
        resumed.extend(initialized_since(&env.log, mark, w.worker_id()));
    }
    for shard in &orphans {
        assert_eq!(
            resumed.get(shard),
            Some(&at_crash[shard].checkpoint),
            "{shard} not resumed from the crashed leader's checkpoint"
        );
    }
    let leases = env.leases().await;
    assert!(
        leases
            .values()
            .all(|l| l.lease_owner.as_deref() != Some(leader_id.as_str())),
        "a lease still names the crashed leader: {leases:#?}"
    );

    // The new leader stops gracefully while records flow: the last worker leads and
    // picks up its leases; no record twice.
    let index = fleet.iter().position(WorkerHandle::is_leader).unwrap();
    let stopping = fleet.remove(index);
    let last = fleet.pop().unwrap();
    let handed = held(&stopping);
    let during = env.put_plain("during-stop", 60).await;
    expected.extend(during);
    let stop_started = Instant::now();
    let report = stopping.shutdown().await.unwrap();
    let stopped_in = stop_started.elapsed();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        report
            .leases_released
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>(),
        handed
    );
    assert!(
        env.coordinator_item("Leader").await.is_none() || last.is_leader(),
        "the stopped leader's lock was not released"
    );
    let last_ref = [&last];
    env.wait("the last worker leads", PATIENCE, || last.is_leader())
        .await;
    let leads_after = stop_started.elapsed();
    env.wait("the last worker holds every lease", PATIENCE, || {
        held(&last).len() == 6
    })
    .await;
    let picked_up_after = stop_started.elapsed();
    expected.extend(env.put_plain("after-stop", 60).await);
    env.wait("every record after the stop", PATIENCE, || {
        delivered(&env.log).len() >= expected.len()
    })
    .await;
    assert_eq!(delivered(&env.log), expected);
    assert_eq!(repeats(&env.log), BTreeMap::new(), "delivered twice");
    assert_eq!(leaders(&last_ref), vec![last.worker_id().to_owned()]);
    assert_leader_item(
        &env.coordinator_item("Leader").await.unwrap(),
        last.worker_id(),
    );
    // The stopped worker took its row away.
    let rows = env.metric_rows().await;
    let wids: BTreeSet<&str> = rows.iter().map(|r| s(r, "wid")).collect();
    assert!(!wids.contains(second_leader.as_str()), "{wids:?}");
    println!(
        "[v3-fleet] leader {second_leader} stopped gracefully in {stopped_in:?} releasing {} \
         leases: {} leads after {leads_after:?}, holds all 6 after {picked_up_after:?}; \
         {} payloads, each delivered once",
        handed.len(),
        last.worker_id(),
        expected.len()
    );
    last.shutdown().await.unwrap();
}

/// Figures at failover 3 s, printed: start to first record on fresh leases (3.x, and 2.x
/// for comparison), and leader failover over three crashes of the leader (a fresh worker
/// joins after each). Bounded only generously.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_start_to_first_record_and_leader_failover_at_failover_3s() {
    let mut starts = Vec::new();
    for (name, version) in [
        ("v3-figures-3x", ClientVersionConfig::V3x),
        ("v3-figures-2x", ClientVersionConfig::CompatibleWith2x),
    ] {
        let env = Env::new(name, 6).await;
        let expected = env.put_plain("fresh", 60).await;
        let started = Instant::now();
        let (a, b, c) = env.three(["f1", "f2", "f3"], version).await;
        let fleet = [&a, &b, &c];
        env.wait("a first record", PATIENCE, || env.log.delivered_count() > 0)
            .await;
        let first = started.elapsed();
        env.wait("every shard delivering", PATIENCE, || {
            shards_delivering(&env.log).len() == 6
        })
        .await;
        let every_shard = started.elapsed();
        env.wait("every record", PATIENCE, || delivered(&env.log) == expected)
            .await;
        let everything = started.elapsed();
        starts.push((name, first, every_shard, everything));
        println!(
            "[{name}] 3 workers, 6 fresh leases: first record {first:?} after the start, every \
             shard delivering after {every_shard:?}, all 60 records after {everything:?} \
             (client versions {:?})",
            fleet.iter().map(|w| w.client_version()).collect::<Vec<_>>()
        );
        if version == ClientVersionConfig::V3x {
            assert!(
                every_shard <= 4 * FAILOVER,
                "3.x start to every shard took {every_shard:?}"
            );
        }
        for w in [a, b, c] {
            w.shutdown().await.unwrap();
        }
    }

    let env = Env::new("v3-failover", 6).await;
    let (a, b, c) = env
        .three(["g1", "g2", "g3"], ClientVersionConfig::V3x)
        .await;
    let mut fleet = vec![a, b, c];
    let mut rounds = Vec::new();
    for round in 0..3 {
        let all: Vec<&WorkerHandle> = fleet.iter().collect();
        env.wait("a settled fleet", PATIENCE, || {
            leaders(&all).len() == 1 && held_by_all(&all).len() == 6
        })
        .await;
        // Crash at a random point of the heartbeat cycle.
        tokio::time::sleep(Duration::from_millis(300 + 350 * round)).await;
        let (id, orphans, new_leader, reassigned) = crash_the_leader(&env, &mut fleet).await;
        println!(
            "[v3-failover] round {round}: leader {id} crashed holding {} leases; new leader \
             after {new_leader:?}, leases re-assigned after {reassigned:?}",
            orphans.len()
        );
        assert!(new_leader <= 3 * FAILOVER, "failover took {new_leader:?}");
        rounds.push((new_leader, reassigned));
        fleet.push(
            env.worker(&format!("g{}", 4 + round), ClientVersionConfig::V3x)
                .await,
        );
    }
    let failovers: Vec<Duration> = rounds.iter().map(|r| r.0).collect();
    let reassigns: Vec<Duration> = rounds.iter().map(|r| r.1).collect();
    println!(
        "[v3-failover] failover 3 s: new leader after {:?} .. {:?}, crashed leader's leases \
         re-assigned after {:?} .. {:?} (3 crashes); start to first record: {:?}",
        failovers.iter().min().unwrap(),
        failovers.iter().max().unwrap(),
        reassigns.iter().min().unwrap(),
        reassigns.iter().max().unwrap(),
        starts
            .iter()
            .map(|(name, first, _, _)| format!("{name} {first:?}"))
            .collect::<Vec<_>>()
    );
    for w in fleet {
        w.shutdown().await.unwrap();
    }
}

/// A fleet of ours in `CompatibleWith2x` starts the application in
/// `CLIENT_VERSION_UPGRADE_FROM_2X` (the 2.x taker, rows written, no leader); a migration
/// tool's conditional write of `CLIENT_VERSION_3X_WITH_ROLLBACK` is followed by every
/// worker at its next read of `Migration3.0` (60-90 s after its start): the fleet then
/// runs 3.x with one leader, and no record is delivered twice across the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2x_compatible_fleet_follows_the_migration_to_3x_with_rollback() {
    let env = Env::new("v3-migration", 4).await;
    let mut expected = env.put_plain("before", 100).await;
    let (a, b) = tokio::join!(
        env.worker("m1", ClientVersionConfig::CompatibleWith2x),
        env.worker("m2", ClientVersionConfig::CompatibleWith2x)
    );
    let started = Instant::now();
    let fleet = [&a, &b];
    env.wait("every record", PATIENCE, || delivered(&env.log) == expected)
        .await;
    env.wait("2/2 balance", PATIENCE, || {
        fleet.iter().all(|w| held(w).len() == 2)
    })
    .await;
    for w in fleet {
        assert_eq!(w.client_version(), Some(ClientVersion::UpgradeFrom2x));
        assert!(!w.is_leader());
    }
    let migration = env.coordinator_item("Migration3.0").await.unwrap();
    assert_eq!(s(&migration, "cv"), "CLIENT_VERSION_UPGRADE_FROM_2X");
    assert!(env.coordinator_item("Leader").await.is_none());
    env.wait_checkpoints(PATIENCE).await;
    // Rows in UPGRADE_FROM_2X too: each worker writes its first after its first CPU
    // sample (about a second after its start).
    let rows_started = Instant::now();
    loop {
        let rows = env.metric_rows().await;
        let wids: BTreeSet<&str> = rows.iter().map(|r| s(r, "wid")).collect();
        if wids == BTreeSet::from(["m1", "m2"]) {
            let now = now_secs();
            rows.iter().for_each(|r| assert_row_shape(r, now));
            break;
        }
        assert!(
            rows_started.elapsed() < PATIENCE,
            "no rows of both workers in UPGRADE_FROM_2X: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The migration tool's write, conditional on the version read.
    let tables = env.store.state_tables().unwrap();
    let limit = Duration::from_secs(5);
    let current = migration::read_state(&*tables.coordinator_state, &SystemClock, limit)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.client_version, ClientVersion::UpgradeFrom2x);
    let now_ms = now_secs() * 1000;
    let next = current.changed(ClientVersion::V3xWithRollback, "migration-tool", now_ms);
    assert!(
        migration::write_change(
            &*tables.coordinator_state,
            &SystemClock,
            limit,
            &current,
            &next
        )
        .await
        .unwrap()
    );
    let written = Instant::now();
    let written_after_start = started.elapsed();
    // The same change again is refused: the version is no longer the one read.
    assert!(
        !migration::write_change(
            &*tables.coordinator_state,
            &SystemClock,
            limit,
            &current,
            &next
        )
        .await
        .unwrap()
    );
    expected.extend(env.put_plain("during", 60).await);

    // Each worker follows at its next read; the switch times are measured one by one.
    let mut switched: BTreeMap<String, Duration> = BTreeMap::new();
    env.wait(
        "both workers in CLIENT_VERSION_3X_WITH_ROLLBACK",
        CHANGE_MONITOR_PATIENCE,
        || {
            for w in fleet {
                if w.client_version() == Some(ClientVersion::V3xWithRollback) {
                    switched
                        .entry(w.worker_id().to_owned())
                        .or_insert_with(|| written.elapsed());
                }
            }
            // Never two leaders.
            assert!(leaders(&fleet).len() <= 1, "two leaders");
            switched.len() == 2
        },
    )
    .await;
    env.wait("one leader", PATIENCE, || leaders(&fleet).len() == 1)
        .await;
    let leader_after = written.elapsed();
    let leader = leaders(&fleet).pop().unwrap();
    assert_leader_item(&env.coordinator_item("Leader").await.unwrap(), &leader);
    expected.extend(env.put_plain("after", 60).await);
    env.wait("every record after the switch", PATIENCE, || {
        delivered(&env.log) == expected
    })
    .await;
    assert_eq!(repeats(&env.log), BTreeMap::new(), "delivered twice");
    let all_held = held_by_all(&fleet);
    assert_eq!(all_held.len(), 4, "{all_held:?}");
    for w in fleet {
        assert_eq!(
            w.protocol()
                .unwrap()
                .stats()
                .version_changes
                .load(Ordering::Relaxed),
            1
        );
    }
    // A worker configured for 2.x compatibility does not move the application on to 3X.
    let migration = env.coordinator_item("Migration3.0").await.unwrap();
    assert_eq!(s(&migration, "cv"), "CLIENT_VERSION_3X_WITH_ROLLBACK");
    assert_eq!(s(&migration, "mb"), "migration-tool");
    println!(
        "[v3-migration] CLIENT_VERSION_3X_WITH_ROLLBACK written {written_after_start:?} after \
         the fleet started; followed by {switched:?} after the write; one leader ({leader}) \
         {leader_after:?} after the write, once both followed; shares {:?}; (runs, assigned, handoffs, adopted): {:?}",
        fleet.iter().map(|w| held(w).len()).collect::<Vec<_>>(),
        fleet.iter().map(|w| protocol_stats(w)).collect::<Vec<_>>()
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
