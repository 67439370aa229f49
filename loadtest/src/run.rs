//! The coordinating process: forks workers, drives the scenario through the
//! push API, collects and accounts for every message, and reports.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use futures::StreamExt;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command as ProcessCommand};
use tokio::sync::Notify;

use crate::frames::{payload, unix_us};
use crate::ipc::{Command, Event, Progress, WorkerReport, WorkerSpec};
use crate::ledger::{Ledger, Outcome};
use crate::procstat::{self, Sample};
use crate::push_rate;
use crate::receipts::TopicReceipts;
use crate::report::{self, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Connect,
    Unicast,
    Broadcast,
    Churn,
    Slow,
    PushRate,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct RunArgs {
    /// Room TCP addresses (127.0.0.0/8 only); worker i connects to room i mod n.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8090")]
    pub rooms: Vec<String>,
    /// Base URL of the push API (center).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub api: String,
    #[arg(long, default_value = "demo-key")]
    pub api_key: String,
    #[arg(long, default_value = "demo")]
    pub app: String,
    #[arg(long, default_value = "demo-secret")]
    pub jwt_secret: String,
    /// Device connections in total.
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Connections per worker process (at most 18,000: each process may hold 20,000 files).
    #[arg(long, default_value_t = 18_000)]
    pub per_worker: u32,
    /// New connections per second per worker (0 = unpaced).
    #[arg(long, default_value_t = 2000)]
    pub connect_rate: u32,
    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: u32,
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    #[arg(long, default_value_t = 20_000)]
    pub auth_timeout_ms: u64,
    /// First loopback source address; worker i binds to this + i.
    #[arg(long, default_value = "127.0.0.2")]
    pub source_base: Ipv4Addr,
    /// User ids are `<prefix><n>`; default: a fresh prefix per run, so inboxes of
    /// earlier runs never mix in.
    #[arg(long)]
    pub user_prefix: Option<String>,
    /// Seconds to hold every connection open after the ramp.
    #[arg(long, default_value_t = 5)]
    pub hold_secs: u64,
    /// The ramp is abandoned after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub ramp_timeout_secs: u64,
    /// Unicast/slow/churn: messages per online user.
    #[arg(long, default_value_t = 1)]
    pub messages_per_user: u32,
    /// Users per push API call (1 to 10,000).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Push API calls in flight.
    #[arg(long, default_value_t = 8)]
    pub push_concurrency: usize,
    /// Messages per second through the push API (0 = unpaced).
    #[arg(long, default_value_t = 0)]
    pub push_rate: u64,
    /// Payload size in bytes (the send timestamp plus padding).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Waiting for deliveries ends after this long...
    #[arg(long, default_value_t = 120)]
    pub drain_secs: u64,
    /// ... or after this long without a new delivery.
    #[arg(long, default_value_t = 10)]
    pub quiet_secs: u64,
    /// Broadcast: topic and number of broadcasts.
    #[arg(long, default_value = "loadtest")]
    pub topic: String,
    #[arg(long, default_value_t = 5)]
    pub broadcasts: u32,
    /// Broadcast: API calls in flight at once.
    #[arg(long, default_value_t = 1)]
    pub broadcast_concurrency: usize,
    /// Broadcast: least time between the starts of two calls, in ms.
    #[arg(long, default_value_t = 200)]
    pub broadcast_interval_ms: u64,
    /// Churn: reconnect storms, reconnect attempts per device, spread of a storm.
    #[arg(long, default_value_t = 3)]
    pub storms: u32,
    #[arg(long, default_value_t = 5)]
    pub reconnect_attempts: u32,
    #[arg(long, default_value_t = 1000)]
    pub storm_jitter_ms: u64,
    /// Slow: every n-th device stops reading after AUTH.
    #[arg(long, default_value_t = 10)]
    pub slow_every: u32,
    /// pushgrid process ids to measure (CPU, RSS).
    #[arg(long, value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Also measure every running process named like a pushgrid binary.
    #[arg(long)]
    pub discover_servers: bool,
    /// Where the JSON report goes.
    #[arg(long, default_value = "loadtest-report.json")]
    pub json: String,
    /// No progress bar (CI, logs).
    #[arg(long)]
    pub quiet: bool,
    /// Ping interval when the room does not say.
    #[arg(long, default_value_t = 60)]
    pub ping_secs: u32,
    /// push-rate: seconds of pushing at `push_rate` (set by its own flags).
    #[arg(skip)]
    pub push_secs: u64,
}

/// Faults injected one after the other after the hold and before the pushes
/// (`loadtest million --faults`): after each the run waits until every device
/// that was open is open again and the registers hold exactly one session per
/// open device; then it pushes as usual, so the report's loss accounting
/// covers the faults.
pub trait Fault: Send {
    /// How many faults there are.
    fn count(&self) -> usize;
    /// Injects fault `step` (and repairs it: a restart); returns what it did.
    fn inject(&mut self, step: usize) -> futures::future::BoxFuture<'_, anyhow::Result<Value>>;
    /// Sessions the register instances hold now.
    fn sessions(&mut self) -> futures::future::BoxFuture<'_, anyhow::Result<u64>>;
}

/// A server process to measure, with what it is.
#[derive(Debug, Clone)]
pub struct ServerProc {
    pub pid: u32,
    pub role: String,
    /// Index into `RunArgs::rooms` when this process is that room.
    pub room_index: Option<usize>,
}

#[derive(Default)]
struct WorkerState {
    ready: bool,
    pid: u32,
    progress: Progress,
    ramped: Option<Ramped>,
    report: Option<WorkerReport>,
    exited: bool,
}

#[derive(Debug, Clone, Default)]
struct Ramped {
    failed_users: Vec<u32>,
    slow_users: Vec<u32>,
    first_connect_unix_ms: u64,
    last_established_unix_ms: u64,
}

struct Workers {
    specs: Vec<WorkerSpec>,
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    state: Arc<Mutex<Vec<WorkerState>>>,
    changed: Arc<Notify>,
}

impl Workers {
    fn state(&self) -> std::sync::MutexGuard<'_, Vec<WorkerState>> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn send(&mut self, command: &Command) {
        let mut line = serde_json::to_string(command).unwrap_or_default();
        line.push('\n');
        for stdin in &mut self.stdins {
            let _ = stdin.write_all(line.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }

    fn total(&self) -> Progress {
        total_of(&self.state())
    }

    /// In --quiet runs (logs, CI, long runs in the background): one status line
    /// on stderr every 15 s with the phase set through the returned handle.
    fn status_lines(&self, quiet: bool) -> (Arc<Mutex<&'static str>>, tokio::task::JoinHandle<()>) {
        let phase = Arc::new(Mutex::new("start"));
        let state = self.state.clone();
        let shown = phase.clone();
        let task = tokio::spawn(async move {
            if !quiet {
                return;
            }
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            tick.tick().await;
            loop {
                tick.tick().await;
                let total = total_of(&lock(&state));
                eprintln!(
                    "[{:>5.0} s] {:<9} open {} established {} failed {} closed by server {} delivered {} broadcast {}",
                    started.elapsed().as_secs_f64(),
                    *lock(&shown),
                    total.open,
                    total.established,
                    total.failed,
                    total.closed_by_server,
                    total.delivered,
                    total.broadcast_delivered
                );
            }
        });
        (phase, task)
    }
}

fn total_of(state: &[WorkerState]) -> Progress {
    let mut total = Progress {
        ramped: true,
        ..Default::default()
    };
    for worker in state.iter() {
        let p = &worker.progress;
        total.attempted += p.attempted;
        total.established += p.established;
        total.failed += p.failed;
        total.open += p.open;
        total.delivered += p.delivered;
        total.broadcast_delivered += p.broadcast_delivered;
        total.subscribed += p.subscribed;
        total.closed_by_server += p.closed_by_server;
        total.storm_settled += p.storm_settled;
        total.ramped &= worker.ramped.is_some() || worker.exited;
    }
    total
}

impl Workers {
    async fn wait_until(&self, deadline: Duration, mut done: impl FnMut(&Workers) -> bool) -> bool {
        let until = Instant::now() + deadline;
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(250), self.changed.notified()).await;
        }
    }

    fn pids(&self) -> Vec<u32> {
        self.state().iter().map(|worker| worker.pid).collect()
    }

    async fn stop(mut self) {
        self.send(&Command::Stop).await;
        drop(std::mem::take(&mut self.stdins));
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

fn source_ip(base: Ipv4Addr, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + index)
}

fn check_loopback(addr: &str) -> anyhow::Result<()> {
    let host = addr.rsplit_once(':').map(|(host, _)| host).unwrap_or(addr);
    let host = host
        .trim_start_matches("http://")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: std::net::IpAddr = if host == "localhost" {
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .with_context(|| format!("{addr}: not an IP address"))?
    };
    if !ip.is_loopback() {
        bail!("{addr}: load targets must be on 127.0.0.0/8");
    }
    Ok(())
}

async fn spawn_workers(
    args: &RunArgs,
    scenario: Scenario,
    prefix: &str,
) -> anyhow::Result<Workers> {
    let per_worker = args.per_worker.clamp(1, 18_000);
    let count = args.connections.div_ceil(u64::from(per_worker)) as u32;
    let exe = std::env::current_exe()?;
    let state = Arc::new(Mutex::new(
        (0..count)
            .map(|_| WorkerState::default())
            .collect::<Vec<_>>(),
    ));
    let changed = Arc::new(Notify::new());
    let mut workers = Workers {
        specs: Vec::new(),
        children: Vec::new(),
        stdins: Vec::new(),
        state: state.clone(),
        changed: changed.clone(),
    };
    for id in 0..count {
        let first = u64::from(id) * u64::from(per_worker);
        let spec = WorkerSpec {
            id,
            source_ip: source_ip(args.source_base, id).to_string(),
            room: args.rooms[id as usize % args.rooms.len()].clone(),
            app: args.app.clone(),
            jwt_secret: args.jwt_secret.clone(),
            user_prefix: prefix.to_owned(),
            first_user: first,
            count: (args.connections - first).min(u64::from(per_worker)) as u32,
            connect_rate: args.connect_rate,
            connect_concurrency: args.connect_concurrency,
            connect_timeout_ms: args.connect_timeout_ms,
            auth_timeout_ms: args.auth_timeout_ms,
            slow_every: if scenario == Scenario::Slow {
                args.slow_every
            } else {
                0
            },
            topic: if scenario == Scenario::Broadcast {
                args.topic.clone()
            } else {
                String::new()
            },
            default_ping_secs: args.ping_secs,
            reconnect_attempts: args.reconnect_attempts,
            storm_jitter_ms: args.storm_jitter_ms,
        };
        let mut child = ProcessCommand::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let state = state.clone();
        let changed = changed.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let event = match serde_json::from_str::<Event>(&line) {
                    Ok(event) => event,
                    Err(error) => {
                        // Never silent: a dropped report means a run without numbers.
                        let head: String = line.chars().take(120).collect();
                        eprintln!("worker {id}: unreadable event ({error}): {head}");
                        continue;
                    }
                };
                let mut state = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let worker = &mut state[id as usize];
                match event {
                    Event::Ready { pid } => {
                        worker.ready = true;
                        worker.pid = pid;
                    }
                    Event::Progress(progress) => worker.progress = progress,
                    Event::Ramped {
                        failed_users,
                        slow_users,
                        first_connect_unix_ms,
                        last_established_unix_ms,
                    } => {
                        worker.ramped = Some(Ramped {
                            failed_users,
                            slow_users,
                            first_connect_unix_ms,
                            last_established_unix_ms,
                        });
                    }
                    Event::Report(report) => {
                        worker.progress = report.progress.clone();
                        worker.report = Some(*report);
                    }
                }
                drop(state);
                changed.notify_waiters();
            }
            state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)[id as usize]
                .exited = true;
            changed.notify_waiters();
        });
        workers.specs.push(spec);
        workers.children.push(child);
        workers.stdins.push(stdin);
    }
    let all_ready = workers
        .wait_until(Duration::from_secs(60), |workers| {
            workers
                .state()
                .iter()
                .all(|worker| worker.ready || worker.exited)
        })
        .await;
    if !all_ready || workers.state().iter().any(|worker| worker.exited) {
        workers.stop().await;
        bail!("workers did not start");
    }
    Ok(workers)
}

fn bar(args: &RunArgs, len: u64, label: &str) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(label.to_owned());
    bar
}

/// Every process measured, sampled at the start, after the ramp and at the end.
struct Meter {
    servers: Vec<ServerProc>,
    start: Vec<Sample>,
    ramped: Vec<Sample>,
    workers_start: Vec<Sample>,
    workers_ramped: Vec<Sample>,
    started: Instant,
}

fn sample_all(pids: impl Iterator<Item = u32>) -> Vec<Sample> {
    pids.map(procstat::sample).collect()
}

pub(crate) struct PushOutcome {
    pub calls: u64,
    pub errors: BTreeMap<String, u64>,
    pub seconds: f64,
    /// Request to answer of each accepted call, in microseconds.
    pub answer_us: Histogram<u64>,
}

impl Default for PushOutcome {
    fn default() -> Self {
        PushOutcome {
            calls: 0,
            errors: BTreeMap::new(),
            seconds: 0.0,
            answer_us: latency_histogram(),
        }
    }
}

/// Microseconds from 1 µs to 10 minutes, 3 significant digits.
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds")
}

/// Pushes `rounds` messages to each of `users` (global indices) through the
/// API, `--batch` users per call.
async fn push_unicast(
    args: &RunArgs,
    http: &reqwest::Client,
    prefix: &str,
    users: &[u64],
    rounds: u32,
    ledger: &Mutex<Ledger>,
    progress: &ProgressBar,
) -> PushOutcome {
    let batches: Vec<Vec<u64>> = (0..rounds)
        .flat_map(|_| users.chunks(args.batch.clamp(1, 10_000)))
        .map(<[u64]>::to_vec)
        .collect();
    push_batches(args, http, prefix, &batches, ledger, progress).await
}

/// One push call per batch of users (global indices), paced at
/// `--push-rate` messages per second when set, `--push-concurrency` calls in
/// flight; every accepted id goes into `ledger`.
pub(crate) async fn push_batches(
    args: &RunArgs,
    http: &reqwest::Client,
    prefix: &str,
    batches: &[Vec<u64>],
    ledger: &Mutex<Ledger>,
    progress: &ProgressBar,
) -> PushOutcome {
    let started = Instant::now();
    let errors = Mutex::new(BTreeMap::<String, u64>::new());
    let answers = Mutex::new(latency_histogram());
    let mut sent_messages = 0u64;
    let schedule: Vec<(usize, Duration)> = batches
        .iter()
        .enumerate()
        .map(|(index, batch)| {
            let at = if args.push_rate > 0 {
                Duration::from_secs_f64(sent_messages as f64 / args.push_rate as f64)
            } else {
                Duration::ZERO
            };
            sent_messages += batch.len() as u64;
            (index, at)
        })
        .collect();
    let calls = schedule.len() as u64;
    futures::stream::iter(schedule)
        .map(|(index, at)| {
            let batch = &batches[index];
            let (errors, answers) = (&errors, &answers);
            async move {
                tokio::time::sleep_until((started + at).into()).await;
                let names: Vec<String> =
                    batch.iter().map(|user| format!("{prefix}{user}")).collect();
                let called = Instant::now();
                match push_call(args, http, &names).await {
                    Ok(messages) => {
                        let _ = lock(answers).record((called.elapsed().as_micros() as u64).max(1));
                        let mut ledger = lock(ledger);
                        for (user, id) in messages {
                            let index = user
                                .strip_prefix(prefix)
                                .and_then(|rest| rest.parse().ok())
                                .unwrap_or(u64::MAX);
                            ledger.accept(id, index);
                        }
                        progress.inc(batch.len() as u64);
                    }
                    Err(reason) => {
                        *lock(errors).entry(reason).or_default() += batch.len() as u64;
                    }
                }
            }
        })
        .buffer_unordered(args.push_concurrency.max(1))
        .collect::<()>()
        .await;
    PushOutcome {
        calls,
        errors: errors.into_inner().unwrap_or_default(),
        seconds: started.elapsed().as_secs_f64(),
        answer_us: answers.into_inner().unwrap_or_else(|_| latency_histogram()),
    }
}

/// One push call, retried on 429/503 as told by Retry-After. Returns (user, id).
async fn push_call(
    args: &RunArgs,
    http: &reqwest::Client,
    users: &[String],
) -> Result<Vec<(String, u64)>, String> {
    let body = json!({ "users": users, "payload": payload(unix_us(), args.payload_bytes) });
    for _attempt in 0..20 {
        let response = http
            .post(format!("{}/api/push", args.api))
            .header("Authorization", format!("apikey {}", args.api_key))
            .json(&body)
            .send()
            .await
            .map_err(|error| {
                if error.is_timeout() {
                    "push: timeout (outcome unknown)".to_owned()
                } else {
                    format!("push: {error}")
                }
            })?;
        let status = response.status();
        if status.as_u16() == 429 || status.as_u16() == 503 {
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok()?.parse::<f64>().ok())
                .unwrap_or(1.0);
            tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.05, 10.0))).await;
            continue;
        }
        let value: Value = response
            .json()
            .await
            .map_err(|error| format!("push: {error}"))?;
        if !status.is_success() {
            return Err(format!(
                "push: HTTP {} {}",
                status.as_u16(),
                value["error"]["code"]
            ));
        }
        let messages = value["result"]["messages"]
            .as_array()
            .ok_or_else(|| "push: answer without messages".to_owned())?;
        return Ok(messages
            .iter()
            .filter_map(|message| {
                let user = message["user"].as_str()?.to_owned();
                let id = match &message["id"] {
                    Value::String(text) => text.parse().ok()?,
                    Value::Number(number) => number.as_u64()?,
                    _ => return None,
                };
                Some((user, id))
            })
            .collect());
    }
    Err("push: still refused (429/503) after 20 attempts".to_owned())
}

/// Waits until `delivered(total) >= target`, `quiet` passes without progress, or `limit`.
async fn drain(
    workers: &Workers,
    args: &RunArgs,
    target: u64,
    delivered: impl Fn(&Progress) -> u64,
    progress: &ProgressBar,
) -> f64 {
    let started = Instant::now();
    let mut last = (0u64, Instant::now());
    workers
        .wait_until(Duration::from_secs(args.drain_secs), |workers| {
            let now = delivered(&workers.total());
            progress.set_position(now);
            if now != last.0 {
                last = (now, Instant::now());
            }
            now >= target || last.1.elapsed() > Duration::from_secs(args.quiet_secs)
        })
        .await;
    started.elapsed().as_secs_f64()
}

pub async fn run(
    scenario: Scenario,
    args: RunArgs,
    mut servers: Vec<ServerProc>,
    fault: Option<&mut dyn Fault>,
) -> anyhow::Result<Report> {
    for room in &args.rooms {
        check_loopback(room)?;
    }
    let api_host = args
        .api
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    check_loopback(api_host)?;
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    for pid in &args.server_pids {
        servers.push(ServerProc {
            pid: *pid,
            role: procstat::name(*pid),
            room_index: None,
        });
    }
    if args.discover_servers {
        for pid in procstat::discover_pushgrid() {
            if !servers.iter().any(|server| server.pid == pid) {
                servers.push(ServerProc {
                    pid,
                    role: procstat::name(pid),
                    room_index: None,
                });
            }
        }
    }
    let prefix = args
        .user_prefix
        .clone()
        .unwrap_or_else(|| format!("lt{:x}-", unix_us() / 1000 % 0xffff_ffff));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(args.push_concurrency.max(1))
        .build()?;
    let mut report = Report::new(scenario, &args, &prefix);

    let mut workers = spawn_workers(&args, scenario, &prefix).await?;
    let run_started = Instant::now();
    let mut meter = Meter {
        start: sample_all(servers.iter().map(|server| server.pid)),
        workers_start: sample_all(workers.pids().into_iter()),
        servers: servers.clone(),
        ramped: Vec::new(),
        workers_ramped: Vec::new(),
        started: run_started,
    };

    // Ramp.
    let (phase, status_task) = workers.status_lines(args.quiet);
    let set_phase = |name: &'static str| *lock(&phase) = name;
    set_phase("connect");
    let ramp_bar = bar(&args, args.connections, "connect");
    workers.send(&Command::Go).await;
    let ramp_started = Instant::now();
    let ramped = workers
        .wait_until(Duration::from_secs(args.ramp_timeout_secs), |workers| {
            let total = workers.total();
            ramp_bar.set_position(total.established + total.failed);
            ramp_bar.set_message(format!("failed {}", total.failed));
            total.ramped
        })
        .await;
    ramp_bar.finish();
    let ramp_wall = ramp_started.elapsed().as_secs_f64();
    let infos: Vec<Ramped> = workers
        .state()
        .iter()
        .map(|worker| worker.ramped.clone().unwrap_or_default())
        .collect();
    let first_ms = infos
        .iter()
        .map(|info| info.first_connect_unix_ms)
        .filter(|ms| *ms > 0)
        .min()
        .unwrap_or(0);
    let last_ms = infos
        .iter()
        .map(|info| info.last_established_unix_ms)
        .max()
        .unwrap_or(0);
    let total = workers.total();
    report.connections.ramp_completed = ramped;
    report.connections.ramp_secs = ramp_wall;
    report.connections.established = total.established;
    // Devices whose first connect failed (reconnect failures are in the reasons).
    report.connections.failed_initial = infos
        .iter()
        .map(|info| info.failed_users.len() as u64)
        .sum();
    let active_secs = last_ms.saturating_sub(first_ms) as f64 / 1000.0;
    report.connections.connect_rate_per_sec = if active_secs > 0.0 {
        total.established as f64 / active_secs
    } else {
        0.0
    };

    // Let the servers settle (sessions flushed, allocators quiet), then measure memory.
    tokio::time::sleep(Duration::from_secs(3)).await;
    meter.ramped = sample_all(meter.servers.iter().map(|server| server.pid));
    meter.workers_ramped = sample_all(workers.pids().into_iter());

    // Hold.
    if args.hold_secs > 0 {
        set_phase("hold");
        let hold_bar = bar(&args, args.hold_secs, "hold");
        let hold_started = Instant::now();
        while hold_started.elapsed() < Duration::from_secs(args.hold_secs) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let total = workers.total();
            hold_bar.set_position(hold_started.elapsed().as_secs());
            hold_bar.set_message(format!(
                "open {} closed by server {}",
                total.open, total.closed_by_server
            ));
        }
        hold_bar.finish();
    }
    report.connections.open_after_hold = workers.total().open;

    if let Some(fault) = fault {
        set_phase("fault");
        for step in 0..fault.count() {
            let outcome = inject_fault(&mut *fault, step, &workers, &args).await?;
            report.faults.push(outcome);
        }
    }

    // Users to push to: online, by class.
    let mut online = Vec::new();
    let mut slow = Vec::new();
    for (spec, info) in workers.specs.iter().zip(&infos) {
        let failed: std::collections::HashSet<u32> = info.failed_users.iter().copied().collect();
        let slow_set: std::collections::HashSet<u32> = info.slow_users.iter().copied().collect();
        for index in 0..spec.count {
            if failed.contains(&index) {
                continue;
            }
            let user = spec.first_user + u64::from(index);
            if slow_set.contains(&index) {
                slow.push(user)
            } else {
                online.push(user)
            }
        }
    }

    let ledger = Mutex::new(Ledger::default());
    let slow_ledger = Mutex::new(Ledger::default());
    let mut broadcast_started_us = 0u64;
    match scenario {
        Scenario::Connect => {}
        Scenario::PushRate => {
            let total = args.push_rate * args.push_secs;
            let batches = push_rate::schedule(&online, total, args.batch);
            let mut measured: Vec<push_rate::Measured> = meter
                .servers
                .iter()
                .map(|server| push_rate::Measured {
                    pid: server.pid,
                    name: server.role.clone(),
                    kind: "pushgrid",
                })
                .collect();
            measured.extend(push_rate::discover_stores());
            measured.extend(
                workers
                    .pids()
                    .into_iter()
                    .chain([std::process::id()])
                    .map(|pid| push_rate::Measured {
                        pid,
                        name: "loadtest".into(),
                        kind: "load generator",
                    }),
            );
            set_phase("push");
            let push_bar = bar(&args, total, "push");
            let window = push_rate::CpuWindow::start(measured);
            let pushed = push_batches(&args, &http, &prefix, &batches, &ledger, &push_bar).await;
            push_bar.finish();
            let accepted = lock(&ledger).len() as u64;
            set_phase("deliver");
            let drain_bar = bar(&args, accepted, "deliver");
            let drain_secs = drain(&workers, &args, accepted, |p| p.delivered, &drain_bar).await;
            drain_bar.finish();
            let delivered = workers.total().delivered.min(accepted);
            report.push_rate = Some(push_rate::PushRate::measured(
                &args,
                pushed.calls,
                pushed.seconds,
                accepted,
                delivered,
                &pushed.answer_us,
                window,
            ));
            report.messages.push_secs = pushed.seconds;
            report.messages.api_calls = pushed.calls;
            report.messages.api_errors = pushed.errors;
            report.messages.drain_secs = drain_secs;
        }
        Scenario::Unicast | Scenario::Slow => {
            let targets = online.len() as u64 * u64::from(args.messages_per_user);
            set_phase("push");
            let push_bar = bar(&args, targets, "push");
            let slow_push = async {
                if slow.is_empty() {
                    PushOutcome::default()
                } else {
                    push_unicast(
                        &args,
                        &http,
                        &prefix,
                        &slow,
                        args.messages_per_user,
                        &slow_ledger,
                        &ProgressBar::hidden(),
                    )
                    .await
                }
            };
            let (pushed, slow_pushed) = tokio::join!(
                push_unicast(
                    &args,
                    &http,
                    &prefix,
                    &online,
                    args.messages_per_user,
                    &ledger,
                    &push_bar
                ),
                slow_push
            );
            push_bar.finish();
            let accepted = lock(&ledger).len() as u64;
            let all_accepted = accepted + lock(&slow_ledger).len() as u64;
            set_phase("deliver");
            let drain_bar = bar(&args, accepted, "deliver");
            let drain_secs =
                drain(&workers, &args, all_accepted, |p| p.delivered, &drain_bar).await;
            drain_bar.finish();
            report.messages.push_secs = pushed.seconds;
            report.messages.api_calls = pushed.calls + slow_pushed.calls;
            report.messages.api_errors = merge(pushed.errors, slow_pushed.errors);
            report.messages.drain_secs = drain_secs;
            if scenario == Scenario::Slow {
                let before_resume = workers.total();
                report.slow.devices = slow.len() as u64;
                report.slow.closed_by_server_before_resume = before_resume.closed_by_server;
                workers.send(&Command::Resume).await;
                let resume_bar = bar(&args, all_accepted, "resume");
                drain(&workers, &args, all_accepted, |p| p.delivered, &resume_bar).await;
                resume_bar.finish();
            }
        }
        Scenario::Broadcast => {
            set_phase("broadcast");
            let subscribed = workers.total().subscribed;
            report.broadcast.subscribed = subscribed;
            report.broadcast.topic = args.topic.clone();
            report.broadcast.in_flight = args.broadcast_concurrency.max(1);
            let devices = online.len() as u64;
            let expected = devices * u64::from(args.broadcasts);
            let drain_bar = bar(&args, expected, "broadcast");
            let started_us = unix_us();
            let started = Instant::now();
            broadcast_started_us = started_us;
            let results: Vec<Result<u64, String>> = futures::stream::iter(0..args.broadcasts)
                .map(|index| {
                    let (args, http) = (&args, &http);
                    async move {
                        let due = started
                            + Duration::from_millis(args.broadcast_interval_ms * u64::from(index));
                        tokio::time::sleep_until(due.into()).await;
                        broadcast_call(args, http).await
                    }
                })
                .buffer_unordered(args.broadcast_concurrency.max(1))
                .collect()
                .await;
            report.broadcast.api_secs = started.elapsed().as_secs_f64();
            report.broadcast.api_calls = results.len() as u64;
            let mut offsets = Vec::new();
            for result in results {
                match result {
                    Ok(offset) => offsets.push(offset),
                    Err(reason) => {
                        *report.messages.api_errors.entry(reason).or_default() += 1;
                    }
                }
            }
            offsets.sort_unstable();
            report.broadcast.accepted = offsets.len() as u64;
            report.broadcast.offsets = offsets.clone();
            if report
                .messages
                .api_errors
                .keys()
                .any(|reason| reason.contains("HTTP 404"))
            {
                report.broadcast.status =
                    "broadcast API not available (POST /api/broadcast answered 404)".into();
            }
            if !offsets.is_empty() {
                if report.broadcast.status.is_empty() {
                    report.broadcast.status = "ok".into();
                }
                let expected = devices * offsets.len() as u64;
                report.broadcast.expected_deliveries = expected;
                set_phase("deliver");
                drain_bar.set_length(expected);
                report.messages.drain_secs = drain(
                    &workers,
                    &args,
                    expected,
                    |p| p.broadcast_delivered,
                    &drain_bar,
                )
                .await;
            }
            drain_bar.finish();
        }
        Scenario::Churn => {
            for storm in 0..args.storms {
                let participants = workers.total().open;
                let storm_started = Instant::now();
                workers.send(&Command::Storm).await;
                // Push while the devices reconnect: stored messages must reach them.
                let push_bar = bar(&args, online.len() as u64, &format!("storm {}", storm + 1));
                let pushed =
                    push_unicast(&args, &http, &prefix, &online, 1, &ledger, &push_bar).await;
                push_bar.finish();
                report.messages.api_calls += pushed.calls;
                report.messages.api_errors = merge(
                    std::mem::take(&mut report.messages.api_errors),
                    pushed.errors,
                );
                workers
                    .wait_until(Duration::from_secs(args.ramp_timeout_secs), |workers| {
                        // Progress lines older than the storm still carry the last count.
                        storm_started.elapsed() > Duration::from_millis(600)
                            && workers.total().storm_settled >= participants
                    })
                    .await;
                let settle = storm_started.elapsed().as_secs_f64();
                let accepted = lock(&ledger).len() as u64;
                let drain_bar = bar(&args, accepted, "deliver");
                drain(&workers, &args, accepted, |p| p.delivered, &drain_bar).await;
                drain_bar.finish();
                report.churn.storms.push(json!({
                    "storm": storm + 1,
                    "devices": participants,
                    "reconnected_within_secs": settle,
                    "reconnect_rate_per_sec": if settle > 0.0 { participants as f64 / settle } else { 0.0 },
                    "open_after": workers.total().open,
                }));
            }
        }
    }

    // Collect.
    set_phase("collect");
    workers.send(&Command::Report).await;
    let reported = workers
        .wait_until(Duration::from_secs(120), |workers| {
            workers
                .state()
                .iter()
                .all(|worker| worker.report.is_some() || worker.exited)
        })
        .await;
    if !reported {
        report
            .notes
            .push("some workers did not report in 120 s".into());
    }
    let end_servers = sample_all(meter.servers.iter().map(|server| server.pid));
    let end_workers = sample_all(workers.pids().into_iter());
    let worker_reports: Vec<WorkerReport> = workers
        .state()
        .iter_mut()
        .map(|worker| worker.report.take().unwrap_or_default())
        .collect();
    let specs = workers.specs.clone();
    status_task.abort();
    workers.stop().await;

    // Accounting.
    let mut connect = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut broadcast_latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    // offset -> slowest device's latency (µs), over every worker.
    let mut last_device_us: BTreeMap<u64, u64> = BTreeMap::new();
    let mut last_receipt_us = 0u64;
    {
        let mut ledger = lock(&ledger);
        let mut slow_ledger = lock(&slow_ledger);
        for (spec, worker) in specs.iter().zip(&worker_reports) {
            for (reason, count) in &worker.failures {
                *report
                    .connections
                    .failures_by_reason
                    .entry(reason.clone())
                    .or_default() += count;
            }
            for (reason, count) in &worker.closes {
                *report
                    .connections
                    .closes_by_reason
                    .entry(reason.clone())
                    .or_default() += count;
            }
            report.connections.closed_by_server += worker.progress.closed_by_server;
            report.churn.reconnected += worker.reconnected;
            for (index, (id, us)) in worker
                .delivered_ids
                .iter()
                .zip(&worker.delivered_latency_us)
                .enumerate()
            {
                if slow_ledger.contains(*id) {
                    slow_ledger.deliver(*id);
                } else {
                    match worker.delivered_devices.get(index) {
                        Some(device) => {
                            ledger.deliver_to(*id, spec.first_user + u64::from(*device))
                        }
                        None => ledger.deliver(*id),
                    }
                    if *us > 0 {
                        let _ = latency.record(*us);
                    }
                }
            }
            for id in &worker.slow_delivered_ids {
                slow_ledger.deliver(*id);
            }
            for receipt in &worker.broadcast_offsets {
                if receipt.topic == args.topic {
                    let slowest = last_device_us.entry(receipt.offset).or_default();
                    *slowest = (*slowest).max(receipt.max_latency_us);
                }
            }
            last_receipt_us = last_receipt_us.max(worker.last_broadcast_receipt_unix_us);
            if let Some(histogram) = decode_histogram(&worker.broadcast_latency_histogram) {
                let _ = broadcast_latency.add(histogram);
            }
            if let Some(histogram) = decode_histogram(&worker.connect_histogram) {
                let _ = connect.add(histogram);
            }
        }
        let outcome: Outcome = ledger.outcome();
        // Undelivered messages of devices that were not connected at the end
        // wait in their inbox (at-least-once); the others were lost in flight.
        let offline: std::collections::HashSet<u64> =
            workers_specs_offline(&specs, &worker_reports);
        report.messages.lost_to_offline_devices = outcome
            .lost
            .iter()
            .filter(|(_, user)| offline.contains(user))
            .count() as u64;
        report.messages.offline_devices_at_end = offline.len() as u64;
        report.messages.set_outcome(outcome, &latency);
        if scenario == Scenario::Slow {
            let slow_outcome = slow_ledger.outcome();
            report.slow.accepted_for_slow = slow_outcome.accepted;
            report.slow.delivered_to_slow_after_resume = slow_outcome.delivered;
            report.slow.still_in_inbox = slow_outcome.lost.len() as u64;
            report.slow.kicked_slow_consumer = report
                .connections
                .closes_by_reason
                .iter()
                .filter(|(reason, _)| reason.contains("SLOW_CONSUMER"))
                .map(|(_, count)| *count)
                .sum();
        }
    }
    // The worker reports are final; progress lines seen at the ramp may trail them.
    let established: u64 = worker_reports
        .iter()
        .map(|worker| worker.progress.established)
        .sum();
    if established > report.connections.established && report.connections.established > 0 {
        report.connections.connect_rate_per_sec *=
            established as f64 / report.connections.established as f64;
    }
    report.connections.established = report.connections.established.max(established);
    report.connections.connect_ms = report::percentiles_ms(&connect);
    if scenario == Scenario::Broadcast {
        account_broadcasts(
            &mut report.broadcast,
            &specs,
            &worker_reports,
            &online,
            &last_device_us,
        );
        report.broadcast.latency_ms = report::percentiles_ms(&broadcast_latency);
        if report.broadcast.delivered > 0 && last_receipt_us > broadcast_started_us {
            let secs = (last_receipt_us - broadcast_started_us) as f64 / 1e6;
            report.broadcast.delivery_secs = secs;
            report.broadcast.deliveries_per_sec = report.broadcast.delivered as f64 / secs;
        }
    }

    // Processes.
    let wall = meter.started.elapsed().as_secs_f64();
    let mut room_connections: HashMap<usize, u64> = HashMap::new();
    for (spec, worker) in specs.iter().zip(&worker_reports) {
        let room_index = args
            .rooms
            .iter()
            .position(|room| *room == spec.room)
            .unwrap_or(0);
        *room_connections.entry(room_index).or_default() += worker.progress.established;
    }
    let established = report.connections.established.max(1);
    let (mut room_growth, mut room_conns, mut server_growth) = (0i64, 0u64, 0i64);
    for (index, server) in meter.servers.iter().enumerate() {
        let (start, ramped, end) = (meter.start[index], meter.ramped[index], end_servers[index]);
        let growth = ramped.rss_bytes as i64 - start.rss_bytes as i64;
        server_growth += growth;
        if let Some(room) = server.room_index {
            room_growth += growth;
            room_conns += room_connections.get(&room).copied().unwrap_or(0);
        }
        report.processes.push(report::ProcessRow {
            pid: server.pid,
            role: server.role.clone(),
            connections: server
                .room_index
                .and_then(|room| room_connections.get(&room).copied()),
            rss_start_mb: mb(start.rss_bytes),
            rss_after_ramp_mb: mb(ramped.rss_bytes),
            rss_end_mb: mb(end.rss_bytes),
            rss_peak_mb: mb(end.peak_rss_bytes.max(ramped.peak_rss_bytes)),
            cpu_secs: end.cpu_secs - start.cpu_secs,
            cpu_percent: if wall > 0.0 {
                100.0 * (end.cpu_secs - start.cpu_secs) / wall
            } else {
                0.0
            },
            alive_at_end: end.alive,
        });
    }
    let worker_growth: i64 = meter
        .workers_ramped
        .iter()
        .zip(&meter.workers_start)
        .map(|(ramped, start)| ramped.rss_bytes as i64 - start.rss_bytes as i64)
        .sum();
    report.memory.room_bytes_per_connection =
        (room_conns > 0).then(|| room_growth as f64 / room_conns as f64);
    report.memory.servers_bytes_per_connection =
        (!meter.servers.is_empty()).then(|| server_growth as f64 / established as f64);
    report.memory.client_bytes_per_connection = worker_growth as f64 / established as f64;
    report.memory.client_rss_after_ramp_mb = mb(meter
        .workers_ramped
        .iter()
        .map(|sample| sample.rss_bytes)
        .sum());
    report.memory.workers = specs.len();
    report.memory.client_cpu_secs = end_workers
        .iter()
        .zip(&meter.workers_start)
        .map(|(end, start)| end.cpu_secs - start.cpu_secs)
        .sum();
    report.wall_secs = wall;
    Ok(report)
}

fn decode_histogram(base64_text: &str) -> Option<Histogram<u64>> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_text)
        .ok()?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize::<u64, _>(&mut &bytes[..])
        .ok()
}

/// Matches every accepted offset against every device expected to get it
/// (`devices`: global user indices connected at the ramp), by device.
fn account_broadcasts(
    broadcast: &mut report::Broadcast,
    specs: &[WorkerSpec],
    reports: &[WorkerReport],
    devices: &[u64],
    last_device_us: &BTreeMap<u64, u64>,
) {
    let accepted = broadcast.offsets.clone();
    let accepted_set: std::collections::HashSet<u64> = accepted.iter().copied().collect();
    let empty = TopicReceipts::default();
    let mut by_device: HashMap<u64, &TopicReceipts> = HashMap::new();
    for (spec, worker) in specs.iter().zip(reports) {
        for device in &worker.broadcast_devices {
            if device.topic == broadcast.topic {
                by_device.insert(
                    spec.first_user + u64::from(device.device),
                    &device.receipts,
                );
            }
        }
    }
    broadcast.devices = devices.len() as u64;
    broadcast.expected_deliveries = broadcast.devices * accepted.len() as u64;
    let mut unexpected = std::collections::HashSet::new();
    for receipts in by_device.values() {
        broadcast.duplicated += receipts.duplicated;
        broadcast.out_of_order += receipts.out_of_order;
        broadcast.skipped_ahead += receipts.skipped_ahead;
        if receipts.out_of_order > 0 {
            broadcast.devices_out_of_order += 1;
        }
        for (start, end) in &receipts.ranges {
            // Bounded: a run accepts at most --broadcasts offsets, and a
            // range longer than that holds unexpected ones anyway.
            for offset in *start..=(*end).min(start.saturating_add(100_000)) {
                if !accepted_set.contains(&offset) {
                    unexpected.insert(offset);
                }
            }
        }
    }
    broadcast.unexpected = unexpected.len() as u64;
    for user in devices {
        let receipts = by_device.get(user).copied().unwrap_or(&empty);
        let missing = receipts.missing(&accepted);
        broadcast.delivered += (accepted.len() - missing.len()) as u64;
        if missing.is_empty() {
            continue;
        }
        broadcast.lost += missing.len() as u64;
        broadcast.devices_with_loss += 1;
        for offset in &missing {
            *broadcast.lost_by_offset.entry(*offset).or_default() += 1;
        }
        if broadcast.lost_sample.len() < 20 {
            broadcast
                .lost_sample
                .push((*user, missing.into_iter().take(20).collect()));
        }
    }
    let mut last = latency_histogram();
    for offset in &accepted {
        if let Some(us) = last_device_us.get(offset) {
            let _ = last.record((*us).max(1));
        }
    }
    broadcast.last_device_ms = report::percentiles_ms(&last);
}

/// One broadcast call to `--topic`, retried on 429/503 as told by
/// Retry-After. Returns the accepted offset.
async fn broadcast_call(args: &RunArgs, http: &reqwest::Client) -> Result<u64, String> {
    // The payload carries the time of the first attempt: latency is from the
    // API call, retries included.
    let body = json!({ "topic": args.topic, "payload": payload(unix_us(), args.payload_bytes) });
    for _attempt in 0..20 {
        let response = http
            .post(format!("{}/api/broadcast", args.api))
            .header("Authorization", format!("apikey {}", args.api_key))
            .json(&body)
            .send()
            .await
            .map_err(|error| format!("broadcast: {error}"))?;
        let status = response.status();
        if status.as_u16() == 429 || status.as_u16() == 503 {
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok()?.parse::<f64>().ok())
                .unwrap_or(1.0);
            tokio::time::sleep(Duration::from_secs_f64(wait.clamp(0.05, 10.0))).await;
            continue;
        }
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!("broadcast: HTTP {}", status.as_u16()));
        }
        return value["result"]["offset"]
            .as_u64()
            .ok_or_else(|| "broadcast: answer without an offset".to_owned());
    }
    Err("broadcast: still refused (429/503) after 20 attempts".to_owned())
}

/// Injects fault `step`, then waits (at most --ramp-timeout-secs) until every
/// device open before it is open again and the registers hold exactly one
/// session per open device: every session back, none stale.
async fn inject_fault(
    fault: &mut dyn Fault,
    step: usize,
    workers: &Workers,
    args: &RunArgs,
) -> anyhow::Result<Value> {
    let before = workers.total();
    let sessions_before = fault.sessions().await?;
    let started = Instant::now();
    let detail = fault.inject(step).await?;
    let injected_secs = started.elapsed().as_secs_f64();
    let limit = Duration::from_secs(args.ramp_timeout_secs);
    // Progress comes every 250 ms: let the workers see the fault first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut all_open_secs = None;
    let (mut open, mut sessions);
    loop {
        open = workers.total().open;
        if all_open_secs.is_none() && open >= before.open {
            all_open_secs = Some(started.elapsed().as_secs_f64());
        }
        sessions = fault.sessions().await.unwrap_or(0);
        if (open >= before.open && sessions == open) || started.elapsed() >= limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = workers.total();
    Ok(json!({
        "detail": detail,
        "open_before": before.open,
        "register_sessions_before": sessions_before,
        "injected_secs": injected_secs,
        "all_open_again": all_open_secs.is_some(),
        "all_open_after_secs": all_open_secs,
        "closed_by_server": after.closed_by_server - before.closed_by_server,
        "open_after": open,
        "register_sessions_after": sessions,
        "sessions_match_after_secs": started.elapsed().as_secs_f64(),
        "stale_or_missing_sessions": sessions as i64 - open as i64,
    }))
}

/// Global indices of the devices not connected when their worker reported.
fn workers_specs_offline(
    specs: &[WorkerSpec],
    reports: &[WorkerReport],
) -> std::collections::HashSet<u64> {
    specs
        .iter()
        .zip(reports)
        .flat_map(|(spec, report)| {
            report
                .offline_users
                .iter()
                .map(move |index| spec.first_user + u64::from(*index))
        })
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn merge(mut a: BTreeMap<String, u64>, b: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    for (key, value) in b {
        *a.entry(key).or_default() += value;
    }
    a
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec(first_user: u64) -> WorkerSpec {
        serde_json::from_value(json!({
            "id": 0, "source_ip": "127.0.0.2", "room": "127.0.0.1:1", "app": "a",
            "jwt_secret": "s", "user_prefix": "u", "first_user": first_user, "count": 2,
            "connect_rate": 0, "connect_concurrency": 1, "connect_timeout_ms": 1,
            "auth_timeout_ms": 1, "slow_every": 0, "topic": "t", "default_ping_secs": 1,
            "reconnect_attempts": 1, "storm_jitter_ms": 0
        }))
        .unwrap()
    }

    fn receipts(device: u32, offsets: &[u64]) -> crate::receipts::DeviceReceipts {
        let mut receipts = TopicReceipts::default();
        for offset in offsets {
            receipts.record(*offset);
        }
        crate::receipts::DeviceReceipts {
            device,
            topic: "t".into(),
            receipts,
        }
    }

    #[test]
    fn broadcast_loss_is_counted_per_device_even_when_others_got_the_offset() {
        let specs = [spec(0), spec(2)];
        let reports = [
            WorkerReport {
                broadcast_devices: vec![receipts(0, &[1, 2, 3]), receipts(1, &[1, 3, 2, 2])],
                ..Default::default()
            },
            WorkerReport {
                // Device 2 missed offset 2; device 3 never got anything.
                broadcast_devices: vec![receipts(0, &[1, 3, 9])],
                ..Default::default()
            },
        ];
        let mut broadcast = report::Broadcast {
            topic: "t".into(),
            offsets: vec![1, 2, 3],
            ..Default::default()
        };
        account_broadcasts(
            &mut broadcast,
            &specs,
            &reports,
            &[0, 1, 2, 3],
            &BTreeMap::from([(1, 5_000), (2, 9_000), (3, 7_000)]),
        );
        assert_eq!(broadcast.expected_deliveries, 12);
        assert_eq!(broadcast.delivered, 8);
        assert_eq!(broadcast.lost, 4);
        assert_eq!(broadcast.devices_with_loss, 2);
        assert_eq!(broadcast.lost_sample, vec![(2, vec![2]), (3, vec![1, 2, 3])]);
        assert_eq!(broadcast.lost_by_offset, BTreeMap::from([(1, 1), (2, 2), (3, 1)]));
        assert_eq!(broadcast.duplicated, 1);
        assert_eq!(broadcast.out_of_order, 1);
        assert_eq!(broadcast.devices_out_of_order, 1);
        assert_eq!(broadcast.unexpected, 1, "offset 9 was never accepted");
        assert_eq!(broadcast.last_device_ms.count, 3);
        assert!((broadcast.last_device_ms.max - 9.0).abs() < 0.01, "{:?}", broadcast.last_device_ms);
    }

    #[test]
    fn source_addresses_count_up_across_octets() {
        let base: Ipv4Addr = "127.0.0.2".parse().unwrap_or(Ipv4Addr::LOCALHOST);
        assert_eq!(source_ip(base, 0).to_string(), "127.0.0.2");
        assert_eq!(source_ip(base, 253).to_string(), "127.0.0.255");
        assert_eq!(source_ip(base, 254).to_string(), "127.0.1.0");
    }

    #[test]
    fn only_loopback_targets() {
        assert!(check_loopback("127.0.0.1:8090").is_ok());
        assert!(check_loopback("127.3.4.5:1").is_ok());
        assert!(check_loopback("localhost:80").is_ok());
        assert!(check_loopback("10.0.0.1:8090").is_err());
        assert!(check_loopback("example.com:80").is_err());
    }
}
