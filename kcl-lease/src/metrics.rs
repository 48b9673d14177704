//! The metrics of the lease coordinator, named as the Java KCL names them, and the metric
//! levels and dimension names the whole library shares.
//!
//! Every metric goes through the `metrics` facade with dimensions as labels (`Operation`
//! always, then `ShardId` or `WorkerIdentifier`) and its Java KCL level as the facade's
//! level: [`SUMMARY`] (`metrics::Level::INFO`) or [`DETAILED`] (`metrics::Level::DEBUG`).
//! An exporter of `kcl_worker::export` drops what `metricsLevel` and
//! `metricsEnabledDimensions` leave out; an exporter installed directly sees everything.
//!
//! Per Java KCL naming, a `.Success` metric is a sample of 1 (success) or 0 (failure) per call
//! (its mean is the success rate) and a `.Time` metric a sample of the call's duration in
//! milliseconds; both are histograms here.

use std::fmt;
use std::str::FromStr;

/// The facade level of the Java KCL's `SUMMARY` metrics.
pub const SUMMARY: metrics::Level = metrics::Level::INFO;
/// The facade level of the Java KCL's `DETAILED` metrics.
pub const DETAILED: metrics::Level = metrics::Level::DEBUG;

/// Which metrics are published: the Java KCL's `MetricsLevel` (option `metricsLevel`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Default, Hash)]
#[non_exhaustive]
pub enum MetricsLevel {
    /// Nothing.
    None,
    /// The most significant metrics only.
    Summary,
    /// Everything (the Java KCL's default).
    #[default]
    Detailed,
}

impl MetricsLevel {
    /// `NONE`, `SUMMARY` or `DETAILED`.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricsLevel::None => "NONE",
            MetricsLevel::Summary => "SUMMARY",
            MetricsLevel::Detailed => "DETAILED",
        }
    }

    /// Whether a metric recorded at the facade level `level` is published at this level.
    pub fn publishes(self, level: &metrics::Level) -> bool {
        match self {
            MetricsLevel::None => false,
            MetricsLevel::Summary => *level >= SUMMARY,
            MetricsLevel::Detailed => *level >= DETAILED,
        }
    }
}

impl fmt::Display for MetricsLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `metricsLevel` value that is not `NONE`, `SUMMARY` or `DETAILED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a metrics level (NONE, SUMMARY or DETAILED)")]
pub struct BadMetricsLevel(pub String);

impl FromStr for MetricsLevel {
    type Err = BadMetricsLevel;
    /// `NONE`, `SUMMARY` or `DETAILED`, in any case (as the Java KCL reads it).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "NONE" => Ok(MetricsLevel::None),
            "SUMMARY" => Ok(MetricsLevel::Summary),
            "DETAILED" => Ok(MetricsLevel::Detailed),
            _ => Err(BadMetricsLevel(s.to_owned())),
        }
    }
}

/// Dimension (label) names.
pub mod dimension {
    /// The operation a metric belongs to; always published.
    pub const OPERATION: &str = "Operation";
    /// The shard.
    pub const SHARD_ID: &str = "ShardId";
    /// The worker.
    pub const WORKER_IDENTIFIER: &str = "WorkerIdentifier";
}

/// `Operation` values.
pub mod operation {
    /// A renewal round (dimension `WorkerIdentifier`).
    pub const RENEW_ALL_LEASES: &str = "RenewAllLeases";
    /// A taker pass (dimension `WorkerIdentifier`).
    pub const TAKE_LEASES: &str = "TakeLeases";
    /// Reading and processing a shard (dimension `ShardId`).
    pub const PROCESS_TASK: &str = "ProcessTask";
}

/// `RenewAllLeases`, SUMMARY: leases lost in the round.
pub const LOST_LEASES: &str = "LostLeases";
/// `RenewAllLeases`, SUMMARY: leases held after the round.
pub const CURRENT_LEASES: &str = "CurrentLeases";
/// `RenewAllLeases` / `TakeLeases`, SUMMARY: 1 when the round or pass succeeded, else 0.
pub const SUCCESS: &str = "Success";
/// `RenewAllLeases` / `TakeLeases`, SUMMARY: the round's or pass's duration, ms.
pub const TIME: &str = "Time";
/// `RenewAllLeases`, DETAILED: 1 per renewal that succeeded, 0 per one that failed.
pub const RENEW_LEASE_SUCCESS: &str = "RenewLease.Success";
/// `RenewAllLeases`, DETAILED: duration of one renewal, ms.
pub const RENEW_LEASE_TIME: &str = "RenewLease.Time";
/// `TakeLeases`, DETAILED: 1 per take that succeeded, 0 per one that failed.
pub const TAKE_LEASE_SUCCESS: &str = "TakeLease.Success";
/// `TakeLeases`, SUMMARY: leases taken (stolen included) in the pass.
pub const TAKEN_LEASES: &str = "TakenLeases";
/// `TakeLeases`, SUMMARY: workers seen in the table (this one included).
pub const NUM_WORKERS: &str = "NumWorkers";
/// `TakeLeases`, DETAILED: leases in the table.
pub const TOTAL_LEASES: &str = "TotalLeases";
/// `TakeLeases`, DETAILED: leases this worker wanted to take in the pass.
pub const NEEDED_LEASES: &str = "NeededLeases";

/// The labels of a coordinator metric: `Operation` and `WorkerIdentifier`.
pub fn worker_labels(operation: &'static str, worker_id: &str) -> Vec<metrics::Label> {
    vec![
        metrics::Label::new(dimension::OPERATION, operation),
        metrics::Label::new(dimension::WORKER_IDENTIFIER, worker_id.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!("summary".parse::<MetricsLevel>(), Ok(MetricsLevel::Summary));
        assert_eq!("NONE".parse::<MetricsLevel>(), Ok(MetricsLevel::None));
        assert!("verbose".parse::<MetricsLevel>().is_err());
        assert!(MetricsLevel::Detailed.publishes(&DETAILED));
        assert!(MetricsLevel::Detailed.publishes(&SUMMARY));
        assert!(MetricsLevel::Summary.publishes(&SUMMARY));
        assert!(!MetricsLevel::Summary.publishes(&DETAILED));
        assert!(!MetricsLevel::None.publishes(&SUMMARY));
    }
}
