//! Several workers on in-memory services: [`Fleet`].
//!
//! A fleet holds one [`InMemoryKinesis`] with one stream, one [`InMemoryLeaseStore`] and
//! one [`EventLog`] shared by the [`RecordingFactory`]s of its workers, and starts workers
//! on them with the fleet's default configuration plus a per-worker tweak. A crash is
//! [`WorkerHandle::abort`] (no shutdown, no release: [`Fleet::crash`]), a graceful stop
//! [`WorkerHandle::shutdown`] ([`Fleet::stop`]), a restart a new start under the same id.
//!
//! ```
//! use std::time::Duration;
//! use kcl_worker::test_util::fleet::Fleet;
//! use kcl_worker::test_util::recording::Behaviour;
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let fleet = Fleet::new("orders", 2).unwrap();
//! fleet.put_plain("key", "hello").unwrap();
//! let (worker, _factory) = fleet.start("w1", Behaviour::new()).await.unwrap();
//! fleet
//!     .wait_until("the record", Duration::from_secs(30), |f| f.delivered_payloads().len() == 1)
//!     .await
//!     .unwrap();
//! fleet.stop(worker).await.unwrap();
//! # });
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kcl_interfaces::RecordProcessorFactory;
use kcl_kpl::Aggregator;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_lease::{Clock, LeaseError, LeaseStore, SeededRandom, SystemClock};

use super::kinesis::{InMemoryKinesis, PutResult};
use super::recording::{Behaviour, EventLog, RecordingFactory};
use super::wait::{TimedOut, wait_until};
use crate::stream::StreamError;
use crate::{
    InitialPosition, ShutdownReport, Worker, WorkerConfig, WorkerConfigBuilder, WorkerError,
    WorkerHandle,
};

/// The application name of a fleet's workers.
pub const APPLICATION: &str = "app";

type Tweak = Arc<dyn Fn(WorkerConfigBuilder) -> WorkerConfigBuilder + Send + Sync>;

/// Workers on one in-memory Kinesis stream and one in-memory lease store (see the
/// [module documentation](self)).
#[derive(Clone)]
pub struct Fleet {
    kinesis: InMemoryKinesis,
    store: Arc<InMemoryLeaseStore>,
    workers_store: Arc<dyn LeaseStore>,
    log: EventLog,
    clock: Arc<dyn Clock>,
    application: String,
    stream: String,
    defaults: Tweak,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("application", &self.application)
            .field("stream", &self.stream)
            .field("kinesis", &self.kinesis)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// A fleet on a new stream `stream` of `shards` shards, on the system clock (tokio's
    /// timer: virtual under a paused clock). Its workers' defaults: start at
    /// `TRIM_HORIZON`, failover time 10 s, 200 ms between idle reads, shard sync every 5 s,
    /// parent shards polled every 500 ms.
    pub fn new(stream: &str, shards: u32) -> Result<Self, StreamError> {
        let fleet = Self::without_stream(stream);
        fleet.kinesis.create_stream(stream, shards)?;
        Ok(fleet)
    }

    /// A fleet as [`Fleet::new`] whose stream `stream` does not exist yet (create it with
    /// [`InMemoryKinesis::create_stream`] on [`Fleet::kinesis`]).
    pub fn without_stream(stream: &str) -> Self {
        let kinesis = InMemoryKinesis::new();
        let store = Arc::new(InMemoryLeaseStore::new());
        Self {
            kinesis,
            workers_store: store.clone(),
            store,
            log: EventLog::new(),
            clock: Arc::new(SystemClock),
            application: APPLICATION.to_owned(),
            stream: stream.to_owned(),
            defaults: Arc::new(|builder| {
                builder
                    .failover_time(Duration::from_secs(10))
                    .idle_time_between_reads(Duration::from_millis(200))
                    .shard_sync_interval(Duration::from_secs(5))
                    .parent_shard_poll_interval(Duration::from_millis(500))
            }),
        }
    }

    /// Replaces the defaults every worker starts from (after the application, stream,
    /// worker id and `TRIM_HORIZON`).
    pub fn with_defaults(
        mut self,
        defaults: impl Fn(WorkerConfigBuilder) -> WorkerConfigBuilder + Send + Sync + 'static,
    ) -> Self {
        self.defaults = Arc::new(defaults);
        self
    }

    /// Gives the in-memory lease store its KCL 3.x state tables
    /// ([`InMemoryLeaseStore::with_state_tables`]): the workers then run the version stored
    /// in `Migration3.0` (3.x with [`crate::ClientVersionConfig::V3x`]). Call it before
    /// [`Fleet::with_workers_lease_store`].
    pub fn with_state_tables(mut self) -> Self {
        let store = Arc::new(InMemoryLeaseStore::new().with_state_tables());
        self.store = store.clone();
        self.workers_store = store;
        self
    }

    /// Sets the application name (`app` by default).
    pub fn with_application(mut self, application: impl Into<String>) -> Self {
        self.application = application.into();
        self
    }

    /// Workers use `store` (say, a decorator around [`Fleet::store`]) instead of the
    /// in-memory lease store itself.
    pub fn with_workers_lease_store(mut self, store: Arc<dyn LeaseStore>) -> Self {
        self.workers_store = store;
        self
    }

    /// The in-memory Kinesis.
    pub fn kinesis(&self) -> &InMemoryKinesis {
        &self.kinesis
    }

    /// The in-memory lease store.
    pub fn store(&self) -> &Arc<InMemoryLeaseStore> {
        &self.store
    }

    /// The log every [`RecordingFactory`] of [`Fleet::start`] writes to.
    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The clock the workers and [`Fleet::wait_until`] run on.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The configuration builder of worker `id`: the application, the stream, the id,
    /// `TRIM_HORIZON`, then the fleet's defaults.
    pub fn config(&self, id: &str) -> WorkerConfigBuilder {
        (self.defaults)(
            WorkerConfig::builder(self.application.clone(), self.stream.clone())
                .worker_id(id)
                .initial_position(InitialPosition::TrimHorizon),
        )
    }

    /// Starts worker `id` with a recording processor of `behaviour` on the defaults.
    pub async fn start(
        &self,
        id: &str,
        behaviour: Behaviour,
    ) -> Result<(WorkerHandle, RecordingFactory), WorkerError> {
        self.start_with(id, behaviour, |b| b).await
    }

    /// Starts worker `id` with a recording processor of `behaviour` on the defaults plus
    /// `tweak`.
    pub async fn start_with(
        &self,
        id: &str,
        behaviour: Behaviour,
        tweak: impl FnOnce(WorkerConfigBuilder) -> WorkerConfigBuilder,
    ) -> Result<(WorkerHandle, RecordingFactory), WorkerError> {
        let factory = RecordingFactory::new(id, self.log.clone(), behaviour);
        let handle = self
            .start_factory(id, factory.clone(), default_seed(id), tweak)
            .await?;
        Ok((handle, factory))
    }

    /// Starts worker `id` with any processor factory and random seed, on the defaults plus
    /// `tweak`.
    pub async fn start_factory<F: RecordProcessorFactory>(
        &self,
        id: &str,
        factory: F,
        random_seed: u64,
        tweak: impl FnOnce(WorkerConfigBuilder) -> WorkerConfigBuilder,
    ) -> Result<WorkerHandle, WorkerError> {
        let config = tweak(self.config(id)).build()?;
        Worker::builder(config, factory)
            .stream_client(Arc::new(self.kinesis.clone()))
            .lease_store(self.workers_store.clone())
            .clock(self.clock.clone())
            .random(Arc::new(SeededRandom::new(random_seed)))
            .build()
            .await?
            .start()
            .await
    }

    /// Crashes a worker: its tasks end at once, with no shutdown and no release.
    pub async fn crash(&self, worker: WorkerHandle) {
        worker.abort().await;
    }

    /// Stops a worker gracefully (its processors are told `Requested`, its leases released).
    pub async fn stop(&self, worker: WorkerHandle) -> Result<ShutdownReport, WorkerError> {
        worker.shutdown().await
    }

    /// Crashes `worker` and starts a new worker under the same id with a recording
    /// processor of `behaviour` (as a supervisor restarting the process would).
    pub async fn restart(
        &self,
        worker: WorkerHandle,
        behaviour: Behaviour,
    ) -> Result<(WorkerHandle, RecordingFactory), WorkerError> {
        let id = worker.worker_id().to_owned();
        worker.abort().await;
        self.start(&id, behaviour).await
    }

    /// Waits until `condition` holds, for at most `limit` on the fleet's clock (see
    /// [`wait_until`]). Returns how long it took.
    pub async fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut condition: impl FnMut(&Fleet) -> bool,
    ) -> Result<Duration, TimedOut> {
        wait_until(self.clock.as_ref(), limit, what, || condition(self)).await
    }

    /// Puts one record with `data` under `partition_key`.
    pub fn put_plain(&self, partition_key: &str, data: &str) -> Result<PutResult, StreamError> {
        self.kinesis.put_record(
            &self.stream,
            partition_key,
            None,
            Bytes::from(data.to_owned()),
        )
    }

    /// Puts one KPL aggregate of `items` (`(partition key, data)`), routed by the first
    /// item's key. Items that do not fit in one aggregate, or none, are an
    /// `InvalidArgument` (nothing is put).
    pub fn put_aggregate(&self, items: &[(&str, String)]) -> Result<PutResult, StreamError> {
        let invalid = |message: String| StreamError::InvalidArgument { message };
        let mut aggregator = Aggregator::new();
        for (key, data) in items {
            let full = aggregator
                .add(key, None, Bytes::from(data.clone()))
                .map_err(|e| invalid(format!("aggregate: {e}")))?;
            if full.is_some() {
                return Err(invalid("the items do not fit in one aggregate".to_owned()));
            }
        }
        let record = aggregator
            .finish()
            .ok_or_else(|| invalid("an aggregate needs at least one item".to_owned()))?;
        self.kinesis.put_record(
            &self.stream,
            &record.partition_key,
            record.explicit_hash_key.as_deref(),
            record.data,
        )
    }

    /// The distinct payloads delivered so far (as UTF-8, lossily).
    pub fn delivered_payloads(&self) -> BTreeSet<String> {
        self.log
            .deliveries()
            .into_iter()
            .map(|(_, _, r)| String::from_utf8_lossy(&r.data).into_owned())
            .collect()
    }

    /// Every lease's owner, by lease key.
    pub async fn owners(&self) -> Result<BTreeMap<String, Option<String>>, LeaseError> {
        Ok(self
            .store
            .list_leases()
            .await?
            .into_iter()
            .map(|l| (l.lease_key, l.lease_owner))
            .collect())
    }
}

/// The random seed [`Fleet::start`] gives worker `id`.
pub fn default_seed(id: &str) -> u64 {
    id.len() as u64 * 31 + 7
}
