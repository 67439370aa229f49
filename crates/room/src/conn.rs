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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
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
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::admission::{IpSlot, Refusal};
use crate::outbox::{InboxOverlap, MAX_CALLS_IN_FLIGHT, Outbound, Writer};
use crate::shard::Adoption;
use crate::transport::{DeviceStream, Transport, shrink};
use crate::{ConnHandle, Room, metrics, topics};

/// After an ERROR or KICK, how long input is drained before the socket closes.
pub(crate) const LINGER: Duration = Duration::from_secs(1);
/// Inbox reads tried after AUTH before the device is sent away to come back
/// later, and the pause before the second (doubling after it).
const INBOX_ATTEMPTS: usize = 5;
const INBOX_FIRST_RETRY: Duration = Duration::from_millis(500);

/// What an open connection holds of the room's limits: its place among the
/// room's connections and among its source address's. Given back on drop.
pub(crate) struct Lease {
    _ip: IpSlot,
    _permit: OwnedSemaphorePermit,
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
    let policy = jwt::TokenPolicy {
        clock_skew_secs: room.config.token_clock_skew_secs,
        max_lifetime_secs: room.config.token_max_lifetime_secs,
    };
    // During a secret rotation, tokens signed with the previous secret stay
    // valid until the overlap ends.
    let claims = match jwt::verify(&auth.token, &app.jwt_secret, &policy) {
        Ok(claims) => claims,
        Err(error)
            if !app.previous_jwt_secret.is_empty() && now_ms() < app.previous_secret_until_ms =>
        {
            jwt::verify(&auth.token, &app.previous_jwt_secret, &policy)
                .map_err(|_| error.to_string())?
        }
        Err(error) => return Err(error.to_string()),
    };
    pushgrid_wire::check_id("the token subject (user)", &claims.sub)?;
    // A token that names a device binds the connection to it.
    if !claims.dev.is_empty() && !auth.device_id.is_empty() && auth.device_id != claims.dev {
        return Err(format!(
            "the token is for device {:?}, not {:?}",
            claims.dev, auth.device_id
        ));
    }
    let device = if !auth.device_id.is_empty() {
        auth.device_id.clone()
    } else if !claims.dev.is_empty() {
        claims.dev.clone()
    } else {
        "default".to_string()
    };
    pushgrid_wire::check_id("the device id", &device)?;
    if auth.platform.len() > pushgrid_wire::MAX_ID_BYTES {
        return Err(format!(
            "the platform must be at most {} bytes, not {}",
            pushgrid_wire::MAX_ID_BYTES,
            auth.platform.len()
        ));
    }
    pushgrid_wire::check_text("the platform", &auth.platform)?;
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
async fn refuse_at_accept(
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    refusal: Refusal,
    message: String,
) {
    metrics::refused(refusal.reason());
    log_refused_before_auth(peer, refusal.reason(), &message);
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
    DeviceStream::Tcp(tcp)
        .close_politely(vec![frame], LINGER)
        .await;
}

/// Logs a device connection turned away before it authenticated (address
/// lists, caps, no AUTH in time, a bad first frame), with its address,
/// within a budget of lines per second: a scan or a flood is counted in
/// `pushgrid_room_refused_total`, not written line by line.
fn log_refused_before_auth(peer: SocketAddr, reason: &str, message: &str) {
    static REFUSALS: pushgrid_common::auth::RefusalLog = pushgrid_common::auth::RefusalLog::new(20);
    if let Some(unlogged_before) = REFUSALS.admit() {
        tracing::info!(%peer, reason, message = %pushgrid_common::auth::printable(message), unlogged_before, "device refused before auth");
    }
}

/// Serves one accepted socket: opens it, then hands a plain TCP connection
/// to its shard, or runs a TLS/WebSocket connection's loop until it closes.
pub(crate) async fn serve(
    room: Arc<Room>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    permit: OwnedSemaphorePermit,
) {
    let ip_slot = match room.admission.admit(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            drop(permit);
            let message = refusal.message(&room.admission.limits());
            return Box::pin(refuse_at_accept(tcp, peer, transport, refusal, message)).await;
        }
    };
    let lease = Lease {
        _ip: ip_slot,
        _permit: permit,
    };
    // Handshake, AUTH and the register call: large state, needed once, so boxed.
    let Some(opened) = Box::pin(open(&room, tcp, peer, transport)).await else {
        return;
    };
    let Opened {
        mut stream,
        handle,
        mut buf,
    } = opened;
    if let Some(shard) = handle.shard().cloned() {
        let DeviceStream::Tcp(tcp) = stream else {
            unreachable!("shard connections are plain TCP");
        };
        match tcp.into_std() {
            Ok(stream) => shard.adopt(Adoption {
                conn: handle,
                stream,
                buffered: buf,
                lease,
            }),
            Err(error) => {
                tracing::warn!(%error, "cannot hand the connection to its shard");
                handle.close_queue();
                finish(&room, &handle);
                metrics::closed("io");
            }
        }
        return;
    }
    let last = Box::pin(task_loop(&room, &handle, &mut stream, &mut buf)).await;
    let kick = handle.pending_kick();
    // After a bad frame the answers to the frames before it go first; a
    // kicked device gets the KICK without what was queued.
    let mut frames = handle.close_queue_keeping(last.is_some() && kick.is_none());
    finish(&room, &handle);
    let reason = match (&last, kick) {
        (Some(_), Some(code)) => kick_reason_label(code),
        (Some(_), None) => "frame_error",
        (None, _) => "client",
    };
    metrics::closed(reason);
    if let Some(last_frame) = last {
        frames.push(last_frame);
        Box::pin(stream.close_politely(frames, LINGER)).await;
    }
    drop(lease);
}

pub(crate) fn kick_reason_label(code: KickCode) -> &'static str {
    match code {
        KickCode::Shutdown => "kick_shutdown",
        KickCode::SlowConsumer => "kick_slow_consumer",
        KickCode::SingleLogin => "kick_single_login",
        KickCode::ByApi => "kick_by_api",
        KickCode::Heartbeat => "kick_heartbeat",
        KickCode::Unavailable => "kick_unavailable",
        KickCode::Unspecified => "kick",
    }
}

/// An authenticated connection, ready for its loop.
struct Opened {
    stream: DeviceStream,
    handle: Arc<ConnHandle>,
    /// Bytes the device sent right behind AUTH.
    buf: BytesMut,
}

/// The transport's handshake and AUTH under the pre-auth deadline, then the
/// session's registration and AUTH_OK; the inbox replay starts beside it.
/// `None` when the connection ended (answered and closed where there was
/// something to say).
async fn open(
    room: &Arc<Room>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
) -> Option<Opened> {
    let limits = room.admission.limits();
    let deadline = Instant::now() + limits.auth_timeout;
    let max_message = limits.max_body as usize + pushgrid_wire::HEADER_LEN;
    // A plain TCP connection has no handshake; the others' (several KB of
    // TLS and WebSocket state) is boxed apart so a TCP connection never
    // allocates it.
    let handshake = if transport.is_plain() {
        Ok(crate::transport::plain(tcp))
    } else {
        tokio::time::timeout_at(
            deadline,
            Box::pin(crate::transport::handshake(
                transport,
                tcp,
                room.tls.as_ref(),
                max_message,
            )),
        )
        .await
    };
    let mut stream = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            metrics::auth("handshake_failed");
            log_refused_before_auth(
                peer,
                "handshake_failed",
                &format!("{} handshake: {error}", transport.as_str()),
            );
            return None;
        }
        Err(_) => {
            metrics::auth("timeout");
            metrics::refused("auth_timeout");
            log_refused_before_auth(peer, "auth_timeout", "no handshake within the deadline");
            return None;
        }
    };
    let mut buf = BytesMut::new();
    let first = tokio::time::timeout_at(
        deadline,
        read_frame(&mut stream, &mut buf, limits.pre_auth_max_body),
    )
    .await;
    let refuse = |result: &'static str, reason: &'static str, message: &str| {
        metrics::auth(result);
        metrics::refused(reason);
        log_refused_before_auth(peer, reason, message);
    };
    let frame = match first {
        Err(_) => {
            refuse("timeout", "auth_timeout", "no AUTH within the deadline");
            let error = error_frame(ErrorCode::AuthTimeout, "no AUTH within the deadline", 0);
            Box::pin(stream.close_politely(vec![error], LINGER)).await;
            return None;
        }
        Ok(Err(ReadError::Closed)) => return None,
        Ok(Err(ReadError::Frame(error))) => {
            refuse("bad_frame", "bad_frame", &error.to_string());
            let answer = error_frame(error.code(), error.to_string(), 0);
            Box::pin(stream.close_politely(vec![answer], LINGER)).await;
            return None;
        }
        Ok(Ok(frame)) => frame,
    };
    if frame.op != Op::Auth {
        refuse("bad_frame", "auth_required", "the first frame must be AUTH");
        let error = error_frame(
            ErrorCode::AuthRequired,
            "the first frame must be AUTH",
            frame.seq,
        );
        Box::pin(stream.close_politely(vec![error], LINGER)).await;
        return None;
    }
    let auth: Auth = match frame.decode() {
        Ok(auth) => auth,
        Err(error) => {
            refuse("bad_frame", "bad_body", &error.to_string());
            let answer = error_frame(error.code(), error.to_string(), frame.seq);
            Box::pin(stream.close_politely(vec![answer], LINGER)).await;
            return None;
        }
    };
    let identity = match authenticate(room, &auth) {
        Ok(identity) => identity,
        Err(reason) => {
            metrics::auth("failed");
            metrics::refused("auth_failed");
            static AUTH_REFUSALS: pushgrid_common::auth::RefusalLog =
                pushgrid_common::auth::RefusalLog::new(20);
            if let Some(unlogged_before) = AUTH_REFUSALS.admit() {
                tracing::info!(%peer, %reason, unlogged_before, "device auth refused");
            }
            let answer = error_frame(ErrorCode::AuthFailed, reason, frame.seq);
            Box::pin(stream.close_politely(vec![answer], LINGER)).await;
            return None;
        }
    };

    // ---- Register the session; the device is routable from here on. Its
    // queue starts held: what arrives live waits behind the inbox replay.
    let conn_id = room.next_conn_id();
    let writer = match transport {
        Transport::Tcp => Writer::Shard(room.shards.pick(conn_id).clone()),
        _ => Writer::Task(Box::default()),
    };
    let handle = Arc::new(ConnHandle::new(
        conn_id,
        room.names.get(&identity.app),
        identity.user,
        identity.device,
        room.names.get(&auth.platform),
        transport,
        writer,
        room_clock(),
    ));
    room.conns.insert(conn_id, handle.clone());
    let session = session_of(room, &handle);
    if let Err(status) = room.peers.online(session.clone()).await {
        room.conns.remove(&conn_id);
        handle.close_queue();
        metrics::auth("unavailable");
        tracing::warn!(error = %status.message(), "cannot register session");
        let error = error_frame(
            ErrorCode::Unavailable,
            "session registry unavailable; retry",
            0,
        );
        Box::pin(stream.close_politely(vec![error], LINGER)).await;
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
    if stream
        .write_frames(&[encode(Op::AuthOk, frame.seq, &auth_ok)])
        .await
        .is_err()
    {
        handle.close_queue();
        finish(room, &handle);
        metrics::closed("io");
        return None;
    }
    room.tracker
        .spawn(replay_inbox(room.clone(), handle.clone()));
    shrink(&mut buf);
    Some(Opened {
        stream,
        handle,
        buf,
    })
}

/// The offline inbox, oldest first, queued ahead of anything that arrived
/// live meanwhile; a message stored while the inbox was read can also arrive
/// live: its id is remembered for a while so the device gets it once. A saver
/// that cannot answer is asked again with backoff; after the last attempt the
/// device is sent away (KICK, code UNAVAILABLE) to come back later, and its
/// inbox stays stored.
async fn replay_inbox(room: Arc<Room>, handle: Arc<ConnHandle>) {
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

/// The KICK frame for a pending kick.
pub(crate) fn kick_frame(room: &Room, conn: &ConnHandle, code: KickCode) -> Bytes {
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
                KickCode::Unavailable => "a service is unavailable; reconnect later",
                _ => "kicked",
            }
            .to_string()
        });
    let mut kick = Kick {
        code: code as i32,
        reason,
        ..Default::default()
    };
    let spread = |window_ms: u32| {
        if window_ms == 0 {
            0
        } else {
            rand::random::<u32>() % window_ms
        }
    };
    match code {
        KickCode::Shutdown => {
            // Spread the reconnects over the drain window, and point each
            // device at another live room.
            kick.reconnect_after_ms =
                spread(room.admission.limits().drain_window.as_millis() as u32);
            kick.reconnect_to = room.reconnect_target(conn);
        }
        // Devices sent away together must not come back together.
        KickCode::Unavailable => kick.reconnect_after_ms = 1000 + spread(9000),
        _ => {}
    }
    ::metrics::counter!("pushgrid_room_kicks_total", "code" => code.as_str_name()).increment(1);
    encode(Op::Kick, 0, &kick)
}

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
                    .ack(&handle.app, handle.user(), handle.device(), ack.msg_ids);
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
        Op::PushToken => crate::push_tokens::handle_push_token(room, handle, frame),
        other => Next::Close(error_frame(
            ErrorCode::UnknownOp,
            format!("{other:?} is not a device-to-server op"),
            frame.seq,
        )),
    }
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

/// What woke a task connection's loop.
enum Wake {
    /// Frames queued, or a kick.
    Queue,
    Input(std::io::Result<usize>),
}

/// The loop of a TLS or WebSocket connection: runs until the device leaves or
/// must be closed; returns the last frame to send (ERROR or KICK) when the
/// server is the one closing.
async fn task_loop(
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

/// Most history pages replayed for one SUB (each up to 1000 messages).
const MAX_HISTORY_PAGES: usize = 10;

/// SUB: subscribe, replay what the device missed (when it sent an offset and
/// epoch), then SUB_OK with whether the history covered the gap; all of it
/// queued ahead of what arrived live meanwhile. The queue was held by the
/// caller and is released here.
async fn subscribe(room: Arc<Room>, handle: Arc<ConnHandle>, sub: Sub, seq: u32) {
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
    let mut since = sub.since_offset;
    let mut recovered = true;
    let mut position = (0, 0);
    let mut first_page = true;
    for _ in 0..MAX_HISTORY_PAGES {
        if handle.is_closed() {
            return Vec::new();
        }
        let history = match room
            .peers
            .history(&handle.app, &topic, since, sub.epoch)
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
                return frames;
            }
        };
        if std::mem::take(&mut first_page) {
            // The topic's ordering stage starts after this position, unless
            // it already knows where the topic is.
            crate::service::learn_position(
                room,
                &handle.app,
                &topic,
                history.offset,
                history.epoch,
            );
        }
        position = (history.offset, history.epoch);
        recovered = history.recovered;
        let page = history.messages.len();
        for message in history.messages {
            since = message.offset;
            let id = message.id;
            frames.push(Outbound::own(
                id,
                encode(Op::Push, 0, &broadcast_push(message)),
            ));
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
    frames.push(Outbound::own(0, encode(Op::SubOk, seq, &ok)));
    frames
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
        let silent: Vec<Arc<ConnHandle>> = room
            .conns
            .iter()
            .filter(|entry| {
                now.saturating_sub(entry.last_seen.load(Ordering::Relaxed)) > allowed_silence
            })
            .map(|entry| entry.value().clone())
            .collect();
        // Kicked outside the map's locks: a shard kick takes the queue's.
        for conn in silent {
            if conn.kick(KickCode::Heartbeat) {
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
