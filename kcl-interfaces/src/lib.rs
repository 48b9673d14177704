//! The record processor interface of the Kinesis Client Library for Rust.
//!
//! A record processor depends on this crate only: no async runtime, no AWS SDK. The worker
//! (`kcl-worker`) creates one processor per shard lease through a
//! [`RecordProcessorFactory`], calls [`RecordProcessor::initialize`], then
//! [`RecordProcessor::process_records`] for each batch in order, then
//! [`RecordProcessor::shutdown`] exactly once with a [`ShutdownReason`].
//!
//! # Example
//!
//! A processor that counts records, checkpoints after every batch and checkpoints at the
//! end of a closed shard:
//!
//! ```
//! use kcl_interfaces::{
//!     CheckpointErrorKind, InitializationInput, ProcessRecordsInput, RecordProcessor,
//!     ShutdownInput, ShutdownReason,
//! };
//!
//! #[derive(Default)]
//! struct Counter {
//!     shard_id: String,
//!     records: u64,
//! }
//!
//! impl RecordProcessor for Counter {
//!     async fn initialize(&mut self, input: InitializationInput) {
//!         self.shard_id = input.shard_id;
//!     }
//!
//!     async fn process_records(&mut self, input: ProcessRecordsInput) {
//!         for record in &input.records {
//!             self.records += 1;
//!             let _payload: &[u8] = &record.data;
//!         }
//!         match input.checkpointer.checkpoint().await {
//!             Ok(()) => {}
//!             // Another worker owns the shard now: stop quietly.
//!             Err(e) if e.kind() == CheckpointErrorKind::Shutdown => {}
//!             // Throttled or the store is unreachable: the next batch checkpoints again.
//!             Err(e) if e.is_retryable() => {}
//!             Err(e) => eprintln!("checkpoint failed on {}: {e}", self.shard_id),
//!         }
//!     }
//!
//!     async fn shutdown(&mut self, input: ShutdownInput) {
//!         match input.shutdown_reason {
//!             // The shard is finished: checkpointing writes SHARD_END and lets children start.
//!             ShutdownReason::Terminate | ShutdownReason::Requested => {
//!                 let _ = input.checkpointer.checkpoint().await;
//!             }
//!             // The lease was lost: never checkpoint.
//!             _ => {}
//!         }
//!     }
//! }
//!
//! // Any `Fn() -> P` is a factory.
//! fn factory() -> impl kcl_interfaces::RecordProcessorFactory {
//!     Counter::default
//! }
//! # let _ = factory();
//! ```

pub mod checkpoint;
mod processor;

pub use checkpoint::{
    BoxError, BoxFuture, CheckpointBackend, CheckpointError, CheckpointErrorKind, CheckpointTarget,
    Checkpointer, PreparedCheckpointer,
};
pub use kcl_kpl::{ExtendedSequenceNumber, Position, Record, SequenceNumber};
pub use processor::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, RecordProcessorFactory,
    ShutdownInput, ShutdownReason,
};
