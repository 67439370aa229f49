//! Room's errors towards the cluster and their one mapping to a gRPC status.
//! What a device is told is the protocol's `ErrorCode` and `KickCode`
//! (ERROR and KICK frames, `proto/client.proto`), not this.

use tonic::Status;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    /// A Deliver or Broadcast request without its message (a center bug or
    /// a forged call); the whole request is refused.
    #[error("{0} without a message")]
    MissingMessage(&'static str),
    /// The cluster view has no live node of a role the room needs.
    #[error("no {0} is live")]
    NoPeer(&'static str),
    /// A peer answered with an error of its own.
    #[error("{0}")]
    PeerFailed(String),
}

impl From<RoomError> for Status {
    fn from(error: RoomError) -> Status {
        match error {
            RoomError::MissingMessage(_) => Status::invalid_argument(error.to_string()),
            RoomError::NoPeer(_) | RoomError::PeerFailed(_) => {
                Status::unavailable(error.to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status_and_message() {
        let cases = [
            (
                RoomError::MissingMessage("delivery"),
                tonic::Code::InvalidArgument,
                "delivery without a message",
            ),
            (
                RoomError::NoPeer("register"),
                tonic::Code::Unavailable,
                "no register is live",
            ),
            (
                RoomError::PeerFailed("inbox read failed".into()),
                tonic::Code::Unavailable,
                "inbox read failed",
            ),
        ];
        for (error, code, message) in cases {
            let status = Status::from(error);
            assert_eq!((status.code(), status.message()), (code, message));
        }
    }
}
