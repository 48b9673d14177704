//! Shard iterators and `ListShards` next tokens as compact, checked strings.
//!
//! An iterator is `kit1/MAC/INCARNATION/SHARD/EPOCH/POSITION/ISSUED/STREAM` (hex numbers, the
//! stream name last); a next token is `knt1/MAC/INCARNATION/AFTER/FILTER/ISSUED/STREAM`. The
//! MAC is a keyed 64-bit FNV-1a hash of the rest, with a key private to one fake: a string
//! that was not issued by this fake, or was altered, is rejected as an invalid argument.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::stream::ShardFilter;

const ITERATOR_TAG: &str = "kit1";
const TOKEN_TAG: &str = "knt1";

/// What a shard iterator points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct IteratorToken {
    pub(crate) stream: String,
    pub(crate) incarnation: u64,
    pub(crate) shard: usize,
    pub(crate) epoch: u64,
    /// Logical index of the next record to read.
    pub(crate) position: u64,
    /// When it was issued: nanoseconds since the fake's base instant.
    pub(crate) issued: u64,
}

/// Where the next `ListShards` page starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PageToken {
    pub(crate) stream: String,
    pub(crate) incarnation: u64,
    /// The next page lists shards with a larger index.
    pub(crate) after: usize,
    pub(crate) filter: Option<ShardFilter>,
    /// When it was issued: nanoseconds since the fake's base instant.
    pub(crate) issued: u64,
}

fn mac(key: u64, body: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.to_le_bytes().iter().chain(body.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Final avalanche, so that close inputs give unrelated MACs.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^ (hash >> 33)
}

fn seal(tag: &str, key: u64, body: &str) -> String {
    format!("{tag}/{:016x}/{body}", mac(key, body))
}

/// Checks the tag and MAC; returns the body.
fn open<'a>(tag: &str, key: u64, text: &'a str) -> Option<&'a str> {
    let rest = text.strip_prefix(tag)?.strip_prefix('/')?;
    let (mac_text, body) = rest.split_once('/')?;
    if mac_text.len() != 16 {
        return None;
    }
    let given = u64::from_str_radix(mac_text, 16).ok()?;
    (given == mac(key, body)).then_some(body)
}

fn hex_u64(text: &str) -> Option<u64> {
    if text.is_empty() || text.len() > 16 {
        return None;
    }
    u64::from_str_radix(text, 16).ok()
}

impl IteratorToken {
    pub(crate) fn encode(&self, key: u64) -> String {
        let body = format!(
            "{:x}/{:x}/{:x}/{:x}/{:x}/{}",
            self.incarnation, self.shard, self.epoch, self.position, self.issued, self.stream
        );
        seal(ITERATOR_TAG, key, &body)
    }

    pub(crate) fn decode(key: u64, text: &str) -> Option<Self> {
        let body = open(ITERATOR_TAG, key, text)?;
        let mut parts = body.splitn(6, '/');
        let incarnation = hex_u64(parts.next()?)?;
        let shard = usize::try_from(hex_u64(parts.next()?)?).ok()?;
        let epoch = hex_u64(parts.next()?)?;
        let position = hex_u64(parts.next()?)?;
        let issued = hex_u64(parts.next()?)?;
        let stream = parts.next()?.to_owned();
        Some(Self {
            stream,
            incarnation,
            shard,
            epoch,
            position,
            issued,
        })
    }
}

fn nanos_since_epoch(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn encode_filter(filter: Option<&ShardFilter>) -> String {
    match filter {
        None => "n".to_owned(),
        Some(ShardFilter::AfterShardId(id)) => {
            let mut out = String::with_capacity(1 + 2 * id.len());
            out.push('A');
            for byte in id.as_bytes() {
                let _ = write!(out, "{byte:02x}");
            }
            out
        }
        Some(ShardFilter::AtTrimHorizon) => "H".to_owned(),
        Some(ShardFilter::FromTrimHorizon) => "F".to_owned(),
        Some(ShardFilter::AtLatest) => "L".to_owned(),
        Some(ShardFilter::AtTimestamp(at)) => format!("T{:x}", nanos_since_epoch(*at)),
        Some(ShardFilter::FromTimestamp(at)) => format!("S{:x}", nanos_since_epoch(*at)),
    }
}

fn decode_filter(text: &str) -> Option<Option<ShardFilter>> {
    let (kind, arg) = text.split_at_checked(1)?;
    let timestamp =
        |arg: &str| hex_u64(arg).map(|nanos| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos));
    Some(match kind {
        "n" => None,
        "A" => {
            if arg.len() % 2 != 0 {
                return None;
            }
            let bytes = (0..arg.len())
                .step_by(2)
                .map(|i| {
                    arg.get(i..i + 2)
                        .and_then(|pair| u8::from_str_radix(pair, 16).ok())
                })
                .collect::<Option<Vec<u8>>>()?;
            Some(ShardFilter::AfterShardId(String::from_utf8(bytes).ok()?))
        }
        "H" => Some(ShardFilter::AtTrimHorizon),
        "F" => Some(ShardFilter::FromTrimHorizon),
        "L" => Some(ShardFilter::AtLatest),
        "T" => Some(ShardFilter::AtTimestamp(timestamp(arg)?)),
        "S" => Some(ShardFilter::FromTimestamp(timestamp(arg)?)),
        _ => return None,
    })
}

impl PageToken {
    pub(crate) fn encode(&self, key: u64) -> String {
        let body = format!(
            "{:x}/{:x}/{}/{:x}/{}",
            self.incarnation,
            self.after,
            encode_filter(self.filter.as_ref()),
            self.issued,
            self.stream
        );
        seal(TOKEN_TAG, key, &body)
    }

    pub(crate) fn decode(key: u64, text: &str) -> Option<Self> {
        let body = open(TOKEN_TAG, key, text)?;
        let mut parts = body.splitn(5, '/');
        let incarnation = hex_u64(parts.next()?)?;
        let after = usize::try_from(hex_u64(parts.next()?)?).ok()?;
        let filter = decode_filter(parts.next()?)?;
        let issued = hex_u64(parts.next()?)?;
        let stream = parts.next()?.to_owned();
        Some(Self {
            stream,
            incarnation,
            after,
            filter,
            issued,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iterators_round_trip_and_reject_tampering() {
        let token = IteratorToken {
            stream: "my.stream-1".into(),
            incarnation: 7,
            shard: 12,
            epoch: 3,
            position: 123_456,
            issued: 987_654_321,
        };
        let text = token.encode(42);
        assert_eq!(IteratorToken::decode(42, &text), Some(token.clone()));
        assert_eq!(IteratorToken::decode(43, &text), None, "another fake's key");
        let tampered = text.replace("/1e240/", "/1e241/");
        assert_ne!(tampered, text);
        assert_eq!(IteratorToken::decode(42, &tampered), None);
        for garbage in [
            "",
            "garbage",
            "kit1/",
            "kit1/0000000000000000/1/2",
            "knt1/x/y",
        ] {
            assert_eq!(IteratorToken::decode(42, garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn page_tokens_round_trip_every_filter() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        let filters = [
            None,
            Some(ShardFilter::AfterShardId("shardId-000000000001/x".into())),
            Some(ShardFilter::AtTrimHorizon),
            Some(ShardFilter::FromTrimHorizon),
            Some(ShardFilter::AtLatest),
            Some(ShardFilter::AtTimestamp(at)),
            Some(ShardFilter::FromTimestamp(at)),
        ];
        for filter in filters {
            let token = PageToken {
                stream: "s".into(),
                incarnation: 1,
                after: 5,
                filter,
                issued: 9,
            };
            let text = token.encode(1);
            assert_eq!(PageToken::decode(1, &text), Some(token));
            assert_eq!(IteratorToken::decode(1, &text), None);
        }
    }
}
