//! Adapters from this crate's traits to the AWS SDK, and how their clients are built.
//!
//! AWS SDK types appear only here (and in `kcl_lease::dynamo`), and only in constructors:
//! [`AwsStreamClient`] speaks the [`StreamClient`](crate::stream::StreamClient) trait with
//! this library's own types. [`AwsOptions`] gathers everything needed to build the SDK
//! clients (region, endpoints, a base SDK configuration, the call timeouts); give it to
//! [`WorkerBuilder::aws`](crate::WorkerBuilder::aws), or build the clients yourself with it.

#[cfg(feature = "kinesis")]
mod kinesis;

use std::time::Duration;

use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use kcl_lease::{CallTimeouts, LeaseError};

#[cfg(feature = "kinesis")]
pub use kinesis::AwsStreamClient;

use crate::error::ConfigError;

/// The longest time to open a connection, at most: a connect that takes longer is given up
/// and retried (within the attempt and call timeouts, which may be shorter).
pub const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How to build the AWS SDK clients of the worker (or of any program using the adapters).
///
/// Every client built here has the SDK's timeout configuration from
/// [`AwsOptions::call_timeouts`] (see [`sdk_timeout_config`]): a hung connection is given
/// up after one attempt timeout and retried on a fresh connection by the SDK's retry, and no
/// call lasts longer than the call timeout.
///
/// ```no_run
/// # async fn example() -> Result<(), kcl_worker::ConfigError> {
/// use kcl_worker::aws::AwsOptions;
/// let options = AwsOptions::new()
///     .with_region("eu-west-1")
///     .with_kinesis_endpoint("http://127.0.0.1:4567");
/// let streams = options.stream_client().await?;
/// # let _ = streams;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct AwsOptions {
    /// The region (default: from the base configuration, i.e. the environment).
    pub region: Option<String>,
    /// The Kinesis endpoint URL, `http://` or `https://` (for emulators).
    pub kinesis_endpoint: Option<String>,
    /// The DynamoDB endpoint URL, `http://` or `https://` (for emulators).
    pub dynamodb_endpoint: Option<String>,
    /// The base SDK configuration (default: loaded from the environment).
    pub sdk_config: Option<SdkConfig>,
    /// The attempt and call timeouts of every call (default: the worker's
    /// `call_attempt_timeout` and `call_timeout` when the worker builds the clients, else
    /// [`CallTimeouts::default`]).
    pub call_timeouts: Option<CallTimeouts>,
    /// Whether a lease table the worker creates gets the `LeaseOwnerToLeaseKeyIndex` global
    /// secondary index the Java KCL 3.x needs (`None`: yes, the default). Passed to the
    /// lease store built from these options
    /// (`DynamoLeaseStore::with_lease_owner_index`); tables that exist are never changed.
    pub lease_owner_index: Option<bool>,
}

/// The SDK timeout configuration for `timeouts`: `operation_attempt_timeout` is
/// `timeouts.attempt`, `operation_timeout` is `timeouts.call`, and the connect timeout is the
/// attempt timeout, at most [`MAX_CONNECT_TIMEOUT`].
pub fn sdk_timeout_config(timeouts: &CallTimeouts) -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(timeouts.attempt.min(MAX_CONNECT_TIMEOUT))
        .operation_attempt_timeout(timeouts.attempt)
        .operation_timeout(timeouts.call)
        .build()
}

impl AwsOptions {
    /// Every option at its default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the region.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Sets the Kinesis endpoint URL.
    pub fn with_kinesis_endpoint(mut self, url: impl Into<String>) -> Self {
        self.kinesis_endpoint = Some(url.into());
        self
    }

    /// Sets the DynamoDB endpoint URL.
    pub fn with_dynamodb_endpoint(mut self, url: impl Into<String>) -> Self {
        self.dynamodb_endpoint = Some(url.into());
        self
    }

    /// Starts from this SDK configuration instead of loading one from the environment (the
    /// region, endpoints and timeouts of these options still apply).
    pub fn with_sdk_config(mut self, sdk_config: SdkConfig) -> Self {
        self.sdk_config = Some(sdk_config);
        self
    }

    /// Sets the call timeouts.
    pub fn with_call_timeouts(mut self, timeouts: CallTimeouts) -> Self {
        self.call_timeouts = Some(timeouts);
        self
    }

    /// Sets whether a lease table created gets the `LeaseOwnerToLeaseKeyIndex` index
    /// (default `true`).
    pub fn with_lease_owner_index(mut self, enabled: bool) -> Self {
        self.lease_owner_index = Some(enabled);
        self
    }

    /// Whether a lease table created gets the `LeaseOwnerToLeaseKeyIndex` index.
    pub fn lease_owner_index_enabled(&self) -> bool {
        self.lease_owner_index.unwrap_or(true)
    }

    /// The call timeouts in effect.
    pub fn timeouts(&self) -> CallTimeouts {
        self.call_timeouts.unwrap_or_default()
    }

    /// Checks every option; the error names it (`region`, `kinesis_endpoint`,
    /// `dynamodb_endpoint`, `call_attempt_timeout`, `call_timeout`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(region) = &self.region
            && region.trim().is_empty()
        {
            return Err(ConfigError::Invalid {
                option: "region",
                reason: "must not be empty".to_owned(),
            });
        }
        for (option, url) in [
            ("kinesis_endpoint", &self.kinesis_endpoint),
            ("dynamodb_endpoint", &self.dynamodb_endpoint),
        ] {
            if let Some(url) = url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return Err(ConfigError::Invalid {
                    option,
                    reason: format!("{url:?} must start with http:// or https://"),
                });
            }
        }
        self.timeouts().validate().map_err(|e| match e {
            LeaseError::InvalidConfig { option, reason } => ConfigError::Invalid { option, reason },
            other => ConfigError::Invalid {
                option: "call_timeout",
                reason: kcl_lease::ErrorChain(&other).to_string(),
            },
        })
    }

    /// The SDK configuration the clients are built from: the base one (or the environment's),
    /// with the region and the timeout configuration applied. Validates the options first.
    pub async fn load_sdk_config(&self) -> Result<SdkConfig, ConfigError> {
        self.validate()?;
        let base = match &self.sdk_config {
            Some(c) => c.clone(),
            None => aws_config::load_defaults(BehaviorVersion::latest()).await,
        };
        let mut b = base.into_builder();
        if let Some(region) = &self.region {
            b.set_region(Some(Region::new(region.clone())));
        }
        b.set_timeout_config(Some(sdk_timeout_config(&self.timeouts())));
        Ok(b.build())
    }

    /// A Kinesis SDK client from `sdk` (see [`AwsOptions::load_sdk_config`]) with the Kinesis
    /// endpoint and the timeouts applied.
    #[cfg(feature = "kinesis")]
    pub fn kinesis_client_from(&self, sdk: &SdkConfig) -> aws_sdk_kinesis::Client {
        let mut b = aws_sdk_kinesis::config::Builder::from(sdk)
            .timeout_config(sdk_timeout_config(&self.timeouts()));
        if let Some(url) = &self.kinesis_endpoint {
            b = b.endpoint_url(url);
        }
        aws_sdk_kinesis::Client::from_conf(b.build())
    }

    /// A Kinesis SDK client (loads the SDK configuration).
    #[cfg(feature = "kinesis")]
    pub async fn kinesis_client(&self) -> Result<aws_sdk_kinesis::Client, ConfigError> {
        Ok(self.kinesis_client_from(&self.load_sdk_config().await?))
    }

    /// The [`AwsStreamClient`] (loads the SDK configuration).
    #[cfg(feature = "kinesis")]
    pub async fn stream_client(&self) -> Result<AwsStreamClient, ConfigError> {
        Ok(AwsStreamClient::new(self.kinesis_client().await?))
    }

    /// A DynamoDB SDK client from `sdk` with the DynamoDB endpoint and the timeouts applied.
    #[cfg(feature = "dynamodb")]
    pub fn dynamodb_client_from(&self, sdk: &SdkConfig) -> aws_sdk_dynamodb::Client {
        let mut b = aws_sdk_dynamodb::config::Builder::from(sdk)
            .timeout_config(sdk_timeout_config(&self.timeouts()));
        if let Some(url) = &self.dynamodb_endpoint {
            b = b.endpoint_url(url);
        }
        aws_sdk_dynamodb::Client::from_conf(b.build())
    }

    /// A DynamoDB SDK client (loads the SDK configuration).
    #[cfg(feature = "dynamodb")]
    pub async fn dynamodb_client(&self) -> Result<aws_sdk_dynamodb::Client, ConfigError> {
        Ok(self.dynamodb_client_from(&self.load_sdk_config().await?))
    }

    /// The lease store on DynamoDB for `table_name` (loads the SDK configuration).
    #[cfg(feature = "dynamodb")]
    pub async fn lease_store(
        &self,
        table_name: impl Into<String>,
    ) -> Result<kcl_lease::dynamo::DynamoLeaseStore, ConfigError> {
        Ok(
            kcl_lease::dynamo::DynamoLeaseStore::new(self.dynamodb_client().await?, table_name)
                .with_lease_owner_index(self.lease_owner_index_enabled()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_the_option() {
        let cases = [
            (AwsOptions::new().with_region(" "), "region"),
            (
                AwsOptions::new().with_kinesis_endpoint("localhost:4567"),
                "kinesis_endpoint",
            ),
            (
                AwsOptions::new().with_dynamodb_endpoint("ftp://x"),
                "dynamodb_endpoint",
            ),
            (
                AwsOptions::new().with_call_timeouts(CallTimeouts::new(
                    Duration::from_secs(5),
                    Duration::from_secs(4),
                )),
                "call_timeout",
            ),
            (
                AwsOptions::new()
                    .with_call_timeouts(CallTimeouts::new(Duration::ZERO, Duration::from_secs(4))),
                "call_attempt_timeout",
            ),
        ];
        for (options, option) in cases {
            match options.validate() {
                Err(ConfigError::Invalid { option: o, .. }) => assert_eq!(o, option),
                other => panic!("{option}: expected an error, got {other:?}"),
            }
        }
        AwsOptions::new()
            .with_region("eu-west-1")
            .with_kinesis_endpoint("http://127.0.0.1:4567")
            .validate()
            .unwrap();
    }

    #[test]
    fn the_timeouts_go_to_the_sdk() {
        let t = CallTimeouts::new(Duration::from_secs(2), Duration::from_secs(7));
        let c = sdk_timeout_config(&t);
        assert_eq!(c.operation_attempt_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(c.operation_timeout(), Some(Duration::from_secs(7)));
        assert_eq!(c.connect_timeout(), Some(Duration::from_secs(2)));
    }
}
