//! How a 3.x follower finds the leases the leader assigned to it: [`discover`] asks the
//! lease owner index for its lease keys ([`LeaseOwnerQuery`]), reads each key it does not
//! hold yet (consistently: the index is eventually consistent), and accepts a lease only
//! when the row still names it as owner and no graceful handoff is pending on it
//! (`checkpointOwner` set: the previous owner is still finishing). This is the Java KCL 3.x
//! follower's discovery; the caller then holds the accepted leases, counting them renewed
//! as of the read, and renews them as usual. Not wired into the worker yet.
//!
//! Implementations of [`LeaseOwnerQuery`]: `v3::dynamo::LeaseOwnerIndex` (the GSI query,
//! feature `dynamodb`) and [`StoreOwnerQuery`], which answers from any [`LeaseStore`]'s
//! listing (for in-memory tests; it costs a full listing, unlike the index).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::table::bounded;
use crate::{Clock, Lease, LeaseError, LeaseStore};

/// The lease keys assigned to one owner, as an index lists them (possibly stale).
#[async_trait]
pub trait LeaseOwnerQuery: Send + Sync + Debug {
    /// The lease keys listed for `owner`.
    async fn lease_keys_of(&self, owner: &str) -> Result<Vec<String>, LeaseError>;
}

#[cfg(feature = "dynamodb")]
#[async_trait]
impl LeaseOwnerQuery for super::dynamo::LeaseOwnerIndex {
    async fn lease_keys_of(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        super::dynamo::LeaseOwnerIndex::lease_keys_of(self, owner).await
    }
}

/// A [`LeaseOwnerQuery`] answered by a lease store ([`LeaseStore::lease_keys_of_owner`]).
#[derive(Debug)]
pub struct StoreOwnerQuery(pub Arc<dyn LeaseStore>);

#[async_trait]
impl LeaseOwnerQuery for StoreOwnerQuery {
    async fn lease_keys_of(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        self.0.lease_keys_of_owner(owner).await
    }
}

/// What one discovery found.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct Discovery {
    /// Leases to start holding, as read.
    pub accepted: Vec<Lease>,
    /// Keys the index listed whose row names another owner (or is gone): the index lagged.
    pub not_ours: Vec<String>,
    /// Keys assigned to us with a handoff still pending: tried again next time.
    pub handoff_pending: Vec<String>,
    /// Keys whose read failed: tried again next time.
    pub failed: Vec<(String, LeaseError)>,
}

/// One discovery for worker `me`, holding `held` already; every call bounded by `limit`
/// on `clock`. Only the index query failing fails the whole discovery.
pub async fn discover(
    index: &dyn LeaseOwnerQuery,
    store: &dyn LeaseStore,
    me: &str,
    held: &BTreeSet<String>,
    clock: &dyn Clock,
    limit: Duration,
) -> Result<Discovery, LeaseError> {
    let keys = bounded(clock, limit, "lease_keys_of", index.lease_keys_of(me)).await?;
    let mut out = Discovery::default();
    for key in keys.into_iter().filter(|k| !held.contains(k)) {
        match bounded(clock, limit, "get_lease", store.get_lease(&key)).await {
            Ok(Some(lease)) if lease.lease_owner.as_deref() != Some(me) => out.not_ours.push(key),
            Ok(Some(lease)) if lease.checkpoint_owner.is_some() => out.handoff_pending.push(key),
            Ok(Some(lease)) => out.accepted.push(lease),
            Ok(None) => out.not_ours.push(key),
            Err(err) => out.failed.push((key, err)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use kcl_kpl::ExtendedSequenceNumber;

    use super::*;
    use crate::BillingMode;
    use crate::test_util::{InMemoryLeaseStore, ManualClock};

    /// An index that answers from a snapshot: it lags behind the table.
    #[derive(Debug)]
    struct Lagging(Mutex<Vec<String>>);

    #[async_trait]
    impl LeaseOwnerQuery for Lagging {
        async fn lease_keys_of(&self, _owner: &str) -> Result<Vec<String>, LeaseError> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    #[tokio::test]
    async fn accepts_only_leases_still_ours_without_a_pending_handoff() {
        let store = Arc::new(InMemoryLeaseStore::new());
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap();
        for i in 0..5 {
            let lease = Lease::new(format!("s{i}"), ExtendedSequenceNumber::TRIM_HORIZON);
            store.create_lease_if_not_exists(&lease).await.unwrap();
            let owner = if i == 3 { "other" } else { "me" };
            store.take_lease(&lease, owner).await.unwrap();
        }
        // A lease handed to us whose previous owner is still finishing.
        let mut pending = Lease::new("s5", ExtendedSequenceNumber::TRIM_HORIZON);
        pending.lease_owner = Some("me".into());
        pending.checkpoint_owner = Some("prev".into());
        store.create_lease_if_not_exists(&pending).await.unwrap();
        let clock = ManualClock::new();
        let limit = Duration::from_secs(2);
        let held = BTreeSet::from(["s0".to_owned()]);
        let index = StoreOwnerQuery(store.clone());
        let found = discover(&index, &*store, "me", &held, &clock, limit)
            .await
            .unwrap();
        let keys: Vec<&str> = found
            .accepted
            .iter()
            .map(|l| l.lease_key.as_str())
            .collect();
        assert_eq!(keys, ["s1", "s2", "s4"], "s0 held already, s3 not ours");
        assert_eq!(found.handoff_pending, ["s5"]);
        assert!(found.not_ours.is_empty() && found.failed.is_empty());

        // A lagging index lists a lease that moved on, and one that is gone.
        let lagging = Lagging(Mutex::new(vec!["s3".into(), "gone".into(), "s4".into()]));
        let found = discover(&lagging, &*store, "me", &BTreeSet::new(), &clock, limit)
            .await
            .unwrap();
        assert_eq!(found.not_ours, ["s3", "gone"]);
        assert_eq!(found.accepted.len(), 1);
    }

    #[tokio::test]
    async fn a_failing_read_skips_one_lease_a_failing_index_fails_the_discovery() {
        let store = Arc::new(InMemoryLeaseStore::new());
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await
            .unwrap();
        let lease = Lease::new("s0", ExtendedSequenceNumber::TRIM_HORIZON);
        store.create_lease_if_not_exists(&lease).await.unwrap();
        store.take_lease(&lease, "me").await.unwrap();
        let clock = ManualClock::new();
        let limit = Duration::from_secs(2);
        let index = Lagging(Mutex::new(vec!["s0".into()]));
        store.set_unreachable(true);
        let found = discover(&index, &*store, "me", &BTreeSet::new(), &clock, limit)
            .await
            .unwrap();
        assert_eq!(found.failed.len(), 1);
        assert!(found.failed[0].1.is_retryable());
        let err = discover(
            &StoreOwnerQuery(store.clone()),
            &*store,
            "me",
            &BTreeSet::new(),
            &clock,
            limit,
        )
        .await
        .unwrap_err();
        assert!(err.is_retryable());
        store.set_unreachable(false);
        let found = discover(&index, &*store, "me", &BTreeSet::new(), &clock, limit)
            .await
            .unwrap();
        assert_eq!(found.accepted.len(), 1);
    }
}
