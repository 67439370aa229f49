//! The push API's `notification` object and its checks (notify.rs sends).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pushgrid_notify::Notification;
use serde::Deserialize;

use crate::error::ApiError;

/// Longest collapse id: APNs' `apns-collapse-id` limit.
const MAX_COLLAPSE_ID: usize = 64;
/// Largest notification (title, body, sound and data as JSON): under the
/// 4 KB APNs and FCM allow, with room for the fields around them.
const MAX_NOTIFICATION_BYTES: usize = 3500;
/// Data keys the providers keep for themselves.
const RESERVED_DATA_KEYS: [&str; 4] = ["aps", "from", "message_type", "notification"];

/// The push API's `notification` object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NotificationParams {
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    badge: Option<u32>,
    #[serde(default)]
    sound: String,
    #[serde(default)]
    collapse_id: String,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    policy: Option<String>,
    /// Seconds the `unacked_after` policy waits for an ACK.
    #[serde(default)]
    unacked_after_secs: Option<u32>,
}

/// The longest `unacked_after_secs`: a day.
const MAX_UNACKED_AFTER_SECS: u32 = 86_400;

/// When a user of a push is notified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    /// Only a user with no live session.
    Offline,
    /// Every user, online or not.
    Always,
    /// A user whose message no device acknowledged in this time.
    UnackedAfter(Duration),
}

impl Policy {
    pub(super) fn label(self) -> &'static str {
        match self {
            Policy::Offline => "offline",
            Policy::Always => "always",
            Policy::UnackedAfter(_) => "unacked_after",
        }
    }
}

/// A checked `notification` object.
#[derive(Debug, Clone)]
pub(crate) struct Notice {
    pub(super) notification: Arc<Notification>,
    pub(super) policy: Policy,
}

/// Checks a push's `notification`; every refusal names its field.
pub(crate) fn validate(params: NotificationParams) -> Result<Notice, ApiError> {
    let bad = |message: String| ApiError::bad_request(format!("notification.{message}"));
    let policy = match (params.policy.as_deref(), params.unacked_after_secs) {
        (None | Some("offline"), None) => Policy::Offline,
        (Some("always"), None) => Policy::Always,
        (Some("unacked_after"), Some(secs)) if (1..=MAX_UNACKED_AFTER_SECS).contains(&secs) => {
            Policy::UnackedAfter(Duration::from_secs(u64::from(secs)))
        }
        (Some("unacked_after"), secs) => {
            return Err(bad(format!(
                "unacked_after_secs: the unacked_after policy needs 1 to {MAX_UNACKED_AFTER_SECS} seconds, not {secs:?}"
            )));
        }
        (None | Some("offline" | "always"), Some(_)) => {
            return Err(bad(
                "unacked_after_secs: only with \"policy\": \"unacked_after\"".into(),
            ));
        }
        (Some(other), _) => {
            return Err(bad(format!(
                "policy: must be offline, always or unacked_after, not {:?}",
                pushgrid_common::auth::printable(other)
            )));
        }
    };
    if params.title.is_empty() && params.body.is_empty() {
        return Err(bad("title: a notification needs a title or a body".into()));
    }
    if params.collapse_id.len() > MAX_COLLAPSE_ID {
        return Err(bad(format!(
            "collapse_id: {} bytes, at most {MAX_COLLAPSE_ID}",
            params.collapse_id.len()
        )));
    }
    for key in params.data.keys() {
        if key.is_empty()
            || RESERVED_DATA_KEYS.contains(&key.as_str())
            || key.starts_with("google.")
            || key.starts_with("gcm.")
        {
            return Err(bad(format!(
                "data: key {:?} is empty or kept by the providers (aps, from, message_type, notification, google.*, gcm.*)",
                pushgrid_common::auth::printable(key)
            )));
        }
    }
    let size = params.title.len()
        + params.body.len()
        + params.sound.len()
        + params
            .data
            .iter()
            .map(|(key, value)| key.len() + value.len() + 6)
            .sum::<usize>();
    if size > MAX_NOTIFICATION_BYTES {
        return Err(bad(format!(
            "title, body, sound and data: {size} bytes, at most {MAX_NOTIFICATION_BYTES}"
        )));
    }
    Ok(Notice {
        notification: Arc::new(Notification {
            title: params.title,
            body: params.body,
            badge: params.badge,
            sound: params.sound,
            collapse_id: params.collapse_id,
            data: params.data,
        }),
        policy,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn params(json: serde_json::Value) -> Result<Notice, String> {
        let params: NotificationParams = serde_json::from_value(json).map_err(|e| e.to_string())?;
        validate(params).map_err(|error| error.to_string())
    }

    #[test]
    fn a_notification_is_checked_field_by_field() {
        let notice =
            params(serde_json::json!({ "title": "Hi", "data": { "room": "42" } })).unwrap();
        assert_eq!(notice.policy, Policy::Offline);
        assert_eq!(notice.notification.data["room"], "42");
        assert_eq!(
            params(serde_json::json!({ "title": "Hi", "policy": "always" }))
                .unwrap()
                .policy,
            Policy::Always
        );
        let waits = params(
            serde_json::json!({ "title": "t", "policy": "unacked_after", "unacked_after_secs": 30 }),
        );
        assert_eq!(
            waits.unwrap().policy,
            Policy::UnackedAfter(Duration::from_secs(30))
        );
        for (json, expected) in [
            (
                serde_json::json!({ "title": "t", "policy": "unacked_after" }),
                "notification.unacked_after_secs: the unacked_after policy needs 1 to 86400 seconds, not None",
            ),
            (
                serde_json::json!({ "title": "t", "policy": "unacked_after", "unacked_after_secs": 0 }),
                "not Some(0)",
            ),
            (
                serde_json::json!({ "title": "t", "unacked_after_secs": 5 }),
                "notification.unacked_after_secs: only with \"policy\": \"unacked_after\"",
            ),
        ] {
            let error = params(json.clone()).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
        let refused = [
            (
                serde_json::json!({}),
                "notification.title: a notification needs a title or a body",
            ),
            (
                serde_json::json!({ "title": "t", "policy": "sometimes" }),
                "notification.policy: must be offline, always or unacked_after, not \"sometimes\"",
            ),
            (
                serde_json::json!({ "title": "t", "collapse_id": "c".repeat(65) }),
                "notification.collapse_id: 65 bytes, at most 64",
            ),
            (
                serde_json::json!({ "title": "t", "data": { "aps": "x" } }),
                "notification.data: key \"aps\"",
            ),
            (
                serde_json::json!({ "title": "t", "data": { "google.x": "x" } }),
                "notification.data: key \"google.x\"",
            ),
            (
                serde_json::json!({ "body": "b".repeat(3501) }),
                "notification.title, body, sound and data: 3501 bytes, at most 3500",
            ),
        ];
        for (json, expected) in refused {
            let error = params(json.clone()).unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
        assert!(
            params(serde_json::json!({ "title": "t", "colour": "red" }))
                .unwrap_err()
                .contains("colour")
        );
    }
}
