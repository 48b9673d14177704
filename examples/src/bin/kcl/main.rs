//! `kcl`: an operator's tool for a KCL application's lease table and stream.
//!
//! ```text
//! cargo install --path examples --bin kcl
//! kcl leases  --application A [--json] [--interval-ms 5000]
//! kcl workers --application A [--json] [--interval-ms 5000]
//! kcl lag     --application A --stream S [--json]
//! kcl reset   --application A (--shard ID | --all-shards)
//!             --to trim-horizon|latest|at-timestamp:RFC3339|sequence:N[.SUB] [--stream S] [--force]
//! kcl decode  FILE|- [--input auto|raw|base64] [--hash-range START:END]
//! ```
//!
//! `leases` and `workers` also show the KCL 3.x state when the application has one (its
//! `<app>-CoordinatorState` table): the client version stored in `Migration3.0`, the leader
//! (the `Leader` item's owner, and whether it heartbeated between the two reads) and, per
//! worker, how old its `<app>-WorkerMetricStats` row is and whether a leader counts it
//! fresh. With `--json` these are the fields `client_version`, `leader` and, per worker,
//! `leader` and `metric_stats` (`null` / absent for an application without that table).
//!
//! Every command takes `--region`, `--kinesis-endpoint`, `--dynamodb-endpoint`,
//! `--call-timeout` and `--call-attempt-timeout`; credentials come from the AWS default
//! chain, as for the consumer. Errors name what is wrong and exit 1 (bad arguments: 2).

mod common;
mod decode;
mod kinesis;
mod lag;
mod leases;
mod protocol;
mod reset;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
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
