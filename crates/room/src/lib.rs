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

mod accept;
mod admission;
mod background;
mod conn;
mod drain;
mod error;
mod metrics;
mod ordering;
mod outbox;
mod peers;
mod service;
mod shard;
mod shard_handle;
mod topics;
mod transport;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, StartError, StartResult, net, now_ms, telemetry};
use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::room_server::RoomServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use error::RoomError;
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
async fn bind_devices(addr: &str, send_buffer: usize) -> StartResult<TcpListener> {
    let listener = net::bind(addr).await?;
    if send_buffer > 0 {
        socket2::SockRef::from(&listener)
            .set_send_buffer_size(send_buffer)
            .map_err(StartError::os(format!("{addr}: SO_SNDBUF {send_buffer}")))?;
    }
    Ok(listener)
}

async fn bind_optional(addr: &str, send_buffer: usize) -> StartResult<Option<TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    Ok(Some(bind_devices(addr, send_buffer).await?))
}

impl Listeners {
    pub async fn bind(config: &RoomConfig) -> StartResult<Listeners> {
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
    pub shards: shard_handle::Shards,
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
) -> StartResult<()> {
    // Metric handles cached by the connections must bind to the real recorder.
    telemetry::metrics();
    let tls = load_tls(&config, &listeners)?;
    let addresses = Addresses::of(&listeners)?;
    let endpoints = node::Endpoints {
        grpc: Some(addresses.grpc),
        tcp: Some(addresses.tcp),
        ws: addresses.ws,
        ..Default::default()
    };
    let mut config = config;
    label_for_dispatchers(&mut config, &addresses);
    // The node (lease, view, admin port) lives until the drain is over, not
    // just until the shutdown signal: a draining room stays routable.
    let node_stop = CancellationToken::new();
    let drain_asked = CancellationToken::new();
    let cluster = join_cluster(
        &config,
        listeners.admin,
        endpoints,
        &node_stop,
        &drain_asked,
    )
    .await;
    let room = match cluster.and_then(|cluster| start_room(config, cluster, tls)) {
        Ok(room) => room,
        Err(error) => {
            node_stop.cancel();
            return Err(error);
        }
    };
    let node_id = room.node_id.clone();
    spawn_background_tasks(&room);

    let stop_accepting = CancellationToken::new();
    let listening = [
        (Some(listeners.tcp), Transport::Tcp),
        (listeners.ws, Transport::Ws),
        (listeners.tls, Transport::Tls),
        (listeners.wss, Transport::Wss),
    ];
    let accepts = start_accepting(&room, listening, &stop_accepting);

    addresses.announce_serving(&node_id);
    let grpc_stop = CancellationToken::new();
    let mut served = serve_rpc(&room, listeners.grpc, &grpc_stop);
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
        return result.map_err(grpc_task_ended)?;
    }

    drain::drain(&room, stop_accepting, accepts).await;
    room.shards.stop().await;
    room.cluster.leave().await;
    grpc_stop.cancel();
    let served = served.await;
    room.background_stop.cancel();
    room.peers.flush().await;
    node_stop.cancel();
    tracing::info!(node = %node_id, "room stopped");
    served.map_err(grpc_task_ended)?
}

/// The gRPC server's task panicked or was cancelled (its message kept).
fn grpc_task_ended(error: tokio::task::JoinError) -> StartError {
    StartError::Stopped(format!("the room's gRPC server ({error})"))
}

/// The TLS certificate and key, when a TLS or WebSocket-over-TLS listener is
/// bound.
fn load_tls(config: &RoomConfig, listeners: &Listeners) -> StartResult<Option<transport::Tls>> {
    let tls = if listeners.tls.is_some() || listeners.wss.is_some() {
        Some(transport::Tls::load(
            &config.tls_cert_file,
            &config.tls_key_file,
        )?)
    } else {
        None
    };
    Ok(tls)
}

/// Starts the room's node (lease, view, admin port with `POST /admin/drain`,
/// which cancels `drain_asked`) under `node_stop`.
async fn join_cluster(
    config: &RoomConfig,
    admin: TcpListener,
    endpoints: node::Endpoints,
    node_stop: &CancellationToken,
    drain_asked: &CancellationToken,
) -> StartResult<Cluster> {
    const NEEDS: &[Role] = &[Role::Register, Role::Saver];
    let admin_routes = drain::drain_routes(drain_asked.clone(), config.node.admin_token());
    node::start_with_admin_routes(
        ROLE,
        Role::Room,
        &config.node,
        admin,
        endpoints,
        NEEDS,
        node_stop,
        admin_routes,
    )
    .await
}

/// Serves the room's gRPC service (center's deliveries and kicks) on `grpc`
/// until `grpc_stop`.
fn serve_rpc(
    room: &Arc<Room>,
    grpc: TcpListener,
    grpc_stop: &CancellationToken,
) -> tokio::task::JoinHandle<StartResult<()>> {
    let router =
        tonic::service::Routes::new(RoomServer::new(service::RoomService::new(room.clone())));
    let grpc_stop = grpc_stop.clone();
    let credentials = room.cluster.credentials().clone();
    tokio::spawn(async move { node::serve_grpc(router, &credentials, grpc, &grpc_stop).await })
}

/// The addresses the room's listeners are bound to.
struct Addresses {
    grpc: SocketAddr,
    tcp: SocketAddr,
    ws: Option<SocketAddr>,
    tls: Option<SocketAddr>,
    wss: Option<SocketAddr>,
}

impl Addresses {
    /// Logs and announces that the room serves.
    fn announce_serving(&self, node_id: &str) {
        let Addresses {
            grpc: grpc_addr,
            tcp: tcp_addr,
            ws: ws_addr,
            tls: tls_addr,
            wss: wss_addr,
        } = self;
        tracing::info!(node = %node_id, %tcp_addr, ?ws_addr, ?tls_addr, ?wss_addr, %grpc_addr, "room serving");
        net::announce(ROLE, "ready", *grpc_addr);
    }

    fn of(listeners: &Listeners) -> std::io::Result<Addresses> {
        let optional = |listener: &Option<TcpListener>| {
            listener.as_ref().map(TcpListener::local_addr).transpose()
        };
        Ok(Addresses {
            grpc: listeners.grpc.local_addr()?,
            tcp: listeners.tcp.local_addr()?,
            ws: optional(&listeners.ws)?,
            tls: optional(&listeners.tls)?,
            wss: optional(&listeners.wss)?,
        })
    }
}

/// The labels dispatchers read: the room's capacity (they weigh rooms by
/// capacity minus load) and its TLS addresses, which are announced too.
fn label_for_dispatchers(config: &mut RoomConfig, addresses: &Addresses) {
    let capacity = config.max_connections.to_string();
    let labels = &mut config.node.labels;
    labels.entry("capacity".into()).or_insert(capacity);
    for (name, addr) in [("tls", addresses.tls), ("wss", addresses.wss)] {
        if let Some(addr) = addr {
            net::announce(ROLE, name, addr);
            labels.insert(
                format!("{name}_addr"),
                net::advertised(addr, &config.node.advertise_host),
            );
        }
    }
}

/// The room's shared state, with its shard threads running.
fn start_room(
    config: RoomConfig,
    cluster: Cluster,
    tls: Option<transport::Tls>,
) -> StartResult<Arc<Room>> {
    let node_id = cluster.node_id().to_string();
    let (limits, errors) = admission::Limits::resolve(&config, Some(&cluster.view()));
    for error in errors {
        tracing::warn!(%error, "room limit ignored");
    }
    let io_threads = match config.io_threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        count => count,
    };
    let shards = shard_handle::Shards::new(io_threads)
        .map_err(StartError::os("cannot create the shard pollers"))?;
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
        node_id,
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
    shard::start(&room).map_err(StartError::os("cannot start the shard threads"))?;
    Ok(room)
}

/// The room's background tasks: the heartbeat sweeper, the sessions re-sent
/// to a changed register, the settings from keeper, idle topics forgotten.
fn spawn_background_tasks(room: &Arc<Room>) {
    tokio::spawn(conn::sweep_silent_connections(room.clone()));
    tokio::spawn(background::reflush_sessions_on_register_change(
        room.clone(),
    ));
    tokio::spawn(background::follow_settings(room.clone()));
    tokio::spawn(service::forget_idle_topics(room.clone()));
}

/// One accept loop per device listener, under the room's connection cap.
fn start_accepting(
    room: &Arc<Room>,
    listening: [(Option<TcpListener>, Transport); 4],
    stop_accepting: &CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let permits = Arc::new(Semaphore::new(room.config.max_connections));
    let mut accepts = Vec::new();
    for (listener, transport) in listening {
        if let Some(listener) = listener {
            accepts.push(tokio::spawn(accept::accept_loop(
                room.clone(),
                listener,
                transport,
                permits.clone(),
                stop_accepting.clone(),
            )));
        }
    }
    accepts
}
