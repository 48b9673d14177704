//! The invariant checks of a simulation run: a replay of the journal.

use std::collections::{HashMap, HashSet};

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
}

impl Checker {
    pub(super) fn violation(&mut self, v: String) {
        // Enough to diagnose; a broken run could otherwise list thousands.
        if self.violations.len() < 50 {
            self.violations.push(v);
        }
    }

    pub(super) fn apply(&mut self, entry: Entry, parents: &HashMap<String, Vec<String>>) {
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
            Entry::Created { key, checkpoint } => {
                if self.deleted.contains(&key) {
                    self.violation(format!(
                        "the lease of {key} was created again after cleanup deleted it"
                    ));
                }
                self.durable.insert(key.clone(), checkpoint);
                self.owner.insert(key, None);
            }
            Entry::Taken { key, owner } => {
                if self.shard_end_written.contains(&key) {
                    self.violation(format!(
                        "{owner} took the lease of {key} after it was finished (SHARD_END)"
                    ));
                }
                self.owner.insert(key, Some(owner));
            }
            Entry::Released { key } => {
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
