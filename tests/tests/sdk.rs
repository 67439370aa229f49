//! The Rust SDK against a real cluster: a room killed under a subscribed
//! client, topic resume with and without recoverable history, redelivered
//! messages handed to the app once, and KICK handling (delay, target,
//! single-login stop).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, Event};
use pushgrid_e2e::{ClusterOptions, TestCluster};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn broadcast(cluster: &TestCluster, topic: &str, payload: &str) {
    let response = cluster
        .http
        .post(format!("{}/api/broadcast", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .json(&json!({ "topic": topic, "payload": payload }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

/// Waits for an event matching `want`, collecting pushes on the way.
async fn until(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    pushes: &mut HashMap<String, usize>,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("event in time")
            .expect("client alive");
        if let Event::Push(push) = &event {
            *pushes
                .entry(String::from_utf8_lossy(&push.payload).to_string())
                .or_default() += 1;
        }
        if want(&event) {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_client_survives_its_room_dying_and_misses_nothing() {
    let mut cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut config = ClientConfig::new(cluster.app.token("yuri"), "yuri-phone");
    config.addrs = vec![cluster.room_addr(0), cluster.room_addr(1)];
    config.reconnect_backoff_min = Duration::from_millis(50);
    config.reconnect_backoff_max = Duration::from_millis(200);
    let (client, mut events) = Client::start(config);
    let mut pushes = HashMap::new();
    until(&mut events, &mut pushes, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    client.subscribe("match").await.unwrap();
    until(&mut events, &mut pushes, |event| {
        matches!(event, Event::Subscribed { .. })
    })
    .await;
    broadcast(&cluster, "match", "goal 1").await;
    until(&mut events, &mut pushes, |event| {
        matches!(event, Event::Push(_))
    })
    .await;

    // The client's room dies; two messages are published while it moves.
    cluster.rooms[0].kill().await;
    broadcast(&cluster, "match", "goal 2").await;
    broadcast(&cluster, "match", "goal 3").await;
    let resumed = until(&mut events, &mut pushes, |event| {
        matches!(event, Event::Subscribed { .. })
    })
    .await;
    let Event::Subscribed {
        recovered, missed, ..
    } = resumed
    else {
        unreachable!()
    };
    assert!(recovered, "the stream still covered the gap");
    assert!(!missed, "nothing was lost: no gap reported");
    let got_all = tokio::time::timeout(WAIT, async {
        while pushes.len() < 3 {
            until(&mut events, &mut pushes, |event| {
                matches!(event, Event::Push(_))
            })
            .await;
        }
    })
    .await;
    assert!(got_all.is_ok(), "pushes: {pushes:?}");
    assert!(
        pushes.values().all(|count| *count == 1),
        "each handed over once: {pushes:?}"
    );
    assert!(client.stats().reconnects >= 1);
    client.close().await;
    cluster.cleanup().await;
}

/// Collects events until `want` matches, or panics after `WAIT`.
async fn next_matching(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
    seen: &mut Vec<Event>,
    want: impl Fn(&Event) -> bool,
) -> Event {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no matching event in time; saw {seen:#?}"))
            .expect("client alive");
        seen.push(event.clone());
        if want(&event) {
            return event;
        }
    }
}

fn payloads(seen: &[Event]) -> Vec<String> {
    seen.iter()
        .filter_map(|event| match event {
            Event::Push(push) => Some(String::from_utf8_lossy(&push.payload).to_string()),
            _ => None,
        })
        .collect()
}

fn is_push(payload: &'static str) -> impl Fn(&Event) -> bool {
    move |event| matches!(event, Event::Push(push) if &push.payload[..] == payload.as_bytes())
}

/// The topic's history is shorter than what the client missed while it had no
/// room: the SDK says so (`missed`), and the app gets only what comes after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_the_history_no_longer_covers_is_reported_to_the_app() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    // A saver that keeps only the last 2 entries of each topic stream.
    let mut short = cluster.saver_args(
        pushgrid_e2e::REDIS_URL,
        &format!("{}/{}", pushgrid_e2e::MYSQL_SERVER, cluster.database),
    );
    short.extend(["--set".to_string(), "stream_max_len=2".to_string()]);
    cluster.replace_saver("saver-short", &short).await.unwrap();

    // Only the dispatcher tells the client where rooms are, so it has nowhere
    // to go while the one room is down.
    let mut config = ClientConfig::new(cluster.app.token("gap"), "gap-phone");
    config.dispatcher = Some(cluster.dispatcher_url());
    config.reconnect_backoff_min = Duration::from_millis(100);
    config.reconnect_backoff_max = Duration::from_millis(500);
    let (client, mut events) = Client::start(config);
    client.subscribe("scores").await.unwrap();
    let mut seen = Vec::new();
    let first = next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Subscribed { .. })
    })
    .await;
    assert!(
        matches!(first, Event::Subscribed { missed: false, .. }),
        "a first subscription misses nothing: {first:?}"
    );
    broadcast(&cluster, "scores", "b1").await;
    next_matching(&mut events, &mut seen, is_push("b1")).await;

    cluster.kill_role("room0").await;
    for index in 2..=6 {
        broadcast(&cluster, "scores", &format!("b{index}")).await;
    }
    cluster.start_role_again("room0").await.unwrap();
    let resumed = next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Subscribed { .. })
    })
    .await;
    let Event::Subscribed {
        recovered, missed, ..
    } = resumed
    else {
        unreachable!()
    };
    assert!(!recovered, "offsets 2 to 4 are gone from the stream");
    assert!(missed, "the gap is reported to the app");

    broadcast(&cluster, "scores", "b7").await;
    next_matching(&mut events, &mut seen, is_push("b7")).await;
    assert_eq!(payloads(&seen), ["b1", "b7"], "nothing of the gap replayed");
    assert!(client.stats().reconnects >= 1);
    client.close().await;
    cluster.cleanup().await;
}

/// A unicast not acked comes again after a reconnect (at-least-once); the SDK
/// drops the copy, so the app sees every message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_reaches_the_app_once() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut config = ClientConfig::new(cluster.app.token("dup"), "dup-phone");
    config.addrs = vec![cluster.room_addr(0)];
    config.auto_ack = false;
    let (client, mut events) = Client::start(config);
    let mut seen = Vec::new();
    next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;

    let first = cluster.push(&["dup"], "m1").await.unwrap();
    next_matching(&mut events, &mut seen, is_push("m1")).await;
    assert_eq!(client.stats().duplicates_dropped, 0);

    // Not acked: the room sends m1 again from the inbox after AUTH.
    client.reconnect().await.unwrap();
    next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    let dropped =
        pushgrid_e2e::eventually(WAIT, || async { client.stats().duplicates_dropped >= 1 }).await;
    assert!(dropped, "the inbox replay of m1 reached the SDK: {seen:#?}");
    let second = cluster.push(&["dup"], "m2").await.unwrap();
    next_matching(&mut events, &mut seen, is_push("m2")).await;
    assert_eq!(payloads(&seen), ["m1", "m2"], "each handed over once");

    // Acked now; a copy still in flight is re-acked by the SDK, never shown.
    client.ack(vec![first[0], second[0]]).await.unwrap();
    client.reconnect().await.unwrap();
    cluster.push(&["dup"], "m3").await.unwrap();
    next_matching(&mut events, &mut seen, is_push("m3")).await;
    assert_eq!(payloads(&seen), ["m1", "m2", "m3"]);
    let stats = client.stats();
    assert_eq!(stats.pushes_received, 3);
    assert!(stats.acks_sent >= 2, "{stats:?}");
    client.close().await;
    cluster.cleanup().await;
}

/// A room drain sends KICK with a delay and another room: the SDK waits that
/// long and goes there, though its own list names only the drained room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_with_a_delay_and_a_target_is_obeyed() {
    let cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let (status, body) = cluster
        .admin(
            reqwest::Method::PUT,
            "/admin/settings/room.drain_window_secs",
            Some(json!({ "value": "3" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let room0 = cluster.room_addr(0);
    let room1 = cluster.room_addr(1);
    let mut config = ClientConfig::new(cluster.app.token("kicked"), "kicked-phone");
    config.addrs = vec![room0.clone()];
    config.auto_ack = true;
    let (client, mut events) = Client::start(config);
    let mut seen = Vec::new();
    let connected = next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    assert!(matches!(connected, Event::Connected { room_addr, .. } if room_addr == room0));
    let answer = cluster
        .http
        .post(format!(
            "http://{}/admin/drain",
            cluster.rooms[0].addr("admin")
        ))
        .bearer_auth(pushgrid_e2e::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    let kicked = next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Kicked(_))
    })
    .await;
    let kicked_at = tokio::time::Instant::now();
    let Event::Kicked(kick) = kicked else {
        unreachable!()
    };
    assert_eq!(kick.code(), pushgrid_client::msg::KickCode::Shutdown);
    assert_eq!(kick.reconnect_to, room1, "the other room");
    let reconnected = next_matching(&mut events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    let waited = kicked_at.elapsed();
    assert!(
        matches!(&reconnected, Event::Connected { room_addr, .. } if *room_addr == room1),
        "{reconnected:?}"
    );
    // The SDK waited the delay the KICK asked for (events are read at once,
    // so only scheduling slack separates the two instants).
    assert!(
        waited + Duration::from_millis(100)
            >= Duration::from_millis(kick.reconnect_after_ms.into()),
        "reconnected after {waited:?}, asked {} ms",
        kick.reconnect_after_ms
    );
    // Routable on the new room once register holds that session alone.
    let moved = pushgrid_e2e::eventually(WAIT, || async {
        let answer = cluster
            .http
            .post(format!("{}/api/presence", cluster.center_url()))
            .header("Authorization", format!("apikey {}", cluster.app.api_key))
            .json(&json!({ "user": "kicked" }))
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = answer.json().await.unwrap();
        body["result"]["sessions"].as_array().map_or(0, Vec::len) == 1
    })
    .await;
    assert!(moved, "register lists only the session on room 1");
    cluster.push(&["kicked"], "after the move").await.unwrap();
    next_matching(&mut events, &mut seen, is_push("after the move")).await;
    client.close().await;
    cluster.cleanup().await;
}

/// A KICK from the push API: the SDK reconnects (with backoff) and keeps
/// receiving. A single-login KICK (a newer login of the same device kind):
/// the older client stops for good instead of kicking the newer one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_kick_reconnects_and_a_single_login_kick_stops_the_client() {
    let cluster = TestCluster::start(ClusterOptions {
        app_extra: "single_login=true".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let start = |device: &str| {
        let mut config = ClientConfig::new(cluster.app.token("solo"), device);
        config.addrs = vec![cluster.room_addr(0)];
        config.auto_ack = true;
        config.reconnect_backoff_min = Duration::from_millis(100);
        config.reconnect_backoff_max = Duration::from_millis(400);
        Client::start(config)
    };
    let (older, mut older_events) = start("phone-a");
    let mut seen = Vec::new();
    next_matching(&mut older_events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;

    let answer = cluster
        .http
        .post(format!("{}/api/kick", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .json(&json!({ "user": "solo", "reason": "support asked" }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let kicked = next_matching(&mut older_events, &mut seen, |event| {
        matches!(event, Event::Kicked(_))
    })
    .await;
    assert!(
        matches!(&kicked, Event::Kicked(kick) if kick.reason.contains("support asked")),
        "{kicked:?}"
    );
    next_matching(&mut older_events, &mut seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    assert_eq!(older.stats().reconnects, 1);
    cluster.push(&["solo"], "still here").await.unwrap();
    next_matching(&mut older_events, &mut seen, is_push("still here")).await;

    // A second device of the same kind logs in: the older one is told and stops.
    let (newer, mut newer_events) = start("phone-b");
    let mut newer_seen = Vec::new();
    next_matching(&mut newer_events, &mut newer_seen, |event| {
        matches!(event, Event::Connected { .. })
    })
    .await;
    let kicked = next_matching(&mut older_events, &mut seen, |event| {
        matches!(event, Event::Kicked(_))
    })
    .await;
    assert!(
        matches!(&kicked, Event::Kicked(kick) if kick.code() == pushgrid_client::msg::KickCode::SingleLogin),
        "{kicked:?}"
    );
    let ended =
        tokio::time::timeout(WAIT, async { while older_events.recv().await.is_some() {} }).await;
    assert!(ended.is_ok(), "the older client's event channel closes");
    assert!(older.is_closed());
    cluster.push(&["solo"], "to the newer").await.unwrap();
    next_matching(&mut newer_events, &mut newer_seen, is_push("to the newer")).await;
    newer.close().await;
    cluster.cleanup().await;
}
