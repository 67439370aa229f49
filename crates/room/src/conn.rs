//! One device connection: AUTH, then a loop over socket readiness, the
//! outbound queue and kicks.
//!
//! Memory: the read buffer exists only while a frame is partly read and is
//! sized by the frame header (limits checked first); an idle connection holds
//! no buffer. Writes try the socket directly and wait only when it is full.
//! Heartbeat deadlines are checked by one sweeper for the whole room, not by a
//! timer per connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushgrid_common::{jwt, now_ms};
use pushgrid_proto::client::{
    Ack, Auth, AuthOk, ErrorCode, Kick, KickCode, Push, PushKind, Sub, SubOk, Unsub, Upstream,
    UpstreamOk,
};
use pushgrid_proto::cluster::{Session, StateEvent, UpstreamRequest};
use pushgrid_wire::{Decoded, Frame, FrameError, Op, decode_frame, encode, encode_empty};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use crate::{Room, topics};

/// How long a write may wait for a full socket before the device counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the inbox was read a live copy of one of its messages is
/// still recognised and skipped.
const INBOX_OVERLAP: Duration = Duration::from_secs(10);
/// After an ERROR or KICK, how long input is drained before the socket closes.
const LINGER: Duration = Duration::from_secs(1);

/// What the rest of the room holds of a live, authenticated connection.
pub struct ConnHandle {
    pub id: u64,
    pub app: String,
    pub user: String,
    pub device: String,
    pub platform: String,
    pub since_ms: u64,
    outbound: mpsc::Sender<Outbound>,
    /// Seconds since the room started, at the last frame from the device.
    last_seen: AtomicU32,
    /// A pending kick (a `KickCode`), 0 for none.
    kick_code: AtomicI32,
    kicked: Notify,
}

/// A frame waiting for the socket; `msg_id` is set for PUSH frames.
pub(crate) struct Outbound {
    pub msg_id: u64,
    pub frame: Bytes,
}

impl ConnHandle {
    /// Queues a frame without waiting. A full queue marks the device a slow
    /// consumer: it is kicked, and the frame is not queued. `msg_id` is the
    /// message of a PUSH frame, 0 for others.
    pub fn send(&self, msg_id: u64, frame: Bytes) -> bool {
        match self.outbound.try_send(Outbound { msg_id, frame }) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("pushgrid_room_slow_consumer_kicks_total").increment(1);
                self.kick(KickCode::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the connection to send KICK with `code` and close.
    pub fn kick(&self, code: KickCode) {
        if self
            .kick_code
            .compare_exchange(0, code as i32, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.kicked.notify_one();
        }
    }
}

fn room_clock() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs() as u32
}

enum ReadError {
    Closed,
    Frame(FrameError),
}

/// Reads until one whole frame is buffered. The buffer grows only to the size
/// the (already validated) header asks for.
async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_body: u32,
) -> Result<Frame, ReadError> {
    use tokio::io::AsyncReadExt;
    loop {
        match decode_frame(buf, max_body) {
            Ok(Decoded::Frame(frame)) => return Ok(frame),
            Ok(Decoded::Incomplete { needed }) => buf.reserve(needed),
            Err(error) => return Err(ReadError::Frame(error)),
        }
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

/// Writes a whole frame: straight into the socket when it has room, waiting
/// (bounded) only when it is full.
async fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> std::io::Result<()> {
    let mut written = 0;
    while written < frame.len() {
        match stream.try_write(&frame[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::timeout(WRITE_TIMEOUT, stream.writable())
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            }
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Sends a last frame (ERROR or KICK), shuts down the write half and drains
/// input for a moment, so the kernel does not answer unread input with a reset
/// that would destroy the frame before the device reads it.
async fn close_politely(mut stream: TcpStream, last_frame: Bytes) {
    use tokio::io::AsyncReadExt;
    let _ = write_frame(&mut stream, &last_frame).await;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 512];
    let _ = tokio::time::timeout(LINGER, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
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

fn refuse(reason: &'static str) {
    metrics::counter!("pushgrid_room_refused_total", "reason" => reason).increment(1);
}

struct Identity {
    app: String,
    user: String,
    device: String,
    platform: String,
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
        platform: auth.platform.clone(),
    })
}

/// Serves one device connection from accept to close.
pub(crate) async fn serve(room: Arc<Room>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let mut buf = BytesMut::new();

    // ---- AUTH, under the pre-auth deadline and the pre-auth frame limit.
    let deadline = Duration::from_secs(u64::from(room.config.auth_timeout_secs));
    let first = tokio::time::timeout(
        deadline,
        read_frame(&mut stream, &mut buf, room.config.pre_auth_max_body),
    )
    .await;
    let frame = match first {
        Err(_) => {
            refuse("auth_timeout");
            return close_politely(
                stream,
                error_frame(ErrorCode::AuthTimeout, "no AUTH within the deadline", 0),
            )
            .await;
        }
        Ok(Err(ReadError::Closed)) => return,
        Ok(Err(ReadError::Frame(error))) => {
            refuse("bad_frame");
            tracing::debug!(%peer, %error, "bad frame before auth");
            return close_politely(stream, error_frame(error.code(), error.to_string(), 0)).await;
        }
        Ok(Ok(frame)) => frame,
    };
    if frame.op != Op::Auth {
        refuse("auth_required");
        return close_politely(
            stream,
            error_frame(
                ErrorCode::AuthRequired,
                "the first frame must be AUTH",
                frame.seq,
            ),
        )
        .await;
    }
    let auth: Auth = match frame.decode() {
        Ok(auth) => auth,
        Err(error) => {
            refuse("bad_body");
            return close_politely(
                stream,
                error_frame(error.code(), error.to_string(), frame.seq),
            )
            .await;
        }
    };
    let identity = match authenticate(&room, &auth) {
        Ok(identity) => identity,
        Err(reason) => {
            refuse("auth_failed");
            tracing::debug!(%peer, %reason, "auth failed");
            return close_politely(
                stream,
                error_frame(ErrorCode::AuthFailed, reason, frame.seq),
            )
            .await;
        }
    };

    // ---- Register the session; the device is routable from here on.
    let conn_id = room.next_conn_id();
    let (outbound, mut queue) = mpsc::channel(room.config.outbound_queue.max(1));
    let handle = Arc::new(ConnHandle {
        id: conn_id,
        app: identity.app.clone(),
        user: identity.user.clone(),
        device: identity.device.clone(),
        platform: identity.platform.clone(),
        since_ms: now_ms(),
        outbound,
        last_seen: AtomicU32::new(room_clock()),
        kick_code: AtomicI32::new(0),
        kicked: Notify::new(),
    });
    let session = Session {
        app: identity.app.clone(),
        user: identity.user.clone(),
        device: identity.device.clone(),
        platform: identity.platform.clone(),
        room: room.node_id.clone(),
        conn_id,
        since_ms: handle.since_ms,
    };
    room.conns.insert(conn_id, handle.clone());
    if let Err(status) = room.peers.online(session.clone()).await {
        room.conns.remove(&conn_id);
        tracing::warn!(error = %status.message(), "cannot register session");
        return close_politely(
            stream,
            error_frame(
                ErrorCode::Unavailable,
                "session registry unavailable; retry",
                0,
            ),
        )
        .await;
    }
    metrics::gauge!("pushgrid_room_connections").set(room.conns.len() as f64);
    room.cluster.set_load(room.conns.len() as u64);
    room.peers.state(StateEvent {
        session: Some(session.clone()),
        online: true,
        at_ms: now_ms(),
    });
    if room
        .cluster
        .view()
        .app(&identity.app)
        .is_some_and(|app| app.single_login)
    {
        room.peers.kick_older_logins(&session);
    }

    let auth_ok = AuthOk {
        conn_id,
        heartbeat_secs: room.config.heartbeat_secs,
        server_time_ms: now_ms(),
    };
    let mut alive = write_frame(&mut stream, &encode(Op::AuthOk, frame.seq, &auth_ok))
        .await
        .is_ok();

    // ---- The offline inbox, oldest first. A message stored while the inbox
    // was read can also arrive live: its ids are remembered for INBOX_OVERLAP
    // (checked when frames arrive, no timer), so the device gets it once.
    let mut inbox_ids = std::collections::HashSet::new();
    if alive {
        match room.peers.pending(&identity.app, &identity.user).await {
            Ok(messages) => {
                for message in messages {
                    inbox_ids.insert(message.id);
                    let push = Push {
                        msg_id: message.id,
                        kind: PushKind::Unicast as i32,
                        payload: message.payload,
                        created_ms: message.created_ms,
                        ..Default::default()
                    };
                    if write_frame(&mut stream, &encode(Op::Push, 0, &push))
                        .await
                        .is_err()
                    {
                        alive = false;
                        break;
                    }
                    metrics::counter!("pushgrid_room_inbox_pushed_total").increment(1);
                }
            }
            Err(status) => {
                // The inbox stays stored; make the device come back for it.
                tracing::warn!(error = %status.message(), "cannot read inbox");
                finish(&room, &session);
                return close_politely(
                    stream,
                    error_frame(ErrorCode::Unavailable, "inbox unavailable; retry", 0),
                )
                .await;
            }
        }
    }

    let last = if alive {
        connection_loop(&room, &handle, &mut stream, &mut buf, &mut queue, inbox_ids).await
    } else {
        None
    };
    finish(&room, &session);
    if let Some(last_frame) = last {
        close_politely(stream, last_frame).await;
    }
}

/// The register session of a live connection.
pub(crate) fn session_of(room: &Room, conn: &ConnHandle) -> Session {
    Session {
        app: conn.app.clone(),
        user: conn.user.clone(),
        device: conn.device.clone(),
        platform: conn.platform.clone(),
        room: room.node_id.clone(),
        conn_id: conn.id,
        since_ms: conn.since_ms,
    }
}

fn finish(room: &Room, session: &Session) {
    room.conns.remove(&session.conn_id);
    room.kick_reasons.remove(&session.conn_id);
    room.topics.remove_conn(session.conn_id);
    metrics::gauge!("pushgrid_room_connections").set(room.conns.len() as f64);
    room.cluster.set_load(room.conns.len() as u64);
    room.peers.offline(session.clone());
    room.peers.state(StateEvent {
        session: Some(session.clone()),
        online: false,
        at_ms: now_ms(),
    });
}

/// Runs until the device leaves or must be closed; returns the last frame to
/// send (ERROR or KICK) when the server is the one closing.
async fn connection_loop(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    queue: &mut mpsc::Receiver<Outbound>,
    mut inbox_ids: std::collections::HashSet<u64>,
) -> Option<Bytes> {
    let max_body = room.config.max_body;
    let inbox_read_at = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = handle.kicked.notified() => {
                let code = KickCode::try_from(handle.kick_code.load(Ordering::Acquire)).unwrap_or(KickCode::Unspecified);
                let reason = room.kick_reasons.remove(&handle.id).map(|(_, reason)| reason).unwrap_or_else(|| {
                    match code {
                        KickCode::SlowConsumer => "outbound queue full",
                        KickCode::Heartbeat => "no heartbeat",
                        KickCode::SingleLogin => "logged in elsewhere",
                        _ => "kicked",
                    }
                    .to_string()
                });
                metrics::counter!("pushgrid_room_kicks_total", "code" => code.as_str_name()).increment(1);
                return Some(encode(Op::Kick, 0, &Kick { code: code as i32, reason, ..Default::default() }));
            }
            _ = room.shutdown.cancelled() => {
                let kick = Kick {
                    code: KickCode::Shutdown as i32,
                    reason: "room is shutting down".into(),
                    reconnect_after_ms: rand::random::<u32>() % 2000,
                    reconnect_to: String::new(),
                };
                return Some(encode(Op::Kick, 0, &kick));
            }
            outbound = queue.recv() => {
                let outbound = outbound?;
                let already_sent = outbound.msg_id != 0 && inbox_ids.contains(&outbound.msg_id);
                if !already_sent {
                    if write_frame(stream, &outbound.frame).await.is_err() {
                        return None;
                    }
                    metrics::counter!("pushgrid_room_frames_sent_total").increment(1);
                }
                if !inbox_ids.is_empty() && inbox_read_at.elapsed() > INBOX_OVERLAP {
                    inbox_ids = std::collections::HashSet::new();
                }
            }
            ready = stream.readable() => {
                if ready.is_err() {
                    return None;
                }
                // Grow only when bytes are waiting; an idle connection holds none.
                if buf.capacity() == buf.len() {
                    buf.reserve(512);
                }
                match stream.try_read_buf(buf) {
                    Ok(0) => return None,
                    Ok(_) => handle.last_seen.store(room_clock(), Ordering::Relaxed),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return None,
                }
                loop {
                    match decode_frame(buf, max_body) {
                        Ok(Decoded::Frame(frame)) => {
                            if let Some(last) = handle_frame(room, handle, stream, frame).await {
                                return Some(last);
                            }
                        }
                        Ok(Decoded::Incomplete { needed }) => {
                            if buf.is_empty() {
                                *buf = BytesMut::new();
                            } else {
                                buf.reserve(needed);
                            }
                            break;
                        }
                        Err(error) => {
                            metrics::counter!("pushgrid_room_frame_errors_total").increment(1);
                            return Some(error_frame(error.code(), error.to_string(), 0));
                        }
                    }
                }
            }
        }
    }
}

/// Handles one frame from an authenticated device; `Some(frame)` closes.
async fn handle_frame(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut TcpStream,
    frame: Frame,
) -> Option<Bytes> {
    match frame.op {
        Op::Ping => {
            if write_frame(stream, &encode_empty(Op::Pong, frame.seq))
                .await
                .is_err()
            {
                return Some(Bytes::new());
            }
            None
        }
        Op::Pong => None,
        Op::Ack => {
            let ack: Ack = match frame.decode() {
                Ok(ack) => ack,
                Err(error) => return Some(error_frame(error.code(), error.to_string(), frame.seq)),
            };
            if !ack.msg_ids.is_empty() {
                metrics::counter!("pushgrid_room_acks_total").increment(ack.msg_ids.len() as u64);
                room.peers.ack(&handle.app, &handle.user, ack.msg_ids);
            }
            None
        }
        Op::Upstream => {
            let upstream: Upstream = match frame.decode() {
                Ok(upstream) => upstream,
                Err(error) => return Some(error_frame(error.code(), error.to_string(), frame.seq)),
            };
            let request = UpstreamRequest {
                app: handle.app.clone(),
                user: handle.user.clone(),
                device: handle.device.clone(),
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
                handle.send(0, answer);
            });
            None
        }
        Op::Sub => {
            let sub: Sub = match frame.decode() {
                Ok(sub) => sub,
                Err(error) => return Some(error_frame(error.code(), error.to_string(), frame.seq)),
            };
            match subscribe(room, handle, stream, sub, frame.seq).await {
                Ok(()) => None,
                Err(io_failed) => io_failed,
            }
        }
        Op::Unsub => {
            let unsub: Unsub = match frame.decode() {
                Ok(unsub) => unsub,
                Err(error) => return Some(error_frame(error.code(), error.to_string(), frame.seq)),
            };
            if let Ok(topic) = topics::normalize(&unsub.topic) {
                room.topics.unsubscribe(handle.id, &handle.app, topic);
            }
            None
        }
        other => Some(error_frame(
            ErrorCode::UnknownOp,
            format!("{other:?} is not a device-to-server op"),
            frame.seq,
        )),
    }
}

/// Most history pages replayed for one SUB (each up to 1000 messages).
const MAX_HISTORY_PAGES: usize = 10;

/// SUB: subscribe, replay what the device missed (when it sent an offset and
/// epoch), then answer SUB_OK with whether the history covered the gap.
/// Err(Some(frame)) closes the connection with that frame; Err(None) means the
/// socket failed.
async fn subscribe(
    room: &Arc<Room>,
    handle: &Arc<ConnHandle>,
    stream: &mut TcpStream,
    sub: Sub,
    seq: u32,
) -> Result<(), Option<Bytes>> {
    let topic = match topics::normalize(&sub.topic) {
        Ok(topic) => topic.to_string(),
        Err(reason) => {
            let error = error_frame(ErrorCode::BadBody, reason, seq);
            return write_frame(stream, &error).await.map_err(|_| None);
        }
    };
    // Subscribe first: a message published during the replay then arrives
    // live as well (the device drops it by offset) rather than not at all.
    if topic != topics::ALL
        && let Err(reason) = room.topics.subscribe(handle.id, &handle.app, &topic)
    {
        let error = error_frame(ErrorCode::BadBody, reason, seq);
        return write_frame(stream, &error).await.map_err(|_| None);
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
                return write_frame(stream, &error).await.map_err(|_| None);
            }
        };
        position = (history.offset, history.epoch);
        recovered = history.recovered;
        let page = history.messages.len();
        for message in history.messages {
            since = message.offset;
            let push = broadcast_push(message);
            write_frame(stream, &encode(Op::Push, 0, &push))
                .await
                .map_err(|_| None)?;
        }
        if sub.epoch == 0 || !recovered || page == 0 || since >= history.offset {
            break;
        }
    }
    metrics::counter!("pushgrid_room_subscriptions_total", "recovered" => if recovered { "true" } else { "false" }).increment(1);
    let ok = SubOk {
        topic,
        recovered: recovered && sub.epoch != 0,
        offset: position.0,
        epoch: position.1,
    };
    write_frame(stream, &encode(Op::SubOk, seq, &ok))
        .await
        .map_err(|_| None)
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

/// Kicks connections silent for 2.5 heartbeat intervals. One task for the
/// whole room, waking a few times per interval.
pub(crate) async fn sweep_silent_connections(room: Arc<Room>) {
    let heartbeat = room.config.heartbeat_secs.max(1);
    let allowed_silence = heartbeat * 5 / 2;
    let period =
        Duration::from_millis(u64::from(heartbeat) * 1000 / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = room.shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let now = room_clock();
        let mut kicked = 0u64;
        for entry in room.conns.iter() {
            if now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > allowed_silence {
                entry.kick(KickCode::Heartbeat);
                kicked += 1;
            }
        }
        if kicked > 0 {
            metrics::counter!("pushgrid_room_heartbeat_kicks_total").increment(kicked);
        }
    }
}
