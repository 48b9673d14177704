//! Throughput of the worker pipeline (fetch, deaggregate, deliver, checkpoint) on the
//! in-memory Kinesis, with a no-op processor that checkpoints every batch, on one core (a
//! current-thread runtime). 100-byte user records, plain and KPL-aggregated, on 1 and 8
//! shards.
//!
//! `cargo run --release -q -p kcl-worker --example pipeline-bench [fan-out]`
//!
//! The last line is `plain_records_per_s=X aggregated_records_per_s=Y peak_rss_mib=Z` (the
//! better of 1 and 8 shards for each). With `fan-out`, the records are read by enhanced
//! fan-out (SubscribeToShard on the in-memory Kinesis) instead of polling.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kcl_interfaces::{
    InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput, ShutdownReason,
};
use kcl_kpl::Aggregator;
use kcl_lease::test_util::lease_store::InMemoryLeaseStore;
use kcl_lease::{SeededRandom, SystemClock};
use kcl_worker::test_util::kinesis::{InMemoryKinesis, PutRecordsEntry};
use kcl_worker::{InitialPosition, RetrievalConfig, Worker, WorkerConfig};

struct Counting {
    processed: Arc<AtomicU64>,
}

impl RecordProcessor for Counting {
    async fn initialize(&mut self, _: InitializationInput) {}
    async fn process_records(&mut self, input: ProcessRecordsInput) {
        self.processed
            .fetch_add(input.records.len() as u64, Ordering::Relaxed);
        input.checkpointer.checkpoint().await.unwrap();
    }
    async fn shutdown(&mut self, input: ShutdownInput) {
        if input.shutdown_reason != ShutdownReason::Zombie {
            let _ = input.checkpointer.checkpoint().await;
        }
    }
}

fn fill(kinesis: &InMemoryKinesis, stream: &str, records: usize, aggregated: bool) -> usize {
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut user_records = 0;
    if aggregated {
        // One key per aggregate (the KPL aggregates records bound for one shard); ~500
        // user records of 100 bytes per aggregate (~60 KB).
        let mut i = 0;
        while user_records < records {
            let key = format!("key-{i}");
            let mut agg = Aggregator::new();
            for _ in 0..500 {
                assert!(agg.add(&key, None, payload.clone()).unwrap().is_none());
                user_records += 1;
            }
            let rec = agg.finish().unwrap();
            kinesis
                .put_record(
                    stream,
                    &rec.partition_key,
                    rec.explicit_hash_key.as_deref(),
                    rec.data,
                )
                .unwrap();
            i += 1;
        }
    } else {
        for chunk in 0..records.div_ceil(500) {
            let batch: Vec<PutRecordsEntry> = (0..500)
                .map(|j| PutRecordsEntry::new(format!("key-{}", chunk * 500 + j), payload.clone()))
                .collect();
            user_records += batch.len();
            kinesis.put_records(stream, batch).unwrap();
        }
    }
    user_records
}

async fn run(shards: u32, records: usize, aggregated: bool, fan_out: bool) -> f64 {
    let kinesis = InMemoryKinesis::new();
    let stream = "bench";
    kinesis.create_stream(stream, shards).unwrap();
    let total = fill(&kinesis, stream, records, aggregated) as u64;
    let processed = Arc::new(AtomicU64::new(0));
    let config = WorkerConfig::builder("bench", stream)
        .worker_id("bench-worker")
        .initial_position(InitialPosition::TrimHorizon)
        .max_get_records_per_second(100_000u32)
        .max_bytes_per_second(u64::MAX / 4)
        .idle_time_between_reads(Duration::from_millis(1))
        .retrieval_specific_config(if fan_out {
            RetrievalConfig::fan_out()
        } else {
            RetrievalConfig::Polling
        })
        .build()
        .unwrap();
    let counter = processed.clone();
    let factory = move || Counting {
        processed: counter.clone(),
    };
    let start = Instant::now();
    let handle = Worker::builder(config, factory)
        .stream_client(Arc::new(kinesis.clone()))
        .lease_store(Arc::new(InMemoryLeaseStore::new()))
        .clock(Arc::new(SystemClock))
        .random(Arc::new(SeededRandom::new(1)))
        .build()
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    while processed.load(Ordering::Relaxed) < total {
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "bench did not finish"
        );
    }
    let secs = start.elapsed().as_secs_f64();
    handle.shutdown().await.unwrap();
    let rate = total as f64 / secs;
    println!(
        "{:<10} retrieval={} shards={shards} user_records={total} seconds={secs:.3} records_per_s={rate:.0}",
        if aggregated { "aggregated" } else { "plain" },
        if fan_out { "fan-out" } else { "polling" }
    );
    rate
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn main() {
    let fan_out = std::env::args().nth(1).as_deref() == Some("fan-out");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (plain, aggregated) = rt.block_on(async {
        let mut plain: f64 = 0.0;
        let mut aggregated: f64 = 0.0;
        for shards in [1, 8] {
            plain = plain.max(run(shards, 400_000, false, fan_out).await);
            aggregated = aggregated.max(run(shards, 2_000_000, true, fan_out).await);
        }
        (plain, aggregated)
    });
    println!(
        "plain_records_per_s={plain:.0} aggregated_records_per_s={aggregated:.0} peak_rss_mib={:.1}",
        peak_rss_mib()
    );
}
