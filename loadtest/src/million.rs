//! `loadtest million`: one command that starts a cluster sized for the target
//! (`pushgrid dev` for keeper and every other role, plus one `room` process per
//! 18,000 devices), runs the scenarios against it, reports, and stops every
//! process it started.

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

use crate::run::{RunArgs, Scenario, ServerProc};

#[derive(Debug, Clone, clap::Args)]
pub struct MillionArgs {
    /// Scenarios to run one after the other, each with its own ramp.
    #[arg(long, value_delimiter = ',', default_value = "unicast")]
    pub scenarios: Vec<Scenario>,
    /// Devices per room process (a room may hold 20,000 files).
    #[arg(long, default_value_t = 18_000)]
    pub per_room: u64,
    /// Where `pushgrid` and `room` are; default: next to this binary.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Data and logs of the started processes.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Heartbeat the rooms ask for (long, so an idle hold costs no pings).
    #[arg(long, default_value_t = 600)]
    pub heartbeat_secs: u32,
    /// Everything stops after this many minutes, finished or not.
    #[arg(long, default_value_t = 30)]
    pub max_minutes: u64,
    /// Extra `--set key=value` for every room.
    #[arg(long = "room-set")]
    pub room_set: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

struct Started {
    name: String,
    child: Child,
    bound: Arc<Mutex<HashMap<String, String>>>,
}

impl Started {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    fn bound(&self, key: &str) -> Option<String> {
        self.bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    async fn wait_bound(&mut self, key: &str, limit: Duration) -> anyhow::Result<String> {
        let until = tokio::time::Instant::now() + limit;
        loop {
            if let Some(value) = self.bound(key) {
                return Ok(value);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("{} exited ({status}) before announcing {key}", self.name);
            }
            if tokio::time::Instant::now() >= until {
                bail!("{} did not announce {key} within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn start(
    name: &str,
    program: &Path,
    args: &[String],
    log_dir: &Path,
) -> anyhow::Result<Started> {
    let stderr = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let bound = Arc::new(Mutex::new(HashMap::new()));
    let lines_bound = bound.clone();
    let mut out = tokio::fs::File::create(log_dir.join(format!("{name}.out"))).await?;
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            // PUSHGRID_BOUND <role> <name> <addr>
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
        child,
        bound,
    })
}

/// SIGTERM, a grace period, then SIGKILL; only the processes started here.
async fn stop_all(processes: &mut Vec<Started>) {
    for process in processes.iter() {
        if let Some(pid) = process.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for process in processes.iter_mut() {
        if tokio::time::timeout(Duration::from_secs(20), process.child.wait())
            .await
            .is_err()
        {
            eprintln!("{} did not stop within 20 s; killing it", process.name);
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
        }
    }
    processes.clear();
}

pub async fn run(args: MillionArgs) -> anyhow::Result<()> {
    let bin_dir = match &args.bin_dir {
        Some(dir) => dir.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf(),
    };
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pushgrid-loadtest-{}", std::process::id()))
    });
    let log_dir = work_dir.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    let mut processes = Vec::new();
    let deadline = Duration::from_secs(args.max_minutes.max(1) * 60);
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(deadline, run_inner(&args, &bin_dir, &work_dir, &log_dir, &mut processes)) => {
            outcome.unwrap_or_else(|_| Err(anyhow::anyhow!("stopped: --max-minutes {} reached", args.max_minutes)))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    eprintln!("stopping {} processes started for the run", processes.len());
    stop_all(&mut processes).await;
    eprintln!("logs in {}", log_dir.display());
    outcome
}

async fn run_inner(
    args: &MillionArgs,
    bin_dir: &Path,
    work_dir: &Path,
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<()> {
    let rooms_needed = args
        .run
        .connections
        .div_ceil(args.per_room.clamp(1, 18_000)) as usize;
    let pushgrid = bin_dir.join("pushgrid");
    let room_bin = bin_dir.join("room");
    for binary in [&pushgrid, &room_bin] {
        if !binary.exists() {
            bail!(
                "{} not found: cargo build --release -p pushgrid -p pushgrid-room",
                binary.display()
            );
        }
    }
    eprintln!(
        "starting pushgrid dev and {rooms_needed} rooms (logs in {})",
        log_dir.display()
    );
    let dev_args: Vec<String> = [
        "dev",
        "--data-dir",
        &work_dir.join("data").display().to_string(),
        "--dispatcher-listen",
        "127.0.0.1:0",
        "--center-listen",
        "127.0.0.1:0",
        "--room-listen",
        "127.0.0.1:0",
        "--heartbeat-secs",
        &args.heartbeat_secs.to_string(),
    ]
    .iter()
    .map(|text| text.to_string())
    .collect();
    processes.push(start("dev", &pushgrid, &dev_args, log_dir).await?);
    let keeper = processes[0]
        .wait_bound("keeper grpc", Duration::from_secs(60))
        .await?;
    let center = processes[0]
        .wait_bound("dev ready", Duration::from_secs(90))
        .await?;

    for index in 0..rooms_needed {
        let mut room_args: Vec<String> = vec![
            format!("keeper={keeper}"),
            "listen=127.0.0.1:0".into(),
            "admin_listen=127.0.0.1:0".into(),
            "tcp_listen=127.0.0.1:0".into(),
            format!("heartbeat_secs={}", args.heartbeat_secs),
            format!("node_id=lt-room-{index}"),
        ];
        room_args.extend(args.room_set.iter().cloned());
        let room_args: Vec<String> = room_args
            .into_iter()
            .flat_map(|setting| ["--set".to_owned(), setting])
            .collect();
        processes.push(start(&format!("room-{index}"), &room_bin, &room_args, log_dir).await?);
    }
    let mut rooms = Vec::new();
    let mut servers = vec![ServerProc {
        pid: processes[0].pid(),
        role: "dev (all)".into(),
        room_index: None,
    }];
    for (index, process) in processes.iter_mut().skip(1).enumerate() {
        rooms.push(
            process
                .wait_bound("room tcp", Duration::from_secs(60))
                .await?,
        );
        process
            .wait_bound("room ready", Duration::from_secs(60))
            .await?;
        servers.push(ServerProc {
            pid: process.pid(),
            role: "room".into(),
            room_index: Some(index),
        });
    }
    // Let keeper's view of the new rooms reach center and the other roles.
    tokio::time::sleep(Duration::from_secs(3)).await;

    for scenario in &args.scenarios {
        let mut run = args.run.clone();
        run.rooms = rooms.clone();
        run.api = format!("http://{center}");
        run.per_worker = args.per_room.clamp(1, 18_000) as u32;
        run.user_prefix = None;
        run.discover_servers = false;
        if args.scenarios.len() > 1 {
            run.json =
                format!("{}.{scenario:?}.json", run.json.trim_end_matches(".json")).to_lowercase();
        }
        eprintln!(
            "scenario {scenario:?}: {} devices on {} rooms",
            run.connections,
            rooms.len()
        );
        let report = crate::run::run(*scenario, run.clone(), servers.clone()).await?;
        println!("{}", report.table());
        std::fs::write(&run.json, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("JSON report: {}", run.json);
    }
    Ok(())
}
