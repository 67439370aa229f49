//! The saver's metrics, named `pushgrid_saver_<what>_<unit>`; no user ids as labels.

use std::time::Duration;

pub fn stored(count: usize) {
    metrics::counter!("pushgrid_saver_stored_total").increment(count as u64);
}

pub fn acked(count: u64) {
    metrics::counter!("pushgrid_saver_acked_total").increment(count);
}

pub fn pending_served(count: usize) {
    metrics::counter!("pushgrid_saver_pending_served_total").increment(count as u64);
}

/// Messages dropped because a user's inbox was over `max_inbox`.
pub fn inbox_dropped(count: u64) {
    if count > 0 {
        metrics::counter!("pushgrid_saver_inbox_dropped_total").increment(count);
    }
}

pub fn store_seconds(elapsed: Duration) {
    metrics::histogram!("pushgrid_saver_store_seconds").record(elapsed.as_secs_f64());
}

pub fn purged(count: u64) {
    if count > 0 {
        metrics::counter!("pushgrid_saver_purged_total").increment(count);
    }
}
