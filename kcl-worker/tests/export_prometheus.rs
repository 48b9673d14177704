//! The Prometheus endpoint of `kcl_worker::export`, scraped over HTTP on 127.0.0.1 while a
//! worker consumes an in-memory stream: the Java KCL's metric names with their dimensions
//! (`Operation`, `ShardId`, `WorkerIdentifier`) as labels, counts that match what was
//! delivered, and nothing else on other paths.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use kcl_worker::export::http::get;
use kcl_worker::export::prometheus::PrometheusEndpoint;
use kcl_worker::export::{MetricsConfig, install};
use kcl_worker::stream::StreamClient;
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::recording::Behaviour;

/// The value of the sample line `name{labels}` (labels in the exporter's order), if any.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_serves_the_java_kcl_metrics() {
    let mut endpoint = PrometheusEndpoint::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = endpoint.local_addr();
    assert!(addr.ip().is_loopback());
    install(
        vec![Box::new(endpoint.take_recorder().unwrap())],
        &MetricsConfig::new("app"),
    )
    .unwrap();

    let fleet = Fleet::new("s", 2).unwrap().with_defaults(|b| {
        b.failover_time(Duration::from_secs(2))
            .idle_time_between_reads(Duration::from_millis(50))
    });
    for i in 0..40 {
        fleet
            .kinesis()
            .put_record("s", &format!("k{i}"), None, Bytes::from(vec![b'x'; 5]))
            .unwrap();
    }
    let (handle, _) = fleet.start("w1", Behaviour::new()).await.unwrap();
    fleet
        .wait_until("every record", Duration::from_secs(60), |f| {
            f.log().delivered_count() >= 40
        })
        .await
        .unwrap();
    let shards: Vec<String> = fleet
        .kinesis()
        .list_all_shards("s", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.shard_id)
        .collect();

    // Scrape until a renewal round and both shards' counts are in (bounded).
    let started = Instant::now();
    let body = loop {
        let (status, body) = get(addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        let records: f64 = shards
            .iter()
            .filter_map(|s| {
                sample(
                    &body,
                    &format!("RecordsProcessed{{Operation=\"ProcessTask\",ShardId=\"{s}\"}}"),
                )
            })
            .sum();
        if records >= 40.0 && body.contains("RenewLease_Success_count{") {
            assert_eq!(records, 40.0, "{body}");
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    handle.shutdown().await.unwrap();
    // The stopped worker reads no shard: their lag gauges are retired and left out of the
    // scrape; the counters stay.
    let (_, after) = get(addr, "/metrics").await.unwrap();
    for s in &shards {
        let labels = format!("{{Operation=\"ProcessTask\",ShardId=\"{s}\"}}");
        assert!(
            sample(&after, &format!("MillisBehindLatest{labels}")).is_none(),
            "{after}"
        );
        assert!(
            !after.contains(&format!(
                "kcl_shard_consecutive_failures{{shard_id=\"{s}\"}}"
            )),
            "{after}"
        );
        assert!(
            sample(&after, &format!("RecordsProcessed{labels}")).is_some(),
            "{after}"
        );
    }

    for s in &shards {
        let labels = format!("{{Operation=\"ProcessTask\",ShardId=\"{s}\"}}");
        assert!(
            sample(&body, &format!("DataBytesProcessed{labels}")).is_some(),
            "{body}"
        );
        assert!(
            sample(&body, &format!("MillisBehindLatest{labels}")).is_some(),
            "{body}"
        );
        // Dots become underscores in Prometheus names; histograms are summaries.
        assert!(
            sample(
                &body,
                &format!("KinesisDataFetcher_getRecords_Time_count{labels}")
            )
            .is_some_and(|n| n >= 1.0),
            "{body}"
        );
        assert!(
            sample(
                &body,
                &format!("KinesisDataFetcher_getRecords_Success_sum{labels}")
            )
            .is_some_and(|n| n >= 1.0),
            "{body}"
        );
    }
    let worker = "{Operation=\"RenewAllLeases\",WorkerIdentifier=\"w1\"}";
    assert!(
        sample(&body, &format!("LostLeases_sum{worker}")) == Some(0.0),
        "{body}"
    );
    assert!(
        sample(&body, &format!("Success_count{worker}")).is_some_and(|n| n >= 1.0),
        "{body}"
    );
    assert!(
        sample(&body, &format!("RenewLease_Success_count{worker}")).is_some_and(|n| n >= 1.0),
        "{body}"
    );
    let taker = "{Operation=\"TakeLeases\",WorkerIdentifier=\"w1\"}";
    assert!(
        sample(&body, &format!("TakenLeases_sum{taker}")).is_some_and(|n| n >= 2.0),
        "{body}"
    );
    assert!(
        sample(&body, &format!("TotalLeases_count{taker}")).is_some_and(|n| n >= 1.0),
        "{body}"
    );

    let (status, _) = get(addr, "/other").await.unwrap();
    assert_eq!(status, 404);
    drop(endpoint);
}
