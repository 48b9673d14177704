//! The [`Worker`]: shard sync, lease coordination and one [`ShardConsumer`] per held lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kcl_interfaces::RecordProcessorFactory;
use kcl_lease::coordinator::{Holding, LeaseCoordinator, LeaseCoordinatorConfig, LeaseEvent};
#[cfg(feature = "dynamodb")]
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{Clock, Lease, LeaseStore, RandomSource, SeededRandom, SystemClock};
use tokio::sync::{oneshot, watch};
use tokio::task::{Id, JoinSet};
use tracing::{Instrument, error, info, info_span, warn};

#[cfg(feature = "kinesis")]
use crate::aws::AwsStreamClient;
use crate::backoff::Backoff;
use crate::config::WorkerConfig;
use crate::consumer::{ConsumerContext, Outcome, ShardConsumer, Signal};
use crate::error::{ConfigError, WorkerError};
use crate::metrics as m;
use crate::shard_sync::ShardSyncer;
use crate::stream::StreamClient;

/// Builds a [`Worker`].
pub struct WorkerBuilder<F> {
    config: WorkerConfig,
    factory: F,
    stream: Option<Arc<dyn StreamClient>>,
    store: Option<Arc<dyn LeaseStore>>,
    clock: Option<Arc<dyn Clock>>,
    random: Option<Arc<dyn RandomSource>>,
    #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
    sdk_config: Option<aws_config::SdkConfig>,
}

impl<F> std::fmt::Debug for WorkerBuilder<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("config", &self.config)
            .field("stream", &self.stream)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<F: RecordProcessorFactory> WorkerBuilder<F> {
    /// Uses this stream client instead of the AWS one (e.g. the in-memory one of `test_util`
    /// Kinesis).
    pub fn stream_client(mut self, stream: Arc<dyn StreamClient>) -> Self {
        self.stream = Some(stream);
        self
    }

    /// Uses this lease store instead of DynamoDB.
    pub fn lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses this clock (default: the system clock through tokio).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Uses this random source for jitter (default: seeded from entropy).
    pub fn random(mut self, random: Arc<dyn RandomSource>) -> Self {
        self.random = Some(random);
        self
    }

    /// Uses this AWS configuration for the clients the worker creates (default: loaded from
    /// the environment). The configuration's endpoint and region options still apply.
    #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
    pub fn aws_config(mut self, sdk_config: aws_config::SdkConfig) -> Self {
        self.sdk_config = Some(sdk_config);
        self
    }

    /// Builds the worker, creating AWS clients for what was not given.
    pub async fn build(self) -> Result<Worker<F>, WorkerError> {
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
        let sdk = if self.stream.is_none() || self.store.is_none() {
            let base = match self.sdk_config {
                Some(c) => c,
                None => aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
            };
            let mut b = base.into_builder();
            if let Some(region) = &self.config.region {
                b.set_region(Some(aws_config::Region::new(region.clone())));
            }
            Some(b.build())
        } else {
            None
        };
        let stream = match self.stream {
            Some(s) => s,
            #[cfg(feature = "kinesis")]
            None if sdk.is_some() => {
                let sdk = sdk.as_ref().ok_or(ConfigError::Missing {
                    what: "stream client",
                })?;
                let mut kb = aws_sdk_kinesis::config::Builder::from(sdk);
                if let Some(url) = &self.config.kinesis_endpoint {
                    kb = kb.endpoint_url(url);
                }
                Arc::new(AwsStreamClient::new(aws_sdk_kinesis::Client::from_conf(
                    kb.build(),
                )))
            }
            None => {
                return Err(ConfigError::Missing {
                    what: "stream client",
                }
                .into());
            }
        };
        let store = match self.store {
            Some(s) => s,
            #[cfg(feature = "dynamodb")]
            None if sdk.is_some() => {
                let sdk = sdk.as_ref().ok_or(ConfigError::Missing {
                    what: "lease store",
                })?;
                let mut db = aws_sdk_dynamodb::config::Builder::from(sdk);
                if let Some(url) = &self.config.dynamodb_endpoint {
                    db = db.endpoint_url(url);
                }
                Arc::new(
                    DynamoLeaseStore::new(
                        aws_sdk_dynamodb::Client::from_conf(db.build()),
                        self.config.table_name.clone(),
                    )
                    .with_clock(clock.clone()),
                )
            }
            None => {
                return Err(ConfigError::Missing {
                    what: "lease store",
                }
                .into());
            }
        };
        Ok(Worker {
            config: Arc::new(self.config),
            factory: Arc::new(self.factory),
            stream,
            store,
            clock,
            random: self
                .random
                .unwrap_or_else(|| Arc::new(SeededRandom::from_entropy())),
        })
    }
}

/// Consumes a stream with the shards shared among all workers of the application.
///
/// ```no_run
/// # use kcl_interfaces::*;
/// # #[derive(Default)] struct MyProcessor;
/// # impl RecordProcessor for MyProcessor {
/// #   async fn initialize(&mut self, _: InitializationInput) {}
/// #   async fn process_records(&mut self, i: ProcessRecordsInput) { let _ = i.checkpointer.checkpoint().await; }
/// #   async fn shutdown(&mut self, i: ShutdownInput) { let _ = i.checkpointer.checkpoint().await; }
/// # }
/// # async fn run() -> Result<(), kcl_worker::WorkerError> {
/// use kcl_worker::{Worker, WorkerConfig};
/// let config = WorkerConfig::builder("my-app", "my-stream").build()?;
/// let handle = Worker::builder(config, MyProcessor::default).build().await?.start().await?;
/// // ... later, on SIGTERM:
/// handle.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Worker<F> {
    config: Arc<WorkerConfig>,
    factory: Arc<F>,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    clock: Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
}

impl<F: RecordProcessorFactory> Worker<F> {
    /// A builder for a worker with `config` and a processor `factory`.
    pub fn builder(config: WorkerConfig, factory: F) -> WorkerBuilder<F> {
        WorkerBuilder {
            config,
            factory,
            stream: None,
            store: None,
            clock: None,
            random: None,
            #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
            sdk_config: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Creates the lease table if needed, syncs shards once, then runs on tokio until the
    /// returned handle shuts it down. Fails at once when the stream does not exist or the
    /// table cannot be created.
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        let span = info_span!("worker", worker_id = %self.config.worker_id);
        async {
            let syncer = Arc::new(ShardSyncer::new(
                self.config.clone(),
                self.stream.clone(),
                self.store.clone(),
            ));
            // Retryable failures (throttling, a store or stream briefly unreachable) are
            // retried with a back-off a few times; anything else fails the start at once.
            let mut backoff = Backoff::new(
                self.config.task_backoff,
                self.config.max_backoff,
                self.random.clone(),
            );
            let mut attempt = 0;
            let report = loop {
                attempt += 1;
                let result = async {
                    self.store
                        .create_table_if_not_exists(self.config.billing_mode)
                        .await?;
                    syncer.sync().await
                }
                .await;
                match result {
                    Ok(report) => break report,
                    Err(e) if e.is_retryable() && attempt < 6 => {
                        warn!(error = %kcl_lease::ErrorChain(&e), attempt, "starting the worker failed; retrying");
                        self.clock.sleep(backoff.next_delay()).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            info!(
                shards = report.shards,
                created = report.leases_created,
                "worker starting"
            );
            let mut lc = LeaseCoordinatorConfig::new(self.config.worker_id.clone());
            lc.failover_time = self.config.failover_time;
            lc.max_leases_for_worker = self.config.max_leases_for_worker;
            lc.max_leases_to_steal_at_one_time = self.config.max_leases_to_steal_at_one_time;
            let coordinator = LeaseCoordinator::new(
                self.store.clone(),
                lc,
                self.clock.clone(),
                self.random.clone(),
            )?;
            let events = coordinator.events().ok_or_else(|| WorkerError::Task {
                message: "lease events already taken".to_owned(),
            })?;
            let ctx = ConsumerContext {
                config: self.config.clone(),
                stream: self.stream.clone(),
                coordinator: coordinator.clone(),
                syncer,
                clock: self.clock.clone(),
                random: self.random.clone(),
            };
            let coordinator_handle = coordinator.spawn();
            let (stop_tx, stop_rx) = oneshot::channel();
            let run = WorkerLoop {
                ctx,
                factory: self.factory,
                consumers: JoinSet::new(),
                running: HashMap::new(),
                by_task: HashMap::new(),
                regained: HashMap::new(),
            };
            let task = tokio::spawn(
                run.run(events, stop_rx)
                    .instrument(tracing::Span::current()),
            );
            Ok(WorkerHandle {
                worker_id: self.config.worker_id.clone(),
                stop: Some(stop_tx),
                task: Some(task),
                coordinator,
                _coordinator_handle: coordinator_handle,
            })
        }
        .instrument(span)
        .await
    }
}

/// What a graceful shutdown did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Processors still running when `shutdown_grace` ran out: they were aborted (their
    /// leases were still released).
    pub aborted_processors: usize,
    /// Leases released in the table.
    pub leases_released: Vec<String>,
    /// Leases whose release failed, with the error: other workers take them after
    /// `failover_time`.
    pub leases_not_released: Vec<(String, String)>,
}

impl ShutdownReport {
    /// True when every processor stopped within the grace and every lease was released.
    pub fn is_clean(&self) -> bool {
        self.aborted_processors == 0 && self.leases_not_released.is_empty()
    }
}

/// Controls a running worker.
#[derive(Debug)]
pub struct WorkerHandle {
    worker_id: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<ShutdownReport>>,
    coordinator: Arc<LeaseCoordinator>,
    _coordinator_handle: kcl_lease::coordinator::CoordinatorHandle,
}

impl WorkerHandle {
    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The leases this worker holds now.
    pub fn held_leases(&self) -> Vec<Lease> {
        self.coordinator.held_leases()
    }

    /// Graceful shutdown: every processor gets `ShutdownReason::Requested` (and may
    /// checkpoint), the worker waits at most `shutdown_grace`, releases its leases, and
    /// returns once no processor callback can run any more.
    pub async fn shutdown(mut self) -> Result<ShutdownReport, WorkerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| WorkerError::Task {
                message: e.to_string(),
            }),
            None => Ok(ShutdownReport::default()),
        }
    }

    /// Stops everything at once without shutting processors down or releasing leases, as a
    /// crash would (other workers take the leases after `failover_time`). For tests and
    /// simulations.
    pub async fn abort(mut self) {
        // Abort before the stop sender is dropped: a dropped sender would read as a request
        // for graceful shutdown.
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        self.coordinator.stop().await;
        self.stop.take();
    }

    /// Whether the worker's task has ended (on its own, e.g. when its lease coordinator
    /// stopped).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // A dropped handle stops the worker abruptly (no release): consumers are aborted.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct WorkerLoop<F> {
    ctx: ConsumerContext,
    factory: Arc<F>,
    consumers: JoinSet<Outcome>,
    /// lease key -> signal sender of its running consumer
    running: HashMap<String, watch::Sender<Signal>>,
    /// task -> (lease key, holding)
    by_task: HashMap<Id, (String, Holding)>,
    /// Leases gained again while their previous consumer was still stopping.
    regained: HashMap<String, Lease>,
}

impl<F: RecordProcessorFactory> WorkerLoop<F> {
    async fn run(
        mut self,
        mut events: tokio::sync::mpsc::UnboundedReceiver<LeaseEvent>,
        mut stop: oneshot::Receiver<()>,
    ) -> ShutdownReport {
        let sync_interval = self.ctx.config.shard_sync_interval;
        let mut next_sync = self.ctx.clock.sleep(sync_interval);
        let mut syncing: JoinSet<Result<crate::SyncReport, WorkerError>> = JoinSet::new();
        let mut sync_backoff = Backoff::new(
            self.ctx.config.task_backoff,
            self.ctx.config.max_backoff,
            self.ctx.random.clone(),
        );
        loop {
            tokio::select! {
                request = &mut stop => {
                    if request.is_err() {
                        // The handle was dropped without shutdown(): it aborts this task.
                        std::future::pending::<()>().await;
                    }
                    break;
                }
                event = events.recv() => match event {
                    Some(LeaseEvent::Gained(lease)) => self.gained(lease),
                    Some(LeaseEvent::Lost { lease_key, .. }) => self.lost(&lease_key),
                    Some(_) => {}
                    None => {
                        error!("the lease coordinator stopped; stopping the worker");
                        break;
                    }
                },
                // The sync runs in its own task so lease events and stop requests are
                // handled while it lists shards and scans the table.
                _ = &mut next_sync, if syncing.is_empty() => {
                    let syncer = self.ctx.syncer.clone();
                    syncing.spawn(async move { syncer.sync().await }.instrument(tracing::Span::current()));
                }
                Some(done) = syncing.join_next(), if !syncing.is_empty() => {
                    let delay = match done {
                        Ok(Ok(_)) => { sync_backoff.reset(); sync_interval }
                        Ok(Err(e)) => {
                            warn!(error = %kcl_lease::ErrorChain(&e),
                                "shard sync failed; retrying after a back-off");
                            sync_backoff.next_delay()
                        }
                        Err(e) => {
                            error!(error = %kcl_lease::ErrorChain(&e), "shard sync task failed; retrying after a back-off");
                            sync_backoff.next_delay()
                        }
                    };
                    next_sync = self.ctx.clock.sleep(delay);
                }
                Some(done) = self.consumers.join_next_with_id(), if !self.consumers.is_empty() => {
                    self.finished(done).await;
                }
            }
        }
        self.graceful_shutdown().await
    }

    fn gained(&mut self, lease: Lease) {
        let key = lease.lease_key.clone();
        if self.running.contains_key(&key) {
            self.regained.insert(key, lease);
            return;
        }
        // Lost again before we got here: the Lost event follows.
        let Some(holding) = self.ctx.coordinator.holding(&key) else {
            return;
        };
        let (tx, rx) = watch::channel(Signal::Run);
        let consumer = ShardConsumer {
            ctx: self.ctx.clone(),
            lease,
            holding: holding.clone(),
            factory: self.factory.clone(),
            signal: rx,
        };
        let handle = self.consumers.spawn(consumer.run());
        self.by_task.insert(handle.id(), (key.clone(), holding));
        self.running.insert(key, tx);
        metrics::gauge!(m::SHARD_CONSUMERS).set(self.running.len() as f64);
    }

    fn lost(&mut self, key: &str) {
        self.regained.remove(key);
        if let Some(tx) = self.running.get(key) {
            info!(lease_key = %key, "lease lost; shutting the processor down as a zombie");
            let _ = tx.send(Signal::LeaseLost);
        }
    }

    async fn finished(&mut self, done: Result<(Id, Outcome), tokio::task::JoinError>) {
        let (id, outcome) = match done {
            Ok((id, outcome)) => (id, outcome),
            Err(e) => {
                if e.is_panic() {
                    metrics::counter!(m::PROCESSOR_FAILURES_TOTAL).increment(1);
                    error!("a record processor panicked; its shard consumer ended");
                }
                (e.id(), Outcome::Failed)
            }
        };
        let Some((key, holding)) = self.by_task.remove(&id) else {
            return;
        };
        self.running.remove(&key);
        metrics::gauge!(m::SHARD_CONSUMERS).set(self.running.len() as f64);
        match outcome {
            Outcome::ShardFinished | Outcome::Failed => {
                // Give the lease up so another consumer (here or elsewhere) can proceed; a
                // finished lease is never taken again.
                // Only this consumer's holding: a lease lost and gained again meanwhile stays.
                match holding.release().await {
                    Ok(()) | Err(kcl_lease::LeaseError::NotHeld { .. }) => {}
                    Err(e) => {
                        warn!(lease_key = %key, error = %kcl_lease::ErrorChain(&e), "releasing the lease failed; it will expire")
                    }
                }
            }
            Outcome::LeaseLost | Outcome::ShutdownRequested => {}
        }
        if let Some(lease) = self.regained.remove(&key)
            && self.ctx.coordinator.is_held(&key)
        {
            self.gained(lease);
        }
    }

    async fn graceful_shutdown(&mut self) -> ShutdownReport {
        info!("graceful shutdown: stopping processors");
        self.ctx.coordinator.stop().await;
        for tx in self.running.values() {
            // A consumer already told its lease is lost stays a zombie.
            tx.send_if_modified(|s| {
                if *s == Signal::Run {
                    *s = Signal::Shutdown;
                    true
                } else {
                    false
                }
            });
        }
        let clock = self.ctx.clock.clone();
        let start = clock.now();
        let grace = self.ctx.config.shutdown_grace;
        let renew_every = (self.ctx.config.failover_time / 3).max(Duration::from_millis(1));
        let mut since_renew = Duration::ZERO;
        let mut last_tick = start;
        while !self.consumers.is_empty() {
            let elapsed = clock.now().saturating_duration_since(start);
            if elapsed >= grace {
                break;
            }
            let wait = (grace - elapsed)
                .min(renew_every.saturating_sub(since_renew))
                .max(Duration::from_millis(1));
            tokio::select! {
                Some(done) = self.consumers.join_next_with_id() => {
                    let entry = match &done {
                        Ok((id, _)) => self.by_task.remove(id),
                        Err(e) => self.by_task.remove(&e.id()),
                    };
                    if let Some((key, _)) = entry { self.running.remove(&key); }
                }
                _ = clock.sleep(wait) => {}
            }
            // One renewal deadline for the whole wait, however often consumers finish.
            let now = clock.now();
            since_renew += now.saturating_duration_since(last_tick);
            last_tick = now;
            if since_renew >= renew_every {
                since_renew = Duration::ZERO;
                // Keep the leases alive while processors finish.
                self.ctx.coordinator.renew_once().await;
            }
        }
        let aborted_processors = self.consumers.len();
        if aborted_processors > 0 {
            warn!(
                remaining = aborted_processors,
                "processors did not stop within the shutdown grace; aborting them"
            );
            self.consumers.abort_all();
            while self.consumers.join_next().await.is_some() {}
        }
        let released = self.ctx.coordinator.release_all().await;
        metrics::gauge!(m::SHARD_CONSUMERS).set(0.0);
        let report = ShutdownReport {
            aborted_processors,
            leases_released: released.released,
            leases_not_released: released
                .failed
                .into_iter()
                .map(|(key, e)| (key, e.to_string()))
                .collect(),
        };
        info!(?report, "worker stopped");
        report
    }
}
