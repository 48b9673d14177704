//! Test kit for the Kinesis Client Library: an in-memory Kinesis and lease store that behave
//! like the real services, a manual clock, fixtures that start local emulators, and a
//! multi-worker simulation.

pub mod clock;
pub mod conformance;
pub mod emulators;
pub mod harness;
pub mod kinesis;
pub mod lease_store;
pub mod recording;
pub mod simulation;
