//! room: holds the devices' long connections.
//!
//! A device connects over TCP, TLS, WebSocket or WebSocket over TLS,
//! authenticates with a JWT signed by its app's secret, and is reported to
//! register; then its offline inbox is fetched from saver and pushed. center
//! delivers live messages through the `Room` RPC; the device's ACKs go to
//! saver in batches; UPSTREAM frames and online/offline events go to
//! coordinator.
//!
//! Drain (SIGTERM, or `POST /admin/drain` on the admin port): stop accepting,
//! send every device KICK with a reconnect delay spread over the drain window
//! and another live room to go to, wait until every connection closed or
//! `shutdown_grace_secs` passed, deregister from keeper, stop.

mod admission;
mod conn;
mod metrics;
mod ordering;
mod outbox;
mod peers;
mod push_tokens;
mod service;
mod shard;
mod topics;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use dashmap::DashMap;
use futures::StreamExt;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net, now_ms, telemetry};
use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::room_server::RoomServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use outbox::ConnHandle;
use transport::Transport;

pub const ROLE: &str = "room";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Device TCP listener.
    pub tcp_listen: String,
    /// Device WebSocket listener (frames in binary messages); empty: none.
    pub ws_listen: String,
    /// Device TLS listener (the TCP protocol inside TLS); empty: none.
    pub tls_listen: String,
    /// Device WebSocket-over-TLS listener; empty: none.
    pub wss_listen: String,
    /// PEM certificate chain for `tls_listen` and `wss_listen`.
    pub tls_cert_file: String,
    /// PEM private key for `tls_listen` and `wss_listen`.
    pub tls_key_file: String,
    /// Interval at which devices must ping; 2.5 intervals of silence close the
    /// connection. Mobile networks favour minutes.
    pub heartbeat_secs: u32,
    /// A device must finish the handshake and AUTH within this many seconds
    /// of connecting (keeper setting `room.auth_timeout_secs` overrides).
    pub auth_timeout_secs: u32,
    /// Body limit of a frame before AUTH succeeded (`room.pre_auth_max_body`).
    pub pre_auth_max_body: u32,
    /// Body limit of a frame after AUTH (`room.max_body`).
    pub max_body: u32,
    /// Frames queued for one connection before it counts as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes queued for one connection before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Hard cap on open device connections.
    pub max_connections: usize,
    /// Open connections per source address, 0 for no cap
    /// (`room.max_conns_per_ip`).
    pub max_conns_per_ip: u32,
    /// New connections per second per source address, 0 for no limit
    /// (`room.connect_rate_per_ip`).
    pub connect_rate_per_ip: u32,
    /// When not empty, only these networks may connect (`room.allow_cidrs`).
    pub allow_cidrs: Vec<String>,
    /// These networks may not connect (`room.deny_cidrs`).
    pub deny_cidrs: Vec<String>,
    /// Drained devices are told to reconnect at a random moment within this
    /// window (`room.drain_window_secs`).
    pub drain_window_secs: u32,
    /// How long a drain waits for connections to close.
    pub shutdown_grace_secs: u64,
    /// Clock difference allowed for a device token's `exp`, `nbf` and `iat`.
    pub token_clock_skew_secs: u64,
    /// Longest device token lifetime (`exp - iat`, or `exp - now` without
    /// `iat`); longer-lived tokens are refused.
    pub token_max_lifetime_secs: u64,
    /// Shard threads serving authenticated plain TCP connections (reads,
    /// writes, heartbeats); 0: one per CPU.
    pub io_threads: usize,
    /// SO_SNDBUF of every device socket (the kernel doubles it); 0: the
    /// kernel's autotuning, which lets one device that stops reading hold up
    /// to `net.ipv4.tcp_wmem` (4 MiB here) of kernel memory before the room
    /// sees its queue fill. Bounded, a stalled device shows up in its
    /// outbound queue and is kicked as a slow consumer.
    pub tcp_send_buffer: usize,
    /// Broadcast order: a topic's message that arrives ahead of a missing
    /// offset is held this long for it, then the missing offset is fetched
    /// from saver's stream (see `ordering.rs` and docs/api.md).
    pub broadcast_gap_wait_ms: u64,
    /// Broadcast order: this long after an offset went missing the room
    /// stops trying to fetch it and sends what it held; devices see the gap.
    pub broadcast_gap_give_up_ms: u64,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            node: NodeConfig::with_ports(7005, 9005),
            tcp_listen: "127.0.0.1:8090".into(),
            ws_listen: String::new(),
            tls_listen: String::new(),
            wss_listen: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            heartbeat_secs: 180,
            auth_timeout_secs: 10,
            pre_auth_max_body: pushgrid_wire::DEFAULT_PRE_AUTH_MAX_BODY,
            max_body: pushgrid_wire::DEFAULT_MAX_BODY,
            outbound_queue: 64,
            outbound_queue_bytes: 1 << 20,
            max_connections: 100_000,
            max_conns_per_ip: 0,
            connect_rate_per_ip: 0,
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            drain_window_secs: 10,
            shutdown_grace_secs: 15,
            token_clock_skew_secs: 60,
            token_max_lifetime_secs: 30 * 24 * 3600,
            io_threads: 0,
            tcp_send_buffer: 64 * 1024,
            broadcast_gap_wait_ms: 100,
            broadcast_gap_give_up_ms: 5000,
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
    pub ws: Option<TcpListener>,
    pub tls: Option<TcpListener>,
    pub wss: Option<TcpListener>,
}

/// A device listener; accepted sockets inherit its send buffer size.
async fn bind_devices(addr: &str, send_buffer: usize) -> anyhow::Result<TcpListener> {
    let listener = net::bind(addr).await?;
    if send_buffer > 0 {
        socket2::SockRef::from(&listener)
            .set_send_buffer_size(send_buffer)
            .map_err(|error| anyhow::anyhow!("{addr}: SO_SNDBUF {send_buffer}: {error}"))?;
    }
    Ok(listener)
}

async fn bind_optional(addr: &str, send_buffer: usize) -> anyhow::Result<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(bind_devices(addr, send_buffer).await?))
}

impl Listeners {
    pub async fn bind(config: &RoomConfig) -> anyhow::Result<Listeners> {
        let send_buffer = config.tcp_send_buffer;
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
            tcp: bind_devices(&config.tcp_listen, send_buffer).await?,
            ws: bind_optional(&config.ws_listen, send_buffer).await?,
            tls: bind_optional(&config.tls_listen, send_buffer).await?,
            wss: bind_optional(&config.wss_listen, send_buffer).await?,
        })
    }
}

/// State shared by the accept loops, the connections and the RPC service.
pub(crate) struct Room {
    pub config: RoomConfig,
    pub node_id: String,
    pub cluster: Cluster,
    pub conns: DashMap<u64, Arc<ConnHandle>>,
    /// Reasons of kicks asked for by RPC, until the connection sends them.
    pub kick_reasons: DashMap<u64, String>,
    pub topics: topics::Topics,
    /// Each topic's broadcast order (see `ordering.rs`).
    pub orders: ordering::Orders,
    pub order_config: ordering::OrderConfig,
    pub peers: peers::Peers,
    pub admission: Arc<admission::Admission>,
    pub queue_limits: outbox::QueueLimits,
    pub names: conn::Interner,
    pub tls: Option<transport::Tls>,
    /// The threads that serve authenticated plain TCP connections.
    pub shards: shard::Shards,
    /// Tasks a drain waits for: connections being opened or closed, replays.
    pub tracker: TaskTracker,
    /// Stops the room's background tasks (sweeper, re-flush, settings).
    pub background_stop: CancellationToken,
    draining: AtomicBool,
    next_conn_id: AtomicU64,
}

impl Room {
    fn next_conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Another live room for a drained device, on the device's transport
    /// when that room has it (else its TCP address); empty when this room is
    /// the only one. Devices spread over the other rooms by connection id.
    pub fn reconnect_target(&self, conn: &ConnHandle) -> String {
        let view = self.cluster.view();
        let others: Vec<_> = view
            .nodes_of(Role::Room)
            .filter(|node| node.id != self.node_id && !node.tcp_addr.is_empty())
            .collect();
        if others.is_empty() {
            return String::new();
        }
        let room = others[(conn.id % others.len() as u64) as usize];
        let label = |name: &str| room.labels.get(name).filter(|value| !value.is_empty());
        let same_transport = match conn.transport {
            Transport::Tcp => None,
            Transport::Ws => Some(&room.ws_addr).filter(|addr| !addr.is_empty()),
            Transport::Tls => label("tls_addr"),
            Transport::Wss => label("wss_addr"),
        };
        same_transport.unwrap_or(&room.tcp_addr).clone()
    }
}

/// Runs a room until `shutdown` (or an admin drain), then drains it.
pub async fn run(
    config: RoomConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Metric handles cached by the connections must bind to the real recorder.
    telemetry::metrics();
    let tls = if listeners.tls.is_some() || listeners.wss.is_some() {
        Some(transport::Tls::load(
            &config.tls_cert_file,
            &config.tls_key_file,
        )?)
    } else {
        None
    };
    let grpc_addr = listeners.grpc.local_addr()?;
    let tcp_addr = listeners.tcp.local_addr()?;
    let ws_addr = listeners
        .ws
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let tls_addr = listeners
        .tls
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let wss_addr = listeners
        .wss
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        tcp: Some(tcp_addr),
        ws: ws_addr,
        ..Default::default()
    };
    const NEEDS: &[Role] = &[Role::Register, Role::Saver];
    let mut config = config;
    // The dispatcher weighs rooms by free capacity: capacity minus load, and
    // hands out the TLS addresses it finds in labels.
    let capacity = config.max_connections.to_string();
    let labels = &mut config.node.labels;
    labels.entry("capacity".into()).or_insert(capacity);
    for (name, addr) in [("tls", tls_addr), ("wss", wss_addr)] {
        if let Some(addr) = addr {
            net::announce(ROLE, name, addr);
            labels.insert(
                format!("{name}_addr"),
                net::advertised(addr, &config.node.advertise_host),
            );
        }
    }
    // The node (lease, view, admin port) lives until the drain is over, not
    // just until the shutdown signal: a draining room stays routable.
    let node_stop = CancellationToken::new();
    let drain_asked = CancellationToken::new();
    let admin_routes = drain_routes(drain_asked.clone(), config.node.admin_token());
    let cluster = node::start_with_admin_routes(
        ROLE,
        Role::Room,
        &config.node,
        listeners.admin,
        endpoints,
        NEEDS,
        &node_stop,
        admin_routes,
    )
    .await;
    let cluster = match cluster {
        Ok(cluster) => cluster,
        Err(error) => {
            node_stop.cancel();
            return Err(error);
        }
    };
    let node_id = cluster.node_id().to_string();
    let (limits, errors) = admission::Limits::resolve(&config, Some(&cluster.view()));
    for error in errors {
        tracing::warn!(%error, "room limit ignored");
    }
    let io_threads = match config.io_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        count => count,
    };
    let shards = match shard::Shards::new(io_threads) {
        Ok(shards) => shards,
        Err(error) => {
            node_stop.cancel();
            return Err(anyhow::Error::from(error).context("cannot create the shard pollers"));
        }
    };
    let room = Arc::new(Room {
        peers: peers::Peers::new(cluster.clone()),
        admission: Arc::new(admission::Admission::new(limits)),
        shards,
        tracker: TaskTracker::new(),
        queue_limits: outbox::QueueLimits {
            frames: config.outbound_queue.max(1),
            bytes: config.outbound_queue_bytes.max(1),
        },
        names: conn::Interner::default(),
        tls,
        orders: ordering::Orders::default(),
        order_config: ordering::OrderConfig {
            gap_wait: Duration::from_millis(config.broadcast_gap_wait_ms.max(1)),
            give_up: Duration::from_millis(
                config
                    .broadcast_gap_give_up_ms
                    .max(config.broadcast_gap_wait_ms.max(1)),
            ),
        },
        config,
        node_id: node_id.clone(),
        cluster,
        conns: DashMap::new(),
        kick_reasons: DashMap::new(),
        topics: topics::Topics::default(),
        background_stop: CancellationToken::new(),
        draining: AtomicBool::new(false),
        // Connection ids start from the clock: a room that restarts under the
        // same node id never reuses an id an old session still carries.
        next_conn_id: AtomicU64::new(now_ms() << 10),
    });
    if let Err(error) = shard::Shards::start(&room) {
        node_stop.cancel();
        return Err(anyhow::Error::from(error).context("cannot start the shard threads"));
    }
    tokio::spawn(conn::sweep_silent_connections(room.clone()));
    tokio::spawn(reflush_sessions_on_register_change(room.clone()));
    tokio::spawn(follow_settings(room.clone()));
    tokio::spawn(service::forget_idle_topics(room.clone()));

    let stop_accepting = CancellationToken::new();
    let permits = Arc::new(Semaphore::new(room.config.max_connections));
    let mut accepts = Vec::new();
    let listening = [
        (Some(listeners.tcp), Transport::Tcp),
        (listeners.ws, Transport::Ws),
        (listeners.tls, Transport::Tls),
        (listeners.wss, Transport::Wss),
    ];
    for (listener, transport) in listening {
        if let Some(listener) = listener {
            accepts.push(tokio::spawn(accept_loop(
                room.clone(),
                listener,
                transport,
                permits.clone(),
                stop_accepting.clone(),
            )));
        }
    }

    tracing::info!(node = %node_id, %tcp_addr, ?ws_addr, ?tls_addr, ?wss_addr, %grpc_addr, "room serving");
    net::announce(ROLE, "ready", grpc_addr);
    let router =
        tonic::service::Routes::new(RoomServer::new(service::RoomService::new(room.clone())));
    let grpc_stop = CancellationToken::new();
    let mut served = {
        let grpc_stop = grpc_stop.clone();
        let credentials = room.cluster.credentials().clone();
        tokio::spawn(async move {
            node::serve_grpc(router, &credentials, listeners.grpc, &grpc_stop).await
        })
    };
    let early_end = tokio::select! {
        _ = shutdown.cancelled() => None,
        _ = drain_asked.cancelled() => None,
        result = &mut served => Some(result),
    };
    if let Some(result) = early_end {
        // The RPC server failed: nothing can reach this room's devices.
        stop_accepting.cancel();
        room.background_stop.cancel();
        room.shards.stop().await;
        node_stop.cancel();
        return result.map_err(anyhow::Error::from)?;
    }

    drain(&room, stop_accepting, accepts).await;
    room.shards.stop().await;
    room.cluster.leave().await;
    grpc_stop.cancel();
    let served = served.await;
    room.background_stop.cancel();
    room.peers.flush().await;
    node_stop.cancel();
    tracing::info!(node = %node_id, "room stopped");
    served.map_err(anyhow::Error::from)?
}

/// Stops accepting, sends every device on (KICK with a reconnect delay and
/// another room), and waits for the connections to close under the grace.
async fn drain(
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
fn drain_routes(drain_asked: CancellationToken, admin_token: Option<String>) -> axum::Router {
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

async fn accept_loop(
    room: Arc<Room>,
    listener: TcpListener,
    transport: Transport,
    permits: Arc<Semaphore>,
    stop: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(5);
    let mut backoff = FIRST_BACKOFF;
    loop {
        // Take the permit before accepting: a full room leaves new devices in
        // the kernel's backlog instead of accepting and dropping them.
        let permit = tokio::select! {
            _ = stop.cancelled() => return,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = FIRST_BACKOFF;
                ::metrics::counter!("pushgrid_room_accepted_total", "transport" => transport.as_str())
                    .increment(1);
                room.tracker
                    .spawn(conn::serve(room.clone(), stream, peer, transport, permit));
            }
            Err(error) => {
                // EMFILE/ENFILE (out of file descriptors) and friends: the
                // pending connection stays in the backlog and accept would
                // fail again at once, so back off instead of spinning.
                drop(permit);
                let kind = match error.raw_os_error() {
                    Some(code) if code == 24 || code == 23 => "out_of_files",
                    _ => "other",
                };
                ::metrics::counter!("pushgrid_room_accept_errors_total", "kind" => kind)
                    .increment(1);
                tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Puts keeper's `room.*` settings in force whenever the cluster view changes.
async fn follow_settings(room: Arc<Room>) {
    let mut views = room.cluster.subscribe();
    loop {
        tokio::select! {
            _ = room.background_stop.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return },
        }
        let view = views.borrow_and_update().clone();
        let (limits, errors) = admission::Limits::resolve(&room.config, Some(&view));
        for error in errors {
            tracing::warn!(%error, "room limit ignored");
        }
        let summary = format!("{limits:?}");
        if room.admission.update(limits) {
            tracing::info!(limits = %summary, "room limits changed");
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
            _ = room.background_stop.cancelled() => return,
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
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .await;
        let failed = failed.into_inner();
        ::metrics::counter!("pushgrid_room_sessions_reflushed_total").increment(total as u64);
        tracing::info!(
            sessions = total,
            failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sessions re-sent to register"
        );
    }
}
