//! The record processor, its factory and their inputs.

use std::fmt;
use std::future::Future;
use std::time::SystemTime;

use kcl_kpl::{ExtendedSequenceNumber, Record};

use crate::Checkpointer;

/// Why a record processor is being shut down.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum ShutdownReason {
    /// The worker is shutting down gracefully. The processor may checkpoint; afterwards the
    /// worker releases the lease so another worker can take the shard at once.
    Requested,
    /// The shard is closed and every record in it was delivered. The processor should
    /// checkpoint (which writes `SHARD_END`) so the child shards can start.
    Terminate,
    /// The lease was lost to another worker (stolen, expired, or taken). Do not checkpoint:
    /// any checkpoint call returns `CheckpointError::Shutdown`.
    Zombie,
}

impl ShutdownReason {
    /// A human explanation of the reason.
    pub fn message(&self) -> &'static str {
        match self {
            ShutdownReason::Requested => {
                "the worker is shutting down gracefully; the processor may checkpoint and the lease will be released"
            }
            ShutdownReason::Terminate => {
                "the shard is closed and all its records were delivered; checkpoint to let child shards start"
            }
            ShutdownReason::Zombie => {
                "the lease was lost to another worker; do not checkpoint, another processor owns the shard"
            }
        }
    }
}

impl fmt::Display for ShutdownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.message())
    }
}

/// What a processor learns when it starts on a shard.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct InitializationInput {
    /// The shard this processor will process.
    pub shard_id: String,
    /// The checkpoint processing resumes after.
    pub extended_sequence_number: ExtendedSequenceNumber,
    /// A pending checkpoint left by a previous owner, if any.
    pub pending_checkpoint_sequence_number: Option<ExtendedSequenceNumber>,
}

impl InitializationInput {
    /// An input for `shard_id` resuming after `checkpoint`.
    pub fn new(shard_id: impl Into<String>, checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            shard_id: shard_id.into(),
            extended_sequence_number: checkpoint,
            pending_checkpoint_sequence_number: None,
        }
    }

    /// Sets the pending checkpoint.
    pub fn with_pending_checkpoint(mut self, pending: Option<ExtendedSequenceNumber>) -> Self {
        self.pending_checkpoint_sequence_number = pending;
        self
    }
}

/// One batch of records for a processor.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProcessRecordsInput {
    /// The records, in shard order (KPL aggregates already deaggregated).
    pub records: Vec<Record>,
    /// Checkpoints progress in this shard.
    pub checkpointer: Checkpointer,
    /// How far the batch is behind the tip of the shard, in milliseconds.
    pub millis_behind_latest: u64,
    /// When the batch was fetched into the worker's cache.
    pub cache_entry_time: Option<SystemTime>,
    /// When the batch left the cache for this processor.
    pub cache_exit_time: Option<SystemTime>,
}

impl ProcessRecordsInput {
    /// A batch of `records` with `checkpointer`.
    pub fn new(records: Vec<Record>, checkpointer: Checkpointer) -> Self {
        Self {
            records,
            checkpointer,
            millis_behind_latest: 0,
            cache_entry_time: None,
            cache_exit_time: None,
        }
    }

    /// Sets how far behind the tip the batch is.
    pub fn with_millis_behind_latest(mut self, millis: u64) -> Self {
        self.millis_behind_latest = millis;
        self
    }

    /// Sets the cache entry and exit times.
    pub fn with_cache_times(mut self, entry: Option<SystemTime>, exit: Option<SystemTime>) -> Self {
        self.cache_entry_time = entry;
        self.cache_exit_time = exit;
        self
    }
}

/// What a processor gets when it is shut down.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ShutdownInput {
    /// Why.
    pub shutdown_reason: ShutdownReason,
    /// Checkpoints (for `Requested` and `Terminate`; fails with `Shutdown` for `Zombie`).
    pub checkpointer: Checkpointer,
}

impl ShutdownInput {
    /// A shutdown for `reason`.
    pub fn new(shutdown_reason: ShutdownReason, checkpointer: Checkpointer) -> Self {
        Self {
            shutdown_reason,
            checkpointer,
        }
    }
}

/// Processes the records of one shard.
///
/// The worker calls, for each shard lease it holds: `initialize` once, then
/// `process_records` for each batch in order (never concurrently), then `shutdown` exactly
/// once. Implement the methods with `async fn`; the futures must be `Send`.
pub trait RecordProcessor: Send + 'static {
    /// Called once before any records are delivered.
    fn initialize(&mut self, input: InitializationInput) -> impl Future<Output = ()> + Send;

    /// Called with each batch of records, in order.
    fn process_records(&mut self, input: ProcessRecordsInput) -> impl Future<Output = ()> + Send;

    /// Called exactly once when the processor stops; see [`ShutdownReason`].
    fn shutdown(&mut self, input: ShutdownInput) -> impl Future<Output = ()> + Send;
}

/// Creates one [`RecordProcessor`] per shard lease.
///
/// Any `Fn() -> P` closure where `P: RecordProcessor` is a factory.
pub trait RecordProcessorFactory: Send + Sync + 'static {
    /// The processor type created.
    type Processor: RecordProcessor;

    /// Creates a processor for a newly acquired shard.
    fn create_processor(&self) -> Self::Processor;
}

impl<F, P> RecordProcessorFactory for F
where
    F: Fn() -> P + Send + Sync + 'static,
    P: RecordProcessor,
{
    type Processor = P;

    fn create_processor(&self) -> P {
        self()
    }
}
