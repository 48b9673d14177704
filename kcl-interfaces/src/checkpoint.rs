//! Checkpointing: the checkpointer handed to processors, the prepared checkpointer, and the
//! checkpoint errors.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kcl_kpl::{ExtendedSequenceNumber, Record};

/// A boxed error cause.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The five kinds of checkpoint failure.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[non_exhaustive]
pub enum CheckpointErrorKind {
    /// The lease store throttled the write; the caller may retry after a back-off.
    Throttling,
    /// The lease was lost or the processor was shut down: stop processing this shard.
    Shutdown,
    /// The lease table is missing or otherwise unusable.
    InvalidState,
    /// The lease store could not be reached; the caller may retry.
    Dependency,
    /// The position is malformed or out of range.
    IllegalArgument,
}

/// Why a checkpoint (or a prepared checkpoint) could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// The lease store throttled the write. Retrying later may succeed.
    #[error("checkpoint throttled by the lease store")]
    Throttling {
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The lease was lost (another worker owns the shard now) or this processor was shut
    /// down. Do not retry: another processor may already be processing these records.
    #[error("cannot checkpoint: {reason}")]
    Shutdown {
        /// What happened.
        reason: String,
        /// The lease store's error that showed it, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The checkpoint cannot be stored (for example the lease table does not exist).
    #[error("cannot store checkpoint: {message}")]
    InvalidState {
        /// What is wrong.
        message: String,
        /// The underlying error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The lease store failed or could not be reached. Retrying later may succeed.
    #[error("lease store failed while checkpointing")]
    Dependency {
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The position is malformed, below the last checkpoint or above the largest
    /// delivered record.
    #[error("invalid checkpoint position: {message}")]
    IllegalArgument {
        /// What is wrong.
        message: String,
    },
}

impl CheckpointError {
    /// Which of the five kinds this is.
    pub fn kind(&self) -> CheckpointErrorKind {
        match self {
            CheckpointError::Throttling { .. } => CheckpointErrorKind::Throttling,
            CheckpointError::Shutdown { .. } => CheckpointErrorKind::Shutdown,
            CheckpointError::InvalidState { .. } => CheckpointErrorKind::InvalidState,
            CheckpointError::Dependency { .. } => CheckpointErrorKind::Dependency,
            CheckpointError::IllegalArgument { .. } => CheckpointErrorKind::IllegalArgument,
        }
    }

    /// Whether retrying the same checkpoint later may succeed (throttling, dependency).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CheckpointError::Throttling { .. } | CheckpointError::Dependency { .. }
        )
    }
}

/// The position a [`CheckpointTarget`] means, given the largest position delivered to the
/// processor and whether the closed shard was read to its end: `LargestDelivered` is the
/// largest delivered position, or `SHARD_END` once the shard ended.
pub fn resolve_target(
    target: &CheckpointTarget,
    largest_delivered: &ExtendedSequenceNumber,
    shard_ended: bool,
) -> ExtendedSequenceNumber {
    match target {
        CheckpointTarget::LargestDelivered if shard_ended => ExtendedSequenceNumber::SHARD_END,
        CheckpointTarget::LargestDelivered => largest_delivered.clone(),
        CheckpointTarget::At(p) => p.clone(),
    }
}

/// The rules of a checkpoint position, the same for the worker and for test doubles:
///
/// * `SHARD_END` only once every record of the closed shard was delivered (`shard_ended`);
/// * never before the `last` checkpoint (checkpoints only move forward);
/// * never after the largest position delivered to the processor (except `SHARD_END`).
///
/// Each broken rule is [`CheckpointError::IllegalArgument`] saying which.
pub fn validate_position(
    last: &ExtendedSequenceNumber,
    requested: &ExtendedSequenceNumber,
    largest_delivered: &ExtendedSequenceNumber,
    shard_ended: bool,
) -> Result<(), CheckpointError> {
    if requested.is_shard_end() && !shard_ended {
        return Err(CheckpointError::IllegalArgument {
            message: "SHARD_END can only be checkpointed after the shard ended".to_owned(),
        });
    }
    if requested < last {
        return Err(CheckpointError::IllegalArgument {
            message: format!("{requested} is before the last checkpoint {last}"),
        });
    }
    if !requested.is_shard_end() && requested > largest_delivered {
        return Err(CheckpointError::IllegalArgument {
            message: format!(
                "{requested} is after the largest delivered position {largest_delivered}"
            ),
        });
    }
    Ok(())
}

/// Which position a checkpoint call means.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum CheckpointTarget {
    /// The largest position delivered so far; `SHARD_END` once the shard ended and every
    /// record was delivered (`ShutdownReason::Terminate`).
    LargestDelivered,
    /// Exactly this position.
    At(ExtendedSequenceNumber),
}

/// What a [`Checkpointer`] calls to store checkpoints. The worker implements it; a
/// processor never needs to, except to fake checkpoints in its own unit tests (the
/// `kcl-testkit` crate has a recording implementation).
pub trait CheckpointBackend: Send + Sync + fmt::Debug {
    /// Validates and writes a checkpoint.
    fn checkpoint(&self, target: CheckpointTarget) -> BoxFuture<'_, Result<(), CheckpointError>>;

    /// Validates and writes a pending checkpoint; returns the position prepared.
    fn prepare_checkpoint(
        &self,
        target: CheckpointTarget,
    ) -> BoxFuture<'_, Result<ExtendedSequenceNumber, CheckpointError>>;
}

/// Records a processor's progress in the lease table.
///
/// Handed to the processor in [`crate::ProcessRecordsInput`] and [`crate::ShutdownInput`];
/// cheap to clone, and callable from inside `process_records` and `shutdown`. Every write
/// is fenced: it succeeds only while this worker still owns the lease.
#[derive(Clone, Debug)]
pub struct Checkpointer {
    backend: Arc<dyn CheckpointBackend>,
}

impl Checkpointer {
    /// A checkpointer writing through `backend`.
    pub fn new(backend: Arc<dyn CheckpointBackend>) -> Self {
        Self { backend }
    }

    /// Checkpoints the largest position delivered so far (the last record of the last
    /// batch). After `ShutdownReason::Terminate` this writes `SHARD_END`.
    pub async fn checkpoint(&self) -> Result<(), CheckpointError> {
        self.backend
            .checkpoint(CheckpointTarget::LargestDelivered)
            .await
    }

    /// Checkpoints exactly at `position`. It must be at or after the last checkpoint and at
    /// or before the largest delivered position, else `IllegalArgument`.
    pub async fn checkpoint_at(
        &self,
        position: &ExtendedSequenceNumber,
    ) -> Result<(), CheckpointError> {
        self.backend
            .checkpoint(CheckpointTarget::At(position.clone()))
            .await
    }

    /// Checkpoints at a record (its sequence and sub-sequence number).
    pub async fn checkpoint_record(&self, record: &Record) -> Result<(), CheckpointError> {
        self.checkpoint_at(&record.extended_sequence_number()).await
    }

    /// Checkpoints at a sequence number given as a string (sub-sequence 0). A malformed
    /// string is `IllegalArgument`.
    pub async fn checkpoint_sequence(&self, sequence_number: &str) -> Result<(), CheckpointError> {
        let position = parse_position(sequence_number)?;
        self.checkpoint_at(&position).await
    }

    /// Writes a pending checkpoint at the largest delivered position; the returned
    /// [`PreparedCheckpointer`] commits it.
    pub async fn prepare_checkpoint(&self) -> Result<PreparedCheckpointer, CheckpointError> {
        self.prepare(CheckpointTarget::LargestDelivered).await
    }

    /// Writes a pending checkpoint at `position` (validated like
    /// [`Checkpointer::checkpoint_at`]).
    pub async fn prepare_checkpoint_at(
        &self,
        position: &ExtendedSequenceNumber,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        self.prepare(CheckpointTarget::At(position.clone())).await
    }

    /// Writes a pending checkpoint at a sequence number given as a string.
    pub async fn prepare_checkpoint_sequence(
        &self,
        sequence_number: &str,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        let position = parse_position(sequence_number)?;
        self.prepare_checkpoint_at(&position).await
    }

    async fn prepare(
        &self,
        target: CheckpointTarget,
    ) -> Result<PreparedCheckpointer, CheckpointError> {
        let pending = self.backend.prepare_checkpoint(target).await?;
        Ok(PreparedCheckpointer {
            checkpointer: self.clone(),
            pending,
        })
    }
}

fn parse_position(sequence_number: &str) -> Result<ExtendedSequenceNumber, CheckpointError> {
    sequence_number
        .parse::<ExtendedSequenceNumber>()
        .map_err(|e| CheckpointError::IllegalArgument {
            message: e.to_string(),
        })
}

/// A pending checkpoint written by [`Checkpointer::prepare_checkpoint`]; `checkpoint()`
/// commits it.
#[derive(Clone, Debug)]
pub struct PreparedCheckpointer {
    checkpointer: Checkpointer,
    pending: ExtendedSequenceNumber,
}

impl PreparedCheckpointer {
    /// The prepared position.
    pub fn pending_checkpoint(&self) -> &ExtendedSequenceNumber {
        &self.pending
    }

    /// Commits the prepared position as the checkpoint (and clears the pending one).
    pub async fn checkpoint(&self) -> Result<(), CheckpointError> {
        self.checkpointer.checkpoint_at(&self.pending).await
    }
}
