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

use bytes::Bytes;
use kcl_kpl::{DeaggregationOptions, HashKeyRange};

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
    let decoded = kcl_kpl::json::decode_payload(data, &args.options);
    if let Some(note) = &decoded.note {
        let _ = writeln!(err, "decode: {note}");
    }
    for line in &decoded.lines {
        if let Err(e) = writeln!(out, "{line}") {
            let _ = writeln!(err, "decode: cannot write: {e}");
            return 1;
        }
    }
    0
}
