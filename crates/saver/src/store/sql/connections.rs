//! Where the SQL store's statements run: sqlx's pool for MySQL, and for
//! SQLite the pool's one connection, taken out of it and held by the store.
//!
//! Why not the pool for SQLite too: sqlx's pool pings every connection it
//! takes back (`PoolConnection`'s drop spawns a task that does), and an
//! SQLite connection is a worker thread, so each statement cost two round
//! trips to that thread, a spawned task, and the connection stayed busy with
//! the ping while the next statement waited. A file cannot drop a
//! connection, so the ping learns nothing; the store holds the connection
//! behind a fair async mutex instead.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use sqlx::any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Describe, Either, Execute, Executor, SqlStr};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

/// The store's connections; cheap to clone (clones share them). `&Connections`
/// is an [`Executor`], used like `&AnyPool`.
#[derive(Clone)]
pub(crate) struct Connections {
    pool: AnyPool,
    /// SQLite only: the one connection, taken from `pool` at first use;
    /// `Closed` after [`close`](Self::close).
    held: Option<Arc<Mutex<Held>>>,
}

enum Held {
    NotYet,
    Open(AnyConnection),
    Closed,
}

/// One connection for a transaction or several statements in a row:
/// pooled (MySQL) or the held one, locked until this is dropped (SQLite).
pub(crate) enum Checkout<'a> {
    Pooled(PoolConnection<Any>),
    Held(MappedMutexGuard<'a, AnyConnection>),
}

impl Connections {
    pub fn new(pool: AnyPool) -> Connections {
        let sqlite = pool
            .connect_options()
            .database_url
            .scheme()
            .starts_with("sqlite");
        Connections {
            held: sqlite.then(|| Arc::new(Mutex::new(Held::NotYet))),
            pool,
        }
    }

    /// The pool behind these connections (for a caller of its own, like a
    /// test; the store's statements go through `&Connections`).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn is_sqlite(&self) -> bool {
        self.held.is_some()
    }

    /// A connection of its own for the caller, for a transaction
    /// (`checkout.begin()`) or statements that must share one. On SQLite it
    /// is the only one: drop it before any other statement of the store.
    pub async fn checkout(&self) -> Result<Checkout<'_>, sqlx::Error> {
        match &self.held {
            None => Ok(Checkout::Pooled(self.pool.acquire().await?)),
            Some(held) => {
                // Waits no longer than the pool would for a connection.
                let wait = self.pool.options().get_acquire_timeout();
                let mut guard = tokio::time::timeout(wait, held.lock())
                    .await
                    .map_err(|_| sqlx::Error::PoolTimedOut)?;
                if matches!(*guard, Held::NotYet) {
                    *guard = Held::Open(self.pool.acquire().await?.detach());
                }
                MutexGuard::try_map(guard, |held| match held {
                    Held::Open(connection) => Some(connection),
                    Held::NotYet | Held::Closed => None,
                })
                .map(Checkout::Held)
                .map_err(|_| sqlx::Error::PoolClosed)
            }
        }
    }

    /// Closes the held connection (waiting for a statement in progress),
    /// then the pool; later statements fail with `PoolClosed`.
    pub async fn close(&self) {
        if let Some(held) = &self.held {
            let mut guard = held.lock().await;
            if let Held::Open(connection) = std::mem::replace(&mut *guard, Held::Closed) {
                let _ = connection.close().await;
            }
        }
        self.pool.close().await;
    }
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("pool", &self.pool)
            .field("held", &self.held.is_some())
            .finish()
    }
}

impl std::ops::Deref for Checkout<'_> {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            Checkout::Pooled(connection) => connection,
            Checkout::Held(connection) => connection,
        }
    }
}

impl std::ops::DerefMut for Checkout<'_> {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            Checkout::Pooled(connection) => connection,
            Checkout::Held(connection) => connection,
        }
    }
}

impl<'c> Executor<'c> for &'c Connections {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        if self.held.is_none() {
            return self.pool.fetch_many(query);
        }
        // The results are gathered while the connection is locked, then
        // handed out: the store's statements return bounded row counts.
        futures::stream::once(async move {
            match self.checkout().await {
                Ok(mut connection) => connection.fetch_many(query).collect::<Vec<_>>().await,
                Err(error) => vec![Err(error)],
            }
        })
        .flat_map(futures::stream::iter)
        .boxed()
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Any>,
    {
        if self.held.is_none() {
            return self.pool.fetch_optional(query);
        }
        Box::pin(async move { self.checkout().await?.fetch_optional(query).await })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement, sqlx::Error>>
    where
        'c: 'e,
    {
        if self.held.is_none() {
            return self.pool.prepare_with(sql, parameters);
        }
        Box::pin(async move { self.checkout().await?.prepare_with(sql, parameters).await })
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, Result<Describe<Any>, sqlx::Error>>
    where
        'c: 'e,
    {
        if self.held.is_none() {
            return self.pool.describe(sql);
        }
        Box::pin(async move { self.checkout().await?.describe(sql).await })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    async fn rows_in_mine(connections: &Connections) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM mine")
            .fetch_one(connections)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn sqlite_statements_run_on_the_held_connection_wait_for_a_checkout_and_fail_once_closed()
    {
        let dir =
            std::env::temp_dir().join(format!("pg_connections_{:016x}", rand::random::<u64>()));
        let url = format!("sqlite://{}", dir.join("saver.db").display());
        let connections = Connections::new(pushgrid_common::db::connect(&url, 1).await.unwrap());
        assert!(connections.is_sqlite());

        // A temporary table exists in one connection only: every statement
        // sees it, so they all ran on the same one.
        sqlx::query("CREATE TEMP TABLE mine (v INTEGER)")
            .execute(&connections)
            .await
            .unwrap();
        for value in 0..3i64 {
            sqlx::query("INSERT INTO mine (v) VALUES (?)")
                .bind(value)
                .execute(&connections)
                .await
                .unwrap();
        }
        let count = rows_in_mine(&connections).await;
        assert_eq!(count, 3);

        // A transaction on a checkout that is dropped unfinished is rolled back.
        {
            let mut connection = connections.checkout().await.unwrap();
            let mut transaction = connection.begin().await.unwrap();
            sqlx::query("INSERT INTO mine (v) VALUES (99)")
                .execute(&mut *transaction)
                .await
                .unwrap();
        }
        let count = rows_in_mine(&connections).await;
        assert_eq!(count, 3, "the dropped transaction's row is gone");

        // While a checkout is held, other statements wait for it.
        let held = connections.checkout().await.unwrap();
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            sqlx::query("SELECT 1").execute(&connections),
        )
        .await;
        assert!(waited.is_err(), "a statement ran beside a checkout");
        drop(held);
        sqlx::query("SELECT 1").execute(&connections).await.unwrap();

        connections.close().await;
        let closed = sqlx::query("SELECT 1").execute(&connections).await;
        assert!(
            matches!(closed, Err(sqlx::Error::PoolClosed)),
            "after close: {closed:?}"
        );
        assert!(matches!(
            connections.checkout().await.map(drop),
            Err(sqlx::Error::PoolClosed)
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}
