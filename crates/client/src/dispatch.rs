//! Asking the dispatcher which rooms to connect to.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::error::ClientError;

/// One room the dispatcher offered.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DispatchedRoom {
    /// The room's node name.
    #[serde(default)]
    pub node: String,
    /// `host:port` of the room's TCP listener.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The room's WebSocket URL, when it has one.
    #[serde(default)]
    pub ws: Option<String>,
}

/// The dispatcher's answer: rooms in the order to try them, and how long the
/// answer may be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub rooms: Vec<DispatchedRoom>,
    pub ttl: Duration,
}

#[derive(Deserialize)]
struct Envelope {
    result: Option<DispatchResult>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct DispatchResult {
    #[serde(default)]
    rooms: Vec<DispatchedRoom>,
    #[serde(default)]
    ttl_secs: u64,
}

#[derive(Deserialize)]
struct ApiError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// `GET {base}/v1/dispatch?user=<user>`.
pub async fn dispatch(
    http: &reqwest::Client,
    base: &str,
    user: &str,
) -> Result<Dispatch, ClientError> {
    let url = format!("{}/v1/dispatch", base.trim_end_matches('/'));
    let response = http
        .get(&url)
        .query(&[("user", user)])
        .send()
        .await
        .map_err(|error| ClientError::Dispatch(format!("GET {url}: {error}")))?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|error| ClientError::Dispatch(format!("reading the answer of {url}: {error}")))?;
    parse_dispatch(status.as_u16(), &body)
}

/// Parses a dispatcher answer (exposed for tests).
pub fn parse_dispatch(status: u16, body: &[u8]) -> Result<Dispatch, ClientError> {
    let envelope: Envelope = match serde_json::from_slice(body) {
        Ok(envelope) => envelope,
        Err(error) => {
            let excerpt = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(ClientError::Dispatch(format!(
                "HTTP {status}, undecodable answer ({error}): {excerpt}"
            )));
        }
    };
    if let Some(error) = envelope.error {
        return Err(ClientError::Dispatch(format!(
            "HTTP {status}, {}: {}",
            error.code, error.message
        )));
    }
    let Some(result) = envelope.result else {
        return Err(ClientError::Dispatch(format!(
            "HTTP {status}, answer has neither result nor error"
        )));
    };
    let rooms: Vec<DispatchedRoom> = result
        .rooms
        .into_iter()
        .filter(|room| room.tcp.as_deref().is_some_and(|tcp| !tcp.is_empty()))
        .collect();
    if rooms.is_empty() {
        return Err(ClientError::Dispatch(
            "no room with a TCP address available".into(),
        ));
    }
    Ok(Dispatch {
        rooms,
        ttl: Duration::from_secs(result.ttl_secs),
    })
}

/// The `sub` claim of a JWT, read without verifying the signature (the room
/// verifies it; the SDK only needs the user id to ask the dispatcher).
pub fn user_from_token(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    match claims.get("sub")? {
        serde_json::Value::String(sub) => Some(sub.clone()),
        serde_json::Value::Number(sub) => Some(sub.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_rooms_in_order_and_skips_rooms_without_tcp() {
        let body = br#"{"result": {"rooms": [{"node": "room-1", "tcp": "127.0.0.1:8090"},
            {"node": "room-ws", "ws": "ws://x"}, {"node": "room-2", "tcp": "127.0.0.1:8091", "extra": 1}], "ttl_secs": 60}}"#;
        let dispatch = parse_dispatch(200, body).unwrap();
        let addrs: Vec<_> = dispatch
            .rooms
            .iter()
            .map(|room| room.tcp.clone().unwrap())
            .collect();
        assert_eq!(addrs, ["127.0.0.1:8090", "127.0.0.1:8091"]);
        assert_eq!(dispatch.ttl, Duration::from_secs(60));
    }

    #[test]
    fn error_answer_says_what_the_dispatcher_said() {
        let body = br#"{"error": {"code": "no_rooms", "message": "no room is alive"}}"#;
        let error = parse_dispatch(503, body).unwrap_err().to_string();
        assert!(
            error.contains("no_rooms") && error.contains("no room is alive"),
            "{error}"
        );
        let error = parse_dispatch(502, b"<html>bad gateway</html>")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("502") && error.contains("bad gateway"),
            "{error}"
        );
    }

    #[test]
    fn user_comes_from_the_sub_claim() {
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let payload = engine.encode(br#"{"sub":"alice","app":"demo","exp":1}"#);
        let token = format!(
            "{}.{payload}.signature",
            engine.encode(br#"{"alg":"HS256"}"#)
        );
        assert_eq!(user_from_token(&token).as_deref(), Some("alice"));
        assert_eq!(user_from_token("not a jwt"), None);
        assert_eq!(user_from_token("a.!!!.c"), None);
    }
}
