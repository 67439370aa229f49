//! The same store tests against real services: SqlStore on SQLite, SqlStore on
//! MariaDB, and RedisSqlStore on Redis + MariaDB. Each test gets its own app id
//! (and its own SQLite file or MySQL database), so tests run in parallel.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, Message};
use pushgrid_saver::error::StoreError;
use pushgrid_saver::store::{MessageIds, MessageStore, RedisSqlStore, SqlStore, StoreLimits};
use sqlx::{AnyPool, Row};

const MYSQL_SERVER: &str = "mysql://root@127.0.0.1:3306";
const REDIS_URL: &str = "redis://127.0.0.1:6379";

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sqlite,
    Mysql,
    RedisMysql,
}

struct Harness {
    backend: Backend,
    store: Box<dyn MessageStore>,
    pool: AnyPool,
    app: String,
    cleanup: Cleanup,
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
            Backend::Mysql | Backend::RedisMysql => {
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
            .with_ids(ids);
        let pool = sql.pool().clone();
        let store: Box<dyn MessageStore> = match backend {
            Backend::RedisMysql => Box::new(RedisSqlStore::connect(REDIS_URL, sql).await?),
            _ => Box::new(sql),
        };
        Ok(Harness {
            backend,
            store,
            pool,
            app: random_name("app"),
            cleanup,
        })
    }

    async fn store(&self, users: &[&str], payload: &str) -> anyhow::Result<Vec<Message>> {
        let users: Vec<String> = users.iter().map(|user| user.to_string()).collect();
        Ok(self
            .store
            .store(&self.app, &users, Bytes::from(payload.to_string()), 0)
            .await?)
    }

    async fn pending(&self, user: &str) -> anyhow::Result<Vec<Message>> {
        Ok(self.store.pending(&self.app, user, 0).await?)
    }

    async fn ack(&self, user: &str, ids: &[u64]) -> anyhow::Result<u64> {
        let item = AckItem {
            app: self.app.clone(),
            user: user.into(),
            msg_ids: ids.to_vec(),
        };
        Ok(self.store.ack(vec![item]).await?)
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
    if harness.backend == Backend::RedisMysql {
        let client = redis::Client::open(REDIS_URL)?;
        let mut redis = client.get_multiplexed_async_connection().await?;
        let tag = format!("pg:{{{}:kim}}", harness.app);
        let keys: Vec<String> = ["inbox", "msgs", "att", "warm"]
            .iter()
            .map(|suffix| format!("{tag}:{suffix}"))
            .collect();
        let deleted: u32 = redis::cmd("DEL").arg(&keys).query_async(&mut redis).await?;
        assert_eq!(deleted, 4);
    }
    let pending = harness.pending("kim").await?;
    assert_eq!(payloads(&pending), ["2", "3", "5"]);
    // Attempts come back from the durable copy only in SQL mode; Redis counts its own.
    assert!(pending.iter().all(|message| message.attempts >= 1));
    Ok(harness)
}

macro_rules! on_every_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test]
            async fn $test() -> anyhow::Result<()> {
                super::super::$test(super::super::Backend::Sqlite).await?.finish().await;
                Ok(())
            })*
        }
        mod mysql {
            $(#[tokio::test]
            async fn $test() -> anyhow::Result<()> {
                super::super::$test(super::super::Backend::Mysql).await?.finish().await;
                Ok(())
            })*
        }
        mod redis_mysql {
            $(#[tokio::test]
            async fn $test() -> anyhow::Result<()> {
                super::super::$test(super::super::Backend::RedisMysql).await?.finish().await;
                Ok(())
            })*
        }
    };
}

mod backends {
    on_every_backend!(
        store_then_pending_in_order,
        ack_removes_from_pending_and_marks_sql,
        expired_messages_are_not_pending,
        a_full_inbox_drops_the_oldest,
        invalid_input_is_rejected,
        attempts_count_each_pending,
        a_lost_redis_inbox_is_reloaded_from_sql,
    );
}
