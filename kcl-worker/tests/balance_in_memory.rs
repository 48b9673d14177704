//! The fast-balance goals of the 2.x taker, pinned: fleets of workers on the in-memory
//! Kinesis and lease store, on tokio's paused clock (virtual time). A take interval is
//! `failover_time / 2`.
//!
//! * A cold start of 10 workers on 100 fresh shards is balanced (every lease held, none in a
//!   handoff, held counts differing by at most one) within 3 take intervals of the start.
//! * When 3 of 10 balanced workers stop gracefully, their leases are spread: no survivor
//!   takes more than its new target less what it held, and the fleet is balanced again
//!   within 3 take intervals of the stop.
//!
//! No processor is shut down as `Zombie` in either.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kcl_interfaces::ShutdownReason;
use kcl_worker::WorkerHandle;
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::recording::{Behaviour, Event};
use tokio::time::Instant;

const FAILOVER: Duration = Duration::from_secs(10);
const TAKE_INTERVAL: Duration = Duration::from_secs(5);
const SHARDS: usize = 100;
const WORKERS: usize = 10;
/// How long a balance must hold to count: two take intervals (a balance that a later pass
/// undoes is none).
const SETTLE: Duration = Duration::from_secs(10);
/// How often the fleet is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(50);

fn fleet() -> Fleet {
    assert_eq!(TAKE_INTERVAL, FAILOVER / 2);
    Fleet::new("balance", SHARDS as u32)
        .unwrap()
        .with_defaults(|builder| {
            builder
                .failover_time(FAILOVER)
                // Idle shards: fewer empty reads, the same lease traffic.
                .idle_time_between_reads(Duration::from_secs(1))
                .shard_sync_interval(Duration::from_secs(60))
        })
}

fn id(i: usize) -> String {
    format!("worker-{i:02}")
}

/// Starts workers `ids` together (side by side, at one instant of virtual time).
async fn start(fleet: &Fleet, ids: std::ops::Range<usize>) -> Vec<WorkerHandle> {
    let mut starts = tokio::task::JoinSet::new();
    for i in ids {
        let fleet = fleet.clone();
        starts.spawn(async move { (i, fleet.start(&id(i), Behaviour::new()).await.unwrap().0) });
    }
    let mut workers = starts.join_all().await;
    workers.sort_by_key(|(i, _)| *i);
    workers.into_iter().map(|(_, w)| w).collect()
}

/// Held counts by worker.
fn held(workers: &[WorkerHandle]) -> BTreeMap<String, usize> {
    workers
        .iter()
        .map(|w| (w.worker_id().to_owned(), w.held_leases().len()))
        .collect()
}

/// Every lease held, none in a handoff, the held counts differing by at most one.
fn balanced(fleet: &Fleet, workers: &[WorkerHandle]) -> bool {
    let counts = held(workers);
    let (Some(max), Some(min)) = (counts.values().max(), counts.values().min()) else {
        return false;
    };
    counts.values().sum::<usize>() == SHARDS
        && max - min <= 1
        && fleet
            .store()
            .snapshot()
            .iter()
            .all(|l| l.lease_owner.is_some() && l.checkpoint_owner.is_none())
}

/// Waits until the fleet is balanced and stays so for [`SETTLE`]; returns when it last
/// became balanced, from `start`, and the most each worker held meanwhile. Fails after
/// `limit`.
async fn settle(
    fleet: &Fleet,
    workers: &[WorkerHandle],
    start: Instant,
    limit: Duration,
) -> (Duration, BTreeMap<String, usize>) {
    let mut since: Option<Instant> = None;
    let mut peak: BTreeMap<String, usize> = BTreeMap::new();
    loop {
        let now = Instant::now();
        for (worker, n) in held(workers) {
            let p = peak.entry(worker).or_default();
            *p = (*p).max(n);
        }
        if balanced(fleet, workers) {
            let at = *since.get_or_insert(now);
            if now - at >= SETTLE {
                return (at - start, peak);
            }
        } else {
            since = None;
        }
        assert!(
            now - start <= limit,
            "not balanced within {limit:?}: held {:?}",
            held(workers)
        );
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

fn zombies(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Shutdown {
                    reason: ShutdownReason::Zombie,
                    ..
                }
            )
        })
        .count()
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_of_10_workers_on_100_shards_balances_within_3_take_intervals() {
    let fleet = fleet();
    let started = Instant::now();
    let workers = start(&fleet, 0..WORKERS).await;
    let (took, _) = settle(&fleet, &workers, started, 10 * TAKE_INTERVAL).await;
    println!(
        "cold start: {WORKERS} workers on {SHARDS} shards balanced after {took:?} (take interval {TAKE_INTERVAL:?}): {:?}",
        held(&workers)
    );
    assert!(took <= 3 * TAKE_INTERVAL, "balanced after {took:?}");
    assert!(held(&workers).values().all(|n| *n == SHARDS / WORKERS));
    assert_eq!(zombies(&fleet.log().events()), 0);
    for w in workers {
        assert!(w.shutdown().await.unwrap().is_clean());
    }
}

#[tokio::test(start_paused = true)]
async fn a_graceful_stop_of_3_of_10_workers_spreads_their_leases_and_balances_within_3_take_intervals()
 {
    let fleet = fleet();
    let started = Instant::now();
    let mut workers = start(&fleet, 0..WORKERS).await;
    settle(&fleet, &workers, started, 10 * TAKE_INTERVAL).await;
    let before = held(&workers);
    let events_before = fleet.log().events().len();
    let leaving = workers.split_off(WORKERS - 3);
    let left_behind: BTreeSet<String> = leaving
        .iter()
        .flat_map(WorkerHandle::held_leases)
        .map(|l| l.lease_key)
        .collect();
    assert_eq!(left_behind.len(), 30);
    // The three stop together.
    let stopped = Instant::now();
    let mut stops = tokio::task::JoinSet::new();
    for w in leaving {
        stops.spawn(w.shutdown());
    }
    for report in stops.join_all().await {
        let report = report.unwrap();
        assert!(report.is_clean(), "{report:?}");
    }
    let (took, peak) = settle(&fleet, &workers, stopped, 10 * TAKE_INTERVAL).await;
    let survivors = workers.len();
    let target = SHARDS.div_ceil(survivors);
    // Who took the leases left behind (a processor started on one of them).
    let events = fleet.log().events();
    let mut took_over: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for event in &events[events_before..] {
        if let Event::Initialized { worker, shard, .. } = event
            && left_behind.contains(shard)
        {
            took_over
                .entry(worker.clone())
                .or_default()
                .insert(shard.clone());
        }
    }
    let took_counts: BTreeMap<&String, usize> =
        took_over.iter().map(|(w, s)| (w, s.len())).collect();
    println!(
        "3 of {WORKERS} stopped: balanced again after {took:?} (take interval {TAKE_INTERVAL:?}); \
         their 30 leases went {took_counts:?}; held {:?}",
        held(&workers)
    );
    assert!(took <= 3 * TAKE_INTERVAL, "balanced again after {took:?}");
    for w in &workers {
        let id = w.worker_id().to_owned();
        let owed = target - before[&id];
        let n = took_over.get(&id).map_or(0, BTreeSet::len);
        assert!(n <= owed, "{id} took {n} leases, owed {owed}");
        // Nobody held more than its target on the way (and gave some back).
        assert!(peak[&id] <= target, "{id} held {} at most", peak[&id]);
    }
    // Every lease left behind was taken up (some of them may have moved again between
    // survivors, by graceful handoffs, to even the counts out).
    let taken: BTreeSet<&String> = took_over.values().flatten().collect();
    assert_eq!(taken, left_behind.iter().collect());
    assert_eq!(zombies(&events), 0);
    for w in workers {
        assert!(w.shutdown().await.unwrap().is_clean());
    }
}
