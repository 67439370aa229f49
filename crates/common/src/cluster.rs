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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use pushgrid_proto::cluster::keeper_client::KeeperClient;
use pushgrid_proto::cluster::{
    App, ClusterState, DeregisterRequest, HeartbeatRequest, NodeInfo, RegisterNodeRequest,
    RegisterNodeResponse, Role, WatchRequest,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::ring::Ring;
use crate::rpc::Channel;

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

/// Roles whose nodes mint ids and are granted a fenced worker id.
const MINTS_IDS: &[Role] = &[Role::Saver];

/// How long a node waits before it tries the keepers again after none answered.
const KEEPER_RETRY: Duration = Duration::from_millis(500);

/// The keepers a node talks to: the configured addresses plus every keeper
/// the view lists. Calls go to one of them and move on to the next when it
/// does not answer, so any keeper may be down.
struct Keepers {
    configured: Vec<String>,
    known: std::sync::RwLock<Vec<String>>,
    current: AtomicUsize,
    clients: dashmap::DashMap<String, KeeperClient<Channel>>,
    /// This node's cluster credentials: every keeper call carries its key.
    credentials: Credentials,
}

/// Whether a failed call says the keeper itself is away (so another keeper
/// should be asked), not that the request was refused.
fn keeper_failed(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::Aborted
    )
}

impl Keepers {
    /// `list`: one address, or several separated by commas.
    fn parse(list: &str, credentials: Credentials) -> anyhow::Result<Keepers> {
        let configured: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|addr| !addr.is_empty())
            .map(str::to_string)
            .collect();
        if configured.is_empty() {
            anyhow::bail!(
                "no keeper address configured (`keeper`: one address or a comma-separated list)"
            );
        }
        Ok(Keepers {
            known: std::sync::RwLock::new(configured.clone()),
            configured,
            current: AtomicUsize::new(0),
            clients: dashmap::DashMap::new(),
            credentials,
        })
    }

    fn known(&self) -> Vec<String> {
        self.known
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn client(&self, addr: &str) -> Result<KeeperClient<Channel>, tonic::Status> {
        if let Some(client) = self.clients.get(addr) {
            return Ok(client.clone());
        }
        let client = KeeperClient::new(crate::rpc::lazy_channel(addr, &self.credentials)?);
        self.clients.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// The keeper calls go to first, and its client.
    fn current(&self) -> (String, Result<KeeperClient<Channel>, tonic::Status>) {
        let known = self.known();
        let addr = known[self.current.load(Ordering::Relaxed) % known.len()].clone();
        let client = self.client(&addr);
        (addr, client)
    }

    /// Moves on to the next keeper.
    fn advance(&self, from: &str) {
        let known = self.known();
        let next = known
            .iter()
            .position(|addr| addr == from)
            .map_or(0, |index| index + 1);
        self.current.store(next % known.len(), Ordering::Relaxed);
        metrics::counter!("pushgrid_cluster_keeper_failovers_total").increment(1);
    }

    /// Adds the keepers a view lists (configured addresses always stay).
    fn learn(&self, view: &ClusterView) {
        let mut learned = self.configured.clone();
        for keeper in view.nodes_of(Role::Keeper) {
            if !keeper.grpc_addr.is_empty() && !learned.contains(&keeper.grpc_addr) {
                learned.push(keeper.grpc_addr.clone());
            }
        }
        let mut known = self
            .known
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *known != learned {
            let current = known
                .get(self.current.load(Ordering::Relaxed) % known.len().max(1))
                .cloned();
            tracing::info!(keepers = ?learned, "keepers known");
            *known = learned;
            let index = current
                .and_then(|current| known.iter().position(|addr| *addr == current))
                .unwrap_or(0);
            self.current.store(index, Ordering::Relaxed);
        }
    }

    /// Runs `call` against the current keeper, then against each other one
    /// in turn while the answer says the keeper is away; any other answer
    /// (success, NOT_FOUND, a refusal) returns at once.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(KeeperClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let tries = self.known().len().max(1);
        let mut last = tonic::Status::unavailable("no keeper configured");
        for _ in 0..tries {
            let (addr, client) = self.current();
            let answer = match client {
                Ok(client) => call(client).await,
                Err(status) => Err(status),
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if keeper_failed(&status) => {
                    tracing::debug!(keeper = %addr, error = %status.message(), "keeper did not answer; trying the next");
                    self.advance(&addr);
                    last = status;
                }
                Err(status) => return Err(status),
            }
        }
        Err(last)
    }
}

/// The worker id this node may mint ids with. keeper grants it fenced
/// (`pushgrid_keeper::leases`): it is valid until a deadline counted from
/// when the node *sent* the request that granted or renewed it, which comes
/// before keeper could grant it to anyone else. From that deadline on,
/// [`WorkerLease::current`] says None and the node must not mint, until a
/// keeper renews it or grants another.
#[derive(Clone)]
pub struct WorkerLease {
    state: Arc<std::sync::Mutex<WorkerState>>,
}

#[derive(Debug, Clone, Copy)]
struct WorkerState {
    id: u32,
    generation: u64,
    /// None: none granted, or lapsed.
    valid_until: Option<tokio::time::Instant>,
    /// Lapsed since the last grant or renewal (logged once).
    lapsed: bool,
}

impl WorkerLease {
    fn none() -> WorkerLease {
        WorkerLease {
            state: Arc::new(std::sync::Mutex::new(WorkerState {
                id: 0,
                generation: 0,
                valid_until: None,
                lapsed: false,
            })),
        }
    }

    /// A worker id that never lapses (tests, a store used on its own).
    pub fn fixed(id: u32) -> WorkerLease {
        let lease = WorkerLease::none();
        lease.grant(
            id,
            0,
            tokio::time::Instant::now() + Duration::from_secs(100 * 365 * 86_400),
        );
        lease
    }

    fn state(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The worker id, while its lease is alive; None from the moment it may
    /// have lapsed.
    pub fn current(&self) -> Option<u32> {
        let state = self.state();
        state
            .valid_until
            .filter(|until| tokio::time::Instant::now() < *until)
            .map(|_| state.id)
    }

    /// The id and generation last granted (also after a lapse), for asking
    /// for the same id again.
    fn held(&self) -> (u32, u64) {
        let state = self.state();
        (state.id, state.generation)
    }

    fn grant(&self, id: u32, generation: u64, valid_until: tokio::time::Instant) {
        let mut state = self.state();
        *state = WorkerState {
            id,
            generation,
            valid_until: Some(valid_until),
            lapsed: false,
        };
        metrics::gauge!("pushgrid_cluster_worker_id").set(f64::from(id));
    }

    fn extend(&self, valid_until: tokio::time::Instant) {
        let mut state = self.state();
        if state.generation > 0 || state.valid_until.is_some() {
            state.valid_until = Some(valid_until);
            state.lapsed = false;
        }
    }

    /// Stops minting now (keeper says the id is no longer this node's).
    fn revoke(&self) {
        self.state().valid_until = None;
    }

    /// Logs the moment the lease lapses, once.
    fn note_lapse(&self) {
        let mut state = self.state();
        let lapsed = state
            .valid_until
            .is_none_or(|until| tokio::time::Instant::now() >= until);
        if lapsed && !state.lapsed && state.generation > 0 {
            state.lapsed = true;
            metrics::counter!("pushgrid_cluster_worker_lease_lapses_total").increment(1);
            tracing::error!(
                worker_id = state.id,
                "worker id lease lapsed (no keeper renewed it): not minting ids until one does"
            );
        }
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
    ) -> anyhow::Result<Cluster> {
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
            let request = inner.register_request();
            let sent_at = tokio::time::Instant::now();
            match inner
                .keepers
                .call(|mut keeper| {
                    let request = request.clone();
                    async move { keeper.register(request).await }
                })
                .await
            {
                Ok(response) => {
                    inner.registered(&response, sent_at);
                    tracing::info!(node = %inner.node.id, lease = response.lease_id, worker_id = response.worker_id, "joined cluster");
                    break;
                }
                Err(status) => {
                    tracing::warn!(keepers = ?inner.keepers.known(), error = %status.message(), "no keeper answered, retrying");
                    tokio::select! {
                        _ = inner.shutdown.cancelled() => anyhow::bail!("shut down before a keeper answered"),
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

/// Renews the lease every third of its TTL through any keeper that answers;
/// registers again when it was lost; renews or revokes the worker id.
async fn heartbeat_loop(inner: Arc<Inner>) {
    let period = Duration::from_millis(u64::from(inner.ttl_secs) * 1000 / 3);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        inner.worker.note_lapse();
        let request = HeartbeatRequest {
            lease_id: inner.lease_id.load(Ordering::Relaxed),
            load: inner.load.load(Ordering::Relaxed),
        };
        let sent_at = tokio::time::Instant::now();
        let answer = inner
            .keepers
            .call(|mut keeper| async move { keeper.heartbeat(request).await })
            .await;
        let register_again = match answer {
            Ok(renewed) => {
                if failing {
                    tracing::info!("a keeper answers again");
                    failing = false;
                }
                if !inner.mints_ids {
                    false
                } else if renewed.worker_renewed {
                    inner
                        .worker
                        .extend(sent_at + Duration::from_millis(u64::from(renewed.worker_ttl_ms)));
                    false
                } else {
                    // The lease lives but holds no worker id (any more).
                    inner.worker.revoke();
                    tracing::warn!("keeper says this node holds no worker id; registering again");
                    true
                }
            }
            Err(status) if status.code() == tonic::Code::NotFound => true,
            Err(status) => {
                if !failing {
                    tracing::warn!(keepers = ?inner.keepers.known(), error = %status.message(), "heartbeat: no keeper answered; keeping the last view");
                    failing = true;
                }
                false
            }
        };
        if register_again {
            let request = inner.register_request();
            let sent_at = tokio::time::Instant::now();
            match inner
                .keepers
                .call(|mut keeper| {
                    let request = request.clone();
                    async move { keeper.register(request).await }
                })
                .await
            {
                Ok(response) => {
                    inner.registered(&response, sent_at);
                    tracing::info!(
                        lease = response.lease_id,
                        "lease expired at keeper; registered again"
                    );
                }
                Err(status) => tracing::warn!(error = %status.message(), "re-register failed"),
            }
        }
    }
}

/// Follows a keeper's watch stream, moving to another keeper when it breaks.
/// After a break, the nodes of the last view are kept for two lease TTLs
/// even when the new stream does not list them yet: they may be
/// re-registering (after every keeper was away), and routing around live
/// peers for a moment would fail requests for nothing.
async fn watch_loop(inner: Arc<Inner>, sender: watch::Sender<Arc<ClusterView>>) {
    let grace = Duration::from_secs(u64::from(inner.ttl_secs) * 2);
    let mut last_nodes: Vec<NodeInfo> = Vec::new();
    let mut merge_until: Option<tokio::time::Instant> = None;
    let mut failures = 0usize;
    loop {
        let (addr, client) = inner.keepers.current();
        let stream = match client {
            Ok(mut keeper) => tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                result = keeper.watch(WatchRequest {}) => result,
            },
            Err(status) => Err(status),
        };
        match stream {
            Ok(response) => {
                failures = 0;
                let mut stream = response.into_inner();
                let mut latest: Option<ClusterState> = None;
                if !last_nodes.is_empty() {
                    // A stream after a break: the grace starts now that a keeper answers.
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
                            let view = ClusterView::from_state(state);
                            inner.keepers.learn(&view);
                            sender.send_replace(Arc::new(view));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::warn!(keeper = %addr, error = %status.message(), "keeper watch stream broke");
                            break;
                        }
                    }
                }
                inner.keepers.advance(&addr);
            }
            Err(status) => {
                tracing::debug!(keeper = %addr, error = %status.message(), "keeper watch failed");
                inner.keepers.advance(&addr);
                failures += 1;
            }
        }
        // Straight to the next keeper; a pause once every keeper was tried.
        if failures >= inner.keepers.known().len() || failures == 0 {
            failures = 0;
            tokio::select! {
                _ = inner.shutdown.cancelled() => return,
                _ = tokio::time::sleep(KEEPER_RETRY) => {}
            }
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
