//! room: holds the devices' long connections.
//!
//! A device connects over TCP, authenticates with a JWT signed by its app's
//! secret, and is reported to register; then its offline inbox is fetched
//! from saver and pushed. center delivers live messages through the `Room`
//! RPC; the device's ACKs go to saver in batches; UPSTREAM frames and
//! online/offline events go to coordinator.

mod conn;
mod peers;
mod service;
mod topics;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use futures::StreamExt;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net, now_ms};
use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::room_server::RoomServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

pub use conn::ConnHandle;

pub const ROLE: &str = "room";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Device TCP listener.
    pub tcp_listen: String,
    /// Interval at which devices must ping; 2.5 intervals of silence close the
    /// connection. Mobile networks favour minutes.
    pub heartbeat_secs: u32,
    /// A device must finish AUTH within this many seconds of connecting.
    pub auth_timeout_secs: u32,
    /// Body limit of a frame before AUTH succeeded.
    pub pre_auth_max_body: u32,
    /// Body limit of a frame after AUTH.
    pub max_body: u32,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Hard cap on open device connections.
    pub max_connections: usize,
    /// How long a draining room waits for connections to close on SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            node: NodeConfig::with_ports(7005, 9005),
            tcp_listen: "127.0.0.1:8090".into(),
            heartbeat_secs: 180,
            auth_timeout_secs: 10,
            pre_auth_max_body: pushgrid_wire::DEFAULT_PRE_AUTH_MAX_BODY,
            max_body: pushgrid_wire::DEFAULT_MAX_BODY,
            outbound_queue: 64,
            max_connections: 100_000,
            shutdown_grace_secs: 10,
        }
    }
}

impl RoleConfig for RoomConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    pub tcp: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &RoomConfig) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
            tcp: net::bind(&config.tcp_listen).await?,
        })
    }
}

/// State shared by the accept loop, the connections and the RPC service.
pub(crate) struct Room {
    pub config: RoomConfig,
    pub node_id: String,
    pub cluster: Cluster,
    pub conns: DashMap<u64, Arc<ConnHandle>>,
    /// Reasons of kicks asked for by RPC, until the connection sends them.
    pub kick_reasons: DashMap<u64, String>,
    pub topics: topics::Topics,
    pub peers: peers::Peers,
    pub shutdown: CancellationToken,
    next_conn_id: std::sync::atomic::AtomicU64,
}

impl Room {
    fn next_conn_id(&self) -> u64 {
        self.next_conn_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs a room until `shutdown`, then drains its connections.
pub async fn run(
    config: RoomConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let tcp_addr = listeners.tcp.local_addr()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        tcp: Some(tcp_addr),
        ..Default::default()
    };
    const NEEDS: &[Role] = &[Role::Register, Role::Saver];
    // The dispatcher weighs rooms by free capacity: capacity minus load.
    let mut config = config;
    let capacity = config.max_connections.to_string();
    config
        .node
        .labels
        .entry("capacity".into())
        .or_insert(capacity);
    let cluster = node::start(
        ROLE,
        Role::Room,
        &config.node,
        listeners.admin,
        endpoints,
        NEEDS,
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    // Connections are stopped by their own token, after the RPC server and the
    // accept loop: in-flight deliveries still reach devices while draining.
    let connections_stop = CancellationToken::new();
    let room = Arc::new(Room {
        peers: peers::Peers::new(cluster.clone()),
        config,
        node_id: node_id.clone(),
        cluster,
        conns: DashMap::new(),
        kick_reasons: DashMap::new(),
        topics: topics::Topics::default(),
        shutdown: connections_stop.clone(),
        // Connection ids start from the clock: a room that restarts under the
        // same node id never reuses an id an old session still carries.
        next_conn_id: std::sync::atomic::AtomicU64::new(now_ms() << 10),
    });
    let tracker = TaskTracker::new();
    tokio::spawn(conn::sweep_silent_connections(room.clone()));
    tokio::spawn(reflush_sessions_on_register_change(room.clone()));
    let accept = tokio::spawn(accept_loop(
        room.clone(),
        listeners.tcp,
        tracker.clone(),
        shutdown.clone(),
    ));

    tracing::info!(node = %node_id, %tcp_addr, %grpc_addr, "room serving");
    net::announce(ROLE, "ready", grpc_addr);
    let router =
        Server::builder().add_service(RoomServer::new(service::RoomService::new(room.clone())));
    let served = node::serve_grpc(router, listeners.grpc, &shutdown).await;

    // Drain: leave the cluster so nothing new is routed here, stop accepting,
    // tell every device to reconnect elsewhere, wait for them under a grace.
    room.cluster.leave().await;
    let _ = accept.await;
    connections_stop.cancel();
    tracker.close();
    let grace = Duration::from_secs(room.config.shutdown_grace_secs);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            left = room.conns.len(),
            "connections still open after the grace period"
        );
    }
    room.peers.flush().await;
    tracing::info!(node = %node_id, "room stopped");
    served
}

async fn accept_loop(
    room: Arc<Room>,
    listener: TcpListener,
    tracker: TaskTracker,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(room.config.max_connections));
    let mut backoff = Duration::from_millis(5);
    loop {
        // Take the permit before accepting: a full room leaves new devices in
        // the kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                metrics::counter!("pushgrid_room_accepted_total").increment(1);
                let room = room.clone();
                tracker.spawn(async move {
                    conn::serve(room, stream, peer).await;
                    drop(permit);
                });
            }
            Err(error) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                metrics::counter!("pushgrid_room_accept_errors_total").increment(1);
                tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Re-sends every session of this room when the set of register instances
/// changes: a register that restarted (new epoch) has lost its table, and a
/// register that joined or left moves users between instances. Sessions go in
/// batches through the same Online batchers as new logins.
async fn reflush_sessions_on_register_change(room: Arc<Room>) {
    let signature = |view: &pushgrid_common::cluster::ClusterView| -> Vec<(String, u64)> {
        view.nodes_of(Role::Register)
            .map(|node| (node.id.clone(), node.started_ms))
            .collect()
    };
    let mut views = room.cluster.subscribe();
    let mut known = signature(&views.borrow_and_update());
    loop {
        tokio::select! {
            _ = room.shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        let current = signature(&views.borrow_and_update());
        if current == known || current.is_empty() {
            continue;
        }
        known = current;
        let sessions: Vec<pushgrid_proto::cluster::Session> = room
            .conns
            .iter()
            .map(|entry| conn::session_of(&room, entry.value()))
            .collect();
        let started = tokio::time::Instant::now();
        let total = sessions.len();
        let failed = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(sessions)
            .for_each_concurrent(1024, |session| {
                let (room, failed) = (&room, &failed);
                async move {
                    // A connection that closed meanwhile must not come back.
                    if !room.conns.contains_key(&session.conn_id) {
                        return;
                    }
                    if room.peers.online(session).await.is_err() {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        let failed = failed.into_inner();
        metrics::counter!("pushgrid_room_sessions_reflushed_total").increment(total as u64);
        tracing::info!(
            sessions = total,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sessions re-sent to register"
        );
    }
}
