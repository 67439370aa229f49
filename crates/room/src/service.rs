//! The `Room` RPC service: center hands over messages for live connections.

use std::sync::Arc;

use pushgrid_proto::client::KickCode;
use pushgrid_proto::client::{Push, PushKind};
use pushgrid_proto::cluster::room_server::Room as RoomRpc;
use pushgrid_proto::cluster::{
    DeliverRequest, DeliverResponse, RoomBroadcastRequest, RoomBroadcastResponse, RoomKickRequest,
    RoomKickResponse,
};
use pushgrid_wire::{Op, encode};
use tonic::{Request, Response, Status};

use crate::outbox::{PerShard, Wakes};
use crate::shard::Broadcast;
use crate::{ConnHandle, Room};

pub(crate) struct RoomService {
    room: Arc<Room>,
}

impl RoomService {
    pub fn new(room: Arc<Room>) -> RoomService {
        RoomService { room }
    }
}

#[tonic::async_trait]
impl RoomRpc for RoomService {
    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let mut delivered = 0;
        let mut missing = 0;
        let mut wakes = Wakes::default();
        for delivery in request.into_inner().deliveries {
            let Some(message) = delivery.message else {
                return Err(Status::invalid_argument("delivery without a message"));
            };
            let conn = self
                .room
                .conns
                .get(&delivery.conn_id)
                .map(|entry| entry.value().clone());
            // The connection must still belong to the message's user: a stale
            // session must never route one user's message to another.
            let Some(conn) =
                conn.filter(|conn| *conn.app == *message.app && conn.user() == message.user)
            else {
                missing += 1;
                continue;
            };
            let frame = encode(
                Op::Push,
                0,
                &Push {
                    msg_id: message.id,
                    kind: PushKind::Unicast as i32,
                    payload: message.payload,
                    created_ms: message.created_ms,
                    ..Default::default()
                },
            );
            // From the push API's acceptance to the hand-off to the connection.
            let latency_ms = pushgrid_common::now_ms().saturating_sub(message.created_ms);
            metrics::histogram!("pushgrid_room_delivery_latency_seconds")
                .record(latency_ms as f64 / 1000.0);
            if conn.send(self.room.queue_limits, message.id, frame, &mut wakes) {
                self.room
                    .peers
                    .delivered(&message.app, &message.user, conn.device(), message.id);
                delivered += 1;
            } else {
                missing += 1;
            }
        }
        drop(wakes); // wakes the shards
        metrics::counter!("pushgrid_room_delivered_total").increment(u64::from(delivered));
        metrics::counter!("pushgrid_room_delivery_missing_total").increment(u64::from(missing));
        Ok(Response::new(DeliverResponse { delivered, missing }))
    }

    async fn broadcast(
        &self,
        request: Request<RoomBroadcastRequest>,
    ) -> Result<Response<RoomBroadcastResponse>, Status> {
        let message = request
            .into_inner()
            .message
            .ok_or_else(|| Status::invalid_argument("broadcast without a message"))?;
        let (app, topic, id): (Arc<str>, String, u64) = (
            Arc::from(message.app.as_str()),
            message.topic.clone(),
            message.id,
        );
        // Encoded once; every connection gets a reference-counted handle.
        let frame = encode(Op::Push, 0, &crate::conn::broadcast_push(message));
        let limits = self.room.queue_limits;
        // Shard connections are handed to their shards, which fan out;
        // TLS/WebSocket connections and those still opening are queued here.
        let mut per_shard = PerShard::default();
        let mut wakes = Wakes::default();
        let mut queued_here = 0u32;
        let mut visit = |conn: &ConnHandle| match conn.place() {
            Some((shard, token)) => per_shard.add(shard, token, conn.id),
            None => {
                if conn.send(limits, id, frame.clone(), &mut wakes) {
                    queued_here += 1;
                }
            }
        };
        if topic == crate::topics::ALL {
            for entry in self.room.conns.iter() {
                if *entry.app == *app {
                    visit(entry.value());
                }
            }
        } else {
            for conn_id in self.room.topics.subscribers(&app, &topic) {
                if let Some(entry) = self.room.conns.get(&conn_id) {
                    visit(entry.value());
                }
            }
        }
        drop(wakes); // wakes the shards
        let mut handed = queued_here;
        for (shard, targets) in per_shard.into_groups() {
            handed += targets.len() as u32;
            shard.broadcast(Broadcast {
                frame: frame.clone(),
                msg_id: id,
                app: app.clone(),
                targets,
            });
        }
        metrics::counter!("pushgrid_room_broadcast_deliveries_total")
            .increment(u64::from(queued_here));
        self.room.peers.broadcast_delivered(&app, id, queued_here);
        // Shards count and report their own deliveries as they queue them.
        Ok(Response::new(RoomBroadcastResponse { delivered: handed }))
    }

    async fn kick(
        &self,
        request: Request<RoomKickRequest>,
    ) -> Result<Response<RoomKickResponse>, Status> {
        let request = request.into_inner();
        let code = KickCode::try_from(request.code).unwrap_or(KickCode::Unspecified);
        let mut kicked = 0;
        for conn_id in request.conn_ids {
            let Some(conn) = self
                .room
                .conns
                .get(&conn_id)
                .map(|entry| entry.value().clone())
            else {
                continue;
            };
            if !request.reason.is_empty() {
                self.room
                    .kick_reasons
                    .insert(conn_id, request.reason.clone());
            }
            conn.kick(code);
            kicked += 1;
        }
        Ok(Response::new(RoomKickResponse { kicked }))
    }
}
