//! `pushgrid cluster` as `loadtest cluster-faults` runs it: the launcher in a
//! process group of its own (so that nothing it started outlives the run), its
//! stdout read for the whole run: each role instance's starts, exits, ready
//! lines and bound addresses, and the launcher's own addresses.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use pushgrid_common::net::{LaunchedInstance, LauncherRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(super) struct Launcher {
    child: Child,
    seen: Arc<Mutex<LauncherRecord>>,
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
        let seen = Arc::new(Mutex::new(LauncherRecord::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                lock(&record).note(&line);
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

    pub fn instance(&self, name: &str) -> LaunchedInstance {
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
    async fn wait(&self, timeout: Duration, check: impl Fn(&LauncherRecord) -> bool) -> bool {
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

fn lock(seen: &Mutex<LauncherRecord>) -> std::sync::MutexGuard<'_, LauncherRecord> {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
