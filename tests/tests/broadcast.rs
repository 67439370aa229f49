//! Broadcast: topics across two rooms, the app-wide topic, and recovery by
//! offset and epoch when a device resubscribes. Real processes.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use pushgrid_client::{Connection, Op, msg};
use pushgrid_e2e::{ClusterOptions, TestCluster, next_frame, next_push, round_trip};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

async fn broadcast(cluster: &TestCluster, topic: &str, payload: &str) -> (u16, Value) {
    let response = cluster
        .http
        .post(format!("{}/api/broadcast", cluster.center_url()))
        .header("Authorization", format!("apikey {}", cluster.app.api_key))
        .json(&json!({ "topic": topic, "payload": payload }))
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// SUB and read until SUB_OK; returns the replayed pushes and the SUB_OK.
async fn subscribe(
    device: &mut Connection,
    topic: &str,
    since_offset: u64,
    epoch: u64,
) -> (Vec<msg::Push>, msg::SubOk) {
    device
        .send_frame(
            Op::Sub,
            42,
            &msg::Sub {
                topic: topic.into(),
                since_offset,
                epoch,
            },
        )
        .await
        .unwrap();
    let mut replayed = Vec::new();
    loop {
        let frame = next_frame(device, WAIT)
            .await
            .unwrap()
            .expect("open connection");
        match frame.op {
            Op::Push => replayed.push(frame.decode::<msg::Push>().unwrap()),
            Op::SubOk => {
                assert_eq!(frame.seq, 42);
                return (replayed, frame.decode::<msg::SubOk>().unwrap());
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_reaches_its_subscribers_on_every_room_and_no_one_else() {
    let cluster = TestCluster::start(ClusterOptions {
        rooms: 2,
        ..Default::default()
    })
    .await
    .unwrap();
    let (mut first, _) = cluster.device_at(0, "u1", "ios").await.unwrap();
    let (mut second, _) = cluster.device_at(1, "u2", "ios").await.unwrap();
    let (mut outsider, _) = cluster.device_at(1, "u3", "ios").await.unwrap();
    let (_, ok_first) = subscribe(&mut first, "news", 0, 0).await;
    let (_, ok_second) = subscribe(&mut second, "news", 0, 0).await;
    assert!(
        !ok_first.recovered && !ok_second.recovered,
        "a first subscription recovers nothing"
    );

    let (status, body) = broadcast(&cluster, "news", "headline").await;
    assert_eq!(status, 200, "{body}");
    let offset = body["result"]["offset"].as_u64().unwrap();
    let epoch = body["result"]["epoch"].as_u64().unwrap();
    for device in [&mut first, &mut second] {
        let push = next_push(device, WAIT).await.unwrap();
        assert_eq!(push.kind(), msg::PushKind::Broadcast);
        assert_eq!(
            (push.topic.as_str(), push.offset, push.epoch),
            ("news", offset, epoch)
        );
        assert_eq!(&push.payload[..], b"headline");
    }
    assert!(
        next_frame(&mut outsider, Duration::from_millis(500))
            .await
            .is_err(),
        "not subscribed, nothing arrives"
    );

    // The app-wide topic needs no subscription.
    let (status, body) = broadcast(&cluster, "", "to everyone").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["topic"], "all");
    for device in [&mut first, &mut second, &mut outsider] {
        let push = next_push(device, WAIT).await.unwrap();
        assert_eq!(
            (push.topic.as_str(), &push.payload[..]),
            ("all", &b"to everyone"[..])
        );
    }

    // After UNSUB the topic no longer arrives.
    first
        .send_frame(
            Op::Unsub,
            0,
            &msg::Unsub {
                topic: "news".into(),
            },
        )
        .await
        .unwrap();
    // The room has handled the UNSUB once it answers a PING sent after it.
    let meanwhile = round_trip(&mut first, WAIT).await.unwrap();
    assert!(meanwhile.is_empty(), "{meanwhile:?}");
    broadcast(&cluster, "news", "second").await;
    assert_eq!(
        &next_push(&mut second, WAIT).await.unwrap().payload[..],
        b"second"
    );
    assert!(
        next_frame(&mut first, Duration::from_millis(500))
            .await
            .is_err()
    );
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resubscribing_device_recovers_what_it_missed_or_is_told_it_cannot() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let (mut device, _) = cluster.device("vera").await.unwrap();
    subscribe(&mut device, "scores", 0, 0).await;
    broadcast(&cluster, "scores", "1-0").await;
    let seen = next_push(&mut device, WAIT).await.unwrap();
    drop(device);

    // Offline: three more messages.
    for score in ["2-0", "2-1", "3-1"] {
        assert_eq!(broadcast(&cluster, "scores", score).await.0, 200);
    }
    let (mut device, _) = cluster.device("vera").await.unwrap();
    let (replayed, ok) = subscribe(&mut device, "scores", seen.offset, seen.epoch).await;
    assert!(ok.recovered);
    let payloads: Vec<&[u8]> = replayed.iter().map(|push| &push.payload[..]).collect();
    assert_eq!(payloads, vec![&b"2-0"[..], b"2-1", b"3-1"]);
    let offsets: Vec<u64> = replayed.iter().map(|push| push.offset).collect();
    assert_eq!(
        offsets,
        vec![seen.offset + 1, seen.offset + 2, seen.offset + 3]
    );
    assert_eq!(ok.offset, seen.offset + 3);

    // A different epoch cannot be recovered: the device is told so.
    let (replayed, ok) = subscribe(&mut device, "scores", seen.offset, seen.epoch + 12345).await;
    assert!(!ok.recovered);
    assert!(replayed.is_empty());
    assert_eq!((ok.offset, ok.epoch), (seen.offset + 3, seen.epoch));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topics_are_refused() {
    let cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let long = "x".repeat(200);
    let (status, body) = broadcast(&cluster, &long, "x").await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("topic"),
        "{body}"
    );
    let (mut device, _) = cluster.device("walt").await.unwrap();
    device
        .send_frame(
            Op::Sub,
            5,
            &msg::Sub {
                topic: long,
                since_offset: 0,
                epoch: 0,
            },
        )
        .await
        .unwrap();
    let frame = next_frame(&mut device, WAIT).await.unwrap().unwrap();
    assert_eq!((frame.op, frame.seq), (Op::Error, 5));
    assert_eq!(
        frame.decode::<msg::Error>().unwrap().code(),
        msg::ErrorCode::BadBody
    );
    // The connection stays usable.
    let (_, ok) = subscribe(&mut device, "fine", 0, 0).await;
    assert_eq!(ok.topic, "fine");
    cluster.cleanup().await;
}
