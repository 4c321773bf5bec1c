#![doc = include_str!("docs.md")]
//!
//! # Layout
//!
//! One concern per file, none of which knows a backend: `settings` (the
//! typed [`AgentVmConfig`] and its defaults), `load` (finding and layering
//! the sources), `file` (the TOML format), `env` (the variables), `values`
//! (parsers of single values), `validate` (checks across settings) and
//! `error`. Each backend builds itself from the settings it reads
//! ([`crate::backend::FromConfig`]); [`create_backend`] only dispatches on
//! [`BackendKind`].

mod env;
mod error;
mod file;
mod load;
mod settings;
mod validate;
mod values;

#[cfg(test)]
mod testing;

pub use env::ENV_VARS;
pub use error::ConfigError;
pub use load::{find_workspace_root, CONFIG_FILE};
pub use settings::{
    AgentVmConfig, BackendKind, ANOMALY_KINDS, DEFAULT_HEALTH_INTERVAL, DEFAULT_PROCESS_LIMIT,
};
pub use values::{is_valid_image_name, parse_accel, parse_backend, parse_duration, parse_network};

/// Creates the backend the configuration names. Re-exported from
/// [`crate::backend::create_backend`], where it lives, so that callers of
/// `config::create_backend` keep working.
pub use crate::backend::create_backend;
