//! Group membership in SQL, the durable copy: bind, unbind, a page of
//! members in byte order, the groups of a user.

use pushgrid_common::now_ms;
use sqlx::{AssertSqlSafe, Connection as _, Row};

use super::{MAX_USER_GROUPS, ROW_CHUNK, insert_ignore, to_sql};
use crate::error::StoreError;
use crate::store::{SqlStore, repeated};

impl SqlStore {
    pub(crate) async fn bind_sql(
        &self,
        app: &str,
        group: &str,
        users: &[String],
    ) -> Result<u64, StoreError> {
        let now = to_sql(now_ms());
        let mut added = 0;
        let mut connection = self.connections().checkout().await?;
        let mut transaction = connection.begin().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let text = format!(
                "{} INTO group_members (app, grp, user_id, created_ms) VALUES {}",
                insert_ignore(self.connections()),
                repeated("(?, ?, ?, ?)", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text));
            for user in chunk {
                query = query
                    .bind(app.to_string())
                    .bind(group.to_string())
                    .bind(user.clone())
                    .bind(now);
            }
            added += query.execute(&mut *transaction).await?.rows_affected();
        }
        transaction.commit().await?;
        Ok(added)
    }

    pub(crate) async fn unbind_sql(
        &self,
        app: &str,
        group: &str,
        users: &[String],
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut connection = self.connections().checkout().await?;
        let mut transaction = connection.begin().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let text = format!(
                "DELETE FROM group_members WHERE app = ? AND grp = ? AND user_id IN ({})",
                repeated("?", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text))
                .bind(app.to_string())
                .bind(group.to_string());
            for user in chunk {
                query = query.bind(user.clone());
            }
            removed += query.execute(&mut *transaction).await?.rows_affected();
        }
        transaction.commit().await?;
        Ok(removed)
    }

    /// Members after `after` (byte order), at most `limit`.
    pub(crate) async fn members_sql(
        &self,
        app: &str,
        group: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        // The alias differs from the column so ORDER BY uses the (binary) column.
        let rows = sqlx::query(
            "SELECT CAST(user_id AS CHAR) AS member FROM group_members \
             WHERE app = ? AND grp = ? AND user_id > ? ORDER BY user_id LIMIT ?",
        )
        .bind(app.to_string())
        .bind(group.to_string())
        .bind(after.to_string())
        .bind(i64::from(limit))
        .fetch_all(self.connections())
        .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("member").map_err(Into::into))
            .collect()
    }

    pub(crate) async fn user_groups_sql(
        &self,
        app: &str,
        user: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT CAST(grp AS CHAR) AS name FROM group_members \
             WHERE app = ? AND user_id = ? ORDER BY grp LIMIT ?",
        )
        .bind(app.to_string())
        .bind(user.to_string())
        .bind(MAX_USER_GROUPS)
        .fetch_all(self.connections())
        .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("name").map_err(Into::into))
            .collect()
    }
}
