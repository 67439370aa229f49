//! The HTTP API's router: `POST /api/<method>` for every method of
//! `Method::ALL`, the caller's authentication and rate limit before the body
//! is read, and the refusal log. Every answer is `{"result": ..}` or
//! `{"error": {"code", "message"}}` with the matching HTTP status
//! (`error.rs`); the methods themselves are below, in their own modules.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use pushgrid_proto::cluster::App;
use serde_json::json;

use crate::error::ApiError;
use crate::methods::Method;
use crate::state::{ApiState, Params, rate_limit};

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
                                call(&state, app, method, Params::Body(body)).await
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

/// Runs one method for `app` with its parameters: `batch` here, the others
/// in `methods` (a batch's commands run there too).
async fn call(
    state: &Arc<ApiState>,
    app: &App,
    method: Method,
    params: Params,
) -> Result<serde_json::Value, ApiError> {
    match method {
        Method::Batch => crate::batch::batch(state, app, params.parse()?).await,
        other => crate::methods::call_command(state, app, other, params).await,
    }
}

/// Reads a request body of at most `max_request_bytes`; a larger one is 413,
/// refused without buffering it.
async fn read_body(state: &ApiState, body: Body) -> Result<Bytes, ApiError> {
    let limit = state.config.max_request_bytes;
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::TooLarge(format!("request body exceeds {limit} bytes")))
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
