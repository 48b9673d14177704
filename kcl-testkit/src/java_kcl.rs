//! A fixture that runs the real Java KCL 3.1.3 (its MultiLangDaemon) next to our workers, for
//! the interop tests.
//!
//! `scripts/install-java-kcl` installs the Java KCL (a PyPI wheel that bundles its jars and the
//! Python record-processor interface) into `<emulators dir>/java-kcl`. [`JavaKclWorker::start`]
//! writes a properties file, starts `java ... MultiLangDaemon --properties-file F` in its own
//! process group, and gives each lease to `scripts/java-kcl/processor.py`, which appends one
//! JSON line per event to a record log that [`JavaKclWorker::events`] reads back.
//!
//! # Loopback only
//!
//! The Java KCL probes the EC2 metadata address and may call other AWS endpoints, whatever its
//! configuration says. It is therefore only started inside a private network namespace that
//! has nothing but loopback (`scripts/in-loopback-netns`): [`JavaKclWorker::start`] checks that
//! `/sys/class/net` lists `lo` alone and refuses to start otherwise
//! ([`JavaKclError::NotInLoopbackNamespace`]). The emulators and our workers run in the same
//! namespace.
//!
//! The daemon's process group (the JVM and its Python children) is killed when the fixture is
//! dropped, and a small watchdog in that group kills it within about a second when the test
//! process exits without unwinding. Every wait of the fixture is bounded; it runs on the real
//! clock, since it waits for an external process.

use crate::emulators::{kill_group_and_wait, spawn_watchdog};
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use rustix::process::{Pid, Signal, kill_process_group};

use crate::emulators::{REGION, emulators_dir};

/// Set (to `1`) by `scripts/in-loopback-netns` inside the namespace it creates.
pub const NETNS_ENV: &str = "KCL_LOOPBACK_NETNS";

/// The environment variable naming the processor's record log.
const RECORD_LOG_ENV: &str = "KCL_JAVA_RECORD_LOG";
/// The environment variable naming the worker in the record log.
const WORKER_ID_ENV: &str = "KCL_JAVA_WORKER_ID";
/// The environment variable choosing the processor's checkpoint mode.
const CHECKPOINT_ENV: &str = "KCL_JAVA_CHECKPOINT";
/// Pause between two checks in the bounded waits.
const POLL: Duration = Duration::from_millis(50);
/// Lines of the daemon's output quoted in errors.
const LOG_TAIL_LINES: usize = 40;

/// Numbers the working directories of the daemons started by this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Which lease protocol the Java KCL 3.x runs (its `clientVersionConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ClientVersion {
    /// `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X`: the 2.x lease taker, compatible with 2.x
    /// workers (and with ours).
    CompatibleWith2x,
    /// `CLIENT_VERSION_CONFIG_3X`: a leader assigns the leases; no taker.
    V3x,
}

impl ClientVersion {
    /// The property value.
    pub fn property(self) -> &'static str {
        match self {
            Self::CompatibleWith2x => "CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X",
            Self::V3x => "CLIENT_VERSION_CONFIG_3X",
        }
    }
}

/// When the Java side's processor checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JavaCheckpoint {
    /// After every batch (at its last record), at a shard's end and on a requested shutdown.
    EveryBatch,
    /// Once, at the first record with this sub-sequence number (inside a KPL aggregate), then
    /// never again except at a shard's end.
    AtSubSequence(u64),
}

/// How to start a Java KCL worker.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct JavaKclOptions {
    /// `applicationName`: also the lease table's name.
    pub application_name: String,
    /// `streamName`.
    pub stream_name: String,
    /// `workerId`.
    pub worker_id: String,
    /// `kinesisClient.endpointOverride`.
    pub kinesis_endpoint: String,
    /// `dynamoDbClient.endpointOverride`.
    pub dynamodb_endpoint: String,
    /// `failoverTimeMillis`.
    pub failover_time: Duration,
    /// `idleTimeBetweenReadsInMillis`.
    pub idle_time_between_reads: Duration,
    /// `shutdownGraceMillis`.
    pub shutdown_grace: Duration,
    /// `shardSyncIntervalMillis`.
    pub shard_sync_interval: Duration,
    /// `clientVersionConfig`.
    pub client_version: ClientVersion,
    /// The processor's checkpoint mode.
    pub checkpoint: JavaCheckpoint,
    /// More `key = value` properties, written after the others.
    pub extra_properties: Vec<(String, String)>,
    /// Where `scripts/install-java-kcl` installed it (`<dir>/java-kcl`); defaults to
    /// [`emulators_dir`].
    pub install_dir: PathBuf,
}

impl JavaKclOptions {
    /// Options for a worker of `application_name` on `stream_name` against the given
    /// endpoints, with short test timings (failover 3 s), the 2.x-compatible protocol and a
    /// checkpoint after every batch.
    pub fn new(
        application_name: impl Into<String>,
        stream_name: impl Into<String>,
        worker_id: impl Into<String>,
        kinesis_endpoint: impl Into<String>,
        dynamodb_endpoint: impl Into<String>,
    ) -> Self {
        Self {
            application_name: application_name.into(),
            stream_name: stream_name.into(),
            worker_id: worker_id.into(),
            kinesis_endpoint: kinesis_endpoint.into(),
            dynamodb_endpoint: dynamodb_endpoint.into(),
            failover_time: Duration::from_secs(3),
            idle_time_between_reads: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(20),
            shard_sync_interval: Duration::from_secs(2),
            client_version: ClientVersion::CompatibleWith2x,
            checkpoint: JavaCheckpoint::EveryBatch,
            extra_properties: Vec::new(),
            install_dir: emulators_dir(),
        }
    }

    /// Sets `failoverTimeMillis`.
    pub fn failover_time(mut self, failover_time: Duration) -> Self {
        self.failover_time = failover_time;
        self
    }

    /// Sets `clientVersionConfig`.
    pub fn client_version(mut self, client_version: ClientVersion) -> Self {
        self.client_version = client_version;
        self
    }

    /// Sets the processor's checkpoint mode.
    pub fn checkpoint(mut self, checkpoint: JavaCheckpoint) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// Sets `shardSyncIntervalMillis`.
    pub fn shard_sync_interval(mut self, interval: Duration) -> Self {
        self.shard_sync_interval = interval;
        self
    }

    /// Adds a `key = value` property.
    pub fn property(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra_properties.push((key.into(), value.into()));
        self
    }

    /// The properties file's text, for `executable` (the processor's command line).
    pub fn properties(&self, executable: &str) -> String {
        let millis = |d: Duration| d.as_millis().to_string();
        let mut lines: Vec<(String, String)> = [
            ("executableName", executable.to_owned()),
            ("applicationName", self.application_name.clone()),
            ("streamName", self.stream_name.clone()),
            ("workerId", self.worker_id.clone()),
            (
                "kinesisClient.endpointOverride",
                self.kinesis_endpoint.clone(),
            ),
            (
                "dynamoDbClient.endpointOverride",
                self.dynamodb_endpoint.clone(),
            ),
            (
                "cloudWatchClient.endpointOverride",
                "http://127.0.0.1:9".to_owned(),
            ),
            ("regionName", REGION.to_owned()),
            (
                "AWSCredentialsProvider",
                "EnvironmentVariableCredentialsProvider".to_owned(),
            ),
            ("retrievalMode", "POLLING".to_owned()),
            ("initialPositionInStream", "TRIM_HORIZON".to_owned()),
            (
                "idleTimeBetweenReadsInMillis",
                millis(self.idle_time_between_reads),
            ),
            ("failoverTimeMillis", millis(self.failover_time)),
            ("shutdownGraceMillis", millis(self.shutdown_grace)),
            ("shardSyncIntervalMillis", millis(self.shard_sync_interval)),
            (
                "clientVersionConfig",
                self.client_version.property().to_owned(),
            ),
            ("metricsLevel", "NONE".to_owned()),
            ("disableWorkerMetrics", "true".to_owned()),
            ("processingLanguage", "python/3".to_owned()),
            ("maxRecords", "1000".to_owned()),
            ("parentShardPollIntervalMillis", "200".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        lines.extend(self.extra_properties.iter().cloned());
        let mut text = String::from("# Written by kcl-testkit's Java KCL fixture.\n");
        for (key, value) in lines {
            text.push_str(&key);
            text.push_str(" = ");
            text.push_str(&value);
            text.push('\n');
        }
        text
    }
}

/// Why the Java KCL could not be started or waited for.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JavaKclError {
    /// Not inside a loopback-only network namespace: the Java KCL is never started there.
    #[error(
        "refusing to start the Java KCL outside a loopback-only network namespace \
         (/sys/class/net lists {interfaces:?}); run the tests through scripts/in-loopback-netns \
         (scripts/java-interop does)"
    )]
    NotInLoopbackNamespace {
        /// The interfaces found.
        interfaces: Vec<String>,
    },
    /// The Java KCL, Java or the processor script is missing.
    #[error("the Java KCL is not installed ({} not found): {hint}", missing.display())]
    NotInstalled {
        /// What was looked for.
        missing: PathBuf,
        /// What to run.
        hint: String,
    },
    /// A file or process operation failed.
    #[error("{action}")]
    Io {
        /// What was being done.
        action: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The daemon did not exit within the time given after SIGTERM.
    #[error(
        "the Java KCL (pid {pid}) did not exit within {waited:?} of SIGTERM; last lines:\n{log_tail}"
    )]
    DidNotExit {
        /// The JVM's pid.
        pid: u32,
        /// How long it was given.
        waited: Duration,
        /// The last lines of its output.
        log_tail: String,
    },
    /// A line of the record log is not what the processor writes.
    #[error("malformed record log line {line}: {reason}")]
    MalformedLog {
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

fn io_error(action: impl Into<String>) -> impl FnOnce(io::Error) -> JavaKclError {
    let action = action.into();
    move |source| JavaKclError::Io { action, source }
}

/// One line of the processor's record log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JavaEvent {
    /// A processor was initialized for a shard, at this checkpoint.
    Initialize {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// The checkpoint's sequence number (or sentinel such as `TRIM_HORIZON`).
        sequence: Option<String>,
        /// The checkpoint's sub-sequence number.
        subsequence: Option<u64>,
    },
    /// A record was delivered.
    Record(JavaRecord),
    /// A checkpoint succeeded (`None`: at the last delivered record).
    Checkpoint {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// Sequence number asked for.
        sequence: Option<String>,
        /// Sub-sequence number asked for.
        subsequence: Option<u64>,
    },
    /// A checkpoint failed.
    CheckpointError {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// The error the daemon reported.
        error: String,
    },
    /// The processor was shut down: `lease_lost`, `shard_ended` or `shutdown_requested`.
    Shutdown {
        /// Worker id.
        worker: String,
        /// Shard id.
        shard: String,
        /// Why.
        reason: String,
    },
}

/// A record as the Java side's processor received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JavaRecord {
    /// Worker id.
    pub worker: String,
    /// Shard id.
    pub shard: String,
    /// Sequence number.
    pub sequence: String,
    /// Sub-sequence number (the index inside a KPL aggregate, else 0).
    pub subsequence: u64,
    /// Partition key.
    pub partition_key: String,
    /// The data, decoded.
    pub data: Vec<u8>,
}

fn parse_line(number: usize, line: &str) -> Result<JavaEvent, JavaKclError> {
    let malformed = |reason: String| JavaKclError::MalformedLog {
        line: number,
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| malformed(format!("not JSON ({e}): {line}")))?;
    let text = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let required = |name: &str| text(name).ok_or_else(|| malformed(format!("no {name}: {line}")));
    let number_of = |name: &str| value.get(name).and_then(serde_json::Value::as_u64);
    let worker = required("worker")?;
    let shard = required("shard")?;
    let event = required("event")?;
    Ok(match event.as_str() {
        "initialize" => JavaEvent::Initialize {
            worker,
            shard,
            sequence: text("sequence"),
            subsequence: number_of("subsequence"),
        },
        "record" => {
            let data = base64::engine::general_purpose::STANDARD
                .decode(required("data")?)
                .map_err(|e| malformed(format!("data is not base64 ({e})")))?;
            JavaEvent::Record(JavaRecord {
                worker,
                shard,
                sequence: required("sequence")?,
                subsequence: number_of("subsequence").unwrap_or(0),
                partition_key: required("partition_key")?,
                data,
            })
        }
        "checkpoint" => JavaEvent::Checkpoint {
            worker,
            shard,
            sequence: text("sequence"),
            subsequence: number_of("subsequence"),
        },
        "checkpoint_error" => JavaEvent::CheckpointError {
            worker,
            shard,
            error: text("error").unwrap_or_default(),
        },
        "shutdown" => JavaEvent::Shutdown {
            worker,
            shard,
            reason: required("reason")?,
        },
        other => return Err(malformed(format!("unknown event {other:?}"))),
    })
}

/// Reads a record log written by `scripts/java-kcl/processor.py`. A last line without its
/// newline (a processor killed while writing) is ignored.
pub fn read_record_log(path: &Path) -> Result<Vec<JavaEvent>, JavaKclError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(format!("reading {}", path.display()))(e)),
    };
    let text = String::from_utf8_lossy(&bytes);
    let complete = text
        .rfind('\n')
        .map_or("", |end| text.get(..end).unwrap_or(""));
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| parse_line(i + 1, line))
        .collect()
}

/// The network interfaces of this namespace, from `/sys/class/net`.
pub fn network_interfaces() -> Result<Vec<String>, JavaKclError> {
    let mut names = Vec::new();
    for entry in fs::read_dir("/sys/class/net").map_err(io_error("listing /sys/class/net"))? {
        let entry = entry.map_err(io_error("listing /sys/class/net"))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

/// Fails unless this process runs in a network namespace whose only interface is `lo`.
pub fn ensure_loopback_only() -> Result<(), JavaKclError> {
    let interfaces = network_interfaces()?;
    if interfaces.iter().all(|name| name == "lo") && !interfaces.is_empty() {
        Ok(())
    } else {
        Err(JavaKclError::NotInLoopbackNamespace { interfaces })
    }
}

/// The workspace root, known at compile time.
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.join(".."), Path::to_path_buf)
}

/// Where the installed pieces are.
#[derive(Debug, Clone)]
struct Installation {
    python: PathBuf,
    jars: PathBuf,
    processor: PathBuf,
}

impl Installation {
    fn find(install_dir: &Path) -> Result<Self, JavaKclError> {
        let base = install_dir.join("java-kcl");
        let script = workspace_root().join("scripts").join("install-java-kcl");
        let hint = format!(
            "run `KCL_EMULATORS_DIR={} {}`",
            install_dir.display(),
            script.display()
        );
        let python = base.join("venv").join("bin").join("python");
        let jars_file = base.join("jars-dir");
        let processor = workspace_root()
            .join("scripts")
            .join("java-kcl")
            .join("processor.py");
        for path in [&python, &jars_file, &processor] {
            if !path.is_file() {
                return Err(JavaKclError::NotInstalled {
                    missing: path.clone(),
                    hint,
                });
            }
        }
        let jars = PathBuf::from(
            fs::read_to_string(&jars_file)
                .map_err(io_error(format!("reading {}", jars_file.display())))?
                .trim(),
        );
        if !jars.is_dir() {
            return Err(JavaKclError::NotInstalled {
                missing: jars,
                hint,
            });
        }
        Ok(Self {
            python,
            jars,
            processor,
        })
    }
}

/// A running Java KCL worker (MultiLangDaemon), killed with its process group when dropped.
pub struct JavaKclWorker {
    worker_id: String,
    child: Child,
    watchdog: Option<Child>,
    dir: PathBuf,
    output_path: PathBuf,
    record_log: PathBuf,
    started_at: Instant,
    peak_rss_kib: AtomicU64,
    exited: Option<String>,
}

impl fmt::Debug for JavaKclWorker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JavaKclWorker")
            .field("worker_id", &self.worker_id)
            .field("pid", &self.child.id())
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl JavaKclWorker {
    /// Starts a Java KCL worker with `options`. Refuses to start outside a loopback-only
    /// network namespace.
    pub fn start(options: &JavaKclOptions) -> Result<Self, JavaKclError> {
        ensure_loopback_only()?;
        let installation = Installation::find(&options.install_dir)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join("kcl-java-kcl").join(format!(
            "{}-{}-{id}",
            options.worker_id,
            std::process::id()
        ));
        fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        let properties_path = dir.join("worker.properties");
        let executable = format!(
            "{} {}",
            installation.python.display(),
            installation.processor.display()
        );
        fs::write(&properties_path, options.properties(&executable))
            .map_err(io_error(format!("writing {}", properties_path.display())))?;
        let output_path = dir.join("daemon.log");
        let record_log = dir.join("records.jsonl");
        File::create(&record_log)
            .map_err(io_error(format!("creating {}", record_log.display())))?;
        let output = File::create(&output_path)
            .map_err(io_error(format!("creating {}", output_path.display())))?;
        let output_err = output
            .try_clone()
            .map_err(io_error(format!("opening {}", output_path.display())))?;
        let checkpoint = match options.checkpoint {
            JavaCheckpoint::EveryBatch => "batch".to_owned(),
            JavaCheckpoint::AtSubSequence(n) => format!("subsequence:{n}"),
        };
        let classpath = format!("{}/*", installation.jars.display());
        let mut command = Command::new("java");
        command
            .arg("-Daws.disableEc2Metadata=true")
            .arg("-cp")
            .arg(classpath)
            .arg("software.amazon.kinesis.multilang.MultiLangDaemon")
            .arg("--properties-file")
            .arg(&properties_path)
            .current_dir(&dir)
            .env("AWS_ACCESS_KEY_ID", "kcl-testkit-access-key")
            .env("AWS_SECRET_ACCESS_KEY", "kcl-testkit-secret-key")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(RECORD_LOG_ENV, &record_log)
            .env(WORKER_ID_ENV, &options.worker_id)
            .env(CHECKPOINT_ENV, checkpoint)
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(output))
            .stderr(Stdio::from(output_err))
            .process_group(0);
        let started_at = Instant::now();
        let mut child = command.spawn().map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                JavaKclError::NotInstalled {
                    missing: PathBuf::from("java"),
                    hint: "put Java >= 17 (`java`) on PATH".to_owned(),
                }
            } else {
                JavaKclError::Io {
                    action: "spawning java".to_owned(),
                    source,
                }
            }
        })?;
        let watchdog = match spawn_watchdog(child.id(), "kcl-java-kcl-watchdog") {
            Ok(watchdog) => watchdog,
            Err(source) => {
                kill_group_and_wait(&mut child);
                return Err(JavaKclError::Io {
                    action: "spawning the watchdog".to_owned(),
                    source,
                });
            }
        };
        Ok(Self {
            worker_id: options.worker_id.clone(),
            child,
            watchdog: Some(watchdog),
            dir,
            output_path,
            record_log,
            started_at,
            peak_rss_kib: AtomicU64::new(0),
            exited: None,
        })
    }

    /// The worker id.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// The JVM's pid (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When the process was spawned.
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// The daemon's standard output and error.
    pub fn output_path(&self) -> &Path {
        &self.output_path
    }

    /// The processor's record log.
    pub fn record_log_path(&self) -> &Path {
        &self.record_log
    }

    /// The last lines of the daemon's output.
    pub fn output_tail(&self) -> String {
        log_tail(&self.output_path)
    }

    /// Every event the processors logged so far.
    pub fn events(&self) -> Result<Vec<JavaEvent>, JavaKclError> {
        read_record_log(&self.record_log)
    }

    /// Every record the processors received so far, in the order they logged them.
    pub fn records(&self) -> Result<Vec<JavaRecord>, JavaKclError> {
        Ok(self
            .events()?
            .into_iter()
            .filter_map(|e| match e {
                JavaEvent::Record(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Whether the JVM is still running (`None` once it exited, with its status).
    pub fn exit_status(&mut self) -> Option<String> {
        if self.exited.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited = Some(status.to_string());
        }
        self.exited.clone()
    }

    /// The peak resident set size of the JVM plus its children (`VmHWM` in `/proc`, summed
    /// over the process group), in KiB, the largest seen by any call so far: call it now and
    /// then while the worker runs.
    pub fn peak_rss_kib(&self) -> u64 {
        let now = group_vm_hwm_kib(self.child.id());
        self.peak_rss_kib.fetch_max(now, Ordering::Relaxed).max(now)
    }

    /// SIGKILL to the whole process group (a crash), then reaps the JVM.
    pub fn kill(&mut self) {
        let _ = self.peak_rss_kib();
        kill_group_and_wait(&mut self.child);
        self.exited.get_or_insert_with(|| "killed".to_owned());
        self.stop_watchdog();
    }

    /// SIGTERM to the JVM (the daemon's graceful shutdown), then waits at most `limit` for it
    /// to exit; returns how long it took. On time-out the group is killed and an error
    /// returned.
    pub fn terminate(&mut self, limit: Duration) -> Result<Duration, JavaKclError> {
        let _ = self.peak_rss_kib();
        let signalled = Instant::now();
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status.to_string());
                    let took = signalled.elapsed();
                    // The Python children may outlive the JVM by a moment.
                    if let Some(group) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw)
                    {
                        let _ = kill_process_group(group, Signal::KILL);
                    }
                    self.stop_watchdog();
                    return Ok(took);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(JavaKclError::Io {
                        action: format!("waiting for pid {}", self.child.id()),
                        source,
                    });
                }
            }
            if signalled.elapsed() >= limit {
                let log_tail = self.output_tail();
                self.kill();
                return Err(JavaKclError::DidNotExit {
                    pid: self.child.id(),
                    waited: limit,
                    log_tail,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for JavaKclWorker {
    fn drop(&mut self) {
        kill_group_and_wait(&mut self.child);
        self.stop_watchdog();
        if std::env::var_os(crate::emulators::KEEP_LOGS_ENV).is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The sum of `VmHWM` over the processes of process group `group`, in KiB.
fn group_vm_hwm_kib(group: u32) -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state, ppid, pgrp, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let pgrp = rest
            .split_whitespace()
            .nth(2)
            .and_then(|p| p.parse::<u32>().ok());
        if pgrp != Some(group) {
            continue;
        }
        // The watchdog shell is in the group too; it counts for a few hundred KiB at most.
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        if let Some(kib) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += kib;
        }
    }
    total
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_name_the_endpoints_and_the_mode() {
        let options = JavaKclOptions::new(
            "app",
            "stream",
            "j1",
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
        )
        .client_version(ClientVersion::V3x)
        .property("maxLeasesForWorker", "3");
        let text = options.properties("python3 p.py");
        for line in [
            "executableName = python3 p.py",
            "applicationName = app",
            "streamName = stream",
            "workerId = j1",
            "kinesisClient.endpointOverride = http://127.0.0.1:1",
            "dynamoDbClient.endpointOverride = http://127.0.0.1:2",
            "cloudWatchClient.endpointOverride = http://127.0.0.1:9",
            "retrievalMode = POLLING",
            "failoverTimeMillis = 3000",
            "clientVersionConfig = CLIENT_VERSION_CONFIG_3X",
            "metricsLevel = NONE",
            "disableWorkerMetrics = true",
            "AWSCredentialsProvider = EnvironmentVariableCredentialsProvider",
            "regionName = us-east-1",
            "initialPositionInStream = TRIM_HORIZON",
            "maxLeasesForWorker = 3",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }

    #[test]
    fn the_record_log_is_parsed_and_a_torn_last_line_ignored() {
        let path = std::env::temp_dir().join(format!("kcl-java-log-{}.jsonl", std::process::id()));
        fs::write(
            &path,
            concat!(
                r#"{"event": "initialize", "sequence": "TRIM_HORIZON", "shard": "s", "subsequence": 0, "worker": "j"}"#,
                "\n",
                r#"{"data": "aGk=", "event": "record", "partition_key": "k", "sequence": "1", "shard": "s", "subsequence": 2, "worker": "j"}"#,
                "\n",
                r#"{"event": "shutdown", "reason": "shard_ended", "shard": "s", "worker": "j"}"#,
                "\n",
                r#"{"event": "rec"#,
            ),
        )
        .unwrap();
        let events = read_record_log(&path).unwrap();
        fs::remove_file(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(
            events[1],
            JavaEvent::Record(JavaRecord {
                worker: "j".into(),
                shard: "s".into(),
                sequence: "1".into(),
                subsequence: 2,
                partition_key: "k".into(),
                data: b"hi".to_vec(),
            })
        );
        assert!(
            matches!(&events[2], JavaEvent::Shutdown { reason, .. } if reason == "shard_ended")
        );
    }

    #[test]
    fn the_fixture_refuses_outside_a_loopback_only_namespace() {
        let interfaces = network_interfaces().unwrap();
        let only_lo = interfaces.iter().all(|i| i == "lo");
        let options =
            JavaKclOptions::new("a", "s", "j", "http://127.0.0.1:1", "http://127.0.0.1:2");
        if !only_lo {
            let err = JavaKclWorker::start(&options).unwrap_err();
            assert!(
                matches!(err, JavaKclError::NotInLoopbackNamespace { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("in-loopback-netns"), "{err}");
        } else {
            assert!(ensure_loopback_only().is_ok());
        }
    }
}
