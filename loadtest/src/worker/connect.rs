//! One device's connection: a TCP connect from the worker's source address
//! (a fixed source port per device, a small receive window for slow ones),
//! then AUTH and, when the run has a topic, SUB, under --auth-timeout-ms.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pushgrid_wire::{Op, encode, msg};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::device::on_push;
use super::{MAX_BODY, Shared, is_slow};
use crate::frames::unix_us;

/// Source port of device 0 on its first connect (device i: this + i).
const FIRST_SOURCE_PORT: u16 = 20_000;

/// TCP connect from the worker's source address, AUTH, and SUB when a topic
/// is set. The connection and the bytes read past the handshake's frames.
pub(super) async fn establish(shared: &Shared, index: u32) -> Result<(TcpStream, Vec<u8>), String> {
    let mut stream = open(shared, index).await?;
    let mut carry = Vec::new();
    let auth_timeout = Duration::from_millis(shared.spec.auth_timeout_ms);
    let handshake = async {
        authenticate(shared, index, &mut stream, &mut carry).await?;
        if !shared.spec.topic.is_empty() {
            subscribe(shared, index, &mut stream, &mut carry).await?;
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(auth_timeout, handshake).await {
        Ok(Ok(())) => Ok((stream, carry)),
        Ok(Err(reason)) => Err(reason),
        Err(_) => Err("auth: timeout".to_owned()),
    }
}

/// The TCP connection of device `index`, closed with a reset when dropped.
async fn open(shared: &Shared, index: u32) -> Result<TcpStream, String> {
    // An explicit port per device, on reconnects too: bind(port 0) scans the
    // ports in use on the address, which grows quadratic over 18,000 sockets
    // (a reconnect storm of 17,000 devices spent minutes of system CPU in it).
    // Our side closes with a reset, so the device's port is free again.
    let port = (index < 30_000)
        .then(|| FIRST_SOURCE_PORT.checked_add(index as u16))
        .flatten();
    // A slow device is a phone on a bad network: a small receive window, so
    // what it does not read backs up into the room's queue, not the kernel's.
    let rcvbuf = is_slow(&shared.spec, index).then_some(SLOW_RCVBUF);
    let stream = match connect_from(shared, port, rcvbuf).await {
        // The fixed port's 4-tuple is still taken (TIME_WAIT of an earlier run
        // against the same room): let the kernel pick a port instead.
        Err(error) if port.is_some() && matches!(error.raw_os_error(), Some(98 | 99)) => {
            connect_from(shared, None, rcvbuf).await
        }
        other => other,
    }
    .map_err(|error| match error.kind() {
        std::io::ErrorKind::TimedOut => "connect: timeout".to_owned(),
        _ => io_reason("connect", &error),
    })?;
    // Close with a reset: a run that ends leaves no TIME_WAIT behind, so the
    // next run (or the next scenario of `loadtest million`) gets the same ports.
    let _ = stream.set_zero_linger();
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Sends AUTH with a token for the device's user and reads the answer.
async fn authenticate(
    shared: &Shared,
    index: u32,
    stream: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> Result<(), String> {
    let spec = &shared.spec;
    let user = format!("{}{}", spec.user_prefix, spec.first_user + u64::from(index));
    let token = pushgrid_common::jwt::sign(
        &pushgrid_common::jwt::Claims {
            sub: user,
            app: spec.app.clone(),
            exp: unix_us() / 1_000_000 + 7 * 24 * 3600,
            dev: String::new(),
        },
        &spec.jwt_secret,
    );
    let auth = encode(
        Op::Auth,
        0,
        &msg::Auth {
            token,
            device_id: "lt".into(),
            platform: "loadtest".into(),
        },
    );
    stream
        .write_all(&auth)
        .await
        .map_err(|error| io_reason("auth write", &error))?;
    let (op, body) = read_frame(stream, carry, "auth").await?;
    match op {
        Op::AuthOk => {
            let ok: msg::AuthOk =
                prost::Message::decode(&body[..]).map_err(|_| "auth: bad AUTH_OK".to_owned())?;
            if ok.heartbeat_secs > 0 {
                shared
                    .counters
                    .heartbeat_secs
                    .store(ok.heartbeat_secs, Ordering::Relaxed);
            }
            Ok(())
        }
        Op::Error => {
            let error: msg::Error = prost::Message::decode(&body[..]).unwrap_or_default();
            Err(format!("auth refused: {}", error.code().as_str_name()))
        }
        Op::Kick => {
            let kick: msg::Kick = prost::Message::decode(&body[..]).unwrap_or_default();
            Err(format!("kicked during auth: {}", kick.code().as_str_name()))
        }
        other => Err(format!("auth: unexpected {other:?}")),
    }
}

/// Sends SUB for the run's topic, from the device's position after a
/// reconnect (as the SDK does: the room replays what it missed), and reads
/// until SUB_OK (recording the pushes that come first, the replay among
/// them). A SUB_OK that says the missed messages are gone counts as a gap
/// told to the device.
async fn subscribe(
    shared: &Shared,
    index: u32,
    stream: &mut TcpStream,
    carry: &mut Vec<u8>,
) -> Result<(), String> {
    let position = shared
        .records()
        .positions
        .get(index as usize)
        .copied()
        .flatten();
    let (epoch, since_offset) = position.unwrap_or((0, 0));
    let sub = encode(
        Op::Sub,
        1,
        &msg::Sub {
            topic: shared.spec.topic.clone(),
            since_offset,
            epoch,
        },
    );
    stream
        .write_all(&sub)
        .await
        .map_err(|error| io_reason("sub write", &error))?;
    loop {
        let (op, body) = read_frame(stream, carry, "sub").await?;
        match op {
            Op::SubOk => {
                let ok: msg::SubOk = prost::Message::decode(&body[..]).unwrap_or_default();
                shared.counters.subscribed.fetch_add(1, Ordering::Relaxed);
                let mut records = shared.records();
                if position.is_some()
                    && !ok.recovered
                    && let Some(gaps) = records.gaps.get_mut(index as usize)
                {
                    *gaps += 1;
                }
                if let Some(slot) = records.positions.get_mut(index as usize) {
                    // The replay before SUB_OK moved the position already;
                    // a new epoch, or a first SUB, starts at the stream's head.
                    match *slot {
                        Some((epoch, _)) if epoch == ok.epoch => {}
                        _ => *slot = Some((ok.epoch, ok.offset)),
                    }
                }
                return Ok(());
            }
            Op::Error => {
                let error: msg::Error = prost::Message::decode(&body[..]).unwrap_or_default();
                return Err(format!("sub refused: {}", error.code().as_str_name()));
            }
            // Unicast pushes may arrive before SUB_OK (an inbox replay).
            Op::Push => {
                if let Ok(push) = prost::Message::decode(&body[..]) {
                    let ack = on_push(shared, index, push, false);
                    if let Some(ack) = ack {
                        let _ = stream.write_all(&ack).await;
                    }
                }
            }
            _ => {}
        }
    }
}

/// Receive buffer of a slow device's socket (the kernel doubles it).
const SLOW_RCVBUF: u32 = 4096;

/// TCP connect from the worker's source address, from `port` or any port.
async fn connect_from(
    shared: &Shared,
    port: Option<u16>,
    rcvbuf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    let _ = socket.set_reuseaddr(true);
    if let Some(size) = rcvbuf {
        // Before connect, so the window offered in the SYN is already small.
        socket.set_recv_buffer_size(size)?;
    }
    let bound = match port {
        Some(port) => socket.bind(SocketAddr::new(shared.source, port)).is_ok(),
        None => false,
    };
    if !bound {
        socket.bind(SocketAddr::new(shared.source, 0))?;
    }
    let limit = Duration::from_millis(shared.spec.connect_timeout_ms);
    match tokio::time::timeout(limit, socket.connect(shared.room)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// Reads one frame during the handshake (extra frames stay in `carry`).
async fn read_frame(
    stream: &mut TcpStream,
    carry: &mut Vec<u8>,
    stage: &str,
) -> Result<(Op, Vec<u8>), String> {
    use tokio::io::AsyncReadExt;
    loop {
        if carry.len() >= pushgrid_wire::HEADER_LEN {
            let header = pushgrid_wire::parse_header(carry, MAX_BODY)
                .map_err(|error| format!("{stage}: {error}"))?;
            let frame_len = pushgrid_wire::HEADER_LEN + header.body_len as usize;
            if carry.len() >= frame_len {
                let body = carry[pushgrid_wire::HEADER_LEN..frame_len].to_vec();
                carry.drain(..frame_len);
                if carry.is_empty() {
                    *carry = Vec::new();
                }
                return Ok((header.op, body));
            }
        }
        let mut buf = [0u8; 1024];
        let read = stream
            .read(&mut buf)
            .await
            .map_err(|error| io_reason(stage, &error))?;
        if read == 0 {
            return Err(format!("{stage}: closed by server"));
        }
        carry.extend_from_slice(&buf[..read]);
    }
}

pub(super) fn io_reason(stage: &str, error: &std::io::Error) -> String {
    let name = match error.raw_os_error() {
        Some(24) => "EMFILE (process out of file descriptors)".to_owned(),
        Some(23) => "ENFILE (system out of file descriptors)".to_owned(),
        Some(99) => "EADDRNOTAVAIL (no free source port)".to_owned(),
        Some(98) => "EADDRINUSE".to_owned(),
        Some(111) => "ECONNREFUSED".to_owned(),
        Some(104) => "ECONNRESET".to_owned(),
        Some(110) => "ETIMEDOUT".to_owned(),
        Some(code) => format!("errno {code} ({:?})", error.kind()),
        None => format!("{:?}", error.kind()),
    };
    format!("{stage}: {name}")
}
