//! `pushgrid cluster`: the seven roles as separate OS processes against Redis
//! and MySQL, on the fixed ports of the docker compose file (or every
//! listener on port 0 with `--ephemeral-ports`). Keepers start first; every
//! child's output is forwarded with its instance name.
//!
//! The launcher supervises (`supervise.rs`): a role that exits, crashes or is
//! killed is started again after a back-off, on the addresses it had, and
//! counted in `pushgrid_launcher_restarts_total{instance}` on the launcher's
//! admin port. Only SIGINT/SIGTERM stops the cluster: rooms, then the other
//! roles, then keepers get SIGTERM and drain.
//!
//! The cluster credentials (a key per role, the verifiers, the admin token)
//! are created in `<data dir>/credentials` on the first start (mode 0600)
//! and every child is pointed at them with `credentials_dir`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use pushgrid_common::{CancellationToken, net, telemetry};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::dev::{DEMO_API_KEY, DEMO_APP, DEMO_SECRET};
use crate::supervise::{Backoff, Instance, Line, supervise};

/// Most instances of keeper, register, saver and center on fixed ports.
const MAX_INSTANCES: u16 = 10;
/// Most rooms on fixed ports (7010 + n must stay below 7200).
const MAX_ROOMS: u16 = 190;

#[derive(Debug, clap::Args)]
pub struct ClusterArgs {
    /// Redis for the hot inbox.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// MySQL database for apps, leases and the durable message copy (created if missing).
    #[arg(long, default_value = "mysql://root@127.0.0.1:3306/pushgrid")]
    mysql: String,
    /// Number of room processes (ports 8090, 8091, ...).
    #[arg(long, default_value_t = 1)]
    rooms: u16,
    /// Number of keeper processes (gRPC 7000, then 7210, 7220, ...).
    #[arg(long, default_value_t = 1)]
    keepers: u16,
    /// Number of register processes (users are split between them).
    #[arg(long, default_value_t = 1)]
    registers: u16,
    /// Number of saver processes.
    #[arg(long, default_value_t = 1)]
    savers: u16,
    /// Number of center processes (push API 8080, then 8181, 8182, ...).
    #[arg(long, default_value_t = 1)]
    centers: u16,
    /// Address the public listeners bind to.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Every listener on port 0 (the kernel picks; each role prints what it
    /// bound); a restarted role comes back on the ports it had.
    #[arg(long)]
    ephemeral_ports: bool,
    /// An extra setting for every instance of one role, `ROLE:KEY=VALUE`
    /// (ROLE: keeper, register, saver, coordinator, center, dispatcher, room,
    /// or `all`), e.g. `room:heartbeat_secs=60`. Repeatable; applied last.
    #[arg(long = "role-set", value_name = "ROLE:KEY=VALUE")]
    role_sets: Vec<String>,
    /// The launcher's own admin listener (`/metrics`, `/healthz`).
    #[arg(long, default_value = "127.0.0.1:9099")]
    admin_listen: String,
    /// First wait before a role that exited is started again (doubles each time).
    #[arg(long, default_value_t = 250)]
    restart_backoff_ms: u64,
    /// Longest wait before a restart.
    #[arg(long, default_value_t = 10_000)]
    restart_backoff_max_ms: u64,
    /// How long a role may drain after SIGTERM at stop before it is killed.
    #[arg(long, default_value_t = 20)]
    stop_grace_secs: u64,
    /// Directory holding the role binaries; defaults to this binary's own.
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where the cluster credentials are kept (`<data dir>/credentials`).
    #[arg(long, default_value = "pushgrid-data")]
    data_dir: PathBuf,
}

/// The listen settings of one instance.
struct Ports {
    grpc: String,
    admin: String,
    /// keeper: admin API; center: push API; dispatcher: dispatch API.
    http: Option<String>,
    /// room: device TCP.
    tcp: Option<String>,
}

/// Role kinds in start order after keepers, with their offset in the block
/// of extra instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Keeper,
    Register,
    Saver,
    Coordinator,
    Center,
    Dispatcher,
    Room,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Keeper,
        Kind::Register,
        Kind::Saver,
        Kind::Coordinator,
        Kind::Center,
        Kind::Dispatcher,
        Kind::Room,
    ];

    fn binary(self) -> &'static str {
        match self {
            Kind::Keeper => "keeper",
            Kind::Register => "register",
            Kind::Saver => "saver",
            Kind::Coordinator => "coordinator",
            Kind::Center => "center",
            Kind::Dispatcher => "dispatcher",
            Kind::Room => "room",
        }
    }

    /// The fixed ports of instance `index`: the compose file's ports for the
    /// first instance of each role, `7200 + 10 * index + offset` (gRPC) and
    /// `9200 + ...` (admin) for further keepers, registers, savers and centers.
    fn fixed_ports(self, index: u16, host: &str) -> Ports {
        let local = |port: u16| format!("127.0.0.1:{port}");
        let public = |port: u16| format!("{host}:{port}");
        let offset = match self {
            Kind::Keeper => 0,
            Kind::Register => 1,
            Kind::Saver => 2,
            Kind::Coordinator => 3,
            Kind::Center => 4,
            Kind::Dispatcher => 6,
            Kind::Room => 10,
        };
        let (grpc, admin) = match (self, index) {
            (Kind::Room, n) => (7010 + n, 9010 + n),
            (_, 0) => (7000 + offset, 9000 + offset),
            (_, n) => (7200 + 10 * n + offset, 9200 + 10 * n + offset),
        };
        let http = match (self, index) {
            (Kind::Keeper, 0) => Some(local(7080)),
            (Kind::Keeper, n) => Some(local(7180 + n)),
            (Kind::Center, 0) => Some(public(8080)),
            (Kind::Center, n) => Some(public(8180 + n)),
            (Kind::Dispatcher, _) => Some(public(8070)),
            _ => None,
        };
        let tcp = (self == Kind::Room).then(|| public(8090 + index));
        Ports {
            grpc: local(grpc),
            admin: local(admin),
            http,
            tcp,
        }
    }

    fn ephemeral_ports(self, host: &str) -> Ports {
        let public = format!("{host}:0");
        Ports {
            grpc: "127.0.0.1:0".into(),
            admin: "127.0.0.1:0".into(),
            http: matches!(self, Kind::Keeper | Kind::Center | Kind::Dispatcher).then(|| {
                if self == Kind::Keeper {
                    "127.0.0.1:0".into()
                } else {
                    public.clone()
                }
            }),
            tcp: (self == Kind::Room).then_some(public),
        }
    }
}

/// `ROLE:KEY=VALUE` settings that apply to `kind`.
fn extra_settings(role_sets: &[String], kind: Kind) -> anyhow::Result<Vec<String>> {
    let mut settings = Vec::new();
    for entry in role_sets {
        let Some((role, setting)) = entry.split_once(':') else {
            anyhow::bail!("--role-set {entry:?}: expected ROLE:KEY=VALUE");
        };
        if !setting.contains('=') {
            anyhow::bail!("--role-set {entry:?}: expected ROLE:KEY=VALUE");
        }
        let known = [
            "all",
            "keeper",
            "register",
            "saver",
            "coordinator",
            "center",
            "dispatcher",
            "room",
        ];
        if !known.contains(&role) {
            anyhow::bail!(
                "--role-set {entry:?}: unknown role {role:?} (one of {})",
                known.join(", ")
            );
        }
        if role == "all" || role == kind.binary() {
            settings.push(setting.to_string());
        }
    }
    Ok(settings)
}

/// Every role finds its cluster credentials (the launcher's directory, or
/// the `credentials_dir` a `--role-set` gives it), or the launcher refuses to
/// start anything and says what to set: a role without them would exit at
/// once, and be started again forever.
fn check_credentials(role_sets: &[String], credentials_dir: &Path) -> anyhow::Result<()> {
    for kind in Kind::ALL {
        let dir = extra_settings(role_sets, kind)?
            .iter()
            .filter_map(|setting| setting.split_once('='))
            .filter(|(key, _)| key.trim() == "credentials_dir")
            .map(|(_, value)| setting_text(value))
            .next_back()
            .unwrap_or_else(|| credentials_dir.display().to_string());
        let role = pushgrid_common::auth::role_by_name(kind.binary())
            .ok_or_else(|| anyhow::anyhow!("{} has no cluster role", kind.binary()))?;
        pushgrid_common::auth::Credentials::for_node(role, &dir).map_err(|error| {
            anyhow::anyhow!("pushgrid cluster: {} cannot start: {error}", kind.binary())
        })?;
    }
    Ok(())
}

/// A `--role-set` value as the role reads it: TOML when it parses as TOML
/// (a quoted string), else the text itself.
fn setting_text(raw: &str) -> String {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .and_then(|value| value.as_str().map(str::to_string))
        .unwrap_or_else(|| raw.to_string())
}

/// Starts keepers, then the other roles pointed at them, supervises every
/// instance until SIGINT/SIGTERM, then stops rooms, the other roles and
/// keepers in that order.
pub async fn run(args: ClusterArgs) -> anyhow::Result<()> {
    telemetry::init_tracing(false);
    let bin_dir = bin_dir(&args)?;
    check_counts(&args)?;
    std::fs::create_dir_all(&args.data_dir)?;
    let credentials_dir = crate::dev::ensure_credentials(&args.data_dir.canonicalize()?)?;
    check_credentials(&args.role_sets, &credentials_dir)?;
    let plan = Plan {
        args: &args,
        bin_dir,
        credentials_dir: &credentials_dir,
    };

    let admin = net::bind(&args.admin_listen).await?;
    let admin_addr = admin.local_addr()?;
    net::announce("cluster", "admin", admin_addr);
    let shutdown = CancellationToken::new();
    pushgrid_common::cli::spawn_signal_handler(shutdown.clone());

    // Keepers first: the other roles are told their addresses.
    let (lines, line_receiver) = mpsc::channel::<Line>(1024);
    let printer = tokio::spawn(print_lines(line_receiver));
    let starter = Starter::new(&args, lines, &shutdown);
    let stop_keepers = CancellationToken::new();
    let stop_roles = CancellationToken::new();
    let stop_rooms = CancellationToken::new();
    let mut keeper_tasks = JoinSet::new();
    let mut keepers = Vec::new();
    for index in 0..args.keepers {
        let keeper = plan.instance(Kind::Keeper, format!("keeper-{index}"), index, None)?;
        starter.start(&keeper, stop_keepers.clone(), &mut keeper_tasks);
        keepers.push(keeper);
    }
    tokio::spawn(telemetry::serve_admin_with(
        admin,
        "launcher",
        health(starter.all.clone()),
        pushgrid_common::auth::read_admin_token(&credentials_dir),
        shutdown.clone(),
    ));
    let Some(keeper_list) = keeper_addresses(&keepers, &shutdown).await? else {
        stop_keepers.cancel();
        while keeper_tasks.join_next().await.is_some() {}
        return Ok(());
    };

    let mut role_tasks = JoinSet::new();
    let mut room_tasks = JoinSet::new();
    let mut others = Vec::new();
    for (kind, name, index) in role_plan(&args) {
        let role = plan.instance(kind, name, index, Some(&keeper_list))?;
        let (tasks, stop) = if kind == Kind::Room {
            (&mut room_tasks, stop_rooms.clone())
        } else {
            (&mut role_tasks, stop_roles.clone())
        };
        starter.start(&role, stop, tasks);
        others.push(role);
    }
    drop(starter);
    tokio::select! {
        () = announce_when_ready(&others, &keeper_list, admin_addr, &credentials_dir) => {}
        _ = shutdown.cancelled() => {}
    }

    shutdown.cancelled().await;
    tracing::info!("stopping the cluster: rooms, then the other roles, then keepers");
    stop_rooms.cancel();
    while room_tasks.join_next().await.is_some() {}
    stop_roles.cancel();
    while role_tasks.join_next().await.is_some() {}
    stop_keepers.cancel();
    while keeper_tasks.join_next().await.is_some() {}
    let _ = printer.await;
    Ok(())
}

/// Where the role binaries are: `--bin-dir`, else beside this binary.
fn bin_dir(args: &ClusterArgs) -> anyhow::Result<PathBuf> {
    Ok(match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .ok_or_else(|| anyhow::anyhow!("cannot find the directory of this binary"))?,
    })
}

/// The instance counts must be 1 to their fixed-port maximum (any number
/// above 0 with `--ephemeral-ports`).
fn check_counts(args: &ClusterArgs) -> anyhow::Result<()> {
    let counts = [
        ("keepers", args.keepers),
        ("registers", args.registers),
        ("savers", args.savers),
        ("centers", args.centers),
    ];
    for (what, count) in counts {
        if count == 0 || (!args.ephemeral_ports && count > MAX_INSTANCES) {
            anyhow::bail!(
                "--{what} must be 1 to {MAX_INSTANCES} (any number above 0 with --ephemeral-ports)"
            );
        }
    }
    if args.rooms == 0 || (!args.ephemeral_ports && args.rooms > MAX_ROOMS) {
        anyhow::bail!(
            "--rooms must be 1 to {MAX_ROOMS} (any number above 0 with --ephemeral-ports)"
        );
    }
    Ok(())
}

/// How each instance is launched: its binary, its ports and its settings.
struct Plan<'a> {
    args: &'a ClusterArgs,
    bin_dir: PathBuf,
    credentials_dir: &'a Path,
}

impl Plan<'_> {
    /// Instance `name` (the `index`th of its kind), pointed at `keepers`
    /// (none for a keeper).
    fn instance(
        &self,
        kind: Kind,
        name: String,
        index: u16,
        keepers: Option<&str>,
    ) -> anyhow::Result<Arc<Instance>> {
        let args = self.args;
        let ports = if args.ephemeral_ports {
            kind.ephemeral_ports(&args.host)
        } else {
            kind.fixed_ports(index, &args.host)
        };
        let mut settings = vec![
            format!("node_id={name}"),
            format!("listen={}", ports.grpc),
            format!("admin_listen={}", ports.admin),
            format!("credentials_dir={}", self.credentials_dir.display()),
        ];
        if let Some(keepers) = keepers {
            settings.push(format!("keeper={keepers}"));
        }
        if let Some(http) = ports.http {
            settings.push(format!("http_listen={http}"));
        }
        if let Some(tcp) = ports.tcp {
            settings.push(format!("tcp_listen={tcp}"));
        }
        match kind {
            Kind::Keeper => {
                settings.push(format!("database_url={}", args.mysql));
                settings.push(format!(
                    "apps=[{{id=\"{DEMO_APP}\", jwt_secret=\"{DEMO_SECRET}\", api_key=\"{DEMO_API_KEY}\"}}]"
                ));
            }
            Kind::Saver => {
                settings.push(format!("database_url={}", args.mysql));
                settings.push(format!("redis_url={}", args.redis));
            }
            _ => {}
        }
        settings.extend(extra_settings(&args.role_sets, kind)?);
        Ok(Instance::new(
            name,
            self.bin_dir.join(kind.binary()),
            settings,
        ))
    }
}

/// Starts instances under supervision, each remembered for the launcher's
/// health.
struct Starter {
    backoff: Backoff,
    grace: Duration,
    lines: mpsc::Sender<Line>,
    shutdown: CancellationToken,
    all: Arc<std::sync::Mutex<Vec<Arc<Instance>>>>,
}

impl Starter {
    /// With the restart back-off and stop grace of `args`; children's lines go
    /// to `lines`.
    fn new(args: &ClusterArgs, lines: mpsc::Sender<Line>, shutdown: &CancellationToken) -> Starter {
        Starter {
            backoff: Backoff {
                min: Duration::from_millis(args.restart_backoff_ms.max(1)),
                max: Duration::from_millis(
                    args.restart_backoff_max_ms
                        .max(args.restart_backoff_ms.max(1)),
                ),
            },
            grace: Duration::from_secs(args.stop_grace_secs),
            lines,
            shutdown: shutdown.clone(),
            all: Arc::default(),
        }
    }

    fn start(&self, instance: &Arc<Instance>, stop: CancellationToken, tasks: &mut JoinSet<()>) {
        tasks.spawn(supervise(
            instance.clone(),
            self.backoff,
            self.grace,
            self.lines.clone(),
            stop,
            self.shutdown.clone(),
        ));
        self.all
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(instance.clone());
    }
}

/// The keepers' gRPC addresses, comma-separated, once each is ready; `None`
/// when the launcher is stopped first.
async fn keeper_addresses(
    keepers: &[Arc<Instance>],
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<String>> {
    let mut keeper_addrs = Vec::new();
    for keeper in keepers {
        tokio::select! {
            ready = keeper.wait_ready(1, Duration::from_secs(60)) => ready?,
            _ = shutdown.cancelled() => return Ok(None),
        }
        let addr = keeper
            .bound("grpc")
            .ok_or_else(|| anyhow::anyhow!("{} announced no gRPC address", keeper.name))?;
        keeper_addrs.push(addr);
    }
    Ok(Some(keeper_addrs.join(",")))
}

/// The roles after keepers, in start order: (kind, instance name, index).
fn role_plan(args: &ClusterArgs) -> Vec<(Kind, String, u16)> {
    let mut plan: Vec<(Kind, String, u16)> = Vec::new();
    let numbered = |kind: Kind, count: u16| {
        (0..count).map(move |index| (kind, format!("{}-{index}", kind.binary()), index))
    };
    plan.extend(numbered(Kind::Register, args.registers));
    plan.extend(numbered(Kind::Saver, args.savers));
    plan.push((Kind::Coordinator, "coordinator".into(), 0));
    plan.extend(numbered(Kind::Center, args.centers));
    plan.push((Kind::Dispatcher, "dispatcher".into(), 0));
    plan.extend(numbered(Kind::Room, args.rooms));
    plan
}

/// Waits until every role is ready, then announces the cluster and prints
/// where its APIs and credentials are; a role not ready in time is logged
/// (the launcher keeps supervising).
async fn announce_when_ready(
    others: &[Arc<Instance>],
    keeper_list: &str,
    admin_addr: std::net::SocketAddr,
    credentials_dir: &Path,
) {
    let ready = async {
        for role in others {
            role.wait_ready(1, Duration::from_secs(120)).await?;
        }
        anyhow::Ok(())
    };
    match ready.await {
        Ok(()) => {
            net::announce("cluster", "ready", admin_addr);
            let center = others
                .iter()
                .find(|role| role.name == "center-0")
                .and_then(|role| role.bound("http"))
                .unwrap_or_default();
            let dispatcher = others
                .iter()
                .find(|role| role.name == "dispatcher")
                .and_then(|role| role.bound("http"))
                .unwrap_or_default();
            let room = others
                .iter()
                .find(|role| role.name == "room-0")
                .and_then(|role| role.bound("tcp"))
                .unwrap_or_default();
            println!(
                "pushgrid cluster: push API http://{center}/api/push (API key {DEMO_API_KEY}), dispatcher http://{dispatcher}, rooms from {room}, keepers {keeper_list}, launcher metrics http://{admin_addr}/metrics"
            );
            println!(
                "pushgrid cluster: admin token in {dir}/admin-token (keeper admin API, dashboard, /debug/ on admin ports, stats/info of the whole cluster); cluster credentials in {dir} (docs/security.md)",
                dir = credentials_dir.display()
            );
        }
        Err(error) => {
            tracing::warn!(%error, "not every role was ready in time; the launcher keeps supervising")
        }
    }
}

/// The launcher is healthy while every instance's process runs.
fn health(instances: Arc<std::sync::Mutex<Vec<Arc<Instance>>>>) -> telemetry::HealthCheck {
    Arc::new(move || {
        let instances = instances
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let down: Vec<&str> = instances
            .iter()
            .filter(|instance| !instance.is_up())
            .map(|instance| instance.name.as_str())
            .collect();
        if down.is_empty() {
            Ok(())
        } else {
            Err(format!("down: {}", down.join(", ")))
        }
    })
}

/// Prints every child's lines with its instance name: stdout lines on
/// stdout, stderr lines on stderr.
async fn print_lines(mut lines: mpsc::Receiver<Line>) {
    while let Some((name, stderr, line)) = lines.recv().await {
        if stderr {
            eprintln!("[{name}] {line}");
        } else {
            println!("[{name}] {line}");
        }
    }
}
