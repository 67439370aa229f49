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
//! Writes go to SQL first (durable, through the group commit), then Redis; a
//! call answers after both. With `durability = "redis"` a call answers after
//! Redis and the SQL copy is written behind. Keys expire `max_ttl_secs` after
//! the last write, which outlives every message in them.
//!
//! Broadcast streams, per app and topic, tagged `{bc:<app>:<topic>}`:
//! `:seq` (INCR, the latest offset), `:epoch` (the epoch, set when the
//! stream starts from offset 1), `:stream` (a Redis Stream whose entry ids are
//! `<offset>-0`, trimmed by length and age on every publish).
//!
//! Idempotency: `pg:idem:{<app>:<key>}` holds the first answer for 24 h.
//!
//! Commands for many users are sent as one pipeline per batch (one round
//! trip); on a Redis Cluster, as one pipeline per user (slot), concurrently.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use super::{Durability, MessageIds, SqlStore, StoreLimits};
use crate::error::StoreError;
use crate::metrics;

mod cache;
mod connection;
mod idempotency;
mod inbox;
mod keys;
mod message_store;

pub(super) use self::connection::RedisConnection;
use self::connection::command;

/// A key saver keeps in Redis forever; when it is gone, Redis lost its data.
const SENTINEL_KEY: &str = "pg:saver:sentinel";
const SENTINEL_CHECK_EVERY: Duration = Duration::from_secs(5);

pub struct RedisSqlStore {
    redis: RedisConnection,
    sql: SqlStore,
    durability: Durability,
}

impl RedisSqlStore {
    /// Connects to Redis; `sql` keeps the durable copy and supplies ids and
    /// limits. A comma-separated list of URLs is a Redis Cluster's seed nodes.
    pub async fn connect(redis_url: &str, sql: SqlStore) -> Result<RedisSqlStore, StoreError> {
        let urls: Vec<&str> = redis_url
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        if urls.len() > 1 {
            return RedisSqlStore::connect_cluster(&urls, sql).await;
        }
        let client = redis::Client::open(redis_url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3);
        let redis = ConnectionManager::new_with_config(client, config).await?;
        RedisSqlStore::start(RedisConnection::Single(redis), sql).await
    }

    /// Connects to a Redis Cluster through any of its nodes.
    pub async fn connect_cluster(
        seed_urls: &[&str],
        sql: SqlStore,
    ) -> Result<RedisSqlStore, StoreError> {
        let client = redis::cluster::ClusterClient::builder(seed_urls.iter().copied())
            .connection_timeout(Duration::from_secs(5))
            .response_timeout(Duration::from_secs(5))
            .build()?;
        let redis = client.get_async_connection().await?;
        RedisSqlStore::start(RedisConnection::Cluster(redis), sql).await
    }

    async fn start(redis: RedisConnection, sql: SqlStore) -> Result<RedisSqlStore, StoreError> {
        let store = RedisSqlStore {
            redis,
            sql,
            durability: Durability::Mysql,
        };
        let mut redis = store.redis.clone();
        command("SET")
            .arg(SENTINEL_KEY)
            .arg(1)
            .exec_async(&mut redis)
            .await?;
        Ok(store)
    }

    pub fn sql(&self) -> &SqlStore {
        &self.sql
    }

    /// A handle on the Redis connection (cheap to clone).
    pub(super) fn redis(&self) -> RedisConnection {
        self.redis.clone()
    }

    pub fn with_ids(mut self, ids: MessageIds) -> RedisSqlStore {
        self.sql = self.sql.with_ids(ids);
        self
    }

    pub fn with_limits(mut self, limits: StoreLimits) -> RedisSqlStore {
        self.sql = self.sql.with_limits(limits);
        self
    }

    /// When a Store call answers: after SQL and Redis, or after Redis alone.
    pub fn with_durability(mut self, durability: Durability) -> RedisSqlStore {
        self.durability = durability;
        self
    }

    fn limits(&self) -> StoreLimits {
        self.sql.limits()
    }

    fn key_ttl_secs(&self) -> i64 {
        i64::from(self.limits().max_ttl_secs.max(1))
    }

    /// Watches for Redis losing its data (a restart without persistence, a
    /// flush) and counts it. Inboxes come back from SQL on their own: a user
    /// whose `warm` key is gone is reloaded on the next Pending.
    pub async fn watch_for_data_loss(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(SENTINEL_CHECK_EVERY) => {}
            }
            let mut redis = self.redis.clone();
            let present: Result<bool, _> = command("EXISTS")
                .arg(SENTINEL_KEY)
                .query_async(&mut redis)
                .await;
            if let Ok(false) = present {
                metrics::redis_lost();
                tracing::warn!("redis lost saver's data; inboxes reload from sql as users return");
                let _ = command("SET")
                    .arg(SENTINEL_KEY)
                    .arg(1)
                    .exec_async(&mut redis)
                    .await;
            }
        }
    }
}
