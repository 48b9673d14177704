//! Operating an application on the emulators (kinesis-local + dynalite): the `kcl` tool
//! (leases, workers, lag, reset, decode, and its errors) and the consumer's operator
//! features (`--health`, `--metrics prometheus:`, `--format`, no progress line when stderr
//! is not a terminal), all through the real binaries; and a consumer in
//! `--client-version 3x` leading its application, with `kcl` showing the KCL 3.x state.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_cloudwatch::types::{MetricDataQuery, MetricStat};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use kcl_testkit::emulators::{
    Emulator, EmulatorKind, REGION, dynamodb_client, sdk_config, shared_kinesis_and_dynamodb,
};
use serde_json::Value;

/// Dummy credentials, nothing from the user's AWS configuration.
fn aws_env(command: &mut Command) -> &mut Command {
    let nowhere = std::env::temp_dir().join("kcl-operations-test-no-aws-config");
    command
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", &nowhere)
        .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere)
        .env("RUST_LOG", "info")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_KINESIS")
        .env_remove("AWS_ENDPOINT_URL_DYNAMODB")
}

struct Endpoints {
    kinesis: String,
    dynamodb: String,
}

impl Endpoints {
    fn args(&self) -> Vec<String> {
        vec![
            "--region".into(),
            REGION.into(),
            "--kinesis-endpoint".into(),
            self.kinesis.clone(),
            "--dynamodb-endpoint".into(),
            self.dynamodb.clone(),
        ]
    }

    /// The region and the DynamoDB endpoint alone.
    fn dynamodb_args(&self) -> Vec<String> {
        vec![
            "--region".into(),
            REGION.into(),
            "--dynamodb-endpoint".into(),
            self.dynamodb.clone(),
        ]
    }

    /// The connection options `kcl ARGS` uses (kcl refuses those it would not use): none
    /// for decode; no Kinesis endpoint for leases, workers, and reset without --stream.
    fn kcl_args(&self, args: &[&str]) -> Vec<String> {
        match args.first().copied() {
            Some("decode") => vec![],
            Some("leases" | "workers") => self.dynamodb_args(),
            Some("reset") if !args.contains(&"--stream") => self.dynamodb_args(),
            _ => self.args(),
        }
    }
}

/// Runs `kcl ARGS` with the endpoints it uses, stdin `input`.
fn kcl(e: &Endpoints, args: &[&str], input: Option<&[u8]>) -> Output {
    kcl_raw(args, e.kcl_args(args), input)
}

/// Runs `kcl ARGS EXTRA`, stdin `input`.
fn kcl_raw(args: &[&str], extra: Vec<String>, input: Option<&[u8]>) -> Output {
    let mut child = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_kcl")))
        .args(args)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input).unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "kcl failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn failed(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A usage error (exit 2): its stderr.
fn usage_error(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// The leases' (key, counter, checkpoint), from `kcl leases --json`.
fn lease_rows(e: &Endpoints, app: &str) -> Vec<(String, u64, Value)> {
    let leases = json(&kcl(
        e,
        &[
            "leases",
            "--application",
            app,
            "--interval-ms",
            "10",
            "--json",
        ],
        None,
    ));
    leases["leases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["shard_id"].as_str().unwrap().to_owned(),
                l["counter"].as_u64().unwrap(),
                l["checkpoint"].clone(),
            )
        })
        .collect()
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).unwrap()
}

fn produce(e: &Endpoints, stream: &str, extra: &[&str]) {
    let out = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_producer")))
        .args([
            "--stream",
            stream,
            "--region",
            REGION,
            "--kinesis-endpoint",
            &e.kinesis,
        ])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A consumer process: stdout lines on a channel, stderr collected. Killed if the test
/// ends (or fails) before it stopped.
struct Consumer {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Arc<Mutex<String>>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Consumer {
    fn start(e: &Endpoints, args: &[&str]) -> Self {
        let mut child = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_consumer")))
            .args(e.args())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line.unwrap()).is_err() {
                    break;
                }
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let writer = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                writer
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { child, lines, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `count` stdout lines within `limit`.
    fn take(&self, count: usize, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < count {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => out.push(line),
                Err(_) => panic!("{} of {count} lines; log:\n{}", out.len(), self.log()),
            }
        }
        out
    }

    /// The address the log names after `prefix` (e.g. `url=http://`).
    fn served_addr(&self, path: &str, limit: Duration) -> SocketAddr {
        let deadline = Instant::now() + limit;
        loop {
            let log = self.log();
            if let Some(addr) = log.split("url=http://").skip(1).find_map(|rest| {
                let url = rest.split_whitespace().next()?;
                url.strip_suffix(path)?.parse().ok()
            }) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "no {path} url in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) -> String {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}: {}", self.log());
                break;
            }
            assert!(Instant::now() < deadline, "no exit: {}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        self.log()
    }
}

/// `GET http://addr/path`: (status, body), bounded.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split_whitespace().nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

fn prometheus_sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn operating_an_application_with_kcl_and_the_consumer() {
    let emulators = shared_kinesis_and_dynamodb().unwrap_or_else(|e| panic!("{e}"));
    let e = Endpoints {
        kinesis: emulators.kinesis.endpoint().to_owned(),
        dynamodb: emulators.dynamodb.endpoint().to_owned(),
    };
    let (stream, app) = ("ops-stream", "ops-app");
    produce(
        &e,
        stream,
        &[
            "--create-stream",
            "--shards",
            "2",
            "--count",
            "20",
            "--payload-prefix",
            "first-",
        ],
    );

    // The consumer, with health and Prometheus endpoints on ports it picks.
    let consumer = Consumer::start(
        &e,
        &[
            "--stream",
            stream,
            "--application",
            app,
            "--worker-id",
            "worker-1",
            "--initial-position",
            "trim-horizon",
            "--failover-time-ms",
            "3000",
            "--health",
            "127.0.0.1:0",
            "--metrics",
            "prometheus:127.0.0.1:0",
        ],
    );
    let lines = consumer.take(20, Duration::from_secs(60));
    let delivered: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let health = consumer.served_addr("/health", Duration::from_secs(10));
    let metrics = consumer.served_addr("/metrics", Duration::from_secs(10));
    let (status, body) = http_get(health, "/health");
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["shards"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(http_get(health, "/nope").0, 404);
    // Prometheus: RecordsProcessed by ShardId adds up to what was printed (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(metrics, "/metrics");
        assert_eq!(status, 200);
        if prometheus_sum(&body, "RecordsProcessed") == 20.0 {
            assert!(
                body.contains("MillisBehindLatest{Operation=\"ProcessTask\",ShardId=\"shardId-"),
                "{body}"
            );
            assert!(
                body.contains("Operation=\"RenewAllLeases\",WorkerIdentifier=\"worker-1\""),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // kcl leases / workers while the consumer holds both leases.
    let leases = json(&kcl(
        &e,
        &[
            "leases",
            "--application",
            app,
            "--interval-ms",
            "2500",
            "--json",
        ],
        None,
    ));
    let rows = leases["leases"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{leases}");
    for row in rows {
        assert_eq!(row["owner"], "worker-1", "{leases}");
        assert_eq!(row["state"], "live", "{leases}");
    }
    // The consumer (default --client-version 2x) started the application in the 2.x
    // compatible version: no leader, but a WorkerMetricStats row.
    assert_eq!(
        leases["client_version"], "CLIENT_VERSION_UPGRADE_FROM_2X",
        "{leases}"
    );
    assert_eq!(leases["client_version_modified_by"], "worker-1", "{leases}");
    assert!(leases["leader"].is_null(), "{leases}");
    let table = ok(&kcl(
        &e,
        &["leases", "--application", app, "--interval-ms", "2500"],
        None,
    ));
    assert!(table.starts_with("SHARD"), "{table}");
    assert!(
        table.contains("2 leases: 2 live, 0 stale, 0 free"),
        "{table}"
    );
    assert!(
        table.contains("client version CLIENT_VERSION_UPGRADE_FROM_2X (set by worker-1 at "),
        "{table}"
    );
    assert!(
        table.contains("; no leader; 1 WorkerMetricStats rows (1 fresh)"),
        "{table}"
    );
    let workers = json(&kcl(
        &e,
        &[
            "workers",
            "--application",
            app,
            "--interval-ms",
            "2500",
            "--json",
        ],
        None,
    ));
    assert_eq!(workers["workers"][0]["worker_id"], "worker-1", "{workers}");
    assert_eq!(workers["workers"][0]["leases"], 2, "{workers}");
    assert_eq!(workers["balanced"], true, "{workers}");
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(workers["workers"][0]["leader"], false, "{workers}");
    let row = &workers["workers"][0]["metric_stats"];
    assert_eq!(row["fresh"], true, "{workers}");
    assert!(row["last_update_age_s"].as_i64().unwrap() <= 3, "{workers}");
    assert_eq!(row["report_interval_ms"], 1500, "{workers}");
    assert_eq!(
        workers["client_version"], "CLIENT_VERSION_UPGRADE_FROM_2X",
        "{workers}"
    );
    let table = ok(&kcl(
        &e,
        &["workers", "--application", app, "--interval-ms", "200"],
        None,
    ));
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "WORKER",
            "LEASES",
            "LIVE",
            "STALE",
            "FINISHED",
            "METRIC_STATS",
            "ROLE"
        ],
        "{table}"
    );
    let line: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(line[0], "worker-1", "{table}");
    assert!(
        line[5].ends_with("s") && line[6] == "ago" && line[7] == "-",
        "{table}"
    );
    // A reset of a live lease is refused and writes nothing.
    let shard0 = rows[0]["shard_id"].as_str().unwrap().to_owned();
    let refused = failed(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--shard",
            &shard0,
            "--to",
            "trim-horizon",
            "--interval-ms",
            "2500",
        ],
        None,
    ));
    assert!(refused.contains("held by a live worker"), "{refused}");
    // --force resets it anyway: the worker loses the lease at its next renewal, takes it
    // again and delivers the shard again from the trim horizon.
    let forced = ok(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--shard",
            &shard0,
            "--to",
            "trim-horizon",
            "--interval-ms",
            "2500",
            "--force",
        ],
        None,
    ));
    assert!(forced.contains("-> TRIM_HORIZON"), "{forced}");
    assert!(forced.contains("live"), "{forced}");
    let shard0_count = delivered
        .iter()
        .filter(|d| d["shard_id"] == shard0.as_str())
        .count();
    let again: Vec<Value> = consumer
        .take(shard0_count, Duration::from_secs(60))
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        again.iter().all(|d| d["shard_id"] == shard0.as_str()),
        "{again:?}"
    );
    let mut seqs: Vec<&str> = again
        .iter()
        .map(|d| d["sequence_number"].as_str().unwrap())
        .collect();
    let mut before: Vec<&str> = delivered
        .iter()
        .filter(|d| d["shard_id"] == shard0.as_str())
        .map(|d| d["sequence_number"].as_str().unwrap())
        .collect();
    seqs.sort();
    before.sort();
    assert_eq!(
        seqs, before,
        "the shard delivered again from the trim horizon"
    );
    // Its checkpoint comes back (bounded wait), so nothing is behind.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let lag = json(&kcl(
            &e,
            &["lag", "--application", app, "--stream", stream, "--json"],
            None,
        ));
        if lag["total_records_behind"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{lag}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = consumer.stop();
    assert!(
        log.contains("lease lost"),
        "the forced reset should cost the worker its lease:\n{log}"
    );
    assert!(
        !log.contains("records/s"),
        "a progress line although stderr is not a terminal:\n{log}"
    );

    // Stopped: the leases are free and nothing is behind; the worker took its
    // WorkerMetricStats row away, so no worker is left.
    let workers = json(&kcl(
        &e,
        &[
            "workers",
            "--application",
            app,
            "--interval-ms",
            "200",
            "--json",
        ],
        None,
    ));
    assert_eq!(workers["workers"], serde_json::json!([]), "{workers}");
    assert_eq!(
        workers["client_version"], "CLIENT_VERSION_UPGRADE_FROM_2X",
        "{workers}"
    );
    let leases = json(&kcl(
        &e,
        &[
            "leases",
            "--application",
            app,
            "--interval-ms",
            "200",
            "--json",
        ],
        None,
    ));
    assert!(
        leases["leases"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "free"),
        "{leases}"
    );
    let lag = json(&kcl(
        &e,
        &["lag", "--application", app, "--stream", stream, "--json"],
        None,
    ));
    assert_eq!(lag["total_records_behind"], 0, "{lag}");
    produce(
        &e,
        stream,
        &["--count", "10", "--payload-prefix", "second-"],
    );
    let lag = json(&kcl(
        &e,
        &["lag", "--application", app, "--stream", stream, "--json"],
        None,
    ));
    assert_eq!(lag["total_records_behind"], 10, "{lag}");
    assert!(lag["max_millis_behind"].as_u64().unwrap() > 0, "{lag}");
    let table = ok(&kcl(
        &e,
        &["lag", "--application", app, "--stream", stream],
        None,
    ));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("TOTAL") && l.contains(" 10 ")),
        "{table}"
    );

    // An --all-shards reset finds every position before it writes anything: a lease whose
    // shard is not in the stream (made up here; in life another stream's, or one gone past
    // retention) fails the reset, and the leases sorted before it are not written either.
    // With --stream, a sentinel position checks the shards against the stream too.
    let orphan = "shardId-000000000009";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = kcl_lease::dynamo::DynamoLeaseStore::new(dynamodb_client(&e.dynamodb), app);
    {
        use kcl_lease::LeaseStore as _;
        let lease = kcl_lease::Lease::new(orphan, kcl_kpl::ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(
            rt.block_on(store.create_lease_if_not_exists(&lease))
                .unwrap()
        );
    }
    let before = lease_rows(&e, app);
    assert_eq!(before.len(), 3, "{before:?}");
    let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap();
    for to in [format!("at-timestamp:{now}"), "trim-horizon".to_owned()] {
        let err = failed(&kcl(
            &e,
            &[
                "reset",
                "--application",
                app,
                "--all-shards",
                "--to",
                &to,
                "--stream",
                stream,
                "--interval-ms",
                "200",
            ],
            None,
        ));
        assert!(
            err.contains("cannot find the position of 1 of 3 shard(s); nothing was written: ")
                && err.contains(orphan)
                && err.contains("resource not found"),
            "{to}: {err}"
        );
        assert_eq!(lease_rows(&e, app), before, "{to}: {err}");
    }
    {
        use kcl_lease::LeaseStore as _;
        let lease = rt.block_on(store.get_lease(orphan)).unwrap().unwrap();
        rt.block_on(store.delete_lease(&lease)).unwrap();
    }
    assert_eq!(lease_rows(&e, app).len(), 2);

    // Reset one shard to a delivered record: only what follows it is behind on that shard.
    let on_shard0: Vec<&Value> = delivered
        .iter()
        .filter(|d| d["shard_id"] == shard0.as_str())
        .collect();
    let first = on_shard0[0]["sequence_number"].as_str().unwrap().to_owned();
    let out = ok(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--shard",
            &shard0,
            "--to",
            &format!("sequence:{first}"),
            "--stream",
            stream,
            "--interval-ms",
            "200",
        ],
        None,
    ));
    assert!(out.contains(&format!("-> {first}")), "{out}");
    let lag = json(&kcl(
        &e,
        &["lag", "--application", app, "--stream", stream, "--json"],
        None,
    ));
    let behind0 = lag["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard_id"] == shard0.as_str())
        .unwrap()["records_behind"]
        .as_u64()
        .unwrap();
    // After the first record: the rest of the first batch on that shard, and the second
    // batch's records there; the other shard is unchanged (its part of the second batch).
    assert!(behind0 >= on_shard0.len() as u64 - 1, "{lag}");
    assert_eq!(
        lag["total_records_behind"].as_u64().unwrap(),
        10 + on_shard0.len() as u64 - 1,
        "{lag}"
    );

    // Every shard back to the trim horizon: the consumer (raw format) prints all 30 again.
    ok(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--all-shards",
            "--to",
            "trim-horizon",
            "--stream",
            stream,
            "--interval-ms",
            "200",
        ],
        None,
    ));
    let lag = json(&kcl(
        &e,
        &["lag", "--application", app, "--stream", stream, "--json"],
        None,
    ));
    assert_eq!(lag["total_records_behind"], 30, "{lag}");
    // This run publishes to moto's CloudWatch; its last flush at shutdown sends everything.
    let moto = Emulator::start(EmulatorKind::Moto).unwrap_or_else(|e| panic!("{e}"));
    let consumer = Consumer::start(
        &e,
        &[
            "--stream",
            stream,
            "--application",
            app,
            "--worker-id",
            "worker-2",
            "--failover-time-ms",
            "3000",
            "--format",
            "raw",
            "--metrics",
            "cloudwatch",
            "--cloudwatch-endpoint",
            moto.endpoint(),
            "--metrics-level",
            "SUMMARY",
        ],
    );
    let mut payloads = consumer.take(30, Duration::from_secs(60));
    let log = consumer.stop();
    payloads.sort();
    let mut want: Vec<String> = (0..20)
        .map(|i| format!("first-{i:06}"))
        .chain((0..10).map(|i| format!("second-{i:06}")))
        .collect();
    want.sort();
    assert_eq!(payloads, want);
    assert!(log.contains("CloudWatch publisher stopped"), "{log}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let cw = aws_sdk_cloudwatch::Client::new(&sdk_config(moto.endpoint()));
    let listed = runtime
        .block_on(cw.list_metrics().namespace(app).send())
        .unwrap();
    let names: std::collections::BTreeSet<&str> = listed
        .metrics()
        .iter()
        .filter_map(|m| m.metric_name())
        .collect();
    assert!(names.contains("RecordsProcessed"), "{names:?}\n{log}");
    assert!(names.contains("LostLeases"), "{names:?}");
    // SUMMARY: the DETAILED metrics are not published.
    assert!(
        !names.contains("KinesisDataFetcher.getRecords.Time"),
        "{names:?}"
    );
    let sent: f64 = listed
        .metrics()
        .iter()
        .filter(|m| m.metric_name() == Some("RecordsProcessed"))
        .map(|m| {
            let query = MetricDataQuery::builder()
                .id("q")
                .metric_stat(
                    MetricStat::builder()
                        .metric(m.clone())
                        .period(60)
                        .stat("Sum")
                        .build(),
                )
                .build();
            let now = std::time::SystemTime::now();
            let out = runtime
                .block_on(
                    cw.get_metric_data()
                        .metric_data_queries(query)
                        .start_time((now - Duration::from_secs(600)).into())
                        .end_time((now + Duration::from_secs(600)).into())
                        .send(),
                )
                .unwrap();
            out.metric_data_results()
                .iter()
                .flat_map(|r| r.values().to_vec())
                .sum::<f64>()
        })
        .sum();
    assert_eq!(sent, 30.0, "RecordsProcessed in CloudWatch");
    drop(moto);

    // On a terminal stderr (a pty from `script`) the progress line shows.
    produce(&e, stream, &["--count", "5", "--payload-prefix", "third-"]);
    let transcript = std::env::temp_dir().join(format!("kcl-ops-tty-{}.log", std::process::id()));
    let text_out = std::env::temp_dir().join(format!("kcl-ops-text-{}.out", std::process::id()));
    let command = format!(
        "exec {} {} --stream {stream} --application {app} --worker-id worker-3 --failover-time-ms 3000 --format text 2>&1 >{}",
        env!("CARGO_BIN_EXE_consumer"),
        e.args().join(" "),
        text_out.display()
    );
    let mut tty = aws_env(&mut Command::new("script"))
        .env("RUST_LOG", "warn")
        .args(["-qfec", &command])
        .arg(&transcript)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("`script` (util-linux) runs the consumer on a pty");
    let deadline = Instant::now() + Duration::from_secs(30);
    let progress = loop {
        let text = std::fs::read_to_string(&transcript).unwrap_or_default();
        if text.contains("5 records in all") {
            break text;
        }
        if Instant::now() >= deadline {
            let _ = tty.kill();
            let _ = tty.wait();
            panic!("no progress line:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // `script` passes SIGTERM on to the consumer, which stops gracefully; then it exits.
    let pid = tty.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while tty.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = tty.kill();
            let _ = tty.wait();
            panic!("the consumer under `script` did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::fs::remove_file(&transcript);
    // --format text: SHARD SEQUENCE PARTITION_KEY DATA.
    let text = std::fs::read_to_string(&text_out).unwrap();
    let _ = std::fs::remove_file(&text_out);
    let mut data: Vec<&str> = text
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            assert_eq!(fields.len(), 4, "{l}");
            assert!(fields[0].starts_with("shardId-"), "{l}");
            assert!(fields[1].bytes().all(|b| b.is_ascii_digit()), "{l}");
            assert!(fields[2].starts_with("key-"), "{l}");
            fields[3]
        })
        .collect();
    data.sort();
    assert_eq!(
        data,
        (0..5).map(|i| format!("third-{i:06}")).collect::<Vec<_>>()
    );
    assert!(progress.contains("shards held, max "), "{progress}");
    assert!(progress.contains(" records/s, "), "{progress}");

    // Errors name what is wrong.
    let err = failed(&kcl(
        &e,
        &[
            "leases",
            "--application",
            "no-such-app",
            "--interval-ms",
            "10",
        ],
        None,
    ));
    assert!(err.contains("no such table"), "{err}");
    runtime.block_on(async {
        dynamodb_client(&e.dynamodb)
            .create_table()
            .table_name("not-leases")
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("id")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .unwrap(),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name("id")
                    .key_type(KeyType::Hash)
                    .build()
                    .unwrap(),
            )
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .unwrap();
    });
    let err = failed(&kcl(
        &e,
        &[
            "workers",
            "--application",
            "not-leases",
            "--interval-ms",
            "10",
        ],
        None,
    ));
    assert!(err.contains("not a lease table"), "{err}");
    let bad = kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--shard",
            &shard0,
            "--to",
            "yesterday",
        ],
        None,
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bad position"));
    let err = failed(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--shard",
            "shardId-9",
            "--to",
            "latest",
            "--interval-ms",
            "10",
        ],
        None,
    ));
    assert!(err.contains("no lease for shard"), "{err}");
    let err = usage_error(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--all-shards",
            "--to",
            "at-timestamp:2020-01-01T00:00:00Z",
        ],
        None,
    ));
    assert!(err.contains("--to at-timestamp needs --stream"), "{err}");
    // One shard's sequence number is not written into every lease.
    let before = lease_rows(&e, app);
    let seq = before[0].2["sequence_number"].as_str().unwrap().to_owned();
    let err = usage_error(&kcl(
        &e,
        &[
            "reset",
            "--application",
            app,
            "--all-shards",
            "--to",
            &format!("sequence:{seq}"),
            "--stream",
            stream,
        ],
        None,
    ));
    assert!(
        err.contains("--to sequence:N cannot go with --all-shards"),
        "{err}"
    );
    assert_eq!(lease_rows(&e, app), before);
    // Options a command would not use are refused, naming them.
    let err = usage_error(&kcl_raw(&["leases", "--application", app], e.args(), None));
    assert!(
        err.contains("--kinesis-endpoint has no effect on `kcl leases` (it makes no Kinesis call)"),
        "{err}"
    );
    let err = usage_error(&kcl_raw(
        &["decode", "-", "--region", REGION],
        vec![],
        Some(b"hello"),
    ));
    assert!(
        err.contains("--region has no effect on `kcl decode` (it makes no AWS call)"),
        "{err}"
    );
    let err = usage_error(&kcl(&e, &["decode", "-", "--deliver-out-of-range"], None));
    assert!(err.contains("--hash-range"), "{err}");
    let err = usage_error(&kcl(
        &e,
        &[
            "lag",
            "--application",
            app,
            "--stream",
            stream,
            "--max-calls-per-shard",
            "0",
        ],
        None,
    ));
    assert!(err.contains("--max-calls-per-shard"), "{err}");

    // decode: an aggregate file, the same bytes in base64 on stdin, a plain record.
    let vector = format!(
        "{}/../kcl-kpl/tests/vectors/mixed_ehk.bin",
        env!("CARGO_MANIFEST_DIR")
    );
    let from_file = ok(&kcl(&e, &["decode", &vector], None));
    assert_eq!(from_file.lines().count(), 6, "{from_file}");
    for line in from_file.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["aggregated"], true);
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "aggregated",
                "data_b64",
                "explicit_hash_key",
                "partition_key",
                "sub_sequence_number"
            ]
        );
    }
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&vector).unwrap());
    assert_eq!(
        ok(&kcl(&e, &["decode", "-"], Some(b64.as_bytes()))),
        from_file
    );
    let plain = ok(&kcl(&e, &["decode", "-", "--input", "raw"], Some(b"hello")));
    assert_eq!(
        plain,
        "{\"sub_sequence_number\":0,\"partition_key\":null,\"explicit_hash_key\":null,\"data_b64\":\"aGVsbG8=\",\"aggregated\":false}\n"
    );
    let err = failed(&kcl(&e, &["decode", "/no/such/file"], None));
    assert!(err.contains("cannot read /no/such/file"), "{err}");
}

/// One item of a 3.x state table, read consistently (`None`: absent).
fn state_item(
    runtime: &tokio::runtime::Runtime,
    e: &Endpoints,
    table: &str,
    key_name: &str,
    key: &str,
) -> Option<HashMap<String, AttributeValue>> {
    runtime
        .block_on(
            dynamodb_client(&e.dynamodb)
                .get_item()
                .table_name(table)
                .key(key_name, AttributeValue::S(key.to_owned()))
                .consistent_read(true)
                .send(),
        )
        .unwrap()
        .item
}

fn s_attr<'a>(item: &'a HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item[name]
        .as_s()
        .unwrap_or_else(|_| panic!("{name} is not an S: {item:?}"))
}

/// `--client-version 3x`: the consumer alone is the leader of its application and assigns
/// itself the leases; `<app>-CoordinatorState` holds `Migration3.0` = `CLIENT_VERSION_3X`
/// and a `Leader` item it owns, `<app>-WorkerMetricStats` its row (CPU utilisation in it,
/// none with `--disable-worker-metrics`); `kcl leases` / `kcl workers` show all that, and
/// after a graceful stop the lock and the row are gone. A bad `--client-version` is a usage
/// error naming the flag.
#[test]
fn a_consumer_in_3x_leads_its_application_and_kcl_shows_the_3x_state() {
    let emulators = shared_kinesis_and_dynamodb().unwrap_or_else(|e| panic!("{e}"));
    let e = Endpoints {
        kinesis: emulators.kinesis.endpoint().to_owned(),
        dynamodb: emulators.dynamodb.endpoint().to_owned(),
    };
    let (stream, app) = ("ops3x-stream", "ops3x-app");
    let coordinator_state = format!("{app}-CoordinatorState");
    let worker_metrics = format!("{app}-WorkerMetricStats");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // A bad value: exit 2, the flag and the choices named.
    let bad = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_consumer")))
        .args(e.args())
        .args([
            "--stream",
            stream,
            "--application",
            app,
            "--client-version",
            "4x",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--client-version") && stderr.contains("expected 2x or 3x"),
        "{stderr}"
    );
    // Options that would have no effect: exit 2 before any call, the option named.
    for (extra, want) in [
        (
            &["--metrics-level", "SUMMARY"][..],
            "--metrics-level needs --metrics",
        ),
        (
            &[
                "--metrics",
                "prometheus:127.0.0.1:0",
                "--cloudwatch-endpoint",
                "http://127.0.0.1:1",
            ][..],
            "--cloudwatch-endpoint needs --metrics cloudwatch",
        ),
        (
            &["--metrics", "cloudwatch", "--metrics", "cloudwatch"][..],
            "--metrics cloudwatch given twice",
        ),
    ] {
        let bad = aws_env(&mut Command::new(env!("CARGO_BIN_EXE_consumer")))
            .args(e.args())
            .args(["--stream", stream, "--application", app])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert_eq!(bad.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(want), "{extra:?}: {stderr}");
    }

    produce(
        &e,
        stream,
        &[
            "--create-stream",
            "--shards",
            "2",
            "--count",
            "20",
            "--payload-prefix",
            "v3-",
        ],
    );
    let started = Instant::now();
    let consumer = Consumer::start(
        &e,
        &[
            "--stream",
            stream,
            "--application",
            app,
            "--worker-id",
            "w3x",
            "--client-version",
            "3x",
            "--initial-position",
            "trim-horizon",
            "--failover-time-ms",
            "3000",
        ],
    );
    let first = consumer.take(1, Duration::from_secs(60));
    let first_in = started.elapsed();
    let mut lines = first;
    lines.extend(consumer.take(19, Duration::from_secs(60)));
    let all_in = started.elapsed();
    let mut payloads: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            use base64::Engine as _;
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v["data_b64"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        })
        .collect();
    payloads.sort();
    assert_eq!(
        payloads,
        (0..20).map(|i| format!("v3-{i:06}")).collect::<Vec<_>>()
    );
    let log = consumer.log();
    assert!(
        log.contains("client_version=CLIENT_VERSION_3X"),
        "the consumer should name the version it runs:\n{log}"
    );

    // The tables, as a Java worker reads them.
    let migration = state_item(&runtime, &e, &coordinator_state, "key", "Migration3.0")
        .expect("a Migration3.0 item");
    assert_eq!(
        s_attr(&migration, "cv"),
        "CLIENT_VERSION_3X",
        "{migration:?}"
    );
    assert_eq!(s_attr(&migration, "mb"), "w3x", "{migration:?}");
    assert!(migration["mts"].as_n().is_ok(), "{migration:?}");
    let leader =
        state_item(&runtime, &e, &coordinator_state, "key", "Leader").expect("a Leader item");
    assert_eq!(s_attr(&leader, "ownerName"), "w3x", "{leader:?}");
    assert_eq!(s_attr(&leader, "leaseDuration"), "3000", "{leader:?}");
    assert_eq!(
        s_attr(&leader, "recordVersionNumber").len(),
        36,
        "{leader:?}"
    );
    let row = state_item(&runtime, &e, &worker_metrics, "wid", "w3x").expect("a row");
    let lut: i64 = row["lut"].as_n().unwrap().parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - lut).abs() <= 5, "lut {lut} at {now}");
    let sts = row["sts"].as_m().unwrap();
    let opr = row["opr"].as_m().unwrap();
    assert!(
        sts.contains_key("C"),
        "CPU utilisation in the row by default: {row:?}"
    );
    assert_eq!(
        opr["C"].as_l().unwrap()[0].as_n().unwrap(),
        "100",
        "{row:?}"
    );

    // kcl shows it.
    let leases = json(&kcl(
        &e,
        &[
            "leases",
            "--application",
            app,
            "--interval-ms",
            "2500",
            "--json",
        ],
        None,
    ));
    assert_eq!(leases["client_version"], "CLIENT_VERSION_3X", "{leases}");
    assert_eq!(leases["leader"]["owner"], "w3x", "{leases}");
    assert_eq!(leases["leader"]["state"], "live", "{leases}");
    assert_eq!(leases["leader"]["lease_duration_ms"], 3000, "{leases}");
    let rows = leases["leases"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{leases}");
    assert!(
        rows.iter()
            .all(|r| r["owner"] == "w3x" && r["state"] == "live"),
        "{leases}"
    );
    let workers = json(&kcl(
        &e,
        &[
            "workers",
            "--application",
            app,
            "--interval-ms",
            "200",
            "--json",
        ],
        None,
    ));
    let w = &workers["workers"];
    assert_eq!(w.as_array().unwrap().len(), 1, "{workers}");
    assert_eq!(w[0]["worker_id"], "w3x", "{workers}");
    assert_eq!(w[0]["leases"], 2, "{workers}");
    assert_eq!(w[0]["leader"], true, "{workers}");
    assert_eq!(w[0]["metric_stats"]["fresh"], true, "{workers}");
    assert!(w[0]["metric_stats"]["cpu"].is_number(), "{workers}");
    let table = ok(&kcl(
        &e,
        &["workers", "--application", app, "--interval-ms", "2500"],
        None,
    ));
    let line: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(line.first(), Some(&"w3x"), "{table}");
    assert_eq!(line.last(), Some(&"leader"), "{table}");
    assert!(
        table.contains("client version CLIENT_VERSION_3X (set by w3x at ")
            && table.contains(
                "; leader w3x (live, leaseDuration 3000 ms); 1 WorkerMetricStats rows (1 fresh)"
            ),
        "{table}"
    );

    // A graceful stop releases the lock and takes the row away.
    consumer.stop();
    assert!(state_item(&runtime, &e, &coordinator_state, "key", "Leader").is_none());
    assert!(state_item(&runtime, &e, &worker_metrics, "wid", "w3x").is_none());
    let workers = json(&kcl(
        &e,
        &[
            "workers",
            "--application",
            app,
            "--interval-ms",
            "200",
            "--json",
        ],
        None,
    ));
    assert!(workers["leader"].is_null(), "{workers}");
    assert_eq!(workers["workers"], serde_json::json!([]), "{workers}");

    // --disable-worker-metrics: the row carries no metric, the worker still leads and
    // reads (the application stays in CLIENT_VERSION_3X).
    let restarted = Instant::now();
    let consumer = Consumer::start(
        &e,
        &[
            "--stream",
            stream,
            "--application",
            app,
            "--worker-id",
            "w3x-quiet",
            "--client-version",
            "3x",
            "--disable-worker-metrics",
            "--failover-time-ms",
            "3000",
        ],
    );
    produce(&e, stream, &["--count", "5", "--payload-prefix", "quiet-"]);
    let lines = consumer.take(5, Duration::from_secs(60));
    let restart_in = restarted.elapsed();
    assert!(
        lines.iter().all(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            // base64 of "quiet-".
            v["data_b64"].as_str().unwrap().starts_with("cXVpZXQt")
        }),
        "{lines:?}"
    );
    let row = state_item(&runtime, &e, &worker_metrics, "wid", "w3x-quiet").expect("a row");
    assert!(row["sts"].as_m().unwrap().is_empty(), "{row:?}");
    assert!(row["opr"].as_m().unwrap().is_empty(), "{row:?}");
    let leader =
        state_item(&runtime, &e, &coordinator_state, "key", "Leader").expect("a Leader item");
    assert_eq!(s_attr(&leader, "ownerName"), "w3x-quiet", "{leader:?}");
    let migration = state_item(&runtime, &e, &coordinator_state, "key", "Migration3.0").unwrap();
    assert_eq!(s_attr(&migration, "cv"), "CLIENT_VERSION_3X");
    consumer.stop();
    eprintln!(
        "3x consumer: first record {first_in:?}, all 20 {all_in:?} after its start \
         (failover 3 s, fresh leases); restarted with --disable-worker-metrics: 5 new \
         records {restart_in:?} after its start"
    );
}
