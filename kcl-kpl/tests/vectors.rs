#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Golden KPL vectors: the shared set in `../shared/kpl-vectors` and the project's own set in
//! `tests/vectors` (made by `scripts/gen_vectors.py`), both driven by their `manifest.json`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use kcl_kpl::{
    Aggregator, Deaggregated, DeaggregationOptions, HashKeyRange, Record, SequenceNumber,
    deaggregate, effective_hash_key,
};
use md5::{Digest, Md5};
use serde_json::Value;

const DEFAULT_SEQUENCE: &str = "49590338271490256608559692538361571095921575989136588898";

fn shared_dir() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/kpl-vectors"
    ))
    .to_path_buf()
}

fn own_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors")).to_path_buf()
}

fn load_manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The Kinesis record a consumer would have fetched for this vector.
fn parent(vector: &Value, data: Bytes) -> Record {
    let sequence = vector["parent_sequence_number"]
        .as_str()
        .unwrap_or(DEFAULT_SEQUENCE);
    let key = vector["outer_partition_key"]
        .as_str()
        .unwrap_or("outer-key");
    let mut record = Record::new(key, SequenceNumber::parse(sequence).unwrap(), data);
    let arrival = vector["approximate_arrival_timestamp"]
        .as_f64()
        .unwrap_or(1_700_000_000.5);
    record.approximate_arrival_timestamp =
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs_f64(arrival));
    record.encryption_type = Some("KMS".to_owned());
    record
}

/// One line per record, as `scripts/gen_vectors.py` documents.
fn digest_lines(records: &[Record]) -> String {
    let mut lines = String::new();
    for r in records {
        let ehk = r.explicit_hash_key.as_deref();
        lines.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            r.sub_sequence_number,
            hex(r.partition_key.as_bytes()),
            ehk.unwrap_or("-"),
            effective_hash_key(&r.partition_key, ehk).unwrap(),
            hex(&r.data)
        ));
    }
    format!("{:x}", Md5::digest(lines.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks one vector; returns the number of hash range cases checked.
fn check_vector(dir: &Path, vector: &Value) -> usize {
    let name = vector["file"].as_str().unwrap();
    let raw = std::fs::read(dir.join(name)).unwrap();
    assert_eq!(
        format!("{:x}", Md5::digest(&raw)),
        vector["md5_of_file"].as_str().unwrap(),
        "{name}: file changed"
    );
    let data = Bytes::from(raw);
    let original = parent(vector, data.clone());
    let result = deaggregate(original.clone(), &DeaggregationOptions::new());

    if vector["expected_records"].is_string() {
        // Pass-through: the one original record, unchanged, same buffer.
        let (record, kind, reason) = match &result {
            Deaggregated::NotAggregated { record, reason } => {
                (record, "not_aggregated", reason.as_str())
            }
            Deaggregated::InvalidAggregate { record, reason } => {
                (record, "invalid_aggregate", reason.kind())
            }
            other => panic!("{name}: expected a pass-through, got {other:?}"),
        };
        assert_eq!(record, &original, "{name}");
        assert_eq!(record.data.as_ptr(), data.as_ptr(), "{name}: data copied");
        assert!(
            !record.aggregated && record.sub_sequence_number == 0,
            "{name}"
        );
        if let Some(expected) = vector.get("pass_through") {
            assert_eq!(
                kind,
                expected["kind"].as_str().unwrap(),
                "{name}: {result:?}"
            );
            assert_eq!(
                reason,
                expected["reason"].as_str().unwrap(),
                "{name}: {result:?}"
            );
        }
        // A pass-through is never range-checked.
        let narrow = DeaggregationOptions::for_shard(HashKeyRange::new(0, 0).unwrap());
        assert_eq!(
            deaggregate(original, &narrow).records(),
            result.records(),
            "{name}"
        );
        return 0;
    }

    let Deaggregated::Aggregated { records } = &result else {
        panic!("{name}: expected an aggregate, got {result:?}")
    };
    let expected_count = vector["expected_count"]
        .as_u64()
        .map(|n| n as usize)
        .unwrap_or_else(|| vector["expected_records"].as_array().unwrap().len());
    assert_eq!(records.len(), expected_count, "{name}");
    let range = data.as_ptr_range();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.sub_sequence_number, i as u64, "{name}");
        assert!(r.aggregated, "{name}");
        assert_eq!(r.sequence_number, original.sequence_number, "{name}");
        assert_eq!(
            r.approximate_arrival_timestamp,
            original.approximate_arrival_timestamp
        );
        assert_eq!(r.encryption_type, original.encryption_type, "{name}");
        let sub = r.data.as_ptr_range();
        assert!(
            range.start <= sub.start && sub.end <= range.end,
            "{name}: record {i} data is not a slice of the fetched buffer"
        );
    }
    if let Some(expected) = vector["expected_records"].as_array() {
        assert_eq!(records.len(), expected.len(), "{name}");
        for (r, e) in records.iter().zip(expected) {
            let i = r.sub_sequence_number;
            assert_eq!(i, e["sub_sequence_number"].as_u64().unwrap(), "{name}");
            assert_eq!(
                r.partition_key,
                e["partition_key"].as_str().unwrap(),
                "{name} #{i}"
            );
            assert_eq!(
                r.explicit_hash_key.as_deref(),
                e["explicit_hash_key"].as_str(),
                "{name} #{i}"
            );
            let effective =
                effective_hash_key(&r.partition_key, r.explicit_hash_key.as_deref()).unwrap();
            assert_eq!(
                effective.to_string(),
                e["effective_hash_key"].as_str().unwrap(),
                "{name} #{i}"
            );
            assert_eq!(
                B64.decode(e["data_b64"].as_str().unwrap()).unwrap(),
                &r.data[..],
                "{name} #{i}"
            );
        }
    }
    if let Some(md5) = vector["expected_records_md5"].as_str() {
        assert_eq!(digest_lines(records), md5, "{name}");
    }

    // Canonical vectors: our aggregator writes the same bytes for the same user records.
    // (The shared `py_*` vectors were written by the same Python aggregator.)
    let canonical = vector["canonical"].as_bool() == Some(true)
        || vector["source"].as_str() == Some("aws-kinesis-agg python");
    if canonical {
        let mut aggregator = Aggregator::new();
        for r in records {
            let full = aggregator
                .add(
                    &r.partition_key,
                    r.explicit_hash_key.as_deref(),
                    r.data.clone(),
                )
                .unwrap();
            assert!(full.is_none(), "{name}: split where the reference did not");
        }
        let ours = aggregator.finish().unwrap();
        assert!(
            ours.data == data,
            "{name}: aggregator output differs from the reference"
        );
        if let Some(pk) = vector["outer_partition_key"].as_str() {
            assert_eq!(ours.partition_key, pk, "{name}");
        }
    }

    let mut cases = 0;
    for case in vector["hash_range_cases"].as_array().into_iter().flatten() {
        let shard = HashKeyRange::parse(
            case["starting_hash_key"].as_str().unwrap(),
            case["ending_hash_key"].as_str().unwrap(),
        )
        .unwrap();
        let kept: Vec<u64> = case["expected_sub_sequence_numbers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .collect();
        let options = DeaggregationOptions::for_shard(shard);
        let out = deaggregate(parent(vector, data.clone()), &options);
        let got: Vec<u64> = out
            .records()
            .iter()
            .map(|r| r.sub_sequence_number)
            .collect();
        assert_eq!(got, kept, "{name}: {}", case["note"]);
        if kept.is_empty() {
            let Deaggregated::DroppedOutOfRange {
                sub_records,
                out_of_range: o,
                ..
            } = &out
            else {
                panic!("{name}: {out:?}")
            };
            assert_eq!(*sub_records, records.len(), "{name}");
            assert!(o.count >= 1 && !shard.contains(o.first_hash_key), "{name}");
            // Delivered anyway when asked.
            let out = deaggregate(
                parent(vector, data.clone()),
                &options.with_deliver_out_of_range(true),
            );
            assert!(
                matches!(out, Deaggregated::DeliveredOutOfRange { .. }),
                "{name}"
            );
            assert_eq!(out.records(), &records[..], "{name}");
        } else {
            assert!(
                matches!(out, Deaggregated::Aggregated { .. }),
                "{name}: {out:?}"
            );
        }
        cases += 1;
    }
    cases
}

fn run(dir: &Path) -> (usize, usize) {
    let manifest = load_manifest(dir);
    let vectors = manifest["vectors"].as_array().unwrap();
    let mut cases = 0;
    for vector in vectors {
        cases += check_vector(dir, vector);
    }
    (vectors.len(), cases)
}

#[test]
fn shared_vectors() {
    let dir = shared_dir();
    if !dir.join("manifest.json").exists() {
        println!(
            "shared KPL vectors not found at {}: skipping",
            dir.display()
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "shared KPL vectors missing at {} (CI is set)",
            dir.display()
        );
        return;
    }
    let (vectors, cases) = run(&dir);
    println!("{vectors} shared vectors and {cases} hash range cases checked");
    assert!(vectors >= 12);
}

#[test]
fn own_vectors() {
    let dir = own_dir();
    let (vectors, cases) = run(&dir);
    println!("{vectors} own vectors and {cases} hash range cases checked");
    assert!(vectors >= 30 && cases >= 20, "{vectors} {cases}");

    // Every file is in the manifest and every manifest entry has a file.
    let manifest = load_manifest(&dir);
    let mut listed: Vec<String> = manifest["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["file"].as_str().unwrap().to_owned())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".bin"))
        .collect();
    listed.sort();
    present.sort();
    assert_eq!(listed, present);
}

#[test]
fn own_vectors_cover_the_required_cases() {
    let manifest = load_manifest(&own_dir());
    let reasons: Vec<String> = manifest["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["pass_through"]["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in [
        "no_magic",
        "too_short",
        "digest_mismatch",
        "malformed_protobuf",
        "missing_required_field",
        "partition_key_index_out_of_range",
        "explicit_hash_key_index_out_of_range",
        "malformed_explicit_hash_key",
        "non_utf8_key",
        "no_records",
    ] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no vector for {reason}"
        );
    }
}
