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
    /// The application runs the Java KCL 3.x lease protocol (its coordinator state records
    /// `client_version`, `CLIENT_VERSION_3X` or `CLIENT_VERSION_3X_WITH_ROLLBACK`), which
    /// this worker does not speak: it would take leases a Java leader assigned.
    #[error(
        "the application is in the Java KCL 3.x mode (client version {client_version} in its \
         coordinator state table); this worker speaks the 2.x lease protocol only: run the Java \
         workers with clientVersionConfig = CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X, or roll \
         the application back to 2.x (the rollback of the KCL migration tool) before starting it"
    )]
    UnsupportedClientVersion {
        /// The client version recorded.
        client_version: String,
    },
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
