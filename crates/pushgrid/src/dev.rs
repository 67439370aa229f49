//! `pushgrid dev`: every role in one process, embedded SQLite, a demo app.

use std::path::PathBuf;
use std::time::Duration;

use pushgrid_common::config::NodeConfig;
use pushgrid_common::{CancellationToken, net};
use pushgrid_keeper::AppSeed;

pub const DEMO_APP: &str = "demo";
pub const DEMO_SECRET: &str = "demo-secret";
pub const DEMO_API_KEY: &str = "demo-key";

#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where the embedded SQLite databases live.
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

fn internal_node() -> NodeConfig {
    // Internal gRPC and admin listeners take any free port; roles find each
    // other through keeper.
    NodeConfig::with_ports(0, 0)
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    pushgrid_common::telemetry::init_tracing(args.log_json);
    let shutdown = CancellationToken::new();
    pushgrid_common::cli::spawn_signal_handler(shutdown.clone());
    std::fs::create_dir_all(&args.data_dir)?;
    let data_dir = args.data_dir.canonicalize()?;
    let sqlite = |name: &str| format!("sqlite://{}", data_dir.join(name).display());

    let mut keeper = pushgrid_keeper::KeeperConfig {
        node: internal_node(),
        ..Default::default()
    };
    keeper.database_url = sqlite("keeper.db");
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
        ..internal_node()
    };

    let register = pushgrid_register::RegisterConfig {
        node: node(),
        ..Default::default()
    };
    let saver = pushgrid_saver::SaverConfig {
        node: node(),
        database_url: sqlite("saver.db"),
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
        heartbeat_secs: args.heartbeat_secs,
        ..Default::default()
    };

    let register_listeners = pushgrid_register::Listeners::bind(&register).await?;
    let saver_listeners = pushgrid_saver::Listeners::bind(&saver).await?;
    let coordinator_listeners = pushgrid_coordinator::Listeners::bind(&coordinator).await?;
    let center_listeners = pushgrid_center::Listeners::bind(&center).await?;
    let dispatcher_listeners = pushgrid_dispatcher::Listeners::bind(&dispatcher).await?;
    let room_listeners = pushgrid_room::Listeners::bind(&room).await?;
    let center_addr = center_listeners.http.local_addr()?;
    let dispatcher_addr = dispatcher_listeners.http.local_addr()?;
    let room_addr = room_listeners.tcp.local_addr()?;
    let center_admin = center_listeners.admin.local_addr()?;
    let dispatcher_admin = dispatcher_listeners.admin.local_addr()?;
    let room_admin = room_listeners.admin.local_addr()?;

    let mut roles = tokio::task::JoinSet::new();
    roles.spawn(named(
        "keeper",
        pushgrid_keeper::run(keeper, keeper_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "register",
        pushgrid_register::run(register, register_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "saver",
        pushgrid_saver::run(saver, saver_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "coordinator",
        pushgrid_coordinator::run(coordinator, coordinator_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "center",
        pushgrid_center::run(center, center_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "dispatcher",
        pushgrid_dispatcher::run(dispatcher, dispatcher_listeners, shutdown.clone()),
    ));
    roles.spawn(named(
        "room",
        pushgrid_room::run(room, room_listeners, shutdown.clone()),
    ));

    let checks = [center_admin, dispatcher_admin, room_admin];
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
        net::announce("dev", "ready", center_addr);
        print_banner(
            &center_addr.to_string(),
            &dispatcher_addr.to_string(),
            &room_addr.to_string(),
            &data_dir,
        );
    }

    // One role failing ends the whole process: a half cluster is worse than none.
    let mut first_error = None;
    while let Some(joined) = roles.join_next().await {
        let (role, result) = joined?;
        if let Err(error) = result {
            tracing::error!(role, %error, "role failed");
            first_error.get_or_insert(anyhow::anyhow!("{role} failed: {error}"));
        }
        shutdown.cancel();
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

async fn named(
    role: &'static str,
    future: impl std::future::Future<Output = anyhow::Result<()>>,
) -> (&'static str, anyhow::Result<()>) {
    (role, future.await)
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

fn print_banner(center: &str, dispatcher: &str, room: &str, data_dir: &std::path::Path) {
    println!(
        r#"
pushgrid dev is running (all roles in one process, data in {data})

  push API     http://{center}/api/push     (API key: {key})
  dispatcher   http://{dispatcher}/v1/dispatch?user=alice
  device TCP   {room}

Try it, in two more terminals:

  cargo run -q -p pushgrid-client -- --dispatcher http://{dispatcher} --token "$(cargo run -q -p pushgrid -- token --app {app} --user alice)"

  curl -s -H 'Authorization: apikey {key}' -d '{{"users":["alice"],"payload":"hello"}}' http://{center}/api/push
"#,
        data = data_dir.display(),
        key = DEMO_API_KEY,
        app = DEMO_APP,
    );
}
