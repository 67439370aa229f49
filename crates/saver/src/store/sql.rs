//! The SQL store: MySQL/MariaDB or SQLite through sqlx's `Any` driver.
//!
//! Only `?` placeholders and i64/String/Vec<u8>/Option values are used, so
//! every statement runs unchanged on both. Ids are u64 snowflakes below 2^63,
//! stored as BIGINT (i64).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use pushgrid_common::{db, now_ms};
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem, StoreResponse};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Row};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    History, HistoryQuery, IDEMPOTENCY_WINDOW_MS, MessageIds, MessageStore, Owed, StoreLimits,
    Stored, Withdrawal, Withdrawn, repeated,
};
use crate::error::StoreError;
use crate::metrics;

/// Rows per multi-row INSERT (6 parameters each; SQLite allows 32766).
const INSERT_CHUNK_ROWS: usize = 1000;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 1000;
/// Users per query when many inboxes are read at once.
const USER_CHUNK: usize = 500;
/// (id, app, user) triples per batched ack UPDATE.
const ACK_CHUNK: usize = 300;
/// The table recording applied migrations, apart from other roles' tables.
const MIGRATIONS_TABLE: &str = "_pushgrid_saver_migrations";
/// Store calls waiting for a group commit; a full queue makes callers wait.
const COMMIT_QUEUE: usize = 4096;
/// Background durable writes in flight in `durability = "redis"` mode; beyond
/// it the durable copy of a push is skipped (and counted), never queued forever.
const MAX_BACKGROUND_WRITES: usize = 256;

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
struct GroupCommit {
    jobs: mpsc::Sender<CommitJob>,
}

impl GroupCommit {
    fn start(pool: AnyPool, config: GroupCommitConfig) -> GroupCommit {
        let (jobs, queue) = mpsc::channel(COMMIT_QUEUE);
        tokio::spawn(run_group_commit(pool, config, queue));
        GroupCommit { jobs }
    }
}

/// Takes every queued job (up to `batch_rows` rows) as one batch once a
/// worker is free, and commits it in one transaction. While all workers are
/// busy, jobs pile up in the queue and the next batch grows: the busier the
/// database, the larger its transactions. Ends when every sender is gone.
async fn run_group_commit(
    pool: AnyPool,
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
        let pool = pool.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let messages: Vec<&Message> = batch.iter().flat_map(|job| &job.messages).collect();
            let result =
                match tokio::time::timeout(config.timeout, insert_all(&pool, &messages)).await {
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
async fn insert_all(pool: &AnyPool, messages: &[&Message]) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    if messages.len() <= INSERT_CHUNK_ROWS {
        // One statement is atomic on its own: no BEGIN and COMMIT round trips.
        let mut connection = pool.acquire().await?;
        return insert_rows(&mut connection, messages).await;
    }
    let mut transaction = pool.begin().await?;
    insert_rows(&mut transaction, messages).await?;
    transaction.commit().await?;
    Ok(())
}

async fn insert_rows(
    connection: &mut AnyConnection,
    messages: &[&Message],
) -> Result<(), StoreError> {
    for chunk in messages.chunks(INSERT_CHUNK_ROWS) {
        let sql = format!(
            "INSERT INTO messages (id, app, user_id, payload, created_ms, expires_ms, acked_ms, attempts, parent_id) VALUES {}",
            repeated("(?, ?, ?, ?, ?, ?, NULL, 0, ?)", ", ", chunk.len())
        );
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
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(database) if database.is_unique_violation())
}

/// A statement that lost a lock conflict and applied nothing: MySQL chose it
/// as a deadlock victim (SQLSTATE 40001, error 1213) or it waited too long for
/// a row lock (1205); SQLite's database was busy or locked.
fn is_lock_conflict(error: &StoreError) -> bool {
    let StoreError::Sql(sqlx::Error::Database(database)) = error else {
        return false;
    };
    matches!(
        database.code().as_deref(),
        Some("40001" | "5" | "6" | "517")
    ) || database.message().contains("Lock wait timeout exceeded")
}

/// Runs `attempt` again, up to 3 times in all, after a lock conflict
/// (batched writes of delivery and ACK rows from many rooms take row locks in
/// different orders; the loser of a deadlock can simply try again).
pub(crate) async fn retry_lock_conflicts<T, F, Fut>(mut attempt: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut tries = 1u32;
    loop {
        match attempt().await {
            Err(error) if tries < 3 && is_lock_conflict(&error) => {
                ::metrics::counter!("pushgrid_saver_sql_lock_retries_total").increment(1);
                let pause = rand::random_range(5..25u64) * u64::from(tries);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Executes the statement `build` makes, built again for each attempt of
/// [`retry_lock_conflicts`] (a query is used up by executing it).
pub(crate) async fn execute_retrying<'q>(
    pool: &AnyPool,
    build: impl Fn() -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
) -> Result<(), StoreError> {
    retry_lock_conflicts(|| {
        let query = build();
        async move {
            query
                .execute(pool)
                .await
                .map(drop)
                .map_err(StoreError::from)
        }
    })
    .await
}

/// Cheap to clone: clones share the pool, ids and group commit.
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    ids: Arc<MessageIds>,
    limits: StoreLimits,
    group_commit: Option<Arc<GroupCommit>>,
    background_writes: Arc<Semaphore>,
    owed: Arc<Owed>,
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
            group_commit: None,
            background_writes: Arc::new(Semaphore::new(MAX_BACKGROUND_WRITES)),
            owed: Arc::new(Owed::default()),
        }
    }

    /// Writes Store calls through a group commit (a task on the current
    /// runtime) instead of one transaction per call.
    pub fn with_group_commit(mut self, config: GroupCommitConfig) -> SqlStore {
        self.group_commit = Some(Arc::new(GroupCommit::start(self.pool.clone(), config)));
        self
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
    ) -> Result<Vec<Message>, StoreError> {
        super::new_messages(&self.ids, &self.limits, app, users, payload, ttl_secs, 0)
    }

    /// The messages of one page of a group push, each naming `parent_id`.
    pub(crate) fn new_children(
        &self,
        app: &str,
        users: &[String],
        payload: &Bytes,
        ttl_secs: u32,
        parent_id: u64,
    ) -> Result<Vec<Message>, StoreError> {
        super::new_messages(
            &self.ids,
            &self.limits,
            app,
            users,
            payload,
            ttl_secs,
            parent_id,
        )
    }

    /// One new message per StoreMany item.
    pub(crate) fn new_messages_of_items(
        &self,
        items: &[StoreItem],
    ) -> Result<Vec<Message>, StoreError> {
        super::new_messages_of_items(&self.ids, &self.limits, items)
    }

    /// One new message id.
    pub(crate) fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.ids.next_ids(1)?[0])
    }

    /// The work this store (and its clones) still owes after faults.
    pub(crate) fn owed_work(&self) -> &Owed {
        &self.owed
    }

    /// Records that a retry with an idempotency key answers the first call's
    /// messages, so a withdrawal of that call keeps them. False when the key
    /// is unknown (the first call failed and was withdrawn meanwhile).
    pub(crate) async fn confirm_key(&self, app: &str, key: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE idempotency SET confirmed = confirmed + 1 WHERE app = ? AND idem_key = ? AND created_ms > ?",
        )
        .bind(app.to_string())
        .bind(key.to_string())
        .bind(ms_to_sql(now_ms().saturating_sub(IDEMPOTENCY_WINDOW_MS)))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Deletes the rows of a failed Store call's messages (and their
    /// delivery records) in one transaction, with its idempotency key unless
    /// a retry confirmed the key (then nothing is deleted).
    pub(crate) async fn withdraw_rows(
        &self,
        withdrawal: &Withdrawal,
    ) -> Result<Withdrawn, StoreError> {
        let ids: Vec<u64> = withdrawal.ids().collect();
        let mut transaction = self.pool.begin().await?;
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
            for row in query.fetch_all(&self.pool).await? {
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

    /// Closes the pool, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Makes `messages` durable: through the group commit when there is
    /// one, else in a transaction of their own.
    pub(crate) async fn insert(&self, messages: &[Message]) -> Result<(), StoreError> {
        if messages.is_empty() {
            return Ok(());
        }
        let Some(group_commit) = &self.group_commit else {
            let messages: Vec<&Message> = messages.iter().collect();
            return insert_all(&self.pool, &messages).await;
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

    /// The answer an idempotency key already has, if it is under 24 h old.
    pub(crate) async fn idempotent_answer(
        &self,
        app: &str,
        key: &str,
    ) -> Result<Option<Stored>, StoreError> {
        let row = sqlx::query(
            "SELECT response FROM idempotency WHERE app = ? AND idem_key = ? AND created_ms > ?",
        )
        .bind(app.to_string())
        .bind(key.to_string())
        .bind(ms_to_sql(now_ms().saturating_sub(IDEMPOTENCY_WINDOW_MS)))
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let bytes: Vec<u8> = row.try_get("response")?;
        let response = StoreResponse::decode(bytes.as_slice())
            .map_err(|error| StoreError::Corrupt(format!("idempotency answer: {error}")))?;
        Ok(Some(Stored {
            messages: response.messages,
            replayed: true,
        }))
    }

    /// Stores `messages` under an idempotency key in one transaction; when the
    /// key was taken meanwhile, stores nothing and returns the first answer.
    pub(crate) async fn insert_with_key(
        &self,
        app: &str,
        key: &str,
        messages: &[Message],
    ) -> Result<Option<Stored>, StoreError> {
        let now = now_ms();
        let response = StoreResponse {
            messages: messages.to_vec(),
            replayed: false,
        }
        .encode_to_vec();
        let mut transaction = self.pool.begin().await?;
        sqlx::query("DELETE FROM idempotency WHERE app = ? AND idem_key = ? AND created_ms <= ?")
            .bind(app.to_string())
            .bind(key.to_string())
            .bind(ms_to_sql(now.saturating_sub(IDEMPOTENCY_WINDOW_MS)))
            .execute(&mut *transaction)
            .await?;
        let claimed = sqlx::query(
            "INSERT INTO idempotency (app, idem_key, response, created_ms) VALUES (?, ?, ?, ?)",
        )
        .bind(app.to_string())
        .bind(key.to_string())
        .bind(response)
        .bind(ms_to_sql(now))
        .execute(&mut *transaction)
        .await;
        match claimed {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                drop(transaction);
                return self.idempotent_answer(app, key).await;
            }
            Err(error) => return Err(error.into()),
        }
        let rows: Vec<&Message> = messages.iter().collect();
        insert_rows(&mut transaction, &rows).await?;
        transaction.commit().await?;
        Ok(None)
    }

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
        let mut transaction = self.pool.begin().await?;
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
            let mut transaction = self.pool.begin().await?;
            let bumped = sqlx::query(
                "UPDATE broadcast_topics SET last_seq = last_seq + 1 WHERE app = ? AND topic = ?",
            )
            .bind(app.to_string())
            .bind(topic.to_string())
            .execute(&mut *transaction)
            .await?
            .rows_affected();
            if bumped == 0 {
                let created = sqlx::query(
                    "INSERT INTO broadcast_topics (app, topic, epoch, last_seq) VALUES (?, ?, ?, 1)",
                )
                .bind(app.to_string())
                .bind(topic.to_string())
                .bind(ms_to_sql(created_ms.max(1)))
                .execute(&mut *transaction)
                .await;
                match created {
                    Ok(_) => {}
                    Err(error) if is_unique_violation(&error) => continue,
                    Err(error) => return Err(error.into()),
                }
            }
            let row = sqlx::query(
                "SELECT epoch, last_seq FROM broadcast_topics WHERE app = ? AND topic = ?",
            )
            .bind(app.to_string())
            .bind(topic.to_string())
            .fetch_one(&mut *transaction)
            .await?;
            let epoch: i64 = row.try_get("epoch")?;
            let offset: i64 = row.try_get("last_seq")?;
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
                .fetch_optional(&self.pool)
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
            .fetch_all(&self.pool)
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
        Ok(super::history_answer(
            query,
            epoch,
            offset,
            entries,
            oldest_kept_ms,
        ))
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
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                let user: String = row.try_get("user_id")?;
                let message = message_from_row(app, &user, row)?;
                inboxes.entry(user).or_default().push(message);
            }
        }
        Ok(inboxes)
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
                repeated("(id = ? AND app = ? AND user_id = ?)", " OR ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(acked_ms);
            for (id, app, user) in chunk {
                query = query.bind(*id).bind(app.to_string()).bind(user.to_string());
            }
            acked += query.execute(&self.pool).await?.rows_affected();
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
        // Their per-device status goes with them.
        self.delete_deliveries(&ids).await?;
        Ok(deleted)
    }
}

impl SqlStore {
    /// Writes new messages durably; when that fails (or its outcome is
    /// unknown: a commit that timed out may still land) they are withdrawn,
    /// so a failed call leaves nothing deliverable.
    async fn write_new(&self, messages: &[Message]) -> Result<(), StoreError> {
        if let Err(error) = self.insert(messages).await {
            self.withdraw(Withdrawal::of(messages, None)).await;
            return Err(error);
        }
        Ok(())
    }

    /// Answers a retry with the first call's messages, once the key is
    /// confirmed (so a withdrawal of the first call keeps them).
    async fn replay(&self, app: &str, key: &str, first: Stored) -> Result<Stored, StoreError> {
        if !self.confirm_key(app, key).await? {
            return Err(StoreError::Commit(
                "the first call with this idempotency key failed and was withdrawn; retry".into(),
            ));
        }
        Ok(first)
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
        let messages = self.new_messages(app, users, &payload, ttl_secs)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn store_with_key(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
        idempotency_key: &str,
    ) -> Result<Stored, StoreError> {
        if let Some(first) = self.idempotent_answer(app, idempotency_key).await? {
            return self.replay(app, idempotency_key, first).await;
        }
        let messages = self.new_messages(app, users, &payload, ttl_secs)?;
        match retry_lock_conflicts(|| self.insert_with_key(app, idempotency_key, &messages)).await {
            Ok(Some(first)) => self.replay(app, idempotency_key, first).await,
            Ok(None) => Ok(Stored {
                messages,
                replayed: false,
            }),
            Err(error) => {
                self.withdraw(Withdrawal::of(&messages, Some((app, idempotency_key))))
                    .await;
                Err(error)
            }
        }
    }

    async fn store_many(&self, items: &[StoreItem]) -> Result<Vec<Message>, StoreError> {
        super::validate_store_many(items)?;
        let started = Instant::now();
        let messages = self.new_messages_of_items(items)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn store_children(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
        parent_id: u64,
    ) -> Result<Vec<Message>, StoreError> {
        super::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self.new_children(app, users, &payload, ttl_secs, parent_id)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = super::validate_pending(app, user, limit)?;
        metrics::inbox_dropped(self.drop_over_cap(app, user).await?);
        let max_attempts = self.limits.max_attempts.max(1);
        let (dead, mut messages): (Vec<Message>, Vec<Message>) = self
            .unacked(app, user, limit)
            .await?
            .into_iter()
            // Acked, or being withdrawn, where the store has not taken it yet.
            .filter(|message| !self.owed.hides(message.id))
            .partition(|message| message.attempts >= max_attempts);
        self.dead_letter(&dead, true).await?;
        let ids: Vec<u64> = messages.iter().map(|message| message.id).collect();
        self.count_attempts(&ids).await?;
        for message in &mut messages {
            message.attempts = message.attempts.saturating_add(1);
        }
        Ok(messages)
    }

    async fn apply_acks(&self, items: &[AckItem]) -> Result<u64, StoreError> {
        super::validate_ack(items)?;
        retry_lock_conflicts(|| self.mark_acked(items)).await
    }

    async fn apply_withdrawal(&self, withdrawal: &Withdrawal) -> Result<Withdrawn, StoreError> {
        retry_lock_conflicts(|| self.withdraw_rows(withdrawal)).await
    }

    fn owed(&self) -> &Owed {
        &self.owed
    }

    async fn publish(
        &self,
        app: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<BroadcastMessage, StoreError> {
        let topic = super::validate_publish(app, topic, &payload)?;
        self.publish_sql(app, topic, payload).await
    }

    async fn history(&self, query: HistoryQuery) -> Result<History, StoreError> {
        let query = super::validate_history(query)?;
        self.history_sql(&query).await
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
        ..Message::default()
    })
}

/// `?, ?, ?` with `count` placeholders.
fn placeholders(count: usize) -> String {
    debug_assert!(count > 0);
    repeated("?", ", ", count)
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
