//! The push API's other methods: `kick`, `presence`, `stats`, `info`.
//! Same envelope, authentication and error codes as `push` (see `api.rs`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use pushgrid_proto::client::KickCode;
use pushgrid_proto::cluster::coordinator_client::CoordinatorClient;
use pushgrid_proto::cluster::register_client::RegisterClient;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    KickRequest, LookupRequest, PublishRequest, Role, RoomBroadcastRequest, UserKey,
};
use serde::Deserialize;
use serde_json::json;

use crate::api::{ApiError, ApiState, Authenticated, ok, parse_json, unavailable};

pub(crate) fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/api/kick", post(kick))
        .route("/api/presence", post(presence))
        .route("/api/stats", post(stats))
        .route("/api/info", post(info))
        .route("/api/broadcast", post(broadcast))
        .with_state(state)
}

fn check_user(user: &str) -> Result<(), ApiError> {
    if user.is_empty() || user.len() > 255 {
        return Err(ApiError::bad_request(
            "user: a user id must be 1 to 255 bytes",
        ));
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KickParams {
    user: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    reason: String,
}

/// Closes a user's connections (or one device's) with a KICK frame.
async fn kick(
    State(state): State<Arc<ApiState>>,
    Authenticated(app): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    let params: KickParams = parse_json(&state, body).await?;
    check_user(&params.user)?;
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
    Ok(ok(json!({ "kicked": kicked })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceParams {
    user: String,
}

/// A user's live sessions.
async fn presence(
    State(state): State<Arc<ApiState>>,
    Authenticated(app): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    let params: PresenceParams = parse_json(&state, body).await?;
    check_user(&params.user)?;
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
    Ok(ok(
        json!({ "user": params.user, "online": !sessions.is_empty(), "sessions": sessions }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastParams {
    /// Empty or absent: every device of the app (the topic `all`).
    #[serde(default)]
    topic: String,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
}

/// Appends to the topic's stream in saver (offset, epoch), answers, then
/// hands the message to every room, one subtask per room.
async fn broadcast(
    State(state): State<Arc<ApiState>>,
    Authenticated(app): Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    let params: BroadcastParams = parse_json(&state, body).await?;
    let topic = pushgrid_wire::normalize_topic(&params.topic)
        .map_err(|reason| ApiError::bad_request(format!("topic: {reason}")))?
        .to_string();
    let payload = crate::api::decode_payload(&state, params.payload, params.payload_b64)?;
    // A place among the fan-outs in flight first: when full, nothing is stored.
    let Some(permit) = state.broadcasts.clone().try_acquire_owned().ok() else {
        return Err(crate::api::overloaded(
            &state,
            "broadcast fan-outs are at their limit; retry later",
        ));
    };
    let view = state.cluster.view();
    let saver = view
        .pick(
            Role::Saver,
            pushgrid_common::ring::user_key(&app.id, &topic),
        )
        .ok_or_else(|| unavailable("no saver is live"))?;
    let channel = state
        .channels
        .get(&saver.grpc_addr)
        .map_err(ApiError::from_status)?;
    let request = PublishRequest {
        app: app.id.clone(),
        topic: topic.clone(),
        payload,
    };
    let message = SaverClient::new(channel)
        .publish(request)
        .await
        .map_err(ApiError::from_status)?
        .into_inner()
        .message
        .ok_or_else(|| unavailable("saver answered without the stored message"))?;
    metrics::counter!("pushgrid_center_broadcasts_total").increment(1);
    let answer = json!({ "id": message.id.to_string(), "topic": topic, "offset": message.offset, "epoch": message.epoch });
    let rooms: Vec<String> = view
        .nodes_of(Role::Room)
        .map(|room| room.grpc_addr.clone())
        .collect();
    let channels: Vec<_> = rooms
        .iter()
        .filter_map(|addr| state.channels.get(addr).ok())
        .collect();
    tokio::spawn(async move {
        let _permit = permit;
        let subtasks = channels.into_iter().map(|channel| {
            let request = RoomBroadcastRequest {
                message: Some(message.clone()),
            };
            async move {
                RoomClient::new(channel)
                    .broadcast(request)
                    .await
                    .map(|answer| answer.into_inner().delivered)
            }
        });
        let mut delivered = 0u64;
        for result in futures::future::join_all(subtasks).await {
            match result {
                Ok(count) => delivered += u64::from(count),
                // Devices of that room recover the message by offset when they resubscribe.
                Err(status) => {
                    tracing::warn!(error = %status.message(), "broadcast subtask failed")
                }
            }
        }
        metrics::counter!("pushgrid_center_broadcast_deliveries_total").increment(delivered);
    });
    Ok(ok(answer))
}

/// Accepts `{}` (or an empty body) for methods without parameters.
async fn no_params(state: &ApiState, body: Body) -> Result<(), ApiError> {
    let limit = state.config.max_request_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds {limit} bytes"),
        )
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Empty {}
    serde_json::from_slice::<Empty>(&bytes)
        .map(|_| ())
        .map_err(|error| ApiError::bad_request(format!("invalid JSON body: {error}")))
}

/// Connections overall and per room, and the routing queue's depth.
async fn stats(
    State(state): State<Arc<ApiState>>,
    _: Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    no_params(&state, body).await?;
    let view = state.cluster.view();
    let rooms: Vec<_> = view
        .nodes_of(Role::Room)
        .map(|room| json!({ "node": room.id, "connections": room.load }))
        .collect();
    let online: u64 = view.nodes_of(Role::Room).map(|room| room.load).sum();
    Ok(ok(json!({
        "connections": online,
        "rooms": rooms,
        "route_queue": { "depth": state.workers.depth(), "capacity": state.config.route_queue },
    })))
}

/// The live nodes of the cluster.
async fn info(
    State(state): State<Arc<ApiState>>,
    _: Authenticated,
    body: Body,
) -> Result<Response, ApiError> {
    no_params(&state, body).await?;
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
    Ok(ok(json!({ "nodes": nodes })))
}
