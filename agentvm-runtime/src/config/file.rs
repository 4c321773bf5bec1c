//! The file format: the shape of `.config/agentvm.toml` (every key optional,
//! unknown keys rejected) and [`AgentVmConfig::apply_file`], which checks each
//! value with the parsers of [`super::values`].

use std::path::Path;

use serde::Deserialize;

use super::error::ConfigError;
use super::settings::AgentVmConfig;
use super::values::*;
use crate::spec::ResourceProfile;

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
    libvirt: Option<RawLibvirt>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLibvirt {
    hosts: Option<Vec<String>>,
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
        if let Some(hosts) = raw.libvirt.and_then(|l| l.hosts) {
            if hosts.iter().any(|h| h.contains(',')) {
                return Err(ConfigError::Invalid {
                    origin: origin("libvirt.hosts"),
                    key: "libvirt.hosts",
                    value: hosts.join(","),
                    expected: HOST_URIS.to_string(),
                });
            }
            self.libvirt_hosts = set.parse(
                "libvirt.hosts",
                &hosts.join(","),
                parse_host_uris,
                HOST_URIS,
            )?;
        }
        self.config_file = Some(path.to_path_buf());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::testing::{load, root, FULL};
    use crate::config::{BackendKind, CONFIG_FILE};
    use crate::spec::{Accel, NetworkMode, ResourceProfile};

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
            c.libvirt_hosts,
            [
                "qemu:///system",
                "qemu+unix:///system?socket=/run/agentvm-libvirt2/libvirt-sock"
            ]
        );
        assert_eq!(
            (c.pool_min_size, c.pool_max_size, c.max_uses),
            (0, 4, Some(10))
        );
        assert_eq!(c.config_file, Some(root().join(CONFIG_FILE)));
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
}
