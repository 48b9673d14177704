//! Configuration of the lease coordinator.

use std::time::Duration;

use crate::{CallTimeouts, LeaseError};

/// The shortest accepted `failover_time`.
pub const MIN_FAILOVER_TIME: Duration = Duration::from_millis(100);

/// The longest `failover_time` accepted (a week; longer is certainly a mistake and would
/// overflow clock arithmetic).
pub const MAX_FAILOVER_TIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// The default `failover_time` (10 s, as in the Java KCL).
pub const DEFAULT_FAILOVER_TIME: Duration = Duration::from_secs(10);

/// The default `handoff_timeout` (30 s, the Java KCL's graceful handoff timeout).
pub const DEFAULT_HANDOFF_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest `handoff_timeout` accepted (a day).
pub const MAX_HANDOFF_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Settings of a [`LeaseCoordinator`](super::LeaseCoordinator).
///
/// Option names are those of the Java KCL. Build with [`LeaseCoordinatorConfig::new`]
/// and the `with_*` methods; [`LeaseCoordinatorConfig::validate`] (also called by
/// [`LeaseCoordinator::new`](super::LeaseCoordinator::new)) rejects bad values with
/// [`LeaseError::InvalidConfig`] naming the option.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LeaseCoordinatorConfig {
    /// This worker's id, written as `leaseOwner`. Must not be empty.
    pub worker_id: String,
    /// How long a lease whose counter does not change is considered still held by its
    /// owner (default 10 s, at least [`MIN_FAILOVER_TIME`]). Renewals run every third of
    /// it, the taker about every half of it.
    pub failover_time: Duration,
    /// The most leases this worker takes (default unlimited). At least 1.
    pub max_leases_for_worker: usize,
    /// The most leases stolen from other workers in one taker pass without a graceful
    /// handoff (default 1; at least 1): only on a lease store that does not implement the
    /// handoff writes. Graceful handoffs are bounded by what the worker is owed instead (see
    /// the [coordinator docs](super#taking-handing-over-balancing)).
    pub max_leases_to_steal_at_one_time: usize,
    /// The bounds on every lease store call the coordinator makes (default
    /// [`CallTimeouts::default`]): a call still pending after `call_timeouts.call` is
    /// abandoned as [`LeaseError::Timeout`], a retryable error. Renewals are also bounded
    /// by the renewal round's deadline (one renewal interval), whichever is shorter.
    pub call_timeouts: CallTimeouts,
    /// How long a graceful handoff may take (default 30 s, as the Java KCL's
    /// `gracefulLeaseHandoffTimeoutMillis`; zero to [`MAX_HANDOFF_TIMEOUT`]). A handoff to
    /// this worker not completed by its current owner within it is completed by this worker
    /// (a steal); a lease in a handoff to another worker is never free nor asked for, and
    /// expired only once its owners stood still for `failover_time + handoff_timeout`.
    pub handoff_timeout: Duration,
}

impl LeaseCoordinatorConfig {
    /// Defaults for `worker_id`: failover 10 s, no lease limit, steal one at a time.
    pub fn new(worker_id: impl Into<String>) -> Self {
        Self {
            worker_id: worker_id.into(),
            failover_time: DEFAULT_FAILOVER_TIME,
            max_leases_for_worker: usize::MAX,
            max_leases_to_steal_at_one_time: 1,
            call_timeouts: CallTimeouts::default(),
            handoff_timeout: DEFAULT_HANDOFF_TIMEOUT,
        }
    }

    /// Sets `failover_time`.
    pub fn with_failover_time(mut self, failover_time: Duration) -> Self {
        self.failover_time = failover_time;
        self
    }

    /// Sets `max_leases_for_worker`.
    pub fn with_max_leases_for_worker(mut self, max: usize) -> Self {
        self.max_leases_for_worker = max;
        self
    }

    /// Sets `max_leases_to_steal_at_one_time`.
    pub fn with_max_leases_to_steal_at_one_time(mut self, max: usize) -> Self {
        self.max_leases_to_steal_at_one_time = max;
        self
    }

    /// Sets `call_timeouts`.
    pub fn with_call_timeouts(mut self, call_timeouts: CallTimeouts) -> Self {
        self.call_timeouts = call_timeouts;
        self
    }

    /// Sets `handoff_timeout`.
    pub fn with_handoff_timeout(mut self, handoff_timeout: Duration) -> Self {
        self.handoff_timeout = handoff_timeout;
        self
    }

    /// How long a lease in a graceful handoff (with a `checkpointOwner`) must stay unchanged
    /// to count as expired: `failover_time + handoff_timeout`.
    pub fn handoff_expiry(&self) -> Duration {
        self.failover_time.saturating_add(self.handoff_timeout)
    }

    /// Checks every value; the error names the first bad option.
    pub fn validate(&self) -> Result<(), LeaseError> {
        if self.worker_id.trim().is_empty() {
            return Err(LeaseError::InvalidConfig {
                option: "worker_id",
                reason: "must not be empty".to_owned(),
            });
        }
        if self.failover_time < MIN_FAILOVER_TIME {
            return Err(LeaseError::InvalidConfig {
                option: "failover_time",
                reason: format!(
                    "{:?} is shorter than the minimum {:?}",
                    self.failover_time, MIN_FAILOVER_TIME
                ),
            });
        }
        if self.failover_time > MAX_FAILOVER_TIME {
            return Err(LeaseError::InvalidConfig {
                option: "failover_time",
                reason: format!(
                    "{:?} is longer than the maximum {:?}",
                    self.failover_time, MAX_FAILOVER_TIME
                ),
            });
        }
        if self.max_leases_for_worker == 0 {
            return Err(LeaseError::InvalidConfig {
                option: "max_leases_for_worker",
                reason: "must be at least 1".to_owned(),
            });
        }
        if self.max_leases_to_steal_at_one_time == 0 {
            return Err(LeaseError::InvalidConfig {
                option: "max_leases_to_steal_at_one_time",
                reason: "must be at least 1".to_owned(),
            });
        }
        if self.handoff_timeout > MAX_HANDOFF_TIMEOUT {
            return Err(LeaseError::InvalidConfig {
                option: "handoff_timeout",
                reason: format!(
                    "{:?} is longer than the maximum {:?}",
                    self.handoff_timeout, MAX_HANDOFF_TIMEOUT
                ),
            });
        }
        self.call_timeouts.validate()
    }

    /// Time between two renewal rounds: `failover_time / 3`.
    pub fn renew_interval(&self) -> Duration {
        self.failover_time / 3
    }

    /// The longest time between two taker passes: `failover_time / 2`. Each pass waits this
    /// minus a random jitter of up to [`LeaseCoordinatorConfig::take_jitter`].
    pub fn take_interval(&self) -> Duration {
        self.failover_time / 2
    }

    /// How long after its first pass (the fleet discovery pass, which takes one lease at
    /// most) the taker runs again: `failover_time / 5`. Workers starting within that time of
    /// each other see each other at their second pass and take fair shares.
    pub fn discovery_delay(&self) -> Duration {
        self.failover_time / 5
    }

    /// How often the taker runs while handoffs to this worker are in flight, so it takes a
    /// handed-over lease soon after its current owner completes the handoff:
    /// `failover_time / 8` (a quarter of the taker interval).
    pub fn handoff_poll_interval(&self) -> Duration {
        self.failover_time / 8
    }

    /// The largest jitter subtracted from the taker interval: `failover_time / 10`.
    pub fn take_jitter(&self) -> Duration {
        self.failover_time / 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn option_of(config: &LeaseCoordinatorConfig) -> &'static str {
        match config.validate() {
            Err(LeaseError::InvalidConfig { option, .. }) => option,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let config = LeaseCoordinatorConfig::new("w1");
        config.validate().unwrap();
        assert_eq!(config.failover_time, Duration::from_secs(10));
        assert_eq!(config.max_leases_for_worker, usize::MAX);
        assert_eq!(config.max_leases_to_steal_at_one_time, 1);
        assert_eq!(config.call_timeouts, CallTimeouts::default());
        assert_eq!(config.handoff_timeout, Duration::from_secs(30));
        assert_eq!(config.handoff_expiry(), Duration::from_secs(40));
        assert_eq!(config.renew_interval(), Duration::from_secs(10) / 3);
        assert_eq!(config.take_interval(), Duration::from_secs(5));
        assert_eq!(config.take_jitter(), Duration::from_secs(1));
    }

    #[test]
    fn bad_values_name_the_option() {
        assert_eq!(option_of(&LeaseCoordinatorConfig::new("")), "worker_id");
        assert_eq!(option_of(&LeaseCoordinatorConfig::new("  ")), "worker_id");
        let base = LeaseCoordinatorConfig::new("w");
        assert_eq!(
            option_of(&base.clone().with_failover_time(Duration::ZERO)),
            "failover_time"
        );
        assert_eq!(
            option_of(&base.clone().with_failover_time(Duration::from_millis(99))),
            "failover_time"
        );
        base.clone()
            .with_failover_time(MIN_FAILOVER_TIME)
            .validate()
            .unwrap();
        assert_eq!(
            option_of(&base.clone().with_max_leases_for_worker(0)),
            "max_leases_for_worker"
        );
        assert_eq!(
            option_of(&base.clone().with_max_leases_to_steal_at_one_time(0)),
            "max_leases_to_steal_at_one_time"
        );
        assert_eq!(
            option_of(
                &base
                    .clone()
                    .with_handoff_timeout(MAX_HANDOFF_TIMEOUT + Duration::from_secs(1))
            ),
            "handoff_timeout"
        );
        base.clone()
            .with_handoff_timeout(Duration::ZERO)
            .validate()
            .unwrap();
        base.clone()
            .with_handoff_timeout(MAX_HANDOFF_TIMEOUT)
            .validate()
            .unwrap();
        let zero = Duration::ZERO;
        let secs = Duration::from_secs;
        assert_eq!(
            option_of(
                &base
                    .clone()
                    .with_call_timeouts(CallTimeouts::new(zero, secs(10)))
            ),
            "call_attempt_timeout"
        );
        assert_eq!(
            option_of(
                &base
                    .clone()
                    .with_call_timeouts(CallTimeouts::new(secs(4), zero))
            ),
            "call_timeout"
        );
        assert_eq!(
            option_of(&base.with_call_timeouts(CallTimeouts::new(secs(4), secs(2)))),
            "call_timeout"
        );
    }

    #[test]
    fn error_message_names_option() {
        let err = LeaseCoordinatorConfig::new("w")
            .with_max_leases_for_worker(0)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("max_leases_for_worker"), "{err}");
        assert!(!err.is_retryable());
    }
}
