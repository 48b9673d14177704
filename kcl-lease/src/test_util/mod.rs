//! In-memory fakes for tests, behind the `test-util` feature: a lease store with the
//! semantics of the DynamoDB lease table and a clock the test moves.
//!
//! They live here, beside the [`LeaseStore`](crate::LeaseStore) and [`Clock`](crate::Clock)
//! traits they implement, the way tokio keeps its paused clock behind its own `test-util`
//! feature: this crate's own tests and doctests use them without compiling anything above
//! `kcl-lease`, and `kcl-testkit` re-exports them for everyone else.

pub mod clock;
pub mod fault;
pub mod lease_store;

pub use clock::ManualClock;
pub use lease_store::InMemoryLeaseStore;
