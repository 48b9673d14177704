//! The worker of the Kinesis Client Library.

pub mod aws;
pub mod stream;
