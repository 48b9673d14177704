//! The lease model: one row of the lease table.

use std::collections::BTreeSet;

use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange};

/// One lease: the right to process one shard, and the shard's checkpoint.
///
/// Field by field this is a row of the Java KCL 2.x lease table, plus two attributes the
/// Java KCL 3.x writes: `throughputKBps` and `checkpointOwner`.
///
/// `PartialEq` only (no `Eq`): `throughput_kbps` is a floating point number.
#[derive(Clone, PartialEq, Debug)]
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
    /// `throughputKBps` (N): the owner's recent delivery rate for this lease in KB/s, as
    /// written by its last renewal; `None` when the row has none. Informative only: no
    /// decision of ours reads it.
    pub throughput_kbps: Option<f64>,
    /// `checkpointOwner` (S): present while a Java KCL 3.x graceful handoff is in flight
    /// (`lease_owner` is then the next owner and this the current one). A take removes it.
    pub checkpoint_owner: Option<String>,
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
            throughput_kbps: None,
            checkpoint_owner: None,
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

    /// True while a graceful handoff (a `checkpointOwner`) is recorded in the row.
    pub fn is_in_handoff(&self) -> bool {
        self.checkpoint_owner.is_some()
    }

    /// True when `worker_id` owns the lease.
    pub fn is_owned_by(&self, worker_id: &str) -> bool {
        self.lease_owner.as_deref() == Some(worker_id)
    }
}
