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
mod join;
mod taker;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Instant;

use kcl_kpl::ExtendedSequenceNumber;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use self::config::{
    DEFAULT_FAILOVER_TIME, LeaseCoordinatorConfig, MAX_FAILOVER_TIME, MIN_FAILOVER_TIME,
};
use self::join::join_all_limited;

/// The most store requests one renewal round, taker pass or release has in flight at once.
const MAX_CONCURRENT_WRITES: usize = 64;
use self::taker::{ExpiryTracker, PlanInput, plan_take};
use crate::{Clock, Lease, LeaseError, LeaseStore, RandomSource};

/// Why a lease was lost.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum LostReason {
    /// A fenced write (renewal, checkpoint, ...) found another owner or counter: another
    /// worker took the lease, or it was changed behind this worker's back.
    ConditionFailed,
    /// The lease no longer exists in the table.
    Deleted,
    /// Renewals kept failing (throttling, store unreachable) for about `failover_time`,
    /// after which other workers may take the lease.
    RenewalTimeout,
}

impl LostReason {
    /// A short human explanation.
    pub fn message(&self) -> &'static str {
        match self {
            LostReason::ConditionFailed => "the lease was taken or changed by another worker",
            LostReason::Deleted => "the lease was deleted",
            LostReason::RenewalTimeout => "renewals failed for the whole failover time",
        }
    }

    fn label(self) -> &'static str {
        match self {
            LostReason::ConditionFailed => "condition_failed",
            LostReason::Deleted => "deleted",
            LostReason::RenewalTimeout => "renewal_timeout",
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// A change of the held set, reported on [`LeaseCoordinator::events`].
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum LeaseEvent {
    /// This worker took the lease (the row as written by the take).
    Gained(Lease),
    /// This worker lost the lease: its processor must stop (shutdown reason `Zombie`).
    Lost {
        /// The lease key.
        lease_key: String,
        /// Why.
        reason: LostReason,
    },
}

impl LeaseEvent {
    /// The key of the lease concerned.
    pub fn lease_key(&self) -> &str {
        match self {
            LeaseEvent::Gained(lease) => &lease.lease_key,
            LeaseEvent::Lost { lease_key, .. } => lease_key,
        }
    }
}

/// What one [`LeaseCoordinator::renew_once`] round did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct RenewReport {
    /// Leases renewed.
    pub renewed: usize,
    /// Leases skipped because they were written recently.
    pub skipped: usize,
    /// Leases whose renewal failed transiently and that are still held.
    pub failed: usize,
    /// Leases lost in this round.
    pub lost: Vec<String>,
}

/// What one [`LeaseCoordinator::take_once`] pass did.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct TakeReport {
    /// Leases in the table.
    pub leases_in_table: usize,
    /// Workers counted (other live owners plus this worker).
    pub workers: usize,
    /// Leases this worker should hold.
    pub target: usize,
    /// Free leases taken in this pass.
    pub taken: Vec<String>,
    /// Leases stolen from another worker in this pass.
    pub stolen: Vec<String>,
    /// Leases held after the pass.
    pub held: usize,
}

/// What [`LeaseCoordinator::release_all`] did. Every lease left the held set.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ReleaseReport {
    /// Leases released in the table.
    pub released: Vec<String>,
    /// Leases that were already lost (condition failed or deleted): nothing to release.
    pub already_lost: Vec<String>,
    /// Leases whose release failed; they expire for other workers after `failover_time`.
    pub failed: Vec<(String, LeaseError)>,
}

impl ReleaseReport {
    /// True when no release failed.
    pub fn is_complete(&self) -> bool {
        self.failed.is_empty()
    }
}

/// A handle on the loops started by [`LeaseCoordinator::spawn`].
///
/// Dropping it does not stop the loops; they stop on [`CoordinatorHandle::stop`],
/// [`LeaseCoordinator::stop`], or when the coordinator itself is dropped.
#[derive(Clone, Debug)]
pub struct CoordinatorHandle {
    coordinator: Weak<LeaseCoordinator>,
}

impl CoordinatorHandle {
    /// Stops the loops (see [`LeaseCoordinator::stop`]).
    pub async fn stop(&self) {
        if let Some(coordinator) = self.coordinator.upgrade() {
            coordinator.stop().await;
        }
    }

    /// True while the loops run.
    pub fn is_running(&self) -> bool {
        self.coordinator
            .upgrade()
            .is_some_and(|coordinator| coordinator.is_running())
    }
}

/// One lease in the held set.
#[derive(Debug)]
struct HeldLease {
    /// The row as last written by this worker.
    lease: Lease,
    /// Local time of the last successful write.
    last_write: Instant,
    /// Distinguishes successive holdings of the same key: a write that started on an older
    /// holding never changes a newer one.
    generation: u64,
    /// Serializes the writes of this lease.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

/// The running loops.
#[derive(Debug)]
struct Loops {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

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

/// What happened to one lease in a renewal round.
enum RenewOutcome {
    Renewed,
    Skipped,
    Failed,
    Lost(String),
    NotHeld,
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

    // ---------------------------------------------------------------- held set

    fn held_entry(&self, key: &str) -> Option<(u64, Arc<tokio::sync::Mutex<()>>)> {
        lock(&self.held)
            .get(key)
            .map(|h| (h.generation, Arc::clone(&h.write_lock)))
    }

    /// The held view and its last write time, if `key` is still the same holding.
    fn view(&self, key: &str, generation: u64) -> Option<(Lease, Instant)> {
        lock(&self.held)
            .get(key)
            .filter(|h| h.generation == generation)
            .map(|h| (h.lease.clone(), h.last_write))
    }

    fn record_write(&self, generation: u64, written: &Lease) {
        let now = self.clock.now();
        if let Some(h) = lock(&self.held).get_mut(&written.lease_key)
            && h.generation == generation
        {
            h.lease = written.clone();
            h.last_write = now;
        }
    }

    /// Removes `key` if still the same holding; true when removed.
    fn remove(&self, key: &str, generation: Option<u64>) -> bool {
        let removed = {
            let mut held = lock(&self.held);
            let matches = held
                .get(key)
                .is_some_and(|h| generation.is_none_or(|g| g == h.generation));
            if matches {
                held.remove(key);
            }
            matches
        };
        if removed {
            self.publish_held_gauge();
        }
        removed
    }

    fn lose(&self, key: &str, generation: u64, reason: LostReason) -> bool {
        if !self.remove(key, Some(generation)) {
            return false;
        }
        tracing::warn!(worker_id = %self.config.worker_id, lease_key = %key, %reason, "lease lost");
        metrics::counter!(
            "kcl_leases_lost_total",
            "worker_id" => self.config.worker_id.clone(),
            "reason" => reason.label()
        )
        .increment(1);
        self.send_event(LeaseEvent::Lost {
            lease_key: key.to_owned(),
            reason,
        });
        true
    }

    /// Queues an event for the receiver handed out by `events()`; dropped while nobody took
    /// it (so an unused coordinator does not accumulate events).
    fn send_event(&self, event: LeaseEvent) {
        if self.events_taken.load(Ordering::SeqCst) {
            let _ = self.events_tx.send(event);
        }
    }

    fn gain(&self, lease: Lease, stolen: bool) {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now();
        lock(&self.held).insert(
            lease.lease_key.clone(),
            HeldLease {
                lease: lease.clone(),
                last_write: now,
                generation,
                write_lock: Arc::new(tokio::sync::Mutex::new(())),
            },
        );
        self.publish_held_gauge();
        let name = if stolen {
            "kcl_leases_stolen_total"
        } else {
            "kcl_leases_taken_total"
        };
        metrics::counter!(name, "worker_id" => self.config.worker_id.clone()).increment(1);
        tracing::info!(
            worker_id = %self.config.worker_id,
            lease_key = %lease.lease_key,
            lease_counter = lease.lease_counter,
            stolen,
            "lease taken"
        );
        self.send_event(LeaseEvent::Gained(lease));
    }

    fn publish_held_gauge(&self) {
        let count = lock(&self.held).len();
        metrics::gauge!("kcl_leases_held", "worker_id" => self.config.worker_id.clone())
            .set(count as f64);
    }

    /// Gives up `lease_key` locally, without writing and without a [`LeaseEvent::Lost`]
    /// (for example after the worker deleted the lease). A write of it in progress completes
    /// but does not put it back.
    pub fn drop_lease(&self, lease_key: &str) {
        if self.remove(lease_key, None) {
            tracing::debug!(worker_id = %self.config.worker_id, lease_key, "lease dropped locally");
        }
    }

    // ---------------------------------------------------------------- fenced writes

    /// Runs one fenced write of a held lease under its write lock, and applies the outcome
    /// to the held set: success updates the view; a failed condition or a missing lease
    /// loses the lease (with an event); other errors change nothing.
    async fn fenced_write<F, Fut>(
        &self,
        lease_key: &str,
        holding: Option<u64>,
        write: F,
    ) -> Result<Lease, LeaseError>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = Result<Lease, LeaseError>>,
    {
        let not_held = || LeaseError::NotHeld {
            lease_key: lease_key.to_owned(),
        };
        let (generation, write_lock) = self
            .held_entry(lease_key)
            .filter(|(g, _)| holding.is_none_or(|h| h == *g))
            .ok_or_else(not_held)?;
        let _guard = write_lock.lock().await;
        let (lease, _) = self.view(lease_key, generation).ok_or_else(not_held)?;
        let result = write(lease.clone()).await;
        let result = self.recover_spurious_failure(&lease, result).await;
        self.apply_write_result(lease_key, generation, result).0
    }

    /// Runs `fut` for at most `limit` on the injected clock.
    async fn within<T>(
        &self,
        limit: std::time::Duration,
        fut: impl Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            out = fut => Some(out),
            _ = self.clock.sleep(limit) => None,
        }
    }

    /// A conditional write that failed its condition may in fact have been applied: the
    /// client retried after a timeout or reset and the retry found the row already changed
    /// by the first attempt. Writes of one lease by this worker are serialised, and another
    /// worker can only change the row by taking it (a new owner), so a row that still names
    /// the owner seen, one counter above the value seen, was written by this very call.
    async fn recover_spurious_failure(
        &self,
        seen: &Lease,
        result: Result<Lease, LeaseError>,
    ) -> Result<Lease, LeaseError> {
        let Err(LeaseError::ConditionFailed { .. }) = &result else {
            return result;
        };
        match self.store.get_lease(&seen.lease_key).await {
            Ok(Some(row))
                if row.lease_owner.is_some()
                    && row.lease_owner == seen.lease_owner
                    && row.lease_counter == seen.lease_counter.saturating_add(1) =>
            {
                tracing::info!(
                    worker_id = %self.config.worker_id,
                    lease_key = %seen.lease_key,
                    "conditional write failed but had been applied (client retry); recovered"
                );
                Ok(row)
            }
            _ => result,
        }
    }

    /// Applies the result of a fenced write of holding `generation`. The flag is true when
    /// the write lost the lease (it was still that holding and the condition failed).
    fn apply_write_result(
        &self,
        lease_key: &str,
        generation: u64,
        result: Result<Lease, LeaseError>,
    ) -> (Result<Lease, LeaseError>, bool) {
        match result {
            Ok(written) => {
                self.record_write(generation, &written);
                (Ok(written), false)
            }
            Err(err @ LeaseError::ConditionFailed { .. }) => {
                let lost = self.lose(lease_key, generation, LostReason::ConditionFailed);
                (Err(err), lost)
            }
            Err(err @ LeaseError::NotFound { .. }) => {
                let lost = self.lose(lease_key, generation, LostReason::Deleted);
                (Err(err), lost)
            }
            Err(err) => (Err(err), false),
        }
    }

    /// Writes a checkpoint into a held lease (fenced on owner and the counter last written by
    /// this worker), removing any pending checkpoint. On success returns the new row. A
    /// failed condition loses the lease ([`LeaseEvent::Lost`]) and returns the error;
    /// [`LeaseError::NotHeld`] when the lease is not held.
    pub async fn checkpoint(
        &self,
        lease_key: &str,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.checkpoint_write(lease_key, None, checkpoint).await
    }

    /// [`LeaseCoordinator::checkpoint`] within one holding (see
    /// [`LeaseCoordinator::holding`]).
    pub async fn checkpoint_in(
        &self,
        lease_key: &str,
        holding: u64,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.checkpoint_write(lease_key, Some(holding), checkpoint)
            .await
    }

    async fn checkpoint_write(
        &self,
        lease_key: &str,
        holding: Option<u64>,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(lease_key, holding, |lease| async move {
            store.update_checkpoint(&lease, checkpoint).await
        })
        .await
    }

    /// Writes (`Some`) or removes (`None`) the pending checkpoint of a held lease; fenced and
    /// reported as [`LeaseCoordinator::checkpoint`].
    pub async fn prepare_checkpoint(
        &self,
        lease_key: &str,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.prepare_write(lease_key, None, pending).await
    }

    /// [`LeaseCoordinator::prepare_checkpoint`] within one holding.
    pub async fn prepare_checkpoint_in(
        &self,
        lease_key: &str,
        holding: u64,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.prepare_write(lease_key, Some(holding), pending).await
    }

    async fn prepare_write(
        &self,
        lease_key: &str,
        holding: Option<u64>,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(lease_key, holding, |lease| async move {
            store.update_pending_checkpoint(&lease, pending).await
        })
        .await
    }

    /// Records the child shard ids of a held lease; fenced and reported as
    /// [`LeaseCoordinator::checkpoint`].
    pub async fn update_child_shard_ids(
        &self,
        lease_key: &str,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.children_write(lease_key, None, children).await
    }

    /// [`LeaseCoordinator::update_child_shard_ids`] within one holding.
    pub async fn update_child_shard_ids_in(
        &self,
        lease_key: &str,
        holding: u64,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.children_write(lease_key, Some(holding), children)
            .await
    }

    async fn children_write(
        &self,
        lease_key: &str,
        holding: Option<u64>,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        let store = &self.store;
        self.fenced_write(lease_key, holding, |lease| async move {
            store.update_child_shard_ids(&lease, children).await
        })
        .await
    }

    // ---------------------------------------------------------------- renewer

    /// One renewal round over every held lease, concurrently (see the module docs).
    pub async fn renew_once(&self) -> RenewReport {
        let keys = self.held_keys();
        let outcomes = join_all_limited(
            keys.iter().map(|key| self.renew_lease(key)),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut report = RenewReport::default();
        for outcome in outcomes {
            match outcome {
                RenewOutcome::Renewed => report.renewed += 1,
                RenewOutcome::Skipped => report.skipped += 1,
                RenewOutcome::Failed => report.failed += 1,
                RenewOutcome::Lost(key) => report.lost.push(key),
                RenewOutcome::NotHeld => {}
            }
        }
        report
    }

    async fn renew_lease(&self, key: &str) -> RenewOutcome {
        let Some((generation, write_lock)) = self.held_entry(key) else {
            return RenewOutcome::NotHeld;
        };
        // Bounded waits: a write of this lease in flight (a slow checkpoint) or a hung store
        // call must not stall the whole renewal round.
        let bound = self.config.renew_interval();
        let Some(_guard) = self.within(bound, write_lock.lock()).await else {
            // Another write of this lease is stuck. Past the deadline since the last
            // successful write the lease is lost: others are about to take it.
            let stale = self.view(key, generation).is_some_and(|(_, last_write)| {
                self.clock.now().saturating_duration_since(last_write) >= self.renewal_deadline()
            });
            if stale && self.lose(key, generation, LostReason::RenewalTimeout) {
                return RenewOutcome::Lost(key.to_owned());
            }
            return RenewOutcome::Failed;
        };
        let Some((lease, last_write)) = self.view(key, generation) else {
            return RenewOutcome::NotHeld;
        };
        let now = self.clock.now();
        let since_write = now.saturating_duration_since(last_write);
        if since_write < self.config.renew_interval() / 2 {
            return RenewOutcome::Skipped;
        }
        let result = match self.within(bound, self.store.renew_lease(&lease)).await {
            Some(result) => self.recover_spurious_failure(&lease, result).await,
            None => Err(LeaseError::Unreachable {
                source: format!("renewal took longer than {bound:?}").into(),
            }),
        };
        let succeeded = result.is_ok();
        metrics::counter!(
            "kcl_lease_renewals_total",
            "worker_id" => self.config.worker_id.clone(),
            "result" => if succeeded { "success" } else { "failure" }
        )
        .increment(1);
        match self.apply_write_result(key, generation, result) {
            (Ok(_), _) => RenewOutcome::Renewed,
            (Err(_), true) => RenewOutcome::Lost(key.to_owned()),
            (Err(LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. }), false) => {
                // A newer holding (or none) replaced the one this renewal started on.
                RenewOutcome::NotHeld
            }
            (Err(err), false) => {
                let since_write = self.clock.now().saturating_duration_since(last_write);
                if since_write >= self.renewal_deadline() {
                    if self.lose(key, generation, LostReason::RenewalTimeout) {
                        RenewOutcome::Lost(key.to_owned())
                    } else {
                        RenewOutcome::NotHeld
                    }
                } else {
                    tracing::warn!(
                        worker_id = %self.config.worker_id,
                        lease_key = %key,
                        error = %crate::ErrorChain(&err),
                        since_last_write = ?since_write,
                        "lease renewal failed; retrying next round"
                    );
                    RenewOutcome::Failed
                }
            }
        }
    }

    /// How long after its last successful write a lease whose renewals fail is dropped:
    /// `failover_time` less half a renewal interval, so that the round falling at about
    /// `failover_time` drops it (rounds are `failover_time / 3` apart, which is not exact
    /// in nanoseconds) and never a round later.
    fn renewal_deadline(&self) -> std::time::Duration {
        self.config
            .failover_time
            .saturating_sub(self.config.renew_interval() / 2)
    }

    // ---------------------------------------------------------------- taker

    /// One taker pass: lists the table, updates the expiry bookkeeping, takes every owed free
    /// lease, or steals (see the module docs). Fails only when the table cannot be listed.
    pub async fn take_once(&self) -> Result<TakeReport, LeaseError> {
        let _serial = self.take_lock.lock().await;
        let leases = self.store.list_leases().await?;
        let now = self.clock.now();
        let plan = {
            let held = lock(&self.held);
            let held_keys: HashSet<String> = held.keys().cloned().collect();
            let held_active = held.values().filter(|h| !h.lease.is_finished()).count();
            drop(held);
            let mut tracker = lock(&self.tracker);
            tracker.observe(&leases, now);
            let input = PlanInput {
                me: &self.config.worker_id,
                held: &held_keys,
                held_active,
                failover_time: self.config.failover_time,
                max_leases_for_worker: self.config.max_leases_for_worker,
                max_leases_to_steal: self.config.max_leases_to_steal_at_one_time,
                now,
            };
            plan_take(&leases, &tracker, &input, self.random.as_ref())
        };
        let mut report = TakeReport {
            leases_in_table: leases.len(),
            workers: plan.workers,
            target: plan.target,
            ..TakeReport::default()
        };

        let me = self.config.worker_id.as_str();
        let mut needed = plan.needed;
        let mut free = plan.candidates.into_iter();
        while needed > 0 {
            let batch: Vec<Lease> = free.by_ref().take(needed).collect();
            if batch.is_empty() {
                break;
            }
            let results = join_all_limited(
                batch.iter().map(|l| self.store.take_lease(l, me)),
                MAX_CONCURRENT_WRITES,
            )
            .await;
            let mut store_failing = false;
            for (lease, result) in batch.iter().zip(results) {
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

        for lease in plan.steal {
            match self.store.take_lease(&lease, me).await {
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
        report.held = lock(&self.held).len();
        Ok(report)
    }

    /// When the taker should run next, at the latest `latest`: earlier if a lease of another
    /// worker expires before that.
    fn next_take_at(&self, latest: Instant) -> Instant {
        let now = self.clock.now();
        let held: HashSet<String> = lock(&self.held).keys().cloned().collect();
        let expiry = lock(&self.tracker).next_expiry(
            &self.config.worker_id,
            &held,
            self.config.failover_time,
            now,
        );
        match expiry {
            Some(at) if at < latest => at,
            _ => latest,
        }
    }

    // ---------------------------------------------------------------- release

    /// Releases a held lease (graceful shutdown): fenced on owner and counter, removes the
    /// owner. The lease leaves the held set whatever the outcome and no
    /// [`LeaseEvent::Lost`] is sent. [`LeaseError::NotHeld`] when not held;
    /// [`LeaseError::ConditionFailed`] when it had already been taken or changed.
    pub async fn release(&self, lease_key: &str) -> Result<(), LeaseError> {
        self.release_write(lease_key, None).await
    }

    /// [`LeaseCoordinator::release`] of one holding only: [`LeaseError::NotHeld`] when the
    /// lease was lost (and perhaps gained again) since.
    pub async fn release_in(&self, lease_key: &str, holding: u64) -> Result<(), LeaseError> {
        self.release_write(lease_key, Some(holding)).await
    }

    async fn release_write(&self, lease_key: &str, holding: Option<u64>) -> Result<(), LeaseError> {
        let not_held = || LeaseError::NotHeld {
            lease_key: lease_key.to_owned(),
        };
        let (generation, write_lock) = self
            .held_entry(lease_key)
            .filter(|(g, _)| holding.is_none_or(|h| h == *g))
            .ok_or_else(not_held)?;
        let _guard = write_lock.lock().await;
        let (lease, _) = self.view(lease_key, generation).ok_or_else(not_held)?;
        let result = self.store.release_lease(&lease).await;
        self.remove(lease_key, Some(generation));
        match &result {
            Ok(_) => {
                tracing::info!(worker_id = %self.config.worker_id, lease_key, "lease released")
            }
            Err(err) => tracing::warn!(
                worker_id = %self.config.worker_id,
                lease_key,
                error = %crate::ErrorChain(&err),
                "lease release failed"
            ),
        }
        result.map(|_| ())
    }

    /// Releases every held lease concurrently. The held set is empty afterwards.
    pub async fn release_all(&self) -> ReleaseReport {
        let keys = self.held_keys();
        let results = join_all_limited(
            keys.iter().map(|key| self.release(key)),
            MAX_CONCURRENT_WRITES,
        )
        .await;
        let mut report = ReleaseReport::default();
        for (key, result) in keys.into_iter().zip(results) {
            match result {
                Ok(()) => report.released.push(key),
                Err(
                    LeaseError::ConditionFailed { .. }
                    | LeaseError::NotFound { .. }
                    | LeaseError::NotHeld { .. },
                ) => report.already_lost.push(key),
                Err(err) => report.failed.push((key, err)),
            }
        }
        report
    }

    // ---------------------------------------------------------------- loops

    /// Starts the renewer and taker loops on the current tokio runtime (see the module
    /// docs). Calling it while they run returns a handle on the running loops.
    ///
    /// Outside a tokio runtime nothing is started: an error is logged and
    /// [`CoordinatorHandle::is_running`] is false.
    pub fn spawn(self: &Arc<Self>) -> CoordinatorHandle {
        let handle = CoordinatorHandle {
            coordinator: Arc::downgrade(self),
        };
        let mut loops = lock(&self.loops);
        if loops.is_some() {
            return handle;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                worker_id = %self.config.worker_id,
                "LeaseCoordinator::spawn called outside a tokio runtime; loops not started"
            );
            return handle;
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let renewer = runtime.spawn(renew_loop(Arc::downgrade(self), stop_rx.clone()));
        let taker = runtime.spawn(take_loop(Arc::downgrade(self), stop_rx));
        *loops = Some(Loops {
            stop: stop_tx,
            tasks: vec![renewer, taker],
        });
        handle
    }

    /// Stops the loops and waits for them to end (a round in progress completes). Releases
    /// nothing and keeps the held set: used before [`LeaseCoordinator::release_all`] on
    /// graceful shutdown, or before dropping the coordinator to simulate a crash.
    pub async fn stop(&self) {
        let loops = lock(&self.loops).take();
        if let Some(loops) = loops {
            let _ = loops.stop.send(true);
            for task in loops.tasks {
                let _ = task.await;
            }
            tracing::info!(worker_id = %self.config.worker_id, "lease coordinator stopped");
        }
    }
}

impl Drop for LeaseCoordinator {
    fn drop(&mut self) {
        if let Some(loops) = lock(&self.loops).take() {
            let _ = loops.stop.send(true);
        }
    }
}

/// Waits for `sleep` or a stop signal; true when stopped.
async fn sleep_or_stop(sleep: impl Future<Output = ()>, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        () = sleep => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

async fn renew_loop(coordinator: Weak<LeaseCoordinator>, mut stop: watch::Receiver<bool>) {
    loop {
        let sleep = {
            let Some(this) = coordinator.upgrade() else {
                return;
            };
            let report = this.renew_once().await;
            tracing::trace!(worker_id = %this.config.worker_id, ?report, "renewal round");
            this.clock.sleep(this.config.renew_interval())
        };
        if sleep_or_stop(sleep, &mut stop).await {
            return;
        }
    }
}

async fn take_loop(coordinator: Weak<LeaseCoordinator>, mut stop: watch::Receiver<bool>) {
    loop {
        let sleep = {
            let Some(this) = coordinator.upgrade() else {
                return;
            };
            match this.take_once().await {
                Ok(report) => {
                    tracing::trace!(worker_id = %this.config.worker_id, ?report, "taker pass")
                }
                Err(err) => tracing::warn!(
                    worker_id = %this.config.worker_id,
                    error = %crate::ErrorChain(&err),
                    "taker pass failed to list leases"
                ),
            }
            let now = this.clock.now();
            let interval = this
                .config
                .take_interval()
                .saturating_sub(this.random.jitter(this.config.take_jitter()));
            let at = this.next_take_at(now.checked_add(interval).unwrap_or(now));
            this.clock.sleep(at.saturating_duration_since(now))
        };
        if sleep_or_stop(sleep, &mut stop).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    #[derive(Debug)]
    struct NoStore;

    #[async_trait::async_trait]
    impl LeaseStore for NoStore {
        async fn create_table_if_not_exists(
            &self,
            _: crate::BillingMode,
        ) -> Result<bool, LeaseError> {
            Ok(false)
        }
        async fn table_exists(&self) -> Result<bool, LeaseError> {
            Ok(true)
        }
        async fn create_lease_if_not_exists(&self, _: &Lease) -> Result<bool, LeaseError> {
            Ok(false)
        }
        async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
            Ok(Vec::new())
        }
        async fn get_lease(&self, _: &str) -> Result<Option<Lease>, LeaseError> {
            Ok(None)
        }
        async fn renew_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn take_lease(&self, l: &Lease, _: &str) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn release_lease(&self, l: &Lease) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn update_checkpoint(
            &self,
            l: &Lease,
            _: &ExtendedSequenceNumber,
        ) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn update_pending_checkpoint(
            &self,
            l: &Lease,
            _: Option<&ExtendedSequenceNumber>,
        ) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn update_child_shard_ids(
            &self,
            l: &Lease,
            _: &BTreeSet<String>,
        ) -> Result<Lease, LeaseError> {
            Err(LeaseError::NotFound {
                lease_key: l.lease_key.clone(),
            })
        }
        async fn delete_lease(&self, _: &Lease) -> Result<(), LeaseError> {
            Ok(())
        }
    }

    fn coordinator(worker: &str) -> Result<Arc<LeaseCoordinator>, LeaseError> {
        LeaseCoordinator::new(
            Arc::new(NoStore),
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
