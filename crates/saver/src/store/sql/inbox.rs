//! Inbox rows: unacked messages read per user or by id, acks, withdrawals,
//! attempt counts, dead letters, the inbox cap and the purge of expired rows.

use std::collections::HashMap;

use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, Message};
use sqlx::{AssertSqlSafe, Connection as _, Row};

use super::rows::{id_to_sql, message_from_row, ms_to_sql, placeholders};
use super::{ACK_CHUNK, ID_CHUNK, INSERT_CHUNK_ROWS, SqlStore, USER_CHUNK};
use crate::error::StoreError;
use crate::metrics;
use crate::store::{Withdrawal, Withdrawn, padded, repeated, statement_rows};

impl SqlStore {
    /// Deletes the rows of a failed Store call's messages (and their
    /// delivery records) in one transaction, with its idempotency key unless
    /// a retry confirmed the key (then nothing is deleted).
    pub(crate) async fn withdraw_rows(
        &self,
        withdrawal: &Withdrawal,
    ) -> Result<Withdrawn, StoreError> {
        let ids: Vec<u64> = withdrawal.ids().collect();
        let mut connection = self.connections.checkout().await?;
        let mut transaction = connection.begin().await?;
        if let Some((app, key)) = &withdrawal.key {
            let forgotten = sqlx::query(
                "DELETE FROM idempotency WHERE app = ? AND idem_key = ? AND confirmed = 0",
            )
            .bind(app.clone())
            .bind(key.clone())
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if forgotten == 0 {
                let confirmed = sqlx::query(
                    "SELECT confirmed FROM idempotency WHERE app = ? AND idem_key = ? AND confirmed > 0",
                )
                .bind(app.clone())
                .bind(key.clone())
                .fetch_optional(&mut *transaction)
                .await?
                .is_some();
                if confirmed {
                    transaction.commit().await?;
                    return Ok(Withdrawn::KeptForRetry);
                }
            }
        }
        for table in ["messages", "message_deliveries"] {
            for chunk in ids.chunks(ID_CHUNK) {
                let sql = format!(
                    "DELETE FROM {table} WHERE id IN ({})",
                    placeholders(chunk.len())
                );
                // The table name is one of two constants; ids are bound.
                let mut query = sqlx::query(AssertSqlSafe(sql));
                for id in chunk {
                    query = query.bind(id_to_sql(*id));
                }
                query.execute(&mut *transaction).await?;
            }
        }
        transaction.commit().await?;
        Ok(Withdrawn::Removed)
    }

    /// The messages of `ids` that are stored, unacked and unexpired.
    pub(crate) async fn unacked_by_ids(&self, ids: &[u64]) -> Result<Vec<Message>, StoreError> {
        let mut messages = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "SELECT id, app, user_id, payload, created_ms, expires_ms, attempts, parent_id FROM messages \
                 WHERE acked_ms IS NULL AND expires_ms > ? AND id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(ms_to_sql(now_ms()));
            for id in chunk {
                query = query.bind(id_to_sql(*id));
            }
            for row in query.fetch_all(&self.connections).await? {
                let app: String = row.try_get("app")?;
                let user: String = row.try_get("user_id")?;
                let mut message = message_from_row(&app, &user, &row)?;
                message.parent_id = row
                    .try_get::<Option<i64>, _>("parent_id")?
                    .and_then(|id| u64::try_from(id).ok())
                    .unwrap_or(0);
                messages.push(message);
            }
        }
        messages.sort_by_key(|message| message.id);
        Ok(messages)
    }
}

impl SqlStore {
    /// Moves messages to the dead letters; returns how many moved. With
    /// `claim` the message row must still be live (so concurrent callers move
    /// it once); without, the caller already owns it (removed it from Redis).
    pub(crate) async fn dead_letter(
        &self,
        messages: &[Message],
        claim: bool,
    ) -> Result<u64, StoreError> {
        if messages.is_empty() {
            return Ok(0);
        }
        let now = ms_to_sql(now_ms());
        let mut connection = self.connections.checkout().await?;
        let mut transaction = connection.begin().await?;
        let mut moved = Vec::with_capacity(messages.len());
        for message in messages {
            let expired = sqlx::query(
                "UPDATE messages SET expires_ms = ? WHERE id = ? AND acked_ms IS NULL AND expires_ms > ?",
            )
            .bind(now)
            .bind(id_to_sql(message.id))
            .bind(now)
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if expired == 1 || !claim {
                moved.push(message);
            }
        }
        for chunk in moved.chunks(INSERT_CHUNK_ROWS) {
            // A message dead-lettered before (its SQL row was late) is not moved twice.
            let ids: Vec<i64> = chunk.iter().map(|message| id_to_sql(message.id)).collect();
            let sql = format!(
                "DELETE FROM dead_letters WHERE id IN ({})",
                placeholders(ids.len())
            );
            let mut delete = sqlx::query(AssertSqlSafe(sql));
            for id in &ids {
                delete = delete.bind(*id);
            }
            delete.execute(&mut *transaction).await?;
            let sql = format!(
                "INSERT INTO dead_letters (id, app, user_id, payload, created_ms, attempts, dead_ms) VALUES {}",
                repeated("(?, ?, ?, ?, ?, ?, ?)", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for message in chunk {
                query = query
                    .bind(id_to_sql(message.id))
                    .bind(message.app.clone())
                    .bind(message.user.clone())
                    .bind(message.payload.to_vec())
                    .bind(ms_to_sql(message.created_ms))
                    .bind(i64::from(message.attempts))
                    .bind(now);
            }
            query.execute(&mut *transaction).await?;
        }
        transaction.commit().await?;
        metrics::dead_lettered(moved.len() as u64);
        Ok(moved.len() as u64)
    }
}

impl SqlStore {
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
        .fetch_all(&self.connections)
        .await?;
        rows.iter()
            .map(|row| message_from_row(app, user, row))
            .collect()
    }

    /// The unacked, unexpired messages of many users of one app, at most
    /// `limit` per user, oldest first: one query per [`USER_CHUNK`] users.
    /// Users without any are absent from the map.
    pub(crate) async fn unacked_many(
        &self,
        app: &str,
        users: &[String],
        limit: u32,
    ) -> Result<HashMap<String, Vec<Message>>, StoreError> {
        let mut inboxes: HashMap<String, Vec<Message>> = HashMap::new();
        for chunk in users.chunks(USER_CHUNK) {
            let sql = format!(
                "SELECT id, user_id, payload, created_ms, expires_ms, attempts FROM ( \
                   SELECT id, user_id, payload, created_ms, expires_ms, attempts, \
                     ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY id) AS position \
                   FROM messages \
                   WHERE app = ? AND user_id IN ({}) AND acked_ms IS NULL AND expires_ms > ? \
                 ) AS inbox WHERE position <= ? ORDER BY user_id, id",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(app.to_string());
            for user in chunk {
                query = query.bind(user.clone());
            }
            let rows = query
                .bind(ms_to_sql(now_ms()))
                .bind(i64::from(limit))
                .fetch_all(&self.connections)
                .await?;
            for row in &rows {
                let user: String = row.try_get("user_id")?;
                let message = message_from_row(app, &user, row)?;
                inboxes.entry(user).or_default().push(message);
            }
        }
        Ok(inboxes)
    }

    pub(super) async fn count_attempts(&self, ids: &[u64]) -> Result<(), StoreError> {
        for chunk in ids.chunks(ID_CHUNK) {
            let sql = format!(
                "UPDATE messages SET attempts = attempts + 1 WHERE id IN ({})",
                placeholders(chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for id in chunk {
                query = query.bind(id_to_sql(*id));
            }
            query.execute(&self.connections).await?;
        }
        Ok(())
    }

    /// Marks acked every listed message not acked yet; returns how many.
    /// Every item's ids go into shared UPDATEs, `ACK_CHUNK` ids each.
    pub(crate) async fn mark_acked(&self, items: &[AckItem]) -> Result<u64, StoreError> {
        let acked_ms = ms_to_sql(now_ms());
        // Ids at or above 2^63 were never made by a saver: nothing to ack.
        let triples: Vec<(i64, &str, &str)> = items
            .iter()
            .flat_map(|item| {
                item.msg_ids.iter().filter_map(move |id| {
                    i64::try_from(*id)
                        .ok()
                        .map(|id| (id, item.app.as_str(), item.user.as_str()))
                })
            })
            .collect();
        let mut acked = 0;
        for chunk in triples.chunks(ACK_CHUNK) {
            let sql = format!(
                "UPDATE messages SET acked_ms = ? WHERE acked_ms IS NULL AND ({})",
                repeated(
                    "(id = ? AND app = ? AND user_id = ?)",
                    " OR ",
                    statement_rows(chunk.len())
                )
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(acked_ms);
            for (id, app, user) in padded(chunk) {
                query = query.bind(*id).bind(app.to_string()).bind(user.to_string());
            }
            acked += query.execute(&self.connections).await?.rows_affected();
        }
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
            expired += query.execute(&self.connections).await?.rows_affected();
        }
        Ok(expired)
    }

    /// Drops the oldest unacked messages of a user beyond `max_inbox` (by
    /// expiring them); returns how many. Enforced when the inbox is read, so a
    /// fan-out Store costs no per-user count.
    pub(super) async fn drop_over_cap(&self, app: &str, user: &str) -> Result<u64, StoreError> {
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
        .fetch_optional(&self.connections)
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
        .execute(&self.connections)
        .await?;
        Ok(result.rows_affected())
    }

    /// Deletes up to `max_rows` rows that expired before `before_ms`; returns
    /// how many. Acked rows stay until their expiry, as a record of delivery.
    pub async fn purge_expired(&self, before_ms: u64, max_rows: u32) -> Result<u64, StoreError> {
        let rows = sqlx::query("SELECT id FROM messages WHERE expires_ms < ? LIMIT ?")
            .bind(ms_to_sql(before_ms))
            .bind(i64::from(max_rows))
            .fetch_all(&self.connections)
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
            deleted += query.execute(&self.connections).await?.rows_affected();
        }
        // Their per-device status goes with them.
        self.delete_deliveries(&ids).await?;
        Ok(deleted)
    }
}
