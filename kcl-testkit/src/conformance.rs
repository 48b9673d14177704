//! A conformance suite for [`LeaseStore`] implementations.
//!
//! The same cases run against [`crate::lease_store::InMemoryLeaseStore`] and
//! [`kcl_lease::dynamo::DynamoLeaseStore`] (on emulators); a user with their own store can run
//! them too. Each case gets a fresh store whose table does **not** exist yet (a fresh table
//! name for a real store) and creates the table itself, so the table-missing behaviour is
//! checked as well. A case returns `Ok(())` or an `Err` describing the first difference it
//! found; it never panics on a store's misbehaviour.
//!
//! The list case writes 120 leases: give a store a page size well below that (for
//! `DynamoLeaseStore`, `with_scan_page_size`) so that paging is exercised.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use kcl_testkit::conformance::{self, CASES};
//! use kcl_testkit::lease_store::InMemoryLeaseStore;
//!
//! let report = conformance::run_all(|| async { InMemoryLeaseStore::new().with_page_size(7) }).await;
//! assert!(report.all_passed(), "{report}");
//! assert_eq!(report.outcomes.len(), CASES.len());
//! # });
//! ```
//!
//! Besides what the [`LeaseStore`] documentation states, the suite checks these decisions,
//! which both stores of this workspace share:
//! - renew, release and the checkpoint writes given a lease seen without owner fail with
//!   [`LeaseError::NotHeld`] or [`LeaseError::ConditionFailed`] and write nothing;
//! - a take by the owner already seen does not count an owner switch; a take of a free lease
//!   does;
//! - every call on a missing table fails with [`LeaseError::TableMissing`] (DynamoDB answers
//!   `ResourceNotFoundException` to `GetItem`, `UpdateItem`, `DeleteItem` and `Scan` alike),
//!   which is not retryable.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use kcl_kpl::{ExtendedSequenceNumber, HashKeyRange, SequenceNumber};
use kcl_lease::{BillingMode, BoxFuture, Lease, LeaseError, LeaseStore};

/// What a case returns: `Err` describes the first difference found.
pub type CaseResult = Result<(), String>;

/// A case: runs on a fresh store whose table does not exist yet.
pub type CaseFn = for<'a> fn(&'a dyn LeaseStore) -> BoxFuture<'a, CaseResult>;

/// One named case.
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name (its function's name).
    pub name: &'static str,
    /// Runs it.
    pub run: CaseFn,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// The result of one case.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CaseOutcome {
    /// The case's name.
    pub name: &'static str,
    /// Its result.
    pub result: CaseResult,
}

/// The results of a run, one per case, in [`CASES`] order.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ConformanceReport {
    /// Every case's outcome.
    pub outcomes: Vec<CaseOutcome>,
}

impl ConformanceReport {
    /// How many cases passed.
    pub fn passed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.result.is_ok()).count()
    }

    /// The cases that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CaseOutcome> {
        self.outcomes.iter().filter(|o| o.result.is_err())
    }

    /// True when at least one case ran and every case passed.
    pub fn all_passed(&self) -> bool {
        !self.outcomes.is_empty() && self.failures().next().is_none()
    }
}

impl fmt::Display for ConformanceReport {
    /// `N/M cases passed`, then one line per failed case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} cases passed", self.passed(), self.outcomes.len())?;
        for failure in self.failures() {
            if let Err(reason) = &failure.result {
                write!(f, "\n  FAILED {}: {reason}", failure.name)?;
            }
        }
        Ok(())
    }
}

/// Runs every case of [`CASES`], each on a fresh store from `make_store`.
pub async fn run_all<F, Fut, S>(make_store: F) -> ConformanceReport
where
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
    S: LeaseStore,
{
    run_cases(CASES, make_store).await
}

/// Runs `cases`, each on a fresh store from `make_store`, one after the other.
pub async fn run_cases<F, Fut, S>(cases: &[Case], mut make_store: F) -> ConformanceReport
where
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
    S: LeaseStore,
{
    let mut outcomes = Vec::with_capacity(cases.len());
    for case in cases {
        let store = make_store().await;
        let result = (case.run)(&store).await;
        if let Err(reason) = &result {
            tracing::warn!(case = case.name, store = ?store, %reason, "conformance case failed");
        }
        outcomes.push(CaseOutcome {
            name: case.name,
            result,
        });
    }
    ConformanceReport { outcomes }
}

macro_rules! case_list {
    ($($name:ident),* $(,)?) => {
        /// Every case of the suite, in the order [`run_all`] runs them.
        pub const CASES: &[Case] = &[
            $(Case { name: stringify!($name), run: |store| Box::pin($name(store)) }),*
        ];
    };
}

case_list!(
    case_table_created_then_exists,
    case_create_twice_keeps_first,
    case_get_missing_is_none,
    case_renew_by_owner,
    case_renew_after_take_by_other_fails,
    case_renew_writes_throughput,
    case_take_free_lease,
    case_take_ends_a_handoff,
    case_graceful_handoff,
    case_handoff_fences,
    case_take_with_stale_view_fails,
    case_take_from_other_owner,
    case_concurrent_takes_have_one_winner,
    case_release_then_take_by_other,
    case_release_by_non_owner_fails,
    case_writes_without_owner_fail,
    case_checkpoint_by_owner,
    case_checkpoint_by_zombie_fails,
    case_pending_checkpoint_lifecycle,
    case_child_shard_ids,
    case_parents_and_hash_range_round_trip,
    case_checkpoint_values_round_trip,
    case_delete_needs_current_counter,
    case_list_many_pages,
    case_missing_table_is_typed,
    case_reset_checkpoint_is_fenced,
);

// ---------------------------------------------------------------------------------------------
// helpers

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($fmt:tt)+) => {{
        let (left, right) = (&$left, &$right);
        if left != right {
            return Err(format!("{}: got {:?}, expected {:?}", format!($($fmt)+), left, right));
        }
    }};
}

/// The error and its causes, `: `-separated.
fn chain(error: &LeaseError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A result for a failure message: the value's Debug, or the error chain.
fn describe<T: fmt::Debug>(result: &Result<T, LeaseError>) -> String {
    match result {
        Ok(value) => format!("Ok({value:?})"),
        Err(error) => format!("Err({})", chain(error)),
    }
}

fn call<T>(what: &str, result: Result<T, LeaseError>) -> Result<T, String> {
    result.map_err(|e| format!("{what} failed: {}", chain(&e)))
}

fn expect_condition_failed<T: fmt::Debug>(what: &str, result: Result<T, LeaseError>) -> CaseResult {
    match result {
        Err(LeaseError::ConditionFailed { .. }) => Ok(()),
        other => Err(format!(
            "{what}: expected ConditionFailed, got {}",
            describe(&other)
        )),
    }
}

fn esn(value: &str) -> Result<ExtendedSequenceNumber, String> {
    value
        .parse()
        .map_err(|e| format!("bad test sequence number {value}: {e}"))
}

/// A 56-digit sequence number as Kinesis writes them.
const BIG_SEQUENCE: &str = "49590338271490256608559692538361571095921575989136588898";

async fn create_table(store: &dyn LeaseStore) -> CaseResult {
    call(
        "create_table_if_not_exists",
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await,
    )
    .map(|_| ())
}

async fn get(store: &dyn LeaseStore, key: &str) -> Result<Lease, String> {
    call("get_lease", store.get_lease(key).await)?.ok_or_else(|| format!("lease {key} is missing"))
}

/// Creates a free lease at TRIM_HORIZON and returns it as read back.
async fn create(store: &dyn LeaseStore, key: &str) -> Result<Lease, String> {
    let lease = Lease::new(key, ExtendedSequenceNumber::TRIM_HORIZON);
    let created = call(
        "create_lease_if_not_exists",
        store.create_lease_if_not_exists(&lease).await,
    )?;
    ensure!(
        created,
        "create_lease_if_not_exists({key}) returned false on an empty table"
    );
    let stored = get(store, key).await?;
    ensure_eq!(stored, lease, "lease {key} as created");
    Ok(stored)
}

/// Table, a lease `key`, taken by `owner`.
async fn setup_owned(store: &dyn LeaseStore, key: &str, owner: &str) -> Result<Lease, String> {
    create_table(store).await?;
    let free = create(store, key).await?;
    call("take_lease", store.take_lease(&free, owner).await)
}

/// The stored row equals what the write returned.
async fn ensure_stored(store: &dyn LeaseStore, returned: &Lease) -> CaseResult {
    let stored = get(store, &returned.lease_key).await?;
    ensure_eq!(
        stored,
        *returned,
        "stored row vs the row the write returned"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// cases

/// The table does not exist, is created (true), then exists; creating again returns false.
pub async fn case_table_created_then_exists(store: &dyn LeaseStore) -> CaseResult {
    ensure!(
        !call("table_exists", store.table_exists().await)?,
        "table_exists is true before creation"
    );
    let created = call(
        "create_table_if_not_exists",
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await,
    )?;
    ensure!(created, "first create_table_if_not_exists returned false");
    ensure!(
        call("table_exists", store.table_exists().await)?,
        "table_exists is false after creation"
    );
    let again = call(
        "create_table_if_not_exists",
        store
            .create_table_if_not_exists(BillingMode::PayPerRequest)
            .await,
    )?;
    ensure!(!again, "second create_table_if_not_exists returned true");
    let leases = call("list_leases", store.list_leases().await)?;
    ensure!(
        leases.is_empty(),
        "a new table lists {} leases",
        leases.len()
    );
    Ok(())
}

/// A second create of the same key returns false and leaves the first row unchanged.
pub async fn case_create_twice_keeps_first(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let first = create(store, "shardId-000000000001").await?;
    let mut second = Lease::new("shardId-000000000001", ExtendedSequenceNumber::LATEST)
        .with_parents(["shardId-000000000000"]);
    second.lease_owner = Some("intruder".into());
    second.lease_counter = 7;
    let created = call(
        "second create_lease_if_not_exists",
        store.create_lease_if_not_exists(&second).await,
    )?;
    ensure!(!created, "second create_lease_if_not_exists returned true");
    ensure_eq!(
        get(store, "shardId-000000000001").await?,
        first,
        "row after the second create"
    );
    Ok(())
}

/// `get_lease` of a key that was never written is `None`.
pub async fn case_get_missing_is_none(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    create(store, "shardId-000000000001").await?;
    let missing = call("get_lease", store.get_lease("shardId-000000000002").await)?;
    ensure_eq!(missing, None, "get_lease of a missing key");
    Ok(())
}

/// The owner renews: counter + 1 each time, nothing else changes.
pub async fn case_renew_by_owner(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let renewed = call("renew_lease", store.renew_lease(&held, None).await)?;
    let mut expected = held.clone();
    expected.lease_counter += 1;
    ensure_eq!(renewed, expected, "row after one renew");
    let renewed = call(
        "second renew_lease",
        store.renew_lease(&renewed, None).await,
    )?;
    expected.lease_counter += 1;
    ensure_eq!(renewed, expected, "row after two renews");
    ensure_stored(store, &renewed).await
}

/// A renew given a throughput writes it (and keeps it when given none); other writes keep
/// it.
pub async fn case_renew_writes_throughput(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    ensure_eq!(held.throughput_kbps, None, "throughput before any renew");
    let renewed = call("renew_lease", store.renew_lease(&held, Some(2.5)).await)?;
    let mut expected = held.clone();
    expected.lease_counter += 1;
    expected.throughput_kbps = Some(2.5);
    ensure_eq!(renewed, expected, "row after a renew with throughput");
    let renewed = call(
        "renew_lease without throughput",
        store.renew_lease(&renewed, None).await,
    )?;
    expected.lease_counter += 1;
    ensure_eq!(renewed, expected, "row after a renew without throughput");
    let renewed = call("renew_lease", store.renew_lease(&renewed, Some(0.0)).await)?;
    expected.lease_counter += 1;
    expected.throughput_kbps = Some(0.0);
    ensure_eq!(renewed, expected, "row after a renew with throughput 0");
    let checkpointed = call(
        "update_checkpoint",
        store.update_checkpoint(&renewed, &esn("7")?).await,
    )?;
    ensure_eq!(
        checkpointed.throughput_kbps,
        Some(0.0),
        "throughput after a checkpoint"
    );
    ensure_stored(store, &checkpointed).await
}

/// A take removes `checkpointOwner` (a graceful handoff of the Java KCL 3.x), whoever takes.
pub async fn case_take_ends_a_handoff(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let mut lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON);
    lease.lease_owner = Some("next".into());
    lease.checkpoint_owner = Some("current".into());
    lease.lease_counter = 7;
    let created = call(
        "create_lease_if_not_exists",
        store.create_lease_if_not_exists(&lease).await,
    )?;
    ensure!(created, "create_lease_if_not_exists returned false");
    let stored = get(store, &lease.lease_key).await?;
    ensure_eq!(stored, lease, "row in a handoff as created");
    let renewed = call(
        "renew_lease by the next owner",
        store.renew_lease(&stored, None).await,
    )?;
    ensure_eq!(
        renewed.checkpoint_owner.as_deref(),
        Some("current"),
        "checkpointOwner after a renew"
    );
    let taken = call("take_lease", store.take_lease(&renewed, "w2").await)?;
    let mut expected = renewed.clone();
    expected.lease_owner = Some("w2".into());
    expected.checkpoint_owner = None;
    expected.lease_counter += 1;
    expected.owner_switches_since_checkpoint += 1;
    ensure_eq!(taken, expected, "row after the take");
    ensure_stored(store, &taken).await
}

/// The graceful handoff of the Java KCL 3.x: initiated (owners change, the counter stays),
/// the current owner's plain renewal fails on `attribute_not_exists(checkpointOwner)`, its
/// renewal and checkpoint on the new owners succeed, then it completes the handoff
/// (`checkpointOwner` removed, counter + 1, owner switches + 1).
pub async fn case_graceful_handoff(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "current").await?;
    let pending = call(
        "initiate_handoff",
        store.initiate_handoff(&held, "next").await,
    )?;
    let mut expected = held.clone();
    expected.lease_owner = Some("next".into());
    expected.checkpoint_owner = Some("current".into());
    ensure_eq!(pending, expected, "row after initiate_handoff");
    ensure_stored(store, &pending).await?;
    expect_condition_failed(
        "renew by the current owner on its old view",
        store.renew_lease(&held, None).await,
    )?;
    expect_condition_failed(
        "a second initiate_handoff",
        store.initiate_handoff(&held, "other").await,
    )?;
    let renewed = call(
        "renew_lease on the handoff row",
        store.renew_lease(&pending, Some(1.5)).await,
    )?;
    ensure_eq!(
        (
            renewed.lease_owner.as_deref(),
            renewed.checkpoint_owner.as_deref(),
            renewed.lease_counter
        ),
        (Some("next"), Some("current"), pending.lease_counter + 1),
        "row after a renewal during the handoff"
    );
    let seq = esn("4242")?;
    let checkpointed = call(
        "update_checkpoint during the handoff",
        store.update_checkpoint(&renewed, &seq).await,
    )?;
    ensure_eq!(
        checkpointed.checkpoint,
        seq,
        "checkpoint during the handoff"
    );
    ensure_eq!(
        checkpointed.checkpoint_owner.as_deref(),
        Some("current"),
        "checkpointOwner after a checkpoint"
    );
    let done = call(
        "complete_handoff",
        store.complete_handoff(&checkpointed).await,
    )?;
    let mut expected = checkpointed.clone();
    expected.checkpoint_owner = None;
    expected.lease_counter += 1;
    expected.owner_switches_since_checkpoint += 1;
    ensure_eq!(done, expected, "row after complete_handoff");
    ensure_stored(store, &done).await?;
    expect_condition_failed(
        "complete_handoff again",
        store.complete_handoff(&checkpointed).await,
    )?;
    expect_condition_failed(
        "renew by the old owner after the handoff",
        store.renew_lease(&checkpointed, None).await,
    )?;
    // The next owner takes it (fenced on no checkpointOwner).
    let taken = call("take_lease by next", store.take_lease(&done, "next").await)?;
    ensure_eq!(
        taken.lease_counter,
        done.lease_counter + 1,
        "counter after the take"
    );
    ensure_eq!(
        taken.owner_switches_since_checkpoint,
        done.owner_switches_since_checkpoint,
        "owner switches after a take by the same owner"
    );
    Ok(())
}

/// The handoff writes' fences: initiate needs the owner seen and no `checkpointOwner`
/// (whatever the counter); complete needs both owners seen; a take on a view from before an
/// initiation fails although the counter did not move; a handoff of a free lease is NotHeld.
pub async fn case_handoff_fences(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "current").await?;
    let mut wrong_owner = held.clone();
    wrong_owner.lease_owner = Some("someone".into());
    expect_condition_failed(
        "initiate_handoff with another owner seen",
        store.initiate_handoff(&wrong_owner, "next").await,
    )?;
    // The counter moved since the view (a renewal): the initiation still lands.
    let renewed = call("renew_lease", store.renew_lease(&held, None).await)?;
    let pending = call(
        "initiate_handoff on a stale counter",
        store.initiate_handoff(&held, "next").await,
    )?;
    ensure_eq!(
        pending.lease_counter,
        renewed.lease_counter,
        "counter after initiate_handoff"
    );
    // A take on the view from before the initiation (same counter) fails.
    expect_condition_failed(
        "take_lease on a view without the handoff",
        store.take_lease(&renewed, "thief").await,
    )?;
    let mut wrong_current = pending.clone();
    wrong_current.checkpoint_owner = Some("someone".into());
    expect_condition_failed(
        "complete_handoff with another checkpointOwner seen",
        store.complete_handoff(&wrong_current).await,
    )?;
    match store.complete_handoff(&renewed).await {
        Err(LeaseError::NotHeld { .. }) => {}
        other => {
            return Err(format!(
                "complete_handoff of a lease seen outside a handoff: expected NotHeld, got {}",
                describe(&other)
            ));
        }
    }
    let free = create(store, "shardId-000000000002").await?;
    match store.initiate_handoff(&free, "next").await {
        Err(LeaseError::NotHeld { .. }) => {}
        other => {
            return Err(format!(
                "initiate_handoff of a free lease: expected NotHeld, got {}",
                describe(&other)
            ));
        }
    }
    let mut missing = held.clone();
    missing.lease_key = "shardId-000000000009".into();
    expect_condition_failed(
        "initiate_handoff of a missing lease",
        store.initiate_handoff(&missing, "next").await,
    )?;
    ensure_stored(store, &pending).await
}

/// After another worker took the lease, the old owner's renew fails with ConditionFailed.
pub async fn case_renew_after_take_by_other_fails(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let stolen = call("take_lease by w2", store.take_lease(&held, "w2").await)?;
    expect_condition_failed(
        "renew by the old owner",
        store.renew_lease(&held, None).await,
    )?;
    ensure_stored(store, &stolen).await?;
    ensure!(
        stolen.is_owned_by("w2"),
        "owner after the steal: {stolen:?}"
    );
    Ok(())
}

/// Taking a free lease sets the owner, counter + 1, owner switches + 1.
pub async fn case_take_free_lease(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let free = create(store, "shardId-000000000001").await?;
    let taken = call("take_lease", store.take_lease(&free, "w1").await)?;
    let mut expected = free.clone();
    expected.lease_owner = Some("w1".into());
    expected.lease_counter = free.lease_counter + 1;
    expected.owner_switches_since_checkpoint = free.owner_switches_since_checkpoint + 1;
    ensure_eq!(taken, expected, "row after taking a free lease");
    ensure_stored(store, &taken).await
}

/// A take with a stale counter (of a free or of an owned lease), or with the wrong owner
/// seen, fails and writes nothing.
pub async fn case_take_with_stale_view_fails(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let free = create(store, "shardId-000000000001").await?;
    let taken = call("take_lease by w1", store.take_lease(&free, "w1").await)?;
    expect_condition_failed(
        "take with the counter seen before w1's take",
        store.take_lease(&free, "w2").await,
    )?;
    let mut wrong_owner = taken.clone();
    wrong_owner.lease_owner = Some("w3".into());
    expect_condition_failed(
        "take with the current counter but another owner seen",
        store.take_lease(&wrong_owner, "w2").await,
    )?;
    let mut seen_free = taken.clone();
    seen_free.lease_owner = None;
    expect_condition_failed(
        "take with the current counter but the lease seen free",
        store.take_lease(&seen_free, "w2").await,
    )?;
    ensure_stored(store, &taken).await?;
    // The owner renewed since w2 looked: w2's steal with the right owner but the old counter
    // fails.
    let renewed = call("renew_lease by w1", store.renew_lease(&taken, None).await)?;
    expect_condition_failed(
        "steal with the owner seen but a stale counter",
        store.take_lease(&taken, "w2").await,
    )?;
    ensure_stored(store, &renewed).await
}

/// Taking from another owner counts an owner switch; re-taking one's own lease does not.
pub async fn case_take_from_other_owner(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let stolen = call("take_lease by w2", store.take_lease(&held, "w2").await)?;
    let mut expected = held.clone();
    expected.lease_owner = Some("w2".into());
    expected.lease_counter = held.lease_counter + 1;
    expected.owner_switches_since_checkpoint = held.owner_switches_since_checkpoint + 1;
    ensure_eq!(stolen, expected, "row after w2 took it from w1");
    let retaken = call(
        "take_lease by w2 again",
        store.take_lease(&stolen, "w2").await,
    )?;
    expected.lease_counter += 1;
    ensure_eq!(retaken, expected, "row after w2 took its own lease");
    ensure_stored(store, &retaken).await
}

/// Two takes from the same view at the same time: exactly one wins, for a free lease and
/// for a steal.
pub async fn case_concurrent_takes_have_one_winner(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let free = create(store, "shardId-000000000001").await?;
    let (a, b) = tokio::join!(store.take_lease(&free, "wa"), store.take_lease(&free, "wb"));
    let winner = match (a, b) {
        (Ok(won), Err(LeaseError::ConditionFailed { .. }))
        | (Err(LeaseError::ConditionFailed { .. }), Ok(won)) => won,
        other => {
            return Err(format!(
                "expected one winner and one ConditionFailed: {} / {}",
                describe(&other.0),
                describe(&other.1)
            ));
        }
    };
    ensure_eq!(
        winner.lease_counter,
        free.lease_counter + 1,
        "winner's counter"
    );
    ensure_stored(store, &winner).await?;
    // Two steals of the now owned lease from the same view: one wins again.
    let (a, b) = tokio::join!(
        store.take_lease(&winner, "wc"),
        store.take_lease(&winner, "wd")
    );
    let thief = match (a, b) {
        (Ok(won), Err(LeaseError::ConditionFailed { .. }))
        | (Err(LeaseError::ConditionFailed { .. }), Ok(won)) => won,
        other => {
            return Err(format!(
                "expected one thief and one ConditionFailed: {} / {}",
                describe(&other.0),
                describe(&other.1)
            ));
        }
    };
    ensure_eq!(
        thief.lease_counter,
        winner.lease_counter + 1,
        "thief's counter"
    );
    ensure_stored(store, &thief).await
}

/// The owner releases (owner removed, counter + 1); another worker then takes the lease.
pub async fn case_release_then_take_by_other(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let released = call("release_lease", store.release_lease(&held).await)?;
    let mut expected = held.clone();
    expected.lease_owner = None;
    expected.lease_counter = held.lease_counter + 1;
    ensure_eq!(released, expected, "row after release");
    ensure_stored(store, &released).await?;
    expect_condition_failed(
        "renew by the owner after its release",
        store.renew_lease(&held, None).await,
    )?;
    let taken = call("take_lease by w2", store.take_lease(&released, "w2").await)?;
    expected.lease_owner = Some("w2".into());
    expected.lease_counter += 1;
    expected.owner_switches_since_checkpoint += 1;
    ensure_eq!(taken, expected, "row after w2 took the released lease");
    ensure_stored(store, &taken).await
}

/// A release by a non-owner, or with a stale counter, fails and writes nothing.
pub async fn case_release_by_non_owner_fails(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let mut other = held.clone();
    other.lease_owner = Some("w2".into());
    expect_condition_failed("release by w2", store.release_lease(&other).await)?;
    let renewed = call("renew_lease", store.renew_lease(&held, None).await)?;
    expect_condition_failed(
        "release by w1 with a stale counter",
        store.release_lease(&held).await,
    )?;
    ensure_stored(store, &renewed).await
}

/// Renew, release and the checkpoint writes of a lease seen without owner fail (NotHeld or
/// ConditionFailed) and write nothing.
pub async fn case_writes_without_owner_fail(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let free = create(store, "shardId-000000000001").await?;
    let checkpoint = esn("100")?;
    let children: BTreeSet<String> = ["shardId-000000000002".to_owned()].into();
    let results: [(&str, Result<Lease, LeaseError>); 5] = [
        ("renew_lease", store.renew_lease(&free, None).await),
        ("release_lease", store.release_lease(&free).await),
        (
            "update_checkpoint",
            store.update_checkpoint(&free, &checkpoint).await,
        ),
        (
            "update_pending_checkpoint",
            store
                .update_pending_checkpoint(&free, Some(&checkpoint))
                .await,
        ),
        (
            "update_child_shard_ids",
            store.update_child_shard_ids(&free, &children).await,
        ),
    ];
    for (what, result) in results {
        match result {
            Err(LeaseError::NotHeld { .. } | LeaseError::ConditionFailed { .. }) => {}
            other => {
                return Err(format!(
                    "{what} of a lease seen without owner: expected NotHeld or ConditionFailed, got {}",
                    describe(&other)
                ));
            }
        }
    }
    ensure_stored(store, &free).await
}

/// The owner checkpoints: checkpoint set, owner switches reset, pending cleared, counter + 1.
pub async fn case_checkpoint_by_owner(store: &dyn LeaseStore) -> CaseResult {
    let w1 = setup_owned(store, "shardId-000000000001", "w1").await?;
    let held = call("take_lease by w2", store.take_lease(&w1, "w2").await)?;
    ensure_eq!(
        held.owner_switches_since_checkpoint,
        2,
        "owner switches after two takes"
    );
    let pending = esn("500.2")?;
    let held = call(
        "update_pending_checkpoint",
        store.update_pending_checkpoint(&held, Some(&pending)).await,
    )?;
    let checkpoint = esn("400.1")?;
    let done = call(
        "update_checkpoint",
        store.update_checkpoint(&held, &checkpoint).await,
    )?;
    let mut expected = held.clone();
    expected.checkpoint = checkpoint;
    expected.pending_checkpoint = None;
    expected.owner_switches_since_checkpoint = 0;
    expected.lease_counter = held.lease_counter + 1;
    ensure_eq!(done, expected, "row after checkpoint");
    ensure_stored(store, &done).await
}

/// A zombie's checkpoint (after another worker took the lease) fails and the row keeps the
/// new owner's checkpoint.
pub async fn case_checkpoint_by_zombie_fails(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let held = call(
        "update_checkpoint by w1",
        store.update_checkpoint(&held, &esn("100")?).await,
    )?;
    let stolen = call("take_lease by w2", store.take_lease(&held, "w2").await)?;
    let new_owner = call(
        "update_checkpoint by w2",
        store.update_checkpoint(&stolen, &esn("200")?).await,
    )?;
    expect_condition_failed(
        "update_checkpoint by the zombie w1",
        store.update_checkpoint(&held, &esn("150")?).await,
    )?;
    expect_condition_failed(
        "update_pending_checkpoint by the zombie w1",
        store
            .update_pending_checkpoint(&held, Some(&esn("160")?))
            .await,
    )?;
    let stored = get(store, "shardId-000000000001").await?;
    ensure_eq!(stored, new_owner, "row after the zombie's checkpoints");
    ensure_eq!(stored.checkpoint, esn("200")?, "checkpoint kept");
    ensure!(stored.is_owned_by("w2"), "owner kept: {stored:?}");
    Ok(())
}

/// A pending checkpoint is written, read back, committed by a checkpoint, written again and
/// removed with `None`.
pub async fn case_pending_checkpoint_lifecycle(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let pending = ExtendedSequenceNumber::new(
        SequenceNumber::parse(BIG_SEQUENCE).map_err(|e| e.to_string())?,
        3,
    );
    let prepared = call(
        "update_pending_checkpoint",
        store.update_pending_checkpoint(&held, Some(&pending)).await,
    )?;
    let mut expected = held.clone();
    expected.pending_checkpoint = Some(pending.clone());
    expected.lease_counter = held.lease_counter + 1;
    ensure_eq!(prepared, expected, "row with a pending checkpoint");
    ensure_stored(store, &prepared).await?;

    let committed = call(
        "update_checkpoint (commit)",
        store.update_checkpoint(&prepared, &pending).await,
    )?;
    expected.checkpoint = pending.clone();
    expected.pending_checkpoint = None;
    expected.owner_switches_since_checkpoint = 0;
    expected.lease_counter += 1;
    ensure_eq!(committed, expected, "row after committing");
    ensure_stored(store, &committed).await?;

    let next = esn(&format!("{BIG_SEQUENCE}9"))?;
    let prepared = call(
        "second update_pending_checkpoint",
        store
            .update_pending_checkpoint(&committed, Some(&next))
            .await,
    )?;
    ensure_eq!(
        prepared.pending_checkpoint,
        Some(next),
        "second pending checkpoint"
    );
    let cleared = call(
        "update_pending_checkpoint(None)",
        store.update_pending_checkpoint(&prepared, None).await,
    )?;
    expected.lease_counter += 2;
    ensure_eq!(
        cleared,
        expected,
        "row after clearing the pending checkpoint"
    );
    ensure_stored(store, &cleared).await
}

/// Child shard ids are written, read back, replaced and removed (empty set); a zombie cannot
/// write them.
pub async fn case_child_shard_ids(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let children: BTreeSet<String> = ["shardId-000000000002", "shardId-000000000003"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    let written = call(
        "update_child_shard_ids",
        store.update_child_shard_ids(&held, &children).await,
    )?;
    let mut expected = held.clone();
    expected.child_shard_ids = children;
    expected.lease_counter += 1;
    ensure_eq!(written, expected, "row with child shard ids");
    ensure_stored(store, &written).await?;
    expect_condition_failed(
        "update_child_shard_ids with a stale counter",
        store
            .update_child_shard_ids(&held, &BTreeSet::from(["x".to_owned()]))
            .await,
    )?;
    let one: BTreeSet<String> = ["shardId-000000000004".to_owned()].into();
    let replaced = call(
        "update_child_shard_ids (replace)",
        store.update_child_shard_ids(&written, &one).await,
    )?;
    ensure_eq!(replaced.child_shard_ids, one, "replaced child shard ids");
    let removed = call(
        "update_child_shard_ids (empty)",
        store
            .update_child_shard_ids(&replaced, &BTreeSet::new())
            .await,
    )?;
    ensure!(
        removed.child_shard_ids.is_empty(),
        "child shard ids after writing an empty set: {:?}",
        removed.child_shard_ids
    );
    ensure_eq!(removed.lease_counter, held.lease_counter + 3, "counter");
    ensure_stored(store, &removed).await
}

/// Leases with 0, 1 and 2 parents and with and without hash key ranges read back equal,
/// through `get_lease` and `list_leases`, and through writes.
pub async fn case_parents_and_hash_range_round_trip(store: &dyn LeaseStore) -> CaseResult {
    create_table(store).await?;
    let range = |start: u128, end: u128| {
        HashKeyRange::new(start, end).map_err(|e| format!("bad test range: {e}"))
    };
    let half = u128::MAX / 2;
    let mut owned = Lease::new("shardId-000000000009", esn("77.7")?)
        .with_parents(["shardId-000000000004"])
        .with_hash_key_range(range(1, 2)?);
    owned.lease_owner = Some("w9".into());
    owned.lease_counter = 5;
    owned.owner_switches_since_checkpoint = 2;
    owned.pending_checkpoint = Some(esn("78.1")?);
    owned.child_shard_ids = ["shardId-000000000010".to_owned()].into();
    let leases = [
        Lease::new("shardId-000000000000", ExtendedSequenceNumber::TRIM_HORIZON)
            .with_hash_key_range(HashKeyRange::FULL),
        Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON),
        Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON)
            .with_parents(["shardId-000000000000"])
            .with_hash_key_range(range(0, half)?),
        Lease::new("shardId-000000000003", ExtendedSequenceNumber::TRIM_HORIZON)
            .with_parents(["shardId-000000000000"])
            .with_hash_key_range(range(half + 1, u128::MAX)?),
        Lease::new("shardId-000000000004", ExtendedSequenceNumber::TRIM_HORIZON)
            .with_parents(["shardId-000000000002", "shardId-000000000003"])
            .with_hash_key_range(HashKeyRange::FULL),
        owned,
    ];
    for lease in &leases {
        let created = call(
            "create_lease_if_not_exists",
            store.create_lease_if_not_exists(lease).await,
        )?;
        ensure!(created, "create of {} returned false", lease.lease_key);
        ensure_eq!(get(store, &lease.lease_key).await?, *lease, "read back");
    }
    let listed: BTreeMap<String, Lease> = call("list_leases", store.list_leases().await)?
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect();
    let expected: BTreeMap<String, Lease> = leases
        .iter()
        .map(|l| (l.lease_key.clone(), l.clone()))
        .collect();
    ensure_eq!(listed, expected, "listed leases");
    // Writes keep the parents and the range.
    let merge_child = get(store, "shardId-000000000004").await?;
    let taken = call("take_lease", store.take_lease(&merge_child, "w1").await)?;
    ensure_eq!(
        taken.parent_shard_ids,
        merge_child.parent_shard_ids,
        "parents after a take"
    );
    ensure_eq!(
        taken.hash_key_range,
        merge_child.hash_key_range,
        "range after a take"
    );
    let done = call(
        "update_checkpoint",
        store
            .update_checkpoint(&taken, &ExtendedSequenceNumber::SHARD_END)
            .await,
    )?;
    ensure_eq!(
        done.parent_shard_ids,
        merge_child.parent_shard_ids,
        "parents"
    );
    ensure_eq!(done.hash_key_range, merge_child.hash_key_range, "range");
    ensure_stored(store, &done).await
}

/// Sentinels, SHARD_END and a 56-digit sequence number with sub-sequence round-trip, as
/// created checkpoints, written checkpoints and pending checkpoints.
pub async fn case_checkpoint_values_round_trip(store: &dyn LeaseStore) -> CaseResult {
    let big = SequenceNumber::parse(BIG_SEQUENCE).map_err(|e| e.to_string())?;
    let values = [
        ExtendedSequenceNumber::TRIM_HORIZON,
        ExtendedSequenceNumber::LATEST,
        ExtendedSequenceNumber::AT_TIMESTAMP,
        ExtendedSequenceNumber::new(big.clone(), 0),
        ExtendedSequenceNumber::new(big.clone(), 12),
        ExtendedSequenceNumber::new(big, u64::from(u32::MAX)),
        esn("0")?,
        ExtendedSequenceNumber::SHARD_END,
    ];
    let mut held = setup_owned(store, "shardId-000000000001", "w1").await?;
    for (i, value) in values.iter().enumerate() {
        let key = format!("shardId-1{i:011}");
        let lease = Lease::new(&key, value.clone());
        call(
            "create_lease_if_not_exists",
            store.create_lease_if_not_exists(&lease).await,
        )?;
        ensure_eq!(
            get(store, &key).await?,
            lease,
            "created with checkpoint {value}"
        );

        held = call(
            "update_pending_checkpoint",
            store.update_pending_checkpoint(&held, Some(value)).await,
        )?;
        ensure_eq!(
            held.pending_checkpoint.as_ref(),
            Some(value),
            "pending checkpoint {value}"
        );
        ensure_stored(store, &held).await?;
        held = call(
            "update_checkpoint",
            store.update_checkpoint(&held, value).await,
        )?;
        ensure_eq!(held.checkpoint, *value, "checkpoint {value}");
        ensure_eq!(
            held.checkpoint.sub_sequence_number(),
            value.sub_sequence_number(),
            "sub-sequence of {value}"
        );
        ensure_stored(store, &held).await?;
    }
    Ok(())
}

/// A delete with a stale counter fails and keeps the row; with the current counter it
/// removes it; a second delete fails.
pub async fn case_delete_needs_current_counter(store: &dyn LeaseStore) -> CaseResult {
    let held = setup_owned(store, "shardId-000000000001", "w1").await?;
    let renewed = call("renew_lease", store.renew_lease(&held, None).await)?;
    expect_condition_failed(
        "delete with a stale counter",
        store.delete_lease(&held).await,
    )?;
    ensure_stored(store, &renewed).await?;
    call("delete_lease", store.delete_lease(&renewed).await)?;
    let gone = call(
        "get_lease after delete",
        store.get_lease("shardId-000000000001").await,
    )?;
    ensure_eq!(gone, None, "row after delete");
    expect_condition_failed(
        "delete of a deleted lease",
        store.delete_lease(&renewed).await,
    )?;
    let leases = call("list_leases", store.list_leases().await)?;
    ensure!(leases.is_empty(), "list after delete: {leases:?}");
    Ok(())
}

/// 120 leases (more than a page) are listed, each exactly once.
pub async fn case_list_many_pages(store: &dyn LeaseStore) -> CaseResult {
    const LEASES: usize = 120;
    create_table(store).await?;
    let mut expected = BTreeMap::new();
    for i in 0..LEASES {
        let mut lease = Lease::new(format!("shardId-{i:012}"), esn(&format!("{}", i * 1000))?);
        lease.lease_counter = u64::try_from(i).map_err(|e| e.to_string())?;
        let created = call(
            "create_lease_if_not_exists",
            store.create_lease_if_not_exists(&lease).await,
        )?;
        ensure!(created, "create of {} returned false", lease.lease_key);
        expected.insert(lease.lease_key.clone(), lease);
    }
    let listed = call("list_leases", store.list_leases().await)?;
    ensure_eq!(listed.len(), LEASES, "number of listed leases");
    let mut seen = BTreeMap::new();
    for lease in listed {
        if let Some(previous) = seen.insert(lease.lease_key.clone(), lease) {
            return Err(format!("lease {} listed twice", previous.lease_key));
        }
    }
    ensure!(
        seen == expected,
        "listed leases differ from the created ones"
    );
    Ok(())
}

/// Every call on a missing table fails with TableMissing (not retryable).
pub async fn case_missing_table_is_typed(store: &dyn LeaseStore) -> CaseResult {
    let mut lease = Lease::new("shardId-000000000001", ExtendedSequenceNumber::TRIM_HORIZON);
    lease.lease_owner = Some("w1".into());
    let checkpoint = esn("1")?;
    let results: [(&str, Result<(), LeaseError>); 10] = [
        (
            "create_lease_if_not_exists",
            store.create_lease_if_not_exists(&lease).await.map(drop),
        ),
        (
            "get_lease",
            store.get_lease("shardId-000000000001").await.map(drop),
        ),
        ("list_leases", store.list_leases().await.map(drop)),
        (
            "renew_lease",
            store.renew_lease(&lease, None).await.map(drop),
        ),
        ("take_lease", store.take_lease(&lease, "w2").await.map(drop)),
        ("release_lease", store.release_lease(&lease).await.map(drop)),
        (
            "update_checkpoint",
            store.update_checkpoint(&lease, &checkpoint).await.map(drop),
        ),
        (
            "update_pending_checkpoint",
            store
                .update_pending_checkpoint(&lease, Some(&checkpoint))
                .await
                .map(drop),
        ),
        (
            "update_child_shard_ids",
            store
                .update_child_shard_ids(&lease, &BTreeSet::from(["c".to_owned()]))
                .await
                .map(drop),
        ),
        ("delete_lease", store.delete_lease(&lease).await),
    ];
    for (what, result) in results {
        match result {
            Err(e @ LeaseError::TableMissing { .. }) => {
                ensure!(!e.is_retryable(), "{what}: TableMissing is retryable");
            }
            other => {
                return Err(format!(
                    "{what} on a missing table: expected TableMissing, got {}",
                    describe(&other)
                ));
            }
        }
    }
    ensure!(
        !call("table_exists", store.table_exists().await)?,
        "the failed writes created the table"
    );
    Ok(())
}

/// An operator's reset moves the checkpoint of a held lease and frees it (pending and
/// `checkpointOwner` removed, owner switches 0, counter + 1), so the holder's next fenced
/// write fails; a reset from a stale view or naming another owner fails and changes nothing;
/// a free lease is reset and stays free.
pub async fn case_reset_checkpoint_is_fenced(store: &dyn LeaseStore) -> CaseResult {
    let w1 = setup_owned(store, "shardId-000000000001", "w1").await?;
    let w1 = call(
        "update_pending_checkpoint",
        store
            .update_pending_checkpoint(&w1, Some(&esn("90")?))
            .await,
    )?;
    let target = esn("300.2")?;
    let reset = call(
        "reset_checkpoint",
        store.reset_checkpoint(&w1, &target).await,
    )?;
    let mut expected = w1.clone();
    expected.checkpoint = target.clone();
    expected.pending_checkpoint = None;
    expected.owner_switches_since_checkpoint = 0;
    expected.lease_owner = None;
    expected.lease_counter = w1.lease_counter + 1;
    ensure_eq!(reset, expected, "row after reset");
    ensure_stored(store, &reset).await?;
    expect_condition_failed(
        "renew_lease by the holder after the reset",
        store.renew_lease(&w1, None).await,
    )?;
    expect_condition_failed(
        "update_checkpoint by the holder after the reset",
        store.update_checkpoint(&w1, &esn("500")?).await,
    )?;
    expect_condition_failed(
        "reset_checkpoint from a stale view",
        store.reset_checkpoint(&w1, &esn("1")?).await,
    )?;
    let mut other_owner = reset.clone();
    other_owner.lease_owner = Some("w2".to_owned());
    expect_condition_failed(
        "reset_checkpoint naming another owner",
        store.reset_checkpoint(&other_owner, &esn("1")?).await,
    )?;
    ensure_stored(store, &reset).await?;
    let taken = call("take_lease by w2", store.take_lease(&reset, "w2").await)?;
    let free = call("release_lease", store.release_lease(&taken).await)?;
    let free_reset = call(
        "reset_checkpoint of a free lease",
        store
            .reset_checkpoint(&free, &ExtendedSequenceNumber::TRIM_HORIZON)
            .await,
    )?;
    ensure!(
        free_reset.lease_owner.is_none()
            && free_reset.checkpoint == ExtendedSequenceNumber::TRIM_HORIZON
            && free_reset.lease_counter == free.lease_counter + 1,
        "free lease after reset: {free_reset:?}"
    );
    ensure_stored(store, &free_reset).await?;
    // A lease in a graceful handoff loses its checkpointOwner too.
    let mut handoff = Lease::new("shardId-000000000002", ExtendedSequenceNumber::TRIM_HORIZON);
    handoff.lease_owner = Some("next".into());
    handoff.checkpoint_owner = Some("current".into());
    ensure!(
        call("create", store.create_lease_if_not_exists(&handoff).await)?,
        "created the row in a handoff"
    );
    let handoff = get(store, "shardId-000000000002").await?;
    let reset = call(
        "reset_checkpoint in a handoff",
        store.reset_checkpoint(&handoff, &esn("7")?).await,
    )?;
    ensure!(
        reset.lease_owner.is_none()
            && reset.checkpoint_owner.is_none()
            && reset.checkpoint == esn("7")?,
        "row in a handoff after reset: {reset:?}"
    );
    ensure_stored(store, &reset).await
}
