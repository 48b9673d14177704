//! `kcl lag`: per shard, how far the checkpoint is behind the tip.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::SystemTime;

use kcl_kpl::Position;
use kcl_worker::stream::{IteratorPosition, StreamClient};
use serde_json::json;

use crate::common::{CliError, CliResult, Connection, chain, list, print_table, short_esn};
use crate::kinesis::{ScanBounds, ScanEnd, scan};

/// Options of `kcl lag`.
#[derive(clap::Args, Debug)]
pub(crate) struct LagArgs {
    /// The application name (the lease table name).
    #[arg(long)]
    application: String,
    /// The stream the application consumes.
    #[arg(long)]
    stream: String,
    /// GetRecords calls per shard at most (at 10,000 records each); a shard further behind
    /// shows its count as a lower bound (`>=`). At least 1.
    #[arg(
        long,
        default_value_t = ScanBounds::default().max_calls,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_calls_per_shard: u32,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// One shard's lag.
#[derive(Debug, Default)]
struct ShardLag {
    shard_id: String,
    checkpoint: String,
    /// Kinesis records after the checkpoint (`None`: not known).
    records: Option<u64>,
    /// Age of the oldest record after the checkpoint, in milliseconds (0 when none).
    millis: Option<u64>,
    /// The count stopped at the bound.
    lower_bound: bool,
    note: &'static str,
}

pub(crate) async fn lag(conn: &Connection, args: &LagArgs) -> CliResult<()> {
    let store = conn.lease_store(&args.application).await?;
    let stream = conn.stream_client().await?;
    let leases: BTreeMap<String, kcl_lease::Lease> = list(&store)
        .await?
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect();
    let shards = stream
        .list_all_shards(&args.stream, None)
        .await
        .map_err(|e| {
            CliError(format!(
                "cannot list the shards of stream {:?}: {}",
                args.stream,
                chain(&e)
            ))
        })?;
    let bounds = ScanBounds {
        max_calls: args.max_calls_per_shard,
        ..ScanBounds::default()
    };
    let mut lags = Vec::new();
    for shard in &shards {
        let mut lag = ShardLag {
            shard_id: shard.shard_id.clone(),
            ..ShardLag::default()
        };
        let Some(lease) = leases.get(&shard.shard_id) else {
            lag.checkpoint = "-".to_owned();
            lag.note = "no lease (not created yet, or finished and deleted)";
            lags.push(lag);
            continue;
        };
        lag.checkpoint = short_esn(&lease.checkpoint);
        let position = match lease.checkpoint.position() {
            Position::ShardEnd => {
                (lag.records, lag.millis, lag.note) = (Some(0), Some(0), "ended");
                lags.push(lag);
                continue;
            }
            Position::Latest => {
                (lag.records, lag.millis, lag.note) = (Some(0), Some(0), "at LATEST");
                lags.push(lag);
                continue;
            }
            Position::TrimHorizon => IteratorPosition::TrimHorizon,
            Position::Sequence(seq) => IteratorPosition::AfterSequenceNumber(seq.clone()),
            _ => {
                lag.note = "AT_TIMESTAMP: the workers' initial timestamp is not in the table";
                lags.push(lag);
                continue;
            }
        };
        let (records, millis, end) =
            behind(&stream, &args.stream, &shard.shard_id, &position, bounds).await?;
        lag.records = Some(records);
        lag.millis = Some(millis);
        lag.lower_bound = end == ScanEnd::Bounded;
        lags.push(lag);
    }
    let total_records: u64 = lags.iter().filter_map(|l| l.records).sum();
    let max_millis = lags.iter().filter_map(|l| l.millis).max().unwrap_or(0);
    let any_bound = lags.iter().any(|l| l.lower_bound);
    if args.json {
        let shards: Vec<_> = lags
            .iter()
            .map(|l| {
                json!({
                    "shard_id": l.shard_id,
                    "checkpoint": l.checkpoint,
                    "records_behind": l.records,
                    "records_behind_is_lower_bound": l.lower_bound,
                    "millis_behind": l.millis,
                    "note": if l.note.is_empty() { None } else { Some(l.note) },
                })
            })
            .collect();
        println!(
            "{}",
            json!({
                "application": args.application,
                "stream": args.stream,
                "shards": shards,
                "total_records_behind": total_records,
                "total_is_lower_bound": any_bound,
                "max_millis_behind": max_millis,
            })
        );
        return Ok(());
    }
    let mut rows = vec![
        [
            "SHARD",
            "CHECKPOINT",
            "RECORDS_BEHIND",
            "MILLIS_BEHIND",
            "NOTE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let dash = || "-".to_owned();
    for l in &lags {
        rows.push(vec![
            l.shard_id.clone(),
            l.checkpoint.clone(),
            l.records
                .map(|r| format!("{}{r}", if l.lower_bound { ">=" } else { "" }))
                .unwrap_or_else(dash),
            l.millis.map(|m| m.to_string()).unwrap_or_else(dash),
            l.note.to_owned(),
        ]);
    }
    rows.push(vec![
        "TOTAL".to_owned(),
        String::new(),
        format!("{}{total_records}", if any_bound { ">=" } else { "" }),
        max_millis.to_string(),
        "(records: sum; millis: max)".to_owned(),
    ]);
    print_table(&rows);
    Ok(())
}

/// Records after `position` to the tip, and the age of the first of them in milliseconds.
async fn behind(
    stream: &dyn StreamClient,
    stream_name: &str,
    shard_id: &str,
    position: &IteratorPosition,
    bounds: ScanBounds,
) -> CliResult<(u64, u64, ScanEnd)> {
    let mut records = 0u64;
    let mut oldest: Option<SystemTime> = None;
    let end = scan(stream, stream_name, shard_id, position, bounds, |r| {
        records += 1;
        if oldest.is_none() {
            oldest = r.approximate_arrival_timestamp;
        }
        ControlFlow::Continue(())
    })
    .await?;
    let millis = oldest
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    Ok((records, millis, end))
}
