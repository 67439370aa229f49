//! What every store holds to: the size limits of apps, users, payloads,
//! topics and idempotency keys, the TTL and inbox limits ([`StoreLimits`]) and
//! when a Store call answers ([`Durability`]).

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
