//! A seeded multi-worker simulation with invariant checks.
//!
//! [`run_simulation`] runs several [`kcl_worker::Worker`]s in one process over one
//! [`InMemoryKinesis`] and one [`InMemoryLeaseStore`], on tokio's clock (paused: virtual
//! time, so simulated minutes take milliseconds). A producer writes plain and KPL-aggregated
//! records under many partition keys, each payload carrying a per-key counter, while a
//! fault schedule derived from the seed crashes workers (no shutdown, no release) and
//! restarts them under new ids, stops workers gracefully and restarts them, splits and
//! merges shards, throttles `GetRecords`, expires iterators, fails or throttles lease store
//! calls, and slows processors down. One worker in three checkpoints at a random record of
//! each batch (often inside a KPL aggregate) or skips the checkpoint, instead of
//! checkpointing the largest delivered record. After the producer finishes, the faults stop, at least
//! one worker keeps running, and the simulation waits (bounded, in virtual time) until every
//! record was delivered and every closed shard finished, then shuts everything down
//! gracefully and checks:
//!
//! 1. every produced record was delivered at least once;
//! 2. per partition key, first deliveries come in produced order (across splits and merges);
//! 3. successful checkpoint writes of a lease never go backwards; every checkpoint write is
//!    by the lease's current owner (fencing); no checkpoint lands after its processor was
//!    told `Zombie`;
//! 4. a processor only delivers records after the checkpoint it started from, in increasing
//!    order, and starts from the lease's latest checkpoint; a record delivered again by the
//!    lease's owner was never checkpointed by the processor that delivered it before (so
//!    repeats only follow a crash, a lost lease or a failed checkpoint). Deliveries by a
//!    processor whose lease another worker already took (the zombie window before it
//!    notices) are counted, not flagged;
//! 5. every closed shard ends at `SHARD_END` (or its lease was deleted after `SHARD_END`),
//!    no lease is taken after it finished, a deleted lease is never recreated, and a child
//!    is initialized only after every parent checkpointed `SHARD_END`.
//!
//! The checks read a journal written by a processor wrapper (around
//! [`crate::recording::RecordingProcessor`], whose [`EventLog`] is kept too) and by a
//! [`LeaseStore`] decorator that logs every successful write, in one total order.
//!
//! Replaying a seed repeats its inputs (records, fault schedule, timings, worker random
//! sources) exactly; the interleaving of tasks can still differ slightly between runs
//! because tokio's `select!` and hash maps are randomized. A failing seed names the command
//! that replays it:
//!
//! ```text
//! KCL_SEED=<seed> cargo test -p kcl-testkit --test simulation replay
//! ```
//!
//! ```no_run
//! let report = kcl_testkit::simulation::run_seed(7).map_err(|f| f.to_string()).unwrap();
//! assert!(report.records_produced > 0);
//! assert!(report.violations.is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, RecordProcessorFactory,
    ShutdownInput, ShutdownReason,
};
use kcl_kpl::{Aggregator, ExtendedSequenceNumber};
use kcl_lease::{
    BillingMode, Lease, LeaseError, LeaseStore, RandomSource, SeededRandom, SystemClock,
};
use kcl_worker::stream::{Shard, StreamClient};
use kcl_worker::{InitialPosition, Worker, WorkerConfig, WorkerHandle};

use crate::kinesis::{Fault, InMemoryKinesis, Operation, PutRecordsEntry};
use crate::lease_store::InMemoryLeaseStore;
use crate::recording::{Behaviour, Event, EventLog, RecordingFactory, RecordingProcessor};

const STREAM: &str = "simulation";
const APPLICATION: &str = "simulation-app";
/// Most open shards the schedule lets splits create.
const MAX_OPEN_SHARDS: usize = 8;
/// How often the driver looks at the world while draining.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// What one simulation run does. [`SimulationConfig::new`] derives the sizes from the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimulationConfig {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Workers running at the start (the schedule keeps at least one running).
    pub workers: usize,
    /// Shards of the stream at the start.
    pub shards: u32,
    /// User records the producer writes.
    pub records: usize,
    /// Distinct partition keys.
    pub keys: usize,
    /// Whether to inject faults (crashes, stops, resharding, throttling, ...).
    pub faults: bool,
    /// Most fault events in the schedule (at least one is drawn when `faults` is on).
    pub max_faults: usize,
    /// How long (virtual time) to wait for every record after the producer finished.
    pub drain_limit: Duration,
}

impl SimulationConfig {
    /// The configuration for `seed`: 3 workers, 4 shards, 300 to 800 records under 10 to
    /// 40 keys, faults on (1 to 6 fault events).
    pub fn new(seed: u64) -> Self {
        let rng = SeededRandom::new(seed ^ 0x5EED_C0F1_6000_0001);
        Self {
            seed,
            workers: 3,
            shards: 4,
            records: 300 + rng.below(501) as usize,
            keys: 10 + rng.below(31) as usize,
            faults: true,
            max_faults: 6,
            drain_limit: Duration::from_secs(600),
        }
    }

    /// Sets the number of workers at the start (at least 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Sets the number of shards at the start (at least 1).
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Sets the number of records.
    pub fn records(mut self, records: usize) -> Self {
        self.records = records;
        self
    }

    /// Sets the number of partition keys (at least 1).
    pub fn keys(mut self, keys: usize) -> Self {
        self.keys = keys.max(1);
        self
    }

    /// Turns fault injection on or off.
    pub fn faults(mut self, faults: bool) -> Self {
        self.faults = faults;
        self
    }
}

/// What a run did and found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SimulationReport {
    /// The seed.
    pub seed: u64,
    /// User records produced.
    pub records_produced: usize,
    /// How many of them went in KPL aggregates.
    pub aggregated_records: usize,
    /// User records delivered, counting repeats.
    pub deliveries: usize,
    /// Deliveries of a record that had been delivered before.
    pub redeliveries: usize,
    /// Of those, deliveries by a processor whose lease another worker had already taken.
    pub zombie_redeliveries: usize,
    /// Processors initialized after their lease had already moved to another worker.
    pub zombie_inits: usize,
    /// Fault events executed.
    pub faults_injected: usize,
    /// The fault events, as executed, with their virtual time.
    pub fault_log: Vec<String>,
    /// Workers started (restarts included).
    pub workers_started: usize,
    /// Processors created.
    pub processors: usize,
    /// Successful checkpoint writes.
    pub checkpoints: usize,
    /// Shards at the end (open and closed).
    pub shards_at_end: usize,
    /// Virtual time the run took.
    pub virtual_time: Duration,
    /// Every invariant violation found (empty when the run passed).
    pub violations: Vec<String>,
}

impl SimulationReport {
    /// `Ok(self)` when no invariant was violated, else the failure naming the seed.
    pub fn into_result(self) -> Result<Self, SimulationFailure> {
        if self.violations.is_empty() {
            Ok(self)
        } else {
            Err(SimulationFailure {
                seed: self.seed,
                violations: self.violations,
                fault_log: self.fault_log,
            })
        }
    }
}

/// A run that violated invariants. `Display` names the seed and how to replay it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulationFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub violations: Vec<String>,
    /// The fault events of the run, as executed (not part of `Display`).
    pub fault_log: Vec<String>,
}

impl fmt::Display for SimulationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "simulation seed {} failed with {} violation(s) (replay: KCL_SEED={} cargo test -p kcl-testkit --test simulation replay)",
            self.seed,
            self.violations.len(),
            self.seed
        )?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimulationFailure {}

/// Runs the simulation for `seed` with [`SimulationConfig::new`] on a fresh current-thread
/// tokio runtime with paused time.
pub fn run_seed(seed: u64) -> Result<SimulationReport, SimulationFailure> {
    run_config(SimulationConfig::new(seed))
}

/// Runs the simulation for `config` on a fresh current-thread tokio runtime with paused
/// time.
pub fn run_config(config: SimulationConfig) -> Result<SimulationReport, SimulationFailure> {
    let seed = config.seed;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| SimulationFailure {
            seed,
            violations: vec![format!("building the tokio runtime failed: {e}")],
            fault_log: Vec::new(),
        })?;
    runtime.block_on(run_simulation(config)).into_result()
}

/// Runs one simulation. Call it inside a current-thread tokio runtime with paused time
/// (as [`run_seed`] does); on a running clock it works but takes real minutes.
pub async fn run_simulation(config: SimulationConfig) -> SimulationReport {
    let mut sim = Simulation::new(config);
    let mut report = SimulationReport {
        seed: sim.config.seed,
        ..SimulationReport::default()
    };
    let started = tokio::time::Instant::now();
    if let Err(e) = sim.run(&mut report).await {
        report.violations.push(e);
    }
    // Whatever happened, stop every worker still running.
    sim.stop_all(&mut report).await;
    sim.check(&mut report).await;
    report.virtual_time = started.elapsed();
    report
}

// ---------------------------------------------------------------------------------------
// The journal: processor callbacks and lease store writes in one order.

#[derive(Clone, Debug)]
struct Delivery {
    esn: ExtendedSequenceNumber,
    partition_key: String,
    data: Bytes,
}

#[derive(Clone, Debug)]
enum Entry {
    Init {
        instance: u64,
        worker: String,
        shard: String,
        checkpoint: ExtendedSequenceNumber,
    },
    Delivered {
        instance: u64,
        records: Vec<Delivery>,
    },
    Shutdown {
        instance: u64,
        reason: ShutdownReason,
    },
    Created {
        key: String,
        checkpoint: ExtendedSequenceNumber,
    },
    Taken {
        key: String,
        owner: String,
    },
    Released {
        key: String,
    },
    Checkpointed {
        key: String,
        writer: Option<String>,
        checkpoint: ExtendedSequenceNumber,
    },
    Deleted {
        key: String,
    },
}

#[derive(Debug, Default)]
struct JournalState {
    entries: Vec<Entry>,
    delivered: HashSet<Bytes>,
    next_instance: u64,
}

/// Shared, append-only journal.
#[derive(Clone, Debug, Default)]
struct Journal {
    state: Arc<Mutex<JournalState>>,
}

impl Journal {
    fn lock(&self) -> MutexGuard<'_, JournalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, entry: Entry) {
        let mut state = self.lock();
        if let Entry::Delivered { records, .. } = &entry {
            for r in records {
                state.delivered.insert(r.data.clone());
            }
        }
        state.entries.push(entry);
    }

    fn next_instance(&self) -> u64 {
        let mut state = self.lock();
        state.next_instance += 1;
        state.next_instance
    }

    fn distinct_delivered(&self) -> usize {
        self.lock().delivered.len()
    }

    fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }
}

/// Wraps a [`RecordingFactory`] so every processor also writes to the journal.
#[derive(Clone, Debug)]
struct JournalingFactory {
    worker: String,
    inner: RecordingFactory,
    journal: Journal,
    /// Checkpoint at a random record of each batch (the recording processor's
    /// "largest delivered" checkpoint is then turned off), else `None`.
    partial_checkpoints: Option<u64>,
    log: EventLog,
}

impl RecordProcessorFactory for JournalingFactory {
    type Processor = JournalingProcessor;

    fn create_processor(&self) -> JournalingProcessor {
        let instance = self.journal.next_instance();
        JournalingProcessor {
            worker: self.worker.clone(),
            instance,
            inner: self.inner.create_processor(),
            journal: self.journal.clone(),
            partial: self
                .partial_checkpoints
                .map(|seed| SeededRandom::new(seed ^ instance.wrapping_mul(0x9E37_79B9))),
            shard: String::new(),
            log: self.log.clone(),
        }
    }
}

#[derive(Debug)]
struct JournalingProcessor {
    worker: String,
    instance: u64,
    inner: RecordingProcessor,
    journal: Journal,
    partial: Option<SeededRandom>,
    shard: String,
    log: EventLog,
}

impl RecordProcessor for JournalingProcessor {
    async fn initialize(&mut self, input: InitializationInput) {
        self.journal.push(Entry::Init {
            instance: self.instance,
            worker: self.worker.clone(),
            shard: input.shard_id.clone(),
            checkpoint: input.extended_sequence_number.clone(),
        });
        self.shard = input.shard_id.clone();
        self.inner.initialize(input).await;
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let records = input
            .records
            .iter()
            .map(|r| Delivery {
                esn: r.extended_sequence_number(),
                partition_key: r.partition_key.clone(),
                data: r.data.clone(),
            })
            .collect();
        self.journal.push(Entry::Delivered {
            instance: self.instance,
            records,
        });
        // Checkpoint at a random record (often inside a KPL aggregate), or not at all.
        let target = self.partial.as_ref().and_then(|rng| {
            let len = input.records.len() as u64;
            (rng.below(4) != 0)
                .then(|| input.records.get(rng.below(len) as usize).cloned())
                .flatten()
        });
        let checkpointer = input.checkpointer.clone();
        self.inner.process_records(input).await;
        if let Some(record) = target {
            let result = checkpointer.checkpoint_record(&record).await;
            self.log.push(Event::Checkpointed {
                worker: self.worker.clone(),
                shard: self.shard.clone(),
                position: Some(record.extended_sequence_number()),
                error: result.err().map(|e| e.kind()),
                during: None,
            });
        }
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        self.journal.push(Entry::Shutdown {
            instance: self.instance,
            reason: input.shutdown_reason,
        });
        self.inner.shutdown(input).await;
    }
}

/// A [`LeaseStore`] that logs every successful write to the journal.
#[derive(Debug)]
struct JournalingLeaseStore {
    inner: Arc<InMemoryLeaseStore>,
    journal: Journal,
}

#[async_trait]
impl LeaseStore for JournalingLeaseStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }

    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.inner.table_exists().await
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let created = self.inner.create_lease_if_not_exists(lease).await?;
        if created {
            self.journal.push(Entry::Created {
                key: lease.lease_key.clone(),
                checkpoint: lease.checkpoint.clone(),
            });
        }
        Ok(created)
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.inner.list_leases().await
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.inner.get_lease(lease_key).await
    }

    async fn renew_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.inner.renew_lease(lease).await
    }

    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        let taken = self.inner.take_lease(lease, new_owner).await?;
        self.journal.push(Entry::Taken {
            key: lease.lease_key.clone(),
            owner: new_owner.to_owned(),
        });
        Ok(taken)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let released = self.inner.release_lease(lease).await?;
        self.journal.push(Entry::Released {
            key: lease.lease_key.clone(),
        });
        Ok(released)
    }

    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let written = self.inner.update_checkpoint(lease, checkpoint).await?;
        self.journal.push(Entry::Checkpointed {
            key: lease.lease_key.clone(),
            writer: lease.lease_owner.clone(),
            checkpoint: written.checkpoint.clone(),
        });
        Ok(written)
    }

    async fn update_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_pending_checkpoint(lease, pending).await
    }

    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.inner
            .update_child_shard_ids(lease, child_shard_ids)
            .await
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(lease).await?;
        self.journal.push(Entry::Deleted {
            key: lease.lease_key.clone(),
        });
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The fault schedule.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultKind {
    Crash,
    GracefulStop,
    Split,
    Merge,
    ThrottleGetRecords,
    ExpireIterators,
    LeaseStoreThrottle,
    LeaseStoreFailure,
    SlowProcessor,
}

const FAULT_KINDS: [FaultKind; 9] = [
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
enum Action {
    Fault(FaultKind),
    /// Start a new worker (after a crash or a stop).
    StartWorker,
    /// Back to the default behaviour for this worker's processors.
    Restore(String),
}

struct Timings {
    failover: Duration,
    idle: Duration,
    shard_sync: Duration,
    parent_poll: Duration,
    round_every: Duration,
    rounds: usize,
    max_records: u32,
}

struct RunningWorker {
    id: String,
    handle: WorkerHandle,
    factory: RecordingFactory,
    /// The behaviour its processors go back to after a slow spell.
    behaviour: Behaviour,
}

struct Simulation {
    config: SimulationConfig,
    rng: SeededRandom,
    timings: Timings,
    kinesis: InMemoryKinesis,
    store: Arc<InMemoryLeaseStore>,
    journaled_store: Arc<JournalingLeaseStore>,
    journal: Journal,
    log: EventLog,
    workers: Vec<RunningWorker>,
    workers_started: usize,
    /// Workers stopped gracefully at the very end: none may own a lease afterwards.
    stopped_at_end: Vec<String>,
    produced: BTreeMap<String, Vec<Bytes>>,
    produced_total: usize,
}

fn payload(key: &str, n: usize) -> Bytes {
    Bytes::from(format!("{key}#{n:06}"))
}

fn parse_payload(data: &[u8]) -> Option<(String, usize)> {
    let text = std::str::from_utf8(data).ok()?;
    let (key, n) = text.rsplit_once('#')?;
    Some((key.to_owned(), n.parse().ok()?))
}

fn between(rng: &SeededRandom, low: u64, high: u64) -> u64 {
    low + rng.below(high.saturating_sub(low) + 1)
}

fn millis(rng: &SeededRandom, low: u64, high: u64) -> Duration {
    Duration::from_millis(between(rng, low, high))
}

impl Simulation {
    fn new(config: SimulationConfig) -> Self {
        let rng = SeededRandom::new(config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0xA5A5);
        let timings = Timings {
            failover: millis(&rng, 2_000, 10_000),
            idle: millis(&rng, 100, 200),
            shard_sync: millis(&rng, 1_000, 2_000),
            parent_poll: Duration::from_millis(200),
            round_every: millis(&rng, 150, 400),
            rounds: between(&rng, 20, 40) as usize,
            max_records: between(&rng, 20, 200) as u32,
        };
        let kinesis = InMemoryKinesis::new();
        let store = Arc::new(InMemoryLeaseStore::new());
        let journal = Journal::default();
        let journaled_store = Arc::new(JournalingLeaseStore {
            inner: store.clone(),
            journal: journal.clone(),
        });
        Self {
            config,
            rng,
            timings,
            kinesis,
            store,
            journaled_store,
            journal,
            log: EventLog::new(),
            workers: Vec::new(),
            workers_started: 0,
            stopped_at_end: Vec::new(),
            produced: BTreeMap::new(),
            produced_total: 0,
        }
    }

    fn note(&self, report: &mut SimulationReport, started: tokio::time::Instant, what: String) {
        report
            .fault_log
            .push(format!("t={:.1}s {what}", started.elapsed().as_secs_f64()));
    }

    async fn start_worker(&mut self) -> Result<(), String> {
        self.workers_started += 1;
        let id = format!("worker-{}", self.workers_started);
        let t = &self.timings;
        let config = WorkerConfig::builder(APPLICATION, STREAM)
            .worker_id(id.clone())
            .initial_position(InitialPosition::TrimHorizon)
            .failover_time(t.failover)
            .idle_time_between_reads(t.idle)
            .shard_sync_interval(t.shard_sync)
            .parent_shard_poll_interval(t.parent_poll)
            .shutdown_grace(Duration::from_secs(3))
            .task_backoff(Duration::from_millis(100))
            .max_backoff(Duration::from_secs(2))
            .max_records(t.max_records)
            .build()
            .map_err(|e| format!("worker config: {e}"))?;
        // One worker in three checkpoints at random records instead of the largest one.
        let partial_checkpoints = (self.rng.below(3) == 0).then(|| self.rng.next_u64());
        let behaviour = Behaviour::new().checkpoint_every_batch(partial_checkpoints.is_none());
        let factory = RecordingFactory::new(id.clone(), self.log.clone(), behaviour.clone());
        let journaling = JournalingFactory {
            worker: id.clone(),
            inner: factory.clone(),
            journal: self.journal.clone(),
            partial_checkpoints,
            log: self.log.clone(),
        };
        let random_seed = self.config.seed ^ (self.workers_started as u64).wrapping_mul(0x9E37);
        // `start` fails at once on a lease store error (faults may be injected right now):
        // retry a few times, as a supervisor restarting the process would.
        let mut attempt = 0;
        let handle = loop {
            attempt += 1;
            let worker = Worker::builder(config.clone(), journaling.clone())
                .stream_client(Arc::new(self.kinesis.clone()))
                .lease_store(self.journaled_store.clone())
                .clock(Arc::new(SystemClock))
                .random(Arc::new(SeededRandom::new(random_seed)))
                .build()
                .await
                .map_err(|e| format!("building {id}: {e}"))?;
            match worker.start().await {
                Ok(handle) => break handle,
                Err(e) if attempt < 20 => {
                    tracing::info!(worker_id = %id, error = %e, "starting the worker failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(format!("starting {id} failed {attempt} times: {e}")),
            }
        };
        self.workers.push(RunningWorker {
            id,
            handle,
            factory,
            behaviour,
        });
        Ok(())
    }

    /// Writes one round of records: plain ones through `put_records`, and aggregates of one
    /// key each.
    fn produce_round(&mut self, count: usize, report: &mut SimulationReport) -> Result<(), String> {
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
                self.kinesis
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

    fn flush_plain(&self, plain: &mut Vec<PutRecordsEntry>) -> Result<(), String> {
        if plain.is_empty() {
            return Ok(());
        }
        self.kinesis
            .put_records(STREAM, std::mem::take(plain))
            .map(|_| ())
            .map_err(|e| format!("put_records: {e}"))
    }

    async fn shards(&self) -> Result<Vec<Shard>, String> {
        self.kinesis
            .list_all_shards(STREAM, None)
            .await
            .map_err(|e| format!("listing shards: {e}"))
    }

    async fn open_shards(&self) -> Result<Vec<Shard>, String> {
        let mut open: Vec<Shard> = self
            .shards()
            .await?
            .into_iter()
            .filter(|s| !s.is_closed())
            .collect();
        open.sort_by_key(|s| s.hash_key_range.start());
        Ok(open)
    }

    fn pick_worker(&self) -> Option<usize> {
        if self.workers.is_empty() {
            None
        } else {
            Some(self.rng.below(self.workers.len() as u64) as usize)
        }
    }

    /// Executes one action; returns follow-up actions with their delay.
    async fn execute(
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
                            let w = self.workers.remove(i);
                            if kind == FaultKind::Crash {
                                w.handle.abort().await;
                                self.note(report, started, format!("crashed {}", w.id));
                            } else {
                                w.handle
                                    .shutdown()
                                    .await
                                    .map_err(|e| format!("graceful stop of {}: {e}", w.id))?;
                                self.note(report, started, format!("stopped {} gracefully", w.id));
                            }
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
                                    .kinesis
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
                                    .kinesis
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
                        self.kinesis
                            .fail_next(Operation::GetRecords, Fault::Throttled, n);
                        self.note(
                            report,
                            started,
                            format!("throttling the next {n} GetRecords"),
                        );
                    }
                    FaultKind::ExpireIterators => {
                        self.kinesis.expire_iterators();
                        let n = between(&self.rng, 1, 5) as u32;
                        self.kinesis
                            .fail_next(Operation::GetRecords, Fault::ExpiredIterator, n);
                        // And as many answers of "no records yet" while records are there
                        // (no extra draw: the seeds' schedules stay as they were).
                        self.kinesis.empty_reads_next(n);
                        self.note(
                            report,
                            started,
                            format!("expired every iterator, and {n} more GetRecords say ExpiredIterator, then {n} read nothing while behind"),
                        );
                    }
                    FaultKind::LeaseStoreThrottle => {
                        let n = between(&self.rng, 1, 8) as u32;
                        self.store.throttle_next(n);
                        self.note(
                            report,
                            started,
                            format!("throttling the next {n} lease store calls"),
                        );
                    }
                    FaultKind::LeaseStoreFailure => {
                        let n = between(&self.rng, 1, 8) as u32;
                        self.store.fail_next(n);
                        self.note(
                            report,
                            started,
                            format!("failing the next {n} lease store calls"),
                        );
                    }
                    FaultKind::SlowProcessor => {
                        if let Some(i) = self.pick_worker()
                            && let Some(w) = self.workers.get(i)
                        {
                            let delay = millis(&self.rng, 100, 1_500);
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

    async fn run(&mut self, report: &mut SimulationReport) -> Result<(), String> {
        let started = tokio::time::Instant::now();
        self.kinesis
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
                let kind = FAULT_KINDS
                    .get(self.rng.below(FAULT_KINDS.len() as u64) as usize)
                    .copied()
                    .unwrap_or(FaultKind::Crash);
                schedule.push((at, Action::Fault(kind)));
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
            tokio::time::sleep(self.timings.round_every).await;
        }
        report.records_produced = self.produced_total;
        // Whatever is still scheduled: restarts and restores run now, faults are dropped
        // (restarts and restores schedule nothing further).
        for (_, action) in std::mem::take(&mut schedule) {
            if !matches!(action, Action::Fault(_)) {
                self.execute(action, report, started).await?;
            }
        }
        // Faults stop; at least one worker runs.
        self.kinesis.clear_faults();
        self.store.clear_faults();
        for w in &self.workers {
            w.factory.set_behaviour(w.behaviour.clone());
        }
        if self.workers.is_empty() {
            self.start_worker().await?;
        }
        self.note(
            report,
            started,
            "producer done, faults stopped; draining".to_owned(),
        );
        self.drain(report, started).await
    }

    async fn run_due(
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
    async fn unfinished_closed_shards(&self) -> Result<Vec<String>, String> {
        let leases: HashMap<String, Lease> = self
            .store
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

    async fn drain(
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

    fn describe_leases(&self) -> String {
        self.store
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

    async fn stop_all(&mut self, report: &mut SimulationReport) {
        for w in std::mem::take(&mut self.workers) {
            let id = w.id.clone();
            if let Err(e) = w.handle.shutdown().await {
                report
                    .violations
                    .push(format!("graceful shutdown of {id} failed: {e}"));
            }
            self.stopped_at_end.push(id);
        }
    }

    // -----------------------------------------------------------------------------------
    // The invariants.

    async fn check(&self, report: &mut SimulationReport) {
        report.records_produced = self.produced_total;
        report.workers_started = self.workers_started;
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
        let mut checker = Checker::default();
        for entry in self.journal.entries() {
            checker.apply(entry, &parents);
        }
        report.deliveries = checker.deliveries;
        report.redeliveries = checker.redeliveries;
        report.zombie_redeliveries = checker.zombie_redeliveries;
        report.processors = checker.instances.len();
        report.zombie_inits = checker.zombie_inits;
        report.checkpoints = checker.checkpoints;
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
        for e in self.log.events() {
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
            .store
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
        // Graceful shutdown released every lease.
        for lease in snapshot.values() {
            if let Some(owner) = &lease.lease_owner
                && self.stopped_at_end.contains(owner)
            {
                violations.push(format!(
                    "{owner} shut down gracefully but still owns {}",
                    lease.lease_key
                ));
            }
        }
        report.violations.extend(violations);
    }
}

#[derive(Debug)]
struct Instance {
    worker: String,
    shard: String,
    start: ExtendedSequenceNumber,
    last_delivered: Option<ExtendedSequenceNumber>,
    shutdown: Option<ShutdownReason>,
    /// The largest checkpoint this processor's worker wrote for the shard while this
    /// processor ran.
    checkpointed: Option<ExtendedSequenceNumber>,
}

/// Replays the journal and collects violations.
#[derive(Debug, Default)]
struct Checker {
    violations: Vec<String>,
    instances: HashMap<u64, Instance>,
    /// (worker, shard) -> the latest processor instance.
    current: HashMap<(String, String), u64>,
    /// Lease key -> its checkpoint in the store.
    durable: HashMap<String, ExtendedSequenceNumber>,
    owner: HashMap<String, Option<String>>,
    shard_end_written: HashSet<String>,
    deleted: HashSet<String>,
    /// Payload -> (instance, position) of its latest delivery.
    last_deliverer: HashMap<Bytes, u64>,
    /// Partition key -> the counter its next first delivery must carry.
    next_first: HashMap<String, usize>,
    /// Keys already reported out of order (one report per key).
    misordered: HashSet<String>,
    deliveries: usize,
    redeliveries: usize,
    zombie_redeliveries: usize,
    zombie_inits: usize,
    checkpoints: usize,
}

impl Checker {
    fn violation(&mut self, v: String) {
        // Enough to diagnose; a broken run could otherwise list thousands.
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }

    fn apply(&mut self, entry: Entry, parents: &HashMap<String, Vec<String>>) {
        match entry {
            Entry::Init {
                instance,
                worker,
                shard,
                checkpoint,
            } => self.init(instance, worker, shard, checkpoint, parents),
            Entry::Delivered { instance, records } => {
                for r in records {
                    self.delivered(instance, r);
                }
            }
            Entry::Shutdown { instance, reason } => {
                let Some(i) = self.instances.get_mut(&instance) else {
                    self.violation(format!(
                        "shutdown({reason:?}) of a processor never initialized"
                    ));
                    return;
                };
                let previous = i.shutdown.replace(reason);
                // shutdown(Terminate) is called again, after a back-off, while SHARD_END has
                // not been checkpointed (SPEC section 2).
                let terminate_retry = previous == Some(ShutdownReason::Terminate)
                    && reason == ShutdownReason::Terminate
                    && !i
                        .checkpointed
                        .as_ref()
                        .is_some_and(ExtendedSequenceNumber::is_shard_end);
                if let (Some(previous), false) = (previous, terminate_retry) {
                    let msg = format!(
                        "{}'s processor of {} was shut down twice: {previous:?} then {reason:?}",
                        i.worker, i.shard
                    );
                    self.violation(msg);
                }
            }
            Entry::Created { key, checkpoint } => {
                if self.deleted.contains(&key) {
                    self.violation(format!(
                        "the lease of {key} was created again after cleanup deleted it"
                    ));
                }
                self.durable.insert(key.clone(), checkpoint);
                self.owner.insert(key, None);
            }
            Entry::Taken { key, owner } => {
                if self.shard_end_written.contains(&key) {
                    self.violation(format!(
                        "{owner} took the lease of {key} after it was finished (SHARD_END)"
                    ));
                }
                self.owner.insert(key, Some(owner));
            }
            Entry::Released { key } => {
                self.owner.insert(key, None);
            }
            Entry::Deleted { key } => {
                if !self.shard_end_written.contains(&key) {
                    self.violation(format!(
                        "the lease of {key} was deleted before SHARD_END was checkpointed"
                    ));
                }
                self.deleted.insert(key);
            }
            Entry::Checkpointed {
                key,
                writer,
                checkpoint,
            } => self.checkpointed(key, writer, checkpoint),
        }
    }

    fn init(
        &mut self,
        instance: u64,
        worker: String,
        shard: String,
        checkpoint: ExtendedSequenceNumber,
        parents: &HashMap<String, Vec<String>>,
    ) {
        for p in parents.get(&shard).into_iter().flatten() {
            if !self.shard_end_written.contains(p) {
                self.violation(format!(
                    "{worker} initialized child {shard} before its parent {p} checkpointed SHARD_END"
                ));
            }
        }
        let owner = self.owner.get(&shard).cloned().flatten();
        let owns = owner.as_deref() == Some(worker.as_str());
        if owns {
            match self.durable.get(&shard) {
                Some(d) if *d != checkpoint => {
                    let d = d.clone();
                    self.violation(format!(
                        "{worker} initialized {shard} at checkpoint {checkpoint} but the lease's checkpoint was {d}"
                    ));
                }
                Some(_) => {}
                None => self.violation(format!("{worker} initialized {shard}, which has no lease")),
            }
        } else {
            // The lease moved on between the take and `initialize` (the zombie window): this
            // processor can only be told Zombie, and its checkpoints are fenced.
            self.zombie_inits += 1;
        }
        self.current
            .insert((worker.clone(), shard.clone()), instance);
        self.instances.insert(
            instance,
            Instance {
                worker,
                shard,
                start: checkpoint,
                last_delivered: None,
                shutdown: None,
                checkpointed: None,
            },
        );
    }

    fn delivered(&mut self, instance: u64, r: Delivery) {
        self.deliveries += 1;
        let Some(me) = self.instances.get(&instance) else {
            self.violation(format!(
                "records delivered to a processor that was never initialized: {:?}",
                r.data
            ));
            return;
        };
        let (worker, shard) = (me.worker.clone(), me.shard.clone());
        let mut problems = Vec::new();
        if me.start.sequence_number().is_some() && r.esn <= me.start {
            problems.push(format!(
                "{worker} delivered {} of {shard} at {}, at or below the checkpoint {} it started from",
                String::from_utf8_lossy(&r.data),
                r.esn,
                me.start
            ));
        }
        if let Some(last) = &me.last_delivered
            && r.esn <= *last
        {
            problems.push(format!(
                "{worker} delivered {} of {shard} at {} after {last}: not in increasing order",
                String::from_utf8_lossy(&r.data),
                r.esn
            ));
        }
        let is_owner =
            self.owner.get(&shard).cloned().flatten().as_deref() == Some(worker.as_str());
        match self.last_deliverer.get(&r.data).copied() {
            Some(previous) => {
                self.redeliveries += 1;
                if !is_owner {
                    self.zombie_redeliveries += 1;
                } else if let Some(prev) = self.instances.get(&previous)
                    && previous != instance
                    && let Some(checkpointed) = prev.checkpointed.as_ref().filter(|c| **c >= r.esn)
                {
                    problems.push(format!(
                        "{worker} delivered {} of {shard} again although {}'s processor (which delivered it before, ended by {:?}) had checkpointed {checkpointed}",
                        String::from_utf8_lossy(&r.data),
                        prev.worker,
                        prev.shutdown,
                    ));
                }
            }
            None => match parse_payload(&r.data) {
                Some((key, n)) if key == r.partition_key => {
                    let expected = self.next_first.get(&key).copied().unwrap_or(0);
                    if n != expected && !self.misordered.contains(&key) {
                        self.misordered.insert(key.clone());
                        problems.push(format!(
                            "key {key}: record #{n} was first delivered (by {worker} on {shard}) when #{expected} was next: per-key order broken"
                        ));
                    }
                    self.next_first.insert(key, n.max(expected) + 1);
                }
                _ => problems.push(format!(
                    "{worker} delivered a record that was never produced: key {} data {:?}",
                    r.partition_key, r.data
                )),
            },
        }
        for p in problems {
            self.violation(p);
        }
        self.last_deliverer.insert(r.data, instance);
        if let Some(me) = self.instances.get_mut(&instance) {
            me.last_delivered = Some(r.esn);
        }
    }

    fn checkpointed(
        &mut self,
        key: String,
        writer: Option<String>,
        checkpoint: ExtendedSequenceNumber,
    ) {
        self.checkpoints += 1;
        let writer = writer.unwrap_or_default();
        if let Some(d) = self.durable.get(&key).filter(|d| checkpoint < **d) {
            let d = d.clone();
            self.violation(format!(
                "the checkpoint of {key} went backwards: {d} then {checkpoint} (written by {writer})"
            ));
        }
        if self.deleted.contains(&key) {
            self.violation(format!(
                "{writer} checkpointed {key} after its lease was deleted"
            ));
        }
        let owner = self.owner.get(&key).cloned().flatten();
        if owner.as_deref() != Some(writer.as_str()) {
            self.violation(format!(
                "{writer} wrote checkpoint {checkpoint} of {key} while the lease belonged to {owner:?}"
            ));
        }
        if let Some(instance) = self.current.get(&(writer.clone(), key.clone())).copied()
            && let Some(i) = self.instances.get_mut(&instance)
        {
            let zombie = i.shutdown == Some(ShutdownReason::Zombie);
            if i.checkpointed.as_ref().is_none_or(|c| checkpoint > *c) {
                i.checkpointed = Some(checkpoint.clone());
            }
            if zombie {
                self.violation(format!(
                    "{writer}'s checkpoint {checkpoint} of {key} landed after its processor was told Zombie"
                ));
            }
        }
        if checkpoint.is_shard_end() {
            self.shard_end_written.insert(key.clone());
        }
        self.durable.insert(key, checkpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esn(seq: &str, sub: u64) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::parse(seq, sub).unwrap()
    }

    fn delivery(seq: &str, key: &str, n: usize) -> Delivery {
        Delivery {
            esn: esn(seq, 0),
            partition_key: key.to_owned(),
            data: payload(key, n),
        }
    }

    fn init(instance: u64, worker: &str, shard: &str, checkpoint: ExtendedSequenceNumber) -> Entry {
        Entry::Init {
            instance,
            worker: worker.to_owned(),
            shard: shard.to_owned(),
            checkpoint,
        }
    }

    fn created(key: &str) -> Entry {
        Entry::Created {
            key: key.to_owned(),
            checkpoint: ExtendedSequenceNumber::TRIM_HORIZON,
        }
    }

    fn taken(key: &str, owner: &str) -> Entry {
        Entry::Taken {
            key: key.to_owned(),
            owner: owner.to_owned(),
        }
    }

    fn checkpointed(key: &str, writer: &str, checkpoint: ExtendedSequenceNumber) -> Entry {
        Entry::Checkpointed {
            key: key.to_owned(),
            writer: Some(writer.to_owned()),
            checkpoint,
        }
    }

    fn delivered(instance: u64, records: Vec<Delivery>) -> Entry {
        Entry::Delivered { instance, records }
    }

    /// Runs `entries` (shard `p` is the parent of `c`) and returns the violations.
    fn check(entries: Vec<Entry>) -> Vec<String> {
        let parents: HashMap<String, Vec<String>> = [("c".to_owned(), vec!["p".to_owned()])].into();
        let mut checker = Checker::default();
        for e in entries {
            checker.apply(e, &parents);
        }
        checker.violations
    }

    /// A clean history: take, deliver, checkpoint, crash, take over, redeliver what was not
    /// checkpointed, finish the parent, then the child.
    fn clean() -> Vec<Entry> {
        vec![
            created("p"),
            created("c"),
            taken("p", "w1"),
            init(1, "w1", "p", ExtendedSequenceNumber::TRIM_HORIZON),
            delivered(1, vec![delivery("10", "k", 0), delivery("11", "k", 1)]),
            checkpointed("p", "w1", esn("10", 0)),
            // w1 crashes; w2 takes over from 10 and delivers 11 again.
            taken("p", "w2"),
            init(2, "w2", "p", esn("10", 0)),
            delivered(2, vec![delivery("11", "k", 1), delivery("12", "k", 2)]),
            checkpointed("p", "w2", esn("12", 0)),
            Entry::Shutdown {
                instance: 2,
                reason: ShutdownReason::Terminate,
            },
            checkpointed("p", "w2", ExtendedSequenceNumber::SHARD_END),
            taken("c", "w2"),
            init(3, "w2", "c", ExtendedSequenceNumber::TRIM_HORIZON),
            delivered(3, vec![delivery("20", "k", 3)]),
            Entry::Released {
                key: "p".to_owned(),
            },
            Entry::Deleted {
                key: "p".to_owned(),
            },
        ]
    }

    #[test]
    fn a_clean_history_has_no_violations() {
        assert_eq!(check(clean()), Vec::<String>::new());
    }

    fn expect_violation(entries: Vec<Entry>, needle: &str) {
        let violations = check(entries);
        assert!(
            violations.iter().any(|v| v.contains(needle)),
            "expected a violation containing {needle:?}, got {violations:?}"
        );
    }

    #[test]
    fn per_key_order_is_checked() {
        let mut e = clean();
        e[4] = delivered(1, vec![delivery("10", "k", 1), delivery("11", "k", 0)]);
        expect_violation(e, "per-key order broken");
    }

    #[test]
    fn a_checkpoint_going_backwards_is_caught() {
        let mut e = clean();
        e[9] = checkpointed("p", "w2", esn("9", 0));
        expect_violation(e, "went backwards");
    }

    #[test]
    fn a_checkpoint_by_a_worker_that_lost_the_lease_is_caught() {
        let mut e = clean();
        e.insert(7, checkpointed("p", "w1", esn("11", 0)));
        expect_violation(e, "while the lease belonged to Some(\"w2\")");
    }

    #[test]
    fn a_checkpoint_after_zombie_is_caught() {
        let mut e = clean();
        e.insert(
            6,
            Entry::Shutdown {
                instance: 1,
                reason: ShutdownReason::Zombie,
            },
        );
        e.insert(7, checkpointed("p", "w1", esn("11", 0)));
        expect_violation(e, "after its processor was told Zombie");
    }

    #[test]
    fn a_child_started_before_its_parent_finished_is_caught() {
        let mut e = clean();
        let child = e.drain(12..15).collect::<Vec<_>>();
        for (i, entry) in child.into_iter().enumerate() {
            e.insert(10 + i, entry);
        }
        expect_violation(e, "before its parent p checkpointed SHARD_END");
    }

    #[test]
    fn a_redelivery_of_checkpointed_records_is_caught() {
        let mut e = clean();
        // w2 starts from the right checkpoint but delivers 10, which w1 had checkpointed.
        e[8] = delivered(2, vec![delivery("10", "k", 0)]);
        expect_violation(e, "at or below the checkpoint");
        let mut e = clean();
        // w2 starts from an old checkpoint.
        e[7] = init(2, "w2", "p", ExtendedSequenceNumber::TRIM_HORIZON);
        e[8] = delivered(2, vec![delivery("10", "k", 0)]);
        let violations = check(e);
        for needle in ["but the lease's checkpoint was 10", "had checkpointed 10"] {
            assert!(
                violations.iter().any(|v| v.contains(needle)),
                "{needle}: {violations:?}"
            );
        }
    }

    #[test]
    fn lease_table_misuse_is_caught() {
        let mut e = clean();
        e.insert(
            11,
            Entry::Deleted {
                key: "p".to_owned(),
            },
        );
        expect_violation(e, "deleted before SHARD_END");
        let mut e = clean();
        e.push(taken("p", "w3"));
        expect_violation(e, "after it was finished");
        let mut e = clean();
        e.push(created("p"));
        expect_violation(e, "created again after cleanup");
    }

    #[test]
    fn a_second_shutdown_is_caught_but_a_terminate_retry_is_not() {
        let mut e = clean();
        e.insert(
            11,
            Entry::Shutdown {
                instance: 2,
                reason: ShutdownReason::Terminate,
            },
        );
        assert_eq!(check(e), Vec::<String>::new());
        let mut e = clean();
        e.push(Entry::Shutdown {
            instance: 3,
            reason: ShutdownReason::Requested,
        });
        e.push(Entry::Shutdown {
            instance: 3,
            reason: ShutdownReason::Zombie,
        });
        expect_violation(e, "shut down twice");
    }

    #[test]
    fn payloads_round_trip() {
        assert_eq!(
            parse_payload(&payload("key-007", 42)),
            Some(("key-007".to_owned(), 42))
        );
        assert_eq!(parse_payload(b"no counter"), None);
    }

    #[test]
    fn a_failure_names_the_seed_and_the_replay_command() {
        let f = SimulationFailure {
            seed: 42,
            violations: vec!["something".to_owned()],
            fault_log: Vec::new(),
        };
        let text = f.to_string();
        assert!(text.contains("seed 42"), "{text}");
        assert!(
            text.contains("KCL_SEED=42 cargo test -p kcl-testkit --test simulation replay"),
            "{text}"
        );
        assert!(text.contains("something"), "{text}");
    }
}
