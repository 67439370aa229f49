//! The push API's errors and their one mapping to an answer: each variant's
//! HTTP status, its stable machine-readable `code` and, for the answers a
//! caller should retry later, its `Retry-After`. The body of a failed call (or
//! of one failed command in a batch) is `{"error": {"code", "message"}}`;
//! docs/api.md lists the codes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A parameter is missing or malformed; the message names it. Nothing
    /// was stored.
    #[error("{0}")]
    BadRequest(String),
    /// No valid API key (or admin token) for this method.
    #[error("{0}")]
    Unauthorized(String),
    /// No such API method, or no such message.
    #[error("{0}")]
    NotFound(String),
    /// An idempotency key reused with another body.
    #[error("{0}")]
    Conflict(String),
    /// The request body or the payload is over its limit.
    #[error("{0}")]
    TooLarge(String),
    /// The app is over its rate; nothing was stored.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u32,
    },
    /// A bounded queue is full; nothing was stored.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u32,
    },
    /// A role this call needs is away or refused center (its store, its
    /// routing, the cluster's credentials).
    #[error("{0}")]
    Unavailable(String),
    /// center itself cannot serve the call as configured.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::BadRequest(message.into())
    }

    /// The answer to a failed call of another role: refused input stays the
    /// caller's 400 (or 409), anything else is the cluster's 503.
    pub fn from_status(status: tonic::Status) -> ApiError {
        match status.code() {
            tonic::Code::InvalidArgument => ApiError::bad_request(status.message()),
            tonic::Code::AlreadyExists => ApiError::Conflict(status.message().to_string()),
            // The cluster's own credentials are wrong: an operator's problem.
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                ApiError::Unavailable(format!(
                    "a cluster role refused center's credential: {}",
                    status.message()
                ))
            }
            _ => ApiError::Unavailable(format!("storage unavailable: {}", status.message())),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Overloaded { .. } => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }

    /// When to try again, for the answers that say so.
    pub fn retry_after_secs(&self) -> Option<u32> {
        match self {
            ApiError::RateLimited {
                retry_after_secs, ..
            }
            | ApiError::Overloaded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    fn message_mut(&mut self) -> &mut String {
        match self {
            ApiError::BadRequest(message)
            | ApiError::Unauthorized(message)
            | ApiError::NotFound(message)
            | ApiError::Conflict(message)
            | ApiError::TooLarge(message)
            | ApiError::RateLimited { message, .. }
            | ApiError::Overloaded { message, .. }
            | ApiError::Unavailable(message)
            | ApiError::Internal(message) => message,
        }
    }

    /// `{"error": {"code", "message"}}`, counted by code: the answer of a
    /// failed call, or of one failed command in a batch.
    pub fn to_json(&self) -> serde_json::Value {
        metrics::counter!("pushgrid_center_api_errors_total", "code" => self.code()).increment(1);
        json!({ "error": { "code": self.code(), "message": self.to_string() } })
    }

    /// The same error with `prefix` before its message (e.g. the batch
    /// command it belongs to).
    pub fn within(mut self, prefix: &str) -> ApiError {
        let message = self.message_mut();
        *message = format!("{prefix}: {message}");
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.to_json();
        let mut response = (self.status(), axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_secs() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_has_its_status_code_and_retry_after() {
        let cases = [
            (ApiError::bad_request("x"), 400, "bad_request", None),
            (
                ApiError::Unauthorized("x".into()),
                401,
                "unauthorized",
                None,
            ),
            (ApiError::NotFound("x".into()), 404, "not_found", None),
            (ApiError::Conflict("x".into()), 409, "conflict", None),
            (ApiError::TooLarge("x".into()), 413, "too_large", None),
            (
                ApiError::RateLimited {
                    message: "x".into(),
                    retry_after_secs: 2,
                },
                429,
                "rate_limited",
                Some(2),
            ),
            (
                ApiError::Overloaded {
                    message: "x".into(),
                    retry_after_secs: 1,
                },
                503,
                "overloaded",
                Some(1),
            ),
            (ApiError::Unavailable("x".into()), 503, "unavailable", None),
            (ApiError::Internal("x".into()), 500, "internal", None),
        ];
        for (error, status, code, retry) in cases {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code);
            assert_eq!(error.retry_after_secs(), retry);
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .map(|value| value.to_str().expect("an ASCII header").to_string()),
                retry.map(|seconds| seconds.to_string())
            );
        }
    }

    #[test]
    fn other_roles_refusals_map_to_the_callers_or_the_clusters_fault() {
        let refused = ApiError::from_status(tonic::Status::invalid_argument("users[0]: empty"));
        assert_eq!(refused, ApiError::bad_request("users[0]: empty"));
        let reused = ApiError::from_status(tonic::Status::already_exists("key reused"));
        assert_eq!(reused.code(), "conflict");
        let credential = ApiError::from_status(tonic::Status::unauthenticated("bad key"));
        assert_eq!(credential.status().as_u16(), 503);
        assert!(
            credential
                .to_string()
                .contains("refused center's credential")
        );
        let lost = ApiError::from_status(tonic::Status::unavailable("saver away"));
        assert_eq!(lost.code(), "unavailable");
        assert!(lost.to_string().contains("storage unavailable: saver away"));
    }

    #[test]
    fn within_names_the_command_and_keeps_the_kind() {
        let error = ApiError::Overloaded {
            message: "queue full".into(),
            retry_after_secs: 3,
        }
        .within("commands[2]");
        assert_eq!(error.to_string(), "commands[2]: queue full");
        assert_eq!(error.retry_after_secs(), Some(3));
    }
}
