//! Jittered, capped exponential backoff for reconnects.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with "equal jitter": attempt `n` waits a uniformly random
/// time in `[base/2, base]` where `base = min(max, min_delay * 2^n)`. The jitter
/// spreads the reconnects of many devices after a room dies; the cap bounds the
/// wait of a device whose network comes back.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// `min` is raised to 1 ms and `max` to `min` if they are smaller.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        let max = max.max(min);
        Backoff {
            min,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt, using the thread-local RNG.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::rng())
    }

    /// The delay before the next attempt, with a caller-chosen RNG (tests seed one).
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1);
        let base_nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX);
        let low = base_nanos / 2;
        Duration::from_nanos(rng.random_range(low..=base_nanos))
    }

    /// The un-jittered upper bound of the next delay.
    pub fn base(&self) -> Duration {
        // 2^20 times any sane minimum is beyond any sane maximum: stop doubling there.
        let factor = 1u32 << self.attempt.min(20);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Back to the minimum delay (after a connection that worked).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn grows_is_jittered_and_capped() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(min, max);
        let mut previous_base = Duration::ZERO;
        for attempt in 0..30 {
            let base = backoff.base();
            assert!(base >= previous_base, "the bound never shrinks");
            assert!(base <= max, "capped");
            let delay = backoff.next_delay_with(&mut rng);
            assert!(
                delay <= base && delay >= base / 2,
                "attempt {attempt}: {delay:?} not in [{:?}, {base:?}]",
                base / 2
            );
            previous_base = base;
        }
        assert_eq!(backoff.base(), max);
        // The first delays grow: 100ms, 200ms, 400ms, 800ms bounds.
        let mut fresh = Backoff::new(min, max);
        let bounds: Vec<_> = (0..4)
            .map(|_| {
                let bound = fresh.base();
                fresh.next_delay_with(&mut rng);
                bound
            })
            .collect();
        assert_eq!(bounds, [100, 200, 400, 800].map(Duration::from_millis));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<Duration> = (0..50)
            .map(|_| {
                let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
                backoff.next_delay_with(&mut rng);
                backoff.next_delay_with(&mut rng)
            })
            .collect();
        assert!(
            delays.len() > 40,
            "50 devices must not all wait the same time: {} distinct",
            delays.len()
        );
    }

    #[test]
    fn reset_goes_back_to_the_minimum() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        for _ in 0..10 {
            backoff.next_delay();
        }
        assert_eq!(backoff.base(), Duration::from_millis(80));
        backoff.reset();
        assert_eq!(backoff.base(), Duration::from_millis(10));
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }

    #[test]
    fn degenerate_bounds_are_fixed_up() {
        let mut backoff = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(backoff.base(), Duration::from_millis(1));
        assert!(backoff.next_delay() <= Duration::from_millis(1));
    }
}
