//! New messages with fresh ids, and the conversions between a message and
//! its row (ids and milliseconds as BIGINT, placeholder lists).

use bytes::Bytes;
use pushgrid_proto::cluster::{Message, StoreItem};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::SqlStore;
use crate::error::StoreError;
use crate::store::repeated;

impl SqlStore {
    pub(crate) fn new_messages(
        &self,
        app: &str,
        users: &[String],
        payload: &Bytes,
        ttl_secs: u32,
    ) -> Result<Vec<Message>, StoreError> {
        crate::store::new_messages(&self.ids, &self.limits, app, users, payload, ttl_secs, 0)
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
        crate::store::new_messages(
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
        crate::store::new_messages_of_items(&self.ids, &self.limits, items)
    }

    /// One new message id.
    pub(crate) fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.ids.next_ids(1)?[0])
    }
}

pub(super) fn message_from_row(app: &str, user: &str, row: &AnyRow) -> Result<Message, StoreError> {
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
pub(super) fn placeholders(count: usize) -> String {
    debug_assert!(count > 0);
    repeated("?", ", ", count)
}

/// Saver ids are below 2^63 (41 + 10 + 12 bits), so they fit a BIGINT.
pub(super) fn id_to_sql(id: u64) -> i64 {
    debug_assert!(id <= i64::MAX as u64);
    id as i64
}

/// Unix milliseconds fit an i64 for the next 290 million years.
pub(super) fn ms_to_sql(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}
