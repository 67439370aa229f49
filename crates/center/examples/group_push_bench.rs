//! A group push to `--members` members of which `--connected` have a device
//! connected (issue 12's benchmark).
//!
//! Starts a real cluster through the e2e harness (every role a process, Redis
//! and MariaDB on 127.0.0.1), binds the members 10,000 per call, connects the
//! devices (raw TCP, straight to the room), then sends one `push_group` and
//! measures: the time until the call answered (accepted), the time until
//! every connected device had the PUSH, and the time until the fan-out was
//! done (every member's message stored), from which the stored messages per
//! second follow. Prints the figures as one JSON line.
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! target/release/examples/group_push_bench --members 100000 --connected 10000
//! ```
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use pushgrid_e2e::{ClusterOptions, TestCluster, next_push};
use serde_json::{Value, json};

struct Options {
    members: usize,
    connected: usize,
    timeout_secs: u64,
}

fn options() -> Options {
    let mut options = Options {
        members: 100_000,
        connected: 10_000,
        timeout_secs: 300,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> u64 {
            args.next()
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--members" => options.members = number().clamp(1, 1_000_000) as usize,
            // One process holds at most ~19,000 sockets (20,000 open files).
            "--connected" => options.connected = number().clamp(0, 15_000) as usize,
            "--timeout-secs" => options.timeout_secs = number().clamp(10, 3600),
            other => panic!("unknown argument {other}"),
        }
    }
    options.connected = options.connected.min(options.members);
    options
}

async fn call(cluster: &TestCluster, method: &str, body: Value) -> Value {
    let response = cluster
        .http
        .post(format!("{}/api/{method}", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let answer: Value = response.json().await.unwrap();
    assert!(status.is_success(), "{method}: {status} {answer}");
    answer["result"].clone()
}

fn member(index: usize) -> String {
    format!("member{index:07}")
}

/// Binds `members` users to the group "bench", 10,000 per call: the seconds
/// it took.
async fn bind_members(cluster: &TestCluster, members: usize) -> f64 {
    let started = Instant::now();
    for chunk in (0..members).collect::<Vec<_>>().chunks(10_000) {
        let users: Vec<String> = chunk.iter().map(|index| member(*index)).collect();
        call(cluster, "bind", json!({ "group": "bench", "users": users })).await;
    }
    let bind_secs = started.elapsed().as_secs_f64();
    eprintln!("bound {members} members in {bind_secs:.2} s");
    bind_secs
}

/// Connects the members that are online during the push (spread over the
/// group's pages), 200 at a time, then starts a reader per device that
/// counts its first push in `received` and its arrival (µs since the returned
/// origin) in `last_arrival_us`.
async fn connect_readers(
    cluster: &TestCluster,
    options: &Options,
    received: &Arc<AtomicU64>,
    last_arrival_us: &Arc<AtomicU64>,
    timeout: Duration,
) -> (Instant, tokio::task::JoinSet<impl Send + 'static>) {
    // Connected members: every 10th member (spread over the group's pages).
    let step = (options.members / options.connected.max(1)).max(1);
    let connected: Vec<usize> = (0..options.members)
        .step_by(step)
        .take(options.connected)
        .collect();
    let mut devices = Vec::with_capacity(connected.len());
    for chunk in connected.chunks(200) {
        let connects = chunk.iter().map(|index| async move {
            cluster
                .device_at(0, &member(*index), "phone")
                .await
                .unwrap()
                .0
        });
        devices.extend(futures::future::join_all(connects).await);
    }
    eprintln!("connected {} devices", devices.len());
    let origin = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for mut device in devices {
        let (received, last_arrival_us) = (received.clone(), last_arrival_us.clone());
        readers.spawn(async move {
            if next_push(&mut device, timeout).await.is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
                last_arrival_us.fetch_max(origin.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            device
        });
    }
    (origin, readers)
}

/// Polls the message's status until its fan-out is done and every reader
/// ended (or `timeout`): seconds from `sent_at` to the fan-out's end.
async fn wait_for_fanout(
    cluster: &TestCluster,
    id: &str,
    sent_at: Duration,
    origin: Instant,
    timeout: Duration,
    readers: &mut tokio::task::JoinSet<impl Send + 'static>,
) -> Option<f64> {
    let mut fanout_done_secs = None;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let status = call(cluster, "message_status", json!({ "id": id })).await;
        if fanout_done_secs.is_none() && status["fanout_done"] == true {
            fanout_done_secs = Some((origin.elapsed() - sent_at).as_secs_f64());
        }
        if fanout_done_secs.is_some() && readers.is_empty() {
            break;
        }
        while let Some(joined) = readers.try_join_next() {
            drop(joined.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fanout_done_secs
}

#[tokio::main]
async fn main() {
    let options = options();
    let cluster_options = ClusterOptions {
        // Devices that sit idle for the whole run must not be kicked for silence.
        heartbeat_secs: 600,
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(cluster_options).await.unwrap();

    let bind_secs = bind_members(&cluster, options.members).await;

    let received = Arc::new(AtomicU64::new(0));
    let last_arrival_us = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_secs(options.timeout_secs);
    let (origin, mut readers) =
        connect_readers(&cluster, &options, &received, &last_arrival_us, timeout).await;

    let sent_at = origin.elapsed();
    let pushed = call(
        &cluster,
        "push_group",
        json!({ "group": "bench", "payload": "group bench" }),
    )
    .await;
    let accepted_ms = (origin.elapsed() - sent_at).as_secs_f64() * 1000.0;
    let id = pushed["id"].as_str().unwrap().to_string();

    let fanout_done_secs =
        wait_for_fanout(&cluster, &id, sent_at, origin, timeout, &mut readers).await;
    let status_started = Instant::now();
    let status = call(&cluster, "message_status", json!({ "id": id })).await;
    let status_ms = status_started.elapsed().as_secs_f64() * 1000.0;
    let all_connected_secs =
        last_arrival_us.load(Ordering::Relaxed) as f64 / 1e6 - sent_at.as_secs_f64();
    let fanout_secs = fanout_done_secs.unwrap_or(f64::NAN);
    let report = json!({
        "members": options.members,
        "connected": options.connected,
        "bind_secs": bind_secs,
        "accepted_ms": accepted_ms,
        "connected_received": received.load(Ordering::Relaxed),
        "all_connected_secs": all_connected_secs,
        "fanout_done_secs": fanout_secs,
        "stored_per_sec": options.members as f64 / fanout_secs,
        "offline_stored_per_sec": (options.members - options.connected) as f64 / fanout_secs,
        "status_query_ms": status_ms,
        "status": status,
    });
    println!("{report}");
    readers.abort_all();
    cluster.cleanup().await;
}
