//! Agent recipes: `images/recipes/<name>.toml`, one agent CLI each, pinned.
//!
//! ```toml
//! name = "claude-code"
//! description = "Anthropic's Claude Code CLI (native binary)"
//!
//! [npm]                                   # or [pip]
//! package = "@anthropic-ai/claude-code"
//! version = "2.1.197"
//! # Paths under the npm install prefix copied to /opt/agents/<name>/
//! # (default: the whole node_modules tree).
//! copy = ["node_modules/@anthropic-ai/claude-code-linux-x64/claude"]
//!
//! [bin]                                   # /usr/local/bin/<key> -> /opt/agents/<name>/<value>
//! claude = "node_modules/@anthropic-ai/claude-code-linux-x64/claude"
//! ```
//!
//! npm packages are installed on the host with the host's `npm` (no node
//! needed in the image when only native binaries are copied); pip packages
//! are installed inside the new root, into a venv at `/opt/agents/<name>/venv`
//! made with the image's own python3. The manifest records every installed
//! package with its version and integrity hash (npm's lockfile `integrity`,
//! pip's `--report` archive hashes).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::util::{require_tool, run_captured, sha256_hex};

/// Where agents go in the image.
pub const AGENTS_DIR: &str = "/opt/agents";
/// The host's CA bundle, copied into the new root while pip runs (the
/// registries may sit behind a proxy only the host's bundle trusts).
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Variables that point TLS clients at a CA bundle. The host's may name its
/// own bundle by a path that inside the new root is Debian's stock bundle
/// (requests prefers `REQUESTS_CA_BUNDLE` over pip's `--cert`), so all of
/// them are pointed at the copied host bundle while pip runs.
const CA_ENV: &[&str] = &[
    "PIP_CERT",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
];

/// A parsed recipe file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Agent name (also the `--with` name and the directory under /opt/agents).
    pub name: String,
    /// One line about it.
    #[serde(default)]
    pub description: String,
    /// Installed from the npm registry.
    #[serde(default)]
    pub npm: Option<NpmSource>,
    /// Installed from PyPI.
    #[serde(default)]
    pub pip: Option<PipSource>,
    /// Commands put on PATH: name → path under /opt/agents/<name>/.
    #[serde(default)]
    pub bin: BTreeMap<String, String>,
    /// SHA-256 of the recipe file (filled in by [`load`]).
    #[serde(skip)]
    pub sha256: String,
}

/// `[npm]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NpmSource {
    /// Package name.
    pub package: String,
    /// Exact version.
    pub version: String,
    /// Paths under the install prefix to copy (default `node_modules`).
    #[serde(default)]
    pub copy: Vec<String>,
}

/// `[pip]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipSource {
    /// Package name.
    pub package: String,
    /// Exact version.
    pub version: String,
}

/// One installed package of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Integrity hash (`sha512-…` from npm, `sha256=…` from pip).
    pub integrity: String,
}

/// What the manifest says about an installed recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Recipe name.
    pub name: String,
    /// `npm:<package>@<version>` or `pip:<package>==<version>`.
    pub source: String,
    /// SHA-256 of the recipe file.
    pub recipe_sha256: String,
    /// Commands on PATH (`/usr/local/bin/<name>`).
    pub bin: Vec<String>,
    /// Every installed package.
    pub packages: Vec<Package>,
}

impl Recipe {
    /// Parses and checks a recipe's text.
    pub fn parse(text: &str) -> Result<Self> {
        let mut r: Recipe = toml::from_str(text).context("invalid recipe")?;
        r.sha256 = sha256_hex(text.as_bytes());
        r.check()?;
        Ok(r)
    }

    fn check(&self) -> Result<()> {
        let plain = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@/=".contains(c))
        };
        if !plain(&self.name) || self.name.contains('/') {
            bail!(
                "recipe name {:?}: use letters, digits, '-', '_', '.'",
                self.name
            );
        }
        match (&self.npm, &self.pip) {
            (Some(_), Some(_)) | (None, None) => {
                bail!("recipe {}: give exactly one of [npm] or [pip]", self.name)
            }
            (Some(n), None) => {
                if !plain(&n.package) || !plain(&n.version) {
                    bail!("recipe {}: bad npm package or version", self.name);
                }
                if n.version.starts_with(['^', '~', '>', '<']) || n.version == "latest" {
                    bail!("recipe {}: pin an exact npm version", self.name);
                }
            }
            (None, Some(p)) => {
                if !plain(&p.package) || !plain(&p.version) || p.version.contains('=') {
                    bail!("recipe {}: bad pip package or exact version", self.name);
                }
            }
        }
        let paths = self
            .bin
            .values()
            .chain(self.npm.iter().flat_map(|n| &n.copy));
        for p in paths {
            if p.starts_with('/') || p.split('/').any(|c| c == ".." || c.is_empty()) || !plain(p) {
                bail!(
                    "recipe {}: path {p:?} must be relative, plain and inside",
                    self.name
                );
            }
        }
        for b in self.bin.keys() {
            if !plain(b) || b.contains('/') {
                bail!("recipe {}: bad command name {b:?}", self.name);
            }
        }
        Ok(())
    }

    /// `npm:pkg@ver` / `pip:pkg==ver`.
    pub fn source_label(&self) -> String {
        match (&self.npm, &self.pip) {
            (Some(n), _) => format!("npm:{}@{}", n.package, n.version),
            (_, Some(p)) => format!("pip:{}=={}", p.package, p.version),
            _ => String::new(),
        }
    }

    /// The agent's directory in the image.
    pub fn dir(&self) -> String {
        format!("{AGENTS_DIR}/{}", self.name)
    }

    /// mmdebstrap hooks that put the commands on PATH.
    pub fn bin_hooks(&self) -> Vec<String> {
        self.bin
            .iter()
            .map(|(cmd, path)| {
                format!(
                    "mkdir -p \"$1/usr/local/bin\" && ln -sf {}/{path} \"$1/usr/local/bin/{cmd}\"",
                    self.dir()
                )
            })
            .collect()
    }

    /// mmdebstrap hooks of a pip recipe: a venv with the image's python3,
    /// pip with the host's CA bundle, and a `--report` for the hashes.
    pub fn pip_hooks(&self, p: &PipSource) -> Vec<String> {
        let dir = self.dir();
        vec![
            format!("cp {HOST_CA_BUNDLE} \"$1/tmp/agentvm-host-ca.crt\""),
            format!(
                "chroot \"$1\" env -u PIP_FIND_LINKS {ca} PIP_DISABLE_PIP_VERSION_CHECK=1 \
                 sh -ec 'python3 -m venv {dir}/venv && \
                 {dir}/venv/bin/pip install --no-cache-dir --quiet --report {dir}/pip-report.json \
                 {}=={}'",
                p.package,
                p.version,
                ca = CA_ENV
                    .iter()
                    .map(|v| format!("{v}=/tmp/agentvm-host-ca.crt"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            "rm -f \"$1/tmp/agentvm-host-ca.crt\"".to_string(),
        ]
    }
}

/// Loads `images/recipes/<name>.toml` for each name.
pub fn load(recipes_dir: &Path, names: &[String]) -> Result<Vec<Recipe>> {
    let mut out: Vec<Recipe> = Vec::new();
    for name in names {
        let path = recipes_dir.join(format!("{name}.toml"));
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "no recipe {name:?}: {} not readable (available: {})",
                path.display(),
                available(recipes_dir).join(", ")
            )
        })?;
        let r = Recipe::parse(&text).with_context(|| format!("recipe {}", path.display()))?;
        if r.name != *name {
            bail!(
                "{}: name = {:?} must match the file name",
                path.display(),
                r.name
            );
        }
        if !out.iter().any(|o| o.name == r.name) {
            out.push(r);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Recipe names in `dir`.
pub fn available(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            (p.extension()? == "toml").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    v.sort();
    v
}

/// A recipe made ready for mmdebstrap.
pub struct Staged {
    /// `--customize-hook`s.
    pub hooks: Vec<String>,
    /// What goes into the manifest (pip hashes are filled in by [`finish`]).
    pub installed: Installed,
}

/// Fetches what can be fetched on the host (npm) into `work` and returns the
/// hooks that put the agent into the new root.
pub fn stage(r: &Recipe, work: &Path, progress: &Progress<'_>) -> Result<Staged> {
    let mut installed = Installed {
        name: r.name.clone(),
        source: r.source_label(),
        recipe_sha256: r.sha256.clone(),
        bin: r.bin.keys().cloned().collect(),
        packages: Vec::new(),
    };
    let mut hooks = Vec::new();
    if let Some(n) = &r.npm {
        require_tool(
            "npm",
            "install Node.js and npm on the host (`apt-get install npm`)",
        )?;
        let prefix = work.join(format!("npm-{}", r.name));
        fs::create_dir_all(&prefix)?;
        let out = run_captured(Command::new("npm").args(npm_install_args(&prefix, n)))?;
        let _ = out;
        let lock = fs::read_to_string(prefix.join("package-lock.json"))
            .context("npm wrote no package-lock.json")?;
        installed.packages = npm_lock_packages(&lock, &prefix)?;
        progress.note(format!(
            "{} npm packages installed on the host",
            installed.packages.len()
        ));
        let copy = if n.copy.is_empty() {
            vec!["node_modules".to_string()]
        } else {
            n.copy.clone()
        };
        for c in &copy {
            if !prefix.join(c).exists() {
                bail!(
                    "recipe {}: {c} is not in the npm install ({}): fix `copy`",
                    r.name,
                    prefix.display()
                );
            }
        }
        hooks.push(format!(
            "mkdir -p \"$1{dir}\" && cd {prefix} && cp -a --parents {paths} \"$1{dir}/\"",
            dir = r.dir(),
            prefix = prefix.display(),
            paths = copy.join(" ")
        ));
    }
    if let Some(p) = &r.pip {
        hooks.extend(r.pip_hooks(p));
    }
    hooks.extend(r.bin_hooks());
    Ok(Staged { hooks, installed })
}

/// After mmdebstrap: read pip's report from the tree.
pub fn finish(installed: &mut Installed, tree: &Path) -> Result<()> {
    if !installed.source.starts_with("pip:") {
        return Ok(());
    }
    let report: PathBuf = tree
        .join(AGENTS_DIR.trim_start_matches('/'))
        .join(&installed.name)
        .join("pip-report.json");
    let text = fs::read_to_string(&report).with_context(|| format!("read {}", report.display()))?;
    installed.packages = pip_report_packages(&text)?;
    Ok(())
}

/// `npm install` arguments: exact version, no audit/fund noise, lockfile kept.
pub fn npm_install_args(prefix: &Path, n: &NpmSource) -> Vec<String> {
    vec![
        "install".into(),
        "--prefix".into(),
        prefix.display().to_string(),
        "--no-audit".into(),
        "--no-fund".into(),
        "--save-exact".into(),
        format!("{}@{}", n.package, n.version),
    ]
}

/// Packages of an npm v2/v3 lockfile that are actually installed under
/// `prefix` (optional dependencies of other platforms are listed but absent).
pub fn npm_lock_packages(lock: &str, prefix: &Path) -> Result<Vec<Package>> {
    #[derive(Deserialize)]
    struct Lock {
        packages: BTreeMap<String, Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        version: Option<String>,
        integrity: Option<String>,
    }
    let lock: Lock = serde_json::from_str(lock).context("parse package-lock.json")?;
    Ok(lock
        .packages
        .into_iter()
        .filter(|(path, _)| !path.is_empty() && prefix.join(path).exists())
        .filter_map(|(path, e)| {
            let name = path
                .rsplit_once("node_modules/")
                .map_or(path.as_str(), |(_, n)| n);
            Some(Package {
                name: name.to_string(),
                version: e.version?,
                integrity: e.integrity.unwrap_or_default(),
            })
        })
        .collect())
}

/// Packages of a `pip install --report` JSON.
pub fn pip_report_packages(report: &str) -> Result<Vec<Package>> {
    let v: serde_json::Value = serde_json::from_str(report).context("parse pip report")?;
    let mut out: Vec<Package> = v["install"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let meta = &i["metadata"];
            let hashes = &i["download_info"]["archive_info"]["hashes"];
            let integrity = hashes
                .as_object()
                .and_then(|h| h.iter().next())
                .map(|(alg, v)| format!("{alg}={}", v.as_str().unwrap_or("")))
                .or_else(|| {
                    i["download_info"]["archive_info"]["hash"]
                        .as_str()
                        .map(String::from)
                })
                .unwrap_or_default();
            Some(Package {
                name: meta["name"].as_str()?.to_string(),
                version: meta["version"].as_str()?.to_string(),
                integrity,
            })
        })
        .collect();
    out.sort_by_key(|p| p.name.to_lowercase());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLAUDE: &str = r#"
name = "claude-code"
[npm]
package = "@anthropic-ai/claude-code"
version = "2.1.197"
copy = ["node_modules/@anthropic-ai/claude-code-linux-x64"]
[bin]
claude = "node_modules/@anthropic-ai/claude-code-linux-x64/claude"
"#;

    #[test]
    fn parses_npm_recipe() {
        let r = Recipe::parse(CLAUDE).unwrap();
        assert_eq!(r.source_label(), "npm:@anthropic-ai/claude-code@2.1.197");
        assert_eq!(r.sha256.len(), 64);
        assert_eq!(
            r.bin_hooks(),
            ["mkdir -p \"$1/usr/local/bin\" && ln -sf /opt/agents/claude-code/node_modules/@anthropic-ai/claude-code-linux-x64/claude \"$1/usr/local/bin/claude\""]
        );
        let args = npm_install_args(Path::new("/w/p"), r.npm.as_ref().unwrap());
        assert_eq!(args.last().unwrap(), "@anthropic-ai/claude-code@2.1.197");
    }

    #[test]
    fn rejects_bad_recipes() {
        for bad in [
            CLAUDE.replace("2.1.197", "^2.1.0"),
            CLAUDE.replace("2.1.197", "latest"),
            CLAUDE.replace("claude = \"node", "claude = \"../node"),
            CLAUDE.replace("name = \"claude-code\"", "name = \"a/b\""),
            CLAUDE.replace("[bin]", "[pip]\npackage = \"x\"\nversion = \"1\"\n[bin]"),
            CLAUDE.replace("[npm]", "[npmx]"),
            format!("{CLAUDE}\nunknown = 1\n"),
        ] {
            assert!(Recipe::parse(&bad).is_err(), "accepted:\n{bad}");
        }
    }

    #[test]
    fn pip_recipe_hooks() {
        let r = Recipe::parse(
            "name = \"aider\"\n[pip]\npackage = \"aider-chat\"\nversion = \"0.86.2\"\n[bin]\naider = \"venv/bin/aider\"\n",
        )
        .unwrap();
        let h = r.pip_hooks(r.pip.as_ref().unwrap());
        assert!(h[1].contains("python3 -m venv /opt/agents/aider/venv"));
        assert!(h[1].contains("env -u PIP_FIND_LINKS PIP_CERT=/tmp/agentvm-host-ca.crt REQUESTS_CA_BUNDLE=/tmp/agentvm-host-ca.crt"));
        assert!(h[1].contains("aider-chat==0.86.2"));
        assert!(h[1].contains("--report /opt/agents/aider/pip-report.json"));
    }

    #[test]
    fn npm_lockfile_keeps_installed_packages_only() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("node_modules/@a/x-linux")).unwrap();
        let lock = r#"{"lockfileVersion": 3, "packages": {
            "": {"name": "p"},
            "node_modules/@a/x-linux": {"version": "1.0.0", "integrity": "sha512-AA"},
            "node_modules/@a/x-darwin": {"version": "1.0.0", "integrity": "sha512-BB"}}}"#;
        let p = npm_lock_packages(lock, dir.path()).unwrap();
        assert_eq!(
            p,
            [Package {
                name: "@a/x-linux".into(),
                version: "1.0.0".into(),
                integrity: "sha512-AA".into()
            }]
        );
    }

    #[test]
    fn pip_report() {
        let r = r#"{"install": [
          {"metadata": {"name": "b", "version": "2"}, "download_info": {"archive_info": {"hashes": {"sha256": "ff"}}}},
          {"metadata": {"name": "A", "version": "1"}, "download_info": {"archive_info": {"hash": "sha256=ee"}}}]}"#;
        let p = pip_report_packages(r).unwrap();
        assert_eq!(p[0].name, "A");
        assert_eq!(p[0].integrity, "sha256=ee");
        assert_eq!(p[1].integrity, "sha256=ff");
    }

    #[test]
    fn shipped_recipes_parse() {
        let dir = crate::source::SourceTree::new(None).recipes_dir().unwrap();
        let names = available(&dir);
        assert!(names.len() >= 3, "{names:?}");
        let rs = load(&dir, &names).unwrap();
        assert_eq!(rs.len(), names.len());
    }
}
