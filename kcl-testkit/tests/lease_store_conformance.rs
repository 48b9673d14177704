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

/// moto's server does not evaluate a condition and apply the update atomically: two
/// concurrent takes of one lease can both succeed there (seen under load in a full test run).
/// DynamoDB and dynalite serialise them, so the race case runs on those and in memory; on
/// moto every other case runs.
#[tokio::test]
async fn dynamo_store_on_moto_passes_the_suite() {
    let emulator = Emulator::start(EmulatorKind::Moto).unwrap_or_else(|e| panic!("{e}"));
    let cases: Vec<conformance::Case> = conformance::CASES
        .iter()
        .copied()
        .filter(|c| c.name != "case_concurrent_takes_have_one_winner")
        .collect();
    assert_eq!(cases.len() + 1, conformance::CASES.len());
    let report =
        conformance::run_cases(&cases, dynamo_store_factory(&emulator, "conformance-moto")).await;
    eprintln!("DynamoLeaseStore on moto: {report}");
    assert_eq!(report.outcomes.len(), cases.len());
    assert!(report.all_passed(), "DynamoLeaseStore on moto: {report}");
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
        async fn renew_lease(
            &self,
            l: &Lease,
            throughput_kbps: Option<f64>,
        ) -> Result<Lease, LeaseError> {
            self.0.renew_lease(l, throughput_kbps).await
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

        async fn client_version(&self) -> Result<Option<String>, LeaseError> {
            self.0.client_version().await
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
        let err = store.renew_lease(&held, None).await.unwrap_err();
        assert!(matches!(err, LeaseError::Throttled { .. }), "{err:?}");
        assert!(err.is_retryable());
    }
    // Nothing was written by the throttled calls: the original view still renews.
    let renewed = store.renew_lease(&held, None).await.unwrap();
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
            store.renew_lease(&held, None).await,
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
        store.renew_lease(&held, None).await.unwrap().lease_counter,
        held.lease_counter + 1
    );
}

#[tokio::test]
async fn faults_scoped_to_a_key_or_an_operation() {
    let (store, held) = store_with_lease().await;
    let other = Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON);
    store.create_lease_if_not_exists(&other).await.unwrap();
    store.inject(Fault::new(FaultKind::Throttle, 2).for_key("shardId-000000000002"));
    store.inject(
        Fault::new(FaultKind::Unreachable, 1).for_operation(LeaseOperation::UpdateCheckpoint),
    );
    // Calls on the other key, and other operations, are not affected.
    let held = store.renew_lease(&held, None).await.unwrap();
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
    store.renew_lease(&held, None).await.unwrap();
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
        store.renew_lease(&free, None).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(matches!(
        store.release_lease(&free).await,
        Err(LeaseError::NotHeld { .. })
    ));
}

// --- DynamoLeaseStore against a scripted HTTP client ---------------------------------------
//
// The emulators never throttle, never answer CREATING and never fail with a 500: a scripted
// client answers instead, and records every request so the exact expressions can be checked.

mod scripted {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant, SystemTime};

    use aws_sdk_dynamodb::config::retry::RetryConfig;
    use aws_smithy_runtime_api::client::http::{
        HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
    };
    use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
    use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
    use aws_smithy_runtime_api::http::StatusCode;
    use aws_smithy_types::body::SdkBody;
    use kcl_lease::{BoxFuture, Clock};
    use kcl_testkit::emulators::sdk_config;
    use serde_json::Value;

    /// One request: the operation (from `X-Amz-Target`) and the JSON body.
    #[derive(Clone, Debug)]
    pub(super) struct Request {
        pub(super) operation: String,
        pub(super) body: Value,
    }

    #[derive(Clone, Debug, Default)]
    pub(super) struct Script {
        responses: Arc<Mutex<VecDeque<(u16, String)>>>,
        pub(super) requests: Arc<Mutex<Vec<Request>>>,
    }

    impl Script {
        pub(super) fn respond(&self, status: u16, body: &str) {
            self.responses
                .lock()
                .unwrap()
                .push_back((status, body.to_owned()));
        }

        pub(super) fn error(&self, code: &str) {
            let status = if code == "InternalServerError" {
                500
            } else {
                400
            };
            self.respond(
                status,
                &format!(
                    r#"{{"__type":"com.amazonaws.dynamodb.v20120810#{code}","message":"scripted"}}"#
                ),
            );
        }

        pub(super) fn requests(&self) -> Vec<Request> {
            self.requests.lock().unwrap().clone()
        }

        pub(super) fn client(&self) -> aws_sdk_dynamodb::Client {
            let config = aws_sdk_dynamodb::config::Builder::from(&sdk_config("http://127.0.0.1:9"))
                .http_client(self.clone())
                .retry_config(RetryConfig::disabled())
                .build();
            aws_sdk_dynamodb::Client::from_conf(config)
        }
    }

    impl HttpConnector for Script {
        fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
            let operation = request
                .headers()
                .get("x-amz-target")
                .unwrap_or_default()
                .trim_start_matches("DynamoDB_20120810.")
                .to_owned();
            let body = serde_json::from_slice(request.body().bytes().unwrap()).unwrap();
            self.requests
                .lock()
                .unwrap()
                .push(Request { operation, body });
            let (status, body) = self
                .responses
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or((500, r#"{"__type":"InternalServerError"}"#.to_owned()));
            let mut response =
                HttpResponse::new(StatusCode::try_from(status).unwrap(), SdkBody::from(body));
            response
                .headers_mut()
                .insert("content-type", "application/x-amz-json-1.0");
            HttpConnectorFuture::ready(Ok(response))
        }
    }

    impl HttpClient for Script {
        fn http_connector(
            &self,
            _settings: &HttpConnectorSettings,
            _components: &RuntimeComponents,
        ) -> SharedHttpConnector {
            SharedHttpConnector::new(self.clone())
        }
    }

    /// A clock whose sleeps return at once and are recorded.
    #[derive(Debug, Default)]
    pub(super) struct RecordingClock {
        pub(super) sleeps: Mutex<Vec<Duration>>,
    }

    impl Clock for RecordingClock {
        fn now(&self) -> Instant {
            Instant::now()
        }
        fn system_time(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH
        }
        fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
            self.sleeps.lock().unwrap().push(duration);
            Box::pin(std::future::ready(()))
        }
    }

    /// The expression with its `#placeholders` replaced by the attribute names.
    pub(super) fn resolve(body: &Value, field: &str) -> String {
        let mut text = body[field].as_str().unwrap_or_default().to_owned();
        if let Some(names) = body["ExpressionAttributeNames"].as_object() {
            // Longest placeholders first, so `#cpsub` is not taken for `#cp` + `sub`.
            let mut names: Vec<_> = names.iter().collect();
            names.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
            for (placeholder, name) in names {
                text = text.replace(placeholder.as_str(), name.as_str().unwrap());
            }
        }
        text
    }
}

const ROW: &str = r#"{"Attributes":{"leaseKey":{"S":"k"},"leaseOwner":{"S":"w1"},"leaseCounter":{"N":"8"},"checkpoint":{"S":"TRIM_HORIZON"}}}"#;

fn held_lease() -> Lease {
    let mut lease = Lease::new("k", ExtendedSequenceNumber::TRIM_HORIZON);
    lease.lease_owner = Some("w1".into());
    lease.lease_counter = 7;
    lease
}

#[tokio::test]
async fn dynamo_error_codes_are_mapped() {
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t");
    let lease = held_lease();
    type Check = fn(&LeaseError) -> bool;
    let cases: [(&str, Check); 8] = [
        (
            "ConditionalCheckFailedException",
            |e| matches!(e, LeaseError::ConditionFailed { lease_key } if lease_key == "k"),
        ),
        ("ProvisionedThroughputExceededException", |e| {
            matches!(e, LeaseError::Throttled { .. })
        }),
        ("RequestLimitExceeded", |e| {
            matches!(e, LeaseError::Throttled { .. })
        }),
        ("ThrottlingException", |e| {
            matches!(e, LeaseError::Throttled { .. })
        }),
        (
            "ResourceNotFoundException",
            |e| matches!(e, LeaseError::TableMissing { table } if table == "t"),
        ),
        ("InternalServerError", |e| {
            matches!(e, LeaseError::Service { .. })
        }),
        ("ValidationException", |e| {
            matches!(e, LeaseError::Rejected { .. }) && !e.is_retryable()
        }),
        ("AccessDeniedException", |e| {
            matches!(e, LeaseError::Rejected { .. }) && !e.is_retryable()
        }),
    ];
    for (code, expected) in cases {
        script.error(code);
        let err = store.renew_lease(&lease, None).await.unwrap_err();
        assert!(expected(&err), "{code}: {err:?}");
        // Display never repeats the cause.
        if let Some(source) = std::error::Error::source(&err) {
            assert!(!err.to_string().contains(&source.to_string()), "{err}");
        }
    }
    // get_lease and list_leases map the same way.
    script.error("ProvisionedThroughputExceededException");
    assert!(matches!(
        store.get_lease("k").await,
        Err(LeaseError::Throttled { .. })
    ));
    script.error("ResourceNotFoundException");
    assert!(matches!(
        store.list_leases().await,
        Err(LeaseError::TableMissing { .. })
    ));
}

#[tokio::test]
async fn dynamo_writes_are_conditional_update_items() {
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t");
    let lease = held_lease();
    let esn: ExtendedSequenceNumber = "123.4".parse().unwrap();
    let children: std::collections::BTreeSet<String> = ["c1".to_owned()].into();
    let mut free = lease.clone();
    free.lease_owner = None;
    let mut handing_over = lease.clone();
    handing_over.lease_owner = Some("w2".into());
    handing_over.checkpoint_owner = Some("w1".into());
    for _ in 0..12 {
        script.respond(200, ROW);
    }
    script.respond(200, "{}");
    store
        .create_lease_if_not_exists(&Lease::new("k", ExtendedSequenceNumber::LATEST))
        .await
        .unwrap();
    store.renew_lease(&lease, None).await.unwrap();
    store.take_lease(&lease, "w2").await.unwrap();
    store.take_lease(&free, "w2").await.unwrap();
    store.take_lease(&lease, "w1").await.unwrap();
    store.release_lease(&lease).await.unwrap();
    store.update_checkpoint(&lease, &esn).await.unwrap();
    store
        .update_pending_checkpoint(&lease, Some(&esn))
        .await
        .unwrap();
    store.update_pending_checkpoint(&lease, None).await.unwrap();
    store
        .update_child_shard_ids(&lease, &children)
        .await
        .unwrap();
    store.initiate_handoff(&lease, "w2").await.unwrap();
    store.complete_handoff(&handing_over).await.unwrap();
    store.delete_lease(&lease).await.unwrap();

    let requests = script.requests();
    let ops: Vec<&str> = requests.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "UpdateItem",
            "DeleteItem"
        ]
    );
    let no_handoff =
        "(attribute_not_exists(checkpointOwner) OR attribute_type(checkpointOwner, :null_type))";
    let fenced = format!("leaseCounter = :seen AND leaseOwner = :owner AND {no_handoff}");
    let fenced = fenced.as_str();
    let take = format!("leaseCounter = :seen AND leaseOwner = :seen_owner AND {no_handoff}");
    let take_free = format!(
        "leaseCounter = :seen AND (attribute_not_exists(leaseOwner) OR attribute_type(leaseOwner, :null_type)) AND {no_handoff}"
    );
    let initiate = format!("leaseOwner = :seen_owner AND {no_handoff}");
    let expected = [
        (
            "attribute_not_exists(leaseKey)",
            "SET leaseCounter = :a0, checkpoint = :a1, checkpointSubSequenceNumber = :a2, ownerSwitchesSinceCheckpoint = :a3",
        ),
        (fenced, "SET leaseCounter = leaseCounter + :one"),
        (
            take.as_str(),
            "SET leaseOwner = :new_owner, leaseCounter = leaseCounter + :one, ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one REMOVE checkpointOwner",
        ),
        (
            take_free.as_str(),
            "SET leaseOwner = :new_owner, leaseCounter = leaseCounter + :one, ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one REMOVE checkpointOwner",
        ),
        (
            take.as_str(),
            "SET leaseOwner = :new_owner, leaseCounter = leaseCounter + :one REMOVE checkpointOwner",
        ),
        (
            fenced,
            "SET leaseCounter = leaseCounter + :one REMOVE leaseOwner",
        ),
        (
            fenced,
            "SET leaseCounter = leaseCounter + :one, checkpoint = :cp, checkpointSubSequenceNumber = :cpsub, ownerSwitchesSinceCheckpoint = :zero REMOVE pendingCheckpoint, pendingCheckpointSubSequenceNumber",
        ),
        (
            fenced,
            "SET leaseCounter = leaseCounter + :one, pendingCheckpoint = :pcp, pendingCheckpointSubSequenceNumber = :pcpsub",
        ),
        (
            fenced,
            "SET leaseCounter = leaseCounter + :one REMOVE pendingCheckpoint, pendingCheckpointSubSequenceNumber",
        ),
        (
            fenced,
            "SET leaseCounter = leaseCounter + :one, childShardIds = :children",
        ),
        // The handoff: the counter neither fenced on nor moved by the initiation.
        (
            initiate.as_str(),
            "SET leaseOwner = :new_owner, checkpointOwner = :seen_owner",
        ),
        (
            "leaseOwner = :seen_owner AND checkpointOwner = :seen_cpowner",
            "SET leaseCounter = leaseCounter + :one, ownerSwitchesSinceCheckpoint = if_not_exists(ownerSwitchesSinceCheckpoint, :zero) + :one REMOVE checkpointOwner",
        ),
    ];
    for (request, (condition, update)) in requests.iter().zip(expected) {
        let body = &request.body;
        assert_eq!(body["TableName"], "t");
        assert_eq!(body["Key"], serde_json::json!({"leaseKey": {"S": "k"}}));
        assert_eq!(scripted::resolve(body, "ConditionExpression"), condition);
        assert_eq!(scripted::resolve(body, "UpdateExpression"), update);
        assert_eq!(body["ReturnValues"], "ALL_NEW");
    }
    // The values the conditions compare with.
    assert_eq!(
        requests[1].body["ExpressionAttributeValues"][":seen"],
        serde_json::json!({"N": "7"})
    );
    assert_eq!(
        requests[1].body["ExpressionAttributeValues"][":owner"],
        serde_json::json!({"S": "w1"})
    );
    assert_eq!(
        requests[3].body["ExpressionAttributeValues"][":null_type"],
        serde_json::json!({"S": "NULL"})
    );
    assert_eq!(
        requests[10].body["ExpressionAttributeValues"][":seen_owner"],
        serde_json::json!({"S": "w1"})
    );
    assert_eq!(
        requests[10].body["ExpressionAttributeValues"][":new_owner"],
        serde_json::json!({"S": "w2"})
    );
    assert_eq!(
        requests[11].body["ExpressionAttributeValues"][":seen_owner"],
        serde_json::json!({"S": "w2"})
    );
    assert_eq!(
        requests[11].body["ExpressionAttributeValues"][":seen_cpowner"],
        serde_json::json!({"S": "w1"})
    );
    let delete = &requests[12].body;
    assert_eq!(
        scripted::resolve(delete, "ConditionExpression"),
        "leaseCounter = :seen"
    );
    assert_eq!(
        delete["ExpressionAttributeValues"][":seen"],
        serde_json::json!({"N": "7"})
    );
}

#[tokio::test]
async fn dynamo_renew_with_throughput_sets_throughput_kbps() {
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t");
    let mut lease = Lease::new("k", ExtendedSequenceNumber::LATEST);
    lease.lease_owner = Some("w1".into());
    lease.lease_counter = 7;
    script.respond(200, ROW);
    store.renew_lease(&lease, Some(2.125)).await.unwrap();
    let requests = script.requests();
    let body = &requests[0].body;
    assert_eq!(
        scripted::resolve(body, "UpdateExpression"),
        "SET leaseCounter = leaseCounter + :one, throughputKBps = :tp"
    );
    assert_eq!(
        scripted::resolve(body, "ConditionExpression"),
        "leaseCounter = :seen AND leaseOwner = :owner AND (attribute_not_exists(checkpointOwner) OR attribute_type(checkpointOwner, :null_type))"
    );
    assert_eq!(
        body["ExpressionAttributeValues"][":tp"],
        serde_json::json!({"N": "2.125"})
    );
}

#[tokio::test]
async fn dynamo_client_version_is_a_consistent_get_of_the_coordinator_state() {
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t");
    script.respond(
        200,
        r#"{"Item":{"key":{"S":"Migration3.0"},"cv":{"S":"CLIENT_VERSION_3X"}}}"#,
    );
    script.respond(200, "{}");
    script.error("ResourceNotFoundException");
    assert_eq!(
        store.client_version().await.unwrap().as_deref(),
        Some("CLIENT_VERSION_3X")
    );
    assert_eq!(store.client_version().await.unwrap(), None);
    assert_eq!(store.client_version().await.unwrap(), None);
    let requests = script.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(request.operation, "GetItem");
        assert_eq!(request.body["TableName"], "t-CoordinatorState");
        assert_eq!(
            request.body["Key"],
            serde_json::json!({"key": {"S": "Migration3.0"}})
        );
        assert_eq!(request.body["ConsistentRead"], true);
    }
}

#[tokio::test]
async fn dynamo_reads_are_consistent() {
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t").with_scan_page_size(2);
    script.respond(200, "{}");
    script.respond(
        200,
        r#"{"Items":[{"leaseKey":{"S":"a"},"leaseCounter":{"N":"1"},"checkpoint":{"S":"LATEST"}}],"LastEvaluatedKey":{"leaseKey":{"S":"a"}}}"#,
    );
    script.respond(
        200,
        r#"{"Items":[{"leaseKey":{"S":"b"},"leaseCounter":{"N":"2"},"checkpoint":{"S":"LATEST"}}]}"#,
    );
    assert_eq!(store.get_lease("k").await.unwrap(), None);
    let listed = store.list_leases().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|l| l.lease_key.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );
    let requests = script.requests();
    assert_eq!(requests[0].operation, "GetItem");
    assert_eq!(requests[0].body["ConsistentRead"], true);
    assert_eq!(requests[1].operation, "Scan");
    assert_eq!(requests[1].body["ConsistentRead"], true);
    assert_eq!(requests[1].body["Limit"], 2);
    assert!(requests[1].body.get("ExclusiveStartKey").is_none());
    assert_eq!(requests[2].operation, "Scan");
    assert_eq!(
        requests[2].body["ExclusiveStartKey"],
        serde_json::json!({"leaseKey": {"S": "a"}})
    );
    assert_eq!(requests.len(), 3);
}

fn table(status: &str) -> String {
    format!(r#"{{"Table":{{"TableName":"t","TableStatus":"{status}"}}}}"#)
}

#[tokio::test]
async fn dynamo_create_table_waits_for_active_on_the_clock() {
    let script = scripted::Script::default();
    let clock = Arc::new(scripted::RecordingClock::default());
    let store = DynamoLeaseStore::new(script.client(), "t")
        .with_clock(clock.clone())
        .with_table_wait(Duration::from_secs(2), Duration::from_secs(20));
    script.error("ResourceNotFoundException");
    script.respond(
        200,
        r#"{"TableDescription":{"TableName":"t","TableStatus":"CREATING"}}"#,
    );
    script.error("ResourceNotFoundException");
    script.respond(200, &table("CREATING"));
    script.respond(200, &table("ACTIVE"));
    let billing = BillingMode::Provisioned {
        read_capacity_units: 3,
        write_capacity_units: 4,
    };
    assert!(store.create_table_if_not_exists(billing).await.unwrap());
    assert_eq!(*clock.sleeps.lock().unwrap(), [Duration::from_secs(2); 2]);
    let requests = script.requests();
    let ops: Vec<&str> = requests.iter().map(|r| r.operation.as_str()).collect();
    assert_eq!(
        ops,
        [
            "DescribeTable",
            "CreateTable",
            "DescribeTable",
            "DescribeTable",
            "DescribeTable"
        ]
    );
    let create = &requests[1].body;
    assert_eq!(
        create["KeySchema"],
        serde_json::json!([{"AttributeName": "leaseKey", "KeyType": "HASH"}])
    );
    assert_eq!(
        create["AttributeDefinitions"],
        serde_json::json!([
            {"AttributeName": "leaseKey", "AttributeType": "S"},
            {"AttributeName": "leaseOwner", "AttributeType": "S"}
        ])
    );
    // The index the Java KCL 3.x needs, with the table's provisioned throughput.
    assert_eq!(
        create["GlobalSecondaryIndexes"],
        serde_json::json!([{
            "IndexName": "LeaseOwnerToLeaseKeyIndex",
            "KeySchema": [
                {"AttributeName": "leaseOwner", "KeyType": "HASH"},
                {"AttributeName": "leaseKey", "KeyType": "RANGE"}
            ],
            "Projection": {"ProjectionType": "KEYS_ONLY"},
            "ProvisionedThroughput": {"ReadCapacityUnits": 3, "WriteCapacityUnits": 4}
        }])
    );
    assert_eq!(create["BillingMode"], "PROVISIONED");
    assert_eq!(
        create["ProvisionedThroughput"],
        serde_json::json!({"ReadCapacityUnits": 3, "WriteCapacityUnits": 4})
    );

    // A table that never becomes ACTIVE: bounded by timeout / interval polls.
    let script = scripted::Script::default();
    let clock = Arc::new(scripted::RecordingClock::default());
    let store = DynamoLeaseStore::new(script.client(), "t")
        .with_clock(clock.clone())
        .with_table_wait(Duration::from_secs(1), Duration::from_secs(5));
    for _ in 0..6 {
        script.respond(200, &table("UPDATING"));
    }
    let err = store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap_err();
    assert!(matches!(err, LeaseError::Service { .. }), "{err:?}");
    let cause = std::error::Error::source(&err).unwrap().to_string();
    assert!(cause.contains("not ACTIVE after 5 polls"), "{cause}");
    assert!(cause.contains("UPDATING"), "{cause}");
    assert_eq!(clock.sleeps.lock().unwrap().len(), 4);
    assert_eq!(script.requests().len(), 6);

    // A concurrent creator: ResourceInUseException means "exists", then wait.
    let script = scripted::Script::default();
    let store = DynamoLeaseStore::new(script.client(), "t")
        .with_clock(Arc::new(scripted::RecordingClock::default()));
    script.error("ResourceNotFoundException");
    script.error("ResourceInUseException");
    script.respond(200, &table("ACTIVE"));
    assert!(
        !store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    let create = &script.requests()[1].body;
    assert_eq!(create["BillingMode"], "PAY_PER_REQUEST");
    assert!(create.get("ProvisionedThroughput").is_none());
}
