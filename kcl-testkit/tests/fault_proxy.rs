//! The fault proxy on real loopback sockets, in front of a tiny echo server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::future::Future;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use kcl_testkit::fault_proxy::{FaultMode, FaultProxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Bound on every wait that is expected to succeed.
const WAIT: Duration = Duration::from_secs(5);
/// How long a hung connection is watched for an answer that must not come.
const SILENCE: Duration = Duration::from_millis(300);

async fn bounded<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// An echo server on 127.0.0.1; aborted when the handle is dropped at the end of the test.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_server() -> Echo {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            connections.spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Echo { addr, task }
}

/// Sets the mode, bounded like every other wait.
async fn set(proxy: &FaultProxy, mode: FaultMode) {
    bounded("set_mode", proxy.set_mode(mode)).await;
    assert_eq!(proxy.mode(), mode);
}

async fn start(echo: &Echo) -> FaultProxy {
    bounded("proxy start", FaultProxy::start(echo.addr))
        .await
        .unwrap()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    bounded("connect", TcpStream::connect(addr)).await.unwrap()
}

/// Writes `message` and expects it back.
async fn round_trip(conn: &mut TcpStream, message: &[u8]) {
    bounded("write", conn.write_all(message)).await.unwrap();
    let mut answer = vec![0u8; message.len()];
    bounded("echo", conn.read_exact(&mut answer)).await.unwrap();
    assert_eq!(answer, message);
}

/// Writes `message` and expects no answer at all within `SILENCE`.
async fn assert_silent(conn: &mut TcpStream, message: &[u8]) {
    bounded("write", conn.write_all(message)).await.unwrap();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(SILENCE, conn.read(&mut buf)).await {
        Err(_) => {}
        Ok(read) => panic!("a black-holed connection answered: {read:?}"),
    }
}

/// Expects the proxy to have reset `conn`.
async fn assert_reset(conn: &mut TcpStream) {
    let mut buf = [0u8; 64];
    let read = bounded("read after reset", conn.read(&mut buf)).await;
    match read {
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
}

#[tokio::test]
async fn pass_forwards_both_ways() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    assert_eq!(proxy.mode(), FaultMode::Pass);
    assert_eq!(proxy.addr().ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(proxy.upstream(), echo.addr);
    assert_eq!(
        proxy.endpoint_url(),
        format!("http://127.0.0.1:{}", proxy.addr().port())
    );
    let mut conn = connect(proxy.addr()).await;
    round_trip(&mut conn, b"hello").await;
    // A chunk larger than the proxy's buffer arrives whole.
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    round_trip(&mut conn, &big).await;
    // A client half-close reaches the server, whose close comes back as EOF.
    bounded("half-close", conn.shutdown()).await.unwrap();
    let mut rest = Vec::new();
    bounded("EOF", conn.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn delay_holds_every_chunk_each_way() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut conn = connect(proxy.addr()).await;
    round_trip(&mut conn, b"warm").await;

    let delay = Duration::from_millis(150);
    set(&proxy, FaultMode::Delay(delay)).await;
    let started = Instant::now();
    round_trip(&mut conn, b"slow").await;
    let elapsed = started.elapsed();
    assert!(elapsed >= delay * 2, "round trip took {elapsed:?}");

    // Back to Pass, the same connection forwards without the delay being asked for.
    set(&proxy, FaultMode::Pass).await;
    round_trip(&mut conn, b"fast").await;
}

#[tokio::test]
async fn hang_black_holes_open_connections_for_good() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut conn = connect(proxy.addr()).await;
    round_trip(&mut conn, b"before").await;

    set(&proxy, FaultMode::Hang).await;
    assert_silent(&mut conn, b"during").await;

    set(&proxy, FaultMode::Pass).await;
    assert_silent(&mut conn, b"after").await;

    let mut fresh = connect(proxy.addr()).await;
    round_trip(&mut fresh, b"fresh").await;

    let stats = proxy.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.black_holed, 1);
    assert_eq!(stats.reset, 0);
}

#[tokio::test]
async fn hang_black_holes_connections_accepted_while_hung() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    set(&proxy, FaultMode::Hang).await;
    let mut conn = connect(proxy.addr()).await;
    assert_silent(&mut conn, b"during").await;
    assert_eq!(proxy.stats().black_holed, 1);

    set(&proxy, FaultMode::Pass).await;
    assert_silent(&mut conn, b"after").await;
    let mut fresh = connect(proxy.addr()).await;
    round_trip(&mut fresh, b"fresh").await;
}

#[tokio::test]
async fn hang_then_delay_drops_the_chunk_being_held() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut conn = connect(proxy.addr()).await;
    set(&proxy, FaultMode::Delay(Duration::from_millis(200))).await;
    bounded("write", conn.write_all(b"held")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The chunk is still being held when the link dies: it must never arrive.
    set(&proxy, FaultMode::Hang).await;
    set(&proxy, FaultMode::Pass).await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(SILENCE * 2, conn.read(&mut buf)).await;
    assert!(read.is_err(), "a black-holed connection answered: {read:?}");
}

#[tokio::test]
async fn reset_resets_open_and_new_connections() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut open = connect(proxy.addr()).await;
    round_trip(&mut open, b"before").await;

    set(&proxy, FaultMode::Reset).await;
    assert_reset(&mut open).await;

    let mut new = connect(proxy.addr()).await;
    assert_reset(&mut new).await;

    set(&proxy, FaultMode::Pass).await;
    let mut fresh = connect(proxy.addr()).await;
    round_trip(&mut fresh, b"fresh").await;

    let stats = proxy.stats();
    assert_eq!(stats.accepted, 3);
    assert_eq!(stats.reset, 2);
}

#[tokio::test]
async fn reset_also_ends_black_holed_connections() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut conn = connect(proxy.addr()).await;
    set(&proxy, FaultMode::Hang).await;
    assert_silent(&mut conn, b"hung").await;
    set(&proxy, FaultMode::Reset).await;
    assert_reset(&mut conn).await;
    let stats = proxy.stats();
    assert_eq!((stats.black_holed, stats.reset), (1, 1));
}

#[tokio::test]
async fn refuse_closes_the_port_and_reopens_the_same_one() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let addr = proxy.addr();
    let mut open = connect(addr).await;
    round_trip(&mut open, b"before").await;

    set(&proxy, FaultMode::Refuse).await;
    let refused = bounded("refused connect", TcpStream::connect(addr)).await;
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    assert_reset(&mut open).await;

    set(&proxy, FaultMode::Pass).await;
    assert_eq!(proxy.addr(), addr);
    let mut fresh = connect(addr).await;
    round_trip(&mut fresh, b"fresh").await;

    // And once more, to show the port survives repeated refusals.
    set(&proxy, FaultMode::Refuse).await;
    let refused = bounded("refused connect", TcpStream::connect(addr)).await;
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    set(&proxy, FaultMode::Pass).await;
    let mut again = connect(addr).await;
    round_trip(&mut again, b"again").await;
}

#[tokio::test]
async fn stats_count_connections_and_bytes() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let mut first = connect(proxy.addr()).await;
    let mut second = connect(proxy.addr()).await;
    round_trip(&mut first, b"12345").await;
    round_trip(&mut second, b"1234567890").await;
    let stats = proxy.stats();
    assert_eq!(stats.accepted, 2);
    assert_eq!(stats.bytes_to_upstream, 15);
    // The echo has been read by the client, so it has been counted.
    assert_eq!(stats.bytes_to_client, 15);
    assert_eq!(stats.black_holed, 0);
    assert_eq!(stats.reset, 0);
    assert_eq!(stats.upstream_connect_failures, 0);
}

#[tokio::test]
async fn dead_upstream_closes_the_client_connection() {
    // A port nobody listens on.
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = bounded("proxy start", FaultProxy::start(port))
        .await
        .unwrap();
    let mut conn = connect(proxy.addr()).await;
    let mut buf = [0u8; 16];
    let read = bounded("close", conn.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(proxy.stats().upstream_connect_failures, 1);
}

#[tokio::test]
async fn drop_stops_the_listener_and_the_connections() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let addr = proxy.addr();
    let mut open = connect(addr).await;
    round_trip(&mut open, b"before").await;
    drop(proxy);

    // The aborted tasks are dropped the next time the runtime gets to them.
    bounded("listener closed", async {
        loop {
            match TcpStream::connect(addr).await {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                _ => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    })
    .await;
    let mut buf = [0u8; 16];
    let read = bounded("connection closed", open.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn shutdown_stops_everything_including_black_holes() {
    let echo = echo_server().await;
    let proxy = start(&echo).await;
    let addr = proxy.addr();
    let mut hung = connect(addr).await;
    set(&proxy, FaultMode::Hang).await;
    assert_silent(&mut hung, b"hung").await;
    bounded("shutdown", proxy.shutdown()).await;

    let refused = bounded("refused connect", TcpStream::connect(addr)).await;
    assert_eq!(refused.unwrap_err().kind(), ErrorKind::ConnectionRefused);
    let mut buf = [0u8; 16];
    let read = bounded("connection closed", hung.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn non_loopback_upstream_is_refused() {
    for upstream in ["10.0.0.1:4567", "0.0.0.0:4567", "[2001:db8::1]:4567"] {
        let upstream: SocketAddr = upstream.parse().unwrap();
        let error = bounded("start", FaultProxy::start(upstream))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidInput, "{upstream}");
    }
    // IPv6 loopback is fine.
    let proxy = bounded("start", FaultProxy::start("[::1]:4567".parse().unwrap())).await;
    assert!(proxy.is_ok());
}
