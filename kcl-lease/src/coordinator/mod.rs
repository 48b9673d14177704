//! The lease coordinator: renews the leases this worker holds, takes the leases it is owed
//! (stealing when needed), releases them on graceful shutdown, and fences checkpoint
//! writes (SPEC section 5).
//!
//! # How it works
//!
//! A [`LeaseCoordinator`] keeps the *held set*: the leases this worker holds, each with the
//! last row it wrote (its counter is what the next conditional write is based on) and the
//! local time of its last successful write. All writes of one lease (renewal, checkpoint,
//! pending checkpoint, child shard ids, release) are serialized by a per-lease async mutex, so
//! a renewal never makes a concurrent checkpoint fail its condition.
//!
//! [`LeaseCoordinator::spawn`] starts two tokio tasks, both sleeping on the injected
//! [`Clock`]:
//!
//! * the **renewer** runs at once, then every `failover_time / 3`;
//! * the **taker** runs at once, then after `failover_time / 2` minus a random jitter of up
//!   to `failover_time / 10` (from the injected [`RandomSource`]), or earlier when a lease
//!   of another worker is due to expire before that (see *Failover time* below).
//!
//! [`LeaseCoordinator::stop`] ends both loops (finishing a round in progress); it does not
//! release anything. Tests may also call [`LeaseCoordinator::renew_once`] and
//! [`LeaseCoordinator::take_once`] directly.
//!
//! # Expiry
//!
//! Expiry is judged locally, never from timestamps written by other hosts. For every lease
//! key the taker remembers the counter and owner it last listed and the local
//! [`Clock::now`] at which it first saw them. A lease owned by another worker is *expired*
//! when that counter has been unchanged for `failover_time`. A lease seen for the first
//! time starts its timer then (so a worker that just started waits a full `failover_time`
//! before taking a silent worker's leases). Unowned leases are free at once, and so are
//! leases the table shows owned by this worker id but not in the held set (a previous
//! incarnation of this worker, or a lease this worker gave up after its renewals failed).
//!
//! # Renewal
//!
//! Each round renews every held lease concurrently (`leaseCounter = seen AND leaseOwner =
//! me`). A lease written successfully less than `failover_time / 6` ago (by a checkpoint, a
//! take, or a renewal) is skipped: that write already told the other workers it is alive,
//! and the next round renews it at most `failover_time / 2` after the write. Outcomes:
//!
//! * success: the held view takes the new row;
//! * condition failed: the lease was taken or changed: it leaves the held set and
//!   [`LeaseEvent::Lost`] with [`LostReason::ConditionFailed`] is sent;
//! * not found: deleted by someone: lost with [`LostReason::Deleted`];
//! * any other error (throttled, unreachable, ...): the lease is kept and retried next round,
//!   until about `failover_time` has passed since its last successful write (precisely: the
//!   first failed round at least `failover_time - failover_time / 6` after it, which is the
//!   round at `failover_time`): then the other workers may consider it expired, so it is
//!   dropped as lost with [`LostReason::RenewalTimeout`].
//!
//! # Taking and stealing
//!
//! A taker pass lists the whole table, updates the expiry bookkeeping and then:
//!
//! * finished leases (checkpoint `SHARD_END`) are ignored: never taken, never counted;
//! * `workers` = distinct owners of the live (not expired) leases of other workers, plus
//!   this worker; `target = ceil(unfinished leases / workers)`, capped by
//!   `max_leases_for_worker`; `needed = target - unfinished leases held`;
//! * the free leases (unowned, expired, or owned by this worker id but not held) are taken,
//!   longest unchanged first (ties in random order so workers starting together collide
//!   less), all `needed` of them in one pass and concurrently. A take that fails (someone
//!   else was faster) is skipped and the next free lease is tried, until `needed` are taken
//!   or the free leases run out. A throttled or failed take ends the pass's taking;
//! * only when no lease is free and `needed > 0`, the taker steals from the most loaded
//!   other worker (ties at random), choosing its leases at random: up to
//!   `min(load - target, needed, max_leases_to_steal_at_one_time)` leases when that worker
//!   holds more than `target`, or one lease when it holds exactly `target` and this worker
//!   needs at least two more. No lease is stolen while some lease of another worker has
//!   been unchanged for `failover_time / 2` or more: a live owner writes every lease at
//!   least that often, so such a lease is about to expire and will be taken instead (this
//!   keeps a survivor from stealing from another survivor that just took a dead worker's
//!   leases, on a view that still counts the dead worker). Every steal moves a lease from a worker holding `c` to one
//!   holding `m <= c - 2`, so the sum of squared loads strictly decreases: stealing always
//!   stops, and it stops only when no two workers differ by more than one (for example 4/3/3
//!   for 10 leases on 3 workers). It never oscillates.
//!
//! A successful take adds the lease to the held set and sends [`LeaseEvent::Gained`].
//!
//! # Failover time
//!
//! A crashed worker's leases are taken by a survivor within `1.5 x failover_time` of its
//! last renewal: the survivor's next listing (at most `failover_time / 2` later) sees the
//! final counter; `failover_time` after that listing the lease is expired, and the taker
//! wakes at exactly that moment instead of waiting for its next regular pass.
//!
//! # Releasing
//!
//! [`LeaseCoordinator::release`] (graceful shutdown) writes `leaseOwner = me AND
//! leaseCounter = seen` -> no owner, so another worker takes the lease at its next taker pass.
//! The lease leaves the held set whatever the outcome, and no [`LeaseEvent::Lost`] is sent.
//! [`LeaseCoordinator::drop_lease`] forgets a lease locally without writing.
//!
//! # Example
//!
//! Two workers share three leases on the in-memory store of `kcl_lease::test_util`, with a manual
//! clock; the taker and renewer are driven by hand here (a worker calls
//! [`LeaseCoordinator::spawn`] instead).
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use kcl_kpl::ExtendedSequenceNumber;
//! use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig, LeaseEvent};
//! use kcl_lease::{Lease, LeaseStore, SeededRandom};
//! use kcl_lease::test_util::{ManualClock, InMemoryLeaseStore};
//!
//! let clock = ManualClock::new();
//! let store = Arc::new(InMemoryLeaseStore::new().with_table());
//! for shard in ["shard-0", "shard-1", "shard-2"] {
//!     store.create_lease_if_not_exists(&Lease::new(shard, ExtendedSequenceNumber::TRIM_HORIZON)).await?;
//! }
//! let worker = |id: &str| {
//!     LeaseCoordinator::new(
//!         store.clone(),
//!         LeaseCoordinatorConfig::new(id).with_failover_time(Duration::from_secs(10)),
//!         Arc::new(clock.clone()),
//!         Arc::new(SeededRandom::new(7)),
//!     )
//! };
//! let (a, b) = (worker("a")?, worker("b")?);
//! let mut a_events = a.events().unwrap();
//!
//! // Alone, `a` takes every free lease in one pass.
//! assert_eq!(a.take_once().await?.taken.len(), 3);
//! assert!(matches!(a_events.try_recv(), Ok(LeaseEvent::Gained(_))));
//! // `b` is owed ceil(3 / 2) = 2 leases; none is free, so it steals one per pass.
//! assert_eq!(b.take_once().await?.stolen.len(), 1);
//!
//! // `a` learns at its next renewal that it lost the stolen lease.
//! clock.advance(Duration::from_secs(4));
//! let report = a.renew_once().await;
//! assert_eq!((report.renewed, report.lost.len()), (2, 1));
//!
//! // Checkpoints are fenced writes through the coordinator.
//! let key = a.held_keys()[0].clone();
//! let seq = ExtendedSequenceNumber::parse("4960", 0)?;
//! assert_eq!(a.checkpoint(&key, &seq).await?.checkpoint, seq);
//!
//! // Graceful shutdown: release everything; `b` takes it at its next pass.
//! assert!(a.release_all().await.is_complete());
//! assert_eq!(b.take_once().await?.taken.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Metrics and logs
//!
//! Through the `metrics` facade, labelled with `worker_id`: gauge `kcl_leases_held`, counters
//! `kcl_lease_renewals_total` (label `result` = `success` / `failure`),
//! `kcl_leases_lost_total` (label `reason`), `kcl_leases_taken_total`,
//! `kcl_leases_stolen_total`. `tracing` events carry `worker_id` and `lease_key`.

mod config;
mod events;
mod fenced;
mod held;
mod join;
mod loops;
mod release;
mod renewer;
mod taker;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

pub use self::config::{
    DEFAULT_FAILOVER_TIME, LeaseCoordinatorConfig, MAX_FAILOVER_TIME, MIN_FAILOVER_TIME,
};
pub use self::events::{LeaseEvent, LostReason, ReleaseReport, RenewReport, TakeReport};
use self::held::HeldLease;
pub use self::loops::CoordinatorHandle;
use self::loops::Loops;
use self::taker::ExpiryTracker;
use crate::{Clock, Lease, LeaseError, LeaseStore, RandomSource};

/// The most store requests one renewal round, taker pass or release has in flight at once.
const MAX_CONCURRENT_WRITES: usize = 64;

/// Renews, takes, steals and releases leases for one worker; see the module docs.
pub struct LeaseCoordinator {
    store: Arc<dyn LeaseStore>,
    config: LeaseCoordinatorConfig,
    clock: Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    held: Mutex<BTreeMap<String, HeldLease>>,
    tracker: Mutex<ExpiryTracker>,
    take_lock: tokio::sync::Mutex<()>,
    next_generation: AtomicU64,
    events_tx: mpsc::UnboundedSender<LeaseEvent>,
    events_rx: Mutex<Option<mpsc::UnboundedReceiver<LeaseEvent>>>,
    /// Set once `events()` handed the receiver out: events are only queued from then on.
    events_taken: std::sync::atomic::AtomicBool,
    loops: Mutex<Option<Loops>>,
}

impl fmt::Debug for LeaseCoordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseCoordinator")
            .field("worker_id", &self.config.worker_id)
            .field("config", &self.config)
            .field("held", &self.held_keys())
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}

/// Locks a std mutex, ignoring poisoning (no code here panics while holding one).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl LeaseCoordinator {
    /// A coordinator for `config.worker_id` on `store`. Validates the configuration.
    /// Nothing runs until [`LeaseCoordinator::spawn`] (or the `*_once` methods are called).
    pub fn new(
        store: Arc<dyn LeaseStore>,
        config: LeaseCoordinatorConfig,
        clock: Arc<dyn Clock>,
        random: Arc<dyn RandomSource>,
    ) -> Result<Arc<Self>, LeaseError> {
        config.validate()?;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Self {
            store,
            config,
            clock,
            random,
            held: Mutex::new(BTreeMap::new()),
            tracker: Mutex::new(ExpiryTracker::default()),
            take_lock: tokio::sync::Mutex::new(()),
            next_generation: AtomicU64::new(1),
            events_tx,
            events_rx: Mutex::new(Some(events_rx)),
            events_taken: std::sync::atomic::AtomicBool::new(false),
            loops: Mutex::new(None),
        }))
    }

    /// The receiver of [`LeaseEvent`]s. The first call returns it, later calls `None`.
    /// Events are sent whether or not it was taken (and dropped if nobody listens).
    pub fn events(&self) -> Option<mpsc::UnboundedReceiver<LeaseEvent>> {
        let rx = lock(&self.events_rx).take();
        if rx.is_some() {
            self.events_taken.store(true, Ordering::SeqCst);
        }
        rx
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.config.worker_id
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseCoordinatorConfig {
        &self.config
    }

    /// The leases held, as last written by this worker, in key order.
    pub fn held_leases(&self) -> Vec<Lease> {
        lock(&self.held).values().map(|h| h.lease.clone()).collect()
    }

    /// The held lease `key`, as last written by this worker.
    pub fn held_lease(&self, key: &str) -> Option<Lease> {
        lock(&self.held).get(key).map(|h| h.lease.clone())
    }

    /// The held lease `key` with the id of this holding (a new id each time the lease is
    /// gained). Writes made "in" a holding fail with [`LeaseError::NotHeld`] once the lease
    /// was lost, even if it was gained again since: a processor of an earlier holding can
    /// never write into a later one.
    pub fn holding(&self, key: &str) -> Option<(Lease, u64)> {
        lock(&self.held)
            .get(key)
            .map(|h| (h.lease.clone(), h.generation))
    }

    /// True when `lease_key` is in the held set.
    pub fn is_held(&self, lease_key: &str) -> bool {
        lock(&self.held).contains_key(lease_key)
    }

    /// The keys of the held leases, in order.
    pub fn held_keys(&self) -> Vec<String> {
        lock(&self.held).keys().cloned().collect()
    }

    /// True while the loops started by [`LeaseCoordinator::spawn`] run.
    pub fn is_running(&self) -> bool {
        lock(&self.loops).is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use kcl_kpl::ExtendedSequenceNumber;
    use tokio::sync::watch;

    use super::loops::{renew_loop, take_loop};
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    fn coordinator(worker: &str) -> Result<Arc<LeaseCoordinator>, LeaseError> {
        LeaseCoordinator::new(
            Arc::new(crate::test_util::InMemoryLeaseStore::new().with_table()),
            LeaseCoordinatorConfig::new(worker),
            Arc::new(crate::SystemClock),
            Arc::new(crate::SeededRandom::new(1)),
        )
    }

    #[test]
    fn public_futures_are_send() {
        let c = coordinator("w").unwrap();
        let esn = ExtendedSequenceNumber::TRIM_HORIZON;
        let children = BTreeSet::new();
        assert_send(&c.renew_once());
        assert_send(&c.take_once());
        assert_send(&c.release("k"));
        assert_send(&c.release_all());
        assert_send(&c.stop());
        assert_send(&c.checkpoint("k", &esn));
        assert_send(&c.prepare_checkpoint("k", Some(&esn)));
        assert_send(&c.update_child_shard_ids("k", &children));
        assert_send(&renew_loop(Arc::downgrade(&c), watch::channel(false).1));
        assert_send(&take_loop(Arc::downgrade(&c), watch::channel(false).1));
    }

    #[test]
    fn invalid_config_is_rejected() {
        let err = coordinator("").unwrap_err();
        assert!(matches!(
            err,
            LeaseError::InvalidConfig {
                option: "worker_id",
                ..
            }
        ));
    }

    #[test]
    fn events_taken_once_and_not_held_errors() {
        let c = coordinator("w").unwrap();
        assert!(c.events().is_some());
        assert!(c.events().is_none());
        assert_eq!(c.worker_id(), "w");
        assert!(c.held_leases().is_empty());
        assert!(!c.is_held("k"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt
            .block_on(c.checkpoint("k", &ExtendedSequenceNumber::LATEST))
            .unwrap_err();
        assert!(matches!(err, LeaseError::NotHeld { .. }));
        assert!(matches!(
            rt.block_on(c.release("k")),
            Err(LeaseError::NotHeld { .. })
        ));
        c.drop_lease("k");
    }

    #[test]
    fn spawn_outside_runtime_does_not_panic() {
        let c = coordinator("w").unwrap();
        let handle = c.spawn();
        assert!(!handle.is_running());
        assert!(!c.is_running());
    }

    #[tokio::test]
    async fn spawn_and_stop() {
        let c = coordinator("w").unwrap();
        let handle = c.spawn();
        assert!(handle.is_running());
        let again = c.spawn();
        assert!(again.is_running());
        handle.stop().await;
        assert!(!c.is_running());
        assert!(!again.is_running());
    }

    #[test]
    fn lost_reason_display() {
        assert_eq!(
            LostReason::RenewalTimeout.to_string(),
            "renewals failed for the whole failover time"
        );
        let e = LeaseEvent::Lost {
            lease_key: "k".into(),
            reason: LostReason::Deleted,
        };
        assert_eq!(e.lease_key(), "k");
    }
}
