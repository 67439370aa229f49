//! The foundation's end-to-end tests: seven separate role processes, the real
//! Redis and MariaDB, real TCP devices.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use pushgrid_client::{Client, ClientConfig, Event, Op, msg};
use pushgrid_e2e::{
    ClusterOptions, REDIS_URL, TestCluster, eventually, frames_until_close, next_frame, next_push,
    only_error, webhook,
};
use sqlx::Row;

const WAIT: Duration = Duration::from_secs(10);

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn inbox_len(app: &str, user: &str) -> i64 {
    let mut redis = redis().await;
    redis::cmd("ZCARD")
        .arg(format!("pg:{{{app}:{user}}}:inbox"))
        .query_async(&mut redis)
        .await
        .unwrap()
}

async fn acked_ms(cluster: &TestCluster, id: u64) -> Option<i64> {
    let pool = cluster.mysql().await.unwrap();
    let row = sqlx::query("SELECT acked_ms FROM messages WHERE id = ?")
        .bind(id as i64)
        .fetch_one(&pool)
        .await
        .unwrap();
    let acked: Option<i64> = row.try_get("acked_ms").unwrap();
    pool.close().await;
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_reaches_the_device_once_and_its_ack_clears_redis_and_mysql() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (mut device, auth_ok) = cluster.device("alice").await.unwrap();
    assert!(auth_ok.conn_id > 0);
    assert_eq!(auth_ok.heartbeat_secs, 30);

    let ids = cluster.push(&["alice"], "hello alice").await.unwrap();
    assert_eq!(ids.len(), 1);
    let push = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(push.msg_id, ids[0]);
    assert_eq!(&push.payload[..], b"hello alice");
    assert!(push.created_ms > 0);

    // Exactly once: nothing else arrives while the message is unacked.
    let extra = next_frame(&mut device, Duration::from_millis(700)).await;
    assert!(extra.is_err(), "a second frame arrived: {extra:?}");

    // Stored in Redis and MySQL before the ack...
    assert_eq!(inbox_len(&cluster.app.id, "alice").await, 1);
    assert_eq!(acked_ms(&cluster, ids[0]).await, None);

    // ...and gone from the Redis inbox, marked acked in MySQL after it.
    device
        .send_frame(
            Op::Ack,
            1,
            &msg::Ack {
                msg_ids: vec![ids[0]],
            },
        )
        .await
        .unwrap();
    let app = cluster.app.id.clone();
    assert!(
        eventually(WAIT, || async { inbox_len(&app, "alice").await == 0 }).await,
        "inbox not emptied"
    );
    assert!(
        eventually(WAIT, || async {
            acked_ms(&cluster, ids[0]).await.is_some()
        })
        .await,
        "not acked in MySQL"
    );
    cluster.cleanup().await;
}

/// Messages to one user routed at once share a register lookup batch; each
/// must still reach the user's connection once. (Center used to send the
/// user once per message in the batch, got its session back that often and
/// handed every message to the same connection that many times: the 420
/// duplicates of the unicast load test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_routed_together_to_one_user_reach_its_device_once_each() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (mut device, _) = cluster.device("erin").await.unwrap();
    // Ten calls at once, as the load test makes them: their routing jobs
    // run side by side and their lookups share batches. 50 messages in all
    // stay below the room's outbound queue of 64 frames.
    let calls: Vec<_> = (0..10)
        .map(|_| cluster.push(&["erin"; 5], "one of many"))
        .collect();
    let mut ids = Vec::new();
    for answer in futures::future::join_all(calls).await {
        ids.extend(answer.unwrap());
    }
    assert_eq!(ids.len(), 50);

    let mut received = Vec::new();
    while let Ok(Some(frame)) = next_frame(&mut device, Duration::from_millis(1500)).await {
        if frame.op == Op::Push {
            received.push(frame.decode::<msg::Push>().unwrap().msg_id);
        }
    }
    received.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(
        received.len(),
        expected.len(),
        "{} pushes arrived for {} messages",
        received.len(),
        expected.len()
    );
    assert_eq!(received, expected, "each message exactly once");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_inbox_is_delivered_on_connect_and_again_until_acked() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let ids = cluster.push(&["bob"], "while you were away").await.unwrap();

    // Raw protocol: delivered on connect, and again after a reconnect without ACK.
    let (mut device, _) = cluster.device("bob").await.unwrap();
    let first = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(first.msg_id, ids[0]);
    assert_eq!(&first.payload[..], b"while you were away");
    drop(device);
    let (mut device, _) = cluster.device("bob").await.unwrap();
    let again = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(
        again.msg_id, ids[0],
        "an unacked message is delivered again"
    );
    drop(device);

    // The SDK hands it to the application once, however often it arrives.
    let mut config = ClientConfig::new(cluster.app.token("bob"), "bob-phone");
    config.dispatcher = Some(cluster.dispatcher_url());
    let (client, mut events) = Client::start(config);
    let mut pushes = Vec::new();
    let mut connects = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while connects < 1 || pushes.is_empty() {
        match tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Push(push) => pushes.push(push),
            Event::Connected { .. } => connects += 1,
            _ => {}
        }
    }
    assert_eq!(pushes.len(), 1);
    client.reconnect().await.unwrap();
    assert!(
        eventually(WAIT, || async { client.stats().duplicates_dropped >= 1 }).await,
        "the redelivery after the reconnect was not seen"
    );
    // Nothing new reached the application.
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await
    {
        assert!(
            !matches!(event, Event::Push(_)),
            "duplicate handed to the app: {event:?}"
        );
    }
    assert_eq!(client.stats().pushes_received, 1);

    // After the ACK, a reconnect brings nothing.
    client.ack(vec![ids[0]]).await.unwrap();
    let app = cluster.app.id.clone();
    assert!(eventually(WAIT, || async { inbox_len(&app, "bob").await == 0 }).await);
    client.close().await;
    let (mut device, _) = cluster.device("bob").await.unwrap();
    assert!(
        next_frame(&mut device, Duration::from_millis(700))
            .await
            .is_err(),
        "acked message came back"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multicast_reaches_every_connected_user() {
    let cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut carol, _) = pushgrid_client::Connection::connect(
        &cluster.room_addr(0),
        msg::Auth {
            token: cluster.app.token("carol"),
            device_id: "c".into(),
            platform: "t".into(),
        },
    )
    .await
    .unwrap();
    let (mut dave, _) = pushgrid_client::Connection::connect(
        &cluster.room_addr(1),
        msg::Auth {
            token: cluster.app.token("dave"),
            device_id: "d".into(),
            platform: "t".into(),
        },
    )
    .await
    .unwrap();
    let ids = cluster.push(&["carol", "dave"], "to both").await.unwrap();
    assert_eq!(ids.len(), 2);
    assert_ne!(ids[0], ids[1], "each user gets a message of their own");
    assert_eq!(next_push(&mut carol, WAIT).await.unwrap().msg_id, ids[0]);
    assert_eq!(next_push(&mut dave, WAIT).await.unwrap().msg_id, ids[1]);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reaches_the_webhook_and_the_device_gets_upstream_ok() {
    let (url, received) = webhook(200, Duration::ZERO).await;
    let cluster = TestCluster::start(ClusterOptions {
        webhook_url: url,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut device, _) = cluster.device("erin").await.unwrap();
    let upstream = msg::Upstream {
        product: "chat".into(),
        r#type: "message".into(),
        client_msg_id: "c-1".into(),
        payload: bytes::Bytes::from_static(b"hi backend"),
    };
    device.send_frame(Op::Upstream, 7, &upstream).await.unwrap();
    let frame = loop {
        let frame = next_frame(&mut device, WAIT).await.unwrap().unwrap();
        if frame.op == Op::UpstreamOk {
            break frame;
        }
    };
    assert_eq!(frame.seq, 7);
    assert_eq!(
        frame.decode::<msg::UpstreamOk>().unwrap().client_msg_id,
        "c-1"
    );

    let upstreams: Vec<serde_json::Value> = received
        .lock()
        .unwrap()
        .iter()
        .filter(|body| body["event"] == "upstream")
        .cloned()
        .collect();
    assert_eq!(upstreams.len(), 1);
    let body = &upstreams[0];
    assert_eq!(body["app"], cluster.app.id.as_str());
    assert_eq!(body["user"], "erin");
    assert_eq!(body["product"], "chat");
    assert_eq!(body["type"], "message");
    assert_eq!(body["payload"], "hi backend");

    // The online event reaches the same webhook, batched.
    let got_state = eventually(WAIT, || async {
        received.lock().unwrap().iter().any(|body| {
            body["event"] == "state"
                && body["events"].as_array().is_some_and(|events| {
                    events
                        .iter()
                        .any(|event| event["user"] == "erin" && event["online"] == true)
                })
        })
    })
    .await;
    assert!(got_state, "no online event reached the webhook");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_gives_the_device_an_error_frame() {
    let (url, _received) = webhook(500, Duration::ZERO).await;
    let cluster = TestCluster::start(ClusterOptions {
        webhook_url: url,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut device, _) = cluster.device("frank").await.unwrap();
    let upstream = msg::Upstream {
        product: "p".into(),
        r#type: "t".into(),
        client_msg_id: "x".into(),
        ..Default::default()
    };
    device.send_frame(Op::Upstream, 9, &upstream).await.unwrap();
    let frame = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!(frame.op, Op::Error);
    assert_eq!(frame.seq, 9);
    let error = frame.decode::<msg::Error>().unwrap();
    assert_eq!(error.code(), msg::ErrorCode::UpstreamFailed);
    assert!(error.message.contains("500"), "{}", error.message);
    // The connection stays usable.
    device.send_empty(Op::Ping, 10).await.unwrap();
    let pong = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!((pong.op, pong.seq), (Op::Pong, 10));
    cluster.cleanup().await;
}

async fn api(cluster: &TestCluster, key: &str, body: &'static str) -> (u16, serde_json::Value) {
    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .header("Authorization", format!("apikey {key}"))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_push_api_refuses_bad_input_with_clear_errors() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();

    let (status, body) = api(&cluster, "wrong-key", r#"{"users":["a"],"payload":"x"}"#).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");

    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        401,
        "a missing Authorization header is 401"
    );

    let (status, body) = api(&cluster, &key, r#"{"users":["a"],"payload":"x""#).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("JSON"),
        "{body}"
    );

    let (status, body) = api(&cluster, &key, r#"{"users":"a","payload":"x"}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid type"),
        "{body}"
    );

    let (status, body) = api(
        &cluster,
        &key,
        r#"{"users":["a"],"payload":"x","colour":"red"}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );

    let (status, body) = api(&cluster, &key, r#"{"users":[],"payload":"x"}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("users"),
        "{body}"
    );

    let (status, body) = api(&cluster, &key, r#"{"users":["a"]}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("payload"),
        "{body}"
    );

    let (status, body) = api(&cluster, &key, r#"{"users":["a"],"payload_b64":"***"}"#).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("payload_b64"),
        "{body}"
    );

    let huge = format!(
        r#"{{"users":["a"],"payload":"{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    // A connection of its own: the server closes it after refusing the body
    // unread, and the shared client must not reuse it.
    let response = reqwest::Client::new()
        .post(format!("{}/api/push", cluster.center_url()))
        .header("Authorization", format!("apikey {key}"))
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large");

    let response = cluster
        .http
        .post(format!("{}/api/nope", cluster.center_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_get_an_error_frame_and_a_close() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let app = &cluster.app;
    let cases = [
        ("garbage", "not.a.jwt".to_string()),
        (
            "wrong secret",
            pushgrid_e2e::token(&app.id, "u", "other-secret", 3600),
        ),
        (
            "expired",
            pushgrid_e2e::token(&app.id, "u", &app.secret, -3600),
        ),
        (
            "unknown app",
            pushgrid_e2e::token("no-such-app", "u", &app.secret, 3600),
        ),
    ];
    for (case, token) in cases {
        let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
        device
            .send_frame(
                Op::Auth,
                1,
                &msg::Auth {
                    token,
                    device_id: "d".into(),
                    platform: "t".into(),
                },
            )
            .await
            .unwrap();
        let error = only_error(&frames_until_close(&mut device).await);
        assert_eq!(
            error.code(),
            msg::ErrorCode::AuthFailed,
            "{case}: {error:?}"
        );
        assert!(!error.message.is_empty(), "{case}");
    }
    // A first frame that is not AUTH.
    let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
    device.send_empty(Op::Ping, 1).await.unwrap();
    assert_eq!(
        only_error(&frames_until_close(&mut device).await).code(),
        msg::ErrorCode::AuthRequired
    );
    // Nothing at all: closed after the pre-auth deadline (2 s in tests).
    let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
    assert_eq!(
        only_error(&frames_until_close(&mut device).await).code(),
        msg::ErrorCode::AuthTimeout
    );
    cluster.cleanup().await;
}

async fn room_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversize_headers_are_refused_without_allocating() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let rss_before = room_rss_kib(cluster.rooms[0].pid()).await;

    // Twenty headers each claiming a 4 GiB body, before AUTH: refused on the
    // header alone (no body is ever sent, yet the answer comes at once).
    for _ in 0..20 {
        let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
        let mut header = BytesMut::new();
        header.put_u32(u32::MAX);
        header.put_u8(1);
        header.put_u8(Op::Auth as u8);
        header.put_u16(0);
        header.put_u32(0);
        device.send_raw(&header).await.unwrap();
        assert_eq!(
            only_error(&frames_until_close(&mut device).await).code(),
            msg::ErrorCode::FrameTooLarge
        );
    }
    let rss_after = room_rss_kib(cluster.rooms[0].pid()).await;
    assert!(
        rss_after < rss_before + 64 * 1024,
        "room RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // A bad version byte, an unknown op, and random bytes.
    let bad_version = [0u8, 0, 0, 0, 9, 1, 0, 0, 0, 0, 0, 0];
    let unknown_op = [0u8, 0, 0, 0, 1, 200, 0, 0, 0, 0, 0, 0];
    for (raw, code) in [
        (&bad_version[..], msg::ErrorCode::BadVersion),
        (&unknown_op[..], msg::ErrorCode::UnknownOp),
    ] {
        let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
        device.send_raw(raw).await.unwrap();
        assert_eq!(
            only_error(&frames_until_close(&mut device).await).code(),
            code
        );
    }
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..50 {
        let mut junk = Vec::new();
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            junk.push(state as u8);
        }
        let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
        let _ = device.send_raw(&junk).await;
        let frames = frames_until_close(&mut device).await;
        assert!(
            frames.len() <= 1 && frames.iter().all(|frame| frame.op == Op::Error),
            "{frames:?}"
        );
    }
    // An undecodable AUTH body.
    let mut device = pushgrid_client::Connection::open(&room).await.unwrap();
    device
        .send_raw(&[
            0,
            0,
            0,
            3,
            1,
            Op::Auth as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            0xff,
            0xff,
            0xff,
        ])
        .await
        .unwrap();
    assert_eq!(
        only_error(&frames_until_close(&mut device).await).code(),
        msg::ErrorCode::BadBody
    );

    // Nothing panicked: the room is alive and still serves devices.
    assert!(cluster.rooms[0].is_running());
    let (mut device, _) = cluster.device("grace").await.unwrap();
    let ids = cluster.push(&["grace"], "still here").await.unwrap();
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, ids[0]);
    assert!(!cluster.rooms[0].log_text().contains("panicked"));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_is_kicked_after_two_and_a_half_heartbeats() {
    let cluster = TestCluster::start(ClusterOptions {
        heartbeat_secs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut silent, _) = cluster.device("henry").await.unwrap();
    let started = std::time::Instant::now();
    let frames = frames_until_close(&mut silent).await;
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].op, Op::Kick);
    assert_eq!(
        frames[0].decode::<msg::Kick>().unwrap().code(),
        msg::KickCode::Heartbeat
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "kicked too early"
    );

    // A device that pings stays.
    let (mut pinging, _) = cluster.device("ivy").await.unwrap();
    for seq in 0..5 {
        pinging.send_empty(Op::Ping, seq).await.unwrap();
        let frame = next_frame(&mut pinging, WAIT).await.unwrap().unwrap();
        assert_eq!(frame.op, Op::Pong);
        // Paces the pings: one per 800 ms keeps the device alive past the
        // silence that closed the other one.
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    cluster.cleanup().await;
}
