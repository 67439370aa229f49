//! One device connection: admission, the transport's handshake and AUTH,
//! the offline inbox, then the device's frames.
//!
//! A connection is a tokio task only while it is being opened (handshake,
//! AUTH, the register call). An authenticated plain TCP connection then moves
//! to a shard thread (`shard.rs`) and costs no task at all while idle: its
//! memory is a slot in the shard's slab and one [`ConnHandle`], whose queue
//! holds no allocation while nothing waits, whose app and platform names are
//! shared, with no read buffer and no timer (one sweeper checks heartbeats
//! for the whole room). TLS and WebSocket connections keep their task: their
//! streams need one to make progress.
//!
//! The frame handling ([`handle_frame`]) is the same for both; replays (the
//! inbox after AUTH, a topic's history after SUB) run in short tasks of their
//! own that hold the connection's queue meanwhile (see `outbox.rs`).
//!
//! This module keeps what every connection goes through (the loop of a task
//! connection, forgetting a connection that ended; `accept.rs` serves an
//! accepted socket with them and hands plain TCP ones to their shard); its parts are `open` (refusals at accept, handshake, AUTH,
//! registration), `inbox` (the offline inbox after AUTH), `frames` (the
//! device's frames), `push_tokens` (PUSH_TOKEN), `subscribe` (SUB and the topic history replay) and
//! `kick` (KICK frames and the heartbeat sweeper).

mod frames;
mod inbox;
mod kick;
mod open;
mod push_tokens;
mod subscribe;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushgrid_common::now_ms;
use pushgrid_proto::client::ErrorCode;
use pushgrid_proto::cluster::{Session, StateEvent};
use pushgrid_wire::{Decoded, Frame, FrameError, Op, decode_frame, encode};
use tokio::time::Instant;

pub(crate) use frames::{Next, handle_frame, too_many_calls};
pub(crate) use kick::{kick_frame, kick_reason_label, sweep_silent_connections};
pub(crate) use open::{open, refuse_at_accept};

use crate::transport::{DeviceStream, shrink};
use crate::{ConnHandle, Room, metrics};

/// After an ERROR or KICK, how long input is drained before the socket closes.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

pub(crate) fn room_clock() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() as u32
}

/// Room-wide shared copies of short, often repeated names (apps, platforms).
/// Bounded: past `MAX_INTERNED` names, new ones are simply allocated.
#[derive(Default)]
pub(crate) struct Interner {
    names: Mutex<HashSet<Arc<str>>>,
}

const MAX_INTERNED: usize = 4096;

impl Interner {
    pub fn get(&self, name: &str) -> Arc<str> {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(shared) = names.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        if names.len() < MAX_INTERNED {
            names.insert(shared.clone());
        }
        shared
    }
}

enum ReadError {
    Closed,
    Frame(FrameError),
}

/// Reads until one whole frame is buffered. The buffer grows only to the size
/// the (already validated) header asks for.
async fn read_frame(
    stream: &mut DeviceStream,
    buf: &mut BytesMut,
    max_body: u32,
) -> Result<Frame, ReadError> {
    loop {
        match decode_frame(buf, max_body) {
            Ok(Decoded::Frame(frame)) => return Ok(frame),
            Ok(Decoded::Incomplete { needed }) => buf.reserve(needed),
            Err(error) => return Err(ReadError::Frame(error)),
        }
        match stream.read_some(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(count) => metrics::hot().bytes_in.increment(count as u64),
        }
    }
}

pub(crate) fn error_frame(code: ErrorCode, message: impl Into<String>, seq: u32) -> Bytes {
    encode(
        Op::Error,
        seq,
        &pushgrid_proto::client::Error {
            code: code as i32,
            message: message.into(),
        },
    )
}

/// An authenticated connection, ready for its loop.
pub(crate) struct Opened {
    pub stream: DeviceStream,
    pub handle: Arc<ConnHandle>,
    /// Bytes the device sent right behind AUTH.
    pub buf: BytesMut,
}

/// The register session of a live connection.
pub(crate) fn session_of(room: &Room, conn: &ConnHandle) -> Session {
    Session {
        app: conn.app.to_string(),
        user: conn.user().to_string(),
        device: conn.device().to_string(),
        platform: conn.platform.to_string(),
        room: room.node_id.clone(),
        conn_id: conn.id,
        since_ms: conn.since_ms,
    }
}

/// Forgets a connection that ended: its routing, its topics, its session.
pub(crate) fn finish(room: &Room, conn: &ConnHandle) {
    room.conns.remove(&conn.id);
    room.kick_reasons.remove(&conn.id);
    room.topics.remove_conn(conn.id);
    metrics::connections(room.conns.len());
    room.cluster.set_load(room.conns.len() as u64);
    let session = session_of(room, conn);
    room.peers.state(StateEvent {
        session: Some(session.clone()),
        online: false,
        at_ms: now_ms(),
    });
    room.peers.offline(session);
}

/// What woke a task connection's loop.
enum Wake {
    /// Frames queued, or a kick.
    Queue,
    Input(std::io::Result<usize>),
}

/// The loop of a TLS or WebSocket connection: runs until the device leaves or
/// must be closed; returns the last frame to send (ERROR or KICK) when the
/// server is the one closing.
pub(crate) async fn task_loop(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut DeviceStream,
    buf: &mut BytesMut,
) -> Option<Bytes> {
    let notify = handle.notified()?;
    // Frames the device pipelined behind AUTH are already buffered.
    let mut buffered = !buf.is_empty();
    loop {
        if buffered {
            buffered = false;
            loop {
                match decode_frame(buf, room.admission.max_body()) {
                    Ok(Decoded::Frame(frame)) => match handle_frame(room, handle, frame) {
                        Next::Continue => {}
                        Next::Reply(answer) => handle.reply(answer, true),
                        Next::Close(last) => return Some(last),
                    },
                    Ok(Decoded::Incomplete { needed }) => {
                        if buf.is_empty() {
                            *buf = BytesMut::new();
                        } else {
                            buf.reserve(needed);
                        }
                        break;
                    }
                    Err(error) => {
                        ::metrics::counter!("pushgrid_room_frame_errors_total").increment(1);
                        return Some(error_frame(error.code(), error.to_string(), 0));
                    }
                }
            }
        }
        // The select only says what happened; the work (which may wait on
        // the socket) runs after it.
        let event = tokio::select! {
            biased;
            () = notify.notified() => Wake::Queue,
            read = stream.read_some(buf) => Wake::Input(read),
        };
        match event {
            Wake::Queue => {
                if let Some(code) = handle.pending_kick() {
                    return Some(kick_frame(room, handle, code));
                }
                let frames = handle.take_queued();
                if frames.is_empty() {
                    continue;
                }
                match stream.write_frames(&frames).await {
                    Ok(bytes) => {
                        let hot = metrics::hot();
                        hot.bytes_out.increment(bytes as u64);
                        hot.frames_sent.increment(frames.len() as u64);
                        hot.writes.increment(1);
                    }
                    Err(_) => return None,
                }
            }
            Wake::Input(read) => match read {
                Ok(0) | Err(_) => return None,
                Ok(count) => {
                    metrics::hot().bytes_in.increment(count as u64);
                    handle.last_seen.store(room_clock(), Ordering::Relaxed);
                    buffered = true;
                }
            },
        }
        if !buffered {
            shrink(buf);
        }
    }
}
