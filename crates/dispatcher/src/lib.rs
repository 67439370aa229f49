//! dispatcher: tells a device which rooms to connect to.
//!
//! `GET /v1/dispatch?user=..` answers the live rooms, shuffled so devices
//! spread over them, with a TTL for which the device may cache the answer.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net};
use pushgrid_proto::cluster::{NodeInfo, Role};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;

pub const ROLE: &str = "dispatcher";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DispatcherConfig {
    /// `listen` (gRPC) is unused: dispatcher serves only HTTP.
    #[serde(flatten)]
    pub node: NodeConfig,
    pub http_listen: String,
    /// Most rooms in one answer.
    pub max_rooms: usize,
    /// Seconds a device may cache an answer.
    pub ttl_secs: u32,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            node: NodeConfig::with_ports(7006, 9006),
            http_listen: "127.0.0.1:8070".into(),
            max_rooms: 3,
            ttl_secs: 60,
        }
    }
}

impl RoleConfig for DispatcherConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub admin: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &DispatcherConfig) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            admin: net::bind(&config.node.admin_listen).await?,
            http: net::bind(&config.http_listen).await?,
        })
    }
}

struct DispatchState {
    cluster: Cluster,
    config: DispatcherConfig,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message } })),
    )
        .into_response()
}

async fn dispatch(
    State(state): State<Arc<DispatchState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let user = query.get("user").map(String::as_str).unwrap_or("");
    if user.is_empty() || user.len() > 255 {
        metrics::counter!("pushgrid_dispatcher_requests_total", "result" => "bad_request")
            .increment(1);
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "user: required, 1 to 255 bytes",
        );
    }
    let view = state.cluster.view();
    let mut rooms: Vec<&NodeInfo> = view
        .nodes_of(Role::Room)
        .filter(|room| !room.tcp_addr.is_empty())
        .collect();
    if rooms.is_empty() {
        metrics::counter!("pushgrid_dispatcher_requests_total", "result" => "no_room").increment(1);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no room is live",
        );
    }
    rooms.shuffle(&mut rand::rng());
    rooms.truncate(state.config.max_rooms.max(1));
    let rooms: Vec<_> = rooms
        .iter()
        .map(|room| json!({ "node": room.id, "tcp": room.tcp_addr }))
        .collect();
    metrics::counter!("pushgrid_dispatcher_requests_total", "result" => "ok").increment(1);
    (
        StatusCode::OK,
        axum::Json(json!({ "result": { "rooms": rooms, "ttl_secs": state.config.ttl_secs } })),
    )
        .into_response()
}

/// Runs dispatcher until `shutdown`.
pub async fn run(
    config: DispatcherConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let http_addr = listeners.http.local_addr()?;
    let endpoints = node::Endpoints {
        http: Some(http_addr),
        ..Default::default()
    };
    const NEEDS: &[Role] = &[Role::Room];
    let cluster = node::start(
        ROLE,
        Role::Dispatcher,
        &config.node,
        listeners.admin,
        endpoints,
        NEEDS,
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    let state = Arc::new(DispatchState {
        cluster: cluster.clone(),
        config,
    });
    let app = Router::new()
        .route("/v1/dispatch", get(dispatch))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(state);

    tracing::info!(node = %node_id, %http_addr, "dispatcher serving");
    net::announce(ROLE, "ready", http_addr);
    let served = axum::serve(listeners.http, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await;
    cluster.leave().await;
    tracing::info!(node = %node_id, "dispatcher stopped");
    served.map_err(Into::into)
}
