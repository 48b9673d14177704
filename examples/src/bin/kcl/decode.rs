//! `kcl decode`: one Kinesis record's data (raw or base64) as JSON lines, one per user record
//! (the lines of `kcl_kpl::json`, the same as the `decode` example of `kcl-kpl`).

use std::io::{Read, Write};

use base64::Engine as _;
use bytes::Bytes;
use kcl_kpl::{DeaggregationOptions, HashKeyRange, KPL_MAGIC};

use crate::common::{CliError, CliResult, fail};

/// How the input is read.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InputFormat {
    /// Raw when it starts with the KPL magic bytes, else base64 when the whole input
    /// (whitespace trimmed) is valid base64, else raw.
    Auto,
    /// The record's bytes as they are.
    Raw,
    /// The record's bytes in base64 (as `aws kinesis get-records` prints them).
    Base64,
}

/// Options of `kcl decode`.
#[derive(clap::Args, Debug)]
pub(crate) struct DecodeArgs {
    /// The file holding the record's data, or `-` for stdin.
    file: String,
    /// How to read the input.
    #[arg(long, value_enum, default_value_t = InputFormat::Auto)]
    input: InputFormat,
    /// The shard's hash key range (decimal START:END, inclusive): an aggregate with a user
    /// record outside it is dropped, as the worker drops it.
    #[arg(long)]
    hash_range: Option<HashKeyRange>,
    /// Deliver such an aggregate anyway (only with --hash-range).
    #[arg(long, requires = "hash_range")]
    deliver_out_of_range: bool,
}

fn base64_of(input: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(input).ok()?;
    let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    if compact.is_empty() {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .ok()
}

/// The record's bytes from `input` read as `format`.
pub(crate) fn record_bytes(input: Vec<u8>, format: InputFormat) -> CliResult<Vec<u8>> {
    match format {
        InputFormat::Raw => Ok(input),
        InputFormat::Base64 => base64_of(&input).ok_or_else(|| {
            CliError("the input is not valid base64 (use --input raw for raw bytes)".to_owned())
        }),
        InputFormat::Auto => {
            if input.starts_with(&KPL_MAGIC) {
                Ok(input)
            } else {
                Ok(base64_of(&input).unwrap_or(input))
            }
        }
    }
}

pub(crate) fn decode(args: &DecodeArgs) -> CliResult<()> {
    let input = if args.file == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .map_err(|e| CliError(format!("cannot read stdin: {e}")))?;
        buf
    } else {
        std::fs::read(&args.file)
            .map_err(|e| CliError(format!("cannot read {}: {e}", args.file)))?
    };
    let data = record_bytes(input, args.input)?;
    let mut options = DeaggregationOptions::new();
    options.set_shard_range(args.hash_range);
    options.set_deliver_out_of_range(args.deliver_out_of_range);
    let decoded = kcl_kpl::json::decode_payload(Bytes::from(data), &options);
    if let Some(note) = &decoded.note {
        eprintln!("kcl decode: {note}");
    }
    let mut out = std::io::stdout().lock();
    for line in &decoded.lines {
        if let Err(e) = writeln!(out, "{line}") {
            return fail(format!("cannot write: {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_formats() {
        let magic_then: Vec<u8> = KPL_MAGIC.iter().copied().chain(*b"rest").collect();
        assert_eq!(
            record_bytes(magic_then.clone(), InputFormat::Auto).unwrap(),
            magic_then
        );
        assert_eq!(
            record_bytes(b"aGk=\n".to_vec(), InputFormat::Auto).unwrap(),
            b"hi"
        );
        assert_eq!(
            record_bytes(b"not base64!".to_vec(), InputFormat::Auto).unwrap(),
            b"not base64!"
        );
        assert_eq!(
            record_bytes(b"aGk=".to_vec(), InputFormat::Raw).unwrap(),
            b"aGk="
        );
        assert!(record_bytes(b"not base64!".to_vec(), InputFormat::Base64).is_err());
    }
}
