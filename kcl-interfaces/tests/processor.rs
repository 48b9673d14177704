//! A processor written against `kcl-interfaces` alone, driven by a recording backend.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use kcl_interfaces::*;

/// Runs a future that never waits on I/O (the backend answers at once).
fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

#[derive(Debug, Default)]
struct Recording {
    calls: Mutex<Vec<String>>,
    fail_with_shutdown: Mutex<bool>,
}

impl CheckpointBackend for Recording {
    fn checkpoint(&self, target: CheckpointTarget) -> BoxFuture<'_, Result<(), CheckpointError>> {
        Box::pin(async move {
            if *self.fail_with_shutdown.lock().unwrap() {
                return Err(CheckpointError::Shutdown {
                    reason: "lease lost".into(),
                    source: None,
                });
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("checkpoint {target:?}"));
            Ok(())
        })
    }
    fn prepare_checkpoint(
        &self,
        target: CheckpointTarget,
    ) -> BoxFuture<'_, Result<ExtendedSequenceNumber, CheckpointError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .unwrap()
                .push(format!("prepare {target:?}"));
            Ok(match target {
                CheckpointTarget::At(p) => p,
                _ => "42".parse().unwrap(),
            })
        })
    }
}

#[derive(Default)]
struct Counting {
    shard: String,
    seen: Vec<String>,
    shutdown: Option<ShutdownReason>,
    shutdown_result: Option<CheckpointErrorKind>,
}

impl RecordProcessor for Counting {
    async fn initialize(&mut self, input: InitializationInput) {
        self.shard = input.shard_id;
    }
    async fn process_records(&mut self, input: ProcessRecordsInput) {
        for r in &input.records {
            self.seen
                .push(String::from_utf8_lossy(&r.data).into_owned());
        }
        if let Some(last) = input.records.last() {
            input.checkpointer.checkpoint_record(last).await.unwrap();
        }
    }
    async fn shutdown(&mut self, input: ShutdownInput) {
        self.shutdown = Some(input.shutdown_reason);
        self.shutdown_result = input
            .checkpointer
            .checkpoint()
            .await
            .err()
            .map(|e| e.kind());
    }
}

fn record(seq: &str, data: &str) -> Record {
    Record::new("pk", seq.parse().unwrap(), Bytes::from(data.to_owned()))
}

#[test]
fn processor_lifecycle_checkpoints_through_the_backend() {
    let backend = Arc::new(Recording::default());
    let checkpointer = Checkpointer::new(backend.clone());
    let factory = Counting::default;
    let mut p = factory.create_processor();
    block_on(async {
        p.initialize(InitializationInput::new(
            "shardId-1",
            ExtendedSequenceNumber::TRIM_HORIZON,
        ))
        .await;
        p.process_records(ProcessRecordsInput::new(
            vec![record("1", "a"), record("2", "b")],
            checkpointer.clone(),
        ))
        .await;
        p.shutdown(ShutdownInput::new(
            ShutdownReason::Terminate,
            checkpointer.clone(),
        ))
        .await;
    });
    assert_eq!(p.shard, "shardId-1");
    assert_eq!(p.seen, vec!["a", "b"]);
    assert_eq!(p.shutdown, Some(ShutdownReason::Terminate));
    assert_eq!(p.shutdown_result, None);
    let calls = backend.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert!(
        calls[0].contains("At") && calls[0].contains("SequenceNumber(2)"),
        "{calls:?}"
    );
    assert_eq!(calls[1], "checkpoint LargestDelivered");
}

#[test]
fn zombie_checkpoint_reports_shutdown() {
    let backend = Arc::new(Recording::default());
    *backend.fail_with_shutdown.lock().unwrap() = true;
    let mut p = Counting::default();
    block_on(p.shutdown(ShutdownInput::new(
        ShutdownReason::Zombie,
        Checkpointer::new(backend.clone()),
    )));
    assert_eq!(p.shutdown_result, Some(CheckpointErrorKind::Shutdown));
    assert!(backend.calls.lock().unwrap().is_empty());
}

#[test]
fn malformed_sequence_is_illegal_argument_and_never_reaches_the_store() {
    let backend = Arc::new(Recording::default());
    let c = Checkpointer::new(backend.clone());
    for bad in ["", "12a", "-5", "1.x"] {
        let err = block_on(c.checkpoint_sequence(bad)).unwrap_err();
        assert_eq!(err.kind(), CheckpointErrorKind::IllegalArgument, "{bad:?}");
        assert!(!err.is_retryable());
        let err = block_on(c.prepare_checkpoint_sequence(bad)).unwrap_err();
        assert_eq!(err.kind(), CheckpointErrorKind::IllegalArgument);
    }
    assert!(backend.calls.lock().unwrap().is_empty());
}

#[test]
fn prepared_checkpoint_commits_the_pending_position() {
    let backend = Arc::new(Recording::default());
    let c = Checkpointer::new(backend.clone());
    let prepared = block_on(c.prepare_checkpoint_sequence("77.3")).unwrap();
    assert_eq!(prepared.pending_checkpoint().to_string(), "77.3");
    block_on(prepared.checkpoint()).unwrap();
    let calls = backend.calls.lock().unwrap().clone();
    assert!(calls[0].starts_with("prepare At"));
    assert!(calls[1].starts_with("checkpoint At"));
    assert!(calls[1].contains("sub_sequence_number: 3"), "{calls:?}");
}

#[test]
fn shutdown_reasons_have_messages() {
    for r in [
        ShutdownReason::Requested,
        ShutdownReason::Terminate,
        ShutdownReason::Zombie,
    ] {
        assert!(!r.message().is_empty());
        assert_eq!(r.to_string(), r.message());
    }
    assert_ne!(
        ShutdownReason::Zombie.message(),
        ShutdownReason::Terminate.message()
    );
}

#[test]
fn error_kinds_and_retryability() {
    let throttled = CheckpointError::Throttling {
        source: "slow down".into(),
    };
    assert!(throttled.is_retryable());
    assert_eq!(throttled.kind(), CheckpointErrorKind::Throttling);
    let dep = CheckpointError::Dependency {
        source: "unreachable".into(),
    };
    assert!(dep.is_retryable());
    let inv = CheckpointError::InvalidState {
        message: "table missing".into(),
        source: None,
    };
    assert!(!inv.is_retryable());
    assert_eq!(inv.kind(), CheckpointErrorKind::InvalidState);
    // Display does not repeat the cause.
    assert_eq!(
        throttled.to_string(),
        "checkpoint throttled by the lease store"
    );
}

fn assert_send<T: Send>(_: T) {}

#[test]
fn processor_futures_are_send() {
    let mut p = Counting::default();
    let c = Checkpointer::new(Arc::new(Recording::default()));
    assert_send(p.process_records(ProcessRecordsInput::new(vec![], c.clone())));
    assert_send(c.checkpoint());
}

#[test]
fn depends_on_no_aws_crate_and_no_tokio() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "tree",
            "-p",
            "kcl-interfaces",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.contains("kcl-kpl"), "{tree}");
    for line in tree.lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        assert!(
            !name.starts_with("aws-"),
            "kcl-interfaces depends on {line}"
        );
        assert!(
            !name.starts_with("tokio"),
            "kcl-interfaces depends on {line}"
        );
    }
}
