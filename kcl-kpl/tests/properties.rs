#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Property tests: aggregation round trips, mutated aggregates, and the order of extended
//! sequence numbers.
//!
//! Mutated aggregates whose digest was recomputed are also decoded by an independent oracle
//! (prost-derived structs with every field optional, so presence can be checked): whenever
//! the oracle can read the protobuf, both must agree on validity and on every user record.

use std::cell::RefCell;
use std::cmp::Ordering;

use bytes::Bytes;
use kcl_kpl::{
    Aggregator, Deaggregated, DeaggregationOptions, ExtendedSequenceNumber, KPL_DIGEST_LEN,
    KPL_MAGIC, Record, SequenceNumber, deaggregate, parse_hash_key,
};
use md5::{Digest, Md5};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const ROUND_TRIP_CASES: u32 = 256;
const RAW_MUTATION_CASES: u32 = 512;
const RESEALED_MUTATION_CASES: u32 = 1024;
const RANDOM_BODY_CASES: u32 = 2048;
const ESN_CASES: u32 = 1024;

/// `cases` cases; failures are reported with their seed and minimal input, not persisted
/// (proptest's persistence looks for a `lib.rs` beside the test file).
fn config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generators.

#[derive(Clone, Debug)]
struct UserRecord {
    partition_key: String,
    explicit_hash_key: Option<String>,
    data: Vec<u8>,
}

fn partition_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-c]{1,3}",            // few distinct keys: exercises the tables' sharing
        1 => "\\PC{1,12}",            // any printable Unicode
        1 => "[\u{0}-\u{7f}]{1,5}",   // ASCII including control characters
    ]
}

fn explicit_hash_key() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        2 => Just(None),
        1 => any::<u128>().prop_map(|k| Some(k.to_string())),
        1 => prop::sample::select(vec![0u128, (1 << 127) - 1, 1 << 127, u128::MAX])
            .prop_map(|k| Some(k.to_string())),
        1 => (0u8..3, any::<u64>()).prop_map(|(zeros, k)| Some(format!("{}{k}", "0".repeat(zeros.into())))),
    ]
}

fn user_record() -> impl Strategy<Value = UserRecord> {
    (
        partition_key(),
        explicit_hash_key(),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(partition_key, explicit_hash_key, data)| UserRecord {
            partition_key,
            explicit_hash_key,
            data,
        })
}

fn fetched(data: Bytes) -> Record {
    let mut r = Record::new("outer", SequenceNumber::parse("123456789").unwrap(), data);
    r.encryption_type = Some("NONE".to_owned());
    r
}

/// One valid aggregate of 1 to 12 user records.
fn aggregate_of(records: &[UserRecord]) -> Bytes {
    let mut aggregator = Aggregator::new();
    for r in records {
        let full = aggregator
            .add(
                &r.partition_key,
                r.explicit_hash_key.as_deref(),
                r.data.clone(),
            )
            .unwrap();
        assert!(full.is_none());
    }
    aggregator.finish().unwrap().data
}

fn seal(body: &[u8]) -> Bytes {
    let mut out = KPL_MAGIC.to_vec();
    out.extend_from_slice(body);
    out.extend_from_slice(&Md5::digest(body));
    Bytes::from(out)
}

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    Truncate(usize),
    Append(Vec<u8>),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, v)| Mutation::SetByte(i, v)),
        2 => any::<usize>().prop_map(Mutation::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..20).prop_map(Mutation::Append),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Mutation::Insert(i, b)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let len = bytes.len();
    match m {
        Mutation::FlipBit(i, b) if len > 0 => bytes[i % len] ^= 1 << b,
        Mutation::SetByte(i, v) if len > 0 => bytes[i % len] = *v,
        Mutation::Truncate(n) => bytes.truncate(n % (len + 1)),
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
        Mutation::Insert(i, extra) => {
            let at = i % (len + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
        Mutation::Remove(i, n) if len > 0 => {
            let at = i % len;
            let end = (at + n).min(len);
            bytes.drain(at..end);
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Oracle: prost with every field optional.

#[derive(Clone, PartialEq, prost::Message)]
struct OracleAggregate {
    #[prost(string, repeated, tag = "1")]
    partition_keys: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    explicit_hash_keys: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    records: Vec<OracleRecord>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OracleRecord {
    #[prost(uint64, optional, tag = "1")]
    partition_key_index: Option<u64>,
    #[prost(uint64, optional, tag = "2")]
    explicit_hash_key_index: Option<u64>,
    #[prost(bytes = "vec", optional, tag = "3")]
    data: Option<Vec<u8>>,
    #[prost(message, repeated, tag = "4")]
    tags: Vec<OracleTag>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct OracleTag {
    #[prost(bytes = "vec", optional, tag = "1")]
    key: Option<Vec<u8>>,
    #[prost(bytes = "vec", optional, tag = "2")]
    value: Option<Vec<u8>>,
}

type Expected = Vec<(String, Option<String>, Vec<u8>)>;

/// What the oracle expects: `Err` when prost cannot read the protobuf, `Ok(None)` for an
/// invalid aggregate, `Ok(Some(records))` for a valid one.
fn oracle(body: &[u8]) -> Result<Option<Expected>, prost::DecodeError> {
    let message = <OracleAggregate as prost::Message>::decode(body)?;
    let valid = || -> Option<Expected> {
        for ehk in &message.explicit_hash_keys {
            parse_hash_key(ehk).ok()?;
        }
        if message.records.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        for r in &message.records {
            if r.tags.iter().any(|t| t.key.is_none()) {
                return None;
            }
            let pk = message
                .partition_keys
                .get(usize::try_from(r.partition_key_index?).ok()?)?;
            let ehk = match r.explicit_hash_key_index {
                Some(i) => Some(
                    message
                        .explicit_hash_keys
                        .get(usize::try_from(i).ok()?)?
                        .clone(),
                ),
                None => None,
            };
            out.push((pk.clone(), ehk, r.data.clone()?));
        }
        Some(out)
    };
    Ok(valid())
}

/// Checks what must hold for any input whose result is a (valid) aggregate.
fn check_aggregated(input: &Record, records: &[Record]) {
    let range = input.data.as_ptr_range();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.sub_sequence_number, i as u64);
        assert!(r.aggregated);
        assert_eq!(r.sequence_number, input.sequence_number);
        assert_eq!(r.encryption_type, input.encryption_type);
        let sub = r.data.as_ptr_range();
        assert!(r.data.is_empty() || (range.start <= sub.start && sub.end <= range.end));
    }
    // Re-aggregating the records and reading them back is the identity (when the keys are
    // ones the aggregator accepts: the format itself allows empty or longer keys).
    let acceptable = |k: &str| (1..=256).contains(&k.chars().count());
    if !records.iter().all(|r| acceptable(&r.partition_key)) {
        return;
    }
    let mut aggregator = Aggregator::new();
    for r in records {
        assert!(
            aggregator
                .add(
                    &r.partition_key,
                    r.explicit_hash_key.as_deref(),
                    r.data.clone()
                )
                .unwrap()
                .is_none()
        );
    }
    let again = deaggregate(
        fetched(aggregator.finish().unwrap().data),
        &DeaggregationOptions::new(),
    );
    let again = again.into_records();
    assert_eq!(again.len(), records.len());
    for (a, b) in again.iter().zip(records) {
        assert_eq!(
            (&a.partition_key, &a.explicit_hash_key, &a.data),
            (&b.partition_key, &b.explicit_hash_key, &b.data)
        );
    }
}

/// What [`check_resealed`] saw.
#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    /// Both read a valid aggregate, with the same records.
    both_valid: usize,
    /// prost read the protobuf, both found the aggregate invalid.
    both_invalid: usize,
    /// prost could not read the protobuf, and deaggregation found it invalid.
    both_reject: usize,
    /// prost refused a known field with an unexpected wire type, which protobuf proper (and
    /// deaggregation) skips as unknown: valid for us.
    wire_type_skipped: usize,
}

/// Deaggregates a resealed body and checks the result against the oracle.
fn check_resealed(body: &[u8], tally: &mut Tally) {
    tally.cases += 1;
    let data = seal(body);
    let input = fetched(data.clone());
    let result = deaggregate(input.clone(), &DeaggregationOptions::new());
    match &result {
        Deaggregated::Aggregated { records } => check_aggregated(&input, records),
        Deaggregated::InvalidAggregate { record, .. }
        | Deaggregated::NotAggregated { record, .. } => {
            assert_eq!(record, &input);
            assert_eq!(record.data.as_ptr(), data.as_ptr());
        }
        other => panic!("no shard range, yet {other:?}"),
    }
    if body.is_empty() {
        assert!(matches!(result, Deaggregated::NotAggregated { .. }));
        return;
    }
    match (oracle(body), &result) {
        (Ok(None), Deaggregated::InvalidAggregate { .. }) => tally.both_invalid += 1,
        (Err(_), Deaggregated::InvalidAggregate { .. }) => tally.both_reject += 1,
        (Ok(Some(expected)), Deaggregated::Aggregated { records }) => {
            let got: Expected = records
                .iter()
                .map(|r| {
                    (
                        r.partition_key.clone(),
                        r.explicit_hash_key.clone(),
                        r.data.to_vec(),
                    )
                })
                .collect();
            assert_eq!(got, expected);
            tally.both_valid += 1;
        }
        (Err(e), Deaggregated::Aggregated { .. }) if e.to_string().contains("wire type") => {
            tally.wire_type_skipped += 1;
        }
        (expected, got) => panic!("oracle says {expected:?}, deaggregate says {got:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Aggregation and deaggregation.

proptest! {
    #![proptest_config(config(ROUND_TRIP_CASES))]

    /// Aggregating then deaggregating returns the same user records, in order, whatever the
    /// size limit makes of the split; every aggregate stays within the limit.
    #[test]
    fn aggregate_then_deaggregate(
        records in prop::collection::vec(user_record(), 1..60),
        limit in 700usize..4096,
    ) {
        let mut aggregator = Aggregator::with_max_size(limit).unwrap();
        let mut aggregates = Vec::new();
        for r in &records {
            if let Some(full) = aggregator
                .add(&r.partition_key, r.explicit_hash_key.as_deref(), r.data.clone())
                .unwrap()
            {
                aggregates.push(full);
            }
        }
        aggregates.extend(aggregator.finish());
        prop_assert!(aggregator.is_empty());
        let mut out = Vec::new();
        for a in &aggregates {
            prop_assert!(a.size_bytes() <= limit);
            let first = out.len();
            let result = deaggregate(fetched(a.data.clone()), &DeaggregationOptions::new());
            let Deaggregated::Aggregated { records: got } = result else {
                return Err(TestCaseError::fail(format!("{result:?}")));
            };
            prop_assert_eq!(got.len(), a.user_records);
            // The outer keys follow the aggregate's first user record.
            let lead = &records[first];
            prop_assert_eq!(&a.partition_key, &lead.partition_key);
            let lead_key = kcl_kpl::effective_hash_key(
                &lead.partition_key, lead.explicit_hash_key.as_deref()).unwrap();
            prop_assert_eq!(a.explicit_hash_key.clone(), Some(lead_key.to_string()));
            out.extend(got);
        }
        prop_assert_eq!(out.len(), records.len());
        for (got, want) in out.iter().zip(&records) {
            prop_assert_eq!(&got.partition_key, &want.partition_key);
            prop_assert_eq!(&got.explicit_hash_key, &want.explicit_hash_key);
            prop_assert_eq!(&got.data[..], &want.data[..]);
            prop_assert!(got.aggregated);
        }
    }
}

proptest! {
    #![proptest_config(config(RAW_MUTATION_CASES))]

    /// Any mutation of a valid aggregate (digest left as it was) never panics and yields the
    /// original sub-records or the one mutated record passed through, unchanged.
    #[test]
    fn mutated_aggregates_pass_through(
        records in prop::collection::vec(user_record(), 1..12),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let original = aggregate_of(&records);
        let mut bytes = original.to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let data = Bytes::from(bytes);
        let input = fetched(data.clone());
        let result = deaggregate(input.clone(), &DeaggregationOptions::new());
        let got = result.records();
        if got.len() == 1 && got[0] == input && !got[0].aggregated {
            prop_assert_eq!(got[0].data.as_ptr(), data.as_ptr());
        } else {
            // Only possible if the mutations cancelled out.
            prop_assert_eq!(&data, &original);
            prop_assert_eq!(got.len(), records.len());
            for (g, w) in got.iter().zip(&records) {
                prop_assert_eq!(&g.data[..], &w.data[..]);
                prop_assert_eq!(&g.partition_key, &w.partition_key);
            }
        }
    }
}

/// Runs `check` over `cases` values of `strategy`, then prints and returns the tally.
fn run_tallied<S: Strategy>(
    cases: u32,
    strategy: S,
    check: impl Fn(S::Value, &mut Tally),
) -> Tally {
    let tally = RefCell::new(Tally::default());
    let mut runner = TestRunner::new(config(cases));
    runner
        .run(&strategy, |value| {
            check(value, &mut tally.borrow_mut());
            Ok(())
        })
        .unwrap();
    let tally = tally.into_inner();
    println!("{tally:?}");
    tally
}

/// Mutations of the protobuf with the digest recomputed reach the parser: never a panic,
/// never a partial aggregate, and agreement with the oracle.
#[test]
fn resealed_mutations_agree_with_oracle() {
    let strategy = (
        prop::collection::vec(user_record(), 1..8),
        prop::collection::vec(mutation(), 1..4),
    );
    let tally = run_tallied(
        RESEALED_MUTATION_CASES,
        strategy,
        |(records, mutations), tally| {
            let original = aggregate_of(&records);
            let mut body = original[KPL_MAGIC.len()..original.len() - KPL_DIGEST_LEN].to_vec();
            for m in &mutations {
                apply(&mut body, m);
            }
            check_resealed(&body, tally);
        },
    );
    // Both outcomes were exercised.
    assert!(
        tally.both_valid > 50 && tally.both_invalid + tally.both_reject > 50,
        "{tally:?}"
    );
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field(number: u32, wire_type: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    put_varint(u64::from(number << 3 | u32::from(wire_type)), &mut out);
    if wire_type == 2 {
        put_varint(payload.len() as u64, &mut out);
    }
    out.extend_from_slice(payload);
    out
}

fn varint_field(number: u32, value: u64) -> Vec<u8> {
    let mut payload = Vec::new();
    put_varint(value, &mut payload);
    field(number, 0, &payload)
}

/// A field the messages do not declare, or a declared number with another wire type.
fn unknown_field() -> impl Strategy<Value = Vec<u8>> {
    (
        1u32..20,
        prop::sample::select(vec![0u8, 1, 2, 3, 5]),
        any::<u64>(),
    )
        .prop_map(|(number, wire_type, v)| match wire_type {
            0 => varint_field(number, v),
            1 => field(number, 1, &v.to_le_bytes()),
            5 => field(number, 5, &v.to_le_bytes()[..4]),
            2 => field(number, 2, &v.to_le_bytes()[..(v % 9) as usize]),
            _ => {
                // A group holding one varint.
                let mut g = field(number, 3, &[]);
                g.extend(varint_field(number + 1, v));
                g.extend(field(number, 4, &[]));
                g
            }
        })
}

fn index() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..3, 1 => any::<u64>()]
}

fn tag_message() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            3 => "[a-z]{0,3}".prop_map(|k| field(1, 2, k.as_bytes())),
            2 => prop::collection::vec(any::<u8>(), 0..4).prop_map(|v| field(2, 2, &v)),
            1 => unknown_field(),
        ],
        0..3,
    )
    .prop_map(|items| items.concat())
}

fn record_message() -> impl Strategy<Value = Vec<u8>> {
    let item = prop_oneof![
        3 => index().prop_map(|i| varint_field(1, i)),
        2 => index().prop_map(|i| varint_field(2, i)),
        3 => prop::collection::vec(any::<u8>(), 0..8).prop_map(|d| field(3, 2, &d)),
        1 => tag_message().prop_map(|t| field(4, 2, &t)),
        1 => unknown_field(),
    ];
    prop_oneof![
        // Well formed: key index, maybe explicit hash key index, data, in any order.
        2 => (index(), prop::option::of(index()), prop::collection::vec(any::<u8>(), 0..8), any::<bool>())
            .prop_map(|(pk, ehk, data, reversed)| {
                let mut parts = vec![varint_field(1, pk), field(3, 2, &data)];
                parts.extend(ehk.map(|e| varint_field(2, e)));
                if reversed {
                    parts.reverse();
                }
                parts.concat()
            }),
        1 => prop::collection::vec(item, 0..5).prop_map(|items| items.concat()),
    ]
}

/// Protobuf-shaped bodies: table entries, records, unknown fields and some garbage.
fn structured_body() -> impl Strategy<Value = Vec<u8>> {
    let item = prop_oneof![
        2 => "[a-c]{0,2}".prop_map(|k| field(1, 2, k.as_bytes())),
        1 => prop_oneof!["[0-9]{1,5}", "[0-9a-]{0,3}", Just("340282366920938463463374607431768211456".to_owned())]
            .prop_map(|k| field(2, 2, k.as_bytes())),
        1 => prop::collection::vec(any::<u8>(), 1..3).prop_map(|k| field(1, 2, &k)),
        5 => record_message().prop_map(|r| field(3, 2, &r)),
        1 => unknown_field(),
        1 => prop::collection::vec(any::<u8>(), 1..4),
    ];
    prop::collection::vec(item, 0..8).prop_map(|items| items.concat())
}

/// Mostly valid bodies: key tables, well-formed records with small indices, maybe an unknown
/// field (or a declared number with another wire type), shuffled by a rotation.
fn clean_body() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec("[a-c]{1,2}", 1..3),
        prop::collection::vec("[0-9]{1,4}", 0..2),
        prop::collection::vec(
            (
                0u64..2,
                prop::option::of(0u64..2),
                prop::collection::vec(any::<u8>(), 0..6),
            ),
            1..4,
        ),
        prop::option::of(unknown_field()),
        any::<usize>(),
    )
        .prop_map(|(pks, ehks, records, unknown, rotation)| {
            let mut items: Vec<Vec<u8>> = pks.iter().map(|k| field(1, 2, k.as_bytes())).collect();
            items.extend(ehks.iter().map(|k| field(2, 2, k.as_bytes())));
            for (pk, ehk, data) in records {
                let mut r = varint_field(1, pk);
                r.extend(ehk.map(|e| varint_field(2, e)).unwrap_or_default());
                r.extend(field(3, 2, &data));
                items.push(field(3, 2, &r));
            }
            items.extend(unknown);
            let n = items.len();
            items.rotate_left(rotation % n);
            items.concat()
        })
}

/// Arbitrary and protobuf-shaped bytes sealed as an aggregate: never a panic, agreement with
/// the oracle.
#[test]
fn random_bodies_agree_with_oracle() {
    let strategy = prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..64),
        2 => structured_body(),
        2 => clean_body(),
    ];
    let tally = run_tallied(RANDOM_BODY_CASES, strategy, |body, tally| {
        check_resealed(&body, tally)
    });
    assert!(
        tally.both_valid > 100 && tally.both_invalid > 100,
        "{tally:?}"
    );
    assert!(
        tally.both_reject > 100 && tally.wire_type_skipped > 0,
        "{tally:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Extended sequence numbers.

/// A sentinel name or a decimal string (possibly with leading zeros, possibly past u128).
fn esn_text() -> impl Strategy<Value = String> {
    prop_oneof![
        1 => prop::sample::select(vec!["AT_TIMESTAMP", "TRIM_HORIZON", "LATEST", "SHARD_END"])
            .prop_map(str::to_owned),
        3 => "0{0,2}[0-9]{1,60}",
        2 => any::<u128>().prop_map(|n| n.to_string()),
        1 => (0u64..20).prop_map(|n| n.to_string()),
    ]
}

fn esn() -> impl Strategy<Value = ExtendedSequenceNumber> {
    (esn_text(), prop_oneof![Just(0u64), 0u64..4, any::<u64>()])
        .prop_map(|(text, sub)| ExtendedSequenceNumber::parse(&text, sub).unwrap())
}

/// The reference order: sentinel rank, then the value (digits left-padded to 128), then the
/// sub-sequence number.
fn reference_key(e: &ExtendedSequenceNumber) -> (u8, String, u64) {
    match e.sequence_str() {
        "AT_TIMESTAMP" => (0, String::new(), 0),
        "TRIM_HORIZON" => (1, String::new(), 0),
        "LATEST" => (2, String::new(), 0),
        "SHARD_END" => (4, String::new(), 0),
        digits => (3, format!("{digits:0>128}"), e.sub_sequence_number()),
    }
}

proptest! {
    #![proptest_config(config(ESN_CASES))]

    /// The order matches the reference order, equality matches `Ordering::Equal`, and the
    /// order is antisymmetric.
    #[test]
    fn esn_order_matches_reference(a in esn(), b in esn()) {
        let ours = a.cmp(&b);
        prop_assert_eq!(ours, reference_key(&a).cmp(&reference_key(&b)));
        prop_assert_eq!(ours == Ordering::Equal, a == b);
        prop_assert_eq!(b.cmp(&a), ours.reverse());
        prop_assert_eq!(a.partial_cmp(&b), Some(ours));
    }

    /// Sorting gives a consistent chain (transitivity on random triples and lists).
    #[test]
    fn esn_order_is_total(mut list in prop::collection::vec(esn(), 2..20)) {
        list.sort();
        for w in list.windows(2) {
            prop_assert!(w[0] <= w[1]);
        }
        for i in 0..list.len() {
            for j in i..list.len() {
                prop_assert!(list[i] <= list[j]);
            }
        }
    }

    /// Numbers that fit a u128 compare like u128s; leading zeros do not matter.
    #[test]
    fn esn_numeric_order(a in any::<u128>(), b in any::<u128>(), sa in 0u64..3, sb in 0u64..3,
                         zeros in 0usize..3) {
        let ea = ExtendedSequenceNumber::parse(&format!("{}{a}", "0".repeat(zeros)), sa).unwrap();
        let eb = ExtendedSequenceNumber::parse(&b.to_string(), sb).unwrap();
        prop_assert_eq!(ea.cmp(&eb), (a, sa).cmp(&(b, sb)));
        prop_assert_eq!(ea.sequence_str(), a.to_string());
    }

    /// Display then parse is the identity, and parse then Display normalizes.
    #[test]
    fn esn_display_round_trips(e in esn()) {
        let text = e.to_string();
        let back: ExtendedSequenceNumber = text.parse().unwrap();
        prop_assert_eq!(&back, &e);
        prop_assert_eq!(back.to_string(), text);
        if let Some(seq) = e.sequence_number() {
            prop_assert_eq!(SequenceNumber::parse(seq.as_str()).unwrap(), seq.clone());
            prop_assert!(!seq.as_str().starts_with('0') || seq.as_str() == "0");
        }
    }
}
