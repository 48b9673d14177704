#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
//! Decodes one raw Kinesis record payload (a KPL aggregate or not) and prints each record to
//! deliver as one JSON object per line:
//!
//! ```text
//! cargo run -q -p kcl-kpl --example decode -- FILE [--hash-range START:END] [--deliver-out-of-range]
//! {"sub_sequence_number":0,"partition_key":"k","explicit_hash_key":null,"data_b64":"aGk=","aggregated":true}
//! ```
//!
//! A record passed through (not an aggregate, or an invalid one) prints `"partition_key":null`
//! and `"aggregated":false`, with a note on stderr saying why. With `--hash-range` (decimal,
//! inclusive) an aggregate holding a user record outside the range prints nothing on stdout
//! and a note on stderr (or is printed anyway with `--deliver-out-of-range`). Bad arguments or
//! an unreadable file: a message on stderr and exit code 2.

use std::io::Write;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use kcl_kpl::{Deaggregated, DeaggregationOptions, HashKeyRange, Record, SequenceNumber};

const USAGE: &str = "usage: decode FILE [--hash-range START:END] [--deliver-out-of-range]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = run(
        &args,
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    std::process::exit(code);
}

/// Parsed command line.
struct Args {
    file: String,
    options: DeaggregationOptions,
}

/// `Ok(None)` for `--help`.
fn parse_args(args: &[String]) -> Result<Option<Args>, String> {
    let mut file = None;
    let mut options = DeaggregationOptions::new();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--hash-range" => {
                let value = iter
                    .next()
                    .ok_or_else(|| "--hash-range needs START:END".to_owned())?;
                let range: HashKeyRange = value
                    .parse()
                    .map_err(|e| format!("--hash-range {value:?}: {e}"))?;
                options.set_shard_range(Some(range));
            }
            "--deliver-out-of-range" => {
                options.set_deliver_out_of_range(true);
            }
            other if other.starts_with('-') && other != "-" => {
                return Err(format!("unknown option {other:?}"));
            }
            other => {
                if file.replace(other.to_owned()).is_some() {
                    return Err("exactly one FILE expected".to_owned());
                }
            }
        }
    }
    let file = file.ok_or_else(|| "missing FILE".to_owned())?;
    Ok(Some(Args { file, options }))
}

fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn json_line(record: &Record, aggregated: bool) -> String {
    let partition_key = if aggregated {
        json_string(&record.partition_key)
    } else {
        "null".to_owned()
    };
    let explicit_hash_key = match (&record.explicit_hash_key, aggregated) {
        (Some(k), true) => json_string(k),
        _ => "null".to_owned(),
    };
    format!(
        "{{\"sub_sequence_number\":{},\"partition_key\":{},\"explicit_hash_key\":{},\"data_b64\":{},\"aggregated\":{}}}",
        record.sub_sequence_number,
        partition_key,
        explicit_hash_key,
        json_string(&B64.encode(&record.data)),
        aggregated
    )
}

/// Runs the decoder with `args` (without the program name); returns the exit code.
pub(crate) fn run(args: &[String], out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let args = match parse_args(args) {
        Ok(Some(args)) => args,
        Ok(None) => {
            let _ = writeln!(out, "{USAGE}");
            return 0;
        }
        Err(problem) => {
            let _ = writeln!(err, "decode: {problem}\n{USAGE}");
            return 2;
        }
    };
    let data = match std::fs::read(&args.file) {
        Ok(data) => Bytes::from(data),
        Err(e) => {
            let _ = writeln!(err, "decode: cannot read {}: {e}", args.file);
            return 2;
        }
    };
    let Ok(sequence_number) = SequenceNumber::parse("0") else {
        return 2;
    };
    let record = Record::new("", sequence_number, data);
    let result = kcl_kpl::deaggregate(record, &args.options);
    let note = match &result {
        Deaggregated::NotAggregated { reason, .. } => Some(format!("not aggregated: {reason}")),
        Deaggregated::InvalidAggregate { reason, .. } => {
            Some(format!("invalid aggregate, passed through: {reason}"))
        }
        Deaggregated::DroppedOutOfRange {
            sequence_number,
            sub_records,
            out_of_range,
        } => Some(format!(
            "dropped aggregate {sequence_number} of {sub_records} user record(s): {out_of_range}"
        )),
        Deaggregated::DeliveredOutOfRange { out_of_range, .. } => {
            Some(format!("delivered despite: {out_of_range}"))
        }
        _ => None,
    };
    if let Some(note) = note {
        let _ = writeln!(err, "decode: {note}");
    }
    let aggregated = result.is_aggregated();
    for record in result.records() {
        if let Err(e) = writeln!(out, "{}", json_line(record, aggregated)) {
            let _ = writeln!(err, "decode: cannot write: {e}");
            return 1;
        }
    }
    0
}
