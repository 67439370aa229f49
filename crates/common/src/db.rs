//! SQL pools through sqlx's `Any` driver, so the same queries run on MySQL
//! (production) and SQLite (the embedded default). Placeholders are `?` in both.

use std::str::FromStr;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

use crate::{StartError, StartResult};

/// Set on every SQLite connection. In WAL mode `synchronous = NORMAL` syncs
/// the log at checkpoints, not at each commit: a committed write survives
/// the process being killed (kill -9), and only a power cut or kernel crash
/// can take the last commits back. The embedded store is the quick start;
/// the cluster's durable store is MySQL. The cache keeps the inbox indexes
/// in memory (16 MiB per connection at most).
const SQLITE_PRAGMAS: &str = "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -16384;";

/// True for an SQLite URL (`sqlite:` / `sqlite://`).
pub fn is_sqlite(url: &str) -> bool {
    url.starts_with("sqlite:")
}

/// Connects a pool. For SQLite the file and its directory are created; for
/// MySQL the database is created when it does not exist yet.
pub async fn connect(url: &str, max_connections: u32) -> StartResult<AnyPool> {
    sqlx::any::install_default_drivers();
    let mut url = url.to_string();
    let mut max_connections = max_connections.max(1);
    if is_sqlite(&url) {
        if url.contains(":memory:") {
            // Every connection to :memory: is a database of its own.
            max_connections = 1;
        } else {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:");
            let path = path.split('?').next().unwrap_or(path);
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)?;
            }
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') {
                    "&mode=rwc"
                } else {
                    "?mode=rwc"
                });
            }
        }
    } else if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        create_mysql_database(&url).await?;
    }
    let mut options = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10));
    if is_sqlite(&url) {
        options = options
            // A ping before every acquire is a round trip to the connection's
            // worker thread; an SQLite file cannot drop a connection.
            .test_before_acquire(false)
            .after_connect(|connection, _| {
                Box::pin(async move {
                    use sqlx::Executor;
                    connection.execute(SQLITE_PRAGMAS).await.map(drop)
                })
            });
    }
    let pool = options.connect(&url).await.map_err(|error| {
        StartError::Database(format!("cannot connect to {}: {error}", redact(&url)))
    })?;
    if is_sqlite(&url) && !url.contains(":memory:") {
        sqlx::query("PRAGMA journal_mode=WAL")
            .execute(&pool)
            .await?;
    }
    Ok(pool)
}

/// Runs `migrator` recording applied migrations in `table`, so several roles
/// can share one database. On MySQL the run holds a named lock first, so
/// several instances starting at once (two keepers, two savers) migrate one
/// after the other: sqlx's own lock asks MariaDB for an infinite wait with a
/// negative timeout, which MariaDB does not grant, and MySQL's DDL is not
/// transactional, so a race leaves a half-applied migration behind.
pub async fn migrate(
    pool: &AnyPool,
    mut migrator: Migrator,
    table: &'static str,
) -> StartResult<()> {
    migrator.dangerous_set_table_name(table);
    let mut connection = pool.acquire().await?;
    let lock = if connection.backend_name() == "MySQL" {
        let database: Option<String> = sqlx::query_scalar("SELECT DATABASE()")
            .fetch_one(&mut *connection)
            .await?;
        let name = migration_lock_name(database.as_deref().unwrap_or(""), table);
        let granted: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, ?)")
            .bind(name.clone())
            .bind(MIGRATION_LOCK_WAIT_SECS)
            .fetch_one(&mut *connection)
            .await?;
        if granted != Some(1) {
            return Err(StartError::Database(format!(
                "migration failed: another process held the migration lock for {MIGRATION_LOCK_WAIT_SECS} s"
            )));
        }
        Some(name)
    } else {
        None
    };
    let ran = migrator
        .run_direct(None, &mut *connection, false)
        .await
        .map_err(|error| StartError::Database(format!("migration failed: {error}")));
    if let Some(name) = lock {
        let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(name)
            .execute(&mut *connection)
            .await;
    }
    ran
}

/// How long a process waits for another's migration run.
const MIGRATION_LOCK_WAIT_SECS: i64 = 300;

/// A MySQL lock name (at most 64 characters) for migrating `table` of
/// `database`: the same in every process and version (FNV-1a).
fn migration_lock_name(database: &str, table: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in database.bytes().chain([0]).chain(table.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("pushgrid-migrate-{hash:016x}")
}

async fn create_mysql_database(url: &str) -> StartResult<()> {
    use sqlx::ConnectOptions;
    let options = sqlx::mysql::MySqlConnectOptions::from_str(url)?;
    let Some(database) = options.get_database().map(str::to_string) else {
        return Ok(());
    };
    if !database
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(StartError::Config(format!(
            "database name {database:?} must be letters, digits and underscores"
        )));
    }
    // The same URL without its path: the server, not the missing database.
    let host_start = url.find("://").map_or(0, |index| index + 3);
    let server_url = match url[host_start..].find('/') {
        Some(slash) => &url[..host_start + slash],
        None => url,
    };
    let mut connection = sqlx::mysql::MySqlConnectOptions::from_str(server_url)?
        .connect()
        .await
        .map_err(|error| {
            StartError::Database(format!("cannot connect to {}: {error}", redact(url)))
        })?;
    // The name was checked above to be letters, digits and underscores.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS `{database}`"
    )))
    .execute(&mut connection)
    .await?;
    Ok(())
}

/// A URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_lock_names_are_stable_and_short() {
        let name = migration_lock_name("pg_e2e_0123abcd", "_pushgrid_keeper_migrations");
        assert_eq!(
            name,
            migration_lock_name("pg_e2e_0123abcd", "_pushgrid_keeper_migrations")
        );
        assert_ne!(
            name,
            migration_lock_name("pg_e2e_0123abcd", "_pushgrid_saver_migrations")
        );
        assert_ne!(
            name,
            migration_lock_name("pg_e2e_0123abce", "_pushgrid_keeper_migrations")
        );
        assert!(name.len() <= 64);
    }
}
