//! The processes `loadtest million` starts: each with its settings, stderr
//! and stdout in log files, and the addresses it announces on stdout
//! (`PUSHGRID_BOUND <role> <listener> <addr>`); stopping them, by pid only;
//! and reading register's session count from its metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

pub(super) struct Started {
    pub name: String,
    pub role: String,
    pub program: PathBuf,
    pub settings: Vec<String>,
    pub child: Child,
    pub pid: u32,
    bound: Arc<Mutex<HashMap<String, String>>>,
}

impl Started {
    pub fn bound(&self, key: &str) -> Option<String> {
        self.bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    pub async fn wait_bound(&mut self, key: &str, limit: Duration) -> anyhow::Result<String> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if let Some(value) = self.bound(key) {
                return Ok(value);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "{} exited ({status}) before announcing {key}; see its log",
                    self.name
                );
            }
            if tokio::time::Instant::now() >= until {
                bail!("{} did not announce {key} within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts `program --set a --set b ...`, stderr to `<name>.log`, and collects
/// the `PUSHGRID_BOUND <role> <listener> <addr>` lines of its stdout.
pub(super) async fn start(
    name: &str,
    role: &str,
    program: &Path,
    settings: &[String],
    log_dir: &Path,
) -> anyhow::Result<Started> {
    // Appended: a process restarted by --faults keeps its first life's log.
    let stderr = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{name}.log")))?;
    let mut child = Command::new(program)
        .args(
            settings
                .iter()
                .flat_map(|setting| ["--set", setting.as_str()]),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let pid = child.id().context("started process without a pid")?;
    let stdout = child.stdout.take().context("stdout")?;
    let bound = Arc::new(Mutex::new(HashMap::new()));
    let lines_bound = bound.clone();
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{name}.out")))
        .await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if parts.len() == 4 && parts[0] == pushgrid_common::net::BOUND_LINE_PREFIX {
                lines_bound
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(format!("{} {}", parts[1], parts[2]), parts[3].to_owned());
            }
            let _ = out.write_all(line.as_bytes()).await;
            let _ = out.write_all(b"\n").await;
        }
    });
    Ok(Started {
        name: name.to_owned(),
        role: role.to_owned(),
        program: program.to_owned(),
        settings: settings.to_vec(),
        child,
        pid,
        bound,
    })
}

/// SIGTERM to every process started here (rooms first, keeper last), a grace
/// period, then SIGKILL for what is still running. Only these pids, never by name.
pub(super) async fn stop_all(processes: &mut Vec<Started>) {
    for process in processes.iter_mut().rev() {
        if let Ok(None) = process.child.try_wait() {
            let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGTERM);
        }
    }
    let grace = tokio::time::Instant::now() + Duration::from_secs(30);
    for process in processes.iter_mut().rev() {
        if tokio::time::timeout_at(grace, process.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within 30 s; killing it", process.name);
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
    }
    processes.clear();
}

pub(super) fn binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: cargo build --release --workspace --bins (or pass --bin-dir)",
            path.display()
        );
    }
    Ok(path)
}

/// Sessions the run's register instances hold (`pushgrid_register_sessions`).
pub(super) async fn register_sessions(processes: &[Started]) -> anyhow::Result<u64> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut total = 0u64;
    for process in processes
        .iter()
        .filter(|process| process.role == "register")
    {
        let admin = process
            .bound("register admin")
            .context("register admin address")?;
        let text = http
            .get(format!("http://{admin}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        total += text
            .lines()
            .find_map(|line| line.strip_prefix("pushgrid_register_sessions "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    Ok(total)
}
