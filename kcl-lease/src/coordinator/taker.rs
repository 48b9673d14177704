//! The taker's decisions, kept free of I/O so they can be tested on their own: local
//! expiry bookkeeping ([`ExpiryTracker`]) and what to take or steal ([`plan_take`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::events::TakeReport;
use super::join::join_all_limited;
use super::{LeaseCoordinator, MAX_CONCURRENT_WRITES, lock};
use crate::{Lease, LeaseError, RandomSource};

/// What this worker last saw of one lease, and since when.
#[derive(Clone, Debug)]
struct Seen {
    counter: u64,
    owner: Option<String>,
    /// The `checkpointOwner` seen (a graceful handoff in flight).
    checkpoint_owner: Option<String>,
    finished: bool,
    /// This worker's clock when it first saw `counter` (and `owner`).
    since: Instant,
    /// This worker's clock when it first saw `owner` and `checkpoint_owner` (whatever the
    /// counter): how long a handoff has been in flight.
    owners_since: Instant,
}

/// Local expiry bookkeeping: for every lease key, the counter and owner last seen and the
/// local time when they were first seen. Timestamps written by other hosts are never used.
#[derive(Debug, Default)]
pub(crate) struct ExpiryTracker {
    seen: HashMap<String, Seen>,
}

impl ExpiryTracker {
    /// Records a listing of the whole table taken at `now`; forgets keys no longer listed.
    pub(crate) fn observe(&mut self, leases: &[Lease], now: Instant) {
        let mut next = HashMap::with_capacity(leases.len());
        for lease in leases {
            let owners_since = match self.seen.get(&lease.lease_key) {
                Some(seen)
                    if seen.owner == lease.lease_owner
                        && seen.checkpoint_owner == lease.checkpoint_owner =>
                {
                    seen.owners_since
                }
                _ => now,
            };
            let since = match self.seen.get(&lease.lease_key) {
                Some(seen)
                    if seen.counter == lease.lease_counter
                        && seen.owner == lease.lease_owner
                        && seen.checkpoint_owner == lease.checkpoint_owner =>
                {
                    seen.since
                }
                _ => now,
            };
            next.insert(
                lease.lease_key.clone(),
                Seen {
                    counter: lease.lease_counter,
                    owner: lease.lease_owner.clone(),
                    checkpoint_owner: lease.checkpoint_owner.clone(),
                    finished: lease.is_finished(),
                    since,
                    owners_since,
                },
            );
        }
        self.seen = next;
    }

    /// Records one row this worker just wrote at `now` (a handoff it initiated: its timer
    /// starts at the initiation, not at the next listing).
    pub(crate) fn record(&mut self, lease: &Lease, now: Instant) {
        self.seen.insert(
            lease.lease_key.clone(),
            Seen {
                counter: lease.lease_counter,
                owner: lease.lease_owner.clone(),
                checkpoint_owner: lease.checkpoint_owner.clone(),
                finished: lease.is_finished(),
                since: now,
                owners_since: now,
            },
        );
    }

    /// How long the lease's counter has been unchanged on this worker's clock (zero for a
    /// lease never observed, or observed with another counter).
    pub(crate) fn unchanged_for(&self, lease: &Lease, now: Instant) -> Duration {
        match self.seen.get(&lease.lease_key) {
            Some(seen) if seen.counter == lease.lease_counter => {
                now.saturating_duration_since(seen.since)
            }
            _ => Duration::ZERO,
        }
    }

    /// How long the lease's `leaseOwner` and `checkpointOwner` have been as they are now on
    /// this worker's clock, whatever the counter did (zero for a lease never observed so).
    pub(crate) fn owners_unchanged_for(&self, lease: &Lease, now: Instant) -> Duration {
        match self.seen.get(&lease.lease_key) {
            Some(seen)
                if seen.owner == lease.lease_owner
                    && seen.checkpoint_owner == lease.checkpoint_owner =>
            {
                now.saturating_duration_since(seen.owners_since)
            }
            _ => Duration::ZERO,
        }
    }

    /// When the lease was first seen at its current counter (`now` if never).
    fn since(&self, lease: &Lease, now: Instant) -> Instant {
        match self.seen.get(&lease.lease_key) {
            Some(seen) if seen.counter == lease.lease_counter => seen.since,
            _ => now,
        }
    }

    /// The earliest future moment at which a lease owned by another worker, or in a
    /// graceful handoff (not finished, not in `held`), becomes expired, if its counter (for a
    /// handoff: its owners) stays as last seen. A lease in a handoff expires after
    /// `handoff_expiry`, any other after `failover_time`.
    pub(crate) fn next_expiry(
        &self,
        me: &str,
        held: &HashSet<String>,
        failover_time: Duration,
        handoff_expiry: Duration,
        now: Instant,
    ) -> Option<Instant> {
        self.seen
            .iter()
            .filter(|(key, seen)| {
                !seen.finished
                    && !held.contains(*key)
                    && (seen.checkpoint_owner.is_some()
                        || seen.owner.as_deref().is_some_and(|owner| owner != me))
            })
            .filter_map(|(_, seen)| {
                if seen.checkpoint_owner.is_some() {
                    seen.owners_since.checked_add(handoff_expiry)
                } else {
                    seen.since.checked_add(failover_time)
                }
            })
            .filter(|at| *at > now)
            .min()
    }
}

/// The taker's decision for one pass.
#[derive(Debug, Default)]
pub(crate) struct TakePlan {
    /// Distinct owners of live leases (other workers) plus this worker.
    pub(crate) workers: usize,
    /// Leases this worker should hold.
    pub(crate) target: usize,
    /// How many more it should take now (free leases and handoffs together).
    pub(crate) needed: usize,
    /// How many free leases to take now (at most `needed`).
    pub(crate) take: usize,
    /// Free leases, best first. The caller takes `take` of them, moving down the list
    /// when a take fails.
    pub(crate) candidates: Vec<Lease>,
    /// Leases of other workers to ask for by a graceful handoff (only when too few are
    /// free), spread over the most loaded workers.
    pub(crate) handoffs: Vec<Lease>,
    /// Handoffs to this worker that did not complete within `handoff_timeout`: this worker
    /// completes them itself.
    pub(crate) complete: Vec<Lease>,
    /// Handoffs to this worker in flight (`complete` included).
    pub(crate) incoming: usize,
}

/// Inputs of [`plan_take`] besides the table listing.
pub(crate) struct PlanInput<'a> {
    pub(crate) me: &'a str,
    /// Keys held by this worker.
    pub(crate) held: &'a HashSet<String>,
    pub(crate) failover_time: Duration,
    /// How long a lease in a graceful handoff must stay unchanged to be expired.
    pub(crate) handoff_expiry: Duration,
    /// How long a handoff to this worker may take before this worker completes it.
    pub(crate) handoff_timeout: Duration,
    pub(crate) max_leases_for_worker: usize,
    /// The fleet discovery pass: take (or ask for) at most one lease.
    pub(crate) discovery: bool,
    pub(crate) now: Instant,
}

/// Decides what to take, what to ask for by a handoff and which handoffs to complete (the
/// rules are in the module docs of the coordinator).
pub(crate) fn plan_take(
    leases: &[Lease],
    tracker: &ExpiryTracker,
    input: &PlanInput<'_>,
    random: &dyn RandomSource,
) -> TakePlan {
    let me = input.me;
    let active: Vec<&Lease> = leases.iter().filter(|l| !l.is_finished()).collect();
    // A lease in a graceful handoff (a `checkpointOwner`) expires later than the others,
    // and only once its owners stood still that long (its current owner may renew it all
    // along, a Java KCL 2.x worker not knowing the protocol say).
    let expired = |lease: &Lease| {
        if lease.is_in_handoff() {
            tracker.owners_unchanged_for(lease, input.now) >= input.handoff_expiry
        } else {
            tracker.unchanged_for(lease, input.now) >= input.failover_time
        }
    };

    // Live leases by the worker they count for; a lease in a handoff counts for its next
    // owner.
    let mut by_owner: BTreeMap<&str, Vec<&Lease>> = BTreeMap::new();
    let mut candidates: Vec<(Instant, u64, &Lease)> = Vec::new();
    let mut mine = 0usize;
    let mut incoming = 0usize;
    let mut complete = Vec::new();
    for lease in &active {
        let handoff_from_me = lease.checkpoint_owner.as_deref() == Some(me)
            && lease.lease_owner.as_deref() != Some(me);
        if input.held.contains(&lease.lease_key) && !handoff_from_me {
            mine += 1;
            continue;
        }
        if lease.is_in_handoff() && !expired(lease) {
            match lease
                .lease_owner
                .as_deref()
                .or(lease.checkpoint_owner.as_deref())
            {
                // Handed to this worker: it counts as this worker's, and is completed here
                // when its current owner took too long.
                Some(owner) if owner == me && !input.held.contains(&lease.lease_key) => {
                    mine += 1;
                    incoming += 1;
                    // Too slow, or its current owner died (the counter stood still for the
                    // failover time: nobody renews it).
                    if tracker.owners_unchanged_for(lease, input.now) >= input.handoff_timeout
                        || tracker.unchanged_for(lease, input.now) >= input.failover_time
                    {
                        complete.push((*lease).clone());
                    }
                }
                Some(owner) if owner != me => by_owner.entry(owner).or_default().push(lease),
                _ => {}
            }
            continue;
        }
        match lease.lease_owner.as_deref() {
            Some(owner) if owner != me && !expired(lease) => {
                by_owner.entry(owner).or_default().push(lease);
            }
            // Unowned, expired, or owned by this worker id but not held here (a previous
            // incarnation of this worker, or a lease just handed over to it): free.
            _ => candidates.push((tracker.since(lease, input.now), random.next_u64(), lease)),
        }
    }

    let workers = by_owner.len().saturating_add(1);
    let target = active
        .len()
        .div_ceil(workers)
        .min(input.max_leases_for_worker);
    let needed = target.saturating_sub(mine);
    // The discovery pass takes one lease at most: enough to be seen by the others.
    let budget = if input.discovery {
        needed.min(1)
    } else {
        needed
    };

    // Longest unchanged first; equal ages in random order so that workers starting together
    // do not all race for the same leases.
    candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)));
    let candidates: Vec<Lease> = candidates.into_iter().map(|(_, _, l)| l.clone()).collect();
    let take = budget.min(candidates.len());

    let mut plan = TakePlan {
        workers,
        target,
        needed,
        take,
        candidates,
        handoffs: Vec::new(),
        complete,
        incoming,
    };
    let mut short = budget - take;
    if short == 0 {
        return plan;
    }
    // A live owner writes each lease at least every `failover_time / 2` (renewals every third
    // of it, skipped at most once after another write), give or take the length of a
    // renewal round. A lease unchanged for three quarters of the failover time is about to
    // expire: wait for it rather than move leases on a view that still counts a dead worker.
    let suspicious = by_owner.values().flatten().any(|lease| {
        if lease.is_in_handoff() {
            tracker.owners_unchanged_for(lease, input.now) >= input.handoff_expiry * 3 / 4
        } else {
            tracker.unchanged_for(lease, input.now) >= input.failover_time * 3 / 4
        }
    });
    if suspicious {
        return plan;
    }

    // The excess of the workers above the target is shared out among the workers below it
    // (this one included) in a way every one of them computes alike from the same listing,
    // so that workers asking at the same time ask different workers and no worker is taken
    // below the target: the excess as slots, round-robin over the loaded workers in id
    // order; the shortfalls as runs of slots, the workers in id order; this worker asks
    // for the slots of its run. Leases in a handoff are never asked for again.
    // Other workers below the target count only while they are seen asking (a handoff to
    // them in flight): one that does not ask (capped by its `max_leases_for_worker`, about
    // to expire, a Java KCL 2.x worker) would otherwise keep its share reserved.
    let asking: HashSet<&str> = by_owner
        .values()
        .flatten()
        .filter(|l| l.is_in_handoff())
        .filter_map(|l| l.lease_owner.as_deref())
        .collect();
    let mut donors: Vec<(usize, Vec<&Lease>)> = Vec::with_capacity(by_owner.len());
    let mut short_of: Vec<(&str, usize)> = vec![(me, short)];
    for (owner, leases) in by_owner {
        let load = leases.len();
        if load < target && asking.contains(owner) {
            short_of.push((owner, target - load));
        }
        // In key order: the k-th slot of a worker is its k-th lease for everyone.
        let mut pool: Vec<&Lease> = leases.into_iter().filter(|l| !l.is_in_handoff()).collect();
        pool.sort_unstable_by(|a, b| a.lease_key.cmp(&b.lease_key));
        donors.push((load, pool));
    }
    short_of.sort_unstable();
    let mut left: Vec<usize> = donors
        .iter()
        .map(|(load, pool)| load.saturating_sub(target).min(pool.len()))
        .collect();
    let mut slots: Vec<usize> = Vec::new();
    while left.iter().any(|l| *l > 0) {
        for (donor, l) in left.iter_mut().enumerate() {
            if *l > 0 {
                *l -= 1;
                slots.push(donor);
            }
        }
    }
    let before: usize = short_of
        .iter()
        .take_while(|(owner, _)| *owner != me)
        .map(|(_, n)| *n)
        .sum();
    let wanted: usize = short_of.iter().map(|(_, n)| *n).sum();
    let mut planned = mine + take;
    let mut used = vec![0usize; donors.len()];
    for (i, donor) in slots.iter().enumerate().take(wanted) {
        let (Some((load, pool)), Some(used)) = (donors.get_mut(*donor), used.get_mut(*donor))
        else {
            continue;
        };
        // Slots of other workers' runs: their load is as good as moved.
        *load -= 1;
        let k = *used;
        *used += 1;
        if (before..before + short).contains(&i)
            && let Some(lease) = pool.get(k)
        {
            plan.handoffs.push((*lease).clone());
            planned += 1;
        }
    }
    // The leases of the slots are spoken for.
    for ((_, pool), used) in donors.iter_mut().zip(&used) {
        pool.drain(..(*used).min(pool.len()));
    }
    short = budget.saturating_sub(planned.saturating_sub(mine));
    // What remains (the slots ran out): one lease at a time from the most loaded worker
    // (ties at random), never taking a worker below the target, and from a worker at the
    // target only while this one is at least two short of it.
    while short > 0 {
        let Some(max_load) = donors
            .iter()
            .filter(|(_, pool)| !pool.is_empty())
            .map(|(load, _)| *load)
            .max()
        else {
            break;
        };
        if !(max_load > target || (max_load == target && planned + 2 <= target)) {
            break;
        }
        let loaded: Vec<usize> = donors
            .iter()
            .enumerate()
            .filter(|(_, (load, pool))| *load == max_load && !pool.is_empty())
            .map(|(i, _)| i)
            .collect();
        let pick = usize::try_from(random.below(loaded.len() as u64)).unwrap_or(0);
        let Some((load, pool)) = loaded.get(pick).and_then(|&i| donors.get_mut(i)) else {
            break;
        };
        let index = usize::try_from(random.below(pool.len() as u64)).unwrap_or(0);
        plan.handoffs.push(pool.swap_remove(index).clone());
        *load -= 1;
        planned += 1;
        short -= 1;
    }
    plan
}

impl LeaseCoordinator {
    /// One taker pass: lists the table, updates the expiry bookkeeping, takes every owed free
    /// lease, asks for leases by graceful handoffs when too few are free, and completes the
    /// handoffs to this worker that timed out (see the module docs). Fails only when the
    /// table cannot be listed.
    pub async fn take_once(&self) -> Result<TakeReport, LeaseError> {
        self.take_pass(false).await
    }

    /// One taker pass; `discovery` limits it to one lease (the taker loop's first pass).
    pub(super) async fn take_pass(&self, discovery: bool) -> Result<TakeReport, LeaseError> {
        let _serial = self.take_lock.lock().await;
        let leases = self
            .bounded("list_leases", self.store.list_leases())
            .await?;
        let now = self.clock.now();
        let plan = {
            let held_keys: HashSet<String> = lock(&self.held).keys().cloned().collect();
            let mut tracker = lock(&self.tracker);
            tracker.observe(&leases, now);
            let input = PlanInput {
                me: &self.config.worker_id,
                held: &held_keys,
                failover_time: self.config.failover_time,
                handoff_expiry: self.config.handoff_expiry(),
                handoff_timeout: self.config.handoff_timeout,
                max_leases_for_worker: self.config.max_leases_for_worker,
                discovery,
                now,
            };
            plan_take(&leases, &tracker, &input, self.random.as_ref())
        };
        let mut report = TakeReport {
            leases_in_table: leases.len(),
            workers: plan.workers,
            target: plan.target,
            discovery,
            ..TakeReport::default()
        };

        let me = self.config.worker_id.as_str();
        tracing::debug!(
            worker_id = %me,
            workers = plan.workers,
            target = plan.target,
            needed = plan.needed,
            free = plan.candidates.len(),
            handoffs = plan.handoffs.len(),
            "taker plan"
        );
        let mut needed = plan.take;
        let mut free = plan.candidates.into_iter();
        let mut store_failing = false;
        while needed > 0 {
            let batch: Vec<Lease> = free.by_ref().take(needed).collect();
            if batch.is_empty() {
                break;
            }
            let results = join_all_limited(
                batch
                    .iter()
                    .map(|l| self.bounded("take_lease", self.store.take_lease(l, me))),
                MAX_CONCURRENT_WRITES,
            )
            .await;
            for (lease, result) in batch.iter().zip(results) {
                metrics::histogram!(
                    level: crate::metrics::DETAILED,
                    crate::metrics::TAKE_LEASE_SUCCESS,
                    crate::metrics::worker_labels(crate::metrics::operation::TAKE_LEASES, me)
                )
                .record(if result.is_ok() { 1.0 } else { 0.0 });
                match result {
                    Ok(taken) => {
                        report.taken.push(taken.lease_key.clone());
                        self.gain(taken, false);
                        needed = needed.saturating_sub(1);
                    }
                    Err(err) => {
                        store_failing |= !matches!(
                            err,
                            LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }
                        );
                        tracing::debug!(
                            worker_id = %me,
                            lease_key = %lease.lease_key,
                            error = %crate::ErrorChain(&err),
                            "take failed; skipped"
                        );
                    }
                }
            }
            if store_failing {
                break;
            }
        }
        if store_failing {
            report.held = lock(&self.held).len();
            return Ok(report);
        }

        // Handoffs that timed out: this worker completes them and holds the lease (the
        // current owner's next write fails: in effect a steal).
        let completions = join_all_limited(
            plan.complete
                .iter()
                .map(|l| self.bounded("complete_handoff", self.store.complete_handoff(l))),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut completed = 0usize;
        for (lease, result) in plan.complete.iter().zip(completions) {
            match result {
                Ok(taken) => {
                    tracing::info!(
                        worker_id = %me,
                        lease_key = %lease.lease_key,
                        from = lease.checkpoint_owner.as_deref().unwrap_or(""),
                        "graceful handoff timed out; completed by the next owner"
                    );
                    completed += 1;
                    report.stolen.push(taken.lease_key.clone());
                    self.gain(taken, true);
                }
                Err(err) => tracing::debug!(
                    worker_id = %me,
                    lease_key = %lease.lease_key,
                    error = %crate::ErrorChain(&err),
                    "completing a timed-out handoff failed; skipped"
                ),
            }
        }

        // Graceful handoffs; a store without them steals instead, at most
        // `max_leases_to_steal_at_one_time`.
        let initiated = join_all_limited(
            plan.handoffs
                .iter()
                .map(|l| self.bounded("initiate_handoff", self.store.initiate_handoff(l, me))),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut steals_left = self.config.max_leases_to_steal_at_one_time;
        for (lease, result) in plan.handoffs.iter().zip(initiated) {
            match result {
                Ok(row) => {
                    lock(&self.tracker).record(&row, self.clock.now());
                    tracing::info!(
                        worker_id = %me,
                        lease_key = %lease.lease_key,
                        from = lease.lease_owner.as_deref().unwrap_or(""),
                        "graceful handoff initiated"
                    );
                    metrics::counter!(
                        "kcl_lease_handoffs_total",
                        "worker_id" => me.to_owned(),
                        "role" => "to"
                    )
                    .increment(1);
                    report.handoffs_initiated.push(lease.lease_key.clone());
                }
                Err(LeaseError::Unsupported { .. }) if steals_left > 0 => {
                    steals_left -= 1;
                    match self
                        .bounded("take_lease", self.store.take_lease(lease, me))
                        .await
                    {
                        Ok(taken) => {
                            tracing::info!(
                                worker_id = %me,
                                lease_key = %lease.lease_key,
                                from = lease.lease_owner.as_deref().unwrap_or(""),
                                "lease stolen"
                            );
                            report.stolen.push(taken.lease_key.clone());
                            self.gain(taken, true);
                        }
                        Err(err) => tracing::debug!(
                            worker_id = %me,
                            lease_key = %lease.lease_key,
                            error = %crate::ErrorChain(&err),
                            "steal failed; skipped"
                        ),
                    }
                }
                Err(err) => tracing::debug!(
                    worker_id = %me,
                    lease_key = %lease.lease_key,
                    error = %crate::ErrorChain(&err),
                    "initiating a handoff failed; skipped"
                ),
            }
        }
        report.handoffs_pending = (plan.incoming - completed) + report.handoffs_initiated.len();
        report.held = lock(&self.held).len();
        Ok(report)
    }

    /// When the taker should run next, at the latest `latest`: earlier if a lease of another
    /// worker expires before that.
    pub(super) fn next_take_at(&self, latest: Instant) -> Instant {
        let now = self.clock.now();
        let held: HashSet<String> = lock(&self.held).keys().cloned().collect();
        let expiry = lock(&self.tracker).next_expiry(
            &self.config.worker_id,
            &held,
            self.config.failover_time,
            self.config.handoff_expiry(),
            now,
        );
        match expiry {
            Some(at) if at < latest => at,
            _ => latest,
        }
    }
}

#[cfg(test)]
mod tests {
    use kcl_kpl::ExtendedSequenceNumber;

    use super::*;
    use crate::SeededRandom;

    const F: Duration = Duration::from_secs(10);
    const H: Duration = Duration::from_secs(30);

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut l = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
        l.lease_owner = owner.map(str::to_owned);
        l.lease_counter = counter;
        l
    }

    fn plan(
        leases: &[Lease],
        tracker: &ExpiryTracker,
        me: &str,
        held: &[&str],
        now: Instant,
        max: usize,
    ) -> TakePlan {
        let held: HashSet<String> = held.iter().map(|s| (*s).to_owned()).collect();
        let input = PlanInput {
            me,
            held: &held,
            failover_time: F,
            handoff_expiry: F + H,
            handoff_timeout: H,
            max_leases_for_worker: max,
            discovery: false,
            now,
        };
        plan_take(leases, tracker, &input, &SeededRandom::new(7))
    }

    #[test]
    fn lone_worker_takes_everything_free() {
        let leases: Vec<Lease> = (0..64).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let mut tracker = ExpiryTracker::default();
        let now = Instant::now();
        tracker.observe(&leases, now);
        let p = plan(&leases, &tracker, "me", &[], now, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed), (1, 64, 64));
        assert_eq!(p.candidates.len(), 64);
        assert!(p.handoffs.is_empty());
    }

    #[test]
    fn finished_leases_are_never_candidates_nor_counted() {
        let mut leases = vec![lease("a", None, 0), lease("b", None, 0)];
        leases[1].checkpoint = ExtendedSequenceNumber::SHARD_END;
        let tracker = ExpiryTracker::default();
        let p = plan(&leases, &tracker, "me", &[], Instant::now(), usize::MAX);
        assert_eq!(p.target, 1);
        assert_eq!(p.candidates.len(), 1);
        assert_eq!(p.candidates[0].lease_key, "a");
    }

    #[test]
    fn owned_leases_expire_only_after_failover_time_unchanged() {
        let t0 = Instant::now();
        let leases = vec![lease("a", Some("other"), 5)];
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let p = plan(
            &leases,
            &tracker,
            "me",
            &[],
            t0 + F - Duration::from_millis(1),
            usize::MAX,
        );
        assert!(p.candidates.is_empty());
        assert_eq!(p.workers, 2);
        // The same counter seen again later: the timer keeps running from t0.
        tracker.observe(&leases, t0 + F / 2);
        let p = plan(&leases, &tracker, "me", &[], t0 + F, usize::MAX);
        assert_eq!(p.candidates.len(), 1);
        assert_eq!(p.workers, 1);
        // A renewal resets it.
        let renewed = vec![lease("a", Some("other"), 6)];
        tracker.observe(&renewed, t0 + F);
        assert_eq!(tracker.unchanged_for(&renewed[0], t0 + F), Duration::ZERO);
        let p = plan(&renewed, &tracker, "me", &[], t0 + F + F / 2, usize::MAX);
        assert!(p.candidates.is_empty());
        assert_eq!(
            tracker.next_expiry("me", &HashSet::new(), F, F + H, t0 + F),
            Some(t0 + F + F)
        );
    }

    #[test]
    fn own_id_not_held_is_free_at_once() {
        let leases = vec![lease("a", Some("me"), 3)];
        let mut tracker = ExpiryTracker::default();
        let now = Instant::now();
        tracker.observe(&leases, now);
        let p = plan(&leases, &tracker, "me", &[], now, usize::MAX);
        assert_eq!(p.candidates.len(), 1);
    }

    #[test]
    fn oldest_first() {
        let t0 = Instant::now();
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&[lease("old", Some("dead"), 1)], t0);
        let leases = vec![lease("new", None, 0), lease("old", Some("dead"), 1)];
        tracker.observe(&leases, t0 + F);
        let p = plan(&leases, &tracker, "me", &[], t0 + F, usize::MAX);
        let keys: Vec<&str> = p.candidates.iter().map(|l| l.lease_key.as_str()).collect();
        assert_eq!(keys, vec!["old", "new"]);
    }

    fn counts_plan(other: &[(&str, usize)], mine: usize) -> TakePlan {
        let mut leases = Vec::new();
        let mut held = Vec::new();
        for (owner, n) in other {
            for i in 0..*n {
                leases.push(lease(&format!("{owner}-{i}"), Some(owner), 1));
            }
        }
        for i in 0..mine {
            leases.push(lease(&format!("me-{i}"), Some("me"), 1));
            held.push(format!("me-{i}"));
        }
        let held: Vec<&str> = held.iter().map(String::as_str).collect();
        let mut tracker = ExpiryTracker::default();
        let now = Instant::now();
        tracker.observe(&leases, now);
        plan(&leases, &tracker, "me", &held, now, usize::MAX)
    }

    #[test]
    fn asks_an_overloaded_worker_for_all_it_is_owed_in_one_pass() {
        let p = counts_plan(&[("a", 10)], 0);
        assert_eq!((p.target, p.needed), (5, 5));
        assert_eq!(p.handoffs.len(), 5);
        assert_eq!(p.handoffs[0].lease_owner.as_deref(), Some("a"));
    }

    #[test]
    fn steals_from_worker_at_target_only_when_two_short() {
        // 4/4/2: the worker with 2 steals one; 4/3/3 is stable.
        let p = counts_plan(&[("a", 4), ("b", 4)], 2);
        assert_eq!((p.target, p.needed, p.handoffs.len()), (4, 2, 1));
        let p = counts_plan(&[("a", 4), ("b", 3)], 3);
        assert_eq!((p.target, p.needed, p.handoffs.len()), (4, 1, 0));
        let p = counts_plan(&[("a", 3), ("b", 3)], 4);
        assert_eq!((p.needed, p.handoffs.len()), (0, 0));
    }

    #[test]
    fn no_steal_while_a_lease_is_about_to_expire() {
        // "dead" stopped renewing 6 s ago; "busy" looks overloaded only because "dead" is
        // still counted. Stealing from "busy" now would be undone after the expiry.
        let t0 = Instant::now();
        let mut leases: Vec<Lease> = (0..5)
            .map(|i| lease(&format!("b{i}"), Some("busy"), 1))
            .collect();
        leases.extend((0..2).map(|i| lease(&format!("d{i}"), Some("dead"), 1)));
        leases.extend((0..3).map(|i| lease(&format!("m{i}"), Some("me"), 1)));
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let renewed_at = t0 + Duration::from_secs(1);
        let fresh: Vec<Lease> = leases
            .iter()
            .map(|l| {
                let mut l = l.clone();
                if !l.lease_key.starts_with('d') {
                    l.lease_counter += 1;
                }
                l
            })
            .collect();
        tracker.observe(&fresh, renewed_at);
        let held = ["m0", "m1", "m2"];
        // Dead leases unchanged for just under 3F/4: not suspicious yet, "busy" (5 > 4) is
        // asked.
        let p = plan(
            &fresh,
            &tracker,
            "me",
            &held,
            t0 + F * 3 / 4 - Duration::from_millis(1),
            usize::MAX,
        );
        assert_eq!((p.workers, p.target, p.needed), (3, 4, 1));
        assert_eq!(p.handoffs.len(), 1);
        // From 3F/4 on: nothing asked.
        let p = plan(&fresh, &tracker, "me", &held, t0 + F * 3 / 4, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed), (3, 4, 1));
        assert!(p.handoffs.is_empty());
        // Once expired, the dead worker's leases are simply taken.
        let p = plan(&fresh, &tracker, "me", &held, t0 + F, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed), (2, 5, 2));
        assert_eq!(p.candidates.len(), 2);
    }

    #[test]
    fn handoffs_are_spread_over_the_most_loaded_and_bounded_by_the_need() {
        // 20 leases on "a", 10 on "b", none here: target 10, all asked from "a" (b is at
        // the target and this worker gets there from a alone).
        let p = counts_plan(&[("a", 20), ("b", 10)], 0);
        assert_eq!((p.workers, p.target, p.needed), (3, 10, 10));
        assert_eq!(p.handoffs.len(), 10);
        assert!(
            p.handoffs
                .iter()
                .all(|l| l.lease_owner.as_deref() == Some("a"))
        );
        let keys: HashSet<&str> = p.handoffs.iter().map(|l| l.lease_key.as_str()).collect();
        assert_eq!(keys.len(), 10);
        // Three equally loaded donors: the leases come from all three, none below target.
        let p = counts_plan(&[("a", 12), ("b", 12), ("c", 12)], 0);
        assert_eq!((p.workers, p.target, p.handoffs.len()), (4, 9, 9));
        for owner in ["a", "b", "c"] {
            let from = p
                .handoffs
                .iter()
                .filter(|l| l.lease_owner.as_deref() == Some(owner))
                .count();
            assert_eq!(from, 3, "{owner}");
        }
    }

    #[test]
    fn the_discovery_pass_takes_or_asks_for_one_lease() {
        let leases: Vec<Lease> = (0..64).map(|i| lease(&format!("s{i}"), None, 0)).collect();
        let mut tracker = ExpiryTracker::default();
        let now = Instant::now();
        tracker.observe(&leases, now);
        let held = HashSet::new();
        let input = PlanInput {
            me: "me",
            held: &held,
            failover_time: F,
            handoff_expiry: F + H,
            handoff_timeout: H,
            max_leases_for_worker: usize::MAX,
            discovery: true,
            now,
        };
        let p = plan_take(&leases, &tracker, &input, &SeededRandom::new(1));
        assert_eq!((p.needed, p.take, p.handoffs.len()), (64, 1, 0));
        let owned: Vec<Lease> = (0..10)
            .map(|i| lease(&format!("s{i}"), Some("a"), 1))
            .collect();
        tracker.observe(&owned, now);
        let p = plan_take(&owned, &tracker, &input, &SeededRandom::new(1));
        assert_eq!((p.needed, p.take, p.handoffs.len()), (5, 0, 1));
    }

    #[test]
    fn a_lease_handed_over_counts_for_its_next_owner() {
        // "a" holds 6, 3 of which it hands to "b"; "b" holds 1; 3 are free. This worker
        // (none) sees a at 3 and b at 4: target ceil(10 / 3) = 4; it takes the 3 free ones
        // and asks nobody (b is at the target, this worker one short of it).
        let t0 = Instant::now();
        let mut leases: Vec<Lease> = (0..3)
            .map(|i| handing_over(&format!("h{i}"), Some("b"), "a", 1))
            .collect();
        leases.extend((0..3).map(|i| lease(&format!("a{i}"), Some("a"), 1)));
        leases.push(lease("b0", Some("b"), 1));
        leases.extend((0..3).map(|i| lease(&format!("f{i}"), None, 1)));
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let p = plan(&leases, &tracker, "me", &[], t0, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed, p.take), (3, 4, 4, 3));
        assert!(p.handoffs.is_empty());
        // With two more leases of b's, b (6) is above the target (target ceil(12 / 3) = 4): asked
        // first, and never its leases in a handoff.
        leases.extend((1..3).map(|i| lease(&format!("b{i}"), Some("b"), 1)));
        tracker.observe(&leases, t0);
        let p = plan(&leases, &tracker, "me", &[], t0, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed, p.take), (3, 4, 4, 3));
        assert_eq!(p.handoffs.len(), 1);
        assert_eq!(p.handoffs[0].lease_owner.as_deref(), Some("b"));
        assert!(!p.handoffs[0].is_in_handoff());
        // Seen by "a" itself, holding its six: its three in a handoff count for "b".
        let held = ["h0", "h1", "h2", "a0", "a1", "a2"];
        let p = plan(&leases[..10], &tracker, "a", &held, t0, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed), (2, 5, 2));
    }

    #[test]
    fn a_handoff_to_this_worker_is_completed_here_after_the_handoff_timeout() {
        let t0 = Instant::now();
        let leases = vec![handing_over("a", Some("me"), "old", 7)];
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let p = plan(&leases, &tracker, "me", &[], t0, usize::MAX);
        assert_eq!((p.incoming, p.complete.len(), p.needed), (1, 0, 0));
        // The current owner keeps renewing (the counter moves), its owners stay.
        let renewed = vec![handing_over("a", Some("me"), "old", 8)];
        tracker.observe(&renewed, t0 + H / 2);
        let p = plan(&renewed, &tracker, "me", &[], t0 + H, usize::MAX);
        assert_eq!((p.incoming, p.complete.len()), (1, 1));
        assert!(p.candidates.is_empty());
    }

    #[test]
    fn stealing_converges_without_oscillation() {
        // Simulate workers taking turns on a shared table view; the counts must settle and
        // every later pass must change nothing.
        for n_leases in 1..=30usize {
            for n_workers in 1..=6usize {
                let names: Vec<String> = (0..n_workers).map(|i| format!("w{i}")).collect();
                let mut owner: Vec<usize> = vec![0; n_leases]; // w0 took everything first
                let mut stable_rounds = 0;
                let mut rounds = 0;
                while stable_rounds < 2 {
                    rounds += 1;
                    assert!(rounds < 200, "no convergence for {n_leases}/{n_workers}");
                    let mut changed = false;
                    for (w, me) in names.iter().enumerate() {
                        let leases: Vec<Lease> = owner
                            .iter()
                            .enumerate()
                            .map(|(i, o)| lease(&format!("s{i}"), Some(&names[*o]), 1))
                            .collect();
                        let held: Vec<String> = owner
                            .iter()
                            .enumerate()
                            .filter(|(_, o)| **o == w)
                            .map(|(i, _)| format!("s{i}"))
                            .collect();
                        let held_refs: Vec<&str> = held.iter().map(String::as_str).collect();
                        let mut tracker = ExpiryTracker::default();
                        let now = Instant::now();
                        tracker.observe(&leases, now);
                        let p = plan(&leases, &tracker, me, &held_refs, now, usize::MAX);
                        for s in p.handoffs {
                            let i: usize = s.lease_key[1..].parse().unwrap();
                            owner[i] = w;
                            changed = true;
                        }
                    }
                    stable_rounds = if changed { 0 } else { stable_rounds + 1 };
                }
                let mut counts = vec![0usize; n_workers];
                for o in &owner {
                    counts[*o] += 1;
                }
                let max = *counts.iter().max().unwrap();
                let min = *counts.iter().min().unwrap();
                assert!(max - min <= 1, "{n_leases}/{n_workers}: {counts:?}");
            }
        }
    }

    fn handing_over(key: &str, next: Option<&str>, current: &str, counter: u64) -> Lease {
        let mut l = lease(key, next, counter);
        l.checkpoint_owner = Some(current.to_owned());
        l
    }

    #[test]
    fn a_lease_in_a_handoff_is_taken_only_after_failover_plus_handoff_timeout() {
        let t0 = Instant::now();
        for next in [Some("new"), None] {
            let leases = vec![handing_over("a", next, "old", 7)];
            let mut tracker = ExpiryTracker::default();
            tracker.observe(&leases, t0);
            for at in [t0, t0 + F, t0 + F + H - Duration::from_millis(1)] {
                let p = plan(&leases, &tracker, "me", &[], at, usize::MAX);
                assert!(p.candidates.is_empty(), "{next:?} at {:?}", at - t0);
                assert!(p.handoffs.is_empty(), "{next:?}");
            }
            assert_eq!(
                tracker.next_expiry("me", &HashSet::new(), F, F + H, t0),
                Some(t0 + F + H),
                "{next:?}"
            );
            let p = plan(&leases, &tracker, "me", &[], t0 + F + H, usize::MAX);
            assert_eq!(p.candidates.len(), 1, "{next:?}");
            assert_eq!(p.workers, 1);
        }
        // A change of the handoff (the owner written, the marker removed) restarts the
        // timer.
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&[handing_over("a", Some("new"), "old", 7)], t0);
        let done = vec![lease("a", Some("new"), 7)];
        tracker.observe(&done, t0 + F);
        assert_eq!(tracker.unchanged_for(&done[0], t0 + F), Duration::ZERO);
    }

    #[test]
    fn a_lease_in_a_handoff_is_never_stolen() {
        // "a" holds 4 leases, three of them being handed over: only the fourth may be stolen,
        // and only once the handoffs are not about to time out.
        let t0 = Instant::now();
        let mut leases: Vec<Lease> = (0..3)
            .map(|i| handing_over(&format!("h{i}"), Some("a"), "x", 1))
            .collect();
        leases.push(lease("plain", Some("a"), 1));
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let p = plan(&leases, &tracker, "me", &[], t0, usize::MAX);
        assert_eq!((p.workers, p.target, p.needed), (2, 2, 2));
        assert!(p.candidates.is_empty());
        assert_eq!(p.handoffs.len(), 1);
        assert_eq!(p.handoffs[0].lease_key, "plain");
        // Only leases in a handoff: nothing to steal.
        let only: Vec<Lease> = leases[..3].to_vec();
        let p = plan(&only, &tracker, "me", &[], t0, usize::MAX);
        assert_eq!(p.needed, 2);
        assert!(p.handoffs.is_empty() && p.candidates.is_empty());
    }

    #[test]
    fn workers_asking_at_once_share_the_excess_out_exactly() {
        // 10 workers at 100, 5 joining ones each asking already (one handoff to each in
        // flight): every joining worker plans on the same listing.
        let t0 = Instant::now();
        let mut leases = Vec::new();
        for d in 0..10 {
            for i in 0..100 {
                let key = format!("d{d}-{i:03}");
                if i == 0 && d < 5 {
                    leases.push(handing_over(
                        &key,
                        Some(&format!("j{d}")),
                        &format!("d{d}"),
                        1,
                    ));
                } else {
                    leases.push(lease(&key, Some(&format!("d{d}")), 1));
                }
            }
        }
        let mut tracker = ExpiryTracker::default();
        tracker.observe(&leases, t0);
        let mut asked: HashMap<String, usize> = HashMap::new();
        let mut keys = HashSet::new();
        let mut loads = Vec::new();
        for j in 0..5 {
            let p = plan(&leases, &tracker, &format!("j{j}"), &[], t0, usize::MAX);
            assert_eq!((p.workers, p.target, p.needed), (15, 67, 66), "j{j}");
            for l in &p.handoffs {
                assert!(
                    keys.insert(l.lease_key.clone()),
                    "asked twice: {}",
                    l.lease_key
                );
                *asked.entry(l.lease_owner.clone().unwrap()).or_default() += 1;
            }
            loads.push(1 + p.handoffs.len());
        }
        // No worker is taken below 66 and every one ends at 66 or 67 in one pass.
        for d in 0..10 {
            let load = if d < 5 { 99 } else { 100 };
            loads.push(load - asked[&format!("d{d}")]);
        }
        assert_eq!(loads.iter().sum::<usize>(), 1000);
        assert!(loads.iter().all(|l| (66..=67).contains(l)), "{loads:?}");
    }
}
