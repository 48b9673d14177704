//! The conditional writes of a lease row, described once: which fields each write changes
//! and the condition (its *fence*) the stored row must meet for the write to happen.
//!
//! Every [`LeaseStore`](crate::LeaseStore) implements its writes from this description: the
//! in-memory store of `test_util` evaluates [`LeaseWrite::fence`] on its row and applies
//! [`LeaseWrite::apply`]; the DynamoDB store translates each write into one conditional
//! `UpdateItem` (or `DeleteItem`) whose condition expression is derived from the fence.
//!
//! In the table, `seen` is the caller's last view of the row (the `lease` argument of the
//! store call) and `me` the owner in that view:
//!
//! | write | changes | fence |
//! |---|---|---|
//! | [create](LeaseWrite::Create) | the whole row, as given | the row does not exist |
//! | [renew](LeaseWrite::Renew) | counter + 1, `throughputKBps` when given | counter = seen, owners = seen |
//! | [take](LeaseWrite::Take) | owner = new owner, no `checkpointOwner`, counter + 1, owner switches + 1 when the actual owner changes | counter = seen, owners = seen (no owner when seen free) |
//! | [release](LeaseWrite::Release) | no owner, counter + 1 | counter = seen, owners = seen |
//! | [checkpoint](LeaseWrite::Checkpoint) | checkpoint, no pending checkpoint, owner switches = 0, counter + 1 | counter = seen, owners = seen |
//! | [prepare checkpoint](LeaseWrite::PrepareCheckpoint) | pending checkpoint set or removed, counter + 1 | counter = seen, owners = seen |
//! | [child shard ids](LeaseWrite::ChildShardIds) | child shard ids (removed when empty), counter + 1 | counter = seen, owners = seen |
//! | [initiate handoff](LeaseWrite::InitiateHandoff) | owner = next owner, `checkpointOwner` = the owner seen; the counter does **not** move | owner = seen, no `checkpointOwner` |
//! | [complete handoff](LeaseWrite::CompleteHandoff) | `checkpointOwner` removed (the next owner, already `leaseOwner`, now owns it), counter + 1, owner switches + 1 | owner = seen, `checkpointOwner` = seen |
//! | [delete](LeaseWrite::Delete) | the row is removed | counter = seen |
//! | [reset checkpoint](LeaseWrite::ResetCheckpoint) | checkpoint, no pending checkpoint, owner switches = 0, no owner, no `checkpointOwner`, counter + 1 | counter = seen, owners = seen (no owner when seen free) |
//!
//! A reset is an operator's write (`kcl reset`), not a worker's: it moves the checkpoint of a
//! lease whoever holds it, fenced like a take so that it fails if the row changed since the
//! operator read it, and frees the lease. A worker holding it then fails its next fenced
//! write (owner and counter moved: not mistaken for its own write applied by a client retry),
//! loses the lease, and whoever takes it next resumes from the new checkpoint.
//!
//! "owners = seen" is `leaseOwner` as seen (absent when seen free) **and** `checkpointOwner` as
//! seen: absent when the lease was seen outside a handoff (so an owner's renewal fails on
//! `attribute_not_exists(checkpointOwner)` once a handoff of its lease began), the current
//! owner's id when seen in a handoff (so that owner keeps renewing and checkpointing while
//! its processor shuts down, the row's `leaseOwner` being the next owner).
//!
//! # The graceful handoff (the Java KCL 3.x protocol)
//!
//! 1. The worker that wants the lease (here the next owner; in the Java KCL 3.x the leader)
//!    initiates it: `leaseOwner` = next owner, `checkpointOwner` = the current owner, fenced
//!    on both owners only, as the Java KCL's `initiateGracefulLeaseHandoff` (the counter is
//!    not fenced on nor moved: the current owner renews it all the time).
//! 2. The current owner's next renewal fails its condition; it reads the row, sees itself as
//!    `checkpointOwner`, and renews on the new owners from then on; its processor is shut
//!    down with `Requested` and may checkpoint (fenced the same way).
//! 3. The current owner completes it (the Java KCL's `assignLease` to the next owner):
//!    `checkpointOwner` removed, counter + 1. The next owner takes it from that checkpoint.
//!    A handoff that does not complete in time is completed by the next owner itself, which
//!    then holds the lease (the current owner's next write fails: a steal).
//!
//! No write touches an attribute it does not name: every other attribute of the row (ones
//! this library does not know included) is kept as it is.
//!
//! A write whose fence names `me` needs an owner in `seen`: given a lease seen without owner,
//! [`LeaseWrite::fence`] is [`LeaseError::NotHeld`] and no store call is made. A fence that
//! does not hold is [`LeaseError::ConditionFailed`] (for a create: the row existed, which the
//! store reports as `false`).

use std::collections::BTreeSet;

use kcl_kpl::ExtendedSequenceNumber;

use crate::{Lease, LeaseError};

/// One conditional write of a lease row. See the [module documentation](self).
#[derive(Clone, Copy, PartialEq, Debug)]
#[non_exhaustive]
pub enum LeaseWrite<'a> {
    /// Creates the row `lease` if no row with its key exists.
    Create {
        /// The row to write.
        lease: &'a Lease,
    },
    /// Renews: the counter moves, and `throughputKBps` is written when given.
    Renew {
        /// The caller's view of the row.
        seen: &'a Lease,
        /// The new `throughputKBps` (`None` leaves the attribute as it is).
        throughput_kbps: Option<f64>,
    },
    /// Takes the lease for `new_owner`, ending any graceful handoff recorded in the row
    /// (`checkpointOwner` removed).
    Take {
        /// The caller's view of the row (its owner, or none, is fenced on).
        seen: &'a Lease,
        /// The taking worker.
        new_owner: &'a str,
    },
    /// Releases the lease: no owner any more.
    Release {
        /// The caller's view of the row.
        seen: &'a Lease,
    },
    /// Writes a checkpoint.
    Checkpoint {
        /// The caller's view of the row.
        seen: &'a Lease,
        /// The new checkpoint.
        checkpoint: &'a ExtendedSequenceNumber,
    },
    /// Writes (`Some`) or removes (`None`) the pending checkpoint.
    PrepareCheckpoint {
        /// The caller's view of the row.
        seen: &'a Lease,
        /// The pending checkpoint.
        pending: Option<&'a ExtendedSequenceNumber>,
    },
    /// Records the child shard ids of a shard that ended.
    ChildShardIds {
        /// The caller's view of the row.
        seen: &'a Lease,
        /// The child shard ids (none removes them).
        child_shard_ids: &'a BTreeSet<String>,
    },
    /// Starts a graceful handoff of the lease seen (owned, not in a handoff) to `next_owner`.
    InitiateHandoff {
        /// The caller's view of the row (its owner is the current owner).
        seen: &'a Lease,
        /// The worker the lease is handed to.
        next_owner: &'a str,
    },
    /// Completes the graceful handoff seen: the next owner (`leaseOwner` in `seen`) owns the
    /// lease from now on.
    CompleteHandoff {
        /// The caller's view of the row, in a handoff.
        seen: &'a Lease,
    },
    /// Deletes the row.
    Delete {
        /// The caller's view of the row.
        seen: &'a Lease,
    },
    /// Moves the checkpoint of a lease, held or not, and frees it (an operator's reset).
    ResetCheckpoint {
        /// The caller's view of the row (its owner, or none, is fenced on).
        seen: &'a Lease,
        /// The new checkpoint.
        checkpoint: &'a ExtendedSequenceNumber,
    },
}

/// The condition the stored row must meet for a [`LeaseWrite`] to happen.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Fence<'a> {
    /// No row with the key exists (`attribute_not_exists(leaseKey)`).
    NotExists,
    /// The row exists with this counter (`leaseCounter = :seen`).
    Counter(u64),
    /// The row exists with this counter, this owner (or no owner at all when `owner` is
    /// `None`) and this `checkpointOwner` (or none when `None`): `leaseCounter = :seen AND
    /// leaseOwner = :owner AND checkpointOwner = :cpo`, an absent attribute (or NULL) for
    /// `None`.
    CounterAndOwner {
        /// The counter.
        counter: u64,
        /// The owner, `None` for "no owner".
        owner: Option<&'a str>,
        /// The `checkpointOwner`, `None` for "not in a handoff".
        checkpoint_owner: Option<&'a str>,
    },
    /// The row exists with this owner and this `checkpointOwner` (none when `None`),
    /// whatever its counter.
    Owners {
        /// The owner.
        owner: &'a str,
        /// The `checkpointOwner`, `None` for "not in a handoff".
        checkpoint_owner: Option<&'a str>,
    },
}

impl Fence<'_> {
    /// Whether the fence holds for the stored row (`None` when there is none).
    pub fn holds(&self, row: Option<&Lease>) -> bool {
        match (self, row) {
            (Fence::NotExists, row) => row.is_none(),
            (_, None) => false,
            (Fence::Counter(counter), Some(row)) => row.lease_counter == *counter,
            (
                Fence::CounterAndOwner {
                    counter,
                    owner,
                    checkpoint_owner,
                },
                Some(row),
            ) => {
                row.lease_counter == *counter
                    && row.lease_owner.as_deref() == *owner
                    && row.checkpoint_owner.as_deref() == *checkpoint_owner
            }
            (
                Fence::Owners {
                    owner,
                    checkpoint_owner,
                },
                Some(row),
            ) => {
                row.lease_owner.as_deref() == Some(*owner)
                    && row.checkpoint_owner.as_deref() == *checkpoint_owner
            }
        }
    }
}

impl<'a> LeaseWrite<'a> {
    /// The key of the row written.
    pub fn lease_key(&self) -> &'a str {
        match *self {
            LeaseWrite::Create { lease } => &lease.lease_key,
            LeaseWrite::Renew { seen, .. }
            | LeaseWrite::Take { seen, .. }
            | LeaseWrite::Release { seen }
            | LeaseWrite::Checkpoint { seen, .. }
            | LeaseWrite::PrepareCheckpoint { seen, .. }
            | LeaseWrite::ChildShardIds { seen, .. }
            | LeaseWrite::InitiateHandoff { seen, .. }
            | LeaseWrite::CompleteHandoff { seen }
            | LeaseWrite::Delete { seen }
            | LeaseWrite::ResetCheckpoint { seen, .. } => &seen.lease_key,
        }
    }

    /// The name of the [`LeaseStore`](crate::LeaseStore) method making this write, e.g.
    /// `renew_lease`.
    pub fn operation(&self) -> &'static str {
        match self {
            LeaseWrite::Create { .. } => "create_lease_if_not_exists",
            LeaseWrite::Renew { .. } => "renew_lease",
            LeaseWrite::Take { .. } => "take_lease",
            LeaseWrite::Release { .. } => "release_lease",
            LeaseWrite::Checkpoint { .. } => "update_checkpoint",
            LeaseWrite::PrepareCheckpoint { .. } => "update_pending_checkpoint",
            LeaseWrite::ChildShardIds { .. } => "update_child_shard_ids",
            LeaseWrite::InitiateHandoff { .. } => "initiate_handoff",
            LeaseWrite::CompleteHandoff { .. } => "complete_handoff",
            LeaseWrite::Delete { .. } => "delete_lease",
            LeaseWrite::ResetCheckpoint { .. } => "reset_checkpoint",
        }
    }

    /// The fence of this write. [`LeaseError::NotHeld`] for a write fenced on the owner
    /// (renew, release, the checkpoint writes, the handoff writes) of a lease seen without
    /// owner, and for a completion of a lease seen outside a handoff.
    pub fn fence(&self) -> Result<Fence<'a>, LeaseError> {
        let not_held = |seen: &Lease| LeaseError::NotHeld {
            lease_key: seen.lease_key.clone(),
        };
        match *self {
            LeaseWrite::Create { .. } => Ok(Fence::NotExists),
            LeaseWrite::Delete { seen } => Ok(Fence::Counter(seen.lease_counter)),
            LeaseWrite::Take { seen, .. } | LeaseWrite::ResetCheckpoint { seen, .. } => {
                Ok(Fence::CounterAndOwner {
                    counter: seen.lease_counter,
                    owner: seen.lease_owner.as_deref(),
                    checkpoint_owner: seen.checkpoint_owner.as_deref(),
                })
            }
            LeaseWrite::Renew { seen, .. }
            | LeaseWrite::Release { seen }
            | LeaseWrite::Checkpoint { seen, .. }
            | LeaseWrite::PrepareCheckpoint { seen, .. }
            | LeaseWrite::ChildShardIds { seen, .. } => match seen.lease_owner.as_deref() {
                Some(owner) => Ok(Fence::CounterAndOwner {
                    counter: seen.lease_counter,
                    owner: Some(owner),
                    checkpoint_owner: seen.checkpoint_owner.as_deref(),
                }),
                None => Err(not_held(seen)),
            },
            LeaseWrite::InitiateHandoff { seen, .. } => match seen.lease_owner.as_deref() {
                Some(owner) => Ok(Fence::Owners {
                    owner,
                    checkpoint_owner: None,
                }),
                None => Err(not_held(seen)),
            },
            LeaseWrite::CompleteHandoff { seen } => {
                match (
                    seen.lease_owner.as_deref(),
                    seen.checkpoint_owner.as_deref(),
                ) {
                    (Some(owner), Some(checkpoint_owner)) => Ok(Fence::Owners {
                        owner,
                        checkpoint_owner: Some(checkpoint_owner),
                    }),
                    _ => Err(not_held(seen)),
                }
            }
        }
    }

    /// The row after the write, given the stored row its fence held for (`None` for a
    /// create, which has none). `None` when the write removes the row (a delete), or when a
    /// write other than a create is given no row.
    pub fn apply(&self, row: Option<&Lease>) -> Option<Lease> {
        if let LeaseWrite::Create { lease } = *self {
            return Some(lease.clone());
        }
        let mut row = row?.clone();
        match *self {
            LeaseWrite::Create { .. } | LeaseWrite::Delete { .. } => return None,
            LeaseWrite::Renew {
                throughput_kbps, ..
            } => {
                if throughput_kbps.is_some() {
                    row.throughput_kbps = throughput_kbps;
                }
            }
            LeaseWrite::Take { seen, new_owner } => {
                row.checkpoint_owner = None;
                if actual_owner(seen) != Some(new_owner) {
                    row.owner_switches_since_checkpoint =
                        row.owner_switches_since_checkpoint.saturating_add(1);
                }
                row.lease_owner = Some(new_owner.to_owned());
            }
            LeaseWrite::InitiateHandoff { seen, next_owner } => {
                // The counter stays: see the module docs.
                row.checkpoint_owner = seen.lease_owner.clone();
                row.lease_owner = Some(next_owner.to_owned());
                return Some(row);
            }
            LeaseWrite::CompleteHandoff { .. } => {
                row.checkpoint_owner = None;
                row.owner_switches_since_checkpoint =
                    row.owner_switches_since_checkpoint.saturating_add(1);
            }
            LeaseWrite::Release { .. } => row.lease_owner = None,
            LeaseWrite::Checkpoint { checkpoint, .. } => {
                row.checkpoint = checkpoint.clone();
                row.pending_checkpoint = None;
                row.owner_switches_since_checkpoint = 0;
            }
            LeaseWrite::ResetCheckpoint { checkpoint, .. } => {
                row.checkpoint = checkpoint.clone();
                row.pending_checkpoint = None;
                row.owner_switches_since_checkpoint = 0;
                row.lease_owner = None;
                row.checkpoint_owner = None;
            }
            LeaseWrite::PrepareCheckpoint { pending, .. } => {
                row.pending_checkpoint = pending.cloned();
            }
            LeaseWrite::ChildShardIds {
                child_shard_ids, ..
            } => row.child_shard_ids = child_shard_ids.clone(),
        }
        row.lease_counter = row.lease_counter.saturating_add(1);
        Some(row)
    }
}

/// The worker actually processing the lease: the `checkpointOwner` during a handoff, else
/// the `leaseOwner`.
pub fn actual_owner(lease: &Lease) -> Option<&str> {
    lease
        .checkpoint_owner
        .as_deref()
        .or(lease.lease_owner.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(owner: &str, counter: u64) -> Lease {
        let mut lease = Lease::new("k", ExtendedSequenceNumber::TRIM_HORIZON);
        lease.lease_owner = Some(owner.to_owned());
        lease.lease_counter = counter;
        lease
    }

    #[test]
    fn fences() {
        let free = Lease::new("k", ExtendedSequenceNumber::TRIM_HORIZON);
        let mine = owned("w", 3);
        assert_eq!(
            LeaseWrite::Create { lease: &free }.fence().unwrap(),
            Fence::NotExists
        );
        assert_eq!(
            LeaseWrite::Delete { seen: &mine }.fence().unwrap(),
            Fence::Counter(3)
        );
        let take = LeaseWrite::Take {
            seen: &free,
            new_owner: "w",
        };
        assert_eq!(
            take.fence().unwrap(),
            Fence::CounterAndOwner {
                counter: 0,
                owner: None,
                checkpoint_owner: None
            }
        );
        assert!(matches!(
            LeaseWrite::Renew {
                seen: &free,
                throughput_kbps: None
            }
            .fence(),
            Err(LeaseError::NotHeld { .. })
        ));
        let fence = LeaseWrite::Renew {
            seen: &mine,
            throughput_kbps: None,
        }
        .fence()
        .unwrap();
        assert!(fence.holds(Some(&mine)));
        assert!(!fence.holds(Some(&owned("w", 4))));
        assert!(!fence.holds(Some(&owned("v", 3))));
        assert!(!fence.holds(None));
        assert!(Fence::NotExists.holds(None));
        assert!(!Fence::NotExists.holds(Some(&mine)));
    }

    #[test]
    fn changes() {
        let mine = owned("w", 3);
        let esn: ExtendedSequenceNumber = "12".parse().unwrap();
        let renewed = LeaseWrite::Renew {
            seen: &mine,
            throughput_kbps: None,
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(renewed, owned("w", 4));
        let taken = LeaseWrite::Take {
            seen: &mine,
            new_owner: "v",
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(
            (taken.lease_owner.as_deref(), taken.lease_counter),
            (Some("v"), 4)
        );
        assert_eq!(taken.owner_switches_since_checkpoint, 1);
        let retaken = LeaseWrite::Take {
            seen: &mine,
            new_owner: "w",
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(retaken.owner_switches_since_checkpoint, 0);
        let pending = LeaseWrite::PrepareCheckpoint {
            seen: &taken,
            pending: Some(&esn),
        }
        .apply(Some(&taken))
        .unwrap();
        assert_eq!(pending.pending_checkpoint.as_ref(), Some(&esn));
        let done = LeaseWrite::Checkpoint {
            seen: &pending,
            checkpoint: &esn,
        }
        .apply(Some(&pending))
        .unwrap();
        assert_eq!(
            (
                &done.checkpoint,
                &done.pending_checkpoint,
                done.owner_switches_since_checkpoint,
                done.lease_counter
            ),
            (&esn, &None, 0, 6)
        );
        let released = LeaseWrite::Release { seen: &done }
            .apply(Some(&done))
            .unwrap();
        assert_eq!((released.lease_owner, released.lease_counter), (None, 7));
        assert_eq!(LeaseWrite::Delete { seen: &done }.apply(Some(&done)), None);
        assert_eq!(
            LeaseWrite::Renew {
                seen: &done,
                throughput_kbps: None
            }
            .apply(None),
            None
        );
        assert_eq!(LeaseWrite::Delete { seen: &done }.lease_key(), "k");
        assert_eq!(
            LeaseWrite::Delete { seen: &done }.operation(),
            "delete_lease"
        );
    }

    #[test]
    fn throughput_and_handoff() {
        let mut mine = owned("w", 3);
        mine.throughput_kbps = Some(2.5);
        mine.checkpoint_owner = Some("old".to_owned());
        let kept = LeaseWrite::Renew {
            seen: &mine,
            throughput_kbps: None,
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(kept.throughput_kbps, Some(2.5));
        assert_eq!(kept.checkpoint_owner.as_deref(), Some("old"));
        let written = LeaseWrite::Renew {
            seen: &mine,
            throughput_kbps: Some(0.75),
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(written.throughput_kbps, Some(0.75));
        assert_eq!(written.lease_counter, 4);
        let taken = LeaseWrite::Take {
            seen: &mine,
            new_owner: "v",
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(taken.checkpoint_owner, None);
        assert_eq!(taken.throughput_kbps, Some(2.5));
        // Other writes leave the handoff marker as it is.
        let done = LeaseWrite::Checkpoint {
            seen: &mine,
            checkpoint: &ExtendedSequenceNumber::SHARD_END,
        }
        .apply(Some(&mine))
        .unwrap();
        assert_eq!(done.checkpoint_owner.as_deref(), Some("old"));
    }

    #[test]
    fn reset_checkpoint() {
        let mut mine = owned("w", 3);
        mine.pending_checkpoint = Some("9".parse().unwrap());
        mine.owner_switches_since_checkpoint = 2;
        let to: ExtendedSequenceNumber = "12".parse().unwrap();
        let write = LeaseWrite::ResetCheckpoint {
            seen: &mine,
            checkpoint: &to,
        };
        assert_eq!(
            write.fence().unwrap(),
            Fence::CounterAndOwner {
                counter: 3,
                owner: Some("w"),
                checkpoint_owner: None
            }
        );
        let reset = write.apply(Some(&mine)).unwrap();
        assert_eq!(
            (
                reset.lease_owner.as_deref(),
                &reset.checkpoint,
                &reset.pending_checkpoint,
                reset.owner_switches_since_checkpoint,
                reset.lease_counter
            ),
            (None, &to, &None, 0, 4)
        );
        // A free lease is reset too (the fence names "no owner").
        let free = Lease::new("k", ExtendedSequenceNumber::TRIM_HORIZON);
        let write = LeaseWrite::ResetCheckpoint {
            seen: &free,
            checkpoint: &to,
        };
        assert_eq!(
            write.fence().unwrap(),
            Fence::CounterAndOwner {
                counter: 0,
                owner: None,
                checkpoint_owner: None
            }
        );
        assert_eq!(write.operation(), "reset_checkpoint");
        assert_eq!(write.apply(Some(&free)).unwrap().lease_owner, None);
    }

    #[test]
    fn the_handoff_writes() {
        let mine = owned("old", 3);
        let initiate = LeaseWrite::InitiateHandoff {
            seen: &mine,
            next_owner: "new",
        };
        assert_eq!(
            initiate.fence().unwrap(),
            Fence::Owners {
                owner: "old",
                checkpoint_owner: None
            }
        );
        assert_eq!(initiate.operation(), "initiate_handoff");
        // Whatever the counter: the current owner renews all the time.
        let mut renewed = owned("old", 9);
        assert!(initiate.fence().unwrap().holds(Some(&renewed)));
        let pending = initiate.apply(Some(&renewed)).unwrap();
        assert_eq!(
            (
                pending.lease_owner.as_deref(),
                pending.checkpoint_owner.as_deref(),
                pending.lease_counter
            ),
            (Some("new"), Some("old"), 9)
        );
        assert_eq!(actual_owner(&pending), Some("old"));
        // A second initiation, or an old owner's plain renewal, no longer holds.
        assert!(!initiate.fence().unwrap().holds(Some(&pending)));
        let plain_renewal = LeaseWrite::Renew {
            seen: &renewed,
            throughput_kbps: None,
        };
        assert!(!plain_renewal.fence().unwrap().holds(Some(&pending)));
        // The current owner renews and checkpoints on the row in the handoff.
        let renewal = LeaseWrite::Renew {
            seen: &pending,
            throughput_kbps: None,
        };
        assert!(renewal.fence().unwrap().holds(Some(&pending)));
        let pending = renewal.apply(Some(&pending)).unwrap();
        assert_eq!(pending.checkpoint_owner.as_deref(), Some("old"));
        let complete = LeaseWrite::CompleteHandoff { seen: &pending };
        assert_eq!(
            complete.fence().unwrap(),
            Fence::Owners {
                owner: "new",
                checkpoint_owner: Some("old")
            }
        );
        let done = complete.apply(Some(&pending)).unwrap();
        assert_eq!(
            (
                done.lease_owner.as_deref(),
                done.checkpoint_owner.as_deref(),
                done.lease_counter,
                done.owner_switches_since_checkpoint
            ),
            (Some("new"), None, 11, 1)
        );
        assert!(!complete.fence().unwrap().holds(Some(&done)));
        // Completing a lease seen outside a handoff, or initiating one of a free lease:
        // not held.
        assert!(matches!(
            LeaseWrite::CompleteHandoff { seen: &done }.fence(),
            Err(LeaseError::NotHeld { .. })
        ));
        renewed.lease_owner = None;
        assert!(matches!(
            LeaseWrite::InitiateHandoff {
                seen: &renewed,
                next_owner: "x"
            }
            .fence(),
            Err(LeaseError::NotHeld { .. })
        ));
        // A take of a lease in a handoff fences on both owners and ends it; the switch
        // counts when the actual owner changes.
        let taken = LeaseWrite::Take {
            seen: &pending,
            new_owner: "new",
        };
        assert!(taken.fence().unwrap().holds(Some(&pending)));
        assert!(!taken.fence().unwrap().holds(Some(&done)));
        let row = taken.apply(Some(&pending)).unwrap();
        assert_eq!(row.checkpoint_owner, None);
        assert_eq!(row.owner_switches_since_checkpoint, 1);
    }
}
