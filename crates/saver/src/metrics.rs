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

/// One group commit: rows written, Store calls served, time taken.
pub fn group_commit(rows: usize, calls: usize, elapsed: Duration) {
    metrics::histogram!("pushgrid_saver_group_commit_rows").record(rows as f64);
    metrics::histogram!("pushgrid_saver_group_commit_calls").record(calls as f64);
    metrics::histogram!("pushgrid_saver_group_commit_seconds").record(elapsed.as_secs_f64());
}

/// Messages whose durable copy failed or was skipped (`durability = "redis"`).
pub fn durable_copy_failed(count: usize) {
    metrics::counter!("pushgrid_saver_durable_copy_failed_total").increment(count as u64);
}

/// Messages delivered `max_attempts` times without an ACK, moved to dead letters.
pub fn dead_lettered(count: u64) {
    if count > 0 {
        metrics::counter!("pushgrid_saver_dead_lettered_total").increment(count);
    }
}

/// Store calls answered from an earlier call with the same idempotency key.
pub fn idempotent_replay() {
    metrics::counter!("pushgrid_saver_idempotent_replays_total").increment(1);
}

pub fn published() {
    metrics::counter!("pushgrid_saver_published_total").increment(1);
}

/// History calls, by whether the gap could be recovered.
pub fn history(recovered: bool) {
    let outcome = if recovered { "recovered" } else { "lost" };
    metrics::counter!("pushgrid_saver_history_total", "outcome" => outcome).increment(1);
}

/// Times Redis was found empty of saver data (restarted without persistence, flushed).
pub fn redis_lost() {
    metrics::counter!("pushgrid_saver_redis_lost_total").increment(1);
}

/// Messages loaded from SQL back into a Redis inbox.
pub fn recovered(count: usize) {
    metrics::counter!("pushgrid_saver_recovered_total").increment(count as u64);
}

/// An ACK the store did not take, tried again.
pub fn ack_retry() {
    metrics::counter!("pushgrid_saver_ack_retries_total").increment(1);
}

/// Messages of failed Store calls removed from the stores.
pub fn withdrawn(count: usize) {
    metrics::counter!("pushgrid_saver_withdrawn_total").increment(count as u64);
}

/// Store calls whose caller was gone when the answer was ready.
pub fn abandoned() {
    metrics::counter!("pushgrid_saver_abandoned_calls_total").increment(1);
}

/// Redis writes of new messages tried once more after a broken connection.
pub fn redis_write_retry() {
    metrics::counter!("pushgrid_saver_redis_write_retries_total").increment(1);
}

/// Store calls refused because the saver held no valid worker id.
pub fn no_worker_id() {
    metrics::counter!("pushgrid_saver_no_worker_id_total").increment(1);
}
