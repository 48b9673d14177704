//! The driver of a simulation run: starts, crashes and stops workers, injects faults, reshards,
//! produces records, drains, and hands the journal to the checker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use kcl_interfaces::ShutdownReason;
use kcl_kpl::Aggregator;
use kcl_lease::timeouts::within;
use kcl_lease::v3::memory::StateFaultKind;
use kcl_lease::v3::migration::{self, ClientVersion};
use kcl_lease::v3::table::StateTable;
use kcl_lease::{Clock, Lease, RandomSource, SeededRandom, SystemClock};
use kcl_worker::stream::{Shard, StreamClient};
use kcl_worker::test_util::Fleet;
use kcl_worker::{ClientVersionConfig, WorkerError, WorkerHandle};

use super::checker::*;
use super::config::*;
use super::journal::*;
use super::*;
use crate::kinesis::{Fault, FaultKind as KinesisFault, Operation, PutRecordsEntry};
use crate::recording::{Behaviour, Event, RecordingFactory};

pub(super) const STREAM: &str = "simulation";
pub(super) const APPLICATION: &str = "simulation-app";
/// Most open shards the schedule lets splits create.
pub(super) const MAX_OPEN_SHARDS: usize = 8;
/// How often the driver looks at the world while draining.
pub(super) const DRAIN_POLL: Duration = Duration::from_millis(250);
/// How long the driver waits for one of its own calls (listing shards, starting or
/// stopping a worker) before it gives up on it: a hanging path hangs them too.
pub(super) const DRIVER_CALL_LIMIT: Duration = Duration::from_secs(60);
/// How often the driver asks again for a shard listing that hung.
pub(super) const LISTING_ATTEMPTS: usize = 10;
/// The workers' shutdown grace.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// The workers' call timeout (the default, set explicitly: the overlap bound counts it).
pub(super) const CALL_TIMEOUT: Duration = kcl_lease::timeouts::DEFAULT_CALL_TIMEOUT;
/// The slowest batch of a slow processor spell, in milliseconds (the overlap bound counts
/// it).
pub(super) const SLOWEST_BATCH_MS: u64 = 1_500;
/// How often the driver looks for new handoffs (and runs what is due) during production.
pub(super) const PRODUCTION_POLL: Duration = Duration::from_millis(100);
/// The most faults one run schedules right after a handoff began.
pub(super) const MAX_HANDOFF_FAULTS: usize = 3;

// ---------------------------------------------------------------------------------------
// The fault schedule.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FaultKind {
    Crash,
    GracefulStop,
    Split,
    Merge,
    ThrottleGetRecords,
    ExpireIterators,
    LeaseStoreThrottle,
    LeaseStoreFailure,
    SlowProcessor,
    /// The next few Kinesis calls never complete.
    KinesisHang,
    /// Every Kinesis call started for a while hangs for good (a dead path).
    KinesisHangingPath,
    /// The next few lease store calls never complete.
    LeaseStoreHang,
    /// Every lease store call started for a while hangs for good (a dead path).
    LeaseStoreHangingPath,
    /// The next few subscription event waits fail mid-stream (fan-out).
    SubscriptionError,
    /// A subscription of one shard goes silent: no event ever comes (fan-out).
    SilentSubscription,
    /// The next few calls of one 3.x state table fail (unreachable, throttled, or applied
    /// with the answer lost).
    StateTableFailure,
    /// The next few calls of one 3.x state table never complete.
    StateTableHang,
    /// Every call of both 3.x state tables started for a while hangs for good.
    StateTableHangingPath,
    /// One worker is cut off from DynamoDB (its lease and state table calls fail, or hang
    /// for good) for a while; it still reaches Kinesis.
    Partition,
    /// One worker's processors are slow in `shutdown` for a while, or hang in it (the
    /// worker abandons it after its shutdown grace). Drawn from the handoff random source.
    SlowShutdown,
}

/// A fault the driver schedules right after it saw a graceful handoff begin, so that
/// handoffs race crashes, stops, store faults, partitions and slow shutdowns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HandoffFault {
    /// The handing-over worker crashes.
    CrashOwner,
    /// The next owner crashes.
    CrashNextOwner,
    /// The handing-over worker stops gracefully (it releases or hands over what it holds).
    StopOwner,
    /// The next few lease store calls fail.
    StoreFailure,
    /// The next few lease store calls never complete.
    StoreHang,
    /// The handing-over worker is cut off from DynamoDB for a while.
    PartitionOwner,
    /// The handing-over worker's processors are slow in `shutdown`, or hang in it.
    SlowShutdown,
}

/// The faults drawn right after a handoff began.
pub(super) const HANDOFF_FAULTS: [HandoffFault; 7] = [
    HandoffFault::CrashOwner,
    HandoffFault::CrashNextOwner,
    HandoffFault::StopOwner,
    HandoffFault::StoreFailure,
    HandoffFault::StoreHang,
    HandoffFault::PartitionOwner,
    HandoffFault::SlowShutdown,
];

/// The faults of the 3.x state tables and the partitions, drawn from the protocol's own
/// random source (so a seed's other faults stay as they were) when the store has state
/// tables.
pub(super) const STATE_KINDS: [FaultKind; 4] = [
    FaultKind::StateTableFailure,
    FaultKind::StateTableHang,
    FaultKind::StateTableHangingPath,
    FaultKind::Partition,
];

/// The fan-out faults, drawn besides the others when [`SimulationConfig::fan_out`] is on.
pub(super) const FAN_OUT_KINDS: [FaultKind; 2] =
    [FaultKind::SubscriptionError, FaultKind::SilentSubscription];

/// The hang faults, drawn besides [`FAULT_KINDS`] when [`SimulationConfig::hangs`] is on
/// (appended, so the schedules of runs without hangs stay as they were).
pub(super) const HANG_KINDS: [FaultKind; 4] = [
    FaultKind::KinesisHang,
    FaultKind::KinesisHangingPath,
    FaultKind::LeaseStoreHang,
    FaultKind::LeaseStoreHangingPath,
];

pub(super) const FAULT_KINDS: [FaultKind; 9] = [
    FaultKind::Crash,
    FaultKind::GracefulStop,
    FaultKind::Split,
    FaultKind::Merge,
    FaultKind::ThrottleGetRecords,
    FaultKind::ExpireIterators,
    FaultKind::LeaseStoreThrottle,
    FaultKind::LeaseStoreFailure,
    FaultKind::SlowProcessor,
];

#[derive(Clone, Debug)]
pub(super) enum Action {
    Fault(FaultKind),
    /// Start a new worker (after a crash or a stop).
    StartWorker,
    /// Back to the default behaviour for this worker's processors.
    Restore(String),
    /// Back to a prompt `shutdown` for this worker's processors.
    RestoreShutdown(String),
    /// A fault right after `handoff` began.
    AfterHandoff(HandoffFault, HandoffSeen),
    /// Write `CLIENT_VERSION_3X_WITH_ROLLBACK` to `Migration3.0` (a migration run).
    Migrate,
}

pub(super) struct Timings {
    pub(super) failover: Duration,
    pub(super) idle: Duration,
    pub(super) shard_sync: Duration,
    pub(super) parent_poll: Duration,
    pub(super) round_every: Duration,
    pub(super) rounds: usize,
    pub(super) max_records: u32,
}

pub(super) struct RunningWorker {
    pub(super) id: String,
    pub(super) handle: WorkerHandle,
    pub(super) factory: RecordingFactory,
    /// The behaviour its processors go back to after a slow spell.
    pub(super) behaviour: Behaviour,
    /// Its path to DynamoDB (partitions).
    pub(super) path: DynamoPath,
    /// How slow its processors' `shutdown` is.
    pub(super) shutdown_delay: ShutdownDelay,
    /// The task journaling its 3.x leadership.
    pub(super) leader_watch: Option<tokio::task::JoinHandle<()>>,
}

pub(super) struct Simulation {
    pub(super) config: SimulationConfig,
    pub(super) rng: SeededRandom,
    pub(super) timings: Timings,
    /// The in-memory Kinesis and lease store, and the workers' event log; its workers
    /// write to the lease store through a [`JournalingLeaseStore`].
    pub(super) fleet: Fleet,
    pub(super) journal: Journal,
    pub(super) workers: Vec<RunningWorker>,
    pub(super) workers_started: usize,
    pub(super) fan_out_workers_started: usize,
    /// Workers stopped gracefully at the very end, with the leases each held when its
    /// shutdown began and those its report named as not released: afterwards none may own
    /// a lease it held then, unless named. (A lease it had lost before, its renewals failing
    /// for the failover time, is not released: it expires for the others.)
    pub(super) stopped_at_end: Vec<StoppedWorker>,
    pub(super) produced: BTreeMap<String, Vec<Bytes>>,
    pub(super) produced_total: usize,
    /// The random source of the protocol's choices (client version configs, the
    /// migration's time, state table faults and partitions), apart from `rng` so the
    /// other faults of a seed are the same whatever the protocol.
    pub(super) protocol_rng: SeededRandom,
    /// When `CLIENT_VERSION_3X_WITH_ROLLBACK` was written (migration runs).
    pub(super) migrated_at: Option<Duration>,
    /// The 3.x runtimes' own counters of workers gone.
    pub(super) protocol_totals: ProtocolTotals,
    pub(super) v3_workers_started: usize,
    /// When the last partition ends (partitions run their spell out, past the producer's
    /// end).
    pub(super) partitions_until: Option<tokio::time::Instant>,
    /// The faults of the state tables, as the workers reach them.
    pub(super) state_faults: StateFaults,
    /// The random source of the handoff faults (slow shutdowns, faults right after a
    /// handoff began), apart from `rng` so the other faults of a seed stay as they were.
    pub(super) handoff_rng: SeededRandom,
    /// The journal entries already looked at for handoffs.
    pub(super) handoffs_seen: usize,
    /// Faults scheduled right after a handoff began.
    pub(super) handoff_faults: usize,
}

/// The 3.x runtimes' counters, summed over workers.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct ProtocolTotals {
    pub(super) handoffs: u64,
    pub(super) conflicts: u64,
    pub(super) version_changes: u64,
}

impl ProtocolTotals {
    pub(super) fn add(&mut self, handle: &WorkerHandle) {
        if let Some(protocol) = handle.protocol() {
            let stats = protocol.stats();
            self.handoffs += stats.handoffs.load(Ordering::Relaxed);
            self.conflicts += stats.conflicts.load(Ordering::Relaxed);
            self.version_changes += stats.version_changes.load(Ordering::Relaxed);
        }
    }
}

/// Whether a worker runs the 3.x protocol (a leader assigns).
pub(super) fn runs_3x(version: Option<ClientVersion>) -> bool {
    matches!(
        version,
        Some(ClientVersion::V3xWithRollback | ClientVersion::V3x)
    )
}

/// A worker stopped gracefully at the end of the run.
pub(super) struct StoppedWorker {
    pub(super) id: String,
    /// The leases it held when its shutdown began.
    pub(super) held: BTreeSet<String>,
    /// The leases its shutdown report named as not released.
    pub(super) not_released: BTreeSet<String>,
}

pub(super) fn payload(key: &str, n: usize) -> Bytes {
    Bytes::from(format!("{key}#{n:06}"))
}

pub(super) fn parse_payload(data: &[u8]) -> Option<(String, usize)> {
    let text = std::str::from_utf8(data).ok()?;
    let (key, n) = text.rsplit_once('#')?;
    Some((key.to_owned(), n.parse().ok()?))
}

pub(super) fn between(rng: &SeededRandom, low: u64, high: u64) -> u64 {
    low + rng.below(high.saturating_sub(low) + 1)
}

pub(super) fn millis(rng: &SeededRandom, low: u64, high: u64) -> Duration {
    Duration::from_millis(between(rng, low, high))
}

impl Simulation {
    pub(super) fn new(config: SimulationConfig) -> Self {
        let rng = SeededRandom::new(config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA5A5);
        let mut timings = Timings {
            failover: millis(&rng, 2_000, 10_000),
            idle: millis(&rng, 100, 200),
            shard_sync: millis(&rng, 1_000, 2_000),
            parent_poll: Duration::from_millis(200),
            round_every: millis(&rng, 150, 400),
            rounds: between(&rng, 20, 40) as usize,
            max_records: between(&rng, 20, 200) as u32,
        };
        let protocol_rng = SeededRandom::new(config.seed ^ 0x3C0F_FEE0_3000_0003);
        if config.protocol == LeaseProtocol::Migration {
            // Production over 95 to 130 s: the running workers' migration monitors (first
            // read 60 to 90 s after their start) switch them while records flow. Idle
            // reads less often, so the long run stays cheap.
            let production = millis(&protocol_rng, 95_000, 130_000);
            timings.round_every = production / timings.rounds.max(1) as u32;
            timings.idle *= 4;
            timings.shard_sync *= 4;
        }
        let journal = Journal::default();
        let mut fleet = Fleet::without_stream(STREAM).with_application(APPLICATION);
        if config.protocol.has_state_tables() {
            fleet = fleet.with_state_tables();
        }
        let journaled_store = Arc::new(JournalingLeaseStore {
            inner: fleet.store().clone(),
            journal: journal.clone(),
            worker: None,
            path: DynamoPath::default(),
            state_faults: StateFaults::default(),
        });
        let (failover, idle, shard_sync, parent_poll, max_records, handoff_timeout) = (
            timings.failover,
            timings.idle,
            timings.shard_sync,
            timings.parent_poll,
            timings.max_records,
            config.handoff_timeout,
        );
        let fleet = fleet
            .with_workers_lease_store(journaled_store)
            .with_defaults(move |builder| {
                builder
                    .failover_time(failover)
                    .idle_time_between_reads(idle)
                    .shard_sync_interval(shard_sync)
                    .parent_shard_poll_interval(parent_poll)
                    .shutdown_grace(SHUTDOWN_GRACE)
                    .call_timeout(CALL_TIMEOUT)
                    .handoff_timeout(handoff_timeout)
                    .task_backoff(Duration::from_millis(100))
                    .max_backoff(Duration::from_secs(2))
                    .max_records(max_records)
                    // Rows without CPU metrics: a CPU sample of this process on a virtual
                    // clock means nothing, and would make replays differ. The leader then
                    // balances by lease throughput.
                    .disable_worker_metrics(true)
            });
        let handoff_rng = SeededRandom::new(config.seed ^ 0x7A5D_0FF5_0000_0007);
        Self {
            handoff_rng,
            handoffs_seen: 0,
            handoff_faults: 0,
            config,
            rng,
            timings,
            fleet,
            journal,
            workers: Vec::new(),
            workers_started: 0,
            fan_out_workers_started: 0,
            stopped_at_end: Vec::new(),
            produced: BTreeMap::new(),
            produced_total: 0,
            protocol_rng,
            migrated_at: None,
            protocol_totals: ProtocolTotals::default(),
            v3_workers_started: 0,
            partitions_until: None,
            state_faults: StateFaults::default(),
        }
    }

    pub(super) fn note(
        &self,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
        what: String,
    ) {
        report
            .fault_log
            .push(format!("t={:.1}s {what}", started.elapsed().as_secs_f64()));
    }

    pub(super) async fn start_worker(&mut self) -> Result<(), String> {
        self.workers_started += 1;
        let id = format!("worker-{}", self.workers_started);
        // One worker in three checkpoints at random records instead of the largest one.
        let partial_checkpoints = (self.rng.below(3) == 0).then(|| self.rng.next_u64());
        let behaviour = Behaviour::new().checkpoint_every_batch(partial_checkpoints.is_none());
        let factory =
            RecordingFactory::new(id.clone(), self.fleet.log().clone(), behaviour.clone());
        let shutdown_delay = ShutdownDelay::default();
        let journaling = JournalingFactory {
            worker: id.clone(),
            inner: factory.clone(),
            journal: self.journal.clone(),
            partial_checkpoints,
            log: self.fleet.log().clone(),
            shutdown_delay: shutdown_delay.clone(),
        };
        let random_seed = self.config.seed ^ (self.workers_started as u64).wrapping_mul(0x9E37);
        // Fan-out or polling: alternating from a seed-derived start (no draw from the
        // schedule's random source, so the schedules stay as they were).
        let fan_out = self.config.fan_out
            && self
                .config
                .seed
                .wrapping_add(self.workers_started as u64)
                .is_multiple_of(2);
        let client_version = match self.config.protocol {
            LeaseProtocol::V2x => ClientVersionConfig::CompatibleWith2x,
            LeaseProtocol::V3x => ClientVersionConfig::V3x,
            // The first fleet is 2.x-compatible; restarts are configured either way once
            // every running worker runs 3.x (the Java KCL's migration guide: redeploy with
            // 3.x only after the flip completed). Earlier, a 3.x-configured worker would
            // write CLIENT_VERSION_3X, which a worker still in UPGRADE_FROM_2X ignores, as a
            // Java worker does: it would stay on the 2.x taker for good.
            LeaseProtocol::Migration
                if self.migrated_at.is_some()
                    && self
                        .workers
                        .iter()
                        .all(|w| runs_3x(w.handle.client_version()))
                    && self.protocol_rng.below(2) == 0 =>
            {
                ClientVersionConfig::V3x
            }
            LeaseProtocol::Migration => ClientVersionConfig::CompatibleWith2x,
        };
        // `start` fails at once on a lease store error (faults may be injected right now):
        // retry a few times, as a supervisor restarting the process would.
        // The worker's own journaling store: the journal names who completed a handoff.
        let path = DynamoPath::default();
        let fleet = self
            .fleet
            .clone()
            .with_workers_lease_store(Arc::new(JournalingLeaseStore {
                inner: self.fleet.store().clone(),
                journal: self.journal.clone(),
                worker: Some(id.clone()),
                path: path.clone(),
                state_faults: self.state_faults.clone(),
            }));
        let mut attempt = 0;
        let handle = loop {
            attempt += 1;
            let start = fleet.start_factory(&id, journaling.clone(), random_seed, |b| {
                let b = b.client_version_config(client_version);
                if fan_out {
                    b.retrieval_specific_config(kcl_worker::RetrievalConfig::FanOut(
                        kcl_worker::FanOutConfig::new().event_timeout(Duration::from_secs(10)),
                    ))
                } else {
                    b
                }
            });
            // A start whose calls hang (a hanging path) is given up and tried again.
            let outcome = within(&SystemClock, DRIVER_CALL_LIMIT, start)
                .await
                .ok_or_else(|| {
                    format!("starting {id} did not return within {DRIVER_CALL_LIMIT:?}")
                });
            match outcome {
                Ok(Ok(handle)) => break handle,
                Err(hung) if attempt < 20 => {
                    tracing::info!(worker_id = %id, %hung, "starting the worker hung; retrying");
                }
                Err(hung) => return Err(format!("{hung}, {attempt} times")),
                Ok(Err(e @ WorkerError::Config(_))) => return Err(format!("worker config: {e}")),
                Ok(Err(e)) if attempt < 20 => {
                    tracing::info!(worker_id = %id, error = %e, "starting the worker failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(Err(e)) => return Err(format!("starting {id} failed {attempt} times: {e}")),
            }
        };
        let version = handle.client_version();
        tracing::info!(worker_id = %id, fan_out, ?version, "worker started");
        // A lease store wrapper that did not forward `state_tables` would leave the worker
        // on 2.x silently.
        if self.config.protocol.has_state_tables() == version.is_none() {
            return Err(format!(
                "{id} started with client version {version:?} in a {:?} run",
                self.config.protocol
            ));
        }
        if self.config.protocol == LeaseProtocol::V3x && !runs_3x(version) {
            // (A 3.x fleet's workers all write or find CLIENT_VERSION_3X.)
            return Err(format!("{id} runs {version:?} in a 3.x fleet"));
        }
        if runs_3x(version) {
            self.v3_workers_started += 1;
        }
        if fan_out {
            self.fan_out_workers_started += 1;
        }
        let leader_watch = self.watch_leader(&id, &handle);
        self.workers.push(RunningWorker {
            id,
            handle,
            factory,
            behaviour,
            path,
            shutdown_delay,
            leader_watch,
        });
        Ok(())
    }

    /// Journals every change of what `handle`'s 3.x runtime publishes as its leadership.
    pub(super) fn watch_leader(
        &self,
        id: &str,
        handle: &WorkerHandle,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let mut leader = handle.protocol()?.watch_leader();
        let journal = self.journal.clone();
        let worker = id.to_owned();
        Some(tokio::spawn(async move {
            let mut leading = false;
            loop {
                let now = *leader.borrow_and_update();
                if now != leading {
                    leading = now;
                    journal.push(Entry::Leader {
                        worker: worker.clone(),
                        leading,
                        at: tokio::time::Instant::now(),
                    });
                }
                if leader.changed().await.is_err() {
                    return;
                }
            }
        }))
    }

    /// A worker is gone (crashed, or its graceful stop returned): its leadership ended.
    pub(super) fn gone(&self, id: &str, leader_watch: Option<tokio::task::JoinHandle<()>>) {
        if let Some(watch) = leader_watch {
            watch.abort();
        }
        self.journal.push(Entry::Leader {
            worker: id.to_owned(),
            leading: false,
            at: tokio::time::Instant::now(),
        });
    }

    /// Writes one round of records: plain ones through `put_records`, and aggregates of one
    /// key each.
    pub(super) fn produce_round(
        &mut self,
        count: usize,
        report: &mut SimulationReport,
    ) -> Result<(), String> {
        let mut plain = Vec::new();
        let mut left = count;
        while left > 0 {
            let key = format!("key-{:03}", self.rng.below(self.config.keys as u64));
            let next = self.produced.get(&key).map_or(0, Vec::len);
            if self.rng.below(3) == 0 && left >= 2 {
                // An aggregate: 2 to 8 records under this key. Plain records of the same key
                // already queued in this round go first, to keep the produced order.
                self.flush_plain(&mut plain)?;
                let n = (between(&self.rng, 2, 8) as usize).min(left);
                let mut agg = Aggregator::new();
                let mut datas = Vec::with_capacity(n);
                for i in 0..n {
                    let data = payload(&key, next + i);
                    datas.push(data.clone());
                    if agg
                        .add(&key, None, data)
                        .map_err(|e| format!("aggregating: {e}"))?
                        .is_some()
                    {
                        return Err("a small aggregate overflowed".to_owned());
                    }
                }
                let rec = agg
                    .finish()
                    .ok_or_else(|| "an aggregate came out empty".to_owned())?;
                self.fleet
                    .kinesis()
                    .put_record(
                        STREAM,
                        &rec.partition_key,
                        rec.explicit_hash_key.as_deref(),
                        rec.data,
                    )
                    .map_err(|e| format!("put_record: {e}"))?;
                self.produced.entry(key).or_default().extend(datas);
                report.aggregated_records += n;
                left -= n;
            } else {
                let data = payload(&key, next);
                plain.push(PutRecordsEntry::new(key.clone(), data.clone()));
                self.produced.entry(key).or_default().push(data);
                left -= 1;
            }
        }
        self.flush_plain(&mut plain)?;
        self.produced_total += count;
        Ok(())
    }

    pub(super) fn flush_plain(&self, plain: &mut Vec<PutRecordsEntry>) -> Result<(), String> {
        if plain.is_empty() {
            return Ok(());
        }
        self.fleet
            .kinesis()
            .put_records(STREAM, std::mem::take(plain))
            .map(|_| ())
            .map_err(|e| format!("put_records: {e}"))
    }

    pub(super) async fn shards(&self) -> Result<Vec<Shard>, String> {
        // A call started on a hanging path never answers: give up on it and ask again
        // (the spells are shorter than the attempts).
        for _ in 0..LISTING_ATTEMPTS {
            let listing = self.fleet.kinesis().list_all_shards(STREAM, None);
            if let Some(result) = within(&SystemClock, DRIVER_CALL_LIMIT / 6, listing).await {
                return result.map_err(|e| format!("listing shards: {e}"));
            }
        }
        Err(format!("listing shards hung {LISTING_ATTEMPTS} times"))
    }

    pub(super) async fn open_shards(&self) -> Result<Vec<Shard>, String> {
        let mut open: Vec<Shard> = self
            .shards()
            .await?
            .into_iter()
            .filter(|s| !s.is_closed())
            .collect();
        open.sort_by_key(|s| s.hash_key_range.start());
        Ok(open)
    }

    /// The name of one of the two state tables, at random (from the protocol's random
    /// source).
    pub(super) fn pick_state_table(&self) -> String {
        let store = self.fleet.store();
        let table = if self.protocol_rng.below(2) == 0 {
            store.coordinator_state_table()
        } else {
            store.worker_metrics_table()
        };
        table.map(|t| t.table_name().to_owned()).unwrap_or_default()
    }

    /// Writes `CLIENT_VERSION_3X_WITH_ROLLBACK` over the stored version, conditionally on
    /// it (as the Java 2.x leader's flip or an operator's tool would); the version found,
    /// `None` when there is no item yet. A state table hanging spell hangs it too
    /// (bounded).
    pub(super) async fn migrate(&self) -> Result<Option<ClientVersion>, String> {
        let Some(table) = self.fleet.store().coordinator_state_table() else {
            return Err("the store has no state tables".to_owned());
        };
        let limit = Duration::from_secs(2);
        let Some(current) = migration::read_state(table, &SystemClock, limit)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        if current.client_version != ClientVersion::UpgradeFrom2x {
            // Nothing to flip.
            return Ok(Some(current.client_version));
        }
        let now_ms = SystemClock
            .system_time()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let next = current.changed(
            ClientVersion::V3xWithRollback,
            "simulation-operator",
            now_ms,
        );
        match migration::write_change(table, &SystemClock, limit, &current, &next).await {
            Ok(true) => Ok(Some(current.client_version)),
            Ok(false) => Err("the version changed meanwhile".to_owned()),
            Err(e) => Err(e.to_string()),
        }
    }

    pub(super) fn pick_worker(&self) -> Option<usize> {
        if self.workers.is_empty() {
            None
        } else {
            Some(self.rng.below(self.workers.len() as u64) as usize)
        }
    }

    /// Executes one action; returns follow-up actions with their delay.
    pub(super) async fn execute(
        &mut self,
        action: Action,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<Vec<(Duration, Action)>, String> {
        let mut follow = Vec::new();
        match action {
            Action::StartWorker => {
                self.start_worker().await?;
                let id = self
                    .workers
                    .last()
                    .map(|w| w.id.clone())
                    .unwrap_or_default();
                self.note(report, started, format!("started {id}"));
            }
            Action::Restore(id) => {
                if let Some(w) = self.workers.iter().find(|w| w.id == id) {
                    w.factory.set_behaviour(w.behaviour.clone());
                }
            }
            Action::RestoreShutdown(id) => {
                if let Some(w) = self.workers.iter().find(|w| w.id == id) {
                    w.shutdown_delay.set(None);
                }
            }
            Action::AfterHandoff(fault, handoff) => {
                report.faults_injected += 1;
                follow.extend(self.after_handoff(fault, &handoff, report, started).await?);
            }
            Action::Migrate => match self.migrate().await {
                Ok(Some(other)) if other != ClientVersion::UpgradeFrom2x => {
                    self.note(
                        report,
                        started,
                        format!("migration: the application already runs {other}"),
                    );
                }
                Ok(Some(from)) => {
                    self.migrated_at = Some(started.elapsed());
                    self.note(
                        report,
                        started,
                        format!("migration: wrote CLIENT_VERSION_3X_WITH_ROLLBACK over {from}"),
                    );
                }
                Ok(None) => {
                    self.note(
                        report,
                        started,
                        "migration: no Migration3.0 item yet; again in 1s".to_owned(),
                    );
                    follow.push((Duration::from_secs(1), Action::Migrate));
                }
                Err(e) => {
                    self.note(
                        report,
                        started,
                        format!("migration: the write failed ({e}); again in 1s"),
                    );
                    follow.push((Duration::from_secs(1), Action::Migrate));
                }
            },
            Action::Fault(kind) => {
                report.faults_injected += 1;
                match kind {
                    FaultKind::Crash | FaultKind::GracefulStop => {
                        if self.workers.len() <= 1 {
                            // Keep at least one running: start another instead.
                            follow.push((Duration::ZERO, Action::StartWorker));
                            self.note(
                                report,
                                started,
                                format!("{kind:?} skipped: one worker left; starting one"),
                            );
                        } else if let Some(i) = self.pick_worker() {
                            self.take_down(i, kind == FaultKind::Crash, "", report, started)
                                .await?;
                            follow.push((millis(&self.rng, 0, 4_000), Action::StartWorker));
                        }
                    }
                    FaultKind::Split => {
                        let open = self.open_shards().await?;
                        let candidates: Vec<&Shard> = open
                            .iter()
                            .filter(|s| s.hash_key_range.end() - s.hash_key_range.start() >= 2)
                            .collect();
                        let pick = candidates.get(self.rng.below(candidates.len() as u64) as usize);
                        match pick {
                            Some(shard) if open.len() < MAX_OPEN_SHARDS => {
                                let (start, end) =
                                    (shard.hash_key_range.start(), shard.hash_key_range.end());
                                let wide = (u128::from(self.rng.next_u64()) << 64)
                                    | u128::from(self.rng.next_u64());
                                let at = start + 1 + wide % (end - start);
                                let children = self
                                    .fleet
                                    .kinesis()
                                    .split_shard(STREAM, &shard.shard_id, at)
                                    .map_err(|e| format!("split of {}: {e}", shard.shard_id))?;
                                self.note(
                                    report,
                                    started,
                                    format!("split {} at {at} into {children:?}", shard.shard_id),
                                );
                            }
                            _ => self.note(
                                report,
                                started,
                                "split skipped: too many open shards".to_owned(),
                            ),
                        }
                    }
                    FaultKind::Merge => {
                        let open = self.open_shards().await?;
                        let pairs: Vec<(&Shard, &Shard)> = open
                            .iter()
                            .zip(open.iter().skip(1))
                            .filter(|(a, b)| {
                                a.hash_key_range.end().checked_add(1)
                                    == Some(b.hash_key_range.start())
                            })
                            .collect();
                        match pairs.get(self.rng.below(pairs.len() as u64) as usize) {
                            Some((a, b)) => {
                                let child = self
                                    .fleet
                                    .kinesis()
                                    .merge_shards(STREAM, &a.shard_id, &b.shard_id)
                                    .map_err(|e| {
                                        format!("merge of {} and {}: {e}", a.shard_id, b.shard_id)
                                    })?;
                                self.note(
                                    report,
                                    started,
                                    format!(
                                        "merged {} and {} into {child}",
                                        a.shard_id, b.shard_id
                                    ),
                                );
                            }
                            None => self.note(
                                report,
                                started,
                                "merge skipped: no adjacent open shards".to_owned(),
                            ),
                        }
                    }
                    FaultKind::ThrottleGetRecords => {
                        let n = between(&self.rng, 3, 30) as u32;
                        self.fleet.kinesis().inject(
                            Fault::new(KinesisFault::Throttle, n)
                                .for_operation(Operation::GetRecords),
                        );
                        self.note(
                            report,
                            started,
                            format!("throttling the next {n} GetRecords"),
                        );
                    }
                    FaultKind::ExpireIterators => {
                        self.fleet.kinesis().expire_iterators();
                        let n = between(&self.rng, 1, 5) as u32;
                        self.fleet.kinesis().inject(
                            Fault::new(KinesisFault::ExpiredIterator, n)
                                .for_operation(Operation::GetRecords),
                        );
                        // And as many answers of "no records yet" while records are there
                        // (no extra draw: the seeds' schedules stay as they were).
                        self.fleet.kinesis().empty_reads_next(n);
                        self.note(
                            report,
                            started,
                            format!("expired every iterator, and {n} more GetRecords say ExpiredIterator, then {n} read nothing while behind"),
                        );
                    }
                    FaultKind::LeaseStoreThrottle => {
                        let n = between(&self.rng, 1, 8) as u32;
                        self.fleet.store().throttle_next(n);
                        self.note(
                            report,
                            started,
                            format!("throttling the next {n} lease store calls"),
                        );
                    }
                    FaultKind::LeaseStoreFailure => {
                        let n = between(&self.rng, 1, 8) as u32;
                        self.fleet.store().fail_next(n);
                        self.note(
                            report,
                            started,
                            format!("failing the next {n} lease store calls"),
                        );
                    }
                    FaultKind::SubscriptionError => {
                        let n = between(&self.rng, 1, 4) as u32;
                        self.fleet.kinesis().inject(
                            Fault::new(KinesisFault::ServiceError, n)
                                .for_operation(Operation::SubscribeToShardEvent),
                        );
                        self.note(
                            report,
                            started,
                            format!("the next {n} subscription event waits fail mid-stream"),
                        );
                    }
                    FaultKind::SilentSubscription => {
                        let open = self.open_shards().await?;
                        let pick = self.rng.below(open.len().max(1) as u64) as usize;
                        match open.get(pick) {
                            Some(shard) => {
                                self.fleet.kinesis().inject(
                                    Fault::new(KinesisFault::Hang, 1)
                                        .for_operation(Operation::SubscribeToShardEvent)
                                        .for_key(shard.shard_id.clone()),
                                );
                                self.note(
                                    report,
                                    started,
                                    format!(
                                        "the next subscription event wait of {} never completes",
                                        shard.shard_id
                                    ),
                                );
                            }
                            None => self.note(report, started, "no open shard to silence".into()),
                        }
                    }
                    FaultKind::KinesisHang => {
                        let n = between(&self.rng, 1, 3) as u32;
                        self.fleet.kinesis().inject(
                            Fault::new(KinesisFault::Hang, n).for_operation(Operation::GetRecords),
                        );
                        self.note(
                            report,
                            started,
                            format!("the next {n} GetRecords calls never complete"),
                        );
                    }
                    FaultKind::KinesisHangingPath => {
                        let spell = millis(&self.rng, 500, 5_000);
                        self.fleet.kinesis().set_hanging(true);
                        self.note(
                            report,
                            started,
                            format!(
                                "every Kinesis call started in the next {spell:?} hangs for good"
                            ),
                        );
                        // Ended by a timer of its own: the driver's own calls may be the
                        // ones hanging meanwhile.
                        let kinesis = self.fleet.kinesis().clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(spell).await;
                            kinesis.set_hanging(false);
                        });
                    }
                    FaultKind::LeaseStoreHang => {
                        let n = between(&self.rng, 1, 3) as u32;
                        self.fleet.store().hang_next(n);
                        self.note(
                            report,
                            started,
                            format!("the next {n} lease store calls never complete"),
                        );
                    }
                    FaultKind::LeaseStoreHangingPath => {
                        let spell = millis(&self.rng, 500, 5_000);
                        self.fleet.store().set_hanging(true);
                        self.note(
                            report,
                            started,
                            format!(
                                "every lease store call started in the next {spell:?} hangs for good"
                            ),
                        );
                        // Ended by a timer of its own, as the Kinesis path.
                        let store = self.fleet.store().clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(spell).await;
                            store.set_hanging(false);
                        });
                    }
                    FaultKind::StateTableFailure | FaultKind::StateTableHang => {
                        let name = self.pick_state_table();
                        let n = between(&self.protocol_rng, 1, 6) as u32;
                        let fault = if kind == FaultKind::StateTableHang {
                            StateFaultKind::Hang
                        } else {
                            [
                                StateFaultKind::Unreachable,
                                StateFaultKind::Throttle,
                                StateFaultKind::LoseAnswer,
                            ]
                            .get(self.protocol_rng.below(3) as usize)
                            .copied()
                            .unwrap_or(StateFaultKind::Unreachable)
                        };
                        self.state_faults.inject(&name, fault, n);
                        self.note(
                            report,
                            started,
                            format!("the next {n} calls of {name} fail: {fault:?}"),
                        );
                    }
                    FaultKind::StateTableHangingPath => {
                        let spell = millis(&self.protocol_rng, 500, 8_000);
                        let tables: Vec<_> = [
                            self.fleet.store().coordinator_state_table(),
                            self.fleet.store().worker_metrics_table(),
                        ]
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect();
                        for t in &tables {
                            t.set_hanging(true);
                        }
                        self.note(
                            report,
                            started,
                            format!("every state table call started in the next {spell:?} hangs for good"),
                        );
                        tokio::spawn(async move {
                            tokio::time::sleep(spell).await;
                            for t in &tables {
                                t.set_hanging(false);
                            }
                        });
                    }
                    FaultKind::Partition => {
                        // Often the leader: its lock, its assignments and its leases at once.
                        let leader = self.workers.iter().position(|w| w.handle.is_leader());
                        let pick = match leader {
                            Some(i) if self.protocol_rng.below(2) == 0 => Some(i),
                            _ => (!self.workers.is_empty()).then(|| {
                                self.protocol_rng.below(self.workers.len() as u64) as usize
                            }),
                        };
                        if let Some(i) = pick.filter(|i| *i < self.workers.len()) {
                            let spell = self
                                .timings
                                .failover
                                .mul_f64(0.2 + self.protocol_rng.below(1_000) as f64 / 400.0);
                            let dead = self.protocol_rng.below(2) == 0;
                            self.cut_off(i, spell, dead, "", report, started);
                        }
                    }
                    FaultKind::SlowShutdown => {
                        if !self.workers.is_empty() {
                            let i = self.handoff_rng.below(self.workers.len() as u64) as usize;
                            follow.extend(self.slow_shutdown(i, "", report, started));
                        }
                    }
                    FaultKind::SlowProcessor => {
                        if let Some(i) = self.pick_worker()
                            && let Some(w) = self.workers.get(i)
                        {
                            let delay = millis(&self.rng, 100, SLOWEST_BATCH_MS);
                            w.factory.set_behaviour(
                                w.behaviour.clone().slow(delay, Arc::new(SystemClock)),
                            );
                            let id = w.id.clone();
                            self.note(
                                report,
                                started,
                                format!("{id}'s processors take {delay:?} per batch"),
                            );
                            follow.push((millis(&self.rng, 1_000, 8_000), Action::Restore(id)));
                        }
                    }
                }
            }
        }
        Ok(follow)
    }

    /// Takes worker `i` down: crashes it (no shutdown, no release) or stops it gracefully;
    /// `why` is added to the note.
    pub(super) async fn take_down(
        &mut self,
        i: usize,
        crash: bool,
        why: &str,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        if i >= self.workers.len() {
            return Ok(());
        }
        let w = self.workers.remove(i);
        self.protocol_totals.add(&w.handle);
        let was_leader = if w.handle.is_leader() {
            " (the leader)"
        } else {
            ""
        };
        if crash {
            w.handle.abort().await;
            self.gone(&w.id, w.leader_watch);
            // Its processors are gone without a shutdown.
            self.journal.push(Entry::Crashed {
                worker: w.id.clone(),
            });
            self.note(
                report,
                started,
                format!("crashed {}{was_leader}{why}", w.id),
            );
        } else {
            let stopped = within(&SystemClock, DRIVER_CALL_LIMIT, w.handle.shutdown()).await;
            self.gone(&w.id, w.leader_watch);
            stopped
                .ok_or_else(|| {
                    format!(
                        "graceful stop of {} did not return within {DRIVER_CALL_LIMIT:?}",
                        w.id
                    )
                })?
                .map_err(|e| format!("graceful stop of {}: {e}", w.id))?;
            self.note(
                report,
                started,
                format!("stopped {}{was_leader} gracefully{why}", w.id),
            );
        }
        Ok(())
    }

    /// Cuts worker `i` off from DynamoDB for `spell`: its calls fail, or hang for good
    /// (`dead`); `why` is added to the note.
    pub(super) fn cut_off(
        &mut self,
        i: usize,
        spell: Duration,
        dead: bool,
        why: &str,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) {
        let Some(w) = self.workers.get(i) else {
            return;
        };
        let id = w.id.clone();
        let was_leader = if w.handle.is_leader() {
            " (the leader)"
        } else {
            ""
        };
        if dead {
            w.path.set_dead(true);
        } else {
            w.path.set_cut(true);
        }
        // Ended by a timer of its own, also after the producer finished (the settling check
        // waits for it).
        let path = w.path.clone();
        let reconnected = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(spell).await;
            path.set_cut(false);
            tracing::info!(worker_id = %reconnected, "the partition ends: DynamoDB reachable again");
        });
        let until = tokio::time::Instant::now() + spell;
        self.partitions_until = self.partitions_until.max(Some(until));
        self.note(
            report,
            started,
            format!(
                "{id}{was_leader} cut off from DynamoDB for {spell:?} ({}){why}",
                if dead {
                    "calls hang for good"
                } else {
                    "calls fail"
                }
            ),
        );
    }

    /// Makes worker `i`'s processors slow in `shutdown` (0.5 to 6 s; beyond the shutdown
    /// grace the worker abandons it), or hang in it, for 1 to 8 s (from the handoff random
    /// source); the follow-up that ends the spell.
    pub(super) fn slow_shutdown(
        &mut self,
        i: usize,
        why: &str,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Vec<(Duration, Action)> {
        let Some(w) = self.workers.get(i) else {
            return Vec::new();
        };
        let delay = if self.handoff_rng.below(3) == 0 {
            SlowShutdown::Hang
        } else {
            SlowShutdown::Slow(millis(&self.handoff_rng, 500, 6_000))
        };
        w.shutdown_delay.set(Some(delay));
        let id = w.id.clone();
        let spell = millis(&self.handoff_rng, 1_000, 8_000);
        self.note(
            report,
            started,
            format!("{id}'s processors' shutdown: {delay:?} for {spell:?}{why}"),
        );
        vec![(spell, Action::RestoreShutdown(id))]
    }

    /// Looks for handoffs begun since the last look; schedules a fault right after some of
    /// them (half, at most [`MAX_HANDOFF_FAULTS`] a run), 0 to 1 s later.
    pub(super) fn watch_handoffs(
        &mut self,
        schedule: &mut Vec<(Duration, Action)>,
        started: tokio::time::Instant,
    ) {
        let (next, handoffs) = self.journal.handoffs_since(self.handoffs_seen);
        self.handoffs_seen = next;
        if !self.config.faults {
            return;
        }
        for handoff in handoffs {
            if self.handoff_faults >= MAX_HANDOFF_FAULTS {
                return;
            }
            if self.handoff_rng.below(2) != 0 {
                continue;
            }
            let fault = HANDOFF_FAULTS
                .get(self.handoff_rng.below(HANDOFF_FAULTS.len() as u64) as usize)
                .copied()
                .unwrap_or(HandoffFault::CrashOwner);
            let at = started.elapsed() + millis(&self.handoff_rng, 0, 1_000);
            schedule.push((at, Action::AfterHandoff(fault, handoff)));
            self.handoff_faults += 1;
        }
        schedule.sort_by_key(|(at, _)| *at);
    }

    /// Executes `fault`, scheduled right after `handoff` began; returns follow-up actions.
    pub(super) async fn after_handoff(
        &mut self,
        fault: HandoffFault,
        handoff: &HandoffSeen,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<Vec<(Duration, Action)>, String> {
        let why = format!(
            " (the handoff of {} from {} to {})",
            handoff.key,
            handoff.from.as_deref().unwrap_or("?"),
            handoff.next_owner
        );
        let index =
            |id: Option<&str>| id.and_then(|id| self.workers.iter().position(|w| w.id == id));
        let owner = index(handoff.from.as_deref());
        let next = index(Some(handoff.next_owner.as_str()));
        let mut follow = Vec::new();
        match fault {
            HandoffFault::CrashOwner | HandoffFault::CrashNextOwner | HandoffFault::StopOwner => {
                let target = if fault == HandoffFault::CrashNextOwner {
                    next
                } else {
                    owner
                };
                match target {
                    Some(i) if self.workers.len() > 1 => {
                        self.take_down(i, fault != HandoffFault::StopOwner, &why, report, started)
                            .await?;
                        follow.push((millis(&self.handoff_rng, 0, 4_000), Action::StartWorker));
                    }
                    _ => self.note(
                        report,
                        started,
                        format!("{fault:?} skipped: the worker is gone or the last one{why}"),
                    ),
                }
            }
            HandoffFault::StoreFailure => {
                let n = between(&self.handoff_rng, 1, 8) as u32;
                self.fleet.store().fail_next(n);
                self.note(
                    report,
                    started,
                    format!("failing the next {n} lease store calls{why}"),
                );
            }
            HandoffFault::StoreHang => {
                let n = between(&self.handoff_rng, 1, 3) as u32;
                self.fleet.store().hang_next(n);
                self.note(
                    report,
                    started,
                    format!("the next {n} lease store calls never complete{why}"),
                );
            }
            HandoffFault::PartitionOwner => match owner {
                Some(i) => {
                    let spell = self
                        .timings
                        .failover
                        .mul_f64(0.2 + self.handoff_rng.below(1_000) as f64 / 400.0);
                    let dead = self.handoff_rng.below(2) == 0;
                    self.cut_off(i, spell, dead, &why, report, started);
                }
                None => self.note(
                    report,
                    started,
                    format!("partition skipped: the worker is gone{why}"),
                ),
            },
            HandoffFault::SlowShutdown => match owner {
                Some(i) => follow.extend(self.slow_shutdown(i, &why, report, started)),
                None => self.note(
                    report,
                    started,
                    format!("slow shutdown skipped: the worker is gone{why}"),
                ),
            },
        }
        Ok(follow)
    }

    /// Sleeps one production round, looking for new handoffs and running what is due every
    /// [`PRODUCTION_POLL`].
    pub(super) async fn wait_round(
        &mut self,
        schedule: &mut Vec<(Duration, Action)>,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        let until = tokio::time::Instant::now() + self.timings.round_every;
        loop {
            self.watch_handoffs(schedule, started);
            self.run_due(schedule, report, started).await?;
            let now = tokio::time::Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep((until - now).min(PRODUCTION_POLL)).await;
        }
    }

    pub(super) async fn run(&mut self, report: &mut SimulationReport) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        self.fleet
            .kinesis()
            .create_stream(STREAM, self.config.shards)
            .map_err(|e| format!("create_stream: {e}"))?;
        for _ in 0..self.config.workers.max(1) {
            self.start_worker().await?;
        }
        let production = self.timings.round_every * self.timings.rounds as u32;
        // The schedule: (offset from the start, action), kept sorted by offset.
        let mut schedule: Vec<(Duration, Action)> = Vec::new();
        if self.config.faults {
            let count = between(&self.rng, 1, self.config.max_faults.max(1) as u64);
            for _ in 0..count {
                let at = Duration::from_millis(self.rng.below(production.as_millis() as u64 + 1));
                let mut kinds: Vec<FaultKind> = if self.config.hangs {
                    FAULT_KINDS.iter().chain(&HANG_KINDS).copied().collect()
                } else {
                    FAULT_KINDS.to_vec()
                };
                if self.config.fan_out {
                    kinds.extend(FAN_OUT_KINDS);
                }
                let kind = kinds
                    .get(self.rng.below(kinds.len() as u64) as usize)
                    .copied()
                    .unwrap_or(FaultKind::Crash);
                schedule.push((at, Action::Fault(kind)));
            }
        }
        if self.config.faults {
            // Slow and hanging shutdowns, from the handoff random source.
            let production_ms = production.as_millis() as u64;
            for _ in 0..self.handoff_rng.below(3) {
                let at = Duration::from_millis(self.handoff_rng.below(production_ms + 1));
                schedule.push((at, Action::Fault(FaultKind::SlowShutdown)));
            }
        }
        if self.config.protocol.has_state_tables() {
            let production_ms = production.as_millis() as u64;
            if self.config.faults {
                for _ in 0..self.protocol_rng.below(4) {
                    let at = Duration::from_millis(self.protocol_rng.below(production_ms + 1));
                    let kind = STATE_KINDS
                        .get(self.protocol_rng.below(STATE_KINDS.len() as u64) as usize)
                        .copied()
                        .unwrap_or(FaultKind::Partition);
                    schedule.push((at, Action::Fault(kind)));
                }
            }
            if self.config.protocol == LeaseProtocol::Migration {
                // The flip early enough that workers started before it switch while
                // records still flow, and late enough that restarts come both ways.
                let at = between(&self.protocol_rng, production_ms / 20, production_ms / 3);
                schedule.push((Duration::from_millis(at), Action::Migrate));
            }
        }
        schedule.sort_by_key(|(at, _)| *at);
        let per_round = self.config.records / self.timings.rounds.max(1);
        let mut extra = self.config.records % self.timings.rounds.max(1);
        for _ in 0..self.timings.rounds {
            let mut count = per_round;
            if extra > 0 {
                count += 1;
                extra -= 1;
            }
            if count > 0 {
                self.produce_round(count, report)?;
            }
            self.run_due(&mut schedule, report, started).await?;
            self.wait_round(&mut schedule, report, started).await?;
        }
        report.records_produced = self.produced_total;
        // Whatever is still scheduled: restarts and restores run now, faults are dropped
        // (restarts and restores schedule nothing further).
        for (_, action) in std::mem::take(&mut schedule) {
            if !matches!(action, Action::Fault(_) | Action::AfterHandoff(..)) {
                self.execute(action, report, started).await?;
            }
        }
        // Faults stop; at least one worker runs.
        self.fleet.kinesis().clear_faults();
        self.fleet.store().clear_faults();
        for table in [
            self.fleet.store().coordinator_state_table(),
            self.fleet.store().worker_metrics_table(),
        ]
        .into_iter()
        .flatten()
        {
            table.set_hanging(false);
            table.set_unreachable(false);
        }
        self.state_faults.clear();
        for w in &self.workers {
            w.factory.set_behaviour(w.behaviour.clone());
            w.shutdown_delay.set(None);
        }
        if self.workers.is_empty() {
            self.start_worker().await?;
        }
        self.note(
            report,
            started,
            "producer done, faults stopped; draining".to_owned(),
        );
        let faults_stopped = tokio::time::Instant::now();
        self.drain(report, started).await?;
        report.drain_time = faults_stopped.elapsed();
        if self.config.protocol == LeaseProtocol::Migration {
            self.finish_migration(report, started).await?;
        }
        self.settle(report, started).await
    }

    /// A migration run after the drain: every running worker runs 3.x within the monitor's
    /// bound (its first read 60 to 90 s after its start, then every 60 s); then a last round
    /// of records, all delivered under 3.x.
    pub(super) async fn finish_migration(
        &mut self,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        let waited = tokio::time::Instant::now();
        let limit = Duration::from_secs(200);
        loop {
            let behind: Vec<String> = self
                .workers
                .iter()
                .filter(|w| !runs_3x(w.handle.client_version()))
                .map(|w| format!("{} on {:?}", w.id, w.handle.client_version()))
                .collect();
            if behind.is_empty() {
                break;
            }
            if waited.elapsed() >= limit {
                return Err(format!(
                    "migration: {limit:?} after the drain workers still run 2.x: {behind:?} (flip written at {:?})",
                    self.migrated_at
                ));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        self.note(
            report,
            started,
            "migration: every running worker runs 3.x; a last round of records".to_owned(),
        );
        let count = (self.config.records / 10).max(1);
        self.produce_round(count, report)?;
        report.records_produced = self.produced_total;
        self.drain(report, started).await
    }

    /// After the faults stopped (partitions ended too) and every record came: within a
    /// bound (six failover times, ten seconds and the handoff timeout), every unfinished lease is held by a running worker that owns it, no handoff
    /// is in flight, and (in 3.x) exactly one running worker counts itself leader.
    pub(super) async fn settle(
        &mut self,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        if let Some(until) = self.partitions_until {
            tokio::time::sleep_until(until).await;
        }
        // Plus the handoff timeout: a handoff whose handing-over worker lost the lease (or
        // died) as it began stands until it times out, in 3.x until the leader assigns the
        // lease directly, `handoff_timeout + failover_time` after it first saw the handoff.
        let limit =
            self.timings.failover * 6 + Duration::from_secs(10) + self.config.handoff_timeout;
        let waited = tokio::time::Instant::now();
        loop {
            let problems = self.unsettled();
            if problems.is_empty() {
                report.settle_time = waited.elapsed();
                self.note(
                    report,
                    started,
                    "every lease held by a running worker".to_owned(),
                );
                return Ok(());
            }
            if waited.elapsed() >= limit {
                return Err(format!(
                    "{limit:?} after the faults stopped and every record was delivered: {}; leases: {}",
                    problems.join("; "),
                    self.describe_leases()
                ));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    pub(super) fn unsettled(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for lease in self.fleet.store().snapshot() {
            if lease.is_finished() {
                continue;
            }
            let key = &lease.lease_key;
            match &lease.lease_owner {
                None => problems.push(format!("{key} has no owner")),
                Some(owner) => {
                    let held = self.workers.iter().any(|w| {
                        &w.id == owner && w.handle.held_leases().iter().any(|l| &l.lease_key == key)
                    });
                    if !held {
                        problems.push(format!("{key} is owned by {owner}, which does not hold it"));
                    }
                }
            }
            if let Some(from) = &lease.checkpoint_owner {
                problems.push(format!("{key} is being handed over from {from}"));
            }
        }
        if self
            .workers
            .iter()
            .any(|w| runs_3x(w.handle.client_version()))
        {
            let leaders: Vec<&str> = self
                .workers
                .iter()
                .filter(|w| w.handle.is_leader())
                .map(|w| w.id.as_str())
                .collect();
            if leaders.len() != 1 {
                problems.push(format!("the running workers' leaders: {leaders:?}"));
            }
        }
        problems
    }

    pub(super) async fn run_due(
        &mut self,
        schedule: &mut Vec<(Duration, Action)>,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        loop {
            let now = started.elapsed();
            let Some(pos) = schedule.iter().position(|(at, _)| *at <= now) else {
                return Ok(());
            };
            let (_, action) = schedule.remove(pos);
            for (delay, next) in self.execute(action, report, started).await? {
                schedule.push((now + delay, next));
            }
            schedule.sort_by_key(|(at, _)| *at);
        }
    }

    /// Closed shards whose lease is neither at SHARD_END nor deleted.
    pub(super) async fn unfinished_closed_shards(&self) -> Result<Vec<String>, String> {
        let leases: HashMap<String, Lease> = self
            .fleet
            .store()
            .snapshot()
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect();
        Ok(self
            .shards()
            .await?
            .into_iter()
            .filter(|s| s.is_closed())
            .filter(|s| {
                leases
                    .get(&s.shard_id)
                    .is_some_and(|l| !l.checkpoint.is_shard_end())
            })
            .map(|s| s.shard_id)
            .collect())
    }

    pub(super) async fn drain(
        &mut self,
        report: &mut SimulationReport,
        started: tokio::time::Instant,
    ) -> Result<(), String> {
        let limit = self.config.drain_limit;
        let drain_start = tokio::time::Instant::now();
        loop {
            let delivered = self.journal.distinct_delivered();
            let unfinished = self.unfinished_closed_shards().await?;
            if delivered >= self.produced_total && unfinished.is_empty() {
                self.note(
                    report,
                    started,
                    "every record delivered, every closed shard finished".to_owned(),
                );
                return Ok(());
            }
            if drain_start.elapsed() >= limit {
                return Err(format!(
                    "drain timed out after {limit:?} (virtual): {delivered} of {} records delivered; closed shards not finished: {unfinished:?}; leases: {}",
                    self.produced_total,
                    self.describe_leases()
                ));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    pub(super) fn describe_leases(&self) -> String {
        self.fleet
            .store()
            .snapshot()
            .iter()
            .map(|l| {
                format!(
                    "{}(owner {:?}, {}, parents {:?})",
                    l.lease_key, l.lease_owner, l.checkpoint, l.parent_shard_ids
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(super) async fn stop_all(&mut self, report: &mut SimulationReport) {
        for w in std::mem::take(&mut self.workers) {
            let id = w.id.clone();
            self.protocol_totals.add(&w.handle);
            let leader_watch = w.leader_watch;
            let held = w
                .handle
                .held_leases()
                .into_iter()
                .map(|l| l.lease_key)
                .collect();
            let mut not_released = BTreeSet::new();
            match within(&SystemClock, DRIVER_CALL_LIMIT, w.handle.shutdown()).await {
                Some(Ok(shutdown)) => {
                    not_released.extend(shutdown.leases_not_released.into_iter().map(|(k, _)| k));
                }
                Some(Err(e)) => report
                    .violations
                    .push(format!("graceful shutdown of {id} failed: {e}")),
                None => report.violations.push(format!(
                    "graceful shutdown of {id} did not return within {DRIVER_CALL_LIMIT:?}"
                )),
            }
            self.gone(&id, leader_watch);
            self.stopped_at_end.push(StoppedWorker {
                id,
                held,
                not_released,
            });
        }
    }

    // -----------------------------------------------------------------------------------
    // The invariants.

    pub(super) async fn check(&self, report: &mut SimulationReport) {
        report.records_produced = self.produced_total;
        report.workers_started = self.workers_started;
        report.fan_out_workers_started = self.fan_out_workers_started;
        report.subscriptions_opened = self.fleet.kinesis().stats().subscriptions_opened;
        let shards = match self.shards().await {
            Ok(s) => s,
            Err(e) => {
                report.violations.push(e);
                return;
            }
        };
        report.shards_at_end = shards.len();
        let parents: HashMap<String, Vec<String>> = shards
            .iter()
            .map(|s| {
                (
                    s.shard_id.clone(),
                    s.parent_ids().map(str::to_owned).collect(),
                )
            })
            .collect();
        let limit = OverlapLimit::new(self.timings.failover, CALL_TIMEOUT, SHUTDOWN_GRACE);
        let mut checker = Checker {
            leaders: LeaderCheck {
                limit: self.timings.failover,
                ..LeaderCheck::default()
            },
            overlap_limit: Some(limit),
            ..Checker::default()
        };
        for (at, entry) in self.journal.entries() {
            checker.apply_at(at, entry, &parents);
        }
        checker.finish(tokio::time::Instant::now());
        report.handoff_timeout = self.config.handoff_timeout;
        report.handoff_faults = self.handoff_faults;
        report.loss_delivery_limit = limit.deliver;
        report.loss_overlap_limit = limit.stop;
        report.max_loss_delivery = checker.max_loss_delivery;
        report.max_loss_overlap = checker.max_loss_overlap;
        report.deliveries = checker.deliveries;
        report.redeliveries = checker.redeliveries;
        report.zombie_redeliveries = checker.zombie_redeliveries;
        report.processors = checker.instances.len();
        report.zombie_inits = checker.zombie_inits;
        report.graceful_handoffs = checker.graceful_handoffs;
        report.forced_handoffs = checker.forced_handoffs;
        report.overlaps = checker.overlaps;
        report.handoff_redeliveries = checker.handoff_redeliveries;
        report.checkpoints = checker.checkpoints;
        report.protocol = self.config.protocol;
        report.failover_time = self.timings.failover;
        report.v3_workers_started = self.v3_workers_started;
        report.version_switches = self.protocol_totals.version_changes;
        report.migrated_at = self.migrated_at;
        report.leader_elections = checker.leaders.elections;
        report.leader_changes = checker.leaders.changes;
        report.leader_overlaps = checker.leaders.overlaps;
        report.max_leader_overlap = checker.leaders.max_overlap;
        report.leader_assignments = checker.assignments;
        report.stale_leader_assignments = checker.stale_assignments;
        report.leader_handoffs = self.protocol_totals.handoffs;
        report.assignment_conflicts = self.protocol_totals.conflicts;
        let mut violations = checker.violations;

        // 1. Every record delivered.
        let mut missing = Vec::new();
        for datas in self.produced.values() {
            for d in datas {
                if !checker.last_deliverer.contains_key(d) {
                    missing.push(String::from_utf8_lossy(d).into_owned());
                }
            }
        }
        if !missing.is_empty() {
            violations.push(format!(
                "{} of {} produced records were never delivered, e.g. {:?}",
                missing.len(),
                self.produced_total,
                missing.iter().take(5).collect::<Vec<_>>()
            ));
        }
        // 3. No checkpoint succeeded in shutdown(Zombie) (from the recording processors).
        for e in self.fleet.log().events() {
            if let Event::Checkpointed {
                worker,
                shard,
                error: None,
                during: Some(ShutdownReason::Zombie),
                ..
            } = e
            {
                violations.push(format!(
                    "{worker}'s processor of {shard} checkpointed successfully during shutdown(Zombie)"
                ));
            }
        }
        // 5. Closed shards finished.
        let snapshot: HashMap<String, Lease> = self
            .fleet
            .store()
            .snapshot()
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect();
        for shard in shards.iter().filter(|s| s.is_closed()) {
            match snapshot.get(&shard.shard_id) {
                Some(lease) if lease.checkpoint.is_shard_end() => {}
                Some(lease) => violations.push(format!(
                    "closed shard {} ends with checkpoint {}, not SHARD_END",
                    shard.shard_id, lease.checkpoint
                )),
                None => {
                    if !(checker.deleted.contains(&shard.shard_id)
                        && checker.shard_end_written.contains(&shard.shard_id))
                    {
                        violations.push(format!(
                            "closed shard {} has no lease and was never finished and deleted",
                            shard.shard_id
                        ));
                    }
                }
            }
        }
        // Graceful shutdown released every lease held, or named it in its report.
        for lease in snapshot.values() {
            if let Some(owner) = &lease.lease_owner
                && let Some(stopped) = self.stopped_at_end.iter().find(|w| &w.id == owner)
                && stopped.held.contains(&lease.lease_key)
                && !stopped.not_released.contains(&lease.lease_key)
            {
                violations.push(format!(
                    "{owner} shut down gracefully but still owns {}, not named as unreleased",
                    lease.lease_key
                ));
            }
        }
        report.violations.extend(violations);
    }
}
