//! The 3.x tables on DynamoDB (feature `dynamodb`): [`DynamoStateTable`], a
//! [`StateTable`] on one table, and [`LeaseOwnerIndex`], the follower's query of the lease
//! table's `LeaseOwnerToLeaseKeyIndex` GSI.
//!
//! Conditions and updates are translated into expressions with placeholders (`#n0`,
//! `:v0`, ...), so any attribute name is safe. Reads are consistent (`GetItem`, `Scan`
//! with `ConsistentRead`; a GSI query cannot be: the GSI is eventually consistent, which
//! is why a follower reads each discovered lease before holding it). Every call is bounded
//! by `call_timeout` on the injected clock, besides the SDK's own timeouts; errors map as
//! for the lease store: a failed condition is [`LeaseError::ConditionFailed`] (naming the
//! item key), throttling [`LeaseError::Throttled`], a missing table
//! [`LeaseError::TableMissing`], transport failures [`LeaseError::Unreachable`], requests
//! the service refuses for good [`LeaseError::Rejected`].

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode as DynamoBillingMode, KeySchemaElement,
    KeyType, ProvisionedThroughput, ScalarAttributeType, TableStatus,
};

use super::item::{Condition, Item, Value};
use super::table::{StateTable, Update, bounded, item_key};
use crate::dynamo::LEASE_OWNER_INDEX;
use crate::dynamo::attr as lease_attr;
use crate::timeouts::DEFAULT_CALL_TIMEOUT;
use crate::{BillingMode, Clock, LeaseError, SystemClock};

/// How often `DescribeTable` is polled while waiting for a created table.
pub const TABLE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait for a created table to become ACTIVE.
pub const TABLE_ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// Our value as the SDK's.
pub fn to_attribute_value(value: &Value) -> AttributeValue {
    match value {
        Value::S(s) => AttributeValue::S(s.clone()),
        Value::N(n) => AttributeValue::N(n.clone()),
        Value::B(b) => AttributeValue::B(Blob::new(b.clone())),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Null => AttributeValue::Null(true),
        Value::L(l) => AttributeValue::L(l.iter().map(to_attribute_value).collect()),
        Value::M(m) => AttributeValue::M(
            m.iter()
                .map(|(k, v)| (k.clone(), to_attribute_value(v)))
                .collect(),
        ),
        Value::Ss(ss) => AttributeValue::Ss(ss.clone()),
        Value::Ns(ns) => AttributeValue::Ns(ns.clone()),
    }
}

/// The SDK's value as ours; `None` for a type we do not model (binary sets).
pub fn from_attribute_value(value: &AttributeValue) -> Option<Value> {
    Some(match value {
        AttributeValue::S(s) => Value::S(s.clone()),
        AttributeValue::N(n) => Value::N(n.clone()),
        AttributeValue::B(b) => Value::B(b.as_ref().to_vec()),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::Null(_) => Value::Null,
        AttributeValue::L(l) => {
            Value::L(l.iter().map(from_attribute_value).collect::<Option<_>>()?)
        }
        AttributeValue::M(m) => Value::M(
            m.iter()
                .map(|(k, v)| Some((k.clone(), from_attribute_value(v)?)))
                .collect::<Option<_>>()?,
        ),
        AttributeValue::Ss(ss) => Value::Ss(ss.clone()),
        AttributeValue::Ns(ns) => Value::Ns(ns.clone()),
        _ => return None,
    })
}

fn to_item(raw: &HashMap<String, AttributeValue>) -> Item {
    // Attributes of types we do not model are left out of our view (never written back by
    // an update, which names only the attributes it changes).
    raw.iter()
        .filter_map(|(k, v)| Some((k.clone(), from_attribute_value(v)?)))
        .collect()
}

type Names = HashMap<String, String>;
type Values = HashMap<String, AttributeValue>;

/// Expression placeholders being collected.
#[derive(Default)]
struct Placeholders {
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Placeholders {
    fn name(&mut self, name: &str) -> String {
        if let Some((p, _)) = self.names.iter().find(|(_, n)| n.as_str() == name) {
            return p.clone();
        }
        let p = format!("#n{}", self.names.len());
        self.names.insert(p.clone(), name.to_owned());
        p
    }

    fn value(&mut self, value: &Value) -> String {
        let p = format!(":v{}", self.values.len());
        self.values.insert(p.clone(), to_attribute_value(value));
        p
    }

    /// The condition expression; `None` for [`Condition::Always`].
    fn condition(&mut self, condition: &Condition) -> Option<String> {
        match condition {
            Condition::Always => None,
            Condition::Exists(n) => Some(format!("attribute_exists({})", self.name(n))),
            Condition::NotExists(n) => Some(format!("attribute_not_exists({})", self.name(n))),
            Condition::Equals(n, v) => Some(format!("{} = {}", self.name(n), self.value(v))),
            Condition::And(all) => {
                let parts: Vec<String> = all.iter().filter_map(|c| self.condition(c)).collect();
                (!parts.is_empty()).then(|| format!("({})", parts.join(") AND (")))
            }
            // A condition added later that we cannot express must never pass silently.
            #[allow(unreachable_patterns)]
            _ => Some("attribute_exists(#never) AND attribute_not_exists(#never)".to_owned()),
        }
    }

    fn update(&mut self, update: &Update) -> String {
        let mut parts = Vec::new();
        if !update.set.is_empty() {
            let sets: Vec<String> = update
                .set
                .iter()
                .map(|(n, v)| format!("{} = {}", self.name(n), self.value(v)))
                .collect();
            parts.push(format!("SET {}", sets.join(", ")));
        }
        if !update.remove.is_empty() {
            let removes: Vec<String> = update.remove.iter().map(|n| self.name(n)).collect();
            parts.push(format!("REMOVE {}", removes.join(", ")));
        }
        parts.join(" ")
    }

    fn into_parts(self) -> (Option<Names>, Option<Values>) {
        (
            (!self.names.is_empty()).then_some(self.names),
            (!self.values.is_empty()).then_some(self.values),
        )
    }
}

/// A [`StateTable`] on DynamoDB. See the [module documentation](self).
#[derive(Clone)]
pub struct DynamoStateTable {
    client: Client,
    table_name: String,
    key_attribute: String,
    clock: Arc<dyn Clock>,
    call_timeout: Duration,
    poll_interval: Duration,
}

impl fmt::Debug for DynamoStateTable {
    /// Never prints the client (nor, so, any credential).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoStateTable")
            .field("table_name", &self.table_name)
            .field("key_attribute", &self.key_attribute)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl DynamoStateTable {
    /// The table `table_name` keyed by `key_attribute`, on the system clock with the
    /// default call timeout.
    pub fn new(
        client: Client,
        table_name: impl Into<String>,
        key_attribute: impl Into<String>,
    ) -> Self {
        Self {
            client,
            table_name: table_name.into(),
            key_attribute: key_attribute.into(),
            clock: Arc::new(SystemClock),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            poll_interval: TABLE_POLL_INTERVAL,
        }
    }

    /// Uses this clock for the call bounds and polls.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Bounds every call by `call_timeout`.
    pub fn with_call_timeout(mut self, call_timeout: Duration) -> Self {
        self.call_timeout = call_timeout;
        self
    }

    /// Polls `DescribeTable` this often while waiting for a created table.
    pub fn with_poll_interval(mut self, poll_interval: Duration) -> Self {
        self.poll_interval = poll_interval;
        self
    }

    fn key(&self, key: &str) -> HashMap<String, AttributeValue> {
        HashMap::from([(
            self.key_attribute.clone(),
            AttributeValue::S(key.to_owned()),
        )])
    }

    fn map_err<E, R>(&self, err: SdkError<E, R>, key: Option<&str>) -> LeaseError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        crate::dynamo::map_sdk_error(&self.table_name, err, key)
    }

    async fn status(&self) -> Result<Option<TableStatus>, LeaseError> {
        let call = self
            .client
            .describe_table()
            .table_name(&self.table_name)
            .send();
        match bounded(&*self.clock, self.call_timeout, "describe_table", async {
            call.await.map_err(|e| self.map_err(e, None))
        })
        .await
        {
            Ok(out) => Ok(Some(
                out.table()
                    .and_then(|t| t.table_status().cloned())
                    .unwrap_or(TableStatus::Active),
            )),
            Err(LeaseError::TableMissing { .. }) => Ok(None),
            Err(other) => Err(other),
        }
    }

    async fn wait_active(&self) -> Result<(), LeaseError> {
        let polls =
            (TABLE_ACTIVE_TIMEOUT.as_millis() / self.poll_interval.as_millis().max(1)).max(1);
        for _ in 0..polls {
            if self.status().await? == Some(TableStatus::Active) {
                return Ok(());
            }
            self.clock.sleep(self.poll_interval).await;
        }
        Err(LeaseError::Timeout {
            operation: "wait_table_active",
            after: TABLE_ACTIVE_TIMEOUT,
        })
    }
}

fn build_error(source: impl std::error::Error + Send + Sync + 'static) -> LeaseError {
    LeaseError::Service {
        source: Box::new(source),
    }
}

#[async_trait]
impl StateTable for DynamoStateTable {
    fn table_name(&self) -> &str {
        &self.table_name
    }

    fn key_attribute(&self) -> &str {
        &self.key_attribute
    }

    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        if self.status().await?.is_some() {
            self.wait_active().await?;
            return Ok(false);
        }
        let mut request = self
            .client
            .create_table()
            .table_name(&self.table_name)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(&self.key_attribute)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build_error)?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(&self.key_attribute)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(build_error)?,
            );
        request = match billing {
            BillingMode::Provisioned {
                read_capacity_units,
                write_capacity_units,
            } => request
                .billing_mode(DynamoBillingMode::Provisioned)
                .provisioned_throughput(
                    ProvisionedThroughput::builder()
                        .read_capacity_units(i64::try_from(read_capacity_units).unwrap_or(i64::MAX))
                        .write_capacity_units(
                            i64::try_from(write_capacity_units).unwrap_or(i64::MAX),
                        )
                        .build()
                        .map_err(build_error)?,
                ),
            _ => request.billing_mode(DynamoBillingMode::PayPerRequest),
        };
        let created = bounded(&*self.clock, self.call_timeout, "create_table", async {
            match request.send().await {
                Ok(_) => Ok(true),
                Err(err) if err.code() == Some("ResourceInUseException") => Ok(false),
                Err(err) => Err(self.map_err(err, None)),
            }
        })
        .await?;
        self.wait_active().await?;
        Ok(created)
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError> {
        let call = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .set_key(Some(self.key(key)))
            .consistent_read(true)
            .send();
        let out = bounded(&*self.clock, self.call_timeout, "get", async {
            call.await.map_err(|e| self.map_err(e, Some(key)))
        })
        .await?;
        Ok(out.item().map(to_item))
    }

    async fn scan(&self) -> Result<Vec<Item>, LeaseError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let call = self
                .client
                .scan()
                .table_name(&self.table_name)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send();
            let out = bounded(&*self.clock, self.call_timeout, "scan", async {
                call.await.map_err(|e| self.map_err(e, None))
            })
            .await?;
            items.extend(out.items().iter().map(to_item));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(items),
            }
        }
    }

    async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError> {
        let key = item_key(item, &self.key_attribute)?.to_owned();
        let mut p = Placeholders::default();
        let expression = p.condition(condition);
        let (names, values) = p.into_parts();
        let call = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .set_item(Some(
                item.iter()
                    .map(|(k, v)| (k.clone(), to_attribute_value(v)))
                    .collect(),
            ))
            .set_condition_expression(expression)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send();
        bounded(&*self.clock, self.call_timeout, "put", async {
            call.await
                .map(|_| ())
                .map_err(|e| self.map_err(e, Some(&key)))
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        update: &Update,
        condition: &Condition,
    ) -> Result<(), LeaseError> {
        let mut p = Placeholders::default();
        let update_expression = p.update(update);
        let expression = p.condition(condition);
        let (names, values) = p.into_parts();
        let call = self
            .client
            .update_item()
            .table_name(&self.table_name)
            .set_key(Some(self.key(key)))
            .update_expression(update_expression)
            .set_condition_expression(expression)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send();
        bounded(&*self.clock, self.call_timeout, "update", async {
            call.await
                .map(|_| ())
                .map_err(|e| self.map_err(e, Some(key)))
        })
        .await
    }

    async fn delete(&self, key: &str, condition: &Condition) -> Result<(), LeaseError> {
        let mut p = Placeholders::default();
        let expression = p.condition(condition);
        let (names, values) = p.into_parts();
        let call = self
            .client
            .delete_item()
            .table_name(&self.table_name)
            .set_key(Some(self.key(key)))
            .set_condition_expression(expression)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send();
        bounded(&*self.clock, self.call_timeout, "delete", async {
            call.await
                .map(|_| ())
                .map_err(|e| self.map_err(e, Some(key)))
        })
        .await
    }
}

/// The follower's discovery query: the lease keys the `LeaseOwnerToLeaseKeyIndex` GSI of a
/// lease table lists for one owner (`leaseOwner = :owner`, all pages). The GSI is
/// eventually consistent: read each lease before acting on it.
#[derive(Clone)]
pub struct LeaseOwnerIndex {
    client: Client,
    lease_table: String,
    clock: Arc<dyn Clock>,
    call_timeout: Duration,
}

impl fmt::Debug for LeaseOwnerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseOwnerIndex")
            .field("lease_table", &self.lease_table)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

impl LeaseOwnerIndex {
    /// The index of `lease_table`, each page bounded by `call_timeout` on `clock`.
    pub fn new(
        client: Client,
        lease_table: impl Into<String>,
        clock: Arc<dyn Clock>,
        call_timeout: Duration,
    ) -> Self {
        Self {
            client,
            lease_table: lease_table.into(),
            clock,
            call_timeout,
        }
    }

    /// The lease keys the index lists for `owner`, in key order.
    pub async fn lease_keys_of(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        let mut keys = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let call = self
                .client
                .query()
                .table_name(&self.lease_table)
                .index_name(LEASE_OWNER_INDEX)
                .key_condition_expression("#o = :o")
                .expression_attribute_names("#o", lease_attr::LEASE_OWNER)
                .expression_attribute_values(":o", AttributeValue::S(owner.to_owned()))
                .set_exclusive_start_key(start.take())
                .send();
            let out = bounded(
                &*self.clock,
                self.call_timeout,
                "query_lease_owner_index",
                async {
                    call.await
                        .map_err(|e| crate::dynamo::map_sdk_error(&self.lease_table, e, None))
                },
            )
            .await?;
            keys.extend(out.items().iter().filter_map(
                |item| match item.get(lease_attr::LEASE_KEY) {
                    Some(AttributeValue::S(k)) => Some(k.clone()),
                    _ => None,
                },
            ));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => return Ok(keys),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn values_convert_both_ways() {
        let v = Value::M(BTreeMap::from([
            (
                "C".to_owned(),
                Value::L(vec![Value::N("1.5".into()), Value::N("-1".into())]),
            ),
            ("b".to_owned(), Value::B(vec![1, 2])),
            ("t".to_owned(), Value::Bool(true)),
            ("z".to_owned(), Value::Null),
            ("ss".to_owned(), Value::Ss(vec!["a".into()])),
        ]));
        assert_eq!(from_attribute_value(&to_attribute_value(&v)), Some(v));
        assert_eq!(from_attribute_value(&AttributeValue::Bs(vec![])), None);
    }

    #[test]
    fn expressions_use_placeholders() {
        let mut p = Placeholders::default();
        let c = Condition::And(vec![
            Condition::exists("key"),
            Condition::equals("recordVersionNumber", Value::s("r")),
            Condition::Always,
        ]);
        assert_eq!(
            p.condition(&c).unwrap(),
            "(attribute_exists(#n0)) AND (#n1 = :v0)"
        );
        let u = Update::new()
            .set("leaseDuration", Value::s("10000"))
            .set("recordVersionNumber", Value::s("n"))
            .remove("isReleased");
        assert_eq!(p.update(&u), "SET #n2 = :v1, #n1 = :v2 REMOVE #n3");
        let (names, values) = p.into_parts();
        assert_eq!(names.unwrap().len(), 4);
        assert_eq!(values.unwrap().len(), 3);
        let mut p = Placeholders::default();
        assert_eq!(p.condition(&Condition::Always), None);
        assert_eq!(p.into_parts(), (None, None));
    }
}
