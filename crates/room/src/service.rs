//! The `Room` RPC service: center hands over messages for live connections.

use std::sync::Arc;

use pushgrid_proto::client::KickCode;
use pushgrid_proto::client::{Push, PushKind};
use pushgrid_proto::cluster::room_server::Room as RoomRpc;
use pushgrid_proto::cluster::{
    BroadcastMessage, DeliverRequest, DeliverResponse, RoomBroadcastRequest, RoomBroadcastResponse,
    RoomKickRequest, RoomKickResponse,
};
use pushgrid_wire::{Op, encode};
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::ordering::{self, Step, TopicOrder};
use crate::outbox::{PerShard, Wakes};
use crate::shard_handle::Broadcast;
use crate::{ConnHandle, Room, RoomError};

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
                return Err(RoomError::MissingMessage("delivery").into());
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
            .ok_or(RoomError::MissingMessage("broadcast"))?;
        let handed = ordered_broadcast(&self.room, message);
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

/// A broadcast from center, through its topic's ordering stage: fans out
/// what the stage releases (this message, and any it held behind it) and
/// starts the topic's timer when something is held. Returns the
/// connections the released messages were handed to.
pub(crate) fn ordered_broadcast(room: &Arc<Room>, message: BroadcastMessage) -> u32 {
    let key = ordering::key(&message.app, &message.topic);
    // A topic nobody here subscribed to keeps no state (a SUB reads the
    // stream's position and starts it); `all` reaches every connection.
    let create = message.topic == crate::topics::ALL
        || room.topics.has_subscribers(&message.app, &message.topic);
    let Some(order) = room.orders.get(&key, create) else {
        return 0;
    };
    let (app, topic) = (message.app.clone(), message.topic.clone());
    let mut state = ordering::lock(&order);
    let ready = state.offer(message, Instant::now());
    let handed = fan_out_all(room, ready);
    let start_timer = state.waiting() && !state.timer;
    state.timer |= start_timer;
    count(&mut state);
    drop(state);
    if start_timer {
        tokio::spawn(serve_gaps(room.clone(), order, app, topic));
    }
    handed
}

/// A SUB read the topic's position from saver: the topic's stage starts
/// there unless it already knows where it is.
pub(crate) fn learn_position(room: &Arc<Room>, app: &str, topic: &str, offset: u64, epoch: u64) {
    let Some(order) = room.orders.get(&ordering::key(app, topic), true) else {
        return;
    };
    let mut state = ordering::lock(&order);
    let ready = state.learn(offset, epoch, Instant::now());
    fan_out_all(room, ready);
    let start_timer = state.waiting() && !state.timer;
    state.timer |= start_timer;
    count(&mut state);
    drop(state);
    if start_timer {
        tokio::spawn(serve_gaps(
            room.clone(),
            order,
            app.to_string(),
            topic.to_string(),
        ));
    }
}

/// Turns the stage's counts into metrics.
fn count(state: &mut TopicOrder) {
    let counts = std::mem::take(&mut state.counts);
    if counts == ordering::Counts::default() {
        return;
    }
    ::metrics::counter!("pushgrid_room_broadcast_held_total").increment(counts.held);
    ::metrics::counter!("pushgrid_room_broadcast_late_dropped_total").increment(counts.dropped);
    ::metrics::counter!("pushgrid_room_broadcast_gaps_skipped_total").increment(counts.skipped);
    ::metrics::counter!("pushgrid_room_broadcast_gaps_fetched_total").increment(counts.fetched);
}

/// The timer of one topic while messages are held: waits, fetches the
/// missing offsets from saver, gives up, and ends when nothing is held.
async fn serve_gaps(
    room: Arc<Room>,
    order: Arc<std::sync::Mutex<TopicOrder>>,
    app: String,
    topic: String,
) {
    let config = room.order_config;
    loop {
        let step = {
            let mut state = ordering::lock(&order);
            let step = state.step(Instant::now(), &config);
            match step {
                Step::Deliver(ready) => {
                    fan_out_all(&room, ready);
                    count(&mut state);
                    continue;
                }
                Step::Done => {
                    state.timer = false;
                    return;
                }
                other => other,
            }
        };
        match step {
            Step::Wait(until) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {}
                    () = room.background_stop.cancelled() => {
                        ordering::lock(&order).timer = false;
                        return;
                    }
                }
            }
            Step::Fetch {
                since_offset,
                epoch,
            } => {
                ::metrics::counter!("pushgrid_room_broadcast_gap_fetches_total").increment(1);
                let fetched = tokio::select! {
                    fetched = room.peers.history(&app, &topic, since_offset, epoch) => fetched,
                    () = room.background_stop.cancelled() => {
                        ordering::lock(&order).timer = false;
                        return;
                    }
                };
                match fetched {
                    Ok(history) => {
                        let mut state = ordering::lock(&order);
                        let ready = state.fill(history.messages, history.recovered, Instant::now());
                        fan_out_all(&room, ready);
                        count(&mut state);
                    }
                    Err(status) => {
                        tracing::warn!(%app, %topic, since_offset, error = %status.message(), "cannot fetch missing broadcast offsets; retrying");
                    }
                }
            }
            Step::Deliver(_) | Step::Done => {}
        }
    }
}

/// Forgets the ordering state of quiet topics, once a minute.
pub(crate) async fn forget_idle_topics(room: Arc<Room>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = room.background_stop.cancelled() => return,
        }
        room.orders.forget_idle(ordering::IDLE_FORGET);
        ::metrics::gauge!("pushgrid_room_broadcast_ordered_topics").set(room.orders.len() as f64);
    }
}

fn fan_out_all(room: &Arc<Room>, ready: Vec<BroadcastMessage>) -> u32 {
    ready
        .into_iter()
        .map(|message| fan_out(room, message))
        .sum()
}

/// Hands one broadcast message to every subscribed connection of this
/// room: encoded once, every connection gets a reference-counted handle of
/// the same bytes. Shard connections are handed to their shards (one
/// command per shard), which queue and write; TLS/WebSocket connections and
/// those still opening are queued here. Called in offset order under the
/// topic's lock, so each connection's queue gets the topic in order.
fn fan_out(room: &Arc<Room>, message: BroadcastMessage) -> u32 {
    let (app, topic, id): (Arc<str>, String, u64) = (
        Arc::from(message.app.as_str()),
        message.topic.clone(),
        message.id,
    );
    let frame = encode(Op::Push, 0, &crate::topics::broadcast_push(message));
    let limits = room.queue_limits;
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
        for entry in room.conns.iter() {
            if *entry.app == *app {
                visit(entry.value());
            }
        }
    } else {
        for conn_id in room.topics.subscribers(&app, &topic) {
            if let Some(entry) = room.conns.get(&conn_id) {
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
    metrics::counter!("pushgrid_room_broadcast_deliveries_total").increment(u64::from(queued_here));
    room.peers.broadcast_delivered(&app, id, queued_here);
    // Shards count and report their own deliveries as they queue them.
    handed
}
