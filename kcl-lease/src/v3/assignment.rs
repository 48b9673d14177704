//! The leader's lease assignment, as a pure planner: [`plan`] takes the leases, the
//! WorkerMetricStats rows, the leader's memory of the leases ([`LeaseHistory`]) and the
//! time, and returns the moves to make ([`AssignmentPlan`]); each [`Move`] says which
//! conditional lease write makes it ([`Move::write`]). Nothing here calls a store: the
//! leader's loop (a later change) lists, plans, writes, and tells the history what it
//! wrote ([`LeaseHistory::record`]).
//!
//! # The rules
//!
//! Informed by the Java KCL 3.x LeaseAssignmentManager (see the [parent module](super)),
//! written for determinism and testability:
//!
//! 1. **Workers**: only *active* workers (valid row, fresh within 2 report intervals, no
//!    failing metric) get leases or give leases up for balance. A worker's load per metric
//!    is the moving average of its row's values; a worker without explicit metrics gets the
//!    synthetic metric `T` = 100 × its assigned throughput / the per-worker target
//!    throughput (or, while no lease reports throughput, its lease count / the per-worker
//!    target count). The fleet average of a metric is over the active workers having it.
//! 2. **Expiry** is judged by the leader's own memory ([`LeaseHistory`]): a lease is expired
//!    when its counter has stood still for `lease_duration` since the leader first saw that
//!    counter. A lease the leader itself assigned gets `pickup_grace` more: its assignee
//!    discovers it only at its next GSI query, so the lease is never judged expired while
//!    its assignee is about to pick it up. A new leader has no memory: it judges no owned
//!    lease expired before `lease_duration` has passed.
//! 3. **Unassigned first, then expired** (longest unchanged first), each to the active
//!    worker with the most room (the smallest, over its metrics, of `(average - load) /
//!    load`; 1 when idle; ties to the worker with fewer leases, then by id), never to the
//!    lease's current owner, never to a worker at `max_leases_for_worker` or above
//!    `max_throughput_per_host_kbps`. Each assignment raises the worker's estimated load
//!    by the lease's share (`throughput × average / target throughput`, or `average /
//!    target leases per worker`) and lowers the old owner's.
//! 4. **Graceful handoffs in flight** (`checkpointOwner` set) are left alone until
//!    `handoff_timeout + lease_duration` after the leader first saw them, or until their
//!    counter stood still for `lease_duration` (the current owner renews while it hands
//!    over; one that stopped renewing crashed, and the Java leader too then judges the
//!    lease expired); then the lease is assigned directly, to its intended new owner when
//!    that worker is active.
//! 5. **Balance**, when asked for (the Java KCL does it every third run): for each metric,
//!    if some worker is more than `rebalance_threshold_percentage` % off the average (or
//!    above its operating range), each worker at or above the upper bound (or the most
//!    loaded one) gives up throughput worth `(load - average) / load ×
//!    dampening_percentage %` of its assigned throughput; the metric asking for the most is
//!    balanced. Leases are chosen largest first among those that fit the amount (the
//!    smallest one if none fits and `allow_throughput_overshoot`; one lease when the worker
//!    reports no throughput), and each goes to the worker with the most room unless that
//!    would push it above the average or its operating range. A moved lease that is held is
//!    handed off gracefully (`graceful_handoff`), otherwise assigned.
//! 6. Leases at `SHARD_END` are never assigned (our taker never takes them either; they
//!    are deleted once their children started). This differs from the Java KCL, which
//!    assigns them like any other lease.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::worker_metrics::{self, WorkerMetricStats, metric};
use crate::{Lease, LeaseError};

/// The settings of the planner (Java names in brackets).
#[derive(Clone, PartialEq, Debug)]
#[non_exhaustive]
pub struct AssignmentConfig {
    /// How long a lease's counter may stand still before it is expired (`failoverTimeMillis`).
    pub lease_duration: Duration,
    /// Extra time a lease the leader just assigned has before it can expire (default: one
    /// `lease_duration`, the followers' discovery interval).
    pub pickup_grace: Duration,
    /// How long a graceful handoff may take (`gracefulLeaseHandoffTimeoutMillis`, 30 s).
    pub handoff_timeout: Duration,
    /// Move held leases by graceful handoff (`isGracefulLeaseHandoffEnabled`, true).
    pub graceful_handoff: bool,
    /// The most leases a worker gets (`maxLeasesForWorker`, unlimited).
    pub max_leases_for_worker: usize,
    /// The most throughput a worker gets, KB/s (`maxThroughputPerHostKBps`, unlimited).
    pub max_throughput_per_host_kbps: f64,
    /// How much of the computed excess is moved per balancing (`dampeningPercentage`, 60).
    pub dampening_percentage: u32,
    /// How far off the average a worker may be before balancing (`reBalanceThresholdPercentage`, 10).
    pub rebalance_threshold_percentage: u32,
    /// Move the smallest lease when none fits the amount (`allowThroughputOvershoot`, true).
    pub allow_throughput_overshoot: bool,
    /// Workers' report interval, for their freshness (`workerMetricsReporterFreqInMillis`, 30 s).
    pub report_interval: Duration,
    /// The moving average's α (`workerMetricsEMAAlpha`, 0.5).
    pub ema_alpha: f64,
}

impl AssignmentConfig {
    /// The defaults for this failover time.
    pub fn for_failover_time(lease_duration: Duration) -> Self {
        Self {
            lease_duration,
            pickup_grace: lease_duration,
            handoff_timeout: Duration::from_secs(30),
            graceful_handoff: true,
            max_leases_for_worker: usize::MAX,
            max_throughput_per_host_kbps: f64::INFINITY,
            dampening_percentage: 60,
            rebalance_threshold_percentage: 10,
            allow_throughput_overshoot: true,
            report_interval: worker_metrics::DEFAULT_REPORT_INTERVAL,
            ema_alpha: worker_metrics::DEFAULT_EMA_ALPHA,
        }
    }

    /// Checks the settings; the error names the option.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let invalid = |option: &'static str, reason: String| {
            Err(LeaseError::InvalidConfig { option, reason })
        };
        if self.lease_duration.is_zero() {
            return invalid("failover_time", "must be positive".to_owned());
        }
        if self.max_leases_for_worker == 0 {
            return invalid("max_leases_for_worker", "must be at least 1".to_owned());
        }
        if self.max_throughput_per_host_kbps.is_nan() || self.max_throughput_per_host_kbps <= 0.0 {
            return invalid(
                "max_throughput_per_host_kbps",
                "must be positive".to_owned(),
            );
        }
        if !(1..=100).contains(&self.dampening_percentage) {
            return invalid(
                "dampening_percentage",
                format!("{} is outside 1..=100", self.dampening_percentage),
            );
        }
        if self.rebalance_threshold_percentage > 100 {
            return invalid(
                "rebalance_threshold_percentage",
                format!("{} is above 100", self.rebalance_threshold_percentage),
            );
        }
        if self.report_interval.is_zero() {
            return invalid(
                "worker_metrics_reporter_freq",
                "must be positive".to_owned(),
            );
        }
        if !(self.ema_alpha > 0.0 && self.ema_alpha <= 1.0) {
            return invalid(
                "worker_metrics_ema_alpha",
                format!("{} is outside (0, 1]", self.ema_alpha),
            );
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct Seen {
    counter: u64,
    owner: Option<String>,
    checkpoint_owner: Option<String>,
    since: Instant,
    assigned_by_us: bool,
    /// The counter moved under the same owner while this leader watched: the owner holds
    /// the lease and renews it (it can hand it over).
    renewed: bool,
    handoff_since: Option<Instant>,
}

/// The leader's memory of the leases between runs: when each counter was first seen, which
/// assignments it made, when each handoff started. Lost on a leader change, by design.
#[derive(Clone, Debug, Default)]
pub struct LeaseHistory {
    seen: HashMap<String, Seen>,
}

impl LeaseHistory {
    /// An empty memory (a new leader).
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes in a listing made at `now`: a changed counter restarts the lease's clock, a
    /// newly seen handoff starts its clock, leases gone are forgotten.
    pub fn observe(&mut self, leases: &[Lease], now: Instant) {
        let keys: BTreeSet<&str> = leases.iter().map(|l| l.lease_key.as_str()).collect();
        self.seen.retain(|k, _| keys.contains(k.as_str()));
        for lease in leases {
            let handoff = lease.checkpoint_owner.clone();
            match self.seen.get_mut(&lease.lease_key) {
                Some(seen) => {
                    if seen.counter != lease.lease_counter {
                        // A renewal, not a take, nor a handoff's start or completion (the
                        // completion moves the counter under the next owner's name).
                        seen.renewed = lease.lease_owner.is_some()
                            && seen.owner == lease.lease_owner
                            && seen.checkpoint_owner.is_none()
                            && handoff.is_none();
                        seen.counter = lease.lease_counter;
                        seen.since = now;
                        seen.assigned_by_us = false;
                    }
                    let same_handoff = handoff.is_some()
                        && seen.checkpoint_owner == handoff
                        && seen.owner == lease.lease_owner;
                    if !same_handoff {
                        seen.handoff_since = handoff.as_ref().map(|_| now);
                    }
                    seen.owner = lease.lease_owner.clone();
                    seen.checkpoint_owner = handoff;
                }
                None => {
                    self.seen.insert(
                        lease.lease_key.clone(),
                        Seen {
                            counter: lease.lease_counter,
                            owner: lease.lease_owner.clone(),
                            handoff_since: handoff.as_ref().map(|_| now),
                            checkpoint_owner: handoff,
                            since: now,
                            assigned_by_us: false,
                            renewed: false,
                        },
                    );
                }
            }
        }
    }

    /// Records a move this leader wrote at `now` (after the write succeeded): an assignment
    /// becomes the lease's new counter (`counter_after`), with the pickup grace; a handoff
    /// starts its clock.
    pub fn record(&mut self, mv: &Move, counter_after: u64, now: Instant) {
        let Some(seen) = self.seen.get_mut(&mv.lease_key) else {
            return;
        };
        match mv.kind {
            MoveKind::Assign => {
                seen.counter = counter_after;
                seen.since = now;
                seen.assigned_by_us = true;
                seen.renewed = false;
                seen.owner = Some(mv.to.clone());
                seen.checkpoint_owner = None;
                seen.handoff_since = None;
            }
            MoveKind::Handoff => {
                seen.renewed = false;
                seen.owner = Some(mv.to.clone());
                seen.checkpoint_owner = mv.from.clone();
                seen.handoff_since = Some(now);
            }
        }
    }

    /// Whether an owned lease is expired at `now` (see the [module documentation](self));
    /// false for a lease never observed.
    pub fn is_expired(&self, lease_key: &str, config: &AssignmentConfig, now: Instant) -> bool {
        self.seen.get(lease_key).is_some_and(|seen| {
            let grace = if seen.assigned_by_us {
                config.lease_duration + config.pickup_grace
            } else {
                config.lease_duration
            };
            now.saturating_duration_since(seen.since) > grace
        })
    }

    /// Whether this leader saw the lease's owner renew it (its counter moved under the same
    /// owner): only such a lease is moved for balance. A lease just assigned and not picked
    /// up yet, or whose owner a new leader has not seen renew, may be owned by a worker that
    /// does not hold it (not yet, or no more), and a handoff from it would wait out the
    /// handoff timeout.
    pub fn is_renewed_by_its_owner(&self, lease_key: &str) -> bool {
        self.seen.get(lease_key).is_some_and(|seen| seen.renewed)
    }

    /// Whether a handoff in flight on this lease has run out its time at `now`.
    pub fn handoff_timed_out(
        &self,
        lease_key: &str,
        config: &AssignmentConfig,
        now: Instant,
    ) -> bool {
        self.seen
            .get(lease_key)
            .and_then(|seen| seen.handoff_since)
            .is_some_and(|since| {
                now.saturating_duration_since(since)
                    > config.handoff_timeout + config.lease_duration
            })
    }

    fn since(&self, lease_key: &str) -> Option<Instant> {
        self.seen.get(lease_key).map(|s| s.since)
    }
}

/// How a move is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum MoveKind {
    /// Direct assignment (counter + 1: the old owner, if any, loses the lease at once).
    Assign,
    /// Graceful handoff (`checkpointOwner` = old owner, counter unchanged).
    Handoff,
}

/// Why a lease moves.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum MoveReason {
    /// It had no owner.
    Unassigned,
    /// Its counter stood still too long.
    Expired,
    /// A graceful handoff did not complete in time, or its current owner stopped renewing.
    HandoffTimedOut,
    /// Balancing load between workers.
    Balance,
}

/// One lease to move.
#[derive(Clone, PartialEq, Debug)]
pub struct Move {
    /// The lease.
    pub lease_key: String,
    /// Its `leaseOwner` as listed.
    pub from: Option<String>,
    /// Its `checkpointOwner` as listed.
    pub checkpoint_owner: Option<String>,
    /// The new owner.
    pub to: String,
    /// How it is written.
    pub kind: MoveKind,
    /// Why.
    pub reason: MoveReason,
}

/// The conditional lease write that makes a [`Move`], as the Java KCL 3.x writes it.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum AssignmentWrite {
    /// `SET leaseOwner = :new_owner, REMOVE checkpointOwner, leaseCounter + 1` (and
    /// `ownerSwitchesSinceCheckpoint + 1` when `owner_switch`), on condition `leaseKey`
    /// exists, `leaseOwner = :expected_owner` (absent when `None`), and `checkpointOwner =
    /// :expected_checkpoint_owner` (absent when `None`).
    Assign {
        /// The lease.
        lease_key: String,
        /// The owner the leader read.
        expected_owner: Option<String>,
        /// The checkpoint owner the leader read.
        expected_checkpoint_owner: Option<String>,
        /// The new owner.
        new_owner: String,
        /// Whether `ownerSwitchesSinceCheckpoint` goes up.
        owner_switch: bool,
    },
    /// `SET leaseOwner = :new_owner, checkpointOwner = :current_owner` (counter unchanged),
    /// on condition `leaseKey` exists, `leaseOwner = :current_owner`, no `checkpointOwner`.
    Handoff {
        /// The lease.
        lease_key: String,
        /// The owner now, who finishes and checkpoints.
        current_owner: String,
        /// The next owner.
        new_owner: String,
    },
}

impl Move {
    /// The write that makes this move.
    pub fn write(&self) -> AssignmentWrite {
        match (self.kind, &self.from) {
            (MoveKind::Handoff, Some(current)) => AssignmentWrite::Handoff {
                lease_key: self.lease_key.clone(),
                current_owner: current.clone(),
                new_owner: self.to.clone(),
            },
            _ => AssignmentWrite::Assign {
                lease_key: self.lease_key.clone(),
                expected_owner: self.from.clone(),
                expected_checkpoint_owner: self.checkpoint_owner.clone(),
                new_owner: self.to.clone(),
                owner_switch: self.from.as_deref().is_some_and(|f| f != self.to)
                    || self.checkpoint_owner.as_deref() == Some(self.to.as_str()),
            },
        }
    }
}

impl AssignmentWrite {
    /// The lease written.
    pub fn lease_key(&self) -> &str {
        match self {
            AssignmentWrite::Assign { lease_key, .. }
            | AssignmentWrite::Handoff { lease_key, .. } => lease_key,
        }
    }

    /// Whether the write's condition holds on the row as it is now (`None`: no such row),
    /// as DynamoDB would evaluate it; for an in-memory store.
    pub fn condition_holds(&self, current: Option<&Lease>) -> bool {
        let Some(lease) = current else {
            return false;
        };
        match self {
            AssignmentWrite::Assign {
                expected_owner,
                expected_checkpoint_owner,
                ..
            } => {
                lease.lease_owner == *expected_owner
                    && lease.checkpoint_owner == *expected_checkpoint_owner
            }
            AssignmentWrite::Handoff { current_owner, .. } => {
                lease.lease_owner.as_deref() == Some(current_owner.as_str())
                    && lease.checkpoint_owner.is_none()
            }
        }
    }

    /// Applies the write's change to `lease` (whose condition held).
    pub fn apply(&self, lease: &mut Lease) {
        match self {
            AssignmentWrite::Assign {
                new_owner,
                owner_switch,
                ..
            } => {
                lease.lease_owner = Some(new_owner.clone());
                lease.checkpoint_owner = None;
                lease.lease_counter = lease.lease_counter.saturating_add(1);
                if *owner_switch {
                    lease.owner_switches_since_checkpoint =
                        lease.owner_switches_since_checkpoint.saturating_add(1);
                }
            }
            AssignmentWrite::Handoff {
                current_owner,
                new_owner,
                ..
            } => {
                lease.lease_owner = Some(new_owner.clone());
                lease.checkpoint_owner = Some(current_owner.clone());
            }
        }
    }
}

/// The result of one planning run.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct AssignmentPlan {
    /// The moves, in the order they were decided.
    pub moves: Vec<Move>,
    /// Unassigned or expired leases no worker could take (all at their limits, or no active
    /// worker).
    pub unplaced: Vec<String>,
    /// The active workers, by id.
    pub active_workers: Vec<String>,
}

/// One worker's state during planning.
#[derive(Clone, Debug)]
struct WorkerLoad {
    /// Metric name to estimated load.
    load: BTreeMap<String, f64>,
    /// Metric name to max utilisation.
    range: BTreeMap<String, f64>,
}

struct Planner<'a> {
    config: &'a AssignmentConfig,
    workers: BTreeMap<String, WorkerLoad>,
    average: BTreeMap<String, f64>,
    owner: BTreeMap<String, Option<String>>,
    throughput: BTreeMap<String, f64>,
    worker_throughput: BTreeMap<String, f64>,
    worker_leases: BTreeMap<String, usize>,
    target_throughput: f64,
    target_leases: f64,
    moved: BTreeSet<String>,
}

impl Planner<'_> {
    fn share(&self, metric: &str, lease_throughput: f64) -> f64 {
        let average = self.average.get(metric).copied().unwrap_or(0.0);
        if self.target_throughput > 0.0 {
            lease_throughput * average / self.target_throughput
        } else {
            average / self.target_leases
        }
    }

    fn room(&self, worker: &str) -> f64 {
        let Some(w) = self.workers.get(worker) else {
            return f64::NEG_INFINITY;
        };
        w.load
            .iter()
            .map(|(m, v)| {
                if *v <= 0.0 {
                    1.0
                } else {
                    (self.average.get(m).copied().unwrap_or(0.0) - v) / v
                }
            })
            .fold(f64::INFINITY, f64::min)
    }

    fn assignable(&self, worker: &str) -> bool {
        self.worker_leases.get(worker).copied().unwrap_or(0) < self.config.max_leases_for_worker
            && self.worker_throughput.get(worker).copied().unwrap_or(0.0)
                <= self.config.max_throughput_per_host_kbps
    }

    /// The assignable worker with the most room, other than `except`.
    fn best(&self, except: Option<&str>) -> Option<String> {
        let mut best: Option<(f64, usize, &String)> = None;
        for id in self.workers.keys() {
            if Some(id.as_str()) == except || !self.assignable(id) {
                continue;
            }
            let room = self.room(id);
            let leases = self.worker_leases.get(id).copied().unwrap_or(0);
            let better = match &best {
                None => true,
                Some((r, l, _)) => room > *r || (room == *r && leases < *l),
            };
            if better {
                best = Some((room, leases, id));
            }
        }
        best.map(|(_, _, id)| id.clone())
    }

    fn would_exceed(&self, worker: &str, lease_throughput: f64) -> bool {
        let Some(w) = self.workers.get(worker) else {
            return true;
        };
        // Up to the top of the balanced band (average + threshold): a lease that brings the
        // target to the average exactly (2/2 from 3/1 on even leases) is not refused over a
        // rounding error, and a move never lifts the target out of the band.
        let band = 1.0 + f64::from(self.config.rebalance_threshold_percentage) / 100.0;
        w.load.iter().any(|(m, v)| {
            let after = v + self.share(m, lease_throughput);
            after > self.average.get(m).copied().unwrap_or(0.0) * band
                || w.range.get(m).is_some_and(|max| after > *max)
        })
    }

    fn apply(&mut self, lease_key: &str, to: &str) {
        let t = self.throughput.get(lease_key).copied().unwrap_or(0.0);
        let from = self.owner.get(lease_key).cloned().flatten();
        let shares: BTreeMap<String, f64> = self
            .average
            .keys()
            .map(|m| (m.clone(), self.share(m, t)))
            .collect();
        if let Some(from) = &from {
            if let Some(w) = self.workers.get_mut(from) {
                for (m, v) in &mut w.load {
                    *v = (*v - shares.get(m).copied().unwrap_or(0.0)).max(0.0);
                }
            }
            *self.worker_throughput.entry(from.clone()).or_default() -= t;
            let n = self.worker_leases.entry(from.clone()).or_default();
            *n = n.saturating_sub(1);
        }
        if let Some(w) = self.workers.get_mut(to) {
            for (m, v) in &mut w.load {
                *v += shares.get(m).copied().unwrap_or(0.0);
            }
        }
        *self.worker_throughput.entry(to.to_owned()).or_default() += t;
        *self.worker_leases.entry(to.to_owned()).or_default() += 1;
        self.owner.insert(lease_key.to_owned(), Some(to.to_owned()));
        self.moved.insert(lease_key.to_owned());
    }
}

/// Plans one assignment run at `now` (monotonic, for expiry) and `now_secs` (wall clock,
/// for the rows' freshness). `balance`: also balance load this run. `history` must have
/// observed `leases` already ([`LeaseHistory::observe`]). See the [module
/// documentation](self) for the rules.
pub fn plan(
    leases: &[Lease],
    rows: &[WorkerMetricStats],
    history: &LeaseHistory,
    config: &AssignmentConfig,
    balance: bool,
    now: Instant,
    now_secs: i64,
) -> AssignmentPlan {
    let mut active: BTreeMap<String, &WorkerMetricStats> = BTreeMap::new();
    for row in rows
        .iter()
        .filter(|r| r.is_active(now_secs, config.report_interval))
    {
        active.insert(row.worker_id.clone(), row);
    }
    let eligible: Vec<&Lease> = leases.iter().filter(|l| !l.is_finished()).collect();

    // Throughput: the lease's own, or the average of those that report one.
    let reported: Vec<f64> = eligible
        .iter()
        .filter_map(|l| l.throughput_kbps.filter(|t| t.is_finite() && *t >= 0.0))
        .collect();
    let average_lease_throughput = if reported.is_empty() {
        0.0
    } else {
        reported.iter().sum::<f64>() / reported.len() as f64
    };
    let workers_n = active.len().max(1) as f64;
    let mut p = Planner {
        config,
        workers: BTreeMap::new(),
        average: BTreeMap::new(),
        owner: BTreeMap::new(),
        throughput: BTreeMap::new(),
        worker_throughput: BTreeMap::new(),
        worker_leases: BTreeMap::new(),
        target_throughput: average_lease_throughput * eligible.len() as f64 / workers_n,
        target_leases: (eligible.len() as f64 / workers_n).floor().max(1.0),
        moved: BTreeSet::new(),
    };
    for lease in &eligible {
        let t = lease
            .throughput_kbps
            .filter(|t| t.is_finite() && *t >= 0.0)
            .unwrap_or(average_lease_throughput);
        let actual = lease
            .checkpoint_owner
            .clone()
            .or_else(|| lease.lease_owner.clone());
        p.throughput.insert(lease.lease_key.clone(), t);
        if let Some(owner) = &actual {
            *p.worker_throughput.entry(owner.clone()).or_default() += t;
            *p.worker_leases.entry(owner.clone()).or_default() += 1;
        }
        p.owner.insert(lease.lease_key.clone(), actual);
    }
    for (id, row) in &active {
        let (load, range) = if row.uses_default_metric() {
            let ratio = if p.target_throughput > 0.0 {
                p.worker_throughput.get(id).copied().unwrap_or(0.0) / p.target_throughput
            } else {
                p.worker_leases.get(id).copied().unwrap_or(0) as f64 / p.target_leases
            };
            // No operating range: 100 is the fleet's average here, not a limit, so only the
            // balanced band (average ± threshold) decides (a range at 100 would make every
            // worker above the average hot and moves would go back and forth).
            (
                BTreeMap::from([(metric::THROUGHPUT.to_owned(), ratio * 100.0)]),
                BTreeMap::new(),
            )
        } else {
            let load = row
                .metric_stats
                .keys()
                .filter_map(|m| Some((m.clone(), row.average(m, config.ema_alpha)?)))
                .collect();
            let range = row
                .operating_range
                .iter()
                .filter_map(|(m, r)| Some((m.clone(), *r.first()? as f64)))
                .collect();
            (load, range)
        };
        p.workers.insert(id.clone(), WorkerLoad { load, range });
    }
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for w in p.workers.values() {
        for (m, v) in &w.load {
            let e = sums.entry(m.clone()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    p.average = sums
        .into_iter()
        .map(|(m, (sum, n))| (m, sum / n as f64))
        .collect();

    let mut out = AssignmentPlan {
        active_workers: active.keys().cloned().collect(),
        ..AssignmentPlan::default()
    };

    // Unassigned, then expired and timed-out handoffs, longest unchanged first.
    let mut unassigned = Vec::new();
    let mut expired = Vec::new();
    for lease in &eligible {
        let key = lease.lease_key.as_str();
        if lease.checkpoint_owner.is_some() {
            // A handoff is waited for while its current owner renews (it does until it hands
            // over); one whose counter stood still for `lease_duration` lost its current
            // owner (crashed), and is expired as any lease, as the Java leader judges it.
            if history.handoff_timed_out(key, config, now) || history.is_expired(key, config, now) {
                expired.push((history.since(key), *lease, MoveReason::HandoffTimedOut));
            }
        } else if lease.lease_owner.is_none() {
            unassigned.push((None, *lease, MoveReason::Unassigned));
        } else if history.is_expired(key, config, now) {
            expired.push((history.since(key), *lease, MoveReason::Expired));
        }
    }
    expired.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| a.1.lease_key.cmp(&b.1.lease_key))
    });
    for (_, lease, reason) in unassigned.into_iter().chain(expired) {
        let current = p.owner.get(&lease.lease_key).cloned().flatten();
        let to = match reason {
            MoveReason::HandoffTimedOut => lease
                .lease_owner
                .clone()
                .filter(|next| p.workers.contains_key(next) && p.assignable(next))
                .or_else(|| p.best(lease.checkpoint_owner.as_deref())),
            _ => p.best(current.as_deref()),
        };
        let Some(to) = to else {
            out.unplaced.push(lease.lease_key.clone());
            continue;
        };
        p.apply(&lease.lease_key, &to);
        out.moves.push(Move {
            lease_key: lease.lease_key.clone(),
            from: lease.lease_owner.clone(),
            checkpoint_owner: lease.checkpoint_owner.clone(),
            to,
            kind: MoveKind::Assign,
            reason,
        });
    }

    if balance {
        balance_load(&mut p, &eligible, history, now, &mut out);
    }
    out
}

fn balance_load(
    p: &mut Planner<'_>,
    eligible: &[&Lease],
    history: &LeaseHistory,
    now: Instant,
    out: &mut AssignmentPlan,
) {
    let threshold = f64::from(p.config.rebalance_threshold_percentage) / 100.0;
    let dampening = f64::from(p.config.dampening_percentage) / 100.0;
    // Per metric: the throughput each over-loaded worker should give up.
    let mut chosen: Vec<(String, f64)> = Vec::new();
    let mut chosen_total = 0.0;
    for (m, average) in &p.average {
        let with: Vec<(&String, f64, bool)> = p
            .workers
            .iter()
            .filter_map(|(id, w)| {
                let v = *w.load.get(m)?;
                Some((id, v, w.range.get(m).is_some_and(|max| v > *max)))
            })
            .collect();
        let (upper, lower) = (average * (1.0 + threshold), average * (1.0 - threshold));
        if !with
            .iter()
            .any(|(_, v, hot)| *v > upper || *v < lower || *hot)
        {
            continue;
        }
        let mut sources: Vec<(&String, f64)> = with
            .iter()
            .filter(|(_, v, hot)| *v >= upper || *hot)
            .map(|(id, v, _)| (*id, *v))
            .collect();
        if sources.is_empty()
            && let Some((id, v, _)) = with
                .iter()
                .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        {
            sources.push((id, *v));
        }
        let mut takes = Vec::new();
        let mut total = 0.0;
        for (id, v) in sources {
            if v <= 0.0 {
                continue;
            }
            let take = p.worker_throughput.get(id).copied().unwrap_or(0.0)
                * ((v - average) / v)
                * dampening;
            total += take.max(0.0);
            takes.push((id.clone(), take));
        }
        if !takes.is_empty() && (chosen.is_empty() || total > chosen_total) {
            chosen = takes;
            chosen_total = total;
        }
    }
    chosen.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (source, take) in chosen {
        // The source's leases that may move: not finished, not in a handoff, not moved yet.
        let mut candidates: Vec<&Lease> = eligible
            .iter()
            .copied()
            .filter(|l| {
                l.checkpoint_owner.is_none()
                    && history.is_renewed_by_its_owner(&l.lease_key)
                    && !p.moved.contains(&l.lease_key)
                    && p.owner.get(&l.lease_key).cloned().flatten().as_deref()
                        == Some(source.as_str())
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let throughput = p.throughput.clone();
        let thr = |l: &Lease| throughput.get(&l.lease_key).copied().unwrap_or(0.0);
        candidates.sort_by(|a, b| {
            thr(b)
                .total_cmp(&thr(a))
                .then_with(|| a.lease_key.cmp(&b.lease_key))
        });
        let mut picked = Vec::new();
        if p.worker_throughput.get(&source).copied().unwrap_or(0.0) <= 0.0 {
            picked.extend(candidates.first().copied());
        } else {
            let mut remaining = take;
            for l in &candidates {
                if remaining - thr(l) > 0.0 {
                    remaining -= thr(l);
                    picked.push(*l);
                }
            }
            if picked.is_empty() && p.config.allow_throughput_overshoot {
                picked.extend(candidates.last().copied());
            }
        }
        for lease in picked {
            let Some(to) = p.best(Some(&source)) else {
                break;
            };
            if p.would_exceed(&to, thr(lease)) {
                break;
            }
            let held =
                lease.lease_owner.is_some() && !history.is_expired(&lease.lease_key, p.config, now);
            p.apply(&lease.lease_key, &to);
            out.moves.push(Move {
                lease_key: lease.lease_key.clone(),
                from: lease.lease_owner.clone(),
                checkpoint_owner: None,
                to,
                kind: if p.config.graceful_handoff && held {
                    MoveKind::Handoff
                } else {
                    MoveKind::Assign
                },
                reason: MoveReason::Balance,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use kcl_kpl::ExtendedSequenceNumber;

    use super::*;
    use crate::Clock;
    use crate::test_util::ManualClock;

    const F: Duration = Duration::from_secs(10);
    const NOW_SECS: i64 = 1_000_000;

    fn lease(key: &str, owner: Option<&str>, counter: u64, kbps: Option<f64>) -> Lease {
        let mut l = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
        l.lease_owner = owner.map(str::to_owned);
        l.lease_counter = counter;
        l.throughput_kbps = kbps;
        l
    }

    /// A leader's history that has seen every owned lease renewed once by its owner (its
    /// counter moved from one less), as after a run or two: balance may move them.
    fn renewing(leases: &[Lease], now: Instant) -> LeaseHistory {
        let before: Vec<Lease> = leases
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.lease_counter = l.lease_counter.wrapping_sub(1);
                l
            })
            .collect();
        let mut h = LeaseHistory::new();
        h.observe(&before, now);
        h.observe(leases, now);
        h
    }

    fn cpu(id: &str, values: &[f64]) -> WorkerMetricStats {
        WorkerMetricStats {
            worker_id: id.into(),
            last_update_time: Some(NOW_SECS - 5),
            metric_stats: BTreeMap::from([("C".into(), values.to_vec())]),
            operating_range: BTreeMap::from([("C".into(), vec![100])]),
            report_interval_ms: None,
        }
    }

    fn default_row(id: &str) -> WorkerMetricStats {
        WorkerMetricStats {
            worker_id: id.into(),
            last_update_time: Some(NOW_SECS - 5),
            metric_stats: BTreeMap::new(),
            operating_range: BTreeMap::new(),
            report_interval_ms: None,
        }
    }

    fn config() -> AssignmentConfig {
        AssignmentConfig::for_failover_time(F)
    }

    fn targets(plan: &AssignmentPlan) -> BTreeMap<String, String> {
        plan.moves
            .iter()
            .map(|m| (m.lease_key.clone(), m.to.clone()))
            .collect()
    }

    fn counts(plan: &AssignmentPlan) -> BTreeMap<String, usize> {
        let mut c = BTreeMap::new();
        for m in &plan.moves {
            *c.entry(m.to.clone()).or_default() += 1;
        }
        c
    }

    #[test]
    fn config_is_validated() {
        config().validate().unwrap();
        let mut bad = config();
        bad.dampening_percentage = 0;
        assert!(matches!(
            bad.validate(),
            Err(LeaseError::InvalidConfig {
                option: "dampening_percentage",
                ..
            })
        ));
        let mut bad = config();
        bad.ema_alpha = 1.5;
        assert!(bad.validate().is_err());
        let mut bad = config();
        bad.max_leases_for_worker = 0;
        assert!(bad.validate().is_err());
    }

    #[test]
    fn free_leases_spread_evenly_over_idle_workers() {
        let clock = ManualClock::new();
        let leases: Vec<Lease> = (0..8)
            .map(|i| lease(&format!("s{i}"), None, 0, None))
            .collect();
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        let rows = [
            cpu("a", &[0.0]),
            cpu("b", &[0.0]),
            default_row("c"),
            default_row("d"),
        ];
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 8);
        assert!(
            p.moves
                .iter()
                .all(|m| m.kind == MoveKind::Assign && m.reason == MoveReason::Unassigned)
        );
        assert_eq!(
            counts(&p).values().copied().collect::<Vec<_>>(),
            [2, 2, 2, 2]
        );
        assert_eq!(p.active_workers, ["a", "b", "c", "d"]);
        // The write is a fenced direct assignment of a free lease.
        assert_eq!(
            p.moves[0].write(),
            AssignmentWrite::Assign {
                lease_key: p.moves[0].lease_key.clone(),
                expected_owner: None,
                expected_checkpoint_owner: None,
                new_owner: p.moves[0].to.clone(),
                owner_switch: false,
            }
        );
    }

    #[test]
    fn only_active_workers_get_leases() {
        let clock = ManualClock::new();
        let leases = vec![lease("s0", None, 0, None), lease("s1", None, 0, None)];
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        let mut stale = cpu("stale", &[0.0]);
        stale.last_update_time = Some(NOW_SECS - 61);
        let failing = cpu("failing", &[10.0, -1.0]);
        let mut invalid = cpu("invalid", &[0.0]);
        invalid.operating_range.clear();
        let rows = [stale, failing, invalid, cpu("ok", &[50.0])];
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(p.active_workers, ["ok"]);
        assert!(p.moves.iter().all(|m| m.to == "ok"));
        // No active worker at all: everything is unplaced.
        let p = plan(&leases, &[], &h, &config(), false, clock.now(), NOW_SECS);
        assert!(p.moves.is_empty());
        assert_eq!(p.unplaced, ["s0", "s1"]);
    }

    #[test]
    fn unassigned_first_then_expired_longest_first_and_limits_hold() {
        let clock = ManualClock::new();
        let mut leases = vec![
            lease("old", Some("dead"), 5, Some(10.0)),
            lease("older", Some("dead"), 7, Some(10.0)),
            lease("live", Some("a"), 1, Some(10.0)),
            lease("free", None, 0, None),
        ];
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        clock.advance(Duration::from_secs(2));
        leases[0].lease_counter = 6; // "old" renewed once more, then its owner died
        leases[2].lease_counter = 2;
        h.observe(&leases, clock.now());
        clock.advance(F);
        leases[2].lease_counter = 3; // a keeps renewing "live"
        h.observe(&leases, clock.now());
        let mut cfg = config();
        cfg.max_leases_for_worker = 2;
        let rows = [cpu("a", &[20.0]), cpu("b", &[20.0])];
        let p = plan(&leases, &rows, &h, &cfg, false, clock.now(), NOW_SECS);
        // "older" stood still since t0 (12 s > 10 s); "old" only since t0 + 2 s (10 s, not > 10 s).
        let order: Vec<(&str, MoveReason)> = p
            .moves
            .iter()
            .map(|m| (m.lease_key.as_str(), m.reason))
            .collect();
        assert_eq!(
            order,
            [
                ("free", MoveReason::Unassigned),
                ("older", MoveReason::Expired)
            ]
        );
        clock.advance(Duration::from_millis(1));
        let p = plan(&leases, &rows, &h, &cfg, false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 3);
        // a holds "live" and may have 2: one more; b gets two; nothing is left for the third.
        assert_eq!(
            counts(&p),
            BTreeMap::from([("a".into(), 1), ("b".into(), 2)])
        );
        assert_eq!(
            p.moves[1].write(),
            AssignmentWrite::Assign {
                lease_key: "older".into(),
                expected_owner: Some("dead".into()),
                expected_checkpoint_owner: None,
                new_owner: p.moves[1].to.clone(),
                owner_switch: true,
            }
        );
        cfg.max_leases_for_worker = 1;
        let p = plan(&leases, &rows, &h, &cfg, false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.unplaced, ["older", "old"]);
    }

    #[test]
    fn a_just_assigned_lease_is_not_expired_while_its_assignee_picks_it_up() {
        let clock = ManualClock::new();
        let mut leases = vec![lease("s0", None, 3, None)];
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        let rows = [cpu("a", &[10.0]), cpu("b", &[10.0])];
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        let mv = p.moves[0].clone();
        // The write succeeded: the lease now has the new owner and counter 4.
        h.record(&mv, 4, clock.now());
        leases[0].lease_owner = Some(mv.to.clone());
        leases[0].lease_counter = 4;
        // The assignee has not renewed yet (it discovers the lease at its next GSI query).
        for step in [F, Duration::from_secs(5), Duration::from_millis(4_999)] {
            clock.advance(step);
            h.observe(&leases, clock.now());
            let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
            assert!(
                p.moves.is_empty(),
                "judged expired {:?} after assignment",
                clock.elapsed()
            );
        }
        // Past lease_duration + pickup_grace without a renewal, it is expired.
        clock.advance(Duration::from_millis(2));
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].reason, MoveReason::Expired);
        assert_ne!(
            p.moves[0].to, mv.to,
            "never back to the owner that let it expire"
        );
        // Once renewed, the normal lease duration applies again.
        leases[0].lease_counter = 5;
        h.observe(&leases, clock.now());
        clock.advance(F + Duration::from_millis(1));
        assert!(h.is_expired("s0", &config(), clock.now()));
    }

    #[test]
    fn a_just_assigned_lease_is_not_handed_off_before_its_assignee_renewed_it() {
        let clock = ManualClock::new();
        // a holds 6 leases at 90 % CPU, b 2 at 10 %: balance moves one lease from a to b.
        let mut leases = Vec::new();
        for i in 0..6 {
            leases.push(lease(&format!("a{i}"), Some("a"), 1, Some(100.0)));
        }
        for i in 0..2 {
            leases.push(lease(&format!("b{i}"), Some("b"), 1, Some(100.0)));
        }
        let rows = [cpu("a", &[90.0]), cpu("b", &[10.0])];
        let mut h = renewing(&leases, clock.now());
        let moved = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS).moves;
        assert_eq!(moved.len(), 1, "{moved:?}");
        // Now every lease of a was just assigned to it by this leader, none renewed since.
        for l in leases
            .iter_mut()
            .filter(|l| l.lease_owner.as_deref() == Some("a"))
        {
            let mv = Move {
                lease_key: l.lease_key.clone(),
                from: None,
                checkpoint_owner: None,
                to: "a".into(),
                kind: MoveKind::Assign,
                reason: MoveReason::Unassigned,
            };
            l.lease_counter = 2;
            h.record(&mv, 2, clock.now());
        }
        h.observe(&leases, clock.now());
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        assert!(p.moves.is_empty(), "moved before pick-up: {:?}", p.moves);
        // Once a renewed them, balance moves one again.
        for l in leases
            .iter_mut()
            .filter(|l| l.lease_owner.as_deref() == Some("a"))
        {
            l.lease_counter = 3;
        }
        clock.advance(Duration::from_secs(1));
        h.observe(&leases, clock.now());
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1, "{:?}", p.moves);
        // That handoff is written and then completed by a (the counter moves under b's
        // name): b has not renewed the lease yet, so it is not moved again.
        let mv = p.moves[0].clone();
        h.record(&mv, 3, clock.now());
        let moved = leases
            .iter_mut()
            .find(|l| l.lease_key == mv.lease_key)
            .unwrap();
        moved.lease_owner = Some("b".into());
        moved.lease_counter = 4;
        clock.advance(Duration::from_secs(1));
        h.observe(&leases, clock.now());
        assert!(!h.is_renewed_by_its_owner(&mv.lease_key));
        let moved = leases
            .iter_mut()
            .find(|l| l.lease_key == mv.lease_key)
            .unwrap();
        moved.lease_counter = 5;
        clock.advance(Duration::from_secs(1));
        h.observe(&leases, clock.now());
        assert!(h.is_renewed_by_its_owner(&mv.lease_key));
    }

    #[test]
    fn a_new_leader_judges_no_owned_lease_expired_at_first() {
        let clock = ManualClock::new();
        let leases = vec![
            lease("s0", Some("a"), 9, None),
            lease("s1", Some("gone"), 4, None),
        ];
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        let rows = [cpu("a", &[10.0]), cpu("b", &[10.0])];
        assert!(
            plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS)
                .moves
                .is_empty()
        );
        clock.advance(F + Duration::from_millis(1));
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(targets(&p).len(), 2);
        assert_eq!(targets(&p)["s0"], "b", "a's lease expired: to someone else");
    }

    #[test]
    fn handoffs_in_flight_wait_then_go_to_their_next_owner() {
        let clock = ManualClock::new();
        let mut l = lease("s0", Some("b"), 2, Some(5.0));
        l.checkpoint_owner = Some("a".into());
        let mut leases = vec![l];
        let mut h = renewing(&leases, clock.now());
        let rows = [cpu("a", &[10.0]), cpu("b", &[10.0]), cpu("c", &[0.0])];
        // The current owner keeps renewing while it hands over (every 3 s).
        for _ in 0..13 {
            clock.advance(Duration::from_secs(3));
            leases[0].lease_counter += 1;
            h.observe(&leases, clock.now());
        }
        clock.advance(Duration::from_secs(1));
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        assert!(p.moves.is_empty(), "30 s + 10 s not passed yet");
        clock.advance(Duration::from_millis(1));
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1);
        let mv = &p.moves[0];
        assert_eq!(
            (mv.to.as_str(), mv.reason),
            ("b", MoveReason::HandoffTimedOut)
        );
        assert_eq!(
            mv.write(),
            AssignmentWrite::Assign {
                lease_key: "s0".into(),
                expected_owner: Some("b".into()),
                expected_checkpoint_owner: Some("a".into()),
                new_owner: "b".into(),
                owner_switch: false,
            }
        );
    }

    #[test]
    fn a_handoff_whose_current_owner_stopped_renewing_expires_after_the_lease_duration() {
        let clock = ManualClock::new();
        let mut l = lease("s0", Some("b"), 2, Some(5.0));
        l.checkpoint_owner = Some("a".into());
        let leases = vec![l];
        let h = renewing(&leases, clock.now());
        let rows = [cpu("b", &[10.0]), cpu("c", &[0.0])];
        clock.advance(F);
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert!(
            p.moves.is_empty(),
            "not expired before lease_duration: {:?}",
            p.moves
        );
        clock.advance(Duration::from_millis(1));
        let p = plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1, "{:?}", p.moves);
        let mv = &p.moves[0];
        assert_eq!(
            (mv.to.as_str(), mv.kind, mv.reason),
            ("b", MoveKind::Assign, MoveReason::HandoffTimedOut),
            "to its intended next owner, directly"
        );
    }

    #[test]
    fn balance_moves_throughput_from_hot_to_cold_workers_by_handoff() {
        let clock = ManualClock::new();
        // a: 6 leases at 90 % CPU; b: 2 leases at 10 % CPU. All leases 100 KB/s.
        let mut leases = Vec::new();
        for i in 0..6 {
            leases.push(lease(&format!("a{i}"), Some("a"), 1, Some(100.0)));
        }
        for i in 0..2 {
            leases.push(lease(&format!("b{i}"), Some("b"), 1, Some(100.0)));
        }
        let h = renewing(&leases, clock.now());
        let rows = [cpu("a", &[90.0]), cpu("b", &[10.0])];
        assert!(
            plan(&leases, &rows, &h, &config(), false, clock.now(), NOW_SECS)
                .moves
                .is_empty(),
            "no balancing unless asked"
        );
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        // average 50: a gives up 600 × (90-50)/90 × 60 % = 160 KB/s, in leases that fit: one.
        assert_eq!(p.moves.len(), 1);
        let mv = &p.moves[0];
        assert_eq!((mv.from.as_deref(), mv.to.as_str()), (Some("a"), "b"));
        assert_eq!(
            (mv.kind, mv.reason),
            (MoveKind::Handoff, MoveReason::Balance)
        );
        assert_eq!(
            mv.write(),
            AssignmentWrite::Handoff {
                lease_key: mv.lease_key.clone(),
                current_owner: "a".into(),
                new_owner: "b".into(),
            }
        );
        // Without graceful handoff, a direct assignment.
        let mut cfg = config();
        cfg.graceful_handoff = false;
        let p = plan(&leases, &rows, &h, &cfg, true, clock.now(), NOW_SECS);
        assert_eq!(p.moves[0].kind, MoveKind::Assign);
    }

    #[test]
    fn balance_leaves_a_fleet_within_the_threshold_alone() {
        let clock = ManualClock::new();
        let leases: Vec<Lease> = (0..4)
            .map(|i| {
                lease(
                    &format!("s{i}"),
                    Some(if i < 2 { "a" } else { "b" }),
                    1,
                    Some(50.0),
                )
            })
            .collect();
        let h = renewing(&leases, clock.now());
        let rows = [cpu("a", &[52.0]), cpu("b", &[48.0])];
        assert!(
            plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS)
                .moves
                .is_empty()
        );
    }

    #[test]
    fn default_metric_workers_balance_by_throughput() {
        let clock = ManualClock::new();
        // Java workers with empty metric maps: a holds 3 heavy leases, b one light one.
        let leases = vec![
            lease("h0", Some("a"), 1, Some(300.0)),
            lease("h1", Some("a"), 1, Some(300.0)),
            lease("h2", Some("a"), 1, Some(300.0)),
            lease("l0", Some("b"), 1, Some(100.0)),
        ];
        let h = renewing(&leases, clock.now());
        let rows = [default_row("a"), default_row("b")];
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        // target 500 per worker: a at 180 %, b at 20 %; a gives 900 × (180-100)/180 × 60 % = 240:
        // no 300 lease fits, so the smallest moves (overshoot allowed).
        assert_eq!(p.moves.len(), 1);
        assert_eq!(
            (p.moves[0].from.as_deref(), p.moves[0].to.as_str()),
            (Some("a"), "b")
        );
        let mut cfg = config();
        cfg.allow_throughput_overshoot = false;
        assert!(
            plan(&leases, &rows, &h, &cfg, true, clock.now(), NOW_SECS)
                .moves
                .is_empty()
        );
    }

    #[test]
    fn default_metric_workers_reach_an_even_split_and_stay_there() {
        let clock = ManualClock::new();
        let rows = [default_row("j"), default_row("r")];
        // 3/1 on even leases: one lease moves, and the target lands on the average exactly.
        let mut leases = vec![
            lease("s0", Some("j"), 5, Some(20.0)),
            lease("s1", Some("r"), 5, Some(20.0)),
            lease("s2", Some("r"), 5, Some(20.0)),
            lease("s3", Some("r"), 5, Some(20.0)),
        ];
        let h = renewing(&leases, clock.now());
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        assert_eq!(p.moves.len(), 1, "{:?}", p.moves);
        assert_eq!(
            (p.moves[0].from.as_deref(), p.moves[0].to.as_str()),
            (Some("r"), "j")
        );
        // 2/2 with figures a few percent apart (a burst after a handoff): nothing moves back.
        leases[1].lease_owner = Some("j".into());
        leases[0].throughput_kbps = Some(21.0);
        let h = renewing(&leases, clock.now());
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        assert!(p.moves.is_empty(), "{:?}", p.moves);
    }

    #[test]
    fn without_throughput_figures_leases_are_balanced_by_count() {
        let clock = ManualClock::new();
        let leases: Vec<Lease> = (0..6)
            .map(|i| lease(&format!("s{i}"), Some("a"), 1, None))
            .collect();
        let h = renewing(&leases, clock.now());
        let rows = [default_row("a"), default_row("b")];
        let p = plan(&leases, &rows, &h, &config(), true, clock.now(), NOW_SECS);
        // No throughput anywhere: a worker reporting none gives up one lease per run.
        assert_eq!(p.moves.len(), 1);
        assert_eq!(p.moves[0].to, "b");
    }

    #[test]
    fn finished_leases_are_never_assigned() {
        let clock = ManualClock::new();
        let mut done = lease("done", None, 1, None);
        done.checkpoint = ExtendedSequenceNumber::SHARD_END;
        let leases = vec![done, lease("open", None, 0, None)];
        let mut h = LeaseHistory::new();
        h.observe(&leases, clock.now());
        let p = plan(
            &leases,
            &[cpu("a", &[1.0])],
            &h,
            &config(),
            true,
            clock.now(),
            NOW_SECS,
        );
        assert_eq!(targets(&p), BTreeMap::from([("open".into(), "a".into())]));
    }

    #[test]
    fn history_forgets_deleted_leases_and_restarts_on_a_new_handoff() {
        let clock = ManualClock::new();
        let mut l = lease("s0", Some("b"), 1, None);
        let mut h = LeaseHistory::new();
        h.observe(std::slice::from_ref(&l), clock.now());
        l.checkpoint_owner = Some("a".into());
        clock.advance(Duration::from_secs(100));
        h.observe(std::slice::from_ref(&l), clock.now());
        assert!(
            !h.handoff_timed_out("s0", &config(), clock.now()),
            "the handoff was first seen now"
        );
        h.observe(&[], clock.now());
        assert!(!h.is_expired("s0", &config(), clock.now() + Duration::from_secs(1000)));
    }
    #[test]
    fn invariants_hold_on_random_fleets() {
        use crate::{RandomSource, SeededRandom};
        for seed in 0..300u64 {
            let r = SeededRandom::new(seed);
            let clock = ManualClock::new();
            let workers: Vec<String> = (0..1 + r.below(6)).map(|i| format!("w{i}")).collect();
            let mut rows = Vec::new();
            for w in &workers {
                let mut row = match r.below(3) {
                    0 => default_row(w),
                    _ => cpu(w, &[r.below(101) as f64, r.below(101) as f64]),
                };
                match r.below(8) {
                    0 => row.last_update_time = Some(NOW_SECS - 120), // stale
                    1 => {
                        row.metric_stats.insert("C".into(), vec![-1.0]); // failing
                        row.operating_range.insert("C".into(), vec![100]);
                    }
                    _ => {}
                }
                rows.push(row);
            }
            let owners: Vec<Option<String>> = workers
                .iter()
                .cloned()
                .map(Some)
                .chain([None, Some("dead".to_owned())])
                .collect();
            let mut leases = Vec::new();
            for i in 0..r.below(40) {
                let owner = owners[r.below(owners.len() as u64) as usize].clone();
                let kbps = (r.below(4) > 0).then(|| r.below(1000) as f64);
                let mut l = lease(&format!("s{i:03}"), owner.as_deref(), r.below(50), kbps);
                if r.below(10) == 0 {
                    l.checkpoint = ExtendedSequenceNumber::SHARD_END;
                }
                if owner.is_some() && r.below(10) == 0 {
                    l.checkpoint_owner = owners[r.below(workers.len() as u64) as usize].clone();
                }
                leases.push(l);
            }
            let mut h = LeaseHistory::new();
            h.observe(&leases, clock.now());
            clock.advance(Duration::from_secs(r.below(60)));
            // Some leases were renewed meanwhile.
            for l in &mut leases {
                if r.below(2) == 0 {
                    l.lease_counter += 1;
                }
            }
            h.observe(&leases, clock.now());
            let mut cfg = config();
            if r.below(3) == 0 {
                cfg.max_leases_for_worker = 1 + r.below(8) as usize;
            }
            let p = plan(
                &leases,
                &rows,
                &h,
                &cfg,
                r.below(2) == 0,
                clock.now(),
                NOW_SECS,
            );

            let active: BTreeSet<&str> = p.active_workers.iter().map(String::as_str).collect();
            let by_key: BTreeMap<&str, &Lease> =
                leases.iter().map(|l| (l.lease_key.as_str(), l)).collect();
            let mut moved = BTreeSet::new();
            for m in &p.moves {
                let l = by_key[m.lease_key.as_str()];
                assert!(
                    active.contains(m.to.as_str()),
                    "seed {seed}: to inactive {m:?}"
                );
                assert!(!l.is_finished(), "seed {seed}: finished lease moved {m:?}");
                assert!(
                    moved.insert(m.lease_key.as_str()),
                    "seed {seed}: moved twice {m:?}"
                );
                let actual = l.checkpoint_owner.as_ref().or(l.lease_owner.as_ref());
                if m.reason != MoveReason::HandoffTimedOut {
                    assert_ne!(actual, Some(&m.to), "seed {seed}: to its own owner {m:?}");
                }
                if m.reason == MoveReason::Balance {
                    assert!(
                        h.is_renewed_by_its_owner(&m.lease_key),
                        "seed {seed}: balanced a lease its owner was not seen renewing {m:?}"
                    );
                }
                if m.kind == MoveKind::Handoff {
                    assert!(
                        l.lease_owner.is_some() && l.checkpoint_owner.is_none(),
                        "seed {seed}: {m:?}"
                    );
                }
                assert_eq!(m.from, l.lease_owner, "seed {seed}: from as listed");
                if l.checkpoint_owner.is_some() {
                    assert_eq!(m.reason, MoveReason::HandoffTimedOut, "seed {seed}: {m:?}");
                }
            }
            // Every free lease is moved or reported unplaced.
            for l in leases
                .iter()
                .filter(|l| l.lease_owner.is_none() && !l.is_finished())
            {
                assert!(
                    moved.contains(l.lease_key.as_str()) || p.unplaced.contains(&l.lease_key),
                    "seed {seed}: free lease {} forgotten",
                    l.lease_key
                );
            }
            // No worker ends above the lease limit through our moves.
            let mut after: BTreeMap<String, usize> = BTreeMap::new();
            for l in leases.iter().filter(|l| !l.is_finished()) {
                let owner = p
                    .moves
                    .iter()
                    .find(|m| m.lease_key == l.lease_key)
                    .map(|m| m.to.clone())
                    .or_else(|| l.checkpoint_owner.clone().or_else(|| l.lease_owner.clone()));
                if let Some(o) = owner {
                    *after.entry(o).or_default() += 1;
                }
            }
            for m in &p.moves {
                let before = leases
                    .iter()
                    .filter(|l| {
                        !l.is_finished()
                            && l.checkpoint_owner.as_ref().or(l.lease_owner.as_ref()) == Some(&m.to)
                    })
                    .count();
                assert!(
                    after[&m.to] <= cfg.max_leases_for_worker.max(before),
                    "seed {seed}: {} has {} leases, limit {}",
                    m.to,
                    after[&m.to],
                    cfg.max_leases_for_worker
                );
            }
        }
    }
    #[test]
    fn writes_are_fenced_on_the_owners_read_and_change_what_the_java_kcl_changes() {
        let mut l = lease("s0", Some("a"), 7, Some(1.0));
        let handoff = AssignmentWrite::Handoff {
            lease_key: "s0".into(),
            current_owner: "a".into(),
            new_owner: "b".into(),
        };
        assert_eq!(handoff.lease_key(), "s0");
        assert!(handoff.condition_holds(Some(&l)));
        assert!(!handoff.condition_holds(None), "the lease must exist");
        handoff.apply(&mut l);
        assert_eq!(
            (
                l.lease_owner.as_deref(),
                l.checkpoint_owner.as_deref(),
                l.lease_counter
            ),
            (Some("b"), Some("a"), 7)
        );
        assert!(
            !handoff.condition_holds(Some(&l)),
            "a handoff in flight is not started again"
        );
        // After the timeout the leader assigns directly, fenced on both owners it read.
        let assign = AssignmentWrite::Assign {
            lease_key: "s0".into(),
            expected_owner: Some("b".into()),
            expected_checkpoint_owner: Some("a".into()),
            new_owner: "b".into(),
            owner_switch: false,
        };
        let mut other = l.clone();
        other.checkpoint_owner = None; // the old owner completed the handoff meanwhile
        assert!(!assign.condition_holds(Some(&other)));
        assert!(assign.condition_holds(Some(&l)));
        assign.apply(&mut l);
        assert_eq!(
            (
                l.lease_owner.as_deref(),
                l.checkpoint_owner.as_deref(),
                l.lease_counter
            ),
            (Some("b"), None, 8)
        );
        assert_eq!(l.owner_switches_since_checkpoint, 0);
        // A free lease: expected owner absent; taking it counts an owner switch only when
        // there was an owner.
        let mut free = lease("s1", None, 0, None);
        let take = AssignmentWrite::Assign {
            lease_key: "s1".into(),
            expected_owner: None,
            expected_checkpoint_owner: None,
            new_owner: "c".into(),
            owner_switch: false,
        };
        assert!(take.condition_holds(Some(&free)));
        take.apply(&mut free);
        assert!(!take.condition_holds(Some(&free)), "someone took it first");
        assert_eq!(
            (free.lease_owner.as_deref(), free.lease_counter),
            (Some("c"), 1)
        );
    }
}
