//! End-to-end test harness: starts real processes of every role on port 0,
//! reads the addresses they bound from their stdout, and cleans up after.
//!
//! Each cluster gets its own MariaDB database and its own app id (so Redis
//! keys never collide between tests running in parallel).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use pushgrid_client::{Connection, msg};
use pushgrid_proto::cluster::Role;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub mod faults;
pub mod launcher;
pub mod provider;

pub const REDIS_URL: &str = "redis://127.0.0.1:6379";
pub const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";
/// The node id of a test cluster's saver.
pub const SAVER_NODE_ID: &str = "saver";
/// keeper's admin API token in test clusters.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// `target/<profile>`, from the test binary's own path (`target/<profile>/deps/x`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Builds the role binaries once per test process (a no-op when they are
/// fresh): `cargo test` builds only the binaries of packages with tests of
/// their own.
pub fn ensure_built() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let profile_dir = target_dir();
        let profile = profile_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let target = profile_dir.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = std::process::Command::new(cargo);
        command
            .args(["build", "--quiet", "--workspace", "--bins", "--target-dir"])
            .arg(target);
        if profile != "debug" {
            command.args(["--profile", &profile]);
        }
        command.current_dir(env!("CARGO_MANIFEST_DIR"));
        // Cargo hands this test its own package's variables; ring's build
        // script watches some (CARGO_MANIFEST_DIR, CARGO_PKG_VERSION_*), so
        // passing them on would make this build and the next `cargo build`
        // from a shell rebuild each other's TLS stack.
        let package_variables = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
        ];
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if package_variables
                .iter()
                .any(|prefix| name.starts_with(prefix))
            {
                command.env_remove(name.as_ref());
            }
        }
        let status = command.status().expect("run cargo build");
        assert!(status.success(), "building the role binaries failed");
    });
}

pub fn binary(name: &str) -> PathBuf {
    ensure_built();
    target_dir().join(name)
}

/// A running role process. Killed when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    pub bound: HashMap<String, SocketAddr>,
    pub log: PathBuf,
}

impl Proc {
    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .bound
            .get(listener)
            .unwrap_or_else(|| panic!("{} did not bind {listener}", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// kill -9.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `binary` with `args`, stderr to `dir/<name>.log`, and waits until it
/// prints its `ready` line (collecting every bound address on the way).
pub async fn spawn(
    dir: &Path,
    name: &str,
    binary_name: &str,
    args: &[String],
) -> anyhow::Result<Proc> {
    spawn_until(dir, name, binary_name, args, binary_name).await
}

/// Like [`spawn`], waiting for the `ready` line of `ready_role`. Bound
/// addresses are kept as `<listener>` and `<role>/<listener>`.
pub async fn spawn_until(
    dir: &Path,
    name: &str,
    binary_name: &str,
    args: &[String],
    ready_role: &str,
) -> anyhow::Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let stderr = std::fs::File::create(&log)?;
    let mut child = Command::new(binary(binary_name))
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {binary_name}"))?;
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, mut lines) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut reader = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut bound = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let line = match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) => line,
            Ok(None) => bail!(
                "{name} exited before it was ready:\n{}",
                std::fs::read_to_string(&log)?
            ),
            Err(_) => bail!(
                "{name} was not ready in 60 s:\n{}",
                std::fs::read_to_string(&log)?
            ),
        };
        let parts: Vec<&str> = line.split_whitespace().collect();
        if parts.len() == 4 && parts[0] == pushgrid_common::net::BOUND_LINE_PREFIX {
            let addr: SocketAddr = parts[3].parse()?;
            if parts[2] == "ready" && parts[1] == ready_role {
                break;
            }
            bound.insert(parts[2].to_string(), addr);
            bound.insert(format!("{}/{}", parts[1], parts[2]), addr);
        }
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while lines.recv().await.is_some() {} });
    Ok(Proc {
        name: name.to_string(),
        child,
        bound,
        log,
    })
}

/// The app a test cluster is seeded with.
#[derive(Debug, Clone)]
pub struct TestApp {
    pub id: String,
    pub secret: String,
    pub api_key: String,
    pub webhook_url: String,
}

impl TestApp {
    pub fn random() -> TestApp {
        let suffix: u32 = rand::random();
        TestApp {
            id: format!("app{suffix:08x}"),
            secret: format!("secret-{suffix}"),
            api_key: format!("key-{suffix}"),
            webhook_url: String::new(),
        }
    }

    pub fn token(&self, user: &str) -> String {
        token(&self.id, user, &self.secret, 3600)
    }
}

/// A device token; `ttl_secs` may be negative for an expired one.
pub fn token(app: &str, user: &str, secret: &str, ttl_secs: i64) -> String {
    let exp = (pushgrid_common::now_ms() / 1000) as i64 + ttl_secs;
    let claims = pushgrid_common::jwt::Claims {
        sub: user.into(),
        app: app.into(),
        exp: exp as u64,
        dev: String::new(),
    };
    pushgrid_common::jwt::sign(&claims, secret)
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub webhook_url: String,
    pub heartbeat_secs: u32,
    pub rooms: usize,
    /// Register instances (users are split between them by the shared hash).
    pub registers: usize,
    /// Extra fields of the test app's TOML inline table, e.g. `single_login=true`.
    pub app_extra: String,
    /// Extra `--set` settings for keeper, e.g. `routes=[...]`.
    pub keeper_sets: Vec<String>,
    /// Center instances (the first is `center`, the others `extra_centers`).
    pub centers: usize,
    /// Extra `--set` settings for every center, e.g. `route_queue=2`.
    pub center_sets: Vec<String>,
    /// Keeper processes (the first is `keeper`, the others `extra_keepers`);
    /// every role is given all their addresses.
    pub keepers: usize,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            webhook_url: String::new(),
            heartbeat_secs: 30,
            rooms: 1,
            registers: 1,
            app_extra: String::new(),
            keeper_sets: Vec::new(),
            centers: 1,
            center_sets: Vec::new(),
            keepers: 1,
        }
    }
}

/// Seven roles as separate processes against the real Redis and MariaDB.
pub struct TestCluster {
    pub app: TestApp,
    pub dir: PathBuf,
    /// The cluster credentials directory (`<role>.key`, `verifiers`, `admin-token`).
    pub credentials: PathBuf,
    pub database: String,
    pub keeper: Proc,
    /// Keepers beyond the first (`ClusterOptions::keepers`).
    pub extra_keepers: Vec<Proc>,
    keeper_args: Vec<String>,
    /// Every keeper's gRPC address, comma-separated, as roles are given it.
    keeper_list: String,
    pub register: Proc,
    pub extra_registers: Vec<Proc>,
    pub saver: Proc,
    pub coordinator: Proc,
    pub center: Proc,
    /// Centers beyond the first (`ClusterOptions::centers`).
    pub extra_centers: Vec<Proc>,
    pub dispatcher: Proc,
    pub rooms: Vec<Proc>,
    pub http: reqwest::Client,
    /// The arguments each role process was started with, by process name.
    role_args: HashMap<String, Vec<String>>,
}

fn node_args(keeper: &str, credentials: &Path) -> Vec<String> {
    [
        format!("keeper={keeper}"),
        "listen=127.0.0.1:0".into(),
        "admin_listen=127.0.0.1:0".into(),
        "lease_ttl_secs=3".into(),
        format!("credentials_dir={}", credentials.display()),
    ]
    .into_iter()
    .flat_map(|setting| ["--set".to_string(), setting])
    .collect()
}

fn set(args: &mut Vec<String>, setting: String) {
    args.push("--set".into());
    args.push(setting);
}

/// The workspace's root directory (the tests crate lives inside it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, at any depth, pushed onto `found`.
pub fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()));
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl TestCluster {
    pub async fn start(options: ClusterOptions) -> anyhow::Result<TestCluster> {
        TestCluster::start_with_app(options, TestApp::random()).await
    }

    /// Like [`TestCluster::start`] with a given app (its webhook comes from the options).
    pub async fn start_with_app(
        options: ClusterOptions,
        mut app: TestApp,
    ) -> anyhow::Result<TestCluster> {
        app.webhook_url = options.webhook_url.clone();
        let dir = temp_dir("pushgrid-e2e");
        // The credentials every role gets, as `pushgrid cluster` creates them.
        let credentials = dir.join("credentials");
        pushgrid_common::auth::init_dir(&credentials)?;
        // Every role's admin token (the file's) is the tests' one.
        std::fs::write(
            credentials.join(pushgrid_common::auth::ADMIN_TOKEN_FILE),
            ADMIN_TOKEN,
        )?;
        let database = format!("pg_e2e_{}", &app.id[3..]);
        let database_url = format!("{MYSQL_SERVER}/{database}");

        let mut keeper_args = node_args("127.0.0.1:1", &credentials);
        set(&mut keeper_args, format!("database_url={database_url}"));
        set(&mut keeper_args, "http_listen=127.0.0.1:0".into());
        set(&mut keeper_args, format!("admin_token={ADMIN_TOKEN}"));
        for setting in &options.keeper_sets {
            set(&mut keeper_args, setting.clone());
        }
        let extra = if options.app_extra.is_empty() {
            String::new()
        } else {
            format!(", {}", options.app_extra)
        };
        set(
            &mut keeper_args,
            format!(
                "apps=[{{id=\"{}\", jwt_secret=\"{}\", api_key=\"{}\", webhook_url=\"{}\"{extra}}}]",
                app.id, app.secret, app.api_key, app.webhook_url
            ),
        );
        let keeper = spawn(&dir, "keeper", "keeper", &keeper_args).await?;
        let mut extra_keepers = Vec::new();
        for index in 1..options.keepers.max(1) {
            let name = format!("keeper{index}");
            extra_keepers.push(spawn(&dir, &name, "keeper", &keeper_args).await?);
        }
        let keeper_addr = std::iter::once(&keeper)
            .chain(&extra_keepers)
            .map(|keeper| keeper.addr("grpc").to_string())
            .collect::<Vec<_>>()
            .join(",");

        let mut role_args = HashMap::new();
        role_args.insert(
            "register".to_string(),
            node_args(&keeper_addr, &credentials),
        );
        let register = spawn(
            &dir,
            "register",
            "register",
            &node_args(&keeper_addr, &credentials),
        )
        .await?;
        let mut extra_registers = Vec::new();
        for index in 1..options.registers.max(1) {
            extra_registers.push(
                spawn(
                    &dir,
                    &format!("register{index}"),
                    "register",
                    &node_args(&keeper_addr, &credentials),
                )
                .await?,
            );
        }
        let mut saver_args = node_args(&keeper_addr, &credentials);
        // A fixed node id: a saver started again in its place (a restart,
        // another store) replaces its lease at once instead of leaving a
        // dead saver in the view until the lease ends.
        set(&mut saver_args, format!("node_id={SAVER_NODE_ID}"));
        set(&mut saver_args, format!("database_url={database_url}"));
        set(&mut saver_args, format!("redis_url={REDIS_URL}"));
        let saver = spawn(&dir, "saver", "saver", &saver_args).await?;
        role_args.insert("saver".to_string(), saver_args);
        role_args.insert(
            "coordinator".to_string(),
            node_args(&keeper_addr, &credentials),
        );
        let coordinator = spawn(
            &dir,
            "coordinator",
            "coordinator",
            &node_args(&keeper_addr, &credentials),
        )
        .await?;
        let mut center_args = node_args(&keeper_addr, &credentials);
        set(&mut center_args, "http_listen=127.0.0.1:0".into());
        for setting in &options.center_sets {
            set(&mut center_args, setting.clone());
        }
        let center = spawn(&dir, "center", "center", &center_args).await?;
        let mut extra_centers = Vec::new();
        for index in 1..options.centers.max(1) {
            let name = format!("center{index}");
            extra_centers.push(spawn(&dir, &name, "center", &center_args).await?);
        }
        role_args.insert("center".to_string(), center_args);
        let mut dispatcher_args = node_args(&keeper_addr, &credentials);
        set(&mut dispatcher_args, "http_listen=127.0.0.1:0".into());
        let dispatcher = spawn(&dir, "dispatcher", "dispatcher", &dispatcher_args).await?;
        role_args.insert("dispatcher".to_string(), dispatcher_args);
        let mut rooms = Vec::new();
        for index in 0..options.rooms.max(1) {
            let mut room_args = node_args(&keeper_addr, &credentials);
            set(&mut room_args, "tcp_listen=127.0.0.1:0".into());
            set(
                &mut room_args,
                format!("heartbeat_secs={}", options.heartbeat_secs),
            );
            set(&mut room_args, "auth_timeout_secs=2".into());
            rooms.push(spawn(&dir, &format!("room{index}"), "room", &room_args).await?);
            role_args.insert(format!("room{index}"), room_args);
        }
        let cluster = TestCluster {
            app,
            dir,
            credentials,
            database,
            keeper,
            extra_keepers,
            keeper_args,
            keeper_list: keeper_addr.clone(),
            register,
            extra_registers,
            saver,
            coordinator,
            center,
            extra_centers,
            dispatcher,
            rooms,
            http: reqwest::Client::new(),
            role_args,
        };
        cluster.wait_for_rooms(options.rooms.max(1)).await?;
        Ok(cluster)
    }

    pub fn center_url(&self) -> String {
        format!("http://{}", self.center.addr("http"))
    }

    pub fn dispatcher_url(&self) -> String {
        format!("http://{}", self.dispatcher.addr("http"))
    }

    pub fn room_addr(&self, index: usize) -> String {
        self.rooms[index].addr("tcp").to_string()
    }

    /// Waits until the dispatcher knows `count` rooms (every role registered).
    async fn wait_for_rooms(&self, count: usize) -> anyhow::Result<()> {
        let url = format!("{}/v1/dispatch?user=probe", self.dispatcher_url());
        let listed = eventually(Duration::from_secs(10), || async {
            let Ok(response) = self.http.get(&url).send().await else {
                return false;
            };
            let Ok(body) = response.json::<serde_json::Value>().await else {
                return false;
            };
            body["result"]["rooms"].as_array().map_or(0, Vec::len) >= count.min(3)
        })
        .await;
        if !listed {
            bail!("dispatcher never listed {count} rooms");
        }
        Ok(())
    }

    /// Starts another room process named `name` with extra `--set` settings
    /// (see [`all_transports_room_settings`]).
    pub async fn start_extra_room(&self, name: &str, sets: &[String]) -> anyhow::Result<Proc> {
        let mut args = self.node_args();
        // Port 0 unless `sets` names a listener: the default (8090) may be
        // held by another test's room at the same moment.
        set(&mut args, "tcp_listen=127.0.0.1:0".into());
        for setting in sets {
            set(&mut args, setting.clone());
        }
        spawn(&self.dir, name, "room", &args).await
    }

    /// `--set` arguments for another role process of this cluster.
    pub fn node_args(&self) -> Vec<String> {
        node_args(&self.keeper_list, &self.credentials)
    }

    /// Keeper `index` (0 is `keeper`).
    pub fn keeper_at(&mut self, index: usize) -> &mut Proc {
        match index {
            0 => &mut self.keeper,
            index => &mut self.extra_keepers[index - 1],
        }
    }

    /// kill -9 of keeper `index`.
    pub async fn kill_keeper(&mut self, index: usize) {
        self.keeper_at(index).kill().await;
    }

    /// Starts keeper `index` again on the gRPC address it had.
    pub async fn start_keeper_again(&mut self, index: usize) -> anyhow::Result<()> {
        let grpc = self.keeper_at(index).addr("grpc");
        let mut args = self.keeper_args.clone();
        set(&mut args, format!("listen={grpc}"));
        let name = format!("keeper{index}-restarted");
        *self.keeper_at(index) = spawn(&self.dir, &name, "keeper", &args).await?;
        Ok(())
    }

    /// Connects a raw device to room `index` directly.
    pub async fn device_at(
        &self,
        index: usize,
        user: &str,
        platform: &str,
    ) -> anyhow::Result<(Connection, msg::AuthOk)> {
        let auth = msg::Auth {
            token: self.app.token(user),
            device_id: format!("{user}-{platform}"),
            platform: platform.into(),
        };
        Ok(Connection::connect(&self.room_addr(index), auth).await?)
    }

    /// The process of role `name`: `keeper`, `register`, `saver`,
    /// `coordinator`, `center`, `dispatcher` or `room<i>`.
    pub fn role(&mut self, name: &str) -> &mut Proc {
        match name {
            "keeper" => &mut self.keeper,
            "register" => &mut self.register,
            "saver" => &mut self.saver,
            "coordinator" => &mut self.coordinator,
            "center" => &mut self.center,
            "dispatcher" => &mut self.dispatcher,
            room => {
                let index: usize = room
                    .strip_prefix("room")
                    .and_then(|index| index.parse().ok())
                    .unwrap_or_else(|| panic!("no role {name:?}"));
                &mut self.rooms[index]
            }
        }
    }

    /// kill -9 the process of role `name` (see [`TestCluster::role`]).
    pub async fn kill_role(&mut self, name: &str) {
        self.role(name).kill().await;
    }

    /// Starts role `name` again with the settings it had (keeper on its old
    /// gRPC address, the others on new ports, joining through keeper as any
    /// new instance does). Kill it first with [`TestCluster::kill_role`].
    pub async fn start_role_again(&mut self, name: &str) -> anyhow::Result<()> {
        if name == "keeper" {
            return self.start_keeper_again(0).await;
        }
        let args = self
            .role_args
            .get(name)
            .with_context(|| format!("no role {name:?}"))?
            .clone();
        let binary_name = if name.starts_with("room") {
            "room"
        } else {
            name
        };
        let restarted = spawn(&self.dir, &format!("{name}-restarted"), binary_name, &args).await?;
        *self.role(name) = restarted;
        Ok(())
    }

    /// A gRPC channel to `addr` (connected now) whose calls carry role
    /// `role`'s key, as that role's own calls do.
    pub async fn grpc_as(&self, addr: SocketAddr, role: Role) -> pushgrid_common::rpc::Channel {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        self.role_credentials(role)
            .attach(pushgrid_common::rpc::PeerChannel::Remote(channel))
    }

    /// The credentials of role `role` of this cluster (its key, every verifier).
    pub fn role_credentials(&self, role: Role) -> pushgrid_common::auth::Credentials {
        pushgrid_common::auth::Credentials::load(role, &self.credentials).unwrap()
    }

    /// The arguments of this cluster's saver with another Redis and SQL URL.
    pub fn saver_args(&self, redis_url: &str, database_url: &str) -> Vec<String> {
        let mut args = self.node_args();
        set(&mut args, format!("node_id={SAVER_NODE_ID}"));
        set(&mut args, format!("database_url={database_url}"));
        set(&mut args, format!("redis_url={redis_url}"));
        set(&mut args, "commit_timeout_ms=2000".into());
        args
    }

    /// Replaces the cluster's saver with one started from `args` (kept for
    /// [`TestCluster::start_role_again`]).
    pub async fn replace_saver(&mut self, name: &str, args: &[String]) -> anyhow::Result<()> {
        // SIGTERM: the old saver leaves keeper's view before the new one
        // joins, so center never picks a saver that is gone (a kill -9 would
        // leave it listed until its lease ran out).
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.saver.pid().to_string()])
            .status();
        let _ = tokio::time::timeout(Duration::from_secs(30), self.saver.child.wait()).await;
        self.saver.kill().await;
        self.saver = spawn(&self.dir, name, "saver", args).await?;
        self.role_args.insert("saver".to_string(), args.to_vec());
        // Center stores through the new saver once keeper's view reached it.
        let reached = eventually(Duration::from_secs(30), || async {
            self.push(&["replace-saver-probe"], "probe").await.is_ok()
        })
        .await;
        anyhow::ensure!(
            reached,
            "center did not reach the new saver {name} within 30 s"
        );
        Ok(())
    }

    /// kill -9 keeper and start it again on the same gRPC address.
    pub async fn restart_keeper(&mut self) -> anyhow::Result<()> {
        self.kill_role("keeper").await;
        self.start_role_again("keeper").await
    }

    /// Calls keeper's admin API with the test admin token.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let url = format!("http://{}{path}", self.keeper.addr("http"));
        let mut request = self.http.request(method, url).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("keeper admin API answers");
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /api/<method>` with API key `key`: the status and the JSON
    /// answer (`null` when the body is not JSON).
    pub async fn call(
        &self,
        key: &str,
        method: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/api/{method}", self.center_url()))
            .header("Authorization", format!("apikey {key}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /api/<method>` with the admin token (`stats` and `info` of the
    /// whole cluster).
    pub async fn call_admin(
        &self,
        method: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(format!("{}/api/{method}", self.center_url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.json().await.unwrap_or(serde_json::Value::Null),
        )
    }

    /// `POST /api/push` with the cluster app's API key.
    pub async fn push(&self, users: &[&str], payload: &str) -> anyhow::Result<Vec<u64>> {
        let response = self
            .http
            .post(format!("{}/api/push", self.center_url()))
            .header("Authorization", format!("apikey {}", self.app.api_key))
            .json(&serde_json::json!({ "users": users, "payload": payload }))
            .send()
            .await?;
        let status = response.status();
        let body: serde_json::Value = response.json().await?;
        if !status.is_success() {
            bail!("push answered {status}: {body}");
        }
        body["result"]["messages"]
            .as_array()
            .context("no messages in answer")?
            .iter()
            .map(|message| {
                message["id"]
                    .as_str()
                    .context("id is a string")?
                    .parse::<u64>()
                    .map_err(Into::into)
            })
            .collect()
    }

    /// Connects a raw device through the dispatcher's first room.
    pub async fn device(&self, user: &str) -> anyhow::Result<(Connection, msg::AuthOk)> {
        let dispatch = pushgrid_client::dispatch(&self.http, &self.dispatcher_url(), user).await?;
        let room = dispatch.rooms.first().context("no room")?;
        let auth = msg::Auth {
            token: self.app.token(user),
            device_id: format!("{user}-phone"),
            platform: "test".into(),
        };
        let tcp = room.tcp.as_deref().context("room without a TCP address")?;
        Ok(Connection::connect(tcp, auth).await?)
    }

    /// A SQL pool on this cluster's database.
    pub async fn mysql(&self) -> anyhow::Result<sqlx::AnyPool> {
        Ok(pushgrid_common::db::connect(&format!("{MYSQL_SERVER}/{}", self.database), 2).await?)
    }

    /// Drops the cluster's database; call at the end of a test.
    pub async fn cleanup(self) {
        if let Ok(pool) =
            pushgrid_common::db::connect(&format!("{MYSQL_SERVER}/{}", self.database), 1).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS `{}`",
                self.database
            )))
            .execute(&pool)
            .await;
            pool.close().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate for `localhost` and `127.0.0.1` (so TLS clients
/// can check it by name or by the IP address rooms announce), written as PEM
/// files in `dir`.
pub struct TestCert {
    /// The certificate, DER-encoded: a client trusts it as its root.
    pub der: Vec<u8>,
    pub cert_file: String,
    pub key_file: String,
}

pub fn test_cert(dir: &Path) -> TestCert {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names).unwrap();
    let cert_file = dir.join("room-cert.pem");
    let key_file = dir.join("room-key.pem");
    std::fs::write(&cert_file, certified.cert.pem()).unwrap();
    std::fs::write(&key_file, certified.key_pair.serialize_pem()).unwrap();
    TestCert {
        der: certified.cert.der().to_vec(),
        cert_file: cert_file.display().to_string(),
        key_file: key_file.display().to_string(),
    }
}

/// `--set` settings for a room that serves every transport
/// (TCP, WebSocket, TLS and WebSocket over TLS, all on port 0) with `cert`.
pub fn all_transports_room_settings(node_id: &str, cert: &TestCert) -> Vec<String> {
    vec![
        format!("node_id={node_id}"),
        "tcp_listen=127.0.0.1:0".into(),
        "ws_listen=127.0.0.1:0".into(),
        "tls_listen=127.0.0.1:0".into(),
        "wss_listen=127.0.0.1:0".into(),
        format!("tls_cert_file={}", cert.cert_file),
        format!("tls_key_file={}", cert.key_file),
    ]
}

/// The next frame, or an error after `timeout`.
pub async fn next_frame(
    connection: &mut Connection,
    timeout: Duration,
) -> anyhow::Result<Option<pushgrid_client::Frame>> {
    match tokio::time::timeout(timeout, connection.next_frame()).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("no frame within {timeout:?}"),
    }
}

/// Reads frames until a PUSH arrives (answering nothing else).
pub async fn next_push(
    connection: &mut Connection,
    timeout: Duration,
) -> anyhow::Result<msg::Push> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_frame(connection, remaining)
            .await?
            .context("connection closed before a push")?;
        if frame.op == pushgrid_client::Op::Push {
            return Ok(frame.decode::<msg::Push>()?);
        }
    }
}

/// Reads frames until the server closes the connection (or 10 s pass without
/// one); returns the frames read before the close.
pub async fn frames_until_close(connection: &mut Connection) -> Vec<pushgrid_client::Frame> {
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = next_frame(connection, Duration::from_secs(10)).await {
        frames.push(frame);
    }
    frames
}

/// The one ERROR frame of `frames` (the server's last word before a close).
pub fn only_error(frames: &[pushgrid_client::Frame]) -> msg::Error {
    assert_eq!(frames.len(), 1, "expected one ERROR frame, got {frames:?}");
    assert_eq!(frames[0].op, pushgrid_client::Op::Error);
    frames[0].decode::<msg::Error>().unwrap()
}

/// The one way the tests wait: polls `check` every 50 ms until it returns
/// true or `timeout` passes; says which. Never a fixed sleep in its place.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for(timeout, || {
        let checked = check();
        async move { checked.await.then_some(()) }
    })
    .await
    .is_some()
}

/// [`eventually`] for a condition that yields something (a connection, an
/// id): polls `attempt` every 50 ms until it gives `Some`, or `timeout`
/// passes (`None`). Always tried at least once.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(found) = attempt().await {
            return Some(found);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        // The poll interval; the deadline above ends the wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a PING and waits (at most `timeout`) for its PONG: the room has
/// handled every frame the device sent before (it handles a connection's
/// frames in order). Returns the other frames that came meanwhile.
pub async fn round_trip(
    connection: &mut Connection,
    timeout: Duration,
) -> anyhow::Result<Vec<pushgrid_client::Frame>> {
    const SEQ: u32 = 0x5eed;
    connection
        .send_empty(pushgrid_client::Op::Ping, SEQ)
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut others = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_frame(connection, left)
            .await?
            .context("the connection closed before the PONG")?;
        if frame.op == pushgrid_client::Op::Pong && frame.seq == SEQ {
            return Ok(others);
        }
        others.push(frame);
    }
}

/// A role's `/metrics` page, as Prometheus text.
pub async fn metrics_text(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Sums the samples of metric `name` in Prometheus `text` whose label set
/// contains `label` ("" for every sample of the metric).
pub fn metric_in(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter(|line| line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Sums the samples of metric `name` on a role's admin server whose label set
/// contains `label` ("" for all).
pub async fn metric(admin: SocketAddr, name: &str, label: &str) -> f64 {
    metric_in(&metrics_text(admin).await, name, label)
}

/// JSON bodies a [`webhook`] received, in arrival order.
pub type Received = std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>;

/// A real HTTP webhook (the app's backend, which cannot be a pushgrid process)
/// on 127.0.0.1: records every JSON body POSTed to `/hook` and answers
/// `status` after `delay`. Returns its URL and what it received.
pub async fn webhook(status: u16, delay: Duration) -> (String, Received) {
    let received = Received::default();
    let store = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push(body);
                // The backend's simulated response time (part of the
                // scenario), not a wait for a condition.
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), received)
}
