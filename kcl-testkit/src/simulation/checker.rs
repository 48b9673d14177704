//! The invariant checks of a simulation run: a replay of the journal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use bytes::Bytes;
use kcl_interfaces::ShutdownReason;
use kcl_kpl::ExtendedSequenceNumber;

use super::driver::*;
use super::journal::*;

#[derive(Debug)]
pub(super) struct Instance {
    pub(super) worker: String,
    pub(super) shard: String,
    pub(super) start: ExtendedSequenceNumber,
    pub(super) last_delivered: Option<ExtendedSequenceNumber>,
    pub(super) shutdown: Option<ShutdownReason>,
    /// The largest checkpoint this processor's worker wrote for the shard while this
    /// processor ran.
    pub(super) checkpointed: Option<ExtendedSequenceNumber>,
}

/// Replays the journal and collects violations.
#[derive(Debug, Default)]
pub(super) struct Checker {
    pub(super) violations: Vec<String>,
    pub(super) instances: HashMap<u64, Instance>,
    /// (worker, shard) -> the latest processor instance.
    pub(super) current: HashMap<(String, String), u64>,
    /// Lease key -> its checkpoint in the store.
    pub(super) durable: HashMap<String, ExtendedSequenceNumber>,
    pub(super) owner: HashMap<String, Option<String>>,
    pub(super) shard_end_written: HashSet<String>,
    pub(super) deleted: HashSet<String>,
    /// Payload -> (instance, position) of its latest delivery.
    pub(super) last_deliverer: HashMap<Bytes, u64>,
    /// Partition key -> the counter its next first delivery must carry.
    pub(super) next_first: HashMap<String, usize>,
    /// Keys already reported out of order (one report per key).
    pub(super) misordered: HashSet<String>,
    pub(super) deliveries: usize,
    pub(super) redeliveries: usize,
    pub(super) zombie_redeliveries: usize,
    pub(super) zombie_inits: usize,
    pub(super) checkpoints: usize,
    /// Lease key -> the next owner of a graceful handoff in flight.
    pub(super) handoff_to: HashMap<String, String>,
    /// Lease key -> the processor instance that handed the lease over, while the last move
    /// of the lease was a graceful handoff (its processor had stopped when it completed).
    pub(super) handed_over_from: HashMap<String, u64>,
    /// Handoffs completed after the handing-over processor stopped.
    pub(super) graceful_handoffs: usize,
    /// Handoffs completed while the handing-over processor still ran (the next owner
    /// completed a handoff that timed out, or whose owner had died).
    pub(super) forced_handoffs: usize,
    /// Processors started while another worker's processor of the same shard still ran:
    /// the bounded overlap after a loss (crash, expiry, partition) or a forced handoff.
    pub(super) overlaps: usize,
    /// Records the next owner delivered again after a graceful handoff (only those the
    /// handing-over processor had not checkpointed may be).
    pub(super) handoff_redeliveries: usize,
    /// Workers that crashed: their processors stopped without a shutdown.
    pub(super) crashed: HashSet<String>,
    /// Processor instances whose lease moved to another worker while they ran.
    pub(super) lost: HashSet<u64>,
    /// Processor instances dropped without a shutdown (aborted after a shutdown grace).
    pub(super) dropped: HashSet<u64>,
    /// The 3.x leadership, from the `Leader` entries.
    pub(super) leaders: LeaderCheck,
    /// Takes of a lease for another worker, and handoffs initiated by a worker that is not
    /// the next owner: the 3.x leader's assignments.
    pub(super) assignments: usize,
    /// Of those, written while the writer did not count itself leader (a deposed leader's
    /// assignment run finishing: fenced by the lease's conditions, so churn, not harm).
    pub(super) stale_assignments: usize,
}

/// At most one worker counts itself the 3.x leader at a time, beyond a bounded overlap:
/// the lock's lease duration (a holder counts itself leader until its last write is that
/// old; a contender takes over only after the same record version number stood that
/// long, so in principle no overlap at all).
#[derive(Debug, Default)]
pub(super) struct LeaderCheck {
    /// The longest overlap allowed (the lock's lease duration).
    pub(super) limit: Duration,
    /// Workers counting themselves leader now, since when.
    pub(super) leading: BTreeMap<String, tokio::time::Instant>,
    /// The worker that became leader last.
    pub(super) last: Option<String>,
    /// Times a worker became leader.
    pub(super) elections: usize,
    /// Of those, times it was another worker than the previous leader.
    pub(super) changes: usize,
    /// Since when two or more count themselves leader.
    pub(super) overlap_since: Option<tokio::time::Instant>,
    /// Overlaps that lasted any time.
    pub(super) overlaps: usize,
    /// The longest overlap.
    pub(super) max_overlap: Duration,
}

impl LeaderCheck {
    /// `worker` starts (`leading`) or stops counting itself leader at `at`; returns a
    /// violation when an overlap ended that lasted longer than the limit.
    pub(super) fn apply(
        &mut self,
        worker: String,
        leading: bool,
        at: tokio::time::Instant,
    ) -> Option<String> {
        if leading {
            if self.leading.contains_key(&worker) {
                return None;
            }
            self.elections += 1;
            if self.last.as_ref().is_some_and(|l| *l != worker) {
                self.changes += 1;
            }
            self.last = Some(worker.clone());
            self.leading.insert(worker, at);
            if self.leading.len() > 1 && self.overlap_since.is_none() {
                self.overlap_since = Some(at);
            }
            return None;
        }
        self.leading.remove(&worker)?;
        if self.leading.len() > 1 {
            return None;
        }
        let since = self.overlap_since.take()?;
        let lasted = at.saturating_duration_since(since);
        if lasted.is_zero() {
            return None;
        }
        self.overlaps += 1;
        self.max_overlap = self.max_overlap.max(lasted);
        (lasted > self.limit).then(|| {
            format!(
                "two workers counted themselves 3.x leader at once for {lasted:?} (longer than the lock's lease duration {:?}); {worker} was one of them",
                self.limit
            )
        })
    }

    /// Whether `worker` counts itself leader now.
    pub(super) fn is_leading(&self, worker: &str) -> bool {
        self.leading.contains_key(worker)
    }
}

impl Checker {
    pub(super) fn violation(&mut self, v: String) {
        // Enough to diagnose; a broken run could otherwise list thousands.
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }

    pub(super) fn apply(&mut self, entry: Entry, parents: &HashMap<String, Vec<String>>) {
        if std::env::var_os("KCL_SIM_TRACE").is_some() {
            match &entry {
                Entry::Delivered { .. } => {}
                other => eprintln!("journal: {other:?}"),
            }
        }
        match entry {
            Entry::Init {
                instance,
                worker,
                shard,
                checkpoint,
            } => self.init(instance, worker, shard, checkpoint, parents),
            Entry::Delivered { instance, records } => {
                for r in records {
                    self.delivered(instance, r);
                }
            }
            Entry::Shutdown { instance, reason } => {
                let Some(i) = self.instances.get_mut(&instance) else {
                    self.violation(format!(
                        "shutdown({reason:?}) of a processor never initialized"
                    ));
                    return;
                };
                let previous = i.shutdown.replace(reason);
                // shutdown(Terminate) is called again, after a back-off, while SHARD_END has
                // not been checkpointed (the Terminate rule of the processor lifecycle).
                let terminate_retry = previous == Some(ShutdownReason::Terminate)
                    && reason == ShutdownReason::Terminate
                    && !i
                        .checkpointed
                        .as_ref()
                        .is_some_and(ExtendedSequenceNumber::is_shard_end);
                if let (Some(previous), false) = (previous, terminate_retry) {
                    let msg = format!(
                        "{}'s processor of {} was shut down twice: {previous:?} then {reason:?}",
                        i.worker, i.shard
                    );
                    self.violation(msg);
                }
            }
            Entry::Created {
                key,
                checkpoint,
                by,
            } => {
                if self.deleted.contains(&key) {
                    self.violation(format!(
                        "the lease of {key} was created again after cleanup deleted it (by {})",
                        by.as_deref().unwrap_or("?")
                    ));
                }
                self.durable.insert(key.clone(), checkpoint);
                self.owner.insert(key, None);
            }
            Entry::Crashed { worker } => {
                self.crashed.insert(worker);
            }
            Entry::Dropped { instance } => {
                self.dropped.insert(instance);
            }
            Entry::Leader {
                worker,
                leading,
                at,
            } => {
                if let Some(v) = self.leaders.apply(worker, leading, at) {
                    self.violation(v);
                }
            }
            Entry::Taken { key, owner, by } => {
                self.assignment(by.as_deref(), &owner);
                if self.shard_end_written.contains(&key) {
                    self.violation(format!(
                        "{owner} took the lease of {key} after it was finished (SHARD_END)"
                    ));
                }
                self.handoff_to.remove(&key);
                self.moved(&key, &owner, None);
                self.owner.insert(key, Some(owner));
            }
            Entry::HandoffCompleted { key, owner, by } => {
                // On a lease whose shard ended during the handoff (the handing-over
                // processor wrote SHARD_END) this is no take for processing: finished
                // leases are never taken.
                if self.handoff_to.remove(&key).as_deref() != Some(owner.as_str()) {
                    self.violation(format!(
                        "a handoff of {key} to {owner} completed that was never initiated"
                    ));
                }
                self.moved(&key, &owner, Some(by.unwrap_or_default()));
                self.owner.insert(key, Some(owner));
            }
            Entry::HandoffInitiated {
                key,
                next_owner,
                by,
            } => {
                self.assignment(by.as_deref(), &next_owner);
                // The lease stays its current owner's until the handoff completes.
                self.handoff_to.insert(key, next_owner);
            }
            Entry::Released { key } => {
                self.handoff_to.remove(&key);
                self.handed_over_from.remove(&key);
                self.owner.insert(key, None);
            }
            Entry::Deleted { key } => {
                if !self.shard_end_written.contains(&key) {
                    self.violation(format!(
                        "the lease of {key} was deleted before SHARD_END was checkpointed"
                    ));
                }
                self.deleted.insert(key);
            }
            Entry::Checkpointed {
                key,
                writer,
                checkpoint,
            } => self.checkpointed(key, writer, checkpoint),
        }
    }

    /// A lease written to `to` by `by`: a leader's assignment when `by` is another worker
    /// (or `by` counts itself leader).
    fn assignment(&mut self, by: Option<&str>, to: &str) {
        let Some(by) = by else {
            return;
        };
        let leading = self.leaders.is_leading(by);
        if by != to || leading {
            self.assignments += 1;
            if !leading {
                self.stale_assignments += 1;
            }
        }
    }

    /// The lease `key` is written to `owner`: by a take (`completed_by` none), or by the
    /// completion of a handoff by `completed_by`.
    fn moved(&mut self, key: &str, owner: &str, completed_by: Option<String>) {
        let previous = self.owner.get(key).cloned().flatten();
        if previous.as_deref() == Some(owner) {
            // The next owner taking a lease handed to it: no move.
            return;
        }
        self.handed_over_from.remove(key);
        let graceful = completed_by.is_some() && completed_by == previous;
        if completed_by.is_some() {
            if graceful {
                self.graceful_handoffs += 1;
            } else {
                self.forced_handoffs += 1;
            }
        }
        // Every processor of the shard still running on another worker than the new owner
        // has lost the lease now: it may run on (the bounded overlap) until told Zombie.
        // Not after a graceful handoff: its current owner completes it only once its
        // processor stopped.
        for instance in self.running_elsewhere(owner, key) {
            let worker = self
                .instances
                .get(&instance)
                .map(|i| i.worker.clone())
                .unwrap_or_default();
            if graceful && previous.as_deref() == Some(worker.as_str()) {
                self.violation(format!(
                    "{worker} completed the handoff of {key} to {owner} while its processor still ran"
                ));
            }
            self.lost.insert(instance);
        }
        if graceful
            && let Some(previous) = previous
            && let Some(instance) = self.current.get(&(previous, key.to_owned())).copied()
        {
            self.handed_over_from.insert(key.to_owned(), instance);
        }
    }

    /// The processors of `shard` on workers other than `worker` that have not been shut down.
    fn running_elsewhere(&self, worker: &str, shard: &str) -> Vec<u64> {
        self.current
            .iter()
            .filter(|((w, s), _)| w != worker && s == shard && !self.crashed.contains(w))
            .map(|(_, instance)| *instance)
            .filter(|i| !self.dropped.contains(i))
            .filter(|i| self.instances.get(i).is_some_and(|i| i.shutdown.is_none()))
            .collect()
    }

    pub(super) fn init(
        &mut self,
        instance: u64,
        worker: String,
        shard: String,
        checkpoint: ExtendedSequenceNumber,
        parents: &HashMap<String, Vec<String>>,
    ) {
        for p in parents.get(&shard).into_iter().flatten() {
            if !self.shard_end_written.contains(p) {
                self.violation(format!(
                    "{worker} initialized child {shard} before its parent {p} checkpointed SHARD_END"
                ));
            }
        }
        let owner = self.owner.get(&shard).cloned().flatten();
        let owns = owner.as_deref() == Some(worker.as_str());
        if owns {
            match self.durable.get(&shard) {
                Some(d) if *d != checkpoint => {
                    let d = d.clone();
                    self.violation(format!(
                        "{worker} initialized {shard} at checkpoint {checkpoint} but the lease's checkpoint was {d}"
                    ));
                }
                Some(_) => {}
                None => self.violation(format!("{worker} initialized {shard}, which has no lease")),
            }
        } else {
            // The lease moved on between the take and `initialize` (the zombie window): this
            // processor can only be told Zombie, and its checkpoints are fenced.
            self.zombie_inits += 1;
        }
        // Two processors of one shard at once: only in the bounded overlap after a loss (a
        // crash, an expiry, a partition) or a forced handoff, while the processor that lost
        // the lease runs on until it is told; never after a graceful handoff.
        let elsewhere = if owns {
            self.running_elsewhere(&worker, &shard)
        } else {
            // A processor of a lease already lost runs in that bounded overlap itself.
            self.lost.insert(instance);
            Vec::new()
        };
        for other in &elsewhere {
            if self.lost.contains(other) {
                self.overlaps += 1;
            } else {
                let other_worker = self
                    .instances
                    .get(other)
                    .map(|i| i.worker.clone())
                    .unwrap_or_default();
                self.violation(format!(
                    "{worker} started processing {shard} while {other_worker}'s processor, which never lost the lease, still processed it"
                ));
            }
        }
        self.current
            .insert((worker.clone(), shard.clone()), instance);
        self.instances.insert(
            instance,
            Instance {
                worker,
                shard,
                start: checkpoint,
                last_delivered: None,
                shutdown: None,
                checkpointed: None,
            },
        );
    }

    pub(super) fn delivered(&mut self, instance: u64, r: Delivery) {
        self.deliveries += 1;
        let Some(me) = self.instances.get(&instance) else {
            self.violation(format!(
                "records delivered to a processor that was never initialized: {:?}",
                r.data
            ));
            return;
        };
        let (worker, shard) = (me.worker.clone(), me.shard.clone());
        let mut problems = Vec::new();
        if me.start.sequence_number().is_some() && r.esn <= me.start {
            problems.push(format!(
                "{worker} delivered {} of {shard} at {}, at or below the checkpoint {} it started from",
                String::from_utf8_lossy(&r.data),
                r.esn,
                me.start
            ));
        }
        if let Some(last) = &me.last_delivered
            && r.esn <= *last
        {
            problems.push(format!(
                "{worker} delivered {} of {shard} at {} after {last}: not in increasing order",
                String::from_utf8_lossy(&r.data),
                r.esn
            ));
        }
        let is_owner =
            self.owner.get(&shard).cloned().flatten().as_deref() == Some(worker.as_str());
        match self.last_deliverer.get(&r.data).copied() {
            Some(previous) => {
                self.redeliveries += 1;
                // A completed handoff delivers nothing twice: the next owner starts from
                // the checkpoint the handing-over processor wrote when it stopped.
                if is_owner && self.handed_over_from.get(&shard) == Some(&previous) {
                    self.handoff_redeliveries += 1;
                    if let Some(prev) = self.instances.get(&previous)
                        && prev.shutdown == Some(ShutdownReason::Requested)
                        && prev.checkpointed.is_some()
                        && prev.checkpointed >= prev.last_delivered
                    {
                        problems.push(format!(
                            "{worker} delivered {} of {shard} again after a graceful handoff from {}, whose processor had checkpointed all it delivered",
                            String::from_utf8_lossy(&r.data),
                            prev.worker
                        ));
                    }
                }
                if !is_owner {
                    self.zombie_redeliveries += 1;
                } else if let Some(prev) = self.instances.get(&previous)
                    && previous != instance
                    && let Some(checkpointed) = prev.checkpointed.as_ref().filter(|c| **c >= r.esn)
                {
                    problems.push(format!(
                        "{worker} delivered {} of {shard} again although {}'s processor (which delivered it before, ended by {:?}) had checkpointed {checkpointed}",
                        String::from_utf8_lossy(&r.data),
                        prev.worker,
                        prev.shutdown,
                    ));
                }
            }
            None => match parse_payload(&r.data) {
                Some((key, n)) if key == r.partition_key => {
                    let expected = self.next_first.get(&key).copied().unwrap_or(0);
                    if n != expected && !self.misordered.contains(&key) {
                        self.misordered.insert(key.clone());
                        problems.push(format!(
                            "key {key}: record #{n} was first delivered (by {worker} on {shard}) when #{expected} was next: per-key order broken"
                        ));
                    }
                    self.next_first.insert(key, n.max(expected) + 1);
                }
                _ => problems.push(format!(
                    "{worker} delivered a record that was never produced: key {} data {:?}",
                    r.partition_key, r.data
                )),
            },
        }
        for p in problems {
            self.violation(p);
        }
        self.last_deliverer.insert(r.data, instance);
        if let Some(me) = self.instances.get_mut(&instance) {
            me.last_delivered = Some(r.esn);
        }
    }

    pub(super) fn checkpointed(
        &mut self,
        key: String,
        writer: Option<String>,
        checkpoint: ExtendedSequenceNumber,
    ) {
        self.checkpoints += 1;
        let writer = writer.unwrap_or_default();
        if let Some(d) = self.durable.get(&key).filter(|d| checkpoint < **d) {
            let d = d.clone();
            self.violation(format!(
                "the checkpoint of {key} went backwards: {d} then {checkpoint} (written by {writer})"
            ));
        }
        if self.deleted.contains(&key) {
            self.violation(format!(
                "{writer} checkpointed {key} after its lease was deleted"
            ));
        }
        let owner = self.owner.get(&key).cloned().flatten();
        if owner.as_deref() != Some(writer.as_str()) {
            self.violation(format!(
                "{writer} wrote checkpoint {checkpoint} of {key} while the lease belonged to {owner:?}"
            ));
        }
        if let Some(instance) = self.current.get(&(writer.clone(), key.clone())).copied()
            && let Some(i) = self.instances.get_mut(&instance)
        {
            let zombie = i.shutdown == Some(ShutdownReason::Zombie);
            if i.checkpointed.as_ref().is_none_or(|c| checkpoint > *c) {
                i.checkpointed = Some(checkpoint.clone());
            }
            if zombie {
                self.violation(format!(
                    "{writer}'s checkpoint {checkpoint} of {key} landed after its processor was told Zombie"
                ));
            }
        }
        if checkpoint.is_shard_end() {
            self.shard_end_written.insert(key.clone());
        }
        self.durable.insert(key, checkpoint);
    }
}
