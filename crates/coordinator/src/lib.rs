//! coordinator: carries device traffic to application backends.
//!
//! * UPSTREAM frames: POSTed as JSON to the app's webhook; the device gets
//!   UPSTREAM_OK once the webhook answered 2xx, else an ERROR frame.
//! * Online/offline events: collected per app and POSTed in batches, so a
//!   reconnect storm becomes a few requests, not one per device.

use std::collections::HashMap;
use std::time::Duration;

use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::rpc::ChannelPool;
use pushgrid_common::{CancellationToken, net};
use pushgrid_proto::cluster::coordinator_server::{Coordinator, CoordinatorServer};
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::{
    KickRequest, KickResponse, LookupRequest, Role, RoomKickRequest, Session, StateBatch,
    StateBatchResponse, StateEvent, UpstreamRequest, UpstreamResponse, UserKey,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

mod error;
mod upstream;

pub use error::CoordinatorError;

pub const ROLE: &str = "coordinator";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Time limit of one webhook attempt (upstream routes carry their own).
    pub webhook_timeout_ms: u64,
    /// Retries of a failed upstream webhook request.
    pub webhook_retries: u32,
    /// Upstream webhook requests in flight per app.
    pub webhook_concurrency: u32,
    /// State events held for sending before new ones are dropped (and counted).
    pub state_queue: usize,
    /// Most state events in one webhook request.
    pub state_batch_max: usize,
    /// How long state events are collected before a batch is sent.
    pub state_flush_ms: u64,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            node: NodeConfig::with_ports(7003, 9003),
            webhook_timeout_ms: 5000,
            webhook_retries: 2,
            webhook_concurrency: 64,
            state_queue: 100_000,
            state_batch_max: 1000,
            state_flush_ms: 200,
        }
    }
}

impl RoleConfig for CoordinatorConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &CoordinatorConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
        })
    }
}

struct CoordinatorService {
    config: CoordinatorConfig,
    cluster: Cluster,
    upstreams: upstream::Upstreams,
    states: mpsc::Sender<StateEvent>,
    channels: ChannelPool,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn state_changes(
        &self,
        request: Request<StateBatch>,
    ) -> Result<Response<StateBatchResponse>, Status> {
        for event in request.into_inner().events {
            if self.states.try_send(event).is_err() {
                metrics::counter!("pushgrid_coordinator_state_events_dropped_total").increment(1);
            }
        }
        Ok(Response::new(StateBatchResponse {}))
    }

    async fn upstream(
        &self,
        request: Request<UpstreamRequest>,
    ) -> Result<Response<UpstreamResponse>, Status> {
        let upstream = request.into_inner();
        let target = upstream::target(&self.cluster.view(), &self.config, &upstream)?;
        self.upstreams.send(&target, &upstream).await?;
        Ok(Response::new(UpstreamResponse {}))
    }

    async fn kick(&self, request: Request<KickRequest>) -> Result<Response<KickResponse>, Status> {
        let kicked = self.kick_sessions(request.into_inner()).await?;
        metrics::counter!("pushgrid_coordinator_kicked_total").increment(u64::from(kicked));
        Ok(Response::new(KickResponse { kicked }))
    }
}

impl CoordinatorService {
    /// Closes the user's sessions that `kick` names (and that began before
    /// it); returns how many the rooms closed.
    async fn kick_sessions(&self, kick: KickRequest) -> Result<u32, CoordinatorError> {
        if kick.app.is_empty() || kick.user.is_empty() {
            return Err(CoordinatorError::MissingField("app and user are required"));
        }
        let view = self.cluster.view();
        let register = view
            .register_for(&kick.app, &kick.user)
            .ok_or(CoordinatorError::NoRegister)?;
        let lookup = LookupRequest {
            users: vec![UserKey {
                app: kick.app.clone(),
                user: kick.user.clone(),
            }],
        };
        let sessions = RegisterClient::new(self.channels.get(&register.grpc_addr)?)
            .lookup(lookup)
            .await?
            .into_inner()
            .sessions;
        let mut by_room: HashMap<String, Vec<u64>> = HashMap::new();
        for session in sessions {
            let wanted = (kick.device.is_empty() || session.device == kick.device)
                && (kick.platform.is_empty() || session.platform == kick.platform);
            if wanted && began_before(&session, &kick) {
                by_room
                    .entry(session.room)
                    .or_default()
                    .push(session.conn_id);
            }
        }
        let mut kicked = 0;
        for (room, conn_ids) in by_room {
            let Some(node) = view.node(&room) else {
                continue;
            };
            let request = RoomKickRequest {
                conn_ids,
                code: kick.code,
                reason: kick.reason.clone(),
            };
            match RoomClient::new(self.channels.get(&node.grpc_addr)?)
                .kick(request)
                .await
            {
                Ok(response) => kicked += response.into_inner().kicked,
                Err(status) => {
                    tracing::warn!(%room, error = %status.message(), "kick not delivered to room")
                }
            }
        }
        Ok(kicked)
    }
}

/// Whether `session` is older than the login that asked for `kick` (always,
/// for a kick without a login: `since_ms` 0). The login itself is spared;
/// two logins of the same millisecond are ordered by (room, conn_id), so of
/// two kicks that cross, exactly one closes the other.
fn began_before(session: &Session, kick: &KickRequest) -> bool {
    let own = session.room == kick.except_room && session.conn_id == kick.except_conn_id;
    if own {
        return false;
    }
    if kick.since_ms == 0 {
        return true;
    }
    (session.since_ms, session.room.as_str(), session.conn_id)
        < (
            kick.since_ms,
            kick.except_room.as_str(),
            kick.except_conn_id,
        )
}

/// Collects state events and POSTs them per app in batches.
async fn send_state_events(
    cluster: Cluster,
    http: reqwest::Client,
    mut events: mpsc::Receiver<StateEvent>,
    config: CoordinatorConfig,
) {
    let flush_every = Duration::from_millis(config.state_flush_ms.max(1));
    let mut batch: Vec<StateEvent> = Vec::new();
    loop {
        let Some(first) = events.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + flush_every;
        while batch.len() < config.state_batch_max {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(event)) => batch.push(event),
                _ => break,
            }
        }
        let mut by_app: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for event in batch.drain(..) {
            let Some(session) = event.session else {
                continue;
            };
            by_app.entry(session.app.clone()).or_default().push(json!({
                "user": session.user,
                "device": session.device,
                "platform": session.platform,
                "online": event.online,
                "at_ms": event.at_ms,
                "room": session.room,
                "conn_id": session.conn_id.to_string(),
            }));
        }
        let view = cluster.view();
        for (app_id, app_events) in by_app {
            let Some(app) = view.app(&app_id) else {
                continue;
            };
            if app.webhook_url.is_empty() {
                continue;
            }
            let count = app_events.len() as u64;
            let body = json!({ "event": "state", "app": app_id, "events": app_events });
            let timeout = Duration::from_millis(config.webhook_timeout_ms.max(1));
            match http
                .post(&app.webhook_url)
                .timeout(timeout)
                .json(&body)
                .send()
                .await
            {
                Ok(response) if response.status().is_success() => {
                    metrics::counter!("pushgrid_coordinator_state_events_sent_total")
                        .increment(count);
                }
                Ok(response) => {
                    metrics::counter!("pushgrid_coordinator_state_events_failed_total")
                        .increment(count);
                    tracing::warn!(app = %app_id, status = %response.status(), "state webhook refused events");
                }
                Err(error) => {
                    metrics::counter!("pushgrid_coordinator_state_events_failed_total")
                        .increment(count);
                    tracing::warn!(app = %app_id, %error, "state webhook failed");
                }
            }
        }
    }
}

/// Runs coordinator until `shutdown`.
pub async fn run(
    config: CoordinatorConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        ..Default::default()
    };
    let cluster = node::start(
        ROLE,
        Role::Coordinator,
        &config.node,
        listeners.admin,
        endpoints,
        &[],
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    // Timeouts are per request: upstream routes carry their own.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|error| {
            pushgrid_common::StartError::Tls(format!("cannot build the HTTP client: {error}"))
        })?;
    let (states, state_receiver) = mpsc::channel(config.state_queue.max(1));
    tokio::spawn(send_state_events(
        cluster.clone(),
        http.clone(),
        state_receiver,
        config.clone(),
    ));

    tracing::info!(node = %node_id, %grpc_addr, "coordinator serving");
    net::announce(ROLE, "ready", grpc_addr);
    let service = CoordinatorService {
        config: config.clone(),
        cluster: cluster.clone(),
        upstreams: upstream::Upstreams::new(http.clone()),
        states,
        channels: ChannelPool::new(2, cluster.credentials()),
    };
    let router = tonic::service::Routes::new(CoordinatorServer::new(service));
    let served = node::serve_grpc(router, cluster.credentials(), listeners.grpc, &shutdown).await;
    cluster.leave().await;
    tracing::info!(node = %node_id, "coordinator stopped");
    served
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(room: &str, conn_id: u64, since_ms: u64) -> Session {
        Session {
            room: room.into(),
            conn_id,
            since_ms,
            ..Default::default()
        }
    }

    fn login_kick(room: &str, conn_id: u64, since_ms: u64) -> KickRequest {
        KickRequest {
            except_room: room.into(),
            except_conn_id: conn_id,
            since_ms,
            ..Default::default()
        }
    }

    #[test]
    fn a_login_kicks_only_older_sessions_and_never_itself() {
        let kick = login_kick("room-b", 7, 1_000);
        assert!(began_before(&session("room-a", 1, 999), &kick));
        assert!(!began_before(&session("room-b", 7, 1_000), &kick));
        // A newer login than the one whose kick arrived late stays.
        assert!(!began_before(&session("room-a", 2, 1_001), &kick));
    }

    #[test]
    fn two_logins_of_one_millisecond_close_exactly_one() {
        let a = session("room-a", 5, 1_000);
        let b = session("room-b", 3, 1_000);
        let kick_a = login_kick("room-a", 5, 1_000);
        let kick_b = login_kick("room-b", 3, 1_000);
        assert_ne!(began_before(&b, &kick_a), began_before(&a, &kick_b));
    }

    #[test]
    fn a_kick_without_a_login_closes_every_session() {
        let kick = KickRequest::default();
        assert!(began_before(&session("room-a", 1, u64::MAX), &kick));
    }
}
