//! Test a record processor in milliseconds, without a worker: a [`ProcessorHarness`]
//! drives the lifecycle and a [`RecordingCheckpointer`] records and validates checkpoints
//! the way the worker does.
//!
//! ```
//! use kcl_interfaces::*;
//! use kcl_testkit::harness::ProcessorHarness;
//!
//! #[derive(Default)]
//! struct Echo { seen: Vec<String> }
//! impl RecordProcessor for Echo {
//!     async fn initialize(&mut self, _: InitializationInput) {}
//!     async fn process_records(&mut self, input: ProcessRecordsInput) {
//!         self.seen.extend(input.records.iter().map(|r| String::from_utf8_lossy(&r.data).into_owned()));
//!         input.checkpointer.checkpoint().await.unwrap();
//!     }
//!     async fn shutdown(&mut self, input: ShutdownInput) {
//!         if input.shutdown_reason == ShutdownReason::Terminate {
//!             input.checkpointer.checkpoint().await.unwrap();
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let mut h = ProcessorHarness::new(Echo::default());
//! h.initialize("shardId-000000000000").await;
//! h.deliver_data(&[("k1", b"a"), ("k2", b"b")]).await;
//! h.end_shard().await;
//! assert_eq!(h.processor().seen, ["a", "b"]);
//! assert!(h.checkpointer().last_checkpoint().is_shard_end());
//! # });
//! ```

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use kcl_interfaces::checkpoint::{resolve_target, validate_position};
use kcl_interfaces::{
    BoxFuture, CheckpointBackend, CheckpointError, CheckpointErrorKind, CheckpointTarget,
    Checkpointer, ExtendedSequenceNumber, InitializationInput, ProcessRecordsInput, Record,
    RecordProcessor, SequenceNumber, ShutdownInput, ShutdownReason,
};

#[derive(Debug)]
struct State {
    last: ExtendedSequenceNumber,
    pending: Option<ExtendedSequenceNumber>,
    largest_delivered: ExtendedSequenceNumber,
    shard_ended: bool,
    lease_lost: bool,
    shut_down: bool,
    fail_next: Vec<CheckpointErrorKind>,
    written: Vec<ExtendedSequenceNumber>,
    prepared: Vec<ExtendedSequenceNumber>,
}

/// A checkpoint backend that validates like the worker and records every write.
#[derive(Debug)]
pub struct RecordingCheckpointer {
    state: Mutex<State>,
}

impl RecordingCheckpointer {
    /// Starting from `checkpoint`.
    pub fn new(checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            state: Mutex::new(State {
                largest_delivered: checkpoint.clone(),
                last: checkpoint,
                pending: None,
                shard_ended: false,
                lease_lost: false,
                shut_down: false,
                fail_next: Vec::new(),
                written: Vec::new(),
                prepared: Vec::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every checkpoint written, in order.
    pub fn checkpoints(&self) -> Vec<ExtendedSequenceNumber> {
        self.state().written.clone()
    }

    /// Every pending checkpoint written, in order.
    pub fn prepared(&self) -> Vec<ExtendedSequenceNumber> {
        self.state().prepared.clone()
    }

    /// The last checkpoint written (or the starting one).
    pub fn last_checkpoint(&self) -> ExtendedSequenceNumber {
        self.state().last.clone()
    }

    /// The pending checkpoint, if one is prepared and not yet committed.
    pub fn pending_checkpoint(&self) -> Option<ExtendedSequenceNumber> {
        self.state().pending.clone()
    }

    /// Makes the next checkpoint calls fail with these kinds, in order.
    pub fn fail_next(&self, kinds: impl IntoIterator<Item = CheckpointErrorKind>) {
        self.state().fail_next.extend(kinds);
    }

    /// From now on, behave as after losing the lease (every call fails with `Shutdown`).
    pub fn lose_lease(&self) {
        self.state().lease_lost = true;
    }

    /// Records that `position` was delivered.
    pub fn delivered(&self, position: ExtendedSequenceNumber) {
        let mut s = self.state();
        if position > s.largest_delivered {
            s.largest_delivered = position;
        }
    }

    /// With a pending checkpoint left by a previous owner (shown in `initialize`).
    pub fn set_pending_checkpoint(&self, pending: Option<ExtendedSequenceNumber>) {
        self.state().pending = pending;
    }

    /// The processor returned from `shutdown`: like the worker, refuse checkpoints from now
    /// on (a checkpointer kept and used later fails with `Shutdown`).
    pub fn mark_shut_down(&self) {
        self.state().shut_down = true;
    }

    /// Every record was delivered and the shard is closed.
    pub fn mark_shard_ended(&self) {
        self.state().shard_ended = true;
    }

    fn write(
        &self,
        target: CheckpointTarget,
        prepare: bool,
    ) -> Result<ExtendedSequenceNumber, CheckpointError> {
        let mut s = self.state();
        if s.lease_lost {
            return Err(CheckpointError::Shutdown {
                reason: "the lease was lost".into(),
                source: None,
            });
        }
        if s.shut_down {
            return Err(CheckpointError::Shutdown {
                reason: "the processor was shut down".into(),
                source: None,
            });
        }
        if !s.fail_next.is_empty() {
            let kind = s.fail_next.remove(0);
            // As in the worker, a Shutdown is final: the lease is gone.
            if kind == CheckpointErrorKind::Shutdown {
                s.lease_lost = true;
            }
            return Err(injected(kind));
        }
        let position = resolve_target(&target, &s.largest_delivered, s.shard_ended);
        validate_position(&s.last, &position, &s.largest_delivered, s.shard_ended)?;
        if prepare {
            s.pending = Some(position.clone());
            s.prepared.push(position.clone());
        } else {
            s.last = position.clone();
            s.pending = None;
            s.written.push(position.clone());
        }
        Ok(position)
    }
}

fn injected(kind: CheckpointErrorKind) -> CheckpointError {
    match kind {
        CheckpointErrorKind::Throttling => CheckpointError::Throttling {
            source: "injected throttling".into(),
        },
        CheckpointErrorKind::Shutdown => CheckpointError::Shutdown {
            reason: "injected shutdown".into(),
            source: None,
        },
        CheckpointErrorKind::Dependency => CheckpointError::Dependency {
            source: "injected dependency failure".into(),
        },
        CheckpointErrorKind::IllegalArgument => CheckpointError::IllegalArgument {
            message: "injected illegal argument".into(),
        },
        _ => CheckpointError::InvalidState {
            message: "injected invalid state".into(),
            source: None,
        },
    }
}

impl CheckpointBackend for RecordingCheckpointer {
    fn checkpoint(&self, target: CheckpointTarget) -> BoxFuture<'_, Result<(), CheckpointError>> {
        let r = self.write(target, false).map(|_| ());
        Box::pin(async move { r })
    }

    fn prepare_checkpoint(
        &self,
        target: CheckpointTarget,
    ) -> BoxFuture<'_, Result<ExtendedSequenceNumber, CheckpointError>> {
        let r = self.write(target, true);
        Box::pin(async move { r })
    }
}

/// Drives one processor through its lifecycle.
#[derive(Debug)]
pub struct ProcessorHarness<P> {
    processor: P,
    shard_id: String,
    checkpointer: Arc<RecordingCheckpointer>,
    next_sequence: u128,
    shut_down: Option<ShutdownReason>,
}

impl<P: RecordProcessor> ProcessorHarness<P> {
    /// A harness around `processor`, starting at TRIM_HORIZON.
    pub fn new(processor: P) -> Self {
        Self::starting_at(processor, ExtendedSequenceNumber::TRIM_HORIZON)
    }

    /// A harness whose shard was checkpointed at `checkpoint` before.
    pub fn starting_at(processor: P, checkpoint: ExtendedSequenceNumber) -> Self {
        Self {
            processor,
            shard_id: String::new(),
            checkpointer: Arc::new(RecordingCheckpointer::new(checkpoint)),
            next_sequence: 49_000_000_000_000_000_000_000_000_000_000_000_000,
            shut_down: None,
        }
    }

    /// A harness whose shard has a checkpoint and a pending checkpoint (prepared by a
    /// previous owner that then stopped); `initialize` shows both.
    pub fn starting_with_pending(
        processor: P,
        checkpoint: ExtendedSequenceNumber,
        pending: ExtendedSequenceNumber,
    ) -> Self {
        let h = Self::starting_at(processor, checkpoint);
        h.checkpointer.set_pending_checkpoint(Some(pending));
        h
    }

    /// The processor (to inspect its state).
    pub fn processor(&self) -> &P {
        &self.processor
    }

    /// The recording checkpointer.
    pub fn checkpointer(&self) -> &RecordingCheckpointer {
        &self.checkpointer
    }

    /// Why the processor was shut down, once it was.
    pub fn shutdown_reason(&self) -> Option<ShutdownReason> {
        self.shut_down
    }

    fn handle(&self) -> Checkpointer {
        Checkpointer::new(self.checkpointer.clone())
    }

    /// Calls `initialize`.
    pub async fn initialize(&mut self, shard_id: &str) {
        self.shard_id = shard_id.to_owned();
        let input = InitializationInput::new(shard_id, self.checkpointer.last_checkpoint())
            .with_pending_checkpoint(self.checkpointer.pending_checkpoint());
        self.processor.initialize(input).await;
    }

    /// Delivers `records` as one batch.
    pub async fn deliver(&mut self, records: Vec<Record>) {
        if let Some(last) = records.last() {
            self.checkpointer.delivered(last.extended_sequence_number());
        }
        self.processor
            .process_records(ProcessRecordsInput::new(records, self.handle()))
            .await;
    }

    /// Makes plain records with growing sequence numbers and delivers them as one batch.
    pub async fn deliver_data(&mut self, items: &[(&str, &[u8])]) -> Vec<Record> {
        let records: Vec<Record> = items
            .iter()
            .filter_map(|(key, data)| {
                self.next_sequence += 1;
                // The decimal digits of a u128 always parse.
                let seq = SequenceNumber::parse(&self.next_sequence.to_string()).ok()?;
                Some(Record::new(*key, seq, Bytes::copy_from_slice(data)))
            })
            .collect();
        self.deliver(records.clone()).await;
        records
    }

    /// The shard ended: `shutdown(Terminate)`.
    pub async fn end_shard(&mut self) {
        self.checkpointer.mark_shard_ended();
        self.shutdown(ShutdownReason::Terminate).await;
    }

    /// Graceful worker shutdown: `shutdown(Requested)`.
    pub async fn shutdown_requested(&mut self) {
        self.shutdown(ShutdownReason::Requested).await;
    }

    /// The lease was lost: `shutdown(Zombie)`; checkpoints fail from now on.
    pub async fn lose_lease(&mut self) {
        self.checkpointer.lose_lease();
        self.shutdown(ShutdownReason::Zombie).await;
    }

    async fn shutdown(&mut self, reason: ShutdownReason) {
        self.shut_down = Some(reason);
        self.processor
            .shutdown(ShutdownInput::new(reason, self.handle()))
            .await;
        self.checkpointer.mark_shut_down();
    }
}
