//! SUB: a topic's subscription and the replay of the history the device
//! missed.

use std::sync::Arc;

use pushgrid_proto::client::{ErrorCode, Sub, SubOk};
use pushgrid_wire::{Op, encode};

use super::error_frame;
use crate::outbox::Outbound;
use crate::{ConnHandle, Room, topics};

/// Most history pages replayed for one SUB (each up to 1000 messages).
const MAX_HISTORY_PAGES: usize = 10;

/// SUB: subscribe, replay what the device missed (when it sent an offset and
/// epoch), then SUB_OK with whether the history covered the gap; all of it
/// queued ahead of what arrived live meanwhile. The queue was held by the
/// caller and is released here.
pub(super) async fn subscribe(room: Arc<Room>, handle: Arc<ConnHandle>, sub: Sub, seq: u32) {
    let frames = subscription_replay(&room, &handle, sub, seq).await;
    // Live copies of replayed messages (parked during the replay, or
    // released by the topic's ordering stage shortly after) are dropped.
    let replayed: std::collections::HashSet<u64> = frames
        .iter()
        .map(|outbound| outbound.msg_id)
        .filter(|id| *id != 0)
        .collect();
    let overlap = (!replayed.is_empty()).then(|| crate::outbox::InboxOverlap {
        ids: replayed,
        read_at: tokio::time::Instant::now(),
    });
    handle.release(frames, overlap);
}

/// What SUB answers: the topic's replayed history, then SUB_OK (or an
/// ERROR when the topic is refused or its history unavailable).
async fn subscription_replay(
    room: &Arc<Room>,
    handle: &ConnHandle,
    sub: Sub,
    seq: u32,
) -> Vec<Outbound> {
    let refused = |reason: String| {
        vec![Outbound::own(
            0,
            error_frame(ErrorCode::BadBody, reason, seq),
        )]
    };
    let topic = match topics::normalize(&sub.topic) {
        Ok(topic) => topic.to_string(),
        Err(reason) => return refused(reason),
    };
    // Subscribe first: a message published during the replay then arrives
    // live as well (the device drops it by offset) rather than not at all.
    if topic != topics::ALL
        && let Err(reason) = room.topics.subscribe(handle.id, &handle.app, &topic)
    {
        return refused(reason);
    }
    let mut frames = Vec::new();
    let Some(replayed) = replay_history(room, handle, &topic, &sub, seq, &mut frames).await else {
        return frames;
    };
    let recovered = replayed.recovered;
    ::metrics::counter!("pushgrid_room_subscriptions_total", "recovered" => if recovered { "true" } else { "false" }).increment(1);
    let ok = SubOk {
        topic,
        recovered: recovered && sub.epoch != 0,
        offset: replayed.position.0,
        epoch: replayed.position.1,
    };
    frames.push(Outbound::own(0, encode(Op::SubOk, seq, &ok)));
    frames
}

/// Where a topic's history replay ended.
struct Replayed {
    /// Whether the history still held what the device missed.
    recovered: bool,
    /// The topic's offset and epoch as of the last page.
    position: (u64, u64),
}

/// Reads the topic's history since the device's offset, page by page (at
/// most [`MAX_HISTORY_PAGES`]), into `frames` as PUSH frames. `None` when
/// the replay ended early: the connection closed (`frames` emptied) or the
/// history was unavailable (an ERROR for `seq` is the last frame).
async fn replay_history(
    room: &Arc<Room>,
    handle: &ConnHandle,
    topic: &str,
    sub: &Sub,
    seq: u32,
    frames: &mut Vec<Outbound>,
) -> Option<Replayed> {
    let mut since = sub.since_offset;
    let mut recovered = true;
    let mut position = (0, 0);
    let mut first_page = true;
    for _ in 0..MAX_HISTORY_PAGES {
        if handle.is_closed() {
            frames.clear();
            return None;
        }
        let history = match room
            .peers
            .history(&handle.app, topic, since, sub.epoch)
            .await
        {
            Ok(history) => history,
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot read topic history");
                frames.push(Outbound::own(
                    0,
                    error_frame(
                        ErrorCode::Unavailable,
                        "topic history unavailable; subscribe again",
                        seq,
                    ),
                ));
                return None;
            }
        };
        if std::mem::take(&mut first_page) {
            // The topic's ordering stage starts after this position, unless
            // it already knows where the topic is.
            crate::service::learn_position(room, &handle.app, topic, history.offset, history.epoch);
        }
        position = (history.offset, history.epoch);
        recovered = history.recovered;
        let page = history.messages.len();
        for message in history.messages {
            since = message.offset;
            let id = message.id;
            frames.push(Outbound::own(
                id,
                encode(Op::Push, 0, &topics::broadcast_push(message)),
            ));
        }
        if sub.epoch == 0 || !recovered || page == 0 || since >= history.offset {
            break;
        }
    }
    Some(Replayed {
        recovered,
        position,
    })
}
