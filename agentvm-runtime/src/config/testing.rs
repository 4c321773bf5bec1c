//! Helpers of the configuration's unit tests: [`load`] from a file's text
//! and variables, with the workspace root `/ws` and the current directory
//! `/cwd`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{AgentVmConfig, ConfigError, CONFIG_FILE};

pub(super) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub(super) fn root() -> PathBuf {
    PathBuf::from("/ws")
}

pub(super) fn load(
    file: Option<&str>,
    vars: &[(&str, &str)],
) -> Result<AgentVmConfig, ConfigError> {
    let path = root().join(CONFIG_FILE);
    AgentVmConfig::from_sources(
        &root(),
        file.map(|t| (path.as_path(), t)),
        &env(vars),
        Path::new("/cwd"),
    )
}

pub(super) const FULL: &str = r#"
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

[libvirt]
hosts = ["qemu:///system", "qemu+unix:///system?socket=/run/agentvm-libvirt2/libvirt-sock"]

[pool]
min_size = 0
max_size = 4
max_uses = 10
"#;
