//! Delivery status in SQL: the record of each group push or broadcast, the
//! per-device delivery rows, and the `message_status` answer built from them.

use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{DeviceStatus, MessageStatusResponse, StatusCounts};
use sqlx::{AssertSqlSafe, Row};

use super::{KIND_BROADCAST, ROW_CHUNK, STATUS_KEEP_AFTER_TTL_MS, from_sql, insert_ignore, to_sql};
use crate::error::StoreError;
use crate::store::sql::execute_retrying;
use crate::store::{SqlStore, padded, repeated, statement_rows};

/// One device's row of `message_deliveries`.
pub(super) struct DeliveryRow<'a> {
    pub(super) id: i64,
    pub(super) user: &'a str,
    pub(super) device: &'a str,
    pub(super) delivered_ms: i64,
    /// None for a hand-off record.
    pub(super) acked_ms: Option<i64>,
}

impl SqlStore {
    pub(super) async fn insert_push_record(
        &self,
        id: u64,
        app: &str,
        kind: &str,
        target: &str,
        created_ms: u64,
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO push_records (id, app, kind, target, created_ms, keep_until_ms, members, fanout_done, delivered) \
             VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0)",
        )
        .bind(to_sql(id))
        .bind(app.to_string())
        .bind(kind.to_string())
        .bind(target.to_string())
        .bind(to_sql(created_ms))
        .bind(to_sql(keep_until_ms))
        .execute(self.connections())
        .await?;
        Ok(())
    }

    /// Writes rows of `message_deliveries`. A hand-off (`acked` false)
    /// keeps a device's first row; an ACK creates the row (with its hand-off
    /// time) when the hand-off was not recorded, and an existing row keeps
    /// its first `acked_ms`: one row write per acknowledged device either way.
    pub(super) async fn write_deliveries(
        &self,
        rows: &mut [DeliveryRow<'_>],
        acked: bool,
    ) -> Result<(), StoreError> {
        // In key order: concurrent batches then take their row locks in
        // the same order, which avoids most deadlocks.
        rows.sort_unstable_by(|a, b| (a.id, a.user, a.device).cmp(&(b.id, b.user, b.device)));
        let (head, conflict) = match (acked, self.connections().is_sqlite()) {
            (false, _) => (insert_ignore(self.connections()), ""),
            (true, true) => (
                "INSERT",
                " ON CONFLICT (id, user_id, device) DO UPDATE SET \
                 acked_ms = COALESCE(message_deliveries.acked_ms, excluded.acked_ms)",
            ),
            (true, false) => (
                "INSERT",
                " ON DUPLICATE KEY UPDATE acked_ms = COALESCE(acked_ms, VALUES(acked_ms))",
            ),
        };
        for chunk in rows.chunks(ROW_CHUNK) {
            let text = format!(
                "{head} INTO message_deliveries (id, user_id, device, delivered_ms, acked_ms) \
                 VALUES {}{conflict}",
                repeated("(?, ?, ?, ?, ?)", ", ", statement_rows(chunk.len()))
            );
            execute_retrying(self.connections(), || {
                // Built from fixed fragments; every value is bound. A row
                // written twice in one statement is ignored or merged.
                let mut query = sqlx::query(AssertSqlSafe(text.clone()));
                for row in padded(chunk) {
                    query = query
                        .bind(row.id)
                        .bind(row.user.to_string())
                        .bind(row.device.to_string())
                        .bind(row.delivered_ms)
                        .bind(row.acked_ms);
                }
                query
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes the delivery rows of purged messages.
    pub(crate) async fn delete_deliveries(&self, ids: &[i64]) -> Result<(), StoreError> {
        for chunk in ids.chunks(ROW_CHUNK) {
            let text = format!(
                "DELETE FROM message_deliveries WHERE id IN ({})",
                repeated("?", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text));
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(self.connections()).await?;
        }
        Ok(())
    }

    pub(super) async fn push_record_status(
        &self,
        app: &str,
        id: i64,
    ) -> Result<Option<MessageStatusResponse>, StoreError> {
        let row = sqlx::query(
            "SELECT kind, target, created_ms, keep_until_ms, members, fanout_done, delivered \
             FROM push_records WHERE id = ? AND app = ?",
        )
        .bind(id)
        .bind(app.to_string())
        .fetch_optional(self.connections())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: String = row.try_get("kind")?;
        let mut status = MessageStatusResponse {
            found: true,
            target: row.try_get("target")?,
            created_ms: from_sql(row.try_get("created_ms")?),
            expires_ms: from_sql(row.try_get::<Option<i64>, _>("keep_until_ms")?)
                .saturating_sub(STATUS_KEEP_AFTER_TTL_MS),
            members: from_sql(row.try_get("members")?),
            fanout_done: from_sql(row.try_get("fanout_done")?) != 0,
            ..Default::default()
        };
        if kind == KIND_BROADCAST {
            let delivered = from_sql(row.try_get("delivered")?);
            status.delivered_connections = delivered;
            status.counts = Some(StatusCounts {
                delivered,
                ..Default::default()
            });
        } else {
            status.counts = Some(self.group_counts(id).await?);
        }
        status.kind = kind;
        Ok(Some(status))
    }

    /// Each member message of a group push counted once, in its furthest state.
    async fn group_counts(&self, parent_id: i64) -> Result<StatusCounts, StoreError> {
        let now = to_sql(now_ms());
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS SIGNED) AS acked, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NOT NULL THEN 1 ELSE 0 END), 0) AS SIGNED) AS dead, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NULL AND m.expires_ms <= ? THEN 1 ELSE 0 END), 0) AS SIGNED) AS expired, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NULL AND m.expires_ms > ? \
               AND EXISTS (SELECT 1 FROM message_deliveries h WHERE h.id = m.id) THEN 1 ELSE 0 END), 0) AS SIGNED) AS delivered \
             FROM messages m LEFT JOIN dead_letters d ON d.id = m.id WHERE m.parent_id = ?",
        )
        .bind(now)
        .bind(now)
        .bind(parent_id)
        .fetch_one(self.connections())
        .await?;
        let total = from_sql(row.try_get("total")?);
        let acked = from_sql(row.try_get("acked")?);
        let dead_lettered = from_sql(row.try_get("dead")?);
        let expired = from_sql(row.try_get("expired")?);
        let delivered = from_sql(row.try_get("delivered")?);
        Ok(StatusCounts {
            stored: total.saturating_sub(acked + dead_lettered + expired + delivered),
            delivered,
            acked,
            expired,
            dead_lettered,
        })
    }

    pub(super) async fn unicast_status(
        &self,
        app: &str,
        id: i64,
    ) -> Result<MessageStatusResponse, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, created_ms, expires_ms, acked_ms, parent_id FROM messages WHERE id = ? AND app = ?",
        )
        .bind(id)
        .bind(app.to_string())
        .fetch_optional(self.connections())
        .await?;
        let Some(row) = row else {
            return Ok(MessageStatusResponse::default());
        };
        let user: String = row.try_get("user_id")?;
        let expires_ms = from_sql(row.try_get("expires_ms")?);
        let acked_ms = from_sql(row.try_get::<Option<i64>, _>("acked_ms")?);
        let dead = sqlx::query("SELECT dead_ms FROM dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(self.connections())
            .await?
            .is_some();
        let devices = sqlx::query(
            "SELECT CAST(device AS CHAR) AS handset, delivered_ms, acked_ms FROM message_deliveries \
             WHERE id = ? AND user_id = ? ORDER BY device LIMIT 1000",
        )
        .bind(id)
        .bind(user.clone())
        .fetch_all(self.connections())
        .await?;
        // The message's own end, when it was not acknowledged.
        let ended = if dead {
            Some("dead_lettered")
        } else if acked_ms == 0 && expires_ms <= now_ms() {
            Some("expired")
        } else {
            None
        };
        let mut device_states = Vec::with_capacity(devices.len());
        for device in &devices {
            let device_acked_ms = from_sql(device.try_get::<Option<i64>, _>("acked_ms")?);
            let state = if device_acked_ms != 0 {
                "acked"
            } else {
                ended.unwrap_or("delivered")
            };
            device_states.push(DeviceStatus {
                device: device.try_get("handset")?,
                state: state.to_string(),
                delivered_ms: from_sql(device.try_get("delivered_ms")?),
                acked_ms: device_acked_ms,
            });
        }
        let state = if acked_ms != 0 {
            "acked"
        } else if let Some(ended) = ended {
            ended
        } else if device_states.is_empty() {
            "stored"
        } else {
            "delivered"
        };
        Ok(MessageStatusResponse {
            found: true,
            kind: "unicast".into(),
            user,
            state: state.into(),
            created_ms: from_sql(row.try_get("created_ms")?),
            expires_ms,
            acked_ms,
            parent_id: from_sql(row.try_get::<Option<i64>, _>("parent_id")?),
            devices: device_states,
            ..Default::default()
        })
    }
}
