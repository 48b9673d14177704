//! A loopback TCP proxy that injects network faults between a client and a local service.
//!
//! Put a [`FaultProxy`] between an SDK client and an emulator (kinesis-local, dynalite, ...)
//! and point the client at [`FaultProxy::endpoint_url`]. While the mode is
//! [`FaultMode::Pass`] the proxy is transparent; the other modes simulate what a dead NAT, a
//! slow link or a crashed load balancer does to the connections going through it.
//!
//! The proxy only ever listens on `127.0.0.1` and only forwards to a loopback upstream.
//! It needs a tokio runtime with a real clock (not a paused one): the delays and the
//! upstream connect timeout are real time.
//!
//! ```
//! use std::time::Duration;
//! use kcl_testkit::fault_proxy::{FaultMode, FaultProxy};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! // A tiny echo server stands in for the emulator.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! let upstream = server.local_addr().unwrap();
//! tokio::spawn(async move {
//!     while let Ok((mut conn, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = conn.split();
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!         });
//!     }
//! });
//!
//! let proxy = FaultProxy::start(upstream).await.unwrap();
//! let mut conn = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
//! conn.write_all(b"ping").await.unwrap();
//! let mut answer = [0u8; 4];
//! conn.read_exact(&mut answer).await.unwrap();
//! assert_eq!(&answer, b"ping");
//!
//! // From now on this connection is black-holed for good, like behind a dead NAT.
//! proxy.set_mode(FaultMode::Hang).await;
//! conn.write_all(b"ping").await.unwrap();
//! let read = tokio::time::timeout(Duration::from_millis(100), conn.read(&mut answer)).await;
//! assert!(read.is_err(), "no answer while hung");
//! proxy.shutdown().await;
//! # });
//! ```

use std::fmt;
use std::future::pending;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long the proxy waits for the upstream to accept a connection. A connect that takes
/// longer counts as failed and the client connection is closed.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How often, and how far apart, the proxy tries to listen on its port again after
/// [`FaultMode::Refuse`] ends, before it reports the mode change as applied.
const REBIND_ATTEMPTS: u32 = 100;
const REBIND_PAUSE: Duration = Duration::from_millis(20);
/// Pause after a failed `accept`, so a persistent error (out of file descriptors) does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Backlog of the listening socket.
const LISTEN_BACKLOG: u32 = 1024;
/// Size of the buffer each forwarding direction reads into.
const CHUNK_SIZE: usize = 16 * 1024;

/// What the proxy does to the connections going through it. Set with [`FaultProxy::set_mode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultMode {
    /// Forward bytes both ways, untouched. The initial mode.
    Pass,
    /// Forward bytes both ways, but hold every chunk read from either side for this long
    /// before writing it on.
    Delay(Duration),
    /// Behave like a dead NAT. Every connection open when the mode is set, and every
    /// connection accepted while it lasts, is black-holed for good: the proxy keeps both
    /// sockets open, reads and discards what arrives and never forwards nor answers anything,
    /// even after the mode goes back to [`Pass`](FaultMode::Pass). Only a later
    /// [`Reset`](FaultMode::Reset) or [`Refuse`](FaultMode::Refuse), or the end of the proxy,
    /// closes them. Connections accepted after the mode has left `Hang` work normally.
    Hang,
    /// Reset (TCP RST) every open connection, including black-holed ones, and reset every
    /// new connection as soon as it is accepted.
    Reset,
    /// Stop listening, so that connects fail with `ECONNREFUSED`, and reset every open
    /// connection, including black-holed ones. When the mode leaves `Refuse` the proxy
    /// listens again on the same port.
    Refuse,
}

/// Counters of what a [`FaultProxy`] did since it started. Read with [`FaultProxy::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FaultProxyStats {
    /// Client connections accepted, whatever happened to them afterwards.
    pub accepted: u64,
    /// Connections black-holed by [`FaultMode::Hang`] (open ones and ones accepted while in
    /// `Hang`).
    pub black_holed: u64,
    /// Connections reset by [`FaultMode::Reset`] or [`FaultMode::Refuse`] (open ones,
    /// black-holed ones and ones accepted while in `Reset`).
    pub reset: u64,
    /// Client connections closed because the upstream refused the connect, or did not accept
    /// it within [`UPSTREAM_CONNECT_TIMEOUT`].
    pub upstream_connect_failures: u64,
    /// Bytes written to the upstream (client to service).
    pub bytes_to_upstream: u64,
    /// Bytes written back to the clients (service to client).
    pub bytes_to_client: u64,
}

/// A TCP proxy on `127.0.0.1` that forwards every connection to a loopback upstream and
/// injects the faults of the current [`FaultMode`].
///
/// Each accepted connection gets its own, fresh upstream connection. Mode changes apply to
/// open connections at once: every connection task watches the mode.
///
/// Dropping the proxy stops the listener and every connection task (they are aborted, no
/// task outlives the proxy); [`shutdown`](FaultProxy::shutdown) does the same and waits for
/// it.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    state: watch::Sender<State>,
    applied: watch::Receiver<u64>,
    counters: Arc<Counters>,
    accept_task: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy listening on `127.0.0.1` (on a port the system picks) that forwards to
    /// `upstream`, in mode [`FaultMode::Pass`].
    ///
    /// # Errors
    ///
    /// An [`io::ErrorKind::InvalidInput`] error if `upstream` is not a loopback address (the
    /// proxy is a test tool and never talks to the network); any error from binding the
    /// listening socket.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        if !upstream.ip().to_canonical().is_loopback() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fault proxy: upstream {upstream} is not a loopback address"),
            ));
        }
        let listener = bind_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
        let addr = listener.local_addr()?;
        let (state, state_rx) = watch::channel(State::default());
        let (applied_tx, applied) = watch::channel(0);
        let counters = Arc::new(Counters::default());
        let accept_task = tokio::spawn(accept_loop(
            listener,
            addr,
            upstream,
            state_rx,
            applied_tx,
            Arc::clone(&counters),
        ));
        tracing::debug!(%addr, %upstream, "fault proxy started");
        Ok(FaultProxy {
            addr,
            upstream,
            state,
            applied,
            counters,
            accept_task: Some(accept_task),
        })
    }

    /// The address clients connect to: `127.0.0.1` and the proxy's port. The port stays the
    /// same for the life of the proxy, across [`FaultMode::Refuse`].
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream address every connection is forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// The proxy's address as an HTTP endpoint URL, `http://127.0.0.1:PORT`, ready for an SDK
    /// client's `endpoint_url`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        self.state.borrow().mode
    }

    /// Switches to `mode`. Open connections react at once (hang, reset or take the new
    /// delay for their next chunk); the returned future completes once the listener has
    /// applied the mode: after `set_mode(FaultMode::Refuse).await` connects are refused, and
    /// after leaving `Refuse` the port is listening again.
    ///
    /// Setting [`FaultMode::Hang`], [`FaultMode::Reset`] or [`FaultMode::Refuse`] again while
    /// already in it applies it again to the connections opened since.
    ///
    /// If the port cannot be bound again after `Refuse` (another socket took it), the proxy
    /// logs a warning, keeps trying in the background, and this future still completes.
    pub async fn set_mode(&self, mode: FaultMode) {
        let mut generation = 0;
        self.state.send_modify(|state| {
            state.mode = mode;
            state.generation = state.generation.wrapping_add(1);
            match mode {
                FaultMode::Hang => state.hang_epoch = state.hang_epoch.wrapping_add(1),
                FaultMode::Reset => state.reset_epoch = state.reset_epoch.wrapping_add(1),
                FaultMode::Refuse => {
                    state.reset_epoch = state.reset_epoch.wrapping_add(1);
                    state.refuse_epoch = state.refuse_epoch.wrapping_add(1);
                }
                FaultMode::Pass | FaultMode::Delay(_) => {}
            }
            generation = state.generation;
        });
        tracing::debug!(addr = %self.addr, ?mode, "fault proxy mode set");
        let mut applied = self.applied.clone();
        // An error means the accept loop is gone: nothing is left to apply the mode to.
        let _ = applied.wait_for(|applied| *applied >= generation).await;
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> FaultProxyStats {
        self.counters.snapshot()
    }

    /// Stops the proxy: closes the listener, ends every connection (black-holed ones too) and
    /// waits until all its tasks have finished.
    pub async fn shutdown(mut self) {
        self.state.send_modify(|state| state.shutdown = true);
        if let Some(task) = self.accept_task.take() {
            // A join error can only be a panic of the accept loop, which has stopped anyway.
            let _ = task.await;
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(task) = self.accept_task.take() {
            // Aborting the accept loop drops its `JoinSet`, which aborts every connection task.
            task.abort();
        }
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("upstream", &self.upstream)
            .field("mode", &self.mode())
            .field("stats", &self.stats())
            .finish()
    }
}

/// What every task watches. The epochs count how often a fault was set, so that a connection
/// notices a fault even when the mode moved on before the task looked.
#[derive(Debug, Clone, Copy)]
struct State {
    mode: FaultMode,
    /// Bumped by every `set_mode`; the accept loop reports the last one it applied.
    generation: u64,
    hang_epoch: u64,
    /// Bumped by `Reset` and `Refuse`.
    reset_epoch: u64,
    refuse_epoch: u64,
    shutdown: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            mode: FaultMode::Pass,
            generation: 0,
            hang_epoch: 0,
            reset_epoch: 0,
            refuse_epoch: 0,
            shutdown: false,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    black_holed: AtomicU64,
    reset: AtomicU64,
    upstream_connect_failures: AtomicU64,
    bytes_to_upstream: AtomicU64,
    bytes_to_client: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> FaultProxyStats {
        FaultProxyStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            black_holed: self.black_holed.load(Ordering::Relaxed),
            reset: self.reset.load(Ordering::Relaxed),
            upstream_connect_failures: self.upstream_connect_failures.load(Ordering::Relaxed),
            bytes_to_upstream: self.bytes_to_upstream.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A listening socket on `addr` with `SO_REUSEADDR`, so that the port can be bound again
/// while connections accepted on it are still open.
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds `addr` again, retrying for a short while.
async fn rebind(addr: SocketAddr) -> Option<TcpListener> {
    let mut last_error = None;
    for _ in 0..REBIND_ATTEMPTS {
        match bind_listener(addr) {
            Ok(listener) => return Some(listener),
            Err(error) => last_error = Some(error),
        }
        tokio::time::sleep(REBIND_PAUSE).await;
    }
    if let Some(error) = last_error {
        tracing::warn!(%addr, %error, "fault proxy cannot listen on its port again; still trying");
    }
    None
}

async fn accept_on(listener: Option<&TcpListener>) -> io::Result<TcpStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => pending().await,
    }
}

/// Accepts connections and applies mode changes to the listener. Owns every connection task,
/// so that ending (or aborting) this task ends them all.
async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut state_rx: watch::Receiver<State>,
    applied_tx: watch::Sender<u64>,
    counters: Arc<Counters>,
) {
    let mut listener = Some(listener);
    let mut tasks = JoinSet::new();
    // The state the channel was created with. Not read from the channel: that would mark as
    // seen a `set_mode` made before this task first ran, which then would never be applied.
    let mut seen = State::default();
    loop {
        tokio::select! {
            biased;
            changed = state_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *state_rx.borrow_and_update();
                if now.shutdown {
                    break;
                }
                if now.mode == FaultMode::Refuse || now.refuse_epoch != seen.refuse_epoch {
                    // Closing the listener also resets the connections still in its backlog.
                    listener = None;
                }
                if listener.is_none() && now.mode != FaultMode::Refuse {
                    listener = rebind(addr).await;
                }
                seen = now;
                applied_tx.send_replace(now.generation);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = accept_on(listener.as_ref()) => match accepted {
                Ok(client) => {
                    bump(&counters.accepted);
                    let now = *state_rx.borrow();
                    match now.mode {
                        FaultMode::Hang => {
                            bump(&counters.black_holed);
                            tasks.spawn(black_hole(
                                client,
                                None,
                                state_rx.clone(),
                                now.reset_epoch,
                                Arc::clone(&counters),
                            ));
                        }
                        FaultMode::Reset | FaultMode::Refuse => {
                            reset(&client);
                            bump(&counters.reset);
                        }
                        FaultMode::Pass | FaultMode::Delay(_) => {
                            tasks.spawn(serve(
                                client,
                                upstream,
                                state_rx.clone(),
                                Epochs::of(&now),
                                Arc::clone(&counters),
                            ));
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(%addr, %error, "fault proxy accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            },
            _ = tokio::time::sleep(REBIND_PAUSE * 5),
                if listener.is_none() && seen.mode != FaultMode::Refuse =>
            {
                listener = bind_listener(addr).ok();
            }
        }
    }
    drop(listener);
    tasks.shutdown().await;
    tracing::debug!(%addr, "fault proxy stopped");
}

/// The fault epochs a connection started under.
#[derive(Debug, Clone, Copy)]
struct Epochs {
    hang: u64,
    reset: u64,
}

impl Epochs {
    fn of(state: &State) -> Self {
        Epochs {
            hang: state.hang_epoch,
            reset: state.reset_epoch,
        }
    }
}

/// What a forwarding connection has to do.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Hang,
    Reset,
    /// The proxy is going away.
    Gone,
}

/// Waits until a fault was set after `start`.
async fn wait_fault(state_rx: &mut watch::Receiver<State>, start: Epochs) -> Fault {
    loop {
        {
            let now = state_rx.borrow_and_update();
            if now.shutdown {
                return Fault::Gone;
            }
            if now.reset_epoch != start.reset {
                return Fault::Reset;
            }
            if now.hang_epoch != start.hang {
                return Fault::Hang;
            }
        }
        if state_rx.changed().await.is_err() {
            return Fault::Gone;
        }
    }
}

/// Forwards one client connection to a fresh upstream connection until either side closes or
/// a fault is set.
async fn serve(
    mut client: TcpStream,
    upstream_addr: SocketAddr,
    mut state_rx: watch::Receiver<State>,
    start: Epochs,
    counters: Arc<Counters>,
) {
    let connect = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream_addr));
    let mut upstream = tokio::select! {
        biased;
        fault = wait_fault(&mut state_rx, start) => {
            apply_fault(fault, start, client, None, state_rx, &counters).await;
            return;
        }
        connected = connect => match connected {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(error)) => {
                tracing::debug!(%upstream_addr, %error, "fault proxy upstream connect failed");
                bump(&counters.upstream_connect_failures);
                return;
            }
            Err(_) => {
                tracing::debug!(%upstream_addr, "fault proxy upstream connect timed out");
                bump(&counters.upstream_connect_failures);
                return;
            }
        },
    };
    // Small chunks (HTTP headers) should not wait for Nagle; failing to set it is harmless.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let mode_rx = state_rx.clone();
    let fault = {
        let (mut client_read, mut client_write) = client.split();
        let (mut upstream_read, mut upstream_write) = upstream.split();
        let to_upstream = pump(
            &mut client_read,
            &mut upstream_write,
            &mode_rx,
            &counters.bytes_to_upstream,
        );
        let to_client = pump(
            &mut upstream_read,
            &mut client_write,
            &mode_rx,
            &counters.bytes_to_client,
        );
        tokio::select! {
            biased;
            fault = wait_fault(&mut state_rx, start) => Some(fault),
            // Both directions done (or one failed): the connection is over.
            _ = async { tokio::try_join!(to_upstream, to_client) } => None,
        }
    };
    if let Some(fault) = fault {
        apply_fault(fault, start, client, Some(upstream), state_rx, &counters).await;
    }
}

/// Copies `reader` to `writer` chunk by chunk, holding each chunk while the mode is
/// [`FaultMode::Delay`]. Passes the end of the stream on as a write shutdown.
async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    mode_rx: &watch::Receiver<State>,
    forwarded: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK_SIZE];
    loop {
        let read = reader.read(&mut buf).await?;
        if read == 0 {
            return writer.shutdown().await;
        }
        let delay = match mode_rx.borrow().mode {
            FaultMode::Delay(delay) => Some(delay),
            _ => None,
        };
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        writer
            .write_all(buf.get(..read).unwrap_or_default())
            .await?;
        forwarded.fetch_add(read as u64, Ordering::Relaxed);
    }
}

async fn apply_fault(
    fault: Fault,
    start: Epochs,
    client: TcpStream,
    upstream: Option<TcpStream>,
    state_rx: watch::Receiver<State>,
    counters: &Arc<Counters>,
) {
    match fault {
        Fault::Hang => {
            bump(&counters.black_holed);
            // `wait_fault` picks a reset over a hang, so no reset came since `start`: any
            // reset after it, even one set right now, ends the black hole.
            let reset_epoch = start.reset;
            black_hole(
                client,
                upstream,
                state_rx,
                reset_epoch,
                Arc::clone(counters),
            )
            .await;
        }
        Fault::Reset => {
            reset(&client);
            if let Some(upstream) = &upstream {
                reset(upstream);
            }
            bump(&counters.reset);
        }
        Fault::Gone => {}
    }
}

/// Keeps the sockets open, discards whatever arrives and never sends anything, until a reset
/// is set after `reset_epoch` or the proxy goes away.
async fn black_hole(
    mut client: TcpStream,
    mut upstream: Option<TcpStream>,
    mut state_rx: watch::Receiver<State>,
    reset_epoch: u64,
    counters: Arc<Counters>,
) {
    let reset_now = {
        let swallow = async {
            tokio::join!(discard(&mut client), async {
                if let Some(upstream) = upstream.as_mut() {
                    discard(upstream).await;
                }
            });
            // Both sides are closed or broken: still never answer, just hold on.
            pending::<()>().await;
        };
        tokio::select! {
            biased;
            reset_now = wait_reset(&mut state_rx, reset_epoch) => reset_now,
            () = swallow => false,
        }
    };
    if reset_now {
        reset(&client);
        if let Some(upstream) = &upstream {
            reset(upstream);
        }
        bump(&counters.reset);
    }
}

/// Reads and drops everything until the end of the stream or an error.
async fn discard(stream: &mut TcpStream) {
    let mut buf = vec![0u8; CHUNK_SIZE];
    while let Ok(read) = stream.read(&mut buf).await {
        if read == 0 {
            break;
        }
    }
}

/// Waits until a reset is set after `reset_epoch` (`true`) or the proxy goes away (`false`).
async fn wait_reset(state_rx: &mut watch::Receiver<State>, reset_epoch: u64) -> bool {
    loop {
        {
            let now = state_rx.borrow_and_update();
            if now.shutdown {
                return false;
            }
            if now.reset_epoch != reset_epoch {
                return true;
            }
        }
        if state_rx.changed().await.is_err() {
            return false;
        }
    }
}

/// Arms `stream` so that dropping it sends a TCP RST instead of a FIN.
fn reset(stream: &TcpStream) {
    if let Err(error) = stream.set_zero_linger() {
        tracing::debug!(%error, "fault proxy cannot set zero linger; the close will be a FIN");
    }
}
