//! HMS Push Kit: an OAuth2 access token from the client credentials, then
//! `POST /v1/{client_id}/messages:send`. The answer's `code` says more than
//! its HTTP status: `80000000` is success, `80300007` an invalid token,
//! `80200001` / `80200003` a refused or expired access token.

use std::time::Duration;

use pushgrid_proto::cluster::NotifyProvider;
use serde_json::{Map, Value, json};

use crate::send::{
    Answer, Attempt, Device, Notification, Outcome, Sender, by_status, excerpt, exchange,
    fetch_access_token, or_default, url,
};
use crate::token::{HMS_BASE_URL, HMS_TOKEN_URL};

pub(crate) async fn access_token(
    sender: &Sender,
    credentials: &NotifyProvider,
) -> Result<(String, Duration), Attempt> {
    fetch_access_token(
        sender,
        or_default(&credentials.token_url, HMS_TOKEN_URL),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &credentials.client_id),
            ("client_secret", &credentials.client_secret),
        ],
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
        HMS_BASE_URL,
        &format!("/v1/{}/messages:send", credentials.client_id),
    );
    let request = sender
        .http
        .post(address)
        .bearer_auth(access_token)
        .json(&json!({ "validate_only": false, "message": message(device, notification) }));
    let Answer {
        status,
        headers,
        text,
    } = match exchange(request).await {
        Ok(answer) => answer,
        Err(attempt) => return attempt,
    };
    let code = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|body| body["code"].as_str().map(str::to_string))
        .unwrap_or_default();
    let described = format!("hms {status} {code}");
    match code.as_str() {
        "80000000" if status.is_success() => Attempt::Done(Outcome::Sent),
        "80300007" => Attempt::Done(Outcome::DeadToken(described)),
        "80200001" | "80200003" => Attempt::Reauthorize(described),
        _ if status.as_u16() == 401 => Attempt::Reauthorize(described),
        _ if status.is_success() => {
            Attempt::Done(Outcome::Failed(format!("{described}: {}", excerpt(&text))))
        }
        _ => by_status(status, &headers, format!("{described}: {}", excerpt(&text))),
    }
}

/// The Push Kit `message`: the token, the notification, the data (a JSON
/// string), and the Android notification with its tag (what replaces an
/// earlier notification, HMS's collapse) and the tap action Push Kit
/// requires (open the app).
pub(crate) fn message(device: Device<'_>, notification: &Notification) -> Value {
    let mut android_notification = Map::new();
    android_notification.insert("click_action".into(), json!({ "type": 3 }));
    if !notification.collapse_id.is_empty() {
        android_notification.insert("tag".into(), json!(notification.collapse_id));
    }
    if !notification.sound.is_empty() {
        android_notification.insert("sound".into(), json!(notification.sound));
    }
    if let Some(badge) = notification.badge {
        android_notification.insert("badge".into(), json!({ "set_num": badge }));
    }
    let mut message = Map::new();
    message.insert("token".into(), json!([device.token]));
    message.insert(
        "notification".into(),
        json!({ "title": notification.title, "body": notification.body }),
    );
    message.insert(
        "android".into(),
        json!({ "notification": Value::Object(android_notification) }),
    );
    if !notification.data.is_empty() {
        message.insert(
            "data".into(),
            json!(serde_json::to_string(&notification.data).unwrap_or_default()),
        );
    }
    Value::Object(message)
}
