//! The HTTP API: `POST /api/push`. Every answer is `{"result": ..}` or
//! `{"error": {"code", "message"}}` with the matching HTTP status.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use pushgrid_common::cluster::Cluster;
use pushgrid_proto::cluster::App;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::CenterConfig;
use crate::error::ApiError;
use crate::limits::OverLimit;
use crate::methods::Method;
use crate::push::StoreBatcher;
use crate::route::WorkerPool;

pub(crate) struct ApiState {
    pub config: CenterConfig,
    pub cluster: Cluster,
    pub workers: WorkerPool,
    pub channels: pushgrid_common::rpc::ChannelPool,
    pub limits: crate::limits::AppLimits,
    /// Broadcast fan-outs in flight; none free answers 503.
    pub broadcasts: Arc<tokio::sync::Semaphore>,
    /// Single-user pushes coalesced into StoreMany calls, per saver.
    pub stores: StoreBatcher,
    /// Group push fan-outs waiting for a worker (issue 12, groups.rs).
    pub groups: crate::groups::GroupFanout,
    /// The node's admin token: `stats` and `info` with it see the cluster.
    pub admin_token: Option<String>,
}

/// A user id named in a request (field `field`): the wire's id rules, a bad
/// one answered 400.
pub(crate) fn check_user(field: &str, user: &str) -> Result<(), ApiError> {
    pushgrid_wire::check_id("a user id", user)
        .map_err(|problem| ApiError::bad_request(format!("{field}: {problem}")))
}

pub(crate) fn ok(result: serde_json::Value) -> Response {
    (StatusCode::OK, axum::Json(json!({ "result": result }))).into_response()
}

/// Every `POST /api/<method>` of [`Method::ALL`], the OpenAPI document and a
/// JSON 404 for anything else.
pub(crate) fn router(state: Arc<ApiState>) -> Router {
    let mut router = Router::new().route("/api/openapi.json", get(crate::openapi::serve));
    for &(method, name) in Method::ALL {
        router = router.route(
            &format!("/api/{name}"),
            post(
                move |State(state): State<Arc<ApiState>>, caller: Authenticated, body: Body| async move {
                    let answered = async {
                        let body = read_body(&state, body).await?;
                        match &caller.caller {
                            Caller::App(app) => {
                                crate::methods::call(&state, app, method, Params::Body(body)).await
                            }
                            Caller::Admin => {
                                crate::methods::call_as_admin(&state, method, Params::Body(body))
                            }
                        }
                    }
                    .await;
                    match answered {
                        Ok(result) => ok(result),
                        Err(error) => {
                            log_refusal(caller.peer, caller.name(), name, &error);
                            error.into_response()
                        }
                    }
                },
            ),
        );
    }
    router
        .fallback(|| async { ApiError::NotFound("no such API method".into()) })
        .with_state(state)
        .layer(pushgrid_common::http_stats::HttpStatsLayer::new("center"))
}

/// Reads a request body of at most `max_request_bytes`; a larger one is 413,
/// refused without buffering it.
async fn read_body(state: &ApiState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_request_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body exceeds {limit} bytes")))
}

/// A method's parameters: the body of `POST /api/<method>`, or one command's
/// `params` inside a batch.
pub(crate) enum Params {
    Body(Bytes),
    Value(serde_json::Value),
}

impl Params {
    /// Parses strictly: unknown fields, missing fields and wrong types are
    /// 400 errors that name the field (and, for a body, the position). An
    /// empty body or absent params read as `{}`.
    pub(crate) fn parse<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        match self {
            Params::Body(body) => {
                let json: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
                    b"{}"
                } else {
                    &body
                };
                serde_json::from_slice(json)
                    .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
            }
            Params::Value(value) => {
                let value = if value.is_null() { json!({}) } else { value };
                serde_json::from_value(value)
                    .map_err(|error| ApiError::bad_request(format!("invalid params: {error}")))
            }
        }
    }
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
        return Err(ApiError::TooLarge(format!(
            "payload of {} bytes exceeds {} bytes",
            payload.len(),
            state.config.max_payload_bytes
        )));
    }
    Ok(payload)
}

/// 503 with Retry-After: a bounded queue is full and nothing was stored.
pub(crate) fn overloaded(state: &ApiState, message: &str) -> ApiError {
    metrics::counter!("pushgrid_center_overload_rejections_total").increment(1);
    ApiError::Overloaded {
        message: message.to_string(),
        retry_after_secs: state.config.retry_after_secs,
    }
}

/// Who calls the API.
pub(crate) enum Caller {
    /// An app, by its `Authorization: apikey <key>`: it reaches only its own
    /// users and counts.
    App(App),
    /// The operator, by `Authorization: Bearer <admin token>`: only `stats`
    /// and `info`, for the whole cluster.
    Admin,
}

/// The caller of a request and its address, within the app's rate limit:
/// every API method takes it first, before reading the body. A refusal is
/// answered, counted and logged with the caller's address.
pub(crate) struct Authenticated {
    pub caller: Caller,
    pub peer: Option<std::net::SocketAddr>,
}

impl Authenticated {
    /// The app id, or `admin`, for logs.
    fn name(&self) -> &str {
        match &self.caller {
            Caller::App(app) => &app.id,
            Caller::Admin => "admin",
        }
    }
}

impl axum::extract::FromRequestParts<Arc<ApiState>> for Authenticated {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, ApiError> {
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0);
        let method = parts.uri.path().trim_start_matches("/api/");
        let authenticated = authenticate(state, &parts.headers).and_then(|caller| {
            if let Caller::App(app) = &caller {
                rate_limit(state, app)?;
            }
            Ok(caller)
        });
        match authenticated {
            Ok(caller) => Ok(Authenticated { caller, peer }),
            Err(error) => {
                log_refusal(peer, "", method, &error);
                Err(error)
            }
        }
    }
}

/// Logs a refused call (a 4xx answer) with the caller's address, within a
/// budget of lines per second; 5xx answers are the cluster's failures, not
/// refusals, and are logged where they happen.
fn log_refusal(peer: Option<std::net::SocketAddr>, caller: &str, method: &str, error: &ApiError) {
    static REFUSALS: pushgrid_common::auth::RefusalLog = pushgrid_common::auth::RefusalLog::new(20);
    if !error.status().is_client_error() {
        return;
    }
    if let Some(unlogged_before) = REFUSALS.admit() {
        let peer = peer.map_or_else(|| "unknown".to_string(), |peer| peer.to_string());
        tracing::info!(
            %peer,
            caller,
            method = %pushgrid_common::auth::printable(method),
            status = error.status().as_u16(),
            code = error.code(),
            message = %error,
            unlogged_before,
            "api call refused"
        );
    }
}

/// 503 for a missing peer role.
pub(crate) fn unavailable(message: &str) -> ApiError {
    ApiError::Unavailable(message.to_string())
}

/// 429 with Retry-After when the app is over its rate.
fn rate_limit(state: &ApiState, app: &App) -> Result<(), ApiError> {
    state.limits.check(app).map_err(|wait| over_rate(app, wait))
}

/// Charges a batch of `commands` against the app's rate: the call took one
/// token, the further commands take one each. 429 when they are not free now;
/// 400 when the batch is larger than the app's burst and never can be.
pub(crate) fn rate_limit_batch(state: &ApiState, app: &App, commands: u32) -> Result<(), ApiError> {
    let burst = if app.rate_burst > 0 {
        app.rate_burst
    } else {
        app.rate_per_sec
    };
    let over_burst = |burst: u32| {
        ApiError::bad_request(format!(
            "commands: {commands} commands exceed app {}'s burst of {burst} requests; send smaller batches",
            app.id
        ))
    };
    if app.rate_per_sec > 0 && commands > burst {
        return Err(over_burst(burst));
    }
    match state.limits.check_n(app, commands.saturating_sub(1)) {
        Ok(()) => Ok(()),
        Err(OverLimit::Wait(wait)) => Err(over_rate(app, wait)),
        Err(OverLimit::OverBurst(burst)) => Err(over_burst(burst)),
    }
}

fn over_rate(app: &App, wait: std::time::Duration) -> ApiError {
    ApiError::RateLimited {
        message: format!(
            "app {} is over its rate of {} requests per second",
            app.id, app.rate_per_sec
        ),
        retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u32,
    }
}

/// The caller an `Authorization: apikey <key>` (an app) or `Bearer <admin
/// token>` (the operator) header names.
fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |message: &str| ApiError::Unauthorized(message.to_string());
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization header (expected: apikey <key>)"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("Authorization header is not text"))?;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return match &state.admin_token {
            Some(expected) if pushgrid_common::telemetry::token_matches(token.trim(), expected) => {
                Ok(Caller::Admin)
            }
            _ => Err(unauthorized(
                "wrong admin token (Authorization: Bearer <admin token>; apps use: apikey <key>)",
            )),
        };
    }
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
        .map(Caller::App)
        .ok_or_else(|| unauthorized("unknown API key"))
}
