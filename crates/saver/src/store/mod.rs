//! Message storage behind one trait, with two implementations:
//!
//! * [`SqlStore`]: MySQL/MariaDB or SQLite through sqlx's `Any` driver; the
//!   whole store on its own (dev, small clusters).
//! * [`RedisSqlStore`]: a Redis hot inbox in front of a [`SqlStore`] that keeps
//!   the durable copy used for recovery.
//!
//! Both validate their input the same way ([`validate_store`] and friends), so
//! a caller gets the same answer whichever is configured.

mod groups;
mod history;
mod ids;
mod limits;
pub mod owed;
mod redis_sql;
mod sql;
mod tokens;
mod validate;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem};

pub use groups::{
    GroupStore, MAX_GROUP_BYTES, MAX_USERS_PER_BIND, MembersPage, STATUS_KEEP_AFTER_TTL_MS,
};
pub use owed::{Owed, Withdrawal, Withdrawn};
pub use redis_sql::RedisSqlStore;
pub use sql::{GroupCommitConfig, SqlStore};
pub use tokens::{MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_USER, validate_token};

use self::history::history_answer;
pub use self::ids::{MessageIds, WorkerIdSource};
use self::ids::{new_messages, new_messages_of_items};
pub use self::limits::{
    ALL_TOPIC, DEFAULT_HISTORY_LIMIT, Durability, IDEMPOTENCY_WINDOW_MS, MAX_HISTORY_LIMIT,
    MAX_IDEMPOTENCY_KEY_BYTES, MAX_TOPIC_BYTES, StoreLimits,
};
pub(crate) use self::validate::validate_length;
pub use self::validate::{
    replay_mismatch, validate_ack, validate_history, validate_idempotency_key, validate_pending,
    validate_publish, validate_store, validate_store_many, validate_topic,
};
use self::validate::{validate_app, validate_user};

use crate::error::StoreError;

/// The longest app id (the `app` column is `VARCHAR(64)`).
pub const MAX_APP_BYTES: usize = 64;
/// The longest user id (the `user_id` column is `VARCHAR(255)`).
pub const MAX_USER_BYTES: usize = 255;
/// The largest payload, the device frame limit after AUTH.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// The most users one Store call may name; larger pushes are split by center.
pub const MAX_USERS_PER_STORE: usize = 10_000;
/// Pending answers at most this many messages; 0 asks for [`DEFAULT_PENDING_LIMIT`].
pub const MAX_PENDING_LIMIT: u32 = 1000;
pub const DEFAULT_PENDING_LIMIT: u32 = 100;

/// Inbox reads of one [`MessageStore::pending_many`] run at once by default.
pub const PENDING_MANY_CONCURRENCY: usize = 64;
/// Most inbox reads in one PendingMany call.
pub const MAX_PENDING_MANY: usize = 1000;
/// Most message bytes in one PendingMany answer (rooms decode up to 96 MiB):
/// the reads past it are answered with an error and read again by their
/// room. The first read of a call always fits (1,000 messages of at most
/// 64 KiB).
pub const PENDING_MANY_MAX_BYTES: usize = 32 << 20;

/// One inbox read of a PendingMany call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingRead {
    pub app: String,
    pub user: String,
    pub limit: u32,
}

/// What a Store call stored: one message per user, in `users` order.
#[derive(Debug, Clone, Default)]
pub struct Stored {
    pub messages: Vec<Message>,
    /// True when an idempotency key matched an earlier call: these are that
    /// call's messages and nothing new was stored.
    pub replayed: bool,
}

#[tonic::async_trait]
pub trait MessageStore: GroupStore + Send + Sync + 'static {
    /// Stores one message per user, durably, and returns them in `users` order.
    /// `ttl_secs` 0 means the configured default; above the maximum it is capped.
    async fn store(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
    ) -> Result<Vec<Message>, StoreError>;

    /// Like [`store`](Self::store), but the same `(app, idempotency_key)`
    /// within [`IDEMPOTENCY_WINDOW_MS`] answers the first call's messages and
    /// stores nothing new. An empty key is a plain store. Checks the key and
    /// the arguments, then leaves a keyed store to
    /// [`store_with_key`](Self::store_with_key).
    async fn store_once(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
        idempotency_key: &str,
    ) -> Result<Stored, StoreError> {
        validate_idempotency_key(idempotency_key)?;
        if idempotency_key.is_empty() {
            let messages = self.store(app, users, payload, ttl_secs).await?;
            return Ok(Stored {
                messages,
                replayed: false,
            });
        }
        validate_store(app, users, &payload)?;
        self.store_with_key(app, users, payload, ttl_secs, idempotency_key)
            .await
    }

    /// The store's own part of [`store_once`](Self::store_once): a
    /// non-empty `idempotency_key`, the key and arguments already checked.
    /// Callers use `store_once`.
    async fn store_with_key(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
        idempotency_key: &str,
    ) -> Result<Stored, StoreError>;

    /// Stores many unicast messages at once, each with its own app, user,
    /// payload and TTL, in one write; answers one message per item, in order.
    /// Every item is checked first: one bad item fails the whole call.
    async fn store_many(&self, items: &[StoreItem]) -> Result<Vec<Message>, StoreError>;

    /// Stores one page of a group push: a message per user, each recording
    /// `parent_id` (the group push's id), as [`store`](Self::store) does.
    async fn store_children(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
        parent_id: u64,
    ) -> Result<Vec<Message>, StoreError>;

    /// The unacked, unexpired inbox of one user, oldest first, at most `limit`
    /// messages (0 means the default). Counts one more delivery attempt for each
    /// message returned; `attempts` in the answer includes this one. A message
    /// already delivered `max_attempts` times moves to the dead letters instead.
    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError>;

    /// [`pending`](Self::pending) for many inboxes, one answer per request in
    /// order. By default the reads run side by side,
    /// [`PENDING_MANY_CONCURRENCY`] at a time; a store may share work among
    /// them.
    async fn pending_many(
        &self,
        requests: &[PendingRead],
    ) -> Vec<Result<Vec<Message>, StoreError>> {
        let mut answers = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(PENDING_MANY_CONCURRENCY) {
            let reads: Vec<_> = chunk
                .iter()
                .map(|read| self.pending(&read.app, &read.user, read.limit))
                .collect();
            answers.extend(futures::future::join_all(reads).await);
        }
        answers
    }

    /// Applies ACKs once: marks the messages acknowledged and removes them
    /// from the inbox; returns how many were pending until now (acking twice
    /// counts once). Callers use [`ack`](Self::ack), which retries.
    async fn apply_acks(&self, items: &[AckItem]) -> Result<u64, StoreError>;

    /// Removes the messages of a failed Store call from every store once,
    /// with its idempotency key unless a retry of the call already answered
    /// with them. Callers use [`withdraw`](Self::withdraw), which retries.
    async fn apply_withdrawal(&self, withdrawal: &Withdrawal) -> Result<Withdrawn, StoreError>;

    /// The ACKs and withdrawals this store still owes after faults.
    fn owed(&self) -> &Owed;

    /// Marks messages acknowledged; returns how many were pending until now
    /// (acking twice counts once). An ACK the store does not take is tried
    /// again for up to [`ACK_INLINE_BUDGET`], then kept in
    /// [`owed`](Self::owed) and applied by [`settle_owed`](Self::settle_owed)
    /// until it sticks; meanwhile this saver's inbox reads skip its messages.
    /// Only a bad argument is an error.
    async fn ack(&self, items: Vec<AckItem>) -> Result<u64, StoreError> {
        validate_ack(&items)?;
        let tries = async {
            let mut pause = Duration::from_millis(25);
            loop {
                match self.apply_acks(&items).await {
                    Ok(acked) => return Ok(acked),
                    Err(error) => {
                        crate::metrics::ack_retry();
                        tracing::warn!(%error, "ack not taken by the store; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(200));
                    }
                }
            }
        };
        match tokio::time::timeout(ACK_INLINE_BUDGET, tries).await {
            Ok(result) => result,
            Err(_) => {
                let ids: usize = items.iter().map(|item| item.msg_ids.len()).sum();
                tracing::warn!(
                    ids,
                    "acks kept to be applied when the store takes them again"
                );
                self.owed().owe_acks(items);
                Ok(0)
            }
        }
    }

    /// Withdraws the messages of a Store call that failed (or whose caller
    /// gave up): applies the withdrawal now when the stores answer, and keeps
    /// it in [`owed`](Self::owed) either way, to be applied (again) until it
    /// sticks and once more to confirm it.
    async fn withdraw(&self, withdrawal: Withdrawal) {
        if withdrawal.messages.is_empty() {
            return;
        }
        let count = withdrawal.messages.len();
        let applied =
            match tokio::time::timeout(WITHDRAW_INLINE_BUDGET, self.apply_withdrawal(&withdrawal))
                .await
            {
                Ok(applied) => applied,
                Err(_) => Err(StoreError::Commit(format!(
                    "not done in {WITHDRAW_INLINE_BUDGET:?}"
                ))),
            };
        match applied {
            Ok(Withdrawn::Removed) => {
                crate::metrics::withdrawn(count);
                self.owed().owe_withdrawal(withdrawal, true);
            }
            Ok(Withdrawn::KeptForRetry) => {
                tracing::info!(
                    count,
                    "a retry with the same idempotency key answered these messages; they stay"
                );
            }
            Err(error) => {
                tracing::warn!(%error, count, "cannot withdraw the messages of a failed call yet; will retry");
                self.owed().owe_withdrawal(withdrawal, false);
            }
        }
    }

    /// Applies the owed work that is due (see [`owed`](Self::owed)).
    async fn settle_owed(&self) {
        let (acks, withdrawals) = self.owed().take_due();
        if !acks.is_empty() {
            let items: Vec<AckItem> = acks.iter().map(|ack| ack.item.clone()).collect();
            let applied = match tokio::time::timeout(SETTLE_BUDGET, self.apply_acks(&items)).await {
                Ok(applied) => applied,
                Err(_) => Err(StoreError::Commit(format!("not done in {SETTLE_BUDGET:?}"))),
            };
            match applied {
                Ok(acked) => {
                    crate::metrics::acked(acked);
                    tracing::info!(items = items.len(), "owed acks applied");
                    self.owed().acks_done(acks);
                }
                Err(error) => {
                    crate::metrics::ack_retry();
                    tracing::warn!(%error, items = items.len(), "owed acks still not taken");
                    self.owed().acks_failed(acks);
                }
            }
        }
        for owed in withdrawals {
            let first = !owed.confirming;
            let applied =
                match tokio::time::timeout(SETTLE_BUDGET, self.apply_withdrawal(&owed.withdrawal))
                    .await
                {
                    Ok(applied) => applied,
                    Err(_) => Err(StoreError::Commit(format!("not done in {SETTLE_BUDGET:?}"))),
                };
            match applied {
                Ok(Withdrawn::Removed) => {
                    if first {
                        crate::metrics::withdrawn(owed.withdrawal.messages.len());
                    }
                    self.owed().withdrawal_applied(owed);
                }
                Ok(Withdrawn::KeptForRetry) => self.owed().withdrawal_done(owed),
                Err(error) => {
                    tracing::warn!(%error, count = owed.withdrawal.messages.len(), "owed withdrawal still failing");
                    self.owed().withdrawal_failed(owed);
                }
            }
        }
    }

    /// Appends `payload` to the broadcast stream of `topic` ("" is "all").
    async fn publish(
        &self,
        app: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<BroadcastMessage, StoreError>;

    /// What the stream of `topic` holds after `since_offset` in `epoch`.
    async fn history(&self, query: HistoryQuery) -> Result<History, StoreError>;
}

/// A History call.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub app: String,
    pub topic: String,
    pub since_offset: u64,
    pub epoch: u64,
    pub limit: u32,
}

/// The answer to a History call; see `HistoryResponse` in cluster.proto.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    pub messages: Vec<BroadcastMessage>,
    pub recovered: bool,
    pub offset: u64,
    pub epoch: u64,
}

/// How long [`MessageStore::ack`] keeps trying before it keeps the ACK as owed.
pub const ACK_INLINE_BUDGET: Duration = Duration::from_secs(1);
/// How long a failed Store call tries to withdraw its messages before it
/// answers (the withdrawal is then owed).
pub const WITHDRAW_INLINE_BUDGET: Duration = Duration::from_secs(1);
/// How long one application of owed work may take before it counts as failed.
pub const SETTLE_BUDGET: Duration = Duration::from_secs(5);

/// Applies a store's owed work until `shutdown`: whenever some is due, and at
/// least every [`owed::RETRY_MAX`].
pub async fn settle_owed_until(
    store: Arc<dyn MessageStore>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let wait = store.owed().next_due();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = store.owed().wait(wait) => {}
        }
        store.settle_owed().await;
    }
}

/// `fragment` `count` times with `separator` between: the placeholder lists
/// of multi-row SQL statements (every value stays a bound parameter).
pub(crate) fn repeated(fragment: &str, separator: &str, count: usize) -> String {
    std::iter::repeat_n(fragment, count)
        .collect::<Vec<_>>()
        .join(separator)
}

/// How many rows (or ids) one statement is written for: `count` rounded
/// up to a power of two. The statement's text depends on that number only,
/// so a handful of prepared statements serve batches of every size. Each
/// new text is parsed and planned again, and sqlx keeps 100 statements per
/// connection: with a statement per batch size the cache churned, and an
/// SQLite ack UPDATE of 112 ids took 1,270 µs prepared anew against 340 µs
/// from the cache. Chunk sizes are powers of two for the same reason.
pub(crate) fn statement_rows(count: usize) -> usize {
    count.next_power_of_two()
}

/// `items` and then its last item again until [`statement_rows`] are
/// there: for statements where a repeated row changes nothing (an UPDATE,
/// SELECT or DELETE by key, an INSERT that ignores or merges duplicates).
pub(crate) fn padded<T>(items: &[T]) -> impl Iterator<Item = &T> {
    let padding = statement_rows(items.len()) - items.len();
    items
        .iter()
        .chain(items.last().into_iter().cycle().take(padding))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_written_for_a_power_of_two_rows_padded_with_the_last() {
        let rows: Vec<usize> = (1..=9).map(statement_rows).collect();
        assert_eq!(rows, [1, 2, 4, 4, 8, 8, 8, 8, 16]);
        assert_eq!(
            padded(&[1, 2, 3]).copied().collect::<Vec<_>>(),
            [1, 2, 3, 3]
        );
        assert_eq!(padded(&[7]).copied().collect::<Vec<_>>(), [7]);
        assert_eq!(padded::<u8>(&[]).count(), 0);
        let five: Vec<u8> = padded(&[1, 2, 3, 4, 5]).copied().collect();
        assert_eq!(five, [1, 2, 3, 4, 5, 5, 5, 5]);
    }

    #[test]
    fn repeated_joins_fragments_and_lengths_name_the_value() {
        assert_eq!(repeated("(?, ?)", ", ", 3), "(?, ?), (?, ?), (?, ?)");
        assert_eq!(repeated("?", " OR ", 1), "?");
        assert_eq!(repeated("?", ", ", 0), "");
        let empty = validate_length("user", "", 5).expect_err("empty is refused");
        assert!(
            empty.to_string().contains("user must not be empty"),
            "{empty}"
        );
        let long = validate_length("user", "abcdef", 5).expect_err("6 bytes over 5 are refused");
        assert!(
            long.to_string()
                .contains("user is 6 bytes, at most 5 allowed"),
            "{long}"
        );
        assert!(validate_length("user", "abcde", 5).is_ok());
    }

    #[test]
    fn ttl_defaults_and_caps() {
        let limits = StoreLimits {
            max_inbox: 10,
            default_ttl_secs: 60,
            max_ttl_secs: 120,
            ..StoreLimits::default()
        };
        assert_eq!(limits.effective_ttl_secs(0), 60);
        assert_eq!(limits.effective_ttl_secs(5), 5);
        assert_eq!(limits.effective_ttl_secs(1000), 120);
    }

    fn entry(offset: u64, created_ms: u64) -> BroadcastMessage {
        BroadcastMessage {
            offset,
            epoch: 7,
            created_ms,
            ..Default::default()
        }
    }

    #[test]
    fn history_recovers_only_a_covered_gap_in_the_same_epoch() {
        let query = |since_offset, epoch| HistoryQuery {
            since_offset,
            epoch,
            ..Default::default()
        };
        let held = vec![entry(4, 100), entry(5, 100)];
        let recovered = history_answer(&query(3, 7), 7, 5, held.clone(), 0);
        assert!(recovered.recovered);
        assert_eq!(recovered.messages.len(), 2);
        // The stream starts after the gap: trimmed history.
        assert!(!history_answer(&query(2, 7), 7, 5, held.clone(), 0).recovered);
        // Another epoch, or an offset from the future.
        assert!(!history_answer(&query(3, 6), 7, 5, held.clone(), 0).recovered);
        assert!(!history_answer(&query(9, 7), 7, 5, Vec::new(), 0).recovered);
        // Too old to keep.
        assert!(!history_answer(&query(3, 7), 7, 5, held, 101).recovered);
        // Up to date, or a first subscription.
        let current = history_answer(&query(5, 7), 7, 5, Vec::new(), 0);
        assert!(current.recovered && current.messages.is_empty());
        let first = history_answer(&query(0, 0), 7, 5, Vec::new(), 0);
        assert!(first.recovered && first.offset == 5 && first.epoch == 7);
    }

    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn a_changed_worker_id_keeps_ids_unique() {
        let worker = Arc::new(AtomicU32::new(1));
        let source = worker.clone();
        let ids = MessageIds::new(Arc::new(move || Some(source.load(Ordering::Relaxed))));
        let mut all = ids.next_ids(3000).unwrap_or_default();
        worker.store(2, Ordering::Relaxed);
        all.extend(ids.next_ids(3000).unwrap_or_default());
        worker.store(1, Ordering::Relaxed);
        all.extend(ids.next_ids(3000).unwrap_or_default());
        assert_eq!(all.len(), 9000);
        let unique: std::collections::HashSet<u64> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn no_ids_are_minted_without_a_worker_id() {
        let held = Arc::new(AtomicU32::new(1));
        let source = held.clone();
        // 0 stands for "lapsed" in this test's source.
        let ids = MessageIds::new(Arc::new(move || {
            Some(source.load(Ordering::Relaxed)).filter(|id| *id != 0)
        }));
        assert_eq!(ids.next_ids(2).map(|ids| ids.len()).ok(), Some(2));
        held.store(0, Ordering::Relaxed);
        assert!(matches!(ids.next_ids(1), Err(StoreError::NoWorkerId)));
    }

    #[test]
    fn a_replay_is_held_to_the_first_calls_users_payload_and_ttl() {
        let limits = StoreLimits {
            default_ttl_secs: 60,
            max_ttl_secs: 120,
            ..StoreLimits::default()
        };
        let message = |user: &str, payload: &'static [u8], ttl_secs: u64| Message {
            user: user.into(),
            payload: Bytes::from_static(payload),
            created_ms: 1_000,
            expires_ms: 1_000 + ttl_secs * 1000,
            ..Default::default()
        };
        let first = [message("ann", b"hi", 60), message("bob", b"hi", 60)];
        let users = |names: &[&str]| {
            names
                .iter()
                .map(|name| name.to_string())
                .collect::<Vec<_>>()
        };
        // The same body: the default TTL asked for by 0 or by its value.
        assert_eq!(
            replay_mismatch(&first, &users(&["ann", "bob"]), b"hi", 0, &limits),
            None
        );
        assert_eq!(
            replay_mismatch(&first, &users(&["ann", "bob"]), b"hi", 60, &limits),
            None
        );
        let differs = |names: &[&str], payload: &[u8], ttl| {
            replay_mismatch(&first, &users(names), payload, ttl, &limits)
        };
        assert_eq!(differs(&["bob", "ann"], b"hi", 0), Some("users"));
        assert_eq!(differs(&["ann"], b"hi", 0), Some("users"));
        assert_eq!(differs(&["ann", "bob", "cy"], b"hi", 0), Some("users"));
        assert_eq!(differs(&["ann", "bob"], b"ho", 0), Some("payload"));
        assert_eq!(differs(&["ann", "bob"], b"hi", 90), Some("ttl_secs"));
    }
}
