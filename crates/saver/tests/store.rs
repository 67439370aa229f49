//! The same store tests against real services: SqlStore on SQLite, SqlStore on
//! MariaDB, and RedisSqlStore on Redis + MariaDB. Each test gets its own app id
//! (and its own SQLite file or MySQL database), so tests run in parallel.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, DeliveryReport, Message, StoreItem};
use pushgrid_saver::error::StoreError;
use pushgrid_saver::store::{
    Durability, GroupCommitConfig, HistoryQuery, MessageIds, MessageStore, PendingRead,
    RedisSqlStore, SqlStore, StoreLimits,
};
use sqlx::{AnyPool, Row};

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Mysql,
    RedisMysql,
    /// `durability = "redis"`: answered after Redis, SQL written behind.
    RedisFirst,
    /// A local 3-node Redis Cluster started for the test.
    RedisCluster,
}

impl Backend {
    fn has_redis(self) -> bool {
        matches!(
            self,
            Backend::RedisMysql | Backend::RedisFirst | Backend::RedisCluster
        )
    }
}

/// Three `redis-server --cluster-enabled yes` processes joined into a
/// cluster; killed when dropped. Ports are tried at random until three bind.
struct RedisCluster {
    servers: Vec<Child>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    fn start() -> anyhow::Result<RedisCluster> {
        let dir = std::env::temp_dir().join(random_name("pg_rc_"));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = RedisCluster {
            servers: Vec::new(),
            ports: Vec::new(),
            dir,
        };
        while cluster.ports.len() < 3 {
            // The cluster bus listens on port + 10000.
            let port = 20_000 + (rand::random::<u16>() % 30_000);
            let node_dir = cluster.dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir)?;
            let mut child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .args(["--cluster-node-timeout", "5000"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut up = false;
            for _ in 0..50 {
                std::thread::sleep(Duration::from_millis(20));
                if child.try_wait()?.is_some() {
                    break; // the port was taken
                }
                let ping = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "ping"])
                    .output()?;
                if String::from_utf8_lossy(&ping.stdout).contains("PONG") {
                    up = true;
                    break;
                }
            }
            if up {
                cluster.servers.push(child);
                cluster.ports.push(port);
            } else {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let nodes: Vec<String> = cluster
            .ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&nodes)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        // Wait until every node agrees the cluster is up.
        for port in &cluster.ports {
            let mut ok = false;
            for _ in 0..100 {
                let info = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "cluster", "info"])
                    .output()?;
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    ok = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            anyhow::ensure!(ok, "redis cluster node {port} never became ok");
        }
        Ok(cluster)
    }

    fn url(&self) -> String {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Harness {
    backend: Backend,
    store: Box<dyn MessageStore>,
    pool: AnyPool,
    app: String,
    cleanup: Cleanup,
    redis_url: String,
    _cluster: Option<RedisCluster>,
}

enum Cleanup {
    Directory(std::path::PathBuf),
    Database(String),
}

fn random_name(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

impl Harness {
    async fn new(backend: Backend, limits: StoreLimits) -> anyhow::Result<Harness> {
        let (url, cleanup) = match backend {
            Backend::Sqlite => {
                let dir = std::env::temp_dir().join(random_name("pg_saver_"));
                (
                    format!("sqlite://{}", dir.join("saver.db").display()),
                    Cleanup::Directory(dir),
                )
            }
            _ => {
                let database = random_name("pg_saver_");
                (
                    format!("{MYSQL_SERVER}/{database}"),
                    Cleanup::Database(database),
                )
            }
        };
        let ids = MessageIds::fixed(rand::random::<u32>() % 1024);
        let sql = SqlStore::connect(&url)
            .await?
            .with_limits(limits)
            .with_ids(ids)
            .with_group_commit(GroupCommitConfig::default());
        let pool = sql.pool().clone();
        let cluster = if backend == Backend::RedisCluster {
            Some(tokio::task::spawn_blocking(RedisCluster::start).await??)
        } else {
            None
        };
        let redis_url = cluster
            .as_ref()
            .map_or_else(|| REDIS_URL.to_string(), RedisCluster::url);
        let store: Box<dyn MessageStore> = match backend {
            Backend::RedisMysql | Backend::RedisCluster => {
                Box::new(RedisSqlStore::connect(&redis_url, sql).await?)
            }
            Backend::RedisFirst => Box::new(
                RedisSqlStore::connect(&redis_url, sql)
                    .await?
                    .with_durability(Durability::Redis),
            ),
            _ => Box::new(sql),
        };
        Ok(Harness {
            backend,
            store,
            pool,
            app: random_name("app"),
            cleanup,
            redis_url,
            _cluster: cluster,
        })
    }

    async fn store(&self, users: &[&str], payload: &str) -> anyhow::Result<Vec<Message>> {
        let users: Vec<String> = users.iter().map(|user| user.to_string()).collect();
        let stored = self
            .store
            .store(&self.app, &users, Bytes::from(payload.to_string()), 0)
            .await?;
        self.settle().await;
        Ok(stored)
    }

    async fn pending(&self, user: &str) -> anyhow::Result<Vec<Message>> {
        Ok(self.store.pending(&self.app, user, 0).await?)
    }

    async fn ack(&self, user: &str, ids: &[u64]) -> anyhow::Result<u64> {
        let item = AckItem {
            app: self.app.clone(),
            user: user.into(),
            msg_ids: ids.to_vec(),
            ..AckItem::default()
        };
        Ok(self.store.ack(vec![item]).await?)
    }

    /// Deletes keys of one hash tag, on a single Redis or the test's cluster.
    async fn redis_del(&self, keys: &[String]) -> anyhow::Result<u32> {
        if self.backend == Backend::RedisCluster {
            let nodes: Vec<&str> = self.redis_url.split(',').collect();
            let client = redis::cluster::ClusterClient::new(nodes)?;
            let mut redis = client.get_async_connection().await?;
            return Ok(redis::cmd("DEL").arg(keys).query_async(&mut redis).await?);
        }
        let client = redis::Client::open(self.redis_url.as_str())?;
        let mut redis = client.get_multiplexed_async_connection().await?;
        Ok(redis::cmd("DEL").arg(keys).query_async(&mut redis).await?)
    }

    /// Waits for the SQL copy written behind (`durability = "redis"`).
    async fn settle(&self) {
        if self.backend == Backend::RedisFirst {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `acked_ms` of a message as the durable copy has it.
    async fn acked_ms_in_sql(&self, id: u64) -> anyhow::Result<Option<i64>> {
        let row = sqlx::query("SELECT acked_ms FROM messages WHERE id = ?")
            .bind(id as i64)
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("acked_ms")?)
    }

    /// Unacked, unexpired rows of a user in SQL: what a recovery would deliver.
    async fn live_rows_in_sql(&self, user: &str) -> anyhow::Result<i64> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM messages WHERE app = ? AND user_id = ? AND acked_ms IS NULL AND expires_ms > ?",
        )
        .bind(self.app.clone())
        .bind(user.to_string())
        .bind(now_ms() as i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("n")?)
    }

    async fn finish(self) {
        match &self.cleanup {
            Cleanup::Directory(dir) => {
                self.pool.close().await;
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Database(database) => {
                let drop = format!("DROP DATABASE IF EXISTS `{database}`");
                let _ = sqlx::query(sqlx::AssertSqlSafe(drop))
                    .execute(&self.pool)
                    .await;
                self.pool.close().await;
            }
        }
    }
}

fn payloads(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect()
}

fn ids(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|message| message.id).collect()
}

fn limits() -> StoreLimits {
    // Short key lifetimes so test keys leave Redis within the hour.
    StoreLimits {
        max_inbox: 1000,
        default_ttl_secs: 600,
        max_ttl_secs: 3600,
        ..StoreLimits::default()
    }
}

// ------------------------------------------------------------------ tests

async fn store_then_pending_in_order(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let first = harness.store(&["alice"], "one").await?;
    let fanned = harness.store(&["bob", "alice", "carol"], "two").await?;
    let third = harness.store(&["alice"], "three").await?;

    // One message per user, in request order, with fresh increasing ids.
    assert_eq!(
        fanned
            .iter()
            .map(|message| message.user.as_str())
            .collect::<Vec<_>>(),
        ["bob", "alice", "carol"]
    );
    assert!(
        fanned
            .iter()
            .all(|message| message.app == harness.app && &message.payload[..] == b"two")
    );
    assert!(
        fanned
            .iter()
            .all(|message| message.expires_ms == message.created_ms + 600_000)
    );

    let pending = harness.pending("alice").await?;
    assert_eq!(payloads(&pending), ["one", "two", "three"]);
    assert_eq!(ids(&pending), [first[0].id, fanned[1].id, third[0].id]);
    assert!(ids(&pending).windows(2).all(|pair| pair[0] < pair[1]));
    let stored = &fanned[1];
    let served = &pending[1];
    assert_eq!(
        (served.user.as_str(), served.created_ms, served.expires_ms),
        ("alice", stored.created_ms, stored.expires_ms)
    );

    assert_eq!(payloads(&harness.pending("bob").await?), ["two"]);
    assert!(harness.pending("nobody").await?.is_empty());

    // The limit cuts from the oldest end.
    let two = harness.store.pending(&harness.app, "alice", 2).await?;
    assert_eq!(payloads(&two), ["one", "two"]);
    Ok(harness)
}

async fn ack_removes_from_pending_and_marks_sql(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let mut stored = Vec::new();
    for payload in ["a", "b", "c"] {
        stored.extend(harness.store(&["dave"], payload).await?);
    }
    let other = harness.store(&["erin"], "e").await?;
    let before_ack = now_ms() as i64;

    // Another user's id and a repeat are not counted.
    assert_eq!(
        harness
            .ack(
                "dave",
                &[stored[0].id, stored[1].id, stored[1].id, other[0].id]
            )
            .await?,
        2
    );
    assert_eq!(payloads(&harness.pending("dave").await?), ["c"]);
    assert_eq!(payloads(&harness.pending("erin").await?), ["e"]);

    let acked_ms = harness
        .acked_ms_in_sql(stored[0].id)
        .await?
        .expect("acked_ms set");
    assert!(acked_ms >= before_ack && acked_ms <= now_ms() as i64);
    assert!(harness.acked_ms_in_sql(stored[1].id).await?.is_some());
    assert_eq!(harness.acked_ms_in_sql(stored[2].id).await?, None);
    assert_eq!(harness.acked_ms_in_sql(other[0].id).await?, None);

    // Acking again changes nothing.
    assert_eq!(harness.ack("dave", &[stored[0].id, u64::MAX]).await?, 0);
    assert_eq!(harness.acked_ms_in_sql(stored[0].id).await?, Some(acked_ms));
    assert_eq!(harness.ack("dave", &[stored[2].id]).await?, 1);
    assert!(harness.pending("dave").await?.is_empty());
    Ok(harness)
}

/// An ACK that carries its hand-off time (the room folded the hand-off
/// record into it) writes the device's status row once, with both times; an
/// ACK without one takes its own time for both; a later ACK changes nothing.
async fn an_ack_records_its_hand_off_time(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let stored = harness.store(&["fay"], "f").await?;
    let id = stored[0].id;
    let handed_ms = now_ms() - 5_000;
    let report = DeliveryReport {
        app: harness.app.clone(),
        msg_id: id,
        device: "fay-tablet".into(),
        user: "fay".into(),
        at_ms: handed_ms - 1,
        ..DeliveryReport::default()
    };
    harness.store.record_deliveries(&[report]).await?;
    let acks = vec![
        AckItem {
            app: harness.app.clone(),
            user: "fay".into(),
            msg_ids: vec![id],
            device: "fay-phone".into(),
            delivered_ms: vec![handed_ms],
        },
        AckItem {
            app: harness.app.clone(),
            user: "fay".into(),
            msg_ids: vec![id],
            device: "fay-watch".into(),
            delivered_ms: Vec::new(),
        },
    ];
    let before_ack = now_ms();
    assert_eq!(harness.store.ack(acks.clone()).await?, 1);
    harness.store.record_acks(&acks).await?;
    let again = AckItem {
        delivered_ms: vec![handed_ms + 1],
        ..acks[0].clone()
    };
    harness.store.record_acks(&[again]).await?;

    let status = harness.store.message_status(&harness.app, id).await?;
    assert_eq!(status.state, "acked");
    let device = |name: &str| {
        status
            .devices
            .iter()
            .find(|device| device.device == name)
            .unwrap_or_else(|| panic!("no row of {name}: {status:?}"))
            .clone()
    };
    let phone = device("fay-phone");
    assert_eq!(phone.state, "acked");
    assert_eq!(
        phone.delivered_ms, handed_ms,
        "the hand-off time the ACK carried"
    );
    assert!(phone.acked_ms >= before_ack && phone.acked_ms <= now_ms());
    let watch = device("fay-watch");
    assert_eq!(watch.state, "acked");
    assert_eq!(
        watch.delivered_ms, watch.acked_ms,
        "no hand-off time: the ACK's"
    );
    let tablet = device("fay-tablet");
    assert_eq!(tablet.state, "delivered");
    assert_eq!(tablet.delivered_ms, handed_ms - 1);
    assert_eq!(tablet.acked_ms, 0);
    Ok(harness)
}

async fn expired_messages_are_not_pending(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let users = vec!["frank".to_string()];
    harness
        .store
        .store(&harness.app, &users, Bytes::from_static(b"short"), 1)
        .await?;
    harness.store(&["frank"], "long").await?;
    // A TTL above the maximum is cut to it.
    let capped = harness
        .store
        .store(
            &harness.app,
            &users,
            Bytes::from_static(b"capped"),
            u32::MAX,
        )
        .await?;
    assert_eq!(capped[0].expires_ms, capped[0].created_ms + 3_600_000);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        payloads(&harness.pending("frank").await?),
        ["long", "capped"]
    );
    Ok(harness)
}

async fn a_full_inbox_drops_the_oldest(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(
        backend,
        StoreLimits {
            max_inbox: 3,
            ..limits()
        },
    )
    .await?;
    for payload in ["1", "2", "3", "4"] {
        harness.store(&["grace"], payload).await?;
    }
    harness.store(&["grace", "heidi"], "5").await?;
    assert_eq!(payloads(&harness.pending("grace").await?), ["3", "4", "5"]);
    assert_eq!(payloads(&harness.pending("heidi").await?), ["5"]);
    // The durable copy agrees, so a recovery does not bring the dropped back.
    assert_eq!(harness.live_rows_in_sql("grace").await?, 3);
    Ok(harness)
}

async fn invalid_input_is_rejected(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let store = &harness.store;
    let app = harness.app.as_str();
    let ok_users = vec!["ivan".to_string()];
    let payload = Bytes::from_static(b"x");

    let expect_invalid = |result: Result<_, StoreError>, needle: &str| match result {
        Err(StoreError::InvalidArgument(message)) => {
            assert!(
                message.contains(needle),
                "{message:?} should mention {needle:?}"
            );
            let status: tonic::Status = StoreError::InvalidArgument(message).into();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
        }
        Err(other) => panic!("expected invalid argument about {needle}, got {other}"),
        Ok(_) => panic!("expected invalid argument about {needle}, got success"),
    };

    expect_invalid(
        store
            .store("", &ok_users, payload.clone(), 0)
            .await
            .map(drop),
        "app",
    );
    expect_invalid(
        store
            .store("a:b", &ok_users, payload.clone(), 0)
            .await
            .map(drop),
        "app",
    );
    expect_invalid(
        store
            .store(app, &["".to_string()], payload.clone(), 0)
            .await
            .map(drop),
        "user",
    );
    expect_invalid(
        store
            .store(app, &["u".repeat(256)], payload.clone(), 0)
            .await
            .map(drop),
        "user",
    );
    let too_big = Bytes::from(vec![7u8; 64 * 1024 + 1]);
    expect_invalid(
        store.store(app, &ok_users, too_big, 0).await.map(drop),
        "payload",
    );
    expect_invalid(store.pending(app, "", 0).await.map(drop), "user");
    expect_invalid(store.pending("", "ivan", 0).await.map(drop), "app");
    let bad_ack = AckItem {
        app: app.into(),
        user: String::new(),
        msg_ids: vec![1],
        ..AckItem::default()
    };
    expect_invalid(store.ack(vec![bad_ack]).await.map(drop), "user");
    // Nothing was stored by the rejected calls.
    assert!(harness.pending("ivan").await?.is_empty());

    // The limits themselves are accepted.
    let largest = Bytes::from(vec![7u8; 64 * 1024]);
    let longest_user = "u".repeat(255);
    let stored = store
        .store(app, std::slice::from_ref(&longest_user), largest.clone(), 0)
        .await?;
    let pending = store.pending(app, &longest_user, 0).await?;
    assert_eq!(ids(&pending), ids(&stored));
    assert_eq!(pending[0].payload, largest);
    Ok(harness)
}

async fn attempts_count_each_pending(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let stored = harness.store(&["judy"], "a").await?;
    harness.store(&["judy"], "b").await?;
    assert_eq!(stored[0].attempts, 0);
    let attempts = |messages: Vec<Message>| {
        messages
            .iter()
            .map(|message| message.attempts)
            .collect::<Vec<_>>()
    };
    assert_eq!(attempts(harness.pending("judy").await?), [1, 1]);
    assert_eq!(attempts(harness.pending("judy").await?), [2, 2]);
    harness.ack("judy", &[stored[0].id]).await?;
    assert_eq!(attempts(harness.pending("judy").await?), [3]);
    Ok(harness)
}

/// Redis lost its data (restart without persistence): Pending finds the inbox
/// in SQL again, without the acked or dropped messages.
/// PendingMany: one answer per read, in order; a cold inbox (its Redis keys
/// gone) comes back from SQL with the others; a bad read fails alone.
async fn many_inboxes_are_read_at_once(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let one = harness.store(&["ann", "ben"], "one").await?;
    let two = harness.store(&["ann"], "two").await?;
    // ann's inbox is served warm first; ben's is lost from Redis.
    assert_eq!(payloads(&harness.pending("ann").await?), ["one", "two"]);
    if harness.backend.has_redis() {
        let tag = format!("pg:{{{}:ben}}", harness.app);
        let keys: Vec<String> = ["inbox", "msgs", "att", "warm"]
            .iter()
            .map(|suffix| format!("{tag}:{suffix}"))
            .collect();
        // Never read yet: only the inbox and the bodies exist.
        assert_eq!(harness.redis_del(&keys).await?, 2);
    }
    let read = |user: &str, limit: u32| PendingRead {
        app: harness.app.clone(),
        user: user.to_string(),
        limit,
    };
    let reads = [
        read("ben", 0),
        read("", 0),
        read("nobody", 0),
        read("ann", 1),
        read("ann", 0),
    ];
    let answers = harness.store.pending_many(&reads).await;
    assert_eq!(answers.len(), 5, "one answer per read");
    let ben = answers[0].as_ref().expect("ben's inbox");
    assert_eq!(ids(ben), [one[1].id], "from SQL when Redis lost it");
    assert!(
        matches!(&answers[1], Err(StoreError::InvalidArgument(_))),
        "an empty user fails alone: {:?}",
        answers[1]
    );
    assert!(answers[2].as_ref().expect("empty inbox").is_empty());
    assert_eq!(ids(answers[3].as_ref().expect("limited")), [one[0].id]);
    assert_eq!(
        ids(answers[4].as_ref().expect("ann's inbox")),
        [one[0].id, two[0].id]
    );
    Ok(harness)
}

async fn a_lost_redis_inbox_is_reloaded_from_sql(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(
        backend,
        StoreLimits {
            max_inbox: 3,
            ..limits()
        },
    )
    .await?;
    let mut stored = Vec::new();
    for payload in ["1", "2", "3", "4"] {
        stored.extend(harness.store(&["kim"], payload).await?);
    }
    harness.ack("kim", &[stored[3].id]).await?;
    harness.store(&["kim"], "5").await?;
    assert_eq!(payloads(&harness.pending("kim").await?), ["2", "3", "5"]);
    if harness.backend.has_redis() {
        let tag = format!("pg:{{{}:kim}}", harness.app);
        let keys: Vec<String> = ["inbox", "msgs", "att", "warm"]
            .iter()
            .map(|suffix| format!("{tag}:{suffix}"))
            .collect();
        let deleted: u32 = harness.redis_del(&keys).await?;
        assert_eq!(deleted, 4);
    }
    let pending = harness.pending("kim").await?;
    assert_eq!(payloads(&pending), ["2", "3", "5"]);
    // Attempts come back from the durable copy only in SQL mode; Redis counts its own.
    assert!(pending.iter().all(|message| message.attempts >= 1));
    Ok(harness)
}

/// A message delivered `max_attempts` times without an ACK leaves the inbox
/// for the dead letters on the next delivery, and never comes back.
async fn unacked_messages_end_in_dead_letters(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(
        backend,
        StoreLimits {
            max_attempts: 3,
            ..limits()
        },
    )
    .await?;
    let looping = harness.store(&["lena"], "loops").await?;
    for attempt in 1..=3 {
        let pending = harness.pending("lena").await?;
        assert_eq!(payloads(&pending)[0], "loops");
        assert_eq!(pending[0].attempts, attempt);
        if attempt == 2 {
            // A newer message joins; it has its own count.
            harness.store(&["lena"], "fresh").await?;
        }
    }
    // Fourth delivery: the first message goes to the dead letters instead.
    let pending = harness.pending("lena").await?;
    assert_eq!(payloads(&pending), ["fresh"]);
    assert_eq!(pending[0].attempts, 2);
    let row = sqlx::query(
        "SELECT COUNT(*) AS n, MIN(id) AS id, MIN(attempts) AS attempts FROM dead_letters WHERE app = ?",
    )
    .bind(harness.app.clone())
    .fetch_one(&harness.pool)
    .await?;
    assert_eq!(row.try_get::<i64, _>("n")?, 1);
    assert_eq!(row.try_get::<i64, _>("id")?, looping[0].id as i64);
    assert_eq!(row.try_get::<i64, _>("attempts")?, 3);
    // Not recoverable from SQL either: only "fresh" is live there.
    assert_eq!(harness.live_rows_in_sql("lena").await?, 1);
    assert_eq!(payloads(&harness.pending("lena").await?), ["fresh"]);
    Ok(harness)
}

/// The same idempotency key returns the first call's ids and stores nothing new.
async fn an_idempotency_key_stores_once(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let users = vec!["mia".to_string(), "ned".to_string()];
    let payload = Bytes::from_static(b"once");
    let first = harness
        .store
        .store_once(&harness.app, &users, payload.clone(), 0, "order-42")
        .await?;
    assert!(!first.replayed);
    assert_eq!(first.messages.len(), 2);
    harness.settle().await;
    // Even with another payload and users, the key answers the first call.
    let again = harness
        .store
        .store_once(
            &harness.app,
            &users[..1],
            Bytes::from_static(b"x"),
            0,
            "order-42",
        )
        .await?;
    assert!(again.replayed);
    assert_eq!(ids(&again.messages), ids(&first.messages));
    // Concurrent retries agree too.
    let retries = futures::future::join_all((0..8).map(|_| {
        harness
            .store
            .store_once(&harness.app, &users, payload.clone(), 0, "order-42")
    }))
    .await;
    for retry in retries {
        assert_eq!(ids(&retry?.messages), ids(&first.messages));
    }
    // Another key (or none) is a new push.
    let other = harness
        .store
        .store_once(&harness.app, &users, payload.clone(), 0, "order-43")
        .await?;
    assert!(!other.replayed);
    harness.settle().await;
    assert_eq!(payloads(&harness.pending("mia").await?), ["once", "once"]);
    assert_eq!(harness.live_rows_in_sql("ned").await?, 2);
    // Keys are per app.
    let elsewhere = harness
        .store
        .store_once(&format!("{}b", harness.app), &users, payload, 0, "order-42")
        .await?;
    assert!(!elsewhere.replayed);
    Ok(harness)
}

/// A device that missed broadcasts gets them back in order while the stream
/// covers its offset, and `recovered = false` once it does not.
async fn broadcast_history_recovers_or_says_not(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(
        backend,
        StoreLimits {
            stream_max_len: 5,
            ..limits()
        },
    )
    .await?;
    let app = harness.app.clone();
    let publish = |topic: &'static str, text: String| {
        let app = app.clone();
        let store = &harness.store;
        async move { store.publish(&app, topic, Bytes::from(text)).await }
    };
    let history = |topic: &str, since_offset: u64, epoch: u64| HistoryQuery {
        app: harness.app.clone(),
        topic: topic.into(),
        since_offset,
        epoch,
        limit: 0,
    };

    // A first subscription: nothing to recover, the current position.
    let empty = harness.store.history(history("news", 0, 0)).await?;
    assert!(empty.recovered && empty.messages.is_empty());
    assert_eq!(empty.offset, 0);

    let first = publish("news", "n1".into()).await?;
    assert_eq!(first.offset, 1);
    assert!(first.epoch > 0);
    for index in 2..=4 {
        let message = publish("news", format!("n{index}")).await?;
        assert_eq!((message.offset, message.epoch), (index, first.epoch));
    }
    // Topics are separate streams; "" is "all".
    let everyone = publish("", "a1".into()).await?;
    assert_eq!((everyone.offset, everyone.topic.as_str()), (1, "all"));

    // Recovered: the device saw offset 1, gets 2..4 in order.
    let missed = harness
        .store
        .history(history("news", 1, first.epoch))
        .await?;
    assert!(missed.recovered);
    assert_eq!(
        missed.messages.iter().map(|m| m.offset).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(payloads_of(&missed.messages), ["n2", "n3", "n4"]);
    assert_eq!((missed.offset, missed.epoch), (4, first.epoch));
    // Up to date.
    let current = harness
        .store
        .history(history("news", 4, first.epoch))
        .await?;
    assert!(current.recovered && current.messages.is_empty());
    // Paged with a limit.
    let mut paged = history("news", 0, first.epoch);
    paged.limit = 2;
    let page = harness.store.history(paged).await?;
    assert!(page.recovered);
    assert_eq!(payloads_of(&page.messages), ["n1", "n2"]);

    // Not recoverable: another epoch...
    let stale_epoch = harness
        .store
        .history(history("news", 1, first.epoch + 1))
        .await?;
    assert!(!stale_epoch.recovered && stale_epoch.messages.is_empty());
    assert_eq!((stale_epoch.offset, stale_epoch.epoch), (4, first.epoch));
    // ...or the history is gone: the stream keeps 5 entries, offsets 4..8 after 8.
    for index in 5..=8 {
        publish("news", format!("n{index}")).await?;
    }
    let trimmed = harness
        .store
        .history(history("news", 1, first.epoch))
        .await?;
    assert!(!trimmed.recovered && trimmed.messages.is_empty());
    assert_eq!(trimmed.offset, 8);
    let kept = harness
        .store
        .history(history("news", 3, first.epoch))
        .await?;
    assert!(kept.recovered);
    assert_eq!(payloads_of(&kept.messages), ["n4", "n5", "n6", "n7", "n8"]);
    Ok(harness)
}

fn payloads_of(messages: &[pushgrid_proto::cluster::BroadcastMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|message| String::from_utf8_lossy(&message.payload).into_owned())
        .collect()
}

/// Statements are written for a power of two rows (the rest padded): a
/// batch of every size is stored once per item, in SQL too, and acked once
/// per message, whatever the padding repeats.
async fn batches_of_every_size_are_stored_and_acked_once(
    backend: Backend,
) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    for size in [1usize, 2, 3, 5, 7, 8, 9, 17] {
        let user = format!("batch{size}");
        let items: Vec<StoreItem> = (0..size)
            .map(|index| StoreItem {
                app: harness.app.clone(),
                user: user.clone(),
                payload: Bytes::from(format!("{size}-{index}")),
                ttl_secs: 0,
            })
            .collect();
        let stored = harness.store.store_many(&items).await?;
        harness.settle().await;
        assert_eq!(stored.len(), size);
        assert_eq!(harness.pending(&user).await?.len(), size, "batch of {size}");
        assert_eq!(
            harness.live_rows_in_sql(&user).await?,
            size as i64,
            "batch of {size}"
        );
        assert_eq!(
            harness.ack(&user, &ids(&stored)).await?,
            size as u64,
            "batch of {size}"
        );
        assert!(harness.pending(&user).await?.is_empty(), "batch of {size}");
        assert_eq!(harness.live_rows_in_sql(&user).await?, 0, "batch of {size}");
    }
    Ok(harness)
}

/// One StoreMany call: each item keeps its own user, payload and TTL, ids
/// increase in item order, every message is pending (and durable in SQL);
/// one bad item fails the call and stores nothing.
async fn store_many_keeps_each_items_payload_and_ttl(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let item = |user: &str, payload: &str, ttl_secs: u32| StoreItem {
        app: harness.app.clone(),
        user: user.into(),
        payload: Bytes::from(payload.to_string()),
        ttl_secs,
    };
    let items = vec![
        item("ann", "a1", 0),
        item("ben", "b1", 60),
        item("ann", "a2", 120),
    ];
    let stored = harness.store.store_many(&items).await?;
    harness.settle().await;
    assert_eq!(
        stored
            .iter()
            .map(|message| (
                message.user.as_str(),
                message.expires_ms - message.created_ms
            ))
            .collect::<Vec<_>>(),
        [("ann", 600_000), ("ben", 60_000), ("ann", 120_000)]
    );
    assert_eq!(payloads(&stored), ["a1", "b1", "a2"]);
    assert!(ids(&stored).windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(payloads(&harness.pending("ann").await?), ["a1", "a2"]);
    assert_eq!(payloads(&harness.pending("ben").await?), ["b1"]);
    assert_eq!(harness.live_rows_in_sql("ann").await?, 2);

    let bad = vec![item("cid", "ok", 0), item("", "no user", 0)];
    match harness.store.store_many(&bad).await {
        Err(StoreError::InvalidArgument(message)) => assert!(message.contains("user"), "{message}"),
        other => panic!("an empty user was accepted: {other:?}"),
    }
    assert!(
        harness.pending("cid").await?.is_empty(),
        "a failed call stored a message"
    );
    Ok(harness)
}

/// Many concurrent Store calls share group commits; each one's messages are
/// all durable and pending when it answers.
async fn concurrent_stores_are_all_durable(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let calls = futures::future::join_all((0..200).map(|index| {
        let users = vec![format!("u{}", index % 10), "olga".to_string()];
        let payload = Bytes::from(format!("m{index}"));
        let store = &harness.store;
        let app = harness.app.clone();
        async move { store.store(&app, &users, payload, 0).await }
    }))
    .await;
    let mut stored = 0;
    for call in calls {
        stored += call?.len();
    }
    assert_eq!(stored, 400);
    harness.settle().await;
    assert_eq!(harness.live_rows_in_sql("olga").await?, 200);
    assert_eq!(harness.live_rows_in_sql("u3").await?, 20);
    let pending = harness.store.pending(&harness.app, "olga", 1000).await?;
    assert_eq!(pending.len(), 200);
    assert!(ids(&pending).windows(2).all(|pair| pair[0] < pair[1]));
    Ok(harness)
}

/// Concurrent publishes to two topics (on SQL they share transactions):
/// each topic's offsets are 1..=n, each given once, in one epoch, and the
/// stream holds each answer's payload at its offset.
async fn concurrent_publishes_get_every_offset_once(backend: Backend) -> anyhow::Result<Harness> {
    let harness = Harness::new(backend, limits()).await?;
    let calls = futures::future::join_all((0..120).map(|index| {
        let topic = if index % 3 == 0 { "sport" } else { "news" };
        let store = &harness.store;
        let app = harness.app.clone();
        async move {
            store
                .publish(&app, topic, Bytes::from(format!("{topic}-{index}")))
                .await
        }
    }))
    .await;
    let mut answers: std::collections::BTreeMap<String, Vec<(u64, u64, String)>> =
        Default::default();
    for call in calls {
        let message = call?;
        let payload = String::from_utf8(message.payload.to_vec())?;
        answers.entry(message.topic.clone()).or_default().push((
            message.offset,
            message.epoch,
            payload,
        ));
    }
    for (topic, count) in [("news", 80u64), ("sport", 40)] {
        let mut got = answers.remove(topic).unwrap_or_default();
        got.sort();
        let offsets: Vec<u64> = got.iter().map(|(offset, _, _)| *offset).collect();
        assert_eq!(offsets, (1..=count).collect::<Vec<_>>(), "{topic}");
        assert!(
            got.windows(2).all(|pair| pair[0].1 == pair[1].1),
            "{topic}: one epoch"
        );
        let stream = harness
            .store
            .history(HistoryQuery {
                app: harness.app.clone(),
                topic: topic.into(),
                since_offset: 0,
                epoch: got[0].1,
                limit: 0,
            })
            .await?;
        assert!(stream.recovered, "{topic}");
        let stored: Vec<(u64, String)> = stream
            .messages
            .iter()
            .map(|m| (m.offset, String::from_utf8_lossy(&m.payload).into_owned()))
            .collect();
        let answered: Vec<(u64, String)> = got
            .into_iter()
            .map(|(offset, _, payload)| (offset, payload))
            .collect();
        assert_eq!(stored, answered, "{topic}");
    }
    Ok(harness)
}

/// One `#[tokio::test]` per test in `mod $module`, run against `$backend`.
macro_rules! on_backend {
    ($module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(#[tokio::test]
            async fn $test() -> anyhow::Result<()> {
                super::super::$test(super::super::Backend::$backend).await?.finish().await;
                Ok(())
            })*
        }
    };
}

macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        on_backend!(sqlite, Sqlite, $($test),*);
        on_backend!(mysql, Mysql, $($test),*);
        on_backend!(redis_mysql, RedisMysql, $($test),*);
        on_backend!(redis_first, RedisFirst, $($test),*);
        on_backend!(redis_cluster, RedisCluster, $($test),*);
    };
}

mod backends {
    on_every_backend!(
        store_then_pending_in_order,
        ack_removes_from_pending_and_marks_sql,
        an_ack_records_its_hand_off_time,
        expired_messages_are_not_pending,
        a_full_inbox_drops_the_oldest,
        invalid_input_is_rejected,
        attempts_count_each_pending,
        a_lost_redis_inbox_is_reloaded_from_sql,
        unacked_messages_end_in_dead_letters,
        an_idempotency_key_stores_once,
        broadcast_history_recovers_or_says_not,
        concurrent_publishes_get_every_offset_once,
        concurrent_stores_are_all_durable,
        store_many_keeps_each_items_payload_and_ttl,
        batches_of_every_size_are_stored_and_acked_once,
        many_inboxes_are_read_at_once,
    );
}
