//! `pushgrid cluster` as `loadtest cluster-faults` runs it: the launcher in a
//! process group of its own (so that nothing it started outlives the run), its
//! stdout read for the whole run: each role instance's starts, exits, ready
//! lines and bound addresses, and the launcher's own addresses.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use pushgrid_common::net::LauncherLine;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// What the launcher said about one instance (`keeper-0`, `room-1`, ...).
#[derive(Debug, Default, Clone)]
pub(super) struct Instance {
    /// The running process, 0 while it is down.
    pub pid: u32,
    pub starts: u32,
    /// `ready` lines so far.
    pub ready: u32,
    /// Listener name -> address, as last announced.
    pub bound: HashMap<String, String>,
}

#[derive(Default)]
struct Seen {
    instances: HashMap<String, Instance>,
    /// The launcher's own `PUSHGRID_BOUND cluster <listener> <addr>` lines.
    own: HashMap<String, String>,
}

pub(super) struct Launcher {
    child: Child,
    seen: Arc<Mutex<Seen>>,
}

impl Launcher {
    /// Starts `<bin_dir>/pushgrid <args>` with stderr into `log` and waits
    /// (at most 180 s) for its `ready` line.
    pub async fn start(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Launcher> {
        let stderr = std::fs::File::create(log)?;
        let mut child = Command::new(program)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", program.display()))?;
        let stdout = child.stdout.take().context("stdout")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                note(&mut lock(&record), &line);
            }
        });
        let launcher = Launcher { child, seen };
        let ready = launcher
            .wait(Duration::from_secs(180), |seen| {
                seen.own.contains_key("ready")
            })
            .await;
        if !ready {
            bail!(
                "pushgrid cluster was not ready in 180 s (see {})",
                log.display()
            );
        }
        Ok(launcher)
    }

    /// The launcher's own listener (`admin`).
    pub fn own(&self, listener: &str) -> Option<String> {
        lock(&self.seen).own.get(listener).cloned()
    }

    pub fn instance(&self, name: &str) -> Instance {
        lock(&self.seen)
            .instances
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Every instance name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = lock(&self.seen).instances.keys().cloned().collect();
        names.sort();
        names
    }

    /// The address `name` announced for `listener` (`http`, `tcp`, ...).
    pub fn addr(&self, name: &str, listener: &str) -> anyhow::Result<String> {
        self.instance(name)
            .bound
            .get(listener)
            .cloned()
            .with_context(|| format!("{name} announced no {listener} listener"))
    }

    /// Waits until `check` holds for what the launcher said, or `timeout`.
    async fn wait(&self, timeout: Duration, check: impl Fn(&Seen) -> bool) -> bool {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            if check(&lock(&self.seen)) {
                return true;
            }
            if tokio::time::Instant::now() >= until {
                return false;
            }
            // The launcher's stdout is read by another task: poll its record.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// kill -9 of instance `name`, then waits (at most `timeout`) until the
    /// launcher started it again and it said `ready`; whether it did.
    pub async fn kill_and_await_restart(
        &self,
        name: &str,
        timeout: Duration,
    ) -> anyhow::Result<bool> {
        let before = self.instance(name);
        if before.pid == 0 {
            bail!("{name} is not running");
        }
        let _ = kill(Pid::from_raw(before.pid as i32), Signal::SIGKILL);
        let starts = before.starts + 1;
        Ok(self
            .wait(timeout, |seen| {
                seen.instances.get(name).is_some_and(|state| {
                    state.starts >= starts && state.ready >= starts && state.pid > 0
                })
            })
            .await)
    }

    /// SIGTERM to the launcher (which stops every role), at most `grace`;
    /// then SIGKILL to its whole process group.
    pub async fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.child.id()?;
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let status = tokio::time::timeout(grace, self.child.wait()).await;
        let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        status.ok().and_then(Result::ok)
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One line of the launcher's stdout into what it says.
fn note(seen: &mut Seen, line: &str) {
    match LauncherLine::parse(line) {
        Some(LauncherLine::Own { listener, addr }) => {
            seen.own.insert(listener.to_string(), addr.to_string());
        }
        Some(LauncherLine::Started { instance, pid }) => {
            let state = seen.instances.entry(instance.to_string()).or_default();
            state.pid = pid;
            state.starts += 1;
        }
        Some(LauncherLine::Exited { instance }) => {
            seen.instances.entry(instance.to_string()).or_default().pid = 0;
        }
        Some(LauncherLine::Bound {
            instance,
            listener,
            addr,
        }) => {
            let state = seen.instances.entry(instance.to_string()).or_default();
            state.bound.insert(listener.to_string(), addr.to_string());
        }
        Some(LauncherLine::Ready { instance }) => {
            seen.instances
                .entry(instance.to_string())
                .or_default()
                .ready += 1;
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_lines_say_starts_readiness_and_addresses() {
        let mut seen = Seen::default();
        for line in [
            "PUSHGRID_BOUND cluster admin 127.0.0.1:9000",
            "PUSHGRID_CHILD room-0 started 41",
            "[room-0] PUSHGRID_BOUND room tcp 127.0.0.1:8090",
            "[room-0] PUSHGRID_BOUND room ready -",
            "[room-0] something else",
            "PUSHGRID_CHILD room-0 exited signal 9",
            "PUSHGRID_CHILD room-0 started 42",
        ] {
            note(&mut seen, line);
        }
        assert_eq!(seen.own["admin"], "127.0.0.1:9000");
        let room = &seen.instances["room-0"];
        assert_eq!((room.pid, room.starts, room.ready), (42, 2, 1));
        assert_eq!(room.bound["tcp"], "127.0.0.1:8090");
    }
}
