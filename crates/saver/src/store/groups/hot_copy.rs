//! Groups for the Redis store: a sorted set per group as the hot copy that
//! fan-outs page through, written after SQL and rebuilt from SQL in the
//! background when Redis lost it.

use super::{
    GroupStore, MembersPage, REBUILD_LOCK_SECS, REBUILD_PAGE, ROW_CHUNK, page_limit, page_of,
    validate_group, validate_group_users,
};
use crate::error::StoreError;
use crate::store::redis_sql::RedisConnection;
use crate::store::{RedisSqlStore, SqlStore, validate_app};

/// The Redis keys of one group.
struct GroupKeys {
    members: String,
    warm: String,
    warming: String,
}

impl GroupKeys {
    /// Apps contain no `:`, so `<app>:<group>` is unambiguous.
    fn new(app: &str, group: &str) -> GroupKeys {
        let tag = format!("pg:{{g:{app}:{group}}}");
        GroupKeys {
            members: format!("{tag}:members"),
            warm: format!("{tag}:warm"),
            warming: format!("{tag}:warming"),
        }
    }
}

#[tonic::async_trait]
impl GroupStore for RedisSqlStore {
    fn durable(&self) -> &SqlStore {
        self.sql()
    }

    async fn bind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        let added = self.sql().bind_sql(app, group, users).await?;
        // Always added, warm or not: a rebuild running now may have read SQL
        // before this bind committed.
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        for chunk in users.chunks(ROW_CHUNK) {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&keys.members);
            for user in chunk {
                zadd.arg(0).arg(user);
            }
            zadd.exec_async(&mut redis).await?;
        }
        Ok(added)
    }

    async fn unbind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        let removed = self.sql().unbind_sql(app, group, users).await?;
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        for chunk in users.chunks(ROW_CHUNK) {
            redis::cmd("ZREM")
                .arg(&keys.members)
                .arg(chunk)
                .exec_async(&mut redis)
                .await?;
        }
        Ok(removed)
    }

    async fn group_members(
        &self,
        app: &str,
        group: &str,
        after: &str,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        validate_app(app)?;
        validate_group(group)?;
        let limit = page_limit(limit);
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        let warm: bool = redis::cmd("EXISTS")
            .arg(&keys.warm)
            .query_async(&mut redis)
            .await?;
        if !warm {
            // SQL answers until the hot copy is whole again.
            start_rebuild(redis, self.sql().clone(), app, group, keys).await;
            let users = self.sql().members_sql(app, group, after, limit).await?;
            return Ok(page_of(users, limit));
        }
        let min = if after.is_empty() {
            "-".to_string()
        } else {
            format!("({after}")
        };
        let users: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(&keys.members)
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut redis)
            .await?;
        Ok(page_of(users, limit))
    }
}

/// Rebuilds a group's hot copy from SQL in the background, unless another
/// rebuild holds the group's lock.
async fn start_rebuild(
    mut redis: RedisConnection,
    sql: SqlStore,
    app: &str,
    group: &str,
    keys: GroupKeys,
) {
    let locked: Result<Option<String>, _> = redis::cmd("SET")
        .arg(&keys.warming)
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(REBUILD_LOCK_SECS)
        .query_async(&mut redis)
        .await;
    if !matches!(locked, Ok(Some(_))) {
        return;
    }
    let (app, group) = (app.to_string(), group.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut copied = 0usize;
        let mut after = String::new();
        let result: Result<(), StoreError> = async {
            loop {
                let users = sql.members_sql(&app, &group, &after, REBUILD_PAGE).await?;
                let Some(last) = users.last().cloned() else {
                    break;
                };
                for chunk in users.chunks(ROW_CHUNK) {
                    let mut zadd = redis::cmd("ZADD");
                    zadd.arg(&keys.members);
                    for user in chunk {
                        zadd.arg(0).arg(user);
                    }
                    zadd.exec_async(&mut redis).await?;
                }
                copied += users.len();
                if users.len() < REBUILD_PAGE as usize {
                    break;
                }
                after = last;
            }
            redis::cmd("SET")
                .arg(&keys.warm)
                .arg(1)
                .exec_async(&mut redis)
                .await?;
            Ok(())
        }
        .await;
        let _ = redis::cmd("DEL")
            .arg(&keys.warming)
            .exec_async(&mut redis)
            .await;
        match result {
            Ok(()) => tracing::info!(
                app,
                members = copied,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rebuilt a group's hot copy from sql"
            ),
            Err(error) => tracing::warn!(app, %error, "cannot rebuild a group's hot copy"),
        }
    });
}
