//! The Redis keys of a user's inbox and of a topic's stream, the inbox
//! member of a message id, and a stream entry read back as a message.

use bytes::Bytes;
use pushgrid_common::ids::id_time_ms;
use pushgrid_proto::cluster::BroadcastMessage;
use redis::Value;

use crate::error::StoreError;

/// The Redis keys of one user's inbox.
pub(super) struct UserKeys {
    pub(super) inbox: String,
    pub(super) msgs: String,
    pub(super) attempts: String,
    pub(super) warm: String,
}

impl UserKeys {
    /// Apps contain no `:` (see `validate_app`), so `<app>:<user>` is unambiguous.
    pub(super) fn new(app: &str, user: &str) -> UserKeys {
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
pub(super) struct StreamKeys {
    pub(super) seq: String,
    pub(super) stream: String,
    pub(super) epoch: String,
}

impl StreamKeys {
    pub(super) fn new(app: &str, topic: &str) -> StreamKeys {
        let tag = format!("pg:{{bc:{app}:{topic}}}");
        StreamKeys {
            seq: format!("{tag}:seq"),
            stream: format!("{tag}:stream"),
            epoch: format!("{tag}:epoch"),
        }
    }
}

/// The inbox member of a message id: zero-padded so bytewise order is numeric order.
pub(super) fn member(id: u64) -> String {
    format!("{id:020}")
}

pub(super) fn score(id: u64) -> f64 {
    // Milliseconds since 1970 are below 2^53: exact in an f64.
    id_time_ms(id) as f64
}

pub(super) fn parse_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("unexpected redis reply: {error}"))
}

/// A stream entry (`[id, [field, value, ...]]`) as a broadcast message.
pub(super) fn stream_entry(
    app: &str,
    topic: &str,
    epoch: u64,
    entry: Value,
) -> Option<BroadcastMessage> {
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
