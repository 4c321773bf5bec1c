//! Errors: what the gateway records for the test to fail on, and what stops it from starting.

use std::path::PathBuf;

use crate::api::Api;
use crate::script::TurnError;

/// Something that went wrong while serving the agent. The agent got an error response; the
/// test retrieves these with [`crate::Gateway::take_errors`] and should fail on them.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GatewayError {
    /// Scripted mode: the agent asked for more turns than the script has.
    #[error("request {request} ({api}) asked for turn {turn}, but the script has only {turns} turns; add turns to Model::scripted or check why the agent kept going")]
    ScriptExhausted {
        /// Gateway request number (1-based).
        request: u64,
        /// The API.
        api: Api,
        /// The turn it would have consumed (1-based).
        turn: usize,
        /// Number of scripted turns.
        turns: usize,
    },
    /// Scripted mode: the turn cannot be expressed with the agent's tools.
    #[error("request {request} ({api}): {source}")]
    Turn {
        /// Gateway request number (1-based).
        request: u64,
        /// The API.
        api: Api,
        /// Why.
        source: TurnError,
    },
    /// Replay mode: the request matches no (remaining) recorded interaction.
    #[error("request {request} ({target}) {reason} in cassette {cassette}; re-record with AGENTVM_MODEL=record if the change is intended\n{diff}", cassette = cassette.display())]
    Mismatch {
        /// Gateway request number (1-based).
        request: u64,
        /// Method, path and query, e.g. `POST /v1/messages?beta=true`.
        target: String,
        /// The cassette file.
        cassette: PathBuf,
        /// What did not match, e.g. `matches no recorded request; nearest is line 3`.
        reason: String,
        /// Unified diff of the nearest recorded request (`-`) against this one (`+`),
        /// both normalised.
        diff: String,
    },
    /// Record mode: the upstream could not be reached or answered unreadably.
    #[error("request {request}: upstream {url}: {message}")]
    Upstream {
        /// Gateway request number (1-based).
        request: u64,
        /// The upstream URL.
        url: String,
        /// What happened.
        message: String,
    },
    /// Record mode: no API key on the host.
    #[error(
        "record mode needs {var} in the host environment (the guest only ever sees a fake key)"
    )]
    MissingKey {
        /// The environment variable to set.
        var: &'static str,
    },
    /// Record mode: the cassette could not be written.
    #[error("cannot write cassette {path}: {message}", path = path.display())]
    CassetteWrite {
        /// The cassette file.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The agent sent a request the gateway cannot read (bad JSON, too large, unknown path).
    #[error("bad request {method} {path}: {message}")]
    BadRequest {
        /// HTTP method.
        method: String,
        /// Path and query.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// A connection broke at the HTTP level (garbage bytes, truncated request).
    #[error("connection error: {message}")]
    Connection {
        /// hyper's description.
        message: String,
    },
}

/// A cassette that cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CassetteError {
    /// The file cannot be read.
    #[error("cannot read cassette {path}: {source}; record it with AGENTVM_MODEL=record", path = path.display())]
    Io {
        /// The cassette file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line is not a valid interaction.
    #[error("cassette {path} line {line}: {message}; fix the line or re-record the cassette", path = path.display())]
    Line {
        /// The cassette file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Why a [`crate::Gateway`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Replay: the cassette does not load.
    #[error(transparent)]
    Cassette(#[from] CassetteError),
    /// Record: the cassette file cannot be created.
    #[error("cannot create cassette {path}: {source}", path = path.display())]
    CreateCassette {
        /// The cassette file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Record: the TLS client cannot be built.
    #[error("cannot set up TLS for the upstream (native root certificates): {0}")]
    Tls(std::io::Error),
    /// The `AGENTVM_MODEL` value is not a mode.
    #[error("AGENTVM_MODEL={0:?} is not a mode; use scripted, replay or record")]
    UnknownMode(String),
    /// Scripted mode was selected but no script given.
    #[error("AGENTVM_MODEL=scripted but this test gives no scripted turns; use replay or record")]
    NoScript,
}
