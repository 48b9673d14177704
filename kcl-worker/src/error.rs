//! Errors of the worker.

use kcl_lease::LeaseError;

use crate::stream::StreamError;

/// An invalid configuration value.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The option has an invalid value.
    #[error("invalid value for option {option}: {reason}")]
    Invalid {
        /// The option's name, as in [`crate::WorkerConfig`].
        option: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// A required part was not given to the builder.
    #[error("missing {what}")]
    Missing {
        /// What is missing.
        what: &'static str,
    },
}

/// Why the worker could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// The configuration is invalid.
    #[error("invalid worker configuration")]
    Config(#[from] ConfigError),
    /// The lease store failed.
    #[error("lease store failed")]
    Lease(#[from] LeaseError),
    /// Kinesis failed.
    #[error("stream access failed")]
    Stream(#[from] StreamError),
    /// The worker's task ended abnormally.
    #[error("worker task failed: {message}")]
    Task {
        /// What happened.
        message: String,
    },
    /// The worker's task panicked or was cancelled.
    #[error("worker task failed")]
    Join(#[source] tokio::task::JoinError),
}

impl WorkerError {
    /// Whether retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            WorkerError::Lease(e) => e.is_retryable(),
            WorkerError::Stream(e) => e.is_retryable(),
            _ => false,
        }
    }
}
