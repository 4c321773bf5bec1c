//! The environment variables ([`ENV_VARS`]) and
//! [`AgentVmConfig::apply_env`], which checks each value with the parsers of
//! [`super::values`]. An empty variable counts as unset.

use std::collections::HashMap;
use std::path::Path;

use super::error::ConfigError;
use super::settings::AgentVmConfig;
use super::values::*;
use crate::spec::ResourceProfile;

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
    "AGENT_VM_LIBVIRT_HOSTS",
];

impl AgentVmConfig {
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
        apply!(
            "AGENT_VM_LIBVIRT_HOSTS",
            "libvirt.hosts",
            parse_host_uris,
            HOST_URIS,
            |v| self.libvirt_hosts = v
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use crate::config::testing::{load, FULL};
    use crate::config::BackendKind;
    use crate::spec::{Accel, NetworkMode, ResourceProfile};

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
    fn libvirt_hosts_from_the_variable_override_the_file() {
        let file = "[libvirt]\nhosts = [\"qemu:///system\", \"qemu+ssh://ci@a.example/system\"]\n";
        let c = load(Some(file), &[]).unwrap();
        assert_eq!(
            c.libvirt_hosts,
            ["qemu:///system", "qemu+ssh://ci@a.example/system"]
        );
        let c = load(
            Some(file),
            &[(
                "AGENT_VM_LIBVIRT_HOSTS",
                "qemu:///system,qemu+unix:///system?socket=/run/h2/libvirt-sock",
            )],
        )
        .unwrap();
        assert_eq!(
            c.libvirt_hosts,
            [
                "qemu:///system",
                "qemu+unix:///system?socket=/run/h2/libvirt-sock"
            ]
        );
        let e = load(
            None,
            &[("AGENT_VM_LIBVIRT_HOSTS", "qemu:///system,qemu:///system")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("environment variable AGENT_VM_LIBVIRT_HOSTS: invalid libvirt.hosts"),
            "{e}"
        );
        assert!(e.contains("each at most once"), "{e}");
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
}
