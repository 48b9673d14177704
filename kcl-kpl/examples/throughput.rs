#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Deaggregation throughput next to plain MD5 over the same bytes (deaggregation must compute
//! that MD5, so the ratio says how little the rest costs).
//!
//! ```text
//! cargo run --release -q -p kcl-kpl --example throughput -- [FILE]
//! ```
//!
//! FILE is one raw record payload (default: a generated ~1 MiB aggregate of ~1 KB user
//! records with distinct partition keys). Runs about 2 seconds, then prints as its LAST line
//! `deaggregate_mib_s=X md5_mib_s=Y ratio=Z` (ratio = X / Y). Deaggregation runs without a
//! shard range; a line before it reports the speed with a shard range (which hashes every
//! distinct partition key).

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kcl_kpl::{
    Aggregator, DeaggregationOptions, HashKeyRange, Record, SequenceNumber, deaggregate,
};
use md5::{Digest, Md5};

/// A ~1 MiB aggregate of ~1 KB records (the first aggregate the aggregator fills).
fn generated() -> Bytes {
    let mut aggregator = Aggregator::new();
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut i = 0usize;
    loop {
        let data: Vec<u8> = (0..1000 + i % 48)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        if let Some(full) = aggregator.add(&format!("user-{i:06}"), None, data).unwrap() {
            return full.data;
        }
        i += 1;
    }
}

fn mib_per_s(bytes: usize, iterations: u64, elapsed: Duration) -> f64 {
    (bytes as f64 * iterations as f64) / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

/// Alternates short batches of `a` and `b` until `total` has passed; returns the time spent in
/// each and the iterations of each.
fn race(total: Duration, mut a: impl FnMut(), mut b: impl FnMut()) -> (Duration, Duration, u64) {
    const BATCH: u64 = 20;
    let (mut ta, mut tb, mut n) = (Duration::ZERO, Duration::ZERO, 0);
    let start = Instant::now();
    while start.elapsed() < total {
        let t = Instant::now();
        for _ in 0..BATCH {
            a();
        }
        ta += t.elapsed();
        let t = Instant::now();
        for _ in 0..BATCH {
            b();
        }
        tb += t.elapsed();
        n += BATCH;
    }
    (ta, tb, n)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = match args.as_slice() {
        [] => generated(),
        [file] => match std::fs::read(file) {
            Ok(d) => Bytes::from(d),
            Err(e) => {
                eprintln!("throughput: cannot read {file}: {e}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: throughput [FILE]");
            return ExitCode::from(2);
        }
    };
    let sequence =
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap();
    let fetched = Record::new("outer", sequence, data.clone());
    let plain = DeaggregationOptions::new();
    let ranged = DeaggregationOptions::for_shard(HashKeyRange::FULL);

    let first = deaggregate(fetched.clone(), &plain);
    let records = first.len();
    println!(
        "input: {} bytes, {} record(s) delivered ({}), mean user record {} bytes",
        data.len(),
        records,
        if first.is_aggregated() {
            "aggregate"
        } else {
            "passed through"
        },
        first.records().iter().map(|r| r.data.len()).sum::<usize>() / records.max(1)
    );

    let deaggregate_once = || {
        black_box(deaggregate(black_box(fetched.clone()), &plain));
    };
    let md5_once = || {
        black_box(Md5::digest(black_box(&data[..])));
    };
    // Warm up, then measure with a shard range (the extra cost of hashing keys) and without.
    race(Duration::from_millis(200), deaggregate_once, md5_once);
    let (with_range, _, n_range) = race(
        Duration::from_millis(500),
        || {
            black_box(deaggregate(black_box(fetched.clone()), &ranged));
        },
        || {},
    );
    let (t_deagg, t_md5, n) = race(Duration::from_secs(2), deaggregate_once, md5_once);
    let x = mib_per_s(data.len(), n, t_deagg);
    let y = mib_per_s(data.len(), n, t_md5);
    println!(
        "with_shard_range_mib_s={:.1} ({} iterations)",
        mib_per_s(data.len(), n_range, with_range),
        n_range
    );
    println!(
        "iterations: {n} of each, per deaggregation {:?}",
        t_deagg / n.max(1) as u32
    );
    println!(
        "deaggregate_mib_s={x:.1} md5_mib_s={y:.1} ratio={:.3}",
        x / y
    );
    ExitCode::SUCCESS
}
