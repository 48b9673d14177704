//! The lease table in DynamoDB: [`DynamoLeaseStore`].
//!
//! The table has the Java KCL 2.x layout (attribute names in [`attr`]), so a
//! Rust worker and a Java worker can read each other's rows.
//!
//! Every write is one conditional call translating one [`LeaseWrite`] (the table of writes,
//! with the fields each changes and its fence, is in [`crate::write`]): the
//! `ConditionExpression` is derived from [`LeaseWrite::fence`] and the update expression
//! from the write's change, with expression attribute names and values:
//!
//! | fence | condition |
//! |---|---|
//! | [`Fence::NotExists`] | `attribute_not_exists(leaseKey)` |
//! | [`Fence::Counter`] | `leaseCounter = :seen` |
//! | [`Fence::CounterAndOwner`] with an owner | `leaseCounter = :seen AND leaseOwner = :owner AND` the `checkpointOwner` clause |
//! | [`Fence::CounterAndOwner`] without owner | `leaseCounter = :seen AND (attribute_not_exists(leaseOwner) OR attribute_type(leaseOwner, NULL)) AND` the `checkpointOwner` clause |
//! | [`Fence::Owners`] | `leaseOwner = :owner AND` the `checkpointOwner` clause |
//!
//! The `checkpointOwner` clause is `checkpointOwner = :cpo` for a lease seen in a handoff,
//! `(attribute_not_exists(checkpointOwner) OR attribute_type(checkpointOwner, NULL))`
//! otherwise (as the Java KCL 3.x renewal's `attribute_not_exists(checkpointOwner)`).
//!
//! | write | request |
//! |---|---|
//! | create | `UpdateItem`, `SET` every attribute of the row |
//! | renew | `UpdateItem`, counter + 1, `SET throughputKBps = :tp` when given |
//! | take | `UpdateItem`, owner, counter + 1, switches + 1 if the owner changes, `REMOVE checkpointOwner` |
//! | release | `UpdateItem`, `REMOVE leaseOwner`, counter + 1 |
//! | checkpoint | `UpdateItem`, checkpoint fields, switches = 0, `REMOVE` pending, counter + 1 |
//! | pending checkpoint | `UpdateItem`, `SET` or `REMOVE` pending, counter + 1 |
//! | child shard ids | `UpdateItem`, `SET` or `REMOVE childShardIds`, counter + 1 |
//! | initiate handoff | `UpdateItem`, `SET leaseOwner = :next, checkpointOwner = :seen_owner` (the counter stays) |
//! | complete handoff | `UpdateItem`, `REMOVE checkpointOwner`, counter + 1, switches + 1 |
//! | delete | `DeleteItem` |
//!
//! No `PutItem` is ever sent: each write names the attributes it changes, so every other
//! attribute of the row (those written by other clients included) is kept. Updates ask for `ReturnValues::AllNew` and return the new row.
//! Reads are consistent (`GetItem` and `Scan` with `ConsistentRead`); a list follows
//! `LastEvaluatedKey` through every page.
//!
//! Renew, release and the checkpoint writes are fenced on the owner: given a lease seen
//! without owner their fence is [`LeaseError::NotHeld`] and DynamoDB is not called.
//!
//! # The table
//!
//! [`LeaseStore::create_table_if_not_exists`] creates the table (HASH `leaseKey`) with the
//! global secondary index [`LEASE_OWNER_INDEX`] (HASH `leaseOwner`, RANGE `leaseKey`,
//! projection `KEYS_ONLY`, with the table's provisioned throughput when the table is
//! provisioned), as the Java KCL 3.x creates it: a Java 3.x worker insists on that index and
//! cannot always add it later (not on every emulator). [`DynamoLeaseStore::with_lease_owner_index`]
//! leaves it out. A table that exists already is left as it is.
//!
//! [`LeaseStore::client_version`] reads the `cv` of the `Migration3.0` item of
//! `<table>-CoordinatorState` (consistent `GetItem`); a missing table or item is `None`.
//!
//! # Reading rows written by others
//!
//! A row whose `entityType` is present and not `LEASE` is another kind of entity (a newer
//! Java KCL may keep some in the lease table): [`LeaseStore::list_leases`] leaves it out, and
//! says so once per store at `info`, never once per scan. Unknown attributes are ignored; `leaseOwner` absent or NULL means free; missing
//! sub-sequence numbers and owner switches read as 0. `leaseKey`, `leaseCounter` and
//! `checkpoint` are required. A row that cannot be read is [`LeaseError::MalformedLease`]
//! naming its key. In [`LeaseStore::list_leases`] such a row is, by default, skipped with a
//! `warn` log and the `kcl_lease_malformed_rows_total` counter (one bad row must not stop
//! every worker from taking the other leases); [`MalformedRowPolicy::Fail`] makes the whole
//! list fail instead. [`LeaseStore::get_lease`] always fails on a malformed row.
//!
//! # Errors
//!
//! `ConditionalCheckFailedException` is [`LeaseError::ConditionFailed`];
//! `ProvisionedThroughputExceededException`, `RequestLimitExceeded` and
//! `ThrottlingException` are [`LeaseError::Throttled`]; `ResourceNotFoundException` is
//! [`LeaseError::TableMissing`]; dispatch, timeout and response (I/O) failures are
//! [`LeaseError::Unreachable`]; anything else is [`LeaseError::Service`]. Note that the SDK
//! already retries throttling and transient errors a few times before any of them surfaces.

mod item;

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{BuildError, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode as DynamoBillingMode, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, Projection, ProjectionType, ProvisionedThroughput, ReturnValue,
    ScalarAttributeType, TableStatus,
};
use kcl_kpl::ExtendedSequenceNumber;

pub use item::attr;
use item::{is_lease_row, kbps, lease_attributes, lease_from_item, n, s, ss};

use crate::write::{Fence, LeaseWrite};
use crate::{BillingMode, Clock, Lease, LeaseError, LeaseStore, SystemClock};

/// Default interval between `DescribeTable` polls while waiting for a table to be ACTIVE.
pub const DEFAULT_TABLE_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Default bound on the wait for a table to be ACTIVE.
pub const DEFAULT_TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// The global secondary index of the lease table (HASH `leaseOwner`, RANGE `leaseKey`,
/// `KEYS_ONLY`) that the Java KCL 3.x needs; created with the table unless turned off.
pub const LEASE_OWNER_INDEX: &str = "LeaseOwnerToLeaseKeyIndex";

/// The suffix of the Java KCL's coordinator state table (`<lease table>-CoordinatorState`).
pub const COORDINATOR_STATE_TABLE_SUFFIX: &str = "-CoordinatorState";

/// The key of the coordinator state item that records the client version.
pub const MIGRATION_STATE_KEY: &str = "Migration3.0";

/// What [`LeaseStore::list_leases`] does with a row it cannot read.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum MalformedRowPolicy {
    /// Leave the row out of the list, log it at `warn` and count it in
    /// `kcl_lease_malformed_rows_total` (the default).
    #[default]
    SkipAndWarn,
    /// Fail the whole list with [`LeaseError::MalformedLease`].
    Fail,
}

/// Errors of this store that are not DynamoDB's own; they are the `source` of a
/// [`LeaseError::Service`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DynamoStoreError {
    /// The table was not ACTIVE after the configured wait.
    #[error("table {table} was not ACTIVE after {polls} polls (last status {last_status})")]
    TableNotActive {
        /// The table name.
        table: String,
        /// How many times `DescribeTable` was called.
        polls: u32,
        /// The last status seen (`missing` when the table was not found).
        last_status: String,
    },
    /// A successful update returned no item although `ReturnValues` asked for it.
    #[error("{operation} of lease {lease_key} returned no item")]
    NoItemReturned {
        /// The store call.
        operation: &'static str,
        /// The lease key.
        lease_key: String,
    },
    /// A request could not be built.
    #[error("could not build the {what} of a request")]
    Build {
        /// What was being built.
        what: &'static str,
        /// The builder's error.
        #[source]
        source: BuildError,
    },
}

/// The lease table in DynamoDB. See the [module documentation](self).
#[derive(Clone)]
pub struct DynamoLeaseStore {
    client: Client,
    table_name: String,
    clock: Arc<dyn Clock>,
    scan_page_size: Option<i32>,
    poll_interval: Duration,
    active_timeout: Duration,
    malformed_rows: MalformedRowPolicy,
    lease_owner_index: bool,
    /// Set once rows that are not leases were reported (shared by clones).
    other_entities_reported: Arc<AtomicBool>,
}

impl fmt::Debug for DynamoLeaseStore {
    /// Never prints the client (nor, so, any credential).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoLeaseStore")
            .field("table_name", &self.table_name)
            .field("scan_page_size", &self.scan_page_size)
            .field("poll_interval", &self.poll_interval)
            .field("active_timeout", &self.active_timeout)
            .field("malformed_rows", &self.malformed_rows)
            .field("lease_owner_index", &self.lease_owner_index)
            .finish_non_exhaustive()
    }
}

/// One [`LeaseWrite`] as DynamoDB expressions.
#[derive(Debug, Default)]
struct Expression {
    /// The update expression (empty for a delete).
    update: String,
    /// The condition expression, from the write's fence.
    condition: String,
    names: Vec<(&'static str, &'static str)>,
    values: Vec<(&'static str, AttributeValue)>,
}

impl Expression {
    /// The condition on `checkpointOwner`: equal to the one seen, or absent (or NULL) when
    /// the lease was seen outside a handoff.
    fn checkpoint_owner_clause(&mut self, checkpoint_owner: Option<&str>) -> String {
        self.name("#cpowner", attr::CHECKPOINT_OWNER);
        match checkpoint_owner {
            Some(checkpoint_owner) => {
                self.value(":seen_cpowner", s(checkpoint_owner));
                "#cpowner = :seen_cpowner".to_owned()
            }
            None => {
                self.value(":null_type", s("NULL"));
                "(attribute_not_exists(#cpowner) OR attribute_type(#cpowner, :null_type))"
                    .to_owned()
            }
        }
    }

    fn name(&mut self, placeholder: &'static str, attribute: &'static str) {
        if !self.names.iter().any(|(p, _)| *p == placeholder) {
            self.names.push((placeholder, attribute));
        }
    }

    fn value(&mut self, placeholder: &'static str, value: AttributeValue) {
        if !self.values.iter().any(|(p, _)| *p == placeholder) {
            self.values.push((placeholder, value));
        }
    }

    /// Translates `write`: its condition from its fence, its update from its change.
    fn of(write: &LeaseWrite<'_>) -> Result<Self, LeaseError> {
        const PLACEHOLDERS: [(&str, &str); 13] = [
            ("#a0", ":a0"),
            ("#a1", ":a1"),
            ("#a2", ":a2"),
            ("#a3", ":a3"),
            ("#a4", ":a4"),
            ("#a5", ":a5"),
            ("#a6", ":a6"),
            ("#a7", ":a7"),
            ("#a8", ":a8"),
            ("#a9", ":a9"),
            ("#a10", ":a10"),
            ("#a11", ":a11"),
            ("#a12", ":a12"),
        ];
        let mut e = Self::default();
        e.condition = match write.fence()? {
            Fence::NotExists => {
                e.name("#key", attr::LEASE_KEY);
                "attribute_not_exists(#key)".to_owned()
            }
            Fence::Counter(counter) => {
                e.name("#counter", attr::LEASE_COUNTER);
                e.value(":seen", n(counter));
                "#counter = :seen".to_owned()
            }
            Fence::CounterAndOwner {
                counter,
                owner,
                checkpoint_owner,
            } => {
                e.name("#counter", attr::LEASE_COUNTER);
                e.name("#owner", attr::LEASE_OWNER);
                e.value(":seen", n(counter));
                let owner = match owner {
                    // A take also names the new owner: the one seen gets its own name.
                    Some(owner) if matches!(write, LeaseWrite::Take { .. }) => {
                        e.value(":seen_owner", s(owner));
                        "#owner = :seen_owner".to_owned()
                    }
                    Some(owner) => {
                        e.value(":owner", s(owner));
                        "#owner = :owner".to_owned()
                    }
                    None => {
                        e.value(":null_type", s("NULL"));
                        "(attribute_not_exists(#owner) OR attribute_type(#owner, :null_type))"
                            .to_owned()
                    }
                };
                let handoff = e.checkpoint_owner_clause(checkpoint_owner);
                format!("#counter = :seen AND {owner} AND {handoff}")
            }
            Fence::Owners {
                owner,
                checkpoint_owner,
            } => {
                e.name("#owner", attr::LEASE_OWNER);
                e.value(":seen_owner", s(owner));
                let handoff = e.checkpoint_owner_clause(checkpoint_owner);
                format!("#owner = :seen_owner AND {handoff}")
            }
        };
        let mut set: Vec<String> = Vec::new();
        let mut remove: Vec<&str> = Vec::new();
        match *write {
            LeaseWrite::Create { lease } => {
                for ((name, value), (name_ph, value_ph)) in
                    lease_attributes(lease).into_iter().zip(PLACEHOLDERS)
                {
                    set.push(format!("{name_ph} = {value_ph}"));
                    e.name(name_ph, name);
                    e.value(value_ph, value);
                }
            }
            LeaseWrite::Delete { .. } => {}
            LeaseWrite::InitiateHandoff { next_owner, .. } => {
                // Both owners change; the counter stays (see `crate::write`). The fence
                // named the owner seen `:seen_owner`.
                e.name("#owner", attr::LEASE_OWNER);
                e.name("#cpowner", attr::CHECKPOINT_OWNER);
                e.value(":new_owner", s(next_owner));
                set.push("#owner = :new_owner".to_owned());
                set.push("#cpowner = :seen_owner".to_owned());
            }
            _ => {
                if let LeaseWrite::Take { new_owner, .. } = *write {
                    e.name("#owner", attr::LEASE_OWNER);
                    e.value(":new_owner", s(new_owner));
                    set.push("#owner = :new_owner".to_owned());
                }
                // Every other write moves the counter.
                e.name("#counter", attr::LEASE_COUNTER);
                e.value(":one", n(1));
                set.push("#counter = #counter + :one".to_owned());
            }
        }
        match *write {
            // A take counts an owner switch when the owner changes.
            LeaseWrite::Take { seen, new_owner } => {
                // A take ends any graceful handoff recorded in the row.
                e.name("#cpowner", attr::CHECKPOINT_OWNER);
                remove.push("#cpowner");
                // It counts an owner switch when the actual owner changes.
                if crate::write::actual_owner(seen) != Some(new_owner) {
                    e.name("#switches", attr::OWNER_SWITCHES_SINCE_CHECKPOINT);
                    e.value(":zero", n(0));
                    set.push("#switches = if_not_exists(#switches, :zero) + :one".to_owned());
                }
            }
            LeaseWrite::Release { .. } => {
                e.name("#owner", attr::LEASE_OWNER);
                remove.push("#owner");
            }
            LeaseWrite::CompleteHandoff { .. } => {
                e.name("#cpowner", attr::CHECKPOINT_OWNER);
                remove.push("#cpowner");
                e.name("#switches", attr::OWNER_SWITCHES_SINCE_CHECKPOINT);
                e.value(":zero", n(0));
                set.push("#switches = if_not_exists(#switches, :zero) + :one".to_owned());
            }
            LeaseWrite::Renew {
                throughput_kbps: Some(throughput),
                ..
            } => {
                e.name("#tp", attr::THROUGHPUT_KBPS);
                e.value(":tp", kbps(throughput));
                set.push("#tp = :tp".to_owned());
            }
            LeaseWrite::Checkpoint { checkpoint, .. }
            | LeaseWrite::ResetCheckpoint { checkpoint, .. } => {
                if matches!(write, LeaseWrite::ResetCheckpoint { .. }) {
                    // A reset frees the lease.
                    e.name("#owner", attr::LEASE_OWNER);
                    e.name("#cpowner", attr::CHECKPOINT_OWNER);
                    remove.extend(["#owner", "#cpowner"]);
                }
                e.name("#cp", attr::CHECKPOINT);
                e.name("#cpsub", attr::CHECKPOINT_SUB_SEQUENCE_NUMBER);
                e.name("#switches", attr::OWNER_SWITCHES_SINCE_CHECKPOINT);
                e.name("#pcp", attr::PENDING_CHECKPOINT);
                e.name("#pcpsub", attr::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER);
                e.value(":cp", s(checkpoint.sequence_str()));
                e.value(":cpsub", n(checkpoint.sub_sequence_number()));
                e.value(":zero", n(0));
                set.extend(
                    ["#cp = :cp", "#cpsub = :cpsub", "#switches = :zero"].map(str::to_owned),
                );
                remove.extend(["#pcp", "#pcpsub"]);
            }
            LeaseWrite::PrepareCheckpoint { pending, .. } => {
                e.name("#pcp", attr::PENDING_CHECKPOINT);
                e.name("#pcpsub", attr::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER);
                match pending {
                    Some(pending) => {
                        e.value(":pcp", s(pending.sequence_str()));
                        e.value(":pcpsub", n(pending.sub_sequence_number()));
                        set.extend(["#pcp = :pcp", "#pcpsub = :pcpsub"].map(str::to_owned));
                    }
                    None => remove.extend(["#pcp", "#pcpsub"]),
                }
            }
            LeaseWrite::ChildShardIds {
                child_shard_ids, ..
            } => {
                e.name("#children", attr::CHILD_SHARD_IDS);
                if child_shard_ids.is_empty() {
                    remove.push("#children");
                } else {
                    e.value(":children", ss(child_shard_ids));
                    set.push("#children = :children".to_owned());
                }
            }
            _ => {}
        }
        let mut clauses = Vec::new();
        if !set.is_empty() {
            clauses.push(format!("SET {}", set.join(", ")));
        }
        if !remove.is_empty() {
            clauses.push(format!("REMOVE {}", remove.join(", ")));
        }
        e.update = clauses.join(" ");
        Ok(e)
    }
}

impl DynamoLeaseStore {
    /// A store for `table_name` through `client`.
    pub fn new(client: Client, table_name: impl Into<String>) -> Self {
        Self {
            client,
            table_name: table_name.into(),
            clock: Arc::new(SystemClock),
            scan_page_size: None,
            poll_interval: DEFAULT_TABLE_POLL_INTERVAL,
            active_timeout: DEFAULT_TABLE_ACTIVE_TIMEOUT,
            malformed_rows: MalformedRowPolicy::default(),
            lease_owner_index: true,
            other_entities_reported: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether [`LeaseStore::create_table_if_not_exists`] creates the table with the
    /// [`LEASE_OWNER_INDEX`] global secondary index (default `true`; see the
    /// [module documentation](self)). Tables that exist already are never changed.
    pub fn with_lease_owner_index(mut self, enabled: bool) -> Self {
        self.lease_owner_index = enabled;
        self
    }

    /// The name of the Java KCL's coordinator state table of this application.
    pub fn coordinator_state_table_name(&self) -> String {
        format!("{}{COORDINATOR_STATE_TABLE_SUFFIX}", self.table_name)
    }

    /// The clock the wait for an ACTIVE table sleeps on.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The `Limit` of each `Scan` page of [`LeaseStore::list_leases`] (DynamoDB's 1 MB pages
    /// when not set). Values below 1 count as 1.
    pub fn with_scan_page_size(mut self, page_size: u32) -> Self {
        self.scan_page_size = Some(i32::try_from(page_size.max(1)).unwrap_or(i32::MAX));
        self
    }

    /// How often and how long to poll `DescribeTable` while waiting for the table to be
    /// ACTIVE. The wait is bounded by a number of polls (`timeout / poll_interval`, at least
    /// one), slept on the injected clock.
    pub fn with_table_wait(mut self, poll_interval: Duration, timeout: Duration) -> Self {
        self.poll_interval = poll_interval;
        self.active_timeout = timeout;
        self
    }

    /// What to do with rows [`LeaseStore::list_leases`] cannot read.
    pub fn with_malformed_rows(mut self, policy: MalformedRowPolicy) -> Self {
        self.malformed_rows = policy;
        self
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table_name
    }

    fn map_err<E, R>(&self, err: SdkError<E, R>, lease_key: Option<&str>) -> LeaseError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let error = map_sdk_error(&self.table_name, err, lease_key);
        tracing::debug!(table = %self.table_name, ?lease_key, error = %error, "lease table call failed");
        error
    }

    fn build_error(what: &'static str, source: BuildError) -> LeaseError {
        LeaseError::Service {
            source: Box::new(DynamoStoreError::Build { what, source }),
        }
    }

    fn key(lease_key: &str) -> (String, AttributeValue) {
        (attr::LEASE_KEY.to_owned(), s(lease_key))
    }

    /// The status of the table, `None` when it does not exist.
    async fn describe_status(&self) -> Result<Option<TableStatus>, LeaseError> {
        match self
            .client
            .describe_table()
            .table_name(&self.table_name)
            .send()
            .await
        {
            Ok(out) => Ok(Some(
                out.table()
                    .and_then(|t| t.table_status().cloned())
                    .unwrap_or(TableStatus::Active),
            )),
            Err(err) => match self.map_err(err, None) {
                LeaseError::TableMissing { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn wait_until_active(&self) -> Result<(), LeaseError> {
        let max_polls = if self.poll_interval.is_zero() {
            1
        } else {
            let polls = self.active_timeout.as_nanos() / self.poll_interval.as_nanos();
            u32::try_from(polls).unwrap_or(u32::MAX).max(1)
        };
        let mut last_status = String::from("missing");
        for poll in 1..=max_polls {
            match self.describe_status().await? {
                Some(TableStatus::Active) => {
                    tracing::debug!(table = %self.table_name, polls = poll, "lease table is ACTIVE");
                    return Ok(());
                }
                Some(TableStatus::Deleting) => {
                    return Err(LeaseError::Service {
                        source: Box::new(DynamoStoreError::TableNotActive {
                            table: self.table_name.clone(),
                            polls: poll,
                            last_status: TableStatus::Deleting.as_str().to_owned(),
                        }),
                    });
                }
                Some(status) => last_status = status.as_str().to_owned(),
                // Right after CreateTable, DescribeTable may not see the table yet.
                None => last_status = String::from("missing"),
            }
            if poll < max_polls {
                self.clock.sleep(self.poll_interval).await;
            }
        }
        Err(LeaseError::Service {
            source: Box::new(DynamoStoreError::TableNotActive {
                table: self.table_name.clone(),
                polls: max_polls,
                last_status,
            }),
        })
    }

    /// One conditional `UpdateItem` translating `write` (every write but delete); returns
    /// the new row.
    async fn update(&self, write: LeaseWrite<'_>) -> Result<Lease, LeaseError> {
        let operation = write.operation();
        let lease_key = write.lease_key();
        let Expression {
            update,
            condition,
            names,
            values,
        } = Expression::of(&write)?;
        tracing::debug!(table = %self.table_name, lease_key, operation, "lease table update");
        let (key_name, key_value) = Self::key(lease_key);
        let mut request = self
            .client
            .update_item()
            .table_name(&self.table_name)
            .key(key_name, key_value)
            .update_expression(update)
            .condition_expression(condition)
            .return_values(ReturnValue::AllNew);
        for (placeholder, name) in names {
            request = request.expression_attribute_names(placeholder, name);
        }
        for (placeholder, value) in values {
            request = request.expression_attribute_values(placeholder, value);
        }
        let out = request
            .send()
            .await
            .map_err(|err| self.map_err(err, Some(lease_key)))?;
        match out.attributes() {
            Some(item) => lease_from_item(item),
            None => Err(LeaseError::Service {
                source: Box::new(DynamoStoreError::NoItemReturned {
                    operation,
                    lease_key: lease_key.to_owned(),
                }),
            }),
        }
    }
}

#[async_trait]
impl LeaseStore for DynamoLeaseStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        if self.describe_status().await?.is_some() {
            tracing::debug!(table = %self.table_name, "lease table exists");
            self.wait_until_active().await?;
            return Ok(false);
        }
        let attribute = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(|e| Self::build_error("attribute definition", e))
        };
        let key = |name: &str, key_type: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(key_type)
                .build()
                .map_err(|e| Self::build_error("key schema", e))
        };
        let throughput = match billing {
            BillingMode::Provisioned {
                read_capacity_units,
                write_capacity_units,
            } => Some(
                ProvisionedThroughput::builder()
                    .read_capacity_units(i64::try_from(read_capacity_units).unwrap_or(i64::MAX))
                    .write_capacity_units(i64::try_from(write_capacity_units).unwrap_or(i64::MAX))
                    .build()
                    .map_err(|e| Self::build_error("provisioned throughput", e))?,
            ),
            _ => None,
        };
        let mut request = self
            .client
            .create_table()
            .table_name(&self.table_name)
            .attribute_definitions(attribute(attr::LEASE_KEY)?)
            .key_schema(key(attr::LEASE_KEY, KeyType::Hash)?);
        if self.lease_owner_index {
            let index = GlobalSecondaryIndex::builder()
                .index_name(LEASE_OWNER_INDEX)
                .key_schema(key(attr::LEASE_OWNER, KeyType::Hash)?)
                .key_schema(key(attr::LEASE_KEY, KeyType::Range)?)
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .set_provisioned_throughput(throughput.clone())
                .build()
                .map_err(|e| Self::build_error("global secondary index", e))?;
            request = request
                .attribute_definitions(attribute(attr::LEASE_OWNER)?)
                .global_secondary_indexes(index);
        }
        request = match throughput {
            Some(throughput) => request
                .billing_mode(DynamoBillingMode::Provisioned)
                .provisioned_throughput(throughput),
            None => request.billing_mode(DynamoBillingMode::PayPerRequest),
        };
        tracing::debug!(
            table = %self.table_name,
            ?billing,
            lease_owner_index = self.lease_owner_index,
            "creating lease table"
        );
        let created = match request.send().await {
            Ok(_) => true,
            Err(err) if err.code() == Some("ResourceInUseException") => {
                tracing::debug!(table = %self.table_name, "lease table created concurrently");
                false
            }
            Err(err) => return Err(self.map_err(err, None)),
        };
        self.wait_until_active().await?;
        Ok(created)
    }

    async fn table_exists(&self) -> Result<bool, LeaseError> {
        Ok(self.describe_status().await?.is_some())
    }

    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        // Each page is bounded by the caller (the coordinator bounds every store call).
        crate::v3::dynamo::LeaseOwnerIndex::new(
            self.client.clone(),
            self.table_name.clone(),
            self.clock.clone(),
            crate::timeouts::DEFAULT_CALL_TIMEOUT,
        )
        .lease_keys_of(owner)
        .await
    }

    async fn lease_owner_index_active(&self) -> Result<bool, LeaseError> {
        match self
            .client
            .describe_table()
            .table_name(&self.table_name)
            .send()
            .await
        {
            Ok(out) => Ok(out.table().is_some_and(|t| {
                t.global_secondary_indexes().iter().any(|g| {
                    g.index_name() == Some(LEASE_OWNER_INDEX)
                        && g.index_status() == Some(&aws_sdk_dynamodb::types::IndexStatus::Active)
                })
            })),
            Err(err) => match self.map_err(err, None) {
                LeaseError::TableMissing { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    fn state_tables(&self) -> Option<crate::v3::table::StateTables> {
        use crate::v3::dynamo::DynamoStateTable;
        use crate::v3::table::{
            COORDINATOR_STATE_KEY, WORKER_METRIC_STATS_KEY, worker_metric_stats_table_name,
        };
        Some(crate::v3::table::StateTables {
            coordinator_state: Arc::new(
                DynamoStateTable::new(
                    self.client.clone(),
                    self.coordinator_state_table_name(),
                    COORDINATOR_STATE_KEY,
                )
                .with_clock(self.clock.clone()),
            ),
            worker_metrics: Arc::new(
                DynamoStateTable::new(
                    self.client.clone(),
                    worker_metric_stats_table_name(&self.table_name),
                    WORKER_METRIC_STATS_KEY,
                )
                .with_clock(self.clock.clone()),
            ),
        })
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        match self.update(LeaseWrite::Create { lease }).await {
            Ok(_) => Ok(true),
            Err(LeaseError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start_key: Option<HashMap<String, AttributeValue>> = None;
        let mut pages = 0u32;
        loop {
            let out = self
                .client
                .scan()
                .table_name(&self.table_name)
                .consistent_read(true)
                .set_limit(self.scan_page_size)
                .set_exclusive_start_key(start_key.take())
                .send()
                .await
                .map_err(|err| self.map_err(err, None))?;
            pages += 1;
            for item in out.items() {
                if !is_lease_row(item) {
                    if !self.other_entities_reported.swap(true, Ordering::Relaxed) {
                        tracing::info!(
                            table = %self.table_name,
                            entity_type = ?item.get(attr::ENTITY_TYPE),
                            "the lease table holds rows that are not leases (entityType); \
                             they are left out (reported once)"
                        );
                    }
                    continue;
                }
                match lease_from_item(item) {
                    Ok(lease) => leases.push(lease),
                    Err(error) => match self.malformed_rows {
                        MalformedRowPolicy::Fail => return Err(error),
                        MalformedRowPolicy::SkipAndWarn => {
                            metrics::counter!("kcl_lease_malformed_rows_total").increment(1);
                            tracing::warn!(table = %self.table_name, %error, "skipping a lease row that cannot be read");
                        }
                    },
                }
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start_key = Some(key),
                _ => break,
            }
        }
        tracing::debug!(table = %self.table_name, leases = leases.len(), pages, "listed leases");
        Ok(leases)
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        let (key_name, key_value) = Self::key(lease_key);
        let out = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .key(key_name, key_value)
            .consistent_read(true)
            .send()
            .await
            .map_err(|err| self.map_err(err, Some(lease_key)))?;
        match out.item() {
            Some(item) if !item.is_empty() => lease_from_item(item).map(Some),
            _ => Ok(None),
        }
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::Renew {
            seen: lease,
            throughput_kbps,
        })
        .await
    }

    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::Take {
            seen: lease,
            new_owner,
        })
        .await
    }

    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::Release { seen: lease }).await
    }

    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::InitiateHandoff {
            seen: lease,
            next_owner,
        })
        .await
    }

    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::CompleteHandoff { seen: lease })
            .await
    }

    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::Checkpoint {
            seen: lease,
            checkpoint,
        })
        .await
    }

    async fn update_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::PrepareCheckpoint {
            seen: lease,
            pending,
        })
        .await
    }

    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::ChildShardIds {
            seen: lease,
            child_shard_ids,
        })
        .await
    }

    async fn reset_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.update(LeaseWrite::ResetCheckpoint {
            seen: lease,
            checkpoint,
        })
        .await
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        let table = self.coordinator_state_table_name();
        let result = self
            .client
            .get_item()
            .table_name(&table)
            .key("key", s(MIGRATION_STATE_KEY))
            .consistent_read(true)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(err) if err.code() == Some("ResourceNotFoundException") => {
                tracing::debug!(%table, "no coordinator state table");
                return Ok(None);
            }
            Err(err) => return Err(self.map_err(err, None)),
        };
        let version = match out.item().and_then(|item| item.get("cv")) {
            Some(AttributeValue::S(cv)) => Some(cv.clone()),
            _ => None,
        };
        tracing::debug!(%table, client_version = ?version, "read the client version");
        Ok(version)
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        tracing::debug!(table = %self.table_name, lease_key = %lease.lease_key, "deleting lease");
        let Expression {
            condition,
            names,
            values,
            ..
        } = Expression::of(&LeaseWrite::Delete { seen: lease })?;
        let (key_name, key_value) = Self::key(&lease.lease_key);
        let mut request = self
            .client
            .delete_item()
            .table_name(&self.table_name)
            .key(key_name, key_value)
            .condition_expression(condition);
        for (placeholder, name) in names {
            request = request.expression_attribute_names(placeholder, name);
        }
        for (placeholder, value) in values {
            request = request.expression_attribute_values(placeholder, value);
        }
        request
            .send()
            .await
            .map_err(|err| self.map_err(err, Some(&lease.lease_key)))?;
        Ok(())
    }
}

/// Maps an AWS SDK error of a call on `table` to a [`LeaseError`] (shared by the lease store and
/// the 3.x state tables): transport failures are `Unreachable`, throttling `Throttled`, a failed
/// condition `ConditionFailed` (on `lease_key`), a missing table `TableMissing`, requests the
/// service refuses however often they are sent `Rejected`, anything else `Service`.
pub(crate) fn map_sdk_error<E, R>(
    table: &str,
    err: SdkError<E, R>,
    lease_key: Option<&str>,
) -> LeaseError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            LeaseError::Unreachable {
                source: Box::new(err),
            }
        }
        SdkError::ServiceError(_) => match err.code() {
            Some("ConditionalCheckFailedException") => LeaseError::ConditionFailed {
                lease_key: lease_key.unwrap_or("?").to_owned(),
            },
            Some(
                "ProvisionedThroughputExceededException"
                | "RequestLimitExceeded"
                | "ThrottlingException",
            ) => LeaseError::Throttled {
                source: Box::new(err),
            },
            Some("ResourceNotFoundException") => LeaseError::TableMissing {
                table: table.to_owned(),
            },
            // Requests the service will refuse however often they are sent.
            Some(
                "ValidationException"
                | "AccessDeniedException"
                | "UnrecognizedClientException"
                | "MissingAuthenticationTokenException"
                | "IncompleteSignature"
                | "InvalidSignatureException"
                | "SerializationException",
            ) => LeaseError::Rejected {
                source: Box::new(err),
            },
            _ => LeaseError::Service {
                source: Box::new(err),
            },
        },
        _ => LeaseError::Service {
            source: Box::new(err),
        },
    }
}
