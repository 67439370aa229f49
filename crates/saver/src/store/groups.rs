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
use pushgrid_proto::cluster::{AckItem, BroadcastMessage, DeliveryReport, MessageStatusResponse};

use super::sql::Connections;
use super::{SqlStore, validate_app, validate_length, validate_user};
use crate::error::StoreError;

mod hot_copy;
mod membership;
mod status;

use self::status::DeliveryRow;

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
const ROW_CHUNK: usize = 512;
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
        .execute(self.durable().connections())
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
            .execute(sql.connections())
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
                .execute(self.durable().connections())
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
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn from_sql(value: Option<i64>) -> u64 {
    value
        .and_then(|value| u64::try_from(value).ok())
        .unwrap_or(0)
}

/// `INSERT IGNORE` in MySQL's words or SQLite's.
fn insert_ignore(connections: &Connections) -> &'static str {
    if connections.is_sqlite() {
        "INSERT OR IGNORE"
    } else {
        "INSERT IGNORE"
    }
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
