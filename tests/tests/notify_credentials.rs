//! Notification provider credentials (issue 25) kept by keeper: set through
//! the admin API on a real cluster, checked when set (a key that cannot sign
//! is refused), shown only as fingerprints, published to centers alone,
//! replaced (rotated) and removed without a restart.
#![allow(clippy::unwrap_used)]

use pushgrid_e2e::{ClusterOptions, TestCluster};
use pushgrid_proto::cluster::Role;
use pushgrid_proto::cluster::keeper_client::KeeperClient;
use pushgrid_proto::cluster::{ClusterState, WatchRequest};
use reqwest::Method;
use serde_json::{Value, json};

const APNS_KEY: &str = include_str!("../../crates/notify/testdata/apns-test-key.p8");
const FCM_KEY: &str = include_str!("../../crates/notify/testdata/fcm-test-key.pem");

/// The state keeper publishes to `role`, until `done` holds for it.
async fn published_to(
    cluster: &TestCluster,
    role: Role,
    done: impl Fn(&ClusterState) -> bool,
) -> ClusterState {
    let channel = cluster.grpc_as(cluster.keeper.addr("grpc"), role).await;
    let mut stream = KeeperClient::new(channel)
        .watch(WatchRequest {})
        .await
        .unwrap()
        .into_inner();
    let deadline = std::time::Duration::from_secs(15);
    tokio::time::timeout(deadline, async {
        loop {
            let state = stream.message().await.unwrap().unwrap();
            if done(&state) {
                return state;
            }
        }
    })
    .await
    .expect("keeper never published the expected state")
}

fn error_message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_credentials_are_checked_hidden_and_published_to_centers_only() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let app = cluster.app.id.clone();
    let path = |provider: &str| format!("/admin/apps/{app}/notify/{provider}");
    let apns = json!({
        "key_id": "ABC123DEFG", "team_id": "DEF123GHIJ", "private_key": APNS_KEY,
        "topic": "com.example.app", "base_url": "https://127.0.0.1:9",
    });

    // Refusals name what is wrong.
    let (status, body) = cluster
        .admin(Method::PUT, &path("apns"), Some(json!({ "key_id": "k" })))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        error_message(&body).contains("team_id is required for apns"),
        "{body}"
    );
    let mut wrong_key = apns.clone();
    wrong_key["private_key"] = json!(FCM_KEY);
    let (status, body) = cluster
        .admin(Method::PUT, &path("apns"), Some(wrong_key))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).starts_with("private_key: "), "{body}");
    let (status, body) = cluster
        .admin(
            Method::PUT,
            &path("apns"),
            Some(json!({ "privat_key": "x" })),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body).contains("privat_key"), "{body}");
    let (status, body) = cluster
        .admin(Method::PUT, &path("gcm"), Some(apns.clone()))
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = cluster
        .admin(
            Method::PUT,
            "/admin/apps/nope/notify/apns",
            Some(apns.clone()),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error_message(&body), "no app \"nope\"");

    // Set: the answer and GET /admin/config show a fingerprint, never the key.
    let (status, body) = cluster
        .admin(Method::PUT, &path("apns"), Some(apns.clone()))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = cluster
        .admin(
            Method::PUT,
            &path("fcm"),
            Some(json!({
                "project_id": "example", "client_email": "sa@example.iam.gserviceaccount.com",
                "private_key": FCM_KEY,
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, config) = cluster.admin(Method::GET, "/admin/config", None).await;
    assert_eq!(status, 200);
    let text = config.to_string();
    assert!(!text.contains("PRIVATE KEY"), "{text}");
    let shown = config["result"]["notify_providers"].as_array().unwrap();
    assert_eq!(shown.len(), 2, "{config}");
    let apns_shown = shown.iter().find(|p| p["provider"] == "apns").unwrap();
    assert_eq!(apns_shown["key_id"], "ABC123DEFG");
    assert!(
        apns_shown["private_key"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // Centers get the credentials; no other role does.
    let center = published_to(&cluster, Role::Center, |state| {
        state.notify_providers.len() == 2
    })
    .await;
    let apns_published = center
        .notify_providers
        .iter()
        .find(|p| p.provider == "apns")
        .unwrap();
    assert_eq!(apns_published.private_key, APNS_KEY);
    assert_eq!(apns_published.topic, "com.example.app");
    for role in pushgrid_common::auth::ROLES {
        if role == Role::Center {
            continue;
        }
        let state = published_to(&cluster, role, |_| true).await;
        assert!(
            state.notify_providers.is_empty(),
            "{role:?} got notification credentials"
        );
    }

    // Rotation: a new key id replaces the old one, no restart.
    let mut rotated = apns.clone();
    rotated["key_id"] = json!("NEWKEY4567");
    let (status, body) = cluster
        .admin(Method::PUT, &path("apns"), Some(rotated))
        .await;
    assert_eq!(status, 200, "{body}");
    published_to(&cluster, Role::Center, |state| {
        state
            .notify_providers
            .iter()
            .any(|p| p.provider == "apns" && p.key_id == "NEWKEY4567")
    })
    .await;

    // Removal, then removing again is a 404.
    let (status, body) = cluster.admin(Method::DELETE, &path("fcm"), None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = cluster.admin(Method::DELETE, &path("fcm"), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(
        error_message(&body),
        format!("app \"{app}\" has no fcm credentials")
    );
    let state = published_to(&cluster, Role::Center, |state| {
        state.notify_providers.len() == 1
    })
    .await;
    assert_eq!(state.notify_providers[0].provider, "apns");

    // Deleting the app removes its credentials with it.
    let (status, _) = cluster
        .admin(Method::DELETE, &format!("/admin/apps/{app}"), None)
        .await;
    assert_eq!(status, 200);
    published_to(&cluster, Role::Center, |state| {
        state.notify_providers.is_empty()
    })
    .await;
    cluster.cleanup().await;
}
