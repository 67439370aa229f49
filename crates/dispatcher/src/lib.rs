//! dispatcher: tells a device which rooms to connect to.
//!
//! `GET /v1/dispatch?user=..&net=wifi|cellular&region=..&isp=..` answers up to
//! `max_rooms` rooms serving the device's network in its region (another
//! region when its own has no room up), in the order of the balancer keeper's
//! `dispatcher.balancer` setting names (see [`balancer`]), with a TTL for which
//! the device may cache the answer:
//!
//! ```json
//! {"result": {"rooms": [{"node": "room-1", "tcp": "10.0.0.5:8090"}],
//!             "ttl_secs": 60, "region_fallback": false, "balancer": "consistent_hash"}}
//! ```
//!
//! `ws`, `tls` and `wss` appear only for rooms that publish them. The routes sit
//! inside the onion of [`middleware`]: request id, traffic statistics, a
//! timeout and a per-address rate limit.

pub mod balancer;
pub mod error;
pub mod metrics;
pub mod middleware;
pub mod rooms;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::ClusterView;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::http_stats::HttpStatsLayer;
use pushgrid_common::node;
use pushgrid_common::ring::hash64;
use pushgrid_common::{CancellationToken, net};
use pushgrid_proto::cluster::Role;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};

use crate::balancer::{Balancer, BalancerKind, BalancerOptions};
use crate::error::DispatchError;
use crate::rooms::{DeviceQuery, Net, RoomTable};

pub const ROLE: &str = "dispatcher";

/// The keeper setting that names the balancer, e.g. `round_robin`.
pub const BALANCER_SETTING: &str = "dispatcher.balancer";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct DispatcherConfig {
    /// `listen` (gRPC) is unused: dispatcher serves only HTTP. A `region`
    /// label is the region of devices that name none.
    #[serde(flatten)]
    pub node: NodeConfig,
    pub http_listen: String,
    /// Most rooms in one answer.
    pub max_rooms: usize,
    /// Seconds a device may cache an answer.
    pub ttl_secs: u32,
    /// Balancer used while keeper has no `dispatcher.balancer` setting (or an
    /// unknown one): random, round_robin, weighted_round_robin, consistent_hash.
    pub balancer: String,
    /// Points per room on the consistent-hash ring.
    pub virtual_nodes: usize,
    /// Capacity of rooms that publish no `capacity` label.
    pub default_capacity: u64,
    /// Requests per second allowed per client address (IPv6: per /64); 0 = no limit.
    pub rate_limit_per_sec: u32,
    /// Requests a client may send at once before the rate applies.
    pub rate_limit_burst: u32,
    /// A request not answered within this many milliseconds gets 503.
    pub request_timeout_ms: u64,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        DispatcherConfig {
            node: NodeConfig::with_ports(7006, 9006),
            http_listen: "127.0.0.1:8070".into(),
            max_rooms: 3,
            ttl_secs: 60,
            balancer: BalancerKind::ConsistentHash.as_str().into(),
            virtual_nodes: pushgrid_common::ring::VIRTUAL_NODES,
            default_capacity: 100_000,
            rate_limit_per_sec: 100,
            rate_limit_burst: 200,
            request_timeout_ms: 2_000,
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
    pub async fn bind(config: &DispatcherConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            admin: net::bind(&config.node.admin_listen).await?,
            http: net::bind(&config.http_listen).await?,
        })
    }
}

/// What a request needs: the rooms of the latest view and the balancer in use.
pub struct Snapshot {
    pub table: RoomTable,
    pub balancer: Arc<dyn Balancer>,
}

/// Picks the balancer keeper's setting names, building a new one only when
/// the name changes (a balancer's state survives view changes).
struct BalancerSwitch {
    configured: BalancerKind,
    options: BalancerOptions,
    current: Arc<dyn Balancer>,
    refused: Option<String>,
}

impl BalancerSwitch {
    fn new(configured: BalancerKind, options: BalancerOptions) -> BalancerSwitch {
        BalancerSwitch {
            configured,
            options,
            current: balancer::build(configured, options),
            refused: None,
        }
    }

    fn for_view(&mut self, view: &ClusterView) -> Arc<dyn Balancer> {
        let wanted = match view.setting(BALANCER_SETTING) {
            None => self.configured,
            Some(name) => match name.parse::<BalancerKind>() {
                Ok(kind) => {
                    self.refused = None;
                    kind
                }
                Err(error) => {
                    if self.refused.as_deref() != Some(name) {
                        tracing::warn!(%error, fallback = %self.configured, "keeper setting {BALANCER_SETTING} ignored");
                        self.refused = Some(name.to_string());
                    }
                    self.configured
                }
            },
        };
        if wanted != self.current.kind() {
            tracing::info!(from = %self.current.kind(), to = %wanted, "balancer switched");
            metrics::balancer_switched(wanted.as_str());
            self.current = balancer::build(wanted, self.options);
        }
        self.current.clone()
    }
}

/// The dispatcher's request state: configuration and the latest snapshot.
pub struct Dispatch {
    config: DispatcherConfig,
    default_region: Option<String>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    limiter: Option<Arc<middleware::IpLimiter>>,
}

impl Dispatch {
    /// Follows `views` (a cluster's view receiver) until `shutdown`, keeping a
    /// snapshot of rooms and the balancer for requests.
    pub fn start(
        config: DispatcherConfig,
        mut views: watch::Receiver<Arc<ClusterView>>,
        shutdown: CancellationToken,
    ) -> pushgrid_common::StartResult<Arc<Dispatch>> {
        let configured: BalancerKind = config
            .balancer
            .parse()
            .map_err(|error| pushgrid_common::StartError::Config(format!("balancer: {error}")))?;
        let options = BalancerOptions {
            virtual_nodes: config.virtual_nodes.max(1),
        };
        let mut switch = BalancerSwitch::new(configured, options);
        let default_capacity = config.default_capacity;
        let snapshot_of = move |view: &ClusterView, switch: &mut BalancerSwitch| {
            Arc::new(Snapshot {
                table: RoomTable::from_view(view, default_capacity),
                balancer: switch.for_view(view),
            })
        };
        let first = snapshot_of(&views.borrow_and_update(), &mut switch);
        let (sender, snapshot) = watch::channel(first);
        let follow_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let shutdown = follow_shutdown;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = views.changed() => if changed.is_err() { return },
                }
                let view = views.borrow_and_update().clone();
                sender.send_replace(snapshot_of(&view, &mut switch));
            }
        });
        let default_region = config
            .node
            .labels
            .get("region")
            .map(|region| region.trim().to_ascii_lowercase())
            .filter(|region| !region.is_empty());
        let limiter = middleware::ip_limiter(config.rate_limit_per_sec, config.rate_limit_burst);
        if let Some(limiter) = &limiter {
            tokio::spawn(middleware::prune_limiter(limiter.clone(), shutdown.clone()));
        }
        Ok(Arc::new(Dispatch {
            config,
            default_region,
            snapshot,
            limiter,
        }))
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }
}

/// The query of `GET /v1/dispatch`.
#[derive(Debug, Default, Deserialize)]
pub struct DispatchParams {
    pub user: Option<String>,
    pub net: Option<String>,
    pub region: Option<String>,
    pub isp: Option<String>,
}

#[derive(Serialize)]
struct Envelope<T> {
    result: T,
}

#[derive(Serialize)]
struct DispatchAnswer<'a> {
    rooms: Vec<RoomAnswer<'a>>,
    ttl_secs: u32,
    region_fallback: bool,
    balancer: &'static str,
}

#[derive(Serialize)]
struct RoomAnswer<'a> {
    node: &'a str,
    tcp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ws: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wss: Option<&'a str>,
}

/// A label value a device sent: 1 to 64 bytes of letters, digits, `.`, `_`
/// and `-`, lowercased. Empty means not given.
fn label_param(value: Option<&str>, field: &'static str) -> Result<Option<String>, DispatchError> {
    let Some(value) = value.map(str::trim).filter(|value| !value.is_empty()) else {
        return Ok(None);
    };
    let valid = value.len() <= 64
        && value
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if !valid {
        return Err(DispatchError::BadRequest {
            field,
            reason: "at most 64 letters, digits, '.', '_' or '-'",
        });
    }
    Ok(Some(value.to_ascii_lowercase()))
}

async fn dispatch(
    State(state): State<Arc<Dispatch>>,
    query: Result<Query<DispatchParams>, QueryRejection>,
) -> Result<Response, DispatchError> {
    let answer = answer(&state, query);
    let outcome = match &answer {
        Ok((_, true)) => "region_fallback",
        Ok((_, false)) => "ok",
        Err(DispatchError::NoRoom) => "no_room",
        Err(_) => "bad_request",
    };
    metrics::request_outcome(outcome);
    answer.map(|(response, _)| response)
}

/// The answer and whether it fell back to another region.
fn answer(
    state: &Dispatch,
    query: Result<Query<DispatchParams>, QueryRejection>,
) -> Result<(Response, bool), DispatchError> {
    let Query(params) =
        query.map_err(|rejection| DispatchError::BadQuery(rejection.body_text()))?;
    let user = params.user.as_deref().unwrap_or("");
    if user.is_empty() || user.len() > 255 {
        return Err(DispatchError::BadRequest {
            field: "user",
            reason: "required, 1 to 255 bytes",
        });
    }
    let net = match params
        .net
        .as_deref()
        .map(str::trim)
        .filter(|net| !net.is_empty())
    {
        None => None,
        Some(net) => Some(Net::parse(net).ok_or(DispatchError::BadRequest {
            field: "net",
            reason: "must be wifi or cellular",
        })?),
    };
    let region =
        label_param(params.region.as_deref(), "region")?.or_else(|| state.default_region.clone());
    let isp = label_param(params.isp.as_deref(), "isp")?;
    let device = DeviceQuery {
        key: hash64(user.as_bytes()),
        net,
        region: region.as_deref(),
        isp: isp.as_deref(),
    };
    let snapshot = state.snapshot();
    let selection = rooms::select(
        &snapshot.table,
        &device,
        &*snapshot.balancer,
        state.config.max_rooms.max(1),
    );
    if selection.rooms.is_empty() {
        return Err(DispatchError::NoRoom);
    }
    let rooms = selection
        .rooms
        .iter()
        .map(|index| {
            let room = &snapshot.table.rooms[*index];
            RoomAnswer {
                node: &room.id,
                tcp: &room.tcp,
                ws: room.ws.as_deref(),
                tls: room.tls.as_deref(),
                wss: room.wss.as_deref(),
            }
        })
        .collect();
    let answer = Envelope {
        result: DispatchAnswer {
            rooms,
            ttl_secs: state.config.ttl_secs,
            region_fallback: selection.region_fallback,
            balancer: snapshot.balancer.kind().as_str(),
        },
    };
    Ok((
        axum::Json(answer).into_response(),
        selection.region_fallback,
    ))
}

/// The dispatcher's routes inside the onion: request id, traffic statistics,
/// timeout, rate limit (outermost first). `node_id` prefixes request ids.
pub fn router(state: Arc<Dispatch>, node_id: &str) -> Router {
    let timeout = Duration::from_millis(state.config.request_timeout_ms.max(1));
    let limiter = state.limiter.clone();
    let mut routes = Router::new()
        .route("/v1/dispatch", get(dispatch))
        .fallback(|| async { DispatchError::NotFound })
        .with_state(state);
    if let Some(limiter) = limiter {
        routes = routes.layer(axum::middleware::from_fn_with_state(
            limiter,
            middleware::rate_limit,
        ));
    }
    // Web pages on any origin may ask (a plain GET without credentials: no
    // preflight); the answer names rooms, nothing private.
    routes = routes.layer(axum::middleware::map_response(
        |mut response: axum::response::Response| async move {
            response.headers_mut().insert(
                axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                axum::http::HeaderValue::from_static("*"),
            );
            response
        },
    ));
    routes.layer(
        ServiceBuilder::new()
            .layer(SetRequestIdLayer::x_request_id(
                middleware::NodeRequestIds::new(node_id),
            ))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(HttpStatsLayer::new(ROLE))
            .layer(HandleErrorLayer::new(move |error| {
                middleware::timed_out(timeout, error)
            }))
            .timeout(timeout),
    )
}

/// Runs dispatcher until `shutdown`.
pub async fn run(
    config: DispatcherConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
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
    let state = Dispatch::start(config, cluster.subscribe(), shutdown.clone())?;
    let app = router(state, &node_id);

    tracing::info!(node = %node_id, %http_addr, "dispatcher serving");
    net::announce(ROLE, "ready", http_addr);
    let served = axum::serve(
        net::http_listener(listeners.http),
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
    cluster.leave().await;
    tracing::info!(node = %node_id, "dispatcher stopped");
    served.map_err(Into::into)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use axum::body::Body;
    use axum::extract::connect_info::MockConnectInfo;
    use axum::http::{Request, StatusCode, header};
    use pushgrid_proto::cluster::{ClusterState, NodeInfo};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    fn room(id: &str, port: u16, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role: Role::Room as i32,
            tcp_addr: format!("127.0.0.1:{port}"),
            labels: labels
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect::<HashMap<_, _>>(),
            ..Default::default()
        }
    }

    fn view(version: u64, nodes: Vec<NodeInfo>, balancer: Option<&str>) -> Arc<ClusterView> {
        let mut settings = HashMap::new();
        if let Some(balancer) = balancer {
            settings.insert(BALANCER_SETTING.to_string(), balancer.to_string());
        }
        Arc::new(ClusterView::from_state(ClusterState {
            version,
            nodes,
            settings,
            ..Default::default()
        }))
    }

    fn three_rooms() -> Vec<NodeInfo> {
        let mut with_ws = room(
            "room-c",
            9003,
            &[("region", "eu"), ("tls_addr", "push.example:443")],
        );
        with_ws.ws_addr = "127.0.0.1:9103".into();
        vec![
            room("room-a", 9001, &[("region", "eu"), ("net", "wifi")]),
            room("room-b", 9002, &[("region", "us")]),
            with_ws,
        ]
    }

    struct Harness {
        views: watch::Sender<Arc<ClusterView>>,
        state: Arc<Dispatch>,
        _shutdown: tokio_util::sync::DropGuard,
    }

    fn harness(config: DispatcherConfig, first: Arc<ClusterView>) -> Harness {
        let (views, receiver) = watch::channel(first);
        let shutdown = CancellationToken::new();
        let state = Dispatch::start(config, receiver, shutdown.clone()).unwrap();
        Harness {
            views,
            state,
            _shutdown: shutdown.drop_guard(),
        }
    }

    impl Harness {
        fn app(&self, peer: [u8; 4]) -> Router {
            router(self.state.clone(), "dispatcher-test")
                .layer(MockConnectInfo(SocketAddr::from((peer, 40_000))))
        }
    }

    async fn get(app: &Router, uri: &str) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let response = app
            .clone()
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, headers, body.to_vec())
    }

    async fn get_json(app: &Router, uri: &str) -> (StatusCode, Value) {
        let (status, _, body) = get(app, uri).await;
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn first_node(answer: &Value) -> String {
        answer["result"]["rooms"][0]["node"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn answers_rooms_of_the_region_with_only_the_addresses_they_publish() {
        let harness = harness(DispatcherConfig::default(), view(1, three_rooms(), None));
        let app = harness.app([10, 0, 0, 1]);
        let (status, answer) = get_json(&app, "/v1/dispatch?user=alice&region=EU").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let (_, headers, _) = get(&app, "/v1/dispatch?user=alice&region=EU").await;
        assert_eq!(
            headers["access-control-allow-origin"], "*",
            "web pages of any origin may read the answer"
        );
        let rooms = answer["result"]["rooms"].as_array().unwrap();
        let mut nodes: Vec<&str> = rooms
            .iter()
            .map(|room| room["node"].as_str().unwrap())
            .collect();
        nodes.sort();
        assert_eq!(nodes, ["room-a", "room-c"]);
        for room in rooms {
            let object = room.as_object().unwrap();
            if room["node"] == "room-c" {
                assert_eq!(room["tcp"], "127.0.0.1:9003");
                assert_eq!(room["ws"], "127.0.0.1:9103");
                assert_eq!(room["tls"], "push.example:443");
            } else {
                assert_eq!(room["tcp"], "127.0.0.1:9001");
                assert!(
                    !object.contains_key("ws") && !object.contains_key("tls"),
                    "{room}"
                );
            }
        }
        assert_eq!(answer["result"]["ttl_secs"], 60);
        assert_eq!(answer["result"]["region_fallback"], false);
        assert_eq!(answer["result"]["balancer"], "consistent_hash");
        // The SDK reads the same answer.
        let parsed = pushgrid_client_shape(&answer);
        assert_eq!(parsed, 2);
    }

    /// What the SDK requires of an answer: rooms with `node` and `tcp`.
    fn pushgrid_client_shape(answer: &Value) -> usize {
        answer["result"]["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|room| room["node"].is_string() && room["tcp"].is_string())
            .count()
    }

    #[tokio::test]
    async fn a_region_without_a_live_room_falls_back_to_another_region() {
        let harness = harness(DispatcherConfig::default(), view(1, three_rooms(), None));
        let app = harness.app([10, 0, 0, 1]);
        // A cellular device in eu: room-a is wifi only, room-c serves any net.
        let (_, answer) = get_json(&app, "/v1/dispatch?user=bob&region=eu&net=cellular").await;
        assert_eq!(first_node(&answer), "room-c");
        assert_eq!(answer["result"]["rooms"].as_array().unwrap().len(), 1);

        // Both eu rooms leave: the us data centre answers.
        let us_only = vec![room("room-b", 9002, &[("region", "us")])];
        harness.views.send_replace(view(2, us_only, None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (status, answer) = get_json(&app, "/v1/dispatch?user=bob&region=eu&net=wifi").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first_node(&answer), "room-b");
        assert_eq!(answer["result"]["region_fallback"], true);

        harness.views.send_replace(view(3, Vec::new(), None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (status, answer) = get_json(&app, "/v1/dispatch?user=bob").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer["error"]["code"], "no_room");
    }

    #[tokio::test]
    async fn a_reconnecting_device_gets_the_same_room_first() {
        let nodes: Vec<NodeInfo> = (0..5)
            .map(|index| room(&format!("room-{index}"), 9000 + index, &[]))
            .collect();
        let harness = harness(DispatcherConfig::default(), view(1, nodes.clone(), None));
        let app = harness.app([10, 0, 0, 1]);
        let mut firsts = HashMap::new();
        for user in 0..40 {
            let (_, answer) = get_json(&app, &format!("/v1/dispatch?user=u{user}")).await;
            firsts.insert(user, first_node(&answer));
        }
        assert!(
            firsts
                .values()
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 1
        );
        // A new view (say, a load change) keeps every device where it was.
        harness.views.send_replace(view(2, nodes, None));
        tokio::time::sleep(Duration::from_millis(20)).await;
        for user in 0..40 {
            let (_, answer) = get_json(&app, &format!("/v1/dispatch?user=u{user}")).await;
            assert_eq!(first_node(&answer), firsts[&user], "user u{user}");
        }
    }

    #[tokio::test]
    async fn bad_input_is_400_naming_the_field() {
        let harness = harness(DispatcherConfig::default(), view(1, three_rooms(), None));
        let app = harness.app([10, 0, 0, 1]);
        for (uri, field) in [
            ("/v1/dispatch", "user"),
            ("/v1/dispatch?user=", "user"),
            ("/v1/dispatch?user=a&net=lte", "net"),
            ("/v1/dispatch?user=a&region=eu%20west", "region"),
            ("/v1/dispatch?user=a&isp=%3Cscript%3E", "isp"),
        ] {
            let (status, answer) = get_json(&app, uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(answer["error"]["code"], "bad_request", "{uri}");
            let message = answer["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("{field}:")),
                "{uri}: {message}"
            );
        }
        let (status, answer) = get_json(&app, "/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(answer["error"]["code"], "not_found");
    }

    #[tokio::test]
    async fn the_keeper_setting_switches_the_balancer_at_runtime() {
        let nodes: Vec<NodeInfo> = (0..3)
            .map(|index| room(&format!("room-{index}"), 9000 + index, &[]))
            .collect();
        let harness = harness(DispatcherConfig::default(), view(1, nodes.clone(), None));
        let app = harness.app([10, 0, 0, 1]);
        let firsts =
            |answers: &[Value]| -> Vec<String> { answers.iter().map(first_node).collect() };
        let mut sticky = Vec::new();
        for _ in 0..6 {
            sticky.push(get_json(&app, "/v1/dispatch?user=carol").await.1);
        }
        assert!(
            firsts(&sticky)
                .iter()
                .all(|node| *node == first_node(&sticky[0]))
        );

        harness
            .views
            .send_replace(view(2, nodes.clone(), Some("round_robin")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut rotating = Vec::new();
        for _ in 0..6 {
            rotating.push(get_json(&app, "/v1/dispatch?user=carol").await.1);
        }
        assert_eq!(rotating[0]["result"]["balancer"], "round_robin");
        let nodes_seen: std::collections::HashSet<String> = firsts(&rotating).into_iter().collect();
        assert_eq!(nodes_seen.len(), 3, "round-robin visits every room");

        // An unknown name falls back to the configured balancer.
        harness.views.send_replace(view(3, nodes, Some("fastest")));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, answer) = get_json(&app, "/v1/dispatch?user=carol").await;
        assert_eq!(answer["result"]["balancer"], "consistent_hash");
    }

    #[tokio::test]
    async fn the_rate_limit_answers_429_with_retry_after_per_client_address() {
        let config = DispatcherConfig {
            rate_limit_per_sec: 1,
            rate_limit_burst: 3,
            ..Default::default()
        };
        let harness = harness(config, view(1, three_rooms(), None));
        let greedy = harness.app([10, 0, 0, 1]);
        for attempt in 0..3 {
            let (status, _, _) = get(&greedy, "/v1/dispatch?user=dave").await;
            assert_eq!(
                status,
                StatusCode::OK,
                "request {attempt} is within the burst"
            );
        }
        let (status, headers, body) = get(&greedy, "/v1/dispatch?user=dave").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = headers[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(retry_after, 1);
        let answer: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(answer["error"]["code"], "rate_limited");
        // Another address has its own quota.
        let other = harness.app([10, 0, 0, 2]);
        let (status, _, _) = get(&other, "/v1/dispatch?user=erin").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn every_answer_carries_a_request_id() {
        let harness = harness(DispatcherConfig::default(), view(1, three_rooms(), None));
        let app = harness.app([10, 0, 0, 1]);
        let (_, headers, _) = get(&app, "/v1/dispatch?user=frank").await;
        let made = headers["x-request-id"].to_str().unwrap();
        assert!(made.starts_with("dispatcher-test-"), "{made}");
        let (_, second, _) = get(&app, "/v1/dispatch?user=frank").await;
        assert_ne!(second["x-request-id"], headers["x-request-id"]);
        let response = app
            .clone()
            .oneshot(
                Request::get("/v1/dispatch?user=frank")
                    .header("x-request-id", "from-the-device-1")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "from-the-device-1");
    }

    /// The value of the one Prometheus sample of `name` with all `labels`.
    fn sample(rendered: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        rendered
            .lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .filter(|line| {
                labels
                    .iter()
                    .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
            })
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .next()
            .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn traffic_counters_count_requests_and_exact_body_bytes_per_route() {
        let prometheus = pushgrid_common::telemetry::metrics();
        let harness = harness(DispatcherConfig::default(), view(1, three_rooms(), None));
        let app = harness.app([10, 0, 0, 1]);
        let dispatch_labels = [("role", "dispatcher"), ("route", "/v1/dispatch")];
        let before = prometheus.render();
        let (_, _, first) = get(&app, "/v1/dispatch?user=gina").await;
        let (_, _, second) = get(&app, "/v1/dispatch?user=hank&net=wifi").await;
        let (_, _, missing) = get(&app, "/v1/dispatch?user=&secret=raw-user-input").await;
        let after = prometheus.render();
        let delta = |name: &str, labels: &[(&str, &str)]| {
            sample(&after, name, labels) - sample(&before, name, labels)
        };

        let ok = [dispatch_labels[0], dispatch_labels[1], ("status", "200")];
        let bad = [dispatch_labels[0], dispatch_labels[1], ("status", "400")];
        assert_eq!(delta("pushgrid_http_requests_total", &ok), 2.0);
        assert_eq!(delta("pushgrid_http_requests_total", &bad), 1.0);
        assert_eq!(
            delta("pushgrid_http_response_bytes_total", &dispatch_labels),
            (first.len() + second.len() + missing.len()) as f64
        );
        assert_eq!(
            delta("pushgrid_http_request_bytes_total", &dispatch_labels),
            0.0
        );
        assert!(
            after.contains("pushgrid_http_request_duration_seconds"),
            "{after}"
        );
        assert!(
            !after.contains("raw-user-input"),
            "user input never becomes a label"
        );

        // Request bytes: a route that reads a body of known size.
        let echo = Router::new()
            .route(
                "/echo/{name}",
                axum::routing::post(|body: axum::body::Bytes| async move { body }),
            )
            .layer(HttpStatsLayer::new("stats-test"));
        let before = prometheus.render();
        let payload = vec![b'x'; 12_345];
        let response = echo
            .oneshot(
                Request::post("/echo/anyone")
                    .body(Body::from(payload.clone()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let echoed = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(echoed.len(), payload.len());
        let after = prometheus.render();
        let echo_labels = [("role", "stats-test"), ("route", "/echo/{name}")];
        let delta =
            |name: &str| sample(&after, name, &echo_labels) - sample(&before, name, &echo_labels);
        assert_eq!(delta("pushgrid_http_request_bytes_total"), 12_345.0);
        assert_eq!(delta("pushgrid_http_response_bytes_total"), 12_345.0);
        assert_eq!(delta("pushgrid_http_requests_total"), 1.0);
    }
}
