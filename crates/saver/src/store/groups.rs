//! Groups and delivery status (issue 12), for every [`MessageStore`](super::MessageStore).
//!
//! Membership: SQL `group_members (app, grp, user_id)` is the durable copy;
//! with Redis, a sorted set per group (every score 0, so members sort by
//! bytes) is the hot copy that fan-outs page through with ZRANGEBYLEX:
//!
//! * `pg:{g:<app>:<group>}:members`: ZSET of user ids.
//! * `pg:{g:<app>:<group>}:warm`: set once the ZSET holds every member. When it
//!   is missing (Redis lost its data, or the group predates Redis) pages are
//!   read from SQL while one task rebuilds the ZSET (`:warming` is its lock).
//!
//! Bind and unbind write SQL first, then Redis. Known gap: an unbind that
//! lands while a rebuild is copying that user can leave the user in the hot
//! copy until the next rebuild.
//!
//! Status: kept in SQL only, shared by both stores. The message row (acked,
//! expired), the dead letters, `message_deliveries` (per device: handed over,
//! acked) and `push_records` (one per group push or broadcast) answer
//! `message_status`. Everything is kept for the message's TTL plus a day.

use std::collections::HashMap;

use pushgrid_common::now_ms;
use pushgrid_proto::cluster::{
    AckItem, BroadcastMessage, DeliveryReport, DeviceStatus, MessageStatusResponse, StatusCounts,
};
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::redis_sql::RedisConnection;
use super::sql::execute_retrying;
use super::{RedisSqlStore, SqlStore, repeated, validate_app, validate_length, validate_user};
use crate::error::StoreError;

/// The longest group name (the `grp` column is `VARCHAR(128)`).
pub const MAX_GROUP_BYTES: usize = 128;
/// The most users one Bind or Unbind call may name.
pub const MAX_USERS_PER_BIND: usize = 10_000;
pub const DEFAULT_MEMBERS_PAGE: u32 = 1000;
pub const MAX_MEMBERS_PAGE: u32 = 10_000;
/// How long status is kept after a message's TTL ends.
pub const STATUS_KEEP_AFTER_TTL_MS: u64 = 24 * 3600 * 1000;
/// The most groups `user_groups` answers.
const MAX_USER_GROUPS: i64 = 10_000;
/// Rows per multi-row statement.
const ROW_CHUNK: usize = 500;
/// Members copied from SQL to Redis per step of a rebuild.
const REBUILD_PAGE: u32 = 10_000;
/// A rebuild that takes longer than this lets another one start.
const REBUILD_LOCK_SECS: u64 = 600;

pub const KIND_GROUP: &str = "group";
pub const KIND_BROADCAST: &str = "broadcast";

/// Checks a group name.
pub fn validate_group(group: &str) -> Result<(), StoreError> {
    validate_length("group", group, MAX_GROUP_BYTES)
}

/// Checks a Bind or Unbind call.
pub fn validate_group_users(app: &str, group: &str, users: &[String]) -> Result<(), StoreError> {
    validate_app(app)?;
    validate_group(group)?;
    if users.len() > MAX_USERS_PER_BIND {
        return Err(StoreError::invalid(format!(
            "users: {} users in one call, at most {MAX_USERS_PER_BIND} allowed",
            users.len()
        )));
    }
    users.iter().try_for_each(|user| validate_user(user))
}

/// One page of a group's members, in byte order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MembersPage {
    pub users: Vec<String>,
    /// The `after` of the next page; empty when this page was the last.
    pub next: String,
}

fn page_limit(limit: u32) -> u32 {
    if limit == 0 {
        DEFAULT_MEMBERS_PAGE
    } else {
        limit.min(MAX_MEMBERS_PAGE)
    }
}

fn page_of(users: Vec<String>, limit: u32) -> MembersPage {
    let next = if users.len() as u64 >= u64::from(limit) {
        users.last().cloned().unwrap_or_default()
    } else {
        String::new()
    };
    MembersPage { users, next }
}

/// Groups and status over the durable SQL store. Every method has a SQL
/// implementation; the Redis store overrides membership reads and writes to
/// keep its hot copy.
#[tonic::async_trait]
pub trait GroupStore: Send + Sync {
    /// The SQL store holding the durable copy.
    fn durable(&self) -> &SqlStore;

    /// Adds users to a group; returns how many were not members yet.
    async fn bind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        self.durable().bind_sql(app, group, users).await
    }

    /// Removes users from a group; returns how many were members.
    async fn unbind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        self.durable().unbind_sql(app, group, users).await
    }

    /// Members after `after` in byte order, at most `limit` (0: the default).
    async fn group_members(
        &self,
        app: &str,
        group: &str,
        after: &str,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        validate_app(app)?;
        validate_group(group)?;
        let limit = page_limit(limit);
        let users = self.durable().members_sql(app, group, after, limit).await?;
        Ok(page_of(users, limit))
    }

    /// The groups a user belongs to, in byte order.
    async fn user_groups(&self, app: &str, user: &str) -> Result<Vec<String>, StoreError> {
        validate_app(app)?;
        validate_user(user)?;
        self.durable().user_groups_sql(app, user).await
    }

    /// Opens a group push's record; returns its id and creation time.
    async fn start_group_push(
        &self,
        app: &str,
        group: &str,
        ttl_secs: u32,
    ) -> Result<(u64, u64), StoreError> {
        validate_app(app)?;
        validate_group(group)?;
        let sql = self.durable();
        let id = sql.next_id()?;
        let created_ms = now_ms();
        let ttl_ms = u64::from(sql.limits().effective_ttl_secs(ttl_secs)) * 1000;
        sql.insert_push_record(
            id,
            app,
            KIND_GROUP,
            group,
            created_ms,
            created_ms + ttl_ms + STATUS_KEEP_AFTER_TTL_MS,
        )
        .await?;
        Ok((id, created_ms))
    }

    /// Counts fanned-out members of a group push, and marks its end.
    async fn group_push_progress(
        &self,
        app: &str,
        id: u64,
        members_added: u64,
        done: bool,
    ) -> Result<(), StoreError> {
        validate_app(app)?;
        sqlx::query(
            "UPDATE push_records SET members = members + ?, \
             fanout_done = CASE WHEN ? = 1 THEN 1 ELSE fanout_done END WHERE id = ? AND app = ?",
        )
        .bind(to_sql(members_added))
        .bind(i64::from(done))
        .bind(to_sql(id))
        .bind(app.to_string())
        .execute(self.durable().pool())
        .await?;
        Ok(())
    }

    /// Opens a broadcast's record, kept as long as its stream keeps it plus a day.
    async fn record_broadcast(&self, message: &BroadcastMessage) -> Result<(), StoreError> {
        let sql = self.durable();
        let keep_ms = u64::from(sql.limits().stream_max_age_secs) * 1000;
        sql.insert_push_record(
            message.id,
            &message.app,
            KIND_BROADCAST,
            &message.topic,
            message.created_ms,
            message.created_ms + keep_ms + STATUS_KEEP_AFTER_TTL_MS,
        )
        .await
    }

    /// Records what rooms handed to devices: the first hand-off per device
    /// of a message, and broadcast counts.
    async fn record_deliveries(&self, reports: &[DeliveryReport]) -> Result<(), StoreError> {
        let sql = self.durable();
        let mut unicast: Vec<DeliveryRow> = reports
            .iter()
            .filter(|report| !report.broadcast && report.msg_id <= i64::MAX as u64)
            .map(|report| DeliveryRow {
                id: to_sql(report.msg_id),
                user: report.user.as_str(),
                device: report.device.as_str(),
                delivered_ms: to_sql(if report.at_ms == 0 {
                    now_ms()
                } else {
                    report.at_ms
                }),
                acked_ms: None,
            })
            .collect();
        sql.write_deliveries(&mut unicast, false).await?;
        let mut broadcasts: HashMap<(u64, &str), u64> = HashMap::new();
        for report in reports.iter().filter(|report| report.broadcast) {
            *broadcasts
                .entry((report.msg_id, report.app.as_str()))
                .or_default() += u64::from(report.count);
        }
        for ((id, app), count) in broadcasts {
            sqlx::query(
                "UPDATE push_records SET delivered = delivered + ? WHERE id = ? AND app = ?",
            )
            .bind(to_sql(count))
            .bind(to_sql(id))
            .bind(app.to_string())
            .execute(sql.pool())
            .await?;
        }
        Ok(())
    }

    /// Records which device acknowledged which message. An ACK implies the
    /// hand-off: a missing delivery row is created with the hand-off time
    /// the room sent along (`delivered_ms`), else with the ACK's time.
    async fn record_acks(&self, items: &[AckItem]) -> Result<(), StoreError> {
        let now = to_sql(now_ms());
        let mut acks: Vec<DeliveryRow> = items
            .iter()
            .filter(|item| !item.device.is_empty())
            .flat_map(|item| {
                item.msg_ids
                    .iter()
                    .enumerate()
                    .filter(|(_, id)| **id <= i64::MAX as u64)
                    .map(move |(at, id)| {
                        let handed = item.delivered_ms.get(at).copied().unwrap_or(0);
                        DeliveryRow {
                            id: to_sql(*id),
                            user: item.user.as_str(),
                            device: item.device.as_str(),
                            delivered_ms: if handed == 0 { now } else { to_sql(handed) },
                            acked_ms: Some(now),
                        }
                    })
            })
            .collect();
        if acks.is_empty() {
            return Ok(());
        }
        self.durable().write_deliveries(&mut acks, true).await
    }

    /// What became of a message, a group push or a broadcast of `app`.
    async fn message_status(
        &self,
        app: &str,
        id: u64,
    ) -> Result<MessageStatusResponse, StoreError> {
        validate_app(app)?;
        let Ok(id) = i64::try_from(id) else {
            return Ok(MessageStatusResponse::default());
        };
        let sql = self.durable();
        if let Some(status) = sql.push_record_status(app, id).await? {
            return Ok(status);
        }
        sql.unicast_status(app, id).await
    }

    /// Deletes push records past their keep time; returns how many.
    async fn purge_push_records(&self, now_ms: u64) -> Result<u64, StoreError> {
        Ok(
            sqlx::query("DELETE FROM push_records WHERE keep_until_ms < ?")
                .bind(to_sql(now_ms))
                .execute(self.durable().pool())
                .await?
                .rows_affected(),
        )
    }
}

#[tonic::async_trait]
impl GroupStore for SqlStore {
    fn durable(&self) -> &SqlStore {
        self
    }
}

/// One device's row of `message_deliveries`.
struct DeliveryRow<'a> {
    id: i64,
    user: &'a str,
    device: &'a str,
    delivered_ms: i64,
    /// None for a hand-off record.
    acked_ms: Option<i64>,
}

fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: Option<i64>) -> u64 {
    value
        .and_then(|value| u64::try_from(value).ok())
        .unwrap_or(0)
}

fn is_sqlite(pool: &AnyPool) -> bool {
    pool.connect_options()
        .database_url
        .scheme()
        .starts_with("sqlite")
}

/// `INSERT IGNORE` in MySQL's words or SQLite's.
fn insert_ignore(pool: &AnyPool) -> &'static str {
    if is_sqlite(pool) {
        "INSERT OR IGNORE"
    } else {
        "INSERT IGNORE"
    }
}

impl SqlStore {
    pub(crate) async fn bind_sql(
        &self,
        app: &str,
        group: &str,
        users: &[String],
    ) -> Result<u64, StoreError> {
        let now = to_sql(now_ms());
        let mut added = 0;
        let mut transaction = self.pool().begin().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let text = format!(
                "{} INTO group_members (app, grp, user_id, created_ms) VALUES {}",
                insert_ignore(self.pool()),
                repeated("(?, ?, ?, ?)", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text));
            for user in chunk {
                query = query
                    .bind(app.to_string())
                    .bind(group.to_string())
                    .bind(user.clone())
                    .bind(now);
            }
            added += query.execute(&mut *transaction).await?.rows_affected();
        }
        transaction.commit().await?;
        Ok(added)
    }

    pub(crate) async fn unbind_sql(
        &self,
        app: &str,
        group: &str,
        users: &[String],
    ) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut transaction = self.pool().begin().await?;
        for chunk in users.chunks(ROW_CHUNK) {
            let text = format!(
                "DELETE FROM group_members WHERE app = ? AND grp = ? AND user_id IN ({})",
                repeated("?", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text))
                .bind(app.to_string())
                .bind(group.to_string());
            for user in chunk {
                query = query.bind(user.clone());
            }
            removed += query.execute(&mut *transaction).await?.rows_affected();
        }
        transaction.commit().await?;
        Ok(removed)
    }

    /// Members after `after` (byte order), at most `limit`.
    pub(crate) async fn members_sql(
        &self,
        app: &str,
        group: &str,
        after: &str,
        limit: u32,
    ) -> Result<Vec<String>, StoreError> {
        // The alias differs from the column so ORDER BY uses the (binary) column.
        let rows = sqlx::query(
            "SELECT CAST(user_id AS CHAR) AS member FROM group_members \
             WHERE app = ? AND grp = ? AND user_id > ? ORDER BY user_id LIMIT ?",
        )
        .bind(app.to_string())
        .bind(group.to_string())
        .bind(after.to_string())
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("member").map_err(Into::into))
            .collect()
    }

    pub(crate) async fn user_groups_sql(
        &self,
        app: &str,
        user: &str,
    ) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT CAST(grp AS CHAR) AS name FROM group_members \
             WHERE app = ? AND user_id = ? ORDER BY grp LIMIT ?",
        )
        .bind(app.to_string())
        .bind(user.to_string())
        .bind(MAX_USER_GROUPS)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| row.try_get::<String, _>("name").map_err(Into::into))
            .collect()
    }

    async fn insert_push_record(
        &self,
        id: u64,
        app: &str,
        kind: &str,
        target: &str,
        created_ms: u64,
        keep_until_ms: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO push_records (id, app, kind, target, created_ms, keep_until_ms, members, fanout_done, delivered) \
             VALUES (?, ?, ?, ?, ?, ?, 0, 0, 0)",
        )
        .bind(to_sql(id))
        .bind(app.to_string())
        .bind(kind.to_string())
        .bind(target.to_string())
        .bind(to_sql(created_ms))
        .bind(to_sql(keep_until_ms))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Writes rows of `message_deliveries`. A hand-off (`acked` false)
    /// keeps a device's first row; an ACK creates the row (with its hand-off
    /// time) when the hand-off was not recorded, and an existing row keeps
    /// its first `acked_ms`: one row write per acknowledged device either way.
    async fn write_deliveries(
        &self,
        rows: &mut [DeliveryRow<'_>],
        acked: bool,
    ) -> Result<(), StoreError> {
        // In key order: concurrent batches then take their row locks in
        // the same order, which avoids most deadlocks.
        rows.sort_unstable_by(|a, b| (a.id, a.user, a.device).cmp(&(b.id, b.user, b.device)));
        let (head, conflict) = match (acked, is_sqlite(self.pool())) {
            (false, _) => (insert_ignore(self.pool()), ""),
            (true, true) => (
                "INSERT",
                " ON CONFLICT (id, user_id, device) DO UPDATE SET \
                 acked_ms = COALESCE(message_deliveries.acked_ms, excluded.acked_ms)",
            ),
            (true, false) => (
                "INSERT",
                " ON DUPLICATE KEY UPDATE acked_ms = COALESCE(acked_ms, VALUES(acked_ms))",
            ),
        };
        for chunk in rows.chunks(ROW_CHUNK) {
            let text = format!(
                "{head} INTO message_deliveries (id, user_id, device, delivered_ms, acked_ms) \
                 VALUES {}{conflict}",
                repeated("(?, ?, ?, ?, ?)", ", ", chunk.len())
            );
            execute_retrying(self.pool(), || {
                // Built from fixed fragments; every value is bound.
                let mut query = sqlx::query(AssertSqlSafe(text.clone()));
                for row in chunk {
                    query = query
                        .bind(row.id)
                        .bind(row.user.to_string())
                        .bind(row.device.to_string())
                        .bind(row.delivered_ms)
                        .bind(row.acked_ms);
                }
                query
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes the delivery rows of purged messages.
    pub(crate) async fn delete_deliveries(&self, ids: &[i64]) -> Result<(), StoreError> {
        for chunk in ids.chunks(ROW_CHUNK) {
            let text = format!(
                "DELETE FROM message_deliveries WHERE id IN ({})",
                repeated("?", ", ", chunk.len())
            );
            let mut query = sqlx::query(AssertSqlSafe(text));
            for id in chunk {
                query = query.bind(*id);
            }
            query.execute(self.pool()).await?;
        }
        Ok(())
    }

    async fn push_record_status(
        &self,
        app: &str,
        id: i64,
    ) -> Result<Option<MessageStatusResponse>, StoreError> {
        let row = sqlx::query(
            "SELECT kind, target, created_ms, keep_until_ms, members, fanout_done, delivered \
             FROM push_records WHERE id = ? AND app = ?",
        )
        .bind(id)
        .bind(app.to_string())
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let kind: String = row.try_get("kind")?;
        let mut status = MessageStatusResponse {
            found: true,
            target: row.try_get("target")?,
            created_ms: from_sql(row.try_get("created_ms")?),
            expires_ms: from_sql(row.try_get::<Option<i64>, _>("keep_until_ms")?)
                .saturating_sub(STATUS_KEEP_AFTER_TTL_MS),
            members: from_sql(row.try_get("members")?),
            fanout_done: from_sql(row.try_get("fanout_done")?) != 0,
            ..Default::default()
        };
        if kind == KIND_BROADCAST {
            let delivered = from_sql(row.try_get("delivered")?);
            status.delivered_connections = delivered;
            status.counts = Some(StatusCounts {
                delivered,
                ..Default::default()
            });
        } else {
            status.counts = Some(self.group_counts(id).await?);
        }
        status.kind = kind;
        Ok(Some(status))
    }

    /// Each member message of a group push counted once, in its furthest state.
    async fn group_counts(&self, parent_id: i64) -> Result<StatusCounts, StoreError> {
        let now = to_sql(now_ms());
        let row = sqlx::query(
            "SELECT COUNT(*) AS total, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NOT NULL THEN 1 ELSE 0 END), 0) AS SIGNED) AS acked, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NOT NULL THEN 1 ELSE 0 END), 0) AS SIGNED) AS dead, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NULL AND m.expires_ms <= ? THEN 1 ELSE 0 END), 0) AS SIGNED) AS expired, \
             CAST(COALESCE(SUM(CASE WHEN m.acked_ms IS NULL AND d.id IS NULL AND m.expires_ms > ? \
               AND EXISTS (SELECT 1 FROM message_deliveries h WHERE h.id = m.id) THEN 1 ELSE 0 END), 0) AS SIGNED) AS delivered \
             FROM messages m LEFT JOIN dead_letters d ON d.id = m.id WHERE m.parent_id = ?",
        )
        .bind(now)
        .bind(now)
        .bind(parent_id)
        .fetch_one(self.pool())
        .await?;
        let total = from_sql(row.try_get("total")?);
        let acked = from_sql(row.try_get("acked")?);
        let dead_lettered = from_sql(row.try_get("dead")?);
        let expired = from_sql(row.try_get("expired")?);
        let delivered = from_sql(row.try_get("delivered")?);
        Ok(StatusCounts {
            stored: total.saturating_sub(acked + dead_lettered + expired + delivered),
            delivered,
            acked,
            expired,
            dead_lettered,
        })
    }

    async fn unicast_status(
        &self,
        app: &str,
        id: i64,
    ) -> Result<MessageStatusResponse, StoreError> {
        let row = sqlx::query(
            "SELECT user_id, created_ms, expires_ms, acked_ms, parent_id FROM messages WHERE id = ? AND app = ?",
        )
        .bind(id)
        .bind(app.to_string())
        .fetch_optional(self.pool())
        .await?;
        let Some(row) = row else {
            return Ok(MessageStatusResponse::default());
        };
        let user: String = row.try_get("user_id")?;
        let expires_ms = from_sql(row.try_get("expires_ms")?);
        let acked_ms = from_sql(row.try_get::<Option<i64>, _>("acked_ms")?);
        let dead = sqlx::query("SELECT dead_ms FROM dead_letters WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .is_some();
        let devices = sqlx::query(
            "SELECT CAST(device AS CHAR) AS handset, delivered_ms, acked_ms FROM message_deliveries \
             WHERE id = ? AND user_id = ? ORDER BY device LIMIT 1000",
        )
        .bind(id)
        .bind(user.clone())
        .fetch_all(self.pool())
        .await?;
        // The message's own end, when it was not acknowledged.
        let ended = if dead {
            Some("dead_lettered")
        } else if acked_ms == 0 && expires_ms <= now_ms() {
            Some("expired")
        } else {
            None
        };
        let mut device_states = Vec::with_capacity(devices.len());
        for device in &devices {
            let device_acked_ms = from_sql(device.try_get::<Option<i64>, _>("acked_ms")?);
            let state = if device_acked_ms != 0 {
                "acked"
            } else {
                ended.unwrap_or("delivered")
            };
            device_states.push(DeviceStatus {
                device: device.try_get("handset")?,
                state: state.to_string(),
                delivered_ms: from_sql(device.try_get("delivered_ms")?),
                acked_ms: device_acked_ms,
            });
        }
        let state = if acked_ms != 0 {
            "acked"
        } else if let Some(ended) = ended {
            ended
        } else if device_states.is_empty() {
            "stored"
        } else {
            "delivered"
        };
        Ok(MessageStatusResponse {
            found: true,
            kind: "unicast".into(),
            user,
            state: state.into(),
            created_ms: from_sql(row.try_get("created_ms")?),
            expires_ms,
            acked_ms,
            parent_id: from_sql(row.try_get::<Option<i64>, _>("parent_id")?),
            devices: device_states,
            ..Default::default()
        })
    }
}

/// The Redis keys of one group.
struct GroupKeys {
    members: String,
    warm: String,
    warming: String,
}

impl GroupKeys {
    /// Apps contain no `:`, so `<app>:<group>` is unambiguous.
    fn new(app: &str, group: &str) -> GroupKeys {
        let tag = format!("pg:{{g:{app}:{group}}}");
        GroupKeys {
            members: format!("{tag}:members"),
            warm: format!("{tag}:warm"),
            warming: format!("{tag}:warming"),
        }
    }
}

#[tonic::async_trait]
impl GroupStore for RedisSqlStore {
    fn durable(&self) -> &SqlStore {
        self.sql()
    }

    async fn bind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        let added = self.sql().bind_sql(app, group, users).await?;
        // Always added, warm or not: a rebuild running now may have read SQL
        // before this bind committed.
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        for chunk in users.chunks(ROW_CHUNK) {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(&keys.members);
            for user in chunk {
                zadd.arg(0).arg(user);
            }
            zadd.exec_async(&mut redis).await?;
        }
        Ok(added)
    }

    async fn unbind(&self, app: &str, group: &str, users: &[String]) -> Result<u64, StoreError> {
        validate_group_users(app, group, users)?;
        let removed = self.sql().unbind_sql(app, group, users).await?;
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        for chunk in users.chunks(ROW_CHUNK) {
            redis::cmd("ZREM")
                .arg(&keys.members)
                .arg(chunk)
                .exec_async(&mut redis)
                .await?;
        }
        Ok(removed)
    }

    async fn group_members(
        &self,
        app: &str,
        group: &str,
        after: &str,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        validate_app(app)?;
        validate_group(group)?;
        let limit = page_limit(limit);
        let keys = GroupKeys::new(app, group);
        let mut redis = self.redis();
        let warm: bool = redis::cmd("EXISTS")
            .arg(&keys.warm)
            .query_async(&mut redis)
            .await?;
        if !warm {
            // SQL answers until the hot copy is whole again.
            start_rebuild(redis, self.sql().clone(), app, group, keys).await;
            let users = self.sql().members_sql(app, group, after, limit).await?;
            return Ok(page_of(users, limit));
        }
        let min = if after.is_empty() {
            "-".to_string()
        } else {
            format!("({after}")
        };
        let users: Vec<String> = redis::cmd("ZRANGEBYLEX")
            .arg(&keys.members)
            .arg(min)
            .arg("+")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut redis)
            .await?;
        Ok(page_of(users, limit))
    }
}

/// Rebuilds a group's hot copy from SQL in the background, unless another
/// rebuild holds the group's lock.
async fn start_rebuild(
    mut redis: RedisConnection,
    sql: SqlStore,
    app: &str,
    group: &str,
    keys: GroupKeys,
) {
    let locked: Result<Option<String>, _> = redis::cmd("SET")
        .arg(&keys.warming)
        .arg(1)
        .arg("NX")
        .arg("EX")
        .arg(REBUILD_LOCK_SECS)
        .query_async(&mut redis)
        .await;
    if !matches!(locked, Ok(Some(_))) {
        return;
    }
    let (app, group) = (app.to_string(), group.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        let mut copied = 0usize;
        let mut after = String::new();
        let result: Result<(), StoreError> = async {
            loop {
                let users = sql.members_sql(&app, &group, &after, REBUILD_PAGE).await?;
                let Some(last) = users.last().cloned() else {
                    break;
                };
                for chunk in users.chunks(ROW_CHUNK) {
                    let mut zadd = redis::cmd("ZADD");
                    zadd.arg(&keys.members);
                    for user in chunk {
                        zadd.arg(0).arg(user);
                    }
                    zadd.exec_async(&mut redis).await?;
                }
                copied += users.len();
                if users.len() < REBUILD_PAGE as usize {
                    break;
                }
                after = last;
            }
            redis::cmd("SET")
                .arg(&keys.warm)
                .arg(1)
                .exec_async(&mut redis)
                .await?;
            Ok(())
        }
        .await;
        let _ = redis::cmd("DEL")
            .arg(&keys.warming)
            .exec_async(&mut redis)
            .await;
        match result {
            Ok(()) => tracing::info!(
                app,
                members = copied,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "rebuilt a group's hot copy from sql"
            ),
            Err(error) => tracing::warn!(app, %error, "cannot rebuild a group's hot copy"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_page_points_at_the_next() {
        let users: Vec<String> = vec!["a".into(), "b".into()];
        assert_eq!(page_of(users.clone(), 2).next, "b");
        assert_eq!(page_of(users, 3).next, "");
        assert_eq!(page_limit(0), DEFAULT_MEMBERS_PAGE);
        assert_eq!(page_limit(1_000_000), MAX_MEMBERS_PAGE);
    }

    #[test]
    fn group_names_and_call_sizes_are_checked() {
        assert!(validate_group("").is_err());
        assert!(validate_group(&"g".repeat(MAX_GROUP_BYTES + 1)).is_err());
        assert!(validate_group("city:paris").is_ok());
        let too_many: Vec<String> = (0..=MAX_USERS_PER_BIND).map(|n| n.to_string()).collect();
        let error = validate_group_users("app", "g", &too_many)
            .expect_err("one user over the bind limit is refused");
        assert!(error.to_string().contains("users"), "{error}");
        assert!(validate_group_users("app", "g", &["".to_string()]).is_err());
    }
}
