//! `kcl leases` and `kcl workers`: the lease table as an operator reads it, and the KCL 3.x
//! state when the application has one (client version, leader, WorkerMetricStats rows; see
//! [`crate::protocol`]).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{
    CliResult, Connection, LeaseState, Observed, parse_millis, print_table, short_esn,
};
use crate::protocol::{ProtocolState, observe_with_protocol};

/// Options of `kcl leases` and `kcl workers`.
#[derive(clap::Args, Debug)]
pub(crate) struct TableArgs {
    /// The application name (the lease table name).
    #[arg(long)]
    pub(crate) application: String,
    /// Time between the two reads that tell live leases (counter moved) from stale ones, in
    /// milliseconds. Make it longer than the workers' renewal period (failover time / 3).
    #[arg(long = "interval-ms", default_value = "5000", value_parser = parse_millis)]
    pub(crate) interval: Duration,
    /// One JSON document on stdout instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

fn esn_json(esn: Option<&kcl_kpl::ExtendedSequenceNumber>) -> Value {
    match esn {
        None => Value::Null,
        Some(e) => json!({
            "sequence_number": e.sequence_str(),
            "sub_sequence_number": e.sub_sequence_number(),
        }),
    }
}

fn lease_json(o: &Observed) -> Value {
    let l = &o.lease;
    json!({
        "shard_id": l.lease_key,
        "owner": l.lease_owner,
        "counter": l.lease_counter,
        "counter_at_first_read": o.first_counter,
        "state": o.state.as_str(),
        "checkpoint": esn_json(Some(&l.checkpoint)),
        "pending_checkpoint": esn_json(l.pending_checkpoint.as_ref()),
        "parent_shard_ids": l.parent_shard_ids,
        "child_shard_ids": l.child_shard_ids,
        "owner_switches_since_checkpoint": l.owner_switches_since_checkpoint,
        "checkpoint_owner": l.checkpoint_owner,
    })
}

/// The owner column: `next<-current` while a graceful handoff is in flight (`leaseOwner` is
/// the next owner, `checkpointOwner` the current one), `-` for a free lease.
fn owner_cell(l: &kcl_lease::Lease) -> String {
    let owner = l.lease_owner.as_deref().unwrap_or("-");
    match &l.checkpoint_owner {
        Some(current) => format!("{owner}<-{current}"),
        None => owner.to_owned(),
    }
}

pub(crate) async fn leases(conn: &Connection, args: &TableArgs) -> CliResult<()> {
    let store = conn.lease_store(&args.application).await?;
    let (observed, protocol) = observe_with_protocol(conn, &store, args.interval).await?;
    if args.json {
        let leases: Vec<Value> = observed.iter().map(lease_json).collect();
        let mut out = json!({ "application": args.application, "interval_ms": args.interval.as_millis() as u64, "leases": leases });
        extend(&mut out, ProtocolState::json_fields(protocol.as_ref()));
        println!("{out}");
        return Ok(());
    }
    let mut rows = vec![
        [
            "SHARD",
            "OWNER",
            "COUNTER",
            "CHECKPOINT",
            "PENDING",
            "PARENTS",
            "STATE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for o in &observed {
        let l = &o.lease;
        let parents: Vec<&str> = l.parent_shard_ids.iter().map(String::as_str).collect();
        rows.push(vec![
            l.lease_key.clone(),
            owner_cell(l),
            l.lease_counter.to_string(),
            short_esn(&l.checkpoint),
            l.pending_checkpoint
                .as_ref()
                .map(short_esn)
                .unwrap_or_else(|| "-".to_owned()),
            if parents.is_empty() {
                "-".to_owned()
            } else {
                parents.join(",")
            },
            o.state.as_str().to_owned(),
        ]);
    }
    print_table(&rows);
    let count = |s: LeaseState| observed.iter().filter(|o| o.state == s).count();
    println!(
        "{} leases: {} live, {} stale, {} free (counters read {} ms apart)",
        observed.len(),
        count(LeaseState::Live),
        count(LeaseState::Stale),
        count(LeaseState::Free),
        args.interval.as_millis()
    );
    if let Some(protocol) = &protocol {
        println!("{}", protocol.summary());
    }
    Ok(())
}

/// Adds `fields` to the JSON object `out`.
fn extend(out: &mut Value, fields: Vec<(&'static str, Value)>) {
    if let Some(object) = out.as_object_mut() {
        for (name, value) in fields {
            object.insert(name.to_owned(), value);
        }
    }
}

/// One worker's share.
#[derive(Default, Debug)]
struct Share {
    leases: usize,
    live: usize,
    stale: usize,
    finished: usize,
}

/// How evenly the unfinished leases are spread over the workers.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Balance {
    pub(crate) workers: usize,
    pub(crate) unfinished: usize,
    pub(crate) free: usize,
    /// ceil(unfinished / workers), what the taker aims each worker at.
    pub(crate) target: usize,
    pub(crate) most: usize,
    pub(crate) fewest: usize,
    /// No free unfinished lease, and the most and fewest held differ by at most one.
    pub(crate) balanced: bool,
}

pub(crate) fn balance(unfinished_per_worker: &[usize], free: usize) -> Balance {
    let workers = unfinished_per_worker.len();
    let held: usize = unfinished_per_worker.iter().sum();
    let unfinished = held + free;
    let most = unfinished_per_worker.iter().copied().max().unwrap_or(0);
    let fewest = unfinished_per_worker.iter().copied().min().unwrap_or(0);
    let target = if workers == 0 {
        0
    } else {
        unfinished.div_ceil(workers)
    };
    Balance {
        workers,
        unfinished,
        free,
        target,
        most,
        fewest,
        balanced: workers > 0 && free == 0 && most - fewest <= 1,
    }
}

pub(crate) async fn workers(conn: &Connection, args: &TableArgs) -> CliResult<()> {
    let store = conn.lease_store(&args.application).await?;
    let (observed, protocol) = observe_with_protocol(conn, &store, args.interval).await?;
    let mut shares: BTreeMap<String, Share> = BTreeMap::new();
    // In the 3.x state: a worker with a fresh row is in the fleet even while it holds no
    // lease (a leader has yet to give it some), and so is the leader.
    if let Some(p) = &protocol {
        for (worker, _) in p.rows.iter().filter(|(_, r)| r.fresh) {
            shares.entry(worker.clone()).or_default();
        }
        if let Some(leader) = p.leader_owner() {
            shares.entry(leader.to_owned()).or_default();
        }
    }
    let mut free = 0usize;
    for o in &observed {
        let finished = o.lease.is_finished();
        match &o.lease.lease_owner {
            None => {
                if !finished {
                    free += 1;
                }
            }
            Some(owner) => {
                let share = shares.entry(owner.clone()).or_default();
                if finished {
                    share.finished += 1;
                } else {
                    share.leases += 1;
                }
                match o.state {
                    LeaseState::Live => share.live += 1,
                    LeaseState::Stale => share.stale += 1,
                    LeaseState::Free => {}
                }
            }
        }
    }
    let per_worker: Vec<usize> = shares.values().map(|s| s.leases).collect();
    let b = balance(&per_worker, free);
    let is_leader = |w: &str| {
        protocol
            .as_ref()
            .and_then(ProtocolState::leader_owner)
            .is_some_and(|l| l == w)
    };
    let row_of = |w: &str| protocol.as_ref().and_then(|p| p.rows.get(w));
    if args.json {
        let workers: Vec<Value> = shares
            .iter()
            .map(|(w, s)| {
                let mut worker = json!({
                    "worker_id": w,
                    "leases": s.leases,
                    "finished_leases": s.finished,
                    "live": s.live,
                    "stale": s.stale,
                });
                if protocol.is_some() {
                    extend(
                        &mut worker,
                        vec![
                            ("leader", json!(is_leader(w))),
                            (
                                "metric_stats",
                                row_of(w).map_or(Value::Null, |r| r.to_json()),
                            ),
                        ],
                    );
                }
                worker
            })
            .collect();
        let mut out = json!({
            "application": args.application,
            "workers": workers,
            "unfinished_leases": b.unfinished,
            "free_leases": b.free,
            "target_per_worker": b.target,
            "most": b.most,
            "fewest": b.fewest,
            "balanced": b.balanced,
        });
        extend(&mut out, ProtocolState::json_fields(protocol.as_ref()));
        println!("{out}");
        return Ok(());
    }
    let mut header = vec!["WORKER", "LEASES", "LIVE", "STALE", "FINISHED"];
    if protocol.is_some() {
        header.extend(["METRIC_STATS", "ROLE"]);
    }
    let mut rows = vec![header.into_iter().map(str::to_owned).collect::<Vec<_>>()];
    for (w, s) in &shares {
        let mut row = vec![
            w.clone(),
            s.leases.to_string(),
            s.live.to_string(),
            s.stale.to_string(),
            s.finished.to_string(),
        ];
        if protocol.is_some() {
            row.push(row_of(w).map_or_else(|| "-".to_owned(), |r| r.cell()));
            row.push(if is_leader(w) { "leader" } else { "-" }.to_owned());
        }
        rows.push(row);
    }
    print_table(&rows);
    println!(
        "{} workers, {} unfinished leases ({} free); target {} per worker, most {}, fewest {}: {}",
        b.workers,
        b.unfinished,
        b.free,
        b.target,
        b.most,
        b.fewest,
        if b.balanced { "balanced" } else { "unbalanced" }
    );
    if let Some(protocol) = &protocol {
        println!("{}", protocol.summary());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_of_shares() {
        assert!(balance(&[2, 2], 0).balanced);
        assert!(balance(&[3, 2], 0).balanced);
        let b = balance(&[4, 1], 0);
        assert!(!b.balanced);
        assert_eq!((b.target, b.most, b.fewest), (3, 4, 1));
        assert!(
            !balance(&[1, 1], 1).balanced,
            "a free lease is not balanced"
        );
        assert!(!balance(&[], 3).balanced);
    }

    #[test]
    fn owner_column_shows_a_handoff() {
        let mut lease =
            kcl_lease::Lease::new("shardId-0", kcl_kpl::ExtendedSequenceNumber::TRIM_HORIZON);
        assert_eq!(owner_cell(&lease), "-");
        lease.lease_owner = Some("worker-b".to_owned());
        assert_eq!(owner_cell(&lease), "worker-b");
        lease.checkpoint_owner = Some("worker-a".to_owned());
        assert_eq!(owner_cell(&lease), "worker-b<-worker-a");
    }
}
