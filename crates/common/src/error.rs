//! Why a role could not start, or stopped serving: the error of every role
//! library's `Listeners::bind` and `run`, shared because every role starts
//! the same way (bind, read its credentials, open its store, join keeper,
//! serve). The binaries print it and exit non-zero; the message says what to
//! fix. Each variant's message already holds the failure it wraps, so none
//! reports a `source()` (a binary's `Error: ... Caused by: ...` would say it
//! twice).

use std::io;

use crate::auth::CredentialError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address is taken, not local, or not an address.
    #[error("cannot listen on {addr}: {error}")]
    Listen { addr: String, error: io::Error },
    /// A setting is missing or wrong; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The role's key or the verifiers cannot be read.
    #[error("credentials: {0}")]
    Credentials(CredentialError),
    /// No keeper to join (none configured, or shut down before one answered).
    #[error("keeper: {0}")]
    Keeper(String),
    /// The role's database cannot be opened or migrated.
    #[error("database: {0}")]
    Database(String),
    /// Redis cannot be reached or refused the role's first commands.
    #[error("redis: {0}")]
    Redis(String),
    /// TLS certificate or key files that cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The gRPC server stopped with an error.
    #[error("gRPC server: {0}")]
    Grpc(tonic::transport::Error),
    /// An operating-system failure, with what was being done.
    #[error("{context}: {error}")]
    Os { context: String, error: io::Error },
    /// Any other operating-system failure (a bound listener's address).
    #[error("{0}")]
    Io(io::Error),
    /// A task the role cannot serve without ended abnormally.
    #[error("{0} ended abnormally")]
    Stopped(String),
}

impl StartError {
    /// Wraps an OS error with what was being done: `.map_err(StartError::os("..."))`.
    pub fn os(context: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
        let context = context.into();
        move |error| StartError::Os { context, error }
    }
}

impl From<CredentialError> for StartError {
    fn from(error: CredentialError) -> StartError {
        StartError::Credentials(error)
    }
}

impl From<tonic::transport::Error> for StartError {
    fn from(error: tonic::transport::Error) -> StartError {
        StartError::Grpc(error)
    }
}

impl From<io::Error> for StartError {
    fn from(error: io::Error) -> StartError {
        StartError::Io(error)
    }
}

impl From<crate::config::ConfigError> for StartError {
    fn from(error: crate::config::ConfigError) -> StartError {
        StartError::Config(error.0)
    }
}

impl From<sqlx::Error> for StartError {
    fn from(error: sqlx::Error) -> StartError {
        StartError::Database(error.to_string())
    }
}

/// `Result` of starting or running a role.
pub type StartResult<T> = Result<T, StartError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_names_what_to_fix() {
        let taken = StartError::Listen {
            addr: "127.0.0.1:8090".into(),
            error: io::Error::from(io::ErrorKind::AddrInUse),
        };
        // The message carries the cause; nothing repeats it as a source.
        assert!(std::error::Error::source(&taken).is_none());
        assert!(
            taken
                .to_string()
                .starts_with("cannot listen on 127.0.0.1:8090: ")
        );
        let bad = StartError::Config("keeper: no address".into());
        assert_eq!(bad.to_string(), "invalid configuration: keeper: no address");
        let sql: StartError = sqlx::Error::PoolTimedOut.into();
        assert!(matches!(sql, StartError::Database(_)));
    }
}
