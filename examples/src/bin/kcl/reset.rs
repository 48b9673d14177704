//! `kcl reset`: moves the checkpoint of one shard's lease (or every lease) with a fenced
//! conditional write ([`LeaseStore::reset_checkpoint`]).
//!
//! The leases are read twice, `--interval-ms` apart. A lease whose owner renewed it in
//! between (its counter moved) is held by a live worker: the reset refuses, and writes
//! nothing at all, unless `--force`. Every write, forced or not, is fenced on the counter
//! and owner of a read made right before it (without `--force` that read must still show
//! the counter observed), so a lease that changes meanwhile is not written; with `--force`
//! a write that loses the race to a renewal is retried from a fresh read, a few times. A reset
//! frees the lease: a worker that held it fails its next renewal or checkpoint (owner and
//! counter moved), loses the lease, and whoever takes it next resumes from the new checkpoint.

use std::ops::ControlFlow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcl_kpl::{DeaggregationOptions, ExtendedSequenceNumber, Position, Record, deaggregate};
use kcl_lease::{LeaseError, LeaseStore};
use kcl_worker::stream::{IteratorPosition, StreamClient};

use crate::common::{
    CliError, CliResult, Connection, LeaseState, chain, fail, observe, parse_millis, short_esn,
};
use crate::kinesis::{ScanBounds, ScanEnd, scan};

/// Where to move a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The `TRIM_HORIZON` sentinel: the shard is read again from its oldest record.
    TrimHorizon,
    /// The `LATEST` sentinel: records written before the worker next starts the shard are
    /// skipped.
    Latest,
    /// The last record that arrived before this time: the first record delivered is the first
    /// that arrived at or after it (resolved per shard by reading the stream).
    AtTimestamp(SystemTime),
    /// This sequence number (and sub-sequence number): processing resumes after it.
    Sequence(ExtendedSequenceNumber),
}

pub(crate) fn parse_target(s: &str) -> Result<Target, String> {
    let bad = |why: String| {
        format!(
            "bad position {s:?}: {why} (expected trim-horizon, latest, at-timestamp:RFC3339 or sequence:N[.SUB])"
        )
    };
    match s {
        "trim-horizon" => return Ok(Target::TrimHorizon),
        "latest" => return Ok(Target::Latest),
        _ => {}
    }
    if let Some(ts) = s.strip_prefix("at-timestamp:") {
        let dt =
            aws_smithy_types::DateTime::from_str(ts, aws_smithy_types::date_time::Format::DateTime)
                .map_err(|e| bad(format!("{ts:?} is not an RFC 3339 time: {e}")))?;
        let t = SystemTime::try_from(dt).map_err(|e| bad(format!("{ts:?}: {e}")))?;
        return Ok(Target::AtTimestamp(t));
    }
    if let Some(n) = s.strip_prefix("sequence:") {
        let esn: ExtendedSequenceNumber = n.parse().map_err(|e| bad(format!("{e}")))?;
        if esn.is_sentinel() {
            return Err(bad(format!("{n:?} is not a sequence number")));
        }
        return Ok(Target::Sequence(esn));
    }
    Err(bad("unknown position".to_owned()))
}

/// Options of `kcl reset`.
#[derive(clap::Args, Debug)]
pub(crate) struct ResetArgs {
    /// The application name (the lease table name).
    #[arg(long)]
    application: String,
    /// The shard whose checkpoint moves.
    #[arg(
        long,
        required_unless_present = "all_shards",
        conflicts_with = "all_shards"
    )]
    shard: Option<String>,
    /// Move the checkpoint of every lease in the table.
    #[arg(long)]
    all_shards: bool,
    /// trim-horizon, latest, at-timestamp:RFC3339 or sequence:N[.SUB].
    #[arg(long, value_parser = parse_target)]
    to: Target,
    /// The stream (needed for at-timestamp; with sequence, the number is checked against it).
    #[arg(long)]
    stream: Option<String>,
    /// Reset leases held by live workers too (still fenced on the counter read).
    #[arg(long)]
    force: bool,
    /// Time between the two reads that tell live leases from stale ones, in milliseconds.
    #[arg(long = "interval-ms", default_value = "5000", value_parser = parse_millis)]
    interval: Duration,
}

pub(crate) async fn reset(conn: &Connection, args: &ResetArgs) -> CliResult<()> {
    if matches!(args.to, Target::AtTimestamp(_)) && args.stream.is_none() {
        return fail("--to at-timestamp needs --stream (the shard is read to find the position)");
    }
    if let Target::AtTimestamp(t) = args.to
        && t > SystemTime::now()
    {
        return fail("bad position: the at-timestamp time is in the future");
    }
    let store = conn.lease_store(&args.application).await?;
    let observed = observe(&store, args.interval).await?;
    let targets: Vec<_> = match &args.shard {
        Some(shard) => {
            let found: Vec<_> = observed
                .into_iter()
                .filter(|o| &o.lease.lease_key == shard)
                .collect();
            if found.is_empty() {
                return fail(format!(
                    "no lease for shard {shard:?} in table {:?}",
                    args.application
                ));
            }
            found
        }
        None => observed,
    };
    let live: Vec<String> = targets
        .iter()
        .filter(|o| o.state == LeaseState::Live)
        .map(|o| {
            format!(
                "{} (owner {}, counter {} -> {} in {} ms)",
                o.lease.lease_key,
                o.lease.lease_owner.as_deref().unwrap_or("?"),
                o.first_counter.map_or("-".to_owned(), |c| c.to_string()),
                o.lease.lease_counter,
                args.interval.as_millis()
            )
        })
        .collect();
    if !live.is_empty() && !args.force {
        return fail(format!(
            "refusing to reset: held by a live worker: {}; nothing was written (stop the application, or use --force to reset anyway: the worker then loses the lease)",
            live.join(", ")
        ));
    }
    let stream = match &args.stream {
        Some(_) => Some(conn.stream_client().await?),
        None => None,
    };
    let mut failed = Vec::new();
    for o in &targets {
        let shard_id = &o.lease.lease_key;
        let checkpoint = match (&args.to, &stream, &args.stream) {
            (Target::TrimHorizon, ..) => ExtendedSequenceNumber::TRIM_HORIZON,
            (Target::Latest, ..) => ExtendedSequenceNumber::LATEST,
            (Target::AtTimestamp(t), Some(client), Some(name)) => {
                checkpoint_before(client, name, shard_id, *t).await?
            }
            (Target::Sequence(esn), Some(client), Some(name)) => {
                check_sequence(client, name, shard_id, esn).await?;
                esn.clone()
            }
            (Target::Sequence(esn), ..) => esn.clone(),
            (Target::AtTimestamp(_), ..) => return fail("--to at-timestamp needs --stream"),
        };
        match write(&store, &o.lease, &checkpoint, args.force).await? {
            Some((seen, written)) => println!(
                "{shard_id}: checkpoint {} -> {} (counter {} -> {}; was {}{}; now free)",
                short_esn(&seen.checkpoint),
                checkpoint,
                seen.lease_counter,
                written.lease_counter,
                o.state.as_str(),
                seen.lease_owner
                    .as_deref()
                    .map_or(String::new(), |w| format!(", owner {w}")),
            ),
            None => {
                eprintln!(
                    "kcl: {shard_id}: the lease changed after it was read (counter {}); not written",
                    o.lease.lease_counter
                );
                failed.push(shard_id.clone());
            }
        }
    }
    if !failed.is_empty() {
        return fail(format!(
            "{} lease(s) not reset because they changed meanwhile: {}; run again",
            failed.len(),
            failed.join(", ")
        ));
    }
    Ok(())
}

/// Writes the reset fenced on the lease as read right before the write (one round trip
/// earlier, so a live holder's renewals rarely fall in between). Without `force` the lease
/// must still be as observed (counter unchanged), else nothing is written (`None`). With
/// `force`, a write that loses the race to a renewal is retried from a fresh read, up to 5
/// times. Returns the row it fenced on and the row written.
async fn write(
    store: &dyn LeaseStore,
    observed: &kcl_lease::Lease,
    checkpoint: &ExtendedSequenceNumber,
    force: bool,
) -> CliResult<Option<(kcl_lease::Lease, kcl_lease::Lease)>> {
    const FORCED_ATTEMPTS: u32 = 5;
    let key = &observed.lease_key;
    for _ in 0..FORCED_ATTEMPTS {
        let seen = match store.get_lease(key).await {
            Ok(Some(seen)) => seen,
            Ok(None) => {
                return fail(format!(
                    "{key}: the lease was deleted meanwhile; not written"
                ));
            }
            Err(e) => return fail(format!("{key}: cannot read the lease: {}", chain(&e))),
        };
        if !force && seen.lease_counter != observed.lease_counter {
            return Ok(None);
        }
        match store.reset_checkpoint(&seen, checkpoint).await {
            Ok(written) => return Ok(Some((seen, written))),
            Err(LeaseError::ConditionFailed { .. }) if force => continue,
            Err(LeaseError::ConditionFailed { .. }) => return Ok(None),
            Err(e) => return fail(format!("{key}: reset failed: {}", chain(&e))),
        }
    }
    Ok(None)
}

/// Fails when `esn`'s sequence number is not one Kinesis accepts for the shard.
async fn check_sequence(
    stream: &dyn StreamClient,
    stream_name: &str,
    shard_id: &str,
    esn: &ExtendedSequenceNumber,
) -> CliResult<()> {
    let Position::Sequence(seq) = esn.position() else {
        return Ok(());
    };
    stream
        .get_shard_iterator(
            stream_name,
            shard_id,
            &IteratorPosition::AtSequenceNumber(seq.clone()),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            CliError(format!(
                "bad position sequence:{esn} for shard {shard_id} of stream {stream_name:?}: {}",
                chain(&e)
            ))
        })
}

/// The checkpoint after which the first record delivered is the first that arrived at or
/// after `t`: the last record (its last sub-record, for an aggregate) that arrived before
/// `t`, or TRIM_HORIZON when none did. Reads from `t - 1 min`, widening eightfold until a
/// record before `t` is found or the window passes any retention.
async fn checkpoint_before(
    stream: &dyn StreamClient,
    stream_name: &str,
    shard_id: &str,
    t: SystemTime,
) -> CliResult<ExtendedSequenceNumber> {
    const MAX_WINDOW: Duration = Duration::from_secs(400 * 24 * 3600);
    let mut window = Duration::from_secs(60);
    loop {
        let from = t.checked_sub(window).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH);
        let mut last: Option<Record> = None;
        let end = scan(
            stream,
            stream_name,
            shard_id,
            &IteratorPosition::AtTimestamp(from),
            ScanBounds::default(),
            |r| {
                if r.approximate_arrival_timestamp.is_some_and(|a| a < t) {
                    last = Some(r.clone());
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            },
        )
        .await?;
        if end == ScanEnd::Bounded {
            return fail(format!(
                "shard {shard_id}: too many records between the read start and the at-timestamp time to find the position"
            ));
        }
        if let Some(record) = last {
            let sequence_number = record.sequence_number.clone();
            let sub = deaggregate(record, &DeaggregationOptions::new())
                .records()
                .last()
                .map_or(0, |r| r.sub_sequence_number);
            return Ok(ExtendedSequenceNumber::new(sequence_number, sub));
        }
        if window >= MAX_WINDOW || from == UNIX_EPOCH {
            return Ok(ExtendedSequenceNumber::TRIM_HORIZON);
        }
        window = window.saturating_mul(8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions() {
        assert_eq!(parse_target("trim-horizon"), Ok(Target::TrimHorizon));
        assert_eq!(parse_target("latest"), Ok(Target::Latest));
        assert_eq!(
            parse_target("sequence:42.3"),
            Ok(Target::Sequence("42.3".parse().unwrap()))
        );
        assert!(matches!(
            parse_target("at-timestamp:2026-01-02T03:04:05Z"),
            Ok(Target::AtTimestamp(_))
        ));
        for bad in [
            "sequence:SHARD_END",
            "sequence:x1",
            "at-timestamp:yesterday",
            "horizon",
            "",
        ] {
            let e = parse_target(bad).unwrap_err();
            assert!(e.starts_with("bad position"), "{bad}: {e}");
        }
    }
}
