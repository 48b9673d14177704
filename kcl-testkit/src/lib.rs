//! Test kit for the Kinesis Client Library: a processor harness, an in-memory Kinesis and
//! lease store that behave like the real services, a manual clock, fixtures that start local
//! emulators, and a multi-worker simulation.
//!
//! # Features
//!
//! Everything is on by default. A crate that only unit-tests its record processor turns the
//! default features off and gets [`harness`] alone, on `kcl-interfaces` (no AWS SDK, no
//! `kcl-worker`, no tokio in its dependency tree):
//!
//! ```toml
//! [dev-dependencies]
//! kcl-testkit = { version = "0.1", default-features = false }
//! ```
//!
//! | feature | what it adds |
//! |---|---|
//! | (none) | [`harness`]: `ProcessorHarness`, `RecordingCheckpointer` |
//! | `lease` | `lease_store` (`InMemoryLeaseStore`), `clock` (`ManualClock`), `conformance` (re-exported from `kcl_lease::test_util`) |
//! | `kinesis` | `kinesis` (`InMemoryKinesis`, re-exported from `kcl_worker::test_util`), `recording`, `kinesis::scenario`; implies `lease` |
//! | `emulators` | `emulators` (kinesis-local, dynalite and moto on 127.0.0.1, SDK clients for them), `fault_proxy` |
//! | `simulation` | `simulation`; implies `kinesis` |
//!
//! - [`harness::ProcessorHarness`]: unit-test one record processor in milliseconds.
//! - [`InMemoryKinesis`] and [`InMemoryLeaseStore`]: run real `kcl_worker::Worker`s with no
//!   network (conditional writes really evaluated, shards really split and merged, faults
//!   injectable). On tokio's paused clock, minutes of lease timing take milliseconds.
//! - [`ManualClock`]: a clock the test moves, for lease and back-off logic.
//! - [`conformance`]: the lease store conformance suite, to check your own `LeaseStore`.
//! - [`emulators`]: start kinesis-local, dynalite or moto on 127.0.0.1 for integration tests.
//! - [`fault_proxy`]: a loopback TCP proxy between a client and an emulator that delays,
//!   black-holes (dead NAT), resets or refuses connections on demand.
//! - [`simulation`]: several workers under random crashes, resharding and throttling, with
//!   invariant checks (nothing lost, order per key, no zombie checkpoint).
//!
//! # Example: a worker on the in-memory services
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use kcl_testkit::recording::{Behaviour, EventLog, RecordingFactory};
//! use kcl_testkit::{InMemoryKinesis, InMemoryLeaseStore};
//! use kcl_worker::{InitialPosition, Worker, WorkerConfig};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap().block_on(async {
//! let kinesis = InMemoryKinesis::new();
//! kinesis.create_stream("orders", 2).unwrap();
//! for i in 0..10 {
//!     kinesis.put_record("orders", &format!("customer-{i}"), None, Bytes::from("order")).unwrap();
//! }
//! let log = EventLog::new();
//! let config = WorkerConfig::builder("billing", "orders")
//!     .initial_position(InitialPosition::TrimHorizon)
//!     .build()
//!     .unwrap();
//! let worker = Worker::builder(config, RecordingFactory::new("w1", log.clone(), Behaviour::new()))
//!     .stream_client(Arc::new(kinesis.clone()))
//!     .lease_store(Arc::new(InMemoryLeaseStore::new()))
//!     .build()
//!     .await
//!     .unwrap()
//!     .start()
//!     .await
//!     .unwrap();
//! while log.delivered_count() < 10 {
//!     tokio::time::sleep(Duration::from_millis(100)).await; // virtual time
//! }
//! let report = worker.shutdown().await.unwrap();
//! assert!(report.is_clean());
//! assert_eq!(report.leases_released.len(), 2);
//! # });
//! ```

#[cfg(feature = "lease")]
pub mod conformance;
#[cfg(feature = "emulators")]
pub mod emulators;
#[cfg(feature = "emulators")]
pub mod fault_proxy;
pub mod harness;
#[cfg(feature = "java-interop")]
pub mod java_kcl;
#[cfg(feature = "simulation")]
pub mod simulation;

/// The manual clock (from `kcl_lease::test_util`).
#[cfg(feature = "lease")]
pub use kcl_lease::test_util::clock;
/// The in-memory lease store (from `kcl_lease::test_util`).
#[cfg(feature = "lease")]
pub use kcl_lease::test_util::lease_store;
/// The recording processor (from `kcl_worker::test_util`).
#[cfg(feature = "kinesis")]
pub use kcl_worker::test_util::recording;

/// The in-memory Kinesis (from `kcl_worker::test_util`) and the stream client scenario.
#[cfg(feature = "kinesis")]
pub mod kinesis {
    pub use kcl_worker::test_util::kinesis::*;
    pub mod scenario;
}

pub use harness::{ProcessorHarness, RecordingCheckpointer};
#[cfg(feature = "lease")]
pub use kcl_lease::test_util::{InMemoryLeaseStore, ManualClock};
#[cfg(feature = "kinesis")]
pub use kcl_worker::test_util::InMemoryKinesis;
