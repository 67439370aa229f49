//! The saver's error type and its one mapping to a tonic `Status`.

use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller sent something the saver will never accept.
    #[error("{0}")]
    InvalidArgument(String),
    #[error("cannot connect to storage: {0}")]
    Connect(String),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(String),
    /// The group commit failed or timed out: the database is down or slow.
    #[error("durable write failed: {0}")]
    Commit(String),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// No worker id lease is held (no keeper renewed it in time): minting
    /// could repeat ids another saver mints, so nothing is stored.
    #[error("this saver holds no worker id right now (no keeper renewed its lease); retry")]
    NoWorkerId,
    /// Stored bytes that do not decode: a bug or a foreign writer, never the caller's fault.
    #[error("corrupt stored message: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn invalid(message: impl Into<String>) -> StoreError {
        StoreError::InvalidArgument(message.into())
    }
}

/// A store that cannot be opened stops saver's start.
impl From<StoreError> for pushgrid_common::StartError {
    fn from(error: StoreError) -> pushgrid_common::StartError {
        match error {
            StoreError::Redis(_) => pushgrid_common::StartError::Redis(error.to_string()),
            error => pushgrid_common::StartError::Database(error.to_string()),
        }
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Status {
        match error {
            StoreError::InvalidArgument(message) => Status::invalid_argument(message),
            StoreError::Corrupt(message) => {
                Status::internal(format!("corrupt stored message: {message}"))
            }
            storage => Status::unavailable(storage.to_string()),
        }
    }
}
