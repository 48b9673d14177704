//! One shard of the in-memory Kinesis: its hash key range, lineage and stored records.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::stream::Shard;
use kcl_kpl::{HashKeyRange, Record, SequenceNumber};

pub(super) const SHARD_ID_PREFIX: &str = "shardId-";

/// One stored record.
#[derive(Debug)]
pub(super) struct Stored {
    pub(super) value: u128,
    pub(super) arrival: SystemTime,
    pub(super) size: usize,
    pub(super) record: Record,
}

#[derive(Debug)]
pub(super) struct ShardState {
    pub(super) id: String,
    pub(super) parent: Option<String>,
    pub(super) adjacent_parent: Option<String>,
    pub(super) range: HashKeyRange,
    pub(super) starting_value: u128,
    pub(super) starting: SequenceNumber,
    pub(super) ending: Option<(u128, SequenceNumber)>,
    pub(super) created_at: SystemTime,
    pub(super) closed_at: Option<SystemTime>,
    pub(super) children: Vec<usize>,
    pub(super) records: VecDeque<Stored>,
    /// Logical index of `records[0]`: how many records were trimmed.
    pub(super) base: u64,
    /// Iterators issued under an older epoch are expired.
    pub(super) epoch: u64,
    /// Monotonic times of the `GetRecords` calls in the last second (for the rate limit).
    pub(super) recent_reads: VecDeque<u64>,
    pub(super) last_arrival: SystemTime,
}

impl ShardState {
    pub(super) fn is_open(&self) -> bool {
        self.ending.is_none()
    }

    pub(super) fn tip(&self) -> u64 {
        self.base + self.records.len() as u64
    }

    /// A closed shard leaves `ListShards` once the retention period has passed since it
    /// closed (by then every record in it has expired).
    pub(super) fn is_visible(&self, now: SystemTime, retention: Duration) -> bool {
        self.closed_at
            .is_none_or(|closed| closed.checked_add(retention).is_none_or(|gone| now < gone))
    }

    pub(super) fn was_open_at(&self, at: SystemTime) -> bool {
        self.created_at <= at && self.closed_at.is_none_or(|closed| closed >= at)
    }

    pub(super) fn trim(&mut self, now: SystemTime, retention: Duration) {
        while self.records.front().is_some_and(|front| {
            front
                .arrival
                .checked_add(retention)
                .is_some_and(|expiry| expiry <= now)
        }) {
            self.records.pop_front();
            self.base += 1;
        }
    }

    pub(super) fn parent_ids(&self) -> Vec<String> {
        self.parent
            .iter()
            .chain(self.adjacent_parent.iter())
            .cloned()
            .collect()
    }

    pub(super) fn describe(&self) -> Shard {
        Shard {
            shard_id: self.id.clone(),
            parent_shard_id: self.parent.clone(),
            adjacent_parent_shard_id: self.adjacent_parent.clone(),
            hash_key_range: self.range,
            starting_sequence_number: self.starting.clone(),
            ending_sequence_number: self.ending.as_ref().map(|(_, number)| number.clone()),
        }
    }
}

pub(super) fn shard_index(shard_id: &str) -> Option<usize> {
    let digits = shard_id.strip_prefix(SHARD_ID_PREFIX)?;
    if digits.len() != 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids_parse() {
        assert_eq!(shard_index("shardId-000000000003"), Some(3));
        assert_eq!(shard_index("shardId-3"), None);
        assert_eq!(shard_index("shard-000000000003"), None);
    }
}
