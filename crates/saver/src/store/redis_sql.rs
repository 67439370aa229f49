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

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::try_join_all;
use prost::Message as _;
use pushgrid_common::ids::id_time_ms;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, Message, StoreItem, StoreResponse};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, RedisFuture, Value};
use tokio_util::sync::CancellationToken;

use super::{
    Durability, History, HistoryQuery, IDEMPOTENCY_WINDOW_MS, MessageIds, MessageStore, Owed,
    PendingRead, SqlStore, StoreLimits, Stored, Withdrawal, Withdrawn,
};
use crate::error::StoreError;
use crate::metrics;

/// How many times Pending reads further when the entries read were expired.
const PENDING_READ_ROUNDS: usize = 4;
/// A key saver keeps in Redis forever; when it is gone, Redis lost its data.
const SENTINEL_KEY: &str = "pg:saver:sentinel";
const SENTINEL_CHECK_EVERY: Duration = Duration::from_secs(5);

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

/// One Redis server, or a Redis Cluster.
#[derive(Clone)]
pub(super) enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(connection) => connection.req_packed_command(cmd),
            RedisConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            RedisConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(connection) => connection.get_db(),
            RedisConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Commands that touch one hash tag (one cluster slot), in order; `true`
/// marks the commands whose replies the caller wants.
#[derive(Default)]
struct SlotCommands {
    commands: Vec<(Cmd, bool)>,
}

impl SlotCommands {
    /// A command whose reply is not needed.
    fn run(&mut self, command: Cmd) {
        self.commands.push((command, false));
    }

    /// A command whose reply is returned.
    fn query(&mut self, command: Cmd) {
        self.commands.push((command, true));
    }

    fn wanted(&self) -> usize {
        self.commands.iter().filter(|(_, wanted)| *wanted).count()
    }

    fn pipeline(&self, pipe: &mut redis::Pipeline) {
        for (command, wanted) in &self.commands {
            pipe.add_command(command.clone());
            if !wanted {
                pipe.ignore();
            }
        }
    }
}

fn command(name: &str) -> Cmd {
    redis::cmd(name)
}

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

pub struct RedisSqlStore {
    redis: RedisConnection,
    sql: SqlStore,
    durability: Durability,
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

/// The keys of one topic's broadcast stream.
struct StreamKeys {
    seq: String,
    stream: String,
    epoch: String,
}

impl StreamKeys {
    fn new(app: &str, topic: &str) -> StreamKeys {
        let tag = format!("pg:{{bc:{app}:{topic}}}");
        StreamKeys {
            seq: format!("{tag}:seq"),
            stream: format!("{tag}:stream"),
            epoch: format!("{tag}:epoch"),
        }
    }
}

/// What `pg:idem:{..}` holds while the first call with the key is storing
/// (durability `redis`).
const IDEMPOTENCY_CLAIM: &str = "storing";

fn idempotency_key(app: &str, key: &str) -> String {
    format!("pg:idem:{{{app}:{key}}}")
}

/// The inbox member of a message id: zero-padded so bytewise order is numeric order.
fn member(id: u64) -> String {
    format!("{id:020}")
}

fn score(id: u64) -> f64 {
    // Milliseconds since 1970 are below 2^53: exact in an f64.
    id_time_ms(id) as f64
}

fn parse_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("unexpected redis reply: {error}"))
}

/// A stream entry (`[id, [field, value, ...]]`) as a broadcast message.
fn stream_entry(app: &str, topic: &str, epoch: u64, entry: Value) -> Option<BroadcastMessage> {
    let (id, fields): (String, Vec<Vec<u8>>) = redis::from_redis_value(entry).ok()?;
    let offset = id.split('-').next()?.parse::<u64>().ok()?;
    let mut message = BroadcastMessage {
        app: app.to_string(),
        topic: topic.to_string(),
        offset,
        epoch,
        ..Default::default()
    };
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        let text = || String::from_utf8_lossy(value).parse::<u64>().unwrap_or(0);
        match name.as_slice() {
            b"t" => message.created_ms = text(),
            b"i" => message.id = text(),
            b"p" => message.payload = Bytes::from(value.clone()),
            _ => {}
        }
    }
    Some(message)
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

    /// Runs per-slot command groups: one pipeline on a single Redis, one
    /// pipeline per group (concurrently) on a cluster. Returns the wanted
    /// replies of each group.
    async fn run_groups(&self, groups: &[SlotCommands]) -> Result<Vec<Vec<Value>>, StoreError> {
        let mut redis = self.redis.clone();
        match &self.redis {
            RedisConnection::Single(_) => {
                let mut pipe = redis::pipe();
                for group in groups {
                    group.pipeline(&mut pipe);
                }
                if pipe.is_empty() {
                    return Ok(groups.iter().map(|_| Vec::new()).collect());
                }
                let replies: Vec<Value> = pipe.query_async(&mut redis).await?;
                let mut replies = replies.into_iter();
                Ok(groups
                    .iter()
                    .map(|group| replies.by_ref().take(group.wanted()).collect())
                    .collect())
            }
            RedisConnection::Cluster(_) => {
                let calls = groups.iter().map(|group| {
                    let mut redis = redis.clone();
                    async move {
                        let mut pipe = redis::pipe();
                        group.pipeline(&mut pipe);
                        if pipe.is_empty() {
                            return Ok(Vec::new());
                        }
                        pipe.query_async::<Vec<Value>>(&mut redis).await
                    }
                });
                Ok(try_join_all(calls).await?)
            }
        }
    }

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

    /// One read of a PendingMany call: the inbox was warmed with the others,
    /// or (when that failed) warms itself.
    async fn read_warm(
        &self,
        read: &PendingRead,
        limit: Result<usize, StoreError>,
        warmed: bool,
    ) -> Result<Vec<Message>, StoreError> {
        let limit = limit?;
        if !warmed {
            return self.pending(&read.app, &read.user, limit as u32).await;
        }
        self.read_inbox(&UserKeys::new(&read.app, &read.user), limit)
            .await
    }

    /// Reads a warm inbox: what `pending` answers after the warm-up.
    async fn read_inbox(&self, keys: &UserKeys, limit: usize) -> Result<Vec<Message>, StoreError> {
        let mut redis = self.redis.clone();
        let max_attempts = i64::from(self.limits().max_attempts.max(1));
        // Read in id order, setting aside entries that expired, lost their
        // body or were delivered too often; nothing is changed until the end,
        // so the offsets stay valid.
        let now = now_ms();
        let mut served: Vec<Message> = Vec::new();
        let mut stale: Vec<String> = Vec::new();
        let mut dead: Vec<Message> = Vec::new();
        let mut offset = 0usize;
        for _ in 0..PENDING_READ_ROUNDS {
            let want = limit - served.len();
            let members: Vec<String> = command("ZRANGE")
                .arg(&keys.inbox)
                .arg(offset)
                .arg(offset + want - 1)
                .query_async(&mut redis)
                .await?;
            if members.is_empty() {
                break;
            }
            offset += members.len();
            let (bodies, attempts): (Vec<Option<Vec<u8>>>, Vec<Option<i64>>) = redis::pipe()
                .cmd("HMGET")
                .arg(&keys.msgs)
                .arg(&members)
                .cmd("HMGET")
                .arg(&keys.attempts)
                .arg(&members)
                .query_async(&mut redis)
                .await?;
            for ((member, body), attempts) in members.iter().zip(bodies).zip(attempts) {
                let mut message = match body.map(|bytes| Message::decode(bytes.as_slice())) {
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
                // Acked, or being withdrawn, where a store has not taken it yet.
                if self.sql.owed_work().hides(message.id) {
                    continue;
                }
                let attempts = attempts.unwrap_or(0);
                if message.expires_ms <= now {
                    stale.push(member.clone());
                } else if attempts >= max_attempts {
                    message.attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                    dead.push(message);
                } else {
                    served.push(message);
                }
            }
            if served.len() >= limit || members.len() < want {
                break;
            }
        }
        if served.is_empty() && stale.is_empty() && dead.is_empty() {
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
        // One ZREM per dead message: its reply says whether this call moved it.
        for message in &dead {
            pipe.cmd("ZREM").arg(&keys.inbox).arg(member(message.id));
        }
        if !dead.is_empty() {
            let members: Vec<String> = dead.iter().map(|message| member(message.id)).collect();
            pipe.cmd("HDEL").arg(&keys.msgs).arg(&members).ignore();
            pipe.cmd("HDEL").arg(&keys.attempts).arg(&members).ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(&keys.attempts)
            .arg(self.key_ttl_secs())
            .ignore();
        let replies: Vec<i64> = pipe.query_async(&mut redis).await?;
        let (attempts, removed) = replies.split_at(served.len().min(replies.len()));
        for (message, attempts) in served.iter_mut().zip(attempts) {
            message.attempts = u32::try_from((*attempts).max(0)).unwrap_or(u32::MAX);
        }
        let owned: Vec<Message> = dead
            .into_iter()
            .zip(removed)
            .filter(|(_, removed)| **removed == 1)
            .map(|(message, _)| message)
            .collect();
        if !owned.is_empty() {
            // Out of Redis already; a failure here leaves the SQL row live, so a
            // recovery can bring it back: never lost, at worst delivered again.
            let moved =
                super::sql::retry_lock_conflicts(|| self.sql.dead_letter(&owned, false)).await;
            if let Err(error) = moved {
                tracing::warn!(%error, count = owned.len(), "cannot record dead letters in sql");
            }
        }
        Ok(served)
    }

    /// Loads a user's unacked messages from SQL into Redis (never overwriting
    /// what is there) and marks the inbox warm.
    async fn warm_up(&self, app: &str, user: &str, keys: &UserKeys) -> Result<(), StoreError> {
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
    async fn warm_up_many(&self, reads: &[&PendingRead]) -> Result<(), StoreError> {
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
    async fn write_new(&self, messages: &[Message]) -> Result<(), StoreError> {
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
    async fn cache_again_on_a_broken_connection(
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
    async fn recache(&self, messages: &[Message]) -> Result<(), StoreError> {
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

    /// Answers a retry with the first call's messages (durability `mysql`):
    /// the live ones go back into Redis, then the key is confirmed so a
    /// withdrawal of the first call keeps them. When the first call was
    /// withdrawn meanwhile, the retry fails and the caller tries again.
    async fn replay(&self, app: &str, key: &str, first: Stored) -> Result<Stored, StoreError> {
        let ids: Vec<u64> = first.messages.iter().map(|message| message.id).collect();
        let live = self.sql.unacked_by_ids(&ids).await?;
        self.recache(&live).await?;
        if !self.sql.confirm_key(app, key).await? {
            self.withdraw(Withdrawal::of(&live, None)).await;
            return Err(StoreError::Commit(
                "the first call with this idempotency key failed and was withdrawn; retry".into(),
            ));
        }
        self.remember_answer(app, key, &first).await;
        Ok(first)
    }

    async fn remember_answer(&self, app: &str, key: &str, stored: &Stored) {
        let answer = StoreResponse {
            messages: stored.messages.clone(),
            replayed: false,
        }
        .encode_to_vec();
        let mut redis = self.redis.clone();
        let remembered = command("SET")
            .arg(idempotency_key(app, key))
            .arg(answer)
            .arg("PX")
            .arg(IDEMPOTENCY_WINDOW_MS)
            .exec_async(&mut redis)
            .await;
        if let Err(error) = remembered {
            tracing::warn!(%error, "cannot remember an idempotent answer in redis");
        }
    }
}

fn replayed(answer: &[u8]) -> Result<Stored, StoreError> {
    let response = StoreResponse::decode(answer)
        .map_err(|error| StoreError::Corrupt(format!("idempotency answer: {error}")))?;
    Ok(Stored {
        messages: response.messages,
        replayed: true,
    })
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
        super::validate_store(app, users, &payload)?;
        let started = Instant::now();
        let messages = self
            .sql
            .new_children(app, users, &payload, ttl_secs, parent_id)?;
        self.write_new(&messages).await?;
        metrics::store_seconds(started.elapsed());
        Ok(messages)
    }

    async fn store_many(&self, items: &[StoreItem]) -> Result<Vec<Message>, StoreError> {
        super::validate_store_many(items)?;
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
        let withdrawal = || Withdrawal::of(&stored.messages, Some((app, idempotency_key)));
        match self.durability {
            Durability::Mysql => {
                // SQL decides who was first (its primary key), also after Redis lost its data.
                if let Some(first) = self.sql.idempotent_answer(app, idempotency_key).await? {
                    return self.replay(app, idempotency_key, first).await;
                }
                // A deadlock victim applied nothing: it may simply try again.
                match super::sql::retry_lock_conflicts(|| {
                    self.sql
                        .insert_with_key(app, idempotency_key, &stored.messages)
                })
                .await
                {
                    Ok(Some(first)) => return self.replay(app, idempotency_key, first).await,
                    Ok(None) => {}
                    Err(error) => {
                        self.withdraw(withdrawal()).await;
                        return Err(error);
                    }
                }
                if let Err(error) = self
                    .cache_again_on_a_broken_connection(&stored.messages)
                    .await
                {
                    self.withdraw(withdrawal()).await;
                    return Err(error);
                }
                self.remember_answer(app, idempotency_key, &stored).await;
            }
            Durability::Redis => {
                // Claimed first, answered once stored: a retry meanwhile is
                // told to try again rather than given ids not stored yet.
                let claimed: Option<String> = command("SET")
                    .arg(&redis_key)
                    .arg(IDEMPOTENCY_CLAIM)
                    .arg("NX")
                    .arg("PX")
                    .arg(IDEMPOTENCY_WINDOW_MS)
                    .query_async(&mut redis)
                    .await?;
                if claimed.is_none() {
                    let first: Option<Vec<u8>> = command("GET")
                        .arg(&redis_key)
                        .query_async(&mut redis)
                        .await?;
                    return match first {
                        Some(answer) if answer != IDEMPOTENCY_CLAIM.as_bytes() => replayed(&answer),
                        _ => Err(StoreError::Commit(
                            "a call with this idempotency key is in progress; retry".into(),
                        )),
                    };
                }
                if let Err(error) = self
                    .cache_again_on_a_broken_connection(&stored.messages)
                    .await
                {
                    self.withdraw(withdrawal()).await;
                    return Err(error);
                }
                self.sql.insert_in_background(stored.messages.clone());
                self.remember_answer(app, idempotency_key, &stored).await;
            }
        }
        metrics::store_seconds(started.elapsed());
        Ok(stored)
    }

    async fn pending(&self, app: &str, user: &str, limit: u32) -> Result<Vec<Message>, StoreError> {
        let limit = super::validate_pending(app, user, limit)? as usize;
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
                super::validate_pending(&read.app, &read.user, read.limit)
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
        for chunk in requests.chunks(super::PENDING_MANY_CONCURRENCY) {
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
        super::validate_ack(items)?;
        let acked = super::sql::retry_lock_conflicts(|| self.sql.mark_acked(items)).await?;
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
            super::sql::retry_lock_conflicts(|| self.sql.withdraw_rows(withdrawal)).await?;
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
        let topic = super::validate_publish(app, topic, &payload)?;
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
        let query = super::validate_history(query)?;
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
        Ok(super::history_answer(
            &query,
            epoch,
            offset,
            entries,
            oldest_kept_ms,
        ))
    }
}
