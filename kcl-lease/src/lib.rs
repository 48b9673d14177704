//! Leases for the Kinesis Client Library: the lease model, the [`LeaseStore`] trait with
//! its DynamoDB implementation, and the lease coordinator.

mod clock;
pub mod coordinator;
pub mod dynamo;
mod error;
mod lease;
mod store;

pub use clock::{BoxFuture, Clock, RandomSource, SeededRandom, SystemClock};
pub use error::{BoxError, LeaseError};
pub use lease::Lease;
pub use store::{BillingMode, LeaseStore};
