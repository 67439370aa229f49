//! The frames of an authenticated device (PING, ACK, UPSTREAM, SUB, UNSUB,
//! PUSH_TOKEN) and what each asks of the connection's writer.

use std::sync::Arc;

use bytes::Bytes;
use pushgrid_proto::client::{Ack, ErrorCode, Sub, Unsub, Upstream, UpstreamOk};
use pushgrid_proto::cluster::UpstreamRequest;
use pushgrid_wire::{Frame, Op, encode, encode_empty};

use super::error_frame;
use super::subscribe::subscribe;
use crate::outbox::MAX_CALLS_IN_FLIGHT;
use crate::{ConnHandle, Room, topics};

/// What one frame from the device asks of the connection's writer.
pub(crate) enum Next {
    Continue,
    /// Queue this answer.
    Reply(Bytes),
    /// Close with this last frame.
    Close(Bytes),
}

/// Handles one frame from an authenticated device (on the shard thread or
/// in the connection's task: nothing here waits).
pub(crate) fn handle_frame(room: &Arc<Room>, handle: &Arc<ConnHandle>, frame: Frame) -> Next {
    match frame.op {
        Op::Ping => Next::Reply(encode_empty(Op::Pong, frame.seq)),
        Op::Pong => Next::Continue,
        Op::Ack => ack(room, handle, frame),
        Op::Upstream => upstream(room, handle, frame),
        Op::Sub => match frame.decode::<Sub>() {
            Ok(sub) => {
                // The replay runs beside the connection, holding its queue.
                handle.hold();
                room.tracker
                    .spawn(subscribe(room.clone(), handle.clone(), sub, frame.seq));
                Next::Continue
            }
            Err(error) => Next::Close(error_frame(error.code(), error.to_string(), frame.seq)),
        },
        Op::Unsub => {
            let unsub: Unsub = match frame.decode() {
                Ok(unsub) => unsub,
                Err(error) => {
                    return Next::Close(error_frame(error.code(), error.to_string(), frame.seq));
                }
            };
            if let Ok(topic) = topics::normalize(&unsub.topic) {
                room.topics.unsubscribe(handle.id, &handle.app, topic);
            }
            Next::Continue
        }
        Op::PushToken => super::push_tokens::handle_push_token(room, handle, frame),
        other => Next::Close(error_frame(
            ErrorCode::UnknownOp,
            format!("{other:?} is not a device-to-server op"),
            frame.seq,
        )),
    }
}

/// ACK: the device received these messages; the acks go on to the cluster.
fn ack(room: &Arc<Room>, handle: &Arc<ConnHandle>, frame: Frame) -> Next {
    let ack: Ack = match frame.decode() {
        Ok(ack) => ack,
        Err(error) => {
            return Next::Close(error_frame(error.code(), error.to_string(), frame.seq));
        }
    };
    if !ack.msg_ids.is_empty() {
        ::metrics::counter!("pushgrid_room_acks_total").increment(ack.msg_ids.len() as u64);
        room.peers
            .ack(&handle.app, handle.user(), handle.device(), ack.msg_ids);
    }
    Next::Continue
}

/// UPSTREAM: a message from the device, handed to the cluster in a task of
/// its own (one of the connection's calls in flight); UPSTREAM_OK or an
/// ERROR answers it.
fn upstream(room: &Arc<Room>, handle: &Arc<ConnHandle>, frame: Frame) -> Next {
    let upstream: Upstream = match frame.decode() {
        Ok(upstream) => upstream,
        Err(error) => {
            return Next::Close(error_frame(error.code(), error.to_string(), frame.seq));
        }
    };
    let request = UpstreamRequest {
        app: handle.app.to_string(),
        user: handle.user().to_string(),
        device: handle.device().to_string(),
        product: upstream.product,
        r#type: upstream.r#type,
        client_msg_id: upstream.client_msg_id.clone(),
        payload: upstream.payload,
        room: room.node_id.clone(),
        conn_id: handle.id,
    };
    let Some(slot) = handle.start_call() else {
        return Next::Reply(too_many_calls(handle, frame.seq));
    };
    let (room, handle, seq) = (room.clone(), handle.clone(), frame.seq);
    tokio::spawn(async move {
        let _slot = slot;
        let answer = match room.peers.upstream(request).await {
            Ok(()) => encode(
                Op::UpstreamOk,
                seq,
                &UpstreamOk {
                    client_msg_id: upstream.client_msg_id,
                },
            ),
            Err(status) => error_frame(ErrorCode::UpstreamFailed, status.message(), seq),
        };
        handle.reply(answer, true);
    });
    Next::Continue
}

/// The answer to an UPSTREAM or PUSH_TOKEN frame sent while the device
/// already has [`MAX_CALLS_IN_FLIGHT`] calls unanswered: ERROR RATE_LIMITED
/// for that seq (the connection stays open; the SDK retries it).
pub(crate) fn too_many_calls(handle: &ConnHandle, seq: u32) -> Bytes {
    ::metrics::counter!("pushgrid_room_calls_refused_total").increment(1);
    tracing::info!(
        conn = handle.id,
        user = handle.user(),
        seq,
        "refused a call: {MAX_CALLS_IN_FLIGHT} calls of this connection are still unanswered"
    );
    error_frame(
        ErrorCode::RateLimited,
        format!(
            "{MAX_CALLS_IN_FLIGHT} calls of this connection are still unanswered; wait for their answers"
        ),
        seq,
    )
}
