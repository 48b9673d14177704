//! Releasing held leases on graceful shutdown.

use super::events::ReleaseReport;
use super::join::join_all_limited;
use super::{LeaseCoordinator, MAX_CONCURRENT_WRITES};
use crate::LeaseError;

impl LeaseCoordinator {
    /// Releases a held lease (graceful shutdown): fenced on owner and counter, removes the
    /// owner. The lease leaves the held set whatever the outcome and no
    /// [`LeaseEvent::Lost`] is sent. [`LeaseError::NotHeld`] when not held;
    /// [`LeaseError::ConditionFailed`] when it had already been taken or changed.
    pub async fn release(&self, lease_key: &str) -> Result<(), LeaseError> {
        self.release_write(lease_key, None).await
    }

    /// [`LeaseCoordinator::release`] of one holding only: [`LeaseError::NotHeld`] when the
    /// lease was lost (and perhaps gained again) since.
    pub async fn release_in(&self, lease_key: &str, holding: u64) -> Result<(), LeaseError> {
        self.release_write(lease_key, Some(holding)).await
    }

    pub(super) async fn release_write(
        &self,
        lease_key: &str,
        holding: Option<u64>,
    ) -> Result<(), LeaseError> {
        let not_held = || LeaseError::NotHeld {
            lease_key: lease_key.to_owned(),
        };
        let (generation, write_lock) = self
            .held_entry(lease_key)
            .filter(|(g, _)| holding.is_none_or(|h| h == *g))
            .ok_or_else(not_held)?;
        let _guard = write_lock.lock().await;
        let (lease, _) = self.view(lease_key, generation).ok_or_else(not_held)?;
        let result = self.store.release_lease(&lease).await;
        self.remove(lease_key, Some(generation));
        match &result {
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

    /// Releases every held lease concurrently. The held set is empty afterwards.
    pub async fn release_all(&self) -> ReleaseReport {
        let keys = self.held_keys();
        let results = join_all_limited(
            keys.iter().map(|key| self.release(key)),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut report = ReleaseReport::default();
        for (key, result) in keys.into_iter().zip(results) {
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
