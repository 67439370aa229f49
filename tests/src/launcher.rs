//! `pushgrid cluster` as a test runs it: the launcher process on ephemeral
//! ports, its stdout read for the whole run (the addresses each instance
//! bound, each start and exit of a role process, the ready lines).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use pushgrid_common::net::{LaunchedInstance, LauncherRecord};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::{TestApp, binary, eventually};

#[derive(Default)]
struct Seen {
    record: LauncherRecord,
    /// The launcher's own stdout lines (not its children's `[name] ...`).
    own_lines: Vec<String>,
}

/// A running `pushgrid cluster`, in a process group of its own that its role
/// processes share: dropping it kills the whole group, so no role outlives
/// the test (a launcher killed alone would leave its children running).
pub struct Launcher {
    child: Child,
    seen: Arc<Mutex<Seen>>,
    pub log: PathBuf,
    /// The cluster credentials the launcher created (`<dir>/data/credentials`).
    pub credentials: PathBuf,
}

/// `pushgrid cluster` arguments for a test: ephemeral ports, the test's own
/// database and app, short leases.
pub fn launcher_args(app: &TestApp, database_url: &str, redis_url: &str) -> Vec<String> {
    let apps = format!(
        "keeper:apps=[{{id=\"{}\", jwt_secret=\"{}\", api_key=\"{}\"}}]",
        app.id, app.secret, app.api_key
    );
    [
        "cluster",
        "--ephemeral-ports",
        "--admin-listen",
        "127.0.0.1:0",
        "--mysql",
        database_url,
        "--redis",
        redis_url,
        "--restart-backoff-ms",
        "100",
        "--restart-backoff-max-ms",
        "1000",
        "--stop-grace-secs",
        "5",
        "--role-set",
        &apps,
        "--role-set",
        "all:lease_ttl_secs=3",
        "--role-set",
        "room:auth_timeout_secs=2",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect()
}

impl Launcher {
    /// Starts `pushgrid <args>` (stderr to `dir/launcher.log`, its data
    /// directory, with the cluster credentials it creates, in `dir/data`) and
    /// waits for its `ready` line.
    pub async fn start(dir: &Path, args: &[String]) -> anyhow::Result<Launcher> {
        let log = dir.join("launcher.log");
        let stderr = std::fs::File::create(&log)?;
        let data = dir.join("data");
        let mut child = Command::new(binary("pushgrid"))
            .args(args)
            .arg("--data-dir")
            .arg(&data)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .context("start pushgrid cluster")?;
        let stdout = child.stdout.take().context("stdout")?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                note(&record, &line);
            }
        });
        let launcher = Launcher {
            child,
            seen,
            log,
            credentials: data.join("credentials"),
        };
        let ready = eventually(Duration::from_secs(120), || async {
            launcher
                .seen
                .lock()
                .unwrap()
                .record
                .own
                .contains_key("ready")
        })
        .await;
        if !ready {
            bail!(
                "pushgrid cluster was not ready in 120 s:\n{}",
                launcher.log_text()
            );
        }
        Ok(launcher)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the launcher itself wrote on stdout so far, line by line.
    pub fn own_lines(&self) -> Vec<String> {
        self.seen.lock().unwrap().own_lines.clone()
    }

    /// The launcher's admin address (`/metrics`, `/healthz`).
    pub fn admin(&self) -> SocketAddr {
        self.seen.lock().unwrap().record.own["admin"]
            .parse()
            .expect("the launcher announces socket addresses")
    }

    pub fn instance(&self, name: &str) -> LaunchedInstance {
        self.seen
            .lock()
            .unwrap()
            .record
            .instances
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// The instance names the launcher started, sorted.
    pub fn instances(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .seen
            .lock()
            .unwrap()
            .record
            .instances
            .keys()
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The address `name` announced for `listener` (`grpc`, `http`, `tcp`, `admin`).
    pub fn addr(&self, name: &str, listener: &str) -> SocketAddr {
        self.instance(name)
            .bound
            .get(listener)
            .unwrap_or_else(|| panic!("{name} announced no {listener} listener"))
            .parse()
            .expect("roles announce socket addresses")
    }

    /// kill -9 of instance `name`'s process; returns the pid killed.
    pub fn kill_instance(&self, name: &str) -> u32 {
        let pid = self.instance(name).pid;
        assert!(pid > 0, "{name} is not running");
        // A pid the launcher reported for its own child.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        pid
    }

    /// Waits until `name` was started `starts` times in all and its latest
    /// process announced `ready`.
    pub async fn wait_started(&self, name: &str, starts: u32, timeout: Duration) -> bool {
        eventually(timeout, || async {
            let state = self.instance(name);
            state.starts >= starts && state.ready >= starts && state.pid > 0
        })
        .await
    }

    /// SIGTERM to the launcher; waits up to `timeout` for it to exit.
    pub async fn stop(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        // The group the launcher leads: it and every role it started.
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn note(seen: &Mutex<Seen>, line: &str) {
    let mut seen = seen.lock().unwrap();
    if !line.starts_with('[') {
        seen.own_lines.push(line.to_string());
    }
    seen.record.note(line);
}

/// Whether process `pid` still exists.
pub fn process_alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}
