//! Injected time and randomness.
//!
//! Lease logic never reads ambient time: it asks a [`Clock`]. [`SystemClock`] uses tokio's
//! clock (so it also follows `tokio::time::pause`); `test_util::ManualClock` is moved by
//! the test.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Monotonic time, wall time and sleeping.
pub trait Clock: Send + Sync + Debug {
    /// The monotonic now.
    fn now(&self) -> Instant;
    /// The wall-clock now (for timestamps shown to users, never for lease expiry).
    fn system_time(&self) -> SystemTime;
    /// Completes once `duration` has passed on this clock.
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()>;
}

/// The real clock, through tokio's timer.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }
    /// The system's wall clock, moved by as far as tokio's clock is ahead of (or behind)
    /// the real monotonic clock: exactly the wall clock normally, and following virtual
    /// time under `tokio::time::pause` (so wall-clock stamps such as a WorkerMetricStats
    /// row's `lut` age as the rest of a paused test does).
    fn system_time(&self) -> SystemTime {
        let tokio_now = tokio::time::Instant::now().into_std();
        let real_now = Instant::now();
        let wall = SystemTime::now();
        match tokio_now.checked_duration_since(real_now) {
            Some(ahead) => wall.checked_add(ahead).unwrap_or(wall),
            None => wall
                .checked_sub(real_now.saturating_duration_since(tokio_now))
                .unwrap_or(wall),
        }
    }
    fn sleep(&self, duration: Duration) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(duration))
    }
}

/// A source of random numbers (for jitter and worker ids).
pub trait RandomSource: Send + Sync + Debug {
    /// The next random 64-bit value.
    fn next_u64(&self) -> u64;

    /// A value in `0..bound` (`0` when `bound` is 0).
    fn below(&self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    /// A duration in `0..=max`.
    fn jitter(&self, max: Duration) -> Duration {
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.below(nanos.saturating_add(1)))
    }
}

/// A deterministic generator (SplitMix64), for seeded tests and simulations.
#[derive(Debug)]
pub struct SeededRandom {
    state: AtomicU64,
}

impl SeededRandom {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: AtomicU64::new(seed),
        }
    }

    /// A generator seeded from the system time and process id.
    pub fn from_entropy() -> Self {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let addr = &nanos as *const u64 as u64;
        Self::new(nanos ^ (u64::from(std::process::id()) << 32) ^ addr.rotate_left(17))
    }
}

impl RandomSource for SeededRandom {
    fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}
