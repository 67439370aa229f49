//! The admin dashboard: `GET /dashboard` (a plain HTML + JS page) and
//! `GET /dashboard/data` (the JSON it polls every second).
//!
//! The data comes from the cluster view keeper gives center (nodes, and each
//! room's `load` = live connections) and from each node's admin port
//! (`/healthz`, and `/metrics` for messages in/out, queue depths and
//! latencies), scraped with a one-second timeout and cached for half a second
//! so many open pages cost the nodes no more than one.
//!
//! Both routes want the admin token: `Authorization: Bearer <token>` or
//! `?token=<token>` (the page passes its own `?token=` on as a header). With no
//! token configured the dashboard is off (404), never open.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::telemetry;
use pushgrid_proto::cluster::{NodeInfo, Role};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
const CACHE_FOR: Duration = Duration::from_millis(500);
/// Scrapes answered larger than this are cut (a node's /metrics is a few KiB).
const MAX_SCRAPE_BYTES: usize = 4 * 1024 * 1024;

pub(crate) struct DashboardState {
    token: Option<String>,
    cluster: Cluster,
    cache: Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl DashboardState {
    /// `token`: the node's admin token (`NodeConfig::admin_token`); with
    /// none the dashboard is off.
    pub fn new(token: Option<String>, cluster: Cluster) -> DashboardState {
        DashboardState {
            token,
            cluster,
            cache: Mutex::new(None),
        }
    }
}

pub(crate) fn router(state: Arc<DashboardState>) -> Router {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/dashboard.js", get(script))
        .route("/dashboard/data", get(data))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn authorize(
    state: &DashboardState,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
    query: &TokenQuery,
) -> Result<(), (StatusCode, String)> {
    let Some(expected) = state.token.as_deref() else {
        return Err((
            StatusCode::NOT_FOUND,
            "the dashboard is off: no admin token is configured (admin_token, PUSHGRID_ADMIN_TOKEN or the admin-token file of credentials_dir)\n".into(),
        ));
    };
    let given = telemetry::bearer_token(headers).or(query.token.as_deref());
    let refusal = match given {
        Some(given) if telemetry::token_matches(given, expected) => return Ok(()),
        Some(_) => "wrong admin token\n",
        None => "admin token required: Authorization: Bearer <token> or ?token=<token>\n",
    };
    metrics::counter!("pushgrid_admin_refused_total", "endpoint" => "dashboard").increment(1);
    let peer = extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_string(), |info| info.0.to_string());
    tracing::warn!(%peer, "dashboard request refused: {}", refusal.trim_end());
    Err((StatusCode::UNAUTHORIZED, refusal.into()))
}

async fn page(
    State(state): State<Arc<DashboardState>>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if let Err(refused) = authorize(&state, &extensions, &headers, &query) {
        return refused.into_response();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// The script holds no secret: served without the token.
async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

async fn data(
    State(state): State<Arc<DashboardState>>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if let Err(refused) = authorize(&state, &extensions, &headers, &query) {
        return refused.into_response();
    }
    let snapshot = {
        let mut cache = state.cache.lock().await;
        match cache.as_ref() {
            Some((taken, snapshot)) if taken.elapsed() < CACHE_FOR => snapshot.clone(),
            _ => {
                let snapshot = Arc::new(take_snapshot(&state.cluster).await);
                *cache = Some((Instant::now(), snapshot.clone()));
                snapshot
            }
        }
    };
    (
        [(header::CACHE_CONTROL, "no-store")],
        axum::Json(snapshot.as_ref()),
    )
        .into_response()
}

/// What the page shows at one instant. Counters are totals since each node
/// started; the page turns them into rates.
#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    time_ms: u64,
    view_version: u64,
    nodes: Vec<NodeStatus>,
    rooms: Vec<RoomStatus>,
    totals: Totals,
}

#[derive(Debug, Serialize)]
struct NodeStatus {
    id: String,
    role: String,
    grpc_addr: String,
    admin_addr: String,
    public_addr: String,
    started_ms: u64,
    healthy: bool,
    health: String,
}

#[derive(Debug, Serialize)]
struct RoomStatus {
    id: String,
    addr: String,
    connections: u64,
}

#[derive(Debug, Default, Serialize)]
struct Totals {
    nodes: usize,
    healthy_nodes: usize,
    connections: u64,
    /// Messages the push API accepted (center `pushgrid_center_pushed_total`).
    messages_in: f64,
    /// Messages written to devices (room deliveries and inbox replays).
    messages_out: f64,
    /// Pushes waiting for a center routing worker.
    route_queue_depth: f64,
    /// Seconds from the API call to the message being stored, p50 and p99.
    store_p50_seconds: f64,
    store_p99_seconds: f64,
    /// Seconds a stored message waited for a routing worker before delivery, p99.
    route_p99_seconds: f64,
    /// API acceptance to the hand-off to a live connection, p99 over rooms.
    delivery_p99_seconds: f64,
}

fn role_name(node: &NodeInfo) -> &'static str {
    match node.role() {
        Role::Keeper => "keeper",
        Role::Dispatcher => "dispatcher",
        Role::Room => "room",
        Role::Register => "register",
        Role::Saver => "saver",
        Role::Center => "center",
        Role::Coordinator => "coordinator",
        _ => "unknown",
    }
}

async fn take_snapshot(cluster: &Cluster) -> Snapshot {
    let view = cluster.view();
    let probes = view.nodes.iter().map(|node| async move {
        let health = admin_get(&node.admin_addr, "/healthz").await;
        let metrics = admin_get(&node.admin_addr, "/metrics").await;
        (health, metrics)
    });
    let probed = futures::future::join_all(probes).await;

    let mut totals = Totals::default();
    let mut nodes = Vec::new();
    let mut rooms = Vec::new();
    // Roles sharing one process (`pushgrid dev`) share one registry: count a
    // role's own metrics once per admin address.
    let mut counted: HashMap<(&str, String), ()> = HashMap::new();
    for (node, (health, metrics)) in view.nodes.iter().zip(probed) {
        let role = role_name(node);
        let (healthy, health) = match health {
            Ok((200, body)) => (true, body.trim().to_string()),
            Ok((status, body)) => (false, format!("{status}: {}", body.trim())),
            Err(error) => (false, error),
        };
        totals.nodes += 1;
        totals.healthy_nodes += usize::from(healthy);
        let public_addr = [&node.tcp_addr, &node.http_addr]
            .into_iter()
            .find(|addr| !addr.is_empty())
            .cloned()
            .unwrap_or_default();
        if node.role() == Role::Room {
            totals.connections += node.load;
            rooms.push(RoomStatus {
                id: node.id.clone(),
                addr: node.tcp_addr.clone(),
                connections: node.load,
            });
        }
        if let Ok((200, text)) = metrics
            && counted
                .insert((role, node.admin_addr.clone()), ())
                .is_none()
        {
            add_metrics(&mut totals, node.role(), &text);
        }
        nodes.push(NodeStatus {
            id: node.id.clone(),
            role: role.to_string(),
            grpc_addr: node.grpc_addr.clone(),
            admin_addr: node.admin_addr.clone(),
            public_addr,
            started_ms: node.started_ms,
            healthy,
            health,
        });
    }
    Snapshot {
        time_ms: pushgrid_common::now_ms(),
        view_version: view.version,
        nodes,
        rooms,
        totals,
    }
}

/// Adds what one node's metrics (Prometheus text) tell to the totals: center's
/// messages in, route queue and store/route latencies; a room's messages out
/// and delivery latency.
fn add_metrics(totals: &mut Totals, role: Role, text: &str) {
    let samples = parse_metrics(text);
    let sum = |name: &str| samples.get(name).copied().unwrap_or(0.0);
    match role {
        Role::Center => {
            totals.messages_in += sum("pushgrid_center_pushed_total");
            totals.route_queue_depth += sum("pushgrid_center_route_queue_depth");
            let max = |current: f64, name: &str| current.max(sum(name));
            totals.store_p50_seconds = max(
                totals.store_p50_seconds,
                "pushgrid_center_store_seconds{quantile=\"0.5\"}",
            );
            totals.store_p99_seconds = max(
                totals.store_p99_seconds,
                "pushgrid_center_store_seconds{quantile=\"0.99\"}",
            );
            totals.route_p99_seconds = max(
                totals.route_p99_seconds,
                "pushgrid_center_route_seconds{quantile=\"0.99\"}",
            );
        }
        Role::Room => {
            totals.messages_out +=
                sum("pushgrid_room_delivered_total") + sum("pushgrid_room_inbox_pushed_total");
            totals.delivery_p99_seconds = totals.delivery_p99_seconds.max(sum(
                "pushgrid_room_delivery_latency_seconds{quantile=\"0.99\"}",
            ));
        }
        _ => {}
    }
}

/// Prometheus text format to `name` (summed over label sets) and
/// `name{quantile="q"}` values. Other labelled series are summed under their name.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        if let Some(quantile) = labels
            .split(',')
            .find_map(|label| label.strip_prefix("quantile="))
        {
            *samples
                .entry(format!("{name}{{quantile={quantile}}}"))
                .or_insert(0.0) += value;
        } else {
            *samples.entry(name.to_string()).or_insert(0.0) += value;
        }
    }
    samples
}

/// A plain HTTP/1.0 GET to a node's admin port: status and body, or why not.
async fn admin_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    if addr.is_empty() {
        return Err("no admin address".into());
    }
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|error| format!("connect {addr}: {error}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|error| format!("write {addr}: {error}"))?;
        let mut answer = Vec::new();
        (&mut stream)
            .take(MAX_SCRAPE_BYTES as u64)
            .read_to_end(&mut answer)
            .await
            .map_err(|error| format!("read {addr}: {error}"))?;
        Ok::<_, String>(answer)
    };
    let answer = tokio::time::timeout(SCRAPE_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{addr} did not answer within {SCRAPE_TIMEOUT:?}"))??;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("{addr}: no HTTP status"))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_summed_by_name_and_quantile() {
        let text = "# TYPE a counter\na 3\na{code=\"x\"} 2\n\
                    s{quantile=\"0.5\"} 0.1\ns{quantile=\"0.99\"} 0.4\ns_sum 1\nbad line\n";
        let samples = parse_metrics(text);
        assert_eq!(samples["a"], 5.0);
        assert_eq!(samples["s{quantile=\"0.99\"}"], 0.4);
        assert_eq!(samples["s_sum"], 1.0);
    }
}
