//! The worker processes of a run, seen from the coordinator: forks them
//! (`loadtest worker <spec>`), reads their events into one state table, sends
//! them commands, waits on their progress, and stops them.

use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as ProcessCommand};
use tokio::sync::Notify;

use super::lock;
use crate::args::{RunArgs, Scenario};
use crate::ipc::{Command, Event, Progress, WorkerReport, WorkerSpec};

#[derive(Default)]
pub(super) struct WorkerState {
    ready: bool,
    pid: u32,
    progress: Progress,
    pub ramped: Option<Ramped>,
    pub report: Option<WorkerReport>,
    pub exited: bool,
}

/// What a worker said when its initial ramp was over.
#[derive(Debug, Clone, Default)]
pub(super) struct Ramped {
    pub failed_users: Vec<u32>,
    pub slow_users: Vec<u32>,
    pub first_connect_unix_ms: u64,
    pub last_established_unix_ms: u64,
}

pub(super) struct Workers {
    pub specs: Vec<WorkerSpec>,
    children: Vec<Child>,
    stdins: Vec<ChildStdin>,
    state: Arc<Mutex<Vec<WorkerState>>>,
    changed: Arc<Notify>,
}

impl Workers {
    pub fn state(&self) -> std::sync::MutexGuard<'_, Vec<WorkerState>> {
        lock(&self.state)
    }

    pub async fn send(&mut self, command: &Command) {
        let mut line = serde_json::to_string(command).unwrap_or_default();
        line.push('\n');
        for stdin in &mut self.stdins {
            let _ = stdin.write_all(line.as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }

    /// The workers' progress added up.
    pub fn total(&self) -> Progress {
        total_of(&self.state())
    }

    /// In --quiet runs (logs, CI, long runs in the background): one status line
    /// on stderr every 15 s with the phase set through the returned handle.
    pub fn status_lines(
        &self,
        quiet: bool,
    ) -> (Arc<Mutex<&'static str>>, tokio::task::JoinHandle<()>) {
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

    /// Waits until `done` holds (checked on every event, at least every
    /// 250 ms) or `deadline` passes; says which.
    pub async fn wait_until(
        &self,
        deadline: Duration,
        mut done: impl FnMut(&Workers) -> bool,
    ) -> bool {
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

    pub fn pids(&self) -> Vec<u32> {
        self.state().iter().map(|worker| worker.pid).collect()
    }

    pub async fn stop(mut self) {
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

fn source_ip(base: Ipv4Addr, index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + index)
}

/// Forks one worker per `--per-worker` connections and waits (60 s at most)
/// until every one is ready.
pub(super) async fn spawn_workers(
    args: &RunArgs,
    scenario: Scenario,
    prefix: &str,
) -> anyhow::Result<Workers> {
    let per_worker = args.per_worker.clamp(1, 18_000);
    let count = args.connections.div_ceil(u64::from(per_worker)) as u32;
    let exe = std::env::current_exe()?;
    let mut workers = Workers {
        specs: Vec::new(),
        children: Vec::new(),
        stdins: Vec::new(),
        state: Arc::new(Mutex::new(
            (0..count).map(|_| WorkerState::default()).collect(),
        )),
        changed: Arc::new(Notify::new()),
    };
    for id in 0..count {
        let spec = worker_spec(args, scenario, prefix, id, per_worker);
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
        tokio::spawn(read_events(
            id,
            stdout,
            workers.state.clone(),
            workers.changed.clone(),
        ));
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

/// Worker `id`'s share of the run.
fn worker_spec(
    args: &RunArgs,
    scenario: Scenario,
    prefix: &str,
    id: u32,
    per_worker: u32,
) -> WorkerSpec {
    let first = u64::from(id) * u64::from(per_worker);
    WorkerSpec {
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
        topic: if matches!(scenario, Scenario::Broadcast | Scenario::UnderFaults) {
            args.topic.clone()
        } else {
            String::new()
        },
        default_ping_secs: args.ping_secs,
        reconnect_attempts: args.reconnect_attempts,
        storm_jitter_ms: args.storm_jitter_ms,
    }
}

/// Reads worker `id`'s events (one JSON object a line) into its state until
/// the worker's stdout closes; wakes the waiters on each.
async fn read_events(
    id: u32,
    stdout: ChildStdout,
    state: Arc<Mutex<Vec<WorkerState>>>,
    changed: Arc<Notify>,
) {
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
        apply(&mut lock(&state)[id as usize], event);
        changed.notify_waiters();
    }
    lock(&state)[id as usize].exited = true;
    changed.notify_waiters();
}

fn apply(worker: &mut WorkerState, event: Event) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_count_up_across_octets() {
        let base: Ipv4Addr = "127.0.0.2".parse().unwrap_or(Ipv4Addr::LOCALHOST);
        assert_eq!(source_ip(base, 0).to_string(), "127.0.0.2");
        assert_eq!(source_ip(base, 253).to_string(), "127.0.0.255");
        assert_eq!(source_ip(base, 254).to_string(), "127.0.1.0");
    }
}
