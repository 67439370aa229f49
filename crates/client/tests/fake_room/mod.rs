//! A tiny in-test room: enough of the device protocol to exercise the SDK
//! (the real room is a separate crate). Tokens: `"bad"` is refused with
//! AUTH_FAILED "token expired", `"busy"` with UNAVAILABLE; anything else passes.
//! UPSTREAM: product `"fail"` gets ERROR (UPSTREAM_FAILED) with the frame's seq,
//! product `"slow"` is answered after 300 ms, others at once.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushgrid_client::{Op, msg};
use pushgrid_wire::{Decoded, decode_frame, encode, encode_empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc, oneshot};

#[derive(Default)]
pub struct RoomState {
    /// Unacked messages, redelivered on every AUTH.
    pub inbox: BTreeMap<u64, Bytes>,
    /// Every acked id, in arrival order (re-acks included).
    pub acked: Vec<u64>,
    /// (seq, message) of every UPSTREAM frame.
    pub upstreams: Vec<(u32, msg::Upstream)>,
    pub auths: Vec<msg::Auth>,
    pub pings: u64,
    pub connections: u64,
    current: Option<mpsc::Sender<Out>>,
}

enum Out {
    Frame(Bytes),
    Close,
}

pub struct FakeRoom {
    pub addr: String,
    pub state: Arc<Mutex<RoomState>>,
    pub heartbeat_secs: u32,
}

impl FakeRoom {
    pub async fn start() -> FakeRoom {
        FakeRoom::start_with(&[], 30).await
    }

    /// A room whose inbox already holds `messages`.
    pub async fn start_with(messages: &[(u64, &str)], heartbeat_secs: u32) -> FakeRoom {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut state = RoomState::default();
        for (msg_id, payload) in messages {
            state
                .inbox
                .insert(*msg_id, Bytes::copy_from_slice(payload.as_bytes()));
        }
        let state = Arc::new(Mutex::new(state));
        let accept_state = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, accept_state.clone(), heartbeat_secs));
            }
        });
        FakeRoom {
            addr,
            state,
            heartbeat_secs,
        }
    }

    /// Stores a message and sends it on the current connection.
    pub async fn push(&self, msg_id: u64, payload: &str) {
        let mut state = self.state.lock().await;
        state
            .inbox
            .insert(msg_id, Bytes::copy_from_slice(payload.as_bytes()));
        if let Some(current) = &state.current {
            let _ = current.try_send(Out::Frame(push_frame(msg_id, payload.as_bytes())));
        }
    }

    /// Sends a PUSH without storing it (a redelivery after a lost ACK).
    pub async fn resend(&self, msg_id: u64, payload: &str) {
        let state = self.state.lock().await;
        if let Some(current) = &state.current {
            let _ = current.try_send(Out::Frame(push_frame(msg_id, payload.as_bytes())));
        }
    }

    /// Sends KICK on the current connection and closes it.
    pub async fn kick(&self, kick: msg::Kick) {
        let mut state = self.state.lock().await;
        if let Some(current) = state.current.take() {
            let _ = current.try_send(Out::Frame(encode(Op::Kick, 0, &kick)));
            let _ = current.try_send(Out::Close);
        }
    }

    /// Closes the current connection without a word (a room crash).
    pub async fn drop_connection(&self) {
        let mut state = self.state.lock().await;
        if let Some(current) = state.current.take() {
            let _ = current.try_send(Out::Close);
        }
    }

    /// Polls `check` on the state until it holds (5 s at most).
    pub async fn wait_until(&self, what: &str, check: impl Fn(&RoomState) -> bool) {
        for _ in 0..500 {
            if check(&*self.state.lock().await) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting until {what}");
    }
}

pub fn push_frame(msg_id: u64, payload: &[u8]) -> Bytes {
    let push = msg::Push {
        msg_id,
        payload: Bytes::copy_from_slice(payload),
        created_ms: 1,
        ..Default::default()
    };
    encode(Op::Push, 0, &push)
}

async fn serve(stream: TcpStream, state: Arc<Mutex<RoomState>>, heartbeat_secs: u32) {
    let (mut reader, mut writer) = stream.into_split();
    let (out_sender, mut out_receiver) = mpsc::channel::<Out>(1024);
    let (stop_sender, mut stop_receiver) = oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Some(out) = out_receiver.recv().await {
            match out {
                Out::Frame(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Out::Close => break,
            }
        }
        let _ = writer.shutdown().await;
        let _ = stop_sender.send(());
    });
    let mut buffer = BytesMut::new();
    let mut authenticated = false;
    loop {
        let frame = loop {
            match decode_frame(&mut buffer, 64 * 1024) {
                Ok(Decoded::Frame(frame)) => break Some(frame),
                Ok(Decoded::Incomplete { .. }) => {}
                Err(_) => break None,
            }
            tokio::select! {
                read = reader.read_buf(&mut buffer) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = &mut stop_receiver => return,
            }
        };
        let Some(frame) = frame else { return };
        match frame.op {
            Op::Auth if !authenticated => {
                let auth: msg::Auth = frame.decode().unwrap();
                let refusal = match auth.token.as_str() {
                    "bad" => Some((msg::ErrorCode::AuthFailed, "token expired")),
                    "busy" => Some((msg::ErrorCode::Unavailable, "register unavailable")),
                    _ => None,
                };
                let mut state = state.lock().await;
                state.auths.push(auth);
                if let Some((code, message)) = refusal {
                    let error = msg::Error {
                        code: code as i32,
                        message: message.into(),
                    };
                    let _ = out_sender.try_send(Out::Frame(encode(Op::Error, 0, &error)));
                    let _ = out_sender.try_send(Out::Close);
                    continue;
                }
                authenticated = true;
                state.connections += 1;
                let auth_ok = msg::AuthOk {
                    conn_id: state.connections,
                    heartbeat_secs,
                    server_time_ms: 1,
                };
                let _ = out_sender.try_send(Out::Frame(encode(Op::AuthOk, 0, &auth_ok)));
                for (msg_id, payload) in &state.inbox {
                    let _ = out_sender.try_send(Out::Frame(push_frame(*msg_id, payload)));
                }
                state.current = Some(out_sender.clone());
            }
            Op::Ping => {
                state.lock().await.pings += 1;
                let _ = out_sender.try_send(Out::Frame(encode_empty(Op::Pong, frame.seq)));
            }
            Op::Ack => {
                let ack: msg::Ack = frame.decode().unwrap();
                let mut state = state.lock().await;
                for msg_id in ack.msg_ids {
                    state.inbox.remove(&msg_id);
                    state.acked.push(msg_id);
                }
            }
            Op::Upstream => {
                let upstream: msg::Upstream = frame.decode().unwrap();
                state
                    .lock()
                    .await
                    .upstreams
                    .push((frame.seq, upstream.clone()));
                let answer = if upstream.product == "fail" {
                    let error = msg::Error {
                        code: msg::ErrorCode::UpstreamFailed as i32,
                        message: format!("no route for {}", upstream.product),
                    };
                    encode(Op::Error, frame.seq, &error)
                } else {
                    encode(
                        Op::UpstreamOk,
                        frame.seq,
                        &msg::UpstreamOk {
                            client_msg_id: upstream.client_msg_id.clone(),
                        },
                    )
                };
                if upstream.product == "slow" {
                    let out_sender = out_sender.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let _ = out_sender.send(Out::Frame(answer)).await;
                    });
                } else {
                    let _ = out_sender.try_send(Out::Frame(answer));
                }
            }
            _ => {
                let error = msg::Error {
                    code: msg::ErrorCode::AuthRequired as i32,
                    message: "auth first".into(),
                };
                let _ = out_sender.try_send(Out::Frame(encode(Op::Error, 0, &error)));
                let _ = out_sender.try_send(Out::Close);
            }
        }
    }
}
