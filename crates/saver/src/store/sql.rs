//! The SQL store: MySQL/MariaDB or SQLite through sqlx's `Any` driver.
//!
//! Only `?` placeholders and i64/String/Vec<u8>/Option values are used, so
//! every statement runs unchanged on both. Ids are u64 snowflakes below 2^63,
//! stored as BIGINT (i64).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pushgrid_common::{db, now_ms};
use pushgrid_proto::cluster::{AckItem, Message};
use sqlx::any::AnyRow;
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::{MessageIds, MessageStore, StoreLimits};
use crate::error::StoreError;
use crate::metrics;

/// Rows per multi-row INSERT (6 parameters each; SQLite allows 32766).
const INSERT_CHUNK_ROWS: usize = 1000;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 1000;
/// The table recording applied migrations, apart from other roles' tables.
const MIGRATIONS_TABLE: &str = "_pushgrid_saver_migrations";

pub struct SqlStore {
    pool: AnyPool,
    ids: Arc<MessageIds>,
    limits: StoreLimits,
}

impl SqlStore {
    /// Connects (creating the SQLite file or MySQL database when missing),
    /// runs the migrations, and uses worker id 0 and default limits until
    /// [`with_ids`](Self::with_ids) / [`with_limits`](Self::with_limits).
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        SqlStore::connect_with(url, 16).await
    }

    pub async fn connect_with(url: &str, max_connections: u32) -> Result<SqlStore, StoreError> {
        let pool = db::connect(url, max_connections)
            .await
            .map_err(|error| StoreError::Connect(format!("{error:#}")))?;
        db::migrate(&pool, sqlx::migrate!("./migrations"), MIGRATIONS_TABLE)
            .await
            .map_err(|error| StoreError::Migrate(format!("{error:#}")))?;
        Ok(SqlStore::from_pool(pool))
    }

    /// Wraps a pool whose migrations have already run.
    pub fn from_pool(pool: AnyPool) -> SqlStore {
        SqlStore {
            pool,
            ids: Arc::new(MessageIds::fixed(0)),
            limits: StoreLimits::default(),
        }
    }

    pub fn with_ids(mut self, ids: MessageIds) -> SqlStore {
        self.ids = Arc::new(ids);
        self
    }

    pub fn with_limits(mut self, limits: StoreLimits) -> SqlStore {
        self.limits = limits;
        self
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    pub(crate) fn new_messages(
        &self,
        app: &str,
        users: &[String],
        payload: &Bytes,
        ttl_secs: u32,
    ) -> Vec<Message> {
        super::new_messages(&self.ids, &self.limits, app, users, payload, ttl_secs)
    }

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts `messages` in one transaction, a multi-row INSERT per chunk.
    pub(crate) async fn insert(&self, messages: &[Message]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let mut transaction = self.pool.begin().await?;
        for chunk in messages.chunks(INSERT_CHUNK_ROWS) {
            let mut sql = String::from(
                "INSERT INTO messages (id, app, user_id, payload, created_ms, expires_ms, acked_ms, attempts) VALUES ",
            );
            for index in 0..chunk.len() {
                sql.push_str(if index == 0 { "" } else { ", " });
                sql.push_str("(?, ?, ?, ?, ?, ?, NULL, 0)");
            }
            // Generated from a fixed fragment repeated; every value is a bound parameter.
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for message in chunk {
                query = query
                    .bind(id_to_sql(message.id))
                    .bind(message.app.clone())
                    .bind(message.user.clone())
                    .bind(message.payload.to_vec())
                    .bind(ms_to_sql(message.created_ms))
                    .bind(ms_to_sql(message.expires_ms));
            }
            query.execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// The oldest `limit` unacked, unexpired messages of a user, as stored
    /// (attempts not counted up).
    pub(crate) async fn unacked(
        &self,
        app: &str,
        user: &str,
        limit: u32,
    ) -> Result<Vec<Message>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, payload, created_ms, expires_ms, attempts FROM messages \
             WHERE app = ? AND user_id = ? AND acked_ms IS NULL AND expires_ms > ? ORDER BY id LIMIT ?",
        )
        .bind(app.to_string())
        .bind(user.to_string())
        .bind(ms_to_sql(now_ms()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| message_from_row(app, user, row))
            .collect()
    }

    async fn count_attempts(&self, ids: &[u64]) -> Result<(), StoreError> {
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE messages SET attempts = attempts + 1 WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id_to_sql(*id));
            }
            query.execute(&self.pool).await?;
        }
        Ok(())
    }

    /// Marks acked every listed message not acked yet; returns how many.
    pub(crate) async fn mark_acked(&self, items: &[AckItem]) -> Result<u64, StoreError> {
        let acked_ms = ms_to_sql(now_ms());
        let mut acked = 0;
        let mut transaction = self.pool.begin().await?;
        for item in items {
            // Ids at or above 2^63 were never made by a saver: nothing to ack.
            let ids: Vec<i64> = item
                .msg_ids
                .iter()
                .filter_map(|id| i64::try_from(*id).ok())
                .collect();
            for chunk in ids.chunks(ID_CHUNK) {
                let sql = format!(
                    "UPDATE messages SET acked_ms = ? WHERE app = ? AND user_id = ? AND acked_ms IS NULL AND id IN ({})",
                    placeholders(chunk.len())
                );
                let mut query = sqlx::query(AssertSqlSafe(sql))
                    .bind(acked_ms)
                    .bind(item.app.clone())
                    .bind(item.user.clone());
                for id in chunk {
                    query = query.bind(*id);
                }
                acked += query.execute(&mut *transaction).await?.rows_affected();
            }
        }
        transaction.commit().await?;
        Ok(acked)
    }

    /// Ends the life of unacked messages now: they are no longer pending and
    /// the purge removes them. Used for messages dropped from a full inbox.
    pub(crate) async fn expire_now(&self, ids: &[u64]) -> Result<u64, StoreError> {
        let now = ms_to_sql(now_ms());
        let mut expired = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE messages SET expires_ms = ? WHERE acked_ms IS NULL AND expires_ms > ? AND id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(now).bind(now);
            for id in chunk {
                query = query.bind(id_to_sql(*id));
            }
            expired += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(expired)
    }

    /// Drops the oldest unacked messages of a user beyond `max_inbox` (by
    /// expiring them); returns how many. Enforced when the inbox is read, so a
    /// fan-out Store costs no per-user count.
    async fn drop_over_cap(&self, app: &str, user: &str) -> Result<u64, StoreError> {
        let now = ms_to_sql(now_ms());
        // The newest message beyond the cap, counting from the newest.
        let newest_dropped = sqlx::query(
            "SELECT id FROM messages WHERE app = ? AND user_id = ? AND acked_ms IS NULL AND expires_ms > ? \
             ORDER BY id DESC LIMIT 1 OFFSET ?",
        )
        .bind(app.to_string())
        .bind(user.to_string())
        .bind(now)
        .bind(i64::from(self.limits.max_inbox))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = newest_dropped else {
            return Ok(0);
        };
        let newest_dropped: i64 = row.try_get("id")?;
        let result = sqlx::query(
            "UPDATE messages SET expires_ms = ? WHERE app = ? AND user_id = ? AND acked_ms IS NULL \
             AND expires_ms > ? AND id <= ?",
        )
        .bind(now)
        .bind(app.to_string())
        .bind(user.to_string())
        .bind(now)
        .bind(newest_dropped)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected())
    }

    /// Deletes up to `max_rows` rows that expired before `before_ms`; returns
    /// how many. Acked rows stay until their expiry, as a record of delivery.
    pub async fn purge_expired(&self, before_ms: u64, max_rows: u32) -> Result<u64, StoreError> {
        let rows = sqlx::query("SELECT id FROM messages WHERE expires_ms < ? LIMIT ?")
            .bind(ms_to_sql(before_ms))
            .bind(i64::from(max_rows))
            .fetch_all(&self.pool)
            .await?;
        let ids = rows
            .iter()
            .map(|row| row.try_get::<i64, _>("id"))
            .collect::<Result<Vec<i64>, _>>()?;
        let mut deleted = 0;
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "DELETE FROM messages WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(*id);
            }
            deleted += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(deleted)
    }
}

#[tonic::async_trait]
impl MessageStore for SqlStore {
    async fn store(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
    ) -> Result<Vec<Message>, StoreError> {
        super::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self.new_messages(app, users, &payload, ttl_secs);
        self.insert(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = super::validate_pending(app, user, limit)?;
        metrics::inbox_dropped(self.drop_over_cap(app, user).await?);
        let mut messages = self.unacked(app, user, limit).await?;
        let ids: Vec<u64> = messages.iter().map(|message| message.id).collect();
        self.count_attempts(&ids).await?;
        for message in &mut messages {
            message.attempts = message.attempts.saturating_add(1);
        }
        Ok(messages)
    }

    async fn ack(&self, items: Vec<AckItem>) -> Result<u64, StoreError> {
        super::validate_ack(&items)?;
        self.mark_acked(&items).await
    }
}

fn message_from_row(app: &str, user: &str, row: &AnyRow) -> Result<Message, StoreError> {
    let id: i64 = row.try_get("id")?;
    let created_ms: i64 = row.try_get("created_ms")?;
    let expires_ms: i64 = row.try_get("expires_ms")?;
    let attempts: i64 = row.try_get("attempts")?;
    let corrupt = |what: &str| StoreError::Corrupt(format!("message {id}: negative {what}"));
    Ok(Message {
        id: u64::try_from(id).map_err(|_| corrupt("id"))?,
        app: app.to_string(),
        user: user.to_string(),
        payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload")?),
        created_ms: u64::try_from(created_ms).map_err(|_| corrupt("created_ms"))?,
        expires_ms: u64::try_from(expires_ms).map_err(|_| corrupt("expires_ms"))?,
        attempts: u32::try_from(attempts).map_err(|_| corrupt("attempts"))?,
    })
}

/// `?, ?, ?` with `count` placeholders.
fn placeholders(count: usize) -> String {
    debug_assert!(count > 0);
    let mut list = String::with_capacity(count * 3);
    for index in 0..count {
        list.push_str(if index == 0 { "?" } else { ", ?" });
    }
    list
}

/// Saver ids are below 2^63 (41 + 10 + 12 bits), so they fit a BIGINT.
fn id_to_sql(id: u64) -> i64 {
    debug_assert!(id <= i64::MAX as u64);
    id as i64
}

/// Unix milliseconds fit an i64 for the next 290 million years.
fn ms_to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
