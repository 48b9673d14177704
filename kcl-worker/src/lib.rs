//! The worker of the Kinesis Client Library.

pub mod stream;
