//! Behaviour of the in-memory Kinesis, on a manual clock: layout, routing, sequence numbers,
//! resharding, paging and filters, retention, iterator expiry, positions, limits and faults.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::num::NonZeroU32;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use kcl_kpl::{HashKeyRange, MAX_HASH_KEY, Record, SequenceNumber, partition_key_hash};
use kcl_lease::Clock;
use kcl_testkit::clock::ManualClock;
use kcl_testkit::kinesis::scenario::{error_kind, run_conformance_scenario};
use kcl_testkit::kinesis::{
    Fault, FaultKind, InMemoryKinesis, Operation, PutRecordsEntry, SimulatedError,
};
use kcl_worker::stream::{
    GetRecordsOutput, IteratorPosition, Shard, ShardFilter, StreamClient, StreamError,
};

const HOUR: Duration = Duration::from_secs(3600);
const MINUTE: Duration = Duration::from_secs(60);

fn setup() -> (ManualClock, InMemoryKinesis) {
    let clock = ManualClock::new();
    let kinesis = InMemoryKinesis::with_clock(Arc::new(clock.clone()));
    (clock, kinesis)
}

fn data(text: &str) -> Bytes {
    Bytes::copy_from_slice(text.as_bytes())
}

fn texts(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
        .collect()
}

fn shard_ids(shards: &[Shard]) -> Vec<&str> {
    shards.iter().map(|s| s.shard_id.as_str()).collect()
}

fn sid(n: usize) -> String {
    format!("shardId-{n:012}")
}

/// How many faulted calls are still registered.
fn pending(k: &InMemoryKinesis) -> u32 {
    k.pending_faults().iter().map(Fault::remaining).sum()
}

/// Polls a future once (it does not need to be woken: nothing in the fake waits on time
/// without latency).
fn poll_once<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
    future.poll(&mut Context::from_waker(Waker::noop()))
}

async fn iterator(
    k: &InMemoryKinesis,
    stream: &str,
    shard: &str,
    position: IteratorPosition,
) -> String {
    k.get_shard_iterator(stream, shard, &position)
        .await
        .unwrap()
}

/// Reads from `iterator` with `limit` until the shard ends or an empty page at the tip.
async fn drain(
    k: &InMemoryKinesis,
    mut iterator: String,
    limit: u32,
) -> (Vec<Record>, GetRecordsOutput) {
    let mut records = Vec::new();
    loop {
        let mut output = k.get_records(&iterator, limit).await.unwrap();
        let empty = output.records.is_empty();
        records.append(&mut output.records);
        match output.next_shard_iterator.clone() {
            Some(next) if !empty => iterator = next,
            _ => return (records, output),
        }
    }
}

/// Puts until one record lands on each of the given shards, returns a key per shard.
fn key_for_shard(k: &InMemoryKinesis, stream: &str, range: HashKeyRange) -> String {
    (0..10_000)
        .map(|i| format!("key-{i}"))
        .find(|key| range.contains(partition_key_hash(key)))
        .unwrap_or_else(|| panic!("no key for {range} in {stream} ({k:?})"))
}

#[tokio::test]
async fn new_streams_split_the_hash_key_space_evenly() {
    let (_clock, k) = setup();
    for count in [1u32, 2, 3, 5, 8, 64] {
        let name = format!("s{count}");
        k.create_stream(&name, count).unwrap();
        let shards = k.list_all_shards(&name, None).await.unwrap();
        assert_eq!(shards.len(), count as usize);
        assert_eq!(shards[0].hash_key_range.start(), 0);
        assert_eq!(shards.last().unwrap().hash_key_range.end(), MAX_HASH_KEY);
        for (i, shard) in shards.iter().enumerate() {
            assert_eq!(shard.shard_id, sid(i));
            assert!(shard.parent_shard_id.is_none() && shard.adjacent_parent_shard_id.is_none());
            assert!(!shard.is_closed());
            assert_eq!(shard.starting_sequence_number.as_str().len(), 56);
        }
        for pair in shards.windows(2) {
            assert_eq!(
                pair[0].hash_key_range.end() + 1,
                pair[1].hash_key_range.start()
            );
            assert!(pair[0].starting_sequence_number < pair[1].starting_sequence_number);
        }
        let sizes: Vec<u128> = shards
            .iter()
            .map(|s| s.hash_key_range.end() - s.hash_key_range.start())
            .collect();
        let spread = sizes.iter().max().unwrap() - sizes.iter().min().unwrap();
        assert!(
            spread <= u128::from(count),
            "{count} shards: uneven {sizes:?}"
        );
    }
    // The layout the service (and kinesis-local) gives 3 shards.
    let three = k.list_all_shards("s3", None).await.unwrap();
    assert_eq!(
        three[1].hash_key_range,
        "113427455640312821154458202477256070485:226854911280625642308916404954512140969"
            .parse()
            .unwrap()
    );
    // Two shards split at 2^127 as on the service (kinesis-local splits 2^128 - 1 and ends
    // the first shard one key earlier).
    let two = k.list_all_shards("s2", None).await.unwrap();
    assert_eq!(two[0].hash_key_range.end(), (1u128 << 127) - 1);
    assert_eq!(two[1].hash_key_range.start(), 1u128 << 127);
    let summary = k.describe_stream_summary("s3").await.unwrap();
    assert_eq!(summary.stream_name, "s3");
    assert_eq!(summary.status, "ACTIVE");
    assert_eq!(summary.open_shard_count, 3);
    assert_eq!(summary.retention_period_hours, 24);
    assert!(
        summary.stream_arn.starts_with("arn:aws:kinesis:")
            && summary.stream_arn.ends_with(":stream/s3")
    );
}

#[tokio::test]
async fn stream_lifecycle_and_bad_names() {
    let (_clock, k) = setup();
    k.create_stream("a", 1).unwrap();
    assert_eq!(
        error_kind(&k.create_stream("a", 1).unwrap_err()),
        "InvalidArgument"
    );
    for bad in ["", "has space", "slash/name", &"x".repeat(129)] {
        assert_eq!(
            error_kind(&k.create_stream(bad, 1).unwrap_err()),
            "InvalidArgument",
            "{bad:?}"
        );
    }
    assert_eq!(
        error_kind(&k.create_stream("zero", 0).unwrap_err()),
        "InvalidArgument"
    );
    k.delete_stream("a").unwrap();
    assert!(matches!(
        k.describe_stream_summary("a").await,
        Err(StreamError::StreamNotFound { stream }) if stream == "a"
    ));
    assert!(matches!(
        k.delete_stream("a"),
        Err(StreamError::StreamNotFound { .. })
    ));
    assert!(matches!(
        k.list_shards_page("a", None, None).await,
        Err(StreamError::StreamNotFound { .. })
    ));
    assert!(matches!(
        k.get_shard_iterator("a", &sid(0), &IteratorPosition::Latest)
            .await,
        Err(StreamError::StreamNotFound { .. })
    ));
    assert!(matches!(
        k.put_record("a", "k", None, data("x")),
        Err(StreamError::StreamNotFound { .. })
    ));
}

#[tokio::test]
async fn records_are_routed_by_partition_key_or_explicit_hash_key() {
    let (_clock, k) = setup();
    k.create_stream("s", 4).unwrap();
    let shards = k.list_all_shards("s", None).await.unwrap();
    for i in 0..200 {
        let key = format!("pk-{i}");
        let put = k.put_record("s", &key, None, data(&key)).unwrap();
        let owner = shards
            .iter()
            .find(|s| s.hash_key_range.contains(partition_key_hash(&key)))
            .unwrap();
        assert_eq!(put.shard_id, owner.shard_id, "{key}");
    }
    // An explicit hash key overrides the partition key: the edges of every range.
    for shard in &shards {
        for hash_key in [shard.hash_key_range.start(), shard.hash_key_range.end()] {
            let put = k
                .put_record("s", "pk-0", Some(&hash_key.to_string()), data("e"))
                .unwrap();
            assert_eq!(put.shard_id, shard.shard_id);
        }
    }
    // Each shard holds exactly the records routed to it, with their keys, and no explicit
    // hash key is returned (as on the service).
    for shard in &shards {
        let it = iterator(&k, "s", &shard.shard_id, IteratorPosition::TrimHorizon).await;
        let (records, _) = drain(&k, it, 1000).await;
        for record in records
            .iter()
            .filter(|r| r.partition_key != "pk-0" || r.data != "e")
        {
            assert!(
                shard
                    .hash_key_range
                    .contains(partition_key_hash(&record.partition_key))
            );
            assert_eq!(record.data, record.partition_key.as_bytes());
        }
        assert!(
            records
                .iter()
                .all(|r| r.explicit_hash_key.is_none() && !r.aggregated)
        );
        assert!(
            records
                .iter()
                .all(|r| r.encryption_type.as_deref() == Some("NONE"))
        );
    }
    let bad_puts = [
        ("", None),
        (&*"k".repeat(257), None),
        ("k", Some("-1")),
        ("k", Some("340282366920938463463374607431768211456")),
        ("k", Some("12a")),
    ];
    for (key, ehk) in bad_puts {
        assert_eq!(
            error_kind(&k.put_record("s", key, ehk, data("x")).unwrap_err()),
            "InvalidArgument",
            "{key:?} {ehk:?}"
        );
    }
    let too_big = Bytes::from(vec![0u8; 1024 * 1024]);
    assert_eq!(
        error_kind(&k.put_record("s", "k", None, too_big).unwrap_err()),
        "InvalidArgument"
    );
    let just_fits = Bytes::from(vec![0u8; 1024 * 1024 - 1]);
    k.put_record("s", "k", None, just_fits).unwrap();
}

#[tokio::test]
async fn sequence_numbers_are_ordered_and_grow_with_time() {
    let (clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    let shards = k.list_all_shards("s", None).await.unwrap();
    let key0 = key_for_shard(&k, "s", shards[0].hash_key_range);
    let key1 = key_for_shard(&k, "s", shards[1].hash_key_range);
    let mut puts = Vec::new();
    for i in 0..50 {
        puts.push(
            k.put_record("s", &key0, None, data(&format!("{i}")))
                .unwrap(),
        );
        if i % 10 == 0 {
            clock.advance(Duration::from_millis(1));
        }
    }
    for pair in puts.windows(2) {
        assert!(pair[0].sequence_number < pair[1].sequence_number);
    }
    assert!(puts.iter().all(|p| p.sequence_number.as_str().len() == 56));
    assert!(puts[0].sequence_number > shards[0].starting_sequence_number);
    // Later in time on another shard: still larger.
    clock.advance(HOUR);
    let later = k.put_record("s", &key1, None, data("later")).unwrap();
    assert!(later.sequence_number > puts.last().unwrap().sequence_number);
    // An hour is a big step in the numbers, not just +1.
    let before: u128 = puts.last().unwrap().sequence_number.as_str()[17..]
        .parse()
        .unwrap();
    let after: u128 = later.sequence_number.as_str()[17..].parse().unwrap();
    assert!(
        after - before > 1u128 << 40,
        "time is visible in the numbers"
    );

    // Read back in order with the put sequence numbers and arrival times.
    let it = iterator(&k, "s", &shards[0].shard_id, IteratorPosition::TrimHorizon).await;
    let (records, _) = drain(&k, it, 7).await;
    assert_eq!(
        texts(&records),
        (0..50).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    for (record, put) in records.iter().zip(&puts) {
        assert_eq!(record.sequence_number, put.sequence_number);
        assert_eq!(record.partition_key, key0);
        assert!(
            record.approximate_arrival_timestamp.unwrap() >= clock.system_time() - HOUR - MINUTE
        );
    }
}

#[tokio::test]
async fn a_split_closes_the_parent_and_the_parent_ends_with_its_children() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    for i in 0..5 {
        k.put_record("s", &format!("k{i}"), None, data(&format!("p{i}")))
            .unwrap();
    }
    clock.advance(MINUTE);
    let middle = 1u128 << 127;
    let children = k.split_shard("s", &sid(0), middle).unwrap();
    assert_eq!(children, [sid(1), sid(2)]);
    let shards = k.list_all_shards("s", None).await.unwrap();
    assert_eq!(shard_ids(&shards), [sid(0), sid(1), sid(2)]);
    let (parent, left, right) = (&shards[0], &shards[1], &shards[2]);
    assert!(parent.is_closed());
    let ending = parent.ending_sequence_number.clone().unwrap();
    assert!(ending > parent.starting_sequence_number);
    assert_eq!(
        left.hash_key_range,
        HashKeyRange::new(0, middle - 1).unwrap()
    );
    assert_eq!(
        right.hash_key_range,
        HashKeyRange::new(middle, MAX_HASH_KEY).unwrap()
    );
    for child in [left, right] {
        assert_eq!(child.parent_shard_id.as_deref(), Some(sid(0).as_str()));
        assert!(child.adjacent_parent_shard_id.is_none());
        assert!(!child.is_closed());
        assert!(
            child.starting_sequence_number > ending,
            "children start above the parent"
        );
    }
    assert_eq!(
        k.describe_stream_summary("s")
            .await
            .unwrap()
            .open_shard_count,
        2
    );

    // New records go to the children.
    let low = k.put_record("s", "x", Some("0"), data("low")).unwrap();
    let high = k
        .put_record("s", "x", Some(&MAX_HASH_KEY.to_string()), data("high"))
        .unwrap();
    assert_eq!(
        (low.shard_id.as_str(), high.shard_id.as_str()),
        (sid(1).as_str(), sid(2).as_str())
    );
    assert!(low.sequence_number > ending);

    // The parent, read 2 at a time: the remaining records, then no iterator and the children.
    let mut it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let mut pages = Vec::new();
    loop {
        let out = k.get_records(&it, 2).await.unwrap();
        pages.push((texts(&out.records), out.child_shards.clone()));
        match out.next_shard_iterator {
            Some(next) => {
                assert!(out.child_shards.is_empty());
                it = next;
            }
            None => break,
        }
    }
    assert_eq!(
        pages.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        [vec!["p0", "p1"], vec!["p2", "p3"], vec!["p4"]]
    );
    let children = &pages.last().unwrap().1;
    assert_eq!(children.len(), 2);
    assert_eq!(children[0].shard_id, sid(1));
    assert_eq!(children[0].parent_shard_ids, [sid(0)]);
    assert_eq!(children[0].hash_key_range, left.hash_key_range);
    assert_eq!(children[1].shard_id, sid(2));
    assert_eq!(children[1].hash_key_range, right.hash_key_range);

    // A fresh iterator at or after the end behaves the same: no records, no iterator,
    // the children.
    let last = k
        .get_records(
            &iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await,
            100,
        )
        .await
        .unwrap()
        .records
        .last()
        .unwrap()
        .sequence_number
        .clone();
    for position in [
        IteratorPosition::Latest,
        IteratorPosition::AfterSequenceNumber(last),
        IteratorPosition::AtSequenceNumber(ending.clone()),
        IteratorPosition::AtTimestamp(clock.system_time()),
    ] {
        let out = k
            .get_records(&iterator(&k, "s", &sid(0), position.clone()).await, 100)
            .await
            .unwrap();
        assert!(out.records.is_empty(), "{position:?}");
        assert!(out.next_shard_iterator.is_none(), "{position:?}");
        assert_eq!(out.child_shards, *children, "{position:?}");
        assert_eq!(out.millis_behind_latest, Some(0));
    }

    // Splitting a closed shard, or outside the range, is refused.
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(0), 5).unwrap_err()),
        "InvalidArgument"
    );
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(1), 0).unwrap_err()),
        "InvalidArgument"
    );
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(1), middle).unwrap_err()),
        "InvalidArgument"
    );
    // As the service: start + 1 < key < end. The last key, and start + 1, are refused.
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(1), middle - 1).unwrap_err()),
        "InvalidArgument"
    );
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(1), 1).unwrap_err()),
        "InvalidArgument"
    );
    // One below the last key is the highest valid split point: the second child owns two keys.
    let [_, small] = k.split_shard("s", &sid(1), middle - 2).unwrap();
    let shards = k.list_all_shards("s", None).await.unwrap();
    let small = shards.iter().find(|s| s.shard_id == small).unwrap();
    assert_eq!(
        small.hash_key_range,
        HashKeyRange::new(middle - 2, middle - 1).unwrap()
    );
    assert_eq!(
        error_kind(&k.split_shard("s", &sid(9), 5).unwrap_err()),
        "ResourceNotFound"
    );
}

#[tokio::test]
async fn merging_needs_adjacent_open_shards_and_records_both_parents() {
    let (_clock, k) = setup();
    k.create_stream("s", 3).unwrap();
    let shards = k.list_all_shards("s", None).await.unwrap();
    assert_eq!(
        error_kind(&k.merge_shards("s", &sid(0), &sid(2)).unwrap_err()),
        "InvalidArgument",
        "not adjacent"
    );
    assert_eq!(
        error_kind(&k.merge_shards("s", &sid(0), &sid(0)).unwrap_err()),
        "InvalidArgument"
    );
    let key1 = key_for_shard(&k, "s", shards[1].hash_key_range);
    let key2 = key_for_shard(&k, "s", shards[2].hash_key_range);
    k.put_record("s", &key1, None, data("in-1")).unwrap();
    k.put_record("s", &key2, None, data("in-2")).unwrap();
    // Order of the arguments decides parent and adjacent parent, whichever range is lower.
    let child = k.merge_shards("s", &sid(2), &sid(1)).unwrap();
    assert_eq!(child, sid(3));
    let shards = k.list_all_shards("s", None).await.unwrap();
    let merged = &shards[3];
    assert_eq!(merged.parent_shard_id.as_deref(), Some(sid(2).as_str()));
    assert_eq!(
        merged.adjacent_parent_shard_id.as_deref(),
        Some(sid(1).as_str())
    );
    assert_eq!(
        merged.hash_key_range,
        HashKeyRange::new(shards[1].hash_key_range.start(), MAX_HASH_KEY).unwrap()
    );
    assert!(shards[1].is_closed() && shards[2].is_closed() && !shards[0].is_closed());
    for parent in [&shards[1], &shards[2]] {
        assert!(merged.starting_sequence_number > *parent.ending_sequence_number.as_ref().unwrap());
    }
    assert_eq!(
        error_kind(&k.merge_shards("s", &sid(1), &sid(0)).unwrap_err()),
        "InvalidArgument",
        "closed"
    );
    // Both parents end with the one child, naming both parents.
    for (parent, text) in [(sid(1), "in-1"), (sid(2), "in-2")] {
        let it = iterator(&k, "s", &parent, IteratorPosition::TrimHorizon).await;
        let out = k.get_records(&it, 100).await.unwrap();
        assert_eq!(texts(&out.records), [text]);
        assert!(out.next_shard_iterator.is_none());
        assert_eq!(out.child_shards.len(), 1);
        assert_eq!(out.child_shards[0].shard_id, sid(3));
        assert_eq!(out.child_shards[0].parent_shard_ids, [sid(2), sid(1)]);
    }
    let after = k.put_record("s", &key1, None, data("after")).unwrap();
    assert_eq!(after.shard_id, sid(3));
}

/// Checks that the open shards are exactly the even layout of `count` shards and that every
/// shard's parents exist and are closed.
async fn assert_even_and_linked(k: &InMemoryKinesis, stream: &str, count: u32) {
    let shards = k.list_all_shards(stream, None).await.unwrap();
    let mut open: Vec<HashKeyRange> = shards
        .iter()
        .filter(|s| !s.is_closed())
        .map(|s| s.hash_key_range)
        .collect();
    open.sort_by_key(HashKeyRange::start);
    let reference = format!("{stream}-reference-{count}");
    k.create_stream(&reference, count).unwrap();
    let expected: Vec<HashKeyRange> = k
        .list_all_shards(&reference, None)
        .await
        .unwrap()
        .iter()
        .map(|s| s.hash_key_range)
        .collect();
    k.delete_stream(&reference).unwrap();
    assert_eq!(open, expected, "{count} shards");
    assert_eq!(
        k.describe_stream_summary(stream)
            .await
            .unwrap()
            .open_shard_count,
        count
    );
    for shard in &shards {
        for parent in shard.parent_ids() {
            let parent = shards.iter().find(|s| s.shard_id == parent).unwrap();
            assert!(parent.is_closed());
            assert!(
                shard.starting_sequence_number > *parent.ending_sequence_number.as_ref().unwrap()
            );
        }
    }
}

#[tokio::test]
async fn update_shard_count_scales_uniformly_through_splits_and_merges() {
    let (_clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    for i in 0..40 {
        k.put_record("s", &format!("k{i}"), None, data(&format!("{i}")))
            .unwrap();
    }
    for target in [4u32, 3, 6, 5, 3, 2, 1, 2] {
        k.update_shard_count("s", target).unwrap();
        assert_even_and_linked(&k, "s", target).await;
    }
    for bad in [0u32, 5, 10_001] {
        assert_eq!(
            error_kind(&k.update_shard_count("s", bad).unwrap_err()),
            "InvalidArgument",
            "{bad}"
        );
    }
    // 2 -> 4 is done by splitting each shard once.
    k.create_stream("t", 2).unwrap();
    k.update_shard_count("t", 4).unwrap();
    let shards = k.list_all_shards("t", None).await.unwrap();
    assert_eq!(shards.len(), 6);
    for child in &shards[2..] {
        assert!(child.adjacent_parent_shard_id.is_none());
        assert!([sid(0), sid(1)].contains(child.parent_shard_id.as_ref().unwrap()));
    }
    // Every record is still readable, once, following the lineage from the roots.
    let shards = k.list_all_shards("s", None).await.unwrap();
    let mut seen = Vec::new();
    for shard in &shards {
        let it = iterator(&k, "s", &shard.shard_id, IteratorPosition::TrimHorizon).await;
        let (records, last) = drain(&k, it, 100).await;
        seen.extend(texts(&records));
        assert_eq!(
            shard.is_closed(),
            last.next_shard_iterator.is_none(),
            "{}",
            shard.shard_id
        );
        if shard.is_closed() {
            let mut children: Vec<&str> = last
                .child_shards
                .iter()
                .map(|c| c.shard_id.as_str())
                .collect();
            let mut expected: Vec<&str> = shards
                .iter()
                .filter(|s| s.parent_ids().any(|p| p == shard.shard_id))
                .map(|s| s.shard_id.as_str())
                .collect();
            children.sort_unstable();
            expected.sort_unstable();
            assert_eq!(children, expected, "children of {}", shard.shard_id);
        }
    }
    seen.sort_by_key(|t| t.parse::<u32>().unwrap());
    assert_eq!(seen, (0..40).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn list_shards_pages_carry_the_stream_and_the_filter() {
    let (clock, k) = setup();
    k.create_stream("s", 5).unwrap();
    k.set_list_shards_page_size(NonZeroU32::new(2).unwrap());
    let first = k.list_shards_page("s", None, None).await.unwrap();
    assert_eq!(shard_ids(&first.shards), [sid(0), sid(1)]);
    let token = first.next_token.unwrap();
    // The stream argument is ignored with a token (the API forbids it).
    let second = k
        .list_shards_page("ignored", Some(&token), None)
        .await
        .unwrap();
    assert_eq!(shard_ids(&second.shards), [sid(2), sid(3)]);
    let third = k
        .list_shards_page("s", second.next_token.as_deref(), None)
        .await
        .unwrap();
    assert_eq!(shard_ids(&third.shards), [sid(4)]);
    assert!(third.next_token.is_none());
    assert_eq!(k.list_all_shards("s", None).await.unwrap().len(), 5);

    // A filter is kept across pages.
    k.split_shard("s", &sid(0), 2).unwrap();
    let page = k
        .list_shards_page("s", None, Some(&ShardFilter::AtLatest))
        .await
        .unwrap();
    assert_eq!(shard_ids(&page.shards), [sid(1), sid(2)]);
    let page = k
        .list_shards_page("s", page.next_token.as_deref(), None)
        .await
        .unwrap();
    assert_eq!(shard_ids(&page.shards), [sid(3), sid(4)]);
    let page = k
        .list_shards_page("s", page.next_token.as_deref(), None)
        .await
        .unwrap();
    assert_eq!(shard_ids(&page.shards), [sid(5), sid(6)]);
    assert!(page.next_token.is_none());

    // Bad and expired tokens.
    for bad in [
        "",
        "garbage",
        &token.replace('1', "2"),
        &format!("{token}x"),
    ] {
        assert_eq!(
            error_kind(&k.list_shards_page("s", Some(bad), None).await.unwrap_err()),
            "InvalidArgument",
            "{bad:?}"
        );
    }
    let fresh = k
        .list_shards_page("s", None, None)
        .await
        .unwrap()
        .next_token
        .unwrap();
    clock.advance(Duration::from_secs(299));
    k.list_shards_page("s", Some(&fresh), None).await.unwrap();
    clock.advance(Duration::from_secs(2));
    assert_eq!(
        error_kind(
            &k.list_shards_page("s", Some(&fresh), None)
                .await
                .unwrap_err()
        ),
        "InvalidArgument"
    );
    // A token of a deleted stream.
    let token = k
        .list_shards_page("s", None, None)
        .await
        .unwrap()
        .next_token
        .unwrap();
    k.delete_stream("s").unwrap();
    k.create_stream("s", 5).unwrap();
    assert!(matches!(
        k.list_shards_page("s", Some(&token), None).await,
        Err(StreamError::StreamNotFound { .. })
    ));
}

#[tokio::test]
async fn every_shard_filter_follows_the_service_documentation() {
    let (clock, k) = setup();
    let t0 = clock.system_time();
    k.create_stream("s", 2).unwrap();
    clock.advance(HOUR);
    k.split_shard("s", &sid(0), 1u128 << 126).unwrap(); // 2, 3 at t0+1h
    clock.advance(HOUR);
    k.merge_shards("s", &sid(2), &sid(3)).unwrap(); // 4 at t0+2h
    clock.advance(HOUR);
    let list = |filter: ShardFilter| {
        let k = k.clone();
        async move {
            let shards = k.list_all_shards("s", Some(&filter)).await.unwrap();
            shard_ids(&shards)
                .iter()
                .map(|s| s[8..].trim_start_matches('0').to_owned())
                .map(|s| if s.is_empty() { "0".to_owned() } else { s })
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    assert_eq!(list(ShardFilter::FromTrimHorizon).await, "0,1,2,3,4");
    assert_eq!(list(ShardFilter::AtLatest).await, "1,4");
    assert_eq!(
        list(ShardFilter::AtTrimHorizon).await,
        "0,1",
        "open when the stream began"
    );
    assert_eq!(
        list(ShardFilter::AtTimestamp(t0 + 90 * MINUTE)).await,
        "1,2,3"
    );
    assert_eq!(
        list(ShardFilter::AtTimestamp(t0 + HOUR)).await,
        "0,1,2,3",
        "both at the instant of the split"
    );
    assert_eq!(
        list(ShardFilter::AtTimestamp(t0 - 10 * HOUR)).await,
        "0,1",
        "before the stream: its start"
    );
    assert_eq!(
        list(ShardFilter::FromTimestamp(t0 + 90 * MINUTE)).await,
        "1,2,3,4"
    );
    assert_eq!(
        list(ShardFilter::FromTimestamp(t0 + 150 * MINUTE)).await,
        "1,4"
    );
    assert_eq!(list(ShardFilter::AfterShardId(sid(2))).await, "3,4");
    assert_eq!(list(ShardFilter::AfterShardId(sid(4))).await, "");

    // Retention: shard 0 closed at t0+1h leaves the list at t0+25h, 2 and 3 at t0+26h.
    clock.set(25 * HOUR - Duration::from_nanos(1));
    assert_eq!(list(ShardFilter::FromTrimHorizon).await, "0,1,2,3,4");
    clock.set(25 * HOUR);
    assert_eq!(list(ShardFilter::FromTrimHorizon).await, "1,2,3,4");
    assert_eq!(
        list(ShardFilter::AtTrimHorizon).await,
        "1,2,3",
        "open at t0+1h, still listed"
    );
    assert_eq!(
        list(ShardFilter::FromTimestamp(t0)).await,
        "1,2,3,4",
        "corrected to the trim horizon"
    );
    assert_eq!(
        list(ShardFilter::AtTimestamp(t0)).await,
        "1,2,3",
        "corrected to the trim horizon"
    );
    assert!(matches!(
        k.get_shard_iterator("s", &sid(0), &IteratorPosition::TrimHorizon)
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    clock.set(26 * HOUR);
    assert_eq!(list(ShardFilter::FromTrimHorizon).await, "1,4");
    assert_eq!(list(ShardFilter::AtTrimHorizon).await, "1,4");
}

#[tokio::test]
async fn retention_trims_records_on_the_clock() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    k.set_retention_period("s", HOUR).unwrap();
    assert_eq!(
        k.describe_stream_summary("s")
            .await
            .unwrap()
            .retention_period_hours,
        1
    );
    let first = k.put_record("s", "k", None, data("a")).unwrap();
    clock.advance(30 * MINUTE);
    k.put_record("s", "k", None, data("b")).unwrap();
    clock.advance(29 * MINUTE);
    let old_iterator = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let by_number = iterator(
        &k,
        "s",
        &sid(0),
        IteratorPosition::AtSequenceNumber(first.sequence_number.clone()),
    )
    .await;
    assert_eq!(
        texts(&k.get_records(&old_iterator, 10).await.unwrap().records),
        ["a", "b"]
    );
    clock.advance(MINUTE); // "a" is now an hour old
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    assert_eq!(texts(&k.get_records(&it, 10).await.unwrap().records), ["b"]);
    // Iterators issued before the trim start at the oldest retained record.
    assert_eq!(
        texts(&k.get_records(&old_iterator, 10).await.unwrap().records),
        ["b"]
    );
    assert_eq!(
        texts(&k.get_records(&by_number, 10).await.unwrap().records),
        ["b"]
    );
    // The sequence number of a trimmed record is still valid for its shard.
    let it = iterator(
        &k,
        "s",
        &sid(0),
        IteratorPosition::AfterSequenceNumber(first.sequence_number),
    )
    .await;
    assert_eq!(texts(&k.get_records(&it, 10).await.unwrap().records), ["b"]);
    clock.advance(30 * MINUTE);
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let out = k.get_records(&it, 10).await.unwrap();
    assert!(out.records.is_empty());
    assert_eq!(out.millis_behind_latest, Some(0));
    assert!(out.next_shard_iterator.is_some());
    assert_eq!(
        error_kind(&k.set_retention_period("s", Duration::ZERO).unwrap_err()),
        "InvalidArgument"
    );
}

#[tokio::test]
async fn iterators_expire_after_five_minutes_and_on_demand() {
    let (clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    k.put_record("s", "k", Some("0"), data("a")).unwrap();
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    clock.advance(5 * MINUTE);
    let out = k.get_records(&it, 10).await.unwrap(); // exactly five minutes: still valid
    assert_eq!(texts(&out.records), ["a"]);
    let next = out.next_shard_iterator.unwrap();
    clock.advance(Duration::from_millis(1));
    assert!(matches!(
        k.get_records(&it, 10).await,
        Err(StreamError::ExpiredIterator)
    ));
    // The next iterator was issued later, so it is still valid for five minutes.
    clock.advance(4 * MINUTE);
    let next = k
        .get_records(&next, 10)
        .await
        .unwrap()
        .next_shard_iterator
        .unwrap();

    // On demand: all at once, or one shard.
    let other = iterator(&k, "s", &sid(1), IteratorPosition::TrimHorizon).await;
    k.expire_shard_iterators("s", &sid(0)).unwrap();
    assert!(matches!(
        k.get_records(&next, 10).await,
        Err(StreamError::ExpiredIterator)
    ));
    let other = k
        .get_records(&other, 10)
        .await
        .unwrap()
        .next_shard_iterator
        .unwrap();
    let again = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    k.get_records(&again, 10).await.unwrap();
    k.expire_iterators();
    assert!(matches!(
        k.get_records(&again, 10).await,
        Err(StreamError::ExpiredIterator)
    ));
    assert!(matches!(
        k.get_records(&other, 10).await,
        Err(StreamError::ExpiredIterator)
    ));
    let fresh = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    assert_eq!(
        texts(&k.get_records(&fresh, 10).await.unwrap().records),
        ["a"]
    );

    // Garbage, altered, foreign iterators; deleted streams.
    let (_other_clock, stranger) = setup();
    stranger.create_stream("s", 2).unwrap();
    let foreign = iterator(&stranger, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let altered = fresh.replacen('0', "1", 1);
    assert_ne!(altered, fresh);
    for bad in [
        "",
        "garbage",
        "AAAAAAAAAAGy9xWmcFeIyrUm",
        &altered,
        &foreign,
        &fresh[..fresh.len() - 1],
    ] {
        assert_eq!(
            error_kind(&k.get_records(bad, 10).await.unwrap_err()),
            "InvalidArgument",
            "{bad:?}"
        );
    }
    k.delete_stream("s").unwrap();
    assert!(matches!(
        k.get_records(&fresh, 10).await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    k.create_stream("s", 2).unwrap();
    assert!(
        matches!(
            k.get_records(&fresh, 10).await,
            Err(StreamError::ResourceNotFound { .. })
        ),
        "a new stream of the same name does not take old iterators"
    );
}

#[tokio::test]
async fn positions_by_sequence_number_timestamp_and_latest() {
    let (clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    let mut puts = Vec::new();
    let mut times = Vec::new();
    for i in 0..5 {
        times.push(clock.system_time());
        puts.push(
            k.put_record("s", "k", Some("0"), data(&format!("r{i}")))
                .unwrap(),
        );
        clock.advance(Duration::from_secs(10));
    }
    let other_shard = k
        .put_record("s", "k", Some(&MAX_HASH_KEY.to_string()), data("x"))
        .unwrap();
    let read = |position: IteratorPosition| {
        let k = k.clone();
        async move {
            let it = k.get_shard_iterator("s", &sid(0), &position).await?;
            Ok::<_, StreamError>(texts(&k.get_records(&it, 100).await?.records))
        }
    };
    let n2 = puts[2].sequence_number.clone();
    assert_eq!(
        read(IteratorPosition::AtSequenceNumber(n2.clone()))
            .await
            .unwrap(),
        ["r2", "r3", "r4"]
    );
    assert_eq!(
        read(IteratorPosition::AfterSequenceNumber(n2))
            .await
            .unwrap(),
        ["r3", "r4"]
    );
    assert_eq!(
        read(IteratorPosition::AfterSequenceNumber(
            puts[4].sequence_number.clone()
        ))
        .await
        .unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(read(IteratorPosition::TrimHorizon).await.unwrap().len(), 5);
    assert_eq!(
        read(IteratorPosition::AtTimestamp(times[3])).await.unwrap(),
        ["r3", "r4"]
    );
    assert_eq!(
        read(IteratorPosition::AtTimestamp(
            times[3] - Duration::from_secs(1)
        ))
        .await
        .unwrap(),
        ["r3", "r4"]
    );
    assert_eq!(
        read(IteratorPosition::AtTimestamp(
            times[3] + Duration::from_millis(1)
        ))
        .await
        .unwrap(),
        ["r4"]
    );
    assert_eq!(
        read(IteratorPosition::AtTimestamp(SystemTime::UNIX_EPOCH))
            .await
            .unwrap()
            .len(),
        5
    );
    // The shard's starting sequence number is a valid position before the first record.
    let start = k.list_all_shards("s", None).await.unwrap()[0]
        .starting_sequence_number
        .clone();
    assert_eq!(
        read(IteratorPosition::AtSequenceNumber(start))
            .await
            .unwrap()
            .len(),
        5
    );

    // LATEST sees only what comes after it.
    let latest = iterator(&k, "s", &sid(0), IteratorPosition::Latest).await;
    let out = k.get_records(&latest, 100).await.unwrap();
    assert!(out.records.is_empty());
    assert_eq!(out.millis_behind_latest, Some(0));
    k.put_record("s", "k", Some("0"), data("new")).unwrap();
    let out = k
        .get_records(&out.next_shard_iterator.unwrap(), 100)
        .await
        .unwrap();
    assert_eq!(texts(&out.records), ["new"]);

    // Numbers that are not this shard's.
    let bad_numbers = [
        other_shard.sequence_number.clone(),
        SequenceNumber::parse("12345").unwrap(),
        SequenceNumber::parse(&format!("{}9", &puts[0].sequence_number.as_str()[..55])).unwrap(),
        SequenceNumber::parse(&"9".repeat(56)).unwrap(),
    ];
    for number in bad_numbers {
        for position in [
            IteratorPosition::AtSequenceNumber(number.clone()),
            IteratorPosition::AfterSequenceNumber(number.clone()),
        ] {
            assert_eq!(
                error_kind(&read(position).await.unwrap_err()),
                "InvalidArgument",
                "{number:?}"
            );
        }
    }
    assert!(matches!(
        k.get_shard_iterator("s", "shardId-000000000009", &IteratorPosition::Latest)
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
    assert!(matches!(
        k.get_shard_iterator("s", "shardId-1", &IteratorPosition::Latest)
            .await,
        Err(StreamError::ResourceNotFound { .. })
    ));
}

#[tokio::test]
async fn millis_behind_latest_is_the_age_of_the_last_record_returned() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    for i in 0..3 {
        k.put_record("s", "k", None, data(&format!("r{i}")))
            .unwrap();
        clock.advance(Duration::from_secs(10));
    }
    // Now = 30 s after the first record, 10 s after the last.
    let mut it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let mut behind = Vec::new();
    for _ in 0..4 {
        let out = k.get_records(&it, 1).await.unwrap();
        behind.push(out.millis_behind_latest.unwrap());
        it = out.next_shard_iterator.unwrap();
    }
    assert_eq!(behind, [30_000, 20_000, 0, 0]);
    clock.advance(Duration::from_secs(5));
    let all = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let out = k.get_records(&all, 2).await.unwrap();
    assert_eq!(out.millis_behind_latest, Some(25_000));
}

#[tokio::test]
async fn get_records_limits() {
    let (_clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    let entries: Vec<PutRecordsEntry> = (0..500)
        .map(|i| PutRecordsEntry::new("k", format!("{i}")))
        .collect();
    for _ in 0..25 {
        k.put_records("s", entries.clone()).unwrap();
    }
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    for limit in [0, 10_001] {
        assert_eq!(
            error_kind(&k.get_records(&it, limit).await.unwrap_err()),
            "InvalidArgument"
        );
    }
    let out = k.get_records(&it, 10_000).await.unwrap();
    assert_eq!(out.records.len(), 10_000);
    let out = k
        .get_records(&out.next_shard_iterator.unwrap(), 10_000)
        .await
        .unwrap();
    assert_eq!(out.records.len(), 2_500);
    assert_eq!(out.millis_behind_latest, Some(0));

    // 10 MiB per response, at least one record.
    k.create_stream("big", 1).unwrap();
    let megabyte = Bytes::from(vec![7u8; 1_000_000]);
    for _ in 0..12 {
        k.put_record("big", "k", None, megabyte.clone()).unwrap();
    }
    let it = iterator(&k, "big", &sid(0), IteratorPosition::TrimHorizon).await;
    let out = k.get_records(&it, 10_000).await.unwrap();
    assert_eq!(out.records.len(), 10);
    let out = k
        .get_records(&out.next_shard_iterator.unwrap(), 10_000)
        .await
        .unwrap();
    assert_eq!(out.records.len(), 2);
}

#[tokio::test]
async fn put_records_is_ordered_and_all_or_nothing() {
    let (_clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    let results = k
        .put_records(
            "s",
            vec![
                PutRecordsEntry::new("a", "1"),
                PutRecordsEntry::new("a", "2").with_explicit_hash_key(MAX_HASH_KEY.to_string()),
                PutRecordsEntry::new("a", "3").with_explicit_hash_key("0"),
            ],
        )
        .unwrap();
    assert_eq!(results.len(), 3);
    assert_eq!(results[1].shard_id, sid(1));
    assert_eq!(results[2].shard_id, sid(0));
    assert!(results[0].sequence_number < results[1].sequence_number);
    let stored_before = k.stats().records_put;
    for bad in [
        vec![],
        (0..501)
            .map(|i| PutRecordsEntry::new("k", format!("{i}")))
            .collect(),
        vec![
            PutRecordsEntry::new("k", "fine"),
            PutRecordsEntry::new("", "no key"),
        ],
        (0..6)
            .map(|_| PutRecordsEntry::new("k", vec![0u8; 1_000_000]))
            .collect(),
    ] {
        assert_eq!(
            error_kind(&k.put_records("s", bad).unwrap_err()),
            "InvalidArgument"
        );
    }
    assert_eq!(
        k.stats().records_put,
        stored_before,
        "nothing stored by failed batches"
    );
    assert!(matches!(
        k.put_records("nope", vec![PutRecordsEntry::new("k", "x")]),
        Err(StreamError::StreamNotFound { .. })
    ));
}

#[tokio::test]
async fn injected_faults_are_deterministic() {
    let (_clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    k.put_record("s", "k", Some("0"), data("a")).unwrap();
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;

    k.inject(Fault::new(FaultKind::Throttle, 2).for_operation(Operation::GetRecords));
    assert_eq!(pending(&k), 2);
    // Other operations are not affected.
    k.list_all_shards("s", None).await.unwrap();
    for _ in 0..2 {
        let err = k.get_records(&it, 10).await.unwrap_err();
        assert!(matches!(err, StreamError::Throttled { .. }) && err.is_retryable());
        let source = std::error::Error::source(&err).unwrap();
        let simulated = source.downcast_ref::<SimulatedError>().unwrap();
        assert_eq!(simulated.code(), "ProvisionedThroughputExceededException");
    }
    assert_eq!(texts(&k.get_records(&it, 10).await.unwrap().records), ["a"]);

    k.fail_next(1);
    assert!(matches!(
        k.describe_stream_summary("s").await,
        Err(StreamError::Service { .. })
    ));
    k.describe_stream_summary("s").await.unwrap();
    k.inject(Fault::new(FaultKind::Unreachable, 1));
    assert!(matches!(
        k.put_record("s", "k", None, data("x")),
        Err(StreamError::Unreachable { .. })
    ));
    k.inject(Fault::new(FaultKind::ExpiredIterator, 1).for_operation(Operation::GetRecords));
    assert!(matches!(
        k.get_records(&it, 10).await,
        Err(StreamError::ExpiredIterator)
    ));
    k.inject(Fault::new(FaultKind::Unreachable, 1).for_operation(Operation::ListShards));
    assert!(matches!(
        k.list_all_shards("s", None).await,
        Err(StreamError::Unreachable { .. })
    ));

    // Per shard: only that shard's GetRecords fail.
    let other = iterator(&k, "s", &sid(1), IteratorPosition::TrimHorizon).await;
    k.inject(
        Fault::new(FaultKind::Throttle, 3)
            .for_operation(Operation::GetRecords)
            .for_key(sid(0)),
    );
    for _ in 0..3 {
        k.get_records(&other, 10).await.unwrap();
        assert!(matches!(
            k.get_records(&it, 10).await,
            Err(StreamError::Throttled { .. })
        ));
    }
    k.get_records(&it, 10).await.unwrap();
    k.inject(
        Fault::new(FaultKind::ServiceError, 1)
            .for_operation(Operation::GetShardIterator)
            .for_key(sid(1)),
    );
    iterator(&k, "s", &sid(0), IteratorPosition::Latest).await;
    assert!(
        k.get_shard_iterator("s", &sid(1), &IteratorPosition::Latest)
            .await
            .is_err()
    );
    iterator(&k, "s", &sid(1), IteratorPosition::Latest).await;
    // A fault for a shard no call is about never fires.
    k.inject(Fault::new(FaultKind::Throttle, 1).for_key(sid(7)));
    k.get_records(&it, 10).await.unwrap();
    k.list_all_shards("s", None).await.unwrap();
    assert_eq!(pending(&k), 1);

    k.inject(Fault::new(FaultKind::Throttle, 5).for_operation(Operation::GetRecords));
    k.clear_faults();
    assert_eq!(pending(&k), 0);
    k.get_records(&it, 10).await.unwrap();

    let stats = k.stats();
    assert_eq!(stats.get_records, 13);
    assert_eq!(stats.calls(Operation::GetRecords), 13);
    assert_eq!(stats.describe_stream_summary, 2);
    assert_eq!(stats.list_shards, 3);
    assert_eq!(stats.put_record, 2);
    assert_eq!(stats.faults_injected, 10);
    assert_eq!(stats.records_put, 1);
    k.reset_stats();
    assert_eq!(k.stats().get_records, 0);
}

#[tokio::test]
async fn latency_is_spent_on_the_clock() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    k.set_latency(Operation::GetRecords, Duration::from_secs(2));
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let call = tokio::spawn({
        let k = k.clone();
        async move { k.get_records(&it, 10).await }
    });
    clock.settle().await;
    assert!(!call.is_finished());
    clock.advance_and_settle(Duration::from_millis(1999)).await;
    assert!(!call.is_finished());
    clock.advance_and_settle(Duration::from_millis(1)).await;
    assert!(call.is_finished());
    call.await.unwrap().unwrap();
    k.set_latency(Operation::GetRecords, Duration::ZERO);
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    k.get_records(&it, 10).await.unwrap();
}

#[tokio::test]
async fn the_optional_read_rate_limit_throttles_per_shard() {
    let (clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    k.set_get_records_rate_limit(NonZeroU32::new(5));
    let mut it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    for _ in 0..5 {
        it = k
            .get_records(&it, 10)
            .await
            .unwrap()
            .next_shard_iterator
            .unwrap();
    }
    assert!(matches!(
        k.get_records(&it, 10).await,
        Err(StreamError::Throttled { .. })
    ));
    let other = iterator(&k, "s", &sid(1), IteratorPosition::TrimHorizon).await;
    k.get_records(&other, 10).await.unwrap();
    clock.advance(Duration::from_secs(1));
    k.get_records(&it, 10).await.unwrap();
    assert_eq!(k.stats().read_rate_throttled, 1);
    k.set_get_records_rate_limit(None);
    for _ in 0..20 {
        it = k
            .get_records(&it, 10)
            .await
            .unwrap()
            .next_shard_iterator
            .unwrap();
    }
}

#[tokio::test]
async fn clones_share_the_streams_and_debug_stays_short() {
    let (_clock, k) = setup();
    let clone = k.clone();
    clone.create_stream("s", 1).unwrap();
    clone
        .put_record("s", "k", None, Bytes::from(vec![b'z'; 10_000]))
        .unwrap();
    assert_eq!(
        k.describe_stream_summary("s")
            .await
            .unwrap()
            .open_shard_count,
        1
    );
    let debug = format!("{k:?}");
    assert!(
        debug.contains("InMemoryKinesis") && debug.len() < 2_000,
        "{debug}"
    );
}

#[tokio::test]
async fn a_large_backlog_is_read_in_order() {
    let (_clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    let payload = Bytes::from_static(b"0123456789abcdef0123456789abcdef");
    let batch: Vec<PutRecordsEntry> = (0..500)
        .map(|_| PutRecordsEntry::new("key", payload.clone()))
        .collect();
    for _ in 0..400 {
        k.put_records("s", batch.clone()).unwrap();
    }
    let started = std::time::Instant::now();
    let mut it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;
    let mut count = 0usize;
    let mut last: Option<SequenceNumber> = None;
    loop {
        let out = k.get_records(&it, 10_000).await.unwrap();
        if out.records.is_empty() {
            break;
        }
        for record in &out.records {
            assert!(last.as_ref().is_none_or(|l| *l < record.sequence_number));
            last = Some(record.sequence_number.clone());
        }
        count += out.records.len();
        it = out.next_shard_iterator.unwrap();
    }
    assert_eq!(count, 200_000);
    eprintln!("read 200000 records in {:?}", started.elapsed());
}

#[tokio::test]
async fn the_conformance_scenario_on_the_fake() {
    // The same facts, line for line, as kinesis-local gives (checked by
    // kcl-worker/tests/aws_stream_client.rs, which runs the scenario on both).
    let (_clock, k) = setup();
    let facts = run_conformance_scenario(&k, &k, "conformance")
        .await
        .unwrap();
    let expected = [
        "put key-1=r0 -> shardId-000000000000",
        "put key-3=r1 -> shardId-000000000001",
        "put key-8=r2 -> shardId-000000000002",
        "put key-12=r3 -> shardId-000000000000",
        "put key-15=r4 -> shardId-000000000001",
        "put key-22=r5 -> shardId-000000000002",
        "put key-26=r6 -> shardId-000000000003",
        "put key-32=r7 -> shardId-000000000004",
        "put key-35=r8 -> shardId-000000000002",
        "put key-55=r9 -> shardId-000000000003",
        "put key-58=r10 -> shardId-000000000004",
        "put key-59=r11 -> shardId-000000000005",
        "put key-63=r12 -> shardId-000000000005",
        "put key-67=r13 -> shardId-000000000002",
        "shard shardId-000000000000 parent=- adjacent=- range=0:113427455640312821154458202477256070484 closed=true",
        "shard shardId-000000000001 parent=- adjacent=- range=113427455640312821154458202477256070485:226854911280625642308916404954512140969 closed=false",
        "shard shardId-000000000002 parent=- adjacent=- range=226854911280625642308916404954512140970:340282366920938463463374607431768211455 closed=false",
        "shard shardId-000000000003 parent=shardId-000000000000 adjacent=- range=0:56713727820156410577229101238628035242 closed=true",
        "shard shardId-000000000004 parent=shardId-000000000000 adjacent=- range=56713727820156410577229101238628035243:113427455640312821154458202477256070484 closed=true",
        "shard shardId-000000000005 parent=shardId-000000000003 adjacent=shardId-000000000004 range=0:113427455640312821154458202477256070484 closed=false",
        "AT_LATEST: shardId-000000000001,shardId-000000000002,shardId-000000000005",
        "AFTER_SHARD_ID shardId-000000000001: shardId-000000000002,shardId-000000000003,shardId-000000000004,shardId-000000000005",
        "summary: conformance ACTIVE open=3",
        "read shardId-000000000000: [key-1=r0 key-12=r3] ended=true children=[shardId-000000000003<-shardId-000000000000 shardId-000000000004<-shardId-000000000000] millis_at_tip=None",
        "shardId-000000000000 sequence numbers increase: true",
        "read shardId-000000000001: [key-3=r1 key-15=r4] ended=false children=[] millis_at_tip=Some(0)",
        "shardId-000000000001 sequence numbers increase: true",
        "read shardId-000000000002: [key-8=r2 key-22=r5 key-35=r8 key-67=r13] ended=false children=[] millis_at_tip=Some(0)",
        "shardId-000000000002 sequence numbers increase: true",
        "read shardId-000000000003: [key-26=r6 key-55=r9] ended=true children=[shardId-000000000005<-shardId-000000000003+shardId-000000000004] millis_at_tip=None",
        "shardId-000000000003 sequence numbers increase: true",
        "read shardId-000000000004: [key-32=r7 key-58=r10] ended=true children=[shardId-000000000005<-shardId-000000000003+shardId-000000000004] millis_at_tip=None",
        "shardId-000000000004 sequence numbers increase: true",
        "read shardId-000000000005: [key-59=r11 key-63=r12] ended=false children=[] millis_at_tip=Some(0)",
        "shardId-000000000005 sequence numbers increase: true",
        "shardId-000000000003 starts above parent shardId-000000000000: true",
        "shardId-000000000004 starts above parent shardId-000000000000: true",
        "shardId-000000000005 starts above parent shardId-000000000003: true",
        "shardId-000000000005 starts above parent shardId-000000000004: true",
        "AT_SEQUENCE_NUMBER of key-22=r5: key-22=r5",
        "AFTER_SEQUENCE_NUMBER of key-22=r5: key-35=r8",
        "AT_TIMESTAMP of the first arrival: key-8=r2",
        "AT_TIMESTAMP 2001: key-8=r2",
        "LATEST: 0 records, millis_behind_latest=Some(0), next iterator=true",
        "after the end of shardId-000000000000: 0 records, next iterator=false, children=shardId-000000000003,shardId-000000000004",
        "ListShards of a missing stream: StreamNotFound",
        "DescribeStreamSummary of a missing stream: StreamNotFound",
        "GetShardIterator of a missing stream: StreamNotFound",
        "GetShardIterator of a missing shard: ResourceNotFound",
        "GetRecords with limit 0: InvalidArgument",
        "GetRecords with limit 10001: InvalidArgument",
    ];
    assert_eq!(facts, expected);
}

#[tokio::test]
async fn explicit_hash_keys_follow_the_service_pattern() {
    let (_clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    for bad in [
        "007",
        "-1",
        "1.5",
        "",
        "340282366920938463463374607431768211456",
        &"9".repeat(40),
    ] {
        assert_eq!(
            error_kind(&k.put_record("s", "pk", Some(bad), data("x")).unwrap_err()),
            "InvalidArgument",
            "{bad:?}"
        );
    }
    for good in ["0", "7", "340282366920938463463374607431768211455"] {
        k.put_record("s", "pk", Some(good), data("x")).unwrap();
    }
}

#[tokio::test]
async fn empty_reads_while_behind_keep_the_position() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    for i in 0..5 {
        k.put_record("s", "pk", None, data(&format!("{i}")))
            .unwrap();
    }
    clock.advance(Duration::from_secs(2));
    let it = k
        .get_shard_iterator("s", "shardId-000000000000", &IteratorPosition::TrimHorizon)
        .await
        .unwrap();
    k.empty_reads_next(2);
    let mut iterator = it;
    for _ in 0..2 {
        let out = k.get_records(&iterator, 100).await.unwrap();
        assert!(out.records.is_empty());
        assert!(out.millis_behind_latest.unwrap() > 0);
        iterator = out.next_shard_iterator.unwrap();
    }
    let out = k.get_records(&iterator, 100).await.unwrap();
    assert_eq!(out.records.len(), 5);
    assert_eq!(out.millis_behind_latest, Some(0));
}

#[tokio::test]
async fn a_hung_call_stays_pending_until_dropped() {
    let (clock, k) = setup();
    k.create_stream("s", 2).unwrap();
    k.put_record("s", "k", Some("0"), data("a")).unwrap();
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;

    k.hang_next(1);
    assert_eq!(pending(&k), 1);
    {
        let mut hung = pin!(k.get_records(&it, 10));
        assert!(poll_once(hung.as_mut()).is_pending());
        assert_eq!(pending(&k), 0, "the hang was taken by the call");
        clock.advance(4 * MINUTE); // less than an iterator lives
        assert!(
            poll_once(hung.as_mut()).is_pending(),
            "time does not end a hang"
        );
        assert!(poll_once(hung.as_mut()).is_pending());
        // Dropped here, as a caller's timeout would.
    }
    assert_eq!(texts(&k.get_records(&it, 10).await.unwrap().records), ["a"]);

    // Per operation and per shard: only the matching call hangs.
    k.inject(
        Fault::new(FaultKind::Hang, 1)
            .for_operation(Operation::GetShardIterator)
            .for_key(sid(1)),
    );
    iterator(&k, "s", &sid(0), IteratorPosition::Latest).await;
    k.get_records(&it, 10).await.unwrap();
    {
        let shard = sid(1);
        let mut hung = pin!(k.get_shard_iterator("s", &shard, &IteratorPosition::Latest));
        assert!(poll_once(hung.as_mut()).is_pending());
    }
    iterator(&k, "s", &sid(1), IteratorPosition::Latest).await;

    // Puts are synchronous and never hang: the fault waits for the next async call.
    k.hang_next(1);
    k.put_record("s", "k", Some("0"), data("b")).unwrap();
    assert_eq!(pending(&k), 1);
    {
        let mut hung = pin!(k.describe_stream_summary("s"));
        assert!(poll_once(hung.as_mut()).is_pending());
    }
    let stats = k.stats();
    assert_eq!(stats.calls_hung, 3);
    assert_eq!(stats.faults_injected, 0, "a hang is not an answered fault");
}

#[tokio::test]
async fn set_hanging_hangs_the_calls_started_while_on_for_good() {
    let (clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    k.put_record("s", "k", None, data("a")).unwrap();
    let it = iterator(&k, "s", &sid(0), IteratorPosition::TrimHorizon).await;

    k.set_hanging(true);
    let mut read = pin!(k.get_records(&it, 10));
    assert!(poll_once(read.as_mut()).is_pending());
    let mut list = pin!(k.list_all_shards("s", None));
    assert!(poll_once(list.as_mut()).is_pending());
    // Puts are synchronous: not affected.
    k.put_record("s", "k", None, data("b")).unwrap();

    k.set_hanging(false);
    clock.advance(MINUTE);
    // Calls started while the switch was on stay hung for good ...
    assert!(poll_once(read.as_mut()).is_pending());
    assert!(poll_once(list.as_mut()).is_pending());
    // ... and calls started after it answer normally.
    assert_eq!(
        texts(&k.get_records(&it, 10).await.unwrap().records),
        ["a", "b"]
    );
    assert_eq!(
        shard_ids(&k.list_all_shards("s", None).await.unwrap()),
        [sid(0)]
    );
    assert_eq!(k.stats().calls_hung, 2);

    // clear_faults turns the switch off too.
    k.set_hanging(true);
    k.clear_faults();
    k.describe_stream_summary("s").await.unwrap();
}

#[tokio::test]
async fn set_unreachable_fails_every_call_until_cleared() {
    let (_clock, k) = setup();
    k.create_stream("s", 1).unwrap();
    k.set_unreachable(true);
    assert!(matches!(
        k.describe_stream_summary("s").await,
        Err(StreamError::Unreachable { .. })
    ));
    assert!(matches!(
        k.put_record("s", "k", None, data("x")),
        Err(StreamError::Unreachable { .. })
    ));
    k.set_unreachable(false);
    k.describe_stream_summary("s").await.unwrap();
    k.throttle_next(1);
    assert!(matches!(
        k.put_record("s", "k", None, data("x")),
        Err(StreamError::Throttled { .. })
    ));
    assert_eq!(k.stats().faults_injected, 3);
}
