//! Where the builder takes its own inputs from: the agentvm source tree.
//!
//! An image holds the guest agent, built from the `agentvm-guest` crate, and
//! the init script `images/init`; the `agent` image also takes its recipes
//! from `images/recipes/`. None of these is compiled into this library: they
//! are read from an agentvm checkout. By default that is the checkout this
//! library was compiled from (`env!("CARGO_MANIFEST_DIR")/..`), which is
//! right for `cargo xtask` and for a CLI installed with
//! `cargo install --path agentvm-cli` (keep the checkout). `--source DIR` or
//! the environment variable [`SOURCE_DIR_ENV`] points elsewhere; `--guest-bin`
//! and `--init` replace single inputs.

use std::path::{Path, PathBuf};

use crate::Error;

/// Environment variable naming the agentvm source tree (`--source`).
pub const SOURCE_DIR_ENV: &str = "AGENTVM_SOURCE_DIR";
/// The guest agent's crate directory, relative to the source tree.
pub const GUEST_CRATE: &str = "agentvm-guest";
/// The init script, relative to the source tree.
pub const INIT_SCRIPT: &str = "images/init";
/// The recipes directory, relative to the source tree.
pub const RECIPES_DIR: &str = "images/recipes";

/// The checkout this library was compiled from.
pub fn compiled_in() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// An agentvm source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceTree {
    root: PathBuf,
}

impl SourceTree {
    /// `explicit` if given, else [`compiled_in`]. (The CLI's `--source`
    /// flag also reads [`SOURCE_DIR_ENV`]; see `BuildImageArgs::source`.)
    pub fn new(explicit: Option<&Path>) -> Self {
        Self {
            root: explicit.map_or_else(compiled_in, Path::to_path_buf),
        }
    }

    /// The tree's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The `agentvm-guest` crate, checked to be there.
    pub fn guest_crate(&self) -> Result<PathBuf, Error> {
        self.require(
            GUEST_CRATE,
            "Cargo.toml",
            "--guest-bin PATH (a static agentvm-guest binary)",
        )
    }

    /// The init script, checked to be there.
    pub fn init_script(&self) -> Result<PathBuf, Error> {
        let path = self.root.join(INIT_SCRIPT);
        if path.is_file() {
            Ok(path)
        } else {
            Err(self.missing(INIT_SCRIPT, "--init PATH"))
        }
    }

    /// The recipes directory, checked to be there.
    pub fn recipes_dir(&self) -> Result<PathBuf, Error> {
        self.require(
            RECIPES_DIR,
            ".",
            "nothing else: recipes only come from a source tree",
        )
    }

    fn require(
        &self,
        rel: &'static str,
        inside: &str,
        instead: &'static str,
    ) -> Result<PathBuf, Error> {
        let dir = self.root.join(rel);
        if dir.join(inside).exists() {
            Ok(dir)
        } else {
            Err(self.missing(rel, instead))
        }
    }

    fn missing(&self, rel: &'static str, instead: &'static str) -> Error {
        Error::SourceNotFound {
            path: self.root.join(rel),
            instead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_in_tree_has_every_input() {
        let tree = SourceTree::new(None);
        assert_eq!(tree.root(), compiled_in());
        assert!(tree.guest_crate().unwrap().ends_with("agentvm-guest"));
        assert!(tree.init_script().unwrap().ends_with("images/init"));
        assert!(tree.recipes_dir().unwrap().ends_with("images/recipes"));
    }

    #[test]
    fn a_tree_without_the_guest_crate_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let tree = SourceTree::new(Some(dir.path()));
        let e = tree.guest_crate().unwrap_err().to_string();
        assert!(
            e.contains(&dir.path().join("agentvm-guest").display().to_string()),
            "{e}"
        );
        assert!(e.contains(SOURCE_DIR_ENV) && e.contains("--source"), "{e}");
        assert!(e.contains("cargo install --path"), "{e}");
        assert!(e.contains("--guest-bin"), "{e}");
        let e = tree.init_script().unwrap_err().to_string();
        assert!(e.contains("images/init") && e.contains("--init"), "{e}");
    }
}
