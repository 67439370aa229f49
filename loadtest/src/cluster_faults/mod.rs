//! `loadtest cluster-faults`: the fault test of issue 21 at scale. It starts
//! `pushgrid cluster` (two keepers, two savers, two centers, one register,
//! coordinator and dispatcher, and as many rooms as the devices need, at least
//! two) on a Redis of its own (a unix socket, so that it can be killed and
//! started empty) and a MySQL database of its own; connects --connections
//! devices through the worker processes (each subscribed to --topic); and
//! under a unicast and broadcast load (the `under-faults` scenario) kills -9
//! every role instance one at a time (each keeper too), waiting each time for
//! the launcher to start it again, then kills Redis and starts it empty, then
//! locks the cluster's tables in MySQL for --lock-secs. The report accounts
//! for every call (`run::under_faults`) and for the launcher's restarts; the
//! command fails when a check does not hold.
//!
//! `plan` is the fault plan; `launcher` runs and reads `pushgrid cluster`.

mod launcher;
mod plan;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};

use crate::args::{RunArgs, Scenario, ServerProc};
use crate::million::Tenant;
use crate::report::Report;
use launcher::Launcher;
use plan::{OwnRedis, Plan};

#[derive(Debug, Clone, clap::Args)]
pub struct ClusterFaultsArgs {
    /// Devices per room process (a room may hold 20,000 files); the cluster
    /// gets enough rooms for --connections, at least two.
    #[arg(long, default_value_t = 18_000)]
    pub per_room: u64,
    /// Where `pushgrid` is; default: next to this binary.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// The launcher's log and data, and Redis's socket (kept after the run).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// MySQL server; the run creates its own database on it and drops it at the end.
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
    pub mysql_server: String,
    /// Keep the run's database.
    #[arg(long)]
    pub keep_data: bool,
    /// How long the cluster's tables stay locked in the MySQL step.
    #[arg(long, default_value_t = 10)]
    pub lock_secs: u64,
    /// Lease TTL of every role in keeper.
    #[arg(long, default_value_t = 10)]
    pub lease_secs: u32,
    /// Everything stops after this many minutes, finished or not.
    #[arg(long, default_value_t = 30)]
    pub max_minutes: u64,
    #[command(flatten)]
    pub run: RunArgs,
}

pub async fn run(args: ClusterFaultsArgs) -> anyhow::Result<()> {
    let program = crate::million::bin_dir(args.bin_dir.as_deref())?.join("pushgrid");
    if !program.exists() {
        bail!(
            "{} not found: cargo build --release --workspace --bins (or pass --bin-dir)",
            program.display()
        );
    }
    let work_dir = args.work_dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("pushgrid-cluster-faults-{}", std::process::id()))
    });
    std::fs::create_dir_all(&work_dir)?;
    let tenant = Tenant::fresh();
    let redis = OwnRedis::start(&work_dir.join("redis")).await?;
    let deadline = Duration::from_secs(args.max_minutes.max(1) * 60);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut launcher = None;
    let outcome = tokio::select! {
        outcome = tokio::time::timeout(deadline, run_inner(&args, &tenant, &program, &work_dir, redis, &mut launcher)) => {
            outcome.unwrap_or_else(|_| Err(anyhow::anyhow!("stopped: --max-minutes {} reached", args.max_minutes)))
        }
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (SIGINT)")),
        _ = terminate.recv() => Err(anyhow::anyhow!("interrupted (SIGTERM)")),
    };
    if let Some(mut launcher) = launcher {
        eprintln!("stopping pushgrid cluster");
        let _ = launcher.stop(Duration::from_secs(60)).await;
    }
    if args.keep_data {
        eprintln!("kept database {}", tenant.database);
    } else if let Err(error) = tenant.drop_database(&args.mysql_server).await {
        eprintln!("dropping database {} failed: {error:#}", tenant.database);
    }
    eprintln!("launcher log and data in {}", work_dir.display());
    outcome
}

/// The `pushgrid cluster` arguments of the run.
fn launcher_args(
    args: &ClusterFaultsArgs,
    tenant: &Tenant,
    rooms: u64,
    database_url: &str,
    redis_url: &str,
    data_dir: &std::path::Path,
) -> Vec<String> {
    let apps = format!(
        "keeper:apps=[{{id=\"{}\", jwt_secret=\"{}\", api_key=\"{}\"}}]",
        tenant.app, tenant.secret, tenant.api_key
    );
    let mut launcher_args: Vec<String> = [
        "cluster",
        "--ephemeral-ports",
        "--admin-listen",
        "127.0.0.1:0",
        "--restart-backoff-ms",
        "100",
        "--restart-backoff-max-ms",
        "1000",
        "--stop-grace-secs",
        "10",
        "--keepers",
        "2",
        "--savers",
        "2",
        "--centers",
        "2",
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    launcher_args.extend([
        "--rooms".to_owned(),
        rooms.to_string(),
        "--mysql".to_owned(),
        database_url.to_owned(),
        "--redis".to_owned(),
        redis_url.to_owned(),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--role-set".to_owned(),
        apps,
        "--role-set".to_owned(),
        format!("all:lease_ttl_secs={}", args.lease_secs.max(3)),
    ]);
    launcher_args
}

async fn run_inner(
    args: &ClusterFaultsArgs,
    tenant: &Tenant,
    program: &std::path::Path,
    work_dir: &std::path::Path,
    redis: OwnRedis,
    slot: &mut Option<Launcher>,
) -> anyhow::Result<()> {
    let per_room = args.per_room.clamp(1, 18_000);
    let rooms = args.run.connections.div_ceil(per_room).max(2);
    let database_url = format!("{}/{}", args.mysql_server, tenant.database);
    let launcher_args = launcher_args(
        args,
        tenant,
        rooms,
        &database_url,
        &redis.url(),
        &work_dir.join("data"),
    );
    eprintln!(
        "starting pushgrid cluster: 2 keepers, 2 savers, 2 centers, {rooms} rooms (log in {})",
        work_dir.join("launcher.log").display()
    );
    let launcher = slot
        .insert(Launcher::start(program, &launcher_args, &work_dir.join("launcher.log")).await?);
    let run = run_args(args, tenant, launcher, rooms)?;
    start_stream(&run).await?;
    let servers = servers(launcher);
    let kills = plan::kill_order(&launcher.names());
    let mut plan = Plan::new(launcher, &kills, redis, &database_url, args.lock_secs);
    let mut report =
        crate::run::run(Scenario::UnderFaults, run.clone(), servers, Some(&mut plan)).await?;
    let failures = launcher_checks(&plan, &kills, &mut report).await;
    report.cluster["rooms"] = json!(rooms);
    report.cluster["per_room"] = json!(per_room);
    report.cluster["mysql_database"] = json!(tenant.database);
    report.cluster["lease_secs"] = json!(args.lease_secs);
    report.cluster["lock_secs"] = json!(args.lock_secs);
    println!("{}", report.table());
    std::fs::write(&run.json, serde_json::to_vec_pretty(&report)?)?;
    eprintln!("JSON report: {}", run.json);
    if !failures.is_empty() {
        bail!("checks failed: {failures:?}");
    }
    Ok(())
}

/// The run's arguments: the cluster's rooms and centers, the run's app.
fn run_args(
    args: &ClusterFaultsArgs,
    tenant: &Tenant,
    launcher: &Launcher,
    rooms: u64,
) -> anyhow::Result<RunArgs> {
    let mut run = args.run.clone();
    run.rooms = (0..rooms)
        .map(|index| launcher.addr(&format!("room-{index}"), "tcp"))
        .collect::<anyhow::Result<_>>()?;
    run.api = format!("http://{}", launcher.addr("center-0", "http")?);
    run.more_apis = vec![format!("http://{}", launcher.addr("center-1", "http")?)];
    run.app = tenant.app.clone();
    run.jwt_secret = tenant.secret.clone();
    run.api_key = tenant.api_key.clone();
    run.per_worker = args.per_room.clamp(1, 18_000) as u32;
    run.user_prefix = None;
    run.discover_servers = false;
    Ok(run)
}

/// Every role instance running now, to measure.
fn servers(launcher: &Launcher) -> Vec<ServerProc> {
    launcher
        .names()
        .into_iter()
        .map(|name| {
            let instance = launcher.instance(&name);
            let room_index = name
                .strip_prefix("room-")
                .and_then(|index| index.parse().ok());
            ServerProc {
                pid: instance.pid,
                role: name,
                room_index,
            }
        })
        .filter(|server| server.pid > 0)
        .collect()
}

/// Every fault step was carried out, and the launcher brought every killed
/// instance back exactly once (its restart counter and each instance's
/// starts). Puts the cluster's figures into the report; every failed check
/// of the run, in words.
async fn launcher_checks(plan: &Plan<'_>, kills: &[String], report: &mut Report) -> Vec<Value> {
    let restarts = plan.restarts_metric().await;
    let mut failures: Vec<Value> = report.under_faults["failures"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if restarts != Some(kills.len() as f64) {
        failures.push(json!(format!(
            "the launcher counted {restarts:?} restarts for {} kills",
            kills.len()
        )));
    }
    for step in &report.faults {
        if let Some(error) = step["error"].as_str() {
            failures.push(json!(format!("{}: {error}", step["fault"])));
        }
    }
    for name in kills {
        let starts = plan.launcher().instance(name).starts;
        if starts != 2 {
            failures.push(json!(format!("{name} was started {starts} times, not 2")));
        }
    }
    report.under_faults["failures"] = Value::Array(failures.clone());
    report.cluster = json!({
        "launcher": "pushgrid cluster",
        "keepers": 2, "savers": 2, "centers": 2,
        "store": "redis (own, unix socket) + mysql",
        "launcher_restarts_total": restarts,
        "killed": kills,
        "broadcast_metrics": plan.broadcast_metrics().await,
    });
    failures
}

/// One broadcast before the devices connect, so that the topic's stream has
/// an epoch when they subscribe (a SUB from an empty stream's position reads
/// as a first subscription after a reconnect).
async fn start_stream(run: &RunArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let answer = http
        .post(format!("{}/api/broadcast", run.api))
        .header("Authorization", format!("apikey {}", run.api_key))
        .json(&json!({ "topic": run.topic, "payload": "stream start" }))
        .send()
        .await?;
    if !answer.status().is_success() {
        bail!("the first broadcast was answered {}", answer.status());
    }
    Ok(())
}
