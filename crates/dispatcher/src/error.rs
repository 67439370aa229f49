//! The dispatcher's errors and their one mapping to an HTTP answer:
//! `{"error": {"code", "message"}}` with the matching status.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    /// A query parameter is missing or malformed; the message names it.
    #[error("{field}: {reason}")]
    BadRequest {
        field: &'static str,
        reason: &'static str,
    },
    #[error("the query string cannot be read: {0}")]
    BadQuery(String),
    #[error("no room is live for this device")]
    NoRoom,
    #[error("too many requests from this address; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the request was not answered within {0:?}")]
    Timeout(Duration),
    #[error("no such route")]
    NotFound,
    #[error("internal error: {0}")]
    Internal(String),
}

impl DispatchError {
    pub fn status(&self) -> StatusCode {
        match self {
            DispatchError::BadRequest { .. } | DispatchError::BadQuery(_) => {
                StatusCode::BAD_REQUEST
            }
            DispatchError::NoRoom | DispatchError::Timeout(_) => StatusCode::SERVICE_UNAVAILABLE,
            DispatchError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            DispatchError::NotFound => StatusCode::NOT_FOUND,
            DispatchError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            DispatchError::BadRequest { .. } | DispatchError::BadQuery(_) => "bad_request",
            DispatchError::NoRoom => "no_room",
            DispatchError::RateLimited { .. } => "rate_limited",
            DispatchError::Timeout(_) => "timeout",
            DispatchError::NotFound => "not_found",
            DispatchError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for DispatchError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code(), "message": self.to_string() } });
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let DispatchError::RateLimited { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        response
    }
}
