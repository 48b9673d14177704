//! Writes bound to one holding of a lease: a processor of an earlier holding can never write
//! into a later one, even after the lease was lost and gained again by the same worker.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::time::Duration;

use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig};
use kcl_lease::test_util::ManualClock;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore, SeededRandom};

#[tokio::test]
async fn a_lost_and_regained_lease_refuses_writes_of_the_old_holding() {
    let clock = ManualClock::new();
    let store = Arc::new(InMemoryLeaseStore::new().with_clock(Arc::new(clock.clone())));
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    store
        .create_lease_if_not_exists(&Lease::new("shard-1", ExtendedSequenceNumber::TRIM_HORIZON))
        .await
        .unwrap();
    let config = LeaseCoordinatorConfig::new("w1").with_failover_time(Duration::from_secs(10));
    let c = LeaseCoordinator::new(
        store.clone(),
        config,
        Arc::new(clock.clone()),
        Arc::new(SeededRandom::new(1)),
    )
    .unwrap();
    c.take_once().await.unwrap();
    let first = c.holding("shard-1").unwrap();
    assert!(first.is_current());
    assert_eq!(first.lease_key(), "shard-1");

    // Another worker steals it; w1 learns at its next write, then takes it back.
    let row = store.get_lease("shard-1").await.unwrap().unwrap();
    store.take_lease(&row, "w2").await.unwrap();
    let seq: ExtendedSequenceNumber = "100".parse().unwrap();
    assert!(matches!(
        first.checkpoint(&seq).await,
        Err(LeaseError::ConditionFailed { .. })
    ));
    assert!(c.holding("shard-1").is_none());
    let row = store.get_lease("shard-1").await.unwrap().unwrap();
    store.release_lease(&row).await.unwrap();
    c.take_once().await.unwrap();
    let second = c.holding("shard-1").unwrap();
    assert_ne!(first, second);

    // The old holding's writes are refused without touching the table.
    let before = store.get_lease("shard-1").await.unwrap().unwrap();
    assert!(matches!(
        first.checkpoint(&seq).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(matches!(
        first.prepare_checkpoint(Some(&seq)).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(matches!(
        first.release().await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert_eq!(store.get_lease("shard-1").await.unwrap().unwrap(), before);
    // The new holding writes.
    assert!(matches!(
        first.update_child_shard_ids(&["c".to_owned()].into()).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(!first.is_current());
    assert_eq!(first.lease(), None);
    assert!(second.is_current());
    let written = second.checkpoint(&seq).await.unwrap();
    assert_eq!(written.checkpoint, seq);
    assert!(c.is_held("shard-1"));
    assert_eq!(second.lease(), Some(written));
}
