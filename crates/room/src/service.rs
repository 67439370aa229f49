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

use crate::Room;
use crate::outbox::Wakes;

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
        let (app, topic, id) = (message.app.clone(), message.topic.clone(), message.id);
        // Encoded once; every connection gets a reference-counted handle.
        let frame = encode(Op::Push, 0, &crate::conn::broadcast_push(message));
        let targets: Vec<Arc<crate::ConnHandle>> = if topic == crate::topics::ALL {
            self.room
                .conns
                .iter()
                .filter(|entry| *entry.app == *app)
                .map(|entry| entry.value().clone())
                .collect()
        } else {
            self.room
                .topics
                .subscribers(&app, &topic)
                .into_iter()
                .filter_map(|conn_id| {
                    self.room
                        .conns
                        .get(&conn_id)
                        .map(|entry| entry.value().clone())
                })
                .collect()
        };
        let mut delivered = 0;
        let mut wakes = Wakes::default();
        for conn in targets {
            if conn.send(self.room.queue_limits, id, frame.clone(), &mut wakes) {
                delivered += 1;
            }
        }
        drop(wakes); // wakes the shards
        metrics::counter!("pushgrid_room_broadcast_deliveries_total")
            .increment(u64::from(delivered));
        self.room.peers.broadcast_delivered(&app, id, delivered);
        Ok(Response::new(RoomBroadcastResponse { delivered }))
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
