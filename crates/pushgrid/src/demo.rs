//! The demo page of `pushgrid dev`: `/demo` takes a user id, gets a demo
//! token, connects with the web SDK (sdk/web, its bundle embedded here) and
//! shows each push; its form pushes to that user through the push API.
//! Dev only: `/demo/token` signs a token for any user of the demo app.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use pushgrid_common::CancellationToken;

/// The web SDK's browser bundle (`npm run build` in sdk/web writes it; its
/// test fails when the committed file is stale).
pub const SDK_BUNDLE: &str = include_str!("../../../sdk/web/dist/pushgrid.js");
const PAGE: &str = include_str!("demo.html");

pub struct Demo {
    pub center: SocketAddr,
    pub dispatcher: SocketAddr,
    pub room_ws: SocketAddr,
    pub app: String,
    pub secret: String,
    pub api_key: String,
}

/// A device token for `user` of the demo app, valid `ttl_secs`.
pub fn token(secret: &str, app: &str, user: &str, ttl_secs: u64) -> String {
    let now = pushgrid_common::now_ms() / 1000;
    let claims = pushgrid_common::jwt::Claims {
        sub: user.to_string(),
        app: app.to_string(),
        exp: now + ttl_secs,
        dev: String::new(),
    };
    let times = pushgrid_common::jwt::TimeClaims {
        iat: Some(now),
        nbf: None,
    };
    pushgrid_common::jwt::sign_with_times(&claims, times, secret)
}

pub fn router(demo: Arc<Demo>) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::temporary("/demo") }))
        .route(
            "/demo",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE) }),
        )
        .route(
            "/demo/pushgrid.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    SDK_BUNDLE,
                )
            }),
        )
        .route("/demo/token", get(demo_token))
        .route("/demo/push", post(demo_push))
        .with_state(demo)
}

#[derive(serde::Deserialize)]
struct TokenQuery {
    user: String,
}

async fn demo_token(State(demo): State<Arc<Demo>>, Query(query): Query<TokenQuery>) -> Response {
    let user = &query.user;
    if user.is_empty() || user.len() > 255 || user.chars().any(char::is_control) {
        let message = "user: 1 to 255 bytes of printable text";
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({"error": {"code": "bad_request", "message": message}})),
        )
            .into_response();
    }
    axum::Json(serde_json::json!({
        "token": token(&demo.secret, &demo.app, &query.user, 3600),
        "dispatcher": format!("http://{}", demo.dispatcher),
        "ws": format!("ws://{}/", demo.room_ws),
    }))
    .into_response()
}

/// Forwards a push to the push API with the demo app's key.
async fn demo_push(State(demo): State<Arc<Demo>>, body: String) -> Response {
    let answer = reqwest::Client::new()
        .post(format!("http://{}/api/push", demo.center))
        .header("Authorization", format!("apikey {}", demo.api_key))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await;
    match answer {
        Ok(response) => {
            let status =
                StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let text = response.text().await.unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], text).into_response()
        }
        Err(error) => (StatusCode::BAD_GATEWAY, format!("push API: {error}")).into_response(),
    }
}

/// Serves the demo page on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    demo: Arc<Demo>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    axum::serve(listener, router(demo))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
