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
    AttributeDefinition, KeySchemaElement, ProjectionType, ProvisionedThroughput,
};
use aws_sdk_dynamodb::types::{
    AttributeValue, BillingMode as DynamoBillingMode, KeyType, ScalarAttributeType,
};
use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange};
use kcl_lease::dynamo::{DynamoLeaseStore, LEASE_OWNER_INDEX, MalformedRowPolicy};
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
    // Without the lease owner index: a row with a NULL `leaseOwner` (read below) can only
    // exist in a table without it (an index key must be a string).
    let store = DynamoLeaseStore::new(client.clone(), t)
        .with_lease_owner_index(false)
        .with_table_wait(Duration::from_millis(50), Duration::from_secs(10));
    assert!(
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );

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
    expected.throughput_kbps = Some(12.5);
    assert_eq!(owned, expected);
    // A Rust worker steals it; the unknown attributes are left alone, and the take ends any
    // graceful handoff: checkpointOwner is removed.
    let stolen = store.take_lease(&owned, "rust-worker").await.unwrap();
    assert_eq!(stolen.lease_counter, 18);
    assert_eq!(stolen.owner_switches_since_checkpoint, 5);
    let item = raw(&client, t, "shardId-000000000005").await;
    assert_eq!(item["leaseState"], s("SOMETHING_NEW"));
    assert!(!item.contains_key("checkpointOwner"), "{item:?}");
    assert_eq!(item["throughputKBps"], n("12.5"));

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

async fn describe(client: &Client, table: &str) -> aws_sdk_dynamodb::types::TableDescription {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .unwrap()
        .table
        .unwrap()
}

#[tokio::test]
async fn tables_we_create_have_the_lease_owner_index() {
    let (_dynalite, client) = start();
    // On demand (the default): the index as the Java KCL 3.x creates it.
    store(&client, "format-gsi").await;
    let table = describe(&client, "format-gsi").await;
    assert_eq!(table.global_secondary_indexes().len(), 1, "{table:?}");
    let index = &table.global_secondary_indexes()[0];
    assert_eq!(index.index_name(), Some(LEASE_OWNER_INDEX));
    assert_eq!(LEASE_OWNER_INDEX, "LeaseOwnerToLeaseKeyIndex");
    let keys: Vec<(&str, &KeyType)> = index
        .key_schema()
        .iter()
        .map(|k| (k.attribute_name(), k.key_type()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("leaseOwner", &KeyType::Hash),
            ("leaseKey", &KeyType::Range)
        ]
    );
    assert_eq!(
        index.projection().and_then(|p| p.projection_type()),
        Some(&ProjectionType::KeysOnly)
    );
    let attributes: BTreeMap<&str, &ScalarAttributeType> = table
        .attribute_definitions()
        .iter()
        .map(|a| (a.attribute_name(), a.attribute_type()))
        .collect();
    assert_eq!(
        attributes,
        BTreeMap::from([
            ("leaseKey", &ScalarAttributeType::S),
            ("leaseOwner", &ScalarAttributeType::S)
        ])
    );
    // The table works as before: a lease taken is found through the index too.
    let store = DynamoLeaseStore::new(client.clone(), "format-gsi");
    let lease = Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON);
    assert!(store.create_lease_if_not_exists(&lease).await.unwrap());
    store.take_lease(&lease, "worker-1").await.unwrap();
    let by_owner = client
        .query()
        .table_name("format-gsi")
        .index_name(LEASE_OWNER_INDEX)
        .key_condition_expression("leaseOwner = :o")
        .expression_attribute_values(":o", s("worker-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(by_owner.count(), 1);

    // Provisioned: the index gets the table's throughput.
    let provisioned = DynamoLeaseStore::new(client.clone(), "format-gsi-provisioned")
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
    let table = describe(&client, "format-gsi-provisioned").await;
    let index = &table.global_secondary_indexes()[0];
    assert_eq!(index.index_name(), Some(LEASE_OWNER_INDEX));
    let throughput = index.provisioned_throughput().unwrap();
    assert_eq!(throughput.read_capacity_units(), Some(5));
    assert_eq!(throughput.write_capacity_units(), Some(7));

    // Turned off: no index.
    let plain = DynamoLeaseStore::new(client.clone(), "format-no-gsi")
        .with_lease_owner_index(false)
        .with_table_wait(Duration::from_millis(50), Duration::from_secs(10));
    assert!(
        plain
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    let table = describe(&client, "format-no-gsi").await;
    assert!(table.global_secondary_indexes().is_empty(), "{table:?}");
    assert_eq!(table.attribute_definitions().len(), 1);

    // A table that exists is left as it is (no index added).
    create_lease_table_and_wait(&client, "format-gsi-foreign", Duration::from_secs(10))
        .await
        .unwrap();
    let foreign = DynamoLeaseStore::new(client.clone(), "format-gsi-foreign");
    assert!(
        !foreign
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap()
    );
    assert!(
        describe(&client, "format-gsi-foreign")
            .await
            .global_secondary_indexes()
            .is_empty()
    );
}

/// The attributes of `item` this library does not know, with the ones given.
fn unknown(item: &HashMap<String, AttributeValue>) -> BTreeMap<String, AttributeValue> {
    const KNOWN: [&str; 14] = [
        "leaseKey",
        "leaseOwner",
        "leaseCounter",
        "checkpoint",
        "checkpointSubSequenceNumber",
        "pendingCheckpoint",
        "pendingCheckpointSubSequenceNumber",
        "ownerSwitchesSinceCheckpoint",
        "parentShardId",
        "childShardIds",
        "startingHashKey",
        "endingHashKey",
        "throughputKBps",
        "checkpointOwner",
    ];
    item.iter()
        .filter(|(k, _)| !KNOWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[tokio::test]
async fn attributes_we_do_not_know_are_kept_by_every_write() {
    let (_dynalite, client) = start();
    let t = "format-unknown";
    let store = store(&client, t).await;
    let key = "shardId-000000000000";
    // A Java 3.x worker's row, in a graceful handoff, with attributes of its own.
    put(
        &client,
        t,
        vec![
            ("leaseKey", s(key)),
            ("leaseOwner", s("java-new")),
            ("checkpointOwner", s("java-old")),
            ("leaseCounter", n("7")),
            ("checkpoint", s("TRIM_HORIZON")),
            ("checkpointSubSequenceNumber", n("0")),
            ("ownerSwitchesSinceCheckpoint", n("0")),
            ("throughputKBps", n("3.25")),
            ("leaseState", s("SOMETHING_NEW")),
            (
                "pendingCheckpointState",
                AttributeValue::B(vec![1, 2, 3].into()),
            ),
            (
                "extraMap",
                AttributeValue::M(HashMap::from([("a".to_owned(), n("1"))])),
            ),
            ("extraSet", ss(&["x", "y"])),
        ],
    )
    .await;
    let extra = unknown(&raw(&client, t, key).await);
    assert_eq!(extra.len(), 4, "{extra:?}");
    let seen = store.get_lease(key).await.unwrap().unwrap();
    assert_eq!(seen.checkpoint_owner.as_deref(), Some("java-old"));
    assert_eq!(seen.throughput_kbps, Some(3.25));

    // Take: checkpointOwner removed, everything else unknown kept.
    let held = store.take_lease(&seen, "rust").await.unwrap();
    assert_eq!(held.checkpoint_owner, None);
    let item = raw(&client, t, key).await;
    assert!(!item.contains_key("checkpointOwner"), "{item:?}");
    assert_eq!(unknown(&item), extra, "after take");
    assert_eq!(item["throughputKBps"], n("3.25"));

    // Renew without a throughput: the attribute stays; with one: it is written.
    let held = store.renew_lease(&held, None).await.unwrap();
    assert_eq!(raw(&client, t, key).await["throughputKBps"], n("3.25"));
    let held = store.renew_lease(&held, Some(1.5)).await.unwrap();
    assert_eq!(held.throughput_kbps, Some(1.5));
    let item = raw(&client, t, key).await;
    assert_eq!(item["throughputKBps"], n("1.5"));
    assert_eq!(item["leaseCounter"], n("10"));
    assert_eq!(unknown(&item), extra, "after renew");

    // The checkpoint writes and the release.
    let pending: ExtendedSequenceNumber = format!("{BIG}.1").parse().unwrap();
    let held = store
        .update_pending_checkpoint(&held, Some(&pending))
        .await
        .unwrap();
    assert_eq!(unknown(&raw(&client, t, key).await), extra, "after prepare");
    let checkpoint: ExtendedSequenceNumber = format!("{BIG}.2").parse().unwrap();
    let held = store.update_checkpoint(&held, &checkpoint).await.unwrap();
    assert_eq!(
        unknown(&raw(&client, t, key).await),
        extra,
        "after checkpoint"
    );
    let children: BTreeSet<String> = ["shardId-000000000001".to_owned()].into();
    let held = store
        .update_child_shard_ids(&held, &children)
        .await
        .unwrap();
    assert_eq!(
        unknown(&raw(&client, t, key).await),
        extra,
        "after children"
    );
    let released = store.release_lease(&held).await.unwrap();
    let item = raw(&client, t, key).await;
    assert_eq!(unknown(&item), extra, "after release");
    assert!(!item.contains_key("leaseOwner"));
    assert_eq!(released.throughput_kbps, Some(1.5));
}

#[tokio::test]
async fn rows_that_are_not_leases_are_left_out_of_the_list() {
    let (_dynalite, client) = start();
    let t = "format-entities";
    let store = store(&client, t).await;
    let lease = Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON);
    assert!(store.create_lease_if_not_exists(&lease).await.unwrap());
    put(
        &client,
        t,
        vec![
            ("leaseKey", s("shardId-000000000001")),
            ("entityType", s("LEASE")),
            ("leaseCounter", n("1")),
            ("checkpoint", s("LATEST")),
        ],
    )
    .await;
    for (key, kind) in [("app-state-1", "STREAM_METADATA"), ("app-state-2", "OTHER")] {
        put(
            &client,
            t,
            vec![
                ("leaseKey", s(key)),
                ("entityType", s(kind)),
                ("leaseCounter", n("1")),
                ("checkpoint", s("TRIM_HORIZON")),
            ],
        )
        .await;
    }
    // A row that is no lease is left out even when it could not be read as one.
    put(
        &client,
        t,
        vec![("leaseKey", s("app-state-3")), ("entityType", s("OTHER"))],
    )
    .await;
    let strict =
        DynamoLeaseStore::new(client.clone(), t).with_malformed_rows(MalformedRowPolicy::Fail);
    for store in [&store, &strict] {
        for _ in 0..3 {
            let keys: Vec<String> = store
                .list_leases()
                .await
                .unwrap()
                .into_iter()
                .map(|l| l.lease_key)
                .collect();
            assert_eq!(keys.len(), 2, "{keys:?}");
            assert!(keys.iter().all(|k| k.starts_with("shardId-")), "{keys:?}");
        }
    }
}

#[tokio::test]
async fn the_client_version_is_read_from_the_coordinator_state_table() {
    let (_dynalite, client) = start();
    let t = "format-cv";
    let store = store(&client, t).await;
    assert_eq!(
        store.coordinator_state_table_name(),
        "format-cv-CoordinatorState"
    );
    // No coordinator state table: none.
    assert_eq!(store.client_version().await.unwrap(), None);
    client
        .create_table()
        .table_name("format-cv-CoordinatorState")
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("key")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("key")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .provisioned_throughput(
            ProvisionedThroughput::builder()
                .read_capacity_units(5)
                .write_capacity_units(5)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    for _ in 0..200 {
        let status = describe(&client, "format-cv-CoordinatorState")
            .await
            .table_status()
            .cloned();
        if status == Some(aws_sdk_dynamodb::types::TableStatus::Active) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The table without the item: none.
    assert_eq!(store.client_version().await.unwrap(), None);
    let table = "format-cv-CoordinatorState";
    put(
        &client,
        table,
        vec![("key", s("Leader")), ("ownerName", s("j1"))],
    )
    .await;
    assert_eq!(store.client_version().await.unwrap(), None);
    for cv in [
        "CLIENT_VERSION_UPGRADE_FROM_2X",
        "CLIENT_VERSION_3X_WITH_ROLLBACK",
        "CLIENT_VERSION_3X",
        "CLIENT_VERSION_2X",
    ] {
        put(
            &client,
            table,
            vec![
                ("key", s("Migration3.0")),
                ("cv", s(cv)),
                ("mb", s("j1")),
                ("mts", n("1700000000000")),
            ],
        )
        .await;
        assert_eq!(store.client_version().await.unwrap().as_deref(), Some(cv));
    }
}
