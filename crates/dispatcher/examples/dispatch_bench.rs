//! A closed-loop load generator for `GET /v1/dispatch`: `--connections`
//! keep-alive HTTP/1.1 connections, each sending its next request when the
//! last answer is read, for `--duration-secs` or `--max-requests`, whichever
//! ends first. Users cycle through `--users` ids so the consistent hash sees
//! many keys. Prints requests per second and latency percentiles (from the
//! write of a request to the last byte of its answer) as one JSON line.
//!
//! The client is a minimal hand-written HTTP/1.1 reader so that, on a small
//! machine shared with the server, the generator costs as little CPU as it can.
//!
//! ```text
//! cargo run --release -p pushgrid-dispatcher --example dispatch_bench -- \
//!     --addr 127.0.0.1:18071 --connections 64 --duration-secs 10 --query '&net=wifi'
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::Instant;

struct Options {
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    max_requests: u64,
    users: u64,
    query: String,
    threads: usize,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        addr: "127.0.0.1:8070".parse()?,
        connections: 64,
        duration: Duration::from_secs(10),
        max_requests: u64::MAX,
        users: 100_000,
        query: String::new(),
        threads: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => options.addr = value.parse().context("--addr")?,
            "--connections" => options.connections = value.parse().context("--connections")?,
            "--duration-secs" => {
                options.duration =
                    Duration::from_secs_f64(value.parse().context("--duration-secs")?)
            }
            "--max-requests" => options.max_requests = value.parse().context("--max-requests")?,
            "--users" => options.users = value.parse().context("--users")?,
            "--query" => options.query = value,
            "--threads" => options.threads = value.parse().context("--threads")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if !options.addr.ip().is_loopback() {
        bail!("--addr must be a loopback address: this tool only loads local servers");
    }
    Ok(options)
}

#[derive(Default)]
struct ConnectionResult {
    latencies_us: Vec<u32>,
    ok: u64,
    non_200: u64,
    bytes: u64,
}

async fn run_connection(
    index: usize,
    options: Arc<Options>,
    issued: Arc<AtomicU64>,
    deadline: Instant,
) -> anyhow::Result<ConnectionResult> {
    let stream = TcpStream::connect(options.addr).await?;
    stream.set_nodelay(true)?;
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(16 * 1024, read_half);
    let mut result = ConnectionResult::default();
    let mut line = String::new();
    let mut body = Vec::new();
    let mut user = index as u64;
    while Instant::now() < deadline {
        if issued.fetch_add(1, Ordering::Relaxed) >= options.max_requests {
            break;
        }
        user = (user + 7_919) % options.users.max(1);
        let request = format!(
            "GET /v1/dispatch?user=u{user}{} HTTP/1.1\r\nHost: bench\r\n\r\n",
            options.query
        );
        let started = Instant::now();
        write_half.write_all(request.as_bytes()).await?;
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the server closed the connection");
        }
        let status = line.split_whitespace().nth(1).unwrap_or("");
        let is_ok = status == "200";
        let mut content_length = 0usize;
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                bail!("the server closed the connection mid-answer");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().context("content-length")?;
            }
        }
        body.resize(content_length, 0);
        reader.read_exact(&mut body).await?;
        let elapsed = started.elapsed();
        result
            .latencies_us
            .push(u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX));
        result.bytes += content_length as u64;
        if is_ok {
            result.ok += 1;
        } else {
            result.non_200 += 1;
        }
    }
    Ok(result)
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    f64::from(sorted[rank - 1]) / 1000.0
}

fn main() -> anyhow::Result<()> {
    let options = Arc::new(parse_options()?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let issued = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + options.duration;
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..options.connections.max(1) {
            tasks.spawn(run_connection(
                index,
                options.clone(),
                issued.clone(),
                deadline,
            ));
        }
        let mut latencies = Vec::new();
        let (mut ok, mut non_200, mut bytes, mut failed_connections) = (0u64, 0u64, 0u64, 0u64);
        while let Some(joined) = tasks.join_next().await {
            match joined? {
                Ok(result) => {
                    latencies.extend(result.latencies_us);
                    ok += result.ok;
                    non_200 += result.non_200;
                    bytes += result.bytes;
                }
                Err(error) => {
                    failed_connections += 1;
                    eprintln!("connection failed: {error:#}");
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        latencies.sort_unstable();
        let requests = latencies.len() as f64;
        let report = serde_json::json!({
            "connections": options.connections,
            "client_threads": options.threads,
            "seconds": (elapsed * 100.0).round() / 100.0,
            "requests": latencies.len(),
            "ok": ok,
            "non_200": non_200,
            "failed_connections": failed_connections,
            "requests_per_sec": (requests / elapsed).round(),
            "body_bytes_per_request": if latencies.is_empty() { 0 } else { bytes / latencies.len() as u64 },
            "latency_ms": {
                "p50": percentile(&latencies, 0.50),
                "p90": percentile(&latencies, 0.90),
                "p99": percentile(&latencies, 0.99),
                "p999": percentile(&latencies, 0.999),
                "max": percentile(&latencies, 1.0),
            },
        });
        println!("{report}");
        Ok(())
    })
}
