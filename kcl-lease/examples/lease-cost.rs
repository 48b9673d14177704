//! Measures what lease coordination costs in lease-table calls at steady state.
//!
//! Four coordinators share 40 leases on an in-memory lease store, with a manual clock and
//! the default failover time of 10 s. After a two-minute warm-up (initial takes and
//! stealing until balanced, not counted) the example runs ten simulated minutes and prints
//! the table traffic per lease and minute:
//!
//! * writes = every conditional write sent to the table (renewals, takes, releases,
//!   checkpoints; a write whose condition fails counts too, as DynamoDB bills it);
//! * reads = items read: every item returned by a `list_leases` scan counts as one read
//!   (a scan page of N items is N reads), and every `get_lease` as one.
//!
//! A second run adds a checkpoint of every held lease every 10 s (as a consumer might), to
//! show that renewals are skipped right after a checkpoint: the total stays at about the
//! renewal-only figure.
//!
//! The last line is `writes_per_lease_minute=X reads_per_lease_minute=Y` for the first run.
//! Run with `cargo run --release -q -p kcl-lease --example lease-cost`.
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
use kcl_lease::{BillingMode, Clock, Lease, LeaseError, LeaseStore, SeededRandom};

const WORKERS: usize = 4;
const LEASES: usize = 40;
const FAILOVER: Duration = Duration::from_secs(10);
const WARM_UP: Duration = Duration::from_secs(120);
const MEASURED_MINUTES: u64 = 10;

/// Counts items read; delegates everything.
#[derive(Debug)]
struct ItemCountingStore {
    inner: Arc<InMemoryLeaseStore>,
    items_read: AtomicU64,
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
        self.items_read
            .fetch_add(leases.len() as u64, Ordering::Relaxed);
        Ok(leases)
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.items_read.fetch_add(1, Ordering::Relaxed);
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
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(lease).await
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.inner.client_version().await
    }
}

struct Figures {
    writes_per_lease_minute: f64,
    reads_per_lease_minute: f64,
    renewals_per_lease_minute: f64,
    checkpoints_per_lease_minute: f64,
    takes: u64,
    lists: u64,
    balanced: Vec<usize>,
}

async fn simulate(checkpoint_every: Option<Duration>) -> Figures {
    let clock = ManualClock::new();
    let inner = Arc::new(InMemoryLeaseStore::new().with_table());
    for i in 0..LEASES {
        let lease = Lease::new(
            format!("shardId-{i:012}"),
            ExtendedSequenceNumber::TRIM_HORIZON,
        );
        inner.create_lease_if_not_exists(&lease).await.unwrap();
    }
    let store = Arc::new(ItemCountingStore {
        inner: Arc::clone(&inner),
        items_read: AtomicU64::new(0),
    });
    let coordinators: Vec<Arc<LeaseCoordinator>> = (0..WORKERS)
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
    for c in &coordinators {
        c.spawn();
    }
    if let Some(every) = checkpoint_every {
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
    inner.reset_stats();
    store.items_read.store(0, Ordering::Relaxed);
    clock
        .advance_and_settle(Duration::from_secs(60 * MEASURED_MINUTES))
        .await;

    let stats = inner.stats();
    let lease_minutes = (LEASES as u64 * MEASURED_MINUTES) as f64;
    let mut balanced: Vec<usize> = coordinators.iter().map(|c| c.held_leases().len()).collect();
    balanced.sort_unstable();
    for c in &coordinators {
        c.stop().await;
    }
    Figures {
        writes_per_lease_minute: stats.total_writes() as f64 / lease_minutes,
        reads_per_lease_minute: store.items_read.load(Ordering::Relaxed) as f64 / lease_minutes,
        renewals_per_lease_minute: stats.operation(LeaseOperation::RenewLease).writes as f64
            / lease_minutes,
        checkpoints_per_lease_minute: stats.operation(LeaseOperation::UpdateCheckpoint).writes
            as f64
            / lease_minutes,
        takes: stats.operation(LeaseOperation::TakeLease).writes,
        lists: stats.operation(LeaseOperation::ListLeases).calls,
        balanced,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!(
        "{WORKERS} coordinators, {LEASES} leases, failover {FAILOVER:?}, \
         {MEASURED_MINUTES} simulated minutes after a {WARM_UP:?} warm-up"
    );

    let with_checkpoints = simulate(Some(Duration::from_secs(10))).await;
    println!(
        "with a checkpoint per lease every 10 s: writes/lease-min {:.2} \
         (renewals {:.2} + checkpoints {:.2})",
        with_checkpoints.writes_per_lease_minute,
        with_checkpoints.renewals_per_lease_minute,
        with_checkpoints.checkpoints_per_lease_minute,
    );

    let idle = simulate(None).await;
    println!(
        "renewals only: leases per worker {:?}, takes {}, table scans {} ({:.1} per worker-minute)",
        idle.balanced,
        idle.takes,
        idle.lists,
        idle.lists as f64 / (WORKERS as u64 * MEASURED_MINUTES) as f64,
    );
    println!(
        "writes_per_lease_minute={:.2} reads_per_lease_minute={:.2}",
        idle.writes_per_lease_minute, idle.reads_per_lease_minute
    );
}
