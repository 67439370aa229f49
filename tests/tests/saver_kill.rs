//! The saver's guarantees end to end: separate role processes, the real
//! MariaDB, real devices. What the push API acknowledged reaches the device
//! across a kill -9 of saver, a Redis restarted empty, and a MySQL outage
//! (answered 503, never accepted silently).
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use pushgrid_e2e::faults::{MysqlProxy, OwnRedis};
use pushgrid_e2e::{MYSQL_SERVER, REDIS_URL, TestCluster, eventually, next_push, spawn, wait_for};
use tokio::sync::Mutex;
use tokio::task::JoinSet;

const WAIT: Duration = Duration::from_secs(20);

fn database_url(cluster: &TestCluster) -> String {
    format!("{MYSQL_SERVER}/{}", cluster.database)
}

/// One push through the API: the ids on 200, else the HTTP status.
async fn push(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    users: &[String],
    payload: &str,
    idempotency_key: Option<&str>,
) -> Result<Vec<u64>, u16> {
    let mut body = serde_json::json!({ "users": users, "payload": payload });
    if let Some(key) = idempotency_key {
        body["idempotency_key"] = key.into();
    }
    let response = http
        .post(format!("{url}/api/push"))
        .header("Authorization", format!("apikey {api_key}"))
        .json(&body)
        .send()
        .await
        .map_err(|_| 0u16)?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(status);
    }
    let body: serde_json::Value = response.json().await.map_err(|_| 0u16)?;
    Ok(body["result"]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["id"].as_str().unwrap().parse().unwrap())
        .collect())
}

/// Pushes until one is accepted (a saver may be starting or its lease expiring).
async fn push_until_accepted(cluster: &TestCluster, user: &str, payload: &str) -> u64 {
    let users = vec![user.to_string()];
    wait_for(Duration::from_secs(20), || async {
        push(
            &cluster.http,
            &cluster.center_url(),
            &cluster.app.api_key,
            &users,
            payload,
            None,
        )
        .await
        .ok()
        .map(|ids| ids[0])
    })
    .await
    .expect("no push accepted in 20 s")
}

/// Connects `user` and reads pushes until every id in `expected` arrived.
/// Reconnects when the room closes the connection (a room may still try a
/// killed saver until its lease runs out, and then drops the device).
async fn assert_delivered(cluster: &TestCluster, user: &str, expected: &HashSet<u64>) {
    let mut missing = expected.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut last_error = String::new();
    while !missing.is_empty() && tokio::time::Instant::now() < deadline {
        let mut device = match cluster.device(user).await {
            Ok((device, _)) => device,
            Err(error) => {
                last_error = error.to_string();
                // Backs off before it connects again (within the deadline).
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while !missing.is_empty() {
            match next_push(&mut device, WAIT).await {
                Ok(push) => {
                    missing.remove(&push.msg_id);
                }
                Err(error) => {
                    last_error = error.to_string();
                    // Backs off before it connects again (within the deadline).
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{user}: {} of {} acknowledged messages never arrived ({last_error})",
        missing.len(),
        expected.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_push_is_delivered_after_saver_is_killed_mid_stream() {
    const PUSHES: usize = 10_000;
    const USERS: usize = 200;
    const CONCURRENCY: usize = 32;
    let mut cluster = TestCluster::start(Default::default()).await.unwrap();
    let acknowledged: Arc<Mutex<HashMap<String, HashSet<u64>>>> = Arc::default();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut pushers = JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (http, url, key) = (
            cluster.http.clone(),
            cluster.center_url(),
            cluster.app.api_key.clone(),
        );
        let (acknowledged, next) = (acknowledged.clone(), next.clone());
        pushers.spawn(async move {
            let mut refused = 0u32;
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= PUSHES {
                    return refused;
                }
                let user = format!("k{}", index % USERS);
                let users = vec![user.clone()];
                match push(&http, &url, &key, &users, &format!("m{index}"), None).await {
                    Ok(ids) => {
                        acknowledged
                            .lock()
                            .await
                            .entry(user)
                            .or_default()
                            .insert(ids[0]);
                    }
                    // Refused while saver is down: the caller knows, nothing is promised.
                    Err(_) => {
                        refused += 1;
                        // Paces the load while saver is down.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        });
    }

    // kill -9 once a good part of the stream is through, then start it again.
    let through = eventually(Duration::from_secs(60), || async {
        next.load(std::sync::atomic::Ordering::Relaxed) >= PUSHES / 3
    })
    .await;
    assert!(through, "a third of the pushes went through");
    let pid = cluster.saver.pid();
    cluster.saver.kill().await;
    // saver stays down a moment (the fault's length) before it starts again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let args = cluster.saver_args(REDIS_URL, &database_url(&cluster));
    cluster.saver = spawn(&cluster.dir, "saver2", "saver", &args).await.unwrap();
    assert_ne!(cluster.saver.pid(), pid);

    let mut refused = 0;
    while let Some(result) = pushers.join_next().await {
        refused += result.unwrap();
    }
    let acknowledged = acknowledged.lock().await.clone();
    let total: usize = acknowledged.values().map(HashSet::len).sum();
    assert!(total > PUSHES / 3, "only {total} pushes were accepted");
    assert_eq!(total + refused as usize, PUSHES);
    eprintln!("{total} pushes acknowledged, {refused} refused while saver was down");

    // Every device connects after the fact and gets all of its acknowledged pushes.
    let mut devices = JoinSet::new();
    let cluster = Arc::new(cluster);
    for (user, ids) in acknowledged {
        let cluster = cluster.clone();
        devices.spawn(async move { assert_delivered(&cluster, &user, &ids).await });
        while devices.len() >= 20 {
            devices.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(result) = devices.join_next().await {
        result.unwrap();
    }
    Arc::into_inner(cluster).unwrap().cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_come_back_from_mysql_when_redis_restarts_empty() {
    let mut cluster = TestCluster::start(Default::default()).await.unwrap();
    let mut redis = OwnRedis::start().await;
    let args = cluster.saver_args(&redis.url(), &database_url(&cluster));
    cluster
        .replace_saver("saver-own-redis", &args)
        .await
        .unwrap();

    let mut expected = HashSet::new();
    expected.insert(push_until_accepted(&cluster, "rita", "before-0").await);
    for index in 1..50 {
        expected.insert(push_until_accepted(&cluster, "rita", &format!("before-{index}")).await);
    }
    // One message is acked: it must not come back.
    let acked = push_until_accepted(&cluster, "sam", "acked").await;
    {
        let (mut device, _) = cluster.device("sam").await.unwrap();
        let push = next_push(&mut device, WAIT).await.unwrap();
        assert_eq!(push.msg_id, acked);
        device
            .send_frame(
                pushgrid_client::Op::Ack,
                1,
                &pushgrid_client::msg::Ack {
                    msg_ids: vec![acked],
                },
            )
            .await
            .unwrap();
        let pool = cluster.mysql().await.unwrap();
        assert!(
            pushgrid_e2e::eventually(WAIT, || async {
                sqlx::query("SELECT 1 FROM messages WHERE id = ? AND acked_ms IS NOT NULL")
                    .bind(acked as i64)
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
                    .is_some()
            })
            .await
        );
    }

    redis.restart_empty().await;
    // Pushes after the restart join the recovered inbox.
    expected.insert(push_until_accepted(&cluster, "rita", "after").await);
    assert_delivered(&cluster, "rita", &expected).await;
    let late = push_until_accepted(&cluster, "sam", "late").await;
    let (mut device, _) = cluster.device("sam").await.unwrap();
    let push = next_push(&mut device, WAIT).await.unwrap();
    assert_eq!(push.msg_id, late, "the acked message came back");
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_503_while_mysql_is_down_and_recovers() {
    let mut cluster = TestCluster::start(Default::default()).await.unwrap();
    let mut proxy = MysqlProxy::start().await;
    let through_proxy = format!("mysql://root@{}/{}", proxy.addr, cluster.database);
    let args = cluster.saver_args(REDIS_URL, &through_proxy);
    cluster.replace_saver("saver-proxied", &args).await.unwrap();
    let mut expected = HashSet::new();
    expected.insert(push_until_accepted(&cluster, "tess", "before").await);

    proxy.cut();
    let users = vec!["tess".to_string()];
    let mut statuses = Vec::new();
    for index in 0..5 {
        let answer = push(
            &cluster.http,
            &cluster.center_url(),
            &cluster.app.api_key,
            &users,
            &format!("during-{index}"),
            None,
        )
        .await;
        match answer {
            Ok(ids) => panic!("push accepted while mysql was down: {ids:?}"),
            Err(status) => statuses.push(status),
        }
    }
    assert!(statuses.iter().all(|status| *status == 503), "{statuses:?}");

    proxy.restore().await;
    expected.insert(push_until_accepted(&cluster, "tess", "after").await);
    assert_delivered(&cluster, "tess", &expected).await;
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_retried_push_return_the_first_ids() {
    let cluster = TestCluster::start(Default::default()).await.unwrap();
    let users = vec!["uma".to_string(), "vic".to_string()];
    let url = cluster.center_url();
    let push_with_key = |key: &'static str| {
        push(
            &cluster.http,
            &url,
            &cluster.app.api_key,
            &users,
            "pay once",
            Some(key),
        )
    };
    let first = push_with_key("invoice-7").await.unwrap();
    assert_eq!(first.len(), 2);
    let retried = push_with_key("invoice-7").await.unwrap();
    assert_eq!(retried, first);
    let other = push_with_key("invoice-8").await.unwrap();
    assert_ne!(other, first);
    let pool = cluster.mysql().await.unwrap();
    let stored: i64 = sqlx::Row::try_get(
        &sqlx::query("SELECT COUNT(*) AS n FROM messages WHERE user_id = 'uma'")
            .fetch_one(&pool)
            .await
            .unwrap(),
        "n",
    )
    .unwrap();
    assert_eq!(stored, 2, "the retry stored a second message");
    pool.close().await;
    cluster.cleanup().await;
}
