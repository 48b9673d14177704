//! Reading a shard forward from a position, bounded: the part of `lag` and `reset` that
//! talks to Kinesis.

use std::ops::ControlFlow;
use std::time::Duration;

use kcl_kpl::Record;
use kcl_worker::stream::{IteratorPosition, StreamClient, StreamError, limits};

use crate::common::{CliError, CliResult, chain};

/// How far one scan may go.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanBounds {
    /// GetRecords calls per shard at most.
    pub(crate) max_calls: u32,
    /// Throttled calls retried at most (200 ms apart, then longer).
    pub(crate) max_throttled: u32,
}

impl Default for ScanBounds {
    fn default() -> Self {
        Self {
            max_calls: 2_000,
            max_throttled: 50,
        }
    }
}

/// How a scan ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ScanEnd {
    /// Read to the tip (an empty response with nothing behind) or the end of a closed shard.
    Tip,
    /// The visitor stopped it.
    Stopped,
    /// `max_calls` GetRecords calls were made before the tip.
    Bounded,
}

fn kinesis_error(what: &str, shard_id: &str, e: &StreamError) -> CliError {
    CliError(format!("{what} of shard {shard_id}: {}", chain(e)))
}

/// Reads `shard_id` from `position`, handing each Kinesis record (not deaggregated) to
/// `visit` until it breaks, the tip or the bound.
pub(crate) async fn scan(
    stream: &dyn StreamClient,
    stream_name: &str,
    shard_id: &str,
    position: &IteratorPosition,
    bounds: ScanBounds,
    mut visit: impl FnMut(&Record) -> ControlFlow<()>,
) -> CliResult<ScanEnd> {
    let mut iterator = stream
        .get_shard_iterator(stream_name, shard_id, position)
        .await
        .map_err(|e| kinesis_error("GetShardIterator", shard_id, &e))?;
    let mut throttled = 0u32;
    let mut calls = 0u32;
    loop {
        if calls >= bounds.max_calls {
            return Ok(ScanEnd::Bounded);
        }
        calls += 1;
        let out = match stream
            .get_records(&iterator, limits::MAX_RECORDS_PER_GET_RECORDS)
            .await
        {
            Ok(out) => out,
            Err(StreamError::Throttled { .. }) if throttled < bounds.max_throttled => {
                throttled += 1;
                tokio::time::sleep(Duration::from_millis(200 * u64::from(throttled.min(10)))).await;
                continue;
            }
            Err(e) => return Err(kinesis_error("GetRecords", shard_id, &e)),
        };
        let empty = out.records.is_empty();
        for record in &out.records {
            if visit(record).is_break() {
                return Ok(ScanEnd::Stopped);
            }
        }
        match out.next_shard_iterator {
            None => return Ok(ScanEnd::Tip),
            Some(_) if empty && out.millis_behind_latest.unwrap_or(0) == 0 => {
                return Ok(ScanEnd::Tip);
            }
            Some(next) => iterator = next,
        }
        // Kinesis serves 5 GetRecords calls per second and shard.
        tokio::time::sleep(Duration::from_millis(
            1000 / u64::from(limits::GET_RECORDS_PER_SECOND_PER_SHARD),
        ))
        .await;
    }
}
