//! The lease store conformance suite against the in-memory store and against
//! `DynamoLeaseStore` on two DynamoDB emulators (dynalite and moto), plus the in-memory
//! store's fault injection and `DynamoLeaseStore`'s error mapping and `Debug`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore};
use kcl_testkit::clock::ManualClock;
use kcl_testkit::conformance::{self, CASES, ConformanceReport};
use kcl_testkit::emulators::{Emulator, EmulatorKind, dynamodb_client, sdk_config};
use kcl_testkit::lease_store::{Fault, FaultKind, InMemoryLeaseStore, LeaseOperation};

fn check(store: &str, report: &ConformanceReport) {
    eprintln!("{store}: {report}");
    assert_eq!(report.outcomes.len(), CASES.len());
    assert!(report.all_passed(), "{store}: {report}");
}

#[tokio::test]
async fn in_memory_store_passes_the_suite() {
    let report =
        conformance::run_all(|| async { InMemoryLeaseStore::new().with_page_size(7) }).await;
    check("in-memory", &report);
}

/// A store on a fresh table of `emulator`, with small scan pages so the list case pages.
fn dynamo_store_factory(
    emulator: &Emulator,
    prefix: &'static str,
) -> impl FnMut() -> std::future::Ready<DynamoLeaseStore> + use<> {
    let client = dynamodb_client(emulator.endpoint());
    let next = AtomicUsize::new(0);
    move || {
        let n = next.fetch_add(1, Ordering::Relaxed);
        std::future::ready(
            DynamoLeaseStore::new(client.clone(), format!("{prefix}-{n}"))
                .with_scan_page_size(25)
                .with_table_wait(Duration::from_millis(50), Duration::from_secs(10)),
        )
    }
}

async fn dynamo_suite(kind: EmulatorKind, prefix: &'static str) {
    let emulator = Emulator::start(kind).unwrap_or_else(|e| panic!("{e}"));
    let report = conformance::run_all(dynamo_store_factory(&emulator, prefix)).await;
    check(&format!("DynamoLeaseStore on {kind}"), &report);
}

#[tokio::test]
async fn dynamo_store_on_dynalite_passes_the_suite() {
    dynamo_suite(EmulatorKind::Dynalite, "conformance-dynalite").await;
}

#[tokio::test]
async fn dynamo_store_on_moto_passes_the_suite() {
    dynamo_suite(EmulatorKind::Moto, "conformance-moto").await;
}

#[tokio::test]
async fn suite_catches_a_store_that_ignores_conditions() {
    // A store whose take ignores the counter would pass a suite that only checks happy
    // paths: this checks the suite fails it.
    #[derive(Debug)]
    struct Sloppy(InMemoryLeaseStore);
    #[async_trait::async_trait]
    impl LeaseStore for Sloppy {
        async fn create_table_if_not_exists(&self, b: BillingMode) -> Result<bool, LeaseError> {
            self.0.create_table_if_not_exists(b).await
        }
        async fn table_exists(&self) -> Result<bool, LeaseError> {
            self.0.table_exists().await
        }
        async fn create_lease_if_not_exists(&self, l: &Lease) -> Result<bool, LeaseError> {
            self.0.create_lease_if_not_exists(l).await
        }
        async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
            self.0.list_leases().await
        }
        async fn get_lease(&self, k: &str) -> Result<Option<Lease>, LeaseError> {
            self.0.get_lease(k).await
        }
        async fn renew_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
            self.0.renew_lease(l).await
        }
        async fn take_lease(&self, l: &Lease, owner: &str) -> Result<Lease, LeaseError> {
            // Re-reads the row and takes whatever is there.
            let current = self.0.get_lease(&l.lease_key).await?.unwrap();
            self.0.take_lease(&current, owner).await
        }
        async fn release_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
            self.0.release_lease(l).await
        }
        async fn update_checkpoint(
            &self,
            l: &Lease,
            c: &ExtendedSequenceNumber,
        ) -> Result<Lease, LeaseError> {
            self.0.update_checkpoint(l, c).await
        }
        async fn update_pending_checkpoint(
            &self,
            l: &Lease,
            p: Option<&ExtendedSequenceNumber>,
        ) -> Result<Lease, LeaseError> {
            self.0.update_pending_checkpoint(l, p).await
        }
        async fn update_child_shard_ids(
            &self,
            l: &Lease,
            c: &std::collections::BTreeSet<String>,
        ) -> Result<Lease, LeaseError> {
            self.0.update_child_shard_ids(l, c).await
        }
        async fn delete_lease(&self, l: &Lease) -> Result<(), LeaseError> {
            self.0.delete_lease(l).await
        }
    }
    let report = conformance::run_all(|| async { Sloppy(InMemoryLeaseStore::new()) }).await;
    eprintln!("{report}");
    let failed: Vec<_> = report.failures().map(|o| o.name).collect();
    assert!(
        failed.contains(&"case_take_with_stale_view_fails"),
        "{report}"
    );
    assert!(
        failed.contains(&"case_concurrent_takes_have_one_winner"),
        "{report}"
    );
    assert!(!report.all_passed());
}

// --- in-memory fault injection -------------------------------------------------------------

async fn store_with_lease() -> (InMemoryLeaseStore, Lease) {
    let store = InMemoryLeaseStore::new();
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    let lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON);
    assert!(store.create_lease_if_not_exists(&lease).await.unwrap());
    let held = store.take_lease(&lease, "w1").await.unwrap();
    (store, held)
}

#[tokio::test]
async fn throttle_next_n_calls() {
    let (store, held) = store_with_lease().await;
    store.reset_stats();
    store.throttle_next(3);
    for _ in 0..3 {
        let err = store.renew_lease(&held).await.unwrap_err();
        assert!(matches!(err, LeaseError::Throttled { .. }), "{err:?}");
        assert!(err.is_retryable());
    }
    // Nothing was written by the throttled calls: the original view still renews.
    let renewed = store.renew_lease(&held).await.unwrap();
    assert_eq!(renewed.lease_counter, held.lease_counter + 1);
    let stats = store.stats().operation(LeaseOperation::RenewLease);
    assert_eq!(
        (stats.calls, stats.faults, stats.writes),
        (4, 3, 1),
        "{stats:?}"
    );
}

#[tokio::test]
async fn fail_next_n_calls_with_a_service_error() {
    let (store, held) = store_with_lease().await;
    store.fail_next(2);
    assert!(matches!(
        store.list_leases().await,
        Err(LeaseError::Service { .. })
    ));
    let err = store.get_lease(&held.lease_key).await.unwrap_err();
    assert!(matches!(err, LeaseError::Service { .. }));
    // The cause says it was injected, and Display does not repeat it.
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("injected"), "{source}");
    assert!(!err.to_string().contains("injected"));
    assert_eq!(store.list_leases().await.unwrap(), vec![held]);
}

#[tokio::test]
async fn unreachable_until_switched_back() {
    let (store, held) = store_with_lease().await;
    store.set_unreachable(true);
    for _ in 0..5 {
        assert!(matches!(
            store.renew_lease(&held).await,
            Err(LeaseError::Unreachable { .. })
        ));
    }
    assert!(matches!(
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await,
        Err(LeaseError::Unreachable { .. })
    ));
    store.set_unreachable(false);
    assert_eq!(
        store.renew_lease(&held).await.unwrap().lease_counter,
        held.lease_counter + 1
    );
}

#[tokio::test]
async fn faults_scoped_to_a_key_or_an_operation() {
    let (store, held) = store_with_lease().await;
    let other = Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON);
    store.create_lease_if_not_exists(&other).await.unwrap();
    store.inject(Fault::new(FaultKind::Throttle, 2).for_lease_key("shardId-000000000002"));
    store.inject(
        Fault::new(FaultKind::Unreachable, 1).for_operation(LeaseOperation::UpdateCheckpoint),
    );
    // Calls on the other key, and other operations, are not affected.
    let held = store.renew_lease(&held).await.unwrap();
    assert_eq!(store.list_leases().await.unwrap().len(), 2);
    assert!(matches!(
        store.take_lease(&other, "w1").await,
        Err(LeaseError::Throttled { .. })
    ));
    assert!(matches!(
        store.get_lease("shardId-000000000002").await,
        Err(LeaseError::Throttled { .. })
    ));
    let other = store.take_lease(&other, "w1").await.unwrap();
    assert_eq!(other.lease_counter, 1);
    let checkpoint: ExtendedSequenceNumber = "42".parse().unwrap();
    assert!(matches!(
        store.update_checkpoint(&held, &checkpoint).await,
        Err(LeaseError::Unreachable { .. })
    ));
    let held = store.update_checkpoint(&held, &checkpoint).await.unwrap();
    assert_eq!(held.checkpoint, checkpoint);
    assert!(store.pending_faults().is_empty());
}

#[tokio::test]
async fn latency_on_a_manual_clock() {
    let clock = ManualClock::new();
    let store = Arc::new(
        InMemoryLeaseStore::new()
            .with_table()
            .with_clock(Arc::new(clock.clone())),
    );
    store.set_latency(Duration::from_secs(2));
    let call = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            store
                .create_lease_if_not_exists(&Lease::new("k", ExtendedSequenceNumber::LATEST))
                .await
        }
    });
    clock.advance_and_settle(Duration::from_millis(1999)).await;
    assert!(!call.is_finished(), "returned before its latency passed");
    // Not written yet either: the latency comes before the call reaches the table.
    assert!(store.snapshot().is_empty());
    clock.advance_and_settle(Duration::from_millis(1)).await;
    assert!(call.is_finished());
    assert!(call.await.unwrap().unwrap());
    assert_eq!(store.snapshot().len(), 1);
}

#[tokio::test]
async fn stats_count_reads_and_writes_per_operation() {
    let store = InMemoryLeaseStore::new().with_page_size(10);
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    for i in 0..35 {
        let lease = Lease::new(format!("k{i:02}"), ExtendedSequenceNumber::TRIM_HORIZON);
        store.create_lease_if_not_exists(&lease).await.unwrap();
    }
    let leases = store.list_leases().await.unwrap();
    let held = store.take_lease(&leases[0], "w").await.unwrap();
    store.take_lease(&leases[0], "w2").await.unwrap_err();
    store.renew_lease(&held).await.unwrap();
    let stats = store.stats();
    assert_eq!(stats.operation(LeaseOperation::CreateLease).writes, 35);
    assert_eq!(stats.operation(LeaseOperation::ListLeases).reads, 4);
    let take = stats.operation(LeaseOperation::TakeLease);
    assert_eq!(
        (take.calls, take.writes, take.condition_failures),
        (2, 2, 1)
    );
    assert_eq!(stats.total_writes(), 35 + 2 + 1);
    assert_eq!(stats.total_reads(), 4);
    store.reset_stats();
    assert_eq!(store.stats().total_calls(), 0);
}

// --- DynamoLeaseStore specifics ------------------------------------------------------------

#[tokio::test]
async fn dynamo_store_debug_hides_credentials() {
    let client = dynamodb_client("http://127.0.0.1:9");
    let store = DynamoLeaseStore::new(client.clone(), "debug-table");
    let debug = format!("{store:?}");
    assert!(debug.contains("debug-table"), "{debug}");
    assert!(!debug.contains("kcl-testkit-secret-key"), "{debug}");
    assert!(!debug.contains("kcl-testkit-access-key"), "{debug}");
    // The SDK's own Debug redacts them too (so holding the client elsewhere is safe).
    let client_debug = format!("{client:?}");
    assert!(
        !client_debug.contains("kcl-testkit-secret-key"),
        "{client_debug}"
    );
}

#[tokio::test]
async fn dynamo_store_unreachable_endpoint() {
    // Nothing listens on the port of a listener that was just closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config =
        aws_sdk_dynamodb::config::Builder::from(&sdk_config(&format!("http://127.0.0.1:{port}")))
            .retry_config(RetryConfig::disabled())
            .build();
    let store = DynamoLeaseStore::new(aws_sdk_dynamodb::Client::from_conf(config), "t");
    for result in [
        store.get_lease("k").await.map(drop),
        store.table_exists().await.map(drop),
        store.list_leases().await.map(drop),
    ] {
        match result {
            Err(e @ LeaseError::Unreachable { .. }) => assert!(e.is_retryable()),
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn dynamo_store_lease_seen_without_owner_is_not_held() {
    // Checked before any call: the endpoint is never contacted.
    let store = DynamoLeaseStore::new(dynamodb_client("http://127.0.0.1:9"), "t");
    let free = Lease::new("k", ExtendedSequenceNumber::TRIM_HORIZON);
    assert!(matches!(
        store.renew_lease(&free).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(matches!(
        store.release_lease(&free).await,
        Err(LeaseError::NotHeld { .. })
    ));
}
