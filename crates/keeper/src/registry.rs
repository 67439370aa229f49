//! The `Keeper` gRPC service over the leases in keeper's database
//! (`leases.rs`): register, heartbeat, deregister, and the watch stream of
//! full cluster snapshots.
//!
//! Every keeper of a cluster serves the same rows, so any of them answers
//! any node. Each keeper keeps its watchers current by reading the live
//! leases every `lease_poll_ms` (and right after a change it made itself),
//! deletes expired leases (any keeper may), and publishes a snapshot when the
//! node list or the configuration changed. Keepers list themselves too (role
//! KEEPER), so nodes learn every keeper's address from the view.
//!
//! When the database stalls or fails (a locked table, a failover), no keeper
//! can renew any lease, and leases run out for nodes that are alive. After
//! such trouble a keeper recovers for two of the longest lease TTLs: it
//! deletes no lease, and it keeps listing the nodes it listed before, while
//! the nodes renew (a lease past its expiry that was not deleted is renewed).
//! Only a node that stays silent through the recovery leaves the view.
//!
//! Every call has passed the cluster credential check (`pushgrid_common::auth`)
//! and carries its caller's role: a node registers, renews and gives back
//! leases only of its own role, and only rooms and centers (which verify
//! device tokens and API keys) see the apps' secrets in the watch stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_common::auth::{RefusalLog, caller_role, role_name, sees_app_secrets};
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::keeper_server::Keeper;
use pushgrid_proto::cluster::{
    ClusterState, DeregisterRequest, DeregisterResponse, HeartbeatRequest, HeartbeatResponse,
    NodeInfo, RegisterNodeRequest, RegisterNodeResponse, Role, WatchRequest,
};
use tokio::sync::{Mutex, watch};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::leases::{LeaseStore, WorkerRequest};
use crate::store::ClusterConfig;

mod upkeep;

pub(crate) use self::upkeep::{maintain_leases, probe_store};

/// What this keeper publishes: the live nodes and the configuration.
struct Published {
    nodes: Vec<NodeInfo>,
    config: ClusterConfig,
}

impl Published {
    fn snapshot(&self, version: u64) -> ClusterState {
        ClusterState {
            version,
            nodes: self.nodes.clone(),
            apps: self.config.apps.values().cloned().collect(),
            settings: self
                .config
                .settings
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            routes: self.config.routes.clone(),
            notify_providers: self.config.notify_providers.clone(),
        }
    }
}

pub(crate) struct KeeperState {
    published: Mutex<Published>,
    version: AtomicU64,
    snapshots: watch::Sender<Arc<ClusterState>>,
    pub(crate) leases: LeaseStore,
    max_ttl_secs: u32,
    recovery: std::sync::Mutex<Recovery>,
}

/// Whether this keeper is recovering from lease store trouble.
#[derive(Default)]
struct Recovery {
    /// Until when expired leases are neither deleted nor dropped from the view.
    until: Option<tokio::time::Instant>,
    /// The longest lease TTL seen: the recovery lasts two of them.
    longest_ttl: Duration,
}

impl KeeperState {
    pub fn new(config: ClusterConfig, leases: LeaseStore, max_ttl_secs: u32) -> KeeperState {
        let published = Published {
            nodes: Vec::new(),
            config,
        };
        // Versions start from the clock, so a watcher that moves to another
        // keeper (or a restarted one) still sees them grow.
        let version = now_ms();
        let (snapshots, _) = watch::channel(Arc::new(published.snapshot(version)));
        KeeperState {
            published: Mutex::new(published),
            version: AtomicU64::new(version),
            snapshots,
            leases,
            max_ttl_secs: max_ttl_secs.max(2),
            recovery: std::sync::Mutex::new(Recovery {
                until: None,
                // Until the first read says otherwise: the default node TTL.
                longest_ttl: Duration::from_secs(10),
            }),
        }
    }

    fn recovery(&self) -> std::sync::MutexGuard<'_, Recovery> {
        self.recovery
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The lease store failed or stalled: nodes could not renew meanwhile,
    /// so for two lease TTLs from now no lease ends.
    pub fn store_trouble(&self) {
        let mut recovery = self.recovery();
        let until = tokio::time::Instant::now() + recovery.longest_ttl * 2;
        if recovery.until.is_none() {
            metrics::counter!("pushgrid_keeper_store_recoveries_total").increment(1);
            tracing::warn!(
                grace_ms = (recovery.longest_ttl * 2).as_millis() as u64,
                "lease store trouble: no lease ends until the nodes could renew again"
            );
        }
        recovery.until = Some(until);
    }

    /// True while recovering from lease store trouble.
    pub fn recovering(&self) -> bool {
        let mut recovery = self.recovery();
        match recovery.until {
            Some(until) if tokio::time::Instant::now() < until => true,
            Some(_) => {
                recovery.until = None;
                tracing::info!("recovered from lease store trouble: expired leases end again");
                false
            }
            None => false,
        }
    }

    /// Publishes a new snapshot; call with the lock held so versions and
    /// contents go out in the same order.
    fn publish(&self, published: &Published) {
        let version = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        self.snapshots
            .send_replace(Arc::new(published.snapshot(version)));
        metrics::gauge!("pushgrid_keeper_nodes").set(published.nodes.len() as f64);
    }

    /// Replaces the configuration, publishing only when it changed.
    pub async fn set_config(&self, config: ClusterConfig) {
        let mut published = self.published.lock().await;
        if published.config != config {
            tracing::info!(
                apps = config.apps.len(),
                routes = config.routes.len(),
                "cluster configuration changed"
            );
            published.config = config;
            self.publish(&published);
        }
    }

    /// Reads the live leases and publishes them when they changed. While
    /// recovering, the nodes listed before stay listed.
    pub async fn refresh_nodes(&self) -> Result<(), Status> {
        let (mut nodes, longest_ttl_ms) = match self.leases.live_nodes().await {
            Ok(live) => live,
            Err(error) => {
                metrics::counter!("pushgrid_keeper_store_errors_total", "op" => "read")
                    .increment(1);
                self.store_trouble();
                return Err(Status::from(error));
            }
        };
        if longest_ttl_ms > 0 {
            self.recovery().longest_ttl = Duration::from_millis(longest_ttl_ms.max(2000));
        }
        let recovering = self.recovering();
        let mut published = self.published.lock().await;
        if recovering {
            for node in &published.nodes {
                if !nodes.iter().any(|live| live.id == node.id) {
                    nodes.push(node.clone());
                }
            }
            nodes.sort_by(|a, b| a.id.cmp(&b.id));
        }
        if published.nodes != nodes {
            published.nodes = nodes;
            self.publish(&published);
        }
        Ok(())
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

impl KeeperService {
    /// A node registers only under its own role's key, never replaces a node
    /// id held by another role, and names an id and an address.
    async fn check_registration(
        &self,
        caller: Role,
        peer: Option<std::net::SocketAddr>,
        node: &NodeInfo,
    ) -> Result<(), Status> {
        if node.role() != caller {
            return Err(refuse_registration(
                peer,
                caller,
                format!(
                    "a {} key cannot register a {} node",
                    role_name(caller),
                    role_name(node.role())
                ),
            ));
        }
        // Registering replaces the leases of the same node id: only its own role's.
        let holder = self
            .state
            .leases
            .role_of_node(&node.id)
            .await
            .map_err(|error| store_failed(&self.state, "register", error))?;
        if let Some(holder) = holder.filter(|holder| *holder != caller) {
            return Err(refuse_registration(
                peer,
                caller,
                format!(
                    "node id {:?} is held by a {} node; a {} key cannot replace it",
                    node.id,
                    role_name(holder),
                    role_name(caller)
                ),
            ));
        }
        if node.id.is_empty() || (node.grpc_addr.is_empty() && node.http_addr.is_empty()) {
            return Err(Status::invalid_argument(
                "node id and an address (grpc or http) are required",
            ));
        }
        Ok(())
    }

    /// A lease is renewed or ended only by a caller of its node's role.
    async fn check_lease_role(
        &self,
        lease_id: u64,
        caller: Role,
        peer: Option<std::net::SocketAddr>,
    ) -> Result<(), Status> {
        let holder = self
            .state
            .leases
            .role_of_lease(lease_id)
            .await
            .map_err(|error| store_failed(&self.state, "lease_role", error))?;
        match holder {
            Some(holder) if holder != caller => Err(refuse_registration(
                peer,
                caller,
                format!(
                    "lease {lease_id} belongs to a {} node; a {} key cannot renew or end it",
                    role_name(holder),
                    role_name(caller)
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A registration, renewal or end refused because the caller's key is of
/// another role than the node or lease: counted, logged with the caller's
/// address (within a budget of lines per second) and answered 7.
fn refuse_registration(
    peer: Option<std::net::SocketAddr>,
    caller: Role,
    message: String,
) -> Status {
    static REFUSALS: RefusalLog = RefusalLog::new(20);
    metrics::counter!("pushgrid_keeper_registrations_refused_total").increment(1);
    if let Some(unlogged_before) = REFUSALS.admit() {
        let peer = peer.map_or_else(|| "in-process".to_string(), |peer| peer.to_string());
        tracing::warn!(%peer, caller = role_name(caller), reason = %message, unlogged_before, "registration refused");
    }
    Status::permission_denied(message)
}

/// The snapshot `caller` may see: without the apps' JWT secrets and API keys
/// unless it verifies device tokens or API keys.
fn snapshot_for(caller: Role, snapshot: &ClusterState) -> ClusterState {
    let mut state = snapshot.clone();
    if !sees_app_secrets(caller) {
        for app in &mut state.apps {
            app.jwt_secret.clear();
            app.previous_jwt_secret.clear();
            app.api_key.clear();
        }
    }
    // Only centers send notifications.
    if caller != Role::Center {
        state.notify_providers.clear();
    }
    state
}

fn store_failed(state: &KeeperState, op: &'static str, error: crate::leases::LeaseError) -> Status {
    metrics::counter!("pushgrid_keeper_store_errors_total", "op" => op).increment(1);
    tracing::warn!(op, %error, "lease store failed");
    if !matches!(error, crate::leases::LeaseError::NoWorkerId) {
        state.store_trouble();
    }
    error.into()
}

#[tonic::async_trait]
impl Keeper for KeeperService {
    async fn register(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let caller = caller_role(&request)?;
        let peer = request.remote_addr();
        let request = request.into_inner();
        let Some(node) = request.node else {
            return Err(Status::invalid_argument("node is required"));
        };
        self.check_registration(caller, peer, &node).await?;
        let ttl_secs = request.ttl_secs.clamp(2, self.state.max_ttl_secs);
        let worker = WorkerRequest {
            wanted: request.needs_worker_id,
            preferred: request.preferred_worker_id,
            generation: request.worker_generation,
        };
        // A node that registers again (after its own restart or a lost lease)
        // replaces its old lease.
        let registered = self
            .state
            .leases
            .register(&node, u64::from(ttl_secs) * 1000, worker)
            .await
            .map_err(|error| store_failed(&self.state, "register", error))?;
        let grant = registered.worker;
        tracing::info!(
            node = %node.id,
            role = ?node.role(),
            lease_id = registered.lease_id,
            worker_id = ?grant.map(|grant| grant.id),
            "node registered"
        );
        metrics::counter!("pushgrid_keeper_registrations_total").increment(1);
        // Watchers of this keeper see the node now; other keepers at their next poll.
        let _ = self.state.refresh_nodes().await;
        let policy = self.state.leases.policy();
        Ok(Response::new(RegisterNodeResponse {
            lease_id: registered.lease_id,
            ttl_secs,
            worker_id: grant.map_or(0, |grant| grant.id),
            worker_generation: grant.map_or(0, |grant| grant.generation),
            worker_ttl_ms: if grant.is_some() {
                u32::try_from(policy.ttl_ms).unwrap_or(u32::MAX)
            } else {
                0
            },
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = caller_role(&request)?;
        let peer = request.remote_addr();
        let request = request.into_inner();
        self.check_lease_role(request.lease_id, caller, peer)
            .await?;
        let renewed = self
            .state
            .leases
            .heartbeat(request.lease_id, request.load)
            .await
            .map_err(|error| store_failed(&self.state, "heartbeat", error))?;
        let Some(renewed) = renewed else {
            return Err(Status::not_found(format!(
                "lease {} is unknown or expired",
                request.lease_id
            )));
        };
        let policy = self.state.leases.policy();
        Ok(Response::new(HeartbeatResponse {
            worker_renewed: renewed.worker_renewed,
            worker_ttl_ms: if renewed.worker_renewed {
                u32::try_from(policy.ttl_ms).unwrap_or(u32::MAX)
            } else {
                0
            },
        }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let caller = caller_role(&request)?;
        let peer = request.remote_addr();
        let lease_id = request.into_inner().lease_id;
        self.check_lease_role(lease_id, caller, peer).await?;
        let left = self
            .state
            .leases
            .deregister(lease_id)
            .await
            .map_err(|error| store_failed(&self.state, "deregister", error))?;
        if let Some(node) = left {
            tracing::info!(%node, "node left");
            let _ = self.state.refresh_nodes().await;
        }
        Ok(Response::new(DeregisterResponse {}))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ClusterState, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = caller_role(&request)?;
        let stream = tokio_stream::wrappers::WatchStream::new(self.state.snapshots.subscribe())
            .map(move |snapshot| Ok(snapshot_for(caller, &snapshot)));
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgrid_proto::cluster::App;

    #[test]
    fn only_rooms_and_centers_see_app_secrets() {
        let snapshot = ClusterState {
            apps: vec![App {
                id: "demo".into(),
                jwt_secret: "s3cret".into(),
                previous_jwt_secret: "old".into(),
                api_key: "key".into(),
                webhook_url: "http://hook".into(),
                single_login: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        for role in pushgrid_common::auth::ROLES {
            let app = &snapshot_for(role, &snapshot).apps[0];
            // What every role needs stays.
            assert_eq!(app.id, "demo");
            assert_eq!(app.webhook_url, "http://hook");
            assert!(app.single_login);
            let secrets = [&app.jwt_secret, &app.previous_jwt_secret, &app.api_key];
            if matches!(role, Role::Room | Role::Center) {
                assert_eq!(
                    secrets,
                    [
                        &"s3cret".to_string(),
                        &"old".to_string(),
                        &"key".to_string()
                    ]
                );
            } else {
                assert!(
                    secrets.iter().all(|secret| secret.is_empty()),
                    "{role:?} sees a secret"
                );
            }
        }
    }

    #[test]
    fn only_centers_see_notification_credentials() {
        let snapshot = ClusterState {
            notify_providers: vec![pushgrid_proto::cluster::NotifyProvider {
                app: "demo".into(),
                provider: "hms".into(),
                client_id: "1".into(),
                client_secret: "s3cret".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        for role in pushgrid_common::auth::ROLES {
            let seen = snapshot_for(role, &snapshot).notify_providers;
            if role == Role::Center {
                assert_eq!(seen, snapshot.notify_providers);
            } else {
                assert!(seen.is_empty(), "{role:?} sees notification credentials");
            }
        }
    }
}
