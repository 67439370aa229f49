//! The dispatcher's own metrics (the HTTP traffic counters come from
//! `pushgrid_common::http_stats`).

/// `counter{result}`: dispatch answers by outcome: `ok`, `region_fallback`,
/// `bad_request`, `no_room`, `rate_limited`, `timeout`.
pub const REQUESTS_TOTAL: &str = "pushgrid_dispatcher_requests_total";
/// `counter{balancer}`: times keeper's setting switched the balancer.
pub const BALANCER_SWITCHES_TOTAL: &str = "pushgrid_dispatcher_balancer_switches_total";

pub fn request_outcome(result: &'static str) {
    metrics::counter!(REQUESTS_TOTAL, "result" => result).increment(1);
}

pub fn balancer_switched(balancer: &'static str) {
    metrics::counter!(BALANCER_SWITCHES_TOTAL, "balancer" => balancer).increment(1);
}
