//! Broadcast streams in SQL: a publish assigns the topic's next offset (and
//! epoch), History reads what a device missed.

use bytes::Bytes;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::BroadcastMessage;
use sqlx::{Connection as _, Row};

use super::SqlStore;
use super::group_commit::is_unique_violation;
use super::rows::{id_to_sql, ms_to_sql};
use crate::error::StoreError;
use crate::store::{History, HistoryQuery};

impl SqlStore {
    /// Appends to a topic's stream: the next offset in the topic's epoch
    /// (a new epoch for a new topic), then trims by length and age.
    pub(crate) async fn publish_sql(
        &self,
        app: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<BroadcastMessage, StoreError> {
        let id = self.next_id()?;
        let created_ms = now_ms();
        // A new topic's row may be inserted by two callers at once: retry the loser.
        for _ in 0..3 {
            let mut connection = self.connections.checkout().await?;
            let mut transaction = connection.begin().await?;
            let Some((epoch, offset)) =
                next_offset(&mut transaction, app, topic, created_ms).await?
            else {
                continue;
            };
            sqlx::query(
                "INSERT INTO broadcasts (app, topic, seq, id, payload, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(app.to_string())
            .bind(topic.to_string())
            .bind(offset)
            .bind(id_to_sql(id))
            .bind(payload.to_vec())
            .bind(ms_to_sql(created_ms))
            .execute(&mut *transaction)
            .await?;
            let oldest_kept_ms =
                created_ms.saturating_sub(u64::from(self.limits.stream_max_age_secs) * 1000);
            sqlx::query(
                "DELETE FROM broadcasts WHERE app = ? AND topic = ? AND (seq <= ? OR created_ms < ?)",
            )
            .bind(app.to_string())
            .bind(topic.to_string())
            .bind(offset - i64::from(self.limits.stream_max_len.max(1)))
            .bind(ms_to_sql(oldest_kept_ms))
            .execute(&mut *transaction)
            .await?;
            transaction.commit().await?;
            return Ok(BroadcastMessage {
                id,
                app: app.to_string(),
                topic: topic.to_string(),
                offset: u64::try_from(offset).unwrap_or(0),
                epoch: u64::try_from(epoch).unwrap_or(0),
                payload,
                created_ms,
            });
        }
        Err(StoreError::Commit(format!(
            "topic {topic:?} kept changing under publish"
        )))
    }

    pub(crate) async fn history_sql(&self, query: &HistoryQuery) -> Result<History, StoreError> {
        let row =
            sqlx::query("SELECT epoch, last_seq FROM broadcast_topics WHERE app = ? AND topic = ?")
                .bind(query.app.clone())
                .bind(query.topic.clone())
                .fetch_optional(&self.connections)
                .await?;
        let (epoch, offset) = match row {
            Some(row) => (
                u64::try_from(row.try_get::<i64, _>("epoch")?).unwrap_or(0),
                u64::try_from(row.try_get::<i64, _>("last_seq")?).unwrap_or(0),
            ),
            None => (0, 0),
        };
        let mut entries = Vec::new();
        if query.epoch != 0 && query.epoch == epoch && query.since_offset < offset {
            let rows = sqlx::query(
                "SELECT seq, id, payload, created_ms FROM broadcasts \
                 WHERE app = ? AND topic = ? AND seq > ? ORDER BY seq LIMIT ?",
            )
            .bind(query.app.clone())
            .bind(query.topic.clone())
            .bind(i64::try_from(query.since_offset).unwrap_or(i64::MAX))
            .bind(i64::from(query.limit))
            .fetch_all(&self.connections)
            .await?;
            for row in &rows {
                entries.push(BroadcastMessage {
                    id: u64::try_from(row.try_get::<i64, _>("id")?).unwrap_or(0),
                    app: query.app.clone(),
                    topic: query.topic.clone(),
                    offset: u64::try_from(row.try_get::<i64, _>("seq")?).unwrap_or(0),
                    epoch,
                    payload: Bytes::from(row.try_get::<Vec<u8>, _>("payload")?),
                    created_ms: u64::try_from(row.try_get::<i64, _>("created_ms")?).unwrap_or(0),
                });
            }
        }
        let oldest_kept_ms =
            now_ms().saturating_sub(u64::from(self.limits.stream_max_age_secs) * 1000);
        Ok(crate::store::history_answer(
            query,
            epoch,
            offset,
            entries,
            oldest_kept_ms,
        ))
    }
}

/// Takes the topic's next offset in `transaction`: its epoch and the offset,
/// creating the topic (a new epoch) on its first message. None when another
/// caller created the topic at the same moment: try again.
async fn next_offset(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    app: &str,
    topic: &str,
    created_ms: u64,
) -> Result<Option<(i64, i64)>, StoreError> {
    let bumped = sqlx::query(
        "UPDATE broadcast_topics SET last_seq = last_seq + 1 WHERE app = ? AND topic = ?",
    )
    .bind(app.to_string())
    .bind(topic.to_string())
    .execute(&mut **transaction)
    .await?
    .rows_affected();
    if bumped == 0 {
        let created = sqlx::query(
            "INSERT INTO broadcast_topics (app, topic, epoch, last_seq) VALUES (?, ?, ?, 1)",
        )
        .bind(app.to_string())
        .bind(topic.to_string())
        .bind(ms_to_sql(created_ms.max(1)))
        .execute(&mut **transaction)
        .await;
        match created {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        }
    }
    let row =
        sqlx::query("SELECT epoch, last_seq FROM broadcast_topics WHERE app = ? AND topic = ?")
            .bind(app.to_string())
            .bind(topic.to_string())
            .fetch_one(&mut **transaction)
            .await?;
    Ok(Some((row.try_get("epoch")?, row.try_get("last_seq")?)))
}
