//! The typed settings ([`AgentVmConfig`]), their built-in defaults, and what
//! the rest of the engine derives from them (a [`VmSpec`], a [`PoolConfig`]).
//! Nothing here reads a file or a variable, and nothing names a backend's
//! internals: [`BackendKind`] is only the choice, `crate::backend` builds it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pool::PoolConfig;
use crate::spec::{Accel, ImagePaths, NetworkMode, ResourceProfile, VmSpec};

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
    /// libvirt connection URIs the libvirt backend spreads its VMs over
    /// (`[libvirt] hosts`, `AGENT_VM_LIBVIRT_HOSTS`); empty: the one host
    /// of [`AgentVmConfig::libvirt_uri`].
    pub libvirt_hosts: Vec<String>,
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
            libvirt_hosts: Vec::new(),
            workspace_root: workspace_root.to_path_buf(),
            config_file: None,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{load, FULL};

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
        assert!(c.libvirt_hosts.is_empty());
        assert_eq!(c.config_file, None);
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
}
