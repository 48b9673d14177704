//! One shard consumer: waits for the parents, then runs a processor through its lifecycle
//! (`initialize`, `process_records` for each batch in order, `shutdown` exactly once) fed by
//! a [`Fetcher`] (polling) or a `FanOutReader` (enhanced fan-out).

use std::collections::BTreeSet;
use std::sync::Arc;

use kcl_interfaces::{
    Checkpointer, InitializationInput, ProcessRecordsInput, RecordProcessor,
    RecordProcessorFactory, ShutdownInput, ShutdownReason,
};
use kcl_lease::coordinator::{Holding, LeaseCoordinator};
use kcl_lease::{Clock, Lease, LeaseError, RandomSource};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{Backoff, Retry};
use crate::checkpointer::ShardCheckpointer;
use crate::config::WorkerConfig;
use crate::fetcher::{FetchedBatch, Fetcher};
use crate::health::HealthRegistry;
use crate::metrics as m;
use crate::shard_sync::{ShardSyncer, has_started};
use crate::stream::{ChildShard, StreamClient};

/// What the worker asks of a running consumer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Signal {
    /// Keep going.
    Run,
    /// Graceful shutdown (`ShutdownReason::Requested`).
    Shutdown,
    /// The lease was lost (`ShutdownReason::Zombie`).
    LeaseLost,
}

/// How a consumer ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Outcome {
    /// The shard was processed to its end and SHARD_END checkpointed.
    ShardFinished,
    /// Stopped by graceful shutdown.
    ShutdownRequested,
    /// Stopped because the lease was lost.
    LeaseLost,
    /// The processor failed (panic, hang in shutdown): the lease should be released.
    Failed,
}

/// Everything a consumer needs, shared by the worker.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerContext {
    pub(crate) config: Arc<WorkerConfig>,
    pub(crate) stream: Arc<dyn StreamClient>,
    pub(crate) coordinator: Arc<LeaseCoordinator>,
    pub(crate) syncer: Arc<ShardSyncer>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) random: Arc<dyn RandomSource>,
    pub(crate) health: Arc<HealthRegistry>,
    /// The enhanced fan-out consumer, shared by the worker's readers; `None` for polling.
    pub(crate) fan_out_consumer: Option<Arc<crate::fanout::SharedConsumer>>,
}

/// One shard's consumer.
pub(crate) struct ShardConsumer<F> {
    pub(crate) ctx: ConsumerContext,
    pub(crate) lease: Lease,
    /// The holding of the lease this consumer works in (see `LeaseCoordinator::holding`).
    pub(crate) holding: Holding,
    pub(crate) factory: Arc<F>,
    pub(crate) signal: watch::Receiver<Signal>,
}

impl<F: RecordProcessorFactory> ShardConsumer<F> {
    /// Runs the whole lifecycle.
    pub(crate) async fn run(self) -> Outcome {
        let span = info_span!("shard_consumer", shard_id = %self.lease.lease_key,
            worker_id = %self.ctx.config.worker_id);
        self.run_inner().instrument(span).await
    }

    async fn run_inner(mut self) -> Outcome {
        // 1. Parents first.
        if let Some(outcome) = self.wait_for_parents().await {
            return outcome;
        }
        let key = self.lease.lease_key.clone();
        // The freshest view of the lease (checkpoint, pending checkpoint). Lost while waiting
        // for the parents: no processor is created at all.
        let Some(lease) = self.holding.lease() else {
            return Outcome::LeaseLost;
        };
        if lease.checkpoint.is_shard_end() {
            return Outcome::ShardFinished;
        }
        let mut processor = self.factory.create_processor();
        let backend = Arc::new(ShardCheckpointer::new(
            key.clone(),
            self.holding.clone(),
            self.ctx.config.stream_name.clone(),
            self.ctx.stream.clone(),
            self.ctx
                .config
                .validate_sequence_number_before_checkpointing,
            lease.checkpoint.clone(),
            lease.pending_checkpoint.clone(),
        ));
        let checkpointer = Checkpointer::new(backend.clone());

        // 2. initialize
        info!(checkpoint = %lease.checkpoint, "initializing processor");
        let init = InitializationInput::new(key.clone(), lease.checkpoint.clone())
            .with_pending_checkpoint(lease.pending_checkpoint.clone());
        processor.initialize(init).await;

        // 3. records
        let _health = self.ctx.health.track(&key);
        let (tx, mut rx) = mpsc::channel::<FetchedBatch>(4);
        let fetcher = Fetcher {
            stream: self.ctx.stream.clone(),
            stream_name: self.ctx.config.stream_name.clone(),
            shard_id: key.clone(),
            checkpoint: lease.checkpoint.clone(),
            hash_key_range: lease.hash_key_range,
            config: self.ctx.config.clone(),
            clock: self.ctx.clock.clone(),
            random: self.ctx.random.clone(),
            health: self.ctx.health.clone(),
        };
        let fetch_task = match &self.ctx.fan_out_consumer {
            Some(consumer) => {
                let reader = crate::fanout::FanOutReader {
                    base: fetcher,
                    consumer: consumer.clone(),
                    shard_end_probe_interval: match &self.ctx.config.retrieval_specific_config {
                        crate::config::RetrievalConfig::FanOut(f) => {
                            f.shard_end_probe_interval_or_default()
                        }
                        _ => crate::config::DEFAULT_SHARD_END_PROBE_INTERVAL,
                    },
                };
                tokio::spawn(reader.run(tx).instrument(tracing::Span::current()))
            }
            None => tokio::spawn(fetcher.run(tx).instrument(tracing::Span::current())),
        };
        let _abort_fetch = AbortOnDrop(fetch_task);

        let mut signal = self.signal.clone();
        let shard_end = loop {
            let current = *signal.borrow_and_update();
            match current {
                Signal::Run => {}
                Signal::Shutdown => {
                    return self
                        .shutdown(processor, &backend, checkpointer, ShutdownReason::Requested)
                        .await;
                }
                Signal::LeaseLost => {
                    return self
                        .shutdown(processor, &backend, checkpointer, ShutdownReason::Zombie)
                        .await;
                }
            }
            let batch = tokio::select! {
                biased;
                changed = signal.changed() => {
                    if changed.is_err() {
                        // The worker's task is gone without a signal: it was aborted (a
                        // crash, `WorkerHandle::abort`, a dropped handle), and dropping its
                        // `JoinSet` aborts this task too. A crash calls no processor method:
                        // wait for the abort instead of shutting the processor down (a
                        // graceful stop always sends `Signal::Shutdown` first, which
                        // `changed` reports before the closed channel).
                        std::future::pending::<()>().await;
                    }
                    continue;
                }
                batch = rx.recv() => batch,
            };
            let Some(batch) = batch else {
                // The fetcher stopped without a shard end: it only does so when we dropped
                // the receiver, so this is unexpected. Shut the processor down properly (it
                // may checkpoint); the worker releases the lease and the shard is retried.
                error!("record fetcher stopped unexpectedly");
                self.shutdown(processor, &backend, checkpointer, ShutdownReason::Requested)
                    .await;
                return Outcome::Failed;
            };
            let FetchedBatch {
                records,
                millis_behind_latest,
                cache_entry_time,
                shard_end,
                _permits,
            } = batch;
            if let Some(last) = records.last() {
                backend.delivered(last.extended_sequence_number());
            }
            if !records.is_empty() || self.ctx.config.call_process_records_even_for_empty_list {
                let count = records.len() as u64;
                let bytes: u64 = records.iter().map(|r| r.data.len() as u64).sum();
                let input = ProcessRecordsInput::new(records, checkpointer.clone())
                    .with_millis_behind_latest(millis_behind_latest)
                    .with_cache_times(Some(cache_entry_time), Some(self.ctx.clock.system_time()));
                let started = self.ctx.clock.now();
                processor.process_records(input).await;
                let labels = m::shard_labels(&key);
                metrics::histogram!(level: m::SUMMARY, m::PROCESS_RECORDS_TIME, labels.clone())
                    .record(
                        self.ctx
                            .clock
                            .now()
                            .saturating_duration_since(started)
                            .as_secs_f64()
                            * 1000.0,
                    );
                metrics::counter!(level: m::SUMMARY, m::RECORDS_PROCESSED, labels.clone())
                    .increment(count);
                metrics::counter!(level: m::SUMMARY, m::DATA_BYTES_PROCESSED, labels)
                    .increment(bytes);
                // For the `throughputKBps` of the lease's next renewal.
                self.holding.record_delivered_bytes(bytes);
            }
            drop(_permits);
            if let Some(children) = shard_end {
                break children;
            }
        };

        // 4. The shard ended. Lost or stopped meanwhile: Zombie or Requested, not Terminate.
        let current = *self.signal.borrow();
        if current == Signal::LeaseLost || !self.holds(&key) {
            return self
                .shutdown(processor, &backend, checkpointer, ShutdownReason::Zombie)
                .await;
        }
        if current == Signal::Shutdown {
            return self
                .shutdown(processor, &backend, checkpointer, ShutdownReason::Requested)
                .await;
        }
        // Children, then Terminate until SHARD_END is checkpointed.
        info!(children = shard_end.len(), "shard ended");
        self.record_children(&key, &shard_end).await;
        // Lost while the children were recorded (a store cut off for long): Zombie.
        if *self.signal.borrow() == Signal::LeaseLost || !self.holds(&key) {
            return self
                .shutdown(processor, &backend, checkpointer, ShutdownReason::Zombie)
                .await;
        }
        backend.mark_shard_ended();
        loop {
            let done = self
                .call_shutdown(
                    &mut processor,
                    checkpointer.clone(),
                    ShutdownReason::Terminate,
                )
                .await;
            if !done {
                backend.shut_down("the processor's shutdown failed");
                return Outcome::Failed;
            }
            if backend.last_checkpoint().is_shard_end() {
                backend.shut_down("the shard ended");
                return Outcome::ShardFinished;
            }
            if self.ctx.config.auto_checkpoint_at_shard_end {
                match backend.checkpoint_shard_end().await {
                    Ok(()) => {
                        backend.shut_down("the shard ended");
                        return Outcome::ShardFinished;
                    }
                    Err(e) => {
                        warn!(error = %kcl_lease::ErrorChain(&e), "writing SHARD_END automatically failed")
                    }
                }
            } else {
                metrics::counter!(m::SHARD_END_NOT_CHECKPOINTED_TOTAL).increment(1);
                error!(
                    "the processor returned from shutdown(Terminate) without checkpointing; \
                        the shard stays unfinished and its children blocked; retrying after a back-off"
                );
            }
            if !self.holds(&key) {
                backend.shut_down("the lease was lost to another worker");
                return Outcome::LeaseLost;
            }
            let mut signal = self.signal.clone();
            tokio::select! {
                _ = self.ctx.clock.sleep(self.ctx.config.task_backoff) => {}
                _ = signal.changed() => {}
            }
            let current = *self.signal.borrow();
            match current {
                Signal::Run => {}
                Signal::Shutdown => {
                    backend.shut_down("the worker shut down");
                    return Outcome::ShutdownRequested;
                }
                Signal::LeaseLost => {
                    backend.shut_down("the lease was lost to another worker");
                    return Outcome::LeaseLost;
                }
            }
        }
    }

    /// True while this consumer's holding of the lease lasts.
    fn holds(&self, key: &str) -> bool {
        self.holding.lease_key() == key && self.holding.is_current()
    }

    /// Blocks until every parent is finished. `Some(outcome)` when stopped while waiting.
    async fn wait_for_parents(&mut self) -> Option<Outcome> {
        let parents: Vec<String> = self.lease.parent_shard_ids.iter().cloned().collect();
        if parents.is_empty() || has_started(&self.lease.checkpoint) {
            return None;
        }
        let mut signal = self.signal.clone();
        loop {
            match self.ctx.syncer.parents_finished(&parents).await {
                Ok(true) => return None,
                Ok(false) => debug!(?parents, "waiting for parent shards to finish"),
                Err(e) => {
                    warn!(error = %kcl_lease::ErrorChain(&e), "checking parent shards failed")
                }
            }
            tokio::select! {
                _ = self.ctx.clock.sleep(self.ctx.config.parent_shard_poll_interval) => {}
                r = signal.changed() => if r.is_err() { return Some(Outcome::ShutdownRequested) },
            }
            let current = *signal.borrow_and_update();
            match current {
                Signal::Run => {}
                Signal::Shutdown => return Some(Outcome::ShutdownRequested),
                Signal::LeaseLost => return Some(Outcome::LeaseLost),
            }
        }
    }

    async fn record_children(&self, key: &str, children: &[ChildShard]) {
        let children = if children.is_empty() {
            // Some servers do not return ChildShards: ask ListShards.
            match self.ctx.syncer.children_of(key).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %kcl_lease::ErrorChain(&e), "listing the children of a finished shard failed; the next shard sync creates them");
                    Vec::new()
                }
            }
        } else {
            children.to_vec()
        };
        for child in &children {
            // Retry a few times with a back-off (the store may be throttled); the periodic
            // shard sync creates whatever is still missing.
            let mut backoff = Backoff::new(
                self.ctx.config.task_backoff,
                self.ctx.config.max_backoff,
                self.ctx.random.clone(),
            );
            // Only while the parent's lease is still ours: a worker cut off from the store
            // loses it meanwhile, another worker finishes the parent and the child, and
            // cleanup deletes both; a late retry would create the child's lease again at
            // TRIM_HORIZON and its records would be processed twice.
            let created = backoff
                .retry(
                    &*self.ctx.clock,
                    |_| async {
                        if !self.holds(key) || *self.signal.borrow() == Signal::LeaseLost {
                            return Err(LeaseError::NotHeld {
                                lease_key: key.to_owned(),
                            });
                        }
                        self.ctx.syncer.create_child_lease(child).await
                    },
                    |e, attempt| {
                        if attempt < 5 && e.is_retryable() {
                            Retry::After
                        } else {
                            Retry::GiveUp
                        }
                    },
                )
                .await;
            if let Err(e @ LeaseError::NotHeld { .. }) = &created {
                warn!(child = %child.shard_id, error = %kcl_lease::ErrorChain(e),
                    "the finished shard's lease was lost; its children are left to their owner");
                return;
            }
            if let Err(e) = created {
                warn!(child = %child.shard_id, error = %kcl_lease::ErrorChain(&e),
                    "creating a child lease failed; the next shard sync creates it");
            }
        }
        if !children.is_empty() {
            let ids: BTreeSet<String> = children.iter().map(|c| c.shard_id.clone()).collect();
            if let Err(e) = self.holding.update_child_shard_ids(&ids).await {
                warn!(error = %kcl_lease::ErrorChain(&e), "recording child shard ids failed");
            }
        }
    }

    async fn shutdown(
        &self,
        mut processor: F::Processor,
        backend: &ShardCheckpointer,
        checkpointer: Checkpointer,
        reason: ShutdownReason,
    ) -> Outcome {
        if reason == ShutdownReason::Zombie {
            backend.shut_down("the lease was lost to another worker");
        }
        let ok = self
            .call_shutdown(&mut processor, checkpointer, reason)
            .await;
        backend.shut_down("the processor was shut down");
        match (ok, reason) {
            (false, _) => Outcome::Failed,
            (true, ShutdownReason::Zombie) => Outcome::LeaseLost,
            (true, _) => Outcome::ShutdownRequested,
        }
    }

    /// Calls `shutdown` with the grace period. False when it timed out.
    async fn call_shutdown(
        &self,
        processor: &mut F::Processor,
        checkpointer: Checkpointer,
        reason: ShutdownReason,
    ) -> bool {
        info!(?reason, "shutting down processor");
        let grace = self.ctx.config.shutdown_grace;
        let finished = kcl_lease::timeouts::within(
            &*self.ctx.clock,
            grace,
            processor.shutdown(ShutdownInput::new(reason, checkpointer)),
        )
        .await
        .is_some();
        if !finished {
            metrics::counter!(m::PROCESSOR_FAILURES_TOTAL).increment(1);
            error!(
                ?grace,
                ?reason,
                "the processor's shutdown exceeded the shutdown grace; abandoning it"
            );
        }
        finished
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
