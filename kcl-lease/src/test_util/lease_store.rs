//! An in-memory [`LeaseStore`] with the semantics of the DynamoDB lease table.
//!
//! [`InMemoryLeaseStore`] makes every write from its description in [`crate::write`], as
//! the DynamoDB store does: it evaluates the write's fence on the stored row and applies the
//! write's change through it, so both stores share one definition of every write. It starts
//! with no table, so code that works against it works against DynamoDB. On top it
//! offers what a test needs:
//!
//! - deterministic fault injection: throttle, fail or hang the next N calls ([`Fault`],
//!   [`FaultKind`]), optionally only for one [`LeaseOperation`] or one lease key; make the
//!   store unreachable (every call fails at once) or hanging (every call started meanwhile
//!   stays pending until dropped, as behind a dead NAT); add latency to every call (slept on
//!   an injected [`Clock`]);
//! - call, read and write counters per operation ([`InMemoryLeaseStore::stats`]), the way
//!   DynamoDB would bill them: every `get_lease` and every page of `list_leases` is a read,
//!   every attempted conditional write is a write (a failed condition consumes a write too),
//!   an injected fault consumes nothing;
//! - [`InMemoryLeaseStore::snapshot`] of every row and [`InMemoryLeaseStore::delete_table`].
//!
//! A `std::sync::Mutex` guards the rows; it is never held across an `await`, so the store is
//! cheap enough for simulations with many workers sharing one `Arc<InMemoryLeaseStore>`.
//!
//! Faults are decided when a call starts, in call order: the hanging switch first, then the
//! unreachable switch, then the first registered fault that matches the call and still has a
//! count left (its count goes down by one). A call matched by none of them runs normally.
//! A hanging call never reaches the table: dropping it (a caller's timeout) leaves no trace
//! but its counts in [`InMemoryLeaseStore::stats`].
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use kcl_kpl::ExtendedSequenceNumber;
//! use kcl_lease::{BillingMode, Lease, LeaseStore};
//! use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
//!
//! let store = InMemoryLeaseStore::new();
//! store.create_table_if_not_exists(BillingMode::PayPerRequest).await?;
//! store
//!     .create_lease_if_not_exists(&Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON))
//!     .await?;
//! let free = store.get_lease("shardId-000000000000").await?.unwrap();
//! let mine = store.take_lease(&free, "worker-1").await?;
//! assert_eq!(mine.lease_counter, 1);
//!
//! store.throttle_next(1);
//! assert!(store.renew_lease(&mine, None).await.unwrap_err().is_retryable());
//! assert_eq!(store.renew_lease(&mine, None).await?.lease_counter, 2);
//! # Ok::<(), kcl_lease::LeaseError>(())
//! # }).unwrap();
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::{BillingMode, Clock, Lease, LeaseError, LeaseStore, LeaseWrite, SystemClock};
use async_trait::async_trait;
use kcl_kpl::ExtendedSequenceNumber;

/// The default number of rows per internal `list_leases` page.
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The default table name (only shown in errors).
pub const DEFAULT_TABLE_NAME: &str = "in-memory-leases";

/// The kinds of calls the store serves, for fault scoping and statistics.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[non_exhaustive]
pub enum LeaseOperation {
    /// [`LeaseStore::create_table_if_not_exists`].
    CreateTable,
    /// [`LeaseStore::table_exists`].
    TableExists,
    /// [`LeaseStore::create_lease_if_not_exists`].
    CreateLease,
    /// [`LeaseStore::list_leases`].
    ListLeases,
    /// [`LeaseStore::get_lease`].
    GetLease,
    /// [`LeaseStore::renew_lease`].
    RenewLease,
    /// [`LeaseStore::take_lease`].
    TakeLease,
    /// [`LeaseStore::release_lease`].
    ReleaseLease,
    /// [`LeaseStore::update_checkpoint`].
    UpdateCheckpoint,
    /// [`LeaseStore::update_pending_checkpoint`].
    UpdatePendingCheckpoint,
    /// [`LeaseStore::update_child_shard_ids`].
    UpdateChildShardIds,
    /// [`LeaseStore::delete_lease`].
    DeleteLease,
    /// [`LeaseStore::client_version`].
    ClientVersion,
    /// [`LeaseStore::reset_checkpoint`].
    ResetCheckpoint,
    /// [`LeaseStore::initiate_handoff`].
    InitiateHandoff,
    /// [`LeaseStore::complete_handoff`].
    CompleteHandoff,
    /// [`LeaseStore::lease_keys_of_owner`] (the lease owner index query; its `reads`
    /// count the index entries returned).
    QueryOwnerIndex,
}

impl LeaseOperation {
    /// Every operation, in declaration order.
    pub const ALL: [LeaseOperation; 17] = [
        LeaseOperation::CreateTable,
        LeaseOperation::TableExists,
        LeaseOperation::CreateLease,
        LeaseOperation::ListLeases,
        LeaseOperation::GetLease,
        LeaseOperation::RenewLease,
        LeaseOperation::TakeLease,
        LeaseOperation::ReleaseLease,
        LeaseOperation::UpdateCheckpoint,
        LeaseOperation::UpdatePendingCheckpoint,
        LeaseOperation::UpdateChildShardIds,
        LeaseOperation::DeleteLease,
        LeaseOperation::ClientVersion,
        LeaseOperation::ResetCheckpoint,
        LeaseOperation::InitiateHandoff,
        LeaseOperation::CompleteHandoff,
        LeaseOperation::QueryOwnerIndex,
    ];

    /// The trait method's name, e.g. `renew_lease`.
    pub fn name(self) -> &'static str {
        match self {
            LeaseOperation::CreateTable => "create_table_if_not_exists",
            LeaseOperation::TableExists => "table_exists",
            LeaseOperation::CreateLease => "create_lease_if_not_exists",
            LeaseOperation::ListLeases => "list_leases",
            LeaseOperation::GetLease => "get_lease",
            LeaseOperation::RenewLease => "renew_lease",
            LeaseOperation::TakeLease => "take_lease",
            LeaseOperation::ReleaseLease => "release_lease",
            LeaseOperation::UpdateCheckpoint => "update_checkpoint",
            LeaseOperation::UpdatePendingCheckpoint => "update_pending_checkpoint",
            LeaseOperation::UpdateChildShardIds => "update_child_shard_ids",
            LeaseOperation::DeleteLease => "delete_lease",
            LeaseOperation::ClientVersion => "client_version",
            LeaseOperation::ResetCheckpoint => "reset_checkpoint",
            LeaseOperation::InitiateHandoff => "initiate_handoff",
            LeaseOperation::CompleteHandoff => "complete_handoff",
            LeaseOperation::QueryOwnerIndex => "lease_keys_of_owner",
        }
    }

    /// True for the conditional writes to a lease row.
    pub fn is_lease_write(self) -> bool {
        matches!(
            self,
            LeaseOperation::CreateLease
                | LeaseOperation::RenewLease
                | LeaseOperation::TakeLease
                | LeaseOperation::ReleaseLease
                | LeaseOperation::UpdateCheckpoint
                | LeaseOperation::UpdatePendingCheckpoint
                | LeaseOperation::UpdateChildShardIds
                | LeaseOperation::DeleteLease
                | LeaseOperation::ResetCheckpoint
                | LeaseOperation::InitiateHandoff
                | LeaseOperation::CompleteHandoff
        )
    }
}

impl fmt::Display for LeaseOperation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an injected fault makes a call return.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum FaultKind {
    /// [`LeaseError::Throttled`].
    Throttle,
    /// [`LeaseError::Service`] (a 500 from the store).
    ServiceError,
    /// [`LeaseError::Unreachable`] (a network failure).
    Unreachable,
    /// No answer at all: the call stays pending until it is dropped (a dead NAT or load
    /// balancer that keeps the connection open). Only a caller's timeout ends it.
    Hang,
}

/// A fault for the next `count` matching calls of the lease store: the shared design of
/// [`super::fault`], with [`FaultKind`] and [`LeaseOperation`]; [`Fault::for_key`] takes a
/// lease key (so `list_leases` and the table calls never match it).
pub type Fault = super::fault::Fault<FaultKind, LeaseOperation>;

/// The cause attached to an injected [`LeaseError`].
#[derive(Debug, thiserror::Error)]
#[error("fault injected by the in-memory lease store: {kind:?} on {operation}")]
pub struct InjectedFault {
    /// The kind of fault.
    pub kind: FaultKind,
    /// The call it hit.
    pub operation: LeaseOperation,
}

/// Counters of one operation.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct OperationStats {
    /// Calls made (including failed and faulted ones).
    pub calls: u64,
    /// Reads billed: one per `get_lease`, one per page of `list_leases`.
    pub reads: u64,
    /// Writes billed: one per conditional write that reached the table (failed conditions
    /// included).
    pub writes: u64,
    /// Writes whose condition did not hold (and creates that found the row).
    pub condition_failures: u64,
    /// Calls answered by an injected fault (or the unreachable switch), and calls left
    /// hanging.
    pub faults: u64,
}

/// Counters per operation, for the lease-cost benchmark.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct LeaseStoreStats {
    /// Counters of every operation called at least once.
    pub operations: BTreeMap<LeaseOperation, OperationStats>,
}

impl LeaseStoreStats {
    /// The counters of one operation (zero when never called).
    pub fn operation(&self, operation: LeaseOperation) -> OperationStats {
        self.operations.get(&operation).copied().unwrap_or_default()
    }

    /// Calls of every operation.
    pub fn total_calls(&self) -> u64 {
        self.operations.values().map(|s| s.calls).sum()
    }

    /// Reads of every operation.
    pub fn total_reads(&self) -> u64 {
        self.operations.values().map(|s| s.reads).sum()
    }

    /// Writes of every operation.
    pub fn total_writes(&self) -> u64 {
        self.operations.values().map(|s| s.writes).sum()
    }

    /// Failed conditions of every operation.
    pub fn total_condition_failures(&self) -> u64 {
        self.operations.values().map(|s| s.condition_failures).sum()
    }

    /// Injected faults of every operation.
    pub fn total_faults(&self) -> u64 {
        self.operations.values().map(|s| s.faults).sum()
    }
}

#[derive(Debug)]
struct Table {
    billing: BillingMode,
    rows: BTreeMap<String, Lease>,
}

#[derive(Debug)]
struct State {
    table: Option<Table>,
    page_size: usize,
    latency: Duration,
    unreachable: bool,
    hanging: bool,
    faults: super::fault::FaultPlan<FaultKind, LeaseOperation>,
    stats: LeaseStoreStats,
    client_version: Option<String>,
}

/// An in-memory lease table with DynamoDB's conditional-write semantics and injectable
/// faults. See the [module documentation](self).
pub struct InMemoryLeaseStore {
    table_name: String,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    state_tables: Option<crate::v3::table::StateTables>,
    coordinator_state: Option<crate::v3::memory::InMemoryStateTable>,
    worker_metrics: Option<crate::v3::memory::InMemoryStateTable>,
}

impl fmt::Debug for InMemoryLeaseStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("InMemoryLeaseStore")
            .field("table_name", &self.table_name)
            .field("table_exists", &state.table.is_some())
            .field("rows", &state.table.as_ref().map_or(0, |t| t.rows.len()))
            .field("page_size", &state.page_size)
            .field("latency", &state.latency)
            .field("unreachable", &state.unreachable)
            .field("hanging", &state.hanging)
            .field("pending_faults", &state.faults.len())
            .finish_non_exhaustive()
    }
}

impl Default for InMemoryLeaseStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryLeaseStore {
    /// A store with no table yet (create it with
    /// [`LeaseStore::create_table_if_not_exists`]), on the [`SystemClock`].
    pub fn new() -> Self {
        Self {
            table_name: DEFAULT_TABLE_NAME.to_owned(),
            clock: Arc::new(SystemClock),
            state: Mutex::new(State {
                table: None,
                page_size: DEFAULT_PAGE_SIZE,
                latency: Duration::ZERO,
                unreachable: false,
                hanging: false,
                faults: Default::default(),
                stats: LeaseStoreStats::default(),
                client_version: None,
            }),
            state_tables: None,
            coordinator_state: None,
            worker_metrics: None,
        }
    }

    /// Gives the store its KCL 3.x state tables (`<table>-CoordinatorState` and
    /// `<table>-WorkerMetricStats`, in memory, not created yet), as a DynamoDB lease store
    /// has them: workers on it can then run the 3.x protocol and follow a migration. Its
    /// [`LeaseStore::client_version`] then reads the `Migration3.0` item.
    pub fn with_state_tables(mut self) -> Self {
        use crate::v3::memory::InMemoryStateTable;
        use crate::v3::table::{
            COORDINATOR_STATE_KEY, WORKER_METRIC_STATS_KEY, coordinator_state_table_name,
            worker_metric_stats_table_name,
        };
        let coordinator = InMemoryStateTable::new(
            coordinator_state_table_name(&self.table_name),
            COORDINATOR_STATE_KEY,
        );
        let metrics = InMemoryStateTable::new(
            worker_metric_stats_table_name(&self.table_name),
            WORKER_METRIC_STATS_KEY,
        );
        self.state_tables = Some(crate::v3::table::StateTables {
            coordinator_state: Arc::new(coordinator.clone()),
            worker_metrics: Arc::new(metrics.clone()),
        });
        self.coordinator_state = Some(coordinator);
        self.worker_metrics = Some(metrics);
        self
    }

    /// The in-memory `<table>-CoordinatorState` table ([`InMemoryLeaseStore::with_state_tables`]).
    pub fn coordinator_state_table(&self) -> Option<&crate::v3::memory::InMemoryStateTable> {
        self.coordinator_state.as_ref()
    }

    /// The in-memory `<table>-WorkerMetricStats` table ([`InMemoryLeaseStore::with_state_tables`]).
    pub fn worker_metrics_table(&self) -> Option<&crate::v3::memory::InMemoryStateTable> {
        self.worker_metrics.as_ref()
    }

    /// Starts with an empty pay-per-request table already created.
    pub fn with_table(self) -> Self {
        {
            let mut state = self.lock();
            if state.table.is_none() {
                state.table = Some(Table {
                    billing: BillingMode::PayPerRequest,
                    rows: BTreeMap::new(),
                });
            }
        }
        self
    }

    /// The table name shown in [`LeaseError::TableMissing`].
    pub fn with_table_name(mut self, table_name: impl Into<String>) -> Self {
        self.table_name = table_name.into();
        self
    }

    /// The clock latency is slept on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Rows per internal `list_leases` page (at least 1).
    pub fn with_page_size(self, page_size: usize) -> Self {
        self.lock().page_size = page_size.max(1);
        self
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table_name
    }

    /// Latency added to every call from now on (`Duration::ZERO` for none).
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// While `true`, every call fails with [`LeaseError::Unreachable`].
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// While `true`, every call started hangs for good ([`FaultKind::Hang`]): it stays
    /// pending until dropped, even after the switch is turned off again. Calls started
    /// after it was turned off answer normally.
    pub fn set_hanging(&self, hanging: bool) {
        self.lock().hanging = hanging;
    }

    /// The next `count` calls hang for good ([`FaultKind::Hang`]).
    pub fn hang_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::Hang, count));
    }

    /// The next `count` calls fail with [`LeaseError::Throttled`].
    pub fn throttle_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::Throttle, count));
    }

    /// The next `count` calls fail with [`LeaseError::Service`].
    pub fn fail_next(&self, count: u32) {
        self.inject(Fault::new(FaultKind::ServiceError, count));
    }

    /// Registers a fault (after the ones already registered).
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.inject(fault);
    }

    /// Removes every registered fault, turns the unreachable and hanging switches off and
    /// the latency to 0 (calls already hanging stay pending).
    pub fn clear_faults(&self) {
        let mut state = self.lock();
        state.faults.clear();
        state.unreachable = false;
        state.hanging = false;
        state.latency = Duration::ZERO;
    }

    /// The faults still registered (with their remaining counts).
    pub fn pending_faults(&self) -> Vec<Fault> {
        self.lock().faults.pending()
    }

    /// The counters since creation or the last [`reset_stats`](Self::reset_stats).
    pub fn stats(&self) -> LeaseStoreStats {
        self.lock().stats.clone()
    }

    /// Sets every counter to zero.
    pub fn reset_stats(&self) {
        self.lock().stats = LeaseStoreStats::default();
    }

    /// Every row, in key order (no fault, latency or counting; empty when there is no
    /// table).
    pub fn snapshot(&self) -> Vec<Lease> {
        self.lock()
            .table
            .as_ref()
            .map(|t| t.rows.values().cloned().collect())
            .unwrap_or_default()
    }

    /// What [`LeaseStore::client_version`] answers from now on, as if a Java KCL had
    /// recorded it in a coordinator state table (`None`: no such record, the default).
    pub fn set_client_version(&self, client_version: Option<&str>) {
        self.lock().client_version = client_version.map(str::to_owned);
    }

    /// The billing mode the table was created with, if it exists.
    pub fn billing_mode(&self) -> Option<BillingMode> {
        self.lock().table.as_ref().map(|t| t.billing)
    }

    /// Drops the table and every row, as if someone deleted it.
    pub fn delete_table(&self) {
        self.lock().table = None;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts the call, decides its fault, sleeps the latency. `Err` when a fault fires;
    /// never returns when the fault is [`FaultKind::Hang`].
    async fn begin(
        &self,
        operation: LeaseOperation,
        lease_key: Option<&str>,
    ) -> Result<(), LeaseError> {
        let (fault, latency) = {
            let mut state = self.lock();
            let stats = state.stats.operations.entry(operation).or_default();
            stats.calls += 1;
            let fault = if state.hanging {
                Some(FaultKind::Hang)
            } else if state.unreachable {
                Some(FaultKind::Unreachable)
            } else {
                state.faults.take(operation, lease_key, |_| true)
            };
            if fault.is_some() {
                state.stats.operations.entry(operation).or_default().faults += 1;
            }
            (fault, state.latency)
        };
        if !latency.is_zero() {
            self.clock.sleep(latency).await;
        }
        match fault {
            None => Ok(()),
            Some(FaultKind::Hang) => {
                tracing::debug!(%operation, ?lease_key, "injected lease store hang");
                std::future::pending::<()>().await;
                Ok(())
            }
            Some(kind) => {
                tracing::debug!(%operation, ?lease_key, ?kind, "injected lease store fault");
                let source = Box::new(InjectedFault { kind, operation });
                Err(match kind {
                    FaultKind::Throttle => LeaseError::Throttled { source },
                    FaultKind::ServiceError => LeaseError::Service { source },
                    FaultKind::Unreachable | FaultKind::Hang => LeaseError::Unreachable { source },
                })
            }
        }
    }

    fn table_missing(&self) -> LeaseError {
        LeaseError::TableMissing {
            table: self.table_name.clone(),
        }
    }

    /// Makes one conditional write: evaluates its fence (before the call is counted, a
    /// write that cannot name its owner is [`LeaseError::NotHeld`]), then, under the
    /// table's lock, checks the fence against the stored row and applies the write's change
    /// to it. Returns the row after the write (`None` when it was removed).
    async fn write(
        &self,
        operation: LeaseOperation,
        write: LeaseWrite<'_>,
    ) -> Result<Option<Lease>, LeaseError> {
        let fence = write.fence()?;
        let lease_key = write.lease_key();
        self.begin(operation, Some(lease_key)).await?;
        let mut state = self.lock();
        let State { table, stats, .. } = &mut *state;
        let table = table.as_mut().ok_or_else(|| self.table_missing())?;
        let counters = stats.operations.entry(operation).or_default();
        counters.writes += 1;
        let row = table.rows.get(lease_key);
        if !fence.holds(row) {
            counters.condition_failures += 1;
            tracing::debug!(%operation, lease_key, "in-memory conditional write failed");
            return Err(LeaseError::ConditionFailed {
                lease_key: lease_key.to_owned(),
            });
        }
        let new_row = write.apply(row);
        match &new_row {
            Some(new_row) => table.rows.insert(lease_key.to_owned(), new_row.clone()),
            None => table.rows.remove(lease_key),
        };
        Ok(new_row)
    }

    /// A write that leaves a row behind (every write but delete).
    async fn update(
        &self,
        operation: LeaseOperation,
        write: LeaseWrite<'_>,
    ) -> Result<Lease, LeaseError> {
        self.write(operation, write)
            .await?
            .ok_or_else(|| LeaseError::NotFound {
                lease_key: write.lease_key().to_owned(),
            })
    }
}

#[async_trait]
impl LeaseStore for InMemoryLeaseStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.begin(LeaseOperation::CreateTable, None).await?;
        let mut state = self.lock();
        if state.table.is_some() {
            return Ok(false);
        }
        state.table = Some(Table {
            billing,
            rows: BTreeMap::new(),
        });
        Ok(true)
    }

    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.begin(LeaseOperation::TableExists, None).await?;
        Ok(self.lock().table.is_some())
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        match self
            .write(LeaseOperation::CreateLease, LeaseWrite::Create { lease })
            .await
        {
            Ok(_) => Ok(true),
            Err(LeaseError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        let operation = LeaseOperation::ListLeases;
        self.begin(operation, None).await?;
        let mut leases = Vec::new();
        let mut last_key: Option<String> = None;
        loop {
            // One page per lock, like one Scan call: the table may change between pages.
            let mut state = self.lock();
            let page_size = state.page_size;
            let State { table, stats, .. } = &mut *state;
            let table = table.as_ref().ok_or_else(|| self.table_missing())?;
            stats.operations.entry(operation).or_default().reads += 1;
            let page: Vec<Lease> = match &last_key {
                None => table.rows.values().take(page_size).cloned().collect(),
                Some(after) => table
                    .rows
                    .range::<str, _>((
                        std::ops::Bound::Excluded(after.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(_, lease)| lease)
                    .take(page_size)
                    .cloned()
                    .collect(),
            };
            drop(state);
            // As DynamoDB does, a full page carries a continuation even when nothing follows.
            let full = page.len() == page_size;
            last_key = page.last().map(|l| l.lease_key.clone());
            leases.extend(page);
            if !full {
                return Ok(leases);
            }
        }
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        let operation = LeaseOperation::GetLease;
        self.begin(operation, Some(lease_key)).await?;
        let mut state = self.lock();
        let State { table, stats, .. } = &mut *state;
        let table = table.as_ref().ok_or_else(|| self.table_missing())?;
        stats.operations.entry(operation).or_default().reads += 1;
        Ok(table.rows.get(lease_key).cloned())
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::Renew {
            seen: lease,
            throughput_kbps,
        };
        self.update(LeaseOperation::RenewLease, write).await
    }

    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::Take {
            seen: lease,
            new_owner,
        };
        self.update(LeaseOperation::TakeLease, write).await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.update(
            LeaseOperation::ReleaseLease,
            LeaseWrite::Release { seen: lease },
        )
        .await
    }

    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::Checkpoint {
            seen: lease,
            checkpoint,
        };
        self.update(LeaseOperation::UpdateCheckpoint, write).await
    }

    async fn update_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::PrepareCheckpoint {
            seen: lease,
            pending,
        };
        self.update(LeaseOperation::UpdatePendingCheckpoint, write)
            .await
    }

    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::ChildShardIds {
            seen: lease,
            child_shard_ids,
        };
        self.update(LeaseOperation::UpdateChildShardIds, write)
            .await
    }

    async fn reset_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::ResetCheckpoint {
            seen: lease,
            checkpoint,
        };
        self.update(LeaseOperation::ResetCheckpoint, write).await
    }

    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::InitiateHandoff {
            seen: lease,
            next_owner,
        };
        self.update(LeaseOperation::InitiateHandoff, write).await
    }

    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let write = LeaseWrite::CompleteHandoff { seen: lease };
        self.update(LeaseOperation::CompleteHandoff, write).await
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.begin(LeaseOperation::ClientVersion, None).await?;
        if let Some(table) = &self.coordinator_state {
            use crate::v3::table::StateTable;
            if let Ok(Some(item)) = table.get(crate::v3::migration::MIGRATION_KEY).await {
                let cv = item
                    .get(crate::v3::migration::attr::CLIENT_VERSION)
                    .and_then(crate::v3::item::Value::as_s)
                    .map(str::to_owned);
                if cv.is_some() {
                    return Ok(cv);
                }
            }
        }
        Ok(self.lock().client_version.clone())
    }

    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        let operation = LeaseOperation::QueryOwnerIndex;
        self.begin(operation, None).await?;
        let mut state = self.lock();
        let State { table, stats, .. } = &mut *state;
        let table = table.as_ref().ok_or_else(|| self.table_missing())?;
        let keys: Vec<String> = table
            .rows
            .values()
            .filter(|l| l.lease_owner.as_deref() == Some(owner))
            .map(|l| l.lease_key.clone())
            .collect();
        // Counted by the entries returned, like a KEYS_ONLY index query's items.
        stats.operations.entry(operation).or_default().reads += keys.len() as u64;
        Ok(keys)
    }

    async fn lease_owner_index_active(&self) -> Result<bool, LeaseError> {
        self.begin(LeaseOperation::TableExists, None).await?;
        Ok(self.lock().table.is_some())
    }

    fn state_tables(&self) -> Option<crate::v3::table::StateTables> {
        self.state_tables.clone()
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.write(
            LeaseOperation::DeleteLease,
            LeaseWrite::Delete { seen: lease },
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str) -> Lease {
        Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON)
    }

    fn store() -> InMemoryLeaseStore {
        InMemoryLeaseStore::new().with_table()
    }

    #[tokio::test]
    async fn table_missing_until_created() {
        let s = InMemoryLeaseStore::new().with_table_name("t1");
        assert!(!s.table_exists().await.unwrap());
        let err = s.create_lease_if_not_exists(&lease("a")).await.unwrap_err();
        assert!(matches!(err, LeaseError::TableMissing { ref table } if table == "t1"));
        assert!(matches!(
            s.list_leases().await,
            Err(LeaseError::TableMissing { .. })
        ));
        assert!(matches!(
            s.get_lease("a").await,
            Err(LeaseError::TableMissing { .. })
        ));
        let billing = BillingMode::Provisioned {
            read_capacity_units: 5,
            write_capacity_units: 7,
        };
        assert!(s.create_table_if_not_exists(billing).await.unwrap());
        assert!(
            !s.create_table_if_not_exists(BillingMode::PayPerRequest)
                .await
                .unwrap()
        );
        assert_eq!(s.billing_mode(), Some(billing));
        assert!(s.table_exists().await.unwrap());
        assert!(s.create_lease_if_not_exists(&lease("a")).await.unwrap());
        s.delete_table();
        assert!(!s.table_exists().await.unwrap());
        assert!(s.snapshot().is_empty());
    }

    #[tokio::test]
    async fn create_is_conditional() {
        let s = store();
        assert!(s.create_lease_if_not_exists(&lease("a")).await.unwrap());
        let mut other = lease("a");
        other.checkpoint = ExtendedSequenceNumber::LATEST;
        assert!(!s.create_lease_if_not_exists(&other).await.unwrap());
        assert_eq!(s.get_lease("a").await.unwrap().unwrap(), lease("a"));
        let st = s.stats().operation(LeaseOperation::CreateLease);
        assert_eq!((st.calls, st.writes, st.condition_failures), (2, 2, 1));
    }

    #[tokio::test]
    async fn take_renew_checkpoint_release_delete() {
        let s = store();
        s.create_lease_if_not_exists(&lease("a")).await.unwrap();
        let seen = s.get_lease("a").await.unwrap().unwrap();
        let w1 = s.take_lease(&seen, "w1").await.unwrap();
        assert_eq!(w1.lease_owner.as_deref(), Some("w1"));
        assert_eq!(
            (w1.lease_counter, w1.owner_switches_since_checkpoint),
            (1, 1)
        );
        // Stale counter: the take fails and nothing changes.
        assert!(
            s.take_lease(&seen, "w2")
                .await
                .unwrap_err()
                .is_condition_failed()
        );
        let w1 = s.renew_lease(&w1, None).await.unwrap();
        assert_eq!(w1.lease_counter, 2);
        let w2 = s.take_lease(&w1, "w2").await.unwrap();
        assert_eq!(
            (w2.lease_counter, w2.owner_switches_since_checkpoint),
            (3, 2)
        );
        // w1 is now a zombie: every fenced write fails.
        assert!(
            s.renew_lease(&w1, None)
                .await
                .unwrap_err()
                .is_condition_failed()
        );
        let esn: ExtendedSequenceNumber = "12345.3".parse().unwrap();
        assert!(
            s.update_checkpoint(&w1, &esn)
                .await
                .unwrap_err()
                .is_condition_failed()
        );
        let pending: ExtendedSequenceNumber = "999".parse().unwrap();
        let w2 = s
            .update_pending_checkpoint(&w2, Some(&pending))
            .await
            .unwrap();
        assert_eq!(w2.pending_checkpoint.as_ref(), Some(&pending));
        let w2 = s.update_checkpoint(&w2, &esn).await.unwrap();
        assert_eq!(w2.checkpoint, esn);
        assert_eq!(w2.pending_checkpoint, None);
        assert_eq!(
            (w2.lease_counter, w2.owner_switches_since_checkpoint),
            (5, 0)
        );
        let children: BTreeSet<String> = ["c1".to_owned(), "c2".to_owned()].into();
        let w2 = s.update_child_shard_ids(&w2, &children).await.unwrap();
        assert_eq!(w2.child_shard_ids, children);
        let free = s.release_lease(&w2).await.unwrap();
        assert_eq!((free.lease_owner.as_deref(), free.lease_counter), (None, 7));
        assert!(matches!(
            s.renew_lease(&free, None).await,
            Err(LeaseError::NotHeld { .. })
        ));
        assert!(s.delete_lease(&w2).await.unwrap_err().is_condition_failed());
        s.delete_lease(&free).await.unwrap();
        assert_eq!(s.get_lease("a").await.unwrap(), None);
        assert!(
            s.delete_lease(&free)
                .await
                .unwrap_err()
                .is_condition_failed()
        );
        assert_eq!(s.snapshot(), vec![]);
    }

    #[tokio::test]
    async fn list_pages_counted_as_reads() {
        let s = store().with_page_size(10);
        for i in 0..25 {
            s.create_lease_if_not_exists(&lease(&format!("k{i:03}")))
                .await
                .unwrap();
        }
        let all = s.list_leases().await.unwrap();
        let keys: Vec<_> = all.iter().map(|l| l.lease_key.clone()).collect();
        let expected: Vec<_> = (0..25).map(|i| format!("k{i:03}")).collect();
        assert_eq!(keys, expected);
        assert_eq!(s.stats().operation(LeaseOperation::ListLeases).reads, 3);
        // A full last page costs one more (empty) page, as on DynamoDB.
        s.delete_lease(&all[24]).await.unwrap();
        s.delete_lease(&all[23]).await.unwrap();
        s.delete_lease(&all[22]).await.unwrap();
        s.delete_lease(&all[21]).await.unwrap();
        s.delete_lease(&all[20]).await.unwrap();
        s.reset_stats();
        assert_eq!(s.list_leases().await.unwrap().len(), 20);
        assert_eq!(s.stats().operation(LeaseOperation::ListLeases).reads, 3);
        assert_eq!(s.stats().total_calls(), 1);
    }

    #[tokio::test]
    async fn faults_fire_in_order_and_scope() {
        let s = store();
        s.create_lease_if_not_exists(&lease("a")).await.unwrap();
        s.create_lease_if_not_exists(&lease("b")).await.unwrap();
        s.throttle_next(2);
        assert!(matches!(
            s.get_lease("a").await,
            Err(LeaseError::Throttled { .. })
        ));
        assert!(matches!(
            s.list_leases().await,
            Err(LeaseError::Throttled { .. })
        ));
        assert!(s.get_lease("a").await.unwrap().is_some());
        s.fail_next(1);
        let err = s.get_lease("a").await.unwrap_err();
        assert!(matches!(err, LeaseError::Service { .. }));
        assert!(err.is_retryable());
        s.inject(Fault::new(FaultKind::Throttle, 1).for_key("b"));
        s.inject(Fault::new(FaultKind::ServiceError, 1).for_operation(LeaseOperation::RenewLease));
        assert!(s.get_lease("a").await.is_ok());
        assert!(s.list_leases().await.is_ok());
        let a = s.take_lease(&lease("a"), "w").await.unwrap();
        assert!(matches!(
            s.get_lease("b").await,
            Err(LeaseError::Throttled { .. })
        ));
        assert!(matches!(
            s.renew_lease(&a, None).await,
            Err(LeaseError::Service { .. })
        ));
        assert!(s.pending_faults().is_empty());
        let a = s.renew_lease(&a, None).await.unwrap();
        assert_eq!(a.lease_counter, 2);
        s.set_unreachable(true);
        assert!(matches!(
            s.renew_lease(&a, None).await,
            Err(LeaseError::Unreachable { .. })
        ));
        assert!(matches!(
            s.table_exists().await,
            Err(LeaseError::Unreachable { .. })
        ));
        s.set_unreachable(false);
        assert_eq!(s.renew_lease(&a, None).await.unwrap().lease_counter, 3);
        let stats = s.stats();
        assert_eq!(stats.total_faults(), 7);
        // Faulted calls are not billed.
        assert_eq!(stats.operation(LeaseOperation::RenewLease).writes, 2);
        assert_eq!(stats.operation(LeaseOperation::RenewLease).faults, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_sleeps_on_the_clock() {
        let s = store();
        s.set_latency(Duration::from_millis(250));
        let start = tokio::time::Instant::now();
        s.create_lease_if_not_exists(&lease("a")).await.unwrap();
        s.get_lease("a").await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn hangs_stay_pending_until_dropped() {
        let s = store();
        s.create_lease_if_not_exists(&lease("a")).await.unwrap();
        let a = s.take_lease(&lease("a"), "w").await.unwrap();
        let wait = Duration::from_secs(3600);
        s.hang_next(1);
        assert!(tokio::time::timeout(wait, s.get_lease("a")).await.is_err());
        assert!(s.get_lease("a").await.unwrap().is_some());
        // Scoped to one operation and one key.
        s.inject(
            Fault::new(FaultKind::Hang, 1)
                .for_operation(LeaseOperation::RenewLease)
                .for_key("a"),
        );
        assert!(s.get_lease("a").await.is_ok());
        assert!(
            tokio::time::timeout(wait, s.renew_lease(&a, None))
                .await
                .is_err()
        );
        // The hung renewal never reached the table.
        let a = s.renew_lease(&a, None).await.unwrap();
        assert_eq!(a.lease_counter, 2);
        // The switch: calls started while it is on hang for good.
        s.set_hanging(true);
        let mut hung = Box::pin(s.list_leases());
        assert!(tokio::time::timeout(wait, &mut hung).await.is_err());
        s.set_hanging(false);
        assert!(tokio::time::timeout(wait, &mut hung).await.is_err());
        assert_eq!(s.list_leases().await.unwrap().len(), 1);
        let stats = s.stats();
        assert_eq!(stats.operation(LeaseOperation::ListLeases).faults, 1);
        assert_eq!(stats.operation(LeaseOperation::RenewLease).writes, 1);
        assert_eq!(stats.total_faults(), 3);
    }
}
