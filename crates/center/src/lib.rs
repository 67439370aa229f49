//! center: the public HTTP push API for application backends.
//!
//! `POST /api/push` stores one message per user in saver first, hands them
//! to routing (register lookup, room delivery) and answers with their ids
//! after the first routing attempt. A bounded number of pushes may be stored
//! or routed at once; beyond it the API answers 503 with Retry-After before
//! anything is stored, so memory never grows with load. Concurrent single-user pushes share StoreMany
//! calls; broadcasts are split into one subtask per room and shared among the
//! live centers through center's gRPC service.

mod api;
mod batch;
mod broadcast;
mod dashboard;
mod error;
mod fanout;
mod groups;
mod limits;
mod methods;
mod notify;
mod openapi;
mod push;
mod route;
mod state;
mod store;
mod tokens;

pub use error::ApiError;

use std::sync::Arc;

use pushgrid_common::cli::RoleConfig;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net};
use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::center_server::CenterServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub const ROLE: &str = "center";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CenterConfig {
    /// `listen` (gRPC) serves other centers (shared broadcast subtasks).
    #[serde(flatten)]
    pub node: NodeConfig,
    /// The push API's HTTP listener.
    pub http_listen: String,
    /// Largest accepted request body; larger ones get 413.
    pub max_request_bytes: usize,
    /// Largest message payload, after base64 decoding.
    pub max_payload_bytes: usize,
    /// Most users in one push call.
    pub max_users_per_push: usize,
    /// Longest `ttl_secs` a push may ask for (saver's `max_ttl_secs`, 30
    /// days, by default); 0 or more is refused with 400, never shortened.
    pub max_ttl_secs: u32,
    /// Pushes being stored or routed at once; beyond it the API answers 503
    /// before storing anything.
    pub route_queue: usize,
    /// Broadcast fan-outs in flight before the API answers 503.
    pub broadcast_in_flight: usize,
    /// Seconds a client is told to wait when the queue is full.
    pub retry_after_secs: u32,
    /// Most commands in one batch call.
    pub max_batch_commands: usize,
    /// Most single-user pushes stored with one StoreMany call; 0 or 1 turns
    /// the coalescing off (one Store call per push).
    pub store_batch_max: usize,
    /// StoreMany calls in flight per saver. A push goes out at once when one
    /// of them is free; while all are busy, pushes gather for the next call.
    pub store_batch_in_flight: usize,
    /// Group pushes fanned out at once (issue 12).
    pub group_fanout_workers: usize,
    /// Group pushes waiting for a fan-out worker before the API answers 503.
    pub group_fanout_queue: usize,
    /// Members read, stored and routed per step of a group fan-out.
    pub group_page_size: usize,
    /// Notifications (one per user of a push with a `notification`)
    /// waiting to be sent; beyond it they are dropped and counted, the
    /// messages stay in the inbox (issue 25).
    pub notify_queue: usize,
    /// Provider requests in flight at once.
    pub notify_concurrency: usize,
    /// Time limit of one provider request, in milliseconds.
    pub notify_timeout_ms: u64,
    /// A PEM file of certificate authorities to trust besides the public
    /// ones for provider connections (a private relay, a test stand-in).
    pub notify_ca_file: String,
}

impl Default for CenterConfig {
    fn default() -> Self {
        CenterConfig {
            node: NodeConfig::with_ports(7004, 9004),
            http_listen: "127.0.0.1:8080".into(),
            max_request_bytes: 1024 * 1024,
            max_payload_bytes: 60 * 1024,
            max_users_per_push: 10_000,
            max_ttl_secs: 30 * 24 * 3600,
            route_queue: 10_000,
            retry_after_secs: 1,
            max_batch_commands: 1000,
            store_batch_max: 512,
            store_batch_in_flight: 4,
            broadcast_in_flight: 256,
            group_fanout_workers: 4,
            group_fanout_queue: 1024,
            group_page_size: 1000,
            notify_queue: 100_000,
            notify_concurrency: 256,
            notify_timeout_ms: 10_000,
            notify_ca_file: String::new(),
        }
    }
}

impl RoleConfig for CenterConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub admin: TcpListener,
    pub http: TcpListener,
    pub grpc: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &CenterConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            admin: net::bind(&config.node.admin_listen).await?,
            grpc: net::bind(&config.node.listen).await?,
            http: net::bind(&config.http_listen).await?,
        })
    }
}

/// The push API's state: the routing workers, the notifier and the queues.
fn api_state(
    config: &CenterConfig,
    cluster: &pushgrid_common::cluster::Cluster,
    provider_client: pushgrid_notify::Sender,
) -> Arc<state::ApiState> {
    let router = Arc::new(route::Router::new(cluster.clone()));
    let workers = route::WorkerPool::start(router.clone(), config.route_queue);
    let notifier = notify::Notifier::start(
        config,
        provider_client,
        router,
        // Its own channels to the savers: list and remove tokens.
        pushgrid_common::rpc::ChannelPool::new(2, cluster.credentials()),
        cluster.clone(),
    );
    Arc::new(state::ApiState {
        config: config.clone(),
        cluster: cluster.clone(),
        workers,
        channels: pushgrid_common::rpc::ChannelPool::new(2, cluster.credentials()),
        limits: limits::AppLimits::default(),
        broadcasts: Arc::new(tokio::sync::Semaphore::new(
            config.broadcast_in_flight.max(1),
        )),
        stores: store::StoreBatcher::new(config, cluster.credentials()),
        groups: fanout::GroupFanout::new(config.group_fanout_queue),
        admin_token: config.node.admin_token(),
        notifier,
    })
}

/// Runs center until `shutdown`.
pub async fn run(
    config: CenterConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
    let http_addr = listeners.http.local_addr()?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let endpoints = node::Endpoints {
        http: Some(http_addr),
        grpc: Some(grpc_addr),
        ..Default::default()
    };
    let provider_client =
        notify::Notifier::sender(&config).map_err(pushgrid_common::StartError::Config)?;
    const NEEDS: &[Role] = &[Role::Saver, Role::Register];
    let cluster = node::start(
        ROLE,
        Role::Center,
        &config.node,
        listeners.admin,
        endpoints,
        NEEDS,
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    let state = api_state(&config, &cluster, provider_client);
    let workers = state.workers.clone();
    let grpc_router = tonic::service::Routes::new(CenterServer::new(broadcast::CenterService {
        state: state.clone(),
    }));
    let grpc_shutdown = shutdown.clone();
    let grpc_credentials = cluster.credentials().clone();
    let grpc = tokio::spawn(async move {
        node::serve_grpc(
            grpc_router,
            &grpc_credentials,
            listeners.grpc,
            &grpc_shutdown,
        )
        .await
    });

    tracing::info!(node = %node_id, %http_addr, "center serving");
    net::announce(ROLE, "ready", http_addr);
    let dashboard = Arc::new(dashboard::DashboardState::new(
        config.node.admin_token(),
        cluster.clone(),
    ));
    groups::start_fanout_workers(&state, config.group_fanout_workers);
    let app = api::router(state).merge(dashboard::router(dashboard));
    let served = axum::serve(
        net::http_listener(listeners.http),
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown.clone().cancelled_owned())
    .await;
    cluster.leave().await;
    workers.drain().await;
    match grpc.await {
        Ok(Err(error)) => tracing::warn!(%error, "center gRPC server failed"),
        Err(error) => tracing::warn!(%error, "center gRPC server panicked"),
        Ok(Ok(())) => {}
    }
    tracing::info!(node = %node_id, "center stopped");
    served.map_err(Into::into)
}
