//! `pushgrid cluster`: the seven roles as separate OS processes against Redis
//! and MySQL, on the fixed ports of the docker compose file. keeper starts
//! first; every child's stdout is forwarded with its name; SIGINT/SIGTERM is
//! passed on to every child, which then drains and exits.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::dev::{DEMO_API_KEY, DEMO_APP, DEMO_SECRET};

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Redis for the hot inbox.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// MySQL database for apps and the durable message copy (created if missing).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/pushgrid")]
    mysql: String,
    /// Number of room processes (ports 8090, 8091, ...).
    #[arg(long, default_value_t = 1)]
    rooms: u16,
    /// Address the public listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Directory holding the role binaries; defaults to this binary's own.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

struct Spec {
    name: String,
    binary: &'static str,
    settings: Vec<String>,
}

fn spec(name: impl Into<String>, binary: &'static str, settings: &[String]) -> Spec {
    Spec {
        name: name.into(),
        binary,
        settings: settings.to_vec(),
    }
}

pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    pushgrid_common::telemetry::init_tracing(false);
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("cannot find the directory of this binary"))?,
    };
    let host = &args.host;
    let keeper_addr = "127.0.0.1:7000".to_string();
    let common = |grpc: u16, admin: u16| {
        vec![
            format!("keeper={keeper_addr}"),
            format!("listen=127.0.0.1:{grpc}"),
            format!("admin_listen=127.0.0.1:{admin}"),
        ]
    };
    let apps = format!(
        "[{{id=\"{DEMO_APP}\", jwt_secret=\"{DEMO_SECRET}\", api_key=\"{DEMO_API_KEY}\"}}]"
    );

    let mut keeper = common(7000, 9000);
    keeper.push(format!("database_url={}", args.mysql));
    keeper.push(format!("apps={apps}"));
    let mut saver = common(7002, 9002);
    saver.push(format!("database_url={}", args.mysql));
    saver.push(format!("redis_url={}", args.redis));
    let mut center = common(7004, 9004);
    center.push(format!("http_listen={host}:8080"));
    let mut dispatcher = common(7006, 9006);
    dispatcher.push(format!("http_listen={host}:8070"));

    let mut specs = vec![
        spec("register", "register", &common(7001, 9001)),
        spec("saver", "saver", &saver),
        spec("coordinator", "coordinator", &common(7003, 9003)),
        spec("center", "center", &center),
        spec("dispatcher", "dispatcher", &dispatcher),
    ];
    for index in 0..args.rooms {
        let mut room = common(7010 + index, 9010 + index);
        room.push(format!("tcp_listen={host}:{}", 8090 + index));
        specs.push(spec(format!("room-{index}"), "room", &room));
    }

    let (lines, mut line_receiver) = mpsc::channel::<(String, String)>(1024);
    let mut children: Vec<(String, Child)> = Vec::new();
    let keeper_child = start(&bin_dir, &spec("keeper", "keeper", &keeper), lines.clone())?;
    children.push(("keeper".into(), keeper_child));
    // Others would wait for keeper anyway; starting it first keeps logs tidy.
    wait_for_line(
        &mut line_receiver,
        "keeper",
        " ready ",
        Duration::from_secs(30),
    )
    .await?;
    for spec in &specs {
        children.push((spec.name.clone(), start(&bin_dir, spec, lines.clone())?));
    }
    drop(lines);

    let shutdown = pushgrid_common::CancellationToken::new();
    pushgrid_common::cli::spawn_signal_handler(shutdown.clone());
    println!(
        "pushgrid cluster: push API http://{host}:8080/api/push (API key {DEMO_API_KEY}), dispatcher http://{host}:8070, rooms from {host}:8090"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            line = line_receiver.recv() => match line {
                Some((name, line)) => println!("[{name}] {line}"),
                None => break,
            },
            exited = first_exit(&mut children) => {
                tracing::error!(role = %exited, "a role exited; stopping the cluster");
                break;
            }
        }
    }
    for (name, child) in &children {
        if let Some(pid) = child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            tracing::info!(role = %name, pid, "sent SIGTERM");
        }
    }
    for (name, child) in &mut children {
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(role = %name, "did not stop in time; killing");
                let _ = child.kill().await;
            }
        }
    }
    Ok(())
}

fn start(
    bin_dir: &Path,
    spec: &Spec,
    lines: mpsc::Sender<(String, String)>,
) -> anyhow::Result<Child> {
    let binary = bin_dir.join(spec.binary);
    let mut command = Command::new(&binary);
    for setting in &spec.settings {
        command.arg("--set").arg(setting);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|error| {
        anyhow::anyhow!("cannot start {} ({}): {error}", spec.name, binary.display())
    })?;
    if let Some(stdout) = child.stdout.take() {
        let name = spec.name.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if lines.send((name.clone(), line)).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok(child)
}

async fn wait_for_line(
    receiver: &mut mpsc::Receiver<(String, String)>,
    name: &str,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some((from, line))) => {
                println!("[{from}] {line}");
                if from == name && line.contains(needle) {
                    return Ok(());
                }
            }
            Ok(None) => anyhow::bail!("{name} exited before it was ready"),
            Err(_) => anyhow::bail!("{name} was not ready within {timeout:?}"),
        }
    }
}

/// Resolves with the name of the first child that exits.
async fn first_exit(children: &mut [(String, Child)]) -> String {
    loop {
        for (name, child) in children.iter_mut() {
            if let Ok(Some(_)) = child.try_wait() {
                return name.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
