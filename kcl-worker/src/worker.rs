//! The [`Worker`]: shard sync, lease coordination and one [`ShardConsumer`] per held lease.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kcl_interfaces::RecordProcessorFactory;
use kcl_lease::coordinator::{Holding, LeaseCoordinator, LeaseEvent};
use kcl_lease::v3::runtime::{ProtocolConfig, ProtocolHandle, ProtocolRuntime, UtilisationSource};

use crate::config::ClientVersionConfig;
use kcl_lease::timeouts::within;
use kcl_lease::{Clock, Lease, LeaseError, LeaseStore, RandomSource, SeededRandom, SystemClock};
use tokio::sync::{oneshot, watch};
use tokio::task::{Id, JoinHandle, JoinSet};
use tracing::{Instrument, error, info, info_span, warn};

#[cfg(any(feature = "kinesis", feature = "dynamodb"))]
use crate::aws::AwsOptions;
use crate::backoff::{Backoff, Retry};
use crate::config::WorkerConfig;
use crate::consumer::{ConsumerContext, Outcome, ShardConsumer, Signal};
use crate::error::{ConfigError, WorkerError};
use crate::health::{HealthRegistry, ShardHealth};
use crate::metrics as m;
use crate::shard_sync::ShardSyncer;
use crate::stream::{BoundedStreamClient, StreamClient};

/// Builds a [`Worker`].
pub struct WorkerBuilder<F> {
    config: WorkerConfig,
    factory: F,
    stream: Option<Arc<dyn StreamClient>>,
    store: Option<Arc<dyn LeaseStore>>,
    clock: Option<Arc<dyn Clock>>,
    random: Option<Arc<dyn RandomSource>>,
    #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
    aws: Option<AwsOptions>,
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
    /// Uses this stream client instead of the AWS one (e.g. the in-memory Kinesis of
    /// `test_util`). The worker bounds each of its calls by `call_timeout`.
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

    /// How to build the AWS clients for what is not given as [`WorkerBuilder::stream_client`]
    /// or [`WorkerBuilder::lease_store`] (default: [`AwsOptions::default`], everything from
    /// the environment). Options without call timeouts get the worker's
    /// `call_attempt_timeout` and `call_timeout`.
    #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
    pub fn aws(mut self, options: AwsOptions) -> Self {
        self.aws = Some(options);
        self
    }

    /// Builds the worker, creating AWS clients for what was not given. Without the
    /// `kinesis` / `dynamodb` features, a missing stream client or lease store is
    /// [`ConfigError::Missing`].
    pub async fn build(self) -> Result<Worker<F>, WorkerError> {
        let clock = self.clock.unwrap_or_else(|| Arc::new(SystemClock));
        #[cfg(any(feature = "kinesis", feature = "dynamodb"))]
        let aws = if self.stream.is_none() || self.store.is_none() {
            let mut options = self.aws.unwrap_or_default();
            if options.call_timeouts.is_none() {
                options.call_timeouts = Some(self.config.call_timeouts());
            }
            let sdk = options.load_sdk_config().await?;
            Some((options, sdk))
        } else {
            None
        };
        let stream = match self.stream {
            Some(s) => s,
            #[cfg(feature = "kinesis")]
            None if aws.is_some() => {
                let (options, sdk) = aws.as_ref().ok_or(ConfigError::Missing {
                    what: "stream client",
                })?;
                Arc::new(crate::aws::AwsStreamClient::new(
                    options.kinesis_client_from(sdk),
                ))
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
            None if aws.is_some() => {
                let (options, sdk) = aws.as_ref().ok_or(ConfigError::Missing {
                    what: "lease store",
                })?;
                Arc::new(
                    kcl_lease::dynamo::DynamoLeaseStore::new(
                        options.dynamodb_client_from(sdk),
                        self.config.table_name.clone(),
                    )
                    .with_lease_owner_index(options.lease_owner_index_enabled())
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
        // Every stream call is bounded on the injected clock, whatever the client.
        let stream: Arc<dyn StreamClient> = Arc::new(BoundedStreamClient {
            inner: stream,
            clock: clock.clone(),
            limit: self.config.call_timeouts().call,
            event_limit: match &self.config.retrieval_specific_config {
                crate::config::RetrievalConfig::FanOut(f) => f.event_timeout_or_default(),
                _ => crate::config::DEFAULT_EVENT_TIMEOUT,
            },
        });
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
            aws: None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// Checks the application's client version, creates the lease table if needed, syncs
    /// shards once, then runs on tokio until the returned handle shuts it down. Fails at once
    /// when the stream does not exist or the table cannot be created. With enhanced fan-out,
    /// the stream consumer is registered (or a given `consumer_arn` checked) and `ACTIVE`
    /// before any lease is taken; a `consumer_arn` that does not exist, belongs to another
    /// stream or is not `ACTIVE` within `registration_timeout` fails the start with
    /// [`ConfigError::Invalid`] naming `consumer_arn`.
    ///
    /// # The lease protocol: KCL 2.x or 3.x
    ///
    /// When the lease store has the KCL 3.x state tables ([`LeaseStore::state_tables`]: a
    /// DynamoDB store always), the worker creates them if missing, reads the `Migration3.0`
    /// item of `<app>-CoordinatorState` (writing it when absent, from
    /// [`WorkerConfig::client_version_config`]) and runs the version stored there, as a
    /// Java KCL 3.x worker does: `CLIENT_VERSION_UPGRADE_FROM_2X` and `CLIENT_VERSION_2X`
    /// run the 2.x lease taker, `CLIENT_VERSION_3X_WITH_ROLLBACK` and `CLIENT_VERSION_3X`
    /// the 3.x protocol (a leader elected with the `Leader` lock item assigns the leases;
    /// followers find theirs through the lease owner index), switching while it runs when
    /// the application migrates (see `kcl_lease::v3::runtime`). It writes its
    /// `<app>-WorkerMetricStats` row in every version but `CLIENT_VERSION_2X`.
    ///
    /// Without state tables (a custom store) it runs the 2.x protocol; then an application
    /// whose stored version is `CLIENT_VERSION_3X` or `CLIENT_VERSION_3X_WITH_ROLLBACK`
    /// fails the start with [`WorkerError::UnsupportedClientVersion`], and a
    /// [`ClientVersionConfig::V3x`] configuration with [`ConfigError::Invalid`] naming
    /// `client_version_config`.
    pub async fn start(self) -> Result<WorkerHandle, WorkerError> {
        let span = info_span!("worker", worker_id = %self.config.worker_id);
        async {
            let syncer = Arc::new(ShardSyncer::new(
                self.config.clone(),
                self.stream.clone(),
                self.store.clone(),
                self.clock.clone(),
            ));
            // Retryable failures (throttling, a store or stream briefly unreachable) are
            // retried with a back-off a few times; anything else fails the start at once.
            let mut backoff = Backoff::new(
                self.config.task_backoff,
                self.config.max_backoff,
                self.random.clone(),
            );
            let report = backoff
                .retry(
                    &*self.clock,
                    |_| async {
                        self.check_client_version().await?;
                        self.store
                            .create_table_if_not_exists(self.config.billing_mode)
                            .await?;
                        syncer.sync().await
                    },
                    |e: &WorkerError, attempt| {
                        if e.is_retryable() && attempt < 6 {
                            warn!(error = %kcl_lease::ErrorChain(e), attempt, "starting the worker failed; retrying");
                            Retry::After
                        } else {
                            Retry::GiveUp
                        }
                    },
                )
                .await?;
            info!(
                shards = report.shards,
                created = report.leases_created,
                "worker starting"
            );
            let coordinator = LeaseCoordinator::new(
                self.store.clone(),
                self.config.lease.clone(),
                self.clock.clone(),
                self.random.clone(),
            )?;
            let health = Arc::new(HealthRegistry::default());
            let events = coordinator.events().ok_or_else(|| WorkerError::Task {
                message: "lease events already taken".to_owned(),
            })?;
            // Enhanced fan-out: the consumer is registered (if missing) and ACTIVE before any
            // lease is taken.
            let fan_out_consumer = match &self.config.retrieval_specific_config {
                crate::config::RetrievalConfig::FanOut(fan_out) => {
                    let arn = crate::fanout::ensure_consumer(
                        &*self.stream,
                        &self.config,
                        fan_out,
                        &self.clock,
                        self.random.clone(),
                    )
                    .await?;
                    Some(Arc::new(crate::fanout::SharedConsumer::new(
                        arn,
                        fan_out,
                        self.stream.clone(),
                        self.config.clone(),
                        self.clock.clone(),
                        self.random.clone(),
                    )))
                }
                _ => None,
            };
            let ctx = ConsumerContext {
                fan_out_consumer,
                config: self.config.clone(),
                stream: self.stream.clone(),
                coordinator: coordinator.clone(),
                syncer,
                clock: self.clock.clone(),
                random: self.random.clone(),
                health: health.clone(),
            };
            // The KCL 3.x machinery, when the store has its state tables: the version
            // stored in `Migration3.0` decides whether the taker or the leader assigns.
            let protocol = match self.store.state_tables() {
                Some(tables) => Some(self.start_protocol(&coordinator, tables).await?),
                None => None,
            };
            let coordinator_handle = coordinator.spawn();
            let (stop_tx, stop_rx) = oneshot::channel();
            let run = WorkerLoop {
                protocol: protocol
                    .as_ref()
                    .map(|p| (p.watch_client_version(), p.watch_leader())),
                ctx,
                factory: self.factory,
                consumers: JoinSet::new(),
                running: HashMap::new(),
                by_task: HashMap::new(),
                regained: HashMap::new(),
                handovers: JoinSet::new(),
                handover_of: HashMap::new(),
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
                health,
                protocol,
                _coordinator_handle: coordinator_handle,
            })
        }
        .instrument(span)
        .await
    }
}

impl<F> Worker<F> {
    /// Refuses an application in the Java KCL 3.x mode when the store has no state tables
    /// (see [`Worker::start`]), and a 3.x configuration on such a store.
    async fn check_client_version(&self) -> Result<(), WorkerError> {
        if self.store.state_tables().is_some() {
            return Ok(());
        }
        if self.config.client_version_config == ClientVersionConfig::V3x {
            return Err(ConfigError::Invalid {
                option: "client_version_config",
                reason: "CLIENT_VERSION_CONFIG_3X needs the KCL 3.x state tables, and this \
                         lease store has none"
                    .to_owned(),
            }
            .into());
        }
        let limit = self.config.call_timeouts().call;
        let version = within(&*self.clock, limit, self.store.client_version())
            .await
            .unwrap_or(Err(LeaseError::Timeout {
                operation: "client_version",
                after: limit,
            }))?;
        match version {
            Some(client_version) if kcl_lease::client_version::is_3x(&client_version) => {
                error!(
                    %client_version,
                    "the application runs the Java KCL 3.x lease protocol and this lease store \
                     has no state tables; not starting"
                );
                Err(WorkerError::UnsupportedClientVersion { client_version })
            }
            version => {
                tracing::debug!(client_version = ?version, "client version compatible with 2.x");
                Ok(())
            }
        }
    }

    /// Starts the KCL 3.x runtime beside `coordinator` (before its loops run, so the
    /// taker is already off when the application runs 3.x).
    async fn start_protocol(
        &self,
        coordinator: &Arc<LeaseCoordinator>,
        tables: kcl_lease::v3::table::StateTables,
    ) -> Result<ProtocolHandle, WorkerError> {
        let mut config = ProtocolConfig::new(
            &self.config.worker_id,
            self.config.lease.failover_time,
            self.config.client_version_config,
        );
        config.assignment_interval = self.config.lease_assignment_interval;
        config.call_timeout = self.config.call_timeouts().call.min(config.call_timeout);
        config.assignment.handoff_timeout = self.config.lease.handoff_timeout;
        config.assignment.max_leases_for_worker = self.config.lease.max_leases_for_worker;
        let utilisation: Option<Box<dyn UtilisationSource>> = if self.config.disable_worker_metrics
        {
            None
        } else {
            match kcl_lease::v3::utilisation::CpuSampler::detect("/") {
                Ok(sampler) => Some(Box::new(sampler)),
                Err(err) => {
                    warn!(error = %err, "no CPU utilisation source; WorkerMetricStats rows carry no metrics");
                    None
                }
            }
        };
        let limit = self.config.call_timeouts().call;
        // Table creation may poll until ACTIVE: bounded by a few call timeouts.
        let start = ProtocolRuntime::start(
            coordinator.clone(),
            self.store.clone(),
            tables,
            config,
            self.config.billing_mode,
            self.clock.clone(),
            self.random.clone(),
            utilisation,
        );
        let bound = limit.saturating_mul(6);
        Ok(within(&*self.clock, bound, start)
            .await
            .unwrap_or(Err(LeaseError::Timeout {
                operation: "start_protocol",
                after: bound,
            }))?)
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Processors still running when `shutdown_grace` ran out: they were aborted (their
    /// leases were still released).
    pub aborted_processors: usize,
    /// Leases released in the table, or handed over to the next owner of a graceful
    /// handoff in progress (those are in [`ShutdownReport::leases_handed_over`] too).
    pub leases_released: Vec<String>,
    /// The leases of [`ShutdownReport::leases_released`] that were being handed over and went
    /// to their next owner: by the hand-over write of a processor that had stopped before
    /// the shutdown (waited for within the release step's bound) or by the shutdown's own
    /// write. A handoff begun so late that the worker had not seen it yet is completed too,
    /// and listed as released only.
    pub leases_handed_over: Vec<String>,
    /// Leases held when the shutdown began that were not released, with the error: the
    /// release (or the hand-over write of a graceful handoff) failed, or did not finish
    /// within `call_timeout` (a
    /// [`LeaseError::Timeout`]), or the lease was lost during the
    /// shutdown ([`LeaseError::NotHeld`], [`LeaseError::ConditionFailed`]): other workers
    /// take them after `failover_time`, if they have not already.
    pub leases_not_released: Vec<(String, LeaseError)>,
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
    /// The shutdown request, carrying the 3.x runtime's stopping task.
    stop: Option<oneshot::Sender<Option<JoinHandle<()>>>>,
    task: Option<tokio::task::JoinHandle<ShutdownReport>>,
    coordinator: Arc<LeaseCoordinator>,
    health: Arc<HealthRegistry>,
    protocol: Option<ProtocolHandle>,
    _coordinator_handle: kcl_lease::coordinator::CoordinatorHandle,
}

impl WorkerHandle {
    /// The health of every shard this worker reads now, in shard id order: the last
    /// successful read, the last error, the failures in a row and how far behind the tip
    /// it is. See [`ShardHealth`].
    pub fn shard_health(&self) -> Vec<ShardHealth> {
        self.health.snapshot()
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The leases this worker holds now.
    pub fn held_leases(&self) -> Vec<Lease> {
        self.coordinator.held_leases()
    }

    /// The client version this worker runs now (`None`: its lease store has no KCL 3.x
    /// state tables, so it runs the 2.x protocol and follows no migration).
    pub fn client_version(&self) -> Option<kcl_lease::v3::migration::ClientVersion> {
        self.protocol.as_ref().map(ProtocolHandle::client_version)
    }

    /// Whether this worker is the 3.x leader (holds the `Leader` lock) now.
    pub fn is_leader(&self) -> bool {
        self.protocol
            .as_ref()
            .is_some_and(ProtocolHandle::is_leader)
    }

    /// The 3.x runtime's handle (`None` without state tables), for its counters.
    pub fn protocol(&self) -> Option<&ProtocolHandle> {
        self.protocol.as_ref()
    }

    /// Graceful shutdown: every processor gets `ShutdownReason::Requested` (and may
    /// checkpoint), the worker waits at most `shutdown_grace`, releases its leases (a lease
    /// in a graceful handoff goes to its next owner instead, and a hand-over write already
    /// in flight is waited for rather than raced), and returns once no processor callback
    /// can run any more.
    ///
    /// It returns within `shutdown_grace` plus one `call_timeout` even while Kinesis or the
    /// lease store hangs (with the 3.x tables, within the longer of `shutdown_grace` and two
    /// `call_timeout`s, the bound of [`ProtocolHandle::stop`], plus one `call_timeout`):
    /// every step is bounded, and the leases it could not release are named in
    /// [`ShutdownReport::leases_not_released`].
    pub async fn shutdown(mut self) -> Result<ShutdownReport, WorkerError> {
        // The 3.x tasks are told first (no lease is adopted or assigned from their next
        // step on) and stop beside the processors: the leader lock's release and our row's
        // deletion run within the shutdown grace instead of before it, so another worker
        // leads at once and the whole stays within its bound while the store hangs. The
        // leases are released only once those tasks ended (see `graceful_shutdown`).
        let protocol_stopping = self.protocol.take().map(|protocol| {
            tokio::spawn(async move {
                protocol.stop().await;
            })
        });
        let Some(stop) = self.stop.take() else {
            return Ok(ShutdownReport::default());
        };
        // A worker loop that ended on its own does not take the request: the tasks are
        // then waited for here.
        if let Err(Some(stopping)) = stop.send(protocol_stopping) {
            let _ = stopping.await;
        }
        match self.task.take() {
            Some(task) => task.await.map_err(WorkerError::Join),
            None => Ok(ShutdownReport::default()),
        }
    }

    /// Stops everything at once without shutting processors down or releasing leases, as a
    /// crash would (other workers take the leases after `failover_time`): the hand-over
    /// writes in flight are aborted with the rest, so no graceful handoff completes
    /// afterwards (its next owner completes it after `handoff_timeout`). For tests and
    /// simulations.
    pub async fn abort(mut self) {
        if let Some(protocol) = &self.protocol {
            protocol.abort();
        }
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
        if let Some(protocol) = &self.protocol {
            protocol.abort();
        }
    }
}

/// What a hand-over task of the worker loop returns: the lease key and the write's outcome.
type HandOver = (String, Result<(), LeaseError>);

struct WorkerLoop<F> {
    ctx: ConsumerContext,
    /// The 3.x runtime's client version and leadership (`None` without state tables).
    protocol: Option<(
        watch::Receiver<kcl_lease::v3::migration::ClientVersion>,
        watch::Receiver<bool>,
    )>,
    factory: Arc<F>,
    consumers: JoinSet<Outcome>,
    /// lease key -> signal sender of its running consumer
    running: HashMap<String, watch::Sender<Signal>>,
    /// task -> (lease key, holding)
    by_task: HashMap<Id, (String, Holding)>,
    /// Leases gained again while their previous consumer was still stopping.
    regained: HashMap<String, Lease>,
    /// The hand-over writes in flight (graceful handoffs being completed, see `hand_over`):
    /// owned by this loop, so a graceful shutdown waits for them and an abort (which drops
    /// the loop) aborts them.
    handovers: JoinSet<HandOver>,
    /// hand-over task -> the holding it hands over
    handover_of: HashMap<Id, Holding>,
}

impl<F: RecordProcessorFactory> WorkerLoop<F> {
    async fn run(
        mut self,
        mut events: tokio::sync::mpsc::UnboundedReceiver<LeaseEvent>,
        mut stop: oneshot::Receiver<Option<JoinHandle<()>>>,
    ) -> ShutdownReport {
        let mut protocol_stopping = None;
        let sync_interval = self.ctx.config.shard_sync_interval;
        let mut next_sync = self.ctx.clock.sleep(sync_interval);
        let mut syncing: JoinSet<Result<crate::SyncReport, WorkerError>> = JoinSet::new();
        loop {
            tokio::select! {
                request = &mut stop => {
                    match request {
                        Ok(stopping) => protocol_stopping = stopping,
                        // The handle was dropped without shutdown(): it aborts this task.
                        Err(_) => std::future::pending::<()>().await,
                    }
                    break;
                }
                event = events.recv() => match event {
                    Some(LeaseEvent::Gained(lease)) => self.gained(lease),
                    Some(LeaseEvent::Lost { lease_key, .. }) => self.lost(&lease_key),
                    Some(LeaseEvent::HandoffRequested { lease_key, next_owner }) => {
                        self.handoff_requested(&lease_key, &next_owner);
                    }
                    Some(_) => {}
                    None => {
                        error!("the lease coordinator stopped; stopping the worker");
                        break;
                    }
                },
                // The sync runs in its own task so lease events and stop requests are
                // handled while it lists shards and scans the table.
                // A failed sync is retried with a back-off inside its task.
                _ = &mut next_sync, if syncing.is_empty() => {
                    // In 3.x only the leader syncs shards periodically (as the Java KCL):
                    // a follower's sync would scan the whole table, so the fleet's reads
                    // would grow with its size. Children of a finished shard are created by
                    // its consumer either way.
                    if !self.syncs_shards() {
                        next_sync = self.ctx.clock.sleep(sync_interval);
                        continue;
                    }
                    let syncer = self.ctx.syncer.clone();
                    let clock = self.ctx.clock.clone();
                    let mut backoff = Backoff::new(
                        self.ctx.config.task_backoff,
                        self.ctx.config.max_backoff,
                        self.ctx.random.clone(),
                    );
                    syncing.spawn(async move {
                        backoff.retry(&*clock, |_| syncer.sync(), |e, _| {
                            warn!(error = %kcl_lease::ErrorChain(e),
                                "shard sync failed; retrying after a back-off");
                            Retry::After
                        }).await
                    }.instrument(tracing::Span::current()));
                }
                Some(done) = syncing.join_next(), if !syncing.is_empty() => {
                    let delay = match done {
                        Ok(_) => sync_interval,
                        Err(e) => {
                            error!(error = %kcl_lease::ErrorChain(&e), "shard sync task failed; retrying after a back-off");
                            self.ctx.config.task_backoff
                        }
                    };
                    next_sync = self.ctx.clock.sleep(delay);
                }
                Some(done) = self.consumers.join_next_with_id(), if !self.consumers.is_empty() => {
                    self.finished(done).await;
                }
                Some(done) = self.handovers.join_next_with_id(), if !self.handovers.is_empty() => {
                    self.handed_over(done);
                }
            }
        }
        self.graceful_shutdown(protocol_stopping).await
    }

    /// Whether this worker runs the periodic shard sync: always in 2.x, only as the leader
    /// in 3.x.
    fn syncs_shards(&self) -> bool {
        self.protocol.as_ref().is_none_or(|(version, leader)| {
            version.borrow().protocol().assignment != kcl_lease::v3::migration::Assignment::Leader
                || *leader.borrow()
        })
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

    /// A graceful handoff of `key` to `next_owner` was requested: the processor is shut down
    /// with `Requested` (it may checkpoint), and the lease is handed over once it stopped
    /// (in `finished`). With no processor running, the lease is handed over at once.
    fn handoff_requested(&mut self, key: &str, next_owner: &str) {
        if let Some(tx) = self.running.get(key) {
            info!(lease_key = %key, %next_owner, "graceful handoff requested; shutting the processor down");
            tx.send_if_modified(|s| {
                if *s == Signal::Run {
                    *s = Signal::Shutdown;
                    true
                } else {
                    false
                }
            });
            return;
        }
        self.regained.remove(key);
        self.hand_over(key);
    }

    /// Completes the graceful handoff of `key` (if it is still held and being handed over)
    /// in a task of `handovers`; the coordinator bounds the write by `call_timeout`.
    fn hand_over(&mut self, key: &str) {
        let Some(holding) = self.ctx.coordinator.holding(key) else {
            return;
        };
        if !holding.is_handing_over() || self.handover_of.values().any(|h| *h == holding) {
            return;
        }
        let key = key.to_owned();
        let task = holding.clone();
        let handle = self.handovers.spawn(
            async move {
                let result = task.release().await;
                (key, result)
            }
            .instrument(tracing::Span::current()),
        );
        self.handover_of.insert(handle.id(), holding);
    }

    /// A hand-over write of `hand_over` ended while the worker runs.
    fn handed_over(&mut self, done: Result<(Id, HandOver), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, _)) => *id,
            Err(e) => e.id(),
        };
        let holding = self.handover_of.remove(&id);
        match done {
            Ok((_, (_, Ok(())))) => {}
            Ok((_, (key, Err(e)))) => {
                warn!(lease_key = %key, error = %kcl_lease::ErrorChain(&e),
                    "completing the graceful handoff failed; the next owner completes it after handoff_timeout");
            }
            Err(e) => {
                error!(lease_key = holding.as_ref().map_or("", Holding::lease_key),
                    error = %kcl_lease::ErrorChain(&e), "a hand-over task failed");
            }
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
                // The coordinator bounds the write by `call_timeout`.
                match holding.release().await {
                    Ok(()) | Err(kcl_lease::LeaseError::NotHeld { .. }) => {}
                    Err(e) => {
                        warn!(lease_key = %key, error = %kcl_lease::ErrorChain(&e), "releasing the lease failed; it will expire")
                    }
                }
            }
            Outcome::LeaseLost | Outcome::ShutdownRequested => {
                // A graceful handoff: the processor stopped, the lease goes to its next owner.
                if holding.is_handing_over() {
                    self.hand_over(&key);
                }
            }
        }
        if let Some(lease) = self.regained.remove(&key)
            && self.ctx.coordinator.is_held(&key)
        {
            if self
                .ctx
                .coordinator
                .holding(&key)
                .is_some_and(|h| h.is_handing_over())
            {
                self.hand_over(&key);
            } else {
                self.gained(lease);
            }
        }
    }

    /// Forgets a consumer task that ended during shutdown.
    fn forget(&mut self, done: &Result<(Id, Outcome), tokio::task::JoinError>) {
        let entry = match done {
            Ok((id, _)) => self.by_task.remove(id),
            Err(e) => self.by_task.remove(&e.id()),
        };
        if let Some((key, _)) = entry {
            self.running.remove(&key);
        }
    }

    /// Shuts every processor down within `shutdown_grace`, waits for the 3.x tasks to end
    /// (`protocol_stopping`, at most two `call_timeout`s from the request), then releases
    /// the leases and waits for the hand-over writes in flight (`handovers`), side by side,
    /// within one `call_timeout` (a hand-over still in flight then is aborted and its lease
    /// named as not released): the whole takes at most `shutdown_grace + call_timeout` (or
    /// two `call_timeout`s + one if longer), whatever Kinesis or the lease store do. Every
    /// step is bounded on the injected clock.
    async fn graceful_shutdown(
        &mut self,
        protocol_stopping: Option<JoinHandle<()>>,
    ) -> ShutdownReport {
        info!("graceful shutdown: stopping processors");
        let held_at_start = self.ctx.coordinator.held_keys();
        let clock = self.ctx.clock.clone();
        let start = clock.now();
        let grace = self.ctx.config.shutdown_grace;
        let call_timeout = self.ctx.config.call_timeouts().call;
        let remaining_grace =
            |clock: &dyn Clock| grace.saturating_sub(clock.now().saturating_duration_since(start));
        // Processors first, so they use the whole grace even if stopping the coordinator
        // waits for a lease store call in progress.
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
        // No lease is taken or renewed by the coordinator's loops from now on.
        if within(
            &*clock,
            remaining_grace(&*clock),
            self.ctx.coordinator.stop(),
        )
        .await
        .is_none()
        {
            metrics::counter!(m::SHUTDOWN_STEPS_TIMED_OUT_TOTAL).increment(1);
            warn!(
                ?grace,
                "the lease coordinator did not stop within the shutdown grace"
            );
        }
        let renew_every = (self.ctx.config.lease.failover_time / 3).max(Duration::from_millis(1));
        let mut since_renew = clock.now().saturating_duration_since(start);
        let mut last_tick = clock.now();
        while !self.consumers.is_empty() {
            let left = remaining_grace(&*clock);
            if left.is_zero() {
                break;
            }
            let wait = left
                .min(renew_every.saturating_sub(since_renew))
                .max(Duration::from_millis(1));
            tokio::select! {
                Some(done) = self.consumers.join_next_with_id() => self.forget(&done),
                _ = clock.sleep(wait) => {}
            }
            // One renewal deadline for the whole wait, however often consumers finish.
            let now = clock.now();
            since_renew += now.saturating_duration_since(last_tick);
            last_tick = now;
            if since_renew >= renew_every {
                since_renew = Duration::ZERO;
                // Keep the leases alive while processors finish (never beyond the grace).
                let left = remaining_grace(&*clock);
                if within(&*clock, left, self.ctx.coordinator.renew_once())
                    .await
                    .is_none()
                {
                    metrics::counter!(m::SHUTDOWN_STEPS_TIMED_OUT_TOTAL).increment(1);
                    warn!("renewing the leases during shutdown did not finish within the grace");
                }
            }
        }
        while let Some(done) = self.consumers.try_join_next_with_id() {
            self.forget(&done);
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
        // The 3.x tasks ended before anything is released: a leader run of ours or a
        // discovery still in flight could otherwise give this worker a lease just released.
        // They stop within two call timeouts (a call in flight, then the lock's release and
        // the row's deletion side by side), mostly within the grace just spent.
        // Two call timeouts counted from the shutdown's start, when the tasks were told.
        let protocol_left =
            (call_timeout * 2).saturating_sub(clock.now().saturating_duration_since(start));
        if let Some(mut stopping) = protocol_stopping
            && within(&*clock, protocol_left, &mut stopping)
                .await
                .is_none()
        {
            metrics::counter!(m::SHUTDOWN_STEPS_TIMED_OUT_TOTAL).increment(1);
            warn!("the KCL 3.x tasks did not stop within two call timeouts; aborted");
            stopping.abort();
        }
        // Each release bounded on its own, so that the report says exactly which landed
        // (a release that failed early leaves the held set as one that succeeded does).
        // A lease whose hand-over write is in flight is not released beside it (the two
        // writes would race): that write is waited for instead, within the same bound.
        let mut releases = JoinSet::new();
        for key in self.ctx.coordinator.held_keys() {
            if let Some(holding) = self.ctx.coordinator.holding(&key) {
                if self.handover_of.values().any(|h| *h == holding) {
                    continue;
                }
                let handing_over = holding.is_handing_over();
                let clock = clock.clone();
                releases.spawn(async move {
                    let result = within(&*clock, call_timeout, holding.release()).await;
                    (key, handing_over, result)
                });
            }
        }
        let mut leases_released = Vec::new();
        let mut leases_handed_over = Vec::new();
        let mut leases_not_released = Vec::new();
        let timed_out = |operation: &'static str| {
            metrics::counter!(m::SHUTDOWN_STEPS_TIMED_OUT_TOTAL).increment(1);
            LeaseError::Timeout {
                operation,
                after: call_timeout,
            }
        };
        // The hand-over writes in flight, side by side with the releases.
        let deadline = clock.sleep(call_timeout);
        tokio::pin!(deadline);
        while !self.handovers.is_empty() {
            tokio::select! {
                Some(done) = self.handovers.join_next_with_id() => {
                    let (id, key, result) = match done {
                        Ok((id, (key, result))) => (id, key, result),
                        // A hand-over task cannot panic short of a bug; its lease is named
                        // below.
                        Err(e) => {
                            self.handover_of.remove(&e.id());
                            continue;
                        }
                    };
                    self.handover_of.remove(&id);
                    if !held_at_start.contains(&key) {
                        // Handed over before the shutdown began.
                        continue;
                    }
                    match result {
                        Ok(()) => {
                            leases_handed_over.push(key.clone());
                            leases_released.push(key);
                        }
                        Err(LeaseError::Timeout { .. }) => {
                            leases_not_released.push((key, timed_out("complete_handoff")));
                        }
                        // That holding had ended otherwise (lost); named below unless a
                        // later holding was released.
                        Err(LeaseError::NotHeld { .. }) => {}
                        Err(e) => leases_not_released.push((key, e)),
                    }
                }
                () = &mut deadline => break,
            }
        }
        if !self.handovers.is_empty() {
            self.handovers.abort_all();
            while self.handovers.join_next().await.is_some() {}
            for (_, holding) in self.handover_of.drain() {
                let key = holding.lease_key().to_owned();
                if held_at_start.contains(&key) {
                    leases_not_released.push((key, timed_out("complete_handoff")));
                }
            }
        }
        while let Some(done) = releases.join_next().await {
            match done {
                Ok((key, handing_over, Some(Ok(())))) => {
                    if handing_over {
                        leases_handed_over.push(key.clone());
                    }
                    leases_released.push(key);
                }
                // The coordinator's own bound on the call, or this one: the same timeout.
                Ok((key, _, None | Some(Err(LeaseError::Timeout { .. })))) => {
                    leases_not_released.push((key, timed_out("release")));
                }
                Ok((key, _, Some(Err(e)))) => leases_not_released.push((key, e)),
                // A release task cannot panic short of a bug; its lease is named below.
                Err(_) => {}
            }
        }
        // A lease held when the shutdown began but lost since (its renewals failed, or
        // another worker took it) was not released either.
        for key in held_at_start {
            if !leases_released.contains(&key)
                && !leases_not_released.iter().any(|(k, _)| *k == key)
            {
                let error = LeaseError::NotHeld {
                    lease_key: key.clone(),
                };
                leases_not_released.push((key, error));
            }
        }
        leases_released.sort();
        leases_handed_over.sort();
        leases_not_released.sort_by(|a, b| a.0.cmp(&b.0));
        metrics::gauge!(m::SHARD_CONSUMERS).set(0.0);
        for (key, e) in &leases_not_released {
            warn!(lease_key = %key, error = %kcl_lease::ErrorChain(e),
                "releasing the lease failed; other workers take it after failover_time");
        }
        let report = ShutdownReport {
            aborted_processors,
            leases_released,
            leases_handed_over,
            leases_not_released,
        };
        info!(?report, "worker stopped");
        report
    }
}
