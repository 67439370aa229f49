//! Membership in a pushgrid cluster: register with keeper under a lease, keep
//! the lease alive, and follow keeper's watch stream of nodes and config.
//!
//! A node keeps its last view when keeper is unreachable, and registers again
//! (asking for the same worker id) when keeper says the lease is unknown, so a
//! keeper restart loses no traffic.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_proto::cluster::keeper_client::KeeperClient;
use pushgrid_proto::cluster::{
    App, ClusterState, DeregisterRequest, HeartbeatRequest, NodeInfo, RegisterNodeRequest, Role,
    WatchRequest,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::ring::Ring;

/// An immutable snapshot of the cluster as keeper last described it.
#[derive(Debug, Default)]
pub struct ClusterView {
    pub version: u64,
    pub nodes: Vec<NodeInfo>,
    apps: HashMap<String, App>,
    apps_by_api_key: HashMap<String, String>,
    settings: HashMap<String, String>,
    routes: Vec<pushgrid_proto::cluster::UpstreamRoute>,
    register_ring: Ring,
}

impl ClusterView {
    pub fn from_state(state: ClusterState) -> ClusterView {
        let mut apps = HashMap::new();
        let mut apps_by_api_key = HashMap::new();
        for app in state.apps {
            if !app.api_key.is_empty() {
                apps_by_api_key.insert(app.api_key.clone(), app.id.clone());
            }
            apps.insert(app.id.clone(), app);
        }
        let mut nodes = state.nodes;
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let register_ring = Ring::new(
            nodes
                .iter()
                .filter(|node| node.role() == Role::Register)
                .map(|node| node.id.clone()),
        );
        ClusterView {
            version: state.version,
            nodes,
            apps,
            apps_by_api_key,
            settings: state.settings,
            routes: state.routes,
            register_ring,
        }
    }

    /// Live nodes of one role, ordered by id.
    pub fn nodes_of(&self, role: Role) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().filter(move |node| node.role() == role)
    }

    pub fn node(&self, id: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|node| node.id == id)
    }

    pub fn app(&self, id: &str) -> Option<&App> {
        self.apps.get(id)
    }

    pub fn app_by_api_key(&self, api_key: &str) -> Option<&App> {
        self.apps_by_api_key
            .get(api_key)
            .and_then(|id| self.apps.get(id))
    }

    /// The upstream route of (app, product, type): an exact match first, then
    /// the product's catch-all (empty type).
    pub fn route_for(
        &self,
        app: &str,
        product: &str,
        kind: &str,
    ) -> Option<&pushgrid_proto::cluster::UpstreamRoute> {
        let matching = |wanted: &str| {
            self.routes.iter().find(|route| {
                route.app == app && route.product == product && route.r#type == wanted
            })
        };
        matching(kind).or_else(|| matching(""))
    }

    /// A cluster-wide setting from keeper, e.g. `dispatcher.balancer`.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings.get(name).map(String::as_str)
    }

    /// The register instance that owns a user, by the consistent hash shared
    /// by every role.
    pub fn register_for(&self, app: &str, user: &str) -> Option<&NodeInfo> {
        let node_id = self
            .register_ring
            .node_for(crate::ring::user_key(app, user))?;
        self.node(node_id)
    }

    /// Any live node of `role`, chosen by `key` (stable for the same key).
    pub fn pick(&self, role: Role, key: u64) -> Option<&NodeInfo> {
        let candidates: Vec<&NodeInfo> = self.nodes_of(role).collect();
        if candidates.is_empty() {
            return None;
        }
        Some(candidates[(key % candidates.len() as u64) as usize])
    }
}

/// This node's membership: its lease, worker id and the live cluster view.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeInfo,
    ttl_secs: u32,
    keeper: KeeperClient<Channel>,
    lease_id: AtomicU64,
    worker_id: Arc<AtomicU32>,
    load: AtomicU64,
    view: watch::Receiver<Arc<ClusterView>>,
    shutdown: CancellationToken,
}

impl Cluster {
    /// Registers `node` with keeper at `keeper_addr` (retrying until keeper
    /// answers or `shutdown`), starts the heartbeat and watch tasks and waits
    /// for the first cluster view.
    pub async fn join(
        keeper_addr: &str,
        node: NodeInfo,
        ttl_secs: u32,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Cluster> {
        let channel = crate::rpc::lazy_channel(keeper_addr)?;
        let mut keeper = KeeperClient::new(channel);
        let ttl_secs = ttl_secs.max(2);
        let mut backoff = Duration::from_millis(100);
        let registered = loop {
            let request = RegisterNodeRequest {
                node: Some(node.clone()),
                ttl_secs,
                preferred_worker_id: None,
            };
            match keeper.register(request).await {
                Ok(response) => break response.into_inner(),
                Err(status) => {
                    tracing::warn!(keeper = keeper_addr, error = %status.message(), "keeper not reachable, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => anyhow::bail!("shut down before keeper answered"),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        tracing::info!(node = %node.id, lease = registered.lease_id, worker_id = registered.worker_id, "joined cluster");
        let (view_sender, view) = watch::channel(Arc::new(ClusterView::default()));
        let inner = Arc::new(Inner {
            node,
            ttl_secs,
            keeper,
            lease_id: AtomicU64::new(registered.lease_id),
            worker_id: Arc::new(AtomicU32::new(registered.worker_id)),
            load: AtomicU64::new(0),
            view,
            shutdown,
        });
        tokio::spawn(heartbeat_loop(inner.clone()));
        tokio::spawn(watch_loop(inner.clone(), view_sender));
        let cluster = Cluster { inner };
        let mut first = cluster.inner.view.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            first.wait_for(|view| view.version > 0),
        )
        .await;
        Ok(cluster)
    }

    /// The latest view. Cheap: an `Arc` clone.
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view.borrow().clone()
    }

    /// A receiver that wakes on every new view.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.inner.view.clone()
    }

    pub fn node(&self) -> &NodeInfo {
        &self.inner.node
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node.id
    }

    /// The worker id keeper assigned (it may change after a keeper restart).
    pub fn worker_id(&self) -> Arc<AtomicU32> {
        self.inner.worker_id.clone()
    }

    /// The load figure sent with every heartbeat (a room's connections).
    pub fn set_load(&self, load: u64) {
        self.inner.load.store(load, Ordering::Relaxed);
    }

    /// Waits until `predicate` holds for the view, or `timeout`.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        predicate: impl Fn(&ClusterView) -> bool,
    ) -> bool {
        let mut receiver = self.inner.view.clone();
        tokio::time::timeout(timeout, receiver.wait_for(|view| predicate(view)))
            .await
            .is_ok()
    }

    /// Gives the lease back so others stop routing here at once.
    pub async fn leave(&self) {
        let lease_id = self.inner.lease_id.load(Ordering::Relaxed);
        let mut keeper = self.inner.keeper.clone();
        let request = DeregisterRequest { lease_id };
        let _ = tokio::time::timeout(Duration::from_secs(2), keeper.deregister(request)).await;
    }
}

async fn heartbeat_loop(inner: Arc<Inner>) {
    let period = Duration::from_millis(u64::from(inner.ttl_secs) * 1000 / 3);
    let mut keeper = inner.keeper.clone();
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let request = HeartbeatRequest {
            lease_id: inner.lease_id.load(Ordering::Relaxed),
            load: inner.load.load(Ordering::Relaxed),
        };
        match keeper.heartbeat(request).await {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::NotFound => {
                let mut node = inner.node.clone();
                node.load = inner.load.load(Ordering::Relaxed);
                let request = RegisterNodeRequest {
                    node: Some(node),
                    ttl_secs: inner.ttl_secs,
                    preferred_worker_id: Some(inner.worker_id.load(Ordering::Relaxed)),
                };
                match keeper.register(request).await {
                    Ok(response) => {
                        let response = response.into_inner();
                        inner.lease_id.store(response.lease_id, Ordering::Relaxed);
                        inner.worker_id.store(response.worker_id, Ordering::Relaxed);
                        tracing::info!(
                            lease = response.lease_id,
                            "lease expired at keeper; registered again"
                        );
                    }
                    Err(status) => tracing::warn!(error = %status.message(), "re-register failed"),
                }
            }
            Err(status) => tracing::warn!(error = %status.message(), "heartbeat to keeper failed"),
        }
    }
}

/// Follows keeper's watch stream. After the stream broke (keeper restarted,
/// its leases gone), the nodes of the last view are kept for two lease TTLs
/// even when the new keeper does not list them yet: they are re-registering,
/// and routing around live peers for a moment would fail requests for nothing.
async fn watch_loop(inner: Arc<Inner>, sender: watch::Sender<Arc<ClusterView>>) {
    let mut keeper = inner.keeper.clone();
    let grace = Duration::from_secs(u64::from(inner.ttl_secs) * 2);
    let mut last_nodes: Vec<NodeInfo> = Vec::new();
    let mut merge_until: Option<tokio::time::Instant> = None;
    loop {
        let stream = tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            result = keeper.watch(WatchRequest {}) => result,
        };
        match stream {
            Ok(response) => {
                let mut stream = response.into_inner();
                let mut latest: Option<ClusterState> = None;
                if !last_nodes.is_empty() {
                    // A stream after a break: the grace starts now that keeper answers.
                    merge_until = Some(tokio::time::Instant::now() + grace);
                }
                loop {
                    let grace_end = merge_until;
                    let message = tokio::select! {
                        _ = inner.shutdown.cancelled() => return,
                        message = stream.message() => message,
                        _ = sleep_until_or_forever(grace_end) => {
                            // The grace ended: the keeper's own list is the truth now.
                            merge_until = None;
                            match latest.clone() {
                                Some(state) => Ok(Some(state)),
                                None => continue,
                            }
                        }
                    };
                    match message {
                        Ok(Some(state)) => {
                            latest = Some(state.clone());
                            let mut state = state;
                            if merge_until.is_some_and(|until| tokio::time::Instant::now() < until)
                            {
                                for node in &last_nodes {
                                    if !state.nodes.iter().any(|listed| listed.id == node.id) {
                                        state.nodes.push(node.clone());
                                    }
                                }
                            } else {
                                last_nodes = state.nodes.clone();
                            }
                            sender.send_replace(Arc::new(ClusterView::from_state(state)));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(error = %status.message(), "keeper watch stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(error = %status.message(), "keeper watch failed"),
        }
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn sleep_until_or_forever(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// A health check that passes once `slot` holds a joined cluster whose view
/// has at least one live node of each of `roles`.
pub fn requires_roles(
    slot: Arc<std::sync::OnceLock<Cluster>>,
    roles: &'static [Role],
) -> crate::telemetry::HealthCheck {
    Arc::new(move || {
        let cluster = slot
            .get()
            .ok_or_else(|| "not joined to keeper yet".to_string())?;
        let view = cluster.view();
        let missing: Vec<&str> = roles
            .iter()
            .filter(|role| view.nodes_of(**role).next().is_none())
            .map(|role| role.as_str_name())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("no live {}", missing.join(", ")))
        }
    })
}
