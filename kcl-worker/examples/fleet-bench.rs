//! How fast a fleet of workers balances its leases, and at what cost, on the in-memory
//! Kinesis and lease store in real time: a cold start of W workers started together on S
//! fresh shards, then (with `--scale-out N`) N more workers joining the balanced fleet. A
//! producer puts records all along; the recording processors checkpoint every batch and in
//! `shutdown(Requested)`.
//!
//! `cargo run --release -q -p kcl-worker --example fleet-bench [-- --workers 10 --shards 1000
//! --failover-ms 2000 --scale-out 5 --rate 500]` (`--no-default-features` builds faster:
//! no AWS SDK).
//!
//! For each phase it prints one line
//! `workers=W shards=S balanced_after_s=T take_interval_s=I zombies=Z redelivered=R`
//! (`--scale-in N` then stops N workers gracefully and says where their leases went)
//! (the cold start's last): `T` is how long after the phase began the fleet last became
//! balanced (every lease held, no handoff in flight, held counts differing by at most one)
//! and stayed so until the phase ended; `I` the configured take interval (`failover_time /
//! 2`, the longest time between two taker passes; not measured); `Z` the processors shut
//! down as `Zombie` in the phase; `R` the records delivered again in the phase (by shard and
//! sequence number). `FLEET_BENCH_TRACE=1` prints the fleet's state every 200 ms on stderr.
//!
//! Arguments the bench cannot run with (`--workers 0`, `--shards 0`, a `--failover-ms` a
//! worker refuses, `--rate 0`, a `--scale-in` that would stop every worker, an unknown
//! argument, a value that is not a whole number) are an error naming the argument, with
//! exit status 2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kcl_interfaces::ShutdownReason;
use kcl_worker::WorkerHandle;
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::recording::{Behaviour, Event};

struct Args {
    workers: usize,
    shards: u32,
    failover: Duration,
    scale_out: usize,
    scale_in: usize,
    rate: u64,
    settle: Duration,
    limit: Duration,
}

/// The largest `--rate`: one record per microsecond (the producer's tick).
const MAX_RATE: u64 = 1_000_000;

/// What is wrong with the arguments; each names the argument.
#[derive(Debug)]
enum ArgError {
    /// An argument without its value.
    MissingValue { name: String },
    /// A value that is not a whole number.
    NotANumber { name: String, value: String },
    /// A whole number the bench cannot run with.
    OutOfRange {
        name: &'static str,
        value: u64,
        reason: String,
    },
    /// An argument the bench does not know.
    Unknown { name: String },
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgError::MissingValue { name } => write!(f, "{name} needs a value"),
            ArgError::NotANumber { name, value } => {
                write!(f, "{name} needs a whole number, got {value:?}")
            }
            ArgError::OutOfRange {
                name,
                value,
                reason,
            } => write!(f, "{name} {value}: {reason}"),
            ArgError::Unknown { name } => write!(
                f,
                "unknown argument {name} (--workers, --shards, --failover-ms, --scale-out, --scale-in, --rate, --settle-ms, --limit-s)"
            ),
        }
    }
}

impl std::error::Error for ArgError {}

/// `value` of `name` when `ok`, else [`ArgError::OutOfRange`] with `reason`.
fn in_range(name: &'static str, value: u64, ok: bool, reason: &str) -> Result<u64, ArgError> {
    if ok {
        Ok(value)
    } else {
        Err(ArgError::OutOfRange {
            name,
            value,
            reason: reason.to_owned(),
        })
    }
}

/// `value` of `name` as a `usize`.
fn count(name: &'static str, value: u64) -> Result<usize, ArgError> {
    usize::try_from(value).map_err(|_| ArgError::OutOfRange {
        name,
        value,
        reason: "too large".to_owned(),
    })
}

/// The arguments, or what is wrong with them.
fn args() -> Result<Args, ArgError> {
    let mut args = Args {
        workers: 10,
        shards: 1000,
        failover: Duration::from_millis(2000),
        scale_out: 0,
        scale_in: 0,
        rate: 500,
        settle: Duration::ZERO,
        limit: Duration::from_secs(180),
    };
    let min_failover = kcl_lease::coordinator::MIN_FAILOVER_TIME.as_millis();
    let max_failover = kcl_lease::coordinator::MAX_FAILOVER_TIME.as_millis();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    for pair in raw.chunks(2) {
        let (name, value) = match pair {
            [name, value] => (name.as_str(), value.as_str()),
            [name] => {
                return Err(ArgError::MissingValue { name: name.clone() });
            }
            _ => continue,
        };
        let number: u64 = value.parse().map_err(|_| ArgError::NotANumber {
            name: name.to_owned(),
            value: value.to_owned(),
        })?;
        match name {
            "--workers" => {
                let n = in_range("--workers", number, number >= 1, "at least one worker")?;
                args.workers = count("--workers", n)?;
            }
            "--shards" => {
                let n = in_range("--shards", number, number >= 1, "at least one shard")?;
                args.shards = u32::try_from(n).map_err(|_| ArgError::OutOfRange {
                    name: "--shards",
                    value: n,
                    reason: "too large".to_owned(),
                })?;
            }
            "--failover-ms" => {
                let ms = in_range(
                    "--failover-ms",
                    number,
                    u128::from(number) >= min_failover && u128::from(number) <= max_failover,
                    &format!(
                        "the failover time must be {min_failover} to {max_failover} ms (what a worker accepts)"
                    ),
                )?;
                args.failover = Duration::from_millis(ms);
            }
            "--scale-out" => args.scale_out = count("--scale-out", number)?,
            "--scale-in" => args.scale_in = count("--scale-in", number)?,
            "--rate" => {
                args.rate = in_range(
                    "--rate",
                    number,
                    (1..=MAX_RATE).contains(&number),
                    &format!("records per second, 1 to {MAX_RATE}"),
                )?;
            }
            "--settle-ms" => args.settle = Duration::from_millis(number),
            "--limit-s" => args.limit = Duration::from_secs(number),
            other => {
                return Err(ArgError::Unknown {
                    name: other.to_owned(),
                });
            }
        }
    }
    // Scale-in stops workers of the fleet after the scale-out: at least one must remain.
    let fleet = args.workers.saturating_add(args.scale_out);
    if args.scale_in >= fleet {
        return Err(ArgError::OutOfRange {
            name: "--scale-in",
            value: args.scale_in as u64,
            reason: format!(
                "must leave at least one of the {fleet} workers (--workers plus --scale-out) running"
            ),
        });
    }
    if args.settle.is_zero() {
        // Long enough to see a balance that does not hold: several taker intervals.
        args.settle = args.failover * 4;
    }
    Ok(args)
}

/// True when every lease is held, none is in a handoff, and the held counts differ by at
/// most one.
fn balanced(fleet: &Fleet, workers: &[WorkerHandle], shards: usize) -> bool {
    let counts: Vec<usize> = workers.iter().map(|w| w.held_leases().len()).collect();
    let (Some(max), Some(min)) = (counts.iter().max(), counts.iter().min()) else {
        return false;
    };
    let rows = fleet.store().snapshot();
    counts.iter().sum::<usize>() == shards
        && max - min <= 1
        && rows.iter().all(|l| l.checkpoint_owner.is_none())
}

/// Waits until the fleet is balanced and stays so for `settle`; returns when it last
/// became balanced, measured from `start`; exits the process when that takes `limit`.
async fn balance(
    fleet: &Fleet,
    workers: &[WorkerHandle],
    shards: usize,
    start: Instant,
    settle: Duration,
    limit: Duration,
) -> Duration {
    let mut since: Option<Instant> = None;
    let trace = std::env::var_os("FLEET_BENCH_TRACE").is_some();
    let mut traced = Instant::now();
    loop {
        let now = Instant::now();
        if trace && now.duration_since(traced) >= Duration::from_millis(200) {
            traced = now;
            let held: Vec<usize> = workers.iter().map(|w| w.held_leases().len()).collect();
            let in_flight = fleet
                .store()
                .snapshot()
                .iter()
                .filter(|l| l.checkpoint_owner.is_some())
                .count();
            eprintln!(
                "# t={:.1}s held min {} max {} sum {}, handoffs in flight {in_flight}",
                now.duration_since(start).as_secs_f64(),
                held.iter().min().unwrap_or(&0),
                held.iter().max().unwrap_or(&0),
                held.iter().sum::<usize>()
            );
        }
        if balanced(fleet, workers, shards) {
            let at = *since.get_or_insert(now);
            if now.duration_since(at) >= settle {
                return at.duration_since(start);
            }
        } else {
            since = None;
        }
        if now.duration_since(start) >= limit {
            let held: Vec<usize> = workers.iter().map(|w| w.held_leases().len()).collect();
            eprintln!("fleet-bench: not balanced within {limit:?} (--limit-s): held {held:?}");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Zombie shutdowns and redelivered records among `events`.
fn costs(events: &[Event]) -> (usize, usize) {
    let mut zombies = 0;
    let mut seen = HashSet::new();
    let mut redelivered = 0;
    for event in events {
        match event {
            Event::Shutdown {
                reason: ShutdownReason::Zombie,
                ..
            } => zombies += 1,
            Event::Delivered { shard, records, .. } => {
                for r in records {
                    if !seen.insert((shard.clone(), r.extended_sequence_number())) {
                        redelivered += 1;
                    }
                }
            }
            _ => {}
        }
    }
    (zombies, redelivered)
}

async fn start_workers(fleet: &Fleet, ids: std::ops::Range<usize>) -> Vec<WorkerHandle> {
    let starts = ids.map(|i| {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            fleet
                .start(&format!("worker-{i:03}"), Behaviour::new())
                .await
                .unwrap()
                .0
        })
    });
    let mut workers = Vec::new();
    for start in starts.collect::<Vec<_>>() {
        workers.push(start.await.unwrap());
    }
    workers
}

fn report(workers: usize, shards: u32, took: Duration, take: Duration, costs: (usize, usize)) {
    println!(
        "workers={workers} shards={shards} balanced_after_s={:.1} take_interval_s={:.1} zombies={} redelivered={}",
        took.as_secs_f64(),
        take.as_secs_f64(),
        costs.0,
        costs.1
    );
}

async fn run(args: Args) {
    let failover = args.failover;
    let fleet = Fleet::new("fleet-bench", args.shards)
        .unwrap()
        .with_defaults(move |builder| {
            builder
                .failover_time(failover)
                .idle_time_between_reads(Duration::from_millis(250))
                .shard_sync_interval(Duration::from_secs(60))
        });
    let take_interval = failover / 2;

    // A producer all along: records on every shard while leases move.
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let fleet = fleet.clone();
        let producing = producing.clone();
        let rate = args.rate;
        tokio::spawn(async move {
            let mut n: u64 = 0;
            let every = Duration::from_micros(1_000_000 / rate);
            let mut tick = tokio::time::interval(every);
            while producing.load(Ordering::Relaxed) {
                tick.tick().await;
                fleet
                    .put_plain(&format!("key-{}", n % 100_003), &format!("record-{n}"))
                    .unwrap();
                n += 1;
            }
        })
    };

    let start = Instant::now();
    let mut workers = start_workers(&fleet, 0..args.workers).await;
    let cold = balance(
        &fleet,
        &workers,
        args.shards as usize,
        start,
        args.settle,
        args.limit,
    )
    .await;
    let cold_events = fleet.log().events();
    let cold_costs = costs(&cold_events);

    let mut scale_out = None;
    if args.scale_out > 0 {
        let start = Instant::now();
        let more = start_workers(&fleet, args.workers..args.workers + args.scale_out).await;
        workers.extend(more);
        let took = balance(
            &fleet,
            &workers,
            args.shards as usize,
            start,
            args.settle,
            args.limit,
        )
        .await;
        let events = fleet.log().events();
        let all = costs(&events);
        // The phase's own: the events after the cold start's.
        let phase = (all.0 - cold_costs.0, all.1 - cold_costs.1);
        scale_out = Some((took, phase));
    }

    // Scale-in: the last workers stop gracefully; where do their leases go?
    let mut scale_in = None;
    if args.scale_in > 0 {
        let before = fleet.log().events();
        let before_costs = costs(&before);
        let leaving = workers.split_off(workers.len() - args.scale_in);
        let left_behind: HashSet<String> = leaving
            .iter()
            .flat_map(|w| w.held_leases())
            .map(|l| l.lease_key)
            .collect();
        let start = Instant::now();
        let stops = leaving.into_iter().map(|w| {
            let fleet = fleet.clone();
            tokio::spawn(async move { fleet.stop(w).await })
        });
        for stop in stops.collect::<Vec<_>>() {
            let _ = stop.await;
        }
        let took = balance(
            &fleet,
            &workers,
            args.shards as usize,
            start,
            args.settle,
            args.limit,
        )
        .await;
        let events = fleet.log().events();
        let all = costs(&events);
        let phase = (all.0 - before_costs.0, all.1 - before_costs.1);
        let mut takers: std::collections::BTreeMap<String, usize> = Default::default();
        for w in &workers {
            let n = w
                .held_leases()
                .iter()
                .filter(|l| left_behind.contains(&l.lease_key))
                .count();
            if n > 0 {
                takers.insert(w.worker_id().to_owned(), n);
            }
        }
        scale_in = Some((took, phase, left_behind.len(), takers));
    }

    producing.store(false, Ordering::Relaxed);
    let _ = producer.await;
    for worker in workers.drain(..) {
        let _ = fleet.stop(worker).await;
    }
    println!("# records delivered: {}", fleet.log().delivered_count());
    if let Some((took, phase, leases, takers)) = scale_in {
        let most = takers.values().max().copied().unwrap_or(0);
        println!(
            "# scale-in: {} workers stopped gracefully; their {leases} leases went to {} workers (at most {most} to one)",
            args.scale_in,
            takers.len()
        );
        let remaining = args.workers + args.scale_out - args.scale_in;
        report(remaining, args.shards, took, take_interval, phase);
    }
    if let Some((took, phase)) = scale_out {
        println!(
            "# scale-out: {} workers joining the balanced fleet",
            args.scale_out
        );
        report(
            args.workers + args.scale_out,
            args.shards,
            took,
            take_interval,
            phase,
        );
        println!("# cold start");
    }
    report(args.workers, args.shards, cold, take_interval, cold_costs);
}

fn main() {
    let args = match args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fleet-bench: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(args));
}
