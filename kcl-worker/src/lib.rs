//! The worker of the Kinesis Client Library for Rust.
//!
//! A [`Worker`] lists the stream's shards, keeps a lease per shard in the lease table
//! (DynamoDB, compatible with the Java KCL 2.x), shares the leases with the other workers
//! of the application (by the Java KCL 2.x lease taker, or in the KCL 3.x protocol by a
//! leader's assignment: [`WorkerConfig::client_version_config`]), and runs one record
//! processor per lease it holds: polling the shard, deaggregating KPL records, and checkpointing through
//! a fenced [`kcl_interfaces::Checkpointer`].
//!
//! AWS SDK types appear only in [`aws`]; everything else speaks this crate's own types, so
//! any [`stream::StreamClient`] and [`kcl_lease::LeaseStore`] can be plugged in
//! (in-memory ones are in `test_util` and `kcl_lease::test_util`, feature `test-util`).
//!
//! # Example
//!
//! A processor, and a worker on the in-memory Kinesis and lease table of the `test-util`
//! feature (with no `stream_client` / `lease_store` given, [`WorkerBuilder::build`] creates
//! the AWS ones, from the environment and the `aws::AwsOptions` given to
//! [`WorkerBuilder::aws`]):
//!
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use kcl_interfaces::{InitializationInput, ProcessRecordsInput, RecordProcessor, ShutdownInput, ShutdownReason};
//! use kcl_worker::{InitialPosition, Worker, WorkerConfig};
//!
//! struct Count(Arc<AtomicUsize>);
//!
//! impl RecordProcessor for Count {
//!     async fn initialize(&mut self, _: InitializationInput) {}
//!     async fn process_records(&mut self, input: ProcessRecordsInput) {
//!         self.0.fetch_add(input.records.len(), Ordering::SeqCst);
//!         let _ = input.checkpointer.checkpoint().await;
//!     }
//!     async fn shutdown(&mut self, input: ShutdownInput) {
//!         if input.shutdown_reason != ShutdownReason::Zombie {
//!             let _ = input.checkpointer.checkpoint().await;
//!         }
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let kinesis = kcl_worker::test_util::InMemoryKinesis::new();
//! kinesis.create_stream("clicks", 4).unwrap();
//! for i in 0..100 {
//!     kinesis.put_record("clicks", &format!("user-{i}"), None, "click".into()).unwrap();
//! }
//! let seen = Arc::new(AtomicUsize::new(0));
//! let counter = seen.clone();
//! let config = WorkerConfig::builder("click-counter", "clicks")
//!     .initial_position(InitialPosition::TrimHorizon)
//!     .build()?;
//! let worker = Worker::builder(config, move || Count(counter.clone()))
//!     .stream_client(Arc::new(kinesis))
//!     .lease_store(Arc::new(kcl_lease::test_util::InMemoryLeaseStore::new()))
//!     .build()
//!     .await?
//!     .start()
//!     .await?;
//! while seen.load(Ordering::SeqCst) < 100 {
//!     tokio::time::sleep(std::time::Duration::from_millis(100)).await;
//! }
//! worker.shutdown().await?;
//! # Ok::<(), kcl_worker::WorkerError>(())
//! # }).unwrap();
//! ```

#[cfg(any(feature = "kinesis", feature = "dynamodb"))]
pub mod aws;
mod backoff;
mod checkpointer;
mod config;
mod consumer;
mod error;
#[cfg(any(feature = "prometheus", feature = "cloudwatch"))]
pub mod export;
mod fanout;
mod fetcher;
mod health;
pub mod metrics;
mod shard_sync;
pub mod stream;
#[cfg(feature = "test-util")]
pub mod test_util;
mod worker;

pub use config::{
    ClientVersionConfig, DEFAULT_EVENT_TIMEOUT, DEFAULT_REGISTRATION_TIMEOUT,
    DEFAULT_SHARD_END_PROBE_INTERVAL, FanOutConfig, InitialPosition, RetrievalConfig, WorkerConfig,
    WorkerConfigBuilder,
};
pub use error::{ConfigError, WorkerError};
pub use health::{ShardFailure, ShardHealth};
pub use shard_sync::SyncReport;
pub use worker::{ShutdownReport, Worker, WorkerBuilder, WorkerHandle};

pub use kcl_interfaces;
pub use kcl_lease;

/// The README's examples, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
