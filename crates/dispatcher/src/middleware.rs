//! The onion around the dispatcher's routes, outermost first: request id
//! (kept from `x-request-id` or made here, echoed in the answer), traffic
//! statistics per route ([`pushgrid_common::http_stats`]), a timeout, and a
//! rate limit per client address.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::connect_info::MockConnectInfo;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use pushgrid_common::CancellationToken;
use tower_http::request_id::{MakeRequestId, RequestId};

use crate::error::DispatchError;

/// Request ids `<node id>-<counter in hex>`: unique in the cluster, no
/// randomness on the hot path.
#[derive(Debug, Clone)]
pub struct NodeRequestIds {
    prefix: Arc<str>,
    next: Arc<AtomicU64>,
}

impl NodeRequestIds {
    pub fn new(node_id: &str) -> NodeRequestIds {
        NodeRequestIds {
            prefix: Arc::from(node_id),
            next: Arc::new(AtomicU64::new(1)),
        }
    }
}

impl MakeRequestId for NodeRequestIds {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{sequence:x}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// Requests per client address, by the GCRA of `governor`.
pub type IpLimiter = DefaultKeyedRateLimiter<IpAddr>;

/// A limiter allowing `per_sec` requests a second with bursts of `burst`
/// per client, or `None` (no limit) when `per_sec` is 0.
pub fn ip_limiter(per_sec: u32, burst: u32) -> Option<Arc<IpLimiter>> {
    let per_sec = NonZeroU32::new(per_sec)?;
    let burst = NonZeroU32::new(burst).unwrap_or(per_sec);
    Some(Arc::new(IpLimiter::keyed(
        Quota::per_second(per_sec).allow_burst(burst),
    )))
}

/// The key a client is limited by: its IPv4 address, or its IPv6 /64 (one
/// subscriber holds a whole /64 and could otherwise rotate through it).
pub fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Answers 429 with `Retry-After` once a client address is over its quota.
/// Requests without a peer address (in-process tests) share one key.
pub async fn rate_limit(
    State(limiter): State<Arc<IpLimiter>>,
    request: Request,
    next: Next,
) -> Response {
    let extensions = request.extensions();
    let peer = extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0)
        .or_else(|| {
            extensions
                .get::<MockConnectInfo<SocketAddr>>()
                .map(|info| info.0)
        })
        .map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |peer| peer.ip());
    match limiter.check_key(&client_key(peer)) {
        Ok(()) => next.run(request).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            let retry_after_secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            crate::metrics::request_outcome("rate_limited");
            DispatchError::RateLimited { retry_after_secs }.into_response()
        }
    }
}

/// Forgets idle clients every minute so the limiter's table stays bounded by
/// the clients of the last minute.
pub async fn prune_limiter(limiter: Arc<IpLimiter>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

/// The answer of a request the timeout layer cut off.
pub async fn timed_out(timeout: Duration, error: axum::BoxError) -> Response {
    if error.is::<tower::timeout::error::Elapsed>() {
        crate::metrics::request_outcome("timeout");
        DispatchError::Timeout(timeout).into_response()
    } else {
        DispatchError::Internal(error.to_string()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_limited_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        let b: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        let other: IpAddr = "2001:db8:1:3::1"
            .parse()
            .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let mapped: IpAddr = "::ffff:10.0.0.7"
            .parse()
            .unwrap_or(IpAddr::V6(Ipv6Addr::LOCALHOST));
        assert_eq!(client_key(mapped), IpAddr::from([10, 0, 0, 7]));
    }
}
