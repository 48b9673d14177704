//! The checkpointer behind each shard's [`kcl_interfaces::Checkpointer`]: validation,
//! prepared checkpoints, and fenced writes through the lease coordinator.

use std::sync::{Arc, Mutex, MutexGuard};

use kcl_interfaces::checkpoint::{resolve_target, validate_position};
use kcl_interfaces::{BoxFuture, CheckpointBackend, CheckpointError, CheckpointTarget};
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::LeaseError;
use kcl_lease::coordinator::Holding;

use crate::stream::{IteratorPosition, StreamClient, StreamError};

/// The checkpoint state of one shard consumer.
#[derive(Debug)]
struct State {
    /// The last checkpoint written (or read from the lease).
    last_checkpoint: ExtendedSequenceNumber,
    /// The last pending checkpoint written, if any.
    pending: Option<ExtendedSequenceNumber>,
    /// The largest position delivered to the processor (starts at the checkpoint).
    largest_delivered: ExtendedSequenceNumber,
    /// Set once every record of a closed shard was delivered.
    shard_ended: bool,
    /// Set when the processor may no longer checkpoint, with the reason.
    shut_down: Option<&'static str>,
}

/// Validates and writes the checkpoints of one shard.
#[derive(Debug)]
pub(crate) struct ShardCheckpointer {
    shard_id: String,
    /// The holding of the lease this processor works in: writes fail once it was lost,
    /// even if the lease was gained again since.
    holding: Holding,
    stream_name: String,
    stream: Arc<dyn StreamClient>,
    validate_with_stream: bool,
    state: Mutex<State>,
    /// Serialises checkpoint writes so they land in call order.
    write_lock: tokio::sync::Mutex<()>,
}

impl ShardCheckpointer {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        shard_id: String,
        holding: Holding,
        stream_name: String,
        stream: Arc<dyn StreamClient>,
        validate_with_stream: bool,
        checkpoint: ExtendedSequenceNumber,
        pending: Option<ExtendedSequenceNumber>,
    ) -> Self {
        Self {
            shard_id,
            holding,
            stream_name,
            stream,
            validate_with_stream,
            state: Mutex::new(State {
                largest_delivered: checkpoint.clone(),
                last_checkpoint: checkpoint,
                pending,
                shard_ended: false,
                shut_down: None,
            }),
            write_lock: tokio::sync::Mutex::new(()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked while holding it; the state
        // itself stays consistent (every update is a single assignment).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `position` was delivered to the processor.
    pub(crate) fn delivered(&self, position: ExtendedSequenceNumber) {
        let mut s = self.state();
        if position > s.largest_delivered {
            s.largest_delivered = position;
        }
    }

    /// Every record of the closed shard was delivered: `checkpoint()` now means SHARD_END.
    pub(crate) fn mark_shard_ended(&self) {
        self.state().shard_ended = true;
    }

    /// No more checkpoints from this processor.
    pub(crate) fn shut_down(&self, reason: &'static str) {
        self.state().shut_down = Some(reason);
    }

    /// The last checkpoint written.
    pub(crate) fn last_checkpoint(&self) -> ExtendedSequenceNumber {
        self.state().last_checkpoint.clone()
    }

    /// Writes SHARD_END on the processor's behalf (`auto_checkpoint_at_shard_end`).
    pub(crate) async fn checkpoint_shard_end(&self) -> Result<(), CheckpointError> {
        self.write(CheckpointTarget::LargestDelivered, false)
            .await
            .map(|_| ())
    }

    fn resolve(
        &self,
        target: &CheckpointTarget,
    ) -> Result<ExtendedSequenceNumber, CheckpointError> {
        let s = self.state();
        if let Some(reason) = s.shut_down {
            return Err(CheckpointError::Shutdown {
                reason: reason.to_owned(),
                source: None,
            });
        }
        let position = resolve_target(target, &s.largest_delivered, s.shard_ended);
        validate_position(
            &s.last_checkpoint,
            &position,
            &s.largest_delivered,
            s.shard_ended,
        )?;
        Ok(position)
    }

    /// Asks Kinesis whether a sequence number belongs to this shard (as the Java KCL's
    /// sequence number validator does).
    async fn validate_with_stream(
        &self,
        position: &ExtendedSequenceNumber,
    ) -> Result<(), CheckpointError> {
        let Some(seq) = position.sequence_number() else {
            return Ok(());
        };
        match self
            .stream
            .get_shard_iterator(
                &self.stream_name,
                &self.shard_id,
                &IteratorPosition::AtSequenceNumber(seq.clone()),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(StreamError::InvalidArgument { message }) => {
                Err(CheckpointError::IllegalArgument {
                    message: format!(
                        "{seq} is not a sequence number of shard {}: {message}",
                        self.shard_id
                    ),
                })
            }
            Err(e @ StreamError::Throttled { .. }) => Err(CheckpointError::Throttling {
                source: Box::new(e),
            }),
            Err(e) if e.is_retryable() => Err(CheckpointError::Dependency {
                source: Box::new(e),
            }),
            Err(e) => Err(CheckpointError::InvalidState {
                message: format!("validating {seq} with kinesis failed"),
                source: Some(Box::new(e)),
            }),
        }
    }

    async fn write(
        &self,
        target: CheckpointTarget,
        prepare: bool,
    ) -> Result<ExtendedSequenceNumber, CheckpointError> {
        let _serial = self.write_lock.lock().await;
        let position = self.resolve(&target)?;
        let explicit = matches!(target, CheckpointTarget::At(_));
        if explicit && self.validate_with_stream {
            let delivered = self.state().largest_delivered.clone();
            // The largest delivered record was read from this shard; anything else is asked.
            if position.sequence_number() != delivered.sequence_number() {
                self.validate_with_stream(&position).await?;
            }
        }
        let result = if prepare {
            self.holding.prepare_checkpoint(Some(&position)).await
        } else {
            self.holding.checkpoint(&position).await
        };
        match result {
            Ok(_) => {
                let mut s = self.state();
                if prepare {
                    s.pending = Some(position.clone());
                } else {
                    s.last_checkpoint = position.clone();
                    s.pending = None;
                }
                Ok(position)
            }
            Err(e) => {
                let err = map_lease_error(e);
                if matches!(err, CheckpointError::Shutdown { .. }) {
                    self.shut_down("the lease was lost to another worker");
                }
                Err(err)
            }
        }
    }
}

/// Maps a lease store failure to the checkpoint error a processor sees.
pub(crate) fn map_lease_error(e: LeaseError) -> CheckpointError {
    match e {
        LeaseError::ConditionFailed { .. }
        | LeaseError::NotHeld { .. }
        | LeaseError::NotFound { .. } => CheckpointError::Shutdown {
            reason: "the lease was lost to another worker".to_owned(),
            source: Some(Box::new(e)),
        },
        LeaseError::Throttled { .. } => CheckpointError::Throttling {
            source: Box::new(e),
        },
        LeaseError::TableMissing { .. } => CheckpointError::InvalidState {
            message: "the lease table is missing".to_owned(),
            source: Some(Box::new(e)),
        },
        LeaseError::Unreachable { .. }
        | LeaseError::Service { .. }
        | LeaseError::Timeout { .. } => CheckpointError::Dependency {
            source: Box::new(e),
        },
        other => CheckpointError::InvalidState {
            message: "the lease store cannot store it".to_owned(),
            source: Some(Box::new(other)),
        },
    }
}

impl CheckpointBackend for ShardCheckpointer {
    fn checkpoint(&self, target: CheckpointTarget) -> BoxFuture<'_, Result<(), CheckpointError>> {
        Box::pin(async move { self.write(target, false).await.map(|_| ()) })
    }

    fn prepare_checkpoint(
        &self,
        target: CheckpointTarget,
    ) -> BoxFuture<'_, Result<ExtendedSequenceNumber, CheckpointError>> {
        Box::pin(self.write(target, true))
    }
}
