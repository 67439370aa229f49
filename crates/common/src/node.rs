//! The start every role shares: load the cluster credentials, announce the
//! bound addresses, serve the admin port, register with keeper and report
//! healthy once the roles this one depends on are live.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use pushgrid_proto::cluster::{NodeInfo, Role};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::cluster::{Cluster, requires_roles};
use crate::config::NodeConfig;
use crate::{StartResult, net, now_ms, telemetry};

/// What a role exposes, besides its admin port.
#[derive(Debug, Default, Clone, Copy)]
pub struct Endpoints {
    pub grpc: Option<SocketAddr>,
    /// room: the device TCP listener.
    pub tcp: Option<SocketAddr>,
    /// room: the device WebSocket listener.
    pub ws: Option<SocketAddr>,
    /// center and dispatcher: the public HTTP listener.
    pub http: Option<SocketAddr>,
}

/// Announces `endpoints`, serves `/metrics` and `/healthz` on `admin` (healthy
/// once keeper lists a node of every role in `needs`), registers with keeper
/// and returns the joined cluster. The node id is `config.node_id` or
/// generated from `role_name`.
pub async fn start(
    role_name: &'static str,
    role: Role,
    config: &NodeConfig,
    admin: TcpListener,
    endpoints: Endpoints,
    needs: &'static [Role],
    shutdown: &CancellationToken,
) -> StartResult<Cluster> {
    start_with_admin_routes(
        role_name,
        role,
        config,
        admin,
        endpoints,
        needs,
        shutdown,
        axum::Router::new(),
    )
    .await
}

/// [`start`], with role-specific routes added to the admin port (e.g. the
/// room's `POST /admin/drain`).
#[allow(clippy::too_many_arguments)]
pub async fn start_with_admin_routes(
    role_name: &'static str,
    role: Role,
    config: &NodeConfig,
    admin: TcpListener,
    endpoints: Endpoints,
    needs: &'static [Role],
    shutdown: &CancellationToken,
    admin_routes: axum::Router,
) -> StartResult<Cluster> {
    // Before anything is served: a role without credentials does not start.
    let credentials = Credentials::for_node(role, &config.credentials_dir)?;
    credentials.spawn_reload(shutdown.clone());
    let admin_addr = admin.local_addr()?;
    let named = [
        ("grpc", endpoints.grpc),
        ("tcp", endpoints.tcp),
        ("ws", endpoints.ws),
        ("http", endpoints.http),
        ("admin", Some(admin_addr)),
    ];
    for (name, addr) in named {
        if let Some(addr) = addr {
            net::announce(role_name, name, addr);
        }
    }
    let joined = Arc::new(OnceLock::new());
    let health = requires_roles(joined.clone(), needs);
    tokio::spawn(telemetry::serve_admin_with_routes(
        admin,
        role_name,
        health,
        admin_routes,
        config.admin_token(),
        shutdown.clone(),
    ));

    let advertise = |addr: Option<SocketAddr>| {
        addr.map(|addr| net::advertised(addr, &config.advertise_host))
            .unwrap_or_default()
    };
    let node = NodeInfo {
        id: config.resolved_node_id(role_name),
        role: role as i32,
        grpc_addr: advertise(endpoints.grpc),
        admin_addr: advertise(Some(admin_addr)),
        tcp_addr: advertise(endpoints.tcp),
        ws_addr: advertise(endpoints.ws),
        http_addr: advertise(endpoints.http),
        started_ms: now_ms(),
        labels: config
            .labels
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        ..Default::default()
    };
    let cluster = Cluster::join(
        &config.keeper,
        node,
        config.lease_ttl_secs,
        credentials,
        shutdown.clone(),
    )
    .await?;
    let _ = joined.set(cluster.clone());
    Ok(cluster)
}

/// Serves a role's gRPC `routes` on `listener` until `shutdown`, and to
/// callers in this same process directly (see [`crate::rpc::PeerChannel`]).
/// Both ways every call passes the role's credential check first
/// ([`crate::auth::ClusterAuthLayer`], with the role of `credentials`): a
/// call without a valid role key, or from a role the permission table does
/// not list for its method, is refused before any handler runs.
pub async fn serve_grpc(
    routes: tonic::service::Routes,
    credentials: &Credentials,
    listener: TcpListener,
    shutdown: &CancellationToken,
) -> StartResult<()> {
    let bound = listener.local_addr()?;
    let check = credentials.server_layer(credentials.role());
    let _local = crate::rpc::serve_locally(
        net::advertised(bound, ""),
        tower::Layer::layer(&check, routes.clone()),
    );
    tonic::transport::Server::builder()
        .layer(check)
        .add_routes(routes)
        .serve_with_incoming_shutdown(grpc_incoming(listener), shutdown.clone().cancelled_owned())
        .await
        .map_err(Into::into)
}

/// The accepted connections of a gRPC listener, with TCP_NODELAY: without
/// it an answer written in two segments waits for the peer's delayed ACK
/// (40 ms on Linux), which capped routed pushes at a few hundred a second.
pub fn grpc_incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
