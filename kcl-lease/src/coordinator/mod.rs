//! The lease coordinator of one worker: it keeps the leases the worker holds alive, takes
//! the leases the worker is owed (stealing from a busier worker when none is free), releases
//! them on a graceful shutdown, and is the only way the worker writes a lease, so that every
//! write is fenced.
//!
//! # The held set and holdings
//!
//! A [`LeaseCoordinator`] keeps the *held set*: for every lease this worker holds, the row as
//! this worker last wrote it (its counter is what the next conditional write is conditioned
//! on) and the local time of that write. A lease's writes (renewal, checkpoint, pending
//! checkpoint, child shard ids, release) are serialized by a per-lease async mutex, so a
//! renewal never makes a concurrent checkpoint fail its condition.
//!
//! Each time the lease is gained a new *holding* starts; it ends when the lease is lost,
//! released or dropped. [`LeaseCoordinator::holding`] returns a [`Holding`] handle bound to
//! the current one, and every write of a lease goes through such a handle: once its holding
//! ended the handle's writes fail with [`LeaseError::NotHeld`] without reaching the table,
//! even if the worker has gained the lease again since. A processor working for an earlier
//! holding therefore never writes into a later one.
//!
//! [`LeaseCoordinator::spawn`] starts two tokio tasks, both sleeping on the injected
//! [`Clock`]:
//!
//! * the **renewer** runs at once, then every `failover_time / 3`;
//! * the **taker** runs at once, then after `failover_time / 2` minus a random jitter of up
//!   to `failover_time / 10` (drawn from the injected [`RandomSource`]), or earlier when a
//!   lease of another worker is due to expire before that (see *Failover time* below).
//!
//! [`LeaseCoordinator::stop`] ends both loops (a round in progress finishes first) and
//! releases nothing. Tests may call [`LeaseCoordinator::renew_once`] and
//! [`LeaseCoordinator::take_once`] themselves instead.
//!
//! # Every store call is bounded
//!
//! A store that stops answering (a dead NAT or load balancer keeps the connection open and
//! never replies) must not stall the worker. Every store call the coordinator makes (list,
//! get, take, renew, release, checkpoint, pending checkpoint, child shard ids, and the
//! re-read after a failed condition) is bounded by `call_timeouts.call` of the
//! configuration on the injected clock; a call still pending then is dropped and reported as
//! [`LeaseError::Timeout`], which is retryable like a throttled or unreachable call.
//! Renewals are bounded by the shorter of that and one renewal interval, so one round never
//! runs into the next. A worker cut off from the store for `failover_time` therefore gives
//! its leases up (as below, [`LostReason::RenewalTimeout`]) at about the moment the other
//! workers may take them, and its taker takes its share again once the store answers.
//!
//! # Expiry
//!
//! Expiry is judged on this worker's clock alone, never from times written by other hosts.
//! For every lease key the taker remembers the counter and owner of its last listing and the
//! local [`Clock::now`] at which it first saw that pair. A lease owned by another worker has
//! *expired* once that pair has stayed the same for `failover_time`. A lease seen for the
//! first time starts its timer then, so a worker that just started waits a whole
//! `failover_time` before taking a silent worker's leases. Unowned leases are free at once,
//! and so are leases the table shows owned by this worker id but missing from the held set
//! (left by a previous run of this worker, or given up after renewals failed).
//!
//! A lease whose row carries a `checkpointOwner` is in a graceful handoff (see *Graceful
//! handoff* below): `leaseOwner` is the next owner, `checkpointOwner` the current one. Such a
//! lease is never free and never asked for again; it counts for its next owner; a worker
//! other than the next owner considers it expired only once its owners stood still for
//! `failover_time + handoff_timeout` (see [`LeaseCoordinatorConfig::handoff_timeout`]),
//! whatever its counter did. Taking it then removes `checkpointOwner`.
//!
//! # Renewal
//!
//! A round renews every held lease concurrently, conditioned on `leaseCounter = seen AND
//! leaseOwner = me`. A lease written successfully less than `failover_time / 6` ago (by a
//! checkpoint, a take or a renewal) is skipped: that write already showed the other workers
//! that this one is alive, and the next round renews it at most `failover_time / 2` after
//! the write.
//!
//! Each renewal also writes `throughputKBps`, as the Java KCL does: the data bytes the
//! shard's processor was given since the previous renewal of this holding (reported through
//! [`Holding::record_delivered_bytes`]), divided by 1024 and by the seconds since that
//! renewal (or since the take) on the injected clock, smoothed by an exponential moving
//! average of weight 0.5 (the new value is half the new rate plus half the previous value;
//! the first renewal of a holding writes the rate alone). A renewal that fails keeps the
//! bytes for the next one.
//!
//! The outcome of a renewal:
//!
//! * success: the held view takes the new row;
//! * condition failed: the lease was taken or changed; it leaves the held set and
//!   [`LeaseEvent::Lost`] with [`LostReason::ConditionFailed`] is sent;
//! * not found: someone deleted it; lost with [`LostReason::Deleted`];
//! * any other error (throttled, unreachable, timed out, ...): the lease is kept and renewed
//!   again next round, until about `failover_time` has passed since its last successful write
//!   (precisely: the first failed round at least `failover_time - failover_time / 6` after
//!   it, which is the round at `failover_time`). Other workers may then consider it expired,
//!   so it is dropped as lost with [`LostReason::RenewalTimeout`]. The same holds when the
//!   renewal cannot even start because another write of the lease is stuck.
//!
//! # Taking, handing over, balancing
//!
//! A taker pass lists the whole table, updates the expiry bookkeeping, and then:
//!
//! * finished leases (checkpoint `SHARD_END`) are ignored: never taken, never counted;
//! * every live lease counts for a worker: its owner, or for a lease in a handoff its next
//!   owner; `workers` is the number of those other workers plus this one;
//!   `target = ceil(unfinished leases / workers)`, at most `max_leases_for_worker`;
//!   `needed = target - mine`, where `mine` counts the unfinished leases held (less those
//!   this worker is handing over) plus the handoffs to this worker in flight;
//! * free leases (unowned, expired, or owned by this worker id but not held, which includes
//!   a lease just handed over to this worker) are taken, the longest unchanged first (ties
//!   in random order, so workers starting together collide less), all `needed` in one pass
//!   and concurrently. A take that fails its condition (another worker was faster) is
//!   skipped and the next free lease tried, until `needed` are taken or no free lease is
//!   left. Any other failure of a take (throttled, timed out, ...) ends the pass;
//! * when too few are free, the rest of `needed` is asked for by graceful handoffs. The
//!   excess of the workers above `target` is shared out among the workers below it that are
//!   seen asking (a handoff to them in flight) and this one, the same way by all of them
//!   from the same listing, so that workers asking at once ask for different leases and
//!   take nobody below `target`: the excess as slots, round-robin over the loaded workers in
//!   id order (each one's leases in key order), the shortfalls as runs of slots, the workers
//!   in id order. What remains is asked one lease at a time from the currently most loaded
//!   worker (ties at random), never taking one below `target`, and from one at `target` only
//!   while this worker is at least two short of it. A lease in a handoff is never asked for
//!   again. Nothing is asked for while some lease of another worker has been unchanged for
//!   three quarters of `failover_time`: a live owner writes each lease at least every
//!   `failover_time / 2`, so that lease is about to expire and will be taken instead (a survivor must not take leases from another survivor
//!   that just took a dead worker's leases, on a view that still counts the dead worker).
//!   Each move goes from a worker holding `c` to one holding `m <= c - 2`, so the sum of the
//!   squared loads strictly decreases: balancing always comes to an end, and it ends only
//!   when no two workers differ by more than one lease (4/3/3 for 10 leases on 3 workers).
//!   It never oscillates;
//! * a handoff to this worker that did not complete within `handoff_timeout` of its
//!   initiation (its owners unchanged so long), or whose counter stood still for
//!   `failover_time` (its current owner died), is completed by this worker, which then holds
//!   the lease: in effect a steal, reported in [`TakeReport::stolen`].
//!
//! `max_leases_to_steal_at_one_time` (the Java KCL's name) bounds the *ungraceful* steals of
//! one pass: takes of a live lease from its owner without a handoff, which happen only on a
//! store that does not implement the handoff writes ([`LeaseError::Unsupported`]). Graceful
//! handoffs are not steals: a pass asks for at most `needed` of them, as above, and
//! completes every handoff to it that timed out (those leases were asked for by earlier
//! passes, within their `needed`).
//!
//! A successful take adds the lease to the held set (a new holding) and sends
//! [`LeaseEvent::Gained`].
//!
//! # Fast balance: the discovery pass
//!
//! A worker that holds no lease is invisible to other 2.x takers (they read the lease
//! table only; the `<app>-WorkerMetricStats` rows of `crate::v3` are for a 3.x leader). So
//! the taker loop's first pass (the *discovery pass*) takes, or
//! asks for, one lease at most, which makes the worker visible, and the next pass runs
//! [`LeaseCoordinatorConfig::discovery_delay`] (`failover_time / 5`) later: workers that
//! started within that time of each other see each other then and take fair shares at
//! once. While handoffs to this worker are in flight the taker runs every
//! [`LeaseCoordinatorConfig::handoff_poll_interval`] (`failover_time / 8`), so it takes a
//! handed-over lease soon after its current owner completes the handoff.
//! [`LeaseCoordinator::take_once`] is always a full pass (the discovery pass is the loop's).
//!
//! # Graceful handoff
//!
//! The protocol of the Java KCL 3.x, so a Java 3.x worker (in any mode) and this one agree
//! on the table; the writes are in [`crate::write`]:
//!
//! 1. The next owner initiates: `leaseOwner` = next owner, `checkpointOwner` = current
//!    owner, conditioned on the current owner and no `checkpointOwner`; the counter is not
//!    moved (as the Java KCL's `initiateGracefulLeaseHandoff`).
//! 2. The current owner's next renewal (or checkpoint) fails its condition (`leaseOwner =
//!    me AND attribute_not_exists(checkpointOwner)`); the re-read shows the handoff: the
//!    held view takes the row, the write is made again on the new owners (`checkpointOwner
//!    = me`), and [`LeaseEvent::HandoffRequested`] is sent. The lease stays held and
//!    renewed; the worker shuts its processor down with `Requested` (it may checkpoint).
//! 3. The current owner completes it with [`Holding::release`]: `checkpointOwner`
//!    removed, counter + 1 (as the Java KCL's `assignLease` to the next owner). The next
//!    owner takes the lease at its next pass, from that checkpoint.
//! 4. Not completed within `handoff_timeout`, the next owner completes it itself (above);
//!    the current owner's next write fails and its processor is a `Zombie`, as after a
//!    steal. An owner that does not know the protocol (a Java KCL 2.x worker, which renews on
//!    the counter alone and never looks at `checkpointOwner`) keeps processing until then:
//!    with it a handoff degrades to a steal after `handoff_timeout`.
//!
//! # The 3.x protocol
//!
//! In the KCL 3.x protocol (see `crate::v3::runtime`) a leader assigns the leases and the
//! taker loop sleeps ([`LeaseCoordinator::set_taker_enabled`]). The worker instead finds the
//! leases assigned to it with [`LeaseCoordinator::discover_assigned`] (the lease owner index,
//! then a consistent read of each new key) and adopts each one still naming it as owner
//! without a pending handoff: it joins the held set as read and is renewed at once. From
//! then on renewal, checkpoints, a graceful handoff asked for by the leader and release are
//! the same as in 2.x.
//!
//! # Failover time
//!
//! A survivor takes a crashed worker's leases within `1.5 x failover_time` of that worker's
//! last renewal: the survivor's next listing (at most `failover_time / 2` later) sees the
//! final counter, the lease expires `failover_time` after that listing, and the taker wakes
//! at exactly that moment rather than at its next regular pass.
//!
//! # Releasing
//!
//! [`Holding::release`] (graceful shutdown) writes "no owner", conditioned on `leaseOwner =
//! me AND leaseCounter = seen`, so another worker takes the lease at its next taker pass;
//! [`LeaseCoordinator::release_all`] does so for every held lease. The lease leaves the held
//! set whatever the outcome, and no [`LeaseEvent::Lost`] is sent.
//! [`LeaseCoordinator::drop_lease`] forgets a lease locally, without writing.
//!
//! # Example
//!
//! Two workers share three leases on the in-memory store of `kcl_lease::test_util`, with a
//! manual clock; the taker and the renewer are driven by hand here (a worker calls
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
//! // `b` is owed ceil(3 / 2) = 2 leases; none is free, so it asks `a` for one by a
//! // graceful handoff (`a` keeps two, the target).
//! assert_eq!(b.take_once().await?.handoffs_initiated.len(), 1);
//!
//! // `a` learns at its next renewal that the lease is asked for; it renews all three.
//! clock.advance(Duration::from_secs(4));
//! let report = a.renew_once().await;
//! assert_eq!((report.renewed, report.lost.len()), (3, 0));
//! while let Ok(event) = a_events.try_recv() {
//!     if let LeaseEvent::HandoffRequested { lease_key, next_owner } = event {
//!         assert_eq!(next_owner, "b");
//!         // The processor stops (it may checkpoint), then the lease is handed over.
//!         a.holding(&lease_key).unwrap().release().await?;
//!     }
//! }
//! assert_eq!(b.take_once().await?.taken.len(), 1);
//!
//! // Checkpoints are fenced writes through a holding of the lease.
//! let holding = a.holding(&a.held_keys()[0]).unwrap();
//! let seq = ExtendedSequenceNumber::parse("4960", 0)?;
//! assert_eq!(holding.checkpoint(&seq).await?.checkpoint, seq);
//!
//! // Graceful shutdown: release everything; `b` takes it at its next pass.
//! assert!(a.release_all().await.is_complete());
//! assert!(!holding.is_current());
//! assert_eq!(b.take_once().await?.taken.len(), 2);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Metrics and logs
//!
//! Through the `metrics` facade, labelled with `worker_id`: the gauge `kcl_leases_held`, the
//! counters `kcl_lease_renewals_total` (label `result` = `success` / `failure`),
//! `kcl_leases_lost_total` (label `reason`), `kcl_leases_taken_total`,
//! `kcl_leases_stolen_total` and `kcl_lease_handoffs_total` (label `role` = `to` for a
//! handoff this worker initiated, `from` for one of its leases asked for). `tracing` events carry `worker_id` and `lease_key`.
//!
//! # Layout
//!
//! One module per concern: `events` (what is reported), `held` (the held set and
//! [`Holding`]), `fenced` (the fenced writes), `renewer`, `taker` (the pass and its
//! planning), `release`, `loops` (spawning and stopping the two loops), `config`.

mod assigned;
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
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use tokio::sync::mpsc;

pub use self::assigned::DiscoveryReport;
pub use self::config::{
    DEFAULT_FAILOVER_TIME, DEFAULT_HANDOFF_TIMEOUT, LeaseCoordinatorConfig, MAX_FAILOVER_TIME,
    MAX_HANDOFF_TIMEOUT, MIN_FAILOVER_TIME,
};
pub use self::events::{LeaseEvent, LostReason, ReleaseReport, RenewReport, TakeReport};
use self::held::HeldLease;
pub use self::held::Holding;
pub use self::loops::CoordinatorHandle;
use self::loops::Loops;
use self::taker::ExpiryTracker;
use crate::timeouts::within;
use crate::{Clock, Lease, LeaseError, LeaseStore, RandomSource};

/// The most store requests one renewal round, taker pass or release has in flight at once.
const MAX_CONCURRENT_WRITES: usize = 64;

/// Renews, takes, steals and releases leases for one worker; see the module docs.
pub struct LeaseCoordinator {
    /// This coordinator, for the [`Holding`] handles it gives out.
    this: Weak<LeaseCoordinator>,
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
    /// Whether the taker loop takes (2.x) or sleeps (3.x: the leader assigns).
    taker_enabled: tokio::sync::watch::Sender<bool>,
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
        Ok(Arc::new_cyclic(|this| Self {
            this: this.clone(),
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
            taker_enabled: tokio::sync::watch::Sender::new(true),
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

    /// True when `lease_key` is in the held set.
    pub fn is_held(&self, lease_key: &str) -> bool {
        lock(&self.held).contains_key(lease_key)
    }

    /// The keys of the held leases, in order.
    pub fn held_keys(&self) -> Vec<String> {
        lock(&self.held).keys().cloned().collect()
    }

    /// Runs one store call for at most `call_timeouts.call` on the injected clock; a call
    /// still pending then is dropped (which cancels it) and becomes
    /// [`LeaseError::Timeout`] naming `operation`.
    async fn bounded<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        let after = self.config.call_timeouts.call;
        within(self.clock.as_ref(), after, call)
            .await
            .unwrap_or(Err(LeaseError::Timeout { operation, after }))
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

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn coordinator_on(
        store: crate::test_util::InMemoryLeaseStore,
        worker: &str,
    ) -> Result<Arc<LeaseCoordinator>, LeaseError> {
        LeaseCoordinator::new(
            Arc::new(store),
            LeaseCoordinatorConfig::new(worker),
            Arc::new(crate::SystemClock),
            Arc::new(crate::SeededRandom::new(1)),
        )
    }

    /// A coordinator on an empty in-memory table.
    fn coordinator(worker: &str) -> Result<Arc<LeaseCoordinator>, LeaseError> {
        coordinator_on(
            crate::test_util::InMemoryLeaseStore::new().with_table(),
            worker,
        )
    }

    /// A coordinator on an in-memory table holding one free lease, `k` (not in a runtime).
    fn with_lease(worker: &str) -> Arc<LeaseCoordinator> {
        let store = crate::test_util::InMemoryLeaseStore::new().with_table();
        runtime()
            .block_on(
                store.create_lease_if_not_exists(&Lease::new("k", ExtendedSequenceNumber::LATEST)),
            )
            .unwrap();
        coordinator_on(store, worker).unwrap()
    }

    #[test]
    fn public_futures_are_send() {
        let c = with_lease("w");
        runtime().block_on(c.take_once()).unwrap();
        let h = c.holding("k").unwrap();
        let esn = ExtendedSequenceNumber::TRIM_HORIZON;
        let children = BTreeSet::new();
        assert_send(&h);
        assert_send(&c.renew_once());
        assert_send(&c.take_once());
        assert_send(&h.release());
        assert_send(&c.release_all());
        assert_send(&c.stop());
        assert_send(&h.checkpoint(&esn));
        assert_send(&h.prepare_checkpoint(Some(&esn)));
        assert_send(&h.update_child_shard_ids(&children));
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
        let c = with_lease("w");
        assert!(c.events().is_some());
        assert!(c.events().is_none());
        assert_eq!(c.worker_id(), "w");
        assert!(c.held_leases().is_empty());
        assert!(!c.is_held("k"));
        assert!(c.holding("k").is_none());
        let rt = runtime();
        rt.block_on(c.take_once()).unwrap();
        let h = c.holding("k").unwrap();
        assert_eq!(h.lease_key(), "k");
        assert!(h.is_current());
        assert_eq!(h, c.holding("k").unwrap());
        c.drop_lease("k");
        assert!(!h.is_current());
        assert_eq!(h.lease(), None);
        let err = rt
            .block_on(h.checkpoint(&ExtendedSequenceNumber::LATEST))
            .unwrap_err();
        assert!(matches!(err, LeaseError::NotHeld { .. }));
        assert!(matches!(
            rt.block_on(h.release()),
            Err(LeaseError::NotHeld { .. })
        ));
        c.drop_lease("k");
        // A holding outliving its coordinator has ended.
        rt.block_on(c.take_once()).unwrap();
        let h = c.holding("k").unwrap();
        drop(c);
        assert!(!h.is_current());
        assert!(matches!(
            rt.block_on(h.prepare_checkpoint(None)),
            Err(LeaseError::NotHeld { .. })
        ));
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
