//! saver's configuration: the node settings, the stores it uses and their
//! limits, and what the store and group commit are built with.

use std::time::Duration;

use pushgrid_common::cli::RoleConfig;
use pushgrid_common::config::NodeConfig;
use pushgrid_common::db;
use serde::{Deserialize, Serialize};

use crate::store::{Durability, GroupCommitConfig, StoreLimits};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SaverConfig {
    #[serde(flatten)]
    pub node: NodeConfig,
    /// Redis for the hot inbox, e.g. `redis://127.0.0.1:6379`; empty: SQL only.
    /// Several comma-separated URLs are the seed nodes of a Redis Cluster.
    pub redis_url: String,
    /// When a push is answered: `mysql` (after Redis and the SQL commit) or
    /// `redis` (after Redis; SQL written behind). Only with a Redis URL.
    pub durability: Durability,
    /// The durable store: `mysql://...` or `sqlite://path`.
    pub database_url: String,
    /// SQL pool size on MySQL; an SQLite store keeps one (`SqlStore::connect_with`).
    pub database_max_connections: u32,
    /// Unacked messages kept per user; beyond it the oldest are dropped.
    pub max_inbox: u32,
    /// TTL of a message stored with `ttl_secs = 0`.
    pub default_ttl_secs: u32,
    /// Longer TTLs are cut to this.
    pub max_ttl_secs: u32,
    /// Deliveries without an ACK before a message goes to the dead letters.
    pub max_attempts: u32,
    /// Entries kept per broadcast stream.
    pub stream_max_len: u32,
    /// Age after which broadcast entries are dropped.
    pub stream_max_age_secs: u32,
    /// Rows one group commit writes at most.
    pub commit_batch_rows: usize,
    /// Group commits in flight at once.
    pub commit_workers: usize,
    /// A commit slower than this fails its Store calls (answered 503).
    pub commit_timeout_ms: u64,
}

impl Default for SaverConfig {
    fn default() -> Self {
        let limits = StoreLimits::default();
        SaverConfig {
            node: NodeConfig::with_ports(7002, 9002),
            redis_url: String::new(),
            database_url: "sqlite://pushgrid-data/saver.db".into(),
            database_max_connections: 16,
            max_inbox: limits.max_inbox,
            default_ttl_secs: limits.default_ttl_secs,
            max_ttl_secs: limits.max_ttl_secs,
            durability: Durability::Mysql,
            max_attempts: limits.max_attempts,
            stream_max_len: limits.stream_max_len,
            stream_max_age_secs: limits.stream_max_age_secs,
            commit_batch_rows: GroupCommitConfig::default().batch_rows,
            commit_workers: GroupCommitConfig::default().workers,
            commit_timeout_ms: GroupCommitConfig::default().timeout.as_millis() as u64,
        }
    }
}

impl SaverConfig {
    pub fn limits(&self) -> StoreLimits {
        StoreLimits {
            max_inbox: self.max_inbox.max(1),
            default_ttl_secs: self.default_ttl_secs.max(1),
            max_ttl_secs: self.max_ttl_secs.max(1),
            max_attempts: self.max_attempts.max(1),
            stream_max_len: self.stream_max_len.max(1),
            stream_max_age_secs: self.stream_max_age_secs.max(1),
        }
    }

    pub fn group_commit(&self) -> GroupCommitConfig {
        // SQLite has one writer: concurrent commits would only wait on its lock.
        let workers = if db::is_sqlite(&self.database_url) {
            1
        } else {
            self.commit_workers.max(1)
        };
        GroupCommitConfig {
            batch_rows: self.commit_batch_rows.max(1),
            workers,
            timeout: Duration::from_millis(self.commit_timeout_ms.max(1)),
        }
    }
}

impl RoleConfig for SaverConfig {
    fn node(&self) -> &NodeConfig {
        &self.node
    }
}
