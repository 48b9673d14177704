//! What the coordinator reports: changes of the held set ([`LeaseEvent`]) and what one
//! renewal round, taker pass or release did.

use std::fmt;

use crate::{Lease, LeaseError};

/// Why a lease was lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum LostReason {
    /// A fenced write (renewal, checkpoint, ...) found another owner or counter: another
    /// worker took the lease, or it was changed behind this worker's back.
    ConditionFailed,
    /// The lease no longer exists in the table.
    Deleted,
    /// Renewals kept failing (throttling, store unreachable) for about `failover_time`,
    /// after which other workers may take the lease.
    RenewalTimeout,
}

impl LostReason {
    /// A short human explanation.
    pub fn message(&self) -> &'static str {
        match self {
            LostReason::ConditionFailed => "the lease was taken or changed by another worker",
            LostReason::Deleted => "the lease was deleted",
            LostReason::RenewalTimeout => "renewals failed for the whole failover time",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            LostReason::ConditionFailed => "condition_failed",
            LostReason::Deleted => "deleted",
            LostReason::RenewalTimeout => "renewal_timeout",
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// A change of the held set, reported on [`LeaseCoordinator::events`](super::LeaseCoordinator::events).
// Events are rare (one per take or loss) and moved once: the size of a lease inline is no
// cost worth an allocation per event or a change of the variant's type.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// This worker took the lease (the row as written by the take).
    Gained(Lease),
    /// This worker lost the lease: its processor must stop (shutdown reason `Zombie`).
    Lost {
        /// The lease key.
        lease_key: String,
        /// Why.
        reason: LostReason,
    },
    /// Another worker asked for the lease by a graceful handoff (the row now names it as
    /// `leaseOwner` and this worker as `checkpointOwner`). The lease is still held and its
    /// writes still succeed: the processor should be shut down with `Requested` (it may
    /// checkpoint), then [`Holding::release`](super::Holding::release) hands the lease to
    /// `next_owner`. Not done within `handoff_timeout`, the next owner completes the handoff
    /// itself and this worker loses the lease.
    HandoffRequested {
        /// The lease key.
        lease_key: String,
        /// The worker the lease is handed to.
        next_owner: String,
    },
}

impl LeaseEvent {
    /// The key of the lease concerned.
    pub fn lease_key(&self) -> &str {
        match self {
            LeaseEvent::Gained(lease) => &lease.lease_key,
            LeaseEvent::Lost { lease_key, .. } | LeaseEvent::HandoffRequested { lease_key, .. } => {
                lease_key
            }
        }
    }
}

/// What one [`LeaseCoordinator::renew_once`](super::LeaseCoordinator::renew_once) round did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RenewReport {
    /// Leases renewed.
    pub renewed: usize,
    /// Leases skipped because they were written recently.
    pub skipped: usize,
    /// Leases whose renewal failed transiently and that are still held.
    pub failed: usize,
    /// Leases lost in this round.
    pub lost: Vec<String>,
}

/// What one [`LeaseCoordinator::take_once`](super::LeaseCoordinator::take_once) pass did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct TakeReport {
    /// Leases in the table.
    pub leases_in_table: usize,
    /// Workers counted (other live owners plus this worker).
    pub workers: usize,
    /// Leases this worker should hold.
    pub target: usize,
    /// Free leases taken in this pass.
    pub taken: Vec<String>,
    /// Leases stolen from another worker in this pass: taken from a live owner without a
    /// handoff (a store without handoffs), or handed to this worker by a handoff that did not
    /// complete within `handoff_timeout` and that this worker completed itself.
    pub stolen: Vec<String>,
    /// Graceful handoffs to this worker initiated in this pass (the leases are gained once
    /// their current owners complete them, see [`LeaseEvent::HandoffRequested`]).
    pub handoffs_initiated: Vec<String>,
    /// Handoffs to this worker still in flight after the pass.
    pub handoffs_pending: usize,
    /// True for the fleet discovery pass (the taker loop's first: at most one lease).
    pub discovery: bool,
    /// Leases held after the pass.
    pub held: usize,
}

/// What [`LeaseCoordinator::release_all`](super::LeaseCoordinator::release_all) did. Every lease left the held set.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReleaseReport {
    /// Leases released in the table.
    pub released: Vec<String>,
    /// Leases that were already lost (condition failed or deleted): nothing to release.
    pub already_lost: Vec<String>,
    /// Leases whose release failed; they expire for other workers after `failover_time`.
    pub failed: Vec<(String, LeaseError)>,
}

impl ReleaseReport {
    /// True when no release failed.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}
