//! `loadtest million`: one command that starts a cluster sized for the target
//! (keeper, register, saver, coordinator and center as their own processes on
//! the real Redis and MySQL, plus one `room` process per --per-room devices),
//! runs the scenarios against it, reports, and then stops every process it
//! started, drops the MySQL database it created and deletes its app's Redis keys.
//!
//! Each run gets an app of its own (random id, secret and API key) and a fresh
//! database `pg_lt_<hex>`, so it never mixes with other clusters on the same
//! Redis and MySQL servers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
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
    /// Where the role binaries (keeper, register, saver, coordinator, center,
    /// room) are; default: next to this binary.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Logs of the started processes (kept after the run).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Redis for the saver's hot inboxes and topic streams.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// MySQL server; the run creates its own database on it and drops it at the end.
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub mysql_server: String,
    /// Keep the run's database and Redis keys (to inspect them afterwards).
    #[arg(long)]
    pub keep_data: bool,
    /// Heartbeat the rooms ask for (long, so an idle hold costs no pings).
    #[arg(long, default_value_t = 600)]
    pub heartbeat_secs: u32,
    /// New connections per second across all workers (each worker gets its
    /// share); overrides --connect-rate. 0: use --connect-rate per worker.
    /// About 2,000/s is what this 2-core machine sustained for a whole cluster.
    #[arg(long, default_value_t = 2000)]
    pub ramp_rate: u32,
    /// Lease TTL of every started role in keeper. The default of the roles
    /// (10 s) is too tight when 60 processes share 2 cores: a register that
    /// misses its heartbeat drops out of every room's view (see docs/benchmarks.md).
    #[arg(long, default_value_t = 30)]
    pub lease_secs: u32,
    /// Everything stops after this many minutes, finished or not.
    #[arg(long, default_value_t = 30)]
    pub max_minutes: u64,
    /// Faults to inject one after the other in every scenario, after the hold
    /// and before the pushes: `kill-register` (kill -9 and restart: every
    /// session must come back) and `kill-rooms` (kill -9 of every room,
    /// restarted on the same address: a reconnect storm of every device, with
    /// no stale session left in register).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub faults: Vec<FaultKind>,
    /// Extra `--set key=value` for every room.
    #[arg(long = "room-set")]
    pub room_set: Vec<String>,
    /// Extra `--set key=value` for the saver.
    #[arg(long = "saver-set")]
    pub saver_set: Vec<String>,
    /// Extra `--set key=value` for center.
    #[arg(long = "center-set")]
    pub center_set: Vec<String>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FaultKind {
    KillRegister,
    KillRooms,
}

/// The roles started before the rooms, in start order: (process name, binary).
const ROLES: [(&str, &str); 5] = [
    ("keeper", "keeper"),
    ("register", "register"),
    ("saver", "saver"),
    ("coordinator", "coordinator"),
    ("center", "center"),
];

struct Started {
    name: String,
    role: String,
    program: PathBuf,
    settings: Vec<String>,
    child: Child,
    pid: u32,
    bound: Arc<Mutex<HashMap<String, String>>>,
}

impl Started {
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
async fn start(
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
async fn stop_all(processes: &mut Vec<Started>) {
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

/// The run's own app and database.
struct Tenant {
    app: String,
    secret: String,
    api_key: String,
    database: String,
}

impl Tenant {
    fn fresh() -> Tenant {
        let tag = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        Tenant {
            app: format!("lt{tag}"),
            secret: format!("lt-secret-{:032x}", rand::random::<u128>()),
            api_key: format!("lt-key-{:032x}", rand::random::<u128>()),
            database: format!("pg_lt_{tag}"),
        }
    }
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
    let tenant = Tenant::fresh();
    let mut processes = Vec::new();
    let deadline = Duration::from_secs(args.max_minutes.max(1) * 60);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(deadline, run_inner(&args, &tenant, &bin_dir, &log_dir, &mut processes)) => {
            outcome.unwrap_or_else(|_| Err(anyhow::anyhow!("stopped: --max-minutes {} reached", args.max_minutes)))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
        _ = terminate.recv() => Err(anyhow::anyhow!("interrupted (SIGTERM)")),
    };
    eprintln!(
        "stopping the {} processes started for the run",
        processes.len()
    );
    stop_all(&mut processes).await;
    if args.keep_data {
        eprintln!(
            "kept database {} and the Redis keys of app {}",
            tenant.database, tenant.app
        );
    } else {
        match drop_data(&args, &tenant).await {
            Ok(keys) => eprintln!(
                "dropped database {} and {keys} Redis keys of app {}",
                tenant.database, tenant.app
            ),
            Err(error) => eprintln!("cleaning up the run's data failed: {error:#}"),
        }
    }
    eprintln!("logs in {}", log_dir.display());
    outcome
}

/// Drops the run's database and deletes its app's Redis keys (inboxes, topic
/// streams, groups: `pg:{<app>:..}`, `pg:{bc:<app>:..}`, `pg:{g:<app>:..}`).
async fn drop_data(args: &MillionArgs, tenant: &Tenant) -> anyhow::Result<u64> {
    let pool =
        pushgrid_common::db::connect(&format!("{}/{}", args.mysql_server, tenant.database), 1)
            .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS `{}`",
        tenant.database
    )))
    .execute(&pool)
    .await?;
    pool.close().await;

    let client = redis::Client::open(args.redis.as_str())?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let mut deleted = 0u64;
    for pattern in [
        format!("pg:{{{}:*", tenant.app),
        format!("pg:{{bc:{}:*", tenant.app),
        format!("pg:{{g:{}:*", tenant.app),
    ] {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut connection)
                .await?;
            if !keys.is_empty() {
                let removed: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut connection)
                    .await?;
                deleted += removed;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(deleted)
}

fn binary(bin_dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: cargo build --release --workspace --bins (or pass --bin-dir)",
            path.display()
        );
    }
    Ok(path)
}

async fn run_inner(
    args: &MillionArgs,
    tenant: &Tenant,
    bin_dir: &Path,
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<()> {
    let per_room = args.per_room.clamp(1, 18_000);
    let rooms_needed = args.run.connections.div_ceil(per_room) as usize;
    let room_bin = binary(bin_dir, "room")?;
    let mut role_bins = Vec::new();
    for (name, bin) in ROLES {
        role_bins.push((name, binary(bin_dir, bin)?));
    }
    eprintln!(
        "starting keeper, register, saver, coordinator, center and {rooms_needed} rooms on {} + {}/{} (logs in {})",
        args.redis,
        args.mysql_server,
        tenant.database,
        log_dir.display()
    );
    let database_url = format!("{}/{}", args.mysql_server, tenant.database);
    let lease = format!("lease_ttl_secs={}", args.lease_secs.max(3));
    // The cluster credentials every role needs, as `pushgrid cluster` makes them.
    let credentials = log_dir.join("credentials");
    pushgrid_common::auth::init_dir(&credentials)?;
    let credentials = format!("credentials_dir={}", credentials.display());
    let node = |keeper: &str| {
        vec![
            format!("keeper={keeper}"),
            "listen=127.0.0.1:0".to_owned(),
            "admin_listen=127.0.0.1:0".to_owned(),
            lease.clone(),
            credentials.clone(),
        ]
    };

    let mut keeper_settings = node("127.0.0.1:1");
    keeper_settings.push(format!("database_url={database_url}"));
    keeper_settings.push("http_listen=127.0.0.1:0".into());
    keeper_settings.push(format!(
        "apps=[{{id=\"{}\", jwt_secret=\"{}\", api_key=\"{}\"}}]",
        tenant.app, tenant.secret, tenant.api_key
    ));
    processes.push(
        start(
            "keeper",
            "keeper",
            &role_bins[0].1,
            &keeper_settings,
            log_dir,
        )
        .await?,
    );
    let keeper = processes[0]
        .wait_bound("keeper grpc", Duration::from_secs(60))
        .await?;
    processes[0]
        .wait_bound("keeper ready", Duration::from_secs(60))
        .await?;

    for (name, bin) in role_bins.iter().skip(1) {
        let mut settings = node(&keeper);
        match *name {
            "saver" => {
                settings.push(format!("database_url={database_url}"));
                settings.push(format!("redis_url={}", args.redis));
                settings.extend(args.saver_set.iter().cloned());
            }
            "center" => {
                settings.push("http_listen=127.0.0.1:0".into());
                settings.extend(args.center_set.iter().cloned());
            }
            _ => {}
        }
        let mut process = start(name, name, bin, &settings, log_dir).await?;
        process
            .wait_bound(&format!("{name} ready"), Duration::from_secs(60))
            .await?;
        processes.push(process);
    }
    let center = processes
        .iter()
        .find(|process| process.name == "center")
        .and_then(|process| process.bound("center http"))
        .context("center http address")?;

    let first_room = processes.len();
    for index in 0..rooms_needed {
        let mut settings = node(&keeper);
        settings.extend([
            "tcp_listen=127.0.0.1:0".to_owned(),
            format!("heartbeat_secs={}", args.heartbeat_secs),
            format!("node_id=lt-room-{index}"),
            // Dozens of rooms share the machine: one shard thread each.
            "io_threads=1".to_owned(),
        ]);
        settings.extend(args.room_set.iter().cloned());
        processes.push(
            start(
                &format!("room-{index}"),
                "room",
                &room_bin,
                &settings,
                log_dir,
            )
            .await?,
        );
    }
    let mut rooms = Vec::new();
    for process in processes.iter_mut().skip(first_room) {
        rooms.push(
            process
                .wait_bound("room tcp", Duration::from_secs(60))
                .await?,
        );
        process
            .wait_bound("room ready", Duration::from_secs(60))
            .await?;
    }
    wait_for_rooms(&center, &tenant.api_key, rooms_needed).await?;

    for (position, scenario) in args.scenarios.iter().enumerate() {
        if position > 0 {
            // The previous scenario's devices just left: let register take
            // their Offline batches (a million of them) before new devices
            // connect, so the next ramp measures connects, not the backlog.
            let until = tokio::time::Instant::now() + Duration::from_secs(300);
            let mut left = register_sessions(processes).await.unwrap_or(0);
            while left > 0 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_secs(1)).await;
                left = register_sessions(processes).await.unwrap_or(0);
            }
            eprintln!("register holds {left} sessions of the previous scenario");
        }
        // Taken again per scenario: a --fault replaces processes.
        let servers: Vec<ServerProc> = processes
            .iter()
            .enumerate()
            .map(|(index, process)| ServerProc {
                pid: process.pid,
                role: process.role.clone(),
                room_index: index.checked_sub(first_room),
            })
            .collect();
        let mut run = args.run.clone();
        run.rooms = rooms.clone();
        run.api = format!("http://{center}");
        run.app = tenant.app.clone();
        run.jwt_secret = tenant.secret.clone();
        run.api_key = tenant.api_key.clone();
        run.per_worker = per_room as u32;
        if args.ramp_rate > 0 {
            run.connect_rate = args.ramp_rate.div_ceil(rooms_needed as u32).max(1);
        }
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
        let mut injector = ClusterFault {
            kinds: &args.faults,
            processes: &mut *processes,
            log_dir,
        };
        let fault =
            (!args.faults.is_empty()).then_some(&mut injector as &mut dyn crate::run::Fault);
        let mut report = crate::run::run(*scenario, run.clone(), servers, fault).await?;
        if !args.faults.is_empty() {
            report.notes.push(
                "the fault restarted processes: rows marked (gone) are the killed ones, their successors are not measured".into(),
            );
        }
        if position > 0 {
            report.notes.push(
                "the rooms held the previous scenario's connections: their RSS growth here is not memory per connection (see the first scenario)".into(),
            );
        }
        report.cluster = json!({
            "store": "redis + mysql",
            "redis": args.redis,
            "mysql_database": tenant.database,
            "app": tenant.app,
            "rooms": rooms.len(),
            "per_room": per_room,
            "log_dir": log_dir.display().to_string(),
        });
        println!("{}", report.table());
        std::fs::write(&run.json, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("JSON report: {}", run.json);
    }
    Ok(())
}

/// `--faults`: kills processes of the run's cluster with SIGKILL and starts
/// them again with the same settings.
struct ClusterFault<'a> {
    kinds: &'a [FaultKind],
    processes: &'a mut Vec<Started>,
    log_dir: &'a Path,
}

impl ClusterFault<'_> {
    async fn kill_and_restart(
        &mut self,
        index: usize,
        settings: Vec<String>,
    ) -> anyhow::Result<()> {
        let process = &mut self.processes[index];
        let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
        let _ = process.child.wait().await;
        let (name, role, program) = (
            process.name.clone(),
            process.role.clone(),
            process.program.clone(),
        );
        let mut restarted = start(&name, &role, &program, &settings, self.log_dir).await?;
        restarted
            .wait_bound(&format!("{role} ready"), Duration::from_secs(60))
            .await?;
        self.processes[index] = restarted;
        Ok(())
    }

    async fn inject_now(&mut self, kind: FaultKind) -> anyhow::Result<Value> {
        let started = tokio::time::Instant::now();
        let mut restarted = Vec::new();
        match kind {
            FaultKind::KillRegister => {
                let index = self
                    .processes
                    .iter()
                    .position(|process| process.role == "register")
                    .context("no register")?;
                let settings = self.processes[index].settings.clone();
                self.kill_and_restart(index, settings).await?;
                restarted.push(self.processes[index].pid);
            }
            FaultKind::KillRooms => {
                let rooms: Vec<usize> = (0..self.processes.len())
                    .filter(|index| self.processes[*index].role == "room")
                    .collect();
                // Every room at once, then each back on the address its
                // devices know (the listener takes the port again with
                // SO_REUSEADDR).
                let mut addresses = Vec::new();
                for index in &rooms {
                    let process = &self.processes[*index];
                    let tcp = process.bound("room tcp").context("room tcp address")?;
                    let _ = kill(Pid::from_raw(process.pid as i32), Signal::SIGKILL);
                    addresses.push(tcp);
                }
                for (index, tcp) in rooms.iter().zip(addresses) {
                    let mut settings: Vec<String> = self.processes[*index]
                        .settings
                        .iter()
                        .filter(|setting| !setting.starts_with("tcp_listen="))
                        .cloned()
                        .collect();
                    settings.push(format!("tcp_listen={tcp}"));
                    self.kill_and_restart(*index, settings).await?;
                    restarted.push(self.processes[*index].pid);
                }
            }
        }
        Ok(json!({
            "fault": match kind {
                FaultKind::KillRegister => "kill -9 of register, restarted",
                FaultKind::KillRooms => "kill -9 of every room, restarted on the same addresses",
            },
            "restarted_pids": restarted,
            "restart_secs": started.elapsed().as_secs_f64(),
        }))
    }

    async fn sessions_now(&self) -> anyhow::Result<u64> {
        register_sessions(&self.processes[..]).await
    }
}

/// Sessions the run's register instances hold (`pushgrid_register_sessions`).
async fn register_sessions(processes: &[Started]) -> anyhow::Result<u64> {
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

impl crate::run::Fault for ClusterFault<'_> {
    fn count(&self) -> usize {
        self.kinds.len()
    }

    fn inject(&mut self, step: usize) -> futures::future::BoxFuture<'_, anyhow::Result<Value>> {
        let kind = self.kinds[step];
        Box::pin(self.inject_now(kind))
    }

    fn sessions(&mut self) -> futures::future::BoxFuture<'_, anyhow::Result<u64>> {
        Box::pin(self.sessions_now())
    }
}

/// Waits until center's view holds every room (keeper has pushed them).
async fn wait_for_rooms(center: &str, api_key: &str, count: usize) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut seen = 0;
    for _ in 0..600 {
        let answer = http
            .post(format!("http://{center}/api/info"))
            .header("Authorization", format!("apikey {api_key}"))
            .json(&json!({}))
            .send()
            .await;
        if let Ok(answer) = answer
            && let Ok(body) = answer.json::<Value>().await
        {
            // An API key sees the nodes' roles (not their addresses).
            seen = body["result"]["nodes"].as_array().map_or(0, |nodes| {
                nodes.iter().filter(|node| node["role"] == "room").count()
            });
            if seen >= count {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("center lists {seen} of {count} rooms after 60 s")
}
