//! The drain: `POST /admin/drain` on the admin port, and sending every
//! device on to another room before the room stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use pushgrid_common::{CancellationToken, telemetry};

use crate::{ConnHandle, Room};

/// Stops accepting, sends every device on (KICK with a reconnect delay and
/// another room), and waits for the connections to close under the grace.
pub(crate) async fn drain(
    room: &Arc<Room>,
    stop_accepting: CancellationToken,
    accepts: Vec<tokio::task::JoinHandle<()>>,
) {
    stop_accepting.cancel();
    for accept in accepts {
        // Each loop drops its listener when it returns: new devices are
        // refused at once and try their next room.
        let _ = accept.await;
    }
    room.draining.store(true, Ordering::SeqCst);
    let conns: Vec<Arc<ConnHandle>> = room
        .conns
        .iter()
        .map(|entry| entry.value().clone())
        .collect();
    let window = room.admission.limits().drain_window;
    tracing::info!(
        connections = conns.len(),
        window_secs = window.as_secs(),
        "draining: every device is sent to another room"
    );
    for conn in &conns {
        conn.kick(pushgrid_proto::client::KickCode::Shutdown);
    }
    drop(conns);
    // Connections on shards are not tasks: wait for the table to empty, and
    // for the tasks still opening or politely closing connections.
    let grace = Duration::from_secs(room.config.shutdown_grace_secs);
    let drained = async {
        while !room.conns.is_empty() || !room.tracker.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            left = room.conns.len(),
            "connections still open after the grace period"
        );
    } else {
        tracing::info!("drained: no connection left");
    }
}

/// `POST /admin/drain` on the admin port: needs the admin token (none
/// configured: 403, the drain is off; SIGTERM still drains).
pub(crate) fn drain_routes(
    drain_asked: CancellationToken,
    admin_token: Option<String>,
) -> axum::Router {
    let handler = move |ConnectInfo(peer): ConnectInfo<SocketAddr>, headers: HeaderMap| {
        let drain_asked = drain_asked.clone();
        let admin_token = admin_token.clone();
        async move {
            let refused = |status: StatusCode, message: &str| {
                ::metrics::counter!("pushgrid_admin_refused_total", "endpoint" => "drain")
                    .increment(1);
                tracing::warn!(%peer, status = status.as_u16(), "drain request refused");
                (
                    status,
                    axum::Json(
                        serde_json::json!({"error": {"code": "unauthorized", "message": message}}),
                    ),
                )
                    .into_response()
            };
            let Some(expected) = admin_token.as_deref() else {
                return refused(
                    StatusCode::FORBIDDEN,
                    "the drain endpoint is off: no admin token is configured (admin_token, \
                     PUSHGRID_ADMIN_TOKEN or the admin-token file of credentials_dir)",
                );
            };
            let allowed = telemetry::bearer_token(&headers)
                .is_some_and(|given| telemetry::token_matches(given, expected));
            if !allowed {
                return refused(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong admin token (Authorization: Bearer <admin token>)",
                );
            }
            tracing::info!(%peer, "drain asked on the admin port");
            drain_asked.cancel();
            (
                StatusCode::ACCEPTED,
                axum::Json(serde_json::json!({"result": {"draining": true}})),
            )
                .into_response()
        }
    };
    axum::Router::new().route("/admin/drain", axum::routing::post(handler))
}
