//! Broadcast fan-out of one room: deliveries per second to many devices.
//!
//! Connects `--subscribers` authenticated devices (from `--sources` loopback
//! source addresses), then sends `--messages` broadcasts of `--payload`
//! bytes to the app-wide topic `all` through the room's `Broadcast` RPC (the
//! call center makes for each room), at most `--in-flight` calls at once. Every
//! device counts the PUSH frames it reads; the run ends when every device
//! has every message (or after `--timeout-secs`). Prints one JSON line:
//! deliveries expected and counted, seconds from the first call to the last
//! delivery, and deliveries per second. The calls carry the center key of
//! the cluster's credentials directory (`--credentials`), as center's do.
//!
//! ```text
//! target/release/examples/room_fanout --addr 127.0.0.1:18190 --grpc <room grpc> \
//!     --credentials pushgrid-data/credentials \
//!     --subscribers 5000 --messages 200 --payload 64 --app demo --secret demo-secret
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::{Buf, BytesMut};
use pushgrid_proto::client::Auth;
use pushgrid_proto::cluster::room_client::RoomClient;
use pushgrid_proto::cluster::{BroadcastMessage, RoomBroadcastRequest};
use pushgrid_wire::{Decoded, HEADER_LEN, Op, decode_frame, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

struct Options {
    addr: SocketAddr,
    grpc: String,
    credentials: String,
    subscribers: usize,
    messages: u64,
    payload: usize,
    in_flight: usize,
    sources: u8,
    app: String,
    secret: String,
    timeout: Duration,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        addr: "127.0.0.1:8090".parse()?,
        grpc: String::new(),
        credentials: String::new(),
        subscribers: 5000,
        messages: 200,
        payload: 64,
        in_flight: 4,
        sources: 4,
        app: "demo".into(),
        secret: "demo-secret".into(),
        timeout: Duration::from_secs(120),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => options.addr = value.parse().context("--addr")?,
            "--grpc" => options.grpc = value,
            "--credentials" => options.credentials = value,
            "--subscribers" => options.subscribers = value.parse().context("--subscribers")?,
            "--messages" => options.messages = value.parse().context("--messages")?,
            "--payload" => options.payload = value.parse().context("--payload")?,
            "--in-flight" => options.in_flight = value.parse().context("--in-flight")?,
            "--sources" => options.sources = value.parse().context("--sources")?,
            "--app" => options.app = value,
            "--secret" => options.secret = value,
            "--timeout-secs" => {
                options.timeout = Duration::from_secs(value.parse().context("--timeout-secs")?)
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if options.grpc.is_empty() {
        bail!("--grpc <room gRPC address> is required");
    }
    if options.subscribers > 19_000 || options.messages > 100_000 {
        bail!("at most 19,000 subscribers and 100,000 messages");
    }
    if options.sources == 0 || options.sources > 200 {
        bail!("--sources must be 1 to 200");
    }
    Ok(options)
}

async fn connect_device(
    addr: SocketAddr,
    source: Ipv4Addr,
    token: String,
    device: String,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let mut stream = tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .context("connect timed out")??;
    let auth = Auth {
        token,
        device_id: device,
        platform: "bench".into(),
    };
    stream.write_all(&encode(Op::Auth, 1, &auth)).await?;
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match decode_frame(&mut buf, 1 << 20)? {
            Decoded::Frame(frame) if frame.op == Op::AuthOk => return Ok((stream, buf)),
            Decoded::Frame(frame) => bail!("expected AUTH_OK, got {:?}", frame.op),
            Decoded::Incomplete { .. } => {}
        }
        if stream.read_buf(&mut buf).await? == 0 {
            bail!("closed before AUTH_OK");
        }
    }
}

/// Counts PUSH frames by their headers alone until `expected` arrived.
async fn count_pushes(
    mut stream: TcpStream,
    mut buf: BytesMut,
    expected: u64,
    counted: Arc<AtomicU64>,
    done: Arc<AtomicU64>,
) {
    let mut mine = 0u64;
    buf.reserve(64 * 1024);
    while mine < expected {
        while buf.len() >= HEADER_LEN {
            let body_len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < HEADER_LEN + body_len {
                break;
            }
            if buf[5] == Op::Push as u8 {
                mine += 1;
                counted.fetch_add(1, Ordering::Relaxed);
            }
            buf.advance(HEADER_LEN + body_len);
        }
        if mine >= expected {
            break;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    done.fetch_add(1, Ordering::Relaxed);
    // Keep the connection until the run ends.
    let _ = stream.read_u8().await;
}

/// Connects and authenticates every subscriber (at most 256 connecting at
/// once, spread over the source addresses), each then counting its pushes
/// in a task: the number of devices, the pushes counted, the devices done.
async fn subscribe_all(options: &Options) -> anyhow::Result<(u64, Arc<AtomicU64>, Arc<AtomicU64>)> {
    let permits = Arc::new(Semaphore::new(256));
    let mut connecting = Vec::with_capacity(options.subscribers);
    for index in 0..options.subscribers {
        let permit = permits.clone().acquire_owned().await?;
        let source = Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(options.sources)) as u8);
        let user = format!("fan{:04x}-{index}", std::process::id() & 0xffff);
        let claims = pushgrid_common::jwt::Claims {
            sub: user.clone(),
            app: options.app.clone(),
            exp: pushgrid_common::now_ms() / 1000 + 3600,
            dev: String::new(),
        };
        let token = pushgrid_common::jwt::sign(&claims, &options.secret);
        let addr = options.addr;
        connecting.push(tokio::spawn(async move {
            let connected = connect_device(addr, source, token, format!("{user}-d")).await;
            drop(permit);
            connected
        }));
    }
    let counted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut devices = 0u64;
    for task in connecting {
        let (stream, buf) = task.await??;
        devices += 1;
        tokio::spawn(count_pushes(
            stream,
            buf,
            options.messages,
            counted.clone(),
            done.clone(),
        ));
    }
    Ok((devices, counted, done))
}

/// Sends the broadcasts to the room over gRPC as center would, at most
/// `in_flight` at once: when the first was sent, and how many connections
/// the room handed them to.
async fn broadcast_all(options: &Options) -> anyhow::Result<(Instant, u64)> {
    let credentials = pushgrid_common::auth::Credentials::for_node(
        pushgrid_proto::cluster::Role::Center,
        &options.credentials,
    )
    .context("--credentials <the cluster's credentials directory>")?;
    let channel = credentials.attach(
        tonic::transport::Endpoint::from_shared(format!("http://{}", options.grpc))?
            .connect()
            .await
            .context("connect to the room's gRPC port")?,
    );
    let client = RoomClient::new(channel);
    let payload = vec![b'x'; options.payload];
    let calls = Arc::new(Semaphore::new(options.in_flight.max(1)));
    let started = Instant::now();
    let mut sent = Vec::with_capacity(options.messages as usize);
    for offset in 1..=options.messages {
        let permit = calls.clone().acquire_owned().await?;
        let mut client = client.clone();
        let message = BroadcastMessage {
            id: (u64::from(std::process::id()) << 32) | offset,
            app: options.app.clone(),
            topic: "all".into(),
            offset,
            epoch: 1,
            payload: payload.clone().into(),
            created_ms: pushgrid_common::now_ms(),
        };
        sent.push(tokio::spawn(async move {
            let answer = client
                .broadcast(RoomBroadcastRequest {
                    message: Some(message),
                })
                .await;
            drop(permit);
            answer.map(|answer| answer.into_inner().delivered)
        }));
    }
    let mut handed = 0u64;
    for call in sent {
        handed += u64::from(call.await??);
    }
    Ok((started, handed))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let (devices, counted, done) = subscribe_all(&options).await?;
    let (started, handed) = broadcast_all(&options).await?;
    let expected = devices * options.messages;
    let deadline = started + options.timeout;
    while done.load(Ordering::Relaxed) < devices && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = counted.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "subscribers": devices,
            "messages": options.messages,
            "payload_bytes": options.payload,
            "expected_deliveries": expected,
            "handed_to_connections": handed,
            "deliveries": delivered,
            "seconds": (elapsed * 1000.0).round() / 1000.0,
            "deliveries_per_sec": (delivered as f64 / elapsed).round(),
        })
    );
    Ok(())
}
