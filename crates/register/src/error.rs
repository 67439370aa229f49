//! Register's errors and their one mapping to the gRPC status its callers
//! (rooms, centers, coordinator) see. Register holds its table in memory, so
//! the only refusals are requests it cannot file: a session or a user key
//! without the fields the table is keyed by.

use tonic::Status;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// A session of an Online/Offline batch lacks a key field; the whole
    /// batch is refused, so nothing of it is half applied.
    #[error("session {index} of the batch has no {field}")]
    IncompleteSession { index: usize, field: &'static str },
    /// A user key of a Lookup lacks its app or user.
    #[error("user key {index} of the lookup has no {field}")]
    IncompleteUserKey { index: usize, field: &'static str },
    #[error("app is required")]
    MissingApp,
}

impl From<RegisterError> for Status {
    fn from(error: RegisterError) -> Status {
        match error {
            RegisterError::IncompleteSession { .. }
            | RegisterError::IncompleteUserKey { .. }
            | RegisterError::MissingApp => Status::invalid_argument(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_an_invalid_argument_naming_the_field() {
        let status = Status::from(RegisterError::IncompleteSession {
            index: 2,
            field: "room",
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "session 2 of the batch has no room");
        let status = Status::from(RegisterError::IncompleteUserKey {
            index: 0,
            field: "user",
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "user key 0 of the lookup has no user");
        let status = Status::from(RegisterError::MissingApp);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "app is required");
    }
}
