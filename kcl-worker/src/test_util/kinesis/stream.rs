//! One stream of the in-memory Kinesis: its shards, routing and resharding (split, merge,
//! uniform scaling).

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::stream::StreamError;
use kcl_kpl::{HashKeyRange, MAX_HASH_KEY};

use super::sequence::{MAX_SHARDS_PER_STREAM, SequenceAllocator};
use super::shard::{SHARD_ID_PREFIX, ShardState, shard_index};
use super::streams::*;

/// The most shards a stream may be created with or scaled to.
pub(crate) const MAX_SHARD_COUNT: u32 = 10_000;
/// The account and region in ARNs (as kinesis-local uses).
pub(super) const ARN_PREFIX: &str = "arn:aws:kinesis:us-east-1:000000000000:stream/";

#[derive(Debug)]
pub(super) struct Stream {
    pub(super) name: String,
    pub(super) incarnation: u64,
    pub(super) created_at: SystemTime,
    pub(super) retention: Duration,
    pub(super) shards: Vec<ShardState>,
    /// Indexes of the open shards, by the start of their hash key range.
    pub(super) open: Vec<usize>,
}

impl Stream {
    /// The index of a visible shard, from its id.
    pub(super) fn find_shard(&self, shard_id: &str, now: SystemTime) -> Result<usize, StreamError> {
        shard_index(shard_id)
            .filter(|index| {
                self.shards.get(*index).is_some_and(|shard| {
                    shard.id == shard_id && shard.is_visible(now, self.retention)
                })
            })
            .ok_or_else(|| StreamError::ResourceNotFound {
                message: format!(
                    "Shard {shard_id} in stream {} under account 000000000000 does not exist",
                    self.name
                ),
            })
    }

    pub(super) fn shard(&self, index: usize) -> Result<&ShardState, StreamError> {
        self.shards.get(index).ok_or_else(|| internal(index))
    }

    pub(super) fn shard_mut(&mut self, index: usize) -> Result<&mut ShardState, StreamError> {
        self.shards.get_mut(index).ok_or_else(|| internal(index))
    }

    /// The open shard owning `hash_key`.
    pub(super) fn route(&self, hash_key: u128) -> Option<usize> {
        let after = self.open.partition_point(|index| {
            self.shards
                .get(*index)
                .is_some_and(|shard| shard.range.start() <= hash_key)
        });
        let index = *self.open.get(after.checked_sub(1)?)?;
        self.shards
            .get(index)
            .filter(|shard| shard.range.contains(hash_key))
            .map(|_| index)
    }

    pub(super) fn sort_open(&mut self) {
        let shards = &self.shards;
        self.open.sort_by_key(|index| {
            shards
                .get(*index)
                .map_or(MAX_HASH_KEY, |shard| shard.range.start())
        });
    }

    /// The trim horizon as a time: retention before now, but not before the stream existed.
    pub(super) fn trim_horizon_time(&self, now: SystemTime) -> SystemTime {
        now.checked_sub(self.retention)
            .map_or(self.created_at, |at| at.max(self.created_at))
    }

    /// Adds a shard (open, no records) and returns its index.
    pub(super) fn add_shard(
        &mut self,
        sequence: &mut SequenceAllocator,
        range: HashKeyRange,
        parents: (Option<String>, Option<String>),
        now: SystemTime,
    ) -> Result<usize, StreamError> {
        let index = self.shards.len();
        if index >= MAX_SHARDS_PER_STREAM {
            return Err(invalid(format!(
                "stream {} has had {MAX_SHARDS_PER_STREAM} shards, the most this fake supports",
                self.name
            )));
        }
        let (starting_value, starting) = sequence.next(now, index);
        self.shards.push(ShardState {
            id: format!("{SHARD_ID_PREFIX}{index:012}"),
            parent: parents.0,
            adjacent_parent: parents.1,
            range,
            starting_value,
            starting,
            ending: None,
            created_at: now,
            closed_at: None,
            children: Vec::new(),
            records: VecDeque::new(),
            base: 0,
            epoch: 0,
            recent_reads: VecDeque::new(),
            last_arrival: now,
        });
        self.open.push(index);
        Ok(index)
    }

    pub(super) fn close_shard(
        &mut self,
        sequence: &mut SequenceAllocator,
        index: usize,
        children: Vec<usize>,
        now: SystemTime,
    ) -> Result<(), StreamError> {
        let shard = self.shard_mut(index)?;
        shard.ending = Some(sequence.next(now, index));
        shard.closed_at = Some(now);
        shard.children = children;
        self.open.retain(|open| *open != index);
        Ok(())
    }

    pub(super) fn open_shard(&self, shard_id: &str, now: SystemTime) -> Result<usize, StreamError> {
        let index = self.find_shard(shard_id, now)?;
        if self.shard(index)?.is_open() {
            Ok(index)
        } else {
            Err(invalid(format!(
                "shard {shard_id} in stream {} is closed (ResourceInUseException)",
                self.name
            )))
        }
    }

    /// Splits an open shard. `strict`: the service's rule for `SplitShard`
    /// (`start + 1 < key < end`); `UpdateShardCount`'s internal splits only need both
    /// children non-empty.
    pub(super) fn split(
        &mut self,
        sequence: &mut SequenceAllocator,
        shard_id: &str,
        new_starting_hash_key: u128,
        strict: bool,
        now: SystemTime,
    ) -> Result<[String; 2], StreamError> {
        let index = self.open_shard(shard_id, now)?;
        let range = self.shard(index)?.range;
        let refused = if strict {
            new_starting_hash_key <= range.start().saturating_add(1)
                || new_starting_hash_key >= range.end()
        } else {
            new_starting_hash_key <= range.start() || new_starting_hash_key > range.end()
        };
        if refused {
            return Err(invalid(format!(
                "NewStartingHashKey {new_starting_hash_key} is not both greater than one plus \
                 the shard's StartingHashKey {} and less than the shard's EndingHashKey {} \
                 (shard {shard_id})",
                range.start(),
                range.end()
            )));
        }
        let left_range = HashKeyRange::new(range.start(), new_starting_hash_key - 1)
            .map_err(|err| invalid(err.to_string()))?;
        let right_range = HashKeyRange::new(new_starting_hash_key, range.end())
            .map_err(|err| invalid(err.to_string()))?;
        if self.shards.len() + 2 > MAX_SHARDS_PER_STREAM {
            return Err(invalid("too many shards for this fake"));
        }
        let first = self.shards.len();
        self.close_shard(sequence, index, vec![first, first + 1], now)?;
        let parents = (Some(shard_id.to_owned()), None);
        let left = self.add_shard(sequence, left_range, parents.clone(), now)?;
        let right = self.add_shard(sequence, right_range, parents, now)?;
        self.sort_open();
        Ok([self.shard(left)?.id.clone(), self.shard(right)?.id.clone()])
    }

    pub(super) fn merge(
        &mut self,
        sequence: &mut SequenceAllocator,
        shard_id: &str,
        adjacent_shard_id: &str,
        now: SystemTime,
    ) -> Result<String, StreamError> {
        let first = self.open_shard(shard_id, now)?;
        let second = self.open_shard(adjacent_shard_id, now)?;
        let a = self.shard(first)?.range;
        let b = self.shard(second)?.range;
        let adjacent =
            a.end().checked_add(1) == Some(b.start()) || b.end().checked_add(1) == Some(a.start());
        if first == second || !adjacent {
            return Err(invalid(format!(
                "shards {shard_id} and {adjacent_shard_id} are not adjacent"
            )));
        }
        let merged = HashKeyRange::new(a.start().min(b.start()), a.end().max(b.end()))
            .map_err(|err| invalid(err.to_string()))?;
        if self.shards.len() >= MAX_SHARDS_PER_STREAM {
            return Err(invalid("too many shards for this fake"));
        }
        let child = self.shards.len();
        self.close_shard(sequence, first, vec![child], now)?;
        self.close_shard(sequence, second, vec![child], now)?;
        let parents = (
            Some(shard_id.to_owned()),
            Some(adjacent_shard_id.to_owned()),
        );
        let child = self.add_shard(sequence, merged, parents, now)?;
        self.sort_open();
        Ok(self.shard(child)?.id.clone())
    }

    pub(super) fn open_ids_by_start(&self) -> Vec<(HashKeyRange, String)> {
        self.open
            .iter()
            .filter_map(|index| self.shards.get(*index))
            .map(|shard| (shard.range, shard.id.clone()))
            .collect()
    }

    /// Uniform scaling through splits and merges (see the module docs of `kinesis`).
    pub(super) fn update_shard_count(
        &mut self,
        sequence: &mut SequenceAllocator,
        target: u32,
        now: SystemTime,
    ) -> Result<(), StreamError> {
        let current = u32::try_from(self.open.len()).unwrap_or(u32::MAX);
        if target == 0
            || target > MAX_SHARD_COUNT
            || target > current.saturating_mul(2)
            || target < current.div_ceil(2)
        {
            return Err(invalid(format!(
                "TargetShardCount {target} must be between half and double the {current} open \
                 shards (and between 1 and {MAX_SHARD_COUNT})"
            )));
        }
        let ranges = even_ranges(target);
        // 1. Split until every target range starts at a shard boundary.
        for range in ranges.iter().skip(1) {
            let boundary = range.start();
            let owner = self
                .open_ids_by_start()
                .into_iter()
                .find(|(owned, _)| owned.contains(boundary));
            if let Some((owned, id)) = owner
                && owned.start() < boundary
            {
                self.split(sequence, &id, boundary, false, now)?;
            }
        }
        // 2. Merge the shards inside each target range into one.
        for range in &ranges {
            loop {
                let inside: Vec<String> = self
                    .open_ids_by_start()
                    .into_iter()
                    .filter(|(owned, _)| range.contains(owned.start()))
                    .map(|(_, id)| id)
                    .take(2)
                    .collect();
                match inside.as_slice() {
                    [first, second] => {
                        self.merge(sequence, first, second, now)?;
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

/// The hash key space split into `count` even ranges (the last ends at 2^128 - 1), as
/// `CreateStream` and uniform scaling lay shards out.
pub(crate) fn even_ranges(count: u32) -> Vec<HashKeyRange> {
    let count = u128::from(count.max(1));
    // floor(2^128 / count), computed without 2^128.
    let step = if MAX_HASH_KEY % count == count - 1 {
        (MAX_HASH_KEY / count).saturating_add(1)
    } else {
        MAX_HASH_KEY / count
    };
    (0..count)
        .filter_map(|i| {
            let start = i.saturating_mul(step);
            let end = if i + 1 == count {
                MAX_HASH_KEY
            } else {
                (i + 1).saturating_mul(step).saturating_sub(1)
            };
            HashKeyRange::new(start, end).ok()
        })
        .collect()
}

pub(super) fn validate_stream_name(name: &str) -> Result<(), StreamError> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(invalid(format!(
            "stream name {name:?} must be 1 to 128 characters of a-z, A-Z, 0-9, _ . -"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_the_space() {
        for count in [1u32, 2, 3, 4, 5, 7, 8, 64, 100, 1000] {
            let ranges = even_ranges(count);
            assert_eq!(ranges.len(), count as usize);
            assert_eq!(ranges[0].start(), 0);
            assert_eq!(ranges.last().unwrap().end(), MAX_HASH_KEY);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end() + 1, pair[1].start());
            }
            let sizes: Vec<u128> = ranges.iter().map(|r| r.end() - r.start()).collect();
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= u128::from(count), "{count}: {min} {max}");
        }
        // As the service and kinesis-local lay out three shards.
        let three = even_ranges(3);
        assert_eq!(three[0].end(), 113427455640312821154458202477256070484);
        assert_eq!(three[1].start(), 113427455640312821154458202477256070485);
        assert_eq!(three[2].start(), 226854911280625642308916404954512140970);
        assert_eq!(even_ranges(2)[1].start(), 1u128 << 127);
    }
}
