//! Releasing held leases on graceful shutdown.

use super::events::ReleaseReport;
use super::fenced::handoff_begun;
use super::join::join_all_limited;
use super::{LeaseCoordinator, MAX_CONCURRENT_WRITES};
use crate::LeaseError;

impl LeaseCoordinator {
    /// The release of [`Holding::release`](super::Holding::release): fenced on owner and
    /// counter, removes the owner. The holding leaves the held set whatever the outcome and
    /// no [`LeaseEvent::Lost`](super::LeaseEvent::Lost) is sent.
    pub(super) async fn release_write(
        &self,
        lease_key: &str,
        generation: u64,
    ) -> Result<(), LeaseError> {
        let not_held = || LeaseError::NotHeld {
            lease_key: lease_key.to_owned(),
        };
        let (_, write_lock) = self
            .held_entry(lease_key)
            .filter(|(g, _)| *g == generation)
            .ok_or_else(not_held)?;
        let _guard = write_lock.lock().await;
        let (lease, _) = self.view(lease_key, generation).ok_or_else(not_held)?;
        let mut lease = lease;
        let mut handing_over = lease.is_in_handoff();
        let mut result = if handing_over {
            // A graceful handoff: the next owner owns the lease from now on.
            self.bounded("complete_handoff", self.store.complete_handoff(&lease))
                .await
        } else {
            self.bounded("release_lease", self.store.release_lease(&lease))
                .await
        };
        // A handoff that began since the last write (not noticed yet): complete it rather
        // than leave it to time out.
        if !handing_over && matches!(result, Err(LeaseError::ConditionFailed { .. })) {
            let reread = self
                .bounded("get_lease", self.store.get_lease(lease_key))
                .await;
            if let Ok(Some(row)) = reread
                && handoff_begun(&lease, &row, &self.config.worker_id)
            {
                handing_over = true;
                result = self
                    .bounded("complete_handoff", self.store.complete_handoff(&row))
                    .await;
                lease = row;
            }
        }
        self.remove(lease_key, Some(generation));
        match &result {
            Ok(_) if handing_over => tracing::info!(
                worker_id = %self.config.worker_id,
                lease_key,
                next_owner = lease.lease_owner.as_deref().unwrap_or(""),
                "lease handed over"
            ),
            Ok(_) => {
                tracing::info!(worker_id = %self.config.worker_id, lease_key, "lease released")
            }
            Err(err) => tracing::warn!(
                worker_id = %self.config.worker_id,
                lease_key,
                error = %crate::ErrorChain(&err),
                "lease release failed"
            ),
        }
        result.map(|_| ())
    }

    /// Releases every held lease concurrently (each as
    /// [`Holding::release`](super::Holding::release)). The held set is empty afterwards.
    pub async fn release_all(&self) -> ReleaseReport {
        let holdings: Vec<_> = self
            .held_keys()
            .iter()
            .filter_map(|key| self.holding(key))
            .collect();
        let results = join_all_limited(
            holdings
                .iter()
                .map(|h| self.release_write(h.lease_key(), h.generation())),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut report = ReleaseReport::default();
        for (holding, result) in holdings.into_iter().zip(results) {
            let key = holding.lease_key().to_owned();
            match result {
                Ok(()) => report.released.push(key),
                Err(
                    LeaseError::ConditionFailed { .. }
                    | LeaseError::NotFound { .. }
                    | LeaseError::NotHeld { .. },
                ) => report.already_lost.push(key),
                Err(err) => report.failed.push((key, err)),
            }
        }
        report
    }
}
