//! Exponential back-off with full jitter on the injected clock and random source.

use std::sync::Arc;
use std::time::Duration;

use kcl_lease::RandomSource;

/// Exponential back-off: `base * 2^attempt`, capped, with full jitter (a random delay
/// between half the step and the step).
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    random: Arc<dyn RandomSource>,
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
}
