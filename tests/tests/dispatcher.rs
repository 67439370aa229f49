//! The dispatcher end to end: real keeper, room and dispatcher processes,
//! rooms labelled by region and network, keeper's settings table switching
//! the balancer, the rate limit and the traffic counters on `/metrics`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use pushgrid_e2e::{ClusterOptions, Proc, TestCluster, eventually, metrics_text, spawn, temp_dir};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// A keeper (SQLite, settings re-read every second), labelled rooms and a
/// dispatcher: no register or saver, which the dispatcher does not need.
struct Cell {
    dir: PathBuf,
    keeper_db: String,
    _keeper: Proc,
    dispatcher: Proc,
    rooms: HashMap<String, Proc>,
    http: reqwest::Client,
}

fn sets(settings: &[String]) -> Vec<String> {
    settings
        .iter()
        .flat_map(|setting| ["--set".to_string(), setting.clone()])
        .collect()
}

fn node_settings(keeper: &str, credentials: &std::path::Path) -> Vec<String> {
    vec![
        format!("keeper={keeper}"),
        "listen=127.0.0.1:0".into(),
        "admin_listen=127.0.0.1:0".into(),
        "lease_ttl_secs=3".into(),
        format!("credentials_dir={}", credentials.display()),
    ]
}

impl Cell {
    /// `rooms`: (node id, labels as a TOML inline table body).
    async fn start(rooms: &[(&str, &str)], dispatcher_settings: &[&str]) -> Cell {
        let dir = temp_dir("pushgrid-dispatch");
        let keeper_db = format!("sqlite://{}/keeper.db", dir.display());
        let credentials = dir.join("credentials");
        pushgrid_common::auth::init_dir(&credentials).unwrap();
        let mut keeper_settings = node_settings("127.0.0.1:1", &credentials);
        keeper_settings.push(format!("database_url={keeper_db}"));
        keeper_settings.push("config_poll_secs=1".into());
        keeper_settings.push("http_listen=127.0.0.1:0".into());
        keeper_settings.push(r#"settings={"dispatcher.balancer"="consistent_hash"}"#.into());
        let keeper = spawn(&dir, "keeper", "keeper", &sets(&keeper_settings))
            .await
            .unwrap();
        let keeper_addr = keeper.addr("grpc").to_string();

        let mut started = HashMap::new();
        for (id, labels) in rooms {
            let mut settings = node_settings(&keeper_addr, &credentials);
            settings.push("tcp_listen=127.0.0.1:0".into());
            settings.push(format!("node_id={id}"));
            settings.push(format!("labels={{{labels}}}"));
            let room = spawn(&dir, id, "room", &sets(&settings)).await.unwrap();
            started.insert(id.to_string(), room);
        }
        let mut settings = node_settings(&keeper_addr, &credentials);
        settings.push("http_listen=127.0.0.1:0".into());
        settings.extend(
            dispatcher_settings
                .iter()
                .map(|setting| setting.to_string()),
        );
        let dispatcher = spawn(&dir, "dispatcher", "dispatcher", &sets(&settings))
            .await
            .unwrap();
        let cell = Cell {
            dir,
            keeper_db,
            _keeper: keeper,
            dispatcher,
            rooms: started,
            http: reqwest::Client::new(),
        };
        let everyone = rooms.len();
        let listed = eventually(WAIT, || async {
            let (_, answer) = cell.dispatch("user=probe").await;
            answer["result"]["rooms"].as_array().map_or(0, Vec::len) >= everyone.min(3)
        })
        .await;
        assert!(listed, "the dispatcher never listed {everyone} rooms");
        cell
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.dispatcher.addr("http"))
    }

    async fn dispatch(&self, query: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(&format!("/v1/dispatch?{query}")))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn kill_room(&mut self, id: &str) {
        self.rooms.get_mut(id).unwrap().kill().await;
    }

    fn cleanup(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn nodes(answer: &Value) -> Vec<String> {
    answer["result"]["rooms"]
        .as_array()
        .map(|rooms| {
            rooms
                .iter()
                .map(|room| room["node"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of the Prometheus sample of `name` carrying all `labels`.
fn sample(rendered: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    rendered
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| {
            labels
                .iter()
                .all(|(label, value)| line.contains(&format!("{label}=\"{value}\"")))
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_get_rooms_of_their_network_and_region_and_another_region_when_theirs_is_down() {
    let mut cell = Cell::start(
        &[
            ("room-eu-wifi", r#"region="eu", net="wifi""#),
            ("room-us", r#"region="us""#),
        ],
        &[],
    )
    .await;

    let (status, answer) = cell.dispatch("user=anna&net=wifi&region=eu").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(nodes(&answer), ["room-eu-wifi"]);
    assert_eq!(answer["result"]["region_fallback"], false);
    let room = &answer["result"]["rooms"][0];
    assert_eq!(
        room["tcp"].as_str().unwrap(),
        cell.rooms["room-eu-wifi"].addr("tcp").to_string()
    );
    assert!(
        room.get("ws").is_none(),
        "no WebSocket listener yet: {room}"
    );
    assert!(answer["result"]["ttl_secs"].as_u64().unwrap() > 0);

    // No eu room serves cellular: another data centre does.
    let (_, answer) = cell.dispatch("user=anna&net=cellular&region=eu").await;
    assert_eq!(nodes(&answer), ["room-us"]);
    assert_eq!(answer["result"]["region_fallback"], true);

    // The SDK reads the answer.
    let sdk = pushgrid_client::dispatch(&cell.http, &cell.url(""), "anna")
        .await
        .unwrap();
    assert_eq!(sdk.rooms.len(), 2);

    // The only eu room dies: once its lease ends, eu devices go to us.
    cell.kill_room("room-eu-wifi").await;
    let moved = eventually(WAIT, || async {
        nodes(&cell.dispatch("user=anna&net=wifi&region=eu").await.1) == ["room-us"]
    })
    .await;
    assert!(moved, "eu devices were not sent to us");
    let (_, answer) = cell.dispatch("user=anna&net=wifi&region=eu").await;
    assert_eq!(answer["result"]["region_fallback"], true);

    let (status, answer) = cell.dispatch("user=anna&net=satellite").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("net:"),
        "{answer}"
    );
    cell.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_gets_the_same_room_and_a_dead_room_moves_only_its_devices() {
    let mut cell = Cell::start(
        &[
            ("room-a", r#"region="eu""#),
            ("room-b", r#"region="eu""#),
            ("room-c", r#"region="eu""#),
        ],
        &[],
    )
    .await;
    let users: Vec<String> = (0..30).map(|user| format!("device-{user}")).collect();
    let mut orders = HashMap::new();
    for user in &users {
        let (_, answer) = cell.dispatch(&format!("user={user}")).await;
        assert_eq!(answer["result"]["balancer"], "consistent_hash");
        orders.insert(user.clone(), nodes(&answer));
    }
    // Reconnects: the same rooms in the same order.
    for user in &users {
        let (_, answer) = cell.dispatch(&format!("user={user}")).await;
        assert_eq!(nodes(&answer), orders[user], "{user}");
    }
    let on_b = users
        .iter()
        .filter(|user| orders[*user][0] == "room-b")
        .count();
    assert!(
        on_b > 0 && on_b < users.len(),
        "{on_b} of 30 devices on room-b"
    );

    cell.kill_room("room-b").await;
    let gone = eventually(WAIT, || async {
        let (_, answer) = cell.dispatch("user=probe").await;
        !nodes(&answer).contains(&"room-b".to_string())
    })
    .await;
    assert!(gone, "room-b never left the dispatcher's view");
    for user in &users {
        let (_, answer) = cell.dispatch(&format!("user={user}")).await;
        let before = &orders[user];
        let expected: Vec<String> = before
            .iter()
            .filter(|node| *node != "room-b")
            .cloned()
            .collect();
        // Devices of room-b fail over to their next room on the ring; the
        // others keep their room.
        assert_eq!(nodes(&answer), expected, "{user} had {before:?}");
    }
    cell.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_setting_switches_the_balancer_without_a_restart() {
    let cell = Cell::start(
        &[
            ("room-a", r#"region="eu""#),
            ("room-b", r#"region="eu""#),
            ("room-c", r#"region="eu""#),
        ],
        &[],
    )
    .await;
    let (_, answer) = cell.dispatch("user=zoe").await;
    assert_eq!(answer["result"]["balancer"], "consistent_hash");

    let pool = pushgrid_common::db::connect(&cell.keeper_db, 1)
        .await
        .unwrap();
    sqlx::query("UPDATE settings SET value = ? WHERE name = ?")
        .bind("round_robin")
        .bind("dispatcher.balancer")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let switched = eventually(WAIT, || async {
        cell.dispatch("user=zoe").await.1["result"]["balancer"] == "round_robin"
    })
    .await;
    assert!(switched, "the dispatcher kept its balancer");
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..6 {
        firsts.insert(nodes(&cell.dispatch("user=zoe").await.1)[0].clone());
    }
    assert_eq!(
        firsts.len(),
        3,
        "round-robin sends one device to every room"
    );
    cell.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_answers_429_with_retry_after() {
    let cell = Cell::start(
        &[("room-a", "")],
        &["rate_limit_per_sec=1", "rate_limit_burst=5"],
    )
    .await;
    // The start used part of the burst; spend the rest.
    let mut limited = None;
    for _ in 0..10 {
        let response = cell
            .http
            .get(cell.url("/v1/dispatch?user=flood"))
            .send()
            .await
            .unwrap();
        if response.status().as_u16() == 429 {
            limited = Some(response);
            break;
        }
    }
    let response = limited.expect("no 429 within 10 requests at a burst of 5");
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "rate_limited");
    let metrics = metrics_text(cell.dispatcher.addr("admin")).await;
    let refused = sample(
        &metrics,
        "pushgrid_http_requests_total",
        &[("route", "/v1/dispatch"), ("status", "429")],
    );
    assert!(refused >= 1.0, "{metrics}");
    cell.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_traffic_counters_are_exact() {
    let cell = Cell::start(&[("room-a", r#"region="eu""#)], &[]).await;
    let admin = cell.dispatcher.addr("admin");
    let labels = [("role", "dispatcher"), ("route", "/v1/dispatch")];
    let before = metrics_text(admin).await;
    let response = cell
        .http
        .get(cell.url("/v1/dispatch?user=counted&region=eu"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    let body = response.bytes().await.unwrap();
    let after = metrics_text(admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let ok = [labels[0], labels[1], ("status", "200")];
    assert_eq!(delta("pushgrid_http_requests_total", &ok), 1.0);
    assert_eq!(
        delta("pushgrid_http_response_bytes_total", &labels),
        body.len() as f64
    );
    assert_eq!(delta("pushgrid_http_request_bytes_total", &labels), 0.0);
    cell.cleanup();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_traffic_counters_count_the_exact_bytes_of_a_push() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let admin = cluster.center.addr("admin");
    let labels = [("role", "center"), ("route", "/api/push")];
    let payload = br#"{"users": ["counted-user"], "payload": "exactly these bytes"}"#;
    let before = metrics_text(admin).await;
    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .header("Content-Type", "application/json")
        .body(payload.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let after = metrics_text(admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let ok = [labels[0], labels[1], ("status", "200")];
    assert_eq!(delta("pushgrid_http_requests_total", &ok), 1.0);
    assert_eq!(
        delta("pushgrid_http_request_bytes_total", &labels),
        payload.len() as f64
    );
    assert_eq!(
        delta("pushgrid_http_response_bytes_total", &labels),
        body.len() as f64
    );
    assert!(after.contains("pushgrid_http_request_duration_seconds"));
    cluster.cleanup().await;
}
