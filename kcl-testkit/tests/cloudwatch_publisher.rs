//! The CloudWatch publisher of `kcl_worker::export` against moto's CloudWatch on 127.0.0.1:
//! the data points it sends are read back (ListMetrics, GetMetricData) with their
//! dimensions and values; a CloudWatch that does not answer costs counted failures, never a
//! stall; a full queue drops and counts.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::time::{Duration, SystemTime};

use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat};
use kcl_testkit::emulators::{Emulator, EmulatorKind, sdk_config};
use kcl_worker::export::cloudwatch::{CloudWatchPublisher, client};
use kcl_worker::export::{Filtered, MetricsConfig};
use kcl_worker::metrics as m;

const NAMESPACE: &str = "KCLPublisherTest";

fn record_some(shard: &str) {
    let labels = m::shard_labels(shard);
    metrics::counter!(level: m::SUMMARY, m::RECORDS_PROCESSED, labels.clone()).increment(4);
    metrics::counter!(level: m::SUMMARY, m::RECORDS_PROCESSED, labels.clone()).increment(3);
    metrics::gauge!(level: m::SUMMARY, m::MILLIS_BEHIND_LATEST, labels.clone()).set(42.0);
    metrics::histogram!(level: m::DETAILED, m::GET_RECORDS_TIME, labels.clone()).record(3.0);
    metrics::histogram!(level: m::DETAILED, m::GET_RECORDS_TIME, labels).record(5.0);
}

fn dimensions(shard: &str) -> Vec<Dimension> {
    vec![
        Dimension::builder()
            .name("Operation")
            .value("ProcessTask")
            .build(),
        Dimension::builder().name("ShardId").value(shard).build(),
    ]
}

async fn statistic(
    cw: &aws_sdk_cloudwatch::Client,
    name: &str,
    shard: &str,
    stat: &str,
) -> Vec<f64> {
    // The points of one test may fall on both sides of a minute boundary (two 60 s periods):
    // the statistic over the whole window is the periods' sum (Sum, SampleCount) or maximum.
    let now = SystemTime::now();
    let query = MetricDataQuery::builder()
        .id("q")
        .metric_stat(
            MetricStat::builder()
                .metric(
                    Metric::builder()
                        .namespace(NAMESPACE)
                        .metric_name(name)
                        .set_dimensions(Some(dimensions(shard)))
                        .build(),
                )
                .period(60)
                .stat(stat)
                .build(),
        )
        .build();
    let out = cw
        .get_metric_data()
        .metric_data_queries(query)
        .start_time((now - Duration::from_secs(600)).into())
        .end_time((now + Duration::from_secs(600)).into())
        .send()
        .await
        .unwrap();
    let values: Vec<f64> = out
        .metric_data_results()
        .iter()
        .flat_map(|r| r.values().to_vec())
        .collect();
    if values.is_empty() {
        return values;
    }
    let whole = match stat {
        "Maximum" => values.iter().copied().fold(f64::MIN, f64::max),
        "Minimum" => values.iter().copied().fold(f64::MAX, f64::min),
        _ => values.iter().sum(),
    };
    vec![whole]
}

// One thread: a flush queues all its points before the sender runs (deterministic batches).
#[tokio::test]
async fn data_points_reach_cloudwatch_and_read_back() {
    let moto = Emulator::start(EmulatorKind::Moto).unwrap_or_else(|e| panic!("{e}"));
    let config = MetricsConfig::new(NAMESPACE).with_metrics_buffer_time(Duration::from_secs(3600));
    let sdk = sdk_config(moto.endpoint());
    let (publisher, recorder) =
        CloudWatchPublisher::start(client(&sdk, Some(moto.endpoint()), &config), &config).unwrap();
    let filtered = Filtered::new(recorder, &config);
    metrics::with_local_recorder(&filtered, || record_some("shardId-000000000001"));
    assert!(
        publisher.flush(Duration::from_secs(20)).await,
        "flush timed out"
    );
    let stats = publisher.stats();
    assert_eq!(
        (stats.queued, stats.sent, stats.failed_requests),
        (3, 3, 0),
        "{stats:?}"
    );
    assert_eq!(stats.requests, 1, "one batched call: {stats:?}");

    let cw = aws_sdk_cloudwatch::Client::new(&sdk);
    let listed = cw.list_metrics().namespace(NAMESPACE).send().await.unwrap();
    let mut names: Vec<String> = listed
        .metrics()
        .iter()
        .map(|mt| {
            let mut dims: Vec<String> = mt
                .dimensions()
                .iter()
                .map(|d| format!("{}={}", d.name().unwrap_or(""), d.value().unwrap_or("")))
                .collect();
            dims.sort();
            format!("{} {}", mt.metric_name().unwrap_or(""), dims.join(","))
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "KinesisDataFetcher.getRecords.Time Operation=ProcessTask,ShardId=shardId-000000000001",
            "MillisBehindLatest Operation=ProcessTask,ShardId=shardId-000000000001",
            "RecordsProcessed Operation=ProcessTask,ShardId=shardId-000000000001",
        ]
    );
    let shard = "shardId-000000000001";
    assert_eq!(
        statistic(&cw, "RecordsProcessed", shard, "Sum").await,
        [7.0]
    );
    assert_eq!(
        statistic(&cw, "MillisBehindLatest", shard, "Maximum").await,
        [42.0]
    );
    assert_eq!(
        statistic(
            &cw,
            "KinesisDataFetcher.getRecords.Time",
            shard,
            "SampleCount"
        )
        .await,
        [2.0]
    );
    assert_eq!(
        statistic(&cw, "KinesisDataFetcher.getRecords.Time", shard, "Sum").await,
        [8.0]
    );

    // A counter that did not move since the last flush sends nothing; a moved one its delta.
    metrics::with_local_recorder(&filtered, || {
        metrics::counter!(level: m::SUMMARY, m::RECORDS_PROCESSED, m::shard_labels(shard))
            .increment(5);
    });
    assert!(publisher.flush(Duration::from_secs(20)).await);
    // The gauge is sent again (its current value), the counter's delta 5.
    assert_eq!(publisher.stats().sent, 5, "{:?}", publisher.stats());
    assert_eq!(
        statistic(&cw, "RecordsProcessed", shard, "Sum").await,
        [12.0]
    );
    // A retired gauge (the worker stopped reading the shard: NaN) is no longer sent.
    metrics::with_local_recorder(&filtered, || {
        metrics::gauge!(level: m::SUMMARY, m::MILLIS_BEHIND_LATEST, m::shard_labels(shard))
            .set(f64::NAN);
    });
    assert!(publisher.flush(Duration::from_secs(20)).await);
    assert_eq!(publisher.stats().sent, 5, "{:?}", publisher.stats());
    let final_stats = publisher.shutdown().await;
    assert_eq!(final_stats.failed, 0);
}

// One thread: a flush queues all its points before the sender runs (deterministic batches).
#[tokio::test]
async fn an_unreachable_cloudwatch_is_counted_and_a_full_queue_drops() {
    // Nothing listens on this port: every call fails fast (connection refused).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = MetricsConfig::new(NAMESPACE)
        .with_metrics_buffer_time(Duration::from_secs(3600))
        .with_metrics_max_queue_size(2)
        .with_call_timeout(Duration::from_secs(2));
    let sdk = sdk_config(&endpoint);
    let (publisher, recorder) =
        CloudWatchPublisher::start(client(&sdk, Some(&endpoint), &config), &config).unwrap();
    let filtered = Filtered::new(recorder, &config);
    metrics::with_local_recorder(&filtered, || {
        for i in 0..5 {
            metrics::counter!(level: m::SUMMARY, m::RECORDS_PROCESSED, m::shard_labels(&format!("s-{i}")))
                .increment(1);
        }
    });
    let started = std::time::Instant::now();
    assert!(publisher.flush(Duration::from_secs(20)).await);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let stats = publisher.stats();
    assert_eq!((stats.queued, stats.dropped), (2, 3), "{stats:?}");
    assert_eq!((stats.sent, stats.failed), (0, 2), "{stats:?}");
    assert!(stats.failed_requests >= 1, "{stats:?}");
    publisher.shutdown().await;
}
