//! The SDK's error type.

use std::time::Duration;

use pushgrid_wire::FrameError;

use crate::address::AddressError;
use pushgrid_wire::msg::ErrorCode;

/// Everything that can go wrong in the SDK.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    /// A room address does not parse (see [`crate::RoomAddress`]).
    #[error(transparent)]
    Address(#[from] AddressError),
    /// The TLS settings cannot be used (an unreadable or empty root
    /// certificate file, a bad DER certificate, a bad server name).
    #[error("TLS settings: {0}")]
    TlsConfig(String),
    /// The TLS handshake with a room failed: most often a certificate that no
    /// trusted root signed, or one issued for another name.
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    /// The WebSocket handshake with a room failed (no WebSocket listener
    /// there, or an HTTP answer other than 101).
    #[error("WebSocket handshake with {addr} failed: {reason}")]
    WebSocket { addr: String, reason: String },
    /// Reading from or writing to an open connection failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent bytes that are not a valid frame.
    #[error("invalid frame from server: {0}")]
    Frame(#[from] FrameError),
    /// The server answered AUTH with an ERROR frame.
    #[error("authentication refused by server ({}): {message}", code.as_str_name())]
    AuthRefused { code: ErrorCode, message: String },
    /// The server closed the connection (possibly in the middle of a frame).
    #[error("connection closed by server")]
    Closed,
    /// A step did not finish in time; the string says which one.
    #[error("timed out while {0}")]
    Timeout(&'static str),
    /// The server sent something the protocol does not allow at this point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The dispatcher could not be asked or gave an unusable answer.
    #[error("dispatcher: {0}")]
    Dispatch(String),
    /// The server answered an UPSTREAM frame with an ERROR frame.
    #[error("upstream refused by server ({}): {message}", code.as_str_name())]
    UpstreamRefused { code: ErrorCode, message: String },
    /// No UPSTREAM_OK or ERROR arrived within the configured timeout.
    #[error("upstream message not answered within {0:?}")]
    UpstreamTimeout(Duration),
    /// The connection dropped after the UPSTREAM frame was sent and before it was
    /// answered; the server may or may not have routed it (retry with the same
    /// `client_msg_id` so the backend can drop the duplicate).
    #[error("connection lost before the upstream message was answered")]
    Disconnected,
    /// Too many upstream messages are waiting for a connection.
    #[error("too many upstream messages are waiting for a connection")]
    QueueFull,
    /// A frame would be larger than the protocol allows.
    #[error("frame body of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: u32 },
    /// The client was closed (by [`crate::Client::close`], an authentication
    /// failure, or because its event receiver was dropped).
    #[error("client is closed")]
    ClientClosed,
}

impl ClientError {
    /// True when retrying the same AUTH cannot help (bad token, unsupported
    /// protocol...): the reconnecting [`crate::Client`] stops for good on these.
    /// `UNAVAILABLE`, `INTERNAL`, `AUTH_TIMEOUT`, `RATE_LIMITED` and
    /// `TOO_MANY_CONNECTIONS` refusals are transient.
    pub fn is_permanent_auth_failure(&self) -> bool {
        match self {
            ClientError::AuthRefused { code, .. } => !matches!(
                code,
                ErrorCode::Unavailable
                    | ErrorCode::Internal
                    | ErrorCode::AuthTimeout
                    | ErrorCode::RateLimited
                    | ErrorCode::TooManyConnections
            ),
            _ => false,
        }
    }
}
