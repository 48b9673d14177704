//! `AwsStreamClient` on the real SDK: against kinesis-local (started by the test kit's fixture;
//! the tests fail when it is not installed), and against a loopback server with canned
//! answers for the errors kinesis-local cannot produce (throttling, KMS, timeouts).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::num::NonZeroU32;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_kinesis::config::retry::RetryConfig;
use aws_sdk_kinesis::config::timeout::TimeoutConfig;
use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kinesis::primitives::Blob;
use bytes::Bytes;
use kcl_kpl::{HashKeyRange, MAX_HASH_KEY, Record, SequenceNumber};
use kcl_testkit::emulators::{
    Emulator, EmulatorKind, create_stream_and_wait, kinesis_client, sdk_config, wait_stream_active,
};
use kcl_testkit::kinesis::scenario::{StreamAdmin, error_kind, run_conformance_scenario};
use kcl_testkit::kinesis::{InMemoryKinesis, PutResult};
use kcl_worker::aws::AwsStreamClient;
use kcl_worker::stream::{IteratorPosition, ShardFilter, StreamClient, StreamError};

// ---------------------------------------------------------------------------------------------
// kinesis-local

/// One kinesis-local for the whole binary (each test uses its own streams); the fixture's
/// watchdog stops it when the process exits.
fn emulator() -> &'static Emulator {
    static KINESIS_LOCAL: OnceLock<Emulator> = OnceLock::new();
    KINESIS_LOCAL.get_or_init(|| {
        Emulator::start(EmulatorKind::KinesisLocal)
            .unwrap_or_else(|err| panic!("kinesis-local is required for these tests: {err}"))
    })
}

fn sdk() -> aws_sdk_kinesis::Client {
    kinesis_client(emulator().endpoint())
}

fn sdk_without_retries() -> aws_sdk_kinesis::Client {
    let config = aws_sdk_kinesis::config::Builder::from(&sdk_config(emulator().endpoint()))
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_kinesis::Client::from_conf(config)
}

fn sid(n: usize) -> String {
    format!("shardId-{n:012}")
}

fn texts(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
        .collect()
}

/// Producer and admin calls through the SDK, waiting for `ACTIVE` after each change.
struct SdkAdmin {
    client: aws_sdk_kinesis::Client,
}

impl SdkAdmin {
    fn new() -> Self {
        Self { client: sdk() }
    }

    async fn wait_active(&self, stream: &str) -> Result<(), StreamError> {
        wait_stream_active(&self.client, stream, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(service)
    }
}

fn service<E: std::error::Error + Send + Sync + 'static>(err: E) -> StreamError {
    StreamError::Service {
        source: Box::new(err),
    }
}

#[async_trait]
impl StreamAdmin for SdkAdmin {
    async fn create_stream(&self, stream: &str, shard_count: u32) -> Result<(), StreamError> {
        let shards = i32::try_from(shard_count).unwrap();
        create_stream_and_wait(&self.client, stream, shards, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(service)
    }

    async fn put_record(
        &self,
        stream: &str,
        partition_key: &str,
        data: Bytes,
    ) -> Result<PutResult, StreamError> {
        let output = self
            .client
            .put_record()
            .stream_name(stream)
            .partition_key(partition_key)
            .data(Blob::new(data.to_vec()))
            .send()
            .await
            .map_err(service)?;
        Ok(PutResult {
            shard_id: output.shard_id,
            sequence_number: SequenceNumber::parse(&output.sequence_number).unwrap(),
        })
    }

    async fn split_shard(
        &self,
        stream: &str,
        shard_id: &str,
        new_starting_hash_key: u128,
    ) -> Result<(), StreamError> {
        self.client
            .split_shard()
            .stream_name(stream)
            .shard_to_split(shard_id)
            .new_starting_hash_key(new_starting_hash_key.to_string())
            .send()
            .await
            .map_err(service)?;
        self.wait_active(stream).await
    }

    async fn merge_shards(
        &self,
        stream: &str,
        shard_id: &str,
        adjacent_shard_id: &str,
    ) -> Result<(), StreamError> {
        self.client
            .merge_shards()
            .stream_name(stream)
            .shard_to_merge(shard_id)
            .adjacent_shard_to_merge(adjacent_shard_id)
            .send()
            .await
            .map_err(service)?;
        self.wait_active(stream).await
    }
}

/// Reads from `position` until the shard ends or a page at the tip comes back empty.
async fn read_all(
    client: &AwsStreamClient,
    stream: &str,
    shard: &str,
    position: IteratorPosition,
) -> (Vec<Record>, kcl_worker::stream::GetRecordsOutput) {
    let mut iterator = client
        .get_shard_iterator(stream, shard, &position)
        .await
        .unwrap();
    let mut records = Vec::new();
    for _ in 0..50 {
        let mut output = client.get_records(&iterator, 100).await.unwrap();
        let empty = output.records.is_empty();
        records.append(&mut output.records);
        match output.next_shard_iterator.clone() {
            Some(next) if !empty => iterator = next,
            _ => return (records, output),
        }
    }
    panic!("{shard} did not reach its tip in 50 calls");
}

#[tokio::test]
async fn lists_shards_in_pages_and_with_filters() {
    let admin = SdkAdmin::new();
    admin.create_stream("list-shards", 5).await.unwrap();
    let client =
        AwsStreamClient::new(sdk()).with_list_shards_page_size(NonZeroU32::new(2).unwrap());

    let first = client
        .list_shards_page("list-shards", None, None)
        .await
        .unwrap();
    assert_eq!(first.shards.len(), 2);
    let token = first.next_token.clone().expect("a next token");
    // Only the token is sent with a token (kinesis-local, like the service, rejects a
    // StreamName next to a NextToken).
    let second = client
        .list_shards_page("list-shards", Some(&token), None)
        .await
        .unwrap();
    assert_eq!(second.shards.len(), 2);
    assert_eq!(second.shards[0].shard_id, sid(2));
    let all = client.list_all_shards("list-shards", None).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|s| s.shard_id.as_str()).collect();
    assert_eq!(ids, [sid(0), sid(1), sid(2), sid(3), sid(4)]);

    // The same layout as the in-memory fake's.
    let fake = InMemoryKinesis::new();
    fake.create_stream("list-shards", 5).unwrap();
    let fake_shards = fake.list_all_shards("list-shards", None).await.unwrap();
    let ranges: Vec<HashKeyRange> = all.iter().map(|s| s.hash_key_range).collect();
    let fake_ranges: Vec<HashKeyRange> = fake_shards.iter().map(|s| s.hash_key_range).collect();
    assert_eq!(ranges, fake_ranges);
    assert!(
        all.iter()
            .all(|s| !s.is_closed() && s.parent_shard_id.is_none())
    );
    assert!(
        all.iter()
            .all(|s| s.starting_sequence_number.as_str().len() > 20)
    );

    admin
        .split_shard("list-shards", &sid(0), ranges[0].end() / 2)
        .await
        .unwrap();
    let latest = client
        .list_all_shards("list-shards", Some(&ShardFilter::AtLatest))
        .await
        .unwrap();
    let ids: Vec<&str> = latest.iter().map(|s| s.shard_id.as_str()).collect();
    assert_eq!(ids, [sid(1), sid(2), sid(3), sid(4), sid(5), sid(6)]);
    let after = client
        .list_all_shards("list-shards", Some(&ShardFilter::AfterShardId(sid(3))))
        .await
        .unwrap();
    let ids: Vec<&str> = after.iter().map(|s| s.shard_id.as_str()).collect();
    assert_eq!(ids, [sid(4), sid(5), sid(6)]);
    let everything = client
        .list_all_shards("list-shards", Some(&ShardFilter::FromTrimHorizon))
        .await
        .unwrap();
    assert_eq!(everything.len(), 7);
    assert!(everything[0].is_closed());
    assert_eq!(
        everything[5].parent_shard_id.as_deref(),
        Some(sid(0).as_str())
    );
    let summary = client.describe_stream_summary("list-shards").await.unwrap();
    assert_eq!(summary.stream_name, "list-shards");
    assert_eq!(summary.status, "ACTIVE");
    assert_eq!(summary.open_shard_count, 6);
    assert_eq!(summary.retention_period_hours, 24);
    assert!(summary.stream_arn.ends_with(":stream/list-shards"));
}

#[tokio::test]
async fn iterators_of_every_type_and_millis_behind_latest() {
    let admin = SdkAdmin::new();
    admin.create_stream("positions", 1).await.unwrap();
    let client = AwsStreamClient::new(sdk());
    let mut puts = Vec::new();
    for i in 0..4 {
        puts.push(
            admin
                .put_record("positions", "key", Bytes::from(format!("r{i}")))
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let shard = sid(0);
    let (records, last) =
        read_all(&client, "positions", &shard, IteratorPosition::TrimHorizon).await;
    assert_eq!(texts(&records), ["r0", "r1", "r2", "r3"]);
    assert_eq!(last.millis_behind_latest, Some(0));
    for (record, put) in records.iter().zip(&puts) {
        assert_eq!(record.sequence_number, put.sequence_number);
        assert_eq!(record.partition_key, "key");
        assert_eq!(record.sub_sequence_number, 0);
        assert!(!record.aggregated);
        assert_eq!(record.encryption_type.as_deref(), Some("NONE"));
        assert!(record.approximate_arrival_timestamp.is_some());
    }
    for pair in records.windows(2) {
        assert!(pair[0].sequence_number < pair[1].sequence_number);
    }

    // Behind the tip, MillisBehindLatest is positive; at the tip it is 0.
    let iterator = client
        .get_shard_iterator("positions", &shard, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    let first = client.get_records(&iterator, 1).await.unwrap();
    assert_eq!(texts(&first.records), ["r0"]);
    assert!(
        first.millis_behind_latest.unwrap() > 0,
        "{:?}",
        first.millis_behind_latest
    );

    let n1 = records[1].sequence_number.clone();
    let (at, _) = read_all(
        &client,
        "positions",
        &shard,
        IteratorPosition::AtSequenceNumber(n1.clone()),
    )
    .await;
    assert_eq!(texts(&at), ["r1", "r2", "r3"]);
    let (after, _) = read_all(
        &client,
        "positions",
        &shard,
        IteratorPosition::AfterSequenceNumber(n1),
    )
    .await;
    assert_eq!(texts(&after), ["r2", "r3"]);
    let arrival = records[2].approximate_arrival_timestamp.unwrap();
    let (from_time, _) = read_all(
        &client,
        "positions",
        &shard,
        IteratorPosition::AtTimestamp(arrival),
    )
    .await;
    assert_eq!(texts(&from_time), ["r2", "r3"]);

    let latest = client
        .get_shard_iterator("positions", &shard, &IteratorPosition::Latest)
        .await
        .unwrap();
    let empty = client.get_records(&latest, 10).await.unwrap();
    assert!(empty.records.is_empty());
    assert_eq!(empty.millis_behind_latest, Some(0));
    admin
        .put_record("positions", "key", Bytes::from_static(b"new"))
        .await
        .unwrap();
    let out = client
        .get_records(&empty.next_shard_iterator.unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(texts(&out.records), ["new"]);
}

#[tokio::test]
async fn a_split_parent_read_to_its_end_has_no_iterator_and_names_its_children() {
    let admin = SdkAdmin::new();
    admin.create_stream("split", 1).await.unwrap();
    let client = AwsStreamClient::new(sdk());
    for i in 0..3 {
        admin
            .put_record("split", &format!("k{i}"), Bytes::from(format!("p{i}")))
            .await
            .unwrap();
    }
    let middle = 1u128 << 127;
    admin.split_shard("split", &sid(0), middle).await.unwrap();

    let mut iterator = client
        .get_shard_iterator("split", &sid(0), &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    let mut records = Vec::new();
    let end = loop {
        let mut out = client.get_records(&iterator, 2).await.unwrap();
        records.append(&mut out.records);
        match out.next_shard_iterator.take() {
            Some(next) => {
                assert!(out.child_shards.is_empty());
                iterator = next;
            }
            None => break out,
        }
    };
    assert_eq!(texts(&records), ["p0", "p1", "p2"]);
    assert_eq!(end.child_shards.len(), 2);
    assert_eq!(end.child_shards[0].shard_id, sid(1));
    assert_eq!(end.child_shards[0].parent_shard_ids, [sid(0)]);
    assert_eq!(
        end.child_shards[0].hash_key_range,
        HashKeyRange::new(0, middle - 1).unwrap()
    );
    assert_eq!(end.child_shards[1].shard_id, sid(2));
    assert_eq!(
        end.child_shards[1].hash_key_range,
        HashKeyRange::new(middle, MAX_HASH_KEY).unwrap()
    );

    // A fresh iterator after the end behaves the same.
    let latest = client
        .get_shard_iterator("split", &sid(0), &IteratorPosition::Latest)
        .await
        .unwrap();
    let out = client.get_records(&latest, 10).await.unwrap();
    assert!(out.records.is_empty());
    assert!(out.next_shard_iterator.is_none());
    assert_eq!(out.child_shards, end.child_shards);

    let shards = client.list_all_shards("split", None).await.unwrap();
    assert!(shards[0].is_closed());
    assert!(
        shards[1..]
            .iter()
            .all(|s| s.parent_shard_id.as_deref() == Some(sid(0).as_str()))
    );
}

#[tokio::test]
async fn missing_streams_shards_and_garbage_iterators() {
    let admin = SdkAdmin::new();
    admin.create_stream("errors", 1).await.unwrap();
    let client = AwsStreamClient::new(sdk_without_retries());
    assert!(matches!(
        client.list_shards_page("no-such-stream", None, None).await,
        Err(StreamError::StreamNotFound { stream }) if stream == "no-such-stream"
    ));
    assert!(matches!(
        client.describe_stream_summary("no-such-stream").await,
        Err(StreamError::StreamNotFound { .. })
    ));
    assert!(matches!(
        client
            .get_shard_iterator("no-such-stream", &sid(0), &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::StreamNotFound { .. })
    ));
    assert!(matches!(
        client
            .get_shard_iterator("errors", &sid(7), &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    let iterator = client
        .get_shard_iterator("errors", &sid(0), &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    for limit in [0, 10_001] {
        assert!(matches!(
            client.get_records(&iterator, limit).await,
            Err(StreamError::InvalidArgument { .. })
        ));
    }
    // kinesis-local cannot decrypt a garbage iterator and answers HTTP 500 with an empty
    // body, which is a (retryable) `Service` error. The service answers InvalidArgument; the
    // in-memory fake does too.
    let garbage = client.get_records("garbage", 10).await.unwrap_err();
    assert!(
        matches!(garbage, StreamError::Service { .. }),
        "{garbage:?}"
    );
    let fake = InMemoryKinesis::new();
    assert_eq!(
        error_kind(&fake.get_records("garbage", 10).await.unwrap_err()),
        "InvalidArgument"
    );
}

#[tokio::test]
async fn the_conformance_scenario_gives_the_same_answers_on_kinesis_local_and_the_fake() {
    let admin = SdkAdmin::new();
    let client = AwsStreamClient::new(sdk());
    let emulated = run_conformance_scenario(&admin, &client, "conformance")
        .await
        .unwrap();
    let fake = InMemoryKinesis::new();
    let simulated = run_conformance_scenario(&fake, &fake, "conformance")
        .await
        .unwrap();
    for (line, (a, b)) in emulated.iter().zip(&simulated).enumerate() {
        assert_eq!(a, b, "fact {line} differs (kinesis-local, then the fake)");
    }
    assert_eq!(emulated.len(), simulated.len());
}

// ---------------------------------------------------------------------------------------------
// Canned answers on loopback

const SECRET: &str = "canned-secret-key-never-printed";

/// A one-connection-at-a-time HTTP server on 127.0.0.1 that answers every request with the
/// same status and body (or never answers, when `body` is `None`), for `connections`
/// connections or 10 s, whichever comes first.
struct CannedServer {
    endpoint: String,
    handle: Option<JoinHandle<Vec<String>>>,
}

impl CannedServer {
    fn start(status: u16, body: Option<&'static str>, connections: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut requests = Vec::new();
            let mut held = Vec::new();
            while requests.len() < connections && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        requests.push(read_request(&stream));
                        match body {
                            Some(body) => answer(stream, status, body),
                            None => held.push(stream),
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            requests
        });
        Self {
            endpoint,
            handle: Some(handle),
        }
    }

    /// The requests received: the target operation (`X-Amz-Target`), a space, the body.
    fn finish(mut self) -> Vec<String> {
        self.handle.take().unwrap().join().unwrap()
    }
}

fn read_request(mut stream: &TcpStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the request ended");
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0);
        buffer.extend_from_slice(&chunk[..n]);
    }
    let target = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-amz-target")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let body = String::from_utf8_lossy(&buffer[header_end..header_end + length]);
    format!("{target} {body}")
}

fn answer(mut stream: TcpStream, status: u16, body: &str) {
    let response = format!(
        "HTTP/1.1 {status} Canned\r\ncontent-type: application/x-amz-json-1.1\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).unwrap();
    stream.flush().unwrap();
}

fn canned_client(endpoint: &str) -> AwsStreamClient {
    let config = aws_sdk_kinesis::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "AKIDCANNEDTEST",
            SECRET,
            None,
            None,
            "canned",
        ))
        .endpoint_url(endpoint)
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_millis(500))
                .build(),
        )
        .build();
    AwsStreamClient::new(aws_sdk_kinesis::Client::from_conf(config))
}

fn error_json(code: &str) -> &'static str {
    Box::leak(format!(r#"{{"__type":"{code}","message":"canned {code}"}}"#).into_boxed_str())
}

#[tokio::test]
async fn service_errors_map_to_stream_errors() {
    let cases = [
        (400, "ProvisionedThroughputExceededException", "Throttled"),
        (400, "KMSThrottlingException", "Throttled"),
        (400, "LimitExceededException", "Throttled"),
        (400, "ExpiredIteratorException", "ExpiredIterator"),
        (400, "InvalidArgumentException", "InvalidArgument"),
        (400, "ResourceNotFoundException", "ResourceNotFound"),
        (400, "KMSAccessDeniedException", "Service"),
        (400, "KMSDisabledException", "Service"),
        (400, "AccessDeniedException", "Service"),
        (500, "InternalFailure", "Service"),
        (503, "ServiceUnavailable", "Service"),
    ];
    for (status, code, kind) in cases {
        let server = CannedServer::start(status, Some(error_json(code)), 1);
        let client = canned_client(&server.endpoint);
        let err = client.get_records("some-iterator", 10).await.unwrap_err();
        assert_eq!(error_kind(&err), kind, "{code}: {err:?}");
        assert_eq!(
            err.is_retryable(),
            matches!(kind, "Throttled" | "Service"),
            "{code}"
        );
        let requests = server.finish();
        assert_eq!(requests.len(), 1);
        assert!(
            requests[0].starts_with("Kinesis_20131202.GetRecords {"),
            "{requests:?}"
        );
        if kind == "Throttled" || kind == "Service" {
            let source = std::error::Error::source(&err).unwrap().to_string();
            assert!(
                source.contains(code) || source.contains("canned"),
                "{source}"
            );
            assert!(
                !err.to_string().contains(&source),
                "Display does not repeat the cause"
            );
        }
    }

    // ResourceNotFound: the stream, for stream-level calls.
    let body =
        r#"{"__type":"ResourceNotFoundException","message":"Stream s under account 1 not found."}"#;
    for call in 0..3 {
        let server = CannedServer::start(400, Some(body), 1);
        let client = canned_client(&server.endpoint);
        let result = match call {
            0 => client.list_shards_page("s", None, None).await.map(|_| ()),
            1 => client.describe_stream_summary("s").await.map(|_| ()),
            _ => client
                .get_shard_iterator("s", &sid(0), &IteratorPosition::Latest)
                .await
                .map(|_| ()),
        };
        assert!(
            matches!(result, Err(StreamError::StreamNotFound { ref stream }) if stream == "s"),
            "{result:?}"
        );
        server.finish();
    }
    let body = r#"{"__type":"ResourceNotFoundException","message":"Shard shardId-000000000007 in stream s under account 1 does not exist"}"#;
    let server = CannedServer::start(400, Some(body), 1);
    let result = canned_client(&server.endpoint)
        .get_shard_iterator("s", &sid(7), &IteratorPosition::Latest)
        .await;
    assert!(
        matches!(result, Err(StreamError::ResourceNotFound { .. })),
        "{result:?}"
    );
    server.finish();
}

#[tokio::test]
async fn transport_failures_are_unreachable() {
    // Nobody listens: connection refused.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = canned_client(&format!("http://127.0.0.1:{port}"));
    let err = client.get_records("it", 10).await.unwrap_err();
    assert!(matches!(err, StreamError::Unreachable { .. }), "{err:?}");
    assert!(err.is_retryable());

    // A server that never answers: the attempt timeout.
    let server = CannedServer::start(200, None, 1);
    let client = canned_client(&server.endpoint);
    let err = client.list_shards_page("s", None, None).await.unwrap_err();
    assert!(matches!(err, StreamError::Unreachable { .. }), "{err:?}");
    server.finish();
}

#[tokio::test]
async fn malformed_answers_are_reported_not_panicked_on() {
    let cases = [
        r#"{"Records":[{"SequenceNumber":"12x","Data":"aGk=","PartitionKey":"k"}],"NextShardIterator":"n","MillisBehindLatest":0}"#,
        r#"{"Records":[],"NextShardIterator":null,"ChildShards":[{"ShardId":"shardId-000000000001","ParentShards":["shardId-000000000000"],"HashKeyRange":{"StartingHashKey":"5","EndingHashKey":"4"}}]}"#,
    ];
    for body in cases {
        let server = CannedServer::start(200, Some(body), 1);
        let err = canned_client(&server.endpoint)
            .get_records("it", 10)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StreamError::MalformedResponse { .. }),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        server.finish();
    }
    let body = r#"{"Shards":[{"ShardId":"shardId-000000000000","HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"340282366920938463463374607431768211456"},"SequenceNumberRange":{"StartingSequenceNumber":"1"}}]}"#;
    let server = CannedServer::start(200, Some(body), 1);
    let err = canned_client(&server.endpoint)
        .list_shards_page("s", None, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StreamError::MalformedResponse { .. }),
        "{err:?}"
    );
    server.finish();

    // A good answer converts every field.
    let body = r#"{"Records":[{"SequenceNumber":"49590338271490256608559692538361571095921575989136588898","Data":"aGk=","PartitionKey":"k","ApproximateArrivalTimestamp":1700000000.5,"EncryptionType":"KMS"}],"NextShardIterator":null,"MillisBehindLatest":42,"ChildShards":[{"ShardId":"shardId-000000000001","ParentShards":["shardId-000000000000"],"HashKeyRange":{"StartingHashKey":"0","EndingHashKey":"10"}}]}"#;
    let server = CannedServer::start(200, Some(body), 1);
    let out = canned_client(&server.endpoint)
        .get_records("it", 10)
        .await
        .unwrap();
    server.finish();
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.records[0].data, Bytes::from_static(b"hi"));
    assert_eq!(
        out.records[0].approximate_arrival_timestamp,
        Some(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500))
    );
    assert_eq!(out.records[0].encryption_type.as_deref(), Some("KMS"));
    assert_eq!(out.millis_behind_latest, Some(42));
    assert!(out.next_shard_iterator.is_none());
    assert_eq!(
        out.child_shards[0].hash_key_range,
        HashKeyRange::new(0, 10).unwrap()
    );
}

#[tokio::test]
async fn list_shards_sends_only_the_token_with_a_token() {
    let body = r#"{"Shards":[],"NextToken":null}"#;
    let server = CannedServer::start(200, Some(body), 1);
    let client = canned_client(&server.endpoint);
    let page = client
        .list_shards_page("s", Some("tok"), Some(&ShardFilter::AtLatest))
        .await
        .unwrap();
    assert!(page.shards.is_empty() && page.next_token.is_none());
    let requests = server.finish();
    assert_eq!(requests.len(), 1);
    let (target, body) = requests[0].split_once(' ').unwrap();
    assert_eq!(target, "Kinesis_20131202.ListShards");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body, serde_json::json!({"NextToken": "tok"}));

    // Without a token: the stream, the filter and the page size.
    let server = CannedServer::start(200, Some(r#"{"Shards":[],"NextToken":"next"}"#), 1);
    let client = canned_client(&server.endpoint)
        .with_list_shards_page_size(NonZeroU32::new(20_000).unwrap());
    let page = client
        .list_shards_page("s", None, Some(&ShardFilter::AfterShardId(sid(3))))
        .await
        .unwrap();
    assert_eq!(page.next_token.as_deref(), Some("next"));
    let requests = server.finish();
    let body: serde_json::Value =
        serde_json::from_str(requests[0].split_once(' ').unwrap().1).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "StreamName": "s",
            "MaxResults": 10000,
            "ShardFilter": {"Type": "AFTER_SHARD_ID", "ShardId": sid(3)}
        })
    );
}

#[test]
fn debug_shows_no_credentials() {
    let client =
        canned_client("http://127.0.0.1:9").with_list_shards_page_size(NonZeroU32::new(3).unwrap());
    let debug = format!("{client:?}");
    assert!(
        debug.contains("AwsStreamClient") && debug.contains('3'),
        "{debug}"
    );
    assert!(
        !debug.contains(SECRET) && !debug.contains("AKIDCANNEDTEST"),
        "{debug}"
    );
}

/// Enhanced fan-out through the SDK: register, describe until ACTIVE, subscribe; the event
/// stream outlives the SDK's attempt and call timeouts (they bound the call, not the
/// subscription), carries continuation numbers, and a fresh resubscribe meets ResourceInUse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_through_the_sdk_outlives_the_call_timeouts() {
    let stream = "sdk-fan-out";
    let sdk = sdk();
    create_stream_and_wait(&sdk, stream, 1, Duration::from_secs(30))
        .await
        .unwrap();
    // Call timeouts of 1 s / 2 s, as AwsOptions gives the worker's clients.
    let timeouts = kcl_lease::CallTimeouts::new(Duration::from_secs(1), Duration::from_secs(2));
    let conf = aws_sdk_kinesis::config::Builder::from(&sdk_config(emulator().endpoint()))
        .timeout_config(kcl_worker::aws::sdk_timeout_config(&timeouts))
        .build();
    let client = AwsStreamClient::new(aws_sdk_kinesis::Client::from_conf(conf));
    let arn = client
        .describe_stream_summary(stream)
        .await
        .unwrap()
        .stream_arn;
    let registered = client
        .register_stream_consumer(&arn, "sdk-app")
        .await
        .unwrap();
    assert!(matches!(
        client.register_stream_consumer(&arn, "sdk-app").await,
        Err(StreamError::ResourceInUse { .. })
    ));
    let started = Instant::now();
    loop {
        let c = client
            .describe_stream_consumer(&arn, "sdk-app")
            .await
            .unwrap();
        if c.status == kcl_worker::stream::ConsumerStatus::Active {
            assert_eq!(c.consumer_arn, registered.consumer_arn);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // DescribeStreamConsumer by ConsumerARN alone: the stream ARN comes back; an unknown
    // consumer is ResourceNotFound.
    let by_arn = client
        .describe_stream_consumer_by_arn(&registered.consumer_arn)
        .await
        .unwrap();
    assert_eq!(
        (by_arn.consumer_name.as_str(), by_arn.stream_arn.as_str()),
        ("sdk-app", arn.as_str())
    );
    assert_eq!(registered.stream_arn, arn);
    assert!(matches!(
        client
            .describe_stream_consumer_by_arn(&format!("{arn}/consumer/nobody:1"))
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    let put = sdk
        .put_record()
        .stream_name(stream)
        .partition_key("k")
        .data(Blob::new(b"first".to_vec()))
        .send()
        .await
        .unwrap();
    let mut sub = client
        .subscribe_to_shard(
            &registered.consumer_arn,
            "shardId-000000000000",
            &IteratorPosition::TrimHorizon,
        )
        .await
        .unwrap();
    let mut records = Vec::new();
    let mut events = 0;
    let subscribed = Instant::now();
    while subscribed.elapsed() < Duration::from_secs(5) {
        let event = sub.next_event().await.unwrap().expect("not ended");
        events += 1;
        records.extend(event.records);
        assert!(event.continuation_sequence_number.is_some());
    }
    assert!(events >= 3, "{events} events in 5 s");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].sequence_number.as_str(), put.sequence_number());
    // A second subscription while this one is open: ResourceInUse (from kinesis-local on the
    // event stream).
    let mut second = client
        .subscribe_to_shard(
            &registered.consumer_arn,
            "shardId-000000000000",
            &IteratorPosition::TrimHorizon,
        )
        .await;
    let refused = match &mut second {
        Err(e) => matches!(e, StreamError::ResourceInUse { .. }),
        Ok(s) => matches!(s.next_event().await, Err(StreamError::ResourceInUse { .. })),
    };
    assert!(refused, "a second subscription is refused");
}
