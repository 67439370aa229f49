//! The checks every store applies to a call's arguments before touching
//! anything, so a caller gets the same answer whichever store is configured;
//! and the check that a replayed idempotent answer belongs to the retry.

use pushgrid_proto::cluster::{AckItem, Message, StoreItem};

use super::limits::{
    ALL_TOPIC, DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT, MAX_IDEMPOTENCY_KEY_BYTES,
    MAX_TOPIC_BYTES, StoreLimits,
};
use super::{
    DEFAULT_PENDING_LIMIT, HistoryQuery, MAX_APP_BYTES, MAX_PAYLOAD_BYTES, MAX_PENDING_LIMIT,
    MAX_USER_BYTES, MAX_USERS_PER_STORE,
};
use crate::error::StoreError;

/// Why a replayed idempotent answer does not belong to this call: the first
/// call with the key stored other users, another payload or another TTL.
/// `None`: the same body (same users in the same order, same payload, same
/// effective TTL), so the first answer is this call's answer too.
pub fn replay_mismatch(
    first: &[Message],
    users: &[String],
    payload: &[u8],
    ttl_secs: u32,
    limits: &StoreLimits,
) -> Option<&'static str> {
    if first.len() != users.len()
        || first
            .iter()
            .zip(users)
            .any(|(message, user)| message.user != *user)
    {
        return Some("users");
    }
    if first.iter().any(|message| message.payload != payload) {
        return Some("payload");
    }
    let ttl_ms = u64::from(limits.effective_ttl_secs(ttl_secs)) * 1000;
    if first
        .iter()
        .any(|message| message.expires_ms.saturating_sub(message.created_ms) != ttl_ms)
    {
        return Some("ttl_secs");
    }
    None
}

/// Checks that `value` is 1 to `max_bytes` bytes; errors name it `what`.
pub(crate) fn validate_length(what: &str, value: &str, max_bytes: usize) -> Result<(), StoreError> {
    if value.is_empty() {
        return Err(StoreError::invalid(format!("{what} must not be empty")));
    }
    if value.len() > max_bytes {
        return Err(StoreError::invalid(format!(
            "{what} is {} bytes, at most {max_bytes} allowed",
            value.len()
        )));
    }
    Ok(())
}

pub(super) fn validate_app(app: &str) -> Result<(), StoreError> {
    validate_length("app", app, MAX_APP_BYTES)?;
    // `<app>:<user>` names a user's Redis keys; a `:` in the app would make it ambiguous.
    if app.contains(':') {
        return Err(StoreError::invalid(format!(
            "app {app:?} must not contain ':'"
        )));
    }
    Ok(())
}

pub(super) fn validate_user(user: &str) -> Result<(), StoreError> {
    validate_length("user", user, MAX_USER_BYTES)
}

/// Checks a Store call's arguments.
pub fn validate_store(app: &str, users: &[String], payload: &[u8]) -> Result<(), StoreError> {
    validate_app(app)?;
    if users.len() > MAX_USERS_PER_STORE {
        return Err(StoreError::invalid(format!(
            "{} users in one store call, at most {MAX_USERS_PER_STORE} allowed",
            users.len()
        )));
    }
    for user in users {
        validate_user(user)?;
    }
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::invalid(format!(
            "payload is {} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
            payload.len()
        )));
    }
    Ok(())
}

/// Checks an idempotency key (empty: none).
pub fn validate_idempotency_key(key: &str) -> Result<(), StoreError> {
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(StoreError::invalid(format!(
            "idempotency key is {} bytes, at most {MAX_IDEMPOTENCY_KEY_BYTES} allowed",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a Publish call's arguments and returns the topic to use.
pub fn validate_publish<'a>(
    app: &str,
    topic: &'a str,
    payload: &[u8],
) -> Result<&'a str, StoreError> {
    validate_app(app)?;
    let topic = validate_topic(topic)?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(StoreError::invalid(format!(
            "payload is {} bytes, at most {MAX_PAYLOAD_BYTES} allowed",
            payload.len()
        )));
    }
    Ok(topic)
}

/// Checks a topic; "" means [`ALL_TOPIC`].
pub fn validate_topic(topic: &str) -> Result<&str, StoreError> {
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(StoreError::invalid(format!(
            "topic is {} bytes, at most {MAX_TOPIC_BYTES} allowed",
            topic.len()
        )));
    }
    Ok(if topic.is_empty() { ALL_TOPIC } else { topic })
}

/// Checks a History call and returns it with its topic and limit settled.
pub fn validate_history(mut query: HistoryQuery) -> Result<HistoryQuery, StoreError> {
    validate_app(&query.app)?;
    query.topic = validate_topic(&query.topic)?.to_string();
    query.limit = if query.limit == 0 {
        DEFAULT_HISTORY_LIMIT
    } else {
        query.limit.min(MAX_HISTORY_LIMIT)
    };
    Ok(query)
}

/// Checks a Pending call's arguments and returns the limit to apply.
pub fn validate_pending(app: &str, user: &str, limit: u32) -> Result<u32, StoreError> {
    validate_app(app)?;
    validate_user(user)?;
    Ok(if limit == 0 {
        DEFAULT_PENDING_LIMIT
    } else {
        limit.min(MAX_PENDING_LIMIT)
    })
}

/// Checks an Ack call's items.
pub fn validate_ack(items: &[AckItem]) -> Result<(), StoreError> {
    for item in items {
        validate_app(&item.app)?;
        validate_user(&item.user)?;
    }
    Ok(())
}

/// Checks a StoreMany call's items (as [`validate_store`] does for each).
pub fn validate_store_many(items: &[StoreItem]) -> Result<(), StoreError> {
    if items.len() > MAX_USERS_PER_STORE {
        return Err(StoreError::invalid(format!(
            "{} items in one store call, at most {MAX_USERS_PER_STORE} allowed",
            items.len()
        )));
    }
    for item in items {
        validate_store(&item.app, std::slice::from_ref(&item.user), &item.payload)?;
    }
    Ok(())
}
