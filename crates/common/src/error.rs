//! Why a role could not start, or stopped serving: the error of every role
//! library's `Listeners::bind` and `run`, shared because every role starts
//! the same way (bind, read its credentials, open its store, join keeper,
//! serve). The binaries print it and exit non-zero; the message says what to
//! fix.

use std::io;

use crate::auth::CredentialError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener's address is taken, not local, or not an address.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: io::Error },
    /// A setting is missing or wrong; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The role's key or the verifiers cannot be read.
    #[error("credentials: {0}")]
    Credentials(#[from] CredentialError),
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
    Grpc(#[from] tonic::transport::Error),
    /// An operating-system failure, with what was being done.
    #[error("{context}: {source}")]
    Os { context: String, source: io::Error },
    /// Any other operating-system failure (a bound listener's address).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A task the role cannot serve without ended abnormally.
    #[error("{0} ended abnormally")]
    Stopped(String),
}

impl StartError {
    /// Wraps an OS error with what was being done: `.map_err(StartError::os("..."))`.
    pub fn os(context: impl Into<String>) -> impl FnOnce(io::Error) -> StartError {
        let context = context.into();
        move |source| StartError::Os { context, source }
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
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
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
