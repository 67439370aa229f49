//! Starting the cluster of a `loadtest million` run: keeper (with the run's
//! app), then register, saver, coordinator and center, then one room per
//! --per-room devices, each waited for until it announces itself ready; then
//! until center sees every room.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::processes::{Started, binary, start};
use super::{MillionArgs, Tenant};

/// The roles started before the rooms, in start order: (process name, binary).
const ROLES: [(&str, &str); 5] = [
    ("keeper", "keeper"),
    ("register", "register"),
    ("saver", "saver"),
    ("coordinator", "coordinator"),
    ("center", "center"),
];

/// The started cluster: where its API and rooms are.
pub(super) struct Cluster {
    /// center's HTTP address.
    pub center: String,
    /// Room TCP addresses, in start order.
    pub rooms: Vec<String>,
    /// Index of the first room in the process list.
    pub first_room: usize,
    pub per_room: u64,
}

/// Settings every role gets: its keeper, port-0 listeners, the lease and the
/// cluster credentials.
struct Common {
    lease: String,
    credentials: String,
}

impl Common {
    fn node(&self, keeper: &str) -> Vec<String> {
        vec![
            format!("keeper={keeper}"),
            "listen=127.0.0.1:0".to_owned(),
            "admin_listen=127.0.0.1:0".to_owned(),
            self.lease.clone(),
            self.credentials.clone(),
        ]
    }
}

/// Starts every process of the cluster into `processes` (so that the caller
/// stops them, whatever happens here).
pub(super) async fn start_cluster(
    args: &MillionArgs,
    tenant: &Tenant,
    bin_dir: &Path,
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<Cluster> {
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
    // The cluster credentials every role needs, as `pushgrid cluster` makes them.
    let credentials = log_dir.join("credentials");
    pushgrid_common::auth::init_dir(&credentials)?;
    let common = Common {
        lease: format!("lease_ttl_secs={}", args.lease_secs.max(3)),
        credentials: format!("credentials_dir={}", credentials.display()),
    };
    let keeper = start_keeper(
        tenant,
        &common,
        &database_url,
        &role_bins[0].1,
        log_dir,
        processes,
    )
    .await?;
    for (name, bin) in role_bins.iter().skip(1) {
        let settings = role_settings(args, &common, &keeper, name, &database_url);
        start_role(args, name, bin, &settings, log_dir, processes).await?;
    }
    let center = processes
        .iter()
        .find(|process| process.name == "center")
        .and_then(|process| process.bound("center http"))
        .context("center http address")?;
    let first_room = processes.len();
    let room = RoomStart {
        args,
        common: &common,
        keeper: &keeper,
        program: &room_bin,
        log_dir,
    };
    let rooms = room.start_all(rooms_needed, processes).await?;
    wait_for_rooms(&center, &tenant.api_key, rooms_needed).await?;
    Ok(Cluster {
        center,
        rooms,
        first_room,
        per_room,
    })
}

/// The settings of one role started before the rooms.
fn role_settings(
    args: &MillionArgs,
    common: &Common,
    keeper: &str,
    name: &str,
    database_url: &str,
) -> Vec<String> {
    let mut settings = common.node(keeper);
    match name {
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
    settings
}

/// Starts role `name` (--centers instances of center: the first is
/// `center`, the API the run calls; the others share the broadcasts'
/// fan-out with it) into `processes`, each waited for until it is ready.
async fn start_role(
    args: &MillionArgs,
    name: &str,
    bin: &Path,
    settings: &[String],
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<()> {
    let instances = if name == "center" {
        args.centers.max(1)
    } else {
        1
    };
    for instance in 0..instances {
        let process_name = match instance {
            0 => name.to_string(),
            _ => format!("{name}-{instance}"),
        };
        let mut process = start(&process_name, name, bin, settings, log_dir).await?;
        process
            .wait_bound(&format!("{name} ready"), Duration::from_secs(60))
            .await?;
        processes.push(process);
    }
    Ok(())
}

/// Starts keeper with the run's app and its own database into `processes`;
/// its gRPC address once it is ready.
async fn start_keeper(
    tenant: &Tenant,
    common: &Common,
    database_url: &str,
    program: &Path,
    log_dir: &Path,
    processes: &mut Vec<Started>,
) -> anyhow::Result<String> {
    let mut settings = common.node("127.0.0.1:1");
    settings.push(format!("database_url={database_url}"));
    settings.push("http_listen=127.0.0.1:0".into());
    settings.push(format!(
        "apps=[{{id=\"{}\", jwt_secret=\"{}\", api_key=\"{}\"}}]",
        tenant.app, tenant.secret, tenant.api_key
    ));
    processes.push(start("keeper", "keeper", program, &settings, log_dir).await?);
    let keeper = processes.last_mut().context("keeper")?;
    let address = keeper
        .wait_bound("keeper grpc", Duration::from_secs(60))
        .await?;
    keeper
        .wait_bound("keeper ready", Duration::from_secs(60))
        .await?;
    Ok(address)
}

/// What every room of the run is started with.
struct RoomStart<'a> {
    args: &'a MillionArgs,
    common: &'a Common,
    keeper: &'a str,
    program: &'a PathBuf,
    log_dir: &'a Path,
}

impl RoomStart<'_> {
    /// Starts `count` rooms (all at once, then waits for each); their TCP
    /// addresses.
    async fn start_all(
        &self,
        count: usize,
        processes: &mut Vec<Started>,
    ) -> anyhow::Result<Vec<String>> {
        let first_room = processes.len();
        for index in 0..count {
            let mut settings = self.common.node(self.keeper);
            settings.extend([
                "tcp_listen=127.0.0.1:0".to_owned(),
                format!("heartbeat_secs={}", self.args.heartbeat_secs),
                format!("node_id=lt-room-{index}"),
                // Dozens of rooms share the machine: one shard thread each.
                "io_threads=1".to_owned(),
            ]);
            settings.extend(self.args.room_set.iter().cloned());
            let name = format!("room-{index}");
            processes.push(start(&name, "room", self.program, &settings, self.log_dir).await?);
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
        Ok(rooms)
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
