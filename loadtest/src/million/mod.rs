//! `loadtest million`: one command that starts a cluster sized for the target
//! (keeper, register, saver, coordinator and center as their own processes on
//! the real Redis and MySQL, plus one `room` process per --per-room devices),
//! runs the scenarios against it, reports, and then stops every process it
//! started, drops the MySQL database it created and deletes its app's Redis keys.
//!
//! Each run gets an app of its own (random id, secret and API key) and a fresh
//! database `pg_lt_<hex>`, so it never mixes with other clusters on the same
//! Redis and MySQL servers.

//!
//! `cluster` starts the processes (through `processes`), `fault` kills and
//! restarts them for --faults; this module runs the scenarios on them.

mod cluster;
mod fault;
mod processes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use crate::args::{RunArgs, Scenario, ServerProc};
use cluster::{Cluster, start_cluster};
use fault::ClusterFault;
use processes::{Started, register_sessions, stop_all};

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
    /// center processes: the run calls the first; every center takes a
    /// share of each broadcast's fan-out to the rooms.
    #[arg(long, default_value_t = 1)]
    pub centers: u32,
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

/// The run's own app and database (also `loadtest cluster-faults`).
pub(crate) struct Tenant {
    pub app: String,
    pub secret: String,
    pub api_key: String,
    pub database: String,
}

impl Tenant {
    pub(crate) fn fresh() -> Tenant {
        let tag = format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
        Tenant {
            app: format!("lt{tag}"),
            secret: format!("lt-secret-{:032x}", rand::random::<u128>()),
            api_key: format!("lt-key-{:032x}", rand::random::<u128>()),
            database: format!("pg_lt_{tag}"),
        }
    }

    /// Drops the run's database on MySQL server `server`.
    pub(crate) async fn drop_database(&self, server: &str) -> anyhow::Result<()> {
        let database = &self.database;
        let pool = pushgrid_common::db::connect(&format!("{server}/{database}"), 1).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS `{database}`"
        )))
        .execute(&pool)
        .await?;
        pool.close().await;
        Ok(())
    }
}

/// Where the role binaries are: `given`, or the directory of this binary.
pub(crate) fn bin_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    match given {
        Some(dir) => Ok(dir.to_path_buf()),
        None => Ok(std::env::current_exe()?
            .parent()
            .context("binary directory")?
            .to_path_buf()),
    }
}

pub async fn run(args: MillionArgs) -> anyhow::Result<()> {
    let bin_dir = bin_dir(args.bin_dir.as_deref())?;
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
    tenant.drop_database(&args.mysql_server).await?;
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

async fn run_inner(
    args: &MillionArgs,
    tenant: &Tenant,
    bin_dir: &Path,
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<()> {
    let cluster = start_cluster(args, tenant, bin_dir, log_dir, processes).await?;
    for (position, scenario) in args.scenarios.iter().enumerate() {
        if position > 0 {
            // The previous scenario's devices just left: let register take
            // their Offline batches (a million of them) before new devices
            // connect, so the next ramp measures connects, not the backlog.
            let until = tokio::time::Instant::now() + Duration::from_secs(300);
            let mut left = register_sessions(processes).await.unwrap_or(0);
            while left > 0 && tokio::time::Instant::now() < until {
                // Polls register's metrics, once a second, until the deadline.
                tokio::time::sleep(Duration::from_secs(1)).await;
                left = register_sessions(processes).await.unwrap_or(0);
            }
            eprintln!("register holds {left} sessions of the previous scenario");
        }
        let step = Step {
            args,
            tenant,
            cluster: &cluster,
            log_dir,
            scenario: *scenario,
            position,
        };
        step.run(processes).await?;
    }
    Ok(())
}

/// One scenario of the run on the started cluster.
struct Step<'a> {
    args: &'a MillionArgs,
    tenant: &'a Tenant,
    cluster: &'a Cluster,
    log_dir: &'a Path,
    scenario: Scenario,
    /// Its place in --scenarios.
    position: usize,
}

impl Step<'_> {
    /// The scenario's arguments: the cluster's rooms, API and app.
    fn run_args(&self) -> RunArgs {
        let (args, cluster, scenario) = (self.args, self.cluster, self.scenario);
        let mut run = args.run.clone();
        run.rooms = cluster.rooms.clone();
        run.api = format!("http://{}", cluster.center);
        run.app = self.tenant.app.clone();
        run.jwt_secret = self.tenant.secret.clone();
        run.api_key = self.tenant.api_key.clone();
        run.per_worker = cluster.per_room as u32;
        if args.ramp_rate > 0 {
            run.connect_rate = args.ramp_rate.div_ceil(cluster.rooms.len() as u32).max(1);
        }
        run.user_prefix = None;
        run.discover_servers = false;
        if args.scenarios.len() > 1 {
            run.json =
                format!("{}.{scenario:?}.json", run.json.trim_end_matches(".json")).to_lowercase();
        }
        run
    }

    /// Runs the scenario with --faults, prints its table and writes its report.
    async fn run(&self, processes: &mut Vec<Started>) -> anyhow::Result<()> {
        let (args, cluster) = (self.args, self.cluster);
        // Taken again per scenario: a --fault replaces processes.
        let servers: Vec<ServerProc> = processes
            .iter()
            .enumerate()
            .map(|(index, process)| ServerProc {
                pid: process.pid,
                role: process.role.clone(),
                room_index: index.checked_sub(cluster.first_room),
            })
            .collect();
        let run = self.run_args();
        eprintln!(
            "scenario {:?}: {} devices on {} rooms",
            self.scenario,
            run.connections,
            cluster.rooms.len()
        );
        let mut injector = ClusterFault {
            kinds: &args.faults,
            processes,
            log_dir: self.log_dir,
        };
        let fault =
            (!args.faults.is_empty()).then_some(&mut injector as &mut dyn crate::run::Fault);
        let mut report = crate::run::run(self.scenario, run.clone(), servers, fault).await?;
        if !args.faults.is_empty() {
            report.notes.push(
                "the fault restarted processes: rows marked (gone) are the killed ones, their successors are not measured".into(),
            );
        }
        if self.position > 0 {
            report.notes.push(
                "the rooms held the previous scenario's connections: their RSS growth here is not memory per connection (see the first scenario)".into(),
            );
        }
        report.cluster = json!({
            "store": "redis + mysql",
            "redis": args.redis,
            "mysql_database": self.tenant.database,
            "app": self.tenant.app,
            "rooms": cluster.rooms.len(),
            "per_room": cluster.per_room,
            "log_dir": self.log_dir.display().to_string(),
        });
        println!("{}", report.table());
        std::fs::write(&run.json, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("JSON report: {}", run.json);
        Ok(())
    }
}
