//! The SQL store: MySQL/MariaDB or SQLite through sqlx's `Any` driver.
//!
//! Only `?` placeholders and i64/String/Vec<u8>/Option values are used, so
//! every statement runs unchanged on both. Ids are u64 snowflakes below 2^63,
//! stored as BIGINT (i64).

use std::sync::{Arc, OnceLock};

use pushgrid_common::db;
use sqlx::AnyPool;
use tokio::sync::Semaphore;

use super::{MessageIds, Owed, StoreLimits};
use crate::error::StoreError;

mod broadcast;
mod connections;
mod group_commit;
mod idempotency;
mod inbox;
mod message_store;
mod retry;
mod rows;

use self::broadcast::Publisher;
pub(crate) use self::connections::Connections;
use self::group_commit::GroupCommit;
pub use self::group_commit::GroupCommitConfig;
pub(crate) use self::retry::{execute_retrying, retry_lock_conflicts};

/// Rows per multi-row INSERT (7 parameters each; SQLite allows 32766).
/// Chunk sizes are powers of two (see [`statement_rows`](crate::store::statement_rows)).
const INSERT_CHUNK_ROWS: usize = 1024;
/// Ids per `IN (...)` list.
const ID_CHUNK: usize = 1024;
/// Users per query when many inboxes are read at once.
const USER_CHUNK: usize = 500;
/// (id, app, user) triples per batched ack UPDATE.
const ACK_CHUNK: usize = 256;
/// The table recording applied migrations, apart from other roles' tables.
const MIGRATIONS_TABLE: &str = "_pushgrid_saver_migrations";
/// Store calls waiting for a group commit; a full queue makes callers wait.
const COMMIT_QUEUE: usize = 4096;
/// Background durable writes in flight in `durability = "redis"` mode; beyond
/// it the durable copy of a push is skipped (and counted), never queued forever.
const MAX_BACKGROUND_WRITES: usize = 256;

/// Cheap to clone: clones share the connections, ids and group commit.
#[derive(Clone)]
pub struct SqlStore {
    connections: Connections,
    ids: Arc<MessageIds>,
    limits: StoreLimits,
    group_commit: Option<Arc<GroupCommit>>,
    background_writes: Arc<Semaphore>,
    owed: Arc<Owed>,
    /// Started by the first publish (a task on the runtime).
    publisher: Arc<OnceLock<Publisher>>,
}
impl SqlStore {
    /// Connects (creating the SQLite file or MySQL database when missing),
    /// runs the migrations, and uses worker id 0 and default limits until
    /// [`with_ids`](Self::with_ids) / [`with_limits`](Self::with_limits).
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        SqlStore::connect_with(url, 16).await
    }

    /// SQLite gets one connection whatever `max_connections` says: it has
    /// one writer anyway, and in WAL mode a connection drops its whole page
    /// cache whenever another one wrote, so with 16 connections most
    /// statements read their pages again from the file (`pushgrid dev` at
    /// 10,000 pushes/s spent about 8 % less CPU per message with one).
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<SqlStore, StoreError> {
        let max_connections = if db::is_sqlite(url) {
            1
        } else {
            max_connections
        };
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
            connections: Connections::new(pool),
            ids: Arc::new(MessageIds::fixed(0)),
            limits: StoreLimits::default(),
            group_commit: None,
            background_writes: Arc::new(Semaphore::new(MAX_BACKGROUND_WRITES)),
            owed: Arc::new(Owed::default()),
            publisher: Arc::new(OnceLock::new()),
        }
    }

    /// Writes Store calls through a group commit (a task on the current
    /// runtime) instead of one transaction per call.
    pub fn with_group_commit(mut self, config: GroupCommitConfig) -> SqlStore {
        self.group_commit = Some(Arc::new(GroupCommit::start(
            self.connections.clone(),
            config,
        )));
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

    /// The pool behind the store, for callers of their own (tests); the
    /// store's statements go through [`connections`](Self::connections).
    pub fn pool(&self) -> &AnyPool {
        self.connections.pool()
    }

    pub(crate) fn connections(&self) -> &Connections {
        &self.connections
    }

    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// The work this store (and its clones) still owes after faults.
    pub(crate) fn owed_work(&self) -> &Owed {
        &self.owed
    }

    /// Closes the connections, waiting for those in use to come back.
    pub async fn close(&self) {
        self.connections.close().await;
    }
}
