//! The journal of a simulation run: processor callbacks and lease store writes in one order.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, RecordProcessorFactory,
    ShutdownInput, ShutdownReason,
};
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::{BillingMode, Lease, LeaseError, LeaseStore, RandomSource, SeededRandom};

use crate::lease_store::InMemoryLeaseStore;
use crate::recording::{Event, EventLog, RecordingFactory, RecordingProcessor};

#[derive(Clone, Debug)]
pub(super) struct Delivery {
    pub(super) esn: ExtendedSequenceNumber,
    pub(super) partition_key: String,
    pub(super) data: Bytes,
}

#[derive(Clone, Debug)]
pub(super) enum Entry {
    Init {
        instance: u64,
        worker: String,
        shard: String,
        checkpoint: ExtendedSequenceNumber,
    },
    Delivered {
        instance: u64,
        records: Vec<Delivery>,
    },
    Shutdown {
        instance: u64,
        reason: ShutdownReason,
    },
    Created {
        key: String,
        checkpoint: ExtendedSequenceNumber,
    },
    Taken {
        key: String,
        owner: String,
    },
    Released {
        key: String,
    },
    Checkpointed {
        key: String,
        writer: Option<String>,
        checkpoint: ExtendedSequenceNumber,
    },
    Deleted {
        key: String,
    },
    /// A graceful handoff began: the lease is still its current owner's until the handoff
    /// completes (journaled as `Taken` by the next owner).
    HandoffInitiated {
        key: String,
        next_owner: String,
    },
    /// A graceful handoff completed: the lease is `owner`'s (the next owner) from now on.
    /// `by` the worker that completed it: the current owner (after its processor stopped),
    /// or the next owner itself (a forced completion, after `handoff_timeout`).
    HandoffCompleted {
        key: String,
        owner: String,
        by: Option<String>,
    },
    /// A processor was dropped without `shutdown` (aborted).
    Dropped {
        instance: u64,
    },
    /// A worker crashed: its processors stopped without a shutdown.
    Crashed {
        worker: String,
    },
}

#[derive(Debug, Default)]
pub(super) struct JournalState {
    pub(super) entries: Vec<Entry>,
    pub(super) delivered: HashSet<Bytes>,
    pub(super) next_instance: u64,
}

/// Shared, append-only journal.
#[derive(Clone, Debug, Default)]
pub(super) struct Journal {
    pub(super) state: Arc<Mutex<JournalState>>,
}

impl Journal {
    pub(super) fn lock(&self) -> MutexGuard<'_, JournalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn push(&self, entry: Entry) {
        let mut state = self.lock();
        if let Entry::Delivered { records, .. } = &entry {
            for r in records {
                state.delivered.insert(r.data.clone());
            }
        }
        state.entries.push(entry);
    }

    pub(super) fn next_instance(&self) -> u64 {
        let mut state = self.lock();
        state.next_instance += 1;
        state.next_instance
    }

    pub(super) fn distinct_delivered(&self) -> usize {
        self.lock().delivered.len()
    }

    pub(super) fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }
}

/// Wraps a [`RecordingFactory`] so every processor also writes to the journal.
#[derive(Clone, Debug)]
pub(super) struct JournalingFactory {
    pub(super) worker: String,
    pub(super) inner: RecordingFactory,
    pub(super) journal: Journal,
    /// Checkpoint at a random record of each batch (the recording processor's
    /// "largest delivered" checkpoint is then turned off), else `None`.
    pub(super) partial_checkpoints: Option<u64>,
    pub(super) log: EventLog,
}

impl RecordProcessorFactory for JournalingFactory {
    type Processor = JournalingProcessor;

    fn create_processor(&self) -> JournalingProcessor {
        let instance = self.journal.next_instance();
        JournalingProcessor {
            worker: self.worker.clone(),
            instance,
            inner: self.inner.create_processor(),
            journal: self.journal.clone(),
            partial: self
                .partial_checkpoints
                .map(|seed| SeededRandom::new(seed ^ instance.wrapping_mul(0x9E37_79B9))),
            shard: String::new(),
            log: self.log.clone(),
            initialized: false,
            shut_down: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct JournalingProcessor {
    pub(super) worker: String,
    pub(super) instance: u64,
    pub(super) inner: RecordingProcessor,
    pub(super) journal: Journal,
    pub(super) partial: Option<SeededRandom>,
    pub(super) shard: String,
    pub(super) log: EventLog,
    pub(super) initialized: bool,
    pub(super) shut_down: bool,
}

impl Drop for JournalingProcessor {
    /// A processor dropped without `shutdown` (its consumer was aborted: a shutdown grace
    /// ran out) runs no more.
    fn drop(&mut self) {
        if self.initialized && !self.shut_down {
            self.journal.push(Entry::Dropped {
                instance: self.instance,
            });
        }
    }
}

impl RecordProcessor for JournalingProcessor {
    async fn initialize(&mut self, input: InitializationInput) {
        self.initialized = true;
        self.journal.push(Entry::Init {
            instance: self.instance,
            worker: self.worker.clone(),
            shard: input.shard_id.clone(),
            checkpoint: input.extended_sequence_number.clone(),
        });
        self.shard = input.shard_id.clone();
        self.inner.initialize(input).await;
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let records = input
            .records
            .iter()
            .map(|r| Delivery {
                esn: r.extended_sequence_number(),
                partition_key: r.partition_key.clone(),
                data: r.data.clone(),
            })
            .collect();
        self.journal.push(Entry::Delivered {
            instance: self.instance,
            records,
        });
        // Checkpoint at a random record (often inside a KPL aggregate), or not at all.
        let target = self.partial.as_ref().and_then(|rng| {
            let len = input.records.len() as u64;
            (rng.below(4) != 0)
                .then(|| input.records.get(rng.below(len) as usize).cloned())
                .flatten()
        });
        let checkpointer = input.checkpointer.clone();
        self.inner.process_records(input).await;
        if let Some(record) = target {
            let result = checkpointer.checkpoint_record(&record).await;
            self.log.push(Event::Checkpointed {
                worker: self.worker.clone(),
                shard: self.shard.clone(),
                position: Some(record.extended_sequence_number()),
                error: result.err().map(|e| e.kind()),
                during: None,
            });
        }
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        self.shut_down = true;
        self.journal.push(Entry::Shutdown {
            instance: self.instance,
            reason: input.shutdown_reason,
        });
        self.inner.shutdown(input).await;
    }
}

/// A [`LeaseStore`] that logs every successful write to the journal.
#[derive(Debug)]
pub(super) struct JournalingLeaseStore {
    pub(super) inner: Arc<InMemoryLeaseStore>,
    pub(super) journal: Journal,
    /// The worker writing through this store, when it is one worker's.
    pub(super) worker: Option<String>,
}

#[async_trait]
impl LeaseStore for JournalingLeaseStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }

    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.inner.table_exists().await
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let created = self.inner.create_lease_if_not_exists(lease).await?;
        if created {
            self.journal.push(Entry::Created {
                key: lease.lease_key.clone(),
                checkpoint: lease.checkpoint.clone(),
            });
        }
        Ok(created)
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
        self.inner.renew_lease(lease, throughput_kbps).await
    }

    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        let taken = self.inner.take_lease(lease, new_owner).await?;
        self.journal.push(Entry::Taken {
            key: lease.lease_key.clone(),
            owner: new_owner.to_owned(),
        });
        Ok(taken)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let released = self.inner.release_lease(lease).await?;
        self.journal.push(Entry::Released {
            key: lease.lease_key.clone(),
        });
        Ok(released)
    }

    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        let written = self.inner.initiate_handoff(lease, next_owner).await?;
        self.journal.push(Entry::HandoffInitiated {
            key: lease.lease_key.clone(),
            next_owner: next_owner.to_owned(),
        });
        Ok(written)
    }

    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        let written = self.inner.complete_handoff(lease).await?;
        self.journal.push(Entry::HandoffCompleted {
            key: lease.lease_key.clone(),
            owner: written.lease_owner.clone().unwrap_or_default(),
            by: self.worker.clone(),
        });
        Ok(written)
    }

    async fn update_checkpoint(
        &self,
        lease: &Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<Lease, LeaseError> {
        let written = self.inner.update_checkpoint(lease, checkpoint).await?;
        self.journal.push(Entry::Checkpointed {
            key: lease.lease_key.clone(),
            // During a handoff the writer is the current owner (`checkpointOwner`).
            writer: kcl_lease::write::actual_owner(lease).map(str::to_owned),
            checkpoint: written.checkpoint.clone(),
        });
        Ok(written)
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
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.inner
            .update_child_shard_ids(lease, child_shard_ids)
            .await
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.inner.delete_lease(lease).await?;
        self.journal.push(Entry::Deleted {
            key: lease.lease_key.clone(),
        });
        Ok(())
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.inner.client_version().await
    }
}
