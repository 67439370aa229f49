//! Device push tokens (issue 25) on real role processes, the real Redis and
//! MariaDB and real TCP devices: backends register, list and remove tokens
//! through the API (scoped to their app); devices register theirs with a
//! PUSH_TOKEN frame, raw or through the Rust SDK.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Client, ClientConfig, ClientError, Event, Op, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, frames_until_close, next_frame};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);
const APNS_A: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
const APNS_B: &str = "11fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f1";
const FCM_A: &str = "dGVzdA:APA91bH-x_y-first";

async fn ok(cluster: &TestCluster, key: &str, method: &str, body: Value) -> Value {
    let (status, answer) = cluster.call(key, method, body).await;
    assert_eq!(status, 200, "{method}: {answer}");
    answer["result"].clone()
}

async fn tokens_of(cluster: &TestCluster, key: &str, user: &str) -> Vec<Value> {
    let listed = ok(cluster, key, "list_tokens", json!({ "user": user })).await;
    listed["tokens"].as_array().unwrap().clone()
}

fn token_values(tokens: &[Value]) -> Vec<&str> {
    let mut values: Vec<&str> = tokens
        .iter()
        .map(|token| token["token"].as_str().unwrap())
        .collect();
    values.sort_unstable();
    values
}

/// Adds a second app through keeper's admin API; returns its key once center
/// accepts it.
async fn add_app(cluster: &TestCluster, id: &str) -> String {
    let key = format!("{id}-key");
    let (status, body) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{id}"),
            Some(json!({ "jwt_secret": "s2", "api_key": key })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let accepted = eventually(WAIT, || async {
        cluster
            .call(&key, "list_tokens", json!({ "user": "x" }))
            .await
            .0
            == 200
    })
    .await;
    assert!(accepted, "app {id} never reached center");
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_register_list_and_remove_tokens_of_their_app_only() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let apns = json!({ "user": "ann", "provider": "apns", "token": APNS_A,
                       "bundle": "com.example.chat", "device": "ann-phone", "platform": "ios" });
    let answer = ok(&cluster, &key, "register_token", apns).await;
    assert_eq!(
        answer,
        json!({ "user": "ann", "provider": "apns", "registered": true })
    );
    ok(
        &cluster,
        &key,
        "register_token",
        json!({ "user": "ann", "provider": "fcm", "token": FCM_A, "bundle": "com.example.chat" }),
    )
    .await;
    let tokens = tokens_of(&cluster, &key, "ann").await;
    assert_eq!(token_values(&tokens), vec![APNS_A, FCM_A]);
    let apns_row = tokens
        .iter()
        .find(|token| token["provider"] == "apns")
        .unwrap();
    assert_eq!(apns_row["device"], "ann-phone");
    assert_eq!(apns_row["platform"], "ios");
    assert_eq!(apns_row["bundle"], "com.example.chat");
    assert!(apns_row["created_ms"].as_u64().unwrap() > 0);
    let fcm_row = tokens
        .iter()
        .find(|token| token["provider"] == "fcm")
        .unwrap();
    assert_eq!(fcm_row["device"], Value::Null);

    // The device's new APNs token replaces its old one; a token registered
    // again by another user moves to that user.
    ok(
        &cluster,
        &key,
        "register_token",
        json!({ "user": "ann", "provider": "apns", "token": APNS_B,
                "bundle": "com.example.chat", "device": "ann-phone" }),
    )
    .await;
    assert_eq!(
        token_values(&tokens_of(&cluster, &key, "ann").await),
        vec![APNS_B, FCM_A]
    );
    ok(
        &cluster,
        &key,
        "register_token",
        json!({ "user": "bob", "provider": "fcm", "token": FCM_A, "bundle": "com.example.chat" }),
    )
    .await;
    assert_eq!(
        token_values(&tokens_of(&cluster, &key, "ann").await),
        vec![APNS_B]
    );
    assert_eq!(
        token_values(&tokens_of(&cluster, &key, "bob").await),
        vec![FCM_A]
    );

    // Another app's key sees and removes nothing of ours, and the same token
    // values in its app are its own.
    let other_key = add_app(&cluster, &format!("{}o", cluster.app.id)).await;
    assert!(tokens_of(&cluster, &other_key, "ann").await.is_empty());
    ok(
        &cluster,
        &other_key,
        "register_token",
        json!({ "user": "ann", "provider": "apns", "token": APNS_B, "bundle": "org.other" }),
    )
    .await;
    let removed = ok(
        &cluster,
        &other_key,
        "remove_token",
        json!({ "provider": "fcm", "token": FCM_A }),
    )
    .await;
    assert_eq!(removed["removed"], 0);
    assert_eq!(
        token_values(&tokens_of(&cluster, &key, "bob").await),
        vec![FCM_A]
    );
    let theirs = tokens_of(&cluster, &other_key, "ann").await;
    assert_eq!(theirs.len(), 1);
    assert_eq!(theirs[0]["bundle"], "org.other");

    // Removing one token, then every token of a user.
    let removed = ok(
        &cluster,
        &key,
        "remove_token",
        json!({ "provider": "fcm", "token": FCM_A }),
    )
    .await;
    assert_eq!(removed["removed"], 1);
    assert!(tokens_of(&cluster, &key, "bob").await.is_empty());
    let removed = ok(&cluster, &key, "remove_token", json!({ "user": "ann" })).await;
    assert_eq!(removed["removed"], 1);
    assert!(tokens_of(&cluster, &key, "ann").await.is_empty());
    assert_eq!(tokens_of(&cluster, &other_key, "ann").await.len(), 1);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_calls_are_400_and_name_the_field() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let good =
        json!({ "user": "cy", "provider": "apns", "token": APNS_A, "bundle": "com.example" });
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        body
    };
    let cases = [
        ("register_token", with("provider", json!("gcm")), "provider"),
        ("register_token", with("token", json!("not-hex")), "token"),
        (
            "register_token",
            with("token", json!(&APNS_A[1..])),
            "token",
        ),
        ("register_token", with("bundle", json!("")), "bundle"),
        (
            "register_token",
            with("bundle", json!("com/evil")),
            "bundle",
        ),
        ("register_token", with("user", json!("")), "user"),
        ("register_token", with("device", json!("a\nb")), "device"),
        ("register_token", with("extra", json!(1)), "extra"),
        (
            "register_token",
            json!({ "user": "cy", "provider": "fcm", "token": "has space", "bundle": "b" }),
            "token",
        ),
        (
            "register_token",
            json!({ "user": "cy", "provider": "fcm", "token": "a".repeat(513), "bundle": "b" }),
            "token",
        ),
        ("register_token", json!({ "user": "cy" }), "provider"),
        ("list_tokens", json!({ "user": "" }), "user"),
        ("list_tokens", json!({}), "user"),
        ("remove_token", json!({ "provider": "fcm" }), "token"),
        (
            "remove_token",
            json!({ "provider": "x", "token": "t" }),
            "provider",
        ),
        (
            "remove_token",
            json!({ "provider": "fcm", "token": "t", "user": "cy" }),
            "user",
        ),
        ("remove_token", json!({}), "provider"),
    ];
    for (method, body, field) in cases {
        let (status, answer) = cluster.call(&key, method, body.clone()).await;
        assert_eq!(status, 400, "{method} {body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{method} {body}: {message} names no {field}"
        );
    }
    assert!(tokens_of(&cluster, &key, "cy").await.is_empty());
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_registers_its_token_with_a_push_token_frame() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let (mut device, _) = cluster.device_at(0, "dee", "ios").await.unwrap();
    let push_token = msg::PushToken {
        provider: "apns".into(),
        token: APNS_A.into(),
        bundle: "com.example.chat".into(),
    };
    device
        .send_frame(Op::PushToken, 41, &push_token)
        .await
        .unwrap();
    let answer = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!((answer.op, answer.seq), (Op::PushTokenOk, 41));
    let ok_body: msg::PushTokenOk = answer.decode().unwrap();
    assert_eq!(
        (ok_body.provider.as_str(), ok_body.token.as_str()),
        ("apns", APNS_A)
    );
    let tokens = tokens_of(&cluster, &key, "dee").await;
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0]["device"], "dee-ios");
    assert_eq!(tokens[0]["platform"], "ios");
    assert_eq!(tokens[0]["token"], APNS_A);

    // A bad token is a bad body: ERROR naming the field, then the close.
    let bad = msg::PushToken {
        provider: "gcm".into(),
        ..push_token
    };
    device.send_frame(Op::PushToken, 42, &bad).await.unwrap();
    let frames = frames_until_close(&mut device).await;
    let error: msg::Error = frames.last().unwrap().decode().unwrap();
    assert_eq!(error.code(), msg::ErrorCode::BadBody);
    assert!(error.message.starts_with("provider:"), "{}", error.message);
    assert_eq!(tokens_of(&cluster, &key, "dee").await.len(), 1);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_registers_its_token_and_sends_it_again_after_a_reconnect() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let mut config = ClientConfig::new(cluster.app.token("eve"), "eve-pixel");
    config.addrs = vec![cluster.room_addr(0)];
    let (client, mut events) = Client::start(config);
    let refused = client
        .register_push_token("fcm", "bad token", "com.example")
        .await;
    assert!(
        matches!(&refused, Err(ClientError::Protocol(message)) if message.starts_with("token:")),
        "{refused:?}"
    );
    client
        .register_push_token("fcm", FCM_A, "com.example.chat")
        .await
        .unwrap();
    let stored = eventually(WAIT, || async {
        token_values(&tokens_of(&cluster, &key, "eve").await) == vec![FCM_A]
    })
    .await;
    assert!(stored, "the SDK's token never reached saver");
    assert_eq!(
        tokens_of(&cluster, &key, "eve").await[0]["device"],
        "eve-pixel"
    );

    // Removed by the backend, it comes back with the next connection.
    ok(&cluster, &key, "remove_token", json!({ "user": "eve" })).await;
    assert!(tokens_of(&cluster, &key, "eve").await.is_empty());
    client.reconnect().await.unwrap();
    let reconnected = tokio::time::timeout(WAIT, async {
        let mut connects = 0;
        while let Some(event) = events.recv().await {
            if matches!(event, Event::Connected { .. }) {
                connects += 1;
                if connects == 2 {
                    return;
                }
            }
        }
    })
    .await;
    assert!(reconnected.is_ok(), "the client never reconnected");
    let stored_again = eventually(WAIT, || async {
        token_values(&tokens_of(&cluster, &key, "eve").await) == vec![FCM_A]
    })
    .await;
    assert!(
        stored_again,
        "the token was not sent again after the reconnect"
    );
    client.close().await;
    cluster.cleanup().await;
}

/// A device that sends PUSH_TOKEN frames faster than saver answers them gets
/// ERROR RATE_LIMITED for each one past its 16 unanswered calls, and an answer
/// for every frame: the room does not grow a task per frame without bound,
/// and the connection stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_16_calls_unanswered_is_told_to_wait() {
    const FRAMES: u32 = 2_000;
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (mut device, _) = cluster.device_at(0, "flood", "ios").await.unwrap();
    let push_token = msg::PushToken {
        provider: "apns".into(),
        token: APNS_A.into(),
        bundle: "com.example.chat".into(),
    };
    // Every frame in one write, so the room reads them far faster than one
    // saver call takes.
    let mut burst = Vec::new();
    for seq in 1..=FRAMES {
        burst.extend_from_slice(&pushgrid_wire::encode(Op::PushToken, seq, &push_token));
    }
    device.send_raw(&burst).await.unwrap();

    // A call past the cap is refused (RATE_LIMITED); one within it is stored,
    // or answered UNAVAILABLE when saver could not store it (16 concurrent
    // registrations of one token contend for the same rows in MySQL; saver
    // retries a deadlock victim, but not forever).
    let (mut stored, mut refused, mut unavailable) = (0u32, 0u32, 0u32);
    let mut answered = std::collections::HashSet::new();
    while answered.len() < FRAMES as usize {
        let frame = next_frame(&mut device, WAIT)
            .await
            .unwrap()
            .expect("the room closed the connection");
        assert!(
            answered.insert(frame.seq),
            "seq {} answered twice",
            frame.seq
        );
        match frame.op {
            Op::PushTokenOk => stored += 1,
            Op::Error => {
                let error: msg::Error = frame.decode().unwrap();
                match error.code() {
                    msg::ErrorCode::RateLimited => {
                        assert!(error.message.contains("16 calls"), "{}", error.message);
                        refused += 1;
                    }
                    msg::ErrorCode::Unavailable => unavailable += 1,
                    other => panic!("seq {}: {other:?} {}", frame.seq, error.message),
                }
            }
            other => panic!("unexpected {other:?} for seq {}", frame.seq),
        }
    }
    println!("{stored} stored, {refused} refused, {unavailable} unavailable");
    assert!(refused > 0, "{FRAMES} frames in one write, none refused");
    assert!(
        stored > 0,
        "none of {FRAMES} stored ({unavailable} unavailable)"
    );

    // Once the answers are in, the device may call again.
    device
        .send_frame(Op::PushToken, FRAMES + 1, &push_token)
        .await
        .unwrap();
    let answer = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!((answer.op, answer.seq), (Op::PushTokenOk, FRAMES + 1));
    cluster.cleanup().await;
}
