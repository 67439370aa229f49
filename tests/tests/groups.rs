//! Groups and delivery status (issue 12) on real role processes, the real
//! Redis and MariaDB and real TCP devices.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use pushgrid_client::{Connection, Op, msg};
use pushgrid_e2e::{
    ClusterOptions, REDIS_URL, TestCluster, eventually, next_frame, next_push, wait_for,
};
use reqwest::Method;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

/// A call with the cluster app's key that must succeed; its `result`.
async fn ok(cluster: &TestCluster, method: &str, body: Value) -> Value {
    let (status, answer) = cluster.call(&cluster.app.api_key, method, body).await;
    assert_eq!(status, 200, "{method}: {answer}");
    answer["result"].clone()
}

/// Every member of a group, page by page.
async fn all_members(cluster: &TestCluster, key: &str, group: &str, limit: u32) -> Vec<String> {
    let mut members = Vec::new();
    let mut cursor = Value::Null;
    for _ in 0..1000 {
        let (status, answer) = cluster
            .call(
                key,
                "group_members",
                json!({ "group": group, "cursor": cursor, "limit": limit }),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        let page = &answer["result"];
        let users = page["users"].as_array().unwrap();
        assert!(users.len() <= limit as usize);
        members.extend(users.iter().map(|user| user.as_str().unwrap().to_string()));
        cursor = page["next_cursor"].clone();
        if cursor.is_null() {
            return members;
        }
    }
    panic!("group_members never ended");
}

async fn status(cluster: &TestCluster, id: &str) -> Value {
    ok(cluster, "message_status", json!({ "id": id })).await
}

/// Waits until a group push's fan-out is done and its counts are `want`.
async fn wait_for_counts(cluster: &TestCluster, id: &str, want: Value) {
    let reached = eventually(WAIT, || async {
        let now = status(cluster, id).await;
        now["counts"] == want && now["fanout_done"] == true
    })
    .await;
    assert!(
        reached,
        "counts never became {want}: {}",
        status(cluster, id).await
    );
}

async fn ack(device: &mut Connection, id: u64) {
    device
        .send_frame(Op::Ack, 1, &msg::Ack { msg_ids: vec![id] })
        .await
        .unwrap();
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_unbind_and_members_round_trip() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let users: Vec<String> = (0..2500).map(|n| format!("user{n:05}")).collect();
    let bound = ok(
        &cluster,
        "bind",
        json!({ "group": "city:paris", "users": users }),
    )
    .await;
    assert_eq!(bound["added"], 2500);
    // Binding again adds nobody; a new user among old ones counts once.
    let again = ok(
        &cluster,
        "bind",
        json!({ "group": "city:paris", "users": ["user00001", "user00002", "Zoe"] }),
    )
    .await;
    assert_eq!(again["added"], 1);
    ok(
        &cluster,
        "bind",
        json!({ "group": "plan:pro", "users": ["user00001", "zoe"] }),
    )
    .await;

    // Pages of 1000 in byte order ("Zoe" sorts before "user..."), each member once.
    let members = all_members(&cluster, &cluster.app.api_key, "city:paris", 1000).await;
    let mut expected: Vec<String> = users.clone();
    expected.push("Zoe".into());
    expected.sort();
    assert_eq!(members, expected);

    let groups = ok(&cluster, "user_groups", json!({ "user": "user00001" })).await;
    assert_eq!(groups["groups"], json!(["city:paris", "plan:pro"]));
    // Users compare byte for byte: "Zoe" and "zoe" are two users.
    let groups = ok(&cluster, "user_groups", json!({ "user": "zoe" })).await;
    assert_eq!(groups["groups"], json!(["plan:pro"]));

    let leaving: Vec<String> = users[..500].to_vec();
    let unbound = ok(
        &cluster,
        "unbind",
        json!({ "group": "city:paris", "users": leaving }),
    )
    .await;
    assert_eq!(unbound["removed"], 500);
    let unbound = ok(
        &cluster,
        "unbind",
        json!({ "group": "city:paris", "users": ["user00000", "nobody"] }),
    )
    .await;
    assert_eq!(unbound["removed"], 0, "neither is a member any more");
    let members = all_members(&cluster, &cluster.app.api_key, "city:paris", 777).await;
    assert_eq!(members.len(), 2001);
    assert!(!members.contains(&"user00499".to_string()));
    assert!(members.contains(&"user00500".to_string()));
    let groups = ok(&cluster, "user_groups", json!({ "user": "user00001" })).await;
    assert_eq!(groups["groups"], json!(["plan:pro"]));
    // A group nobody was bound to is empty, not an error.
    let empty = ok(&cluster, "group_members", json!({ "group": "nobody-here" })).await;
    assert_eq!(empty["users"], json!([]));
    assert!(empty["next_cursor"].is_null());
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_input_gets_400_naming_the_field() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let key = cluster.app.api_key.clone();
    let too_many: Vec<String> = (0..10_001).map(|n| format!("u{n}")).collect();
    let exactly_enough: Vec<String> = (0..10_000).map(|n| format!("u{n}")).collect();
    for (method, body, field) in [
        ("bind", json!({ "group": "", "users": ["a"] }), "group"),
        ("bind", json!({ "group": "g", "users": too_many }), "users"),
        ("bind", json!({ "group": "g", "users": [] }), "users"),
        (
            "bind",
            json!({ "group": "g", "users": ["a", ""] }),
            "users[1]",
        ),
        (
            "bind",
            json!({ "group": "g".repeat(129), "users": ["a"] }),
            "group",
        ),
        ("bind", json!({ "users": ["a"] }), "group"),
        ("unbind", json!({ "group": "", "users": ["a"] }), "group"),
        (
            "unbind",
            json!({ "group": "g", "users": too_many }),
            "users",
        ),
        ("group_members", json!({ "group": "" }), "group"),
        (
            "group_members",
            json!({ "group": "g", "limit": 0 }),
            "limit",
        ),
        (
            "group_members",
            json!({ "group": "g", "limit": 10_001 }),
            "limit",
        ),
        ("user_groups", json!({ "user": "" }), "user"),
        (
            "push_group",
            json!({ "group": "", "payload": "x" }),
            "group",
        ),
        ("push_group", json!({ "group": "g" }), "payload"),
        (
            "push_group",
            json!({ "group": "g", "payload": "x", "extra": 1 }),
            "extra",
        ),
        ("message_status", json!({ "id": "12ab" }), "id"),
        ("message_status", json!({}), "id"),
    ] {
        let (status, answer) = cluster.call(&key, method, body).await;
        assert_eq!(status, 400, "{method}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{method}: {message} should name {field}"
        );
    }
    // Nothing of the refused calls was stored; the limit itself is accepted.
    let empty = ok(&cluster, "group_members", json!({ "group": "g" })).await;
    assert_eq!(empty["users"], json!([]));
    let bound = ok(
        &cluster,
        "bind",
        json!({ "group": "g", "users": exactly_enough }),
    )
    .await;
    assert_eq!(bound["added"], 10_000);
    // Unknown ids are 404; no key is 401.
    let (status, answer) = cluster
        .call(&key, "message_status", json!({ "id": "12345" }))
        .await;
    assert_eq!(status, 404, "{answer}");
    let (status, _) = cluster
        .call("wrong-key", "bind", json!({ "group": "g", "users": ["a"] }))
        .await;
    assert_eq!(status, 401);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_push_reaches_online_and_offline_members_and_acks_show_in_status() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    ok(
        &cluster,
        "bind",
        json!({ "group": "beta", "users": ["alice", "bob", "carol"] }),
    )
    .await;
    // alice on two devices, bob on one, carol offline; dave is no member.
    let (mut alice_phone, _) = cluster.device_at(0, "alice", "phone").await.unwrap();
    let (mut alice_tablet, _) = cluster.device_at(0, "alice", "tablet").await.unwrap();
    let (mut bob, _) = cluster.device_at(0, "bob", "phone").await.unwrap();
    let (mut dave, _) = cluster.device_at(0, "dave", "phone").await.unwrap();

    let pushed = ok(
        &cluster,
        "push_group",
        json!({ "group": "beta", "payload": "beta is open" }),
    )
    .await;
    assert_eq!(pushed["accepted"], true);
    let group_id = pushed["id"].as_str().unwrap().to_string();

    let on_phone = next_push(&mut alice_phone, WAIT).await.unwrap();
    let on_tablet = next_push(&mut alice_tablet, WAIT).await.unwrap();
    let on_bob = next_push(&mut bob, WAIT).await.unwrap();
    assert_eq!(&on_phone.payload[..], b"beta is open");
    assert_eq!(on_phone.msg_id, on_tablet.msg_id, "one message per user");
    assert_ne!(on_phone.msg_id, on_bob.msg_id);
    assert_ne!(on_phone.msg_id.to_string(), group_id);
    assert!(
        next_frame(&mut dave, Duration::from_millis(700))
            .await
            .is_err(),
        "a non-member got the group push"
    );

    // Before carol connects: her message is stored, the other two delivered.
    wait_for_counts(
        &cluster,
        &group_id,
        json!({ "stored": 1, "delivered": 2, "acked": 0, "expired": 0, "dead_lettered": 0 }),
    )
    .await;
    let group = status(&cluster, &group_id).await;
    assert_eq!(group["kind"], "group");
    assert_eq!(group["group"], "beta");
    assert_eq!(group["members"], 3);

    // carol gets hers from the inbox when she connects.
    let (mut carol, _) = cluster.device_at(0, "carol", "phone").await.unwrap();
    let on_carol = next_push(&mut carol, WAIT).await.unwrap();
    assert_eq!(&on_carol.payload[..], b"beta is open");

    ack(&mut alice_phone, on_phone.msg_id).await;
    ack(&mut bob, on_bob.msg_id).await;
    ack(&mut carol, on_carol.msg_id).await;
    wait_for_counts(
        &cluster,
        &group_id,
        json!({ "stored": 0, "delivered": 0, "acked": 3, "expired": 0, "dead_lettered": 0 }),
    )
    .await;

    // Per device: alice's phone acked it, her tablet only had it handed over.
    let alice = status(&cluster, &on_phone.msg_id.to_string()).await;
    assert_eq!(alice["kind"], "unicast");
    assert_eq!(alice["user"], "alice");
    assert_eq!(alice["state"], "acked");
    assert_eq!(alice["group_push"], group_id.as_str());
    let devices = alice["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{alice}");
    let phone = devices
        .iter()
        .find(|d| d["device"] == "alice-phone")
        .unwrap();
    let tablet = devices
        .iter()
        .find(|d| d["device"] == "alice-tablet")
        .unwrap();
    assert_eq!(phone["state"], "acked");
    assert!(phone["acked_ms"].as_u64().unwrap() >= phone["delivered_ms"].as_u64().unwrap());
    assert_eq!(tablet["state"], "delivered");
    assert!(tablet["acked_ms"].is_null());
    assert!(tablet["delivered_ms"].as_u64().unwrap() > 0);
    let carol_status = status(&cluster, &on_carol.msg_id.to_string()).await;
    assert_eq!(carol_status["devices"][0]["device"], "carol-phone");
    assert_eq!(carol_status["devices"][0]["state"], "acked");

    // A plain push has a status too: stored, then delivered, then acked.
    let ids = cluster.push(&["erin"], "solo").await.unwrap();
    let solo = status(&cluster, &ids[0].to_string()).await;
    assert_eq!(solo["state"], "stored");
    assert!(solo["group_push"].is_null());
    let (mut erin, _) = cluster.device_at(0, "erin", "phone").await.unwrap();
    let got = next_push(&mut erin, WAIT).await.unwrap();
    assert_eq!(got.msg_id, ids[0]);
    assert!(
        eventually(WAIT, || async {
            status(&cluster, &ids[0].to_string()).await["state"] == "delivered"
        })
        .await
    );
    ack(&mut erin, ids[0]).await;
    assert!(
        eventually(WAIT, || async {
            let solo = status(&cluster, &ids[0].to_string()).await;
            solo["state"] == "acked" && solo["devices"][0]["state"] == "acked"
        })
        .await
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_has_delivery_counts() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (_one, _) = cluster.device_at(0, "ann", "phone").await.unwrap();
    let (_two, _) = cluster.device_at(0, "ben", "phone").await.unwrap();
    let sent = ok(&cluster, "broadcast", json!({ "payload": "to all" })).await;
    let id = sent["id"].as_str().unwrap().to_string();
    assert!(
        eventually(WAIT, || async {
            let answer = status(&cluster, &id).await;
            answer["kind"] == "broadcast" && answer["counts"]["delivered"] == 2
        })
        .await,
        "{}",
        status(&cluster, &id).await
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_survives_a_restart_of_every_role_and_a_lost_redis_copy() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let users: Vec<String> = (0..1200).map(|n| format!("m{n:04}")).collect();
    ok(
        &cluster,
        "bind",
        json!({ "group": "durable", "users": users }),
    )
    .await;

    for role in [
        "keeper",
        "register",
        "saver",
        "coordinator",
        "center",
        "dispatcher",
        "room0",
    ] {
        cluster.kill_role(role).await;
    }
    for role in [
        "keeper",
        "register",
        "saver",
        "coordinator",
        "center",
        "dispatcher",
        "room0",
    ] {
        cluster.start_role_again(role).await.unwrap();
    }
    let key = cluster.app.api_key.clone();
    assert!(
        eventually(Duration::from_secs(30), || async {
            cluster
                .call(&key, "group_members", json!({ "group": "durable" }))
                .await
                .0
                == 200
        })
        .await,
        "center never answered after the restart"
    );
    assert_eq!(all_members(&cluster, &key, "durable", 500).await, users);

    // Redis loses the hot copy: pages come from MySQL and the copy is rebuilt.
    let tag = format!("pg:{{g:{}:durable}}", cluster.app.id);
    let mut connection = redis().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{tag}:members"))
        .arg(format!("{tag}:warm"))
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(all_members(&cluster, &key, "durable", 500).await, users);
    assert!(
        eventually(WAIT, || async {
            let mut redis = redis().await;
            let count: i64 = redis::cmd("ZCARD")
                .arg(format!("{tag}:members"))
                .query_async(&mut redis)
                .await
                .unwrap();
            let warm: bool = redis::cmd("EXISTS")
                .arg(format!("{tag}:warm"))
                .query_async(&mut redis)
                .await
                .unwrap();
            count == 1200 && warm
        })
        .await,
        "the hot copy was not rebuilt"
    );
    assert_eq!(all_members(&cluster, &key, "durable", 500).await, users);

    // And a group push after all that reaches a member. The room may still
    // list the killed register until its lease ends (keeper restarted without
    // forgetting it): AUTH then says "retry", as a device would.
    let connected = wait_for(Duration::from_secs(10), || async {
        let (device, _) = cluster.device_at(0, "m0042", "phone").await.ok()?;
        Some(device)
    })
    .await;
    let mut member = connected.expect("the member connects within 10 s");
    let pushed = ok(
        &cluster,
        "push_group",
        json!({ "group": "durable", "payload": "still here" }),
    )
    .await;
    let push = next_push(&mut member, WAIT).await.unwrap();
    assert_eq!(&push.payload[..], b"still here");
    let id = pushed["id"].as_str().unwrap().to_string();
    assert!(
        eventually(WAIT, || async {
            let group = status(&cluster, &id).await;
            group["members"] == 1200 && group["fanout_done"] == true
        })
        .await
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_are_isolated_between_apps() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let other_id = format!("other{:08x}", rand::random::<u32>());
    let other_key = format!("{other_id}-key");
    let (status_code, _) = cluster
        .admin(
            Method::PUT,
            &format!("/admin/apps/{other_id}"),
            Some(json!({ "jwt_secret": "s2", "api_key": other_key })),
        )
        .await;
    assert_eq!(status_code, 200);
    assert!(
        eventually(WAIT, || async {
            cluster
                .call(&other_key, "user_groups", json!({ "user": "x" }))
                .await
                .0
                == 200
        })
        .await
    );
    ok(
        &cluster,
        "bind",
        json!({ "group": "vip", "users": ["kim", "lee"] }),
    )
    .await;
    let (_, theirs) = cluster
        .call(
            &other_key,
            "bind",
            json!({ "group": "vip", "users": ["kim", "max"] }),
        )
        .await;
    assert_eq!(
        theirs["result"]["added"], 2,
        "the other app's vip is its own"
    );

    let ours: BTreeSet<String> = all_members(&cluster, &cluster.app.api_key, "vip", 10)
        .await
        .into_iter()
        .collect();
    assert_eq!(ours, ["kim", "lee"].map(String::from).into());
    assert_eq!(
        all_members(&cluster, &other_key, "vip", 10).await,
        ["kim", "max"]
    );
    let (_, lee) = cluster
        .call(&other_key, "user_groups", json!({ "user": "lee" }))
        .await;
    assert_eq!(lee["result"]["groups"], json!([]));
    let (_, unbound) = cluster
        .call(
            &other_key,
            "unbind",
            json!({ "group": "vip", "users": ["lee"] }),
        )
        .await;
    assert_eq!(unbound["result"]["removed"], 0);

    // Our group push reaches our kim only; its status is ours alone.
    let (mut kim, _) = cluster.device_at(0, "kim", "phone").await.unwrap();
    let pushed = ok(
        &cluster,
        "push_group",
        json!({ "group": "vip", "payload": "ours" }),
    )
    .await;
    let id = pushed["id"].as_str().unwrap().to_string();
    let push = next_push(&mut kim, WAIT).await.unwrap();
    assert_eq!(&push.payload[..], b"ours");
    let (code, _) = cluster
        .call(&other_key, "message_status", json!({ "id": id }))
        .await;
    assert_eq!(code, 404, "another app sees no status of our group push");
    let (code, _) = cluster
        .call(
            &other_key,
            "message_status",
            json!({ "id": push.msg_id.to_string() }),
        )
        .await;
    assert_eq!(code, 404, "nor of our member's message");
    assert!(
        eventually(WAIT, || async {
            status(&cluster, &id).await["members"] == 2
        })
        .await
    );
    cluster.cleanup().await;
}
