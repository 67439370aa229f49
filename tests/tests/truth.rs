//! What the API and saver answer agrees with what is stored, also under store
//! faults: a Store call that failed, or whose caller gave up, leaves nothing
//! deliverable; a retry with the same idempotency key delivers once; an ACK
//! the store did not take (Redis connections killed, MySQL cut) is applied
//! later, and the acknowledged message is not delivered again meanwhile.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushgrid_client::{Op, msg};
use pushgrid_common::rpc::Channel;
use pushgrid_e2e::faults::{MysqlProxy, OwnRedis};
use pushgrid_e2e::{
    ClusterOptions, MYSQL_SERVER, REDIS_URL, TestCluster, eventually, metric, next_frame,
    next_push, wait_for,
};
use pushgrid_proto::cluster::saver_client::SaverClient;
use pushgrid_proto::cluster::{PendingRequest, Role, StoreRequest};
use serde_json::json;
use sqlx::Row;

/// A client of the cluster's saver calling as `role` (center stores, rooms
/// read inboxes).
async fn saver_client(cluster: &TestCluster, role: Role) -> SaverClient<Channel> {
    SaverClient::new(cluster.grpc_as(cluster.saver.addr("grpc"), role).await)
}

/// Rows of `user` in the cluster's `messages` table (any state).
async fn rows_of(cluster: &TestCluster, user: &str) -> i64 {
    let pool = cluster.mysql().await.unwrap();
    let row = sqlx::query("SELECT COUNT(*) AS n FROM messages WHERE app = ? AND user_id = ?")
        .bind(cluster.app.id.clone())
        .bind(user.to_string())
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    row.try_get("n").unwrap()
}

/// Message ids of `user` not acknowledged in SQL.
async fn unacked_in_sql(cluster: &TestCluster, user: &str) -> Vec<u64> {
    let pool = cluster.mysql().await.unwrap();
    let rows = sqlx::query(
        "SELECT id FROM messages WHERE app = ? AND user_id = ? AND acked_ms IS NULL ORDER BY id",
    )
    .bind(cluster.app.id.clone())
    .bind(user.to_string())
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.iter()
        .map(|row| row.try_get::<i64, _>("id").unwrap() as u64)
        .collect()
}

/// The user's inbox as saver serves it to a connecting device.
async fn inbox(cluster: &TestCluster, user: &str) -> Vec<u64> {
    saver_client(cluster, Role::Room)
        .await
        .pending(PendingRequest {
            app: cluster.app.id.clone(),
            user: user.to_string(),
            limit: 1000,
        })
        .await
        .unwrap()
        .into_inner()
        .messages
        .iter()
        .map(|message| message.id)
        .collect()
}

/// A device that connects now receives nothing within `quiet`.
async fn nothing_arrives(cluster: &TestCluster, user: &str, quiet: Duration) -> bool {
    let (mut device, _) = cluster.device_at(0, user, "check").await.unwrap();
    let frame = next_frame(&mut device, quiet).await;
    frame.is_err()
}

/// A Store call whose caller gave up (its deadline passed while MySQL held
/// the write) is finished by saver and then withdrawn: nothing of it is left
/// in SQL or in the inbox. The same call with a patient caller is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_call_whose_caller_gave_up_is_withdrawn() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let database = format!("{MYSQL_SERVER}/{}", cluster.database);
    let mut args = cluster.saver_args(REDIS_URL, &database);
    args.extend(["--set".into(), "commit_timeout_ms=30000".into()]);
    cluster.replace_saver("saver-patient", &args).await.unwrap();
    let admin = cluster.saver.addr("admin");
    let store = |user: &str| StoreRequest {
        app: cluster.app.id.clone(),
        users: vec![user.to_string()],
        payload: "held by a lock".into(),
        ..Default::default()
    };

    let pool = cluster.mysql().await.unwrap();
    let mut lock = pool.acquire().await.unwrap();
    sqlx::raw_sql("LOCK TABLES messages WRITE")
        .execute(&mut *lock)
        .await
        .unwrap();
    // The impatient caller: gone after 1 s, while the commit waits.
    let mut client = saver_client(&cluster, Role::Center).await;
    let gave_up =
        tokio::time::timeout(Duration::from_secs(1), client.store(store("impatient"))).await;
    assert!(gave_up.is_err(), "the call was still waiting for MySQL");
    // The patient caller, on a connection of its own.
    let mut patient_client = saver_client(&cluster, Role::Center).await;
    let request = store("patient");
    let patient = tokio::spawn(async move { patient_client.store(request).await });
    // The lock is held a while longer with the patient call in flight: the
    // fault's length, not a wait for a condition (the call is stored however
    // the two race).
    tokio::time::sleep(Duration::from_millis(300)).await;
    sqlx::raw_sql("UNLOCK TABLES")
        .execute(&mut *lock)
        .await
        .unwrap();
    drop(lock);
    pool.close().await;

    let kept = patient.await.unwrap().unwrap().into_inner().messages;
    assert_eq!(kept.len(), 1);
    let withdrawn = eventually(Duration::from_secs(20), || async {
        metric(admin, "pushgrid_saver_withdrawn_total", "").await >= 1.0
    })
    .await;
    assert!(withdrawn, "saver withdrew the abandoned call");
    assert_eq!(
        metric(admin, "pushgrid_saver_abandoned_calls_total", "").await,
        1.0
    );
    assert_eq!(rows_of(&cluster, "impatient").await, 0, "no row is left");
    assert!(
        inbox(&cluster, "impatient").await.is_empty(),
        "no inbox entry is left"
    );
    assert_eq!(inbox(&cluster, "patient").await, [kept[0].id]);
    println!(
        "TRUTH caller gave up: abandoned 1, withdrawn 1 message; patient call stored 1, inbox 1"
    );
    cluster.cleanup().await;
}

/// While saver's Redis is down a push is refused (503) and leaves no row in
/// SQL (not even an "expired" one) and nothing in any inbox; after Redis is
/// back, the retry with the same idempotency key is stored once and the
/// device receives exactly that one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_refused_while_redis_is_down_is_never_delivered_and_its_retry_delivers_once() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut redis = OwnRedis::start().await;
    let database = format!("{MYSQL_SERVER}/{}", cluster.database);
    let args = cluster.saver_args(&redis.url(), &database);
    cluster
        .replace_saver("saver-own-redis", &args)
        .await
        .unwrap();
    let key = cluster.app.api_key.clone();
    let push = |payload: &'static str, idempotency_key: Option<&'static str>| {
        let mut body = json!({ "users": ["rosa"], "payload": payload });
        if let Some(idempotency_key) = idempotency_key {
            body["idempotency_key"] = json!(idempotency_key);
        }
        let cluster = &cluster;
        let key = key.clone();
        async move { cluster.call(&key, "push", body).await }
    };

    redis.kill().await;
    let (status, body) = push("refused", None).await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = push("refused with a key", Some("order-17")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        rows_of(&cluster, "rosa").await,
        0,
        "a refused push leaves no row behind"
    );

    redis.restart_empty().await;
    let accepted = wait_for(Duration::from_secs(10), || async {
        let (status, body) = push("refused with a key", Some("order-17")).await;
        if status != 200 {
            return None;
        }
        assert_eq!(body["result"]["replayed"], json!(false), "{body}");
        Some(
            body["result"]["messages"][0]["id"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap(),
        )
    })
    .await;
    let accepted = accepted.expect("the retry is accepted once Redis is back");
    let (status, body) = push("refused with a key", Some("order-17")).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["replayed"], json!(true));

    let (mut device, _) = cluster.device_at(0, "rosa", "phone").await.unwrap();
    let message = next_push(&mut device, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(message.msg_id, accepted);
    assert_eq!(&message.payload[..], b"refused with a key");
    assert!(
        next_frame(&mut device, Duration::from_millis(1500))
            .await
            .is_err(),
        "nothing else arrives"
    );
    assert_eq!(rows_of(&cluster, "rosa").await, 1);
    let (status, body) = cluster
        .call(
            &key,
            "message_status",
            json!({ "id": accepted.to_string() }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["result"]["state"], json!("expired"), "{body}");
    println!("TRUTH redis down: refused 2, rows left 0; retry stored 1, delivered 1");
    cluster.cleanup().await;
}

/// The ACK-under-Redis-fault test: a device receives and acknowledges a
/// stream of pushes while saver's Redis connections are killed every few
/// milliseconds (`CLIENT KILL` every 25 ms), in rounds of pushes until a
/// kill has hit an ACK in flight. Afterwards every acknowledged message is
/// acked in SQL, gone from the inbox, and a device that connects again
/// receives none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_survive_redis_connections_killed_during_acks() {
    const PUSHES: usize = 300;
    const MAX_ROUNDS: usize = 10;
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let redis = OwnRedis::start().await;
    let database = format!("{MYSQL_SERVER}/{}", cluster.database);
    let args = cluster.saver_args(&redis.url(), &database);
    cluster
        .replace_saver("saver-own-redis", &args)
        .await
        .unwrap();
    let admin = cluster.saver.addr("admin");

    let (mut device, _) = cluster.device_at(0, "uwe", "phone").await.unwrap();
    let received: Arc<Mutex<Vec<u64>>> = Arc::default();
    let reader_received = received.clone();
    let reader = tokio::spawn(async move {
        // Receives and acknowledges every push, each ACK a frame of its own.
        let mut seq = 1;
        while let Ok(Some(frame)) = next_frame(&mut device, Duration::from_secs(20)).await {
            if frame.op != Op::Push {
                continue;
            }
            let push = frame.decode::<msg::Push>().unwrap();
            reader_received.lock().unwrap().push(push.msg_id);
            let ack = msg::Ack {
                msg_ids: vec![push.msg_id],
            };
            device.send_frame(Op::Ack, seq, &ack).await.unwrap();
            seq += 1;
        }
    });

    // The device's inbox read at AUTH is done once its first push arrives:
    // the kills are aimed at the acks, not at that read.
    let first = cluster.push(&["uwe"], "first").await.unwrap();
    let started = eventually(Duration::from_secs(10), || async {
        received.lock().unwrap().contains(&first[0])
    })
    .await;
    assert!(started, "the first push arrived");

    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicU64::new(0));
    let killer = {
        let stop = stop.clone();
        let killed = killed.clone();
        let mut connection = redis.connection().await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let count: u64 = redis::cmd("CLIENT")
                    .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"])
                    .query_async(&mut connection)
                    .await
                    .unwrap_or(0);
                killed.fetch_add(count, Ordering::Relaxed);
                // Paces the fault: a CLIENT KILL every 25 ms.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };

    let mut accepted = first;
    let mut refused = 0;
    // Rounds of pushes until a kill has hit an ACK in flight (saver counts
    // it as a retry), at most MAX_ROUNDS: whether one does in a given round
    // is chance, and one round once had none.
    let mut rounds = 0;
    loop {
        rounds += 1;
        for index in 0..PUSHES {
            let (status, body) = cluster
                .call(
                    &cluster.app.api_key,
                    "push",
                    json!({ "users": ["uwe"], "payload": format!("m{rounds}-{index}") }),
                )
                .await;
            if status == 200 {
                accepted.push(
                    body["result"]["messages"][0]["id"]
                        .as_str()
                        .unwrap()
                        .parse::<u64>()
                        .unwrap(),
                );
            } else {
                assert_eq!(status, 503, "{body}");
                refused += 1;
            }
        }
        let retried = metric(admin, "pushgrid_saver_ack_retries_total", "").await > 0.0;
        if retried || rounds == MAX_ROUNDS {
            break;
        }
    }
    let all_received = eventually(Duration::from_secs(30), || async {
        let received: HashSet<u64> = received.lock().unwrap().iter().copied().collect();
        accepted.iter().all(|id| received.contains(id))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    killer.await.unwrap();
    assert!(all_received, "every accepted push reached the device");
    let killed = killed.load(Ordering::Relaxed);
    assert!(killed > 0, "connections were killed during the acks");

    // Every ACK reaches SQL and Redis, retried where a connection died.
    let settled = eventually(Duration::from_secs(30), || async {
        unacked_in_sql(&cluster, "uwe").await.is_empty() && inbox(&cluster, "uwe").await.is_empty()
    })
    .await;
    let unacked = unacked_in_sql(&cluster, "uwe").await;
    assert!(settled, "acked messages left unacked: {unacked:?}");
    reader.abort();
    assert!(
        nothing_arrives(&cluster, "uwe", Duration::from_millis(1500)).await,
        "an acknowledged message was delivered again"
    );
    let received = received.lock().unwrap().len();
    let retries = metric(admin, "pushgrid_saver_ack_retries_total", "").await;
    let owed = metric(admin, "pushgrid_saver_owed", "kind=\"ack\"").await;
    println!(
        "TRUTH acks under CLIENT KILL: rounds of {PUSHES} pushes {rounds}, pushes accepted {}, \
         refused {refused}, received {received}, redis connections killed {killed}, \
         ack retries {retries}, acks owed at the end {owed}, delivered again 0",
        accepted.len()
    );
    assert!(
        retries > 0.0,
        "the kills hit acks (else this test showed nothing)"
    );
    assert_eq!(owed, 0.0);
    cluster.cleanup().await;
}

/// An ACK that MySQL did not take (its connections cut) is kept: the device
/// that reconnects meanwhile does not get the message again, and once MySQL
/// is back the ACK is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_mysql_did_not_take_is_kept_until_it_is_applied() {
    let mut cluster = TestCluster::start(ClusterOptions::default()).await.unwrap();
    let mut proxy = MysqlProxy::start().await;
    let args = cluster.saver_args(REDIS_URL, &proxy.url(&cluster.database));
    cluster.replace_saver("saver-proxied", &args).await.unwrap();
    let admin = cluster.saver.addr("admin");

    let (mut device, _) = cluster.device_at(0, "vera", "phone").await.unwrap();
    let ids = cluster.push(&["vera"], "ack me").await.unwrap();
    let message = next_push(&mut device, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(message.msg_id, ids[0]);

    proxy.cut();
    let ack = msg::Ack {
        msg_ids: vec![ids[0]],
    };
    device.send_frame(Op::Ack, 1, &ack).await.unwrap();
    let owed = eventually(Duration::from_secs(10), || async {
        metric(admin, "pushgrid_saver_owed", "kind=\"ack\"").await >= 1.0
    })
    .await;
    assert!(owed, "the ack is kept while MySQL is away");
    drop(device);
    // A reconnect while the ack is owed: the message is not delivered again.
    assert!(
        nothing_arrives(&cluster, "vera", Duration::from_millis(1500)).await,
        "the acknowledged message came back while its ack was owed"
    );

    proxy.restore().await;
    let applied = eventually(Duration::from_secs(30), || async {
        unacked_in_sql(&cluster, "vera").await.is_empty()
    })
    .await;
    assert!(applied, "the owed ack reached MySQL");
    // The gauge is set after the ack was applied: wait for it too.
    let settled = eventually(Duration::from_secs(10), || async {
        metric(admin, "pushgrid_saver_owed", "kind=\"ack\"").await == 0.0
    })
    .await;
    assert!(settled, "nothing is owed once the ack was applied");
    assert!(nothing_arrives(&cluster, "vera", Duration::from_millis(1000)).await);
    println!("TRUTH ack while mysql cut: owed 1, delivered again 0, applied after restore 1");
    cluster.cleanup().await;
}
