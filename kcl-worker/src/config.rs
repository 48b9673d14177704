//! Worker configuration: every option (named as in the Java KCL where it has one),
//! validated by a builder. The lease coordinator's part is a
//! [`LeaseCoordinatorConfig`], embedded as [`WorkerConfig::lease`] with its own defaults and
//! bounds. How AWS clients are built (region, endpoints) is not here: see `crate::aws`.

use std::time::{Duration, SystemTime};

use kcl_lease::coordinator::LeaseCoordinatorConfig;
use kcl_lease::{BillingMode, CallTimeouts, LeaseError};

use crate::error::ConfigError;
use crate::stream::limits;

/// The longest duration any option accepts.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The largest prefetch bound (records or bytes) a tokio semaphore can hold.
const MAX_PREFETCH: usize = tokio::sync::Semaphore::MAX_PERMITS;

/// Where a shard with no checkpoint starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum InitialPosition {
    /// After the newest record when the lease is created (the default).
    #[default]
    Latest,
    /// The oldest record still in the stream.
    TrimHorizon,
    /// The first record at or after this time.
    AtTimestamp(SystemTime),
}

/// How records are read from the shards: the Java KCL's `retrievalSpecificConfig`.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum RetrievalConfig {
    /// `GetRecords` polling (the default; the Java KCL's `PollingConfig`).
    #[default]
    Polling,
    /// Enhanced fan-out: `SubscribeToShard` with a registered stream consumer (the Java
    /// KCL's `FanOutConfig`).
    FanOut(FanOutConfig),
}

impl RetrievalConfig {
    /// Enhanced fan-out with the default [`FanOutConfig`] (the consumer is named after the
    /// application).
    pub fn fan_out() -> Self {
        RetrievalConfig::FanOut(FanOutConfig::default())
    }

    /// True for [`RetrievalConfig::FanOut`].
    pub fn is_fan_out(&self) -> bool {
        matches!(self, RetrievalConfig::FanOut(_))
    }
}

/// The enhanced fan-out settings (the Java KCL's `FanOutConfig`).
///
/// With neither `consumer_name` nor `consumer_arn`, the consumer is named after the
/// application. With a `consumer_arn`, nothing is registered: that consumer is described by
/// its ARN at start and must exist, be registered on `stream_name` and be `ACTIVE` within
/// `registration_timeout` (else the start fails with [`ConfigError::Invalid`] naming
/// `consumer_arn`). Otherwise the worker registers the consumer at start when it is missing
/// and waits until it is `ACTIVE` (at most `registration_timeout`), and registers it again,
/// once per worker, when someone deregisters it while the worker runs. It never deregisters
/// it.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub struct FanOutConfig {
    /// `consumerName`: the stream consumer to register or use (default: the application
    /// name; 1 to 128 of `a-z A-Z 0-9 _ . -`). After [`WorkerConfigBuilder::build`], set
    /// unless `consumer_arn` is.
    pub consumer_name: Option<String>,
    /// `consumerArn`: a consumer registered beforehand; nothing is registered then, not
    /// even when it is deregistered while the worker runs (its readers back off). Not
    /// together with `consumer_name`.
    pub consumer_arn: Option<String>,
    /// The longest wait for one event of a subscription (default 30 s, 1 s..=5 min). The
    /// service pushes an event at least every few seconds, records or not; a subscription
    /// silent for longer is torn down and renewed.
    pub event_timeout: Option<Duration>,
    /// The longest wait for the consumer to be registered and `ACTIVE` (default 2 min,
    /// 1 s..=1 h): at start (a given `consumer_arn` too), and when it is registered again.
    pub registration_timeout: Option<Duration>,
    /// How often, at most, a shard whose subscription is caught up (an event without
    /// records, nothing behind) is checked for its end with one `GetShardIterator` and one
    /// `GetRecords` (default 10 s, 100 ms..=1 h). The service ends a closed shard with an
    /// event naming its children, which is enough; some servers (kinesis-local) never send
    /// it, and a closed shard would never end without this check.
    pub shard_end_probe_interval: Option<Duration>,
}

impl FanOutConfig {
    /// The defaults: the consumer is named after the application.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses (and registers if missing) the consumer with this name.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.consumer_name = Some(name.into());
        self
    }

    /// Uses the consumer with this ARN; nothing is registered.
    pub fn consumer_arn(mut self, arn: impl Into<String>) -> Self {
        self.consumer_arn = Some(arn.into());
        self
    }

    /// The longest wait for one event of a subscription.
    pub fn event_timeout(mut self, timeout: Duration) -> Self {
        self.event_timeout = Some(timeout);
        self
    }

    /// The longest wait at start for the consumer to be `ACTIVE`.
    pub fn registration_timeout(mut self, timeout: Duration) -> Self {
        self.registration_timeout = Some(timeout);
        self
    }

    /// How often, at most, a caught-up shard is checked for its end.
    pub fn shard_end_probe_interval(mut self, interval: Duration) -> Self {
        self.shard_end_probe_interval = Some(interval);
        self
    }

    /// `shard_end_probe_interval` with its default.
    pub fn shard_end_probe_interval_or_default(&self) -> Duration {
        self.shard_end_probe_interval
            .unwrap_or(DEFAULT_SHARD_END_PROBE_INTERVAL)
    }

    /// `event_timeout` with its default.
    pub fn event_timeout_or_default(&self) -> Duration {
        self.event_timeout.unwrap_or(DEFAULT_EVENT_TIMEOUT)
    }

    /// `registration_timeout` with its default.
    pub fn registration_timeout_or_default(&self) -> Duration {
        self.registration_timeout
            .unwrap_or(DEFAULT_REGISTRATION_TIMEOUT)
    }
}

/// The default [`FanOutConfig::event_timeout`].
pub const DEFAULT_EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default [`FanOutConfig::shard_end_probe_interval`].
pub const DEFAULT_SHARD_END_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// The default [`FanOutConfig::registration_timeout`].
pub const DEFAULT_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// The worker's configuration. Build it with [`WorkerConfig::builder`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The application name (required); also the default lease table name.
    pub application_name: String,
    /// The stream to consume (required).
    pub stream_name: String,
    /// The lease table (defaults to the application name).
    pub table_name: String,
    /// This worker's id (defaults to the host name plus a random suffix).
    pub worker_id: String,
    /// Where shards without a checkpoint start (default `LATEST`).
    pub initial_position: InitialPosition,
    /// The lease coordinator's settings, with the coordinator's own defaults and bounds:
    /// `worker_id` (the same as [`WorkerConfig::worker_id`]), `failover_time` (default 10 s),
    /// `max_leases_for_worker` (default unlimited), `max_leases_to_steal_at_one_time`
    /// (default 1: the ungraceful steals of one taker pass, only on a lease store without
    /// the handoff writes; graceful handoffs, and the completion of those that timed out,
    /// are not capped by it), `handoff_timeout` (default 30 s: how long a graceful handoff
    /// may take before the next owner completes it itself, as a steal, and the extra wait
    /// before a lease in a handoff counts as expired), and `call_timeouts`: the bounds on
    /// every Kinesis and lease store call, `call_attempt_timeout` (one attempt, default 4 s)
    /// and `call_timeout` (the whole call, retries included, default 10 s). See
    /// [`WorkerConfig::call_timeouts`] and [`WorkerConfigBuilder::handoff_timeout`].
    pub lease: LeaseCoordinatorConfig,
    /// The most records one GetRecords call returns (default and most 10000).
    pub max_records: u32,
    /// Sleep between reads when a shard is caught up and the last call returned nothing
    /// (default 1 s).
    pub idle_time_between_reads: Duration,
    /// Call `process_records` even when a read returned no records (default false).
    pub call_process_records_even_for_empty_list: bool,
    /// How often a child shard checks whether its parents are finished (default 10 s).
    pub parent_shard_poll_interval: Duration,
    /// How often shards are listed and missing leases created (default 60 s).
    pub shard_sync_interval: Duration,
    /// How long graceful shutdown waits for processors (default 5 s).
    pub shutdown_grace: Duration,
    /// Back-off after a failed task, and the first back-off of retried reads (default 500 ms).
    pub task_backoff: Duration,
    /// The longest back-off between retried reads (default 10 s).
    pub max_backoff: Duration,
    /// Delete finished leases once all their children have started (default true).
    pub cleanup_leases_upon_shard_completion: bool,
    /// Check with Kinesis that a sequence number given to `checkpoint_at` belongs to the
    /// shard (default true). Range checks always apply.
    pub validate_sequence_number_before_checkpointing: bool,
    /// Write `SHARD_END` when a processor returns from `Terminate` without checkpointing
    /// (default false).
    pub auto_checkpoint_at_shard_end: bool,
    /// Billing of a lease table the worker creates (default pay per request).
    pub billing_mode: BillingMode,
    /// Client-side limit of GetRecords calls per second per shard (default 5).
    pub max_get_records_per_second: u32,
    /// Client-side limit of bytes read per second per shard (default 2 MiB).
    pub max_bytes_per_second: u64,
    /// The most records buffered ahead of the processor per shard (default 30000).
    pub max_prefetch_records: usize,
    /// The most bytes buffered ahead of the processor per shard (default 32 MiB).
    pub max_prefetch_bytes: usize,
    /// Deliver KPL aggregates with sub-records outside the shard's hash key range instead of
    /// dropping them (default false, as the Java KCL).
    pub deliver_out_of_range_aggregates: bool,
    /// How records are read (`retrievalSpecificConfig`): polling (the default) or enhanced
    /// fan-out. Validated: a fan-out consumer name is filled in (the application name) unless
    /// a consumer ARN is given.
    pub retrieval_specific_config: RetrievalConfig,
    /// Which lease protocol the worker runs (`clientVersionConfig`):
    /// [`ClientVersionConfig::CompatibleWith2x`] (the default here; the Java KCL 3.x's
    /// default is 3.x) runs the 2.x lease taker and follows the application's migration
    /// to 3.x exactly as a Java worker in that mode does; [`ClientVersionConfig::V3x`] runs
    /// the 3.x protocol (a leader assigns the leases). Either way the version stored in
    /// `<app>-CoordinatorState` decides once the store has state tables (see
    /// `kcl_lease::v3::runtime`).
    pub client_version_config: ClientVersionConfig,
    /// Write WorkerMetricStats rows without CPU metrics (`disableWorkerMetrics`, default
    /// false): the leader then balances this worker by throughput alone.
    pub disable_worker_metrics: bool,
    /// How often the 3.x leader assigns leases (`leaseAssignmentIntervalMillis`; default
    /// half the failover time, the Java KCL's is twice it).
    pub lease_assignment_interval: Duration,
}

pub use kcl_lease::v3::migration::ClientVersionConfig;

impl WorkerConfig {
    /// The bounds on every Kinesis and lease store call (`call_attempt_timeout`,
    /// `call_timeout`); they live in [`WorkerConfig::lease`], so the coordinator and the
    /// worker use the same values.
    pub fn call_timeouts(&self) -> CallTimeouts {
        self.lease.call_timeouts
    }

    /// A builder for `application_name` consuming `stream_name`.
    pub fn builder(
        application_name: impl Into<String>,
        stream_name: impl Into<String>,
    ) -> WorkerConfigBuilder {
        WorkerConfigBuilder::new(application_name, stream_name)
    }
}

/// Builds a validated [`WorkerConfig`]. Setters take `self` (`x(self, v) -> Self`) or
/// `&mut self` (`set_x(&mut self, Option<v>)`, `None` restores the default).
#[derive(Clone, Debug, Default)]
pub struct WorkerConfigBuilder {
    application_name: String,
    stream_name: String,
    table_name: Option<String>,
    worker_id: Option<String>,
    initial_position: Option<InitialPosition>,
    failover_time: Option<Duration>,
    max_leases_for_worker: Option<usize>,
    max_leases_to_steal_at_one_time: Option<usize>,
    handoff_timeout: Option<Duration>,
    max_records: Option<u32>,
    idle_time_between_reads: Option<Duration>,
    call_process_records_even_for_empty_list: Option<bool>,
    parent_shard_poll_interval: Option<Duration>,
    shard_sync_interval: Option<Duration>,
    shutdown_grace: Option<Duration>,
    task_backoff: Option<Duration>,
    max_backoff: Option<Duration>,
    cleanup_leases_upon_shard_completion: Option<bool>,
    validate_sequence_number_before_checkpointing: Option<bool>,
    auto_checkpoint_at_shard_end: Option<bool>,
    billing_mode: Option<BillingMode>,
    max_get_records_per_second: Option<u32>,
    max_bytes_per_second: Option<u64>,
    max_prefetch_records: Option<usize>,
    max_prefetch_bytes: Option<usize>,
    deliver_out_of_range_aggregates: Option<bool>,
    call_attempt_timeout: Option<Duration>,
    call_timeout: Option<Duration>,
    retrieval_specific_config: Option<RetrievalConfig>,
    client_version_config: Option<ClientVersionConfig>,
    disable_worker_metrics: Option<bool>,
    lease_assignment_interval: Option<Duration>,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident, $set:ident : $ty:ty;)*) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: impl Into<$ty>) -> Self {
                self.$name = Some(value.into());
                self
            }
            $(#[$doc])*
            pub fn $set(&mut self, value: Option<$ty>) -> &mut Self {
                self.$name = value;
                self
            }
        )*
    };
}

impl WorkerConfigBuilder {
    /// A builder with every option at its default.
    pub fn new(application_name: impl Into<String>, stream_name: impl Into<String>) -> Self {
        Self {
            application_name: application_name.into(),
            stream_name: stream_name.into(),
            ..Self::default()
        }
    }

    setters! {
        /// The lease table name (default: the application name).
        table_name, set_table_name: String;
        /// This worker's id (default: host name + random suffix).
        worker_id, set_worker_id: String;
        /// Where shards without a checkpoint start (default LATEST).
        initial_position, set_initial_position: InitialPosition;
        /// Lease failover time (default 10 s, at least 100 ms).
        failover_time, set_failover_time: Duration;
        /// Most leases for this worker (default unlimited, at least 1).
        max_leases_for_worker, set_max_leases_for_worker: usize;
        /// Most leases stolen at one time (default 1, at least 1): it bounds the
        /// ungraceful steals of one taker pass (a live lease taken from its owner without a
        /// handoff), which happen only on a lease store without the handoff writes
        /// (`initiate_handoff` / `complete_handoff` answering `Unsupported`). Graceful
        /// handoffs are bounded by the leases the worker is owed instead, and a handoff to
        /// this worker that timed out (`handoff_timeout`) is completed by it without this
        /// cap (see `kcl_lease::coordinator`, "Taking, handing over, balancing").
        max_leases_to_steal_at_one_time, set_max_leases_to_steal_at_one_time: usize;
        /// How long a graceful handoff may take (default 30 s, zero to a day; the Java
        /// KCL's `gracefulLeaseHandoffTimeoutMillis`; see
        /// `LeaseCoordinatorConfig::handoff_timeout`). It bounds the graceful handoffs of
        /// this worker, both ways: a lease it asked for and its current owner has not
        /// handed over within it (a processor slow to return from `shutdown(Requested)`, or
        /// a Java KCL 2.x owner that ignores the handoff), it completes itself, in effect an
        /// ordinary steal, and the other side's processor is then a `Zombie`; a lease of its
        /// own asked for by another worker is taken that way once it did not hand it over
        /// within it. It is also the extra wait before a lease in another worker's handoff
        /// counts as expired: its owners must stand still for `failover_time +
        /// handoff_timeout`.
        handoff_timeout, set_handoff_timeout: Duration;
        /// Most records per GetRecords (default 10000, 1..=10000).
        max_records, set_max_records: u32;
        /// Idle sleep between empty reads at the tip (default 1 s).
        idle_time_between_reads, set_idle_time_between_reads: Duration;
        /// Deliver empty batches too (default false).
        call_process_records_even_for_empty_list, set_call_process_records_even_for_empty_list: bool;
        /// Parent shard poll interval (default 10 s, not zero).
        parent_shard_poll_interval, set_parent_shard_poll_interval: Duration;
        /// Shard sync interval (default 60 s, not zero).
        shard_sync_interval, set_shard_sync_interval: Duration;
        /// Graceful shutdown grace (default 5 s).
        shutdown_grace, set_shutdown_grace: Duration;
        /// Task back-off (default 500 ms, not zero).
        task_backoff, set_task_backoff: Duration;
        /// Longest read back-off (default 10 s, at least `task_backoff`).
        max_backoff, set_max_backoff: Duration;
        /// Delete finished leases (default true).
        cleanup_leases_upon_shard_completion, set_cleanup_leases_upon_shard_completion: bool;
        /// Validate sequence numbers with Kinesis before checkpointing (default true).
        validate_sequence_number_before_checkpointing, set_validate_sequence_number_before_checkpointing: bool;
        /// Write SHARD_END after Terminate if the processor did not (default false).
        auto_checkpoint_at_shard_end, set_auto_checkpoint_at_shard_end: bool;
        /// Lease table billing (default pay per request).
        billing_mode, set_billing_mode: BillingMode;
        /// GetRecords calls per second per shard (default 5, not zero).
        max_get_records_per_second, set_max_get_records_per_second: u32;
        /// Bytes per second per shard (default 2 MiB, not zero).
        max_bytes_per_second, set_max_bytes_per_second: u64;
        /// Prefetched records per shard (default 30000, at least `max_records`).
        max_prefetch_records, set_max_prefetch_records: usize;
        /// Prefetched bytes per shard (default 32 MiB, not zero).
        max_prefetch_bytes, set_max_prefetch_bytes: usize;
        /// Deliver out-of-range KPL aggregates (default false).
        deliver_out_of_range_aggregates, set_deliver_out_of_range_aggregates: bool;
        /// Bound on one attempt of a Kinesis or lease store call (default 4 s, 50 ms..=5 min).
        call_attempt_timeout, set_call_attempt_timeout: Duration;
        /// Bound on a whole Kinesis or lease store call, retries included (default 10 s,
        /// 50 ms..=5 min, at least `call_attempt_timeout`).
        call_timeout, set_call_timeout: Duration;
        /// How records are read: polling (default) or enhanced fan-out (see
        /// [`RetrievalConfig`], [`FanOutConfig`]).
        retrieval_specific_config, set_retrieval_specific_config: RetrievalConfig;
        /// The lease protocol (default [`ClientVersionConfig::CompatibleWith2x`]; see
        /// [`WorkerConfig::client_version_config`]).
        client_version_config, set_client_version_config: ClientVersionConfig;
        /// WorkerMetricStats rows without CPU metrics (default false).
        disable_worker_metrics, set_disable_worker_metrics: bool;
        /// How often the 3.x leader assigns leases (default half the failover time, not
        /// zero).
        lease_assignment_interval, set_lease_assignment_interval: Duration;
    }

    /// Validates every option and builds the configuration. The error names the option.
    pub fn build(self) -> Result<WorkerConfig, ConfigError> {
        fn invalid(option: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                option,
                reason: reason.into(),
            }
        }
        fn non_empty(option: &'static str, v: &str) -> Result<(), ConfigError> {
            if v.trim().is_empty() {
                Err(invalid(option, "must not be empty"))
            } else {
                Ok(())
            }
        }
        fn not_zero(option: &'static str, d: Duration) -> Result<Duration, ConfigError> {
            if d.is_zero() {
                Err(invalid(option, "must be greater than zero"))
            } else {
                Ok(d)
            }
        }
        // Durations beyond a week are certainly mistakes (and would overflow clock arithmetic).
        for (option, value) in [
            ("idle_time_between_reads", self.idle_time_between_reads),
            (
                "parent_shard_poll_interval",
                self.parent_shard_poll_interval,
            ),
            ("shard_sync_interval", self.shard_sync_interval),
            ("shutdown_grace", self.shutdown_grace),
            ("task_backoff", self.task_backoff),
            ("max_backoff", self.max_backoff),
        ] {
            if value.is_some_and(|d| d > MAX_DURATION) {
                return Err(invalid(option, "must be at most 7 days"));
            }
        }
        non_empty("application_name", &self.application_name)?;
        non_empty("stream_name", &self.stream_name)?;
        let table_name = self
            .table_name
            .unwrap_or_else(|| self.application_name.clone());
        non_empty("table_name", &table_name)?;
        if !(3..=255).contains(&table_name.len())
            || !table_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(invalid(
                "table_name",
                format!(
                    "{table_name:?} is not a valid DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"
                ),
            ));
        }
        let worker_id = match self.worker_id {
            Some(id) => {
                non_empty("worker_id", &id)?;
                id
            }
            None => default_worker_id(),
        };
        // The coordinator's options keep the coordinator's defaults and bounds; an invalid
        // one is reported under the same option name.
        fn from_lease(e: LeaseError) -> ConfigError {
            match e {
                LeaseError::InvalidConfig { option, reason } => {
                    ConfigError::Invalid { option, reason }
                }
                other => ConfigError::Invalid {
                    option: "lease",
                    reason: kcl_lease::ErrorChain(&other).to_string(),
                },
            }
        }
        let mut lease = LeaseCoordinatorConfig::new(worker_id.clone());
        if let Some(v) = self.failover_time {
            lease = lease.with_failover_time(v);
        }
        if let Some(v) = self.max_leases_for_worker {
            lease = lease.with_max_leases_for_worker(v);
        }
        if let Some(v) = self.max_leases_to_steal_at_one_time {
            lease = lease.with_max_leases_to_steal_at_one_time(v);
        }
        if let Some(v) = self.handoff_timeout {
            lease = lease.with_handoff_timeout(v);
        }
        let defaults = CallTimeouts::default();
        lease = lease.with_call_timeouts(CallTimeouts::new(
            self.call_attempt_timeout.unwrap_or(defaults.attempt),
            self.call_timeout.unwrap_or(defaults.call),
        ));
        lease.validate().map_err(from_lease)?;
        let lease_assignment_interval = match self.lease_assignment_interval {
            None => lease.failover_time / 2,
            Some(d) if d.is_zero() || d > MAX_DURATION => {
                return Err(invalid(
                    "lease_assignment_interval",
                    format!("{d:?} must be greater than zero and at most a week"),
                ));
            }
            Some(d) => d,
        };
        let max_records = self
            .max_records
            .unwrap_or(limits::MAX_RECORDS_PER_GET_RECORDS);
        if !(1..=limits::MAX_RECORDS_PER_GET_RECORDS).contains(&max_records) {
            return Err(invalid(
                "max_records",
                format!(
                    "must be between 1 and {}",
                    limits::MAX_RECORDS_PER_GET_RECORDS
                ),
            ));
        }
        let task_backoff = not_zero(
            "task_backoff",
            self.task_backoff.unwrap_or(Duration::from_millis(500)),
        )?;
        let max_backoff = self
            .max_backoff
            .unwrap_or(Duration::from_secs(10).max(task_backoff));
        if max_backoff < task_backoff {
            return Err(invalid("max_backoff", "must be at least task_backoff"));
        }
        let max_get_records_per_second = self
            .max_get_records_per_second
            .unwrap_or(limits::GET_RECORDS_PER_SECOND_PER_SHARD);
        if max_get_records_per_second == 0 {
            return Err(invalid("max_get_records_per_second", "must be at least 1"));
        }
        let max_bytes_per_second = self
            .max_bytes_per_second
            .unwrap_or(limits::READ_BYTES_PER_SECOND_PER_SHARD);
        if max_bytes_per_second == 0 {
            return Err(invalid("max_bytes_per_second", "must be at least 1"));
        }
        let max_prefetch_records = self.max_prefetch_records.unwrap_or(30_000);
        if max_prefetch_records < max_records as usize {
            return Err(invalid(
                "max_prefetch_records",
                "must be at least max_records",
            ));
        }
        if max_prefetch_records > MAX_PREFETCH {
            return Err(invalid(
                "max_prefetch_records",
                format!("must be at most {MAX_PREFETCH}"),
            ));
        }
        let max_prefetch_bytes = self.max_prefetch_bytes.unwrap_or(32 * 1024 * 1024);
        if max_prefetch_bytes == 0 {
            return Err(invalid("max_prefetch_bytes", "must be at least 1"));
        }
        if max_prefetch_bytes > MAX_PREFETCH {
            return Err(invalid(
                "max_prefetch_bytes",
                format!("must be at most {MAX_PREFETCH}"),
            ));
        }
        if let Some(BillingMode::Provisioned {
            read_capacity_units,
            write_capacity_units,
        }) = self.billing_mode
            && (read_capacity_units == 0 || write_capacity_units == 0)
        {
            return Err(invalid(
                "billing_mode",
                "provisioned capacity units must be at least 1",
            ));
        }
        let retrieval_specific_config = match self.retrieval_specific_config.unwrap_or_default() {
            RetrievalConfig::Polling => RetrievalConfig::Polling,
            RetrievalConfig::FanOut(mut fan_out) => {
                validate_fan_out(&mut fan_out, &self.application_name)?;
                RetrievalConfig::FanOut(fan_out)
            }
        };
        Ok(WorkerConfig {
            retrieval_specific_config,
            application_name: self.application_name,
            stream_name: self.stream_name,
            table_name,
            worker_id,
            initial_position: self.initial_position.unwrap_or_default(),
            lease,
            max_records,
            idle_time_between_reads: self
                .idle_time_between_reads
                .unwrap_or(Duration::from_secs(1)),
            call_process_records_even_for_empty_list: self
                .call_process_records_even_for_empty_list
                .unwrap_or(false),
            parent_shard_poll_interval: not_zero(
                "parent_shard_poll_interval",
                self.parent_shard_poll_interval
                    .unwrap_or(Duration::from_secs(10)),
            )?,
            shard_sync_interval: not_zero(
                "shard_sync_interval",
                self.shard_sync_interval.unwrap_or(Duration::from_secs(60)),
            )?,
            shutdown_grace: self.shutdown_grace.unwrap_or(Duration::from_secs(5)),
            task_backoff,
            max_backoff,
            cleanup_leases_upon_shard_completion: self
                .cleanup_leases_upon_shard_completion
                .unwrap_or(true),
            validate_sequence_number_before_checkpointing: self
                .validate_sequence_number_before_checkpointing
                .unwrap_or(true),
            auto_checkpoint_at_shard_end: self.auto_checkpoint_at_shard_end.unwrap_or(false),
            billing_mode: self.billing_mode.unwrap_or_default(),
            max_get_records_per_second,
            max_bytes_per_second,
            max_prefetch_records,
            max_prefetch_bytes,
            deliver_out_of_range_aggregates: self.deliver_out_of_range_aggregates.unwrap_or(false),
            client_version_config: self
                .client_version_config
                .unwrap_or(ClientVersionConfig::CompatibleWith2x),
            disable_worker_metrics: self.disable_worker_metrics.unwrap_or(false),
            lease_assignment_interval,
        })
    }
}

/// Checks the fan-out options and fills in the consumer name.
fn validate_fan_out(fan_out: &mut FanOutConfig, application_name: &str) -> Result<(), ConfigError> {
    let invalid = |option: &'static str, reason: &str| ConfigError::Invalid {
        option,
        reason: reason.to_owned(),
    };
    match (&fan_out.consumer_name, &fan_out.consumer_arn) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "consumer_arn",
                "give consumer_name or consumer_arn, not both",
            ));
        }
        (_, Some(arn)) => {
            if !arn.starts_with("arn:") || arn.len() > 2048 || arn.contains(char::is_whitespace) {
                return Err(invalid(
                    "consumer_arn",
                    "must be a stream consumer ARN (arn:...:consumer/NAME:TIMESTAMP)",
                ));
            }
        }
        (name, None) => {
            let name = name.clone().unwrap_or_else(|| application_name.to_owned());
            let valid = (1..=128).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(ConfigError::Invalid {
                    option: "consumer_name",
                    reason: format!(
                        "{name:?} is not a valid stream consumer name (1-128 of a-z A-Z 0-9 _ . -)"
                    ),
                });
            }
            fan_out.consumer_name = Some(name);
        }
    }
    if let Some(t) = fan_out.event_timeout
        && !(Duration::from_secs(1)..=Duration::from_secs(300)).contains(&t)
    {
        return Err(invalid("event_timeout", "must be between 1 s and 5 min"));
    }
    if let Some(t) = fan_out.registration_timeout
        && !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&t)
    {
        return Err(invalid(
            "registration_timeout",
            "must be between 1 s and 1 h",
        ));
    }
    if let Some(t) = fan_out.shard_end_probe_interval
        && !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&t)
    {
        return Err(invalid(
            "shard_end_probe_interval",
            "must be between 100 ms and 1 h",
        ));
    }
    Ok(())
}

/// Host name plus a random suffix.
fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "worker".to_owned());
    use kcl_lease::RandomSource;
    let suffix = kcl_lease::SeededRandom::from_entropy().next_u64();
    format!("{host}-{:08x}", suffix as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = WorkerConfig::builder("app", "stream").build().unwrap();
        assert_eq!(c.table_name, "app");
        assert_eq!(c.initial_position, InitialPosition::Latest);
        assert_eq!(c.lease.failover_time, Duration::from_secs(10));
        assert_eq!(c.lease.max_leases_for_worker, usize::MAX);
        assert_eq!(c.lease.max_leases_to_steal_at_one_time, 1);
        assert_eq!(c.lease.worker_id, c.worker_id);
        assert_eq!(c.call_timeouts(), CallTimeouts::default());
        assert_eq!(c.max_records, 10_000);
        assert_eq!(c.idle_time_between_reads, Duration::from_secs(1));
        assert!(!c.call_process_records_even_for_empty_list);
        assert_eq!(c.parent_shard_poll_interval, Duration::from_secs(10));
        assert_eq!(c.shard_sync_interval, Duration::from_secs(60));
        assert_eq!(c.shutdown_grace, Duration::from_secs(5));
        assert_eq!(c.task_backoff, Duration::from_millis(500));
        assert!(c.cleanup_leases_upon_shard_completion);
        assert!(c.validate_sequence_number_before_checkpointing);
        assert!(!c.auto_checkpoint_at_shard_end);
        assert_eq!(c.billing_mode, BillingMode::PayPerRequest);
        assert!(!c.worker_id.is_empty());
        assert_eq!(c.retrieval_specific_config, RetrievalConfig::Polling);
    }

    #[test]
    fn fan_out_consumer_name_defaults_to_the_application() {
        let c = WorkerConfig::builder("app", "s")
            .retrieval_specific_config(RetrievalConfig::fan_out())
            .build()
            .unwrap();
        let RetrievalConfig::FanOut(f) = c.retrieval_specific_config else {
            panic!("fan-out expected");
        };
        assert_eq!(f.consumer_name.as_deref(), Some("app"));
        assert_eq!(f.consumer_arn, None);
        assert_eq!(f.event_timeout_or_default(), DEFAULT_EVENT_TIMEOUT);
        let c = WorkerConfig::builder("app", "s")
            .retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new()
                    .consumer_arn("arn:aws:kinesis:us-east-1:1:stream/s/consumer/c:1"),
            ))
            .build()
            .unwrap();
        let RetrievalConfig::FanOut(f) = c.retrieval_specific_config else {
            panic!("fan-out expected");
        };
        assert_eq!(f.consumer_name, None, "nothing is registered with an ARN");
    }

    #[test]
    fn bad_values_name_the_option() {
        let cases: Vec<(WorkerConfigBuilder, &str)> = vec![
            (WorkerConfig::builder("", "s"), "application_name"),
            (WorkerConfig::builder("app", " "), "stream_name"),
            (
                WorkerConfig::builder("app", "s").table_name("a b"),
                "table_name",
            ),
            (WorkerConfig::builder("app", "s").worker_id(""), "worker_id"),
            (
                WorkerConfig::builder("app", "s").failover_time(Duration::from_millis(5)),
                "failover_time",
            ),
            (
                WorkerConfig::builder("app", "s").max_leases_for_worker(0usize),
                "max_leases_for_worker",
            ),
            (
                WorkerConfig::builder("app", "s").max_leases_to_steal_at_one_time(0usize),
                "max_leases_to_steal_at_one_time",
            ),
            (
                WorkerConfig::builder("app", "s").max_records(0u32),
                "max_records",
            ),
            (
                WorkerConfig::builder("app", "s").max_records(10_001u32),
                "max_records",
            ),
            (
                WorkerConfig::builder("app", "s").shard_sync_interval(Duration::ZERO),
                "shard_sync_interval",
            ),
            (
                WorkerConfig::builder("app", "s").parent_shard_poll_interval(Duration::ZERO),
                "parent_shard_poll_interval",
            ),
            (
                WorkerConfig::builder("app", "s").task_backoff(Duration::ZERO),
                "task_backoff",
            ),
            (
                WorkerConfig::builder("app", "s").max_backoff(Duration::from_millis(1)),
                "max_backoff",
            ),
            (
                WorkerConfig::builder("app", "s").max_get_records_per_second(0u32),
                "max_get_records_per_second",
            ),
            (
                WorkerConfig::builder("app", "s").max_bytes_per_second(0u64),
                "max_bytes_per_second",
            ),
            (
                WorkerConfig::builder("app", "s").max_prefetch_records(5usize),
                "max_prefetch_records",
            ),
            (
                WorkerConfig::builder("app", "s").max_prefetch_bytes(0usize),
                "max_prefetch_bytes",
            ),
            (
                WorkerConfig::builder("app", "s").max_prefetch_bytes(usize::MAX),
                "max_prefetch_bytes",
            ),
            (
                WorkerConfig::builder("app", "s").max_prefetch_records(usize::MAX),
                "max_prefetch_records",
            ),
            (
                WorkerConfig::builder("app", "s").shutdown_grace(Duration::MAX),
                "shutdown_grace",
            ),
            (
                WorkerConfig::builder("app", "s").failover_time(Duration::MAX),
                "failover_time",
            ),
            (
                WorkerConfig::builder("app", "s").call_timeout(Duration::from_millis(1)),
                "call_timeout",
            ),
            (
                WorkerConfig::builder("app", "s").call_attempt_timeout(Duration::from_secs(3600)),
                "call_attempt_timeout",
            ),
            (
                WorkerConfig::builder("app", "s")
                    .call_attempt_timeout(Duration::from_secs(5))
                    .call_timeout(Duration::from_secs(4)),
                "call_timeout",
            ),
            (
                WorkerConfig::builder("app", "s").billing_mode(BillingMode::Provisioned {
                    read_capacity_units: 0,
                    write_capacity_units: 1,
                }),
                "billing_mode",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(FanOutConfig::new().consumer_name("a b")),
                ),
                "consumer_name",
            ),
            (
                WorkerConfig::builder("app:x", "s")
                    .table_name("app")
                    .retrieval_specific_config(RetrievalConfig::fan_out()),
                "consumer_name",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(FanOutConfig::new().consumer_arn("nope")),
                ),
                "consumer_arn",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(
                        FanOutConfig::new().consumer_name("c").consumer_arn("arn:x"),
                    ),
                ),
                "consumer_arn",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(
                        FanOutConfig::new().event_timeout(Duration::from_millis(10)),
                    ),
                ),
                "event_timeout",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(
                        FanOutConfig::new().registration_timeout(Duration::ZERO),
                    ),
                ),
                "registration_timeout",
            ),
            (
                WorkerConfig::builder("app", "s").retrieval_specific_config(
                    RetrievalConfig::FanOut(
                        FanOutConfig::new().shard_end_probe_interval(Duration::ZERO),
                    ),
                ),
                "shard_end_probe_interval",
            ),
        ];
        for (builder, option) in cases {
            match builder.build() {
                Err(ConfigError::Invalid { option: o, .. }) => assert_eq!(o, option),
                other => panic!("{option}: expected an error, got {other:?}"),
            }
        }
    }

    #[test]
    fn set_none_restores_default() {
        let mut b = WorkerConfig::builder("app", "s").failover_time(Duration::from_secs(3));
        b.set_failover_time(None);
        assert_eq!(
            b.build().unwrap().lease.failover_time,
            Duration::from_secs(10)
        );
    }
}
