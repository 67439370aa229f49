//! Fault injection under steady load. Devices (the Rust SDK, acking, subscribed
//! to a topic) stay connected while a pusher sends unicasts and broadcasts
//! through the API; then one fault: kill -9 of a role (started again after a
//! pause, except a room, whose devices must move to the other room), Redis
//! restarted empty, or MySQL cut off. Afterwards every unicast the API
//! acknowledged must have been handed to its device's application exactly
//! once, and every acknowledged broadcast must have reached every device or
//! the device must have been told it is not recoverable.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, Event, msg};
use pushgrid_e2e::faults::{MysqlProxy, OwnRedis};
use pushgrid_e2e::{ClusterOptions, MYSQL_SERVER, TestCluster};
use serde_json::json;

const DEVICES: usize = 16;
const TOPIC: &str = "news";
// The sleeps on STEADY and DOWN time the load and the fault; every wait for
// a condition goes through `eventually`.
/// Pushes go on this long before the fault, and this long after the repair.
const STEADY: Duration = Duration::from_millis(1500);
/// How long a killed role stays down.
const DOWN: Duration = Duration::from_secs(2);
/// How long every acknowledged message has to arrive after the load stops.
const SETTLE: Duration = Duration::from_secs(45);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// kill -9, then the same role started again.
    Kill(&'static str),
    /// kill -9 of room 0 for good: its devices reconnect to room 1.
    KillRoom,
    /// saver's Redis killed and started again empty.
    RedisEmpty,
    /// saver's MySQL connections cut, then restored.
    MysqlOutage,
}

/// What one device's application was handed.
#[derive(Default)]
struct Seen {
    /// Unicast message id -> times handed to the application.
    unicast: HashMap<u64, u32>,
    broadcast: HashSet<u64>,
    /// SUB_OK answers with `recovered = false` after the first one: the device
    /// was told that broadcasts may be missing.
    gaps: u32,
    subscriptions: u32,
    connects: u32,
    /// The room of the first connection.
    first_room: Option<String>,
}

struct Device {
    client: Client,
    seen: Arc<Mutex<Seen>>,
}

/// What the API acknowledged.
#[derive(Default)]
struct Ledger {
    /// Unicast message id -> device index.
    unicast: Mutex<HashMap<u64, usize>>,
    broadcast: Mutex<Vec<u64>>,
    refused: AtomicU64,
}

fn user(index: usize) -> String {
    format!("fault-user-{index}")
}

async fn connect_devices(cluster: &TestCluster) -> Vec<Device> {
    let rooms: Vec<String> = (0..cluster.rooms.len())
        .map(|index| cluster.room_addr(index))
        .collect();
    let mut devices = Vec::new();
    for index in 0..DEVICES {
        let mut config = ClientConfig::new(cluster.app.token(&user(index)), format!("d{index}"));
        config.dispatcher = Some(cluster.dispatcher_url());
        config.addrs = rooms.clone();
        config.auto_ack = true;
        config.reconnect_backoff_min = Duration::from_millis(100);
        config.reconnect_backoff_max = Duration::from_millis(800);
        config.connect_timeout = Duration::from_secs(2);
        config.auth_timeout = Duration::from_secs(3);
        let (client, mut events) = Client::start(config);
        client.subscribe(TOPIC).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut seen = record.lock().unwrap();
                match event {
                    Event::Push(push) if push.kind() == msg::PushKind::Broadcast => {
                        seen.broadcast.insert(push.msg_id);
                    }
                    Event::Push(push) => *seen.unicast.entry(push.msg_id).or_default() += 1,
                    Event::Subscribed { recovered, .. } => {
                        if seen.subscriptions > 0 && !recovered {
                            seen.gaps += 1;
                        }
                        seen.subscriptions += 1;
                    }
                    Event::Connected { room_addr, .. } => {
                        seen.connects += 1;
                        seen.first_room.get_or_insert(room_addr);
                    }
                    _ => {}
                }
            }
        });
        devices.push(Device { client, seen });
    }
    let all_subscribed = pushgrid_e2e::eventually(Duration::from_secs(20), || async {
        devices
            .iter()
            .all(|device| device.seen.lock().unwrap().subscriptions > 0)
    })
    .await;
    assert!(all_subscribed, "every device connects and subscribes");
    devices
}

/// Pushes to the devices in turn, and a broadcast every tenth step, until
/// `stop`; records what the API acknowledged. The center's URL is read at
/// every step (a restarted center listens on a new port).
async fn pusher(
    http: reqwest::Client,
    center: Arc<RwLock<String>>,
    api_key: String,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
) {
    let mut step = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let url = center.read().unwrap().clone();
        let target = step % DEVICES;
        let (method, body) = if step % 10 == 9 {
            (
                "broadcast",
                json!({ "topic": TOPIC, "payload": format!("b{step}") }),
            )
        } else {
            (
                "push",
                json!({ "users": [user(target)], "payload": format!("u{step}") }),
            )
        };
        let answer = http
            .post(format!("{url}/api/{method}"))
            .header("Authorization", format!("apikey {api_key}"))
            .timeout(Duration::from_secs(5))
            .json(&body)
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => {
                let body: serde_json::Value = response.json().await.unwrap();
                if method == "broadcast" {
                    let id = body["result"]["id"].as_str().unwrap().parse().unwrap();
                    ledger.broadcast.lock().unwrap().push(id);
                } else {
                    let id = body["result"]["messages"][0]["id"]
                        .as_str()
                        .unwrap()
                        .parse()
                        .unwrap();
                    ledger.unicast.lock().unwrap().insert(id, target);
                }
            }
            // Refused (503, connection refused while a role is down): not
            // acknowledged, so not owed to anyone.
            _ => {
                ledger.refused.fetch_add(1, Ordering::Relaxed);
                // Backs off while the role is down, as a real caller does.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        step += 1;
        // Paces the load.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Unicasts acknowledged but not yet handed to their device, by id.
fn missing_unicasts(ledger: &Ledger, devices: &[Device]) -> Vec<u64> {
    let unicast = ledger.unicast.lock().unwrap();
    let mut missing: Vec<u64> = unicast
        .iter()
        .filter(|(id, device)| {
            !devices[**device]
                .seen
                .lock()
                .unwrap()
                .unicast
                .contains_key(id)
        })
        .map(|(id, _)| *id)
        .collect();
    missing.sort_unstable();
    missing
}

/// (device, broadcast) pairs missing on devices that were never told of a gap.
fn missing_broadcasts(ledger: &Ledger, devices: &[Device]) -> Vec<(usize, u64)> {
    let broadcast = ledger.broadcast.lock().unwrap();
    let mut missing = Vec::new();
    for (index, device) in devices.iter().enumerate() {
        let seen = device.seen.lock().unwrap();
        if seen.gaps > 0 {
            continue;
        }
        for id in broadcast.iter() {
            if !seen.broadcast.contains(id) {
                missing.push((index, *id));
            }
        }
    }
    missing
}

async fn run(fault: Fault) {
    let mut cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    // Faults of saver's own stores need a Redis and a MySQL path of the
    // test's own: the shared ones serve every other test.
    let mut own_redis = None;
    let mut proxy = None;
    match fault {
        Fault::RedisEmpty => {
            let redis = OwnRedis::start().await;
            let database = format!("{MYSQL_SERVER}/{}", cluster.database);
            let args = cluster.saver_args(&redis.url(), &database);
            cluster
                .replace_saver("saver-own-redis", &args)
                .await
                .unwrap();
            own_redis = Some(redis);
        }
        Fault::MysqlOutage => {
            let mysql = MysqlProxy::start().await;
            let args = cluster.saver_args(pushgrid_e2e::REDIS_URL, &mysql.url(&cluster.database));
            cluster.replace_saver("saver-proxied", &args).await.unwrap();
            proxy = Some(mysql);
        }
        _ => {}
    }
    let devices = connect_devices(&cluster).await;

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let center = Arc::new(RwLock::new(cluster.center_url()));
    let load = tokio::spawn(pusher(
        cluster.http.clone(),
        center.clone(),
        cluster.app.api_key.clone(),
        ledger.clone(),
        stop.clone(),
    ));
    // The load's steady period before the fault.
    tokio::time::sleep(STEADY).await;

    match fault {
        Fault::Kill(role) => {
            cluster.kill_role(role).await;
            // The fault's duration: the role stays down under load.
            tokio::time::sleep(DOWN).await;
            cluster.start_role_again(role).await.unwrap();
            *center.write().unwrap() = cluster.center_url();
        }
        Fault::KillRoom => {
            cluster.kill_role("room0").await;
            // The fault's duration: the load runs on with room 0 gone.
            tokio::time::sleep(DOWN).await;
        }
        Fault::RedisEmpty => {
            own_redis.as_mut().unwrap().restart_empty().await;
            // The fault's duration: the load runs on the empty Redis.
            tokio::time::sleep(DOWN).await;
        }
        Fault::MysqlOutage => {
            proxy.as_mut().unwrap().cut();
            // The fault's duration: MySQL stays cut under load.
            tokio::time::sleep(DOWN).await;
            proxy.as_mut().unwrap().restore().await;
        }
    }
    // The load's steady period after the repair, before it stops.
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    let unicasts = ledger.unicast.lock().unwrap().len();
    let broadcasts = ledger.broadcast.lock().unwrap().len();
    let delivered = pushgrid_e2e::eventually(SETTLE, || async {
        missing_unicasts(&ledger, &devices).is_empty()
            && missing_broadcasts(&ledger, &devices).is_empty()
    })
    .await;
    let lost = missing_unicasts(&ledger, &devices);
    let lost_broadcasts = missing_broadcasts(&ledger, &devices);
    let twice: Vec<u64> = devices
        .iter()
        .flat_map(|device| {
            let seen = device.seen.lock().unwrap();
            seen.unicast
                .iter()
                .filter(|(_, times)| **times > 1)
                .map(|(id, _)| *id)
                .collect::<Vec<_>>()
        })
        .collect();
    let dropped: u64 = devices
        .iter()
        .map(|device| device.client.stats().duplicates_dropped)
        .sum();
    let gaps: u32 = devices
        .iter()
        .map(|device| device.seen.lock().unwrap().gaps)
        .sum();
    let reconnects: u32 = devices
        .iter()
        .map(|device| device.seen.lock().unwrap().connects.saturating_sub(1))
        .sum();
    println!(
        "FAULT {fault:?}: unicast accepted {unicasts}, lost {}; broadcast accepted {broadcasts} \
         to {DEVICES} devices, missing without notice {}; refused by the API {}; \
         handed twice {}; duplicates dropped by the SDK {dropped}; gaps told {gaps}; reconnects {reconnects}",
        lost.len(),
        lost_broadcasts.len(),
        ledger.refused.load(Ordering::Relaxed),
        twice.len(),
    );
    assert!(
        unicasts > 20 && broadcasts > 2,
        "the load ran: {unicasts} unicasts, {broadcasts} broadcasts"
    );
    assert!(
        delivered,
        "lost unicasts {lost:?}; broadcasts missing without notice (device, id) {lost_broadcasts:?}"
    );
    assert!(
        twice.is_empty(),
        "handed to the application twice: {twice:?}"
    );
    if matches!(fault, Fault::KillRoom) {
        let killed = cluster.room_addr(0);
        let mut on_killed = 0;
        for (index, device) in devices.iter().enumerate() {
            let seen = device.seen.lock().unwrap();
            if seen.first_room.as_deref() == Some(killed.as_str()) {
                on_killed += 1;
                assert!(
                    seen.connects >= 2,
                    "device {index} of the killed room reconnected"
                );
            }
        }
        // 16 users hashed over 2 rooms: all on room 1 has odds of 2^-16.
        assert!(on_killed > 0, "no device was on the killed room {killed}");
    }
    for device in &devices {
        device.client.close().await;
    }
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_room_devices_move_and_nothing_is_lost() {
    run(Fault::KillRoom).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_saver_nothing_acknowledged_is_lost() {
    run(Fault::Kill("saver")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_register_nothing_acknowledged_is_lost() {
    run(Fault::Kill("register")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_center_nothing_acknowledged_is_lost() {
    run(Fault::Kill("center")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_coordinator_nothing_acknowledged_is_lost() {
    run(Fault::Kill("coordinator")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_keeper_nothing_acknowledged_is_lost() {
    run(Fault::Kill("keeper")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_dispatcher_nothing_acknowledged_is_lost() {
    run(Fault::Kill("dispatcher")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_nothing_acknowledged_is_lost() {
    run(Fault::RedisEmpty).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_outage_nothing_acknowledged_is_lost() {
    run(Fault::MysqlOutage).await;
}
