//! End to end: a real `pushgrid dev` (every role, SQLite) on port-0 listeners,
//! and the `loadtest` binary against it with a few hundred devices spread over
//! several worker processes and source addresses.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn pushgrid_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = target_dir();
            let profile = dir.file_name().unwrap().to_string_lossy().to_string();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut command = Command::new(cargo);
            command
                // The workspace's own feature set, so this shares the build of
                // `cargo build --workspace --bins` instead of making another.
                .args(["build", "--quiet", "--workspace", "--bins", "--target-dir"])
                .arg(dir.parent().unwrap())
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile != "debug" {
                command.args(["--profile", &profile]);
            }
            assert!(
                command.status().unwrap().success(),
                "building pushgrid failed"
            );
            dir.join("pushgrid")
        })
        .clone()
}

/// A `pushgrid dev` process, killed on drop.
struct Dev {
    child: Child,
    bound: Arc<Mutex<HashMap<String, String>>>,
    _dir: PathBuf,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self._dir);
    }
}

impl Dev {
    fn start() -> Dev {
        let dir = std::env::temp_dir().join(format!(
            "pushgrid-lt-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(pushgrid_binary())
            .args(["dev", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--dispatcher-listen",
                "127.0.0.1:0",
                "--center-listen",
                "127.0.0.1:0",
                "--room-listen",
                "127.0.0.1:0",
                "--ws-listen",
                "127.0.0.1:0",
                "--demo-listen",
                "127.0.0.1:0",
                "--machine-lines",
            ])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("dev.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let bound = Arc::new(Mutex::new(HashMap::new()));
        let lines = bound.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() == 4 && parts[0] == "PUSHGRID_BOUND" {
                    lines
                        .lock()
                        .unwrap()
                        .insert(format!("{} {}", parts[1], parts[2]), parts[3].to_owned());
                }
            }
        });
        let dev = Dev {
            child,
            bound,
            _dir: dir,
        };
        let started = Instant::now();
        while dev.get("dev ready").is_none() {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "pushgrid dev did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        dev
    }

    fn get(&self, key: &str) -> Option<String> {
        self.bound.lock().unwrap().get(key).cloned()
    }

    fn room(&self) -> String {
        self.get("room tcp").expect("room tcp address")
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000_007
}

fn loadtest(dev: &Dev, scenario: &str, extra: &[&str]) -> Value {
    // Tests run in parallel: each scenario gets source addresses of its own.
    let source_base = match scenario {
        "connect" => "127.0.10.2",
        "unicast" => "127.0.11.2",
        "churn" => "127.0.12.2",
        "slow" => "127.0.13.2",
        "push-rate" => "127.0.15.2",
        _ => "127.0.14.2",
    };
    loadtest_from(dev, scenario, source_base, extra)
}

/// [`loadtest`] from the given first source address.
fn loadtest_from(dev: &Dev, scenario: &str, source_base: &str, extra: &[&str]) -> Value {
    let json = dev._dir.join(format!("{scenario}-{source_base}.json"));
    // 300 devices on 3 workers unless `extra` says otherwise.
    let sized = extra.contains(&"--connections");
    let size: &[&str] = if sized {
        &[]
    } else {
        &["--connections", "300", "--per-worker", "100"]
    };
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg(scenario)
        .args(["--rooms", &dev.room()])
        .args([
            "--api",
            &format!("http://{}", dev.get("dev ready").unwrap()),
        ])
        .args(size)
        .args(["--hold-secs", "1"])
        .args(["--source-base", source_base])
        .args([
            "--quiet",
            "--drain-secs",
            "60",
            "--quiet-secs",
            "15",
            "--server-pids",
        ])
        .arg(dev.child.id().to_string())
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "loadtest {scenario} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{stdout}");
    serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap()
}

#[test]
fn loadtest_connect_spreads_devices_over_workers() {
    let dev = Dev::start();
    let report = loadtest(&dev, "connect", &[]);
    assert_eq!(report["connections"]["established"], 300, "{report:#}");
    assert_eq!(report["connections"]["workers"], 3);
    assert!(
        report["connections"]["connect_rate_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert_eq!(report["processes"].as_array().unwrap().len(), 1);
}

#[test]
fn loadtest_unicast_accounts_for_every_message() {
    let dev = Dev::start();
    let report = loadtest(
        &dev,
        "unicast",
        &["--messages-per-user", "3", "--batch", "70"],
    );
    let messages = &report["messages"];
    assert_eq!(report["connections"]["established"], 300, "{report:#}");
    assert_eq!(messages["accepted"], 900, "{report:#}");
    assert_eq!(messages["delivered"], 900, "{report:#}");
    assert_eq!(messages["lost"], 0);
    assert_eq!(messages["unexpected"], 0);
    // Every delivery, redeliveries included, has a latency.
    assert!(messages["latency_ms"]["count"].as_u64().unwrap() >= 900);
}

/// The CI step of the push-rate benchmark: a small run against `pushgrid
/// dev` (in-process roles) that fails on any lost, misrouted or unexpected
/// message. Its figures are printed, never asserted.
#[test]
fn loadtest_push_rate_accounts_for_every_message_by_id_and_device() {
    let dev = Dev::start();
    for users_per_call in ["1", "10"] {
        let report = loadtest(
            &dev,
            "push-rate",
            &[
                "--rate",
                "1000",
                "--secs",
                "2",
                "--users-per-call",
                users_per_call,
                "--push-concurrency",
                "16",
            ],
        );
        let messages = &report["messages"];
        assert_eq!(report["connections"]["established"], 300, "{report:#}");
        assert_eq!(messages["accepted"], 2000, "{report:#}");
        assert_eq!(messages["delivered"], 2000, "{report:#}");
        assert_eq!(messages["lost"], 0, "{report:#}");
        assert_eq!(messages["misrouted"], 0, "{report:#}");
        assert_eq!(messages["unexpected"], 0, "{report:#}");
        let rate = &report["push_rate"];
        assert_eq!(rate["asked_per_sec"], 1000, "{report:#}");
        assert_eq!(rate["users_per_call"].to_string(), users_per_call);
        assert_eq!(rate["calls"], 2000 / users_per_call.parse::<u64>().unwrap());
        assert!(rate["answer_ms"]["count"].as_u64().unwrap() > 0);
        // The pushgrid process was measured (its CPU is a figure, not a bound).
        let pushgrid_rows = rate["cpu"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|row| row["kind"] == "pushgrid")
            .count();
        assert_eq!(pushgrid_rows, 1, "{report:#}");
        assert!(!report["meta"]["commit"].as_str().unwrap().is_empty());
    }
}

#[test]
fn loadtest_churn_reconnects_and_loses_nothing() {
    let dev = Dev::start();
    let report = loadtest(
        &dev,
        "churn",
        &["--storms", "2", "--storm-jitter-ms", "300"],
    );
    assert_eq!(
        report["churn"]["storms"].as_array().unwrap().len(),
        2,
        "{report:#}"
    );
    assert_eq!(report["churn"]["reconnected"], 600, "{report:#}");
    assert_eq!(report["messages"]["accepted"], 600, "{report:#}");
    assert_eq!(report["messages"]["lost"], 0, "{report:#}");
}

#[test]
fn loadtest_slow_devices_do_not_cost_the_others_messages() {
    let dev = Dev::start();
    let report = loadtest(
        &dev,
        "slow",
        &[
            "--slow-every",
            "10",
            "--messages-per-user",
            "20",
            "--payload-bytes",
            "8000",
        ],
    );
    assert_eq!(report["slow"]["devices"], 30, "{report:#}");
    let messages = &report["messages"];
    assert_eq!(messages["accepted"], 270 * 20, "{report:#}");
    // Every accepted message is delivered or listed as lost (the count is the
    // server's result, reported; not asserted to be zero here).
    assert_eq!(
        messages["delivered"].as_u64().unwrap() + messages["lost"].as_u64().unwrap(),
        270 * 20
    );
    assert_eq!(
        messages["lost_ids"].as_array().unwrap().len() as u64,
        messages["lost"].as_u64().unwrap()
    );
}

#[test]
fn loadtest_broadcast_counts_every_delivery_per_offset() {
    let dev = Dev::start();
    let report = loadtest(&dev, "broadcast", &["--broadcasts", "3"]);
    let broadcast = &report["broadcast"];
    assert_eq!(broadcast["status"], "ok", "{report:#}");
    assert_eq!(broadcast["subscribed"], 300, "{report:#}");
    assert_eq!(broadcast["accepted"], 3, "{report:#}");
    let offsets: Vec<u64> = broadcast["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|offset| offset.as_u64().unwrap())
        .collect();
    assert_eq!(offsets.len(), 3);
    assert!(
        offsets.windows(2).all(|pair| pair[0] < pair[1]),
        "{offsets:?}"
    );
    // Every subscriber got every broadcast once, in order: nothing lost,
    // nothing twice, counted per device.
    assert_eq!(broadcast["devices"], 300, "{report:#}");
    assert_eq!(broadcast["expected_deliveries"], 900, "{report:#}");
    assert_eq!(broadcast["delivered"], 900, "{report:#}");
    assert_eq!(broadcast["lost"], 0, "{report:#}");
    assert_eq!(
        broadcast["lost_by_offset"],
        serde_json::json!({}),
        "{report:#}"
    );
    assert_eq!(broadcast["duplicated"], 0, "{report:#}");
    assert_eq!(broadcast["out_of_order"], 0, "{report:#}");
    assert_eq!(broadcast["unexpected"], 0, "{report:#}");
    assert_eq!(broadcast["latency_ms"]["count"], 900, "{report:#}");
    assert_eq!(broadcast["last_device_ms"]["count"], 3, "{report:#}");
    // The worker reports arrived (the connect histogram comes only with them).
    assert_eq!(
        report["connections"]["connect_ms"]["count"], 300,
        "{report:#}"
    );
    assert!(report["notes"].as_array().unwrap().is_empty(), "{report:#}");
}

/// The CI step of the broadcast benchmark: 500 devices x 50 broadcasts with
/// 8 broadcast calls in flight against `pushgrid dev`. Fails on any offset
/// lost by any device, delivered twice or out of offset order; prints the
/// figures and asserts no timing.
#[test]
fn loadtest_broadcast_in_flight_reaches_every_device_once_in_order() {
    let dev = Dev::start();
    let report = loadtest_from(
        &dev,
        "broadcast",
        "127.0.16.2",
        &[
            "--connections",
            "500",
            "--per-worker",
            "250",
            "--broadcasts",
            "50",
            "--broadcast-concurrency",
            "8",
            "--broadcast-interval-ms",
            "0",
            "--topic",
            "ci-order",
        ],
    );
    let broadcast = &report["broadcast"];
    eprintln!(
        "broadcast 500 x 50, 8 in flight: {} deliveries/s, latency {}, last device {}",
        broadcast["deliveries_per_sec"], broadcast["latency_ms"], broadcast["last_device_ms"]
    );
    assert_eq!(broadcast["status"], "ok", "{report:#}");
    assert_eq!(broadcast["in_flight"], 8, "{report:#}");
    assert_eq!(broadcast["devices"], 500, "{report:#}");
    assert_eq!(broadcast["accepted"], 50, "{report:#}");
    let offsets: Vec<u64> = broadcast["offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|offset| offset.as_u64().unwrap())
        .collect();
    assert!(
        offsets.windows(2).all(|pair| pair[1] == pair[0] + 1),
        "one topic, consecutive offsets: {offsets:?}"
    );
    assert_eq!(broadcast["expected_deliveries"], 25_000, "{report:#}");
    assert_eq!(broadcast["lost"], 0, "{}", broadcast["lost_sample"]);
    assert_eq!(broadcast["delivered"], 25_000, "{report:#}");
    assert_eq!(broadcast["duplicated"], 0, "{report:#}");
    assert_eq!(
        broadcast["out_of_order"], 0,
        "on {} devices",
        broadcast["devices_out_of_order"]
    );
    assert_eq!(broadcast["skipped_ahead"], 0, "{report:#}");
    assert_eq!(broadcast["unexpected"], 0, "{report:#}");
    assert_eq!(broadcast["latency_ms"]["count"], 25_000, "{report:#}");
}

/// Runs `loadtest million --quiet` with `args` in a fresh work directory;
/// the JSON report goes to `<dir>/<name>.json`. Returns the directory and
/// stderr, after checking the run succeeded.
fn million(name: &str, args: &[&str]) -> (PathBuf, String) {
    pushgrid_binary(); // builds every role binary beside `loadtest`
    let dir = std::env::temp_dir().join(format!("pushgrid-lt-{name}-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .arg("million")
        .args(args)
        .arg("--quiet")
        .arg("--work-dir")
        .arg(&dir)
        .arg("--json")
        .arg(dir.join(format!("{name}.json")))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(
        output.status.success(),
        "loadtest million failed:\n{stdout}\n{stderr}"
    );
    eprintln!("{stdout}");
    (dir, stderr)
}

/// `loadtest million` at a small size: it starts keeper, register, saver,
/// coordinator, center and two rooms on the real Redis and MariaDB, runs
/// unicast and broadcast with nothing lost, and leaves no process and no
/// database behind.
#[test]
fn loadtest_million_starts_its_cluster_on_redis_and_mysql_and_cleans_up() {
    let (dir, stderr) = million(
        "million",
        &[
            "--scenarios",
            "unicast,broadcast",
            "--connections",
            "200",
            "--per-room",
            "100",
            "--messages-per-user",
            "2",
            "--broadcasts",
            "3",
            "--hold-secs",
            "1",
            "--max-minutes",
            "3",
            "--source-base",
            "127.0.15.2",
        ],
    );
    let read = |name: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(name)).unwrap()).unwrap()
    };
    let unicast = read("million.unicast.json");
    let broadcast = read("million.broadcast.json");

    assert_eq!(unicast["cluster"]["store"], "redis + mysql", "{unicast:#}");
    assert_eq!(unicast["cluster"]["rooms"], 2);
    assert_eq!(unicast["connections"]["established"], 200, "{unicast:#}");
    assert_eq!(unicast["messages"]["accepted"], 400, "{unicast:#}");
    assert_eq!(unicast["messages"]["delivered"], 400, "{unicast:#}");
    assert_eq!(unicast["messages"]["lost"], 0, "{unicast:#}");
    assert_eq!(broadcast["broadcast"]["delivered"], 600, "{broadcast:#}");
    assert_eq!(
        broadcast["broadcast"]["lost_by_offset"],
        serde_json::json!({})
    );

    // Every role was measured, each room held its share.
    let processes = unicast["processes"].as_array().unwrap();
    let roles: Vec<&str> = processes
        .iter()
        .map(|process| process["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "keeper",
            "register",
            "saver",
            "coordinator",
            "center",
            "room",
            "room"
        ]
    );
    for room in &processes[5..] {
        assert_eq!(room["connections"], 100, "{unicast:#}");
    }

    // Cleaned up: the started processes are gone and the database is dropped.
    for process in processes {
        let pid = process["pid"].as_u64().unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("--set"),
            "{} (pid {pid}) still runs",
            process["role"]
        );
    }
    let database = unicast["cluster"]["mysql_database"].as_str().unwrap();
    assert!(
        stderr.contains(&format!("dropped database {database}")),
        "{stderr}"
    );
    let exists = Command::new("mariadb")
        .args(["-uroot", "-h127.0.0.1", "-N", "-e"])
        .arg(format!(
            "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = '{database}'"
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&exists.stdout).trim(), "0");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 7 and 11: with 50,000 devices connected on 3 rooms, kill -9 of
/// register (every session must come back to the new process), then kill -9
/// of every room at once, restarted on the same addresses (a reconnect storm
/// of all 50,000): every device is back, register holds exactly one session
/// per device (none of the dead processes' left), and a unicast to every
/// device afterwards is delivered with nothing lost. `PUSHGRID_FAULT_DEVICES`
/// changes the size.
#[test]
fn loadtest_million_register_kill_and_room_storm_at_50000_devices() {
    let devices: u64 = std::env::var("PUSHGRID_FAULT_DEVICES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(50_000);
    let (connections, per_room) = (devices.to_string(), devices.div_ceil(3).to_string());
    let (dir, _) = million(
        "faults",
        &[
            "--scenarios",
            "unicast",
            "--connections",
            &connections,
            "--per-room",
            &per_room,
            "--faults",
            "kill-register,kill-rooms",
            "--hold-secs",
            "1",
            "--max-minutes",
            "12",
            "--ramp-timeout-secs",
            "300",
            "--drain-secs",
            "240",
            "--quiet-secs",
            "60",
            "--source-base",
            "127.0.16.2",
        ],
    );
    let json = dir.join("faults.json");
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["connections"]["established"], devices, "{report:#}");
    let faults = report["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 2, "{report:#}");
    for (fault, name) in faults.iter().zip(["register", "every room"]) {
        assert!(
            fault["detail"]["fault"].as_str().unwrap().contains(name),
            "{fault:#}"
        );
        assert_eq!(fault["open_before"], devices, "{fault:#}");
        assert_eq!(fault["register_sessions_before"], devices, "{fault:#}");
        assert_eq!(fault["all_open_again"], true, "{fault:#}");
        assert_eq!(fault["open_after"], devices, "{fault:#}");
        assert_eq!(fault["register_sessions_after"], devices, "{fault:#}");
        assert_eq!(fault["stale_or_missing_sessions"], 0, "{fault:#}");
    }
    // The register kill closes no device; the room kill closes every one
    // (and a device whose inbox read failed under the storm is closed again).
    assert_eq!(faults[0]["closed_by_server"], 0, "{report:#}");
    assert!(
        faults[1]["closed_by_server"].as_u64().unwrap() >= devices,
        "{report:#}"
    );
    assert_eq!(report["messages"]["accepted"], devices, "{report:#}");
    assert_eq!(report["messages"]["delivered"], devices, "{report:#}");
    assert_eq!(report["messages"]["lost"], 0, "{report:#}");
    assert_eq!(report["messages"]["duplicated"], 0, "{report:#}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 21's fault plan through `loadtest cluster-faults`, at a small size:
/// `pushgrid cluster` with two keepers, savers, centers and rooms on its own
/// Redis and a MySQL database of its own; under unicast and broadcast load
/// every role instance is killed -9 in turn, Redis is restarted empty and
/// MySQL locked. The command itself fails when a check fails; the report
/// says what each check counted.
#[test]
fn loadtest_cluster_faults_loses_nothing_and_the_answers_tell_the_truth() {
    pushgrid_binary(); // builds `pushgrid` beside `loadtest`
    let dir = std::env::temp_dir().join(format!("pushgrid-lt-cf-{}", rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("cluster-faults.json");
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["cluster-faults", "--quiet", "--connections", "300"])
        .args(["--per-room", "150", "--batch", "5", "--push-rate", "300"])
        .args(["--push-concurrency", "16", "--broadcast-interval-ms", "250"])
        .args(["--hold-secs", "1", "--lock-secs", "5", "--max-minutes", "8"])
        .args(["--source-base", "127.0.18.2", "--work-dir"])
        .arg(&dir)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "loadtest cluster-faults failed:\n{stdout}\n{stderr}"
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let accounting = &report["under_faults"];
    assert_eq!(
        accounting["failures"],
        serde_json::json!([]),
        "{accounting:#}"
    );
    // 11 kills (2 keepers, register, 2 savers, 2 centers, coordinator,
    // dispatcher, 2 rooms), Redis restarted, MySQL locked.
    assert_eq!(report["faults"].as_array().unwrap().len(), 13, "{report:#}");
    assert_eq!(
        report["cluster"]["launcher_restarts_total"], 11.0,
        "{report:#}"
    );
    assert!(
        report["messages"]["accepted"].as_u64().unwrap() > 300,
        "{report:#}"
    );
    assert_eq!(report["messages"]["lost"], 0, "{report:#}");
    assert!(
        accounting["broadcasts_accepted"].as_u64().unwrap() > 20,
        "{accounting:#}"
    );
    assert_eq!(
        accounting["broadcast_missing_without_gap"], 0,
        "{accounting:#}"
    );
    assert_eq!(accounting["refused_delivered"], 0, "{accounting:#}");
    let _ = std::fs::remove_dir_all(&dir);
}
