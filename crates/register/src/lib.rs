//! register: the global session table, `(app, user) -> [(room, conn, device)]`,
//! in memory. Rooms report sessions with batched Online/Offline calls; center
//! and coordinator find a user's connections with batched Lookup calls.
//!
//! Sessions of a room whose keeper lease is gone are dropped, so a room that
//! died leaves no stale sessions behind; so are the sessions of an earlier
//! process of a room that restarted under the same node id (its new lease
//! replaces the old one at once, so the room never leaves the view).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use pushgrid_common::cli::RoleConfig;
use pushgrid_common::cluster::Cluster;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::node;
use pushgrid_common::{CancellationToken, net};
use pushgrid_proto::cluster::register_server::{Register, RegisterServer};
use pushgrid_proto::cluster::{
    AppStatsRequest, AppStatsResponse, LookupRequest, LookupResponse, Role, Session, SessionBatch,
    SessionBatchResponse, UserKey,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

mod error;

pub use error::RegisterError;

pub const ROLE: &str = "register";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RegisterConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// After a start, how long lookups are answered as `warming`: rooms re-send
    /// their sessions when they see a new register, and until they have, an
    /// empty answer may be a connected user (callers retry instead of leaving
    /// the message in the inbox).
    pub warmup_ms: u64,
}

impl Default for RegisterConfig {
    fn default() -> Self {
        RegisterConfig {
            node: NodeConfig::with_ports(7001, 9001),
            warmup_ms: 5000,
        }
    }
}

impl RoleConfig for RegisterConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}

/// The sockets register serves on, bound by the caller.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &RegisterConfig) -> pushgrid_common::StartResult<Listeners> {
        Ok(Listeners {
            grpc: net::bind(&config.node.listen).await?,
            admin: net::bind(&config.node.admin_listen).await?,
        })
    }
}

/// Sessions keyed by `app \0 user`.
#[derive(Default)]
pub struct SessionTable {
    users: DashMap<String, Vec<Session>>,
    /// Sessions held, kept beside the map so the gauge never walks it.
    count: AtomicUsize,
    /// Sessions and users per app, kept beside the map so a tenant's
    /// `stats` never walks it. Locked after `users`, never before.
    apps: DashMap<String, AppCounts>,
}

/// One app's share of a [`SessionTable`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AppCounts {
    pub sessions: usize,
    pub users: usize,
}

fn user_key(app: &str, user: &str) -> String {
    let mut key = String::with_capacity(app.len() + user.len() + 1);
    key.push_str(app);
    key.push('\0');
    key.push_str(user);
    key
}

impl SessionTable {
    pub fn online(&self, session: Session) {
        let mut sessions = self
            .users
            .entry(user_key(&session.app, &session.user))
            .or_default();
        let new_user = sessions.is_empty();
        let before = sessions.len();
        sessions.retain(|existing| {
            !(existing.room == session.room && existing.conn_id == session.conn_id)
        });
        if sessions.len() == before {
            self.count.fetch_add(1, Ordering::Relaxed);
            let mut app = self.apps.entry(session.app.clone()).or_default();
            app.sessions += 1;
            app.users += usize::from(new_user);
        }
        sessions.push(session);
    }

    /// Subtracts what left an app: `sessions` sessions and `users` users.
    fn app_left(&self, app: &str, sessions: usize, users: usize) {
        if sessions == 0 && users == 0 {
            return;
        }
        let emptied = match self.apps.get_mut(app) {
            Some(mut counts) => {
                counts.sessions = counts.sessions.saturating_sub(sessions);
                counts.users = counts.users.saturating_sub(users);
                counts.sessions == 0
            }
            None => false,
        };
        if emptied {
            self.apps.remove_if(app, |_, counts| counts.sessions == 0);
        }
    }

    /// One app's sessions and online users in this table.
    pub fn app_counts(&self, app: &str) -> AppCounts {
        self.apps.get(app).map(|counts| *counts).unwrap_or_default()
    }

    pub fn offline(&self, session: &Session) {
        let key = user_key(&session.app, &session.user);
        let emptied = match self.users.get_mut(&key) {
            Some(mut sessions) => {
                let before = sessions.len();
                sessions.retain(|existing| {
                    !(existing.room == session.room && existing.conn_id == session.conn_id)
                });
                let removed = before - sessions.len();
                self.count.fetch_sub(removed, Ordering::Relaxed);
                let emptied = removed > 0 && sessions.is_empty();
                self.app_left(&session.app, removed, usize::from(emptied));
                sessions.is_empty()
            }
            None => false,
        };
        if emptied {
            self.users
                .remove_if(&key, |_, sessions| sessions.is_empty());
        }
    }

    pub fn lookup(&self, app: &str, user: &str) -> Vec<Session> {
        self.users
            .get(&user_key(app, user))
            .map(|sessions| sessions.clone())
            .unwrap_or_default()
    }

    /// Drops every session held by a room not in `live_rooms` (node id ->
    /// `started_ms` of its process), and every session that began before its
    /// room's process started: one of an earlier process under the same id.
    /// Both times come from the room's own clock. Returns how many.
    pub fn retain_rooms(&self, live_rooms: &HashMap<String, u64>) -> usize {
        self.retain(|session| {
            live_rooms
                .get(&session.room)
                .is_some_and(|started_ms| session.since_ms >= *started_ms)
        })
    }

    /// Keeps the sessions for which `keep` holds; returns how many were dropped.
    pub fn retain(&self, keep: impl Fn(&Session) -> bool) -> usize {
        let mut dropped = 0;
        self.users.retain(|_, sessions| {
            let before = sessions.len();
            let app = sessions.first().map(|session| session.app.clone());
            sessions.retain(|session| keep(session));
            let removed = before - sessions.len();
            dropped += removed;
            if let Some(app) = app {
                self.app_left(
                    &app,
                    removed,
                    usize::from(removed > 0 && sessions.is_empty()),
                );
            }
            !sessions.is_empty()
        });
        self.count.fetch_sub(dropped, Ordering::Relaxed);
        dropped
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

struct RegisterService {
    epoch: u64,
    table: Arc<SessionTable>,
    warm_at: std::time::Instant,
}

#[tonic::async_trait]
impl Register for RegisterService {
    async fn online(
        &self,
        request: Request<SessionBatch>,
    ) -> Result<Response<SessionBatchResponse>, Status> {
        let sessions = request.into_inner().sessions;
        check_sessions(&sessions)?;
        metrics::counter!("pushgrid_register_online_total").increment(sessions.len() as u64);
        for session in sessions {
            self.table.online(session);
        }
        metrics::gauge!("pushgrid_register_sessions").set(self.table.len() as f64);
        Ok(Response::new(SessionBatchResponse { epoch: self.epoch }))
    }

    async fn offline(
        &self,
        request: Request<SessionBatch>,
    ) -> Result<Response<SessionBatchResponse>, Status> {
        let sessions = request.into_inner().sessions;
        check_sessions(&sessions)?;
        metrics::counter!("pushgrid_register_offline_total").increment(sessions.len() as u64);
        for session in &sessions {
            self.table.offline(session);
        }
        metrics::gauge!("pushgrid_register_sessions").set(self.table.len() as f64);
        Ok(Response::new(SessionBatchResponse { epoch: self.epoch }))
    }

    async fn lookup(
        &self,
        request: Request<LookupRequest>,
    ) -> Result<Response<LookupResponse>, Status> {
        let users = request.into_inner().users;
        check_user_keys(&users)?;
        metrics::counter!("pushgrid_register_lookups_total").increment(users.len() as u64);
        let mut sessions = Vec::with_capacity(users.len());
        for user in &users {
            sessions.extend(self.table.lookup(&user.app, &user.user));
        }
        Ok(Response::new(LookupResponse {
            sessions,
            epoch: self.epoch,
            warming: std::time::Instant::now() < self.warm_at,
        }))
    }

    async fn app_stats(
        &self,
        request: Request<AppStatsRequest>,
    ) -> Result<Response<AppStatsResponse>, Status> {
        let app = request.into_inner().app;
        if app.is_empty() {
            return Err(RegisterError::MissingApp.into());
        }
        let counts = self.table.app_counts(&app);
        Ok(Response::new(AppStatsResponse {
            sessions: counts.sessions as u64,
            users: counts.users as u64,
        }))
    }
}

/// The name of the first of `fields` that is empty.
fn first_empty(fields: &[(&'static str, &str)]) -> Option<&'static str> {
    fields
        .iter()
        .find(|(_, value)| value.is_empty())
        .map(|(name, _)| *name)
}

/// Refuses a batch with a session that lacks a field the table files it by.
fn check_sessions(sessions: &[Session]) -> Result<(), RegisterError> {
    for (index, session) in sessions.iter().enumerate() {
        let key = [
            ("app", session.app.as_str()),
            ("user", session.user.as_str()),
            ("room", session.room.as_str()),
        ];
        if let Some(field) = first_empty(&key) {
            return Err(RegisterError::IncompleteSession { index, field });
        }
    }
    Ok(())
}

/// Refuses a lookup with a user key that lacks its app or user.
fn check_user_keys(users: &[UserKey]) -> Result<(), RegisterError> {
    for (index, user) in users.iter().enumerate() {
        let key = [("app", user.app.as_str()), ("user", user.user.as_str())];
        if let Some(field) = first_empty(&key) {
            return Err(RegisterError::IncompleteUserKey { index, field });
        }
    }
    Ok(())
}

/// Runs register until `shutdown`.
pub async fn run(
    config: RegisterConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> pushgrid_common::StartResult<()> {
    let grpc_addr = listeners.grpc.local_addr()?;
    let endpoints = node::Endpoints {
        grpc: Some(grpc_addr),
        ..Default::default()
    };
    let cluster = node::start(
        ROLE,
        Role::Register,
        &config.node,
        listeners.admin,
        endpoints,
        &[],
        &shutdown,
    )
    .await?;
    let node_id = cluster.node_id().to_string();
    let epoch = cluster.node().started_ms;
    let table = Arc::new(SessionTable::default());
    tokio::spawn(drop_stale_sessions(
        cluster.clone(),
        table.clone(),
        shutdown.clone(),
    ));

    tracing::info!(node = %node_id, %grpc_addr, "register serving");
    net::announce(ROLE, "ready", grpc_addr);
    let service = RegisterService {
        epoch,
        table,
        warm_at: std::time::Instant::now() + std::time::Duration::from_millis(config.warmup_ms),
    };
    let served = node::serve_grpc(
        tonic::service::Routes::new(RegisterServer::new(service)),
        cluster.credentials(),
        listeners.grpc,
        &shutdown,
    )
    .await;
    cluster.leave().await;
    tracing::info!(node = %node_id, "register stopped");
    served
}

/// Keeps the table to what is true: sessions of rooms whose lease ended are
/// dropped, and so are users that the consistent hash now gives to another
/// register instance (the rooms re-send those sessions to their new owner).
async fn drop_stale_sessions(
    cluster: Cluster,
    table: Arc<SessionTable>,
    shutdown: CancellationToken,
) {
    let mut views = cluster.subscribe();
    let own_id = cluster.node_id().to_string();
    // Each pass walks the whole table, and the view changes with every
    // room's load report: a pass runs only when what it depends on changed
    // (the rooms and their processes; the register instances), and once a
    // minute for what arrived late from a room that was already gone.
    let mut sweep = tokio::time::interval(std::time::Duration::from_secs(60));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_rooms: Option<HashMap<String, u64>> = None;
    let mut last_registers: Option<Vec<String>> = None;
    loop {
        let periodic = tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = views.changed() => if changed.is_err() { return } else { false },
            _ = sweep.tick() => true,
        };
        let view = views.borrow_and_update().clone();
        if view.version == 0 {
            continue;
        }
        let live: HashMap<String, u64> = view
            .nodes_of(Role::Room)
            .map(|node| (node.id.clone(), node.started_ms))
            .collect();
        if periodic || last_rooms.as_ref() != Some(&live) {
            let dropped = table.retain_rooms(&live);
            metrics::gauge!("pushgrid_register_sessions").set(table.len() as f64);
            if dropped > 0 {
                tracing::info!(dropped, "dropped sessions of rooms whose lease ended");
                metrics::counter!("pushgrid_register_sessions_dropped_total", "reason" => "room_gone")
                    .increment(dropped as u64);
            }
            last_rooms = Some(live);
        }
        // Only while this instance is in the view: a view without it (a keeper
        // that restarted and has not seen our lease yet) says nothing of ownership.
        if view.node(&own_id).is_none() {
            continue;
        }
        let registers: Vec<String> = view
            .nodes_of(Role::Register)
            .map(|node| node.id.clone())
            .collect();
        if periodic || last_registers.as_ref() != Some(&registers) {
            let moved = table.retain(|session| {
                view.register_for(&session.app, &session.user)
                    .is_none_or(|owner| owner.id == own_id)
            });
            metrics::gauge!("pushgrid_register_sessions").set(table.len() as f64);
            if moved > 0 {
                tracing::info!(moved, "dropped sessions now owned by another register");
                metrics::counter!("pushgrid_register_sessions_dropped_total", "reason" => "moved")
                    .increment(moved as u64);
            }
            last_registers = Some(registers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_with_a_user_key_missing_its_app_or_user_is_refused() {
        let key = |app: &str, user: &str| UserKey {
            app: app.into(),
            user: user.into(),
        };
        assert_eq!(check_user_keys(&[key("a", "u")]), Ok(()));
        assert_eq!(
            check_user_keys(&[key("a", "u"), key("", "u")]),
            Err(RegisterError::IncompleteUserKey {
                index: 1,
                field: "app"
            })
        );
        assert_eq!(
            check_user_keys(&[key("a", "")]),
            Err(RegisterError::IncompleteUserKey {
                index: 0,
                field: "user"
            })
        );
    }

    #[test]
    fn a_batch_with_a_session_missing_a_key_field_is_refused() {
        let good = session("u", "room-1", 1);
        assert_eq!(check_sessions(std::slice::from_ref(&good)), Ok(()));
        for (field, broken) in [
            (
                "app",
                Session {
                    app: String::new(),
                    ..good.clone()
                },
            ),
            (
                "user",
                Session {
                    user: String::new(),
                    ..good.clone()
                },
            ),
            (
                "room",
                Session {
                    room: String::new(),
                    ..good.clone()
                },
            ),
        ] {
            assert_eq!(
                check_sessions(&[good.clone(), broken]),
                Err(RegisterError::IncompleteSession { index: 1, field })
            );
        }
    }

    fn session(user: &str, room: &str, conn_id: u64) -> Session {
        Session {
            app: "a".into(),
            user: user.into(),
            room: room.into(),
            conn_id,
            since_ms: 1_000,
            ..Default::default()
        }
    }

    #[test]
    fn online_offline_lookup() {
        let table = SessionTable::default();
        table.online(session("u", "r1", 1));
        table.online(session("u", "r2", 2));
        table.online(session("u", "r1", 1)); // a repeat replaces, not duplicates
        assert_eq!(table.lookup("a", "u").len(), 2);
        assert_eq!(table.len(), 2);
        table.offline(&session("u", "r9", 1)); // not held: nothing changes
        assert_eq!(table.len(), 2);
        table.offline(&session("u", "r1", 1));
        assert_eq!(table.lookup("a", "u"), vec![session("u", "r2", 2)]);
        table.offline(&session("u", "r2", 2));
        assert!(table.lookup("a", "u").is_empty());
        assert!(table.is_empty());
        assert_eq!(table.len(), 0);
        assert_eq!(table.app_counts("a"), AppCounts::default());
    }

    #[test]
    fn each_app_counts_only_its_own_sessions_and_users() {
        let table = SessionTable::default();
        table.online(session("u", "r1", 1));
        table.online(session("u", "r2", 2));
        table.online(session("v", "r1", 3));
        table.online(session("u", "r1", 1)); // a repeat counts once
        table.online(Session {
            app: "b".into(),
            ..session("u", "r1", 4)
        });
        let counts = |sessions, users| AppCounts { sessions, users };
        assert_eq!(table.app_counts("a"), counts(3, 2));
        assert_eq!(table.app_counts("b"), counts(1, 1));
        assert_eq!(table.app_counts("nobody"), counts(0, 0));
        table.offline(&session("u", "r1", 1));
        assert_eq!(table.app_counts("a"), counts(2, 2));
        table.offline(&session("u", "r2", 2));
        assert_eq!(table.app_counts("a"), counts(1, 1));
        table.offline(&session("u", "r2", 2)); // not held: nothing changes
        assert_eq!(table.app_counts("a"), counts(1, 1));
        // A room gone: its sessions leave both apps.
        let live: HashMap<String, u64> = [("r2".to_string(), 0)].into();
        assert_eq!(table.retain_rooms(&live), 2);
        assert_eq!(table.app_counts("a"), counts(0, 0));
        assert_eq!(table.app_counts("b"), counts(0, 0));
        assert!(table.apps.is_empty());
    }

    #[test]
    fn sessions_of_dead_rooms_are_dropped() {
        let table = SessionTable::default();
        table.online(session("u", "r1", 1));
        table.online(session("v", "r2", 2));
        let live: HashMap<String, u64> = [("r2".to_string(), 500)].into();
        assert_eq!(table.retain_rooms(&live), 1);
        assert!(table.lookup("a", "u").is_empty());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn sessions_of_a_room_restarted_under_the_same_id_are_dropped() {
        let table = SessionTable::default();
        table.online(session("u", "r1", 1)); // since 1_000, the old process
        table.online(Session {
            since_ms: 2_500,
            ..session("u", "r1", 7) // the same device, back on the new process
        });
        table.online(session("v", "r2", 2));
        // r1's new process started at 2_000; r2 has not restarted.
        let live: HashMap<String, u64> =
            [("r1".to_string(), 2_000), ("r2".to_string(), 900)].into();
        assert_eq!(table.retain_rooms(&live), 1);
        assert_eq!(table.lookup("a", "u").len(), 1);
        assert_eq!(table.lookup("a", "u")[0].conn_id, 7);
        assert_eq!(table.len(), 2);
    }
}
