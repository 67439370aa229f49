//! Security refusals, each checked for a clear error and a metric: forged,
//! expired and foreign device tokens, an API key reaching into another app,
//! admin endpoints without the admin token, oversize frames before AUTH.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use base64::Engine;
use bytes::{BufMut, BytesMut};
use pushgrid_client::{Connection, Op, msg};
use pushgrid_e2e::{
    ADMIN_TOKEN, ClusterOptions, TestCluster, eventually, frames_until_close, metric, next_frame,
    next_push, only_error, spawn,
};
use reqwest::Method;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// Sends AUTH with `token` on a fresh connection; returns the refusal.
async fn refused_auth(room: &str, token: String) -> msg::Error {
    let mut device = Connection::open(room).await.unwrap();
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
    only_error(&frames_until_close(&mut device).await)
}

fn b64(json: &serde_json::Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json.to_string())
}

/// A token with the given header, valid claims and the given signature part.
fn forged(header: serde_json::Value, app: &str, user: &str, signature: &str) -> String {
    let exp = pushgrid_common::now_ms() / 1000 + 3600;
    let claims = json!({ "sub": user, "app": app, "exp": exp });
    format!("{}.{}.{signature}", b64(&header), b64(&claims))
}

/// Adds a second app through keeper's admin API and waits until a device of
/// it can log in (every node has the new config).
async fn add_app(cluster: &TestCluster, id: &str, secret: &str, api_key: &str) {
    let (status, body) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{id}"),
            Some(json!({ "jwt_secret": secret, "api_key": api_key })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let room = cluster.room_addr(0);
    let token = pushgrid_e2e::token(id, "probe", secret, 3600);
    let seen = eventually(WAIT, || {
        let (room, token) = (room.clone(), token.clone());
        async move {
            let auth = msg::Auth {
                token,
                device_id: "probe".into(),
                platform: "t".into(),
            };
            Connection::connect(&room, auth).await.is_ok()
        }
    })
    .await;
    assert!(seen, "app {id} never reached the room");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_foreign_tokens_are_refused_and_counted() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let app = cluster.app.clone();
    let other_id = format!("{}b", app.id);
    let other_secret = format!("{}-b", app.secret);
    add_app(
        &cluster,
        &other_id,
        &other_secret,
        &format!("{}-b", app.api_key),
    )
    .await;
    let admin = cluster.rooms[0].addr("admin");
    let failed_before = metric(
        admin,
        "pushgrid_room_refused_total",
        "reason=\"auth_failed\"",
    )
    .await;

    let valid = app.token("mallory");
    let signature = valid.rsplit('.').next().unwrap().to_string();
    let cases: Vec<(&str, String, &[&str])> = vec![
        (
            "alg none, no signature",
            forged(json!({"alg": "none", "typ": "JWT"}), &app.id, "mallory", ""),
            &["none", "alg", "malformed"],
        ),
        (
            "alg none with a copied signature",
            forged(
                json!({"alg": "none", "typ": "JWT"}),
                &app.id,
                "mallory",
                &signature,
            ),
            &["none", "alg", "malformed"],
        ),
        (
            "alg NONE",
            forged(json!({"alg": "NONE"}), &app.id, "mallory", ""),
            &["NONE", "alg", "malformed"],
        ),
        (
            "alg HS512 with a copied HS256 signature",
            forged(
                json!({"alg": "HS512", "typ": "JWT"}),
                &app.id,
                "mallory",
                &signature,
            ),
            &["lgorithm", "ignature"],
        ),
        (
            "expired an hour ago",
            pushgrid_e2e::token(&app.id, "mallory", &app.secret, -3600),
            &["xpired"],
        ),
        (
            "claims app A, signed with app B's secret",
            pushgrid_e2e::token(&app.id, "mallory", &other_secret, 3600),
            &["ignature"],
        ),
        (
            "claims app B, signed with app A's secret",
            pushgrid_e2e::token(&other_id, "mallory", &app.secret, 3600),
            &["ignature"],
        ),
        (
            "valid signature, payload swapped to another user",
            {
                let parts: Vec<&str> = valid.split('.').collect();
                let other = app.token("victim");
                format!(
                    "{}.{}.{}",
                    parts[0],
                    other.split('.').nth(1).unwrap(),
                    parts[2]
                )
            },
            &["ignature"],
        ),
    ];
    for (case, token, words) in &cases {
        let error = refused_auth(&room, token.clone()).await;
        assert_eq!(
            error.code(),
            msg::ErrorCode::AuthFailed,
            "{case}: {error:?}"
        );
        assert!(
            words.iter().any(|word| error.message.contains(word)),
            "{case}: the message {:?} does not say why (expected one of {words:?})",
            error.message
        );
        println!("{case}: {}", error.message);
    }
    let failed_after = metric(
        admin,
        "pushgrid_room_refused_total",
        "reason=\"auth_failed\"",
    )
    .await;
    assert_eq!(
        failed_after - failed_before,
        cases.len() as f64,
        "every refused token counted"
    );

    // The genuine tokens of both apps still work.
    assert!(
        Connection::connect(
            &room,
            msg::Auth {
                token: valid,
                ..Default::default()
            }
        )
        .await
        .is_ok()
    );
    let other_token = pushgrid_e2e::token(&other_id, "mallory", &other_secret, 3600);
    assert!(
        Connection::connect(
            &room,
            msg::Auth {
                token: other_token,
                ..Default::default()
            }
        )
        .await
        .is_ok()
    );
    cluster.cleanup().await;
}

async fn api(
    cluster: &TestCluster,
    method: &str,
    key: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = cluster
        .http
        .post(format!("{}/api/{method}", cluster.center_url()))
        .header("Authorization", format!("apikey {key}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_reaches_only_the_users_of_its_own_app() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let app_a = cluster.app.clone();
    let (b_id, b_secret, b_key) = (
        format!("{}b", app_a.id),
        format!("{}-b", app_a.secret),
        format!("{}-b", app_a.api_key),
    );
    add_app(&cluster, &b_id, &b_secret, &b_key).await;
    let room = cluster.room_addr(0);
    let center_admin = cluster.center.addr("admin");

    // The same user name in both apps, both online.
    let connect = |app: &str, secret: &str| {
        let auth = msg::Auth {
            token: pushgrid_e2e::token(app, "shared", secret, 3600),
            device_id: format!("{app}-phone"),
            platform: "ios".into(),
        };
        let room = room.clone();
        async move { Connection::connect(&room, auth).await.unwrap().0 }
    };
    let mut device_a = connect(&app_a.id, &app_a.secret).await;
    let mut device_b = connect(&b_id, &b_secret).await;

    // A's key pushes to A's "shared", never to B's.
    let (status, body) = api(
        &cluster,
        "push",
        &app_a.api_key,
        json!({"users": ["shared"], "payload": "for A"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let push = next_push(&mut device_a, WAIT).await.unwrap();
    assert_eq!(&push.payload[..], b"for A");
    assert!(
        next_frame(&mut device_b, Duration::from_millis(800))
            .await
            .is_err(),
        "app B's device received app A's push"
    );

    // Naming the other app in the body is refused, not honoured.
    let bad_before = metric(
        center_admin,
        "pushgrid_center_api_errors_total",
        "code=\"bad_request\"",
    )
    .await;
    for field in ["app", "app_id"] {
        let (status, body) = api(
            &cluster,
            "push",
            &app_a.api_key,
            json!({"users": ["shared"], "payload": "into B", field: b_id}),
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(field),
            "{body}"
        );
    }
    assert_eq!(
        metric(
            center_admin,
            "pushgrid_center_api_errors_total",
            "code=\"bad_request\""
        )
        .await
            - bad_before,
        2.0
    );
    // A's key cannot see or kick B's sessions: only A's own "shared" is visible.
    let (status, body) = api(
        &cluster,
        "presence",
        &app_a.api_key,
        json!({"user": "shared"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let sessions = body["result"]["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1, "{body}");
    assert_eq!(sessions[0]["device"], format!("{}-phone", app_a.id));
    let (status, body) = api(
        &cluster,
        "presence",
        &app_a.api_key,
        json!({"user": "probe"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["result"]["sessions"].as_array().map_or(0, Vec::len),
        0,
        "B's probe user seen through A's key: {body}"
    );

    // A broadcast with A's key reaches A's subscribers only.
    for device in [&mut device_a, &mut device_b] {
        device
            .send_frame(
                Op::Sub,
                3,
                &msg::Sub {
                    topic: "news".into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        loop {
            let frame = next_frame(device, WAIT).await.unwrap().unwrap();
            if frame.op == Op::SubOk {
                break;
            }
        }
    }
    let (status, body) = api(
        &cluster,
        "broadcast",
        &app_a.api_key,
        json!({"topic": "news", "payload": "A news"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        &next_push(&mut device_a, WAIT).await.unwrap().payload[..],
        b"A news"
    );
    assert!(
        next_frame(&mut device_b, Duration::from_millis(800))
            .await
            .is_err(),
        "B got A's broadcast"
    );

    // Kick with A's key leaves B's device connected.
    let (status, body) = api(&cluster, "kick", &app_a.api_key, json!({"user": "shared"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["kicked"], 1, "{body}");
    let kicked = next_frame(&mut device_a, WAIT).await.unwrap().unwrap();
    assert_eq!(kicked.op, Op::Kick);
    device_b.send_empty(Op::Ping, 9).await.unwrap();
    let pong = next_frame(&mut device_b, WAIT).await.unwrap().unwrap();
    assert_eq!(
        (pong.op, pong.seq),
        (Op::Pong, 9),
        "B's device was kicked by A's key"
    );

    // An unknown or mangled key is 401 and counted.
    let unauthorized_before = metric(
        center_admin,
        "pushgrid_center_api_errors_total",
        "code=\"unauthorized\"",
    )
    .await;
    for key in [
        format!("{}x", app_a.api_key),
        app_a.api_key[..app_a.api_key.len() - 1].to_string(),
        " ".into(),
    ] {
        let (status, body) = api(
            &cluster,
            "push",
            &key,
            json!({"users": ["shared"], "payload": "x"}),
        )
        .await;
        assert_eq!(status, 401, "{key:?}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    let response = cluster
        .http
        .post(format!("{}/api/push", cluster.center_url()))
        .header("Authorization", format!("Bearer {}", app_a.api_key))
        .json(&json!({"users": ["shared"], "payload": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401, "the wrong scheme");
    assert_eq!(
        metric(
            center_admin,
            "pushgrid_center_api_errors_total",
            "code=\"unauthorized\""
        )
        .await
            - unauthorized_before,
        4.0
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_refuse_requests_without_the_admin_token() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let keeper_admin = cluster.keeper.addr("admin");
    let base = format!("http://{}", cluster.keeper.addr("http"));
    let refused_before = metric(keeper_admin, "pushgrid_keeper_admin_refused_total", "").await;

    let endpoints: [(Method, &str, Option<serde_json::Value>); 8] = [
        (Method::GET, "/admin/config", None),
        (
            Method::PUT,
            "/admin/apps/intruder",
            Some(json!({"jwt_secret": "s", "api_key": "k"})),
        ),
        (
            Method::DELETE,
            &format!("/admin/apps/{}", cluster.app.id),
            None,
        ),
        (
            Method::POST,
            &format!("/admin/apps/{}/rotate-secret", cluster.app.id),
            Some(json!({"jwt_secret": "mine"})),
        ),
        (
            Method::PUT,
            "/admin/settings/dispatcher.balancer",
            Some(json!({"value": "random"})),
        ),
        (Method::DELETE, "/admin/settings/dispatcher.balancer", None),
        (
            Method::PUT,
            "/admin/routes",
            Some(json!({"app": cluster.app.id, "product": "p", "url": "http://evil"})),
        ),
        (
            Method::DELETE,
            &format!("/admin/routes?app={}&product=p&type=", cluster.app.id),
            None,
        ),
    ];
    let credentials: [(&str, Option<String>); 6] = [
        ("no header", None),
        ("empty bearer", Some("Bearer ".into())),
        ("wrong token", Some("Bearer not-the-token".into())),
        (
            "a prefix of the token",
            Some(format!("Bearer {}", &ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1])),
        ),
        (
            "the token plus a byte",
            Some(format!("Bearer {ADMIN_TOKEN}x")),
        ),
        (
            "the right token, Basic scheme",
            Some(format!("Basic {ADMIN_TOKEN}")),
        ),
    ];
    let mut refused = 0;
    for (method, path, body) in &endpoints {
        for (case, authorization) in &credentials {
            let mut request = cluster
                .http
                .request(method.clone(), format!("{base}{path}"));
            if let Some(authorization) = authorization {
                request = request.header("Authorization", authorization);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let answer: serde_json::Value = response.json().await.unwrap_or_default();
            assert_eq!(status, 401, "{method} {path} with {case}: {answer}");
            assert_eq!(
                answer["error"]["code"], "unauthorized",
                "{method} {path} with {case}"
            );
            assert!(
                answer["error"]["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("admin token"),
                "{method} {path} with {case}: {answer}"
            );
            refused += 1;
        }
    }
    let refused_after = metric(keeper_admin, "pushgrid_keeper_admin_refused_total", "").await;
    assert_eq!(
        refused_after - refused_before,
        f64::from(refused),
        "every refusal counted"
    );

    // Nothing changed: the intruder app does not exist, the test app still works.
    let (status, config) = cluster.admin(Method::GET, "/admin/config", None).await;
    assert_eq!(status, 200);
    assert!(!config.to_string().contains("intruder"), "{config}");
    assert!(!config.to_string().contains("http://evil"), "{config}");
    let (mut device, _) = cluster.device("still-mine").await.unwrap();
    let ids = cluster.push(&["still-mine"], "unchanged").await.unwrap();
    assert_eq!(next_push(&mut device, WAIT).await.unwrap().msg_id, ids[0]);

    // center's dashboard: the cluster's center has the credentials' admin
    // token and refuses a request without it (off without any token:
    // trust.rs); a center with a token of its own refuses requests that lack it.
    let response = cluster
        .http
        .get(format!("{}/dashboard/data", cluster.center_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let mut args = cluster.node_args();
    for setting in [
        "http_listen=127.0.0.1:0".to_string(),
        format!("admin_token={ADMIN_TOKEN}"),
    ] {
        args.push("--set".into());
        args.push(setting);
    }
    let center = spawn(&cluster.dir, "center-with-dashboard", "center", &args)
        .await
        .unwrap();
    let dashboard = format!("http://{}/dashboard/data", center.addr("http"));
    for (case, authorization, query) in [
        ("no token", None, ""),
        ("wrong bearer", Some("Bearer nope"), ""),
        ("wrong query token", None, "?token=nope"),
    ] {
        let mut request = cluster.http.get(format!("{dashboard}{query}"));
        if let Some(authorization) = authorization {
            request = request.header("Authorization", authorization);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "dashboard with {case}");
        let text = response.text().await.unwrap();
        assert!(text.contains("token"), "dashboard with {case}: {text}");
    }
    let response = cluster
        .http
        .get(&dashboard)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    drop(center);
    cluster.cleanup().await;
}

fn raw_header(body_len: u32, op: Op) -> BytesMut {
    let mut header = BytesMut::new();
    header.put_u32(body_len);
    header.put_u8(1);
    header.put_u8(op as u8);
    header.put_u16(0);
    header.put_u32(5);
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frames_are_refused_on_the_header_before_and_after_auth() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let room = cluster.room_addr(0);
    let admin = cluster.rooms[0].addr("admin");
    let bad_frame_before =
        metric(admin, "pushgrid_room_refused_total", "reason=\"bad_frame\"").await;

    // Before AUTH the limit is 1 KiB: one byte over is refused on the header
    // alone (no body sent), for AUTH and for any other op, and the message
    // gives both numbers.
    for op in [Op::Auth, Op::Ping, Op::Sub] {
        for claimed in [1025u32, 65_536, u32::MAX] {
            let mut device = Connection::open(&room).await.unwrap();
            device.send_raw(&raw_header(claimed, op)).await.unwrap();
            let error = only_error(&frames_until_close(&mut device).await);
            assert_eq!(
                error.code(),
                msg::ErrorCode::FrameTooLarge,
                "{op:?} {claimed}"
            );
            assert!(
                error.message.contains(&claimed.to_string()) && error.message.contains("1024"),
                "{}",
                error.message
            );
        }
    }
    let refused = metric(admin, "pushgrid_room_refused_total", "reason=\"bad_frame\"").await
        - bad_frame_before;
    assert_eq!(refused, 9.0, "every oversize frame before AUTH counted");

    // Exactly at the limit is read (and here refused for its content, not its size).
    let mut device = Connection::open(&room).await.unwrap();
    let mut frame = raw_header(1024, Op::Auth);
    frame.put_slice(&[0xff; 1024]);
    device.send_raw(&frame).await.unwrap();
    assert_eq!(
        only_error(&frames_until_close(&mut device).await).code(),
        msg::ErrorCode::BadBody
    );

    // A header that promises a body that never comes ends at the AUTH deadline
    // (2 s in tests), with AUTH_TIMEOUT, not a buffer held forever.
    let timeouts_before = metric(
        admin,
        "pushgrid_room_refused_total",
        "reason=\"auth_timeout\"",
    )
    .await;
    let mut device = Connection::open(&room).await.unwrap();
    device.send_raw(&raw_header(1000, Op::Auth)).await.unwrap();
    device.send_raw(&[0x0a; 10]).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(
        only_error(&frames_until_close(&mut device).await).code(),
        msg::ErrorCode::AuthTimeout
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        metric(
            admin,
            "pushgrid_room_refused_total",
            "reason=\"auth_timeout\""
        )
        .await
            - timeouts_before,
        1.0
    );

    // After AUTH the limit is 64 KiB: a PING carrying exactly 64 KiB is read
    // (and answered), one byte more is refused with a close and counted.
    let errors_before = metric(admin, "pushgrid_room_frame_errors_total", "").await;
    let (mut device, _) = cluster.device("big").await.unwrap();
    let mut frame = raw_header(65_536, Op::Ping);
    frame.put_slice(&vec![0u8; 65_536]);
    device.send_raw(&frame).await.unwrap();
    let pong = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!((pong.op, pong.seq), (Op::Pong, 5));
    device
        .send_raw(&raw_header(65_537, Op::Ping))
        .await
        .unwrap();
    let error = only_error(&frames_until_close(&mut device).await);
    assert_eq!(error.code(), msg::ErrorCode::FrameTooLarge);
    assert!(
        error.message.contains("65537") && error.message.contains("65536"),
        "{}",
        error.message
    );
    assert_eq!(
        metric(admin, "pushgrid_room_frame_errors_total", "").await - errors_before,
        1.0
    );
    cluster.cleanup().await;
}
