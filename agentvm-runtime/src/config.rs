//! [`AgentVmConfig`]: the settings of a test run, from `.config/agentvm.toml`
//! at the workspace root, overridden by environment variables.
//!
//! Precedence, lowest first: built-in defaults → the file → environment
//! variables → (in the test harness) the `#[agent_vm_test(...)]` attribute.
//!
//! # Finding the file
//!
//! The workspace root is the first directory, walking up from
//! `CARGO_MANIFEST_DIR` (set by cargo and cargo-nextest when they run a test
//! binary) or else the current directory, that contains a `Cargo.lock` or a
//! `Cargo.toml` with a `[workspace]` table. The file is
//! `<workspace root>/.config/agentvm.toml`, next to nextest's and insta's
//! configuration. It is optional: without it the defaults apply.
//!
//! # File format
//!
//! Every key is optional; unknown keys are an error (so a typo does not go
//! unnoticed). Durations are a number of seconds (`60`) or a string of
//! numbers with units, largest first (`"500ms"`, `"30s"`, `"2m"`, `"1m30s"`,
//! units `ms`, `s`, `m`, `h`).
//!
//! ```toml
//! # Which hypervisor backend runs the VMs: "qemu" (default: QEMU started
//! # directly, no daemon), "libvirt" (domains of a libvirt daemon; needs the
//! # cargo feature `libvirt`) or "mock" (an in-process fake without real VMs,
//! # for testing the harness itself).
//! backend = "qemu"
//! # Guest image name, built by `agentvm image build NAME`.
//! image = "default"
//! # Where images live; relative paths are relative to the workspace root.
//! image_dir = "target/agentvm/images"
//! # Where per-test artifacts go (`<artifacts_dir>/<test name>/`).
//! artifacts_dir = "target/agentvm"
//! # Resource profile: "minimal" (1 vCPU, 256 MiB), "light" (1, 1024),
//! # "standard" (2, 2048) or "intensive" (4, 4096).
//! profile = "minimal"
//! # "gateway" (default: no NIC; the model gateway, and an egress proxy
//! # that refuses and logs everything else), "allowlist" (the same, but the
//! # proxy lets `allow` through), "isolated" (no path out at all),
//! # "nat-filtered" (libvirt NAT behind a port filter) or "bridge:NAME".
//! network = "gateway"
//! # host[:port] patterns the egress proxy lets through in `allowlist` mode
//! # (`*.example.com` is any subdomain); tests add their own with
//! # `allow = [...]` in their attribute.
//! allow = ["api.example.com:443"]
//! # "auto" (KVM when it really works, else TCG), "kvm" or "tcg".
//! accel = "auto"
//! # Boot until the guest agent answers (TCG is slow).
//! boot_timeout = "120s"
//! # Default time limit of an agent run.
//! exec_timeout = "60s"
//! # How long a test waits for a free VM.
//! acquire_timeout = "300s"
//! # Port of the Prometheus metrics endpoint on 127.0.0.1 (off when unset).
//! metrics_port = 9464
//! # libvirt connection URI of the libvirt backend (default: qemu:///system).
//! libvirt_uri = "qemu:///system"
//! # JSON-lines audit log of every VM lifecycle event and agent run
//! # (default: `<artifacts_dir>/audit.jsonl`); appended to.
//! audit_log = "target/agentvm/audit.jsonl"
//! # Anomaly kinds that fail the test they are found in (default: none):
//! # "timeout", "output_cap", "memory_limit", "process_count",
//! # "outside_workspace", "network_attempt", "egress_denied", "duration_zscore",
//! # "cpu_zscore", "memory_zscore".
//! fail_on = ["timeout"]
//! # Most processes one agent run may have alive at once before it is a
//! # `process_count` anomaly.
//! process_limit = 100
//! # Start VMs from the golden snapshot an earlier VM of the same
//! # configuration saved (`<runtime dir>/golden/`), instead of booting:
//! # a few hundred ms instead of seconds (QEMU backend; default true).
//! golden_cache = true
//!
//! [pool]
//! # VMs kept booted and ready (0 allowed: boot on demand).
//! min_size = 1
//! # Most VMs alive at once (per VM shape); also caps the test threads.
//! max_size = 2
//! # Replace a VM after this many tests (unset: never).
//! max_uses = 100
//! # Replace a VM this long after it booted (unset: never).
//! ttl = "30m"
//! # Check idle VMs this often; a VM that died idle is replaced before
//! # anyone acquires it (default 30 s).
//! health_interval = "30s"
//! ```
//!
//! # Environment variables
//!
//! | variable | key |
//! |---|---|
//! | `AGENT_VM_BACKEND` | `backend` |
//! | `AGENT_VM_IMAGE` | `image` |
//! | `AGENT_VM_IMAGE_DIR` | `image_dir` (relative: to the current directory) |
//! | `AGENT_VM_ARTIFACTS_DIR` | `artifacts_dir` (relative: to the current directory) |
//! | `AGENT_VM_PROFILE` | `profile` |
//! | `AGENT_VM_NETWORK_MODE` | `network` |
//! | `AGENT_VM_ALLOW` | `allow` (comma-separated) |
//! | `AGENT_VM_ACCEL` | `accel` |
//! | `AGENT_VM_BOOT_TIMEOUT` | `boot_timeout` |
//! | `AGENT_VM_EXEC_TIMEOUT` | `exec_timeout` |
//! | `AGENT_VM_ACQUIRE_TIMEOUT` | `acquire_timeout` |
//! | `AGENT_VM_POOL_MIN_SIZE` | `pool.min_size` |
//! | `AGENT_VM_POOL_MAX_SIZE` | `pool.max_size` |
//! | `AGENT_VM_MAX_USES` | `pool.max_uses` |
//! | `AGENT_VM_TTL` | `pool.ttl` |
//! | `AGENT_VM_HEALTH_INTERVAL` | `pool.health_interval` |
//! | `AGENT_VM_METRICS_PORT` | `metrics_port` |
//! | `AGENT_VM_AUDIT_LOG` | `audit_log` (relative: to the current directory) |
//! | `AGENT_VM_FAIL_ON` | `fail_on` (comma-separated) |
//! | `AGENT_VM_PROCESS_LIMIT` | `process_limit` |
//! | `AGENT_VM_GOLDEN_CACHE` | `golden_cache` (`true`/`false`, `1`/`0`, `on`/`off`) |
//! | `LIBVIRT_DEFAULT_URI` | `libvirt_uri` |
//!
//! An empty variable counts as unset. A bad value in the file or a variable is
//! an error naming the file or variable and the allowed values.
//!
//! The parsing functions ([`AgentVmConfig::from_sources`],
//! [`parse_duration`], ...) are pure: they take the file's text and a map of
//! environment variables, so they are unit-testable.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::backend::{Backend, BackendError};
use crate::pool::PoolConfig;
use crate::spec::{Accel, ImagePaths, NetworkMode, ResourceProfile, VmSpec};

/// Path of the configuration file relative to the workspace root.
pub const CONFIG_FILE: &str = ".config/agentvm.toml";

/// Every environment variable the configuration reads.
pub const ENV_VARS: &[&str] = &[
    "AGENT_VM_BACKEND",
    "AGENT_VM_IMAGE",
    "AGENT_VM_IMAGE_DIR",
    "AGENT_VM_ARTIFACTS_DIR",
    "AGENT_VM_PROFILE",
    "AGENT_VM_NETWORK_MODE",
    "AGENT_VM_ALLOW",
    "AGENT_VM_ACCEL",
    "AGENT_VM_BOOT_TIMEOUT",
    "AGENT_VM_EXEC_TIMEOUT",
    "AGENT_VM_ACQUIRE_TIMEOUT",
    "AGENT_VM_POOL_MIN_SIZE",
    "AGENT_VM_POOL_MAX_SIZE",
    "AGENT_VM_MAX_USES",
    "AGENT_VM_TTL",
    "AGENT_VM_HEALTH_INTERVAL",
    "AGENT_VM_METRICS_PORT",
    "AGENT_VM_AUDIT_LOG",
    "AGENT_VM_FAIL_ON",
    "AGENT_VM_GOLDEN_CACHE",
    "AGENT_VM_PROCESS_LIMIT",
    "LIBVIRT_DEFAULT_URI",
];

/// Default of [`AgentVmConfig::health_interval`].
pub const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(30);

/// Default of [`AgentVmConfig::process_limit`]: far above what a script or
/// a parallel build has alive at once, far below a fork bomb.
pub const DEFAULT_PROCESS_LIMIT: u64 = 100;

/// The anomaly kinds the harness finds (and `fail_on` accepts).
pub const ANOMALY_KINDS: &[&str] = &[
    "timeout",
    "output_cap",
    "memory_limit",
    "oom_kill",
    "process_count",
    "outside_workspace",
    "network_attempt",
    "egress_denied",
    "duration_zscore",
    "cpu_zscore",
    "memory_zscore",
];

const PROFILES: &str = "\"minimal\", \"light\", \"standard\", \"intensive\"";
const NETWORKS: &str =
    "\"gateway\", \"allowlist\", \"isolated\", \"nat-filtered\", \"bridge:NAME\"";
const ALLOW: &str = "host[:port] patterns such as \"api.example.com:443\" or \"*.example.com\"";
const ACCELS: &str = "\"auto\", \"kvm\", \"tcg\"";
const BACKENDS: &str = "\"qemu\", \"libvirt\", \"mock\"";
const DURATIONS: &str =
    "a number of seconds or a duration like \"500ms\", \"30s\", \"2m\", \"1m30s\" (more than zero)";

/// Which backend runs the VMs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// QEMU started directly (the default).
    #[default]
    Qemu,
    /// The in-process fake backend (no real VMs), for testing harness logic.
    Mock,
    /// libvirt domains. Always a valid name; creating the backend needs the
    /// cargo feature `libvirt` (of `agentvm-test` or `agentvm-runtime`).
    Libvirt,
}

impl BackendKind {
    /// The configuration name (`qemu`, `libvirt`, `mock`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::Mock => "mock",
            Self::Libvirt => "libvirt",
        }
    }
}

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

/// The settings of a test run. [`Default`] gives the built-in defaults
/// relative to the current directory; [`AgentVmConfig::load`] reads the file
/// and the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentVmConfig {
    /// Which backend runs the VMs.
    pub backend: BackendKind,
    /// Guest image name.
    pub image: String,
    /// Directory holding `<image>/manifest.json` etc.
    pub image_dir: PathBuf,
    /// Directory of per-test artifacts.
    pub artifacts_dir: PathBuf,
    /// Resource profile of the VMs.
    pub profile: ResourceProfile,
    /// How the guests reach the network (see [`NetworkMode`]).
    pub network: NetworkMode,
    /// `host[:port]` patterns the egress proxy lets through in `allowlist`
    /// mode (checked by the test harness, which owns the proxy).
    pub allow: Vec<String>,
    /// Accelerator choice.
    pub accel: Accel,
    /// Boot deadline (launch until the guest agent's Hello).
    pub boot_timeout: Duration,
    /// Default time limit of a command / agent run.
    pub exec_timeout: Duration,
    /// How long a test waits for a VM from the pool.
    pub acquire_timeout: Duration,
    /// VMs kept ready.
    pub pool_min_size: usize,
    /// Most VMs alive at once (per VM shape).
    pub pool_max_size: usize,
    /// Recycle a VM after this many uses.
    pub max_uses: Option<u64>,
    /// Recycle a VM this long after it booted.
    pub ttl: Option<Duration>,
    /// How often idle VMs are health-checked.
    pub health_interval: Duration,
    /// Port of the Prometheus metrics endpoint on 127.0.0.1 (off when unset).
    pub metrics_port: Option<u16>,
    /// The audit log file (`None`: `<artifacts_dir>/audit.jsonl`).
    pub audit_log: Option<PathBuf>,
    /// Anomaly kinds that fail the test they are found in.
    pub fail_on: Vec<String>,
    /// Most processes one agent run may have alive at once before it is a
    /// `process_count` anomaly.
    pub process_limit: u64,
    /// Start VMs from a golden snapshot an earlier VM of the same
    /// configuration saved, instead of booting (QEMU backend).
    pub golden_cache: bool,
    /// libvirt connection URI of the libvirt backend.
    pub libvirt_uri: Option<String>,
    /// The workspace root the relative paths were resolved against.
    pub workspace_root: PathBuf,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
}

impl Default for AgentVmConfig {
    fn default() -> Self {
        Self::defaults_for(Path::new("."))
    }
}

/// The file's shape. Every field optional; unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    backend: Option<String>,
    image: Option<String>,
    image_dir: Option<String>,
    artifacts_dir: Option<String>,
    profile: Option<String>,
    network: Option<String>,
    allow: Option<Vec<String>>,
    accel: Option<String>,
    boot_timeout: Option<RawDuration>,
    exec_timeout: Option<RawDuration>,
    acquire_timeout: Option<RawDuration>,
    metrics_port: Option<i64>,
    libvirt_uri: Option<String>,
    audit_log: Option<String>,
    fail_on: Option<Vec<String>>,
    golden_cache: Option<bool>,
    process_limit: Option<i64>,
    pool: Option<RawPool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    min_size: Option<i64>,
    max_size: Option<i64>,
    max_uses: Option<i64>,
    ttl: Option<RawDuration>,
    health_interval: Option<RawDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDuration {
    Seconds(i64),
    Text(String),
}

impl RawDuration {
    fn text(&self) -> String {
        match self {
            Self::Seconds(n) => n.to_string(),
            Self::Text(s) => s.clone(),
        }
    }
}

impl AgentVmConfig {
    /// The built-in defaults, with default directories under `workspace_root`.
    pub fn defaults_for(workspace_root: &Path) -> Self {
        let agentvm_dir = workspace_root.join("target").join("agentvm");
        Self {
            backend: BackendKind::Qemu,
            image: "default".into(),
            image_dir: agentvm_dir.join("images"),
            artifacts_dir: agentvm_dir,
            profile: ResourceProfile::Minimal,
            network: NetworkMode::Gateway,
            allow: Vec::new(),
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(120),
            exec_timeout: Duration::from_secs(60),
            acquire_timeout: Duration::from_secs(300),
            pool_min_size: 1,
            pool_max_size: 2,
            max_uses: None,
            ttl: None,
            health_interval: DEFAULT_HEALTH_INTERVAL,
            metrics_port: None,
            audit_log: None,
            fail_on: Vec::new(),
            golden_cache: true,
            process_limit: DEFAULT_PROCESS_LIMIT,
            libvirt_uri: None,
            workspace_root: workspace_root.to_path_buf(),
            config_file: None,
        }
    }

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

    /// Applies the settings of a configuration file's text.
    pub fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let origin = |key: &str| format!("{} ({key})", path.display());
        let root = self.workspace_root.clone();
        let set = Setter { origin: &origin };
        if let Some(v) = raw.backend {
            self.backend = set.parse("backend", &v, parse_backend, BACKENDS)?;
        }
        if let Some(v) = raw.image {
            self.image = set.parse("image", &v, parse_image_name, IMAGE_NAMES)?;
        }
        if let Some(v) = raw.image_dir {
            self.image_dir =
                set.parse("image_dir", &v, |s| parse_dir(s, &root), "a directory path")?;
        }
        if let Some(v) = raw.artifacts_dir {
            self.artifacts_dir = set.parse(
                "artifacts_dir",
                &v,
                |s| parse_dir(s, &root),
                "a directory path",
            )?;
        }
        if let Some(v) = raw.profile {
            self.profile = set.parse("profile", &v, ResourceProfile::from_name, PROFILES)?;
        }
        if let Some(v) = raw.network {
            self.network = set.parse("network", &v, parse_network, NETWORKS)?;
        }
        if let Some(entries) = raw.allow {
            self.allow = set.parse("allow", &entries.join(","), parse_allow, ALLOW)?;
        }
        if let Some(v) = raw.accel {
            self.accel = set.parse("accel", &v, parse_accel, ACCELS)?;
        }
        for (key, value, field) in [
            ("boot_timeout", raw.boot_timeout, &mut self.boot_timeout),
            ("exec_timeout", raw.exec_timeout, &mut self.exec_timeout),
            (
                "acquire_timeout",
                raw.acquire_timeout,
                &mut self.acquire_timeout,
            ),
        ] {
            if let Some(v) = value {
                *field = set.parse(key, &v.text(), parse_duration, DURATIONS)?;
            }
        }
        if let Some(v) = raw.metrics_port {
            self.metrics_port =
                Some(set.parse("metrics_port", &v.to_string(), parse_port, PORTS)?);
        }
        if let Some(v) = raw.libvirt_uri {
            self.libvirt_uri = Some(v);
        }
        if let Some(v) = raw.audit_log {
            self.audit_log =
                Some(set.parse("audit_log", &v, |s| parse_dir(s, &root), "a file path")?);
        }
        if let Some(kinds) = raw.fail_on {
            self.fail_on = set.parse(
                "fail_on",
                &kinds.join(","),
                parse_kinds,
                &anomaly_kind_list(),
            )?;
        }
        if let Some(v) = raw.golden_cache {
            self.golden_cache = v;
        }
        if let Some(v) = raw.process_limit {
            self.process_limit =
                set.parse("process_limit", &v.to_string(), parse_positive, POSITIVE)? as u64;
        }
        if let Some(pool) = raw.pool {
            if let Some(v) = pool.min_size {
                self.pool_min_size =
                    set.parse("pool.min_size", &v.to_string(), parse_count, COUNTS)?;
            }
            if let Some(v) = pool.max_size {
                self.pool_max_size =
                    set.parse("pool.max_size", &v.to_string(), parse_positive, POSITIVE)?;
            }
            if let Some(v) = pool.max_uses {
                self.max_uses =
                    Some(
                        set.parse("pool.max_uses", &v.to_string(), parse_positive, POSITIVE)?
                            as u64,
                    );
            }
            if let Some(v) = pool.ttl {
                self.ttl = Some(set.parse("pool.ttl", &v.text(), parse_duration, DURATIONS)?);
            }
            if let Some(v) = pool.health_interval {
                self.health_interval =
                    set.parse("pool.health_interval", &v.text(), parse_duration, DURATIONS)?;
            }
        }
        self.config_file = Some(path.to_path_buf());
        Ok(())
    }

    /// Applies environment variables (see the module docs). Empty values are
    /// ignored; relative directories are resolved against `cwd`.
    pub fn apply_env(
        &mut self,
        env: &HashMap<String, String>,
        cwd: &Path,
    ) -> Result<(), ConfigError> {
        let get = |name: &str| env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let env_origin = |name: &str| format!("environment variable {name}");
        macro_rules! apply {
            ($var:literal, $key:literal, $parse:expr, $expected:expr, |$v:ident| $assign:expr) => {
                if let Some(text) = get($var) {
                    let origin = env_origin($var);
                    let $v = Setter {
                        origin: &|_: &str| origin.clone(),
                    }
                    .parse($key, text, $parse, $expected)?;
                    $assign;
                }
            };
        }
        apply!(
            "AGENT_VM_BACKEND",
            "backend",
            parse_backend,
            BACKENDS,
            |v| self.backend = v
        );
        apply!(
            "AGENT_VM_IMAGE",
            "image",
            parse_image_name,
            IMAGE_NAMES,
            |v| self.image = v
        );
        apply!(
            "AGENT_VM_IMAGE_DIR",
            "image_dir",
            |s| parse_dir(s, cwd),
            "a directory path",
            |v| { self.image_dir = v }
        );
        apply!(
            "AGENT_VM_ARTIFACTS_DIR",
            "artifacts_dir",
            |s| parse_dir(s, cwd),
            "a directory path",
            |v| self.artifacts_dir = v
        );
        apply!(
            "AGENT_VM_PROFILE",
            "profile",
            ResourceProfile::from_name,
            PROFILES,
            |v| { self.profile = v }
        );
        apply!(
            "AGENT_VM_NETWORK_MODE",
            "network",
            parse_network,
            NETWORKS,
            |v| self.network = v
        );
        apply!("AGENT_VM_ALLOW", "allow", parse_allow, ALLOW, |v| self
            .allow =
            v);
        apply!("AGENT_VM_ACCEL", "accel", parse_accel, ACCELS, |v| self
            .accel =
            v);
        apply!(
            "AGENT_VM_BOOT_TIMEOUT",
            "boot_timeout",
            parse_duration,
            DURATIONS,
            |v| { self.boot_timeout = v }
        );
        apply!(
            "AGENT_VM_EXEC_TIMEOUT",
            "exec_timeout",
            parse_duration,
            DURATIONS,
            |v| { self.exec_timeout = v }
        );
        apply!(
            "AGENT_VM_ACQUIRE_TIMEOUT",
            "acquire_timeout",
            parse_duration,
            DURATIONS,
            |v| { self.acquire_timeout = v }
        );
        apply!(
            "AGENT_VM_POOL_MIN_SIZE",
            "pool.min_size",
            parse_count,
            COUNTS,
            |v| { self.pool_min_size = v }
        );
        apply!(
            "AGENT_VM_POOL_MAX_SIZE",
            "pool.max_size",
            parse_positive,
            POSITIVE,
            |v| { self.pool_max_size = v }
        );
        apply!(
            "AGENT_VM_MAX_USES",
            "pool.max_uses",
            parse_positive,
            POSITIVE,
            |v| { self.max_uses = Some(v as u64) }
        );
        apply!("AGENT_VM_TTL", "pool.ttl", parse_duration, DURATIONS, |v| {
            self.ttl = Some(v)
        });
        apply!(
            "AGENT_VM_HEALTH_INTERVAL",
            "pool.health_interval",
            parse_duration,
            DURATIONS,
            |v| { self.health_interval = v }
        );
        apply!(
            "AGENT_VM_METRICS_PORT",
            "metrics_port",
            parse_port,
            PORTS,
            |v| { self.metrics_port = Some(v) }
        );
        apply!(
            "AGENT_VM_AUDIT_LOG",
            "audit_log",
            |s| parse_dir(s, cwd),
            "a file path",
            |v| self.audit_log = Some(v)
        );
        apply!(
            "AGENT_VM_PROCESS_LIMIT",
            "process_limit",
            parse_positive,
            POSITIVE,
            |v| self.process_limit = v as u64
        );
        apply!(
            "AGENT_VM_GOLDEN_CACHE",
            "golden_cache",
            parse_bool,
            BOOLS,
            |v| self.golden_cache = v
        );
        apply!(
            "AGENT_VM_FAIL_ON",
            "fail_on",
            parse_kinds,
            &anomaly_kind_list(),
            |v| self.fail_on = v
        );
        if let Some(uri) = get("LIBVIRT_DEFAULT_URI") {
            self.libvirt_uri = Some(uri.to_string());
        }
        Ok(())
    }

    /// Checks the settings together (pool bounds).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.pool_min_size > self.pool_max_size {
            return Err(ConfigError::Inconsistent(format!(
                "pool.min_size ({}) is larger than pool.max_size ({}) \
                 (set in {} / AGENT_VM_POOL_MIN_SIZE, AGENT_VM_POOL_MAX_SIZE)",
                self.pool_min_size,
                self.pool_max_size,
                self.config_file
                    .as_deref()
                    .map_or_else(|| CONFIG_FILE.to_string(), |p| p.display().to_string()),
            )));
        }
        Ok(())
    }

    /// Where the audit log goes.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.artifacts_dir.join("audit.jsonl"))
    }

    /// A [`VmSpec`] for `image` with this configuration's profile, network
    /// attachment ([`NetworkMode::vm_attachment`]), accelerator and boot timeout.
    pub fn vm_spec(&self, image: ImagePaths) -> VmSpec {
        VmSpec {
            image,
            profile: self.profile,
            network: self.network.vm_attachment(),
            accel: self.accel,
            boot_timeout: self.boot_timeout,
        }
    }

    /// A [`PoolConfig`] with this configuration's sizes for VMs like `spec`.
    pub fn pool_config(&self, spec: VmSpec) -> PoolConfig {
        PoolConfig {
            min_size: self.pool_min_size,
            max_size: self.pool_max_size,
            max_uses: self.max_uses,
            ttl: self.ttl,
            health_interval: Some(self.health_interval),
            spec,
        }
    }
}

/// Creates the backend the configuration names.
pub fn create_backend(config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    match config.backend {
        BackendKind::Mock => Ok(Arc::new(crate::backend::mock::MockBackend::new())),
        BackendKind::Qemu => qemu_backend(config),
        BackendKind::Libvirt => libvirt_backend(config),
    }
}

#[cfg(feature = "libvirt")]
fn libvirt_backend(config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    let backend =
        crate::backend::libvirt::LibvirtBackend::new(crate::backend::libvirt::LibvirtConfig {
            uri: config.libvirt_uri.clone(),
            ..Default::default()
        })?;
    Ok(Arc::new(backend))
}

#[cfg(not(feature = "libvirt"))]
fn libvirt_backend(_config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    Err(BackendError::NotCompiled {
        backend: "libvirt",
        hint: "enable the cargo feature `libvirt` of agentvm-test (e.g. \
               `agentvm-test = { ..., features = [\"libvirt\"] }`, or \
               `cargo test --features agentvm-test/libvirt`); it links libvirt.so \
               and needs libvirt-dev to build (scripts/start-libvirtd.sh installs it)",
    })
}

/// The QEMU backend, with its defaults (programs found on `PATH`, the default
/// runtime directory; the accelerator comes from each VM's spec).
fn qemu_backend(config: &AgentVmConfig) -> Result<Arc<dyn Backend>, BackendError> {
    let backend = crate::backend::qemu::QemuBackend::new(crate::backend::qemu::QemuConfig {
        golden_cache: config.golden_cache,
        ..Default::default()
    })?;
    Ok(Arc::new(backend))
}

struct Setter<'a> {
    origin: &'a dyn Fn(&str) -> String,
}

impl Setter<'_> {
    fn parse<T>(
        &self,
        key: &'static str,
        value: &str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &str,
    ) -> Result<T, ConfigError> {
        parse(value).ok_or_else(|| ConfigError::Invalid {
            origin: (self.origin)(key),
            key,
            value: value.to_string(),
            expected: expected.to_string(),
        })
    }
}

const IMAGE_NAMES: &str = "a non-empty name of ASCII letters, digits, '.', '_', '-'";
const BOOLS: &str = "true or false (also 1/0, on/off, yes/no)";
const PORTS: &str = "a port number from 1 to 65535";
const COUNTS: &str = "a whole number (0 or more)";
const POSITIVE: &str = "a whole number, 1 or more";

/// Parses a backend name (`qemu`, `libvirt`, `mock`).
pub fn parse_backend(s: &str) -> Option<BackendKind> {
    match s {
        "qemu" => Some(BackendKind::Qemu),
        "mock" => Some(BackendKind::Mock),
        "libvirt" => Some(BackendKind::Libvirt),
        _ => None,
    }
}

/// Parses an accelerator name (`auto`, `kvm`, `tcg`).
pub fn parse_accel(s: &str) -> Option<Accel> {
    match s {
        "auto" => Some(Accel::Auto),
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

/// Parses a network mode: `gateway`, `allowlist`, `isolated`, `nat-filtered`
/// (also spelt `nat_filtered`) or `bridge:NAME` (an
/// interface name of at most 15 characters without `/`, `:` or whitespace).
pub fn parse_network(s: &str) -> Option<NetworkMode> {
    match s {
        "isolated" => Some(NetworkMode::Isolated),
        "gateway" => Some(NetworkMode::Gateway),
        "allowlist" => Some(NetworkMode::Allowlist),
        "nat-filtered" | "nat_filtered" => Some(NetworkMode::NatFiltered),
        _ => {
            let name = s.strip_prefix("bridge:")?;
            let ok = !name.is_empty()
                && name.len() <= 15
                && name
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '/' && c != ':');
            ok.then(|| NetworkMode::Bridge(name.to_string()))
        }
    }
}

/// Whether `name` is a valid image name: ASCII letters, digits, `.`, `_`,
/// `-`, not empty and not `.` or `..`.
pub fn is_valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_image_name(s: &str) -> Option<String> {
    is_valid_image_name(s).then(|| s.to_string())
}

fn parse_dir(s: &str, base: &Path) -> Option<PathBuf> {
    (!s.is_empty()).then(|| base.join(s))
}

/// What `fail_on` accepts, for error messages: [`ANOMALY_KINDS`], quoted.
fn anomaly_kind_list() -> String {
    let kinds: Vec<String> = ANOMALY_KINDS.iter().map(|k| format!("{k:?}")).collect();
    format!("anomaly kinds from {} (comma-separated)", kinds.join(", "))
}

/// A comma-separated list of `host[:port]` patterns (empty entries ignored).
/// Only the shape is checked here: no spaces, `/` or `@`, a numeric port;
/// the harness's egress proxy parses them fully when a test starts.
fn parse_allow(s: &str) -> Option<Vec<String>> {
    let mut entries = Vec::new();
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        };
        let bad_host =
            host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/' || c == '@');
        if bad_host || port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return None;
        }
        entries.push(entry.to_string());
    }
    Some(entries)
}

/// A comma-separated list of anomaly kinds (empty entries ignored).
fn parse_kinds(s: &str) -> Option<Vec<String>> {
    let mut kinds = Vec::new();
    for kind in s.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        if !ANOMALY_KINDS.contains(&kind) {
            return None;
        }
        if !kinds.iter().any(|k| k == kind) {
            kinds.push(kind.to_string());
        }
    }
    Some(kinds)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p > 0)
}

fn parse_count(s: &str) -> Option<usize> {
    s.parse::<usize>().ok()
}

fn parse_positive(s: &str) -> Option<usize> {
    s.parse::<usize>().ok().filter(|&n| n > 0)
}

/// Parses a duration: a whole number of seconds (`"30"`) or numbers with units
/// largest first (`"500ms"`, `"30s"`, `"2m"`, `"1h"`, `"1m30s"`). Zero is
/// rejected.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: u64 = s.parse().ok()?;
        return (secs > 0).then(|| Duration::from_secs(secs));
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut last_unit_rank = u8::MAX;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit_len, rank, unit) = if rest.starts_with("ms") {
            (2, 0, Duration::from_millis(1))
        } else if rest.starts_with('s') {
            (1, 1, Duration::from_secs(1))
        } else if rest.starts_with('m') {
            (1, 2, Duration::from_secs(60))
        } else if rest.starts_with('h') {
            (1, 3, Duration::from_secs(3600))
        } else {
            return None;
        };
        if rank >= last_unit_rank {
            return None;
        }
        last_unit_rank = rank;
        rest = &rest[unit_len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(number).ok()?)?)?;
    }
    (!total.is_zero()).then_some(total)
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
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn root() -> PathBuf {
        PathBuf::from("/ws")
    }

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> Result<AgentVmConfig, ConfigError> {
        let path = root().join(CONFIG_FILE);
        AgentVmConfig::from_sources(
            &root(),
            file.map(|t| (path.as_path(), t)),
            &env(vars),
            Path::new("/cwd"),
        )
    }

    #[test]
    fn defaults() {
        let c = load(None, &[]).unwrap();
        assert_eq!(c.backend, BackendKind::Qemu);
        assert_eq!((c.pool_min_size, c.pool_max_size), (1, 2));
        assert_eq!(c.exec_timeout, Duration::from_secs(60));
        assert_eq!(c.acquire_timeout, Duration::from_secs(300));
        assert_eq!(c.boot_timeout, Duration::from_secs(120));
        assert_eq!(c.profile, ResourceProfile::Minimal);
        assert_eq!(c.image, "default");
        assert_eq!(c.network, NetworkMode::Gateway);
        assert!(c.allow.is_empty());
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(c.image_dir, PathBuf::from("/ws/target/agentvm/images"));
        assert_eq!(c.artifacts_dir, PathBuf::from("/ws/target/agentvm"));
        assert_eq!(c.max_uses, None);
        assert_eq!(c.metrics_port, None);
        assert_eq!(c.libvirt_uri, None);
        assert_eq!(c.config_file, None);
    }

    const FULL: &str = r#"
backend = "mock"
image = "rich"
image_dir = "imgs"
artifacts_dir = "/abs/artifacts"
profile = "light"
network = "bridge:br0"
accel = "tcg"
boot_timeout = "3m"
exec_timeout = 45
acquire_timeout = "1m30s"
metrics_port = 9464
libvirt_uri = "qemu:///system"

[pool]
min_size = 0
max_size = 4
max_uses = 10
"#;

    #[test]
    fn every_key_of_the_file() {
        let c = load(Some(FULL), &[]).unwrap();
        assert_eq!(c.backend, BackendKind::Mock);
        assert_eq!(c.image, "rich");
        assert_eq!(c.image_dir, PathBuf::from("/ws/imgs"));
        assert_eq!(c.artifacts_dir, PathBuf::from("/abs/artifacts"));
        assert_eq!(c.profile, ResourceProfile::Light);
        assert_eq!(c.network, NetworkMode::Bridge("br0".into()));
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.boot_timeout, Duration::from_secs(180));
        assert_eq!(c.exec_timeout, Duration::from_secs(45));
        assert_eq!(c.acquire_timeout, Duration::from_secs(90));
        assert_eq!(c.metrics_port, Some(9464));
        assert_eq!(c.libvirt_uri.as_deref(), Some("qemu:///system"));
        assert_eq!(
            (c.pool_min_size, c.pool_max_size, c.max_uses),
            (0, 4, Some(10))
        );
        assert_eq!(c.config_file, Some(root().join(CONFIG_FILE)));
    }

    #[test]
    fn environment_overrides_the_file() {
        let c = load(
            Some(FULL),
            &[
                ("AGENT_VM_BACKEND", "qemu"),
                ("AGENT_VM_IMAGE", "other"),
                ("AGENT_VM_IMAGE_DIR", "rel/imgs"),
                ("AGENT_VM_ARTIFACTS_DIR", "/tmp/art"),
                ("AGENT_VM_PROFILE", "intensive"),
                ("AGENT_VM_NETWORK_MODE", "nat-filtered"),
                ("AGENT_VM_ACCEL", "kvm"),
                ("AGENT_VM_BOOT_TIMEOUT", "10"),
                ("AGENT_VM_EXEC_TIMEOUT", "30s"),
                ("AGENT_VM_ACQUIRE_TIMEOUT", "250ms"),
                ("AGENT_VM_POOL_MIN_SIZE", "2"),
                ("AGENT_VM_POOL_MAX_SIZE", "3"),
                ("AGENT_VM_MAX_USES", "7"),
                ("AGENT_VM_METRICS_PORT", "9100"),
                ("LIBVIRT_DEFAULT_URI", "qemu:///session"),
            ],
        )
        .unwrap();
        assert_eq!(c.backend, BackendKind::Qemu);
        assert_eq!(c.image, "other");
        assert_eq!(c.image_dir, PathBuf::from("/cwd/rel/imgs"));
        assert_eq!(c.artifacts_dir, PathBuf::from("/tmp/art"));
        assert_eq!(c.profile, ResourceProfile::Intensive);
        assert_eq!(c.network, NetworkMode::NatFiltered);
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!(c.boot_timeout, Duration::from_secs(10));
        assert_eq!(c.exec_timeout, Duration::from_secs(30));
        assert_eq!(c.acquire_timeout, Duration::from_millis(250));
        assert_eq!(
            (c.pool_min_size, c.pool_max_size, c.max_uses),
            (2, 3, Some(7))
        );
        assert_eq!(c.metrics_port, Some(9100));
        assert_eq!(c.libvirt_uri.as_deref(), Some("qemu:///session"));
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let c = load(
            None,
            &[("AGENT_VM_POOL_MAX_SIZE", ""), ("AGENT_VM_BACKEND", "  ")],
        )
        .unwrap();
        assert_eq!(c.pool_max_size, 2);
        assert_eq!(c.backend, BackendKind::Qemu);
    }

    #[test]
    fn min_size_zero_is_allowed_max_size_zero_is_not() {
        let c = load(None, &[("AGENT_VM_POOL_MIN_SIZE", "0")]).unwrap();
        assert_eq!(c.pool_min_size, 0);
        let e = load(None, &[("AGENT_VM_POOL_MAX_SIZE", "0")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "environment variable AGENT_VM_POOL_MAX_SIZE: invalid pool.max_size \"0\": \
             expected a whole number, 1 or more"
        );
    }

    #[test]
    fn min_larger_than_max_is_an_error() {
        let e = load(None, &[("AGENT_VM_POOL_MIN_SIZE", "3")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pool.min_size (3) is larger than pool.max_size (2)"),
            "{e}"
        );
    }

    #[test]
    fn bad_environment_values_name_the_variable_and_the_allowed_values() {
        let cases = [
            ("AGENT_VM_BACKEND", "xen", "\"qemu\", \"libvirt\", \"mock\""),
            (
                "AGENT_VM_PROFILE",
                "huge",
                "\"minimal\", \"light\", \"standard\", \"intensive\"",
            ),
            (
                "AGENT_VM_NETWORK_MODE",
                "nat",
                "\"isolated\", \"nat-filtered\", \"bridge:NAME\"",
            ),
            ("AGENT_VM_NETWORK_MODE", "bridge:", "\"bridge:NAME\""),
            ("AGENT_VM_ACCEL", "hvf", "\"auto\", \"kvm\", \"tcg\""),
            ("AGENT_VM_EXEC_TIMEOUT", "soon", "\"30s\""),
            ("AGENT_VM_EXEC_TIMEOUT", "0", "more than zero"),
            ("AGENT_VM_BOOT_TIMEOUT", "-5", "\"30s\""),
            ("AGENT_VM_POOL_MIN_SIZE", "-1", "0 or more"),
            ("AGENT_VM_MAX_USES", "x", "1 or more"),
            ("AGENT_VM_METRICS_PORT", "70000", "1 to 65535"),
            ("AGENT_VM_IMAGE", "../etc", "ASCII letters"),
        ];
        for (var, value, expected) in cases {
            let e = load(None, &[(var, value)]).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("environment variable {var}: invalid ")),
                "{e}"
            );
            assert!(e.contains(&format!("{value:?}")), "{e}");
            assert!(e.contains(expected), "{var}={value}: {e}");
        }
    }

    #[test]
    fn bad_file_values_name_the_file_and_key() {
        let e = load(Some("profile = \"huge\""), &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/ws/.config/agentvm.toml (profile): invalid profile \"huge\": expected \
             \"minimal\", \"light\", \"standard\", \"intensive\""
        );
        let e = load(Some("[pool]\nmax_size = 0"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/ws/.config/agentvm.toml (pool.max_size): invalid pool.max_size \"0\""),
            "{e}"
        );
        let e = load(Some("exec_timeout = \"1s30m\""), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("(exec_timeout)") && e.contains("\"30s\""), "{e}");
    }

    #[test]
    fn unknown_keys_and_bad_types_are_errors_naming_the_file() {
        let e = load(Some("exec_timout = \"30s\""), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid configuration file /ws/.config/agentvm.toml: "),
            "{e}"
        );
        assert!(e.contains("unknown field `exec_timout`"), "{e}");
        assert!(e.contains("exec_timeout"), "lists the allowed keys: {e}");
        let e = load(Some("[pool]\nsize = 3"), &[]).unwrap_err().to_string();
        assert!(e.contains("unknown field `size`"), "{e}");
        assert!(e.contains("max_size"), "{e}");
        let e = load(Some("image = 3"), &[]).unwrap_err().to_string();
        assert!(e.contains("invalid type"), "{e}");
        let e = load(Some("image = "), &[]).unwrap_err().to_string();
        assert!(e.contains("invalid configuration file"), "{e}");
    }

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
    fn durations() {
        let d = |s| parse_duration(s);
        assert_eq!(d("30"), Some(Duration::from_secs(30)));
        assert_eq!(d("30s"), Some(Duration::from_secs(30)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("2m"), Some(Duration::from_secs(120)));
        assert_eq!(d("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("1s500ms"), Some(Duration::from_millis(1500)));
        assert_eq!(d(" 5s "), Some(Duration::from_secs(5)));
        for bad in [
            "",
            "0",
            "0s",
            "s",
            "5x",
            "30s1m",
            "5s5s",
            "1.5s",
            "-1",
            "5 s",
            "99999999999999h",
        ] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(parse_network("isolated"), Some(NetworkMode::Isolated));
        assert_eq!(parse_network("gateway"), Some(NetworkMode::Gateway));
        assert_eq!(parse_network("allowlist"), Some(NetworkMode::Allowlist));
        for spelling in ["nat-filtered", "nat_filtered"] {
            assert_eq!(parse_network(spelling), Some(NetworkMode::NatFiltered));
        }
        assert_eq!(
            parse_network("bridge:virbr0"),
            Some(NetworkMode::Bridge("virbr0".into()))
        );
        for bad in [
            "",
            "nat",
            "bridge:",
            "bridge:a/b",
            "bridge:waytoolongname01",
            "bridge:a b",
        ] {
            assert_eq!(parse_network(bad), None, "{bad}");
        }
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
    fn spec_and_pool_config() {
        let c = load(Some(FULL), &[]).unwrap();
        let image = ImagePaths {
            name: "rich".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            cmdline: "console=ttyS0".into(),
            rootfs: None,
        };
        let spec = c.vm_spec(image.clone());
        assert_eq!(spec.image, image);
        assert_eq!(spec.profile, ResourceProfile::Light);
        assert_eq!(spec.accel, Accel::Tcg);
        assert_eq!(spec.boot_timeout, Duration::from_secs(180));
        let pool = c.pool_config(spec.clone());
        assert_eq!(
            (pool.min_size, pool.max_size, pool.max_uses),
            (0, 4, Some(10))
        );
        assert_eq!(pool.spec, spec);
    }

    #[test]
    fn backend_factory() {
        let c = AgentVmConfig {
            backend: BackendKind::Mock,
            ..AgentVmConfig::default()
        };
        assert_eq!(create_backend(&c).unwrap().name(), "mock");
        // (The QEMU backend is not created here: it sweeps its runtime
        // directory, a side effect unit tests should not have.)
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
