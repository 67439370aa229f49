//! `pushgrid dev`: every role in one process, embedded SQLite, a demo app.
//! The cluster credentials (a key per role, the verifiers, an admin token)
//! are created in `<data dir>/credentials` on the first start and kept.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pushgrid_common::config::NodeConfig;
use pushgrid_common::{CancellationToken, net};
use pushgrid_keeper::AppSeed;

pub const DEMO_APP: &str = "demo";
pub const DEMO_SECRET: &str = "demo-secret";
pub const DEMO_API_KEY: &str = "demo-key";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the embedded SQLite databases and the cluster credentials live.
    #[arg(long, default_value = "pushgrid-data")]
    data_dir: PathBuf,
    /// Dispatcher HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8070")]
    dispatcher_listen: String,
    /// Push API HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    center_listen: String,
    /// Device TCP listener.
    #[arg(long, default_value = "127.0.0.1:8090")]
    room_listen: String,
    /// Device WebSocket listener (browsers; frames in binary messages).
    #[arg(long, default_value = "127.0.0.1:8091")]
    ws_listen: String,
    /// The demo page (`/demo`) and the web SDK bundle.
    #[arg(long, default_value = "127.0.0.1:8060")]
    demo_listen: String,
    /// Print the machine-readable `PUSHGRID_BOUND <role> <listener> <addr>`
    /// lines on stdout, for scripts and tests (by default they go to stderr,
    /// or to the log file in a terminal, and stdout holds only the banner).
    #[arg(long)]
    machine_lines: bool,
    /// Heartbeat interval told to devices.
    #[arg(long, default_value_t = 60)]
    heartbeat_secs: u32,
    /// Webhook URL of the demo app (upstream messages and state events).
    #[arg(long, default_value = "")]
    webhook_url: String,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn internal_node(credentials_dir: &Path) -> NodeConfig {
    // Internal gRPC and admin listeners take any free port; roles find each
    // other through keeper.
    NodeConfig {
        credentials_dir: credentials_dir.display().to_string(),
        ..NodeConfig::with_ports(0, 0)
    }
}

/// Creates what is missing of `<data_dir>/credentials` (mode 0700, files
/// 0600) and returns the directory; logs what was created.
pub fn ensure_credentials(data_dir: &Path) -> anyhow::Result<PathBuf> {
    let dir = data_dir.join("credentials");
    let created = pushgrid_common::auth::init_dir(&dir)?;
    if !created.created_keys.is_empty() || created.created_admin_token {
        tracing::info!(
            dir = %dir.display(),
            keys = created.created_keys.len(),
            admin_token = created.created_admin_token,
            "created cluster credentials"
        );
    }
    Ok(dir)
}

/// Runs every role in this process, with the demo page, until a stop signal.
pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = args.data_dir.canonicalize()?;
    let log_file = init_logs(&args, &data_dir)?;
    match (args.machine_lines, &log_file) {
        (true, _) => {}
        (false, Some(_)) => net::announce_in_log(),
        (false, None) => net::announce_on_stderr(),
    }
    let shutdown = CancellationToken::new();
    pushgrid_common::cli::spawn_signal_handler(shutdown.clone());
    let credentials_dir = ensure_credentials(&data_dir)?;

    let mut roles = Roles::bind(&args, &data_dir, &credentials_dir).await?;
    let addresses = roles.addresses()?;
    let demo_listener = net::bind(&args.demo_listen).await?;
    let demo_addr = demo_listener.local_addr()?;
    net::announce("dev", "demo", demo_addr);
    roles.pin(&addresses)?;

    let mut roles = roles.spawn(&shutdown);
    let demo = std::sync::Arc::new(crate::demo::Demo {
        center: addresses.center,
        dispatcher: addresses.dispatcher,
        room_ws: addresses.room_ws,
        app: DEMO_APP.into(),
        secret: DEMO_SECRET.into(),
        api_key: DEMO_API_KEY.into(),
    });
    {
        let shutdown = shutdown.clone();
        roles.spawn(async move {
            if let Err(error) = crate::demo::serve(demo_listener, demo, shutdown).await {
                tracing::error!(%error, "the demo page stopped");
            }
        });
    }

    let checks = [
        addresses.center_admin,
        addresses.dispatcher_admin,
        addresses.room_admin,
    ];
    if tokio::time::timeout(
        Duration::from_secs(60),
        wait_until_healthy(&checks, &shutdown),
    )
    .await
    .is_err()
    {
        tracing::warn!("roles were not healthy within 60 s; see /healthz on their admin ports");
    }
    if !shutdown.is_cancelled() {
        net::announce("dev", "ready", addresses.center);
        print_banner(&Banner {
            center: addresses.center,
            dispatcher: addresses.dispatcher,
            room: addresses.room,
            room_ws: addresses.room_ws,
            demo: demo_addr,
            data_dir: &data_dir,
            credentials: &credentials_dir,
            log_file: log_file.as_deref(),
        });
    }

    // The supervisors return only once `shutdown` is cancelled.
    while roles.join_next().await.is_some() {}
    Ok(())
}

/// An embedded SQLite database in the data directory.
fn sqlite(data_dir: &Path, name: &str) -> String {
    format!("sqlite://{}", data_dir.join(name).display())
}

/// Every role's configuration and the listeners bound for its first start.
struct Roles {
    keeper: pushgrid_keeper::KeeperConfig,
    keeper_listeners: pushgrid_keeper::Listeners,
    register: pushgrid_register::RegisterConfig,
    register_listeners: pushgrid_register::Listeners,
    saver: pushgrid_saver::SaverConfig,
    saver_listeners: pushgrid_saver::Listeners,
    coordinator: pushgrid_coordinator::CoordinatorConfig,
    coordinator_listeners: pushgrid_coordinator::Listeners,
    center: pushgrid_center::CenterConfig,
    center_listeners: pushgrid_center::Listeners,
    dispatcher: pushgrid_dispatcher::DispatcherConfig,
    dispatcher_listeners: pushgrid_dispatcher::Listeners,
    room: pushgrid_room::RoomConfig,
    room_listeners: pushgrid_room::Listeners,
}

/// The addresses of the roles' public and admin listeners.
struct Addresses {
    center: SocketAddr,
    dispatcher: SocketAddr,
    room: SocketAddr,
    room_ws: SocketAddr,
    center_admin: SocketAddr,
    dispatcher_admin: SocketAddr,
    room_admin: SocketAddr,
}

impl Roles {
    /// Keeper (with the demo app) first, then the others pointed at it;
    /// each role's listeners bound.
    async fn bind(
        args: &DevArgs,
        data_dir: &Path,
        credentials_dir: &Path,
    ) -> anyhow::Result<Roles> {
        let mut keeper = pushgrid_keeper::KeeperConfig {
            node: internal_node(credentials_dir),
            ..Default::default()
        };
        keeper.database_url = sqlite(data_dir, "keeper.db");
        keeper.apps = vec![AppSeed {
            id: DEMO_APP.into(),
            jwt_secret: DEMO_SECRET.into(),
            api_key: DEMO_API_KEY.into(),
            webhook_url: args.webhook_url.clone(),
            ..Default::default()
        }];
        keeper.http_listen = "127.0.0.1:0".into();
        let keeper_listeners = pushgrid_keeper::Listeners::bind(&keeper).await?;
        let keeper_addr = keeper_listeners.grpc.local_addr()?.to_string();
        let node = || NodeConfig {
            keeper: keeper_addr.clone(),
            ..internal_node(credentials_dir)
        };

        let register = pushgrid_register::RegisterConfig {
            node: node(),
            ..Default::default()
        };
        let saver = pushgrid_saver::SaverConfig {
            node: node(),
            database_url: sqlite(data_dir, "saver.db"),
            ..Default::default()
        };
        let coordinator = pushgrid_coordinator::CoordinatorConfig {
            node: node(),
            ..Default::default()
        };
        let center = pushgrid_center::CenterConfig {
            node: node(),
            http_listen: args.center_listen.clone(),
            ..Default::default()
        };
        let dispatcher = pushgrid_dispatcher::DispatcherConfig {
            node: node(),
            http_listen: args.dispatcher_listen.clone(),
            ..Default::default()
        };
        let room = pushgrid_room::RoomConfig {
            node: node(),
            tcp_listen: args.room_listen.clone(),
            ws_listen: args.ws_listen.clone(),
            heartbeat_secs: args.heartbeat_secs,
            ..Default::default()
        };

        Ok(Roles {
            register_listeners: pushgrid_register::Listeners::bind(&register).await?,
            saver_listeners: pushgrid_saver::Listeners::bind(&saver).await?,
            coordinator_listeners: pushgrid_coordinator::Listeners::bind(&coordinator).await?,
            center_listeners: pushgrid_center::Listeners::bind(&center).await?,
            dispatcher_listeners: pushgrid_dispatcher::Listeners::bind(&dispatcher).await?,
            room_listeners: pushgrid_room::Listeners::bind(&room).await?,
            keeper,
            keeper_listeners,
            register,
            saver,
            coordinator,
            center,
            dispatcher,
            room,
        })
    }

    fn addresses(&self) -> anyhow::Result<Addresses> {
        Ok(Addresses {
            center: self.center_listeners.http.local_addr()?,
            dispatcher: self.dispatcher_listeners.http.local_addr()?,
            room: self.room_listeners.tcp.local_addr()?,
            room_ws: self
                .room_listeners
                .ws
                .as_ref()
                .map(tokio::net::TcpListener::local_addr)
                .transpose()?
                .ok_or_else(|| anyhow::anyhow!("--ws-listen must not be empty"))?,
            center_admin: self.center_listeners.admin.local_addr()?,
            dispatcher_admin: self.dispatcher_listeners.admin.local_addr()?,
            room_admin: self.room_listeners.admin.local_addr()?,
        })
    }

    /// A restarted role binds the addresses its first start bound.
    fn pin(&mut self, addresses: &Addresses) -> anyhow::Result<()> {
        let keeper = &mut self.keeper;
        keeper.node.listen = self.keeper_listeners.grpc.local_addr()?.to_string();
        keeper.node.admin_listen = self.keeper_listeners.admin.local_addr()?.to_string();
        keeper.http_listen = self.keeper_listeners.http.local_addr()?.to_string();
        pin_node(
            &mut self.register.node,
            self.register_listeners.grpc.local_addr()?,
            self.register_listeners.admin.local_addr()?,
        );
        pin_node(
            &mut self.saver.node,
            self.saver_listeners.grpc.local_addr()?,
            self.saver_listeners.admin.local_addr()?,
        );
        pin_node(
            &mut self.coordinator.node,
            self.coordinator_listeners.grpc.local_addr()?,
            self.coordinator_listeners.admin.local_addr()?,
        );
        pin_node(
            &mut self.center.node,
            self.center_listeners.grpc.local_addr()?,
            addresses.center_admin,
        );
        self.center.http_listen = addresses.center.to_string();
        self.dispatcher.node.admin_listen = addresses.dispatcher_admin.to_string();
        self.dispatcher.http_listen = addresses.dispatcher.to_string();
        pin_node(
            &mut self.room.node,
            self.room_listeners.grpc.local_addr()?,
            addresses.room_admin,
        );
        self.room.tcp_listen = addresses.room.to_string();
        self.room.ws_listen = addresses.room_ws.to_string();
        Ok(())
    }

    /// Each role runs under a supervisor that starts it again when it fails
    /// (an error or a panic), after a back-off; only a stop request ends
    /// them.
    fn spawn(self, shutdown: &CancellationToken) -> tokio::task::JoinSet<()> {
        let mut roles = tokio::task::JoinSet::new();
        macro_rules! supervised {
            ($name:literal, $krate:ident, $config:expr, $listeners:expr) => {
                roles.spawn(supervise_task(
                    $name,
                    $config,
                    $listeners,
                    |config| {
                        let config = config.clone();
                        async move { $krate::Listeners::bind(&config).await }
                    },
                    $krate::run,
                    shutdown.clone(),
                ))
            };
        }
        supervised!(
            "keeper",
            pushgrid_keeper,
            self.keeper,
            self.keeper_listeners
        );
        supervised!(
            "register",
            pushgrid_register,
            self.register,
            self.register_listeners
        );
        supervised!("saver", pushgrid_saver, self.saver, self.saver_listeners);
        supervised!(
            "coordinator",
            pushgrid_coordinator,
            self.coordinator,
            self.coordinator_listeners
        );
        supervised!(
            "center",
            pushgrid_center,
            self.center,
            self.center_listeners
        );
        supervised!(
            "dispatcher",
            pushgrid_dispatcher,
            self.dispatcher,
            self.dispatcher_listeners
        );
        supervised!("room", pushgrid_room, self.room, self.room_listeners);
        roles
    }
}

/// Points a role's gRPC and admin listeners at the addresses bound for it.
fn pin_node(node: &mut NodeConfig, grpc: SocketAddr, admin: SocketAddr) {
    node.listen = grpc.to_string();
    node.admin_listen = admin.to_string();
}

/// Runs one role until `shutdown`: the first time on `listeners`, after that
/// on listeners `bind` makes from `config` (the same addresses). When the
/// role ends on its own (an error, a panic, or a return while the process
/// is not stopping) it is started again after a back-off, 250 ms doubling to
/// 10 s, counted in `pushgrid_launcher_restarts_total{instance}`. Each run
/// gets a token of its own, cancelled when it ends, so whatever it left
/// running (its admin server) stops and frees the ports.
async fn supervise_task<C, L, B, BF, R, RF>(
    role: &'static str,
    config: C,
    listeners: L,
    bind: B,
    run: R,
    shutdown: CancellationToken,
) where
    C: Clone,
    B: Fn(&C) -> BF,
    BF: std::future::Future<Output = pushgrid_common::StartResult<L>>,
    R: Fn(C, L, CancellationToken) -> RF,
    RF: std::future::Future<Output = pushgrid_common::StartResult<()>> + Send + 'static,
{
    const BACKOFF_MIN: Duration = Duration::from_millis(250);
    const BACKOFF_MAX: Duration = Duration::from_secs(10);
    let mut first = Some(listeners);
    let mut delay = BACKOFF_MIN;
    loop {
        let listeners = match first.take() {
            Some(listeners) => Ok(listeners),
            None => bind(&config).await,
        };
        let started = tokio::time::Instant::now();
        let ended = match listeners {
            Ok(listeners) => {
                let incarnation = shutdown.child_token();
                let task = tokio::spawn(run(config.clone(), listeners, incarnation.clone()));
                let ended = match task.await {
                    Ok(Ok(())) => "returned".to_string(),
                    Ok(Err(error)) => format!("failed: {error:#}"),
                    Err(error) => format!("panicked: {error}"),
                };
                incarnation.cancel();
                ended
            }
            Err(error) => format!("cannot bind its listeners again: {error:#}"),
        };
        if shutdown.is_cancelled() {
            return;
        }
        if started.elapsed() >= crate::supervise::STABLE_AFTER {
            delay = BACKOFF_MIN;
        }
        metrics::counter!("pushgrid_launcher_restarts_total", "instance" => role).increment(1);
        tracing::error!(
            role,
            reason = %ended,
            restart_in_ms = delay.as_millis() as u64,
            "role ended; restarting it"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(BACKOFF_MAX);
    }
}

/// Waits until the roles that need others (center, dispatcher, room) report
/// healthy on their admin ports: every role is serving and known then.
async fn wait_until_healthy(admin_addrs: &[std::net::SocketAddr], shutdown: &CancellationToken) {
    let client = reqwest::Client::new();
    for addr in admin_addrs {
        let url = format!("http://{addr}/healthz");
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status().is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Banner<'a> {
    center: SocketAddr,
    dispatcher: SocketAddr,
    room: SocketAddr,
    room_ws: SocketAddr,
    demo: SocketAddr,
    data_dir: &'a Path,
    credentials: &'a Path,
    log_file: Option<&'a Path>,
}

/// In a terminal, with no `RUST_LOG`, the info lines of seven roles would bury
/// the banner: they go to `<data_dir>/pushgrid.log` (appended) and only
/// warnings and errors reach the terminal. Anywhere else (a pipe, a service
/// manager, tests) or with `RUST_LOG` set, everything goes to stderr as in
/// every other role. Returns the log file's path when one is used.
fn init_logs(args: &DevArgs, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    use std::io::IsTerminal;
    let to_file = std::io::stderr().is_terminal() && std::env::var_os("RUST_LOG").is_none();
    if !to_file {
        pushgrid_common::telemetry::init_tracing(args.log_json);
        return Ok(None);
    }
    let path = data_dir.join("pushgrid.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|error| anyhow::anyhow!("cannot open the log file {}: {error}", path.display()))?;
    pushgrid_common::telemetry::init_tracing_to(args.log_json, Some(file));
    Ok(Some(path))
}

/// What a person reads first: what listens where, the demo app, a ready
/// token, the demo page, and the two commands that show a push arriving.
fn print_banner(banner: &Banner<'_>) {
    let token = crate::demo::token(DEMO_SECRET, DEMO_APP, "alice", 24 * 3600);
    // The binaries next to this one (target/release when started from there
    // or through `cargo run --release`): following the banner builds nothing.
    let client = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("pushgrid-client")))
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "pushgrid-client".into());
    let Banner {
        center,
        dispatcher,
        room,
        room_ws,
        demo,
        data_dir,
        credentials,
        log_file,
    } = banner;
    let logs = match log_file {
        Some(path) => format!(
            "{} (warnings also here; RUST_LOG=info prints everything here)",
            path.display()
        ),
        None => "stderr".into(),
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        r#"
pushgrid dev is ready: every role in this process, data in {data}

  demo page    http://{demo}/demo   (a browser device with the web SDK)
  push API     http://{center}/api/push   app "{app}", API key "{key}"
  dispatcher   http://{dispatcher}/v1/dispatch?user=alice
  devices      tcp {room}   websocket ws://{room_ws}/
  admin token  {credentials}/admin-token
  logs         {logs}

A device token for user alice (24 h; `pushgrid token --user bob` makes others):

  {token}

Connect a device, in a second terminal:

  {client} --dispatcher http://{dispatcher} --token {token}

Push to it (and to the demo page connected as alice), in a third:

  curl -s -H 'Authorization: apikey {key}' -d '{{"users":["alice"],"payload":"hello"}}' http://{center}/api/push
"#,
        data = data_dir.display(),
        credentials = credentials.display(),
        key = DEMO_API_KEY,
        app = DEMO_APP,
    );
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A role that fails, then panics, then runs: the supervisor starts it
    /// three times, each time on the address of the first start, and returns
    /// once the process stops.
    #[tokio::test]
    async fn a_failing_role_is_started_again_on_its_address_until_shutdown() {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = first.local_addr().unwrap();
        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let (running, mut third) = tokio::sync::mpsc::channel::<SocketAddr>(1);
        let counted = runs.clone();
        let supervisor = tokio::spawn(supervise_task(
            "test-role",
            addr,
            first,
            |addr: &SocketAddr| {
                let addr = *addr;
                async move { Ok(tokio::net::TcpListener::bind(addr).await?) }
            },
            move |_addr, listener: tokio::net::TcpListener, token: CancellationToken| {
                let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
                let running = running.clone();
                async move {
                    let bound = listener.local_addr()?;
                    match run {
                        1 => Err(pushgrid_common::StartError::Database(
                            "the store is gone".into(),
                        )),
                        2 => panic!("a bug"),
                        _ => {
                            running.send(bound).await.expect("the test listens");
                            token.cancelled().await;
                            Ok(())
                        }
                    }
                }
            },
            shutdown.clone(),
        ));
        let bound = tokio::time::timeout(Duration::from_secs(10), third.recv())
            .await
            .expect("the third start runs")
            .unwrap();
        assert_eq!(bound, addr, "every start binds the first address");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), supervisor)
            .await
            .expect("the supervisor ends with the process")
            .unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no start after shutdown");
    }
}
