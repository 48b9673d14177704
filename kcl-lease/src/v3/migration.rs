//! The migration state: the `Migration3.0` item of `<app>-CoordinatorState`
//! ([`MigrationState`]), the client versions ([`ClientVersion`]), what a worker runs in
//! each ([`ClientVersion::protocol`]), and the pure rules of the Java KCL's migration state
//! machine: the version to start in ([`startup`]), the moves on a change seen in the table
//! ([`on_observed_change`]) and the leader's upgrade readiness check ([`fleet_ready`],
//! [`UpgradeStabilizer`]). [`initialize`] runs the start-up protocol on a [`StateTable`].
//!
//! # The item
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `key` | S | `Migration3.0` |
//! | `cv` | S | the client version, e.g. `CLIENT_VERSION_3X` |
//! | `mb` | S | the worker that made the last change |
//! | `mts` | N | when: epoch milliseconds |
//! | `h` | L of M `{cv, mb, mts}` | previous states, newest first, at most [`MAX_HISTORY`] (absent when empty) |
//!
//! Every change is conditional on `cv` still holding the value read (and the item
//! existing); the first write is conditional on the item not existing. Attributes we do
//! not know are kept ([`MigrationState::other`]) and written back on a put.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use super::item::{Condition, Item, Reader, Value};
use super::table::{COORDINATOR_STATE_KEY, StateTable, Update, bounded};
use super::worker_metrics::WorkerMetricStats;
use crate::{Clock, LeaseError};

/// The key of the migration state item.
pub const MIGRATION_KEY: &str = "Migration3.0";
/// How many previous states the item keeps.
pub const MAX_HISTORY: usize = 10;
/// How often every worker reads the item to follow changes (plus up to half of it as
/// jitter before the first read).
pub const CHANGE_MONITOR_INTERVAL: Duration = Duration::from_secs(60);
/// How often the leader checks upgrade readiness in `UPGRADE_FROM_2X`.
pub const READINESS_MONITOR_INTERVAL: Duration = Duration::from_secs(60);
/// How long readiness must hold without a break before the leader flips to
/// `3X_WITH_ROLLBACK`.
pub const FLIP_STABILIZATION: Duration = Duration::from_secs(600);
/// How fresh a lease owner's WorkerMetricStats row must be for readiness (2 × 30 s).
pub const READINESS_ROW_EXPIRY: Duration = Duration::from_secs(60);
/// How many times [`initialize`] retries after losing a race for the item.
pub const INITIALIZE_ATTEMPTS: usize = 10;

/// The attribute names of the migration state item.
pub mod attr {
    /// `cv` (S): the client version.
    pub const CLIENT_VERSION: &str = "cv";
    /// `mb` (S): modified by.
    pub const MODIFIED_BY: &str = "mb";
    /// `mts` (N): modified at, epoch milliseconds.
    pub const MODIFIED_TIMESTAMP: &str = "mts";
    /// `h` (L of M): the history.
    pub const HISTORY: &str = "h";
}

/// A client version recorded in `cv`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
#[non_exhaustive]
pub enum ClientVersion {
    /// `CLIENT_VERSION_UPGRADE_FROM_2X`: 2.x protocol, worker metrics written, the leader
    /// watches for readiness to flip to 3.x.
    UpgradeFrom2x,
    /// `CLIENT_VERSION_2X`: rolled back; 2.x protocol, no worker metrics.
    V2x,
    /// `CLIENT_VERSION_3X_WITH_ROLLBACK`: 3.x protocol, rollback still possible.
    V3xWithRollback,
    /// `CLIENT_VERSION_3X`: 3.x protocol for good.
    V3x,
}

impl ClientVersion {
    /// Every version.
    pub const ALL: [ClientVersion; 4] = [
        ClientVersion::UpgradeFrom2x,
        ClientVersion::V2x,
        ClientVersion::V3xWithRollback,
        ClientVersion::V3x,
    ];

    /// The name the Java KCL writes.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientVersion::UpgradeFrom2x => crate::client_version::UPGRADE_FROM_2X,
            ClientVersion::V2x => crate::client_version::V2X,
            ClientVersion::V3xWithRollback => crate::client_version::V3X_WITH_ROLLBACK,
            ClientVersion::V3x => crate::client_version::V3X,
        }
    }

    /// What a worker runs in this version.
    pub fn protocol(self) -> Protocol {
        let three = matches!(self, ClientVersion::V3xWithRollback | ClientVersion::V3x);
        Protocol {
            assignment: if three {
                Assignment::Leader
            } else {
                Assignment::Taker
            },
            election: if three {
                Election::DynamoDbLock
            } else {
                Election::DeterministicShuffle
            },
            writes_worker_metrics: self != ClientVersion::V2x,
            follows_changes: self != ClientVersion::V3x,
            checks_upgrade_readiness: self == ClientVersion::UpgradeFrom2x,
        }
    }
}

impl fmt::Display for ClientVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `cv` value that is no client version.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
#[error("unknown client version {0:?}")]
pub struct UnknownClientVersion(pub String);

impl FromStr for ClientVersion {
    type Err = UnknownClientVersion;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ClientVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownClientVersion(s.to_owned()))
    }
}

/// How leases are assigned in a version.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Assignment {
    /// Each worker takes and steals (the 2.x lease taker).
    Taker,
    /// The leader assigns; workers discover their leases through the GSI.
    Leader,
}

/// How the leader is chosen in a version.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Election {
    /// The 2.x way: every worker computes the same leaders from the lease owners.
    DeterministicShuffle,
    /// The `Leader` lock item ([`super::lock`]).
    DynamoDbLock,
}

/// What a worker runs in one client version.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct Protocol {
    /// Lease assignment.
    pub assignment: Assignment,
    /// Leader election.
    pub election: Election,
    /// Whether the worker writes its WorkerMetricStats row.
    pub writes_worker_metrics: bool,
    /// Whether the worker reads the item every minute to follow changes.
    pub follows_changes: bool,
    /// Whether the leader checks upgrade readiness (and flips to `3X_WITH_ROLLBACK`).
    pub checks_upgrade_readiness: bool,
}

/// The client version a worker is configured with (`clientVersionConfig`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[non_exhaustive]
pub enum ClientVersionConfig {
    /// `CLIENT_VERSION_CONFIG_COMPATIBLE_WITH_2X`: start a new application in
    /// `UPGRADE_FROM_2X`, follow the migration.
    CompatibleWith2x,
    /// `CLIENT_VERSION_CONFIG_3X`: start a new application in `3X` (the Java default).
    #[default]
    V3x,
}

/// One previous state in `h`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HistoryEntry {
    /// `cv` as written: any name, not only the versions a worker runs (the Java KCL records
    /// its first state as a change from `CLIENT_VERSION_INIT`). Kept verbatim on a rewrite.
    pub client_version: String,
    /// `mb`.
    pub modified_by: String,
    /// `mts`, epoch milliseconds.
    pub modified_at_ms: i64,
}

/// The `Migration3.0` item.
#[derive(Clone, PartialEq, Debug)]
pub struct MigrationState {
    /// `cv`.
    pub client_version: ClientVersion,
    /// `mb`.
    pub modified_by: String,
    /// `mts`, epoch milliseconds.
    pub modified_at_ms: i64,
    /// `h`, newest first.
    pub history: Vec<HistoryEntry>,
    /// Attributes we do not know, kept as read.
    pub other: Item,
}

impl MigrationState {
    /// A first state.
    pub fn new(client_version: ClientVersion, modified_by: &str, now_ms: i64) -> Self {
        Self {
            client_version,
            modified_by: modified_by.to_owned(),
            modified_at_ms: now_ms,
            history: Vec::new(),
            other: Item::new(),
        }
    }

    /// The state after a change to `next` by `by` at `now_ms`: the current state goes to
    /// the front of the history, which keeps [`MAX_HISTORY`] entries.
    pub fn changed(&self, next: ClientVersion, by: &str, now_ms: i64) -> Self {
        let mut history = Vec::with_capacity(MAX_HISTORY);
        history.push(HistoryEntry {
            client_version: self.client_version.as_str().to_owned(),
            modified_by: self.modified_by.clone(),
            modified_at_ms: self.modified_at_ms,
        });
        history.extend(self.history.iter().take(MAX_HISTORY - 1).cloned());
        Self {
            client_version: next,
            modified_by: by.to_owned(),
            modified_at_ms: now_ms,
            history,
            other: self.other.clone(),
        }
    }

    fn history_value(&self) -> Value {
        Value::L(
            self.history
                .iter()
                .map(|h| {
                    Value::M(
                        [
                            (attr::CLIENT_VERSION.to_owned(), Value::s(&h.client_version)),
                            (attr::MODIFIED_BY.to_owned(), Value::s(&h.modified_by)),
                            (
                                attr::MODIFIED_TIMESTAMP.to_owned(),
                                Value::int(h.modified_at_ms),
                            ),
                        ]
                        .into(),
                    )
                })
                .collect(),
        )
    }

    /// The item (with the unknown attributes kept).
    pub fn to_item(&self) -> Item {
        let mut item = self.other.clone();
        item.insert(COORDINATOR_STATE_KEY.to_owned(), Value::s(MIGRATION_KEY));
        for (name, value) in self.attributes() {
            item.insert(name.to_owned(), value);
        }
        item
    }

    fn attributes(&self) -> Vec<(&'static str, Value)> {
        let mut out = vec![
            (attr::CLIENT_VERSION, Value::s(self.client_version.as_str())),
            (attr::MODIFIED_BY, Value::s(&self.modified_by)),
            (attr::MODIFIED_TIMESTAMP, Value::int(self.modified_at_ms)),
        ];
        if !self.history.is_empty() {
            out.push((attr::HISTORY, self.history_value()));
        }
        out
    }

    /// Reads the item. `cv`, `mb` and `mts` are required; an unknown `cv` is an error
    /// naming it (in the history any name is kept as written).
    pub fn from_item(item: &Item) -> Result<Self, LeaseError> {
        let r = Reader::new("coordinator state Migration3.0", item);
        if r.s(COORDINATOR_STATE_KEY)? != MIGRATION_KEY {
            return Err(r.malformed(format!("{COORDINATOR_STATE_KEY} is not {MIGRATION_KEY}")));
        }
        let version = |r: &Reader<'_>| -> Result<ClientVersion, LeaseError> {
            r.s(attr::CLIENT_VERSION)?
                .parse()
                .map_err(|e: UnknownClientVersion| r.malformed(e.to_string()))
        };
        let client_version = version(&r)?;
        let modified_by = r.s(attr::MODIFIED_BY)?.to_owned();
        let modified_at_ms = r.int(attr::MODIFIED_TIMESTAMP)?;
        let mut history = Vec::new();
        match r.get(attr::HISTORY) {
            None | Some(Value::Null) => {}
            Some(Value::L(entries)) => {
                for entry in entries {
                    let Value::M(map) = entry else {
                        return Err(r.malformed("h holds an entry that is not a map"));
                    };
                    let e = Reader::new("coordinator state Migration3.0 history", map);
                    history.push(HistoryEntry {
                        client_version: e.s(attr::CLIENT_VERSION)?.to_owned(),
                        modified_by: e.s(attr::MODIFIED_BY)?.to_owned(),
                        modified_at_ms: e.int(attr::MODIFIED_TIMESTAMP)?,
                    });
                }
            }
            Some(other) => {
                return Err(r.malformed(format!("h is of type {}, not L", other.type_name())));
            }
        }
        let mut other = item.clone();
        for known in [
            COORDINATOR_STATE_KEY,
            attr::CLIENT_VERSION,
            attr::MODIFIED_BY,
            attr::MODIFIED_TIMESTAMP,
            attr::HISTORY,
        ] {
            other.remove(known);
        }
        Ok(Self {
            client_version,
            modified_by,
            modified_at_ms,
            history,
            other,
        })
    }
}

/// What a starting worker does with the item it read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Startup {
    /// Run this version; nothing to write.
    Run(ClientVersion),
    /// Write this version first (create the item when none was read, else change it
    /// conditionally on the version read), then run it.
    Write(ClientVersion),
}

/// The start-up rule: with no item, the configured version's start (`UPGRADE_FROM_2X` for
/// 2.x-compatible, `3X` for 3.x); a 3.x-configured worker finding `3X_WITH_ROLLBACK`
/// completes the upgrade to `3X`; otherwise the stored version is run as it is (also by a
/// 2.x-compatible worker finding `3X`: the application's state wins over the config).
pub fn startup(stored: Option<ClientVersion>, config: ClientVersionConfig) -> Startup {
    match (stored, config) {
        (None, ClientVersionConfig::CompatibleWith2x) => {
            Startup::Write(ClientVersion::UpgradeFrom2x)
        }
        (None, ClientVersionConfig::V3x) => Startup::Write(ClientVersion::V3x),
        (Some(ClientVersion::V3xWithRollback), ClientVersionConfig::V3x) => {
            Startup::Write(ClientVersion::V3x)
        }
        (Some(version), _) => Startup::Run(version),
    }
}

/// What a running worker does on seeing `observed` in the item while running `current`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum Change {
    /// Nothing changed.
    Stay,
    /// Move to this version.
    Move(ClientVersion),
    /// A change the state machine does not allow from `current`: keep running `current`,
    /// log it, keep watching (the Java KCL does the same).
    Ignore,
}

/// The moves on a change seen in the table: `UPGRADE_FROM_2X` → `2X` (rollback) or
/// `3X_WITH_ROLLBACK` (flip); `2X` → `UPGRADE_FROM_2X` (roll forward); `3X_WITH_ROLLBACK` →
/// `2X` (rollback) or `3X` (done). In `3X` nothing is watched any more.
pub fn on_observed_change(current: ClientVersion, observed: ClientVersion) -> Change {
    use ClientVersion::{UpgradeFrom2x, V2x, V3x, V3xWithRollback};
    if current == observed {
        return Change::Stay;
    }
    match (current, observed) {
        (UpgradeFrom2x, V2x | V3xWithRollback)
        | (V2x, UpgradeFrom2x)
        | (V3xWithRollback, V2x | V3x) => Change::Move(observed),
        _ => Change::Ignore,
    }
}

/// The leader's readiness check in `UPGRADE_FROM_2X`: the lease owner GSI is ACTIVE and
/// every lease owner has a WorkerMetricStats row written less than `row_expiry` before
/// `now_secs` (wall clock). A free lease counts as an owner without a row (as in the Java
/// KCL, where the set of owners then holds "none"), so it blocks readiness.
pub fn fleet_ready<'a>(
    gsi_active: bool,
    lease_owners: impl IntoIterator<Item = Option<&'a str>>,
    rows: &[WorkerMetricStats],
    now_secs: i64,
    row_expiry: Duration,
) -> bool {
    if !gsi_active {
        return false;
    }
    let expiry = i64::try_from(row_expiry.as_secs()).unwrap_or(i64::MAX);
    let fresh = |owner: &str| {
        rows.iter().any(|row| {
            row.worker_id == owner
                && row
                    .last_update_time
                    .is_some_and(|lut| lut.saturating_add(expiry) > now_secs)
        })
    };
    lease_owners
        .into_iter()
        .all(|owner| owner.is_some_and(fresh))
}

/// Requires readiness to hold, check after check, for [`FLIP_STABILIZATION`] (or the given
/// period) before the flip, on the monotonic clock; not being the leader, or a check that is
/// not ready, starts it over.
#[derive(Clone, Debug)]
pub struct UpgradeStabilizer {
    period: Duration,
    ready_since: Option<Instant>,
}

impl UpgradeStabilizer {
    /// A stabilizer requiring `period` of readiness.
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            ready_since: None,
        }
    }

    /// Records one check at `now`; true when the leader should write `3X_WITH_ROLLBACK` now.
    pub fn observe(&mut self, is_leader: bool, ready: bool, now: Instant) -> bool {
        if !is_leader || !ready {
            self.ready_since = None;
            return false;
        }
        let since = *self.ready_since.get_or_insert(now);
        now.saturating_duration_since(since) >= self.period
    }
}

impl Default for UpgradeStabilizer {
    fn default() -> Self {
        Self::new(FLIP_STABILIZATION)
    }
}

/// Reads the item (consistent), `None` when there is none.
pub async fn read_state(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
) -> Result<Option<MigrationState>, LeaseError> {
    bounded(clock, limit, "get", table.get(MIGRATION_KEY))
        .await?
        .as_ref()
        .map(MigrationState::from_item)
        .transpose()
}

/// Writes `next` as a change from `current` (conditional on `cv` still being
/// `current.client_version`). `Ok(false)` when someone changed it first.
pub async fn write_change(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
    current: &MigrationState,
    next: &MigrationState,
) -> Result<bool, LeaseError> {
    let mut update = Update::new();
    for (name, value) in next.attributes() {
        update = update.set(name, value);
    }
    let condition = Condition::And(vec![
        Condition::exists(COORDINATOR_STATE_KEY),
        Condition::equals(
            attr::CLIENT_VERSION,
            Value::s(current.client_version.as_str()),
        ),
    ]);
    match bounded(
        clock,
        limit,
        "update",
        table.update(MIGRATION_KEY, &update, &condition),
    )
    .await
    {
        Ok(()) => Ok(true),
        Err(err) if err.is_condition_failed() => Ok(false),
        Err(err) => Err(err),
    }
}

/// The start-up protocol: read the item, apply [`startup`], write when it says so (create
/// if absent, else change conditionally), and on losing a race read again, up to
/// [`INITIALIZE_ATTEMPTS`] times. Returns the version to run and the item as it now is.
/// `now_ms` is the wall-clock time written as `mts`.
pub async fn initialize(
    table: &dyn StateTable,
    clock: &dyn Clock,
    limit: Duration,
    config: ClientVersionConfig,
    worker_id: &str,
    now_ms: i64,
) -> Result<(ClientVersion, MigrationState), LeaseError> {
    for _ in 0..INITIALIZE_ATTEMPTS {
        let stored = read_state(table, clock, limit).await?;
        match (
            startup(stored.as_ref().map(|s| s.client_version), config),
            stored,
        ) {
            (Startup::Run(version), Some(state)) => return Ok((version, state)),
            (Startup::Write(version), None) => {
                let state = MigrationState::new(version, worker_id, now_ms);
                let (item, absent) = (
                    state.to_item(),
                    Condition::not_exists(COORDINATOR_STATE_KEY),
                );
                let put = table.put(&item, &absent);
                match bounded(clock, limit, "put", put).await {
                    Ok(()) => return Ok((version, state)),
                    Err(err) if err.is_condition_failed() => continue,
                    Err(err) => return Err(err),
                }
            }
            (Startup::Write(version), Some(current)) => {
                let next = current.changed(version, worker_id, now_ms);
                if write_change(table, clock, limit, &current, &next).await? {
                    return Ok((version, next));
                }
            }
            (Startup::Run(_), None) => {
                // `startup` never says Run without a stored version; read again.
            }
        }
    }
    Err(LeaseError::ConditionFailed {
        lease_key: MIGRATION_KEY.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::ClientVersion::{UpgradeFrom2x, V2x, V3x, V3xWithRollback};
    use super::*;
    use crate::test_util::ManualClock;
    use crate::v3::memory::{InMemoryStateTable, StateFault, StateFaultKind, StateOperation};

    const LIMIT: Duration = Duration::from_secs(2);

    #[test]
    fn names_are_the_java_names() {
        for v in ClientVersion::ALL {
            assert_eq!(v.as_str().parse::<ClientVersion>().unwrap(), v);
        }
        assert_eq!(
            V3xWithRollback.to_string(),
            "CLIENT_VERSION_3X_WITH_ROLLBACK"
        );
        assert!("CLIENT_VERSION_INIT".parse::<ClientVersion>().is_err());
    }

    #[test]
    fn what_each_version_runs() {
        let p = UpgradeFrom2x.protocol();
        assert_eq!(
            (p.assignment, p.election),
            (Assignment::Taker, Election::DeterministicShuffle)
        );
        assert!(p.writes_worker_metrics && p.follows_changes && p.checks_upgrade_readiness);
        let p = V2x.protocol();
        assert_eq!(p.assignment, Assignment::Taker);
        assert!(!p.writes_worker_metrics && p.follows_changes && !p.checks_upgrade_readiness);
        let p = V3xWithRollback.protocol();
        assert_eq!(
            (p.assignment, p.election),
            (Assignment::Leader, Election::DynamoDbLock)
        );
        assert!(p.writes_worker_metrics && p.follows_changes && !p.checks_upgrade_readiness);
        let p = V3x.protocol();
        assert_eq!(p.assignment, Assignment::Leader);
        assert!(p.writes_worker_metrics && !p.follows_changes);
    }

    #[test]
    fn the_start_up_rule() {
        use ClientVersionConfig::{CompatibleWith2x as C2, V3x as C3};
        let cases = [
            (None, C2, Startup::Write(UpgradeFrom2x)),
            (None, C3, Startup::Write(V3x)),
            (Some(UpgradeFrom2x), C2, Startup::Run(UpgradeFrom2x)),
            (Some(UpgradeFrom2x), C3, Startup::Run(UpgradeFrom2x)),
            (Some(V2x), C2, Startup::Run(V2x)),
            (Some(V2x), C3, Startup::Run(V2x)),
            (Some(V3xWithRollback), C2, Startup::Run(V3xWithRollback)),
            (Some(V3xWithRollback), C3, Startup::Write(V3x)),
            (Some(V3x), C2, Startup::Run(V3x)),
            (Some(V3x), C3, Startup::Run(V3x)),
        ];
        for (stored, config, expected) in cases {
            assert_eq!(startup(stored, config), expected, "{stored:?} {config:?}");
        }
    }

    #[test]
    fn the_moves_on_an_observed_change() {
        let allowed = [
            (UpgradeFrom2x, V2x),
            (UpgradeFrom2x, V3xWithRollback),
            (V2x, UpgradeFrom2x),
            (V3xWithRollback, V2x),
            (V3xWithRollback, V3x),
        ];
        for current in ClientVersion::ALL {
            for observed in ClientVersion::ALL {
                let expected = if current == observed {
                    Change::Stay
                } else if allowed.contains(&(current, observed)) {
                    Change::Move(observed)
                } else {
                    Change::Ignore
                };
                assert_eq!(
                    on_observed_change(current, observed),
                    expected,
                    "{current} -> {observed}"
                );
            }
        }
    }

    #[test]
    fn items_round_trip_keep_unknown_attributes_and_cap_history() {
        // What a KCL rollback leaves (JAVA_KCL.md), with an empty history list.
        let java = Item::from([
            ("key".to_owned(), Value::s("Migration3.0")),
            ("cv".to_owned(), Value::s("CLIENT_VERSION_2X")),
            ("mb".to_owned(), Value::s("java-1")),
            ("mts".to_owned(), Value::int(1_700_000_000_000)),
            ("h".to_owned(), Value::L(vec![])),
            ("x-extra".to_owned(), Value::s("kept")),
        ]);
        let state = MigrationState::from_item(&java).unwrap();
        assert_eq!(state.client_version, V2x);
        assert_eq!(state.other.get("x-extra"), Some(&Value::s("kept")));
        let mut s = state.clone();
        for i in 0..12 {
            s = s.changed(
                if i % 2 == 0 { UpgradeFrom2x } else { V2x },
                "w",
                1_700_000_000_001 + i,
            );
        }
        assert_eq!(s.history.len(), MAX_HISTORY);
        assert_eq!(
            s.history[0].modified_at_ms, 1_700_000_000_011,
            "newest first"
        );
        let back = MigrationState::from_item(&s.to_item()).unwrap();
        assert_eq!(back, s);
        assert!(
            !state.to_item().contains_key("h"),
            "no h when the history is empty"
        );
        let mut bad = java.clone();
        bad.insert("cv".into(), Value::s("CLIENT_VERSION_9X"));
        let err = MigrationState::from_item(&bad).unwrap_err().to_string();
        assert!(err.contains("CLIENT_VERSION_9X"), "{err}");
        let mut bad = java;
        bad.insert("h".into(), Value::L(vec![Value::s("x")]));
        assert!(MigrationState::from_item(&bad).is_err());
    }

    #[test]
    fn a_java_3x_item_with_its_init_history_entry_reads_and_round_trips() {
        // A fresh application started by a Java KCL 3.x worker: its first state is recorded
        // as a change from CLIENT_VERSION_INIT.
        let init = Value::M(
            [
                ("cv".to_owned(), Value::s("CLIENT_VERSION_INIT")),
                ("mb".to_owned(), Value::s("j1")),
                ("mts".to_owned(), Value::int(1_700_000_000_000)),
            ]
            .into(),
        );
        let java = Item::from([
            ("key".to_owned(), Value::s("Migration3.0")),
            ("cv".to_owned(), Value::s("CLIENT_VERSION_3X")),
            ("mb".to_owned(), Value::s("j1")),
            ("mts".to_owned(), Value::int(1_700_000_000_001)),
            ("h".to_owned(), Value::L(vec![init])),
        ]);
        let state = MigrationState::from_item(&java).unwrap();
        assert_eq!(state.client_version, V3x);
        assert_eq!(state.history.len(), 1);
        assert_eq!(state.history[0].client_version, "CLIENT_VERSION_INIT");
        assert_eq!(state.to_item(), java, "written back as read");
        let next = state.changed(V3xWithRollback, "r1", 1_700_000_000_002);
        let names: Vec<&str> = next
            .history
            .iter()
            .map(|h| h.client_version.as_str())
            .collect();
        assert_eq!(names, ["CLIENT_VERSION_3X", "CLIENT_VERSION_INIT"]);
    }

    fn row(id: &str, lut: i64) -> WorkerMetricStats {
        WorkerMetricStats {
            worker_id: id.into(),
            last_update_time: Some(lut),
            metric_stats: BTreeMap::new(),
            operating_range: BTreeMap::new(),
            report_interval_ms: None,
        }
    }

    #[test]
    fn readiness_needs_the_gsi_and_a_fresh_row_for_every_owner() {
        let rows = [row("a", 1_000), row("b", 960)];
        let e = READINESS_ROW_EXPIRY;
        assert!(fleet_ready(
            true,
            [Some("a"), Some("b"), Some("a")],
            &rows,
            1_010,
            e
        ));
        assert!(
            !fleet_ready(false, [Some("a")], &rows, 1_010, e),
            "GSI not active"
        );
        assert!(
            !fleet_ready(true, [Some("a"), Some("c")], &rows, 1_010, e),
            "c has no row"
        );
        assert!(
            !fleet_ready(true, [Some("a"), None], &rows, 1_010, e),
            "a free lease blocks"
        );
        assert!(
            !fleet_ready(true, [Some("b")], &rows, 1_020, e),
            "b's row is 60 s old"
        );
        assert!(fleet_ready(true, [Some("b")], &rows, 1_019, e));
        assert!(
            fleet_ready(true, std::iter::empty(), &rows, 1_019, e),
            "no leases: ready"
        );
    }

    #[test]
    fn the_flip_waits_for_ten_minutes_of_readiness() {
        let clock = ManualClock::new();
        let mut s = UpgradeStabilizer::default();
        let tick = |s: &mut UpgradeStabilizer, leader, ready| {
            let out = s.observe(leader, ready, crate::Clock::now(&clock));
            clock.advance(READINESS_MONITOR_INTERVAL);
            out
        };
        for _ in 0..10 {
            assert!(!tick(&mut s, true, true));
        }
        assert!(tick(&mut s, true, true), "ready at 0, 1, ..., 10 minutes");
        // A break starts it over; so does losing the leadership.
        assert!(!tick(&mut s, true, false));
        for _ in 0..5 {
            assert!(!tick(&mut s, true, true));
        }
        assert!(!tick(&mut s, false, true));
        for _ in 0..10 {
            assert!(!tick(&mut s, true, true));
        }
        assert!(tick(&mut s, true, true));
    }

    fn table() -> Arc<InMemoryStateTable> {
        Arc::new(InMemoryStateTable::existing("app-CoordinatorState", "key"))
    }

    #[tokio::test]
    async fn initialize_creates_runs_or_completes_the_upgrade() {
        let clock = ManualClock::new();
        let t = table();
        let (v, state) = initialize(
            &*t,
            &clock,
            LIMIT,
            ClientVersionConfig::CompatibleWith2x,
            "w1",
            5,
        )
        .await
        .unwrap();
        assert_eq!(v, UpgradeFrom2x);
        assert_eq!(
            MigrationState::from_item(&t.peek(MIGRATION_KEY).unwrap()).unwrap(),
            state
        );
        // A 3.x-configured worker joining runs what the application runs.
        let (v, _) = initialize(&*t, &clock, LIMIT, ClientVersionConfig::V3x, "w2", 6)
            .await
            .unwrap();
        assert_eq!(v, UpgradeFrom2x);
        // After the flip, a 3.x-configured worker completes the upgrade.
        let flipped = state.changed(V3xWithRollback, "w1", 7);
        assert!(
            write_change(&*t, &clock, LIMIT, &state, &flipped)
                .await
                .unwrap()
        );
        assert!(
            !write_change(&*t, &clock, LIMIT, &state, &flipped)
                .await
                .unwrap(),
            "cv moved on"
        );
        let (v, now) = initialize(&*t, &clock, LIMIT, ClientVersionConfig::V3x, "w3", 8)
            .await
            .unwrap();
        assert_eq!(v, V3x);
        assert_eq!(now.history.len(), 2);
        assert_eq!(now.history[0].client_version, V3xWithRollback.as_str());
        assert_eq!(read_state(&*t, &clock, LIMIT).await.unwrap().unwrap(), now);
    }

    /// A table where another worker creates the item just before our first put.
    #[derive(Debug)]
    struct Racing {
        inner: Arc<InMemoryStateTable>,
        competitor: std::sync::Mutex<Option<Item>>,
    }

    #[async_trait::async_trait]
    impl StateTable for Racing {
        fn table_name(&self) -> &str {
            self.inner.table_name()
        }
        fn key_attribute(&self) -> &str {
            self.inner.key_attribute()
        }
        async fn create_table_if_not_exists(
            &self,
            b: crate::BillingMode,
        ) -> Result<bool, LeaseError> {
            self.inner.create_table_if_not_exists(b).await
        }
        async fn get(&self, key: &str) -> Result<Option<Item>, LeaseError> {
            self.inner.get(key).await
        }
        async fn scan(&self) -> Result<Vec<Item>, LeaseError> {
            self.inner.scan().await
        }
        async fn put(&self, item: &Item, condition: &Condition) -> Result<(), LeaseError> {
            let competitor = self.competitor.lock().unwrap().take();
            if let Some(other) = competitor {
                self.inner.seed(other)?;
            }
            self.inner.put(item, condition).await
        }
        async fn update(&self, key: &str, u: &Update, c: &Condition) -> Result<(), LeaseError> {
            self.inner.update(key, u, c).await
        }
        async fn delete(&self, key: &str, c: &Condition) -> Result<(), LeaseError> {
            self.inner.delete(key, c).await
        }
    }

    #[tokio::test]
    async fn initialize_reads_again_after_losing_the_race() {
        let clock = ManualClock::new();
        let inner = table();
        let racing = Racing {
            inner: inner.clone(),
            competitor: std::sync::Mutex::new(Some(MigrationState::new(V3x, "other", 1).to_item())),
        };
        let (v, s) = initialize(
            &racing,
            &clock,
            LIMIT,
            ClientVersionConfig::CompatibleWith2x,
            "w",
            2,
        )
        .await
        .unwrap();
        assert_eq!((v, s.modified_by.as_str()), (V3x, "other"));
        assert_eq!(
            inner.calls().get(&StateOperation::Get),
            Some(&2),
            "read, lost, read again"
        );
        // A failing table is an error for the caller to retry.
        let t = table();
        t.inject(StateFault::new(StateFaultKind::Throttle, 1).for_operation(StateOperation::Get));
        let err = initialize(&*t, &clock, LIMIT, ClientVersionConfig::V3x, "w", 2)
            .await
            .unwrap_err();
        assert!(err.is_retryable());
    }
}
