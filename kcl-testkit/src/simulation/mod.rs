//! A seeded multi-worker simulation with invariant checks.
//!
//! [`run_simulation`] runs several [`kcl_worker::Worker`]s in one process over one
//! [`InMemoryKinesis`](crate::kinesis::InMemoryKinesis) and one
//! [`InMemoryLeaseStore`](crate::lease_store::InMemoryLeaseStore), on tokio's clock (paused: virtual
//! time, so simulated minutes take milliseconds). A producer writes plain and KPL-aggregated
//! records under many partition keys, each payload carrying a per-key counter, while a
//! fault schedule derived from the seed crashes workers (no shutdown, no release) and
//! restarts them under new ids, stops workers gracefully and restarts them, splits and
//! merges shards, throttles `GetRecords`, expires iterators, fails or throttles lease store
//! calls, slows processors down, and (with [`SimulationConfig::hangs`], on by default) makes
//! calls hang: a few calls that never complete, and a path on which every call started for
//! a while hangs for good; it also slows processors' `shutdown` down (beyond the shutdown
//! grace at times) and schedules faults right after graceful handoffs begin. One worker in three checkpoints at a random record of
//! each batch (often inside a KPL aggregate) or skips the checkpoint, instead of
//! checkpointing the largest delivered record.
//!
//! The fleet runs the lease protocol of [`SimulationConfig::protocol`] ([`LeaseProtocol`],
//! drawn per seed: 2.x for half the seeds, 3.x for 45 in 100, a migration for one in
//! twenty): in 3.x the lease store has its `<app>-CoordinatorState` and
//! `<app>-WorkerMetricStats` tables, a leader elected with the `Leader` lock item assigns
//! the leases and balances them by graceful handoffs, followers discover theirs; a
//! migration starts a 2.x-compatible fleet, writes `CLIENT_VERSION_3X_WITH_ROLLBACK`
//! mid-run and lets the running workers switch while records flow. With state tables the
//! schedule adds faults of those tables (failed, throttled, lost-answer and hanging calls,
//! a spell in which every call hangs) and partitions: one worker (often the leader) cut off
//! from DynamoDB, its lease and state table calls failing or hanging for good, while it
//! still reads Kinesis. WorkerMetricStats rows carry no CPU metrics (a CPU sample on a
//! virtual clock means nothing), so the leader balances by throughput.
//!
//! After the producer finishes, the faults stop (partitions run their spell out), at least
//! one worker keeps running, and the simulation waits (bounded, in virtual time) until every
//! record was delivered and every closed shard finished (in a migration: every running
//! worker runs 3.x, then a last round of records is delivered too), then until the fleet
//! settled, then shuts everything down gracefully and checks:
//!
//! 1. every produced record was delivered at least once;
//! 2. per partition key, first deliveries come in produced order (across splits and merges);
//! 3. successful checkpoint writes of a lease never go backwards; every checkpoint write is
//!    by the lease's current owner (fencing); no checkpoint lands after its processor was
//!    told `Zombie`;
//! 4. a processor only delivers records after the checkpoint it started from, in increasing
//!    order, and starts from the lease's latest checkpoint; a record delivered again by the
//!    lease's owner was never checkpointed by the processor that delivered it before (so
//!    repeats only follow a crash, a lost lease or a failed checkpoint); nothing is
//!    delivered after the processor's `shutdown` began. Deliveries by a processor whose
//!    lease another worker already took (the zombie window before it notices) are
//!    counted, and bounded as in 6;
//! 5. every closed shard ends at `SHARD_END` (or its lease was deleted after `SHARD_END`),
//!    no lease is taken after it finished, a deleted lease is never recreated, and a child
//!    is initialized only after every parent checkpointed `SHARD_END`;
//! 6. graceful handoffs (a joining worker asks loaded ones for leases, the 3.x leader
//!    balances; the seed draws a short `handoff_timeout` for most runs, and the schedule
//!    crashes, stops or cuts off the workers of a handoff, faults the lease store or slows
//!    processors' `shutdown` down right after a handoff began): a lease is never processed
//!    by two processors at once beyond the bounded overlap after a loss or a forced
//!    handoff (one ended by another worker than the handing-over one: completed by the
//!    next owner after `handoff_timeout` or its owner's death, or the lease taken). The
//!    bound is the time the worker needs to notice the loss and stop the processor (see
//!    the checker's docs: deliveries stop within `5F/3 + 2C + 1 s` of the new owner's
//!    `initialize`, the processor returns from `shutdown` within `2F + 7C + G + 3.5 s`, for
//!    failover time `F`, call timeout `C`, shutdown grace `G`); every processor stops by
//!    the end of the run. A graceful handoff is completed only after the handing-over
//!    processor returned from `shutdown`, and the next owner's processor starts after
//!    that (no overlap at all); a completed handoff delivers nothing twice (the next owner
//!    delivers again no record the handing-over processor had checkpointed when it
//!    stopped). Checkpoints during a handoff are by its current owner (`checkpointOwner`).
//! 7. at most one worker counts itself the 3.x leader at a time, beyond an overlap bounded
//!    by the lock's lease duration (none is expected: a holder counts itself leader until
//!    its last lock write is that old, a contender takes over only after the same record
//!    version stood that long); overlaps, leader changes and assignments written by a
//!    deposed leader are counted;
//! 8. after the faults stopped and every record came, within six failover times (and ten
//!    seconds) plus the handoff timeout (a handoff whose handing-over worker lost the lease
//!    as it began stands until it times out: in 3.x the leader assigns the lease directly
//!    `handoff_timeout + failover_time` after it first saw the handoff): every unfinished
//!    lease is held by a running worker that owns it, no handoff is in flight, and (3.x)
//!    exactly one running worker counts itself leader.
//!
//! The checks read a journal written by a processor wrapper (around
//! [`crate::recording::RecordingProcessor`], whose [`EventLog`](crate::recording::EventLog) is kept too) and by a
//! [`LeaseStore`](kcl_lease::LeaseStore) decorator that logs every successful write, in one total order.
//!
//! Replaying a seed repeats its inputs (records, fault schedule, timings, worker random
//! sources) exactly; the interleaving of tasks can still differ slightly between runs
//! because tokio's `select!` and hash maps are randomized. A failing seed names the command
//! that replays it:
//!
//! ```text
//! KCL_SEED=<seed> cargo test -p kcl-testkit --test simulation replay
//! ```
//!
//! (with `KCL_SIM_V3=0|1|migrate` when the run chose the protocol by hand).
//!
//! ```no_run
//! let report = kcl_testkit::simulation::run_seed(7).map_err(|f| f.to_string()).unwrap();
//! assert!(report.records_produced > 0);
//! assert!(report.violations.is_empty());
//! ```

mod checker;
mod config;
mod driver;
mod journal;

pub use config::{LeaseProtocol, SimulationConfig};

use std::fmt;
use std::time::Duration;

use driver::*;

/// What a run did and found.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SimulationReport {
    /// The seed.
    pub seed: u64,
    /// User records produced.
    pub records_produced: usize,
    /// How many of them went in KPL aggregates.
    pub aggregated_records: usize,
    /// User records delivered, counting repeats.
    pub deliveries: usize,
    /// Deliveries of a record that had been delivered before.
    pub redeliveries: usize,
    /// Of those, deliveries by a processor whose lease another worker had already taken.
    pub zombie_redeliveries: usize,
    /// Processors initialized after their lease had already moved to another worker.
    pub zombie_inits: usize,
    /// Graceful handoffs completed after the handing-over processor stopped.
    pub graceful_handoffs: usize,
    /// Handoffs ended by another worker than the handing-over one: completed by the next
    /// owner (it took longer than `handoff_timeout`, or the handing-over worker had died),
    /// or the lease taken (expired, or assigned directly by the 3.x leader after
    /// `handoff_timeout`).
    pub forced_handoffs: usize,
    /// Processors started while another worker's processor of the shard still ran (after
    /// a loss or a forced handoff; never after a graceful handoff).
    pub overlaps: usize,
    /// The workers' `handoff_timeout` ([`SimulationConfig::handoff_timeout`]).
    pub handoff_timeout: Duration,
    /// Faults scheduled right after a graceful handoff began.
    pub handoff_faults: usize,
    /// The bound on deliveries by a processor that lost its lease (a loss or a forced
    /// handoff), counted from the start of the new owner's processor.
    pub loss_delivery_limit: Duration,
    /// The bound on the time such a processor runs on (until it returns from `shutdown`,
    /// is dropped or its worker crashes), counted the same way.
    pub loss_overlap_limit: Duration,
    /// The latest delivery by such a processor, after the new owner's processor started.
    pub max_loss_delivery: Duration,
    /// The longest time such a processor ran on after the new owner's processor started.
    pub max_loss_overlap: Duration,
    /// Records delivered again by the next owner after a graceful handoff (only records
    /// the handing-over processor had not checkpointed).
    pub handoff_redeliveries: usize,
    /// Fault events executed.
    pub faults_injected: usize,
    /// The fault events, as executed, with their virtual time.
    pub fault_log: Vec<String>,
    /// Workers started (restarts included).
    pub workers_started: usize,
    /// Of those, workers reading by enhanced fan-out (the others poll).
    pub fan_out_workers_started: usize,
    /// `SubscribeToShard` subscriptions the in-memory Kinesis opened.
    pub subscriptions_opened: u64,
    /// Processors created.
    pub processors: usize,
    /// Successful checkpoint writes.
    pub checkpoints: usize,
    /// Shards at the end (open and closed).
    pub shards_at_end: usize,
    /// Virtual time the run took.
    pub virtual_time: Duration,
    /// The lease protocol of the fleet.
    pub protocol: LeaseProtocol,
    /// The workers' failover time.
    pub failover_time: Duration,
    /// From the faults' end to every record delivered (virtual time).
    pub drain_time: Duration,
    /// After that (and the partitions' end), until every unfinished lease was held by a
    /// running worker with no handoff in flight and (3.x) one leader (virtual time).
    pub settle_time: Duration,
    /// Workers started that ran a 3.x version (`CLIENT_VERSION_3X_WITH_ROLLBACK` or
    /// `CLIENT_VERSION_3X`) from their start.
    pub v3_workers_started: usize,
    /// Client version changes running workers followed (a migration's live switches).
    pub version_switches: u64,
    /// When the driver wrote `CLIENT_VERSION_3X_WITH_ROLLBACK` (migration runs).
    pub migrated_at: Option<Duration>,
    /// Times a worker became the 3.x leader.
    pub leader_elections: usize,
    /// Of those, times leadership passed to another worker.
    pub leader_changes: usize,
    /// Times two workers counted themselves leader at once (for any time).
    pub leader_overlaps: usize,
    /// The longest such overlap.
    pub max_leader_overlap: Duration,
    /// Lease writes of the 3.x leader for other workers (takes and handoffs initiated).
    pub leader_assignments: usize,
    /// Of those, written by a worker that no longer counted itself leader.
    pub stale_leader_assignments: usize,
    /// Graceful handoffs the 3.x leaders initiated (their own count).
    pub leader_handoffs: u64,
    /// Assignment writes of the 3.x leaders whose condition failed (their own count).
    pub assignment_conflicts: u64,
    /// Every invariant violation found (empty when the run passed).
    pub violations: Vec<String>,
}

impl SimulationReport {
    /// `Ok(self)` when no invariant was violated, else the failure naming the seed.
    pub fn into_result(self) -> Result<Self, SimulationFailure> {
        if self.violations.is_empty() {
            Ok(self)
        } else {
            Err(SimulationFailure {
                seed: self.seed,
                violations: self.violations,
                fault_log: self.fault_log,
                protocol: self.protocol,
            })
        }
    }
}

/// A run that violated invariants. `Display` names the seed and how to replay it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulationFailure {
    /// The seed.
    pub seed: u64,
    /// What went wrong.
    pub violations: Vec<String>,
    /// The fault events of the run, as executed (not part of `Display`).
    pub fault_log: Vec<String>,
    /// The lease protocol of the fleet (the replay command names it when it is not the
    /// seed's own draw).
    pub protocol: LeaseProtocol,
}

impl fmt::Display for SimulationFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let env = if SimulationConfig::new(self.seed).protocol == self.protocol {
            ""
        } else {
            match self.protocol {
                LeaseProtocol::V2x => "KCL_SIM_V3=0 ",
                LeaseProtocol::V3x => "KCL_SIM_V3=1 ",
                LeaseProtocol::Migration => "KCL_SIM_V3=migrate ",
            }
        };
        write!(
            f,
            "simulation seed {} ({:?}) failed with {} violation(s) (replay: {env}KCL_SEED={} cargo test -p kcl-testkit --test simulation replay)",
            self.seed,
            self.protocol,
            self.violations.len(),
            self.seed
        )?;
        for v in &self.violations {
            write!(f, "\n  - {v}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimulationFailure {}

/// Runs the simulation for `seed` with [`SimulationConfig::new`] on a fresh current-thread
/// tokio runtime with paused time.
pub fn run_seed(seed: u64) -> Result<SimulationReport, SimulationFailure> {
    run_config(SimulationConfig::new(seed))
}

/// Runs the simulation for `config` on a fresh current-thread tokio runtime with paused
/// time.
pub fn run_config(config: SimulationConfig) -> Result<SimulationReport, SimulationFailure> {
    let seed = config.seed;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| SimulationFailure {
            seed,
            violations: vec![format!("building the tokio runtime failed: {e}")],
            fault_log: Vec::new(),
            protocol: config.protocol,
        })?;
    runtime.block_on(run_simulation(config)).into_result()
}

/// Runs one simulation. Call it inside a current-thread tokio runtime with paused time
/// (as [`run_seed`] does); on a running clock it works but takes real minutes.
pub async fn run_simulation(config: SimulationConfig) -> SimulationReport {
    let mut sim = Simulation::new(config);
    let mut report = SimulationReport {
        seed: sim.config.seed,
        ..SimulationReport::default()
    };
    let started = tokio::time::Instant::now();
    if let Err(e) = sim.run(&mut report).await {
        report.violations.push(e);
    }
    // Whatever happened, stop every worker still running.
    sim.stop_all(&mut report).await;
    sim.check(&mut report).await;
    report.virtual_time = started.elapsed();
    report
}

#[cfg(test)]
mod tests {
    use super::checker::*;
    use super::journal::*;
    use super::*;
    use kcl_interfaces::ShutdownReason;
    use kcl_kpl::ExtendedSequenceNumber;
    use std::collections::HashMap;

    fn esn(seq: &str, sub: u64) -> ExtendedSequenceNumber {
        ExtendedSequenceNumber::parse(seq, sub).unwrap()
    }

    fn delivery(seq: &str, key: &str, n: usize) -> Delivery {
        Delivery {
            esn: esn(seq, 0),
            partition_key: key.to_owned(),
            data: payload(key, n),
        }
    }

    fn init(instance: u64, worker: &str, shard: &str, checkpoint: ExtendedSequenceNumber) -> Entry {
        Entry::Init {
            instance,
            worker: worker.to_owned(),
            shard: shard.to_owned(),
            checkpoint,
        }
    }

    fn created(key: &str) -> Entry {
        Entry::Created {
            key: key.to_owned(),
            checkpoint: ExtendedSequenceNumber::TRIM_HORIZON,
            by: Some("w1".to_owned()),
        }
    }

    fn taken(key: &str, owner: &str) -> Entry {
        Entry::Taken {
            key: key.to_owned(),
            owner: owner.to_owned(),
            by: Some(owner.to_owned()),
        }
    }

    fn checkpointed(key: &str, writer: &str, checkpoint: ExtendedSequenceNumber) -> Entry {
        Entry::Checkpointed {
            key: key.to_owned(),
            writer: Some(writer.to_owned()),
            checkpoint,
        }
    }

    fn delivered(instance: u64, records: Vec<Delivery>) -> Entry {
        Entry::Delivered { instance, records }
    }

    /// Runs `entries` (shard `p` is the parent of `c`) and returns the violations.
    fn check(entries: Vec<Entry>) -> Vec<String> {
        let parents: HashMap<String, Vec<String>> = [("c".to_owned(), vec!["p".to_owned()])].into();
        let mut checker = Checker::default();
        for e in entries {
            checker.apply(e, &parents);
        }
        checker.violations
    }

    /// A clean history: take, deliver, checkpoint, crash, take over, redeliver what was not
    /// checkpointed, finish the parent, then the child.
    fn clean() -> Vec<Entry> {
        vec![
            created("p"),
            created("c"),
            taken("p", "w1"),
            init(1, "w1", "p", ExtendedSequenceNumber::TRIM_HORIZON),
            delivered(1, vec![delivery("10", "k", 0), delivery("11", "k", 1)]),
            checkpointed("p", "w1", esn("10", 0)),
            // w1 crashes; w2 takes over from 10 and delivers 11 again.
            taken("p", "w2"),
            init(2, "w2", "p", esn("10", 0)),
            delivered(2, vec![delivery("11", "k", 1), delivery("12", "k", 2)]),
            checkpointed("p", "w2", esn("12", 0)),
            Entry::Shutdown {
                instance: 2,
                reason: ShutdownReason::Terminate,
            },
            checkpointed("p", "w2", ExtendedSequenceNumber::SHARD_END),
            taken("c", "w2"),
            init(3, "w2", "c", ExtendedSequenceNumber::TRIM_HORIZON),
            delivered(3, vec![delivery("20", "k", 3)]),
            Entry::Released {
                key: "p".to_owned(),
            },
            Entry::Deleted {
                key: "p".to_owned(),
            },
        ]
    }

    #[test]
    fn a_clean_history_has_no_violations() {
        assert_eq!(check(clean()), Vec::<String>::new());
    }

    fn expect_violation(entries: Vec<Entry>, needle: &str) {
        let violations = check(entries);
        assert!(
            violations.iter().any(|v| v.contains(needle)),
            "expected a violation containing {needle:?}, got {violations:?}"
        );
    }

    #[test]
    fn per_key_order_is_checked() {
        let mut e = clean();
        e[4] = delivered(1, vec![delivery("10", "k", 1), delivery("11", "k", 0)]);
        expect_violation(e, "per-key order broken");
    }

    #[test]
    fn a_checkpoint_going_backwards_is_caught() {
        let mut e = clean();
        e[9] = checkpointed("p", "w2", esn("9", 0));
        expect_violation(e, "went backwards");
    }

    #[test]
    fn a_checkpoint_by_a_worker_that_lost_the_lease_is_caught() {
        let mut e = clean();
        e.insert(7, checkpointed("p", "w1", esn("11", 0)));
        expect_violation(e, "while the lease belonged to Some(\"w2\")");
    }

    #[test]
    fn a_checkpoint_after_zombie_is_caught() {
        let mut e = clean();
        e.insert(
            6,
            Entry::Shutdown {
                instance: 1,
                reason: ShutdownReason::Zombie,
            },
        );
        e.insert(7, checkpointed("p", "w1", esn("11", 0)));
        expect_violation(e, "after its processor was told Zombie");
    }

    #[test]
    fn a_child_started_before_its_parent_finished_is_caught() {
        let mut e = clean();
        let child = e.drain(12..15).collect::<Vec<_>>();
        for (i, entry) in child.into_iter().enumerate() {
            e.insert(10 + i, entry);
        }
        expect_violation(e, "before its parent p checkpointed SHARD_END");
    }

    /// w1 holds p and delivers 10, 11; w2 asks for it; w1's processor checkpoints 11 and
    /// stops (Requested); w1 completes the handoff; w2 starts from 11.
    fn graceful_handoff() -> Vec<Entry> {
        vec![
            created("p"),
            taken("p", "w1"),
            init(1, "w1", "p", ExtendedSequenceNumber::TRIM_HORIZON),
            delivered(1, vec![delivery("10", "k", 0), delivery("11", "k", 1)]),
            Entry::HandoffInitiated {
                key: "p".to_owned(),
                from: Some("w1".to_owned()),
                next_owner: "w2".to_owned(),
                by: Some("w2".to_owned()),
            },
            // Still w1's: its last checkpoint during the handoff is fenced on it.
            checkpointed("p", "w1", esn("11", 0)),
            Entry::Shutdown {
                instance: 1,
                reason: ShutdownReason::Requested,
            },
            Entry::ShutdownReturned { instance: 1 },
            completed("p", "w2", "w1"),
            // The next owner's take of the lease handed to it.
            taken("p", "w2"),
            init(2, "w2", "p", esn("11", 0)),
            delivered(2, vec![delivery("12", "k", 2)]),
        ]
    }

    fn completed(key: &str, owner: &str, by: &str) -> Entry {
        Entry::HandoffCompleted {
            key: key.to_owned(),
            owner: owner.to_owned(),
            by: Some(by.to_owned()),
        }
    }

    fn checker_after(entries: Vec<Entry>) -> Checker {
        let parents = HashMap::new();
        let mut checker = Checker::default();
        for e in entries {
            checker.apply(e, &parents);
        }
        checker
    }

    #[test]
    fn a_graceful_handoff_has_no_violations() {
        let checker = checker_after(graceful_handoff());
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(
            (
                checker.graceful_handoffs,
                checker.forced_handoffs,
                checker.overlaps
            ),
            (1, 0, 0)
        );
    }

    #[test]
    fn a_checkpoint_by_the_next_owner_before_the_handoff_completed_is_caught() {
        let mut e = graceful_handoff();
        e[5] = checkpointed("p", "w2", esn("11", 0));
        expect_violation(e, "while the lease belonged to Some(\"w1\")");
    }

    #[test]
    fn a_handoff_completed_while_its_processor_still_ran_is_caught() {
        // Its shutdown began but had not returned.
        let mut e = graceful_handoff();
        e.remove(7);
        let violations = check(e);
        for needle in [
            "w1 completed the handoff of p to w2 while its processor still ran",
            "w2 started processing p after a graceful handoff from w1, whose processor had not returned from shutdown",
        ] {
            assert!(
                violations.iter().any(|v| v.contains(needle)),
                "{needle}: {violations:?}"
            );
        }
        // Not even begun.
        let mut e = graceful_handoff();
        e.remove(7);
        e.remove(6);
        expect_violation(
            e,
            "w1 completed the handoff of p to w2 while its processor still ran",
        );
    }

    #[test]
    fn a_forced_handoff_is_an_overlap_not_a_violation() {
        // w1's processor did not stop in time: w2 completed the handoff itself, and w1's
        // processor runs on until it is told Zombie.
        let mut e = graceful_handoff();
        e.remove(7);
        e.remove(6);
        e[6] = completed("p", "w2", "w2");
        e.push(delivered(1, vec![delivery("13", "k", 3)]));
        e.push(Entry::Shutdown {
            instance: 1,
            reason: ShutdownReason::Zombie,
        });
        e.push(Entry::ShutdownReturned { instance: 1 });
        let checker = checker_after(e);
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(
            (
                checker.graceful_handoffs,
                checker.forced_handoffs,
                checker.overlaps
            ),
            (0, 1, 1)
        );
    }

    #[test]
    fn a_crashed_workers_processors_do_not_count_as_running() {
        let mut e = graceful_handoff();
        // w1 crashes instead of shutting down; w2 takes the expired lease.
        e.remove(7);
        e[4] = created("q");
        e[6] = Entry::Crashed {
            worker: "w1".to_owned(),
        };
        e[7] = taken("p", "w2");
        let checker = checker_after(e);
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(checker.overlaps, 0);
    }

    #[test]
    fn a_take_of_a_lease_in_a_handoff_is_a_forced_handoff() {
        // The handoff timed out: the lease expired (2.x) or the 3.x leader assigned it to
        // its next owner directly, while w1's processor still ran.
        let mut e = graceful_handoff();
        e.truncate(6);
        e.push(Entry::Taken {
            key: "p".to_owned(),
            owner: "w2".to_owned(),
            by: Some("w3".to_owned()),
        });
        e.push(init(2, "w2", "p", esn("11", 0)));
        let checker = checker_after(e);
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(
            (
                checker.graceful_handoffs,
                checker.forced_handoffs,
                checker.overlaps
            ),
            (0, 1, 1)
        );
    }

    /// w1 holds p; its renewals fail, w2 takes the expired lease at `t0 + 10 s` and starts;
    /// w1's processor delivers once more at `t0 + 10 s + deliver_after`, and returns from
    /// shutdown(Zombie) at `t0 + 10 s + stopped_after`.
    fn loss(deliver_after: Duration, stopped_after: Duration) -> Checker {
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs(1);
        let taken_at = t0 + 10 * s;
        let entries = vec![
            (t0, created("p")),
            (t0, taken("p", "w1")),
            (t0, init(1, "w1", "p", ExtendedSequenceNumber::TRIM_HORIZON)),
            (t0, delivered(1, vec![delivery("10", "k", 0)])),
            (taken_at, taken("p", "w2")),
            (
                taken_at,
                init(2, "w2", "p", ExtendedSequenceNumber::TRIM_HORIZON),
            ),
            (taken_at, delivered(2, vec![delivery("10", "k", 0)])),
            (
                taken_at + deliver_after,
                delivered(1, vec![delivery("11", "k", 1)]),
            ),
            (
                taken_at + deliver_after,
                Entry::Shutdown {
                    instance: 1,
                    reason: ShutdownReason::Zombie,
                },
            ),
            (
                taken_at + stopped_after,
                Entry::ShutdownReturned { instance: 1 },
            ),
            (taken_at + stopped_after, Entry::Dropped { instance: 2 }),
        ];
        let mut checker = Checker {
            overlap_limit: Some(OverlapLimit {
                deliver: 5 * s,
                stop: 20 * s,
            }),
            ..Checker::default()
        };
        for (at, e) in entries {
            checker.apply_at(at, e, &HashMap::new());
        }
        checker.finish(taken_at + stopped_after);
        checker
    }

    #[test]
    fn an_overlap_after_a_loss_within_its_bound_passes_and_is_measured() {
        let s = Duration::from_secs(1);
        let checker = loss(4 * s, 19 * s);
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(checker.overlaps, 1);
        assert_eq!(checker.max_loss_delivery, 4 * s);
        assert_eq!(checker.max_loss_overlap, 19 * s);
    }

    #[test]
    fn an_overlap_after_a_loss_beyond_its_bound_is_caught() {
        let s = Duration::from_secs(1);
        let checker = loss(6 * s, 19 * s);
        assert!(
            checker.violations.iter().any(|v| v.contains(
                "w1's processor of p, whose lease w2 had taken (a loss or a forced handoff), still delivered k#000001 6s after w2's processor started (bound 5s)"
            )),
            "{:?}",
            checker.violations
        );
        let checker = loss(4 * s, 21 * s);
        assert!(
            checker.violations.iter().any(|v| v.contains(
                "w1's processor of p, whose lease w2 had taken (a loss or a forced handoff), returned from shutdown only 21s after w2's processor started (bound 20s)"
            )),
            "{:?}",
            checker.violations
        );
    }

    #[test]
    fn a_processor_that_never_stops_is_caught() {
        let mut e = clean();
        // w1 crashed, w2's processor of p returned from shutdown(Terminate); its processor
        // of c is neither shut down nor dropped.
        e.push(Entry::Crashed {
            worker: "w1".to_owned(),
        });
        e.push(Entry::ShutdownReturned { instance: 2 });
        let mut checker = checker_after(e);
        checker.finish(tokio::time::Instant::now());
        assert!(
            checker
                .violations
                .iter()
                .any(|v| v.contains("w2's processor of c never stopped")),
            "{:?}",
            checker.violations
        );
        assert!(
            !checker
                .violations
                .iter()
                .any(|v| v.contains("of p never stopped")),
            "{:?}",
            checker.violations
        );
    }

    #[test]
    fn a_delivery_after_shutdown_began_is_caught() {
        let mut e = graceful_handoff();
        e.insert(7, delivered(1, vec![delivery("12", "k", 2)]));
        expect_violation(e, "after its processor's shutdown(Requested) began");
    }

    #[test]
    fn a_record_delivered_twice_across_a_graceful_handoff_is_caught() {
        let mut e = graceful_handoff();
        e[11] = delivered(2, vec![delivery("11", "k", 1)]);
        expect_violation(e, "again after a graceful handoff from w1");
    }

    #[test]
    fn a_redelivery_of_checkpointed_records_is_caught() {
        let mut e = clean();
        // w2 starts from the right checkpoint but delivers 10, which w1 had checkpointed.
        e[8] = delivered(2, vec![delivery("10", "k", 0)]);
        expect_violation(e, "at or below the checkpoint");
        let mut e = clean();
        // w2 starts from an old checkpoint.
        e[7] = init(2, "w2", "p", ExtendedSequenceNumber::TRIM_HORIZON);
        e[8] = delivered(2, vec![delivery("10", "k", 0)]);
        let violations = check(e);
        for needle in ["but the lease's checkpoint was 10", "had checkpointed 10"] {
            assert!(
                violations.iter().any(|v| v.contains(needle)),
                "{needle}: {violations:?}"
            );
        }
    }

    #[test]
    fn lease_table_misuse_is_caught() {
        let mut e = clean();
        e.insert(
            11,
            Entry::Deleted {
                key: "p".to_owned(),
            },
        );
        expect_violation(e, "deleted before SHARD_END");
        let mut e = clean();
        e.push(taken("p", "w3"));
        expect_violation(e, "after it was finished");
        let mut e = clean();
        e.push(created("p"));
        expect_violation(e, "created again after cleanup");
    }

    #[test]
    fn a_second_shutdown_is_caught_but_a_terminate_retry_is_not() {
        let mut e = clean();
        e.insert(
            11,
            Entry::Shutdown {
                instance: 2,
                reason: ShutdownReason::Terminate,
            },
        );
        assert_eq!(check(e), Vec::<String>::new());
        let mut e = clean();
        e.push(Entry::Shutdown {
            instance: 3,
            reason: ShutdownReason::Requested,
        });
        e.push(Entry::Shutdown {
            instance: 3,
            reason: ShutdownReason::Zombie,
        });
        expect_violation(e, "shut down twice");
    }

    fn leader(worker: &str, leading: bool, at: tokio::time::Instant) -> Entry {
        Entry::Leader {
            worker: worker.to_owned(),
            leading,
            at,
        }
    }

    fn with_leader_limit(entries: Vec<Entry>, limit: Duration) -> Checker {
        let mut checker = Checker {
            leaders: LeaderCheck {
                limit,
                ..LeaderCheck::default()
            },
            ..Checker::default()
        };
        for e in entries {
            checker.apply(e, &HashMap::new());
        }
        checker
    }

    #[test]
    fn a_leader_handover_without_overlap_passes_and_is_counted() {
        let t0 = tokio::time::Instant::now();
        let s = Duration::from_secs(1);
        let checker = with_leader_limit(
            vec![
                leader("w1", true, t0),
                leader("w1", false, t0 + s),
                // The same instant: no overlap.
                leader("w2", true, t0 + s),
                leader("w2", false, t0 + 3 * s),
                leader("w2", true, t0 + 4 * s),
            ],
            s,
        );
        assert_eq!(checker.violations, Vec::<String>::new());
        let l = &checker.leaders;
        assert_eq!((l.elections, l.changes, l.overlaps), (3, 1, 0));
    }

    #[test]
    fn two_leaders_at_once_beyond_the_lock_duration_are_caught() {
        let t0 = tokio::time::Instant::now();
        let ms = Duration::from_millis(1);
        // Within the bound: counted, not flagged.
        let checker = with_leader_limit(
            vec![
                leader("w1", true, t0),
                leader("w2", true, t0 + 100 * ms),
                leader("w1", false, t0 + 157 * ms),
            ],
            1000 * ms,
        );
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!(checker.leaders.overlaps, 1);
        assert_eq!(checker.leaders.max_overlap, 57 * ms);
        // Beyond it (three at once, the overlap ends when one is left).
        let checker = with_leader_limit(
            vec![
                leader("w1", true, t0),
                leader("w2", true, t0 + 100 * ms),
                leader("w3", true, t0 + 200 * ms),
                leader("w2", false, t0 + 300 * ms),
                leader("w1", false, t0 + 1200 * ms),
            ],
            1000 * ms,
        );
        assert!(
            checker
                .violations
                .iter()
                .any(|v| v.contains("two workers counted themselves 3.x leader at once for 1.1s")),
            "{:?}",
            checker.violations
        );
    }

    #[test]
    fn assignments_by_a_deposed_leader_are_counted() {
        let t0 = tokio::time::Instant::now();
        let assign = |owner: &str| Entry::Taken {
            key: "p".to_owned(),
            owner: owner.to_owned(),
            by: Some("w1".to_owned()),
        };
        let checker = with_leader_limit(
            vec![
                created("p"),
                leader("w1", true, t0),
                // The leader assigns to another worker and to itself.
                assign("w2"),
                assign("w1"),
                leader("w1", false, t0 + Duration::from_secs(1)),
                assign("w3"),
                // A 2.x take (for itself, not leading): no assignment.
                taken("p", "w3"),
            ],
            Duration::from_secs(1),
        );
        assert_eq!(checker.violations, Vec::<String>::new());
        assert_eq!((checker.assignments, checker.stale_assignments), (3, 1));
    }

    #[test]
    fn payloads_round_trip() {
        assert_eq!(
            parse_payload(&payload("key-007", 42)),
            Some(("key-007".to_owned(), 42))
        );
        assert_eq!(parse_payload(b"no counter"), None);
    }

    #[test]
    fn a_failure_names_the_seed_and_the_replay_command() {
        let f = SimulationFailure {
            seed: 42,
            violations: vec!["something".to_owned()],
            fault_log: Vec::new(),
            protocol: SimulationConfig::new(42).protocol,
        };
        let text = f.to_string();
        assert!(text.contains("seed 42"), "{text}");
        assert!(
            text.contains(
                "(replay: KCL_SEED=42 cargo test -p kcl-testkit --test simulation replay)"
            ),
            "{text}"
        );
        assert!(text.contains("something"), "{text}");
        // A protocol the seed does not draw itself is named in the command.
        let other = if f.protocol == LeaseProtocol::V3x {
            LeaseProtocol::V2x
        } else {
            LeaseProtocol::V3x
        };
        let text = SimulationFailure {
            protocol: other,
            ..f
        }
        .to_string();
        assert!(text.contains("replay: KCL_SIM_V3="), "{text}");
    }
}
