//! The offline inbox replayed to a device right after AUTH.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pushgrid_proto::client::{KickCode, Push, PushKind};
use pushgrid_wire::{Op, encode};
use tokio::time::Instant;

use crate::outbox::{InboxOverlap, Outbound};
use crate::{ConnHandle, Room};

/// Inbox reads tried after AUTH before the device is sent away to come back
/// later, and the pause before the second (doubling after it).
const INBOX_ATTEMPTS: usize = 5;
const INBOX_FIRST_RETRY: Duration = Duration::from_millis(500);

/// The offline inbox, oldest first, queued ahead of anything that arrived
/// live meanwhile; a message stored while the inbox was read can also arrive
/// live: its id is remembered for a while so the device gets it once. A saver
/// that cannot answer is asked again with backoff; after the last attempt the
/// device is sent away (KICK, code UNAVAILABLE) to come back later, and its
/// inbox stays stored.
pub(super) async fn replay_inbox(room: Arc<Room>, handle: Arc<ConnHandle>) {
    let mut pause = INBOX_FIRST_RETRY;
    for attempt in 0..INBOX_ATTEMPTS {
        if handle.is_closed() {
            return;
        }
        let messages = match room.peers.pending(&handle.app, handle.user()).await {
            Ok(messages) => messages,
            Err(status) => {
                ::metrics::counter!("pushgrid_room_inbox_read_failures_total").increment(1);
                if attempt == 0 {
                    tracing::warn!(error = %status.message(), "cannot read inbox; retrying");
                }
                tokio::time::sleep(pause).await;
                pause *= 2;
                continue;
            }
        };
        let mut ids = HashSet::with_capacity(messages.len());
        let mut frames = Vec::with_capacity(messages.len());
        for message in messages {
            ids.insert(message.id);
            let push = Push {
                msg_id: message.id,
                kind: PushKind::Unicast as i32,
                payload: message.payload,
                created_ms: message.created_ms,
                ..Default::default()
            };
            frames.push(Outbound::own(message.id, encode(Op::Push, 0, &push)));
        }
        if frames.is_empty() {
            handle.release(frames, None);
            return;
        }
        let count = frames.len() as u64;
        let delivered: Vec<u64> = ids.iter().copied().collect();
        handle.release(
            frames,
            Some(InboxOverlap {
                ids,
                read_at: Instant::now(),
            }),
        );
        ::metrics::counter!("pushgrid_room_inbox_pushed_total").increment(count);
        // Message status (issue 12): handed to this device's connection.
        for id in delivered {
            room.peers
                .delivered(&handle.app, handle.user(), handle.device(), id);
        }
        return;
    }
    room.kick_reasons.insert(
        handle.id,
        "your inbox is unavailable; reconnect later".into(),
    );
    handle.kick(KickCode::Unavailable);
}
