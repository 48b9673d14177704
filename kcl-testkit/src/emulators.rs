//! Fixtures that start local AWS emulators on loopback for integration tests.
//!
//! Three emulators are supported (see [`EmulatorKind`]): kinesis-local (Kinesis), dynalite
//! (DynamoDB) and moto (both). `scripts/install-emulators` installs them into the workspace's
//! `.emulators` directory (or into `$KCL_EMULATORS_DIR`); [`Emulator::start`] then runs one on
//! a free `127.0.0.1` port, waits until it answers a real API call, and stops it when dropped.
//!
//! ```no_run
//! use kcl_testkit::emulators::{Emulator, EmulatorKind, dynamodb_client};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let dynalite = Emulator::start(EmulatorKind::Dynalite)?;
//! let client = dynamodb_client(dynalite.endpoint());
//! let tables = client.list_tables().send().await?;
//! assert!(tables.table_names().is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! A missing emulator is an error ([`EmulatorError::NotInstalled`]) whose message names the
//! command to run: tests that need an emulator fail with it, they never pass by skipping.
//!
//! Each emulator runs in its own process group. Dropping the [`Emulator`] kills the group and
//! waits for it. As a safety net for a test process that dies without unwinding (killed, aborted,
//! `process::exit`), a small watchdog shell in the same process group kills the group within
//! about a second of the test process's exit. The emulator's output goes to a log file under
//! the system temp directory ([`Emulator::log_path`]); it is removed on drop unless
//! `KCL_EMULATORS_KEEP_LOGS` is set, and its last lines are part of every start-up error.
//!
//! An emulator shared by the tests of one binary may live in a `static` (`std::sync::OnceLock`):
//! it is never dropped, and the watchdog stops it when the test process exits.
//!
//! Starting an emulator blocks the calling thread (about a second; [`READY_TIMEOUT`] at most):
//! waiting for an external process is wall-clock time by nature, so this fixture uses the real
//! clock, unlike the library code it tests.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_kinesis::config::{Credentials, SharedCredentialsProvider};
use rustix::process::{Pid, Signal, kill_process_group};

/// Environment variable naming the directory the emulators were installed into.
pub const EMULATORS_DIR_ENV: &str = "KCL_EMULATORS_DIR";

/// Environment variable that, when set (to anything), keeps the emulators' log files after drop.
pub const KEEP_LOGS_ENV: &str = "KCL_EMULATORS_KEEP_LOGS";

/// The region of the clients built by [`sdk_config`].
pub const REGION: &str = "us-east-1";

/// How long [`Emulator::start`] waits for an emulator to answer before giving up.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Start attempts when the chosen port was taken between choosing and binding it.
const START_ATTEMPTS: u32 = 3;
/// Pause between two readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Connect / read / write timeout of one readiness probe.
const PROBE_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of a probe's answer is read at most.
const PROBE_MAX_RESPONSE: u64 = 64 * 1024;
/// Lines of the emulator's log quoted in start-up errors.
const LOG_TAIL_LINES: usize = 30;
/// kinesis-local's delay for every asynchronous stream operation (creating, resharding, ...).
const KINESIS_LOCAL_OPERATION_DURATION: &str = "50ms";
/// kinesis-local's settings for the durations of its asynchronous operations.
const KINESIS_LOCAL_DURATION_VARS: [&str; 10] = [
    "CREATE_STREAM_DURATION",
    "DELETE_STREAM_DURATION",
    "SPLIT_SHARD_DURATION",
    "MERGE_SHARDS_DURATION",
    "UPDATE_SHARD_COUNT_DURATION",
    "UPDATE_STREAM_MODE_DURATION",
    "REGISTER_STREAM_CONSUMER_DURATION",
    "DEREGISTER_STREAM_CONSUMER_DURATION",
    "START_STREAM_ENCRYPTION_DURATION",
    "STOP_STREAM_ENCRYPTION_DURATION",
];

/// Numbers the log files of the emulators started by this process.
static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(0);

/// A local emulator of AWS services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EmulatorKind {
    /// kinesis-local (npm `kinesis-local`): Kinesis, including resharding, ChildShards,
    /// StreamARN calls and enhanced fan-out.
    KinesisLocal,
    /// dynalite (npm `dynalite`): DynamoDB, in memory.
    Dynalite,
    /// moto (`moto_server`, PyPI): DynamoDB, and Kinesis for polling never-resharded streams
    /// (no ChildShards, no null iterator at a shard's end, no SubscribeToShard).
    Moto,
}

impl EmulatorKind {
    /// Every emulator kind.
    pub const ALL: [EmulatorKind; 3] = [Self::KinesisLocal, Self::Dynalite, Self::Moto];

    /// The emulator's short name, as in `scripts/install-emulators`.
    pub fn name(self) -> &'static str {
        match self {
            Self::KinesisLocal => "kinesis-local",
            Self::Dynalite => "dynalite",
            Self::Moto => "moto",
        }
    }

    /// Whether it serves the Kinesis API.
    pub fn serves_kinesis(self) -> bool {
        matches!(self, Self::KinesisLocal | Self::Moto)
    }

    /// Whether it serves the DynamoDB API.
    pub fn serves_dynamodb(self) -> bool {
        matches!(self, Self::Dynalite | Self::Moto)
    }
}

impl fmt::Display for EmulatorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an emulator could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// The emulator (or the runtime it needs) is not installed.
    #[error("{kind} emulator is not installed ({} not found): {hint}", missing.display())]
    NotInstalled {
        /// The emulator.
        kind: EmulatorKind,
        /// The file or program that was looked for.
        missing: PathBuf,
        /// What to run to install it.
        hint: String,
    },
    /// The emulator's process could not be spawned.
    #[error("could not spawn {kind} ({program})")]
    Spawn {
        /// The emulator.
        kind: EmulatorKind,
        /// The program that was run.
        program: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The emulator exited before it answered.
    #[error("{kind} exited before it was ready ({status}); last lines of its log:\n{log_tail}")]
    Exited {
        /// The emulator.
        kind: EmulatorKind,
        /// Its exit status.
        status: String,
        /// The last lines of its output.
        log_tail: String,
    },
    /// The emulator did not answer within [`READY_TIMEOUT`].
    #[error(
        "{kind} did not answer at {endpoint} within {waited:?}; last lines of its log:\n{log_tail}"
    )]
    NotReady {
        /// The emulator.
        kind: EmulatorKind,
        /// The endpoint that was probed.
        endpoint: String,
        /// How long it was given.
        waited: Duration,
        /// The last lines of its output.
        log_tail: String,
    },
    /// Preparing the start failed (choosing a port, creating the log file).
    #[error("could not prepare {kind}: {action}")]
    Setup {
        /// The emulator.
        kind: EmulatorKind,
        /// What was being done.
        action: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl EmulatorError {
    /// Whether starting again may succeed (a slow or crowded machine), as opposed to a missing
    /// installation or a broken environment.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Exited { .. } | Self::NotReady { .. })
    }
}

/// kinesis-local and dynalite, as most worker tests on the emulators need them.
#[derive(Debug)]
#[non_exhaustive]
pub struct KinesisAndDynamoDb {
    /// kinesis-local.
    pub kinesis: Emulator,
    /// dynalite.
    pub dynamodb: Emulator,
}

/// kinesis-local and dynalite shared by every test of one test binary: started on the first
/// call (blocking, about a second each), never dropped, stopped by their watchdogs when the
/// test process exits. Each test then uses its own stream and table. A failed start is kept
/// and returned to every caller.
pub fn shared_kinesis_and_dynamodb() -> Result<&'static KinesisAndDynamoDb, &'static EmulatorError>
{
    static SHARED: OnceLock<Result<KinesisAndDynamoDb, EmulatorError>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            Ok(KinesisAndDynamoDb {
                kinesis: Emulator::start(EmulatorKind::KinesisLocal)?,
                dynamodb: Emulator::start(EmulatorKind::Dynalite)?,
            })
        })
        .as_ref()
}

/// A running emulator on `127.0.0.1`, stopped (with its whole process group) when dropped.
pub struct Emulator {
    kind: EmulatorKind,
    port: u16,
    endpoint: String,
    child: Child,
    watchdog: Child,
    log_path: PathBuf,
    started_in: Duration,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint)
            .field("pid", &self.child.id())
            .field("log_path", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// Starts an emulator installed in [`emulators_dir`] on a free `127.0.0.1` port and waits
    /// until it answers a real API call.
    pub fn start(kind: EmulatorKind) -> Result<Emulator, EmulatorError> {
        Self::start_in(kind, &emulators_dir())
    }

    /// Like [`Emulator::start`], with the emulators installed in `dir` (the directory
    /// `scripts/install-emulators` installs into).
    pub fn start_in(kind: EmulatorKind, dir: &Path) -> Result<Emulator, EmulatorError> {
        let layout = Layout::find(kind, dir)?;
        let mut attempt = 1;
        loop {
            match Self::start_once(kind, &layout) {
                Err(EmulatorError::Exited { log_tail, .. })
                    if attempt < START_ATTEMPTS && is_port_collision(&log_tail) =>
                {
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The endpoint to give the SDK clients: `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The port it listens on (on `127.0.0.1`).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id of the emulator (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Which emulator this is.
    pub fn kind(&self) -> EmulatorKind {
        self.kind
    }

    /// The file its standard output and error go to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How long it took from spawning the process until it answered.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    fn start_once(kind: EmulatorKind, layout: &Layout) -> Result<Emulator, EmulatorError> {
        let setup = |action: String| {
            move |source: io::Error| EmulatorError::Setup {
                kind,
                action,
                source,
            }
        };
        let (port, tls_port) = free_port_pair().map_err(setup("choosing a free port".into()))?;
        let log_path = new_log_path(kind, port);
        if let Some(parent) = log_path.parent() {
            fs::create_dir_all(parent).map_err(setup(format!("creating {}", parent.display())))?;
        }
        let log =
            File::create(&log_path).map_err(setup(format!("creating {}", log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(setup(format!("opening {}", log_path.display())))?;

        let mut command = layout.command(port, tls_port);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let spawned_at = Instant::now();
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                EmulatorError::NotInstalled {
                    kind,
                    missing: PathBuf::from(&layout.program),
                    hint: layout.runtime_hint(),
                }
            } else {
                EmulatorError::Spawn {
                    kind,
                    program: layout.program.to_string_lossy().into_owned(),
                    source,
                }
            }
        })?;

        let watchdog = match spawn_watchdog(child.id(), "kcl-emulator-watchdog") {
            Ok(watchdog) => watchdog,
            Err(source) => {
                kill_group_and_wait(&mut child);
                let _ = fs::remove_file(&log_path);
                return Err(EmulatorError::Spawn {
                    kind,
                    program: "sh (watchdog)".into(),
                    source,
                });
            }
        };
        let mut emulator = Emulator {
            kind,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            watchdog,
            log_path,
            started_in: Duration::ZERO,
        };
        emulator.wait_until_ready(spawned_at)?;
        Ok(emulator)
    }

    /// Probes until the emulator answers, it exits, or [`READY_TIMEOUT`] passes. On failure the
    /// emulator is stopped when `self` is dropped by the caller.
    fn wait_until_ready(&mut self, spawned_at: Instant) -> Result<(), EmulatorError> {
        let deadline = spawned_at + READY_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return Err(EmulatorError::Exited {
                        kind: self.kind,
                        status: status.to_string(),
                        log_tail: log_tail(&self.log_path),
                    });
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(EmulatorError::Spawn {
                        kind: self.kind,
                        program: format!("waiting for pid {}", self.child.id()),
                        source,
                    });
                }
            }
            if probe(self.kind, self.port) {
                self.started_in = spawned_at.elapsed();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EmulatorError::NotReady {
                    kind: self.kind,
                    endpoint: self.endpoint.clone(),
                    waited: READY_TIMEOUT,
                    log_tail: log_tail(&self.log_path),
                });
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // The watchdog is in the emulator's process group: one signal stops both.
        kill_group_and_wait(&mut self.child);
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
        if std::env::var_os(KEEP_LOGS_ENV).is_none() {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

/// The directory the emulators are installed in: `$KCL_EMULATORS_DIR`, else the workspace's
/// `.emulators` directory.
pub fn emulators_dir() -> PathBuf {
    match std::env::var_os(EMULATORS_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => workspace_root().join(".emulators"),
    }
}

/// SDK configuration for an emulator: static dummy credentials, region [`REGION`], the latest
/// behaviour version and `endpoint` as the endpoint URL. Nothing is read from the environment.
pub fn sdk_config(endpoint: &str) -> SdkConfig {
    let credentials = Credentials::new(
        "kcl-testkit-access-key",
        "kcl-testkit-secret-key",
        None,
        None,
        "kcl-testkit-emulator",
    );
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .endpoint_url(endpoint)
        .build()
}

/// A Kinesis client for an emulator at `endpoint` (see [`sdk_config`]).
pub fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(&sdk_config(endpoint))
}

/// A DynamoDB client for an emulator at `endpoint` (see [`sdk_config`]).
pub fn dynamodb_client(endpoint: &str) -> aws_sdk_dynamodb::Client {
    aws_sdk_dynamodb::Client::new(&sdk_config(endpoint))
}

/// How often [`wait_stream_active`] and [`wait_table_active`] ask for the status.
pub const ACTIVE_POLL: Duration = Duration::from_millis(20);

/// A stream or table that could not be created, or did not become `ACTIVE`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A call to the emulator failed.
    #[error("{call} of {resource} failed")]
    Call {
        /// The API call (`CreateStream`, ...).
        call: &'static str,
        /// The stream or table.
        resource: String,
        /// The SDK's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The resource was not `ACTIVE` within the limit.
    #[error("{resource} not ACTIVE after {waited:?} (last status: {status})")]
    NotActive {
        /// The stream or table.
        resource: String,
        /// How long it was waited for.
        waited: Duration,
        /// The last status seen.
        status: String,
    },
}

/// Asks `status` every [`ACTIVE_POLL`] (in real time) until it answers `Some`, for at most
/// `limit`; the last status text seen goes into [`SetupError::NotActive`].
async fn poll_active<T, F, Fut>(
    resource: &str,
    limit: Duration,
    mut status: F,
) -> Result<T, SetupError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(Option<T>, String), SetupError>>,
{
    let last = std::sync::Mutex::new(String::from("none yet"));
    let polling = async {
        loop {
            let (active, seen) = status().await?;
            if let Some(done) = active {
                return Ok(done);
            }
            *last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = seen;
            tokio::time::sleep(ACTIVE_POLL).await;
        }
    };
    match kcl_lease::timeouts::within(&kcl_lease::SystemClock, limit, polling).await {
        Some(result) => result,
        None => Err(SetupError::NotActive {
            resource: resource.to_owned(),
            waited: limit,
            status: last
                .into_inner()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        }),
    }
}

/// Waits (at most `limit`) until `stream` is `ACTIVE` (after a create, split or merge);
/// returns its summary.
pub async fn wait_stream_active(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    limit: Duration,
) -> Result<aws_sdk_kinesis::types::StreamDescriptionSummary, SetupError> {
    poll_active(stream, limit, || async {
        let summary = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| SetupError::Call {
                call: "DescribeStreamSummary",
                resource: stream.to_owned(),
                source: Box::new(e),
            })?
            .stream_description_summary;
        let status = summary
            .as_ref()
            .map(|s| format!("{:?}", s.stream_status))
            .unwrap_or_default();
        Ok((
            summary.filter(|s| s.stream_status == aws_sdk_kinesis::types::StreamStatus::Active),
            status,
        ))
    })
    .await
}

/// Creates `stream` with `shards` shards and waits (at most `limit`) until it is `ACTIVE`;
/// returns its summary.
pub async fn create_stream_and_wait(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: i32,
    limit: Duration,
) -> Result<aws_sdk_kinesis::types::StreamDescriptionSummary, SetupError> {
    client
        .create_stream()
        .stream_name(stream)
        .shard_count(shards)
        .send()
        .await
        .map_err(|e| SetupError::Call {
            call: "CreateStream",
            resource: stream.to_owned(),
            source: Box::new(e),
        })?;
    wait_stream_active(client, stream, limit).await
}

/// Waits (at most `limit`) until `table` is `ACTIVE`; returns its description.
pub async fn wait_table_active(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    limit: Duration,
) -> Result<aws_sdk_dynamodb::types::TableDescription, SetupError> {
    poll_active(table, limit, || async {
        let description = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| SetupError::Call {
                call: "DescribeTable",
                resource: table.to_owned(),
                source: Box::new(e),
            })?
            .table;
        let status = description
            .as_ref()
            .and_then(|t| t.table_status.as_ref())
            .map(|s| format!("{s:?}"))
            .unwrap_or_default();
        Ok((
            description
                .filter(|t| t.table_status == Some(aws_sdk_dynamodb::types::TableStatus::Active)),
            status,
        ))
    })
    .await
}

/// Creates `table` shaped like a lease table (hash key `leaseKey`, a string; on-demand
/// billing) and waits (at most `limit`) until it is `ACTIVE`; returns its description.
pub async fn create_lease_table_and_wait(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    limit: Duration,
) -> Result<aws_sdk_dynamodb::types::TableDescription, SetupError> {
    use aws_sdk_dynamodb::types::{
        AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    };
    let call_error = |call: &'static str| {
        let resource = table.to_owned();
        move |e: Box<dyn std::error::Error + Send + Sync>| SetupError::Call {
            call,
            resource,
            source: e,
        }
    };
    let attribute = AttributeDefinition::builder()
        .attribute_name("leaseKey")
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| call_error("CreateTable")(Box::new(e)))?;
    let key = KeySchemaElement::builder()
        .attribute_name("leaseKey")
        .key_type(KeyType::Hash)
        .build()
        .map_err(|e| call_error("CreateTable")(Box::new(e)))?;
    client
        .create_table()
        .table_name(table)
        .attribute_definitions(attribute)
        .key_schema(key)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .map_err(|e| call_error("CreateTable")(Box::new(e)))?;
    wait_table_active(client, table, limit).await
}

/// The workspace root, known at compile time.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.join(".."), Path::to_path_buf)
}

/// The command that installs the emulators into `dir`.
fn install_command(dir: &Path) -> String {
    let script = workspace_root().join("scripts").join("install-emulators");
    if dir == workspace_root().join(".emulators") {
        script.display().to_string()
    } else {
        format!("{EMULATORS_DIR_ENV}={} {}", dir.display(), script.display())
    }
}

/// Where an installed emulator's files are and how to run it.
struct Layout {
    kind: EmulatorKind,
    dir: PathBuf,
    /// The program to run (`node` or moto's `moto_server`).
    program: OsString,
    /// The script given to node (kinesis-local, dynalite).
    script: Option<PathBuf>,
    /// kinesis-local's TLS certificate.
    cert: Option<PathBuf>,
}

impl Layout {
    fn find(kind: EmulatorKind, dir: &Path) -> Result<Layout, EmulatorError> {
        let node_modules = dir.join("node").join("node_modules");
        let (program, script, cert, required) = match kind {
            EmulatorKind::KinesisLocal => {
                let package = node_modules.join("kinesis-local");
                let script = package.join("main-loopback.js");
                let cert = package.join("server.json");
                let required = vec![script.clone(), cert.clone()];
                (OsString::from("node"), Some(script), Some(cert), required)
            }
            EmulatorKind::Dynalite => {
                let script = node_modules.join("dynalite").join("cli.js");
                let required = vec![script.clone()];
                (OsString::from("node"), Some(script), None, required)
            }
            EmulatorKind::Moto => {
                let server = dir.join("venv").join("bin").join("moto_server");
                let required = vec![server.clone()];
                (server.into_os_string(), None, None, required)
            }
        };
        if let Some(missing) = required.into_iter().find(|path| !path.is_file()) {
            return Err(EmulatorError::NotInstalled {
                kind,
                missing,
                hint: format!("run `{}` to install it", install_command(dir)),
            });
        }
        Ok(Layout {
            kind,
            dir: dir.to_path_buf(),
            program,
            script,
            cert,
        })
    }

    /// What to do when the program itself cannot be found.
    fn runtime_hint(&self) -> String {
        match self.kind {
            EmulatorKind::KinesisLocal | EmulatorKind::Dynalite => format!(
                "put Node.js >= 18 (`node`) on PATH, then run `{}`",
                install_command(&self.dir)
            ),
            EmulatorKind::Moto => format!("run `{}` to install it", install_command(&self.dir)),
        }
    }

    fn command(&self, port: u16, tls_port: u16) -> Command {
        let mut command = Command::new(&self.program);
        command.current_dir(std::env::temp_dir());
        if let Some(script) = &self.script {
            command.arg(script);
        }
        let port_arg = port.to_string();
        match self.kind {
            EmulatorKind::KinesisLocal => {
                command
                    .env("KINESIS_MOCK_PLAIN_PORT", &port_arg)
                    .env("KINESIS_MOCK_TLS_PORT", tls_port.to_string())
                    .env("LOG_LEVEL", "WARN")
                    .env("AWS_REGION", REGION)
                    .env("SHOULD_PERSIST_DATA", "false")
                    .env("LOAD_DATA_IF_EXISTS", "false")
                    .env_remove("AWS_ACCOUNT_ID")
                    .env_remove("INITIALIZE_STREAMS");
                if let Some(cert) = &self.cert {
                    command.env("KINESIS_MOCK_CERT_PATH", cert);
                }
                for var in KINESIS_LOCAL_DURATION_VARS {
                    command.env(var, KINESIS_LOCAL_OPERATION_DURATION);
                }
            }
            EmulatorKind::Dynalite => {
                command.args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port_arg,
                    "--createTableMs",
                    "0",
                    "--deleteTableMs",
                    "0",
                    "--updateTableMs",
                    "0",
                ]);
            }
            EmulatorKind::Moto => {
                command
                    .args(["-H", "127.0.0.1", "-p", &port_arg])
                    .env("PYTHONUNBUFFERED", "1");
            }
        }
        command
    }
}

/// Two distinct free ports on 127.0.0.1 (the second is kinesis-local's TLS port; the others
/// ignore it). Both listeners are held until both ports are known, then closed.
fn free_port_pair() -> io::Result<(u16, u16)> {
    let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let second = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok((first.local_addr()?.port(), second.local_addr()?.port()))
}

fn new_log_path(kind: EmulatorKind, port: u16) -> PathBuf {
    let id = NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir()
        .join("kcl-emulators")
        .join(format!("{kind}-{}-{id}-port{port}.log", std::process::id()))
}

/// Starts a shell (named `name`) in the process group led by `emulator_pid` that kills the
/// group once this (the test) process is gone, so what the fixture started never outlives it,
/// even when `Drop` never runs. Used for the emulators and for the Java KCL fixture.
pub(crate) fn spawn_watchdog(emulator_pid: u32, name: &str) -> io::Result<Child> {
    let group = i32::try_from(emulator_pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill -9 "-$2" 2>/dev/null"#)
        .arg(name)
        .arg(std::process::id().to_string())
        .arg(emulator_pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(group)
        .spawn()
}

/// Kills the child's process group (it leads its own group), then the child, and reaps it.
pub(crate) fn kill_group_and_wait(child: &mut Child) {
    if let Some(group) = i32::try_from(child.id()).ok().and_then(Pid::from_raw) {
        let _ = kill_process_group(group, Signal::KILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn is_port_collision(log: &str) -> bool {
    log.contains("EADDRINUSE") || log.to_ascii_lowercase().contains("address already in use")
}

/// The last [`LOG_TAIL_LINES`] lines of a log file.
fn log_tail(path: &Path) -> String {
    let Ok(bytes) = fs::read(path) else {
        return format!("(could not read {})", path.display());
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().rev().take(LOG_TAIL_LINES).collect();
    lines.reverse();
    if lines.is_empty() {
        return "(empty)".into();
    }
    lines.join("\n")
}

/// Whether the emulator answers a real list call (ListStreams for kinesis-local, ListTables for
/// the others) with HTTP 200 and the expected JSON.
fn probe(kind: EmulatorKind, port: u16) -> bool {
    let (target, content_type, service, marker) = match kind {
        EmulatorKind::KinesisLocal => (
            "Kinesis_20131202.ListStreams",
            "application/x-amz-json-1.1",
            "kinesis",
            "\"StreamNames\"",
        ),
        EmulatorKind::Dynalite | EmulatorKind::Moto => (
            "DynamoDB_20120810.ListTables",
            "application/x-amz-json-1.0",
            "dynamodb",
            "\"TableNames\"",
        ),
    };
    let request = format!(
        "POST / HTTP/1.1\r\n\
         Host: 127.0.0.1:{port}\r\n\
         Content-Type: {content_type}\r\n\
         X-Amz-Target: {target}\r\n\
         X-Amz-Date: 20250101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=kcl-testkit/20250101/{REGION}/{service}/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature={signature}\r\n\
         Content-Length: 2\r\n\
         Connection: close\r\n\
         \r\n\
         {{}}",
        signature = "0".repeat(64),
    );
    let Some(response) = http_exchange(port, &request) else {
        return false;
    };
    let status_ok = response
        .lines()
        .next()
        .is_some_and(|line| line.starts_with("HTTP/1.") && line.contains(" 200"));
    status_ok && response.contains(marker)
}

fn http_exchange(port: u16, request: &str) -> Option<String> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&address, PROBE_IO_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(PROBE_IO_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(PROBE_IO_TIMEOUT)).ok()?;
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = Vec::new();
    // A read timeout after a complete answer still counts: the answer is judged by content.
    let _ = stream.take(PROBE_MAX_RESPONSE).read_to_end(&mut response);
    Some(String::from_utf8_lossy(&response).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_and_services() {
        assert_eq!(EmulatorKind::KinesisLocal.to_string(), "kinesis-local");
        assert_eq!(EmulatorKind::Dynalite.to_string(), "dynalite");
        assert_eq!(EmulatorKind::Moto.to_string(), "moto");
        assert!(EmulatorKind::KinesisLocal.serves_kinesis());
        assert!(!EmulatorKind::KinesisLocal.serves_dynamodb());
        assert!(EmulatorKind::Dynalite.serves_dynamodb());
        assert!(!EmulatorKind::Dynalite.serves_kinesis());
        assert!(EmulatorKind::Moto.serves_kinesis() && EmulatorKind::Moto.serves_dynamodb());
    }

    #[test]
    fn emulator_can_be_shared_between_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Emulator>();
        assert_send_sync::<EmulatorError>();
    }

    #[test]
    fn free_ports_differ() {
        let (a, b) = free_port_pair().unwrap();
        assert_ne!(a, b);
        assert!(a > 0 && b > 0);
    }

    #[test]
    fn port_collisions_are_recognised() {
        assert!(is_port_collision(
            "Error: listen EADDRINUSE: address already in use 127.0.0.1:4567"
        ));
        assert!(is_port_collision(
            "OSError: [Errno 98] Address already in use"
        ));
        assert!(!is_port_collision("SyntaxError: unexpected token"));
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let path =
            std::env::temp_dir().join(format!("kcl-testkit-log-tail-{}.log", std::process::id()));
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        fs::write(&path, text).unwrap();
        let tail = log_tail(&path);
        fs::remove_file(&path).unwrap();
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), LOG_TAIL_LINES);
        assert_eq!(lines.first(), Some(&"line 70"));
        assert_eq!(lines.last(), Some(&"line 99"));
    }

    #[test]
    fn install_command_names_the_script_and_a_custom_dir() {
        let default = install_command(&workspace_root().join(".emulators"));
        assert!(default.ends_with("scripts/install-emulators"), "{default}");
        assert!(!default.contains(EMULATORS_DIR_ENV));
        let custom = install_command(Path::new("/tmp/elsewhere"));
        assert!(
            custom.starts_with("KCL_EMULATORS_DIR=/tmp/elsewhere ")
                && custom.ends_with("scripts/install-emulators"),
            "{custom}"
        );
    }

    #[test]
    fn sdk_config_is_static_and_local() {
        let config = sdk_config("http://127.0.0.1:1");
        assert_eq!(config.endpoint_url(), Some("http://127.0.0.1:1"));
        assert_eq!(config.region().map(|r| r.as_ref()), Some(REGION));
        assert!(config.credentials_provider().is_some());
        assert!(config.behavior_version().is_some());
    }
}
