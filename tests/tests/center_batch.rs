//! The push API's `batch` method and its OpenAPI document, on real processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, Op};
use pushgrid_e2e::{ClusterOptions, TestCluster, eventually, metric, next_frame, next_push};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

fn error_message(reply: &Value) -> &str {
    reply["error"]["message"].as_str().unwrap_or_default()
}

/// The next `count` distinct pushes a device receives, (id, payload) in
/// order of first arrival. Unicast is at-least-once: a message routed again
/// (after an uncertain first attempt) repeats an id, never adds one.
async fn received(device: &mut Connection, count: usize) -> Vec<(String, String)> {
    let mut pushes: Vec<(String, String)> = Vec::new();
    while pushes.len() < count {
        let push = next_push(device, WAIT).await.unwrap();
        let id = push.msg_id.to_string();
        if pushes.iter().all(|(seen, _)| *seen != id) {
            pushes.push((id, String::from_utf8_lossy(&push.payload).into_owned()));
        }
    }
    pushes
}

/// Fails if a push with an id not in `seen` arrives within `quiet`.
async fn nothing_new(device: &mut Connection, seen: &[(String, String)], quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(push) = next_push(device, left).await else {
            return;
        };
        let id = push.msg_id.to_string();
        assert!(
            seen.iter().any(|(known, _)| *known == id),
            "an unexpected push arrived: {id}"
        );
    }
}

/// A PING answered: the room has finished the device's AUTH (its inbox read),
/// so what arrives next was routed live.
async fn settled(device: &mut Connection) {
    device.send_empty(Op::Ping, 77).await.unwrap();
    loop {
        let frame = next_frame(device, WAIT).await.unwrap().unwrap();
        if frame.op == Op::Pong {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_every_command_in_order_and_stores_single_pushes_together() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let admin = cluster.center.addr("admin");
    let (mut ann, _) = cluster.device("ann").await.unwrap();
    let (mut bob, _) = cluster.device("bob").await.unwrap();
    settled(&mut ann).await;
    settled(&mut bob).await;
    let calls_before = metric(admin, "pushgrid_center_store_batch_items_count", "").await;
    let items_before = metric(admin, "pushgrid_center_store_batch_items_sum", "").await;

    let commands = json!({ "commands": [
        { "method": "push", "params": { "users": ["ann"], "payload": "a1" } },
        { "method": "push", "params": { "users": ["bob"], "payload": "b1" } },
        { "method": "push", "params": { "users": ["ann"], "payload": "a2" } },
        { "method": "presence", "params": { "user": "ann" } },
        { "method": "push", "params": { "users": ["ann", "bob"], "payload": "both" } },
        { "method": "kick", "params": { "user": "ann", "colour": "red" } },
        { "method": "nope" },
        { "method": "batch", "params": { "commands": [] } },
        { "method": "push", "params": { "users": [], "payload": "x" } },
        { "method": "stats" },
        { "method": "broadcast", "params": { "topic": "news", "payload": "headline" } },
        { "method": "push", "params": { "users": ["bob"], "payload": "b2" } },
    ]});
    let (status, body) = cluster.call(&key, "batch", commands).await;
    assert_eq!(status, 200, "{body}");
    let replies = body["result"]["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 12, "{body}");

    let id_of = |index: usize, user_index: usize| {
        replies[index]["result"]["messages"][user_index]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("reply {index}: {}", replies[index]))
            .to_string()
    };
    assert_eq!(replies[0]["result"]["messages"][0]["user"], "ann");
    assert_eq!(replies[1]["result"]["messages"][0]["user"], "bob");
    assert_eq!(replies[3]["result"]["online"], true, "{}", replies[3]);
    assert_eq!(
        replies[4]["result"]["messages"].as_array().unwrap().len(),
        2
    );
    for (index, needle) in [
        (5, "commands[5]"),
        (5, "colour"),
        (6, "unknown method"),
        (7, "cannot contain another batch"),
        (8, "users"),
    ] {
        assert_eq!(replies[index]["error"]["code"], "bad_request", "{index}");
        assert!(
            error_message(&replies[index]).contains(needle),
            "reply {index} should mention {needle}: {}",
            replies[index]
        );
    }
    assert!(
        replies[9]["result"]["connections"].is_u64(),
        "{}",
        replies[9]
    );
    assert_eq!(replies[10]["result"]["topic"], "news", "{}", replies[10]);

    // Each device gets its pushes, under the answered ids, and nothing else.
    // Routing runs apart from the answer, so arrival order is not promised;
    // ids grow in command order.
    let mut anns = received(&mut ann, 3).await;
    anns.sort_by_key(|(id, _)| id.parse::<u64>().unwrap());
    assert_eq!(
        anns,
        [
            (id_of(0, 0), "a1".to_string()),
            (id_of(2, 0), "a2".to_string()),
            (id_of(4, 0), "both".to_string()),
        ]
    );
    let mut bobs = received(&mut bob, 3).await;
    bobs.sort_by_key(|(id, _)| id.parse::<u64>().unwrap());
    assert_eq!(
        bobs,
        [
            (id_of(1, 0), "b1".to_string()),
            (id_of(4, 1), "both".to_string()),
            (id_of(11, 0), "b2".to_string()),
        ]
    );
    nothing_new(&mut ann, &anns, Duration::from_millis(500)).await;
    // The run of three single-user pushes was one StoreMany call of three
    // items, the last push another of one; nothing else went that way.
    assert_eq!(
        metric(admin, "pushgrid_center_store_batch_items_count", "").await - calls_before,
        2.0
    );
    assert_eq!(
        metric(admin, "pushgrid_center_store_batch_items_sum", "").await - items_before,
        4.0
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_batch_fails_whole_and_its_commands_count_against_the_rate() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();

    for (body, needle) in [
        (json!({ "commands": [] }), "commands"),
        (json!({}), "commands"),
        (json!({ "commands": [{ "params": {} }] }), "method"),
        (json!({ "commands": [], "parallel": true }), "parallel"),
        (
            json!({ "commands": vec![json!({ "method": "stats" }); 1001] }),
            "1001 commands",
        ),
    ] {
        let (status, answer) = cluster.call(&key, "batch", body).await;
        assert_eq!(status, 400, "{answer}");
        assert_eq!(answer["error"]["code"], "bad_request");
        assert!(
            error_message(&answer).contains(needle),
            "{needle}: {answer}"
        );
    }
    let (status, answer) = cluster
        .call(
            "wrong",
            "batch",
            json!({ "commands": [{ "method": "stats" }] }),
        )
        .await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (401, &json!("unauthorized"))
    );

    // A rate of 1/s with a burst of 5: each command takes a token.
    let (status, _) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{}", cluster.app.id),
            Some(json!({
                "jwt_secret": cluster.app.secret,
                "api_key": key,
                "rate_per_sec": 1,
                "rate_burst": 5
            })),
        )
        .await;
    assert_eq!(status, 200);
    let six = json!({ "commands": vec![json!({ "method": "stats" }); 6] });
    let over_burst = eventually(WAIT, || async {
        let (status, answer) = cluster.call(&key, "batch", six.clone()).await;
        status == 400 && error_message(&answer).contains("burst of 5")
    })
    .await;
    assert!(over_burst, "a batch larger than the burst was not refused");
    // No wait for a refill: the bucket's state is known. The app had no rate
    // before, so the probe that first saw the new one was given a full bucket
    // (5 tokens) and its call took one (the oversized batch then took none):
    // 4 are left, and they refill at 1/s up to 5. So 4 commands pass and 2
    // more do not: the call takes one token, each further command one.
    let four = json!({ "commands": vec![json!({ "method": "stats" }); 4] });
    let (status, answer) = cluster.call(&key, "batch", four).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["result"]["replies"].as_array().unwrap().len(), 4);
    let two = json!({ "commands": vec![json!({ "method": "stats" }); 2] });
    let response = cluster
        .http
        .post(format!("{}/api/batch", cluster.center_url()))
        .header("Authorization", format!("apikey {key}"))
        .json(&two)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u32 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["code"], "rate_limited");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_of_the_openapi_document_is_served() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();

    // No API key needed for the document.
    let response = cluster
        .http
        .get(format!("{}/api/openapi.json", cluster.center_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let paths = document["paths"].as_object().unwrap();
    let methods: Vec<&str> = paths
        .iter()
        .filter(|(_, item)| item.get("post").is_some())
        .map(|(path, _)| path.strip_prefix("/api/").unwrap())
        .collect();
    for expected in [
        "push",
        "broadcast",
        "batch",
        "kick",
        "presence",
        "stats",
        "info",
    ] {
        assert!(methods.contains(&expected), "{expected} is not documented");
    }
    for method in &methods {
        let operation = &paths[&format!("/api/{method}")]["post"];
        assert!(
            operation["requestBody"]["content"]["application/json"]["schema"].is_object(),
            "{method}: no request schema"
        );
        assert!(
            operation["responses"]["200"]["content"]["application/json"]["schema"]["properties"]
                ["result"]
                .is_object(),
            "{method}: no result schema"
        );
        // Served: any answer but 404/405, in the envelope.
        let (status, answer) = cluster.call(&key, method, json!({})).await;
        assert!(
            status != 404 && status != 405,
            "{method} is documented but answers {status}"
        );
        assert!(
            answer.get("result").is_some() || answer["error"]["code"].is_string(),
            "{method}: {answer}"
        );
    }
    // The same check finds a method that is not served.
    let (status, answer) = cluster.call(&key, "nope", json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(answer["error"]["code"], "not_found");
    cluster.cleanup().await;
}
