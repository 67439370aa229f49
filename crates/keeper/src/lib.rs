//! keeper: the node registry (leases with a TTL, fenced worker ids) and the
//! cluster configuration (apps with their JWT secrets, API keys, rate limits
//! and webhooks; settings; upstream routes).
//!
//! Every node registers under a lease and heartbeats it; a lease not renewed
//! within its TTL ends and the node leaves the view. Every change (membership
//! or config) is pushed to every watcher as a full snapshot: at this size a
//! snapshot is a few kilobytes and makes watchers trivially correct.
//!
//! Keeper keeps nothing that only it knows: leases, node lists and worker ids
//! live in its database (`leases.rs`), so any number of keepers can serve one
//! cluster side by side, nodes fail over between them, and any of them can
//! die or restart.
//!
//! The configuration lives in SQL (MySQL, or SQLite for the embedded default),
//! is seeded from the config file at start, changed through the admin HTTP
//! API (`admin.rs`), and re-read every `config_poll_secs` so an edit made by
//! another keeper or by hand reaches every node without a restart.

mod admin;
pub mod leases;
mod registry;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::auth::Credentials;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::{CancellationToken, db, net, telemetry};
use pushgrid_proto::cluster::keeper_server::KeeperServer;
use pushgrid_proto::cluster::{NodeInfo, Role};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

pub use store::{AppSeed, ConfigStore, RouteSeed};

pub const ROLE: &str = "keeper";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KeeperConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// The admin HTTP API's listener.
    pub http_listen: String,
    /// Where the configuration is kept: `mysql://...` or `sqlite://path`.
    pub database_url: String,
    /// Apps written to the database at start (insert or replace by id).
    pub apps: Vec<AppSeed>,
    /// Settings written to the database at start (insert or replace by name),
    /// e.g. `"dispatcher.balancer" = "round_robin"`.
    pub settings: BTreeMap<String, String>,
    /// Upstream routes written to the database at start.
    pub routes: Vec<RouteSeed>,
    /// How often the configuration is re-read for changes made by others.
    pub config_poll_secs: u64,
    /// Upper bound on the lease TTL a node may ask for.
    pub max_lease_ttl_secs: u32,
    /// How often this keeper reads the live leases (and deletes expired ones).
    pub lease_poll_ms: u64,
    /// How long a worker id lives after each renewal. A saver stops minting
    /// ids this long after it last reached a keeper: keep it above the
    /// longest keeper outage pushes must survive.
    pub worker_lease_secs: u32,
    /// An expired worker id is granted again only this much later.
    pub worker_id_margin_ms: u64,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        KeeperConfig {
            node: NodeConfig::with_ports(7000, 9000),
            http_listen: "127.0.0.1:7080".into(),
            database_url: "sqlite://pushgrid-data/keeper.db".into(),
            apps: Vec::new(),
            settings: BTreeMap::new(),
            routes: Vec::new(),
            config_poll_secs: 5,
            max_lease_ttl_secs: 60,
            lease_poll_ms: 500,
            worker_lease_secs: 120,
            worker_id_margin_ms: 5000,
        }
    }
}

impl RoleConfig for KeeperConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    pub http: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &KeeperConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
            http: net::bind(&config.http_listen).await?,
        })
    }
}

fn validate(config: &KeeperConfig) -> pushgrid_common::StartResult<()> {
    let mut problems = Vec::new();
    let mut keys = HashSet::new();
    for (index, app) in config.apps.iter().enumerate() {
        problems.extend(store::app_problems(app, &format!("apps[{index}].")));
        if !app.api_key.is_empty() && !keys.insert(app.api_key.as_str()) {
            problems.push(format!("apps[{index}].api_key is used by another app"));
        }
    }
    for (index, route) in config.routes.iter().enumerate() {
        problems.extend(store::route_problems(route, &format!("routes[{index}].")));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(pushgrid_common::StartError::Config(problems.join("; ")))
    }
}

/// Runs keeper until `shutdown`.
pub async fn run(
    config: KeeperConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
    validate(&config)?;
    // Before anything is served: keeper checks every node's key.
    let credentials = Credentials::for_node(Role::Keeper, &config.node.credentials_dir)?;
    credentials.spawn_reload(shutdown.clone());
    let admin_token = config.node.admin_token();
    let grpc_addr = listeners.grpc.local_addr()?;
    let http_addr = listeners.http.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    net::announce(ROLE, "grpc", grpc_addr);
    net::announce(ROLE, "admin", admin_addr);
    net::announce(ROLE, "http", http_addr);
    tokio::spawn(telemetry::serve_admin(
        listeners.admin,
        ROLE,
        admin_token.clone(),
        shutdown.clone(),
    ));

    let store = Arc::new(ConfigStore::connect(&config.database_url).await?);
    let state = load_state(&config, &store).await?;
    let own = own_node_info(&config, grpc_addr, admin_addr, http_addr);
    // The first read before serving: a restarted keeper answers watchers
    // with the live nodes at once.
    if let Err(error) = state.refresh_nodes().await {
        tracing::warn!(error = %error.message(), "cannot read the leases yet");
    }
    let prober = tokio::spawn(registry::probe_store(
        state.clone(),
        Duration::from_millis(config.lease_poll_ms.max(50)),
        shutdown.clone(),
    ));
    let maintainer = tokio::spawn(registry::maintain_leases(
        state.clone(),
        own,
        config.node.lease_ttl_secs,
        Duration::from_millis(config.lease_poll_ms.max(50)),
        shutdown.clone(),
    ));
    tokio::spawn(poll_config(
        state.clone(),
        store.clone(),
        config.config_poll_secs,
        shutdown.clone(),
    ));
    let admin_api = admin::router(admin::AdminState {
        token: admin_token.unwrap_or_default(),
        store: store.clone(),
        state: state.clone(),
    });
    let admin_server = tokio::spawn(
        axum::serve(
            net::http_listener(listeners.http),
            admin_api.into_make_service_with_connect_info::<std::net::SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .into_future(),
    );

    tracing::info!(%grpc_addr, %http_addr, "keeper serving");
    net::announce(ROLE, "ready", grpc_addr);
    let served = tonic::transport::Server::builder()
        .layer(credentials.server_layer(Role::Keeper))
        .add_service(KeeperServer::new(registry::KeeperService::new(state)))
        .serve_with_incoming_shutdown(
            pushgrid_common::node::grpc_incoming(listeners.grpc),
            shutdown.cancelled_owned(),
        )
        .await;
    let _ = admin_server.await;
    let _ = maintainer.await;
    let _ = prober.await;
    store.close().await;
    tracing::info!("keeper stopped");
    served.map_err(Into::into)
}

/// Writes the apps, settings and routes of the config file into the config
/// database, reads the whole cluster config back and builds the registry's
/// state on it, with worker ids leased from the same database.
async fn load_state(
    config: &KeeperConfig,
    store: &ConfigStore,
) -> pushgrid_common::StartResult<Arc<registry::KeeperState>> {
    store
        .seed(&config.apps, &config.settings, &config.routes)
        .await?;
    let cluster_config = store.load().await?;
    tracing::info!(
        apps = cluster_config.apps.len(),
        routes = cluster_config.routes.len(),
        database = %db::redact(&config.database_url),
        "configuration loaded"
    );

    let policy = leases::WorkerPolicy {
        // Renewed with every heartbeat (a third of the node's lease TTL):
        // keep it above the savers' lease_ttl_secs.
        ttl_ms: u64::from(config.worker_lease_secs.max(2)) * 1000,
        margin_ms: config.worker_id_margin_ms,
    };
    let lease_store = leases::LeaseStore::new(
        store.pool().clone(),
        db::is_sqlite(&config.database_url),
        policy,
    );
    Ok(Arc::new(registry::KeeperState::new(
        cluster_config,
        lease_store,
        config.max_lease_ttl_secs,
    )))
}

/// This keeper as a node of the cluster, with the addresses it serves on.
fn own_node_info(
    config: &KeeperConfig,
    grpc_addr: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
    http_addr: std::net::SocketAddr,
) -> NodeInfo {
    NodeInfo {
        id: config.node.resolved_node_id(ROLE),
        role: Role::Keeper as i32,
        grpc_addr: net::advertised(grpc_addr, &config.node.advertise_host),
        admin_addr: net::advertised(admin_addr, &config.node.advertise_host),
        http_addr: net::advertised(http_addr, &config.node.advertise_host),
        started_ms: pushgrid_common::now_ms(),
        labels: config
            .node
            .labels
            .iter()
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect(),
        ..Default::default()
    }
}

async fn poll_config(
    state: Arc<registry::KeeperState>,
    store: Arc<ConfigStore>,
    every_secs: u64,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(every_secs.max(1)));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.load().await {
            Ok(config) => state.set_config(config).await,
            Err(error) => {
                tracing::warn!(%error, "cannot re-read the configuration; keeping the last one")
            }
        }
    }
}
