//! Shard discovery, lease creation, the parent check and finished-lease cleanup.
//!
//! Every lease store call made here is bounded by `call_timeout` on the injected clock (a
//! call that does not finish is [`LeaseError::Timeout`], as in the lease coordinator);
//! stream calls are bounded by the worker's stream client.
//!
//! Decisions, where the Java KCL leaves room:
//! - A shard without a lease gets one unless a descendant of it has a lease that started
//!   (then it was processed and its lease cleaned up). A child created early (at
//!   TRIM_HORIZON) does not stop its missing parent's lease from being created.
//! - A shard whose parent has (or is given in the same pass) a lease starts at
//!   TRIM_HORIZON and records those parents. Any other open shard starts at the initial
//!   position; closed ones get a lease only for TRIM_HORIZON / AT_TIMESTAMP (so nothing is
//!   skipped). With LATEST, the closed ancestors get no lease, and the open shard's lease
//!   records no parents (nothing is owed from them).
//! - A parent counts as finished when its lease has SHARD_END, or it has no lease and is no
//!   longer in the stream. A child whose own checkpoint is past TRIM_HORIZON does not wait
//!   (it already started once, so its parents were finished then; this also keeps working
//!   after the parents' leases were cleaned up).
//! - Cleanup deletes a SHARD_END lease once every child's lease has moved past
//!   TRIM_HORIZON (or the child left the stream without a lease).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;

use kcl_kpl::{ExtendedSequenceNumber, Position};
use kcl_lease::{Clock, Lease, LeaseError, LeaseStore};
use tracing::{debug, info, warn};

use crate::config::{InitialPosition, WorkerConfig};
use crate::error::WorkerError;
use crate::stream::{ChildShard, Shard, StreamClient, StreamError};

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Shards listed.
    pub shards: usize,
    /// Leases created.
    pub leases_created: usize,
    /// Finished leases deleted.
    pub leases_deleted: usize,
}

/// Lists shards and keeps the lease table in step with them.
#[derive(Debug)]
pub(crate) struct ShardSyncer {
    config: Arc<WorkerConfig>,
    stream: Arc<dyn StreamClient>,
    store: Arc<dyn LeaseStore>,
    clock: Arc<dyn Clock>,
}

fn initial_checkpoint(initial: InitialPosition) -> ExtendedSequenceNumber {
    match initial {
        InitialPosition::Latest => ExtendedSequenceNumber::LATEST,
        InitialPosition::TrimHorizon => ExtendedSequenceNumber::TRIM_HORIZON,
        InitialPosition::AtTimestamp(_) => ExtendedSequenceNumber::AT_TIMESTAMP,
    }
}

/// The leases to create for `shards` given the existing `leases`.
pub(crate) fn plan_new_leases(
    shards: &[Shard],
    leases: &BTreeMap<String, Lease>,
    initial: InitialPosition,
) -> Vec<Lease> {
    let by_id: HashMap<&str, &Shard> = shards.iter().map(|s| (s.shard_id.as_str(), s)).collect();
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in shards {
        for p in s.parent_ids() {
            children.entry(p).or_default().push(&s.shard_id);
        }
    }
    // Shards (by id) whose lease, or a descendant's, has started (moved past TRIM_HORIZON):
    // such a shard was processed before (its own lease may have been cleaned up).
    fn covered<'a>(
        id: &'a str,
        leases: &BTreeMap<String, Lease>,
        children: &HashMap<&'a str, Vec<&'a str>>,
        memo: &mut HashMap<&'a str, bool>,
    ) -> bool {
        if let Some(v) = memo.get(id) {
            return *v;
        }
        memo.insert(id, false); // guards against malformed cycles
        let v = leases.get(id).is_some_and(|l| has_started(&l.checkpoint))
            || children
                .get(id)
                .is_some_and(|c| c.iter().any(|c| covered(c, leases, children, memo)));
        memo.insert(id, v);
        v
    }
    let mut covered_memo = HashMap::new();
    // Decision per shard: Some(lease) when it has or gets a lease.
    let mut decided: HashMap<&str, bool> = HashMap::new();
    let mut planned: Vec<Lease> = Vec::new();
    // Parents before children: repeat until stable (the listing is small).
    let mut order: Vec<&Shard> = shards.iter().collect();
    order.sort_by(|a, b| a.starting_sequence_number.cmp(&b.starting_sequence_number));
    let mut pending: Vec<&Shard> = order;
    let mut progress = true;
    while progress && !pending.is_empty() {
        progress = false;
        let mut rest = Vec::new();
        for shard in pending {
            let id = shard.shard_id.as_str();
            let parents: Vec<&str> = shard
                .parent_ids()
                .filter(|p| by_id.contains_key(p) || leases.contains_key(*p))
                .collect();
            if parents.iter().any(|p| {
                by_id.contains_key(p) && !leases.contains_key(*p) && !decided.contains_key(p)
            }) {
                rest.push(shard);
                continue;
            }
            progress = true;
            if leases.contains_key(id) {
                decided.insert(id, true);
                continue;
            }
            let descendants_leased = children.get(id).is_some_and(|c| {
                c.iter()
                    .any(|c| covered(c, leases, &children, &mut covered_memo))
            });
            if descendants_leased {
                decided.insert(id, false);
                continue;
            }
            let leased_parents: Vec<&str> = parents
                .iter()
                .copied()
                .filter(|p| leases.contains_key(*p) || decided.get(p).copied().unwrap_or(false))
                .collect();
            let checkpoint = if !leased_parents.is_empty() {
                Some(ExtendedSequenceNumber::TRIM_HORIZON)
            } else if !shard.is_closed() {
                Some(initial_checkpoint(initial))
            } else {
                match initial {
                    InitialPosition::Latest => None,
                    other => Some(initial_checkpoint(other)),
                }
            };
            match checkpoint {
                Some(cp) => {
                    decided.insert(id, true);
                    planned.push(
                        Lease::new(id, cp)
                            .with_parents(leased_parents.iter().copied())
                            .with_hash_key_range(shard.hash_key_range),
                    );
                }
                None => {
                    decided.insert(id, false);
                }
            }
        }
        pending = rest;
    }
    planned
}

impl ShardSyncer {
    pub(crate) fn new(
        config: Arc<WorkerConfig>,
        stream: Arc<dyn StreamClient>,
        store: Arc<dyn LeaseStore>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            config,
            stream,
            store,
            clock,
        }
    }

    /// Runs one lease store call for at most `call_timeout`.
    async fn store_call<T>(
        &self,
        call: &'static str,
        fut: impl Future<Output = Result<T, LeaseError>>,
    ) -> Result<T, LeaseError> {
        let limit = self.config.call_timeouts().call;
        kcl_lease::timeouts::within(&*self.clock, limit, fut)
            .await
            .unwrap_or(Err(LeaseError::Timeout {
                operation: call,
                after: limit,
            }))
    }

    /// Lists every shard.
    pub(crate) async fn list_shards(&self) -> Result<Vec<Shard>, StreamError> {
        self.stream
            .list_all_shards(&self.config.stream_name, None)
            .await
    }

    /// One sync: create missing leases, then delete finished ones whose children started.
    pub(crate) async fn sync(&self) -> Result<SyncReport, WorkerError> {
        let shards = self.list_shards().await?;
        let leases: BTreeMap<String, Lease> = self
            .store_call("list_leases", self.store.list_leases())
            .await?
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect();
        let mut report = SyncReport {
            shards: shards.len(),
            ..SyncReport::default()
        };
        for lease in plan_new_leases(&shards, &leases, self.config.initial_position) {
            if self
                .store_call(
                    "create_lease_if_not_exists",
                    self.store.create_lease_if_not_exists(&lease),
                )
                .await?
            {
                info!(lease_key = %lease.lease_key, checkpoint = %lease.checkpoint, "created lease");
                report.leases_created += 1;
            }
        }
        if self.config.cleanup_leases_upon_shard_completion {
            report.leases_deleted = self.cleanup(&shards, &leases).await;
        }
        debug!(?report, "shard sync done");
        Ok(report)
    }

    async fn cleanup(&self, shards: &[Shard], leases: &BTreeMap<String, Lease>) -> usize {
        let in_stream: BTreeSet<&str> = shards.iter().map(|s| s.shard_id.as_str()).collect();
        let mut deleted = 0;
        for lease in leases.values().filter(|l| l.is_finished()) {
            let mut children: BTreeSet<&str> =
                lease.child_shard_ids.iter().map(String::as_str).collect();
            for s in shards {
                if s.parent_ids().any(|p| p == lease.lease_key) {
                    children.insert(&s.shard_id);
                }
            }
            if children.is_empty() {
                continue;
            }
            let all_started = children.iter().all(|c| match leases.get(*c) {
                Some(child) => has_started(&child.checkpoint),
                None => !in_stream.contains(c),
            });
            if !all_started {
                continue;
            }
            match self
                .store_call("delete_lease", self.store.delete_lease(lease))
                .await
            {
                Ok(()) => {
                    info!(lease_key = %lease.lease_key, "deleted finished lease");
                    deleted += 1;
                }
                Err(e) if e.is_condition_failed() => {}
                Err(e) => {
                    warn!(lease_key = %lease.lease_key, error = %kcl_lease::ErrorChain(&e), "deleting a finished lease failed")
                }
            }
        }
        deleted
    }

    /// Whether every parent is finished (see the module docs).
    pub(crate) async fn parents_finished(&self, parents: &[String]) -> Result<bool, WorkerError> {
        for parent in parents {
            match self
                .store_call("get_lease", self.store.get_lease(parent))
                .await?
            {
                Some(l) if l.is_finished() => continue,
                Some(_) => return Ok(false),
                None => {
                    let listed = self.list_shards().await?;
                    if listed.iter().any(|s| &s.shard_id == parent) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// The children of a shard according to ListShards.
    pub(crate) async fn children_of(&self, shard_id: &str) -> Result<Vec<ChildShard>, StreamError> {
        let shards = self.list_shards().await?;
        Ok(shards
            .iter()
            .filter(|s| s.parent_ids().any(|p| p == shard_id))
            .map(|s| ChildShard {
                shard_id: s.shard_id.clone(),
                parent_shard_ids: s.parent_ids().map(str::to_owned).collect(),
                hash_key_range: s.hash_key_range,
            })
            .collect())
    }

    /// Creates a child's lease at TRIM_HORIZON with all its parents (a child never starts
    /// at LATEST).
    pub(crate) async fn create_child_lease(&self, child: &ChildShard) -> Result<bool, LeaseError> {
        let lease = Lease::new(child.shard_id.clone(), ExtendedSequenceNumber::TRIM_HORIZON)
            .with_parents(child.parent_shard_ids.iter().cloned())
            .with_hash_key_range(child.hash_key_range);
        self.store_call(
            "create_lease_if_not_exists",
            self.store.create_lease_if_not_exists(&lease),
        )
        .await
    }
}

/// A lease has started once its checkpoint moved past the start sentinels.
pub(crate) fn has_started(checkpoint: &ExtendedSequenceNumber) -> bool {
    matches!(
        checkpoint.position(),
        Position::Sequence(_) | Position::ShardEnd
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl_kpl::{HashKeyRange, SequenceNumber};

    fn shard(id: &str, parents: &[&str], closed: bool, start: u64) -> Shard {
        Shard {
            shard_id: id.into(),
            parent_shard_id: parents.first().map(|p| p.to_string()),
            adjacent_parent_shard_id: parents.get(1).map(|p| p.to_string()),
            hash_key_range: HashKeyRange::FULL,
            starting_sequence_number: SequenceNumber::parse(&start.to_string()).unwrap(),
            ending_sequence_number: closed.then(|| SequenceNumber::parse("999999").unwrap()),
        }
    }

    fn plan(
        shards: &[Shard],
        leases: &[Lease],
        initial: InitialPosition,
    ) -> BTreeMap<String, Lease> {
        let leases = leases
            .iter()
            .map(|l| (l.lease_key.clone(), l.clone()))
            .collect();
        plan_new_leases(shards, &leases, initial)
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect()
    }

    fn stream() -> Vec<Shard> {
        // 0 split into 1 and 2; 1 and 2 merged into 3; 4 is an unrelated open shard.
        vec![
            shard("s0", &[], true, 1),
            shard("s1", &["s0"], true, 10),
            shard("s2", &["s0"], true, 11),
            shard("s3", &["s1", "s2"], false, 20),
            shard("s4", &[], false, 2),
        ]
    }

    #[test]
    fn trim_horizon_on_empty_table_covers_closed_ancestors() {
        let p = plan(&stream(), &[], InitialPosition::TrimHorizon);
        assert_eq!(p.len(), 5);
        assert_eq!(p["s0"].checkpoint, ExtendedSequenceNumber::TRIM_HORIZON);
        assert!(p["s0"].parent_shard_ids.is_empty());
        assert_eq!(p["s1"].parent_shard_ids, BTreeSet::from(["s0".to_string()]));
        assert_eq!(
            p["s3"].parent_shard_ids,
            BTreeSet::from(["s1".to_string(), "s2".to_string()])
        );
    }

    #[test]
    fn latest_on_empty_table_only_open_shards_without_parents() {
        let p = plan(&stream(), &[], InitialPosition::Latest);
        assert_eq!(p.keys().collect::<Vec<_>>(), vec!["s3", "s4"]);
        assert_eq!(p["s3"].checkpoint, ExtendedSequenceNumber::LATEST);
        assert!(p["s3"].parent_shard_ids.is_empty());
    }

    #[test]
    fn new_children_of_leased_parents_start_at_trim_horizon() {
        let existing = [
            Lease::new("s0", ExtendedSequenceNumber::LATEST),
            Lease::new("s4", ExtendedSequenceNumber::LATEST),
        ];
        let p = plan(&stream(), &existing, InitialPosition::Latest);
        assert_eq!(p.keys().collect::<Vec<_>>(), vec!["s1", "s2", "s3"]);
        assert!(
            p.values()
                .all(|l| l.checkpoint == ExtendedSequenceNumber::TRIM_HORIZON)
        );
    }

    #[test]
    fn cleaned_up_ancestors_are_not_recreated() {
        let existing = [
            Lease::new("s3", "77".parse().unwrap()).with_parents(["s1", "s2"]),
            Lease::new("s4", ExtendedSequenceNumber::TRIM_HORIZON),
        ];
        let p = plan(&stream(), &existing, InitialPosition::TrimHorizon);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn a_missing_parent_is_created_even_when_its_child_already_has_a_lease() {
        // s0's consumer created s3 early (TRIM_HORIZON, not started) but s2's lease was never
        // written (the store was throttled): s2 must still get one, or s3 waits forever.
        let existing = [
            Lease::new("s0", ExtendedSequenceNumber::SHARD_END),
            Lease::new("s1", ExtendedSequenceNumber::SHARD_END).with_parents(["s0"]),
            Lease::new("s3", ExtendedSequenceNumber::TRIM_HORIZON).with_parents(["s1", "s2"]),
            Lease::new("s4", ExtendedSequenceNumber::TRIM_HORIZON),
        ];
        let p = plan(&stream(), &existing, InitialPosition::TrimHorizon);
        assert_eq!(p.keys().collect::<Vec<_>>(), vec!["s2"]);
        assert_eq!(p["s2"].checkpoint, ExtendedSequenceNumber::TRIM_HORIZON);
        assert_eq!(p["s2"].parent_shard_ids, BTreeSet::from(["s0".to_string()]));
    }

    #[test]
    fn started_means_past_the_start_sentinels() {
        assert!(!has_started(&ExtendedSequenceNumber::TRIM_HORIZON));
        assert!(!has_started(&ExtendedSequenceNumber::LATEST));
        assert!(has_started(&ExtendedSequenceNumber::SHARD_END));
        assert!(has_started(&"5".parse().unwrap()));
    }
}
