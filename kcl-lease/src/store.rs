//! The lease store: where leases live (a DynamoDB table, or memory in tests).

use std::collections::BTreeSet;
use std::fmt::Debug;

use async_trait::async_trait;
use kcl_kpl::ExtendedSequenceNumber;

use crate::{Lease, LeaseError};

/// Billing of a lease table created by the library.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum BillingMode {
    /// On-demand capacity (the default).
    #[default]
    PayPerRequest,
    /// Provisioned capacity.
    Provisioned {
        /// Read capacity units.
        read_capacity_units: u64,
        /// Write capacity units.
        write_capacity_units: u64,
    },
}

/// Storage of leases with conditional (fenced) writes.
///
/// Every write is conditional. The `lease` argument of a write is the caller's last view
/// of the row: its `lease_counter` (and `lease_owner` where the condition names the owner)
/// is what the store compares against. On success a write returns the row as it now is
/// (counter incremented); when the condition does not hold it returns
/// [`LeaseError::ConditionFailed`], meaning "lost or changed", never anything worse.
#[async_trait]
pub trait LeaseStore: Send + Sync + Debug {
    /// Creates the lease table if it does not exist and waits until it is usable.
    /// Returns true when this call created it.
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError>;

    /// Whether the lease table exists.
    async fn table_exists(&self) -> Result<bool, LeaseError>;

    /// Writes `lease` if no lease with its key exists (`attribute_not_exists(leaseKey)`).
    /// Returns false when one already existed (nothing written).
    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError>;

    /// Every lease in the table (all pages, consistent read).
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError>;

    /// One lease, if it exists (consistent read).
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError>;

    /// Renews: `leaseCounter = lease.lease_counter AND leaseOwner = lease.lease_owner` and
    /// `checkpointOwner` as in `lease` (absent outside a handoff, so a renewal fails once a
    /// handoff of the lease began), then counter + 1, and `throughputKBps = throughput_kbps` when given (`None` leaves
    /// the attribute as it is).
    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError>;

    /// Takes for `new_owner`: `leaseCounter = lease.lease_counter` and the owner seen in
    /// `lease` (or its absence); then owner = `new_owner`, `checkpointOwner` removed,
    /// counter + 1, and `ownerSwitchesSinceCheckpoint` + 1 when the owner changes.
    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError>;

    /// Releases (graceful shutdown): `leaseOwner = lease.lease_owner AND leaseCounter =
    /// lease.lease_counter`, then removes the owner, counter + 1.
    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError>;

    /// Writes a checkpoint: owner and counter as for renew; sets the checkpoint, removes any
    /// pending checkpoint, resets `ownerSwitchesSinceCheckpoint` to 0, counter + 1.
    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError>;

    /// Writes (`Some`) or removes (`None`) the pending checkpoint: owner and counter as for
    /// renew, counter + 1.
    async fn update_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError>;

    /// Records the child shard ids of a shard that ended: owner and counter as for renew,
    /// counter + 1.
    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError>;

    /// Moves the checkpoint of a lease whoever holds it (an operator's reset, `kcl reset`):
    /// `leaseCounter = lease.lease_counter` and the owner seen in `lease` (or its absence);
    /// then the checkpoint set, the pending checkpoint removed, `ownerSwitchesSinceCheckpoint`
    /// = 0, the owner and `checkpointOwner` removed (the lease is free), counter + 1
    /// ([`LeaseWrite::ResetCheckpoint`](crate::write::LeaseWrite::ResetCheckpoint)).
    ///
    /// The default implementation returns [`LeaseError::Unsupported`] and writes nothing: it
    /// is there for stores wrapping another in tests; `DynamoLeaseStore` and the in-memory
    /// store implement it, and a wrapping store should forward the call.
    async fn reset_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let _ = (lease, checkpoint);
        Err(LeaseError::Unsupported {
            operation: "reset_checkpoint",
        })
    }

    /// Starts a graceful handoff (the Java KCL 3.x protocol, see [`crate::write`]): when the
    /// row's `leaseOwner` is `lease.lease_owner` and it has no `checkpointOwner`, writes
    /// `leaseOwner = next_owner` and `checkpointOwner` = the owner seen; the counter is
    /// neither fenced on nor moved. Returns the new row.
    ///
    /// The default implementation returns [`LeaseError::Unsupported`]: a store without it
    /// makes the coordinator steal instead (a store wrapping another should forward it).
    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        let _ = (lease, next_owner);
        Err(LeaseError::Unsupported {
            operation: "initiate_handoff",
        })
    }

    /// Completes a graceful handoff: when the row's `leaseOwner` and `checkpointOwner` are
    /// those of `lease`, removes `checkpointOwner` (the next owner, already `leaseOwner`,
    /// owns the lease from now on), counter + 1, `ownerSwitchesSinceCheckpoint` + 1.
    /// Returns the new row.
    ///
    /// The default implementation returns [`LeaseError::Unsupported`] (see
    /// [`LeaseStore::initiate_handoff`]).
    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let _ = lease;
        Err(LeaseError::Unsupported {
            operation: "complete_handoff",
        })
    }

    /// Deletes the lease if its counter is still `lease.lease_counter`.
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError>;

    /// The client version the Java KCL recorded for this application: the `cv` attribute of
    /// the `Migration3.0` item of the coordinator state table (`<table>-CoordinatorState`
    /// next to a DynamoDB lease table), read consistently. `None` when there is no such
    /// table, no such item or no `cv`, i.e. no Java KCL 3.x worker ever ran the
    /// application. Values the Java KCL writes are the names in [`client_version`].
    ///
    /// The default implementation returns `None`: it is meant for stores without a
    /// coordinator state table (a store wrapping another should forward the call).
    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        Ok(None)
    }

    /// The keys of the leases whose `leaseOwner` is `owner`, as the lease owner index
    /// (`LeaseOwnerToLeaseKeyIndex`) lists them: possibly stale, so read a lease before
    /// acting on it. This is the KCL 3.x follower's discovery query; it reads only the
    /// owner's own index entries, so its cost does not grow with the fleet.
    ///
    /// The default implementation answers from [`LeaseStore::list_leases`] (a whole scan;
    /// right, but as costly as a 2.x taker pass). A store wrapping another should forward.
    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        let mut keys: Vec<String> = self
            .list_leases()
            .await?
            .into_iter()
            .filter(|l| l.lease_owner.as_deref() == Some(owner))
            .map(|l| l.lease_key)
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Whether the lease owner index exists and is usable (`ACTIVE`): the Java KCL's
    /// condition for moving an application to 3.x. The default answers `false` (a store
    /// without such an index).
    async fn lease_owner_index_active(&self) -> Result<bool, LeaseError> {
        Ok(false)
    }

    /// The KCL 3.x state tables that go with this lease table (`<table>-CoordinatorState`
    /// and `<table>-WorkerMetricStats`), when the store has them. `None` (the default): a
    /// worker on this store can run only the 2.x protocol and follows no migration. A
    /// store wrapping another should forward.
    fn state_tables(&self) -> Option<crate::v3::table::StateTables> {
        None
    }
}

/// The client versions the Java KCL records in its coordinator state table (the values of
/// [`LeaseStore::client_version`]).
pub mod client_version {
    /// A 2.x application on its way to 3.x: the Java workers still run the 2.x protocol.
    pub const UPGRADE_FROM_2X: &str = "CLIENT_VERSION_UPGRADE_FROM_2X";
    /// Rolled back to 2.x: the Java workers run the 2.x protocol.
    pub const V2X: &str = "CLIENT_VERSION_2X";
    /// Upgraded to 3.x, rollback still possible: the 3.x protocol (leader-assigned leases).
    pub const V3X_WITH_ROLLBACK: &str = "CLIENT_VERSION_3X_WITH_ROLLBACK";
    /// Upgraded to 3.x for good: the 3.x protocol.
    pub const V3X: &str = "CLIENT_VERSION_3X";

    /// True for the versions in which the Java workers run the 3.x lease protocol.
    pub fn is_3x(client_version: &str) -> bool {
        client_version == V3X || client_version == V3X_WITH_ROLLBACK
    }
}
