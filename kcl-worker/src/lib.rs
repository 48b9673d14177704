//! The worker of the Kinesis Client Library for Rust.
//!
//! A [`Worker`] lists the stream's shards, keeps a lease per shard in the lease table
//! (DynamoDB, compatible with the Java KCL 2.x), shares the leases with the other workers
//! of the application through the lease coordinator, and runs one record processor per
//! lease it holds: polling the shard, deaggregating KPL records, and checkpointing through
//! a fenced [`kcl_interfaces::Checkpointer`].
//!
//! AWS SDK types appear only in [`aws`]; everything else speaks this crate's own types, so
//! any [`stream::StreamClient`] and [`kcl_lease::LeaseStore`] can be plugged in
//! (`kcl-testkit` has in-memory ones).

pub mod aws;
mod backoff;
mod checkpointer;
mod config;
mod consumer;
mod error;
mod fetcher;
pub mod metrics;
mod shard_sync;
pub mod stream;
mod worker;

pub use config::{InitialPosition, WorkerConfig, WorkerConfigBuilder};
pub use error::{ConfigError, WorkerError};
pub use shard_sync::SyncReport;
pub use worker::{ShutdownReport, Worker, WorkerBuilder, WorkerHandle};

pub use kcl_interfaces;
pub use kcl_lease;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
