//! The push API's kick, presence, stats and info methods, on real processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Op, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, next_frame};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn call(cluster: &TestCluster, key: &str, method: &str, body: Value) -> (u16, Value) {
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
async fn presence_stats_info_and_kick() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let (mut device, auth_ok) = cluster.device("olga").await.unwrap();

    let (status, body) = call(&cluster, &key, "presence", json!({ "user": "olga" })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["online"], true);
    let sessions = body["result"]["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0]["device"], "olga-phone");
    assert_eq!(sessions[0]["conn_id"], auth_ok.conn_id.to_string());
    let (_, body) = call(&cluster, &key, "presence", json!({ "user": "nobody" })).await;
    assert_eq!(body["result"]["online"], false);

    // stats follows the room's load, reported with its keeper heartbeat.
    let connected = eventually(WAIT, || async {
        let (_, body) = call(&cluster, &key, "stats", json!({})).await;
        body["result"]["connections"] == 1
    })
    .await;
    assert!(connected, "stats never showed the connection");
    let (_, body) = call(&cluster, &key, "stats", json!({})).await;
    assert_eq!(body["result"]["rooms"][0]["connections"], 1);
    assert!(body["result"]["route_queue"]["capacity"].as_u64().unwrap() > 0);

    let (status, body) = call(&cluster, &key, "info", json!({})).await;
    assert_eq!(status, 200);
    let roles: Vec<&str> = body["result"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["role"].as_str().unwrap())
        .collect();
    for role in [
        "room",
        "register",
        "saver",
        "center",
        "coordinator",
        "dispatcher",
    ] {
        assert!(roles.contains(&role), "{role} missing from {roles:?}");
    }

    let (status, body) = call(
        &cluster,
        &key,
        "kick",
        json!({ "user": "olga", "reason": "maintenance" }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["kicked"], 1);
    let frame = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!(frame.op, Op::Kick);
    let kick = frame.decode::<msg::Kick>().unwrap();
    assert_eq!(
        (kick.code(), kick.reason.as_str()),
        (msg::KickCode::ByApi, "maintenance")
    );
    assert!(
        eventually(WAIT, || async {
            let (_, body) = call(&cluster, &key, "presence", json!({ "user": "olga" })).await;
            body["result"]["online"] == false
        })
        .await
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_refuse_bad_input_and_other_tenants() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let (_device, _) = cluster.device("pia").await.unwrap();

    for (method, body, field) in [
        ("presence", json!({}), "user"),
        ("presence", json!({ "user": "" }), "user"),
        ("kick", json!({ "user": "pia", "colour": 1 }), "colour"),
        ("stats", json!({ "extra": true }), "extra"),
    ] {
        let (status, answer) = call(&cluster, &key, method, body).await;
        assert_eq!(status, 400, "{method}: {answer}");
        assert!(
            answer["error"]["message"].as_str().unwrap().contains(field),
            "{method}: {answer}"
        );
    }
    let (status, _) = call(&cluster, "wrong", "stats", json!({})).await;
    assert_eq!(status, 401);

    // Another app's key sees nothing of this app's users and kicks none.
    let (status, _) = cluster
        .admin(
            Method::PUT,
            "/admin/apps/other",
            Some(json!({ "jwt_secret": "s2", "api_key": "other-key" })),
        )
        .await;
    assert_eq!(status, 200);
    assert!(
        eventually(WAIT, || async {
            call(&cluster, "other-key", "stats", json!({})).await.0 == 200
        })
        .await
    );
    let (_, body) = call(&cluster, "other-key", "presence", json!({ "user": "pia" })).await;
    assert_eq!(body["result"]["online"], false);
    let (_, body) = call(&cluster, "other-key", "kick", json!({ "user": "pia" })).await;
    assert_eq!(body["result"]["kicked"], 0);
    let (_, body) = call(&cluster, &key, "presence", json!({ "user": "pia" })).await;
    assert_eq!(body["result"]["online"], true, "pia is still connected");
    cluster.cleanup().await;
}
