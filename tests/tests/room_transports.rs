//! The room's other transports: WebSocket (frames in binary messages), TLS
//! and WebSocket over TLS with a certificate and key from files. Each device
//! authenticates and receives a push sent through the push API; the
//! dispatcher hands out the extra addresses.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use pushgrid_client::msg;
use pushgrid_e2e::{ClusterOptions, Proc, TestCert, TestCluster, spawn, test_cert, wait_for};
use pushgrid_wire::{Decoded, Frame, Op, decode_frame, encode, encode_empty};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

async fn start_room(cluster: &TestCluster, name: &str, sets: &[String]) -> anyhow::Result<Proc> {
    let mut args = cluster.node_args();
    for setting in sets {
        args.push("--set".into());
        args.push(setting.clone());
    }
    spawn(&cluster.dir, name, "room", &args).await
}

fn connector(cert: &TestCert) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(cert.der.clone())).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

fn auth_frame(cluster: &TestCluster, user: &str) -> Bytes {
    encode(
        Op::Auth,
        1,
        &msg::Auth {
            token: cluster.app.token(user),
            device_id: format!("{user}-d"),
            platform: "test".into(),
        },
    )
}

/// The frame protocol over any byte stream (TLS here).
async fn next_stream_frame<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut) -> Frame {
    loop {
        if let Decoded::Frame(frame) = decode_frame(buf, 1 << 20).unwrap() {
            return frame;
        }
        let read = tokio::time::timeout(WAIT, stream.read_buf(buf))
            .await
            .expect("a frame in time")
            .unwrap();
        assert!(read > 0, "closed while waiting for a frame");
    }
}

async fn stream_device_gets_a_push<S: AsyncRead + AsyncWrite + Unpin>(
    cluster: &TestCluster,
    mut stream: S,
    user: &str,
) {
    stream.write_all(&auth_frame(cluster, user)).await.unwrap();
    let mut buf = BytesMut::new();
    let auth_ok = next_stream_frame(&mut stream, &mut buf).await;
    assert_eq!(auth_ok.op, Op::AuthOk, "{auth_ok:?}");
    let ids = cluster.push(&[user], &format!("to {user}")).await.unwrap();
    let push = next_stream_frame(&mut stream, &mut buf).await;
    assert_eq!(push.op, Op::Push);
    let push: msg::Push = push.decode().unwrap();
    assert_eq!(push.msg_id, ids[0]);
    assert_eq!(push.payload, format!("to {user}").as_bytes());
    stream.write_all(&encode_empty(Op::Ping, 9)).await.unwrap();
    let pong = next_stream_frame(&mut stream, &mut buf).await;
    assert_eq!((pong.op, pong.seq), (Op::Pong, 9));
}

/// Frames from binary WebSocket messages (a message may hold several).
struct WsFrames<S> {
    ws: tokio_tungstenite::WebSocketStream<S>,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsFrames<S> {
    async fn send(&mut self, bytes: Bytes) {
        self.ws.send(Message::Binary(bytes)).await.unwrap();
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Decoded::Frame(frame) = decode_frame(&mut self.buf, 1 << 20).unwrap() {
                return frame;
            }
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("the stream is open")
                .unwrap();
            match message {
                Message::Binary(data) => self.buf.extend_from_slice(&data),
                Message::Close(close) => panic!("closed: {close:?}"),
                _ => {}
            }
        }
    }
}

async fn ws_device_gets_a_push<S: AsyncRead + AsyncWrite + Unpin>(
    cluster: &TestCluster,
    stream: S,
    url: &str,
    user: &str,
) {
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    let mut device = WsFrames {
        ws,
        buf: BytesMut::new(),
    };
    device.send(auth_frame(cluster, user)).await;
    assert_eq!(device.next().await.op, Op::AuthOk);
    let ids = cluster.push(&[user], &format!("to {user}")).await.unwrap();
    let push: msg::Push = device.next().await.decode().unwrap();
    assert_eq!(push.msg_id, ids[0]);
    assert_eq!(push.payload, format!("to {user}").as_bytes());
    // Two frames in one binary message, and one frame split over two.
    let mut two = BytesMut::new();
    two.extend_from_slice(&encode_empty(Op::Ping, 1));
    two.extend_from_slice(&encode_empty(Op::Ping, 2));
    device.send(two.freeze()).await;
    let ping = encode_empty(Op::Ping, 3);
    device.send(ping.slice(..5)).await;
    device.send(ping.slice(5..)).await;
    for seq in 1..=3 {
        let pong = device.next().await;
        assert_eq!((pong.op, pong.seq), (Op::Pong, seq));
    }
    // A text message is not a frame: ERROR, then the close.
    device.ws.send(Message::text("hello")).await.unwrap();
    let mut closed = false;
    for _ in 0..4 {
        match tokio::time::timeout(WAIT, device.ws.next()).await.unwrap() {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => {
                closed = true;
                break;
            }
            Some(Ok(_)) => {}
        }
    }
    assert!(closed, "a text message closes the WebSocket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tls_and_wss_devices_each_receive_a_push() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let cert = test_cert(&cluster.dir);
    let room = start_room(
        &cluster,
        "room-tls",
        &[
            "node_id=room-tls".into(),
            "tcp_listen=127.0.0.1:0".into(),
            "ws_listen=127.0.0.1:0".into(),
            "tls_listen=127.0.0.1:0".into(),
            "wss_listen=127.0.0.1:0".into(),
            format!("tls_cert_file={}", cert.cert_file),
            format!("tls_key_file={}", cert.key_file),
        ],
    )
    .await
    .unwrap();

    // WebSocket.
    let ws_addr = room.addr("ws");
    let tcp = TcpStream::connect(ws_addr).await.unwrap();
    ws_device_gets_a_push(&cluster, tcp, &format!("ws://{ws_addr}/"), "ws-user").await;

    // TLS: the TCP protocol inside TLS, checked against the test certificate.
    let tcp = TcpStream::connect(room.addr("tls")).await.unwrap();
    let server = ServerName::try_from("localhost").unwrap();
    let tls = connector(&cert).connect(server.clone(), tcp).await.unwrap();
    stream_device_gets_a_push(&cluster, tls, "tls-user").await;

    // WebSocket over TLS.
    let wss_addr = room.addr("wss");
    let tcp = TcpStream::connect(wss_addr).await.unwrap();
    let tls = connector(&cert).connect(server, tcp).await.unwrap();
    ws_device_gets_a_push(
        &cluster,
        tls,
        &format!("wss://localhost:{}/", wss_addr.port()),
        "wss-user",
    )
    .await;

    // A TLS client that does not trust the certificate gets no session.
    let tcp = TcpStream::connect(room.addr("tls")).await.unwrap();
    let stranger_dir = cluster.dir.join("stranger");
    std::fs::create_dir_all(&stranger_dir).unwrap();
    let stranger = test_cert(&stranger_dir);
    let refused = connector(&stranger)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await;
    assert!(refused.is_err(), "an untrusted certificate was accepted");

    // The dispatcher hands out the room's WebSocket and TLS addresses.
    let listed = wait_for(Duration::from_secs(10), || async {
        let answer: serde_json::Value = cluster
            .http
            .get(format!("{}/v1/dispatch?user=u1", cluster.dispatcher_url()))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        answer["result"]["rooms"]
            .as_array()?
            .iter()
            .find(|room| room["node"] == "room-tls")
            .cloned()
    })
    .await;
    let listed = listed.expect("the dispatcher lists the TLS room");
    assert_eq!(listed["ws"], ws_addr.to_string());
    assert_eq!(listed["tls"], room.addr("tls").to_string());
    assert_eq!(listed["wss"], wss_addr.to_string());
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_listener_without_a_certificate_is_a_startup_error() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let started = start_room(
        &cluster,
        "room-nocert",
        &[
            "tcp_listen=127.0.0.1:0".into(),
            "tls_listen=127.0.0.1:0".into(),
            format!(
                "tls_cert_file={}",
                cluster.dir.join("missing.pem").display()
            ),
            "tls_key_file=/nonexistent/key.pem".into(),
        ],
    )
    .await;
    let error = started.err().expect("the room must not start").to_string();
    assert!(error.contains("tls_cert_file"), "{error}");
    cluster.cleanup().await;
}
