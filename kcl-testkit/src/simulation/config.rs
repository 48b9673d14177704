//! The configuration of a simulation run.

use std::time::Duration;

use kcl_lease::{RandomSource, SeededRandom};

/// The lease protocol a simulated fleet runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseProtocol {
    /// The KCL 2.x protocol: a lease store without the 3.x state tables, every worker takes
    /// leases itself.
    #[default]
    V2x,
    /// The KCL 3.x protocol: the store has its `<app>-CoordinatorState` and
    /// `<app>-WorkerMetricStats` tables and every worker is configured
    /// `ClientVersionConfig::V3x` (a leader assigns, followers discover).
    V3x,
    /// A migration: the workers start `ClientVersionConfig::CompatibleWith2x` (the
    /// application in `CLIENT_VERSION_UPGRADE_FROM_2X`, 2.x taker), the driver writes
    /// `CLIENT_VERSION_3X_WITH_ROLLBACK` mid-run (as the Java 2.x leader or an operator
    /// does), workers started after that are configured either way (a 3.x one completes
    /// the upgrade to `CLIENT_VERSION_3X`), and the running ones switch to the leader
    /// protocol while records flow, when their migration monitor reads the item (60 to
    /// 90 s after their start). The production phase is stretched to about two minutes so
    /// the switches happen under load and faults.
    Migration,
}

impl LeaseProtocol {
    /// Whether the store has the 3.x state tables (every protocol but 2.x).
    pub fn has_state_tables(self) -> bool {
        self != LeaseProtocol::V2x
    }
}

/// What one simulation run does. [`SimulationConfig::new`] derives the sizes from the seed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SimulationConfig {
    /// The seed every random choice derives from.
    pub seed: u64,
    /// Workers running at the start (the schedule keeps at least one running).
    pub workers: usize,
    /// Shards of the stream at the start.
    pub shards: u32,
    /// User records the producer writes.
    pub records: usize,
    /// Distinct partition keys.
    pub keys: usize,
    /// Whether to inject faults (crashes, stops, resharding, throttling, ...).
    pub faults: bool,
    /// Whether the faults include hangs: calls that never complete, and a path on which
    /// every call started for a while hangs for good (on by default; only with `faults`).
    pub hangs: bool,
    /// Most fault events in the schedule (at least one is drawn when `faults` is on).
    pub max_faults: usize,
    /// How long (virtual time) to wait for every record after the producer finished.
    pub drain_limit: Duration,
    /// Whether workers read by enhanced fan-out: `true` (the default) mixes fan-out and
    /// polling workers in the one application (each worker's choice derived from the seed,
    /// both kinds present whenever two or more workers run) and adds the fan-out faults
    /// (subscription errors mid-stream, silent subscriptions); `false` polls only.
    pub fan_out: bool,
    /// The lease protocol of the fleet (see [`LeaseProtocol`]). With state tables the
    /// faults also hit them: failed, throttled, lost-answer and hanging calls, and spells
    /// in which one worker is cut off from DynamoDB (lease and state tables) while it
    /// still reaches Kinesis.
    pub protocol: LeaseProtocol,
    /// The workers' `handoff_timeout`: how long a graceful handoff may take before the next
    /// owner (2.x) or the leader (3.x) ends it as an ordinary take. Drawn short for most
    /// seeds, so that handoffs time out while the handing-over processor still runs (its
    /// worker notices the handoff only at its next renewal, and the schedule slows
    /// processors' `shutdown` down and faults the store right after a handoff began).
    pub handoff_timeout: Duration,
}

impl SimulationConfig {
    /// The configuration for `seed`: 3 workers, 4 shards, 300 to 800 records under 10 to
    /// 40 keys, faults on (1 to 6 fault events), hangs among them; the protocol drawn
    /// from the seed: 2.x for half the seeds, 3.x for 45 in 100, a migration from 2.x to
    /// 3.x for one in twenty; the `handoff_timeout` 0.3 to 5 s for four seeds in five, the
    /// default 30 s for the others.
    pub fn new(seed: u64) -> Self {
        let rng = SeededRandom::new(seed ^ 0x5EED_C0F1_6000_0001);
        let records = 300 + rng.below(501) as usize;
        let keys = 10 + rng.below(31) as usize;
        // Drawn last, so the sizes of every seed stay as they were.
        let protocol = match rng.below(40) {
            0..=19 => LeaseProtocol::V2x,
            20..=37 => LeaseProtocol::V3x,
            _ => LeaseProtocol::Migration,
        };
        // From a source of its own, so every other draw stays as it was.
        let handoff_rng = SeededRandom::new(seed ^ 0x4A4D_0FF0_7100_0005);
        let handoff_timeout = if handoff_rng.below(5) == 0 {
            kcl_lease::coordinator::DEFAULT_HANDOFF_TIMEOUT
        } else {
            Duration::from_millis(300 + handoff_rng.below(4_701))
        };
        Self {
            seed,
            workers: 3,
            shards: 4,
            records,
            keys,
            faults: true,
            hangs: true,
            max_faults: 6,
            drain_limit: Duration::from_secs(600),
            fan_out: true,
            protocol,
            handoff_timeout,
        }
    }

    /// Sets the workers' `handoff_timeout`.
    pub fn handoff_timeout(mut self, handoff_timeout: Duration) -> Self {
        self.handoff_timeout = handoff_timeout;
        self
    }

    /// Sets the lease protocol of the fleet.
    pub fn protocol(mut self, protocol: LeaseProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Sets the number of workers at the start (at least 1).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Sets the number of shards at the start (at least 1).
    pub fn shards(mut self, shards: u32) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// Sets the number of records.
    pub fn records(mut self, records: usize) -> Self {
        self.records = records;
        self
    }

    /// Sets the number of partition keys (at least 1).
    pub fn keys(mut self, keys: usize) -> Self {
        self.keys = keys.max(1);
        self
    }

    /// Turns the hang faults on or off (the other faults stay as `faults` says).
    pub fn hangs(mut self, hangs: bool) -> Self {
        self.hangs = hangs;
        self
    }

    /// Mixes fan-out workers with polling ones (`true`) or polls only (`false`).
    pub fn fan_out(mut self, fan_out: bool) -> Self {
        self.fan_out = fan_out;
        self
    }

    /// Turns fault injection on or off.
    pub fn faults(mut self, faults: bool) -> Self {
        self.faults = faults;
        self
    }
}
