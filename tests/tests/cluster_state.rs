//! register, keeper and coordinator: sessions that survive restarts, a config
//! center whose changes reach running nodes, upstream routing, state callbacks
//! and kicks. Real processes, real Redis and MariaDB.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, Op, msg};
use pushgrid_e2e::{
    ClusterOptions, Received, TestCluster, eventually, metric, next_frame, next_push, spawn,
    webhook,
};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(15);

/// Connects `count` devices named `<prefix><n>`, alternating over the rooms.
async fn connect_many(cluster: &TestCluster, prefix: &str, count: usize) -> Vec<Connection> {
    let mut devices = Vec::with_capacity(count);
    for index in 0..count {
        let (device, _) = cluster
            .device_at(
                index % cluster.rooms.len(),
                &format!("{prefix}{index}"),
                "ios",
            )
            .await
            .unwrap();
        devices.push(device);
    }
    devices
}

/// Pushes one message to every device's user and checks each receives it.
async fn every_device_receives(
    cluster: &TestCluster,
    prefix: &str,
    devices: &mut [Connection],
    payload: &str,
) {
    let users: Vec<String> = (0..devices.len())
        .map(|index| format!("{prefix}{index}"))
        .collect();
    let user_refs: Vec<&str> = users.iter().map(String::as_str).collect();
    let ids = cluster.push(&user_refs, payload).await.unwrap();
    for (index, device) in devices.iter_mut().enumerate() {
        let push = next_push(device, WAIT)
            .await
            .unwrap_or_else(|error| panic!("{}: {error}", users[index]));
        assert_eq!(push.msg_id, ids[index], "{}", users[index]);
        assert_eq!(&push.payload[..], payload.as_bytes());
        device
            .send_frame(
                Op::Ack,
                0,
                &msg::Ack {
                    msg_ids: vec![push.msg_id],
                },
            )
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_register_gets_every_session_back_and_pushes_route() {
    let mut cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    const DEVICES: usize = 400;
    let mut devices = connect_many(&cluster, "r", DEVICES).await;
    every_device_receives(&cluster, "r", &mut devices, "before").await;

    cluster.register.kill().await;
    let new_register = spawn(
        &cluster.dir,
        "register-restarted",
        "register",
        &cluster.node_args(),
    )
    .await
    .unwrap();
    // The old instance's lease ends (3 s in tests); the rooms see the new
    // epoch and re-send their sessions.
    let admin = new_register.addr("admin");
    let restored = eventually(WAIT, || async {
        metric(admin, "pushgrid_register_sessions", "").await >= DEVICES as f64
    })
    .await;
    assert!(
        restored,
        "register has {} sessions",
        metric(admin, "pushgrid_register_sessions", "").await
    );
    assert!(
        eventually(WAIT, || async {
            cluster.push(&["nobody"], "probe").await.is_ok()
        })
        .await
    );
    every_device_receives(&cluster, "r", &mut devices, "after").await;
    cluster.register = new_register;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registers_split_users_and_lookups_find_them() {
    let cluster = TestCluster::start(ClusterOptions {
        registers: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    const DEVICES: usize = 200;
    let mut devices = connect_many(&cluster, "s", DEVICES).await;
    every_device_receives(&cluster, "s", &mut devices, "split").await;
    let first = metric(
        cluster.register.addr("admin"),
        "pushgrid_register_sessions",
        "",
    )
    .await;
    let second = metric(
        cluster.extra_registers[0].addr("admin"),
        "pushgrid_register_sessions",
        "",
    )
    .await;
    assert_eq!(first + second, DEVICES as f64, "each session is held once");
    assert!(
        first > 40.0 && second > 40.0,
        "users are split: {first} and {second}"
    );
    cluster.cleanup().await;
}

async fn push_status(cluster: &TestCluster, api_key: &str) -> (u16, Option<String>) {
    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .header("Authorization", format!("apikey {api_key}"))
        .json(&json!({ "users": ["u"], "payload": "x" }))
        .send()
        .await
        .unwrap();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_string());
    (response.status().as_u16(), retry_after)
}

async fn auth_result(cluster: &TestCluster, token: String) -> Result<(), String> {
    let auth = msg::Auth {
        token,
        device_id: "d".into(),
        platform: "t".into(),
    };
    Connection::connect(&cluster.room_addr(0), auth)
        .await
        .map(|_| ())
        .map_err(|error| error.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_config_changes_reach_running_nodes() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let app = cluster.app.clone();

    // The admin API refuses a wrong token.
    let response = cluster
        .http
        .get(format!(
            "http://{}/admin/config",
            cluster.keeper.addr("http")
        ))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // A new app: its devices and its API key work without any restart.
    let (status, body) = cluster
        .admin(
            Method::PUT,
            "/admin/apps/fresh",
            Some(json!({ "jwt_secret": "fresh-secret", "api_key": "fresh-key" })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        eventually(WAIT, || async {
            push_status(&cluster, "fresh-key").await.0 == 200
        })
        .await
    );
    let fresh_token = pushgrid_e2e::token("fresh", "u", "fresh-secret", 3600);
    assert!(
        eventually(WAIT, || async {
            auth_result(&cluster, fresh_token.clone()).await.is_ok()
        })
        .await
    );
    let (status, body) = cluster
        .admin(
            Method::PUT,
            "/admin/apps/bad",
            Some(json!({ "jwt_secret": "", "api_key": "k" })),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("jwt_secret"),
        "{body}"
    );

    // Secret rotation with an overlap: old and new tokens both work.
    let old_token = app.token("u");
    let new_token = pushgrid_e2e::token(&app.id, "u", "rotated-secret", 3600);
    let (status, _) = cluster
        .admin(
            Method::POST,
            &format!("/admin/apps/{}/rotate-secret", app.id),
            Some(json!({ "jwt_secret": "rotated-secret", "overlap_secs": 3600 })),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(WAIT, || async {
            auth_result(&cluster, new_token.clone()).await.is_ok()
        })
        .await
    );
    auth_result(&cluster, old_token.clone())
        .await
        .expect("the old secret is valid during the overlap");
    // Rotating again without overlap: the first secret is gone.
    let newest_token = pushgrid_e2e::token(&app.id, "u", "newest-secret", 3600);
    let (status, _) = cluster
        .admin(
            Method::POST,
            &format!("/admin/apps/{}/rotate-secret", app.id),
            Some(json!({ "jwt_secret": "newest-secret", "overlap_secs": 0 })),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(WAIT, || async {
            auth_result(&cluster, newest_token.clone()).await.is_ok()
        })
        .await
    );
    let refused = auth_result(&cluster, old_token).await.unwrap_err();
    assert!(refused.contains("AUTH_FAILED"), "{refused}");

    // A rate limit set at runtime: a burst of 3, then 429 with Retry-After.
    let (status, _) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{}", app.id),
            Some(json!({ "jwt_secret": "newest-secret", "api_key": app.api_key, "rate_per_sec": 1, "rate_burst": 3 })),
        )
        .await;
    assert_eq!(status, 200);
    let limited = eventually(WAIT, || async {
        push_status(&cluster, &app.api_key).await.0 == 429
    })
    .await;
    assert!(limited, "the rate limit never took effect");
    let (status, retry_after) = push_status(&cluster, &app.api_key).await;
    assert_eq!(status, 429);
    assert!(retry_after.unwrap().parse::<u32>().unwrap() >= 1);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_keep_flowing_across_a_keeper_kill() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (mut device, _) = cluster.device("kate").await.unwrap();
    cluster.keeper.kill().await;

    // keeper is gone: nodes keep their last view.
    let id = cluster
        .push(&["kate"], "while keeper is down")
        .await
        .unwrap()[0];
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, id);

    cluster.restart_keeper().await.unwrap();
    // Across the restart and the re-registration that follows, every push is
    // accepted and delivered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
    let mut sent = 0;
    while tokio::time::Instant::now() < deadline {
        let id = cluster.push(&["kate"], "during").await.unwrap()[0];
        let push = next_push(&mut device, WAIT).await.unwrap();
        assert_eq!(push.msg_id, id);
        device
            .send_frame(Op::Ack, 0, &msg::Ack { msg_ids: vec![id] })
            .await
            .unwrap();
        sent += 1;
        // Paces the pushes over the 6 s window.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(sent >= 10);
    // A new device finds a room through the dispatcher after the restart.
    let (mut late, _) = cluster.device("liam").await.unwrap();
    let id = cluster.push(&["liam"], "after").await.unwrap()[0];
    assert_eq!(next_push(&mut late, WAIT).await.unwrap().msg_id, id);
    cluster.cleanup().await;
}

async fn upstream(
    device: &mut Connection,
    seq: u32,
    product: &str,
    kind: &str,
) -> pushgrid_client::Frame {
    let request = msg::Upstream {
        product: product.into(),
        r#type: kind.into(),
        client_msg_id: format!("m{seq}"),
        payload: bytes::Bytes::from_static(b"up"),
    };
    device
        .send_frame(Op::Upstream, seq, &request)
        .await
        .unwrap();
    loop {
        let frame = next_frame(device, WAIT).await.unwrap().unwrap();
        if frame.seq == seq && matches!(frame.op, Op::UpstreamOk | Op::Error) {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_is_routed_by_product_and_type_with_retries() {
    let (chat_url, chat) = webhook(200, Duration::ZERO).await;
    let (refund_url, refunds) = webhook(200, Duration::ZERO).await;
    let (slow_url, slow) = webhook(200, Duration::from_secs(2)).await;
    let (webhook_url, webhook) = webhook(200, Duration::ZERO).await;
    let app_id_placeholder = "APP";
    let routes = format!(
        "routes=[{{app=\"{app_id_placeholder}\", product=\"chat\", url=\"{chat_url}\"}}, \
         {{app=\"{app_id_placeholder}\", product=\"pay\", type=\"refund\", url=\"{refund_url}\"}}, \
         {{app=\"{app_id_placeholder}\", product=\"slow\", url=\"{slow_url}\", timeout_ms=300, retries=2}}]"
    );
    // The app id is made by the harness: fill it in through the options.
    let mut options = ClusterOptions {
        webhook_url,
        ..Default::default()
    };
    let probe = pushgrid_e2e::TestApp::random();
    options.keeper_sets = vec![routes.replace(app_id_placeholder, &probe.id)];
    let cluster = TestCluster::start_with_app(options, probe).await.unwrap();
    let (mut device, _) = cluster.device("mia").await.unwrap();

    assert_eq!(
        upstream(&mut device, 1, "chat", "text").await.op,
        Op::UpstreamOk
    );
    assert_eq!(
        upstream(&mut device, 2, "chat", "image").await.op,
        Op::UpstreamOk
    );
    assert_eq!(
        upstream(&mut device, 3, "pay", "refund").await.op,
        Op::UpstreamOk
    );
    // pay/charge has no route of its own: it goes to the app's webhook.
    assert_eq!(
        upstream(&mut device, 4, "pay", "charge").await.op,
        Op::UpstreamOk
    );
    let count = |store: &Received, kind: &str| {
        store
            .lock()
            .unwrap()
            .iter()
            .filter(|body| body["event"] == "upstream" && body["type"] == kind)
            .count()
    };
    assert_eq!((count(&chat, "text"), count(&chat, "image")), (1, 1));
    assert_eq!(count(&refunds, "refund"), 1);
    assert_eq!(
        (
            count(&webhook, "charge"),
            count(&webhook, "refund"),
            count(&webhook, "text")
        ),
        (1, 0, 0)
    );

    // A route whose endpoint answers too late: three attempts, then ERROR.
    let frame = upstream(&mut device, 5, "slow", "x").await;
    assert_eq!(frame.op, Op::Error);
    let error = frame.decode::<msg::Error>().unwrap();
    assert_eq!(error.code(), msg::ErrorCode::UpstreamFailed);
    assert!(error.message.contains("timed out"), "{}", error.message);
    assert_eq!(slow.lock().unwrap().len(), 3, "one attempt and two retries");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_callbacks_arrive_batched() {
    let (webhook_url, received) = webhook(200, Duration::ZERO).await;
    let cluster = TestCluster::start(ClusterOptions {
        webhook_url,
        ..Default::default()
    })
    .await
    .unwrap();
    const DEVICES: usize = 50;
    let devices = connect_many(&cluster, "b", DEVICES).await;
    let online_events = || {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|body| body["event"] == "state")
            .flat_map(|body| body["events"].as_array().cloned().unwrap_or_default())
            .filter(|event| event["online"] == true)
            .count()
    };
    assert!(
        eventually(WAIT, || async { online_events() == DEVICES }).await,
        "{} online events",
        online_events()
    );
    let requests = received
        .lock()
        .unwrap()
        .iter()
        .filter(|body| body["event"] == "state")
        .count();
    assert!(
        requests < DEVICES / 2,
        "{DEVICES} events came in {requests} requests"
    );
    drop(devices);
    let offline = || {
        received
            .lock()
            .unwrap()
            .iter()
            .filter(|body| body["event"] == "state")
            .flat_map(|body| body["events"].as_array().cloned().unwrap_or_default())
            .filter(|event| event["online"] == false)
            .count()
    };
    assert!(
        eventually(WAIT, || async { offline() == DEVICES }).await,
        "{} offline events",
        offline()
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_login_kicks_the_older_connection_of_the_same_platform() {
    let options = ClusterOptions {
        rooms: 2,
        app_extra: "single_login=true".into(),
        ..Default::default()
    };
    let cluster = TestCluster::start(options).await.unwrap();
    let (mut first, _) = cluster.device_at(0, "noah", "ios").await.unwrap();
    let (mut web, _) = cluster.device_at(1, "noah", "web").await.unwrap();
    let (mut second, _) = cluster.device_at(1, "noah", "ios").await.unwrap();

    let frame = next_frame(&mut first, WAIT).await.unwrap().unwrap();
    assert_eq!(frame.op, Op::Kick);
    let kick = frame.decode::<msg::Kick>().unwrap();
    assert_eq!(kick.code(), msg::KickCode::SingleLogin);
    assert!(
        matches!(next_frame(&mut first, WAIT).await, Ok(None) | Err(_)),
        "the kicked connection is closed"
    );

    // The newer login and the other platform stay, and both get pushes.
    let id = cluster.push(&["noah"], "still here").await.unwrap()[0];
    assert_eq!(next_push(&mut second, WAIT).await.unwrap().msg_id, id);
    assert_eq!(next_push(&mut web, WAIT).await.unwrap().msg_id, id);
    cluster.cleanup().await;
}
