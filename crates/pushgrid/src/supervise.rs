//! Supervision of role processes for `pushgrid cluster`: each instance runs in
//! a task of its own that starts the process, forwards its output with the
//! instance's name, and starts it again whenever it exits, after a back-off
//! (doubling from `backoff_min` to `backoff_max`, back to the minimum once a
//! process has run for [`STABLE_AFTER`]). Only a stop request ends it.
//!
//! A process that bound port 0 comes back on the addresses it had: the
//! addresses it announced (`PUSHGRID_BOUND <role> <listener> <addr>`) are
//! passed to the next start as the listen settings, so peers and devices that
//! know it reach it again.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use pushgrid_common::CancellationToken;
use pushgrid_common::net::{BOUND_LINE_PREFIX, CHILD_LINE_PREFIX};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A process that ran this long was healthy: its next restart waits the
/// shortest back-off again.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The setting a role listens on for each listener name it announces.
const LISTEN_KEYS: &[(&str, &str)] = &[
    ("grpc", "listen"),
    ("admin", "admin_listen"),
    ("http", "http_listen"),
    ("tcp", "tcp_listen"),
    ("ws", "ws_listen"),
    ("tls", "tls_listen"),
    ("wss", "wss_listen"),
];

/// One supervised role process.
pub struct Instance {
    /// `keeper-0`, `room-1`, `coordinator`, ...
    pub name: String,
    pub binary: PathBuf,
    /// `--set` settings of every start.
    pub settings: Vec<String>,
    /// Listener name -> address, as last announced.
    bound: Mutex<BTreeMap<String, String>>,
    /// Times the process announced `ready` (0 until the first start is ready).
    ready: watch::Sender<u64>,
    up: watch::Sender<bool>,
}

impl Instance {
    pub fn new(name: impl Into<String>, binary: PathBuf, settings: Vec<String>) -> Arc<Instance> {
        Arc::new(Instance {
            name: name.into(),
            binary,
            settings,
            bound: Mutex::new(BTreeMap::new()),
            ready: watch::Sender::new(0),
            up: watch::Sender::new(false),
        })
    }

    /// The address the process announced for `listener` (e.g. `grpc`).
    pub fn bound(&self, listener: &str) -> Option<String> {
        self.bound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(listener)
            .cloned()
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Waits until the process has announced `ready` `count` times in all.
    pub async fn wait_ready(&self, count: u64, timeout: Duration) -> anyhow::Result<()> {
        let mut ready = self.ready.subscribe();
        match tokio::time::timeout(timeout, ready.wait_for(|times| *times >= count)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => anyhow::bail!("{} stopped before it was ready", self.name),
            Err(_) => anyhow::bail!("{} was not ready within {timeout:?}", self.name),
        }
    }

    /// The `--set` arguments of the next start: the settings, then the
    /// addresses an earlier start bound, so a restart keeps its addresses.
    fn arguments(&self) -> Vec<String> {
        let bound = self
            .bound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let mut settings = self.settings.clone();
        for (listener, key) in LISTEN_KEYS {
            if let Some(addr) = bound.get(*listener) {
                settings.push(format!("{key}={addr}"));
            }
        }
        settings
            .into_iter()
            .flat_map(|setting| ["--set".to_string(), setting])
            .collect()
    }

    /// Reads a `PUSHGRID_BOUND <role> <listener> <addr>` line.
    fn note_line(&self, line: &str) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [prefix, _role, listener, addr] = parts.as_slice() else {
            return;
        };
        if *prefix != BOUND_LINE_PREFIX {
            return;
        }
        if *listener == "ready" {
            self.ready.send_modify(|times| *times += 1);
            return;
        }
        self.bound
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(listener.to_string(), addr.to_string());
    }
}

/// Restart timing.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// A line a child wrote, for the launcher to print: (instance, stderr?, line).
pub type Line = (String, bool, String);

/// Runs `instance` until `stop`: starts it, restarts it after every exit with
/// a back-off, and on `stop` sends SIGTERM, waits up to `grace`, then kills.
/// Once `stopping` (the whole cluster is being stopped, so a process that
/// exits may have been told to by the terminal's Ctrl-C) nothing is started
/// again.
pub async fn supervise(
    instance: Arc<Instance>,
    backoff: Backoff,
    grace: Duration,
    lines: mpsc::Sender<Line>,
    stop: CancellationToken,
    stopping: CancellationToken,
) {
    let name = instance.name.clone();
    let mut delay = backoff.min;
    let mut starts = 0u64;
    loop {
        let started = Instant::now();
        let child = start(&instance, lines.clone());
        let mut child = match child {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(instance = %name, %error, delay_ms = delay.as_millis() as u64, "cannot start role; trying again");
                if !pause(delay, &stop).await || stopping.is_cancelled() {
                    return;
                }
                delay = (delay * 2).min(backoff.max);
                continue;
            }
        };
        starts += 1;
        let pid = child.id().unwrap_or(0);
        println!("{CHILD_LINE_PREFIX} {name} started {pid}");
        instance.up.send_replace(true);
        metrics::gauge!("pushgrid_launcher_role_up", "instance" => name.clone()).set(1.0);
        if starts > 1 {
            tracing::info!(instance = %name, pid, "role started again");
        }
        let status = tokio::select! {
            status = child.wait() => status,
            _ = stop.cancelled() => {
                terminate(&name, &mut child, grace).await;
                instance.up.send_replace(false);
                metrics::gauge!("pushgrid_launcher_role_up", "instance" => name.clone()).set(0.0);
                return;
            }
        };
        instance.up.send_replace(false);
        metrics::gauge!("pushgrid_launcher_role_up", "instance" => name.clone()).set(0.0);
        let how = describe(&status);
        println!(
            "{CHILD_LINE_PREFIX} {name} exited {}",
            how.replace(' ', "_")
        );
        if started.elapsed() >= STABLE_AFTER {
            delay = backoff.min;
        }
        if stopping.is_cancelled() {
            tracing::info!(instance = %name, exit = %how, "role exited while the cluster stops");
            return;
        }
        tracing::warn!(
            instance = %name,
            pid,
            exit = %how,
            ran_ms = started.elapsed().as_millis() as u64,
            restart_in_ms = delay.as_millis() as u64,
            "role exited; restarting it"
        );
        if !pause(delay, &stop).await || stopping.is_cancelled() {
            return;
        }
        metrics::counter!("pushgrid_launcher_restarts_total", "instance" => name.clone())
            .increment(1);
        delay = (delay * 2).min(backoff.max);
    }
}

/// Sleeps `delay`; false when `stop` came first.
async fn pause(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.cancelled() => false,
    }
}

fn describe(status: &std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("code {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            (None, None) => "unknown".into(),
        },
        Err(error) => format!("wait failed: {error}"),
    }
}

/// SIGTERM, then SIGKILL after `grace`.
async fn terminate(name: &str, child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        tracing::info!(instance = %name, pid, "sent SIGTERM");
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(instance = %name, "did not stop in time; killing it");
        let _ = child.kill().await;
    }
}

fn start(instance: &Arc<Instance>, lines: mpsc::Sender<Line>) -> anyhow::Result<Child> {
    let mut command = Command::new(&instance.binary);
    command
        .args(instance.arguments())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|error| {
        anyhow::anyhow!(
            "cannot start {} ({}): {error}",
            instance.name,
            instance.binary.display()
        )
    })?;
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(forward(instance.clone(), stdout, false, lines.clone()));
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(forward(instance.clone(), stderr, true, lines));
    }
    Ok(child)
}

/// Forwards a child's output line by line; stdout lines are read for
/// announced addresses too.
async fn forward(
    instance: Arc<Instance>,
    output: impl AsyncRead + Unpin,
    stderr: bool,
    lines: mpsc::Sender<Line>,
) {
    let mut reader = BufReader::new(output).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        if !stderr {
            instance.note_line(&line);
        }
        if lines
            .send((instance.name.clone(), stderr, line))
            .await
            .is_err()
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_keeps_the_addresses_announced_and_counts_ready_lines() {
        let instance = Instance::new(
            "room-0",
            PathBuf::from("room"),
            vec!["listen=127.0.0.1:0".into(), "tcp_listen=127.0.0.1:0".into()],
        );
        instance.note_line("PUSHGRID_BOUND room grpc 127.0.0.1:4001");
        instance.note_line("PUSHGRID_BOUND room tcp 127.0.0.1:4002");
        instance.note_line("PUSHGRID_BOUND room ready 127.0.0.1:4001");
        instance.note_line("PUSHGRID_BOUND room");
        instance.note_line("something else 1 2");
        assert_eq!(*instance.ready.borrow(), 1);
        assert_eq!(instance.bound("tcp").as_deref(), Some("127.0.0.1:4002"));
        let arguments = instance.arguments();
        // Later --set flags win: the bound addresses come after the settings.
        assert_eq!(
            arguments,
            [
                "--set",
                "listen=127.0.0.1:0",
                "--set",
                "tcp_listen=127.0.0.1:0",
                "--set",
                "listen=127.0.0.1:4001",
                "--set",
                "tcp_listen=127.0.0.1:4002",
            ]
        );
    }
}
