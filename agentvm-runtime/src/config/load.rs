//! Where the configuration comes from: finding the workspace root and its
//! `.config/agentvm.toml`, reading the environment, and layering defaults →
//! file → environment ([`AgentVmConfig::from_sources`], pure) before
//! validating.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::env::ENV_VARS;
use super::error::ConfigError;
use super::settings::AgentVmConfig;

/// Path of the configuration file relative to the workspace root.
pub const CONFIG_FILE: &str = ".config/agentvm.toml";

impl AgentVmConfig {
    /// Loads the configuration of the current process: finds the workspace
    /// root (see the module docs), reads `.config/agentvm.toml` if it exists
    /// and applies the environment variables.
    pub fn load() -> Result<Self, ConfigError> {
        let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        let start = std::env::var_os("CARGO_MANIFEST_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(|| cwd.clone());
        let root = find_workspace_root(&start).unwrap_or(start);
        let path = root.join(CONFIG_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(ConfigError::Read { path, source }),
        };
        let env: HashMap<String, String> = ENV_VARS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        let file = text.as_deref().map(|t| (path.as_path(), t));
        Self::from_sources(&root, file, &env, &cwd)
    }

    /// Builds the configuration from the defaults, the file's text (`(path,
    /// text)`, when there is a file) and environment variables. Relative
    /// directories in the file are resolved against `workspace_root`, those in
    /// environment variables against `cwd`. Pure: touches no file.
    pub fn from_sources(
        workspace_root: &Path,
        file: Option<(&Path, &str)>,
        env: &HashMap<String, String>,
        cwd: &Path,
    ) -> Result<Self, ConfigError> {
        let mut config = Self::defaults_for(workspace_root);
        if let Some((path, text)) = file {
            config.apply_file(path, text)?;
        }
        config.apply_env(env, cwd)?;
        config.validate()?;
        Ok(config)
    }
}

/// The workspace root above `start`: the first directory (`start` itself
/// included) holding a `Cargo.lock` or a `Cargo.toml` with a `[workspace]`
/// table.
pub fn find_workspace_root(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|dir| {
        if dir.join("Cargo.lock").is_file() {
            return Some(dir.to_path_buf());
        }
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
        manifest
            .lines()
            .any(|line| line.trim() == "[workspace]")
            .then(|| dir.to_path_buf())
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::testing::load;
    use crate::config::DEFAULT_PROCESS_LIMIT;
    use crate::spec::NetworkMode;

    #[test]
    fn process_limit() {
        assert_eq!(
            load(None, &[]).unwrap().process_limit,
            DEFAULT_PROCESS_LIMIT
        );
        assert_eq!(
            load(Some("process_limit = 64\n"), &[])
                .unwrap()
                .process_limit,
            64
        );
        let c = load(
            Some("process_limit = 64\n"),
            &[("AGENT_VM_PROCESS_LIMIT", "9")],
        )
        .unwrap();
        assert_eq!(c.process_limit, 9);
        let e = load(Some("process_limit = 0\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("process_limit") && e.contains("1 or more"),
            "{e}"
        );
    }

    #[test]
    fn golden_cache_switch() {
        assert!(load(None, &[]).unwrap().golden_cache);
        assert!(
            !load(Some("golden_cache = false\n"), &[])
                .unwrap()
                .golden_cache
        );
        for (value, on) in [
            ("0", false),
            ("off", false),
            ("No", false),
            ("1", true),
            ("true", true),
        ] {
            let c = load(
                Some("golden_cache = false\n"),
                &[("AGENT_VM_GOLDEN_CACHE", value)],
            )
            .unwrap();
            assert_eq!(c.golden_cache, on, "{value}");
        }
        let e = load(None, &[("AGENT_VM_GOLDEN_CACHE", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AGENT_VM_GOLDEN_CACHE") && e.contains("true or false"),
            "{e}"
        );
        let e = load(Some("golden_cache = \"yes\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("golden_cache"), "{e}");
    }

    #[test]
    fn audit_log_and_fail_on() {
        let c = load(None, &[]).unwrap();
        assert_eq!(
            c.audit_log_path(),
            PathBuf::from("/ws/target/agentvm/audit.jsonl")
        );
        assert!(c.fail_on.is_empty());
        let c = load(
            Some("audit_log = \"logs/a.jsonl\"\nfail_on = [\"timeout\", \"output_cap\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.audit_log_path(), PathBuf::from("/ws/logs/a.jsonl"));
        assert_eq!(c.fail_on, ["timeout", "output_cap"]);
        let c = load(
            None,
            &[
                ("AGENT_VM_AUDIT_LOG", "/tmp/x.jsonl"),
                ("AGENT_VM_FAIL_ON", "memory_limit, timeout,"),
                ("AGENT_VM_ARTIFACTS_DIR", "/elsewhere"),
            ],
        )
        .unwrap();
        assert_eq!(c.audit_log_path(), PathBuf::from("/tmp/x.jsonl"));
        assert_eq!(c.fail_on, ["memory_limit", "timeout"]);
        let c = load(None, &[("AGENT_VM_ARTIFACTS_DIR", "/elsewhere")]).unwrap();
        assert_eq!(c.audit_log_path(), PathBuf::from("/elsewhere/audit.jsonl"));
        let e = load(None, &[("AGENT_VM_FAIL_ON", "timeout,bogus")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("AGENT_VM_FAIL_ON") && e.contains("output_cap"),
            "{e}"
        );
    }

    #[test]
    fn allowlist_entries() {
        let c = load(
            Some("network = \"allowlist\"\nallow = [\"api.example.com:443\", \"*.example.org\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.network, NetworkMode::Allowlist);
        assert_eq!(c.allow, ["api.example.com:443", "*.example.org"]);
        let c = load(None, &[("AGENT_VM_ALLOW", "a.example:80, b.example")]).unwrap();
        assert_eq!(c.allow, ["a.example:80", "b.example"]);
        for bad in [
            "a.example:http",
            "a example",
            "user@a.example",
            "http://a.example",
            ":443",
        ] {
            let e = load(Some(&format!("allow = [{bad:?}]\n")), &[]).unwrap_err();
            assert!(e.to_string().contains("allow"), "{bad}: {e}");
        }
    }

    #[test]
    fn workspace_root_is_found_from_a_member() {
        let dir = std::env::temp_dir().join(format!("agentvm-config-test-{}", std::process::id()));
        let member = dir.join("crates/a/src");
        std::fs::create_dir_all(&member).unwrap();
        std::fs::write(
            dir.join("Cargo.toml"),
            "[workspace]\nmembers = [\"crates/a\"]\n",
        )
        .unwrap();
        std::fs::write(dir.join("crates/a/Cargo.toml"), "[package]\nname = \"a\"\n").unwrap();
        assert_eq!(find_workspace_root(&member), Some(dir.clone()));
        std::fs::write(dir.join("crates/a/Cargo.lock"), "").unwrap();
        assert_eq!(find_workspace_root(&member), Some(dir.join("crates/a")));
        std::fs::remove_dir_all(&dir).unwrap();
        // This crate is in a workspace with a Cargo.lock.
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = find_workspace_root(here).unwrap();
        assert!(root.join("Cargo.lock").is_file() && here.starts_with(&root));
    }
}
