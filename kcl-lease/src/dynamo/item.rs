//! The lease table's row format (that of the Java KCL 2.x lease table): attribute names,
//! and conversion between [`Lease`] and DynamoDB items.

use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange};

use crate::{Lease, LeaseError};

/// The attribute names of a lease row, exactly as the Java KCL 2.x writes them.
pub mod attr {
    /// `leaseKey` (S, the HASH key): the shard id.
    pub const LEASE_KEY: &str = "leaseKey";
    /// `leaseOwner` (S): the worker id; absent when the lease is free.
    pub const LEASE_OWNER: &str = "leaseOwner";
    /// `leaseCounter` (N): the fencing counter.
    pub const LEASE_COUNTER: &str = "leaseCounter";
    /// `checkpoint` (S): a sequence number or a sentinel name.
    pub const CHECKPOINT: &str = "checkpoint";
    /// `checkpointSubSequenceNumber` (N).
    pub const CHECKPOINT_SUB_SEQUENCE_NUMBER: &str = "checkpointSubSequenceNumber";
    /// `pendingCheckpoint` (S): a prepared checkpoint; absent when none.
    pub const PENDING_CHECKPOINT: &str = "pendingCheckpoint";
    /// `pendingCheckpointSubSequenceNumber` (N); absent when no pending checkpoint.
    pub const PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER: &str = "pendingCheckpointSubSequenceNumber";
    /// `ownerSwitchesSinceCheckpoint` (N).
    pub const OWNER_SWITCHES_SINCE_CHECKPOINT: &str = "ownerSwitchesSinceCheckpoint";
    /// `parentShardId` (SS); absent for a root shard.
    pub const PARENT_SHARD_ID: &str = "parentShardId";
    /// `childShardIds` (SS); absent until the shard ends.
    pub const CHILD_SHARD_IDS: &str = "childShardIds";
    /// `startingHashKey` (S, decimal).
    pub const STARTING_HASH_KEY: &str = "startingHashKey";
    /// `endingHashKey` (S, decimal).
    pub const ENDING_HASH_KEY: &str = "endingHashKey";
    /// `throughputKBps` (N, a decimal): the owner's delivery rate, written on renewal.
    pub const THROUGHPUT_KBPS: &str = "throughputKBps";
    /// `checkpointOwner` (S): the current owner during a Java KCL 3.x graceful handoff.
    pub const CHECKPOINT_OWNER: &str = "checkpointOwner";
    /// `entityType` (S): the kind of a row; absent or `LEASE` for a lease, anything else
    /// is another kind of entity and no lease.
    pub const ENTITY_TYPE: &str = "entityType";
    /// The `entityType` of a lease row.
    pub const ENTITY_TYPE_LEASE: &str = "LEASE";
}

/// The largest `throughputKBps` written (a sanity bound far above any shard's rate).
const MAX_THROUGHPUT_KBPS: f64 = 1e12;

/// A `throughputKBps` value: rounded to 3 decimals, not negative, bounded, and 0 for a value
/// that is not a number, so that DynamoDB always accepts it.
pub(crate) fn kbps(value: f64) -> AttributeValue {
    let value = if value.is_finite() {
        ((value.clamp(0.0, MAX_THROUGHPUT_KBPS)) * 1000.0).round() / 1000.0
    } else {
        0.0
    };
    AttributeValue::N(format!("{value}"))
}

/// True when `item` is a lease row (no `entityType`, or `LEASE`).
pub(crate) fn is_lease_row(item: &HashMap<String, AttributeValue>) -> bool {
    match item.get(attr::ENTITY_TYPE) {
        None | Some(AttributeValue::Null(_)) => true,
        Some(AttributeValue::S(kind)) => kind == attr::ENTITY_TYPE_LEASE,
        Some(_) => false,
    }
}

pub(crate) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(crate) fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(crate) fn ss(values: &BTreeSet<String>) -> AttributeValue {
    AttributeValue::Ss(values.iter().cloned().collect())
}

/// The whole row for `lease`: optional attributes are left out when empty (DynamoDB has no
/// empty sets, and the Java KCL leaves them out too).
#[cfg(test)]
pub(crate) fn lease_to_item(lease: &Lease) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::new();
    item.insert(attr::LEASE_KEY.to_owned(), s(&lease.lease_key));
    for (name, value) in lease_attributes(lease) {
        item.insert(name.to_owned(), value);
    }
    item
}

/// Every attribute of `lease` but the key, for a `SET` of a create.
pub(crate) fn lease_attributes(lease: &Lease) -> Vec<(&'static str, AttributeValue)> {
    let mut out = Vec::with_capacity(13);
    if let Some(owner) = &lease.lease_owner {
        out.push((attr::LEASE_OWNER, s(owner)));
    }
    out.push((attr::LEASE_COUNTER, n(lease.lease_counter)));
    out.push((attr::CHECKPOINT, s(lease.checkpoint.sequence_str())));
    out.push((
        attr::CHECKPOINT_SUB_SEQUENCE_NUMBER,
        n(lease.checkpoint.sub_sequence_number()),
    ));
    if let Some(pending) = &lease.pending_checkpoint {
        out.push((attr::PENDING_CHECKPOINT, s(pending.sequence_str())));
        out.push((
            attr::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER,
            n(pending.sub_sequence_number()),
        ));
    }
    out.push((
        attr::OWNER_SWITCHES_SINCE_CHECKPOINT,
        n(lease.owner_switches_since_checkpoint),
    ));
    if !lease.parent_shard_ids.is_empty() {
        out.push((attr::PARENT_SHARD_ID, ss(&lease.parent_shard_ids)));
    }
    if !lease.child_shard_ids.is_empty() {
        out.push((attr::CHILD_SHARD_IDS, ss(&lease.child_shard_ids)));
    }
    if let Some(range) = &lease.hash_key_range {
        out.push((attr::STARTING_HASH_KEY, s(range.start().to_string())));
        out.push((attr::ENDING_HASH_KEY, s(range.end().to_string())));
    }
    if let Some(throughput) = lease.throughput_kbps {
        out.push((attr::THROUGHPUT_KBPS, kbps(throughput)));
    }
    if let Some(owner) = &lease.checkpoint_owner {
        out.push((attr::CHECKPOINT_OWNER, s(owner)));
    }
    out
}

/// Reads a row. Tolerates attributes it does not know, a `leaseOwner` that is absent or
/// NULL, and missing optional attributes (sub-sequence numbers and owner switches default to
/// 0). `leaseKey`, `leaseCounter` and `checkpoint` are required. `throughputKBps` is
/// informative: a value that is not a finite non-negative number reads as `None`.
pub(crate) fn lease_from_item(item: &HashMap<String, AttributeValue>) -> Result<Lease, LeaseError> {
    let lease_key = match item.get(attr::LEASE_KEY) {
        Some(AttributeValue::S(key)) => key.clone(),
        Some(_) => return Err(malformed("?", "leaseKey is not a string")),
        None => return Err(malformed("?", "no leaseKey")),
    };
    let row = Row {
        key: &lease_key,
        item,
    };
    let lease_counter = row
        .number(attr::LEASE_COUNTER)?
        .ok_or_else(|| malformed(&lease_key, "no leaseCounter"))?;
    let checkpoint_str = row
        .string(attr::CHECKPOINT)?
        .ok_or_else(|| malformed(&lease_key, "no checkpoint"))?;
    let checkpoint = row.esn(
        attr::CHECKPOINT,
        checkpoint_str,
        row.number(attr::CHECKPOINT_SUB_SEQUENCE_NUMBER)?,
    )?;
    let pending_checkpoint = match row.string(attr::PENDING_CHECKPOINT)? {
        Some(pending) => Some(row.esn(
            attr::PENDING_CHECKPOINT,
            pending,
            row.number(attr::PENDING_CHECKPOINT_SUB_SEQUENCE_NUMBER)?,
        )?),
        None => None,
    };
    let hash_key_range = match (
        row.string(attr::STARTING_HASH_KEY)?,
        row.string(attr::ENDING_HASH_KEY)?,
    ) {
        (Some(start), Some(end)) => Some(HashKeyRange::parse(start, end).map_err(|e| {
            malformed(
                &lease_key,
                &format!("bad hash key range {start}..{end}: {e}"),
            )
        })?),
        (None, None) => None,
        _ => {
            return Err(malformed(
                &lease_key,
                "only one of startingHashKey and endingHashKey",
            ));
        }
    };
    Ok(Lease {
        lease_owner: row.string(attr::LEASE_OWNER)?.map(str::to_owned),
        lease_counter,
        checkpoint,
        pending_checkpoint,
        owner_switches_since_checkpoint: row
            .number(attr::OWNER_SWITCHES_SINCE_CHECKPOINT)?
            .unwrap_or(0),
        parent_shard_ids: row.string_set(attr::PARENT_SHARD_ID)?,
        child_shard_ids: row.string_set(attr::CHILD_SHARD_IDS)?,
        hash_key_range,
        throughput_kbps: row.decimal(attr::THROUGHPUT_KBPS),
        checkpoint_owner: row.string(attr::CHECKPOINT_OWNER)?.map(str::to_owned),
        lease_key,
    })
}

fn malformed(lease_key: &str, reason: &str) -> LeaseError {
    LeaseError::MalformedLease {
        lease_key: lease_key.to_owned(),
        reason: reason.to_owned(),
    }
}

struct Row<'a> {
    key: &'a str,
    item: &'a HashMap<String, AttributeValue>,
}

impl<'a> Row<'a> {
    /// A string attribute; absent and NULL are `None`.
    fn string(&self, name: &str) -> Result<Option<&'a str>, LeaseError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v)),
            Some(_) => Err(malformed(self.key, &format!("{name} is not a string"))),
        }
    }

    /// A non-negative integer attribute; absent and NULL are `None`.
    fn number(&self, name: &str) -> Result<Option<u64>, LeaseError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => v.parse::<u64>().map(Some).map_err(|_| {
                malformed(
                    self.key,
                    &format!("{name} is not a non-negative integer: {v:?}"),
                )
            }),
            Some(_) => Err(malformed(self.key, &format!("{name} is not a number"))),
        }
    }

    /// A decimal attribute, tolerantly: absent, NULL, not a number, negative or not finite
    /// are all `None`.
    fn decimal(&self, name: &str) -> Option<f64> {
        match self.item.get(name) {
            Some(AttributeValue::N(v)) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0),
            _ => None,
        }
    }

    /// A string set; absent and NULL are empty.
    fn string_set(&self, name: &str) -> Result<BTreeSet<String>, LeaseError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(BTreeSet::new()),
            Some(AttributeValue::Ss(v)) => Ok(v.iter().cloned().collect()),
            Some(_) => Err(malformed(self.key, &format!("{name} is not a string set"))),
        }
    }

    fn esn(
        &self,
        name: &str,
        value: &str,
        sub_sequence_number: Option<u64>,
    ) -> Result<ExtendedSequenceNumber, LeaseError> {
        ExtendedSequenceNumber::parse(value, sub_sequence_number.unwrap_or(0))
            .map_err(|e| malformed(self.key, &format!("bad {name}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_lease() -> Lease {
        let mut lease = Lease::new(
            "shardId-000000000007",
            "49590338271490256608559692538361571095921575989136588898.3"
                .parse()
                .unwrap(),
        )
        .with_parents(["shardId-000000000001", "shardId-000000000002"])
        .with_hash_key_range(HashKeyRange::new(5, u128::MAX).unwrap());
        lease.lease_owner = Some("worker-1".into());
        lease.lease_counter = 42;
        lease.pending_checkpoint = Some("123.4".parse().unwrap());
        lease.owner_switches_since_checkpoint = 3;
        lease.child_shard_ids = ["shardId-000000000009".to_owned()].into();
        lease.throughput_kbps = Some(12.625);
        lease.checkpoint_owner = Some("worker-0".into());
        lease
    }

    #[test]
    fn round_trip() {
        for lease in [
            full_lease(),
            Lease::new("root", ExtendedSequenceNumber::TRIM_HORIZON),
            Lease::new("end", ExtendedSequenceNumber::SHARD_END),
        ] {
            assert_eq!(lease_from_item(&lease_to_item(&lease)).unwrap(), lease);
        }
    }

    #[test]
    fn optional_attributes_left_out() {
        let item = lease_to_item(&Lease::new("root", ExtendedSequenceNumber::LATEST));
        let mut names: Vec<_> = item.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "checkpoint",
                "checkpointSubSequenceNumber",
                "leaseCounter",
                "leaseKey",
                "ownerSwitchesSinceCheckpoint"
            ]
        );
    }

    #[test]
    fn tolerant_reading() {
        let mut item = HashMap::new();
        item.insert("leaseKey".to_owned(), s("k"));
        item.insert("leaseCounter".to_owned(), n(3));
        item.insert("checkpoint".to_owned(), s("LATEST"));
        item.insert("leaseOwner".to_owned(), AttributeValue::Null(true));
        item.insert("checkpointOwner".to_owned(), AttributeValue::Null(true));
        item.insert("leaseState".to_owned(), s("whatever"));
        item.insert("throughputKBps".to_owned(), s("fast"));
        let lease = lease_from_item(&item).unwrap();
        assert_eq!(lease.throughput_kbps, None);
        assert_eq!(lease.checkpoint_owner, None);
        assert_eq!(lease.lease_owner, None);
        assert_eq!(lease.lease_counter, 3);
        assert_eq!(lease.checkpoint, ExtendedSequenceNumber::LATEST);
    }

    #[test]
    fn malformed_rows_name_the_key() {
        let base = lease_to_item(&full_lease());
        let cases: Vec<(&str, Option<AttributeValue>)> = vec![
            ("leaseCounter", None),
            ("leaseCounter", Some(s("1"))),
            ("leaseCounter", Some(AttributeValue::N("-1".into()))),
            ("checkpoint", None),
            ("checkpoint", Some(s("12x"))),
            ("parentShardId", Some(s("p"))),
            ("endingHashKey", None),
            ("startingHashKey", Some(s("not a number"))),
            ("leaseOwner", Some(n(1))),
        ];
        for (name, value) in cases {
            let mut item = base.clone();
            match value {
                Some(v) => item.insert(name.to_owned(), v),
                None => item.remove(name),
            };
            match lease_from_item(&item) {
                Err(LeaseError::MalformedLease { lease_key, reason }) => {
                    assert_eq!(lease_key, "shardId-000000000007", "{name}");
                    assert!(!reason.is_empty());
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut item = base;
        item.remove("leaseKey");
        assert!(matches!(
            lease_from_item(&item),
            Err(LeaseError::MalformedLease { lease_key, .. }) if lease_key == "?"
        ));
    }

    #[test]
    fn throughput_values() {
        let text = |v: f64| match kbps(v) {
            AttributeValue::N(n) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(text(0.0), "0");
        assert_eq!(text(1.5), "1.5");
        assert_eq!(text(0.1 + 0.2), "0.3");
        assert_eq!(text(1e-9), "0");
        assert_eq!(text(-3.0), "0");
        assert_eq!(text(f64::NAN), "0");
        assert_eq!(text(f64::INFINITY), "0");
        assert_eq!(text(1e300), "1000000000000");
        let mut item = lease_to_item(&Lease::new("k", ExtendedSequenceNumber::LATEST));
        for (value, read) in [
            ("2.25", Some(2.25)),
            ("0", Some(0.0)),
            ("1E+2", Some(100.0)),
            ("-1", None),
            ("NaN", None),
        ] {
            item.insert("throughputKBps".to_owned(), AttributeValue::N(value.into()));
            assert_eq!(
                lease_from_item(&item).unwrap().throughput_kbps,
                read,
                "{value}"
            );
        }
    }

    #[test]
    fn entity_types() {
        let mut item = lease_to_item(&Lease::new("k", ExtendedSequenceNumber::LATEST));
        assert!(is_lease_row(&item));
        item.insert("entityType".to_owned(), s("LEASE"));
        assert!(is_lease_row(&item));
        item.insert("entityType".to_owned(), s("STREAM_METADATA"));
        assert!(!is_lease_row(&item));
    }
}
