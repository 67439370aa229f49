//! The group commit: Store calls queued and written many to a transaction
//! with multi-row INSERTs, a few transactions at a time; and the durable copy
//! written behind under durability `redis`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pushgrid_proto::cluster::Message;
use sqlx::{AnyConnection, AssertSqlSafe, Connection as _};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::rows::{id_to_sql, ms_to_sql};
use super::{COMMIT_QUEUE, Connections, INSERT_CHUNK_ROWS, SqlStore};
use crate::error::StoreError;
use crate::metrics;
use crate::store::{repeated, statement_rows};

/// How Store calls are written to SQL: many calls share one transaction
/// with multi-row INSERTs (group commit), `workers` transactions at a time.
#[derive(Debug, Clone, Copy)]
pub struct GroupCommitConfig {
    /// Rows one group commit gathers at most (it takes what is queued, never waits).
    pub batch_rows: usize,
    /// Group commits in flight at once.
    pub workers: usize,
    /// A commit not done by then fails the calls in it (the database is down).
    pub timeout: Duration,
}

impl Default for GroupCommitConfig {
    fn default() -> Self {
        GroupCommitConfig {
            batch_rows: 4000,
            workers: 4,
            timeout: Duration::from_secs(5),
        }
    }
}

struct CommitJob {
    messages: Vec<Message>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The queue into the group commit task.
pub(super) struct GroupCommit {
    jobs: mpsc::Sender<CommitJob>,
}

impl GroupCommit {
    pub(super) fn start(connections: Connections, config: GroupCommitConfig) -> GroupCommit {
        let (jobs, queue) = mpsc::channel(COMMIT_QUEUE);
        tokio::spawn(run_group_commit(connections, config, queue));
        GroupCommit { jobs }
    }
}

/// Takes every queued job (up to `batch_rows` rows) as one batch once a
/// worker is free, and commits it in one transaction. While all workers are
/// busy, jobs pile up in the queue and the next batch grows: the busier the
/// database, the larger its transactions. Ends when every sender is gone.
async fn run_group_commit(
    connections: Connections,
    config: GroupCommitConfig,
    mut queue: mpsc::Receiver<CommitJob>,
) {
    let workers = Arc::new(Semaphore::new(config.workers.max(1)));
    let batch_rows = config.batch_rows.max(1);
    loop {
        let Ok(permit) = workers.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut rows = first.messages.len();
        let mut batch = vec![first];
        while rows < batch_rows {
            match queue.try_recv() {
                Ok(job) => {
                    rows += job.messages.len();
                    batch.push(job);
                }
                Err(_) => break,
            }
        }
        let connections = connections.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let messages: Vec<&Message> = batch.iter().flat_map(|job| &job.messages).collect();
            let result =
                match tokio::time::timeout(config.timeout, insert_all(&connections, &messages))
                    .await
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err(format!("commit not done in {:?}", config.timeout)),
                };
            drop(permit);
            metrics::group_commit(messages.len(), batch.len(), started.elapsed());
            for job in batch {
                let _ = job.done.send(result.clone());
            }
        });
    }
}

/// Inserts `messages` in one transaction, a multi-row INSERT per chunk.
async fn insert_all(connections: &Connections, messages: &[&Message]) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    if messages.len() <= INSERT_CHUNK_ROWS {
        // One statement is atomic on its own: no BEGIN and COMMIT round trips.
        let mut connection = connections.checkout().await?;
        return insert_rows(&mut connection, messages).await;
    }
    let mut connection = connections.checkout().await?;
    let mut transaction = connection.begin().await?;
    insert_rows(&mut transaction, messages).await?;
    transaction.commit().await?;
    Ok(())
}

pub(super) async fn insert_rows(
    connection: &mut AnyConnection,
    messages: &[&Message],
) -> Result<(), StoreError> {
    // On SQLite the statement is written for a power of two rows (see
    // `statement_rows`): the rows past the chunk's are NULLs that `LIMIT`
    // leaves out. MySQL has no `VALUES` table in every version, and its
    // group commits are small enough for the statement cache.
    let sqlite = connection.backend_name() == "SQLite";
    for chunk in messages.chunks(INSERT_CHUNK_ROWS) {
        let row = "(?, ?, ?, ?, ?, ?, NULL, 0, ?)";
        let columns =
            "id, app, user_id, payload, created_ms, expires_ms, acked_ms, attempts, parent_id";
        let sql = if sqlite {
            format!(
                "INSERT INTO messages ({columns}) SELECT * FROM (VALUES {}) LIMIT ?",
                repeated(row, ", ", statement_rows(chunk.len()))
            )
        } else {
            format!(
                "INSERT INTO messages ({columns}) VALUES {}",
                repeated(row, ", ", chunk.len())
            )
        };
        // Generated from a fixed fragment repeated; every value is a bound parameter.
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for message in chunk {
            query = query
                .bind(id_to_sql(message.id))
                .bind(message.app.clone())
                .bind(message.user.clone())
                .bind(message.payload.to_vec())
                .bind(ms_to_sql(message.created_ms))
                .bind(ms_to_sql(message.expires_ms))
                .bind((message.parent_id != 0).then(|| id_to_sql(message.parent_id)));
        }
        if sqlite {
            for _ in chunk.len()..statement_rows(chunk.len()) {
                for _ in 0..row.matches('?').count() {
                    query = query.bind(None::<i64>);
                }
            }
            query = query.bind(chunk.len() as i64);
        }
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

pub(super) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

impl SqlStore {
    /// Makes `messages` durable: through the group commit when there is
    /// one, else in a transaction of their own.
    pub(crate) async fn insert(&self, messages: &[Message]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let Some(group_commit) = &self.group_commit else {
            let messages: Vec<&Message> = messages.iter().collect();
            return insert_all(&self.connections, &messages).await;
        };
        let (done, committed) = oneshot::channel();
        let job = CommitJob {
            messages: messages.to_vec(),
            done,
        };
        group_commit
            .jobs
            .send(job)
            .await
            .map_err(|_| StoreError::Commit("group commit stopped".into()))?;
        committed
            .await
            .map_err(|_| StoreError::Commit("group commit stopped".into()))?
            .map_err(StoreError::Commit)
    }

    /// Writes `messages` without waiting (`durability = "redis"`). When too
    /// many writes are in flight the durable copy is skipped and counted.
    pub(crate) fn insert_in_background(&self, messages: Vec<Message>) {
        let Ok(permit) = self.background_writes.clone().try_acquire_owned() else {
            metrics::durable_copy_failed(messages.len());
            tracing::warn!(
                count = messages.len(),
                "too many durable writes in flight, skipping"
            );
            return;
        };
        let store = self.clone();
        tokio::spawn(async move {
            if let Err(error) = store.insert(&messages).await {
                metrics::durable_copy_failed(messages.len());
                tracing::warn!(%error, count = messages.len(), "durable copy failed");
            }
            drop(permit);
        });
    }
}
