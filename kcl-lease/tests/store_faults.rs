//! The coordinator against a lease store that hangs or answers oddly, on the in-memory store
//! with injected faults and a manual clock: every hung call comes back within the call
//! timeout, a hung write never stalls a renewal round, a worker cut off from the store gives
//! its leases up after the failover time and takes them back once the store answers, and a
//! write the client retried (already applied) is not taken as a loss.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::sync::Arc;
use std::time::Duration;

use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::coordinator::{
    LeaseCoordinator, LeaseCoordinatorConfig, LeaseEvent, LostReason, RenewReport,
};
use kcl_lease::test_util::ManualClock;
use kcl_lease::test_util::lease_store::{Fault, FaultKind, InMemoryLeaseStore, LeaseOperation};
use kcl_lease::{BillingMode, CallTimeouts, Clock, Lease, LeaseError, LeaseStore, SeededRandom};
use tokio::sync::mpsc::UnboundedReceiver;

const F: Duration = Duration::from_secs(9);
/// The call timeout of these tests: shorter than a renewal interval (`F / 3`).
const CALL: Duration = Duration::from_secs(2);

fn seq(s: &str) -> ExtendedSequenceNumber {
    ExtendedSequenceNumber::parse(s, 0).unwrap()
}

async fn setup_with(
    clock: &ManualClock,
    timeouts: CallTimeouts,
) -> (Arc<InMemoryLeaseStore>, Arc<LeaseCoordinator>) {
    let store = Arc::new(InMemoryLeaseStore::new().with_clock(Arc::new(clock.clone())));
    store
        .create_table_if_not_exists(BillingMode::PayPerRequest)
        .await
        .unwrap();
    for k in ["k0", "k1"] {
        store
            .create_lease_if_not_exists(&Lease::new(k, ExtendedSequenceNumber::TRIM_HORIZON))
            .await
            .unwrap();
    }
    let c = LeaseCoordinator::new(
        store.clone(),
        LeaseCoordinatorConfig::new("w")
            .with_failover_time(F)
            .with_call_timeouts(timeouts),
        Arc::new(clock.clone()),
        Arc::new(SeededRandom::new(3)),
    )
    .unwrap();
    (store, c)
}

/// A coordinator holding "k0" and "k1", with call timeout [`CALL`].
async fn setup(clock: &ManualClock) -> (Arc<InMemoryLeaseStore>, Arc<LeaseCoordinator>) {
    let (store, c) = setup_with(clock, CallTimeouts::new(Duration::from_secs(1), CALL)).await;
    c.take_once().await.unwrap();
    assert_eq!(c.held_keys(), ["k0", "k1"]);
    (store, c)
}

/// Runs one renewal round while moving the clock, so bounded waits can time out.
async fn round(c: &LeaseCoordinator, clock: &ManualClock) -> RenewReport {
    let (report, ()) = tokio::join!(c.renew_once(), async {
        for _ in 0..4 {
            clock.advance_and_settle(F / 3).await;
        }
    });
    report
}

/// Runs `call` in a task and checks that it is still pending just before `CALL` has passed
/// on the clock and done exactly then; returns its output.
async fn returns_after_call_timeout<T: Send + 'static>(
    clock: &ManualClock,
    call: impl Future<Output = T> + Send + 'static,
) -> T {
    let start = clock.now();
    let task = tokio::spawn(call);
    clock.settle().await;
    clock
        .advance_and_settle(CALL - Duration::from_millis(1))
        .await;
    assert!(!task.is_finished(), "returned before the call timeout");
    clock.advance_and_settle(Duration::from_millis(1)).await;
    assert!(task.is_finished(), "still pending after the call timeout");
    assert_eq!(clock.now() - start, CALL);
    task.await.unwrap()
}

fn assert_timeout(result: Result<impl std::fmt::Debug, LeaseError>, operation: &str) {
    match result {
        Err(
            err @ LeaseError::Timeout {
                operation: op,
                after,
            },
        ) => {
            assert_eq!((op, after), (operation, CALL));
            assert!(err.is_retryable());
            assert!(err.to_string().contains(operation), "{err}");
        }
        other => panic!("expected a timeout of {operation}, got {other:?}"),
    }
}

fn drain(events: &mut UnboundedReceiver<LeaseEvent>) -> Vec<LeaseEvent> {
    let mut out = Vec::new();
    while let Ok(event) = events.try_recv() {
        out.push(event);
    }
    out
}

#[tokio::test]
async fn a_hung_list_fails_the_pass_within_the_call_timeout() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    store.set_hanging(true);
    let result = returns_after_call_timeout(&clock, {
        let c = c.clone();
        async move { c.take_once().await }
    })
    .await;
    assert_timeout(result, "list_leases");
    assert_eq!(c.held_keys(), ["k0", "k1"]);
}

#[tokio::test]
async fn a_hung_take_ends_the_pass_within_the_call_timeout() {
    let clock = ManualClock::new();
    let (store, c) = setup_with(&clock, CallTimeouts::new(Duration::from_secs(1), CALL)).await;
    store.inject(Fault::new(FaultKind::Hang, 1).for_operation(LeaseOperation::TakeLease));
    let report = returns_after_call_timeout(&clock, {
        let c = c.clone();
        async move { c.take_once().await }
    })
    .await
    .unwrap();
    // Both takes ran concurrently: one answered, the hung one was abandoned.
    assert_eq!(report.taken.len(), 1, "{report:?}");
    assert_eq!(report.held, 1);
    // The next pass takes the other one.
    assert_eq!(c.take_once().await.unwrap().taken.len(), 1);
    assert_eq!(c.held_keys(), ["k0", "k1"]);
}

#[tokio::test]
async fn a_hung_checkpoint_fails_within_the_call_timeout_and_keeps_the_lease() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    store.inject(
        Fault::new(FaultKind::Hang, 1)
            .for_operation(LeaseOperation::UpdateCheckpoint)
            .for_key("k0"),
    );
    let held = c.holding("k0").unwrap();
    let result = returns_after_call_timeout(&clock, {
        let held = held.clone();
        async move { held.checkpoint(&seq("5")).await }
    })
    .await;
    assert_timeout(result, "update_checkpoint");
    // Nothing lost: the checkpoint may be retried in the same holding.
    assert!(held.is_current());
    assert!(drain(&mut events).is_empty());
    assert_eq!(
        held.checkpoint(&seq("5")).await.unwrap().checkpoint,
        seq("5")
    );
}

#[tokio::test]
async fn a_hung_release_fails_within_the_call_timeout_and_ends_the_holding() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    store.inject(Fault::new(FaultKind::Hang, 1).for_operation(LeaseOperation::ReleaseLease));
    let held = c.holding("k0").unwrap();
    let result = returns_after_call_timeout(&clock, {
        let held = held.clone();
        async move { held.release().await }
    })
    .await;
    assert_timeout(result, "release_lease");
    assert!(!held.is_current());
    assert_eq!(c.held_keys(), ["k1"]);
    // The row still names this worker: it expires for the others after the failover time.
    assert!(
        store
            .get_lease("k0")
            .await
            .unwrap()
            .unwrap()
            .is_owned_by("w")
    );
    // A hung release_all reports the failure and still empties the held set.
    store.set_hanging(true);
    let report = returns_after_call_timeout(&clock, {
        let c = c.clone();
        async move { c.release_all().await }
    })
    .await;
    assert!(!report.is_complete());
    assert_eq!(report.failed.len(), 1);
    assert!(c.held_keys().is_empty());
}

#[tokio::test]
async fn a_hung_write_does_not_stall_renewals_and_its_lease_is_lost_after_the_deadline() {
    let clock = ManualClock::new();
    // A call timeout far longer than the failover time: the checkpoint of k0 keeps its write
    // lock for the whole test.
    let (store, c) = setup_with(
        &clock,
        CallTimeouts::new(Duration::from_secs(4), Duration::from_secs(300)),
    )
    .await;
    c.take_once().await.unwrap();
    let mut events = c.events().unwrap();
    store.inject(
        Fault::new(FaultKind::Hang, 1)
            .for_operation(LeaseOperation::UpdateCheckpoint)
            .for_key("k0"),
    );
    let stuck = {
        let held = c.holding("k0").unwrap();
        tokio::spawn(async move {
            let _ = held.checkpoint(&seq("5")).await;
        })
    };
    clock.settle().await;
    let mut lost = None;
    for i in 1..=6 {
        clock.advance(F / 3);
        let report = round(&c, &clock).await;
        // The healthy lease is renewed every round, whatever k0's write does.
        assert!(c.is_held("k1"), "round {i}: {report:?}");
        if report.lost == ["k0"] {
            lost = Some(i);
            break;
        }
    }
    assert!(lost.is_some(), "k0 never given up");
    assert!(!c.is_held("k0"));
    match events.try_recv().unwrap() {
        LeaseEvent::Lost { lease_key, reason } => {
            assert_eq!(lease_key, "k0");
            assert_eq!(reason, LostReason::RenewalTimeout);
        }
        other => panic!("{other:?}"),
    }
    stuck.abort();
}

#[tokio::test]
async fn a_worker_cut_off_from_the_store_gives_its_leases_up_and_takes_them_back() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    let before: Vec<_> = ["k0", "k1"].iter().map(|k| c.holding(k).unwrap()).collect();
    let handle = c.spawn();
    clock.advance_and_settle(F).await;
    assert!(drain(&mut events).is_empty(), "healthy: nothing happens");
    let last_renewal = clock.now();

    // The store stops answering (every call hangs for good).
    store.set_hanging(true);
    clock.advance_and_settle(F - F / 3).await;
    assert_eq!(
        c.held_keys(),
        ["k0", "k1"],
        "kept while the failover time runs"
    );
    clock.advance_and_settle(F / 3 + F / 6).await;
    let lost = drain(&mut events);
    assert_eq!(
        lost,
        ["k0", "k1"]
            .map(|k| LeaseEvent::Lost {
                lease_key: k.to_owned(),
                reason: LostReason::RenewalTimeout
            })
            .to_vec(),
    );
    assert!(c.held_keys().is_empty());
    // Given up within the failover time (plus one renewal interval and a hung call) of
    // the last renewal that reached the store.
    assert!(clock.now() - last_renewal <= F + F / 3 + CALL);
    // Their processors are zombies now: the old holdings refuse to write.
    for held in &before {
        assert!(!held.is_current());
        assert!(matches!(
            held.checkpoint(&seq("9")).await,
            Err(LeaseError::NotHeld { .. })
        ));
    }
    // Still cut off: nothing is taken back.
    clock.advance_and_settle(F).await;
    assert!(c.held_keys().is_empty());
    assert!(drain(&mut events).is_empty());

    // The store answers again: the taker takes the worker's share back at its next pass.
    store.set_hanging(false);
    clock
        .advance_and_settle(F / 2 + CALL + Duration::from_secs(1))
        .await;
    assert_eq!(c.held_keys(), ["k0", "k1"]);
    let gained = drain(&mut events);
    assert_eq!(gained.len(), 2, "{gained:?}");
    assert!(gained.iter().all(|e| matches!(e, LeaseEvent::Gained(_))));
    let after = c.holding("k0").unwrap();
    assert!(!before.contains(&after), "a new holding");
    assert_eq!(
        after.checkpoint(&seq("9")).await.unwrap().checkpoint,
        seq("9")
    );
    handle.stop().await;
}

#[tokio::test]
async fn a_renewal_applied_then_reported_as_failed_is_recovered() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    let before = store.get_lease("k0").await.unwrap().unwrap().lease_counter;
    clock.advance(F / 3);
    // A first attempt of each renewal reached the table; the coordinator's call is the
    // client's retry, which finds the condition no longer holds.
    for k in ["k0", "k1"] {
        let row = store.get_lease(k).await.unwrap().unwrap();
        store.renew_lease(&row, None).await.unwrap();
    }
    let report = c.renew_once().await;
    assert_eq!(report.renewed, 2, "{report:?}");
    assert!(report.lost.is_empty());
    assert!(events.try_recv().is_err(), "no Lost event");
    // The local view follows the table, so the next renewal succeeds.
    let row = store.get_lease("k0").await.unwrap().unwrap();
    assert_eq!(row.lease_counter, before + 1);
    assert_eq!(c.held_lease("k0").unwrap().lease_counter, before + 1);
    clock.advance(F / 3);
    assert_eq!(c.renew_once().await.renewed, 2);
}

#[tokio::test]
async fn a_hung_reread_after_a_failed_condition_keeps_the_failure() {
    let clock = ManualClock::new();
    let (store, c) = setup(&clock).await;
    let mut events = c.events().unwrap();
    // Another worker takes k0; this worker's checkpoint fails its condition and the re-read
    // that would tell a retried write from a loss hangs.
    let row = store.get_lease("k0").await.unwrap().unwrap();
    store.take_lease(&row, "other").await.unwrap();
    store.inject(Fault::new(FaultKind::Hang, 1).for_operation(LeaseOperation::GetLease));
    let held = c.holding("k0").unwrap();
    let result = returns_after_call_timeout(&clock, {
        let held = held.clone();
        async move { held.checkpoint(&seq("5")).await }
    })
    .await;
    assert!(result.unwrap_err().is_condition_failed());
    assert!(!held.is_current());
    assert_eq!(
        drain(&mut events),
        [LeaseEvent::Lost {
            lease_key: "k0".to_owned(),
            reason: LostReason::ConditionFailed
        }]
    );
}
