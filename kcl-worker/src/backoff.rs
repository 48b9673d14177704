//! Capped exponential back-off with jitter on the injected clock and random source, and the
//! one retry loop of the worker ([`Backoff::retry`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kcl_lease::{Clock, RandomSource};

/// Exponential back-off: step `n` is `base * 2^n`, capped at `cap`; each delay is half the
/// step plus a random part of up to the other half (so a delay lies between half the step
/// and the step: never zero, never above the cap, and workers failing together spread out).
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    random: Arc<dyn RandomSource>,
}

/// What [`Backoff::retry`] does after a failed attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Retry {
    /// Sleep the next back-off delay, then try again.
    After,
    /// Give up: return this error.
    GiveUp,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration, random: Arc<dyn RandomSource>) -> Self {
        Self {
            base,
            cap,
            attempt: 0,
            random,
        }
    }

    /// The next delay.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        let step = self.base.saturating_mul(factor).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        half + self.random.jitter(step - half)
    }

    /// Back to the first step after a success.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Runs `op` (given the attempt number, from 1) until it succeeds or `decide` (given the
    /// error and the attempt number) says [`Retry::GiveUp`]; between attempts it sleeps the
    /// next delay on `clock`. The back-off is not reset here: the caller resets it after the
    /// success that counts (a long-lived loop keeps one `Backoff`).
    pub(crate) async fn retry<T, E, Fut>(
        &mut self,
        clock: &dyn Clock,
        mut op: impl FnMut(u32) -> Fut,
        mut decide: impl FnMut(&E, u32) -> Retry,
    ) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) => match decide(&e, attempt) {
                    Retry::After => clock.sleep(self.next_delay()).await,
                    Retry::GiveUp => return Err(e),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kcl_lease::SeededRandom;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(2),
            Arc::new(SeededRandom::new(7)),
        );
        let delays: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        for d in &delays[5..] {
            assert!(
                *d >= Duration::from_secs(1) && *d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_retries_until_success_or_give_up() {
        let clock = kcl_lease::SystemClock;
        let mut b = Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(1),
            Arc::new(SeededRandom::new(3)),
        );
        let mut calls = 0;
        let r: Result<u32, &str> = b
            .retry(
                &clock,
                |attempt| {
                    calls += 1;
                    async move { if attempt < 3 { Err("no") } else { Ok(attempt) } }
                },
                |_, _| Retry::After,
            )
            .await;
        assert_eq!(r, Ok(3));
        assert_eq!(calls, 3);
        let r: Result<(), &str> = b
            .retry(
                &clock,
                |_| async { Err("no") },
                |_, attempt| {
                    if attempt < 2 {
                        Retry::After
                    } else {
                        Retry::GiveUp
                    }
                },
            )
            .await;
        assert_eq!(r, Err("no"));
    }
}
