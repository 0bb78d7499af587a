//! The one error type of the tool: every failure ends the run with a one-line cause.

use std::fmt;

/// Why a run stopped.
#[derive(Debug)]
pub enum BenchError {
    /// A parameter is malformed or out of its bounds (nothing was started).
    Invalid(String),
    /// Connecting, reading, writing or a system call failed.
    Io(String),
    /// A wait ran past its deadline.
    Timeout(String),
    /// A peer broke the protocol: an unexpected frame, wrong bytes, an early close.
    Protocol(String),
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, BenchError>;

impl fmt::Display for BenchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BenchError::Invalid(m) => write!(f, "invalid argument: {m}"),
            BenchError::Io(m) => write!(f, "i/o error: {m}"),
            BenchError::Timeout(m) => write!(f, "timed out: {m}"),
            BenchError::Protocol(m) => write!(f, "protocol error: {m}"),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<std::io::Error> for BenchError {
    fn from(e: std::io::Error) -> Self {
        BenchError::Io(e.to_string())
    }
}

impl From<tokio_tungstenite::tungstenite::Error> for BenchError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        BenchError::Io(format!("websocket: {e}"))
    }
}
