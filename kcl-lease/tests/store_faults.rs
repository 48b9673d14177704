//! The coordinator against stores that hang or answer wrongly: a hung call never stalls a
//! renewal round, and a write the client retried (already applied) is not taken as a loss.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig, LeaseEvent, LostReason};
use kcl_lease::test_util::ManualClock;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore, SeededRandom};

const F: Duration = Duration::from_secs(9);

/// Delegates to an in-memory store, except: checkpoints of "k0" never return when `hang`,
/// and renewals are applied and then reported as failed conditions when `replay`.
#[derive(Debug)]
struct Odd {
    inner: InMemoryLeaseStore,
    hang: AtomicBool,
    replay: AtomicBool,
}

#[async_trait]
impl LeaseStore for Odd {
    async fn create_table_if_not_exists(&self, b: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(b).await
    }
    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.inner.table_exists().await
    }
    async fn create_lease_if_not_exists(&self, l: &Lease) -> Result<bool, LeaseError> {
        self.inner.create_lease_if_not_exists(l).await
    }
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.inner.list_leases().await
    }
    async fn get_lease(&self, k: &str) -> Result<Option<Lease>, LeaseError> {
        self.inner.get_lease(k).await
    }
    async fn renew_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
        let r = self.inner.renew_lease(l).await;
        if self.replay.load(Ordering::SeqCst) && r.is_ok() {
            // The client's retry of an applied write: the condition no longer holds.
            return self.inner.renew_lease(l).await;
        }
        r
    }
    async fn take_lease(&self, l: &Lease, o: &str) -> Result<Lease, LeaseError> {
        self.inner.take_lease(l, o).await
    }
    async fn release_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
        self.inner.release_lease(l).await
    }
    async fn update_checkpoint(
        &self,
        l: &Lease,
        c: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        if self.hang.load(Ordering::SeqCst) && l.lease_key == "k0" {
            std::future::pending::<()>().await;
        }
        self.inner.update_checkpoint(l, c).await
    }
    async fn update_pending_checkpoint(
        &self,
        l: &Lease,
        p: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_pending_checkpoint(l, p).await
    }
    async fn update_child_shard_ids(
        &self,
        l: &Lease,
        c: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_child_shard_ids(l, c).await
    }
    async fn delete_lease(&self, l: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(l).await
    }
}

async fn setup(clock: &ManualClock) -> (Arc<Odd>, Arc<LeaseCoordinator>) {
    let store = Arc::new(Odd {
        inner: InMemoryLeaseStore::new().with_clock(Arc::new(clock.clone())),
        hang: AtomicBool::new(false),
        replay: AtomicBool::new(false),
    });
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    for k in ["k0", "k1"] {
        store
            .create_lease_if_not_exists(&Lease::new(k, ExtendedSequenceNumber::TRIM_HORIZON))
            .await
            .unwrap();
    }
    let c = LeaseCoordinator::new(
        store.clone(),
        LeaseCoordinatorConfig::new("w").with_failover_time(F),
        Arc::new(clock.clone()),
        Arc::new(SeededRandom::new(3)),
    )
    .unwrap();
    c.take_once().await.unwrap();
    assert_eq!(c.held_keys(), ["k0", "k1"]);
    (store, c)
}

/// Runs one renewal round while moving the clock, so bounded waits can time out.
async fn round(c: &LeaseCoordinator, clock: &ManualClock) -> kcl_lease::coordinator::RenewReport {
    let (report, ()) = tokio::join!(c.renew_once(), async {
        for _ in 0..4 {
            clock.advance_and_settle(F / 3).await;
        }
    });
    report
}

#[tokio::test]
async fn a_hung_write_does_not_stall_renewals_and_its_lease_is_lost_after_the_deadline() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    store.hang.store(true, Ordering::SeqCst);
    let stuck = {
        let c = c.clone();
        tokio::spawn(async move {
            let _ = c.checkpoint("k0", &"5".parse().unwrap()).await;
        })
    };
    clock.settle().await;
    let mut lost = None;
    for i in 1..=6 {
        clock.advance(F / 3);
        let report = round(&c, &clock).await;
        // The healthy lease is renewed every round, whatever k0's write does.
        assert!(c.is_held("k1"), "round {i}: {report:?}");
        if report.lost == ["k0"] {
            lost = Some(i);
            break;
        }
    }
    assert!(lost.is_some(), "k0 never given up");
    assert!(!c.is_held("k0"));
    match events.try_recv().unwrap() {
        LeaseEvent::Lost { lease_key, reason } => {
            assert_eq!(lease_key, "k0");
            assert_eq!(reason, LostReason::RenewalTimeout);
        }
        other => panic!("{other:?}"),
    }
    stuck.abort();
}

#[tokio::test]
async fn a_renewal_applied_then_reported_as_failed_is_recovered() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    store.replay.store(true, Ordering::SeqCst);
    let before = store.get_lease("k0").await.unwrap().unwrap().lease_counter;
    clock.advance(F / 3);
    let report = c.renew_once().await;
    assert_eq!(report.renewed, 2, "{report:?}");
    assert!(report.lost.is_empty());
    assert!(events.try_recv().is_err(), "no Lost event");
    // The local view follows the table, so the next renewal (without replays) succeeds.
    store.replay.store(false, Ordering::SeqCst);
    let row = store.get_lease("k0").await.unwrap().unwrap();
    assert_eq!(row.lease_counter, before + 1);
    assert_eq!(c.held_lease("k0").unwrap().lease_counter, before + 1);
    clock.advance(F / 3);
    assert_eq!(c.renew_once().await.renewed, 2);
}
