//! `pushgrid dev`: all roles in one process on the embedded SQLite store,
//! driven the way the README tells a newcomer to.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, msg};
use pushgrid_e2e::{binary, next_frame, next_push, spawn_until, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_delivers_on_the_embedded_store() {
    let dir = temp_dir("pushgrid-dev");
    let args: Vec<String> = [
        "dev",
        "--data-dir",
        dir.join("data").to_str().unwrap(),
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
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    let dev = spawn_until(&dir, "dev", "pushgrid", &args, "dev")
        .await
        .unwrap();
    let center = dev.addr("center/http");
    let dispatcher = dev.addr("dispatcher/http");

    // The token command of the README.
    let output = std::process::Command::new(binary("pushgrid"))
        .args(["token", "--app", "demo", "--user", "alice"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let token = String::from_utf8(output.stdout).unwrap().trim().to_string();

    // The client CLI of the README, waiting for two pushes.
    let client = tokio::process::Command::new(binary("pushgrid-client"))
        .args([
            "--dispatcher",
            &format!("http://{dispatcher}"),
            "--token",
            &token,
            "--count",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // The curl of the README, repeated until the client is connected.
    let http = reqwest::Client::new();
    let push = |payload: &'static str| {
        let http = http.clone();
        async move {
            let response = http
                .post(format!("http://{center}/api/push"))
                .header("Authorization", "apikey demo-key")
                .body(format!(r#"{{"users":["alice"],"payload":"{payload}"}}"#))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(status, 200, "{body}");
            body["result"]["messages"][0]["id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        }
    };
    push("hello").await;
    push("world").await;
    let output = tokio::time::timeout(Duration::from_secs(20), client.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8(output.stdout).unwrap(), "hello\nworld\n");

    // The CLI acked both: once its acks reached the store (they travel in the
    // background, so a device connecting at once may still get a copy), a raw
    // device for alice gets nothing on connect. A new message still arrives,
    // and is redelivered until it is acked.
    let auth = || msg::Auth {
        token: token.clone(),
        device_id: "raw".into(),
        platform: "test".into(),
    };
    let room = dev.addr("room/tcp").to_string();
    let mut acked_everywhere = false;
    for _ in 0..20 {
        let (mut device, _) = Connection::connect(&room, auth()).await.unwrap();
        if next_frame(&mut device, Duration::from_millis(500))
            .await
            .is_err()
        {
            acked_everywhere = true;
            break;
        }
    }
    assert!(acked_everywhere, "acked messages kept coming back");
    let (mut device, _) = Connection::connect(&room, auth()).await.unwrap();
    let id = push("third").await;
    assert_eq!(
        next_push(&mut device, Duration::from_secs(10))
            .await
            .unwrap()
            .msg_id,
        id
    );
    drop(device);
    let (mut device, _) = Connection::connect(&room, auth()).await.unwrap();
    let again = next_push(&mut device, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!((again.msg_id, &again.payload[..]), (id, &b"third"[..]));
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}
