//! Device push tokens (issue 25), for every [`MessageStore`](super::MessageStore)
//! through its durable SQL store: `push_tokens (app, provider, token)` says
//! which user and device hold a platform notification token. Tokens live in
//! SQL only (they are read when a notification is sent, not per message).
//!
//! Registering a token moves it to the registering user and device (a phone
//! that changes hands keeps its token) and replaces the device's previous
//! token of the same provider; a token without a device (a backend that
//! registers tokens itself) replaces nothing else.

use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{DevicePushToken, TokenKey};
use sqlx::{AssertSqlSafe, Connection as _, Row};

use super::{SqlStore, repeated, validate_app, validate_length, validate_user};
use crate::error::StoreError;

/// The most tokens one register or remove call may carry.
pub const MAX_TOKENS_PER_CALL: usize = 1000;
/// The most tokens one user may hold per app; a registration beyond it
/// drops the user's least recently updated tokens.
pub const MAX_TOKENS_PER_USER: usize = 100;

/// Checks one token's fields (the errors name the field).
pub fn validate_token(token: &DevicePushToken) -> Result<(), StoreError> {
    validate_user(&token.user)?;
    pushgrid_wire::check_push_token(&token.provider, &token.token, &token.bundle)
        .map_err(StoreError::invalid)?;
    if !token.device.is_empty() {
        validate_length("device", &token.device, pushgrid_wire::MAX_ID_BYTES)?;
    }
    if token.platform.len() > pushgrid_wire::MAX_ID_BYTES {
        return Err(StoreError::invalid(format!(
            "platform is {} bytes, at most {} allowed",
            token.platform.len(),
            pushgrid_wire::MAX_ID_BYTES
        )));
    }
    Ok(())
}

fn check_count(count: usize) -> Result<(), StoreError> {
    if count > MAX_TOKENS_PER_CALL {
        return Err(StoreError::invalid(format!(
            "tokens: {count} in one call, at most {MAX_TOKENS_PER_CALL} allowed"
        )));
    }
    Ok(())
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl SqlStore {
    /// Stores tokens (see the module's notes); returns how many were stored.
    pub async fn register_tokens(
        &self,
        app: &str,
        tokens: &[DevicePushToken],
    ) -> Result<u64, StoreError> {
        validate_app(app)?;
        check_count(tokens.len())?;
        tokens.iter().try_for_each(validate_token)?;
        let now = to_sql(now_ms());
        // Two registrations of the same token or device at once can deadlock
        // in InnoDB (each DELETE's gap lock blocks the other's INSERT); the
        // victim applied nothing and is tried again.
        crate::store::sql::retry_lock_conflicts(|| self.replace_tokens(app, tokens, now)).await?;
        for user in distinct_users(tokens) {
            self.trim_user_tokens(app, user).await?;
        }
        Ok(tokens.len() as u64)
    }

    /// One transaction: each token's previous holder and the device's
    /// previous token of the same provider go, the token is inserted.
    async fn replace_tokens(
        &self,
        app: &str,
        tokens: &[DevicePushToken],
        now: i64,
    ) -> Result<(), StoreError> {
        let mut connection = self.connections().checkout().await?;
        let mut transaction = connection.begin().await?;
        for token in tokens {
            // The token's previous holder, and the device's previous token.
            sqlx::query(
                "DELETE FROM push_tokens WHERE app = ? AND ((provider = ? AND token = ?) \
                 OR (? <> '' AND user_id = ? AND device = ? AND provider = ?))",
            )
            .bind(app.to_string())
            .bind(token.provider.clone())
            .bind(token.token.clone())
            .bind(token.device.clone())
            .bind(token.user.clone())
            .bind(token.device.clone())
            .bind(token.provider.clone())
            .execute(&mut *transaction)
            .await?;
            sqlx::query(
                "INSERT INTO push_tokens (app, provider, token, user_id, device, platform, \
                 bundle, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .bind(app.to_string())
            .bind(token.provider.clone())
            .bind(token.token.clone())
            .bind(token.user.clone())
            .bind(token.device.clone())
            .bind(token.platform.clone())
            .bind(token.bundle.clone())
            .bind(if token.created_ms == 0 {
                now
            } else {
                to_sql(token.created_ms)
            })
            .bind(now)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(())
    }

    /// Drops a user's least recently updated tokens beyond [`MAX_TOKENS_PER_USER`].
    async fn trim_user_tokens(&self, app: &str, user: &str) -> Result<(), StoreError> {
        let held = self.list_tokens(app, user).await?;
        if held.len() <= MAX_TOKENS_PER_USER {
            return Ok(());
        }
        let stale: Vec<TokenKey> = held[MAX_TOKENS_PER_USER..]
            .iter()
            .map(|token| TokenKey {
                provider: token.provider.clone(),
                token: token.token.clone(),
            })
            .collect();
        self.remove_tokens(app, &stale).await?;
        Ok(())
    }

    /// A user's tokens, most recently updated first.
    pub async fn list_tokens(
        &self,
        app: &str,
        user: &str,
    ) -> Result<Vec<DevicePushToken>, StoreError> {
        self.list_tokens_of_users(app, &[user.to_string()]).await
    }

    /// The tokens of several users of one app, with one query (at most
    /// 1000 users), each carrying its user, most recently updated first.
    pub async fn list_tokens_of_users(
        &self,
        app: &str,
        users: &[String],
    ) -> Result<Vec<DevicePushToken>, StoreError> {
        validate_app(app)?;
        check_count(users.len())?;
        for user in users {
            validate_user(user)?;
        }
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders = vec!["?"; users.len()].join(", ");
        let sql = format!(
            "SELECT CAST(user_id AS CHAR) AS user_text, provider, CAST(token AS CHAR) AS token_text, \
             CAST(device AS CHAR) AS device_text, platform, bundle, created_ms, updated_ms \
             FROM push_tokens WHERE app = ? AND user_id IN ({placeholders}) \
             ORDER BY updated_ms DESC, provider, token LIMIT ?"
        );
        // Only placeholders are formatted into the text; every value is bound.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(app.to_string());
        for user in users {
            query = query.bind(user.clone());
        }
        let rows = query
            .bind(to_sql((MAX_TOKENS_PER_USER * 2 * users.len()) as u64))
            .fetch_all(self.connections())
            .await?;
        rows.iter()
            .map(|row| {
                Ok(DevicePushToken {
                    user: row.try_get("user_text")?,
                    device: row.try_get("device_text")?,
                    platform: row.try_get("platform")?,
                    provider: row.try_get("provider")?,
                    token: row.try_get("token_text")?,
                    bundle: row.try_get("bundle")?,
                    created_ms: u64::try_from(row.try_get::<i64, _>("created_ms")?).unwrap_or(0),
                    updated_ms: u64::try_from(row.try_get::<i64, _>("updated_ms")?).unwrap_or(0),
                })
            })
            .collect()
    }

    /// Removes tokens by (provider, token), whoever holds them; returns how
    /// many were stored. Saver calls this too when a provider says a token
    /// is dead.
    pub async fn remove_tokens(&self, app: &str, keys: &[TokenKey]) -> Result<u64, StoreError> {
        validate_app(app)?;
        check_count(keys.len())?;
        for key in keys {
            pushgrid_wire::check_provider(&key.provider).map_err(StoreError::invalid)?;
            validate_length("token", &key.token, pushgrid_wire::MAX_TOKEN_BYTES)?;
        }
        let mut removed = 0;
        for chunk in keys.chunks(200) {
            let text = format!(
                "DELETE FROM push_tokens WHERE app = ? AND ({})",
                repeated("(provider = ? AND token = ?)", " OR ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text)).bind(app.to_string());
            for key in chunk {
                query = query.bind(key.provider.clone()).bind(key.token.clone());
            }
            removed += query.execute(self.connections()).await?.rows_affected();
        }
        Ok(removed)
    }

    /// Removes every token of a user; returns how many.
    pub async fn remove_user_tokens(&self, app: &str, user: &str) -> Result<u64, StoreError> {
        validate_app(app)?;
        validate_user(user)?;
        Ok(
            sqlx::query("DELETE FROM push_tokens WHERE app = ? AND user_id = ?")
                .bind(app.to_string())
                .bind(user.to_string())
                .execute(self.connections())
                .await?
                .rows_affected(),
        )
    }
}

fn distinct_users(tokens: &[DevicePushToken]) -> Vec<&str> {
    let mut users: Vec<&str> = tokens.iter().map(|token| token.user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    users
}
