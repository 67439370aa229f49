//! The API's methods: the one list of them ([`Method::ALL`]), the call of one
//! by name, and the small ones (`kick`, `presence`, `stats`, `info`). `push`,
//! `broadcast` and `batch` have modules of their own. Each method takes its
//! parsed parameters and answers the `result` value or an [`ApiError`], so the
//! route and a batch command run the same code.

use std::sync::Arc;

use pushgrid_proto::client::KickCode;
use pushgrid_proto::cluster::coordinator_client::CoordinatorClient;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::{App, AppStatsRequest, KickRequest, LookupRequest, Role, UserKey};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::{ApiState, Params, check_user, unavailable};

/// A `POST /api/<name>` method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Push,
    Broadcast,
    Batch,
    Kick,
    Presence,
    Stats,
    Info,
    // Groups and message status (issue 12), in groups.rs.
    Bind,
    Unbind,
    GroupMembers,
    UserGroups,
    PushGroup,
    MessageStatus,
    // Device push tokens (issue 25), in tokens.rs.
    RegisterToken,
    ListTokens,
    RemoveToken,
}

impl Method {
    /// Every method and its name, one line each. The router, batch and the
    /// OpenAPI document's test all follow this list.
    pub(crate) const ALL: &[(Method, &str)] = &[
        (Method::Push, "push"),
        (Method::Broadcast, "broadcast"),
        (Method::Batch, "batch"),
        (Method::Kick, "kick"),
        (Method::Presence, "presence"),
        (Method::Stats, "stats"),
        (Method::Info, "info"),
        (Method::Bind, "bind"),
        (Method::Unbind, "unbind"),
        (Method::GroupMembers, "group_members"),
        (Method::UserGroups, "user_groups"),
        (Method::PushGroup, "push_group"),
        (Method::MessageStatus, "message_status"),
        (Method::RegisterToken, "register_token"),
        (Method::ListTokens, "list_tokens"),
        (Method::RemoveToken, "remove_token"),
    ];

    pub(crate) fn from_name(name: &str) -> Option<Method> {
        Method::ALL
            .iter()
            .find(|(_, known)| *known == name)
            .map(|(method, _)| *method)
    }
}

/// Runs a method for the operator (the admin token): `stats` and `info` of
/// the whole cluster; every other method needs an app's API key.
pub(crate) fn call_as_admin(
    state: &Arc<ApiState>,
    method: Method,
    params: Params,
) -> Result<Value, ApiError> {
    match method {
        Method::Stats => stats(state, params.parse()?),
        Method::Info => info(state, params.parse()?),
        _ => Err(ApiError::Unauthorized(
            "this method needs an app's API key (Authorization: apikey <key>); the admin token \
             reads only stats and info"
                .into(),
        )),
    }
}

/// Runs a method that may stand in a batch (every one but `batch`).
pub(crate) async fn call_command(
    state: &Arc<ApiState>,
    app: &App,
    method: Method,
    params: Params,
) -> Result<Value, ApiError> {
    match method {
        Method::Push => crate::push::push(state, app, params.parse()?).await,
        Method::Broadcast => crate::broadcast::broadcast(state, app, params.parse()?).await,
        Method::Batch => Err(ApiError::bad_request(
            "method: a batch cannot contain another batch",
        )),
        Method::Kick => kick(state, app, params.parse()?).await,
        Method::Presence => presence(state, app, params.parse()?).await,
        Method::Stats => app_stats(state, app, params.parse()?).await,
        Method::Info => app_info(state, params.parse()?),
        Method::Bind => crate::groups::bind(state, app, params.parse()?).await,
        Method::Unbind => crate::groups::unbind(state, app, params.parse()?).await,
        Method::GroupMembers => crate::groups::group_members(state, app, params.parse()?).await,
        Method::UserGroups => crate::groups::user_groups(state, app, params.parse()?).await,
        Method::PushGroup => crate::groups::push_group(state, app, params.parse()?).await,
        Method::MessageStatus => crate::groups::message_status(state, app, params.parse()?).await,
        Method::RegisterToken => crate::tokens::register_token(state, app, params.parse()?).await,
        Method::ListTokens => crate::tokens::list_tokens(state, app, params.parse()?).await,
        Method::RemoveToken => crate::tokens::remove_token(state, app, params.parse()?).await,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KickParams {
    user: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    reason: String,
}

/// Closes a user's connections (or one device's) with a KICK frame.
async fn kick(state: &ApiState, app: &App, params: KickParams) -> Result<Value, ApiError> {
    check_user("user", &params.user)?;
    if !params.device.is_empty() {
        pushgrid_wire::check_id("a device id", &params.device)
            .map_err(|problem| ApiError::bad_request(format!("device: {problem}")))?;
    }
    let view = state.cluster.view();
    let coordinator = view
        .pick(
            Role::Coordinator,
            pushgrid_common::ring::user_key(&app.id, &params.user),
        )
        .ok_or_else(|| unavailable("no coordinator is live"))?;
    let request = KickRequest {
        app: app.id.clone(),
        user: params.user,
        device: params.device,
        code: KickCode::ByApi as i32,
        reason: if params.reason.is_empty() {
            "kicked by the application".into()
        } else {
            params.reason
        },
        ..Default::default()
    };
    let channel = state
        .channels
        .get(&coordinator.grpc_addr)
        .map_err(ApiError::from_status)?;
    let kicked = CoordinatorClient::new(channel)
        .kick(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .kicked;
    Ok(json!({ "kicked": kicked }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PresenceParams {
    user: String,
}

/// A user's live sessions.
async fn presence(state: &ApiState, app: &App, params: PresenceParams) -> Result<Value, ApiError> {
    check_user("user", &params.user)?;
    let view = state.cluster.view();
    let register = view
        .register_for(&app.id, &params.user)
        .ok_or_else(|| unavailable("no register is live"))?;
    let channel = state
        .channels
        .get(&register.grpc_addr)
        .map_err(ApiError::from_status)?;
    let lookup = LookupRequest {
        users: vec![UserKey {
            app: app.id.clone(),
            user: params.user.clone(),
        }],
    };
    let sessions = RegisterClient::new(channel)
        .lookup(lookup)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .sessions;
    let sessions: Vec<_> = sessions
        .iter()
        .map(|session| {
            json!({
                "device": session.device,
                "platform": session.platform,
                "room": session.room,
                "conn_id": session.conn_id.to_string(),
                "since_ms": session.since_ms,
            })
        })
        .collect();
    Ok(json!({ "user": params.user, "online": !sessions.is_empty(), "sessions": sessions }))
}

/// The parameters of a method that takes none: `{}` (or an empty body).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// One app's connections and online users, summed over every register
/// (each holds the users the shared hash gives it): nothing of other apps
/// and nothing of the cluster's shape.
async fn app_stats(state: &ApiState, app: &App, _: NoParams) -> Result<Value, ApiError> {
    let registers: Vec<String> = state
        .cluster
        .view()
        .nodes_of(Role::Register)
        .map(|node| node.grpc_addr.clone())
        .collect();
    if registers.is_empty() {
        return Err(unavailable("no register is live"));
    }
    let asks = registers.iter().map(|addr| {
        let channel = state.channels.get(addr);
        let request = AppStatsRequest {
            app: app.id.clone(),
        };
        async move {
            RegisterClient::new(channel?)
                .app_stats(request)
                .await
                .map(tonic::Response::into_inner)
        }
    });
    let mut connections = 0;
    let mut users = 0;
    for answer in futures::future::join_all(asks).await {
        let counts = answer.map_err(ApiError::from_status)?;
        connections += counts.sessions;
        users += counts.users;
    }
    Ok(json!({ "app": app.id, "connections": connections, "users": users }))
}

/// The live nodes as an app may see them: ids and roles, no addresses,
/// loads or labels (those are the operator's, with the admin token).
fn app_info(state: &ApiState, _: NoParams) -> Result<Value, ApiError> {
    let view = state.cluster.view();
    let nodes: Vec<_> = view
        .nodes
        .iter()
        .map(|node| {
            json!({
                "id": node.id,
                "role": node.role().as_str_name().trim_start_matches("ROLE_").to_lowercase(),
                "started_ms": node.started_ms,
            })
        })
        .collect();
    Ok(json!({ "nodes": nodes }))
}

/// The whole cluster (admin token): connections overall and per room, and
/// the routing queue's depth.
fn stats(state: &ApiState, _: NoParams) -> Result<Value, ApiError> {
    let view = state.cluster.view();
    let rooms: Vec<_> = view
        .nodes_of(Role::Room)
        .map(|room| json!({ "node": room.id, "connections": room.load }))
        .collect();
    let online: u64 = view.nodes_of(Role::Room).map(|room| room.load).sum();
    Ok(json!({
        "connections": online,
        "rooms": rooms,
        "route_queue": { "depth": state.workers.depth(), "capacity": state.config.route_queue },
    }))
}

/// The live nodes of the cluster with their addresses (admin token).
fn info(state: &ApiState, _: NoParams) -> Result<Value, ApiError> {
    let view = state.cluster.view();
    let nodes: Vec<_> = view
        .nodes
        .iter()
        .map(|node| {
            json!({
                "id": node.id,
                "role": node.role().as_str_name().trim_start_matches("ROLE_").to_lowercase(),
                "grpc": node.grpc_addr,
                "http": node.http_addr,
                "tcp": node.tcp_addr,
                "admin": node.admin_addr,
                "load": node.load,
                "started_ms": node.started_ms,
                "labels": node.labels,
            })
        })
        .collect();
    Ok(json!({ "nodes": nodes }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_has_one_name_and_is_found_by_it() {
        for &(method, name) in Method::ALL {
            assert_eq!(Method::from_name(name), Some(method), "{name}");
            assert_eq!(
                Method::ALL
                    .iter()
                    .filter(|(_, other)| *other == name)
                    .count(),
                1,
                "{name} is listed twice"
            );
        }
        assert_eq!(Method::from_name("nope"), None);
    }
}
