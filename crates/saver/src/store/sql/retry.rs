//! Lock conflicts (a deadlock victim, a lock wait timeout, a busy SQLite):
//! the statement applied nothing, so it is tried again, up to 3 times.

use std::time::Duration;

use super::Connections;

use crate::error::StoreError;

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
    connections: &Connections,
    build: impl Fn() -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
) -> Result<(), StoreError> {
    retry_lock_conflicts(|| {
        let query = build();
        async move {
            query
                .execute(connections)
                .await
                .map(drop)
                .map_err(StoreError::from)
        }
    })
    .await
}
