//! Measures what lease coordination costs in table calls at steady state, in the 2.x
//! protocol (every worker's taker scans the lease table) and the 3.x protocol (a leader
//! lists and assigns; followers query the lease owner index for their own leases).
//!
//! Every run shares its leases between coordinators on an in-memory lease store, with a
//! manual clock and the default failover time of 10 s. After a two-minute warm-up (initial
//! takes or assignments and balancing, not counted) it runs ten simulated minutes and
//! counts the table traffic per lease and minute:
//!
//! * lease-table writes = every conditional write sent to the lease table (renewals, takes,
//!   the leader's assignments and handoffs, releases, checkpoints; a write whose condition
//!   fails counts too, as DynamoDB bills it);
//! * lease-table reads = items read: every item returned by a `list_leases` scan counts as
//!   one read (a scan page of N items is N reads), every `get_lease` as one, and every
//!   entry returned by the lease owner index query (`lease_keys_of_owner`) as one
//!   (DynamoDB bills a query by the size it returns, at least one read unit per query, so
//!   the number of queries is printed too: one per worker and discovery interval);
//! * state tables (3.x only), apart: WorkerMetricStats row writes, the leader's scans of
//!   those rows (in items returned), and the reads and writes of the `CoordinatorState`
//!   items (the `Leader` lock; `Migration3.0` is read only at start, in the warm-up).
//!
//! Runs:
//!
//! 1. the 2.x baseline: 4 workers, 40 leases, once with a checkpoint of every held lease
//!    every 10 s (as a consumer might; renewals are skipped right after a checkpoint, so
//!    the total stays at about the renewal-only figure) and once with renewals only;
//! 2. a worker-count sweep (4, 16, 64 workers) with 10 leases per worker, in 2.x and in
//!    3.x (utilisation fixed at 50 %);
//! 3. the same sweep with 40 leases whatever the number of workers.
//!
//! The last line is `writes_per_lease_minute=X reads_per_lease_minute=Y` for the 2.x
//! baseline with renewals only. Run with
//! `cargo run --release -q -p kcl-lease --example lease-cost`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig};
use kcl_lease::test_util::ManualClock;
use kcl_lease::test_util::lease_store::{InMemoryLeaseStore, LeaseOperation};
use kcl_lease::v3::item::{Condition, Item};
use kcl_lease::v3::migration::ClientVersionConfig;
use kcl_lease::v3::runtime::{FixedUtilisation, ProtocolConfig, ProtocolHandle, ProtocolRuntime};
use kcl_lease::v3::table::{StateTable, StateTables, Update};
use kcl_lease::{BillingMode, Clock, Lease, LeaseError, LeaseStore, SeededRandom};

const BASELINE_WORKERS: usize = 4;
const BASELINE_LEASES: usize = 40;
const SWEEP_WORKERS: [usize; 3] = [4, 16, 64];
const LEASES_PER_WORKER: usize = 10;
const FAILOVER: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(120);
const MEASURED_MINUTES: u64 = 10;
/// The utilisation every 3.x worker reports.
const UTILISATION_PERCENT: f64 = 50.0;

/// Counts of the calls to one state table.
#[derive(Debug, Default)]
struct StateCounts {
    /// `get` calls (one item read each, found or not).
    gets: AtomicU64,
    /// `scan` calls.
    scans: AtomicU64,
    /// Items returned by scans.
    scan_items: AtomicU64,
    /// `put`, `update` and `delete` calls (failed conditions included).
    writes: AtomicU64,
}

impl StateCounts {
    fn reset(&self) {
        for counter in [&self.gets, &self.scans, &self.scan_items, &self.writes] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// A state table that counts calls and items; delegates everything.
#[derive(Debug)]
struct CountingStateTable {
    inner: Arc<dyn StateTable>,
    counts: Arc<StateCounts>,
}

#[async_trait]
impl StateTable for CountingStateTable {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }
    fn key_attribute(&self) -> &str {
        self.inner.key_attribute()
    }
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }
    async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError> {
        self.counts.gets.fetch_add(1, Ordering::Relaxed);
        self.inner.get(key).await
    }
    async fn scan(&self) -> Result<Vec<Item>, LeaseError> {
        self.counts.scans.fetch_add(1, Ordering::Relaxed);
        let items = self.inner.scan().await?;
        self.counts
            .scan_items
            .fetch_add(items.len() as u64, Ordering::Relaxed);
        Ok(items)
    }
    async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.put(item, condition).await
    }
    async fn update(
        &self,
        key: &str,
        update: &Update,
        condition: &Condition,
    ) -> Result<(), LeaseError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.update(key, update, condition).await
    }
    async fn delete(&self, key: &str, condition: &Condition) -> Result<(), LeaseError> {
        self.counts.writes.fetch_add(1, Ordering::Relaxed);
        self.inner.delete(key, condition).await
    }
}

/// Counts lease-table items read; delegates everything, the 3.x methods included (a
/// wrapper that did not forward them would make its workers run 2.x), and hands out
/// counting wrappers of the inner store's state tables.
#[derive(Debug)]
struct ItemCountingStore {
    inner: Arc<InMemoryLeaseStore>,
    /// Items returned by `list_leases`.
    scan_items: AtomicU64,
    /// `get_lease` calls.
    get_items: AtomicU64,
    /// Entries returned by the lease owner index query.
    index_entries: AtomicU64,
    /// Lease owner index queries.
    index_queries: AtomicU64,
    state_tables: Option<StateTables>,
    coordinator_state: Arc<StateCounts>,
    worker_metrics: Arc<StateCounts>,
}

impl ItemCountingStore {
    fn new(inner: Arc<InMemoryLeaseStore>) -> Self {
        let coordinator_state = Arc::new(StateCounts::default());
        let worker_metrics = Arc::new(StateCounts::default());
        let state_tables = inner.state_tables().map(|tables| StateTables {
            coordinator_state: Arc::new(CountingStateTable {
                inner: tables.coordinator_state,
                counts: Arc::clone(&coordinator_state),
            }),
            worker_metrics: Arc::new(CountingStateTable {
                inner: tables.worker_metrics,
                counts: Arc::clone(&worker_metrics),
            }),
        });
        Self {
            inner,
            scan_items: AtomicU64::new(0),
            get_items: AtomicU64::new(0),
            index_entries: AtomicU64::new(0),
            index_queries: AtomicU64::new(0),
            state_tables,
            coordinator_state,
            worker_metrics,
        }
    }

    fn reset(&self) {
        for counter in [
            &self.scan_items,
            &self.get_items,
            &self.index_entries,
            &self.index_queries,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
        self.coordinator_state.reset();
        self.worker_metrics.reset();
        self.inner.reset_stats();
    }
}

#[async_trait]
impl LeaseStore for ItemCountingStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }
    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.inner.table_exists().await
    }
    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.inner.create_lease_if_not_exists(lease).await
    }
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        let leases = self.inner.list_leases().await?;
        self.scan_items
            .fetch_add(leases.len() as u64, Ordering::Relaxed);
        Ok(leases)
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.get_items.fetch_add(1, Ordering::Relaxed);
        self.inner.get_lease(lease_key).await
    }
    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError> {
        self.inner.renew_lease(lease, throughput_kbps).await
    }
    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        self.inner.take_lease(lease, new_owner).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.inner.release_lease(lease).await
    }
    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        self.inner.initiate_handoff(lease, next_owner).await
    }
    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.inner.complete_handoff(lease).await
    }
    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_checkpoint(lease, checkpoint).await
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
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_child_shard_ids(lease, children).await
    }
    async fn reset_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.inner.reset_checkpoint(lease, checkpoint).await
    }
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(lease).await
    }
    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.inner.client_version().await
    }
    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        let keys = self.inner.lease_keys_of_owner(owner).await?;
        self.index_queries.fetch_add(1, Ordering::Relaxed);
        self.index_entries
            .fetch_add(keys.len() as u64, Ordering::Relaxed);
        Ok(keys)
    }
    async fn lease_owner_index_active(&self) -> Result<bool, LeaseError> {
        self.inner.lease_owner_index_active().await
    }
    fn state_tables(&self) -> Option<StateTables> {
        self.state_tables.clone()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Protocol {
    /// Coordinators alone, on a store without state tables: the 2.x taker.
    V2x,
    /// Coordinators with a [`ProtocolRuntime`] in `CLIENT_VERSION_CONFIG_3X`.
    V3x,
}

impl Protocol {
    fn name(self) -> &'static str {
        match self {
            Protocol::V2x => "2.x",
            Protocol::V3x => "3.x",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    protocol: Protocol,
    workers: usize,
    leases: usize,
    checkpoint_every: Option<Duration>,
}

/// Counts over the measured minutes.
#[derive(Debug)]
struct Figures {
    scenario: Scenario,
    lease_writes: u64,
    renewals: u64,
    checkpoints: u64,
    takes: u64,
    handoffs: u64,
    scans: u64,
    scan_items: u64,
    get_items: u64,
    index_queries: u64,
    index_entries: u64,
    row_writes: u64,
    row_scans: u64,
    row_scan_items: u64,
    lock_reads: u64,
    lock_writes: u64,
    /// Leases held per worker at the end, sorted.
    held: Vec<usize>,
    /// Workers holding the leader lock at the end (3.x).
    leaders: usize,
}

impl Figures {
    fn lease_minutes(&self) -> f64 {
        (self.scenario.leases as u64 * MEASURED_MINUTES) as f64
    }
    fn per_lease_minute(&self, count: u64) -> f64 {
        count as f64 / self.lease_minutes()
    }
    fn lease_reads(&self) -> u64 {
        self.scan_items + self.get_items + self.index_entries
    }
    fn writes_per_lease_minute(&self) -> f64 {
        self.per_lease_minute(self.lease_writes)
    }
    fn reads_per_lease_minute(&self) -> f64 {
        self.per_lease_minute(self.lease_reads())
    }
}

fn lease_key(i: usize) -> String {
    format!("shardId-{i:012}")
}

async fn simulate(scenario: Scenario) -> Figures {
    let clock = ManualClock::new();
    let mut inner = InMemoryLeaseStore::new().with_table();
    if scenario.protocol == Protocol::V3x {
        inner = inner.with_state_tables();
    }
    let inner = Arc::new(inner);
    for i in 0..scenario.leases {
        let lease = Lease::new(lease_key(i), ExtendedSequenceNumber::TRIM_HORIZON);
        inner.create_lease_if_not_exists(&lease).await.unwrap();
    }
    let store = Arc::new(ItemCountingStore::new(Arc::clone(&inner)));
    let coordinators: Vec<Arc<LeaseCoordinator>> = (0..scenario.workers)
        .map(|i| {
            LeaseCoordinator::new(
                Arc::clone(&store) as Arc<dyn LeaseStore>,
                LeaseCoordinatorConfig::new(format!("worker-{i}")).with_failover_time(FAILOVER),
                Arc::new(clock.clone()),
                Arc::new(SeededRandom::new(i as u64 + 1)),
            )
            .unwrap()
        })
        .collect();
    let mut runtimes: Vec<ProtocolHandle> = Vec::new();
    if scenario.protocol == Protocol::V3x {
        let tables = store
            .state_tables()
            .expect("the 3.x store has state tables");
        for (i, c) in coordinators.iter().enumerate() {
            // Started before the coordinator's loops, so its taker never runs.
            let handle = ProtocolRuntime::start(
                Arc::clone(c),
                Arc::clone(&store) as Arc<dyn LeaseStore>,
                tables.clone(),
                ProtocolConfig::new(c.worker_id(), FAILOVER, ClientVersionConfig::V3x),
                BillingMode::PayPerRequest,
                Arc::new(clock.clone()),
                Arc::new(SeededRandom::new(1_000 + i as u64)),
                Some(Box::new(FixedUtilisation(UTILISATION_PERCENT))),
            )
            .await
            .unwrap();
            assert!(!c.is_taker_enabled(), "{} runs 2.x", c.worker_id());
            runtimes.push(handle);
        }
    }
    for c in &coordinators {
        c.spawn();
    }
    if let Some(every) = scenario.checkpoint_every {
        for (i, c) in coordinators.iter().enumerate() {
            let (c, clock) = (Arc::clone(c), clock.clone());
            // Each worker checkpoints at its own phase.
            let phase = Duration::from_millis(700 + 2_300 * i as u64);
            tokio::spawn(async move {
                clock.sleep(phase).await;
                let mut n: u64 = 0;
                loop {
                    clock.sleep(every).await;
                    n += 1;
                    let esn = ExtendedSequenceNumber::parse(&n.to_string(), 0).unwrap();
                    for key in c.held_keys() {
                        if let Some(held) = c.holding(&key) {
                            let _ = held.checkpoint(&esn).await;
                        }
                    }
                }
            });
        }
    }

    clock.advance_and_settle(WARM_UP).await;
    store.reset();
    let handoffs_before: u64 = runtimes
        .iter()
        .map(|r| r.stats().handoffs.load(Ordering::Relaxed))
        .sum();
    clock
        .advance_and_settle(Duration::from_secs(60 * MEASURED_MINUTES))
        .await;

    let stats = inner.stats();
    // The wrapper and the store count the index entries alike.
    assert_eq!(
        stats.operation(LeaseOperation::QueryOwnerIndex).reads,
        store.index_entries.load(Ordering::Relaxed)
    );
    let mut held: Vec<usize> = coordinators.iter().map(|c| c.held_leases().len()).collect();
    held.sort_unstable();
    let leaders = runtimes.iter().filter(|r| r.is_leader()).count();
    let handoffs = runtimes
        .iter()
        .map(|r| r.stats().handoffs.load(Ordering::Relaxed))
        .sum::<u64>()
        - handoffs_before;
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    let figures = Figures {
        scenario,
        lease_writes: stats.total_writes(),
        renewals: stats.operation(LeaseOperation::RenewLease).writes,
        checkpoints: stats.operation(LeaseOperation::UpdateCheckpoint).writes,
        takes: stats.operation(LeaseOperation::TakeLease).writes,
        handoffs,
        scans: stats.operation(LeaseOperation::ListLeases).calls,
        scan_items: load(&store.scan_items),
        get_items: load(&store.get_items),
        index_queries: load(&store.index_queries),
        index_entries: load(&store.index_entries),
        row_writes: load(&store.worker_metrics.writes),
        row_scans: load(&store.worker_metrics.scans),
        row_scan_items: load(&store.worker_metrics.scan_items),
        lock_reads: load(&store.coordinator_state.gets) + load(&store.coordinator_state.scan_items),
        lock_writes: load(&store.coordinator_state.writes),
        held,
        leaders,
    };
    for r in &runtimes {
        r.stop().await;
    }
    for c in &coordinators {
        c.stop().await;
    }
    figures
}

fn print_header() {
    println!(
        "{:<8} {:>7} {:>6} | {:>8} {:>8} {:>8} {:>7} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>9} {:>7}",
        "protocol",
        "workers",
        "leases",
        "lt_write",
        "lt_read",
        "scan",
        "get",
        "index",
        "row_wr",
        "row_scan",
        "lock_rd",
        "lock_wr",
        "per_wkr",
        "leaders",
    );
}

fn print_row(f: &Figures) {
    let p = |count: u64| f.per_lease_minute(count);
    let (min, max) = (f.held[0], f.held[f.held.len() - 1]);
    let leaders = match f.scenario.protocol {
        Protocol::V2x => "-".to_owned(),
        Protocol::V3x => f.leaders.to_string(),
    };
    println!(
        "{:<8} {:>7} {:>6} | {:>8.2} {:>8.2} {:>8.2} {:>7.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>9} {:>7}",
        f.scenario.protocol.name(),
        f.scenario.workers,
        f.scenario.leases,
        f.writes_per_lease_minute(),
        f.reads_per_lease_minute(),
        p(f.scan_items),
        p(f.get_items),
        p(f.index_entries),
        p(f.row_writes),
        p(f.row_scan_items),
        p(f.lock_reads),
        p(f.lock_writes),
        format!("{min}..{max}"),
        leaders,
    );
}

fn print_calls(f: &Figures) {
    let minutes = MEASURED_MINUTES as f64;
    println!(
        "  {} W={} L={}: per minute: lease scans {:.1}, index queries {:.1}, row scans {:.1}; \
         in 10 min: renewals {}, takes/assignments {}, handoffs {}",
        f.scenario.protocol.name(),
        f.scenario.workers,
        f.scenario.leases,
        f.scans as f64 / minutes,
        f.index_queries as f64 / minutes,
        f.row_scans as f64 / minutes,
        f.renewals,
        f.takes,
        f.handoffs,
    );
}

async fn sweep(title: &str, leases_of: impl Fn(usize) -> usize) -> Vec<Figures> {
    println!();
    println!("{title}");
    print_header();
    let mut all = Vec::new();
    for protocol in [Protocol::V2x, Protocol::V3x] {
        for workers in SWEEP_WORKERS {
            let figures = simulate(Scenario {
                protocol,
                workers,
                leases: leases_of(workers),
                checkpoint_every: None,
            })
            .await;
            print_row(&figures);
            all.push(figures);
        }
    }
    for f in &all {
        print_calls(f);
    }
    all
}

/// max / min of the lease-table reads per lease-minute across a sweep of one protocol.
fn growth(figures: &[Figures], protocol: Protocol) -> f64 {
    let reads: Vec<f64> = figures
        .iter()
        .filter(|f| f.scenario.protocol == protocol)
        .map(Figures::reads_per_lease_minute)
        .collect();
    let max = reads.iter().copied().fold(f64::MIN, f64::max);
    let min = reads.iter().copied().fold(f64::MAX, f64::min);
    max / min
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!(
        "{BASELINE_WORKERS} coordinators, {BASELINE_LEASES} leases, failover {FAILOVER:?}, \
         {MEASURED_MINUTES} simulated minutes after a {WARM_UP:?} warm-up"
    );
    let baseline = |checkpoint_every| Scenario {
        protocol: Protocol::V2x,
        workers: BASELINE_WORKERS,
        leases: BASELINE_LEASES,
        checkpoint_every,
    };

    let with_checkpoints = simulate(baseline(Some(Duration::from_secs(10)))).await;
    println!(
        "with a checkpoint per lease every 10 s: writes/lease-min {:.2} \
         (renewals {:.2} + checkpoints {:.2})",
        with_checkpoints.writes_per_lease_minute(),
        with_checkpoints.per_lease_minute(with_checkpoints.renewals),
        with_checkpoints.per_lease_minute(with_checkpoints.checkpoints),
    );

    let idle = simulate(baseline(None)).await;
    println!(
        "renewals only: leases per worker {:?}, takes {}, table scans {} ({:.1} per worker-minute)",
        idle.held,
        idle.takes,
        idle.scans,
        idle.scans as f64 / (BASELINE_WORKERS as u64 * MEASURED_MINUTES) as f64,
    );

    println!();
    println!(
        "Per lease-minute. lt_write: lease-table writes; lt_read: lease-table item reads = \
         scan (items returned by list_leases) + get (GetItem) + index (lease owner index \
         entries returned). State tables (3.x): row_wr: WorkerMetricStats row writes; \
         row_scan: rows returned by the leader's scans; lock_rd/lock_wr: CoordinatorState \
         item reads/writes (the Leader lock). per_wkr: leases held per worker at the end \
         (min..max). 3.x workers report {UTILISATION_PERCENT} % CPU."
    );
    let per_worker = sweep(
        &format!("worker-count sweep, {LEASES_PER_WORKER} leases per worker"),
        |workers| workers * LEASES_PER_WORKER,
    )
    .await;
    let fixed = sweep(
        &format!("worker-count sweep, {BASELINE_LEASES} leases"),
        |_| BASELINE_LEASES,
    )
    .await;
    println!();
    println!(
        "lease-table reads/lease-min, largest over smallest of the sweep: \
         {LEASES_PER_WORKER} leases per worker: 2.x {:.2}x, 3.x {:.2}x; \
         {BASELINE_LEASES} leases: 2.x {:.2}x, 3.x {:.2}x",
        growth(&per_worker, Protocol::V2x),
        growth(&per_worker, Protocol::V3x),
        growth(&fixed, Protocol::V2x),
        growth(&fixed, Protocol::V3x),
    );

    println!(
        "writes_per_lease_minute={:.2} reads_per_lease_minute={:.2}",
        idle.writes_per_lease_minute(),
        idle.reads_per_lease_minute()
    );
}
