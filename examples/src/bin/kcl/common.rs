//! What every command shares: the AWS connection options, the lease table check, the two
//! reads that tell live leases from stale ones, and text tables.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use clap::Args;
use kcl_lease::dynamo::DynamoLeaseStore;
use kcl_lease::{CallTimeouts, Lease, LeaseStore};
use kcl_worker::aws::AwsOptions;

/// A failed command: the message names what is wrong. Exit code 1.
#[derive(Debug)]
pub(crate) struct CliError(pub(crate) String);

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CliError {}

pub(crate) type CliResult<T> = Result<T, CliError>;

/// `error` and its causes, `: `-separated.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut msg = error.to_string();
    let mut cause = error.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cause = c.source();
    }
    msg
}

pub(crate) fn fail<T>(msg: impl Into<String>) -> CliResult<T> {
    Err(CliError(msg.into()))
}

/// Region, endpoints and call bounds; credentials come from the AWS default chain. Given to
/// a command that makes no use of them, they are refused (see `parse` in `main.rs`).
#[derive(Args, Debug, Clone)]
pub(crate) struct Connection {
    /// The AWS region (default: the AWS configuration's); not for decode.
    #[arg(long, global = true)]
    pub(crate) region: Option<String>,
    /// Kinesis endpoint URL (e.g. an emulator on http://127.0.0.1:4567); for lag, and reset
    /// with --stream.
    #[arg(long, global = true)]
    pub(crate) kinesis_endpoint: Option<String>,
    /// DynamoDB endpoint URL (e.g. an emulator on http://127.0.0.1:4568).
    #[arg(long, global = true)]
    pub(crate) dynamodb_endpoint: Option<String>,
    /// Bound on a whole Kinesis or DynamoDB call, retries included, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub(crate) call_timeout: u64,
    /// Bound on one attempt of a Kinesis or DynamoDB call, in milliseconds.
    #[arg(long, global = true, default_value_t = 4_000)]
    pub(crate) call_attempt_timeout: u64,
}

impl Connection {
    pub(crate) fn aws(&self) -> AwsOptions {
        let mut aws = AwsOptions::new().with_call_timeouts(CallTimeouts::new(
            Duration::from_millis(self.call_attempt_timeout),
            Duration::from_millis(self.call_timeout),
        ));
        aws.region = self.region.clone();
        aws.kinesis_endpoint = self.kinesis_endpoint.clone();
        aws.dynamodb_endpoint = self.dynamodb_endpoint.clone();
        aws
    }

    /// The lease store of `application`, after checking that its table exists and has the
    /// key of a lease table (`leaseKey`, a string hash key).
    pub(crate) async fn lease_store(&self, application: &str) -> CliResult<DynamoLeaseStore> {
        let aws = self.aws();
        let client = aws
            .dynamodb_client()
            .await
            .map_err(|e| CliError(chain(&e)))?;
        let described = client.describe_table().table_name(application).send().await;
        let table = match described {
            Ok(out) => out.table,
            Err(e) => {
                use aws_sdk_dynamodb::error::ProvideErrorMetadata;
                if e.code() == Some("ResourceNotFoundException") {
                    return fail(format!(
                        "no such table: {application:?} (the lease table of application {application:?} does not exist)"
                    ));
                }
                return fail(format!(
                    "cannot describe table {application:?}: {}",
                    chain(&e)
                ));
            }
        };
        let keys: Vec<(String, String)> = table
            .as_ref()
            .map(|t| {
                t.key_schema()
                    .iter()
                    .map(|k| {
                        (
                            k.attribute_name().to_owned(),
                            k.key_type().as_str().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if keys != [("leaseKey".to_owned(), "HASH".to_owned())] {
            let shown: Vec<String> = keys.iter().map(|(n, t)| format!("{n} ({t})")).collect();
            return fail(format!(
                "not a lease table: {application:?} has the key [{}], a lease table's is leaseKey (HASH)",
                shown.join(", ")
            ));
        }
        Ok(DynamoLeaseStore::new(client, application))
    }

    pub(crate) async fn stream_client(&self) -> CliResult<kcl_worker::aws::AwsStreamClient> {
        self.aws()
            .stream_client()
            .await
            .map_err(|e| CliError(chain(&e)))
    }
}

/// How a lease looked over two reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum LeaseState {
    /// An owner, and the counter moved between the reads: a worker is renewing it.
    Live,
    /// An owner, and the counter did not move: its worker may be gone.
    Stale,
    /// No owner.
    Free,
}

impl LeaseState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LeaseState::Live => "live",
            LeaseState::Stale => "stale",
            LeaseState::Free => "free",
        }
    }
}

/// One lease as seen by the second read, with its state.
#[derive(Clone, Debug)]
pub(crate) struct Observed {
    pub(crate) lease: Lease,
    pub(crate) first_counter: Option<u64>,
    pub(crate) state: LeaseState,
}

/// Reads every lease twice, `interval` apart; leases gone by the second read are left out.
/// Sorted by lease key.
pub(crate) async fn observe(
    store: &dyn LeaseStore,
    interval: Duration,
) -> CliResult<Vec<Observed>> {
    let first = list(store).await?;
    tokio::time::sleep(interval).await;
    let second = list(store).await?;
    Ok(classify(&first, second))
}

pub(crate) async fn list(store: &dyn LeaseStore) -> CliResult<Vec<Lease>> {
    store
        .list_leases()
        .await
        .map_err(|e| CliError(format!("cannot read the lease table: {}", chain(&e))))
}

pub(crate) fn classify(first: &[Lease], second: Vec<Lease>) -> Vec<Observed> {
    let before: BTreeMap<&str, u64> = first
        .iter()
        .map(|l| (l.lease_key.as_str(), l.lease_counter))
        .collect();
    let mut out: Vec<Observed> = second
        .into_iter()
        .map(|lease| {
            let first_counter = before.get(lease.lease_key.as_str()).copied();
            let state = match (&lease.lease_owner, first_counter) {
                (None, _) => LeaseState::Free,
                (Some(_), Some(c)) if c == lease.lease_counter => LeaseState::Stale,
                (Some(_), _) => LeaseState::Live,
            };
            Observed {
                lease,
                first_counter,
                state,
            }
        })
        .collect();
    out.sort_by(|a, b| a.lease.lease_key.cmp(&b.lease.lease_key));
    out
}

/// A checkpoint, short: sentinels as they are, long sequence numbers as `4959…123456`.
pub(crate) fn short_esn(esn: &kcl_kpl::ExtendedSequenceNumber) -> String {
    let seq = esn.sequence_str();
    let mut out = if esn.is_sentinel() || seq.len() <= 14 {
        seq.to_owned()
    } else {
        let head = seq.get(..4).unwrap_or(seq);
        let tail = seq.get(seq.len() - 6..).unwrap_or(seq);
        format!("{head}…{tail}")
    };
    if esn.sub_sequence_number() != 0 {
        out.push_str(&format!(".{}", esn.sub_sequence_number()));
    }
    out
}

/// Prints rows as a table with aligned columns (the first row is the header).
pub(crate) fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let width = widths.get(c).copied().unwrap_or(0);
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(width - cell.chars().count() + 2));
            }
        }
        println!("{}", line.trim_end());
    }
}

pub(crate) fn parse_millis(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("{s:?} is not a number of milliseconds"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl_kpl::ExtendedSequenceNumber;

    fn lease(key: &str, owner: Option<&str>, counter: u64) -> Lease {
        let mut l = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
        l.lease_owner = owner.map(str::to_owned);
        l.lease_counter = counter;
        l
    }

    #[test]
    fn states_from_two_reads() {
        let first = vec![
            lease("b", Some("w"), 3),
            lease("a", Some("w"), 5),
            lease("c", None, 1),
        ];
        let second = vec![
            lease("a", Some("w"), 6),
            lease("b", Some("w"), 3),
            lease("c", None, 1),
            lease("d", Some("v"), 1),
        ];
        let got: Vec<(String, LeaseState)> = classify(&first, second)
            .into_iter()
            .map(|o| (o.lease.lease_key, o.state))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".to_owned(), LeaseState::Live),
                ("b".to_owned(), LeaseState::Stale),
                ("c".to_owned(), LeaseState::Free),
                ("d".to_owned(), LeaseState::Live),
            ]
        );
    }

    #[test]
    fn short_checkpoints() {
        let long: ExtendedSequenceNumber =
            "49590338271490256608559692538361571095921575989136588898.3"
                .parse()
                .unwrap();
        assert_eq!(short_esn(&long), "4959…588898.3");
        assert_eq!(short_esn(&ExtendedSequenceNumber::SHARD_END), "SHARD_END");
        assert_eq!(short_esn(&"12".parse().unwrap()), "12");
    }
}
