//! The held set: the leases this worker holds, each with the row it last wrote, the time of
//! that write, its holding generation and its write lock; and the `kcl_leases_held` gauge.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::events::{LeaseEvent, LostReason};
use super::{LeaseCoordinator, lock};
use crate::Lease;

/// One lease in the held set.
#[derive(Debug)]
pub(super) struct HeldLease {
    /// The row as last written by this worker.
    pub(super) lease: Lease,
    /// Local time of the last successful write.
    pub(super) last_write: Instant,
    /// Distinguishes successive holdings of the same key: a write that started on an older
    /// holding never changes a newer one.
    pub(super) generation: u64,
    /// Serializes the writes of this lease.
    pub(super) write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl LeaseCoordinator {
    pub(super) fn held_entry(&self, key: &str) -> Option<(u64, Arc<tokio::sync::Mutex<()>>)> {
        lock(&self.held)
            .get(key)
            .map(|h| (h.generation, Arc::clone(&h.write_lock)))
    }

    /// The held view and its last write time, if `key` is still the same holding.
    pub(super) fn view(&self, key: &str, generation: u64) -> Option<(Lease, Instant)> {
        lock(&self.held)
            .get(key)
            .filter(|h| h.generation == generation)
            .map(|h| (h.lease.clone(), h.last_write))
    }

    pub(super) fn record_write(&self, generation: u64, written: &Lease) {
        let now = self.clock.now();
        if let Some(h) = lock(&self.held).get_mut(&written.lease_key)
            && h.generation == generation
        {
            h.lease = written.clone();
            h.last_write = now;
        }
    }

    /// Removes `key` if still the same holding; true when removed.
    pub(super) fn remove(&self, key: &str, generation: Option<u64>) -> bool {
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

    pub(super) fn lose(&self, key: &str, generation: u64, reason: LostReason) -> bool {
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
    pub(super) fn send_event(&self, event: LeaseEvent) {
        if self.events_taken.load(Ordering::SeqCst) {
            let _ = self.events_tx.send(event);
        }
    }

    pub(super) fn gain(&self, lease: Lease, stolen: bool) {
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

    pub(super) fn publish_held_gauge(&self) {
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
}
