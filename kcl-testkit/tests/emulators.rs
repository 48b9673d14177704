//! The emulator fixtures: each emulator starts on loopback, answers real SDK calls, and is gone
//! (process and port) once dropped, even when the test process dies without dropping it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use kcl_testkit::emulators::{
    Emulator, EmulatorError, EmulatorKind, create_lease_table_and_wait, create_stream_and_wait,
    dynamodb_client, kinesis_client,
};

/// Set in the environment of the child process of `emulator_dies_with_the_test_process`.
const ORPHAN_CHILD_ENV: &str = "KCL_TESTKIT_ORPHAN_CHILD";

fn start(kind: EmulatorKind) -> Emulator {
    let emulator = Emulator::start(kind).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{kind} answered at {} after {:?} (pid {})",
        emulator.endpoint(),
        emulator.started_in(),
        emulator.pid()
    );
    assert_eq!(emulator.kind(), kind);
    assert_eq!(
        emulator.endpoint(),
        format!("http://127.0.0.1:{}", emulator.port())
    );
    assert!(emulator.log_path().is_file());
    emulator
}

/// A process is dead when /proc has no entry for it or only a zombie.
fn process_is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

fn port_refuses(port: u16) -> bool {
    match TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
        Ok(_) => false,
    }
}

/// Drops the emulator and checks that its process and port are gone at once.
fn stop_and_check(emulator: Emulator) {
    let (pid, port, log) = (
        emulator.pid(),
        emulator.port(),
        emulator.log_path().to_owned(),
    );
    drop(emulator);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} still exists after drop"
    );
    assert!(port_refuses(port), "port {port} still accepts after drop");
    if std::env::var_os(kcl_testkit::emulators::KEEP_LOGS_ENV).is_none() {
        assert!(!log.exists(), "log {} left behind", log.display());
    }
}

fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

async fn create_lease_like_table(client: &aws_sdk_dynamodb::Client, table: &str) {
    create_lease_table_and_wait(client, table, Duration::from_secs(10))
        .await
        .unwrap();
}

/// CreateTable, ListTables, then a conditional write that must fail with the typed error.
async fn check_dynamodb(emulator: &Emulator) {
    let client = dynamodb_client(emulator.endpoint());
    let table = unique_name("kcl-testkit-leases");
    let before = client.list_tables().send().await.unwrap();
    assert!(before.table_names().is_empty(), "{before:?}");

    create_lease_like_table(&client, &table).await;
    let listed = client.list_tables().send().await.unwrap();
    assert_eq!(listed.table_names(), std::slice::from_ref(&table));

    let put = || {
        client
            .put_item()
            .table_name(&table)
            .item("leaseKey", AttributeValue::S("shardId-000000000000".into()))
            .condition_expression("attribute_not_exists(leaseKey)")
    };
    put().send().await.unwrap();
    let second = put().send().await.unwrap_err();
    assert!(
        second
            .as_service_error()
            .is_some_and(|e| e.is_conditional_check_failed_exception()),
        "{second:?}"
    );
}

#[tokio::test]
async fn kinesis_local_serves_kinesis_and_stops_on_drop() {
    let emulator = start(EmulatorKind::KinesisLocal);
    let client = kinesis_client(emulator.endpoint());
    let stream = unique_name("kcl-testkit-stream");

    let before = client.list_streams().send().await.unwrap();
    assert!(before.stream_names().is_empty(), "{before:?}");

    let summary = create_stream_and_wait(&client, &stream, 2, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(summary.stream_name, stream);
    assert_eq!(summary.open_shard_count, 2);
    assert!(summary.stream_arn.ends_with(&format!(":stream/{stream}")));

    let listed = client.list_streams().send().await.unwrap();
    assert_eq!(listed.stream_names(), std::slice::from_ref(&stream));

    stop_and_check(emulator);
}

#[tokio::test]
async fn dynalite_serves_dynamodb_and_stops_on_drop() {
    let emulator = start(EmulatorKind::Dynalite);
    check_dynamodb(&emulator).await;
    stop_and_check(emulator);
}

#[tokio::test]
async fn moto_serves_dynamodb_and_kinesis_and_stops_on_drop() {
    let emulator = start(EmulatorKind::Moto);
    check_dynamodb(&emulator).await;

    let kinesis = kinesis_client(emulator.endpoint());
    let stream = unique_name("kcl-testkit-moto-stream");
    create_stream_and_wait(&kinesis, &stream, 1, Duration::from_secs(10))
        .await
        .unwrap();
    let listed = kinesis.list_streams().send().await.unwrap();
    assert_eq!(listed.stream_names(), [stream]);

    stop_and_check(emulator);
}

#[tokio::test]
async fn two_emulators_of_one_kind_are_independent() {
    let first = start(EmulatorKind::Dynalite);
    let second = start(EmulatorKind::Dynalite);
    assert_ne!(first.port(), second.port());
    assert_ne!(first.pid(), second.pid());

    let table = unique_name("kcl-testkit-only-in-first");
    create_lease_like_table(&dynamodb_client(first.endpoint()), &table).await;
    let in_second = dynamodb_client(second.endpoint())
        .list_tables()
        .send()
        .await
        .unwrap();
    assert!(in_second.table_names().is_empty(), "{in_second:?}");

    stop_and_check(first);
    // The second one is unaffected by the first one's stop.
    let still = dynamodb_client(second.endpoint())
        .list_tables()
        .send()
        .await
        .unwrap();
    assert!(still.table_names().is_empty());
    stop_and_check(second);
}

fn empty_temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn start_in_an_empty_dir_says_what_to_install() {
    let dir = empty_temp_dir("kcl-testkit-no-emulators");
    for kind in EmulatorKind::ALL {
        let err = Emulator::start_in(kind, &dir).unwrap_err();
        let EmulatorError::NotInstalled {
            kind: reported,
            missing,
            hint,
        } = &err
        else {
            panic!("expected NotInstalled, got {err:?}");
        };
        assert_eq!(*reported, kind);
        assert!(missing.starts_with(&dir), "{}", missing.display());
        assert!(hint.contains("scripts/install-emulators"), "{hint}");
        assert!(!err.is_retryable());
        let message = err.to_string();
        assert!(
            message.contains(&format!("KCL_EMULATORS_DIR={} ", dir.display()))
                && message.contains("scripts/install-emulators")
                && message.contains(kind.name()),
            "{message}"
        );
    }
    std::fs::remove_dir(&dir).unwrap();
}

#[test]
fn a_half_installed_emulator_is_not_installed() {
    // kinesis-local without the patched loopback entry point must not be started (the
    // original listens on every interface).
    let dir = empty_temp_dir("kcl-testkit-half-installed");
    let package = dir.join("node/node_modules/kinesis-local");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::write(package.join("main.js"), "// the original\n").unwrap();
    std::fs::write(package.join("server.json"), "{}\n").unwrap();
    let err = Emulator::start_in(EmulatorKind::KinesisLocal, &dir).unwrap_err();
    match &err {
        EmulatorError::NotInstalled { missing, .. } => {
            assert_eq!(missing, &package.join("main-loopback.js"));
        }
        other => panic!("expected NotInstalled, got {other:?}"),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// An installation directory whose `moto_server` is the given shell script. The file is
/// written by a child shell, so no descriptor open for writing can leak into a process that
/// another test forks meanwhile (which would make exec fail with "text file busy").
fn fake_moto(name: &str, script: &str) -> PathBuf {
    let dir = empty_temp_dir(name);
    let bin = dir.join("venv/bin");
    std::fs::create_dir_all(&bin).unwrap();
    let status = Command::new("/bin/sh")
        .arg("-c")
        .arg(r#"printf '#!/bin/sh\n%s\n' "$2" > "$1" && chmod 755 "$1""#)
        .arg("write-fake")
        .arg(bin.join("moto_server"))
        .arg(script)
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

#[test]
fn an_emulator_that_exits_at_once_is_reported_with_its_log() {
    let dir = fake_moto(
        "kcl-testkit-exits",
        "echo 'fake moto: cannot start' >&2; exit 3",
    );
    let err = Emulator::start_in(EmulatorKind::Moto, &dir).unwrap_err();
    match &err {
        EmulatorError::Exited {
            kind,
            status,
            log_tail,
        } => {
            assert_eq!(*kind, EmulatorKind::Moto);
            assert!(status.contains('3'), "{status}");
            assert_eq!(log_tail, "fake moto: cannot start");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert!(err.to_string().contains("fake moto: cannot start"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_port_collision_is_retried_on_other_ports() {
    let dir = fake_moto(
        "kcl-testkit-collides",
        r#"echo "$4" >> "$(dirname "$0")/ports"; echo 'OSError: [Errno 98] Address already in use' >&2; exit 1"#,
    );
    let err = Emulator::start_in(EmulatorKind::Moto, &dir).unwrap_err();
    assert!(
        matches!(&err, EmulatorError::Exited { log_tail, .. } if log_tail.contains("Address already in use")),
        "{err:?}"
    );
    let ports = std::fs::read_to_string(dir.join("venv/bin/ports")).unwrap();
    let ports: Vec<u16> = ports.lines().map(|p| p.parse().unwrap()).collect();
    assert_eq!(ports.len(), 3, "three attempts expected: {ports:?}");
    assert!(ports.iter().all(|&p| p > 0));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Run only as the child process of `emulator_dies_with_the_test_process`: starts an emulator,
/// reports it, and exits without dropping it.
#[test]
#[ignore = "helper: run by emulator_dies_with_the_test_process in a child process"]
fn orphan_child() {
    if std::env::var_os(ORPHAN_CHILD_ENV).is_none() {
        return;
    }
    let emulator = start(EmulatorKind::Dynalite);
    println!(
        "ORPHAN pid={} port={} log={}",
        emulator.pid(),
        emulator.port(),
        emulator.log_path().display()
    );
    std::process::exit(0);
}

#[test]
fn emulator_dies_with_the_test_process() {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "orphan_child", "--ignored", "--nocapture"])
        .env(ORPHAN_CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ORPHAN "))
        .unwrap_or_else(|| panic!("no ORPHAN line in {stdout}"));
    let field = |name: &str| -> u32 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .unwrap()
            .parse()
            .unwrap()
    };
    let (pid, port) = (field("pid="), u16::try_from(field("port=")).unwrap());
    let log = line.split_once("log=").unwrap().1;

    // The child exited without dropping the emulator; its watchdog must end it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(process_is_dead(pid) && port_refuses(port)) {
        assert!(
            Instant::now() < deadline,
            "emulator pid {pid} (port {port}) outlived its test process"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(log).unwrap();
}
