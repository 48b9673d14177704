//! Waiting for a condition on an injected clock: [`wait_until`].

use std::time::Duration;

use kcl_lease::Clock;
use kcl_lease::timeouts::within;

/// How often [`wait_until`] looks at its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A condition that did not hold within its limit.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("timed out ({limit:?} on the clock) waiting for {what}")]
#[non_exhaustive]
pub struct TimedOut {
    /// What was waited for.
    pub what: String,
    /// How long it was waited for.
    pub limit: Duration,
}

/// Looks at `condition` every [`POLL_INTERVAL`] on `clock` until it holds, for at most
/// `limit` (bounded with [`within`]). Returns how long it took on the clock, or
/// [`TimedOut`] naming `what`.
///
/// On [`kcl_lease::SystemClock`] under tokio's paused clock the wait is virtual; on a manual
/// clock the test advances time while it waits.
pub async fn wait_until(
    clock: &dyn Clock,
    limit: Duration,
    what: &str,
    mut condition: impl FnMut() -> bool,
) -> Result<Duration, TimedOut> {
    let start = clock.now();
    let polling = async {
        while !condition() {
            clock.sleep(POLL_INTERVAL).await;
        }
    };
    match within(clock, limit, polling).await {
        Some(()) => Ok(clock.now().saturating_duration_since(start)),
        None => Err(TimedOut {
            what: what.to_owned(),
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl_lease::SystemClock;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn waits_until_the_condition_holds_or_the_limit_passes() {
        let clock = SystemClock;
        let calls = Cell::new(0);
        let took = wait_until(&clock, Duration::from_secs(1), "three looks", || {
            calls.set(calls.get() + 1);
            calls.get() == 3
        })
        .await
        .unwrap();
        assert_eq!(took, 2 * POLL_INTERVAL);
        let err = wait_until(&clock, Duration::from_secs(1), "never", || false)
            .await
            .unwrap_err();
        assert_eq!(err.what, "never");
        assert_eq!(
            err.to_string(),
            "timed out (1s on the clock) waiting for never"
        );
    }
}
