//! Notification fallback end to end (issue 25): a real cluster whose center
//! sends through an HTTP/2 TLS stand-in of APNs and FCM (it checks each
//! request's path, headers and bearer token as the providers document).
//! An offline user's devices get exactly one notification per token; an
//! online user's none under the `offline` policy and one under `always`;
//! under `unacked_after` a device that did not ACK in time gets one and one
//! that did gets none; a token the provider calls dead is removed; the
//! message reaches the inbox whatever happens to the notification.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Op, msg};
use pushgrid_e2e::provider::{Reply, Request, StandIn};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, metric, next_push};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const APNS_KEY: &str = include_str!("../../crates/notify/testdata/apns-test-key.p8");
const FCM_KEY: &str = include_str!("../../crates/notify/testdata/fcm-test-key.pem");

fn apns_token(tag: &str) -> String {
    format!("{tag}{}", "0".repeat(64 - tag.len()))
}

/// APNs and FCM in one stand-in. APNs: the documented headers and a bearer
/// token, `dead…` tokens unregistered (410). FCM: the token exchange and
/// the v1 send with its access token.
fn provider(request: &Request) -> Reply {
    if request.path == "/token" {
        return Reply::json(
            200,
            json!({ "access_token": "ya29.e2e", "expires_in": 3599, "token_type": "Bearer" }),
        );
    }
    if let Some(token) = request.path.strip_prefix("/3/device/") {
        let well_formed = request.header("apns-topic") == "com.example.app"
            && request.header("apns-push-type") == "alert"
            && request.header("authorization").starts_with("bearer ey");
        if !well_formed {
            return Reply::json(400, json!({ "reason": "BadRequest" }));
        }
        if token.starts_with("dead") {
            return Reply::json(410, json!({ "reason": "Unregistered", "timestamp": 1 }));
        }
        return Reply::empty(200);
    }
    if request.path == "/v1/projects/e2e-project/messages:send"
        && request.header("authorization") == "Bearer ya29.e2e"
    {
        return Reply::json(200, json!({ "name": "projects/e2e-project/messages/1" }));
    }
    Reply::json(
        404,
        json!({ "error": { "code": 404, "status": "NOT_FOUND" } }),
    )
}

/// Requests that carried `token` (APNs: in the path; FCM: in the message).
fn requests_for(stand_in: &StandIn, token: &str) -> Vec<Request> {
    stand_in
        .requests()
        .into_iter()
        .filter(|request| {
            request.path.ends_with(token) || request.json()["message"]["token"] == token
        })
        .collect()
}

async fn ok(cluster: &TestCluster, method: &str, body: Value) -> Value {
    let (status, answer) = cluster.call(&cluster.app.api_key, method, body).await;
    assert_eq!(status, 200, "{method}: {answer}");
    answer["result"].clone()
}

async fn register(cluster: &TestCluster, user: &str, provider: &str, token: &str) {
    ok(
        cluster,
        "register_token",
        json!({ "user": user, "provider": provider, "token": token, "bundle": "com.example.app" }),
    )
    .await;
}

async fn push(cluster: &TestCluster, user: &str, notification: Value) -> Value {
    ok(
        cluster,
        "push",
        json!({ "users": [user], "payload": "hello", "notification": notification }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_users_get_one_notification_per_token_and_online_users_none() {
    let stand_in = StandIn::start(provider).await;
    let dir = pushgrid_e2e::temp_dir("notify-ca");
    let ca_file = dir.join("stand-in-ca.pem");
    std::fs::write(&ca_file, &stand_in.ca_pem).unwrap();
    let options = ClusterOptions {
        center_sets: vec![format!("notify_ca_file={}", ca_file.display())],
        ..ClusterOptions::default()
    };
    let cluster = TestCluster::start(options).await.unwrap();
    let app = cluster.app.id.clone();
    for (provider, fields) in [
        (
            "apns",
            json!({ "key_id": "ABC123DEFG", "team_id": "DEF123GHIJ", "private_key": APNS_KEY, "topic": "com.example.app", "base_url": stand_in.base_url() }),
        ),
        (
            "fcm",
            json!({ "project_id": "e2e-project", "client_email": "sa@e2e.iam.gserviceaccount.com", "private_key": FCM_KEY,
                        "base_url": stand_in.base_url(), "token_url": format!("{}/token", stand_in.base_url()) }),
        ),
    ] {
        let (status, body) = cluster
            .admin(
                Method::PUT,
                &format!("/admin/apps/{app}/notify/{provider}"),
                Some(fields),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let notification =
        json!({ "title": "Hello", "body": "You have a message", "collapse_id": "chat" });

    // Until center has the credentials (keeper publishes them through the
    // watch stream), a warm-up user is pushed to again.
    let (warm_apns, warm_fcm) = (apns_token("a0"), "warm-fcm-token".to_string());
    register(&cluster, "warm", "apns", &warm_apns).await;
    register(&cluster, "warm", "fcm", &warm_fcm).await;
    let warmed = eventually(WAIT, || async {
        push(&cluster, "warm", notification.clone()).await;
        !requests_for(&stand_in, &warm_apns).is_empty()
            && !requests_for(&stand_in, &warm_fcm).is_empty()
    })
    .await;
    assert!(
        warmed,
        "center never notified through the stand-in: {:?}",
        stand_in.requests()
    );

    // Offline, two devices: one notification for each token.
    let (olga_apns, olga_fcm) = (apns_token("01"), "olga-fcm-token".to_string());
    register(&cluster, "olga", "apns", &olga_apns).await;
    register(&cluster, "olga", "fcm", &olga_fcm).await;
    push(&cluster, "olga", notification.clone()).await;
    let both = eventually(WAIT, || async {
        requests_for(&stand_in, &olga_apns).len() == 1
            && requests_for(&stand_in, &olga_fcm).len() == 1
    })
    .await;
    assert!(both, "olga's tokens: {:?}", stand_in.requests());
    let sent = &requests_for(&stand_in, &olga_apns)[0];
    assert_eq!(sent.header("apns-collapse-id"), "chat");
    assert_eq!(sent.json()["aps"]["alert"]["title"], "Hello");
    // Her message waits in the inbox all the same.
    let (mut device, _) = cluster.device("olga").await.unwrap();
    let delivered = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(delivered.payload.as_ref(), b"hello");

    // Online (a live connection): no notification under `offline`...
    let omar_apns = apns_token("02");
    register(&cluster, "omar", "apns", &omar_apns).await;
    let (mut omar, _) = cluster.device("omar").await.unwrap();
    push(&cluster, "omar", notification.clone()).await;
    next_push(&mut omar, WAIT).await.unwrap();
    // ...and one under `always`.
    let mut always = notification.clone();
    always["policy"] = json!("always");
    push(&cluster, "omar", always).await;
    next_push(&mut omar, WAIT).await.unwrap();
    assert!(
        eventually(WAIT, || async {
            !requests_for(&stand_in, &omar_apns).is_empty()
        })
        .await
    );
    // A window in which a second notification (the offline-policy push's)
    // would show up; none may.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        requests_for(&stand_in, &omar_apns).len(),
        1,
        "only the `always` push notifies an online user"
    );

    // A dead token (410 Unregistered) is removed from the user's tokens.
    let dead = apns_token("dead");
    register(&cluster, "dora", "apns", &dead).await;
    push(&cluster, "dora", notification.clone()).await;
    let removed = eventually(WAIT, || async {
        let listed = ok(&cluster, "list_tokens", json!({ "user": "dora" })).await;
        listed["tokens"].as_array().unwrap().is_empty()
    })
    .await;
    assert!(removed, "the dead token is still listed");

    // A token of a provider the app has no credentials for: counted, not sent.
    register(&cluster, "hana", "hms", "hms-token-of-hana").await;
    push(&cluster, "hana", notification.clone()).await;
    let admin = cluster.center.addr("admin");
    let counted = eventually(WAIT, || async {
        metric(
            admin,
            "pushgrid_center_notifications_total",
            "outcome=\"no_credentials\"",
        )
        .await
            >= 1.0
    })
    .await;
    assert!(counted);
    assert!(
        metric(
            admin,
            "pushgrid_center_notifications_total",
            "outcome=\"dead_token\""
        )
        .await
            >= 1.0
    );
    assert!(
        metric(
            admin,
            "pushgrid_center_notify_skipped_total",
            "reason=\"online\""
        )
        .await
            >= 1.0
    );

    // unacked_after: a device that does not ACK within the time gets a
    // notification; one that ACKs gets none.
    let (ursa_apns, ulla_apns) = (apns_token("03"), apns_token("04"));
    register(&cluster, "ursa", "apns", &ursa_apns).await;
    register(&cluster, "ulla", "apns", &ulla_apns).await;
    let (mut ursa, _) = cluster.device("ursa").await.unwrap();
    let (mut ulla, _) = cluster.device("ulla").await.unwrap();
    let mut unacked = notification.clone();
    unacked["policy"] = json!("unacked_after");
    unacked["unacked_after_secs"] = json!(1);
    let pushed = std::time::Instant::now();
    push(&cluster, "ursa", unacked.clone()).await;
    push(&cluster, "ulla", unacked).await;
    next_push(&mut ursa, WAIT).await.unwrap(); // and never ACKed
    let ulla_push = next_push(&mut ulla, WAIT).await.unwrap();
    ulla.send_frame(
        Op::Ack,
        0,
        &msg::Ack {
            msg_ids: vec![ulla_push.msg_id],
        },
    )
    .await
    .unwrap();
    assert!(
        eventually(WAIT, || async {
            requests_for(&stand_in, &ursa_apns).len() == 1
        })
        .await
    );
    assert!(
        pushed.elapsed() >= Duration::from_secs(1),
        "notified before unacked_after_secs"
    );
    // Both jobs came due together; a window for ulla's, which must not come.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        requests_for(&stand_in, &ulla_apns).is_empty(),
        "an acknowledged message was notified"
    );
    assert!(
        metric(
            admin,
            "pushgrid_center_notify_skipped_total",
            "reason=\"acked\""
        )
        .await
            >= 1.0
    );

    // Olga's devices still have one notification each, no more.
    assert_eq!(requests_for(&stand_in, &olga_apns).len(), 1);
    assert_eq!(requests_for(&stand_in, &olga_fcm).len(), 1);

    // A bad notification is refused before anything is stored.
    let (status, body) = cluster
        .call(&cluster.app.api_key, "push", json!({ "users": ["olga"], "payload": "x", "notification": { "title": "t", "policy": "later" } }))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("notification.policy"),
        "{body}"
    );
    cluster.cleanup().await;
}
