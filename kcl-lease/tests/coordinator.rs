//! Scenario tests of the lease coordinator on the in-memory lease store and a manual clock.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig, LeaseEvent, LostReason};
use kcl_lease::test_util::ManualClock;
use kcl_lease::test_util::lease_store::{Fault, FaultKind, InMemoryLeaseStore, LeaseOperation};
use kcl_lease::{BillingMode, Clock, Lease, LeaseError, LeaseStore, SeededRandom};
use tokio::sync::mpsc::UnboundedReceiver;

const F: Duration = Duration::from_secs(10);

fn key(i: usize) -> String {
    format!("shardId-{i:012}")
}

async fn seeded_store(clock: &ManualClock, n: usize) -> Arc<InMemoryLeaseStore> {
    let store = Arc::new(
        InMemoryLeaseStore::new()
            .with_table()
            .with_clock(Arc::new(clock.clone())),
    );
    for i in 0..n {
        let lease = Lease::new(key(i), ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(store.create_lease_if_not_exists(&lease).await.unwrap());
    }
    store
}

fn coordinator_with(
    store: &Arc<InMemoryLeaseStore>,
    clock: &ManualClock,
    config: LeaseCoordinatorConfig,
    seed: u64,
) -> Arc<LeaseCoordinator> {
    LeaseCoordinator::new(
        Arc::clone(store) as Arc<dyn LeaseStore>,
        config.with_failover_time(F),
        Arc::new(clock.clone()),
        Arc::new(SeededRandom::new(seed)),
    )
    .unwrap()
}

fn coordinator(
    store: &Arc<InMemoryLeaseStore>,
    clock: &ManualClock,
    id: &str,
    seed: u64,
) -> Arc<LeaseCoordinator> {
    coordinator_with(store, clock, LeaseCoordinatorConfig::new(id), seed)
}

/// Leases per owner in the table (`None` = unowned), finished leases excluded.
fn owners(store: &InMemoryLeaseStore) -> BTreeMap<Option<String>, usize> {
    let mut map = BTreeMap::new();
    for lease in store.snapshot() {
        if !lease.is_finished() {
            *map.entry(lease.lease_owner).or_default() += 1;
        }
    }
    map
}

/// Lease counts of `coordinators` in the table, largest first.
fn counts(store: &InMemoryLeaseStore, coordinators: &[Arc<LeaseCoordinator>]) -> Vec<usize> {
    let owners = owners(store);
    let mut counts: Vec<usize> = coordinators
        .iter()
        .map(|c| {
            owners
                .get(&Some(c.worker_id().to_owned()))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    counts
}

/// Every coordinator's held set is exactly what the table says it owns, at the same counter.
fn assert_views_match_table(store: &InMemoryLeaseStore, coordinators: &[Arc<LeaseCoordinator>]) {
    let table: BTreeMap<String, Lease> = store
        .snapshot()
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect();
    for c in coordinators {
        let held = c.held_leases();
        for lease in &held {
            assert_eq!(
                table[&lease.lease_key],
                *lease,
                "{} holds a stale view",
                c.worker_id()
            );
        }
        let owned: Vec<&String> = table
            .values()
            .filter(|l| l.is_owned_by(c.worker_id()))
            .map(|l| &l.lease_key)
            .collect();
        let held_keys: Vec<&String> = held.iter().map(|l| &l.lease_key).collect();
        assert_eq!(owned, held_keys, "{}", c.worker_id());
    }
}

/// One directly driven round: time moves a renewal interval, everybody renews, then takes.
async fn round(clock: &ManualClock, coordinators: &[Arc<LeaseCoordinator>]) {
    clock.advance(F / 3);
    for c in coordinators {
        c.renew_once().await;
    }
    for c in coordinators {
        c.take_once().await.unwrap();
    }
}

fn drain(events: &mut UnboundedReceiver<LeaseEvent>) -> Vec<LeaseEvent> {
    let mut out = Vec::new();
    while let Ok(event) = events.try_recv() {
        out.push(event);
    }
    out
}

/// Moves the clock from one sleeper's deadline to the next (settling at each) until `done`
/// holds; returns the elapsed clock time then, or `None` if `limit` passes first.
async fn run_until(
    clock: &ManualClock,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    clock.settle().await;
    loop {
        if done() {
            return Some(clock.elapsed());
        }
        let next = clock.next_deadline()?;
        if next > limit {
            return None;
        }
        clock.set(next);
        clock.settle().await;
    }
}

#[tokio::test]
async fn three_workers_converge_to_4_3_3() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 10).await;
    let cs: Vec<_> = (0..3)
        .map(|i| coordinator(&store, &clock, &format!("w{i}"), i))
        .collect();
    for _ in 0..30 {
        round(&clock, &cs).await;
    }
    assert_eq!(counts(&store, &cs), vec![4, 3, 3]);
    assert_eq!(owners(&store).get(&None), None);
    assert_views_match_table(&store, &cs);
    // Stable: more rounds change no owner.
    let before: Vec<Option<String>> = store
        .snapshot()
        .into_iter()
        .map(|l| l.lease_owner)
        .collect();
    for _ in 0..30 {
        round(&clock, &cs).await;
    }
    let after: Vec<Option<String>> = store
        .snapshot()
        .into_iter()
        .map(|l| l.lease_owner)
        .collect();
    assert_eq!(before, after);
}

#[tokio::test]
async fn max_leases_for_worker_caps_until_a_fourth_worker_arrives() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 10).await;
    let config = |id: &str| LeaseCoordinatorConfig::new(id).with_max_leases_for_worker(3);
    let mut cs: Vec<_> = (0..3)
        .map(|i| coordinator_with(&store, &clock, config(&format!("w{i}")), i))
        .collect();
    for _ in 0..30 {
        round(&clock, &cs).await;
    }
    assert_eq!(counts(&store, &cs), vec![3, 3, 3]);
    assert_eq!(owners(&store).get(&None), Some(&1));
    assert_views_match_table(&store, &cs);

    cs.push(coordinator_with(&store, &clock, config("w3"), 3));
    for _ in 0..30 {
        round(&clock, &cs).await;
    }
    assert_eq!(owners(&store).get(&None), None, "all 10 owned");
    assert_eq!(counts(&store, &cs), vec![3, 3, 2, 2]);
    assert_views_match_table(&store, &cs);
}

#[tokio::test]
async fn lone_worker_takes_64_free_leases_in_its_first_pass() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 64).await;
    let c = coordinator(&store, &clock, "solo", 1);
    let mut events = c.events().unwrap();
    let report = c.take_once().await.unwrap();
    assert_eq!(report.taken.len(), 64);
    assert_eq!((report.workers, report.target, report.held), (1, 64, 64));
    assert_eq!(c.held_leases().len(), 64);
    assert_eq!(owners(&store).get(&Some("solo".to_owned())), Some(&64));
    let gained = drain(&mut events);
    assert_eq!(gained.len(), 64);
    assert!(gained.iter().all(
        |e| matches!(e, LeaseEvent::Gained(l) if l.is_owned_by("solo") && l.lease_counter == 1)
    ));
    // One listing, 64 takes, nothing else.
    let stats = store.stats();
    assert_eq!(stats.operation(LeaseOperation::ListLeases).calls, 1);
    assert_eq!(stats.operation(LeaseOperation::TakeLease).writes, 64);
}

#[tokio::test]
async fn two_workers_starting_together_split_64_leases() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 64).await;
    let cs: Vec<_> = (0..2)
        .map(|i| coordinator(&store, &clock, &format!("w{i}"), 10 + i))
        .collect();
    // With slow calls both list before either takes, and both go for every lease.
    store.set_latency(Duration::from_millis(10));
    let passes: Vec<_> = cs
        .iter()
        .map(|c| {
            let c = Arc::clone(c);
            tokio::spawn(async move { c.take_once().await })
        })
        .collect();
    clock.advance_and_settle(Duration::from_secs(1)).await;
    let mut taken = 0;
    for pass in passes {
        taken += pass.await.unwrap().unwrap().taken.len();
    }
    assert_eq!(taken, 64);
    assert_eq!(owners(&store).get(&None), None);
    assert!(
        store
            .stats()
            .operation(LeaseOperation::TakeLease)
            .condition_failures
            > 0
    );
    store.set_latency(Duration::ZERO);
    for _ in 0..80 {
        round(&clock, &cs).await;
    }
    assert_eq!(counts(&store, &cs), vec![32, 32]);
    assert_views_match_table(&store, &cs);
}

#[tokio::test]
async fn shard_end_leases_are_never_taken_nor_counted() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 4).await;
    // Four finished leases: two free, two owned by a worker that is gone.
    for i in 4..8 {
        let mut lease = Lease::new(key(i), ExtendedSequenceNumber::SHARD_END);
        if i >= 6 {
            lease.lease_owner = Some("gone".to_owned());
            lease.lease_counter = 9;
        }
        store.create_lease_if_not_exists(&lease).await.unwrap();
    }
    let cs: Vec<_> = (0..2)
        .map(|i| coordinator(&store, &clock, &format!("w{i}"), i))
        .collect();
    for _ in 0..20 {
        round(&clock, &cs).await;
    }
    for lease in store.snapshot() {
        if lease.is_finished() {
            assert!(
                lease.lease_owner.is_none() || lease.is_owned_by("gone"),
                "finished lease taken: {lease:?}"
            );
        }
    }
    // Only the 4 live leases count: 2 each.
    assert_eq!(counts(&store, &cs), vec![2, 2]);
    let report = cs[0].take_once().await.unwrap();
    assert_eq!((report.workers, report.target), (2, 2));
}

#[tokio::test]
async fn released_leases_are_taken_by_another_worker_at_its_next_taker_run() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 6).await;
    let a = coordinator(&store, &clock, "a", 1);
    let b = coordinator(&store, &clock, "b", 2);
    let mut a_events = a.events().unwrap();
    a.spawn();
    b.spawn();
    clock.advance_and_settle(Duration::from_secs(120)).await;
    assert_eq!(counts(&store, &[a.clone(), b.clone()]), vec![3, 3]);
    drain(&mut a_events);

    // Graceful shutdown of a: stop the loops, release everything.
    a.stop().await;
    let released = a.held_keys();
    let report = a.release_all().await;
    assert!(report.is_complete());
    assert_eq!(report.released, released);
    assert!(a.held_leases().is_empty());
    assert!(
        drain(&mut a_events).is_empty(),
        "release sends no Lost event"
    );
    for k in &released {
        let lease = store.get_lease(k).await.unwrap().unwrap();
        assert_eq!(lease.lease_owner, None);
    }
    let t0 = clock.elapsed();
    let done = run_until(&clock, t0 + F, || {
        owners(&store).get(&Some("b".to_owned())) == Some(&6)
    })
    .await
    .expect("b never took the released leases");
    let waited = done - t0;
    assert!(
        waited <= F / 2,
        "released leases taken after {waited:?}, more than one taker interval"
    );
    println!("released leases taken after {waited:?} of clock time");
    b.stop().await;
}

#[tokio::test]
async fn released_lease_taken_by_next_take_once() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let a = coordinator(&store, &clock, "a", 1);
    let b = coordinator(&store, &clock, "b", 2);
    a.take_once().await.unwrap();
    b.take_once().await.unwrap(); // both owned by a and live: b only steals one
    assert_eq!(counts(&store, &[a.clone(), b.clone()]), vec![1, 1]);
    let k = a.held_keys().pop().unwrap();
    let held = a.holding(&k).unwrap();
    held.release().await.unwrap();
    assert!(!held.is_current());
    assert!(a.holding(&k).is_none());
    assert!(matches!(
        held.release().await,
        Err(LeaseError::NotHeld { .. })
    ));
    let report = b.take_once().await.unwrap();
    assert_eq!(report.taken, vec![k.clone()]);
    assert!(b.held_lease(&k).is_some());
    assert!(b.is_held(&k));
    assert!(!a.is_held(&k));
}

#[tokio::test]
async fn crashed_worker_leases_move_within_one_and_a_half_failover_times() {
    let mut worst = Duration::ZERO;
    for seed in 0..20u64 {
        let clock = ManualClock::new();
        let store = seeded_store(&clock, 10).await;
        let mut cs: Vec<_> = (0..3)
            .map(|i| coordinator(&store, &clock, &format!("w{i}"), seed * 10 + i))
            .collect();
        for c in &cs {
            c.spawn();
        }
        // Let the loops settle into 4/3/3.
        clock.advance_and_settle(Duration::from_secs(90)).await;
        assert_eq!(counts(&store, &cs), vec![4, 3, 3], "seed {seed}");
        // Some extra, seed-dependent time so the crash falls anywhere in the cycles.
        clock
            .advance_and_settle(Duration::from_millis(seed * 737 % 10_000))
            .await;

        // Crash the worker holding the most: stop its loops and drop it, no release.
        let victim_index = (0..3)
            .max_by_key(|i| (cs[*i].held_leases().len(), *i))
            .unwrap();
        let victim = cs.remove(victim_index);
        let victim_id = victim.worker_id().to_owned();
        let victim_keys = victim.held_keys();
        victim.stop().await;
        drop(victim);
        let t0 = clock.elapsed();

        let survivors: Vec<String> = cs.iter().map(|c| c.worker_id().to_owned()).collect();
        let done = run_until(&clock, t0 + 3 * F, || {
            store.snapshot().iter().all(|l| {
                !victim_keys.contains(&l.lease_key)
                    || l.lease_owner
                        .as_ref()
                        .is_some_and(|o| survivors.contains(o))
            })
        })
        .await
        .unwrap_or_else(|| panic!("seed {seed}: leases of {victim_id} never moved"));
        let took = done - t0;
        assert!(
            took <= F * 3 / 2,
            "seed {seed}: leases of a crashed worker moved after {took:?} > 1.5 x {F:?}"
        );
        worst = worst.max(took);

        // And the survivors end balanced, with views matching the table.
        clock.advance_and_settle(Duration::from_secs(60)).await;
        assert_eq!(counts(&store, &cs), vec![5, 5], "seed {seed}");
        for c in &cs {
            c.stop().await;
        }
        assert_views_match_table(&store, &cs);
    }
    println!(
        "worst crash failover over 20 seeds: {worst:?} (bound {:?})",
        F * 3 / 2
    );
}

#[tokio::test]
async fn zombie_cannot_renew_or_checkpoint_after_its_lease_was_taken() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 1).await;
    let zombie = coordinator(&store, &clock, "zombie", 1);
    let other = coordinator(&store, &clock, "other", 2);
    let mut events = zombie.events().unwrap();
    zombie.take_once().await.unwrap();
    let k = key(0);
    let seq = |s: &str| ExtendedSequenceNumber::parse(s, 0).unwrap();
    let zombie_holding = zombie.holding(&k).unwrap();
    zombie_holding.checkpoint(&seq("100")).await.unwrap();
    assert!(matches!(
        drain(&mut events).as_slice(),
        [LeaseEvent::Gained(_)]
    ));

    // The zombie pauses (GC, network partition); the other worker sees the lease unchanged
    // for the failover time and takes it.
    other.take_once().await.unwrap();
    clock.advance(F - Duration::from_millis(1));
    assert!(other.take_once().await.unwrap().taken.is_empty());
    clock.advance(Duration::from_millis(1));
    assert_eq!(other.take_once().await.unwrap().taken, vec![k.clone()]);
    other
        .holding(&k)
        .unwrap()
        .checkpoint(&seq("200"))
        .await
        .unwrap();

    // The zombie still believes it holds the lease; its checkpoint is fenced off.
    assert!(zombie.held_lease(&k).is_some());
    let err = zombie_holding.checkpoint(&seq("150")).await.unwrap_err();
    assert!(err.is_condition_failed(), "{err:?}");
    assert!(zombie.held_lease(&k).is_none());
    assert_eq!(
        drain(&mut events),
        vec![LeaseEvent::Lost {
            lease_key: k.clone(),
            reason: LostReason::ConditionFailed
        }]
    );
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(row.checkpoint, seq("200"));
    assert!(row.is_owned_by("other"));
    // Once lost, further writes are refused locally.
    assert!(matches!(
        zombie_holding.checkpoint(&seq("160")).await,
        Err(LeaseError::NotHeld { .. })
    ));
    assert!(zombie.renew_once().await.lost.is_empty());
}

#[tokio::test]
async fn a_steal_is_a_graceful_handoff_and_nobody_is_a_zombie() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let a = coordinator(&store, &clock, "a", 1);
    let b = coordinator(&store, &clock, "b", 2);
    let mut events = a.events().unwrap();
    let mut b_events = b.events().unwrap();
    a.take_once().await.unwrap();
    drain(&mut events);
    // b is owed one of a's two leases: it asks for it (leaseOwner = b, checkpointOwner =
    // a, the counter as it was).
    let report = b.take_once().await.unwrap();
    assert!(
        report.stolen.is_empty() && report.taken.is_empty(),
        "{report:?}"
    );
    assert_eq!(report.handoffs_initiated.len(), 1);
    assert_eq!(report.handoffs_pending, 1);
    let k = report.handoffs_initiated[0].clone();
    let before = a.held_lease(&k).unwrap();
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(
        (
            row.lease_owner.as_deref(),
            row.checkpoint_owner.as_deref(),
            row.lease_counter
        ),
        (Some("b"), Some("a"), before.lease_counter)
    );
    // a's renewal fails on attribute_not_exists(checkpointOwner), reads the row, and
    // renews on the new owners: the lease stays held, its processor is asked to stop.
    clock.advance(F / 3);
    let renew = a.renew_once().await;
    assert_eq!((renew.renewed, renew.lost.len()), (2, 0), "{renew:?}");
    assert_eq!(
        drain(&mut events),
        vec![LeaseEvent::HandoffRequested {
            lease_key: k.clone(),
            next_owner: "b".to_owned()
        }]
    );
    let holding = a.holding(&k).unwrap();
    assert!(holding.is_handing_over());
    // Its processor's last checkpoint lands.
    let seq = ExtendedSequenceNumber::parse("4242", 0).unwrap();
    holding.checkpoint(&seq).await.unwrap();
    // Until the handoff completes, b waits (the lease counts as its).
    let report = b.take_once().await.unwrap();
    assert!(report.taken.is_empty() && report.handoffs_initiated.is_empty());
    assert_eq!(report.handoffs_pending, 1);
    // a completes it: checkpointOwner removed, counter + 1; b takes it from a's checkpoint.
    holding.release().await.unwrap();
    assert!(!holding.is_current());
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(
        (row.lease_owner.as_deref(), row.checkpoint_owner.as_deref()),
        (Some("b"), None)
    );
    assert_eq!(row.owner_switches_since_checkpoint, 1);
    let report = b.take_once().await.unwrap();
    assert_eq!(report.taken, vec![k.clone()]);
    assert_eq!(b.held_lease(&k).unwrap().checkpoint, seq);
    // No Lost event anywhere.
    assert!(drain(&mut events).is_empty());
    assert!(
        drain(&mut b_events)
            .iter()
            .all(|e| matches!(e, LeaseEvent::Gained(_)))
    );
    assert_views_match_table(&store, &[a, b]);
}

#[tokio::test]
async fn a_handoff_not_completed_in_time_is_completed_by_the_next_owner() {
    // The current owner renews but never hands over (a Java KCL 2.x worker ignores the
    // handoff; or its processor hangs): after handoff_timeout the next owner completes the
    // handoff itself, and the current owner learns at its next write that it lost the lease.
    const H: Duration = Duration::from_secs(6);
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let config = |id: &str| LeaseCoordinatorConfig::new(id).with_handoff_timeout(H);
    let a = coordinator_with(&store, &clock, config("a"), 1);
    let b = coordinator_with(&store, &clock, config("b"), 2);
    let mut events = a.events().unwrap();
    a.take_once().await.unwrap();
    drain(&mut events);
    let k = b.take_once().await.unwrap().handoffs_initiated[0].clone();
    let t0 = clock.now();
    loop {
        clock.advance(Duration::from_secs(1));
        a.renew_once().await;
        let report = b.take_once().await.unwrap();
        if !report.stolen.is_empty() {
            assert_eq!(report.stolen, vec![k.clone()]);
            break;
        }
        assert!(clock.now().duration_since(t0) < H, "{report:?}");
    }
    assert_eq!(clock.now().duration_since(t0), H);
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(
        (row.lease_owner.as_deref(), row.checkpoint_owner.as_deref()),
        (Some("b"), None)
    );
    assert!(b.is_held(&k));
    // a's next write fails: lost (its processor is a zombie now, as after a steal).
    let err = a
        .holding(&k)
        .unwrap()
        .checkpoint(&ExtendedSequenceNumber::parse("7", 0).unwrap())
        .await
        .unwrap_err();
    assert!(err.is_condition_failed(), "{err:?}");
    let events = drain(&mut events);
    assert!(events.contains(&LeaseEvent::Lost {
        lease_key: k.clone(),
        reason: LostReason::ConditionFailed
    }));
    assert_views_match_table(&store, &[a, b]);
}

#[tokio::test]
async fn fenced_writes_update_the_held_view() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 1).await;
    let c = coordinator(&store, &clock, "w", 1);
    c.take_once().await.unwrap();
    let k = key(0);
    let esn = ExtendedSequenceNumber::parse("42", 3).unwrap();
    let held = c.holding(&k).unwrap();
    let pending = held.prepare_checkpoint(Some(&esn)).await.unwrap();
    assert_eq!(pending.pending_checkpoint, Some(esn.clone()));
    let children: BTreeSet<String> = ["c1".to_owned(), "c2".to_owned()].into();
    let with_children = held.update_child_shard_ids(&children).await.unwrap();
    assert_eq!(with_children.child_shard_ids, children);
    let done = held
        .checkpoint(&ExtendedSequenceNumber::SHARD_END)
        .await
        .unwrap();
    assert_eq!(done.pending_checkpoint, None);
    assert_eq!(done.lease_counter, 4);
    assert_eq!(c.held_lease(&k), Some(done.clone()));
    assert_eq!(store.get_lease(&k).await.unwrap().unwrap(), done);
}

#[tokio::test]
async fn renewals_skip_recently_written_leases() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let c = coordinator(&store, &clock, "w", 1);
    c.take_once().await.unwrap();
    let r = c.renew_once().await;
    assert_eq!((r.renewed, r.skipped), (0, 2), "just taken");
    clock.advance(F / 3);
    c.holding(&key(0))
        .unwrap()
        .checkpoint(&ExtendedSequenceNumber::LATEST)
        .await
        .unwrap();
    let r = c.renew_once().await;
    assert_eq!((r.renewed, r.skipped), (1, 1), "just checkpointed");
    clock.advance(F / 3);
    let r = c.renew_once().await;
    assert_eq!((r.renewed, r.skipped), (2, 0));
}

#[tokio::test]
async fn deleted_lease_is_lost_and_dropped_lease_is_forgotten() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let c = coordinator(&store, &clock, "w", 1);
    let mut events = c.events().unwrap();
    c.take_once().await.unwrap();
    drain(&mut events);
    // Someone deletes lease 0 behind our back: the next renewal loses it (a conditional
    // write on a missing row fails its condition, as in DynamoDB).
    let row = store.get_lease(&key(0)).await.unwrap().unwrap();
    store.delete_lease(&row).await.unwrap();
    clock.advance(F / 3);
    let r = c.renew_once().await;
    assert_eq!(r.lost, vec![key(0)]);
    assert_eq!(
        drain(&mut events),
        vec![LeaseEvent::Lost {
            lease_key: key(0),
            reason: LostReason::ConditionFailed
        }]
    );
    // The worker deletes lease 1 itself and drops it: no event, no more writes.
    let held = c.held_lease(&key(1)).unwrap();
    store.delete_lease(&held).await.unwrap();
    c.drop_lease(&key(1));
    assert!(c.held_leases().is_empty());
    assert!(drain(&mut events).is_empty());
    clock.advance(F / 3);
    assert_eq!(c.renew_once().await, Default::default());
}

#[tokio::test]
async fn renewals_failing_keep_the_lease_until_the_failover_time() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 1).await;
    let c = coordinator(&store, &clock, "w", 1);
    let mut events = c.events().unwrap();
    c.take_once().await.unwrap();
    drain(&mut events);
    store.inject(Fault::new(FaultKind::Throttle, 100).for_operation(LeaseOperation::RenewLease));
    // Rounds at F/3 and 2F/3 fail and keep the lease.
    for _ in 0..2 {
        clock.advance(F / 3);
        let r = c.renew_once().await;
        assert_eq!(r.failed, 1);
        assert!(r.lost.is_empty());
    }
    // The store comes back: the lease is still ours, renewed at the counter we knew.
    store.clear_faults();
    clock.advance(F / 3 - Duration::from_millis(1));
    assert_eq!(c.renew_once().await.renewed, 1);
    assert!(drain(&mut events).is_empty());

    // Now unreachable for good: after F without a successful write the lease is dropped.
    store.set_unreachable(true);
    let mut lost_at = None;
    for i in 1..=6u32 {
        clock.advance(F / 3);
        let r = c.renew_once().await;
        if !r.lost.is_empty() {
            lost_at = Some(i);
            break;
        }
        assert_eq!(r.failed, 1);
    }
    assert_eq!(
        lost_at,
        Some(3),
        "dropped at the round reaching F after the last write"
    );
    assert_eq!(
        drain(&mut events),
        vec![LeaseEvent::Lost {
            lease_key: key(0),
            reason: LostReason::RenewalTimeout
        }]
    );
    // When the store is back, the lease (still owned by this worker id in the table) is
    // free for this worker at once.
    store.set_unreachable(false);
    assert_eq!(c.take_once().await.unwrap().taken, vec![key(0)]);
}

#[tokio::test]
async fn checkpoint_and_renewal_of_one_lease_never_collide() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 1).await;
    let c = coordinator(&store, &clock, "w", 1);
    c.take_once().await.unwrap();
    store.set_latency(Duration::from_secs(1));
    let k = key(0);
    for i in 0..10u64 {
        clock.advance_and_settle(F / 3).await;
        let before = c.held_lease(&k).unwrap().lease_counter;
        let esn = ExtendedSequenceNumber::parse(&(1000 + i).to_string(), 0).unwrap();
        // Alternate which write starts first; the second starts while the first is in flight.
        let (renew, checkpoint) = if i % 2 == 0 {
            let renew = tokio::spawn({
                let c = Arc::clone(&c);
                async move { c.renew_once().await }
            });
            clock.advance_and_settle(Duration::from_millis(500)).await;
            let checkpoint = tokio::spawn({
                let (c, k) = (Arc::clone(&c), k.clone());
                async move { c.holding(&k).unwrap().checkpoint(&esn).await }
            });
            (renew, checkpoint)
        } else {
            let checkpoint = tokio::spawn({
                let (c, k) = (Arc::clone(&c), k.clone());
                async move { c.holding(&k).unwrap().checkpoint(&esn).await }
            });
            clock.advance_and_settle(Duration::from_millis(500)).await;
            let renew = tokio::spawn({
                let c = Arc::clone(&c);
                async move { c.renew_once().await }
            });
            (renew, checkpoint)
        };
        clock.advance_and_settle(Duration::from_secs(3)).await;
        let checkpoint = checkpoint.await.unwrap().unwrap();
        let renew = renew.await.unwrap();
        assert!(renew.lost.is_empty(), "round {i}: {renew:?}");
        assert_eq!(checkpoint.checkpoint.sequence_str(), (1000 + i).to_string());
        let after = c.held_lease(&k).unwrap().lease_counter;
        // The renewal either ran before the checkpoint or was skipped after it.
        assert!(
            after == before + 2 || after == before + 1,
            "{before} -> {after}"
        );
        assert_eq!(
            store
                .stats()
                .operation(LeaseOperation::UpdateCheckpoint)
                .condition_failures,
            0
        );
    }
    assert_eq!(store.stats().total_condition_failures(), 0);
}

#[tokio::test]
async fn coordinators_survive_throttling_errors_and_outages() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 10).await;
    let cs: Vec<_> = (0..3)
        .map(|i| coordinator(&store, &clock, &format!("w{i}"), 100 + i))
        .collect();
    let mut events: Vec<_> = cs.iter().map(|c| c.events().unwrap()).collect();
    for c in &cs {
        c.spawn();
    }
    clock.advance_and_settle(Duration::from_secs(90)).await;
    assert_eq!(counts(&store, &cs), vec![4, 3, 3]);
    let owners_before: Vec<Option<String>> = store
        .snapshot()
        .into_iter()
        .map(|l| l.lease_owner)
        .collect();
    for e in &mut events {
        drain(e);
    }

    // Bursts of throttling and 500s on every kind of call, then a short outage (less than
    // the failover time minus a renewal interval), then slow calls.
    for burst in 0..5u32 {
        store.throttle_next(3 + burst);
        clock.advance_and_settle(F).await;
        store.fail_next(2 + burst);
        clock.advance_and_settle(F).await;
    }
    store.set_unreachable(true);
    clock.advance_and_settle(F / 3).await;
    store.set_unreachable(false);
    store.set_latency(Duration::from_millis(300));
    clock.advance_and_settle(2 * F).await;
    store.clear_faults();
    clock.advance_and_settle(2 * F).await;

    let owners_after: Vec<Option<String>> = store
        .snapshot()
        .into_iter()
        .map(|l| l.lease_owner)
        .collect();
    assert_eq!(
        owners_before, owners_after,
        "the store allowed keeping every lease"
    );
    for e in &mut events {
        let lost: Vec<_> = drain(e)
            .into_iter()
            .filter(|e| matches!(e, LeaseEvent::Lost { .. }))
            .collect();
        assert!(lost.is_empty(), "{lost:?}");
    }
    assert!(cs.iter().all(|c| c.is_running()));
    assert!(store.stats().total_faults() > 0);

    // A long outage: everybody drops its leases as lost, then takes them back.
    store.set_unreachable(true);
    clock.advance_and_settle(2 * F).await;
    for (c, e) in cs.iter().zip(&mut events) {
        assert!(
            c.held_leases().is_empty(),
            "{} still holds leases",
            c.worker_id()
        );
        let lost = drain(e);
        assert!(!lost.is_empty());
        assert!(lost.iter().all(|e| matches!(
            e,
            LeaseEvent::Lost {
                reason: LostReason::RenewalTimeout,
                ..
            }
        )));
    }
    store.set_unreachable(false);
    clock.advance_and_settle(3 * F).await;
    assert_eq!(owners(&store).get(&None), None);
    clock.advance_and_settle(6 * F).await;
    assert_eq!(counts(&store, &cs), vec![4, 3, 3]);
    for c in &cs {
        assert!(c.is_running());
        c.stop().await;
    }
    assert_views_match_table(&store, &cs);
}

#[tokio::test]
async fn stop_then_drop_ends_the_loops_and_writes_nothing_more() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 3).await;
    let c = coordinator(&store, &clock, "w", 1);
    let handle = c.spawn();
    clock.advance_and_settle(F).await;
    assert_eq!(c.held_leases().len(), 3);
    handle.stop().await;
    assert!(!handle.is_running());
    let writes = store.stats().total_writes();
    let calls = store.stats().total_calls();
    drop(c);
    clock.advance_and_settle(5 * F).await;
    assert_eq!(store.stats().total_writes(), writes);
    assert_eq!(store.stats().total_calls(), calls);
    assert_eq!(clock.pending_sleepers(), 0);
    // Leases are still owned by "w": nothing was released.
    assert_eq!(owners(&store).get(&Some("w".to_owned())), Some(&3));
}

#[tokio::test]
async fn dropping_the_last_reference_stops_the_loops() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 3).await;
    let c = coordinator(&store, &clock, "w", 1);
    let handle = c.spawn();
    clock.advance_and_settle(F).await;
    drop(c);
    clock.advance_and_settle(F).await;
    assert!(!handle.is_running());
    assert_eq!(clock.pending_sleepers(), 0);
}

#[tokio::test]
async fn taker_in_steady_state_lists_every_take_interval_and_renewer_every_third() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 4).await;
    let c = coordinator(&store, &clock, "w", 1);
    c.spawn();
    clock.advance_and_settle(F).await;
    store.reset_stats();
    clock.advance_and_settle(Duration::from_secs(60)).await;
    let stats = store.stats();
    let lists = stats.operation(LeaseOperation::ListLeases).calls;
    let renews = stats.operation(LeaseOperation::RenewLease).writes;
    // Taker every 4-5 s (F/2 minus up to F/10 of jitter): 12 to 15 passes a minute.
    assert!((12..=15).contains(&lists), "{lists} lists a minute");
    // Renewals every F/3: 18 a minute per lease.
    assert_eq!(renews, 18 * 4);
    c.stop().await;
}

/// Delays renewals by a settable time on the manual clock; everything else goes straight
/// through.
#[derive(Debug)]
struct SlowRenewals {
    inner: Arc<InMemoryLeaseStore>,
    clock: ManualClock,
    renew_delay: Mutex<Duration>,
}

#[async_trait::async_trait]
impl LeaseStore for SlowRenewals {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }
    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.inner.table_exists().await
    }
    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.inner.create_lease_if_not_exists(lease).await
    }
    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.inner.list_leases().await
    }
    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.inner.get_lease(lease_key).await
    }
    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError> {
        let delay = *self.renew_delay.lock().unwrap();
        self.clock.sleep(delay).await;
        self.inner.renew_lease(lease, throughput_kbps).await
    }
    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        self.inner.take_lease(lease, new_owner).await
    }
    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.inner.release_lease(lease).await
    }
    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_checkpoint(lease, checkpoint).await
    }
    async fn update_pending_checkpoint(
        &self,
        lease: &Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_pending_checkpoint(lease, pending).await
    }
    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.inner.update_child_shard_ids(lease, children).await
    }
    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(lease).await
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.inner.client_version().await
    }
}

#[tokio::test]
async fn a_late_result_of_an_old_holding_never_touches_a_new_one() {
    let clock = ManualClock::new();
    let inner = seeded_store(&clock, 1).await;
    let store = Arc::new(SlowRenewals {
        inner: Arc::clone(&inner),
        clock: clock.clone(),
        renew_delay: Mutex::new(Duration::from_secs(5)),
    });
    let c = LeaseCoordinator::new(
        Arc::clone(&store) as Arc<dyn LeaseStore>,
        LeaseCoordinatorConfig::new("w").with_failover_time(F),
        Arc::new(clock.clone()),
        Arc::new(SeededRandom::new(1)),
    )
    .unwrap();
    let mut events = c.events().unwrap();
    let k = key(0);
    c.take_once().await.unwrap();
    clock.advance(F / 3);
    // A renewal starts and hangs in the store (based on counter 1).
    let renewal = tokio::spawn({
        let c = Arc::clone(&c);
        async move { c.renew_once().await }
    });
    clock.settle().await;
    // Meanwhile the worker gives the lease up locally and its taker takes it again (the
    // table still names this worker, so it is free for it at once): counter 2.
    c.drop_lease(&k);
    assert_eq!(c.take_once().await.unwrap().taken, vec![k.clone()]);
    assert_eq!(c.held_lease(&k).unwrap().lease_counter, 2);
    drain(&mut events);
    // The old renewal now fails its condition; that must not lose the new holding.
    clock.advance_and_settle(Duration::from_secs(5)).await;
    let report = renewal.await.unwrap();
    assert_eq!(report.lost, Vec::<String>::new());
    assert_eq!(c.held_lease(&k).unwrap().lease_counter, 2);
    assert!(drain(&mut events).is_empty());
    // And the new holding renews normally.
    *store.renew_delay.lock().unwrap() = Duration::ZERO;
    clock.advance(F / 3);
    assert_eq!(c.renew_once().await.renewed, 1);
    assert_eq!(inner.get_lease(&k).await.unwrap().unwrap().lease_counter, 3);
}

/// A row as a Java KCL 3.x graceful handoff leaves it: `leaseOwner` the next owner,
/// `checkpointOwner` the current one, the counter standing still.
fn in_handoff(i: usize, next: &str, current: &str, counter: u64) -> Lease {
    let mut lease = Lease::new(key(i), ExtendedSequenceNumber::TRIM_HORIZON);
    lease.lease_owner = Some(next.to_owned());
    lease.checkpoint_owner = Some(current.to_owned());
    lease.lease_counter = counter;
    lease
}

#[tokio::test]
async fn a_lease_in_a_java_handoff_is_taken_only_after_failover_plus_handoff_timeout() {
    const H: Duration = Duration::from_secs(30);
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 0).await;
    let seeded = in_handoff(0, "java-new", "java-old", 7);
    store.create_lease_if_not_exists(&seeded).await.unwrap();
    let me = coordinator_with(
        &store,
        &clock,
        LeaseCoordinatorConfig::new("me").with_handoff_timeout(H),
        1,
    );
    // Neither free nor expired, nor stolen, until the counter stood still for F + H.
    let t0 = clock.now();
    while clock.now().duration_since(t0) < F + H {
        let report = me.take_once().await.unwrap();
        assert!(
            report.taken.is_empty() && report.stolen.is_empty(),
            "taken after {:?}: {report:?}",
            clock.now().duration_since(t0)
        );
        assert_eq!(store.get_lease(&key(0)).await.unwrap().unwrap(), seeded);
        clock.advance(Duration::from_millis(2500));
    }
    assert_eq!(clock.now().duration_since(t0), F + H);
    let report = me.take_once().await.unwrap();
    assert_eq!(report.taken, vec![key(0)]);
    // The take ends the handoff: checkpointOwner removed, the counter moved.
    let row = store.get_lease(&key(0)).await.unwrap().unwrap();
    assert_eq!(row.lease_owner.as_deref(), Some("me"));
    assert_eq!(row.checkpoint_owner, None);
    assert_eq!(row.lease_counter, 8);
    assert_eq!(row.owner_switches_since_checkpoint, 1);
}

#[tokio::test]
async fn a_handoff_that_completes_restarts_the_expiry_and_the_default_timeout_is_30_s() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 0).await;
    let seeded = in_handoff(0, "java-new", "java-old", 7);
    store.create_lease_if_not_exists(&seeded).await.unwrap();
    let config = LeaseCoordinatorConfig::new("me");
    assert_eq!(config.handoff_timeout, Duration::from_secs(30));
    let me = coordinator_with(&store, &clock, config, 1);
    assert!(me.take_once().await.unwrap().taken.is_empty());
    // Just before F + 30 s the handoff completes: the new owner writes the lease.
    clock.advance(F + Duration::from_secs(29));
    assert!(me.take_once().await.unwrap().taken.is_empty());
    let seen = store.get_lease(&key(0)).await.unwrap().unwrap();
    let completed = store.take_lease(&seen, "java-new").await.unwrap();
    assert_eq!(completed.checkpoint_owner, None);
    clock.advance(Duration::from_secs(1));
    // Now an ordinary lease of a live worker: one worker holds it, so it is not stolen
    // (target 1 for "me" but stealing the only lease of a worker at target is refused)...
    assert!(me.take_once().await.unwrap().taken.is_empty());
    // ...and it expires F after its last change, if "java-new" dies.
    clock.advance(F - Duration::from_secs(1));
    assert!(me.take_once().await.unwrap().taken.is_empty());
    clock.advance(Duration::from_secs(1));
    assert_eq!(me.take_once().await.unwrap().taken, vec![key(0)]);
}

#[tokio::test]
async fn leases_in_a_handoff_are_never_stolen() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 0).await;
    for i in 0..4 {
        store
            .create_lease_if_not_exists(&in_handoff(i, "java-new", "java-old", 3))
            .await
            .unwrap();
    }
    let me = coordinator(&store, &clock, "me", 1);
    for _ in 0..4 {
        let report = me.take_once().await.unwrap();
        assert!(
            report.taken.is_empty() && report.stolen.is_empty(),
            "{report:?}"
        );
        clock.advance(Duration::from_secs(1));
    }
}

#[tokio::test]
async fn renewals_write_the_delivered_bytes_as_smoothed_throughput_kbps() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 1).await;
    let me = coordinator(&store, &clock, "me", 1);
    me.take_once().await.unwrap();
    let holding = me.holding(&key(0)).unwrap();
    let row = || async { store.get_lease(&key(0)).await.unwrap().unwrap() };
    assert_eq!(row().await.throughput_kbps, None);
    // 8 KiB in 4 s: 2 KB/s (the first renewal of a holding writes the rate alone).
    holding.record_delivered_bytes(4096);
    holding.record_delivered_bytes(4096);
    clock.advance(Duration::from_secs(4));
    assert_eq!(me.renew_once().await.renewed, 1);
    assert_eq!(row().await.throughput_kbps, Some(2.0));
    // Nothing in the next 4 s: half of 0 plus half of 2.
    clock.advance(Duration::from_secs(4));
    assert_eq!(me.renew_once().await.renewed, 1);
    assert_eq!(row().await.throughput_kbps, Some(1.0));
    // A failed renewal keeps its bytes for the next one: 4 KiB over 8 s = 0.5 KB/s, averaged
    // with 1.0.
    holding.record_delivered_bytes(4096);
    clock.advance(Duration::from_secs(4));
    store.throttle_next(1);
    assert_eq!(me.renew_once().await.failed, 1);
    assert_eq!(row().await.throughput_kbps, Some(1.0));
    clock.advance(Duration::from_secs(4));
    assert_eq!(me.renew_once().await.renewed, 1);
    assert_eq!(row().await.throughput_kbps, Some(0.75));
    // A checkpoint keeps the value; the next owner's take too.
    let checkpointed = holding
        .checkpoint(&ExtendedSequenceNumber::parse("17", 0).unwrap())
        .await
        .unwrap();
    assert_eq!(checkpointed.throughput_kbps, Some(0.75));
}

#[tokio::test]
async fn with_an_owner_that_ignores_the_handoff_it_degrades_to_a_steal_after_the_timeout() {
    // A Java KCL 2.x worker renews on the counter alone and never looks at
    // checkpointOwner: it keeps renewing and processing the lease asked for. The next owner
    // completes the handoff after handoff_timeout; the 2.x worker's next renewal, fenced on
    // the counter it last wrote, then fails: it lost the lease, as after a steal.
    const H: Duration = Duration::from_secs(8);
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    for i in 0..2 {
        let free = store.get_lease(&key(i)).await.unwrap().unwrap();
        store.take_lease(&free, "java2").await.unwrap();
    }
    let me = coordinator_with(
        &store,
        &clock,
        LeaseCoordinatorConfig::new("me").with_handoff_timeout(H),
        1,
    );
    let report = me.take_once().await.unwrap();
    assert_eq!(report.handoffs_initiated.len(), 1, "{report:?}");
    let k = report.handoffs_initiated[0].clone();
    let t0 = clock.now();
    let mut java_view = store.get_lease(&k).await.unwrap().unwrap();
    loop {
        clock.advance(Duration::from_secs(1));
        // The 2.x worker's renewal: counter + 1, nothing else (here through our store,
        // which fences on the row as it is, with the same effect).
        let row = store.get_lease(&k).await.unwrap().unwrap();
        if row.lease_counter != java_view.lease_counter {
            // Its counter-only condition fails: it lost the lease.
            break;
        }
        java_view = store.renew_lease(&row, None).await.unwrap();
        let report = me.take_once().await.unwrap();
        assert!(
            clock.now().duration_since(t0) <= H,
            "not completed after {H:?}: {report:?}"
        );
    }
    assert_eq!(clock.now().duration_since(t0), H + Duration::from_secs(1));
    assert!(me.is_held(&k));
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(
        (row.lease_owner.as_deref(), row.checkpoint_owner.as_deref()),
        (Some("me"), None)
    );
}

#[tokio::test]
async fn a_release_of_a_lease_asked_for_meanwhile_hands_it_over() {
    let clock = ManualClock::new();
    let store = seeded_store(&clock, 2).await;
    let a = coordinator(&store, &clock, "a", 1);
    let b = coordinator(&store, &clock, "b", 2);
    a.take_once().await.unwrap();
    let k = b.take_once().await.unwrap().handoffs_initiated[0].clone();
    // a stops before any renewal told it: its release finds the handoff and completes it.
    let report = a.release_all().await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.released.len(), 2);
    let row = store.get_lease(&k).await.unwrap().unwrap();
    assert_eq!(
        (row.lease_owner.as_deref(), row.checkpoint_owner.as_deref()),
        (Some("b"), None)
    );
    assert_eq!(b.take_once().await.unwrap().taken.len(), 2);
}
