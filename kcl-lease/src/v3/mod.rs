//! Groundwork for the Java KCL 3.x protocol (issue 13): the items of its state tables,
//! the leader lock, the migration state machine, the worker utilisation sampler and a pure
//! lease assignment planner.
//!
//! [`runtime::ProtocolRuntime`] runs it beside a worker's lease coordinator: the worker
//! starts it whenever its lease store has state tables
//! ([`crate::LeaseStore::state_tables`]: a DynamoDB store always, the in-memory one when
//! asked), whatever the configured [`migration::ClientVersionConfig`]; the version stored
//! in `Migration3.0` then decides the protocol, as for a Java worker.
//!
//! | module | what |
//! |---|---|
//! | [`item`] | [`Value`](item::Value), [`Item`](item::Item), [`Condition`](item::Condition): DynamoDB's data model in our types |
//! | [`table`] | [`StateTable`](table::StateTable): a table of items keyed by one string, conditional writes, [`bounded`](table::bounded) calls |
//! | `memory` | `InMemoryStateTable` (feature `test-util`): conditions really evaluated, faults, call counts |
//! | `dynamo` | `DynamoStateTable` (feature `dynamodb`): the same on DynamoDB |
//! | [`worker_metrics`] | the `<app>-WorkerMetricStats` row, its validity and freshness, and the recorder that turns samples into a row |
//! | [`utilisation`] | the CPU utilisation sampler: cgroup v2, cgroup v1 or `/proc/stat`, under an injected filesystem root |
//! | [`lock`] | the `Leader` lock item of the DynamoDB Lock Client and [`LeaderLock`](lock::LeaderLock) |
//! | [`migration`] | the `Migration3.0` item, the client versions and the pure transition rules |
//! | [`assignment`] | the leader's assignment planner: unassigned and expired first, then balance by utilisation and throughput |
//! | [`discovery`] | the follower's discovery of its assigned leases through the lease owner index |
//! | [`election`] | the Java KCL's 2.x-mode leader (deterministic shuffle), who checks readiness for 3.x |
//! | [`runtime`] | the tasks a worker runs: reporter, leader lock, assignment, discovery, migration monitor |
//!
//! # The Java KCL 3.x protocol, as read from its source
//!
//! Facts from the Java KCL 3.1.3 (the version measured in `JAVA_KCL.md`) and the DynamoDB
//! Lock Client 1.3.0 it bundles; newer versions are noted where they differ. They are
//! restated in our words; each module gives the detail it implements.
//!
//! ## Tables
//!
//! * `<app>-CoordinatorState`, HASH `key` (S): the `Migration3.0` item and the `Leader`
//!   lock item. Created by every 3.x worker at start (whatever its client version).
//! * `<app>-WorkerMetricStats`, HASH `wid` (S): one row per worker. Created when a worker
//!   starts reporting (modes `UPGRADE_FROM_2X`, `3X_WITH_ROLLBACK`, `3X`).
//! * The lease table gets the GSI `LeaseOwnerToLeaseKeyIndex` (HASH `leaseOwner`, RANGE
//!   `leaseKey`, KEYS_ONLY). In 3.x a worker waits (up to 10 minutes) for it to be ACTIVE.
//! * From 3.5 the Java KCL can keep all of these items in the lease table itself, tagged
//!   by `entityType` (our lease store already skips rows that are not leases). 3.1.3 uses
//!   the separate tables.
//!
//! ## `<app>-WorkerMetricStats` rows ([`worker_metrics`])
//!
//! `wid` (S, the worker id), `lut` (N, wall-clock epoch **seconds** of the report), `sts`
//! (M: metric short name to L of N, the last 10 reported values, oldest first) and `opr`
//! (M: metric short name to L of N, `[max utilisation]`, 100 for CPU). Short names: `C`
//! CPU, `M` memory, `NI`/`NO` network in/out, `T` throughput. A worker samples each metric
//! every second in memory and, every 30 s (`workerMetricsReporterFreqInMillis`), writes
//! the average of the samples since its last report (6 decimals), or `-1` when it has none,
//! appended to the last 10 values; the write is an unconditional UpdateItem of those four
//! attributes. There is no TTL attribute: the leader deletes a row whose `lut` is older
//! than one day (`staleWorkerMetricsEntryCleanupDuration`), conditionally on `lut` being
//! unchanged. CPU comes from ECS metadata, cgroup v2 (`cpu.stat` `usage_usec` over
//! `cpu.max`), cgroup v1 (`cpuacct.usage` over `cpu.cfs_quota_us`/`cpu.cfs_period_us`) or
//! `/proc/stat`, picked by probing EC2/ECS/EKS metadata; with none found (or
//! `disableWorkerMetrics`) the row has empty `sts` and `opr`, and the leader then balances
//! that worker by throughput alone.
//!
//! What the leader reads: a scan of the whole table at every assignment run. A row is
//! *valid* when `lut` is present and every metric in `sts` has an `opr` entry whose first
//! value is not 0 (empty maps are valid: "default" metrics). A worker is *active* when its
//! `lut` is at most 2 × 30 s old by the leader's wall clock and no metric's last value is
//! `-1`. Only active workers receive leases or have leases moved away for balance. Each
//! metric's value is an exponential moving average (α = 0.5) of its stored values, `-1`s
//! skipped.
//!
//! ## The leader lock ([`lock`])
//!
//! The DynamoDB Lock Client with partition key name `key`, lock key `Leader`, lease
//! duration 120 s, heartbeat every 30 s by a background thread, no sort key. The item:
//! `key`, `ownerName` (worker id), `leaseDuration` (S, ms), `recordVersionNumber` (S, a
//! UUID, new on every write), optional `isReleased` = `"1"` and `data`. Acquire is a
//! PutItem conditioned on the item being absent, released, or still at the record version
//! number the contender saw; heartbeat is an UpdateItem of `leaseDuration` and a new
//! number conditioned on number and owner; release (on shutdown, or after 3 failed
//! assignment runs in a row) deletes the item conditioned the same way. A contender never
//! trusts a time in the item: the lock is expired for it when the same number has stood
//! for longer than the item's `leaseDuration` since it first saw that number, on its own
//! monotonic clock. A Java worker that is not the leader looks at the lock only when one of
//! its components asks (the assignment run every 2 × failover time) and at most once per
//! heartbeat period (30 s), so a crashed Java leader is replaced two to three minutes after
//! its last heartbeat; a released lock at the next check.
//!
//! ## The migration state ([`migration`])
//!
//! Item `key` = `Migration3.0`: `cv` (S, the client version), `mb` (S, the worker that
//! last modified it), `mts` (N, epoch ms of that change), `h` (L of M `{cv, mb, mts}`,
//! the previous states, newest first, at most 10). Client versions and what a worker runs
//! in each:
//!
//! | `cv` | lease assignment | leader election | writes WorkerMetricStats | watches |
//! |---|---|---|---|---|
//! | `CLIENT_VERSION_UPGRADE_FROM_2X` | 2.x taker | 2.x (deterministic shuffle of lease owners) | yes | readiness (leader), `cv` changes |
//! | `CLIENT_VERSION_2X` | 2.x taker | 2.x | no | `cv` changes (roll-forward) |
//! | `CLIENT_VERSION_3X_WITH_ROLLBACK` | leader + LeaseAssignmentManager | DynamoDB lock | yes | `cv` changes (rollback) |
//! | `CLIENT_VERSION_3X` | leader + LeaseAssignmentManager | DynamoDB lock | yes | nothing |
//!
//! At start a worker reads the item (creating it if absent, with the version its config
//! implies: `UPGRADE_FROM_2X` for `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X`, `3X` for
//! `CLIENT_VERSION_CONFIG_3X`) and runs the stored version, except that a worker
//! configured for 3.x finding `3X_WITH_ROLLBACK` moves the application on to `3X`.
//! Changes are conditional on `cv` still being what was read. While running, every worker
//! reads the item every minute (first read after 60-90 s) and moves: from `UPGRADE_FROM_2X`
//! to `2X` or `3X_WITH_ROLLBACK`; from `2X` to `UPGRADE_FROM_2X`; from `3X_WITH_ROLLBACK` to
//! `2X` or `3X`; anything else is logged and ignored. Only the migration tool writes `2X`
//! and `3X` (a 3.x-configured worker writes `3X` at start too). The one automatic write:
//! in `UPGRADE_FROM_2X` the 2.x leader checks every minute that the GSI is ACTIVE and that
//! every lease owner (a free lease counts as the owner "none", which has no row) has a
//! WorkerMetricStats row less than 60 s old; once that has held for 10 minutes in a row it
//! writes `3X_WITH_ROLLBACK`.
//!
//! ## Lease assignment ([`assignment`])
//!
//! The leader's LeaseAssignmentManager runs every `leaseAssignmentIntervalMillis`
//! (default 2 × failover time). Each run: scan every lease and every WorkerMetricStats row;
//! judge each lease's expiry locally (its counter unchanged for the failover time since
//! this leader first saw it; a new leader starts with no history, so it can only judge
//! unowned leases at first); assign unassigned and expired leases first (unassigned first,
//! then longest expired), each to the active worker with the most room below the fleet
//! average utilisation; then, every third run, balance: per metric, workers more than 10 %
//! above the fleet average (or above their operating range) give up throughput worth
//! `(value - average) / value × 60 %` of their assigned throughput, in leases whose
//! throughput fits (or the smallest one), each to the worker with the most room unless that
//! would push it above the average; workers at `maxLeasesForWorker` or
//! `maxThroughputPerHostKBps` get nothing. A lease's throughput is its `throughputKBps`, or
//! the average of all leases when it has none.
//!
//! Writes: a lease that is free, expired or at SHARD_END is *assigned*: UpdateItem
//! `SET leaseOwner = :new, REMOVE checkpointOwner, ADD leaseCounter 1` (and
//! `ownerSwitchesSinceCheckpoint + 1` when the owner changes), conditioned on `leaseOwner`
//! and `checkpointOwner` being what the leader read (or absent) and `leaseKey` existing. A
//! lease held by a live worker is *handed off* gracefully (`gracefulLeaseHandoffConfig`,
//! on by default): `SET leaseOwner = :new, checkpointOwner = :old`, counter unchanged,
//! conditioned on `leaseOwner = :old`, no `checkpointOwner`, `leaseKey` existing. A lease
//! in a handoff is not touched again until `gracefulLeaseHandoffTimeoutMillis` (30 s) plus
//! the failover time have passed by the leader's clock; then it is assigned directly.
//!
//! ## Followers
//!
//! A 3.x worker has no taker. Every `leaseAssignmentInterval / 2 - 25 ms` (about the
//! failover time) it queries the GSI for `leaseOwner = <its id>` (all pages), and for each
//! lease key it does not hold yet reads the lease (consistent GetItem, as the GSI is
//! eventually consistent) and starts holding it when the owner is still itself and no
//! `checkpointOwner` is set, counting it renewed as of that read. Its renewer then renews as
//! in 2.x. So an assignment is picked up after up to one discovery interval, which is why a
//! 2.x-style taker with the same failover time may judge a just-assigned lease expired.
//! Our planner keeps a just-assigned lease unexpired for a further pickup grace period.
//!
//! ## Seen on this machine (`JAVA_KCL.md`)
//!
//! What running the Java KCL 3.1.3 against the emulators showed agrees with the source:
//! its rows are `{wid, lut, opr, sts}` (run with `disableWorkerMetrics`, whose empty metric
//! list leaves both maps empty, by the source); its
//! `Leader` item carries `leaseDuration = "120000"`; a rollback leaves `Migration3.0` at
//! `CLIENT_VERSION_2X` (then the worker runs pure 2.x and needs no GSI); in 3.x the
//! leader assigns only unassigned or expired leases and balances only between workers
//! with a fresh row; an assignee notices an assignment only at its next discovery, about a
//! failover time later, so a 2.x-style taker with the same failover time takes such a
//! lease as expired (records delivered twice); a handoff sets `leaseOwner = new`,
//! `checkpointOwner = old` without a counter change, the old owner's renewal then fails
//! its condition, it checkpoints and writes the lease over (or the 30 s timeout passes).
//! dynalite cannot add the GSI to an existing table, so the lease table must be created
//! with it. Start to first record on fresh leases took 38 s in 3.x (9-10 s in 2.x).

pub mod assignment;
pub mod discovery;
#[cfg(feature = "dynamodb")]
pub mod dynamo;
pub mod election;
pub mod item;
pub mod lock;
#[cfg(feature = "test-util")]
pub mod memory;
pub mod migration;
pub mod runtime;
pub mod table;
pub mod utilisation;
pub mod worker_metrics;
