//! [`ConfigError`]: why the configuration could not be loaded. The
//! messages name the file or variable and what is allowed; tests assert them.

use std::path::PathBuf;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys or wrongly typed values.
    #[error("invalid configuration file {}: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said (with line and column).
        message: String,
    },
    /// A value is not allowed.
    #[error("{origin}: invalid {key} {value:?}: expected {expected}")]
    Invalid {
        /// Where the value came from: `<file> (key)` or an environment variable.
        origin: String,
        /// The setting.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// Values that are fine alone but not together.
    #[error("inconsistent configuration: {0}")]
    Inconsistent(String),
}
