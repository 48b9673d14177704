//! `kcl`: an operator's tool for a KCL application's lease table and stream.
//!
//! ```text
//! cargo install --path examples --bin kcl
//! kcl leases  --application A [--json] [--interval-ms 5000]
//! kcl workers --application A [--json] [--interval-ms 5000]
//! kcl lag     --application A --stream S [--json]
//! kcl reset   --application A (--shard ID | --all-shards)
//!             --to trim-horizon|latest|at-timestamp:RFC3339|sequence:N[.SUB] [--stream S] [--force]
//!             (sequence: with --shard only)
//! kcl decode  FILE|- [--input auto|raw|base64] [--hash-range START:END [--deliver-out-of-range]]
//! ```
//!
//! `leases` and `workers` also show the KCL 3.x state when the application has one (its
//! `<app>-CoordinatorState` table): the client version stored in `Migration3.0`, the leader
//! (the `Leader` item's owner, and whether it heartbeated between the two reads) and, per
//! worker, how old its `<app>-WorkerMetricStats` row is and whether a leader counts it
//! fresh. With `--json` these are the fields `client_version`, `leader` and, per worker,
//! `leader` and `metric_stats` (`null` / absent for an application without that table).
//!
//! The connection options `--region`, `--kinesis-endpoint`, `--dynamodb-endpoint`,
//! `--call-timeout` and `--call-attempt-timeout` go before or after the command; credentials
//! come from the AWS default chain, as for the consumer. An option given to a command it has
//! no effect on is refused (exit 2): any of them on `decode` (no AWS call),
//! `--kinesis-endpoint` on `leases` and `workers`, and on `reset` without `--stream` (no
//! Kinesis call). Errors name what is wrong and exit 1 (bad arguments: 2).

mod common;
mod decode;
mod kinesis;
mod lag;
mod leases;
mod protocol;
mod reset;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};

use common::Connection;

#[derive(Parser, Debug)]
#[command(
    name = "kcl",
    about = "Inspect and operate a KCL application: leases, workers, lag, checkpoints, records"
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One row per lease: shard, owner, counter, checkpoint, pending checkpoint, parents, and
    /// whether its counter moved between two reads (live / stale / free); with the KCL 3.x
    /// state, the client version and the leader.
    Leases(leases::TableArgs),
    /// The workers holding leases, their lease counts, and the balance; with the KCL 3.x
    /// state, each worker's WorkerMetricStats row (its age) and the leader.
    Workers(leases::TableArgs),
    /// Per shard, records and milliseconds from the checkpoint to the tip, and a total.
    Lag(lag::LagArgs),
    /// Moves checkpoints with fenced conditional writes.
    Reset(reset::ResetArgs),
    /// Decodes one Kinesis record's data: one JSON line per user record.
    Decode(decode::DecodeArgs),
}

impl Command {
    fn name(&self) -> &'static str {
        match self {
            Command::Leases(_) => "leases",
            Command::Workers(_) => "workers",
            Command::Lag(_) => "lag",
            Command::Reset(_) => "reset",
            Command::Decode(_) => "decode",
        }
    }

    /// The connection options this command makes no use of (their clap ids), and why.
    fn unused_connection_options(&self) -> (&'static [&'static str], &'static str) {
        const ALL: &[&str] = &[
            "region",
            "kinesis_endpoint",
            "dynamodb_endpoint",
            "call_timeout",
            "call_attempt_timeout",
        ];
        const KINESIS: &[&str] = &["kinesis_endpoint"];
        match self {
            Command::Decode(_) => (ALL, "it makes no AWS call"),
            Command::Leases(_) | Command::Workers(_) => (KINESIS, "it makes no Kinesis call"),
            Command::Reset(args) if !args.reads_stream() => {
                (KINESIS, "it makes no Kinesis call without --stream")
            }
            Command::Lag(_) | Command::Reset(_) => (&[], ""),
        }
    }
}

/// Parses the command line; a value or a combination of options that would not take effect
/// is a usage error (exit 2), as clap's own are.
fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = Cli::command().try_get_matches_from(args)?;
    let cli = Cli::from_arg_matches(&matches)?;
    let refusal = unused_options(&cli.command, &matches).or_else(|| match &cli.command {
        Command::Reset(args) => args.check().err(),
        _ => None,
    });
    match refusal {
        Some(msg) => {
            let mut command = Cli::command();
            command.build();
            let name = cli.command.name();
            let mut sub = command
                .find_subcommand(name)
                .cloned()
                .unwrap_or_else(Cli::command);
            Err(sub.error(clap::error::ErrorKind::ArgumentConflict, msg))
        }
        None => Ok(cli),
    }
}

/// The connection options given on the command line (not defaults) that `command` makes no
/// use of, as a message naming them.
fn unused_options(command: &Command, matches: &ArgMatches) -> Option<String> {
    let (unused, why) = command.unused_connection_options();
    let given: Vec<String> = unused
        .iter()
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect();
    match given.as_slice() {
        [] => None,
        [one] => Some(format!(
            "{one} has no effect on `kcl {}` ({why})",
            command.name()
        )),
        many => Some(format!(
            "{} have no effect on `kcl {}` ({why})",
            many.join(", "),
            command.name()
        )),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = parse(std::env::args_os()).unwrap_or_else(|e| e.exit());
    let conn = &cli.connection;
    let result = match &cli.command {
        Command::Leases(args) => leases::leases(conn, args).await,
        Command::Workers(args) => leases::workers(conn, args).await,
        Command::Lag(args) => lag::lag(conn, args).await,
        Command::Reset(args) => reset::reset(conn, args).await,
        Command::Decode(args) => decode::decode(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kcl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn kcl(args: &[&str]) -> Result<Cli, clap::Error> {
        parse(std::iter::once("kcl").chain(args.iter().copied()))
    }

    /// The usage error `args` get: its kind and message.
    fn refused(args: &[&str]) -> (ErrorKind, String) {
        match kcl(args) {
            Ok(cli) => panic!("{args:?} accepted: {cli:?}"),
            Err(e) => (e.kind(), e.to_string()),
        }
    }

    #[test]
    fn connection_options_a_command_does_not_use_are_refused() {
        for (args, flags, why) in [
            (
                &["decode", "-", "--region", "us-east-1"][..],
                "--region has no effect on `kcl decode`",
                "it makes no AWS call",
            ),
            (
                &[
                    "--kinesis-endpoint",
                    "http://127.0.0.1:1",
                    "decode",
                    "f",
                    "--call-timeout",
                    "5",
                    "--dynamodb-endpoint",
                    "http://127.0.0.1:2",
                    "--call-attempt-timeout",
                    "1",
                ][..],
                "--kinesis-endpoint, --dynamodb-endpoint, --call-timeout, --call-attempt-timeout have no effect on `kcl decode`",
                "it makes no AWS call",
            ),
            (
                &[
                    "leases",
                    "--application",
                    "a",
                    "--kinesis-endpoint",
                    "http://127.0.0.1:1",
                ][..],
                "--kinesis-endpoint has no effect on `kcl leases`",
                "it makes no Kinesis call",
            ),
            (
                &[
                    "--kinesis-endpoint",
                    "http://127.0.0.1:1",
                    "workers",
                    "--application",
                    "a",
                ][..],
                "--kinesis-endpoint has no effect on `kcl workers`",
                "it makes no Kinesis call",
            ),
            (
                &[
                    "reset",
                    "--application",
                    "a",
                    "--shard",
                    "s",
                    "--to",
                    "latest",
                    "--kinesis-endpoint",
                    "http://127.0.0.1:1",
                ][..],
                "--kinesis-endpoint has no effect on `kcl reset`",
                "it makes no Kinesis call without --stream",
            ),
        ] {
            let (kind, msg) = refused(args);
            assert_eq!(kind, ErrorKind::ArgumentConflict, "{msg}");
            assert!(msg.contains(flags) && msg.contains(why), "{args:?}: {msg}");
        }
    }

    #[test]
    fn connection_options_a_command_uses_are_accepted() {
        let endpoints = [
            "--region",
            "us-east-1",
            "--kinesis-endpoint",
            "http://127.0.0.1:1",
            "--dynamodb-endpoint",
            "http://127.0.0.1:2",
            "--call-timeout",
            "5",
            "--call-attempt-timeout",
            "1",
        ];
        let with = |args: &[&str]| -> Vec<String> {
            args.iter()
                .chain(endpoints.iter())
                .map(|s| (*s).to_owned())
                .collect()
        };
        let lag = with(&["lag", "--application", "a", "--stream", "s"]);
        let cli = parse(std::iter::once("kcl".to_owned()).chain(lag)).unwrap();
        assert_eq!(cli.connection.call_timeout, 5);
        assert_eq!(
            cli.connection.kinesis_endpoint.as_deref(),
            Some("http://127.0.0.1:1")
        );
        let reset = with(&[
            "reset",
            "--application",
            "a",
            "--shard",
            "s",
            "--to",
            "latest",
            "--stream",
            "s",
        ]);
        assert!(parse(std::iter::once("kcl".to_owned()).chain(reset)).is_ok());
        // Without the Kinesis endpoint, leases and workers take the rest.
        for command in ["leases", "workers"] {
            let mut args = vec!["kcl", command, "--application", "a"];
            args.extend(
                endpoints
                    .iter()
                    .copied()
                    .filter(|a| !a.contains("kinesis") && !a.starts_with("http://127.0.0.1:1")),
            );
            let cli = parse(args).unwrap();
            assert_eq!(cli.connection.call_attempt_timeout, 1, "{command}");
            assert_eq!(
                cli.connection.dynamodb_endpoint.as_deref(),
                Some("http://127.0.0.1:2")
            );
        }
        // Defaults are not "given": decode takes none and is accepted.
        let cli = kcl(&["decode", "-"]).unwrap();
        assert_eq!(cli.connection.call_timeout, 10_000);
    }

    #[test]
    fn reset_combinations_that_cannot_be_carried_out_are_refused() {
        let (kind, msg) = refused(&[
            "reset",
            "--application",
            "a",
            "--all-shards",
            "--to",
            "sequence:42",
        ]);
        assert_eq!(kind, ErrorKind::ArgumentConflict);
        assert!(
            msg.contains("--to sequence:N cannot go with --all-shards"),
            "{msg}"
        );
        let (_, msg) = refused(&[
            "reset",
            "--application",
            "a",
            "--shard",
            "s",
            "--to",
            "at-timestamp:2020-01-01T00:00:00Z",
        ]);
        assert!(msg.contains("--to at-timestamp needs --stream"), "{msg}");
        let (_, msg) = refused(&[
            "reset",
            "--application",
            "a",
            "--shard",
            "s",
            "--stream",
            "x",
            "--to",
            "at-timestamp:2999-01-01T00:00:00Z",
        ]);
        assert!(msg.contains("in the future"), "{msg}");
        // One shard to a sequence number is fine, and so is every shard to a sentinel.
        kcl(&[
            "reset",
            "--application",
            "a",
            "--shard",
            "s",
            "--to",
            "sequence:42",
        ])
        .unwrap();
        kcl(&[
            "reset",
            "--application",
            "a",
            "--all-shards",
            "--to",
            "trim-horizon",
        ])
        .unwrap();
    }

    #[test]
    fn options_without_the_option_they_qualify_are_refused() {
        let (kind, msg) = refused(&["decode", "-", "--deliver-out-of-range"]);
        assert_eq!(kind, ErrorKind::MissingRequiredArgument, "{msg}");
        assert!(msg.contains("--hash-range"), "{msg}");
        let cli = kcl(&[
            "decode",
            "-",
            "--hash-range",
            "0:100",
            "--deliver-out-of-range",
        ]);
        assert!(cli.is_ok(), "{cli:?}");
        let (kind, msg) = refused(&[
            "lag",
            "--application",
            "a",
            "--stream",
            "s",
            "--max-calls-per-shard",
            "0",
        ]);
        assert_eq!(kind, ErrorKind::ValueValidation, "{msg}");
        assert!(msg.contains("--max-calls-per-shard"), "{msg}");
    }
}
