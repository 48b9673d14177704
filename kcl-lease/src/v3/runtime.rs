//! The KCL 3.x protocol at run time: what a worker runs beside its [`LeaseCoordinator`]
//! once the application has state tables ([`crate::LeaseStore::state_tables`]).
//!
//! [`ProtocolRuntime::start`] reads (or creates) the `Migration3.0` item and runs the
//! client version stored there ([`migration::initialize`]), then spawns these tasks, each
//! sleeping on the injected [`Clock`]:
//!
//! * **mode**: the coordinator's taker runs in the 2.x versions and sleeps in the 3.x ones
//!   ([`LeaseCoordinator::set_taker_enabled`]); every other task follows the version.
//! * **reporter** (versions that write WorkerMetricStats: all but `CLIENT_VERSION_2X`):
//!   samples utilisation every [`ProtocolConfig::sample_interval`] and writes this worker's
//!   row every [`ProtocolConfig::report_interval`] (half the failover time; the Java KCL's
//!   is 30 s), with its interval in `ri` so a leader of ours knows when it is stale. The first row is
//!   written after the first good sample (about one sample interval after start), not 30 s
//!   later, so a leader can give the worker leases at once.
//! * **leader lock** (3.x versions): [`run_leader_lock`] on the `Leader` item; released on
//!   a graceful stop and when the version leaves 3.x.
//! * **assignment** (while this worker holds the lock): lists the leases and the rows,
//!   plans ([`assignment::plan`]) and writes the moves: an unassigned or expired lease is
//!   taken for its new owner ([`crate::LeaseStore::take_lease`], fenced on the counter and
//!   both owners as listed, which is stricter than the Java leader's fence on the owners
//!   alone), a balancing move of a held lease is a graceful handoff
//!   ([`crate::LeaseStore::initiate_handoff`]). The first run comes
//!   [`ProtocolConfig::first_assignment_delay`] after winning the lock (workers that started
//!   together have written their rows by then), later ones every
//!   [`ProtocolConfig::assignment_interval`]; balancing every third run, as the Java KCL.
//!   Rows older than a day are deleted, conditionally on their `lut`.
//! * **discovery** (3.x versions): [`LeaseCoordinator::discover_assigned`] every
//!   [`ProtocolConfig::discovery_interval`]: a lease assigned to this worker is held and
//!   renewed within that interval.
//! * **migration monitor** (versions that follow changes: all but `CLIENT_VERSION_3X`):
//!   reads `Migration3.0` every [`ProtocolConfig::change_monitor_interval`] (first after
//!   60-90 s, as the Java KCL) and moves as [`migration::on_observed_change`] says. In
//!   `CLIENT_VERSION_UPGRADE_FROM_2X` the 2.x leader ([`election::is_2x_leader`]) checks
//!   every [`ProtocolConfig::readiness_interval`] that the lease owner index is active and
//!   every lease owner has a fresh row; after [`ProtocolConfig::flip_stabilization`] of
//!   that it writes `CLIENT_VERSION_3X_WITH_ROLLBACK`, exactly as a Java worker.
//!
//! The state is shared through [`ProtocolHandle`]: the version run now, whether this
//! worker leads, and counters for tests and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::assignment::{self, AssignmentConfig, LeaseHistory, MoveKind};
use super::election;
use super::lock::{LeaderLock, LeaderLockConfig, run_leader_lock};
use super::migration::{
    self, Change, ClientVersion, ClientVersionConfig, MigrationState, UpgradeStabilizer,
};
use super::table::{StateTables, bounded};
use super::worker_metrics::{self, MetricStatsRecorder};
use crate::coordinator::LeaseCoordinator;
use crate::{BillingMode, Clock, LeaseError, LeaseStore, RandomSource};

/// A source of CPU utilisation samples (percent, 0..=100) for the WorkerMetricStats row.
pub trait UtilisationSource: Send + std::fmt::Debug {
    /// A sample at `now`; `None` when there is none yet (the first sample of a rate).
    fn sample(&mut self, now: std::time::Instant) -> Option<f64>;
}

impl UtilisationSource for super::utilisation::CpuSampler {
    fn sample(&mut self, now: std::time::Instant) -> Option<f64> {
        match super::utilisation::CpuSampler::sample(self, now) {
            Ok(value) => value,
            Err(err) => {
                tracing::debug!(error = %err, "CPU utilisation sample failed");
                None
            }
        }
    }
}

/// A fixed utilisation, for tests and simulations.
#[derive(Clone, Debug)]
pub struct FixedUtilisation(pub f64);

impl UtilisationSource for FixedUtilisation {
    fn sample(&mut self, _now: std::time::Instant) -> Option<f64> {
        Some(self.0)
    }
}

/// The settings of the 3.x protocol for one worker (Java names in brackets where they
/// exist).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProtocolConfig {
    /// [`ClientVersionConfig`] (`clientVersionConfig`).
    pub client_version: ClientVersionConfig,
    /// The failover time (`failoverTimeMillis`): leases and the defaults below.
    pub failover_time: Duration,
    /// How often the leader assigns (`leaseAssignmentIntervalMillis`; Java: 2 × failover
    /// time). Default: half the failover time.
    pub assignment_interval: Duration,
    /// The leader's first run after winning the lock. Default: a fifth of the failover
    /// time.
    pub first_assignment_delay: Duration,
    /// How often a follower looks for leases assigned to it (Java: about the failover
    /// time). Default: a third of the failover time (each query reads the worker's own
    /// index entries: about 3 item reads per lease and minute at the default).
    pub discovery_interval: Duration,
    /// How often the row is written (`workerMetricsReporterFreqInMillis`; Java: 30 s).
    /// Default: half the failover time. The row says so (attribute `ri`), and a leader of
    /// ours judges it stale after two of these; a Java leader after two times 30 s.
    pub report_interval: Duration,
    /// How often utilisation is sampled (1 s).
    pub sample_interval: Duration,
    /// How often `Migration3.0` is read while following changes (60 s).
    pub change_monitor_interval: Duration,
    /// How often the 2.x leader checks readiness for 3.x (60 s).
    pub readiness_interval: Duration,
    /// How long readiness must hold before the flip (10 minutes).
    pub flip_stabilization: Duration,
    /// How old a row may be before the leader deletes it (one day).
    pub stale_row_age: Duration,
    /// The bound on every call.
    pub call_timeout: Duration,
    /// The leader lock.
    pub lock: LeaderLockConfig,
    /// The planner.
    pub assignment: AssignmentConfig,
}

impl ProtocolConfig {
    /// The defaults for `worker_id` at `failover_time` (see each field).
    pub fn new(
        worker_id: &str,
        failover_time: Duration,
        client_version: ClientVersionConfig,
    ) -> Self {
        let mut assignment = AssignmentConfig::for_failover_time(failover_time);
        // A just-assigned lease stays unexpired for a discovery interval and a renewal
        // more: its assignee is about to pick it up. A Java assignee discovers about every
        // failover time: the planner's default grace (one failover time) covers it.
        assignment.pickup_grace = assignment.pickup_grace.max(failover_time / 3 * 2);
        Self {
            client_version,
            failover_time,
            assignment_interval: failover_time / 2,
            first_assignment_delay: failover_time / 5,
            discovery_interval: failover_time / 3,
            report_interval: failover_time / 2,
            sample_interval: Duration::from_secs(1),
            change_monitor_interval: migration::CHANGE_MONITOR_INTERVAL,
            readiness_interval: migration::READINESS_MONITOR_INTERVAL,
            flip_stabilization: migration::FLIP_STABILIZATION,
            stale_row_age: Duration::from_secs(24 * 3600),
            call_timeout: crate::timeouts::DEFAULT_CALL_TIMEOUT.min(failover_time / 3),
            lock: LeaderLockConfig::for_failover_time(worker_id, failover_time),
            assignment,
        }
    }

    /// Checks the settings; the error names the option.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let positive = [
            ("lease_assignment_interval", self.assignment_interval),
            ("lease_discovery_interval", self.discovery_interval),
            ("worker_metrics_reporter_freq", self.report_interval),
            ("worker_metrics_sample_interval", self.sample_interval),
            (
                "client_version_change_monitor_interval",
                self.change_monitor_interval,
            ),
            ("migration_readiness_interval", self.readiness_interval),
            ("call_timeout", self.call_timeout),
        ];
        for (option, value) in positive {
            if value.is_zero() {
                return Err(LeaseError::InvalidConfig {
                    option,
                    reason: "must be positive".to_owned(),
                });
            }
        }
        self.lock.validate()?;
        self.assignment.validate()
    }
}

/// Counters of what the runtime did, for tests, benchmarks and logs.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ProtocolStats {
    /// Rows written.
    pub rows_written: AtomicU64,
    /// Assignment runs made as leader.
    pub assignment_runs: AtomicU64,
    /// Leases assigned (direct writes) that succeeded.
    pub assigned: AtomicU64,
    /// Graceful handoffs initiated by the leader.
    pub handoffs: AtomicU64,
    /// Assignment writes whose condition failed.
    pub conflicts: AtomicU64,
    /// Discoveries run.
    pub discoveries: AtomicU64,
    /// Leases adopted through discovery.
    pub adopted: AtomicU64,
    /// Client version changes followed.
    pub version_changes: AtomicU64,
}

struct Shared {
    coordinator: Arc<LeaseCoordinator>,
    store: Arc<dyn LeaseStore>,
    tables: StateTables,
    config: ProtocolConfig,
    clock: Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    version: watch::Sender<ClientVersion>,
    leader: watch::Sender<bool>,
    migration: Mutex<MigrationState>,
    stats: ProtocolStats,
}

impl Shared {
    fn worker_id(&self) -> &str {
        self.coordinator.worker_id()
    }

    fn now_secs(&self) -> i64 {
        epoch_secs(self.clock.system_time())
    }

    fn now_ms(&self) -> i64 {
        self.clock
            .system_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    fn run_version(&self, version: ClientVersion) {
        let protocol = version.protocol();
        self.coordinator
            .set_taker_enabled(protocol.assignment == migration::Assignment::Taker);
        let previous = self.version.send_replace(version);
        if previous != version {
            self.stats.version_changes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(worker_id = %self.worker_id(), from = %previous, to = %version, "client version changed");
        }
    }

    fn is_3x(&self) -> bool {
        is_3x(*self.version.borrow())
    }
}

fn is_3x(version: ClientVersion) -> bool {
    version.protocol().assignment == migration::Assignment::Leader
}

fn epoch_secs(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A handle on a running [`ProtocolRuntime`].
pub struct ProtocolHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for ProtocolHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtocolHandle")
            .field("worker_id", &self.shared.worker_id())
            .field("client_version", &self.client_version())
            .field("leader", &self.is_leader())
            .finish_non_exhaustive()
    }
}

impl ProtocolHandle {
    /// The client version this worker runs now.
    pub fn client_version(&self) -> ClientVersion {
        *self.shared.version.borrow()
    }

    /// A receiver of the client version this worker runs.
    pub fn watch_client_version(&self) -> watch::Receiver<ClientVersion> {
        self.shared.version.subscribe()
    }

    /// Whether this worker holds the leader lock (3.x versions).
    pub fn is_leader(&self) -> bool {
        *self.shared.leader.borrow()
    }

    /// A receiver of whether this worker holds the leader lock.
    pub fn watch_leader(&self) -> watch::Receiver<bool> {
        self.shared.leader.subscribe()
    }

    /// What the runtime did so far.
    pub fn stats(&self) -> &ProtocolStats {
        &self.shared.stats
    }

    /// Stops every task and waits for them: the leader lock is released and this worker's
    /// `WorkerMetricStats` row deleted, one bounded call each, side by side. It takes at most
    /// two `call_timeout`s (a call in flight, then those). A worker's graceful shutdown runs
    /// it beside the shutdown of its processors.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Aborts every task without releasing anything (a crash).
    pub fn abort(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            task.abort();
        }
    }
}

impl Drop for ProtocolHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Starts the 3.x protocol machinery for one worker; see the [module documentation](self).
#[derive(Debug)]
pub struct ProtocolRuntime;

impl ProtocolRuntime {
    /// Creates the state tables if missing (`billing`), reads or writes `Migration3.0`,
    /// switches the coordinator's taker for the version found, and spawns the tasks on
    /// the current tokio runtime. `utilisation`: the CPU source for the row (`None`: rows
    /// without metrics, as the Java KCL's `disableWorkerMetrics`; the leader then balances
    /// that worker by throughput alone).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        coordinator: Arc<LeaseCoordinator>,
        store: Arc<dyn LeaseStore>,
        tables: StateTables,
        config: ProtocolConfig,
        billing: BillingMode,
        clock: Arc<dyn Clock>,
        random: Arc<dyn RandomSource>,
        utilisation: Option<Box<dyn UtilisationSource>>,
    ) -> Result<ProtocolHandle, LeaseError> {
        config.validate()?;
        let limit = config.call_timeout;
        // Table creation waits until the table is ACTIVE: bounded by its own poll loop.
        tables
            .coordinator_state
            .create_table_if_not_exists(billing)
            .await?;
        tables
            .worker_metrics
            .create_table_if_not_exists(billing)
            .await?;
        let now_ms = clock
            .system_time()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let (version, state) = migration::initialize(
            &*tables.coordinator_state,
            &*clock,
            limit,
            config.client_version,
            coordinator.worker_id(),
            now_ms,
        )
        .await?;
        tracing::info!(worker_id = %coordinator.worker_id(), client_version = %version, "KCL 3.x protocol: running the stored client version");
        let shared = Arc::new(Shared {
            coordinator,
            store,
            tables,
            config,
            clock,
            random,
            version: watch::Sender::new(version),
            leader: watch::Sender::new(false),
            migration: Mutex::new(state),
            stats: ProtocolStats::default(),
        });
        shared.run_version(version);
        let (stop_tx, stop_rx) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(reporter(shared.clone(), utilisation, stop_rx.clone())),
            tokio::spawn(lock_task(shared.clone(), stop_rx.clone())),
            tokio::spawn(assignment_task(shared.clone(), stop_rx.clone())),
            tokio::spawn(discovery_task(shared.clone(), stop_rx.clone())),
            tokio::spawn(migration_task(shared.clone(), stop_rx)),
        ];
        Ok(ProtocolHandle {
            shared,
            stop: stop_tx,
            tasks: Mutex::new(tasks),
        })
    }
}

/// Sleeps `duration` on the clock; true when stopped first.
async fn sleep_or_stop(
    clock: &dyn Clock,
    duration: Duration,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = clock.sleep(duration) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// Waits until `pred(version)` holds; false when stopped first.
async fn wait_for_version(
    shared: &Shared,
    pred: impl Fn(ClientVersion) -> bool,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut version = shared.version.subscribe();
    loop {
        if *stop.borrow() {
            return false;
        }
        if pred(*version.borrow_and_update()) {
            return true;
        }
        tokio::select! {
            changed = version.changed() => if changed.is_err() { return false; },
            _ = stop.changed() => return false,
        }
    }
}

async fn reporter(
    shared: Arc<Shared>,
    mut source: Option<Box<dyn UtilisationSource>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut recorder = if source.is_some() {
        MetricStatsRecorder::cpu()
    } else {
        MetricStatsRecorder::new(Vec::<(String, i64)>::new(), 1)
    };
    let config = &shared.config;
    let mut samples = 0u64;
    let mut last_report: Option<std::time::Instant> = None;
    loop {
        if !wait_for_version(&shared, |v| v.protocol().writes_worker_metrics, &mut stop).await {
            break;
        }
        let now = shared.clock.now();
        if let Some(value) = source.as_mut().and_then(|s| s.sample(now)) {
            recorder.record(worker_metrics::metric::CPU, value);
            samples += 1;
        }
        // The first row once a sample exists (or at once without metrics), then every
        // report interval.
        let due = match last_report {
            None => source.is_none() || samples > 0,
            Some(at) => now.saturating_duration_since(at) >= config.report_interval,
        };
        if due {
            let mut row = recorder.report(shared.worker_id(), shared.now_secs());
            row.report_interval_ms =
                Some(u64::try_from(config.report_interval.as_millis()).unwrap_or(u64::MAX));
            match worker_metrics::write_row(
                &*shared.tables.worker_metrics,
                &*shared.clock,
                config.call_timeout,
                &row,
            )
            .await
            {
                Ok(()) => {
                    shared.stats.rows_written.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => tracing::warn!(
                    worker_id = %shared.worker_id(),
                    error = %crate::ErrorChain(&err),
                    "writing the WorkerMetricStats row failed; next report as planned"
                ),
            }
            last_report = Some(now);
        }
        let wait = if source.is_some() {
            config.sample_interval
        } else {
            config.report_interval
        };
        if sleep_or_stop(&*shared.clock, wait, &mut stop).await {
            break;
        }
    }
    // Stopped: our row goes too, so a leader does not give leases to a worker that left
    // (the Java KCL leaves the row, and its leader keeps assigning to a stopped worker for
    // up to a minute). One bounded call, made beside the lock's release, and only when a
    // row was written (a 2.x-compatible worker never writes one); a failure leaves the row
    // to age out.
    if last_report.is_some() {
        let delete = shared
            .tables
            .worker_metrics
            .delete(shared.worker_id(), &super::item::Condition::Always);
        if let Err(err) = bounded(&*shared.clock, config.call_timeout, "delete", delete).await {
            tracing::debug!(error = %crate::ErrorChain(&err), "could not delete our WorkerMetricStats row");
        }
    }
}

async fn lock_task(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        if !wait_for_version(&shared, is_3x, &mut stop).await {
            return;
        }
        let lock = match LeaderLock::new(
            shared.tables.coordinator_state.clone(),
            shared.config.lock.clone(),
            shared.clock.clone(),
            shared.random.clone(),
        ) {
            Ok(lock) => lock,
            Err(err) => {
                tracing::error!(error = %crate::ErrorChain(&err), "leader lock not started");
                return;
            }
        };
        // Runs until stopped or the version leaves 3.x; then releases the lock.
        let (mode_stop_tx, mode_stop_rx) = watch::channel(false);
        let watcher = {
            let shared = shared.clone();
            let mut stop = stop.clone();
            async move {
                let _ = wait_for_version(&shared, |v| !is_3x(v), &mut stop).await;
                let _ = mode_stop_tx.send(true);
            }
        };
        let ((), _lock) = tokio::join!(
            watcher,
            run_leader_lock(lock, mode_stop_rx, shared.leader.clone())
        );
        shared.leader.send_replace(false);
    }
}

async fn assignment_task(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut leader = shared.leader.subscribe();
    loop {
        // Wait to become the leader.
        loop {
            if *stop.borrow() {
                return;
            }
            if *leader.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = leader.changed() => if changed.is_err() { return; },
                _ = stop.changed() => return,
            }
        }
        tracing::info!(worker_id = %shared.worker_id(), "elected leader: running lease assignment");
        // A new leader has no memory of the leases (by design: see the planner).
        let mut history = LeaseHistory::new();
        let mut runs = 0u64;
        let mut wait = shared.config.first_assignment_delay;
        loop {
            if sleep_or_stop(&*shared.clock, wait, &mut stop).await {
                return;
            }
            if !*shared.leader.borrow() || !shared.is_3x() {
                break;
            }
            let started = shared.clock.now();
            if let Err(err) = assignment_run(&shared, &mut history, runs % 3 == 2, &stop).await {
                tracing::warn!(
                    worker_id = %shared.worker_id(),
                    error = %crate::ErrorChain(&err),
                    "lease assignment run failed; next run as planned"
                );
            }
            runs += 1;
            let took = shared.clock.now().saturating_duration_since(started);
            wait = shared.config.assignment_interval.saturating_sub(took);
        }
    }
}

/// One assignment run of the leader.
async fn assignment_run(
    shared: &Shared,
    history: &mut LeaseHistory,
    balance: bool,
    stop: &watch::Receiver<bool>,
) -> Result<(), LeaseError> {
    let limit = shared.config.call_timeout;
    let clock = &*shared.clock;
    let leases = bounded(clock, limit, "list_leases", shared.store.list_leases()).await?;
    let scan = worker_metrics::list_rows(&*shared.tables.worker_metrics, clock, limit).await?;
    let now = clock.now();
    let now_secs = shared.now_secs();
    history.observe(&leases, now);
    // A worker that let a lease expire is dead or cut off, whatever its row says (a row
    // stays fresh for a minute after a crash): it gets nothing this run.
    let lapsed: std::collections::BTreeSet<&str> = leases
        .iter()
        .filter(|l| !l.is_finished() && l.checkpoint_owner.is_none())
        .filter(|l| history.is_expired(&l.lease_key, &shared.config.assignment, now))
        .filter_map(|l| l.lease_owner.as_deref())
        .collect();
    let rows: Vec<worker_metrics::WorkerMetricStats> = scan
        .rows
        .iter()
        .filter(|r| !lapsed.contains(r.worker_id.as_str()))
        .cloned()
        .collect();
    let plan = assignment::plan(
        &leases,
        &rows,
        history,
        &shared.config.assignment,
        balance,
        now,
        now_secs,
    );
    shared.stats.assignment_runs.fetch_add(1, Ordering::Relaxed);
    for mv in &plan.moves {
        // Stopping: no move from now on (the worker releases its leases once this task
        // ended; a move planned on an older listing is fenced on the counter anyway).
        if *stop.borrow() {
            return Ok(());
        }
        let Some(lease) = leases.iter().find(|l| l.lease_key == mv.lease_key) else {
            continue;
        };
        let result = match mv.kind {
            MoveKind::Assign => {
                bounded(
                    clock,
                    limit,
                    "take_lease",
                    shared.store.take_lease(lease, &mv.to),
                )
                .await
            }
            MoveKind::Handoff => {
                bounded(
                    clock,
                    limit,
                    "initiate_handoff",
                    shared.store.initiate_handoff(lease, &mv.to),
                )
                .await
            }
        };
        match result {
            Ok(written) => {
                history.record(mv, written.lease_counter, clock.now());
                let counter = match mv.kind {
                    MoveKind::Assign => &shared.stats.assigned,
                    _ => &shared.stats.handoffs,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(lease_key = %mv.lease_key, to = %mv.to, kind = ?mv.kind, reason = ?mv.reason, "lease moved by the leader");
            }
            Err(err) if err.is_condition_failed() => {
                shared.stats.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(LeaseError::Unsupported { .. }) => {
                // A store without handoff writes: the lease stays with its owner.
            }
            Err(err) => return Err(err),
        }
    }
    if !plan.unplaced.is_empty() {
        tracing::debug!(
            unplaced = plan.unplaced.len(),
            active = plan.active_workers.len(),
            "leases no active worker could take"
        );
    }
    for row in worker_metrics::stale_rows(&scan.rows, now_secs, shared.config.stale_row_age) {
        let _ = worker_metrics::delete_stale_row(&*shared.tables.worker_metrics, clock, limit, row)
            .await;
    }
    Ok(())
}

async fn discovery_task(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        if !wait_for_version(&shared, is_3x, &mut stop).await {
            return;
        }
        match shared.coordinator.discover_assigned().await {
            Ok(report) => {
                shared.stats.discoveries.fetch_add(1, Ordering::Relaxed);
                shared
                    .stats
                    .adopted
                    .fetch_add(report.adopted.len() as u64, Ordering::Relaxed);
            }
            Err(err) => tracing::warn!(
                worker_id = %shared.worker_id(),
                error = %crate::ErrorChain(&err),
                "lease discovery failed; next one as planned"
            ),
        }
        if sleep_or_stop(&*shared.clock, shared.config.discovery_interval, &mut stop).await {
            return;
        }
    }
}

async fn migration_task(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let config = &shared.config;
    let limit = config.call_timeout;
    let mut stabilizer = UpgradeStabilizer::new(config.flip_stabilization);
    // The first read after 60-90 s (jittered as the Java KCL's monitor).
    let jitter = shared.random.jitter(config.change_monitor_interval / 2);
    let mut next_change_check = shared.clock.now() + config.change_monitor_interval + jitter;
    let mut next_readiness = shared.clock.now() + config.readiness_interval;
    loop {
        let version = *shared.version.borrow();
        let protocol = version.protocol();
        if !protocol.follows_changes {
            // CLIENT_VERSION_3X: nothing more to follow.
            return;
        }
        let now = shared.clock.now();
        if now >= next_change_check {
            next_change_check = now + config.change_monitor_interval;
            match migration::read_state(&*shared.tables.coordinator_state, &*shared.clock, limit)
                .await
            {
                Ok(Some(state)) => {
                    match migration::on_observed_change(version, state.client_version) {
                        Change::Move(next) => {
                            *shared
                                .migration
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner) = state;
                            stabilizer = UpgradeStabilizer::new(config.flip_stabilization);
                            shared.run_version(next);
                            continue;
                        }
                        Change::Ignore => tracing::warn!(
                            current = %version, observed = %state.client_version,
                            "client version change not allowed from here; ignored"
                        ),
                        _ => {}
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %crate::ErrorChain(&err), "reading the migration state failed")
                }
            }
        }
        if protocol.checks_upgrade_readiness && now >= next_readiness {
            next_readiness = now + config.readiness_interval;
            if readiness_check(&shared, &mut stabilizer).await == Some(true) {
                continue;
            }
        }
        let due = if protocol.checks_upgrade_readiness {
            next_change_check.min(next_readiness)
        } else {
            next_change_check
        };
        let wait = due.saturating_duration_since(shared.clock.now());
        if sleep_or_stop(&*shared.clock, wait, &mut stop).await {
            return;
        }
    }
}

/// The 2.x leader's readiness check in `CLIENT_VERSION_UPGRADE_FROM_2X`; `Some(true)`
/// when it flipped the application to `CLIENT_VERSION_3X_WITH_ROLLBACK`.
async fn readiness_check(shared: &Shared, stabilizer: &mut UpgradeStabilizer) -> Option<bool> {
    let limit = shared.config.call_timeout;
    let clock = &*shared.clock;
    let leases = bounded(clock, limit, "list_leases", shared.store.list_leases())
        .await
        .ok()?;
    let owners = || leases.iter().map(|l| l.lease_owner.as_deref());
    let is_leader = election::is_2x_leader(shared.worker_id(), owners());
    let gsi = bounded(
        clock,
        limit,
        "lease_owner_index_active",
        shared.store.lease_owner_index_active(),
    )
    .await
    .unwrap_or(false);
    let rows = if is_leader {
        worker_metrics::list_rows(&*shared.tables.worker_metrics, clock, limit)
            .await
            .ok()?
            .rows
    } else {
        Vec::new()
    };
    let ready = is_leader
        && migration::fleet_ready(
            gsi,
            owners(),
            &rows,
            shared.now_secs(),
            migration::READINESS_ROW_EXPIRY,
        );
    if !stabilizer.observe(is_leader, ready, clock.now()) {
        tracing::debug!(is_leader, ready, "migration readiness");
        return Some(false);
    }
    let current = shared
        .migration
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if current.client_version != ClientVersion::UpgradeFrom2x {
        return Some(false);
    }
    let next = current.changed(
        ClientVersion::V3xWithRollback,
        shared.worker_id(),
        shared.now_ms(),
    );
    match migration::write_change(
        &*shared.tables.coordinator_state,
        clock,
        limit,
        &current,
        &next,
    )
    .await
    {
        Ok(true) => {
            tracing::info!(worker_id = %shared.worker_id(), "the fleet is ready: application moved to CLIENT_VERSION_3X_WITH_ROLLBACK");
            *shared
                .migration
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = next;
            shared.run_version(ClientVersion::V3xWithRollback);
            Some(true)
        }
        _ => Some(false),
    }
}
