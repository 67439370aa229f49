//! Opening a device connection: refusals at accept, the transport's
//! handshake, the AUTH frame and its checks, the session's registration and
//! AUTH_OK.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use pushgrid_common::{jwt, now_ms};
use pushgrid_proto::client::{Auth, AuthOk, ErrorCode, KickCode};
use pushgrid_proto::cluster::StateEvent;
use pushgrid_wire::{Op, encode};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::inbox::replay_inbox;
use super::{LINGER, Opened, ReadError, error_frame, finish, read_frame, room_clock, session_of};
use crate::admission::Refusal;
use crate::outbox::Writer;
use crate::transport::{DeviceStream, Transport, shrink};
use crate::{ConnHandle, Room, metrics};

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
pub(crate) async fn refuse_at_accept(
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

/// The transport's handshake and AUTH under the pre-auth deadline, then the
/// session's registration and AUTH_OK; the inbox replay starts beside it.
/// `None` when the connection ended (answered and closed where there was
/// something to say).
pub(crate) async fn open(
    room: &Arc<Room>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
) -> Option<Opened> {
    let limits = room.admission.limits();
    let deadline = Instant::now() + limits.auth_timeout;
    let max_message = limits.max_body as usize + pushgrid_wire::HEADER_LEN;
    let mut stream = handshake(room, tcp, peer, transport, deadline, max_message).await?;
    let mut buf = BytesMut::new();
    let read = read_auth(
        &mut stream,
        &mut buf,
        peer,
        deadline,
        limits.pre_auth_max_body,
    )
    .await;
    let (auth, seq) = match read {
        Ok(read) => read,
        Err(last) => return close_unopened(stream, last).await,
    };
    let identity = match identify(room, &auth, seq, peer) {
        Ok(identity) => identity,
        Err(last) => return close_unopened(stream, Some(last)).await,
    };
    let handle = match register(room, identity, &auth, transport).await {
        Ok(handle) => handle,
        Err(last) => return close_unopened(stream, Some(last)).await,
    };

    let auth_ok = AuthOk {
        conn_id: handle.id,
        heartbeat_secs: room.config.heartbeat_secs,
        server_time_ms: now_ms(),
    };
    if stream
        .write_frames(&[encode(Op::AuthOk, seq, &auth_ok)])
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

/// Ends a connection that did not open: sends `last` (an ERROR) when there
/// is something to say and closes politely, or just drops the socket.
async fn close_unopened(stream: DeviceStream, last: Option<Bytes>) -> Option<Opened> {
    if let Some(last) = last {
        Box::pin(stream.close_politely(vec![last], LINGER)).await;
    }
    None
}

/// The transport's handshake before `deadline`. A plain TCP connection has
/// none; the others' (several KB of TLS and WebSocket state) is boxed apart
/// so a TCP connection never allocates it. `None` when it failed (counted
/// and logged).
async fn handshake(
    room: &Room,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    deadline: Instant,
    max_message: usize,
) -> Option<DeviceStream> {
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
    match handshake {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            metrics::auth("handshake_failed");
            log_refused_before_auth(
                peer,
                "handshake_failed",
                &format!("{} handshake: {error}", transport.as_str()),
            );
            None
        }
        Err(_) => {
            metrics::auth("timeout");
            metrics::refused("auth_timeout");
            log_refused_before_auth(peer, "auth_timeout", "no handshake within the deadline");
            None
        }
    }
}

/// The first frame, which must be a well-formed AUTH before `deadline`: its
/// body and seq. Otherwise (counted and logged) the ERROR to close with, or
/// `None` when the device already left.
async fn read_auth(
    stream: &mut DeviceStream,
    buf: &mut BytesMut,
    peer: SocketAddr,
    deadline: Instant,
    pre_auth_max_body: u32,
) -> Result<(Auth, u32), Option<Bytes>> {
    let first = tokio::time::timeout_at(deadline, read_frame(stream, buf, pre_auth_max_body)).await;
    let refuse = |result: &'static str, reason: &'static str, message: &str| {
        metrics::auth(result);
        metrics::refused(reason);
        log_refused_before_auth(peer, reason, message);
    };
    let frame = match first {
        Err(_) => {
            refuse("timeout", "auth_timeout", "no AUTH within the deadline");
            let error = error_frame(ErrorCode::AuthTimeout, "no AUTH within the deadline", 0);
            return Err(Some(error));
        }
        Ok(Err(ReadError::Closed)) => return Err(None),
        Ok(Err(ReadError::Frame(error))) => {
            refuse("bad_frame", "bad_frame", &error.to_string());
            return Err(Some(error_frame(error.code(), error.to_string(), 0)));
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
        return Err(Some(error));
    }
    match frame.decode() {
        Ok(auth) => Ok((auth, frame.seq)),
        Err(error) => {
            refuse("bad_frame", "bad_body", &error.to_string());
            Err(Some(error_frame(
                error.code(),
                error.to_string(),
                frame.seq,
            )))
        }
    }
}

/// [`authenticate`], counting and logging a refusal: the identity, or the
/// ERROR (AUTH_FAILED, answering `seq`) to close with.
fn identify(room: &Room, auth: &Auth, seq: u32, peer: SocketAddr) -> Result<Identity, Bytes> {
    authenticate(room, auth).map_err(|reason| {
        metrics::auth("failed");
        metrics::refused("auth_failed");
        static AUTH_REFUSALS: pushgrid_common::auth::RefusalLog =
            pushgrid_common::auth::RefusalLog::new(20);
        if let Some(unlogged_before) = AUTH_REFUSALS.admit() {
            tracing::info!(%peer, %reason, unlogged_before, "device auth refused");
        }
        error_frame(ErrorCode::AuthFailed, reason, seq)
    })
}

/// Registers the session; the device is routable from here on. Its queue
/// starts held: what arrives live waits behind the inbox replay. Otherwise
/// (the session registry could not take it) the ERROR to close with.
async fn register(
    room: &Arc<Room>,
    identity: Identity,
    auth: &Auth,
    transport: Transport,
) -> Result<Arc<ConnHandle>, Bytes> {
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
        return Err(error);
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
    Ok(handle)
}
