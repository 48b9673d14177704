//! A consumer for AWS or local emulators: prints every record as one JSON line on stdout,
//! checkpoints after every batch and at shard end, and shuts down gracefully (releasing its
//! leases) on SIGINT or SIGTERM.
//!
//! ```text
//! cargo run -q -p kcl-examples --bin consumer -- --stream NAME --application NAME --region REGION \
//!     [--kinesis-endpoint URL] [--dynamodb-endpoint URL] \
//!     [--initial-position trim-horizon|latest|at-timestamp:RFC3339] [--worker-id ID] [--failover-time-ms N] \
//!     [--call-timeout MS] [--call-attempt-timeout MS] [--no-lease-owner-index] \
//!     [--client-version 2x|3x] [--disable-worker-metrics] \
//!     [--retrieval polling|fan-out] [--consumer-name NAME] \
//!     [--format json|raw|text] [--health ADDR] \
//!     [--metrics prometheus:ADDR] [--metrics cloudwatch [--cloudwatch-endpoint URL] [--metrics-buffer-time-ms MS]] \
//!     [--metrics-level NONE|SUMMARY|DETAILED] [--metrics-enabled-dimensions D,...]
//! ```
//!
//! Output (`--format`, like kcat's): `json` (the default) one JSON object per record with
//! `shard_id`, `sequence_number`, `sub_sequence_number`, `partition_key`, `data_b64`; `raw`
//! the record's data followed by a newline; `text` one line per record,
//! `SHARD SEQUENCE[.SUB] PARTITION_KEY DATA` with the data as UTF-8 (lossy, newlines escaped).
//!
//! When stderr is a terminal a progress line there shows records per second, shards held
//! and the largest milliseconds behind; otherwise stderr has only the log. `--health ADDR`
//! serves `GET /health`: the worker's shard health as JSON, 200 while no shard has failed
//! 3 reads in a row, else 503. `--metrics` publishes the metrics, named as the Java KCL's,
//! at `http://ADDR/metrics` for Prometheus and/or to CloudWatch (namespace: the application
//! name); give it once per sink.
//!
//! An option that would have no effect is a usage error (exit 2) naming it: the metrics
//! options without `--metrics`, `--cloudwatch-endpoint` and `--metrics-buffer-time-ms`
//! without `--metrics cloudwatch`, a `--metrics` sink given twice, `--consumer-name` without
//! `--retrieval fan-out`.
//!
//! `--retrieval fan-out` reads by enhanced fan-out (SubscribeToShard) with the stream consumer
//! `--consumer-name` (default: the application name), registered at start when missing and
//! never deregistered; `polling` (the default) uses GetRecords.
//!
//! A lease table it creates gets the `LeaseOwnerToLeaseKeyIndex` index the Java KCL 3.x
//! needs, unless `--no-lease-owner-index`.
//!
//! `--client-version` is the Java KCL's `clientVersionConfig`: `2x` (the default,
//! `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X`) runs the 2.x lease taker and follows the
//! application's migration to 3.x; `3x` (`CLIENT_VERSION_CONFIG_3X`) runs the 3.x protocol:
//! a leader elected with the `Leader` item of `<app>-CoordinatorState` assigns the leases.
//! Either way the version stored in `<app>-CoordinatorState` (`Migration3.0`) decides, as
//! for a Java worker; the log names the version run and when this worker becomes the
//! leader. `--disable-worker-metrics` writes the `<app>-WorkerMetricStats` row without CPU
//! utilisation (the leader then balances this worker by throughput alone).
//!
//! It exits 0 after SIGINT or SIGTERM even when Kinesis or DynamoDB hang: shutdown is bounded
//! (`shutdown_grace` plus one call timeout) and leases it could not release are logged.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use clap::{CommandFactory, Parser};
use kcl_interfaces::{
    CheckpointErrorKind, InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput,
    ShutdownReason,
};
use kcl_worker::aws::AwsOptions;
use kcl_worker::export::MetricsConfig;
use kcl_worker::export::cloudwatch::CloudWatchPublisher;
use kcl_worker::export::http::{HttpServer, Response};
use kcl_worker::export::prometheus::PrometheusEndpoint;
use kcl_worker::{
    ClientVersionConfig, FanOutConfig, InitialPosition, RetrievalConfig, ShardHealth, Worker,
    WorkerConfig, WorkerHandle,
};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(about = "Consume a Kinesis stream with the KCL for Rust, printing records as JSON lines")]
struct Args {
    /// The stream to consume.
    #[arg(long)]
    stream: String,
    /// The application name (also the lease table name).
    #[arg(long)]
    application: String,
    /// The AWS region.
    #[arg(long)]
    region: String,
    /// Kinesis endpoint URL (e.g. an emulator on http://127.0.0.1:4567).
    #[arg(long)]
    kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint URL (e.g. an emulator on http://127.0.0.1:4568).
    #[arg(long)]
    dynamodb_endpoint: Option<String>,
    /// trim-horizon, latest or at-timestamp:RFC3339.
    #[arg(long, default_value = "latest", value_parser = parse_position)]
    initial_position: InitialPosition,
    /// This worker's id (default: host name + random suffix).
    #[arg(long)]
    worker_id: Option<String>,
    /// Lease failover time in milliseconds.
    #[arg(long)]
    failover_time_ms: Option<u64>,
    /// Bound on a whole Kinesis or DynamoDB call, retries included, in milliseconds
    /// (default 10000).
    #[arg(long)]
    call_timeout: Option<u64>,
    /// Bound on one attempt of a Kinesis or DynamoDB call, in milliseconds (default 4000).
    #[arg(long)]
    call_attempt_timeout: Option<u64>,
    /// Create the lease table (when it does not exist) without the LeaseOwnerToLeaseKeyIndex
    /// global secondary index.
    #[arg(long)]
    no_lease_owner_index: bool,
    /// The lease protocol (clientVersionConfig): 2x (compatible with the KCL 2.x: the lease
    /// taker, following a migration to 3.x) or 3x (a leader assigns the leases). The
    /// version stored in `<app>-CoordinatorState` decides once it exists.
    #[arg(long, default_value = "2x", value_parser = parse_client_version)]
    client_version: ClientVersionConfig,
    /// Write the WorkerMetricStats row without CPU utilisation (disableWorkerMetrics).
    #[arg(long)]
    disable_worker_metrics: bool,
    /// How records are read: polling (GetRecords) or fan-out (enhanced fan-out,
    /// SubscribeToShard).
    #[arg(long, default_value = "polling", value_parser = ["polling", "fan-out"])]
    retrieval: String,
    /// The enhanced fan-out consumer name (default: the application name); only with
    /// `--retrieval fan-out`.
    #[arg(long)]
    consumer_name: Option<String>,
    /// What stdout gets per record: json, raw or text.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Serve the worker's shard health at http://ADDR/health (e.g. 127.0.0.1:8080).
    #[arg(long)]
    health: Option<std::net::SocketAddr>,
    /// Publish metrics: `prometheus:ADDR` (scrape at http://ADDR/metrics) or `cloudwatch`.
    /// Give it twice to publish to both (each sink once).
    #[arg(long = "metrics", value_parser = parse_metrics)]
    metrics: Vec<MetricsSink>,
    /// metricsLevel: NONE, SUMMARY or DETAILED (default DETAILED); only with --metrics.
    #[arg(long)]
    metrics_level: Option<kcl_worker::metrics::MetricsLevel>,
    /// metricsEnabledDimensions, comma-separated (default: all; Operation is always kept);
    /// only with --metrics.
    #[arg(long, value_delimiter = ',')]
    metrics_enabled_dimensions: Option<Vec<String>>,
    /// CloudWatch endpoint URL (e.g. moto on http://127.0.0.1:5000); only with
    /// --metrics cloudwatch.
    #[arg(long)]
    cloudwatch_endpoint: Option<String>,
    /// metricsBufferTimeMillis: how long CloudWatch data points are buffered (default
    /// 10000); only with --metrics cloudwatch.
    #[arg(long)]
    metrics_buffer_time_ms: Option<u64>,
}

/// What stdout gets per record.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Format {
    /// One JSON object per record.
    #[default]
    Json,
    /// The record's data and a newline.
    Raw,
    /// `SHARD SEQUENCE[.SUB] PARTITION_KEY DATA`.
    Text,
}

/// Where `--metrics` publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum MetricsSink {
    Prometheus(std::net::SocketAddr),
    CloudWatch,
}

fn parse_metrics(s: &str) -> Result<MetricsSink, String> {
    if s == "cloudwatch" {
        return Ok(MetricsSink::CloudWatch);
    }
    match s.strip_prefix("prometheus:") {
        Some(addr) => addr
            .parse()
            .map(MetricsSink::Prometheus)
            .map_err(|e| format!("{addr:?} is not an address like 127.0.0.1:9464: {e}")),
        None => Err(format!("{s:?}: expected prometheus:ADDR or cloudwatch")),
    }
}

impl MetricsSink {
    /// The `--metrics` value naming this kind of sink.
    fn kind(&self) -> &'static str {
        match self {
            MetricsSink::Prometheus(_) => "prometheus:ADDR",
            MetricsSink::CloudWatch => "cloudwatch",
        }
    }
}

/// Refuses options that would be accepted and have no effect: `--consumer-name` without
/// fan-out, the metrics options without the sink they configure, a sink given twice. The
/// message names the option.
fn check_args(args: &Args) -> Result<(), String> {
    if args.consumer_name.is_some() && args.retrieval != "fan-out" {
        return Err("--consumer-name needs --retrieval fan-out".to_owned());
    }
    let given = |name: &'static str, present: bool| present.then_some(name);
    let metrics_options = [
        given("--metrics-level", args.metrics_level.is_some()),
        given(
            "--metrics-enabled-dimensions",
            args.metrics_enabled_dimensions.is_some(),
        ),
        given(
            "--metrics-buffer-time-ms",
            args.metrics_buffer_time_ms.is_some(),
        ),
        given("--cloudwatch-endpoint", args.cloudwatch_endpoint.is_some()),
    ];
    if args.metrics.is_empty()
        && let Some(option) = metrics_options.iter().flatten().next()
    {
        return Err(format!(
            "{option} needs --metrics (prometheus:ADDR or cloudwatch): without it no metrics are published"
        ));
    }
    let mut kinds = std::collections::BTreeSet::new();
    for sink in &args.metrics {
        if !kinds.insert(sink.kind()) {
            return Err(format!(
                "--metrics {} given twice: each sink can be given once",
                sink.kind()
            ));
        }
    }
    if !args.metrics.contains(&MetricsSink::CloudWatch) {
        let cloudwatch_only = [
            given("--cloudwatch-endpoint", args.cloudwatch_endpoint.is_some()),
            given(
                "--metrics-buffer-time-ms",
                args.metrics_buffer_time_ms.is_some(),
            ),
        ];
        if let Some(option) = cloudwatch_only.iter().flatten().next() {
            return Err(format!(
                "{option} needs --metrics cloudwatch (it configures the CloudWatch publisher only)"
            ));
        }
    }
    Ok(())
}

fn parse_client_version(s: &str) -> Result<ClientVersionConfig, String> {
    match s {
        "2x" => Ok(ClientVersionConfig::CompatibleWith2x),
        "3x" => Ok(ClientVersionConfig::V3x),
        other => Err(format!("{other:?}: expected 2x or 3x")),
    }
}

fn parse_position(s: &str) -> Result<InitialPosition, String> {
    match s {
        "trim-horizon" => Ok(InitialPosition::TrimHorizon),
        "latest" => Ok(InitialPosition::Latest),
        other => {
            let ts = other.strip_prefix("at-timestamp:").ok_or_else(|| {
                format!("{other:?}: expected trim-horizon, latest or at-timestamp:RFC3339")
            })?;
            let dt = aws_smithy_types::DateTime::from_str(
                ts,
                aws_smithy_types::date_time::Format::DateTime,
            )
            .map_err(|e| format!("{ts:?} is not an RFC 3339 time: {e}"))?;
            let t = SystemTime::try_from(dt).map_err(|e| format!("{ts:?}: {e}"))?;
            Ok(InitialPosition::AtTimestamp(t))
        }
    }
}

/// Prints records in the chosen format and counts them (for the progress line).
struct JsonLines {
    shard_id: String,
    format: Format,
    printed: Arc<AtomicU64>,
}

impl JsonLines {
    fn line(&self, r: &kcl_kpl::Record, out: &mut Vec<u8>) {
        match self.format {
            Format::Json => out.extend_from_slice(
                format!(
                    "{{\"shard_id\":{},\"sequence_number\":\"{}\",\"sub_sequence_number\":{},\"partition_key\":{},\"data_b64\":\"{}\"}}\n",
                    json_string(&self.shard_id),
                    r.sequence_number,
                    r.sub_sequence_number,
                    json_string(&r.partition_key),
                    base64::engine::general_purpose::STANDARD.encode(&r.data),
                )
                .as_bytes(),
            ),
            Format::Raw => {
                out.extend_from_slice(&r.data);
                out.push(b'\n');
            }
            Format::Text => {
                let sub = if r.sub_sequence_number == 0 {
                    String::new()
                } else {
                    format!(".{}", r.sub_sequence_number)
                };
                let data = String::from_utf8_lossy(&r.data)
                    .replace('\\', "\\\\")
                    .replace('\n', "\\n")
                    .replace('\r', "\\r");
                out.extend_from_slice(
                    format!(
                        "{} {}{sub} {} {data}\n",
                        self.shard_id, r.sequence_number, r.partition_key
                    )
                    .as_bytes(),
                );
            }
        }
    }
}

impl RecordProcessor for JsonLines {
    async fn initialize(&mut self, input: InitializationInput) {
        info!(shard_id = %input.shard_id, checkpoint = %input.extended_sequence_number, "processing shard");
        self.shard_id = input.shard_id;
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let mut out = Vec::new();
        for r in &input.records {
            self.line(r, &mut out);
        }
        // The lock is not `Send`: release it (end of the block) before awaiting.
        let written = {
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out).and_then(|()| stdout.flush())
        };
        self.printed
            .fetch_add(input.records.len() as u64, Ordering::Relaxed);
        if let Err(e) = written {
            error!(error = %e, "writing to stdout failed; not checkpointing");
            return;
        }
        checkpoint(&self.shard_id, input.checkpointer.checkpoint().await);
    }

    async fn shutdown(&mut self, input: ShutdownInput) {
        info!(shard_id = %self.shard_id, reason = ?input.shutdown_reason, "shutting down");
        if input.shutdown_reason != ShutdownReason::Zombie {
            checkpoint(&self.shard_id, input.checkpointer.checkpoint().await);
        }
    }
}

fn checkpoint(shard_id: &str, result: Result<(), kcl_interfaces::CheckpointError>) {
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == CheckpointErrorKind::Shutdown => {
            info!(shard_id, "lease lost; not checkpointing")
        }
        Err(e) => warn!(shard_id, error = %e, "checkpoint failed"),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the consumer");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The exporters `--metrics` started (kept alive while the worker runs).
#[derive(Default)]
struct Exporters {
    prometheus: Option<PrometheusEndpoint>,
    cloudwatch: Option<CloudWatchPublisher>,
}

async fn start_metrics(
    args: &Args,
    aws: &AwsOptions,
) -> Result<Exporters, Box<dyn std::error::Error>> {
    let mut exporters = Exporters::default();
    if args.metrics.is_empty() {
        return Ok(exporters);
    }
    let mut config = MetricsConfig::new(args.application.clone());
    if let Some(level) = args.metrics_level {
        config = config.with_metrics_level(level);
    }
    if let Some(dims) = &args.metrics_enabled_dimensions {
        config = config.with_metrics_enabled_dimensions(dims.iter().cloned());
    }
    if let Some(ms) = args.metrics_buffer_time_ms {
        config = config.with_metrics_buffer_time(Duration::from_millis(ms));
    }
    config.validate()?;
    let mut recorders: Vec<Box<dyn metrics::Recorder + Send + Sync>> = Vec::new();
    for sink in &args.metrics {
        match sink {
            MetricsSink::Prometheus(addr) => {
                let mut endpoint = PrometheusEndpoint::bind(*addr).await?;
                if let Some(recorder) = endpoint.take_recorder() {
                    recorders.push(Box::new(recorder));
                }
                info!(url = %format!("http://{}/metrics", endpoint.local_addr()), "serving Prometheus metrics");
                exporters.prometheus = Some(endpoint);
            }
            MetricsSink::CloudWatch => {
                let sdk = aws.load_sdk_config().await?;
                let client = kcl_worker::export::cloudwatch::client(
                    &sdk,
                    args.cloudwatch_endpoint.as_deref(),
                    &config,
                );
                let (publisher, recorder) = CloudWatchPublisher::start(client, &config)?;
                recorders.push(Box::new(recorder));
                info!(namespace = %config.namespace, "publishing metrics to CloudWatch");
                exporters.cloudwatch = Some(publisher);
            }
        }
    }
    kcl_worker::export::install(recorders, &config)?;
    Ok(exporters)
}

/// The worker handle, shared with the health endpoint and the progress line until shutdown.
type SharedHandle = Arc<Mutex<Option<WorkerHandle>>>;

fn shard_health(handle: &SharedHandle) -> Option<Vec<ShardHealth>> {
    handle
        .lock()
        .ok()
        .and_then(|h| h.as_ref().map(WorkerHandle::shard_health))
}

/// A shard whose reads failed this many times in a row makes `/health` answer 503.
const UNHEALTHY_AFTER_FAILURES: u32 = 3;

fn health_response(handle: &SharedHandle, path: &str) -> Response {
    if path != "/health" && path != "/" {
        return Response::text(404, "not found; health is at /health\n");
    }
    let Some(shards) = shard_health(handle) else {
        return Response::text(503, "shutting down\n");
    };
    let now = SystemTime::now();
    let healthy = shards
        .iter()
        .all(|s| s.consecutive_failures < UNHEALTHY_AFTER_FAILURES);
    let entries: Vec<String> = shards
        .iter()
        .map(|s| {
            let since = s
                .last_success
                .and_then(|t| now.duration_since(t).ok())
                .map_or("null".to_owned(), |d| d.as_millis().to_string());
            let error = s
                .last_error
                .as_ref()
                .map_or("null".to_owned(), |e| json_string(&e.message));
            format!(
                "{{\"shard_id\":{},\"millis_behind_latest\":{},\"consecutive_failures\":{},\"millis_since_last_success\":{since},\"last_error\":{error}}}",
                json_string(&s.shard_id),
                s.millis_behind_latest.map_or("null".to_owned(), |m| m.to_string()),
                s.consecutive_failures,
            )
        })
        .collect();
    let body = format!(
        "{{\"status\":\"{}\",\"shards\":[{}]}}\n",
        if healthy { "ok" } else { "failing" },
        entries.join(",")
    );
    Response {
        status: if healthy { 200 } else { 503 },
        content_type: "application/json",
        body,
    }
}

/// Repaints the progress line on stderr every second: records/s, shards held, max behind.
async fn progress(handle: SharedHandle, printed: Arc<AtomicU64>) {
    let mut last = (Instant::now(), printed.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(shards) = shard_health(&handle) else {
            return;
        };
        let now = (Instant::now(), printed.load(Ordering::Relaxed));
        let secs = now
            .0
            .saturating_duration_since(last.0)
            .as_secs_f64()
            .max(1e-3);
        let rate = (now.1.saturating_sub(last.1)) as f64 / secs;
        last = now;
        let behind = shards
            .iter()
            .filter_map(|s| s.millis_behind_latest)
            .max()
            .unwrap_or(0);
        eprint!(
            "\r\x1b[2K{rate:.0} records/s, {} shards held, max {behind} ms behind, {} records in all",
            shards.len(),
            now.1
        );
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut b = WorkerConfig::builder(args.application.clone(), args.stream.clone())
        .initial_position(args.initial_position);
    b.set_worker_id(args.worker_id.clone());
    b.set_failover_time(args.failover_time_ms.map(Duration::from_millis));
    b.set_call_timeout(args.call_timeout.map(Duration::from_millis));
    b.set_call_attempt_timeout(args.call_attempt_timeout.map(Duration::from_millis));
    b.set_client_version_config(Some(args.client_version));
    b.set_disable_worker_metrics(Some(args.disable_worker_metrics));
    if args.retrieval == "fan-out" {
        let mut fan_out = FanOutConfig::new();
        fan_out.consumer_name = args.consumer_name.clone();
        b.set_retrieval_specific_config(Some(RetrievalConfig::FanOut(fan_out)));
    }
    let config = b.build()?;
    let mut aws = AwsOptions::new()
        .with_region(args.region.clone())
        .with_lease_owner_index(!args.no_lease_owner_index);
    aws.kinesis_endpoint = args.kinesis_endpoint.clone();
    aws.dynamodb_endpoint = args.dynamodb_endpoint.clone();
    let exporters = start_metrics(&args, &aws).await?;
    info!(worker_id = %config.worker_id, "starting");
    let printed = Arc::new(AtomicU64::new(0));
    let (format, counter) = (args.format, Arc::clone(&printed));
    let factory = move || JsonLines {
        shard_id: String::new(),
        format,
        printed: Arc::clone(&counter),
    };
    let worker = Worker::builder(config, factory)
        .aws(aws)
        .build()
        .await?
        .start()
        .await?;
    match worker.client_version() {
        Some(version) => info!(client_version = %version, "running the stored client version"),
        None => info!("no KCL 3.x state tables: running the 2.x protocol"),
    }
    let handle: SharedHandle = Arc::new(Mutex::new(Some(worker)));
    let _health: Option<HttpServer> = match args.health {
        Some(addr) => {
            let shared = Arc::clone(&handle);
            let server =
                kcl_worker::export::http::serve(addr, move |path| health_response(&shared, path))
                    .await?;
            info!(url = %format!("http://{}/health", server.local_addr()), "serving shard health");
            Some(server)
        }
        None => None,
    };
    let progress_task = std::io::stderr()
        .is_terminal()
        .then(|| tokio::spawn(progress(Arc::clone(&handle), Arc::clone(&printed))));
    shutdown_signal().await;
    if let Some(task) = progress_task {
        task.abort();
        eprintln!();
    }
    info!("signal received; shutting down gracefully");
    let taken = handle.lock().ok().and_then(|mut h| h.take());
    let Some(worker) = taken else {
        return Err("the worker handle was lost".into());
    };
    let report = worker.shutdown().await?;
    if let Some(publisher) = exporters.cloudwatch {
        let stats = publisher.shutdown().await;
        info!(
            sent = stats.sent,
            failed = stats.failed,
            dropped = stats.dropped,
            "CloudWatch publisher stopped"
        );
    }
    drop(exporters.prometheus);
    if !report.is_clean() {
        warn!(
            aborted_processors = report.aborted_processors,
            leases_not_released = report.leases_not_released.len(),
            "shutdown was not clean; unreleased leases are taken by other workers after the failover time"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    if let Err(msg) = check_args(&args) {
        Args::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit();
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            eprintln!("consumer: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [&str; 7] = [
        "consumer",
        "--stream",
        "s",
        "--application",
        "a",
        "--region",
        "us-east-1",
    ];

    /// What `check_args` says of the base arguments and `extra`.
    fn checked(extra: &[&str]) -> Result<(), String> {
        let args = Args::try_parse_from(BASE.iter().chain(extra)).unwrap();
        check_args(&args)
    }

    #[test]
    fn metrics_options_without_metrics_are_refused() {
        for (extra, option) in [
            (&["--metrics-level", "SUMMARY"][..], "--metrics-level"),
            (
                &["--metrics-enabled-dimensions", "Operation,ShardId"][..],
                "--metrics-enabled-dimensions",
            ),
            (
                &["--metrics-buffer-time-ms", "500"][..],
                "--metrics-buffer-time-ms",
            ),
            (
                &["--cloudwatch-endpoint", "http://127.0.0.1:1"][..],
                "--cloudwatch-endpoint",
            ),
        ] {
            let err = checked(extra).unwrap_err();
            assert_eq!(
                err,
                format!(
                    "{option} needs --metrics (prometheus:ADDR or cloudwatch): without it no metrics are published"
                )
            );
        }
    }

    #[test]
    fn cloudwatch_options_without_the_cloudwatch_sink_are_refused() {
        for (extra, option) in [
            (
                &[
                    "--metrics",
                    "prometheus:127.0.0.1:0",
                    "--cloudwatch-endpoint",
                    "http://127.0.0.1:1",
                ][..],
                "--cloudwatch-endpoint",
            ),
            (
                &[
                    "--metrics",
                    "prometheus:127.0.0.1:0",
                    "--metrics-buffer-time-ms",
                    "500",
                ][..],
                "--metrics-buffer-time-ms",
            ),
        ] {
            assert_eq!(
                checked(extra).unwrap_err(),
                format!(
                    "{option} needs --metrics cloudwatch (it configures the CloudWatch publisher only)"
                )
            );
        }
    }

    #[test]
    fn a_metrics_sink_given_twice_is_refused() {
        assert_eq!(
            checked(&[
                "--metrics",
                "prometheus:127.0.0.1:0",
                "--metrics",
                "prometheus:127.0.0.1:1",
            ])
            .unwrap_err(),
            "--metrics prometheus:ADDR given twice: each sink can be given once"
        );
        assert_eq!(
            checked(&[
                "--metrics",
                "cloudwatch",
                "--metrics",
                "prometheus:127.0.0.1:0",
                "--metrics",
                "cloudwatch",
            ])
            .unwrap_err(),
            "--metrics cloudwatch given twice: each sink can be given once"
        );
    }

    #[test]
    fn metrics_options_with_their_sinks_are_accepted() {
        assert_eq!(checked(&[]), Ok(()));
        assert_eq!(
            checked(&[
                "--metrics",
                "prometheus:127.0.0.1:0",
                "--metrics-level",
                "SUMMARY",
                "--metrics-enabled-dimensions",
                "Operation",
            ]),
            Ok(())
        );
        assert_eq!(
            checked(&[
                "--metrics",
                "cloudwatch",
                "--metrics",
                "prometheus:127.0.0.1:0",
                "--cloudwatch-endpoint",
                "http://127.0.0.1:1",
                "--metrics-buffer-time-ms",
                "500",
            ]),
            Ok(())
        );
    }

    #[test]
    fn a_consumer_name_needs_fan_out() {
        assert_eq!(
            checked(&["--consumer-name", "c"]).unwrap_err(),
            "--consumer-name needs --retrieval fan-out"
        );
        assert_eq!(
            checked(&["--consumer-name", "c", "--retrieval", "fan-out"]),
            Ok(())
        );
    }
}
