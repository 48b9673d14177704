//! [`StateTable`]: a table of 3.x state items keyed by one string attribute, with
//! conditional writes. Two tables of the Java KCL 3.x have this shape:
//!
//! | table | key attribute | items |
//! |---|---|---|
//! | `<app>-CoordinatorState` | `key` ([`COORDINATOR_STATE_KEY`]) | `Migration3.0` ([`super::migration`]), `Leader` ([`super::lock`]) |
//! | `<app>-WorkerMetricStats` | `wid` ([`WORKER_METRIC_STATS_KEY`]) | one per worker ([`super::worker_metrics`]) |
//!
//! Implementations: `InMemoryStateTable` (feature `test-util`, in `v3::memory`), which
//! evaluates every [`Condition`] as DynamoDB does, and `DynamoStateTable` (feature
//! `dynamodb`, in `super::dynamo`). Callers bound every call with [`bounded`] on the
//! injected clock, whatever the implementation.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use super::item::{Condition, Item, Value};
use crate::timeouts::within;
use crate::{BillingMode, Clock, LeaseError};

/// The key attribute of `<app>-CoordinatorState`.
pub const COORDINATOR_STATE_KEY: &str = "key";
/// The key attribute of `<app>-WorkerMetricStats`.
pub const WORKER_METRIC_STATS_KEY: &str = "wid";
/// The suffix of the coordinator state table's name (`<app>-CoordinatorState`).
pub const COORDINATOR_STATE_SUFFIX: &str = "-CoordinatorState";
/// The suffix of the worker metric stats table's name (`<app>-WorkerMetricStats`).
pub const WORKER_METRIC_STATS_SUFFIX: &str = "-WorkerMetricStats";

/// The name of the coordinator state table of an application (its lease table name).
pub fn coordinator_state_table_name(application: &str) -> String {
    format!("{application}{COORDINATOR_STATE_SUFFIX}")
}

/// The name of the worker metric stats table of an application (its lease table name).
pub fn worker_metric_stats_table_name(application: &str) -> String {
    format!("{application}{WORKER_METRIC_STATS_SUFFIX}")
}

/// The change of an update: attributes set and attributes removed (DynamoDB's `SET` and
/// `REMOVE`). As in DynamoDB, an update of an item that does not exist creates it (with
/// its key and the attributes set) unless the condition prevents it.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct Update {
    /// `SET name = value`.
    pub set: Vec<(String, Value)>,
    /// `REMOVE name`.
    pub remove: Vec<String>,
}

impl Update {
    /// An update setting nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Also sets `name` to `value`.
    pub fn set(mut self, name: &str, value: Value) -> Self {
        self.set.push((name.to_owned(), value));
        self
    }

    /// Also removes `name`.
    pub fn remove(mut self, name: &str) -> Self {
        self.remove.push(name.to_owned());
        self
    }

    /// Applies the change to `item` (in place).
    pub fn apply(&self, item: &mut Item) {
        for (name, value) in &self.set {
            item.insert(name.clone(), value.clone());
        }
        for name in &self.remove {
            item.remove(name);
        }
    }
}

/// A table of items keyed by one string attribute. See the [module documentation](self).
///
/// A write whose condition does not hold fails with [`LeaseError::ConditionFailed`]
/// (`lease_key` is the item's key) and changes nothing. A missing table is
/// [`LeaseError::TableMissing`].
#[async_trait]
pub trait StateTable: Send + Sync + Debug {
    /// The table's name.
    fn table_name(&self) -> &str;

    /// The name of the key attribute (`key`, `wid`).
    fn key_attribute(&self) -> &str;

    /// Creates the table (HASH key [`StateTable::key_attribute`], S) if it does not exist
    /// and waits until it is usable. True when this call created it.
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError>;

    /// The item with this key, read consistently.
    async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError>;

    /// Every item (all pages). Consistent for the in-memory table; a DynamoDB scan is
    /// consistent too (`ConsistentRead`).
    async fn scan(&self) -> Result<Vec<Item>, LeaseError>;

    /// Writes `item` whole (PutItem) if `condition` holds on the item with its key. The item
    /// must have the key attribute as an `S`.
    async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError>;

    /// Changes the item with this key (UpdateItem) if `condition` holds; see [`Update`].
    async fn update(
        &self,
        key: &str,
        update: &Update,
        condition: &Condition,
    ) -> Result<(), LeaseError>;

    /// Deletes the item with this key if `condition` holds (deleting an absent item with
    /// [`Condition::Always`] succeeds).
    async fn delete(&self, key: &str, condition: &Condition) -> Result<(), LeaseError>;
}

/// The key of `item` in a table whose key attribute is `key_attribute`.
/// The two KCL 3.x state tables of one application, next to its lease table.
#[derive(Clone, Debug)]
pub struct StateTables {
    /// `<app>-CoordinatorState` (key `key`): the `Migration3.0` and `Leader` items.
    pub coordinator_state: std::sync::Arc<dyn StateTable>,
    /// `<app>-WorkerMetricStats` (key `wid`): one row per worker.
    pub worker_metrics: std::sync::Arc<dyn StateTable>,
}

pub(crate) fn item_key<'a>(item: &'a Item, key_attribute: &str) -> Result<&'a str, LeaseError> {
    item.get(key_attribute)
        .and_then(Value::as_s)
        .ok_or_else(|| LeaseError::MalformedLease {
            lease_key: "?".to_owned(),
            reason: format!("the item has no {key_attribute} of type S"),
        })
}

/// Runs one call of a [`StateTable`] for at most `limit` on `clock`; a call still
/// unanswered then is [`LeaseError::Timeout`] naming `operation`.
pub async fn bounded<T>(
    clock: &dyn Clock,
    limit: Duration,
    operation: &'static str,
    call: impl Future<Output = Result<T, LeaseError>>,
) -> Result<T, LeaseError> {
    within(clock, limit, call)
        .await
        .unwrap_or(Err(LeaseError::Timeout {
            operation,
            after: limit,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_sets_then_removes() {
        let mut item = Item::new();
        item.insert("a".into(), Value::s("1"));
        item.insert("b".into(), Value::s("2"));
        Update::new()
            .set("a", Value::s("x"))
            .set("c", Value::int(3))
            .remove("b")
            .apply(&mut item);
        assert_eq!(item.get("a"), Some(&Value::s("x")));
        assert_eq!(item.get("c"), Some(&Value::int(3)));
        assert!(!item.contains_key("b"));
    }

    #[test]
    fn table_names_follow_the_java_kcl() {
        assert_eq!(coordinator_state_table_name("app"), "app-CoordinatorState");
        assert_eq!(
            worker_metric_stats_table_name("app"),
            "app-WorkerMetricStats"
        );
    }

    #[tokio::test]
    async fn bounded_turns_a_hang_into_a_timeout() {
        let clock = crate::test_util::ManualClock::new();
        let call = bounded(&clock, Duration::from_secs(2), "get", async {
            std::future::pending::<Result<(), LeaseError>>().await
        });
        let mover = clock.clone();
        let (out, ()) = tokio::join!(call, async move {
            mover.advance_and_settle(Duration::from_secs(2)).await;
        });
        assert!(matches!(
            out,
            Err(LeaseError::Timeout { operation: "get", after }) if after == Duration::from_secs(2)
        ));
    }
}
