//! Enhanced fan-out: the in-memory Kinesis's SubscribeToShard rules, and the worker reading
//! through it, on tokio's paused clock.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use kcl_lease::LeaseStore;
use kcl_worker::stream::{
    ConsumerStatus, IteratorPosition, StreamClient, StreamError, SubscribeEvent, Subscription,
};
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::kinesis::{Fault, FaultKind, InMemoryKinesis, Operation};
use kcl_worker::test_util::recording::{Behaviour, Event};
use kcl_worker::{FanOutConfig, RetrievalConfig, WorkerConfigBuilder};

const STREAM: &str = "orders";
const SHARD0: &str = "shardId-000000000000";

async fn stream_arn(kinesis: &InMemoryKinesis) -> String {
    kinesis
        .describe_stream_summary(STREAM)
        .await
        .unwrap()
        .stream_arn
}

async fn consumer(kinesis: &InMemoryKinesis, name: &str) -> String {
    let arn = stream_arn(kinesis).await;
    kinesis
        .register_stream_consumer(&arn, name)
        .await
        .unwrap()
        .consumer_arn
}

async fn next(sub: &mut Box<dyn Subscription>) -> SubscribeEvent {
    tokio::time::timeout(Duration::from_secs(600), sub.next_event())
        .await
        .expect("an event in time")
        .expect("no error")
        .expect("not ended")
}

fn fan_out(b: WorkerConfigBuilder) -> WorkerConfigBuilder {
    b.retrieval_specific_config(RetrievalConfig::fan_out())
}

fn payloads(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:04}")).collect()
}

// ---- the in-memory Kinesis ---------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn consumers_register_once_become_active_after_the_delay_and_are_limited() {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 1).unwrap();
    kinesis.set_consumer_activation_delay(Duration::from_secs(3));
    let arn = stream_arn(&kinesis).await;
    let c = kinesis.register_stream_consumer(&arn, "app").await.unwrap();
    assert_eq!(c.status, ConsumerStatus::Creating);
    assert!(c.consumer_arn.starts_with(&format!("{arn}/consumer/app:")));
    assert!(matches!(
        kinesis.register_stream_consumer(&arn, "app").await,
        Err(StreamError::ResourceInUse { .. })
    ));
    // Not ACTIVE yet: subscribing is refused.
    assert!(matches!(
        kinesis
            .subscribe_to_shard(&c.consumer_arn, SHARD0, &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::ResourceInUse { .. })
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let d = kinesis.describe_stream_consumer(&arn, "app").await.unwrap();
    assert_eq!(d.status, ConsumerStatus::Active);
    assert_eq!(d.consumer_arn, c.consumer_arn);
    assert!(matches!(
        kinesis.describe_stream_consumer(&arn, "other").await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    for i in 1..20 {
        kinesis
            .register_stream_consumer(&arn, &format!("c{i}"))
            .await
            .unwrap();
    }
    assert!(matches!(
        kinesis.register_stream_consumer(&arn, "c20").await,
        Err(StreamError::Throttled { .. })
    ));
    assert_eq!(kinesis.consumer_count(STREAM), 20);
}

#[tokio::test(start_paused = true)]
async fn subscriptions_follow_the_service_rules_and_continue_by_continuation_number() {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 1).unwrap();
    let consumer = consumer(&kinesis, "app").await;
    for i in 0..5 {
        kinesis
            .put_record(STREAM, "k", None, Bytes::from(format!("r{i}")))
            .unwrap();
    }
    let mut sub = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.records.len(), 5);
    assert_eq!(
        first.continuation_sequence_number.as_ref(),
        Some(&first.records[4].sequence_number)
    );
    // One call per second; a fresh resubscribe within five seconds is ResourceInUse.
    assert!(matches!(
        kinesis
            .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::Throttled { .. })
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(matches!(
        kinesis
            .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::ResourceInUse { .. })
    ));
    // Records put later are pushed; an idle subscription gets empty heartbeats.
    kinesis.put_record(STREAM, "k", None, "r5".into()).unwrap();
    let second = next(&mut sub).await;
    assert_eq!(second.records.len(), 1);
    let heartbeat = next(&mut sub).await;
    assert!(heartbeat.records.is_empty());
    assert_eq!(
        heartbeat.continuation_sequence_number,
        second.continuation_sequence_number
    );
    // After five seconds a new subscription takes over; the old one fails.
    let cont = second.continuation_sequence_number.clone().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    kinesis.put_record(STREAM, "k", None, "r6".into()).unwrap();
    let mut taken = kinesis
        .subscribe_to_shard(
            &consumer,
            SHARD0,
            &IteratorPosition::AfterSequenceNumber(cont),
        )
        .await
        .unwrap();
    assert!(matches!(
        sub.next_event().await,
        Err(StreamError::ResourceInUse { .. })
    ));
    let resumed = next(&mut taken).await;
    assert_eq!(resumed.records.len(), 1, "continues after the continuation");
    assert_eq!(resumed.records[0].data, Bytes::from_static(b"r6"));
    // The service ends every subscription after five minutes.
    let ended = tokio::time::timeout(Duration::from_secs(400), async {
        loop {
            if taken.next_event().await.unwrap().is_none() {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the subscription ends after five minutes");
    assert_eq!(kinesis.stats().subscriptions_expired, 1);
}

#[tokio::test(start_paused = true)]
async fn the_last_event_of_a_closed_shard_names_the_children_and_has_no_continuation() {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 1).unwrap();
    let consumer = consumer(&kinesis, "app").await;
    kinesis
        .put_record(STREAM, "k", None, "before".into())
        .unwrap();
    let mut sub = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.records.len(), 1);
    assert!(!first.is_shard_end());
    let children = kinesis.split_shard(STREAM, SHARD0, 1u128 << 127).unwrap();
    let last = next(&mut sub).await;
    assert!(last.is_shard_end());
    assert_eq!(last.continuation_sequence_number, None);
    let ids: BTreeSet<String> = last
        .child_shards
        .iter()
        .map(|c| c.shard_id.clone())
        .collect();
    assert_eq!(ids, children.iter().cloned().collect());
    assert!(sub.next_event().await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn injected_faults_end_a_subscription_mid_stream_or_silence_it() {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 1).unwrap();
    let consumer = consumer(&kinesis, "app").await;
    kinesis.put_record(STREAM, "k", None, "a".into()).unwrap();
    let mut sub = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    next(&mut sub).await;
    kinesis.inject(
        Fault::new(FaultKind::ServiceError, 1)
            .for_operation(Operation::SubscribeToShardEvent)
            .for_key(SHARD0),
    );
    assert!(matches!(
        sub.next_event().await,
        Err(StreamError::Service { .. })
    ));
    assert!(
        sub.next_event().await.unwrap().is_none(),
        "an error ends it"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut silent = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    kinesis.inject(
        Fault::new(FaultKind::Hang, 1)
            .for_operation(Operation::SubscribeToShardEvent)
            .for_key(SHARD0),
    );
    kinesis.put_record(STREAM, "k", None, "b".into()).unwrap();
    let waited = tokio::time::timeout(Duration::from_secs(60), silent.next_event()).await;
    assert!(waited.is_err(), "a silent subscription delivers nothing");
}

// ---- the worker --------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn two_fan_out_workers_share_four_shards_and_deliver_everything_without_polling() {
    let env = Fleet::new(STREAM, 4).unwrap();
    env.kinesis()
        .set_consumer_activation_delay(Duration::from_secs(2));
    let mut expected = BTreeSet::new();
    for (i, p) in payloads("plain", 200).into_iter().enumerate() {
        env.put_plain(&format!("key-{}", i % 23), &p).unwrap();
        expected.insert(p);
    }
    let keys: Vec<String> = (0..10).map(|c| format!("agg-key-{c}")).collect();
    for (c, chunk) in payloads("agg", 300).chunks(30).enumerate() {
        let items: Vec<(&str, String)> = chunk
            .iter()
            .map(|p| (keys[c].as_str(), p.clone()))
            .collect();
        env.put_aggregate(&items).unwrap();
        expected.extend(chunk.iter().cloned());
    }
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), fan_out)
        .await
        .unwrap();
    let (w2, _) = env
        .start_with("w2", Behaviour::new(), fan_out)
        .await
        .unwrap();
    env.wait_until("every record", Duration::from_secs(120), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);
    env.wait_until("balance", Duration::from_secs(120), |_| {
        w1.held_leases().len() == 2 && w2.held_leases().len() == 2
    })
    .await
    .unwrap();
    // A lease stolen before its first checkpoint is read again by its new owner.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let stats = env.kinesis().stats();
    // Records come only through the subscriptions (GetRecords only checks, once caught up,
    // whether a shard ended).
    assert_eq!(stats.records_returned, 0, "fan-out does not poll records");
    assert!(stats.records_pushed >= stats.records_put, "{stats:?}");
    assert!(stats.subscriptions_opened >= 4, "{stats:?}");
    assert_eq!(stats.register_stream_consumer, 2, "{stats:?}");
    assert_eq!(env.kinesis().consumer_count(STREAM), 1);
    for lease in env.store().list_leases().await.unwrap() {
        assert!(lease.checkpoint.sequence_number().is_some(), "{lease:?}");
    }
    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
    assert_eq!(
        env.kinesis().consumer_count(STREAM),
        1,
        "never deregistered"
    );
}

/// Per partition key, the first deliveries in produced order (a lease moving between
/// workers may deliver records again after the last checkpoint).
fn assert_first_seen_in_order(env: &Fleet, produced: &BTreeMap<String, Vec<String>>) {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (_, _, r) in env.log().deliveries() {
        let p = String::from_utf8(r.data.to_vec()).unwrap();
        if seen.insert(p.clone()) {
            got.entry(r.partition_key.clone()).or_default().push(p);
        }
    }
    assert_eq!(&got, produced);
}

/// Every record exactly once, and per partition key in order.
fn assert_once_in_order(env: &Fleet, produced: &BTreeMap<String, Vec<String>>) {
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, _, r) in env.log().deliveries() {
        got.entry(r.partition_key.clone())
            .or_default()
            .push(String::from_utf8(r.data.to_vec()).unwrap());
    }
    assert_eq!(&got, produced);
}

#[tokio::test(start_paused = true)]
async fn subscriptions_are_renewed_every_five_minutes_and_after_errors_without_loss_or_repeat() {
    let env = Fleet::new(STREAM, 2).unwrap();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), fan_out)
        .await
        .unwrap();
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Twelve minutes of records; an error mid-stream at about 35 s, and at about 500 s two
    // in a row on shard 0: the second right after the resubscribe, so the next resubscribe
    // comes within five seconds of a successful one and meets ResourceInUse.
    for round in 0..144 {
        for k in 0..4 {
            let key = format!("k{k}");
            let p = format!("{key}/{round:03}");
            env.put_plain(&key, &p).unwrap();
            produced.entry(key).or_default().push(p);
        }
        if round == 7 {
            env.kinesis().inject(
                Fault::new(FaultKind::ServiceError, 1)
                    .for_operation(Operation::SubscribeToShardEvent),
            );
        }
        if round == 100 {
            env.kinesis().inject(
                Fault::new(FaultKind::ServiceError, 2)
                    .for_operation(Operation::SubscribeToShardEvent)
                    .for_key(SHARD0),
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let total: usize = produced.values().map(Vec::len).sum();
    env.wait_until("all records", Duration::from_secs(120), |e| {
        e.log().delivered_count() >= total
    })
    .await
    .unwrap();
    let stats = env.kinesis().stats();
    assert!(stats.subscriptions_expired >= 2, "{stats:?}");
    assert_eq!(stats.faults_injected, 3, "{stats:?}");
    assert!(stats.subscribe_resource_in_use >= 1, "{stats:?}");
    // The reader keeps to one SubscribeToShard per second per shard: none was refused for it.
    assert_eq!(stats.subscribe_throttled, 0, "{stats:?}");
    assert_once_in_order(&env, &produced);
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_silent_subscription_is_torn_down_and_renewed_after_the_event_timeout() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), |b| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new().event_timeout(Duration::from_secs(10)),
            ))
        })
        .await
        .unwrap();
    env.put_plain("k", "first").unwrap();
    env.wait_until("first", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    let opened = env.kinesis().stats().subscriptions_opened;
    env.kinesis().inject(
        Fault::new(FaultKind::Hang, 1)
            .for_operation(Operation::SubscribeToShardEvent)
            .for_key(SHARD0),
    );
    // Let the reader enter the silent wait, then put a record it must still get.
    tokio::time::sleep(Duration::from_secs(6)).await;
    env.put_plain("k", "second").unwrap();
    let took = env
        .wait_until("second", Duration::from_secs(60), |e| {
            e.log().delivered_count() == 2
        })
        .await
        .unwrap();
    assert!(
        took <= Duration::from_secs(20),
        "renewed after ~10 s: {took:?}"
    );
    assert!(env.kinesis().stats().subscriptions_opened > opened);
    assert_eq!(env.kinesis().stats().calls_hung, 1);
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_slow_processor_holds_the_reading_back_within_the_prefetch_budget() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let clock = env.clock().clone();
    let (w1, _) = env
        .start_with(
            "w1",
            Behaviour::new().slow(Duration::from_secs(3600), clock),
            // max_records bounds polling only; it is lowered so that the prefetch budget
            // (at least max_records) may be 200.
            |b| {
                fan_out(b)
                    .max_records(100u32)
                    .max_prefetch_records(200usize)
            },
        )
        .await
        .unwrap();
    // 3000 records arrive over 30 s, in puts of 50; the processor is stuck in its first
    // batch.
    for round in 0..60 {
        let entries = (0..50).map(|i| {
            kcl_worker::test_util::kinesis::PutRecordsEntry::new("k", format!("{round}-{i}"))
        });
        env.kinesis().put_records(STREAM, entries).unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let pushed = env.kinesis().stats().records_pushed;
    let events = env.kinesis().stats().subscribe_to_shard_event;
    // The first batch (being processed), the prefetch budget and one event waiting for it.
    assert!(pushed <= 50 + 200 + 200, "pushed {pushed} of 3000");
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        env.kinesis().stats().subscribe_to_shard_event,
        events,
        "no event is read while the budget is exhausted"
    );
    w1.abort().await;
}

#[tokio::test(start_paused = true)]
async fn fan_out_split_and_merge_children_after_parents_order_kept() {
    let env = Fleet::new(STREAM, 2).unwrap();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), fan_out)
        .await
        .unwrap();
    let (w2, _) = env
        .start_with("w2", Behaviour::new(), fan_out)
        .await
        .unwrap();
    let keys: Vec<String> = (0..8).map(|i| format!("user-{i}")).collect();
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 0..30 {
        for k in &keys {
            let p = format!("{k}/{round:03}");
            env.put_plain(k, &p).unwrap();
            produced.entry(k.clone()).or_default().push(p);
        }
        if round == 10 {
            env.kinesis()
                .split_shard(STREAM, SHARD0, 1u128 << 126)
                .unwrap();
        }
        if round == 20 {
            // Merge the second child of the split with shard 1.
            env.kinesis()
                .merge_shards(STREAM, "shardId-000000000003", "shardId-000000000001")
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
    assert_first_seen_in_order(&env, &produced);
    // Every child initialised only after each parent's SHARD_END checkpoint.
    let events = env.log().events();
    let ended = |shard: &str| {
        events.iter().position(|e| matches!(e, Event::Checkpointed { shard: s, error: None, during: Some(kcl_interfaces::ShutdownReason::Terminate), .. } if s == shard))
    };
    for (child, parents) in [
        ("shardId-000000000002", vec![SHARD0]),
        ("shardId-000000000003", vec![SHARD0]),
        (
            "shardId-000000000004",
            vec!["shardId-000000000003", "shardId-000000000001"],
        ),
    ] {
        let init = events
            .iter()
            .position(|e| matches!(e, Event::Initialized { shard, .. } if shard == child))
            .unwrap_or_else(|| panic!("{child} initialised"));
        for parent in parents {
            let end = ended(parent).unwrap_or_else(|| panic!("{parent} ended"));
            assert!(end < init, "{child} started before {parent} ended");
        }
    }
    w1.shutdown().await.unwrap();
    w2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fan_out_restart_resumes_inside_an_aggregate() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let items: Vec<(&str, String)> = (0..10).map(|i| ("k", format!("sub-{i}"))).collect();
    env.put_aggregate(&items).unwrap();
    let (w1, _) = env
        .start_with(
            "w1",
            Behaviour::new().checkpoint_every_batch(false),
            fan_out,
        )
        .await
        .unwrap();
    env.wait_until("the aggregate", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 10
    })
    .await
    .unwrap();
    let (_, _, fourth) = env.log().deliveries()[3].clone();
    assert_eq!(fourth.sub_sequence_number, 3);
    let lease = env.store().get_lease(SHARD0).await.unwrap().unwrap();
    env.store()
        .update_checkpoint(&lease, &fourth.extended_sequence_number())
        .await
        .unwrap();
    w1.abort().await;
    let before = env.log().delivered_count();
    let (w2, _) = env
        .start_with("w2", Behaviour::new(), fan_out)
        .await
        .unwrap();
    env.wait_until("redelivery", Duration::from_secs(60), |e| {
        e.log().delivered_count() > before
    })
    .await
    .unwrap();
    let redelivered: Vec<u64> = env.log().deliveries()[before..]
        .iter()
        .map(|(_, _, r)| r.sub_sequence_number)
        .collect();
    assert_eq!(redelivered, vec![4, 5, 6, 7, 8, 9]);
    w2.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_given_consumer_arn_registers_nothing_and_a_consumer_never_active_fails_the_start() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let arn = consumer(env.kinesis(), "pre-registered").await;
    env.put_plain("k", "x").unwrap();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), |b| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new().consumer_arn(arn.clone()),
            ))
        })
        .await
        .unwrap();
    env.wait_until("x", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    assert_eq!(
        env.kinesis().stats().register_stream_consumer,
        1,
        "only ours"
    );
    w1.shutdown().await.unwrap();
    // A consumer that stays CREATING: the start fails after registration_timeout.
    env.kinesis()
        .set_consumer_activation_delay(Duration::from_secs(3600));
    let started = tokio::time::Instant::now();
    let err = env
        .start_with("w2", Behaviour::new(), |b| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new()
                    .consumer_name("slow")
                    .registration_timeout(Duration::from_secs(20)),
            ))
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            kcl_worker::WorkerError::Stream(StreamError::TimedOut { .. })
        ),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    // Registration throttled (LimitExceeded) is retried.
    env.kinesis().set_consumer_activation_delay(Duration::ZERO);
    let injected_before = env.kinesis().stats().faults_injected;
    env.kinesis().inject(
        Fault::new(FaultKind::Throttle, 2).for_operation(Operation::RegisterStreamConsumer),
    );
    let (w3, _) = env
        .start_with("w3", Behaviour::new(), |b| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new().consumer_name("third"),
            ))
        })
        .await
        .unwrap();
    // Both throttles were met (and retried through).
    assert_eq!(
        env.kinesis().stats().faults_injected - injected_before,
        2,
        "{:?}",
        env.kinesis().stats()
    );
    w3.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn events_carry_millis_behind_latest_and_are_bounded_in_size() {
    // Arrival times and MillisBehindLatest follow the clock's wall time.
    let clock = std::sync::Arc::new(kcl_lease::test_util::ManualClock::new());
    let kinesis = InMemoryKinesis::with_clock(clock.clone());
    kinesis.create_stream(STREAM, 1).unwrap();
    let consumer = consumer(&kinesis, "app").await;
    for chunk in 0..21 {
        let entries = (0..500).map(|i| {
            kcl_worker::test_util::kinesis::PutRecordsEntry::new("k", format!("{chunk}-{i}"))
        });
        kinesis.put_records(STREAM, entries).unwrap();
    }
    clock.advance(Duration::from_secs(2));
    let mut sub = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    let first = next(&mut sub).await;
    assert_eq!(first.records.len(), 10_000);
    assert!(
        first.millis_behind_latest.unwrap() >= 2000,
        "{:?}",
        first.millis_behind_latest
    );
    let second = next(&mut sub).await;
    assert_eq!(second.records.len(), 500);
    assert_eq!(second.millis_behind_latest, Some(0));
}

// ---- the consumer: a given ARN checked at start, a deregistered one registered again -----

#[tokio::test(start_paused = true)]
async fn consumers_are_described_by_arn_and_deregistering_ends_their_subscriptions() {
    let kinesis = InMemoryKinesis::new();
    kinesis.create_stream(STREAM, 1).unwrap();
    let arn = stream_arn(&kinesis).await;
    let consumer = consumer(&kinesis, "app").await;
    let d = kinesis
        .describe_stream_consumer_by_arn(&consumer)
        .await
        .unwrap();
    assert_eq!(
        (d.consumer_name.as_str(), d.stream_arn.as_str(), d.status),
        ("app", arn.as_str(), ConsumerStatus::Active)
    );
    assert_eq!(
        kinesis
            .describe_stream_consumer(&arn, "app")
            .await
            .unwrap()
            .stream_arn,
        arn
    );
    assert!(matches!(
        kinesis
            .describe_stream_consumer_by_arn(&format!("{arn}/consumer/app:1"))
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    assert!(matches!(
        kinesis.describe_stream_consumer_by_arn("not-an-arn").await,
        Err(StreamError::InvalidArgument { .. })
    ));
    kinesis.put_record(STREAM, "k", None, "a".into()).unwrap();
    let mut sub = kinesis
        .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await.records.len(), 1);
    kinesis.deregister_stream_consumer(&arn, "app").unwrap();
    // The open subscription ends with an error naming the consumer, not the shard.
    match sub.next_event().await {
        Err(StreamError::ResourceNotFound { message }) => {
            assert!(message.contains(&consumer), "{message}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        kinesis.describe_stream_consumer_by_arn(&consumer).await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(matches!(
        kinesis
            .subscribe_to_shard(&consumer, SHARD0, &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    assert!(matches!(
        kinesis.deregister_stream_consumer(&arn, "app"),
        Err(StreamError::ResourceNotFound { .. })
    ));
}

/// The start error for a given `consumer_arn`: `ConfigError::Invalid` naming the option.
fn consumer_arn_invalid(err: kcl_worker::WorkerError) -> String {
    match err {
        kcl_worker::WorkerError::Config(kcl_worker::ConfigError::Invalid {
            option: "consumer_arn",
            reason,
        }) => reason,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_given_consumer_arn_is_checked_at_start() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let with_arn = |arn: String, timeout: u64| {
        move |b: WorkerConfigBuilder| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new()
                    .consumer_arn(arn)
                    .registration_timeout(Duration::from_secs(timeout)),
            ))
        }
    };
    let arn = stream_arn(env.kinesis()).await;
    // No such consumer.
    let missing = format!("{arn}/consumer/nobody:1");
    let err = env
        .start_with("w1", Behaviour::new(), with_arn(missing.clone(), 20))
        .await
        .unwrap_err();
    let reason = consumer_arn_invalid(err);
    assert!(
        reason.contains("no stream consumer") && reason.contains(&missing),
        "{reason}"
    );
    // A consumer of another stream.
    env.kinesis().create_stream("other", 1).unwrap();
    let other_arn = env
        .kinesis()
        .describe_stream_summary("other")
        .await
        .unwrap()
        .stream_arn;
    let foreign = env
        .kinesis()
        .register_stream_consumer(&other_arn, "foreign")
        .await
        .unwrap()
        .consumer_arn;
    let reason = consumer_arn_invalid(
        env.start_with("w1", Behaviour::new(), with_arn(foreign, 20))
            .await
            .unwrap_err(),
    );
    assert!(
        reason.contains(&other_arn) && reason.contains(STREAM),
        "{reason}"
    );
    // A consumer that stays CREATING past registration_timeout.
    env.kinesis()
        .set_consumer_activation_delay(Duration::from_secs(3600));
    let slow = consumer(env.kinesis(), "slow").await;
    let started = tokio::time::Instant::now();
    let reason = consumer_arn_invalid(
        env.start_with("w1", Behaviour::new(), with_arn(slow, 20))
            .await
            .unwrap_err(),
    );
    assert!(
        reason.contains("registration_timeout") && reason.contains("CREATING"),
        "{reason}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(20) && took < Duration::from_secs(30),
        "{took:?}"
    );
    // One CREATING for 3 s is waited for, and used.
    env.kinesis()
        .set_consumer_activation_delay(Duration::from_secs(3));
    let soon = consumer(env.kinesis(), "soon").await;
    env.put_plain("k", "x").unwrap();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), with_arn(soon, 20))
        .await
        .unwrap();
    env.wait_until("x", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    // Nothing was registered by the worker, and nothing delivered by the failed starts.
    assert_eq!(env.kinesis().stats().register_stream_consumer, 3);
    assert_eq!(env.log().delivered_count(), 1);
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_consumer_deregistered_while_running_is_registered_again_once_per_worker() {
    let env = Fleet::new(STREAM, 4).unwrap();
    env.kinesis()
        .set_consumer_activation_delay(Duration::from_secs(2));
    let by_name = |b: WorkerConfigBuilder| {
        b.retrieval_specific_config(RetrievalConfig::FanOut(
            FanOutConfig::new().consumer_name("reader"),
        ))
    };
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), by_name)
        .await
        .unwrap();
    let mut expected = BTreeSet::new();
    for p in payloads("before", 40) {
        env.put_plain(&p, &p).unwrap();
        expected.insert(p);
    }
    env.wait_until("the first records", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(w1.held_leases().len(), 4);
    let arn = stream_arn(env.kinesis()).await;
    let old = env
        .kinesis()
        .describe_stream_consumer(&arn, "reader")
        .await
        .unwrap()
        .consumer_arn;
    let before = env.kinesis().stats();
    tokio::time::sleep(Duration::from_millis(5)).await;
    env.kinesis()
        .deregister_stream_consumer(&arn, "reader")
        .unwrap();
    for p in payloads("after", 40) {
        env.put_plain(&p, &p).unwrap();
        expected.insert(p);
    }
    env.wait_until("the later records", Duration::from_secs(120), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);
    let after = env.kinesis().stats();
    // Four shard readers lost their subscriptions; the consumer was registered once.
    assert_eq!(
        after.register_stream_consumer - before.register_stream_consumer,
        1,
        "{after:?}"
    );
    assert_eq!(env.kinesis().consumer_count(STREAM), 1);
    let new = env
        .kinesis()
        .describe_stream_consumer(&arn, "reader")
        .await
        .unwrap()
        .consumer_arn;
    assert_ne!(new, old);
    // Every reader subscribes with the new ARN: new subscriptions opened on all shards.
    assert!(
        after.subscriptions_opened >= before.subscriptions_opened + 4,
        "{after:?}"
    );
    w1.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_given_consumer_deregistered_while_running_is_not_registered_again() {
    let env = Fleet::new(STREAM, 2).unwrap();
    let arn = stream_arn(env.kinesis()).await;
    let given = consumer(env.kinesis(), "given").await;
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), |b| {
            b.retrieval_specific_config(RetrievalConfig::FanOut(
                FanOutConfig::new().consumer_arn(given.clone()),
            ))
        })
        .await
        .unwrap();
    env.put_plain("k", "first").unwrap();
    env.wait_until("first", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 1
    })
    .await
    .unwrap();
    let before = env.kinesis().stats();
    env.kinesis()
        .deregister_stream_consumer(&arn, "given")
        .unwrap();
    env.put_plain("k", "second").unwrap();
    tokio::time::sleep(Duration::from_secs(120)).await;
    let after = env.kinesis().stats();
    assert_eq!(
        after.register_stream_consumer,
        before.register_stream_consumer
    );
    assert_eq!(env.kinesis().consumer_count(STREAM), 0);
    assert_eq!(env.log().delivered_count(), 1);
    assert_eq!(w1.held_leases().len(), 2, "the worker keeps running");
    // The readers keep backing off (at most one SubscribeToShard per max_backoff of 10 s
    // per shard once backed off), and the consumer is described again at most once per
    // max_backoff for the whole worker, not once per failure.
    let subscribes = after.subscribe_to_shard - before.subscribe_to_shard;
    let describes = after.describe_stream_consumer - before.describe_stream_consumer;
    assert!((2..=2 * 20).contains(&subscribes), "{subscribes}");
    assert!((1..=13).contains(&describes), "{describes}");
    assert!(describes < subscribes, "{describes} < {subscribes}");
    w1.shutdown().await.unwrap();
}

// ---- malformed events, MillisBehindLatest as the processor sees it -------------------------

/// The in-memory Kinesis, except that the first event with records after `armed` is set
/// comes with neither a continuation number nor child shards (a malformed event).
#[derive(Debug, Clone)]
struct MalformsOneEvent {
    inner: InMemoryKinesis,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct MalformingSubscription {
    inner: Box<dyn Subscription>,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait::async_trait]
impl Subscription for MalformingSubscription {
    async fn next_event(&mut self) -> Result<Option<SubscribeEvent>, StreamError> {
        let mut event = self.inner.next_event().await?;
        if let Some(e) = event.as_mut()
            && !e.records.is_empty()
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            e.continuation_sequence_number = None;
            e.child_shards.clear();
        }
        Ok(event)
    }
}

#[async_trait::async_trait]
impl StreamClient for MalformsOneEvent {
    async fn list_shards_page(
        &self,
        stream: &str,
        next_token: Option<&str>,
        filter: Option<&kcl_worker::stream::ShardFilter>,
    ) -> Result<kcl_worker::stream::ShardPage, StreamError> {
        self.inner
            .list_shards_page(stream, next_token, filter)
            .await
    }
    async fn describe_stream_summary(
        &self,
        stream: &str,
    ) -> Result<kcl_worker::stream::StreamSummary, StreamError> {
        self.inner.describe_stream_summary(stream).await
    }
    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<String, StreamError> {
        self.inner
            .get_shard_iterator(stream, shard_id, position)
            .await
    }
    async fn get_records(
        &self,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<kcl_worker::stream::GetRecordsOutput, StreamError> {
        self.inner.get_records(shard_iterator, limit).await
    }
    async fn register_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<kcl_worker::stream::StreamConsumer, StreamError> {
        self.inner
            .register_stream_consumer(stream_arn, consumer_name)
            .await
    }
    async fn describe_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<kcl_worker::stream::StreamConsumer, StreamError> {
        self.inner
            .describe_stream_consumer(stream_arn, consumer_name)
            .await
    }
    async fn describe_stream_consumer_by_arn(
        &self,
        consumer_arn: &str,
    ) -> Result<kcl_worker::stream::StreamConsumer, StreamError> {
        self.inner
            .describe_stream_consumer_by_arn(consumer_arn)
            .await
    }
    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<Box<dyn Subscription>, StreamError> {
        let inner = self
            .inner
            .subscribe_to_shard(consumer_arn, shard_id, position)
            .await?;
        Ok(Box::new(MalformingSubscription {
            inner,
            armed: self.armed.clone(),
        }))
    }
}

#[tokio::test(start_paused = true)]
async fn an_event_without_continuation_or_children_is_read_again_not_taken_for_the_shard_end() {
    let env = Fleet::new(STREAM, 1).unwrap();
    let stream = MalformsOneEvent {
        inner: env.kinesis().clone(),
        armed: Default::default(),
    };
    let config = fan_out(env.config("w1")).build().unwrap();
    let factory = kcl_worker::test_util::recording::RecordingFactory::new(
        "w1",
        env.log().clone(),
        Behaviour::new(),
    );
    let w1 = kcl_worker::Worker::builder(config, factory)
        .stream_client(std::sync::Arc::new(stream.clone()))
        .lease_store(env.store().clone())
        .clock(env.clock().clone())
        .build()
        .await
        .unwrap()
        .start()
        .await
        .unwrap();
    let mut produced: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut put = |round: usize| {
        for k in 0..3 {
            let key = format!("k{k}");
            let p = format!("{key}/{round:03}");
            env.put_plain(&key, &p).unwrap();
            produced.entry(key).or_default().push(p);
        }
    };
    put(0);
    env.wait_until("the first records", Duration::from_secs(30), |e| {
        e.log().delivered_count() == 3
    })
    .await
    .unwrap();
    // The next event with records is malformed; later ones are not.
    stream
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for round in 1..6 {
        put(round);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    env.wait_until("every record", Duration::from_secs(60), |e| {
        e.log().delivered_count() >= 18
    })
    .await
    .unwrap();
    assert!(
        !stream.armed.load(std::sync::atomic::Ordering::SeqCst),
        "the malformed event was sent"
    );
    // Nothing was skipped and nothing delivered twice: the malformed event's records came
    // again in the next subscription.
    assert_once_in_order(&env, &produced);
    // The shard did not end: no Terminate, no SHARD_END checkpoint, and its lease is held.
    let terminated = env
        .log()
        .events()
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Shutdown {
                    reason: kcl_interfaces::ShutdownReason::Terminate,
                    ..
                }
            )
        })
        .count();
    assert_eq!(terminated, 0);
    let lease = env.store().get_lease(SHARD0).await.unwrap().unwrap();
    assert!(!lease.checkpoint.is_shard_end(), "{lease:?}");
    assert_eq!(lease.lease_owner.as_deref(), Some("w1"));
    // The reader subscribed again after the malformed event.
    assert!(env.kinesis().stats().subscriptions_opened >= 2);
    w1.shutdown().await.unwrap();
}

/// Records the `millis_behind_latest` of every batch it is given.
#[derive(Debug)]
struct LagProcessor {
    seen: std::sync::Arc<std::sync::Mutex<Vec<(usize, u64)>>>,
}

impl kcl_interfaces::RecordProcessor for LagProcessor {
    async fn initialize(&mut self, _: kcl_interfaces::InitializationInput) {}
    async fn process_records(&mut self, input: kcl_interfaces::ProcessRecordsInput) {
        self.seen
            .lock()
            .unwrap()
            .push((input.records.len(), input.millis_behind_latest));
    }
    async fn shutdown(&mut self, _: kcl_interfaces::ShutdownInput) {}
}

#[tokio::test(start_paused = true)]
async fn the_processor_gets_millis_behind_latest_from_the_events() {
    let env = Fleet::new(STREAM, 1).unwrap();
    // 10,500 records two seconds old: the first event carries 10,000 of them (its size
    // bound) and is behind the tip; the second reaches the tip.
    for chunk in 0..21 {
        let entries = (0..500).map(|i| {
            kcl_worker::test_util::kinesis::PutRecordsEntry::new("k", format!("{chunk}-{i}"))
        });
        env.kinesis().put_records(STREAM, entries).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let shared = seen.clone();
    let w1 = env
        .start_factory(
            "w1",
            move || LagProcessor {
                seen: shared.clone(),
            },
            1,
            fan_out,
        )
        .await
        .unwrap();
    env.wait_until("every record", Duration::from_secs(60), |_| {
        seen.lock().unwrap().iter().map(|(n, _)| n).sum::<usize>() >= 10_500
    })
    .await
    .unwrap();
    let batches = seen.lock().unwrap().clone();
    assert_eq!(batches.first().map(|b| b.0), Some(10_000), "{batches:?}");
    assert!(batches[0].1 >= 1900, "{batches:?}");
    assert_eq!(batches.last().map(|b| b.1), Some(0), "{batches:?}");
    w1.shutdown().await.unwrap();
}

/// Partition keys whose hash falls in the lower half (shard 0 of two) and the upper half.
fn keys_by_half() -> (String, String) {
    let half = 1u128 << 127;
    let mut low = None;
    let mut high = None;
    for i in 0.. {
        let key = format!("key-{i}");
        let hash = kcl_kpl::partition_key_hash(&key);
        if hash < half && low.is_none() {
            low = Some(key);
        } else if hash >= half && high.is_none() {
            high = Some(key);
        }
        if let (Some(l), Some(h)) = (&low, &high) {
            return (l.clone(), h.clone());
        }
    }
    unreachable!()
}

/// What one worker of `retrieval` delivers from an aggregate routed to shard 0 that holds a
/// user record of shard 1's range, between two plain records.
async fn deliveries_of_a_cross_shard_aggregate(
    fan_out_retrieval: bool,
    deliver_out_of_range: bool,
) -> Vec<String> {
    let env = Fleet::new(STREAM, 2).unwrap();
    let (low, high) = keys_by_half();
    let (w1, _) = env
        .start_with("w1", Behaviour::new(), |b| {
            let b = b.deliver_out_of_range_aggregates(deliver_out_of_range);
            if fan_out_retrieval { fan_out(b) } else { b }
        })
        .await
        .unwrap();
    env.put_plain(&low, "before").unwrap();
    env.put_aggregate(&[
        (&low, "in-range".to_owned()),
        (&high, "out-of-range".to_owned()),
    ])
    .unwrap();
    env.put_plain(&low, "after").unwrap();
    env.wait_until(
        "the record after the aggregate",
        Duration::from_secs(60),
        |e| e.delivered_payloads().contains("after"),
    )
    .await
    .unwrap();
    let got = env
        .log()
        .deliveries()
        .into_iter()
        .filter(|(_, shard, _)| shard == SHARD0)
        .map(|(_, _, r)| String::from_utf8(r.data.to_vec()).unwrap())
        .collect();
    w1.shutdown().await.unwrap();
    got
}

#[tokio::test(start_paused = true)]
async fn fan_out_filters_aggregates_by_the_shard_range_as_polling_does() {
    for deliver in [false, true] {
        let polled = deliveries_of_a_cross_shard_aggregate(false, deliver).await;
        let pushed = deliveries_of_a_cross_shard_aggregate(true, deliver).await;
        assert_eq!(
            pushed, polled,
            "deliver_out_of_range_aggregates = {deliver}"
        );
        if deliver {
            assert_eq!(polled, ["before", "in-range", "out-of-range", "after"]);
        } else {
            // The aggregate holding a record of another shard is dropped whole.
            assert_eq!(polled, ["before", "after"]);
        }
    }
}
