//! Writing inboxes: new messages stored in SQL then Redis (or Redis then
//! SQL behind, durability `redis`), inboxes warmed from SQL when Redis lost
//! them, and messages put back after a broken connection.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message as _;
use pushgrid_proto::cluster::Message;
use redis::Value;

use super::RedisSqlStore;
use super::connection::{SlotCommands, command};
use super::keys::{UserKeys, member, parse_error, score};
use crate::error::StoreError;
use crate::metrics;
use crate::store::{Durability, MessageStore, PendingRead, Withdrawal};

impl RedisSqlStore {
    /// Adds stored messages to their inboxes in one round trip, then drops
    /// the oldest of any inbox now over `max_inbox` (a second trip, only then).
    async fn cache(&self, messages: &[Message]) -> Result<(), StoreError> {
        let key_ttl = self.key_ttl_secs();
        let max_inbox = i64::from(self.limits().max_inbox.max(1));
        let mut groups = Vec::with_capacity(messages.len());
        let mut keys = Vec::with_capacity(messages.len());
        for message in messages {
            let user_keys = UserKeys::new(&message.app, &message.user);
            let member = member(message.id);
            let mut group = SlotCommands::default();
            // The body before the inbox entry: a reader that sees the entry finds the body.
            let mut hset = command("HSET");
            hset.arg(&user_keys.msgs)
                .arg(&member)
                .arg(message.encode_to_vec());
            group.run(hset);
            let mut zadd = command("ZADD");
            zadd.arg(&user_keys.inbox)
                .arg(score(message.id))
                .arg(&member);
            group.run(zadd);
            for key in [&user_keys.inbox, &user_keys.msgs, &user_keys.attempts] {
                let mut expire = command("EXPIRE");
                expire.arg(key).arg(key_ttl);
                group.run(expire);
            }
            // The members beyond the cap, oldest first (empty when under it).
            let mut over = command("ZRANGE");
            over.arg(&user_keys.inbox).arg(0).arg(-max_inbox - 1);
            group.query(over);
            groups.push(group);
            keys.push(user_keys);
        }
        let replies = self.run_groups(&groups).await?;

        let mut trims = Vec::new();
        let mut dropped_ids = Vec::new();
        for (user_keys, reply) in keys.iter().zip(replies) {
            let Some(reply) = reply.into_iter().next() else {
                continue;
            };
            let members: Vec<String> = redis::from_redis_value(reply).map_err(parse_error)?;
            if members.is_empty() {
                continue;
            }
            let mut group = SlotCommands::default();
            let mut zrem = command("ZREM");
            zrem.arg(&user_keys.inbox).arg(&members);
            group.query(zrem);
            for key in [&user_keys.msgs, &user_keys.attempts] {
                let mut hdel = command("HDEL");
                hdel.arg(key).arg(&members);
                group.run(hdel);
            }
            trims.push(group);
            dropped_ids.extend(
                members
                    .iter()
                    .filter_map(|member| member.parse::<u64>().ok()),
            );
        }
        if dropped_ids.is_empty() {
            return Ok(());
        }
        // ZREM counts what this call removed, so racing trims count each drop once.
        let removed: u64 = self
            .run_groups(&trims)
            .await?
            .into_iter()
            .flatten()
            .filter_map(|reply| redis::from_redis_value::<u64>(reply).ok())
            .sum();
        metrics::inbox_dropped(removed);
        // The durable copy must not bring dropped messages back in a recovery.
        if let Err(error) = self.sql.expire_now(&dropped_ids).await {
            tracing::warn!(%error, count = dropped_ids.len(), "cannot expire dropped messages in sql");
        }
        Ok(())
    }
}

impl RedisSqlStore {
    /// Loads a user's unacked messages from SQL into Redis (never overwriting
    /// what is there) and marks the inbox warm.
    pub(super) async fn warm_up(
        &self,
        app: &str,
        user: &str,
        keys: &UserKeys,
    ) -> Result<(), StoreError> {
        let messages = self
            .sql
            .unacked(app, user, self.limits().max_inbox.max(1))
            .await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        self.warm_up_commands(keys, &messages, true)
            .pipeline(&mut pipe);
        let mut redis = self.redis.clone();
        pipe.exec_async(&mut redis).await?;
        if !messages.is_empty() {
            metrics::recovered(messages.len());
            tracing::debug!(
                app,
                count = messages.len(),
                "loaded an inbox from sql into redis"
            );
        }
        Ok(())
    }

    /// The commands that load `messages` into an inbox and (with
    /// `mark_warm`) mark it warm: bodies before inbox entries, so a reader
    /// that sees an entry finds its body; existing entries are kept.
    fn warm_up_commands(
        &self,
        keys: &UserKeys,
        messages: &[Message],
        mark_warm: bool,
    ) -> SlotCommands {
        let key_ttl = self.key_ttl_secs();
        let mut group = SlotCommands::default();
        for message in messages {
            let member = member(message.id);
            let blob = Message {
                attempts: 0,
                ..message.clone()
            }
            .encode_to_vec();
            let mut body = command("HSETNX");
            body.arg(&keys.msgs).arg(&member).arg(blob);
            group.run(body);
            let mut attempts = command("HSETNX");
            attempts
                .arg(&keys.attempts)
                .arg(&member)
                .arg(message.attempts);
            group.run(attempts);
            let mut entry = command("ZADD");
            entry
                .arg(&keys.inbox)
                .arg("NX")
                .arg(score(message.id))
                .arg(&member);
            group.run(entry);
        }
        if !messages.is_empty() {
            for key in [&keys.inbox, &keys.msgs, &keys.attempts] {
                let mut expire = command("EXPIRE");
                expire.arg(key).arg(key_ttl);
                group.run(expire);
            }
        }
        if mark_warm {
            let mut warm = command("SET");
            warm.arg(&keys.warm).arg(1).arg("EX").arg(key_ttl);
            group.run(warm);
        }
        group
    }

    /// Warms every cold inbox of `reads`: one round trip for the warm flags,
    /// one SQL query per app (in chunks) for the cold ones, one round trip to
    /// load them.
    pub(super) async fn warm_up_many(&self, reads: &[&PendingRead]) -> Result<(), StoreError> {
        if reads.is_empty() {
            return Ok(());
        }
        let keys: Vec<UserKeys> = reads
            .iter()
            .map(|read| UserKeys::new(&read.app, &read.user))
            .collect();
        let checks: Vec<SlotCommands> = keys
            .iter()
            .map(|keys| {
                let mut group = SlotCommands::default();
                let mut exists = command("EXISTS");
                exists.arg(&keys.warm);
                group.query(exists);
                group
            })
            .collect();
        let flags = self.run_groups(&checks).await?;
        let mut cold_by_app: HashMap<&str, Vec<usize>> = HashMap::new();
        for (index, reply) in flags.iter().enumerate() {
            let warm = matches!(reply.first(), Some(Value::Int(1)));
            if !warm {
                cold_by_app
                    .entry(&reads[index].app)
                    .or_default()
                    .push(index);
            }
        }
        if cold_by_app.is_empty() {
            return Ok(());
        }
        let max_inbox = self.limits().max_inbox.max(1);
        let mut loads = Vec::new();
        let mut recovered = 0;
        for (app, indices) in cold_by_app {
            let users: Vec<String> = indices
                .iter()
                .map(|index| reads[*index].user.clone())
                .collect();
            let mut inboxes = self.sql.unacked_many(app, &users, max_inbox).await?;
            for index in indices {
                let messages = inboxes.remove(&reads[index].user).unwrap_or_default();
                recovered += messages.len();
                loads.push(self.warm_up_commands(&keys[index], &messages, true));
            }
        }
        self.run_groups(&loads).await?;
        if recovered > 0 {
            metrics::recovered(recovered);
        }
        Ok(())
    }

    /// Writes new messages where the configured durability says, in order.
    /// When a write fails (or its outcome is unknown) the messages are
    /// withdrawn: a failed call leaves nothing deliverable.
    pub(super) async fn write_new(&self, messages: &[Message]) -> Result<(), StoreError> {
        let written = match self.durability {
            Durability::Mysql => match self.sql.insert(messages).await {
                Ok(()) => self.cache_again_on_a_broken_connection(messages).await,
                Err(error) => Err(error),
            },
            Durability::Redis => {
                let cached = self.cache_again_on_a_broken_connection(messages).await;
                if cached.is_ok() {
                    self.sql.insert_in_background(messages.to_vec());
                }
                cached
            }
        };
        if let Err(error) = written {
            self.withdraw(Withdrawal::of(messages, None)).await;
            return Err(error);
        }
        Ok(())
    }

    /// [`cache`](Self::cache), once more after a connection that broke
    /// (killed, or Redis restarted): the writes are idempotent, and the
    /// connection manager has reconnected by then.
    pub(super) async fn cache_again_on_a_broken_connection(
        &self,
        messages: &[Message],
    ) -> Result<(), StoreError> {
        match self.cache(messages).await {
            Err(StoreError::Redis(error))
                if error.is_connection_dropped() || error.is_io_error() =>
            {
                metrics::redis_write_retry();
                tokio::time::sleep(Duration::from_millis(20)).await;
                self.cache(messages).await
            }
            other => other,
        }
    }

    /// Puts stored messages back into their inboxes (keeping what is there,
    /// leaving the warm flags alone): a retry answered with the first call's
    /// messages must find them deliverable.
    pub(super) async fn recache(&self, messages: &[Message]) -> Result<(), StoreError> {
        let mut by_user: HashMap<(&str, &str), Vec<Message>> = HashMap::new();
        for message in messages {
            by_user
                .entry((&message.app, &message.user))
                .or_default()
                .push(message.clone());
        }
        let groups: Vec<SlotCommands> = by_user
            .iter()
            .map(|((app, user), messages)| {
                self.warm_up_commands(&UserKeys::new(app, user), messages, false)
            })
            .collect();
        self.run_groups(&groups).await?;
        Ok(())
    }
}
