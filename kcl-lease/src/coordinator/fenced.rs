//! Fenced writes of a held lease: serialized per lease, conditioned on the owner and the
//! counter this worker last wrote, bounded by the call timeout, and applied to the held set.

use std::collections::BTreeSet;
use std::future::Future;

use kcl_kpl::ExtendedSequenceNumber;

use super::LeaseCoordinator;
use super::events::LostReason;
use crate::{Lease, LeaseError};

/// What the re-read after a failed condition found.
pub(super) enum Reread {
    /// The outcome of the write (recovered, or the failure as it was).
    Done(Result<Lease, LeaseError>),
    /// A graceful handoff of the lease began: the row now.
    HandoffBegun(Lease),
}

impl Reread {
    /// The outcome, a handoff that began (again) being the failure it is.
    pub(super) fn into_result(self) -> Result<Lease, LeaseError> {
        match self {
            Reread::Done(result) => result,
            Reread::HandoffBegun(row) => Err(LeaseError::ConditionFailed {
                lease_key: row.lease_key,
            }),
        }
    }
}

/// True when `row` shows a graceful handoff from `me` that began after `seen` (this worker's
/// view, outside a handoff): `checkpointOwner = me`, another `leaseOwner`, and the counter
/// seen or one above it (only this worker moves the counter while it is the actual owner).
pub(super) fn handoff_begun(seen: &Lease, row: &Lease, me: &str) -> bool {
    seen.checkpoint_owner.is_none()
        && seen.lease_owner.as_deref() == Some(me)
        && row.checkpoint_owner.as_deref() == Some(me)
        && row.lease_owner.as_deref().is_some_and(|owner| owner != me)
        && (row.lease_counter == seen.lease_counter
            || row.lease_counter == seen.lease_counter.saturating_add(1))
}

impl LeaseCoordinator {
    /// Runs one fenced write of holding `generation` of `lease_key` under its write lock,
    /// and applies the outcome to the held set: success updates the view; a failed condition
    /// or a missing lease loses the lease (with an event); other errors change nothing.
    /// [`LeaseError::NotHeld`] when that holding ended.
    pub(super) async fn fenced_write<F, Fut>(
        &self,
        operation: &'static str,
        lease_key: &str,
        generation: u64,
        write: F,
    ) -> Result<Lease, LeaseError>
    where
        F: Fn(Lease) -> Fut,
        Fut: Future<Output = Result<Lease, LeaseError>>,
    {
        let not_held = || LeaseError::NotHeld {
            lease_key: lease_key.to_owned(),
        };
        let (_, write_lock) = self
            .held_entry(lease_key)
            .filter(|(g, _)| *g == generation)
            .ok_or_else(not_held)?;
        let _guard = write_lock.lock().await;
        let (lease, _) = self.view(lease_key, generation).ok_or_else(not_held)?;
        let result = self.bounded(operation, write(lease.clone())).await;
        let result = match self.recover_spurious_failure(&lease, result).await {
            Reread::Done(result) => result,
            // A handoff began: the write is made again on the new owners (at most once: a
            // handoff never begins twice in one holding).
            Reread::HandoffBegun(row) => {
                self.begin_handoff(lease_key, generation, row.clone());
                let result = self.bounded(operation, write(row.clone())).await;
                self.recover_spurious_failure(&row, result)
                    .await
                    .into_result()
            }
        };
        self.apply_write_result(lease_key, generation, result).0
    }

    /// A conditional write that failed its condition may in fact have been applied: the
    /// client retried after a timeout or reset and the retry found the row already changed
    /// by the first attempt. Writes of one lease by this worker are serialised, and another
    /// worker can only change the row by taking it (a new owner), so a row that still names
    /// the owner seen, one counter above the value seen, was written by this very call.
    /// The re-read is bounded like any other store call; when it fails the original
    /// failure stands.
    ///
    /// The re-read also tells a graceful handoff that began since this worker's view
    /// ([`Reread::HandoffBegun`]): the row names this worker as `checkpointOwner` and another
    /// as `leaseOwner`, at the counter seen (the initiation does not move it) or one above
    /// (this call had been applied before the initiation).
    pub(super) async fn recover_spurious_failure(
        &self,
        seen: &Lease,
        result: Result<Lease, LeaseError>,
    ) -> Reread {
        let Err(LeaseError::ConditionFailed { .. }) = &result else {
            return Reread::Done(result);
        };
        let reread = self
            .bounded("get_lease", self.store.get_lease(&seen.lease_key))
            .await;
        match reread {
            Ok(Some(row))
                if row.lease_owner.is_some()
                    && row.lease_owner == seen.lease_owner
                    && row.checkpoint_owner == seen.checkpoint_owner
                    && row.lease_counter == seen.lease_counter.saturating_add(1) =>
            {
                tracing::info!(
                    worker_id = %self.config.worker_id,
                    lease_key = %seen.lease_key,
                    "conditional write failed but had been applied (client retry); recovered"
                );
                Reread::Done(Ok(row))
            }
            Ok(Some(row)) if handoff_begun(seen, &row, &self.config.worker_id) => {
                Reread::HandoffBegun(row)
            }
            _ => Reread::Done(result),
        }
    }

    /// Applies the result of a fenced write of holding `generation`. The flag is true when
    /// the write lost the lease (it was still that holding and the condition failed).
    pub(super) fn apply_write_result(
        &self,
        lease_key: &str,
        generation: u64,
        result: Result<Lease, LeaseError>,
    ) -> (Result<Lease, LeaseError>, bool) {
        match result {
            Ok(written) => {
                self.record_write(generation, &written);
                (Ok(written), false)
            }
            Err(err @ LeaseError::ConditionFailed { .. }) => {
                let lost = self.lose(lease_key, generation, LostReason::ConditionFailed);
                (Err(err), lost)
            }
            Err(err @ LeaseError::NotFound { .. }) => {
                let lost = self.lose(lease_key, generation, LostReason::Deleted);
                (Err(err), lost)
            }
            Err(err) => (Err(err), false),
        }
    }

    /// The checkpoint write of [`Holding::checkpoint`](super::Holding::checkpoint).
    pub(super) async fn checkpoint_write(
        &self,
        lease_key: &str,
        generation: u64,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(
            "update_checkpoint",
            lease_key,
            generation,
            |lease| async move { store.update_checkpoint(&lease, checkpoint).await },
        )
        .await
    }

    /// The pending checkpoint write of
    /// [`Holding::prepare_checkpoint`](super::Holding::prepare_checkpoint).
    pub(super) async fn prepare_write(
        &self,
        lease_key: &str,
        generation: u64,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(
            "update_pending_checkpoint",
            lease_key,
            generation,
            |lease| async move { store.update_pending_checkpoint(&lease, pending).await },
        )
        .await
    }

    /// The child shard ids write of
    /// [`Holding::update_child_shard_ids`](super::Holding::update_child_shard_ids).
    pub(super) async fn children_write(
        &self,
        lease_key: &str,
        generation: u64,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(
            "update_child_shard_ids",
            lease_key,
            generation,
            |lease| async move { store.update_child_shard_ids(&lease, children).await },
        )
        .await
    }
}
