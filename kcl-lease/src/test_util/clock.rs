//! A clock moved by the test: [`ManualClock`].
//!
//! Lease expiry, back-off and the coordinator's loops all sleep on a
//! [`Clock`]. Giving them a [`ManualClock`] makes time stand still until the test
//! moves it, so a test of "a lease expires after 10 s" runs in microseconds and always sees
//! the same interleaving.
//!
//! # Driving a manual clock
//!
//! * Code called directly by the test (`renew_once`, `take_once`, ...) only reads
//!   [`Clock::now`]; move time with [`ManualClock::advance`] between the calls.
//! * Code running in spawned tasks sleeps on [`Clock::sleep`]. Use
//!   [`ManualClock::advance_and_settle`]: it moves time from one sleeper's deadline to the
//!   next and, at each step, yields to the runtime so that the woken tasks run (and go back
//!   to sleep) before time moves on. A loop sleeping 3 s therefore runs three times during
//!   `advance_and_settle(Duration::from_secs(10))`, as it would in real time.
//! * Run such tests on a current-thread runtime (the default of `#[tokio::test]`): there a
//!   task woken by the clock runs when the test task yields. On a multi-thread runtime the
//!   woken tasks run on other threads and [`ManualClock::settle`] cannot know when they are
//!   done.
//! * Settling only helps tasks that wait on this clock or on each other. A task waiting on
//!   real I/O or on tokio's own timer is not advanced by it.
//!
//! ```
//! use std::time::Duration;
//! use kcl_lease::Clock;
//! use kcl_lease::test_util::clock::ManualClock;
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! let clock = ManualClock::new();
//! let start = clock.now();
//! let sleeper = tokio::spawn({
//!     let clock = clock.clone();
//!     async move { clock.sleep(Duration::from_secs(5)).await }
//! });
//! clock.advance_and_settle(Duration::from_secs(5)).await;
//! assert!(sleeper.is_finished());
//! assert_eq!(clock.now() - start, Duration::from_secs(5));
//! # });
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime};

use crate::{BoxFuture, Clock};

/// The wall-clock time a [`ManualClock`] starts at by default: 2024-01-01T00:00:00Z.
pub const DEFAULT_SYSTEM_TIME_SECS: u64 = 1_704_067_200;

/// How many times [`ManualClock::settle`] yields to the runtime.
pub const SETTLE_YIELDS: usize = 64;

/// A [`Clock`] whose time moves only when the test moves it.
///
/// `now()` is a base [`Instant`] (taken when the clock is created) plus the time advanced so
/// far; `system_time()` is a fixed base [`SystemTime`] plus the same amount. `sleep(d)`
/// completes once the clock has been advanced to its deadline (the time of the call + `d`);
/// no real time passes. Clones share the same time.
#[derive(Clone)]
pub struct ManualClock {
    inner: Arc<Inner>,
}

struct Inner {
    base_instant: Instant,
    base_system_time: SystemTime,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Time advanced since creation.
    elapsed: Duration,
    /// Sleep ids, in creation order.
    next_id: u64,
    /// Pending sleepers by (deadline, id): iteration order is deadline order.
    sleepers: BTreeMap<(Duration, u64), Waker>,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ManualClock {
    /// A clock at elapsed zero, with the wall clock at [`DEFAULT_SYSTEM_TIME_SECS`].
    pub fn new() -> Self {
        Self::with_system_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(DEFAULT_SYSTEM_TIME_SECS),
        )
    }

    /// A clock at elapsed zero whose `system_time()` starts at `base`.
    pub fn with_system_time(base: SystemTime) -> Self {
        Self {
            inner: Arc::new(Inner {
                base_instant: Instant::now(),
                base_system_time: base,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Time advanced since the clock was created.
    pub fn elapsed(&self) -> Duration {
        self.inner.state().elapsed
    }

    /// Moves time forward by `by` and wakes, in deadline order, every sleeper that is due.
    ///
    /// The woken tasks run when the runtime next gets to them; see
    /// [`ManualClock::advance_and_settle`] to let them run before going on.
    pub fn advance(&self, by: Duration) {
        let target = self.elapsed().saturating_add(by);
        self.set(target);
    }

    /// Moves time forward to `elapsed` since creation (no-op when that is not later than
    /// now: a monotonic clock never goes back) and wakes the sleepers that are due.
    pub fn set(&self, elapsed: Duration) {
        let due = {
            let mut state = self.inner.state();
            if elapsed <= state.elapsed {
                return;
            }
            state.elapsed = elapsed;
            take_due(&mut state)
        };
        for waker in due {
            waker.wake();
        }
    }

    /// Number of sleeps started and not yet completed or dropped (that were polled at
    /// least once).
    pub fn pending_sleepers(&self) -> usize {
        self.inner.state().sleepers.len()
    }

    /// The earliest deadline of a pending sleeper, as elapsed time since creation.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.inner
            .state()
            .sleepers
            .keys()
            .next()
            .map(|(deadline, _)| *deadline)
    }

    /// Yields to the runtime [`SETTLE_YIELDS`] times so that tasks woken so far run until
    /// they wait again. Time does not move.
    pub async fn settle(&self) {
        for _ in 0..SETTLE_YIELDS {
            tokio::task::yield_now().await;
        }
    }

    /// Moves time forward by `by`, stopping at every sleeper's deadline on the way.
    ///
    /// At each stop the due sleepers are woken and the runtime is given
    /// [`SETTLE_YIELDS`] turns ([`ManualClock::settle`]) so they run and, if they loop,
    /// register their next sleep, which is then honoured on the way too. The clock ends
    /// exactly `by` later, after a last settle. Use it from a task on a current-thread
    /// runtime (see the module docs).
    pub async fn advance_and_settle(&self, by: Duration) {
        let target = self.elapsed().saturating_add(by);
        self.settle().await;
        loop {
            let now = self.elapsed();
            if now >= target {
                break;
            }
            let step = match self.next_deadline() {
                Some(deadline) if deadline > now && deadline < target => deadline,
                _ => target,
            };
            self.set(step);
            self.settle().await;
        }
    }

    fn sleep_until(&self, deadline: Duration) -> ManualSleep {
        let id = {
            let mut state = self.inner.state();
            let id = state.next_id;
            state.next_id = state.next_id.wrapping_add(1);
            id
        };
        ManualSleep {
            inner: Arc::clone(&self.inner),
            deadline,
            id,
        }
    }
}

/// Removes and returns the wakers of every sleeper due at `state.elapsed`, in deadline order.
fn take_due(state: &mut State) -> Vec<Waker> {
    let not_due = state
        .sleepers
        .split_off(&(state.elapsed.saturating_add(Duration::from_nanos(1)), 0));
    let due = std::mem::replace(&mut state.sleepers, not_due);
    due.into_values().collect()
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state();
        f.debug_struct("ManualClock")
            .field("elapsed", &state.elapsed)
            .field("pending_sleepers", &state.sleepers.len())
            .finish()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.inner.base_instant + self.elapsed()
    }

    fn system_time(&self) -> SystemTime {
        self.inner.base_system_time + self.elapsed()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        let deadline = self.elapsed().saturating_add(duration);
        Box::pin(self.sleep_until(deadline))
    }
}

/// The future of [`ManualClock::sleep`].
struct ManualSleep {
    inner: Arc<Inner>,
    deadline: Duration,
    id: u64,
}

impl Future for ManualSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.inner.state();
        let key = (self.deadline, self.id);
        if state.elapsed >= self.deadline {
            state.sleepers.remove(&key);
            Poll::Ready(())
        } else {
            match state.sleepers.get_mut(&key) {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                Some(waker) => waker.clone_from(cx.waker()),
                None => {
                    state.sleepers.insert(key, cx.waker().clone());
                }
            }
            Poll::Pending
        }
    }
}

impl Drop for ManualSleep {
    fn drop(&mut self) {
        self.inner
            .state()
            .sleepers
            .remove(&(self.deadline, self.id));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn now_and_system_time_move_together() {
        let clock = ManualClock::new();
        let t0 = clock.now();
        let s0 = clock.system_time();
        assert_eq!(
            s0,
            SystemTime::UNIX_EPOCH + Duration::from_secs(DEFAULT_SYSTEM_TIME_SECS)
        );
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1500));
        assert_eq!(
            clock.system_time().duration_since(s0).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(clock.elapsed(), Duration::from_millis(1500));
    }

    #[test]
    fn set_never_goes_back() {
        let clock = ManualClock::new();
        clock.set(Duration::from_secs(5));
        clock.set(Duration::from_secs(3));
        assert_eq!(clock.elapsed(), Duration::from_secs(5));
        clock.set(Duration::from_secs(7));
        assert_eq!(clock.elapsed(), Duration::from_secs(7));
    }

    #[test]
    fn clones_share_time() {
        let clock = ManualClock::new();
        let other = clock.clone();
        other.advance(Duration::from_secs(2));
        assert_eq!(clock.elapsed(), Duration::from_secs(2));
        assert!(format!("{clock:?}").contains("elapsed: 2s"));
    }

    #[tokio::test]
    async fn sleep_completes_only_at_deadline() {
        let clock = ManualClock::new();
        let sleeper = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        clock.settle().await;
        assert_eq!(clock.pending_sleepers(), 1);
        assert_eq!(clock.next_deadline(), Some(Duration::from_secs(10)));
        clock.advance(Duration::from_millis(9_999));
        clock.settle().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1));
        clock.settle().await;
        assert!(sleeper.is_finished());
        assert_eq!(clock.pending_sleepers(), 0);
    }

    #[tokio::test]
    async fn zero_sleep_is_ready_at_once() {
        let clock = ManualClock::new();
        clock.sleep(Duration::ZERO).await;
        clock.advance(Duration::from_secs(1));
        // A deadline computed when sleep() was called, not when first polled.
        let fut = clock.sleep(Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        fut.await;
    }

    #[tokio::test]
    async fn dropped_sleep_is_unregistered() {
        let clock = ManualClock::new();
        let handle = tokio::spawn(clock.sleep(Duration::from_secs(1)));
        clock.settle().await;
        assert_eq!(clock.pending_sleepers(), 1);
        handle.abort();
        clock.settle().await;
        assert_eq!(clock.pending_sleepers(), 0);
    }

    #[tokio::test]
    async fn sleepers_wake_in_deadline_order() {
        let clock = ManualClock::new();
        let order = Arc::new(Mutex::new(Vec::new()));
        for (i, secs) in [(0, 3), (1, 1), (2, 2), (3, 1)] {
            let clock = clock.clone();
            let order = Arc::clone(&order);
            let fut = clock.sleep(Duration::from_secs(secs));
            tokio::spawn(async move {
                fut.await;
                order.lock().unwrap().push((i, clock.elapsed()));
            });
        }
        clock.settle().await;
        clock.advance(Duration::from_secs(5));
        clock.settle().await;
        let order: Vec<usize> = order.lock().unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(order, vec![1, 3, 2, 0]);
    }

    #[tokio::test]
    async fn advance_and_settle_stops_at_each_deadline() {
        let clock = ManualClock::new();
        let ticks = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let clock = clock.clone();
            let ticks = Arc::clone(&ticks);
            async move {
                loop {
                    clock.sleep(Duration::from_secs(3)).await;
                    ticks.lock().unwrap().push(clock.elapsed());
                }
            }
        });
        clock.advance_and_settle(Duration::from_secs(10)).await;
        assert_eq!(
            *ticks.lock().unwrap(),
            vec![
                Duration::from_secs(3),
                Duration::from_secs(6),
                Duration::from_secs(9)
            ]
        );
        assert_eq!(clock.elapsed(), Duration::from_secs(10));
        // A plain advance jumps: the loop runs once, then sleeps from 20 s.
        clock.advance(Duration::from_secs(10));
        clock.settle().await;
        assert_eq!(ticks.lock().unwrap().len(), 4);
        assert_eq!(clock.next_deadline(), Some(Duration::from_secs(23)));
        task.abort();
    }

    #[tokio::test]
    async fn woken_chains_run_during_settle() {
        // A sleeper that hands over to another task through a channel: both run in one settle.
        let clock = ManualClock::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn({
            let clock = clock.clone();
            async move {
                clock.sleep(Duration::from_secs(1)).await;
                let _ = tx.send(());
            }
        });
        tokio::spawn({
            let done = Arc::clone(&done);
            async move {
                while rx.recv().await.is_some() {
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        clock.advance_and_settle(Duration::from_secs(1)).await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn works_from_another_runtime_or_thread() {
        let clock = ManualClock::new();
        let fut = clock.sleep(Duration::from_secs(1));
        let mover = clock.clone();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            mover.advance(Duration::from_secs(1));
        });
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap()
            .block_on(fut);
        thread.join().unwrap();
    }
}
