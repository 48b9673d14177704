//! Adapters from this crate's traits to the AWS SDK.
//!
//! AWS SDK types appear only here, and only in constructors: [`AwsStreamClient`] speaks the
//! [`StreamClient`](crate::stream::StreamClient) trait with this library's own types.

mod kinesis;

pub use kinesis::AwsStreamClient;
