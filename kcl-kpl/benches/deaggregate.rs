#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Deaggregation of a ~1 MiB aggregate of ~1 KB records, next to plain MD5 over the same
//! bytes, and aggregation of the same records.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput};
use kcl_kpl::{
    Aggregator, DeaggregationOptions, HashKeyRange, Record, SequenceNumber, deaggregate,
};
use md5::{Digest, Md5};

/// ~1 KB user records with distinct partition keys, enough for one 1 MiB aggregate.
fn user_records() -> Vec<(String, Vec<u8>)> {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    (0..1100)
        .map(|i| {
            let data = (0..1000 + i % 48)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 24) as u8
                })
                .collect();
            (format!("user-{i:06}"), data)
        })
        .collect()
}

fn one_aggregate(records: &[(String, Vec<u8>)]) -> Bytes {
    let mut aggregator = Aggregator::new();
    for (pk, data) in records {
        if let Some(full) = aggregator.add(pk, None, data.clone()).unwrap() {
            return full.data;
        }
    }
    aggregator.finish().unwrap().data
}

fn bench(c: &mut Criterion) {
    let records = user_records();
    let data = one_aggregate(&records);
    let fetched = Record::new(
        "outer",
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap(),
        data.clone(),
    );
    let plain = DeaggregationOptions::new();
    let ranged = DeaggregationOptions::for_shard(HashKeyRange::FULL);

    let mut group = c.benchmark_group("kpl_1mib");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(40);
    group.measurement_time(Duration::from_secs(3));
    group.bench_function("md5", |b| b.iter(|| Md5::digest(black_box(&data[..]))));
    group.bench_function("deaggregate", |b| {
        b.iter(|| deaggregate(black_box(fetched.clone()), &plain))
    });
    group.bench_function("deaggregate_with_shard_range", |b| {
        b.iter(|| deaggregate(black_box(fetched.clone()), &ranged))
    });
    group.bench_function("aggregate", |b| {
        b.iter(|| one_aggregate(black_box(&records)))
    });
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
