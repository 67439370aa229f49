//! Reading inboxes: what Pending answers from a warm inbox, with expired
//! and undecodable entries dropped and messages delivered too often moved to
//! the dead letters.

use prost::Message as _;
use pushgrid_common::now_ms;
use pushgrid_proto::cluster::Message;

use super::RedisSqlStore;
use super::connection::{RedisConnection, command};
use super::keys::{UserKeys, member};
use crate::error::StoreError;
use crate::store::{MessageStore, PendingRead};

/// How many times Pending reads further when the entries read were expired.
const PENDING_READ_ROUNDS: usize = 4;

impl RedisSqlStore {
    /// One read of a PendingMany call: the inbox was warmed with the others,
    /// or (when that failed) warms itself.
    pub(super) async fn read_warm(
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
    pub(super) async fn read_inbox(
        &self,
        keys: &UserKeys,
        limit: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let mut redis = self.redis.clone();
        let scan = self.scan_inbox(&mut redis, keys, limit).await?;
        if scan.served.is_empty() && scan.stale.is_empty() && scan.dead.is_empty() {
            return Ok(scan.served);
        }
        let replies = self.apply_scan(&mut redis, keys, &scan).await?;
        let InboxScan {
            mut served, dead, ..
        } = scan;
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
                crate::store::sql::retry_lock_conflicts(|| self.sql.dead_letter(&owned, false))
                    .await;
            if let Err(error) = moved {
                tracing::warn!(%error, count = owned.len(), "cannot record dead letters in sql");
            }
        }
        Ok(served)
    }

    /// Reads the inbox in id order, setting aside entries that expired, lost
    /// their body or were delivered too often; nothing is changed, so the
    /// offsets stay valid.
    async fn scan_inbox(
        &self,
        redis: &mut RedisConnection,
        keys: &UserKeys,
        limit: usize,
    ) -> Result<InboxScan, StoreError> {
        let max_attempts = i64::from(self.limits().max_attempts.max(1));
        let now = now_ms();
        let mut scan = InboxScan::default();
        let mut offset = 0usize;
        for _ in 0..PENDING_READ_ROUNDS {
            let want = limit - scan.served.len();
            let members: Vec<String> = command("ZRANGE")
                .arg(&keys.inbox)
                .arg(offset)
                .arg(offset + want - 1)
                .query_async(&mut *redis)
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
                .query_async(&mut *redis)
                .await?;
            for ((member, body), attempts) in members.iter().zip(bodies).zip(attempts) {
                let mut message = match body.map(|bytes| Message::decode(bytes.as_slice())) {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        tracing::error!(%error, %member, "undecodable message in redis inbox, removing it");
                        scan.stale.push(member.clone());
                        continue;
                    }
                    // The body is gone (acked or dropped concurrently): a leftover entry.
                    None => {
                        scan.stale.push(member.clone());
                        continue;
                    }
                };
                // Acked, or being withdrawn, where a store has not taken it yet.
                if self.sql.owed_work().hides(message.id) {
                    continue;
                }
                let attempts = attempts.unwrap_or(0);
                if message.expires_ms <= now {
                    scan.stale.push(member.clone());
                } else if attempts >= max_attempts {
                    message.attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
                    scan.dead.push(message);
                } else {
                    scan.served.push(message);
                }
            }
            if scan.served.len() >= limit || members.len() < want {
                break;
            }
        }
        Ok(scan)
    }

    /// In one MULTI: drops the stale entries, counts a delivery attempt of
    /// each served message (the replies, in order) and takes the dead ones
    /// out (a reply each: 1 when this call moved it).
    async fn apply_scan(
        &self,
        redis: &mut RedisConnection,
        keys: &UserKeys,
        scan: &InboxScan,
    ) -> Result<Vec<i64>, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !scan.stale.is_empty() {
            pipe.cmd("ZREM").arg(&keys.inbox).arg(&scan.stale).ignore();
            pipe.cmd("HDEL").arg(&keys.msgs).arg(&scan.stale).ignore();
            pipe.cmd("HDEL")
                .arg(&keys.attempts)
                .arg(&scan.stale)
                .ignore();
        }
        for message in &scan.served {
            pipe.cmd("HINCRBY")
                .arg(&keys.attempts)
                .arg(member(message.id))
                .arg(1);
        }
        // One ZREM per dead message: its reply says whether this call moved it.
        for message in &scan.dead {
            pipe.cmd("ZREM").arg(&keys.inbox).arg(member(message.id));
        }
        if !scan.dead.is_empty() {
            let members: Vec<String> = scan.dead.iter().map(|message| member(message.id)).collect();
            pipe.cmd("HDEL").arg(&keys.msgs).arg(&members).ignore();
            pipe.cmd("HDEL").arg(&keys.attempts).arg(&members).ignore();
        }
        pipe.cmd("EXPIRE")
            .arg(&keys.attempts)
            .arg(self.key_ttl_secs())
            .ignore();
        Ok(pipe.query_async(redis).await?)
    }
}

/// What one inbox read found, before anything in Redis is changed.
#[derive(Default)]
struct InboxScan {
    /// Live messages to deliver, in id order.
    served: Vec<Message>,
    /// Members to drop: expired, without a body, or undecodable.
    stale: Vec<String>,
    /// Messages delivered `max_attempts` times already: to dead letters.
    dead: Vec<Message>,
}
