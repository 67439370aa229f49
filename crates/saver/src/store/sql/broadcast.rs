//! Broadcast streams in SQL: a publish assigns the topic's next offset (and
//! epoch), History reads what a device missed.

use std::time::Duration;

use bytes::Bytes;
use pushgrid_common::batch::{BatchConfig, Batcher};
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::BroadcastMessage;
use sqlx::{Connection as _, Row};

use super::group_commit::is_unique_violation;
use super::rows::{id_to_sql, ms_to_sql};
use super::{Connections, SqlStore};
use crate::error::StoreError;
use crate::store::{History, HistoryQuery, StoreLimits};

/// Publishes gathered into one transaction: while one batch is written, the
/// next ones queue, so concurrent publishers share the BEGIN/COMMIT round
/// trips and the fsync (on SQLite, the one connection's turn).
const PUBLISH_BATCH: BatchConfig = BatchConfig {
    max_items: 256,
    queue: 4096,
    in_flight: 1,
    linger: Duration::ZERO,
};

/// One publish waiting for its batch; what it needs of the store's settings
/// travels with it.
pub(super) struct PublishJob {
    app: String,
    topic: String,
    payload: Bytes,
    id: u64,
    created_ms: u64,
    limits: StoreLimits,
}

pub(super) type Publisher = Batcher<PublishJob, Result<BroadcastMessage, String>>;

impl SqlStore {
    /// Appends to a topic's stream: the next offset in the topic's epoch
    /// (a new epoch for a new topic), then trims by length and age.
    /// Concurrent publishes share one transaction ([`PUBLISH_BATCH`]);
    /// offsets follow the order in which they were queued.
    pub(crate) async fn publish_sql(
        &self,
        app: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<BroadcastMessage, StoreError> {
        let job = PublishJob {
            app: app.to_string(),
            topic: topic.to_string(),
            payload,
            id: self.next_id()?,
            created_ms: now_ms(),
            limits: self.limits,
        };
        let publisher = self.publisher.get_or_init(|| {
            let connections = self.connections.clone();
            Batcher::spawn(PUBLISH_BATCH, move |jobs: Vec<PublishJob>| {
                let connections = connections.clone();
                async move { Ok(publish_batch(&connections, &jobs).await) }
            })
        });
        match publisher.call(job).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(error)) => Err(StoreError::Commit(error)),
            Err(status) => Err(StoreError::Commit(status.message().to_string())),
        }
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

/// Writes a batch of publishes in one transaction and answers each, in
/// order. A topic created by another saver at the same moment makes the
/// batch start again (at most three times); any other failure fails every
/// publish of the batch, none of which was stored.
async fn publish_batch(
    connections: &Connections,
    jobs: &[PublishJob],
) -> Vec<Result<BroadcastMessage, String>> {
    ::metrics::histogram!("pushgrid_saver_publish_batch_items").record(jobs.len() as f64);
    let failure = match publish_attempts(connections, jobs).await {
        Ok(messages) => return messages.into_iter().map(Ok).collect(),
        Err(error) => error.to_string(),
    };
    jobs.iter().map(|_| Err(failure.clone())).collect()
}

async fn publish_attempts(
    connections: &Connections,
    jobs: &[PublishJob],
) -> Result<Vec<BroadcastMessage>, StoreError> {
    for _ in 0..3 {
        let mut connection = connections.checkout().await?;
        let mut transaction = connection.begin().await?;
        if let Some(messages) = publish_in(&mut transaction, jobs).await? {
            transaction.commit().await?;
            return Ok(messages);
        }
    }
    Err(StoreError::Commit(
        "a topic kept changing under publish".to_string(),
    ))
}

/// The batch's rows in `transaction`, topic by topic: one offset bump, one
/// INSERT per message and one trim per topic. None when a topic was created
/// by another caller meanwhile.
async fn publish_in(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    jobs: &[PublishJob],
) -> Result<Option<Vec<BroadcastMessage>>, StoreError> {
    let mut topics: Vec<(&str, &str, Vec<usize>)> = Vec::new();
    for (at, job) in jobs.iter().enumerate() {
        match topics
            .iter_mut()
            .find(|(app, topic, _)| *app == job.app && *topic == job.topic)
        {
            Some((_, _, members)) => members.push(at),
            None => topics.push((&job.app, &job.topic, vec![at])),
        }
    }
    let mut answers: Vec<Option<BroadcastMessage>> = vec![None; jobs.len()];
    for (app, topic, members) in topics {
        let count = members.len() as i64;
        let created_ms = jobs[members[0]].created_ms;
        let Some((epoch, last)) = next_offsets(transaction, app, topic, count, created_ms).await?
        else {
            return Ok(None);
        };
        for (n, at) in members.iter().enumerate() {
            let job = &jobs[*at];
            let offset = last - count + 1 + n as i64;
            sqlx::query(
                "INSERT INTO broadcasts (app, topic, seq, id, payload, created_ms) VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(app.to_string())
            .bind(topic.to_string())
            .bind(offset)
            .bind(id_to_sql(job.id))
            .bind(job.payload.to_vec())
            .bind(ms_to_sql(job.created_ms))
            .execute(&mut **transaction)
            .await?;
            answers[*at] = Some(BroadcastMessage {
                id: job.id,
                app: job.app.clone(),
                topic: job.topic.clone(),
                offset: u64::try_from(offset).unwrap_or(0),
                epoch: u64::try_from(epoch).unwrap_or(0),
                payload: job.payload.clone(),
                created_ms: job.created_ms,
            });
        }
        let newest = &jobs[members[members.len() - 1]];
        trim(transaction, app, topic, last, newest).await?;
    }
    Ok(Some(answers.into_iter().flatten().collect()))
}

/// Drops a topic's entries past its length and age limits, after `last`.
async fn trim(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    app: &str,
    topic: &str,
    last: i64,
    newest: &PublishJob,
) -> Result<(), StoreError> {
    let oldest_kept_ms = newest
        .created_ms
        .saturating_sub(u64::from(newest.limits.stream_max_age_secs) * 1000);
    sqlx::query(
        "DELETE FROM broadcasts WHERE app = ? AND topic = ? AND (seq <= ? OR created_ms < ?)",
    )
    .bind(app.to_string())
    .bind(topic.to_string())
    .bind(last - i64::from(newest.limits.stream_max_len.max(1)))
    .bind(ms_to_sql(oldest_kept_ms))
    .execute(&mut **transaction)
    .await?;
    Ok(())
}

/// Takes the topic's next `count` offsets in `transaction`: its epoch and
/// the last of them, creating the topic (a new epoch) on its first message.
/// None when another caller created the topic at the same moment: try again.
async fn next_offsets(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    app: &str,
    topic: &str,
    count: i64,
    created_ms: u64,
) -> Result<Option<(i64, i64)>, StoreError> {
    let bumped = sqlx::query(
        "UPDATE broadcast_topics SET last_seq = last_seq + ? WHERE app = ? AND topic = ?",
    )
    .bind(count)
    .bind(app.to_string())
    .bind(topic.to_string())
    .execute(&mut **transaction)
    .await?
    .rows_affected();
    if bumped == 0 {
        let created = sqlx::query(
            "INSERT INTO broadcast_topics (app, topic, epoch, last_seq) VALUES (?, ?, ?, ?)",
        )
        .bind(app.to_string())
        .bind(topic.to_string())
        .bind(ms_to_sql(created_ms.max(1)))
        .bind(count)
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
