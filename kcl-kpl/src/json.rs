//! One decoded record as a JSON line: the output of the `decode` example and of `kcl decode`.
//!
//! A line has the fields `sub_sequence_number`, `partition_key`, `explicit_hash_key`,
//! `data_b64` and `aggregated`. For a record passed through whole (not an aggregate, or an
//! invalid one) `partition_key` and `explicit_hash_key` are `null` (a raw payload carries no
//! key of its own) and `aggregated` is `false`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;

use crate::{Deaggregated, DeaggregationOptions, Record, SequenceNumber, deaggregate};

/// `s` as a JSON string literal (quotes included), escaped per RFC 8259.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The JSON line (without newline) of one record to deliver; `aggregated` tells whether it
/// came out of a KPL aggregate.
pub fn decoded_record_json(record: &Record, aggregated: bool) -> String {
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

/// What decoding one payload gives: the JSON lines to print and, when the payload was not
/// delivered as a valid aggregate, a note saying why.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct DecodedPayload {
    /// One JSON line per record to deliver (none when an out-of-range aggregate is dropped).
    pub lines: Vec<String>,
    /// Why the payload was passed through, dropped or delivered despite a problem.
    pub note: Option<String>,
}

/// Decodes one raw Kinesis record payload (a KPL aggregate or not) into JSON lines.
pub fn decode_payload(data: Bytes, options: &DeaggregationOptions) -> DecodedPayload {
    let record = Record::new("", SequenceNumber::zero(), data);
    let result = deaggregate(record, options);
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
    let aggregated = result.is_aggregated();
    DecodedPayload {
        lines: result
            .records()
            .iter()
            .map(|r| decoded_record_json(r, aggregated))
            .collect(),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_plain_records() {
        assert_eq!(json_string("a\"b\\c\n\u{1}é"), "\"a\\\"b\\\\c\\n\\u0001é\"");
        let out = decode_payload(Bytes::from_static(b"hi"), &DeaggregationOptions::new());
        assert_eq!(
            out.lines,
            vec![
                "{\"sub_sequence_number\":0,\"partition_key\":null,\"explicit_hash_key\":null,\"data_b64\":\"aGk=\",\"aggregated\":false}"
                    .to_owned()
            ]
        );
        assert!(out.note.unwrap_or_default().starts_with("not aggregated"));
    }
}
