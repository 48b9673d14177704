//! The worker end to end on the in-memory Kinesis and lease store, on tokio's paused clock
//! (virtual time: a run of simulated minutes takes milliseconds).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kcl_kpl::ExtendedSequenceNumber;
use kcl_lease::LeaseStore;
use kcl_worker::test_util::fleet::{Fleet, default_seed};
use kcl_worker::test_util::recording::{Behaviour, Event, EventLog, RecordingFactory};
use kcl_worker::{Worker, WorkerConfig, WorkerHandle};
use tokio::time::Instant;

const STREAM: &str = "orders";
const FAILOVER: Duration = Duration::from_secs(10);

/// How many of the keys `key-0 .. key-{n-1}` shard 0 owns.
async fn keys_on_shard_zero(env: &Fleet, n: usize) -> usize {
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    let range = lease.hash_key_range.unwrap();
    (0..n)
        .filter(|i| range.contains(kcl_kpl::partition_key_hash(&format!("key-{i}"))))
        .count()
}

fn env(shards: u32) -> Fleet {
    Fleet::new(STREAM, shards).unwrap()
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

#[tokio::test(start_paused = true)]
async fn two_workers_share_four_shards_and_deliver_plain_and_aggregated_records() {
    let env = env(4);
    let mut expected = BTreeSet::new();
    for (i, p) in payloads("plain", 200).into_iter().enumerate() {
        env.put_plain(&format!("key-{}", i % 23), &p).unwrap();
        expected.insert(p);
    }
    // The KPL aggregates only records bound for one shard: one key per aggregate here.
    let keys: Vec<String> = (0..10).map(|c| format!("agg-key-{c}")).collect();
    for (c, chunk) in payloads("agg", 300).chunks(30).enumerate() {
        let items: Vec<(&str, String)> = chunk
            .iter()
            .map(|p| (keys[c].as_str(), p.clone()))
            .collect();
        env.put_aggregate(&items).unwrap();
        expected.extend(chunk.iter().cloned());
    }
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("every record", Duration::from_secs(120), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);
    // Balanced: 2 and 2 once the taker settled.
    env.wait_until("balance", Duration::from_secs(120), |_| {
        w1.held_leases().len() == 2 && w2.held_leases().len() == 2
    })
    .await
    .unwrap();
    // Aggregated records came out with sub-sequence numbers and the aggregated flag.
    let aggregated: Vec<_> = env
        .log()
        .deliveries()
        .into_iter()
        .filter(|(_, _, r)| r.aggregated)
        .collect();
    assert!(aggregated.len() >= 300);
    assert!(
        aggregated
            .iter()
            .any(|(_, _, r)| r.sub_sequence_number == 29)
    );
    // Checkpoints landed: every lease's checkpoint is a real sequence number now.
    for lease in env.store().list_leases().await.unwrap() {
        assert!(lease.checkpoint.sequence_number().is_some(), "{lease:?}");
    }
    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_crashed_workers_shards_resume_elsewhere_within_one_and_a_half_failover_times() {
    let env = env(4);
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("balance", Duration::from_secs(120), |_| {
        w1.held_leases().len() == 2 && w2.held_leases().len() == 2
    })
    .await
    .unwrap();
    let w1_shards: BTreeSet<String> = w1.held_leases().into_iter().map(|l| l.lease_key).collect();
    w1.abort().await; // crash: no shutdown, no release
    let crashed_at = Instant::now();
    for (i, p) in payloads("after-crash", 100).into_iter().enumerate() {
        env.put_plain(&format!("k{i}"), &p).unwrap();
    }
    env.wait_until("takeover", 3 * FAILOVER, |e| {
        let inits: BTreeSet<String> = e
            .log()
            .events()
            .into_iter()
            .filter_map(|ev| match ev {
                Event::Initialized { worker, shard, .. } if worker == "w2" => Some(shard),
                _ => None,
            })
            .collect();
        w1_shards.is_subset(&inits)
    })
    .await
    .unwrap();
    let takeover = crashed_at.elapsed();
    println!("takeover after crash: {takeover:?} (failover_time {FAILOVER:?})");
    assert!(takeover <= FAILOVER * 3 / 2, "takeover took {takeover:?}");
    env.wait_until("records after the crash", Duration::from_secs(60), |e| {
        e.delivered_payloads()
            .iter()
            .filter(|p| p.starts_with("after-crash"))
            .count()
            == 100
    })
    .await
    .unwrap();
    assert_eq!(w2.held_leases().len(), 4);
    w2.shutdown().await.unwrap();
}

/// The margin on the handover after a graceful stop: the stop itself (the processors
/// return from `shutdown(Requested)` at once here, then one release write each).
const STOP_MARGIN: Duration = Duration::from_millis(500);

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_releases_leases_and_another_worker_takes_them_at_its_next_taker_run() {
    // Several seeds: the survivor's taker passes fall differently against the stop.
    let mut worst = Duration::ZERO;
    for seed in 0..8u64 {
        let env = env(4);
        let start = |id: &'static str, seed: u64| {
            let env = env.clone();
            async move {
                let factory = RecordingFactory::new(id, env.log().clone(), Behaviour::new());
                env.start_factory(id, factory, seed, |b| b).await.unwrap()
            }
        };
        let w1 = start("w1", default_seed("w1") + seed).await;
        let w2 = start("w2", default_seed("w2") + seed * 7919).await;
        env.wait_until("balance", Duration::from_secs(120), |_| {
            w1.held_leases().len() == 2 && w2.held_leases().len() == 2
        })
        .await
        .unwrap();
        // Somewhere inside w2's taker interval.
        tokio::time::sleep(Duration::from_millis(seed * 617)).await;
        let stopped_at = Instant::now();
        let report = w1.shutdown().await.unwrap();
        let stop = stopped_at.elapsed();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!(report.leases_released.len(), 2, "{report:?}");
        assert!(stop <= STOP_MARGIN, "the stop took {stop:?}");
        // Released: no owner on w1's leases right after shutdown returns, unless w2
        // already took them.
        let owners = env.owners().await.unwrap();
        assert!(
            owners.values().all(|o| o.as_deref() != Some("w1")),
            "{owners:?}"
        );
        // Every w1 processor got Requested.
        let requested = env
            .log()
            .events()
            .into_iter()
            .filter(|e| matches!(e, Event::Shutdown { worker, reason: kcl_interfaces::ShutdownReason::Requested, .. } if worker == "w1"))
            .count();
        assert_eq!(requested, 2);
        env.wait_until("handover", Duration::from_secs(60), |_| {
            w2.held_leases().len() == 4
        })
        .await
        .unwrap();
        let handover = stopped_at.elapsed();
        println!(
            "seed {seed}: handover after graceful stop: {handover:?} (the stop {stop:?}, taker interval {:?})",
            FAILOVER / 2
        );
        // Within one taker interval (failover/2) of the releases, so of the stop's start
        // plus the stop itself.
        assert!(
            handover - stop <= FAILOVER / 2,
            "seed {seed}: handover took {handover:?} after a stop of {stop:?}"
        );
        assert!(
            handover <= FAILOVER / 2 + STOP_MARGIN,
            "seed {seed}: handover took {handover:?}"
        );
        worst = worst.max(handover);
        w2.shutdown().await.unwrap();
    }
    println!("worst handover after graceful stop: {worst:?}");
}

#[tokio::test(start_paused = true)]
async fn split_while_records_flow_children_after_parent_per_key_order_kept() {
    let env = env(1);
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let keys: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 0..20 {
        for k in &keys {
            let p = format!("{k}/{round:03}");
            env.put_plain(k, &p).unwrap();
            produced.entry(k.clone()).or_default().push(p);
        }
        if round == 10 {
            env.kinesis()
                .split_shard(STREAM, "shardId-000000000000", 1u128 << 127)
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let total: usize = produced.values().map(Vec::len).sum();
    env.wait_until("all records", Duration::from_secs(120), |e| {
        e.delivered_payloads().len() == total
    })
    .await
    .unwrap();
    // Per key: first deliveries in produced order.
    let mut first_seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, _, r) in env.log().deliveries() {
        let p = String::from_utf8(r.data.to_vec()).unwrap();
        if seen.insert(p.clone()) {
            first_seen
                .entry(r.partition_key.clone())
                .or_default()
                .push(p);
        }
    }
    assert_eq!(first_seen, produced);
    // The parent ended at SHARD_END (or was cleaned up) and children started after it.
    let events = env.log().events();
    let parent_end = events
        .iter()
        .position(|e| matches!(e, Event::Checkpointed { shard, error: None, during: Some(kcl_interfaces::ShutdownReason::Terminate), .. } if shard == "shardId-000000000000"))
        .expect("parent checkpointed at its end");
    for (i, e) in events.iter().enumerate() {
        if let Event::Initialized { shard, .. } = e
            && shard != "shardId-000000000000"
        {
            assert!(
                i > parent_end,
                "child {shard} started before its parent ended"
            );
        }
    }
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn restart_resumes_inside_an_aggregate() {
    let env = env(1);
    let items: Vec<(&str, String)> = (0..10).map(|i| ("k", format!("sub-{i}"))).collect();
    env.put_aggregate(&items).unwrap();
    // Checkpoint in the middle of the aggregate by hand: sub-record 3.
    let (w1, _) = env
        .start("w1", Behaviour::new().checkpoint_every_batch(false))
        .await
        .unwrap();
    env.wait_until("the aggregate", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 10
    })
    .await
    .unwrap();
    let (_, _, fourth) = env.log().deliveries()[3].clone();
    assert_eq!(fourth.sub_sequence_number, 3);
    // A fenced checkpoint through the store, as the processor would make it.
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    env.store()
        .update_checkpoint(&lease, &fourth.extended_sequence_number())
        .await
        .unwrap();
    w1.abort().await;
    let before = env.log().delivered_count();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("redelivery", 3 * FAILOVER, |e| {
        e.log().delivered_count() > before
    })
    .await
    .unwrap();
    let redelivered: Vec<u64> = env.log().deliveries()[before..]
        .iter()
        .map(|(_, _, r)| r.sub_sequence_number)
        .collect();
    assert_eq!(redelivered, vec![4, 5, 6, 7, 8, 9]);
    let init = env
        .log()
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::Initialized {
                worker, checkpoint, ..
            } if worker == "w2" => Some(checkpoint),
            _ => None,
        })
        .unwrap();
    assert_eq!(init, fourth.extended_sequence_number());
    w2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn terminate_without_checkpoint_blocks_children_until_auto_checkpoint() {
    let env = env(1);
    env.put_plain("k", "before").unwrap();
    let (w1, _) = env
        .start("w1", Behaviour::new().checkpoint_on_terminate(false))
        .await
        .unwrap();
    env.wait_until("first record", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    env.kinesis()
        .split_shard(STREAM, "shardId-000000000000", 1u128 << 127)
        .unwrap();
    env.put_plain("k", "after").unwrap();
    // Several Terminate attempts, no SHARD_END, no child started.
    env.wait_until("terminate retries", Duration::from_secs(60), |e| {
        e.log()
            .events()
            .iter()
            .filter(|ev| {
                matches!(
                    ev,
                    Event::Shutdown {
                        reason: kcl_interfaces::ShutdownReason::Terminate,
                        ..
                    }
                )
            })
            .count()
            >= 3
    })
    .await
    .unwrap();
    assert!(!env.delivered_payloads().contains("after"));
    let parent = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert!(!parent.checkpoint.is_shard_end());
    assert_eq!(parent.child_shard_ids.len(), 2);
    w1.shutdown().await.unwrap();

    // With auto_checkpoint_at_shard_end the worker writes SHARD_END itself.
    let (w2, _) = env
        .start_with("w2", Behaviour::new().checkpoint_on_terminate(false), |b| {
            b.auto_checkpoint_at_shard_end(true)
        })
        .await
        .unwrap();
    env.wait_until("child records", Duration::from_secs(60), |e| {
        e.delivered_payloads().contains("after")
    })
    .await
    .unwrap();
    let parent = env.store().get_lease("shardId-000000000000").await.unwrap();
    assert!(parent.is_none_or(|p| p.checkpoint == ExtendedSequenceNumber::SHARD_END));
    w2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_zombie_is_told_and_cannot_checkpoint() {
    let env = env(1);
    env.put_plain("k", "one").unwrap();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    env.wait_until("first record", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    // Another worker takes the lease behind w1's back.
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    env.store().take_lease(&lease, "thief").await.unwrap();
    env.wait_until("zombie shutdown", Duration::from_secs(30), |e| {
        e.log().events().iter().any(|ev| {
            matches!(
                ev,
                Event::Shutdown {
                    reason: kcl_interfaces::ShutdownReason::Zombie,
                    ..
                }
            )
        })
    })
    .await
    .unwrap();
    let zombie_checkpoint = env
        .log()
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::Checkpointed {
                during: Some(kcl_interfaces::ShutdownReason::Zombie),
                error,
                ..
            } => Some(error),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        zombie_checkpoint,
        Some(kcl_interfaces::CheckpointErrorKind::Shutdown)
    );
    let after = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.lease_owner.as_deref(), Some("thief"));
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lone_worker_starts_processing_64_fresh_shards_within_3_seconds() {
    let env = env(64);
    for i in 0..640 {
        env.put_plain(&format!("key-{i}"), &format!("r{i}"))
            .unwrap();
    }
    let started = Instant::now();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let took = env
        .wait_until("64 initialized shards", Duration::from_secs(30), |e| {
            e.log()
                .events()
                .iter()
                .filter(|ev| matches!(ev, Event::Initialized { .. }))
                .count()
                == 64
        })
        .await
        .unwrap();
    println!(
        "64 fresh shards processing after {took:?} (virtual, from start {:?})",
        started.elapsed()
    );
    assert!(took <= Duration::from_secs(3), "took {took:?}");
    env.wait_until("all records", Duration::from_secs(30), |e| {
        e.delivered_payloads().len() == 640
    })
    .await
    .unwrap();
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_pending_checkpoint_is_shown_to_the_next_owner() {
    let env = env(1);
    env.put_plain("k", "one").unwrap();
    env.put_plain("k", "two").unwrap();
    let (w1, _) = env
        .start("w1", Behaviour::new().checkpoint_every_batch(false))
        .await
        .unwrap();
    env.wait_until("records", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 2
    })
    .await
    .unwrap();
    let (_, _, first) = env.log().deliveries()[0].clone();
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    env.store()
        .update_pending_checkpoint(&lease, Some(&first.extended_sequence_number()))
        .await
        .unwrap();
    w1.abort().await;
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("w2 initialized", 3 * FAILOVER, |e| {
        e.log()
            .events()
            .iter()
            .any(|ev| matches!(ev, Event::Initialized { worker, .. } if worker == "w2"))
    })
    .await
    .unwrap();
    let pending = env
        .log()
        .events()
        .into_iter()
        .find_map(|e| match e {
            Event::Initialized {
                worker, pending, ..
            } if worker == "w2" => Some(pending),
            _ => None,
        })
        .unwrap();
    assert_eq!(pending, Some(first.extended_sequence_number()));
    w2.shutdown().await.unwrap();
}

/// Misbehaves on the records of shard 0 (panics, or never returns); the other shards go on.
struct BadOnShardZero {
    hang: bool,
    shard: String,
    log: EventLog,
}

impl kcl_interfaces::RecordProcessor for BadOnShardZero {
    async fn initialize(&mut self, input: kcl_interfaces::InitializationInput) {
        self.shard = input.shard_id;
    }
    async fn process_records(&mut self, input: kcl_interfaces::ProcessRecordsInput) {
        if self.shard == "shardId-000000000000" {
            if self.hang {
                std::future::pending::<()>().await;
            }
            panic!("processor bug on {}", self.shard);
        }
        self.log.push(Event::Delivered {
            worker: "w1".into(),
            shard: self.shard.clone(),
            records: input.records.clone(),
        });
        input.checkpointer.checkpoint().await.unwrap();
    }
    async fn shutdown(&mut self, _: kcl_interfaces::ShutdownInput) {}
}

/// Puts 200 records over 4 shards, starts a worker (with `shutdown_grace` when given) whose
/// processor panics (or hangs) on shard 0, and waits until every record of the other shards is delivered. Returns the
/// worker and how many records shard 0 holds.
async fn misbehaving_on_shard_zero(
    env: &Fleet,
    hang: bool,
    shutdown_grace: Option<Duration>,
) -> (WorkerHandle, usize) {
    for i in 0..200 {
        env.put_plain(&format!("key-{i}"), &format!("r{i}"))
            .unwrap();
    }
    let log = env.log().clone();
    let factory = move || BadOnShardZero {
        hang,
        shard: String::new(),
        log: log.clone(),
    };
    let handle = env
        .start_factory(
            "w1",
            factory,
            default_seed("w1"),
            |b| match shutdown_grace {
                Some(grace) => b.shutdown_grace(grace),
                None => b,
            },
        )
        .await
        .unwrap();
    // Every record not on shard 0 is delivered, and the worker keeps running.
    let on_zero = keys_on_shard_zero(env, 200).await;
    env.wait_until("the other shards' records", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == 200 - on_zero
    })
    .await
    .unwrap();
    (handle, on_zero)
}

#[tokio::test(start_paused = true)]
async fn a_panicking_processor_only_affects_its_own_shard() {
    let env = env(4);
    let (handle, shard_zero_records) = misbehaving_on_shard_zero(&env, false, None).await;
    assert!(shard_zero_records > 0);
    assert!(!handle.is_finished());
    // Shard 0's lease was released after the panic (and is retried, panicking again).
    handle.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_missing_stream_is_a_clear_error_at_start() {
    let env = env(1);
    let config = WorkerConfig::builder("app", "no-such-stream")
        .worker_id("w1")
        .build()
        .unwrap();
    let err = Worker::builder(
        config,
        RecordingFactory::new("w1", env.log().clone(), Behaviour::new()),
    )
    .stream_client(Arc::new(env.kinesis().clone()))
    .lease_store(env.store().clone())
    .build()
    .await
    .unwrap()
    .start()
    .await
    .unwrap_err();
    match &err {
        kcl_worker::WorkerError::Stream(kcl_worker::stream::StreamError::StreamNotFound {
            stream,
        }) => {
            assert_eq!(stream, "no-such-stream")
        }
        other => panic!("expected StreamNotFound, got {other:?}"),
    }
    assert!(!err.is_retryable());
    let chain = std::error::Error::source(&err).unwrap().to_string();
    assert!(chain.contains("no-such-stream"), "{chain}");
}

#[tokio::test(start_paused = true)]
async fn a_closed_shard_gone_from_the_stream_counts_as_ended_and_children_start() {
    let env = env(1);
    env.put_plain("k", "before-split").unwrap();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    env.wait_until("first record", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    w1.shutdown().await.unwrap();
    // While the application is down the shard splits and, after the retention period, the
    // closed parent (with its records) leaves the stream; its lease still says "not finished".
    env.kinesis()
        .split_shard(STREAM, "shardId-000000000000", 1u128 << 127)
        .unwrap();
    env.kinesis()
        .set_retention_period(STREAM, Duration::from_secs(3600))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2 * 3600)).await;
    let parent = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert!(!parent.is_finished());
    env.put_plain("k", "after-split").unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("the child's record", Duration::from_secs(120), |e| {
        e.delivered_payloads().contains("after-split")
    })
    .await
    .unwrap();
    let parent = env.store().get_lease("shardId-000000000000").await.unwrap();
    assert!(
        parent.as_ref().is_none_or(|p| p.is_finished()),
        "{parent:?}"
    );
    // w2 ended the gone parent (Terminate, SHARD_END) before the children started.
    assert!(env.log().events().iter().any(|e| matches!(e,
        Event::Shutdown { worker, shard, reason: kcl_interfaces::ShutdownReason::Terminate }
            if worker == "w2" && shard == "shardId-000000000000")));
    w2.shutdown().await.unwrap();
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn public_futures_are_send() {
    let env = env(1);
    let config = WorkerConfig::builder("app", STREAM).build().unwrap();
    let builder = Worker::builder(
        config,
        RecordingFactory::new("w", env.log().clone(), Behaviour::new()),
    )
    .stream_client(Arc::new(env.kinesis().clone()))
    .lease_store(env.store().clone());
    let build = builder.build();
    assert_send(&build);
    drop(build);
    fn start_is_send<F: kcl_interfaces::RecordProcessorFactory>(w: Worker<F>) {
        let fut = w.start();
        assert_send(&fut);
    }
    fn handle_futures_are_send(h: WorkerHandle) {
        let fut = h.shutdown();
        assert_send(&fut);
    }
    let _ = (start_is_send::<RecordingFactory>, handle_futures_are_send);
}

/// Runs checkpoint calls against the worker's checkpointer on its first batch and records
/// the outcomes.
type ProbeResults =
    Arc<std::sync::Mutex<Vec<(String, Option<kcl_interfaces::CheckpointErrorKind>)>>>;

struct CheckpointProbe {
    shard: String,
    results: ProbeResults,
    foreign_sequence: String,
    done: bool,
}

impl kcl_interfaces::RecordProcessor for CheckpointProbe {
    async fn initialize(&mut self, input: kcl_interfaces::InitializationInput) {
        self.shard = input.shard_id;
    }
    async fn process_records(&mut self, input: kcl_interfaces::ProcessRecordsInput) {
        if self.done || self.shard != "shardId-000000000000" || input.records.len() < 3 {
            return;
        }
        self.done = true;
        let c = &input.checkpointer;
        let second = input.records[1].extended_sequence_number();
        let last = input.records.last().unwrap().extended_sequence_number();
        let beyond = ExtendedSequenceNumber::new(last.sequence_number().unwrap().clone(), 1);
        let first = input.records[0].extended_sequence_number();
        let mut out = Vec::new();
        out.push((
            "at second".into(),
            c.checkpoint_at(&second).await.err().map(|e| e.kind()),
        ));
        out.push((
            "before last checkpoint".into(),
            c.checkpoint_at(&first).await.err().map(|e| e.kind()),
        ));
        out.push((
            "beyond delivered".into(),
            c.checkpoint_at(&beyond).await.err().map(|e| e.kind()),
        ));
        out.push((
            "malformed".into(),
            c.checkpoint_sequence("12x").await.err().map(|e| e.kind()),
        ));
        out.push((
            "shard end too early".into(),
            c.checkpoint_at(&ExtendedSequenceNumber::SHARD_END)
                .await
                .err()
                .map(|e| e.kind()),
        ));
        let foreign = ExtendedSequenceNumber::new(self.foreign_sequence.parse().unwrap(), 0);
        out.push((
            "another shard's sequence".into(),
            if foreign < last && foreign > second {
                c.checkpoint_at(&foreign).await.err().map(|e| e.kind())
            } else {
                // The test's premise failed: the foreign number must lie inside the range
                // this shard delivered, so only the shard check can reject it.
                None
            },
        ));
        let prepared = c.prepare_checkpoint().await.unwrap();
        out.push((
            "commit prepared".into(),
            prepared.checkpoint().await.err().map(|e| e.kind()),
        ));
        *self.results.lock().unwrap() = out;
    }
    async fn shutdown(&mut self, _: kcl_interfaces::ShutdownInput) {}
}

#[tokio::test(start_paused = true)]
async fn the_checkpointer_validates_positions() {
    let env = env(2);
    // Records on both shards, interleaved in time, so shard 1 has sequence numbers between
    // shard 0's.
    let mut on_zero = Vec::new();
    let mut foreign = None;
    for i in 0..40 {
        let put = env
            .kinesis()
            .put_record(
                STREAM,
                &format!("key-{i}"),
                None,
                Bytes::from(format!("r{i}")),
            )
            .unwrap();
        if put.shard_id == "shardId-000000000000" {
            on_zero.push(put.sequence_number);
        } else if on_zero.len() == 2 && foreign.is_none() {
            foreign = Some(put.sequence_number.to_string());
        }
    }
    assert!(on_zero.len() >= 3);
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = results.clone();
    let foreign = foreign.expect("a record on shard 1 between shard 0's second and third");
    let factory = move || CheckpointProbe {
        shard: String::new(),
        results: shared.clone(),
        foreign_sequence: foreign.clone(),
        done: false,
    };
    let handle = env
        .start_factory("w1", factory, default_seed("w1"), |b| b)
        .await
        .unwrap();
    let start = Instant::now();
    while results.lock().unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    use kcl_interfaces::CheckpointErrorKind::IllegalArgument;
    let got: BTreeMap<String, Option<kcl_interfaces::CheckpointErrorKind>> =
        results.lock().unwrap().iter().cloned().collect();
    assert_eq!(got["at second"], None);
    assert_eq!(got["before last checkpoint"], Some(IllegalArgument));
    assert_eq!(got["beyond delivered"], Some(IllegalArgument));
    assert_eq!(got["malformed"], Some(IllegalArgument));
    assert_eq!(got["shard end too early"], Some(IllegalArgument));
    assert_eq!(got["another shard's sequence"], Some(IllegalArgument));
    assert_eq!(got["commit prepared"], None);
    handle.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_hanging_processor_only_affects_its_own_shard_and_shutdown_still_returns() {
    let env = env(4);
    let (handle, _) = misbehaving_on_shard_zero(&env, true, Some(Duration::from_secs(2))).await;
    let stopping = Instant::now();
    let report = handle.shutdown().await.unwrap();
    assert!(
        stopping.elapsed() <= Duration::from_secs(3),
        "{:?}",
        stopping.elapsed()
    );
    assert_eq!(report.aborted_processors, 1);
    assert_eq!(report.leases_released.len(), 4);
    assert!(!report.is_clean());
    let owners = env.owners().await.unwrap();
    assert!(owners.values().all(Option::is_none), "{owners:?}");
}

#[tokio::test(start_paused = true)]
async fn empty_reads_while_behind_do_not_stall_or_skip() {
    let env = env(1);
    for i in 0..50 {
        env.put_plain("k", &format!("r{i:02}")).unwrap();
    }
    env.kinesis().empty_reads_next(20);
    let started = Instant::now();
    // A long idle time: were the empty answers taken for "caught up", this would take
    // minutes.
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), |b| {
            b.idle_time_between_reads(Duration::from_secs(10))
        })
        .await
        .unwrap();
    env.wait_until("every record", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == 50
    })
    .await
    .unwrap();
    // Behind the tip the worker keeps reading (no idle sleeps between the empty answers);
    // only the client-side rate limit (5 calls/s) spaces the 21 calls.
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let order: Vec<String> = env
        .log()
        .deliveries()
        .into_iter()
        .map(|(_, _, r)| String::from_utf8(r.data.to_vec()).unwrap())
        .collect();
    assert_eq!(
        order,
        (0..50).map(|i| format!("r{i:02}")).collect::<Vec<_>>()
    );
    w1.shutdown().await.unwrap();
}

/// The full error chain of `err`, one message after the other.
fn chain(err: &dyn std::error::Error) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

#[tokio::test(start_paused = true)]
async fn an_application_in_the_java_3x_mode_is_refused_before_any_take() {
    for version in ["CLIENT_VERSION_3X", "CLIENT_VERSION_3X_WITH_ROLLBACK"] {
        let env = env(2);
        env.store().set_client_version(Some(version));
        let err = env.start("w1", Behaviour::new()).await.unwrap_err();
        match &err {
            kcl_worker::WorkerError::UnsupportedClientVersion { client_version } => {
                assert_eq!(client_version, version)
            }
            other => panic!("expected UnsupportedClientVersion, got {other:?}"),
        }
        assert!(!err.is_retryable());
        let message = chain(&err);
        assert!(message.contains("3.x"), "{message}");
        assert!(message.contains(version), "{message}");
        assert!(
            message.contains("CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X"),
            "{message}"
        );
        assert!(message.contains("roll"), "{message}");
        // Nothing was written: no lease taken (nor even created).
        assert!(
            env.store()
                .snapshot()
                .iter()
                .all(|l| l.lease_owner.is_none()),
            "{:?}",
            env.store().snapshot()
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_application_in_a_2x_compatible_mode_starts() {
    for version in [
        None,
        Some("CLIENT_VERSION_UPGRADE_FROM_2X"),
        Some("CLIENT_VERSION_2X"),
    ] {
        let env = env(2);
        env.store().set_client_version(version);
        let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
        env.wait_until("both leases", Duration::from_secs(60), |_| {
            w1.held_leases().len() == 2
        })
        .await
        .unwrap();
        let calls = env
            .store()
            .stats()
            .operation(kcl_lease::test_util::lease_store::LeaseOperation::ClientVersion)
            .calls;
        assert_eq!(calls, 1, "{version:?}");
        w1.shutdown().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_version_read_that_keeps_failing_fails_the_start() {
    use kcl_lease::test_util::lease_store::{Fault, FaultKind, LeaseOperation};
    let env = env(1);
    env.store()
        .inject(Fault::new(FaultKind::Hang, 100).for_operation(LeaseOperation::ClientVersion));
    let err = env.start("w1", Behaviour::new()).await.unwrap_err();
    assert!(
        matches!(err, kcl_worker::WorkerError::Lease(_)),
        "expected a lease store error, got {err:?}"
    );
    assert!(chain(&err).contains("client_version"), "{}", chain(&err));
    assert!(
        env.store()
            .snapshot()
            .iter()
            .all(|l| l.lease_owner.is_none())
    );
}

#[tokio::test(start_paused = true)]
async fn renewals_carry_the_throughput_of_the_records_delivered() {
    let env = env(1);
    for p in payloads("tp", 200) {
        env.put_plain("key", &p).unwrap();
    }
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    env.wait_until("every record", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == 200
    })
    .await
    .unwrap();
    env.wait_until("a throughput written", Duration::from_secs(60), |e| {
        e.store()
            .snapshot()
            .iter()
            .any(|l| l.throughput_kbps.is_some_and(|t| t > 0.0))
    })
    .await
    .unwrap();
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_worker_joining_gets_its_share_by_graceful_handoffs_no_zombie_nothing_twice() {
    let env = env(6);
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    env.wait_until("3/3", Duration::from_secs(120), |_| {
        w1.held_leases().len() == 3 && w2.held_leases().len() == 3
    })
    .await
    .unwrap();
    let mut expected = BTreeSet::new();
    for (i, p) in payloads("before", 300).into_iter().enumerate() {
        env.put_plain(&format!("key-{}", i % 37), &p).unwrap();
        expected.insert(p);
    }
    env.wait_until("the first records", Duration::from_secs(60), |e| {
        e.delivered_payloads() == expected
    })
    .await
    .unwrap();
    // A third worker joins: it is owed two leases, none is free: it asks for them.
    let joined = Instant::now();
    let (w3, _) = env.start("w3", Behaviour::new()).await.unwrap();
    let workers = [&w1, &w2, &w3];
    env.wait_until(
        "2/2/2, no handoff in flight",
        Duration::from_secs(120),
        |e| {
            workers.iter().all(|w| w.held_leases().len() == 2)
                && e.store()
                    .snapshot()
                    .iter()
                    .all(|l| l.checkpoint_owner.is_none())
        },
    )
    .await
    .unwrap();
    let took = joined.elapsed();
    println!(
        "a joining worker had its share after {took:?} (taker interval {:?})",
        FAILOVER / 2
    );
    assert!(took <= 3 * (FAILOVER / 2), "{took:?}");
    for (i, p) in payloads("after", 300).into_iter().enumerate() {
        env.put_plain(&format!("key-{}", i % 37), &p).unwrap();
        expected.insert(p);
    }
    env.wait_until("every record", Duration::from_secs(60), |e| {
        e.delivered_payloads() == expected
    })
    .await
    .unwrap();
    let events = env.log().events();
    // Two processors of w1/w2 were asked to stop (Requested), none was a zombie.
    let shutdowns: Vec<(String, kcl_interfaces::ShutdownReason)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Shutdown { worker, reason, .. } => Some((worker.clone(), *reason)),
            _ => None,
        })
        .collect();
    assert!(
        shutdowns
            .iter()
            .all(|(_, r)| *r == kcl_interfaces::ShutdownReason::Requested),
        "{shutdowns:?}"
    );
    assert_eq!(shutdowns.len(), 2, "{shutdowns:?}");
    // Nothing delivered twice: w3 started each lease at the last record its previous
    // owner delivered and checkpointed.
    assert_eq!(env.log().delivered_count(), expected.len());
    for w in [w1, w2, w3] {
        w.shutdown().await.unwrap();
    }
}

/// A worker whose store hangs while it records the children of a finished shard, and that
/// loses the parent's lease meanwhile, stops retrying at once and shuts its processor down
/// as `Zombie`: a late retry would create a child lease another worker may have finished
/// and cleaned up since (a simulation seed found it), and `Terminate` would checkpoint a
/// shard end the worker no longer owns.
#[tokio::test(start_paused = true)]
async fn a_parent_lease_lost_while_its_children_are_recorded_stops_the_retries() {
    use kcl_lease::test_util::lease_store::{Fault, FaultKind, LeaseOperation};
    let env = env(1);
    env.put_plain("k", "one").unwrap();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    env.wait_until("first record", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    const ATTEMPTS: u32 = 5;
    for child in ["shardId-000000000001", "shardId-000000000002"] {
        env.store().inject(
            Fault::new(FaultKind::Hang, ATTEMPTS)
                .for_operation(LeaseOperation::CreateLease)
                .for_key(child),
        );
    }
    env.kinesis()
        .split_shard(STREAM, "shardId-000000000000", 1u128 << 127)
        .unwrap();
    env.wait_until(
        "a child lease creation hangs",
        Duration::from_secs(60),
        |e| {
            e.store()
                .stats()
                .operation(LeaseOperation::CreateLease)
                .faults
                >= 1
        },
    )
    .await
    .unwrap();
    // Another worker takes the parent's lease while the creation hangs.
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    env.store().take_lease(&lease, "thief").await.unwrap();
    let parent_shutdown = |e: &Fleet| {
        e.log().events().into_iter().find_map(|ev| match ev {
            Event::Shutdown { shard, reason, .. } if shard == "shardId-000000000000" => {
                Some(reason)
            }
            _ => None,
        })
    };
    env.wait_until(
        "the parent's processor shut down",
        Duration::from_secs(120),
        |e| parent_shutdown(e).is_some(),
    )
    .await
    .unwrap();
    assert_eq!(
        parent_shutdown(&env),
        Some(kcl_interfaces::ShutdownReason::Zombie)
    );
    // One hung attempt, then none: the retries saw the lease gone.
    let left: u32 = env
        .store()
        .pending_faults()
        .iter()
        .map(Fault::remaining)
        .sum();
    assert!(
        left >= 2 * ATTEMPTS - 2,
        "{} creations attempted after the lease was lost",
        2 * ATTEMPTS - left
    );
    let after = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.lease_owner.as_deref(), Some("thief"));
    assert!(!after.checkpoint.is_shard_end(), "{after:?}");
    w1.shutdown().await.unwrap();
}

/// The in-memory lease store, with every `complete_handoff` (the hand-over write of a
/// graceful handoff) delayed by `delay` before it reaches the table; counts the calls that
/// started and those that reached the table.
#[derive(Debug)]
struct SlowHandoffs {
    inner: Arc<kcl_lease::test_util::lease_store::InMemoryLeaseStore>,
    delay: Duration,
    started: std::sync::atomic::AtomicUsize,
    landed: std::sync::atomic::AtomicUsize,
}

impl SlowHandoffs {
    fn started(&self) -> usize {
        self.started.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn landed(&self) -> usize {
        self.landed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait::async_trait]
impl LeaseStore for SlowHandoffs {
    async fn create_table_if_not_exists(
        &self,
        billing: kcl_lease::BillingMode,
    ) -> Result<bool, kcl_lease::LeaseError> {
        self.inner.create_table_if_not_exists(billing).await
    }
    async fn table_exists(&self) -> Result<bool, kcl_lease::LeaseError> {
        self.inner.table_exists().await
    }
    async fn create_lease_if_not_exists(
        &self,
        lease: &kcl_lease::Lease,
    ) -> Result<bool, kcl_lease::LeaseError> {
        self.inner.create_lease_if_not_exists(lease).await
    }
    async fn list_leases(&self) -> Result<Vec<kcl_lease::Lease>, kcl_lease::LeaseError> {
        self.inner.list_leases().await
    }
    async fn get_lease(
        &self,
        lease_key: &str,
    ) -> Result<Option<kcl_lease::Lease>, kcl_lease::LeaseError> {
        self.inner.get_lease(lease_key).await
    }
    async fn renew_lease(
        &self,
        lease: &kcl_lease::Lease,
        throughput_kbps: Option<f64>,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.renew_lease(lease, throughput_kbps).await
    }
    async fn take_lease(
        &self,
        lease: &kcl_lease::Lease,
        new_owner: &str,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.take_lease(lease, new_owner).await
    }
    async fn release_lease(
        &self,
        lease: &kcl_lease::Lease,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.release_lease(lease).await
    }
    async fn update_checkpoint(
        &self,
        lease: &kcl_lease::Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.update_checkpoint(lease, checkpoint).await
    }
    async fn update_pending_checkpoint(
        &self,
        lease: &kcl_lease::Lease,
        pending: Option<&ExtendedSequenceNumber>,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.update_pending_checkpoint(lease, pending).await
    }
    async fn update_child_shard_ids(
        &self,
        lease: &kcl_lease::Lease,
        children: &BTreeSet<String>,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.update_child_shard_ids(lease, children).await
    }
    async fn reset_checkpoint(
        &self,
        lease: &kcl_lease::Lease,
        checkpoint: &ExtendedSequenceNumber,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.reset_checkpoint(lease, checkpoint).await
    }
    async fn initiate_handoff(
        &self,
        lease: &kcl_lease::Lease,
        next_owner: &str,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.inner.initiate_handoff(lease, next_owner).await
    }
    async fn complete_handoff(
        &self,
        lease: &kcl_lease::Lease,
    ) -> Result<kcl_lease::Lease, kcl_lease::LeaseError> {
        self.started
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let result = self.inner.complete_handoff(lease).await;
        self.landed
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        result
    }
    async fn delete_lease(&self, lease: &kcl_lease::Lease) -> Result<(), kcl_lease::LeaseError> {
        self.inner.delete_lease(lease).await
    }
    async fn client_version(&self) -> Result<Option<String>, kcl_lease::LeaseError> {
        self.inner.client_version().await
    }
    async fn lease_keys_of_owner(&self, owner: &str) -> Result<Vec<String>, kcl_lease::LeaseError> {
        self.inner.lease_keys_of_owner(owner).await
    }
    async fn lease_owner_index_active(&self) -> Result<bool, kcl_lease::LeaseError> {
        self.inner.lease_owner_index_active().await
    }
    fn state_tables(&self) -> Option<kcl_lease::v3::table::StateTables> {
        self.inner.state_tables()
    }
}

/// How long the hand-over write takes in the tests below: well within `call_timeout`
/// (10 s), so nothing times out.
const HANDOFF_WRITE: Duration = Duration::from_secs(2);

/// A worker `w1` holding the one lease of a one-shard stream on a [`SlowHandoffs`] store,
/// asked (by hand, as a joining `w2` would) to hand the lease over to `w2`, once its
/// processor stopped and the hand-over write is in flight.
async fn handoff_in_flight() -> (Fleet, Arc<SlowHandoffs>, WorkerHandle) {
    let base = env(1);
    let slow = Arc::new(SlowHandoffs {
        inner: base.store().clone(),
        delay: HANDOFF_WRITE,
        started: Default::default(),
        landed: Default::default(),
    });
    let env = base.with_workers_lease_store(slow.clone());
    env.put_plain("k", "one").unwrap();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    env.wait_until("first record", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    let lease = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    env.store().initiate_handoff(&lease, "w2").await.unwrap();
    env.wait_until(
        "the hand-over write in flight",
        Duration::from_secs(30),
        |_| slow.started() == 1,
    )
    .await
    .unwrap();
    assert_eq!(slow.landed(), 0);
    // The processor was asked to stop (Requested), not cut off.
    assert!(env.log().events().iter().any(|e| matches!(e,
        Event::Shutdown { worker, reason: kcl_interfaces::ShutdownReason::Requested, .. }
            if worker == "w1")));
    (env, slow, w1)
}

/// A graceful stop while a hand-over write is in flight waits for it (instead of racing it
/// with a release of its own) and reports the lease as handed over, not as not released.
#[tokio::test(start_paused = true)]
async fn a_graceful_stop_while_a_handoff_completes_reports_the_lease_handed_over() {
    let (env, slow, w1) = handoff_in_flight().await;
    let report = w1.shutdown().await.unwrap();
    assert!(report.leases_not_released.is_empty(), "{report:?}");
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.leases_released, vec!["shardId-000000000000"]);
    assert_eq!(report.leases_handed_over, vec!["shardId-000000000000"]);
    // One hand-over write, and it landed: the next owner owns the lease.
    assert_eq!((slow.started(), slow.landed()), (1, 1));
    let row = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.lease_owner.as_deref(), Some("w2"), "{row:?}");
    assert_eq!(row.checkpoint_owner, None, "{row:?}");
}

/// A crash (abort) while a hand-over write is in flight aborts that write too: no handoff
/// completes after the worker died (its next owner completes it after `handoff_timeout`).
#[tokio::test(start_paused = true)]
async fn an_aborted_worker_completes_no_handoff_afterwards() {
    let (env, slow, w1) = handoff_in_flight().await;
    w1.abort().await;
    tokio::time::sleep(HANDOFF_WRITE * 3).await;
    assert_eq!(slow.landed(), 0);
    let row = env
        .store()
        .get_lease("shardId-000000000000")
        .await
        .unwrap()
        .unwrap();
    // Still in the handoff: `w1` the current owner, `w2` the next.
    assert_eq!(row.lease_owner.as_deref(), Some("w2"), "{row:?}");
    assert_eq!(row.checkpoint_owner.as_deref(), Some("w1"), "{row:?}");
}
