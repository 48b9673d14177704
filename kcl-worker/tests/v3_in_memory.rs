//! Fleets of our workers running the KCL 3.x protocol on the in-memory services (tokio's
//! paused clock): the leader assigns, followers discover, the leader fails over, and an
//! application in `CLIENT_VERSION_UPGRADE_FROM_2X` moves itself to 3.x.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeSet;
use std::time::Duration;

use kcl_lease::v3::migration::ClientVersion;
use kcl_worker::test_util::fleet::Fleet;
use kcl_worker::test_util::recording::Behaviour;
use kcl_worker::{ClientVersionConfig, WorkerHandle};
use tokio::time::Instant;

const FAILOVER: Duration = Duration::from_secs(10);

fn fleet(shards: u32, version: ClientVersionConfig) -> Fleet {
    Fleet::new("orders", shards)
        .unwrap()
        .with_state_tables()
        .with_defaults(move |b| {
            b.failover_time(FAILOVER)
                .idle_time_between_reads(Duration::from_millis(200))
                .shard_sync_interval(Duration::from_secs(5))
                .parent_shard_poll_interval(Duration::from_millis(500))
                .client_version_config(version)
                .disable_worker_metrics(true)
        })
}

fn put(env: &Fleet, prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let p = format!("{prefix}-{i:04}");
            env.put_plain(&format!("key-{i}"), &p).unwrap();
            p
        })
        .collect()
}

fn leaders(workers: &[&WorkerHandle]) -> Vec<String> {
    workers
        .iter()
        .filter(|w| w.is_leader())
        .map(|w| w.worker_id().to_owned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_3x_fleet_of_ours_is_led_assigned_balanced_and_fails_over() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let env = fleet(8, ClientVersionConfig::V3x);
    let mut expected = put(&env, "a", 200);
    let started = Instant::now();
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    let (w3, _) = env.start("w3", Behaviour::new()).await.unwrap();
    for w in [&w1, &w2, &w3] {
        assert_eq!(w.client_version(), Some(ClientVersion::V3x));
    }
    env.wait_until("first record", FAILOVER * 2, |e| {
        !e.delivered_payloads().is_empty()
    })
    .await
    .unwrap();
    let first_record = started.elapsed();
    assert!(first_record <= FAILOVER * 2, "{first_record:?}");
    env.wait_until("every record", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(leaders(&[&w1, &w2, &w3]).len(), 1);
    // The coordinator state holds the Java lock item and the version.
    let state = env.store().coordinator_state_table().unwrap();
    let lock = state.peek("Leader").unwrap();
    let leader = leaders(&[&w1, &w2, &w3]).remove(0);
    assert_eq!(
        lock.get("ownerName").and_then(|v| v.as_s()),
        Some(leader.as_str())
    );
    let migration = state.peek("Migration3.0").unwrap();
    assert_eq!(
        migration.get("cv").and_then(|v| v.as_s()),
        Some("CLIENT_VERSION_3X")
    );
    // One row per worker.
    let rows = env.store().worker_metrics_table().unwrap();
    for id in ["w1", "w2", "w3"] {
        assert!(rows.peek(id).is_some(), "no row for {id}");
    }
    // Balanced by the leader (3/3/2) within a few assignment runs.
    env.wait_until("balance", Duration::from_secs(120), |_| {
        let counts: Vec<usize> = [&w1, &w2, &w3]
            .iter()
            .map(|w| w.held_leases().len())
            .collect();
        counts.iter().sum::<usize>() == 8 && counts.iter().all(|c| (2..=3).contains(c))
    })
    .await
    .unwrap();

    // Crash the leader: another one leads within 2 x failover, and its leases move.
    let (crashed, survivors): (WorkerHandle, Vec<WorkerHandle>) = {
        let mut all = vec![w1, w2, w3];
        let i = all.iter().position(|w| w.worker_id() == leader).unwrap();
        let c = all.remove(i);
        (c, all)
    };
    let crashed_at = Instant::now();
    env.crash(crashed).await;
    env.wait_until("a new leader", FAILOVER * 2, |_| {
        survivors.iter().any(|w| w.is_leader())
    })
    .await
    .unwrap();
    let failover = crashed_at.elapsed();
    assert!(failover <= FAILOVER * 2, "{failover:?}");
    expected.extend(put(&env, "b", 100));
    env.wait_until(
        "every record after the crash",
        Duration::from_secs(120),
        |e| {
            e.delivered_payloads().len() == expected.len()
                && survivors
                    .iter()
                    .map(|w| w.held_leases().len())
                    .sum::<usize>()
                    == 8
        },
    )
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);

    // Graceful stop of the new leader: it releases the lock and its leases, the last one
    // leads and holds everything.
    let mut survivors = survivors;
    let i = survivors.iter().position(|w| w.is_leader()).unwrap();
    let stopping = survivors.remove(i);
    let last = survivors.remove(0);
    let report = env.stop(stopping).await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    let waited = env
        .wait_until("the last worker leads and holds all", FAILOVER * 3, |_| {
            last.is_leader() && last.held_leases().len() == 8
        })
        .await;
    if waited.is_err() {
        let owners: Vec<_> = kcl_lease::LeaseStore::list_leases(&**env.store())
            .await
            .unwrap()
            .into_iter()
            .map(|l| {
                (
                    l.lease_key,
                    l.lease_owner,
                    l.checkpoint_owner,
                    l.lease_counter,
                )
            })
            .collect();
        let stats = last.protocol().unwrap().stats();
        panic!(
            "leader {} held {} owners {owners:?} stats {stats:?} lock {:?} rows {:?}",
            last.is_leader(),
            last.held_leases().len(),
            env.store()
                .coordinator_state_table()
                .unwrap()
                .peek("Leader"),
            env.store().worker_metrics_table().unwrap().calls()
        );
    }
    expected.extend(put(&env, "c", 50));
    env.wait_until("every record at the end", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);
    println!("start to first record {first_record:?}, leader failover {failover:?}");
}

#[tokio::test(start_paused = true)]
async fn a_2x_compatible_fleet_of_ours_moves_itself_to_3x_after_ten_ready_minutes() {
    let env = fleet(4, ClientVersionConfig::CompatibleWith2x);
    let mut expected = put(&env, "m", 100);
    let (w1, _) = env.start("w1", Behaviour::new()).await.unwrap();
    let (w2, _) = env.start("w2", Behaviour::new()).await.unwrap();
    for w in [&w1, &w2] {
        assert_eq!(w.client_version(), Some(ClientVersion::UpgradeFrom2x));
        assert!(!w.is_leader());
    }
    env.wait_until("every record in 2.x", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    // Every owner writes a fresh row and the index is active: after ten minutes of that
    // the 2.x leader (the Java KCL's deterministic shuffle) writes 3X_WITH_ROLLBACK, and
    // both follow within a change-monitor period.
    let started = Instant::now();
    env.wait_until("both in 3.x", Duration::from_secs(15 * 60), |_| {
        [&w1, &w2]
            .iter()
            .all(|w| w.client_version() == Some(ClientVersion::V3xWithRollback))
    })
    .await
    .unwrap();
    let flipped_after = started.elapsed();
    assert!(
        flipped_after >= Duration::from_secs(9 * 60),
        "{flipped_after:?}"
    );
    let state = env.store().coordinator_state_table().unwrap();
    let migration = state.peek("Migration3.0").unwrap();
    assert_eq!(
        migration.get("cv").and_then(|v| v.as_s()),
        Some("CLIENT_VERSION_3X_WITH_ROLLBACK")
    );
    // The history keeps the previous version.
    assert!(matches!(migration.get("h"), Some(kcl_lease::v3::item::Value::L(h)) if h.len() == 1));
    env.wait_until("one leader", Duration::from_secs(30), |_| {
        leaders(&[&w1, &w2]).len() == 1
    })
    .await
    .unwrap();
    // Records keep flowing, nothing twice: the leases stayed held across the switch.
    expected.extend(put(&env, "n", 100));
    env.wait_until("every record in 3.x", Duration::from_secs(60), |e| {
        e.delivered_payloads().len() == expected.len()
    })
    .await
    .unwrap();
    assert_eq!(env.delivered_payloads(), expected);
    assert_eq!(
        env.log().delivered_count(),
        expected.len(),
        "a record was delivered twice"
    );
    println!("moved to 3.x {flipped_after:?} after the fleet was up");
}
