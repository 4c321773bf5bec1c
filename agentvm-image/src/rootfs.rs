//! The Debian root filesystem of the `agent` image: built with `mmdebstrap`
//! from the archive the host's apt already uses, packed into one read-only
//! file (erofs or squashfs) that every VM shares as a read-only disk.
//!
//! Inside the guest the initramfs mounts it under an overlay whose upper
//! layer is a tmpfs: every write lands in guest RAM, so the golden memory
//! snapshot covers the whole file system and `loadvm` reverts it.
//!
//! The pure functions here build command lines and parse tool output; `build`
//! runs them. The packed file is cached under `<cache>/rootfs/<key>.<ext>`,
//! keyed by everything that determines its contents (suite, mirror, package
//! list, set-up script, recipes), so changing the guest agent or the kernel
//! does not rebuild it.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::progress::Progress;
use crate::util::{require_tool, run_captured, sha256_hex, show_command};

/// Debian suite. Bookworm, because Aider needs Python ≤ 3.12 (bookworm has
/// 3.11; trixie's 3.13 is too new) and its glibc 2.36 runs the native
/// Claude Code and Codex binaries.
pub const SUITE: &str = "bookworm";

/// Packages of the agent image (on top of mmdebstrap's `minbase`).
pub const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "procps",
    "python3",
    "python3-venv",
    "python3-pip",
    "nodejs",
    "npm",
    "git",
    "ca-certificates",
    "curl",
    "ripgrep",
    "less",
    "patch",
    "diffutils",
    "findutils",
    "sed",
    "grep",
    "tar",
    "gzip",
    "xz-utils",
    "passwd",
    // DHCP client for `network = "nat-filtered"` (run by /usr/local/sbin/agentvm-dhcp).
    "isc-dhcp-client",
];

/// Bump when the way the root file system is built changes in a way the
/// inputs do not capture (mmdebstrap options, recipe hooks). Part of the key.
pub const BUILDER_VERSION: u32 = 1;

/// The unprivileged user agents run as.
pub const AGENT_USER: &str = "agent";
/// Its uid and gid.
pub const AGENT_UID: u32 = 1000;
/// Its home directory.
pub const AGENT_HOME: &str = "/home/agent";

/// Run inside the new root (`chroot "$1" sh -c ...`) after the packages are
/// installed: the agent user, /workspace, and no apt caches. Part of the key.
pub const SETUP_SCRIPT: &str = r#"set -e
useradd --create-home --home-dir /home/agent --uid 1000 --user-group --shell /bin/bash agent
mkdir -p /workspace /opt/agentvm /opt/agents
chown agent:agent /workspace /opt/agentvm
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /usr/share/man /usr/share/info /var/log/*.log /var/log/apt
"#;

/// How the root file system is packed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum RootfsFormat {
    /// erofs, lz4hc-compressed (`mkfs.erofs` from erofs-utils).
    Erofs,
    /// squashfs, zstd-compressed (`mksquashfs` from squashfs-tools).
    Squashfs,
}

impl RootfsFormat {
    /// The guest's `mount -t` type, which is also its kernel module's name.
    pub fn fs_type(self) -> &'static str {
        match self {
            Self::Erofs => "erofs",
            Self::Squashfs => "squashfs",
        }
    }

    /// File name extension of the packed image.
    pub fn extension(self) -> &'static str {
        self.fs_type()
    }

    /// The packing tool and the Debian package that has it.
    pub fn tool(self) -> (&'static str, &'static str) {
        match self {
            Self::Erofs => ("mkfs.erofs", "erofs-utils"),
            Self::Squashfs => ("mksquashfs", "squashfs-tools"),
        }
    }

    /// Arguments of [`Self::tool`] that pack `dir` into `out`. Timestamps
    /// are kept (git and make rely on them); ownership is kept (root vs agent).
    pub fn pack_args(self, dir: &Path, out: &Path) -> Vec<String> {
        let (dir, out) = (dir.display().to_string(), out.display().to_string());
        match self {
            Self::Erofs => vec!["-zlz4hc".into(), "--quiet".into(), out, dir],
            Self::Squashfs => vec![
                dir,
                out,
                "-comp".into(),
                "zstd".into(),
                "-noappend".into(),
                "-no-progress".into(),
                "-quiet".into(),
            ],
        }
    }
}

impl fmt::Display for RootfsFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.fs_type())
    }
}

/// The first archive URL that the host's apt uses for `suite` (deb822
/// `.sources` text or one-line `sources.list` text), e.g.
/// `http://deb.debian.org/debian`.
pub fn mirror_from_sources(text: &str, suite: &str) -> Option<String> {
    // deb822: paragraphs separated by blank lines.
    for para in text.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let (Some(types), Some(uris), Some(suites)) =
            (field("Types"), field("URIs"), field("Suites"))
        else {
            continue;
        };
        if types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(|s| s == suite)
        {
            if let Some(uri) = uris.split_whitespace().next() {
                return Some(uri.trim_end_matches('/').to_string());
            }
        }
    }
    // One-line format: deb [options] URI suite components...
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut rest: Vec<&str> = words.collect();
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            let end = rest.iter().position(|w| w.ends_with(']')).unwrap_or(0);
            rest.drain(..=end);
        }
        if rest.len() >= 2 && rest[1] == suite {
            return Some(rest[0].trim_end_matches('/').to_string());
        }
    }
    None
}

/// Reads the host's apt sources and returns the archive URL for `suite`.
pub fn host_mirror(suite: &str) -> Result<String> {
    let mut texts = Vec::new();
    for file in ["/etc/apt/sources.list"] {
        if let Ok(t) = fs::read_to_string(file) {
            texts.push(t);
        }
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = dir.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for p in paths {
            if let Ok(t) = fs::read_to_string(&p) {
                texts.push(t);
            }
        }
    }
    texts
        .iter()
        .find_map(|t| mirror_from_sources(t, suite))
        .with_context(|| {
            format!(
                "no apt source for suite {suite} in /etc/apt/sources.list{{,.d/*}}: \
                 pass the archive URL with --mirror"
            )
        })
}

/// The `mmdebstrap` arguments that build the root file system into `dir`.
/// `hooks` are extra `--customize-hook` scripts (recipes), run after the
/// set-up script.
pub fn mmdebstrap_args(
    suite: &str,
    mirror: &str,
    packages: &[&str],
    dir: &Path,
    hooks: &[String],
) -> Vec<String> {
    let mut args = vec![
        "--variant=minbase".to_string(),
        "--mode=root".into(),
        "--format=directory".into(),
        format!("--include={}", packages.join(",")),
        format!(
            "--customize-hook=chroot \"$1\" sh -c '{}'",
            SETUP_SCRIPT.replace('\'', r"'\''")
        ),
    ];
    for h in hooks {
        args.push(format!("--customize-hook={h}"));
    }
    args.extend([suite.to_string(), dir.display().to_string(), mirror.into()]);
    args
}

/// One installed Debian package.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebPackage {
    /// Package name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Architecture.
    pub arch: String,
}

/// The `dpkg-query -W` format [`parse_dpkg_query`] reads.
pub const DPKG_QUERY_FORMAT: &str = "${Package}\t${Version}\t${Architecture}\n";

/// Parses `dpkg-query -W -f DPKG_QUERY_FORMAT` output, sorted by name.
pub fn parse_dpkg_query(text: &str) -> Vec<DebPackage> {
    let mut v: Vec<DebPackage> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some(DebPackage {
                name: f.next()?.to_string(),
                version: f.next()?.to_string(),
                arch: f.next()?.to_string(),
            })
        })
        .filter(|p| !p.name.is_empty())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Everything that determines the root file system's contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsInputs {
    /// Debian suite.
    pub suite: String,
    /// Archive URL.
    pub mirror: String,
    /// Packages asked for.
    pub packages: Vec<String>,
    /// SHA-256 of [`SETUP_SCRIPT`].
    pub setup_sha256: String,
    /// Packing format.
    pub format: RootfsFormat,
    /// `name=sha256` of each recipe file, sorted by name.
    pub recipes: Vec<String>,
}

impl RootfsInputs {
    /// SHA-256 over a canonical line rendering (as [`super::manifest::Inputs::key`]).
    pub fn key(&self) -> String {
        let mut s = format!("agentvm-rootfs-key {BUILDER_VERSION}\n");
        for (k, v) in [
            ("suite", self.suite.clone()),
            ("mirror", self.mirror.clone()),
            ("packages", self.packages.join(",")),
            ("setup", self.setup_sha256.clone()),
            ("format", self.format.to_string()),
            ("recipes", self.recipes.join(",")),
        ] {
            s.push_str(k);
            s.push('=');
            s.push_str(&v.replace('\\', "\\\\").replace('\n', "\\n"));
            s.push('\n');
        }
        sha256_hex(s.as_bytes())
    }
}

/// What [`build`] produced (or found in the cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootfsInfo {
    /// The cache key.
    pub key: String,
    /// Inputs.
    pub inputs: RootfsInputs,
    /// Every installed Debian package.
    pub packages: Vec<DebPackage>,
    /// Installed recipes (agents).
    pub agents: Vec<super::recipe::Installed>,
    /// Size of the unpacked tree (bytes, apparent).
    pub unpacked_bytes: u64,
    /// Seconds mmdebstrap (with recipes) took.
    pub mmdebstrap_seconds: f64,
    /// Seconds packing took.
    pub pack_seconds: f64,
}

/// Paths of a cached root file system.
pub fn cached_paths(cache: &Path, key: &str, format: RootfsFormat) -> (PathBuf, PathBuf) {
    let dir = cache.join("rootfs");
    (
        dir.join(format!("{key}.{}", format.extension())),
        dir.join(format!("{key}.json")),
    )
}

/// The cached root file system for `inputs`, built if missing.
pub fn build(
    inputs: &RootfsInputs,
    recipes: &[super::recipe::Recipe],
    cache: &Path,
    progress: &Progress<'_>,
) -> Result<(PathBuf, RootfsInfo)> {
    let key = inputs.key();
    let (image, info_path) = cached_paths(cache, &key, inputs.format);
    if let (Ok(meta), Ok(text)) = (fs::metadata(&image), fs::read_to_string(&info_path)) {
        if let Ok(info) = serde_json::from_str::<RootfsInfo>(&text) {
            if meta.len() > 0 && info.key == key {
                progress.note(format!(
                    "root file system cached: {} ({:.1} MiB)",
                    image.display(),
                    meta.len() as f64 / 1048576.0
                ));
                return Ok((image, info));
            }
        }
    }
    if !crate::util::is_root() {
        bail!("building the agent root file system needs root (mmdebstrap --mode=root)");
    }
    require_tool(
        "mmdebstrap",
        "install it with `apt-get install mmdebstrap` (cargo xtask setup does)",
    )?;
    let (tool, pkg) = inputs.format.tool();
    require_tool(tool, &format!("install it with `apt-get install {pkg}`"))?;

    let work = cache.join("rootfs").join(format!("{key}.work"));
    let tree = work.join("root");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("remove {}", work.display()))?;
    }
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    // Recipes: host-side downloads first (npm), then hooks for mmdebstrap.
    let mut hooks = Vec::new();
    let mut agents = Vec::new();
    for r in recipes {
        progress.step(format!("recipe {}: fetching {}", r.name, r.source_label()));
        let staged = super::recipe::stage(r, &work, progress)?;
        hooks.extend(staged.hooks);
        agents.push(staged.installed);
    }

    let packages: Vec<&str> = inputs.packages.iter().map(String::as_str).collect();
    let args = mmdebstrap_args(&inputs.suite, &inputs.mirror, &packages, &tree, &hooks);
    let mut cmd = Command::new("mmdebstrap");
    cmd.args(&args);
    progress.step(format!(
        "mmdebstrap {} from {} ({} packages asked; takes minutes)",
        inputs.suite,
        inputs.mirror,
        packages.len()
    ));
    progress.note(show_command(&cmd));
    let t = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("failed to start `{}`", show_command(&cmd)))?;
    if !status.success() {
        bail!("mmdebstrap failed ({status}); its output is above");
    }
    let mmdebstrap_seconds = t.elapsed().as_secs_f64();

    // Pip recipes record their hashes from inside the tree.
    for a in &mut agents {
        super::recipe::finish(a, &tree)?;
    }

    let out = run_captured(
        Command::new("dpkg-query")
            .arg(format!("--admindir={}/var/lib/dpkg", tree.display()))
            .arg("-W")
            .arg("-f")
            .arg(DPKG_QUERY_FORMAT),
    )?;
    let debs = parse_dpkg_query(&String::from_utf8_lossy(&out.stdout));
    let unpacked_bytes = du_bytes(&tree);
    progress.note(format!(
        "{} Debian packages, {:.0} MiB unpacked, {:.0} s",
        debs.len(),
        unpacked_bytes as f64 / 1048576.0,
        mmdebstrap_seconds
    ));

    progress.step(format!("packing {} ({tool})", inputs.format));
    let tmp_image = work.join(format!("rootfs.{}", inputs.format.extension()));
    let t = Instant::now();
    run_captured(Command::new(tool).args(inputs.format.pack_args(&tree, &tmp_image)))?;
    let pack_seconds = t.elapsed().as_secs_f64();
    let size = fs::metadata(&tmp_image)?.len();
    progress.note(format!(
        "{:.1} MiB in {:.0} s",
        size as f64 / 1048576.0,
        pack_seconds
    ));

    let info = RootfsInfo {
        key: key.clone(),
        inputs: inputs.clone(),
        packages: debs,
        agents,
        unpacked_bytes,
        mmdebstrap_seconds: round2(mmdebstrap_seconds),
        pack_seconds: round2(pack_seconds),
    };
    fs::rename(&tmp_image, &image).with_context(|| format!("move to {}", image.display()))?;
    crate::util::write_atomic(&info_path, serde_json::to_string_pretty(&info)?.as_bytes())?;
    let _ = fs::remove_dir_all(&work);
    Ok((image, info))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Apparent size of a tree (regular files), not following symlinks.
fn du_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() {
                total += m.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# comment\nURIs: http://deb.example.org/debian\n\
        Suites: bookworm bookworm-updates\nComponents: main\n\n\
        Types: deb\nURIs: http://deb.example.org/debian-security\nSuites: bookworm-security\n";

    #[test]
    fn mirror_from_deb822_and_one_line() {
        assert_eq!(
            mirror_from_sources(DEB822, "bookworm").as_deref(),
            Some("http://deb.example.org/debian")
        );
        assert_eq!(
            mirror_from_sources(DEB822, "bookworm-security").as_deref(),
            Some("http://deb.example.org/debian-security")
        );
        assert_eq!(mirror_from_sources(DEB822, "trixie"), None);
        let one = "# x\ndeb-src http://src/ bookworm main\n\
                   deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_sources(one, "bookworm").as_deref(),
            Some("http://m.example/debian")
        );
    }

    #[test]
    fn mmdebstrap_command_line() {
        let a = mmdebstrap_args(
            "bookworm",
            "http://m/debian",
            &["git", "python3"],
            Path::new("/c/root"),
            &["echo hi".to_string()],
        );
        assert_eq!(a[0], "--variant=minbase");
        assert!(a.contains(&"--include=git,python3".to_string()));
        assert!(a[4].starts_with("--customize-hook=chroot \"$1\" sh -c 'set -e"));
        assert_eq!(a[5], "--customize-hook=echo hi");
        assert_eq!(&a[6..], ["bookworm", "/c/root", "http://m/debian"]);
        // The set-up script holds no single quote that would break the quoting.
        assert!(!SETUP_SCRIPT.contains('\''));
    }

    #[test]
    fn pack_command_lines() {
        let (d, o) = (Path::new("/t/root"), Path::new("/t/r.img"));
        assert_eq!(
            RootfsFormat::Erofs.pack_args(d, o),
            ["-zlz4hc", "--quiet", "/t/r.img", "/t/root"]
        );
        let s = RootfsFormat::Squashfs.pack_args(d, o);
        assert_eq!(&s[..4], ["/t/root", "/t/r.img", "-comp", "zstd"]);
    }

    #[test]
    fn dpkg_query_output() {
        let p = parse_dpkg_query("zlib1g\t1:1.2.13\tamd64\ngit\t1:2.39.5-0+deb12u2\tamd64\n\n");
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "git");
        assert_eq!(p[0].version, "1:2.39.5-0+deb12u2");
        assert_eq!(p[1].arch, "amd64");
    }

    #[test]
    fn rootfs_key_changes_with_inputs() {
        let base = RootfsInputs {
            suite: "bookworm".into(),
            mirror: "http://m".into(),
            packages: vec!["git".into()],
            setup_sha256: "aa".into(),
            format: RootfsFormat::Erofs,
            recipes: vec![],
        };
        let k = base.key();
        let mut r = base.clone();
        r.recipes.push("codex=ab".into());
        assert_ne!(r.key(), k);
        let mut f = base.clone();
        f.format = RootfsFormat::Squashfs;
        assert_ne!(f.key(), k);
        let mut m = base.clone();
        m.mirror.push('/');
        assert_ne!(m.key(), k);
        assert_eq!(base.key(), k);
    }
}
