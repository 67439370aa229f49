//! Notifications per second from one center (issue 25): a real cluster
//! (keeper, register, saver on the machine's Redis and MariaDB, one center,
//! a room, a dispatcher), an HTTP/2 TLS stand-in of APNs answering 200, and
//! `--users` offline users with one APNs token each. Push calls of
//! `--per-call` users with a `notification` (policy `offline`), `--in-flight`
//! calls at once, until every user was pushed to once; the run ends when the
//! stand-in has one request per user (or after `--max-secs`).
//!
//! Prints and writes (`--json FILE`) a report: notifications per second from
//! the first call to the last notification, the push calls' time, center's
//! CPU per notification, and the stand-in's count.
//!
//! Run: `cargo bench -p pushgrid-e2e --bench notify_rate -- --users 20000
//! --per-call 1000 --in-flight 4 --json docs/bench/notify-rate-<commit>.json`
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use pushgrid_e2e::provider::{Reply, StandIn};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, temp_dir};
use reqwest::Method;
use serde_json::{Value, json};

const APNS_KEY: &str = include_str!("../../crates/notify/testdata/apns-test-key.p8");
/// The warm-up user's token: not one of the bench users' (`token_of`).
const WARM_TOKEN: &str = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";

struct Args {
    users: usize,
    per_call: usize,
    in_flight: usize,
    max_secs: u64,
    json: Option<String>,
}

fn args() -> Args {
    let mut args = Args {
        users: 20_000,
        per_call: 1000,
        in_flight: 4,
        max_secs: 120,
        json: None,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = || words.next().expect("a value after the flag");
        match word.as_str() {
            "--users" => args.users = value().parse().unwrap(),
            "--per-call" => args.per_call = value().parse().unwrap(),
            "--in-flight" => args.in_flight = value().parse().unwrap(),
            "--max-secs" => args.max_secs = value().parse().unwrap(),
            "--json" => args.json = Some(value()),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    args
}

fn token_of(index: usize) -> String {
    format!("{index:064x}")
}

/// CPU seconds (user + system) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn shell(command: &str) -> String {
    std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .unwrap_or_default()
}

fn meta(args: &Args) -> Value {
    let dirty = !shell("git status --porcelain --untracked-files=no").is_empty();
    let commit = shell("git rev-parse HEAD") + if dirty { "-dirty" } else { "" };
    json!({
        "command": format!(
            "cargo bench -p pushgrid-e2e --bench notify_rate -- --users {} --per-call {} --in-flight {} --max-secs {}",
            args.users, args.per_call, args.in_flight, args.max_secs
        ),
        "commit": commit,
        "date": shell("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "machine": {
            "cpu_model": shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //' | cut -d' ' -f1-2"),
            "cpus": std::thread::available_parallelism().map_or(0, usize::from),
            "kernel": shell("uname -r"),
        },
    })
}

/// Registers one APNs token per user, 1,000 per batch call.
async fn register_tokens(cluster: &TestCluster, users: usize) {
    for first in (0..users).step_by(1000) {
        let commands: Vec<Value> = (first..users.min(first + 1000))
            .map(|index| {
                json!({ "method": "register_token", "params": {
                    "user": format!("u{index}"), "provider": "apns", "token": token_of(index), "bundle": "com.example.app",
                } })
            })
            .collect();
        let (status, body) = cluster
            .call(
                &cluster.app.api_key,
                "batch",
                json!({ "commands": commands }),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let arrivals = Arc::new(AtomicU64::new(0));
    let warmed = Arc::new(AtomicU64::new(0));
    let last_arrival = Arc::new(Mutex::new(None::<Instant>));
    let (counted, warm_counted, last) = (arrivals.clone(), warmed.clone(), last_arrival.clone());
    // The warm-up user's notifications are counted apart: the bench's count
    // starts at zero whenever the warm-up's last one lands.
    let stand_in = StandIn::start(move |request| {
        if request.path.ends_with(WARM_TOKEN) {
            warm_counted.fetch_add(1, Ordering::Relaxed);
        } else {
            counted.fetch_add(1, Ordering::Relaxed);
            *last.lock().unwrap() = Some(Instant::now());
        }
        Reply::empty(200)
    })
    .await;
    let dir = temp_dir("notify-rate");
    let ca_file = dir.join("stand-in-ca.pem");
    std::fs::write(&ca_file, &stand_in.ca_pem).unwrap();
    let options = ClusterOptions {
        center_sets: vec![format!("notify_ca_file={}", ca_file.display())],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(options).await.unwrap();
    let fields = json!({ "key_id": "ABC123DEFG", "team_id": "DEF123GHIJ", "private_key": APNS_KEY,
                         "topic": "com.example.app", "base_url": stand_in.base_url() });
    let path = format!("/admin/apps/{}/notify/apns", cluster.app.id);
    let (status, body) = cluster.admin(Method::PUT, &path, Some(fields)).await;
    assert_eq!(status, 200, "{body}");
    register_tokens(&cluster, args.users).await;
    let notification =
        json!({ "title": "Bench", "body": "a notification", "collapse_id": "bench" });
    // Warm up until center has the credentials: a user of its own.
    let body = json!({ "user": "warm", "provider": "apns", "token": WARM_TOKEN, "bundle": "com.example.app" });
    let (status, answer) = cluster
        .call(&cluster.app.api_key, "register_token", body)
        .await;
    assert_eq!(status, 200, "{answer}");
    let ready = eventually(Duration::from_secs(30), || async {
        let body = json!({ "users": ["warm"], "payload": "w", "notification": notification });
        cluster.call(&cluster.app.api_key, "push", body).await;
        warmed.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(ready, "center never notified through the stand-in");
    let center_pid = cluster.center.pid();
    let cpu_before = cpu_secs(center_pid);
    let bench_cpu_before = cpu_secs(std::process::id());

    let started = Instant::now();
    let calls: Vec<Vec<String>> = (0..args.users)
        .collect::<Vec<_>>()
        .chunks(args.per_call.max(1))
        .map(|chunk| chunk.iter().map(|index| format!("u{index}")).collect())
        .collect();
    let statuses: Vec<u16> = futures::stream::iter(calls)
        .map(|users| {
            let body = json!({ "users": users, "payload": "bench", "notification": notification });
            let cluster = &cluster;
            async move { cluster.call(&cluster.app.api_key, "push", body).await.0 }
        })
        .buffer_unordered(args.in_flight.max(1))
        .collect()
        .await;
    let calls_secs = started.elapsed().as_secs_f64();
    let left = Duration::from_secs(args.max_secs).saturating_sub(started.elapsed());
    eventually(left, || async {
        arrivals.load(Ordering::Relaxed) >= args.users as u64
    })
    .await;
    let received = arrivals.load(Ordering::Relaxed);
    let last = last_arrival.lock().unwrap().unwrap_or(started);
    let secs = last.duration_since(started).as_secs_f64();
    let center_cpu = cpu_secs(center_pid) - cpu_before;
    let bench_cpu = cpu_secs(std::process::id()) - bench_cpu_before;
    let admin = cluster.center.addr("admin");
    let metrics = pushgrid_e2e::metrics_text(admin).await;
    // + 0.0: an empty sum is -0.0.
    let outcome = |label: &str| {
        pushgrid_e2e::metric_in(&metrics, "pushgrid_center_notifications_total", label) + 0.0
    };
    let report = json!({
        "meta": meta(&args),
        "users": args.users,
        "per_call": args.per_call,
        "in_flight": args.in_flight,
        "push_calls": statuses.len(),
        "push_calls_not_200": statuses.iter().filter(|status| **status != 200).count(),
        "push_calls_secs": calls_secs,
        "notifications_received": received,
        "notifications_secs": secs,
        "notifications_per_sec": received as f64 / secs.max(1e-9),
        "center_outcomes": { "sent": outcome("outcome=\"sent\""), "failed": outcome("outcome=\"failed\""),
                             "dead_token": outcome("outcome=\"dead_token\"") },
        "skipped_queue_full": pushgrid_e2e::metric_in(&metrics, "pushgrid_center_notify_skipped_total", "queue_full") + 0.0,
        "center_cpu_secs": center_cpu,
        "center_cpu_us_per_notification": center_cpu * 1e6 / (received.max(1) as f64),
        "bench_process_cpu_secs": bench_cpu,
        "note": "the bench process runs the stand-in (TLS, HTTP/2) and the API client; center, saver, register, keeper, room, dispatcher, Redis and MariaDB share the same 2 cores",
    });
    let text = serde_json::to_string_pretty(&report).unwrap();
    println!("{text}");
    if let Some(path) = &args.json {
        // cargo runs a bench in its package's directory: a relative path is
        // taken from the workspace root, where the command was typed.
        let path = pushgrid_e2e::workspace_root().join(path);
        std::fs::write(&path, format!("{text}\n"))
            .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    }
    cluster.cleanup().await;
}
