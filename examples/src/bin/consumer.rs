//! A consumer for AWS or local emulators: prints every record as one JSON line on stdout,
//! checkpoints after every batch and at shard end, and shuts down gracefully (releasing its
//! leases) on SIGINT or SIGTERM.
//!
//! ```text
//! cargo run -q -p kcl-examples --bin consumer -- --stream NAME --application NAME --region REGION \
//!     [--kinesis-endpoint URL] [--dynamodb-endpoint URL] \
//!     [--initial-position trim-horizon|latest|at-timestamp:RFC3339] [--worker-id ID] [--failover-time-ms N] \
//!     [--call-timeout MS] [--call-attempt-timeout MS] [--no-lease-owner-index] \
//!     [--retrieval polling|fan-out] [--consumer-name NAME]
//! ```
//!
//! `--retrieval fan-out` reads by enhanced fan-out (SubscribeToShard) with the stream consumer
//! `--consumer-name` (default: the application name), registered at start when missing and
//! never deregistered; `polling` (the default) uses GetRecords.
//!
//! A lease table it creates gets the `LeaseOwnerToLeaseKeyIndex` index the Java KCL 3.x
//! needs, unless `--no-lease-owner-index`.
//!
//! It exits 0 after SIGINT or SIGTERM even when Kinesis or DynamoDB hang: shutdown is bounded
//! (`shutdown_grace` plus one call timeout) and leases it could not release are logged.

use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use base64::Engine;
use clap::Parser;
use kcl_interfaces::{
    CheckpointErrorKind, InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput,
    ShutdownReason,
};
use kcl_worker::aws::AwsOptions;
use kcl_worker::{FanOutConfig, InitialPosition, RetrievalConfig, Worker, WorkerConfig};
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
    /// How records are read: polling (GetRecords) or fan-out (enhanced fan-out,
    /// SubscribeToShard).
    #[arg(long, default_value = "polling", value_parser = ["polling", "fan-out"])]
    retrieval: String,
    /// The enhanced fan-out consumer name (default: the application name); only with
    /// `--retrieval fan-out`.
    #[arg(long)]
    consumer_name: Option<String>,
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

/// Prints records as JSON lines.
#[derive(Default)]
struct JsonLines {
    shard_id: String,
}

impl RecordProcessor for JsonLines {
    async fn initialize(&mut self, input: InitializationInput) {
        info!(shard_id = %input.shard_id, checkpoint = %input.extended_sequence_number, "processing shard");
        self.shard_id = input.shard_id;
    }

    async fn process_records(&mut self, input: ProcessRecordsInput) {
        let mut out = String::new();
        for r in &input.records {
            out.push_str(&format!(
                "{{\"shard_id\":{},\"sequence_number\":\"{}\",\"sub_sequence_number\":{},\"partition_key\":{},\"data_b64\":\"{}\"}}\n",
                json_string(&self.shard_id),
                r.sequence_number,
                r.sub_sequence_number,
                json_string(&r.partition_key),
                base64::engine::general_purpose::STANDARD.encode(&r.data),
            ));
        }
        // The lock is not `Send`: release it (end of the block) before awaiting.
        let written = {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
        };
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

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut b = WorkerConfig::builder(args.application, args.stream)
        .initial_position(args.initial_position);
    b.set_worker_id(args.worker_id);
    b.set_failover_time(args.failover_time_ms.map(Duration::from_millis));
    b.set_call_timeout(args.call_timeout.map(Duration::from_millis));
    b.set_call_attempt_timeout(args.call_attempt_timeout.map(Duration::from_millis));
    match (args.retrieval.as_str(), args.consumer_name) {
        ("fan-out", name) => {
            let mut fan_out = FanOutConfig::new();
            fan_out.consumer_name = name;
            b.set_retrieval_specific_config(Some(RetrievalConfig::FanOut(fan_out)));
        }
        (_, Some(_)) => return Err("--consumer-name needs --retrieval fan-out".into()),
        _ => {}
    }
    let config = b.build()?;
    let mut aws = AwsOptions::new()
        .with_region(args.region)
        .with_lease_owner_index(!args.no_lease_owner_index);
    aws.kinesis_endpoint = args.kinesis_endpoint;
    aws.dynamodb_endpoint = args.dynamodb_endpoint;
    info!(worker_id = %config.worker_id, "starting");
    let handle = Worker::builder(config, JsonLines::default)
        .aws(aws)
        .build()
        .await?
        .start()
        .await?;
    shutdown_signal().await;
    info!("signal received; shutting down gracefully");
    let report = handle.shutdown().await?;
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
    match run(Args::parse()).await {
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
