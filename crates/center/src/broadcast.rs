//! `broadcast`: appends to the topic's stream in saver (offset, epoch),
//! answers, then hands the message to every room: one subtask per room.
//!
//! With several centers the subtasks are shared: the accepting center keeps
//! every n-th room (n = live centers) and sends each other center its rooms
//! with one `BroadcastSubtasks` call. A center that cannot take its share
//! (gone, or at its fan-out limit) leaves it to the accepting center, which
//! runs it itself, so a broadcast never waits on a missing peer.

use std::sync::Arc;

use futures::future::join_all;
use pushgrid_common::cluster::ClusterView;
use pushgrid_common::rpc::ChannelPool;
use pushgrid_proto::cluster::center_client::CenterClient;
use pushgrid_proto::cluster::center_server::Center;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{
    App, BroadcastMessage, BroadcastSubtasksRequest, BroadcastSubtasksResponse, PublishRequest,
    Role, RoomBroadcastRequest,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OwnedSemaphorePermit;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::state::{ApiState, decode_payload, overloaded, unavailable};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BroadcastParams {
    /// Empty or absent: every device of the app (the topic `all`).
    #[serde(default)]
    topic: String,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    payload_b64: Option<String>,
}

pub(crate) async fn broadcast(
    state: &Arc<ApiState>,
    app: &App,
    params: BroadcastParams,
) -> Result<Value, ApiError> {
    let topic = pushgrid_wire::normalize_topic(&params.topic)
        .map_err(|reason| ApiError::bad_request(format!("topic: {reason}")))?
        .to_string();
    let payload = decode_payload(state, params.payload, params.payload_b64)?;
    // A place among the fan-outs in flight first: when full, nothing is stored.
    let Some(permit) = state.broadcasts.clone().try_acquire_owned().ok() else {
        return Err(overloaded(
            state,
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
    let answer = json!({
        "id": message.id.to_string(),
        "topic": topic,
        "offset": message.offset,
        "epoch": message.epoch,
    });
    let plan = Plan::new(&view, state.cluster.node_id());
    tokio::spawn(fan_out(state.clone(), message, plan, permit));
    Ok(answer)
}

/// Which center runs which room's subtask.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// Rooms (gRPC addresses) this center hands the message to itself.
    local: Vec<String>,
    /// Other centers (gRPC addresses) and the rooms each is asked to take.
    peers: Vec<(String, Vec<String>)>,
}

impl Plan {
    /// Deals the rooms round-robin over the live centers, this one first.
    fn new(view: &ClusterView, self_id: &str) -> Plan {
        let mut rooms: Vec<String> = view
            .nodes_of(Role::Room)
            .map(|room| room.grpc_addr.clone())
            .filter(|addr| !addr.is_empty())
            .collect();
        rooms.sort();
        let mut others: Vec<(&str, &str)> = view
            .nodes_of(Role::Center)
            .filter(|center| center.id != self_id && !center.grpc_addr.is_empty())
            .map(|center| (center.id.as_str(), center.grpc_addr.as_str()))
            .collect();
        others.sort();
        let mut plan = Plan {
            local: Vec::new(),
            peers: others
                .iter()
                .map(|(_, addr)| (addr.to_string(), Vec::new()))
                .collect(),
        };
        let centers = others.len() + 1;
        for (index, room) in rooms.into_iter().enumerate() {
            match index % centers {
                0 => plan.local.push(room),
                peer => plan.peers[peer - 1].1.push(room),
            }
        }
        plan.peers.retain(|(_, rooms)| !rooms.is_empty());
        plan
    }
}

/// Runs this center's subtasks and has the peers run theirs, all at once;
/// a peer's share that fails comes back here.
async fn fan_out(
    state: Arc<ApiState>,
    message: BroadcastMessage,
    plan: Plan,
    _permit: OwnedSemaphorePermit,
) {
    let local = run_subtasks(&state.channels, &message, &plan.local, "local");
    let shared = plan.peers.iter().map(|(center, rooms)| {
        let (state, message) = (&state, &message);
        async move {
            metrics::counter!("pushgrid_center_broadcast_subtasks_shared_total")
                .increment(rooms.len() as u64);
            let request = BroadcastSubtasksRequest {
                message: Some(message.clone()),
                rooms: rooms.clone(),
            };
            let answer = match state.channels.get(center) {
                Ok(channel) => CenterClient::new(channel)
                    .broadcast_subtasks(request)
                    .await
                    .map(Response::into_inner),
                Err(status) => Err(status),
            };
            match answer {
                Ok(answer) => {
                    if answer.failed_rooms > 0 {
                        tracing::warn!(%center, failed = answer.failed_rooms, "rooms missed a shared broadcast");
                    }
                }
                Err(status) => {
                    tracing::warn!(%center, error = %status.message(), "a center did not take its broadcast subtasks; running them here");
                    metrics::counter!("pushgrid_center_broadcast_subtask_fallbacks_total")
                        .increment(rooms.len() as u64);
                    run_subtasks(&state.channels, message, rooms, "local").await;
                }
            }
        }
    });
    let (_, _) = tokio::join!(local, join_all(shared));
}

/// Hands `message` to each room in `rooms` at once; answers the connections
/// it reached and how many rooms failed. A room that fails loses nothing
/// durable: its devices recover the message by offset when they resubscribe.
async fn run_subtasks(
    channels: &ChannelPool,
    message: &BroadcastMessage,
    rooms: &[String],
    origin: &'static str,
) -> (u64, u32) {
    if rooms.is_empty() {
        return (0, 0);
    }
    metrics::counter!("pushgrid_center_broadcast_subtasks_total", "origin" => origin)
        .increment(rooms.len() as u64);
    let subtasks = rooms.iter().map(|room| async move {
        let channel = channels.get(room)?;
        let request = RoomBroadcastRequest {
            message: Some(message.clone()),
        };
        RoomClient::new(channel)
            .broadcast(request)
            .await
            .map(|answer| answer.into_inner().delivered)
    });
    let mut delivered = 0u64;
    let mut failed = 0u32;
    for (room, result) in rooms.iter().zip(join_all(subtasks).await) {
        match result {
            Ok(count) => delivered += u64::from(count),
            Err(status) => {
                failed += 1;
                tracing::warn!(%room, error = %status.message(), "broadcast subtask failed");
            }
        }
    }
    metrics::counter!("pushgrid_center_broadcast_deliveries_total", "origin" => origin)
        .increment(delivered);
    (delivered, failed)
}

/// center's gRPC service: the subtasks of broadcasts other centers accepted.
pub(crate) struct CenterService {
    pub(crate) state: Arc<ApiState>,
}

#[tonic::async_trait]
impl Center for CenterService {
    async fn broadcast_subtasks(
        &self,
        request: Request<BroadcastSubtasksRequest>,
    ) -> Result<Response<BroadcastSubtasksResponse>, Status> {
        let request = request.into_inner();
        let message = request
            .message
            .ok_or_else(|| Status::invalid_argument("message is required"))?;
        // Only rooms of the cluster: this call never makes center dial an
        // address it does not know. An unknown room (a view that lags) sends
        // the whole share back to the caller, who knows it.
        let view = self.state.cluster.view();
        if let Some(unknown) = request.rooms.iter().find(|room| {
            !view
                .nodes_of(Role::Room)
                .any(|node| &node.grpc_addr == *room)
        }) {
            return Err(Status::failed_precondition(format!(
                "{unknown} is not a room this center knows"
            )));
        }
        let Ok(_permit) = self.state.broadcasts.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "broadcast fan-outs are at their limit",
            ));
        };
        let (delivered, failed_rooms) =
            run_subtasks(&self.state.channels, &message, &request.rooms, "peer").await;
        Ok(Response::new(BroadcastSubtasksResponse {
            delivered: delivered.min(u64::from(u32::MAX)) as u32,
            failed_rooms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushgrid_proto::cluster::{ClusterState, NodeInfo};

    fn node(id: &str, role: Role, grpc: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            role: role as i32,
            grpc_addr: grpc.into(),
            ..Default::default()
        }
    }

    fn view(nodes: Vec<NodeInfo>) -> ClusterView {
        ClusterView::from_state(ClusterState {
            nodes,
            ..Default::default()
        })
    }

    #[test]
    fn rooms_are_dealt_over_the_live_centers_starting_here() {
        let rooms =
            (0..5).map(|index| node(&format!("r{index}"), Role::Room, &format!("room:{index}")));
        let centers = [
            node("c-b", Role::Center, "center:b"),
            node("c-a", Role::Center, "center:a"),
            node("c-c", Role::Center, "center:c"),
        ];
        let view = view(rooms.chain(centers).collect());
        let plan = Plan::new(&view, "c-b");
        assert_eq!(plan.local, ["room:0", "room:3"]);
        assert_eq!(
            plan.peers,
            [
                (
                    "center:a".to_string(),
                    vec!["room:1".to_string(), "room:4".to_string()]
                ),
                ("center:c".to_string(), vec!["room:2".to_string()]),
            ]
        );
        let every: usize = plan.local.len()
            + plan
                .peers
                .iter()
                .map(|(_, rooms)| rooms.len())
                .sum::<usize>();
        assert_eq!(every, 5, "each room exactly once");
    }

    #[test]
    fn a_lone_center_keeps_every_room_and_idle_peers_get_no_call() {
        let view = view(vec![
            node("r0", Role::Room, "room:0"),
            node("c-a", Role::Center, "center:a"),
            node("c-b", Role::Center, "center:b"),
            node("c-c", Role::Center, ""),
        ]);
        let plan = Plan::new(&view, "c-a");
        assert_eq!(plan.local, ["room:0"]);
        assert!(plan.peers.is_empty(), "{plan:?}");
        let alone = Plan::new(
            &super::tests::view(vec![
                node("r0", Role::Room, "room:0"),
                node("r1", Role::Room, "room:1"),
            ]),
            "c-a",
        );
        assert_eq!(alone.local, ["room:0", "room:1"]);
    }
}
