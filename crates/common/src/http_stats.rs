//! Traffic statistics for the HTTP roles (dispatcher, center): a tower layer
//! that counts requests by route and status, the body bytes read and written,
//! and the time to the response head, into the process-wide Prometheus
//! recorder.
//!
//! The route label is the matched path template (axum's [`MatchedPath`], e.g.
//! `/v1/dispatch`), or `unmatched` when no route matched: never the raw path a
//! client sent, so a scanner cannot blow up the label set. Apply the layer
//! with `Router::layer`, which runs it after routing.
//!
//! Bytes are HTTP body bytes (not headers), counted as the body frames pass:
//! request bytes as the handler reads them, response bytes as the server
//! writes them, so a request whose body is never read counts zero bytes in.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::MatchedPath;
use axum::http::{Request, Response};
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

/// `counter{role, route, status}`: answered requests.
pub const REQUESTS_TOTAL: &str = "pushgrid_http_requests_total";
/// `counter{role, route}`: request body bytes read.
pub const REQUEST_BYTES_TOTAL: &str = "pushgrid_http_request_bytes_total";
/// `counter{role, route}`: response body bytes written.
pub const RESPONSE_BYTES_TOTAL: &str = "pushgrid_http_response_bytes_total";
/// `histogram{role, route}`: seconds from the request to the response head.
pub const REQUEST_DURATION_SECONDS: &str = "pushgrid_http_request_duration_seconds";

/// Bucket bounds (seconds) for [`REQUEST_DURATION_SECONDS`]. The recorder
/// renders a histogram only for metrics given buckets
/// (`PrometheusBuilder::set_buckets_for_metric`), else a summary.
pub const DURATION_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0,
];

/// The route label of requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Wraps every route of a router with traffic statistics under `role`.
#[derive(Debug, Clone, Copy)]
pub struct HttpStatsLayer {
    role: &'static str,
}

impl HttpStatsLayer {
    pub fn new(role: &'static str) -> HttpStatsLayer {
        HttpStatsLayer { role }
    }
}

impl<S> tower::Layer<S> for HttpStatsLayer {
    type Service = HttpStats<S>;

    fn layer(&self, inner: S) -> HttpStats<S> {
        HttpStats {
            inner,
            role: self.role,
        }
    }
}

/// The service [`HttpStatsLayer`] builds.
#[derive(Debug, Clone)]
pub struct HttpStats<S> {
    inner: S,
    role: &'static str,
}

impl<S, ResponseBody> tower::Service<Request<Body>> for HttpStats<S>
where
    S: tower::Service<Request<Body>, Response = Response<ResponseBody>, Error = Infallible>,
    S::Future: Send + 'static,
    ResponseBody: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    ResponseBody::Error: Into<axum::BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let started = Instant::now();
        let role = self.role;
        let route: String = request
            .extensions()
            .get::<MatchedPath>()
            .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
            .to_owned();
        let request_bytes = metrics::counter!(
            REQUEST_BYTES_TOTAL,
            "role" => role,
            "route" => route.clone()
        );
        let request = request.map(|body| Body::new(CountingBody::new(body, request_bytes)));
        let answered = self.inner.call(request);
        Box::pin(async move {
            let response = match answered.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let status = response.status().as_u16().to_string();
            metrics::histogram!(
                REQUEST_DURATION_SECONDS,
                "role" => role,
                "route" => route.clone()
            )
            .record(started.elapsed().as_secs_f64());
            metrics::counter!(
                REQUESTS_TOTAL,
                "role" => role,
                "route" => route.clone(),
                "status" => status
            )
            .increment(1);
            let response_bytes = metrics::counter!(
                RESPONSE_BYTES_TOTAL,
                "role" => role,
                "route" => route
            );
            Ok(response.map(|body| Body::new(CountingBody::new(body, response_bytes))))
        })
    }
}

/// A body that adds the length of every data frame to a counter as the frame
/// passes, so the count is complete by the time the peer has the last byte.
struct CountingBody<B> {
    inner: B,
    counter: metrics::Counter,
}

impl<B> CountingBody<B> {
    fn new(inner: B, counter: metrics::Counter) -> CountingBody<B> {
        CountingBody { inner, counter }
    }
}

impl<B> http_body::Body for CountingBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(context);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.increment(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
