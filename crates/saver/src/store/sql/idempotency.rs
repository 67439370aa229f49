//! The idempotency keys in SQL: who stored first with a key (its primary
//! key decides), its answer, and the confirmation a retry waits for.

use prost::Message as _;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{Message, StoreResponse};
use sqlx::{Connection as _, Row};

use super::SqlStore;
use super::group_commit::{insert_rows, is_unique_violation};
use super::rows::ms_to_sql;
use crate::error::StoreError;
use crate::store::{IDEMPOTENCY_WINDOW_MS, Stored};

impl SqlStore {
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
        .execute(&self.connections)
        .await?;
        Ok(result.rows_affected() > 0)
    }
}

impl SqlStore {
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
        .fetch_optional(&self.connections)
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
        let mut connection = self.connections.checkout().await?;
        let mut transaction = connection.begin().await?;
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
                // Both: the connection is the only one on SQLite, and the
                // answer is read through it.
                drop(transaction);
                drop(connection);
                return self.idempotent_answer(app, key).await;
            }
            Err(error) => return Err(error.into()),
        }
        let rows: Vec<&Message> = messages.iter().collect();
        insert_rows(&mut transaction, &rows).await?;
        transaction.commit().await?;
        Ok(None)
    }
}
