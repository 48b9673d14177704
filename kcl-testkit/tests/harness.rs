//! The processor harness checkpoints like the worker: Shutdown is final, a checkpointer kept
//! past `shutdown` is refused, and a previous owner's pending checkpoint is shown.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use kcl_interfaces::*;
use kcl_testkit::ProcessorHarness;

#[derive(Default)]
struct Keeper {
    kept: Option<Checkpointer>,
    pending_seen: Option<ExtendedSequenceNumber>,
    results: Vec<Option<CheckpointErrorKind>>,
}

impl RecordProcessor for Keeper {
    async fn initialize(&mut self, input: InitializationInput) {
        self.pending_seen = input.pending_checkpoint_sequence_number;
    }
    async fn process_records(&mut self, input: ProcessRecordsInput) {
        // A processor that retries after an error.
        for _ in 0..2 {
            let r = input.checkpointer.checkpoint().await;
            self.results.push(r.err().map(|e| e.kind()));
        }
    }
    async fn shutdown(&mut self, input: ShutdownInput) {
        self.kept = Some(input.checkpointer);
    }
}

#[tokio::test]
async fn shutdown_errors_are_final_as_in_the_worker() {
    let mut h = ProcessorHarness::new(Keeper::default());
    h.initialize("shardId-000000000000").await;
    h.checkpointer().fail_next([CheckpointErrorKind::Shutdown]);
    h.deliver_data(&[("k", b"a")]).await;
    assert_eq!(
        h.processor().results,
        [
            Some(CheckpointErrorKind::Shutdown),
            Some(CheckpointErrorKind::Shutdown)
        ]
    );
    // Throttling, by contrast, may be retried.
    let mut h = ProcessorHarness::new(Keeper::default());
    h.initialize("shardId-000000000000").await;
    h.checkpointer()
        .fail_next([CheckpointErrorKind::Throttling]);
    h.deliver_data(&[("k", b"a")]).await;
    assert_eq!(
        h.processor().results,
        [Some(CheckpointErrorKind::Throttling), None]
    );
}

#[tokio::test]
async fn a_checkpointer_kept_past_shutdown_is_refused() {
    let mut h = ProcessorHarness::new(Keeper::default());
    h.initialize("shardId-000000000000").await;
    h.deliver_data(&[("k", b"a")]).await;
    h.shutdown_requested().await;
    let kept = h.processor().kept.clone().unwrap();
    let err = kept.checkpoint().await.unwrap_err();
    assert_eq!(err.kind(), CheckpointErrorKind::Shutdown);
}

#[tokio::test]
async fn a_previous_owners_pending_checkpoint_is_shown() {
    let pending: ExtendedSequenceNumber = "90.2".parse().unwrap();
    let mut h = ProcessorHarness::starting_with_pending(
        Keeper::default(),
        "50".parse().unwrap(),
        pending.clone(),
    );
    h.initialize("shardId-000000000000").await;
    assert_eq!(h.processor().pending_seen, Some(pending));
}
