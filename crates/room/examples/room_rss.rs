//! Memory per idle authenticated connection of one room process, and the
//! rate at which it authenticates new connections.
//!
//! Reads the room's `VmRSS` (from `/proc/<pid>/status`) with no connection
//! of ours, opens `--connections` device connections from `--sources`
//! loopback source addresses (127.0.0.2, 127.0.0.3, ...), each sending AUTH
//! and waiting for AUTH_OK (at most `--concurrency` handshakes in flight),
//! waits `--settle-secs`, reads `VmRSS` again and prints one JSON line:
//! connections, connect rate, RSS before and after, and bytes per connection,
//! both over all connections and over those after the first `--warmup`
//! (default 1000; the first ones also pay for what a room sets up once).
//! The connect rate is timed after the warm-up.
//!
//! ```text
//! target/release/pushgrid dev --data-dir /tmp/pgrss     # keeper's gRPC address on stdout
//! target/release/room --set keeper=<keeper> --set listen=127.0.0.1:0 \
//!     --set admin_listen=127.0.0.1:0 --set tcp_listen=127.0.0.1:18190 --set heartbeat_secs=600
//! target/release/examples/room_rss --addr 127.0.0.1:18190 --pid <room pid> \
//!     --connections 19000 --app demo --secret demo-secret
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use pushgrid_proto::client::Auth;
use pushgrid_wire::{Decoded, Op, decode_frame, encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

struct Options {
    addr: SocketAddr,
    pid: u32,
    connections: usize,
    sources: u8,
    concurrency: usize,
    app: String,
    secret: String,
    settle: Duration,
    user_prefix: String,
    warmup: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        addr: "127.0.0.1:8090".parse()?,
        pid: 0,
        connections: 19_000,
        sources: 4,
        concurrency: 256,
        app: "demo".into(),
        secret: "demo-secret".into(),
        settle: Duration::from_secs(5),
        user_prefix: format!("rss{:04x}-", rand::random::<u16>()),
        warmup: 1000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => options.addr = value.parse().context("--addr")?,
            "--pid" => options.pid = value.parse().context("--pid")?,
            "--connections" => options.connections = value.parse().context("--connections")?,
            "--sources" => options.sources = value.parse().context("--sources")?,
            "--concurrency" => options.concurrency = value.parse().context("--concurrency")?,
            "--app" => options.app = value,
            "--secret" => options.secret = value,
            "--settle-secs" => {
                options.settle = Duration::from_secs(value.parse().context("--settle-secs")?)
            }
            "--user-prefix" => options.user_prefix = value,
            "--warmup" => options.warmup = value.parse().context("--warmup")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if options.pid == 0 {
        bail!("--pid <room process id> is required");
    }
    if options.connections > 19_500 {
        bail!("at most 19,500 connections: this process may hold 20,000 files");
    }
    if options.sources == 0 || options.sources > 200 {
        bail!("--sources must be 1 to 200");
    }
    Ok(options)
}

/// `VmRSS` of `pid` in bytes.
fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kilobytes: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?;
    Ok(kilobytes * 1024)
}

/// Connects from `source`, sends AUTH and waits for AUTH_OK.
async fn connect_device(
    addr: SocketAddr,
    source: Ipv4Addr,
    token: String,
    device: String,
) -> anyhow::Result<TcpStream> {
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
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match decode_frame(&mut buf, 1 << 20)? {
            Decoded::Frame(frame) if frame.op == Op::AuthOk => return Ok(stream),
            Decoded::Frame(frame) => bail!("expected AUTH_OK, got {:?}", frame.op),
            Decoded::Incomplete { .. } => {}
        }
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf))
            .await
            .context("no AUTH_OK in 20 s")??;
        if read == 0 {
            bail!("closed before AUTH_OK");
        }
    }
}

/// Connects devices `range` (at most `concurrency` handshakes in flight);
/// returns the streams, the failures and the first error.
async fn connect_many(
    options: &Options,
    range: std::ops::Range<usize>,
) -> anyhow::Result<(Vec<TcpStream>, usize, Option<String>)> {
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(range.len());
    for index in range {
        let permit = permits.clone().acquire_owned().await?;
        let source = Ipv4Addr::new(127, 0, 0, 2 + (index % usize::from(options.sources)) as u8);
        let user = format!("{}{index}", options.user_prefix);
        let claims = pushgrid_common::jwt::Claims {
            sub: user.clone(),
            app: options.app.clone(),
            exp: pushgrid_common::now_ms() / 1000 + 3600,
            dev: String::new(),
        };
        let token = pushgrid_common::jwt::sign(&claims, &options.secret);
        let addr = options.addr;
        tasks.push(tokio::spawn(async move {
            let connected = connect_device(addr, source, token, format!("{user}-d")).await;
            drop(permit);
            connected
        }));
    }
    let mut streams = Vec::with_capacity(tasks.len());
    let mut failed = 0usize;
    let mut first_error = None;
    for task in tasks {
        match task.await? {
            Ok(stream) => streams.push(stream),
            Err(error) => {
                failed += 1;
                first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    Ok((streams, failed, first_error))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let baseline = rss_bytes(options.pid)?;
    // The first connections also pay for what the room sets up once (RPC
    // channels to register and saver, allocator arenas of its threads): the
    // slope after them is the cost of one more connection.
    let warmup = options.warmup.min(options.connections);
    let (mut streams, mut failed, mut first_error) = connect_many(&options, 0..warmup).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let warm = rss_bytes(options.pid)?;
    let started = Instant::now();
    let (more, more_failed, more_error) =
        connect_many(&options, warmup..options.connections).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let timed = more.len();
    streams.extend(more);
    failed += more_failed;
    first_error = first_error.or(more_error);
    tokio::time::sleep(options.settle).await;
    let loaded = rss_bytes(options.pid)?;
    let held = streams.len();
    let per_connection = loaded.saturating_sub(baseline) as f64 / held.max(1) as f64;
    let marginal = loaded.saturating_sub(warm) as f64 / timed.max(1) as f64;
    println!(
        "{}",
        serde_json::json!({
            "connections": held,
            "failed": failed,
            "first_error": first_error,
            "connect_secs": (connect_secs * 100.0).round() / 100.0,
            "connects_per_sec": (timed as f64 / connect_secs).round(),
            "rss_before_bytes": baseline,
            "rss_after_warmup_bytes": warm,
            "rss_after_bytes": loaded,
            "rss_per_connection_bytes": per_connection.round(),
            "rss_per_connection_after_warmup_bytes": marginal.round(),
        })
    );
    drop(streams);
    Ok(())
}
