//! The `<app>-WorkerMetricStats` row ([`WorkerMetricStats`]) and the
//! [`MetricStatsRecorder`] that turns utilisation samples into the values a row carries.
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `wid` | S | the worker id (HASH key) |
//! | `lut` | N | when the row was written: wall-clock epoch seconds |
//! | `sts` | M of L of N | per metric short name, the last reported values, oldest first |
//! | `opr` | M of L of N | per metric short name, `[max utilisation]` |
//!
//! The Java KCL writes the row every 30 s with an unconditional UpdateItem of those four
//! attributes ([`WorkerMetricStats::update`] gives the same change), keeps 10 values per
//! metric, each the average of one-second samples since the previous report (`-1` when
//! there were none), and a leader counts a worker only while its row is fresh (`lut` at
//! most 2 report intervals old by the leader's wall clock) and its metrics are not failing
//! (last value `-1`). See the [parent module](super) for the protocol.
//!
//! Nothing writes these rows at run time yet (see the [parent module](super)).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use super::item::{Condition, Item, Reader, Value, parse_float, parse_int};
use super::table::{StateTable, Update, WORKER_METRIC_STATS_KEY, bounded};
use crate::{Clock, LeaseError};

/// The attribute names of a WorkerMetricStats row.
pub mod attr {
    /// `wid` (S): the worker id.
    pub const WORKER_ID: &str = "wid";
    /// `lut` (N): epoch seconds of the last update.
    pub const LAST_UPDATE_TIME: &str = "lut";
    /// `sts` (M of L of N): the metric stats.
    pub const METRIC_STATS: &str = "sts";
    /// `opr` (M of L of N): the operating range.
    pub const OPERATING_RANGE: &str = "opr";
    /// How often the worker writes the row, in ms (written by our workers only).
    pub const REPORT_INTERVAL: &str = "ri";
}

/// The short names of the worker metrics.
pub mod metric {
    /// CPU utilisation, percent of what the worker may use.
    pub const CPU: &str = "C";
    /// Memory.
    pub const MEMORY: &str = "M";
    /// Network in.
    pub const NETWORK_IN: &str = "NI";
    /// Network out.
    pub const NETWORK_OUT: &str = "NO";
    /// Throughput: the synthetic metric a leader uses for a worker without explicit metrics.
    pub const THROUGHPUT: &str = "T";
}

/// The value that marks a report period without any sample.
pub const FAILED_VALUE: f64 = -1.0;
/// How many values per metric a row keeps (`noOfPersistedMetricsPerWorkerMetrics`).
pub const DEFAULT_PERSISTED_VALUES: usize = 10;
/// How often a row is written (`workerMetricsReporterFreqInMillis`).
pub const DEFAULT_REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// How often the utilisation is sampled in memory
/// (`inMemoryWorkerMetricsCaptureFrequencyMillis`).
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// A row older than this many report intervals is not counted by a leader.
pub const STALE_AFTER_REPORTS: u32 = 2;
/// The α of the exponential moving average a leader applies to the values
/// (`workerMetricsEMAAlpha`).
pub const DEFAULT_EMA_ALPHA: f64 = 0.5;
/// A leader deletes rows older than this (`staleWorkerMetricsEntryCleanupDuration`).
pub const DEFAULT_STALE_ROW_CLEANUP: Duration = Duration::from_secs(24 * 3600);

/// One row of `<app>-WorkerMetricStats`.
#[derive(Clone, PartialEq, Debug)]
pub struct WorkerMetricStats {
    /// `wid`.
    pub worker_id: String,
    /// `lut`: epoch seconds; `None` when the row has none (such a row is not valid).
    pub last_update_time: Option<i64>,
    /// `sts`: per metric, the values, oldest first.
    pub metric_stats: BTreeMap<String, Vec<f64>>,
    /// `opr`: per metric, `[max utilisation]`.
    pub operating_range: BTreeMap<String, Vec<i64>>,
    /// `ri` (ours, not the Java KCL's, which ignores it): how often the worker writes its
    /// row, in milliseconds. A leader of ours judges such a row stale after two of these
    /// instead of two 30 s reports, so a crashed worker of ours stops receiving leases
    /// seconds after its last report, not a minute.
    pub report_interval_ms: Option<u64>,
}

impl WorkerMetricStats {
    /// The row as an item.
    pub fn to_item(&self) -> Item {
        let mut item = Item::new();
        item.insert(attr::WORKER_ID.to_owned(), Value::s(&self.worker_id));
        for (name, value) in self.attributes() {
            item.insert(name.to_owned(), value);
        }
        item
    }

    /// The UpdateItem change that writes this row (every attribute but the key), as the
    /// Java KCL's reporter does: unconditional, keeping any other attribute.
    pub fn update(&self) -> Update {
        let mut update = Update::new();
        for (name, value) in self.attributes() {
            update = update.set(name, value);
        }
        update
    }

    fn attributes(&self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        if let Some(lut) = self.last_update_time {
            out.push((attr::LAST_UPDATE_TIME, Value::int(lut)));
        }
        let sts = self
            .metric_stats
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value::L(v.iter().copied().map(Value::float).collect()),
                )
            })
            .collect();
        out.push((attr::METRIC_STATS, Value::M(sts)));
        let opr = self
            .operating_range
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    Value::L(v.iter().copied().map(Value::int).collect()),
                )
            })
            .collect();
        out.push((attr::OPERATING_RANGE, Value::M(opr)));
        if let Some(ms) = self.report_interval_ms {
            out.push((
                attr::REPORT_INTERVAL,
                Value::int(i64::try_from(ms).unwrap_or(i64::MAX)),
            ));
        }
        out
    }

    /// Reads a row. `wid` is required; a missing `lut`, `sts` or `opr` reads as absent or
    /// empty (the row is then judged by [`WorkerMetricStats::is_valid`]); values of the
    /// wrong type are errors naming the row and the attribute.
    pub fn from_item(item: &Item) -> Result<Self, LeaseError> {
        let what = format!(
            "WorkerMetricStats {}",
            item.get(WORKER_METRIC_STATS_KEY)
                .and_then(Value::as_s)
                .unwrap_or("?")
        );
        let r = Reader::new(&what, item);
        let worker_id = r.s(attr::WORKER_ID)?.to_owned();
        let last_update_time = match r.get(attr::LAST_UPDATE_TIME) {
            None | Some(Value::Null) => None,
            Some(_) => Some(r.int(attr::LAST_UPDATE_TIME)?),
        };
        let metric_stats = number_lists(&r, attr::METRIC_STATS, parse_float)?;
        let operating_range = number_lists(&r, attr::OPERATING_RANGE, parse_int)?;
        let report_interval_ms = match r.get(attr::REPORT_INTERVAL) {
            None | Some(Value::Null) => None,
            Some(_) => u64::try_from(r.int(attr::REPORT_INTERVAL)?).ok(),
        };
        Ok(Self {
            worker_id,
            last_update_time,
            metric_stats,
            operating_range,
            report_interval_ms,
        })
    }

    /// A row without explicit metrics (empty `sts` and `opr`, or one carrying `T`): the
    /// leader balances such a worker by the throughput of its leases.
    pub fn uses_default_metric(&self) -> bool {
        (self.metric_stats.is_empty() && self.operating_range.is_empty())
            || self.metric_stats.contains_key(metric::THROUGHPUT)
    }

    /// Valid as a Java leader judges it: `lut` present, and (unless default metrics) every
    /// metric in `sts` has an `opr` entry and no `opr` entry is empty or has max 0.
    pub fn is_valid(&self) -> bool {
        if self.last_update_time.is_none() {
            return false;
        }
        if self.uses_default_metric() {
            return true;
        }
        self.metric_stats
            .keys()
            .all(|name| self.operating_range.contains_key(name))
            && self
                .operating_range
                .values()
                .all(|range| range.first().is_some_and(|max| *max != 0))
    }

    /// True when a metric's latest value is the failure mark `-1` (never for default
    /// metrics).
    pub fn is_failing(&self) -> bool {
        !self.uses_default_metric()
            && self
                .metric_stats
                .values()
                .any(|values| values.last().is_some_and(|v| *v == FAILED_VALUE))
    }

    /// Fresh at wall-clock `now_secs`: written at most `max_age` ago (a `lut` in the future
    /// counts as fresh).
    pub fn is_fresh(&self, now_secs: i64, max_age: Duration) -> bool {
        let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        self.last_update_time
            .is_some_and(|lut| lut >= now_secs.saturating_sub(max_age))
    }

    /// Counted by a leader at `now_secs`: valid, fresh within `2 × report_interval`, and
    /// not failing.
    pub fn is_active(&self, now_secs: i64, report_interval: Duration) -> bool {
        // A row that says how often it is written is judged by that (in whole seconds and
        // one more, as `lut` is in seconds); any other row as the Java leader does.
        let max_age = match self.report_interval_ms.map(Duration::from_millis) {
            Some(own) if own < report_interval => (own * STALE_AFTER_REPORTS).as_secs() + 1,
            _ => (report_interval * STALE_AFTER_REPORTS).as_secs(),
        };
        self.is_valid()
            && self.is_fresh(now_secs, Duration::from_secs(max_age))
            && !self.is_failing()
    }

    /// The exponential moving average of a metric's values (failure marks skipped; 0 when
    /// none), as a leader computes the metric's current value.
    pub fn average(&self, metric: &str, alpha: f64) -> Option<f64> {
        let values = self.metric_stats.get(metric)?;
        let mut average: Option<f64> = None;
        for v in values.iter().copied().filter(|v| *v != FAILED_VALUE) {
            average = Some(match average {
                None => v,
                Some(a) => alpha * v + (1.0 - alpha) * a,
            });
        }
        Some(average.unwrap_or(0.0))
    }
}

fn number_lists<T>(
    r: &Reader<'_>,
    name: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<BTreeMap<String, Vec<T>>, LeaseError> {
    let map = match r.get(name) {
        None | Some(Value::Null) => return Ok(BTreeMap::new()),
        Some(Value::M(map)) => map,
        Some(other) => {
            return Err(r.malformed(format!("{name} is of type {}, not M", other.type_name())));
        }
    };
    let mut out = BTreeMap::new();
    for (metric, list) in map {
        let Value::L(values) = list else {
            return Err(r.malformed(format!(
                "{name}.{metric} is of type {}, not L",
                list.type_name()
            )));
        };
        let parsed = values
            .iter()
            .map(|v| v.as_n().and_then(&parse))
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| {
                r.malformed(format!(
                    "{name}.{metric} holds a value that is not a number"
                ))
            })?;
        out.insert(metric.clone(), parsed);
    }
    Ok(out)
}

/// Turns utilisation samples into the values of a row, as the Java KCL's reporter does:
/// samples are collected between reports (at most 300 kept); a report appends their average
/// (6 decimals) to each metric's history, or `-1` when there was none, and keeps the last
/// `persisted` values.
#[derive(Clone, Debug)]
pub struct MetricStatsRecorder {
    persisted: usize,
    /// Metric short name to its max utilisation (`opr`).
    ranges: BTreeMap<String, i64>,
    pending: BTreeMap<String, VecDeque<f64>>,
    history: BTreeMap<String, VecDeque<f64>>,
}

/// The most samples kept between two reports (5 minutes at one a second).
pub const MAX_PENDING_SAMPLES: usize = 300;

impl MetricStatsRecorder {
    /// A recorder for these metrics (short name, max utilisation), keeping `persisted`
    /// values per metric (at least 1).
    pub fn new(metrics: impl IntoIterator<Item = (String, i64)>, persisted: usize) -> Self {
        let ranges: BTreeMap<String, i64> = metrics.into_iter().collect();
        Self {
            persisted: persisted.max(1),
            pending: ranges
                .keys()
                .map(|k| (k.clone(), VecDeque::new()))
                .collect(),
            history: ranges
                .keys()
                .map(|k| (k.clone(), VecDeque::new()))
                .collect(),
            ranges,
        }
    }

    /// A recorder of CPU utilisation only (`C`, max 100), keeping 10 values: what the Java
    /// KCL reports by default.
    pub fn cpu() -> Self {
        Self::new([(metric::CPU.to_owned(), 100)], DEFAULT_PERSISTED_VALUES)
    }

    /// Records one sample of `metric` (ignored for a metric this recorder does not report,
    /// or a value that is not finite).
    pub fn record(&mut self, metric: &str, value: f64) {
        if !value.is_finite() {
            return;
        }
        if let Some(queue) = self.pending.get_mut(metric) {
            if queue.len() == MAX_PENDING_SAMPLES {
                queue.pop_front();
            }
            queue.push_back(value);
        }
    }

    /// Closes a report period and returns the row to write for `worker_id` at wall-clock
    /// `now_secs`.
    pub fn report(&mut self, worker_id: &str, now_secs: i64) -> WorkerMetricStats {
        for (metric, queue) in &mut self.pending {
            let value = if queue.is_empty() {
                FAILED_VALUE
            } else {
                let mean = queue.iter().sum::<f64>() / queue.len() as f64;
                (mean * 1e6).round() / 1e6
            };
            queue.clear();
            if let Some(history) = self.history.get_mut(metric) {
                if history.len() == self.persisted {
                    history.pop_front();
                }
                history.push_back(value);
            }
        }
        WorkerMetricStats {
            worker_id: worker_id.to_owned(),
            last_update_time: Some(now_secs),
            metric_stats: self
                .history
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
                .collect(),
            operating_range: self
                .ranges
                .iter()
                .map(|(k, max)| (k.clone(), vec![*max]))
                .collect(),
            report_interval_ms: None,
        }
    }
}

/// Writes `row` as the Java reporter does: an unconditional UpdateItem of `lut`, `sts` and
/// `opr` (other attributes kept). Not called by the worker yet (see the [parent
/// module](super)).
pub async fn write_row(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
    row: &WorkerMetricStats,
) -> Result<(), LeaseError> {
    let update = row.update();
    let call = table.update(&row.worker_id, &update, &Condition::Always);
    bounded(clock, limit, "update", call).await
}

/// The rows of a scan: those that could be read, and the keys of those that could not
/// (with why), which a leader leaves out rather than failing the whole run.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct RowScan {
    /// The rows read.
    pub rows: Vec<WorkerMetricStats>,
    /// Rows that could not be read: their `wid` (or `?`) and the error.
    pub malformed: Vec<(String, LeaseError)>,
}

/// Reads every row of the table (one bounded scan).
pub async fn list_rows(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
) -> Result<RowScan, LeaseError> {
    let items = bounded(clock, limit, "scan", table.scan()).await?;
    let mut scan = RowScan::default();
    for item in &items {
        match WorkerMetricStats::from_item(item) {
            Ok(row) => scan.rows.push(row),
            Err(err) => {
                let key = item
                    .get(WORKER_METRIC_STATS_KEY)
                    .and_then(Value::as_s)
                    .unwrap_or("?")
                    .to_owned();
                tracing::warn!(worker = %key, error = %err, "skipping a WorkerMetricStats row");
                scan.malformed.push((key, err));
            }
        }
    }
    Ok(scan)
}

/// The rows a leader deletes: written more than `max_age` before `now_secs` (the Java KCL:
/// one day), or without `lut` at all.
pub fn stale_rows(
    rows: &[WorkerMetricStats],
    now_secs: i64,
    max_age: Duration,
) -> Vec<&WorkerMetricStats> {
    rows.iter()
        .filter(|r| !r.is_fresh(now_secs, max_age))
        .collect()
}

/// Deletes a stale row unless its worker wrote it again since it was read (condition:
/// `lut` unchanged, as the Java leader deletes). `Ok(false)` when it was rewritten.
pub async fn delete_stale_row(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
    row: &WorkerMetricStats,
) -> Result<bool, LeaseError> {
    let lut = match row.last_update_time {
        Some(lut) => Condition::equals(attr::LAST_UPDATE_TIME, Value::int(lut)),
        None => Condition::not_exists(attr::LAST_UPDATE_TIME),
    };
    let condition = Condition::And(vec![Condition::exists(attr::WORKER_ID), lut]);
    match bounded(
        clock,
        limit,
        "delete",
        table.delete(&row.worker_id, &condition),
    )
    .await
    {
        Ok(()) => Ok(true),
        Err(err) if err.is_condition_failed() => Ok(false),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(values: &[f64]) -> WorkerMetricStats {
        WorkerMetricStats {
            worker_id: "w1".into(),
            last_update_time: Some(1_000),
            metric_stats: BTreeMap::from([("C".into(), values.to_vec())]),
            operating_range: BTreeMap::from([("C".into(), vec![100])]),
            report_interval_ms: None,
        }
    }

    #[test]
    fn rows_round_trip_in_the_java_layout() {
        let r = row(&[12.5, 20.0]);
        let item = r.to_item();
        assert_eq!(item.get("wid"), Some(&Value::s("w1")));
        assert_eq!(item.get("lut"), Some(&Value::N("1000".into())));
        let Some(Value::M(sts)) = item.get("sts") else {
            panic!("sts")
        };
        assert_eq!(
            sts.get("C"),
            Some(&Value::L(vec![
                Value::N("12.5".into()),
                Value::N("20".into())
            ]))
        );
        let Some(Value::M(opr)) = item.get("opr") else {
            panic!("opr")
        };
        assert_eq!(opr.get("C"), Some(&Value::L(vec![Value::N("100".into())])));
        assert_eq!(WorkerMetricStats::from_item(&item).unwrap(), r);
        let update = r.update();
        assert_eq!(update.set.len(), 3);
        assert!(update.set.iter().all(|(name, _)| name != "wid"));
    }

    #[test]
    fn a_java_row_with_empty_maps_is_a_default_metric_row() {
        let item = Item::from([
            ("wid".to_owned(), Value::s("java-1")),
            ("lut".to_owned(), Value::N("1700000000".into())),
            ("sts".to_owned(), Value::M(BTreeMap::new())),
            ("opr".to_owned(), Value::M(BTreeMap::new())),
        ]);
        let r = WorkerMetricStats::from_item(&item).unwrap();
        assert!(r.uses_default_metric());
        assert!(r.is_valid());
        assert!(!r.is_failing());
        assert!(r.is_active(1_700_000_059, DEFAULT_REPORT_INTERVAL));
        assert!(!r.is_active(1_700_000_061, DEFAULT_REPORT_INTERVAL));
    }

    #[test]
    fn malformed_rows_are_named() {
        let mut item = row(&[1.0]).to_item();
        item.insert(
            "sts".into(),
            Value::M(BTreeMap::from([("C".into(), Value::s("x"))])),
        );
        let err = WorkerMetricStats::from_item(&item).unwrap_err().to_string();
        assert!(
            err.contains("WorkerMetricStats w1") && err.contains("sts.C"),
            "{err}"
        );
        item.insert(
            "sts".into(),
            Value::M(BTreeMap::from([(
                "C".into(),
                Value::L(vec![Value::s("1")]),
            )])),
        );
        assert!(WorkerMetricStats::from_item(&item).is_err());
        item.insert("lut".into(), Value::s("now"));
        assert!(WorkerMetricStats::from_item(&item).is_err());
        item.remove("wid");
        assert!(WorkerMetricStats::from_item(&item).is_err());
    }

    #[test]
    fn validity_failure_and_freshness_follow_the_java_rules() {
        assert!(row(&[10.0]).is_valid());
        let mut no_range = row(&[10.0]);
        no_range.operating_range.clear();
        assert!(!no_range.is_valid());
        let mut zero = row(&[10.0]);
        zero.operating_range.insert("C".into(), vec![0]);
        assert!(!zero.is_valid());
        let mut no_lut = row(&[10.0]);
        no_lut.last_update_time = None;
        assert!(!no_lut.is_valid());
        assert!(row(&[10.0, -1.0]).is_failing());
        assert!(!row(&[-1.0, 10.0]).is_failing());
        assert!(row(&[10.0]).is_fresh(1_060, Duration::from_secs(60)));
        assert!(!row(&[10.0]).is_fresh(1_061, Duration::from_secs(60)));
        assert!(!row(&[10.0, -1.0]).is_active(1_000, DEFAULT_REPORT_INTERVAL));
    }

    #[test]
    fn the_average_is_an_ema_that_skips_failures() {
        let r = row(&[10.0, -1.0, 20.0, 40.0]);
        // 10 -> 0.5*20+0.5*10 = 15 -> 0.5*40+0.5*15 = 27.5
        assert_eq!(r.average("C", 0.5), Some(27.5));
        assert_eq!(row(&[-1.0]).average("C", 0.5), Some(0.0));
        assert_eq!(r.average("M", 0.5), None);
    }

    #[test]
    fn the_recorder_averages_periods_and_marks_empty_ones() {
        let mut rec = MetricStatsRecorder::new([("C".to_owned(), 100)], 3);
        rec.record("C", 10.0);
        rec.record("C", 20.0);
        rec.record("X", 99.0);
        rec.record("C", f64::NAN);
        let first = rec.report("w", 100);
        assert_eq!(first.metric_stats["C"], vec![15.0]);
        assert_eq!(first.operating_range["C"], vec![100]);
        assert_eq!(first.last_update_time, Some(100));
        let second = rec.report("w", 130);
        assert_eq!(second.metric_stats["C"], vec![15.0, FAILED_VALUE]);
        assert!(second.is_failing());
        for v in [1.0, 2.0] {
            rec.record("C", v);
            rec.report("w", 160);
        }
        let last = rec.report("w", 190);
        assert_eq!(
            last.metric_stats["C"],
            vec![1.0, 2.0, FAILED_VALUE],
            "keeps the last 3"
        );
        for i in 0..400 {
            rec.record("C", f64::from(i));
        }
        // Only the last 300 samples (100..=399) count.
        assert_eq!(rec.report("w", 220).metric_stats["C"].last(), Some(&249.5));
        assert_eq!(
            MetricStatsRecorder::cpu().report("w", 1).metric_stats["C"],
            vec![-1.0]
        );
    }
    #[tokio::test]
    async fn rows_are_written_listed_and_stale_ones_deleted_unless_rewritten() {
        use crate::test_util::ManualClock;
        use crate::v3::memory::InMemoryStateTable;
        let clock = ManualClock::new();
        let limit = Duration::from_secs(2);
        let t = InMemoryStateTable::existing("app-WorkerMetricStats", "wid");
        let mut old = row(&[10.0]);
        old.worker_id = "old".into();
        write_row(&t, &clock, limit, &old).await.unwrap();
        let fresh = WorkerMetricStats {
            last_update_time: Some(1_000 + 86_400),
            ..row(&[20.0])
        };
        write_row(&t, &clock, limit, &fresh).await.unwrap();
        t.seed(Item::from([
            ("wid".to_owned(), Value::s("bad")),
            ("lut".to_owned(), Value::s("yesterday")),
        ]))
        .unwrap();
        let scan = list_rows(&t, &clock, limit).await.unwrap();
        assert_eq!(scan.rows.len(), 2);
        assert_eq!(scan.malformed.len(), 1);
        assert_eq!(scan.malformed[0].0, "bad");
        let now = 1_000 + 86_401;
        let stale = stale_rows(&scan.rows, now, DEFAULT_STALE_ROW_CLEANUP);
        assert_eq!(
            stale
                .iter()
                .map(|r| r.worker_id.as_str())
                .collect::<Vec<_>>(),
            ["old"]
        );
        // The old worker came back and wrote again after the scan: its row stays.
        let back = WorkerMetricStats {
            last_update_time: Some(now),
            ..old.clone()
        };
        write_row(&t, &clock, limit, &back).await.unwrap();
        assert!(!delete_stale_row(&t, &clock, limit, stale[0]).await.unwrap());
        assert!(t.peek("old").is_some());
        assert!(delete_stale_row(&t, &clock, limit, &back).await.unwrap());
        assert!(t.peek("old").is_none());
    }
}
