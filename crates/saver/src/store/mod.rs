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
pub mod owed;
mod redis_sql;
mod sql;
mod tokens;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pushgrid_common::ids::{IdGenerator, MAX_WORKER_ID};
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem};

pub use groups::{
    GroupStore, MAX_GROUP_BYTES, MAX_USERS_PER_BIND, MembersPage, STATUS_KEEP_AFTER_TTL_MS,
};
pub use owed::{Owed, Withdrawal, Withdrawn};
pub use redis_sql::RedisSqlStore;
pub use sql::{GroupCommitConfig, SqlStore};
pub use tokens::{MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_USER, validate_token};

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

/// An idempotency key is remembered this long.
pub const IDEMPOTENCY_WINDOW_MS: u64 = 24 * 3600 * 1000;
/// The longest idempotency key (the `idem_key` column is `VARCHAR(255)`).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
/// The longest topic (the `topic` column is `VARCHAR(255)`).
pub const MAX_TOPIC_BYTES: usize = 255;
/// The topic of a broadcast to everyone; an empty topic means it too.
pub const ALL_TOPIC: &str = "all";
pub const DEFAULT_HISTORY_LIMIT: u32 = 100;
pub const MAX_HISTORY_LIMIT: u32 = 1000;

/// When a Store call answers (Redis + SQL stores).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the message is in Redis and committed in SQL (MySQL).
    #[default]
    Mysql,
    /// After Redis alone; the SQL copy is written behind.
    Redis,
}

/// Limits every store applies.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    /// Unacked messages kept per user; the oldest are dropped beyond it.
    pub max_inbox: u32,
    pub default_ttl_secs: u32,
    pub max_ttl_secs: u32,
    /// Deliveries without an ACK after which a message goes to the dead letters.
    pub max_attempts: u32,
    /// Entries a broadcast stream keeps (the oldest are trimmed).
    pub stream_max_len: u32,
    /// How long a broadcast stream keeps an entry.
    pub stream_max_age_secs: u32,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits {
            max_inbox: 1000,
            default_ttl_secs: 7 * 24 * 3600,
            max_ttl_secs: 30 * 24 * 3600,
            max_attempts: 5,
            stream_max_len: 10_000,
            stream_max_age_secs: 24 * 3600,
        }
    }
}

/// Why a replayed idempotent answer does not belong to this call: the first
/// call with the key stored other users, another payload or another TTL.
/// `None`: the same body (same users in the same order, same payload, same
/// effective TTL), so the first answer is this call's answer too.
pub fn replay_mismatch(
    first: &[Message],
    users: &[String],
    payload: &[u8],
    ttl_secs: u32,
    limits: &StoreLimits,
) -> Option<&'static str> {
    if first.len() != users.len()
        || first
            .iter()
            .zip(users)
            .any(|(message, user)| message.user != *user)
    {
        return Some("users");
    }
    if first.iter().any(|message| message.payload != payload) {
        return Some("payload");
    }
    let ttl_ms = u64::from(limits.effective_ttl_secs(ttl_secs)) * 1000;
    if first
        .iter()
        .any(|message| message.expires_ms.saturating_sub(message.created_ms) != ttl_ms)
    {
        return Some("ttl_secs");
    }
    None
}

impl StoreLimits {
    /// The TTL a message stored with `requested` seconds gets.
    pub fn effective_ttl_secs(&self, requested: u32) -> u32 {
        let max = self.max_ttl_secs.max(1);
        let ttl = if requested == 0 {
            self.default_ttl_secs
        } else {
            requested
        };
        ttl.clamp(1, max)
    }
}

/// Where a saver's worker id comes from: the fenced lease keeper granted
/// (`Cluster::worker_lease`), read at every call; None while the lease may
/// have lapsed.
pub type WorkerIdSource = Arc<dyn Fn() -> Option<u32> + Send + Sync>;

/// Message ids for the worker id keeper granted this node, which may change
/// while the node runs (after a lost lease), and which may be missing: then
/// no id is minted ([`StoreError::NoWorkerId`]), since another saver may
/// hold the id by now.
///
/// One generator is kept per worker id ever used, never rebuilt: a fresh
/// generator forgets the sequence state, and could repeat an id its
/// predecessor made in the same millisecond.
pub struct MessageIds {
    worker_id: WorkerIdSource,
    generators: Mutex<HashMap<u32, Arc<IdGenerator>>>,
}

impl MessageIds {
    /// Follows `worker_id`, read at every call.
    pub fn new(worker_id: WorkerIdSource) -> MessageIds {
        MessageIds {
            worker_id,
            generators: Mutex::new(HashMap::new()),
        }
    }

    /// Follows a node's fenced worker id lease.
    pub fn from_lease(lease: pushgrid_common::cluster::WorkerLease) -> MessageIds {
        MessageIds::new(Arc::new(move || lease.current()))
    }

    /// A fixed worker id, for tests and single-node use.
    pub fn fixed(worker_id: u32) -> MessageIds {
        MessageIds::new(Arc::new(move || Some(worker_id)))
    }

    /// `count` new ids, increasing; an error while no worker id is held.
    pub fn next_ids(&self, count: usize) -> Result<Vec<u64>, StoreError> {
        let Some(worker_id) = (self.worker_id)() else {
            crate::metrics::no_worker_id();
            return Err(StoreError::NoWorkerId);
        };
        let worker_id = worker_id & MAX_WORKER_ID;
        let generator = {
            // Held only for the map lookup; never across an await.
            let mut generators = self
                .generators
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            generators
                .entry(worker_id)
                .or_insert_with(|| Arc::new(IdGenerator::new(worker_id)))
                .clone()
        };
        Ok(generator.next_ids(count))
    }
}

/// Checks that `value` is 1 to `max_bytes` bytes; errors name it `what`.
pub(crate) fn validate_length(what: &str, value: &str, max_bytes: usize) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(StoreError::invalid(format!("{what} must not be empty")));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(format!(
            "{what} is {} bytes, at most {max_bytes} allowed",
            value.len()
        )));
    }
    Ok(())
}

fn validate_app(app: &str) -> Result<(), StoreError> {
    validate_length("app", app, MAX_APP_BYTES)?;
    // `<app>:<user>` names a user's Redis keys; a `:` in the app would make it ambiguous.
    if app.contains(':') {
        return Err(StoreError::invalid(format!(
            "app {app:?} must not contain ':'"
        )));
    }
    Ok(())
}

fn validate_user(user: &str) -> Result<(), StoreError> {
    validate_length("user", user, MAX_USER_BYTES)
}

/// Checks a Store call's arguments.
pub fn validate_store(app: &str, users: &[String], payload: &[u8]) -> Result<(), StoreError> {
    validate_app(app)?;
    if users.len() > MAX_USERS_PER_STORE {
        return Err(StoreError::invalid(format!(
            "{} users in one store call, at most {MAX_USERS_PER_STORE} allowed",
            users.len()
        )));
    }
    for user in users {
        validate_user(user)?;
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::invalid(format!(
            "payload is {} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
            payload.len()
        )));
    }
    Ok(())
}

/// `fragment` `count` times with `separator` between: the placeholder lists
/// of multi-row SQL statements (every value stays a bound parameter).
pub(crate) fn repeated(fragment: &str, separator: &str, count: usize) -> String {
    std::iter::repeat_n(fragment, count)
        .collect::<Vec<_>>()
        .join(separator)
}

/// Checks an idempotency key (empty: none).
pub fn validate_idempotency_key(key: &str) -> Result<(), StoreError> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(StoreError::invalid(format!(
            "idempotency key is {} bytes, at most {MAX_IDEMPOTENCY_KEY_BYTES} allowed",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a Publish call's arguments and returns the topic to use.
pub fn validate_publish<'a>(
    app: &str,
    topic: &'a str,
    payload: &[u8],
) -> Result<&'a str, StoreError> {
    validate_app(app)?;
    let topic = validate_topic(topic)?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::invalid(format!(
            "payload is {} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
            payload.len()
        )));
    }
    Ok(topic)
}

/// Checks a topic; "" means [`ALL_TOPIC`].
pub fn validate_topic(topic: &str) -> Result<&str, StoreError> {
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(StoreError::invalid(format!(
            "topic is {} bytes, at most {MAX_TOPIC_BYTES} allowed",
            topic.len()
        )));
    }
    Ok(if topic.is_empty() { ALL_TOPIC } else { topic })
}

/// Checks a History call and returns it with its topic and limit settled.
pub fn validate_history(mut query: HistoryQuery) -> Result<HistoryQuery, StoreError> {
    validate_app(&query.app)?;
    query.topic = validate_topic(&query.topic)?.to_string();
    query.limit = if query.limit == 0 {
        DEFAULT_HISTORY_LIMIT
    } else {
        query.limit.min(MAX_HISTORY_LIMIT)
    };
    Ok(query)
}

/// The History answer, given the topic's current epoch and offset (0, 0
/// when it has no stream) and the entries it holds after `since_offset`
/// (at most `limit`, oldest first, none older than `oldest_kept_ms`).
fn history_answer(
    query: &HistoryQuery,
    current_epoch: u64,
    current_offset: u64,
    mut entries: Vec<BroadcastMessage>,
    oldest_kept_ms: u64,
) -> History {
    let not_recovered = History {
        messages: Vec::new(),
        recovered: false,
        offset: current_offset,
        epoch: current_epoch,
    };
    // A first subscription: nothing to recover, start at the current offset.
    if query.epoch == 0 {
        return History {
            recovered: true,
            ..not_recovered
        };
    }
    if query.epoch != current_epoch || query.since_offset > current_offset {
        return not_recovered;
    }
    if query.since_offset == current_offset {
        return History {
            recovered: true,
            ..not_recovered
        };
    }
    entries.retain(|entry| entry.created_ms >= oldest_kept_ms);
    let covers = entries
        .first()
        .is_some_and(|entry| entry.offset == query.since_offset + 1);
    let contiguous = entries
        .windows(2)
        .all(|pair| pair[1].offset == pair[0].offset + 1);
    if !covers || !contiguous {
        return not_recovered;
    }
    History {
        messages: entries,
        recovered: true,
        offset: current_offset,
        epoch: current_epoch,
    }
}

/// Checks a Pending call's arguments and returns the limit to apply.
pub fn validate_pending(app: &str, user: &str, limit: u32) -> Result<u32, StoreError> {
    validate_app(app)?;
    validate_user(user)?;
    Ok(if limit == 0 {
        DEFAULT_PENDING_LIMIT
    } else {
        limit.min(MAX_PENDING_LIMIT)
    })
}

/// Checks an Ack call's items.
pub fn validate_ack(items: &[AckItem]) -> Result<(), StoreError> {
    for item in items {
        validate_app(&item.app)?;
        validate_user(&item.user)?;
    }
    Ok(())
}

/// The messages a Store call creates, one per user in order, with fresh ids.
fn new_messages(
    ids: &MessageIds,
    limits: &StoreLimits,
    app: &str,
    users: &[String],
    payload: &Bytes,
    ttl_secs: u32,
    parent_id: u64,
) -> Result<Vec<Message>, StoreError> {
    let created_ms = now_ms();
    let expires_ms = created_ms + u64::from(limits.effective_ttl_secs(ttl_secs)) * 1000;
    Ok(ids
        .next_ids(users.len())?
        .into_iter()
        .zip(users)
        .map(|(id, user)| Message {
            id,
            app: app.to_string(),
            user: user.clone(),
            payload: payload.clone(),
            created_ms,
            expires_ms,
            attempts: 0,
            parent_id,
        })
        .collect())
}

/// Checks a StoreMany call's items (as [`validate_store`] does for each).
pub fn validate_store_many(items: &[StoreItem]) -> Result<(), StoreError> {
    if items.len() > MAX_USERS_PER_STORE {
        return Err(StoreError::invalid(format!(
            "{} items in one store call, at most {MAX_USERS_PER_STORE} allowed",
            items.len()
        )));
    }
    for item in items {
        validate_store(&item.app, std::slice::from_ref(&item.user), &item.payload)?;
    }
    Ok(())
}

/// One new message per item, ids increasing in item order.
fn new_messages_of_items(
    ids: &MessageIds,
    limits: &StoreLimits,
    items: &[StoreItem],
) -> Result<Vec<Message>, StoreError> {
    let created_ms = now_ms();
    Ok(ids
        .next_ids(items.len())?
        .into_iter()
        .zip(items)
        .map(|(id, item)| Message {
            id,
            app: item.app.clone(),
            user: item.user.clone(),
            payload: item.payload.clone(),
            created_ms,
            expires_ms: created_ms + u64::from(limits.effective_ttl_secs(item.ttl_secs)) * 1000,
            attempts: 0,
            ..Message::default()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

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
