//! Sequence numbers of the in-memory Kinesis.
//!
//! A sequence number is 56 decimal digits: `49`, a fixed 15-digit block, and a 39-digit
//! field holding `counter << 20 | shard index`. The counter is shared by every stream of one
//! [`InMemoryKinesis`](super::InMemoryKinesis) and never goes back: each allocation takes
//! `max(previous + 1, wall-clock milliseconds * 1024)`, so numbers grow with time, strictly
//! increase within a shard, and a child shard's numbers start above its parents' ending
//! numbers. The low 20 bits name the shard, so a number given for the wrong shard is
//! recognised and rejected, as the service does.

use std::time::SystemTime;

use kcl_kpl::SequenceNumber;

/// The first 17 digits of every sequence number this fake issues.
const PREFIX: &str = "49546986683135544";
/// Digits after the prefix.
const FIELD_DIGITS: usize = 39;
/// Bits of the shard index in the field.
pub(crate) const SHARD_BITS: u32 = 20;
/// Shards a stream may have had over its life (the index must fit [`SHARD_BITS`]).
pub(crate) const MAX_SHARDS_PER_STREAM: usize = 1 << SHARD_BITS;

/// Hands out sequence numbers.
#[derive(Debug, Default)]
pub(crate) struct SequenceAllocator {
    counter: u128,
}

impl SequenceAllocator {
    /// The next number for the shard with index `shard`, at wall-clock time `now`.
    pub(crate) fn next(&mut self, now: SystemTime, shard: usize) -> (u128, SequenceNumber) {
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        self.counter = self
            .counter
            .saturating_add(1)
            .max(millis.saturating_mul(1024));
        let shard = (shard as u128) & ((1 << SHARD_BITS) - 1);
        let value = (self.counter << SHARD_BITS) | shard;
        (value, to_sequence_number(value))
    }

    /// The largest value handed out so far (0 before the first).
    pub(crate) fn last_value(&self) -> u128 {
        self.counter << SHARD_BITS | ((1 << SHARD_BITS) - 1)
    }
}

fn to_sequence_number(value: u128) -> SequenceNumber {
    let text = format!("{PREFIX}{value:0FIELD_DIGITS$}");
    // Always 56 ASCII digits without a leading zero; parsing cannot fail. Fall back to the
    // bare value (also digits) to stay panic-free.
    SequenceNumber::parse(&text).unwrap_or_else(|_| sequence_from_digits(value))
}

fn sequence_from_digits(value: u128) -> SequenceNumber {
    match SequenceNumber::parse(&value.to_string()) {
        Ok(number) => number,
        Err(_) => sequence_from_digits(0),
    }
}

/// Reads back a value this fake issued, or `None` when `number` is not one of its numbers.
pub(crate) fn value_of(number: &SequenceNumber) -> Option<u128> {
    let digits = number.as_str().strip_prefix(PREFIX)?;
    if digits.len() != FIELD_DIGITS {
        return None;
    }
    digits.parse::<u128>().ok()
}

/// The shard index a value belongs to.
pub(crate) fn shard_of(value: u128) -> usize {
    (value & ((1 << SHARD_BITS) - 1)) as usize
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn numbers_look_real_and_grow() {
        let mut alloc = SequenceAllocator::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let (a, sa) = alloc.next(t0, 3);
        let (b, sb) = alloc.next(t0, 3);
        let (c, sc) = alloc.next(t0 + Duration::from_secs(1), 0);
        let (d, sd) = alloc.next(t0, 1);
        assert_eq!(sa.as_str().len(), 56);
        assert!(sa < sb && sb < sc && sc < sd);
        assert!(a < b && b < c && c < d);
        assert!(c - a > 1000 << SHARD_BITS, "a second later is well above");
        assert_eq!(value_of(&sa), Some(a));
        assert_eq!(shard_of(a), 3);
        assert_eq!(shard_of(c), 0);
        assert!(alloc.last_value() >= d);
        assert_eq!(value_of(&SequenceNumber::parse("12345").unwrap()), None);
    }
}
