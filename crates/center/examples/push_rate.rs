//! Unicast push rate through center, with and without coalescing single-user
//! pushes into StoreMany calls (`store_batch_max`).
//!
//! For each mode it starts a real cluster (every role a process, Redis and
//! MariaDB on 127.0.0.1, through the e2e harness), then for `--secs` seconds
//! `--concurrency` HTTP clients send `POST /api/push` with one user each (a
//! different payload every call) to `--users` offline users, and reports the
//! accepted pushes per second and the API latency. With `--loadtest` it then
//! runs `loadtest unicast` against the same cluster (devices connected, every
//! message delivered and acked end to end) with the arguments given after it.
//!
//! ```text
//! cargo build --release --workspace --bins --examples
//! target/release/examples/push_rate --secs 10 --concurrency 64
//! target/release/examples/push_rate --secs 10 --loadtest --connections 2000 \
//!     --messages-per-user 50 --batch 1 --push-concurrency 64
//! ```
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use pushgrid_e2e::{ClusterOptions, TestCluster, target_dir};
use serde_json::json;
use tokio::sync::Mutex;

struct Options {
    secs: u64,
    concurrency: usize,
    users: u64,
    /// Arguments for `loadtest unicast` (after `--loadtest`), if any.
    loadtest: Option<Vec<String>>,
}

fn options() -> Options {
    let mut options = Options {
        secs: 10,
        concurrency: 64,
        users: 10_000,
        loadtest: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> u64 {
            args.next()
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--secs" => options.secs = number().clamp(1, 600),
            "--concurrency" => options.concurrency = number().clamp(1, 1024) as usize,
            "--users" => options.users = number().max(1),
            "--loadtest" => {
                options.loadtest = Some(args.by_ref().collect());
                break;
            }
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

struct Measured {
    accepted: u64,
    refused: u64,
    failed: u64,
    seconds: f64,
    latency: Histogram<u64>,
}

/// Single-user pushes from `concurrency` clients for `secs` seconds.
async fn measure(cluster: &TestCluster, options: &Options) -> Measured {
    let url = format!("{}/api/push", cluster.center_url());
    let key = format!("apikey {}", cluster.app.api_key);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(options.concurrency)
        .build()
        .unwrap();
    let (accepted, refused, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let latency = Arc::new(Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.secs);
    let mut tasks = Vec::new();
    for client in 0..options.concurrency {
        let (http, url, key) = (http.clone(), url.clone(), key.clone());
        let (accepted, refused, failed, latency) = (
            accepted.clone(),
            refused.clone(),
            failed.clone(),
            latency.clone(),
        );
        let users = options.users;
        tasks.push(tokio::spawn(async move {
            let mut own = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let mut round = 0u64;
            while Instant::now() < deadline {
                let user = format!("u{}", (client as u64 * 7919 + round * 31) % users);
                let body = json!({ "users": [user], "payload": format!("{client}-{round}") });
                round += 1;
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .header("Authorization", &key)
                    .json(&body)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match response.map(|response| response.status().as_u16()) {
                    Ok(200) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        own.saturating_record(sent.elapsed().as_micros() as u64);
                    }
                    Ok(429 | 503) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latency.lock().await.add(&own).unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let latency = latency.lock().await.clone();
    Measured {
        accepted: accepted.load(Ordering::Relaxed),
        refused: refused.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        seconds,
        latency,
    }
}

/// `loadtest unicast` against the cluster; prints its summary.
async fn loadtest(cluster: &TestCluster, args: &[String]) {
    let binary = target_dir().join("loadtest");
    let mut command = tokio::process::Command::new(binary);
    command
        .arg("unicast")
        .arg("--rooms")
        .arg(cluster.room_addr(0))
        .arg("--api")
        .arg(cluster.center_url())
        .arg("--api-key")
        .arg(&cluster.app.api_key)
        .arg("--app")
        .arg(&cluster.app.id)
        .arg("--jwt-secret")
        .arg(&cluster.app.secret)
        .args(args)
        .kill_on_drop(true);
    let status = command.status().await.unwrap();
    println!("loadtest exited with {status}");
}

#[tokio::main]
async fn main() {
    let options = options();
    let modes: [(&str, Vec<String>); 2] = [
        (
            "one Store call per push",
            vec!["store_batch_max=0".to_string()],
        ),
        ("coalesced StoreMany calls", Vec::new()),
    ];
    let mut rows = Vec::new();
    for (mode, center_sets) in modes {
        let cluster = TestCluster::start(ClusterOptions {
            center_sets,
            ..Default::default()
        })
        .await
        .unwrap();
        eprintln!("{mode}: pushing for {} s", options.secs);
        let measured = measure(&cluster, &options).await;
        let at = |quantile: f64| measured.latency.value_at_quantile(quantile) as f64 / 1000.0;
        rows.push(format!(
            "| {mode} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} |",
            options.concurrency,
            measured.accepted as f64 / measured.seconds,
            at(0.5),
            at(0.99),
            at(0.999),
            measured.refused,
            measured.failed,
        ));
        if let Some(args) = &options.loadtest {
            eprintln!("{mode}: loadtest unicast {}", args.join(" "));
            loadtest(&cluster, args).await;
        }
        cluster.cleanup().await;
    }
    println!(
        "| mode | clients | pushes/s accepted | p50 ms | p99 ms | p99.9 ms | 429/503 | failed |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
}
