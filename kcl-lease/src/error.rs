//! The error type of this crate.

use std::error::Error as StdError;
use std::time::Duration;

/// A boxed error cause.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Errors of lease storage and coordination.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The write's condition did not hold: the lease was lost, taken or changed since it was
    /// last seen (or, for a create, it exists already).
    #[error("lease {lease_key} was changed or lost (conditional write failed)")]
    ConditionFailed {
        /// The lease key.
        lease_key: String,
    },
    /// The lease does not exist.
    #[error("lease {lease_key} does not exist")]
    NotFound {
        /// The lease key.
        lease_key: String,
    },
    /// The store throttled the call; retry later.
    #[error("lease store throttled the request")]
    Throttled {
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The lease table does not exist.
    #[error("lease table {table} does not exist")]
    TableMissing {
        /// The table name.
        table: String,
    },
    /// The store could not be reached (network, timeout).
    #[error("lease store unreachable")]
    Unreachable {
        /// The transport error.
        #[source]
        source: BoxError,
    },
    /// A store call did not answer within its bound (`call_timeout`, or the renewal
    /// round's deadline) and was abandoned; retry later.
    #[error("lease store call {operation} did not answer within {after:?}")]
    Timeout {
        /// The store call, e.g. `renew_lease`.
        operation: &'static str,
        /// The bound that passed.
        after: Duration,
    },
    /// The store answered with another error.
    #[error("lease store error")]
    Service {
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// The store refused the request for good (invalid request, access denied, bad
    /// credentials): retrying cannot help.
    #[error("lease store rejected the request")]
    Rejected {
        /// The store's error.
        #[source]
        source: BoxError,
    },
    /// A row in the table could not be read as a lease.
    #[error("malformed lease {lease_key}: {reason}")]
    MalformedLease {
        /// The lease key (or `?` when missing).
        lease_key: String,
        /// What is wrong.
        reason: String,
    },
    /// The lease is not held by this worker.
    #[error("lease {lease_key} is not held by this worker")]
    NotHeld {
        /// The lease key.
        lease_key: String,
    },
    /// The store does not implement this call (a graceful handoff on a store that predates
    /// it): the caller does without it.
    #[error("lease store call {operation} is not supported by this store")]
    Unsupported {
        /// The store call, e.g. `initiate_handoff`.
        operation: &'static str,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration value for {option}: {reason}")]
    InvalidConfig {
        /// The option's name.
        option: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

impl LeaseError {
    /// Whether the same call may succeed when retried later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LeaseError::Throttled { .. }
                | LeaseError::Unreachable { .. }
                | LeaseError::Service { .. }
                | LeaseError::Timeout { .. }
        )
    }

    /// True for [`LeaseError::ConditionFailed`].
    pub fn is_condition_failed(&self) -> bool {
        matches!(self, LeaseError::ConditionFailed { .. })
    }
}

/// Displays an error and its causes on one line (`a: b: c`), for logs (errors here never
/// repeat their cause in their own message, so the chain is what a reader needs).
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn StdError);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}
