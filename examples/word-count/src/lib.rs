//! A record processor as an application would write one, depending on `kcl-interfaces`
//! only, and unit-tested with `kcl-testkit`'s [`ProcessorHarness`] with the default features
//! off: its tests compile neither an AWS SDK nor `kcl-worker`.
//!
//! [`WordCount`] counts the words of each record's data (UTF-8, split on whitespace) and
//! checkpoints after every `checkpoint_every` records, at shard end, and on a requested
//! shutdown. A checkpoint that fails with `Throttling` is left for the next batch; one that
//! fails with `Shutdown` (the lease is gone) stops further checkpoints.
//!
//! [`ProcessorHarness`]: https://docs.rs/kcl-testkit

use std::collections::BTreeMap;

use kcl_interfaces::{
    CheckpointErrorKind, Checkpointer, InitializationInput, ProcessRecordsInput, RecordProcessor,
    ShutdownInput, ShutdownReason,
};

/// Counts words per shard and checkpoints every `checkpoint_every` records.
#[derive(Debug)]
pub struct WordCount {
    checkpoint_every: usize,
    since_checkpoint: usize,
    lease_lost: bool,
    /// Occurrences of each word seen so far.
    pub words: BTreeMap<String, u64>,
    /// Records whose data was not UTF-8 (counted, not dropped silently).
    pub not_utf8: u64,
    /// Checkpoints that were written.
    pub checkpoints: u64,
}

impl WordCount {
    /// A counter that checkpoints after every `checkpoint_every` records (at least 1).
    pub fn new(checkpoint_every: usize) -> Self {
        Self {
            checkpoint_every: checkpoint_every.max(1),
            since_checkpoint: 0,
            lease_lost: false,
            words: BTreeMap::new(),
            not_utf8: 0,
            checkpoints: 0,
        }
    }

    async fn checkpoint(&mut self, checkpointer: &Checkpointer) {
        if self.lease_lost {
            return;
        }
        match checkpointer.checkpoint().await {
            Ok(()) => {
                self.checkpoints += 1;
                self.since_checkpoint = 0;
            }
            Err(e) if e.kind() == CheckpointErrorKind::Shutdown => self.lease_lost = true,
            // Throttling and the rest: retried with the next batch.
            Err(_) => {}
        }
    }
}

impl RecordProcessor for WordCount {
    async fn initialize(&mut self, _input: InitializationInput) {}

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        for record in &input.records {
            match std::str::from_utf8(&record.data) {
                Ok(text) => {
                    for word in text.split_whitespace() {
                        *self.words.entry(word.to_owned()).or_default() += 1;
                    }
                }
                Err(_) => self.not_utf8 += 1,
            }
        }
        self.since_checkpoint += input.records.len();
        if self.since_checkpoint >= self.checkpoint_every {
            self.checkpoint(&input.checkpointer).await;
        }
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        if input.shutdown_reason != ShutdownReason::Zombie {
            self.checkpoint(&input.checkpointer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use kcl_interfaces::{CheckpointErrorKind, ExtendedSequenceNumber};
    use kcl_testkit::ProcessorHarness;

    use super::WordCount;

    #[tokio::test]
    async fn counts_words_and_checkpoints_every_n_records() {
        let mut h = ProcessorHarness::new(WordCount::new(2));
        h.initialize("shardId-000000000000").await;
        h.deliver_data(&[("k", b"a b"), ("k", b"b")]).await;
        h.deliver_data(&[("k", b"c")]).await;
        assert_eq!(h.processor().words["b"], 2);
        assert_eq!(h.processor().words["c"], 1);
        assert_eq!(h.processor().checkpoints, 1);
        h.end_shard().await;
        assert_eq!(h.processor().checkpoints, 2);
        assert!(h.checkpointer().last_checkpoint().is_shard_end());
    }

    #[tokio::test]
    async fn bad_utf8_is_counted_not_lost() {
        let mut h = ProcessorHarness::new(WordCount::new(10));
        h.initialize("shardId-000000000000").await;
        h.deliver_data(&[("k", b"\xff\xfe"), ("k", b"ok")]).await;
        assert_eq!(h.processor().not_utf8, 1);
        assert_eq!(h.processor().words["ok"], 1);
    }

    #[tokio::test]
    async fn a_lost_lease_stops_checkpoints_and_throttling_is_retried() {
        let mut h = ProcessorHarness::new(WordCount::new(1));
        h.initialize("shardId-000000000000").await;
        h.checkpointer()
            .fail_next([CheckpointErrorKind::Throttling]);
        h.deliver_data(&[("k", b"x")]).await;
        assert_eq!(h.processor().checkpoints, 0);
        h.deliver_data(&[("k", b"y")]).await;
        assert_eq!(h.processor().checkpoints, 1);
        let after_y = h.checkpointer().last_checkpoint();
        assert_ne!(after_y, ExtendedSequenceNumber::TRIM_HORIZON);
        h.checkpointer().fail_next([CheckpointErrorKind::Shutdown]);
        h.deliver_data(&[("k", b"z")]).await;
        h.deliver_data(&[("k", b"w")]).await;
        assert_eq!(h.processor().checkpoints, 1);
        assert_eq!(h.checkpointer().last_checkpoint(), after_y);
    }
}
