//! The renewer: one round renews every held lease that was not written recently.

use super::events::{LostReason, RenewReport};
use super::fenced::Reread;
use super::join::join_all_limited;
use super::{LeaseCoordinator, MAX_CONCURRENT_WRITES};
use crate::LeaseError;
use crate::timeouts::within;

/// What happened to one lease in a renewal round.
pub(super) enum RenewOutcome {
    Renewed,
    Skipped,
    Failed,
    Lost(String),
    NotHeld,
}

impl LeaseCoordinator {
    /// One renewal round over every held lease, concurrently (see the module docs).
    pub async fn renew_once(&self) -> RenewReport {
        let keys = self.held_keys();
        let outcomes = join_all_limited(
            keys.iter().map(|key| self.renew_lease(key)),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut report = RenewReport::default();
        for outcome in outcomes {
            match outcome {
                RenewOutcome::Renewed => report.renewed += 1,
                RenewOutcome::Skipped => report.skipped += 1,
                RenewOutcome::Failed => report.failed += 1,
                RenewOutcome::Lost(key) => report.lost.push(key),
                RenewOutcome::NotHeld => {}
            }
        }
        report
    }

    async fn renew_lease(&self, key: &str) -> RenewOutcome {
        self.renew_lease_with(key, false).await
    }

    /// Renews `key` now, even if it was written a moment ago (a lease just adopted from
    /// the leader's assignment: the renewal shows the leader that its assignee is alive).
    pub(super) async fn renew_lease_now(&self, key: &str) -> RenewOutcome {
        self.renew_lease_with(key, true).await
    }

    async fn renew_lease_with(&self, key: &str, force: bool) -> RenewOutcome {
        let Some((generation, write_lock)) = self.held_entry(key) else {
            return RenewOutcome::NotHeld;
        };
        // Bounded waits: a write of this lease in flight (a slow checkpoint) or a hung store
        // call must not stall the whole renewal round. The round's deadline is one renewal
        // interval, and a renewal call is never given longer than any other store call, nor
        // past failover_time since the last write, when others may take the lease: a hung
        // call must not keep it held beyond that.
        let bound = self
            .config
            .renew_interval()
            .min(self.config.call_timeouts.call);
        let bound = bound.min(self.until_failover(key, generation));
        let Some(_guard) = within(self.clock.as_ref(), bound, write_lock.lock()).await else {
            // Another write of this lease is stuck. Past the deadline since the last
            // successful write the lease is lost: others are about to take it.
            let stale = self.view(key, generation).is_some_and(|(_, last_write)| {
                self.clock.now().saturating_duration_since(last_write) >= self.renewal_deadline()
            });
            if stale && self.lose(key, generation, LostReason::RenewalTimeout) {
                return RenewOutcome::Lost(key.to_owned());
            }
            return RenewOutcome::Failed;
        };
        let Some((lease, last_write)) = self.view(key, generation) else {
            return RenewOutcome::NotHeld;
        };
        let now = self.clock.now();
        let since_write = now.saturating_duration_since(last_write);
        if !force && since_write < self.config.renew_interval() / 2 {
            return RenewOutcome::Skipped;
        }
        let sample = self.throughput_sample(key, generation, now);
        // The renewal and the re-read after a failed condition both fit in the deadline.
        let bound = bound.min(self.until_failover(key, generation));
        let renewal = async {
            let kbps = sample.map(|s| s.kbps);
            let result = self.store.renew_lease(&lease, kbps).await;
            match self.recover_spurious_failure(&lease, result).await {
                Reread::Done(result) => result,
                // A graceful handoff began: renew on the new owners, as the Java KCL 3.x
                // does, while the processor shuts down.
                Reread::HandoffBegun(row) => {
                    self.begin_handoff(key, generation, row.clone());
                    let result = self.store.renew_lease(&row, kbps).await;
                    self.recover_spurious_failure(&row, result)
                        .await
                        .into_result()
                }
            }
        };
        let result = within(self.clock.as_ref(), bound, renewal)
            .await
            .unwrap_or(Err(LeaseError::Timeout {
                operation: "renew_lease",
                after: bound,
            }));
        let succeeded = result.is_ok();
        {
            use crate::metrics as m;
            let labels = m::worker_labels(m::operation::RENEW_ALL_LEASES, &self.config.worker_id);
            metrics::histogram!(level: m::DETAILED, m::RENEW_LEASE_SUCCESS, labels.clone())
                .record(if succeeded { 1.0 } else { 0.0 });
            metrics::histogram!(level: m::DETAILED, m::RENEW_LEASE_TIME, labels).record(
                self.clock
                    .now()
                    .saturating_duration_since(now)
                    .as_secs_f64()
                    * 1000.0,
            );
        }
        metrics::counter!(
            "kcl_lease_renewals_total",
            "worker_id" => self.config.worker_id.clone(),
            "result" => if succeeded { "success" } else { "failure" }
        )
        .increment(1);
        match self.apply_write_result(key, generation, result) {
            (Ok(_), _) => {
                self.record_renewal(key, generation, sample, now);
                RenewOutcome::Renewed
            }
            (Err(_), true) => RenewOutcome::Lost(key.to_owned()),
            (Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }), false) => {
                // A newer holding (or none) replaced the one this renewal started on.
                RenewOutcome::NotHeld
            }
            (Err(err), false) => {
                let since_write = self.clock.now().saturating_duration_since(last_write);
                if since_write >= self.renewal_deadline() {
                    if self.lose(key, generation, LostReason::RenewalTimeout) {
                        RenewOutcome::Lost(key.to_owned())
                    } else {
                        RenewOutcome::NotHeld
                    }
                } else {
                    tracing::warn!(
                        worker_id = %self.config.worker_id,
                        lease_key = %key,
                        error = %crate::ErrorChain(&err),
                        since_last_write = ?since_write,
                        "lease renewal failed; retrying next round"
                    );
                    RenewOutcome::Failed
                }
            }
        }
    }

    /// The time left until `failover_time` has passed since the lease's last successful
    /// write, but at least a tenth of a renewal interval (a store that answers at once still
    /// renews a lease past that time: the write is fenced).
    fn until_failover(&self, key: &str, generation: u64) -> std::time::Duration {
        let least = self.config.renew_interval() / 10;
        self.view(key, generation)
            .map_or(least, |(_, last_write)| {
                let since_write = self.clock.now().saturating_duration_since(last_write);
                self.config.failover_time.saturating_sub(since_write)
            })
            .max(least)
    }

    /// How long after its last successful write a lease whose renewals fail is dropped:
    /// `failover_time` less half a renewal interval, so that the round falling at about
    /// `failover_time` drops it (rounds are `failover_time / 3` apart, which is not exact
    /// in nanoseconds) and never a round later.
    pub(super) fn renewal_deadline(&self) -> std::time::Duration {
        self.config
            .failover_time
            .saturating_sub(self.config.renew_interval() / 2)
    }
}
