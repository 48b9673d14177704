//! Bounds on every call to a remote service, and the one way to apply them on the injected
//! clock.
//!
//! A call that hangs (a dead NAT or load balancer keeps the connection open and never
//! answers) must become an error within seconds, never a stall. Two bounds do that:
//!
//! * `call_attempt_timeout` bounds one attempt (one HTTP request) of a call; the AWS SDK
//!   then retries on a fresh connection;
//! * `call_timeout` bounds the whole call, retries included. The AWS adapters give both to
//!   the SDK's timeout configuration, and the lease coordinator and the worker also bound
//!   every call they make to any [`LeaseStore`](crate::LeaseStore) or stream client with
//!   `call_timeout` on the injected [`Clock`] (so a fake that hangs is bounded the same way,
//!   and tests run on a manual clock).

use std::future::Future;
use std::time::Duration;

use crate::{Clock, LeaseError};

/// The default bound on one attempt of a call (4 s).
pub const DEFAULT_CALL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);
/// The default bound on a whole call, retries included (10 s).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest accepted timeout.
pub const MIN_CALL_TIMEOUT: Duration = Duration::from_millis(50);
/// The longest accepted timeout (5 minutes: longer is a stall in all but name).
pub const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(300);

/// The two bounds on a remote call. See the [module documentation](self).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct CallTimeouts {
    /// One attempt of a call (default [`DEFAULT_CALL_ATTEMPT_TIMEOUT`]).
    pub attempt: Duration,
    /// The whole call, retries included (default [`DEFAULT_CALL_TIMEOUT`]); at least
    /// `attempt`.
    pub call: Duration,
}

impl Default for CallTimeouts {
    fn default() -> Self {
        Self {
            attempt: DEFAULT_CALL_ATTEMPT_TIMEOUT,
            call: DEFAULT_CALL_TIMEOUT,
        }
    }
}

impl CallTimeouts {
    /// Both bounds.
    pub fn new(attempt: Duration, call: Duration) -> Self {
        Self { attempt, call }
    }

    /// Checks both bounds; the error names the option (`call_attempt_timeout`,
    /// `call_timeout`).
    pub fn validate(&self) -> Result<(), LeaseError> {
        for (option, value) in [
            ("call_attempt_timeout", self.attempt),
            ("call_timeout", self.call),
        ] {
            if !(MIN_CALL_TIMEOUT..=MAX_CALL_TIMEOUT).contains(&value) {
                return Err(LeaseError::InvalidConfig {
                    option,
                    reason: format!(
                        "{value:?} is outside {MIN_CALL_TIMEOUT:?}..={MAX_CALL_TIMEOUT:?}"
                    ),
                });
            }
        }
        if self.call < self.attempt {
            return Err(LeaseError::InvalidConfig {
                option: "call_timeout",
                reason: format!(
                    "{:?} is shorter than call_attempt_timeout {:?}",
                    self.call, self.attempt
                ),
            });
        }
        Ok(())
    }
}

/// Runs `fut` for at most `limit` on `clock`: `None` when the limit passed first (the
/// future is dropped, which cancels the call).
pub async fn within<T>(
    clock: &dyn Clock,
    limit: Duration,
    fut: impl Future<Output = T>,
) -> Option<T> {
    // A result that is ready wins over a limit that has run out (a zero limit still takes
    // what is already there).
    tokio::select! {
        biased;
        out = fut => Some(out),
        () = clock.sleep(limit) => None,
    }
}
