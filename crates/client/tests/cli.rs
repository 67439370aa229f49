//! The `pushgrid-client` binary against a fake room.

#![allow(clippy::unwrap_used)]

mod fake_room;

use std::process::Stdio;
use std::time::Duration;

use fake_room::FakeRoom;
use tokio::process::Command;

fn cli() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pushgrid-client"));
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn prints_payloads_acks_and_exits_after_count() {
    let room = FakeRoom::start_with(&[(1, "hello"), (2, "caf\u{e9} \u{2615}")], 30).await;
    let child = cli()
        .args(["--token", "good", "--addr", &room.addr, "--count", "2"])
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "status {:?}, stderr: {stderr}",
        output.status
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "hello\ncaf\u{e9} \u{2615}\n"
    );
    assert!(stderr.contains("connected"), "{stderr}");
    room.wait_until("both are acked", |state| state.inbox.is_empty())
        .await;
    assert_eq!(room.state.lock().await.auths[0].platform, "cli");
}

#[tokio::test]
async fn auth_failure_exits_non_zero_with_the_servers_message() {
    let room = FakeRoom::start().await;
    let child = cli()
        .args(["--token", "bad", "--addr", &room.addr])
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("authentication refused") && stderr.contains("token expired"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

#[tokio::test]
async fn a_bad_room_address_is_refused_before_connecting() {
    let child = cli()
        .args(["--token", "good", "--addr", "http://127.0.0.1:8090"])
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("http://127.0.0.1:8090") && stderr.contains("unknown transport"),
        "{stderr}"
    );
}
