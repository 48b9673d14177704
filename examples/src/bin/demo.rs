//! The demo: three workers share a 4-shard stream on the embedded in-memory Kinesis and lease
//! table (no network, no AWS account). A producer writes plain and KPL-aggregated records;
//! partway through one worker crashes (no release) and a shard splits. A live progress line,
//! then a table per worker and shard. Exits non-zero unless every record was processed and
//! every partition key's records were first seen in the order they were produced.
//!
//! `cargo run -q -p kcl-examples --bin demo`

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kcl_kpl::Aggregator;
use kcl_lease::{LeaseStore, SeededRandom, SystemClock};
use kcl_testkit::kinesis::{InMemoryKinesis, PutRecordsEntry};
use kcl_testkit::lease_store::InMemoryLeaseStore;
use kcl_testkit::recording::{Behaviour, Event, EventLog, RecordingFactory};
use kcl_worker::{InitialPosition, Worker, WorkerConfig, WorkerHandle};

const STREAM: &str = "demo-stream";
const KEYS: usize = 40;
const ROUNDS: usize = 60;
const ROUND_EVERY: Duration = Duration::from_millis(100);
const FAILOVER: Duration = Duration::from_secs(3);

async fn start_worker(
    id: &str,
    kinesis: &InMemoryKinesis,
    store: &Arc<InMemoryLeaseStore>,
    log: &EventLog,
) -> Result<WorkerHandle, Box<dyn std::error::Error>> {
    let config = WorkerConfig::builder("demo-app", STREAM)
        .worker_id(id)
        .initial_position(InitialPosition::TrimHorizon)
        .failover_time(FAILOVER)
        .idle_time_between_reads(Duration::from_millis(50))
        .shard_sync_interval(Duration::from_secs(1))
        .parent_shard_poll_interval(Duration::from_millis(100))
        .shutdown_grace(Duration::from_secs(2))
        .build()?;
    let factory = RecordingFactory::new(id, log.clone(), Behaviour::new());
    Ok(Worker::builder(config, factory)
        .stream_client(Arc::new(kinesis.clone()))
        .lease_store(store.clone())
        .clock(Arc::new(SystemClock))
        .random(Arc::new(SeededRandom::from_entropy()))
        .build()
        .await?
        .start()
        .await?)
}

/// Writes one round: per key one plain record and, for every other key, a small aggregate.
fn produce_round(
    kinesis: &InMemoryKinesis,
    round: usize,
    produced: &mut BTreeMap<String, Vec<String>>,
) -> Result<usize, Box<dyn std::error::Error>> {
    let mut plain = Vec::new();
    let mut count = 0;
    for k in 0..KEYS {
        let key = format!("customer-{k:02}");
        let list = produced.entry(key.clone()).or_default();
        if k % 2 == 0 {
            let payload = format!("{key}/{round:03}/p");
            list.push(payload.clone());
            plain.push(PutRecordsEntry::new(key, Bytes::from(payload)));
            count += 1;
        } else {
            let mut agg = Aggregator::new();
            for i in 0..5 {
                let payload = format!("{key}/{round:03}/a{i}");
                list.push(payload.clone());
                let _ = agg.add(&key, None, Bytes::from(payload))?;
                count += 1;
            }
            if let Some(rec) = agg.finish() {
                kinesis.put_record(
                    STREAM,
                    &rec.partition_key,
                    rec.explicit_hash_key.as_deref(),
                    rec.data,
                )?;
            }
        }
    }
    kinesis.put_records(STREAM, plain)?;
    Ok(count)
}

fn progress(
    start: Instant,
    produced: usize,
    log: &EventLog,
    workers: &[(String, Option<&WorkerHandle>)],
    note: &str,
) {
    let distinct: BTreeSet<Bytes> = log
        .deliveries()
        .into_iter()
        .map(|(_, _, r)| r.data)
        .collect();
    let held: Vec<String> = workers
        .iter()
        .map(|(id, h)| match h {
            Some(h) => format!("{id}:{}", h.held_leases().len()),
            None => format!("{id}:down"),
        })
        .collect();
    use std::io::IsTerminal;
    let (start_of_line, end_of_line) = if std::io::stderr().is_terminal() {
        ("\r\x1b[2K", "")
    } else {
        ("", "\n")
    };
    eprint!(
        "{start_of_line} t={:>5.1}s  produced {:>6}  processed {:>6} distinct  leases [{}]  {note}{end_of_line}",
        start.elapsed().as_secs_f64(),
        produced,
        distinct.len(),
        held.join(" ")
    );
    let _ = std::io::stderr().flush();
}

async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 4)?;
    let store = Arc::new(InMemoryLeaseStore::new());
    let log = EventLog::new();
    let start = Instant::now();
    eprintln!("KCL for Rust demo: 4 shards, 3 workers, plain + KPL-aggregated records, in memory");
    eprintln!(
        "  failover_time {FAILOVER:?}; worker-2 will crash and shardId-000000000001 will split\n"
    );

    let mut handles: Vec<(String, Option<WorkerHandle>)> = Vec::new();
    for id in ["worker-1", "worker-2", "worker-3"] {
        handles.push((
            id.to_owned(),
            Some(start_worker(id, &kinesis, &store, &log).await?),
        ));
    }
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut produced_count = 0;
    let mut note = String::new();
    for round in 0..ROUNDS {
        produced_count += produce_round(&kinesis, round, &mut produced)?;
        if round == 20 {
            if let Some((_, slot)) = handles.iter_mut().find(|(id, _)| id == "worker-2")
                && let Some(h) = slot.take()
            {
                h.abort().await;
            }
            note = "worker-2 crashed".to_owned();
        }
        if round == 30 {
            let children =
                kinesis.split_shard(STREAM, "shardId-000000000001", 1u128 << 126 | 1u128 << 125)?;
            note = format!(
                "worker-2 crashed; shard 1 split into {} and {}",
                children[0], children[1]
            );
        }
        let view: Vec<(String, Option<&WorkerHandle>)> = handles
            .iter()
            .map(|(id, h)| (id.clone(), h.as_ref()))
            .collect();
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) || round % 10 == 0 {
            progress(start, produced_count, &log, &view, &note);
        }
        tokio::time::sleep(ROUND_EVERY).await;
    }
    // Wait until everything is processed (bounded).
    let all: BTreeSet<Bytes> = produced
        .values()
        .flatten()
        .map(|p| Bytes::from(p.clone()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let distinct: BTreeSet<Bytes> = log
            .deliveries()
            .into_iter()
            .map(|(_, _, r)| r.data)
            .collect();
        let view: Vec<(String, Option<&WorkerHandle>)> = handles
            .iter()
            .map(|(id, h)| (id.clone(), h.as_ref()))
            .collect();
        progress(start, produced_count, &log, &view, "draining");
        if all.is_subset(&distinct) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!();
    for (_, h) in handles.iter_mut() {
        if let Some(h) = h.take() {
            h.shutdown().await?;
        }
    }
    let elapsed = start.elapsed();

    // The table: per worker and shard.
    #[derive(Default)]
    struct Row {
        records: usize,
        checkpoints: usize,
        taken: usize,
        shutdowns: Vec<String>,
    }
    let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
    for e in log.events() {
        match e {
            Event::Initialized { worker, shard, .. } => {
                rows.entry((worker, shard)).or_default().taken += 1
            }
            Event::Delivered {
                worker,
                shard,
                records,
            } => rows.entry((worker, shard)).or_default().records += records.len(),
            Event::Checkpointed {
                worker,
                shard,
                error: None,
                ..
            } => rows.entry((worker, shard)).or_default().checkpoints += 1,
            Event::Shutdown {
                worker,
                shard,
                reason,
            } => rows
                .entry((worker, shard))
                .or_default()
                .shutdowns
                .push(format!("{reason:?}")),
            _ => {}
        }
    }
    let leases: BTreeMap<String, String> = store
        .list_leases()
        .await?
        .into_iter()
        .map(|l| (l.lease_key, l.checkpoint.to_string()))
        .collect();
    println!();
    println!(
        "{:<10} {:<22} {:>8} {:>12} {:>7}  shutdowns",
        "worker", "shard", "records", "checkpoints", "leases"
    );
    println!("{}", "-".repeat(80));
    for ((worker, shard), row) in &rows {
        println!(
            "{:<10} {:<22} {:>8} {:>12} {:>7}  {}",
            worker,
            shard,
            row.records,
            row.checkpoints,
            row.taken,
            row.shutdowns.join(",")
        );
    }
    println!();
    println!("lease table at the end:");
    for (shard, checkpoint) in &leases {
        let cp = if checkpoint.len() > 24 {
            format!("...{}", &checkpoint[checkpoint.len() - 12..])
        } else {
            checkpoint.clone()
        };
        println!("  {shard:<22} checkpoint {cp}");
    }

    // The checks.
    let deliveries = log.deliveries();
    let distinct: BTreeSet<Bytes> = deliveries.iter().map(|(_, _, r)| r.data.clone()).collect();
    let missing: Vec<&Bytes> = all.difference(&distinct).collect();
    let mut first_seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, _, r) in &deliveries {
        if seen.insert(r.data.clone()) {
            first_seen
                .entry(r.partition_key.clone())
                .or_default()
                .push(String::from_utf8_lossy(&r.data).into_owned());
        }
    }
    let in_order = first_seen == produced;
    let zombie_checkpoint_landed = log.events().iter().any(|e| {
        matches!(
            e,
            Event::Checkpointed {
                error: None,
                during: Some(kcl_interfaces::ShutdownReason::Zombie),
                ..
            }
        )
    });
    println!();
    println!(
        "produced {} user records, processed {} ({} distinct, {} delivered again after the crash and lease moves) in {:.1}s",
        all.len(),
        deliveries.len(),
        distinct.len(),
        deliveries.len() - distinct.len(),
        elapsed.as_secs_f64()
    );
    println!(
        "every record processed: {}",
        if missing.is_empty() { "yes" } else { "NO" }
    );
    println!(
        "per-key order kept:     {}",
        if in_order { "yes" } else { "NO" }
    );
    println!(
        "no zombie checkpoint:   {}",
        if zombie_checkpoint_landed {
            "NO"
        } else {
            "yes"
        }
    );
    if !missing.is_empty() {
        println!(
            "missing (first 10): {:?}",
            missing.iter().take(10).collect::<Vec<_>>()
        );
    }
    Ok(missing.is_empty() && in_order && !zombie_checkpoint_landed)
}

#[tokio::main]
async fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("\ndemo failed: {e}");
            ExitCode::FAILURE
        }
    }
}
