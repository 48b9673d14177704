//! The journal of a simulation run: processor callbacks and lease store writes in one order.

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, RecordProcessorFactory,
    ShutdownInput, ShutdownReason,
};
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::v3::item::{Condition, Item};
use kcl_lease::v3::memory::StateFaultKind;
use kcl_lease::v3::table::{StateTable, StateTables, Update, bounded};
use kcl_lease::{
    BillingMode, BoxError, Lease, LeaseError, LeaseStore, RandomSource, SeededRandom, SystemClock,
};

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
    /// `shutdown` was called (it may run on: see [`Entry::ShutdownReturned`]).
    Shutdown {
        instance: u64,
        reason: ShutdownReason,
    },
    /// `shutdown` returned: the processor stopped (unless `shutdown(Terminate)` is called
    /// again, which only happens while it still holds its shard's lease at `SHARD_END`).
    ShutdownReturned {
        instance: u64,
    },
    Created {
        key: String,
        checkpoint: ExtendedSequenceNumber,
        /// The worker that created it.
        by: Option<String>,
    },
    /// A take: by the new owner itself (the 2.x taker), or by the 3.x leader assigning the
    /// lease (`by` the leader, `owner` the assignee).
    Taken {
        key: String,
        owner: String,
        by: Option<String>,
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
        /// The current owner, handing the lease over (`checkpointOwner` from now on).
        from: Option<String>,
        next_owner: String,
        /// Who wrote it: the next owner (2.x fast balance) or the 3.x leader.
        by: Option<String>,
    },
    /// A graceful handoff completed: the lease is `owner`'s (the next owner) from now on.
    /// `by` the worker that completed it: the current owner (after its processor stopped),
    /// or the next owner itself (a forced completion, after `handoff_timeout`).
    HandoffCompleted {
        key: String,
        owner: String,
        by: Option<String>,
    },
    /// A processor was dropped without returning from `shutdown`: never shut down (its
    /// consumer was aborted: a crash, or a shutdown grace ran out), or its `shutdown` was
    /// abandoned after the shutdown grace.
    Dropped {
        instance: u64,
    },
    /// A worker crashed: its processors stopped without a shutdown.
    Crashed {
        worker: String,
    },
    /// What a worker's 3.x runtime publishes as its leadership (`is_leader`) changed, at
    /// `at`; a crash or a stop ends it (the driver journals `leading: false` then).
    Leader {
        worker: String,
        leading: bool,
        at: tokio::time::Instant,
    },
}

#[derive(Debug, Default)]
pub(super) struct JournalState {
    /// Every entry with the virtual time (tokio's paused clock) it was written at.
    pub(super) entries: Vec<(tokio::time::Instant, Entry)>,
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
        state.entries.push((tokio::time::Instant::now(), entry));
    }

    pub(super) fn next_instance(&self) -> u64 {
        let mut state = self.lock();
        state.next_instance += 1;
        state.next_instance
    }

    pub(super) fn distinct_delivered(&self) -> usize {
        self.lock().delivered.len()
    }

    pub(super) fn entries(&self) -> Vec<(tokio::time::Instant, Entry)> {
        self.lock().entries.clone()
    }

    /// The graceful handoffs initiated from entry `from` on, and the index to look from
    /// next time.
    pub(super) fn handoffs_since(&self, from: usize) -> (usize, Vec<HandoffSeen>) {
        let state = self.lock();
        let handoffs = state
            .entries
            .iter()
            .skip(from)
            .filter_map(|(_, e)| match e {
                Entry::HandoffInitiated {
                    key,
                    from,
                    next_owner,
                    ..
                } => Some(HandoffSeen {
                    key: key.clone(),
                    from: from.clone(),
                    next_owner: next_owner.clone(),
                }),
                _ => None,
            })
            .collect();
        (state.entries.len(), handoffs)
    }
}

/// A graceful handoff the driver saw initiated (to schedule a fault right after it).
#[derive(Clone, Debug)]
pub(super) struct HandoffSeen {
    pub(super) key: String,
    pub(super) from: Option<String>,
    pub(super) next_owner: String,
}

/// How long the processors of one worker take in `shutdown` (a slow or hanging spell of the
/// fault schedule); clones share the setting.
#[derive(Clone, Debug, Default)]
pub(super) struct ShutdownDelay {
    state: Arc<Mutex<Option<SlowShutdown>>>,
}

/// A slow `shutdown`: it takes `Slow` (half before the wrapped processor's shutdown, half
/// after), or never returns (`Hang`, before or after the wrapped processor's shutdown, which
/// may checkpoint); the worker abandons it after its shutdown grace either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SlowShutdown {
    Slow(std::time::Duration),
    Hang,
}

impl ShutdownDelay {
    /// Sets the delay of `shutdown` calls from now on (`None`: none).
    pub(super) fn set(&self, delay: Option<SlowShutdown>) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = delay;
    }

    fn get(&self) -> Option<SlowShutdown> {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// How slow its processors' `shutdown` is now.
    pub(super) shutdown_delay: ShutdownDelay,
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
            shutdown_delay: self.shutdown_delay.clone(),
            initialized: false,
            shut_down: false,
            in_shutdown: false,
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
    pub(super) shutdown_delay: ShutdownDelay,
    pub(super) initialized: bool,
    /// `shutdown` was called.
    pub(super) shut_down: bool,
    /// A `shutdown` call has not returned (yet).
    pub(super) in_shutdown: bool,
}

impl Drop for JournalingProcessor {
    /// A processor dropped without returning from `shutdown` (its consumer was aborted: a
    /// crash, or a shutdown grace ran out; or its `shutdown` was abandoned after the grace)
    /// runs no more.
    fn drop(&mut self) {
        if self.initialized && (!self.shut_down || self.in_shutdown) {
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
        self.in_shutdown = true;
        self.journal.push(Entry::Shutdown {
            instance: self.instance,
            reason: input.shutdown_reason,
        });
        // A slow or hanging spell: the worker abandons the call after its shutdown grace
        // (the processor is then dropped, journaled as `Dropped`).
        let delay = self.shutdown_delay.get();
        let hang_after = self.instance.is_multiple_of(2);
        match delay {
            Some(SlowShutdown::Slow(d)) => tokio::time::sleep(d / 2).await,
            Some(SlowShutdown::Hang) if !hang_after => std::future::pending::<()>().await,
            _ => {}
        }
        self.inner.shutdown(input).await;
        match delay {
            Some(SlowShutdown::Slow(d)) => tokio::time::sleep(d - d / 2).await,
            Some(SlowShutdown::Hang) => std::future::pending::<()>().await,
            None => {}
        }
        self.in_shutdown = false;
        self.journal.push(Entry::ShutdownReturned {
            instance: self.instance,
        });
    }
}

/// One worker's path to DynamoDB (its lease table and state tables): open, cut off (every
/// call fails as unreachable) or dead (every call started hangs for good). Kinesis is not
/// on it. Clones share the path.
#[derive(Clone, Debug, Default)]
pub(super) struct DynamoPath {
    state: Arc<AtomicU8>,
}

const PATH_OPEN: u8 = 0;
const PATH_CUT: u8 = 1;
const PATH_DEAD: u8 = 2;

#[derive(Debug, thiserror::Error)]
#[error("simulated partition: this worker cannot reach DynamoDB")]
struct Partitioned;

impl DynamoPath {
    /// Every call from now fails as unreachable (`true`), or the path opens again.
    pub(super) fn set_cut(&self, cut: bool) {
        self.state
            .store(if cut { PATH_CUT } else { PATH_OPEN }, Ordering::SeqCst);
    }

    /// Every call started from now hangs for good (`true`), or the path opens again (calls
    /// already hanging stay hung).
    pub(super) fn set_dead(&self, dead: bool) {
        self.state
            .store(if dead { PATH_DEAD } else { PATH_OPEN }, Ordering::SeqCst);
    }

    /// Waits for nothing on an open path; fails on a cut one; never returns on a dead one.
    async fn pass(&self) -> Result<(), LeaseError> {
        match self.state.load(Ordering::SeqCst) {
            PATH_OPEN => Ok(()),
            PATH_CUT => Err(LeaseError::Unreachable {
                source: Box::new(Partitioned) as BoxError,
            }),
            _ => std::future::pending().await,
        }
    }
}

/// Faults for the next calls of the 3.x state tables, shared by every worker's
/// [`PathStateTable`]: kept here rather than in the in-memory tables so the driver can
/// clear what is left when the faults stop (a table called once a minute would otherwise
/// carry them far into the drain). Clones share the faults.
#[derive(Clone, Debug, Default)]
pub(super) struct StateFaults {
    pending: Arc<Mutex<Vec<(String, StateFaultKind, u32)>>>,
}

impl StateFaults {
    /// `kind` for the next `count` calls of the table named `table`.
    pub(super) fn inject(&self, table: &str, kind: StateFaultKind, count: u32) {
        self.lock().push((table.to_owned(), kind, count));
    }

    /// Drops every fault left.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(String, StateFaultKind, u32)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fault of the next call of `table`, if any (its count goes down by one).
    fn take(&self, table: &str) -> Option<StateFaultKind> {
        let mut pending = self.lock();
        let (_, kind, left) = pending
            .iter_mut()
            .find(|(t, _, left)| t == table && *left > 0)?;
        *left -= 1;
        let kind = *kind;
        pending.retain(|(_, _, left)| *left > 0);
        Some(kind)
    }
}

/// The bound on one table creation call of the state tables (see
/// [`PathStateTable::create_table_if_not_exists`]).
const CREATE_TABLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("injected state table fault: {0}")]
struct InjectedStateFault(&'static str);

/// A [`StateTable`] reached over one worker's [`DynamoPath`], with the [`StateFaults`].
#[derive(Debug)]
pub(super) struct PathStateTable {
    pub(super) inner: Arc<dyn StateTable>,
    pub(super) path: DynamoPath,
    pub(super) faults: StateFaults,
    /// The worker calling (for the debug log of every call).
    pub(super) worker: Option<String>,
}

impl PathStateTable {
    /// Passes the path, then the next fault: `Ok(true)` when the call is to be applied and
    /// its answer lost.
    async fn begin(&self) -> Result<bool, LeaseError> {
        tracing::trace!(
            worker = self.worker.as_deref().unwrap_or("-"),
            table = self.inner.table_name(),
            "simulation: state table call starts"
        );
        self.path.pass().await?;
        match self.faults.take(self.inner.table_name()) {
            None => Ok(false),
            Some(StateFaultKind::LoseAnswer) => Ok(true),
            Some(StateFaultKind::Throttle) => Err(LeaseError::Throttled {
                source: Box::new(InjectedStateFault("throttled")) as BoxError,
            }),
            Some(StateFaultKind::Hang) => std::future::pending().await,
            Some(_) => Err(LeaseError::Unreachable {
                source: Box::new(InjectedStateFault("unreachable")) as BoxError,
            }),
        }
    }

    /// The answer of an applied call, or its loss; logged (debug) with the caller.
    fn finish<T>(
        &self,
        call: &str,
        key: &str,
        lose_answer: bool,
        result: Result<T, LeaseError>,
    ) -> Result<T, LeaseError> {
        let result = match (lose_answer, result) {
            (true, Ok(_)) => Err(LeaseError::Unreachable {
                source: Box::new(InjectedStateFault("answer lost")) as BoxError,
            }),
            (_, result) => result,
        };
        tracing::debug!(
            worker = self.worker.as_deref().unwrap_or("-"),
            table = self.inner.table_name(),
            call,
            key,
            error = result.as_ref().err().map(ToString::to_string),
            "simulation: state table call"
        );
        result
    }
}

#[async_trait]
impl StateTable for PathStateTable {
    fn table_name(&self) -> &str {
        self.inner.table_name()
    }

    fn key_attribute(&self) -> &str {
        self.inner.key_attribute()
    }

    /// Bounded here, as the DynamoDB state table bounds each of its calls (the runtime
    /// leaves table creation, which polls until the table is usable, to the table).
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        let call = async {
            let lose = self.begin().await?;
            let result = self.inner.create_table_if_not_exists(billing).await;
            self.finish("create_table", "", lose, result)
        };
        bounded(&SystemClock, CREATE_TABLE_LIMIT, "create_table", call).await
    }

    async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError> {
        let lose = self.begin().await?;
        let result = self.inner.get(key).await;
        self.finish("get", key, lose, result)
    }

    async fn scan(&self) -> Result<Vec<Item>, LeaseError> {
        let lose = self.begin().await?;
        let result = self.inner.scan().await;
        self.finish("scan", "", lose, result)
    }

    async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError> {
        let lose = self.begin().await?;
        let result = self.inner.put(item, condition).await;
        let key = item
            .get(self.inner.key_attribute())
            .and_then(kcl_lease::v3::item::Value::as_s)
            .unwrap_or("?");
        self.finish("put", key, lose, result)
    }

    async fn update(
        &self,
        key: &str,
        update: &Update,
        condition: &Condition,
    ) -> Result<(), LeaseError> {
        let lose = self.begin().await?;
        let result = self.inner.update(key, update, condition).await;
        self.finish("update", key, lose, result)
    }

    async fn delete(&self, key: &str, condition: &Condition) -> Result<(), LeaseError> {
        let lose = self.begin().await?;
        let result = self.inner.delete(key, condition).await;
        self.finish("delete", key, lose, result)
    }
}

/// A [`LeaseStore`] that logs every successful write to the journal, over one worker's
/// [`DynamoPath`]. It forwards every method, the KCL 3.x ones included (without
/// `state_tables` the worker would run 2.x), and hands out the state tables over the same
/// path.
#[derive(Debug)]
pub(super) struct JournalingLeaseStore {
    pub(super) inner: Arc<InMemoryLeaseStore>,
    pub(super) journal: Journal,
    /// The worker writing through this store, when it is one worker's.
    pub(super) worker: Option<String>,
    pub(super) path: DynamoPath,
    /// The faults of the state tables it hands out.
    pub(super) state_faults: StateFaults,
}

#[async_trait]
impl LeaseStore for JournalingLeaseStore {
    async fn create_table_if_not_exists(&self, billing: BillingMode) -> Result<bool, LeaseError> {
        self.path.pass().await?;
        self.inner.create_table_if_not_exists(billing).await
    }

    async fn table_exists(&self) -> Result<bool, LeaseError> {
        self.path.pass().await?;
        self.inner.table_exists().await
    }

    async fn create_lease_if_not_exists(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.path.pass().await?;
        let created = self.inner.create_lease_if_not_exists(lease).await?;
        if created {
            self.journal.push(Entry::Created {
                key: lease.lease_key.clone(),
                checkpoint: lease.checkpoint.clone(),
                by: self.worker.clone(),
            });
        }
        Ok(created)
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.path.pass().await?;
        self.inner.list_leases().await
    }

    async fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.path.pass().await?;
        self.inner.get_lease(lease_key).await
    }

    async fn renew_lease(
        &self,
        lease: &Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
        self.inner.renew_lease(lease, throughput_kbps).await
    }

    async fn take_lease(&self, lease: &Lease, new_owner: &str) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
        let taken = self.inner.take_lease(lease, new_owner).await?;
        self.journal.push(Entry::Taken {
            key: lease.lease_key.clone(),
            owner: new_owner.to_owned(),
            by: self.worker.clone(),
        });
        Ok(taken)
    }

    async fn release_lease(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
        let released = self.inner.release_lease(lease).await?;
        self.journal.push(Entry::Released {
            key: lease.lease_key.clone(),
        });
        Ok(released)
    }

    async fn initiate_handoff(&self, lease: &Lease, next_owner: &str) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
        let written = self.inner.initiate_handoff(lease, next_owner).await?;
        self.journal.push(Entry::HandoffInitiated {
            key: lease.lease_key.clone(),
            from: lease.lease_owner.clone(),
            next_owner: next_owner.to_owned(),
            by: self.worker.clone(),
        });
        Ok(written)
    }

    async fn complete_handoff(&self, lease: &Lease) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
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
        self.path.pass().await?;
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
        self.path.pass().await?;
        self.inner.update_pending_checkpoint(lease, pending).await
    }

    async fn update_child_shard_ids(
        &self,
        lease: &Lease,
        child_shard_ids: &BTreeSet<String>,
    ) -> Result<Lease, LeaseError> {
        self.path.pass().await?;
        self.inner
            .update_child_shard_ids(lease, child_shard_ids)
            .await
    }

    async fn delete_lease(&self, lease: &Lease) -> Result<(), LeaseError> {
        self.path.pass().await?;
        self.inner.delete_lease(lease).await?;
        self.journal.push(Entry::Deleted {
            key: lease.lease_key.clone(),
        });
        Ok(())
    }

    async fn client_version(&self) -> Result<Option<String>, LeaseError> {
        self.path.pass().await?;
        self.inner.client_version().await
    }

    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, LeaseError> {
        self.path.pass().await?;
        self.inner.lease_keys_of_owner(owner).await
    }

    async fn lease_owner_index_active(&self) -> Result<bool, LeaseError> {
        self.path.pass().await?;
        self.inner.lease_owner_index_active().await
    }

    fn state_tables(&self) -> Option<StateTables> {
        let tables = self.inner.state_tables()?;
        let over_path = |inner: Arc<dyn StateTable>| -> Arc<dyn StateTable> {
            Arc::new(PathStateTable {
                inner,
                path: self.path.clone(),
                faults: self.state_faults.clone(),
                worker: self.worker.clone(),
            })
        };
        Some(StateTables {
            coordinator_state: over_path(tables.coordinator_state),
            worker_metrics: over_path(tables.worker_metrics),
        })
    }
}
