//! Broadcast recovery through the Rust SDK (issue 22, item 4): devices
//! subscribed to a topic and to `all`, a burst of broadcasts with 8 API calls
//! in flight, and the room half of them are on killed -9 in the middle of it.
//! Those devices move to the other room, resubscribe from their last offset
//! and must hand the application exactly the offsets they missed, in order,
//! each once; so must every other device. Real processes, real TCP.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, Event, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster};
use serde_json::json;

const DEVICES: usize = 12;
const TOPIC: &str = "feed";
/// Broadcasts to `TOPIC`, then to `all`, sent with `IN_FLIGHT` calls at once.
const FEED_BURST: usize = 400;
const ALL_BURST: usize = 100;
const IN_FLIGHT: usize = 8;
/// The room is killed once this many broadcasts were acknowledged.
const KILL_AFTER: usize = 100;
const SETTLE: Duration = Duration::from_secs(60);

/// What one device's application was handed, in order.
#[derive(Default, Debug)]
struct Record {
    /// topic -> offsets of the broadcasts handed over, in the order handed.
    offsets: HashMap<String, Vec<u64>>,
    gaps: Vec<(String, u64, u64)>,
    /// (topic, recovered, missed) of every SUB_OK.
    subscriptions: Vec<(String, bool, bool)>,
    rooms: Vec<String>,
}

struct Device {
    client: Client,
    record: Arc<Mutex<Record>>,
}

async fn start_device(cluster: &TestCluster, index: usize) -> Device {
    // Even devices start on room 0 (the one killed), odd ones on room 1.
    let mut rooms = vec![cluster.room_addr(0), cluster.room_addr(1)];
    if index % 2 == 1 {
        rooms.reverse();
    }
    let user = format!("burst-{index}");
    let mut config = ClientConfig::new(cluster.app.token(&user), format!("{user}-phone"));
    config.addrs = rooms;
    config.reconnect_backoff_min = Duration::from_millis(100);
    config.reconnect_backoff_max = Duration::from_millis(400);
    config.connect_timeout = Duration::from_secs(2);
    let (client, mut events) = Client::start(config);
    client.subscribe(TOPIC).await.unwrap();
    client.subscribe("all").await.unwrap();
    let record = Arc::new(Mutex::new(Record::default()));
    let writer = record.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let mut record = writer.lock().unwrap();
            match event {
                Event::Push(push) if push.kind() == msg::PushKind::Broadcast => {
                    record
                        .offsets
                        .entry(push.topic)
                        .or_default()
                        .push(push.offset);
                }
                Event::BroadcastGap {
                    topic, first, last, ..
                } => record.gaps.push((topic, first, last)),
                Event::Subscribed {
                    topic,
                    recovered,
                    missed,
                    ..
                } => record.subscriptions.push((topic, recovered, missed)),
                Event::Connected { room_addr, .. } => record.rooms.push(room_addr),
                _ => {}
            }
        }
    });
    Device { client, record }
}

/// Sends `count` broadcasts to `topic` with `IN_FLIGHT` calls at once;
/// returns the offsets the API acknowledged. Every call must succeed: center
/// answers once saver stored the message, whatever happens to a room.
async fn burst(
    cluster: &TestCluster,
    topic: &'static str,
    count: usize,
    acknowledged: Arc<AtomicUsize>,
) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (http, next, acknowledged) = (cluster.http.clone(), next.clone(), acknowledged.clone());
        let url = format!("{}/api/broadcast", cluster.center_url());
        let key = format!("apikey {}", cluster.app.api_key);
        senders.push(tokio::spawn(async move {
            let mut offsets = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < count {
                let response = http
                    .post(&url)
                    .header("Authorization", &key)
                    .timeout(Duration::from_secs(10))
                    .json(&json!({ "topic": topic, "payload": "x".repeat(64) }))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status().as_u16(), 200, "broadcast to {topic}");
                let body: serde_json::Value = response.json().await.unwrap();
                offsets.push(body["result"]["offset"].as_u64().unwrap());
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            offsets
        }));
    }
    let mut offsets = Vec::new();
    for sender in senders {
        offsets.extend(sender.await.unwrap());
    }
    offsets.sort_unstable();
    offsets
}

/// Devices that do not yet hold every acknowledged offset of every topic.
fn behind(devices: &[Device], expected: &HashMap<&str, Vec<u64>>) -> usize {
    devices
        .iter()
        .filter(|device| {
            let record = device.record.lock().unwrap();
            expected.iter().any(|(topic, offsets)| {
                let got = record.offsets.get(*topic).map_or(0, Vec::len);
                got < offsets.len()
            })
        })
        .count()
}

/// Every device got every acknowledged offset of every topic exactly once,
/// in order, with no gap reported; returns the failures.
fn check(devices: &[Device], expected: &HashMap<&str, Vec<u64>>) -> Vec<String> {
    let mut failures = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let record = device.record.lock().unwrap();
        for (topic, offsets) in expected {
            let got = record.offsets.get(*topic).cloned().unwrap_or_default();
            if &got != offsets {
                let out_of_order = got.windows(2).filter(|pair| pair[1] != pair[0] + 1).count();
                failures.push(format!(
                    "device {index} {topic}: {} handed over for {} acknowledged, {out_of_order} not after their predecessor",
                    got.len(),
                    offsets.len()
                ));
            }
        }
        if !record.gaps.is_empty() {
            failures.push(format!("device {index}: gaps reported {:?}", record.gaps));
        }
        let lost: Vec<_> = record
            .subscriptions
            .iter()
            .filter(|(_, _, missed)| *missed)
            .collect();
        if !lost.is_empty() {
            failures.push(format!(
                "device {index}: resubscriptions not recovered {lost:?}"
            ));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_killed_mid_burst_devices_get_exactly_what_they_missed_in_order() {
    let mut cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let killed_room = cluster.room_addr(0);
    let mut devices = Vec::new();
    for index in 0..DEVICES {
        devices.push(start_device(&cluster, index).await);
    }
    let subscribed = pushgrid_e2e::eventually(Duration::from_secs(20), || async {
        devices
            .iter()
            .all(|device| device.record.lock().unwrap().subscriptions.len() == 2)
    })
    .await;
    assert!(subscribed, "every device subscribes to both topics");

    // The burst, and kill -9 of room 0 once KILL_AFTER calls were answered.
    let room0 = cluster.role("room0").pid();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let kill = async {
        let reached = pushgrid_e2e::eventually(Duration::from_secs(30), || async {
            acknowledged.load(Ordering::Relaxed) >= KILL_AFTER
        })
        .await;
        assert!(reached, "the burst is under way");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(room0 as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        acknowledged.load(Ordering::Relaxed)
    };
    let (feed, all, killed_at) = tokio::join!(
        burst(&cluster, TOPIC, FEED_BURST, acknowledged.clone()),
        burst(&cluster, "all", ALL_BURST, acknowledged.clone()),
        kill,
    );
    cluster.kill_role("room0").await; // reaps the process
    assert!(
        killed_at < FEED_BURST + ALL_BURST,
        "the room died while broadcasts were still being sent"
    );
    for (topic, offsets) in [(TOPIC, &feed), ("all", &all)] {
        let first = offsets[0];
        assert!(
            offsets
                .iter()
                .enumerate()
                .all(|(at, offset)| *offset == first + at as u64),
            "{topic}: the API answered consecutive offsets"
        );
    }
    let expected: HashMap<&str, Vec<u64>> = [(TOPIC, feed), ("all", all)].into_iter().collect();

    let settled =
        pushgrid_e2e::eventually(SETTLE, || async { behind(&devices, &expected) == 0 }).await;
    let failures = check(&devices, &expected);
    let moved: Vec<usize> = (0..DEVICES)
        .filter(|index| {
            let record = devices[*index].record.lock().unwrap();
            record.rooms.first() == Some(&killed_room)
        })
        .collect();
    let held: u64 = devices
        .iter()
        .map(|device| device.client.stats().broadcasts_held)
        .sum();
    let dropped: u64 = devices
        .iter()
        .map(|device| device.client.stats().duplicates_dropped)
        .sum();
    println!(
        "BURST {FEED_BURST} to {TOPIC} + {ALL_BURST} to all, {IN_FLIGHT} in flight, room 0 killed after \
         {killed_at} acknowledged; {} devices moved; held behind a missing offset by the SDK {held}; \
         duplicates dropped by the SDK {dropped}; devices behind {}; failures {failures:?}",
        moved.len(),
        behind(&devices, &expected),
    );
    assert!(settled && failures.is_empty(), "{failures:#?}");
    assert_eq!(
        moved.len(),
        DEVICES / 2,
        "the even devices started on room 0"
    );
    for index in moved {
        let record = devices[index].record.lock().unwrap();
        assert!(
            record.rooms.len() >= 2,
            "device {index} reconnected: {:?}",
            record.rooms
        );
        assert!(
            record.rooms[1..].iter().all(|room| *room != killed_room),
            "device {index} moved off the killed room"
        );
        let resumed = &record.subscriptions[2..];
        assert!(
            resumed.iter().any(|(_, recovered, _)| *recovered),
            "device {index} resubscribed from its position and the history replayed it: {resumed:?}"
        );
    }
    for device in &devices {
        device.client.close().await;
    }
    cluster.cleanup().await;
}
