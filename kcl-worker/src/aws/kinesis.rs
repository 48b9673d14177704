//! [`StreamClient`] on `aws-sdk-kinesis`.
//!
//! The error mapping is documented on [`AwsStreamClient`].

use std::fmt;
use std::num::NonZeroU32;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::primitives::DateTime;
use aws_sdk_kinesis::types as sdk;
use bytes::Bytes;
use kcl_kpl::{HashKeyRange, Record, SequenceNumber};

use crate::stream::{
    ChildShard, ConsumerStatus, GetRecordsOutput, IteratorPosition, Shard, ShardFilter, ShardPage,
    StreamClient, StreamConsumer, StreamError, StreamSummary, SubscribeEvent, Subscription,
};

use crate::stream::limits::MAX_LIST_SHARDS_PAGE_SIZE;

/// A [`StreamClient`] backed by the AWS SDK for Kinesis.
///
/// Build the SDK client as usual (region, credentials, endpoint override for an emulator)
/// and wrap it:
///
/// ```no_run
/// # async fn example() {
/// use kcl_worker::aws::AwsStreamClient;
/// use kcl_worker::stream::StreamClient;
///
/// let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
/// let streams = AwsStreamClient::new(aws_sdk_kinesis::Client::new(&config));
/// let shards = streams.list_all_shards("my-stream", None).await;
/// # let _ = shards;
/// # }
/// ```
///
/// `Debug` shows no configuration and no credentials.
///
/// # Errors
///
/// | service error code | [`StreamError`] |
/// |---|---|
/// | `ProvisionedThroughputExceededException`, `KMSThrottlingException`, `LimitExceededException`, `ThrottlingException` | `Throttled` |
/// | `ExpiredIteratorException` | `ExpiredIterator` |
/// | `ResourceNotFoundException` | `StreamNotFound` for `ListShards` and `DescribeStreamSummary`; for `GetShardIterator` `StreamNotFound` when the message is about the stream (it starts with "Stream"), else `ResourceNotFound`; `ResourceNotFound` for `GetRecords` |
/// | `InvalidArgumentException`, `ExpiredNextTokenException`, `ValidationException` | `InvalidArgument` |
/// | `ResourceInUseException` | `ResourceInUse` |
/// | any other code, or none (5xx, `InternalFailure`, `AccessDenied`, the other KMS errors such as `KMSAccessDeniedException` or `KMSDisabledException`) | `Service` |
///
/// `RegisterStreamConsumer`, `DescribeStreamConsumer` and `SubscribeToShard` (the call and
/// its event stream) map `ResourceNotFoundException` to `ResourceNotFound`. An event stream
/// that breaks is `Unreachable`; an error event is mapped by its code as above.
///
/// Transport failures (connection refused or reset, timeouts, a response cut short or
/// unparsable) are `Unreachable`, except an unparsable answer with a 5xx status, which is
/// `Service`; a request the SDK refuses to build is `InvalidArgument`; a well-formed response
/// whose sequence numbers, hash keys or timestamps cannot be read is `MalformedResponse`.
///
/// The other KMS errors are `Service` (retryable) rather than a dedicated variant: a key that
/// was disabled or whose grant was revoked may be restored by an operator, and the worker
/// keeps its lease and backs off meanwhile.
///
/// The SDK's own retry policy (the client's `RetryConfig`) runs before any of this: with the
/// default policy, throttling and 5xx responses are retried a few times inside one call.
#[derive(Clone)]
pub struct AwsStreamClient {
    client: Client,
    list_shards_page_size: Option<u32>,
}

impl AwsStreamClient {
    /// Wraps an SDK client.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            list_shards_page_size: None,
        }
    }

    /// Sets `MaxResults` for every `ListShards` page (the service's default, 1000, when not
    /// set). Values above the service's maximum, 10 000, are sent as 10 000.
    pub fn with_list_shards_page_size(mut self, max_results: NonZeroU32) -> Self {
        self.list_shards_page_size = Some(max_results.get().min(MAX_LIST_SHARDS_PAGE_SIZE));
        self
    }
}

impl fmt::Debug for AwsStreamClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsStreamClient")
            .field("list_shards_page_size", &self.list_shards_page_size)
            .finish_non_exhaustive()
    }
}

/// An open `SubscribeToShard` event stream of the SDK.
struct AwsSubscription {
    output: aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardOutput,
}

impl fmt::Debug for AwsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSubscription").finish_non_exhaustive()
    }
}

#[async_trait]
impl Subscription for AwsSubscription {
    async fn next_event(&mut self) -> Result<Option<SubscribeEvent>, StreamError> {
        loop {
            let event = match self.output.event_stream.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(None),
                Err(SdkError::ServiceError(context)) => {
                    use sdk::error::SubscribeToShardEventStreamError as E;
                    let err = context.into_err();
                    // Modeled exceptions of the event stream may carry no code in their
                    // metadata: map them by variant.
                    return Err(match err {
                        E::ResourceInUseException(e) => StreamError::ResourceInUse {
                            message: e.message().unwrap_or("resource in use").to_owned(),
                        },
                        E::ResourceNotFoundException(e) => StreamError::ResourceNotFound {
                            message: e.message().unwrap_or("resource not found").to_owned(),
                        },
                        E::KmsThrottlingException(e) => StreamError::Throttled {
                            source: Box::new(e),
                        },
                        other => map_service_error(other, NotFound::Resource),
                    });
                }
                Err(other) => {
                    return Err(StreamError::Unreachable {
                        source: DisplayErrorContext(&other).to_string().into(),
                    });
                }
            };
            // Event types this SDK does not know are skipped.
            let sdk::SubscribeToShardEventStream::SubscribeToShardEvent(event) = event else {
                continue;
            };
            let records = event
                .records
                .into_iter()
                .map(record_from_sdk)
                .collect::<Result<Vec<_>, _>>()?;
            let child_shards = event
                .child_shards
                .unwrap_or_default()
                .iter()
                .map(child_shard_from_sdk)
                .collect::<Result<Vec<_>, _>>()?;
            let continuation_sequence_number = if event.continuation_sequence_number.is_empty() {
                None
            } else {
                Some(
                    SequenceNumber::parse(&event.continuation_sequence_number).map_err(|_| {
                        malformed(format!(
                            "unreadable ContinuationSequenceNumber {:?}",
                            event.continuation_sequence_number
                        ))
                    })?,
                )
            };
            return Ok(Some(SubscribeEvent {
                records,
                continuation_sequence_number,
                millis_behind_latest: Some(u64::try_from(event.millis_behind_latest).unwrap_or(0)),
                child_shards,
            }));
        }
    }
}

fn consumer_status(status: &sdk::ConsumerStatus) -> Result<ConsumerStatus, StreamError> {
    match status {
        sdk::ConsumerStatus::Active => Ok(ConsumerStatus::Active),
        sdk::ConsumerStatus::Creating => Ok(ConsumerStatus::Creating),
        sdk::ConsumerStatus::Deleting => Ok(ConsumerStatus::Deleting),
        other => Err(malformed(format!(
            "unknown ConsumerStatus {}",
            other.as_str()
        ))),
    }
}

fn consumer_description(
    output: aws_sdk_kinesis::operation::describe_stream_consumer::DescribeStreamConsumerOutput,
) -> Result<StreamConsumer, StreamError> {
    let consumer = output
        .consumer_description
        .ok_or_else(|| malformed("DescribeStreamConsumer returned no ConsumerDescription"))?;
    Ok(StreamConsumer {
        status: consumer_status(&consumer.consumer_status)?,
        consumer_name: consumer.consumer_name,
        consumer_arn: consumer.consumer_arn,
        stream_arn: consumer.stream_arn,
    })
}

#[async_trait]
impl StreamClient for AwsStreamClient {
    async fn register_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        let output = self
            .client
            .register_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(consumer_name)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Resource))?;
        let consumer = output
            .consumer
            .ok_or_else(|| malformed("RegisterStreamConsumer returned no Consumer"))?;
        Ok(StreamConsumer {
            status: consumer_status(&consumer.consumer_status)?,
            consumer_name: consumer.consumer_name,
            consumer_arn: consumer.consumer_arn,
            stream_arn: stream_arn.to_owned(),
        })
    }

    async fn describe_stream_consumer(
        &self,
        stream_arn: &str,
        consumer_name: &str,
    ) -> Result<StreamConsumer, StreamError> {
        let output = self
            .client
            .describe_stream_consumer()
            .stream_arn(stream_arn)
            .consumer_name(consumer_name)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Resource))?;
        consumer_description(output)
    }

    async fn describe_stream_consumer_by_arn(
        &self,
        consumer_arn: &str,
    ) -> Result<StreamConsumer, StreamError> {
        let output = self
            .client
            .describe_stream_consumer()
            .consumer_arn(consumer_arn)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Resource))?;
        consumer_description(output)
    }

    async fn subscribe_to_shard(
        &self,
        consumer_arn: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<Box<dyn Subscription>, StreamError> {
        let start = sdk::StartingPosition::builder();
        let start = match position {
            IteratorPosition::TrimHorizon => start.r#type(sdk::ShardIteratorType::TrimHorizon),
            IteratorPosition::Latest => start.r#type(sdk::ShardIteratorType::Latest),
            IteratorPosition::AtTimestamp(at) => start
                .r#type(sdk::ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*at)),
            IteratorPosition::AtSequenceNumber(sequence) => start
                .r#type(sdk::ShardIteratorType::AtSequenceNumber)
                .sequence_number(sequence.as_str()),
            IteratorPosition::AfterSequenceNumber(sequence) => start
                .r#type(sdk::ShardIteratorType::AfterSequenceNumber)
                .sequence_number(sequence.as_str()),
        };
        let start = start.build().map_err(|e| StreamError::InvalidArgument {
            message: e.to_string(),
        })?;
        let output = self
            .client
            .subscribe_to_shard()
            .consumer_arn(consumer_arn)
            .shard_id(shard_id)
            .starting_position(start)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Resource))?;
        Ok(Box::new(AwsSubscription { output }))
    }

    async fn list_shards_page(
        &self,
        stream: &str,
        next_token: Option<&str>,
        filter: Option<&ShardFilter>,
    ) -> Result<ShardPage, StreamError> {
        let mut request = self.client.list_shards();
        match next_token {
            // The API rejects StreamName (and a filter) together with NextToken: the token
            // carries both.
            Some(token) => request = request.next_token(token),
            None => {
                request = request.stream_name(stream);
                if let Some(filter) = filter {
                    request = request.shard_filter(sdk_shard_filter(filter)?);
                }
            }
        }
        if let Some(max_results) = self.list_shards_page_size {
            // Never above 10 000, so it fits an i32.
            request = request.max_results(i32::try_from(max_results).unwrap_or(i32::MAX));
        }
        let output = request
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Stream(stream)))?;
        let shards = output
            .shards
            .unwrap_or_default()
            .iter()
            .map(shard_from_sdk)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ShardPage {
            shards,
            next_token: output.next_token.filter(|token| !token.is_empty()),
        })
    }

    async fn describe_stream_summary(&self, stream: &str) -> Result<StreamSummary, StreamError> {
        let output = self
            .client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Stream(stream)))?;
        let summary = output.stream_description_summary.ok_or_else(|| {
            malformed("DescribeStreamSummary returned no StreamDescriptionSummary")
        })?;
        Ok(StreamSummary {
            stream_name: summary.stream_name,
            stream_arn: summary.stream_arn,
            status: summary.stream_status.as_str().to_owned(),
            open_shard_count: u32::try_from(summary.open_shard_count)
                .map_err(|_| malformed("negative OpenShardCount"))?,
            retention_period_hours: u32::try_from(summary.retention_period_hours)
                .map_err(|_| malformed("negative RetentionPeriodHours"))?,
        })
    }

    async fn get_shard_iterator(
        &self,
        stream: &str,
        shard_id: &str,
        position: &IteratorPosition,
    ) -> Result<String, StreamError> {
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(shard_id);
        let request = match position {
            IteratorPosition::TrimHorizon => {
                request.shard_iterator_type(sdk::ShardIteratorType::TrimHorizon)
            }
            IteratorPosition::Latest => request.shard_iterator_type(sdk::ShardIteratorType::Latest),
            IteratorPosition::AtTimestamp(at) => request
                .shard_iterator_type(sdk::ShardIteratorType::AtTimestamp)
                .timestamp(DateTime::from(*at)),
            IteratorPosition::AtSequenceNumber(sequence) => request
                .shard_iterator_type(sdk::ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(sequence.as_str()),
            IteratorPosition::AfterSequenceNumber(sequence) => request
                .shard_iterator_type(sdk::ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(sequence.as_str()),
        };
        let output = request
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::StreamOrShard(stream)))?;
        output
            .shard_iterator
            .ok_or_else(|| malformed("GetShardIterator returned no ShardIterator"))
    }

    async fn get_records(
        &self,
        shard_iterator: &str,
        limit: u32,
    ) -> Result<GetRecordsOutput, StreamError> {
        let limit = i32::try_from(limit).map_err(|_| StreamError::InvalidArgument {
            message: format!("GetRecords limit {limit} is out of range"),
        })?;
        let output = self
            .client
            .get_records()
            .shard_iterator(shard_iterator)
            .limit(limit)
            .send()
            .await
            .map_err(|err| map_sdk_error(err, NotFound::Resource))?;
        let records = output
            .records
            .into_iter()
            .map(record_from_sdk)
            .collect::<Result<Vec<_>, _>>()?;
        let child_shards = output
            .child_shards
            .unwrap_or_default()
            .iter()
            .map(child_shard_from_sdk)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(GetRecordsOutput {
            records,
            next_shard_iterator: output.next_shard_iterator,
            // A negative value would be a service bug; read it as "caught up".
            millis_behind_latest: output
                .millis_behind_latest
                .map(|millis| u64::try_from(millis).unwrap_or(0)),
            child_shards,
        })
    }
}

/// What a `ResourceNotFoundException` means for the call that got it.
#[derive(Clone, Copy)]
enum NotFound<'a> {
    /// A stream-level call: the stream is missing.
    Stream(&'a str),
    /// `GetShardIterator`: the stream or the shard (or a sequence number) is missing.
    StreamOrShard(&'a str),
    /// `GetRecords`: whatever the iterator pointed at is gone.
    Resource,
}

fn map_sdk_error<E>(err: SdkError<E>, not_found: NotFound<'_>) -> StreamError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    // A 5xx answer the SDK could not parse (kinesis-local sends some with an empty body).
    let server_error = err
        .raw_response()
        .is_some_and(|raw| raw.status().is_server_error());
    match err {
        SdkError::ServiceError(context) => map_service_error(context.into_err(), not_found),
        SdkError::ConstructionFailure(_) => StreamError::InvalidArgument {
            message: DisplayErrorContext(&err).to_string(),
        },
        // Timeouts, connection failures and responses cut short: the service was not
        // (fully) reached.
        other => {
            let source = match other.into_source() {
                Ok(source) => source,
                Err(err) => DisplayErrorContext(&err).to_string().into(),
            };
            if server_error {
                StreamError::Service { source }
            } else {
                StreamError::Unreachable { source }
            }
        }
    }
}

fn map_service_error<E>(err: E, not_found: NotFound<'_>) -> StreamError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let message = || {
        err.message()
            .or_else(|| err.code())
            .unwrap_or("no message")
            .to_owned()
    };
    match err.code() {
        Some(
            "ProvisionedThroughputExceededException"
            | "KMSThrottlingException"
            | "LimitExceededException"
            | "ThrottlingException",
        ) => StreamError::Throttled {
            source: Box::new(err),
        },
        Some("ExpiredIteratorException") => StreamError::ExpiredIterator,
        Some("ResourceNotFoundException") => match not_found {
            NotFound::Stream(stream) => StreamError::StreamNotFound {
                stream: stream.to_owned(),
            },
            NotFound::StreamOrShard(stream) if is_about_stream(err.message()) => {
                StreamError::StreamNotFound {
                    stream: stream.to_owned(),
                }
            }
            NotFound::StreamOrShard(_) | NotFound::Resource => {
                StreamError::ResourceNotFound { message: message() }
            }
        },
        Some("ResourceInUseException") => StreamError::ResourceInUse { message: message() },
        Some("InvalidArgumentException" | "ExpiredNextTokenException" | "ValidationException") => {
            StreamError::InvalidArgument { message: message() }
        }
        _ => StreamError::Service {
            source: Box::new(err),
        },
    }
}

/// Whether a `ResourceNotFoundException` message says the stream (not a shard) is missing:
/// both the service ("Stream NAME under account ID not found.") and kinesis-local ("Stream arn
/// ARN not found") start with "Stream".
fn is_about_stream(message: Option<&str>) -> bool {
    message.is_some_and(|message| {
        message
            .get(..7)
            .is_some_and(|head| head.eq_ignore_ascii_case("stream "))
    })
}

fn malformed(message: impl Into<String>) -> StreamError {
    StreamError::MalformedResponse {
        message: message.into(),
    }
}

fn sdk_shard_filter(filter: &ShardFilter) -> Result<sdk::ShardFilter, StreamError> {
    let builder = sdk::ShardFilter::builder();
    let builder = match filter {
        ShardFilter::AfterShardId(shard_id) => builder
            .r#type(sdk::ShardFilterType::AfterShardId)
            .shard_id(shard_id),
        ShardFilter::AtTrimHorizon => builder.r#type(sdk::ShardFilterType::AtTrimHorizon),
        ShardFilter::FromTrimHorizon => builder.r#type(sdk::ShardFilterType::FromTrimHorizon),
        ShardFilter::AtLatest => builder.r#type(sdk::ShardFilterType::AtLatest),
        ShardFilter::AtTimestamp(at) => builder
            .r#type(sdk::ShardFilterType::AtTimestamp)
            .timestamp(DateTime::from(*at)),
        ShardFilter::FromTimestamp(at) => builder
            .r#type(sdk::ShardFilterType::FromTimestamp)
            .timestamp(DateTime::from(*at)),
    };
    builder.build().map_err(|err| StreamError::InvalidArgument {
        message: DisplayErrorContext(&err).to_string(),
    })
}

fn parse_sequence_number(value: &str, what: &str) -> Result<SequenceNumber, StreamError> {
    SequenceNumber::parse(value).map_err(|err| malformed(format!("{what}: {err}")))
}

fn hash_key_range_from_sdk(
    range: Option<&sdk::HashKeyRange>,
    shard_id: &str,
) -> Result<HashKeyRange, StreamError> {
    let range = range.ok_or_else(|| malformed(format!("shard {shard_id} has no HashKeyRange")))?;
    HashKeyRange::parse(range.starting_hash_key(), range.ending_hash_key())
        .map_err(|err| malformed(format!("shard {shard_id}: {err}")))
}

fn shard_from_sdk(shard: &sdk::Shard) -> Result<Shard, StreamError> {
    let shard_id = shard.shard_id();
    let sequence_range = shard
        .sequence_number_range()
        .ok_or_else(|| malformed(format!("shard {shard_id} has no SequenceNumberRange")))?;
    Ok(Shard {
        shard_id: shard_id.to_owned(),
        parent_shard_id: shard.parent_shard_id().map(str::to_owned),
        adjacent_parent_shard_id: shard.adjacent_parent_shard_id().map(str::to_owned),
        hash_key_range: hash_key_range_from_sdk(shard.hash_key_range(), shard_id)?,
        starting_sequence_number: parse_sequence_number(
            sequence_range.starting_sequence_number(),
            "StartingSequenceNumber",
        )?,
        ending_sequence_number: sequence_range
            .ending_sequence_number()
            .map(|ending| parse_sequence_number(ending, "EndingSequenceNumber"))
            .transpose()?,
    })
}

fn child_shard_from_sdk(child: &sdk::ChildShard) -> Result<ChildShard, StreamError> {
    Ok(ChildShard {
        shard_id: child.shard_id().to_owned(),
        parent_shard_ids: child.parent_shards().to_vec(),
        hash_key_range: hash_key_range_from_sdk(child.hash_key_range(), child.shard_id())?,
    })
}

fn record_from_sdk(record: sdk::Record) -> Result<Record, StreamError> {
    let sequence_number = parse_sequence_number(&record.sequence_number, "record SequenceNumber")?;
    let approximate_arrival_timestamp = record
        .approximate_arrival_timestamp
        .map(SystemTime::try_from)
        .transpose()
        .map_err(|err| {
            malformed(format!(
                "record {sequence_number}: ApproximateArrivalTimestamp: {err}"
            ))
        })?;
    Ok(Record {
        data: Bytes::from(record.data.into_inner()),
        // The service always sends the key; an absent one is read as empty rather than
        // making the record (and everything after it) unreadable.
        partition_key: record.partition_key.unwrap_or_default(),
        sequence_number,
        sub_sequence_number: 0,
        // GetRecords does not return the explicit hash key a producer set.
        explicit_hash_key: None,
        approximate_arrival_timestamp,
        encryption_type: record.encryption_type.map(|kind| kind.as_str().to_owned()),
        aggregated: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_messages() {
        assert!(is_about_stream(Some(
            "Stream foo under account 1 not found."
        )));
        assert!(is_about_stream(Some(
            "Stream arn arn:aws:kinesis:us-east-1:000000000000:stream/nope not found"
        )));
        assert!(!is_about_stream(Some(
            "Could not find shardId shardId-000000000009 in stream s1"
        )));
        assert!(!is_about_stream(Some(
            "Shard shardId-1 in stream s does not exist"
        )));
        assert!(!is_about_stream(Some("Stream")));
        assert!(!is_about_stream(None));
    }

    #[test]
    fn filters_build() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let cases = [
            (
                ShardFilter::AfterShardId("shardId-000000000001".into()),
                "AFTER_SHARD_ID",
            ),
            (ShardFilter::AtTrimHorizon, "AT_TRIM_HORIZON"),
            (ShardFilter::FromTrimHorizon, "FROM_TRIM_HORIZON"),
            (ShardFilter::AtLatest, "AT_LATEST"),
            (ShardFilter::AtTimestamp(at), "AT_TIMESTAMP"),
            (ShardFilter::FromTimestamp(at), "FROM_TIMESTAMP"),
        ];
        for (filter, kind) in cases {
            let built = sdk_shard_filter(&filter).unwrap();
            assert_eq!(built.r#type().as_str(), kind);
            match filter {
                ShardFilter::AfterShardId(id) => assert_eq!(built.shard_id(), Some(id.as_str())),
                ShardFilter::AtTimestamp(_) | ShardFilter::FromTimestamp(_) => {
                    assert_eq!(built.timestamp().map(|t| t.secs()), Some(1_700_000_000));
                }
                _ => assert!(built.shard_id().is_none() && built.timestamp().is_none()),
            }
        }
    }

    #[test]
    fn records_convert() {
        let record = sdk::Record::builder()
            .sequence_number("49590338271490256608559692538361571095921575989136588898")
            .partition_key("pk")
            .data(aws_sdk_kinesis::primitives::Blob::new(b"hello".to_vec()))
            .approximate_arrival_timestamp(DateTime::from_millis(1_700_000_000_123))
            .encryption_type(sdk::EncryptionType::Kms)
            .build()
            .unwrap();
        let converted = record_from_sdk(record).unwrap();
        assert_eq!(converted.data, Bytes::from_static(b"hello"));
        assert_eq!(converted.partition_key, "pk");
        assert_eq!(
            converted.sequence_number.as_str(),
            "49590338271490256608559692538361571095921575989136588898"
        );
        assert_eq!(
            converted.approximate_arrival_timestamp,
            Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_123))
        );
        assert_eq!(converted.encryption_type.as_deref(), Some("KMS"));
        assert!(!converted.aggregated);

        let bad = sdk::Record::builder()
            .sequence_number("12x")
            .partition_key("pk")
            .data(aws_sdk_kinesis::primitives::Blob::new(Vec::new()))
            .build()
            .unwrap();
        assert!(matches!(
            record_from_sdk(bad),
            Err(StreamError::MalformedResponse { .. })
        ));
    }

    #[test]
    fn shards_convert() {
        let shard = sdk::Shard::builder()
            .shard_id("shardId-000000000003")
            .parent_shard_id("shardId-000000000001")
            .adjacent_parent_shard_id("shardId-000000000002")
            .hash_key_range(
                sdk::HashKeyRange::builder()
                    .starting_hash_key("10")
                    .ending_hash_key("340282366920938463463374607431768211455")
                    .build()
                    .unwrap(),
            )
            .sequence_number_range(
                sdk::SequenceNumberRange::builder()
                    .starting_sequence_number("100")
                    .ending_sequence_number("200")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let converted = shard_from_sdk(&shard).unwrap();
        assert_eq!(converted.shard_id, "shardId-000000000003");
        assert_eq!(
            converted.parent_ids().collect::<Vec<_>>(),
            ["shardId-000000000001", "shardId-000000000002"]
        );
        assert_eq!(
            converted.hash_key_range,
            HashKeyRange::new(10, u128::MAX).unwrap()
        );
        assert_eq!(converted.starting_sequence_number.as_str(), "100");
        assert_eq!(
            converted
                .ending_sequence_number
                .as_ref()
                .map(SequenceNumber::as_str),
            Some("200")
        );

        let bad_range = sdk::Shard::builder()
            .shard_id("shardId-000000000000")
            .hash_key_range(
                sdk::HashKeyRange::builder()
                    .starting_hash_key("5")
                    .ending_hash_key("4")
                    .build()
                    .unwrap(),
            )
            .sequence_number_range(
                sdk::SequenceNumberRange::builder()
                    .starting_sequence_number("1")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        assert!(matches!(
            shard_from_sdk(&bad_range),
            Err(StreamError::MalformedResponse { .. })
        ));
    }
}
