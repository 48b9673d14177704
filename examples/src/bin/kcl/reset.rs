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
//!
//! Every target's checkpoint is found first (for at-timestamp by reading its shard; with
//! `--stream`, every shard is checked against the stream); when any cannot be, the error
//! names those shards and nothing is written. Then the leases are written one by one: one that
//! changed meanwhile is skipped, a failure of the store stops the writes, and the error lists
//! the leases written and those not written.

use std::ops::ControlFlow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcl_kpl::{DeaggregationOptions, ExtendedSequenceNumber, Position, Record, deaggregate};
use kcl_lease::{LeaseError, LeaseStore};
use kcl_worker::stream::{IteratorPosition, StreamClient};

use crate::common::{
    CliError, CliResult, Connection, LeaseState, Observed, chain, fail, observe, parse_millis,
    short_esn,
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
    /// Move the checkpoint of every lease in the table (not with --to sequence:N).
    #[arg(long)]
    all_shards: bool,
    /// trim-horizon, latest, at-timestamp:RFC3339 or sequence:N[.SUB].
    #[arg(long, value_parser = parse_target)]
    to: Target,
    /// The stream: needed for at-timestamp (the shard is read to find the position); with
    /// any other position each shard is checked against it (GetShardIterator) before
    /// anything is written.
    #[arg(long)]
    stream: Option<String>,
    /// Reset leases held by live workers too (still fenced on the counter read).
    #[arg(long)]
    force: bool,
    /// Time between the two reads that tell live leases from stale ones, in milliseconds.
    #[arg(long = "interval-ms", default_value = "5000", value_parser = parse_millis)]
    interval: Duration,
}

impl ResetArgs {
    /// Whether the command reads the stream (and so uses the Kinesis connection options).
    pub(crate) fn reads_stream(&self) -> bool {
        self.stream.is_some()
    }

    /// Refuses the combinations of options that cannot be carried out (a usage error).
    pub(crate) fn check(&self) -> Result<(), String> {
        match self.to {
            Target::Sequence(_) if self.all_shards => Err(
                "--to sequence:N cannot go with --all-shards: a sequence number belongs to one shard (reset each shard with --shard ID)"
                    .to_owned(),
            ),
            Target::AtTimestamp(_) if self.stream.is_none() => Err(
                "--to at-timestamp needs --stream (the shard is read to find the position)"
                    .to_owned(),
            ),
            Target::AtTimestamp(t) if t > SystemTime::now() => {
                Err("bad position: the --to at-timestamp time is in the future".to_owned())
            }
            _ => Ok(()),
        }
    }
}

pub(crate) async fn reset(conn: &Connection, args: &ResetArgs) -> CliResult<()> {
    if let Err(msg) = args.check() {
        return fail(msg);
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
    let client = match &args.stream {
        Some(_) => Some(conn.stream_client().await?),
        None => None,
    };
    let stream = match (&client, &args.stream) {
        (Some(client), Some(name)) => Some((client as &dyn StreamClient, name.as_str())),
        _ => None,
    };
    apply(&store, stream, &args.to, targets, args.force).await
}

/// Finds every target's checkpoint, then writes them ([`resolve_all`], [`write_all`]).
async fn apply(
    store: &dyn LeaseStore,
    stream: Option<(&dyn StreamClient, &str)>,
    to: &Target,
    targets: Vec<Observed>,
    force: bool,
) -> CliResult<()> {
    let resolved = resolve_all(stream, to, targets).await?;
    write_all(store, &resolved, force).await
}

/// The checkpoint of every target, before anything is written: when one cannot be found,
/// the error names each such shard and nothing is written.
async fn resolve_all(
    stream: Option<(&dyn StreamClient, &str)>,
    to: &Target,
    targets: Vec<Observed>,
) -> CliResult<Vec<(Observed, ExtendedSequenceNumber)>> {
    let total = targets.len();
    let mut resolved = Vec::with_capacity(total);
    let mut errors = Vec::new();
    for o in targets {
        let key = &o.lease.lease_key;
        match resolve(stream, to, key).await {
            Ok(checkpoint) => resolved.push((o, checkpoint)),
            // Every error names its shard.
            Err(CliError(msg)) if msg.contains(key.as_str()) => errors.push(msg),
            Err(CliError(msg)) => errors.push(format!("{key}: {msg}")),
        }
    }
    if !errors.is_empty() {
        return fail(format!(
            "cannot find the position of {} of {total} shard(s); nothing was written: {}",
            errors.len(),
            errors.join("; ")
        ));
    }
    Ok(resolved)
}

/// The checkpoint `to` means for `shard_id`; with a stream, the shard is checked against it.
async fn resolve(
    stream: Option<(&dyn StreamClient, &str)>,
    to: &Target,
    shard_id: &str,
) -> CliResult<ExtendedSequenceNumber> {
    match (to, stream) {
        (Target::TrimHorizon, None) => Ok(ExtendedSequenceNumber::TRIM_HORIZON),
        (Target::Latest, None) => Ok(ExtendedSequenceNumber::LATEST),
        (Target::TrimHorizon, Some((client, name))) => {
            check_shard(client, name, shard_id, &IteratorPosition::TrimHorizon).await?;
            Ok(ExtendedSequenceNumber::TRIM_HORIZON)
        }
        (Target::Latest, Some((client, name))) => {
            check_shard(client, name, shard_id, &IteratorPosition::Latest).await?;
            Ok(ExtendedSequenceNumber::LATEST)
        }
        (Target::AtTimestamp(t), Some((client, name))) => {
            checkpoint_before(client, name, shard_id, *t).await
        }
        (Target::AtTimestamp(_), None) => fail("--to at-timestamp needs --stream"),
        (Target::Sequence(esn), Some((client, name))) => {
            check_sequence(client, name, shard_id, esn).await?;
            Ok(esn.clone())
        }
        (Target::Sequence(esn), None) => Ok(esn.clone()),
    }
}

/// What became of one lease's write.
#[derive(Debug)]
enum Outcome {
    /// Written: the row it fenced on and the row written.
    Written(Box<(kcl_lease::Lease, kcl_lease::Lease)>),
    /// Not written: the lease changed (or was deleted) after it was read.
    Changed(&'static str),
    /// Not written: the store failed.
    Failed(String),
}

/// Writes the targets one by one; a lease that changed meanwhile is skipped, a failure of
/// the store stops the writes. Unless every target was written, the error lists the leases
/// written and those not written (and why).
async fn write_all(
    store: &dyn LeaseStore,
    targets: &[(Observed, ExtendedSequenceNumber)],
    force: bool,
) -> CliResult<()> {
    let mut written: Vec<&str> = Vec::new();
    let mut not_written: Vec<String> = Vec::new();
    let mut rest = targets.iter();
    for (o, checkpoint) in rest.by_ref() {
        let shard_id = o.lease.lease_key.as_str();
        match write(store, &o.lease, checkpoint, force).await {
            Outcome::Written(rows) => {
                let (seen, new) = *rows;
                println!(
                    "{shard_id}: checkpoint {} -> {} (counter {} -> {}; was {}{}; now free)",
                    short_esn(&seen.checkpoint),
                    checkpoint,
                    seen.lease_counter,
                    new.lease_counter,
                    o.state.as_str(),
                    seen.lease_owner
                        .as_deref()
                        .map_or(String::new(), |w| format!(", owner {w}")),
                );
                written.push(shard_id);
            }
            Outcome::Changed(why) => not_written.push(format!("{shard_id} ({why})")),
            Outcome::Failed(why) => {
                not_written.push(format!("{shard_id} ({why})"));
                break;
            }
        }
    }
    for (o, _) in rest {
        not_written.push(format!(
            "{} (not attempted after the failure)",
            o.lease.lease_key
        ));
    }
    if not_written.is_empty() {
        return Ok(());
    }
    fail(format!(
        "{} of {} lease(s) not reset; written: {}; not written: {}; run again for those not written",
        not_written.len(),
        targets.len(),
        if written.is_empty() {
            "none".to_owned()
        } else {
            written.join(", ")
        },
        not_written.join(", ")
    ))
}

/// Writes the reset fenced on the lease as read right before the write (one round trip
/// earlier, so a live holder's renewals rarely fall in between). Without `force` the lease
/// must still be as observed (counter unchanged), else nothing is written. With `force`, a
/// write that loses the race to a renewal is retried from a fresh read, up to 5 times.
async fn write(
    store: &dyn LeaseStore,
    observed: &kcl_lease::Lease,
    checkpoint: &ExtendedSequenceNumber,
    force: bool,
) -> Outcome {
    const FORCED_ATTEMPTS: u32 = 5;
    const CHANGED: &str = "the lease changed after it was read";
    let key = &observed.lease_key;
    for _ in 0..FORCED_ATTEMPTS {
        let seen = match store.get_lease(key).await {
            Ok(Some(seen)) => seen,
            Ok(None) => return Outcome::Changed("the lease was deleted after it was read"),
            Err(e) => return Outcome::Failed(format!("cannot read the lease: {}", chain(&e))),
        };
        if !force && seen.lease_counter != observed.lease_counter {
            return Outcome::Changed(CHANGED);
        }
        match store.reset_checkpoint(&seen, checkpoint).await {
            Ok(written) => return Outcome::Written(Box::new((seen, written))),
            Err(LeaseError::ConditionFailed { .. }) if force => continue,
            Err(LeaseError::ConditionFailed { .. }) => return Outcome::Changed(CHANGED),
            Err(e) => return Outcome::Failed(format!("reset failed: {}", chain(&e))),
        }
    }
    Outcome::Changed(CHANGED)
}

/// Fails when `shard_id` cannot be read in the stream (no such shard, no such stream).
async fn check_shard(
    stream: &dyn StreamClient,
    stream_name: &str,
    shard_id: &str,
    position: &IteratorPosition,
) -> CliResult<()> {
    stream
        .get_shard_iterator(stream_name, shard_id, position)
        .await
        .map(|_| ())
        .map_err(|e| {
            CliError(format!(
                "shard {shard_id} of stream {stream_name:?}: {}",
                chain(&e)
            ))
        })
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
    use bytes::Bytes;
    use kcl_lease::Lease;
    use kcl_lease::test_util::InMemoryLeaseStore;
    use kcl_lease::test_util::lease_store::{Fault, FaultKind, LeaseOperation};
    use kcl_worker::test_util::InMemoryKinesis;

    const SHARDS: [&str; 3] = [
        "shardId-000000000000",
        "shardId-000000000001",
        "shardId-000000000002",
    ];

    /// A lease table with a free lease per key, checkpoint 7 (the emulators' numbers are
    /// longer; the store does not care).
    async fn table(keys: &[&str]) -> InMemoryLeaseStore {
        let store = InMemoryLeaseStore::new().with_table();
        for key in keys {
            let lease = Lease::new(*key, "7".parse().unwrap());
            assert!(store.create_lease_if_not_exists(&lease).await.unwrap());
        }
        store
    }

    /// The leases as `kcl reset` observes them (two reads, nothing moved: all free).
    async fn observed(store: &InMemoryLeaseStore) -> Vec<Observed> {
        let leases = store.list_leases().await.unwrap();
        crate::common::classify(&leases, leases.clone())
    }

    fn checkpoints(store: &InMemoryLeaseStore) -> Vec<(String, String)> {
        store
            .snapshot()
            .into_iter()
            .map(|l| (l.lease_key, l.checkpoint.to_string()))
            .collect()
    }

    fn pairs(rows: &[(&str, &str)]) -> Vec<(String, String)> {
        rows.iter()
            .map(|(k, c)| ((*k).to_owned(), (*c).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn a_failed_write_stops_the_writes_and_the_error_says_what_was_written() {
        let store = table(&SHARDS).await;
        let targets = observed(&store).await;
        store.inject(
            Fault::new(FaultKind::ServiceError, 1)
                .for_operation(LeaseOperation::ResetCheckpoint)
                .for_key(SHARDS[1]),
        );
        let err = apply(&store, None, &Target::Latest, targets, false)
            .await
            .unwrap_err()
            .0;
        assert!(err.starts_with("2 of 3 lease(s) not reset; "), "{err}");
        assert!(
            err.contains(
                "; written: shardId-000000000000; not written: shardId-000000000001 (reset failed: "
            ),
            "{err}"
        );
        assert!(
            err.contains(", shardId-000000000002 (not attempted after the failure); run again"),
            "{err}"
        );
        assert_eq!(
            checkpoints(&store),
            pairs(&[(SHARDS[0], "LATEST"), (SHARDS[1], "7"), (SHARDS[2], "7")])
        );
    }

    #[tokio::test]
    async fn a_lease_that_changed_meanwhile_is_skipped_and_the_others_written() {
        let store = table(&SHARDS).await;
        let targets = observed(&store).await;
        let free = store.get_lease(SHARDS[1]).await.unwrap().unwrap();
        store.take_lease(&free, "worker-x").await.unwrap();
        let err = apply(&store, None, &Target::TrimHorizon, targets, false)
            .await
            .unwrap_err()
            .0;
        assert_eq!(
            err,
            "1 of 3 lease(s) not reset; written: shardId-000000000000, shardId-000000000002; \
             not written: shardId-000000000001 (the lease changed after it was read); run \
             again for those not written"
        );
        assert_eq!(
            checkpoints(&store),
            pairs(&[
                (SHARDS[0], "TRIM_HORIZON"),
                (SHARDS[1], "7"),
                (SHARDS[2], "TRIM_HORIZON")
            ])
        );
        let taken = store.get_lease(SHARDS[1]).await.unwrap().unwrap();
        assert_eq!(taken.lease_owner.as_deref(), Some("worker-x"));
    }

    #[tokio::test]
    async fn every_position_is_found_before_anything_is_written() {
        let kinesis = InMemoryKinesis::new();
        kinesis.create_stream("s", 2).unwrap();
        for i in 0..6 {
            kinesis
                .put_record("s", &format!("key-{i}"), None, Bytes::from_static(b"x"))
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        let at = SystemTime::now();
        // The third lease's shard is not in the stream (another stream's, or gone).
        let store = table(&SHARDS).await;
        let stream: Option<(&dyn StreamClient, &str)> = Some((&kinesis, "s"));
        for to in [Target::AtTimestamp(at), Target::TrimHorizon, Target::Latest] {
            let targets = observed(&store).await;
            let err = apply(&store, stream, &to, targets, false)
                .await
                .unwrap_err()
                .0;
            assert!(
                err.starts_with(
                    "cannot find the position of 1 of 3 shard(s); nothing was written: "
                ) && err.contains("shardId-000000000002")
                    && err.contains("does not exist"),
                "{to:?}: {err}"
            );
            assert_eq!(
                checkpoints(&store),
                pairs(&[(SHARDS[0], "7"), (SHARDS[1], "7"), (SHARDS[2], "7")]),
                "{to:?}"
            );
        }
        // With the shards of the stream alone, every lease moves to its shard's last
        // record before the time.
        let store = table(&SHARDS[..2]).await;
        let targets = observed(&store).await;
        apply(&store, stream, &Target::AtTimestamp(at), targets, false)
            .await
            .unwrap();
        for lease in store.snapshot() {
            let Position::Sequence(seq) = lease.checkpoint.position() else {
                panic!("{lease:?}");
            };
            let it = kinesis
                .get_shard_iterator(
                    "s",
                    &lease.lease_key,
                    &IteratorPosition::AfterSequenceNumber(seq.clone()),
                )
                .await
                .unwrap();
            let after = kinesis.get_records(&it, 100).await.unwrap();
            assert!(after.records.is_empty(), "{lease:?}: {after:?}");
        }
    }

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
