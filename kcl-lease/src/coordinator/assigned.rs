//! The KCL 3.x follower: no taker; the leases the leader assigned to this worker are
//! found through the lease owner index and held from then on (see the module docs,
//! *The 3.x protocol*).

use std::collections::BTreeSet;

use super::LeaseCoordinator;
use super::renewer::RenewOutcome;
use crate::LeaseError;

/// What one [`LeaseCoordinator::discover_assigned`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DiscoveryReport {
    /// Leases assigned to this worker, now held (and renewed once, at once).
    pub adopted: Vec<String>,
    /// Leases assigned to this worker whose previous owner is still handing them over
    /// (`checkpointOwner` set): tried again at the next discovery.
    pub handoff_pending: Vec<String>,
    /// Keys the index listed for this worker whose row names another owner, is finished
    /// (`SHARD_END`), or is gone: the index lagged behind the table.
    pub not_ours: Vec<String>,
    /// Leases adopted whose first renewal failed its condition (reassigned meanwhile).
    pub lost_at_once: Vec<String>,
    /// Keys whose read failed: tried again at the next discovery.
    pub failed: usize,
}

impl LeaseCoordinator {
    /// One discovery of the KCL 3.x follower: asks the lease owner index for the leases
    /// of this worker ([`crate::LeaseStore::lease_keys_of_owner`]), reads each one not held
    /// yet (consistently: the index lags), and adopts it when the row still names this
    /// worker as owner, no handoff is pending on it and it is not finished: the lease joins
    /// the held set as read ([`super::LeaseEvent::Gained`]) and is renewed at once, so the
    /// leader sees its assignee alive within one discovery interval. Only the index query
    /// failing fails the call. Every store call is bounded by `call_timeouts.call`.
    pub async fn discover_assigned(&self) -> Result<DiscoveryReport, LeaseError> {
        let me = self.config.worker_id.clone();
        let keys = self
            .bounded("lease_keys_of_owner", self.store.lease_keys_of_owner(&me))
            .await?;
        let held: BTreeSet<String> = self.held_keys().into_iter().collect();
        let mut report = DiscoveryReport::default();
        for key in keys.into_iter().filter(|k| !held.contains(k)) {
            match self.bounded("get_lease", self.store.get_lease(&key)).await {
                Ok(Some(lease))
                    if lease.lease_owner.as_deref() == Some(me.as_str())
                        && !lease.is_finished() =>
                {
                    if lease.checkpoint_owner.is_some() {
                        report.handoff_pending.push(key);
                        continue;
                    }
                    if self.is_held(&key) {
                        continue;
                    }
                    self.gain(lease, false);
                    match self.renew_lease_now(&key).await {
                        RenewOutcome::Lost(_) => report.lost_at_once.push(key),
                        _ => report.adopted.push(key),
                    }
                }
                Ok(_) => report.not_ours.push(key),
                Err(err) => {
                    tracing::debug!(
                        worker_id = %me,
                        lease_key = %key,
                        error = %crate::ErrorChain(&err),
                        "reading an assigned lease failed; trying again at the next discovery"
                    );
                    report.failed += 1;
                }
            }
        }
        if !report.adopted.is_empty() {
            tracing::info!(worker_id = %me, adopted = ?report.adopted, "leases assigned by the leader adopted");
        }
        Ok(report)
    }

    /// Turns the taker loop on (the 2.x protocol) or off (the 3.x protocol: the leader
    /// assigns). While off, the loop sleeps; turned on again it starts with a discovery
    /// pass. The renewer runs either way.
    pub fn set_taker_enabled(&self, enabled: bool) {
        let changed = self.taker_enabled.send_replace(enabled) != enabled;
        if changed {
            tracing::info!(worker_id = %self.config.worker_id, enabled, "lease taker switched");
        }
    }

    /// Whether the taker loop takes leases (see [`LeaseCoordinator::set_taker_enabled`]).
    pub fn is_taker_enabled(&self) -> bool {
        *self.taker_enabled.borrow()
    }
}
