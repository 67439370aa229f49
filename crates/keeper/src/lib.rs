//! keeper: the node registry (leases with a TTL) and the cluster configuration
//! (apps with their JWT secrets, API keys and webhooks).
//!
//! Every node registers under a lease and heartbeats it; a lease not renewed
//! within its TTL ends and the node leaves the view. Every change (membership
//! or config) is pushed to every watcher as a full snapshot: at this size a
//! snapshot is a few kilobytes and makes watchers trivially correct.
//!
//! Apps live in SQL (MySQL, or SQLite for the embedded default) and are seeded
//! from the `apps` list of the config file at start; the table is re-read
//! every `config_poll_secs`, so an edit reaches every node without a restart.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_common::cli::RoleConfig;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::{CancellationToken, db, ids, net, now_ms, telemetry};
use pushgrid_proto::cluster::keeper_server::{Keeper, KeeperServer};
use pushgrid_proto::cluster::{
    App, ClusterState, DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse,
    NodeInfo, RegisterNodeRequest, RegisterNodeResponse, WatchRequest,
};
use serde::{Deserialize, Serialize};
use sqlx::{AnyPool, Row};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

pub const ROLE: &str = "keeper";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AppSeed {
    pub id: String,
    pub jwt_secret: String,
    pub api_key: String,
    #[serde(default)]
    pub webhook_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KeeperConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Where apps are kept: `mysql://...` or `sqlite://path`.
    pub database_url: String,
    /// Apps written to the database at start (insert or replace by id).
    pub apps: Vec<AppSeed>,
    /// Settings written to the database at start (insert or replace by name),
    /// e.g. `"dispatcher.balancer" = "round_robin"`.
    pub settings: BTreeMap<String, String>,
    /// How often the apps table is re-read for changes made by others.
    pub config_poll_secs: u64,
    /// Upper bound on the lease TTL a node may ask for.
    pub max_lease_ttl_secs: u32,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        KeeperConfig {
            node: NodeConfig::with_ports(7000, 9000),
            database_url: "sqlite://pushgrid-data/keeper.db".into(),
            apps: Vec::new(),
            settings: BTreeMap::new(),
            config_poll_secs: 5,
            max_lease_ttl_secs: 60,
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
}

impl Listeners {
    pub async fn bind(config: &KeeperConfig) -> anyhow::Result<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
        })
    }
}

struct Lease {
    node: NodeInfo,
    ttl: Duration,
    deadline: Instant,
}

#[derive(Default)]
struct Registry {
    leases: HashMap<u64, Lease>,
    apps: BTreeMap<String, App>,
    settings: BTreeMap<String, String>,
}

impl Registry {
    fn snapshot(&self, version: u64) -> ClusterState {
        let mut nodes: Vec<NodeInfo> = self
            .leases
            .values()
            .map(|lease| lease.node.clone())
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        ClusterState {
            version,
            nodes,
            apps: self.apps.values().cloned().collect(),
            settings: self
                .settings
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
        }
    }

    /// The smallest worker id no live node holds, or `preferred` when free.
    fn free_worker_id(&self, preferred: Option<u32>) -> Result<u32, Status> {
        let taken: HashSet<u32> = self
            .leases
            .values()
            .map(|lease| lease.node.worker_id)
            .collect();
        if let Some(preferred) = preferred
            && preferred <= ids::MAX_WORKER_ID
            && !taken.contains(&preferred)
        {
            return Ok(preferred);
        }
        (0..=ids::MAX_WORKER_ID)
            .find(|candidate| !taken.contains(candidate))
            .ok_or_else(|| Status::resource_exhausted("all worker ids are in use"))
    }
}

struct KeeperState {
    registry: Mutex<Registry>,
    version: AtomicU64,
    next_lease: AtomicU64,
    snapshots: watch::Sender<Arc<ClusterState>>,
    max_ttl_secs: u32,
}

impl KeeperState {
    /// Publishes a new snapshot; call with the registry lock held so versions
    /// and contents go out in the same order.
    fn publish(&self, registry: &Registry) {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.snapshots
            .send_replace(Arc::new(registry.snapshot(version)));
        metrics::gauge!("pushgrid_keeper_nodes").set(registry.leases.len() as f64);
    }
}

struct KeeperService {
    state: Arc<KeeperState>,
}

#[tonic::async_trait]
impl Keeper for KeeperService {
    async fn register(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let request = request.into_inner();
        let Some(mut node) = request.node else {
            return Err(Status::invalid_argument("node is required"));
        };
        if node.id.is_empty() || (node.grpc_addr.is_empty() && node.http_addr.is_empty()) {
            return Err(Status::invalid_argument(
                "node id and an address (grpc or http) are required",
            ));
        }
        let ttl_secs = request.ttl_secs.clamp(2, self.state.max_ttl_secs);
        let mut registry = self.state.registry.lock().await;
        // A node that registers again (after its own restart or a lost lease)
        // replaces its old lease.
        registry.leases.retain(|_, lease| lease.node.id != node.id);
        node.worker_id = registry.free_worker_id(request.preferred_worker_id)?;
        let lease_id = self.state.next_lease.fetch_add(1, Ordering::SeqCst);
        let ttl = Duration::from_secs(u64::from(ttl_secs));
        tracing::info!(node = %node.id, role = ?node.role(), addr = %node.grpc_addr, lease_id, "node registered");
        let worker_id = node.worker_id;
        registry.leases.insert(
            lease_id,
            Lease {
                node,
                ttl,
                deadline: Instant::now() + ttl,
            },
        );
        self.state.publish(&registry);
        metrics::counter!("pushgrid_keeper_registrations_total").increment(1);
        Ok(Response::new(RegisterNodeResponse {
            lease_id,
            ttl_secs,
            worker_id,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let mut registry = self.state.registry.lock().await;
        let Some(lease) = registry.leases.get_mut(&request.lease_id) else {
            return Err(Status::not_found(format!(
                "lease {} is unknown or expired",
                request.lease_id
            )));
        };
        lease.deadline = Instant::now() + lease.ttl;
        let load_changed = lease.node.load != request.load;
        lease.node.load = request.load;
        if load_changed {
            self.state.publish(&registry);
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let lease_id = request.into_inner().lease_id;
        let mut registry = self.state.registry.lock().await;
        if let Some(lease) = registry.leases.remove(&lease_id) {
            tracing::info!(node = %lease.node.id, "node left");
            self.state.publish(&registry);
        }
        Ok(Response::new(DeregisterResponse {}))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ClusterState, Status>> + Send>>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let stream = tokio_stream::wrappers::WatchStream::new(self.state.snapshots.subscribe())
            .map(|snapshot| Ok(ClusterState::clone(&snapshot)));
        Ok(Response::new(Box::pin(stream)))
    }
}

/// SQL access to the apps table.
pub struct AppStore {
    pool: AnyPool,
}

impl AppStore {
    pub async fn connect(url: &str) -> anyhow::Result<AppStore> {
        let pool = db::connect(url, 4).await?;
        db::migrate(
            &pool,
            sqlx::migrate!("./migrations"),
            "_pushgrid_keeper_migrations",
        )
        .await?;
        Ok(AppStore { pool })
    }

    /// Inserts or replaces each app by id.
    pub async fn seed(&self, apps: &[AppSeed]) -> anyhow::Result<()> {
        let mut transaction = self.pool.begin().await?;
        for app in apps {
            sqlx::query("DELETE FROM apps WHERE id = ?")
                .bind(&app.id)
                .execute(&mut *transaction)
                .await?;
            sqlx::query("INSERT INTO apps (id, jwt_secret, api_key, webhook_url, updated_ms) VALUES (?, ?, ?, ?, ?)")
                .bind(&app.id)
                .bind(&app.jwt_secret)
                .bind(&app.api_key)
                .bind(&app.webhook_url)
                .bind(now_ms() as i64)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Inserts or replaces each setting by name.
    pub async fn seed_settings(&self, settings: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let mut transaction = self.pool.begin().await?;
        for (name, value) in settings {
            sqlx::query("DELETE FROM settings WHERE name = ?")
                .bind(name)
                .execute(&mut *transaction)
                .await?;
            sqlx::query("INSERT INTO settings (name, value, updated_ms) VALUES (?, ?, ?)")
                .bind(name)
                .bind(value)
                .bind(now_ms() as i64)
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    pub async fn load_settings(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let rows = sqlx::query("SELECT name, value FROM settings")
            .fetch_all(&self.pool)
            .await?;
        let mut settings = BTreeMap::new();
        for row in rows {
            settings.insert(row.try_get("name")?, row.try_get("value")?);
        }
        Ok(settings)
    }

    pub async fn load(&self) -> anyhow::Result<BTreeMap<String, App>> {
        let rows = sqlx::query("SELECT id, jwt_secret, api_key, webhook_url FROM apps")
            .fetch_all(&self.pool)
            .await?;
        let mut apps = BTreeMap::new();
        for row in rows {
            let app = App {
                id: row.try_get("id")?,
                jwt_secret: row.try_get("jwt_secret")?,
                api_key: row.try_get("api_key")?,
                webhook_url: row.try_get("webhook_url")?,
            };
            apps.insert(app.id.clone(), app);
        }
        Ok(apps)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

fn validate_seeds(apps: &[AppSeed]) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut keys = HashSet::new();
    for (index, app) in apps.iter().enumerate() {
        if app.id.is_empty() || app.id.len() > 64 {
            problems.push(format!("apps[{index}].id must be 1 to 64 bytes"));
        }
        if app.jwt_secret.is_empty() {
            problems.push(format!("apps[{index}].jwt_secret must not be empty"));
        }
        if app.api_key.is_empty() {
            problems.push(format!("apps[{index}].api_key must not be empty"));
        } else if !keys.insert(app.api_key.as_str()) {
            problems.push(format!("apps[{index}].api_key is used by another app"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invalid apps: {}", problems.join("; "))
    }
}

/// Runs keeper until `shutdown`.
pub async fn run(
    config: KeeperConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    validate_seeds(&config.apps)?;
    let grpc_addr = listeners.grpc.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    net::announce(ROLE, "grpc", grpc_addr);
    net::announce(ROLE, "admin", admin_addr);
    tokio::spawn(telemetry::serve_admin(
        listeners.admin,
        ROLE,
        shutdown.clone(),
    ));

    let store = Arc::new(AppStore::connect(&config.database_url).await?);
    store.seed(&config.apps).await?;
    store.seed_settings(&config.settings).await?;
    let apps = store.load().await?;
    let settings = store.load_settings().await?;
    tracing::info!(apps = apps.len(), database = %db::redact(&config.database_url), "apps loaded");

    let registry = Registry {
        leases: HashMap::new(),
        apps,
        settings,
    };
    let (snapshots, _) = watch::channel(Arc::new(registry.snapshot(1)));
    let state = Arc::new(KeeperState {
        registry: Mutex::new(registry),
        version: AtomicU64::new(1),
        // Lease ids start from the clock so a restarted keeper never confirms
        // a lease handed out by its previous life.
        next_lease: AtomicU64::new(now_ms()),
        snapshots,
        max_ttl_secs: config.max_lease_ttl_secs.max(2),
    });
    tokio::spawn(expire_leases(state.clone(), shutdown.clone()));
    tokio::spawn(poll_config(
        state.clone(),
        store.clone(),
        config.config_poll_secs,
        shutdown.clone(),
    ));

    tracing::info!(%grpc_addr, "keeper serving");
    net::announce(ROLE, "ready", grpc_addr);
    tonic::transport::Server::builder()
        .add_service(KeeperServer::new(KeeperService { state }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc),
            shutdown.cancelled_owned(),
        )
        .await?;
    store.close().await;
    tracing::info!("keeper stopped");
    Ok(())
}

async fn expire_leases(state: Arc<KeeperState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        let mut registry = state.registry.lock().await;
        let before = registry.leases.len();
        registry.leases.retain(|_, lease| {
            let alive = lease.deadline > now;
            if !alive {
                tracing::warn!(node = %lease.node.id, "lease expired");
            }
            alive
        });
        let expired = before - registry.leases.len();
        if expired > 0 {
            metrics::counter!("pushgrid_keeper_leases_expired_total").increment(expired as u64);
            state.publish(&registry);
        }
    }
}

async fn poll_config(
    state: Arc<KeeperState>,
    store: Arc<AppStore>,
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
        let loaded =
            async { Ok::<_, anyhow::Error>((store.load().await?, store.load_settings().await?)) };
        match loaded.await {
            Ok((apps, settings)) => {
                let mut registry = state.registry.lock().await;
                if registry.apps != apps || registry.settings != settings {
                    tracing::info!(
                        apps = apps.len(),
                        settings = settings.len(),
                        "cluster configuration changed"
                    );
                    registry.apps = apps;
                    registry.settings = settings;
                    state.publish(&registry);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot re-read the configuration; keeping the last one")
            }
        }
    }
}
