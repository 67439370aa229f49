//! Internal gRPC against a real `pushgrid cluster` (the launcher and its seven
//! role processes, on Redis and MariaDB): every method of every
//! role's service is called without credentials, with a key the cluster does
//! not know, with something that is not a key, and with the key of each role
//! that may not call it. Each call is refused with grpc-status 16 or 7 before
//! any handler runs, counted, and logged with the caller's address; and
//! nothing changed: the inbox is still there, no device got anything or was
//! kicked, no node or session was registered, no lease ended.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use http::HeaderValue;
use pushgrid_client::Op;
use pushgrid_common::auth::{Credentials, RoleKey, Verifiers};
use pushgrid_e2e::launcher::{Launcher, launcher_args};
use pushgrid_e2e::{
    MYSQL_SERVER, REDIS_URL, TestApp, metric_in, metrics_text, next_frame, next_push, temp_dir,
};
use pushgrid_proto::cluster::center_client::CenterClient;
use pushgrid_proto::cluster::coordinator_client::CoordinatorClient;
use pushgrid_proto::cluster::keeper_client::KeeperClient;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::*;
use serde_json::json;
use tower::ServiceExt;
use tower::util::BoxCloneService;

const WAIT: Duration = Duration::from_secs(10);

/// A `pushgrid cluster` of the test's own app and database.
struct Cluster {
    launcher: Launcher,
    app: TestApp,
    database: String,
    http: reqwest::Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = temp_dir("pushgrid-internal-auth");
        let app = TestApp::random();
        let database = format!("pg_e2e_{}", &app.id[3..]);
        let args = launcher_args(&app, &format!("{MYSQL_SERVER}/{database}"), REDIS_URL);
        let launcher = Launcher::start(&dir, &args).await.unwrap();
        Cluster {
            launcher,
            app,
            database,
            http: reqwest::Client::new(),
        }
    }

    /// The key and verifiers `pushgrid cluster` made for `role`.
    fn role_credentials(&self, role: Role) -> Credentials {
        Credentials::load(role, &self.launcher.credentials).unwrap()
    }

    async fn call(&self, method: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let center = self.launcher.addr("center-0", "http");
        let response = self
            .http
            .post(format!("http://{center}/api/{method}"))
            .header("Authorization", format!("apikey {}", self.app.api_key))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }

    async fn push(&self, user: &str, payload: &str) -> u64 {
        let (status, body) = self
            .call("push", json!({"users": [user], "payload": payload}))
            .await;
        assert_eq!(status, 200, "{body}");
        body["result"]["messages"][0]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    async fn device(
        &self,
        user: &str,
    ) -> (pushgrid_client::Connection, pushgrid_client::msg::AuthOk) {
        let room = self.launcher.addr("room-0", "tcp").to_string();
        let auth = pushgrid_client::msg::Auth {
            token: self.app.token(user),
            device_id: format!("{user}-phone"),
            platform: "test".into(),
        };
        pushgrid_client::Connection::connect(&room, auth)
            .await
            .unwrap()
    }

    /// The lines instance `name` logged (the launcher forwards them).
    fn log_of(&self, name: &str) -> Vec<String> {
        let prefix = format!("[{name}] ");
        self.launcher
            .log_text()
            .lines()
            .filter(|line| line.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }

    async fn cleanup(mut self) {
        let _ = self.launcher.stop(Duration::from_secs(60)).await;
        if let Ok(pool) =
            pushgrid_common::db::connect(&format!("{MYSQL_SERVER}/{}", self.database), 1).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS `{}`",
                self.database
            )))
            .execute(&pool)
            .await;
        }
    }
}

/// A gRPC channel whose requests carry `authorization` (or none).
type Rpc = BoxCloneService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    tonic::transport::Error,
>;

fn rpc(addr: std::net::SocketAddr, authorization: Option<HeaderValue>) -> Rpc {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    BoxCloneService::new(channel.map_request(move |mut request: http::Request<_>| {
        if let Some(value) = &authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        request
    }))
}

/// Who calls: no header, garbage, a well-formed key the cluster does not
/// know, or a role's real key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Nobody,
    Garbage,
    Stranger,
    Role(Role),
}

const EVERY_ROLE: [Role; 7] = [
    Role::Keeper,
    Role::Register,
    Role::Saver,
    Role::Coordinator,
    Role::Center,
    Role::Dispatcher,
    Role::Room,
];

/// The rule, written out here apart from the code's table: which
/// roles may call each method (every other role gets 7).
fn may_call(path: &str) -> &'static [Role] {
    match path {
        "Register/Online" | "Register/Offline" => &[Role::Room],
        "Register/Lookup" => &[Role::Center, Role::Coordinator],
        "Register/AppStats" => &[Role::Center],
        "Saver/Pending" | "Saver/PendingMany" | "Saver/Ack" | "Saver/Delivered"
        | "Saver/History" => &[Role::Room],
        "Room/Kick" => &[Role::Coordinator],
        "Coordinator/StateChanges" | "Coordinator/Upstream" => &[Role::Room],
        "Coordinator/Kick" | "Saver/RegisterTokens" => &[Role::Center, Role::Room],
        // Everything else of Saver, Room/Deliver, Room/Broadcast, Center/*.
        _ => &[Role::Center],
    }
}

/// The state a forged call would change, so that it can be checked after.
struct Target {
    app: String,
    room_id: String,
    /// Device A: connected, must receive nothing and stay connected.
    user_online: String,
    conn_online: u64,
    /// User B: offline, one message waiting in the inbox.
    user_offline: String,
    waiting_id: u64,
}

/// Calls `method` (`Service/Method`) on `rpc` with a body that would do harm
/// if it were accepted. Returns the status of the refusal (`Ok` if it was not
/// refused).
async fn call(method: &str, rpc: Rpc, target: &Target) -> Result<(), tonic::Status> {
    let app = target.app.clone();
    let forged = || Message {
        id: 4_242_424_242,
        app: target.app.clone(),
        user: target.user_online.clone(),
        payload: "forged".into(),
        created_ms: pushgrid_common::now_ms(),
        expires_ms: pushgrid_common::now_ms() + 60_000,
        ..Default::default()
    };
    let forged_broadcast = || BroadcastMessage {
        id: 4_242_424_243,
        app: target.app.clone(),
        topic: "all".into(),
        offset: 1,
        epoch: 1,
        payload: "forged".into(),
        created_ms: pushgrid_common::now_ms(),
    };
    let online_session = || Session {
        app: target.app.clone(),
        user: target.user_online.clone(),
        device: format!("{}-phone", target.user_online),
        room: target.room_id.clone(),
        conn_id: target.conn_online,
        ..Default::default()
    };
    let offline = PendingRequest {
        app: app.clone(),
        user: target.user_offline.clone(),
        limit: 10,
    };
    let done = |result: Result<(), tonic::Status>| result;
    match method {
        "Keeper/Register" => done(
            KeeperClient::new(rpc)
                .register(RegisterNodeRequest {
                    node: Some(NodeInfo {
                        id: "rogue-room".into(),
                        role: Role::Room as i32,
                        grpc_addr: "127.0.0.1:9".into(),
                        tcp_addr: "127.0.0.1:9".into(),
                        ..Default::default()
                    }),
                    ttl_secs: 60,
                    preferred_worker_id: None,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Keeper/Watch" => done(
            KeeperClient::new(rpc)
                .watch(WatchRequest {})
                .await
                .map(|_| ()),
        ),
        "Register/Online" => done(
            RegisterClient::new(rpc)
                .online(SessionBatch {
                    sessions: vec![Session {
                        user: "rogue".into(),
                        conn_id: 999,
                        ..online_session()
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Register/Offline" => done(
            RegisterClient::new(rpc)
                .offline(SessionBatch {
                    sessions: vec![online_session()],
                })
                .await
                .map(|_| ()),
        ),
        "Register/Lookup" => done(
            RegisterClient::new(rpc)
                .lookup(LookupRequest {
                    users: vec![UserKey {
                        app,
                        user: target.user_online.clone(),
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Register/AppStats" => done(
            RegisterClient::new(rpc)
                .app_stats(AppStatsRequest { app })
                .await
                .map(|_| ()),
        ),
        "Saver/Store" => done(
            SaverClient::new(rpc)
                .store(StoreRequest {
                    app,
                    users: vec![target.user_offline.clone()],
                    payload: "forged".into(),
                    ttl_secs: 60,
                    idempotency_key: String::new(),
                })
                .await
                .map(|_| ()),
        ),
        "Saver/StoreMany" => done(
            SaverClient::new(rpc)
                .store_many(StoreManyRequest {
                    items: vec![StoreItem {
                        app,
                        user: target.user_offline.clone(),
                        payload: "forged".into(),
                        ttl_secs: 60,
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Saver/Pending" => done(SaverClient::new(rpc).pending(offline).await.map(|_| ())),
        "Saver/PendingMany" => done(
            SaverClient::new(rpc)
                .pending_many(PendingManyRequest {
                    requests: vec![offline],
                })
                .await
                .map(|_| ()),
        ),
        "Saver/Ack" => done(
            SaverClient::new(rpc)
                .ack(AckRequest {
                    items: vec![AckItem {
                        app,
                        user: target.user_offline.clone(),
                        msg_ids: vec![target.waiting_id],
                        device: String::new(),
                        delivered_ms: Vec::new(),
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Saver/Publish" => done(
            SaverClient::new(rpc)
                .publish(PublishRequest {
                    app,
                    topic: "all".into(),
                    payload: "forged".into(),
                })
                .await
                .map(|_| ()),
        ),
        "Saver/History" => done(
            SaverClient::new(rpc)
                .history(HistoryRequest {
                    app,
                    topic: "all".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Saver/Bind" | "Saver/Unbind" => {
            let request = GroupUsersRequest {
                app,
                group: "g".into(),
                users: vec![target.user_offline.clone()],
            };
            let mut saver = SaverClient::new(rpc);
            done(if method == "Saver/Bind" {
                saver.bind(request).await.map(|_| ())
            } else {
                saver.unbind(request).await.map(|_| ())
            })
        }
        "Saver/GroupMembers" => done(
            SaverClient::new(rpc)
                .group_members(GroupMembersRequest {
                    app,
                    group: "g".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Saver/UserGroups" => done(
            SaverClient::new(rpc)
                .user_groups(UserGroupsRequest {
                    app,
                    user: target.user_offline.clone(),
                })
                .await
                .map(|_| ()),
        ),
        "Saver/StartGroupPush" => done(
            SaverClient::new(rpc)
                .start_group_push(StartGroupPushRequest {
                    app,
                    group: "g".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Saver/StoreChildren" => done(
            SaverClient::new(rpc)
                .store_children(StoreChildrenRequest {
                    app,
                    users: vec![target.user_offline.clone()],
                    payload: "forged".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Saver/GroupPushProgress" => done(
            SaverClient::new(rpc)
                .group_push_progress(GroupPushProgressRequest {
                    app,
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Saver/Delivered" => done(
            SaverClient::new(rpc)
                .delivered(DeliveredRequest::default())
                .await
                .map(|_| ()),
        ),
        "Saver/MessageStatus" => done(
            SaverClient::new(rpc)
                .message_status(MessageStatusRequest {
                    app,
                    id: target.waiting_id,
                })
                .await
                .map(|_| ()),
        ),
        "Saver/RegisterTokens" => done(
            SaverClient::new(rpc)
                .register_tokens(RegisterTokensRequest {
                    app,
                    tokens: vec![DevicePushToken {
                        user: "auth-probe".into(),
                        provider: "fcm".into(),
                        token: "probe-token".into(),
                        bundle: "com.example".into(),
                        ..DevicePushToken::default()
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Saver/ListTokens" => done(
            SaverClient::new(rpc)
                .list_tokens(ListTokensRequest {
                    app,
                    user: "auth-probe".into(),
                    users: Vec::new(),
                })
                .await
                .map(|_| ()),
        ),
        "Saver/RemoveTokens" => done(
            SaverClient::new(rpc)
                .remove_tokens(RemoveTokensRequest {
                    app,
                    tokens: Vec::new(),
                    user: "auth-probe".into(),
                })
                .await
                .map(|_| ()),
        ),
        "Room/Deliver" => done(
            RoomClient::new(rpc)
                .deliver(DeliverRequest {
                    deliveries: vec![Delivery {
                        conn_id: target.conn_online,
                        message: Some(forged()),
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Room/Kick" => done(
            RoomClient::new(rpc)
                .kick(RoomKickRequest {
                    conn_ids: vec![target.conn_online],
                    code: 1,
                    reason: "forged".into(),
                })
                .await
                .map(|_| ()),
        ),
        "Room/Broadcast" => done(
            RoomClient::new(rpc)
                .broadcast(RoomBroadcastRequest {
                    message: Some(forged_broadcast()),
                })
                .await
                .map(|_| ()),
        ),
        "Coordinator/StateChanges" => done(
            CoordinatorClient::new(rpc)
                .state_changes(StateBatch {
                    events: vec![StateEvent {
                        session: Some(online_session()),
                        online: false,
                        at_ms: 1,
                    }],
                })
                .await
                .map(|_| ()),
        ),
        "Coordinator/Upstream" => done(
            CoordinatorClient::new(rpc)
                .upstream(UpstreamRequest {
                    app,
                    user: target.user_online.clone(),
                    product: "p".into(),
                    payload: "forged".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Coordinator/Kick" => done(
            CoordinatorClient::new(rpc)
                .kick(KickRequest {
                    app,
                    user: target.user_online.clone(),
                    code: 1,
                    reason: "forged".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        "Center/BroadcastSubtasks" => done(
            CenterClient::new(rpc)
                .broadcast_subtasks(BroadcastSubtasksRequest {
                    message: Some(forged_broadcast()),
                    rooms: Vec::new(),
                })
                .await
                .map(|_| ()),
        ),
        other => panic!("no call written for {other}"),
    }
}

/// Every method of cluster.proto but keeper's (checked on their own below),
/// with the process serving it.
const METHODS: &[&str] = &[
    "Register/Online",
    "Register/Offline",
    "Register/Lookup",
    "Register/AppStats",
    "Saver/Store",
    "Saver/StoreMany",
    "Saver/Pending",
    "Saver/PendingMany",
    "Saver/Ack",
    "Saver/Publish",
    "Saver/History",
    "Saver/Bind",
    "Saver/Unbind",
    "Saver/GroupMembers",
    "Saver/UserGroups",
    "Saver/StartGroupPush",
    "Saver/StoreChildren",
    "Saver/GroupPushProgress",
    "Saver/Delivered",
    "Saver/MessageStatus",
    "Saver/RegisterTokens",
    "Saver/ListTokens",
    "Saver/RemoveTokens",
    "Room/Deliver",
    "Room/Kick",
    "Room/Broadcast",
    "Coordinator/StateChanges",
    "Coordinator/Upstream",
    "Coordinator/Kick",
    "Center/BroadcastSubtasks",
];

#[test]
fn the_list_covers_every_method_of_cluster_proto() {
    let proto = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../proto/cluster.proto"
    ))
    .unwrap();
    let mut service = "";
    let mut declared = Vec::new();
    for line in proto.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("service ") {
            service = name.trim_end_matches('{').trim();
        } else if let Some(rest) = line.strip_prefix("rpc ") {
            let method = rest.split('(').next().unwrap().trim();
            declared.push(format!("{service}/{method}"));
        }
    }
    for method in &declared {
        assert!(
            method.starts_with("Keeper/") || METHODS.contains(&method.as_str()),
            "{method} is not exercised by this suite"
        );
    }
    assert!(declared.len() > METHODS.len(), "keeper's methods too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_internal_method_refuses_callers_without_the_right_role_key() {
    let cluster = Cluster::start().await;
    let app = cluster.app.id.clone();

    // User B is offline with one message waiting; device A is online.
    let waiting_id = cluster.push("bea", "waiting").await;
    let (mut device_a, auth_ok) = cluster.device("ann").await;
    let (status, presence) = cluster.call("presence", json!({"user": "ann"})).await;
    assert_eq!(status, 200, "{presence}");
    let target = Target {
        app: app.clone(),
        room_id: presence["result"]["sessions"][0]["room"]
            .as_str()
            .unwrap()
            .to_string(),
        user_online: "ann".into(),
        conn_online: auth_ok.conn_id,
        user_offline: "bea".into(),
        waiting_id,
    };

    let launched = &cluster.launcher;
    let server = |name: &str| (launched.addr(name, "grpc"), launched.addr(name, "admin"));
    let servers: HashMap<&str, (std::net::SocketAddr, std::net::SocketAddr, &str)> = [
        ("Register", "register-0", "register"),
        ("Saver", "saver-0", "saver"),
        ("Room", "room-0", "room"),
        ("Coordinator", "coordinator", "coordinator"),
        ("Center", "center-0", "center"),
        ("Keeper", "keeper-0", "keeper"),
    ]
    .into_iter()
    .map(|(service, name, role)| {
        let (grpc, admin) = server(name);
        (service, (grpc, admin, role))
    })
    .collect();
    let mut before = HashMap::new();
    for (service, (_, admin, role)) in &servers {
        let text = metrics_text(*admin).await;
        let name = format!("pushgrid_{role}_grpc_refused_total");
        before.insert(*service, metric_in(&text, &name, ""));
    }

    let header = |caller: Caller| -> Option<HeaderValue> {
        match caller {
            Caller::Nobody => None,
            Caller::Garbage => Some(HeaderValue::from_static("Bearer let-me-in")),
            Caller::Stranger => Some(
                Credentials::new(RoleKey::generate(Role::Center), Verifiers::default()).header(),
            ),
            Caller::Role(role) => Some(cluster.role_credentials(role).header()),
        }
    };
    let mut refused: HashMap<&str, u32> = HashMap::new();
    let mut checked = 0;
    for method in METHODS {
        let service = method.split('/').next().unwrap();
        let (addr, _, _) = servers[service];
        let allowed = may_call(method);
        let mut callers = vec![Caller::Nobody, Caller::Garbage, Caller::Stranger];
        callers.extend(
            EVERY_ROLE
                .iter()
                .filter(|role| !allowed.contains(role))
                .map(|role| Caller::Role(*role)),
        );
        for caller in callers {
            let status = call(method, rpc(addr, header(caller)), &target)
                .await
                .expect_err(&format!("{method} by {caller:?} was not refused"));
            let path = format!("/pushgrid.cluster.{method}");
            match caller {
                Caller::Role(role) => {
                    assert_eq!(
                        status.code(),
                        tonic::Code::PermissionDenied,
                        "{method} by {caller:?}: {status:?}"
                    );
                    let role = role
                        .as_str_name()
                        .trim_start_matches("ROLE_")
                        .to_lowercase();
                    assert!(
                        status
                            .message()
                            .ends_with(&format!("a {role} may not call {path}")),
                        "{method} by {caller:?}: {status:?}"
                    );
                }
                Caller::Nobody => {
                    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{method}");
                    assert!(
                        status.message().contains("no cluster credential"),
                        "{status:?}"
                    );
                }
                Caller::Garbage => {
                    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{method}");
                    assert!(
                        status.message().contains("not a pushgrid role key"),
                        "{status:?}"
                    );
                }
                Caller::Stranger => {
                    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{method}");
                    assert!(
                        status.message().contains("not one the cluster accepts"),
                        "{status:?}"
                    );
                }
            }
            *refused.entry(service).or_default() += 1;
            checked += 1;
        }
    }

    // keeper: anyone without a key is refused; a key binds the node's role,
    // and a lease can be renewed or ended only by its own role.
    let keeper = servers["Keeper"].0;
    for caller in [Caller::Nobody, Caller::Garbage, Caller::Stranger] {
        for method in ["Keeper/Register", "Keeper/Watch"] {
            let status = call(method, rpc(keeper, header(caller)), &target)
                .await
                .expect_err("refused");
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{method} {caller:?}"
            );
            *refused.entry("Keeper").or_default() += 1;
        }
    }
    let as_role = |role: Role| KeeperClient::new(rpc(keeper, header(Caller::Role(role))));
    // A saver key registering a room ("rogue-room").
    let status = call(
        "Keeper/Register",
        rpc(keeper, header(Caller::Role(Role::Saver))),
        &target,
    )
    .await
    .expect_err("a saver key registered a room");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "a saver key cannot register a room node");
    // A real saver lease, then a room key trying to renew and end it.
    let probe = as_role(Role::Saver)
        .register(RegisterNodeRequest {
            node: Some(NodeInfo {
                id: "probe-saver".into(),
                role: Role::Saver as i32,
                grpc_addr: "127.0.0.1:9".into(),
                ..Default::default()
            }),
            ttl_secs: 60,
            preferred_worker_id: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let status = as_role(Role::Room)
        .heartbeat(HeartbeatRequest {
            lease_id: probe.lease_id,
            load: 0,
        })
        .await
        .expect_err("a room key renewed a saver's lease");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    let status = as_role(Role::Room)
        .deregister(DeregisterRequest {
            lease_id: probe.lease_id,
        })
        .await
        .expect_err("a room key ended a saver's lease");
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        status.message(),
        format!(
            "lease {} belongs to a saver node; a room key cannot renew or end it",
            probe.lease_id
        )
    );

    // Watch: the apps' secrets go only to the roles that verify them.
    for role in EVERY_ROLE {
        let mut stream = as_role(role)
            .watch(WatchRequest {})
            .await
            .unwrap()
            .into_inner();
        let state = stream.message().await.unwrap().unwrap();
        let ours = state
            .apps
            .iter()
            .find(|candidate| candidate.id == app)
            .unwrap();
        let sees = matches!(role, Role::Room | Role::Center);
        assert_eq!(
            !ours.jwt_secret.is_empty(),
            sees,
            "{role:?} and the JWT secret"
        );
        assert_eq!(!ours.api_key.is_empty(), sees, "{role:?} and the API key");
        if sees {
            assert_eq!(ours.jwt_secret, cluster.app.secret);
        }
        // Nothing registered by the refused calls; the probe is still listed.
        assert!(
            state.nodes.iter().all(|node| node.id != "rogue-room"),
            "{role:?}"
        );
        assert!(
            state.nodes.iter().any(|node| node.id == "probe-saver"),
            "{role:?}"
        );
    }
    as_role(Role::Saver)
        .deregister(DeregisterRequest {
            lease_id: probe.lease_id,
        })
        .await
        .unwrap();

    // Every refusal counted by the server that refused it, and logged with
    // the caller's address.
    for (service, (_, admin, role)) in &servers {
        let name = format!("pushgrid_{role}_grpc_refused_total");
        let after = metric_in(&metrics_text(*admin).await, &name, "");
        let expected = f64::from(refused.get(service).copied().unwrap_or(0));
        let counted = after - before[service];
        // keeper's role checks happen in its handlers, not in the layer.
        assert_eq!(counted, expected, "{name}");
    }
    for name in [
        "saver-0",
        "room-0",
        "register-0",
        "coordinator",
        "center-0",
        "keeper-0",
    ] {
        assert!(
            cluster
                .log_of(name)
                .iter()
                .any(|line| line.contains("internal call refused")
                    && line.contains("peer=127.0.0.1:")
                    && line.contains("method=/pushgrid.cluster.")),
            "{name}: no refusal line with the caller's address"
        );
    }
    // keeper's own role checks (a saver key registering a room, a room key
    // renewing and ending a saver's lease): logged with the address too.
    let keeper_refusals: Vec<String> = cluster
        .log_of("keeper-0")
        .into_iter()
        .filter(|line| line.contains("registration refused") && line.contains("peer=127.0.0.1:"))
        .collect();
    for (caller, reason) in [
        ("saver", "a saver key cannot register a room node"),
        (
            "room",
            "belongs to a saver node; a room key cannot renew or end it",
        ),
    ] {
        assert!(
            keeper_refusals
                .iter()
                .any(|line| line.contains(&format!("caller=\"{caller}\""))
                    || line.contains(&format!("caller={caller}")))
                && keeper_refusals.iter().any(|line| line.contains(reason)),
            "keeper-0: no `registration refused` line for {caller} ({reason}): {keeper_refusals:?}"
        );
    }

    // Nothing changed. Device A got no forged push and was not kicked: it
    // still answers PING, and the only thing it reads is the PONG.
    device_a.send_empty(Op::Ping, 7).await.unwrap();
    let frame = next_frame(&mut device_a, WAIT).await.unwrap().unwrap();
    assert_eq!(frame.op, Op::Pong, "device A read {frame:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(800), device_a.next_frame())
            .await
            .is_err(),
        "device A got something after the forged calls"
    );
    // Its session is still registered; no rogue session was.
    let (_, presence) = cluster.call("presence", json!({"user": "ann"})).await;
    assert_eq!(presence["result"]["online"], true, "{presence}");
    let (_, rogue) = cluster.call("presence", json!({"user": "rogue"})).await;
    assert_eq!(rogue["result"]["online"], false, "{rogue}");
    // User B's inbox holds exactly the one waiting message (not acked away,
    // nothing forged added).
    let (mut device_b, _) = cluster.device("bea").await;
    let push = next_push(&mut device_b, WAIT).await.unwrap();
    assert_eq!(push.msg_id, waiting_id);
    assert_eq!(&push.payload[..], b"waiting");
    assert!(
        tokio::time::timeout(Duration::from_millis(800), device_b.next_frame())
            .await
            .is_err(),
        "user B got a second message"
    );
    // And the cluster still works for its own roles.
    let id = cluster.push("ann", "real").await;
    assert_eq!(next_push(&mut device_a, WAIT).await.unwrap().msg_id, id);
    eprintln!("{checked} forged internal calls refused, plus keeper's checks; 0 accepted");
    drop(device_b);
    cluster.cleanup().await;
}

/// Calls `/pushgrid.cluster.<service>/NoSuchMethod` on `addr` with `key`:
/// the credential layer answers before any handler, and nothing can run.
/// 16 (UNAUTHENTICATED) means the key was not accepted; anything else (7 for
/// a method no role may call, 12 from keeper, which serves every role) means
/// it was.
async fn probe(addr: std::net::SocketAddr, service: &str, key: &str) -> tonic::Code {
    let path: http::uri::PathAndQuery = format!("/pushgrid.cluster.{service}/NoSuchMethod")
        .parse()
        .unwrap();
    let header = HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let rpc: Rpc =
        BoxCloneService::new(channel.map_request(move |mut request: http::Request<_>| {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, header.clone());
            let mut parts = request.uri().clone().into_parts();
            parts.path_and_query = Some(path.clone());
            *request.uri_mut() = http::Uri::from_parts(parts).unwrap();
            request
        }));
    match KeeperClient::new(rpc)
        .deregister(DeregisterRequest { lease_id: 0 })
        .await
    {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

/// docs/security.md's rotation, on every role at once, against a running
/// `pushgrid cluster`, with the `pushgrid credentials rotate` command:
/// `begin` (every server accepts old and new keys), `switch` (every process
/// sends its new key), `end` (old keys refused). A device stays connected
/// and receives a push after each step, new devices connect, and no real
/// call between roles is refused at any moment: each server's
/// `unknown_credential` refusals are exactly the test's own probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_every_role_key_of_a_running_cluster_refuses_no_call() {
    use pushgrid_common::auth::{ROLES, role_name};
    let cluster = Cluster::start().await;
    let dir = cluster.launcher.credentials.clone();
    let launched = &cluster.launcher;
    let servers: Vec<(&str, &str, &str, std::net::SocketAddr, std::net::SocketAddr)> = [
        ("keeper-0", "Keeper", "keeper"),
        ("register-0", "Register", "register"),
        ("saver-0", "Saver", "saver"),
        ("coordinator", "Coordinator", "coordinator"),
        ("center-0", "Center", "center"),
        ("room-0", "Room", "room"),
    ]
    .into_iter()
    .map(|(name, service, role)| {
        (
            name,
            service,
            role,
            launched.addr(name, "grpc"),
            launched.addr(name, "admin"),
        )
    })
    .collect();
    let refused_metric = |role: &str| format!("pushgrid_{role}_grpc_refused_total");
    let mut unknown_before = HashMap::new();
    for (name, _, role, _, admin) in &servers {
        let text = metrics_text(*admin).await;
        unknown_before.insert(
            *name,
            metric_in(
                &text,
                &refused_metric(role),
                "reason=\"unknown_credential\"",
            ),
        );
    }
    // Every probe the servers refused as unknown, per server.
    let mut probes_refused: HashMap<&str, f64> = HashMap::new();
    let old_keys: Vec<RoleKey> = ROLES
        .iter()
        .map(|role| (*Credentials::load(*role, &dir).unwrap().key()).clone())
        .collect();

    let (mut device, _) = cluster.device("rita").await;
    let id = cluster.push("rita", "before").await;
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, id);

    let rotate = |role: Role, step: &str| {
        let output = std::process::Command::new(pushgrid_e2e::binary("pushgrid"))
            .args(["credentials", "rotate"])
            .arg(&dir)
            .args([role_name(role), step])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "rotate {} {step}: {}",
            role_name(role),
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let reloads = |name: &str| {
        cluster
            .log_of(name)
            .iter()
            .filter(|line| line.contains("cluster credentials reloaded"))
            .count()
    };
    // Polls until every server's verdict on each key is `accepted`; counts
    // the refusals the probes caused.
    async fn until_every_server(
        servers: &[(&str, &str, &str, std::net::SocketAddr, std::net::SocketAddr)],
        keys: &[RoleKey],
        accepted: bool,
        probes_refused: &mut HashMap<&'static str, f64>,
        names: &HashMap<&str, &'static str>,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut all = true;
            for (name, service, _, grpc, _) in servers {
                for key in keys {
                    let code = probe(*grpc, service, key.expose()).await;
                    if code == tonic::Code::Unauthenticated {
                        *probes_refused.entry(names[name]).or_default() += 1.0;
                    }
                    all &= (code != tonic::Code::Unauthenticated) == accepted;
                }
            }
            if all {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            // Polls every 500 ms, not with `eventually`'s 50: each refused
            // probe is counted, and the counts are checked.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let names: HashMap<&str, &'static str> = [
        "keeper-0",
        "register-0",
        "saver-0",
        "coordinator",
        "center-0",
        "room-0",
    ]
    .into_iter()
    .map(|name| (name, name))
    .collect();

    // 1. begin: new keys next to the old ones; every server accepts both.
    for role in ROLES {
        rotate(role, "begin");
    }
    let new_keys: Vec<RoleKey> = ROLES
        .iter()
        .map(|role| {
            let file = dir.join(format!("{}.key.next", role_name(*role)));
            RoleKey::parse(&std::fs::read_to_string(file).unwrap()).unwrap()
        })
        .collect();
    assert!(
        until_every_server(&servers, &new_keys, true, &mut probes_refused, &names).await,
        "not every server accepted the new keys after `begin`"
    );
    assert!(
        until_every_server(&servers, &old_keys, true, &mut probes_refused, &names).await,
        "a server refused an old key during the rotation"
    );
    let id = cluster.push("rita", "after begin").await;
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, id);

    // 2. switch: every process (the dispatcher too) reads its new key.
    let instances = launched.instances();
    let before: HashMap<String, usize> = instances
        .iter()
        .map(|name| (name.clone(), reloads(name)))
        .collect();
    for role in ROLES {
        rotate(role, "switch");
    }
    let switched = pushgrid_e2e::eventually(Duration::from_secs(30), || async {
        instances.iter().all(|name| reloads(name) > before[name])
    })
    .await;
    assert!(
        switched,
        "not every process reloaded its key: {:?}",
        instances
            .iter()
            .map(|name| (name.clone(), reloads(name), before[name]))
            .collect::<Vec<_>>()
    );
    for role in ROLES {
        let sent = Credentials::load(role, &dir).unwrap().key();
        assert_eq!(
            sent.expose(),
            new_keys[ROLES.iter().position(|r| *r == role).unwrap()].expose()
        );
    }
    let id = cluster.push("rita", "after switch").await;
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, id);

    // 3. end: the old keys are refused everywhere; the new ones still work.
    for role in ROLES {
        rotate(role, "end");
    }
    assert!(
        until_every_server(&servers, &old_keys, false, &mut probes_refused, &names).await,
        "an old key was still accepted after `end`"
    );
    assert!(
        until_every_server(&servers, &new_keys, true, &mut probes_refused, &names).await,
        "a new key was refused after `end`"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".next") || name.ends_with(".old"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let verifiers =
        Verifiers::parse(&std::fs::read_to_string(dir.join("verifiers")).unwrap()).unwrap();
    assert_eq!(verifiers.list().len(), ROLES.len());

    // The cluster works on the new keys alone: the connected device gets a
    // push; a user offline during a push gets it from the inbox when it
    // connects (room -> register, saver), and its ACK empties the inbox.
    let id = cluster.push("rita", "after end").await;
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, id);
    let waiting = cluster.push("otto", "waiting").await;
    let (mut otto, _) = cluster.device("otto").await;
    let push = next_push(&mut otto, WAIT).await.unwrap();
    assert_eq!(push.msg_id, waiting);
    otto.send_frame(
        Op::Ack,
        0,
        &pushgrid_client::msg::Ack {
            msg_ids: vec![waiting],
        },
    )
    .await
    .unwrap();
    let acked = pushgrid_e2e::eventually(WAIT, || async {
        let (status, body) = cluster
            .call("message_status", json!({ "id": waiting.to_string() }))
            .await;
        status == 200 && body["result"]["state"] == "acked"
    })
    .await;
    assert!(
        acked,
        "the ACK (room -> saver on the new room key) was applied"
    );

    // No real call was refused at any moment: every unknown-key refusal on
    // every server is one of the probes above.
    for (name, _, role, _, admin) in &servers {
        let text = metrics_text(*admin).await;
        let counted = metric_in(
            &text,
            &refused_metric(role),
            "reason=\"unknown_credential\"",
        ) - unknown_before[name];
        let probed = probes_refused.get(name).copied().unwrap_or(0.0);
        assert_eq!(
            counted, probed,
            "{name}: {counted} calls refused with an unknown key, {probed} of them the test's probes"
        );
    }
    eprintln!(
        "rotated {} role keys; probes refused per server: {probes_refused:?}",
        ROLES.len()
    );
    drop(otto);
    drop(device);
    cluster.cleanup().await;
}
