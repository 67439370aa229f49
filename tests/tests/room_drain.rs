//! Draining a room: every device is sent to the other room (KICK with a
//! reconnect delay and `reconnect_to`), pushes keep flowing while it happens,
//! and every message the push API accepted reaches its device.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, Event};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually};
use tokio::sync::mpsc;

const DEVICES: usize = 24;

struct Device {
    user: String,
    client: Client,
    /// Message ids received, and the room of the latest connection.
    seen: tokio::sync::watch::Receiver<(HashSet<u64>, String, u32)>,
}

/// A reconnecting SDK client that knows only room 0: it can end on room 1
/// only by following a KICK's `reconnect_to`.
fn start_device(cluster: &TestCluster, user: &str, first_room: &str) -> Device {
    let mut config = ClientConfig::new(cluster.app.token(user), format!("{user}-phone"));
    config.addrs = vec![first_room.to_string()];
    config.auto_ack = true;
    config.reconnect_backoff_min = Duration::from_millis(200);
    config.reconnect_backoff_max = Duration::from_secs(1);
    let (client, mut events) = Client::start(config);
    let (sender, seen) = tokio::sync::watch::channel((HashSet::new(), String::new(), 0));
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            sender.send_modify(|(ids, room, kicks)| match event {
                Event::Push(push) => {
                    ids.insert(push.msg_id);
                }
                Event::Connected { room_addr, .. } => *room = room_addr,
                Event::Kicked(kick) => {
                    assert_eq!(kick.code(), pushgrid_client::msg::KickCode::Shutdown);
                    *kicks += 1;
                }
                _ => {}
            });
        }
    });
    Device {
        user: user.to_string(),
        client,
        seen,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_every_device_to_the_other_room_and_loses_no_message() {
    let mut cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    // Reconnects spread over 2 s, set live in keeper.
    let (status, body) = cluster
        .admin(
            reqwest::Method::PUT,
            "/admin/settings/room.drain_window_secs",
            Some(serde_json::json!({ "value": "2" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let room0 = cluster.room_addr(0);
    let room1 = cluster.room_addr(1);
    let devices: Vec<Device> = (0..DEVICES)
        .map(|index| start_device(&cluster, &format!("drain-{index}"), &room0))
        .collect();
    for device in &devices {
        let mut seen = device.seen.clone();
        tokio::time::timeout(
            Duration::from_secs(20),
            seen.wait_for(|(_, room, _)| *room == room0),
        )
        .await
        .expect("every device connects to room 0")
        .unwrap();
    }

    // Pushes to every device, before, during and after the drain.
    let (accepted_tx, mut accepted_rx) = mpsc::unbounded_channel::<(String, u64)>();
    let users: Vec<String> = devices.iter().map(|device| device.user.clone()).collect();
    let pusher = {
        let center = cluster.center_url();
        let api_key = cluster.app.api_key.clone();
        let http = cluster.http.clone();
        tokio::spawn(async move {
            for round in 0..40 {
                for user in &users {
                    let answer = http
                        .post(format!("{center}/api/push"))
                        .header("Authorization", format!("apikey {api_key}"))
                        .json(
                            &serde_json::json!({ "users": [user], "payload": format!("{round}") }),
                        )
                        .send()
                        .await;
                    let Ok(answer) = answer else { continue };
                    if !answer.status().is_success() {
                        continue; // not accepted: nothing to deliver
                    }
                    let body: serde_json::Value = answer.json().await.unwrap();
                    for message in body["result"]["messages"].as_array().unwrap() {
                        let id = message["id"].as_str().unwrap().parse().unwrap();
                        accepted_tx.send((user.clone(), id)).unwrap();
                    }
                }
                // Paces the load: a round every 100 ms.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // The load's steady period before the drain (it runs on during and after
    // it): time passing under load, not a wait for a condition.
    tokio::time::sleep(Duration::from_millis(800)).await;

    // Drain room 0 through its admin port.
    let admin = cluster.rooms[0].addr("admin");
    let answer = cluster
        .http
        .post(format!("http://{admin}/admin/drain"))
        .bearer_auth(pushgrid_e2e::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    // The admin token (the credentials'): loopback peers need it too.
    assert_eq!(answer.status().as_u16(), 202);
    pusher.await.unwrap();

    let mut expected: HashMap<String, HashSet<u64>> = HashMap::new();
    while let Ok((user, id)) = accepted_rx.try_recv() {
        expected.entry(user).or_default().insert(id);
    }
    let total: usize = expected.values().map(HashSet::len).sum();
    assert!(
        total >= DEVICES * 30,
        "the push API accepted only {total} messages"
    );
    for device in &devices {
        let wanted = expected.remove(&device.user).unwrap_or_default();
        let mut seen = device.seen.clone();
        let outcome = tokio::time::timeout(
            Duration::from_secs(30),
            seen.wait_for(|(ids, room, _)| *room == room1 && wanted.is_subset(ids)),
        )
        .await;
        let (ids, room, kicks) = device.seen.borrow().clone();
        assert!(
            outcome.is_ok(),
            "{}: on {room} after {kicks} kicks, {} of {} messages missing: {:?}",
            device.user,
            wanted.difference(&ids).count(),
            wanted.len(),
            wanted.difference(&ids).take(5).collect::<Vec<_>>()
        );
        assert_eq!(kicks, 1, "{} was kicked once, by the drain", device.user);
    }

    // Room 0 closed every connection, left keeper and exited.
    let room = &mut cluster.rooms[0];
    let exited = eventually(Duration::from_secs(20), || {
        let running = room.is_running();
        async move { !running }
    })
    .await;
    let log = cluster.rooms[0].log_text();
    assert!(exited, "room 0 is still running:\n{log}");
    assert!(log.contains("drained: no connection left"), "{log}");
    let answer: serde_json::Value = cluster
        .http
        .get(format!(
            "{}/v1/dispatch?user=anyone",
            cluster.dispatcher_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rooms = answer["result"]["rooms"].as_array().unwrap();
    assert!(
        rooms.iter().all(|room| room["tcp"] != room0.as_str()),
        "room 0 is still listed: {answer}"
    );
    for device in devices {
        device.client.close().await;
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_endpoint_wants_the_admin_token_when_one_is_set() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut args = cluster.node_args();
    for setting in ["tcp_listen=127.0.0.1:0", "admin_token=room-secret"] {
        args.push("--set".into());
        args.push(setting.into());
    }
    let mut room = pushgrid_e2e::spawn(&cluster.dir, "room-token", "room", &args)
        .await
        .unwrap();
    let url = format!("http://{}/admin/drain", room.addr("admin"));
    for token in [None, Some("wrong")] {
        let mut request = cluster.http.post(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = request.send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 401, "token {token:?}");
        let body: serde_json::Value = answer.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("Bearer")
        );
    }
    assert!(room.is_running(), "a refused drain must not stop the room");
    let answer = cluster
        .http
        .post(&url)
        .bearer_auth("room-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let exited = eventually(Duration::from_secs(20), || {
        let running = room.is_running();
        async move { !running }
    })
    .await;
    assert!(exited, "the drained room (no devices) exits");
    cluster.cleanup().await;
}
