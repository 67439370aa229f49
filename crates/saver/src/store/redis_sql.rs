//! Redis hot inbox in front of the SQL store.
//!
//! Per user, all keys hash-tagged `{<app>:<user>}` so they share a Redis
//! Cluster slot and one MULTI can touch them all:
//!
//! * `pg:{a:u}:inbox`: ZSET of message ids. The member is the id as a
//!   20-digit zero-padded decimal string, the score the id's creation
//!   millisecond. Ids are 63-bit and do not fit an f64 score exactly, so
//!   order comes from the member: equal scores sort members bytewise, and
//!   zero-padded decimals sort bytewise as numbers, so the ZSET is in id order.
//! * `pg:{a:u}:msgs`: HASH member -> protobuf `Message` (attempts 0).
//! * `pg:{a:u}:att`: HASH member -> delivery attempts (HINCRBY).
//! * `pg:{a:u}:warm`: set once Redis is known to hold all of the user's
//!   unacked messages. When it is missing (new user, or Redis lost its data)
//!   the next Pending loads the inbox from SQL first. It lives `max_ttl_secs`,
//!   after which everything stored before it has expired anyway.
//!
//! Writes go to SQL first (durable), then Redis; a call answers after both.
//! Keys expire `max_ttl_secs` after the last write, which outlives every
//! message in them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use pushgrid_common::ids::id_time_ms;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, Message};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{MessageIds, MessageStore, SqlStore, StoreLimits};
use crate::error::StoreError;
use crate::metrics;

/// How many times Pending reads further when the entries read were expired.
const PENDING_READ_ROUNDS: usize = 4;

pub struct RedisSqlStore {
    redis: ConnectionManager,
    sql: SqlStore,
}

/// The Redis keys of one user's inbox.
struct UserKeys {
    inbox: String,
    msgs: String,
    attempts: String,
    warm: String,
}

impl UserKeys {
    /// Apps contain no `:` (see `validate_app`), so `<app>:<user>` is unambiguous.
    fn new(app: &str, user: &str) -> UserKeys {
        let tag = format!("pg:{{{app}:{user}}}");
        UserKeys {
            inbox: format!("{tag}:inbox"),
            msgs: format!("{tag}:msgs"),
            attempts: format!("{tag}:att"),
            warm: format!("{tag}:warm"),
        }
    }
}

/// The inbox member of a message id: zero-padded so bytewise order is numeric order.
fn member(id: u64) -> String {
    format!("{id:020}")
}

fn score(id: u64) -> f64 {
    // Milliseconds since 1970 are below 2^53: exact in an f64.
    id_time_ms(id) as f64
}

impl RedisSqlStore {
    /// Connects to Redis; `sql` keeps the durable copy and supplies ids and limits.
    pub async fn connect(redis_url: &str, sql: SqlStore) -> Result<RedisSqlStore, StoreError> {
        let client = redis::Client::open(redis_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let redis = ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisSqlStore { redis, sql })
    }

    pub fn sql(&self) -> &SqlStore {
        &self.sql
    }

    pub fn with_ids(mut self, ids: MessageIds) -> RedisSqlStore {
        self.sql = self.sql.with_ids(ids);
        self
    }

    pub fn with_limits(mut self, limits: StoreLimits) -> RedisSqlStore {
        self.sql = self.sql.with_limits(limits);
        self
    }

    fn limits(&self) -> StoreLimits {
        self.sql.limits()
    }

    fn key_ttl_secs(&self) -> i64 {
        i64::from(self.limits().max_ttl_secs.max(1))
    }

    /// Adds stored messages to their inboxes in one MULTI, then drops the
    /// oldest of any inbox now over `max_inbox`.
    async fn cache(&self, messages: &[Message]) -> Result<(), StoreError> {
        let key_ttl = self.key_ttl_secs();
        let max_inbox = i64::from(self.limits().max_inbox.max(1));
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut keys = Vec::with_capacity(messages.len());
        for message in messages {
            let user_keys = UserKeys::new(&message.app, &message.user);
            let member = member(message.id);
            pipe.cmd("ZADD")
                .arg(&user_keys.inbox)
                .arg(score(message.id))
                .arg(&member)
                .ignore();
            pipe.cmd("HSET")
                .arg(&user_keys.msgs)
                .arg(&member)
                .arg(message.encode_to_vec())
                .ignore();
            for key in [&user_keys.inbox, &user_keys.msgs, &user_keys.attempts] {
                pipe.cmd("EXPIRE").arg(key).arg(key_ttl).ignore();
            }
            // The members beyond the cap, oldest first (empty when under it).
            pipe.cmd("ZRANGE")
                .arg(&user_keys.inbox)
                .arg(0)
                .arg(-max_inbox - 1);
            keys.push(user_keys);
        }
        let mut redis = self.redis.clone();
        let over_cap: Vec<Vec<String>> = pipe.query_async(&mut redis).await?;

        let mut trim = redis::pipe();
        trim.atomic();
        let mut dropped_ids = Vec::new();
        for (user_keys, members) in keys.iter().zip(&over_cap) {
            if members.is_empty() {
                continue;
            }
            trim.cmd("ZREM").arg(&user_keys.inbox).arg(members);
            trim.cmd("HDEL").arg(&user_keys.msgs).arg(members).ignore();
            trim.cmd("HDEL")
                .arg(&user_keys.attempts)
                .arg(members)
                .ignore();
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
        let removed: Vec<u64> = trim.query_async(&mut redis).await?;
        metrics::inbox_dropped(removed.iter().sum());
        // The durable copy must not bring dropped messages back in a recovery.
        if let Err(error) = self.sql.expire_now(&dropped_ids).await {
            tracing::warn!(%error, count = dropped_ids.len(), "cannot expire dropped messages in sql");
        }
        Ok(())
    }

    /// Loads a user's unacked messages from SQL into Redis (never overwriting
    /// what is there) and marks the inbox warm.
    async fn warm_up(&self, app: &str, user: &str, keys: &UserKeys) -> Result<(), StoreError> {
        let messages = self
            .sql
            .unacked(app, user, self.limits().max_inbox.max(1))
            .await?;
        let key_ttl = self.key_ttl_secs();
        let mut pipe = redis::pipe();
        pipe.atomic();
        for message in &messages {
            let member = member(message.id);
            let blob = Message {
                attempts: 0,
                ..message.clone()
            }
            .encode_to_vec();
            pipe.cmd("ZADD")
                .arg(&keys.inbox)
                .arg("NX")
                .arg(score(message.id))
                .arg(&member)
                .ignore();
            pipe.cmd("HSETNX")
                .arg(&keys.msgs)
                .arg(&member)
                .arg(blob)
                .ignore();
            pipe.cmd("HSETNX")
                .arg(&keys.attempts)
                .arg(&member)
                .arg(message.attempts)
                .ignore();
        }
        if !messages.is_empty() {
            for key in [&keys.inbox, &keys.msgs, &keys.attempts] {
                pipe.cmd("EXPIRE").arg(key).arg(key_ttl).ignore();
            }
        }
        pipe.cmd("SET")
            .arg(&keys.warm)
            .arg(1)
            .arg("EX")
            .arg(key_ttl)
            .ignore();
        let mut redis = self.redis.clone();
        pipe.exec_async(&mut redis).await?;
        if !messages.is_empty() {
            tracing::debug!(
                app,
                count = messages.len(),
                "loaded an inbox from sql into redis"
            );
        }
        Ok(())
    }
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
        super::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self.sql.new_messages(app, users, &payload, ttl_secs);
        self.sql.insert(&messages).await?;
        if let Err(error) = self.cache(&messages).await {
            // The caller sees a failure and retries; expire the SQL rows so a
            // recovery does not deliver the same push twice under two ids.
            let ids: Vec<u64> = messages.iter().map(|message| message.id).collect();
            if let Err(sql_error) = self.sql.expire_now(&ids).await {
                tracing::warn!(error = %sql_error, "cannot expire messages redis did not take");
            }
            return Err(error);
        }
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = super::validate_pending(app, user, limit)? as usize;
        let keys = UserKeys::new(app, user);
        let mut redis = self.redis.clone();

        let warm: bool = redis::cmd("EXISTS")
            .arg(&keys.warm)
            .query_async(&mut redis)
            .await?;
        if !warm {
            self.warm_up(app, user, &keys).await?;
        }

        // Read in id order, setting aside entries that expired or lost their
        // body; nothing is changed until the end, so the offsets stay valid.
        let now = now_ms();
        let mut served: Vec<Message> = Vec::new();
        let mut stale: Vec<String> = Vec::new();
        let mut offset = 0usize;
        for _ in 0..PENDING_READ_ROUNDS {
            let want = limit - served.len();
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&keys.inbox)
                .arg(offset)
                .arg(offset + want - 1)
                .query_async(&mut redis)
                .await?;
            if members.is_empty() {
                break;
            }
            offset += members.len();
            let bodies: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                .arg(&keys.msgs)
                .arg(&members)
                .query_async(&mut redis)
                .await?;
            for (member, body) in members.iter().zip(bodies) {
                let message = match body.map(|bytes| Message::decode(bytes.as_slice())) {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::error!(%error, %member, "undecodable message in redis inbox, removing it");
                        stale.push(member.clone());
                        continue;
                    }
                    // The body is gone (acked or dropped concurrently): a leftover entry.
                    None => {
                        stale.push(member.clone());
                        continue;
                    }
                };
                if message.expires_ms <= now {
                    stale.push(member.clone());
                } else {
                    served.push(message);
                }
            }
            if served.len() >= limit || members.len() < want {
                break;
            }
        }
        if served.is_empty() && stale.is_empty() {
            return Ok(served);
        }

        let mut pipe = redis::pipe();
        pipe.atomic();
        if !stale.is_empty() {
            pipe.cmd("ZREM").arg(&keys.inbox).arg(&stale).ignore();
            pipe.cmd("HDEL").arg(&keys.msgs).arg(&stale).ignore();
            pipe.cmd("HDEL").arg(&keys.attempts).arg(&stale).ignore();
        }
        for message in &served {
            pipe.cmd("HINCRBY")
                .arg(&keys.attempts)
                .arg(member(message.id))
                .arg(1);
        }
        if served.is_empty() {
            pipe.exec_async(&mut redis).await?;
            return Ok(served);
        }
        pipe.cmd("EXPIRE")
            .arg(&keys.attempts)
            .arg(self.key_ttl_secs())
            .ignore();
        let attempts: Vec<i64> = pipe.query_async(&mut redis).await?;
        for (message, attempts) in served.iter_mut().zip(attempts) {
            message.attempts = u32::try_from(attempts.max(0)).unwrap_or(u32::MAX);
        }
        Ok(served)
    }

    async fn ack(&self, items: Vec<AckItem>) -> Result<u64, StoreError> {
        super::validate_ack(&items)?;
        let acked = self.sql.mark_acked(&items).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut commands = 0;
        for item in &items {
            if item.msg_ids.is_empty() {
                continue;
            }
            let keys = UserKeys::new(&item.app, &item.user);
            let members: Vec<String> = item.msg_ids.iter().map(|id| member(*id)).collect();
            pipe.cmd("ZREM").arg(&keys.inbox).arg(&members).ignore();
            pipe.cmd("HDEL").arg(&keys.msgs).arg(&members).ignore();
            pipe.cmd("HDEL").arg(&keys.attempts).arg(&members).ignore();
            commands += 1;
        }
        if commands > 0 {
            let mut redis = self.redis.clone();
            pipe.exec_async(&mut redis).await?;
        }
        Ok(acked)
    }
}
