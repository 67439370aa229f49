//! Operations: the docker compose file checked against the code, config
//! errors, metrics and health on every admin port, CPU profiles and log levels
//! on demand, JSON logs, and center's dashboard in headless Chromium.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use pushgrid_e2e::{
    ADMIN_TOKEN, ClusterOptions, Proc, TestCluster, binary, eventually, next_push, spawn,
    workspace_root,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// `target/test-artifacts/`, kept after the test for humans and CI to look at.
fn artifacts_dir() -> PathBuf {
    let dir = pushgrid_e2e::target_dir()
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn yaml_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    serde_yaml_ng::from_str(&text)
        .unwrap_or_else(|error| panic!("{} is not valid YAML: {error}", path.display()))
}

/// Compose's `${NAME:-default}` with nothing set: the default.
fn interpolate_defaults(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').expect("closing brace") + start;
        let inner = &rest[start + 2..end];
        out.push_str(inner.split_once(":-").map_or("", |(_, default)| default));
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} has no port"))
}

fn string_list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| match item {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Every `[[bin]]` of the workspace, from `cargo metadata`.
fn workspace_binaries() -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo metadata failed");
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut binaries = BTreeSet::new();
    for package in metadata["packages"].as_array().unwrap() {
        for target in package["targets"].as_array().unwrap() {
            if string_list(&target["kind"])
                .iter()
                .any(|kind| kind == "bin")
            {
                binaries.insert(target["name"].as_str().unwrap().to_string());
            }
        }
    }
    binaries
}

/// The effective config of `binary` as the compose service would run it:
/// its config file and its environment, through `--print-config`.
fn effective_config(
    binary_name: &str,
    config_file: &Path,
    environment: &BTreeMap<String, String>,
) -> toml::Table {
    let output = std::process::Command::new(binary(binary_name))
        .arg("--config")
        .arg(config_file)
        .arg("--print-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(environment)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{binary_name} --config {} --print-config failed: {}",
        config_file.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().parse().unwrap()
}

/// The role services of the compose file: one of each role and two rooms.
const PUSHGRID_SERVICES: [&str; 8] = [
    "keeper",
    "register",
    "saver",
    "coordinator",
    "center",
    "dispatcher",
    "room1",
    "room2",
];

#[test]
fn compose_file_matches_the_code() {
    let root = workspace_root();
    let compose = yaml_file(&root.join("docker-compose.yml"));
    let services = compose["services"].as_object().expect("services map");
    let names: BTreeSet<&str> = services.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = PUSHGRID_SERVICES
        .into_iter()
        .chain(["credentials", "redis", "mysql", "prometheus"])
        .collect();
    assert_eq!(names, expected, "compose services");
    // One-shot services (run to completion before what depends on them).
    let one_shot = |name: &str| services[name]["restart"] == "no";

    let binaries = workspace_binaries();
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let mysql_password = interpolate_defaults(
        services["mysql"]["environment"]["MARIADB_ROOT_PASSWORD"]
            .as_str()
            .unwrap(),
    );
    let mysql_database = services["mysql"]["environment"]["MARIADB_DATABASE"]
        .as_str()
        .unwrap();

    // Every long-running service with a health check; start order only
    // through health, or the successful end of a one-shot service.
    for (name, service) in services {
        assert!(
            one_shot(name) || !string_list(&service["healthcheck"]["test"]).is_empty(),
            "{name} has no health check"
        );
        if let Some(dependencies) = service.get("depends_on") {
            let dependencies = dependencies
                .as_object()
                .unwrap_or_else(|| panic!("{name}: depends_on must be a map with conditions"));
            for (dependency, condition) in dependencies {
                assert!(
                    services.contains_key(dependency),
                    "{name} depends on unknown {dependency}"
                );
                let wanted = if one_shot(dependency) {
                    "service_completed_successfully"
                } else {
                    "service_healthy"
                };
                assert_eq!(
                    condition["condition"], wanted,
                    "{name} must wait for {dependency} ({wanted})"
                );
            }
        }
    }
    // The dependency graph has no cycle: compose can order the start.
    let mut started: BTreeSet<&str> = BTreeSet::new();
    while started.len() < services.len() {
        let ready: Vec<&str> = services
            .iter()
            .filter(|(name, _)| !started.contains(name.as_str()))
            .filter(|(_, service)| {
                service
                    .get("depends_on")
                    .and_then(Value::as_object)
                    .is_none_or(|deps| deps.keys().all(|dep| started.contains(dep.as_str())))
            })
            .map(|(name, _)| name.as_str())
            .collect();
        assert!(
            !ready.is_empty(),
            "depends_on has a cycle among {:?}",
            names
        );
        started.extend(ready);
    }

    // Cluster credentials: the one-shot `credentials` service runs
    // `pushgrid credentials init DIR` into a named volume mounted at DIR.
    // Made here the same way (DIR a temporary directory), they must be what
    // every role loads at start (`Credentials::for_node`), with an admin token.
    let credentials = &services["credentials"];
    assert!(one_shot("credentials"), "credentials runs once");
    assert_eq!(credentials["image"], "pushgrid:latest");
    let init = string_list(&credentials["command"]);
    assert_eq!(
        init[..init.len() - 1],
        ["pushgrid", "credentials", "init"],
        "credentials command"
    );
    let credentials_path = init.last().unwrap().clone();
    let credentials_volume = string_list(&credentials["volumes"])
        .iter()
        .find_map(|volume| {
            let mut parts = volume.split(':');
            let (outside, inside) = (parts.next()?, parts.next()?);
            let writable = parts.next().is_none_or(|mode| mode != "ro");
            (inside == credentials_path && writable).then(|| outside.to_string())
        })
        .unwrap_or_else(|| panic!("credentials: nothing writable mounted at {credentials_path}"));
    assert!(
        compose["volumes"]
            .as_object()
            .is_some_and(|volumes| volumes.contains_key(&credentials_volume)),
        "{credentials_volume} is not a named volume"
    );
    // The image creates the directory for its user (a new named volume takes
    // the owner and mode of what the image has at the mount point).
    assert!(
        dockerfile.contains(&format!(
            "install -d -o pushgrid -g pushgrid -m 0700 {credentials_path}"
        )),
        "the Dockerfile does not create {credentials_path} for the pushgrid user"
    );
    let made = pushgrid_e2e::temp_dir("pushgrid-compose-credentials");
    let output = std::process::Command::new(binary("pushgrid"))
        .args(&init[1..init.len() - 1])
        .arg(&made)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pushgrid credentials init: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let source = all_rust_source(&root.join("crates"));

    let mut admin_targets = BTreeSet::new();
    let mut keeper_port = None;
    let mut room_ids = BTreeSet::new();
    for name in PUSHGRID_SERVICES {
        let service = &services[name];
        assert_eq!(service["image"], "pushgrid:latest", "{name} image");
        assert_eq!(
            service["build"]["dockerfile"], "deploy/Dockerfile",
            "{name} build"
        );
        let command = string_list(&service["command"]);
        let binary_name = command
            .first()
            .unwrap_or_else(|| panic!("{name} has no command"));
        assert!(
            binaries.contains(binary_name),
            "{name} runs {binary_name:?}, which is no [[bin]] of the workspace ({binaries:?})"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{binary_name}")),
            "the Dockerfile does not copy {binary_name} into the image"
        );
        let role = name.trim_end_matches(char::is_numeric);
        assert_eq!(binary_name, role, "{name} runs the wrong binary");

        // --config /etc/pushgrid/<file> is mounted from deploy/config/<file>.
        let config_at = command
            .iter()
            .position(|arg| arg == "--config")
            .unwrap_or_else(|| panic!("{name}: no --config"));
        let container_path = &command[config_at + 1];
        let volumes = string_list(&service["volumes"]);
        let mount = volumes
            .iter()
            .filter_map(|volume| {
                let mut parts = volume.split(':');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .find(|(_, inside)| container_path.starts_with(&format!("{inside}/")))
            .unwrap_or_else(|| panic!("{name}: {container_path} is not mounted"));
        let local_config = root.join(mount.0.trim_start_matches("./")).join(
            container_path
                .strip_prefix(&format!("{}/", mount.1))
                .unwrap(),
        );
        assert!(
            local_config.exists(),
            "{name}: {} does not exist",
            local_config.display()
        );

        let environment: BTreeMap<String, String> = service["environment"]
            .as_object()
            .map(|variables| {
                variables
                    .iter()
                    .map(|(key, value)| {
                        let value = match value {
                            Value::String(text) => text.clone(),
                            other => other.to_string(),
                        };
                        (key.clone(), interpolate_defaults(&value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let config = effective_config(binary_name, &local_config, &environment);
        let text = |key: &str| {
            config
                .get(key)
                .and_then(toml::Value::as_str)
                .unwrap_or("")
                .to_string()
        };

        // Every listener binds all interfaces on a port the service exposes.
        let expose: BTreeSet<u16> = string_list(&service["expose"])
            .iter()
            .map(|port| port.parse().unwrap())
            .collect();
        let mut listening = BTreeSet::new();
        for key in ["listen", "admin_listen", "http_listen", "tcp_listen"] {
            let addr = text(key);
            if addr.is_empty() {
                continue;
            }
            assert!(
                addr.starts_with("0.0.0.0:"),
                "{name}: {key} = {addr:?} is not reachable from other containers"
            );
            let port = port_of(&addr);
            assert!(
                expose.contains(&port),
                "{name}: {key} port {port} is not in expose {expose:?}"
            );
            listening.insert(port);
        }
        for published in string_list(&service["ports"]) {
            let inside: u16 = published.rsplit(':').next().unwrap().parse().unwrap();
            assert!(
                listening.contains(&inside),
                "{name} publishes {published} but nothing listens on {inside}"
            );
        }
        let admin_port = port_of(&text("admin_listen"));
        let health = string_list(&service["healthcheck"]["test"]).join(" ");
        assert!(
            health.contains(&format!("http://127.0.0.1:{admin_port}/healthz")),
            "{name}: health check {health:?} must GET /healthz on admin port {admin_port}"
        );
        admin_targets.insert(format!("{name}:{admin_port}"));
        if name == "keeper" {
            keeper_port = Some(port_of(&text("listen")));
        }
        assert_eq!(
            text("keeper"),
            format!("keeper:{}", keeper_port.unwrap()),
            "{name}: keeper address"
        );
        assert_eq!(text("advertise_host"), name, "{name}: advertised host");
        assert_eq!(
            config.get("log_json"),
            Some(&toml::Value::Boolean(true)),
            "{name}: JSON logs"
        );

        let depends: BTreeSet<String> = service
            .get("depends_on")
            .and_then(Value::as_object)
            .map(|deps| deps.keys().cloned().collect())
            .unwrap_or_default();
        let needs: &[&str] = match role {
            "keeper" => &["mysql"],
            "saver" => &["keeper", "redis", "mysql"],
            "center" => &["keeper", "saver", "register"],
            "room" => &["register", "saver", "coordinator"],
            _ => &["keeper"],
        };
        for need in needs {
            assert!(
                depends.contains(*need),
                "{name} must start after {need} is healthy"
            );
        }
        let mysql_url = format!("mysql://root:{mysql_password}@mysql:3306/{mysql_database}");
        if role == "keeper" || role == "saver" {
            assert_eq!(text("database_url"), mysql_url, "{name}: database_url");
        }
        if role == "saver" {
            assert_eq!(text("redis_url"), "redis://redis:6379", "{name}: redis_url");
        }
        if role == "room" {
            assert!(
                room_ids.insert(text("node_id")),
                "{name}: room node ids must differ"
            );
        }
        // Credentials: the role reads the volume the credentials service
        // wrote, after it ran, and the files there are the ones it loads.
        assert_eq!(
            text("credentials_dir"),
            credentials_path,
            "{name}: credentials_dir (a role without credentials refuses to start)"
        );
        assert!(
            volumes
                .iter()
                .any(|volume| *volume == format!("{credentials_volume}:{credentials_path}:ro")),
            "{name}: {credentials_volume} is not mounted (read-only) at {credentials_path}: {volumes:?}"
        );
        assert_eq!(
            service["depends_on"]["credentials"]["condition"], "service_completed_successfully",
            "{name} must start after the credentials exist"
        );
        let role_id = pushgrid_common::auth::role_by_name(role).unwrap();
        let loaded =
            pushgrid_common::auth::Credentials::for_node(role_id, &made.display().to_string())
                .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(loaded.role(), role_id);
        // The admin token (keeper admin API, dashboard, /debug/): its own
        // setting, else PUSHGRID_ADMIN_TOKEN, else the credentials' file.
        let admin_token = [
            text("admin_token"),
            environment
                .get("PUSHGRID_ADMIN_TOKEN")
                .cloned()
                .unwrap_or_default(),
        ]
        .into_iter()
        .find(|token| !token.trim().is_empty())
        .or_else(|| pushgrid_common::auth::read_admin_token(&made));
        assert!(
            admin_token.is_some_and(|token| token.len() >= 16),
            "{name}: no admin token of at least 16 characters"
        );
        // Variables other than PUSHGRID_<ROLE>__KEY (checked by
        // --print-config above) must be ones the code reads.
        for variable in environment.keys() {
            if variable.starts_with(&format!("PUSHGRID_{}__", role.to_uppercase())) {
                continue;
            }
            assert!(
                variable == "RUST_LOG" || source.contains(&format!("\"{variable}\"")),
                "{name}: {variable} is read by no crate"
            );
        }
    }
    std::fs::remove_dir_all(&made).unwrap();

    // Prometheus scrapes exactly every role's admin port.
    let prometheus = &services["prometheus"];
    assert!(
        string_list(&prometheus["volumes"])
            .iter()
            .any(|volume| volume.starts_with("./deploy/prometheus.yml:")),
        "prometheus must mount deploy/prometheus.yml"
    );
    let scrape = yaml_file(&root.join("deploy/prometheus.yml"));
    let mut targets = BTreeSet::new();
    for job in scrape["scrape_configs"].as_array().unwrap() {
        for static_config in job["static_configs"].as_array().unwrap() {
            targets.extend(string_list(&static_config["targets"]));
        }
    }
    assert_eq!(targets, admin_targets, "prometheus targets vs admin ports");

    // The Grafana dashboard asks only for metrics the code records.
    let grafana: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/pushgrid.json")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for panel in grafana["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("pushgrid_") {
                    used.insert(word.to_string());
                }
            }
        }
    }
    assert!(used.len() >= 8, "the dashboard shows too little: {used:?}");
    for metric in used {
        assert!(
            source.contains(&format!("\"{metric}\"")),
            "grafana uses {metric}, which no crate records"
        );
    }
}

fn all_rust_source(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            text.push_str(&all_rust_source(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    text
}

/// Runs a role binary with `args` and `env` and returns (success, stdout, stderr).
fn run_role(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = std::process::Command::new(binary(binary_name))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("PUSHGRID_CONFIG")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn config_errors_name_every_bad_key_and_where_it_came_from() {
    let dir = pushgrid_e2e::temp_dir("pushgrid-ops-config");
    let file = dir.join("room.toml");
    std::fs::write(
        &file,
        "heartbeat_sec = 30\nauth_timeout_secs = \"soon\"\ntcp_listen = \"0.0.0.0:8090\"\n[labels]\nregion = \"eu\"\n",
    )
    .unwrap();
    let file_arg = file.to_string_lossy().to_string();
    let (ok, _, stderr) = run_role(
        "room",
        &[
            "--config",
            &file_arg,
            "--set",
            "max_conections=5",
            "--print-config",
        ],
        &[
            ("PUSHGRID_ROOM__MAX_BODY", "big"),
            ("PUSHGRID_ROOM__OUTBOUND_QUEUEE", "3"),
        ],
    );
    assert!(!ok, "a bad config must fail");
    for expected in [
        "unknown key \"heartbeat_sec\"",
        "did you mean \"heartbeat_secs\"",
        "unknown key \"max_conections\" from --set",
        "did you mean \"max_connections\"",
        "unknown key \"outbound_queuee\" from PUSHGRID_ROOM__OUTBOUND_QUEUEE",
        "key \"auth_timeout_secs\"",
        "room.toml",
        "key \"max_body\"",
        "PUSHGRID_ROOM__MAX_BODY",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("labels"),
        "labels is a free-form map:\n{stderr}"
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "one error line, no backtrace:\n{stderr}"
    );

    // A missing file is named.
    let (ok, _, stderr) = run_role("center", &["--config", "/nonexistent/center.toml"], &[]);
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/center.toml does not exist"),
        "{stderr}"
    );

    // The effective config: defaults < file < environment < --set.
    std::fs::write(&file, "heartbeat_secs = 30\nmax_connections = 10\n").unwrap();
    let (ok, stdout, stderr) = run_role(
        "room",
        &[
            "--config",
            &file_arg,
            "--set",
            "max_connections=12",
            "--print-config",
        ],
        &[
            ("PUSHGRID_ROOM__HEARTBEAT_SECS", "77"),
            ("PUSHGRID_ROOM__MAX_CONNECTIONS", "11"),
        ],
    );
    assert!(ok, "{stderr}");
    let effective: toml::Table = stdout.parse().unwrap();
    assert_eq!(effective["heartbeat_secs"].as_integer(), Some(77));
    assert_eq!(effective["max_connections"].as_integer(), Some(12));
    assert_eq!(effective["tcp_listen"].as_str(), Some("127.0.0.1:8090"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let dir = pushgrid_e2e::temp_dir("pushgrid-ops-json");
    let log = dir.join("room.log");
    let credentials = dir.join("credentials");
    pushgrid_common::auth::init_dir(&credentials).unwrap();
    let credentials_dir = format!("credentials_dir={}", credentials.display());
    // keeper is unreachable: room logs warnings while it retries.
    let mut child = tokio::process::Command::new(binary("room"))
        .args([
            "--set",
            &credentials_dir,
            "--set",
            "keeper=127.0.0.1:1",
            "--set",
            "listen=127.0.0.1:0",
            "--set",
            "admin_listen=127.0.0.1:0",
            "--set",
            "tcp_listen=127.0.0.1:0",
            "--set",
            "log_json=true",
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let logged = eventually(WAIT, || async {
        std::fs::read_to_string(&log).is_ok_and(|text| text.lines().count() >= 2)
    })
    .await;
    let _ = child.kill().await;
    assert!(logged, "room logged nothing");
    let text = std::fs::read_to_string(&log).unwrap();
    for line in text.lines() {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(
            event["level"].is_string() && event["fields"].is_object(),
            "{line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every role process of a test cluster, by name.
fn roles(cluster: &TestCluster) -> Vec<&Proc> {
    let mut all = vec![
        &cluster.keeper,
        &cluster.register,
        &cluster.saver,
        &cluster.coordinator,
        &cluster.center,
        &cluster.dispatcher,
    ];
    all.extend(cluster.rooms.iter());
    all
}

/// `name value` samples of a Prometheus text page, summed over label sets.
fn samples(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap().to_string();
        *samples.entry(name).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    samples
}

async fn scrape(http: &reqwest::Client, proc: &Proc) -> HashMap<String, f64> {
    let response = http
        .get(format!("http://{}/metrics", proc.addr("admin")))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "{} /metrics: {}",
        proc.name,
        response.status()
    );
    samples(&response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_serves_health_and_the_metrics_of_a_push() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    for proc in roles(&cluster) {
        let response = cluster
            .http
            .get(format!("http://{}/healthz", proc.addr("admin")))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert_eq!(status, 200, "{} /healthz: {body}", proc.name);
        assert!(body.starts_with("ok "), "{} /healthz: {body}", proc.name);
    }

    let (mut device, _) = cluster.device("alice").await.unwrap();
    let ids = cluster.push(&["alice"], "metered").await.unwrap();
    let push = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(push.msg_id, ids[0]);

    let expectations: [(&Proc, &str, f64); 6] = [
        (&cluster.center, "pushgrid_center_pushed_total", 1.0),
        (&cluster.saver, "pushgrid_saver_stored_total", 1.0),
        (&cluster.rooms[0], "pushgrid_room_connections", 1.0),
        (&cluster.rooms[0], "pushgrid_room_delivered_total", 1.0),
        (&cluster.register, "pushgrid_register_sessions", 1.0),
        // Six roles register with keeper, and keeper lists itself.
        (&cluster.keeper, "pushgrid_keeper_nodes", 7.0),
    ];
    for (proc, metric, expected) in expectations {
        let http = cluster.http.clone();
        let seen = eventually(WAIT, || {
            let http = http.clone();
            async move { scrape(&http, proc).await.get(metric).copied() == Some(expected) }
        })
        .await;
        assert!(
            seen,
            "{}: {metric} is {:?}, expected {expected}",
            proc.name,
            scrape(&cluster.http, proc).await.get(metric)
        );
    }
    drop(device);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_profile_and_the_log_level_on_demand() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let admin = format!("http://{}", cluster.rooms[0].addr("admin"));
    let http = &cluster.http;

    // Every /debug/ route needs the admin token, from loopback too.
    for (method, path) in [
        (reqwest::Method::GET, "/debug/pprof/profile?seconds=1"),
        (reqwest::Method::GET, "/debug/log-level"),
        (reqwest::Method::PUT, "/debug/log-level"),
    ] {
        for token in [None, Some("wrong"), Some(&ADMIN_TOKEN[1..])] {
            let mut request = http.request(method.clone(), format!("{admin}{path}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.body("debug").send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            assert!(response.text().await.unwrap().contains("admin token"));
        }
    }

    for bad in ["0", "61", "ten"] {
        let response = http
            .get(format!("{admin}/debug/pprof/profile?seconds={bad}"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "seconds={bad}");
        assert!(response.text().await.unwrap().contains("1 to 60"));
    }

    // center is profiled while the test keeps its push API busy.
    let center_admin = format!("http://{}", cluster.center.addr("admin"));
    let profile = tokio::spawn({
        let http = http.clone();
        let url = format!("{center_admin}/debug/pprof/profile?seconds=2");
        async move { http.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap() }
    });
    let profiling = eventually(WAIT, || async {
        cluster.center.log_text().contains("cpu profile started")
    })
    .await;
    assert!(profiling, "the first profile started");
    let second = http
        .get(format!("{center_admin}/debug/pprof/profile?seconds=1"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 409, "one profile at a time");
    let mut pushes = 0;
    while !profile.is_finished() {
        cluster
            .push(&["alice", "bob", "carol"], "load")
            .await
            .unwrap();
        pushes += 1;
    }
    let response = profile.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "image/svg+xml");
    let svg = response.bytes().await.unwrap();
    std::fs::write(artifacts_dir().join("center-profile.svg"), &svg).unwrap();
    let text = String::from_utf8_lossy(&svg);
    assert!(
        text.contains("<svg"),
        "not an SVG: {}",
        &text[..text.len().min(200)]
    );
    assert!(
        text.contains("pushgrid_center"),
        "no center frames in the flamegraph after {pushes} pushes: {}",
        &text[..text.len().min(300)]
    );

    // The log filter, changed at run time.
    let level = |http: reqwest::Client, admin: String| async move {
        http.get(format!("{admin}/debug/log-level"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert_eq!(level(http.clone(), admin.clone()).await.trim(), "info");
    let changed = http
        .put(format!("{admin}/debug/log-level"))
        .bearer_auth(ADMIN_TOKEN)
        .body("info,pushgrid_room=debug")
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), 200);
    let now = level(http.clone(), admin.clone()).await;
    assert!(now.contains("pushgrid_room=debug"), "{now}");
    let refused = http
        .put(format!("{admin}/debug/log-level"))
        .bearer_auth(ADMIN_TOKEN)
        .body("info,[[[")
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("invalid log filter"));
    cluster.cleanup().await;
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium with `args` and `url`; returns stdout.
async fn chromium(args: &[String], url: &str) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs Debian's chromium package \
         (apt-get install -y chromium; .ci/run installs it)"
    );
    let profile = pushgrid_e2e::temp_dir("pushgrid-chromium");
    let output = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,1100",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium did not finish within 90 s")
    .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_connections_in_chromium() {
    let cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    // A second center with an admin token, in the same cluster.
    let token = format!("admin-{:08x}", rand::random::<u32>());
    let args: Vec<String> = [
        format!("keeper={}", cluster.keeper.addr("grpc")),
        "listen=127.0.0.1:0".into(),
        "admin_listen=127.0.0.1:0".into(),
        "http_listen=127.0.0.1:0".into(),
        "lease_ttl_secs=3".into(),
        format!("credentials_dir={}", cluster.credentials.display()),
        format!("admin_token={token}"),
    ]
    .into_iter()
    .flat_map(|setting| ["--set".to_string(), setting])
    .collect();
    let center = spawn(&cluster.dir, "center-admin", "center", &args)
        .await
        .unwrap();
    let base = format!("http://{}", center.addr("http"));
    let http = &cluster.http;

    // The token guards the page and its data; the cluster's own center has
    // another one (the credentials directory's).
    let status = |url: String| async move { http.get(url).send().await.unwrap().status() };
    assert_eq!(status(format!("{base}/dashboard")).await, 401);
    assert_eq!(status(format!("{base}/dashboard?token=wrong")).await, 401);
    assert_eq!(status(format!("{base}/dashboard/data")).await, 401);
    assert_eq!(
        status(format!("{}/dashboard?token={token}", cluster.center_url())).await,
        401
    );
    let page = http
        .get(format!("{base}/dashboard?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("pushgrid dashboard"));

    let (mut alice, _) = cluster.device("alice").await.unwrap();
    let (_bob, _) = cluster.device("bob").await.unwrap();
    let (_carol, _) = cluster.device("carol").await.unwrap();
    cluster.push(&["alice"], "hello").await.unwrap();
    next_push(&mut alice, WAIT).await.unwrap();

    let data = || async {
        http.get(format!("{base}/dashboard/data"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let counted = eventually(WAIT, || async {
        data().await["totals"]["connections"] == 3
    })
    .await;
    let snapshot = data().await;
    assert!(
        counted,
        "the dashboard never counted 3 connections: {snapshot}"
    );
    assert_eq!(snapshot["rooms"].as_array().unwrap().len(), 2, "{snapshot}");
    // Every role's node, keeper's too (keepers are listed so that roles can
    // fail over between them).
    assert_eq!(snapshot["totals"]["nodes"], 9, "{snapshot}");
    assert_eq!(snapshot["totals"]["healthy_nodes"], 9, "{snapshot}");
    assert!(
        snapshot["totals"]["messages_in"].as_f64().unwrap() >= 1.0,
        "{snapshot}"
    );
    assert!(
        snapshot["totals"]["messages_out"].as_f64().unwrap() >= 1.0,
        "{snapshot}"
    );

    // The page, after its scripts ran.
    let url = format!("{base}/dashboard?token={token}");
    let dom = chromium(&["--dump-dom".into()], &url).await;
    let figure = dom
        .find("id=\"connections-total\"")
        .map(|at| &dom[at..(at + 80).min(dom.len())])
        .unwrap_or_else(|| panic!("no connection figure in the page:\n{dom}"));
    assert!(
        figure.contains("data-value=\"3\""),
        "the page shows {figure:?}, not 3 connections"
    );
    assert!(dom.contains("healthy"), "no node health in the page");
    assert_eq!(dom.matches("data-room=").count(), 2, "one row per room");

    let screenshot = artifacts_dir().join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&[format!("--screenshot={}", screenshot.display())], &url).await;
    let png = std::fs::read(&screenshot).expect("chromium wrote no screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
    assert!(png.len() > 10_000, "the screenshot is suspiciously small");
    drop(center);
    cluster.cleanup().await;
}
