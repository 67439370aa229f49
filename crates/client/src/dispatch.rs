//! Asking the dispatcher which rooms to connect to.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tracing::debug;

use crate::address::{RoomAddress, Transport};
use crate::error::ClientError;

/// One room the dispatcher offered: an address per transport it serves, each
/// a bare `host:port` (or a whole address with its scheme).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DispatchedRoom {
    /// The room's node name.
    #[serde(default)]
    pub node: String,
    /// The room's TCP listener.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The room's WebSocket listener, when it has one.
    #[serde(default)]
    pub ws: Option<String>,
    /// The room's TLS listener, when it has one.
    #[serde(default)]
    pub tls: Option<String>,
    /// The room's WebSocket-over-TLS listener, when it has one.
    #[serde(default)]
    pub wss: Option<String>,
}

impl DispatchedRoom {
    /// The room's address on `transport`, when it lists a usable one.
    pub fn address(&self, transport: Transport) -> Option<RoomAddress> {
        let listed = match transport {
            Transport::Tcp => &self.tcp,
            Transport::Tls => &self.tls,
            Transport::Ws => &self.ws,
            Transport::Wss => &self.wss,
        };
        let listed = listed
            .as_deref()
            .map(str::trim)
            .filter(|text| !text.is_empty())?;
        match RoomAddress::with_transport(transport, listed) {
            Ok(address) => Some(address),
            Err(error) => {
                debug!(node = %self.node, %error, "ignoring an unusable address from the dispatcher");
                None
            }
        }
    }

    /// The address to use when the client prefers `preferred`: that transport
    /// when the room serves it, else the closest one it does serve. A secure
    /// preference (`tls`, `wss`) never falls back to a plain transport; a plain
    /// one may move up to TLS when the room serves nothing else.
    pub fn preferred_address(&self, preferred: Transport) -> Option<RoomAddress> {
        let order: &[Transport] = match preferred {
            Transport::Tcp => &[
                Transport::Tcp,
                Transport::Ws,
                Transport::Tls,
                Transport::Wss,
            ],
            Transport::Ws => &[
                Transport::Ws,
                Transport::Tcp,
                Transport::Wss,
                Transport::Tls,
            ],
            Transport::Tls => &[Transport::Tls, Transport::Wss],
            Transport::Wss => &[Transport::Wss, Transport::Tls],
        };
        order.iter().find_map(|transport| self.address(*transport))
    }

    /// Every address the room lists, by transport.
    pub fn addresses(&self) -> Vec<RoomAddress> {
        Transport::ALL
            .into_iter()
            .filter_map(|transport| self.address(transport))
            .collect()
    }
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
        .filter(|room| !room.addresses().is_empty())
        .collect();
    if rooms.is_empty() {
        return Err(ClientError::Dispatch(
            "no room with a usable address available".into(),
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
    fn parses_rooms_in_order_and_skips_rooms_without_a_usable_address() {
        let body = br#"{"result": {"rooms": [{"node": "room-1", "tcp": "127.0.0.1:8090"},
            {"node": "broken", "tcp": "no port", "ws": ""}, {"node": "room-ws", "ws": "10.0.0.9:8091"},
            {"node": "room-2", "tcp": "127.0.0.1:8091", "extra": 1}], "ttl_secs": 60}}"#;
        let dispatch = parse_dispatch(200, body).unwrap();
        let nodes: Vec<_> = dispatch
            .rooms
            .iter()
            .map(|room| room.node.as_str())
            .collect();
        assert_eq!(nodes, ["room-1", "room-ws", "room-2"]);
        assert_eq!(dispatch.ttl, Duration::from_secs(60));
        let none = br#"{"result": {"rooms": [{"node": "broken", "tcp": "x"}], "ttl_secs": 1}}"#;
        assert!(parse_dispatch(200, none).is_err());
    }

    #[test]
    fn the_preferred_transport_wins_and_secure_never_falls_back_to_plain() {
        let body = br#"{"result": {"rooms": [
            {"node": "all", "tcp": "10.0.0.1:8090", "ws": "10.0.0.1:8091", "tls": "push.example:8443", "wss": "push.example:443"},
            {"node": "plain", "tcp": "10.0.0.2:8090", "ws": "ws://10.0.0.2:8091/push"},
            {"node": "tls-only", "tcp": "", "tls": "10.0.0.3:8443"}], "ttl_secs": 5}}"#;
        let rooms = parse_dispatch(200, body).unwrap().rooms;
        let chosen = |preferred: Transport| -> Vec<Option<String>> {
            rooms
                .iter()
                .map(|room| {
                    room.preferred_address(preferred)
                        .map(|address| address.to_string())
                })
                .collect()
        };
        assert_eq!(
            chosen(Transport::Tcp),
            [
                Some("10.0.0.1:8090".into()),
                Some("10.0.0.2:8090".into()),
                Some("tls://10.0.0.3:8443".into())
            ]
        );
        assert_eq!(
            chosen(Transport::Ws),
            [
                Some("ws://10.0.0.1:8091/".into()),
                Some("ws://10.0.0.2:8091/push".into()),
                Some("tls://10.0.0.3:8443".into())
            ]
        );
        assert_eq!(
            chosen(Transport::Tls),
            [
                Some("tls://push.example:8443".into()),
                None,
                Some("tls://10.0.0.3:8443".into())
            ]
        );
        assert_eq!(
            chosen(Transport::Wss),
            [
                Some("wss://push.example:443/".into()),
                None,
                Some("tls://10.0.0.3:8443".into())
            ]
        );
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
