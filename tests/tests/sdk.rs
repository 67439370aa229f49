//! The Rust SDK against a real cluster: a room killed under a subscribed
//! client, topic resume by offset, and no duplicates handed to the app.
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
    let Event::Subscribed { recovered, .. } = resumed else {
        unreachable!()
    };
    assert!(recovered, "the stream still covered the gap");
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
