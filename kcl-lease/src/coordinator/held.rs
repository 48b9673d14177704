//! The held set: the leases this worker holds, each with the row it last wrote, the time of
//! that write, its holding generation and its write lock; and the `kcl_leases_held` gauge.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use kcl_kpl::ExtendedSequenceNumber;

use super::events::{LeaseEvent, LostReason};
use super::{LeaseCoordinator, lock};
use crate::{Lease, LeaseError};

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
    /// Data bytes delivered to the processor and not yet accounted for by a renewal.
    pub(super) delivered_bytes: Arc<AtomicU64>,
    /// Local time of the last successful renewal of this holding (of the take before it).
    pub(super) last_renewal: Instant,
    /// The smoothed `throughputKBps` the last renewal wrote (`None` before the first).
    pub(super) throughput_kbps: Option<f64>,
}

/// The weight of the newest rate in the smoothed `throughputKBps` (an exponential moving
/// average): `new = WEIGHT * rate + (1 - WEIGHT) * previous`.
pub(super) const THROUGHPUT_EMA_WEIGHT: f64 = 0.5;

/// What a renewal writes as `throughputKBps`, and the bytes it accounts for.
#[derive(Clone, Copy, Debug)]
pub(super) struct ThroughputSample {
    /// The bytes delivered since the previous renewal, counted in this sample.
    pub(super) bytes: u64,
    /// The smoothed value to write.
    pub(super) kbps: f64,
}

/// One holding of a lease: the time from this worker gaining the lease to losing, releasing
/// or dropping it. Returned by [`LeaseCoordinator::holding`].
///
/// A cheap, cloneable handle bound to that holding alone: once it ended, its writes fail with
/// [`LeaseError::NotHeld`] without touching the table, even when the same worker has gained
/// the lease again since (that is a new holding, with a new handle). So the processor of an
/// earlier holding can never write into a later one. The handle does not keep the
/// coordinator alive; once the coordinator is dropped every holding has ended.
///
/// Writes are fenced on the owner and on the counter this worker last wrote, and applied to
/// the held set: a success updates the held view; a failed condition loses the lease
/// ([`LeaseEvent::Lost`] with [`LostReason::ConditionFailed`]) and a missing row loses it
/// with [`LostReason::Deleted`], the error being returned either way; any other error
/// (throttled, unreachable, [`LeaseError::Timeout`]) changes nothing and may be retried.
#[derive(Clone)]
pub struct Holding {
    coordinator: Weak<LeaseCoordinator>,
    lease_key: Arc<str>,
    generation: u64,
    delivered_bytes: Arc<AtomicU64>,
}

impl fmt::Debug for Holding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Holding")
            .field("lease_key", &self.lease_key)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Holding {
    /// Two handles are equal when they name the same holding of the same coordinator.
    fn eq(&self, other: &Self) -> bool {
        self.generation == other.generation
            && self.lease_key == other.lease_key
            && Weak::ptr_eq(&self.coordinator, &other.coordinator)
    }
}

impl Eq for Holding {}

impl Holding {
    /// The key of the lease held.
    pub fn lease_key(&self) -> &str {
        &self.lease_key
    }

    /// The lease as last written by this worker, while this holding lasts; `None` once it
    /// ended.
    pub fn lease(&self) -> Option<Lease> {
        self.coordinator
            .upgrade()?
            .view(&self.lease_key, self.generation)
            .map(|(lease, _)| lease)
    }

    /// Adds `bytes` to the data delivered to the processor of this holding: a cheap atomic
    /// add, meant to be called after each batch. The next renewal turns the bytes counted
    /// since the previous one into the `throughputKBps` it writes (see the
    /// [coordinator docs](super#renewal)). Counts nothing once the holding ended.
    pub fn record_delivered_bytes(&self, bytes: u64) {
        self.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// True while this holding lasts and the lease is being handed to another worker (see
    /// [`LeaseEvent::HandoffRequested`]).
    pub fn is_handing_over(&self) -> bool {
        self.lease().is_some_and(|l| l.is_in_handoff())
    }

    /// True while this holding lasts.
    pub fn is_current(&self) -> bool {
        self.coordinator
            .upgrade()
            .is_some_and(|c| c.view(&self.lease_key, self.generation).is_some())
    }

    /// The generation of this holding (distinct for every holding of one coordinator).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    fn coordinator(&self) -> Result<Arc<LeaseCoordinator>, LeaseError> {
        self.coordinator
            .upgrade()
            .ok_or_else(|| LeaseError::NotHeld {
                lease_key: self.lease_key.to_string(),
            })
    }

    /// Writes a checkpoint (and removes any pending checkpoint); returns the new row.
    pub async fn checkpoint(
        &self,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        self.coordinator()?
            .checkpoint_write(&self.lease_key, self.generation, checkpoint)
            .await
    }

    /// Writes (`Some`) or removes (`None`) the pending checkpoint; returns the new row.
    pub async fn prepare_checkpoint(
        &self,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<Lease, LeaseError> {
        self.coordinator()?
            .prepare_write(&self.lease_key, self.generation, pending)
            .await
    }

    /// Records the child shard ids of the shard (once it ended); returns the new row.
    pub async fn update_child_shard_ids(
        &self,
        children: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.coordinator()?
            .children_write(&self.lease_key, self.generation, children)
            .await
    }

    /// Releases the lease (graceful shutdown, or a shard given up): fenced on owner and
    /// counter, removes the owner, so another worker takes it at its next taker pass. During
    /// a graceful handoff ([`LeaseEvent::HandoffRequested`]) it completes the handoff
    /// instead: the next owner owns the lease from then on. The holding ends whatever the
    /// outcome and no [`LeaseEvent::Lost`] is sent. [`LeaseError::ConditionFailed`] when the
    /// lease had already been taken or changed.
    pub async fn release(&self) -> Result<(), LeaseError> {
        self.coordinator()?
            .release_write(&self.lease_key, self.generation)
            .await
    }
}

impl LeaseCoordinator {
    /// The current holding of `key`, if this worker holds it. See [`Holding`].
    pub fn holding(&self, key: &str) -> Option<Holding> {
        lock(&self.held).get(key).map(|h| Holding {
            coordinator: self.this.clone(),
            lease_key: Arc::from(key),
            generation: h.generation,
            delivered_bytes: Arc::clone(&h.delivered_bytes),
        })
    }

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

    /// The `throughputKBps` a renewal of holding `generation` of `key` at `now` writes, or
    /// `None` when no time passed since the previous renewal (nothing to divide by).
    pub(super) fn throughput_sample(
        &self,
        key: &str,
        generation: u64,
        now: Instant,
    ) -> Option<ThroughputSample> {
        let held = lock(&self.held);
        let h = held.get(key).filter(|h| h.generation == generation)?;
        let seconds = now.saturating_duration_since(h.last_renewal).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let bytes = h.delivered_bytes.load(Ordering::Relaxed);
        // Lossy above 2^53 bytes, which no renewal interval comes near.
        #[allow(clippy::cast_precision_loss)]
        let rate = bytes as f64 / 1024.0 / seconds;
        let kbps = match h.throughput_kbps {
            Some(previous) => {
                THROUGHPUT_EMA_WEIGHT * rate + (1.0 - THROUGHPUT_EMA_WEIGHT) * previous
            }
            None => rate,
        };
        Some(ThroughputSample { bytes, kbps })
    }

    /// Records a successful renewal that wrote `sample` (at `now`): its bytes are accounted
    /// for and its value is the base of the next average.
    pub(super) fn record_renewal(
        &self,
        key: &str,
        generation: u64,
        sample: Option<ThroughputSample>,
        now: Instant,
    ) {
        if let Some(h) = lock(&self.held).get_mut(key)
            && h.generation == generation
        {
            h.last_renewal = now;
            if let Some(sample) = sample {
                h.delivered_bytes.fetch_sub(sample.bytes, Ordering::Relaxed);
                h.throughput_kbps = Some(sample.kbps);
            }
        }
    }

    /// The row `row` shows that a graceful handoff of holding `generation` began: takes it as
    /// the held view (writes are fenced on it from now on; the time of the last write stays)
    /// and sends [`LeaseEvent::HandoffRequested`]. False when that holding ended.
    pub(super) fn begin_handoff(&self, key: &str, generation: u64, row: Lease) -> bool {
        let next_owner = row.lease_owner.clone().unwrap_or_default();
        {
            let mut held = lock(&self.held);
            let Some(h) = held.get_mut(key).filter(|h| h.generation == generation) else {
                return false;
            };
            h.lease = row;
        }
        tracing::info!(
            worker_id = %self.config.worker_id,
            lease_key = %key,
            %next_owner,
            "graceful handoff requested"
        );
        metrics::counter!(
            "kcl_lease_handoffs_total",
            "worker_id" => self.config.worker_id.clone(),
            "role" => "from"
        )
        .increment(1);
        self.send_event(LeaseEvent::HandoffRequested {
            lease_key: key.to_owned(),
            next_owner,
        });
        true
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
                delivered_bytes: Arc::new(AtomicU64::new(0)),
                last_renewal: now,
                throughput_kbps: None,
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
