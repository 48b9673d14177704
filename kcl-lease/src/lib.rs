//! Leases for the Kinesis Client Library: the lease model, the [`LeaseStore`] trait with
//! its DynamoDB implementation (`dynamo::DynamoLeaseStore`, the Java KCL 2.x table layout,
//! behind the default-on `dynamodb` feature), and the [`coordinator::LeaseCoordinator`] that renews, takes, hands over
//! (the Java KCL 3.x graceful handoff) and releases leases; and [`v3`], the Java KCL 3.x
//! protocol (leader election with the `Leader` lock item, leader-run lease assignment,
//! WorkerMetricStats rows, follower discovery through the lease owner index, the
//! `Migration3.0` state machine), run beside the coordinator by [`v3::runtime`].
//!
//! Every write is a conditional update fenced on the lease counter (and owner): a worker
//! that lost a lease can never overwrite the new owner's checkpoint. Expiry is judged
//! locally, from how long a lease's counter has not changed on this worker's monotonic
//! [`Clock`].
//!
//! # Example
//!
//! Two workers share four leases (here on the in-memory store of [`test_util`], feature
//! `test-util`, which evaluates the same conditions as DynamoDB):
//!
//! ```
//! use std::sync::Arc;
//! use kcl_lease::coordinator::{LeaseCoordinator, LeaseCoordinatorConfig};
//! use kcl_lease::{BillingMode, ExtendedSequenceNumber, Lease, LeaseStore, SeededRandom};
//! use kcl_lease::test_util::{InMemoryLeaseStore, ManualClock};
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let store = Arc::new(InMemoryLeaseStore::new());
//! store.create_table_if_not_exists(BillingMode::PayPerRequest).await?;
//! for i in 0..4 {
//!     let lease = Lease::new(format!("shardId-{i:012}"), ExtendedSequenceNumber::TRIM_HORIZON);
//!     store.create_lease_if_not_exists(&lease).await?;
//! }
//! let clock = Arc::new(ManualClock::new());
//! let worker = |id: &str| {
//!     LeaseCoordinator::new(store.clone(), LeaseCoordinatorConfig::new(id), clock.clone(),
//!         Arc::new(SeededRandom::new(7)))
//! };
//! let (a, b) = (worker("a")?, worker("b")?);
//! a.take_once().await?; // alone: takes all four
//! // `b` sees two workers: it asks `a` for the two it is owed, by graceful handoffs.
//! assert_eq!(b.take_once().await?.handoffs_initiated.len(), 2);
//! // `a`'s next renewal learns of them; it still holds both, its processors may
//! // checkpoint, then it hands them over.
//! clock.advance(std::time::Duration::from_secs(4));
//! a.renew_once().await;
//! for lease in a.held_leases().iter().filter(|l| l.is_in_handoff()) {
//!     a.holding(&lease.lease_key).unwrap().release().await?;
//! }
//! b.take_once().await?;
//! assert_eq!((a.held_leases().len(), b.held_leases().len()), (2, 2));
//! # Ok::<(), kcl_lease::LeaseError>(())
//! # }).unwrap();
//! ```

mod clock;
pub mod coordinator;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
mod error;
mod lease;
pub mod metrics;
mod store;
#[cfg(feature = "test-util")]
pub mod test_util;
pub mod timeouts;
pub mod v3;
pub mod write;

pub use clock::{BoxFuture, Clock, RandomSource, SeededRandom, SystemClock};
pub use error::{BoxError, ErrorChain, LeaseError};
pub use kcl_kpl::ExtendedSequenceNumber;
pub use lease::Lease;
pub use store::{BillingMode, LeaseStore, client_version};
pub use timeouts::CallTimeouts;
pub use write::{Fence, LeaseWrite};
