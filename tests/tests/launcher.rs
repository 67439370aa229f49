//! `pushgrid cluster` supervises its roles: a role process that dies is
//! started again by the launcher, on the addresses it had, and counted; the
//! cluster stops only when asked.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, msg};
use pushgrid_e2e::launcher::{Launcher, launcher_args, process_alive};
use pushgrid_e2e::{MYSQL_SERVER, REDIS_URL, TestApp, eventually, metric, next_push, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_launcher_restarts_a_killed_role_on_its_address_and_stops_only_when_asked() {
    let dir = temp_dir("pushgrid-launcher");
    let app = TestApp::random();
    let database = format!("pg_e2e_{}", &app.id[3..]);
    let mut args = launcher_args(&app, &format!("{MYSQL_SERVER}/{database}"), REDIS_URL);
    args.extend(["--rooms".to_string(), "2".to_string()]);
    let mut launcher = Launcher::start(&dir, &args).await.unwrap();
    let instances = launcher.instances();
    assert_eq!(
        instances,
        [
            "center-0",
            "coordinator",
            "dispatcher",
            "keeper-0",
            "register-0",
            "room-0",
            "room-1",
            "saver-0"
        ]
    );
    let http = reqwest::Client::new();

    // The credentials it created: the directory 0700, every file 0600; it
    // says where the admin token is, and that token opens /debug/ on its
    // own admin port (and nothing else does).
    let credentials = &launcher.credentials;
    let mode = |path: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(credentials), 0o700, "{}", credentials.display());
    let mut files: Vec<String> = std::fs::read_dir(credentials)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "admin-token",
            "center.key",
            "coordinator.key",
            "dispatcher.key",
            "keeper.key",
            "register.key",
            "room.key",
            "saver.key",
            "verifiers"
        ]
    );
    for file in &files {
        assert_eq!(mode(&credentials.join(file)), 0o600, "{file}");
    }
    let token_file = credentials.join("admin-token");
    let said = format!("admin token in {}", token_file.display());
    assert!(
        launcher.own_lines().iter().any(|line| line.contains(&said)),
        "the launcher did not say {said:?}: {:?}",
        launcher.own_lines()
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    let debug = format!("http://{}/debug/log-level", launcher.admin());
    let without = http.get(&debug).send().await.unwrap().status();
    assert_eq!(without, 401, "/debug/ without the admin token");
    let with = http
        .get(&debug)
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(with, 200, "/debug/ with the printed admin token");

    let center = launcher.addr("center-0", "http");
    let room = launcher.addr("room-0", "tcp").to_string();
    let push = |payload: &'static str| {
        let http = http.clone();
        let key = app.api_key.clone();
        async move {
            let response = http
                .post(format!("http://{center}/api/push"))
                .header("Authorization", format!("apikey {key}"))
                .json(&serde_json::json!({ "users": ["lena"], "payload": payload }))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: serde_json::Value = response.json().await.unwrap();
            body["result"]["messages"][0]["id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    let auth = || msg::Auth {
        token: app.token("lena"),
        device_id: "lena-phone".into(),
        platform: "test".into(),
    };

    // kill -9 of a room: the launcher starts it again on the same device port.
    let killed = launcher.kill_instance("room-0");
    assert!(
        launcher
            .wait_started("room-0", 2, Duration::from_secs(60))
            .await,
        "room-0 came back: {:?}\n{}",
        launcher.instance("room-0"),
        launcher.log_text()
    );
    let again = launcher.instance("room-0");
    assert_ne!(again.pid, killed);
    assert_eq!(again.exits, 1);
    assert_eq!(launcher.addr("room-0", "tcp").to_string(), room);
    assert!(
        launcher.log_text().contains("role exited; restarting it"),
        "the restart is logged"
    );
    let restarts = metric(
        launcher.admin(),
        "pushgrid_launcher_restarts_total",
        "instance=\"room-0\"",
    )
    .await;
    assert_eq!(restarts, 1.0);
    let others = metric(launcher.admin(), "pushgrid_launcher_restarts_total", "").await;
    assert_eq!(others, 1.0, "no other role was restarted");

    // The restarted room serves devices at its old address.
    let delivered = eventually(Duration::from_secs(60), || async {
        let Ok((mut device, _)) = Connection::connect(&room, auth()).await else {
            return false;
        };
        let id = push("after the restart").await;
        let Ok(message) = next_push(&mut device, Duration::from_secs(10)).await else {
            return false;
        };
        assert_eq!(message.msg_id, id);
        true
    })
    .await;
    assert!(delivered, "a push reached a device on the restarted room");

    // Stopped only when asked: SIGTERM ends the launcher and every role.
    let pids: Vec<u32> = launcher
        .instances()
        .iter()
        .map(|name| launcher.instance(name).pid)
        .collect();
    assert!(pids.iter().all(|pid| *pid > 0 && process_alive(*pid)));
    let status = launcher.stop(Duration::from_secs(60)).await.unwrap();
    assert!(status.success(), "launcher exit: {status}");
    let stopped = pushgrid_e2e::eventually(Duration::from_secs(10), || async {
        pids.iter().all(|pid| !process_alive(*pid))
    })
    .await;
    assert!(stopped, "every role process ended with the launcher");
    drop(launcher);
    if let Ok(pool) = pushgrid_common::db::connect(&format!("{MYSQL_SERVER}/{database}"), 1).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS `{database}`"
        )))
        .execute(&pool)
        .await;
    }
    println!("log kept in {}", dir.display());
}

/// A role that would start without cluster credentials (here a `--role-set`
/// that empties or misplaces its `credentials_dir`): the launcher refuses to
/// start anything, at once, and says what to set, rather than restarting a
/// role that cannot run.
#[tokio::test]
async fn the_launcher_refuses_roles_without_credentials_and_says_what_to_set() {
    let dir = temp_dir("pushgrid-launcher-nocred");
    let missing = dir.join("nowhere");
    let cases = [
        (
            "saver:credentials_dir=".to_string(),
            vec![
                "saver cannot start".to_string(),
                "set credentials_dir".to_string(),
                "PUSHGRID_SAVER__CREDENTIALS_DIR".to_string(),
                "pushgrid credentials init DIR".to_string(),
            ],
        ),
        (
            format!("room:credentials_dir=\"{}\"", missing.display()),
            vec![
                "room cannot start".to_string(),
                format!("{}", missing.join("room.key").display()),
                "pushgrid credentials init".to_string(),
            ],
        ),
    ];
    for (role_set, expected) in cases {
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(pushgrid_e2e::binary("pushgrid"))
                .args([
                    "cluster",
                    "--ephemeral-ports",
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--data-dir",
                ])
                .arg(dir.join("data"))
                .args(["--role-set", &role_set])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("the launcher refused at once")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{role_set}: started anyway");
        for part in expected {
            assert!(
                stderr.contains(&part),
                "{role_set}: {part:?} not in {stderr}"
            );
        }
        assert!(
            !stdout.contains("PUSHGRID_CHILD"),
            "{role_set}: a role was started: {stdout}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
