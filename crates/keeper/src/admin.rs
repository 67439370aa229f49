//! The admin HTTP API: read and change the cluster configuration.
//!
//! Every request needs `Authorization: Bearer <admin_token>`; with no token
//! configured the API refuses everything. A change is written to SQL, read
//! back and published to every node at once.
//!
//! | method | path | body |
//! |---|---|---|
//! | GET | /admin/config | |
//! | PUT | /admin/apps/{id} | app fields (jwt_secret, api_key, webhook_url, rate_per_sec, rate_burst, single_login) |
//! | DELETE | /admin/apps/{id} | |
//! | POST | /admin/apps/{id}/rotate-secret | {"jwt_secret": "..", "overlap_secs": N} |
//! | PUT | /admin/settings/{name} | {"value": ".."} |
//! | DELETE | /admin/settings/{name} | |
//! | PUT | /admin/routes | a route (app, product, type, url, timeout_ms, retries, concurrency) |
//! | DELETE | /admin/routes?app=&product=&type= | |
//! | PUT | /admin/apps/{id}/notify/{provider} | the provider's credentials (see `pushgrid_notify::ProviderFields`) |
//! | DELETE | /admin/apps/{id}/notify/{provider} | |
//!
//! The config answer shows notification credentials with their secrets as
//! fingerprints only (`pushgrid_notify::redacted`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;

use pushgrid_notify::{Provider, ProviderFields};

use crate::registry::KeeperState;
use crate::store::{self, AppSeed, ConfigStore, RouteSeed};

#[derive(Clone)]
pub(crate) struct AdminState {
    pub token: String,
    pub store: Arc<ConfigStore>,
    pub state: Arc<KeeperState>,
}

/// An admin API failure, answered as `{"error": {"code", "message"}}` with
/// the status of [`AdminError::status`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminError {
    #[error("the admin API is disabled: set admin_token")]
    Disabled,
    #[error("missing or wrong admin token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("configuration store: {0}")]
    Store(#[from] sqlx::Error),
}

impl AdminError {
    fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::BadRequest(message.into())
    }

    fn not_found(message: impl Into<String>) -> AdminError {
        AdminError::NotFound(message.into())
    }

    fn status(&self) -> StatusCode {
        match self {
            AdminError::Disabled => StatusCode::FORBIDDEN,
            AdminError::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AdminError::NotFound(_) => StatusCode::NOT_FOUND,
            AdminError::Conflict(_) => StatusCode::CONFLICT,
            AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code.
    fn code(&self) -> &'static str {
        match self {
            AdminError::Disabled => "disabled",
            AdminError::Unauthorized => "unauthorized",
            AdminError::BadRequest(_) => "bad_request",
            AdminError::NotFound(_) => "not_found",
            AdminError::Conflict(_) => "conflict",
            AdminError::Store(_) => "unavailable",
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        (self.status(), axum::Json(body)).into_response()
    }
}

type Answer = Result<Response, AdminError>;

fn authorize(admin: &AdminState, headers: &HeaderMap) -> Result<(), AdminError> {
    if admin.token.is_empty() {
        return Err(AdminError::Disabled);
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    if presented.is_empty() || !constant_time_eq(presented.as_bytes(), admin.token.as_bytes()) {
        metrics::counter!("pushgrid_keeper_admin_refused_total").increment(1);
        return Err(AdminError::Unauthorized);
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, AdminError> {
    serde_json::from_slice(body)
        .map_err(|error| AdminError::bad_request(format!("invalid JSON body: {error}")))
}

/// Reads the store back and publishes it; the answer is the new config.
async fn publish(admin: &AdminState) -> Answer {
    let config = admin.store.load().await?;
    admin.state.set_config(config).await;
    Ok(config_answer(admin))
}

fn config_answer(admin: &AdminState) -> Response {
    let snapshot = admin.state.snapshot();
    let apps: Vec<_> = snapshot
        .apps
        .iter()
        .map(|app| {
            json!({
                "id": app.id, "jwt_secret": app.jwt_secret, "api_key": app.api_key, "webhook_url": app.webhook_url,
                "previous_secret_until_ms": app.previous_secret_until_ms, "rate_per_sec": app.rate_per_sec,
                "rate_burst": app.rate_burst, "single_login": app.single_login,
            })
        })
        .collect();
    let routes: Vec<_> = snapshot
        .routes
        .iter()
        .map(|route| {
            json!({
                "app": route.app, "product": route.product, "type": route.r#type, "url": route.url,
                "timeout_ms": route.timeout_ms, "retries": route.retries, "concurrency": route.concurrency,
            })
        })
        .collect();
    let settings: BTreeMap<_, _> = snapshot.settings.iter().collect();
    let notify: Vec<_> = snapshot
        .notify_providers
        .iter()
        .map(pushgrid_notify::redacted)
        .collect();
    let body = json!({ "result": {
        "version": snapshot.version, "apps": apps, "settings": settings, "routes": routes, "notify_providers": notify,
    } });
    (StatusCode::OK, axum::Json(body)).into_response()
}

async fn get_config(State(admin): State<AdminState>, headers: HeaderMap) -> Answer {
    authorize(&admin, &headers)?;
    Ok(config_answer(&admin))
}

async fn put_app(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    authorize(&admin, &headers)?;
    let mut app: AppSeed = parse(&body)?;
    app.id = id;
    let problems = store::app_problems(&app, "");
    if !problems.is_empty() {
        return Err(AdminError::bad_request(problems.join("; ")));
    }
    let snapshot = admin.state.snapshot();
    if snapshot
        .apps
        .iter()
        .any(|other| other.api_key == app.api_key && other.id != app.id)
    {
        return Err(AdminError::Conflict("api_key is used by another app"));
    }
    admin.store.put_apps(&[app]).await?;
    publish(&admin).await
}

async fn delete_app(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Answer {
    authorize(&admin, &headers)?;
    if !admin.store.delete_app(&id).await? {
        return Err(AdminError::not_found(format!("no app {id:?}")));
    }
    publish(&admin).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    jwt_secret: String,
    #[serde(default = "default_overlap")]
    overlap_secs: u64,
}

fn default_overlap() -> u64 {
    24 * 3600
}

async fn rotate_secret(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    authorize(&admin, &headers)?;
    let rotation: Rotation = parse(&body)?;
    if rotation.jwt_secret.is_empty() {
        return Err(AdminError::bad_request("jwt_secret must not be empty"));
    }
    if !admin
        .store
        .rotate_secret(
            &id,
            &rotation.jwt_secret,
            rotation.overlap_secs.saturating_mul(1000),
        )
        .await?
    {
        return Err(AdminError::not_found(format!("no app {id:?}")));
    }
    publish(&admin).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingValue {
    value: String,
}

async fn put_setting(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    authorize(&admin, &headers)?;
    let setting: SettingValue = parse(&body)?;
    if name.is_empty() || name.len() > 128 {
        return Err(AdminError::bad_request(
            "a setting name must be 1 to 128 bytes",
        ));
    }
    admin
        .store
        .put_settings(&BTreeMap::from([(name, setting.value)]))
        .await?;
    publish(&admin).await
}

async fn delete_setting(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Answer {
    authorize(&admin, &headers)?;
    if !admin.store.delete_setting(&name).await? {
        return Err(AdminError::not_found(format!("no setting {name:?}")));
    }
    publish(&admin).await
}

async fn put_route(State(admin): State<AdminState>, headers: HeaderMap, body: Bytes) -> Answer {
    authorize(&admin, &headers)?;
    let route: RouteSeed = parse(&body)?;
    let problems = store::route_problems(&route, "");
    if !problems.is_empty() {
        return Err(AdminError::bad_request(problems.join("; ")));
    }
    admin.store.put_routes(&[route]).await?;
    publish(&admin).await
}

async fn delete_route(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    authorize(&admin, &headers)?;
    let field = |name: &str| query.get(name).cloned().unwrap_or_default();
    if !admin
        .store
        .delete_route(&field("app"), &field("product"), &field("type"))
        .await?
    {
        return Err(AdminError::not_found("no such route"));
    }
    publish(&admin).await
}

/// The provider named in a path: `apns`, `fcm` or `hms`.
fn provider_named(name: &str) -> Result<Provider, AdminError> {
    Provider::parse(name).ok_or_else(|| {
        AdminError::not_found(format!(
            "no notification provider {:?} (apns, fcm or hms)",
            pushgrid_common::auth::printable(name)
        ))
    })
}

/// Sets (or replaces: a rotation) an app's credentials for a provider;
/// centers use the new ones from their next notification on.
async fn put_provider(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
    body: Bytes,
) -> Answer {
    authorize(&admin, &headers)?;
    let provider = provider_named(&name)?;
    let fields: ProviderFields = parse(&body)?;
    let problems = fields.problems(provider);
    if !problems.is_empty() {
        return Err(AdminError::bad_request(problems.join("; ")));
    }
    if !admin.store.put_provider(&id, provider, &fields).await? {
        return Err(AdminError::not_found(format!("no app {id:?}")));
    }
    tracing::info!(
        app = id,
        provider = provider.as_str(),
        "notification credentials set"
    );
    publish(&admin).await
}

async fn delete_provider(
    State(admin): State<AdminState>,
    headers: HeaderMap,
    Path((id, name)): Path<(String, String)>,
) -> Answer {
    authorize(&admin, &headers)?;
    let provider = provider_named(&name)?;
    if !admin.store.delete_provider(&id, provider).await? {
        return Err(AdminError::not_found(format!(
            "app {id:?} has no {} credentials",
            provider.as_str()
        )));
    }
    tracing::info!(
        app = id,
        provider = provider.as_str(),
        "notification credentials removed"
    );
    publish(&admin).await
}

pub(crate) fn router(admin: AdminState) -> Router {
    Router::new()
        .route("/admin/config", get(get_config))
        .route("/admin/apps/{id}", put(put_app).delete(delete_app))
        .route("/admin/apps/{id}/rotate-secret", post(rotate_secret))
        .route(
            "/admin/apps/{id}/notify/{provider}",
            put(put_provider).delete(delete_provider),
        )
        .route(
            "/admin/settings/{name}",
            put(put_setting).delete(delete_setting),
        )
        .route("/admin/routes", put(put_route).delete(delete_route))
        .fallback(|| async { AdminError::not_found("no such admin route") })
        .with_state(admin)
        .layer(axum::middleware::from_fn(log_refusals))
}

/// Logs every refused admin request (401, 403) with the caller's address.
async fn log_refusals(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |info| info.0.to_string());
    let method = request.method().clone();
    let path = pushgrid_common::auth::printable(request.uri().path());
    let response = next.run(request).await;
    if matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) {
        static REFUSALS: pushgrid_common::auth::RefusalLog =
            pushgrid_common::auth::RefusalLog::new(20);
        if let Some(unlogged_before) = REFUSALS.admit() {
            tracing::warn!(%peer, %method, %path, status = response.status().as_u16(), unlogged_before, "admin request refused");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_and_code() {
        let cases = [
            (AdminError::Disabled, StatusCode::FORBIDDEN, "disabled"),
            (
                AdminError::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
            ),
            (
                AdminError::bad_request("x"),
                StatusCode::BAD_REQUEST,
                "bad_request",
            ),
            (
                AdminError::not_found("no app \"a\""),
                StatusCode::NOT_FOUND,
                "not_found",
            ),
            (
                AdminError::Conflict("taken"),
                StatusCode::CONFLICT,
                "conflict",
            ),
            (
                AdminError::from(sqlx::Error::PoolTimedOut),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
        ];
        for (error, status, code) in cases {
            assert_eq!((error.status(), error.code()), (status, code), "{error}");
        }
        assert!(
            AdminError::from(sqlx::Error::PoolTimedOut)
                .to_string()
                .starts_with("configuration store: ")
        );
    }
}
