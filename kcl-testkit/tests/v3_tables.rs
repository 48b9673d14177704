//! The 3.x state tables on dynalite (`kcl_lease::v3`): the same `StateTable` scenario on
//! `DynamoStateTable` and on `InMemoryStateTable` (so the fake answers as DynamoDB does),
//! the leader lock, the migration item and a WorkerMetricStats row in the Java layout, and
//! the follower's `LeaseOwnerToLeaseKeyIndex` query.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::test_util::ManualClock;
use kcl_lease::v3::dynamo::{DynamoStateTable, LeaseOwnerIndex};
use kcl_lease::v3::item::{Condition, Item, Value};
use kcl_lease::v3::lock::{LeaderLock, LeaderLockConfig, LeaderStatus, LockItem};
use kcl_lease::v3::memory::InMemoryStateTable;
use kcl_lease::v3::migration::{self, ClientVersion, ClientVersionConfig, MigrationState};
use kcl_lease::v3::table::{StateTable, Update};
use kcl_lease::v3::worker_metrics::{MetricStatsRecorder, WorkerMetricStats};
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore, SeededRandom, SystemClock};
use kcl_testkit::emulators::{dynamodb_client, shared_kinesis_and_dynamodb};

const LIMIT: Duration = Duration::from_secs(5);

fn client() -> Client {
    let shared = shared_kinesis_and_dynamodb().unwrap_or_else(|e| panic!("{e}"));
    dynamodb_client(shared.dynamodb.endpoint())
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn dynamo_table(client: &Client, name: &str, key: &str) -> Arc<DynamoStateTable> {
    let table = DynamoStateTable::new(client.clone(), name, key)
        .with_poll_interval(Duration::from_millis(50))
        .with_call_timeout(LIMIT);
    assert!(
        table
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    assert!(
        !table
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    Arc::new(table)
}

async fn raw(
    client: &Client,
    table: &str,
    key_name: &str,
    key: &str,
) -> HashMap<String, AttributeValue> {
    client
        .get_item()
        .table_name(table)
        .key(key_name, AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_else(|| panic!("no item {key}"))
}

fn item(pairs: &[(&str, Value)]) -> Item {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// One scenario of conditional writes; every answer is compared with what DynamoDB gives.
async fn state_table_scenario(t: &dyn StateTable) {
    let a = item(&[
        ("key", Value::s("a")),
        ("v", Value::s("1")),
        (
            "nested",
            Value::M(BTreeMap::from([(
                "l".to_owned(),
                Value::L(vec![Value::int(1), Value::s("x")]),
            )])),
        ),
    ]);
    assert_eq!(t.get("a").await.unwrap(), None);
    t.put(&a, &Condition::not_exists("key")).await.unwrap();
    assert_eq!(t.get("a").await.unwrap(), Some(a.clone()));
    let err = t.put(&a, &Condition::not_exists("key")).await.unwrap_err();
    assert!(
        matches!(err, LeaseError::ConditionFailed { ref lease_key } if lease_key == "a"),
        "{err:?}"
    );

    let upd = Update::new()
        .set("v", Value::s("2"))
        .set("n", Value::float(2.5))
        .remove("nested");
    let wrong = Condition::And(vec![
        Condition::exists("key"),
        Condition::equals("v", Value::s("9")),
    ]);
    assert!(
        t.update("a", &upd, &wrong)
            .await
            .unwrap_err()
            .is_condition_failed()
    );
    let right = Condition::And(vec![
        Condition::exists("key"),
        Condition::equals("v", Value::s("1")),
    ]);
    t.update("a", &upd, &right).await.unwrap();
    let now = t.get("a").await.unwrap().unwrap();
    assert_eq!(
        now,
        item(&[
            ("key", Value::s("a")),
            ("v", Value::s("2")),
            ("n", Value::N("2.5".into()))
        ])
    );

    // An update of a missing item creates it; with an exists condition it fails.
    t.update(
        "b",
        &Update::new().set("v", Value::s("x")),
        &Condition::Always,
    )
    .await
    .unwrap();
    assert_eq!(
        t.get("b").await.unwrap(),
        Some(item(&[("key", Value::s("b")), ("v", Value::s("x"))]))
    );
    let err = t
        .update(
            "c",
            &Update::new().set("v", Value::s("x")),
            &Condition::exists("key"),
        )
        .await;
    assert!(err.unwrap_err().is_condition_failed());
    assert_eq!(t.get("c").await.unwrap(), None);

    // Equality on a number compares numbers; on a missing attribute it fails.
    let num = Condition::equals("n", Value::N("2.5".into()));
    t.update("a", &Update::new().set("w", Value::Bool(true)), &num)
        .await
        .unwrap();
    assert!(
        t.delete("a", &Condition::equals("missing", Value::s("x")))
            .await
            .unwrap_err()
            .is_condition_failed()
    );
    t.delete("a", &Condition::equals("w", Value::Bool(true)))
        .await
        .unwrap();
    t.delete("never-existed", &Condition::Always).await.unwrap();
    let mut keys: Vec<String> = t
        .scan()
        .await
        .unwrap()
        .iter()
        .map(|i| i["key"].as_s().unwrap().to_owned())
        .collect();
    keys.sort();
    assert_eq!(keys, ["b"]);
}

#[tokio::test]
async fn the_state_table_answers_like_dynamodb_in_both_implementations() {
    let client = client();
    let dynamo = dynamo_table(&client, &unique("st"), "key").await;
    state_table_scenario(&*dynamo).await;
    let memory = InMemoryStateTable::existing("memory", "key");
    state_table_scenario(&memory).await;
    // A missing table is TableMissing on both.
    let missing = DynamoStateTable::new(client.clone(), unique("absent"), "key");
    assert!(matches!(
        missing.get("x").await,
        Err(LeaseError::TableMissing { .. })
    ));
    assert!(matches!(
        InMemoryStateTable::new("absent", "key").get("x").await,
        Err(LeaseError::TableMissing { .. })
    ));
}

#[tokio::test]
async fn the_leader_lock_on_dynamodb_writes_the_lock_client_item() {
    let client = client();
    let name = unique("app") + "-CoordinatorState";
    let table = dynamo_table(&client, &name, "key").await;
    let clock = ManualClock::new();
    let lock = |me: &str, seed| {
        LeaderLock::new(
            table.clone(),
            LeaderLockConfig::for_failover_time(me, Duration::from_secs(10)),
            Arc::new(clock.clone()),
            Arc::new(SeededRandom::new(seed)),
        )
        .unwrap()
    };
    let (mut a, mut b) = (lock("worker-a", 1), lock("worker-b", 2));
    assert_eq!(a.check().await.unwrap(), LeaderStatus::Leader);
    let item = raw(&client, &name, "key", "Leader").await;
    let mut names: Vec<&str> = item.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["key", "leaseDuration", "ownerName", "recordVersionNumber"]
    );
    assert_eq!(item["ownerName"], AttributeValue::S("worker-a".into()));
    assert_eq!(item["leaseDuration"], AttributeValue::S("10000".into()));
    let first_rvn = item["recordVersionNumber"].as_s().unwrap().clone();
    assert_eq!(first_rvn.len(), 36);

    assert_eq!(
        b.check().await.unwrap(),
        LeaderStatus::Follower {
            leader: Some("worker-a".into())
        }
    );
    clock.advance(Duration::from_secs(3));
    assert!(a.heartbeat().await.unwrap());
    let after = raw(&client, &name, "key", "Leader").await;
    assert_ne!(after["recordVersionNumber"].as_s().unwrap(), &first_rvn);
    // a stops; b takes over once the number stood for more than 10 s since b first saw it.
    assert!(matches!(
        b.check().await.unwrap(),
        LeaderStatus::Follower { .. }
    ));
    clock.advance(Duration::from_secs(10));
    assert!(matches!(
        b.check().await.unwrap(),
        LeaderStatus::Follower { .. }
    ));
    clock.advance(Duration::from_millis(1));
    assert_eq!(b.check().await.unwrap(), LeaderStatus::Leader);
    assert!(!a.heartbeat().await.unwrap(), "a's time ran out");
    assert_eq!(
        LockItem::from_item(&table.get("Leader").await.unwrap().unwrap())
            .unwrap()
            .owner_name,
        "worker-b"
    );
    // Graceful release deletes the item; a takes it at its next check.
    assert!(b.release().await.unwrap());
    assert_eq!(table.get("Leader").await.unwrap(), None);
    assert_eq!(a.check().await.unwrap(), LeaderStatus::Leader);
}

#[tokio::test]
async fn migration_and_worker_metric_items_in_the_java_layout() {
    let client = client();
    let app = unique("app");
    let state = dynamo_table(&client, &format!("{app}-CoordinatorState"), "key").await;
    let clock = SystemClock;
    // The state a KCL rollback leaves, written raw as the Java KCL writes it.
    client
        .put_item()
        .table_name(format!("{app}-CoordinatorState"))
        .item("key", AttributeValue::S("Migration3.0".into()))
        .item(
            "cv",
            AttributeValue::S("CLIENT_VERSION_3X_WITH_ROLLBACK".into()),
        )
        .item("mb", AttributeValue::S("java-1".into()))
        .item("mts", AttributeValue::N("1700000000000".into()))
        .send()
        .await
        .unwrap();
    let (version, now) = migration::initialize(
        &*state,
        &clock,
        LIMIT,
        ClientVersionConfig::V3x,
        "rust-1",
        1_700_000_001_000,
    )
    .await
    .unwrap();
    assert_eq!(version, ClientVersion::V3x);
    let item = raw(
        &client,
        &format!("{app}-CoordinatorState"),
        "key",
        "Migration3.0",
    )
    .await;
    assert_eq!(item["cv"], AttributeValue::S("CLIENT_VERSION_3X".into()));
    assert_eq!(item["mb"], AttributeValue::S("rust-1".into()));
    assert_eq!(item["mts"], AttributeValue::N("1700000001000".into()));
    let h = item["h"].as_l().unwrap();
    assert_eq!(h.len(), 1);
    let entry = h[0].as_m().unwrap();
    assert_eq!(
        entry["cv"],
        AttributeValue::S("CLIENT_VERSION_3X_WITH_ROLLBACK".into())
    );
    assert_eq!(entry["mts"], AttributeValue::N("1700000000000".into()));
    assert_eq!(
        migration::read_state(&*state, &clock, LIMIT).await.unwrap(),
        Some(now.clone())
    );
    // A stale change (cv moved on) is refused.
    let stale = MigrationState::new(ClientVersion::UpgradeFrom2x, "x", 1);
    let next = stale.changed(ClientVersion::V3xWithRollback, "x", 2);
    assert!(
        !migration::write_change(&*state, &clock, LIMIT, &stale, &next)
            .await
            .unwrap()
    );

    // A WorkerMetricStats row written the way the Java reporter writes it.
    let metrics = dynamo_table(&client, &format!("{app}-WorkerMetricStats"), "wid").await;
    let mut recorder = MetricStatsRecorder::cpu();
    recorder.record("C", 12.5);
    recorder.record("C", 17.5);
    let row = recorder.report("rust-1", 1_700_000_002);
    metrics
        .update("rust-1", &row.update(), &Condition::Always)
        .await
        .unwrap();
    let item = raw(
        &client,
        &format!("{app}-WorkerMetricStats"),
        "wid",
        "rust-1",
    )
    .await;
    assert_eq!(item["lut"], AttributeValue::N("1700000002".into()));
    let sts = item["sts"].as_m().unwrap();
    assert_eq!(
        sts["C"],
        AttributeValue::L(vec![AttributeValue::N("15".into())])
    );
    let opr = item["opr"].as_m().unwrap();
    assert_eq!(
        opr["C"],
        AttributeValue::L(vec![AttributeValue::N("100".into())])
    );
    let rows: Vec<WorkerMetricStats> = metrics
        .scan()
        .await
        .unwrap()
        .iter()
        .map(|i| WorkerMetricStats::from_item(i).unwrap())
        .collect();
    assert_eq!(rows, [row]);
}

#[tokio::test]
async fn followers_find_their_leases_through_the_lease_owner_index() {
    let client = client();
    let table = unique("leases");
    let store = DynamoLeaseStore::new(client.clone(), &table)
        .with_table_wait(Duration::from_millis(50), Duration::from_secs(10));
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    for i in 0..5 {
        let lease = Lease::new(
            format!("shardId-{i:012}"),
            ExtendedSequenceNumber::TRIM_HORIZON,
        );
        store.create_lease_if_not_exists(&lease).await.unwrap();
        let owner = if i % 2 == 0 { "worker-a" } else { "worker-b" };
        store.take_lease(&lease, owner).await.unwrap();
    }
    let index = LeaseOwnerIndex::new(client.clone(), &table, Arc::new(SystemClock), LIMIT);
    let a = index.lease_keys_of("worker-a").await.unwrap();
    assert_eq!(
        a,
        [
            "shardId-000000000000",
            "shardId-000000000002",
            "shardId-000000000004"
        ]
    );
    assert_eq!(index.lease_keys_of("worker-b").await.unwrap().len(), 2);
    assert!(index.lease_keys_of("nobody").await.unwrap().is_empty());
}
