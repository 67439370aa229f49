//! Membership in a pushgrid cluster: register with a keeper under a lease,
//! keep the lease alive, and follow a keeper's watch stream of nodes and
//! config.
//!
//! A node is given one keeper address or several (and learns the others from
//! the view); every call moves on to the next keeper when one does not
//! answer. A node keeps its last view while no keeper is reachable, and
//! registers again (asking for the same worker id) when keeper says the
//! lease is unknown, so a keeper restart or a keeper outage loses no traffic.
//! Savers mint ids only while their fenced worker id is valid
//! ([`WorkerLease`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use pushgrid_proto::cluster::{
    DeregisterRequest, NodeInfo, RegisterNodeRequest, RegisterNodeResponse, Role,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;

mod keepers;
mod tasks;
mod view;
mod worker_lease;

use self::keepers::Keepers;
use self::tasks::{heartbeat_loop, watch_loop};
pub use self::view::ClusterView;
pub use self::worker_lease::WorkerLease;

/// Roles whose nodes mint ids and are granted a fenced worker id.
const MINTS_IDS: &[Role] = &[Role::Saver];

/// This node's membership: its lease, worker id and the live cluster view.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: NodeInfo,
    ttl_secs: u32,
    keepers: Keepers,
    lease_id: AtomicU64,
    /// Set for roles that mint ids (savers).
    mints_ids: bool,
    worker: WorkerLease,
    /// Kept for callers that show the id; follows the lease.
    worker_id: Arc<AtomicU32>,
    load: AtomicU64,
    view: watch::Receiver<Arc<ClusterView>>,
    shutdown: CancellationToken,
}

impl Inner {
    fn register_request(&self) -> RegisterNodeRequest {
        let mut node = self.node.clone();
        node.load = self.load.load(Ordering::Relaxed);
        let (held_id, generation) = self.worker.held();
        RegisterNodeRequest {
            node: Some(node),
            ttl_secs: self.ttl_secs,
            preferred_worker_id: (generation > 0).then_some(held_id),
            needs_worker_id: self.mints_ids,
            worker_generation: generation,
        }
    }

    /// Registers (again) with a keeper and takes its answer.
    async fn register(&self) -> Result<RegisterNodeResponse, tonic::Status> {
        let request = self.register_request();
        let sent_at = tokio::time::Instant::now();
        let response = self
            .keepers
            .call(|mut keeper| {
                let request = request.clone();
                async move { keeper.register(request).await }
            })
            .await?;
        self.registered(&response, sent_at);
        Ok(response)
    }

    /// Takes a Register answer sent at `sent_at`.
    fn registered(&self, response: &RegisterNodeResponse, sent_at: tokio::time::Instant) {
        self.lease_id.store(response.lease_id, Ordering::Relaxed);
        if !self.mints_ids {
            return;
        }
        let (before, _) = self.worker.held();
        let valid_until = sent_at + Duration::from_millis(u64::from(response.worker_ttl_ms));
        self.worker
            .grant(response.worker_id, response.worker_generation, valid_until);
        self.worker_id.store(response.worker_id, Ordering::Relaxed);
        if before != response.worker_id {
            tracing::info!(
                worker_id = response.worker_id,
                generation = response.worker_generation,
                "worker id granted"
            );
        }
    }
}

impl Cluster {
    /// Registers `node` with a keeper of `keeper_addrs` (one address or a
    /// comma-separated list; retrying until one answers or `shutdown`),
    /// starts the heartbeat and watch tasks and waits for the first cluster
    /// view. Nodes of roles that mint ids (savers) are granted a fenced
    /// worker id ([`Cluster::worker_lease`]). Every call carries
    /// `credentials`' key.
    pub async fn join(
        keeper_addrs: &str,
        node: NodeInfo,
        ttl_secs: u32,
        credentials: Credentials,
        shutdown: CancellationToken,
    ) -> crate::StartResult<Cluster> {
        let keepers = Keepers::parse(keeper_addrs, credentials)?;
        let ttl_secs = ttl_secs.max(2);
        let (view_sender, view) = watch::channel(Arc::new(ClusterView::default()));
        let inner = Arc::new(Inner {
            mints_ids: MINTS_IDS.contains(&node.role()),
            node,
            ttl_secs,
            keepers,
            lease_id: AtomicU64::new(0),
            worker: WorkerLease::none(),
            worker_id: Arc::new(AtomicU32::new(0)),
            load: AtomicU64::new(0),
            view,
            shutdown,
        });
        let mut backoff = Duration::from_millis(100);
        loop {
            match inner.register().await {
                Ok(response) => {
                    tracing::info!(node = %inner.node.id, lease = response.lease_id, worker_id = response.worker_id, "joined cluster");
                    break;
                }
                Err(status) => {
                    tracing::warn!(keepers = ?inner.keepers.known(), error = %status.message(), "no keeper answered, retrying");
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => {
                            return Err(crate::StartError::Keeper("shut down before a keeper answered".into()));
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
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

    /// This node's cluster credentials: channels to peers send its key.
    pub fn credentials(&self) -> &Credentials {
        &self.inner.keepers.credentials
    }

    /// The fenced worker id this node mints ids with (savers): None while
    /// no keeper has renewed it in time.
    pub fn worker_lease(&self) -> WorkerLease {
        self.inner.worker.clone()
    }

    /// The worker id last granted (it may change after a lost lease); for
    /// display. Minting goes through [`Cluster::worker_lease`].
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
        let request = DeregisterRequest { lease_id };
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.inner
                .keepers
                .call(|mut keeper| async move { keeper.deregister(request).await }),
        )
        .await;
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
