//! The lease table's row format on dynalite (and the main checks again on moto): what `DynamoLeaseStore` writes is exactly the
//! Java KCL 2.x layout (names and DynamoDB types, nothing else), and rows written the way a
//! Java worker writes them are read back.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode as DynamoBillingMode, KeyType, ScalarAttributeType,
};
use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange};
use kcl_lease::dynamo::{DynamoLeaseStore, MalformedRowPolicy};
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore};
use kcl_testkit::emulators::{
    Emulator, EmulatorKind, create_lease_table_and_wait, dynamodb_client,
};

const BIG: &str = "49590338271490256608559692538361571095921575989136588898";
const MAX_KEY: &str = "340282366920938463463374607431768211455";

/// What an attribute must be.
#[derive(Clone, Copy, Debug)]
enum Is {
    S(&'static str),
    N(&'static str),
    Ss(&'static [&'static str]),
}

fn start_kind(kind: EmulatorKind) -> (Emulator, Client) {
    let emulator = Emulator::start(kind).unwrap_or_else(|e| panic!("{e}"));
    let client = dynamodb_client(emulator.endpoint());
    (emulator, client)
}

fn start() -> (Emulator, Client) {
    start_kind(EmulatorKind::Dynalite)
}

async fn store(client: &Client, table: &str) -> DynamoLeaseStore {
    let store = DynamoLeaseStore::new(client.clone(), table)
        .with_table_wait(Duration::from_millis(50), Duration::from_secs(10));
    assert!(
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    store
}

async fn raw(client: &Client, table: &str, key: &str) -> HashMap<String, AttributeValue> {
    client
        .get_item()
        .table_name(table)
        .key("leaseKey", AttributeValue::S(key.into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap_or_else(|| panic!("no item {key}"))
}

/// The item has exactly these attributes, with these types and values.
async fn assert_row(client: &Client, table: &str, key: &str, expected: &[(&str, Is)]) {
    let item = raw(client, table, key).await;
    let names: BTreeSet<&str> = item.keys().map(String::as_str).collect();
    let mut expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| *n).collect();
    expected_names.insert("leaseKey");
    assert_eq!(names, expected_names, "attribute names of {key}: {item:?}");
    assert_eq!(item["leaseKey"], AttributeValue::S(key.into()));
    for (name, is) in expected {
        let value = &item[*name];
        match is {
            Is::S(v) => assert_eq!(value, &AttributeValue::S((*v).into()), "{key}.{name}"),
            Is::N(v) => assert_eq!(value, &AttributeValue::N((*v).into()), "{key}.{name}"),
            Is::Ss(v) => {
                let AttributeValue::Ss(got) = value else {
                    panic!("{key}.{name} is not SS: {value:?}");
                };
                let got: BTreeSet<&str> = got.iter().map(String::as_str).collect();
                let want: BTreeSet<&str> = v.iter().copied().collect();
                assert_eq!(got, want, "{key}.{name}");
            }
        }
    }
}

#[tokio::test]
async fn rows_written_have_the_java_kcl_layout() {
    rows_written(EmulatorKind::Dynalite).await;
}

/// The same on moto, a second, independent server.
#[tokio::test]
async fn rows_written_have_the_java_kcl_layout_on_moto() {
    rows_written(EmulatorKind::Moto).await;
}

async fn rows_written(kind: EmulatorKind) {
    let (_emulator, client) = start_kind(kind);
    let t = "format-written";
    let store = store(&client, t).await;
    let half = u128::MAX / 2;

    // A root shard: no parentShardId, no owner, no pending checkpoint, no children.
    let root = Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON)
        .with_hash_key_range(HashKeyRange::FULL);
    assert!(store.create_lease_if_not_exists(&root).await.unwrap());
    assert_row(
        &client,
        t,
        "shardId-000000000000",
        &[
            ("leaseCounter", Is::N("0")),
            ("checkpoint", Is::S("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
            ("startingHashKey", Is::S("0")),
            ("endingHashKey", Is::S(MAX_KEY)),
        ],
    )
    .await;

    // A split child: one parent.
    let split = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON)
        .with_parents(["shardId-000000000000"])
        .with_hash_key_range(HashKeyRange::new(0, half).unwrap());
    assert!(store.create_lease_if_not_exists(&split).await.unwrap());
    assert_row(
        &client,
        t,
        "shardId-000000000001",
        &[
            ("leaseCounter", Is::N("0")),
            ("checkpoint", Is::S("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
            ("parentShardId", Is::Ss(&["shardId-000000000000"])),
            ("startingHashKey", Is::S("0")),
            (
                "endingHashKey",
                Is::S("170141183460469231731687303715884105727"),
            ),
        ],
    )
    .await;

    // A merge child: two parents; no hash key range known.
    let merge = Lease::new("shardId-000000000003", ExtendedSequenceNumber::LATEST)
        .with_parents(["shardId-000000000001", "shardId-000000000002"]);
    assert!(store.create_lease_if_not_exists(&merge).await.unwrap());
    assert_row(
        &client,
        t,
        "shardId-000000000003",
        &[
            ("leaseCounter", Is::N("0")),
            ("checkpoint", Is::S("LATEST")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
            (
                "parentShardId",
                Is::Ss(&["shardId-000000000001", "shardId-000000000002"]),
            ),
        ],
    )
    .await;

    // Owned.
    let key = "shardId-000000000000";
    let full = |extra: &[(&'static str, Is)]| {
        let mut v: Vec<(&'static str, Is)> = vec![
            ("startingHashKey", Is::S("0")),
            ("endingHashKey", Is::S(MAX_KEY)),
        ];
        v.extend_from_slice(extra);
        v
    };
    let held = store.take_lease(&root, "worker-1").await.unwrap();
    assert_row(
        &client,
        t,
        key,
        &full(&[
            ("leaseOwner", Is::S("worker-1")),
            ("leaseCounter", Is::N("1")),
            ("checkpoint", Is::S("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("1")),
        ]),
    )
    .await;

    // A pending checkpoint with a sub-sequence number.
    let pending: ExtendedSequenceNumber = format!("{BIG}.9").parse().unwrap();
    let held = store
        .update_pending_checkpoint(&held, Some(&pending))
        .await
        .unwrap();
    assert_row(
        &client,
        t,
        key,
        &full(&[
            ("leaseOwner", Is::S("worker-1")),
            ("leaseCounter", Is::N("2")),
            ("checkpoint", Is::S("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("pendingCheckpoint", Is::S(BIG)),
            ("pendingCheckpointSubSequenceNumber", Is::N("9")),
            ("ownerSwitchesSinceCheckpoint", Is::N("1")),
        ]),
    )
    .await;

    // A checkpoint with a sub-sequence number: the pending one is removed.
    let checkpoint: ExtendedSequenceNumber = format!("{BIG}.5").parse().unwrap();
    let held = store.update_checkpoint(&held, &checkpoint).await.unwrap();
    assert_row(
        &client,
        t,
        key,
        &full(&[
            ("leaseOwner", Is::S("worker-1")),
            ("leaseCounter", Is::N("3")),
            ("checkpoint", Is::S(BIG)),
            ("checkpointSubSequenceNumber", Is::N("5")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
        ]),
    )
    .await;

    // Child shard ids and SHARD_END.
    let children: BTreeSet<String> = ["shardId-000000000001", "shardId-000000000002"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let held = store
        .update_child_shard_ids(&held, &children)
        .await
        .unwrap();
    let held = store
        .update_checkpoint(&held, &ExtendedSequenceNumber::SHARD_END)
        .await
        .unwrap();
    assert_row(
        &client,
        t,
        key,
        &full(&[
            ("leaseOwner", Is::S("worker-1")),
            ("leaseCounter", Is::N("5")),
            ("checkpoint", Is::S("SHARD_END")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
            (
                "childShardIds",
                Is::Ss(&["shardId-000000000001", "shardId-000000000002"]),
            ),
        ]),
    )
    .await;

    // Released: leaseOwner is removed, not set to NULL or "".
    let released = store.release_lease(&held).await.unwrap();
    assert_eq!(released.lease_owner, None);
    assert_row(
        &client,
        t,
        key,
        &full(&[
            ("leaseCounter", Is::N("6")),
            ("checkpoint", Is::S("SHARD_END")),
            ("checkpointSubSequenceNumber", Is::N("0")),
            ("ownerSwitchesSinceCheckpoint", Is::N("0")),
            (
                "childShardIds",
                Is::Ss(&["shardId-000000000001", "shardId-000000000002"]),
            ),
        ]),
    )
    .await;
}

#[tokio::test]
async fn table_key_schema_and_billing() {
    let (_dynalite, client) = start();
    let on_demand = store(&client, "format-on-demand").await;
    assert!(on_demand.table_exists().await.unwrap());
    let table = client
        .describe_table()
        .table_name("format-on-demand")
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let key = &table.key_schema()[0];
    assert_eq!(table.key_schema().len(), 1);
    assert_eq!(
        (key.attribute_name(), key.key_type()),
        ("leaseKey", &KeyType::Hash)
    );
    let attr = &table.attribute_definitions()[0];
    assert_eq!(
        (attr.attribute_name(), attr.attribute_type()),
        ("leaseKey", &ScalarAttributeType::S)
    );
    assert_eq!(
        table.billing_mode_summary().and_then(|b| b.billing_mode()),
        Some(&DynamoBillingMode::PayPerRequest)
    );

    let provisioned = DynamoLeaseStore::new(client.clone(), "format-provisioned")
        .with_table_wait(Duration::from_millis(50), Duration::from_secs(10));
    let billing = BillingMode::Provisioned {
        read_capacity_units: 5,
        write_capacity_units: 7,
    };
    assert!(
        provisioned
            .create_table_if_not_exists(billing)
            .await
            .unwrap()
    );
    assert!(
        !provisioned
            .create_table_if_not_exists(billing)
            .await
            .unwrap()
    );
    let table = client
        .describe_table()
        .table_name("format-provisioned")
        .send()
        .await
        .unwrap()
        .table
        .unwrap();
    let throughput = table.provisioned_throughput().unwrap();
    assert_eq!(throughput.read_capacity_units(), Some(5));
    assert_eq!(throughput.write_capacity_units(), Some(7));

    // A table someone else created is used as it is.
    create_lease_table_and_wait(&client, "format-foreign", Duration::from_secs(10))
        .await
        .unwrap();
    let foreign = DynamoLeaseStore::new(client.clone(), "format-foreign");
    assert_eq!(foreign.table_name(), "format-foreign");
    assert!(
        !foreign
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.into())
}
fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.into())
}
fn ss(v: &[&str]) -> AttributeValue {
    AttributeValue::Ss(v.iter().map(|x| (*x).to_owned()).collect())
}

async fn put(client: &Client, table: &str, item: Vec<(&str, AttributeValue)>) {
    client
        .put_item()
        .table_name(table)
        .set_item(Some(
            item.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        ))
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn rows_written_by_a_java_worker_are_read() {
    java_rows(EmulatorKind::Dynalite).await;
}

/// The same on moto, a second, independent server.
#[tokio::test]
async fn rows_written_by_a_java_worker_are_read_on_moto() {
    java_rows(EmulatorKind::Moto).await;
}

async fn java_rows(kind: EmulatorKind) {
    let (_emulator, client) = start_kind(kind);
    let t = "format-java";
    let store = store(&client, t).await;

    // An owned lease with every attribute, plus attributes this library does not know.
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000005")),
            ("leaseOwner", s("java-worker-1")),
            ("leaseCounter", n("17")),
            ("checkpoint", s(BIG)),
            ("checkpointSubSequenceNumber", n("2")),
            ("pendingCheckpoint", s("1000")),
            ("pendingCheckpointSubSequenceNumber", n("1")),
            ("ownerSwitchesSinceCheckpoint", n("4")),
            (
                "parentShardId",
                ss(&["shardId-000000000001", "shardId-000000000002"]),
            ),
            ("childShardIds", ss(&["shardId-000000000009"])),
            ("startingHashKey", s("0")),
            ("endingHashKey", s(MAX_KEY)),
            ("checkpointOwner", AttributeValue::Null(true)),
            ("leaseState", s("SOMETHING_NEW")),
            (
                "pendingCheckpointState",
                AttributeValue::B(vec![1, 2, 3].into()),
            ),
            ("throughputKBps", n("12.5")),
            (
                "extraMap",
                AttributeValue::M(HashMap::from([("a".to_owned(), n("1"))])),
            ),
        ],
    )
    .await;
    let owned = store
        .get_lease("shardId-000000000005")
        .await
        .unwrap()
        .unwrap();
    let mut expected = Lease::new("shardId-000000000005", format!("{BIG}.2").parse().unwrap())
        .with_parents(["shardId-000000000001", "shardId-000000000002"])
        .with_hash_key_range(HashKeyRange::FULL);
    expected.lease_owner = Some("java-worker-1".into());
    expected.lease_counter = 17;
    expected.pending_checkpoint = Some("1000.1".parse().unwrap());
    expected.owner_switches_since_checkpoint = 4;
    expected.child_shard_ids = ["shardId-000000000009".to_owned()].into();
    assert_eq!(owned, expected);
    // A Rust worker steals it; the unknown attributes are left alone.
    let stolen = store.take_lease(&owned, "rust-worker").await.unwrap();
    assert_eq!(stolen.lease_counter, 18);
    assert_eq!(stolen.owner_switches_since_checkpoint, 5);
    let item = raw(&client, t, "shardId-000000000005").await;
    assert_eq!(item["leaseState"], s("SOMETHING_NEW"));
    assert_eq!(item["checkpointOwner"], AttributeValue::Null(true));

    // leaseOwner NULL, and the optional numbers missing: a free lease at sub-sequence 0.
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000006")),
            ("leaseOwner", AttributeValue::Null(true)),
            ("leaseCounter", n("3")),
            ("checkpoint", s("TRIM_HORIZON")),
            ("checkpointOwner", AttributeValue::Null(true)),
        ],
    )
    .await;
    let free = store
        .get_lease("shardId-000000000006")
        .await
        .unwrap()
        .unwrap();
    let mut expected = Lease::new("shardId-000000000006", ExtendedSequenceNumber::TRIM_HORIZON);
    expected.lease_counter = 3;
    assert_eq!(free, expected);
    // It can be taken (the NULL owner counts as free), checkpointed and released.
    let taken = store.take_lease(&free, "rust-worker").await.unwrap();
    assert_eq!(taken.lease_owner.as_deref(), Some("rust-worker"));
    assert_eq!(
        (taken.lease_counter, taken.owner_switches_since_checkpoint),
        (4, 1)
    );
    let done = store
        .update_checkpoint(&taken, &"77".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(done.checkpoint, "77".parse().unwrap());
    store.release_lease(&done).await.unwrap();

    // leaseOwner absent, a pending checkpoint without its sub-sequence number.
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000007")),
            ("leaseCounter", n("0")),
            ("checkpoint", s("LATEST")),
            ("pendingCheckpoint", s("55")),
            ("ownerSwitchesSinceCheckpoint", n("0")),
        ],
    )
    .await;
    let bare = store
        .get_lease("shardId-000000000007")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bare.lease_owner, None);
    assert_eq!(bare.pending_checkpoint, Some("55".parse().unwrap()));

    let all: BTreeMap<String, Lease> = store
        .list_leases()
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect();
    assert_eq!(
        all.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "shardId-000000000005",
            "shardId-000000000006",
            "shardId-000000000007"
        ]
    );
}

#[tokio::test]
async fn malformed_rows_are_named() {
    let (_dynalite, client) = start();
    let t = "format-malformed";
    let store = store(&client, t).await;
    let good = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON);
    store.create_lease_if_not_exists(&good).await.unwrap();
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000002")),
            ("leaseCounter", s("7")),
            ("checkpoint", s("TRIM_HORIZON")),
        ],
    )
    .await;
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000003")),
            ("leaseCounter", n("7")),
            ("checkpoint", s("not-a-sequence-number")),
        ],
    )
    .await;

    for key in ["shardId-000000000002", "shardId-000000000003"] {
        match store.get_lease(key).await {
            Err(LeaseError::MalformedLease { lease_key, reason }) => {
                assert_eq!(lease_key, key);
                eprintln!("{key}: {reason}");
            }
            other => panic!("{key}: expected MalformedLease, got {other:?}"),
        }
    }
    // Default: the bad rows are left out of the list (with a warning), the good one is there.
    assert_eq!(store.list_leases().await.unwrap(), vec![good]);
    // Strict: the list fails, naming a bad row.
    let strict =
        DynamoLeaseStore::new(client.clone(), t).with_malformed_rows(MalformedRowPolicy::Fail);
    match strict.list_leases().await {
        Err(LeaseError::MalformedLease { lease_key, .. }) => assert!(
            lease_key == "shardId-000000000002" || lease_key == "shardId-000000000003",
            "{lease_key}"
        ),
        other => panic!("expected MalformedLease, got {other:?}"),
    }
}
