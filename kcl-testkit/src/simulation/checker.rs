//! The invariant checks of a simulation run: a replay of the journal.
//!
//! # The bounded overlap after a loss
//!
//! A processor whose lease another worker took without a graceful handoff (after a loss:
//! its worker's renewals failed or hung for `failover_time`, it was cut off, or a handoff
//! from it was forced: completed by the next owner after `handoff_timeout`, or taken after
//! the lease expired) runs on until its worker notices and shuts it down as `Zombie`. Two
//! processors of one shard at once are allowed in that window only, and the window is
//! bounded ([`OverlapLimit`], from the run's failover time `F`, call timeout `C` and
//! shutdown grace `G`; counted from the new owner's `initialize`):
//!
//! * **deliveries** stop within `5F/3 + 2C + 1 s`. The old worker learns of the loss by a
//!   renewal: its renewals run every `F/3`, each bounded by the shorter of `F/3` and `C`
//!   (and never past `F` since the lease's last successful write). A lease whose renewals
//!   fail is dropped at the first round at least `5F/6` after its last write, so at the
//!   latest `4F/3` after it, while no other worker takes it before `F` after it; a lease
//!   taken or handed over while its renewals succeed fails the condition of the next
//!   renewal not skipped (at most `2F/3` later, plus a round's bound). So at most `4F/3`
//!   after the take, or after a forced completion (whose owner's last write came before
//!   it). Its worker loop may then be awaiting a lease release (the write lock, at most a
//!   renewal's `F/3`, the write and its re-read, `2C`) before it reads the loss event and
//!   tells the consumer, which starts no batch after that (a batch in progress was
//!   journaled when it started); one second of slack for the scheduling of tasks.
//! * **the processor stops** (returns from `shutdown`, is dropped, or its worker crashes)
//!   within that plus the batch in progress and the shutdown: `1.5 s` (the slowest
//!   processor of the fault schedule), one checkpoint (`F/3` for the lease's write lock,
//!   `C` for the sequence number's validation with Kinesis, `4C` for the write and its
//!   re-read, twice when a handoff began meanwhile), the shutdown grace `G` (the worker
//!   abandons a longer `shutdown`) and a second of slack: `2F + 7C + G + 3.5 s` in all.
//!
//! After a graceful handoff (completed by the handing-over owner) there is no overlap at
//! all: the owner completes it only after its processor returned from `shutdown`, so the
//! next owner's processor never finds it running.

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
    /// It runs no more: it returned from `shutdown`, was dropped, or its worker crashed.
    pub(super) stopped: bool,
    /// Since when another worker's processor of the shard runs beside it, and whose (set
    /// once it lost the lease and another worker's processor started; the first such).
    pub(super) overlap_since: Option<(tokio::time::Instant, String)>,
    /// Its overlap already broke the bound (one report per processor).
    pub(super) overlap_reported: bool,
}

/// The bounds of the overlap after a loss (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OverlapLimit {
    /// A processor that lost its lease delivers no batch later than this after another
    /// worker's processor of the shard started.
    pub(super) deliver: Duration,
    /// It stops (returns from `shutdown`, is dropped, or its worker crashes) within this
    /// after that.
    pub(super) stop: Duration,
}

impl OverlapLimit {
    /// The bounds for failover time `failover`, call timeout `call` and shutdown grace
    /// `grace` (see the [module docs](self)).
    pub(super) fn new(failover: Duration, call: Duration, grace: Duration) -> Self {
        let slack = Duration::from_secs(1);
        let deliver = failover * 5 / 3 + call * 2 + slack;
        let batch = Duration::from_millis(SLOWEST_BATCH_MS) + failover / 3 + call * 5;
        Self {
            deliver,
            stop: deliver + batch + grace + slack,
        }
    }
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
    /// The virtual time of the entry being applied (`None` for entries applied without one,
    /// as in unit tests: the bounds of the overlap are then not checked).
    pub(super) now: Option<tokio::time::Instant>,
    /// The bounds of the overlap after a loss (`None`: not checked, only measured).
    pub(super) overlap_limit: Option<OverlapLimit>,
    /// The longest time a processor that lost its lease ran on after another worker's
    /// processor of the shard started (until it stopped).
    pub(super) max_loss_overlap: Duration,
    /// The latest delivery by such a processor, after the other one started.
    pub(super) max_loss_delivery: Duration,
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

    /// Applies `entry`, written at virtual time `at`.
    pub(super) fn apply_at(
        &mut self,
        at: tokio::time::Instant,
        entry: Entry,
        parents: &HashMap<String, Vec<String>>,
    ) {
        self.now = Some(at);
        self.apply(entry, parents);
    }

    pub(super) fn apply(&mut self, entry: Entry, parents: &HashMap<String, Vec<String>>) {
        if std::env::var_os("KCL_SIM_TRACE").is_some() {
            match &entry {
                Entry::Delivered { .. } => {}
                other => eprintln!("journal {:?}: {other:?}", self.now),
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
            Entry::ShutdownReturned { instance } => {
                self.stop(instance, "returned from shutdown");
            }
            Entry::Crashed { worker } => {
                let running: Vec<u64> = self
                    .instances
                    .iter()
                    .filter(|(_, i)| i.worker == worker && !i.stopped)
                    .map(|(instance, _)| *instance)
                    .collect();
                for instance in running {
                    self.stop(instance, "stopped by its worker's crash");
                }
                self.crashed.insert(worker);
            }
            Entry::Dropped { instance } => {
                self.stop(instance, "was dropped");
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
                // A take of a lease in a handoff ends the handoff: it expired (2.x, after
                // `failover_time + handoff_timeout`) or the 3.x leader assigned it directly
                // after `handoff_timeout`.
                let in_flight = self.handoff_to.remove(&key).is_some();
                self.moved(&key, &owner, None, in_flight);
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
                self.moved(&key, &owner, Some(by.unwrap_or_default()), true);
                self.owner.insert(key, Some(owner));
            }
            Entry::HandoffInitiated {
                key,
                next_owner,
                by,
                ..
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
    /// completion of a handoff by `completed_by`; `ends_handoff` when a handoff was in
    /// flight.
    fn moved(&mut self, key: &str, owner: &str, completed_by: Option<String>, ends_handoff: bool) {
        let previous = self.owner.get(key).cloned().flatten();
        if previous.as_deref() == Some(owner) {
            // The next owner taking a lease handed to it: no move.
            return;
        }
        self.handed_over_from.remove(key);
        let graceful = completed_by.is_some() && completed_by == previous;
        if graceful {
            self.graceful_handoffs += 1;
        } else if ends_handoff {
            // Completed by the next owner (after `handoff_timeout`, or its owner's death),
            // or taken: the handing-over processor, if it still runs, lost the lease.
            self.forced_handoffs += 1;
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

    /// The processors of `shard` on workers other than `worker` that still run (they have
    /// not returned from `shutdown`, nor were dropped, nor did their worker crash).
    fn running_elsewhere(&self, worker: &str, shard: &str) -> Vec<u64> {
        self.current
            .iter()
            .filter(|((w, s), _)| w != worker && s == shard && !self.crashed.contains(w))
            .map(|(_, instance)| *instance)
            .filter(|i| !self.dropped.contains(i))
            .filter(|i| self.instances.get(i).is_some_and(|i| !i.stopped))
            .collect()
    }

    /// `instance` stops running (`how`); an overlap after a loss ends, within its bound.
    fn stop(&mut self, instance: u64, how: &str) {
        let now = self.now;
        let limit = self.overlap_limit;
        let Some(i) = self.instances.get_mut(&instance) else {
            return;
        };
        if i.stopped {
            return;
        }
        i.stopped = true;
        let (Some(now), Some((since, other))) = (now, i.overlap_since.clone()) else {
            return;
        };
        let lasted = now.saturating_duration_since(since);
        self.max_loss_overlap = self.max_loss_overlap.max(lasted);
        if let Some(limit) = limit
            && lasted > limit.stop
            && !i.overlap_reported
        {
            i.overlap_reported = true;
            let msg = format!(
                "{}'s processor of {}, whose lease {other} had taken (a loss or a forced handoff), {how} only {lasted:?} after {other}'s processor started (bound {:?})",
                i.worker, i.shard, limit.stop
            );
            self.violation(msg);
        }
    }

    /// At the end of the run (virtual time `end`): every processor stopped, and none that
    /// lost its lease ran on beside another beyond the bound.
    pub(super) fn finish(&mut self, end: tokio::time::Instant) {
        let mut problems = Vec::new();
        let mut keys: Vec<u64> = self.instances.keys().copied().collect();
        keys.sort_unstable();
        for instance in keys {
            let Some(i) = self.instances.get_mut(&instance) else {
                continue;
            };
            if i.stopped || self.crashed.contains(&i.worker) || self.dropped.contains(&instance) {
                continue;
            }
            problems.push(format!(
                "{}'s processor of {} never stopped: it neither returned from shutdown ({:?}) nor was dropped by the end of the run",
                i.worker, i.shard, i.shutdown
            ));
            if let Some((since, other)) = &i.overlap_since {
                let lasted = end.saturating_duration_since(*since);
                self.max_loss_overlap = self.max_loss_overlap.max(lasted);
                if let Some(limit) = self.overlap_limit
                    && lasted > limit.stop
                    && !i.overlap_reported
                {
                    i.overlap_reported = true;
                    problems.push(format!(
                        "{}'s processor of {}, whose lease {other} had taken, still ran {lasted:?} after {other}'s processor started (bound {:?})",
                        i.worker, i.shard, limit.stop
                    ));
                }
            }
        }
        for p in problems {
            self.violation(p);
        }
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
        let mut overlap_since = None;
        let elsewhere = if owns {
            // After a graceful handoff, the handing-over processor returned from `shutdown`
            // before its owner completed the handoff, so before this one starts.
            if let Some(from) = self.handed_over_from.get(&shard)
                && let Some(i) = self.instances.get(from)
                && !i.stopped
                && !self.crashed.contains(&i.worker)
            {
                let msg = format!(
                    "{worker} started processing {shard} after a graceful handoff from {}, whose processor had not returned from shutdown ({:?})",
                    i.worker, i.shutdown
                );
                self.violation(msg);
            }
            self.running_elsewhere(&worker, &shard)
        } else {
            // A processor of a lease already lost runs in that bounded overlap itself,
            // beside the owner's processor if that one runs.
            self.lost.insert(instance);
            if let Some(owner) = &owner
                && let Some(theirs) = self.current.get(&(owner.clone(), shard.clone()))
                && !self.crashed.contains(owner)
                && self.instances.get(theirs).is_some_and(|i| !i.stopped)
            {
                self.overlaps += 1;
                overlap_since = self.now.map(|at| (at, owner.clone()));
            }
            Vec::new()
        };
        for other in &elsewhere {
            if self.lost.contains(other) {
                self.overlaps += 1;
                let now = self.now;
                if let Some(i) = self.instances.get_mut(other)
                    && i.overlap_since.is_none()
                {
                    i.overlap_since = now.map(|at| (at, worker.clone()));
                }
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
                stopped: false,
                overlap_since,
                overlap_reported: false,
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
        if let Some(reason) = me.shutdown {
            problems.push(format!(
                "{worker} delivered {} of {shard} after its processor's shutdown({reason:?}) began",
                String::from_utf8_lossy(&r.data)
            ));
        }
        let mut late_reported = false;
        if let (Some(now), Some((since, other))) = (self.now, me.overlap_since.clone()) {
            let late = now.saturating_duration_since(since);
            self.max_loss_delivery = self.max_loss_delivery.max(late);
            if let Some(limit) = self.overlap_limit
                && late > limit.deliver
                && !me.overlap_reported
            {
                late_reported = true;
                problems.push(format!(
                    "{worker}'s processor of {shard}, whose lease {other} had taken (a loss or a forced handoff), still delivered {} {late:?} after {other}'s processor started (bound {:?})",
                    String::from_utf8_lossy(&r.data),
                    limit.deliver
                ));
            }
        }
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
            me.overlap_reported |= late_reported;
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
