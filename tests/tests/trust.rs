//! Trust at the edges, against real processes: admin endpoints need the admin
//! token on every port and in every mode; an API key sees only its own app in
//! `stats` and `info`; device tokens are held to their times, their lifetime
//! and their device; bad ids, TTLs and reused idempotency keys are refused
//! with a status and message that say what was wrong, and nothing is stored.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, Op, msg};
use pushgrid_common::jwt::{Claims, TimeClaims, sign_with_times};
use pushgrid_e2e::{
    ADMIN_TOKEN, ClusterOptions, TestCluster, eventually, frames_until_close, metric, metrics_text,
    next_push, only_error, spawn, wait_for,
};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// A token of the cluster's app for `user` with the given times and device.
fn token(cluster: &TestCluster, user: &str, exp: u64, times: TimeClaims, dev: &str) -> String {
    let claims = Claims {
        sub: user.into(),
        app: cluster.app.id.clone(),
        exp,
        dev: dev.into(),
    };
    sign_with_times(&claims, times, &cluster.app.secret)
}

/// AUTH with `token` and `device`: the AUTH_OK, or the ERROR's message.
async fn auth(room: &str, token: String, device: &str) -> Result<msg::AuthOk, String> {
    let mut connection = Connection::open(room).await.unwrap();
    connection
        .send_frame(
            Op::Auth,
            1,
            &msg::Auth {
                token,
                device_id: device.into(),
                platform: "test".into(),
            },
        )
        .await
        .unwrap();
    let frame = pushgrid_e2e::next_frame(&mut connection, WAIT)
        .await
        .unwrap()
        .unwrap();
    if frame.op == Op::AuthOk {
        return Ok(frame.decode().unwrap());
    }
    let mut frames = vec![frame];
    frames.extend(frames_until_close(&mut connection).await);
    let error = only_error(&frames);
    assert_eq!(error.code, msg::ErrorCode::AuthFailed as i32, "{error:?}");
    Err(error.message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_tokens_are_held_to_their_times_lifetime_and_device() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let admin = cluster.rooms[0].addr("admin");
    let refused_before = metric(
        admin,
        "pushgrid_room_refused_total",
        "reason=\"auth_failed\"",
    )
    .await;
    let now = pushgrid_common::now_ms() / 1000;
    let hour = now + 3600;
    let times = |iat: Option<u64>, nbf: Option<u64>| TimeClaims { iat, nbf };
    let year_9999 = 253_402_300_799;
    let month = 30 * 24 * 3600;

    // Refused, each with what was wrong.
    let refusals: Vec<(&str, String, &str, String)> = vec![
        (
            "nbf two minutes ahead",
            token(&cluster, "u1", hour, times(None, Some(now + 120)), ""),
            "d",
            "is not valid before".into(),
        ),
        (
            "iat two minutes ahead",
            token(&cluster, "u1", hour, times(Some(now + 120), None), ""),
            "d",
            "was issued in the future".into(),
        ),
        (
            "exp in the year 9999",
            token(&cluster, "u1", year_9999, times(None, None), ""),
            "d",
            "more than the maximum lifetime of 2592000 s".into(),
        ),
        (
            "a 31-day lifetime from iat",
            token(&cluster, "u1", now + month + 86_400, times(Some(now), None), ""),
            "d",
            format!(
                "the token's lifetime of {} s (exp - iat) exceeds the maximum of 2592000 s",
                month + 86_400
            ),
        ),
        (
            "a token for another device",
            token(&cluster, "u1", hour, times(Some(now), None), "phone-1"),
            "tablet-9",
            "the token is for device \"phone-1\", not \"tablet-9\"".into(),
        ),
        (
            "a user id with a line feed",
            token(&cluster, "u1\nforged: yes", hour, times(Some(now), None), ""),
            "d",
            "the token subject (user) must be printable text: U+000A at byte 2 is a control character"
                .into(),
        ),
        (
            "a device id with NUL",
            token(&cluster, "u1", hour, times(Some(now), None), ""),
            "d\0x",
            "the device id must be printable text: U+0000 at byte 1 is a control character".into(),
        ),
    ];
    for (case, token, device, expected) in &refusals {
        let message = auth(&room, token.clone(), device)
            .await
            .expect_err(&format!("{case} was accepted"));
        assert!(message.contains(expected.as_str()), "{case}: {message}");
    }
    let refused_after = metric(
        admin,
        "pushgrid_room_refused_total",
        "reason=\"auth_failed\"",
    )
    .await;
    assert_eq!(refused_after - refused_before, refusals.len() as f64);
    let log = cluster.rooms[0].log_text();
    assert!(
        log.lines()
            .any(|line| line.contains("device auth refused") && line.contains("peer=127.0.0.1:")),
        "no refusal line with the device's address"
    );

    // Accepted: within the 60 s skew, 30 days exactly, and the token's own
    // device (named, or taken from the claim when the device sends none).
    let accepted = [
        (
            "nbf and iat 30 s ahead",
            token(
                &cluster,
                "u2",
                hour,
                times(Some(now + 30), Some(now + 30)),
                "",
            ),
            "d",
        ),
        (
            "30 days from iat",
            token(&cluster, "u2", now + month, times(Some(now), None), ""),
            "d",
        ),
        (
            "its own device",
            token(&cluster, "u2", hour, times(Some(now), None), "phone-1"),
            "phone-1",
        ),
        (
            "the claim's device",
            token(&cluster, "u2", hour, times(Some(now), None), "phone-1"),
            "",
        ),
    ];
    for (case, token, device) in accepted {
        auth(&room, token, device)
            .await
            .unwrap_or_else(|message| panic!("{case} was refused: {message}"));
    }
    // The claim's device is the session's device.
    let (status, presence) = cluster
        .call(&cluster.app.api_key, "presence", json!({"user": "u2"}))
        .await;
    assert_eq!(status, 200);
    let devices: Vec<&str> = presence["result"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|session| session["device"].as_str().unwrap())
        .collect();
    assert!(
        devices
            .iter()
            .all(|device| ["d", "phone-1"].contains(device)),
        "{devices:?}"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_and_ttls_are_refused_with_the_bounds_and_nothing_is_stored() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let saver_admin = cluster.saver.addr("admin");
    let stored_before = metric(saver_admin, "pushgrid_saver_stored_total", "").await;

    let cases: Vec<(&str, &str, serde_json::Value, &str)> = vec![
        (
            "a user id with NUL",
            "push",
            json!({"users": ["ok", "a\u{0}b"], "payload": "x"}),
            "users[1]: a user id must be printable text: U+0000 at byte 1 is a control character",
        ),
        (
            "a user id with CR",
            "push",
            json!({"users": ["a\rb"], "payload": "x"}),
            "users[0]: a user id must be printable text: U+000D at byte 1 is a control character",
        ),
        (
            "a user id with LF",
            "push",
            json!({"users": ["alice\nbob"], "payload": "x"}),
            "users[0]: a user id must be printable text: U+000A at byte 5 is a control character",
        ),
        (
            "an empty user id",
            "push",
            json!({"users": [""], "payload": "x"}),
            "users[0]: a user id must be 1 to 255 bytes, not 0",
        ),
        (
            "a 256-byte user id",
            "push",
            json!({"users": ["u".repeat(256)], "payload": "x"}),
            "users[0]: a user id must be 1 to 255 bytes, not 256",
        ),
        (
            "ttl 0",
            "push",
            json!({"users": ["ok"], "payload": "x", "ttl_secs": 0}),
            "ttl_secs: must be 1 to 2592000 seconds (30 days), not 0; leave it out for the default",
        ),
        (
            "ttl a second over 30 days",
            "push",
            json!({"users": ["ok"], "payload": "x", "ttl_secs": 2_592_001}),
            "ttl_secs: must be 1 to 2592000 seconds (30 days), not 2592001; leave it out for the default",
        ),
        (
            "ttl of a thousand years",
            "push",
            json!({"users": ["ok"], "payload": "x", "ttl_secs": 31_536_000_000u64}),
            "ttl_secs: must be 1 to 2592000 seconds (30 days), not 31536000000; leave it out for the default",
        ),
        (
            "a group push with ttl 0",
            "push_group",
            json!({"group": "g", "payload": "x", "ttl_secs": 0}),
            "ttl_secs: must be 1 to 2592000 seconds (30 days), not 0; leave it out for the default",
        ),
        (
            "a topic with LF",
            "broadcast",
            json!({"topic": "news\nfake", "payload": "x"}),
            "topic: a topic must be printable text: U+000A at byte 4 is a control character",
        ),
        (
            "a group name with ESC",
            "bind",
            json!({"group": "g\u{1b}[31m", "users": ["ok"]}),
            "group must be printable text: U+001B at byte 1 is a control character",
        ),
        (
            "a bound user with U+2028",
            "bind",
            json!({"group": "g", "users": ["a\u{2028}b"]}),
            "users[0]: a user id must be printable text: U+2028 at byte 1 is a control character",
        ),
        (
            "a kicked device with CR",
            "kick",
            json!({"user": "ok", "device": "d\r"}),
            "device: a device id must be printable text: U+000D at byte 1 is a control character",
        ),
        (
            "presence of a user with DEL",
            "presence",
            json!({"user": "a\u{7f}"}),
            "user: a user id must be printable text: U+007F at byte 1 is a control character",
        ),
    ];
    for (case, method, body, expected) in &cases {
        let (status, answer) = cluster.call(&key, method, body.clone()).await;
        assert_eq!(status, 400, "{case}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_request", "{case}");
        assert_eq!(answer["error"]["message"], *expected, "{case}");
    }
    // Refusals are logged with the caller's address.
    let log = cluster.center.log_text();
    assert!(
        log.lines().any(|line| line.contains("api call refused")
            && line.contains("peer=127.0.0.1:")
            && line.contains("status=400")),
        "no refusal line with the caller's address"
    );
    // Nothing was stored; a valid push with an explicit TTL still is.
    assert_eq!(
        metric(saver_admin, "pushgrid_saver_stored_total", "").await,
        stored_before
    );
    let (status, answer) = cluster
        .call(
            &key,
            "push",
            json!({"users": ["Zoë 🚀"], "payload": "x", "ttl_secs": 2_592_000}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (mut device, _) = cluster.device_at(0, "Zoë 🚀", "phone").await.unwrap();
    let push = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(
        push.msg_id.to_string(),
        answer["result"]["messages"][0]["id"].as_str().unwrap()
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_reused_with_another_body_is_409_and_the_first_push_stands() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let saver_admin = cluster.saver.addr("admin");
    let idempotency_key = format!("order-{:08x}", rand::random::<u32>());
    let first = json!({
        "users": ["ida", "ivo"], "payload": "first", "ttl_secs": 3600,
        "idempotency_key": idempotency_key,
    });
    let (status, answer) = cluster.call(&key, "push", first.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let first_ids = answer["result"]["messages"].clone();
    let stored_after_first = metric(saver_admin, "pushgrid_saver_stored_total", "").await;

    let mut other_users = first.clone();
    other_users["users"] = json!(["ida", "mallory"]);
    let mut other_payload = first.clone();
    other_payload["payload"] = json!("second");
    let mut other_ttl = first.clone();
    other_ttl["ttl_secs"] = json!(60);
    let mut default_ttl = first.clone();
    default_ttl.as_object_mut().unwrap().remove("ttl_secs");
    for (case, body, field) in [
        ("other users", other_users, "users"),
        ("another payload", other_payload, "payload"),
        ("another ttl", other_ttl, "ttl_secs"),
        ("the default ttl", default_ttl, "ttl_secs"),
    ] {
        let (status, answer) = cluster.call(&key, "push", body).await;
        assert_eq!(status, 409, "{case}: {answer}");
        assert_eq!(answer["error"]["code"], "conflict", "{case}");
        assert_eq!(
            answer["error"]["message"],
            format!(
                "idempotency key {idempotency_key:?} was used within 24 h for a push with other \
                 {field}; nothing was stored and the first push's messages are unchanged: use a \
                 new key for a new push"
            ),
            "{case}"
        );
    }
    // The same body again: the first answer, replayed.
    let (status, answer) = cluster.call(&key, "push", first).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["replayed"], true);
    assert_eq!(answer["result"]["messages"], first_ids);
    assert_eq!(
        metric(saver_admin, "pushgrid_saver_stored_total", "").await,
        stored_after_first,
        "nothing stored by the conflicts or the replay"
    );
    assert_eq!(
        metric(
            saver_admin,
            "pushgrid_saver_idempotency_conflicts_total",
            ""
        )
        .await,
        4.0
    );
    // The first push's messages are what devices get; mallory gets nothing.
    let (mut ida, _) = cluster.device_at(0, "ida", "phone").await.unwrap();
    let push = next_push(&mut ida, WAIT).await.unwrap();
    assert_eq!(&push.payload[..], b"first");
    assert_eq!(
        push.msg_id.to_string(),
        first_ids[0]["id"].as_str().unwrap()
    );
    let (mut mallory, _) = cluster.device_at(0, "mallory", "phone").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), mallory.next_frame())
            .await
            .is_err(),
        "mallory got a message"
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_sees_only_its_own_app_in_stats_and_info() {
    let cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let key_a = cluster.app.api_key.clone();
    // App B, added at run time, with one device; app A has three on two rooms.
    let app_b = format!("{}b", cluster.app.id);
    let (key_b, secret_b) = (format!("{key_a}-b"), format!("{}-b", cluster.app.secret));
    let (status, body) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{app_b}"),
            Some(json!({"jwt_secret": secret_b, "api_key": key_b})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut devices = Vec::new();
    for (room, user) in [(0, "a1"), (1, "a1"), (1, "a2")] {
        devices.push(
            cluster
                .device_at(room, user, &format!("p{room}"))
                .await
                .unwrap()
                .0,
        );
    }
    let room = cluster.room_addr(0);
    let token_b = pushgrid_e2e::token(&app_b, "b1", &secret_b, 3600);
    // The room knows app B once keeper's change reached it.
    let auth_b = msg::Auth {
        token: token_b,
        device_id: "b".into(),
        platform: "t".into(),
    };
    let device_b = wait_for(WAIT, || async {
        let (connection, _) = Connection::connect(&room, auth_b.clone()).await.ok()?;
        Some(connection)
    })
    .await;
    let connected = device_b.is_some();
    assert!(connected, "app B's device never connected");

    // stats: each key sees its own app's counts, nothing of the cluster.
    let settled = eventually(WAIT, || async {
        let (_, a) = cluster.call(&key_a, "stats", json!({})).await;
        let (_, b) = cluster.call(&key_b, "stats", json!({})).await;
        a["result"] == json!({"app": cluster.app.id, "connections": 3, "users": 2})
            && b["result"] == json!({"app": app_b, "connections": 1, "users": 1})
    })
    .await;
    let (_, a) = cluster.call(&key_a, "stats", json!({})).await;
    let (_, b) = cluster.call(&key_b, "stats", json!({})).await;
    assert!(settled, "stats: A {a}, B {b}");

    // info: ids and roles, no address, load or label.
    for key in [&key_a, &key_b] {
        let (status, info) = cluster.call(key, "info", json!({})).await;
        assert_eq!(status, 200);
        let text = info.to_string();
        assert!(!text.contains("127.0.0.1"), "an address in {text}");
        for node in info["result"]["nodes"].as_array().unwrap() {
            let fields: Vec<&String> = node.as_object().unwrap().keys().collect();
            assert_eq!(fields, ["id", "role", "started_ms"], "{node}");
        }
    }

    // The admin token sees the cluster: every connection, each room, the
    // queue, every address.
    let (status, stats) = cluster.call_admin("stats", json!({})).await;
    assert_eq!(status, 200, "{stats}");
    let all_counted = eventually(WAIT, || async {
        let (_, stats) = cluster.call_admin("stats", json!({})).await;
        stats["result"]["connections"] == 4
    })
    .await;
    assert!(all_counted, "{stats}");
    assert_eq!(stats["result"]["rooms"].as_array().unwrap().len(), 2);
    assert!(stats["result"]["route_queue"]["capacity"].as_u64().unwrap() > 0);
    let (status, info) = cluster.call_admin("info", json!({})).await;
    assert_eq!(status, 200);
    assert!(
        info["result"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|node| node["admin"].as_str().unwrap().starts_with("127.0.0.1:"))
    );

    // The admin token opens nothing else; a wrong one opens nothing.
    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"users": ["a1"], "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        answer["error"]["message"],
        "this method needs an app's API key (Authorization: apikey <key>); the admin token reads only stats and info"
    );
    let response = cluster
        .http
        .post(format!("{}/api/stats", cluster.center_url()))
        .bearer_auth("not-the-token")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        answer["error"]["message"],
        "wrong admin token (Authorization: Bearer <admin token>; apps use: apikey <key>)"
    );
    drop(devices);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_admin_token_on_every_port() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let http = &cluster.http;
    let procs = [
        &cluster.keeper,
        &cluster.register,
        &cluster.saver,
        &cluster.coordinator,
        &cluster.center,
        &cluster.dispatcher,
        &cluster.rooms[0],
    ];
    for proc in procs {
        let admin = proc.addr("admin");
        let before = metric(admin, "pushgrid_admin_refused_total", "endpoint=\"debug\"").await;
        for (method, path) in [
            (Method::GET, "/debug/log-level"),
            (Method::PUT, "/debug/log-level"),
            (Method::GET, "/debug/pprof/profile?seconds=1"),
        ] {
            for token in [None, Some("wrong")] {
                let mut request = http.request(method.clone(), format!("http://{admin}{path}"));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let response = request.body("trace").send().await.unwrap();
                assert_eq!(response.status(), 401, "{} {method} {path}", proc.name);
                assert_eq!(
                    response.text().await.unwrap(),
                    "missing or wrong admin token (Authorization: Bearer <admin token>)\n"
                );
            }
        }
        let response = http
            .get(format!("http://{admin}/debug/log-level"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", proc.name);
        let after = metric(admin, "pushgrid_admin_refused_total", "endpoint=\"debug\"").await;
        assert!(after - before >= 6.0, "{}: refusals not counted", proc.name);
        assert!(
            proc.log_text().contains("admin request refused"),
            "{}: no log line",
            proc.name
        );
        // /metrics and /healthz stay open and hold no secret.
        let text = metrics_text(admin).await;
        for secret in [
            ADMIN_TOKEN,
            &cluster.app.secret,
            &cluster.app.api_key,
            "pgk1.",
        ] {
            assert!(
                !text.contains(secret),
                "{}: /metrics holds a secret",
                proc.name
            );
        }
    }

    // A room's drain needs it too (nothing drained: the room still serves).
    let room_admin = cluster.rooms[0].addr("admin");
    for token in [None, Some("wrong")] {
        let mut request = http.post(format!("http://{room_admin}/admin/drain"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            answer["error"]["message"],
            "missing or wrong admin token (Authorization: Bearer <admin token>)"
        );
    }
    let (mut device, _) = cluster
        .device_at(0, "after-drain-attempts", "phone")
        .await
        .unwrap();
    let ids = cluster
        .push(&["after-drain-attempts"], "still here")
        .await
        .unwrap();
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, ids[0]);

    // keeper's admin API works with the token, and logs a refusal with the
    // caller's address.
    let (status, config) = cluster.admin(Method::GET, "/admin/config", None).await;
    assert_eq!(status, 200, "{config}");
    let response = http
        .get(format!(
            "http://{}/admin/config",
            cluster.keeper.addr("http")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let logged = eventually(WAIT, || async {
        cluster.keeper.log_text().lines().any(|line| {
            line.contains("admin request refused")
                && line.contains("path=/admin/config")
                && line.contains("peer=127.0.0.1:")
        })
    })
    .await;
    assert!(logged, "keeper did not log the refused admin request");

    // A node with no admin token anywhere: /debug/, the drain and the
    // dashboard are off (403 / 404), never open.
    let bare = cluster.dir.join("credentials-without-admin-token");
    std::fs::create_dir_all(&bare).unwrap();
    for entry in std::fs::read_dir(&cluster.credentials).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "admin-token" {
            std::fs::copy(entry.path(), bare.join(entry.file_name())).unwrap();
        }
    }
    let mut args = cluster.node_args();
    for setting in [
        format!("credentials_dir={}", bare.display()),
        "http_listen=127.0.0.1:0".to_string(),
    ] {
        args.push("--set".into());
        args.push(setting);
    }
    let center = spawn(&cluster.dir, "center-without-token", "center", &args)
        .await
        .unwrap();
    let admin = center.addr("admin");
    let response = http
        .get(format!("http://{admin}/debug/log-level"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .starts_with("/debug/ is off: no admin token is configured")
    );
    let response = http
        .get(format!("http://{}/dashboard/data", center.addr("http")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    drop(center);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_credentials_refuses_to_start_and_says_what_to_set() {
    let dir = pushgrid_e2e::temp_dir("pushgrid-nocreds");
    for role in [
        "keeper",
        "register",
        "saver",
        "coordinator",
        "center",
        "dispatcher",
        "room",
    ] {
        let mut settings = vec![
            "keeper=127.0.0.1:1".to_string(),
            "listen=127.0.0.1:0".into(),
            "admin_listen=127.0.0.1:0".into(),
        ];
        match role {
            "keeper" => settings.extend([
                "http_listen=127.0.0.1:0".to_string(),
                format!("database_url=sqlite://{}/keeper.db", dir.display()),
            ]),
            "saver" => settings.push(format!("database_url=sqlite://{}/saver.db", dir.display())),
            "center" | "dispatcher" => settings.push("http_listen=127.0.0.1:0".into()),
            "room" => settings.push("tcp_listen=127.0.0.1:0".into()),
            _ => {}
        }
        let output = tokio::process::Command::new(pushgrid_e2e::binary(role))
            .args(
                settings
                    .iter()
                    .flat_map(|setting| ["--set", setting.as_str()]),
            )
            .env_remove("PUSHGRID_ADMIN_TOKEN")
            .output();
        let output = tokio::time::timeout(WAIT, output)
            .await
            .unwrap_or_else(|_| panic!("{role} kept running without credentials"))
            .unwrap();
        assert!(
            !output.status.success(),
            "{role} started without credentials"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        let variable = format!("PUSHGRID_{}__CREDENTIALS_DIR", role.to_uppercase());
        assert!(
            stderr.contains("no cluster credentials: set credentials_dir")
                && stderr.contains(&variable)
                && stderr.contains("pushgrid credentials init DIR"),
            "{role}: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
