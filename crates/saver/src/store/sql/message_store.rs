//! [`MessageStore`] for [`SqlStore`] alone (no Redis): every call goes
//! straight to the SQL steps of the sibling modules.

use std::time::Instant;

use bytes::Bytes;
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem};

use super::SqlStore;
use super::retry::retry_lock_conflicts;
use crate::error::StoreError;
use crate::metrics;
use crate::store::{History, HistoryQuery, MessageStore, Owed, Stored, Withdrawal, Withdrawn};

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
        crate::store::validate_store(app, users, &payload)?;
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
        crate::store::validate_store_many(items)?;
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
        crate::store::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self.new_children(app, users, &payload, ttl_secs, parent_id)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = crate::store::validate_pending(app, user, limit)?;
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
        crate::store::validate_ack(items)?;
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
        let topic = crate::store::validate_publish(app, topic, &payload)?;
        self.publish_sql(app, topic, payload).await
    }

    async fn history(&self, query: HistoryQuery) -> Result<History, StoreError> {
        let query = crate::store::validate_history(query)?;
        self.history_sql(&query).await
    }
}
