//! The HTTP API: `POST /api/push`. Every answer is `{"result": ..}` or
//! `{"error": {"code", "message"}}` with the matching HTTP status.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use pushgrid_common::cluster::Cluster;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{App, Role, StoreRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::CenterConfig;
use crate::route::WorkerPool;

pub(crate) struct ApiState {
    pub config: CenterConfig,
    pub cluster: Cluster,
    pub workers: WorkerPool,
    pub channels: pushgrid_common::rpc::ChannelPool,
    pub limits: crate::limits::AppLimits,
    /// Broadcast fan-outs in flight; none free answers 503.
    pub broadcasts: Arc<tokio::sync::Semaphore>,
}

/// An API failure: the HTTP status, a stable machine-readable code and a
/// message that says what was wrong.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after_secs: Option<u32>,
}

impl ApiError {
    pub(crate) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn from_status(status: tonic::Status) -> ApiError {
        match status.code() {
            tonic::Code::InvalidArgument => ApiError::bad_request(status.message()),
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("storage unavailable: {}", status.message()),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("pushgrid_center_api_errors_total", "code" => self.code).increment(1);
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

pub(crate) fn ok(result: serde_json::Value) -> Response {
    (StatusCode::OK, axum::Json(json!({ "result": result }))).into_response()
}

pub(crate) fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/push", post(push))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API method")
        })
        .with_state(state)
        .layer(pushgrid_common::http_stats::HttpStatsLayer::new("center"))
}

/// A payload given as text or as base64, within the size limit.
pub(crate) fn decode_payload(
    state: &ApiState,
    text: Option<String>,
    base64_text: Option<String>,
) -> Result<Bytes, ApiError> {
    let payload = match (text, base64_text) {
        (Some(text), None) => Bytes::from(text),
        (None, Some(encoded)) => base64::engine::general_purpose::STANDARD
            .decode(encoded.as_bytes())
            .map(Bytes::from)
            .map_err(|error| {
                ApiError::bad_request(format!("payload_b64: not valid base64: {error}"))
            })?,
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give payload or payload_b64, not both",
            ));
        }
        (None, None) => return Err(ApiError::bad_request("payload or payload_b64 is required")),
    };
    if payload.len() > state.config.max_payload_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "payload of {} bytes exceeds {} bytes",
                payload.len(),
                state.config.max_payload_bytes
            ),
        ));
    }
    Ok(payload)
}

/// 503 with Retry-After: a bounded queue is full and nothing was stored.
pub(crate) fn overloaded(state: &ApiState, message: &str) -> ApiError {
    let mut error = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message);
    error.retry_after_secs = Some(state.config.retry_after_secs);
    error
}

/// The app of a request's `Authorization: apikey <key>` header, within its
/// rate limit: every API method takes it first, before reading the body.
pub(crate) struct Authenticated(pub App);

impl axum::extract::FromRequestParts<Arc<ApiState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let app = authenticate(state, &parts.headers)?;
        rate_limit(state, &app)?;
        Ok(Authenticated(app))
    }
}

/// 503 for a missing peer role.
pub(crate) fn unavailable(message: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
}

/// 429 with Retry-After when the app is over its rate.
fn rate_limit(state: &ApiState, app: &App) -> Result<(), ApiError> {
    state.limits.check(app).map_err(|wait| {
        let mut error = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "app {} is over its rate of {} requests per second",
                app.id, app.rate_per_sec
            ),
        );
        error.retry_after_secs = Some(wait.as_secs_f64().ceil().max(1.0) as u32);
        error
    })
}

/// The app an `Authorization: apikey <key>` header belongs to.
fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<App, ApiError> {
    let unauthorized =
        |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization header (expected: apikey <key>)"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("Authorization header is not text"))?;
    let key = value
        .strip_prefix("apikey ")
        .map(str::trim)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| unauthorized("Authorization header must be: apikey <key>"))?;
    state
        .cluster
        .view()
        .app_by_api_key(key)
        .cloned()
        .ok_or_else(|| unauthorized("unknown API key"))
}

/// Parses a JSON body strictly: unknown fields and wrong types are errors that
/// name the field and position.
pub(crate) async fn parse_json<T: for<'de> Deserialize<'de>>(
    state: &ApiState,
    body: Body,
) -> Result<T, ApiError> {
    let limit = state.config.max_request_bytes;
    // Read at most `limit` bytes: a larger body is refused without buffering it.
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds {limit} bytes"),
        )
    })?;
    serde_json::from_slice(&body)
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushRequest {
    users: Vec<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
    #[serde(default)]
    ttl_secs: Option<u32>,
    /// The same key within 24 h answers the first push's ids, storing nothing new.
    #[serde(default)]
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize)]
struct PushedMessage {
    user: String,
    /// Message ids are 64-bit; sent as strings so JavaScript keeps every digit.
    id: String,
}

async fn push(
    State(state): State<Arc<ApiState>>,
    Authenticated(app): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    let request: PushRequest = parse_json(&state, body).await?;
    if request.users.is_empty() {
        return Err(ApiError::bad_request(
            "users: at least one user is required",
        ));
    }
    if request.users.len() > state.config.max_users_per_push {
        return Err(ApiError::bad_request(format!(
            "users: {} users exceed the limit of {} per call",
            request.users.len(),
            state.config.max_users_per_push
        )));
    }
    if let Some(index) = request
        .users
        .iter()
        .position(|user| user.is_empty() || user.len() > 255)
    {
        return Err(ApiError::bad_request(format!(
            "users[{index}]: a user id must be 1 to 255 bytes"
        )));
    }
    let payload = decode_payload(&state, request.payload, request.payload_b64)?;

    // A place in the routing queue first: when it is full nothing is stored.
    let Some(slot) = state.workers.reserve() else {
        return Err(overloaded(&state, "routing queue is full; retry later"));
    };

    let view = state.cluster.view();
    let saver = view
        .pick(Role::Saver, rand::random::<u64>())
        .map(|node| node.grpc_addr.clone())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "no saver is live",
            )
        })?;
    let channel = state.channels.get(&saver).map_err(ApiError::from_status)?;
    let store = StoreRequest {
        app: app.id.clone(),
        users: request.users,
        payload,
        ttl_secs: request.ttl_secs.unwrap_or(0),
        idempotency_key: request.idempotency_key.unwrap_or_default(),
    };
    let started = tokio::time::Instant::now();
    let stored = SaverClient::new(channel)
        .store(store)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .messages;
    metrics::histogram!("pushgrid_center_store_seconds").record(started.elapsed().as_secs_f64());
    metrics::counter!("pushgrid_center_pushed_total").increment(stored.len() as u64);

    let answer: Vec<PushedMessage> = stored
        .iter()
        .map(|message| PushedMessage {
            user: message.user.clone(),
            id: message.id.to_string(),
        })
        .collect();
    state.workers.submit(slot, stored);
    Ok(ok(json!({ "messages": answer })))
}
