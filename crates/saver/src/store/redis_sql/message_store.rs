//! [`MessageStore`] for [`RedisSqlStore`]: each call validated, then served
//! by the inbox, cache and idempotency steps; broadcasts through a Lua script
//! per publish and a stream read per History.

use std::collections::HashMap;
use std::time::Instant;

use bytes::Bytes;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem};
use redis::Value;

use super::RedisSqlStore;
use super::connection::{SlotCommands, command};
use super::idempotency::{idempotency_key, replayed};
use super::keys::{StreamKeys, UserKeys, member, stream_entry};
use crate::error::StoreError;
use crate::metrics;
use crate::store::{
    Durability, History, HistoryQuery, MessageStore, Owed, PendingRead, Stored, Withdrawal,
    Withdrawn,
};

/// Appends to a topic's stream. KEYS: seq, stream, epoch. ARGV: new epoch,
/// max length, message id, payload, created ms, oldest kept ms, seq/epoch key
/// TTL, stream key TTL. Returns {offset, epoch}.
const PUBLISH_SCRIPT: &str = r"
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[3], epoch)
  redis.call('DEL', KEYS[1], KEYS[2])
end
local offset = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], offset .. '-0', 't', ARGV[5], 'i', ARGV[3], 'p', ARGV[4])
local cutoff = tonumber(ARGV[6])
while true do
  local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 100)
  local keep = nil
  local last = nil
  for _, entry in ipairs(entries) do
    if tonumber(entry[2][2]) >= cutoff then keep = entry[1] break end
    last = entry[1]
  end
  if keep then
    if last then redis.call('XTRIM', KEYS[2], 'MINID', keep) end
    break
  end
  if not last then break end
  local next_offset = tonumber(string.match(last, '^(%d+)')) + 1
  redis.call('XTRIM', KEYS[2], 'MINID', next_offset .. '-0')
end
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('EXPIRE', KEYS[2], ARGV[8])
return {offset, tonumber(epoch)}
";

/// Removes `members` from a user's inbox: bodies, attempt counts, entries.
fn remove_commands(keys: &UserKeys, members: &[String]) -> SlotCommands {
    let mut group = SlotCommands::default();
    for key in [&keys.msgs, &keys.attempts] {
        let mut hdel = command("HDEL");
        hdel.arg(key).arg(members);
        group.run(hdel);
    }
    let mut zrem = command("ZREM");
    zrem.arg(&keys.inbox).arg(members);
    group.run(zrem);
    group
}

#[tonic::async_trait]
impl MessageStore for RedisSqlStore {
    async fn store(
        &self,
        app: &str,
        users: &[String],
        payload: Bytes,
        ttl_secs: u32,
    ) -> Result<Vec<Message>, StoreError> {
        crate::store::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self.sql.new_messages(app, users, &payload, ttl_secs)?;
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
        let messages = self
            .sql
            .new_children(app, users, &payload, ttl_secs, parent_id)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn store_many(&self, items: &[StoreItem]) -> Result<Vec<Message>, StoreError> {
        crate::store::validate_store_many(items)?;
        let started = Instant::now();
        let messages = self.sql.new_messages_of_items(items)?;
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
        let started = Instant::now();
        let redis_key = self::idempotency_key(app, idempotency_key);
        let mut redis = self.redis.clone();
        let known: Option<Vec<u8>> = command("GET")
            .arg(&redis_key)
            .query_async(&mut redis)
            .await?;
        if let Some(answer) = known {
            let first = replayed(&answer)?;
            // Under MySQL durability the answer Redis remembers is given only
            // once SQL confirms the key: a withdrawal of the first call (its
            // caller gave up) deletes the key in SQL before it forgets the
            // answer in Redis, and a retry that read Redis in between would
            // otherwise answer ids that were just deleted.
            return match self.durability {
                Durability::Mysql => self.replay(app, idempotency_key, first).await,
                Durability::Redis => Ok(first),
            };
        }
        let messages = self.sql.new_messages(app, users, &payload, ttl_secs)?;
        let stored = Stored {
            messages,
            replayed: false,
        };
        let first = match self.durability {
            Durability::Mysql => {
                self.store_keyed_in_sql(app, idempotency_key, &stored)
                    .await?
            }
            Durability::Redis => {
                self.store_keyed_in_redis(&mut redis, &redis_key, app, idempotency_key, &stored)
                    .await?
            }
        };
        if let Some(first) = first {
            return Ok(first);
        }
        metrics::store_seconds(started.elapsed());
        Ok(stored)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = crate::store::validate_pending(app, user, limit)? as usize;
        let keys = UserKeys::new(app, user);
        let mut redis = self.redis.clone();
        let warm: bool = command("EXISTS")
            .arg(&keys.warm)
            .query_async(&mut redis)
            .await?;
        if !warm {
            self.warm_up(app, user, &keys).await?;
        }
        self.read_inbox(&keys, limit).await
    }

    /// Many inboxes at once: the warm flags in one round trip, the cold
    /// inboxes from SQL in one query per app and into Redis in one more round
    /// trip, then each inbox is read (the reads share the connection's
    /// pipeline). If the shared warm-up fails, each read warms itself.
    async fn pending_many(
        &self,
        requests: &[PendingRead],
    ) -> Vec<Result<Vec<Message>, StoreError>> {
        let limits: Vec<Result<usize, StoreError>> = requests
            .iter()
            .map(|read| {
                crate::store::validate_pending(&read.app, &read.user, read.limit)
                    .map(|limit| limit as usize)
            })
            .collect();
        let valid: Vec<&PendingRead> = requests
            .iter()
            .zip(&limits)
            .filter(|(_, limit)| limit.is_ok())
            .map(|(read, _)| read)
            .collect();
        let warmed = match self.warm_up_many(&valid).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "shared inbox warm-up failed; warming one by one");
                false
            }
        };
        let mut answers = Vec::with_capacity(requests.len());
        let mut limits = limits.into_iter();
        for chunk in requests.chunks(crate::store::PENDING_MANY_CONCURRENCY) {
            let reads: Vec<_> = chunk
                .iter()
                .zip(limits.by_ref())
                .map(|(read, limit)| self.read_warm(read, limit, warmed))
                .collect();
            answers.extend(futures::future::join_all(reads).await);
        }
        answers
    }

    async fn apply_acks(&self, items: &[AckItem]) -> Result<u64, StoreError> {
        crate::store::validate_ack(items)?;
        let acked = crate::store::sql::retry_lock_conflicts(|| self.sql.mark_acked(items)).await?;
        let mut groups = Vec::with_capacity(items.len());
        for item in items {
            if item.msg_ids.is_empty() {
                continue;
            }
            let keys = UserKeys::new(&item.app, &item.user);
            let members: Vec<String> = item.msg_ids.iter().map(|id| member(*id)).collect();
            groups.push(remove_commands(&keys, &members));
        }
        self.run_groups(&groups).await?;
        Ok(acked)
    }

    async fn apply_withdrawal(&self, withdrawal: &Withdrawal) -> Result<Withdrawn, StoreError> {
        // SQL first: it says whether a retry already answered these messages.
        let outcome =
            crate::store::sql::retry_lock_conflicts(|| self.sql.withdraw_rows(withdrawal)).await?;
        if outcome == Withdrawn::KeptForRetry {
            return Ok(outcome);
        }
        let mut by_user: HashMap<(&str, &str), Vec<String>> = HashMap::new();
        for message in &withdrawal.messages {
            by_user
                .entry((&message.app, &message.user))
                .or_default()
                .push(member(message.id));
        }
        let mut groups: Vec<SlotCommands> = by_user
            .iter()
            .map(|((app, user), members)| remove_commands(&UserKeys::new(app, user), members))
            .collect();
        if let Some((app, key)) = &withdrawal.key {
            let mut group = SlotCommands::default();
            let mut forget = command("DEL");
            forget.arg(idempotency_key(app, key));
            group.run(forget);
            groups.push(group);
        }
        self.run_groups(&groups).await?;
        Ok(Withdrawn::Removed)
    }

    fn owed(&self) -> &Owed {
        self.sql.owed_work()
    }

    async fn publish(
        &self,
        app: &str,
        topic: &str,
        payload: Bytes,
    ) -> Result<BroadcastMessage, StoreError> {
        let topic = crate::store::validate_publish(app, topic, &payload)?;
        let limits = self.limits();
        let keys = StreamKeys::new(app, topic);
        let id = self.sql.next_id()?;
        let created_ms = now_ms();
        let max_age_ms = u64::from(limits.stream_max_age_secs.max(1)) * 1000;
        let mut redis = self.redis.clone();
        let (offset, epoch): (u64, u64) = command("EVAL")
            .arg(PUBLISH_SCRIPT)
            .arg(3)
            .arg(&keys.seq)
            .arg(&keys.stream)
            .arg(&keys.epoch)
            .arg(created_ms.max(1))
            .arg(limits.stream_max_len.max(1))
            .arg(id)
            .arg(payload.as_ref())
            .arg(created_ms)
            .arg(created_ms.saturating_sub(max_age_ms))
            .arg(
                self.key_ttl_secs()
                    .max(i64::from(limits.stream_max_age_secs)),
            )
            .arg(limits.stream_max_age_secs.max(1))
            .query_async(&mut redis)
            .await?;
        Ok(BroadcastMessage {
            id,
            app: app.to_string(),
            topic: topic.to_string(),
            offset,
            epoch,
            payload,
            created_ms,
        })
    }

    async fn history(&self, query: HistoryQuery) -> Result<History, StoreError> {
        let query = crate::store::validate_history(query)?;
        let keys = StreamKeys::new(&query.app, &query.topic);
        let mut redis = self.redis.clone();
        let first_wanted = query.since_offset.saturating_add(1);
        let (epoch, offset, entries): (Option<u64>, Option<u64>, Vec<Value>) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(&keys.epoch)
            .cmd("GET")
            .arg(&keys.seq)
            .cmd("XRANGE")
            .arg(&keys.stream)
            .arg(format!("{first_wanted}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(query.limit)
            .query_async(&mut redis)
            .await?;
        let epoch = epoch.unwrap_or(0);
        let offset = offset.unwrap_or(0);
        let entries = entries
            .into_iter()
            .filter_map(|entry| stream_entry(&query.app, &query.topic, epoch, entry))
            .collect();
        let oldest_kept_ms =
            now_ms().saturating_sub(u64::from(self.limits().stream_max_age_secs) * 1000);
        Ok(crate::store::history_answer(
            &query,
            epoch,
            offset,
            entries,
            oldest_kept_ms,
        ))
    }
}
