//! [`ClusterView`]: an immutable snapshot of the cluster as keeper last
//! described it (nodes, apps, settings, upstream routes), with the lookups
//! roles route by.

use std::collections::HashMap;

use pushgrid_proto::cluster::{App, ClusterState, NodeInfo, Role};

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
    /// Notification provider credentials by (app, provider); centers only.
    notify_providers: HashMap<(String, String), pushgrid_proto::cluster::NotifyProvider>,
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
            notify_providers: state
                .notify_providers
                .into_iter()
                .map(|provider| ((provider.app.clone(), provider.provider.clone()), provider))
                .collect(),
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

    /// The app's credentials for a notification provider (`apns`, `fcm`,
    /// `hms`), as keeper published them to centers.
    pub fn notify_provider(
        &self,
        app: &str,
        provider: &str,
    ) -> Option<&pushgrid_proto::cluster::NotifyProvider> {
        self.notify_providers
            .get(&(app.to_string(), provider.to_string()))
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
