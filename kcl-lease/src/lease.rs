//! The lease model: one row of the lease table.

use std::collections::BTreeSet;

use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange};

/// One lease: the right to process one shard, and the shard's checkpoint.
///
/// Field by field this is a row of the Java KCL 2.x lease table.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Lease {
    /// `leaseKey`: the shard id.
    pub lease_key: String,
    /// `leaseOwner`: the worker id holding the lease; `None` when the lease is free.
    pub lease_owner: Option<String>,
    /// `leaseCounter`: the fencing counter, +1 on every renew, take, release and checkpoint.
    pub lease_counter: u64,
    /// `checkpoint` + `checkpointSubSequenceNumber`.
    pub checkpoint: ExtendedSequenceNumber,
    /// `pendingCheckpoint` + `pendingCheckpointSubSequenceNumber`, when one is prepared.
    pub pending_checkpoint: Option<ExtendedSequenceNumber>,
    /// `ownerSwitchesSinceCheckpoint`.
    pub owner_switches_since_checkpoint: u64,
    /// `parentShardId`: parent shard ids (two after a merge, none for a root shard).
    pub parent_shard_ids: BTreeSet<String>,
    /// `childShardIds`: written when the shard ends.
    pub child_shard_ids: BTreeSet<String>,
    /// `startingHashKey` / `endingHashKey`, when known.
    pub hash_key_range: Option<HashKeyRange>,
}

impl Lease {
    /// A new, unowned lease for `shard_id` starting at `checkpoint`.
    pub fn new(shard_id: impl Into<String>, checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            lease_key: shard_id.into(),
            lease_owner: None,
            lease_counter: 0,
            checkpoint,
            pending_checkpoint: None,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
        }
    }

    /// Sets the parent shard ids.
    pub fn with_parents<I, S>(mut self, parents: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.parent_shard_ids = parents.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the hash key range.
    pub fn with_hash_key_range(mut self, range: HashKeyRange) -> Self {
        self.hash_key_range = Some(range);
        self
    }

    /// True when the shard was processed to its end (checkpoint `SHARD_END`).
    pub fn is_finished(&self) -> bool {
        self.checkpoint.is_shard_end()
    }

    /// True when `worker_id` owns the lease.
    pub fn is_owned_by(&self, worker_id: &str) -> bool {
        self.lease_owner.as_deref() == Some(worker_id)
    }
}
