//! Shard iterators of the in-memory Kinesis: issuing them at a position, expiring them.

use std::time::Duration;

use crate::stream::{IteratorPosition, StreamError};
use kcl_kpl::SequenceNumber;

use super::sequence::{self};
use super::shard::*;
use super::streams::*;
use super::token::IteratorToken;

/// How long a shard iterator stays valid after it was issued.
pub(crate) const ITERATOR_LIFETIME: Duration = crate::stream::limits::SHARD_ITERATOR_LIFETIME;

impl State {
    pub(crate) fn get_shard_iterator(
        &mut self,
        name: &str,
        shard_id: &str,
        position: &IteratorPosition,
        now: Now,
    ) -> Result<String, StreamError> {
        let stream = self.stream(name)?;
        let index = stream.find_shard(shard_id, now.wall)?;
        let incarnation = stream.incarnation;
        let last_issued = self.sequence.last_value();
        let key = self.key;
        let stream = self.stream_mut(name)?;
        let retention = stream.retention;
        let shard = stream.shard_mut(index)?;
        shard.trim(now.wall, retention);
        let offset = match position {
            IteratorPosition::TrimHorizon => 0,
            IteratorPosition::Latest => shard.records.len(),
            IteratorPosition::AtTimestamp(at) => {
                shard.records.partition_point(|stored| stored.arrival < *at)
            }
            IteratorPosition::AtSequenceNumber(number) => {
                let value = check_sequence_number(shard, index, number, last_issued, name)?;
                shard.records.partition_point(|stored| stored.value < value)
            }
            IteratorPosition::AfterSequenceNumber(number) => {
                let value = check_sequence_number(shard, index, number, last_issued, name)?;
                shard
                    .records
                    .partition_point(|stored| stored.value <= value)
            }
        };
        Ok(IteratorToken {
            stream: name.to_owned(),
            incarnation,
            shard: index,
            epoch: shard.epoch,
            position: shard.base + offset as u64,
            issued: now.mono,
        }
        .encode(key))
    }
    /// Expires every outstanding iterator of one shard, or of all shards.
    pub(crate) fn expire_iterators(
        &mut self,
        target: Option<(&str, &str)>,
        now: Now,
    ) -> Result<(), StreamError> {
        match target {
            None => {
                for shard in self.streams.values_mut().flat_map(|s| s.shards.iter_mut()) {
                    shard.epoch += 1;
                }
                Ok(())
            }
            Some((name, shard_id)) => {
                let stream = self.stream_mut(name)?;
                let index = stream.find_shard(shard_id, now.wall)?;
                stream.shard_mut(index)?.epoch += 1;
                Ok(())
            }
        }
    }
}

pub(super) fn check_sequence_number(
    shard: &ShardState,
    index: usize,
    number: &SequenceNumber,
    last_issued: u128,
    stream: &str,
) -> Result<u128, StreamError> {
    let value = sequence::value_of(number)
        .filter(|value| sequence::shard_of(*value) == index)
        .filter(|value| *value >= shard.starting_value)
        .filter(|value| match &shard.ending {
            Some((ending, _)) => value <= ending,
            None => *value <= last_issued,
        });
    value.ok_or_else(|| {
        invalid(format!(
            "StartingSequenceNumber {number} used in GetShardIterator on shard {} in stream \
             {stream} under account 000000000000 is invalid",
            shard.id
        ))
    })
}
