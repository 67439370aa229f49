//! Per-app token buckets (governor) for the push API. Rates come from the app's
//! config in keeper; a changed rate takes effect on the next request.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use pushgrid_proto::cluster::App;

#[derive(Default)]
pub(crate) struct AppLimits {
    /// app id -> (rate, burst, bucket)
    buckets: DashMap<String, (u32, u32, Arc<DefaultDirectRateLimiter>)>,
}

/// Why a request is over its app's rate.
#[derive(Debug, PartialEq)]
pub(crate) enum OverLimit {
    /// Tokens are free again after this wait.
    Wait(Duration),
    /// More tokens asked at once than the bucket ever holds (its burst).
    OverBurst(u32),
}

impl AppLimits {
    /// Takes one token of the app's bucket, or says how long until one is free.
    pub fn check(&self, app: &App) -> Result<(), Duration> {
        match self.check_n(app, 1) {
            Ok(()) => Ok(()),
            Err(OverLimit::Wait(wait)) => Err(wait),
            // A burst is at least 1, so one token always fits; wait a second to be safe.
            Err(OverLimit::OverBurst(_)) => Err(Duration::from_secs(1)),
        }
    }

    /// Takes `count` tokens at once (a batch of commands), or none.
    pub fn check_n(&self, app: &App, count: u32) -> Result<(), OverLimit> {
        let Some(rate) = NonZeroU32::new(app.rate_per_sec) else {
            return Ok(());
        };
        let Some(count) = NonZeroU32::new(count) else {
            return Ok(());
        };
        let burst = NonZeroU32::new(app.rate_burst).unwrap_or(rate);
        let bucket = {
            let mut entry = self.buckets.entry(app.id.clone()).or_insert_with(|| {
                (
                    rate.get(),
                    burst.get(),
                    Arc::new(RateLimiter::direct(
                        Quota::per_second(rate).allow_burst(burst),
                    )),
                )
            });
            if entry.0 != rate.get() || entry.1 != burst.get() {
                *entry = (
                    rate.get(),
                    burst.get(),
                    Arc::new(RateLimiter::direct(
                        Quota::per_second(rate).allow_burst(burst),
                    )),
                );
            }
            entry.2.clone()
        };
        match bucket.check_n(count) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(OverLimit::Wait(
                not_until.wait_time_from(DefaultClock::default().now()),
            )),
            Err(_) => Err(OverLimit::OverBurst(burst.get())),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn burst_then_refused_and_unlimited_apps_pass() {
        let limits = AppLimits::default();
        let app = App {
            id: "a".into(),
            rate_per_sec: 1,
            rate_burst: 3,
            ..Default::default()
        };
        for _ in 0..3 {
            assert!(limits.check(&app).is_ok());
        }
        let wait = limits
            .check(&app)
            .expect_err("a fourth call within the burst of 3 is refused");
        assert!(wait <= Duration::from_secs(1));
        let unlimited = App {
            id: "b".into(),
            ..Default::default()
        };
        for _ in 0..1000 {
            assert!(limits.check(&unlimited).is_ok());
        }
        // Many tokens at once: all or none, and never more than the burst.
        let batch_app = App {
            id: "c".into(),
            rate_per_sec: 1,
            rate_burst: 10,
            ..Default::default()
        };
        assert_eq!(
            limits.check_n(&batch_app, 11),
            Err(OverLimit::OverBurst(10))
        );
        assert!(limits.check_n(&batch_app, 8).is_ok());
        assert!(matches!(
            limits.check_n(&batch_app, 3),
            Err(OverLimit::Wait(_))
        ));
        assert!(limits.check_n(&batch_app, 2).is_ok());
        // A raised rate replaces the bucket at once.
        let raised = App {
            rate_per_sec: 100,
            rate_burst: 100,
            ..app
        };
        assert!(limits.check(&raised).is_ok());
    }
}
