//! The health of each shard this worker reads: [`ShardHealth`], from
//! [`WorkerHandle::shard_health`](crate::WorkerHandle::shard_health).
//!
//! A shard whose calls keep failing makes no progress; its health shows it (the last error,
//! the number of consecutive failures, the time of the last successful read), so an
//! application can wire a liveness or readiness probe to it, e.g. "unhealthy when a shard has
//! not read successfully for a minute".

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use crate::stream::{StreamError, StreamErrorKind};

/// The last failed read of a shard.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ShardFailure {
    /// What kind of failure.
    pub kind: StreamErrorKind,
    /// The error with its causes, as text.
    pub message: String,
    /// When it happened.
    pub at: SystemTime,
}

/// The health of one shard read by this worker.
#[derive(Clone, PartialEq, Eq, Debug)]
#[non_exhaustive]
pub struct ShardHealth {
    /// The shard (lease key).
    pub shard_id: String,
    /// When records were last read successfully (`None` before the first read).
    pub last_success: Option<SystemTime>,
    /// The last failed call, if any since the shard's consumer started.
    pub last_error: Option<ShardFailure>,
    /// Calls failed in a row since the last success (0 while healthy).
    pub consecutive_failures: u32,
    /// How far behind the tip of the shard the last successful read was.
    pub millis_behind_latest: Option<u64>,
}

impl ShardHealth {
    fn new(shard_id: String) -> Self {
        Self {
            shard_id,
            last_success: None,
            last_error: None,
            consecutive_failures: 0,
            millis_behind_latest: None,
        }
    }
}

/// The health of every shard being read, shared by the consumers and the handle.
#[derive(Debug, Default)]
pub(crate) struct HealthRegistry {
    shards: Mutex<BTreeMap<String, ShardHealth>>,
}

impl HealthRegistry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, ShardHealth>> {
        // Every update is a single assignment: a poisoned lock leaves consistent data.
        self.shards.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts tracking `shard_id`; the entry goes when the guard is dropped.
    pub(crate) fn track(self: &Arc<Self>, shard_id: &str) -> HealthGuard {
        self.lock()
            .insert(shard_id.to_owned(), ShardHealth::new(shard_id.to_owned()));
        HealthGuard {
            registry: self.clone(),
            shard_id: shard_id.to_owned(),
        }
    }

    /// A successful read. Returns the failures in a row it ends.
    pub(crate) fn success(&self, shard_id: &str, at: SystemTime, millis_behind: u64) -> u32 {
        let mut shards = self.lock();
        let Some(h) = shards.get_mut(shard_id) else {
            return 0;
        };
        h.last_success = Some(at);
        h.millis_behind_latest = Some(millis_behind);
        std::mem::take(&mut h.consecutive_failures)
    }

    /// A failed call. Returns the failures in a row, this one included.
    pub(crate) fn failure(&self, shard_id: &str, error: &StreamError, at: SystemTime) -> u32 {
        let mut shards = self.lock();
        let Some(h) = shards.get_mut(shard_id) else {
            return 1;
        };
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.last_error = Some(ShardFailure {
            kind: error.kind(),
            message: kcl_lease::ErrorChain(error).to_string(),
            at,
        });
        h.consecutive_failures
    }

    /// Every tracked shard, in shard id order.
    pub(crate) fn snapshot(&self) -> Vec<ShardHealth> {
        self.lock().values().cloned().collect()
    }
}

/// Removes a shard's entry when its consumer ends.
#[derive(Debug)]
pub(crate) struct HealthGuard {
    registry: Arc<HealthRegistry>,
    shard_id: String,
}

impl Drop for HealthGuard {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.shard_id);
    }
}
