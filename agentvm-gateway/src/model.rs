//! Choosing how the gateway answers: [`Model`] and the `AGENTVM_MODEL` / `CI` environment.

use std::path::PathBuf;

use crate::error::SetupError;
use crate::record::Upstream;
use crate::script::Turn;

/// How the model answers.
#[derive(Debug, Clone)]
pub enum Model {
    /// The test's turns, mapped onto the agent's tools.
    Scripted(Vec<Turn>),
    /// Answers from a cassette file.
    Replay(PathBuf),
    /// Pass-through to the vendor with the host's key, writing the cassette.
    Record {
        /// The cassette written (truncated first).
        cassette: PathBuf,
        /// Where to forward and with which keys.
        upstream: Upstream,
    },
}

impl Model {
    /// Scripted turns.
    pub fn scripted(turns: impl IntoIterator<Item = Turn>) -> Self {
        Self::Scripted(turns.into_iter().collect())
    }

    /// Replay of `cassette`.
    pub fn replay(cassette: impl Into<PathBuf>) -> Self {
        Self::Replay(cassette.into())
    }

    /// Recording into `cassette` through `upstream`.
    pub fn record(cassette: impl Into<PathBuf>, upstream: Upstream) -> Self {
        Self::Record {
            cassette: cassette.into(),
            upstream,
        }
    }

    /// The model `mode` selects, for a test that has a cassette (and optionally a script).
    /// Record mode takes its upstream from [`Upstream::from_env`].
    pub fn for_mode(
        mode: ModelMode,
        cassette: impl Into<PathBuf>,
        script: Option<Vec<Turn>>,
    ) -> Result<Self, SetupError> {
        Ok(match mode {
            ModelMode::Scripted => Self::Scripted(script.ok_or(SetupError::NoScript)?),
            ModelMode::Replay => Self::Replay(cassette.into()),
            ModelMode::Record => Self::record(cassette, Upstream::from_env()),
        })
    }
}

/// The mode selected by the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelMode {
    /// `AGENTVM_MODEL=scripted`.
    Scripted,
    /// `AGENTVM_MODEL=replay` — the default, and always when `CI` is set.
    Replay,
    /// `AGENTVM_MODEL=record` (never in CI).
    Record,
}

impl ModelMode {
    /// The mode from the process environment (see [`ModelMode::from_lookup`]).
    pub fn from_env() -> Result<Self, SetupError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The mode from `AGENTVM_MODEL` (`scripted`, `replay` or `record`; unset or empty means
    /// replay), read through `lookup`. When `CI` is set to anything but empty, `0` or `false`,
    /// the answer is always [`ModelMode::Replay`]: CI never records and never runs a test's
    /// script in place of its cassette. An unknown value is an error even in CI.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SetupError> {
        let requested = match lookup("AGENTVM_MODEL").as_deref().map(str::trim) {
            None | Some("") | Some("replay") => Self::Replay,
            Some("scripted") => Self::Scripted,
            Some("record") => Self::Record,
            Some(other) => return Err(SetupError::UnknownMode(other.to_owned())),
        };
        let ci = lookup("CI").is_some_and(|v| !matches!(v.trim(), "" | "0" | "false"));
        Ok(if ci { Self::Replay } else { requested })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn reads_agentvm_model() {
        assert_eq!(ModelMode::from_lookup(env(&[])).unwrap(), ModelMode::Replay);
        assert_eq!(
            ModelMode::from_lookup(env(&[("AGENTVM_MODEL", "record")])).unwrap(),
            ModelMode::Record
        );
        assert_eq!(
            ModelMode::from_lookup(env(&[("AGENTVM_MODEL", "scripted")])).unwrap(),
            ModelMode::Scripted
        );
        assert_eq!(
            ModelMode::from_lookup(env(&[("AGENTVM_MODEL", "replay"), ("CI", "0")])).unwrap(),
            ModelMode::Replay
        );
        let err = ModelMode::from_lookup(env(&[("AGENTVM_MODEL", "live")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "AGENTVM_MODEL=\"live\" is not a mode; use scripted, replay or record"
        );
    }

    #[test]
    fn ci_forces_replay() {
        for mode in ["record", "scripted", "replay", ""] {
            let got =
                ModelMode::from_lookup(env(&[("AGENTVM_MODEL", mode), ("CI", "true")])).unwrap();
            assert_eq!(got, ModelMode::Replay, "AGENTVM_MODEL={mode}");
        }
        let got =
            ModelMode::from_lookup(env(&[("AGENTVM_MODEL", "record"), ("CI", "false")])).unwrap();
        assert_eq!(got, ModelMode::Record);
    }

    #[test]
    fn scripted_mode_needs_a_script() {
        assert!(matches!(
            Model::for_mode(ModelMode::Scripted, "c.jsonl", None),
            Err(SetupError::NoScript)
        ));
        assert!(matches!(
            Model::for_mode(ModelMode::Replay, "c.jsonl", None),
            Ok(Model::Replay(_))
        ));
    }
}
