//! The two loops started by [`LeaseCoordinator::spawn`]: the renewer and the taker.

use std::future::Future;
use std::sync::{Arc, Weak};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{LeaseCoordinator, lock};

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

#[derive(Debug)]
pub(super) struct Loops {
    pub(super) stop: watch::Sender<bool>,
    pub(super) tasks: Vec<JoinHandle<()>>,
}

impl LeaseCoordinator {
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

pub(super) async fn renew_loop(
    coordinator: Weak<LeaseCoordinator>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let sleep = {
            let Some(this) = coordinator.upgrade() else {
                return;
            };
            let started = this.clock.now();
            let report = this.renew_once().await;
            tracing::trace!(worker_id = %this.config.worker_id, ?report, "renewal round");
            record_renew_round(&this, &report, started);
            // Rounds start every renew_interval, however long one took: a round whose calls
            // hang lasts up to its bound, and sleeping a whole interval after it would let a
            // failing lease be dropped a round late, after others may have taken it.
            let took = this.clock.now().saturating_duration_since(started);
            this.clock
                .sleep(this.config.renew_interval().saturating_sub(took))
        };
        if sleep_or_stop(sleep, &mut stop).await {
            return;
        }
    }
}

pub(super) async fn take_loop(
    coordinator: Weak<LeaseCoordinator>,
    mut stop: watch::Receiver<bool>,
) {
    // The first pass discovers the fleet (see the module docs, "Fast balance").
    let mut discovery = true;
    loop {
        // Off in the 3.x protocol: wait until the taker is switched on again.
        let enabled = {
            let Some(this) = coordinator.upgrade() else {
                return;
            };
            let mut enabled = this.taker_enabled.subscribe();
            drop(this);
            if *enabled.borrow_and_update() {
                None
            } else {
                Some(enabled)
            }
        };
        if let Some(mut enabled) = enabled {
            tokio::select! {
                _ = enabled.wait_for(|on| *on) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            discovery = true;
            continue;
        }
        let sleep = {
            let Some(this) = coordinator.upgrade() else {
                return;
            };
            let mut soon = None;
            let started = this.clock.now();
            let pass = this.take_pass(discovery).await;
            record_take_pass(&this, pass.as_ref().ok(), started);
            match pass {
                Ok(report) => {
                    tracing::trace!(worker_id = %this.config.worker_id, ?report, "taker pass");
                    if report.discovery {
                        discovery = false;
                        soon = Some(this.config.discovery_delay());
                    } else if report.handoffs_pending > 0 {
                        soon = Some(this.config.handoff_poll_interval());
                    }
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
            let interval = soon.map_or(interval, |soon| soon.min(interval));
            let at = this.next_take_at(now.checked_add(interval).unwrap_or(now));
            this.clock.sleep(at.saturating_duration_since(now))
        };
        if sleep_or_stop(sleep, &mut stop).await {
            return;
        }
    }
}

/// The Java KCL's `RenewAllLeases` metrics of one renewal round.
fn record_renew_round(
    this: &LeaseCoordinator,
    report: &super::RenewReport,
    started: std::time::Instant,
) {
    use crate::metrics as m;
    let labels = m::worker_labels(m::operation::RENEW_ALL_LEASES, &this.config.worker_id);
    let millis = this
        .clock
        .now()
        .saturating_duration_since(started)
        .as_secs_f64()
        * 1000.0;
    metrics::histogram!(level: m::SUMMARY, m::LOST_LEASES, labels.clone())
        .record(report.lost.len() as f64);
    metrics::histogram!(level: m::SUMMARY, m::CURRENT_LEASES, labels.clone())
        .record(this.held_keys().len() as f64);
    metrics::histogram!(level: m::SUMMARY, m::SUCCESS, labels.clone())
        .record(if report.failed == 0 { 1.0 } else { 0.0 });
    metrics::histogram!(level: m::SUMMARY, m::TIME, labels).record(millis);
}

/// The Java KCL's `TakeLeases` metrics of one taker pass (`None`: the pass failed).
fn record_take_pass(
    this: &LeaseCoordinator,
    report: Option<&super::TakeReport>,
    started: std::time::Instant,
) {
    use crate::metrics as m;
    let labels = m::worker_labels(m::operation::TAKE_LEASES, &this.config.worker_id);
    let millis = this
        .clock
        .now()
        .saturating_duration_since(started)
        .as_secs_f64()
        * 1000.0;
    metrics::histogram!(level: m::SUMMARY, m::SUCCESS, labels.clone())
        .record(if report.is_some() { 1.0 } else { 0.0 });
    metrics::histogram!(level: m::SUMMARY, m::TIME, labels.clone()).record(millis);
    if let Some(report) = report {
        metrics::histogram!(level: m::SUMMARY, m::TAKEN_LEASES, labels.clone())
            .record((report.taken.len() + report.stolen.len()) as f64);
        metrics::histogram!(level: m::SUMMARY, m::NUM_WORKERS, labels.clone())
            .record(report.workers as f64);
        metrics::histogram!(level: m::DETAILED, m::TOTAL_LEASES, labels.clone())
            .record(report.leases_in_table as f64);
        metrics::histogram!(level: m::DETAILED, m::NEEDED_LEASES, labels)
            .record(report.target.saturating_sub(report.held) as f64);
    }
}
