//! The crate's error type.
//!
//! Only start-up and configuration problems cross the library API: a failing
//! client or origin connection is logged and counted by the thread that owns
//! it, never returned to the embedder.

use std::{fmt, io, net::SocketAddr};

/// A `Result` whose error defaults to [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a gateway could not be configured or started.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or malformed.
    Config(String),
    /// The listening socket could not be bound.
    Bind {
        /// The address that was asked for.
        addr: SocketAddr,
        /// What the operating system said.
        source: io::Error,
    },
    /// A thread, poll instance or other start-up resource could not be created.
    Io {
        /// What was being set up.
        what: &'static str,
        /// What the operating system said.
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io { what, source }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg) => write!(f, "invalid configuration: {msg}"),
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Io { what, source } => write!(f, "cannot {what}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Config(_) => None,
            Error::Bind { source, .. } | Error::Io { source, .. } => Some(source),
        }
    }
}
