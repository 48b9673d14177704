//! In-memory fakes and fixtures for tests, behind the `test-util` feature: a Kinesis that behaves like the
//! service, and a recording processor that writes down everything a worker does to it.
//!
//! They live here, beside the [`StreamClient`](crate::stream::StreamClient) trait the fake
//! implements (the pattern of tokio's `test-util` feature), so this crate's own tests run
//! whole workers without a dependency on `kcl-testkit`; `kcl-testkit` re-exports them.
//! The in-memory lease store and the manual clock are in `kcl_lease::test_util`. [`Fleet`]
//! starts several workers on the fakes; [`wait_until`] waits for a condition on a clock.

pub mod fleet;
pub mod kinesis;
pub mod recording;
pub mod wait;

pub use fleet::Fleet;
pub use kinesis::InMemoryKinesis;
pub use wait::{TimedOut, wait_until};
