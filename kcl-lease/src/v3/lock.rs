//! The leader lock: the `Leader` item of `<app>-CoordinatorState` as the DynamoDB Lock
//! Client (1.3.0, used by the Java KCL 3.x) writes it, and [`LeaderLock`], a state machine
//! that acquires, heartbeats and releases it compatibly.
//!
//! # The item
//!
//! | attribute | type | value |
//! |---|---|---|
//! | `key` | S | `Leader` ([`LEADER_KEY`]) |
//! | `ownerName` | S | the holder's worker id |
//! | `leaseDuration` | S | the holder's lease duration in milliseconds, as decimal text (`"120000"` for a Java KCL) |
//! | `recordVersionNumber` | S | a fresh random UUID on every acquire and heartbeat |
//! | `isReleased` | S | `"1"` when released without deleting (the KCL deletes instead); absent otherwise |
//! | `data` | B | optional payload (the KCL writes none) |
//!
//! # The protocol, and how we judge expiry
//!
//! Expiry is never judged from a time written in the item: a contender remembers the
//! `recordVersionNumber` it saw and when it *first* saw it, on its own monotonic clock; the
//! lock is expired when the same number has stood for longer than the item's own
//! `leaseDuration`. That is what the Java lock client does, so the holder's `leaseDuration`
//! decides how fast others may take over: a Java leader writes 120 s; we write ours
//! ([`LeaderLockConfig::lease_duration`], by default the failover time), which Java
//! contenders honour as well.
//!
//! | step | request | condition |
//! |---|---|---|
//! | acquire, no item | PutItem (all attributes) | `attribute_not_exists(key)` |
//! | acquire, released item | PutItem | `attribute_exists(key) AND isReleased = "1"` |
//! | acquire, expired item | PutItem | `attribute_exists(key) AND recordVersionNumber = :seen` |
//! | take back our lapsed lock | PutItem | `attribute_exists(key) AND recordVersionNumber = :ours AND ownerName = :me` |
//! | heartbeat | UpdateItem `SET leaseDuration, recordVersionNumber = :new` | `attribute_exists(key) AND recordVersionNumber = :held AND ownerName = :me` |
//! | release | DeleteItem | as for heartbeat |
//!
//! An item naming us as owner that we do not hold (a restart under the same worker id) is
//! treated like anyone else's: we wait for it to expire, as the Java lock client does.
//!
//! The holder counts itself leader until `lease_duration` after the start of its last
//! successful acquire or heartbeat: any contender first sees that write's number after it
//! was made, so by then nobody else can have judged it expired. A heartbeat whose condition
//! fails means the lock was taken over: leadership ends at once. A holder whose validity ran
//! out (its heartbeats failed) and whose last number still stands takes the lock back at its
//! next check, conditionally on that number (as safe as a takeover: exactly one of the two
//! conditional writes can win).
//!
//! Every call is bounded by [`LeaderLockConfig::call_timeout`] on the injected clock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::item::{Condition, Item, Reader, Value, parse_int};
use super::table::{COORDINATOR_STATE_KEY, StateTable, Update, bounded};
use crate::timeouts::DEFAULT_CALL_TIMEOUT;
use crate::{Clock, LeaseError, RandomSource};

/// The key of the leader lock item.
pub const LEADER_KEY: &str = "Leader";

/// The attribute names of the lock item, as the DynamoDB Lock Client writes them.
pub mod attr {
    /// `ownerName` (S).
    pub const OWNER_NAME: &str = "ownerName";
    /// `leaseDuration` (S, milliseconds as decimal text).
    pub const LEASE_DURATION: &str = "leaseDuration";
    /// `recordVersionNumber` (S, a UUID).
    pub const RECORD_VERSION_NUMBER: &str = "recordVersionNumber";
    /// `isReleased` (S, `"1"` when present).
    pub const IS_RELEASED: &str = "isReleased";
    /// The value of `isReleased` on a released lock.
    pub const IS_RELEASED_VALUE: &str = "1";
    /// `data` (B, optional).
    pub const DATA: &str = "data";
}

/// The Java KCL's leader lock duration (2 minutes).
pub const JAVA_LEASE_DURATION: Duration = Duration::from_secs(120);
/// The Java KCL's leader heartbeat period (30 s).
pub const JAVA_HEARTBEAT_PERIOD: Duration = Duration::from_secs(30);

/// One lock item. `PartialEq` compares every field.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LockItem {
    /// The partition key value (`Leader`).
    pub key: String,
    /// `ownerName`.
    pub owner_name: String,
    /// `leaseDuration`.
    pub lease_duration: Duration,
    /// `recordVersionNumber`.
    pub record_version_number: String,
    /// `isReleased` present.
    pub is_released: bool,
    /// `data`, if any.
    pub data: Option<Vec<u8>>,
}

impl LockItem {
    /// The item as written to the table.
    pub fn to_item(&self) -> Item {
        let mut item = Item::new();
        item.insert(COORDINATOR_STATE_KEY.to_owned(), Value::s(&self.key));
        item.insert(attr::OWNER_NAME.to_owned(), Value::s(&self.owner_name));
        item.insert(
            attr::LEASE_DURATION.to_owned(),
            Value::s(self.lease_duration.as_millis().to_string()),
        );
        item.insert(
            attr::RECORD_VERSION_NUMBER.to_owned(),
            Value::s(&self.record_version_number),
        );
        if self.is_released {
            item.insert(
                attr::IS_RELEASED.to_owned(),
                Value::s(attr::IS_RELEASED_VALUE),
            );
        }
        if let Some(data) = &self.data {
            item.insert(attr::DATA.to_owned(), Value::B(data.clone()));
        }
        item
    }

    /// Reads a lock item. `ownerName`, `leaseDuration` (a non-negative integer of
    /// milliseconds) and `recordVersionNumber` are required, as the lock client requires them.
    pub fn from_item(item: &Item) -> Result<Self, LeaseError> {
        let what = format!(
            "lock item {}",
            item.get(COORDINATOR_STATE_KEY)
                .and_then(Value::as_s)
                .unwrap_or("?")
        );
        let r = Reader::new(&what, item);
        let key = r.s(COORDINATOR_STATE_KEY)?.to_owned();
        let owner_name = r.s(attr::OWNER_NAME)?.to_owned();
        let duration_text = r.s(attr::LEASE_DURATION)?;
        let millis = parse_int(duration_text)
            .and_then(|ms| u64::try_from(ms).ok())
            .ok_or_else(|| {
                r.malformed(format!(
                    "{} = {duration_text:?} is not a number of milliseconds",
                    attr::LEASE_DURATION
                ))
            })?;
        let record_version_number = r.s(attr::RECORD_VERSION_NUMBER)?.to_owned();
        let data = match r.get(attr::DATA) {
            Some(Value::B(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        Ok(Self {
            key,
            owner_name,
            lease_duration: Duration::from_millis(millis),
            record_version_number,
            is_released: item.contains_key(attr::IS_RELEASED),
            data,
        })
    }
}

/// A random version 4 UUID in its usual text form, as the lock client's record version
/// numbers are.
pub fn random_uuid(random: &dyn RandomSource) -> String {
    let hi = random.next_u64();
    let lo = random.next_u64();
    // Version 4 and the RFC 4122 variant.
    let hi = (hi & !0xF000) | 0x4000;
    let lo = (lo & !(0xC000_u64 << 48)) | (0x8000_u64 << 48);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        hi >> 32,
        (hi >> 16) & 0xFFFF,
        hi & 0xFFFF,
        lo >> 48,
        lo & 0xFFFF_FFFF_FFFF
    )
}

/// The settings of a [`LeaderLock`].
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct LeaderLockConfig {
    /// Our worker id, written as `ownerName`.
    pub owner_name: String,
    /// The `leaseDuration` we write: how long others wait on an unchanged record version
    /// number before taking over. Default: the failover time.
    pub lease_duration: Duration,
    /// How often the holder heartbeats; at most half of `lease_duration` (the lock client's
    /// own rule). Default: a third of `lease_duration`.
    pub heartbeat_period: Duration,
    /// How often a worker that is not the leader should look at the lock (for the loop that
    /// drives [`LeaderLock::check`]). Default: half of `lease_duration`, so a dead leader is
    /// replaced within about 1.5 × `lease_duration`.
    pub check_period: Duration,
    /// The bound on each call. Default: a third of `lease_duration`, at most
    /// [`DEFAULT_CALL_TIMEOUT`], so a heartbeat that hangs still leaves time for another
    /// before the lock runs out.
    pub call_timeout: Duration,
}

impl LeaderLockConfig {
    /// The defaults for a worker with this failover time (see each field).
    pub fn for_failover_time(owner_name: impl Into<String>, failover_time: Duration) -> Self {
        Self {
            owner_name: owner_name.into(),
            lease_duration: failover_time,
            heartbeat_period: failover_time / 3,
            check_period: failover_time / 2,
            call_timeout: DEFAULT_CALL_TIMEOUT.min(failover_time / 3),
        }
    }

    /// Checks the settings; the error names the option.
    pub fn validate(&self) -> Result<(), LeaseError> {
        let invalid = |option: &'static str, reason: String| {
            Err(LeaseError::InvalidConfig { option, reason })
        };
        if self.owner_name.is_empty() {
            return invalid("worker_identifier", "must not be empty".to_owned());
        }
        if self.lease_duration < Duration::from_millis(100) {
            return invalid(
                "leader_lease_duration",
                format!("{:?} is shorter than 100ms", self.lease_duration),
            );
        }
        if self.heartbeat_period.is_zero() || self.heartbeat_period * 2 > self.lease_duration {
            return invalid(
                "leader_heartbeat_period",
                format!(
                    "{:?} must be positive and at most half of leader_lease_duration {:?}",
                    self.heartbeat_period, self.lease_duration
                ),
            );
        }
        if self.check_period.is_zero() {
            return invalid("leader_check_period", "must be positive".to_owned());
        }
        if self.call_timeout.is_zero()
            || self.heartbeat_period + self.call_timeout >= self.lease_duration
        {
            return invalid(
                "call_timeout",
                format!(
                    "{:?} must be positive, and with leader_heartbeat_period {:?} shorter than \
                     leader_lease_duration {:?}",
                    self.call_timeout, self.heartbeat_period, self.lease_duration
                ),
            );
        }
        Ok(())
    }
}

/// What [`LeaderLock::check`] found.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub enum LeaderStatus {
    /// We hold the lock.
    Leader,
    /// Someone else holds it (named when known), or we lost a race for it.
    Follower {
        /// The holder's `ownerName`, when an item was read.
        leader: Option<String>,
    },
}

#[derive(Clone, Debug)]
struct Held {
    record_version_number: String,
    valid_until: Instant,
}

#[derive(Clone, Debug)]
struct Observation {
    record_version_number: String,
    owner_name: String,
    lease_duration: Duration,
    first_seen: Instant,
}

/// The leader lock state machine. See the [module documentation](self).
///
/// One task drives it: [`LeaderLock::check`] every `check_period` while not the leader,
/// [`LeaderLock::heartbeat`] every `heartbeat_period` while the leader, and
/// [`LeaderLock::release`] on graceful shutdown. Not wired into the worker yet.
#[derive(Debug)]
pub struct LeaderLock {
    table: Arc<dyn StateTable>,
    config: LeaderLockConfig,
    clock: Arc<dyn Clock>,
    random: Arc<dyn RandomSource>,
    held: Option<Held>,
    observed: Option<Observation>,
}

impl LeaderLock {
    /// A lock on `table` (the coordinator state table). The config is validated.
    pub fn new(
        table: Arc<dyn StateTable>,
        config: LeaderLockConfig,
        clock: Arc<dyn Clock>,
        random: Arc<dyn RandomSource>,
    ) -> Result<Self, LeaseError> {
        config.validate()?;
        Ok(Self {
            table,
            config,
            clock,
            random,
            held: None,
            observed: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &LeaderLockConfig {
        &self.config
    }

    /// True while we hold the lock and its last write is less than `lease_duration` old.
    pub fn is_leader(&self) -> bool {
        self.held
            .as_ref()
            .is_some_and(|held| self.clock.now() < held.valid_until)
    }

    /// The leader last seen in the item (ourselves while we hold it).
    pub fn known_leader(&self) -> Option<&str> {
        if self.is_leader() {
            Some(&self.config.owner_name)
        } else {
            self.observed.as_ref().map(|o| o.owner_name.as_str())
        }
    }

    fn new_item(&self) -> LockItem {
        LockItem {
            key: LEADER_KEY.to_owned(),
            owner_name: self.config.owner_name.clone(),
            lease_duration: self.config.lease_duration,
            record_version_number: random_uuid(&*self.random),
            is_released: false,
            data: None,
        }
    }

    /// Reads the lock and takes it when it is absent, released, or expired by our judgment
    /// (see the [module documentation](self)). Holding a valid lock, it answers `Leader`
    /// without a call.
    pub async fn check(&mut self) -> Result<LeaderStatus, LeaseError> {
        if self.is_leader() {
            return Ok(LeaderStatus::Leader);
        }
        // A lock whose validity ran out (heartbeats failed) but that nobody took over still
        // carries our last number: taking it back on that number is as safe as any takeover
        // (both are conditional on it, so exactly one wins), and spares a full lease duration.
        let limit = self.config.call_timeout;
        let current = bounded(&*self.clock, limit, "get", self.table.get(LEADER_KEY)).await?;
        // Forgotten only once the item was read (a failed read keeps it for the next check).
        let lapsed = self.held.take().map(|held| held.record_version_number);
        let now = self.clock.now();
        let condition = match current.as_ref().map(LockItem::from_item).transpose()? {
            None => Condition::not_exists(COORDINATOR_STATE_KEY),
            Some(lock) if lock.is_released => Condition::And(vec![
                Condition::exists(COORDINATOR_STATE_KEY),
                Condition::equals(attr::IS_RELEASED, Value::s(attr::IS_RELEASED_VALUE)),
            ]),
            Some(lock)
                if lapsed.as_deref() == Some(lock.record_version_number.as_str())
                    && lock.owner_name == self.config.owner_name =>
            {
                tracing::info!("the leader lock lapsed but was not taken over; taking it back");
                Condition::And(vec![
                    Condition::exists(COORDINATOR_STATE_KEY),
                    Condition::equals(
                        attr::RECORD_VERSION_NUMBER,
                        Value::s(lock.record_version_number),
                    ),
                    Condition::equals(attr::OWNER_NAME, Value::s(&self.config.owner_name)),
                ])
            }
            Some(lock) => {
                let seen = match &self.observed {
                    Some(o) if o.record_version_number == lock.record_version_number => o.clone(),
                    _ => Observation {
                        record_version_number: lock.record_version_number.clone(),
                        owner_name: lock.owner_name.clone(),
                        lease_duration: lock.lease_duration,
                        first_seen: now,
                    },
                };
                let expired = now.saturating_duration_since(seen.first_seen) > seen.lease_duration;
                self.observed = Some(seen);
                if !expired {
                    return Ok(LeaderStatus::Follower {
                        leader: Some(lock.owner_name),
                    });
                }
                tracing::info!(
                    previous = %lock.owner_name,
                    lease_duration = ?lock.lease_duration,
                    "the leader lock stood unchanged past its lease duration; taking it over"
                );
                Condition::And(vec![
                    Condition::exists(COORDINATOR_STATE_KEY),
                    Condition::equals(
                        attr::RECORD_VERSION_NUMBER,
                        Value::s(lock.record_version_number),
                    ),
                ])
            }
        };
        let item = self.new_item();
        let started = self.clock.now();
        let raw = item.to_item();
        let put = self.table.put(&raw, &condition);
        match bounded(&*self.clock, limit, "put", put).await {
            Ok(()) => {
                tracing::info!(owner = %item.owner_name, "acquired the leader lock");
                self.held = Some(Held {
                    record_version_number: item.record_version_number,
                    valid_until: started + self.config.lease_duration,
                });
                self.observed = None;
                Ok(LeaderStatus::Leader)
            }
            Err(err) if err.is_condition_failed() => Ok(LeaderStatus::Follower {
                leader: self.observed.as_ref().map(|o| o.owner_name.clone()),
            }),
            Err(err) => Err(err),
        }
    }

    /// Heartbeats the held lock (a new record version number). `Ok(true)`: still the leader;
    /// `Ok(false)`: not holding it, or it was taken over (the condition failed). Another
    /// error leaves the lock held until its validity runs out; the call is never waited on
    /// past that validity (bounded by the smaller of `call_timeout` and the time left).
    pub async fn heartbeat(&mut self) -> Result<bool, LeaseError> {
        let Some(held) = self.held.clone() else {
            return Ok(false);
        };
        if self.clock.now() >= held.valid_until {
            // Kept for `check`, which may take the lock back on its last number.
            return Ok(false);
        }
        let new_rvn = random_uuid(&*self.random);
        let update = Update::new()
            .set(
                attr::LEASE_DURATION,
                Value::s(self.config.lease_duration.as_millis().to_string()),
            )
            .set(attr::RECORD_VERSION_NUMBER, Value::s(&new_rvn));
        let condition = self.holder_condition(&held);
        let started = self.clock.now();
        // Never wait on a hung call past the lock's validity: leadership ends then.
        let limit = self
            .config
            .call_timeout
            .min(held.valid_until.saturating_duration_since(started));
        let call = self.table.update(LEADER_KEY, &update, &condition);
        match bounded(&*self.clock, limit, "update", call).await {
            Ok(()) => {
                self.held = Some(Held {
                    record_version_number: new_rvn,
                    valid_until: started + self.config.lease_duration,
                });
                Ok(true)
            }
            Err(err) if err.is_condition_failed() => {
                tracing::warn!("the leader lock was taken over; no longer the leader");
                self.held = None;
                Ok(false)
            }
            Err(err) => Err(err),
        }
    }

    /// Releases the lock if held (deletes the item, as the Java KCL's lock client does), so
    /// another worker can take it at its next check. Leadership ends whatever the answer.
    /// `Ok(true)` when the item was deleted.
    pub async fn release(&mut self) -> Result<bool, LeaseError> {
        let Some(held) = self.held.take() else {
            return Ok(false);
        };
        let condition = self.holder_condition(&held);
        let call = self.table.delete(LEADER_KEY, &condition);
        match bounded(&*self.clock, self.config.call_timeout, "delete", call).await {
            Ok(()) => Ok(true),
            Err(err) if err.is_condition_failed() => Ok(false),
            Err(err) => Err(err),
        }
    }

    fn holder_condition(&self, held: &Held) -> Condition {
        Condition::And(vec![
            Condition::exists(COORDINATOR_STATE_KEY),
            Condition::equals(
                attr::RECORD_VERSION_NUMBER,
                Value::s(&held.record_version_number),
            ),
            Condition::equals(attr::OWNER_NAME, Value::s(&self.config.owner_name)),
        ])
    }
}

/// Drives `lock` until `stop` turns true: checks every `check_period` while not the
/// leader, heartbeats every `heartbeat_period` while the leader (waking early when the
/// lock's validity would run out first), and publishes whether we are the leader on
/// `leader` after every step. On stop it releases the lock (one bounded call) and publishes
/// `false`. Errors of single calls are logged and retried at the next step. Returns the
/// lock. Not spawned by the worker yet.
pub async fn run_leader_lock(
    mut lock: LeaderLock,
    mut stop: tokio::sync::watch::Receiver<bool>,
    leader: tokio::sync::watch::Sender<bool>,
) -> LeaderLock {
    loop {
        if *stop.borrow() {
            break;
        }
        let step = if lock.is_leader() {
            lock.heartbeat().await.map(|_| ())
        } else {
            lock.check().await.map(|_| ())
        };
        if let Err(err) = step {
            tracing::warn!(error = %crate::ErrorChain(&err), "leader lock call failed; retrying at the next step");
        }
        let is_leader = lock.is_leader();
        leader.send_replace(is_leader);
        let wait = match lock.held.as_ref().filter(|_| is_leader) {
            Some(held) => lock
                .config
                .heartbeat_period
                .min(held.valid_until.saturating_duration_since(lock.clock.now())),
            // Not the leader: look again at the next check, or exactly when the holder's
            // record version number would have stood for its lease duration, if sooner,
            // so a dead holder is replaced at once (within check_period + leaseDuration
            // of its last heartbeat).
            None => match lock.observed.as_ref() {
                Some(seen) => lock.config.check_period.min(
                    (seen.first_seen + seen.lease_duration)
                        .saturating_duration_since(lock.clock.now())
                        + Duration::from_millis(1),
                ),
                None => lock.config.check_period,
            },
        };
        let sleep = lock.clock.sleep(wait);
        tokio::select! {
            () = sleep => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        // Validity may have run out while sleeping.
        leader.send_replace(lock.is_leader());
    }
    if let Err(err) = lock.release().await {
        tracing::warn!(error = %crate::ErrorChain(&err), "could not release the leader lock; it expires");
    }
    leader.send_replace(false);
    lock
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeededRandom;
    use crate::test_util::ManualClock;
    use crate::v3::memory::InMemoryStateTable;

    const F: Duration = Duration::from_secs(10);

    fn setup() -> (Arc<InMemoryStateTable>, ManualClock) {
        (
            Arc::new(InMemoryStateTable::existing("app-CoordinatorState", "key")),
            ManualClock::new(),
        )
    }

    fn lock(
        table: &Arc<InMemoryStateTable>,
        clock: &ManualClock,
        me: &str,
        seed: u64,
    ) -> LeaderLock {
        let mut config = LeaderLockConfig::for_failover_time(me, F);
        config.call_timeout = Duration::from_secs(2);
        LeaderLock::new(
            table.clone(),
            config,
            Arc::new(clock.clone()),
            Arc::new(SeededRandom::new(seed)),
        )
        .unwrap()
    }

    fn java_item(owner: &str, rvn: &str) -> Item {
        Item::from([
            ("key".to_owned(), Value::s("Leader")),
            ("ownerName".to_owned(), Value::s(owner)),
            ("leaseDuration".to_owned(), Value::s("120000")),
            ("recordVersionNumber".to_owned(), Value::s(rvn)),
        ])
    }

    #[test]
    fn uuids_look_like_version_4() {
        let r = SeededRandom::new(1);
        let a = random_uuid(&r);
        let b = random_uuid(&r);
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'));
        assert!(matches!(
            parts[3].chars().next(),
            Some('8' | '9' | 'a' | 'b')
        ));
    }

    #[test]
    fn items_round_trip_and_bad_ones_are_named() {
        let item = LockItem {
            key: LEADER_KEY.into(),
            owner_name: "w".into(),
            lease_duration: Duration::from_millis(10_000),
            record_version_number: "r".into(),
            is_released: true,
            data: Some(vec![1, 2]),
        };
        let raw = item.to_item();
        assert_eq!(raw.get("leaseDuration"), Some(&Value::s("10000")));
        assert_eq!(raw.get("isReleased"), Some(&Value::s("1")));
        assert_eq!(LockItem::from_item(&raw).unwrap(), item);
        let java = LockItem::from_item(&java_item("j", "x")).unwrap();
        assert_eq!(java.lease_duration, JAVA_LEASE_DURATION);
        assert!(!java.is_released);
        let mut bad = java_item("j", "x");
        bad.insert("leaseDuration".into(), Value::s("soon"));
        let err = LockItem::from_item(&bad).unwrap_err().to_string();
        assert!(
            err.contains("lock item Leader") && err.contains("leaseDuration"),
            "{err}"
        );
        bad.remove("leaseDuration");
        assert!(LockItem::from_item(&bad).is_err());
    }

    #[test]
    fn config_is_validated() {
        let ok = LeaderLockConfig::for_failover_time("w", F);
        ok.validate().unwrap();
        assert_eq!(
            ok.heartbeat_period,
            Duration::from_millis(3333) + Duration::from_nanos(333_333)
        );
        let mut bad = ok.clone();
        bad.heartbeat_period = Duration::from_secs(6);
        assert!(matches!(
            bad.validate(),
            Err(LeaseError::InvalidConfig {
                option: "leader_heartbeat_period",
                ..
            })
        ));
        let mut bad = ok.clone();
        bad.owner_name.clear();
        assert!(bad.validate().is_err());
        let mut bad = ok;
        bad.call_timeout = Duration::from_secs(10);
        assert!(matches!(
            bad.validate(),
            Err(LeaseError::InvalidConfig {
                option: "call_timeout",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn acquires_an_absent_lock_and_writes_the_lock_client_item() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        assert_eq!(a.check().await.unwrap(), LeaderStatus::Leader);
        assert!(a.is_leader());
        let item = LockItem::from_item(&table.peek("Leader").unwrap()).unwrap();
        assert_eq!(item.owner_name, "a");
        assert_eq!(item.lease_duration, F);
        assert!(!item.is_released);
        // A valid lock answers without a call.
        let gets = table
            .calls()
            .get(&super::super::memory::StateOperation::Get)
            .copied();
        assert_eq!(a.check().await.unwrap(), LeaderStatus::Leader);
        assert_eq!(
            table
                .calls()
                .get(&super::super::memory::StateOperation::Get)
                .copied(),
            gets
        );
    }

    #[tokio::test]
    async fn heartbeats_keep_others_out_and_a_dead_leader_is_replaced_after_its_duration() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        let mut b = lock(&table, &clock, "b", 2);
        a.check().await.unwrap();
        // b first sees a's number now; a heartbeats every 3 s for a minute.
        for _ in 0..20 {
            assert_eq!(
                b.check().await.unwrap(),
                LeaderStatus::Follower {
                    leader: Some("a".into())
                }
            );
            clock.advance(Duration::from_secs(3));
            assert!(a.heartbeat().await.unwrap());
        }
        assert!(a.is_leader());
        // a dies. b first sees the last number at t0 and must wait more than F from then.
        let t0 = clock.elapsed();
        assert!(matches!(
            b.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
        clock.set(t0 + F);
        assert!(
            matches!(b.check().await.unwrap(), LeaderStatus::Follower { .. }),
            "not yet: exactly F"
        );
        // Meanwhile a's own view ran out 10 s after its last heartbeat started.
        assert!(!a.is_leader());
        clock.set(t0 + F + Duration::from_millis(1));
        assert_eq!(b.check().await.unwrap(), LeaderStatus::Leader);
        assert_eq!(
            LockItem::from_item(&table.peek("Leader").unwrap())
                .unwrap()
                .owner_name,
            "b"
        );
        // a comes back: its heartbeat is refused (nothing held) and its check sees b.
        assert!(!a.heartbeat().await.unwrap());
        assert_eq!(
            a.check().await.unwrap(),
            LeaderStatus::Follower {
                leader: Some("b".into())
            }
        );
    }

    #[tokio::test]
    async fn a_taken_over_lock_ends_leadership_at_the_next_heartbeat() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        a.check().await.unwrap();
        // Someone overwrote the lock (e.g. a contender whose clock judged it expired).
        table.seed(java_item("j", "other")).unwrap();
        assert!(!a.heartbeat().await.unwrap());
        assert!(!a.is_leader());
        assert_eq!(
            table.peek("Leader").unwrap().get("ownerName"),
            Some(&Value::s("j"))
        );
    }

    #[tokio::test]
    async fn a_java_leader_is_waited_for_by_its_own_lease_duration() {
        let (table, clock) = setup();
        table.seed(java_item("java-1", "rvn-1")).unwrap();
        let mut b = lock(&table, &clock, "b", 2);
        assert!(matches!(
            b.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
        clock.advance(Duration::from_secs(60));
        // The Java leader heartbeats (new number): the wait starts again.
        table.seed(java_item("java-1", "rvn-2")).unwrap();
        assert!(matches!(
            b.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
        clock.advance(Duration::from_secs(119));
        assert!(matches!(
            b.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
        assert_eq!(b.known_leader(), Some("java-1"));
        clock.advance(Duration::from_secs(2));
        assert_eq!(b.check().await.unwrap(), LeaderStatus::Leader);
    }

    #[tokio::test]
    async fn release_deletes_and_a_released_item_is_taken_at_once() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        let mut b = lock(&table, &clock, "b", 2);
        a.check().await.unwrap();
        assert!(matches!(
            b.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
        assert!(a.release().await.unwrap());
        assert!(!a.is_leader());
        assert_eq!(table.peek("Leader"), None);
        assert_eq!(b.check().await.unwrap(), LeaderStatus::Leader);
        // A lock client configured not to delete leaves isReleased = "1": also free.
        let mut released = java_item("j", "r");
        released.insert("isReleased".into(), Value::s("1"));
        table.seed(released).unwrap();
        let mut c = lock(&table, &clock, "c", 3);
        assert_eq!(c.check().await.unwrap(), LeaderStatus::Leader);
        assert!(c.release().await.unwrap());
        assert!(!c.release().await.unwrap(), "nothing held any more");
    }

    #[tokio::test]
    async fn two_contenders_for_a_free_lock_one_wins() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        let mut b = lock(&table, &clock, "b", 2);
        let (ra, rb) = tokio::join!(a.check(), b.check());
        let statuses = [ra.unwrap(), rb.unwrap()];
        let leaders = statuses
            .iter()
            .filter(|s| **s == LeaderStatus::Leader)
            .count();
        assert_eq!(leaders, 1);
    }

    #[tokio::test]
    async fn a_hung_table_is_a_timeout_and_leadership_runs_out() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        a.check().await.unwrap();
        table.set_hanging(true);
        let mover = clock.clone();
        let (out, ()) = tokio::join!(a.heartbeat(), async move {
            mover.advance_and_settle(Duration::from_secs(2)).await;
        });
        assert!(matches!(
            out,
            Err(LeaseError::Timeout {
                operation: "update",
                ..
            })
        ));
        assert!(a.is_leader(), "still within the lease duration");
        clock.advance(Duration::from_secs(8));
        assert!(!a.is_leader());
        assert!(!a.heartbeat().await.unwrap());
    }
    #[tokio::test]
    async fn the_driver_keeps_one_leader_fails_over_and_releases_on_stop() {
        let (table, clock) = setup();
        let mut stops = Vec::new();
        let mut leads = Vec::new();
        let mut tasks = Vec::new();
        for (i, me) in ["a", "b"].into_iter().enumerate() {
            let (stop, stop_rx) = tokio::sync::watch::channel(false);
            let (lead, lead_rx) = tokio::sync::watch::channel(false);
            tasks.push(Some(tokio::spawn(run_leader_lock(
                lock(&table, &clock, me, i as u64),
                stop_rx,
                lead,
            ))));
            stops.push(stop);
            leads.push(lead_rx);
            clock.settle().await;
        }
        let leaders =
            |leads: &[tokio::sync::watch::Receiver<bool>], alive: &[bool]| -> Vec<usize> {
                (0..leads.len())
                    .filter(|i| alive[*i] && *leads[*i].borrow())
                    .collect()
            };
        let mut alive = [true, true];
        clock.advance_and_settle(Duration::from_secs(60)).await;
        assert_eq!(
            leaders(&leads, &alive),
            [0],
            "a keeps the lock by heartbeats"
        );
        let heartbeats = table
            .calls()
            .get(&super::super::memory::StateOperation::Update)
            .copied()
            .unwrap_or(0);
        assert!(
            (17..=19).contains(&heartbeats),
            "one heartbeat per 3.33 s: {heartbeats}"
        );

        // The table hangs (a dead NAT): a's heartbeats time out and it stops counting itself
        // leader when its validity runs out; nobody leads meanwhile.
        table.set_hanging(true);
        for step in 1..=20u32 {
            clock.advance_and_settle(Duration::from_millis(500)).await;
            assert!(leaders(&leads, &alive).len() <= 1, "two leaders at {step}");
        }
        assert!(leaders(&leads, &alive).is_empty());
        // The table recovers: a takes its lapsed lock back, or b (which saw the same number
        // stand through the hang) takes it over; never both.
        table.set_hanging(false);
        let mut back = None;
        for step in 1..=20u32 {
            clock.advance_and_settle(Duration::from_millis(500)).await;
            let now = leaders(&leads, &alive);
            assert!(now.len() <= 1, "two leaders at {step}");
            if back.is_none() && !now.is_empty() {
                back = Some(step);
            }
        }
        assert!(
            back.is_some_and(|s| s <= 12),
            "a leader again after {back:?} half-seconds"
        );

        // The leader crashes (no release): the other leads within lease + 2 check periods.
        let leader = leaders(&leads, &alive)[0];
        let other = 1 - leader;
        tasks[leader].take().unwrap().abort();
        alive[leader] = false;
        let mut after = None;
        for step in 1..=60u32 {
            clock.advance_and_settle(Duration::from_millis(500)).await;
            assert!(leaders(&leads, &alive).len() <= 1);
            if *leads[other].borrow() {
                after = Some(step);
                break;
            }
        }
        let after = after.expect("the other took over");
        assert!(
            after <= 40,
            "took over {after} half-seconds after the crash"
        );
        let owner = LockItem::from_item(&table.peek("Leader").unwrap())
            .unwrap()
            .owner_name;
        assert_eq!(owner, ["a", "b"][other]);

        // A graceful stop releases: the item is gone.
        stops[other].send_replace(true);
        clock.advance_and_settle(Duration::from_millis(1)).await;
        let survivor = tasks[other].take().unwrap().await.unwrap();
        assert!(!survivor.is_leader() && !*leads[other].borrow());
        assert_eq!(table.peek("Leader"), None);
    }

    #[tokio::test]
    async fn a_lapsed_lock_is_taken_back_unless_someone_took_it() {
        let (table, clock) = setup();
        let mut a = lock(&table, &clock, "a", 1);
        a.check().await.unwrap();
        clock.advance(F);
        assert!(!a.is_leader());
        assert!(!a.heartbeat().await.unwrap(), "validity ran out");
        assert_eq!(
            a.check().await.unwrap(),
            LeaderStatus::Leader,
            "nobody took it: back at once"
        );
        // Taken over meanwhile: no way back before it expires again.
        clock.advance(F);
        table.seed(java_item("j", "taken")).unwrap();
        assert!(matches!(
            a.check().await.unwrap(),
            LeaderStatus::Follower { .. }
        ));
    }

    #[tokio::test]
    async fn our_own_name_in_an_item_we_do_not_hold_is_waited_for() {
        let (table, clock) = setup();
        let mut before = java_item("a", "from-a-previous-run");
        before.insert("leaseDuration".into(), Value::s("10000"));
        table.seed(before).unwrap();
        let mut a = lock(&table, &clock, "a", 1);
        assert_eq!(
            a.check().await.unwrap(),
            LeaderStatus::Follower {
                leader: Some("a".into())
            }
        );
        assert!(!a.is_leader());
        clock.advance(F + Duration::from_millis(1));
        assert_eq!(a.check().await.unwrap(), LeaderStatus::Leader);
    }
}
