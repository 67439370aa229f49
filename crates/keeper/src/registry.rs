//! Leases and the `Keeper` gRPC service: register, heartbeat, deregister and
//! the watch stream of full cluster snapshots.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_common::{CancellationToken, ids, now_ms};
use pushgrid_proto::cluster::keeper_server::Keeper;
use pushgrid_proto::cluster::{
    ClusterState, DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse,
    NodeInfo, RegisterNodeRequest, RegisterNodeResponse, WatchRequest,
};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::store::ClusterConfig;

struct Lease {
    node: NodeInfo,
    ttl: Duration,
    deadline: Instant,
}

struct Registry {
    leases: HashMap<u64, Lease>,
    config: ClusterConfig,
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
            apps: self.config.apps.values().cloned().collect(),
            settings: self
                .config
                .settings
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            routes: self.config.routes.clone(),
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

pub(crate) struct KeeperState {
    registry: Mutex<Registry>,
    version: AtomicU64,
    next_lease: AtomicU64,
    snapshots: watch::Sender<Arc<ClusterState>>,
    max_ttl_secs: u32,
}

impl KeeperState {
    pub fn new(config: ClusterConfig, max_ttl_secs: u32) -> KeeperState {
        let registry = Registry {
            leases: HashMap::new(),
            config,
        };
        let (snapshots, _) = watch::channel(Arc::new(registry.snapshot(1)));
        KeeperState {
            registry: Mutex::new(registry),
            version: AtomicU64::new(1),
            // Lease ids start from the clock so a restarted keeper never
            // confirms a lease handed out by its previous life.
            next_lease: AtomicU64::new(now_ms()),
            snapshots,
            max_ttl_secs: max_ttl_secs.max(2),
        }
    }

    /// Publishes a new snapshot; call with the registry lock held so versions
    /// and contents go out in the same order.
    fn publish(&self, registry: &Registry) {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.snapshots
            .send_replace(Arc::new(registry.snapshot(version)));
        metrics::gauge!("pushgrid_keeper_nodes").set(registry.leases.len() as f64);
    }

    /// Replaces the configuration, publishing only when it changed.
    pub async fn set_config(&self, config: ClusterConfig) {
        let mut registry = self.registry.lock().await;
        if registry.config != config {
            tracing::info!(
                apps = config.apps.len(),
                routes = config.routes.len(),
                "cluster configuration changed"
            );
            registry.config = config;
            self.publish(&registry);
        }
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<ClusterState> {
        self.snapshots.borrow().clone()
    }
}

pub(crate) struct KeeperService {
    state: Arc<KeeperState>,
}

impl KeeperService {
    pub fn new(state: Arc<KeeperState>) -> KeeperService {
        KeeperService { state }
    }
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
        tracing::info!(node = %node.id, role = ?node.role(), lease_id, "node registered");
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

pub(crate) async fn expire_leases(state: Arc<KeeperState>, shutdown: CancellationToken) {
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
