//! APNs: `POST /3/device/{token}` over HTTP/2 with the provider token
//! (ES256 JWT) as `authorization: bearer`, the headers Apple documents
//! (`apns-topic`, `apns-push-type`, `apns-priority`, `apns-collapse-id`) and
//! the `aps` payload. A 410 (`Unregistered`) means the token is dead; a 403
//! `ExpiredProviderToken` or `InvalidProviderToken` asks for a new provider
//! token.

use std::time::Duration;

use pushgrid_proto::cluster::NotifyProvider;
use serde_json::{Map, Value, json};

use crate::send::{
    Answer, Attempt, Device, Notification, Outcome, Sender, by_status, excerpt, exchange, url,
};
use crate::token::{self, APNS_BASE_URL, APNS_TOKEN_REUSE_SECS};

/// A provider token signed now, kept for [`APNS_TOKEN_REUSE_SECS`].
pub(crate) fn provider_token(
    credentials: &NotifyProvider,
    now: u64,
) -> Result<(String, Duration), Attempt> {
    token::apns_provider_token(
        &credentials.key_id,
        &credentials.team_id,
        &credentials.private_key,
        now,
    )
    .map(|signed| (signed, Duration::from_secs(APNS_TOKEN_REUSE_SECS)))
    .map_err(|error| Attempt::Done(Outcome::Failed(format!("apns provider token: {error}"))))
}

pub(crate) async fn send(
    sender: &Sender,
    credentials: &NotifyProvider,
    provider_token: &str,
    device: Device<'_>,
    notification: &Notification,
) -> Attempt {
    let topic = if device.bundle.is_empty() {
        credentials.topic.as_str()
    } else {
        device.bundle
    };
    let address = url(
        &credentials.base_url,
        APNS_BASE_URL,
        &format!("/3/device/{}", device.token),
    );
    let mut request = sender
        .http
        .post(address)
        .header("authorization", format!("bearer {provider_token}"))
        .header("apns-topic", topic)
        .header("apns-push-type", "alert")
        .header("apns-priority", "10")
        .json(&payload(notification));
    if !notification.collapse_id.is_empty() {
        request = request.header("apns-collapse-id", &notification.collapse_id);
    }
    let Answer {
        status,
        headers,
        text,
    } = match exchange(request).await {
        Ok(answer) => answer,
        Err(attempt) => return attempt,
    };
    if status.is_success() {
        return Attempt::Done(Outcome::Sent);
    }
    let reason = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|body| body["reason"].as_str().map(str::to_string))
        .unwrap_or_else(|| excerpt(&text));
    let described = format!("apns {status} {reason}");
    match (status.as_u16(), reason.as_str()) {
        (410, _) => Attempt::Done(Outcome::DeadToken(described)),
        (403, "ExpiredProviderToken" | "InvalidProviderToken") => Attempt::Reauthorize(described),
        _ => by_status(status, &headers, described),
    }
}

/// The JSON payload: `aps` (alert title and body, badge, sound) and the
/// notification's data as top-level keys beside it.
pub(crate) fn payload(notification: &Notification) -> Value {
    let mut aps = Map::new();
    aps.insert(
        "alert".into(),
        json!({ "title": notification.title, "body": notification.body }),
    );
    if let Some(badge) = notification.badge {
        aps.insert("badge".into(), json!(badge));
    }
    if !notification.sound.is_empty() {
        aps.insert("sound".into(), json!(notification.sound));
    }
    let mut root = Map::new();
    for (key, value) in &notification.data {
        if key != "aps" {
            root.insert(key.clone(), json!(value));
        }
    }
    root.insert("aps".into(), Value::Object(aps));
    Value::Object(root)
}
