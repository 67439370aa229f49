//! FCM HTTP v1: an OAuth2 access token from the service account's signed
//! assertion (cached until a minute before it expires), then
//! `POST /v1/projects/{project}/messages:send` with the `message` object.
//! `UNREGISTERED` (404) and `SENDER_ID_MISMATCH` mean the token is of no use
//! to this app (a 404 without them is a failure, not a dead token); a 401
//! asks for a new access token.

use std::time::Duration;

use pushgrid_proto::cluster::NotifyProvider;
use serde_json::{Map, Value, json};

use crate::send::{
    Answer, Attempt, Device, Notification, Outcome, Sender, by_status, excerpt, exchange,
    fetch_access_token, or_default, url,
};
use crate::token::{self, FCM_BASE_URL, FCM_TOKEN_URL};

/// The assertion grant type of RFC 7523.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

pub(crate) async fn access_token(
    sender: &Sender,
    credentials: &NotifyProvider,
    now: u64,
) -> Result<(String, Duration), Attempt> {
    let token_url = or_default(&credentials.token_url, FCM_TOKEN_URL);
    let assertion = token::fcm_assertion(
        &credentials.client_email,
        &credentials.private_key,
        token_url,
        now,
    )
    .map_err(|error| Attempt::Done(Outcome::Failed(format!("fcm assertion: {error}"))))?;
    fetch_access_token(
        sender,
        token_url,
        &[("grant_type", JWT_BEARER), ("assertion", &assertion)],
    )
    .await
}

pub(crate) async fn send(
    sender: &Sender,
    credentials: &NotifyProvider,
    access_token: &str,
    device: Device<'_>,
    notification: &Notification,
) -> Attempt {
    let address = url(
        &credentials.base_url,
        FCM_BASE_URL,
        &format!("/v1/projects/{}/messages:send", credentials.project_id),
    );
    let request = sender
        .http
        .post(address)
        .bearer_auth(access_token)
        .json(&json!({ "message": message(device, notification) }));
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
    let code = error_code(&text);
    let described = format!("fcm {status} {code}");
    match (status.as_u16(), code.as_str()) {
        // Only FCM's own word on the token: a bare 404 (a wrong project or
        // base URL) must not remove tokens that are fine.
        (_, "UNREGISTERED" | "SENDER_ID_MISMATCH") => Attempt::Done(Outcome::DeadToken(described)),
        (401, _) => Attempt::Reauthorize(described),
        _ => by_status(status, &headers, format!("{described}: {}", excerpt(&text))),
    }
}

/// FCM's error code: the `FcmError` detail's `errorCode`, else the
/// `status` of the error.
fn error_code(text: &str) -> String {
    let Ok(body) = serde_json::from_str::<Value>(text) else {
        return String::new();
    };
    let error = &body["error"];
    error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|detail| detail["errorCode"].as_str())
        .or_else(|| error["status"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// The v1 `message`: the token, the notification, the data, and the
/// collapse key, sound and badge in the Android and APNs blocks.
pub(crate) fn message(device: Device<'_>, notification: &Notification) -> Value {
    let mut message = Map::new();
    message.insert("token".into(), json!(device.token));
    message.insert(
        "notification".into(),
        json!({ "title": notification.title, "body": notification.body }),
    );
    if !notification.data.is_empty() {
        message.insert("data".into(), json!(notification.data));
    }
    let mut android = Map::new();
    let mut android_notification = Map::new();
    if !notification.collapse_id.is_empty() {
        android.insert("collapse_key".into(), json!(notification.collapse_id));
    }
    if !notification.sound.is_empty() {
        android_notification.insert("sound".into(), json!(notification.sound));
    }
    if !android_notification.is_empty() {
        android.insert("notification".into(), Value::Object(android_notification));
    }
    if !android.is_empty() {
        message.insert("android".into(), Value::Object(android));
    }
    if notification.badge.is_some() || !notification.collapse_id.is_empty() {
        let mut apns = Map::new();
        if !notification.collapse_id.is_empty() {
            apns.insert(
                "headers".into(),
                json!({ "apns-collapse-id": notification.collapse_id }),
            );
        }
        if let Some(badge) = notification.badge {
            apns.insert("payload".into(), json!({ "aps": { "badge": badge } }));
        }
        message.insert("apns".into(), Value::Object(apns));
    }
    Value::Object(message)
}
