//! The seeded multi-worker simulation (`kcl_testkit::simulation`): many seeds in CI, one
//! seed to replay a failure, and a long mode on request.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::time::{Duration, Instant};

use kcl_testkit::simulation::{
    LeaseProtocol, SimulationConfig, SimulationFailure, SimulationReport, run_config,
};

/// The configuration of `seed`; `KCL_SIM_HANGS=0` leaves the hang faults out (they are in
/// by default); `KCL_SIM_FAN_OUT=0` runs polling workers only (by default fan-out and
/// polling workers are mixed, with the fan-out faults); `KCL_SIM_V3` chooses the lease
/// protocol of every seed: `0` (or `2`) 2.x, `1` (or `3`) 3.x fleets, `migrate` a migration
/// from 2.x to 3.x mid-run; unset, each seed draws it (half 2.x, 45 in 100 3.x, one in
/// twenty a migration).
fn config(seed: u64) -> SimulationConfig {
    let config = SimulationConfig::new(seed)
        .hangs(env_number("KCL_SIM_HANGS") != Some(0))
        .fan_out(env_number("KCL_SIM_FAN_OUT") != Some(0));
    match env_protocol() {
        Some(protocol) => config.protocol(protocol),
        None => config,
    }
}

fn env_protocol() -> Option<LeaseProtocol> {
    let value = std::env::var("KCL_SIM_V3").ok()?;
    match value.trim() {
        "0" | "2" | "2x" => Some(LeaseProtocol::V2x),
        "1" | "3" | "3x" => Some(LeaseProtocol::V3x),
        "migrate" | "migration" => Some(LeaseProtocol::Migration),
        other => panic!("KCL_SIM_V3={other:?}: expected 0, 1 or migrate"),
    }
}

fn run_seed(seed: u64) -> Result<SimulationReport, SimulationFailure> {
    run_config(config(seed))
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[derive(Default)]
struct Totals {
    seeds: usize,
    records: usize,
    deliveries: usize,
    redeliveries: usize,
    zombie_redeliveries: usize,
    faults: usize,
    workers: usize,
    fan_out_workers: usize,
    subscriptions: u64,
    checkpoints: usize,
    graceful_handoffs: usize,
    forced_handoffs: usize,
    overlaps: usize,
    handoff_redeliveries: usize,
    handoff_faults: usize,
    /// Runs whose `handoff_timeout` was below 30 s.
    short_handoff_timeouts: usize,
    /// The longest time a processor that lost its lease ran on beside the new owner's, with
    /// its seed and bound.
    max_loss_overlap: (Duration, u64, Duration),
    /// The latest delivery by such a processor, with its seed and bound.
    max_loss_delivery: (Duration, u64, Duration),
    /// The largest share of its bound a loss overlap took.
    max_loss_overlap_share: f64,
    virtual_time: Duration,
    v3_fleets: usize,
    migrations: usize,
    v3_workers: usize,
    version_switches: u64,
    leader_elections: usize,
    leader_changes: usize,
    leader_overlaps: usize,
    max_leader_overlap: Duration,
    leader_assignments: usize,
    stale_leader_assignments: usize,
    leader_handoffs: u64,
    assignment_conflicts: u64,
    slow_recoveries: usize,
}

impl Totals {
    fn add(&mut self, r: &SimulationReport) {
        self.seeds += 1;
        self.records += r.records_produced;
        self.deliveries += r.deliveries;
        self.redeliveries += r.redeliveries;
        self.zombie_redeliveries += r.zombie_redeliveries;
        self.faults += r.faults_injected;
        self.workers += r.workers_started;
        self.fan_out_workers += r.fan_out_workers_started;
        self.subscriptions += r.subscriptions_opened;
        self.checkpoints += r.checkpoints;
        self.graceful_handoffs += r.graceful_handoffs;
        self.forced_handoffs += r.forced_handoffs;
        self.overlaps += r.overlaps;
        self.handoff_redeliveries += r.handoff_redeliveries;
        self.handoff_faults += r.handoff_faults;
        if r.handoff_timeout < Duration::from_secs(30) {
            self.short_handoff_timeouts += 1;
        }
        if r.max_loss_overlap > self.max_loss_overlap.0 {
            self.max_loss_overlap = (r.max_loss_overlap, r.seed, r.loss_overlap_limit);
        }
        if r.max_loss_delivery > self.max_loss_delivery.0 {
            self.max_loss_delivery = (r.max_loss_delivery, r.seed, r.loss_delivery_limit);
        }
        if !r.loss_overlap_limit.is_zero() {
            let share = r.max_loss_overlap.as_secs_f64() / r.loss_overlap_limit.as_secs_f64();
            self.max_loss_overlap_share = self.max_loss_overlap_share.max(share);
        }
        self.virtual_time += r.virtual_time;
        match r.protocol {
            LeaseProtocol::V3x => self.v3_fleets += 1,
            LeaseProtocol::Migration => self.migrations += 1,
            _ => {}
        }
        self.v3_workers += r.v3_workers_started;
        self.version_switches += r.version_switches;
        self.leader_elections += r.leader_elections;
        self.leader_changes += r.leader_changes;
        self.leader_overlaps += r.leader_overlaps;
        self.max_leader_overlap = self.max_leader_overlap.max(r.max_leader_overlap);
        self.leader_assignments += r.leader_assignments;
        self.stale_leader_assignments += r.stale_leader_assignments;
        self.leader_handoffs += r.leader_handoffs;
        self.assignment_conflicts += r.assignment_conflicts;
    }
}

/// Runs seeds `first..first + count`; fails listing every failing seed.
fn run_seeds(first: u64, count: u64) {
    let wall = Instant::now();
    let mut totals = Totals::default();
    let mut failures: Vec<SimulationFailure> = Vec::new();
    for seed in first..first + count {
        match run_seed(seed) {
            Ok(report) => {
                // Within the bound, but in principle there is none: worth a look.
                if report.leader_overlaps > 0 {
                    println!(
                        "  seed {seed}: two workers counted themselves leader at once for up to {:?}",
                        report.max_leader_overlap
                    );
                }
                // Within the bounds, but slower than a failover should take: worth a look.
                let slow = report.failover_time * 3 + Duration::from_secs(10);
                if report.drain_time > slow || report.settle_time > slow {
                    println!(
                        "  seed {seed} ({:?}): slow recovery after the faults stopped: every record after {:.1?}, the fleet settled {:.1?} later (failover time {:.1?})",
                        report.protocol,
                        report.drain_time,
                        report.settle_time,
                        report.failover_time
                    );
                    totals.slow_recoveries += 1;
                }
                totals.add(&report)
            }
            Err(failure) => {
                eprintln!("{failure}");
                failures.push(failure);
            }
        }
    }
    println!(
        "simulation: {} seeds passed of {count} in {:.1?} wall ({:.0?} virtual): {} records produced, {} delivered ({} repeats, {} of them by zombies), {} faults injected, {} workers started ({} by fan-out, {} subscriptions), {} checkpoints, {} graceful handoffs ({} records repeated after them), {} forced handoffs, {} overlaps after a loss or a forced handoff",
        totals.seeds,
        wall.elapsed(),
        totals.virtual_time,
        totals.records,
        totals.deliveries,
        totals.redeliveries,
        totals.zombie_redeliveries,
        totals.faults,
        totals.workers,
        totals.fan_out_workers,
        totals.subscriptions,
        totals.checkpoints,
        totals.graceful_handoffs,
        totals.handoff_redeliveries,
        totals.forced_handoffs,
        totals.overlaps,
    );
    let worst = |(lasted, seed, bound): (Duration, u64, Duration)| {
        if lasted.is_zero() {
            "never".to_owned()
        } else {
            format!("at most {lasted:.1?} (seed {seed}, bound {bound:.1?})")
        }
    };
    println!(
        "  handoffs: {} runs with a handoff_timeout below 30 s, {} faults right after a handoff began; after a loss or a forced handoff the old processor delivered after the new owner's started {}, and ran on beside it {} (at most {:.0}% of a run's bound)",
        totals.short_handoff_timeouts,
        totals.handoff_faults,
        worst(totals.max_loss_delivery),
        worst(totals.max_loss_overlap),
        totals.max_loss_overlap_share * 100.0,
    );
    println!(
        "  3.x: {} fleets on 3.x and {} migrations from 2.x (of the seeds passed), {} workers started on 3.x, {} client version switches, {} leader elections ({} leader changes), {} leader overlaps (longest {:?}), {} leader assignments ({} by a deposed leader), {} handoffs initiated by leaders, {} assignment conflicts; {} slow recoveries",
        totals.v3_fleets,
        totals.migrations,
        totals.v3_workers,
        totals.version_switches,
        totals.leader_elections,
        totals.leader_changes,
        totals.leader_overlaps,
        totals.max_leader_overlap,
        totals.leader_assignments,
        totals.stale_leader_assignments,
        totals.leader_handoffs,
        totals.assignment_conflicts,
        totals.slow_recoveries,
    );
    // Both kinds of retrieval ran (unless turned off with KCL_SIM_FAN_OUT=0).
    if totals.seeds > 0 && env_number("KCL_SIM_FAN_OUT") != Some(0) {
        assert!(
            totals.fan_out_workers > 0 && totals.fan_out_workers < totals.workers,
            "fan-out and polling workers mixed"
        );
        assert!(totals.subscriptions > 0, "fan-out workers subscribed");
    }
    // The schedules move leases between live workers (a worker started after a crash or a
    // stop asks the others): handoffs must really be exercised.
    // And handoffs time out (a short `handoff_timeout`, slow shutdowns, faults right after
    // a handoff began): forced completions happen beside the graceful ones.
    if count >= 50 {
        assert!(
            totals.graceful_handoffs > 0,
            "no graceful handoff in {count} seeds"
        );
        assert!(
            totals.forced_handoffs > 0,
            "no forced handoff completion in {count} seeds"
        );
    }
    // The 3.x fleets really ran the leader protocol (a store wrapper that did not forward
    // `state_tables` would leave them on 2.x), and leadership moved.
    if totals.v3_fleets + totals.migrations >= 20 {
        assert!(totals.v3_workers > 0, "no worker ran 3.x");
        assert!(
            totals.leader_changes > 0,
            "leadership never moved in {} 3.x fleets",
            totals.v3_fleets + totals.migrations
        );
        assert!(totals.leader_assignments > 0, "no leader assigned a lease");
    }
    if totals.migrations >= 5 {
        assert!(
            totals.version_switches > 0,
            "no running worker followed a migration"
        );
    }
    if !failures.is_empty() {
        let seeds: Vec<u64> = failures.iter().map(|f| f.seed).collect();
        panic!(
            "{} of {count} seeds failed: {seeds:?}\n{}",
            failures.len(),
            failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Seeds 1..=200 (or `KCL_SIM_SEEDS=N` of them).
#[test]
fn ci_seeds() {
    let count = env_number("KCL_SIM_SEEDS").unwrap_or(200);
    run_seeds(1, count);
}

/// Log timestamps in tokio's (virtual) time: seconds since the test started.
struct VirtualTime(std::time::Instant);

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let now = tokio::time::Instant::now().into_std();
        write!(
            w,
            "{:>9.3}s",
            now.saturating_duration_since(self.0).as_secs_f64()
        )
    }
}

/// Replays the seed in `KCL_SEED` (seed 1 when unset), printing what happened; the
/// workers' logs go to the test output as `RUST_LOG` says (none when unset).
#[test]
fn replay() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_timer(VirtualTime(std::time::Instant::now()))
        .with_test_writer()
        .try_init();
    let seed = env_number("KCL_SEED").unwrap_or(1);
    match run_seed(seed) {
        Ok(report) => {
            for line in &report.fault_log {
                println!("  {line}");
            }
            println!(
                "seed {seed} passed ({:?}): {} records, {} deliveries ({} repeats), {} faults, {} workers ({} on 3.x, {} version switches), {} leader elections ({} changes, {} overlaps, longest {:?}), {} leader assignments, {} shards at the end, {:.1?} virtual",
                report.protocol,
                report.records_produced,
                report.deliveries,
                report.redeliveries,
                report.faults_injected,
                report.workers_started,
                report.v3_workers_started,
                report.version_switches,
                report.leader_elections,
                report.leader_changes,
                report.leader_overlaps,
                report.max_leader_overlap,
                report.leader_assignments,
                report.shards_at_end,
                report.virtual_time
            );
        }
        Err(failure) => {
            for line in &failure.fault_log {
                println!("  {line}");
            }
            panic!("{failure}")
        }
    }
}

/// Long mode: 1700 seeds (1001..=2700; `KCL_SIM_LONG_SEEDS=N` for another count, with
/// `KCL_SIM_V3` for one protocol), about 30 s of CPU in a debug build, so CI runs it too
/// (1700 rather than the 2000 of the 2.x-only days: the 3.x and migration seeds cost more,
/// and the suite stays as fast as it was).
#[test]
fn long_mode() {
    let count = std::env::var("KCL_SIM_LONG_SEEDS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(1700);
    run_seeds(1001, count);
}

/// Seeds that found library defects (beyond the CI range), fixed since:
/// - 1093, 5545: a child lease whose creation failed (lease store faulted at the parent's
///   end) is never created by shard sync, because a descendant (a merge child) already has
///   a lease; the merge child then waits forever and the records of that shard are never
///   delivered (`kcl-worker/src/shard_sync.rs`, `plan_new_leases`).
/// - 8809: a merge child starts before one of its parents finished, because the parent
///   check trusts a stale cached shard listing that predates the parent
///   (`kcl-worker/src/shard_sync.rs`, `parents_finished`).
/// - 1526, 1772, 2052, 2201, 2737 (lease store hangs at the end of the run): a lease lost
///   during graceful shutdown (its renewals hung for the failover time) was neither released
///   nor named in the `ShutdownReport` (`kcl-worker/src/worker.rs`, `graceful_shutdown`);
///   and the invariant now accepts a lease the worker had lost before its shutdown, which
///   expires for the others.
/// - 2819 (a 3.x fleet; its leader cut off from DynamoDB, calls hanging, while it still
///   read Kinesis): the cut-off worker's processor reached its shard's end as the partition
///   began and kept retrying the child's lease creation for a minute without checking that
///   it still held the parent; meanwhile another worker finished parent and child and
///   cleanup deleted both, and the late retry created the child's lease again at
///   TRIM_HORIZON (`kcl-worker/src/consumer.rs`, `record_children`). The seed no longer
///   draws that interleaving since the simulation's draws changed; the worker test
///   `a_parent_lease_lost_while_its_children_are_recorded_stops_the_retries` pins the fix.
/// - 3351 (3.x): a worker's graceful shutdown released its leases while its own leader run
///   was still in flight, which gave a just-released lease back to the stopping worker
///   (`kcl-worker/src/worker.rs`: the leases are released once the 3.x tasks ended).
/// - 3192 (3.x), 1001 and 2243 (migrations): the leader balanced a lease whose owner did
///   not hold it (just assigned and not picked up yet, or just handed over to it), and the
///   handoff from that owner waited out the handoff timeout (`kcl-lease/src/v3/assignment.rs`:
///   only leases the leader saw their owner renew are moved for balance).
#[test]
fn regression_seeds() {
    let mut failures = Vec::new();
    // Found in 2.x fleets: replayed as 2.x, whatever protocol the seed draws now.
    for seed in [1093, 5545, 8809, 1526, 1772, 2052, 2201, 2737] {
        if let Err(f) = run_config(config(seed).protocol(LeaseProtocol::V2x)) {
            failures.push(f.to_string());
        }
    }
    // Found in a 3.x fleet: replayed as drawn.
    if let Err(f) = run_seed(2819) {
        failures.push(f.to_string());
    }
    let found = [
        (3351, LeaseProtocol::V3x),
        (3192, LeaseProtocol::V3x),
        (1001, LeaseProtocol::Migration),
        (2243, LeaseProtocol::Migration),
    ];
    for (seed, protocol) in found {
        if let Err(f) = run_config(config(seed).protocol(protocol)) {
            failures.push(f.to_string());
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Without faults the run passes too, and injects nothing.
#[test]
fn without_faults_every_record_is_delivered() {
    for seed in [3, 4] {
        let config = kcl_testkit::simulation::SimulationConfig::new(seed).faults(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let report = runtime
            .block_on(kcl_testkit::simulation::run_simulation(config))
            .into_result()
            .unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(report.faults_injected, 0);
        assert!(report.deliveries >= report.records_produced, "{report:?}");
        assert!(report.fault_log.iter().all(|l| !l.contains("crashed")));
    }
}
