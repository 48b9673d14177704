//! The KCL 3.x state of an application, when it has one: the client version stored in
//! `<app>-CoordinatorState` (the `Migration3.0` item), the leader (the `Leader` lock item)
//! and the workers' `<app>-WorkerMetricStats` rows.
//!
//! The lock item is read before and after the two lease reads of [`observe`]: a leader
//! whose `recordVersionNumber` changed in between is heartbeating (`live`); one whose
//! number stood still is `stale` (a worker of ours heartbeats every failover time / 3, a
//! Java worker every 30 s: make the interval longer than that to judge a Java leader).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::v3::lock::{LEADER_KEY, LockItem};
use kcl_lease::v3::migration::{self, MigrationState};
use kcl_lease::v3::table::{StateTables, bounded};
use kcl_lease::v3::worker_metrics::{self, WorkerMetricStats};
use kcl_lease::{LeaseError, LeaseStore, SystemClock};
use serde_json::{Value, json};

use crate::common::{CliError, CliResult, Connection, Observed, chain, observe};

/// How the leader lock looked over two reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum LeaderState {
    /// Its record version number changed between the reads (or it appeared).
    Live,
    /// The same record version number at both reads.
    Stale,
    /// Marked released (`isReleased`).
    Released,
}

impl LeaderState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LeaderState::Live => "live",
            LeaderState::Stale => "stale",
            LeaderState::Released => "released",
        }
    }
}

/// The `Leader` item at the second read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Leader {
    pub(crate) owner: String,
    pub(crate) lease_duration: Duration,
    pub(crate) state: LeaderState,
}

/// One worker's WorkerMetricStats row.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Row {
    /// Seconds since its `lut` (by this machine's clock; `None` without `lut`).
    pub(crate) age_secs: Option<i64>,
    /// Counted by a leader now: valid, written within two report intervals (its own `ri`,
    /// else 2 × 30 s), no failing metric.
    pub(crate) fresh: bool,
    /// `ri` (rows of our workers), milliseconds.
    pub(crate) report_interval_ms: Option<u64>,
    /// CPU utilisation as a leader averages it, when the row carries it.
    pub(crate) cpu: Option<f64>,
}

impl Row {
    fn of(row: &WorkerMetricStats, now_secs: i64) -> Self {
        Self {
            age_secs: row.last_update_time.map(|lut| (now_secs - lut).max(0)),
            fresh: row.is_active(now_secs, worker_metrics::DEFAULT_REPORT_INTERVAL),
            report_interval_ms: row.report_interval_ms,
            cpu: row.average(
                worker_metrics::metric::CPU,
                worker_metrics::DEFAULT_EMA_ALPHA,
            ),
        }
    }

    /// `3s ago`, `stale, 75s ago`, `stale, no lut`.
    pub(crate) fn cell(&self) -> String {
        let age = self
            .age_secs
            .map_or_else(|| "no lut".to_owned(), |a| format!("{a}s ago"));
        if self.fresh {
            age
        } else {
            format!("stale, {age}")
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        json!({
            "last_update_age_s": self.age_secs,
            "fresh": self.fresh,
            "report_interval_ms": self.report_interval_ms,
            "cpu": self.cpu,
        })
    }
}

/// The application's KCL 3.x state (present when `<app>-CoordinatorState` exists).
#[derive(Clone, Debug, Default)]
pub(crate) struct ProtocolState {
    /// `Migration3.0`, if written.
    pub(crate) migration: Option<MigrationState>,
    /// The `Leader` item, if any.
    pub(crate) leader: Option<Leader>,
    /// The rows by worker id (none when `<app>-WorkerMetricStats` does not exist).
    pub(crate) rows: BTreeMap<String, Row>,
}

impl ProtocolState {
    pub(crate) fn leader_owner(&self) -> Option<&str> {
        self.leader.as_ref().map(|l| l.owner.as_str())
    }

    /// The top-level JSON fields: `client_version` (with `modified_by`,
    /// `modified_at_ms`) and `leader`.
    pub(crate) fn json_fields(state: Option<&Self>) -> Vec<(&'static str, Value)> {
        let migration = state.and_then(|s| s.migration.as_ref());
        let leader = state
            .and_then(|s| s.leader.as_ref())
            .map_or(Value::Null, |l| {
                json!({
                    "owner": l.owner,
                    "lease_duration_ms": l.lease_duration.as_millis() as u64,
                    "state": l.state.as_str(),
                })
            });
        vec![
            (
                "client_version",
                migration.map_or(Value::Null, |m| json!(m.client_version.as_str())),
            ),
            (
                "client_version_modified_by",
                migration.map_or(Value::Null, |m| json!(m.modified_by)),
            ),
            (
                "client_version_modified_at_ms",
                migration.map_or(Value::Null, |m| json!(m.modified_at_ms)),
            ),
            ("leader", leader),
        ]
    }

    /// One line for the text outputs.
    pub(crate) fn summary(&self) -> String {
        let version = match &self.migration {
            Some(m) => format!(
                "client version {} (set by {} at {})",
                m.client_version,
                m.modified_by,
                rfc3339_millis(m.modified_at_ms)
            ),
            None => "no client version (no Migration3.0 item)".to_owned(),
        };
        let leader = match &self.leader {
            Some(l) => format!(
                "leader {} ({}, leaseDuration {} ms)",
                l.owner,
                l.state.as_str(),
                l.lease_duration.as_millis()
            ),
            None => "no leader".to_owned(),
        };
        let fresh = self.rows.values().filter(|r| r.fresh).count();
        format!(
            "{version}; {leader}; {} WorkerMetricStats rows ({fresh} fresh)",
            self.rows.len()
        )
    }
}

fn rfc3339_millis(ms: i64) -> String {
    aws_smithy_types::DateTime::from_millis(ms)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_else(|_| format!("{ms} ms"))
}

/// What one read of the lock item found: `None` when the coordinator state table does
/// not exist.
type LockRead = Option<Option<LockItem>>;

fn table_error(table: &str, err: &LeaseError) -> CliError {
    CliError(format!("cannot read {table}: {}", chain(err)))
}

async fn read_lock(tables: &StateTables, limit: Duration) -> CliResult<LockRead> {
    let table = &tables.coordinator_state;
    match bounded(&SystemClock, limit, "get", table.get(LEADER_KEY)).await {
        Ok(None) => Ok(Some(None)),
        Ok(Some(item)) => LockItem::from_item(&item)
            .map(|lock| Some(Some(lock)))
            .map_err(|e| table_error("the Leader item", &e)),
        Err(LeaseError::TableMissing { .. }) => Ok(None),
        Err(err) => Err(table_error("the coordinator state table", &err)),
    }
}

fn leader_of(first: &LockRead, second: Option<LockItem>) -> Option<Leader> {
    let lock = second?;
    let before = first
        .as_ref()
        .and_then(Option::as_ref)
        .map(|l| l.record_version_number.as_str());
    let state = if lock.is_released {
        LeaderState::Released
    } else if before == Some(lock.record_version_number.as_str()) {
        LeaderState::Stale
    } else {
        LeaderState::Live
    };
    Some(Leader {
        owner: lock.owner_name,
        lease_duration: lock.lease_duration,
        state,
    })
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// [`observe`] the leases, and the KCL 3.x state around it (`None`: the application has
/// no `<app>-CoordinatorState` table).
pub(crate) async fn observe_with_protocol(
    conn: &Connection,
    store: &DynamoLeaseStore,
    interval: Duration,
) -> CliResult<(Vec<Observed>, Option<ProtocolState>)> {
    let limit = Duration::from_millis(conn.call_timeout);
    let Some(tables) = store.state_tables() else {
        return Ok((observe(store, interval).await?, None));
    };
    let first = read_lock(&tables, limit).await?;
    let observed = observe(store, interval).await?;
    let Some(second) = read_lock(&tables, limit).await? else {
        return Ok((observed, None));
    };
    let migration = migration::read_state(&*tables.coordinator_state, &SystemClock, limit)
        .await
        .map_err(|e| table_error("the Migration3.0 item", &e))?;
    let rows = match worker_metrics::list_rows(&*tables.worker_metrics, &SystemClock, limit).await {
        Ok(scan) => {
            let now = now_secs();
            scan.rows
                .iter()
                .map(|r| (r.worker_id.clone(), Row::of(r, now)))
                .collect()
        }
        Err(LeaseError::TableMissing { .. }) => BTreeMap::new(),
        Err(err) => return Err(table_error("the WorkerMetricStats table", &err)),
    };
    let state = ProtocolState {
        migration,
        leader: leader_of(&first, second),
        rows,
    };
    Ok((observed, Some(state)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(rvn: &str, released: bool) -> LockItem {
        LockItem {
            key: LEADER_KEY.to_owned(),
            owner_name: "w1".to_owned(),
            lease_duration: Duration::from_secs(3),
            record_version_number: rvn.to_owned(),
            is_released: released,
            data: None,
        }
    }

    #[test]
    fn leader_state_from_two_reads() {
        let state = |first: LockRead, second: Option<LockItem>| {
            leader_of(&first, second).map(|l| (l.owner, l.state))
        };
        let w1 = |s| Some(("w1".to_owned(), s));
        assert_eq!(state(None, None), None);
        assert_eq!(
            state(Some(None), Some(lock("a", false))),
            w1(LeaderState::Live)
        );
        assert_eq!(
            state(Some(Some(lock("a", false))), Some(lock("b", false))),
            w1(LeaderState::Live)
        );
        assert_eq!(
            state(Some(Some(lock("a", false))), Some(lock("a", false))),
            w1(LeaderState::Stale)
        );
        assert_eq!(
            state(Some(Some(lock("a", false))), Some(lock("a", true))),
            w1(LeaderState::Released)
        );
    }

    #[test]
    fn rows_age_and_freshness() {
        let mut row = WorkerMetricStats {
            worker_id: "w1".to_owned(),
            last_update_time: Some(1_000),
            metric_stats: BTreeMap::from([("C".to_owned(), vec![10.0, 30.0])]),
            operating_range: BTreeMap::from([("C".to_owned(), vec![100])]),
            report_interval_ms: Some(1_500),
        };
        let fresh = Row::of(&row, 1_003);
        assert_eq!(fresh.age_secs, Some(3));
        assert!(fresh.fresh);
        assert_eq!(fresh.cell(), "3s ago");
        assert_eq!(fresh.cpu, Some(20.0));
        // Two report intervals of its own (and a second) later: stale.
        let stale = Row::of(&row, 1_005);
        assert!(!stale.fresh);
        assert_eq!(stale.cell(), "stale, 5s ago");
        row.last_update_time = None;
        assert_eq!(Row::of(&row, 1_000).cell(), "stale, no lut");
    }
}
