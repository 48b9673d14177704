//! [`InMemoryStateTable`]: a [`StateTable`] in memory that answers as DynamoDB does
//! (feature `test-util`).
//!
//! Conditions are evaluated on the current item atomically with the write; an update of a
//! missing item creates it; a write whose condition fails changes nothing. Faults follow the
//! one design of the fakes ([`crate::test_util::fault`]): [`StateFault`]s of a
//! [`StateFaultKind`] for the next calls, optionally of one [`StateOperation`] or one key,
//! plus the `set_unreachable` and `set_hanging` switches. Every call is counted by operation
//! ([`InMemoryStateTable::calls`]), so cost figures (reads and writes per minute) can be
//! measured on it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use super::item::{Condition, Item, Value};
use super::table::{StateTable, Update, item_key};
use crate::test_util::fault::{Fault, FaultPlan};
use crate::{BillingMode, BoxError, LeaseError};

/// The calls of a [`StateTable`], for faults and call counts.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash)]
#[non_exhaustive]
pub enum StateOperation {
    /// [`StateTable::create_table_if_not_exists`].
    CreateTable,
    /// [`StateTable::get`].
    Get,
    /// [`StateTable::scan`].
    Scan,
    /// [`StateTable::put`].
    Put,
    /// [`StateTable::update`].
    Update,
    /// [`StateTable::delete`].
    Delete,
}

/// What an injected fault does to a call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum StateFaultKind {
    /// [`LeaseError::Unreachable`]; nothing is applied.
    Unreachable,
    /// [`LeaseError::Throttled`]; nothing is applied.
    Throttle,
    /// The write is applied, then the answer is lost ([`LeaseError::Unreachable`]): a client
    /// retry would find its own write.
    LoseAnswer,
    /// The call never answers (and applies nothing).
    Hang,
}

/// A fault of the in-memory state table.
pub type StateFault = Fault<StateFaultKind, StateOperation>;

#[derive(Debug)]
struct State {
    exists: bool,
    items: BTreeMap<String, Item>,
    faults: FaultPlan<StateFaultKind, StateOperation>,
    unreachable: bool,
    hanging: bool,
    calls: BTreeMap<StateOperation, u64>,
}

/// A [`StateTable`] in memory. See the [module documentation](self). Clones share the table.
#[derive(Clone, Debug)]
pub struct InMemoryStateTable {
    table_name: String,
    key_attribute: String,
    state: Arc<Mutex<State>>,
}

#[derive(Debug, thiserror::Error)]
#[error("injected fault: {0}")]
struct Injected(&'static str);

impl InMemoryStateTable {
    /// A table that does not exist yet (create it with
    /// [`StateTable::create_table_if_not_exists`], or use [`InMemoryStateTable::existing`]).
    pub fn new(table_name: impl Into<String>, key_attribute: impl Into<String>) -> Self {
        Self {
            table_name: table_name.into(),
            key_attribute: key_attribute.into(),
            state: Arc::new(Mutex::new(State {
                exists: false,
                items: BTreeMap::new(),
                faults: FaultPlan::default(),
                unreachable: false,
                hanging: false,
                calls: BTreeMap::new(),
            })),
        }
    }

    /// A table that exists and is empty.
    pub fn existing(table_name: impl Into<String>, key_attribute: impl Into<String>) -> Self {
        let table = Self::new(table_name, key_attribute);
        table.lock().exists = true;
        table
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a fault after those already registered.
    pub fn inject(&self, fault: StateFault) {
        self.lock().faults.inject(fault);
    }

    /// While `true`, every call fails with [`LeaseError::Unreachable`].
    pub fn set_unreachable(&self, unreachable: bool) {
        self.lock().unreachable = unreachable;
    }

    /// While `true`, every call started hangs for good.
    pub fn set_hanging(&self, hanging: bool) {
        self.lock().hanging = hanging;
    }

    /// How many calls of each operation were made (faulted ones included).
    pub fn calls(&self) -> BTreeMap<StateOperation, u64> {
        self.lock().calls.clone()
    }

    /// The item with this key, without counting a call (for assertions).
    pub fn peek(&self, key: &str) -> Option<Item> {
        self.lock().items.get(key).cloned()
    }

    /// Writes an item as another client would, without conditions or counting.
    pub fn seed(&self, item: Item) -> Result<(), LeaseError> {
        let key = item_key(&item, &self.key_attribute)?.to_owned();
        let mut state = self.lock();
        state.exists = true;
        state.items.insert(key, item);
        Ok(())
    }

    /// Counts the call, then decides its fault: `Err` for a fault that fails it before
    /// anything is applied, `Ok(lose_answer)` otherwise. Never returns for a hang.
    async fn begin(
        &self,
        operation: StateOperation,
        key: Option<&str>,
    ) -> Result<bool, LeaseError> {
        let fault = {
            let mut state = self.lock();
            *state.calls.entry(operation).or_default() += 1;
            if state.hanging {
                Some(StateFaultKind::Hang)
            } else if state.unreachable {
                Some(StateFaultKind::Unreachable)
            } else {
                state.faults.take(operation, key, |_| true)
            }
        };
        match fault {
            None => Ok(false),
            Some(StateFaultKind::LoseAnswer) => Ok(true),
            Some(StateFaultKind::Hang) => std::future::pending().await,
            Some(StateFaultKind::Unreachable) => Err(LeaseError::Unreachable {
                source: Box::new(Injected("unreachable")) as BoxError,
            }),
            Some(StateFaultKind::Throttle) => Err(LeaseError::Throttled {
                source: Box::new(Injected("throttled")) as BoxError,
            }),
        }
    }

    fn finish(&self, lose_answer: bool) -> Result<(), LeaseError> {
        if lose_answer {
            Err(LeaseError::Unreachable {
                source: Box::new(Injected("answer lost")) as BoxError,
            })
        } else {
            Ok(())
        }
    }

    fn missing(&self) -> LeaseError {
        LeaseError::TableMissing {
            table: self.table_name.clone(),
        }
    }

    /// Applies a conditional write to the item with `key` under the lock.
    fn write(
        &self,
        key: &str,
        condition: &Condition,
        change: impl FnOnce(Option<Item>) -> Option<Item>,
    ) -> Result<(), LeaseError> {
        let mut state = self.lock();
        if !state.exists {
            return Err(self.missing());
        }
        let current = state.items.get(key);
        if !condition.holds(current) {
            return Err(LeaseError::ConditionFailed {
                lease_key: key.to_owned(),
            });
        }
        let current = state.items.remove(key);
        if let Some(new) = change(current) {
            state.items.insert(key.to_owned(), new);
        }
        Ok(())
    }
}

#[async_trait]
impl StateTable for InMemoryStateTable {
    fn table_name(&self) -> &str {
        &self.table_name
    }

    fn key_attribute(&self) -> &str {
        &self.key_attribute
    }

    async fn create_table_if_not_exists(&self, _billing: BillingMode) -> Result<bool, LeaseError> {
        let lose = self.begin(StateOperation::CreateTable, None).await?;
        let created = {
            let mut state = self.lock();
            let created = !state.exists;
            state.exists = true;
            created
        };
        self.finish(lose)?;
        Ok(created)
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError> {
        let lose = self.begin(StateOperation::Get, Some(key)).await?;
        let item = {
            let state = self.lock();
            if !state.exists {
                return Err(self.missing());
            }
            state.items.get(key).cloned()
        };
        self.finish(lose)?;
        Ok(item)
    }

    async fn scan(&self) -> Result<Vec<Item>, LeaseError> {
        let lose = self.begin(StateOperation::Scan, None).await?;
        let items = {
            let state = self.lock();
            if !state.exists {
                return Err(self.missing());
            }
            state.items.values().cloned().collect()
        };
        self.finish(lose)?;
        Ok(items)
    }

    async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError> {
        let key = item_key(item, &self.key_attribute)?;
        let lose = self.begin(StateOperation::Put, Some(key)).await?;
        self.write(key, condition, |_| Some(item.clone()))?;
        self.finish(lose)
    }

    async fn update(
        &self,
        key: &str,
        update: &Update,
        condition: &Condition,
    ) -> Result<(), LeaseError> {
        if update
            .set
            .iter()
            .any(|(name, _)| *name == self.key_attribute)
            || update.remove.contains(&self.key_attribute)
        {
            return Err(LeaseError::Rejected {
                source: Box::new(Injected("an update cannot change the key attribute")),
            });
        }
        let lose = self.begin(StateOperation::Update, Some(key)).await?;
        let key_attribute = self.key_attribute.clone();
        self.write(key, condition, |current| {
            let mut item = current.unwrap_or_else(|| Item::from([(key_attribute, Value::s(key))]));
            update.apply(&mut item);
            Some(item)
        })?;
        self.finish(lose)
    }

    async fn delete(&self, key: &str, condition: &Condition) -> Result<(), LeaseError> {
        let lose = self.begin(StateOperation::Delete, Some(key)).await?;
        self.write(key, condition, |_| None)?;
        self.finish(lose)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, v: &str) -> Item {
        Item::from([
            ("key".to_owned(), Value::s(key)),
            ("v".to_owned(), Value::s(v)),
        ])
    }

    #[tokio::test]
    async fn a_missing_table_is_an_error_until_created() {
        let t = InMemoryStateTable::new("app-CoordinatorState", "key");
        assert!(matches!(
            t.get("x").await,
            Err(LeaseError::TableMissing { .. })
        ));
        assert!(
            t.create_table_if_not_exists(BillingMode::PayPerRequest)
                .await
                .unwrap()
        );
        assert!(
            !t.create_table_if_not_exists(BillingMode::PayPerRequest)
                .await
                .unwrap()
        );
        assert_eq!(t.get("x").await.unwrap(), None);
    }

    #[tokio::test]
    async fn conditional_put_update_delete() {
        let t = InMemoryStateTable::existing("t", "key");
        t.put(&item("a", "1"), &Condition::not_exists("key"))
            .await
            .unwrap();
        let again = t.put(&item("a", "2"), &Condition::not_exists("key")).await;
        assert!(
            matches!(again, Err(LeaseError::ConditionFailed { ref lease_key }) if lease_key == "a")
        );
        assert_eq!(t.peek("a"), Some(item("a", "1")));

        let wrong = Condition::equals("v", Value::s("9"));
        let upd = Update::new()
            .set("v", Value::s("3"))
            .set("w", Value::int(1));
        assert!(
            t.update("a", &upd, &wrong)
                .await
                .unwrap_err()
                .is_condition_failed()
        );
        t.update("a", &upd, &Condition::equals("v", Value::s("1")))
            .await
            .unwrap();
        let now = t.peek("a").unwrap();
        assert_eq!(now.get("v"), Some(&Value::s("3")));
        assert_eq!(now.get("w"), Some(&Value::int(1)));

        // An update of a missing item creates it unless the condition says otherwise.
        t.update("b", &upd, &Condition::Always).await.unwrap();
        assert_eq!(t.peek("b").unwrap().get("key"), Some(&Value::s("b")));
        assert!(
            t.update("c", &upd, &Condition::exists("key"))
                .await
                .is_err()
        );
        assert_eq!(t.peek("c"), None);

        assert!(t.delete("a", &wrong).await.is_err());
        t.delete("a", &Condition::equals("v", Value::s("3")))
            .await
            .unwrap();
        assert_eq!(t.peek("a"), None);
        t.delete("zzz", &Condition::Always).await.unwrap();
        assert_eq!(t.scan().await.unwrap().len(), 1);
        let bad = t
            .update(
                "b",
                &Update::new().set("key", Value::s("q")),
                &Condition::Always,
            )
            .await;
        assert!(matches!(bad, Err(LeaseError::Rejected { .. })));
        assert_eq!(t.calls().get(&StateOperation::Put), Some(&2));
    }

    #[tokio::test]
    async fn faults_fail_or_lose_the_answer() {
        let t = InMemoryStateTable::existing("t", "key");
        t.inject(
            StateFault::new(StateFaultKind::Unreachable, 1).for_operation(StateOperation::Put),
        );
        let err = t
            .put(&item("a", "1"), &Condition::Always)
            .await
            .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(t.peek("a"), None);
        t.inject(StateFault::new(StateFaultKind::LoseAnswer, 1).for_key("a"));
        assert!(t.put(&item("a", "1"), &Condition::Always).await.is_err());
        assert_eq!(t.peek("a"), Some(item("a", "1")), "the write was applied");
        t.inject(StateFault::new(StateFaultKind::Throttle, 1));
        assert!(matches!(
            t.get("a").await,
            Err(LeaseError::Throttled { .. })
        ));
        t.set_unreachable(true);
        assert!(t.get("a").await.is_err());
        t.set_unreachable(false);
        assert!(t.get("a").await.unwrap().is_some());
        assert!(t.seed(Item::new()).is_err());
    }
}
