//! One device connection: admission, the transport's handshake and AUTH,
//! then a loop over the connection's wake-up (queued frames, kicks) and
//! socket input.
//!
//! Memory of an idle authenticated connection (the figure the room is sized
//! by): the task and its future, kept small by boxing every state that is
//! large and rare (handshake and AUTH, SUB replays, stalled writes, the
//! polite close); the socket's registration; one [`ConnHandle`] whose
//! outbound queue is an empty `Vec` (no allocation until a frame waits) and
//! whose app and platform names are shared with every other connection of the
//! same app and platform; no read buffer (see `transport.rs`); no timer
//! (heartbeats are checked by one sweeper for the whole room).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushgrid_common::{jwt, now_ms};
use pushgrid_proto::client::{
    Ack, Auth, AuthOk, ErrorCode, Kick, KickCode, Push, PushKind, Sub, SubOk, Unsub, Upstream,
    UpstreamOk,
};
use pushgrid_proto::cluster::{Session, StateEvent, UpstreamRequest};
use pushgrid_wire::{Decoded, Frame, FrameError, Op, decode_frame, encode, encode_empty};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::admission::Refusal;
use crate::transport::{DeviceStream, Transport, shrink};
use crate::{Room, metrics, topics};

/// How long after the inbox was read a live copy of one of its messages is
/// still recognised and skipped.
const INBOX_OVERLAP: Duration = Duration::from_secs(10);
/// After an ERROR or KICK, how long input is drained before the socket closes.
const LINGER: Duration = Duration::from_secs(1);

/// Bounds of one connection's outbound queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub frames: usize,
    pub bytes: usize,
}

/// A frame waiting for the socket; `msg_id` is set for PUSH frames.
pub(crate) struct Outbound {
    pub msg_id: u64,
    pub frame: Bytes,
}

#[derive(Default)]
struct OutQueue {
    /// Empty (no allocation) while nothing waits: the writer takes the whole
    /// vector at once.
    frames: Vec<Outbound>,
    bytes: usize,
    closed: bool,
}

/// What the rest of the room holds of a live, authenticated connection.
pub struct ConnHandle {
    pub id: u64,
    /// Shared by every connection of the app.
    pub app: Arc<str>,
    pub user: Box<str>,
    pub device: Box<str>,
    /// Shared by every connection of the same platform name.
    pub platform: Arc<str>,
    pub since_ms: u64,
    pub(crate) transport: Transport,
    queue: Mutex<OutQueue>,
    /// Seconds since the room started, at the last frame from the device.
    last_seen: AtomicU32,
    /// A pending kick (a `KickCode`), 0 for none.
    kick_code: AtomicI32,
    /// Something to do: frames queued or a kick.
    wake: Notify,
}

impl ConnHandle {
    /// Queues a frame without waiting. A full queue (by frames or bytes)
    /// marks the device a slow consumer: it is kicked and the frame dropped
    /// (a unicast message stays in the inbox for the next connection).
    /// `msg_id` is the message of a PUSH frame, 0 for others.
    pub(crate) fn send(&self, limits: QueueLimits, msg_id: u64, frame: Bytes) -> bool {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if queue.closed {
            return false;
        }
        let over = if queue.frames.len() >= limits.frames {
            Some("frames")
        } else if queue.bytes + frame.len() > limits.bytes && !queue.frames.is_empty() {
            Some("bytes")
        } else {
            None
        };
        if let Some(limit) = over {
            drop(queue);
            metrics::queue_drop(limit);
            if self.kick(KickCode::SlowConsumer) {
                ::metrics::counter!("pushgrid_room_slow_consumer_kicks_total").increment(1);
            }
            return false;
        }
        let was_empty = queue.frames.is_empty();
        queue.bytes += frame.len();
        queue.frames.push(Outbound { msg_id, frame });
        drop(queue);
        if was_empty {
            self.wake.notify_one();
        }
        true
    }

    /// Everything queued, leaving an empty queue behind.
    fn take_queued(&self) -> Vec<Outbound> {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.bytes = 0;
        std::mem::take(&mut queue.frames)
    }

    fn close_queue(&self) {
        let mut queue = self
            .queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.closed = true;
        queue.bytes = 0;
        queue.frames = Vec::new();
    }

    /// Asks the connection to send KICK with `code` and close; false when a
    /// kick was already pending.
    pub fn kick(&self, code: KickCode) -> bool {
        let asked = self
            .kick_code
            .compare_exchange(0, code as i32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.wake.notify_one();
        }
        asked
    }

    fn pending_kick(&self) -> Option<KickCode> {
        match self.kick_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(KickCode::try_from(code).unwrap_or(KickCode::Unspecified)),
        }
    }
}

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

fn error_frame(code: ErrorCode, message: impl Into<String>, seq: u32) -> Bytes {
    encode(
        Op::Error,
        seq,
        &pushgrid_proto::client::Error {
            code: code as i32,
            message: message.into(),
        },
    )
}

struct Identity {
    app: String,
    user: String,
    device: String,
}

fn authenticate(room: &Room, auth: &Auth) -> Result<Identity, String> {
    let app_id = jwt::unverified_app(&auth.token).map_err(|error| error.to_string())?;
    let view = room.cluster.view();
    let app = view
        .app(&app_id)
        .ok_or_else(|| format!("unknown app {app_id:?}"))?;
    // During a secret rotation, tokens signed with the previous secret stay
    // valid until the overlap ends.
    let claims = match jwt::verify(&auth.token, &app.jwt_secret) {
        Ok(claims) => claims,
        Err(error)
            if !app.previous_jwt_secret.is_empty() && now_ms() < app.previous_secret_until_ms =>
        {
            jwt::verify(&auth.token, &app.previous_jwt_secret).map_err(|_| error.to_string())?
        }
        Err(error) => return Err(error.to_string()),
    };
    if claims.sub.is_empty() || claims.sub.len() > 255 {
        return Err("token subject (user) must be 1 to 255 bytes".into());
    }
    let device = if !auth.device_id.is_empty() {
        auth.device_id.clone()
    } else if !claims.dev.is_empty() {
        claims.dev.clone()
    } else {
        "default".to_string()
    };
    Ok(Identity {
        app: claims.app,
        user: claims.sub,
        device,
    })
}

/// Turns a connection away at accept. Address lists close at once (a plain
/// TCP device still gets the ERROR frame if the socket takes it without
/// waiting); the per-address cap and rate answer with an ERROR frame and a
/// polite close on plain TCP. TLS and WebSocket devices are closed without a
/// frame: no handshake is spent on a refused address.
async fn refuse_at_accept(tcp: TcpStream, transport: Transport, refusal: Refusal, message: String) {
    metrics::refused(refusal.reason());
    if !transport.is_plain() {
        return;
    }
    let code = if refusal.is_list() {
        ErrorCode::Forbidden
    } else if refusal == Refusal::RateLimited {
        ErrorCode::RateLimited
    } else {
        ErrorCode::TooManyConnections
    };
    let frame = error_frame(code, message, 0);
    if refusal.is_list() {
        let _ = tcp.try_write(&frame);
        return;
    }
    DeviceStream::Tcp(tcp).close_politely(frame, LINGER).await;
}

/// Serves one accepted socket from accept to close.
pub(crate) async fn serve(room: Arc<Room>, tcp: TcpStream, peer: SocketAddr, transport: Transport) {
    let _slot = match room.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let message = refusal.message(&room.admission.limits());
            return Box::pin(refuse_at_accept(tcp, transport, refusal, message)).await;
        }
    };
    // Handshake, AUTH and the inbox: large state, needed once, so boxed.
    let Some(mut session) = Box::pin(open(&room, tcp, peer, transport)).await else {
        return;
    };
    let last = connection_loop(
        &room,
        &session.handle,
        &mut session.stream,
        &mut session.buf,
        session.inbox,
    )
    .await;
    finish(&room, &session.handle);
    let reason = match (&last, session.handle.pending_kick()) {
        (Some(_), Some(code)) => kick_reason_label(code),
        (Some(_), None) => "frame_error",
        (None, _) => "client",
    };
    metrics::closed(reason);
    if let Some(last_frame) = last {
        Box::pin(session.stream.close_politely(last_frame, LINGER)).await;
    }
}

fn kick_reason_label(code: KickCode) -> &'static str {
    match code {
        KickCode::Shutdown => "kick_shutdown",
        KickCode::SlowConsumer => "kick_slow_consumer",
        KickCode::SingleLogin => "kick_single_login",
        KickCode::ByApi => "kick_by_api",
        KickCode::Heartbeat => "kick_heartbeat",
        KickCode::Unspecified => "kick",
    }
}

/// An authenticated connection, ready for its loop.
struct Opened {
    stream: DeviceStream,
    handle: Arc<ConnHandle>,
    /// Bytes the device sent right behind AUTH.
    buf: BytesMut,
    inbox: Option<Box<InboxOverlap>>,
}

/// Ids of the inbox replayed at AUTH, recognised for a while when the same
/// message also arrives live.
struct InboxOverlap {
    ids: HashSet<u64>,
    read_at: Instant,
}

/// The transport's handshake and AUTH under the pre-auth deadline, then the
/// session's registration and the offline inbox. `None` when the connection
/// ended (answered and closed where there was something to say).
async fn open(
    room: &Arc<Room>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
) -> Option<Opened> {
    let limits = room.admission.limits();
    let deadline = Instant::now() + limits.auth_timeout;
    let max_message = limits.max_body as usize + pushgrid_wire::HEADER_LEN;
    let handshake = tokio::time::timeout_at(
        deadline,
        crate::transport::handshake(transport, tcp, room.tls.as_ref(), max_message),
    )
    .await;
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            metrics::auth("handshake_failed");
            tracing::debug!(%peer, transport = transport.as_str(), %error, "handshake failed");
            return None;
        }
        Err(_) => {
            metrics::auth("timeout");
            metrics::refused("auth_timeout");
            return None;
        }
    };
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout_at(
        deadline,
        read_frame(&mut stream, &mut buf, limits.pre_auth_max_body),
    )
    .await;
    let refuse = |result: &'static str, reason: &'static str| {
        metrics::auth(result);
        metrics::refused(reason);
    };
    let frame = match first {
        Err(_) => {
            refuse("timeout", "auth_timeout");
            let error = error_frame(ErrorCode::AuthTimeout, "no AUTH within the deadline", 0);
            stream.close_politely(error, LINGER).await;
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::Frame(error))) => {
            refuse("bad_frame", "bad_frame");
            tracing::debug!(%peer, %error, "bad frame before auth");
            let answer = error_frame(error.code(), error.to_string(), 0);
            stream.close_politely(answer, LINGER).await;
            return None;
        }
        Ok(Ok(frame)) => frame,
    };
    if frame.op != Op::Auth {
        refuse("bad_frame", "auth_required");
        let error = error_frame(
            ErrorCode::AuthRequired,
            "the first frame must be AUTH",
            frame.seq,
        );
        stream.close_politely(error, LINGER).await;
        return None;
    }
    let auth: Auth = match frame.decode() {
        Ok(auth) => auth,
        Err(error) => {
            refuse("bad_frame", "bad_body");
            let answer = error_frame(error.code(), error.to_string(), frame.seq);
            stream.close_politely(answer, LINGER).await;
            return None;
        }
    };
    let identity = match authenticate(room, &auth) {
        Ok(identity) => identity,
        Err(reason) => {
            refuse("failed", "auth_failed");
            tracing::debug!(%peer, %reason, "auth failed");
            let answer = error_frame(ErrorCode::AuthFailed, reason, frame.seq);
            stream.close_politely(answer, LINGER).await;
            return None;
        }
    };

    // ---- Register the session; the device is routable from here on.
    let conn_id = room.next_conn_id();
    let handle = Arc::new(ConnHandle {
        id: conn_id,
        app: room.names.get(&identity.app),
        user: identity.user.into_boxed_str(),
        device: identity.device.into_boxed_str(),
        platform: room.names.get(&auth.platform),
        since_ms: now_ms(),
        transport,
        queue: Mutex::new(OutQueue::default()),
        last_seen: AtomicU32::new(room_clock()),
        kick_code: AtomicI32::new(0),
        wake: Notify::new(),
    });
    room.conns.insert(conn_id, handle.clone());
    let session = session_of(room, &handle);
    if let Err(status) = room.peers.online(session.clone()).await {
        room.conns.remove(&conn_id);
        metrics::auth("unavailable");
        tracing::warn!(error = %status.message(), "cannot register session");
        let error = error_frame(
            ErrorCode::Unavailable,
            "session registry unavailable; retry",
            0,
        );
        stream.close_politely(error, LINGER).await;
        return None;
    }
    metrics::auth("ok");
    metrics::connections(room.conns.len());
    room.cluster.set_load(room.conns.len() as u64);
    room.peers.state(StateEvent {
        session: Some(session.clone()),
        online: true,
        at_ms: now_ms(),
    });
    if room
        .cluster
        .view()
        .app(&handle.app)
        .is_some_and(|app| app.single_login)
    {
        room.peers.kick_older_logins(&session);
    }
    // A room that started draining while this device authenticated sends it
    // on at once (the drain kicked the connections it saw).
    if room.is_draining() {
        handle.kick(KickCode::Shutdown);
    }

    let auth_ok = AuthOk {
        conn_id,
        heartbeat_secs: room.config.heartbeat_secs,
        server_time_ms: now_ms(),
    };
    let mut alive = stream
        .write_frames(&[encode(Op::AuthOk, frame.seq, &auth_ok)])
        .await
        .is_ok();

    // ---- The offline inbox, oldest first. A message stored while the inbox
    // was read can also arrive live: its ids are remembered for INBOX_OVERLAP
    // (checked when frames arrive, no timer), so the device gets it once.
    let mut inbox = None;
    if alive {
        match room.peers.pending(&handle.app, &handle.user).await {
            Ok(messages) if messages.is_empty() => {}
            Ok(messages) => {
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
                    frames.push(encode(Op::Push, 0, &push));
                }
                let count = frames.len() as u64;
                match stream.write_frames(&frames).await {
                    Ok(bytes) => {
                        metrics::hot().bytes_out.increment(bytes as u64);
                        ::metrics::counter!("pushgrid_room_inbox_pushed_total").increment(count);
                        // Message status (issue 12): written to this device.
                        for id in &ids {
                            room.peers
                                .delivered(&handle.app, &handle.user, &handle.device, *id);
                        }
                    }
                    Err(_) => alive = false,
                }
                inbox = Some(Box::new(InboxOverlap {
                    ids,
                    read_at: Instant::now(),
                }));
            }
            Err(status) => {
                // The inbox stays stored; make the device come back for it.
                tracing::warn!(error = %status.message(), "cannot read inbox");
                finish(room, &handle);
                metrics::closed("inbox_unavailable");
                let error = error_frame(ErrorCode::Unavailable, "inbox unavailable; retry", 0);
                stream.close_politely(error, LINGER).await;
                return None;
            }
        }
    }
    if !alive {
        finish(room, &handle);
        metrics::closed("io");
        return None;
    }
    shrink(&mut buf);
    Some(Opened {
        stream,
        handle,
        buf,
        inbox,
    })
}

/// The register session of a live connection.
pub(crate) fn session_of(room: &Room, conn: &ConnHandle) -> Session {
    Session {
        app: conn.app.to_string(),
        user: conn.user.to_string(),
        device: conn.device.to_string(),
        platform: conn.platform.to_string(),
        room: room.node_id.clone(),
        conn_id: conn.id,
        since_ms: conn.since_ms,
    }
}

fn finish(room: &Room, conn: &ConnHandle) {
    conn.close_queue();
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

/// The KICK frame for a pending kick.
fn kick_frame(room: &Room, conn: &ConnHandle, code: KickCode) -> Bytes {
    let reason = room
        .kick_reasons
        .remove(&conn.id)
        .map(|(_, reason)| reason)
        .unwrap_or_else(|| {
            match code {
                KickCode::SlowConsumer => "outbound queue full",
                KickCode::Heartbeat => "no heartbeat",
                KickCode::SingleLogin => "logged in elsewhere",
                KickCode::Shutdown => "room is draining; reconnect elsewhere",
                _ => "kicked",
            }
            .to_string()
        });
    let mut kick = Kick {
        code: code as i32,
        reason,
        ..Default::default()
    };
    if code == KickCode::Shutdown {
        // Spread the reconnects over the drain window, and point each
        // device at another live room.
        let window_ms = room.admission.limits().drain_window.as_millis() as u32;
        kick.reconnect_after_ms = if window_ms == 0 {
            0
        } else {
            rand::random::<u32>() % window_ms
        };
        kick.reconnect_to = room.reconnect_target(conn);
    }
    ::metrics::counter!("pushgrid_room_kicks_total", "code" => code.as_str_name()).increment(1);
    encode(Op::Kick, 0, &kick)
}

/// What woke a connection's loop.
enum Wake {
    /// Frames queued, or a kick.
    Queue,
    Input(std::io::Result<usize>),
}

/// What one frame from the device asks of the loop.
enum Next {
    Continue,
    /// Write this answer now.
    Reply(Bytes),
    /// Close with this last frame (empty: just close).
    Close(Bytes),
    Subscribe(Sub, u32),
}

/// Runs until the device leaves or must be closed; returns the last frame to
/// send (ERROR or KICK) when the server is the one closing.
async fn connection_loop(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut DeviceStream,
    buf: &mut BytesMut,
    mut inbox: Option<Box<InboxOverlap>>,
) -> Option<Bytes> {
    // Frames the device pipelined behind AUTH are already buffered.
    let mut buffered = !buf.is_empty();
    loop {
        if buffered {
            buffered = false;
            loop {
                match decode_frame(buf, room.admission.max_body()) {
                    Ok(Decoded::Frame(frame)) => match handle_frame(room, handle, frame) {
                        Next::Continue => {}
                        Next::Reply(answer) => {
                            if let Err(failed) = write_one(stream, answer).await {
                                return failed;
                            }
                        }
                        Next::Close(last) => return Some(last),
                        Next::Subscribe(sub, seq) => {
                            if let Err(failed) =
                                Box::pin(subscribe(room, handle, stream, sub, seq)).await
                            {
                                return failed;
                            }
                        }
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
        // the socket) runs after it, so the future of an idle connection
        // holds the two waits and not the write path on top of them.
        let event = tokio::select! {
            biased;
            () = handle.wake.notified() => Wake::Queue,
            read = stream.read_some(buf) => Wake::Input(read),
        };
        match event {
            Wake::Queue => {
                if let Some(code) = handle.pending_kick() {
                    return Some(kick_frame(room, handle, code));
                }
                let mut batch = handle.take_queued();
                if let Some(overlap) = &inbox {
                    batch.retain(|outbound| {
                        outbound.msg_id == 0 || !overlap.ids.contains(&outbound.msg_id)
                    });
                    if overlap.read_at.elapsed() > INBOX_OVERLAP {
                        inbox = None;
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let frames: Vec<Bytes> = batch.into_iter().map(|outbound| outbound.frame).collect();
                match stream.write_frames(&frames).await {
                    Ok(bytes) => {
                        let hot = metrics::hot();
                        hot.bytes_out.increment(bytes as u64);
                        hot.frames_sent.increment(frames.len() as u64);
                    }
                    Err(_) => return None,
                }
            }
            Wake::Input(read) => {
                match read {
                    Ok(0) | Err(_) => return None,
                    Ok(count) => {
                        metrics::hot().bytes_in.increment(count as u64);
                        handle.last_seen.store(room_clock(), Ordering::Relaxed);
                        buffered = true;
                    }
                }
                if inbox
                    .as_ref()
                    .is_some_and(|overlap| overlap.read_at.elapsed() > INBOX_OVERLAP)
                {
                    inbox = None;
                }
            }
        }
        if !buffered {
            shrink(buf);
        }
    }
}

/// Handles one frame from an authenticated device.
fn handle_frame(room: &Arc<Room>, handle: &Arc<ConnHandle>, frame: Frame) -> Next {
    match frame.op {
        // Answered in order, before any later frame of the same read.
        Op::Ping => Next::Reply(encode_empty(Op::Pong, frame.seq)),
        Op::Pong => Next::Continue,
        Op::Ack => {
            let ack: Ack = match frame.decode() {
                Ok(ack) => ack,
                Err(error) => {
                    return Next::Close(error_frame(error.code(), error.to_string(), frame.seq));
                }
            };
            if !ack.msg_ids.is_empty() {
                ::metrics::counter!("pushgrid_room_acks_total").increment(ack.msg_ids.len() as u64);
                room.peers
                    .ack(&handle.app, &handle.user, &handle.device, ack.msg_ids);
            }
            Next::Continue
        }
        Op::Upstream => {
            let upstream: Upstream = match frame.decode() {
                Ok(upstream) => upstream,
                Err(error) => {
                    return Next::Close(error_frame(error.code(), error.to_string(), frame.seq));
                }
            };
            let request = UpstreamRequest {
                app: handle.app.to_string(),
                user: handle.user.to_string(),
                device: handle.device.to_string(),
                product: upstream.product,
                r#type: upstream.r#type,
                client_msg_id: upstream.client_msg_id.clone(),
                payload: upstream.payload,
                room: room.node_id.clone(),
                conn_id: handle.id,
            };
            let (room, handle, seq) = (room.clone(), handle.clone(), frame.seq);
            tokio::spawn(async move {
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
                handle.send(room.queue_limits, 0, answer);
            });
            Next::Continue
        }
        Op::Sub => match frame.decode() {
            Ok(sub) => Next::Subscribe(sub, frame.seq),
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
        other => Next::Close(error_frame(
            ErrorCode::UnknownOp,
            format!("{other:?} is not a device-to-server op"),
            frame.seq,
        )),
    }
}

/// Most history pages replayed for one SUB (each up to 1000 messages).
const MAX_HISTORY_PAGES: usize = 10;

async fn write_one(stream: &mut DeviceStream, frame: Bytes) -> Result<(), Option<Bytes>> {
    match stream.write_frames(std::slice::from_ref(&frame)).await {
        Ok(bytes) => {
            metrics::hot().bytes_out.increment(bytes as u64);
            Ok(())
        }
        Err(_) => Err(None),
    }
}

/// SUB: subscribe, replay what the device missed (when it sent an offset and
/// epoch), then answer SUB_OK with whether the history covered the gap.
/// Err(Some(frame)) closes the connection with that frame; Err(None) means the
/// socket failed.
async fn subscribe(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut DeviceStream,
    sub: Sub,
    seq: u32,
) -> Result<(), Option<Bytes>> {
    let topic = match topics::normalize(&sub.topic) {
        Ok(topic) => topic.to_string(),
        Err(reason) => {
            return write_one(stream, error_frame(ErrorCode::BadBody, reason, seq)).await;
        }
    };
    // Subscribe first: a message published during the replay then arrives
    // live as well (the device drops it by offset) rather than not at all.
    if topic != topics::ALL
        && let Err(reason) = room.topics.subscribe(handle.id, &handle.app, &topic)
    {
        return write_one(stream, error_frame(ErrorCode::BadBody, reason, seq)).await;
    }
    let mut since = sub.since_offset;
    let mut recovered = true;
    let mut position = (0, 0);
    for _ in 0..MAX_HISTORY_PAGES {
        let history = match room
            .peers
            .history(&handle.app, &topic, since, sub.epoch)
            .await
        {
            Ok(history) => history,
            Err(status) => {
                tracing::warn!(error = %status.message(), "cannot read topic history");
                let error = error_frame(
                    ErrorCode::Unavailable,
                    "topic history unavailable; subscribe again",
                    seq,
                );
                return write_one(stream, error).await;
            }
        };
        position = (history.offset, history.epoch);
        recovered = history.recovered;
        let page = history.messages.len();
        let mut frames = Vec::with_capacity(page);
        for message in history.messages {
            since = message.offset;
            frames.push(encode(Op::Push, 0, &broadcast_push(message)));
        }
        match stream.write_frames(&frames).await {
            Ok(bytes) => metrics::hot().bytes_out.increment(bytes as u64),
            Err(_) => return Err(None),
        }
        if sub.epoch == 0 || !recovered || page == 0 || since >= history.offset {
            break;
        }
    }
    ::metrics::counter!("pushgrid_room_subscriptions_total", "recovered" => if recovered { "true" } else { "false" }).increment(1);
    let ok = SubOk {
        topic,
        recovered: recovered && sub.epoch != 0,
        offset: position.0,
        epoch: position.1,
    };
    write_one(stream, encode(Op::SubOk, seq, &ok)).await
}

/// The PUSH frame body of a broadcast message.
pub(crate) fn broadcast_push(message: pushgrid_proto::cluster::BroadcastMessage) -> Push {
    Push {
        msg_id: message.id,
        kind: PushKind::Broadcast as i32,
        topic: message.topic,
        offset: message.offset,
        epoch: message.epoch,
        payload: message.payload,
        created_ms: message.created_ms,
    }
}

/// Kicks connections silent for 2.5 heartbeat intervals, and forgets the
/// connect-rate state of quiet addresses. One task for the whole room,
/// waking a few times per interval.
pub(crate) async fn sweep_silent_connections(room: Arc<Room>) {
    let heartbeat = room.config.heartbeat_secs.max(1);
    let allowed_silence = heartbeat * 5 / 2;
    let period =
        Duration::from_millis(u64::from(heartbeat) * 1000 / 4).max(Duration::from_millis(250));
    let mut last_tidy = Instant::now();
    loop {
        tokio::select! {
            _ = room.background_stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = room_clock();
        let mut kicked = 0u64;
        for entry in room.conns.iter() {
            if now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > allowed_silence
                && entry.kick(KickCode::Heartbeat)
            {
                kicked += 1;
            }
        }
        if kicked > 0 {
            ::metrics::counter!("pushgrid_room_heartbeat_kicks_total").increment(kicked);
        }
        if last_tidy.elapsed() > Duration::from_secs(60) {
            room.admission.tidy();
            last_tidy = Instant::now();
        }
    }
}
