//! A producer for AWS or local emulators: puts numbered records under a set of partition keys,
//! plain (PutRecords batches) or KPL-aggregated, optionally creating the stream first.
//!
//! ```text
//! cargo run -q -p kcl-examples --bin producer -- --stream NAME --region REGION \
//!     [--kinesis-endpoint URL] --count N [--partition-keys k1,k2,...] [--payload-prefix P] \
//!     [--aggregate [--records-per-aggregate M]] [--create-stream [--shards S]] \
//!     [--call-timeout MS] [--call-attempt-timeout MS]
//! ```
//!
//! Every Kinesis call is bounded like the worker's: one attempt by `--call-attempt-timeout`
//! (default 4 s), the whole call, retries included, by `--call-timeout` (default 10 s).
//!
//! Record `i` (from 0) carries the payload `{prefix}{i:06}` (`record-000042` by default) and
//! the partition key `keys[i % keys.len()]` (`key-0` .. `key-9` by default). With
//! `--aggregate`, the user records of each partition key are packed into KPL aggregates (the
//! KPL only aggregates records bound for one shard; one key always maps to one shard), each
//! put with its first record's partition key and hash key. Entries PutRecords rejects
//! (throttling, internal errors) are retried with back-off, so records of one key may arrive
//! out of order after a retry. Credentials come from the environment (aws-config).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::error::Error as _;
use std::fmt;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use bytes::Bytes;
use clap::Parser;
use kcl_kpl::{Aggregator, MAX_PARTITION_KEY_CHARS, MAX_RECORD_SIZE};
use tracing::{debug, info, warn};

/// Most entries one PutRecords call accepts.
const MAX_BATCH_ENTRIES: usize = 500;
/// Most bytes (data plus partition keys) one PutRecords call accepts.
const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// Attempts at putting one entry before giving up.
const MAX_PUT_ATTEMPTS: u32 = 10;
/// First pause before retrying rejected entries; doubled after every attempt.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long `--create-stream` waits for the stream to become ACTIVE.
const ACTIVE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Parser, Debug)]
#[command(about = "Put numbered records into a Kinesis stream, plain or KPL-aggregated")]
struct Args {
    /// The stream to put records into.
    #[arg(long)]
    stream: String,
    /// The AWS region.
    #[arg(long)]
    region: String,
    /// Kinesis endpoint URL (e.g. an emulator on http://127.0.0.1:4567).
    #[arg(long)]
    kinesis_endpoint: Option<String>,
    /// Bound on a whole Kinesis call, retries included, in milliseconds (default 10000).
    #[arg(long)]
    call_timeout: Option<u64>,
    /// Bound on one attempt of a Kinesis call, in milliseconds (default 4000).
    #[arg(long)]
    call_attempt_timeout: Option<u64>,
    /// Number of user records to put.
    #[arg(long)]
    count: u64,
    /// Partition keys, used round-robin (default key-0,...,key-9).
    #[arg(long, value_delimiter = ',', value_parser = parse_partition_key)]
    partition_keys: Vec<String>,
    /// Payload of record i: this prefix followed by i on six digits.
    #[arg(long, default_value = "record-")]
    payload_prefix: String,
    /// Put KPL aggregated records (one aggregate holds records of one partition key).
    #[arg(long)]
    aggregate: bool,
    /// Most user records per aggregate (default: as many as fit in 1 MiB).
    #[arg(long, requires = "aggregate", value_parser = clap::value_parser!(u32).range(1..))]
    records_per_aggregate: Option<u32>,
    /// Create the stream if it does not exist, and wait until it is ACTIVE.
    #[arg(long)]
    create_stream: bool,
    /// Shard count of a stream created by --create-stream.
    #[arg(long, default_value_t = 1, requires = "create_stream",
          value_parser = clap::value_parser!(i32).range(1..))]
    shards: i32,
}

fn parse_partition_key(s: &str) -> Result<String, String> {
    let chars = s.chars().count();
    if chars == 0 || chars > MAX_PARTITION_KEY_CHARS {
        return Err(format!(
            "a partition key must have 1 to {MAX_PARTITION_KEY_CHARS} characters, {s:?} has {chars}"
        ));
    }
    Ok(s.to_owned())
}

/// Why the producer failed.
#[derive(Debug)]
enum ProducerError {
    /// An AWS call failed.
    Aws {
        action: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Some entries were still rejected after every attempt.
    Rejected {
        failed: usize,
        attempts: u32,
        last_error: String,
    },
    /// The stream did not become ACTIVE in time.
    NotActive { stream: String, status: String },
    /// PutRecords answered with fewer or more results than entries sent.
    MissingResults { sent: usize, results: usize },
    /// A user record cannot be put.
    BadRecord {
        index: u64,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl fmt::Display for ProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Aws { action, .. } => f.write_str(action),
            Self::Rejected {
                failed,
                attempts,
                last_error,
            } => write!(
                f,
                "{failed} record(s) still rejected after {attempts} attempts (last error: {last_error})"
            ),
            Self::NotActive { stream, status } => write!(
                f,
                "stream {stream:?} is not ACTIVE after {ACTIVE_TIMEOUT:?} (status {status})"
            ),
            Self::BadRecord { index, .. } => write!(f, "user record {index}"),
            Self::MissingResults { sent, results } => write!(
                f,
                "PutRecords answered {results} results for {sent} entries"
            ),
        }
    }
}

impl std::error::Error for ProducerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Aws { source, .. } | Self::BadRecord { source, .. } => Some(&**source),
            Self::Rejected { .. } | Self::NotActive { .. } | Self::MissingResults { .. } => None,
        }
    }
}

fn aws_error(
    action: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ProducerError {
    let action = action.into();
    move |source| ProducerError::Aws { action, source }
}

/// One Kinesis record to put.
struct Entry {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Bytes,
}

impl Entry {
    fn size(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }
}

/// Collects entries into PutRecords batches and puts them, retrying rejected entries.
struct Putter {
    client: aws_sdk_kinesis::Client,
    stream: String,
    batch: Vec<Entry>,
    batch_bytes: usize,
    kinesis_records: u64,
}

impl Putter {
    async fn push(&mut self, entry: Entry) -> Result<(), ProducerError> {
        if self.batch.len() >= MAX_BATCH_ENTRIES
            || self.batch_bytes + entry.size() > MAX_BATCH_BYTES
        {
            self.flush().await?;
        }
        self.batch_bytes += entry.size();
        self.batch.push(entry);
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ProducerError> {
        let mut pending = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 1;
        while !pending.is_empty() {
            let sent = pending.len();
            let entries = pending
                .iter()
                .map(|e| {
                    PutRecordsRequestEntry::builder()
                        .partition_key(&e.partition_key)
                        .set_explicit_hash_key(e.explicit_hash_key.clone())
                        .data(Blob::new(e.data.to_vec()))
                        .build()
                        .map_err(|e| aws_error("building a PutRecords entry")(e.into()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries))
                .send()
                .await
                .map_err(|e| aws_error(format!("PutRecords into {:?}", self.stream))(e.into()))?;
            if output.records().len() != sent {
                return Err(ProducerError::MissingResults {
                    sent,
                    results: output.records().len(),
                });
            }
            let mut last_error = String::new();
            let mut rejected = Vec::new();
            for (entry, result) in pending.into_iter().zip(output.records()) {
                match result.error_code() {
                    Some(code) => {
                        last_error = format!("{code}: {}", result.error_message().unwrap_or(""));
                        rejected.push(entry);
                    }
                    None => self.kinesis_records += 1,
                }
            }
            debug!(
                entries = sent,
                attempt,
                rejected = rejected.len(),
                "PutRecords"
            );
            if rejected.is_empty() {
                break;
            }
            if attempt >= MAX_PUT_ATTEMPTS {
                return Err(ProducerError::Rejected {
                    failed: rejected.len(),
                    attempts: attempt,
                    last_error,
                });
            }
            warn!(
                rejected = rejected.len(),
                error = %last_error,
                retry_in = ?backoff,
                "PutRecords rejected some entries; retrying them"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
            pending = rejected;
        }
        Ok(())
    }
}

/// Creates the stream when it does not exist and waits until it is ACTIVE.
async fn ensure_stream(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    shards: i32,
) -> Result<(), ProducerError> {
    let described = client
        .describe_stream_summary()
        .stream_name(stream)
        .send()
        .await;
    match described {
        Ok(out) => {
            let open_shards = out
                .stream_description_summary()
                .map(|summary| summary.open_shard_count());
            if open_shards != Some(shards) {
                info!(
                    stream,
                    ?open_shards,
                    "stream exists; not changing its shard count"
                );
            }
        }
        Err(e)
            if e.as_service_error()
                .is_some_and(|se| se.is_resource_not_found_exception()) =>
        {
            info!(stream, shards, "creating the stream");
            match client
                .create_stream()
                .stream_name(stream)
                .shard_count(shards)
                .send()
                .await
            {
                Ok(_) => {}
                // Created by someone else meanwhile: fine.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_resource_in_use_exception()) => {}
                Err(e) => return Err(aws_error(format!("CreateStream {stream:?}"))(e.into())),
            }
        }
        Err(e) => {
            return Err(aws_error(format!("DescribeStreamSummary {stream:?}"))(
                e.into(),
            ));
        }
    }

    let started = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        let out = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| aws_error(format!("DescribeStreamSummary {stream:?}"))(e.into()))?;
        let status = out
            .stream_description_summary()
            .map(|s| s.stream_status().clone());
        if status == Some(StreamStatus::Active) {
            info!(stream, waited = ?started.elapsed(), "stream is ACTIVE");
            return Ok(());
        }
        if started.elapsed() >= ACTIVE_TIMEOUT {
            return Err(ProducerError::NotActive {
                stream: stream.to_owned(),
                status: status.map_or_else(|| "unknown".to_owned(), |s| s.as_str().to_owned()),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// The summary of a run.
struct Summary {
    user_records: u64,
    kinesis_records: u64,
}

async fn run(args: Args) -> Result<Summary, ProducerError> {
    let defaults = kcl_lease::CallTimeouts::default();
    let timeouts = kcl_lease::CallTimeouts::new(
        args.call_attempt_timeout
            .map_or(defaults.attempt, Duration::from_millis),
        args.call_timeout
            .map_or(defaults.call, Duration::from_millis),
    );
    let mut options = kcl_worker::aws::AwsOptions::new()
        .with_region(args.region.clone())
        .with_call_timeouts(timeouts);
    options.kinesis_endpoint = args.kinesis_endpoint.clone();
    let client = options
        .kinesis_client()
        .await
        .map_err(|e| ProducerError::Aws {
            action: "configuring the Kinesis client".to_owned(),
            source: Box::new(e),
        })?;

    if args.create_stream {
        ensure_stream(&client, &args.stream, args.shards).await?;
    }

    let keys = if args.partition_keys.is_empty() {
        (0..10).map(|i| format!("key-{i}")).collect()
    } else {
        args.partition_keys.clone()
    };
    let mut putter = Putter {
        client,
        stream: args.stream.clone(),
        batch: Vec::new(),
        batch_bytes: 0,
        kinesis_records: 0,
    };
    // One aggregator per partition key (same order as `keys`).
    let mut aggregators: Vec<Aggregator> = Vec::new();
    if args.aggregate {
        aggregators.resize_with(keys.len(), Aggregator::new);
    }
    let per_aggregate = args
        .records_per_aggregate
        .map_or(usize::MAX, |m| m as usize);

    info!(
        stream = %args.stream,
        count = args.count,
        keys = keys.len(),
        aggregate = args.aggregate,
        "putting records"
    );
    for index in 0..args.count {
        let slot = (index % keys.len() as u64) as usize;
        let key = &keys[slot];
        let data = Bytes::from(format!("{}{index:06}", args.payload_prefix));
        if args.aggregate {
            let aggregator = &mut aggregators[slot];
            let full = aggregator
                .add(key, None, data)
                .map_err(|e| ProducerError::BadRecord {
                    index,
                    source: e.into(),
                })?;
            let full = match full {
                Some(full) => Some(full),
                None if aggregator.len() >= per_aggregate => aggregator.finish(),
                None => None,
            };
            if let Some(agg) = full {
                putter.push(aggregate_entry(agg)).await?;
            }
        } else {
            let entry = Entry {
                partition_key: key.clone(),
                explicit_hash_key: None,
                data,
            };
            if entry.size() > MAX_RECORD_SIZE {
                return Err(ProducerError::BadRecord {
                    index,
                    source: format!(
                        "{} bytes (data plus partition key) exceed the {MAX_RECORD_SIZE}-byte record limit",
                        entry.size()
                    )
                    .into(),
                });
            }
            putter.push(entry).await?;
        }
    }
    for aggregator in &mut aggregators {
        if let Some(agg) = aggregator.finish() {
            putter.push(aggregate_entry(agg)).await?;
        }
    }
    putter.flush().await?;
    Ok(Summary {
        user_records: args.count,
        kinesis_records: putter.kinesis_records,
    })
}

fn aggregate_entry(agg: kcl_kpl::AggregatedRecord) -> Entry {
    Entry {
        partition_key: agg.partition_key,
        explicit_hash_key: agg.explicit_hash_key,
        data: agg.data,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(args).await {
        Ok(summary) => {
            eprintln!(
                "put {} user records in {} Kinesis records",
                summary.user_records, summary.kinesis_records
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                // SDK errors wrap a service error whose source says the same again.
                let text = c.to_string();
                if !msg.ends_with(&text) {
                    msg.push_str(&format!(": {text}"));
                }
                cause = c.source();
            }
            eprintln!("producer: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    use base64::Engine;
    use serde_json::{Value, json};

    use super::*;

    /// Serves PutRecords on 127.0.0.1, one request per connection: the first answer rejects
    /// every entry at an odd position, later answers accept everything. Sends each request's
    /// decoded payloads to the test.
    fn scripted_kinesis() -> (String, mpsc::Receiver<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (call, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':')
                        && name.eq_ignore_ascii_case("content-length")
                    {
                        length = value.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let request: Value = serde_json::from_slice(&body).unwrap();
                let payloads: Vec<String> = request["Records"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| {
                        let data = base64::engine::general_purpose::STANDARD
                            .decode(r["Data"].as_str().unwrap())
                            .unwrap();
                        String::from_utf8(data).unwrap()
                    })
                    .collect();
                let count = payloads.len();
                // Reported before answering, so the test sees it once the call returns.
                let _ = tx.send(payloads);
                let results: Vec<Value> = (0..count)
                    .map(|i| {
                        if call == 0 && i % 2 == 1 {
                            json!({"ErrorCode": "ProvisionedThroughputExceededException",
                                   "ErrorMessage": "slow down"})
                        } else {
                            json!({"SequenceNumber": format!("{}", 1000 * call + i),
                                   "ShardId": "shardId-000000000000"})
                        }
                    })
                    .collect();
                let failed = results
                    .iter()
                    .filter(|r| r.get("ErrorCode").is_some())
                    .count();
                let answer = json!({"FailedRecordCount": failed, "Records": results}).to_string();
                write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.1\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .unwrap();
            }
        });
        (endpoint, rx)
    }

    #[tokio::test]
    async fn rejected_entries_are_retried_alone() {
        let (endpoint, requests) = scripted_kinesis();
        let mut putter = Putter {
            client: kcl_testkit::emulators::kinesis_client(&endpoint),
            stream: "s".into(),
            batch: Vec::new(),
            batch_bytes: 0,
            kinesis_records: 0,
        };
        for i in 0..5 {
            putter
                .push(Entry {
                    partition_key: "k".into(),
                    explicit_hash_key: None,
                    data: Bytes::from(format!("p{i}")),
                })
                .await
                .unwrap();
        }
        putter.flush().await.unwrap();
        assert_eq!(putter.kinesis_records, 5);
        let first = requests.recv().unwrap();
        assert_eq!(first, ["p0", "p1", "p2", "p3", "p4"]);
        let retry = requests.recv().unwrap();
        assert_eq!(retry, ["p1", "p3"]);
        assert!(requests.try_recv().is_err(), "one retry was enough");
    }

    #[tokio::test]
    async fn batches_hold_at_most_500_entries() {
        let (endpoint, requests) = scripted_kinesis();
        let mut putter = Putter {
            client: kcl_testkit::emulators::kinesis_client(&endpoint),
            stream: "s".into(),
            batch: Vec::new(),
            batch_bytes: 0,
            kinesis_records: 0,
        };
        // The first request has rejections: 250 of its 500 entries come back in a retry.
        for i in 0..501 {
            putter
                .push(Entry {
                    partition_key: "k".into(),
                    explicit_hash_key: Some("7".into()),
                    data: Bytes::from(format!("p{i}")),
                })
                .await
                .unwrap();
        }
        putter.flush().await.unwrap();
        let sizes: Vec<usize> = requests.try_iter().map(|r| r.len()).collect();
        assert_eq!(sizes, [500, 250, 1]);
        assert_eq!(putter.kinesis_records, 501);
    }

    #[test]
    fn partition_keys_are_validated() {
        assert!(parse_partition_key("").is_err());
        assert!(parse_partition_key(&"x".repeat(257)).is_err());
        assert_eq!(parse_partition_key("key-1").unwrap(), "key-1");
        let args = Args::try_parse_from([
            "producer",
            "--stream",
            "s",
            "--region",
            "r",
            "--count",
            "3",
            "--partition-keys",
            "a,b",
        ])
        .unwrap();
        assert_eq!(args.partition_keys, ["a", "b"]);
        assert!(
            Args::try_parse_from([
                "producer",
                "--stream",
                "s",
                "--region",
                "r",
                "--count",
                "3",
                "--records-per-aggregate",
                "2",
            ])
            .is_err(),
            "--records-per-aggregate needs --aggregate"
        );
    }
}
