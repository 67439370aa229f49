//! Coordinator's errors and their one mapping to the gRPC status its callers
//! (rooms and centers) see.

use tonic::{Code, Status};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A required field of the request is empty; the message names it.
    #[error("{0}")]
    MissingField(&'static str),
    #[error("no register is live")]
    NoRegister,
    #[error("unknown app {0:?}")]
    UnknownApp(String),
    /// An upstream message has no route and its app no webhook.
    #[error("no route for product {product:?} type {kind:?} and the app has no webhook")]
    NoRoute { product: String, kind: String },
    /// The route's in-flight cap was reached and no place came free in time.
    #[error("route {route} has {concurrency} requests in flight")]
    RouteBusy { route: String, concurrency: u32 },
    /// Every attempt at the app's endpoint failed; the last failure.
    #[error("{0}")]
    EndpointFailed(String),
    /// Another role (register, a room) or the channel to it refused.
    #[error("{}", .0.message())]
    Peer(Status),
}

impl From<Status> for CoordinatorError {
    fn from(status: Status) -> Self {
        CoordinatorError::Peer(status)
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Status {
        let code = match &error {
            CoordinatorError::MissingField(_) => Code::InvalidArgument,
            CoordinatorError::NoRegister | CoordinatorError::EndpointFailed(_) => Code::Unavailable,
            CoordinatorError::UnknownApp(_) => Code::NotFound,
            CoordinatorError::NoRoute { .. } => Code::FailedPrecondition,
            CoordinatorError::RouteBusy { .. } => Code::ResourceExhausted,
            CoordinatorError::Peer(status) => return status.clone(),
        };
        Status::new(code, error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (
                CoordinatorError::MissingField("app and user are required"),
                Code::InvalidArgument,
            ),
            (CoordinatorError::NoRegister, Code::Unavailable),
            (CoordinatorError::UnknownApp("a".into()), Code::NotFound),
            (
                CoordinatorError::NoRoute {
                    product: "p".into(),
                    kind: "t".into(),
                },
                Code::FailedPrecondition,
            ),
            (
                CoordinatorError::RouteBusy {
                    route: "a/p/t".into(),
                    concurrency: 4,
                },
                Code::ResourceExhausted,
            ),
            (
                CoordinatorError::EndpointFailed("the endpoint answered 500".into()),
                Code::Unavailable,
            ),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn a_peers_status_passes_through_unchanged() {
        let status = Status::from(CoordinatorError::from(Status::deadline_exceeded(
            "slow register",
        )));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert_eq!(status.message(), "slow register");
    }

    #[test]
    fn messages_name_what_is_wrong() {
        let busy = CoordinatorError::RouteBusy {
            route: "shop/orders/new".into(),
            concurrency: 8,
        };
        assert_eq!(
            busy.to_string(),
            "route shop/orders/new has 8 requests in flight"
        );
        let none = CoordinatorError::NoRoute {
            product: "orders".into(),
            kind: "new".into(),
        };
        assert_eq!(
            none.to_string(),
            "no route for product \"orders\" type \"new\" and the app has no webhook"
        );
    }
}
