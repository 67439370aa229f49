//! PUSH_TOKEN frames (issue 25): a device registers its platform notification
//! token for its authenticated user and device. The token is checked here
//! (a bad one closes the connection with ERROR BAD_BODY, like any bad body:
//! the SDK checks the same rules before sending), stored in saver beside the
//! connection, and answered with PUSH_TOKEN_OK, or with ERROR UNAVAILABLE
//! when saver cannot store it (the SDK sends it again after its next connect).
//! A device has at most `MAX_CALLS_IN_FLIGHT` such calls (and UPSTREAMs)
//! unanswered; one more is answered ERROR RATE_LIMITED.

use std::sync::Arc;

use pushgrid_proto::client::{ErrorCode, PushToken, PushTokenOk};
use pushgrid_proto::cluster::DevicePushToken;
use pushgrid_wire::{Frame, Op, encode};

use super::{Next, error_frame, too_many_calls};
use crate::{ConnHandle, Room};

/// Handles one PUSH_TOKEN frame; the store and the answer run beside the
/// connection.
pub(crate) fn handle_push_token(room: &Arc<Room>, handle: &Arc<ConnHandle>, frame: Frame) -> Next {
    let push_token: PushToken = match frame.decode() {
        Ok(push_token) => push_token,
        Err(error) => return Next::Close(error_frame(error.code(), error.to_string(), frame.seq)),
    };
    if let Err(problem) =
        pushgrid_wire::check_push_token(&push_token.provider, &push_token.token, &push_token.bundle)
    {
        ::metrics::counter!("pushgrid_room_push_tokens_total", "outcome" => "invalid").increment(1);
        return Next::Close(error_frame(ErrorCode::BadBody, problem, frame.seq));
    }
    let Some(slot) = handle.start_call() else {
        return Next::Reply(too_many_calls(handle, frame.seq));
    };
    let token = DevicePushToken {
        user: handle.user().to_string(),
        device: handle.device().to_string(),
        platform: handle.platform.to_string(),
        provider: push_token.provider.clone(),
        token: push_token.token.clone(),
        bundle: push_token.bundle,
        ..DevicePushToken::default()
    };
    let (room, handle, seq) = (room.clone(), handle.clone(), frame.seq);
    let app = handle.app.to_string();
    room.tracker.clone().spawn(async move {
        let _slot = slot;
        let answer = match room.peers.register_push_token(&app, token).await {
            Ok(()) => {
                ::metrics::counter!("pushgrid_room_push_tokens_total", "outcome" => "stored")
                    .increment(1);
                encode(
                    Op::PushTokenOk,
                    seq,
                    &PushTokenOk {
                        provider: push_token.provider,
                        token: push_token.token,
                    },
                )
            }
            Err(status) => {
                ::metrics::counter!("pushgrid_room_push_tokens_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(error = %status.message(), "storing a push token failed");
                error_frame(ErrorCode::Unavailable, status.message(), seq)
            }
        };
        handle.reply(answer, true);
    });
    Next::Continue
}
